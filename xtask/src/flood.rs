//! `xtask flood ADMIN_CONF CONNS SAMPLES`: the hub's admin latency, alone and under a
//! bounded flood from loopback (`bench/flood`). The admin is the CLI's request: a fresh
//! TLS connection from 127.0.0.1 and `GET /api/v1/nodes` with the admin token. The flood,
//! from 127.0.0.2 and 127.0.0.3, is what an attacker on the network does without
//! credentials: CONNS connections opened and left idle (the first bytes of a TLS hello,
//! as slowloris does), plus 64 clients each asking for the health endpoint on a fresh
//! connection every 10 ms (up to 6400 attempts a second).
//! Prints p50/p99 of SAMPLES admin requests without and with the flood, and how the
//! flood fared (connections held open at the end, requests answered).

use anyhow::{Context, Result};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;

fn client(ca: &str, from: [u8; 4]) -> Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(ca.as_bytes())?)
        .local_address(std::net::IpAddr::from(from))
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(30))
        .build()?)
}

/// SAMPLES admin requests one after another; their latencies in ms (failed: 30 000).
async fn admin(server: &str, ca: &str, token: &str, samples: usize) -> Result<Vec<f64>> {
    let mut out = vec![];
    for _ in 0..samples {
        let c = client(ca, [127, 0, 0, 1])?;
        let t = Instant::now();
        let ok = c
            .get(format!("{server}/api/v1/nodes"))
            .bearer_auth(token)
            .send()
            .await
            .is_ok_and(|r| r.status().is_success());
        out.push(if ok { t.elapsed().as_secs_f64() * 1000.0 } else { 30_000.0 });
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(out)
}

fn pct(v: &[f64], p: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s[((s.len() as f64 - 1.0) * p).round() as usize]
}

pub async fn run(conf: &str, conns: usize, samples: usize) -> Result<()> {
    let conf: serde_json::Value = serde_json::from_slice(&std::fs::read(conf)?)?;
    let server = conf["server"].as_str().context("server")?.to_string();
    let ca = conf["ca"].as_str().context("ca")?.to_string();
    let token = conf["token"].as_str().context("token")?.to_string();
    let addr: std::net::SocketAddr = server.trim_start_matches("https://").parse()?;

    let quiet = admin(&server, &ca, &token, samples).await?;

    // The flood: idle connections, then a request storm, both bounded.
    let stop = Arc::new(AtomicBool::new(false));
    let mut held = vec![];
    for _ in 0..conns {
        let sock = tokio::net::TcpSocket::new_v4()?;
        sock.bind(std::net::SocketAddr::from(([127, 0, 0, 2], 0)))?;
        if let Ok(mut s) = sock.connect(addr).await {
            let _ = s.write_all(b"\x16\x03\x01").await; // the first bytes of a TLS hello, and no more
            held.push(s);
        }
    }
    let answered = Arc::new(AtomicU64::new(0));
    let mut storm = vec![];
    for _ in 0..64 {
        let (c, server, stop, answered) =
            (client(&ca, [127, 0, 0, 3])?, server.clone(), Arc::clone(&stop), Arc::clone(&answered));
        storm.push(tokio::spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(600);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                if c.get(format!("{server}/api/v1/health")).send().await.is_ok() {
                    answered.fetch_add(1, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let t0 = Instant::now();
    let flooded = admin(&server, &ca, &token, samples).await?;
    let storm_secs = t0.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for s in storm {
        let _ = s.await;
    }
    // How many of the idle connections the hub still holds open.
    let mut open = 0;
    for s in &held {
        let mut b = [0u8; 1];
        match s.try_read(&mut b) {
            Ok(0) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => open += 1,
            _ => {}
        }
    }
    let failed = flooded.iter().filter(|l| **l >= 30_000.0).count();
    println!(
        "admin GET /api/v1/nodes, {samples} requests: alone p50 {:.1} ms p99 {:.1} ms; under flood p50 {:.1} ms p99 {:.1} ms ({:.2}x p99), {failed} failed",
        pct(&quiet, 0.5),
        pct(&quiet, 0.99),
        pct(&flooded, 0.5),
        pct(&flooded, 0.99),
        pct(&flooded, 0.99) / pct(&quiet, 0.99).max(0.001),
    );
    println!(
        "flood: {} idle connections opened from 127.0.0.2, {open} still held open by the hub; 64 clients from 127.0.0.3 got {} answers in {:.1} s",
        held.len(),
        answered.load(Ordering::Relaxed),
        storm_secs
    );
    Ok(())
}
