//! Rebuilding `agent.db` from the node itself, when it was found corrupt: every instance
//! directory holds `instance.json`, the record of what the agent created it as (name,
//! deployment, address, container id), written as the instance starts (one whose record
//! cannot be written is stopped again). From those the agent knows again which containers are its own (and adopts them, same pids), which
//! addresses they hold, and — until the hub sends the node's assignment again — what to
//! keep running: the deployments and slots of those instances. Nothing running is
//! stopped or restarted by the rebuild; events and unshipped samples are lost with the
//! old file (it stays beside the new one for a post-mortem).

use crate::state::{InstanceRow, State};
use skiff_model::{Deployment, InstanceState};
use std::collections::BTreeMap;
use std::path::Path;

/// The record in each instance directory.
pub const RECORD: &str = "instance.json";

/// Why an instance's record could not be written.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("encoding the instance's record: {0}")]
    Encode(#[from] serde_json::Error),
    #[error(transparent)]
    Write(#[from] skiff_sys::durable::DurableError),
}

/// Writes `row` as the instance's record (durably: a rebuild after a power cut needs it).
pub fn write_record(dir: &Path, row: &InstanceRow) -> Result<(), RecordError> {
    let bytes = serde_json::to_vec_pretty(row)?;
    Ok(skiff_sys::durable::write(&dir.join(RECORD), &bytes, 0o600)?)
}

/// The records found in `dirs` (instance directories); unreadable ones are skipped.
pub fn read_records(dirs: impl IntoIterator<Item = std::path::PathBuf>) -> Vec<InstanceRow> {
    dirs.into_iter()
        .filter_map(|d| std::fs::read(d.join(RECORD)).ok())
        .filter_map(|b| serde_json::from_slice::<InstanceRow>(&b).ok())
        .collect()
}

/// What a rebuild found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Rebuilt {
    /// The node id the instances' container ids carry.
    pub node_id: Option<String>,
    pub instances: usize,
    pub deployments: usize,
}

/// Fills a new `state` from `records`: instances (as running: the reconcile loop sees at
/// once which are, which exited and which were lost), their leases, and desired state
/// from their deployments and slots, at revision 0 (the hub then sends the whole
/// assignment).
pub fn rebuild(state: &mut State, records: Vec<InstanceRow>) -> Result<Rebuilt, crate::state::StateError> {
    let mut out = Rebuilt::default();
    let mut ids: BTreeMap<String, usize> = BTreeMap::new();
    let mut desired: BTreeMap<String, (Deployment, Vec<u32>)> = BTreeMap::new();
    for mut row in records {
        if let Some(id) = row.container_id.split('-').next() {
            *ids.entry(id.to_string()).or_default() += 1;
        }
        let entry = desired.entry(row.deployment.clone()).or_insert_with(|| (row.spec.clone(), vec![]));
        if !row.retiring {
            entry.0 = row.spec.clone();
            if let Some(slot) = crate::slot_of(&row) {
                entry.1.push(slot);
            }
        }
        row.state = InstanceState::Running;
        row.pid = None;
        for (network, ip) in &row.addresses {
            state.set_lease(&row.name, network, &ip.to_string())?;
        }
        if let (Some(ip), true) = (&row.ip, row.addresses.is_empty()) {
            state.set_lease(&row.name, "", ip)?;
        }
        state.put_instance(&row)?;
        out.instances += 1;
    }
    out.node_id = ids.into_iter().max_by_key(|(_, n)| *n).map(|(id, _)| id);
    let slots: Vec<(Deployment, Option<Vec<u32>>)> = desired
        .into_values()
        .map(|(d, mut idx)| {
            idx.sort_unstable();
            idx.dedup();
            (d, Some(idx))
        })
        .collect();
    out.deployments = slots.len();
    state.set_desired_slots(&slots, 0)?;
    if let Some(id) = &out.node_id {
        state.set_meta("node_id", id)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(name: &str, dep: &str, id: &str, ip: &str, retiring: bool) -> InstanceRow {
        let mut spec = Deployment::new(dep, "img");
        spec.replicas = 3;
        let mut r = InstanceRow::pending(name.into(), dep.into(), id.into(), spec);
        (r.state, r.pid, r.ip, r.restarts, r.retiring) = (InstanceState::Exited, Some(1), Some(ip.into()), 2, retiring);
        r
    }

    #[test]
    fn a_rebuilt_state_keeps_the_node_s_instances_addresses_and_slots() {
        let t = tempfile::tempdir().unwrap();
        for (i, r) in [
            row("web-1", "web", "ab12cd34-web-1-aaaaaa", "10.0.0.2", false),
            row("web-3", "web", "ab12cd34-web-3-aaaaaa", "10.0.0.3", false),
            row("web-3-bbbbbb", "web", "ab12cd34-web-3-bbbbbb", "10.0.0.4", true),
            InstanceRow {
                addresses: [("web_default".to_string(), [10, 0, 1, 2].into()), ("plant".into(), [10, 0, 2, 2].into())]
                    .into(),
                ..row("db-1", "db", "ab12cd34-db-1-cccccc", "10.0.1.2", false)
            },
        ]
        .iter()
        .enumerate()
        {
            let d = t.path().join(format!("i{i}"));
            std::fs::create_dir_all(&d).unwrap();
            write_record(&d, r).unwrap();
        }
        std::fs::create_dir_all(t.path().join("junk")).unwrap();
        std::fs::write(t.path().join("junk").join(RECORD), "not json").unwrap();
        let dirs = std::fs::read_dir(t.path()).unwrap().flatten().map(|e| e.path());
        let records = read_records(dirs);
        assert_eq!(records.len(), 4);
        let mut s = State::open(&t.path().join("agent.db")).unwrap();
        let r = rebuild(&mut s, records).unwrap();
        assert_eq!(r, Rebuilt { node_id: Some("ab12cd34".into()), instances: 4, deployments: 2 });
        let desired = s.desired_slots().unwrap();
        assert_eq!((desired[1].0.name.as_str(), desired[1].1.clone()), ("web", vec![1, 3]));
        assert_eq!(s.desired_revision().unwrap(), 0, "the hub sends the whole assignment again");
        assert!(s.instances().unwrap().iter().all(|i| i.state == InstanceState::Running && i.pid.is_none()));
        let lease = s.lease("web-3-bbbbbb", std::iter::empty(), "x").unwrap();
        assert_eq!(lease.to_string(), "10.0.0.4");
        let mut db = s.leases().unwrap().remove("db-1").unwrap();
        db.sort();
        assert_eq!(db, [("plant".into(), [10, 0, 2, 2].into()), ("web_default".into(), [10, 0, 1, 2].into())]);
        assert_eq!(s.meta("node_id").unwrap().as_deref(), Some("ab12cd34"));
    }

    #[test]
    fn a_file_that_is_no_database_is_moved_aside() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("agent.db");
        std::fs::write(&p, vec![0x5a; 8192]).unwrap();
        let (s, aside) = State::open_or_recover(&p, 42).unwrap();
        assert_eq!(aside.as_deref(), Some(t.path().join("agent.db.corrupt-42").as_path()));
        assert!(s.instances().unwrap().is_empty());
        assert_eq!(std::fs::read(t.path().join("agent.db.corrupt-42")).unwrap(), vec![0x5a; 8192]);
        let (_, again) = State::open_or_recover(&p, 43).unwrap();
        assert_eq!(again, None, "a sound file is opened as it is");
    }
}
