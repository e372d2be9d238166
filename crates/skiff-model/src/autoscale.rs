//! The horizontal autoscaler's decision, as Kubernetes makes it (`autoscaling/v2`
//! HorizontalPodAutoscaler, kube-controller-manager's replica calculator and behavior
//! normalization), for `Resource` metrics (cpu or memory, `Utilization` or `AverageValue`),
//! `Pods` metrics (each pod's own metric, `AverageValue`), and `Object` and `External`
//! metrics (one value, `Value` or `AverageValue`).
//!
//! Everything here is pure: the situation (pods, their readiness and samples, past
//! recommendations and scale events) comes in as data with times relative to "now", so
//! `skiff autoscale simulate` and the hub's live autoscaler run the same code.
//!
//! What Kubernetes does, and so this does:
//! * Pods being deleted or Failed are ignored; Pending pods count as unready; pods
//!   without a sample are "missing". For cpu, a pod is unready when it has no Ready
//!   condition or start time; within the CPU initialization period (default 300 s) when
//!   it is not ready or its sample's window began before its last readiness change; after
//!   it, when it is not ready and never was (its readiness changed within the initial
//!   readiness delay, default 30 s, of its start).
//! * Utilization = sum(usage) × 100 / sum(requests) over the pods with samples, truncated
//!   to an integer percentage before the ratio to the target is taken. AverageValue =
//!   sum(usage) / pods, truncated to milli-units.
//! * Within tolerance (default 0.1 either way) nothing changes. With missing pods, they
//!   count as using 100 % of their request (or the target, if higher) on the way down and
//!   0 % on the way up; unready pods count as 0 % on the way up. If that flips the
//!   direction or lands within tolerance, nothing changes. A Pods metric is averaged the
//!   same way, but readiness is looked at for cpu only (Pending pods stay unready).
//! * An Object or External `Value`: ratio = value / target; within tolerance nothing
//!   changes, else ceil(ratio × running-and-ready pods) (from zero replicas: ceil(ratio)).
//!   `AverageValue`: ceil(value / target) unless value / (target × replicas) is within
//!   tolerance. An External metric's value is the sum of its series.
//! * Without `behavior`: the highest recommendation of the last 300 s (the downscale
//!   stabilization window), then at most max(2 × current, 4) and within min/max.
//! * With `behavior`: recommendations are stabilized (scale-up: the lowest of the
//!   scale-up window, default 0 s; scale-down: the highest of the scale-down window,
//!   default 300 s), then the rate is limited by the policies (`Pods`/`Percent` per
//!   `periodSeconds`, counting the scale events in each period, `selectPolicy` Max, Min
//!   or Disabled; defaults: up 4 pods or 100 % per 15 s, down 100 % per 15 s), then
//!   clamped to min/max.

use serde::{Deserialize, Deserializer, Serialize};
use std::collections::BTreeMap;

/// Kubernetes' defaults for the controller flags.
pub const DEFAULT_TOLERANCE: f64 = 0.1;
pub const DEFAULT_CPU_INITIALIZATION_PERIOD: f64 = 300.0;
pub const DEFAULT_INITIAL_READINESS_DELAY: f64 = 30.0;
pub const DEFAULT_DOWNSCALE_STABILIZATION: i64 = 300;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct ScenarioError {
    pub field: String,
    pub problem: String,
}

fn invalid(field: impl Into<String>, problem: impl Into<String>) -> ScenarioError {
    ScenarioError { field: field.into(), problem: problem.into() }
}

/// `null` and absent told apart: absent is `None`, `null` is `Some(None)`.
fn explicit<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

/// The situation `skiff autoscale simulate -f` reads. Times are seconds before "now".
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Scenario {
    pub current_replicas: i32,
    #[serde(default = "one")]
    pub min_replicas: i32,
    pub max_replicas: i32,
    #[serde(default = "default_tolerance")]
    pub tolerance: f64,
    /// One metric, or several in `metrics` (the highest recommendation wins).
    #[serde(default)]
    pub metric: Option<MetricSpec>,
    #[serde(default)]
    pub metrics: Vec<MetricSpec>,
    #[serde(default)]
    pub pods: Vec<PodIn>,
    #[serde(default)]
    pub behavior: Option<Behavior>,
    /// Earlier recommendations of this autoscaler (what stabilization looks back on).
    #[serde(default)]
    pub recommendations: Vec<Recommendation>,
    /// Earlier scale-ups and scale-downs (what the rate policies count), a skiff extension:
    /// Kubernetes keeps these in the controller's memory.
    #[serde(default)]
    pub scale_up_events: Vec<ScaleEvent>,
    #[serde(default)]
    pub scale_down_events: Vec<ScaleEvent>,
    #[serde(default = "default_cpu_init")]
    pub cpu_initialization_period_seconds: f64,
    #[serde(default = "default_readiness_delay")]
    pub initial_readiness_delay_seconds: f64,
    /// The controller's `--horizontal-pod-autoscaler-downscale-stabilization`.
    #[serde(default = "default_downscale")]
    pub downscale_stabilization_seconds: i64,
}

fn one() -> i32 {
    1
}
fn default_tolerance() -> f64 {
    DEFAULT_TOLERANCE
}
fn default_cpu_init() -> f64 {
    DEFAULT_CPU_INITIALIZATION_PERIOD
}
fn default_readiness_delay() -> f64 {
    DEFAULT_INITIAL_READINESS_DELAY
}
fn default_downscale() -> i64 {
    DEFAULT_DOWNSCALE_STABILIZATION
}
fn default_window() -> f64 {
    30.0
}

/// One metric of an autoscaler, as `autoscaling/v2` names it but flat: `type` (default
/// `Resource`), then the source's fields and the target's.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MetricSpec {
    /// `Resource` (absent), `Pods`, `Object` or `External`.
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// Resource metrics: `cpu` or `memory`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub resource: String,
    /// Pods, Object and External metrics: the metric's name, as the workload exposes it
    /// in the Prometheus text format.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The series that count (`metric.selector.matchLabels`): every label must match.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub selector: BTreeMap<String, String>,
    /// Object metrics: what the value describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub described_object: Option<ObjectRef>,
    /// `Utilization`, `AverageValue` or `Value`.
    pub target_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub average_utilization: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub average_value: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    /// Simulation scenarios only: the value an Object or External metric has now (for
    /// External, the sum of its series).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_value: Option<String>,
}

/// The object an Object metric describes: a `Deployment` (its instances' series summed)
/// or one instance (`Pod`, by its name such as `web-2`).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ObjectRef {
    pub kind: String,
    pub name: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resource {
    Cpu,
    Memory,
}

impl Resource {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "cpu" => Some(Resource::Cpu),
            "memory" => Some(Resource::Memory),
            _ => None,
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }

    pub fn name(self) -> &'static str {
        match self {
            Resource::Cpu => "cpu",
            Resource::Memory => "memory",
        }
    }
}

/// A checked metric's target: a percentage, or milli-units.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Utilization(i32),
    AverageValue(i64),
    Value(i64),
}

/// Where a checked metric's value comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Resource(Resource),
    /// Each pod's own series of this name (those the selector picks, summed per pod).
    Pods {
        name: String,
        selector: BTreeMap<String, String>,
    },
    /// One value describing an object.
    Object {
        name: String,
        selector: BTreeMap<String, String>,
        object: ObjectRef,
    },
    /// Series from anywhere, summed.
    External {
        name: String,
        selector: BTreeMap<String, String>,
    },
}

/// A checked metric. `current` is the measured value of an Object or External metric in
/// milli-units (`None`: it could not be read); pods carry their own values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Metric {
    pub source: Source,
    pub target: Target,
    pub current: Option<i64>,
}

impl Metric {
    /// The custom metric's name and selector (`None` for a Resource metric).
    pub fn series(&self) -> Option<(&str, &BTreeMap<String, String>)> {
        match &self.source {
            Source::Resource(_) => None,
            Source::Pods { name, selector }
            | Source::Object { name, selector, .. }
            | Source::External { name, selector } => Some((name, selector)),
        }
    }
}

/// Every metric name these autoscalers read from workloads' own metrics, sorted, once:
/// what agents scrape and ship.
pub fn scraped_names<'a>(specs: impl IntoIterator<Item = &'a AutoscaleSpec>) -> Vec<String> {
    let names: std::collections::BTreeSet<String> =
        specs.into_iter().flat_map(|a| a.metrics.iter().filter_map(|m| m.name.clone())).collect();
    names.into_iter().collect()
}

/// Whether `s` is a Prometheus metric name (`[a-zA-Z_:][a-zA-Z0-9_:]*`).
pub fn is_metric_name(s: &str) -> bool {
    let mut c = s.chars();
    c.next().is_some_and(|f| f.is_ascii_alphabetic() || f == '_' || f == ':')
        && c.all(|x| x.is_ascii_alphanumeric() || x == '_' || x == ':')
}

impl MetricSpec {
    pub fn check(&self, field: &str) -> Result<Metric, ScenarioError> {
        let kind = self.kind.as_deref().unwrap_or("Resource");
        let at = |f: &str| format!("{field}.{f}");
        let absent = |present: bool, f: &str, why: &str| {
            if present {
                Err(invalid(at(f), format!("is not for {kind} metrics ({why})")))
            } else {
                Ok(())
            }
        };
        let name = || -> Result<String, ScenarioError> {
            let n = self.name.as_deref().ok_or_else(|| invalid(at("name"), format!("required for {kind} metrics")))?;
            if !is_metric_name(n) {
                return Err(invalid(at("name"), format!("{n:?} is not a Prometheus metric name")));
            }
            Ok(n.to_string())
        };
        for (k, v) in &self.selector {
            if k.is_empty() || !k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') || v.contains('\n') {
                return Err(invalid(at(&format!("selector.{k}")), "is not a label name and value"));
            }
        }
        let (source, allowed): (Source, &[&str]) = match kind {
            "Resource" => {
                absent(self.name.is_some(), "name", "a resource is named in resource")?;
                absent(!self.selector.is_empty(), "selector", "it selects series")?;
                let r = Resource::parse(&self.resource)
                    .ok_or_else(|| invalid(at("resource"), format!("{:?} is not cpu or memory", self.resource)))?;
                (Source::Resource(r), &["Utilization", "AverageValue"])
            }
            "Pods" => (Source::Pods { name: name()?, selector: self.selector.clone() }, &["AverageValue"]),
            "Object" => {
                let o = self
                    .described_object
                    .clone()
                    .ok_or_else(|| invalid(at("describedObject"), "required for Object metrics"))?;
                if o.kind.is_empty() {
                    return Err(invalid(at("describedObject.kind"), "is required"));
                }
                if !matches!(o.kind.as_str(), "Deployment" | "Pod") {
                    return Err(invalid(at("describedObject.kind"), format!("{:?} is not Deployment or Pod", o.kind)));
                }
                if o.name.is_empty() {
                    return Err(invalid(at("describedObject.name"), "is required"));
                }
                (
                    Source::Object { name: name()?, selector: self.selector.clone(), object: o },
                    &["Value", "AverageValue"],
                )
            }
            "External" => {
                (Source::External { name: name()?, selector: self.selector.clone() }, &["Value", "AverageValue"])
            }
            other => return Err(invalid(at("type"), format!("{other:?} is not Resource, Pods, Object or External"))),
        };
        if kind != "Resource" && !self.resource.is_empty() {
            return Err(invalid(at("resource"), format!("is not for {kind} metrics (they name a metric in name)")));
        }
        if kind != "Object" && self.described_object.is_some() {
            return Err(invalid(at("describedObject"), format!("is not for {kind} metrics")));
        }
        let quantity = |f: &str, v: &str| -> Result<i64, ScenarioError> {
            let m = milli_value(v).map_err(|e| invalid(at(f), e))?;
            if m <= 0 {
                return Err(invalid(at(f), format!("{v:?} must be more than 0")));
            }
            Ok(m)
        };
        let tt = self.target_type.as_str();
        if !allowed.contains(&tt) {
            return Err(invalid(
                at("targetType"),
                format!("{tt:?} is not a target of {kind} metrics ({})", allowed.join(" or ")),
            ));
        }
        let given = [
            ("averageUtilization", self.average_utilization.is_some()),
            ("averageValue", self.average_value.is_some()),
            ("value", self.value.is_some()),
        ];
        let wanted = match tt {
            "Utilization" => "averageUtilization",
            "AverageValue" => "averageValue",
            _ => "value",
        };
        if let Some((other, _)) = given.iter().find(|(f, set)| *set && *f != wanted) {
            return Err(invalid(field, format!("give {wanted} for targetType {tt}, not {other}")));
        }
        let target = match (tt, self.average_utilization, &self.average_value, &self.value) {
            ("Utilization", Some(u), _, _) if u > 0 => Target::Utilization(u),
            ("Utilization", Some(u), _, _) => {
                return Err(invalid(at("averageUtilization"), format!("{u} must be more than 0")))
            }
            ("AverageValue", _, Some(v), _) => Target::AverageValue(quantity("averageValue", v)?),
            ("Value", _, _, Some(v)) => Target::Value(quantity("value", v)?),
            _ => return Err(invalid(at(wanted), format!("required for targetType {tt}"))),
        };
        let current = match &self.current_value {
            None => None,
            Some(_) if !matches!(kind, "Object" | "External") => {
                return Err(invalid(
                    at("currentValue"),
                    "is for Object and External metrics (pods give theirs in usage)",
                ))
            }
            Some(v) => Some(milli_value(v).map_err(|e| invalid(at("currentValue"), e))?),
        };
        Ok(Metric { source, target, current })
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PodIn {
    pub name: String,
    #[serde(default = "running")]
    pub phase: String,
    /// The Ready condition: `true`, `false`, or `null` for none (default true).
    #[serde(default, deserialize_with = "explicit")]
    pub ready: Option<Option<bool>>,
    #[serde(default)]
    pub deleting: bool,
    /// `null`: no start time (the kubelet has not reported one). Absent: long ago.
    #[serde(default, deserialize_with = "explicit")]
    pub started_seconds_ago: Option<Option<f64>>,
    /// When the Ready condition last changed. Absent: long ago.
    #[serde(default)]
    pub ready_transition_seconds_ago: Option<f64>,
    #[serde(default)]
    pub requests: BTreeMap<String, String>,
    /// No `usage` (or none for the resource): the pod's metric is missing.
    #[serde(default)]
    pub usage: Option<BTreeMap<String, String>>,
    #[serde(default)]
    pub metric_timestamp_seconds_ago: f64,
    #[serde(default = "default_window")]
    pub metric_window_seconds: f64,
}

fn running() -> String {
    "Running".into()
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Recommendation {
    pub seconds_ago: f64,
    pub replicas: i32,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ScaleEvent {
    pub seconds_ago: f64,
    /// How many replicas the event added (scale-up) or removed (scale-down).
    pub replicas: i32,
}

/// `spec.behavior` of an `autoscaling/v2` HorizontalPodAutoscaler.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Behavior {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale_up: Option<ScalingRules>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale_down: Option<ScalingRules>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ScalingRules {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stabilization_window_seconds: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub select_policy: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policies: Option<Vec<Policy>>,
    /// Per-direction tolerance (Kubernetes' HPAConfigurableTolerance).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tolerance: Option<f64>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Policy {
    #[serde(rename = "type")]
    pub kind: String,
    pub value: i32,
    pub period_seconds: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Select {
    Max,
    Min,
    Disabled,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PolicyKind {
    Pods,
    Percent,
}

/// Rules with Kubernetes' defaults filled in.
#[derive(Debug, Clone, PartialEq)]
struct Rules {
    window: i64,
    select: Select,
    policies: Vec<(PolicyKind, i32, i64)>,
}

impl ScalingRules {
    fn check(&self, field: &str, default: Rules) -> Result<Rules, ScenarioError> {
        let mut r = default;
        if let Some(w) = self.stabilization_window_seconds {
            if !(0..=3600).contains(&w) {
                return Err(invalid(
                    format!("{field}.stabilizationWindowSeconds"),
                    format!("{w} is not within 0..3600"),
                ));
            }
            r.window = w;
        }
        if let Some(s) = &self.select_policy {
            r.select = match s.as_str() {
                "Max" => Select::Max,
                "Min" => Select::Min,
                "Disabled" => Select::Disabled,
                other => {
                    return Err(invalid(
                        format!("{field}.selectPolicy"),
                        format!("{other:?} is not Max, Min or Disabled"),
                    ))
                }
            };
        }
        if let Some(ps) = &self.policies {
            if ps.is_empty() && r.select != Select::Disabled {
                return Err(invalid(format!("{field}.policies"), "must list at least one policy"));
            }
            r.policies = vec![];
            for (i, p) in ps.iter().enumerate() {
                let f = format!("{field}.policies[{i}]");
                let kind = match p.kind.as_str() {
                    "Pods" => PolicyKind::Pods,
                    "Percent" => PolicyKind::Percent,
                    other => return Err(invalid(format!("{f}.type"), format!("{other:?} is not Pods or Percent"))),
                };
                if p.value <= 0 {
                    return Err(invalid(format!("{f}.value"), format!("{} must be more than 0", p.value)));
                }
                if !(1..=1800).contains(&p.period_seconds) {
                    return Err(invalid(
                        format!("{f}.periodSeconds"),
                        format!("{} is not within 1..1800", p.period_seconds),
                    ));
                }
                r.policies.push((kind, p.value, p.period_seconds));
            }
        }
        if let Some(t) = self.tolerance {
            if !(0.0..=1.0).contains(&t) {
                return Err(invalid(format!("{field}.tolerance"), format!("{t} is not within 0..1")));
            }
        }
        Ok(r)
    }
}

/// What one pod looks like to the calculator (times in seconds before now).
#[derive(Debug, Clone, PartialEq)]
pub struct Pod {
    pub name: String,
    pub phase: Phase,
    pub deleting: bool,
    /// The Ready condition, if the pod has one: (status, seconds since it last changed).
    pub ready: Option<(bool, f64)>,
    pub started_ago: Option<f64>,
    /// The pod's requests in milli-units, by [`Resource::index`] (`None`: not set).
    pub requests: [Option<i64>; 2],
    /// Its sample, by [`Resource::index`] (`None`: the metric is missing), in milli-units.
    pub usage: [Option<i64>; 2],
    /// Its own metrics (Pods metrics) by name, in milli-units; absent: missing.
    pub custom: BTreeMap<String, i64>,
    /// When the sample was taken (seconds ago) and the window it covers (seconds).
    pub sampled: (f64, f64),
}

impl Pod {
    fn metric(&self, source: &Source) -> Option<i64> {
        match source {
            Source::Resource(r) => self.usage[r.index()],
            Source::Pods { name, .. } => self.custom.get(name).copied(),
            Source::Object { .. } | Source::External { .. } => None,
        }
    }

    /// Running and Ready, as `getReadyPodsCount` counts.
    fn running_and_ready(&self) -> bool {
        self.phase == Phase::Running && self.ready.is_some_and(|(r, _)| r)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Pending,
    Running,
    Succeeded,
    Failed,
}

/// Long ago: Go's zero time, as an unset timestamp is.
const LONG_AGO: f64 = 1e12;

impl PodIn {
    fn check(&self, field: &str) -> Result<Pod, ScenarioError> {
        let phase = match self.phase.as_str() {
            "Pending" => Phase::Pending,
            "Running" => Phase::Running,
            "Succeeded" => Phase::Succeeded,
            "Failed" => Phase::Failed,
            other => {
                return Err(invalid(
                    format!("{field}.phase"),
                    format!("{other:?} is not Pending, Running, Succeeded or Failed"),
                ))
            }
        };
        let ago = |name: &str, v: f64| {
            if v.is_finite() && v >= 0.0 {
                Ok(v)
            } else {
                Err(invalid(format!("{field}.{name}"), format!("{v} must be 0 or more")))
            }
        };
        let transition = ago("readyTransitionSecondsAgo", self.ready_transition_seconds_ago.unwrap_or(LONG_AGO))?;
        let ready = match self.ready {
            None => Some((true, transition)),
            Some(None) => None,
            Some(Some(r)) => Some((r, transition)),
        };
        let started_ago = match self.started_seconds_ago {
            None => Some(LONG_AGO),
            Some(None) => None,
            Some(Some(s)) => Some(ago("startedSecondsAgo", s)?),
        };
        // Resources by index; with `custom`, other names are the pod's own metrics.
        let amounts = |what: &str,
                       map: &BTreeMap<String, String>,
                       mut custom: Option<&mut BTreeMap<String, i64>>|
         -> Result<[Option<i64>; 2], ScenarioError> {
            let mut out = [None, None];
            for (k, q) in map {
                let f = format!("{field}.{what}.{k}");
                let m = match milli_value(q) {
                    Ok(m) if m >= 0 => m,
                    Ok(_) => return Err(invalid(f, format!("{q:?} must not be negative"))),
                    Err(e) => return Err(invalid(f, e)),
                };
                match (Resource::parse(k), custom.as_deref_mut()) {
                    (Some(r), _) => out[r.index()] = Some(m),
                    (None, Some(c)) if is_metric_name(k) => {
                        c.insert(k.clone(), m);
                    }
                    (None, Some(_)) => return Err(invalid(f, "not cpu, memory or a metric name")),
                    (None, None) => return Err(invalid(f, "not a resource (cpu or memory)")),
                }
            }
            Ok(out)
        };
        let mut custom = BTreeMap::new();
        Ok(Pod {
            name: self.name.clone(),
            phase,
            deleting: self.deleting,
            ready,
            started_ago,
            requests: amounts("requests", &self.requests, None)?,
            usage: match &self.usage {
                Some(u) => amounts("usage", u, Some(&mut custom))?,
                None => [None, None],
            },
            custom,
            sampled: (
                ago("metricTimestampSecondsAgo", self.metric_timestamp_seconds_ago)?,
                ago("metricWindowSeconds", self.metric_window_seconds)?,
            ),
        })
    }
}

/// The calculator's settings (kube-controller-manager flags).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Settings {
    pub tolerance_up: f64,
    pub tolerance_down: f64,
    pub cpu_initialization_period: f64,
    pub initial_readiness_delay: f64,
}

impl Settings {
    fn within(&self, ratio: f64) -> bool {
        (1.0 - self.tolerance_down) <= ratio && ratio <= (1.0 + self.tolerance_up)
    }
}

/// What the calculator says for one metric.
#[derive(Debug, Clone, PartialEq)]
pub struct Calculated {
    pub replicas: i32,
    /// Utilization in percent of requests (Utilization targets).
    pub utilization: Option<i32>,
    /// Average per pod, milli-units.
    pub average: i64,
    /// Why the count is the current one, when it is.
    pub held: Option<String>,
}

/// Groups pods as Kubernetes' `groupPods`: (ready with metrics, unready, missing, ignored).
fn group(pods: &[Pod], source: &Source, s: &Settings) -> (usize, Vec<usize>, Vec<usize>, Vec<usize>) {
    let (mut ready, mut unready, mut missing, mut ignored) = (0, vec![], vec![], vec![]);
    for (i, p) in pods.iter().enumerate() {
        if p.deleting || p.phase == Phase::Failed {
            ignored.push(i);
            continue;
        }
        if p.phase == Phase::Pending {
            unready.push(i);
            continue;
        }
        if p.metric(source).is_none() {
            missing.push(i);
            continue;
        }
        let (metric_ago, window) = p.sampled;
        if *source == Source::Resource(Resource::Cpu) {
            let not_ready = match (p.ready, p.started_ago) {
                (None, _) | (_, None) => true,
                (Some((status, transition_ago)), Some(started_ago)) => {
                    if started_ago < s.cpu_initialization_period {
                        // Within the initialization period: unready, or the sample's window
                        // began before the last readiness change.
                        !status || -metric_ago < -transition_ago + window
                    } else {
                        // Unready and never ready since start.
                        !status && -started_ago + s.initial_readiness_delay > -transition_ago
                    }
                }
            };
            if not_ready {
                unready.push(i);
                continue;
            }
        }
        ready += 1;
    }
    (ready, unready, missing, ignored)
}

const NO_PODS: &str = "no pods returned by selector while calculating replica count";

/// Kubernetes' `GetResourceReplicas` (Utilization), `GetRawResourceReplicas` and
/// `GetMetricReplicas` (AverageValue of a resource or of the pods' own metric), and for
/// Object and External metrics [`usage_replicas`].
pub fn calculate(current: i32, metric: &Metric, pods: &[Pod], s: &Settings) -> Result<Calculated, String> {
    let (source, target) = (&metric.source, metric.target);
    if matches!(source, Source::Object { .. } | Source::External { .. }) {
        return usage_replicas(current, metric, pods, s);
    }
    if pods.is_empty() {
        return Err(NO_PODS.into());
    }
    let (ready_count, unready, missing, ignored) = group(pods, source, s);
    // Pod index → value, for the pods whose samples count.
    let mut metrics: BTreeMap<usize, i64> = pods
        .iter()
        .enumerate()
        .filter(|(i, _)| !ignored.contains(i) && !unready.contains(i))
        .filter_map(|(i, p)| p.metric(source).map(|v| (i, v)))
        .collect();
    if let Source::Pods { name, .. } = source {
        if pods.iter().all(|p| p.metric(source).is_none()) {
            return Err(format!("unable to get metric {name}: no metrics returned from custom metrics API"));
        }
    }
    if metrics.is_empty() {
        return Err("did not receive metrics for targeted pods (pods might be unready)".into());
    }
    let held = |why: &str| Some(why.to_string());
    match target {
        Target::Utilization(target_pct) => {
            let Source::Resource(resource) = *source else {
                return Err("Utilization is a target of Resource metrics only".into());
            };
            let mut requests = BTreeMap::new();
            for (i, p) in pods.iter().enumerate() {
                let r = p.requests[resource.index()]
                    .ok_or_else(|| format!("missing request for {} in pod {}", resource.name(), p.name))?;
                requests.insert(i, r);
            }
            let (ratio, utilization, average) = utilization_ratio(&metrics, &requests, target_pct)?;
            let scale_up_with_unready = !unready.is_empty() && ratio > 1.0;
            if !scale_up_with_unready && missing.is_empty() {
                if s.within(ratio) {
                    let why = format!("usage ratio {ratio:.3} is within tolerance");
                    return Ok(Calculated {
                        replicas: current,
                        utilization: Some(utilization),
                        average,
                        held: held(&why),
                    });
                }
                let replicas = (ratio * ready_count as f64).ceil() as i32;
                return Ok(Calculated { replicas, utilization: Some(utilization), average, held: None });
            }
            if ratio < 1.0 {
                let fallback = i64::from(target_pct.max(100));
                for &i in &missing {
                    metrics.insert(i, requests[&i] * fallback / 100);
                }
            } else if ratio > 1.0 {
                for &i in &missing {
                    metrics.insert(i, 0);
                }
            }
            if scale_up_with_unready {
                for &i in &unready {
                    metrics.insert(i, 0);
                }
            }
            let (new_ratio, _, _) = utilization_ratio(&metrics, &requests, target_pct)?;
            let done = |replicas: i32, held: Option<String>| {
                Ok(Calculated { replicas, utilization: Some(utilization), average, held })
            };
            rebalanced(current, ratio, new_ratio, metrics.len(), s, done)
        }
        Target::AverageValue(target_milli) => {
            let (ratio, average) = usage_ratio(&metrics, target_milli);
            let scale_up_with_unready = !unready.is_empty() && ratio > 1.0;
            if !scale_up_with_unready && missing.is_empty() {
                if s.within(ratio) {
                    let why = format!("usage ratio {ratio:.3} is within tolerance");
                    return Ok(Calculated { replicas: current, utilization: None, average, held: held(&why) });
                }
                let replicas = (ratio * ready_count as f64).ceil() as i32;
                return Ok(Calculated { replicas, utilization: None, average, held: None });
            }
            // `calcPlainMetricReplicas`: unlike Utilization, a ratio of exactly 1 counts
            // missing pods as 0.
            let fill = if ratio < 1.0 { target_milli } else { 0 };
            for &i in &missing {
                metrics.insert(i, fill);
            }
            if scale_up_with_unready {
                for &i in &unready {
                    metrics.insert(i, 0);
                }
            }
            let (new_ratio, _) = usage_ratio(&metrics, target_milli);
            let done =
                |replicas: i32, held: Option<String>| Ok(Calculated { replicas, utilization: None, average, held });
            rebalanced(current, ratio, new_ratio, metrics.len(), s, done)
        }
        Target::Value(_) => Err("Value is a target of Object and External metrics only".into()),
    }
}

/// Object and External metrics: one value (an External metric's series summed). A
/// `Value` target: `GetObjectMetricReplicas`/`GetExternalMetricReplicas` (the ratio to the
/// target times the ready pods, or from zero replicas its ceiling); `AverageValue`:
/// `Get…PerPodMetricReplicas` (the value over the target per replica).
fn usage_replicas(current: i32, metric: &Metric, pods: &[Pod], s: &Settings) -> Result<Calculated, String> {
    let name = metric.series().map(|(n, _)| n).unwrap_or_default();
    let usage = metric.current.ok_or_else(|| match &metric.source {
        Source::Object { object, .. } => {
            format!("unable to get metric {name}: no series of it on {} {}", object.kind, object.name)
        }
        _ => format!("unable to get external metric {name}: no series of it was reported"),
    })?;
    let within = |ratio: f64| Some(format!("usage ratio {ratio:.3} is within tolerance"));
    match metric.target {
        Target::Value(target) => {
            let ratio = usage as f64 / target as f64;
            if current == 0 {
                let replicas = ratio.ceil() as i32;
                return Ok(Calculated { replicas, utilization: None, average: usage, held: None });
            }
            if s.within(ratio) {
                return Ok(Calculated { replicas: current, utilization: None, average: usage, held: within(ratio) });
            }
            if pods.is_empty() {
                return Err(format!("unable to calculate ready pods: {NO_PODS}"));
            }
            let ready = pods.iter().filter(|p| p.running_and_ready()).count();
            let replicas = (ratio * ready as f64).ceil() as i32;
            Ok(Calculated { replicas, utilization: None, average: usage, held: None })
        }
        Target::AverageValue(target) => {
            // `statusReplicas`: the pods there are (the count asked for, when none is known).
            let status = match pods.iter().filter(|p| !p.deleting).count() {
                0 => current,
                n => i32::try_from(n).unwrap_or(i32::MAX),
            };
            let ratio = usage as f64 / (target as f64 * f64::from(status));
            let average = if status > 0 { (usage as f64 / f64::from(status)).ceil() as i64 } else { usage };
            if s.within(ratio) {
                return Ok(Calculated { replicas: current, utilization: None, average, held: within(ratio) });
            }
            let replicas = (usage as f64 / target as f64).ceil() as i32;
            Ok(Calculated { replicas, utilization: None, average, held: None })
        }
        Target::Utilization(_) => Err("Utilization is a target of Resource metrics only".into()),
    }
}

/// The second pass, after missing and unready pods got their assumed values.
fn rebalanced(
    current: i32,
    ratio: f64,
    new_ratio: f64,
    counted: usize,
    s: &Settings,
    done: impl Fn(i32, Option<String>) -> Result<Calculated, String>,
) -> Result<Calculated, String> {
    if s.within(new_ratio) {
        return done(
            current,
            Some(format!("usage ratio {new_ratio:.3} (with missing and unready pods assumed) is within tolerance")),
        );
    }
    if (ratio < 1.0 && new_ratio > 1.0) || (ratio > 1.0 && new_ratio < 1.0) {
        return done(current, Some("missing and unready pods would reverse the scale direction".into()));
    }
    let replicas = (new_ratio * counted as f64).ceil() as i32;
    if (new_ratio < 1.0 && replicas > current) || (new_ratio > 1.0 && replicas < current) {
        return done(current, Some("counting missing and unready pods would reverse the scale direction".into()));
    }
    done(replicas, None)
}

/// (ratio, utilization %, average milli-value) over the pods with both a sample and a request.
fn utilization_ratio(
    metrics: &BTreeMap<usize, i64>,
    requests: &BTreeMap<usize, i64>,
    target: i32,
) -> Result<(f64, i32, i64), String> {
    let (mut total, mut requested, mut n) = (0i64, 0i64, 0i64);
    for (i, v) in metrics {
        if let Some(r) = requests.get(i) {
            total += v;
            requested += r;
            n += 1;
        }
    }
    if requested == 0 {
        return Err("no metrics returned matched known pods".into());
    }
    let utilization = (total * 100 / requested) as i32;
    Ok((f64::from(utilization) / f64::from(target), utilization, total / n))
}

/// (ratio, average milli-value): Kubernetes' `GetMetricUsageRatio`.
fn usage_ratio(metrics: &BTreeMap<usize, i64>, target: i64) -> (f64, i64) {
    let total = metrics.values().fold(0i64, |a, v| a.saturating_add(*v));
    let average = total / metrics.len() as i64;
    (average as f64 / target as f64, average)
}

/// A horizontal autoscaler on a deployment: an `autoscaling/v2` HorizontalPodAutoscaler
/// or compose's `x-skiff-autoscale`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AutoscaleSpec {
    #[serde(default = "one")]
    pub min_replicas: i32,
    pub max_replicas: i32,
    pub metrics: Vec<MetricSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub behavior: Option<Behavior>,
}

/// A checked [`AutoscaleSpec`].
#[derive(Debug, Clone, PartialEq)]
pub struct Checked {
    pub min: i32,
    pub max: i32,
    pub metrics: Vec<Metric>,
    behavior: Option<CheckedBehavior>,
}

/// `behavior` with Kubernetes' defaults filled in, and the per-direction tolerances it sets.
#[derive(Debug, Clone, PartialEq)]
struct CheckedBehavior {
    up: Rules,
    down: Rules,
    tolerance_up: Option<f64>,
    tolerance_down: Option<f64>,
}

impl Behavior {
    /// Checks the rules; `downscale` is the scale-down window when none is given.
    fn check(&self, downscale: i64) -> Result<CheckedBehavior, ScenarioError> {
        let up = self.scale_up.clone().unwrap_or_default();
        let down = self.scale_down.clone().unwrap_or_default();
        Ok(CheckedBehavior {
            up: up.check("behavior.scaleUp", default_up())?,
            down: down.check("behavior.scaleDown", default_down(downscale))?,
            tolerance_up: up.tolerance,
            tolerance_down: down.tolerance,
        })
    }
}

impl CheckedBehavior {
    /// `s` with the tolerances this behavior sets.
    fn tolerances(&self, s: Settings) -> Settings {
        Settings {
            tolerance_up: self.tolerance_up.unwrap_or(s.tolerance_up),
            tolerance_down: self.tolerance_down.unwrap_or(s.tolerance_down),
            ..s
        }
    }

    fn rules(&self) -> (Rules, Rules) {
        (self.up.clone(), self.down.clone())
    }
}

impl AutoscaleSpec {
    /// Checks the spec against the deployment it scales (Utilization needs a request, or
    /// a limit, which Kubernetes takes as the request when none is set).
    pub fn check(&self, requests: [Option<i64>; 2]) -> Result<Checked, ScenarioError> {
        if self.min_replicas < 1 {
            return Err(invalid("minReplicas", format!("{} must be 1 or more", self.min_replicas)));
        }
        if self.max_replicas > 1000 {
            return Err(invalid("maxReplicas", format!("{} is more than the limit of 1000", self.max_replicas)));
        }
        if self.min_replicas > self.max_replicas {
            return Err(invalid(
                "minReplicas",
                format!("{} is more than maxReplicas {}", self.min_replicas, self.max_replicas),
            ));
        }
        if self.metrics.is_empty() {
            return Err(invalid("metrics", "must list at least one metric"));
        }
        let mut metrics: Vec<Metric> = vec![];
        for (i, m) in self.metrics.iter().enumerate() {
            let field = format!("metrics[{i}]");
            if m.current_value.is_some() {
                return Err(invalid(format!("{field}.currentValue"), "is for simulation scenarios only"));
            }
            let checked = m.check(&field)?;
            if let (Source::Resource(r), Target::Utilization(_)) = (&checked.source, checked.target) {
                if requests[r.index()].is_none() {
                    return Err(invalid(
                        field,
                        format!(
                            "Utilization of {} needs a {} reservation or limit to be a percentage of",
                            r.name(),
                            r.name()
                        ),
                    ));
                }
            }
            if let Source::Pods { name, .. } = &checked.source {
                if metrics.iter().any(|o| matches!(&o.source, Source::Pods { name: n, .. } if n == name)) {
                    return Err(invalid(format!("{field}.name"), format!("the Pods metric {name} is listed twice")));
                }
            }
            metrics.push(checked);
        }
        let behavior = self.behavior.as_ref().map(|b| b.check(DEFAULT_DOWNSCALE_STABILIZATION)).transpose()?;
        Ok(Checked { min: self.min_replicas, max: self.max_replicas, metrics, behavior })
    }
}

/// What the live autoscaler knows besides the pods: its earlier recommendations and
/// scalings, and the controller settings.
#[derive(Debug, Clone, PartialEq)]
pub struct History {
    pub recommendations: Vec<Recommendation>,
    pub scale_up_events: Vec<ScaleEvent>,
    pub scale_down_events: Vec<ScaleEvent>,
}

impl Checked {
    /// The situation of a deployment at `current` replicas with these `pods`.
    pub fn situation(&self, current: i32, pods: Vec<Pod>, settings: Settings, history: History) -> Situation {
        let settings = self.behavior.as_ref().map_or(settings, |b| b.tolerances(settings));
        Situation {
            current,
            min: self.min,
            max: self.max,
            metrics: self.metrics.clone(),
            pods,
            settings,
            behavior: self.behavior.as_ref().map(CheckedBehavior::rules),
            downscale_stabilization: DEFAULT_DOWNSCALE_STABILIZATION,
            recommendations: history.recommendations,
            scale_up_events: history.scale_up_events,
            scale_down_events: history.scale_down_events,
        }
    }
}

/// The decision `skiff autoscale simulate` prints.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Decision {
    pub desired_replicas: i32,
    pub raw_recommendation: i32,
    pub current_utilization: Option<i32>,
    pub current_average_value: Option<String>,
    pub reason: String,
    /// Whether `raw_recommendation` came from metrics (and so is recorded for
    /// stabilization, as Kubernetes records it).
    #[serde(skip)]
    pub from_metrics: bool,
}

/// A checked scenario: what `decide` works on.
#[derive(Debug, Clone, PartialEq)]
pub struct Situation {
    pub current: i32,
    pub min: i32,
    pub max: i32,
    pub metrics: Vec<Metric>,
    pub pods: Vec<Pod>,
    pub settings: Settings,
    /// `None`: no `behavior` (the older normalization).
    behavior: Option<(Rules, Rules)>,
    pub downscale_stabilization: i64,
    pub recommendations: Vec<Recommendation>,
    pub scale_up_events: Vec<ScaleEvent>,
    pub scale_down_events: Vec<ScaleEvent>,
}

fn default_up() -> Rules {
    Rules { window: 0, select: Select::Max, policies: vec![(PolicyKind::Pods, 4, 15), (PolicyKind::Percent, 100, 15)] }
}

fn default_down(window: i64) -> Rules {
    Rules { window, select: Select::Max, policies: vec![(PolicyKind::Percent, 100, 15)] }
}

impl Scenario {
    /// Validates everything, naming the field of the first problem.
    pub fn check(&self) -> Result<Situation, ScenarioError> {
        if self.max_replicas < 1 {
            return Err(invalid("maxReplicas", format!("{} must be 1 or more", self.max_replicas)));
        }
        if self.min_replicas < 0 {
            return Err(invalid("minReplicas", format!("{} must be 0 or more", self.min_replicas)));
        }
        if self.min_replicas > self.max_replicas {
            return Err(invalid(
                "minReplicas",
                format!("{} is more than maxReplicas {}", self.min_replicas, self.max_replicas),
            ));
        }
        if self.current_replicas < 0 {
            return Err(invalid("currentReplicas", format!("{} must be 0 or more", self.current_replicas)));
        }
        if !(0.0..=1.0).contains(&self.tolerance) {
            return Err(invalid("tolerance", format!("{} is not within 0..1", self.tolerance)));
        }
        for (name, v) in [
            ("cpuInitializationPeriodSeconds", self.cpu_initialization_period_seconds),
            ("initialReadinessDelaySeconds", self.initial_readiness_delay_seconds),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(invalid(name, format!("{v} must be 0 or more")));
            }
        }
        if self.downscale_stabilization_seconds < 0 {
            return Err(invalid("downscaleStabilizationSeconds", "must be 0 or more"));
        }
        let metrics = match (&self.metric, self.metrics.as_slice()) {
            (Some(m), []) => vec![m.check("metric")?],
            (None, []) => return Err(invalid("metric", "required (or metrics, a list)")),
            (None, list) => list
                .iter()
                .enumerate()
                .map(|(i, m)| m.check(&format!("metrics[{i}]")))
                .collect::<Result<Vec<_>, _>>()?,
            (Some(_), _) => return Err(invalid("metric", "give metric or metrics, not both")),
        };
        let mut names = std::collections::HashSet::new();
        let mut pods = vec![];
        for (i, p) in self.pods.iter().enumerate() {
            if !names.insert(p.name.as_str()) {
                return Err(invalid(format!("pods[{i}].name"), format!("{:?} appears twice", p.name)));
            }
            pods.push(p.check(&format!("pods[{i}]"))?);
        }
        let settings = Settings {
            tolerance_up: self.tolerance,
            tolerance_down: self.tolerance,
            cpu_initialization_period: self.cpu_initialization_period_seconds,
            initial_readiness_delay: self.initial_readiness_delay_seconds,
        };
        let behavior = self.behavior.as_ref().map(|b| b.check(self.downscale_stabilization_seconds)).transpose()?;
        let settings = behavior.as_ref().map_or(settings, |b| b.tolerances(settings));
        for (field, list) in [
            ("recommendations", self.recommendations.iter().map(|r| r.seconds_ago).collect::<Vec<_>>()),
            ("scaleUpEvents", self.scale_up_events.iter().map(|e| e.seconds_ago).collect()),
            ("scaleDownEvents", self.scale_down_events.iter().map(|e| e.seconds_ago).collect()),
        ] {
            if let Some((i, v)) = list.iter().enumerate().find(|(_, v)| !(v.is_finite() && **v >= 0.0)) {
                return Err(invalid(format!("{field}[{i}].secondsAgo"), format!("{v} must be 0 or more")));
            }
        }
        Ok(Situation {
            current: self.current_replicas,
            min: self.min_replicas,
            max: self.max_replicas,
            metrics,
            pods,
            settings,
            behavior: behavior.as_ref().map(CheckedBehavior::rules),
            downscale_stabilization: self.downscale_stabilization_seconds,
            recommendations: self.recommendations.clone(),
            scale_up_events: self.scale_up_events.clone(),
            scale_down_events: self.scale_down_events.clone(),
        })
    }
}

/// Formats milli-units as Kubernetes prints a DecimalSI quantity (`800m`, `1`, `2k`).
pub fn format_milli(m: i64) -> String {
    if m % 1000 != 0 {
        return format!("{m}m");
    }
    let n = m / 1000;
    for (suffix, scale) in [
        ("E", 1_000_000_000_000_000_000i64),
        ("P", 1_000_000_000_000_000),
        ("T", 1_000_000_000_000),
        ("G", 1_000_000_000),
        ("M", 1_000_000),
        ("k", 1_000),
    ] {
        if n != 0 && n % scale == 0 {
            return format!("{}{suffix}", n / scale);
        }
    }
    n.to_string()
}

/// A Kubernetes quantity (`500m`, `1`, `0.5`, `512Mi`, `1G`, `1e3`) in milli-units,
/// rounded up as `MilliValue()` does.
pub fn milli_value(q: &str) -> Result<i64, String> {
    let bad = || format!("{q:?} is not a quantity (such as 500m, 1.5, 512Mi or 2G)");
    let s = q.trim();
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+' || c == '-')).unwrap_or(s.len());
    let (num, suffix) = s.split_at(split);
    // (numerator, denominator) multipliers of the suffix.
    let (mul, div): (i128, i128) = match suffix {
        "" => (1, 1),
        "m" => (1, 1000),
        "k" => (1_000, 1),
        "M" => (1_000_000, 1),
        "G" => (1_000_000_000, 1),
        "T" => (1_000_000_000_000, 1),
        "P" => (1_000_000_000_000_000, 1),
        "E" => (1_000_000_000_000_000_000, 1),
        "Ki" => (1 << 10, 1),
        "Mi" => (1 << 20, 1),
        "Gi" => (1 << 30, 1),
        "Ti" => (1 << 40, 1),
        "Pi" => (1 << 50, 1),
        "Ei" => (1 << 60, 1),
        e if e.starts_with(['e', 'E']) => {
            let exp: u32 = e[1..].parse().map_err(|_| bad())?;
            (10i128.checked_pow(exp).ok_or_else(bad)?, 1)
        }
        _ => return Err(bad()),
    };
    let (neg, digits) = match num.strip_prefix('-') {
        Some(d) => (true, d),
        None => (false, num.strip_prefix('+').unwrap_or(num)),
    };
    let (int, frac) = digits.split_once('.').unwrap_or((digits, ""));
    if int.is_empty() && frac.is_empty()
        || !int.chars().chain(frac.chars()).all(|c| c.is_ascii_digit())
        || frac.len() > 18
    {
        return Err(bad());
    }
    let mantissa: i128 = format!("{int}{frac}").parse().map_err(|_| bad())?;
    let scale = 10i128.pow(frac.len() as u32);
    let numerator = mantissa.checked_mul(mul).and_then(|v| v.checked_mul(1000)).ok_or_else(bad)?;
    let denominator = scale * div;
    let milli = (numerator + denominator - 1) / denominator;
    let milli = if neg { -((numerator) / denominator) } else { milli };
    i64::try_from(milli).map_err(|_| bad())
}

/// How Kubernetes names a metric in its reasons.
fn metric_name(m: &Metric) -> String {
    match (&m.source, m.target) {
        (Source::Resource(r), Target::Utilization(_)) => {
            format!("{} resource utilization (percentage of request)", r.name())
        }
        (Source::Resource(r), _) => format!("{} resource", r.name()),
        (Source::Pods { name, .. }, _) => format!("pods metric {name}"),
        (Source::Object { name, object, .. }, _) => format!("{} metric {name}", object.kind),
        (Source::External { name, selector }, _) if selector.is_empty() => format!("external metric {name}"),
        (Source::External { name, selector }, _) => {
            let labels: Vec<String> = selector.iter().map(|(k, v)| format!("{k}={v}")).collect();
            format!("external metric {name}({})", labels.join(","))
        }
    }
}

/// The condition reason Kubernetes gives when a metric of this kind cannot be read.
fn failed_reason(m: &Metric) -> &'static str {
    match m.source {
        Source::Resource(_) => "FailedGetResourceMetric",
        Source::Pods { .. } => "FailedGetPodsMetric",
        Source::Object { .. } => "FailedGetObjectMetric",
        Source::External { .. } => "FailedGetExternalMetric",
    }
}

/// What Kubernetes' HPA controller decides for `s`: each metric's proposal, the highest
/// one taken (`computeReplicasForMetrics`), then normalized.
pub fn decide(s: &Situation) -> Decision {
    let mut best: Option<(String, Calculated)> = None;
    let mut failed: Vec<(&str, String)> = vec![];
    for m in &s.metrics {
        match calculate(s.current, m, &s.pods, &s.settings) {
            Ok(c) => {
                if best.as_ref().is_none_or(|(_, b)| c.replicas > b.replicas) {
                    best = Some((metric_name(m), c));
                }
            }
            Err(e) => failed.push((failed_reason(m), e)),
        }
    }
    let (raw, utilization, average) = match &best {
        Some((_, c)) => (c.replicas, c.utilization, Some(format_milli(c.average))),
        None => (s.current, None, None),
    };
    let out = |desired: i32, reason: String| Decision {
        desired_replicas: desired,
        raw_recommendation: raw,
        current_utilization: utilization,
        current_average_value: average.clone(),
        reason,
        from_metrics: false,
    };
    if s.current == 0 && s.min != 0 {
        return out(0, "ScalingDisabled: scaling is disabled since the replica count of the target is zero".into());
    }
    if s.current > s.max {
        return out(s.max, "Current number of replicas above Spec.MaxReplicas".into());
    }
    if s.current < s.min {
        return out(s.min, "Current number of replicas below Spec.MinReplicas".into());
    }
    // All metrics failed, or some did and the rest would scale down: no change.
    if let Some((reason, first)) = failed.first() {
        if best.is_none() || raw < s.current {
            let why = match s.metrics.len() {
                1 => first.clone(),
                n => format!("invalid metrics ({} invalid out of {n}), first error is: {first}", failed.len()),
            };
            return out(s.current, format!("{reason}: {why}"));
        }
    }
    let Some((metric_name, c)) = best else {
        return out(s.current, "FailedGetResourceMetric: no metric".into());
    };
    let mut parts = vec![];
    match (&c.held, raw.cmp(&s.current)) {
        (Some(why), _) => parts.push(why.clone()),
        (None, std::cmp::Ordering::Greater) => parts.push(format!("{metric_name} above target")),
        (None, std::cmp::Ordering::Less) => parts.push("All metrics below target".into()),
        (None, std::cmp::Ordering::Equal) => {}
    }
    let (stabilized, desired, limit) = match &s.behavior {
        None => {
            let stabilized = stabilize_without_behavior(raw, &s.recommendations, s.downscale_stabilization);
            let (d, why) = clamp_without_behavior(s.current, stabilized, s.min, s.max);
            (stabilized, d, why)
        }
        Some((up, down)) => {
            let stabilized = stabilize(raw, s.current, &s.recommendations, up.window, down.window);
            let (d, why) = limit_rate(s, stabilized, up, down);
            (stabilized, d, why)
        }
    };
    if stabilized != raw {
        parts.push(if raw >= s.current {
            "ScaleUpStabilized: recent recommendations were lower than current one, applying the lowest recent recommendation".into()
        } else {
            "ScaleDownStabilized: recent recommendations were higher than current one, applying the highest recent recommendation".into()
        });
    }
    if desired != stabilized {
        parts.push(limit);
    }
    if parts.is_empty() {
        parts.push("DesiredWithinRange: the desired count is within the acceptable range".into());
    }
    Decision { from_metrics: true, ..out(desired, parts.join("; ")) }
}

/// `stabilizeRecommendation`: the highest recommendation not older than the window.
fn stabilize_without_behavior(raw: i32, recs: &[Recommendation], window: i64) -> i32 {
    recs.iter().filter(|r| r.seconds_ago <= window as f64).map(|r| r.replicas).fold(raw, i32::max)
}

/// `convertDesiredReplicasWithRules`: within min, and at most max(2 × current, 4) and max.
fn clamp_without_behavior(current: i32, desired: i32, min: i32, max: i32) -> (i32, String) {
    let scale_up_limit = (2.0 * f64::from(current)).max(4.0) as i32;
    let (maximum, why) = if max > scale_up_limit {
        (scale_up_limit, "ScaleUpLimit: the desired replica count is increasing faster than the maximum scale rate")
    } else {
        (max, "TooManyReplicas: the desired replica count is more than the maximum replica count")
    };
    if desired < min {
        (min, "TooFewReplicas: the desired replica count is less than the minimum replica count".into())
    } else if desired > maximum {
        (maximum, why.into())
    } else {
        (desired, "DesiredWithinRange: the desired count is within the acceptable range".into())
    }
}

/// `stabilizeRecommendationWithBehaviors`.
fn stabilize(raw: i32, current: i32, recs: &[Recommendation], up_window: i64, down_window: i64) -> i32 {
    let (mut up, mut down) = (raw, raw);
    for r in recs {
        if r.seconds_ago < up_window as f64 {
            up = up.min(r.replicas);
        }
        if r.seconds_ago < down_window as f64 {
            down = down.max(r.replicas);
        }
    }
    current.max(up).min(down)
}

/// Replicas changed by `events` within the last `period` seconds.
fn changed_within(events: &[ScaleEvent], period: i64) -> i32 {
    events.iter().filter(|e| e.seconds_ago < period as f64).map(|e| e.replicas).sum()
}

/// `convertDesiredReplicasWithBehaviorRate`.
fn limit_rate(s: &Situation, desired: i32, up: &Rules, down: &Rules) -> (i32, String) {
    let period_start = |period: i64| {
        s.current - changed_within(&s.scale_up_events, period) + changed_within(&s.scale_down_events, period)
    };
    if desired > s.current {
        let limit = match up.select {
            Select::Disabled => s.current,
            sel => {
                let proposals = up.policies.iter().map(|&(kind, value, period)| {
                    let start = period_start(period);
                    match kind {
                        PolicyKind::Pods => start + value,
                        PolicyKind::Percent => (f64::from(start) * (1.0 + f64::from(value) / 100.0)).ceil() as i32,
                    }
                });
                if sel == Select::Min {
                    proposals.fold(i32::MAX, i32::min)
                } else {
                    proposals.fold(i32::MIN, i32::max)
                }
            }
        }
        .max(s.current);
        let (maximum, why) = if s.max > limit {
            (limit, "ScaleUpLimit: the desired replica count is increasing faster than the maximum scale rate")
        } else {
            (s.max, "TooManyReplicas: the desired replica count is more than the maximum replica count")
        };
        if desired > maximum {
            return (maximum, why.into());
        }
    } else if desired < s.current {
        let limit = match down.select {
            Select::Disabled => s.current,
            sel => {
                let proposals = down.policies.iter().map(|&(kind, value, period)| {
                    let start = period_start(period);
                    match kind {
                        PolicyKind::Pods => start - value,
                        PolicyKind::Percent => (f64::from(start) * (1.0 - f64::from(value) / 100.0)) as i32,
                    }
                });
                if sel == Select::Min {
                    proposals.fold(i32::MIN, i32::max)
                } else {
                    proposals.fold(i32::MAX, i32::min)
                }
            }
        }
        .min(s.current);
        let (minimum, why) = if s.min < limit {
            (limit, "ScaleDownLimit: the desired replica count is decreasing faster than the maximum scale rate")
        } else {
            (s.min, "TooFewReplicas: the desired replica count is less than the minimum replica count")
        };
        if desired < minimum {
            return (minimum, why.into());
        }
    }
    (desired, "DesiredWithinRange: the desired count is within the acceptable range".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Runs a scenario given as JSON; pods are `[name, request, usage]` with extra fields
    /// merged in from `more`.
    fn run(base: serde_json::Value) -> Decision {
        let s: Scenario = serde_json::from_value(base).unwrap();
        decide(&s.check().unwrap())
    }

    fn pods(list: &[(&str, Option<&str>)], request: &str) -> serde_json::Value {
        json!(list
            .iter()
            .map(|(n, u)| {
                let mut p = json!({"name": n, "requests": {"cpu": request}});
                if let Some(u) = u {
                    p["usage"] = json!({"cpu": u});
                }
                p
            })
            .collect::<Vec<_>>())
    }

    fn cpu(target: i32) -> serde_json::Value {
        json!({"resource": "cpu", "targetType": "Utilization", "averageUtilization": target})
    }

    /// (case, scenario, desiredReplicas, rawRecommendation, currentUtilization).
    /// Each from the algorithm in the Kubernetes documentation and the controller's code;
    /// the arithmetic is in the comment.
    #[test]
    fn kubernetes_replica_calculator_cases() {
        let p3 = pods(&[("a", Some("300m")), ("b", Some("500m")), ("c", Some("700m"))], "1000m");
        let cases: Vec<(&str, serde_json::Value, i32, i32, Option<i32>)> = vec![
            // 1500/3000 = 50 %; 50/30 = 1.667; ceil(1.667 × 3) = 5.
            (
                "scale up",
                json!({"currentReplicas": 3, "maxReplicas": 10, "metric": cpu(30), "pods": p3}),
                5,
                5,
                Some(50),
            ),
            // 1060 % of 1000 → 102 %: ratio 1.02 is within 0.1.
            (
                "within tolerance",
                json!({"currentReplicas": 3, "maxReplicas": 10, "metric": cpu(100),
                       "pods": pods(&[("a", Some("1010m")), ("b", Some("1030m")), ("c", Some("1020m"))], "1000m")}),
                3,
                3,
                Some(102),
            ),
            // Exactly 1.1 is within (the bounds are inclusive).
            (
                "tolerance edge, inclusive",
                json!({"currentReplicas": 2, "maxReplicas": 10, "metric": cpu(50),
                       "pods": pods(&[("a", Some("550m")), ("b", Some("550m"))], "1000m")}),
                2,
                2,
                Some(55),
            ),
            // 56 %: 1.12 > 1.1 → ceil(1.12 × 2) = 3.
            (
                "just past tolerance",
                json!({"currentReplicas": 2, "maxReplicas": 10, "metric": cpu(50),
                       "pods": pods(&[("a", Some("560m")), ("b", Some("560m"))], "1000m")}),
                3,
                3,
                Some(56),
            ),
            // Utilization is truncated first: 1399/2000 = 69.95 % → 69 %; 69/70 = 0.986.
            (
                "truncated percentage",
                json!({"currentReplicas": 2, "maxReplicas": 10, "metric": cpu(70),
                       "pods": pods(&[("a", Some("700m")), ("b", Some("699m"))], "1000m")}),
                2,
                2,
                Some(69),
            ),
            // 1400/5000 = 28 %; 0.56 × 5 = 2.8 → 3; no behavior, no recommendations.
            (
                "scale down",
                json!({"currentReplicas": 5, "maxReplicas": 10, "metric": cpu(50),
                       "pods": pods(&[("a", Some("100m")), ("b", Some("300m")), ("c", Some("500m")), ("d", Some("250m")), ("e", Some("250m"))], "1000m")}),
                3,
                3,
                Some(28),
            ),
            // Unready pod a is left out: 1200/2000 = 60 %, ratio 2; on the way up it counts
            // as 0: 1200/3000 = 40 % → 1.333 × 3 → 4.
            (
                "unready pod counts as 0 on the way up",
                json!({"currentReplicas": 3, "maxReplicas": 10, "metric": cpu(30),
                       "pods": [{"name": "a", "ready": false, "requests": {"cpu": "1000m"}, "usage": {"cpu": "300m"}},
                                {"name": "b", "requests": {"cpu": "1000m"}, "usage": {"cpu": "500m"}},
                                {"name": "c", "requests": {"cpu": "1000m"}, "usage": {"cpu": "700m"}}]}),
                4,
                4,
                Some(60),
            ),
            // Ready pods c, d, e: 1000/3000 = 33 %; ratio 0.66 < 1, so unready pods are
            // simply left out: ceil(0.66 × 3) = 2.
            (
                "unready pods left out on the way down",
                json!({"currentReplicas": 5, "maxReplicas": 10, "metric": cpu(50),
                       "pods": [{"name": "a", "ready": false, "requests": {"cpu": "1000m"}, "usage": {"cpu": "100m"}},
                                {"name": "b", "ready": false, "requests": {"cpu": "1000m"}, "usage": {"cpu": "300m"}},
                                {"name": "c", "requests": {"cpu": "1000m"}, "usage": {"cpu": "500m"}},
                                {"name": "d", "requests": {"cpu": "1000m"}, "usage": {"cpu": "250m"}},
                                {"name": "e", "requests": {"cpu": "1000m"}, "usage": {"cpu": "250m"}}]}),
                2,
                2,
                Some(33),
            ),
            // Missing c on the way down counts as 100 %: (200+200+1000)/3000 = 46 % of
            // target 50 → 0.92, within tolerance → stay at 3.
            (
                "missing metric at 100 % blocks a scale-down",
                json!({"currentReplicas": 3, "maxReplicas": 10, "metric": cpu(50),
                       "pods": pods(&[("a", Some("200m")), ("b", Some("200m")), ("c", None)], "1000m")}),
                3,
                3,
                Some(20),
            ),
            // On the way down with a target above 100 %, missing pods count at the target:
            // a, b at 50 %; c at 150 %: (500+500+1500)/3000 = 83 %; 83/150 = 0.553 → ceil(1.66) = 2.
            (
                "missing metric at the target when it is above 100 %",
                json!({"currentReplicas": 3, "maxReplicas": 10, "metric": cpu(150),
                       "pods": pods(&[("a", Some("500m")), ("b", Some("500m")), ("c", None)], "1000m")}),
                2,
                2,
                Some(50),
            ),
            // Missing c on the way up counts as 0 %: 1800/2000 = 90 % → 1.8; (1800+0)/3000 =
            // 60 % → 1.2 → ceil(1.2 × 3) = 4.
            (
                "missing metric at 0 % on the way up",
                json!({"currentReplicas": 3, "maxReplicas": 10, "metric": cpu(50),
                       "pods": pods(&[("a", Some("900m")), ("b", Some("900m")), ("c", None)], "1000m")}),
                4,
                4,
                Some(90),
            ),
            // a, b at 60 % → 1.2, up; with the missing pod at 0 %: (600+600+0)/3000 = 40 %
            // → 0.8, which would flip the direction: stay.
            (
                "missing metric would reverse the direction",
                json!({"currentReplicas": 3, "maxReplicas": 10, "metric": cpu(50),
                       "pods": pods(&[("a", Some("600m")), ("b", Some("600m")), ("c", None)], "1000m")}),
                3,
                3,
                Some(60),
            ),
            // Pending, failed and deleting pods: Pending counts as unready, the others are
            // ignored. Ready a, b: 1600/2000 = 80 % → 1.6; pending as 0: 1600/3000 = 53 % →
            // 1.066, within tolerance: stay at 4.
            (
                "pending, failed and deleting pods",
                json!({"currentReplicas": 4, "maxReplicas": 10, "metric": cpu(50),
                       "pods": [{"name": "a", "requests": {"cpu": "1000m"}, "usage": {"cpu": "800m"}},
                                {"name": "b", "requests": {"cpu": "1000m"}, "usage": {"cpu": "800m"}},
                                {"name": "c", "phase": "Pending", "requests": {"cpu": "1000m"}},
                                {"name": "d", "phase": "Failed", "requests": {"cpu": "1000m"}, "usage": {"cpu": "900m"}},
                                {"name": "e", "deleting": true, "requests": {"cpu": "1000m"}, "usage": {"cpu": "900m"}}]}),
                4,
                4,
                Some(80),
            ),
            // Within the CPU initialization period, a ready pod whose sample window began
            // before its readiness change is unready: a started 60 s ago, ready 10 s ago,
            // sample now with a 30 s window (−0 < −10 + 30). Like the unready case: 4.
            (
                "hot CPU in the initialization period",
                json!({"currentReplicas": 3, "maxReplicas": 10, "metric": cpu(30),
                       "pods": [{"name": "a", "startedSecondsAgo": 60, "readyTransitionSecondsAgo": 10, "requests": {"cpu": "1000m"}, "usage": {"cpu": "300m"}},
                                {"name": "b", "requests": {"cpu": "1000m"}, "usage": {"cpu": "500m"}},
                                {"name": "c", "requests": {"cpu": "1000m"}, "usage": {"cpu": "700m"}}]}),
                4,
                4,
                Some(60),
            ),
            // The same pod with its readiness change 40 s ago: one window has passed, it counts.
            (
                "initialization period, a full window after readiness",
                json!({"currentReplicas": 3, "maxReplicas": 10, "metric": cpu(30),
                       "pods": [{"name": "a", "startedSecondsAgo": 60, "readyTransitionSecondsAgo": 40, "requests": {"cpu": "1000m"}, "usage": {"cpu": "300m"}},
                                {"name": "b", "requests": {"cpu": "1000m"}, "usage": {"cpu": "500m"}},
                                {"name": "c", "requests": {"cpu": "1000m"}, "usage": {"cpu": "700m"}}]}),
                5,
                5,
                Some(50),
            ),
            // After the initialization period, an unready pod that was once ready counts
            // (its readiness changed 100 s after start, beyond the 30 s delay)...
            (
                "unready but once ready, after initialization",
                json!({"currentReplicas": 3, "maxReplicas": 10, "metric": cpu(30),
                       "pods": [{"name": "a", "ready": false, "startedSecondsAgo": 600, "readyTransitionSecondsAgo": 500, "requests": {"cpu": "1000m"}, "usage": {"cpu": "300m"}},
                                {"name": "b", "requests": {"cpu": "1000m"}, "usage": {"cpu": "500m"}},
                                {"name": "c", "requests": {"cpu": "1000m"}, "usage": {"cpu": "700m"}}]}),
                5,
                5,
                Some(50),
            ),
            // ...but one that never became ready (changed within 30 s of start) does not.
            (
                "never ready, after initialization",
                json!({"currentReplicas": 3, "maxReplicas": 10, "metric": cpu(30),
                       "pods": [{"name": "a", "ready": false, "startedSecondsAgo": 600, "readyTransitionSecondsAgo": 590, "requests": {"cpu": "1000m"}, "usage": {"cpu": "300m"}},
                                {"name": "b", "requests": {"cpu": "1000m"}, "usage": {"cpu": "500m"}},
                                {"name": "c", "requests": {"cpu": "1000m"}, "usage": {"cpu": "700m"}}]}),
                4,
                4,
                Some(60),
            ),
            // No Ready condition at all: unready (cpu).
            (
                "no Ready condition",
                json!({"currentReplicas": 3, "maxReplicas": 10, "metric": cpu(30),
                       "pods": [{"name": "a", "ready": null, "requests": {"cpu": "1000m"}, "usage": {"cpu": "300m"}},
                                {"name": "b", "requests": {"cpu": "1000m"}, "usage": {"cpu": "500m"}},
                                {"name": "c", "requests": {"cpu": "1000m"}, "usage": {"cpu": "700m"}}]}),
                4,
                4,
                Some(60),
            ),
            // Readiness does not matter for memory: (300+500+700) Mi of 3 × 1 Gi...
            // 1500/3072 = 48 %; 48/30 = 1.6 → ceil(4.8) = 5.
            (
                "memory ignores readiness",
                json!({"currentReplicas": 3, "maxReplicas": 10,
                       "metric": {"resource": "memory", "targetType": "Utilization", "averageUtilization": 30},
                       "pods": [{"name": "a", "ready": false, "requests": {"memory": "1Gi"}, "usage": {"memory": "300Mi"}},
                                {"name": "b", "requests": {"memory": "1Gi"}, "usage": {"memory": "500Mi"}},
                                {"name": "c", "requests": {"memory": "1Gi"}, "usage": {"memory": "700Mi"}}]}),
                5,
                5,
                Some(48),
            ),
            // AverageValue: (300+500+700)/3 = 500m against 200m → 2.5 → ceil(7.5) = 8.
            (
                "average value",
                json!({"currentReplicas": 3, "maxReplicas": 10,
                       "metric": {"resource": "cpu", "targetType": "AverageValue", "averageValue": "200m"}, "pods": p3}),
                6,
                8,
                None,
            ),
            // Clamped at maxReplicas (the raw recommendation says more).
            (
                "clamped to max",
                json!({"currentReplicas": 3, "maxReplicas": 4, "metric": cpu(30), "pods": p3}),
                4,
                5,
                Some(50),
            ),
            // Clamped at minReplicas: 10 %/50 → 0.2 × 5 = 1, min 2.
            (
                "clamped to min",
                json!({"currentReplicas": 5, "minReplicas": 2, "maxReplicas": 10, "metric": cpu(50),
                       "pods": pods(&[("a", Some("100m")), ("b", Some("100m")), ("c", Some("100m")), ("d", Some("100m")), ("e", Some("100m"))], "1000m")}),
                2,
                1,
                Some(10),
            ),
            // Without behavior, a scale-down keeps the highest recommendation of the last 300 s.
            (
                "downscale stabilization without behavior",
                json!({"currentReplicas": 5, "maxReplicas": 10, "metric": cpu(50),
                       "pods": pods(&[("a", Some("100m")), ("b", Some("300m")), ("c", Some("500m")), ("d", Some("250m")), ("e", Some("250m"))], "1000m"),
                       "recommendations": [{"secondsAgo": 120, "replicas": 5}, {"secondsAgo": 301, "replicas": 9}]}),
                5,
                3,
                Some(28),
            ),
            // Without behavior, a scale-up is at most max(2 × current, 4): 1 → 4, not 9.
            (
                "scale-up limit without behavior",
                json!({"currentReplicas": 1, "maxReplicas": 20, "metric": cpu(10),
                       "pods": pods(&[("a", Some("900m"))], "1000m")}),
                4,
                9,
                Some(90),
            ),
        ];
        for (name, scenario, desired, raw, utilization) in cases {
            let d = run(scenario);
            assert_eq!(
                (d.desired_replicas, d.raw_recommendation, d.current_utilization),
                (desired, raw, utilization),
                "{name}: {}",
                d.reason
            );
        }
    }

    #[test]
    fn behavior_policies_and_stabilization() {
        let base = |current: i32, behavior: serde_json::Value, extra: serde_json::Value| {
            let mut pods = vec![];
            for i in 0..current {
                pods.push(json!({"name": format!("p{i}"), "requests": {"cpu": "1000m"}, "usage": {"cpu": "1000m"}}));
            }
            let mut s = json!({"currentReplicas": current, "maxReplicas": 100, "metric": cpu(10), "pods": pods, "behavior": behavior});
            for (k, v) in extra.as_object().unwrap() {
                s[k] = v.clone();
            }
            s
        };
        // Defaults (behavior given but empty): up by max(4 pods, 100 %) per 15 s: 2 → 6.
        let d = run(base(2, json!({}), json!({})));
        assert_eq!((d.desired_replicas, d.raw_recommendation), (6, 20));
        assert!(d.reason.contains("ScaleUpLimit"), "{}", d.reason);
        // 10 → 20 (100 % beats 4 pods).
        assert_eq!(run(base(10, json!({}), json!({}))).desired_replicas, 20);
        // selectPolicy Min picks the smaller: 10 → 14.
        assert_eq!(run(base(10, json!({"scaleUp": {"selectPolicy": "Min"}}), json!({}))).desired_replicas, 14);
        // Disabled: no scale-up at all.
        let d = run(base(10, json!({"scaleUp": {"selectPolicy": "Disabled"}}), json!({})));
        assert_eq!(d.desired_replicas, 10);
        // A scale-up of 3 within the last 60 s counts against "2 pods per 60 s": the period
        // began at 5 - 3 = 2 replicas, so at most 4: no change from 5.
        let d = run(base(
            5,
            json!({"scaleUp": {"policies": [{"type": "Pods", "value": 2, "periodSeconds": 60}]}}),
            json!({"scaleUpEvents": [{"secondsAgo": 30, "replicas": 3}, {"secondsAgo": 61, "replicas": 10}]}),
        ));
        assert_eq!(d.desired_replicas, 5, "{}", d.reason);
        // Percent on the way up rounds up: 3 × 1.1 = 3.3 → 4.
        let d = run(base(
            3,
            json!({"scaleUp": {"policies": [{"type": "Percent", "value": 10, "periodSeconds": 60}]}}),
            json!({}),
        ));
        assert_eq!(d.desired_replicas, 4);
        // Scale-up stabilization: the lowest recommendation of the window wins: 5.
        let d = run(base(
            3,
            json!({"scaleUp": {"stabilizationWindowSeconds": 60}}),
            json!({"recommendations": [{"secondsAgo": 30, "replicas": 5}, {"secondsAgo": 60, "replicas": 3}]}),
        ));
        assert_eq!(d.desired_replicas, 5, "{}", d.reason);
        assert!(d.reason.contains("ScaleUpStabilized"), "{}", d.reason);

        // On the way down: idle pods, 10 replicas → raw 1.
        let idle = |current: i32, behavior: serde_json::Value, extra: serde_json::Value| {
            let mut s = base(current, behavior, extra);
            for p in s["pods"].as_array_mut().unwrap() {
                p["usage"]["cpu"] = json!("0m");
            }
            s
        };
        // Default scale-down: 300 s stabilization keeps the highest recent recommendation.
        let d = run(idle(10, json!({}), json!({"recommendations": [{"secondsAgo": 100, "replicas": 8}]})));
        assert_eq!((d.desired_replicas, d.raw_recommendation), (8, 0));
        assert!(d.reason.contains("ScaleDownStabilized"), "{}", d.reason);
        // A short window lets it go; 100 % per 15 s allows all the way, then min (1).
        let d = run(idle(10, json!({"scaleDown": {"stabilizationWindowSeconds": 0}}), json!({})));
        assert_eq!(d.desired_replicas, 1, "{}", d.reason);
        // Percent down truncates: 10 × (1 − 0.25) = 7.5 → 7.
        let d = run(idle(
            10,
            json!({"scaleDown": {"stabilizationWindowSeconds": 0, "policies": [{"type": "Percent", "value": 25, "periodSeconds": 60}]}}),
            json!({}),
        ));
        assert_eq!(d.desired_replicas, 7);
        // Earlier scale-downs in the period count: 2 removed 10 s ago, 3 pods per 60 s: the
        // period began at 12, so the floor is 9.
        let d = run(idle(
            10,
            json!({"scaleDown": {"stabilizationWindowSeconds": 0, "policies": [{"type": "Pods", "value": 3, "periodSeconds": 60}]}}),
            json!({"scaleDownEvents": [{"secondsAgo": 10, "replicas": 2}]}),
        ));
        assert_eq!(d.desired_replicas, 9);
        assert!(d.reason.contains("ScaleDownLimit"), "{}", d.reason);
        // Per-direction tolerance: 1.15 is within a 0.2 scale-up tolerance.
        let d = run(json!({"currentReplicas": 2, "maxReplicas": 10, "metric": cpu(100),
            "pods": pods(&[("a", Some("1150m")), ("b", Some("1150m"))], "1000m"), "behavior": {"scaleUp": {"tolerance": 0.2}}}));
        assert_eq!(d.desired_replicas, 2);
    }

    #[test]
    fn several_metrics_take_the_highest_and_fail_safe() {
        let both = |cpu_use: &str, mem_use: &str, with_mem: bool| {
            let mut usage = json!({"cpu": cpu_use});
            if with_mem {
                usage["memory"] = json!(mem_use);
            }
            json!({"currentReplicas": 4, "maxReplicas": 10,
                "metrics": [cpu(50), {"resource": "memory", "targetType": "AverageValue", "averageValue": "100Mi"}],
                "pods": (0..4).map(|i| json!({"name": format!("p{i}"), "requests": {"cpu": "1", "memory": "1Gi"}, "usage": usage})).collect::<Vec<_>>()})
        };
        // cpu: 100 % of 50 → 8; memory: 150Mi of 100Mi → 6. The higher wins.
        let d = run(both("1", "150Mi", true));
        assert_eq!((d.raw_recommendation, d.desired_replicas), (8, 8), "{}", d.reason);
        // cpu says 2 (25 %), memory cannot be computed (no samples): no scale-down on
        // partial information.
        let d = run(both("250m", "", false));
        assert_eq!(d.desired_replicas, 4);
        assert!(d.reason.contains("invalid metrics (1 invalid out of 2)"), "{}", d.reason);
        // cpu says up (8) and memory fails: scaling up goes ahead.
        assert_eq!(run(both("1", "", false)).desired_replicas, 8);
    }

    /// Pods, Object and External metrics: cases of Kubernetes' `replica_calculator_test.go`
    /// (the custom-metric ones: `qps` levels in milli-units), then through `decide`.
    #[test]
    fn pods_object_and_external_metrics_as_kubernetes_calculates_them() {
        let qps_pods = |levels: &[&str], ready: &[bool]| -> serde_json::Value {
            json!(levels
                .iter()
                .zip(ready)
                .enumerate()
                .map(|(i, (l, r))| json!({"name": format!("p{i}"), "ready": r, "usage": {"qps": l}}))
                .collect::<Vec<_>>())
        };
        let pods_metric =
            |target: &str| json!({"type": "Pods", "name": "qps", "targetType": "AverageValue", "averageValue": target});
        let object = |tt: &str, target: &str, current: &str| {
            let key = if tt == "Value" { "value" } else { "averageValue" };
            json!({"type": "Object", "name": "qps", "describedObject": {"kind": "Deployment", "name": "some-deployment"},
                   "targetType": tt, key: target, "currentValue": current})
        };
        let external = |tt: &str, target: &str, current: &str| {
            let key = if tt == "Value" { "value" } else { "averageValue" };
            json!({"type": "External", "name": "qps", "selector": {"label": "value"}, "targetType": tt, key: target, "currentValue": current})
        };
        let three = qps_pods(&["20", "10", "30"], &[true, true, true]);
        // (case, scenario, desired, raw, average)
        let cases: Vec<(&str, serde_json::Value, i32, i32, &str)> = vec![
            // TestReplicaCalcScaleUpCM: 60/3 = 20 per pod; 20/15 = 1.333; ceil(1.333 × 3) = 4.
            (
                "pods up",
                json!({"currentReplicas": 3, "maxReplicas": 10, "metric": pods_metric("15"), "pods": three}),
                4,
                4,
                "20",
            ),
            // TestReplicaCalcScaleUpCMUnreadyHotCpuNoLessScale: readiness is not looked at for
            // a pods metric: (50+10+30)/3 = 30; 2 × 3 = 6.
            (
                "pods unready still count",
                json!({"currentReplicas": 3, "maxReplicas": 10, "metric": pods_metric("15"),
                    "pods": qps_pods(&["50", "10", "30"], &[false, true, false])}),
                6,
                6,
                "30",
            ),
            // TestReplicaCalcScaleDownCM: (12+12+12+10+10)/5 = 11.2 of 20 → ceil(0.56 × 5) = 3.
            (
                "pods down",
                json!({"currentReplicas": 5, "maxReplicas": 10, "metric": pods_metric("20"), "downscaleStabilizationSeconds": 0,
                    "pods": qps_pods(&["12", "12", "12", "10", "10"], &[true; 5])}),
                3,
                3,
                "11200m",
            ),
            // TestReplicaCalcToleranceCM: 20.666/20 is within 0.1.
            (
                "pods tolerance",
                json!({"currentReplicas": 3, "maxReplicas": 10, "metric": pods_metric("20"),
                    "pods": qps_pods(&["20", "21", "21"], &[true; 3])}),
                3,
                3,
                "20666m",
            ),
            // A pod without the metric on the way up counts as 0: (20+30+0)/3 = 16.667 of 15
            // → 1.111; ceil(1.111 × 3) = 4.
            (
                "pods missing on the way up",
                json!({"currentReplicas": 3, "maxReplicas": 10, "metric": pods_metric("15"),
                    "pods": [{"name": "a", "usage": {"qps": "20"}}, {"name": "b", "usage": {"qps": "30"}}, {"name": "c"}]}),
                4,
                4,
                "25",
            ),
            // TestReplicaCalcScaleUpCMObject: 20/15 = 1.333 × 3 ready = 4.
            (
                "object value",
                json!({"currentReplicas": 3, "maxReplicas": 10, "metric": object("Value", "15", "20"), "pods": three}),
                4,
                4,
                "20",
            ),
            // Only running and ready pods count: 1.333 × 2 = 3.
            (
                "object value, one unready",
                json!({"currentReplicas": 3, "maxReplicas": 10, "metric": object("Value", "15", "20"),
                    "pods": qps_pods(&["1", "1", "1"], &[true, false, true])}),
                3,
                3,
                "20",
            ),
            // TestReplicaCalcScaleUpCMPerPodObject: ceil(20/5) = 4; ceil(20/3) = 6.667 per pod.
            (
                "object average",
                json!({"currentReplicas": 3, "maxReplicas": 10, "metric": object("AverageValue", "5", "20"), "pods": three}),
                4,
                4,
                "6667m",
            ),
            // Per pod over the pods there are (`statusReplicas`, 5 during a surge), not the 4
            // asked for: 21/(5 × 5) = 0.84, so ceil(21/5) = 5; 4.2 per pod.
            (
                "object average over the pods there are",
                json!({"currentReplicas": 4, "maxReplicas": 10, "metric": object("AverageValue", "5", "21"),
                    "pods": qps_pods(&["1"; 5], &[true; 5])}),
                5,
                5,
                "4200m",
            ),
            // TestReplicaCalcToleranceCMObject: 20.666/20 within tolerance.
            (
                "object tolerance",
                json!({"currentReplicas": 3, "maxReplicas": 10, "metric": object("Value", "20", "20666m"), "pods": three}),
                3,
                3,
                "20666m",
            ),
            // TestReplicaCalcScaleUpCMExternal: 8.6/4.4 = 1.95 × 1 ready = 2.
            (
                "external value",
                json!({"currentReplicas": 1, "maxReplicas": 10, "metric": external("Value", "4400m", "8600m"),
                    "pods": qps_pods(&["1"], &[true])}),
                2,
                2,
                "8600m",
            ),
            // TestReplicaCalcScaleUpPerPodCMExternal: ceil(8.6/2.15) = 4; 8.6/3 = 2.867.
            (
                "external average",
                json!({"currentReplicas": 3, "maxReplicas": 10, "metric": external("AverageValue", "2150m", "8600m"), "pods": three}),
                4,
                4,
                "2867m",
            ),
            // TestReplicaCalcScaleDownPerPodCMExternal: ceil(8.6/2.15) = 4 from 5.
            (
                "external average down",
                json!({"currentReplicas": 5, "maxReplicas": 10, "metric": external("AverageValue", "2150m", "8600m"), "downscaleStabilizationSeconds": 0,
                    "pods": qps_pods(&["1"; 5], &[true; 5])}),
                4,
                4,
                "1720m",
            ),
            // From zero (minReplicas 0): the ceiling of the ratio, pods or none.
            (
                "external from zero",
                json!({"currentReplicas": 0, "minReplicas": 0, "maxReplicas": 10, "metric": external("Value", "15", "20")}),
                2,
                2,
                "20",
            ),
        ];
        for (name, scenario, desired, raw, average) in cases {
            let d = run(scenario);
            assert_eq!(
                (d.desired_replicas, d.raw_recommendation, d.current_average_value.as_deref()),
                (desired, raw, Some(average)),
                "{name}: {}",
                d.reason
            );
        }
        // Named as Kubernetes names them.
        let d = run(json!({"currentReplicas": 3, "maxReplicas": 10, "metric": pods_metric("15"), "pods": three}));
        assert!(d.reason.contains("pods metric qps above target"), "{}", d.reason);
        let d = run(
            json!({"currentReplicas": 1, "maxReplicas": 10, "metric": external("Value", "4400m", "8600m"), "pods": qps_pods(&["1"], &[true])}),
        );
        assert!(d.reason.contains("external metric qps(label=value) above target"), "{}", d.reason);
        // No value for an object: nothing changes, and the reason says which metric.
        let mut none = object("Value", "15", "1");
        none.as_object_mut().unwrap().remove("currentValue");
        let d = run(json!({"currentReplicas": 3, "maxReplicas": 10, "metric": none, "pods": three}));
        assert_eq!(d.desired_replicas, 3);
        assert!(d.reason.starts_with("FailedGetObjectMetric: unable to get metric qps"), "{}", d.reason);
        // No pod has the pods metric.
        let d = run(json!({"currentReplicas": 2, "maxReplicas": 10, "metric": pods_metric("15"),
                           "pods": [{"name": "a"}, {"name": "b"}]}));
        assert!(
            d.reason.starts_with(
                "FailedGetPodsMetric: unable to get metric qps: no metrics returned from custom metrics API"
            ),
            "{}",
            d.reason
        );
    }

    #[test]
    fn bad_metric_specs_name_the_field() {
        let check = |m: serde_json::Value| {
            let spec: MetricSpec = serde_json::from_value(m).unwrap();
            spec.check("metrics[0]").map(|_| ()).map_err(|e| e.to_string())
        };
        let cases = [
            (json!({"type": "Pods", "targetType": "AverageValue", "averageValue": "1"}), "metrics[0].name: required"),
            (
                json!({"type": "Pods", "name": "a-b", "targetType": "AverageValue", "averageValue": "1"}),
                "not a Prometheus metric name",
            ),
            (
                json!({"type": "Pods", "name": "qps", "targetType": "Value", "value": "1"}),
                "metrics[0].targetType: \"Value\" is not a target of Pods metrics (AverageValue)",
            ),
            (
                json!({"type": "Object", "name": "qps", "targetType": "Value", "value": "1"}),
                "metrics[0].describedObject: required",
            ),
            (
                json!({"type": "Object", "name": "qps", "describedObject": {"kind": "Ingress", "name": "x"}, "targetType": "Value", "value": "1"}),
                "describedObject.kind: \"Ingress\" is not Deployment or Pod",
            ),
            (
                json!({"type": "External", "name": "qps", "targetType": "Value", "averageValue": "1"}),
                "give value for targetType Value, not averageValue",
            ),
            (
                json!({"type": "External", "name": "qps", "targetType": "Value", "value": "0"}),
                "metrics[0].value: \"0\" must be more than 0",
            ),
            (
                json!({"type": "External", "name": "qps", "targetType": "Value", "value": "1", "resource": "cpu"}),
                "metrics[0].resource: is not for External metrics",
            ),
            (
                json!({"type": "Resource", "resource": "cpu", "name": "qps", "targetType": "Utilization", "averageUtilization": 5}),
                "metrics[0].name: is not for Resource metrics",
            ),
            (
                json!({"type": "Resource", "resource": "cpu", "targetType": "Value", "value": "1"}),
                "\"Value\" is not a target of Resource metrics",
            ),
            (
                json!({"type": "Custom", "name": "qps", "targetType": "Value", "value": "1"}),
                "metrics[0].type: \"Custom\" is not Resource, Pods, Object or External",
            ),
            (
                json!({"type": "Pods", "name": "qps", "targetType": "AverageValue", "averageValue": "1", "currentValue": "2"}),
                "metrics[0].currentValue: is for Object and External metrics",
            ),
        ];
        for (m, want) in cases {
            let got = check(m.clone()).expect_err(&m.to_string());
            assert!(got.contains(want), "{m}: {got}");
        }
        // A stored autoscaler takes no measured value, nor the same Pods metric twice.
        let spec = |metrics: serde_json::Value| -> AutoscaleSpec {
            serde_json::from_value(json!({"maxReplicas": 5, "metrics": metrics})).unwrap()
        };
        let e =
            spec(json!([{"type": "External", "name": "q", "targetType": "Value", "value": "1", "currentValue": "1"}]))
                .check([None, None])
                .unwrap_err();
        assert_eq!(e.to_string(), "metrics[0].currentValue: is for simulation scenarios only");
        let p = json!({"type": "Pods", "name": "q", "targetType": "AverageValue", "averageValue": "1"});
        let e = spec(json!([p, p])).check([None, None]).unwrap_err();
        assert_eq!(e.to_string(), "metrics[1].name: the Pods metric q is listed twice");
        // An older stored spec (no type) still reads as a Resource metric.
        let old: MetricSpec =
            serde_json::from_value(json!({"resource": "cpu", "targetType": "Utilization", "averageUtilization": 50}))
                .unwrap();
        assert_eq!(old.check("m").unwrap().source, Source::Resource(Resource::Cpu));
        assert_eq!(
            serde_json::to_value(&old).unwrap(),
            json!({"resource": "cpu", "targetType": "Utilization", "averageUtilization": 50})
        );
    }

    #[test]
    fn edges_and_failures() {
        let p = pods(&[("a", Some("500m"))], "1000m");
        let d = run(json!({"currentReplicas": 0, "minReplicas": 1, "maxReplicas": 5, "metric": cpu(10), "pods": p}));
        assert_eq!(d.desired_replicas, 0);
        assert!(d.reason.starts_with("ScalingDisabled"));
        let d = run(json!({"currentReplicas": 7, "maxReplicas": 5, "metric": cpu(10), "pods": p}));
        assert_eq!((d.desired_replicas, d.reason.as_str()), (5, "Current number of replicas above Spec.MaxReplicas"));
        // No usable samples: nothing changes, and the reason says why.
        let d = run(json!({"currentReplicas": 2, "maxReplicas": 5, "metric": cpu(10),
            "pods": [{"name": "a", "ready": false, "requests": {"cpu": "1"}, "usage": {"cpu": "1"}}]}));
        assert_eq!(d.desired_replicas, 2);
        assert!(d.reason.contains("did not receive metrics for targeted pods"), "{}", d.reason);
        let d = run(json!({"currentReplicas": 1, "maxReplicas": 5, "metric": cpu(10),
            "pods": [{"name": "a", "usage": {"cpu": "1"}}]}));
        assert_eq!(d.reason, "FailedGetResourceMetric: missing request for cpu in pod a");
        assert_eq!(d.current_average_value, None);
        let d = run(json!({"currentReplicas": 3, "maxReplicas": 10, "metric": cpu(30),
            "pods": pods(&[("a", Some("300m")), ("b", Some("500m")), ("c", Some("700m"))], "1000m")}));
        assert_eq!(d.current_average_value.as_deref(), Some("500m"));
    }

    #[test]
    fn bad_scenarios_name_the_field() {
        let check =
            |v: serde_json::Value| serde_json::from_value::<Scenario>(v).unwrap().check().unwrap_err().to_string();
        let p = pods(&[("a", Some("1"))], "1");
        assert_eq!(
            check(json!({"currentReplicas": 1, "minReplicas": 5, "maxReplicas": 2, "metric": cpu(50), "pods": p})),
            "minReplicas: 5 is more than maxReplicas 2"
        );
        assert_eq!(
            check(json!({"currentReplicas": 1, "maxReplicas": 2, "metric": cpu(0), "pods": p})),
            "metric.averageUtilization: 0 must be more than 0"
        );
        assert_eq!(
            check(
                json!({"currentReplicas": 1, "maxReplicas": 2, "metric": {"resource": "gpu", "targetType": "Utilization", "averageUtilization": 5}})
            ),
            "metric.resource: \"gpu\" is not cpu or memory"
        );
        assert_eq!(
            check(
                json!({"currentReplicas": 1, "maxReplicas": 2, "metric": {"resource": "cpu", "targetType": "AverageValue", "averageValue": "-1"}})
            ),
            "metric.averageValue: \"-1\" must be more than 0"
        );
        assert_eq!(
            check(json!({"currentReplicas": 1, "maxReplicas": 2, "metric": cpu(5),
                "pods": [{"name": "a", "requests": {"cpu": "lots"}}]})),
            "pods[0].requests.cpu: \"lots\" is not a quantity (such as 500m, 1.5, 512Mi or 2G)"
        );
        assert_eq!(
            check(json!({"currentReplicas": 1, "maxReplicas": 2, "metric": cpu(5),
                "behavior": {"scaleUp": {"policies": [{"type": "Pods", "value": 0, "periodSeconds": 15}]}}})),
            "behavior.scaleUp.policies[0].value: 0 must be more than 0"
        );
        assert!(serde_json::from_value::<Scenario>(
            json!({"currentReplicas": 1, "maxReplicas": 2, "metric": cpu(5), "surprise": 1})
        )
        .unwrap_err()
        .to_string()
        .contains("unknown field `surprise`"));
    }

    #[test]
    fn quantities() {
        for (q, m) in [
            ("500m", 500),
            ("1", 1000),
            ("0.5", 500),
            ("1.5", 1500),
            ("2k", 2_000_000),
            ("1Ki", 1_024_000),
            ("512Mi", 536_870_912_000),
            ("1e3", 1_000_000),
            ("0.0001", 1),
        ] {
            assert_eq!(milli_value(q), Ok(m), "{q}");
        }
        for bad in ["", "m", "1x", "1.2.3", "--1", "1e"] {
            assert!(milli_value(bad).is_err(), "{bad}");
        }
        assert_eq!(format_milli(800), "800m");
        assert_eq!(format_milli(1000), "1");
        assert_eq!(format_milli(2_000_000), "2k");
        assert_eq!(format_milli(1_500_000), "1500");
    }
}
