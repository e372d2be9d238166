//! How a deployment's instances are replaced when its template changes, and what the hub
//! records about each change: the update settings (`maxSurge` / `maxUnavailable`, compose's
//! `update_config`, blue-green), the template hash that tells versions apart, and the
//! revision history with its rollout state.

use crate::Deployment;
use serde::{Deserialize, Serialize};

/// How the instances of one node are replaced.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    /// In batches bounded by `max_surge` (start-first) or `max_unavailable` (stop-first).
    #[default]
    Rolling,
    /// Every new instance starts beside the old ones; once all are ready the published
    /// ports switch to them at once, and the old ones are kept for `rollback_window_ms`.
    BlueGreen,
    /// Every old instance stops before any new one starts (Kubernetes' `Recreate`).
    Recreate,
}

/// An instance count, or a percentage of the node's replicas (`"25%"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum IntOrPercent {
    Int(u32),
    #[serde(with = "percent")]
    Percent(u32),
}

mod percent {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(p: &u32, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{p}%"))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
        let s = String::deserialize(d)?;
        super::IntOrPercent::parse(&s)
            .and_then(|v| match v {
                super::IntOrPercent::Percent(p) => Ok(p),
                super::IntOrPercent::Int(_) => Err(format!("{s:?} is not a percentage")),
            })
            .map_err(serde::de::Error::custom)
    }
}

impl IntOrPercent {
    /// `3` or `25%`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let t = s.trim();
        if let Some(p) = t.strip_suffix('%') {
            return p.parse().map(IntOrPercent::Percent).map_err(|_| format!("{s:?} is not a count or a percentage"));
        }
        t.parse().map(IntOrPercent::Int).map_err(|_| format!("{s:?} is not a count or a percentage"))
    }

    /// Against `total` replicas, rounding up (surge) or down (unavailable), as Kubernetes.
    pub fn resolve(self, total: u32, round_up: bool) -> u32 {
        match self {
            IntOrPercent::Int(n) => n,
            IntOrPercent::Percent(p) => {
                let x = u64::from(p) * u64::from(total);
                let v = if round_up { x.div_ceil(100) } else { x / 100 };
                v.min(u64::from(u32::MAX)) as u32
            }
        }
    }
}

/// Restarts of a new instance after which it counts as crash-looping: the agent stops
/// replacing old instances and the hub fails the rollout at the same count.
pub const CRASH_LOOP_RESTARTS: u32 = 3;

/// What the hub does when a rollout fails (compose's `failure_action`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FailureAction {
    /// Store the previous revision again.
    #[default]
    Rollback,
    /// Leave it as it is: old instances still in place keep serving.
    Pause,
    /// Ignore the failure and carry on.
    Continue,
}

/// What a node does before an old instance stops (balena's update strategies). Only the
/// order of pull and stop differs; the batch sizes come from the strategy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NodeStrategy {
    /// The new image is fully present on the node before the old instance stops.
    #[default]
    DownloadThenKill,
    /// The old instance stops first; then the new image is pulled.
    KillThenDownload,
    /// The old instance stops and its image is deleted (when nothing else uses it) before
    /// the new image is pulled: for disks that cannot hold both.
    DeleteThenDownload,
    /// Old and new run side by side until the new one is ready (start-first, one at a time).
    HandOver,
}

/// A deployment's update settings. The default replaces one instance at a time and
/// starts the new one first (Kubernetes' defaults resolved for one replica).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub struct UpdateConfig {
    #[serde(default)]
    pub strategy: Strategy,
    /// Instances above the node's replicas while updating (start-first).
    #[serde(default = "one")]
    pub max_surge: IntOrPercent,
    /// Instances of the node's replicas that may be down while updating (stop-first).
    #[serde(default = "zero")]
    pub max_unavailable: IntOrPercent,
    /// Pause between batches.
    #[serde(default)]
    pub delay_ms: u64,
    /// How long a new instance must stay ready before its batch counts as done, and how
    /// long the hub watches a finished rollout for failures.
    #[serde(default = "default_monitor")]
    pub monitor_ms: u64,
    #[serde(default)]
    pub failure_action: FailureAction,
    /// Failed instances of a revision, as a share of its instances, above which the
    /// rollout fails (compose's `max_failure_ratio`; 0: any failure).
    #[serde(default)]
    pub max_failure_ratio: f64,
    /// Blue-green: how long the old instances stay (not serving) after the switch.
    #[serde(default = "default_window")]
    pub rollback_window_ms: u64,
    #[serde(default)]
    pub node_strategy: NodeStrategy,
    /// Fleet rollouts: how many nodes get a new revision first; each wave that completes
    /// lets the next one grow by `wave_growth` (Greengrass's exponential rollout rate).
    #[serde(default = "one_node")]
    pub wave_size: u32,
    #[serde(default = "growth")]
    pub wave_growth: u32,
}

fn one_node() -> u32 {
    1
}
fn growth() -> u32 {
    2
}

fn one() -> IntOrPercent {
    IntOrPercent::Int(1)
}
fn zero() -> IntOrPercent {
    IntOrPercent::Int(0)
}
fn default_monitor() -> u64 {
    5_000
}
fn default_window() -> u64 {
    60_000
}

impl Default for UpdateConfig {
    fn default() -> Self {
        UpdateConfig {
            strategy: Strategy::Rolling,
            max_surge: one(),
            max_unavailable: zero(),
            delay_ms: 0,
            monitor_ms: default_monitor(),
            failure_action: FailureAction::Rollback,
            max_failure_ratio: 0.0,
            rollback_window_ms: default_window(),
            node_strategy: NodeStrategy::DownloadThenKill,
            wave_size: 1,
            wave_growth: 2,
        }
    }
}

/// How many instances one node may add and remove at a time while updating `total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    pub surge: u32,
    pub unavailable: u32,
}

impl UpdateConfig {
    pub fn is_default(&self) -> bool {
        *self == UpdateConfig::default()
    }

    /// The batch sizes for a node running `total` instances. Percentages round as
    /// Kubernetes rounds them; when both come to 0, one instance may be unavailable.
    /// Blue-green surges by all of them, recreate takes all of them down; hand-over
    /// surges by one when the strategy would not surge, and kill- or delete-then-download
    /// turn a surge into as many stops.
    pub fn budget(&self, total: u32) -> Budget {
        let total = total.max(1);
        let (mut surge, mut unavailable) = match self.strategy {
            Strategy::BlueGreen => (total, 0),
            Strategy::Recreate => (0, total),
            Strategy::Rolling => (self.max_surge.resolve(total, true), self.max_unavailable.resolve(total, false)),
        };
        match self.node_strategy {
            NodeStrategy::HandOver if surge == 0 => (surge, unavailable) = (1, 0),
            // The old instance must be gone before the new image comes: stop-first.
            NodeStrategy::KillThenDownload | NodeStrategy::DeleteThenDownload if surge > 0 => {
                (surge, unavailable) = (0, unavailable.max(surge))
            }
            _ => {}
        }
        if surge == 0 && unavailable == 0 {
            unavailable = 1;
        }
        Budget { surge, unavailable: unavailable.min(total) }
    }

    pub fn check(&self) -> Result<(), (String, String)> {
        let bad = |f: &str, p: &str| Err((f.to_string(), p.to_string()));
        for (field, v) in [("max_surge", self.max_surge), ("max_unavailable", self.max_unavailable)] {
            if let IntOrPercent::Percent(p) = v {
                if p > 100 {
                    return bad(field, "a percentage must be between 0% and 100%");
                }
            }
        }
        if self.strategy == Strategy::Rolling
            && matches!((self.max_surge, self.max_unavailable), (IntOrPercent::Int(0), IntOrPercent::Int(0)))
        {
            return bad("max_unavailable", "may not be 0 when max_surge is 0 (nothing could be replaced)");
        }
        if !(0.0..=1.0).contains(&self.max_failure_ratio) {
            return bad("max_failure_ratio", "must be between 0 and 1");
        }
        if self.wave_size == 0 {
            return bad("wave_size", "must be at least 1");
        }
        if self.wave_growth == 0 || self.wave_growth > 100 {
            return bad("wave_growth", "must be between 1 and 100");
        }
        if self.monitor_ms > 3_600_000 || self.delay_ms > 3_600_000 {
            return bad(if self.delay_ms > 3_600_000 { "delay_ms" } else { "monitor_ms" }, "must be at most one hour");
        }
        Ok(())
    }
}

/// How many of `total` nodes the wave after one of `current` nodes covers.
pub fn next_wave(current: usize, growth: u32, total: usize) -> usize {
    current.saturating_mul(growth.max(1) as usize).max(current + 1).min(total)
}

/// The part of a deployment whose change replaces instances: everything but the replica
/// count, the autoscaler and the update settings (Kubernetes' pod template).
/// The label `skiff restart` sets: a new value changes the template, so every instance is
/// replaced by the update strategy (as `kubectl rollout restart`'s annotation). The hub
/// keeps it when a later apply's spec has none.
pub const RESTARTED_AT: &str = "skiff.dev/restarted-at";

pub fn template(d: &Deployment) -> Deployment {
    let mut t = d.clone();
    t.replicas = 1;
    t.autoscale = None;
    t.update = UpdateConfig::default();
    t
}

/// A short stable hash of the template (FNV-1a over its JSON, whose maps are sorted), as
/// Kubernetes' `pod-template-hash`: instances report it so the hub can tell versions apart.
pub fn template_hash(d: &Deployment) -> String {
    let json = serde_json::to_string(&template(d)).unwrap_or_default();
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in json.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{:010x}", h & 0xff_ffff_ffff)
}

/// Where a revision's rollout stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RolloutState {
    Progressing,
    Complete,
    Failed,
    /// Replaced by a later revision before it completed.
    Superseded,
}

impl RolloutState {
    pub fn as_str(self) -> &'static str {
        match self {
            RolloutState::Progressing => "progressing",
            RolloutState::Complete => "complete",
            RolloutState::Failed => "failed",
            RolloutState::Superseded => "superseded",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [RolloutState::Progressing, RolloutState::Complete, RolloutState::Failed, RolloutState::Superseded]
            .into_iter()
            .find(|r| r.as_str() == s)
    }
}

/// One entry of a deployment's revision history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Revision {
    /// 1, 2, … per deployment.
    pub revision: u64,
    pub template: String,
    pub image: String,
    pub created_ms: u64,
    pub state: RolloutState,
    /// Why it was made (`apply`, `rollback to 2: …`, `undo to 1`) and, once it ended, how.
    pub cause: String,
    /// Fleet rollouts in waves: the nodes given this revision so far (the others keep the
    /// last complete one). `None`: every node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nodes: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    pub spec: Deployment,
}

/// `GET /api/v1/deployments/NAME/rollout`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RolloutStatus {
    pub deployment: String,
    pub revision: u64,
    pub template: String,
    pub state: RolloutState,
    pub strategy: Strategy,
    /// Replicas wanted.
    pub desired: u32,
    /// Instances of the current template.
    pub updated: u32,
    /// …of which are ready (running, healthy if probed).
    pub ready: u32,
    /// Instances of earlier templates still present (old, or kept for a blue-green window).
    pub old: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// `POST /api/v1/deployments/NAME/undo`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UndoRequest {
    /// The revision to go back to; the one before the current by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_revision: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentages_round_as_kubernetes() {
        let c = UpdateConfig {
            max_surge: IntOrPercent::Percent(25),
            max_unavailable: IntOrPercent::Percent(25),
            ..Default::default()
        };
        assert_eq!(c.budget(1), Budget { surge: 1, unavailable: 0 });
        assert_eq!(c.budget(4), Budget { surge: 1, unavailable: 1 });
        assert_eq!(c.budget(10), Budget { surge: 3, unavailable: 2 });
        let none = UpdateConfig {
            max_surge: IntOrPercent::Percent(0),
            max_unavailable: IntOrPercent::Percent(10),
            ..Default::default()
        };
        assert_eq!(none.budget(3), Budget { surge: 0, unavailable: 1 }, "both 0 after rounding: one may be down");
        let bg = UpdateConfig { strategy: Strategy::BlueGreen, ..Default::default() };
        assert_eq!(bg.budget(3), Budget { surge: 3, unavailable: 0 });
        let re = UpdateConfig { strategy: Strategy::Recreate, ..Default::default() };
        assert_eq!(re.budget(3), Budget { surge: 0, unavailable: 3 });
        let hand = UpdateConfig {
            max_surge: IntOrPercent::Int(0),
            max_unavailable: IntOrPercent::Int(2),
            node_strategy: NodeStrategy::HandOver,
            ..Default::default()
        };
        assert_eq!(hand.budget(3), Budget { surge: 1, unavailable: 0 });
        let kill = UpdateConfig { node_strategy: NodeStrategy::KillThenDownload, ..Default::default() };
        assert_eq!(kill.budget(3), Budget { surge: 0, unavailable: 1 });
    }

    #[test]
    fn waves_grow_by_their_factor() {
        assert_eq!(next_wave(1, 2, 10), 2);
        assert_eq!(next_wave(2, 2, 10), 4);
        assert_eq!(next_wave(8, 2, 10), 10);
        assert_eq!(next_wave(3, 1, 10), 4, "a growth of 1 still moves on");
    }

    #[test]
    fn parses_and_checks() {
        assert_eq!(IntOrPercent::parse("25%"), Ok(IntOrPercent::Percent(25)));
        assert_eq!(IntOrPercent::parse("3"), Ok(IntOrPercent::Int(3)));
        assert!(IntOrPercent::parse("x%").is_err());
        let c: UpdateConfig = serde_json::from_str(r#"{"max_surge":"50%","max_unavailable":0}"#).unwrap();
        assert_eq!(c.max_surge, IntOrPercent::Percent(50));
        assert_eq!(serde_json::to_value(&c).unwrap()["max_surge"], "50%");
        let err = serde_json::from_str::<UpdateConfig>(r#"{"max_surge":"lots"}"#).unwrap_err().to_string();
        assert!(err.contains("max_surge") || err.contains("did not match"), "{err}");
        let zero = UpdateConfig {
            max_surge: IntOrPercent::Int(0),
            max_unavailable: IntOrPercent::Int(0),
            ..Default::default()
        };
        assert_eq!(zero.check().unwrap_err().0, "max_unavailable");
        let pct = UpdateConfig { max_surge: IntOrPercent::Percent(150), ..Default::default() };
        assert_eq!(pct.check().unwrap_err().0, "max_surge");
        let ratio = UpdateConfig { max_failure_ratio: 1.5, ..Default::default() };
        assert_eq!(ratio.check().unwrap_err().0, "max_failure_ratio");
        assert!(UpdateConfig::default().check().is_ok());
    }

    #[test]
    fn the_template_hash_ignores_scale_and_update_settings() {
        let a = Deployment::new("web", "img:1");
        let mut b = a.clone();
        b.replicas = 7;
        b.update.strategy = Strategy::BlueGreen;
        assert_eq!(template_hash(&a), template_hash(&b));
        b.image = "img:2".into();
        assert_ne!(template_hash(&a), template_hash(&b));
        assert_eq!(template_hash(&a).len(), 10);
    }
}
