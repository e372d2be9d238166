//! Command-line surface (names are stable: tests and docs rely on them). This module
//! holds the parser and the dispatch; each command group has its own file.

mod cp;
mod deploy;
mod forward;
mod image;
mod login;
mod ops;
mod rollout;
mod token;
mod view;

pub use deploy::print_apply;
pub use image::pull_options;

use crate::client::Client;
use crate::output::{self, Format};
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
    /// How log lines are written on stderr: `text`, or `json` (one object a line).
    #[arg(long, global = true, value_enum, env = "SKIFF_LOG_FORMAT", default_value = "text")]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Subcommand)]
pub enum Cmd {
    /// Run an embedded hub and agent on this machine and deploy a compose file.
    Up(crate::up::UpArgs),
    /// Create or update deployments from a compose file.
    Apply {
        /// A compose file, or Kubernetes manifests (repeatable); `-` reads standard input.
        #[arg(short = 'f', long = "file", required = true)]
        file: Vec<PathBuf>,
        /// Validate and show what would change, without changing anything.
        #[arg(long)]
        dry_run: bool,
        /// Node label KEY=VALUE every deployment of the file must run on (repeatable).
        #[arg(long = "selector")]
        selector: Vec<String>,
    },
    /// Build the images of a compose file's services that have a `build:` section (with
    /// buildah), into this machine's image store.
    Build {
        /// The compose file (default: compose.yaml, docker-compose.yml, ... here).
        #[arg(short = 'f', long = "file")]
        file: Option<PathBuf>,
        /// Only these services.
        services: Vec<String>,
    },
    /// Run an image as a deployment.
    Run(Box<RunArgs>),
    /// List nodes, deployments, instances or events (or show one by name).
    Get {
        /// What to list: nodes, deployments, instances or events.
        kind: Kind,
        /// Only this one (an error when there is none).
        name: Option<String>,
        /// Label selector for deployments, and instances by their deployment's labels:
        /// `app=web`, `tier!=db`, `canary`, `!legacy`, comma-separated (all must match).
        #[arg(short = 'l', long = "selector")]
        selector: Option<String>,
        /// table, wide, json, yaml, or jsonpath=TEMPLATE (kubectl's:
        /// `jsonpath={.items[*].spec.name}`, `{range .items[*]}{.name}{"\n"}{end}`).
        #[arg(short = 'o', long = "output", default_value = "table", value_parser = parse_get_output)]
        output: GetOutput,
        /// Keep printing the list each time it changes (JSON and YAML: one document per change).
        #[arg(short = 'w', long)]
        watch: bool,
        /// Events only: `security` keeps threat-detection alerts and actions, refused
        /// images and policy violations.
        #[arg(long = "type", value_enum, ignore_case = true)]
        event_type: Option<view::EventType>,
    },
    /// Show one deployment (or node) in detail.
    Describe {
        /// deployment or node.
        kind: Kind,
        /// Its name.
        name: String,
    },
    /// Delete a deployment (its instances are stopped: SIGTERM, grace period, SIGKILL), a
    /// node, or what files applied (`-f`).
    Delete {
        /// `deployment` (may be left out) or `node`.
        #[arg(required_unless_present = "file")]
        kind_or_name: Option<String>,
        /// The name, after a kind (`skiff delete node edge-7`).
        name: Option<String>,
        /// Delete what these files applied: a compose file's whole stack, a manifest's
        /// deployments (`-` reads standard input).
        #[arg(short = 'f', long = "file", conflicts_with_all = ["kind_or_name", "name"])]
        file: Vec<PathBuf>,
    },
    /// Remove what a compose file (or manifests) applied: `skiff delete -f FILE`.
    Down {
        /// The compose file or manifests (repeatable; `-` reads standard input).
        #[arg(short = 'f', long = "file", required = true)]
        file: Vec<PathBuf>,
    },
    /// Print the logs of an instance, or of every instance of a deployment.
    Logs {
        /// An instance (`web-1`), or a deployment: all its instances, each line prefixed
        /// with its instance.
        name: String,
        /// Keep printing new lines as they come, following replaced and added instances;
        /// ends when the deployment is deleted.
        #[arg(short, long)]
        follow: bool,
        /// Only the last N lines (of each instance).
        #[arg(long)]
        tail: Option<usize>,
        /// Prefix each line with its timestamp.
        #[arg(short, long)]
        timestamps: bool,
        /// Only lines from this time on: a duration back from now (`10m`, `2h`) or an RFC
        /// 3339 time (`2026-12-05T10:00:00Z`).
        #[arg(long, value_parser = parse_when)]
        since: Option<u64>,
        /// Only lines up to this time (same forms); with -f, following ends there.
        #[arg(long, value_parser = parse_when)]
        until: Option<u64>,
    },
    /// Resource use of nodes or instances, from their newest samples.
    Top {
        /// nodes or instances.
        kind: TopKind,
        /// table, wide, json or yaml.
        #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
        output: Format,
    },
    /// Autoscaling tools.
    #[command(subcommand)]
    Autoscale(AutoscaleCmd),
    /// Follow, list or undo a deployment's updates.
    #[command(subcommand)]
    Rollout(RolloutCmd),
    /// Instances (as `docker ps`): name, deployment, state, health, restarts, address, ports.
    Ps {
        /// table, wide (node, image, container id), json or yaml.
        #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
        output: Format,
    },
    /// Set the replica count of deployments (`skiff scale web=3 api=1`), in one change.
    Scale {
        /// NAME=REPLICAS, one or more.
        #[arg(required = true, value_name = "NAME=REPLICAS")]
        items: Vec<String>,
    },
    /// Replace every instance of deployments, by each one's update strategy (as
    /// `kubectl rollout restart`; follow with `skiff rollout status NAME`); or one
    /// instance (`skiff restart web-1`: ended and started again on its node).
    Restart {
        /// Deployments or instances (one or more).
        #[arg(required = true, value_name = "NAME")]
        names: Vec<String>,
    },
    /// Stop deployments: no instances, the replica count kept for `skiff start`; or one
    /// instance (`skiff stop web-1`): stopped, and held so whatever its restart policy.
    Stop {
        /// Deployments or instances (one or more).
        #[arg(required = true, value_name = "NAME")]
        names: Vec<String>,
    },
    /// Start deployments `skiff stop` stopped, with the replica count they had; or an
    /// instance `skiff stop` stopped.
    Start {
        /// Deployments or instances (one or more).
        #[arg(required = true, value_name = "NAME")]
        names: Vec<String>,
    },
    /// Copy files between this machine and an instance (any node): `skiff cp web-1:/etc/app.conf .`,
    /// `skiff cp ./model web-1:/models/` (the instance needs `tar`, as `kubectl cp`).
    Cp {
        /// `INSTANCE:PATH` or a local path.
        src: String,
        /// `INSTANCE:PATH` or a local path (one side must be in an instance).
        dst: String,
    },
    /// Forward local ports to a port inside an instance on any node (as `kubectl
    /// port-forward`): `skiff port-forward web 8080:80`. Runs until Ctrl-C.
    PortForward {
        /// An instance, or a deployment (its first running instance).
        target: String,
        /// `[LOCAL:]REMOTE`: `8080`, `18080:80`, or `:80` for any free local port.
        #[arg(required = true, value_name = "[LOCAL:]REMOTE")]
        ports: Vec<String>,
        /// The local address to listen on.
        #[arg(long, default_value = "127.0.0.1")]
        address: String,
    },
    /// Keep a registry's credentials (Docker's config format, where pulls and `docker`
    /// find them); checked against the registry first.
    Login {
        /// The registry (default: Docker Hub).
        server: Option<String>,
        /// The user name (asked for on a terminal when not given).
        #[arg(short, long)]
        username: Option<String>,
        /// The password on the command line (other local users can see it: prefer
        /// --password-stdin).
        #[arg(short, long)]
        password: Option<String>,
        /// Read the password from standard input.
        #[arg(long)]
        password_stdin: bool,
    },
    /// Forget a registry's credentials.
    Logout {
        /// The registry (default: Docker Hub).
        server: Option<String>,
    },
    /// Versions: this program's, the hub's, and each node's agent and runtimes.
    Version,
    /// Run a role (agent, hub, up) as a systemd service that survives reboots and
    /// restarts without stopping containers.
    Install(crate::install::InstallArgs),
    /// Print a shell completion script (`skiff completion bash > /etc/bash_completion.d/skiff`).
    Completion {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// Write man pages generated from this command line (skiff.1, skiff-run.1, ...).
    #[command(hide = true)]
    Man {
        /// The directory to write them to.
        dir: PathBuf,
    },
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
    /// Attach this terminal to an instance's own process (as `docker attach`): its output
    /// from now on, and (when it was started with -i / stdin_open) your input; on a
    /// terminal container (-t / tty) keys and window size go to its terminal. Ctrl-P
    /// Ctrl-Q detaches and leaves it running; its exit ends the attachment with its code.
    Attach {
        /// Only watch: send no input.
        #[arg(long)]
        no_stdin: bool,
        /// The keys that detach, as Docker spells them (ctrl-p,ctrl-q; a letter, ctrl-@ to
        /// ctrl-_, or a single character each).
        #[arg(long, default_value = view::DEFAULT_DETACH_KEYS)]
        detach_keys: String,
        /// The instance (`skiff ps`).
        instance: String,
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

/// Writes a man page for `skiff` and one for each command (`skiff-run.1`), from the
/// parser's own definition.
fn man_pages(dir: &std::path::Path) -> Result<i32> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let cmd = <Cli as clap::CommandFactory>::command();
    let mut pages = vec![("skiff".to_string(), cmd.clone())];
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        pages.push((format!("skiff-{}", sub.get_name()), sub.clone()));
    }
    for (name, c) in pages {
        let mut page = Vec::new();
        clap_mangen::Man::new(c).title(name.to_uppercase()).render(&mut page)?;
        let path = dir.join(format!("{name}.1"));
        std::fs::write(&path, page).with_context(|| format!("writing {}", path.display()))?;
        outln!("{}", path.display());
    }
    Ok(0)
}

/// What `skiff get -o` prints: a format, or a kubectl jsonpath template.
#[derive(Debug, Clone)]
pub enum GetOutput {
    Format(Format),
    JsonPath(crate::jsonpath::Template),
}

fn parse_get_output(s: &str) -> Result<GetOutput, String> {
    if let Some(t) = s.strip_prefix("jsonpath=") {
        return crate::jsonpath::Template::parse(t).map(GetOutput::JsonPath);
    }
    <Format as clap::ValueEnum>::from_str(s, true)
        .map(GetOutput::Format)
        .map_err(|_| format!("{s:?}: want table, wide, json, yaml or jsonpath=TEMPLATE"))
}

/// A point in time for `--since`/`--until` (ms since the epoch): a duration back from now
/// or an RFC 3339 time.
fn parse_when(s: &str) -> Result<u64, String> {
    if let Some(secs) = skiff_image::notation::parse_rfc3339(s) {
        return u64::try_from(secs).map(|s| s * 1000).map_err(|_| format!("{s:?} is before 1970"));
    }
    let back = parse_ttl(s).map_err(|_| format!("{s:?} is neither a duration (10m, 2h) nor an RFC 3339 time"))?;
    Ok(skiff_sys::time::now_ms().saturating_sub(back * 1000))
}

pub fn main() -> i32 {
    let cli = Cli::parse();
    init_tracing(cli.verbose, matches!(cli.cmd, Cmd::Shim { .. }), cli.log_format);
    if let Cmd::Shim { bundle, daemon } = &cli.cmd {
        return skiff_runtime::shim::main(bundle, *daemon);
    }
    // A hub's threads share two heaps: each of its threads' own heap kept what that thread
    // freed of the copies a placement of every node needs (see `skiff_sys::arenas`).
    // And it keeps what it freed for the next apply, rather than giving it back and
    // faulting it in again.
    if matches!(cli.cmd, Cmd::Hub(_))
        && !(skiff_sys::arenas::limit(2) && skiff_sys::arenas::keep_freed(64 << 20, 32 << 20))
    {
        tracing::debug!("the allocator's arenas are not limited here");
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

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// For people.
    Text,
    /// One JSON object a line (time, level, message, fields), for log shippers.
    Json,
}

fn init_tracing(verbose: u8, quiet: bool, format: LogFormat) {
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
    let fmt = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false);
    let _ = match format {
        LogFormat::Text => fmt.try_init(),
        LogFormat::Json => fmt.json().flatten_event(true).try_init(),
    };
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
        Cmd::Get { kind, name, selector, output, watch, event_type } => {
            let only = view::Only::new(*kind, name.as_deref(), selector.as_deref())?;
            view::get(&client(cli)?, *kind, output, *watch, *event_type, &only).await
        }
        Cmd::Top { kind, output } => view::top(&client(cli)?, *kind, *output).await,
        Cmd::Rollout(cmd) => rollout::rollout(&client(cli)?, cmd).await,
        Cmd::Autoscale(AutoscaleCmd::Simulate { file }) => rollout::simulate(file),
        Cmd::Describe { kind, name } => view::describe(cli, *kind, name).await,
        Cmd::Delete { file, .. } | Cmd::Down { file } if !file.is_empty() => deploy::delete_files(cli, file).await,
        Cmd::Delete { kind_or_name: Some(k), name, .. } => deploy::delete(cli, k, name.as_ref()).await,
        Cmd::Delete { .. } | Cmd::Down { .. } => bail!("name what to delete, or give -f FILE"),
        Cmd::Logs { name, follow, tail, timestamps, since, until } => {
            let window = view::LogWindow { since_ms: *since, until_ms: *until };
            view::logs(&client(cli)?, name, *follow, *tail, *timestamps, window).await
        }
        Cmd::Ps { output } => {
            let output = GetOutput::Format(*output);
            view::get(&client(cli)?, Kind::Instances, &output, false, None, &view::Only::default()).await
        }
        Cmd::Scale { items } => ops::scale(&client(cli)?, items).await,
        Cmd::Restart { names } => ops::restart(&client(cli)?, names, skiff_sys::time::now_ms()).await,
        Cmd::Stop { names } => ops::stop(&client(cli)?, names).await,
        Cmd::Start { names } => ops::start(&client(cli)?, names).await,
        Cmd::Version => ops::version(client(cli).ok()).await,
        Cmd::Cp { src, dst } => cp::cp(&client(cli)?, src, dst).await,
        Cmd::Login { server, username, password, password_stdin } => {
            login::login(cli, server.as_deref(), username.as_deref(), password.as_deref(), *password_stdin).await
        }
        Cmd::Logout { server } => login::logout(server.as_deref()),
        Cmd::PortForward { target, ports, address } => {
            forward::port_forward(client(cli)?, target, ports, address).await
        }
        Cmd::Install(args) => crate::install::install(args),
        Cmd::Completion { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            let mut out = Vec::new();
            clap_complete::generate(*shell, &mut cmd, "skiff", &mut out);
            output::emit(&String::from_utf8_lossy(&out));
            Ok(0)
        }
        Cmd::Man { dir } => man_pages(dir),
        Cmd::Exec { interactive, tty, instance, command } => {
            view::exec(cli, instance, command, *interactive, *tty).await
        }
        Cmd::Attach { no_stdin, detach_keys, instance } => {
            let how = view::Attach { no_stdin: *no_stdin, ..Default::default() };
            view::attach(cli, instance, how, detach_keys).await
        }
        Cmd::Image(cmd @ (ImageCmd::Pull { .. } | ImageCmd::Sign { .. } | ImageCmd::Verify { .. })) => {
            image::pull(cli, cmd).await
        }
        Cmd::Image(cmd) => image::image(&cli.data, cmd),
        Cmd::Build { file, services } => {
            let file = file.clone().or_else(crate::up::default_compose).context(
                "-f: no compose file given, and none here (compose.yaml, compose.yml, docker-compose.yml, \
                 docker-compose.yaml)",
            )?;
            let import = crate::up::load_compose(&file)?;
            let n = crate::build::build_all(&cli.data, &import.builds, services, false)?;
            if n == 0 {
                eprintln!("{}: no service has a build section", file.display());
            }
            Ok(0)
        }
        Cmd::Bundle(cmd) => image::bundle(&cli.data, cmd),
        Cmd::Shim { .. } => Ok(0),
    }
}

/// An error with its causes, each once: library errors often already say their source.
pub(crate) fn report(e: &anyhow::Error) -> String {
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
    /// The node reports DiskPressure, and takes no new instances, while its data
    /// filesystem has less free than this: a percentage of its size or a size (2Gi); 0: never.
    #[arg(long, env = "SKIFF_DISK_PRESSURE_BELOW", default_value = "5%", value_parser = parse_floor)]
    pub disk_pressure_below: skiff_agent::metrics::Floor,
    /// Likewise MemoryPressure, while less memory than this is available.
    #[arg(long, env = "SKIFF_MEMORY_PRESSURE_BELOW", default_value = "5%", value_parser = parse_floor)]
    pub memory_pressure_below: skiff_agent::metrics::Floor,
}

impl NodeArgs {
    /// Reads the policy and rule files (errors name the flag and the field).
    pub fn apply(&self, cfg: &mut skiff_agent::AgentConfig) -> Result<()> {
        cfg.require_runc_min = self.require_runc_min.clone();
        cfg.pressure =
            skiff_agent::metrics::Floors { disk: self.disk_pressure_below, memory: self.memory_pressure_below };
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

fn parse_floor(s: &str) -> Result<skiff_agent::metrics::Floor, String> {
    skiff_agent::metrics::Floor::parse(s)
}

/// The node's bridge network, as `skiff up` and `skiff agent` take it.
#[derive(clap::Args, Debug, Clone)]
pub struct BridgeArgs {
    /// Name of the node's bridge.
    #[arg(long, default_value = "skiff0")]
    pub bridge: String,
    /// Address pool of the bridge's networks: each network with instances on this node
    /// gets a subnet of its own cut from it (as Docker's networks do), and the bridge
    /// takes .1 of the pool and of each network's subnet.
    #[arg(long, default_value = "10.213.0.0/20")]
    pub subnet: String,
    /// Prefix length of each network's subnet in the pool (default: the pool cut in 16,
    /// at most a /24: a /20 pool gives 16 networks of 253 instances).
    #[arg(long, value_parser = clap::value_parser!(u8).range(8..=30))]
    pub network_prefix: Option<u8>,
    /// Firewall that masquerades the bridge's traffic to the outside (as Docker's bridge)
    /// and forwards published ports in the kernel, so they answer while the agent restarts:
    /// auto (nft when installed, else iptables), nft, iptables, or none (instances then
    /// reach only this host, and the agent's proxy forwards published ports).
    #[arg(long, default_value = "auto", value_parser = parse_firewall)]
    pub firewall: skiff_runtime::nat::FirewallSetting,
    /// Where services' virtual addresses come from (instances resolve a service's name,
    /// through the node's DNS, to one of them); clear of the subnet and of the host's own
    /// networks. `none`: no fleet services on this node (instances use the host's
    /// resolvers, and reach peers on this node by name only).
    #[arg(long, default_value = "10.213.128.0/17", value_parser = parse_service_range)]
    pub service_range: ServiceRange,
}

/// `--service-range`: a subnet, or none.
#[derive(Debug, Clone, Copy)]
pub struct ServiceRange(pub Option<(std::net::Ipv4Addr, u8)>);

fn parse_service_range(s: &str) -> std::result::Result<ServiceRange, String> {
    if s == "none" {
        return Ok(ServiceRange(None));
    }
    let net = skiff_runtime::network::Subnet::parse(s).map_err(|e| e.to_string())?;
    if !(8..=28).contains(&net.prefix) {
        return Err(format!("{s}: a service range is a /8 to a /28"));
    }
    Ok(ServiceRange(Some((net.base, net.prefix))))
}

impl BridgeArgs {
    pub fn apply(&self, cfg: &mut skiff_agent::AgentConfig) {
        cfg.bridge_name = self.bridge.clone();
        cfg.subnet = self.subnet.clone();
        cfg.network_prefix = self.network_prefix;
        cfg.firewall = self.firewall;
        cfg.services = self.service_range.0;
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

#[cfg(test)]
mod docs_tests {
    /// Every command and argument says what it is (`--help`, man pages, completions).
    #[test]
    fn every_argument_has_help() {
        use clap::CommandFactory;
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            let path = format!("{path} {}", cmd.get_name());
            if cmd.is_hide_set() && cmd.get_name() == "shim" {
                return;
            }
            if cmd.get_about().is_none() {
                missing.push(format!("{path} (the command)"));
            }
            for a in cmd.get_arguments() {
                let id = a.get_id().as_str();
                if id == "help" || id == "version" || a.is_hide_set() {
                    continue;
                }
                if a.get_help().is_none() && a.get_long_help().is_none() {
                    missing.push(format!("{path} {id}"));
                }
            }
            for sub in cmd.get_subcommands() {
                walk(sub, &path, missing);
            }
        }
        let mut missing = vec![];
        walk(&super::Cli::command(), "", &mut missing);
        assert!(missing.is_empty(), "without help text: {missing:#?}");
    }

    /// Every `skiff` command in the operator pages (`docs/operations/*.md`, in ```sh
    /// blocks) is one this command line takes.
    #[test]
    fn docs_commands_parse() {
        use clap::Parser;
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/operations");
        let mut checked = 0;
        for e in std::fs::read_dir(&dir).unwrap().flatten() {
            let path = e.path();
            if path.extension().is_none_or(|x| x != "md") {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            let mut in_sh = false;
            for line in text.lines() {
                if line.starts_with("```") {
                    in_sh = line == "```sh";
                    continue;
                }
                if in_sh && line.starts_with("skiff ") {
                    let mut argv = skiff_manifest::shell_split(line).unwrap();
                    // A redirection or pipe is the shell's, not the command's.
                    if let Some(i) = argv.iter().position(|a| ["<", ">", ">>", "|"].contains(&a.as_str())) {
                        argv.truncate(i);
                    }
                    if let Err(e) = super::Cli::try_parse_from(&argv) {
                        panic!("{}: {line}: {e}", path.display());
                    }
                    checked += 1;
                }
            }
        }
        assert!(checked >= 30, "only {checked} commands found in {}", dir.display());
    }
}
