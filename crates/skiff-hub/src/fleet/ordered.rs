//! A stateful set's order across the fleet (`OrderedReady`): its instance `n` is placed
//! only once every lower one is placed and reported ready by its node, and when it
//! scales down an instance leaves only once every higher one is gone from its node's
//! report. Each node also keeps the order among its own (the agent's `before_it` and
//! update planner); this covers instances on different nodes.

use crate::schedule::{Plan, Slot};
use skiff_model::{Deployment, InstanceStatus};
use std::collections::BTreeSet;

/// Holds back, in `plan`, what an ordered stateful set must not do yet: new slots above
/// one not yet ready, and removals below an instance still there. `current`: the slots
/// stored now; `reported`: every node's instances. Returns whether anything was held
/// (a later report may release it).
pub(crate) fn hold(
    deployments: &[Deployment],
    current: &[Slot],
    reported: &[(String, InstanceStatus)],
    plan: &mut Plan,
) -> bool {
    let mut held = false;
    for d in deployments.iter().filter(|d| d.ordered()) {
        let mine = |s: &&Slot| s.deployment == d.name;
        let stored: BTreeSet<(u32, &str)> = current.iter().filter(mine).map(|s| (s.index, s.node.as_str())).collect();
        // Ready where it is placed: reported by the node it is stored on, running, ready.
        let ready = |index: u32| {
            current.iter().filter(mine).filter(|s| s.index == index).any(|s| {
                reported.iter().any(|(node, i)| {
                    *node == s.node
                        && i.deployment == d.name
                        && !i.retiring
                        && d.slot_named(&i.name) == Some(index)
                        && super::mesh::serves(i)
                })
            })
        };
        let before = plan.slots.len();
        let mut new: Vec<u32> = plan
            .slots
            .iter()
            .filter(mine)
            .filter(|s| !stored.contains(&(s.index, s.node.as_str())))
            .map(|s| s.index)
            .collect();
        new.sort_unstable();
        // The first new slot whose every lower slot is ready may go; the rest wait.
        let first_allowed = new.first().copied().filter(|&n| (1..n).all(ready));
        plan.slots
            .retain(|s| !mine(&s) || stored.contains(&(s.index, s.node.as_str())) || Some(s.index) == first_allowed);
        held |= plan.slots.len() != before;
        // Leaving: a stored slot past the replicas stays while a higher instance is reported.
        let still = |index: u32| {
            reported.iter().any(|(_, i)| i.deployment == d.name && d.slot_named(&i.name).is_some_and(|n| n > index))
        };
        for s in current.iter().filter(mine).filter(|s| s.index > d.replicas) {
            if still(s.index) && !plan.slots.contains(s) {
                plan.slots.push(s.clone());
                held = true;
            }
        }
    }
    plan.slots.sort();
    held
}

#[cfg(test)]
mod tests {
    use super::*;
    use skiff_model::stateful::{PodManagement, Stateful};
    use skiff_model::{InstanceState, InstanceStatus};

    fn set(replicas: u32) -> Deployment {
        let mut d = Deployment::new("db", "img");
        d.replicas = replicas;
        d.stateful = Some(Stateful { service: None, pod_management: PodManagement::OrderedReady });
        d
    }

    fn slot(index: u32, node: &str) -> Slot {
        Slot { deployment: "db".into(), index, node: node.into() }
    }

    fn running(name: &str, node: &str, health: Option<skiff_model::Health>) -> (String, InstanceStatus) {
        let i = InstanceStatus {
            name: name.into(),
            deployment: "db".into(),
            node: node.into(),
            state: InstanceState::Running,
            pid: Some(1),
            health,
            ..Default::default()
        };
        (node.into(), i)
    }

    #[test]
    fn new_instances_wait_for_every_lower_one_to_be_ready_on_its_node() {
        let d = [set(3)];
        let all = || Plan { slots: vec![slot(1, "a"), slot(2, "b"), slot(3, "c")], ..Default::default() };
        // Nothing placed yet: db-0 alone.
        let mut p = all();
        assert!(hold(&d, &[], &[], &mut p));
        assert_eq!(p.slots, [slot(1, "a")]);
        // db-0 placed but not reported ready (its probe fails): still db-0 alone.
        let mut p = all();
        let unready = running("db-0", "a", Some(skiff_model::Health::Unhealthy));
        assert!(hold(&d, &[slot(1, "a")], std::slice::from_ref(&unready), &mut p));
        assert_eq!(p.slots, [slot(1, "a")]);
        // Reported ready by another node than the one it is placed on: not believed.
        let mut p = all();
        assert!(hold(&d, &[slot(1, "a")], &[running("db-0", "b", None)], &mut p));
        assert_eq!(p.slots, [slot(1, "a")]);
        // Ready: db-1 comes, db-2 waits for it.
        let mut p = all();
        assert!(hold(&d, &[slot(1, "a")], &[running("db-0", "a", None)], &mut p));
        assert_eq!(p.slots, [slot(1, "a"), slot(2, "b")]);
        let mut p = all();
        let both = [running("db-0", "a", None), running("db-1", "b", None)];
        assert!(!hold(&d, &[slot(1, "a"), slot(2, "b")], &both, &mut p), "nothing held");
        assert_eq!(p.slots.len(), 3);
        // Parallel sets and deployments are not held.
        let mut par = set(3);
        par.stateful.as_mut().unwrap().pod_management = PodManagement::Parallel;
        let mut p = all();
        assert!(!hold(&[par], &[], &[], &mut p));
        assert_eq!(p.slots.len(), 3);
    }

    #[test]
    fn leaving_instances_go_from_the_highest_down() {
        let d = [set(1)];
        let stored = [slot(1, "a"), slot(2, "b"), slot(3, "c")];
        let there = [running("db-0", "a", None), running("db-1", "b", None), running("db-2", "c", None)];
        let mut p = Plan { slots: vec![slot(1, "a")], ..Default::default() };
        assert!(hold(&d, &stored, &there, &mut p));
        assert_eq!(p.slots, [slot(1, "a"), slot(2, "b")], "db-2 leaves first; db-1 stays while db-2 is there");
        let mut p = Plan { slots: vec![slot(1, "a")], ..Default::default() };
        assert!(!hold(&d, &stored, &there[..2], &mut p), "db-2 gone: db-1 may leave");
        assert_eq!(p.slots, [slot(1, "a")]);
    }
}
