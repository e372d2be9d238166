//! Rollouts: each template change of a deployment is a revision (kept in the store's
//! history, newest 10). The controller watches the instances of the newest revision and
//! marks it complete when every replica runs it and is ready, or failed when too many of
//! them crash or fail their health checks; then, with `failure_action: rollback`, stores
//! the last complete revision's template again. Nodes never drop an old instance before
//! its replacement is ready (see the agent's `update`), so a failed rollout keeps serving
//! from the old version while this happens. Events live in memory, as the autoscaler's.

use crate::{ApplyError, Hub, HubError};
use skiff_model::api::ApplyRequest;
use skiff_model::rollout::{self, FailureAction, Revision, RolloutState, RolloutStatus, Strategy, CRASH_LOOP_RESTARTS};
use skiff_model::{Deployment, EventRecord, Health, InstanceState, InstanceStatus, PlacementMode};

const EVENTS_KEPT: usize = 1_000;

pub struct Rollouts {
    pub(crate) events: crate::events::EventLog,
}

impl Default for Rollouts {
    fn default() -> Self {
        Rollouts { events: crate::events::EventLog::new("rollouts", EVENTS_KEPT) }
    }
}

impl Rollouts {
    pub fn events(&self) -> Vec<EventRecord> {
        self.events.list()
    }

    fn event(&self, now_ms: u64, object: &str, reason: &str, message: String) {
        self.events.push(now_ms, object, reason, message);
    }
}

/// Why a new instance counts as failed, if it does.
fn failure(i: &InstanceStatus) -> Option<String> {
    match (i.state, i.health) {
        (InstanceState::Failed, _) => Some(format!("{} failed to start", i.name)),
        (InstanceState::Exited, _) if i.exit_code != Some(0) => {
            Some(format!("{} exited with code {}", i.name, i.exit_code.unwrap_or(-1)))
        }
        (_, Some(Health::Unhealthy)) => Some(format!("{} is unhealthy", i.name)),
        _ if i.restarts >= CRASH_LOOP_RESTARTS => Some(format!("{} restarted {} times", i.name, i.restarts)),
        _ => None,
    }
}

/// How many instances `d` wants: its replicas, or (global) as many as it runs.
pub(crate) fn wanted(d: &Deployment, instances: &[InstanceStatus]) -> u32 {
    match d.placement.mode {
        PlacementMode::Global => running(&d.name, instances),
        PlacementMode::Replicated => d.replicas,
    }
}

/// The instances of deployment `name` that are not retiring.
fn running(name: &str, instances: &[InstanceStatus]) -> u32 {
    instances.iter().filter(|i| i.deployment == name && !i.retiring).count() as u32
}

/// Where the rollout of `d`'s newest revision stands, from its instances.
pub fn status(d: &Deployment, newest: Option<&Revision>, instances: &[InstanceStatus]) -> RolloutStatus {
    let tpl = rollout::template_hash(d);
    let mine: Vec<&InstanceStatus> = instances.iter().filter(|i| i.deployment == d.name).collect();
    let updated: Vec<&&InstanceStatus> = mine.iter().filter(|i| i.template == tpl && !i.retiring).collect();
    let ready = updated
        .iter()
        .filter(|i| i.state == InstanceState::Running && matches!(i.health, None | Some(Health::Healthy)))
        .count() as u32;
    let old = mine.iter().filter(|i| i.template != tpl).count() as u32;
    let desired = match &d.pod_of {
        // A pod's other container: one beside each of its first's (its own replicas are
        // not read).
        Some(first) => running(first, instances),
        None => wanted(d, instances),
    };
    let failures: Vec<String> = updated.iter().filter_map(|i| failure(i)).collect();
    let old_primaries = mine.iter().filter(|i| i.template != tpl && !i.retiring).count();
    let kept = d.update.strategy == Strategy::BlueGreen && old_primaries == 0;
    // A job's instances run to completion: nothing rolls out (a run's failure is the
    // job's, shown by `skiff get jobs`, never a rollback).
    let is_job = d.job.is_some();
    let done = is_job || (updated.len() as u32 == desired && ready == desired && (old == 0 || kept));
    let failed = !is_job
        && !failures.is_empty()
        && (failures.len() as f64) > d.update.max_failure_ratio * f64::from(desired.max(1))
        && d.update.failure_action != FailureAction::Continue;
    let (state, message) = match newest.map(|r| r.state) {
        Some(s @ (RolloutState::Failed | RolloutState::Superseded)) => (s, newest.and_then(|r| r.message.clone())),
        _ if failed => (RolloutState::Failed, Some(failures.join("; "))),
        _ if done => (RolloutState::Complete, (kept && old > 0).then(|| format!("{old} old kept for rollback"))),
        _ => (RolloutState::Progressing, failures.first().cloned()),
    };
    RolloutStatus {
        deployment: d.name.clone(),
        revision: newest.map(|r| r.revision).unwrap_or(0),
        template: tpl,
        state,
        strategy: d.update.strategy,
        desired,
        updated: updated.len() as u32,
        ready,
        old,
        message,
    }
}

/// While `d`'s newest revision rolls out in waves: the nodes it has reached, and what
/// the other nodes keep running (the last complete revision's template). `None`: every
/// node runs `d` as stored.
pub fn wave_of(d: &Deployment, history: &[Revision]) -> Option<(Vec<String>, Deployment)> {
    let newest = history.last().filter(|r| r.state == RolloutState::Progressing)?;
    let nodes = newest.nodes.clone()?;
    let base = history.iter().rev().skip(1).find(|r| r.state == RolloutState::Complete)?;
    Some((nodes, with_template(d, &base.spec)))
}

/// `d` with the template of `to` and its own replicas, autoscaler and update settings.
fn with_template(d: &Deployment, to: &Deployment) -> Deployment {
    let mut out = to.clone();
    out.replicas = d.replicas;
    out.autoscale = d.autoscale.clone();
    out.update = d.update.clone();
    out
}

impl Hub {
    fn history_of(&self, name: &str) -> Result<Vec<Revision>, ApplyError> {
        self.store.history(name).map_err(ApplyError::from)
    }

    /// The rollout of `name`'s newest revision (`None`: no such deployment).
    pub fn rollout_status(&self, name: &str) -> Result<Option<RolloutStatus>, ApplyError> {
        let Some(d) = self.store.get(name)? else {
            return Ok(None);
        };
        let h = self.history_of(name)?;
        let now = self.clock.now_ms();
        self.settle(&d.spec, &h, &self.instances(), now, false).map(Some).map_err(ApplyError::from)
    }

    /// `name`'s revision history, oldest first (`None`: no such deployment).
    pub fn rollout_history(&self, name: &str) -> Result<Option<Vec<Revision>>, ApplyError> {
        if self.store.get(name)?.is_none() {
            return Ok(None);
        }
        self.history_of(name).map(Some)
    }

    /// Stores an earlier revision's template again: `to`, or the newest earlier one that
    /// completed with another template (so an undo after an automatic rollback does not
    /// return to the revision that failed).
    pub fn rollout_undo(&self, name: &str, to: Option<u64>, now_ms: u64) -> Result<Revision, ApplyError> {
        let cur = self.store.get(name)?.ok_or_else(|| ApplyError::Invalid(format!("deployment {name:?} not found")))?;
        let h = self.history_of(name)?;
        let newest = h.last().map(|r| r.revision).unwrap_or(0);
        let target = match to {
            Some(n) => h.iter().find(|r| r.revision == n).ok_or_else(|| {
                let have: Vec<String> = h.iter().map(|r| r.revision.to_string()).collect();
                ApplyError::Invalid(format!(
                    "to_revision: {name} has no revision {n} (it has {})",
                    if have.is_empty() { "none".into() } else { have.join(", ") }
                ))
            })?,
            // The newest earlier revision that completed and differs from what runs.
            None => h
                .iter()
                .rev()
                .skip(1)
                .find(|r| r.state == RolloutState::Complete && r.template != rollout::template_hash(&cur.spec))
                .ok_or_else(|| ApplyError::Invalid(format!("{name} has no earlier complete revision to go back to")))?,
        };
        if target.template == rollout::template_hash(&cur.spec) {
            return Err(ApplyError::Invalid(format!(
                "to_revision: revision {} is what {name} runs already",
                target.revision
            )));
        }
        let cause = format!("undo to revision {} (from {newest})", target.revision);
        let rev = self.store_template(&cur.spec, &target.spec, &cause)?;
        self.rollouts.event(now_ms, name, "RolloutUndo", cause);
        Ok(rev)
    }

    /// Applies `cur` with `to`'s template and names why; returns the new revision.
    fn store_template(&self, cur: &Deployment, to: &Deployment, cause: &str) -> Result<Revision, ApplyError> {
        let d = with_template(cur, to);
        self.commit(&ApplyRequest { deployments: vec![d], ..Default::default() })?;
        let h = self.history_of(&cur.name)?;
        let newest = h.last().cloned().ok_or_else(|| ApplyError::Internal("no revision recorded".into()))?;
        self.store.set_rollout(&cur.name, newest.revision, RolloutState::Progressing, Some(cause), None)?;
        Ok(Revision { cause: cause.to_string(), ..newest })
    }

    /// Deletes each finished job (not a CronJob) whose `ttl_seconds_after_finished` has
    /// passed, as Kubernetes' TTL controller does. Counted from when the hub first saw it
    /// finished (kept in the store), not from a node's clock; a job others depend on (or
    /// share the network of) stays.
    pub fn expire_jobs(&self, now_ms: u64) -> Result<(), HubError> {
        const SEEN: &str = "jobs/finished/";
        let specs: Vec<Deployment> = self.store.list()?.into_iter().map(|s| s.spec).collect();
        let ttl_of = |d: &Deployment| d.job.as_ref().filter(|j| j.schedule.is_none())?.ttl_seconds_after_finished;
        let seen: std::collections::BTreeMap<String, String> = self.store.states(SEEN)?.into_iter().collect();
        // Marks of jobs gone (or no longer with a TTL) go too.
        for k in seen.keys() {
            if !specs.iter().any(|d| ttl_of(d).is_some() && k[SEEN.len()..] == d.name) {
                self.store.put_state(k, None)?;
            }
        }
        if !specs.iter().any(|d| ttl_of(d).is_some()) {
            return Ok(());
        }
        let instances = self.instances();
        let mut deleted = false;
        for v in skiff_model::job::views(&specs, &instances) {
            let Some(ttl) = specs.iter().find(|d| d.name == v.name).and_then(ttl_of) else { continue };
            if v.run.finished_ms.is_none() {
                continue;
            }
            let key = format!("{SEEN}{}", v.name);
            let Some(since) = seen.get(&key).and_then(|s| s.parse::<u64>().ok()) else {
                self.store.put_state(&key, Some(&now_ms.to_string()))?;
                continue;
            };
            let needed = specs.iter().any(|d| {
                d.depends_on.iter().any(|x| x.name == v.name) || d.network_service.as_deref() == Some(&v.name)
            });
            if since + ttl * 1000 <= now_ms && !needed && self.store.delete(&v.name)? {
                self.store.put_state(&key, None)?;
                let msg =
                    format!("finished {} s ago (ttl_seconds_after_finished {ttl}): deleted", (now_ms - since) / 1000);
                self.rollouts.event(now_ms, &v.name, "JobDeleted", msg);
                deleted = true;
            }
        }
        if deleted {
            self.sync_nodes()?;
        }
        Ok(())
    }

    /// One pass of the rollout controller: completes or fails each deployment's newest
    /// revision from what its instances report, and rolls back failed ones.
    pub fn roll(&self, now_ms: u64) -> Result<(), HubError> {
        // One indexed query while nothing rolls out (the usual case), not every history.
        let progressing = self.store.progressing()?;
        if progressing.is_empty() {
            return Ok(());
        }
        let all: Vec<Deployment> =
            self.store.list()?.into_iter().map(|s| s.spec).filter(|d| progressing.contains(&d.name)).collect();
        self.settle_progressing(&all, now_ms, true)
    }

    /// Settles the deployments of `ds` whose newest revision is still in progress; the
    /// instances (from every node) are gathered only if there is one.
    pub(crate) fn settle_progressing(&self, ds: &[Deployment], now_ms: u64, act: bool) -> Result<(), HubError> {
        if !self.settled(now_ms) {
            return Ok(());
        }
        let mut instances: Option<Vec<InstanceStatus>> = None;
        for d in ds {
            let h = self.store.history(&d.name)?;
            if h.last().is_some_and(|r| r.state == RolloutState::Progressing) {
                let all = instances.get_or_insert_with(|| self.instances());
                self.settle(d, &h, all, now_ms, act)?;
            }
        }
        Ok(())
    }

    /// Records how `d`'s newest revision stands when it has ended; moves a wave on or acts
    /// on a failure only with `act` (a read of the status or an apply only records
    /// completions).
    fn settle(
        &self,
        d: &Deployment,
        h: &[Revision],
        instances: &[InstanceStatus],
        now_ms: u64,
        act: bool,
    ) -> Result<RolloutStatus, HubError> {
        let mut s = status(d, h.last(), instances);
        let Some(newest) = h.last().filter(|r| r.state == RolloutState::Progressing) else { return Ok(s) };
        if let Some((wave, _)) = wave_of(d, h) {
            let all = self.nodes.nodes_of(&d.name);
            // Judged on the wave's own instances: its failure ratio, and whether it is done.
            let on_wave: Vec<InstanceStatus> = instances.iter().filter(|i| wave.contains(&i.node)).cloned().collect();
            let mut w = d.clone();
            w.replicas = on_wave.iter().filter(|i| i.deployment == d.name && !i.retiring).count() as u32;
            let ws = status(&w, Some(newest), &on_wave);
            s.message = Some(format!("wave on {} of {} nodes", wave.len(), all.len()));
            match ws.state {
                RolloutState::Failed => s = RolloutStatus { state: RolloutState::Failed, message: ws.message, ..s },
                RolloutState::Complete if wave.len() < all.len() && act => {
                    let n = rollout::next_wave(wave.len(), d.update.wave_growth, all.len());
                    let next: Vec<String> = all.into_iter().take(n).collect();
                    self.store.set_wave(&d.name, newest.revision, &next)?;
                    self.nodes.wake(&*self.store)?;
                    let msg = format!("revision {} moves on to {} nodes: {}", newest.revision, n, next.join(", "));
                    self.rollouts.event(now_ms, &d.name, "WaveStarted", msg);
                    return Ok(RolloutStatus { state: RolloutState::Progressing, ..s });
                }
                _ => s.state = if ws.state == RolloutState::Complete { s.state } else { RolloutState::Progressing },
            }
        }
        match s.state {
            RolloutState::Complete => {
                self.store.set_rollout(&d.name, newest.revision, RolloutState::Complete, None, s.message.as_deref())?;
                let msg = format!("revision {} ({}) runs on {} of {}", newest.revision, d.image, s.ready, s.desired);
                self.rollouts.event(now_ms, &d.name, "RolloutComplete", msg);
            }
            RolloutState::Failed if act => {
                let why = s.message.clone().unwrap_or_default();
                self.store.set_rollout(&d.name, newest.revision, RolloutState::Failed, None, Some(&why))?;
                let msg = format!("revision {} ({}): {why}", newest.revision, d.image);
                self.rollouts.event(now_ms, &d.name, "RolloutFailed", msg);
                if d.update.failure_action != FailureAction::Rollback {
                    return Ok(s);
                }
                let Some(good) = h.iter().rev().skip(1).find(|r| r.state == RolloutState::Complete) else {
                    let msg = "no earlier complete revision to roll back to".to_string();
                    self.rollouts.event(now_ms, &d.name, "RollbackSkipped", msg);
                    return Ok(s);
                };
                let cause = format!("rollback to revision {} (revision {} failed)", good.revision, newest.revision);
                match self.store_template(d, &good.spec, &cause) {
                    Ok(_) => self.rollouts.event(now_ms, &d.name, "RolledBack", cause),
                    Err(e) => self.rollouts.event(now_ms, &d.name, "RollbackFailed", e.to_string()),
                }
            }
            _ => {}
        }
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inst(name: &str, d: &Deployment, state: InstanceState, health: Option<Health>) -> InstanceStatus {
        InstanceStatus {
            name: name.into(),
            deployment: d.name.clone(),
            node: "n".into(),
            container_id: name.into(),
            state,
            health,
            image: d.image.clone(),
            ports: vec![],
            template: rollout::template_hash(d),
            ..Default::default()
        }
    }

    #[test]
    fn complete_failed_and_progressing() {
        let old = Deployment::new("web", "img:1");
        let mut new = old.clone();
        new.image = "img:2".into();
        new.replicas = 2;
        let running = |n: &str, d: &Deployment| inst(n, d, InstanceState::Running, None);
        let mut kept = running("web-1-aaaaaa", &old);
        kept.retiring = true;

        let s = status(&new, None, &[kept.clone(), running("web-1", &new), running("web-2", &old)]);
        assert_eq!((s.state, s.updated, s.ready, s.old), (RolloutState::Progressing, 1, 1, 2));

        let s = status(&new, None, &[running("web-1", &new), running("web-2", &new)]);
        assert_eq!((s.state, s.updated, s.ready, s.old), (RolloutState::Complete, 2, 2, 0));

        let mut bg = new.clone();
        bg.update.strategy = Strategy::BlueGreen;
        let mut kept_bg = running("web-1-aaaaaa", &bg);
        kept_bg.template = rollout::template_hash(&old);
        kept_bg.retiring = true;
        let s = status(&bg, None, &[kept_bg, running("web-1", &bg), running("web-2", &bg)]);
        assert_eq!(s.state, RolloutState::Complete, "blue-green keeps the old for its window");
        assert_eq!(s.message.as_deref(), Some("1 old kept for rollback"));

        let sick = inst("web-2", &new, InstanceState::Running, Some(Health::Unhealthy));
        let s = status(&new, None, &[kept.clone(), running("web-1", &new), sick.clone()]);
        assert_eq!((s.state, s.message.as_deref()), (RolloutState::Failed, Some("web-2 is unhealthy")));

        let mut tolerant = new.clone();
        tolerant.update.max_failure_ratio = 0.5;
        let s = status(&tolerant, None, &[running("web-1", &tolerant), sick.clone()]);
        assert_eq!(s.state, RolloutState::Progressing, "1 of 2 failed is not above a ratio of 0.5");

        let mut looping = running("web-2", &new);
        looping.restarts = 3;
        assert_eq!(status(&new, None, &[looping]).state, RolloutState::Failed);
        let mut cont = new.clone();
        cont.update.failure_action = FailureAction::Continue;
        assert_eq!(status(&cont, None, &[sick]).state, RolloutState::Progressing);
    }

    /// A hub restarted in the middle of a rollout must not judge it before its nodes
    /// have said what runs: a global deployment would count zero of zero as complete.
    #[test]
    fn a_restarted_hub_waits_for_its_nodes_before_judging_a_rollout() {
        use crate::store::{SqliteStore, Store};
        use std::sync::Arc;
        let t = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&t.path().join("hub.db")).unwrap());
        let ca = crate::pki::Ca::load_or_create(&t.path().join("pki")).unwrap();
        let f = crate::fleet::Fleet::new(ca, Arc::clone(&store), crate::clock::system()).unwrap();
        let tok =
            crate::tokens::create(&*store, Some(&f.ca_sha256), &Default::default(), skiff_sys::time::now_ms()).unwrap();
        let cred = skiff_model::proto::JoinToken::parse(&tok.token).unwrap().credential();
        let (_key, csr) = crate::pki::tests::csr("n");
        let spec = skiff_model::proto::NodeSpec { os: "linux".into(), arch: "amd64".into(), ..Default::default() };
        f.join(&skiff_model::proto::JoinRequest { token: cred, node: "n".into(), csr, spec }).unwrap();
        f.heartbeat("n", Default::default()).unwrap();
        f.tick(true).unwrap();
        let mut d = Deployment::new("agent", "img:1");
        d.placement.mode = PlacementMode::Global;
        store.apply(std::slice::from_ref(&d), None, false, 1).unwrap();
        f.reschedule().unwrap();
        assert_eq!(f.assignment("n").unwrap().deployments.len(), 1);
        // The hub restarts: a new fleet over the same store, no node heard from yet.
        let f = Arc::new(
            crate::fleet::Fleet::new(
                crate::pki::Ca::load_or_create(&t.path().join("pki")).unwrap(),
                Arc::clone(&store),
                crate::clock::system(),
            )
            .unwrap(),
        );
        let hub = Hub::new(Arc::clone(&store), Arc::new(crate::nodes::Remote(Arc::clone(&f))), "t".into());
        let now = skiff_sys::time::now_ms();
        hub.roll(now).unwrap();
        assert_eq!(store.history("agent").unwrap()[0].state, RolloutState::Progressing, "nothing judged yet");
        let running =
            InstanceStatus { node: "n".into(), pid: Some(7), ..inst("agent-1", &d, InstanceState::Running, None) };
        f.heartbeat("n", skiff_model::proto::NodeStatus { instances: vec![running], ..Default::default() }).unwrap();
        hub.roll(now).unwrap();
        assert_eq!(store.history("agent").unwrap()[0].state, RolloutState::Complete, "judged once the node reported");
    }
}
