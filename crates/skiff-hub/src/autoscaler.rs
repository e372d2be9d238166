//! The live autoscaler: every sync period, for each deployment with `autoscale`, the
//! situation is read from what nodes report (instances and their newest samples), the
//! decision is Kubernetes' ([`skiff_model::autoscale::decide`]), and a change of replicas
//! is stored like any other apply. Recommendations and scale events are kept in the
//! store's state after each period (`autoscaler/NAME`) and read back when a hub starts,
//! so a restart or a failover to another hub keeps stabilization windows running
//! (kube-controller-manager forgets them).

use crate::Hub;
use serde::{Deserialize, Serialize};
use skiff_model::autoscale::{
    decide, Decision, History, Metric, Phase, Pod, Recommendation, ScaleEvent, Settings, Source,
};
use skiff_model::metrics::{InstanceMetrics, MetricsSample};
use skiff_model::{Deployment, EventRecord, Health, InstanceState, InstanceStatus};
use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

/// History older than this is dropped (the longest window or period Kubernetes allows).
const KEEP_MS: u64 = 3_600_000;
const EVENTS_KEPT: usize = 500;
/// The store's state keys of the autoscalers' history.
const STATE: &str = "autoscaler/";

/// The controller's settings (kube-controller-manager's flags, plus the samples' window).
#[derive(Debug, Clone, Copy)]
pub struct Config {
    pub tolerance: f64,
    pub cpu_initialization_period_s: f64,
    pub initial_readiness_delay_s: f64,
    /// How much time one sample's CPU rate covers (the agents' sampling interval).
    pub metric_window_s: f64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            tolerance: skiff_model::autoscale::DEFAULT_TOLERANCE,
            cpu_initialization_period_s: skiff_model::autoscale::DEFAULT_CPU_INITIALIZATION_PERIOD,
            initial_readiness_delay_s: skiff_model::autoscale::DEFAULT_INITIAL_READINESS_DELAY,
            metric_window_s: 15.0,
        }
    }
}

#[derive(Default, Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Memory {
    /// (when, raw recommendation)
    recommendations: Vec<(u64, i32)>,
    /// (when, replicas added or removed)
    ups: Vec<(u64, i32)>,
    downs: Vec<(u64, i32)>,
    last: Option<Status>,
}

/// What `GET /api/v1/autoscalers` shows for one deployment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    pub deployment: String,
    pub min_replicas: i32,
    pub max_replicas: i32,
    pub current_replicas: i32,
    pub desired_replicas: i32,
    pub current_utilization: Option<i32>,
    pub current_average_value: Option<String>,
    pub reason: String,
    pub last_scale_time_ms: Option<u64>,
    pub time_ms: u64,
}

pub struct Autoscaler {
    pub config: Config,
    memory: Mutex<BTreeMap<String, Memory>>,
    pub(crate) events: crate::events::EventLog,
}

/// A reported instance as the calculator sees a pod; `wanted` is whether its slot is
/// still within the deployment's replicas (one beyond is being deleted).
/// The newest sample of each instance, by (node, instance), and when it was taken: built
/// once per sync period from every node's sample.
type Samples<'a> = HashMap<(&'a str, &'a str), (u64, &'a InstanceMetrics)>;

fn index(samples: &[MetricsSample]) -> Samples<'_> {
    samples
        .iter()
        .flat_map(|s| s.instances.iter().map(move |m| ((s.node.as_str(), m.instance.as_str()), (s.time_ms, m))))
        .collect()
}

/// Series older than this do not count towards an Object or External metric (a node
/// that went quiet keeps its last sample).
const STALE_MS: u64 = 120_000;

/// The sum of `m`'s series that `metric` selects, in milli-units (`None`: it has none).
fn selected(m: &InstanceMetrics, metric: &Metric) -> Option<i64> {
    let (name, selector) = metric.series()?;
    let mut found = m.series.iter().filter(|s| s.matches(name, selector)).map(|s| s.value).peekable();
    found.peek()?;
    Some((found.sum::<f64>() * 1000.0).round() as i64)
}

/// An Object or External metric's value now: the series of the instances it covers,
/// summed (`None`: none of them has one). Only instances of deployments `ours` accepts
/// count (the scaled deployment's stack, as Kubernetes keeps both to a namespace): a
/// workload elsewhere cannot steer this autoscaler.
fn measured(metric: &Metric, samples: &Samples<'_>, now_ms: u64, ours: impl Fn(&str) -> bool) -> Option<i64> {
    let covers = |m: &InstanceMetrics| {
        ours(&m.deployment)
            && match &metric.source {
                Source::Object { object, .. } if object.kind == "Pod" => m.instance == object.name,
                Source::Object { object, .. } => m.deployment == object.name,
                Source::External { .. } => true,
                Source::Resource(_) | Source::Pods { .. } => false,
            }
    };
    let values: Vec<i64> = samples
        .values()
        .filter(|(t, m)| now_ms.saturating_sub(*t) <= STALE_MS && covers(m))
        .filter_map(|(_, m)| selected(m, metric))
        .collect();
    (!values.is_empty()).then(|| values.iter().fold(0i64, |a, v| a.saturating_add(*v)))
}

fn pod(
    i: &InstanceStatus,
    d: &Deployment,
    sample: Option<&(u64, &InstanceMetrics)>,
    metrics: &[Metric],
    now_ms: u64,
    cfg: &Config,
) -> Pod {
    let ago = |t: u64| now_ms.saturating_sub(t) as f64 / 1000.0;
    let slot = d.slot_named(&i.name).unwrap_or(0);
    let phase = match i.state {
        InstanceState::Pending => Phase::Pending,
        InstanceState::Running | InstanceState::Restarting => Phase::Running,
        InstanceState::Exited if i.exit_code == Some(0) => Phase::Succeeded,
        InstanceState::Exited | InstanceState::Failed => Phase::Failed,
    };
    // Ready as Kubernetes would see it: running, and healthy when there is a check. The
    // readiness change is taken as the start (agents do not report when health changed).
    let ready = matches!((i.state, i.health), (InstanceState::Running, None | Some(Health::Healthy)));
    let started = i.started_at_ms.map(ago);
    let usage = sample.map(|(_, m)| {
        [m.cpu_cores.map(|c| (c * 1000.0).round() as i64), Some((m.memory_bytes as i64).saturating_mul(1000))]
    });
    Pod {
        name: i.name.clone(),
        phase,
        deleting: slot > d.replicas,
        ready: started.map(|s| (ready, s)),
        started_ago: started,
        requests: d.requests_milli(),
        usage: usage.unwrap_or([None, None]),
        // A quiet node's last sample does not stand for its pods for ever.
        custom: metrics
            .iter()
            .filter(|m| matches!(m.source, Source::Pods { .. }))
            .filter_map(|m| {
                let &(_, s) = sample.filter(|(t, _)| now_ms.saturating_sub(*t) <= STALE_MS)?;
                Some((m.series()?.0.to_string(), selected(s, m)?))
            })
            .collect(),
        sampled: (sample.map(|&(t, _)| ago(t)).unwrap_or(0.0), cfg.metric_window_s),
    }
}

impl Default for Autoscaler {
    fn default() -> Self {
        Autoscaler::new(Config::default())
    }
}

impl Autoscaler {
    pub fn new(config: Config) -> Self {
        Autoscaler { config, memory: Mutex::default(), events: crate::events::EventLog::new("autoscaler", EVENTS_KEPT) }
    }

    /// With the recommendations and scale events the store kept (unreadable ones are
    /// skipped: a window starts afresh, as before they were kept).
    pub fn load(self, store: &dyn crate::store::Store) -> Self {
        self.reload(store);
        self
    }

    /// What the store kept, in place of what this hub remembers (a hub taking the lead
    /// goes on from the windows of the one before it).
    pub fn reload(&self, store: &dyn crate::store::Store) {
        match store.states(STATE) {
            Ok(all) => {
                if let Ok(mut m) = self.memory.lock() {
                    m.clear();
                    for (k, v) in all {
                        if let Ok(mem) = serde_json::from_str::<Memory>(&v) {
                            m.insert(k[STATE.len()..].to_string(), mem);
                        }
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "reading the autoscalers' history: their windows start afresh"),
        }
    }

    /// Keeps `name`'s recommendations and scale events in the store (or forgets them).
    fn save(&self, store: &dyn crate::store::Store, name: &str) {
        let text = self.memory.lock().ok().and_then(|m| m.get(name).and_then(|x| serde_json::to_string(x).ok()));
        if let Err(e) = store.put_state(&format!("{STATE}{name}"), text.as_deref()) {
            tracing::warn!(deployment = %name, error = %e, "keeping the autoscaler's history");
        }
    }

    /// The newest decision for each autoscaled deployment.
    pub fn statuses(&self) -> Vec<Status> {
        self.memory.lock().map(|m| m.values().filter_map(|x| x.last.clone()).collect()).unwrap_or_default()
    }

    pub fn events(&self) -> Vec<EventRecord> {
        self.events.list()
    }

    fn event(&self, now_ms: u64, object: &str, reason: &str, message: String) {
        self.events.push(now_ms, object, reason, message);
    }

    /// Decides for `d` at `now_ms` from `instances` and `samples`; records what Kubernetes
    /// records. Returns the decision (`None`: not autoscaled or its spec is invalid).
    fn decide_for(
        &self,
        d: &Deployment,
        instances: &[InstanceStatus],
        samples: &Samples<'_>,
        stacks: &HashMap<&str, &str>,
        now_ms: u64,
    ) -> Option<Decision> {
        let spec = d.autoscale.as_ref()?;
        let mut checked = spec.check(d.requests_milli()).ok()?;
        let ours = |dep: &str| stacks.get(dep).is_some_and(|s| *s == d.stack);
        for m in &mut checked.metrics {
            m.current = measured(m, samples, now_ms, ours);
        }
        let pods: Vec<Pod> = instances
            .iter()
            .filter(|i| i.deployment == d.name && !i.retiring)
            .map(|i| {
                let sample = samples.get(&(i.node.as_str(), i.name.as_str()));
                pod(i, d, sample, &checked.metrics, now_ms, &self.config)
            })
            .collect();
        let settings = Settings {
            tolerance_up: self.config.tolerance,
            tolerance_down: self.config.tolerance,
            cpu_initialization_period: self.config.cpu_initialization_period_s,
            initial_readiness_delay: self.config.initial_readiness_delay_s,
        };
        let mut memory = self.memory.lock().ok()?;
        let m = memory.entry(d.name.clone()).or_default();
        for list in [&mut m.recommendations, &mut m.ups, &mut m.downs] {
            list.retain(|(t, _)| now_ms.saturating_sub(*t) <= KEEP_MS);
        }
        let ago = |t: u64| now_ms.saturating_sub(t) as f64 / 1000.0;
        let events =
            |l: &[(u64, i32)]| l.iter().map(|&(t, n)| ScaleEvent { seconds_ago: ago(t), replicas: n }).collect();
        let history = History {
            recommendations: m
                .recommendations
                .iter()
                .map(|&(t, n)| Recommendation { seconds_ago: ago(t), replicas: n })
                .collect(),
            scale_up_events: events(&m.ups),
            scale_down_events: events(&m.downs),
        };
        let current = d.replicas as i32;
        let decision = decide(&checked.situation(current, pods, settings, history));
        if decision.from_metrics {
            m.recommendations.push((now_ms, decision.raw_recommendation));
        }
        let desired = decision.desired_replicas;
        if desired > current {
            m.ups.push((now_ms, desired - current));
        } else if desired < current {
            m.downs.push((now_ms, current - desired));
        }
        let last_scale =
            if desired != current { Some(now_ms) } else { m.last.as_ref().and_then(|l| l.last_scale_time_ms) };
        m.last = Some(Status {
            deployment: d.name.clone(),
            min_replicas: checked.min,
            max_replicas: checked.max,
            current_replicas: current,
            desired_replicas: desired,
            current_utilization: decision.current_utilization,
            current_average_value: decision.current_average_value.clone(),
            reason: decision.reason.clone(),
            last_scale_time_ms: last_scale,
            time_ms: now_ms,
        });
        Some(decision)
    }
}

impl Hub {
    /// One sync period of the autoscaler: decides for every autoscaled deployment and
    /// stores the new replica counts (placement and nodes follow as after an apply).
    /// Returns the deployments it rescaled.
    pub fn autoscale(&self, now_ms: u64) -> Result<Vec<(String, i32)>, crate::HubError> {
        let deployments: Vec<Deployment> = self.store.list()?.into_iter().map(|s| s.spec).collect();
        if deployments.iter().all(|d| d.autoscale.is_none()) || !self.settled(now_ms) {
            return Ok(vec![]);
        }
        let instances = self.instances();
        let all_samples = self.metrics();
        let samples = index(&all_samples);
        let mut changed = vec![];
        let a = &self.autoscaler;
        let gone: Vec<String> = match a.memory.lock() {
            Ok(mut m) => {
                let gone = m
                    .keys()
                    .filter(|name| !deployments.iter().any(|d| &d.name == *name && d.autoscale.is_some()))
                    .cloned()
                    .collect();
                m.retain(|name, _| deployments.iter().any(|d| &d.name == name && d.autoscale.is_some()));
                gone
            }
            Err(_) => vec![],
        };
        for name in gone {
            a.save(&*self.store, &name);
        }
        let stacks: HashMap<&str, &str> = deployments.iter().map(|d| (d.name.as_str(), d.stack.as_str())).collect();
        for d in &deployments {
            let Some(decision) = a.decide_for(d, &instances, &samples, &stacks, now_ms) else { continue };
            a.save(&*self.store, &d.name);
            let current = d.replicas as i32;
            if decision.desired_replicas == current {
                continue;
            }
            let mut scaled = d.clone();
            scaled.replicas = decision.desired_replicas.max(0) as u32;
            self.store.apply(&[scaled], None, false, now_ms)?;
            a.event(
                now_ms,
                &d.name,
                "SuccessfulRescale",
                format!("New size: {}; reason: {}", decision.desired_replicas, decision.reason),
            );
            changed.push((d.name.clone(), decision.desired_replicas));
        }
        if !changed.is_empty() {
            self.sync_nodes()?;
        }
        Ok(changed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{SqliteStore, Store};

    /// Object and External values from what nodes shipped: a deployment's instances
    /// summed (or one instance's), an External metric over every node, the selector's
    /// labels matched, a sample gone stale left out, another stack's instances too.
    #[test]
    fn object_and_external_values_come_from_the_instances_they_cover() {
        use skiff_model::autoscale::{MetricSpec, ObjectRef};
        use skiff_model::metrics::Series;
        let series = |instance: &str, deployment: &str, list: &[(&str, &str, f64)]| InstanceMetrics {
            instance: instance.into(),
            deployment: deployment.into(),
            cpu_cores: None,
            memory_bytes: 0,
            rx_bytes: 0,
            tx_bytes: 0,
            restarts: 0,
            started_at_ms: None,
            series: list
                .iter()
                .map(|(n, q, v)| Series {
                    name: n.to_string(),
                    labels: [("queue".to_string(), q.to_string())].into(),
                    value: *v,
                })
                .collect(),
        };
        let now = 1_000_000;
        let (g1, g2, other, old) = (
            series("gw-1", "gw", &[("requests", "in", 10.0), ("requests", "out", 100.0)]),
            series("gw-2", "gw", &[("requests", "in", 2.5)]),
            series("db-1", "db", &[("requests", "in", 1.0), ("backlog", "in", 7.0)]),
            series("gw-3", "gw", &[("requests", "in", 1000.0)]),
        );
        let stranger = series("x-1", "elsewhere", &[("requests", "in", 1e9)]);
        let samples: Samples<'_> = [
            (("a", "gw-1"), (now - 5_000, &g1)),
            (("b", "gw-2"), (now - 5_000, &g2)),
            (("b", "db-1"), (now, &other)),
            (("c", "gw-3"), (now - STALE_MS - 1, &old)),
            (("d", "x-1"), (now, &stranger)),
        ]
        .into();
        let metric = |kind: &str, object: Option<(&str, &str)>, name: &str, selector: &[(&str, &str)]| {
            MetricSpec {
                kind: Some(kind.into()),
                name: Some(name.into()),
                selector: selector.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
                described_object: object.map(|(k, n)| ObjectRef { kind: k.into(), name: n.into() }),
                target_type: "Value".into(),
                value: Some("1".into()),
                ..Default::default()
            }
            .check("m")
            .unwrap()
        };
        let at = |m: &Metric| measured(m, &samples, now, |d| d != "elsewhere");
        assert_eq!(at(&metric("Object", Some(("Deployment", "gw")), "requests", &[("queue", "in")])), Some(12_500));
        assert_eq!(at(&metric("Object", Some(("Deployment", "gw")), "requests", &[])), Some(112_500));
        assert_eq!(at(&metric("Object", Some(("Pod", "gw-2")), "requests", &[])), Some(2_500));
        assert_eq!(at(&metric("Object", Some(("Deployment", "nothere")), "requests", &[])), None);
        assert_eq!(at(&metric("External", None, "requests", &[("queue", "in")])), Some(13_500));
        assert_eq!(at(&metric("External", None, "backlog", &[("queue", "out")])), None);
        // A Pods metric is each pod's own, not summed here.
        let pods = MetricSpec {
            kind: Some("Pods".into()),
            name: Some("requests".into()),
            target_type: "AverageValue".into(),
            average_value: Some("1".into()),
            ..Default::default()
        };
        let pods = pods.check("m").unwrap();
        assert_eq!(at(&pods), None);
        assert_eq!(selected(&g1, &pods), Some(110_000));
    }

    /// What one hub's autoscaler remembered (the recommendations a scale-down window
    /// looks back over, the scale events) is what the next hub on the store starts with;
    /// an autoscaler removed is forgotten there too.
    #[test]
    fn recommendations_outlive_the_hub_that_made_them() {
        let t = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&t.path().join("hub.db")).unwrap();
        let a = Autoscaler::new(Config::default());
        let mem =
            Memory { recommendations: vec![(1_000, 5), (16_000, 2)], ups: vec![(1_000, 3)], downs: vec![], last: None };
        a.memory.lock().unwrap().insert("web".into(), mem.clone());
        a.save(&store, "web");
        store.put_state("autoscaler/broken", Some("{not json")).unwrap();
        let b = Autoscaler::new(Config::default()).load(&store);
        let got = b.memory.lock().unwrap().clone();
        assert_eq!(got.get("web"), Some(&mem));
        assert!(!got.contains_key("broken"), "an unreadable record starts afresh");
        b.memory.lock().unwrap().remove("web");
        b.save(&store, "web");
        assert!(store.states("autoscaler/web").unwrap().is_empty());
    }
}
