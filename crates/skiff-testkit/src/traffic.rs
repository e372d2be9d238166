//! A bounded HTTP client loop against a published port on 127.0.0.1: what a user of the
//! service sees during an update. Each request is a fresh HTTP/1.0 connection, so every
//! one passes through the node proxy's choice of instance.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// One request: when it started (since the loop began), how long it took and its body
/// (`Err` with the failure).
#[derive(Debug, Clone)]
pub struct Sample {
    pub at: Duration,
    pub took: Duration,
    pub body: Result<String, String>,
}

pub struct Traffic {
    stop: Arc<AtomicBool>,
    samples: Arc<Mutex<Vec<Sample>>>,
    thread: Option<JoinHandle<()>>,
}

/// Summary of a run.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    pub sent: usize,
    pub failed: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// The first few failures, for messages.
    pub failures: Vec<String>,
}

fn get(port: u16, path: &str) -> Result<String, String> {
    let mut s = TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_secs(5))
        .map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10))).map_err(|e| e.to_string())?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").map_err(|e| format!("send: {e}"))?;
    let mut out = String::new();
    s.read_to_string(&mut out).map_err(|e| format!("read: {e}"))?;
    let (head, body) = out.split_once("\r\n\r\n").ok_or_else(|| format!("no HTTP response: {out:?}"))?;
    if !head.starts_with("HTTP/1.0 200") && !head.starts_with("HTTP/1.1 200") {
        return Err(format!("status: {}", head.lines().next().unwrap_or_default()));
    }
    Ok(body.to_string())
}

impl Traffic {
    /// Sends requests to `127.0.0.1:port` one after another, pausing `gap` between
    /// them, until stopped, `max` requests or `limit` time.
    pub fn start(port: u16, path: &str, gap: Duration, max: usize, limit: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let samples = Arc::new(Mutex::new(Vec::new()));
        let (stop2, samples2, path) = (Arc::clone(&stop), Arc::clone(&samples), path.to_string());
        let thread = std::thread::spawn(move || {
            let begin = Instant::now();
            for _ in 0..max {
                if stop2.load(Ordering::Relaxed) || begin.elapsed() > limit {
                    break;
                }
                let t = Instant::now();
                let body = get(port, &path);
                let s = Sample { at: t - begin, took: t.elapsed(), body };
                if let Ok(mut v) = samples2.lock() {
                    v.push(s);
                }
                std::thread::sleep(gap);
            }
        });
        Traffic { stop, samples, thread: Some(thread) }
    }

    /// The samples so far.
    pub fn samples(&self) -> Vec<Sample> {
        self.samples.lock().map(|v| v.clone()).unwrap_or_default()
    }

    /// Stops the loop and returns every sample.
    pub fn finish(mut self) -> Vec<Sample> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.samples()
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

pub fn report(samples: &[Sample]) -> Report {
    let mut ms: Vec<f64> = samples.iter().map(|s| s.took.as_secs_f64() * 1000.0).collect();
    ms.sort_by(f64::total_cmp);
    let q = |p: f64| if ms.is_empty() { 0.0 } else { ms[((ms.len() - 1) as f64 * p).round() as usize] };
    let failures: Vec<String> = samples
        .iter()
        .filter_map(|s| s.body.as_ref().err().map(|e| format!("at {:.3} s: {e}", s.at.as_secs_f64())))
        .collect();
    Report {
        sent: samples.len(),
        failed: failures.len(),
        p50_ms: q(0.5),
        p99_ms: q(0.99),
        max_ms: ms.last().copied().unwrap_or(0.0),
        failures: failures.into_iter().take(5).collect(),
    }
}
