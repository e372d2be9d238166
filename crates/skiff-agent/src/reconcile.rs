//! The reconcile loop and its pass. `run` adopts what the node already runs, then
//! reconciles whenever something happened (an exit, a new desired state, a health
//! change, a finished pull or stop, a due start) and on its timers (samples, image GC,
//! the resync safety net).
//!
//! Contract of one pass (`reconcile`): instances of deployments no longer desired are
//! stopped; running instances whose shim ended are recorded as exited (and scheduled for
//! restart by their policy); readiness is brought up to date; the update planner decides,
//! per deployment, which old instances stay, retire or stop and which serve the ports;
//! every slot without an instance gets a Pending row; every due start whose dependencies
//! are met is started; hosts and published ports follow. A pass writes `agent.db` before
//! it acts, so a pass interrupted anywhere is finished by the next.

use crate::state::InstanceRow;
use crate::supervise::{unmet_dependency, Peer};
use crate::{blocking, rebuild, slot_of, update, Agent, AgentError};
use skiff_image::Target;
use skiff_model::rollout;
use skiff_model::{Deployment, InstanceState, NetworkMode, RuntimeKind};
use skiff_runtime::network::list_netns;
use skiff_runtime::Liveness;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use tracing::{debug, info, warn};

/// What a pass leaves for the loop to wait on.
pub(crate) struct Pass {
    /// When the next delayed start (restart back-off, pull retry) is due.
    pub(crate) next_start_ms: Option<u64>,
    /// Whether something must be polled soon (a new instance's port not answering yet).
    pub(crate) poll: bool,
}

impl Agent {
    /// Re-adopts what survived, removes leftovers, then reconciles until `shutdown`.
    pub async fn run(self: Arc<Self>, mut shutdown: tokio::sync::watch::Receiver<bool>) -> Result<(), AgentError> {
        self.adopt().await?;
        tokio::spawn(Arc::clone(&self).scrape_loop(shutdown.clone()));
        let start = tokio::time::Instant::now();
        let (mut next_gc, mut next_sample, mut next_resync) = (start, start, start + self.cfg.resync);
        loop {
            let now = tokio::time::Instant::now();
            if now >= next_gc {
                next_gc = now + self.cfg.image_gc_every;
                self.prune_images().await;
                self.prune_anonymous_volumes().await;
                let freed = self.prune_wasm_cache().await;
                if freed > 0 {
                    debug!(freed, "compiled wasm programs removed");
                }
            }
            if now >= next_sample {
                next_sample = now + self.cfg.metrics_every;
                let me = Arc::clone(&self);
                if let Err(e) = blocking(move || me.sample_metrics()).await {
                    warn!(error = %e, "sampling metrics failed");
                }
            }
            let full = now >= next_resync;
            if full {
                next_resync = now + self.cfg.resync;
            }
            // Sleep until the first of: the next due start, the next poll if something
            // must be polled, the periodic work; an event (exit, new desired state, health
            // change, finished pull or stop) wakes the loop before that.
            let mut due = next_gc.min(next_sample).min(next_resync);
            match self.reconcile(full).await {
                Ok(pass) => {
                    if let Some(at) = pass.next_start_ms {
                        let after = self.cfg.clock.until(at);
                        due = due.min(tokio::time::Instant::now() + after);
                    }
                    if pass.poll || self.exits.any_unwatched() {
                        due = due.min(tokio::time::Instant::now() + self.cfg.poll);
                    }
                }
                Err(e) => {
                    warn!(error = %e, "reconcile failed");
                    due = due.min(tokio::time::Instant::now() + self.cfg.poll);
                }
            }
            tokio::select! {
                _ = self.notify.notified() => {}
                _ = tokio::time::sleep_until(due) => {}
                _ = shutdown.changed() => break,
            }
            if *shutdown.borrow() {
                break;
            }
        }
        for (_, h) in self.health.lock().map(|mut m| std::mem::take(&mut *m)).unwrap_or_default() {
            h.abort();
        }
        self.exits.clear();
        self.remove_nat_if_unused().await;
        Ok(())
    }

    /// On shutdown the NAT rules go, unless instances on the bridge outlive the agent
    /// (they keep reaching the outside while it is away).
    async fn remove_nat_if_unused(self: &Arc<Self>) {
        if self.cfg.firewall.firewall.is_none() {
            return;
        }
        let nat = self.nat.clone();
        let on_bridge = self.db(|s| s.instances()).map(|rows| {
            rows.iter().any(|r| r.state == InstanceState::Running && r.spec.network == NetworkMode::Bridge)
        });
        match on_bridge {
            Ok(false) => blocking(move || nat.remove()).await,
            Ok(true) => info!(bridge = %nat.bridge, "instances on the bridge keep running: its NAT rules stay"),
            Err(e) => warn!(error = %e, "NAT rules left in place"),
        }
    }

    pub(crate) async fn adopt(self: &Arc<Self>) -> Result<(), AgentError> {
        let (bridge, nat, setting) = (self.bridge.clone(), self.nat.clone(), self.cfg.firewall);
        // Whether the node's firewall rules are ours: then the kernel forwards published ports.
        let firewall = blocking(move || -> Result<bool, AgentError> {
            bridge.ensure()?;
            if setting.firewall.is_none() {
                nat.remove();
                return Ok(false);
            }
            match nat.ensure() {
                Ok(()) => Ok(true),
                // Asked for by name: the operator wants NAT or no agent.
                Err(e) if setting.explicit => {
                    Err(AgentError::Other(format!("outbound NAT: {e} (--firewall none runs without it)")))
                }
                Err(e) => {
                    warn!(error = %e, "outbound NAT not set up: instances on the bridge reach only this host");
                    Ok(false)
                }
            }
        })
        .await?;
        if firewall {
            self.ports.lock().await.kernel.get_or_insert_with(Default::default);
        }
        let _ = self.images.clean_tmp();
        let rows = self.db(|s| s.instances())?;
        if firewall && skiff_runtime::nat::found("nft") {
            let me = Arc::clone(self);
            let running = rows.clone();
            if let Err(e) = blocking(move || me.open_lan(&running)).await {
                if self.cfg.firewall.explicit {
                    return Err(e);
                }
                warn!(error = %e, "networks on the bridge not enforced: stacks can reach each other");
            }
        } else if firewall {
            warn!("nft is not installed: networks on the bridge are not enforced (stacks can reach each other)");
        }
        let mine: HashSet<String> = rows.iter().map(|r| r.container_id.clone()).collect();
        let prefix = format!("{}-", self.node_id);
        for kind in RuntimeKind::ALL {
            let rt = self.runtimes.of(kind);
            let leftovers: Vec<String> =
                rt.known().into_iter().filter(|id| id.starts_with(&prefix) && !mine.contains(id)).collect();
            for id in leftovers {
                info!(container = %id, runtime = %kind, "removing leftover instance");
                let rt = Arc::clone(&rt);
                let _ = blocking(move || rt.remove(&id)).await;
            }
        }
        let ns_prefix = format!("skiff-{}-", self.node_id);
        for ns in list_netns(&ns_prefix) {
            // Not a row's: never in the network table (built from rows), only its veth to go.
            if !mine.iter().any(|id| self.netns_name(id) == ns) {
                self.bridge.detach(&ns);
            }
        }
        for r in rows.iter().filter(|r| r.state == InstanceState::Running) {
            let rt = self.runtimes.of(r.spec.runtime);
            let id = r.container_id.clone();
            if let Liveness::Running { pid } = blocking(move || rt.liveness(&id)).await {
                info!(instance = %r.name, pid, "re-adopted running instance");
                if pid > 0 && r.pid != Some(pid) {
                    // A rebuilt row has no pid yet; watched from here, it is not asked again.
                    let name = r.name.clone();
                    self.update_row(&name, |row| (row.pid != Some(pid)).then(|| row.pid = Some(pid)))?;
                }
                self.start_health(r);
                self.watch_exit(r).await;
            }
        }
        Ok(())
    }

    /// One pass. `full` looks at every running instance; otherwise only at those whose
    /// shim ended or cannot be watched.
    pub(crate) async fn reconcile(self: &Arc<Self>, full: bool) -> Result<Pass, AgentError> {
        let now = self.now_ms();
        self.carry_out_requests(now)?;
        let desired_slots = self.db(|s| s.desired_slots())?;
        let desired: BTreeMap<&str, (&Deployment, &Vec<u32>)> =
            desired_slots.iter().map(|(d, i)| (d.name.as_str(), (d, i))).collect();
        let rows = self.db(|s| s.instances())?;
        let stopping: HashSet<String> = self.stopping.lock().map(|s| s.clone()).unwrap_or_default();

        // Instances of deployments this node no longer runs.
        for r in rows.iter().filter(|r| !desired.contains_key(r.deployment.as_str())) {
            self.spawn_stop(r, &stopping, false);
        }
        // Those just handed to a stop are not observed below: a stop that ended meanwhile
        // has deleted the row, and recording its exit would bring the row back.
        let stopping: HashSet<String> = self.stopping.lock().map(|s| s.clone()).unwrap_or_default();

        // Observe running instances: those whose shim ended (or is not watched).
        for r in rows.iter().filter(|r| r.state == InstanceState::Running && !stopping.contains(&r.container_id)) {
            if !full && self.exits.quiet(&r.container_id) {
                continue;
            }
            let rt = self.runtimes.of(r.spec.runtime);
            let id = r.container_id.clone();
            let live = blocking(move || rt.liveness(&id)).await;
            if !matches!(live, Liveness::Running { .. }) {
                self.exits.forget(&r.container_id);
            }
            match live {
                Liveness::Running { pid } => {
                    if pid > 0 && r.pid != Some(pid) {
                        let mut r = r.clone();
                        r.pid = Some(pid);
                        self.db(|s| s.put_instance(&r))?;
                    }
                    if !self.exits.quiet(&r.container_id) {
                        self.watch_exit(r).await;
                    }
                }
                Liveness::Exited(exit) => {
                    let r = self.on_exit(r.clone(), exit, now, None);
                    self.db(|s| s.put_instance(&r))?;
                }
                Liveness::Gone => {
                    let exit = skiff_model::ExitStatus {
                        code: 255,
                        signal: None,
                        oom_killed: false,
                        finished_at_ms: now,
                        message: None,
                    };
                    let cause = "container lost (node rebooted or its shim was killed)";
                    let r = self.on_exit(r.clone(), exit, now, Some(("Lost", cause)));
                    self.db(|s| s.put_instance(&r))?;
                }
            }
        }
        let mut poll = self.observe_readiness(now, full).await?;

        // An instance sharing another's network that was replaced (an update) or is gone
        // starts again, in the new one: it would sit unreachable in the old.
        let rows = self.db(|s| s.instances())?;
        let shares = |r: &&InstanceRow| r.state == InstanceState::Running && r.spec.network == NetworkMode::Service;
        for r in rows.iter().filter(shares).filter(|r| !stopping.contains(&r.container_id)) {
            if !self.still_joined(r) {
                let other = r.spec.network_service.as_deref().unwrap_or_default();
                self.event(
                    &r.name,
                    "NetworkReplaced",
                    &format!("{other}'s network was replaced or is gone: starting again"),
                );
                self.spawn_stop(r, &stopping, false);
            }
        }

        // Jobs: their own controller (runs, schedules, limits), not the update planner.
        let rows = self.db(|s| s.instances())?;
        let mut job_wake: Option<u64> = None;
        let mut job_create: HashSet<&str> = HashSet::new();
        for (name, (d, slots)) in &desired {
            let Some(job) = &d.job else { continue };
            // One job that cannot be run (a time zone this node does not know) stops
            // only itself.
            let step = match self.step_job(d, job, slots, &rows, &stopping, now) {
                Ok(step) => step,
                Err(e) => {
                    if self.job_errors.lock().is_ok_and(|mut seen| seen.insert(format!("{name}: {e}"))) {
                        self.event(name, "JobError", &e.to_string());
                    }
                    continue;
                }
            };
            if step.create {
                job_create.insert(name);
            }
            job_wake = job_wake.into_iter().chain(step.wake_ms).min();
        }
        let jobs_here: HashSet<&str> =
            desired.values().filter(|(d, _)| d.job.is_some()).map(|(d, _)| d.name.as_str()).collect();
        self.forget_jobs(&jobs_here)?;

        // Updates: which old instances stay beside their replacements, which stop, and
        // which serve the published ports.
        let rows = self.db(|s| s.instances())?;
        let mut serving = HashMap::new();
        for (name, (d, slots)) in desired.iter().filter(|(_, (d, _))| d.job.is_none()) {
            let wanted = rollout::template_hash(d);
            let insts: Vec<update::Inst> = rows
                .iter()
                .filter(|r| r.deployment == *name)
                .filter_map(|r| {
                    let tpl = rollout::template_hash(&r.spec);
                    Some(update::Inst {
                        name: r.name.clone(),
                        slot: slot_of(r)?,
                        tag: tpl[..6].to_string(),
                        current: tpl == wanted,
                        retiring: r.retiring,
                        state: r.state,
                        health: r.health,
                        restarts: r.restarts,
                        ready_since_ms: r.ready_since_ms,
                        retire_at_ms: r.retire_at_ms,
                        stopping: stopping.contains(&r.container_id),
                    })
                })
                .collect();
            let image_present = self.images.inspect_for(&d.image, Target::from(d.runtime)).is_ok();
            let inp = update::Input {
                deployment: name,
                cfg: &d.update,
                slots,
                image_present,
                now,
                stateful: d.stateful.is_some(),
                ordered: d.ordered(),
            };
            let plan = update::plan(&inp, &insts);
            // Serving names as they are once renames below are done.
            let mut names = plan.serving;
            for a in &plan.actions {
                if let update::Action::Retire { name, to } | update::Action::Promote { name, to } = a {
                    names.iter_mut().filter(|n| *n == name).for_each(|n| n.clone_from(to));
                }
            }
            serving.insert(name.to_string(), names);
            for a in plan.actions {
                self.act(d, a, &rows, &stopping)?;
            }
        }
        let changed = match self.serving.lock() {
            Ok(mut s) => {
                let changed = s.as_ref() != Some(&serving);
                *s = Some(serving);
                changed
            }
            Err(_) => false,
        };
        // Who serves changed without a row changing (an instance just judged ready): its
        // watchers (the fleet services' catalog, the published ports) look again now, not
        // at their next tick, when other nodes may already send it calls.
        if changed {
            self.changes.send_modify(|_| {});
        }

        // Create rows for slots without a primary instance.
        let rows = self.db(|s| s.instances())?;
        for (d, slots) in desired.values().filter(|(d, _)| d.job.is_none() || job_create.contains(d.name.as_str())) {
            for row in missing_primaries(d, slots, &rows, |name, tpl| self.container_id(name, tpl)) {
                self.db(|s| s.put_instance(&row))?;
            }
        }

        // Start what is due and allowed.
        let stopping: HashSet<String> = self.stopping.lock().map(|s| s.clone()).unwrap_or_default();
        let rows = self.db(|s| s.instances())?;
        // A job's instances running now (or between runs), for its parallelism.
        let mut active: HashMap<String, u32> = HashMap::new();
        for r in rows.iter().filter(|r| matches!(r.state, InstanceState::Running | InstanceState::Restarting)) {
            *active.entry(r.deployment.clone()).or_default() += 1;
        }
        for r in &rows {
            let due = matches!(r.state, InstanceState::Pending | InstanceState::Restarting)
                && r.next_start_ms.is_none_or(|t| t <= now);
            if !due || r.held || stopping.contains(&r.container_id) || !desired.contains_key(r.deployment.as_str()) {
                continue;
            }
            if let Some(job) = &r.spec.job {
                let n = active.get(&r.deployment).copied().unwrap_or(0);
                if let Some(wait) = crate::jobs::may_start(job, r, n) {
                    if r.message.as_deref() != Some(&wait) {
                        let mut r = r.clone();
                        r.message = Some(wait);
                        self.db(|s| s.put_instance(&r))?;
                    }
                    continue;
                }
                if r.state == InstanceState::Pending {
                    *active.entry(r.deployment.clone()).or_default() += 1;
                }
            }
            if let Some((wait, soon)) =
                desired.get(r.deployment.as_str()).and_then(|(d, slots)| before_it(d, slots, r, &rows, now))
            {
                poll |= soon;
                if r.message.as_deref() != Some(&wait) {
                    let mut r = r.clone();
                    r.message = Some(wait);
                    self.db(|s| s.put_instance(&r))?;
                }
                continue;
            }
            let peers: Vec<Peer<'_>> = rows
                .iter()
                .filter(|p| p.spec.stack == r.spec.stack)
                .map(|p| Peer {
                    deployment: &p.deployment,
                    state: p.state,
                    health: p.health,
                    has_healthcheck: p.spec.healthcheck.is_some(),
                    exit_code: p.exit_code,
                })
                .collect();
            let network = match r.spec.network {
                NetworkMode::Service => self.joined_network(r).err().map(|e| e.to_string()),
                _ => None,
            };
            if let Some(wait) = network.or_else(|| unmet_dependency(&r.spec, &peers)) {
                if r.message.as_deref() != Some(&wait) {
                    let mut r = r.clone();
                    r.message = Some(wait);
                    self.db(|s| s.put_instance(&r))?;
                }
                continue;
            }
            self.start_instance(r.clone()).await?;
        }

        if full {
            self.recheck_firewall().await;
        }
        self.sync_hosts_and_ports().await?;
        let rows = self.db(|s| s.instances())?;
        let next_start_ms = rows
            .iter()
            .filter(|r| matches!(r.state, InstanceState::Pending | InstanceState::Restarting))
            .filter_map(|r| r.next_start_ms)
            .chain(job_wake)
            .chain(desired.values().filter_map(|(d, _)| self.job_deadline_wake(d, &rows, now)))
            .min();
        Ok(Pass { next_start_ms, poll })
    }

    /// Carries out one decision of the update planner.
    pub(crate) fn act(
        self: &Arc<Self>,
        d: &Deployment,
        a: update::Action,
        rows: &[InstanceRow],
        stopping: &HashSet<String>,
    ) -> Result<(), AgentError> {
        let row = |n: &str| rows.iter().find(|r| r.name == n).cloned();
        match a {
            update::Action::Stop { name, drop_image } => {
                if let Some(r) = row(&name) {
                    self.spawn_stop(&r, stopping, drop_image);
                }
            }
            update::Action::Retire { name, to } => {
                let Some(mut r) = row(&name) else { return Ok(()) };
                if rows.iter().any(|x| x.name == to) {
                    return Ok(());
                }
                self.stop_health(&name);
                r.name = to.clone();
                r.retiring = true;
                self.db(|s| s.rename_instance(&r, &name))?;
                self.rewrite_record(&r);
                let msg = format!("kept as {to} until its replacement ({}) is ready", d.image);
                self.event(&name, "Retiring", &msg);
            }
            update::Action::Promote { name, to } => {
                let Some(mut r) = row(&name) else { return Ok(()) };
                r.name = to.clone();
                r.retiring = false;
                r.retire_at_ms = None;
                self.db(|s| s.rename_instance(&r, &name))?;
                self.rewrite_record(&r);
                self.event(&to, "RolledBack", &format!("{name} takes its place again"));
                if r.state == InstanceState::Running {
                    self.start_health(&r);
                }
            }
            update::Action::Switch { names, retire_at_ms } => {
                for n in &names {
                    if let Some(mut r) = row(n) {
                        r.retire_at_ms = Some(retire_at_ms);
                        self.db(|s| s.put_instance(&r))?;
                    }
                }
                let secs = retire_at_ms.saturating_sub(self.now_ms()) / 1000;
                let msg = format!("traffic moved to the new instances; {} kept for {secs} s", names.join(", "));
                self.event(&d.name, "Switched", &msg);
            }
            update::Action::NeedImage => {
                if self.cfg.pull.is_some() {
                    let _ = self.pull_missing(&d.instance_name(1), &d.image, d.runtime);
                }
            }
            update::Action::Failed { name, why } => {
                let Some(r) = row(&name) else { return Ok(()) };
                let first = self.update_failed.lock().is_ok_and(|mut f| f.insert(r.container_id.clone()));
                if first {
                    self.event(&name, "UpdateFailed", &format!("new instance {why}; the old one keeps serving"));
                }
            }
        }
        Ok(())
    }

    /// Updates an instance's record in its directory after a rename (see `rebuild`).
    pub(crate) fn rewrite_record(&self, r: &InstanceRow) {
        let dir = self.runtimes.of(r.spec.runtime).instance_dir(&r.container_id);
        if dir.exists() {
            if let Err(e) = rebuild::write_record(&dir, r) {
                warn!(instance = %r.name, error = %e, "updating the instance's record");
            }
        }
    }

    /// Reads, changes and writes one instance row under the state lock; `f` returns
    /// `None` to leave the row as it is. `Ok(None)` also when there is no such row.
    pub(crate) fn update_row<T>(
        &self,
        name: &str,
        f: impl FnOnce(&mut InstanceRow) -> Option<T>,
    ) -> Result<Option<T>, AgentError> {
        self.db(|s| {
            let Some(mut row) = s.instance(name)? else { return Ok(None) };
            let out = f(&mut row);
            if out.is_some() {
                s.put_instance(&row)?;
            }
            Ok(out)
        })
    }
}

/// What a stateful set's new instance (`OrderedReady`) waits for: each lower slot of this
/// node running and ready, as Kubernetes starts `web-1` once `web-0` is (one held by
/// `skiff stop` is not waited for). Restarts of an instance that ran do not wait. The flag: worth looking again soon (the one waited for
/// started in the last minute; readiness without a probe or a port has no event of its own).
fn before_it(d: &Deployment, slots: &[u32], r: &InstanceRow, rows: &[InstanceRow], now: u64) -> Option<(String, bool)> {
    if !d.ordered() || r.state != InstanceState::Pending {
        return None;
    }
    let slot = slot_of(r)?;
    let primary = |s: u32| rows.iter().find(|x| x.deployment == d.name && !x.retiring && slot_of(x) == Some(s));
    let ready = |x: &InstanceRow| x.state == InstanceState::Running && x.ready_since_ms.is_some();
    // One stopped on purpose (`skiff stop`) is not waited for: nothing would start it.
    let waits =
        slots.iter().copied().filter(|&s| s < slot).find(|&s| !primary(s).is_some_and(|x| ready(x) || x.held))?;
    let soon = primary(waits).is_some_and(|x| {
        x.state == InstanceState::Running && x.started_at_ms.is_some_and(|t| now.saturating_sub(t) < 60_000)
    });
    Some((format!("waiting for {} to be ready (ordered start)", d.instance_name(waits)), soon))
}

/// New rows for `d`'s slots that have no primary instance. A slot whose kept (retiring)
/// instance has the wanted template gets none: the planner promotes that one back (a stop
/// that ended after the planner looked leaves the slot empty for a moment). A new row's
/// container id is one no row holds (the same template in the same slot again would
/// otherwise name a kept instance's container).
fn missing_primaries(
    d: &Deployment,
    slots: &[u32],
    rows: &[InstanceRow],
    id_of: impl Fn(&str, &str) -> String,
) -> Vec<InstanceRow> {
    let tpl = rollout::template_hash(d);
    let mut taken: HashSet<String> = rows.iter().map(|r| r.container_id.clone()).collect();
    let mut out = Vec::new();
    for &i in slots {
        let name = d.instance_name(i);
        let kept = |r: &&InstanceRow| {
            r.deployment == d.name && r.retiring && slot_of(r) == Some(i) && rollout::template_hash(&r.spec) == tpl
        };
        if rows.iter().any(|r| r.name == name) || rows.iter().any(|r| kept(&r)) {
            continue;
        }
        let base = id_of(&name, &tpl);
        let id = (1..)
            .map(|n| if n == 1 { base.clone() } else { format!("{base}-{n}") })
            .find(|id| !taken.contains(id))
            .unwrap_or(base);
        taken.insert(id.clone());
        out.push(InstanceRow::pending(name, d.name.clone(), id, d.clone()));
    }
    out
}

/// The reconcile pass in-process: a [`crate::fake::FakeRuntime`] for runc and a
/// `ManualClock` for time, so restart back-off, retries and stops are checked pass by
/// pass, with no process started and no sleep.
#[cfg(test)]
mod tests {
    use crate::fake::FakeRuntime;
    use crate::{Agent, AgentConfig, Backends};
    use skiff_model::{Deployment, InstanceState, InstanceStatus, NetworkMode, RestartPolicy};
    use skiff_sys::time::{Clock, ManualClock};
    use skiff_testkit::{ImageBuilder, LayerBuilder};
    use std::sync::Arc;

    const IMAGE: &str = "localhost/app:1";

    struct Node {
        _dir: tempfile::TempDir,
        agent: Arc<Agent>,
        rt: Arc<FakeRuntime>,
        clock: Arc<ManualClock>,
    }

    impl Node {
        fn new() -> Node {
            let dir = tempfile::tempdir().unwrap();
            let rt = Arc::new(FakeRuntime::new(dir.path().join("fake")));
            let clock = ManualClock::at(1_000_000);
            let mut cfg = AgentConfig::new(dir.path().join("data"));
            cfg.clock = clock.clone();
            cfg.backends = Some(Backends { oci: rt.clone(), wasm: rt.clone(), runsc: rt.clone() });
            cfg.image_gc = None;
            cfg.firewall = skiff_runtime::nat::FirewallSetting::none();
            let agent = Agent::open(cfg).unwrap();
            let layer = LayerBuilder::new().file("hello", 0o644, b"hi").unwrap().finish().unwrap();
            let image = ImageBuilder { layers: vec![layer], ..ImageBuilder::busybox().unwrap() };
            let layout = dir.path().join("layout");
            image.write_oci_layout(&layout, IMAGE).unwrap();
            agent.images().load(&layout, None).unwrap();
            Node { _dir: dir, agent, rt, clock }
        }

        fn run(&self, restart: RestartPolicy) {
            let mut d = Deployment::new("app", IMAGE);
            d.network = NetworkMode::None;
            d.restart = restart;
            self.agent.set_desired(&[d], 1).unwrap();
        }

        /// One full pass; returns when the next delayed start is due.
        async fn pass(&self) -> Option<u64> {
            self.agent.reconcile(true).await.unwrap().next_start_ms
        }

        fn one(&self) -> InstanceStatus {
            let all = self.agent.instances().unwrap();
            assert_eq!(all.len(), 1, "{all:?}");
            all.into_iter().next().unwrap()
        }

        /// The running instance ends now with `code`.
        fn exits(&self, code: i32) {
            self.rt.exit(&self.one().container_id, code, self.clock.now_ms());
        }
    }

    fn job(n: &Node, spec: skiff_model::job::JobSpec, restart: RestartPolicy) {
        let mut d = Deployment::new("j", IMAGE);
        d.network = NetworkMode::None;
        d.restart = restart;
        d.replicas = spec.completions;
        d.job = Some(spec);
        d.validate().unwrap();
        n.agent.set_desired(&[d], 1).unwrap();
    }

    fn inst(n: &Node, name: &str) -> InstanceStatus {
        n.agent.instances().unwrap().into_iter().find(|i| i.name == name).unwrap()
    }

    fn run_of(n: &Node, spec: &skiff_model::job::JobSpec) -> skiff_model::job::RunStatus {
        let all = n.agent.instances().unwrap();
        skiff_model::job::run_status(spec, &all.iter().collect::<Vec<_>>())
    }

    /// A job's instances run to completion, `parallelism` at once, and are not started
    /// again once they succeeded.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_job_runs_its_completions_parallelism_at_a_time_and_stops() {
        let n = Node::new();
        let spec = skiff_model::job::JobSpec { completions: 3, parallelism: 2, ..Default::default() };
        job(&n, spec.clone(), RestartPolicy::OnFailure { max_retries: Some(6) });
        n.pass().await;
        assert_eq!(n.rt.starts(), 2, "parallelism 2");
        let waiting = inst(&n, "j-3");
        assert_eq!(waiting.state, InstanceState::Pending);
        assert!(waiting.message.unwrap_or_default().contains("parallelism 2"));
        n.rt.exit(&inst(&n, "j-1").container_id, 0, n.clock.now_ms());
        n.pass().await;
        assert_eq!((inst(&n, "j-1").state, inst(&n, "j-3").state), (InstanceState::Exited, InstanceState::Running));
        for name in ["j-2", "j-3"] {
            n.rt.exit(&inst(&n, name).container_id, 0, n.clock.now_ms());
        }
        n.pass().await;
        n.clock.advance(60_000);
        n.pass().await;
        assert_eq!(n.rt.starts(), 3, "each once");
        let run = run_of(&n, &spec);
        assert_eq!((run.state, run.succeeded), (skiff_model::job::RunState::Complete, 3));
    }

    /// `j-1` fails, is retried (when its restart is due), and fails again.
    async fn fail_twice(n: &Node) {
        for _ in 0..2 {
            n.rt.exit(&inst(n, "j-1").container_id, 1, n.clock.now_ms());
            n.pass().await;
            n.clock.advance(20_000);
            n.pass().await;
        }
    }

    /// A run that passes its backoff limit, or its deadline, is stopped with why.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_job_past_its_backoff_limit_or_deadline_is_stopped() {
        let n = Node::new();
        let spec = skiff_model::job::JobSpec { completions: 2, parallelism: 2, backoff_limit: 1, ..Default::default() };
        job(&n, spec, RestartPolicy::OnFailure { max_retries: Some(1) });
        n.pass().await;
        fail_twice(&n).await;
        let (one, two) = (inst(&n, "j-1"), inst(&n, "j-2"));
        assert_eq!(one.state, InstanceState::Exited);
        assert_eq!(two.state, InstanceState::Exited, "the other instance is stopped too: {two:?} {one:?}");
        assert!(two.message.unwrap_or_default().starts_with("job failed: 2 failed runs (backoff limit 1)"));
        assert_eq!(n.rt.signals().len(), 1, "the running one killed");
        n.clock.advance(60_000);
        n.pass().await;
        assert_eq!(n.rt.starts(), 3, "never started again");

        // The job's limit, not the instance's: retries left (5) do not outlast it, and
        // no retry is started past it.
        let n = Node::new();
        let spec = skiff_model::job::JobSpec { backoff_limit: 1, ..Default::default() };
        job(&n, spec, RestartPolicy::OnFailure { max_retries: Some(5) });
        n.pass().await;
        fail_twice(&n).await;
        let one = inst(&n, "j-1");
        assert_eq!((one.state, n.rt.starts()), (InstanceState::Exited, 2), "{one:?}");
        assert!(one.message.unwrap_or_default().starts_with("job failed: 2 failed runs"));

        // The deadline counts from the run's start, not from a retry's.
        let n = Node::new();
        let spec = skiff_model::job::JobSpec { active_deadline_seconds: Some(30), ..Default::default() };
        job(&n, spec, RestartPolicy::OnFailure { max_retries: Some(5) });
        assert_eq!(n.pass().await, Some(1_000_000 + 30_000), "the loop wakes at the deadline");
        n.clock.advance(20_000);
        n.rt.exit(&inst(&n, "j-1").container_id, 1, n.clock.now_ms());
        n.pass().await;
        n.clock.advance(1_000);
        n.pass().await;
        assert_eq!((inst(&n, "j-1").state, n.rt.starts()), (InstanceState::Running, 2), "retried");
        n.clock.advance(9_000);
        assert_eq!(n.pass().await, None, "stopped: nothing more to wake for");
        let one = inst(&n, "j-1");
        assert_eq!(one.message.as_deref(), Some("job failed: its deadline of 30 s passed"));
        assert!(n.agent.events(50).unwrap().iter().any(|e| e.reason == "JobFailed"));
    }

    /// What is kept for a CronJob goes with it; a job changed runs again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_changed_job_runs_again_and_a_removed_ones_state_goes() {
        let n = Node::new();
        let spec = skiff_model::job::JobSpec::default();
        job(&n, spec.clone(), RestartPolicy::No);
        n.pass().await;
        n.rt.exit(&inst(&n, "j-1").container_id, 0, n.clock.now_ms());
        n.pass().await;
        assert_eq!(inst(&n, "j-1").state, InstanceState::Exited);
        let mut d = Deployment::new("j", IMAGE);
        d.network = NetworkMode::None;
        d.env.insert("V".into(), "2".into());
        d.job = Some(spec);
        n.agent.set_desired(std::slice::from_ref(&d), 2).unwrap();
        for _ in 0..500 {
            n.pass().await;
            if n.rt.starts() == 2 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert_eq!(n.rt.starts(), 2, "ran again: {:?}", n.agent.instances());
        assert!(n.agent.db(|s| s.meta_keys("job/")).unwrap().contains(&"job/j/started".to_string()));
        n.agent.set_desired(&[], 3).unwrap();
        n.pass().await;
        assert!(n.agent.db(|s| s.meta_keys("job/")).unwrap().is_empty(), "forgotten with the job");
    }

    /// A CronJob runs at its times by the node's clock (no hub): never a time twice,
    /// the last run's instances replaced by the new run's, a late time skipped past its
    /// starting deadline, and a run that goes on skipped under Forbid.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_cron_job_runs_at_its_times_on_the_nodes_clock() {
        let n = Node::new();
        n.clock.set(1_796_527_800_000); // 03:30 UTC
        let schedule = skiff_model::job::Schedule {
            cron: "0 * * * *".into(),
            time_zone: None,
            concurrency_policy: skiff_model::job::ConcurrencyPolicy::Forbid,
            starting_deadline_seconds: Some(600),
            suspend: false,
        };
        let spec = skiff_model::job::JobSpec { schedule: Some(schedule), ..Default::default() };
        job(&n, spec, RestartPolicy::No);
        let four = 1_796_529_600_000;
        assert_eq!(n.pass().await, Some(four), "first seen: waits for 04:00");
        assert!(n.agent.instances().unwrap().is_empty());
        n.clock.set(four + 1_000);
        n.pass().await;
        let first = inst(&n, "j-1");
        assert_eq!((first.state, n.rt.starts()), (InstanceState::Running, 1), "the run of 04:00");
        n.pass().await;
        assert_eq!(n.rt.starts(), 1, "not twice");
        // Still running at 05:00 (Forbid): skipped.
        n.clock.set(four + 3_600_000);
        n.pass().await;
        assert_eq!(n.rt.starts(), 1);
        assert!(n.agent.events(50).unwrap().iter().any(|e| e.reason == "RunSkipped"));
        n.rt.exit(&first.container_id, 0, n.clock.now_ms());
        n.pass().await;
        // 06:00 passes while the agent is away; back at 06:20, 20 min late > 10 min: skipped.
        n.clock.set(four + 2 * 3_600_000 + 20 * 60_000);
        n.pass().await;
        assert!(n.agent.events(50).unwrap().iter().any(|e| e.reason == "MissedSchedule"));
        assert_eq!(n.rt.starts(), 1);
        // 07:00: the finished run's instance goes, the new run's starts.
        n.clock.set(four + 3 * 3_600_000);
        n.pass().await;
        for _ in 0..500 {
            if n.rt.starts() == 2 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            n.pass().await;
        }
        assert_eq!(n.rt.starts(), 2, "{:?}", n.agent.instances());
        let second = inst(&n, "j-1");
        assert_eq!(second.state, InstanceState::Running);
        assert_eq!(second.started_at_ms, Some(four + 3 * 3_600_000));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_always_instance_restarts_after_dockers_back_off_on_the_agents_clock() {
        let n = Node::new();
        n.run(RestartPolicy::Always);
        assert_eq!(n.pass().await, None);
        assert_eq!((n.one().state, n.rt.starts()), (InstanceState::Running, 1));
        let t0 = n.clock.now_ms();
        n.exits(1);
        // Docker's back-off: 100 ms after a quick exit, doubling while exits stay quick.
        assert_eq!(n.pass().await, Some(t0 + 100), "the loop sleeps until the restart is due");
        assert_eq!((n.one().state, n.rt.starts()), (InstanceState::Restarting, 1));
        n.clock.advance(99);
        assert_eq!(n.pass().await, Some(t0 + 100));
        assert_eq!(n.rt.starts(), 1, "not before the back-off");
        n.clock.advance(1);
        assert_eq!(n.pass().await, None);
        let i = n.one();
        assert_eq!((i.state, i.restarts, n.rt.starts()), (InstanceState::Running, 1, 2));
        n.clock.advance(10);
        n.exits(1);
        assert_eq!(n.pass().await, Some(t0 + 110 + 200), "the second quick exit waits twice as long");
        // An instance that ran 10 s before exiting starts again from 100 ms.
        n.clock.advance(200);
        n.pass().await;
        n.clock.advance(10_000);
        n.exits(0);
        let t1 = n.clock.now_ms();
        assert_eq!(n.pass().await, Some(t1 + 100), "a long run resets the back-off");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn on_failure_retries_its_limit_and_a_failed_start_counts_as_a_failed_run() {
        let n = Node::new();
        n.run(RestartPolicy::OnFailure { max_retries: Some(2) });
        n.rt.fail_starts(1);
        let due = n.pass().await.expect("a failed start is retried");
        let i = n.one();
        assert_eq!((i.state, i.exit_code, n.rt.starts()), (InstanceState::Restarting, Some(127), 0), "{i:?}");
        n.clock.set(due);
        n.pass().await;
        assert_eq!((n.one().state, n.rt.starts()), (InstanceState::Running, 1));
        n.exits(3);
        let due = n.pass().await.expect("the second failure is the last retry");
        n.clock.set(due);
        n.pass().await;
        assert_eq!(n.rt.starts(), 2);
        n.exits(3);
        assert_eq!(n.pass().await, None, "no third retry");
        let i = n.one();
        assert_eq!((i.state, i.exit_code, i.restarts), (InstanceState::Exited, Some(3), 2), "{i:?}");
        // A clean exit of an on-failure instance is not restarted at all.
        let n = Node::new();
        n.run(RestartPolicy::OnFailure { max_retries: None });
        n.pass().await;
        n.exits(0);
        assert_eq!(n.pass().await, None);
        assert_eq!(n.one().state, InstanceState::Exited);
    }

    /// No instance runs without the record a rebuild of agent.db finds it by: one whose
    /// record cannot be written is killed, and the start counts as failed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_instance_whose_record_cannot_be_written_does_not_stay_running() {
        let n = Node::new();
        n.rt.without_dirs();
        n.run(RestartPolicy::No);
        n.pass().await;
        let i = n.one();
        assert_eq!(n.rt.starts(), 1, "started beside the record's write");
        assert_eq!(n.rt.signals(), [(i.container_id.clone(), "KILL".to_string())], "then killed");
        assert_eq!((i.state, i.exit_code), (InstanceState::Failed, Some(127)), "{i:?}");
        assert!(i.message.is_some_and(|m| m.contains("record was not written")));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_instance_no_longer_desired_is_stopped_and_removed() {
        let n = Node::new();
        n.run(RestartPolicy::Always);
        n.pass().await;
        let id = n.one().container_id;
        assert_eq!(n.rt.running(), std::slice::from_ref(&id));
        n.agent.set_desired(&[], 2).unwrap();
        n.pass().await;
        // Stops run in the background; bounded wait for this one.
        for _ in 0..500 {
            if n.agent.all_gone(&["app".into()]) {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert!(n.agent.all_gone(&["app".into()]), "{:?}", n.agent.instances());
        assert_eq!(n.rt.signals().first().map(|(i, _)| i.as_str()), Some(id.as_str()), "stopped by a signal first");
        assert!(n.rt.running().is_empty() && !n.rt.instance_dir_exists(&id), "and what was made for it removed");
    }

    /// A stateful set (`OrderedReady`) names its instances from 0, starts each once the
    /// ones below it run and are ready, and scales down from the highest, one at a time.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stateful_set_starts_in_order_and_stops_from_the_top() {
        use skiff_model::stateful::{PodManagement, Stateful};
        let n = Node::new();
        let mut d = Deployment::new("db", IMAGE);
        d.network = NetworkMode::None;
        d.replicas = 3;
        d.stateful = Some(Stateful { service: None, pod_management: PodManagement::OrderedReady });
        d.update.max_surge = skiff_model::rollout::IntOrPercent::Int(0);
        d.update.max_unavailable = skiff_model::rollout::IntOrPercent::Int(1);
        d.validate().unwrap();
        n.agent.set_desired(std::slice::from_ref(&d), 1).unwrap();
        n.pass().await;
        assert_eq!(n.rt.starts(), 1, "db-0 alone first");
        assert_eq!(inst(&n, "db-0").state, InstanceState::Running);
        let waiting = inst(&n, "db-1");
        assert_eq!(waiting.state, InstanceState::Pending);
        assert_eq!(waiting.message.as_deref(), Some("waiting for db-0 to be ready (ordered start)"));
        // Each pass sees the last one ready (no probe, no port) and starts the next.
        n.pass().await;
        assert_eq!((n.rt.starts(), inst(&n, "db-1").state), (2, InstanceState::Running));
        assert_eq!(inst(&n, "db-2").state, InstanceState::Pending);
        n.pass().await;
        n.pass().await;
        assert_eq!(n.rt.starts(), 3);
        let mut names: Vec<String> = n.agent.instances().unwrap().into_iter().map(|i| i.name).collect();
        names.sort();
        assert_eq!(names, ["db-0", "db-1", "db-2"]);

        // Down to 1: db-2 goes first; db-1 only once db-2 is gone.
        let top = inst(&n, "db-2").container_id;
        d.replicas = 1;
        n.agent.set_desired(std::slice::from_ref(&d), 2).unwrap();
        n.pass().await;
        // The stop runs on a task of its own: its signal may come a moment after the pass.
        let mut stopped: Vec<String> = vec![];
        for _ in 0..500 {
            stopped = n.rt.signals().into_iter().map(|(id, _)| id).collect();
            if !stopped.is_empty() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert_eq!(stopped, [top], "the highest alone");
        for _ in 0..500 {
            if n.agent.instances().unwrap().len() == 2 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        n.pass().await;
        for _ in 0..500 {
            if n.agent.instances().unwrap().len() == 1 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let left: Vec<String> = n.agent.instances().unwrap().into_iter().map(|i| i.name).collect();
        assert_eq!(left, ["db-0"]);
    }

    /// A rollback whose failed instance's stop ended after the planner looked: the slot
    /// is empty for a moment, but its kept instance of the wanted template is promoted,
    /// not doubled by a new one under the same container id (which killed the kept one).
    #[test]
    fn an_empty_slot_with_a_kept_instance_of_the_wanted_template_waits_for_its_promotion() {
        use crate::state::InstanceRow;
        let mut v3 = Deployment::new("web", IMAGE);
        v3.env.insert("VERSION".into(), "v3".into());
        let tpl = skiff_model::rollout::template_hash(&v3);
        let id_of = |name: &str, tpl: &str| format!("n-{name}-{}", &tpl[..6]);
        let mut kept = InstanceRow::pending("web-1-x".into(), "web".into(), id_of("web-1", &tpl), v3.clone());
        kept.retiring = true;
        let web2 = InstanceRow::pending("web-2".into(), "web".into(), id_of("web-2", &tpl), v3.clone());
        let rows = [kept.clone(), web2];
        assert!(super::missing_primaries(&v3, &[1, 2], &rows, id_of).is_empty(), "web-1 is promoted instead");

        // Another template wanted: web-1 is new. And a container id already held (the
        // kept one of the template after) is not given twice.
        let mut v4 = v3.clone();
        v4.env.insert("VERSION".into(), "v4".into());
        let tpl4 = skiff_model::rollout::template_hash(&v4);
        let mut held = kept;
        held.container_id = id_of("web-1", &tpl4);
        let new = super::missing_primaries(&v4, &[1, 2, 3], &[held], id_of);
        let ids: Vec<&str> = new.iter().map(|r| r.container_id.as_str()).collect();
        let base = id_of("web-1", &tpl4);
        assert_eq!(ids, [format!("{base}-2"), id_of("web-2", &tpl4), id_of("web-3", &tpl4)]);
        assert!(new.iter().all(|r| r.state == InstanceState::Pending));
    }

    /// The names to scrape survive the agent: an agent that restarts is not sent its
    /// assignment again when nothing changed.
    #[test]
    fn the_metrics_to_scrape_are_kept_across_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let open = || {
            let mut cfg = AgentConfig::new(dir.path().join("data"));
            cfg.image_gc = None;
            cfg.firewall = skiff_runtime::nat::FirewallSetting::none();
            let rt = Arc::new(FakeRuntime::new(dir.path().join("fake")));
            cfg.backends = Some(Backends { oci: rt.clone(), wasm: rt.clone(), runsc: rt });
            Agent::open(cfg).unwrap()
        };
        let a = open();
        a.set_scraped_metrics(vec!["queue_depth".into()]);
        assert_eq!(*a.scrape_names.lock().unwrap(), ["queue_depth"]);
        drop(a);
        let b = open();
        assert_eq!(*b.scrape_names.lock().unwrap(), ["queue_depth"]);
        b.set_scraped_metrics(vec![]);
        drop(b);
        assert!(open().scrape_names.lock().unwrap().is_empty());
    }
}
