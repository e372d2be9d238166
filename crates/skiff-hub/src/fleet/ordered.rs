//! A stateful set's order across the fleet (`OrderedReady`): its instance `n` is placed
//! only once every lower one is placed and reported ready by the node it is placed on.
//! Each node also keeps the order among its own (the agent's `before_it`, and its update
//! planner stopping from the highest); this covers starts on different nodes.

use crate::schedule::{Plan, Slot};
use crate::store::{Store, StoreError};
use skiff_model::{Deployment, InstanceStatus};
use std::collections::{BTreeMap, BTreeSet};

/// Where each slot of a stateful set last ran, `stateful/NAME` → `{index: node}`: its
/// volumes are there, so a slot placed again (a scale down and up, a hub restart) goes
/// back to that node, as a pod goes back to its local volume.
const WHERE: &str = "stateful/";

pub(crate) type LastNodes = BTreeMap<String, BTreeMap<u32, String>>;

/// The slots of the stateful sets' last placements, for those of `deployments`.
pub(crate) fn last_nodes(store: &dyn Store, deployments: &[Deployment]) -> Result<LastNodes, StoreError> {
    if !deployments.iter().any(|d| d.stateful.is_some()) {
        return Ok(LastNodes::new());
    }
    Ok(store
        .states(WHERE)?
        .into_iter()
        .filter_map(|(k, v)| Some((k.strip_prefix(WHERE)?.to_string(), serde_json::from_str(&v).ok()?)))
        .collect())
}

/// `current` with each stateful set's wanted slots that are not placed put back on the
/// node they last ran on (the scheduler keeps a current slot where it is, if it may).
pub(crate) fn with_last_nodes(deployments: &[Deployment], current: &[Slot], last: &LastNodes) -> Vec<Slot> {
    let mut out = current.to_vec();
    for d in deployments.iter().filter(|d| d.stateful.is_some()) {
        let Some(nodes) = last.get(&d.name) else { continue };
        for (&index, node) in nodes.iter().filter(|(i, _)| **i <= d.replicas) {
            if !current.iter().any(|s| s.deployment == d.name && s.index == index) {
                out.push(Slot { deployment: d.name.clone(), index, node: node.clone() });
            }
        }
    }
    out
}

/// Remembers where the stateful sets' slots are placed now (written only when it moved).
pub(crate) fn remember(
    store: &dyn Store,
    deployments: &[Deployment],
    plan: &Plan,
    last: &LastNodes,
) -> Result<(), StoreError> {
    let mut changes = vec![];
    for d in deployments.iter().filter(|d| d.stateful.is_some()) {
        let mut nodes = last.get(&d.name).cloned().unwrap_or_default();
        for s in plan.slots.iter().filter(|s| s.deployment == d.name) {
            nodes.insert(s.index, s.node.clone());
        }
        if last.get(&d.name) != Some(&nodes) {
            let json = serde_json::to_string(&nodes)?;
            changes.push((format!("{WHERE}{}", d.name), Some(json)));
        }
    }
    if changes.is_empty() {
        return Ok(());
    }
    store.put_states(&changes)
}

/// Holds back, in `plan`, the new slots of an ordered stateful set above one not yet
/// ready (said in `unschedulable`). `current`: the slots stored now; `reported`: every
/// node's instances. Returns whether anything was held (a later report may release it).
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
        // Only new slots are held: which instance leaves first on a scale-down is each
        // node's (from its highest); across nodes they leave together.
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
        let this = plan.slots.len() != before;
        held |= this;
        if this {
            let n = new.len() - usize::from(first_allowed.is_some());
            plan.unschedulable
                .entry(d.name.clone())
                .or_insert_with(|| format!("{n} instance(s) wait for the ones below them to be ready (ordered start)"));
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
    fn a_slot_placed_again_goes_back_to_the_node_it_last_ran_on() {
        let d = [set(3)];
        let last: LastNodes =
            [("db".to_string(), [(1, "a".to_string()), (2, "b".to_string()), (4, "d".to_string())].into())].into();
        // Slot 1 is placed (kept as it is); 2 comes back to b; 4 is past the replicas.
        let placed = with_last_nodes(&d, &[slot(1, "c")], &last);
        assert_eq!(placed, [slot(1, "c"), slot(2, "b")]);
        assert!(with_last_nodes(&[Deployment::new("db", "img")], &[], &last).is_empty(), "not a stateful set");
    }
}
