//! Step *stop*: an instance leaves its ports first (connections drain for up to 5 s),
//! then gets its stop signal, the grace period and SIGKILL; then what was made for it is
//! removed (bundle, rootfs, network namespace, address lease) and its row deleted. Stops
//! run in the background, one per instance.

use crate::state::InstanceRow;
use crate::{blocking, Agent, AgentError, DRAIN, HELD};
use skiff_image::Target;
use skiff_model::proto::InstanceAction;
use skiff_model::InstanceState;
use skiff_runtime::{Liveness, Runtime};
use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;
use tracing::{info, warn};

impl Agent {
    /// Stops and removes `r` in the background (once), first taking it off the ports
    /// and waiting for its open connections to finish.
    /// `skiff restart|stop|start INSTANCE` on this node: checked now, carried out at the
    /// start of the next pass (see [`Agent::carry_out_requests`]).
    /// - restart: its container gets its stop signal and grace period and starts again
    ///   at once from the instance's own spec (an old version stays the old version);
    /// - stop: the same, and it is held stopped, whatever its restart policy, until
    ///   `start` (or an update replaces it);
    /// - start: one held stopped runs again.
    pub fn act_on(self: &Arc<Self>, instance: &str, action: InstanceAction) -> Result<(), AgentError> {
        let r = self.row(instance)?;
        if r.retiring {
            return Err(AgentError::Other(format!(
                "{instance} is an old instance kept while its replacement starts: it is not acted on"
            )));
        }
        let stopping = self.stopping.lock().map(|s| s.contains(&r.container_id)).unwrap_or(false);
        if stopping {
            return Err(AgentError::Other(format!("{instance} is being stopped and removed already")));
        }
        let (what, message) = match action {
            InstanceAction::Restart => ("Restarting", "restart requested"),
            InstanceAction::Stop => ("Stopping", "stop requested"),
            InstanceAction::Start => ("Starting", "start requested"),
        };
        self.event(instance, what, message);
        if let Ok(mut q) = self.requests.lock() {
            q.push((r.name, r.container_id, action));
        }
        self.notify.notify_one();
        Ok(())
    }

    /// Carries out the operators' requests on single instances, first in a pass (no row
    /// the pass read is changed under it). A request whose instance was replaced or
    /// renamed since it was made is dropped.
    pub(crate) fn carry_out_requests(self: &Arc<Self>, now: u64) -> Result<(), AgentError> {
        let requests = self.requests.lock().map(|mut q| std::mem::take(&mut *q)).unwrap_or_default();
        for (name, id, action) in requests {
            let Some(mut r) = self.db(|s| s.instance(&name))? else { continue };
            if r.container_id != id || r.retiring {
                continue;
            }
            let running = r.state == InstanceState::Running;
            // One not running has nothing to end: held now, or due now.
            let due_now = |r: &mut InstanceRow, why: &str| {
                r.state = InstanceState::Restarting;
                r.next_start_ms = Some(now);
                r.message = Some(why.into());
            };
            match action {
                InstanceAction::Stop => {
                    r.held = true;
                    if !running {
                        r.state = InstanceState::Exited;
                        r.next_start_ms = None;
                        r.message = Some(HELD.into());
                    }
                }
                InstanceAction::Restart => {
                    r.held = false;
                    r.restart_requested = running;
                    if !running {
                        due_now(&mut r, "restarted by request");
                    }
                }
                InstanceAction::Start if !r.held => continue,
                InstanceAction::Start => {
                    r.held = false;
                    if !running {
                        due_now(&mut r, "started by request");
                    }
                }
            }
            self.db(|s| s.put_instance(&r))?;
            if running && action != InstanceAction::Start {
                // Its exit is seen as any exit is, and `on_exit` reads the marks.
                let me = Arc::clone(self);
                tokio::spawn(async move {
                    me.end_container(&r).await;
                    me.notify.notify_one();
                });
            }
        }
        Ok(())
    }

    pub(crate) fn spawn_stop(self: &Arc<Self>, r: &InstanceRow, stopping: &HashSet<String>, drop_image: bool) {
        if stopping.contains(&r.container_id) {
            return;
        }
        if let Ok(mut s) = self.stopping.lock() {
            if !s.insert(r.container_id.clone()) {
                return;
            }
        }
        let me = Arc::clone(self);
        let r = r.clone();
        tokio::spawn(async move {
            if let Err(e) = me.sync_hosts_and_ports().await {
                warn!(instance = %r.name, error = %e, "taking the instance off its ports");
            }
            me.drain(&r).await;
            me.stop_and_remove(&r).await;
            if drop_image {
                me.drop_unused_image(&r.spec.image);
            }
            if let Ok(mut s) = me.stopping.lock() {
                s.remove(&r.container_id);
            }
            me.notify.notify_one();
        });
    }

    /// Waits (at most `DRAIN`) until no published port holds a connection to the instance:
    /// the proxy's, and the kernel's (counted in the host's connection table).
    pub(crate) async fn drain(&self, r: &InstanceRow) {
        let Some(ip) = r.ip.as_ref().and_then(|i| i.parse::<IpAddr>().ok()) else { return };
        if r.spec.ports.is_empty() {
            return;
        }
        let (active, kernel) = {
            let ports = self.ports.lock().await;
            (ports.proxies.active(), ports.kernel.is_some())
        };
        let deadline = tokio::time::Instant::now() + DRAIN;
        while tokio::time::Instant::now() < deadline {
            // A table that cannot be read counts as drained, said once.
            let forwarded = if kernel {
                match blocking(move || skiff_runtime::conntrack::forwarded_to(ip)).await {
                    Ok(n) => n,
                    Err(e) => {
                        warn!(instance = %r.name, error = %e, "reading the connection table: not draining");
                        0
                    }
                }
            } else {
                0
            };
            if active.count(ip) == 0 && forwarded == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(if kernel { 100 } else { 25 })).await;
        }
    }

    /// The container's stop signal (SIGTERM or the image's), its grace period, then
    /// SIGKILL; returns once it has exited (or the kill's wait is over).
    pub(crate) async fn end_container(&self, r: &InstanceRow) {
        self.stop_health(&r.name);
        let id = r.container_id.clone();
        let rt = self.runtimes.of(r.spec.runtime);
        let grace = Duration::from_millis(r.spec.stop_grace_period_ms);
        if r.state == InstanceState::Running {
            let sig = self
                .images
                .inspect_for(&r.spec.image, Target::from(r.spec.runtime))
                .ok()
                .and_then(|i| i.config.stop_signal)
                .unwrap_or_else(|| "TERM".into());
            let (rt2, id2) = (Arc::clone(&rt), id.clone());
            let _ = blocking(move || rt2.signal(&id2, sig.trim_start_matches("SIG"))).await;
            if !self.wait_exit(&rt, &id, grace).await {
                info!(instance = %r.name, "grace period over, killing");
                let (rt2, id2) = (Arc::clone(&rt), id.clone());
                let _ = blocking(move || rt2.signal(&id2, "KILL")).await;
                self.wait_exit(&rt, &id, Duration::from_secs(10)).await;
            }
        }
    }

    /// SIGTERM (or the image's stop signal), the grace period, SIGKILL; then removes the
    /// container, its network namespace and its record.
    pub(crate) async fn stop_and_remove(self: &Arc<Self>, r: &InstanceRow) {
        self.end_container(r).await;
        let id = r.container_id.clone();
        let rt = self.runtimes.of(r.spec.runtime);
        let id2 = id.clone();
        if let Err(e) = blocking(move || rt.remove(&id2)).await {
            warn!(instance = %r.name, error = %e, "removing container");
        }
        let (me, ns) = (Arc::clone(self), self.netns_name(&id));
        // Only an instance with published ports can have DNAT'd flows to forget.
        let kernel_ports = !r.spec.ports.is_empty() && self.ports.lock().await.kernel.is_some();
        let ip = r.ip.as_ref().and_then(|i| i.parse::<IpAddr>().ok());
        // Never the flows of an address another instance holds now.
        let shared = self
            .db(|s| s.instances())
            .is_ok_and(|rows| rows.iter().any(|o| o.container_id != r.container_id && o.ip.is_some() && o.ip == r.ip));
        let ip = ip.filter(|_| !shared);
        let name = r.name.clone();
        blocking(move || {
            me.lan_forget(&ns);
            me.bridge.detach(&ns);
            // Flows a published port's DNAT pointed at the address go with it (a steady
            // UDP client would otherwise keep sending to whoever leases it next).
            if let (true, Some(ip)) = (kernel_ports, ip) {
                match skiff_runtime::conntrack::forget_forwarded_to(ip) {
                    Ok(0) => {}
                    Ok(n) => info!(instance = %name, %ip, flows = n, "forgot the address's forwarded flows"),
                    Err(e) => warn!(%ip, error = %e, "forgetting the address's forwarded flows"),
                }
            }
        })
        .await;
        self.exits.forget(&id);
        if let Ok(mut h) = self.hosts_written.lock() {
            h.remove(&id);
        }
        let _ = self.db(|s| s.delete_instance(&r.name));
        // A later container may get the same id (the same template again).
        for set in [&self.answered, &self.update_failed] {
            if let Ok(mut s) = set.lock() {
                s.remove(&id);
            }
        }
        self.event(&r.name, "Removed", "stopped and removed");
    }

    pub(crate) async fn wait_exit(&self, rt: &Arc<dyn Runtime>, id: &str, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        while tokio::time::Instant::now() < deadline {
            let rt = Arc::clone(rt);
            let id2 = id.to_string();
            match blocking(move || rt.liveness(&id2)).await {
                Liveness::Running { .. } => tokio::time::sleep(Duration::from_millis(100)).await,
                _ => return true,
            }
        }
        false
    }
}
