//! `xtask hub-fleet`: many simulated agents spread over several `skiff hub`s of one etcd
//! store, in several processes (one process may hold at most 20,000 open files here).
//!
//! `hub-fleet ADMIN_CONF TOKEN NODES PER_PART HUBS HUB_PIDS ETCD_URL IDLE_SECS DIR`: the
//! orchestrator. Starts `NODES / PER_PART` parts (this program again, `hub-fleet-part`),
//! waits until the hub that leads lists every node Ready, measures an idle window (each
//! hub's RSS and CPU per node heartbeat, etcd's database size and writes per second,
//! loopback bytes per node: agents' tunnels, hubs asking each other, hubs and etcd), then
//! applies a deployment on every node through one hub and prints p50/p99 from the apply
//! until each node holds it. `HUBS` and `HUB_PIDS` are comma-separated, the first hub
//! the one that leads.
//!
//! `hub-fleet-part ADMIN_CONF TOKEN FIRST COUNT HUBS DIR K`: nodes `sim-FIRST` ..
//! `sim-FIRST+COUNT-1`, node i joining through and dialling hub `i % len(HUBS)`, as
//! hub-sim's do (hello, status, the hub's pings). Writes `DIR/part-K.connected` once
//! every node holds its first assignment, `DIR/part-K.beats` (pings so far) every two
//! seconds, and once `DIR/probe` (the apply's wall-clock ms) exists and every node holds
//! the probe, `DIR/part-K.lat` (each node's ms after the apply). Ends when `DIR/stop`
//! exists.

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
    let beats = Arc::new(AtomicU64::new(0));
    let assigned: Arc<Vec<AtomicU64>> = Arc::new((0..count).map(|_| AtomicU64::new(0)).collect());
    let probe_at: Arc<Vec<AtomicU64>> = Arc::new((0..count).map(|_| AtomicU64::new(0)).collect());
    for (i, n) in sims.iter().enumerate() {
        let hub = &hubs[(first + i) % hubs.len()];
        let addr = crate::hubsim::addr_of(hub)?;
        let url = format!("{}/api/v1/nodes/{}/tunnel", hub.replacen("https://", "wss://", 1), n.name);
        let (n, beats, assigned, probe_at) =
            (Arc::clone(n), Arc::clone(&beats), Arc::clone(&assigned), Arc::clone(&probe_at));
        tokio::spawn(async move { tunnel(i, n, addr, url, beats, assigned, probe_at).await });
    }
    let mut connected = false;
    let mut lat_written = false;
    let mut probe: Option<u64> = None;
    loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        if dir.join("stop").exists() {
            return Ok(());
        }
        std::fs::write(dir.join(format!("part-{k}.beats")), beats.load(Ordering::Relaxed).to_string())?;
        if !connected && assigned.iter().all(|a| a.load(Ordering::Relaxed) > 0) {
            connected = true;
            std::fs::write(dir.join(format!("part-{k}.connected")), "")?;
        }
        if probe.is_none() {
            probe = std::fs::read_to_string(dir.join("probe")).ok().and_then(|t| t.trim().parse().ok());
        }
        if let (Some(applied), false) = (probe, lat_written) {
            if probe_at.iter().all(|p| p.load(Ordering::Relaxed) > 0) {
                let lat: Vec<String> =
                    probe_at.iter().map(|p| p.load(Ordering::Relaxed).saturating_sub(applied).to_string()).collect();
                std::fs::write(dir.join(format!("part-{k}.lat")), lat.join("\n"))?;
                lat_written = true;
            }
        }
    }
}

/// One node's tunnel, as hub-sim's: dialled again 5 s after it drops.
async fn tunnel(
    i: usize,
    n: Arc<SimNode>,
    addr: std::net::SocketAddr,
    url: String,
    beats: Arc<AtomicU64>,
    assigned: Arc<Vec<AtomicU64>>,
    probe_at: Arc<Vec<AtomicU64>>,
) {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    // Spread the connects, as nodes that started at different times.
    tokio::time::sleep(Duration::from_millis((i as u64 * 7919) % 20_000)).await;
    loop {
        if let Some(mut ws) = crate::hubsim::dial(i, addr, &url, &n.tls).await {
            let hello = serde_json::json!({"type": "hello", "revision": 0}).to_string();
            let status = serde_json::json!({"type": "status", "status": {}}).to_string();
            if ws.send(Message::Text(hello.into())).await.is_ok() && ws.send(Message::Text(status.into())).await.is_ok()
            {
                while let Some(Ok(m)) = ws.next().await {
                    match m {
                        Message::Ping(_) => {
                            beats.fetch_add(1, Ordering::Relaxed);
                        }
                        Message::Text(t) if t.as_str().starts_with(r#"{"type":"assign""#) => {
                            let now = wall_ms();
                            assigned[i].fetch_max(now, Ordering::Relaxed);
                            // Not parsed: the simulated nodes share this machine's two cores
                            // with the hubs, where real ones parse on their own CPUs.
                            let has = t.as_str().contains(r#"{"spec":{"name":"probe","#);
                            if has && probe_at[i].load(Ordering::Relaxed) == 0 {
                                probe_at[i].store(now, Ordering::Relaxed);
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
        let cpu0: Vec<u64> = pids.iter().map(|p| cpu_ticks(*p)).collect();
        let (b0, lo0, e0, w0) = (beats(), crate::hubsim::lo_bytes(), etcd_figures(&plain, etcd).await, Instant::now());
        tokio::time::sleep(Duration::from_secs(idle_secs)).await;
        let cpu1: Vec<u64> = pids.iter().map(|p| cpu_ticks(*p)).collect();
        let (b1, lo1, e1, secs) =
            (beats(), crate::hubsim::lo_bytes(), etcd_figures(&plain, etcd).await, w0.elapsed().as_secs_f64());
        let rss: Vec<u64> = pids.iter().map(|p| rss_kib(*p) / 1024).collect();
        let beats_n = (b1 - b0).max(1) as f64;
        let cpu_total: u64 = cpu1.iter().zip(&cpu0).map(|(a, b)| a - b).sum();
        let cpu_us_per_beat = cpu_total as f64 / 100.0 * 1e6 / beats_n;
        let bytes_per_node_min = (lo1 - lo0) as f64 / nodes as f64 / secs * 60.0;
        let (db, writes) = match (e0, e1) {
            (Some((_, w0)), Some((db, w1))) => (db, (w1 - w0) / secs),
            _ => (f64::NAN, f64::NAN),
        };
        // A deployment on every node, through a hub that does not lead (the last).
        let through = hub_list.last().context("HUBS")?;
        let probe = serde_json::json!({"deployments": [{"name": "probe", "image": "localhost/none:1", "placement": {"mode": "global"}}], "dry_run": false});
        let applied = wall_ms();
        let r = plain.post(format!("{through}/api/v1/apply")).bearer_auth(&admin).json(&probe).send().await?;
        if !r.status().is_success() {
            bail!("apply: {}", r.text().await?);
        }
        let answered_ms = wall_ms().saturating_sub(applied);
        std::fs::write(dir_p.join("probe"), applied.to_string())?;
        let deadline = Instant::now() + Duration::from_secs(600);
        while (0..parts).any(|k| !dir_p.join(format!("part-{k}.lat")).exists()) {
            if Instant::now() > deadline {
                bail!("not every node got the probe within 600 s");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let mut lat: Vec<f64> = (0..parts)
            .filter_map(|k| std::fs::read_to_string(dir_p.join(format!("part-{k}.lat"))).ok())
            .flat_map(|t| t.lines().filter_map(|l| l.parse::<f64>().ok()).collect::<Vec<_>>())
            .collect();
        lat.sort_by(|a, b| a.total_cmp(b));
        let pct = |p: f64| crate::hubsim::pct(&lat, p).round();
        let out = serde_json::json!({
            "nodes": nodes,
            "hubs": hub_list.len(),
            "sim_processes": parts,
            "joined_and_connected_s": connected_s.round(),
            "apply_answered_ms": answered_ms,
            "hub_rss_mib": rss,
            "hub_rss_total_mib": rss.iter().sum::<u64>(),
            "idle_window_s": secs.round(),
            "heartbeats_in_window": b1 - b0,
            "hub_cpu_us_per_node_heartbeat": cpu_us_per_beat.round(),
            "idle_bytes_per_node_per_minute": bytes_per_node_min.round(),
            "idle_kbit_per_s_per_node": ((bytes_per_node_min * 8.0 / 60.0 / 1000.0) * 1000.0).round() / 1000.0,
            "etcd_db_mib": (db / 1048576.0 * 10.0).round() / 10.0,
            "etcd_writes_per_s_idle": (writes * 100.0).round() / 100.0,
            "apply_to_assignment_ms": {"p50": pct(0.5), "p99": pct(0.99), "max": pct(1.0), "nodes": lat.len()},
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        Ok(())
    }
    .await;
    stop(&mut children);
    result
}
