//! Command-line surface (names are stable: tests and docs rely on them).

use crate::client::Client;
use crate::output::{self, Format};
use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use skiff_model::api::{ApplyRequest, ApplyResponse, DeploymentView};
use skiff_model::rollout::{Revision, RolloutState, RolloutStatus};
use skiff_model::{
    Deployment, DeviceMapping, InstanceStatus, LogLine, NetworkMode, PortMapping, RestartPolicy, RuntimeKind, Volume,
    VolumeSource,
};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

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
    /// Run a command in a running instance.
    Exec {
        instance: String,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Manage the local image store.
    #[command(subcommand)]
    Image(ImageCmd),
    /// Run the hub: the control plane for many nodes, over TLS with its own CA.
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

#[derive(Subcommand)]
pub enum TokenCmd {
    /// Make a token (printed once; the hub keeps only its hash).
    Create {
        /// How long it is valid, e.g. 24h or 30m (default: 24h for a join token; an API
        /// token until revoked).
        #[arg(long, value_parser = parse_ttl)]
        ttl: Option<u64>,
        /// How many nodes may join with it (default: any until it expires; 1 with --replace).
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
        uses: Option<u32>,
        /// The existing node a join with this token replaces (its old certificate is
        /// revoked): a stolen or re-imaged device.
        #[arg(long)]
        replace: Option<String>,
        /// join (a node), or an API token: admin (everything), read (every read, no
        /// change), metrics (/metrics and /api/v1/metrics only).
        #[arg(long, default_value = "join", value_parser = ["join", "admin", "read", "metrics"])]
        role: String,
    },
    /// List tokens (without their secrets).
    Ls,
    /// Stop a token from being used (nodes that joined with it stay).
    Revoke { id: String },
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

#[derive(Subcommand)]
pub enum AutoscaleCmd {
    /// Print, as JSON, what the autoscaler decides for the situation in FILE (Kubernetes
    /// HPA semantics; see the README's reference).
    Simulate {
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
    },
}

#[derive(Subcommand)]
pub enum RolloutCmd {
    /// Follow the newest revision's rollout until it completes (exit 0) or fails (exit 1).
    Status {
        name: String,
        /// Print the state once instead of following it.
        #[arg(long)]
        no_wait: bool,
        /// Give up after this long, e.g. 90s or 10m (exit 1).
        #[arg(long, value_parser = parse_ttl, default_value = "10m")]
        timeout: u64,
        #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
        output: Format,
    },
    /// The deployment's revisions (the newest 10), oldest first.
    History {
        name: String,
        #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
        output: Format,
    },
    /// Go back to the previous revision, or to --to-revision N.
    Undo {
        name: String,
        #[arg(long)]
        to_revision: Option<u64>,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TopKind {
    #[value(alias = "node")]
    Nodes,
    #[value(alias = "instance", alias = "inst")]
    Instances,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Kind {
    #[value(alias = "node")]
    Nodes,
    #[value(alias = "deployment", alias = "deploy")]
    Deployments,
    #[value(alias = "instance", alias = "inst")]
    Instances,
    #[value(alias = "event")]
    Events,
    #[value(alias = "autoscaler", alias = "hpa")]
    Autoscalers,
    #[value(alias = "alert")]
    Alerts,
}

#[derive(Subcommand)]
pub enum ImageCmd {
    /// Load images from a `docker save` tarball, an OCI layout directory or an oci-archive.
    Load {
        file: PathBuf,
        /// Name for an image whose archive does not name it.
        #[arg(long)]
        tag: Option<String>,
    },
    /// Pull an image from a registry (resumable, verified; the variant for this machine
    /// unless --platform says otherwise).
    Pull {
        reference: String,
        /// os/arch[/variant], e.g. linux/arm64 or linux/arm/v7.
        #[arg(long)]
        platform: Option<String>,
        /// Registry reached over plain HTTP (loopback registries always are).
        #[arg(long = "insecure-registry")]
        insecure_registry: Vec<String>,
        /// Cap on the download rate over all layers, in bytes per second (e.g. 500K, 2M).
        #[arg(long = "limit-rate", value_parser = parse_rate)]
        limit_rate: Option<u64>,
        /// Layers downloaded at once.
        #[arg(long = "max-concurrent-downloads", default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=64))]
        max_concurrent_downloads: u16,
    },
    /// Write images to a `docker save` tarball (for `docker load`, `skopeo`, `skiff image load`).
    Save {
        #[arg(required = true)]
        references: Vec<String>,
        #[arg(short = 'o', long = "output")]
        output: PathBuf,
    },
    /// List images.
    Ls {
        #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
        output: Format,
    },
    /// Remove an image (refused while a deployment uses it).
    Rm { reference: String },
    /// Show an image's config and layers.
    Inspect { reference: String },
    /// Remove blobs and layers no image needs.
    Prune,
}

#[derive(Args)]
pub struct RunArgs {
    /// An image reference, or (with the wasm runtime) a .wasm file on this machine.
    pub image: String,
    /// oci (a container under runc) or wasm (a WASI program under wasmtime); a .wasm file
    /// implies wasm.
    #[arg(long)]
    pub runtime: Option<String>,
    /// wasm: stop a command after this long (exit code 124); an HTTP component answers 504
    /// to a request still running then (5s, 500ms, 1m).
    #[arg(long = "wasm-timeout")]
    pub wasm_timeout: Option<String>,
    /// wasm HTTP components: serve from a pool of N pre-reserved instances, N requests at
    /// a time (default: a fresh instance per request, no bound).
    #[arg(long = "wasm-pool")]
    pub wasm_pool: Option<u32>,
    /// wasm: let the program connect to loopback, link-local (cloud metadata) and the
    /// node's own addresses (out of bounds by default).
    #[arg(long = "wasm-allow-local")]
    pub wasm_allow_local: bool,
    #[arg(long)]
    pub name: Option<String>,
    /// CPU limit in cores (0.5) or millicores (500m).
    #[arg(long)]
    pub cpus: Option<String>,
    /// Memory limit (512m, 1g, 512Mi); swap is limited to the same amount.
    #[arg(short = 'm', long)]
    pub memory: Option<String>,
    #[arg(long)]
    pub cpu_shares: Option<u64>,
    #[arg(long)]
    pub pids_limit: Option<i64>,
    /// no | always | on-failure[:N] | unless-stopped
    #[arg(long, default_value = "no")]
    pub restart: String,
    #[arg(short = 'e', long = "env")]
    pub env: Vec<String>,
    #[arg(short = 'p', long = "publish")]
    pub publish: Vec<String>,
    /// SOURCE:TARGET[:ro]; SOURCE is a host path (absolute) or a volume name.
    #[arg(short = 'v', long = "volume")]
    pub volume: Vec<String>,
    #[arg(long, default_value = "bridge")]
    pub network: String,
    #[arg(long)]
    pub read_only: bool,
    #[arg(short = 'u', long)]
    pub user: Option<String>,
    #[arg(short = 'w', long)]
    pub workdir: Option<String>,
    #[arg(long)]
    pub entrypoint: Option<String>,
    #[arg(long)]
    pub cap_add: Vec<String>,
    #[arg(long)]
    pub cap_drop: Vec<String>,
    #[arg(long)]
    pub device: Vec<String>,
    #[arg(long, default_value_t = 1)]
    pub replicas: u32,
    /// Node label KEY=VALUE the instances must run on (repeatable).
    #[arg(long = "selector")]
    pub selector: Vec<String>,
    /// Seconds between SIGTERM and SIGKILL on stop.
    #[arg(long, default_value_t = 10)]
    pub stop_timeout: u64,
    #[arg(last = true)]
    pub command: Vec<String>,
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
    match &cli.cmd {
        Cmd::Up(args) => crate::up::up(&cli, args).await,
        Cmd::Hub(args) => crate::hub::hub(&cli, args).await,
        Cmd::Agent(args) => crate::agent::agent(&cli, args).await,
        Cmd::Token(t) => token(&client(&cli)?, t).await,
        Cmd::Apply { file, dry_run, selector } => {
            let text = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
            // Kubernetes manifests are applied as `kubectl apply` does (no pruning); a compose
            // file replaces its whole stack.
            let (mut deployments, warnings, prune_stack, autoscalers) = if skiff_manifest::is_k8s(&text) {
                let k = skiff_manifest::import_k8s(&text, "default").with_context(|| format!("{}", file.display()))?;
                // An autoscaler for a Deployment applied earlier: the hub sets it on the
                // stored one, in the same transaction.
                (k.deployments, k.warnings, None, k.autoscalers)
            } else {
                let c = crate::up::load_compose(file)?;
                (c.deployments, c.warnings, Some(c.project), vec![])
            };
            for w in &warnings {
                eprintln!("warning: {w}");
            }
            let selector = parse_selector(selector)?;
            for d in &mut deployments {
                d.placement.node_selector.extend(selector.clone());
            }
            let req = ApplyRequest { deployments, prune_stack, dry_run: *dry_run, autoscalers };
            let r: ApplyResponse = client(&cli)?.post("/api/v1/apply", &req).await?;
            print_apply(&r, *dry_run);
            Ok(0)
        }
        Cmd::Run(args) => {
            // A .wasm file is stored as an image last, once the deployment is valid and the
            // program checked: a refused run stores nothing.
            let file = match wasm_file(args)? {
                Some(f) => {
                    let digest = skiff_image::wasm::file_digest(&f)?;
                    Some((f, digest))
                }
                None => None,
            };
            let image = match &file {
                Some((f, digest)) => skiff_image::wasm::reference_for(f, digest),
                None => args.image.clone(),
            };
            let d = deployment_from_run(args, image, file.is_some())?;
            if let Some((f, digest)) = &file {
                import_wasm_file(&cli.data, f, digest, &d.image)?;
            }
            let name = d.name.clone();
            let req = ApplyRequest { deployments: vec![d], ..Default::default() };
            let r: ApplyResponse = client(&cli)?.post("/api/v1/apply", &req).await?;
            if r.unchanged.contains(&name) {
                eprintln!("deployment {name} is already running with this spec");
            }
            print_notes(&r);
            println!("{name}");
            Ok(0)
        }
        Cmd::Get { kind, output, watch } => get(&client(&cli)?, *kind, *output, *watch).await,
        Cmd::Top { kind, output } => top(&client(&cli)?, *kind, *output).await,
        Cmd::Rollout(cmd) => rollout(&client(&cli)?, cmd).await,
        Cmd::Autoscale(AutoscaleCmd::Simulate { file }) => {
            use skiff_model::autoscale::{decide, Scenario};
            let text = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
            let scenario: Scenario =
                serde_json::from_str(&text).with_context(|| format!("{}: not a scenario", file.display()))?;
            let situation = scenario.check().with_context(|| format!("{}", file.display()))?;
            println!("{}", serde_json::to_string_pretty(&decide(&situation))?);
            Ok(0)
        }
        Cmd::Describe { kind, name } => {
            let c = client(&cli)?;
            match kind {
                Kind::Deployments => {
                    let v: DeploymentView = c.get(&format!("/api/v1/deployments/{name}")).await?;
                    print!("{}", serde_norway::to_string(&v)?);
                }
                Kind::Nodes => {
                    let nodes: Vec<skiff_hub::NodeInfo> = c.get("/api/v1/nodes").await?;
                    let n = nodes
                        .into_iter()
                        .find(|n| &n.name == name)
                        .with_context(|| format!("node {name:?} not found"))?;
                    print!("{}", serde_norway::to_string(&n)?);
                }
                _ => bail!("describe works on deployments and nodes"),
            }
            Ok(0)
        }
        Cmd::Delete { kind_or_name, name } => {
            let name = match (kind_or_name.as_str(), name) {
                ("deployment" | "deployments" | "deploy", Some(n)) => n.clone(),
                ("node" | "nodes", Some(n)) => {
                    client(&cli)?.delete(&format!("/api/v1/nodes/{n}")).await?;
                    println!("node {n} revoked: its certificate is no longer accepted");
                    return Ok(0);
                }
                (other, None) => other.to_string(),
                (other, Some(_)) => {
                    bail!("cannot delete {other:?}: deployments and nodes can be deleted (skiff delete deployment|node NAME)")
                }
            };
            client(&cli)?.delete(&format!("/api/v1/deployments/{name}")).await?;
            println!("deployment {name} deleted");
            Ok(0)
        }
        Cmd::Logs { name, follow, tail, timestamps } => logs(&client(&cli)?, name, *follow, *tail, *timestamps).await,
        Cmd::Exec { instance, command } => {
            #[derive(serde::Serialize)]
            struct Body<'a> {
                argv: &'a [String],
            }
            let r: skiff_hub::ExecResult =
                client(&cli)?.post(&format!("/api/v1/instances/{instance}/exec"), &Body { argv: command }).await?;
            print!("{}", r.stdout);
            eprint!("{}", r.stderr);
            Ok(r.code)
        }
        Cmd::Image(ImageCmd::Pull { reference, platform, insecure_registry, limit_rate, max_concurrent_downloads }) => {
            let store = std::sync::Arc::new(skiff_image::ImageStore::open(cli.data.join("images"))?);
            let mut opts = pull_options(&cli)?;
            opts.platform = platform.as_deref().map(skiff_image::registry::parse_platform).transpose()?;
            opts.insecure = insecure_registry.clone();
            opts.limit_rate = *limit_rate;
            opts.parallel = usize::from(*max_concurrent_downloads);
            let r = skiff_image::registry::pull(store, reference, &opts).await?;
            println!(
                "{} {} from {} ({} fetched, {} already present, {} received)",
                r.reference,
                r.digest,
                r.endpoint,
                r.blobs_fetched,
                r.blobs_present,
                skiff_model::format_bytes(r.bytes_received)
            );
            Ok(0)
        }
        Cmd::Image(cmd) => image(&cli.data, cmd),
        Cmd::Shim { .. } => Ok(0),
    }
}

fn rollout_line(s: &RolloutStatus) -> String {
    let mut line = format!(
        "{} revision {}: {} ({} of {} updated, {} ready, {} old)",
        s.deployment,
        s.revision,
        s.state.as_str(),
        s.updated,
        s.desired,
        s.ready,
        s.old
    );
    if let Some(m) = &s.message {
        line.push_str(&format!(": {m}"));
    }
    line
}

async fn rollout(c: &Client, cmd: &RolloutCmd) -> Result<i32> {
    match cmd {
        RolloutCmd::Status { name, no_wait, timeout, output } => {
            let path = format!("/api/v1/deployments/{name}/rollout");
            let deadline = tokio::time::Instant::now() + Duration::from_secs(*timeout);
            let mut s: RolloutStatus = c.get(&path).await?;
            let pinned = s.revision;
            let mut last = String::new();
            loop {
                if s.revision != pinned {
                    // A newer revision (an automatic rollback, another apply): report how
                    // the followed one ended.
                    let h: Vec<Revision> = c.get(&format!("/api/v1/deployments/{name}/history")).await?;
                    let Some(r) = h.iter().find(|r| r.revision == pinned) else {
                        eprintln!("error: revision {pinned} of {name} is no longer in its history");
                        return Ok(1);
                    };
                    let why = r.message.as_deref().map(|m| format!(": {m}")).unwrap_or_default();
                    println!("{name} revision {pinned}: {}{why}", r.state.as_str());
                    println!(
                        "{name} revision {}: {} ({})",
                        s.revision,
                        s.state.as_str(),
                        h.last().map(|l| l.cause.as_str()).unwrap_or("")
                    );
                    return Ok(if r.state == RolloutState::Complete { 0 } else { 1 });
                }
                let line = rollout_line(&s);
                if *output != Format::Table {
                    output::structured(&s, *output)?;
                } else if line != last {
                    println!("{line}");
                }
                last = line;
                match s.state {
                    RolloutState::Complete => return Ok(0),
                    RolloutState::Failed | RolloutState::Superseded => return Ok(1),
                    RolloutState::Progressing if *no_wait => return Ok(0),
                    RolloutState::Progressing => {}
                }
                if tokio::time::Instant::now() >= deadline {
                    eprintln!("error: {name} did not finish its rollout within {timeout} s");
                    return Ok(1);
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
                s = c.get(&path).await?;
            }
        }
        RolloutCmd::History { name, output } => {
            let h: Vec<Revision> = c.get(&format!("/api/v1/deployments/{name}/history")).await?;
            output::print(&h, *output, &["REVISION", "TEMPLATE", "IMAGE", "STATE", "AGE", "CAUSE", "MESSAGE"], |r| {
                vec![
                    r.revision.to_string(),
                    r.template.clone(),
                    r.image.clone(),
                    r.state.as_str().to_string(),
                    output::age(Some(r.created_ms)),
                    r.cause.clone(),
                    r.message.clone().unwrap_or_default(),
                ]
            })?;
            Ok(0)
        }
        RolloutCmd::Undo { name, to_revision } => {
            let body = skiff_model::rollout::UndoRequest { to_revision: *to_revision };
            let r: Revision = c.post(&format!("/api/v1/deployments/{name}/undo"), &body).await?;
            println!("{name} rolled back: revision {} ({}, {})", r.revision, r.image, r.cause);
            Ok(0)
        }
    }
}

async fn token(c: &Client, cmd: &TokenCmd) -> Result<i32> {
    match cmd {
        TokenCmd::Create { ttl, uses, replace, role } => {
            let body = serde_json::json!({ "ttl_seconds": ttl, "uses": uses, "replace": replace, "role": role });
            let t: skiff_hub::tokens::CreatedToken = c.post("/api/v1/tokens", &body).await?;
            println!("{}", t.token);
            let until = t.expires_ms.map(|e| format!("until {}", output::time_of(e))).unwrap_or("until revoked".into());
            if t.role == skiff_hub::store::TokenRole::Join {
                eprintln!(
                    "join token {} created, valid {until}; on the node, put the line above in a file and run: \
                     skiff agent --hub URL --token-file FILE",
                    t.id
                );
            } else {
                eprintln!("{} token {} created, valid {until}; send it as `Authorization: Bearer <token>`", role, t.id);
            }
        }
        TokenCmd::Ls => {
            let v: Vec<skiff_hub::store::TokenRecord> = c.get("/api/v1/tokens").await?;
            output::print(&v, Format::Table, &["ID", "ROLE", "EXPIRES", "USES", "REPLACES", "REVOKED"], |t| {
                let exp = t.expires_ms.map(output::time_of).unwrap_or_else(|| "never".into());
                let uses = match t.max_uses {
                    Some(m) => format!("{}/{m}", t.used),
                    None => t.used.to_string(),
                };
                let replace = t.replace.clone().unwrap_or_else(|| "-".into());
                vec![t.id.clone(), t.role.as_str().into(), exp, uses, replace, t.revoked.to_string()]
            })?;
        }
        TokenCmd::Revoke { id } => {
            c.delete(&format!("/api/v1/tokens/{id}")).await?;
            println!("token {id} revoked");
        }
    }
    Ok(0)
}

/// An error with its causes, each once: library errors often already say their source.
fn report(e: &anyhow::Error) -> String {
    skiff_image::error::with_causes(e.as_ref())
}

pub fn print_apply(r: &ApplyResponse, dry_run: bool) {
    let suffix = if dry_run { " (dry run)" } else { "" };
    for (verb, names) in
        [("created", &r.created), ("updated", &r.updated), ("unchanged", &r.unchanged), ("deleted", &r.deleted)]
    {
        for n in names {
            println!("deployment {n} {verb}{suffix}");
        }
    }
    for (instance, node) in &r.placement {
        println!("  {instance} on {node}");
    }
    print_notes(r);
}

/// Warnings, and instances that found no node, on stderr: the apply itself succeeded.
fn print_notes(r: &ApplyResponse) {
    for w in &r.warnings {
        eprintln!("warning: {w}");
    }
    for (d, why) in &r.unschedulable {
        eprintln!("warning: {d}: {why}");
    }
}

/// The .wasm file `skiff run` names instead of an image, if it does: an existing file
/// that is a WebAssembly binary (a path that ends in .wasm must be one).
fn wasm_file(a: &RunArgs) -> Result<Option<PathBuf>> {
    let p = PathBuf::from(&a.image);
    let looks_like_file = a.image.ends_with(".wasm") || a.image.starts_with('.') || a.image.starts_with('/');
    if !p.is_file() {
        if a.image.ends_with(".wasm") {
            bail!("{}: no such file (a .wasm file to run must exist on this machine)", a.image);
        }
        return Ok(None);
    }
    let mut head = [0u8; 8];
    let n = std::io::Read::read(&mut std::fs::File::open(&p)?, &mut head)?;
    if skiff_model::WasmKind::detect(&head[..n]).is_none() {
        if looks_like_file {
            bail!("{}: not a WebAssembly binary (no \\0asm module or component header)", a.image);
        }
        return Ok(None);
    }
    if a.runtime.as_deref().is_some_and(|r| RuntimeKind::parse(r) != Some(RuntimeKind::Wasm)) {
        bail!("--runtime: {} is a WebAssembly file; it runs with --runtime wasm", a.image);
    }
    Ok(Some(p))
}

/// Checks a .wasm file (sha256 `digest`) as the node will (compiled into this machine's
/// compile cache, imports and exports checked), then stores it as the image `reference`.
/// Nothing is stored when the check fails.
fn import_wasm_file(data: &Path, file: &Path, digest: &str, reference: &str) -> Result<()> {
    let module = skiff_image::WasmModule { path: file.to_path_buf(), id: digest.to_string() };
    let what = skiff_runtime::wasm::check(&module, &data.join("wasm/cache"))
        .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
    skiff_image::ImageStore::open(data.join("images"))?.import_wasm(file, reference)?;
    eprintln!("{}: {what}, stored as {reference}", file.display());
    Ok(())
}

/// The deployment `skiff run` asks for, running `image`; `from_file`: the image is the
/// .wasm file named on the command line (the wasm runtime, unless told otherwise).
fn deployment_from_run(a: &RunArgs, image: String, from_file: bool) -> Result<Deployment> {
    let base = image.rsplit('/').next().unwrap_or(&image).split([':', '@']).next().unwrap_or("app");
    let name = match &a.name {
        Some(n) => n.clone(),
        None => {
            let suffix = skiff_sys::random::hex(2)?;
            let clean: String =
                base.to_ascii_lowercase().chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-').collect();
            format!("{}-{suffix}", if clean.is_empty() { "app" } else { &clean })
        }
    };
    let mut d = Deployment::new(name, image.clone());
    d.runtime = match &a.runtime {
        Some(r) => RuntimeKind::parse(r).with_context(|| format!("--runtime: {r:?} is not oci or wasm"))?,
        None if from_file => RuntimeKind::Wasm,
        None => RuntimeKind::Oci,
    };
    if let Some(t) = &a.wasm_timeout {
        d.wasm.timeout_ms = Some(
            skiff_manifest::parse_duration_ms(t)
                .with_context(|| format!("--wasm-timeout: {t:?} is not a duration (examples: 5s, 500ms, 1m)"))?,
        );
    }
    d.wasm.pool = a.wasm_pool;
    d.wasm.allow_local = a.wasm_allow_local;
    if let Some(c) = &a.cpus {
        d.resources.cpus_millis = Some(skiff_model::parse_cpus(c).map_err(|e| anyhow::anyhow!("--cpus: {e}"))?);
    }
    if let Some(m) = &a.memory {
        d.resources.memory_bytes = Some(skiff_model::parse_bytes(m).map_err(|e| anyhow::anyhow!("--memory: {e}"))?);
    }
    d.resources.cpu_shares = a.cpu_shares;
    d.resources.pids_limit = a.pids_limit;
    d.restart = RestartPolicy::parse(&a.restart)
        .with_context(|| format!("--restart: {:?} is not no, always, on-failure[:N] or unless-stopped", a.restart))?;
    for kv in &a.env {
        match kv.split_once('=') {
            Some((k, v)) => d.env.insert(k.into(), v.into()),
            None => d.env.insert(kv.clone(), std::env::var(kv).unwrap_or_default()),
        };
    }
    for p in &a.publish {
        d.ports.push(PortMapping::parse(p).with_context(|| {
            format!("--publish: {p:?} is not a port mapping (examples: 8080:80, 127.0.0.1:53:53/udp)")
        })?);
    }
    for v in &a.volume {
        let parts: Vec<&str> = v.split(':').collect();
        let (src, dst, ro) = match parts.as_slice() {
            [s, t] => (*s, *t, false),
            [s, t, "ro"] => (*s, *t, true),
            [s, t, "rw"] => (*s, *t, false),
            _ => bail!("--volume: {v:?} is not SOURCE:TARGET[:ro]"),
        };
        let source = if src.starts_with('/') {
            VolumeSource::Bind { path: src.into() }
        } else {
            VolumeSource::Named { name: src.into() }
        };
        d.volumes.push(Volume { source, target: dst.into(), read_only: ro });
    }
    d.network = match a.network.as_str() {
        "bridge" => NetworkMode::Bridge,
        "host" => NetworkMode::Host,
        "none" => NetworkMode::None,
        o => bail!("--network: {o:?} is not bridge, host or none"),
    };
    d.read_only = a.read_only;
    d.user = a.user.clone();
    d.working_dir = a.workdir.clone();
    if let Some(e) = &a.entrypoint {
        d.entrypoint = Some(if e.is_empty() { vec![] } else { vec![e.clone()] });
    }
    d.cap_add = a.cap_add.clone();
    d.cap_drop = a.cap_drop.clone();
    for dev in &a.device {
        d.devices.push(
            DeviceMapping::parse(dev).with_context(|| format!("--device: {dev:?} is not HOST[:CONTAINER[:rwm]]"))?,
        );
    }
    d.replicas = a.replicas;
    d.placement.node_selector = parse_selector(&a.selector)?;
    d.stop_grace_period_ms = a.stop_timeout * 1000;
    if !a.command.is_empty() {
        d.command = Some(a.command.clone());
    }
    d.validate().map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(d)
}

fn dash<T: ToString>(v: Option<T>) -> String {
    v.map(|x| x.to_string()).unwrap_or_else(|| "-".into())
}

fn instance_row(i: &InstanceStatus) -> Vec<String> {
    use skiff_model::InstanceState as S;
    let status = match i.state {
        S::Running => format!("running {}", output::age(i.started_at_ms)),
        S::Exited | S::Restarting | S::Failed => {
            let oom = if i.oom_killed { ", oom" } else { "" };
            let code = i.exit_code.map(|c| format!(" ({c}{oom})")).unwrap_or_default();
            format!("{}{code}", i.state)
        }
        s => s.to_string(),
    };
    let ports = if i.ports.is_empty() { "-".into() } else { i.ports.join(",") };
    vec![
        i.name.clone(),
        i.deployment.clone(),
        status,
        dash(i.health),
        i.restarts.to_string(),
        dash(i.pid),
        dash(i.ip.as_ref()),
        ports,
        i.message.clone().unwrap_or_default(),
    ]
}

fn deployment_row(d: &DeploymentView) -> Vec<String> {
    let running = d.instances.iter().filter(|i| i.state == skiff_model::InstanceState::Running).count();
    let r = &d.spec.resources;
    vec![
        d.spec.name.clone(),
        d.spec.stack.clone(),
        format!("{running}/{}", d.spec.replicas),
        d.spec.image.clone(),
        dash(r.cpus_millis.map(skiff_model::format_cpus)),
        dash(r.memory_bytes.map(skiff_model::format_bytes)),
        d.spec.restart.to_string(),
        d.revision.to_string(),
    ]
}

/// Prints a list; with `watch`, again each time it changes (a long-poll per round).
async fn get(c: &Client, kind: Kind, f: Format, watch: bool) -> Result<i32> {
    let path = match kind {
        Kind::Instances => "/api/v1/instances",
        Kind::Deployments => "/api/v1/deployments",
        Kind::Nodes => "/api/v1/nodes",
        Kind::Events => "/api/v1/events",
        Kind::Autoscalers => "/api/v1/autoscalers",
        Kind::Alerts => "/api/v1/alerts",
    };
    let mut tag: Option<String> = None;
    loop {
        let Some((body, new_tag)) = c.watch(path, tag.as_deref(), if tag.is_some() { 30 } else { 0 }).await? else {
            continue;
        };
        match f {
            Format::Table if tag.is_some() => println!(),
            Format::Yaml if watch => println!("---"),
            _ => {}
        }
        print_list(kind, &body, if watch && f == Format::Json { Format::JsonLine } else { f })?;
        use std::io::Write;
        let _ = std::io::stdout().flush();
        if !watch {
            return Ok(0);
        }
        tag = Some(new_tag);
    }
}

/// `kubectl top`-style tables: CPU in cores (`250m`), memory in binary units.
async fn top(c: &Client, kind: TopKind, f: Format) -> Result<i32> {
    use skiff_model::metrics::{InstanceMetrics, MetricsSample, NodeMetrics};
    let mut samples: Vec<MetricsSample> = c.get("/api/v1/metrics").await?;
    samples.sort_by(|a, b| a.node.cmp(&b.node));
    let cores = |c: Option<f64>| c.map_or("-".to_string(), |c| format!("{}m", (c * 1000.0).round() as u64));
    let pct = |part: f64, whole: f64| if whole > 0.0 { format!("{:.0}%", part / whole * 100.0) } else { "-".into() };
    match kind {
        TopKind::Nodes => {
            #[derive(serde::Serialize)]
            struct Row<'a> {
                name: &'a str,
                time_ms: u64,
                #[serde(flatten)]
                host: &'a NodeMetrics,
            }
            let rows: Vec<Row> =
                samples.iter().map(|s| Row { name: &s.node, time_ms: s.time_ms, host: &s.host }).collect();
            let h = ["NAME", "CPU(cores)", "CPU%", "MEMORY", "MEMORY%", "DISK%", "LOAD1"];
            output::print(&rows, f, &h, |r| {
                let m = r.host;
                vec![
                    r.name.to_string(),
                    cores(m.cpu_cores),
                    m.cpu_cores.map_or("-".into(), |c| pct(c, f64::from(m.cpus))),
                    skiff_model::format_bytes(m.memory_used_bytes),
                    pct(m.memory_used_bytes as f64, m.memory_total_bytes as f64),
                    pct(m.disk_used_bytes as f64, m.disk_total_bytes as f64),
                    format!("{:.2}", m.load1),
                ]
            })?;
        }
        TopKind::Instances => {
            #[derive(serde::Serialize)]
            struct Row<'a> {
                node: &'a str,
                #[serde(flatten)]
                instance: &'a InstanceMetrics,
            }
            let mut rows: Vec<Row> =
                samples.iter().flat_map(|s| s.instances.iter().map(|i| Row { node: &s.node, instance: i })).collect();
            rows.sort_by(|a, b| a.instance.instance.cmp(&b.instance.instance));
            let h = ["NAME", "NODE", "CPU(cores)", "MEMORY", "NET RX", "NET TX", "RESTARTS"];
            output::print(&rows, f, &h, |r| {
                let i = r.instance;
                vec![
                    i.instance.clone(),
                    r.node.to_string(),
                    cores(i.cpu_cores),
                    skiff_model::format_bytes(i.memory_bytes),
                    skiff_model::format_bytes(i.rx_bytes),
                    skiff_model::format_bytes(i.tx_bytes),
                    i.restarts.to_string(),
                ]
            })?;
        }
    }
    Ok(0)
}

fn print_list(kind: Kind, body: &[u8], f: Format) -> Result<()> {
    let bad = |e: serde_json::Error| anyhow::anyhow!("the hub's answer is not the list asked for: {e}");
    match kind {
        Kind::Instances => {
            let mut v: Vec<InstanceStatus> = serde_json::from_slice(body).map_err(bad)?;
            v.sort_by(|a, b| a.name.cmp(&b.name));
            let h = ["NAME", "DEPLOYMENT", "STATUS", "HEALTH", "RESTARTS", "PID", "IP", "PORTS", "MESSAGE"];
            output::print(&v, f, &h, instance_row)
        }
        Kind::Deployments => {
            let v: Vec<DeploymentView> = serde_json::from_slice(body).map_err(bad)?;
            let h = ["NAME", "STACK", "READY", "IMAGE", "CPUS", "MEMORY", "RESTART", "REVISION"];
            output::print(&v, f, &h, deployment_row)
        }
        Kind::Nodes => {
            let v: Vec<skiff_hub::NodeInfo> = serde_json::from_slice(body).map_err(bad)?;
            let h = ["NAME", "STATE", "PLATFORM", "RUNTIMES", "RUNC", "INSTANCES"];
            output::print(&v, f, &h, |n| {
                let runc = n.versions.get("runc").cloned().unwrap_or_else(|| "-".into());
                let flag = if n.warnings.is_empty() { "" } else { " (!)" };
                vec![
                    n.name.clone(),
                    n.state.clone(),
                    format!("{}/{}", n.os, n.arch),
                    n.runtimes.join(","),
                    format!("{runc}{flag}"),
                    n.instances.to_string(),
                ]
            })?;
            if f == Format::Table {
                for n in v.iter().filter(|n| !n.warnings.is_empty()) {
                    for w in &n.warnings {
                        eprintln!("warning: node {}: {w}", n.name);
                    }
                }
            }
            Ok(())
        }
        Kind::Autoscalers => {
            let v: Vec<skiff_hub::autoscaler::Status> = serde_json::from_slice(body).map_err(bad)?;
            let h = ["DEPLOYMENT", "MIN", "MAX", "REPLICAS", "DESIRED", "CURRENT", "REASON"];
            output::print(&v, f, &h, |a| {
                let current = match (a.current_utilization, &a.current_average_value) {
                    (Some(u), _) => format!("{u}%"),
                    (None, Some(v)) => v.clone(),
                    (None, None) => "-".into(),
                };
                vec![
                    a.deployment.clone(),
                    a.min_replicas.to_string(),
                    a.max_replicas.to_string(),
                    a.current_replicas.to_string(),
                    a.desired_replicas.to_string(),
                    current,
                    a.reason.clone(),
                ]
            })
        }
        Kind::Alerts => {
            let v: Vec<skiff_hub::alerts::Alert> = serde_json::from_slice(body).map_err(bad)?;
            output::print(&v, f, &["ALERT", "STATE", "SINCE", "VALUE", "LABELS", "ACTION"], |a| {
                let labels: Vec<String> =
                    a.labels.iter().filter(|(k, _)| *k != "alertname").map(|(k, v)| format!("{k}={v}")).collect();
                vec![
                    a.alert.clone(),
                    format!("{:?}", a.state).to_lowercase(),
                    output::age(Some(a.active_at_ms)),
                    format!("{:.3}", a.value),
                    labels.join(","),
                    a.action.clone().unwrap_or_default(),
                ]
            })
        }
        Kind::Events => {
            let v: Vec<skiff_model::EventRecord> = serde_json::from_slice(body).map_err(bad)?;
            output::print(&v, f, &["AGE", "OBJECT", "REASON", "MESSAGE"], |e| {
                vec![output::age(Some(e.time_ms)), e.object.clone(), e.reason.clone(), e.message.clone()]
            })
        }
    }
}

async fn logs(c: &Client, name: &str, follow: bool, tail: Option<usize>, ts: bool) -> Result<i32> {
    let mut q = format!("/api/v1/instances/{name}/logs?follow={follow}");
    if let Some(t) = tail {
        q.push_str(&format!("&tail={t}"));
    }
    let mut resp = c.stream(&q).await?;
    let mut buf: Vec<u8> = vec![];
    use std::io::Write;
    let stdout = std::io::stdout();
    let stderr = std::io::stderr();
    while let Some(chunk) = resp.chunk().await.context("reading the log stream")? {
        buf.extend_from_slice(&chunk);
        while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=pos).collect();
            let Ok(l) = serde_json::from_slice::<LogLine>(&line) else {
                continue;
            };
            let (prefix, stream) = match l.stream.rsplit_once('/') {
                Some((inst, s)) => (format!("{inst} | "), s.to_string()),
                None => (String::new(), l.stream.clone()),
            };
            let t = if ts { format!("{} ", l.time) } else { String::new() };
            if stream == "stderr" {
                let _ = writeln!(stderr.lock(), "{prefix}{t}{}", l.log);
            } else {
                let mut o = stdout.lock();
                let _ = writeln!(o, "{prefix}{t}{}", l.log);
                let _ = o.flush();
            }
        }
    }
    Ok(0)
}

/// Pull settings for the CLI: the registries config (`--registries`, else the default
/// path when it exists) and progress on stderr.
pub fn pull_options(cli: &Cli) -> Result<skiff_image::registry::PullOptions> {
    use skiff_image::hosts::{RegistriesConfig, DEFAULT_PATH};
    let registries = match &cli.registries {
        Some(p) => RegistriesConfig::load(p, true)?,
        None => RegistriesConfig::load(Path::new(DEFAULT_PATH), false)?,
    };
    Ok(skiff_image::registry::PullOptions {
        registries,
        progress: crate::progress::pull_progress(),
        ..Default::default()
    })
}

/// `--limit-rate`: a positive size per second (`500K`, `2M`, `1048576`).
fn parse_rate(s: &str) -> Result<u64, String> {
    match skiff_model::parse_bytes(s) {
        Ok(0) => Err("must be more than 0 bytes per second".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

fn image(data: &Path, cmd: &ImageCmd) -> Result<i32> {
    let store = skiff_image::ImageStore::open(data.join("images"))?;
    match cmd {
        ImageCmd::Load { file, tag } => {
            eprintln!("loading {} ...", file.display());
            for r in store.load(file, tag.as_deref())? {
                println!("Loaded image: {r}");
            }
        }
        ImageCmd::Ls { output: f } => {
            let v = store.list()?;
            output::print(&v, *f, &["REFERENCE", "PLATFORM", "DIGEST", "SIZE"], |i| {
                vec![
                    i.reference.clone(),
                    i.platform.clone(),
                    i.digest.chars().take(19).collect(),
                    skiff_model::format_bytes(i.size),
                ]
            })?;
        }
        ImageCmd::Rm { reference } => {
            store.remove(reference, &images_in_use(data))?;
            println!("Untagged: {reference}");
        }
        ImageCmd::Inspect { reference } => {
            println!("{}", serde_json::to_string_pretty(&store.inspect(reference)?)?);
        }
        ImageCmd::Pull { .. } => {}
        ImageCmd::Save { references, output } => {
            store.save(references, output)?;
            println!("saved {} image(s) to {}", references.len(), output.display());
        }
        ImageCmd::Prune => {
            let freed = store.gc()?;
            println!("freed {}", skiff_model::format_bytes(freed));
        }
    }
    Ok(0)
}

/// image reference → deployments using it, from the local agent's desired state.
fn images_in_use(data: &Path) -> BTreeMap<String, Vec<String>> {
    let mut m: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let db = data.join("agent.db");
    if db.exists() {
        if let Ok(s) = skiff_agent::state::State::open(&db) {
            for d in s.desired().unwrap_or_default() {
                m.entry(skiff_image::normalize_reference(&d.image)).or_default().push(d.name);
            }
        }
    }
    m
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
        assert_eq!(super::parse_rate("2M"), Ok(2 << 20));
        assert!(super::parse_rate("0").is_err() && super::parse_rate("fast").is_err());
    }
}
