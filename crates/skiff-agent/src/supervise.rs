//! Pure decisions of the supervisor: what to do when an instance exits, whether its
//! dependencies allow it to start, and health-check bookkeeping. Time is an input.

use skiff_model::{
    restart_backoff_ms, DependencyCondition, Deployment, ExitStatus, Health, InstanceState, RestartPolicy,
    BACKOFF_RESET_MS,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterExit {
    /// Start again at `at_ms`; `streak` is the new count of quick consecutive exits.
    Restart {
        at_ms: u64,
        streak: u32,
    },
    Stay,
}

/// Docker's restart manager: delay doubling from 100 ms per quick exit, reset once the
/// instance has run for 10 s. `restarts` counts restarts already done.
pub fn after_exit(
    policy: RestartPolicy,
    exit: &ExitStatus,
    started_at_ms: Option<u64>,
    streak: u32,
    restarts: u32,
    now_ms: u64,
) -> AfterExit {
    if !policy.should_restart(exit.code, restarts, false) {
        return AfterExit::Stay;
    }
    let ran = started_at_ms.map(|s| exit.finished_at_ms.saturating_sub(s)).unwrap_or(0);
    let streak = if ran >= BACKOFF_RESET_MS { 0 } else { streak };
    // The back-off counts from the exit, as Docker's does: the milliseconds the agent took
    // to learn of it (the shim's `runc delete`) are not added on top. An exit time that is
    // ahead of the agent's clock, or older than the back-off, is not trusted.
    let backoff = restart_backoff_ms(streak);
    let exited = exit.finished_at_ms;
    let from = if exited <= now_ms && now_ms - exited < backoff { exited } else { now_ms };
    AfterExit::Restart { at_ms: from + backoff, streak: streak + 1 }
}

/// What the supervisor knows about another deployment's instances.
pub struct Peer<'a> {
    pub deployment: &'a str,
    pub state: InstanceState,
    pub health: Option<Health>,
    pub has_healthcheck: bool,
    pub exit_code: Option<i32>,
}

/// The first unmet dependency, as a message, or None when `d` may start.
pub fn unmet_dependency(d: &Deployment, peers: &[Peer<'_>]) -> Option<String> {
    for dep in &d.depends_on {
        let mine: Vec<&Peer<'_>> = peers.iter().filter(|p| p.deployment == dep.name).collect();
        if mine.is_empty() {
            return Some(format!("waiting for {} to exist", dep.name));
        }
        let ok = match dep.condition {
            DependencyCondition::ServiceStarted => mine.iter().any(|p| p.state == InstanceState::Running),
            DependencyCondition::ServiceHealthy => mine.iter().all(|p| {
                p.state == InstanceState::Running && (!p.has_healthcheck || p.health == Some(Health::Healthy))
            }),
            DependencyCondition::ServiceCompletedSuccessfully => {
                mine.iter().all(|p| p.state == InstanceState::Exited && p.exit_code == Some(0))
            }
        };
        if !ok {
            let what = match dep.condition {
                DependencyCondition::ServiceStarted => "to start",
                DependencyCondition::ServiceHealthy => "to be healthy",
                DependencyCondition::ServiceCompletedSuccessfully => "to complete successfully",
            };
            return Some(format!("waiting for {} {what}", dep.name));
        }
    }
    None
}

/// Health after one probe, Docker's rules: a success makes it healthy; failures during the
/// start period do not count; `retries` consecutive failures make it unhealthy.
pub fn after_probe(
    ok: bool,
    failures: u32,
    retries: u32,
    in_start_period: bool,
    current: Option<Health>,
) -> (Option<Health>, u32) {
    if ok {
        return (Some(Health::Healthy), 0);
    }
    if in_start_period {
        return (current.or(Some(Health::Starting)), failures);
    }
    let failures = failures + 1;
    if failures >= retries.max(1) {
        (Some(Health::Unhealthy), failures)
    } else {
        (current.or(Some(Health::Starting)), failures)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use skiff_model::Dependency;

    fn exit(code: i32, at: u64) -> ExitStatus {
        ExitStatus { code, signal: None, oom_killed: false, finished_at_ms: at, message: None }
    }

    #[test]
    fn backoff_grows_then_resets() {
        let p = RestartPolicy::Always;
        // Quick exits: 100, 200, 400 ms.
        assert_eq!(after_exit(p, &exit(1, 1000), Some(900), 0, 0, 1000), AfterExit::Restart { at_ms: 1100, streak: 1 });
        assert_eq!(after_exit(p, &exit(1, 1000), Some(900), 1, 1, 1000), AfterExit::Restart { at_ms: 1200, streak: 2 });
        assert_eq!(after_exit(p, &exit(1, 1000), Some(900), 2, 2, 1000), AfterExit::Restart { at_ms: 1400, streak: 3 });
        // Ran 10 s: back to 100 ms.
        assert_eq!(
            after_exit(p, &exit(1, 20_000), Some(10_000), 5, 5, 20_000),
            AfterExit::Restart { at_ms: 20_100, streak: 1 }
        );
    }

    #[test]
    fn backoff_counts_from_the_exit_when_its_time_is_sane() {
        let p = RestartPolicy::Always;
        // Learnt of 9 ms after the exit: the restart is 100 ms after the exit.
        assert_eq!(after_exit(p, &exit(1, 1000), Some(900), 0, 0, 1009), AfterExit::Restart { at_ms: 1100, streak: 1 });
        // An exit "in the future" (another clock) or older than the back-off: from now.
        assert_eq!(after_exit(p, &exit(1, 1050), Some(900), 0, 0, 1009), AfterExit::Restart { at_ms: 1109, streak: 1 });
        assert_eq!(after_exit(p, &exit(1, 500), Some(400), 0, 0, 1009), AfterExit::Restart { at_ms: 1109, streak: 1 });
    }

    #[test]
    fn on_failure_gives_up() {
        let p = RestartPolicy::OnFailure { max_retries: Some(3) };
        assert!(matches!(after_exit(p, &exit(1, 0), None, 0, 2, 0), AfterExit::Restart { .. }));
        assert_eq!(after_exit(p, &exit(1, 0), None, 0, 3, 0), AfterExit::Stay);
        assert_eq!(after_exit(p, &exit(0, 0), None, 0, 0, 0), AfterExit::Stay);
        assert_eq!(after_exit(RestartPolicy::No, &exit(1, 0), None, 0, 0, 0), AfterExit::Stay);
    }

    #[test]
    fn dependencies() {
        let mut d = Deployment::new("web", "i");
        d.depends_on = vec![Dependency { name: "db".into(), condition: DependencyCondition::ServiceHealthy }];
        let peer = |state, health| Peer { deployment: "db", state, health, has_healthcheck: true, exit_code: None };
        assert_eq!(unmet_dependency(&d, &[]).as_deref(), Some("waiting for db to exist"));
        assert_eq!(
            unmet_dependency(&d, &[peer(InstanceState::Running, Some(Health::Starting))]).as_deref(),
            Some("waiting for db to be healthy")
        );
        assert_eq!(unmet_dependency(&d, &[peer(InstanceState::Running, Some(Health::Healthy))]), None);
    }

    #[test]
    fn probes() {
        assert_eq!(after_probe(false, 0, 3, true, None), (Some(Health::Starting), 0));
        assert_eq!(after_probe(false, 1, 3, false, Some(Health::Starting)), (Some(Health::Starting), 2));
        assert_eq!(after_probe(false, 2, 3, false, Some(Health::Healthy)), (Some(Health::Unhealthy), 3));
        assert_eq!(after_probe(true, 2, 3, false, Some(Health::Unhealthy)), (Some(Health::Healthy), 0));
    }
}
