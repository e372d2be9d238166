//! The hub's controllers, run once per hub: placement as nodes come and go, rollouts,
//! the autoscaler and the alert rules. One task ticks every second; each pass reads the
//! time once from the hub's clock and runs on a blocking thread (the store is SQLite).

use crate::Hub;
use std::sync::Arc;
use std::time::Duration;

/// How often each controller runs, in one-second ticks.
#[derive(Debug, Clone, Copy)]
pub struct Every {
    /// Placement even if nothing is known to have changed (node states also change by
    /// heartbeats that stop); joins and returning nodes are placed at the next tick.
    pub placement: u64,
    /// The autoscaler (the HPA sync period).
    pub autoscale: u64,
    /// The alert rules.
    pub alerts: u64,
}

impl Default for Every {
    fn default() -> Self {
        Every { placement: 5, autoscale: 15, alerts: 15 }
    }
}

/// Which controllers run at tick `n` (rollouts and placement changes run at every one).
fn due(n: u64, every: Every) -> (bool, bool, bool) {
    let at = |k: u64| n.is_multiple_of(k.max(1));
    (at(every.placement), at(every.autoscale), at(every.alerts))
}

/// One pass: what is due at tick `n`, at the hub clock's now. Failures are logged; the
/// next pass tries again.
pub fn pass(hub: &Hub, n: u64, every: Every) {
    let (place, autoscale, alerts) = due(n, every);
    if let Err(e) = hub.nodes.tick(place) {
        tracing::warn!(error = %e, "placement");
    }
    let now = hub.clock.now_ms();
    if let Err(e) = hub.roll(now) {
        tracing::warn!(error = %e, "rollouts");
    }
    if autoscale {
        if let Err(e) = hub.autoscale(now) {
            tracing::warn!(error = %e, "autoscaler");
        }
    }
    if alerts {
        if let Err(e) = hub.evaluate_alerts(now) {
            tracing::warn!(error = %e, "alerts");
        }
    }
    if place {
        if let Err(e) = hub.expire_jobs(now) {
            tracing::warn!(error = %e, "finished jobs");
        }
    }
}

/// The store's revision moving, as a hub acts on it: at once, but at most once every
/// [`MOVES_GAP`] (moves that come faster, as thousands of nodes joining, are taken
/// together: each action reads every node or wakes every tunnel). Never, for a store
/// without [`Store::revisions`].
///
/// [`Store::revisions`]: crate::store::Store::revisions
pub struct StoreMoves {
    rx: Option<tokio::sync::watch::Receiver<u64>>,
    last: Option<tokio::time::Instant>,
}

/// The least time between two actions on the store's moves.
pub const MOVES_GAP: Duration = Duration::from_millis(200);

impl StoreMoves {
    pub fn new(rx: Option<tokio::sync::watch::Receiver<u64>>) -> Self {
        StoreMoves { rx, last: None }
    }

    /// Whether the store can say it moved.
    pub fn says(&self) -> bool {
        self.rx.is_some()
    }

    pub async fn next(&mut self) {
        let live = match &mut self.rx {
            Some(r) => r.changed().await.is_ok(),
            None => false,
        };
        if !live {
            std::future::pending::<()>().await;
        }
        if let Some(wait) = self.last.and_then(|l| MOVES_GAP.checked_sub(l.elapsed())) {
            tokio::time::sleep(wait).await;
        }
        // The moves made meanwhile are taken with this one.
        if let Some(r) = &mut self.rx {
            r.borrow_and_update();
        }
        self.last = Some(tokio::time::Instant::now());
    }
}

/// Runs the controllers every second until aborted. A fleet also learns the platforms
/// of the images already stored (they are learnt at each apply; this covers a restart).
/// The task ends only if a pass panics (with that panic).
pub fn spawn(hub: Arc<Hub>, every: Every) -> tokio::task::JoinHandle<()> {
    tokio::spawn(run(hub, every))
}

/// What [`spawn`] runs, for a task that does something first (taking the lead).
pub async fn run(hub: Arc<Hub>, every: Every) {
    if let Some(f) = hub.nodes.fleet() {
        let f = Arc::clone(f);
        let h = Arc::clone(&hub);
        let images: Vec<String> = match tokio::task::spawn_blocking(move || h.store.list()).await {
            Ok(Ok(all)) => all.into_iter().map(|s| s.spec.image).collect(),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "listing deployments for their platforms");
                vec![]
            }
            Err(_) => vec![],
        };
        tokio::spawn(async move {
            for w in f.learn_platforms(&images).await {
                tracing::warn!("{w}");
            }
        });
    }
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Another hub's change (an apply through it, a node joining there) is placed as soon
    // as the store says it moved, not at the next tick.
    let mut moved = StoreMoves::new(hub.store.revisions());
    let mut n = 0u64;
    loop {
        let h = Arc::clone(&hub);
        let done = tokio::select! {
            _ = tick.tick() => {
                let this = n;
                n += 1;
                tokio::task::spawn_blocking(move || pass(&h, this, every)).await
            }
            _ = moved.next() => {
                tokio::task::spawn_blocking(move || {
                    if let Err(e) = h.nodes.tick(false) {
                        tracing::warn!(error = %e, "placement");
                    }
                })
                .await
            }
        };
        if let Err(e) = done {
            if e.is_panic() {
                // The task ends with the panic: its owner stops the process.
                std::panic::resume_unwind(e.into_panic());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::testing::fleet_hub;
    use skiff_model::api::ApplyRequest;
    use skiff_model::Deployment;

    /// Placement moves with the hub's clock, not the wall's: a node that falls silent
    /// keeps its instance through `reschedule_after`, and loses it at the first forced
    /// placement after — all on a clock that moves only when the test says.
    #[tokio::test]
    async fn a_silent_node_loses_its_instance_after_reschedule_after_on_the_hubs_clock() {
        let t = tempfile::tempdir().unwrap();
        let clock = ManualClock::at(1_000_000);
        let (f, hub) = fleet_hub(t.path(), Arc::clone(&clock), &["a", "b"]);
        let mut d = Deployment::new("web", "img:1");
        d.placement.reschedule_after_ms = Some(120_000);
        hub.apply(&ApplyRequest { deployments: vec![d], ..Default::default() }).await.unwrap();
        let every = Every::default();
        pass(&hub, 0, every);
        let first = f.nodes_of("web");
        assert_eq!(first.len(), 1, "one replica, one node");
        let (gone, stays) = if first[0] == "a" { ("a", "b") } else { ("b", "a") };
        // `gone` falls silent; `stays` keeps reporting every 10 s. Unknown after the
        // heartbeat grace (40 s), then 120 s more before its slot moves.
        for s in 1..=15u64 {
            clock.advance(10_000);
            f.heartbeat(stays, Default::default()).unwrap();
            pass(&hub, s * every.placement, every);
            assert_eq!(f.nodes_of("web"), [gone], "kept at {} s silent", s * 10);
        }
        for s in 16..=17u64 {
            clock.advance(10_000);
            f.heartbeat(stays, Default::default()).unwrap();
            pass(&hub, s * every.placement, every);
        }
        assert_eq!(f.nodes_of("web"), [stays], "moved once silent for grace + reschedule_after");
        let views = f.views().unwrap();
        let state = |n: &str| views.iter().find(|v| v.name == n).map(|v| v.state);
        assert_eq!(state(gone), Some(crate::schedule::NodeState::Unknown));
        assert_eq!(state(stays), Some(crate::schedule::NodeState::Ready));
    }

    #[test]
    fn each_controller_runs_at_its_own_period() {
        let every = Every { placement: 5, autoscale: 15, alerts: 3 };
        let runs = |pick: fn((bool, bool, bool)) -> bool| (0..30).filter(|&n| pick(due(n, every))).count();
        assert_eq!(runs(|d| d.0), 6);
        assert_eq!(runs(|d| d.1), 2);
        assert_eq!(runs(|d| d.2), 10);
        let zero = Every { placement: 0, autoscale: 0, alerts: 0 };
        assert_eq!(due(7, zero), (true, true, true), "a period of 0 counts as every tick");
    }
}
