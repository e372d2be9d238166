//! CDI devices (accelerators) for instances: a deployment's `device_requests` resolved
//! against the node's CDI specs (`cfg.cdi_dirs`, read again at each start, since drivers
//! write `/var/run/cdi` at boot). Particular devices are given as named; a count takes
//! devices no other live instance of this node holds — which ones an instance holds is
//! the annotation its OCI spec carries (`skiff.dev/cdi-devices`), so it survives agent
//! restarts without a table of its own.

use crate::state::InstanceRow;
use crate::{Agent, AgentError};
use skiff_model::{Deployment, DeviceRequest, InstanceState};
use skiff_runtime::cdi::{ContainerEdits, Registry};
use std::collections::BTreeSet;

/// What an instance gets: qualified device names, and the edits that give them.
pub(crate) type Granted = (Vec<String>, Vec<(String, ContainerEdits)>);

/// Why devices were not granted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum NotGranted {
    /// The node does not have them (or the name is wrong): waiting does not help.
    Missing(String),
    /// Other instances hold them now.
    Busy(String),
}

impl NotGranted {
    pub(crate) fn message(&self) -> &str {
        match self {
            NotGranted::Missing(m) | NotGranted::Busy(m) => m,
        }
    }
}

/// How many devices of each kind a registry has.
pub fn counts(reg: &Registry) -> std::collections::BTreeMap<String, u32> {
    reg.inventory().into_iter().map(|(k, v)| (k, v.len() as u32)).collect()
}

impl Agent {
    /// How many CDI devices of each kind this node has now.
    pub fn device_counts(&self) -> std::collections::BTreeMap<String, u32> {
        counts(&self.cdi_registry())
    }

    /// The node's CDI devices now.
    pub fn cdi_registry(&self) -> Registry {
        Registry::load(&self.cfg.cdi_dirs)
    }

    /// Whether this node has the devices `d` asks for at all (free or not): admission.
    pub fn check_devices(&self, d: &Deployment) -> Result<(), String> {
        if d.device_requests.is_empty() {
            return Ok(());
        }
        let reg = self.cdi_registry();
        for r in &d.device_requests {
            choose(&reg, r, &BTreeSet::new()).map_err(|e| e.message().to_string())?;
        }
        Ok(())
    }

    /// The devices `r` gets now, none held by another live instance of this node.
    pub(crate) fn grant_devices(&self, r: &InstanceRow) -> Result<Granted, AgentError> {
        self.try_grant(r)?.map_err(|e| AgentError::Other(e.message().to_string()))
    }

    /// [`Agent::grant_devices`], telling devices that are missing from devices held now.
    pub(crate) fn try_grant(&self, r: &InstanceRow) -> Result<Result<Granted, NotGranted>, AgentError> {
        if r.spec.device_requests.is_empty() {
            return Ok(Ok((vec![], vec![])));
        }
        let reg = self.cdi_registry();
        let mut held = self.devices_held(&r.name)?;
        let mut names = vec![];
        for req in &r.spec.device_requests {
            match choose(&reg, req, &held) {
                Ok(got) => {
                    held.extend(got.iter().cloned());
                    names.extend(got);
                }
                Err(e) => return Ok(Err(e)),
            }
        }
        Ok(reg.edits(&names).map(|edits| (names, edits)).map_err(|e| NotGranted::Missing(e.to_string())))
    }

    /// Devices the other live instances of this node hold.
    fn devices_held(&self, except: &str) -> Result<BTreeSet<String>, AgentError> {
        let rows = self.db(|s| s.instances())?;
        let mut held = BTreeSet::new();
        for row in rows.iter().filter(|x| x.name != except && x.state == InstanceState::Running) {
            if row.spec.device_requests.is_empty() {
                continue;
            }
            let rt = self.runtimes.of(row.spec.runtime);
            let Ok(bytes) = std::fs::read(rt.instance_dir(&row.container_id).join("config.json")) else { continue };
            let Ok(spec) = serde_json::from_slice::<serde_json::Value>(&bytes) else { continue };
            if let Some(list) = spec["annotations"][skiff_runtime::spec::CDI_ANNOTATION].as_str() {
                held.extend(list.split(',').filter(|s| !s.is_empty()).map(str::to_string));
            }
        }
        Ok(held)
    }
}

/// The devices of `reg` that `r` names: its ids (`all` expands), or `count` of its kind not
/// in `held` (0: all of the kind). The error says what is missing and what the node has.
fn choose(reg: &Registry, r: &DeviceRequest, held: &BTreeSet<String>) -> Result<Vec<String>, NotGranted> {
    let inv = reg.inventory();
    let have = inv.get(&r.kind).cloned().unwrap_or_default();
    let none = || {
        let kinds: Vec<String> = inv.iter().map(|(k, v)| format!("{} × {k}", v.len())).collect();
        let kinds = if kinds.is_empty() { "no CDI devices".to_string() } else { kinds.join(", ") };
        NotGranted::Missing(format!("needs {}, this node has {kinds}", r.describe()))
    };
    if have.is_empty() {
        return Err(none());
    }
    if !r.ids.is_empty() {
        let mut out = vec![];
        for id in &r.ids {
            out.extend(reg.expand(&format!("{}={id}", r.kind)).map_err(|e| NotGranted::Missing(e.to_string()))?);
        }
        if let Some(taken) = out.iter().find(|n| held.contains(*n)) {
            return Err(NotGranted::Busy(format!("{taken} is held by another instance on this node")));
        }
        return Ok(out);
    }
    let all: Vec<String> = have.iter().map(|d| format!("{}={d}", r.kind)).collect();
    if r.count == 0 {
        // All of the kind, as `=all`: only when none is held.
        if let Some(taken) = all.iter().find(|n| held.contains(*n)) {
            return Err(NotGranted::Busy(format!("{taken} is held by another instance on this node")));
        }
        return Ok(all);
    }
    let free: Vec<String> = all.into_iter().filter(|n| !held.contains(n)).collect();
    if free.len() < r.count as usize {
        if have.len() < r.count as usize {
            return Err(none());
        }
        return Err(NotGranted::Busy(format!(
            "needs {}, {} of the node's {} free",
            r.describe(),
            free.len(),
            have.len()
        )));
    }
    Ok(free.into_iter().take(r.count as usize).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg() -> Registry {
        let mut r = Registry::default();
        r.add_text("cdiVersion: 0.5.0\nkind: nvidia.com/gpu\ndevices:\n  - {name: '0', containerEdits: {env: [A=0]}}\n  - {name: '1', containerEdits: {env: [A=1]}}\n").unwrap();
        r
    }

    #[test]
    fn counts_take_free_devices_and_ids_the_named_ones() {
        let gpu = |ids: &[&str], count| DeviceRequest {
            kind: "nvidia.com/gpu".into(),
            ids: ids.iter().map(|s| s.to_string()).collect(),
            count,
        };
        let r = reg();
        let none = BTreeSet::new();
        assert_eq!(choose(&r, &gpu(&[], 1), &none).unwrap(), ["nvidia.com/gpu=0"]);
        let held: BTreeSet<String> = ["nvidia.com/gpu=0".to_string()].into();
        assert_eq!(choose(&r, &gpu(&[], 1), &held).unwrap(), ["nvidia.com/gpu=1"]);
        assert_eq!(
            choose(&r, &gpu(&[], 2), &held).unwrap_err(),
            NotGranted::Busy("needs 2 × nvidia.com/gpu, 1 of the node's 2 free".into())
        );
        assert_eq!(
            choose(&r, &gpu(&[], 3), &none).unwrap_err(),
            NotGranted::Missing("needs 3 × nvidia.com/gpu, this node has 2 × nvidia.com/gpu".into())
        );
        assert_eq!(choose(&r, &gpu(&[], 0), &none).unwrap().len(), 2, "all");
        assert!(matches!(choose(&r, &gpu(&[], 0), &held), Err(NotGranted::Busy(_))), "all waits for held ones");
        assert_eq!(choose(&r, &gpu(&["1"], 0), &held).unwrap(), ["nvidia.com/gpu=1"]);
        assert!(
            matches!(choose(&r, &gpu(&["0"], 0), &held), Err(NotGranted::Busy(m)) if m.contains("held by another"))
        );
        assert!(
            matches!(choose(&r, &gpu(&["7"], 0), &none), Err(NotGranted::Missing(m)) if m.contains("unknown CDI device nvidia.com/gpu=7"))
        );
        let tpu = DeviceRequest { kind: "google.com/tpu".into(), ids: vec![], count: 1 };
        assert_eq!(
            choose(&r, &tpu, &none).unwrap_err(),
            NotGranted::Missing("needs 1 × google.com/tpu, this node has 2 × nvidia.com/gpu".into())
        );
    }
}
