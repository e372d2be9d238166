//! `skiff agent --hub URL --token T`: a node of a networked hub. Joins once (the hub's CA
//! checked against the hash in the token; the node's key made here, only a CSR sent),
//! then keeps one outbound connection to the hub (`skiff_hub::tunnel`): assignments in,
//! status and events out when they change, logs and exec served.
//!
//! Offline autonomy: the agent acts only on what it persisted in `agent.db`; when the hub
//! is unreachable it keeps running (and restarting) what it has, and a restart of the
//! agent — or of the machine — brings the same workloads back from local state.

use crate::cli::BridgeArgs;
use anyhow::{Context, Result};
use clap::Args;
use skiff_agent::join::Identity;
use skiff_agent::{Agent, AgentConfig};
use std::sync::Arc;
use std::time::Duration;

#[derive(Args)]
pub struct AgentArgs {
    /// The hub, e.g. https://hub.example:7443; several (repeated, or comma-separated) for
    /// hubs sharing one store: the agent uses the one that is active and moves to another
    /// when it goes.
    #[arg(long, required = true, value_delimiter = ',')]
    pub hub: Vec<String>,
    /// A file holding the join token from `skiff token create` (needed to join only).
    /// Also read from $SKIFF_TOKEN.
    #[arg(long)]
    pub token_file: Option<std::path::PathBuf>,
    /// The join token itself. Every local user can read it in /proc/PID/cmdline while
    /// the agent runs: prefer --token-file or $SKIFF_TOKEN.
    #[arg(long)]
    pub token: Option<String>,
    /// Node name (default: the host name).
    #[arg(long = "name", alias = "node-name")]
    pub node_name: Option<String>,
    /// Node label KEY=VALUE (repeatable), e.g. site=factory-3.
    #[arg(long = "label")]
    pub labels: Vec<String>,
    #[command(flatten)]
    pub net: BridgeArgs,
    /// Seconds between checks for changed status (sent only when it changed).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=300))]
    pub heartbeat: u64,
    /// Seconds between resource samples (shipped to the hub, buffered while offline).
    #[arg(long, default_value_t = 15, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub metrics_interval: u64,
    /// Serve this node's metrics for Prometheus at http://ADDR/metrics (e.g. 127.0.0.1:9337).
    #[arg(long)]
    pub metrics_listen: Option<String>,
    /// Pull images straight from their registries, not through the hub's image proxy
    /// (which sends only the chunks this node lacks).
    #[arg(long)]
    pub pull_direct: bool,
    /// Serve this node's site (nodes with the same `site` label) as its image cache on
    /// ADDR (e.g. 0.0.0.0:5050): they fetch chunks here first, so an update crosses the
    /// WAN once. Also a read-only registry mirror of the images held, over plain HTTP.
    #[arg(long, value_name = "ADDR")]
    pub serve_cache: Option<std::net::SocketAddr>,
    /// The URL the site reaches the cache at (default: http://ADDR; needed when ADDR is
    /// 0.0.0.0 or [::]).
    #[arg(long, value_name = "URL", requires = "serve_cache")]
    pub cache_advertise: Option<String>,
    /// Take direct connections from other nodes' agents for the fleet's services on ADDR
    /// (e.g. 0.0.0.0:7946; mutual TLS with the nodes' certificates). Without it, other
    /// nodes reach this one's services through the hub's relay.
    #[arg(long, value_name = "ADDR")]
    pub mesh_listen: Option<std::net::SocketAddr>,
    /// Where other nodes reach --mesh-listen (HOST:PORT; default: ADDR, unless it is
    /// 0.0.0.0 or [::]).
    #[arg(long, value_name = "HOST:PORT", requires = "mesh_listen")]
    pub mesh_advertise: Option<String>,
    #[command(flatten)]
    pub node: crate::cli::NodeArgs,
}

/// `--mesh-advertise`, or `--mesh-listen` when it names an address.
fn mesh_advertise(args: &AgentArgs) -> Result<Option<String>> {
    let Some(listen) = args.mesh_listen else { return Ok(None) };
    let a = match &args.mesh_advertise {
        Some(a) => a.clone(),
        None if listen.ip().is_unspecified() => anyhow::bail!(
            "--mesh-listen {listen}: say with --mesh-advertise LAN-ADDRESS:{} where other nodes reach it",
            listen.port()
        ),
        None => listen.to_string(),
    };
    anyhow::ensure!(skiff_model::mesh::valid_mesh_addr(&a), "--mesh-advertise {a:?}: want HOST:PORT");
    Ok(Some(a))
}

/// `--cache-advertise`: `http://host:port`.
fn cache_url(u: &str) -> Result<String> {
    let u = u.trim_end_matches('/');
    anyhow::ensure!(skiff_model::proto::valid_cache_url(u), "--cache-advertise {u:?}: want http://HOST:PORT");
    Ok(u.to_string())
}

/// Keeps the site cache's token as the hub says it (asked now, then every 10 minutes;
/// every 10 s until the first answer).
async fn site_token(cache: Arc<skiff_agent::cache::SiteCache>, hub: skiff_image::proxy::HubImages) {
    loop {
        let got = match (hub.client)() {
            Ok(client) => skiff_image::proxy::site_caches(&client, &hub.site_caches()).await,
            Err(e) => Err(e),
        };
        let wait = match got {
            Ok(site) if site.site.is_some() => {
                cache.set_token(site.token);
                600
            }
            Ok(_) => {
                tracing::warn!("--serve-cache: this node has no `site` label, so no site's nodes use its cache");
                600
            }
            Err(e) => {
                tracing::warn!("--serve-cache: the site's token: {e}");
                10
            }
        };
        tokio::time::sleep(Duration::from_secs(wait)).await;
    }
}

/// The hub's image proxy for this node at the hub it is connected to (`hub`, which the
/// tunnel keeps current), reached with the node's certificate (read at each pull: it is
/// renewed).
fn hub_images(hub: &Arc<std::sync::RwLock<String>>, node: &str, id: Arc<Identity>) -> skiff_image::proxy::HubImages {
    skiff_image::proxy::HubImages {
        hub: Arc::clone(hub),
        node: node.to_string(),
        client: Arc::new(move || {
            let tls = id.tls().map_err(|e| e.to_string())?;
            reqwest::Client::builder()
                .use_preconfigured_tls(tls)
                .connect_timeout(Duration::from_secs(10))
                .read_timeout(Duration::from_secs(60))
                .build()
                .map_err(|e| skiff_image::error::with_causes(&e))
        }),
    }
}

pub async fn agent(cli: &crate::cli::Cli, args: &AgentArgs) -> Result<i32> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let data = &cli.data;
    crate::secure_data_dir(data)?;
    skiff_sys::connlimit::raise_fd_limit();
    let labels = crate::cli::parse_selector(&args.labels).context("--label")?;
    let mut acfg = AgentConfig::new(data);
    args.net.apply(&mut acfg);
    if let Some(n) = &args.node_name {
        acfg.node_name = n.clone();
    }
    acfg.pull = Some(crate::cli::pull_options(cli)?);
    acfg.metrics_every = Duration::from_secs(args.metrics_interval);
    args.node.apply(&mut acfg)?;
    acfg.mesh_advertise = mesh_advertise(args)?;
    let site = labels.get("site").cloned();
    let id = Identity::new(data);
    // Probes runsc (a sandbox started): off the async workers.
    let dirs = acfg.cdi_dirs.clone();
    let spec = tokio::task::spawn_blocking(move || skiff_agent::join::node_spec(labels, &dirs)).await?;
    let token = join_token(args)?;
    let node = skiff_agent::join::join(&id, &args.hub, token.as_deref(), &acfg.node_name, spec).await?;
    acfg.node_name = node.clone();
    // The hub the tunnel is connected to (the first given until it connects).
    let connected = Arc::new(std::sync::RwLock::new(args.hub.first().cloned().unwrap_or_default()));
    if !args.pull_direct {
        if let Some(pull) = acfg.pull.as_mut() {
            pull.hub = Some(hub_images(&connected, &node, Arc::new(Identity::new(data))));
        }
    }
    let cache_listener = match args.serve_cache {
        Some(addr) => {
            acfg.cache_url = Some(match &args.cache_advertise {
                Some(u) => cache_url(u)?,
                None if addr.ip().is_unspecified() => anyhow::bail!(
                    "--serve-cache {addr}: say with --cache-advertise http://LAN-ADDRESS:{} where the site reaches it",
                    addr.port()
                ),
                None => format!("http://{addr}"),
            });
            Some(tokio::net::TcpListener::bind(addr).await.with_context(|| format!("--serve-cache {addr}"))?)
        }
        None => None,
    };
    let agent = Agent::open(acfg)?;
    if let Some(listener) = cache_listener {
        let cache = skiff_agent::cache::SiteCache::new(Arc::clone(&agent));
        let router = skiff_agent::cache::router(Arc::clone(&cache));
        tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, router).await {
                tracing::error!("site cache: {e}");
            }
        });
        tokio::spawn(site_token(cache, hub_images(&connected, &node, Arc::new(Identity::new(data)))));
    }
    if let Some(addr) = &args.metrics_listen {
        let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("--metrics-listen {addr}"))?;
        let a = Arc::clone(&agent);
        let b = Arc::clone(&agent);
        tokio::spawn(skiff_hub::metrics::serve(
            listener,
            move || a.latest_metrics().into_iter().collect(),
            move || b.image_bytes_text(),
        ));
    }
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mesh_cfg = skiff_agent::mesh::MeshConfig {
        listen: args.mesh_listen,
        site,
        identity: Some(Arc::new(Identity::new(data))),
        hub: Some(Arc::clone(&connected)),
    };
    let mesh = skiff_agent::mesh::Mesh::new(Arc::clone(&agent), mesh_cfg).map(|m| tokio::spawn(m.run(stop_rx.clone())));
    let mut agent_task = tokio::spawn(Arc::clone(&agent).run(stop_rx));
    let hubs: Vec<String> = args.hub.iter().map(|h| h.trim_end_matches('/').to_string()).collect();
    eprintln!("skiff: agent {node} joined to {}; running from {}", hubs.join(", "), data.display());

    id.tls()?;
    let every = Duration::from_secs(args.heartbeat);
    let mut tunnel =
        tokio::spawn(skiff_agent::tunnel::run(Arc::clone(&agent), hubs, node.clone(), Arc::new(id), every, connected));
    crate::notify_ready();
    tokio::select! {
        _ = sigint.recv() => {}
        _ = sigterm.recv() => {}
        r = &mut agent_task => {
            tunnel.abort();
            return Err(crate::role_died("the agent", r));
        }
        r = &mut tunnel => {
            let _ = stop_tx.send(true);
            let _ = agent_task.await;
            return Err(crate::role_died("the tunnel to the hub", r));
        }
    }
    tunnel.abort();
    // Workloads keep running: they belong to the node, not to this process.
    let _ = stop_tx.send(true);
    let _ = agent_task.await;
    if let Some(m) = mesh {
        let _ = m.await;
    }
    eprintln!("skiff: agent stopped, workloads left running");
    Ok(0)
}

/// The join token: `--token-file`, then `$SKIFF_TOKEN`, then `--token` (with a warning:
/// the command line is readable by every local user).
fn join_token(args: &AgentArgs) -> Result<Option<String>> {
    if let Some(p) = &args.token_file {
        let t = std::fs::read_to_string(p).with_context(|| format!("--token-file {}", p.display()))?;
        return Ok(Some(t.trim().to_string()));
    }
    if let Ok(t) = std::env::var("SKIFF_TOKEN") {
        return Ok(Some(t.trim().to_string()));
    }
    if let Some(t) = &args.token {
        eprintln!(
            "warning: --token puts the join token on the command line, where every local user can read it \
             (/proc/PID/cmdline); use --token-file FILE or $SKIFF_TOKEN"
        );
        return Ok(Some(t.clone()));
    }
    Ok(None)
}
