//! `skiff get`, `describe`, `top`, `logs` and `exec`: what the hub shows of the fleet.

use super::{client, Cli};
use crate::client::Client;
use crate::output::{self, Format};
use anyhow::{bail, Context, Result};
use skiff_model::api::DeploymentView;
use skiff_model::proto::SessionSpec;
use skiff_model::{InstanceStatus, LogLine};

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TopKind {
    #[value(alias = "node")]
    Nodes,
    #[value(alias = "instance", alias = "inst")]
    Instances,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Kind {
    #[value(alias = "node")]
    Nodes,
    #[value(alias = "deployment", alias = "deploy")]
    Deployments,
    #[value(alias = "instance", alias = "inst")]
    Instances,
    #[value(alias = "event")]
    Events,
    #[value(alias = "autoscaler", alias = "hpa")]
    Autoscalers,
    #[value(alias = "alert")]
    Alerts,
    /// The fleet's services: every deployment that serves ports on the bridge.
    #[value(alias = "service", alias = "svc")]
    Services,
    /// Jobs and CronJobs, each with its (last) run.
    #[value(alias = "job", alias = "cronjobs", alias = "cronjob")]
    Jobs,
}

pub(super) fn dash<T: ToString>(v: Option<T>) -> String {
    v.map(|x| x.to_string()).unwrap_or_else(|| "-".into())
}

pub(super) fn instance_row(i: &InstanceStatus) -> Vec<String> {
    use skiff_model::InstanceState as S;
    let status = match i.state {
        S::Running => format!("running {}", output::age(i.started_at_ms)),
        S::Exited | S::Restarting | S::Failed => {
            let oom = if i.oom_killed { ", oom" } else { "" };
            let code = i.exit_code.map(|c| format!(" ({c}{oom})")).unwrap_or_default();
            format!("{}{code}", i.state)
        }
        s => s.to_string(),
    };
    let ports = if i.ports.is_empty() { "-".into() } else { i.ports.join(",") };
    vec![
        i.name.clone(),
        i.deployment.clone(),
        status,
        dash(i.health),
        i.restarts.to_string(),
        dash(i.pid),
        dash(i.ip.as_ref()),
        ports,
        i.message.clone().unwrap_or_default(),
    ]
}

pub(super) fn deployment_row(d: &DeploymentView) -> Vec<String> {
    let running = d.instances.iter().filter(|i| i.state == skiff_model::InstanceState::Running).count();
    let r = &d.spec.resources;
    vec![
        d.spec.name.clone(),
        d.spec.stack.clone(),
        format!("{running}/{}", d.wanted.unwrap_or(d.spec.replicas)),
        d.spec.image.clone(),
        dash(r.cpus_millis.map(skiff_model::format_cpus)),
        dash(r.memory_bytes.map(skiff_model::format_bytes)),
        d.spec.restart.to_string(),
        d.revision.to_string(),
    ]
}

/// Which events `get events --type` keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum EventType {
    Security,
}

/// Reasons of security events: threat detection, signatures, the node's policy.
pub const SECURITY_REASONS: &[&str] = &["SecurityAlert", "SecurityAction", "Untrusted", "PolicyViolation"];

/// One requirement of a label selector (kubectl's equality-based ones).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Requirement {
    Equals(String, String),
    NotEquals(String, String),
    Exists(String),
    Absent(String),
}

/// What `skiff get` keeps of a list: one name, and a label selector.
#[derive(Debug, Default)]
pub struct Only {
    name: Option<String>,
    selector: Vec<Requirement>,
}

impl Only {
    pub fn new(kind: Kind, name: Option<&str>, selector: Option<&str>) -> Result<Self> {
        let mut reqs = vec![];
        if let Some(sel) = selector {
            if !matches!(kind, Kind::Deployments | Kind::Instances) {
                bail!("-l: only deployments (and instances, by their deployment's) carry labels");
            }
            for part in sel.split(',').map(str::trim) {
                let key_ok = |k: &str| {
                    if skiff_model::validate::is_label_key(k) {
                        Ok(k.to_string())
                    } else {
                        Err(anyhow::anyhow!("-l {sel:?}: {k:?} is not a label key"))
                    }
                };
                let r = if let Some((k, v)) = part.split_once("!=") {
                    Requirement::NotEquals(key_ok(k.trim())?, v.trim().to_string())
                } else if let Some((k, v)) = part.split_once("==").or_else(|| part.split_once('=')) {
                    Requirement::Equals(key_ok(k.trim())?, v.trim().to_string())
                } else if let Some(k) = part.strip_prefix('!') {
                    Requirement::Absent(key_ok(k.trim())?)
                } else {
                    Requirement::Exists(key_ok(part)?)
                };
                reqs.push(r);
            }
        }
        Ok(Only { name: name.map(str::to_string), selector: reqs })
    }

    fn matches(&self, labels: &std::collections::BTreeMap<String, String>) -> bool {
        self.selector.iter().all(|r| match r {
            Requirement::Equals(k, v) => labels.get(k) == Some(v),
            Requirement::NotEquals(k, v) => labels.get(k) != Some(v),
            Requirement::Exists(k) => labels.contains_key(k),
            Requirement::Absent(k) => !labels.contains_key(k),
        })
    }

    fn is_all(&self) -> bool {
        self.name.is_none() && self.selector.is_empty()
    }

    /// The list in `body` with only what is asked for (`labels`: each deployment's, for
    /// instances).
    fn keep(
        &self,
        kind: Kind,
        body: Vec<u8>,
        labels: &std::collections::HashMap<String, std::collections::BTreeMap<String, String>>,
    ) -> Result<Vec<u8>> {
        if self.is_all() {
            return Ok(body);
        }
        let mut v: Vec<serde_json::Value> = serde_json::from_slice(&body)?;
        let name_of = |x: &serde_json::Value| -> Option<String> {
            let p = match kind {
                Kind::Deployments => "/spec/name",
                Kind::Events => "/object",
                Kind::Autoscalers => "/deployment",
                Kind::Alerts => "/alert",
                Kind::Instances | Kind::Nodes | Kind::Services | Kind::Jobs => "/name",
            };
            x.pointer(p).and_then(|n| n.as_str()).map(str::to_string)
        };
        let empty = Default::default();
        v.retain(|x| {
            let named = self.name.as_ref().is_none_or(|n| name_of(x).as_deref() == Some(n.as_str()));
            let labelled = self.selector.is_empty()
                || match kind {
                    Kind::Deployments => {
                        let l: std::collections::BTreeMap<String, String> = x
                            .pointer("/spec/labels")
                            .and_then(|l| serde_json::from_value(l.clone()).ok())
                            .unwrap_or_default();
                        self.matches(&l)
                    }
                    _ => {
                        let d = x.pointer("/deployment").and_then(|d| d.as_str()).unwrap_or_default();
                        self.matches(labels.get(d).unwrap_or(&empty))
                    }
                };
            named && labelled
        });
        Ok(serde_json::to_vec(&v)?)
    }
}

/// Prints a list; with `watch`, again each time it changes (a long-poll per round).
pub(super) async fn get(
    c: &Client,
    kind: Kind,
    output: &super::GetOutput,
    watch: bool,
    event_type: Option<EventType>,
    only: &Only,
) -> Result<i32> {
    let (f, template) = match output {
        super::GetOutput::Format(f) => (*f, None),
        super::GetOutput::JsonPath(t) => (Format::Json, Some(t)),
    };
    if event_type.is_some() && kind != Kind::Events {
        anyhow::bail!("--type: only events have a type");
    }
    let path = match kind {
        Kind::Instances => "/api/v1/instances",
        Kind::Deployments => "/api/v1/deployments",
        Kind::Nodes => "/api/v1/nodes",
        Kind::Events => "/api/v1/events",
        Kind::Autoscalers => "/api/v1/autoscalers",
        Kind::Alerts => "/api/v1/alerts",
        Kind::Services => "/api/v1/services",
        Kind::Jobs => "/api/v1/jobs",
    };
    let mut tag: Option<String> = None;
    loop {
        let Some((body, new_tag)) = c.watch(path, tag.as_deref(), if tag.is_some() { 30 } else { 0 }).await? else {
            continue;
        };
        match f {
            f if f.is_table() && tag.is_some() => output::emit("\n"),
            Format::Yaml if watch => output::emit("---\n"),
            _ => {}
        }
        let body = match event_type {
            Some(EventType::Security) => {
                let mut v: Vec<skiff_model::EventRecord> = serde_json::from_slice(&body)?;
                v.retain(|e| SECURITY_REASONS.contains(&e.reason.as_str()));
                serde_json::to_vec(&v)?
            }
            None => body,
        };
        // Instances are selected by their deployment's labels.
        let labels = if kind == Kind::Instances && !only.selector.is_empty() {
            let ds: Vec<DeploymentView> = c.get("/api/v1/deployments").await?;
            ds.into_iter().map(|d| (d.spec.name, d.spec.labels)).collect()
        } else {
            Default::default()
        };
        let body = only.keep(kind, body, &labels)?;
        if let (Some(name), false) = (&only.name, watch) {
            if body == b"[]" {
                bail!("{} {name:?} not found", kind_name(kind));
            }
        }
        match template {
            Some(t) => {
                let items: Vec<serde_json::Value> = serde_json::from_slice(&body)?;
                // One object named: it is the template's root, as kubectl's.
                let mut text = match (&only.name, items.as_slice()) {
                    (Some(_), [one]) => t.render_at(one),
                    _ => t.render(&items),
                };
                if watch && !text.ends_with('\n') {
                    text.push('\n');
                }
                output::emit(&text);
            }
            None => print_list(kind, &body, if watch && f == Format::Json { Format::JsonLine } else { f })?,
        }
        if !watch {
            return Ok(0);
        }
        tag = Some(new_tag);
    }
}

/// `kubectl top`-style tables: CPU in cores (`250m`), memory in binary units.
pub(super) async fn top(c: &Client, kind: TopKind, f: Format) -> Result<i32> {
    use skiff_model::metrics::{InstanceMetrics, MetricsSample, NodeMetrics};
    let mut samples: Vec<MetricsSample> = c.get("/api/v1/metrics").await?;
    samples.sort_by(|a, b| a.node.cmp(&b.node));
    let cores = |c: Option<f64>| c.map_or("-".to_string(), |c| format!("{}m", (c * 1000.0).round() as u64));
    let pct = |part: f64, whole: f64| if whole > 0.0 { format!("{:.0}%", part / whole * 100.0) } else { "-".into() };
    match kind {
        TopKind::Nodes => {
            #[derive(serde::Serialize)]
            struct Row<'a> {
                name: &'a str,
                time_ms: u64,
                #[serde(flatten)]
                host: &'a NodeMetrics,
            }
            let rows: Vec<Row> =
                samples.iter().map(|s| Row { name: &s.node, time_ms: s.time_ms, host: &s.host }).collect();
            let h = ["NAME", "CPU(cores)", "CPU%", "MEMORY", "MEMORY%", "DISK%", "LOAD1"];
            output::print(&rows, f, &h, |r| {
                let m = r.host;
                vec![
                    r.name.to_string(),
                    cores(m.cpu_cores),
                    m.cpu_cores.map_or("-".into(), |c| pct(c, f64::from(m.cpus))),
                    skiff_model::format_bytes(m.memory_used_bytes),
                    pct(m.memory_used_bytes as f64, m.memory_total_bytes as f64),
                    pct(m.disk_used_bytes as f64, m.disk_total_bytes as f64),
                    format!("{:.2}", m.load1),
                ]
            })?;
        }
        TopKind::Instances => {
            #[derive(serde::Serialize)]
            struct Row<'a> {
                node: &'a str,
                #[serde(flatten)]
                instance: &'a InstanceMetrics,
            }
            let mut rows: Vec<Row> =
                samples.iter().flat_map(|s| s.instances.iter().map(|i| Row { node: &s.node, instance: i })).collect();
            rows.sort_by(|a, b| a.instance.instance.cmp(&b.instance.instance));
            let h = ["NAME", "NODE", "CPU(cores)", "MEMORY", "NET RX", "NET TX", "RESTARTS"];
            output::print(&rows, f, &h, |r| {
                let i = r.instance;
                vec![
                    i.instance.clone(),
                    r.node.to_string(),
                    cores(i.cpu_cores),
                    skiff_model::format_bytes(i.memory_bytes),
                    skiff_model::format_bytes(i.rx_bytes),
                    skiff_model::format_bytes(i.tx_bytes),
                    i.restarts.to_string(),
                ]
            })?;
        }
    }
    Ok(0)
}

/// A kind's name in messages (`deployment`).
fn kind_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Nodes => "node",
        Kind::Deployments => "deployment",
        Kind::Instances => "instance",
        Kind::Events => "events of",
        Kind::Autoscalers => "autoscaler of",
        Kind::Alerts => "alert",
        Kind::Services => "service",
        Kind::Jobs => "job",
    }
}

pub(super) fn print_list(kind: Kind, body: &[u8], f: Format) -> Result<()> {
    let bad = |e: serde_json::Error| anyhow::anyhow!("the hub's answer is not the list asked for: {e}");
    match kind {
        Kind::Instances => {
            let mut v: Vec<InstanceStatus> = serde_json::from_slice(body).map_err(bad)?;
            v.sort_by(|a, b| a.name.cmp(&b.name));
            let h = ["NAME", "DEPLOYMENT", "STATUS", "HEALTH", "RESTARTS", "PID", "IP", "PORTS", "MESSAGE"];
            if f == Format::Wide {
                let h = [&h[..8], &["NODE", "IMAGE", "CONTAINER", "MESSAGE"]].concat();
                return output::print(&v, f, &h, |i| {
                    let mut row = instance_row(i);
                    let message = row.pop().unwrap_or_default();
                    let short: String = i.container_id.chars().take(12).collect();
                    row.extend([i.node.clone(), i.image.clone(), short, message]);
                    row
                });
            }
            output::print(&v, f, &h, instance_row)
        }
        Kind::Deployments => {
            let v: Vec<DeploymentView> = serde_json::from_slice(body).map_err(bad)?;
            let h = ["NAME", "STACK", "READY", "IMAGE", "CPUS", "MEMORY", "RESTART", "REVISION"];
            if f == Format::Wide {
                let h = [&h[..], &["SELECTOR", "LABELS"]].concat();
                return output::print(&v, f, &h, |d| {
                    let mut row = deployment_row(d);
                    row.extend([label_pairs(&d.spec.placement.node_selector), label_pairs(&d.spec.labels)]);
                    row
                });
            }
            output::print(&v, f, &h, deployment_row)
        }
        Kind::Nodes => {
            let v: Vec<skiff_hub::NodeInfo> = serde_json::from_slice(body).map_err(bad)?;
            let mut h = vec!["NAME", "STATE", "PLATFORM", "RUNTIMES", "RUNC", "INSTANCES"];
            if f == Format::Wide {
                h.push("LABELS");
            }
            output::print(&v, f, &h, |n| {
                let runc = n.versions.get("runc").cloned().unwrap_or_else(|| "-".into());
                let flag = if n.warnings.is_empty() { "" } else { " (!)" };
                let mut row = vec![
                    n.name.clone(),
                    n.state.clone(),
                    format!("{}/{}", n.os, n.arch),
                    n.runtimes.join(","),
                    format!("{runc}{flag}"),
                    n.instances.to_string(),
                ];
                if f == Format::Wide {
                    row.push(label_pairs(&n.labels));
                }
                row
            })?;
            if f.is_table() {
                for n in v.iter().filter(|n| !n.warnings.is_empty()) {
                    for w in &n.warnings {
                        eprintln!("warning: node {}: {w}", n.name);
                    }
                }
            }
            Ok(())
        }
        Kind::Autoscalers => {
            let v: Vec<skiff_hub::autoscaler::Status> = serde_json::from_slice(body).map_err(bad)?;
            let h = ["DEPLOYMENT", "MIN", "MAX", "REPLICAS", "DESIRED", "CURRENT", "REASON"];
            output::print(&v, f, &h, |a| {
                let current = match (a.current_utilization, &a.current_average_value) {
                    (Some(u), _) => format!("{u}%"),
                    (None, Some(v)) => v.clone(),
                    (None, None) => "-".into(),
                };
                vec![
                    a.deployment.clone(),
                    a.min_replicas.to_string(),
                    a.max_replicas.to_string(),
                    a.current_replicas.to_string(),
                    a.desired_replicas.to_string(),
                    current,
                    a.reason.clone(),
                ]
            })
        }
        Kind::Alerts => {
            let v: Vec<skiff_hub::alerts::Alert> = serde_json::from_slice(body).map_err(bad)?;
            output::print(&v, f, &["ALERT", "STATE", "SINCE", "VALUE", "LABELS", "ACTION"], |a| {
                let labels: Vec<String> =
                    a.labels.iter().filter(|(k, _)| *k != "alertname").map(|(k, v)| format!("{k}={v}")).collect();
                vec![
                    a.alert.clone(),
                    format!("{:?}", a.state).to_lowercase(),
                    output::age(Some(a.active_at_ms)),
                    format!("{:.3}", a.value),
                    labels.join(","),
                    a.action.clone().unwrap_or_default(),
                ]
            })
        }
        Kind::Services => {
            let v: Vec<skiff_model::mesh::ServiceInfo> = serde_json::from_slice(body).map_err(bad)?;
            let mut h = vec!["NAME", "STACK", "ADDRESS", "PORTS", "ENDPOINTS"];
            if f == Format::Wide {
                h.extend(["NETWORKS", "ALIASES"]);
            }
            output::print(&v, f, &h, |s| {
                let ports: Vec<String> = s.ports.iter().map(ToString::to_string).collect();
                // Instances that serve, of all, on each node.
                let eps: Vec<String> =
                    s.endpoints.iter().map(|e| format!("{}:{}/{}", e.node, e.ready, e.total)).collect();
                let mut row = vec![
                    s.name.clone(),
                    s.stack.clone(),
                    s.address.clone(),
                    ports.join(","),
                    if eps.is_empty() { "-".into() } else { eps.join(",") },
                ];
                if f == Format::Wide {
                    row.extend([
                        s.networks.join(","),
                        if s.aliases.is_empty() { "-".into() } else { s.aliases.join(",") },
                    ]);
                }
                row
            })
        }
        Kind::Jobs => {
            let v: Vec<skiff_model::job::JobView> = serde_json::from_slice(body).map_err(bad)?;
            let h = ["NAME", "SCHEDULE", "STATUS", "COMPLETIONS", "FAILURES", "STARTED", "DURATION", "NODE", "MESSAGE"];
            output::print(&v, f, &h, |j| {
                let r = &j.run;
                let status = match (j.suspended, r.state) {
                    (true, _) => "Suspended".to_string(),
                    (false, s) => format!("{s:?}"),
                };
                let took = match (r.started_ms, r.finished_ms) {
                    (Some(s), Some(e)) => format!("{}s", e.saturating_sub(s) / 1000),
                    _ => "-".into(),
                };
                vec![
                    j.name.clone(),
                    j.schedule.clone().unwrap_or_else(|| "-".into()),
                    status,
                    format!("{}/{}", r.succeeded, j.completions),
                    r.failures.to_string(),
                    output::age(r.started_ms),
                    took,
                    if j.nodes.is_empty() { "-".into() } else { j.nodes.join(",") },
                    r.message.clone().unwrap_or_default(),
                ]
            })
        }
        Kind::Events => {
            let v: Vec<skiff_model::EventRecord> = serde_json::from_slice(body).map_err(bad)?;
            output::print(&v, f, &["AGE", "OBJECT", "REASON", "MESSAGE"], |e| {
                vec![output::age(Some(e.time_ms)), e.object.clone(), e.reason.clone(), e.message.clone()]
            })
        }
    }
}

/// The time window of `skiff logs --since/--until` (ms since the epoch).
#[derive(Debug, Clone, Copy, Default)]
pub struct LogWindow {
    pub since_ms: Option<u64>,
    pub until_ms: Option<u64>,
}

impl LogWindow {
    /// Where a line written at `time` (RFC 3339) stands: `Less` before the window,
    /// `Greater` after it. A line whose time cannot be read is kept.
    fn place(&self, time: &str) -> std::cmp::Ordering {
        use std::cmp::Ordering;
        let Some(ms) = skiff_image::notation::parse_rfc3339(time).and_then(|s| u64::try_from(s).ok()).map(|s| s * 1000)
        else {
            return Ordering::Equal;
        };
        // Whole seconds: a line of the window's first second is kept.
        if self.since_ms.is_some_and(|s| ms + 999 < s) {
            Ordering::Less
        } else if self.until_ms.is_some_and(|u| ms > u) {
            Ordering::Greater
        } else {
            Ordering::Equal
        }
    }

    fn is_open(&self) -> bool {
        self.since_ms.is_none() && self.until_ms.is_none()
    }
}

pub(super) async fn logs(
    c: &Client,
    name: &str,
    follow: bool,
    tail: Option<usize>,
    ts: bool,
    window: LogWindow,
) -> Result<i32> {
    if let (Some(s), Some(u)) = (window.since_ms, window.until_ms) {
        if s > u {
            bail!("--since is after --until");
        }
    }
    // An --until already past needs nothing followed.
    let follow = follow && window.until_ms.is_none_or(|u| u > skiff_sys::time::now_ms());
    let mut q = format!("/api/v1/instances/{name}/logs?follow={follow}");
    // With a window, the tail is taken of what falls in it (here, not by the node); when
    // following, the node takes the tail of what it has, and the window is kept of that.
    let tail_here = if window.is_open() || follow {
        if let Some(t) = tail {
            q.push_str(&format!("&tail={t}"));
        }
        None
    } else {
        tail
    };
    // Following ends at --until, though no line comes after it.
    let until_wait = match (follow, window.until_ms) {
        (true, Some(u)) => Some(std::time::Duration::from_millis(u.saturating_sub(skiff_sys::time::now_ms()))),
        _ => None,
    };
    let mut resp = c.stream(&q).await?;
    let mut buf: Vec<u8> = vec![];
    let stderr = std::io::stderr();
    // With a tail of the window: the lines are kept until the stream (not followed) ends.
    let mut held: std::collections::VecDeque<LogLine> = Default::default();
    let deadline = until_wait.map(|w| tokio::time::Instant::now() + w);
    loop {
        let chunk = match deadline {
            Some(d) => match tokio::time::timeout_at(d, resp.chunk()).await {
                Ok(c) => c,
                Err(_) => break,
            },
            None => resp.chunk().await,
        };
        let Some(chunk) = chunk.context("reading the log stream")? else { break };
        buf.extend_from_slice(&chunk);
        while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=pos).collect();
            let Ok(l) = serde_json::from_slice::<LogLine>(&line) else {
                continue;
            };
            // A deployment's instances send their history one after another: a line past
            // the window does not end it (following ends at --until's time).
            if window.place(&l.time) != std::cmp::Ordering::Equal {
                continue;
            }
            if let (Some(t), false) = (tail_here, follow) {
                held.push_back(l);
                if held.len() > t {
                    held.pop_front();
                }
                continue;
            }
            print_log_line(&l, ts, &stderr);
        }
    }
    for l in &held {
        print_log_line(l, ts, &stderr);
    }
    Ok(0)
}

/// Labels as `k=v,k2=v2` (`-` for none), for a table cell.
fn label_pairs(m: &std::collections::BTreeMap<String, String>) -> String {
    let v: Vec<String> = m.iter().map(|(k, v)| format!("{k}={v}")).collect();
    if v.is_empty() {
        "-".to_string()
    } else {
        v.join(",")
    }
}

fn print_log_line(l: &LogLine, ts: bool, stderr: &std::io::Stderr) {
    use std::io::Write;
    let (prefix, stream) = match l.stream.rsplit_once('/') {
        Some((inst, s)) => (format!("{inst} | "), s.to_string()),
        None => (String::new(), l.stream.clone()),
    };
    let t = if ts { format!("{} ", l.time) } else { String::new() };
    if stream == "stderr" {
        let _ = writeln!(stderr.lock(), "{prefix}{t}{}", l.log);
    } else {
        output::emit(&format!("{prefix}{t}{}\n", l.log));
    }
}

pub(super) async fn describe(cli: &Cli, kind: Kind, name: &str) -> Result<i32> {
    let c = client(cli)?;
    match kind {
        Kind::Deployments => {
            let v: DeploymentView = c.get(&format!("/api/v1/deployments/{name}")).await?;
            out!("{}", serde_norway::to_string(&v)?);
        }
        Kind::Nodes => {
            let nodes: Vec<skiff_hub::NodeInfo> = c.get("/api/v1/nodes").await?;
            let n = nodes.into_iter().find(|n| n.name == name).with_context(|| format!("node {name:?} not found"))?;
            out!("{}", serde_norway::to_string(&n)?);
        }
        Kind::Services => {
            let all: Vec<skiff_model::mesh::ServiceInfo> = c.get("/api/v1/services").await?;
            let s = all.into_iter().find(|s| s.name == name).with_context(|| format!("service {name:?} not found"))?;
            out!("{}", serde_norway::to_string(&s)?);
        }
        _ => bail!("describe works on deployments, nodes and services"),
    }
    Ok(0)
}

/// How long a session waits for a word from the hub (which pings every 20 s).
const SESSION_SILENCE: std::time::Duration = std::time::Duration::from_secs(60);

/// Whether `e` is the hub answering with `status`.
pub(super) fn is_status(e: &anyhow::Error, status: reqwest::StatusCode) -> bool {
    e.downcast_ref::<crate::client::ApiError>().is_some_and(|a| a.status == status)
}

/// `skiff exec`: the command runs in a session over a WebSocket to the hub (see
/// `skiff_model::api::ExecControl`); output is shown as it comes, input (with -i) and
/// window sizes (with -t) go the other way at the same time.
pub(super) async fn exec(cli: &Cli, instance: &str, command: &[String], interactive: bool, tty: bool) -> Result<i32> {
    if tty && interactive && !skiff_sys::pty::is_terminal(std::io::stdin()) {
        bail!("the input device is not a TTY: -t with -i needs a terminal (use -i alone for a pipe)");
    }
    let (cols, rows) = terminal_size().unwrap_or((0, 0));
    let spec = SessionSpec { argv: command.to_vec(), tty, stdin: interactive, cols, rows, ..Default::default() };
    spec.validate().map_err(|e| anyhow::anyhow!("{e}"))?;
    let c = client(cli)?;
    let path = format!("/api/v1/instances/{instance}/exec");
    let ws = match c.websocket(&path).await {
        Ok(ws) => ws,
        // A hub older than sessions: a plain exec still runs there, its output at the end.
        Err(e) if !interactive && !tty && is_status(&e, reqwest::StatusCode::METHOD_NOT_ALLOWED) => {
            #[derive(serde::Serialize)]
            struct Body<'a> {
                argv: &'a [String],
            }
            let r: skiff_hub::ExecResult = c.post(&path, &Body { argv: command }).await?;
            out!("{}", r.stdout);
            eprint!("{}", r.stderr);
            return Ok(r.code);
        }
        Err(e) => return Err(e),
    };
    session(ws, &spec, None).await
}

/// Docker's default detach keys.
pub(super) const DEFAULT_DETACH_KEYS: &str = "ctrl-p,ctrl-q";

/// How `skiff attach` (or `skiff run -it`) attaches.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Attach {
    /// Send no input.
    pub no_stdin: bool,
    /// Show first what the instance wrote before (`run -it`).
    pub replay: bool,
    /// The end of this input closes the instance's stdin (`run -i`).
    pub stdin_once: bool,
}

/// `skiff attach`: a session on the instance's own process (see
/// `skiff_runtime::attach`), shaped by what it was started with (its deployment's `tty`
/// and `stdin_open`). The detach keys end it and leave the instance running.
pub(super) async fn attach(cli: &Cli, instance: &str, how: Attach, detach_keys: &str) -> Result<i32> {
    let Attach { no_stdin, replay, stdin_once } = how;
    let keys = super::cp::DetachKeys::parse(detach_keys).map_err(|e| anyhow::anyhow!("--detach-keys: {e}"))?;
    let c = client(cli)?;
    let all: Vec<InstanceStatus> = c.get("/api/v1/instances").await?;
    let i = all.iter().find(|i| i.name == instance).with_context(|| format!("instance {instance:?} not found"))?;
    let d: DeploymentView = c.get(&format!("/api/v1/deployments/{}", i.deployment)).await?;
    let (tty, stdin) = (d.spec.tty, d.spec.stdin_open && !no_stdin);
    if tty && stdin && !skiff_sys::pty::is_terminal(std::io::stdin()) {
        bail!("the input device is not a TTY: {instance} runs on a terminal; attach from one, or with --no-stdin");
    }
    let (cols, rows) = terminal_size().unwrap_or((0, 0));
    let spec = SessionSpec { tty, stdin, cols, rows, attach: true, replay, stdin_once, ..Default::default() };
    let ws = c.websocket(&format!("/api/v1/instances/{instance}/exec")).await?;
    // Keys are watched for on a terminal only: a pipe's bytes are data.
    session(ws, &spec, (tty && stdin).then_some(keys)).await
}

/// An instance `skiff run -it` waited for.
pub(super) enum Started {
    Running(String),
    /// It ended before it could be attached: its name and exit code.
    Exited(String, i32),
}

/// The first running instance of deployment `name`, waited for (its image may be pulled
/// first) for up to ten minutes; or one that already ended. One that could not start is
/// an error.
pub(super) async fn first_running(cli: &Cli, name: &str) -> Result<Started> {
    let c = client(cli)?;
    let progress = crate::progress::waiting(&format!("waiting for {name} to start"));
    for _ in 0..1200 {
        let d: DeploymentView = c.get(&format!("/api/v1/deployments/{name}")).await?;
        if let Some(i) = d.instances.iter().find(|i| i.state == skiff_model::InstanceState::Running) {
            progress.finish_and_clear();
            return Ok(Started::Running(i.name.clone()));
        }
        if let Some(i) = d.instances.iter().find(|i| i.state == skiff_model::InstanceState::Failed) {
            progress.finish_and_clear();
            bail!("{} failed: {}", i.name, i.message.as_deref().unwrap_or("no reason given"));
        }
        if let Some(i) = d.instances.iter().find(|i| i.state == skiff_model::InstanceState::Exited) {
            progress.finish_and_clear();
            return Ok(Started::Exited(i.name.clone(), i.exit_code.unwrap_or(255)));
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    progress.finish_and_clear();
    bail!("{name} did not start within 10 minutes (skiff describe deployments {name})")
}

/// This terminal's size, from stdout or else stdin.
fn terminal_size() -> Option<(u16, u16)> {
    use skiff_sys::pty;
    pty::size(std::io::stdout()).or_else(|| pty::size(std::io::stdin()))
}

/// Runs one session on an open WebSocket to the hub: output is shown as it comes, input
/// (with `spec.stdin`) and window sizes (with `spec.tty`) go the other way at the same
/// time; the terminal is raw while keys go to a remote one. With `detach`, those keys end
/// the session at once (exit 0) and the remote side runs on.
async fn session(
    ws: tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
    spec: &SessionSpec,
    detach: Option<super::cp::DetachKeys>,
) -> Result<i32> {
    use futures_util::{SinkExt, StreamExt};
    use skiff_model::api::{ExecControl, ExecEnd, EXEC_STDERR, EXEC_STDOUT};
    use skiff_sys::pty;
    use tokio_tungstenite::tungstenite::Message;
    let (tty, interactive) = (spec.tty, spec.stdin);
    // Signals are taken from here on: a resize before the session runs is not lost, and
    // SIGTERM or SIGHUP give the terminal back before the process ends.
    use tokio::signal::unix::{signal, SignalKind};
    let mut winch = signal(SignalKind::window_change())?;
    let (mut term, mut hup) = (signal(SignalKind::terminate())?, signal(SignalKind::hangup())?);
    let (mut to_hub, mut from_hub) = ws.split();
    to_hub.send(Message::Text(serde_json::to_string(spec)?.into())).await?;
    let raw =
        if tty && interactive { pty::RawStdin::enter().context("putting the terminal in raw mode")? } else { None };
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Message>(8);
    let control = |c: &ExecControl| Message::Text(serde_json::to_string(c).unwrap_or_default().into());
    // A channel, not a oneshot: the loop below polls it again after its sender is gone.
    let (detached_tx, mut detached) = tokio::sync::mpsc::channel::<()>(1);
    if interactive {
        super::cp::send_input(std::io::stdin(), tx.clone(), detach.map(|k| (k, detached_tx)));
    }
    if tty {
        let tx = tx.clone();
        tokio::spawn(async move {
            while winch.recv().await.is_some() {
                let Some((cols, rows)) = terminal_size() else {
                    continue;
                };
                if tx.send(control(&ExecControl::Resize { cols, rows })).await.is_err() {
                    return;
                }
            }
        });
    }
    // Kept to end the session after what was queued (detach keys).
    let closer = tx;
    let sender = tokio::spawn(async move {
        while let Some(m) = rx.recv().await {
            let last = matches!(m, Message::Close(_));
            if to_hub.send(m).await.is_err() || last {
                return;
            }
        }
    });
    let (mut stdout, mut stderr) = (std::io::stdout(), std::io::stderr());
    let end = loop {
        // The hub pings every 20 s: a minute of silence is a link gone dead.
        let next = tokio::select! {
            m = tokio::time::timeout(SESSION_SILENCE, from_hub.next()) => m,
            _ = term.recv() => break Err(anyhow::anyhow!("terminated")),
            _ = hup.recv() => break Err(anyhow::anyhow!("the terminal hung up")),
            Some(()) = detached.recv() => {
                // What was typed before the keys goes first; then, as Docker says it, the
                // remote side runs on.
                let wait = std::time::Duration::from_secs(2);
                if let Ok(Ok(())) = tokio::time::timeout(wait, closer.send(Message::Close(None))).await {
                    let _ = tokio::time::timeout(wait, sender).await;
                }
                drop(raw);
                eprintln!("read escape sequence");
                return Ok(0);
            }
        };
        let Ok(next) = next else {
            break Err(anyhow::anyhow!("no word from the hub for {SESSION_SILENCE:?}; the exec's link is gone"));
        };
        match next {
            Some(Ok(Message::Binary(b))) => {
                use std::io::Write;
                let Some((&stream, data)) = b.split_first() else { continue };
                let w: &mut dyn Write = if stream == EXEC_STDERR { &mut stderr } else { &mut stdout };
                if stream != EXEC_STDOUT && stream != EXEC_STDERR {
                    continue;
                }
                if let Err(e) = w.write_all(data).and_then(|()| w.flush()) {
                    if e.kind() == std::io::ErrorKind::BrokenPipe {
                        // The reader went away: as SIGPIPE ends other tools (the command is
                        // ended on the node when this connection closes).
                        drop(raw);
                        return Ok(141);
                    }
                    break Err(anyhow::anyhow!("writing the command's output: {e}"));
                }
            }
            Some(Ok(Message::Text(t))) => {
                break serde_json::from_str::<ExecEnd>(t.as_str()).map_err(anyhow::Error::from)
            }
            Some(Ok(Message::Close(_))) | None => {
                break Err(anyhow::anyhow!("the hub closed the exec before it ended"))
            }
            Some(Err(e)) => break Err(anyhow::anyhow!("the exec's connection: {e}")),
            Some(Ok(_)) => {}
        }
    };
    // The terminal is ours again before anything more is printed.
    drop(raw);
    sender.abort();
    match end? {
        ExecEnd { exit: Some(code), .. } => Ok(code),
        ExecEnd { error: Some(e), .. } => bail!("{e}"),
        ExecEnd { .. } => bail!("the hub ended the exec without saying how"),
    }
}
