//! Resource samples: what an agent measures on its node and its instances, ships to the
//! hub, and what `skiff top`, `/metrics` and the autoscaler read.

use serde::{Deserialize, Serialize};

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
pub struct PackedSample(pub u64, pub PackedHost, pub Vec<PackedInstance>);

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
        )
    }
}

impl PackedSample {
    pub fn unpack(self, node: &str) -> MetricsSample {
        let PackedSample(time_ms, h, instances) = self;
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
