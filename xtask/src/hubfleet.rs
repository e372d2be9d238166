//! `xtask hub-fleet`: many simulated agents spread over several `skiff hub`s of one etcd
//! store, in several processes (one process may hold at most 20,000 open files here).
//!
//! `hub-fleet ADMIN_CONF TOKEN NODES PER_PART HUBS HUB_PIDS ETCD_URL IDLE_SECS DIR METRICS
//! REPEAT`: the orchestrator. Starts `NODES / PER_PART` parts (this program again,
//! `hub-fleet-part`), waits until the hub that leads lists every node Ready, measures an
//! idle window (each hub's RSS and CPU per node heartbeat, etcd's database size and writes
//! per second, loopback bytes per node: agents' tunnels, hubs asking each other, hubs and
//! etcd), with `METRICS` 1 the same window again while every node ships samples every
//! 15 s, then applies `REPEAT` deployments on every node (`probe-1`, ...) one after
//! another through one hub and prints, for each, p50/p99 from the apply until each node
//! holds it, and each hub's first, p50 and last. `HUBS` and `HUB_PIDS` are
//! comma-separated, the first hub the one that leads.
//!
//! `hub-fleet-part ADMIN_CONF TOKEN FIRST COUNT HUBS DIR K`: nodes `sim-FIRST` ..
//! `sim-FIRST+COUNT-1`, node i joining through and dialling hub `i % len(HUBS)`, as
//! hub-sim's do (hello, status, the hub's pings). Writes `DIR/part-K.connected` once
//! every node holds its first assignment and `DIR/part-K.beats` (pings so far); ships
//! samples while `DIR/metrics` exists; arms the probe `DIR/probe` names
//! (`DIR/part-K.armed.NAME`) and, once `DIR/applied.NAME` (the apply's wall-clock ms)
//! exists and every node holds the probe, writes `DIR/part-K.lat.NAME` (each node's ms
//! after the apply). Ends when `DIR/stop` exists.

use crate::hubsim::{conf, join_all_through, rss_kib, Conf, SimNode};
use anyhow::{bail, Context, Result};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn wall_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

fn cpu_ticks(pid: u32) -> u64 {
    crate::hubsim::hub_cpu_ticks(pid)
}

/// What a part's tunnels share with its loop: pings heard, when each node last got an
/// assignment, the probe armed (its name) and when each node got it, and whether nodes
/// ship samples now.
#[derive(Default)]
struct Shared {
    beats: AtomicU64,
    assigned: Vec<AtomicU64>,
    probe: std::sync::Mutex<String>,
    probe_at: Vec<AtomicU64>,
    metrics: std::sync::atomic::AtomicBool,
}

/// Samples go every 15 s, the agent's default.
const METRICS_EVERY: Duration = Duration::from_secs(15);

/// One part: its nodes, their tunnels, until `DIR/stop`.
pub async fn part(
    admin_conf: &str,
    token: &str,
    first: usize,
    count: usize,
    hubs: &str,
    dir: &str,
    k: usize,
) -> Result<()> {
    let Conf { ca, secret, plain, .. } = conf(admin_conf, token)?;
    let hubs: Vec<String> = hubs.split(',').map(String::from).collect();
    let dir = Path::new(dir).to_path_buf();
    let sims = join_all_through(&plain, &hubs, &secret, &ca, first, count).await?;
    eprintln!("hub-fleet part {k}: {count} nodes joined");
    let shared = Arc::new(Shared {
        assigned: (0..count).map(|_| AtomicU64::new(0)).collect(),
        probe_at: (0..count).map(|_| AtomicU64::new(0)).collect(),
        ..Default::default()
    });
    for (i, n) in sims.iter().enumerate() {
        let hub = &hubs[(first + i) % hubs.len()];
        let addr = crate::hubsim::addr_of(hub)?;
        let url = format!("{}/api/v1/nodes/{}/tunnel", hub.replacen("https://", "wss://", 1), n.name);
        let (n, shared) = (Arc::clone(n), Arc::clone(&shared));
        tokio::spawn(async move { tunnel(i, n, addr, url, shared).await });
    }
    let mut connected = false;
    // The probe armed and whether its latencies are written.
    let mut armed: Option<(String, bool)> = None;
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        if dir.join("stop").exists() {
            return Ok(());
        }
        std::fs::write(dir.join(format!("part-{k}.beats")), shared.beats.load(Ordering::Relaxed).to_string())?;
        shared.metrics.store(dir.join("metrics").exists(), Ordering::Relaxed);
        if !connected && shared.assigned.iter().all(|a| a.load(Ordering::Relaxed) > 0) {
            connected = true;
            std::fs::write(dir.join(format!("part-{k}.connected")), "")?;
        }
        // A new probe: armed here (said in `part-K.armed.NAME`) before the orchestrator applies it.
        let wanted = std::fs::read_to_string(dir.join("probe")).ok().map(|t| t.trim().to_string());
        if let Some(name) = wanted.filter(|w| !w.is_empty() && armed.as_ref().is_none_or(|(a, _)| a != w)) {
            shared.probe_at.iter().for_each(|p| p.store(0, Ordering::Relaxed));
            if let Ok(mut p) = shared.probe.lock() {
                p.clone_from(&name);
            }
            std::fs::write(dir.join(format!("part-{k}.armed.{name}")), "")?;
            armed = Some((name, false));
        }
        let Some((name, written)) = armed.as_mut().filter(|(_, w)| !*w) else { continue };
        let applied = std::fs::read_to_string(dir.join(format!("applied.{name}"))).ok();
        let Some(applied) = applied.and_then(|t| t.trim().parse::<u64>().ok()) else { continue };
        if shared.probe_at.iter().all(|p| p.load(Ordering::Relaxed) > 0) {
            let lat: Vec<String> =
                shared.probe_at.iter().map(|p| p.load(Ordering::Relaxed).saturating_sub(applied).to_string()).collect();
            std::fs::write(dir.join(format!("part-{k}.lat.{name}")), lat.join("\n"))?;
            *written = true;
        }
    }
}

/// One node's tunnel, as hub-sim's: dialled again 5 s after it drops; samples every 15 s
/// while the part says so.
async fn tunnel(i: usize, n: Arc<SimNode>, addr: std::net::SocketAddr, url: String, shared: Arc<Shared>) {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    // Spread the connects, as nodes that started at different times.
    tokio::time::sleep(Duration::from_millis((i as u64 * 7919) % 20_000)).await;
    loop {
        if let Some((mut ws, deflate)) = crate::hubsim::dial(i, addr, &url, &n.tls).await {
            let hello = serde_json::json!({"type": "hello", "revision": 0}).to_string();
            let status = serde_json::json!({"type": "status", "status": {}}).to_string();
            if ws.send(Message::Text(hello.into())).await.is_ok() && ws.send(Message::Text(status.into())).await.is_ok()
            {
                let spread = Duration::from_millis((i as u64 * 7919) % METRICS_EVERY.as_millis() as u64);
                let mut sample_tick = tokio::time::interval_at(tokio::time::Instant::now() + spread, METRICS_EVERY);
                let mut samples = crate::hubsim::Samples::default();
                loop {
                    let m = tokio::select! {
                        m = ws.next() => match m {
                            Some(Ok(m)) => m,
                            _ => break,
                        },
                        _ = sample_tick.tick() => {
                            if !shared.metrics.load(Ordering::Relaxed) {
                                continue;
                            }
                            let Some(frame) = samples.next_frame(&n.name, deflate) else { continue };
                            if ws.send(frame).await.is_err() {
                                break;
                            }
                            continue;
                        }
                    };
                    match m {
                        Message::Ping(_) => {
                            shared.beats.fetch_add(1, Ordering::Relaxed);
                        }
                        Message::Text(t) if t.as_str().starts_with(r#"{"type":"assign""#) => {
                            let now = wall_ms();
                            shared.assigned[i].fetch_max(now, Ordering::Relaxed);
                            // Not parsed: the simulated nodes share this machine's two cores
                            // with the hubs, where real ones parse on their own CPUs.
                            let probe = shared.probe.lock().map(|p| p.clone()).unwrap_or_default();
                            let has =
                                !probe.is_empty() && t.as_str().contains(&format!(r#"{{"spec":{{"name":"{probe}","#));
                            if has && shared.probe_at[i].load(Ordering::Relaxed) == 0 {
                                shared.probe_at[i].store(now, Ordering::Relaxed);
                            }
                        }
                        _ => {}
                    }
                }
            }
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
}

/// What an idle window measured.
struct Window {
    cpu_ticks: u64,
    beats: u64,
    lo_bytes: u64,
    /// The nodes' own (`hubsim::tunnel_bytes`).
    tunnels: Option<u64>,
    /// etcd's figures (database size, writes so far) at the start and at the end.
    etcd: [Option<(f64, f64)>; 2],
    secs: f64,
}

impl Window {
    /// Loopback bytes (both directions once each) per node per minute.
    fn per_node_min(&self, nodes: usize) -> f64 {
        self.rate(self.lo_bytes, nodes)
    }

    /// The nodes' tunnels' bytes per node per minute, where they were counted.
    fn tunnel_per_node_min(&self, nodes: usize) -> Option<f64> {
        Some(self.rate(self.tunnels?, nodes))
    }

    /// `bytes` over the window, per node per minute.
    fn rate(&self, bytes: u64, nodes: usize) -> f64 {
        bytes as f64 / nodes as f64 / self.secs * 60.0
    }
}

/// What etcd's `/metrics` says: its database's size and the writes (puts, deletes) so far.
async fn etcd_figures(c: &reqwest::Client, etcd: &str) -> Option<(f64, f64)> {
    let text = c.get(format!("{etcd}/metrics")).send().await.ok()?.text().await.ok()?;
    let value = |name: &str| -> f64 {
        text.lines()
            .filter(|l| l.starts_with(name) && !l.starts_with('#'))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    Some((value("etcd_mvcc_db_total_size_in_bytes"), value("etcd_mvcc_put_total") + value("etcd_mvcc_delete_total")))
}

/// The orchestrator (see the module's doc).
#[allow(clippy::too_many_arguments)]
pub async fn run(
    admin_conf: &str,
    token: &str,
    nodes: usize,
    per_part: usize,
    hubs: &str,
    pids: &str,
    etcd: &str,
    idle_secs: u64,
    dir: &str,
    metrics: bool,
    repeat: usize,
) -> Result<()> {
    let Conf { admin, plain, .. } = conf(admin_conf, token)?;
    let hub_list: Vec<String> = hubs.split(',').map(String::from).collect();
    let pids: Vec<u32> = pids.split(',').map(|p| p.parse()).collect::<Result<_, _>>().context("HUB_PIDS")?;
    let leader = hub_list.first().context("HUBS")?.clone();
    let dir_p = Path::new(dir).to_path_buf();
    let parts = nodes.div_ceil(per_part.max(1));
    let exe = std::env::current_exe()?;
    let t0 = Instant::now();
    let mut children = vec![];
    for k in 0..parts {
        let first = k * per_part;
        let count = per_part.min(nodes - first);
        let log = std::fs::File::create(dir_p.join(format!("part-{k}.log")))?;
        let child = std::process::Command::new(&exe)
            .args([
                "hub-fleet-part",
                admin_conf,
                token,
                &first.to_string(),
                &count.to_string(),
                hubs,
                dir,
                &k.to_string(),
            ])
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        children.push(child);
    }
    let stop = |children: &mut Vec<std::process::Child>| {
        let _ = std::fs::write(dir_p.join("stop"), "");
        for c in children.iter_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    };
    let result = async {
        let deadline = Instant::now() + Duration::from_secs(3600);
        while (0..parts).any(|k| !dir_p.join(format!("part-{k}.connected")).exists()) {
            if Instant::now() > deadline {
                bail!("not every part connected within an hour");
            }
            if let Some(k) = children.iter_mut().position(|c| matches!(c.try_wait(), Ok(Some(_)))) {
                let log = std::fs::read_to_string(dir_p.join(format!("part-{k}.log"))).unwrap_or_default();
                bail!("simulator part {k} ended: {}", log.lines().next().unwrap_or(""));
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        let connected_s = t0.elapsed().as_secs_f64();
        eprintln!("hub-fleet: {nodes} nodes joined and connected in {connected_s:.0} s");
        // Every node Ready at the hub that leads (its own nodes and the other hubs').
        crate::hubsim::wait_ready(&plain, &leader, &admin, nodes, Duration::from_secs(600)).await?;
        eprintln!("hub-fleet: all Ready at the hub that leads; idle window of {idle_secs} s");
        tokio::time::sleep(Duration::from_secs(10)).await;
        let beats = || -> u64 {
            (0..parts)
                .filter_map(|k| std::fs::read_to_string(dir_p.join(format!("part-{k}.beats"))).ok())
                .filter_map(|t| t.trim().parse::<u64>().ok())
                .sum()
        };
        // An idle window: hub CPU (ticks), pings heard, loopback bytes, etcd's figures.
        let (pids, plain, beats) = (&pids, &plain, &beats);
        let window = |secs: u64| async move {
            let cpu0: u64 = pids.iter().map(|p| cpu_ticks(*p)).sum();
            let (b0, lo0, e0, w0) = (beats(), crate::hubsim::lo_bytes(), etcd_figures(plain, etcd).await, Instant::now());
            let t0 = crate::hubsim::tunnel_bytes();
            tokio::time::sleep(Duration::from_secs(secs)).await;
            let cpu1: u64 = pids.iter().map(|p| cpu_ticks(*p)).sum();
            let (b1, lo1, e1) = (beats(), crate::hubsim::lo_bytes(), etcd_figures(plain, etcd).await);
            let tunnels = crate::hubsim::tunnel_bytes().zip(t0).map(|(b, a)| b - a);
            let (cpu_ticks, beats, lo_bytes, secs) = (cpu1 - cpu0, b1 - b0, lo1 - lo0, w0.elapsed().as_secs_f64());
            Window { cpu_ticks, beats, lo_bytes, tunnels, etcd: [e0, e1], secs }
        };
        let quiet = window(idle_secs).await;
        let rss: Vec<u64> = pids.iter().map(|p| rss_kib(*p) / 1024).collect();
        let cpu_us_per_beat = quiet.cpu_ticks as f64 / 100.0 * 1e6 / quiet.beats.max(1) as f64;
        let (db, writes) = match quiet.etcd {
            [Some((_, w0)), Some((db, w1))] => (db, (w1 - w0) / quiet.secs),
            _ => (f64::NAN, f64::NAN),
        };
        let kbit = |bytes_per_node_min: f64| ((bytes_per_node_min * 8.0 / 60.0 / 1000.0) * 1000.0).round() / 1000.0;
        // The same window with every node shipping samples every 15 s: from after each
        // node's first sample (whole) for whole minutes (still figures go in batches of
        // four, a minute's worth, as deltas).
        let shipping = if metrics {
            std::fs::write(dir_p.join("metrics"), "")?;
            tokio::time::sleep(METRICS_EVERY + Duration::from_secs(5)).await;
            let w = window(idle_secs.div_ceil(60).max(1) * 60).await;
            std::fs::remove_file(dir_p.join("metrics"))?;
            tokio::time::sleep(METRICS_EVERY).await;
            let per_node_min = w.per_node_min(nodes);
            let tunnels = w.tunnel_per_node_min(nodes);
            serde_json::json!({
                "window_s": w.secs.round(),
                "tunnel_bytes_per_node_per_minute": tunnels.map(f64::round),
                "tunnel_kbit_per_s_per_node": tunnels.map(kbit),
                "idle_bytes_per_node_per_minute": per_node_min.round(),
                "idle_kbit_per_s_per_node": kbit(per_node_min),
                "hub_cpu_percent_of_a_core": (w.cpu_ticks as f64 / w.secs).round(),
            })
        } else {
            serde_json::Value::Null
        };
        // Deployments on every node, one after another, each through a hub that does not
        // lead (the last), each armed at every part before it is applied.
        let through = hub_list.last().context("HUBS")?;
        let mut applies = vec![];
        for r in 1..=repeat.max(1) {
            let name = format!("probe-{r}");
            std::fs::write(dir_p.join("probe"), &name)?;
            let armed = |k: usize| dir_p.join(format!("part-{k}.armed.{name}")).exists();
            let deadline = Instant::now() + Duration::from_secs(60);
            while !(0..parts).all(armed) {
                if Instant::now() > deadline {
                    bail!("the parts did not arm {name} within 60 s");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let probe = serde_json::json!({"deployments": [{"name": name, "image": "localhost/none:1", "placement": {"mode": "global"}}], "dry_run": false});
            let applied = wall_ms();
            let r = plain.post(format!("{through}/api/v1/apply")).bearer_auth(&admin).json(&probe).send().await?;
            if !r.status().is_success() {
                bail!("apply: {}", r.text().await?);
            }
            let answered_ms = wall_ms().saturating_sub(applied);
            std::fs::write(dir_p.join(format!("applied.{name}")), applied.to_string())?;
            let deadline = Instant::now() + Duration::from_secs(600);
            let lat_file = |k: usize| dir_p.join(format!("part-{k}.lat.{name}"));
            while (0..parts).any(|k| !lat_file(k).exists()) {
                if Instant::now() > deadline {
                    bail!("not every node got {name} within 600 s");
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            // Each node's latency with the hub it dials (node i: hub i % hubs).
            let mut by_hub: Vec<Vec<f64>> = vec![vec![]; hub_list.len()];
            for k in 0..parts {
                let text = std::fs::read_to_string(lat_file(k))?;
                for (i, l) in text.lines().enumerate() {
                    by_hub[(k * per_part + i) % hub_list.len()].push(l.parse::<f64>()?);
                }
            }
            let mut lat: Vec<f64> = by_hub.iter().flatten().copied().collect();
            lat.sort_by(|a, b| a.total_cmp(b));
            let pct = |v: &[f64], p: f64| crate::hubsim::pct(v, p).round();
            let hubs: Vec<serde_json::Value> = by_hub
                .iter_mut()
                .map(|v| {
                    v.sort_by(|a, b| a.total_cmp(b));
                    serde_json::json!({"first": pct(v, 0.0), "p50": pct(v, 0.5), "max": pct(v, 1.0)})
                })
                .collect();
            applies.push(serde_json::json!({
                "apply_answered_ms": answered_ms,
                "p50": pct(&lat, 0.5), "p99": pct(&lat, 0.99), "max": pct(&lat, 1.0), "nodes": lat.len(),
                "by_hub": hubs,
            }));
        }
        let quiet_per_node_min = quiet.per_node_min(nodes);
        let out = serde_json::json!({
            "nodes": nodes,
            "hubs": hub_list.len(),
            "sim_processes": parts,
            "joined_and_connected_s": connected_s.round(),
            "hub_rss_mib": rss,
            "hub_rss_total_mib": rss.iter().sum::<u64>(),
            "idle_window_s": quiet.secs.round(),
            "heartbeats_in_window": quiet.beats,
            "hub_cpu_us_per_node_heartbeat": cpu_us_per_beat.round(),
            "idle_bytes_per_node_per_minute": quiet_per_node_min.round(),
            "idle_kbit_per_s_per_node": kbit(quiet_per_node_min),
            "tunnel_bytes_per_node_per_minute": quiet.tunnel_per_node_min(nodes).map(f64::round),
            "tunnel_kbit_per_s_per_node": quiet.tunnel_per_node_min(nodes).map(kbit),
            "with_metrics_every_15s": shipping,
            "etcd_db_mib": (db / 1048576.0 * 10.0).round() / 10.0,
            "etcd_writes_per_s_idle": (writes * 100.0).round() / 100.0,
            "apply_to_assignment_ms": applies,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        Ok(())
    }
    .await;
    stop(&mut children);
    result
}
