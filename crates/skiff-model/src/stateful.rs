//! A Kubernetes StatefulSet's identity for its instances: names count from 0 (`web-0`,
//! `web-1`), each keeps volumes of its own that follow its name (`www-web-0`), they start
//! one after another (`OrderedReady`) or together (`Parallel`), and each answers to a
//! stable name through its governing (headless) service: `web-0.nginx`.
//!
//! Slots stay 1-based everywhere inside skiff (placement, updates, the agent's rows);
//! only the names differ: slot `n` is `web-{n-1}`.

use crate::validate::ValidationError;
use crate::Deployment;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Stateful {
    /// The governing service (a StatefulSet's `serviceName`): instance `web-0` answers to
    /// `web-0.SERVICE` (and `web-0.SERVICE.NAMESPACE.svc.cluster.local`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    #[serde(default)]
    pub pod_management: PodManagement,
}

/// Kubernetes' `podManagementPolicy`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PodManagement {
    /// Instance `n` is started once every lower one runs and is ready; scaling down
    /// stops the highest first, one at a time.
    #[default]
    OrderedReady,
    /// All at once, as a Deployment's.
    Parallel,
}

impl Deployment {
    /// The number in slot `slot`'s name: from 0 for a StatefulSet's (`web-0`), else from 1.
    pub fn ordinal(&self, slot: u32) -> u32 {
        ordinal(self.stateful.is_some(), slot)
    }

    /// The name of the instance in slot `slot` (1-based): `web-1`, or a StatefulSet's `web-0`.
    pub fn instance_name(&self, slot: u32) -> String {
        slot_name(&self.name, slot, self.stateful.is_some())
    }

    /// The slot an instance name (`web-2`, or while it retires `web-2-<tag>`) fills.
    pub fn slot_named(&self, name: &str) -> Option<u32> {
        let rest = name.strip_prefix(&self.name)?.strip_prefix('-')?;
        let number = rest.split('-').next()?;
        let n: u32 = number.parse().ok()?;
        // Only as the name is written: `web-1`, not `web-01` or `web-+1`.
        if n.to_string() != number {
            return None;
        }
        if self.stateful.is_some() {
            n.checked_add(1)
        } else {
            Some(n)
        }
    }

    /// Whether instances start one after another and stop from the highest down.
    pub fn ordered(&self) -> bool {
        self.stateful.as_ref().is_some_and(|s| s.pod_management == PodManagement::OrderedReady)
    }

    /// The stable names of the instance in `slot` through its governing service, as
    /// Kubernetes' DNS gives them: `web-0.SERVICE`, `web-0.SERVICE.NAMESPACE`,
    /// `….svc` and `….svc.cluster.local` (the stack is the namespace). None without one.
    pub fn stable_names(&self, slot: u32) -> Vec<String> {
        let Some(svc) = self.stateful.as_ref().and_then(|s| s.service.as_ref()) else { return vec![] };
        let short = format!("{}.{svc}", self.instance_name(slot));
        let ns = format!("{short}.{}", self.stack);
        vec![short, ns.clone(), format!("{ns}.svc"), format!("{ns}.svc.cluster.local")]
    }

    pub(crate) fn check_stateful(&self) -> Result<(), ValidationError> {
        let Some(s) = &self.stateful else {
            if let Some(i) = self.volumes.iter().position(|v| matches!(v.source, crate::VolumeSource::Claim { .. })) {
                return Err(ValidationError::new(
                    format!("volumes[{i}].source"),
                    "a volume per instance (a claim template) needs stateful",
                ));
            }
            return Ok(());
        };
        if let Some(svc) = &s.service {
            crate::validate::check_name("stateful.service", svc)?;
        }
        if self.placement.mode == crate::PlacementMode::Global {
            return Err(ValidationError::new("placement.mode", "global: a stateful set's instances are numbered"));
        }
        if self.job.is_some() {
            return Err(ValidationError::new("job", "a stateful set's instances are not run to completion"));
        }
        if self.update.strategy == crate::rollout::Strategy::BlueGreen {
            return Err(ValidationError::new(
                "update.strategy",
                "blue-green runs two of each instance: not for a stateful set",
            ));
        }
        // One instance of a name at a time: its volumes and its name are its own.
        if self.update.budget(self.replicas).surge > 0 {
            return Err(ValidationError::new(
                "update.max_surge",
                "a stateful set replaces an instance after stopping it: no surge (and no hand-over node strategy)",
            ));
        }
        Ok(())
    }
}

fn ordinal(stateful: bool, slot: u32) -> u32 {
    if stateful {
        slot.saturating_sub(1)
    } else {
        slot
    }
}

/// The name of `deployment`'s instance in `slot` (see [`Deployment::instance_name`]).
pub fn slot_name(deployment: &str, slot: u32, stateful: bool) -> String {
    format!("{deployment}-{}", ordinal(stateful, slot))
}

/// The volume a claim template `claim` gives the instance `instance`: Kubernetes' name of
/// its claim, `CLAIM-INSTANCE` (`www-web-0`).
pub fn claim_volume(claim: &str, instance: &str) -> String {
    format!("{claim}-{instance}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rollout::IntOrPercent;

    fn set() -> Deployment {
        let mut d = Deployment::new("web", "nginx");
        d.stateful = Some(Stateful { service: Some("nginx".into()), pod_management: PodManagement::OrderedReady });
        d.update.max_surge = IntOrPercent::Int(0);
        d.update.max_unavailable = IntOrPercent::Int(1);
        d
    }

    #[test]
    fn names_count_from_zero_and_map_back_to_slots() {
        let d = set();
        assert_eq!(d.instance_name(1), "web-0");
        assert_eq!(d.instance_name(3), "web-2");
        assert_eq!(d.slot_named("web-0"), Some(1));
        assert_eq!(d.slot_named("web-2-abc123"), Some(3));
        assert_eq!(d.slot_named("webx-0"), None);
        assert_eq!((d.slot_named("web-00"), d.slot_named("web-+0")), (None, None), "one spelling per slot");
        assert_eq!(
            d.stable_names(1),
            ["web-0.nginx", "web-0.nginx.default", "web-0.nginx.default.svc", "web-0.nginx.default.svc.cluster.local"]
        );
        assert!(d.ordered());
        let plain = Deployment::new("web", "nginx");
        assert_eq!(plain.instance_name(1), "web-1");
        assert_eq!(plain.slot_named("web-1"), Some(1));
        assert!(plain.stable_names(1).is_empty());
        assert_eq!(claim_volume("www", "web-0"), "www-web-0");
        d.validate().unwrap();
    }

    #[test]
    fn what_a_stateful_set_cannot_be_is_refused_by_field() {
        let mut d = set();
        d.update.max_surge = IntOrPercent::Percent(25);
        assert!(d.validate().unwrap_err().to_string().starts_with("update.max_surge"));
        let mut d = set();
        d.placement.mode = crate::PlacementMode::Global;
        assert!(d.validate().unwrap_err().to_string().starts_with("placement.mode"));
        let mut d = set();
        d.stateful.as_mut().unwrap().service = Some("Bad Name".into());
        assert!(d.validate().unwrap_err().to_string().starts_with("stateful.service"));
        let mut d = Deployment::new("web", "nginx");
        d.volumes.push(crate::Volume {
            source: crate::VolumeSource::Claim { name: "www".into() },
            target: "/data".into(),
            read_only: false,
        });
        assert!(d.validate().unwrap_err().to_string().contains("needs stateful"));
    }
}
