//! `skiff agent --hub URL --token T`: a node of a networked hub. Joins once (the hub's CA
//! checked against the hash in the token; the node's key made here, only a CSR sent),
//! then keeps one outbound connection to the hub (`skiff_hub::tunnel`): assignments in,
//! status and events out when they change, logs and exec served.
//!
//! Offline autonomy: the agent acts only on what it persisted in `agent.db`; when the hub
//! is unreachable it keeps running (and restarting) what it has, and a restart of the
//! agent — or of the machine — brings the same workloads back from local state.

use anyhow::{bail, Context, Result};
use clap::Args;
use skiff_agent::{Agent, AgentConfig};
use skiff_hub::fleet::{JoinRequest, JoinResponse, NodeStatus};
use skiff_hub::pki::JoinToken;
use skiff_hub::store::NodeSpec;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

#[derive(Args)]
pub struct AgentArgs {
    /// The hub, e.g. https://hub.example:7443.
    #[arg(long)]
    pub hub: String,
    /// Join token from `skiff token create` (needed for the first start only).
    #[arg(long, env = "SKIFF_TOKEN")]
    pub token: Option<String>,
    /// Node name (default: the host name).
    #[arg(long = "name", alias = "node-name")]
    pub node_name: Option<String>,
    /// Node label KEY=VALUE (repeatable), e.g. site=factory-3.
    #[arg(long = "label")]
    pub labels: Vec<String>,
    #[arg(long, default_value = "skiff0")]
    pub bridge: String,
    #[arg(long, default_value = "10.213.0.0/20")]
    pub subnet: String,
    /// Seconds between checks for changed status (sent only when it changed).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=300))]
    pub heartbeat: u64,
    /// Seconds between resource samples (shipped to the hub, buffered while offline).
    #[arg(long, default_value_t = 15, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub metrics_interval: u64,
    /// Serve this node's metrics for Prometheus at http://ADDR/metrics (e.g. 127.0.0.1:9337).
    #[arg(long)]
    pub metrics_listen: Option<String>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Joined {
    hub: String,
    node: String,
}

struct Pki {
    dir: PathBuf,
}

impl Pki {
    fn path(&self, f: &str) -> PathBuf {
        self.dir.join(f)
    }
}

fn node_spec(labels: BTreeMap<String, String>) -> NodeSpec {
    let (arch, variant) = skiff_model::platform::host_arch();
    let cpus = std::thread::available_parallelism().map(|n| n.get() as u64).unwrap_or(1);
    let mem_kib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| t.lines().find(|l| l.starts_with("MemTotal:")).map(str::to_string))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse::<u64>().ok()))
        .unwrap_or(0);
    NodeSpec {
        labels,
        os: "linux".into(),
        arch: arch.into(),
        variant: variant.map(str::to_string),
        cpu_millis: cpus * 1000,
        memory_bytes: mem_kib * 1024,
        runtimes: skiff_agent::runtimes(),
    }
}

/// Joins the hub unless this data directory already has; returns the node name.
async fn join(args: &AgentArgs, pki: &Pki, name: &str, spec: NodeSpec) -> Result<String> {
    let joined = pki.path("joined.json");
    if let Ok(t) = std::fs::read_to_string(&joined) {
        let j: Joined = serde_json::from_str(&t).with_context(|| format!("{}", joined.display()))?;
        if j.hub == args.hub {
            return Ok(j.node);
        }
        bail!("{} joined {} before; use another --data to join {}", pki.dir.display(), j.hub, args.hub);
    }
    let token = args.token.as_deref().context("--token is required to join (skiff token create, on the hub)")?;
    let token = JoinToken::parse(token)?;
    let hub = args.hub.trim_end_matches('/');
    // Trust on first use, checked: the CA must be the one whose hash the token carries.
    let probe = reqwest::Client::builder().danger_accept_invalid_certs(true).build()?;
    let ca_pem = probe
        .get(format!("{hub}/api/v1/cacerts"))
        .send()
        .await
        .map_err(|e| anyhow::anyhow!(skiff_image::error::with_causes(&e)))
        .with_context(|| format!("cannot reach the hub at {hub}"))?
        .error_for_status()?
        .text()
        .await?;
    let got = skiff_hub::pki::sha256_hex(&skiff_hub::pki::first_der(&ca_pem)?);
    if got != token.ca_sha256 {
        bail!(
            "the hub at {hub} presents CA sha256:{got}, the token names sha256:{}: wrong hub, or someone in between",
            token.ca_sha256
        );
    }
    let (key, csr) = skiff_hub::pki::node_csr(name)?;
    let client = pinned(&ca_pem)?;
    let req = JoinRequest { token: format!("{}.{}", token.id, token.secret), node: name.to_string(), csr, spec };
    let resp = client.post(format!("{hub}/api/v1/join")).json(&req).send().await?;
    let resp: JoinResponse = ok_json(resp).await.context("joining")?;
    std::fs::create_dir_all(&pki.dir)?;
    skiff_hub::pki::write_private(&pki.path("node.key"), &key)?;
    std::fs::write(pki.path("node.pem"), &resp.cert)?;
    std::fs::write(pki.path("ca.pem"), &resp.ca)?;
    std::fs::write(&joined, serde_json::to_vec_pretty(&Joined { hub: args.hub.clone(), node: name.to_string() })?)?;
    Ok(name.to_string())
}

/// A client that trusts only the hub's CA (for joining).
fn pinned(ca_pem: &str) -> Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(ca_pem.as_bytes())?)
        .connect_timeout(Duration::from_secs(10))
        .build()?)
}

async fn ok_json<T: serde::de::DeserializeOwned>(resp: reqwest::Response) -> Result<T> {
    let status = resp.status();
    let text = resp.text().await?;
    if !status.is_success() {
        let msg = serde_json::from_str::<skiff_model::api::ErrorBody>(&text).map(|e| e.error).unwrap_or(text);
        bail!("{msg} ({status})");
    }
    Ok(serde_json::from_str(&text)?)
}

/// 1 s doubling to 5 s, with up to 50 % jitter: a healed link is noticed within seconds,
/// and a restarted hub is not met by every node at once.
fn backoff(failures: u32) -> Duration {
    let base = (1000u64 << failures.min(3)).min(5_000);
    let jitter = u64::from(skiff_hub::pki::random_hex().as_bytes()[0] % 128) * base / 256;
    Duration::from_millis(base + jitter)
}

pub async fn agent(cli: &crate::cli::Cli, args: &AgentArgs) -> Result<i32> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let data = &cli.data;
    std::fs::create_dir_all(data).with_context(|| format!("creating {}", data.display()))?;
    let labels = crate::cli::parse_selector(&args.labels).context("--label")?;
    let mut acfg = AgentConfig::new(data);
    acfg.bridge_name = args.bridge.clone();
    acfg.subnet = args.subnet.clone();
    if let Some(n) = &args.node_name {
        acfg.node_name = n.clone();
    }
    acfg.pull = Some(crate::cli::pull_options(cli)?);
    acfg.metrics_every = Duration::from_secs(args.metrics_interval);
    let pki = Pki { dir: data.join("pki") };
    let node = join(args, &pki, &acfg.node_name, node_spec(labels)).await?;
    acfg.node_name = node.clone();
    let ca = std::fs::read_to_string(pki.path("ca.pem"))?;
    let agent = Agent::open(acfg)?;
    if let Some(addr) = &args.metrics_listen {
        let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("--metrics-listen {addr}"))?;
        let a = Arc::clone(&agent);
        tokio::spawn(skiff_hub::metrics::serve(listener, move || a.latest_metrics().into_iter().collect()));
    }
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let agent_task = tokio::spawn(Arc::clone(&agent).run(stop_rx));
    let hub = args.hub.trim_end_matches('/').to_string();
    eprintln!("skiff: agent {node} joined to {hub}; running from {}", data.display());

    let tls = skiff_hub::tls::client_config(
        &ca,
        &std::fs::read_to_string(pki.path("node.pem"))?,
        &std::fs::read_to_string(pki.path("node.key"))?,
    )
    .map_err(anyhow::Error::msg)
    .context("the node's certificate")?;
    let every = Duration::from_secs(args.heartbeat);
    let tunnel = tokio::spawn(tunnel_loop(Arc::clone(&agent), hub.clone(), node.clone(), Arc::new(tls), every));
    tokio::select! {
        _ = sigint.recv() => {}
        _ = sigterm.recv() => {}
    }
    tunnel.abort();
    // Workloads keep running: they belong to the node, not to this process.
    let _ = stop_tx.send(true);
    let _ = agent_task.await;
    eprintln!("skiff: agent stopped, workloads left running");
    Ok(0)
}

/// Keeps the one connection to the hub open (reconnecting with jittered backoff) and
/// runs the protocol on it: assignments in, status and events out, logs and exec served.
async fn tunnel_loop(agent: Arc<Agent>, hub: String, node: String, tls: Arc<rustls::ClientConfig>, every: Duration) {
    let local = Arc::new(crate::link::LocalAgent { agent });
    let url = format!("{}/api/v1/nodes/{node}/tunnel", hub.replacen("https://", "wss://", 1));
    let mut failures = 0u32;
    loop {
        let connector = tokio_tungstenite::Connector::Rustls(Arc::clone(&tls));
        let dial = tokio_tungstenite::connect_async_tls_with_config(url.as_str(), None, true, Some(connector));
        // Bounded: a SYN into a dead link would otherwise wait out the kernel's retries.
        match tokio::time::timeout(Duration::from_secs(10), dial).await.unwrap_or_else(|_| {
            Err(tokio_tungstenite::tungstenite::Error::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "connecting took more than 10 s",
            )))
        }) {
            Ok((ws, _)) => {
                failures = 0;
                tracing::info!("connected to the hub");
                serve_tunnel(&local, ws, every).await;
                tracing::warn!("lost the hub; running from local state");
            }
            Err(e) => {
                failures += 1;
                tracing::warn!("cannot connect to the hub: {e}");
            }
        }
        tokio::time::sleep(backoff(failures)).await;
    }
}

/// Buffered samples sent in one frame (after a partition, the backlog goes out in these).
const METRICS_PER_FRAME: usize = 20;

/// The hub pings every 20 s; this long without any frame means the link is gone.
const SILENCE: Duration = Duration::from_secs(45);

async fn serve_tunnel<S>(
    local: &Arc<crate::link::LocalAgent>,
    mut ws: tokio_tungstenite::WebSocketStream<S>,
    every: Duration,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use futures_util::{SinkExt, StreamExt};
    use skiff_hub::tunnel::{Control, Op, Request};
    use tokio_tungstenite::tungstenite::Message;
    let agent = &local.agent;
    let frame = |c: &Control| serde_json::to_string(c).unwrap_or_default();
    let hello =
        Control::Hello { revision: agent.desired_revision().unwrap_or(0), runtimes: Some(skiff_agent::runtimes()) };
    if ws.send(Message::Text(frame(&hello).into())).await.is_err() {
        return;
    }
    let (tx, mut rx) = tokio::sync::mpsc::channel::<String>(256);
    let mut running: std::collections::HashMap<u64, tokio::task::JoinHandle<()>> = Default::default();
    let mut tick = tokio::time::interval(every.min(SILENCE / 4));
    // The instances last reported: status goes out only when it changed (or events wait).
    let mut reported: Option<String> = None;
    // Samples sent on this connection (acknowledged or not): each goes out once per link.
    let mut metrics_sent = 0u64;
    // A link that dies silently (no FIN, TCP retransmitting for minutes) is noticed by the
    // hub's pings stopping: the connection is dropped and made anew.
    let mut last_rx = tokio::time::Instant::now();
    loop {
        tokio::select! {
            m = ws.next() => match m {
                Some(Ok(Message::Text(t))) => {
                    last_rx = tokio::time::Instant::now();
                    match serde_json::from_str::<Control>(t.as_str()) {
                        Ok(Control::Assign { assignment }) => {
                            let all: Vec<_> =
                                assignment.deployments.into_iter().map(|x| (x.spec, Some(x.indexes))).collect();
                            if let Err(e) = agent.set_desired_slots(&all, assignment.revision) {
                                tracing::error!("storing the assignment: {e}");
                            }
                        }
                        Ok(Control::Ack { events_through }) => {
                            if let Err(e) = agent.events_shipped(events_through) {
                                tracing::warn!("recording shipped events: {e}");
                            }
                        }
                        Ok(Control::MetricsAck { through }) => {
                            if let Err(e) = agent.metrics_shipped(through) {
                                tracing::warn!("recording shipped samples: {e}");
                            }
                        }
                        Ok(_) => {}
                        Err(_) => {
                            let Ok(req) = serde_json::from_str::<Request>(t.as_str()) else { continue };
                            match req.op {
                                Op::Cancel => {
                                    if let Some(h) = running.remove(&req.id) {
                                        h.abort();
                                    }
                                }
                                op => {
                                    let h = tokio::spawn(answer(Arc::clone(local), req.id, op, tx.clone()));
                                    running.insert(req.id, h);
                                }
                            }
                        }
                    }
                }
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break,
                Some(Ok(_)) => last_rx = tokio::time::Instant::now(),
            },
            out = rx.recv() => {
                let Some(f) = out else { break };
                if ws.send(Message::Text(f.into())).await.is_err() {
                    break;
                }
            }
            _ = tick.tick() => {
                if last_rx.elapsed() > SILENCE {
                    tracing::warn!("no word from the hub for {SILENCE:?}; reconnecting");
                    break;
                }
                // Samples too wait in agent.db (bounded) until acknowledged. A backlog from a
                // partition goes out at once, so the hub soon has the current one.
                let mut lost = false;
                while let Ok(samples) = agent.unshipped_metrics(metrics_sent, METRICS_PER_FRAME) {
                    let Some(&(through, _)) = samples.last() else { break };
                    let samples = samples.iter().map(|(_, s)| s.into()).collect();
                    if ws.send(Message::Text(frame(&Control::Metrics { samples, through }).into())).await.is_err() {
                        lost = true;
                        break;
                    }
                    metrics_sent = through;
                }
                if lost {
                    break;
                }
                // Events wait in agent.db until the hub acknowledges them: a partition delays
                // them, and a restart of either side loses none.
                let events = agent.unshipped_events(500).unwrap_or_default();
                let instances = agent.instances().unwrap_or_default();
                let problems = agent.pressure();
                let now = serde_json::to_string(&(&instances, &problems)).unwrap_or_default();
                if reported.as_deref() == Some(now.as_str()) && events.is_empty() {
                    continue;
                }
                let status = NodeStatus {
                    instances,
                    events_through: events.last().map(|(id, _)| *id).unwrap_or(0),
                    events: events.into_iter().map(|(_, e)| e).collect(),
                    problems,
                };
                if ws.send(Message::Text(frame(&Control::Status { status }).into())).await.is_err() {
                    break;
                }
                reported = Some(now);
            }
        }
        running.retain(|_, h| !h.is_finished());
    }
    for h in running.values() {
        h.abort();
    }
}

/// Serves one request from the hub: its answers go back as frames on `tx`.
async fn answer(
    local: Arc<crate::link::LocalAgent>,
    id: u64,
    op: skiff_hub::tunnel::Op,
    tx: tokio::sync::mpsc::Sender<String>,
) {
    use skiff_hub::tunnel::{Answer, Op, Reply};
    use skiff_hub::NodeLink;
    let send = |answer: Answer| {
        let tx = tx.clone();
        async move {
            match serde_json::to_string(&Reply { id, answer }) {
                Ok(f) => tx.send(f).await.is_ok(),
                Err(_) => false,
            }
        }
    };
    match op {
        Op::Logs { instance, tail, follow } => match local.logs(&instance, tail, follow) {
            Ok(mut lines) => {
                while let Some(l) = lines.recv().await {
                    if !send(Answer::Log(l)).await {
                        return;
                    }
                }
                send(Answer::End).await;
            }
            Err(e) => {
                send(Answer::Error(e)).await;
            }
        },
        Op::Exec { instance, argv, timeout_ms } => {
            let r = local.exec(&instance, argv, Duration::from_millis(timeout_ms)).await;
            send(match r {
                Ok(r) => Answer::Exec(r),
                Err(e) => Answer::Error(e),
            })
            .await;
        }
        Op::Cancel => {}
    }
}
