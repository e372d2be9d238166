//! Step *exit*: a running instance's shim is watched through a pidfd, so its end wakes
//! the loop within milliseconds; the exit is recorded with its code, signal and OOM
//! kill, and the restart policy (Docker's back-off) says whether and when it runs again.

use crate::state::InstanceRow;
use crate::supervise::{after_exit, AfterExit};
use crate::{blocking, Agent};
use skiff_model::InstanceState;
use std::sync::Arc;

impl Agent {
    /// Watches the instance's shim so that its end wakes the loop (or, if it cannot be
    /// watched, marks it for polling).
    pub(crate) async fn watch_exit(self: &Arc<Self>, r: &InstanceRow) {
        let rt = self.runtimes.of(r.spec.runtime);
        let id = r.container_id.clone();
        let (rt2, id2) = (Arc::clone(&rt), id.clone());
        match blocking(move || rt2.watch_pid(&id2)).await {
            Some(pid) => {
                self.exits.watch(&id, pid, || rt.watch_pid(&id) == Some(pid));
            }
            None => self.exits.poll_instead(&id),
        }
    }

    /// Records an exit as an event and applies the restart policy; returns the row for
    /// the caller to store. `cause` (event reason, message) explains exits the container
    /// did not report itself.
    pub(crate) fn on_exit(
        &self,
        mut r: InstanceRow,
        exit: skiff_model::ExitStatus,
        now: u64,
        cause: Option<(&'static str, &str)>,
    ) -> InstanceRow {
        self.stop_health(&r.name);
        r.exit_code = Some(exit.code);
        r.oom_killed = exit.oom_killed;
        r.finished_at_ms = Some(exit.finished_at_ms);
        r.pid = None;
        r.health = None;
        r.health_failures = 0;
        let (reason, what) = match (cause, &exit.message) {
            (Some((reason, message)), _) => (reason, message.to_string()),
            (None, Some(m)) if exit.oom_killed => ("OOMKilled", format!("{m} (exit code {})", exit.code)),
            (None, None) if exit.oom_killed => ("OOMKilled", format!("OOM-killed (exit code {})", exit.code)),
            (None, Some(m)) => ("Exited", format!("exited with code {}: {m}", exit.code)),
            (None, None) => ("Exited", format!("exited with code {}", exit.code)),
        };
        self.event(&r.name, reason, &what);
        if r.held {
            // `skiff stop INSTANCE`: it stays stopped, whatever its restart policy.
            r.restart_requested = false;
            r.state = InstanceState::Exited;
            r.next_start_ms = None;
            // A job that stopped it says why (its deadline, its backoff limit).
            let job = r.message.take().filter(|m| m.starts_with(skiff_model::job::JOB_FAILED));
            r.message = Some(job.unwrap_or_else(|| format!("{what}; {}", crate::HELD)));
            return r;
        }
        if r.restart_requested {
            // `skiff restart INSTANCE`: again at once, from its own spec.
            r.restart_requested = false;
            r.state = InstanceState::Restarting;
            r.next_start_ms = Some(now);
            r.message = Some(format!("{what}; restarted by request"));
            return r;
        }
        match after_exit(r.spec.restart, &exit, r.started_at_ms, r.streak, r.restarts, now) {
            AfterExit::Restart { at_ms, streak } => {
                r.state = InstanceState::Restarting;
                r.streak = streak;
                r.next_start_ms = Some(at_ms);
                r.message = Some(format!("{what}; restarting in {} ms", at_ms - now));
            }
            AfterExit::Stay => {
                r.state = InstanceState::Exited;
                r.next_start_ms = None;
                r.message = Some(what);
            }
        }
        r
    }
}
