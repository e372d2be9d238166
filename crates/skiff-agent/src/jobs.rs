//! Jobs and CronJobs on the node that runs them (see `skiff_model::job`). A job's
//! instances are made once and run to completion, at most `parallelism` at once; a run
//! that passes its deadline or its backoff limit is stopped (its instances held, with
//! why). A CronJob's run starts at each time of its schedule by the node's own clock:
//! its last time is kept in `agent.db` (`meta`), so a restarted agent neither runs a time
//! twice nor, within `starting_deadline_seconds`, misses one, and no hub is needed.
//! A new run removes the last run's instances first (they keep its logs until then).

use crate::state::InstanceRow;
use crate::{Agent, AgentError};
use skiff_model::job::{clock_time, run_status, ConcurrencyPolicy, JobSpec, RunState, JOB_FAILED};
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

fn last_key(d: &Deployment) -> String {
    format!("cron/{}/last", d.name)
}

fn due_key(d: &Deployment) -> String {
    format!("cron/{}/due", d.name)
}

impl Agent {
    /// One pass of the job controller for `d` (`job` is its `job`), whose instances here
    /// are `rows`.
    pub(crate) fn step_job(
        self: &Arc<Self>,
        d: &Deployment,
        job: &JobSpec,
        rows: &[InstanceRow],
        stopping: &HashSet<String>,
        now: u64,
    ) -> Result<JobStep, AgentError> {
        let mine: Vec<&InstanceRow> = rows.iter().filter(|r| r.deployment == d.name).collect();
        self.enforce_limits(d, job, &mine, now)?;
        let Some(schedule) = &job.schedule else {
            return Ok(JobStep { create: true, wake_ms: None });
        };
        let meta =
            |k: &str| -> Result<Option<u64>, AgentError> { Ok(self.db(|s| s.meta(k))?.and_then(|v| v.parse().ok())) };
        let set = |k: &str, v: u64| self.db(|s| s.set_meta(k, &v.to_string()));
        // A run asked for: the last run's instances go first, then the new run's are made.
        let start_run = |t: u64| -> Result<JobStep, AgentError> {
            if mine.is_empty() {
                self.db(|s| s.delete_meta(&due_key(d)))?;
                self.event(&d.name, "RunStarted", &format!("the run of {} starts", clock_time(t)));
                return Ok(JobStep { create: true, wake_ms: None });
            }
            for r in &mine {
                self.spawn_stop(r, stopping, false);
            }
            Ok(JobStep::default())
        };
        if let Some(t) = meta(&due_key(d))? {
            return start_run(t);
        }
        let Some(last) = meta(&last_key(d))? else {
            // First seen: its schedule counts from now (times before it are not run).
            set(&last_key(d), now)?;
            let (_, next) = schedule.times(now, now).map_err(AgentError::Other)?;
            return Ok(JobStep { create: false, wake_ms: next });
        };
        let (due, next) = schedule.times(last, now).map_err(AgentError::Other)?;
        let wake_ms = next;
        let Some(t) = due else { return Ok(JobStep { create: false, wake_ms }) };
        set(&last_key(d), t)?;
        let when = clock_time(t);
        if schedule.suspend {
            return Ok(JobStep { create: false, wake_ms });
        }
        if let Some(late) = schedule.starting_deadline_seconds.filter(|s| now.saturating_sub(t) > s * 1000) {
            let msg = format!("the run of {when} is skipped: more than {late} s late (starting_deadline_seconds)");
            self.event(&d.name, "MissedSchedule", &msg);
            return Ok(JobStep { create: false, wake_ms });
        }
        let active = mine.iter().any(|r| !ended(r));
        match (active, schedule.concurrency_policy) {
            (true, ConcurrencyPolicy::Allow | ConcurrencyPolicy::Forbid) => {
                self.event(&d.name, "RunSkipped", &format!("the run of {when} is skipped: the last run goes on"));
            }
            (true, ConcurrencyPolicy::Replace) | (false, _) => {
                if active {
                    self.event(&d.name, "RunReplaced", &format!("the last run is stopped for the run of {when}"));
                }
                set(&due_key(d), t)?;
                return Ok(JobStep { wake_ms, ..start_run(t)? });
            }
        }
        Ok(JobStep { create: false, wake_ms })
    }

    /// Stops a run past its deadline or its backoff limit: every instance not ended is
    /// held (never started again) with why, a running one killed.
    fn enforce_limits(&self, d: &Deployment, job: &JobSpec, mine: &[&InstanceRow], now: u64) -> Result<(), AgentError> {
        let statuses: Vec<_> = mine.iter().map(|r| self.status_of(r)).collect();
        let run = run_status(job, &statuses.iter().collect::<Vec<_>>());
        if run.state != RunState::Running && run.state != RunState::Failed {
            return Ok(());
        }
        let why = match (run.message, self.deadline_ms(job, mine)) {
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
                let _ = self.runtimes.of(r.spec.runtime).signal(&r.container_id, "KILL");
            }
            stopped = true;
        }
        if stopped {
            self.event(&d.name, "JobFailed", &why);
        }
        Ok(())
    }

    /// When the run's deadline passes (unix ms), if it has one and has started.
    fn deadline_ms(&self, job: &JobSpec, mine: &[&InstanceRow]) -> Option<u64> {
        let secs = job.active_deadline_seconds?;
        let started = mine.iter().filter_map(|r| r.started_at_ms).min()?;
        Some(started + secs * 1000)
    }
}

/// When the loop must look at `d`'s run again for its deadline (unix ms): while the run
/// goes on and has one.
pub(crate) fn deadline_wake(d: &Deployment, rows: &[InstanceRow]) -> Option<u64> {
    let secs = d.job.as_ref()?.active_deadline_seconds?;
    let mine: Vec<&InstanceRow> = rows.iter().filter(|r| r.deployment == d.name).collect();
    if mine.iter().all(|r| ended(r)) {
        return None;
    }
    Some(mine.iter().filter_map(|r| r.started_at_ms).min()? + secs * 1000)
}

/// Whether a job's instance has ended for good.
fn ended(r: &InstanceRow) -> bool {
    matches!(r.state, InstanceState::Exited | InstanceState::Failed)
}

/// Whether `r`, a job's instance in state Pending, may start now: fewer than
/// `parallelism` of its job's instances run (`running`, counted by the caller).
pub(crate) fn may_start(job: &JobSpec, r: &InstanceRow, running: u32) -> Option<String> {
    (r.state == InstanceState::Pending && running >= job.parallelism)
        .then(|| format!("waiting: {running} of the job's instances run (parallelism {})", job.parallelism))
}
