//! Step *health*: each running instance with a health check has one probe task; its
//! results move the instance between starting, healthy and unhealthy (and restart it
//! when the policy says so). Readiness — healthy or unprobed, with its first published
//! TCP port answering — is recorded with the time it began, for updates and rollouts.

use crate::state::InstanceRow;
use crate::supervise::after_probe;
use crate::{blocking, Agent, AgentError};
use skiff_model::{Health, InstanceState};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use tracing::debug;

impl Agent {
    /// Marks running instances ready (healthy if probed, first published TCP port
    /// answering) or not, keeping the time they became ready. Returns whether a port is
    /// worth polling soon: an instance started in the last minute whose port does not
    /// answer yet (later ones are looked at on the resync).
    pub(crate) async fn observe_readiness(&self, now: u64, full: bool) -> Result<bool, AgentError> {
        let ready = |row: &InstanceRow, answers: bool| {
            answers && row.state == InstanceState::Running && matches!(row.health, None | Some(Health::Healthy))
        };
        let mut poll = false;
        for r in self.db(|s| s.instances())? {
            let running = r.state == InstanceState::Running;
            let recent = r.started_at_ms.is_some_and(|t| now.saturating_sub(t) < 60_000);
            let answers = running && (recent || full || self.port_answered(&r)) && self.port_answers(&r).await;
            poll |= running && recent && !answers;
            // Written only on a change, re-checked under the lock (a probe may have moved).
            if ready(&r, answers) == r.ready_since_ms.is_some() {
                continue;
            }
            let id = r.container_id;
            self.update_row(&r.name, |row| {
                let since =
                    if row.container_id == id && ready(row, answers) { row.ready_since_ms.or(Some(now)) } else { None };
                (since != row.ready_since_ms).then(|| row.ready_since_ms = since)
            })?;
        }
        Ok(poll)
    }

    /// Whether the instance's published port answered once (or it has none to ask).
    pub(crate) fn port_answered(&self, r: &InstanceRow) -> bool {
        !r.spec.ports.iter().any(|p| p.protocol == skiff_model::Protocol::Tcp)
            || r.ip.is_none()
            || self.answered.lock().is_ok_and(|a| a.contains(&r.container_id))
    }

    /// Whether the instance's first published TCP port accepts a connection (remembered
    /// per container once it did). Instances without one count as answering.
    pub(crate) async fn port_answers(&self, r: &InstanceRow) -> bool {
        if self.port_answered(r) {
            return true;
        }
        let Some(p) = r.spec.ports.iter().find(|p| p.protocol == skiff_model::Protocol::Tcp) else { return true };
        let Some(ip) = r.ip.as_ref().and_then(|i| i.parse::<Ipv4Addr>().ok()) else { return true };
        let addr = SocketAddr::new(IpAddr::V4(ip), p.container_port);
        let ok = matches!(
            tokio::time::timeout(Duration::from_millis(300), tokio::net::TcpStream::connect(addr)).await,
            Ok(Ok(_))
        );
        if ok {
            if let Ok(mut a) = self.answered.lock() {
                a.insert(r.container_id.clone());
            }
        }
        ok
    }

    pub(crate) fn start_health(self: &Arc<Self>, r: &InstanceRow) {
        let Some(hc) = r.spec.healthcheck.clone() else {
            return;
        };
        let me = Arc::clone(self);
        let name = r.name.clone();
        let id = r.container_id.clone();
        let runtime = r.spec.runtime;
        let started = r.started_at_ms.unwrap_or_else(|| me.now_ms());
        let task = tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(hc.interval_ms)).await;
                let rt = me.runtimes.of(runtime);
                let (id2, argv, timeout) = (id.clone(), hc.argv(), Duration::from_millis(hc.timeout_ms));
                let ok = matches!(blocking(move || rt.exec(&id2, &argv, timeout)).await, Ok(o) if o.code == 0);
                let in_start = me.now_ms() < started + hc.start_period_ms;
                // Read and written under one lock: the reconcile loop writes other fields
                // of the same row meanwhile.
                let changed = me.update_row(&name, |row| {
                    if row.state != InstanceState::Running || row.container_id != id {
                        return None;
                    }
                    let before = row.health;
                    let (health, failures) = after_probe(ok, row.health_failures, hc.retries, in_start, row.health);
                    row.health = health;
                    row.health_failures = failures;
                    Some((before, health))
                });
                let Ok(Some((before, health))) = changed else {
                    return;
                };
                if before != health {
                    if let Some(h) = health {
                        me.event(&name, "Health", &format!("now {h}"));
                    }
                    me.notify.notify_one();
                }
                debug!(instance = %name, ok, "health probe");
            }
        });
        if let Ok(mut m) = self.health.lock() {
            if let Some(old) = m.insert(r.name.clone(), task) {
                old.abort();
            }
        }
    }

    pub(crate) fn stop_health(&self, name: &str) {
        if let Ok(mut m) = self.health.lock() {
            if let Some(h) = m.remove(name) {
                h.abort();
            }
        }
    }
}
