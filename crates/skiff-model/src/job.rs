//! Run-to-completion work (Kubernetes `Job` and `CronJob`): a deployment with `job` runs
//! `completions` instances (`NAME-1` … `NAME-N`) to a successful exit, at most
//! `parallelism` at once, all on one node. With `schedule` it is a CronJob: the node that
//! runs it starts a fresh run at each time the pattern names, by its own clock, also
//! while the hub is away.

use crate::validate::ValidationError;
use crate::{InstanceState, InstanceStatus};
use serde::{Deserialize, Serialize};

/// The most instances one run may have.
pub const MAX_COMPLETIONS: u32 = 100;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    /// Successful instances a run needs (each of `NAME-1` … `NAME-N` once).
    #[serde(default = "one")]
    pub completions: u32,
    /// Instances running at once.
    #[serde(default = "one")]
    pub parallelism: u32,
    /// Failed runs of its instances (each retry counts) before the run fails.
    #[serde(default = "six")]
    pub backoff_limit: u32,
    /// The run fails when it has not finished this long after it started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_deadline_seconds: Option<u64>,
    /// A finished job (not a CronJob) is deleted this long after it finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_seconds_after_finished: Option<u64>,
    /// A CronJob's schedule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<Schedule>,
}

fn one() -> u32 {
    1
}

fn six() -> u32 {
    6
}

impl Default for JobSpec {
    fn default() -> Self {
        JobSpec {
            completions: 1,
            parallelism: 1,
            backoff_limit: 6,
            active_deadline_seconds: None,
            ttl_seconds_after_finished: None,
            schedule: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Schedule {
    /// A five-field cron pattern (`30 2 * * *`) or `@hourly`, `@daily`, `@weekly`,
    /// `@monthly`, `@yearly`.
    pub cron: String,
    /// An IANA time zone (`Europe/Berlin`) the pattern is read in; UTC when not given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_zone: Option<String>,
    #[serde(default)]
    pub concurrency_policy: ConcurrencyPolicy,
    /// A run that could not start within this long of its time is skipped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub starting_deadline_seconds: Option<u64>,
    /// No new runs while true (a run going on finishes).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub suspend: bool,
}

/// What a CronJob's time does while its last run still goes on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConcurrencyPolicy {
    /// Kubernetes' default. Runs of one CronJob share its instance names, so a run never
    /// starts beside another: the time is skipped, as `Forbid` does.
    #[default]
    Allow,
    /// The time is skipped.
    Forbid,
    /// The run going on is stopped and a new one starts.
    Replace,
}

impl Schedule {
    /// The parsed pattern and time zone.
    pub fn parsed(&self) -> Result<(croner::Cron, chrono_tz::Tz), String> {
        let cron = croner::parser::CronParser::builder()
            .seconds(croner::parser::Seconds::Disallowed)
            .build()
            .parse(&self.cron)
            .map_err(|e| format!("{:?} is not a cron pattern: {e}", self.cron))?;
        let tz = match &self.time_zone {
            None => chrono_tz::UTC,
            Some(z) => z.parse::<chrono_tz::Tz>().map_err(|_| format!("{z:?} is not an IANA time zone"))?,
        };
        Ok((cron, tz))
    }

    /// The newest time of the schedule after `after_ms` and at most `now_ms` (unix ms),
    /// and the next one after `now_ms`.
    pub fn times(&self, after_ms: u64, now_ms: u64) -> Result<(Option<u64>, Option<u64>), String> {
        use chrono::TimeZone;
        let (cron, tz) = self.parsed()?;
        let at = |ms: u64| tz.timestamp_millis_opt(ms as i64).single();
        let now = at(now_ms).ok_or("the clock is out of range")?;
        let due = cron
            .find_previous_occurrence(&now, true)
            .ok()
            .map(|t| t.timestamp_millis().max(0) as u64)
            .filter(|t| *t > after_ms);
        let next = cron.find_next_occurrence(&now, false).ok().map(|t| t.timestamp_millis().max(0) as u64);
        Ok((due, next))
    }
}

impl JobSpec {
    pub(crate) fn check(&self, replicas: u32) -> Result<(), ValidationError> {
        if !(1..=MAX_COMPLETIONS).contains(&self.completions) {
            return Err(ValidationError::new("job.completions", format!("must be 1 to {MAX_COMPLETIONS}")));
        }
        if self.parallelism == 0 || self.parallelism > MAX_COMPLETIONS {
            return Err(ValidationError::new("job.parallelism", format!("must be 1 to {MAX_COMPLETIONS}")));
        }
        if self.backoff_limit > 1000 {
            return Err(ValidationError::new("job.backoff_limit", "must be at most 1000"));
        }
        if replicas != self.completions {
            return Err(ValidationError::new(
                "replicas",
                format!("a job's instances are its completions ({}), not {replicas}", self.completions),
            ));
        }
        if self.active_deadline_seconds == Some(0) {
            return Err(ValidationError::new("job.active_deadline_seconds", "must be more than 0"));
        }
        if let Some(s) = &self.schedule {
            s.parsed().map_err(|e| ValidationError::new("job.schedule", e))?;
            if self.ttl_seconds_after_finished.is_some() {
                return Err(ValidationError::new(
                    "job.ttl_seconds_after_finished",
                    "is for a job, not a CronJob (its runs are kept until the next)",
                ));
            }
        }
        Ok(())
    }
}

/// How a job's run stands, from its instances.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RunState {
    /// A CronJob before its first run.
    Waiting,
    Running,
    Complete,
    Failed,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunStatus {
    pub state: RunState,
    pub succeeded: u32,
    /// Failed runs of its instances (each retry counts).
    pub failures: u32,
    pub active: u32,
    pub started_ms: Option<u64>,
    pub finished_ms: Option<u64>,
    /// Why it failed.
    pub message: Option<String>,
}

/// Whether an instance of a job has ended for good: succeeded, or failed with no retry
/// left (or stopped by the job: its deadline, its backoff limit).
pub fn ended(i: &InstanceStatus) -> bool {
    matches!(i.state, InstanceState::Exited | InstanceState::Failed)
}

/// The run of `job` its instances (`mine`, this deployment's) make: how many succeeded,
/// how many failures, whether it is over.
pub fn run_status(job: &JobSpec, mine: &[&InstanceStatus]) -> RunStatus {
    let succeeded = mine.iter().filter(|i| ended(i) && i.exit_code == Some(0)).count() as u32;
    let failed_now = mine.iter().filter(|i| ended(i) && i.exit_code != Some(0)).count() as u32;
    // A failed run waiting for its retry counts now (its restart counts only once made).
    let waiting = mine.iter().filter(|i| i.state == InstanceState::Restarting).count() as u32;
    let failures = mine.iter().map(|i| i.restarts).sum::<u32>() + failed_now + waiting;
    let active = mine.iter().filter(|i| !ended(i)).count() as u32;
    let started_ms = mine.iter().filter_map(|i| i.started_at_ms).min();
    let finished_ms = mine.iter().filter_map(|i| i.finished_at_ms).max();
    // What stopped it, as the node said (deadline, backoff limit).
    let stopped = mine.iter().find_map(|i| i.message.as_deref().filter(|m| m.starts_with(JOB_FAILED)));
    let (state, message) = if mine.is_empty() {
        (RunState::Waiting, None)
    } else if let Some(m) = stopped {
        (RunState::Failed, Some(m.to_string()))
    } else if succeeded >= job.completions {
        (RunState::Complete, None)
    } else if failures > job.backoff_limit || (failed_now > 0 && active == 0) {
        (RunState::Failed, Some(format!("{JOB_FAILED}: {failures} failed runs (backoff limit {})", job.backoff_limit)))
    } else {
        (RunState::Running, None)
    };
    let finished_ms = finished_ms.filter(|_| matches!(state, RunState::Complete | RunState::Failed));
    RunStatus { state, succeeded, failures, active, started_ms, finished_ms, message }
}

/// `GET /api/v1/jobs`: a job and its (last) run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobView {
    pub name: String,
    pub stack: String,
    /// A CronJob's pattern (and time zone).
    pub schedule: Option<String>,
    pub suspended: bool,
    pub completions: u32,
    pub parallelism: u32,
    pub run: RunStatus,
    /// Where its instances run.
    pub nodes: Vec<String>,
}

/// The jobs among `deployments`, each with its run as `instances` report it.
pub fn views(deployments: &[crate::Deployment], instances: &[InstanceStatus]) -> Vec<JobView> {
    deployments
        .iter()
        .filter_map(|d| {
            let job = d.job.as_ref()?;
            let mine: Vec<&InstanceStatus> = instances.iter().filter(|i| i.deployment == d.name).collect();
            let mut nodes: Vec<String> = mine.iter().map(|i| i.node.clone()).collect();
            nodes.sort();
            nodes.dedup();
            Some(JobView {
                name: d.name.clone(),
                stack: d.stack.clone(),
                schedule: job.schedule.as_ref().map(|s| match &s.time_zone {
                    Some(z) => format!("{} ({z})", s.cron),
                    None => s.cron.clone(),
                }),
                suspended: job.schedule.as_ref().is_some_and(|s| s.suspend),
                completions: job.completions,
                parallelism: job.parallelism,
                run: run_status(job, &mine),
                nodes,
            })
        })
        .collect()
}

/// A time (unix ms) as people read it, in UTC.
pub fn clock_time(ms: u64) -> String {
    chrono::DateTime::from_timestamp_millis(ms as i64)
        .map(|t| t.format("%Y-%m-%d %H:%M UTC").to_string())
        .unwrap_or_else(|| ms.to_string())
}

/// How the message of an instance a job stopped starts.
pub const JOB_FAILED: &str = "job failed";

#[cfg(test)]
mod tests {
    use super::*;

    const H: u64 = 3_600_000;

    #[test]
    fn schedules_read_five_fields_nicknames_and_time_zones() {
        let s = |cron: &str, tz: Option<&str>| Schedule {
            cron: cron.into(),
            time_zone: tz.map(String::from),
            concurrency_policy: ConcurrencyPolicy::Forbid,
            starting_deadline_seconds: None,
            suspend: false,
        };
        // 2026-12-06 03:30 UTC.
        let now = 1_796_527_800_000;
        let (due, next) = s("0 * * * *", None).times(now - H, now).unwrap();
        assert_eq!(due, Some(now - 30 * 60_000), "03:00");
        assert_eq!(next, Some(now + 30 * 60_000), "04:00");
        assert_eq!(s("0 * * * *", None).times(now - 30 * 60_000, now).unwrap().0, None, "already run");
        assert_eq!(s("@hourly", None).times(now - H, now).unwrap(), (due, next));
        // 04:30 in Berlin (UTC+1 in December) is 03:30 UTC.
        let (due, _) = s("30 4 * * *", Some("Europe/Berlin")).times(now - H, now).unwrap();
        assert_eq!(due, Some(now));
        assert!(s("0 * * *", None).parsed().unwrap_err().contains("is not a cron pattern"));
        assert!(s("0 0 * * * *", None).parsed().is_err(), "no seconds field");
        assert_eq!(
            s("@daily", Some("Mars/Olympus")).parsed().unwrap_err(),
            "\"Mars/Olympus\" is not an IANA time zone"
        );
    }

    fn inst(name: &str, state: InstanceState, exit: Option<i32>, restarts: u32) -> InstanceStatus {
        InstanceStatus {
            name: name.into(),
            deployment: "j".into(),
            state,
            exit_code: exit,
            restarts,
            started_at_ms: Some(10),
            finished_at_ms: exit.map(|_| 20),
            ..Default::default()
        }
    }

    #[test]
    fn a_run_completes_fails_or_goes_on_as_its_instances_say() {
        let job = JobSpec { completions: 2, backoff_limit: 2, ..Default::default() };
        let st = |is: &[InstanceStatus]| run_status(&job, &is.iter().collect::<Vec<_>>());
        assert_eq!(st(&[]).state, RunState::Waiting);
        let ok = inst("j-1", InstanceState::Exited, Some(0), 0);
        let running = inst("j-2", InstanceState::Running, None, 1);
        let s = st(&[ok.clone(), running.clone()]);
        assert_eq!((s.state, s.succeeded, s.failures, s.active, s.finished_ms), (RunState::Running, 1, 1, 1, None));
        let s = st(&[ok.clone(), inst("j-2", InstanceState::Exited, Some(0), 1)]);
        assert_eq!((s.state, s.succeeded, s.finished_ms), (RunState::Complete, 2, Some(20)));
        let s = st(&[ok.clone(), inst("j-2", InstanceState::Restarting, Some(1), 1)]);
        assert_eq!((s.state, s.failures), (RunState::Running, 2), "one retried, one waiting for its retry");
        let s = st(&[ok.clone(), inst("j-2", InstanceState::Restarting, Some(1), 2)]);
        assert_eq!(s.state, RunState::Failed, "3 failures > backoff limit 2, before a third retry");
        let s = st(&[ok.clone(), inst("j-2", InstanceState::Failed, Some(1), 1)]);
        assert_eq!(s.state, RunState::Failed, "no retry left");
        let mut stopped = running;
        stopped.state = InstanceState::Exited;
        stopped.exit_code = Some(137);
        stopped.message = Some(format!("{JOB_FAILED}: deadline of 60 s passed"));
        assert_eq!(st(&[ok, stopped]).message.as_deref(), Some("job failed: deadline of 60 s passed"));
    }
}
