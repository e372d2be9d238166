//! `xtask hub-sim ADMIN_CONF TOKEN NODES IDLE_SECS HUB_PID`: many lightweight agents in
//! one process speaking the real protocol to a real `skiff hub`: TLS with a certificate
//! each (joined with the token, key made here, CSR signed by the hub), then the one
//! connection an agent keeps — the tunnel WebSocket: hello, a status report, assignments
//! pushed by the hub, the hub's liveness pings. Measures, then prints JSON: join time, hub
//! RSS and CPU per node heartbeat (ping) over an idle window, idle bytes per node per
//! minute on loopback, and p50/p99 from `apply` until every node holds its assignment.
//! With METRICS_SECS > 0 each node also ships a packed resource sample (two instances)
//! that often, as agents do every 15 s by default.

use anyhow::{bail, Context, Result};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub(crate) struct SimNode {
    pub(crate) name: String,
    pub(crate) tls: Arc<rustls::ClientConfig>,
}

pub(crate) fn hub_cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    // utime and stime are fields 14 and 15; after ")" they are at 11 and 12.
    f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
}

pub(crate) fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}

pub(crate) fn lo_bytes() -> u64 {
    std::fs::read_to_string("/sys/class/net/lo/statistics/tx_bytes")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// The nodes' own traffic: bytes to and from 127.0.1.0/24 (where `dial` connects from),
/// both directions once each, as the counters of nftables table `inet SKIFF_BENCH_TABLE`
/// (the bench made it) say; `None` without that table.
pub(crate) fn tunnel_bytes() -> Option<u64> {
    let table = std::env::var("SKIFF_BENCH_TABLE").ok()?;
    let out = std::process::Command::new("nft").args(["-j", "list", "table", "inet", &table]).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    let rules = v["nftables"].as_array()?.iter().filter_map(|o| o["rule"]["expr"].as_array());
    Some(rules.flatten().filter_map(|e| e["counter"]["bytes"].as_u64()).sum())
}

pub(crate) fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// The next sample of a quiet node with two instances: figures of realistic size that
/// move a little (CPU and memory jitter, network counters grow), as an agent's do.
fn sample(node: &str, n: u64) -> skiff_model::metrics::PackedSample {
    let now =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
    let mut m = skiff_model::metrics::MetricsSample::example(node, now);
    // A cheap deterministic wobble per node and sample.
    let h =
        |k: u64| (n.wrapping_mul(6364136223846793005).wrapping_add(k.wrapping_mul(1442695040888963407)) >> 33) % 1000;
    m.host.cpu_cores = m.host.cpu_cores.map(|c| c * (0.9 + h(1) as f64 / 5000.0));
    m.host.memory_used_bytes += h(2) * 4096;
    m.host.rx_bytes += n * 20_000 + h(3);
    m.host.tx_bytes += n * 5_000 + h(4);
    m.host.load1 = 0.05 + h(5) as f64 / 10_000.0;
    for (k, i) in m.instances.iter_mut().enumerate() {
        let k = k as u64 * 10;
        i.cpu_cores = i.cpu_cores.map(|c| c * (0.9 + h(k + 6) as f64 / 5000.0));
        i.memory_bytes += h(k + 7) * 1024;
        i.rx_bytes += n * 8_000 + h(k + 8);
        i.tx_bytes += n * 2_000 + h(k + 9);
    }
    skiff_model::metrics::PackedSample::from(&m).sorted()
}

/// A simulated node's samples as the agent ships them: whole first, then deltas, still
/// figures batched (`Shipper`).
#[derive(Default)]
pub(crate) struct Samples {
    through: u64,
    shipper: skiff_model::metrics::Shipper,
    pending: Vec<skiff_model::metrics::PackedSample>,
}

impl Samples {
    /// Takes `node`'s next sample; the frame to send, when one is due (deflated when the
    /// hub reads that, as the agent's).
    pub(crate) fn next_frame(&mut self, node: &str, deflate: bool) -> Option<tokio_tungstenite::tungstenite::Message> {
        use skiff_model::metrics::Shipment;
        use skiff_model::proto::Control;
        self.through += 1;
        let through = self.through;
        self.pending.push(sample(node, through));
        let c = match self.shipper.ship(&self.pending)? {
            Shipment::Whole(samples) => Control::Metrics { samples, through },
            Shipment::Deltas(samples) => Control::MetricsDelta { samples, through },
        };
        self.pending.clear();
        Some(skiff_agent::tunnel::message(&c, deflate))
    }
}

pub async fn run(
    admin_conf: &str,
    token: &str,
    nodes: usize,
    idle_secs: u64,
    hub_pid: u32,
    metrics_secs: u64,
) -> Result<()> {
    let Conf { server, ca, admin, secret, plain } = conf(admin_conf, token)?;

    // Join every node, 32 at a time.
    let t0 = Instant::now();
    let sims = join_all(&plain, &server, &secret, &ca, nodes).await?;
    let join_s = t0.elapsed().as_secs_f64();
    eprintln!("hub-sim: {nodes} nodes joined in {join_s:.1} s");

    // Every node: its tunnel, as `skiff agent` runs it.
    let heartbeats = Arc::new(AtomicU64::new(0));
    let got_probe: Arc<Mutex<Vec<Option<Instant>>>> = Arc::new(Mutex::new(vec![None; nodes]));
    let ws_url = server.replacen("https://", "wss://", 1);
    // Sources spread over 127.0.1.1-8 (`dial`): one source address has ~28k ephemeral
    // ports to one hub port, fewer than 100k nodes need.
    let hub_addr: std::net::SocketAddr = server
        .trim_start_matches("https://")
        .split('/')
        .next()
        .unwrap_or_default()
        .parse()
        .context("the hub's address (host:port) in admin.conf")?;
    for (i, n) in sims.iter().enumerate() {
        let (n, url, hb, got) = (
            Arc::clone(n),
            format!("{ws_url}/api/v1/nodes/{}/tunnel", n.name),
            Arc::clone(&heartbeats),
            Arc::clone(&got_probe),
        );
        tokio::spawn(async move {
            use futures_util::{SinkExt, StreamExt};
            use tokio_tungstenite::tungstenite::Message;
            // Spread the connects, as nodes that started at different times.
            tokio::time::sleep(Duration::from_millis((i as u64 * 7919) % 5_000)).await;
            loop {
                if let Some((mut ws, deflate)) = dial(i, hub_addr, &url, &n.tls).await {
                    let hello = serde_json::json!({"type": "hello", "revision": 0}).to_string();
                    let status = serde_json::json!({"type": "status", "status": {}}).to_string();
                    if ws.send(Message::Text(hello.into())).await.is_ok()
                        && ws.send(Message::Text(status.into())).await.is_ok()
                    {
                        // Samples as a node running two instances ships them (0: none).
                        let mut sample_tick = tokio::time::interval(Duration::from_secs(metrics_secs.max(1)));
                        sample_tick.tick().await;
                        let mut samples = Samples::default();
                        loop {
                            let m = tokio::select! {
                                m = ws.next() => match m {
                                    Some(Ok(m)) => m,
                                    _ => break,
                                },
                                _ = sample_tick.tick(), if metrics_secs > 0 => {
                                    let Some(frame) = samples.next_frame(&n.name, deflate) else { continue };
                                    if ws.send(frame).await.is_err() {
                                        break;
                                    }
                                    continue;
                                }
                            };
                            match m {
                                Message::Ping(_) => {
                                    hb.fetch_add(1, Ordering::Relaxed);
                                }
                                Message::Text(t) => {
                                    let v: serde_json::Value = serde_json::from_str(t.as_str()).unwrap_or_default();
                                    let has = v["assignment"]["deployments"]
                                        .as_array()
                                        .is_some_and(|d| d.iter().any(|x| x["spec"]["name"] == "probe"));
                                    if has {
                                        if let Ok(mut g) = got.lock() {
                                            g[i].get_or_insert(Instant::now());
                                        }
                                    }
                                }
                                _ => {}
                            }
                        }
                    }
                }
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        });
    }

    // Wait for every node to be Ready at the hub.
    let admin_client = plain.clone();
    wait_ready(&admin_client, &server, &admin, nodes, Duration::from_secs(300)).await?;
    eprintln!("hub-sim: all Ready; idle window of {idle_secs} s");
    tokio::time::sleep(Duration::from_secs(5)).await;

    // Idle: hub CPU per heartbeat, loopback bytes per node per minute.
    let (cpu0, hb0, lo0, w0) = (hub_cpu_ticks(hub_pid), heartbeats.load(Ordering::Relaxed), lo_bytes(), Instant::now());
    tokio::time::sleep(Duration::from_secs(idle_secs)).await;
    let (cpu1, hb1, lo1, secs) =
        (hub_cpu_ticks(hub_pid), heartbeats.load(Ordering::Relaxed), lo_bytes(), w0.elapsed().as_secs_f64());
    let ticks_per_s = 100.0; // USER_HZ
    let beats = (hb1 - hb0).max(1) as f64;
    let cpu_us_per_beat = (cpu1 - cpu0) as f64 / ticks_per_s * 1e6 / beats;
    // Loopback carries both directions once each.
    let bytes_per_node_min = (lo1 - lo0) as f64 / nodes as f64 / secs * 60.0;
    let hub_rss = rss_kib(hub_pid);
    let sim_rss = rss_kib(std::process::id());

    // Propagation: a global deployment every node must get.
    let probe = serde_json::json!({"deployments": [{"name": "probe", "image": "localhost/none:1", "placement": {"mode": "global"}}], "dry_run": false});
    let t_apply = Instant::now();
    let r = admin_client.post(format!("{server}/api/v1/apply")).bearer_auth(&admin).json(&probe).send().await?;
    if !r.status().is_success() {
        bail!("apply: {}", r.text().await?);
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    let lat: Vec<f64> = loop {
        let got: Vec<Option<Instant>> = got_probe.lock().map(|g| g.clone()).unwrap_or_default();
        if got.iter().all(Option::is_some) {
            let mut v: Vec<f64> =
                got.iter().flatten().map(|t| t.saturating_duration_since(t_apply).as_secs_f64() * 1000.0).collect();
            v.sort_by(|a, b| a.total_cmp(b));
            break v;
        }
        if Instant::now() > deadline {
            bail!("{} of {nodes} nodes got the assignment within 120 s", got.iter().flatten().count());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let out = serde_json::json!({
        "nodes": nodes,
        "join_seconds": (join_s * 10.0).round() / 10.0,
        "hub_rss_mib": hub_rss / 1024,
        "sim_rss_mib": sim_rss / 1024,
        "idle_window_s": secs.round(),
        "heartbeats_in_window": hb1 - hb0,
        "hub_cpu_us_per_node_heartbeat": cpu_us_per_beat.round(),
        "idle_bytes_per_node_per_minute": bytes_per_node_min.round(),
        "idle_kbit_per_s_per_node": ((bytes_per_node_min * 8.0 / 60.0 / 1000.0) * 1000.0).round() / 1000.0,
        "propagation_ms": {"p50": pct(&lat, 0.5).round(), "p99": pct(&lat, 0.99).round(), "max": pct(&lat, 1.0).round()},
    });
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}

/// Simulated node `i`'s tunnel to `addr` (`url`), from 127.0.1.(1 + i % 8) — one source
/// address has ~28k ephemeral ports to one hub port — with small WebSocket buffers, as
/// the agent's; `None` when the connection or its TLS fails.
pub(crate) async fn dial(
    i: usize,
    addr: std::net::SocketAddr,
    url: &str,
    tls: &Arc<rustls::ClientConfig>,
) -> Option<(tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>, bool)> {
    let c = tokio_tungstenite::Connector::Rustls(Arc::clone(tls));
    let small = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .read_buffer_size(8 << 10)
        .write_buffer_size(0);
    let src = std::net::SocketAddr::from(([127, 0, 1, 1 + (i % 8) as u8], 0));
    let sock = tokio::net::TcpSocket::new_v4().ok()?;
    sock.bind(src).ok()?;
    let stream = sock.connect(addr).await.ok()?;
    let (ws, answer) = tokio_tungstenite::client_async_tls_with_config(url, stream, Some(small), Some(c)).await.ok()?;
    let header = answer.headers().get(skiff_model::proto::TUNNEL_FEATURES).and_then(|v| v.to_str().ok());
    Some((ws, skiff_model::proto::tunnel_reads(header, skiff_model::proto::FEATURE_DEFLATE)))
}

/// What a simulator needs from the hub's admin.conf and the join token.
pub(crate) struct Conf {
    pub(crate) server: String,
    pub(crate) ca: String,
    pub(crate) admin: String,
    /// The token's credential (`id.secret`).
    pub(crate) secret: String,
    /// A client trusting the hub's CA only.
    pub(crate) plain: reqwest::Client,
}

pub(crate) fn conf(admin_conf: &str, token: &str) -> Result<Conf> {
    let conf: serde_json::Value = serde_json::from_slice(&std::fs::read(admin_conf)?)?;
    let server = conf["server"].as_str().context("server")?.to_string();
    let ca = conf["ca"].as_str().context("ca")?.to_string();
    let admin = conf["token"].as_str().context("token")?.to_string();
    let t = skiff_model::proto::JoinToken::parse(token)?;
    let secret = format!("{}.{}", t.id, t.secret);
    let ca_cert = reqwest::Certificate::from_pem(ca.as_bytes())?;
    let plain = reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(ca_cert)
        .timeout(Duration::from_secs(30))
        .build()?;
    Ok(Conf { server, ca, admin, secret, plain })
}

/// Joins `nodes` simulated nodes (`sim-000000`, ...) through `server`, 32 at a time: a
/// key made here and a CSR each, as agents join.
async fn join_all(
    plain: &reqwest::Client,
    server: &str,
    secret: &str,
    ca: &str,
    nodes: usize,
) -> Result<Vec<Arc<SimNode>>> {
    join_all_through(plain, &[server.to_string()], secret, ca, 0, nodes).await
}

/// Joins nodes `sim-FIRST` .. `sim-FIRST+COUNT-1`, node i through `hubs[i % len]`, in
/// order, 32 at a time.
pub(crate) async fn join_all_through(
    plain: &reqwest::Client,
    hubs: &[String],
    secret: &str,
    ca: &str,
    first: usize,
    count: usize,
) -> Result<Vec<Arc<SimNode>>> {
    let sem = Arc::new(tokio::sync::Semaphore::new(32));
    let mut joins = tokio::task::JoinSet::new();
    for i in first..first + count {
        let server = hubs[i % hubs.len()].clone();
        let (sem, plain, secret, ca) = (Arc::clone(&sem), plain.clone(), secret.to_string(), ca.to_string());
        joins.spawn(async move {
            let _p = sem.acquire().await;
            let name = format!("sim-{i:06}");
            let (key, csr) = skiff_agent::join::node_csr(&name)?;
            let spec = serde_json::json!({"os": "linux", "arch": "amd64", "cpu_millis": 4000, "memory_bytes": 4u64 << 30, "labels": {"site": format!("s{}", i % 50)}});
            // As an agent does, a join that failed for the hub's own reasons (busy: tens of
            // thousands of others joining and connecting) is made again, for up to ten
            // minutes; one that was refused is an error.
            let body = serde_json::json!({"token": secret, "node": name, "csr": csr, "spec": spec});
            let (mut tries, until) = (0, Instant::now() + Duration::from_secs(600));
            let resp = loop {
                tries += 1;
                let last = Instant::now() > until;
                match plain.post(format!("{server}/api/v1/join")).json(&body).send().await {
                    Ok(r) if r.status().is_success() || r.status().is_client_error() || last => break r,
                    Err(e) if last => return Err(e.into()),
                    _ => tokio::time::sleep(Duration::from_secs(tries.min(10))).await,
                }
            };
            if !resp.status().is_success() {
                bail!("join {name}: {}", resp.text().await?);
            }
            let j: serde_json::Value = resp.json().await?;
            let cert = j["cert"].as_str().context("cert")?.to_string();
            let tls = Arc::new(skiff_agent::tls::client_config(&ca, &cert, &key).map_err(anyhow::Error::msg)?);
            anyhow::Ok((i, SimNode { name, tls }))
        });
    }
    let mut sims = vec![];
    while let Some(r) = joins.join_next().await {
        sims.push(r??);
    }
    sims.sort_by_key(|(i, _)| *i);
    Ok(sims.into_iter().map(|(_, s)| Arc::new(s)).collect())
}

pub(crate) fn addr_of(url: &str) -> Result<std::net::SocketAddr> {
    url.trim_start_matches("https://")
        .split('/')
        .next()
        .unwrap_or_default()
        .parse()
        .with_context(|| format!("{url}: a hub's address (host:port)"))
}

/// Waits (at most `limit`) until the hub at `server` lists `nodes` nodes Ready.
pub(crate) async fn wait_ready(
    c: &reqwest::Client,
    server: &str,
    admin: &str,
    nodes: usize,
    limit: Duration,
) -> Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        let r = c.get(format!("{server}/api/v1/nodes")).bearer_auth(admin).send().await?;
        let v: Vec<serde_json::Value> = r.json().await?;
        let ready = v.iter().filter(|n| n["state"] == "Ready").count();
        if ready >= nodes {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("only {ready} of {nodes} nodes Ready at {server} after {limit:?}");
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// Nodes in state Ready at the hub at `server` (`None`: it does not answer).
async fn ready_at(c: &reqwest::Client, server: &str, admin: &str) -> Option<usize> {
    let r = c.get(format!("{server}/api/v1/nodes")).bearer_auth(admin).send().await.ok()?;
    let v: Vec<serde_json::Value> = r.json().await.ok()?;
    Some(v.iter().filter(|n| n["state"] == "Ready").count())
}

/// Whether the hub at `server` leads its store (as it tells its peers).
async fn leads(c: &reqwest::Client, server: &str, admin: &str) -> Option<bool> {
    // The first answer (to no epoch of its own: every node) gives its epoch and
    // generation; the second, asked from there, carries only its role.
    let q = [("epoch", "-"), ("since", "0")];
    let first: serde_json::Value =
        c.get(format!("{server}/api/v1/hub/peer")).query(&q).bearer_auth(admin).send().await.ok()?.json().await.ok()?;
    let (epoch, gen) = (first["epoch"].as_str()?.to_string(), first["generation"].as_u64()?.to_string());
    let q = [("epoch", epoch.as_str()), ("since", gen.as_str())];
    let v: serde_json::Value =
        c.get(format!("{server}/api/v1/hub/peer")).query(&q).bearer_auth(admin).send().await.ok()?.json().await.ok()?;
    v["leads"].as_bool()
}

/// `xtask hub-ha ADMIN_CONF TOKEN NODES STANDBY_URL ACTIVE_PID`: `NODES` simulated agents
/// given both hubs of one etcd store, as `skiff agent --hub A,B` is, half of them dialling
/// each first (every hub serves). Once all are assigned, the hub that leads is SIGKILLed;
/// prints the time until (a) the other leads, (b) every node that had dialled the dead
/// hub is connected again, (c) an apply made through the other hub right after the kill is
/// placed on its node.
pub async fn ha(admin_conf: &str, token: &str, nodes: usize, standby: &str, active_pid: u32) -> Result<()> {
    let Conf { server, ca, admin, secret, plain } = conf(admin_conf, token)?;
    let sims = join_all(&plain, &server, &secret, &ca, nodes).await?;
    let hubs = [server.clone(), standby.to_string()];
    let addrs = [addr_of(&hubs[0])?, addr_of(&hubs[1])?];
    // What the sims received, before and after the failover (by when their connection
    // opened), and assignments among it; the revision each holds, sent in its hello as
    // the agent does (`agent.db`), so a hub sends only what changed since.
    let failed_over = Arc::new(AtomicBool::new(false));
    let bytes = Arc::new([AtomicU64::new(0), AtomicU64::new(0)]);
    let assigns = Arc::new([AtomicU64::new(0), AtomicU64::new(0)]);
    let revisions: Arc<Vec<AtomicU64>> = Arc::new((0..nodes).map(|_| AtomicU64::new(0)).collect());
    let digests: Arc<Vec<Mutex<Option<String>>>> = Arc::new((0..nodes).map(|_| Mutex::new(None)).collect());
    let placed: Arc<Vec<AtomicBool>> = Arc::new((0..nodes).map(|_| AtomicBool::new(false)).collect());
    // Whether each connected since the kill; whether the probe applied after it reached one.
    let connected: Arc<Vec<AtomicBool>> = Arc::new((0..nodes).map(|_| AtomicBool::new(false)).collect());
    let probe_placed = Arc::new(AtomicBool::new(false));
    for (i, n) in sims.iter().enumerate() {
        let (is_connected, probe_placed) = (Arc::clone(&connected), Arc::clone(&probe_placed));
        let (n, hubs) = (Arc::clone(n), hubs.clone());
        let (failed_over, bytes, assigns, revisions, digests) = (
            Arc::clone(&failed_over),
            Arc::clone(&bytes),
            Arc::clone(&assigns),
            Arc::clone(&revisions),
            Arc::clone(&digests),
        );
        let placed = Arc::clone(&placed);
        tokio::spawn(async move {
            use futures_util::{SinkExt, StreamExt};
            use tokio_tungstenite::tungstenite::Message;
            tokio::time::sleep(Duration::from_millis((i as u64 * 7919) % 3_000)).await;
            // Half dial the hub that leads first, half the other.
            let mut at = i % 2;
            loop {
                let url = format!("{}/api/v1/nodes/{}/tunnel", hubs[at % 2].replacen("https://", "wss://", 1), n.name);
                let src = std::net::SocketAddr::from(([127, 0, 0, 1 + (i % 8) as u8], 0));
                let dial = async {
                    let sock = tokio::net::TcpSocket::new_v4()?;
                    sock.bind(src)?;
                    sock.connect(addrs[at % 2]).await
                };
                let c = tokio_tungstenite::Connector::Rustls(Arc::clone(&n.tls));
                let connected = match dial.await {
                    Ok(stream) => {
                        tokio_tungstenite::client_async_tls_with_config(url.as_str(), stream, None, Some(c)).await.ok()
                    }
                    Err(_) => None,
                };
                let Some((mut ws, _)) = connected else {
                    // The next hub at once, with a little jitter (as the agent).
                    at += 1;
                    tokio::time::sleep(Duration::from_millis(200 + (i as u64 * 31) % 100)).await;
                    continue;
                };
                let phase = usize::from(failed_over.load(Ordering::SeqCst));
                let held = revisions[i].load(Ordering::SeqCst);
                let digest = digests[i].lock().ok().and_then(|d| d.clone());
                let hello = serde_json::json!({"type": "hello", "revision": held, "digest": digest}).to_string();
                let status = serde_json::json!({"type": "status", "status": {}}).to_string();
                if ws.send(Message::Text(hello.into())).await.is_ok()
                    && ws.send(Message::Text(status.into())).await.is_ok()
                {
                    if phase == 1 {
                        is_connected[i].store(true, Ordering::SeqCst);
                    }
                    while let Some(Ok(m)) = ws.next().await {
                        bytes[phase].fetch_add(m.len() as u64, Ordering::Relaxed);
                        let Message::Text(t) = m else { continue };
                        if !t.as_str().starts_with(r#"{"type":"assign""#) {
                            continue;
                        }
                        assigns[phase].fetch_add(1, Ordering::Relaxed);
                        let v: serde_json::Value = serde_json::from_str(t.as_str()).unwrap_or_default();
                        if let Some(r) = v["assignment"]["revision"].as_u64() {
                            revisions[i].store(r, Ordering::SeqCst);
                        }
                        if let Ok(mut d) = digests[i].lock() {
                            *d = v["assignment"]["digest"].as_str().map(String::from);
                        }
                        let everywhere = v["assignment"]["deployments"]
                            .as_array()
                            .is_some_and(|all| all.iter().any(|d| d["spec"]["name"] == "everywhere"));
                        placed[i].store(everywhere, Ordering::SeqCst);
                        let probe = v["assignment"]["deployments"]
                            .as_array()
                            .is_some_and(|all| all.iter().any(|d| d["spec"]["name"] == "after-failover"));
                        if probe {
                            probe_placed.store(true, Ordering::SeqCst);
                        }
                    }
                }
                // Lost the hub: as the agent, about a second, then again.
                tokio::time::sleep(Duration::from_millis(1_000 + (i as u64 * 7) % 500)).await;
            }
        });
    }
    let deadline = Instant::now() + Duration::from_secs(300);
    while ready_at(&plain, &server, &admin).await.unwrap_or(0) < nodes {
        if Instant::now() > deadline {
            bail!("not every node Ready at the hub that leads within 300 s");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    // A deployment on every node: each holds an assignment worth resending.
    let everywhere = serde_json::json!({"deployments": [{"name": "everywhere", "image": "localhost/none:1", "placement": {"mode": "global"}, "env": {"PAD": "x".repeat(512)}}], "dry_run": false});
    let r = plain.post(format!("{server}/api/v1/apply")).bearer_auth(&admin).json(&everywhere).send().await?;
    if !r.status().is_success() {
        bail!("apply everywhere: {}", r.text().await?);
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while placed.iter().any(|p| !p.load(Ordering::SeqCst)) {
        if Instant::now() > deadline {
            bail!("not every node assigned `everywhere` within 120 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let first = (bytes[0].load(Ordering::SeqCst), assigns[0].load(Ordering::SeqCst));
    let on_other = (0..nodes).filter(|i| i % 2 == 1).count();
    eprintln!("hub-ha: {nodes} nodes assigned ({on_other} of them on the other hub); killing {server}, which leads");
    failed_over.store(true, Ordering::SeqCst);
    let _ = std::process::Command::new("kill").args(["-KILL", &active_pid.to_string()]).status();
    let t0 = Instant::now();
    let limit = Duration::from_secs(120);
    // Made through the other hub at once: it stores it; the leader places it.
    let probe = serde_json::json!({"deployments": [{"name": "after-failover", "image": "localhost/none:1", "replicas": 1}], "dry_run": false});
    let r = plain.post(format!("{standby}/api/v1/apply")).bearer_auth(&admin).json(&probe).send().await?;
    let applied = t0.elapsed();
    if !r.status().is_success() {
        bail!("apply through {standby}: {}", r.text().await?);
    }
    let (mut leader, mut reconnected, mut probe_at) = (None, None, None);
    while leader.is_none() || reconnected.is_none() || probe_at.is_none() {
        if t0.elapsed() > limit {
            bail!("after {limit:?}: leads {leader:?}, every node connected {reconnected:?}, probe placed {probe_at:?}");
        }
        if leader.is_none() && leads(&plain, standby, &admin).await == Some(true) {
            leader = Some(t0.elapsed());
        }
        // Those that had dialled the killed hub (the even ones) are on the other now.
        if reconnected.is_none() && connected.iter().step_by(2).all(|c| c.load(Ordering::SeqCst)) {
            reconnected = Some(t0.elapsed());
        }
        if probe_at.is_none() && probe_placed.load(Ordering::SeqCst) {
            probe_at = Some(t0.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // What the resync cost: everything the nodes received from the new leader, over the
    // same settling time as before the kill.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = (bytes[1].load(Ordering::SeqCst), assigns[1].load(Ordering::SeqCst));
    let ms = |d: Option<Duration>| d.map(|d| d.as_millis() as u64).unwrap_or(0);
    let per_node = |b: u64| (b as f64 / nodes as f64).round();
    let out = serde_json::json!({
        "nodes": nodes,
        "nodes_on_the_killed_hub": nodes - on_other,
        "new_leader_ms": ms(leader),
        "every_node_connected_ms": ms(reconnected),
        "apply_through_the_other_hub_served_ms": applied.as_millis() as u64,
        "that_apply_placed_ms": ms(probe_at),
        "first_sync_bytes_per_node": per_node(first.0),
        "first_sync_assignments": first.1,
        "resync_bytes_per_node": per_node(after.0),
        "resync_assignments": after.1,
    });
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}
