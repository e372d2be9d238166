//! Jobs and CronJobs on the node that runs them (see `skiff_model::job`). A job's
//! instances are made once and run to completion, at most `parallelism` at once; a run
//! that passes its deadline or its backoff limit is stopped (its instances held, with
//! why, and killed again on every pass while one still runs). A changed job runs again;
//! an instance whose slot is no longer the node's is stopped.
//!
//! A CronJob's run starts at each time of its schedule by the node's own clock. What it
//! needs is kept in `agent.db` (`meta`): `cron/NAME/last` (the newest time seen) and
//! `cron/NAME/due` (a run asked for, written together with it), and `job/NAME/started`
//! (when the run began, for its deadline). So a restarted agent neither runs a time twice
//! nor, within `starting_deadline_seconds`, misses one, and no hub is needed. A new run
//! removes the last run's instances first (they keep its logs until then). The keys of a
//! job no longer on the node are removed, so one made again later starts afresh.

use crate::state::InstanceRow;
use crate::{slot_of, Agent, AgentError};
use skiff_model::job::{clock_time, run_status, ConcurrencyPolicy, JobSpec, RunState, JOB_FAILED};
use skiff_model::rollout::template_hash;
use skiff_model::{Deployment, InstanceState};
use std::collections::HashSet;
use std::sync::Arc;

/// What the reconcile loop does next for one job.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct JobStep {
    /// Instances of a (new) run may be made now.
    pub create: bool,
    /// When the schedule is due next (unix ms): the loop wakes then.
    pub wake_ms: Option<u64>,
}

fn last_key(name: &str) -> String {
    format!("cron/{name}/last")
}

fn due_key(name: &str) -> String {
    format!("cron/{name}/due")
}

fn started_key(name: &str) -> String {
    format!("job/{name}/started")
}

impl Agent {
    fn meta_ms(&self, key: &str) -> Result<Option<u64>, AgentError> {
        Ok(self.db(|s| s.meta(key))?.and_then(|v| v.parse().ok()))
    }

    /// One pass of the job controller for `d` (`job` is its `job`; `slots` its instance
    /// numbers here), whose instances here are among `rows`.
    pub(crate) fn step_job(
        self: &Arc<Self>,
        d: &Deployment,
        job: &JobSpec,
        slots: &[u32],
        rows: &[InstanceRow],
        stopping: &HashSet<String>,
        now: u64,
    ) -> Result<JobStep, AgentError> {
        let mine: Vec<&InstanceRow> = rows.iter().filter(|r| r.deployment == d.name).collect();
        // Not the node's any more (fewer completions, or placed elsewhere).
        for r in mine.iter().filter(|r| slot_of(r).is_none_or(|s| !slots.contains(&s))) {
            self.spawn_stop(r, stopping, false);
        }
        self.enforce_limits(d, job, &mine, now)?;
        let Some(schedule) = &job.schedule else {
            // A changed job runs again: the instances of the one before go first.
            let tpl = template_hash(d);
            let old: Vec<&&InstanceRow> = mine.iter().filter(|r| template_hash(&r.spec) != tpl).collect();
            for r in &old {
                self.spawn_stop(r, stopping, false);
            }
            if !old.is_empty() {
                return Ok(JobStep::default());
            }
            if mine.is_empty() {
                self.db(|s| s.set_meta(&started_key(&d.name), &now.to_string()))?;
            }
            return Ok(JobStep { create: true, wake_ms: None });
        };
        // A run asked for: the last run's instances go first, then the new run's are made.
        let start_run = |t: u64| -> Result<JobStep, AgentError> {
            if mine.is_empty() {
                let (due, started) = (due_key(&d.name), started_key(&d.name));
                self.db(|s| {
                    s.delete_meta(&due)?;
                    s.set_meta(&started, &now.to_string())
                })?;
                self.event(&d.name, "RunStarted", &format!("the run of {} starts", clock_time(t)));
                return Ok(JobStep { create: true, wake_ms: None });
            }
            for r in &mine {
                self.spawn_stop(r, stopping, false);
            }
            Ok(JobStep::default())
        };
        if let Some(t) = self.meta_ms(&due_key(&d.name))? {
            if schedule.suspend {
                self.db(|s| s.delete_meta(&due_key(&d.name)))?;
            } else {
                return start_run(t);
            }
        }
        let Some(last) = self.meta_ms(&last_key(&d.name))? else {
            // First seen: its schedule counts from now (times before it are not run).
            self.db(|s| s.set_meta(&last_key(&d.name), &now.to_string()))?;
            let (_, next) = schedule.times(now, now).map_err(AgentError::Other)?;
            return Ok(JobStep { create: false, wake_ms: next });
        };
        let (due, wake_ms) = schedule.times(last, now).map_err(AgentError::Other)?;
        let Some(t) = due else { return Ok(JobStep { create: false, wake_ms }) };
        let when = clock_time(t);
        let (last, t_text) = (last_key(&d.name), t.to_string());
        let skip = |reason: &str, message: String| -> Result<JobStep, AgentError> {
            self.db(|s| s.set_meta(&last, &t_text))?;
            if !reason.is_empty() {
                self.event(&d.name, reason, &message);
            }
            Ok(JobStep { create: false, wake_ms })
        };
        if schedule.suspend {
            return skip("", String::new());
        }
        if let Some(late) = schedule.starting_deadline_seconds.filter(|s| now.saturating_sub(t) > s * 1000) {
            let msg = format!("the run of {when} is skipped: more than {late} s late (starting_deadline_seconds)");
            return skip("MissedSchedule", msg);
        }
        let active = mine.iter().any(|r| !ended(r));
        match (active, schedule.concurrency_policy) {
            (true, ConcurrencyPolicy::Allow | ConcurrencyPolicy::Forbid) => {
                skip("RunSkipped", format!("the run of {when} is skipped: the last run goes on"))
            }
            (true, ConcurrencyPolicy::Replace) | (false, _) => {
                if active {
                    self.event(&d.name, "RunReplaced", &format!("the last run is stopped for the run of {when}"));
                }
                // Both or neither: a crash between them neither loses nor repeats the run.
                let due = due_key(&d.name);
                self.db(|s| s.set_metas(&[(last.as_str(), t_text.as_str()), (due.as_str(), t_text.as_str())]))?;
                Ok(JobStep { wake_ms, ..start_run(t)? })
            }
        }
    }

    /// Stops a run past its deadline or its backoff limit: every instance not ended is
    /// held (never started again) with why, a running one killed (again on each pass,
    /// while it still runs: a kill lost to an agent restart is sent anew).
    fn enforce_limits(&self, d: &Deployment, job: &JobSpec, mine: &[&InstanceRow], now: u64) -> Result<(), AgentError> {
        let kill = |r: &InstanceRow| {
            if let Err(e) = self.runtimes.of(r.spec.runtime).signal(&r.container_id, "KILL") {
                tracing::warn!(instance = %r.name, error = %e, "killing a stopped job's instance");
            }
        };
        for r in mine.iter().filter(|r| r.held && r.state == InstanceState::Running && is_stopped_by_job(r)) {
            kill(r);
        }
        let statuses: Vec<_> = mine.iter().map(|r| self.status_of(r)).collect();
        let run = run_status(job, &statuses.iter().collect::<Vec<_>>());
        if run.state != RunState::Running && run.state != RunState::Failed {
            return Ok(());
        }
        let why = match (run.message, self.job_deadline(d, job)?) {
            (Some(m), _) => m,
            (None, Some(at)) if at <= now => {
                format!("{JOB_FAILED}: its deadline of {} s passed", job.active_deadline_seconds.unwrap_or(0))
            }
            _ => return Ok(()),
        };
        let mut stopped = false;
        for r in mine.iter().filter(|r| !ended(r) && !r.held) {
            let running = r.state == InstanceState::Running;
            let why = why.clone();
            self.update_row(&r.name, |row| {
                row.held = true;
                row.message = Some(why);
                if !running {
                    row.state = InstanceState::Exited;
                    row.next_start_ms = None;
                }
                Some(())
            })?;
            if running {
                kill(r);
            }
            stopped = true;
        }
        if stopped {
            self.event(&d.name, "JobFailed", &why);
        }
        Ok(())
    }

    /// When the run's deadline passes (unix ms): from when the run began (not from an
    /// instance's newest start: a retry does not move it).
    fn job_deadline(&self, d: &Deployment, job: &JobSpec) -> Result<Option<u64>, AgentError> {
        let Some(secs) = job.active_deadline_seconds else { return Ok(None) };
        Ok(self.meta_ms(&started_key(&d.name))?.map(|s| s + secs * 1000))
    }

    /// When the loop must look at `d`'s run again for its deadline (unix ms): while the
    /// run goes on, has a deadline still ahead, and was not stopped yet.
    pub(crate) fn job_deadline_wake(&self, d: &Deployment, rows: &[InstanceRow], now: u64) -> Option<u64> {
        let job = d.job.as_ref()?;
        let mine: Vec<&InstanceRow> = rows.iter().filter(|r| r.deployment == d.name).collect();
        if mine.iter().all(|r| ended(r)) || mine.iter().any(|r| is_stopped_by_job(r)) {
            return None;
        }
        self.job_deadline(d, job).ok().flatten().filter(|at| *at > now)
    }

    /// Forgets what is kept for jobs that are no longer on this node (`here`: the jobs
    /// that are), so a job made again later starts afresh.
    pub(crate) fn forget_jobs(&self, here: &HashSet<&str>) -> Result<(), AgentError> {
        for prefix in ["cron/", "job/"] {
            for key in self.db(|s| s.meta_keys(prefix))? {
                let name = key[prefix.len()..].rsplit_once('/').map(|(n, _)| n).unwrap_or_default();
                if !here.contains(name) {
                    self.db(|s| s.delete_meta(&key))?;
                }
            }
        }
        Ok(())
    }
}

/// Whether a job's instance has ended for good.
fn ended(r: &InstanceRow) -> bool {
    matches!(r.state, InstanceState::Exited | InstanceState::Failed)
}

/// Whether the job stopped `r` (its deadline, its backoff limit).
fn is_stopped_by_job(r: &InstanceRow) -> bool {
    r.held && r.message.as_deref().is_some_and(|m| m.starts_with(JOB_FAILED))
}

/// Whether `r`, a job's instance in state Pending, may start now: fewer than
/// `parallelism` of its job's instances run (`running`, counted by the caller).
pub(crate) fn may_start(job: &JobSpec, r: &InstanceRow, running: u32) -> Option<String> {
    (r.state == InstanceState::Pending && running >= job.parallelism)
        .then(|| format!("waiting: {running} of the job's instances run (parallelism {})", job.parallelism))
}
