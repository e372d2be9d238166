//! Command-line surface (names are stable: tests and docs rely on them). This module
//! holds the parser and the dispatch; each command group has its own file.

mod deploy;
mod image;
mod rollout;
mod token;
mod view;

pub use deploy::print_apply;
pub use image::pull_options;

use crate::client::Client;
use crate::output::Format;
use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use deploy::RunArgs;
use image::ImageCmd;
use rollout::{AutoscaleCmd, RolloutCmd};
use std::collections::BTreeMap;
use std::path::PathBuf;
use token::TokenCmd;
use view::{Kind, TopKind};

#[derive(Parser)]
#[command(name = "skiff", version, about = "Run containers on fleets of small edge devices", propagate_version = true)]
pub struct Cli {
    /// Data directory (state, images, containers).
    #[arg(long, global = true, env = "SKIFF_DATA", default_value = "/var/lib/skiff")]
    pub data: PathBuf,
    /// Client config naming the hub and its token (default: $SKIFF_CONFIG,
    /// ~/.config/skiff/config, then <data>/admin.conf).
    #[arg(long, global = true)]
    pub config: Option<PathBuf>,
    /// Registry mirrors, insecure registries and an extra CA file (see `skiff_image::hosts`).
    #[arg(long, global = true, env = "SKIFF_REGISTRIES")]
    pub registries: Option<PathBuf>,
    /// More logging (--verbose info, twice for debug). RUST_LOG overrides.
    #[arg(long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Subcommand)]
pub enum Cmd {
    /// Run an embedded hub and agent on this machine and deploy a compose file.
    Up(crate::up::UpArgs),
    /// Create or update deployments from a compose file.
    Apply {
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        /// Validate and show what would change, without changing anything.
        #[arg(long)]
        dry_run: bool,
        /// Node label KEY=VALUE every deployment of the file must run on (repeatable).
        #[arg(long = "selector")]
        selector: Vec<String>,
    },
    /// Run an image as a deployment.
    Run(Box<RunArgs>),
    /// List nodes, deployments, instances or events.
    Get {
        kind: Kind,
        #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
        output: Format,
        /// Keep printing the list each time it changes (JSON and YAML: one document per change).
        #[arg(short = 'w', long)]
        watch: bool,
        /// Events only: `security` keeps threat-detection alerts and actions, refused
        /// images and policy violations.
        #[arg(long = "type", value_enum, ignore_case = true)]
        event_type: Option<view::EventType>,
    },
    /// Show one deployment (or node) in detail.
    Describe { kind: Kind, name: String },
    /// Delete a deployment (its instances are stopped: SIGTERM, grace period, SIGKILL).
    Delete {
        /// `deployment` (may be left out).
        kind_or_name: String,
        name: Option<String>,
    },
    /// Print the logs of an instance, or of every instance of a deployment.
    Logs {
        name: String,
        #[arg(short, long)]
        follow: bool,
        #[arg(long)]
        tail: Option<usize>,
        /// Prefix each line with its timestamp.
        #[arg(short, long)]
        timestamps: bool,
    },
    /// Resource use of nodes or instances, from their newest samples.
    Top {
        kind: TopKind,
        #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
        output: Format,
    },
    /// Autoscaling tools.
    #[command(subcommand)]
    Autoscale(AutoscaleCmd),
    /// Follow, list or undo a deployment's updates.
    #[command(subcommand)]
    Rollout(RolloutCmd),
    /// Run a command in a running instance, its output shown as it comes (any node: a
    /// node behind NAT is reached through its tunnel). The exit code is the command's.
    Exec {
        /// Pass standard input on to the command (a pipe, or with -t the keyboard).
        #[arg(short, long)]
        interactive: bool,
        /// Give the command a terminal (as `docker exec -t`): with -i, a shell to type
        /// into, sized as this one and resized with it; Ctrl-C and Ctrl-D go to it.
        #[arg(short, long)]
        tty: bool,
        /// The instance (`skiff get instances`).
        instance: String,
        /// The command and its arguments, after `--`.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Manage the local image store.
    #[command(subcommand)]
    Image(ImageCmd),
    /// Images in one file for nodes without a registry: whole, or only what an older
    /// image lacks (`--since`).
    #[command(subcommand)]
    Bundle(image::BundleCmd),
    /// Run the hub: the control plane for many nodes, over TLS with its own CA; or back
    /// up, restore or move its store.
    #[command(args_conflicts_with_subcommands = true)]
    Hub(crate::hub::HubArgs),
    /// Run this machine as a node of a hub (joins on first start with --token).
    Agent(crate::agent::AgentArgs),
    /// Tokens: join tokens for nodes (`skiff agent --token-file`), and API tokens with a
    /// role (admin, read, metrics).
    #[command(subcommand)]
    Token(TokenCmd),
    /// Internal: the per-container shim (started by the agent).
    #[command(hide = true)]
    Shim {
        #[arg(long)]
        bundle: PathBuf,
        #[arg(long)]
        daemon: bool,
    },
}

/// `--selector KEY=VALUE`s (and `--label` of `skiff agent`) as a map; keys checked.
pub fn parse_selector(items: &[String]) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for l in items {
        let (k, v) = l.split_once('=').with_context(|| format!("{l:?}: want KEY=VALUE"))?;
        if !skiff_model::validate::is_label_key(k) {
            bail!("{l:?}: {k:?} is not a label key (letters, digits, '-', '_', '.', '/')");
        }
        out.insert(k.to_string(), v.to_string());
    }
    Ok(out)
}

/// A duration flag: `90s`, `30m`, `24h`, `90d`.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    parse_ttl(s).map(std::time::Duration::from_secs)
}

/// `--ttl`: a duration in seconds, from `90s`, `30m`, `24h`, `90d`.
fn parse_ttl(s: &str) -> Result<u64, String> {
    let days = s.strip_suffix('d').and_then(|d| d.parse::<u64>().ok()).map(|d| d.saturating_mul(86_400_000));
    match days.or_else(|| skiff_manifest::parse_duration_ms(s)) {
        Some(ms) if ms >= 1000 => Ok(ms / 1000),
        Some(_) => Err("must be at least 1s".into()),
        None => Err(format!("{s:?} is not a duration (examples: 30m, 24h)")),
    }
}

pub fn main() -> i32 {
    let cli = Cli::parse();
    init_tracing(cli.verbose, matches!(cli.cmd, Cmd::Shim { .. }));
    if let Cmd::Shim { bundle, daemon } = &cli.cmd {
        return skiff_runtime::shim::main(bundle, *daemon);
    }
    let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            return 1;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", report(&e));
            1
        }
    }
}

fn init_tracing(verbose: u8, quiet: bool) {
    if quiet {
        return;
    }
    let default = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ =
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false).try_init();
}

fn client(cli: &Cli) -> Result<Client> {
    let (_, cfg) = crate::config::find(cli.config.as_deref(), &cli.data)?;
    Client::new(cfg)
}

async fn run(cli: Cli) -> Result<i32> {
    let cli = &cli;
    match &cli.cmd {
        Cmd::Up(args) => crate::up::up(cli, args).await,
        Cmd::Hub(args) => crate::hub::hub(cli, args).await,
        Cmd::Agent(args) => crate::agent::agent(cli, args).await,
        Cmd::Token(t) => token::token(&client(cli)?, t).await,
        Cmd::Apply { file, dry_run, selector } => deploy::apply(cli, file, *dry_run, selector).await,
        Cmd::Run(args) => deploy::run(cli, args).await,
        Cmd::Get { kind, output, watch, event_type } => {
            view::get(&client(cli)?, *kind, *output, *watch, *event_type).await
        }
        Cmd::Top { kind, output } => view::top(&client(cli)?, *kind, *output).await,
        Cmd::Rollout(cmd) => rollout::rollout(&client(cli)?, cmd).await,
        Cmd::Autoscale(AutoscaleCmd::Simulate { file }) => rollout::simulate(file),
        Cmd::Describe { kind, name } => view::describe(cli, *kind, name).await,
        Cmd::Delete { kind_or_name, name } => deploy::delete(cli, kind_or_name, name.as_ref()).await,
        Cmd::Logs { name, follow, tail, timestamps } => {
            view::logs(&client(cli)?, name, *follow, *tail, *timestamps).await
        }
        Cmd::Exec { interactive, tty, instance, command } => {
            view::exec(cli, instance, command, *interactive, *tty).await
        }
        Cmd::Image(cmd @ (ImageCmd::Pull { .. } | ImageCmd::Sign { .. } | ImageCmd::Verify { .. })) => {
            image::pull(cli, cmd).await
        }
        Cmd::Image(cmd) => image::image(&cli.data, cmd),
        Cmd::Bundle(cmd) => image::bundle(&cli.data, cmd),
        Cmd::Shim { .. } => Ok(0),
    }
}

/// An error with its causes, each once: library errors often already say their source.
fn report(e: &anyhow::Error) -> String {
    skiff_image::error::with_causes(e.as_ref())
}

/// What a node allows and watches, as `skiff up` and `skiff agent` take it.
#[derive(clap::Args, Debug, Clone)]
pub struct NodeArgs {
    /// Refuse to start with a runc older than this version (e.g. 1.2.8: runc before it has
    /// container-escape flaws).
    #[arg(long)]
    pub require_runc_min: Option<String>,
    /// What workloads may ask of this node: bind mounts, capabilities, devices, host
    /// network (YAML; default /etc/skiff/policy.yaml when it exists).
    #[arg(long)]
    pub policy: Option<std::path::PathBuf>,
    /// Where CDI device specs are read from (repeatable; default /etc/cdi and /var/run/cdi).
    #[arg(long = "cdi-spec-dir")]
    pub cdi_spec_dir: Vec<std::path::PathBuf>,
    /// Runtime threat-detection rules (Falco's YAML subset) beside the shipped ones;
    /// repeatable, later files override earlier rules of the same name.
    #[arg(long = "detect-rules")]
    pub detect_rules: Vec<std::path::PathBuf>,
    /// No runtime threat detection.
    #[arg(long = "no-detect", conflicts_with = "detect_rules")]
    pub no_detect: bool,
}

impl NodeArgs {
    /// Reads the policy and rule files (errors name the flag and the field).
    pub fn apply(&self, cfg: &mut skiff_agent::AgentConfig) -> Result<()> {
        cfg.require_runc_min = self.require_runc_min.clone();
        cfg.policy = skiff_agent::policy::Policy::load(self.policy.as_deref())?;
        if !self.cdi_spec_dir.is_empty() {
            cfg.cdi_dirs = self.cdi_spec_dir.clone();
        }
        if !self.no_detect {
            let rules = skiff_agent::detect::load_rules(&self.detect_rules)
                .map_err(|e| anyhow::anyhow!("--detect-rules: {e}"))?;
            cfg.detect = Some(rules);
        }
        Ok(())
    }
}

/// The node's bridge network, as `skiff up` and `skiff agent` take it.
#[derive(clap::Args, Debug, Clone)]
pub struct BridgeArgs {
    /// Name of the node's bridge.
    #[arg(long, default_value = "skiff0")]
    pub bridge: String,
    /// Subnet for bridge-mode instances (the bridge takes .1).
    #[arg(long, default_value = "10.213.0.0/20")]
    pub subnet: String,
    /// Firewall that masquerades the bridge's traffic to the outside (as Docker's bridge)
    /// and forwards published ports in the kernel, so they answer while the agent restarts:
    /// auto (nft when installed, else iptables), nft, iptables, or none (instances then
    /// reach only this host, and the agent's proxy forwards published ports).
    #[arg(long, default_value = "auto", value_parser = parse_firewall)]
    pub firewall: skiff_runtime::nat::FirewallSetting,
}

impl BridgeArgs {
    pub fn apply(&self, cfg: &mut skiff_agent::AgentConfig) {
        cfg.bridge_name = self.bridge.clone();
        cfg.subnet = self.subnet.clone();
        cfg.firewall = self.firewall;
    }
}

fn parse_firewall(s: &str) -> std::result::Result<skiff_runtime::nat::FirewallSetting, String> {
    skiff_runtime::nat::Firewall::parse(s)
}

#[cfg(test)]
mod tests {
    /// clap's own checks of every subcommand (duplicate argument ids across flattened
    /// groups, bad defaults), which otherwise show only when that command runs.
    #[test]
    fn the_command_line_is_well_formed() {
        <super::Cli as clap::CommandFactory>::command().debug_assert();
    }

    #[test]
    fn errors_name_each_cause_once() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "gone");
        let lib = skiff_image::ImageError::Io { op: "read", path: "/x".into(), source: io };
        let e = anyhow::Error::new(lib).context("loading the registries config");
        assert_eq!(super::report(&e), "loading the registries config: read /x: gone");
        assert_eq!(super::image::parse_rate("2M"), Ok(2 << 20));
        assert!(super::image::parse_rate("0").is_err() && super::image::parse_rate("fast").is_err());
    }
}
