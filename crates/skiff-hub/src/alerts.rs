//! Alert rules evaluated against the hub's own metrics, as Prometheus evaluates alerting
//! rules: a series matching a rule's condition makes an alert *pending*; one that stays
//! matched for the rule's `for` makes it *firing*; one that stops matching resolves it.
//! Active alerts are listed by `GET /api/v1/alerts` (`skiff get alerts`). A firing rule
//! with `x-skiff-scale-out` raises its deployment's replicas when it starts firing and
//! again every `for` while it keeps firing, up to `max`. The active alerts are kept in the
//! store's state (`alerts/active`, written when an alert starts, changes state, acts or
//! resolves, not on every evaluation) and read back when a hub starts or takes over, so
//! a firing alert neither starts pending again nor repeats a scale-out early.

use crate::events::EventLog;
use crate::{metrics, Hub};
use serde::{Deserialize, Serialize};
use skiff_model::alerts::{parse_exposition, Rule, RuleFile, Series};
use skiff_model::api::ApplyRequest;
use skiff_model::EventRecord;
use std::collections::BTreeMap;
use std::sync::Mutex;

const EVENTS_KEPT: usize = 1_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AlertState {
    Pending,
    Firing,
}

/// An active alert, as Prometheus' `/api/v1/alerts` lists it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Alert {
    pub alert: String,
    pub group: String,
    /// The series' labels, the rule's labels and `alertname`.
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    pub state: AlertState,
    pub active_at_ms: u64,
    pub value: f64,
    /// What the rule did while firing (`scaled web to 3`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
    #[serde(skip)]
    last_action_ms: Option<u64>,
}

/// A scale-out the caller should carry out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScaleOut {
    /// The alert's key, to record the outcome on.
    pub key: (usize, String),
    pub deployment: String,
    pub step: u32,
    pub max: u32,
}

pub struct Alerts {
    rules: Vec<Rule>,
    active: Mutex<BTreeMap<(usize, String), Alert>>,
    pub(crate) events: EventLog,
    /// What was last written to the store (to write only changes).
    saved: Mutex<Option<String>>,
}

impl Default for Alerts {
    fn default() -> Self {
        Alerts {
            rules: vec![],
            active: Mutex::default(),
            events: EventLog::new("alerts", EVENTS_KEPT),
            saved: Mutex::default(),
        }
    }
}

/// The store's state key of the active alerts.
const STATE_KEY: &str = "alerts/active";

/// An active alert as the store keeps it: its rule by group, name and expression (rule
/// files change between hubs, and one name may have several rules), and when it last acted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Kept {
    alert: Alert,
    expr: skiff_model::alerts::Expr,
    last_action_ms: Option<u64>,
}

/// The most the active alerts may take in the store (etcd takes requests of 1.5 MiB).
const MAX_KEPT_BYTES: usize = 512 << 10;

fn key_of(labels: &BTreeMap<String, String>) -> String {
    labels.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",")
}

impl Alerts {
    /// Rules from a rule file (JSON or YAML already parsed), checked against the hub's
    /// metric names.
    pub fn new(file: &RuleFile) -> Result<Self, String> {
        let names = metrics::names();
        let known: Vec<&str> = names.iter().map(String::as_str).collect();
        Ok(Alerts { rules: file.check(&known)?, ..Default::default() })
    }

    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    pub fn list(&self) -> Vec<Alert> {
        self.active.lock().map(|a| a.values().cloned().collect()).unwrap_or_default()
    }

    pub fn events(&self) -> Vec<EventRecord> {
        self.events.list()
    }

    /// One evaluation against `series`; returns the scale-outs that are due.
    pub fn eval(&self, series: &[Series], now_ms: u64) -> Vec<ScaleOut> {
        let Ok(mut active) = self.active.lock() else { return vec![] };
        let mut seen = vec![];
        let mut due = vec![];
        for (ri, rule) in self.rules.iter().enumerate() {
            for s in series.iter().filter(|s| rule.expr.selects(s) && rule.expr.op.holds(s.value, rule.expr.threshold))
            {
                let mut labels = s.labels.clone();
                labels.extend(rule.labels.clone());
                labels.insert("alertname".into(), rule.alert.clone());
                let key = (ri, key_of(&labels));
                seen.push(key.clone());
                let a = active.entry(key.clone()).or_insert_with(|| Alert {
                    alert: rule.alert.clone(),
                    group: rule.group.clone(),
                    labels,
                    annotations: rule.annotations.clone(),
                    state: AlertState::Pending,
                    active_at_ms: now_ms,
                    value: s.value,
                    action: None,
                    last_action_ms: None,
                });
                a.value = s.value;
                if a.state == AlertState::Pending && now_ms.saturating_sub(a.active_at_ms) >= rule.for_ms {
                    a.state = AlertState::Firing;
                    let msg =
                        format!("{} = {} ({:?} {})", rule.expr.metric, s.value, rule.expr.op, rule.expr.threshold);
                    self.events.push(now_ms, &rule.alert, "AlertFiring", msg);
                }
                if let (AlertState::Firing, Some(so)) = (a.state, &rule.scale_out) {
                    let every = rule.for_ms.max(1_000);
                    if a.last_action_ms.is_none_or(|t| now_ms.saturating_sub(t) >= every) {
                        a.last_action_ms = Some(now_ms);
                        due.push(ScaleOut { key, deployment: so.deployment.clone(), step: so.step, max: so.max });
                    }
                }
            }
        }
        let gone: Vec<(usize, String)> = active.keys().filter(|k| !seen.contains(k)).cloned().collect();
        for k in gone {
            if let Some(a) = active.remove(&k) {
                if a.state == AlertState::Firing {
                    self.events.push(now_ms, &a.alert, "AlertResolved", key_of(&a.labels));
                }
            }
        }
        due
    }

    /// With the active alerts `store` kept, of rules this hub still has (others are
    /// dropped; an unreadable record starts afresh, said once).
    pub fn load(self, store: &dyn crate::store::Store) -> Self {
        self.reload(store);
        self
    }

    /// The active alerts the store kept, in place of what this hub remembers (a hub
    /// taking the lead goes on from the one before it: no alert fires twice).
    pub fn reload(&self, store: &dyn crate::store::Store) {
        let kept = match store.states(STATE_KEY) {
            Ok(v) => {
                if let Ok(mut a) = self.active.lock() {
                    a.clear();
                }
                v.into_iter().find(|(k, _)| k == STATE_KEY).map(|(_, v)| v)
            }
            Err(e) => {
                tracing::warn!(error = %e, "reading the active alerts: they start afresh");
                None
            }
        };
        let Some(text) = kept else { return };
        let Ok(list) = serde_json::from_str::<Vec<Kept>>(&text) else {
            tracing::warn!("the active alerts kept are unreadable: they start afresh");
            return;
        };
        if let Ok(mut active) = self.active.lock() {
            for k in list {
                let Some(ri) = self
                    .rules
                    .iter()
                    .position(|r| r.group == k.alert.group && r.alert == k.alert.alert && r.expr == k.expr)
                else {
                    continue;
                };
                let mut a = k.alert;
                a.last_action_ms = k.last_action_ms;
                active.insert((ri, key_of(&a.labels)), a);
            }
        }
        if let Ok(mut s) = self.saved.lock() {
            *s = Some(text);
        }
    }

    /// Writes the active alerts to `store` when they changed other than in value.
    pub fn save(&self, store: &dyn crate::store::Store) {
        let Ok(active) = self.active.lock() else { return };
        let list: Vec<Kept> = active
            .iter()
            .filter_map(|((ri, _), a)| {
                let expr = self.rules.get(*ri)?.expr.clone();
                Some(Kept { alert: Alert { value: 0.0, ..a.clone() }, expr, last_action_ms: a.last_action_ms })
            })
            .collect();
        drop(active);
        let Ok(text) = serde_json::to_string(&list) else { return };
        let Ok(mut saved) = self.saved.lock() else { return };
        if saved.as_deref() == Some(text.as_str()) || (saved.is_none() && list.is_empty()) {
            return;
        }
        if text.len() > MAX_KEPT_BYTES {
            tracing::warn!(alerts = list.len(), bytes = text.len(), "too many active alerts to keep in the store");
            *saved = Some(text);
            return;
        }
        let value = (!list.is_empty()).then_some(text.as_str());
        match store.put_state(STATE_KEY, value) {
            Ok(()) => *saved = Some(text),
            Err(e) => tracing::warn!(error = %e, "keeping the active alerts"),
        }
    }

    fn record(&self, key: &(usize, String), action: String) {
        if let Ok(mut active) = self.active.lock() {
            if let Some(a) = active.get_mut(key) {
                a.action = Some(action);
            }
        }
    }
}

impl Hub {
    /// Evaluates the alert rules against the fleet's newest samples and carries out the
    /// scale-outs that are due.
    pub fn evaluate_alerts(&self, now_ms: u64) -> Result<(), crate::HubError> {
        if self.alerts.rules.is_empty() || !self.settled(now_ms) {
            return Ok(());
        }
        let text = metrics::render(&self.metrics(), metrics::MAX_INSTANCE_SERIES, now_ms);
        let due = self.alerts.eval(&parse_exposition(&text), now_ms);
        // Kept before acting: a hub that dies in between does not scale out twice.
        self.alerts.save(&*self.store);
        for so in due {
            let what = self.scale_out(&so);
            let (reason, msg) = match &what {
                Ok(m) => ("AlertScaledOut", m.clone()),
                Err(e) => ("AlertActionFailed", e.clone()),
            };
            self.alerts.events.push(now_ms, &so.deployment, reason, msg.clone());
            self.alerts.record(&so.key, msg);
        }
        self.alerts.save(&*self.store);
        Ok(())
    }

    fn scale_out(&self, so: &ScaleOut) -> Result<String, String> {
        let mut d = self
            .store
            .get(&so.deployment)
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("deployment {:?} not found", so.deployment))?
            .spec;
        if d.autoscale.is_some() {
            return Err(format!("{} has an autoscaler, which sets its replicas", d.name));
        }
        if let Some(first) = &d.pod_of {
            return Err(format!("{} is another container of {first}'s pods: scale {first}", d.name));
        }
        if d.replicas >= so.max {
            return Ok(format!("{} already at {} (max {})", d.name, d.replicas, so.max));
        }
        let from = d.replicas;
        d.replicas = from.saturating_add(so.step).min(so.max);
        let to = d.replicas;
        self.commit(&ApplyRequest { deployments: vec![d], ..Default::default() }).map_err(|e| e.to_string())?;
        Ok(format!("scaled {} from {from} to {to}", so.deployment))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alerts(rule: &str) -> Alerts {
        let f: RuleFile =
            serde_json::from_str(&format!(r#"{{"groups": [{{"name": "edge", "rules": [{rule}]}}]}}"#)).unwrap();
        Alerts::new(&f).unwrap()
    }

    fn cpu(node: &str, v: f64) -> Series {
        Series {
            name: "skiff_node_cpu_utilization".into(),
            labels: [("node".to_string(), node.to_string())].into(),
            value: v,
        }
    }

    #[test]
    fn pending_firing_and_resolved_with_scale_outs_every_for() {
        let a = alerts(
            r#"{"alert": "NodeCpuHigh", "expr": "skiff_node_cpu_utilization > 0.8", "for": "1m",
                "labels": {"severity": "warning"}, "x-skiff-scale-out": {"deployment": "web", "step": 2, "max": 6}}"#,
        );
        assert!(a.eval(&[cpu("pi-1", 0.9), cpu("pi-2", 0.5)], 0).is_empty());
        let l = a.list();
        assert_eq!(l.len(), 1, "only the hot node");
        assert_eq!(
            (l[0].state, l[0].labels["node"].as_str(), l[0].labels["severity"].as_str()),
            (AlertState::Pending, "pi-1", "warning")
        );
        assert!(a.eval(&[cpu("pi-1", 0.95)], 59_999).is_empty(), "not for a minute yet");
        let due = a.eval(&[cpu("pi-1", 0.95)], 60_000);
        assert_eq!(due.len(), 1);
        assert_eq!((due[0].deployment.as_str(), due[0].step, due[0].max), ("web", 2, 6));
        assert_eq!(a.list()[0].state, AlertState::Firing);
        assert!(a.eval(&[cpu("pi-1", 0.95)], 90_000).is_empty(), "again only after another `for`");
        assert_eq!(a.eval(&[cpu("pi-1", 0.95)], 120_000).len(), 1);
        // A dip resets it: pending again from the start.
        assert!(a.eval(&[cpu("pi-1", 0.5)], 121_000).is_empty());
        assert!(a.list().is_empty());
        assert!(a.events().iter().any(|e| e.reason == "AlertResolved"));
        a.eval(&[cpu("pi-1", 0.9)], 122_000);
        assert_eq!(a.list()[0].state, AlertState::Pending);
    }

    /// A firing alert outlives its hub: the next one (same rule file) finds it firing and
    /// does not scale out again before `for`; values alone write nothing; a rule gone from
    /// the file drops its alerts.
    #[test]
    fn active_alerts_outlive_the_hub() {
        use crate::store::{SqliteStore, Store};
        let t = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&t.path().join("hub.db")).unwrap();
        let rule = r#"{"alert": "NodeCpuHigh", "expr": "skiff_node_cpu_utilization > 0.8", "for": "1m",
                "x-skiff-scale-out": {"deployment": "web", "step": 1, "max": 6}}"#;
        let a = alerts(rule).load(&store);
        a.eval(&[cpu("pi-1", 0.9)], 0);
        a.save(&store);
        assert_eq!(a.eval(&[cpu("pi-1", 0.9)], 60_000).len(), 1, "fires and scales out");
        a.record(&(0, key_of(&a.list()[0].labels)), "scaled web from 1 to 2".into());
        a.save(&store);
        let written = store.states("alerts/active").unwrap();
        assert_eq!(written.len(), 1);
        // A new value alone writes nothing (a record taken away behind its back stays away).
        store.put_state("alerts/active", None).unwrap();
        a.eval(&[cpu("pi-1", 0.97)], 61_000);
        a.save(&store);
        assert!(store.states("alerts/active").unwrap().is_empty(), "a new value is not a change");
        store.put_state("alerts/active", Some(&written[0].1)).unwrap();

        let b = alerts(rule).load(&store);
        let l = b.list();
        assert_eq!((l.len(), l[0].state, l[0].active_at_ms), (1, AlertState::Firing, 0));
        assert_eq!(l[0].action.as_deref(), Some("scaled web from 1 to 2"));
        assert!(b.eval(&[cpu("pi-1", 0.9)], 90_000).is_empty(), "no second scale-out before `for`");
        assert_eq!(b.eval(&[cpu("pi-1", 0.9)], 120_000).len(), 1);
        // Resolved: the record goes.
        b.eval(&[cpu("pi-1", 0.1)], 121_000);
        b.save(&store);
        assert!(store.states("alerts/active").unwrap().is_empty());
        // Another rule file: alerts of rules it does not have are dropped.
        b.eval(&[cpu("pi-1", 0.9)], 122_000);
        b.save(&store);
        let other = alerts(&rule.replace("NodeCpuHigh", "Renamed")).load(&store);
        assert!(other.list().is_empty());
    }

    #[test]
    fn rules_fire_at_once_without_for_and_name_unknown_metrics() {
        let a = alerts(r#"{"alert": "Busy", "expr": "skiff_node_cpu_utilization{node=\"pi-2\"} >= 0.5"}"#);
        a.eval(&[cpu("pi-1", 0.9), cpu("pi-2", 0.5)], 0);
        let l = a.list();
        assert_eq!((l.len(), l[0].state), (1, AlertState::Firing));
        let f: RuleFile =
            serde_json::from_str(r#"{"groups": [{"name": "g", "rules": [{"alert": "X", "expr": "up > 0"}]}]}"#)
                .unwrap();
        let e = Alerts::new(&f).err().unwrap();
        assert!(e.starts_with("groups[0].rules[0].expr: up is not a metric of the hub (it has skiff_node_cpus"), "{e}");
    }
}
