//! Pure decisions of a node's update: which old instances to keep beside their
//! replacements, which to stop, when a blue-green switch happens, and which instances
//! the published ports send traffic to. Time is an input.
//!
//! Every wanted slot (`web-2`) has at most one *primary* instance, named after the slot.
//! When the template changes, a start-first update renames the old primary to a
//! *retiring* instance (`web-2-<hash>`), which keeps running while a new primary comes
//! up under the slot's name. A stop-first update stops the old primary instead. A
//! retiring instance whose template is wanted again (a rollback) is promoted back.

use skiff_model::rollout::{Strategy, UpdateConfig, CRASH_LOOP_RESTARTS};
use skiff_model::stateful::slot_name;
use skiff_model::{Health, InstanceState};

/// What the planner knows about one instance of the deployment.
#[derive(Debug, Clone)]
pub struct Inst {
    pub name: String,
    pub slot: u32,
    /// The start of its template's hash: a retiring instance is named after its version.
    pub tag: String,
    /// Made from the wanted template.
    pub current: bool,
    pub retiring: bool,
    pub state: InstanceState,
    pub health: Option<Health>,
    pub restarts: u32,
    /// Ready (running, healthy if probed, published port answering) since.
    pub ready_since_ms: Option<u64>,
    /// Blue-green: switched away from, to be stopped at this time.
    pub retire_at_ms: Option<u64>,
    /// Being stopped already.
    pub stopping: bool,
}

impl Inst {
    pub fn ready_for(&self, ms: u64, now: u64) -> bool {
        self.ready_since_ms.is_some_and(|t| now.saturating_sub(t) >= ms)
    }

    /// A new instance that will not become ready on its own.
    pub fn failed(&self) -> Option<String> {
        match (self.state, self.health) {
            (InstanceState::Exited | InstanceState::Failed, _) => Some("exited".into()),
            (_, Some(Health::Unhealthy)) => Some("unhealthy".into()),
            _ if self.restarts >= CRASH_LOOP_RESTARTS => Some(format!("restarted {} times", self.restarts)),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Rename the primary to `to` and keep it running: its replacement starts beside it.
    Retire { name: String, to: String },
    /// Stop and remove. `drop_image`: also delete its image when nothing else uses it.
    Stop { name: String, drop_image: bool },
    /// Rename a retiring instance back to its slot's name.
    Promote { name: String, to: String },
    /// Blue-green: traffic moves to the new instances; the old stop at `retire_at_ms`.
    Switch { names: Vec<String>, retire_at_ms: u64 },
    /// Stop-first update that must wait for the new image (download-then-kill).
    NeedImage,
    /// A new instance failed while the old one it replaces still runs.
    Failed { name: String, why: String },
}

/// The plan for one deployment on this node.
#[derive(Debug, Default)]
pub struct Plan {
    pub actions: Vec<Action>,
    /// Instances the published ports send new connections to.
    pub serving: Vec<String>,
}

pub struct Input<'a> {
    pub deployment: &'a str,
    pub cfg: &'a UpdateConfig,
    /// The slots this node runs.
    pub slots: &'a [u32],
    /// Whether the wanted image is in the store.
    pub image_present: bool,
    pub now: u64,
    /// A stateful set's: named from 0, replaced from the highest slot down.
    pub stateful: bool,
    /// Slots no longer wanted stop from the highest, one at a time (`OrderedReady`).
    pub ordered: bool,
}

pub fn plan(inp: &Input<'_>, insts: &[Inst]) -> Plan {
    let mut p = Plan::default();
    let cfg = inp.cfg;
    let budget = cfg.budget(inp.slots.len() as u32);
    let now = inp.now;
    let primary = |slot: u32| insts.iter().find(|i| !i.retiring && i.slot == slot);
    let stop = |i: &Inst, drop_image: bool| Action::Stop { name: i.name.clone(), drop_image };

    // Slots no longer here (ordered: the highest, once no other is stopping), and retiring
    // instances whose replacement is in place.
    let gone = |i: &&Inst| !inp.slots.contains(&i.slot);
    let last_gone = insts.iter().filter(gone).filter(|i| !i.stopping).max_by_key(|i| i.slot);
    let gone_stopping = insts.iter().filter(gone).any(|i| i.stopping);
    for i in insts.iter().filter(|i| !i.stopping) {
        if !inp.slots.contains(&i.slot) {
            if !inp.ordered || (!gone_stopping && last_gone.is_some_and(|l| l.name == i.name)) {
                p.actions.push(stop(i, false));
            }
            continue;
        }
        if !i.retiring {
            continue;
        }
        let prim = primary(i.slot);
        if i.current {
            // A rollback: the kept instance takes its slot back.
            match prim {
                Some(pr) if !pr.stopping => p.actions.push(stop(pr, false)),
                Some(_) => {}
                None => p.actions.push(Action::Promote {
                    name: i.name.clone(),
                    to: slot_name(inp.deployment, i.slot, inp.stateful),
                }),
            }
            continue;
        }
        match prim {
            Some(pr) if pr.current => {
                if let Some(why) = pr.failed() {
                    p.actions.push(Action::Failed { name: pr.name.clone(), why });
                } else if cfg.strategy == Strategy::BlueGreen {
                    if i.retire_at_ms.is_some_and(|t| now >= t) {
                        p.actions.push(stop(i, false));
                    }
                } else if pr.ready_for(cfg.monitor_ms, now) {
                    p.actions.push(stop(i, false));
                }
            }
            // Its replacement was itself replaced by a newer template. A ready one serves
            // in its place; one that never became ready is not worth keeping instead.
            Some(pr) if pr.ready_since_ms.is_some() => p.actions.push(stop(i, false)),
            Some(pr) if !pr.stopping => p.actions.push(stop(pr, false)),
            _ => {}
        }
    }

    // Blue-green: switch once every slot's new instance has been ready long enough.
    if cfg.strategy == Strategy::BlueGreen {
        let waiting: Vec<&Inst> =
            insts.iter().filter(|i| i.retiring && !i.current && i.retire_at_ms.is_none() && !i.stopping).collect();
        let all_ready =
            inp.slots.iter().all(|&s| primary(s).is_some_and(|pr| pr.current && pr.ready_for(cfg.monitor_ms, now)));
        if !waiting.is_empty() && all_ready {
            p.actions.push(Action::Switch {
                names: waiting.iter().map(|i| i.name.clone()).collect(),
                retire_at_ms: now + cfg.rollback_window_ms,
            });
        }
    }

    // Outdated primaries, in slot order, as the budget allows.
    let outdated: Vec<&Inst> = {
        let mut v: Vec<&Inst> = insts
            .iter()
            .filter(|i| !i.retiring && !i.current && !i.stopping && inp.slots.contains(&i.slot))
            .filter(|i| !p.actions.iter().any(|a| matches!(a, Action::Stop { name, .. } if *name == i.name)))
            .collect();
        // A stateful set's from the highest down, as Kubernetes replaces them.
        v.sort_by_key(|i| if inp.stateful { u32::MAX - i.slot } else { i.slot });
        v
    };
    // A batch waits for the previous one: every new primary ready for `delay_ms`.
    let settled = insts.iter().filter(|i| !i.retiring && i.current).all(|i| i.ready_for(cfg.delay_ms, now));
    if !outdated.is_empty() && (settled || cfg.strategy == Strategy::Recreate) {
        if budget.surge > 0 {
            let in_flight =
                insts.iter().filter(|i| i.retiring && !i.current && i.retire_at_ms.is_none()).count() as u32;
            for i in outdated.iter().take(budget.surge.saturating_sub(in_flight) as usize) {
                p.actions.push(Action::Retire { name: i.name.clone(), to: format!("{}-{}", i.name, i.tag) });
            }
        } else if !inp.image_present && cfg.node_strategy == skiff_model::rollout::NodeStrategy::DownloadThenKill {
            p.actions.push(Action::NeedImage);
        } else {
            let down = inp
                .slots
                .iter()
                .filter(|&&s| primary(s).is_none_or(|pr| pr.stopping || pr.ready_since_ms.is_none()))
                .count() as u32;
            let drop_image = cfg.node_strategy == skiff_model::rollout::NodeStrategy::DeleteThenDownload;
            for i in outdated.iter().take(budget.unavailable.saturating_sub(down) as usize) {
                p.actions.push(stop(i, drop_image));
            }
        }
    }

    // Traffic: before a blue-green switch only the old instances; during a rolling update
    // the ready new ones and the old ones not yet stopping; a rollback's kept instance.
    let pending_switch = cfg.strategy == Strategy::BlueGreen
        && insts
            .iter()
            .any(|i| i.retiring && !i.current && i.retire_at_ms.is_none() && !i.stopping && !switching(&p, &i.name));
    let stopping_now: Vec<&str> = p
        .actions
        .iter()
        .filter_map(|a| match a {
            Action::Stop { name, .. } => Some(name.as_str()),
            _ => None,
        })
        .collect();
    for i in insts
        .iter()
        .filter(|i| !i.stopping && i.state == InstanceState::Running && !stopping_now.contains(&i.name.as_str()))
    {
        let serve = if i.retiring {
            i.current || (i.retire_at_ms.is_none() && !switching(&p, &i.name))
        } else {
            !pending_switch && i.ready_since_ms.is_some()
        };
        if serve {
            p.serving.push(i.name.clone());
        }
    }
    p
}

fn switching(p: &Plan, name: &str) -> bool {
    p.actions.iter().any(|a| matches!(a, Action::Switch { names, .. } if names.iter().any(|n| n == name)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use skiff_model::rollout::{NodeStrategy, UpdateConfig};

    fn inst(name: &str, slot: u32, current: bool) -> Inst {
        Inst {
            name: name.into(),
            slot,
            tag: "abc123".into(),
            current,
            retiring: false,
            state: InstanceState::Running,
            health: None,
            restarts: 0,
            ready_since_ms: Some(0),
            retire_at_ms: None,
            stopping: false,
        }
    }

    fn run(cfg: &UpdateConfig, slots: &[u32], insts: &[Inst], now: u64) -> Plan {
        let inp = Input { deployment: "web", cfg, slots, image_present: true, now, stateful: false, ordered: false };
        plan(&inp, insts)
    }

    fn fast() -> UpdateConfig {
        UpdateConfig { monitor_ms: 1_000, ..Default::default() }
    }

    #[test]
    fn rolling_start_first_keeps_the_old_until_the_new_is_ready() {
        let cfg = fast();
        let old = [inst("web-1", 1, false), inst("web-2", 2, false)];
        let p = run(&cfg, &[1, 2], &old, 10_000);
        assert_eq!(p.actions, [Action::Retire { name: "web-1".into(), to: "web-1-abc123".into() }], "one at a time");
        assert_eq!(p.serving, ["web-1", "web-2"]);

        // The old web-1 retires; the new web-1 is starting.
        let mut retiring = inst("web-1-abc123", 1, false);
        retiring.retiring = true;
        let mut new = inst("web-1", 1, true);
        new.ready_since_ms = None;
        let state = [retiring.clone(), new.clone(), inst("web-2", 2, false)];
        let p = run(&cfg, &[1, 2], &state, 10_100);
        assert!(p.actions.is_empty(), "surge used up, new not ready: {:?}", p.actions);
        assert_eq!(p.serving, ["web-1-abc123", "web-2"], "the new one gets no traffic before it is ready");

        // Ready, but not yet for the monitor period.
        new.ready_since_ms = Some(10_500);
        let state = [retiring.clone(), new.clone(), inst("web-2", 2, false)];
        let p = run(&cfg, &[1, 2], &state, 11_000);
        assert!(p.actions.is_empty(), "{:?}", p.actions);
        assert_eq!(p.serving, ["web-1-abc123", "web-1", "web-2"]);
        let p = run(&cfg, &[1, 2], &state, 11_500);
        assert_eq!(p.actions[0], Action::Stop { name: "web-1-abc123".into(), drop_image: false });
        assert_eq!(p.serving, ["web-1", "web-2"], "a stopping instance leaves the proxy first");
    }

    /// A stateful set's update stops one instance at a time from the highest ordinal, and
    /// its replacement comes under the same name.
    #[test]
    fn a_stateful_set_is_replaced_from_the_top_one_at_a_time() {
        use skiff_model::rollout::IntOrPercent;
        let cfg = UpdateConfig { max_surge: IntOrPercent::Int(0), max_unavailable: IntOrPercent::Int(1), ..fast() };
        let old = [inst("db-0", 1, false), inst("db-1", 2, false), inst("db-2", 3, false)];
        let inp = Input {
            deployment: "db",
            cfg: &cfg,
            slots: &[1, 2, 3],
            image_present: true,
            now: 10_000,
            stateful: true,
            ordered: true,
        };
        assert_eq!(plan(&inp, &old).actions, [Action::Stop { name: "db-2".into(), drop_image: false }]);
        // db-2's replacement not ready yet: nothing more.
        let mut new = inst("db-2", 3, true);
        new.ready_since_ms = None;
        let state = [inst("db-0", 1, false), inst("db-1", 2, false), new.clone()];
        assert!(plan(&inp, &state).actions.is_empty());
        new.ready_since_ms = Some(9_000);
        let state = [inst("db-0", 1, false), inst("db-1", 2, false), new];
        assert_eq!(plan(&inp, &state).actions, [Action::Stop { name: "db-1".into(), drop_image: false }]);
        // Scaling down: the highest first, alone; none while one is stopping.
        let down = Input { slots: &[1], ..inp };
        let all = [inst("db-0", 1, true), inst("db-1", 2, true), inst("db-2", 3, true)];
        assert_eq!(plan(&down, &all).actions, [Action::Stop { name: "db-2".into(), drop_image: false }]);
        let mut stopping = inst("db-2", 3, true);
        stopping.stopping = true;
        let inp = Input { slots: &[1], ..inp };
        assert!(plan(&inp, &[inst("db-0", 1, true), inst("db-1", 2, true), stopping]).actions.is_empty());
    }

    #[test]
    fn a_failing_new_instance_holds_the_update_and_keeps_the_old_one() {
        let cfg = fast();
        let mut retiring = inst("web-1-abc123", 1, false);
        retiring.retiring = true;
        let mut new = inst("web-1", 1, true);
        new.health = Some(Health::Unhealthy);
        new.ready_since_ms = None;
        let p = run(&cfg, &[1, 2], &[retiring.clone(), new.clone(), inst("web-2", 2, false)], 20_000);
        assert_eq!(p.actions, [Action::Failed { name: "web-1".into(), why: "unhealthy".into() }]);
        assert_eq!(p.serving, ["web-1-abc123", "web-2"]);

        // The hub rolls back: the kept instance is the wanted template again.
        retiring.current = true;
        new.current = false;
        let p = run(&cfg, &[1, 2], &[retiring.clone(), new.clone(), inst("web-2", 2, true)], 21_000);
        assert_eq!(p.actions, [Action::Stop { name: "web-1".into(), drop_image: false }]);
        assert_eq!(p.serving, ["web-1-abc123", "web-2"]);
        let p = run(&cfg, &[1, 2], &[retiring, inst("web-2", 2, true)], 21_500);
        assert_eq!(p.actions, [Action::Promote { name: "web-1-abc123".into(), to: "web-1".into() }]);
    }

    #[test]
    fn blue_green_switches_all_at_once_and_keeps_the_old_for_the_window() {
        let cfg = UpdateConfig { strategy: Strategy::BlueGreen, rollback_window_ms: 5_000, ..fast() };
        let p = run(&cfg, &[1, 2], &[inst("web-1", 1, false), inst("web-2", 2, false)], 0);
        assert_eq!(p.actions.len(), 2, "every instance gets its twin at once: {:?}", p.actions);
        let mut old1 = inst("web-1-abc123", 1, false);
        old1.retiring = true;
        let mut old2 = inst("web-2-abc123", 2, false);
        old2.retiring = true;
        let new1 = inst("web-1", 1, true);
        let mut new2 = inst("web-2", 2, true);
        new2.ready_since_ms = None;
        let p = run(&cfg, &[1, 2], &[old1.clone(), old2.clone(), new1.clone(), new2.clone()], 3_000);
        assert!(p.actions.is_empty(), "{:?}", p.actions);
        assert_eq!(p.serving, ["web-1-abc123", "web-2-abc123"], "only the old serve before the switch");
        new2.ready_since_ms = Some(1_000);
        let p = run(&cfg, &[1, 2], &[old1.clone(), old2.clone(), new1.clone(), new2.clone()], 3_000);
        assert_eq!(
            p.actions,
            [Action::Switch { names: vec!["web-1-abc123".into(), "web-2-abc123".into()], retire_at_ms: 8_000 }]
        );
        assert_eq!(p.serving, ["web-1", "web-2"], "the switch moves all traffic at once");
        old1.retire_at_ms = Some(8_000);
        old2.retire_at_ms = Some(8_000);
        let p = run(&cfg, &[1, 2], &[old1.clone(), old2.clone(), new1.clone(), new2.clone()], 7_999);
        assert!(p.actions.is_empty(), "kept for the rollback window: {:?}", p.actions);
        let p = run(&cfg, &[1, 2], &[old1, old2, new1, new2], 8_000);
        assert_eq!(p.actions.len(), 2);
    }

    #[test]
    fn stop_first_strategies() {
        let kill = UpdateConfig { node_strategy: NodeStrategy::KillThenDownload, ..fast() };
        let old = [inst("web-1", 1, false), inst("web-2", 2, false)];
        let p = run(&kill, &[1, 2], &old, 0);
        assert_eq!(p.actions, [Action::Stop { name: "web-1".into(), drop_image: false }]);
        // web-1 is gone and its replacement not ready: nothing more may go down.
        let mut new = inst("web-1", 1, true);
        new.ready_since_ms = None;
        let p = run(&kill, &[1, 2], &[new, inst("web-2", 2, false)], 100);
        assert!(p.actions.is_empty(), "{:?}", p.actions);
        // Nor while the old web-1 is still stopping (it no longer serves).
        let mut going = inst("web-1", 1, false);
        going.stopping = true;
        let p = run(&kill, &[1, 2], &[going, inst("web-2", 2, false)], 100);
        assert!(p.actions.is_empty(), "one down at a time: {:?}", p.actions);

        let download = UpdateConfig {
            max_surge: skiff_model::rollout::IntOrPercent::Int(0),
            max_unavailable: skiff_model::rollout::IntOrPercent::Int(1),
            ..fast()
        };
        let inp = Input {
            deployment: "web",
            cfg: &download,
            slots: &[1, 2],
            image_present: false,
            now: 0,
            stateful: false,
            ordered: false,
        };
        assert_eq!(plan(&inp, &old).actions, [Action::NeedImage], "download-then-kill waits for the image");
        let delete = UpdateConfig { node_strategy: NodeStrategy::DeleteThenDownload, ..fast() };
        assert_eq!(run(&delete, &[1, 2], &old, 0).actions[0], Action::Stop { name: "web-1".into(), drop_image: true });
        let recreate = UpdateConfig { strategy: Strategy::Recreate, ..fast() };
        assert_eq!(run(&recreate, &[1, 2], &old, 0).actions.len(), 2);
    }

    #[test]
    fn scaled_away_slots_stop_and_delay_spaces_batches() {
        let cfg = UpdateConfig { delay_ms: 2_000, ..fast() };
        let mut new = inst("web-1", 1, true);
        new.ready_since_ms = Some(9_000);
        let state = [new, inst("web-2", 2, false), inst("web-3", 3, false)];
        let p = run(&cfg, &[1, 2], &state, 10_000);
        assert_eq!(p.actions, [Action::Stop { name: "web-3".into(), drop_image: false }], "delay not over");
        let p = run(&cfg, &[1, 2], &state, 11_000);
        assert!(p.actions.contains(&Action::Retire { name: "web-2".into(), to: "web-2-abc123".into() }));
    }
}
