//! Resource samples: what an agent measures on its node and its instances, ships to the
//! hub, and what `skiff top`, `/metrics` and the autoscaler read.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Where an agent reads a workload's own metrics: `http://ADDRESS:port/path`, in the
/// Prometheus text format.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scrape {
    pub port: u16,
    pub path: String,
}

/// The annotation (Kubernetes) or label (compose) keys that ask for scraping.
pub const SCRAPE_KEYS: [&str; 3] = ["prometheus.io/scrape", "prometheus.io/port", "prometheus.io/path"];

impl Scrape {
    /// From `prometheus.io/scrape: "true"` with `prometheus.io/port` (default: the first
    /// of the container's `ports`, else 80) and `prometheus.io/path` (default `/metrics`),
    /// as Prometheus' Kubernetes discovery reads them. `Err((key, problem))`.
    pub fn from_annotations(a: &BTreeMap<String, String>, ports: &[u16]) -> Result<Option<Scrape>, (String, String)> {
        let [on, port, path] = SCRAPE_KEYS;
        match a.get(on).map(|v| v.trim()) {
            None | Some("false") => return Ok(None),
            Some("true") => {}
            Some(other) => return Err((on.into(), format!("{other:?} is not \"true\" or \"false\""))),
        }
        let port = match a.get(port) {
            Some(p) => p
                .trim()
                .parse::<u16>()
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| (port.to_string(), format!("{p:?} is not a port number")))?,
            // No port declared: Prometheus' default for http.
            None => ports.first().copied().unwrap_or(80),
        };
        let path = a.get(path).map_or("/metrics", |p| p.trim()).to_string();
        let s = Scrape { port, path };
        s.check().map_err(|e| (SCRAPE_KEYS[2].to_string(), e))?;
        Ok(Some(s))
    }

    /// The problem with the port or path, if any.
    pub fn check(&self) -> Result<(), String> {
        if self.port == 0 {
            return Err("port 0 cannot be scraped".into());
        }
        if !self.path.starts_with('/')
            || self.path.len() > 1024
            || self.path.chars().any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(format!("{:?} is not a URL path (such as /metrics)", self.path));
        }
        Ok(())
    }
}

/// One instance at one moment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceMetrics {
    pub instance: String,
    pub deployment: String,
    /// CPU used since the previous sample, in cores (`None` on the first sample).
    pub cpu_cores: Option<f64>,
    /// Working set: usage minus inactive file cache, as the kubelet reports it.
    pub memory_bytes: u64,
    /// Bytes through the container's interfaces (loopback excluded), since it started.
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub restarts: u32,
    /// When the instance started (for the autoscaler's CPU initialization period).
    pub started_at_ms: Option<u64>,
    /// Its own metrics, scraped (only the names some autoscaler uses).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub series: Vec<Series>,
}

/// One series of a workload's own metrics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Series {
    pub name: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

impl Series {
    /// Whether every label of `selector` is on the series with its value.
    pub fn matches(&self, name: &str, selector: &BTreeMap<String, String>) -> bool {
        self.name == name && selector.iter().all(|(k, v)| self.labels.get(k) == Some(v))
    }
}

/// Most series one instance ships in a sample, and most bytes of their names and labels
/// (a workload cannot flood the hub, nor make its node's samples too big to ship).
pub const MAX_SERIES: usize = 64;
pub const MAX_SERIES_BYTES: usize = 2 << 10;
/// The most labels a parsed series keeps, and the longest label name or value: a line
/// past them is skipped.
pub const MAX_LABELS: usize = 16;
const MAX_LABEL_LEN: usize = 128;

/// About how many bytes a series takes on the wire.
pub fn series_bytes(s: &Series) -> usize {
    16 + s.name.len() + s.labels.iter().map(|(k, v)| k.len() + v.len() + 6).sum::<usize>()
}

/// The samples of a Prometheus (or OpenMetrics) text exposition, lazily: comments and
/// lines that do not parse are skipped, and so are values that are not finite. Label
/// values are unescaped (`\\`, `\"`, `\n`). The text may come from a workload: nothing in
/// it can make this fail or keep much.
pub fn parse_exposition(text: &str) -> impl Iterator<Item = Series> + '_ {
    text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).filter_map(sample_line)
}

/// One sample line: `name{label="value",...} value [timestamp]`.
fn sample_line(line: &str) -> Option<Series> {
    let end = line.find(|c: char| c == '{' || c.is_whitespace()).unwrap_or(line.len());
    let name = &line[..end];
    if !crate::autoscale::is_metric_name(name) {
        return None;
    }
    let (labels, rest) = match line[end..].strip_prefix('{') {
        Some(r) => label_set(r)?,
        None => (BTreeMap::new(), &line[end..]),
    };
    let value: f64 = rest.split_whitespace().next()?.parse().ok()?;
    value.is_finite().then(|| Series { name: name.to_string(), labels, value })
}

/// The labels up to the closing brace, and what follows it.
fn label_set(mut r: &str) -> Option<(BTreeMap<String, String>, &str)> {
    let mut labels = BTreeMap::new();
    loop {
        r = r.trim_start();
        if let Some(after) = r.strip_prefix('}') {
            return Some((labels, after));
        }
        let eq = r.find('=')?;
        let key = r[..eq].trim();
        if key.is_empty() || key.len() > MAX_LABEL_LEN || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return None;
        }
        r = r[eq + 1..].trim_start().strip_prefix('"')?;
        let mut value = String::new();
        let mut chars = r.char_indices();
        let close = loop {
            match chars.next()? {
                (i, '"') => break i,
                (_, '\\') => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    c => value.push(c),
                },
                (_, c) => value.push(c),
            }
        };
        if value.len() > MAX_LABEL_LEN || labels.len() >= MAX_LABELS {
            return None;
        }
        labels.insert(key.to_string(), value);
        r = r[close + 1..].trim_start();
        r = r.strip_prefix(',').unwrap_or(r);
    }
}

/// The node at one moment.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NodeMetrics {
    pub cpus: u32,
    /// CPU used since the previous sample, in cores (`None` on the first sample).
    pub cpu_cores: Option<f64>,
    pub memory_total_bytes: u64,
    /// Total minus `MemAvailable`.
    pub memory_used_bytes: u64,
    /// The filesystem holding the agent's data directory.
    pub disk_total_bytes: u64,
    pub disk_used_bytes: u64,
    /// Bytes through the node's interfaces (loopback and skiff's own excluded), since boot.
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub load1: f64,
    pub load5: f64,
    pub load15: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricsSample {
    pub node: String,
    pub time_ms: u64,
    pub host: NodeMetrics,
    pub instances: Vec<InstanceMetrics>,
}

impl MetricsSample {
    /// A sample of realistic size: a 4-CPU node running two instances (for tests and
    /// benchmarks that need one).
    pub fn example(node: &str, time_ms: u64) -> Self {
        let instance = |n: u32| InstanceMetrics {
            instance: format!("analyser-{n}"),
            deployment: "analyser".into(),
            cpu_cores: Some(0.0126),
            memory_bytes: 12_345_678,
            rx_bytes: 1_234_567,
            tx_bytes: 123_456,
            restarts: n,
            started_at_ms: Some(time_ms.saturating_sub(3_600_000)),
            series: vec![],
        };
        MetricsSample {
            node: node.into(),
            time_ms,
            host: NodeMetrics {
                cpus: 4,
                cpu_cores: Some(0.1234),
                memory_total_bytes: 4_000_000_000,
                memory_used_bytes: 1_234_567_890,
                disk_total_bytes: 32_000_000_000,
                disk_used_bytes: 12_345_678_901,
                rx_bytes: 123_456_789_012,
                tx_bytes: 12_345_678_901,
                load1: 0.52,
                load5: 0.33,
                load15: 0.2149,
            },
            instances: vec![instance(1), instance(2)],
        }
    }
}

/// A sample as an agent ships it: arrays rather than objects, CPU in millicores and load
/// in hundredths, the node name left out (the connection names it). About a third of
/// the JSON object form, for links that pay per byte.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PackedSample(
    pub u64,
    pub PackedHost,
    pub Vec<PackedInstance>,
    /// The instances' own metrics (absent when there are none).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub Vec<PackedSeries>,
);

/// instance, metric name, labels, value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PackedSeries(pub String, pub String, pub BTreeMap<String, String>, pub f64);

/// cpus, CPU used (millicores), memory total and used, disk total and used, rx, tx, load
/// 1/5/15 (hundredths).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PackedHost(u32, Option<u64>, u64, u64, u64, u64, u64, u64, u32, u32, u32);

/// instance, deployment, CPU (millicores), memory, rx, tx, restarts, started at.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PackedInstance(String, String, Option<u64>, u64, u64, u64, u32, Option<u64>);

fn milli(cores: Option<f64>) -> Option<u64> {
    cores.map(|c| (c.max(0.0) * 1000.0).round() as u64)
}

fn cores(milli: Option<u64>) -> Option<f64> {
    milli.map(|m| m as f64 / 1000.0)
}

fn hundredths(v: f64) -> u32 {
    (v.max(0.0) * 100.0).round() as u32
}

impl From<&MetricsSample> for PackedSample {
    fn from(s: &MetricsSample) -> Self {
        let h = &s.host;
        PackedSample(
            s.time_ms,
            PackedHost(
                h.cpus,
                milli(h.cpu_cores),
                h.memory_total_bytes,
                h.memory_used_bytes,
                h.disk_total_bytes,
                h.disk_used_bytes,
                h.rx_bytes,
                h.tx_bytes,
                hundredths(h.load1),
                hundredths(h.load5),
                hundredths(h.load15),
            ),
            s.instances
                .iter()
                .map(|i| {
                    PackedInstance(
                        i.instance.clone(),
                        i.deployment.clone(),
                        milli(i.cpu_cores),
                        i.memory_bytes,
                        i.rx_bytes,
                        i.tx_bytes,
                        i.restarts,
                        i.started_at_ms,
                    )
                })
                .collect(),
            s.instances
                .iter()
                .flat_map(|i| {
                    i.series.iter().map(|x| PackedSeries(i.instance.clone(), x.name.clone(), x.labels.clone(), x.value))
                })
                .collect(),
        )
    }
}

impl PackedSample {
    pub fn unpack(self, node: &str) -> MetricsSample {
        let PackedSample(time_ms, h, instances, series) = self;
        // Each instance's series, gathered once (a hostile frame cannot make this costly).
        let mut by_instance: BTreeMap<String, Vec<Series>> = BTreeMap::new();
        for x in series.into_iter().take(MAX_INSTANCES * MAX_SERIES) {
            by_instance.entry(x.0).or_default().push(Series { name: x.1, labels: x.2, value: x.3 });
        }
        MetricsSample {
            node: node.to_string(),
            time_ms,
            host: NodeMetrics {
                cpus: h.0,
                cpu_cores: cores(h.1),
                memory_total_bytes: h.2,
                memory_used_bytes: h.3,
                disk_total_bytes: h.4,
                disk_used_bytes: h.5,
                rx_bytes: h.6,
                tx_bytes: h.7,
                load1: f64::from(h.8) / 100.0,
                load5: f64::from(h.9) / 100.0,
                load15: f64::from(h.10) / 100.0,
            },
            instances: instances
                .into_iter()
                .map(|i| InstanceMetrics {
                    series: by_instance.remove(&i.0).unwrap_or_default(),
                    instance: i.0,
                    deployment: i.1,
                    cpu_cores: cores(i.2),
                    memory_bytes: i.3,
                    rx_bytes: i.4,
                    tx_bytes: i.5,
                    restarts: i.6,
                    started_at_ms: i.7,
                })
                .collect(),
        }
    }
}

/// A sample as the change from the one shipped before it on the same connection: the
/// milliseconds since that one, then only the figures that changed, as `[field, change]`
/// pairs flattened (`None` counts as -1). Instances are matched by name; one that
/// changed is `[position, field, change, ...]` (its position in the sample before), one
/// that is new is `["instance", "deployment", field values...]`, one that is gone is
/// `[-1 - position]`. A node whose figures hold still ships little more than its time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeltaSample(
    pub i64,
    pub Vec<i64>,
    pub Vec<serde_json::Value>,
    /// The instances' own metrics whole, when they differ from the sample before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub Option<Vec<PackedSeries>>,
);

/// Why a delta cannot be applied (a sender and a receiver that disagree on the base).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("metrics delta: {0}")]
pub struct DeltaError(pub String);

/// A figure as a signed number (past `i64::MAX` it stays there: both ends convert alike).
fn signed(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn opt(v: Option<u64>) -> i64 {
    v.map_or(-1, signed)
}

fn unopt(v: i64) -> Option<u64> {
    (v >= 0).then_some(v as u64)
}

fn host_fields(h: &PackedHost) -> [i64; 11] {
    [
        i64::from(h.0),
        opt(h.1),
        signed(h.2),
        signed(h.3),
        signed(h.4),
        signed(h.5),
        signed(h.6),
        signed(h.7),
        i64::from(h.8),
        i64::from(h.9),
        i64::from(h.10),
    ]
}

fn host_from(f: [i64; 11]) -> PackedHost {
    let u32_of = |v: i64| v.clamp(0, i64::from(u32::MAX)) as u32;
    let u64_of = |v: i64| v.max(0) as u64;
    PackedHost(
        u32_of(f[0]),
        unopt(f[1]),
        u64_of(f[2]),
        u64_of(f[3]),
        u64_of(f[4]),
        u64_of(f[5]),
        u64_of(f[6]),
        u64_of(f[7]),
        u32_of(f[8]),
        u32_of(f[9]),
        u32_of(f[10]),
    )
}

fn instance_fields(i: &PackedInstance) -> [i64; 6] {
    [opt(i.2), signed(i.3), signed(i.4), signed(i.5), i64::from(i.6), opt(i.7)]
}

fn instance_from(name: String, deployment: String, f: [i64; 6]) -> PackedInstance {
    PackedInstance(
        name,
        deployment,
        unopt(f[0]),
        f[1].max(0) as u64,
        f[2].max(0) as u64,
        f[3].max(0) as u64,
        f[4].clamp(0, i64::from(u32::MAX)) as u32,
        unopt(f[5]),
    )
}

/// `[field, change, ...]` for the fields of `new` that differ from `old`.
fn changes(old: &[i64], new: &[i64]) -> Vec<i64> {
    old.iter()
        .zip(new)
        .enumerate()
        .filter(|(_, (o, n))| o != n)
        .flat_map(|(i, (o, n))| [i as i64, n.wrapping_sub(*o)])
        .collect()
}

/// Applies `[field, change, ...]` pairs to `fields`.
fn apply_changes<const N: usize>(fields: &mut [i64; N], pairs: &[i64]) -> Result<(), DeltaError> {
    if !pairs.len().is_multiple_of(2) {
        return Err(DeltaError("an odd number of field changes".into()));
    }
    for p in pairs.chunks(2) {
        let f =
            usize::try_from(p[0]).ok().filter(|f| *f < N).ok_or_else(|| DeltaError(format!("no field {}", p[0])))?;
        fields[f] = fields[f].wrapping_add(p[1]);
    }
    Ok(())
}

impl PackedSample {
    /// With its instances in name order (the order deltas keep).
    pub fn sorted(mut self) -> Self {
        self.2.sort_by(|a, b| a.0.cmp(&b.0));
        self
    }

    /// This sample as the change from `base` (both in name order).
    pub fn delta_from(&self, base: &PackedSample) -> DeltaSample {
        let host = changes(&host_fields(&base.1), &host_fields(&self.1));
        let mut inst = Vec::new();
        for (pos, old) in base.2.iter().enumerate() {
            // Matched by name and deployment: the same name under another deployment is
            // one instance gone and another new.
            match self.2.iter().find(|i| i.0 == old.0 && i.1 == old.1) {
                Some(new) => {
                    let c = changes(&instance_fields(old), &instance_fields(new));
                    if !c.is_empty() {
                        let mut v = vec![serde_json::json!(pos)];
                        v.extend(c.into_iter().map(serde_json::Value::from));
                        inst.push(serde_json::Value::Array(v));
                    }
                }
                None => inst.push(serde_json::json!([-1 - pos as i64])),
            }
        }
        for new in &self.2 {
            let kept = base.2.iter().any(|o| o.0 == new.0 && o.1 == new.1);
            if !kept {
                let mut v = vec![serde_json::json!(new.0), serde_json::json!(new.1)];
                v.extend(instance_fields(new).into_iter().map(serde_json::Value::from));
                inst.push(serde_json::Value::Array(v));
            }
        }
        let series = (self.3 != base.3).then(|| self.3.clone());
        DeltaSample((self.0 as i64).saturating_sub(base.0 as i64), host, inst, series)
    }
}

impl DeltaSample {
    /// The sample this delta makes of `base`.
    pub fn apply(&self, base: &PackedSample) -> Result<PackedSample, DeltaError> {
        let mut host = host_fields(&base.1);
        apply_changes(&mut host, &self.1)?;
        let mut inst: Vec<Option<PackedInstance>> = base.2.iter().cloned().map(Some).collect();
        let mut added = Vec::new();
        let num = |v: &serde_json::Value| v.as_i64().ok_or_else(|| DeltaError(format!("{v} is not a number")));
        for e in &self.2 {
            let a = e.as_array().ok_or_else(|| DeltaError(format!("{e} is not a list")))?;
            match a.first() {
                Some(serde_json::Value::String(name)) => {
                    let dep = a
                        .get(1)
                        .and_then(|d| d.as_str())
                        .ok_or_else(|| DeltaError("a new instance without its deployment".into()))?;
                    let vals: Vec<i64> = a[2..].iter().map(num).collect::<Result<_, _>>()?;
                    let f: [i64; 6] =
                        vals.try_into().map_err(|_| DeltaError(format!("instance {name}: not 6 figures")))?;
                    added.push(instance_from(name.clone(), dep.to_string(), f));
                }
                Some(p) => {
                    let p = num(p)?;
                    let pos = if p < 0 { -1 - p } else { p };
                    let slot = usize::try_from(pos)
                        .ok()
                        .and_then(|i| inst.get_mut(i))
                        .ok_or_else(|| DeltaError(format!("no instance at {pos}")))?;
                    if p < 0 {
                        *slot = None;
                        continue;
                    }
                    let old = slot.as_ref().ok_or_else(|| DeltaError(format!("instance {pos} is gone")))?;
                    let mut f = instance_fields(old);
                    let pairs: Vec<i64> = a[1..].iter().map(num).collect::<Result<_, _>>()?;
                    apply_changes(&mut f, &pairs)?;
                    *slot = Some(instance_from(old.0.clone(), old.1.clone(), f));
                }
                None => return Err(DeltaError("an empty instance entry".into())),
            }
        }
        let instances: Vec<PackedInstance> = inst.into_iter().flatten().chain(added).collect();
        if instances.len() > MAX_INSTANCES {
            return Err(DeltaError(format!("{} instances in one sample, more than {MAX_INSTANCES}", instances.len())));
        }
        let mut names: Vec<&str> = instances.iter().map(|i| i.0.as_str()).collect();
        names.sort_unstable();
        if names.windows(2).any(|w| w[0] == w[1]) {
            return Err(DeltaError("an instance twice in one sample".into()));
        }
        let series = self.3.clone().unwrap_or_else(|| base.3.clone());
        if series.len() > MAX_INSTANCES * MAX_SERIES {
            return Err(DeltaError(format!("{} series in one sample", series.len())));
        }
        Ok(PackedSample(base.0.saturating_add_signed(self.0), host_from(host), instances, series).sorted())
    }
}

/// The most instances one sample may hold (a hub refuses a delta that makes more).
pub const MAX_INSTANCES: usize = 1_024;
/// The most samples one frame may carry (an agent sends at most 20).
pub const MAX_SAMPLES_PER_FRAME: usize = 64;

/// Samples held back while a node's figures hold still: they go out together, this many
/// at most (a minute at the default 15 s).
pub const METRICS_BATCH: usize = 4;

/// How an agent ships its samples on one connection: the first whole, then each as the
/// change from the one before (the hub keeps it); figures that hold still wait for a
/// batch, a sample that moved goes out at once (an autoscaler must see a change soon).
#[derive(Debug, Default)]
pub struct Shipper {
    base: Option<PackedSample>,
}

/// What to send for some samples (`through`: the id of the last).
#[derive(Debug, Clone, PartialEq)]
pub enum Shipment {
    Whole(Vec<PackedSample>),
    Deltas(Vec<DeltaSample>),
}

impl Shipper {
    /// The frame for `samples` (oldest first), or `None` while they may wait.
    pub fn ship(&mut self, samples: &[PackedSample]) -> Option<Shipment> {
        let last = samples.last()?;
        let moved = match &self.base {
            None => true,
            Some(b) => samples.iter().any(|s| s.moved_from(b)),
        };
        if !moved && samples.len() < METRICS_BATCH {
            return None;
        }
        let out = match self.base.take() {
            None => Shipment::Whole(samples.to_vec()),
            Some(mut prev) => Shipment::Deltas(
                samples
                    .iter()
                    .map(|s| {
                        let d = s.delta_from(&prev);
                        prev = s.clone();
                        d
                    })
                    .collect(),
            ),
        };
        self.base = Some(last.clone());
        Some(out)
    }
}

impl PackedSample {
    /// Whether this sample differs from `base` enough to go out at once: an instance
    /// came, went or restarted, or CPU or memory moved by a fifth (CPU by at least 50
    /// millicores, memory by at least 16 MiB).
    pub fn moved_from(&self, base: &PackedSample) -> bool {
        let far = |a: Option<u64>, b: Option<u64>, min: u64| match (a, b) {
            (Some(a), Some(b)) => a.abs_diff(b) >= min.max(a.max(b) / 5),
            (a, b) => a.is_some() != b.is_some(),
        };
        fn set(s: &PackedSample) -> Vec<(&str, &str, u32)> {
            s.2.iter().map(|i| (i.0.as_str(), i.1.as_str(), i.6)).collect()
        }
        set(self) != set(base)
            || self.3 != base.3
            || far(self.1 .1, base.1 .1, 50)
            || far(Some(self.1 .3), Some(base.1 .3), 16 << 20)
            || self.2.iter().zip(&base.2).any(|(a, b)| far(a.2, b.2, 50) || far(Some(a.3), Some(b.3), 16 << 20))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_text_format_as_workloads_write_it() {
        let text = r#"
# HELP queue_depth Items waiting.
# TYPE queue_depth gauge
queue_depth{queue="in",path="/a,b}",note="say \"hi\"\\n"} 12.5
queue_depth{queue="out"} 3 1700000000000
queue_depth 7
requests_total{code="200",} 1e3
job:rate5m 2
queue_depth{queue="broken} 1
queue_depth{queue="nan"} NaN
queue_depth{queue="inf"} +Inf
queue_depth not-a-number
# EOF
"#;
        type View<'a> = (&'a str, Vec<(&'a str, &'a str)>, f64);
        let got: Vec<Series> = parse_exposition(text).collect();
        let view: Vec<View> = got
            .iter()
            .map(|s| (s.name.as_str(), s.labels.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect(), s.value))
            .collect();
        assert_eq!(
            view,
            vec![
                ("queue_depth", vec![("note", "say \"hi\"\\n"), ("path", "/a,b}"), ("queue", "in")], 12.5),
                ("queue_depth", vec![("queue", "out")], 3.0),
                ("queue_depth", vec![], 7.0),
                ("requests_total", vec![("code", "200")], 1000.0),
                ("job:rate5m", vec![], 2.0),
            ]
        );
    }

    #[test]
    fn a_hostile_page_is_bounded() {
        let one = |line: String| parse_exposition(&line).count();
        let labels: String = (0..40).map(|i| format!("l{i}=\"v\"")).collect::<Vec<_>>().join(",");
        assert_eq!(one(format!("m{{{labels}}} 1\n")), 0, "too many labels");
        assert_eq!(one(format!("m{{a=\"{}\"}} 1\n", "x".repeat(MAX_LABEL_LEN + 1))), 0);
        assert_eq!(one("m{a=\"1\" 1\n".into()), 0, "an unclosed label set");
        assert_eq!(one("m{=\"1\"} 1\n".into()), 0);
        assert_eq!(one("m{a=\"\\".into()), 0, "an escape at the end");
        assert_eq!(one("m".into()), 0, "no value");
        assert_eq!(one("1m 1".into()), 0, "not a metric name");
    }

    /// Scraped series ride along: whole in a packed sample, only when they changed in a
    /// delta; a sample without any is the same bytes as before they existed.
    #[test]
    fn series_pack_and_delta() {
        let mut s = MetricsSample::example("n", 1_764_030_000_000);
        let plain = serde_json::to_string(&PackedSample::from(&s)).unwrap();
        assert!(serde_json::from_str::<PackedSample>(&plain).unwrap().3.is_empty());
        s.instances[1].series = vec![Series {
            name: "queue_depth".into(),
            labels: [("queue".to_string(), "in".to_string())].into(),
            value: 12.5,
        }];
        let p0 = PackedSample::from(&s);
        let back = serde_json::from_str::<PackedSample>(&serde_json::to_string(&p0).unwrap()).unwrap().unpack("n");
        assert_eq!(back.instances[1].series, s.instances[1].series);
        assert!(back.instances[0].series.is_empty());
        // Unchanged: the delta leaves them out; changed: they come whole, and move the shipper.
        let mut later = p0.clone();
        later.0 += 15_000;
        let d = later.delta_from(&p0);
        assert_eq!(d.3, None);
        assert!(!later.moved_from(&p0));
        assert_eq!(d.apply(&p0).unwrap(), later);
        later.3[0].3 = 40.0;
        let d = later.delta_from(&p0);
        assert!(d.3.is_some() && later.moved_from(&p0));
        let wire: DeltaSample = serde_json::from_str(&serde_json::to_string(&d).unwrap()).unwrap();
        assert_eq!(wire.apply(&p0).unwrap().unpack("n").instances[1].series[0].value, 40.0);
        // A series naming no instance of the sample is dropped when unpacked.
        let mut stray = p0.clone();
        stray.3.push(PackedSeries("someone-else".into(), "x".into(), BTreeMap::new(), 1.0));
        let u = stray.unpack("n");
        assert_eq!(u.instances.iter().map(|i| i.series.len()).sum::<usize>(), 1);
    }

    #[test]
    fn packing_keeps_millicores_and_hundredths_and_is_small() {
        let s = MetricsSample::example("site-a-1", 1_764_030_000_000);
        let packed = serde_json::to_string(&PackedSample::from(&s)).unwrap();
        let full = serde_json::to_string(&s).unwrap();
        assert!(packed.len() * 2 < full.len(), "{} vs {}", packed.len(), full.len());
        let back = serde_json::from_str::<PackedSample>(&packed).unwrap().unpack("site-a-1");
        assert_eq!(back.host.cpu_cores, Some(0.123));
        assert_eq!(back.host.load15, 0.21);
        assert_eq!(back.instances[0].cpu_cores, Some(0.013));
        assert_eq!((back.instances[1].memory_bytes, back.instances[1].restarts), (12_345_678, 2));
        assert_eq!(back.host.rx_bytes, s.host.rx_bytes);
    }

    /// A node's samples over a minute: counters grow, CPU moves, an instance restarts
    /// under the same name and another comes. Each delta rebuilds the sample exactly, and
    /// one of a node at rest is a small fraction of the sample.
    #[test]
    fn deltas_rebuild_each_sample_and_a_quiet_node_ships_little() {
        let t0 = 1_764_030_000_000;
        let s0 = PackedSample::from(&MetricsSample::example("n", t0)).sorted();
        let mut m1 = MetricsSample::example("n", t0 + 15_000);
        m1.host.rx_bytes += 4_096;
        m1.host.cpu_cores = Some(0.2);
        m1.instances[0].memory_bytes -= 100_000;
        m1.instances[1].cpu_cores = None;
        let s1 = PackedSample::from(&m1).sorted();
        let mut m2 = m1.clone();
        m2.time_ms += 15_000;
        m2.instances.remove(0);
        m2.instances.push(InstanceMetrics { instance: "a-new-1".into(), ..m1.instances[0].clone() });
        let s2 = PackedSample::from(&m2).sorted();
        let mut base = s0.clone();
        for next in [&s1, &s2, &s1, &s0] {
            let d = next.delta_from(&base);
            let wire = serde_json::to_string(&d).unwrap();
            let back: DeltaSample = serde_json::from_str(&wire).unwrap();
            assert_eq!(&back.apply(&base).unwrap(), next, "{wire}");
            base = next.clone();
        }
        let quiet = PackedSample(s0.0 + 15_000, s0.1.clone(), s0.2.clone(), vec![]).delta_from(&s0);
        let (q, full) = (serde_json::to_string(&quiet).unwrap(), serde_json::to_string(&s0).unwrap());
        assert_eq!(q, "[15000,[],[]]");
        assert!(q.len() * 10 < full.len(), "{q} vs {full}");
        // A delta that does not fit its base is refused, not guessed.
        let bad = DeltaSample(1, vec![99, 1], vec![], None);
        assert!(bad.apply(&s0).unwrap_err().to_string().contains("no field 99"));
        let bad = DeltaSample(1, vec![], vec![serde_json::json!([7, 1, 1])], None);
        assert!(bad.apply(&s0).is_err());
        // A node cannot grow the hub's copy without bound, nor name an instance twice.
        let many: Vec<serde_json::Value> =
            (0..=MAX_INSTANCES).map(|i| serde_json::json!([format!("x-{i}"), "x", 1, 1, 1, 1, 0, -1])).collect();
        let e = DeltaSample(1, vec![], many, None).apply(&s0).unwrap_err().to_string();
        assert!(e.contains("more than 1024"), "{e}");
        let twice = DeltaSample(1, vec![], vec![serde_json::json!([s0.2[0].0, "other", 1, 1, 1, 1, 0, -1])], None);
        assert!(twice.apply(&s0).unwrap_err().to_string().contains("twice"));
    }

    /// Still figures wait for a batch of four; a moved one goes at once; the first on a
    /// connection goes whole, the rest as deltas that rebuild what was sampled.
    #[test]
    fn the_shipper_batches_still_figures_and_ships_a_change_at_once() {
        let at = |ms: u64, cpu: f64| {
            let mut m = MetricsSample::example("n", 1_764_030_000_000 + ms);
            m.instances[0].cpu_cores = Some(cpu);
            m.host.rx_bytes += ms;
            PackedSample::from(&m).sorted()
        };
        let mut s = Shipper::default();
        let first = s.ship(&[at(0, 0.01)]).unwrap();
        assert!(matches!(first, Shipment::Whole(ref v) if v.len() == 1));
        assert_eq!(s.ship(&[at(15_000, 0.012)]), None, "still: waits");
        assert_eq!(s.ship(&[at(15_000, 0.012), at(30_000, 0.011), at(45_000, 0.013)]), None);
        let four = [at(15_000, 0.012), at(30_000, 0.011), at(45_000, 0.013), at(60_000, 0.012)];
        let Some(Shipment::Deltas(d)) = s.ship(&four) else { panic!("a batch of four goes") };
        let mut base = at(0, 0.01);
        for (d, want) in d.iter().zip(&four) {
            base = d.apply(&base).unwrap();
            assert_eq!(&base, want);
        }
        let busy = at(75_000, 0.5);
        assert!(matches!(s.ship(std::slice::from_ref(&busy)), Some(Shipment::Deltas(_))), "a CPU jump goes at once");
    }
}
