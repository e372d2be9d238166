//! `skiff up`: the embedded default. One process runs the hub (API on loopback, store in
//! SQLite) and the agent for this machine, deploys a compose file, and stays until
//! Ctrl-C, which stops the stack. SIGTERM leaves workloads running (as an agent upgrade
//! would); the next `skiff up` re-adopts them.

use crate::cli::BridgeArgs;
use crate::cli::Cli;
use crate::config::ClientConfig;
use anyhow::{bail, Context, Result};
use clap::Args;
use skiff_agent::{Agent, AgentConfig};
use skiff_hub::Hub;
use skiff_manifest::ComposeImport;
use skiff_model::api::ApplyRequest;
use skiff_model::InstanceState;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

#[derive(Args)]
pub struct UpArgs {
    /// Compose file to deploy (default: compose.yaml, compose.yml, docker-compose.yml
    /// in the current directory, if any).
    #[arg(short = 'f', long = "file")]
    pub file: Option<PathBuf>,
    /// Address of the local API. On loopback it is plain HTTP; on any other address it is
    /// served over TLS from a CA made in the data directory (admin.conf pins it), since the
    /// admin token must never cross a network in clear.
    #[arg(long, default_value = "127.0.0.1:7080")]
    pub listen: String,
    /// This node's name (default: the machine's host name).
    #[arg(long)]
    pub node_name: Option<String>,
    #[command(flatten)]
    pub net: BridgeArgs,
    /// Disk use (percent) above which unused images are pruned; 0 turns pruning off.
    #[arg(long, default_value_t = 85, value_parser = clap::value_parser!(u8).range(0..=100))]
    pub image_gc_high: u8,
    /// Disk use (percent) that pruning brings the disk back to.
    #[arg(long, default_value_t = 80, value_parser = clap::value_parser!(u8).range(0..=99))]
    pub image_gc_low: u8,
    /// Seconds between resource samples (`skiff top`, `/metrics`, the autoscaler).
    #[arg(long, default_value_t = 15, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub metrics_interval: u64,
    #[command(flatten)]
    pub node: crate::cli::NodeArgs,
    #[command(flatten)]
    pub conns: crate::hub::ConnArgs,
    #[command(flatten)]
    pub autoscale: AutoscaleArgs,
    #[command(flatten)]
    pub alerts: AlertArgs,
}

/// Alert rules (Prometheus' rule-file shape over the hub's metrics; see the README).
#[derive(Args, Clone)]
pub struct AlertArgs {
    /// A rule file (YAML or JSON): `groups: [{name, rules: [{alert, expr, for, labels,
    /// annotations, x-skiff-scale-out}]}]`.
    #[arg(long = "alert-rules")]
    pub alert_rules: Option<PathBuf>,
    /// Seconds between evaluations of the rules.
    #[arg(long = "alert-interval", default_value_t = 15, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub alert_interval: u64,
}

impl AlertArgs {
    /// The checked rules (none without a file); errors name the file and the rule.
    pub fn load(&self) -> Result<skiff_hub::alerts::Alerts> {
        let Some(p) = &self.alert_rules else { return Ok(Default::default()) };
        let text = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
        let file: skiff_model::alerts::RuleFile =
            serde_norway::from_str(&text).with_context(|| format!("{}: not a rule file", p.display()))?;
        skiff_hub::alerts::Alerts::new(&file).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))
    }
}

/// The autoscaler's settings (kube-controller-manager's flags of the same meaning).
#[derive(Args, Clone)]
pub struct AutoscaleArgs {
    /// Seconds between autoscaler decisions (the HPA sync period).
    #[arg(long = "autoscale-interval", default_value_t = 15, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub interval: u64,
    /// Usage ratios within 1 ± this cause no scaling.
    #[arg(long = "autoscale-tolerance", default_value_t = 0.1, value_parser = parse_tolerance)]
    pub tolerance: f64,
    /// Seconds after an instance starts during which its CPU samples count only once
    /// taken a full window after it became ready.
    #[arg(long = "autoscale-cpu-initialization-period", default_value_t = 300)]
    pub cpu_initialization_period: u64,
    /// Seconds after start within which a readiness change means "never ready yet".
    #[arg(long = "autoscale-initial-readiness-delay", default_value_t = 30)]
    pub initial_readiness_delay: u64,
}

fn parse_tolerance(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(t) if (0.0..=1.0).contains(&t) => Ok(t),
        _ => Err(format!("{s:?} is not a number within 0..1")),
    }
}

impl AutoscaleArgs {
    /// The autoscaler's configuration; samples cover `metrics_interval` seconds each.
    pub fn config(&self, metrics_interval: u64) -> skiff_hub::autoscaler::Config {
        skiff_hub::autoscaler::Config {
            tolerance: self.tolerance,
            cpu_initialization_period_s: self.cpu_initialization_period as f64,
            initial_readiness_delay_s: self.initial_readiness_delay as f64,
            metric_window_s: metrics_interval as f64,
        }
    }
}

/// The controllers' periods from the flags (placement is forced every 5 s).
pub fn every(autoscale: &AutoscaleArgs, alerts: &AlertArgs) -> skiff_hub::controllers::Every {
    skiff_hub::controllers::Every { autoscale: autoscale.interval, alerts: alerts.alert_interval, ..Default::default() }
}

pub fn load_compose(file: &Path) -> Result<ComposeImport> {
    let text = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let dir =
        file.canonicalize().ok().and_then(|p| p.parent().map(Path::to_path_buf)).unwrap_or_else(|| PathBuf::from("."));
    compose_in(&text, &dir).with_context(|| format!("{}", file.display()))
}

/// A compose file's text, read as if it were in `dir` (relative paths, `.env`, the
/// default project name): a file's own directory, or the current one for standard input.
pub fn compose_in(text: &str, dir: &Path) -> Result<ComposeImport> {
    let default_project = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "default".into());
    let env = |k: &str| std::env::var(k).ok();
    Ok(skiff_manifest::import_compose(text, dir, &default_project, &env, &|p| std::fs::read_to_string(p))?)
}

pub(crate) fn default_compose() -> Option<PathBuf> {
    ["compose.yaml", "compose.yml", "docker-compose.yaml", "docker-compose.yml"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

/// The admin token in `<data>/admin.conf`, or a new random one on first start.
pub fn admin_token(data: &Path) -> Result<String> {
    Ok(match crate::config::find(Some(&data.join("admin.conf")), data) {
        Ok((_, c)) => c.token,
        Err(_) => skiff_sys::random::hex(24)?,
    })
}

pub async fn up(cli: &Cli, args: &UpArgs) -> Result<i32> {
    let file = args.file.clone().or_else(default_compose);
    // Everything is validated before anything starts.
    let import = match &file {
        Some(f) => Some(load_compose(f)?),
        None => None,
    };
    if let Some(i) = &import {
        for w in &i.warnings {
            eprintln!("warning: {w}");
        }
    }
    let alerts = args.alerts.load()?;
    // Handlers first: a Ctrl-C while the stack starts must stop it, not kill us mid-way.
    use tokio::signal::unix::{signal, SignalKind};
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let data = &cli.data;
    crate::secure_data_dir(data)?;
    // As `docker compose up`: a service that only builds its image has it built when the
    // store lacks it.
    if let Some(i) = &import {
        crate::build::build_all(data, &i.builds, &[], true)?;
    }
    skiff_sys::connlimit::raise_fd_limit();
    let mut acfg = AgentConfig::new(data);
    args.net.apply(&mut acfg);
    acfg.image_gc = match args.image_gc_high {
        0 => None,
        high => Some(
            skiff_image::GcPolicy::new(high, args.image_gc_low)
                .map_err(|e| anyhow::anyhow!("--image-gc-high/--image-gc-low: {e}"))?,
        ),
    };
    if let Some(n) = &args.node_name {
        acfg.node_name = n.clone();
    }
    let pull = crate::cli::pull_options(cli)?;
    acfg.pull = Some(pull);
    acfg.metrics_every = std::time::Duration::from_secs(args.metrics_interval);
    args.node.apply(&mut acfg)?;
    let agent = Agent::open(acfg)?;
    if let Some(i) = &import {
        for d in &i.deployments {
            if let Err(e) = agent.ensure_image(d).await {
                bail!("services.{}.image: {e}", d.name);
            }
        }
    }
    let store = crate::hub::open_store(data, "sqlite", &Default::default(), &Default::default())?;
    let conf_path = data.join("admin.conf");
    let admin_token = admin_token(data)?;
    let listener =
        tokio::net::TcpListener::bind(&args.listen).await.with_context(|| format!("listening on {}", args.listen))?;
    let addr = listener.local_addr()?;
    let (tls, conf) = if addr.ip().is_loopback() {
        (None, ClientConfig { server: format!("http://{addr}"), token: admin_token.clone(), ca: None, servers: vec![] })
    } else {
        let ca = skiff_hub::pki::Ca::load_or_create(&data.join("pki"))?;
        let tls = crate::hub::server_tls(&ca, addr, &[])?;
        let host = if addr.ip().is_unspecified() { "127.0.0.1".to_string() } else { addr.ip().to_string() };
        let host = if host.contains(':') { format!("[{host}]") } else { host };
        let server = format!("https://{host}:{}", addr.port());
        (
            Some(tls),
            ClientConfig { server, token: admin_token.clone(), ca: Some(ca.pem().to_string()), servers: vec![] },
        )
    };
    let url = conf.server.clone();
    crate::config::write(&conf_path, &conf)?;
    let node = Arc::new(crate::link::LocalAgent { agent: Arc::clone(&agent) });
    let hub = Arc::new(
        Hub::new(store, Arc::new(skiff_hub::nodes::Embedded(node)), admin_token)
            .with_autoscaler(args.autoscale.config(args.metrics_interval))
            .with_alerts(alerts),
    );
    hub.sync_nodes()?;

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    // One node: its services are its own (names and virtual addresses, no other node).
    let mesh = skiff_agent::mesh::Mesh::new(Arc::clone(&agent), Default::default())
        .map(|m| tokio::spawn(m.run(stop_rx.clone())));
    let mut agent_task = tokio::spawn(Arc::clone(&agent).run(stop_rx.clone()));
    let router = skiff_hub::api::router(Arc::clone(&hub));
    let serving = args.conns.serve_config(tls);
    let mut server = tokio::spawn(skiff_hub::serve::serve(listener, router, serving, stop_rx.clone()));
    let mut controllers = skiff_hub::controllers::spawn(Arc::clone(&hub), every(&args.autoscale, &args.alerts));
    eprintln!("skiff: hub API on {url}, config in {}", conf_path.display());

    let stack = import.as_ref().map(|i| i.project.clone());
    let mut names: Vec<String> = vec![];
    if let Some(i) = import {
        names = i.deployments.iter().map(|d| d.name.clone()).collect();
        let req =
            ApplyRequest { deployments: i.deployments, prune_stack: Some(i.project.clone()), ..Default::default() };
        let r = hub.apply(&req).await?;
        crate::cli::print_apply(&r, false);
    }
    crate::notify_ready();
    // A role that dies takes the process down (its supervisor restarts it): a hub that
    // accepted deployments no loop would ever start is worse than no hub.
    let interrupted = tokio::select! {
        _ = sigint.recv() => true,
        _ = sigterm.recv() => false,
        r = &mut agent_task => {
            controllers.abort();
            let _ = stop_tx.send(true);
            return Err(crate::role_died("the agent", r));
        }
        r = &mut server => {
            controllers.abort();
            let _ = stop_tx.send(true);
            return Err(crate::role_died("the API server", r));
        }
        r = &mut controllers => {
            let _ = stop_tx.send(true);
            return Err(crate::role_died("the controllers", r));
        }
        _ = async {
            wait_running(&agent, &names).await;
            std::future::pending::<()>().await
        }, if !names.is_empty() => false,
    };
    // Nothing rescales while the stack stops.
    controllers.abort();
    if interrupted {
        // A second Ctrl-C does not wait for the stop: it ends the process at once (the
        // containers left are adopted by the next start).
        tokio::spawn(async move {
            if sigint.recv().await.is_some() {
                eprintln!("\nskiff: second Ctrl-C, leaving now");
                std::process::exit(130);
            }
        });
        if let Some(stack) = &stack {
            eprintln!("\nstopping stack {stack} ...");
            let names: Vec<String> =
                hub.store.list()?.into_iter().filter(|s| &s.spec.stack == stack).map(|s| s.spec.name).collect();
            hub.apply(&ApplyRequest { deployments: vec![], prune_stack: Some(stack.clone()), ..Default::default() })
                .await?;
            let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
            while !agent.all_gone(&names) && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            eprintln!("stack {stack} stopped");
        }
        // Everything else this node runs stops too, as stopping Docker's daemon stops its
        // containers: nothing is left without a supervisor. Those deployments stay in the
        // hub's store, and the next `skiff up` starts them again. (SIGTERM, a service
        // manager's stop, leaves everything running instead, as Docker's live-restore.)
        let rest: Vec<String> = agent.desired().unwrap_or_default().into_iter().map(|d| d.name).collect();
        if !rest.is_empty() {
            eprintln!("stopping {} (kept: the next skiff up starts them again) ...", rest.join(", "));
            agent.set_desired(&[], hub.store.revision()?)?;
            let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
            while !agent.all_gone(&rest) && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    } else {
        eprintln!("skiff: SIGTERM, leaving workloads running");
    }
    let _ = stop_tx.send(true);
    let _ = agent_task.await;
    if let Some(m) = mesh {
        let _ = m.await;
    }
    let _ = server.await;
    Ok(0)
}

/// Prints progress until every instance of `names` runs (bounded: 120 s).
async fn wait_running(agent: &Arc<Agent>, names: &[String]) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let mut last = String::new();
    loop {
        let all = agent.instances().unwrap_or_default();
        let mine: Vec<_> = all.iter().filter(|i| names.contains(&i.deployment)).collect();
        let running = mine.iter().filter(|i| i.state == InstanceState::Running).count();
        let want: usize = agent
            .desired()
            .unwrap_or_default()
            .iter()
            .filter(|d| names.contains(&d.name))
            .map(|d| d.replicas as usize)
            .sum();
        let line = format!("{running}/{want} instances running");
        if line != last {
            eprintln!("{line}");
            last = line;
        }
        if running == want && want > 0 || tokio::time::Instant::now() > deadline {
            for i in mine.iter().filter(|i| i.state != InstanceState::Running) {
                eprintln!("  {}: {} {}", i.name, i.state, i.message.clone().unwrap_or_default());
            }
            if running == want {
                eprintln!("stack is up; Ctrl-C stops it");
            }
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
