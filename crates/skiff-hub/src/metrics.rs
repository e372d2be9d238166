//! The fleet's resource samples as Prometheus metrics (OpenMetrics text), with bounded
//! label cardinality: per-instance series stop at a limit (the rest still count in their
//! deployment's totals and in `skiff_metrics_instance_series_dropped`).

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use skiff_model::metrics::MetricsSample;
use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;

/// Per-instance series beyond this many are left out.
pub const MAX_INSTANCE_SERIES: usize = 10_000;

pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

type Labels = Vec<(&'static str, String)>;
type FloatGauge = Family<Labels, Gauge<f64, AtomicU64>>;
type Total = Family<Labels, Counter<u64>>;

/// Registers and returns a family: a float gauge or a counter.
fn family<M: Default + Clone + prometheus_client::registry::Metric + prometheus_client::metrics::TypedMetric>(
    r: &mut Registry,
    name: &str,
    help: &str,
) -> Family<Labels, M> {
    let f = Family::<Labels, M>::default();
    r.register(name, help, f.clone());
    f
}

/// Renders `samples` (the newest of each node), at most `max_instances` instance series.
pub fn render(samples: &[MetricsSample], max_instances: usize, now: u64) -> String {
    let mut r = Registry::with_prefix("skiff");
    let cpus: FloatGauge = family(&mut r, "node_cpus", "CPUs of the node");
    let node_cpu: FloatGauge = family(&mut r, "node_cpu_usage_cores", "CPU in use on the node, in cores");
    let node_util: FloatGauge =
        family(&mut r, "node_cpu_utilization", "CPU in use on the node, as a share of its CPUs (0 to 1)");
    let mem_total: FloatGauge = family(&mut r, "node_memory_total_bytes", "Memory of the node");
    let mem_used: FloatGauge = family(&mut r, "node_memory_used_bytes", "Memory in use (total minus available)");
    let disk_total: FloatGauge = family(&mut r, "node_disk_total_bytes", "Size of the filesystem of skiff's data");
    let disk_used: FloatGauge = family(&mut r, "node_disk_used_bytes", "Used space on the filesystem of skiff's data");
    let node_rx: Total = family(&mut r, "node_network_receive_bytes", "Bytes received by the node");
    let node_tx: Total = family(&mut r, "node_network_transmit_bytes", "Bytes sent by the node");
    let load: FloatGauge = family(&mut r, "node_load", "Load average (window: 1m, 5m, 15m)");
    let age: FloatGauge = family(&mut r, "node_sample_age_seconds", "Seconds since the node's newest sample");
    let cpu: FloatGauge = family(&mut r, "instance_cpu_usage_cores", "CPU used by the instance, in cores");
    let mem: FloatGauge = family(&mut r, "instance_memory_working_set_bytes", "Working set of the instance");
    let rx: Total = family(&mut r, "instance_network_receive_bytes", "Bytes received by the instance");
    let tx: Total = family(&mut r, "instance_network_transmit_bytes", "Bytes sent by the instance");
    let restarts: Total = family(&mut r, "instance_restarts", "Restarts of the instance");
    let dep_cpu: FloatGauge =
        family(&mut r, "deployment_cpu_usage_cores", "CPU used by all instances of the deployment");
    let dep_mem: FloatGauge = family(&mut r, "deployment_memory_working_set_bytes", "Working set of all its instances");
    let dep_n: FloatGauge = family(&mut r, "deployment_instances_running", "Running instances of the deployment");
    let dropped = Gauge::<i64>::default();
    r.register(
        "metrics_instance_series_dropped",
        "Instances left out of per-instance series (over the cardinality limit)",
        dropped.clone(),
    );

    let mut deployments: BTreeMap<&str, (f64, u64, u64)> = BTreeMap::new();
    let mut shown = 0usize;
    let mut left_out = 0i64;
    for s in samples {
        let n = || vec![("node", s.node.clone())];
        let h = &s.host;
        cpus.get_or_create(&n()).set(f64::from(h.cpus));
        if let Some(c) = h.cpu_cores {
            node_cpu.get_or_create(&n()).set(c);
            node_util.get_or_create(&n()).set(c / f64::from(h.cpus.max(1)));
        }
        mem_total.get_or_create(&n()).set(h.memory_total_bytes as f64);
        mem_used.get_or_create(&n()).set(h.memory_used_bytes as f64);
        disk_total.get_or_create(&n()).set(h.disk_total_bytes as f64);
        disk_used.get_or_create(&n()).set(h.disk_used_bytes as f64);
        node_rx.get_or_create(&n()).inc_by(h.rx_bytes);
        node_tx.get_or_create(&n()).inc_by(h.tx_bytes);
        for (w, v) in [("1m", h.load1), ("5m", h.load5), ("15m", h.load15)] {
            load.get_or_create(&vec![("node", s.node.clone()), ("window", w.to_string())]).set(v);
        }
        age.get_or_create(&n()).set(now.saturating_sub(s.time_ms) as f64 / 1000.0);
        for i in &s.instances {
            let d = deployments.entry(&i.deployment).or_default();
            d.0 += i.cpu_cores.unwrap_or(0.0);
            d.1 += i.memory_bytes;
            d.2 += 1;
            if shown >= max_instances {
                left_out += 1;
                continue;
            }
            shown += 1;
            let l =
                vec![("node", s.node.clone()), ("deployment", i.deployment.clone()), ("instance", i.instance.clone())];
            if let Some(c) = i.cpu_cores {
                cpu.get_or_create(&l).set(c);
            }
            mem.get_or_create(&l).set(i.memory_bytes as f64);
            rx.get_or_create(&l).inc_by(i.rx_bytes);
            tx.get_or_create(&l).inc_by(i.tx_bytes);
            restarts.get_or_create(&l).inc_by(u64::from(i.restarts));
        }
    }
    for (name, (c, m, count)) in deployments {
        let l = vec![("deployment", name.to_string())];
        dep_cpu.get_or_create(&l).set(c);
        dep_mem.get_or_create(&l).set(m as f64);
        dep_n.get_or_create(&l).set(count as f64);
    }
    dropped.set(left_out);
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = encode(&mut out, &r);
    out
}

/// The names of the series `render` exports (counters with their `_total`): what alert
/// rules may ask for.
pub fn names() -> Vec<String> {
    // Families without series are not written: render one example node.
    let text = render(&[MetricsSample::example("n", 0)], 1, 0);
    let mut out = vec![];
    for l in text.lines().filter_map(|l| l.strip_prefix("# TYPE ")) {
        let mut w = l.split(' ');
        if let (Some(name), Some(kind)) = (w.next(), w.next()) {
            out.push(if kind == "counter" { format!("{name}_total") } else { name.to_string() });
        }
    }
    out
}

/// Serves `GET /metrics` with what `samples` returns, every series included (an agent's
/// own endpoint: one node, bounded by what runs on it), then what `extra` writes (the
/// agent's own counters, in the text format).
pub async fn serve(
    listener: tokio::net::TcpListener,
    samples: impl Fn() -> Vec<MetricsSample> + Clone + Send + Sync + 'static,
    extra: impl Fn() -> String + Clone + Send + Sync + 'static,
) -> std::io::Result<()> {
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let mut text = render(&samples(), usize::MAX, skiff_sys::time::now_ms());
            text.push_str(&extra());
            async move { ([(axum::http::header::CONTENT_TYPE, CONTENT_TYPE)], text) }
        }),
    );
    axum::serve(listener, app).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use skiff_model::metrics::{InstanceMetrics, NodeMetrics};

    fn sample(node: &str, instances: &[(&str, &str, f64)]) -> MetricsSample {
        MetricsSample {
            node: node.into(),
            time_ms: skiff_sys::time::now_ms(),
            host: NodeMetrics { cpus: 4, cpu_cores: Some(1.5), memory_total_bytes: 1 << 30, ..Default::default() },
            instances: instances
                .iter()
                .map(|(i, d, c)| InstanceMetrics {
                    instance: i.to_string(),
                    deployment: d.to_string(),
                    cpu_cores: Some(*c),
                    memory_bytes: 1 << 20,
                    rx_bytes: 10,
                    tx_bytes: 20,
                    restarts: 1,
                    started_at_ms: None,
                    series: vec![],
                })
                .collect(),
        }
    }

    #[test]
    fn renders_nodes_instances_and_deployment_totals_within_the_limit() {
        let all =
            [sample("pi-1", &[("web-1", "web", 0.25), ("web-2", "web", 0.5)]), sample("pi-2", &[("db-1", "db", 1.0)])];
        let text = render(&all, 2, skiff_sys::time::now_ms());
        for want in [
            "skiff_node_cpus{node=\"pi-1\"} 4.0",
            "skiff_node_cpu_usage_cores{node=\"pi-2\"} 1.5",
            "skiff_node_cpu_utilization{node=\"pi-2\"} 0.375",
            "skiff_node_load{node=\"pi-1\",window=\"5m\"} 0.0",
            "skiff_instance_cpu_usage_cores{node=\"pi-1\",deployment=\"web\",instance=\"web-2\"} 0.5",
            "skiff_instance_restarts_total{node=\"pi-1\",deployment=\"web\",instance=\"web-1\"} 1",
            "skiff_deployment_cpu_usage_cores{deployment=\"web\"} 0.75",
            "skiff_deployment_instances_running{deployment=\"db\"} 1.0",
            "skiff_metrics_instance_series_dropped 1",
            "# EOF",
        ] {
            assert!(text.contains(want), "{want} missing from\n{text}");
        }
        assert!(!text.contains("instance=\"db-1\""), "over the limit: no per-instance series");
    }

    /// The Grafana dashboard under deploy/ asks only for series the hub exports.
    #[test]
    fn the_dashboard_queries_exported_series() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy/grafana/skiff-fleet.json");
        let dash: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let exported = names();
        let mut checked = 0;
        for p in dash["panels"].as_array().unwrap() {
            for t in p["targets"].as_array().unwrap() {
                let expr = t["expr"].as_str().unwrap();
                for name in
                    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).filter(|w| w.starts_with("skiff_"))
                {
                    assert!(
                        exported.iter().any(|e| e == name),
                        "{} asks for {name}, which is not exported",
                        p["title"]
                    );
                    checked += 1;
                }
            }
        }
        assert!(checked >= 15, "{checked}");
    }
}
