//! Imports Kubernetes manifests: `Deployment` (replicas), `DaemonSet` (→ global mode) and
//! `Service` (its ports published on the nodes that run the selected pods, `nodePort` as
//! the host port when set). One container per pod; node selectors, resources, env,
//! command/args and restart policy map over. Fields skiff does not use are warnings
//! naming their path (`Deployment/web.spec.template.spec.volumes`); bad values are
//! errors naming the path.

use crate::ManifestError;
use serde_norway::Value;
use skiff_model::api::AttachAutoscaler;
use skiff_model::job::{ConcurrencyPolicy, JobSpec, Schedule};
use skiff_model::{Deployment, PlacementMode, PortMapping, Protocol, RestartPolicy};
use std::collections::BTreeMap;

/// What a set of manifests turns into.
#[derive(Debug, Clone, PartialEq)]
pub struct K8sImport {
    pub deployments: Vec<Deployment>,
    pub warnings: Vec<String>,
    /// HorizontalPodAutoscalers whose Deployment is not in these manifests (the hub may
    /// have it).
    pub autoscalers: Vec<AttachAutoscaler>,
    /// The Services of these manifests, for the hub to keep (see [`import_k8s_with`]).
    pub services: Vec<skiff_model::api::KeptService>,
}

type R<T> = Result<T, ManifestError>;

/// Whether `text` looks like Kubernetes manifests (`apiVersion` and `kind` at the top).
pub fn is_k8s(text: &str) -> bool {
    serde_norway::Deserializer::from_str(text).any(|doc| {
        <Value as serde::Deserialize>::deserialize(doc)
            .ok()
            .and_then(|v| v.as_mapping().map(|m| m.contains_key("apiVersion") && m.contains_key("kind")))
            .unwrap_or(false)
    })
}

fn get<'a>(v: &'a Value, key: &str) -> Option<&'a Value> {
    v.as_mapping().and_then(|m| m.get(key))
}

fn string(v: &Value, path: &str) -> R<String> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Number(n) => Ok(n.to_string()),
        Value::Bool(b) => Ok(b.to_string()),
        _ => Err(ManifestError::at(path, "must be a string")),
    }
}

fn strings(v: &Value, path: &str) -> R<Vec<String>> {
    let Value::Sequence(s) = v else { return Err(ManifestError::at(path, "must be a list of strings")) };
    s.iter().enumerate().map(|(i, x)| string(x, &format!("{path}[{i}]"))).collect()
}

pub(crate) fn map_of_strings(v: &Value, path: &str) -> R<BTreeMap<String, String>> {
    if v.is_null() {
        return Ok(BTreeMap::new()); // `nodeSelector:` with nothing under it
    }
    let m = v.as_mapping().ok_or_else(|| ManifestError::at(path, "must be a mapping"))?;
    let mut out = BTreeMap::new();
    for (k, x) in m {
        let k = string(k, path)?;
        out.insert(k.clone(), string(x, &format!("{path}.{k}"))?);
    }
    Ok(out)
}

/// The string at `v.key`, which must be there; errors name `path.key`.
fn required(v: &Value, key: &str, path: &str) -> R<String> {
    get(v, key)
        .map(|x| string(x, &format!("{path}.{key}")))
        .transpose()?
        .ok_or_else(|| ManifestError::at(format!("{path}.{key}"), "is required"))
}

fn port(v: &Value, path: &str) -> R<u16> {
    let n = v.as_u64().ok_or_else(|| ManifestError::at(path, "must be a port number"))?;
    u16::try_from(n)
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| ManifestError::at(path, format!("{n} is not a port (1-65535)")))
}

/// Warns about every key of `v` not in `known`.
fn unknown(v: &Value, known: &[&str], path: &str, warnings: &mut Vec<String>) {
    if let Some(m) = v.as_mapping() {
        for k in m.keys().filter_map(Value::as_str) {
            if !known.contains(&k) {
                warnings.push(format!("{path}.{k}: not supported yet, ignored"));
            }
        }
    }
}

struct Service {
    path: String,
    name: String,
    stack: String,
    selector: BTreeMap<String, String>,
    ports: Vec<(Value, String)>,
    /// NodePort and LoadBalancer: published on the nodes too.
    publish: bool,
    /// Kept by the hub from an earlier apply: it selects workloads of these files only,
    /// and none is no error.
    kept: bool,
}

/// Kinds that configure a cluster rather than run workloads: skipped with a warning.
const NOT_ACTED_ON: &[&str] = &[
    "ServiceAccount",
    "Role",
    "RoleBinding",
    "ClusterRole",
    "ClusterRoleBinding",
    "PodDisruptionBudget",
    "NetworkPolicy",
    "Ingress",
    "IngressClass",
    "Namespace",
    "ResourceQuota",
    "LimitRange",
    "PriorityClass",
    "CustomResourceDefinition",
    "PodSecurityPolicy",
    "StorageClass",
    "PersistentVolume",
    "CSIDriver",
    "CSINode",
    "ValidatingWebhookConfiguration",
    "MutatingWebhookConfiguration",
    "APIService",
];

/// Whether a document is a custom resource: its API group is a domain outside
/// Kubernetes' own (`cert-manager.io/v1`, not `apps/v1` or `networking.k8s.io/v1`).
fn is_custom(v: &Value) -> bool {
    let api = get(v, "apiVersion").and_then(Value::as_str).unwrap_or_default();
    match api.rsplit_once('/') {
        Some((group, _)) => group.contains('.') && !group.ends_with(".k8s.io") && group != "k8s.io",
        None => false,
    }
}

/// Imports every document of `text`. `namespace` names the stack when a manifest has none.
pub fn import_k8s(text: &str, namespace: &str) -> R<K8sImport> {
    import_k8s_files(&[("", text)], namespace)
}

/// Imports the documents of several files as one set, as kubectl reads them: a Service
/// or an autoscaler in one selects a Deployment in another. With more than one file,
/// errors and warnings start with the file's name (and count documents within it).
pub fn import_k8s_files(files: &[(&str, &str)], namespace: &str) -> R<K8sImport> {
    import_k8s_beside(files, namespace, &[])
}

/// [`import_k8s_files`] beside the deployments already `stored`: a Service that selects
/// no workload of these files selects stored ones of its namespace by their pods' labels
/// (as kubectl applies a Service on its own); those come out changed, to apply again.
pub fn import_k8s_beside(files: &[(&str, &str)], namespace: &str, stored: &[Deployment]) -> R<K8sImport> {
    import_k8s_with(files, namespace, stored, &[])
}

/// [`import_k8s_beside`] with the Services the hub `kept` from earlier applies: each
/// selects the workloads of these files as if it were in them (kubectl applies a Service
/// on its own, and it selects pods made later). A Service of these files that selects
/// nothing yet is no error: it is returned in `services`, as every Service is, for the
/// hub to keep.
pub fn import_k8s_with(
    files: &[(&str, &str)],
    namespace: &str,
    stored: &[Deployment],
    kept: &[skiff_model::api::KeptService],
) -> R<K8sImport> {
    let mut out = K8sImport { deployments: vec![], warnings: vec![], autoscalers: vec![], services: vec![] };
    let mut pod_labels: Vec<BTreeMap<String, String>> = vec![];
    let mut named_ports: Vec<BTreeMap<String, u16>> = vec![];
    let mut paths: Vec<String> = vec![];
    let mut services: Vec<Service> = vec![];
    let docs = files.iter().flat_map(|(file, text)| {
        serde_norway::Deserializer::from_str(text).enumerate().map(move |(n, doc)| (*file, n, doc))
    });
    let mut parsed = vec![];
    for (file, n, doc) in docs {
        let at = |p: String| if files.len() > 1 { format!("{file}: {p}") } else { p };
        let v = <Value as serde::Deserialize>::deserialize(doc).map_err(|e| ManifestError::Yaml(at(e.to_string())))?;
        if !v.is_null() {
            parsed.push((file, n, v));
        }
    }
    let objects = Objects::read(&parsed, files.len() > 1)?;
    for (file, n, v) in parsed {
        let at = |p: String| if files.len() > 1 { format!("{file}: {p}") } else { p };
        let kind = get(&v, "kind").and_then(Value::as_str).unwrap_or_default().to_string();
        let name = get(&v, "metadata")
            .and_then(|m| get(m, "name"))
            .and_then(Value::as_str)
            .ok_or_else(|| ManifestError::at(at(format!("document {}", n + 1)), "metadata.name is required"))?
            .to_string();
        let path = at(format!("{kind}/{name}"));
        let stack = get(&v, "metadata")
            .and_then(|m| get(m, "namespace"))
            .and_then(Value::as_str)
            .unwrap_or(namespace)
            .to_string();
        match kind.as_str() {
            "Deployment" | "DaemonSet" | "StatefulSet" | "ReplicaSet" | "ReplicationController" | "Pod" | "Job"
            | "CronJob" => {
                if let Some(i) = out.deployments.iter().position(|d| d.name == name) {
                    return Err(ManifestError::at(&path, format!("{name:?} is defined already, by {}", paths[i])));
                }
                for (d, labels, named) in workload(&v, &kind, &name, &stack, &path, &objects, &mut out.warnings)? {
                    let at = match &d.pod_of {
                        Some(_) => format!("{path} (container {})", &d.name[name.len() + 1..]),
                        None => path.clone(),
                    };
                    if let Some(i) = out.deployments.iter().position(|x| x.name == d.name) {
                        return Err(ManifestError::at(&at, format!("{:?} is defined already, by {}", d.name, paths[i])));
                    }
                    out.deployments.push(d);
                    pod_labels.push(labels);
                    named_ports.push(named);
                    paths.push(at);
                }
            }
            "Service" => {
                let spec = get(&v, "spec").ok_or_else(|| ManifestError::at(&path, "spec is required"))?;
                unknown(spec, &["selector", "ports", "type", "clusterIP"], &format!("{path}.spec"), &mut out.warnings);
                let kind = get(spec, "type").and_then(Value::as_str).unwrap_or("ClusterIP");
                // A ClusterIP service is a fleet service only (its name and ports reach
                // the pods from any node); the others publish on the nodes too.
                let publish = match kind {
                    "NodePort" | "LoadBalancer" => true,
                    "ClusterIP" => false,
                    other => {
                        return Err(ManifestError::at(
                            format!("{path}.spec.type"),
                            format!("{other:?} is not supported (ClusterIP, NodePort, LoadBalancer)"),
                        ))
                    }
                };
                let selector = match get(spec, "selector") {
                    Some(s) => map_of_strings(s, &format!("{path}.spec.selector"))?,
                    None => return Err(ManifestError::at(format!("{path}.spec.selector"), "is required")),
                };
                let ports = match get(spec, "ports") {
                    Some(Value::Sequence(p)) => {
                        p.iter().enumerate().map(|(i, x)| (x.clone(), format!("{path}.spec.ports[{i}]"))).collect()
                    }
                    _ => return Err(ManifestError::at(format!("{path}.spec.ports"), "must be a list")),
                };
                // What selecting takes, not annotations and the like (a bounded record).
                let mut trimmed = serde_norway::Mapping::new();
                for k in ["apiVersion", "kind"] {
                    if let Some(x) = get(&v, k) {
                        trimmed.insert(k.into(), x.clone());
                    }
                }
                let mut meta = serde_norway::Mapping::new();
                meta.insert("name".into(), name.clone().into());
                meta.insert("namespace".into(), stack.clone().into());
                trimmed.insert("metadata".into(), Value::Mapping(meta));
                let mut keep_spec = serde_norway::Mapping::new();
                for k in ["type", "selector", "ports"] {
                    if let Some(x) = get(spec, k) {
                        keep_spec.insert(k.into(), x.clone());
                    }
                }
                trimmed.insert("spec".into(), Value::Mapping(keep_spec));
                let document = serde_norway::to_string(&Value::Mapping(trimmed))
                    .map_err(|e| ManifestError::at(&path, e.to_string()))?;
                let keep = skiff_model::api::KeptService { name: name.clone(), stack: stack.clone(), document };
                keep.check().map_err(|e| ManifestError::at(&path, e.to_string()))?;
                out.services.push(keep);
                services.push(Service { path, name, stack: stack.clone(), selector, ports, publish, kept: false });
            }
            // A claim is the named volume of its name on each node that mounts it.
            "PersistentVolumeClaim" => out.warnings.push(format!(
                "{path}: a named volume {name:?} on each node that runs a pod mounting it; its storage class, size \
                 and access modes are not enforced"
            )),
            // Read before the workloads, which take what they use of them.
            "ConfigMap" | "Secret" => {
                if !objects.was_used(kind == "Secret", &name) {
                    out.warnings.push(format!("{path}: used by no workload in these manifests, skipped"));
                }
            }
            "HorizontalPodAutoscaler" => {
                let spec = get(&v, "spec").ok_or_else(|| ManifestError::at(&path, "spec is required"))?;
                let sp = format!("{path}.spec");
                // Per-container metrics: a pod here is one container, but a ContainerResource
                // names the container, which is not kept.
                let types: Vec<&str> = match get(spec, "metrics") {
                    Some(Value::Sequence(l)) => {
                        l.iter().filter_map(|m| get(m, "type").and_then(Value::as_str)).collect()
                    }
                    _ => vec![],
                };
                if types.contains(&"ContainerResource") {
                    out.warnings.push(format!(
                        "{path}: ContainerResource metrics are not supported yet (Resource, Pods, Object or External); \
                         this autoscaler is not applied"
                    ));
                    continue;
                }
                let target = crate::hpa::target(spec, &sp)?;
                out.autoscalers.push(AttachAutoscaler { spec: crate::hpa::spec(spec, &sp)?, target, path });
            }
            "" => return Err(ManifestError::at(at(format!("document {}", n + 1)), "kind is required")),
            // Access control, disruption budgets, network policy, ingress and the like
            // configure a Kubernetes cluster, not the workloads: kubectl applies each
            // object on its own, so these are reported and the rest imported.
            k if NOT_ACTED_ON.contains(&k) => {
                out.warnings.push(format!("{path}: kind {k} is not acted on by skiff, skipped"));
            }
            // A custom resource of another project (its API group is not Kubernetes' own).
            _ if is_custom(&v) => {
                let api = get(&v, "apiVersion").and_then(Value::as_str).unwrap_or_default();
                out.warnings.push(format!("{path}: custom resource ({api}) is not acted on by skiff, skipped"));
            }
            other => {
                return Err(ManifestError::at(
                    path,
                    format!(
                    "kind {other:?} is not supported (Deployment, DaemonSet, StatefulSet, ReplicaSet, ReplicationController, Pod, Job, CronJob, \
                         Service, HorizontalPodAutoscaler, PersistentVolumeClaim, ConfigMap, Secret)"
                ),
                ))
            }
        }
    }
    // The kept ones these files do not hold again, as if they were in them.
    let in_files: Vec<(String, String)> = services.iter().map(|s| (s.name.clone(), s.stack.clone())).collect();
    let mut warnings_kept = vec![];
    for k in kept.iter().filter(|k| !in_files.contains(&(k.name.clone(), k.stack.clone()))) {
        let from = format!("Service {}/{} (kept)", k.stack, k.name);
        let Ok(v) = serde_norway::from_str::<Value>(&k.document) else {
            warnings_kept.push(format!("{from}: its record does not parse; not applied"));
            continue;
        };
        let (Some(spec), Some(sel)) = (get(&v, "spec"), get(&v, "spec").and_then(|s| get(s, "selector"))) else {
            continue;
        };
        let publish = matches!(get(spec, "type").and_then(Value::as_str), Some("NodePort" | "LoadBalancer"));
        let path = from.clone();
        let ports = match get(spec, "ports") {
            Some(Value::Sequence(p)) => {
                p.iter().enumerate().map(|(i, x)| (x.clone(), format!("{path}.spec.ports[{i}]"))).collect()
            }
            _ => continue,
        };
        let Ok(selector) = map_of_strings(sel, &format!("{path}.spec.selector")) else { continue };
        services.push(Service {
            path,
            name: k.name.clone(),
            stack: k.stack.clone(),
            selector,
            ports,
            publish,
            kept: true,
        });
    }
    for s in services {
        let selects = |l: &BTreeMap<String, String>| {
            !s.selector.is_empty() && s.selector.iter().all(|(k, v)| l.get(k) == Some(v))
        };
        let mut targets: Vec<usize> = pod_labels
            .iter()
            .enumerate()
            .filter(|(i, l)| selects(l) && out.deployments[*i].stack == s.stack)
            .map(|(i, _)| i)
            .collect();
        if targets.is_empty() && !s.kept {
            for d in stored.iter().filter(|d| d.stack == s.stack && d.pod_of.is_none() && selects(&d.pod_labels)) {
                let at = match out.deployments.iter().position(|x| x.name == d.name) {
                    Some(at) => at,
                    None => {
                        out.deployments.push(d.clone());
                        pod_labels.push(d.pod_labels.clone());
                        named_ports.push(BTreeMap::new());
                        paths.push(format!("deployment {} (stored)", d.name));
                        out.deployments.len() - 1
                    }
                };
                targets.push(at);
            }
        }
        if targets.is_empty() {
            if !s.kept {
                out.warnings.push(format!(
                    "{}: selects no workload of these manifests nor a stored one yet; kept, it reaches the \
                     workloads it selects when they are applied",
                    s.path
                ));
            }
            continue;
        }
        // A kept Service's problem (a port the new workload does not name) is said, and
        // changes nothing; one of these files' is an error.
        let before = s.kept.then(|| out.deployments.clone());
        let applied = (|| -> R<()> {
            for (p, path) in &s.ports {
                unknown(p, &["port", "targetPort", "nodePort", "protocol", "name"], path, &mut out.warnings);
                let svc_port = port(
                    get(p, "port").ok_or_else(|| ManifestError::at(format!("{path}.port"), "is required"))?,
                    &format!("{path}.port"),
                )?;
                // By number, or by the name of a container port of every selected workload.
                let target_of = |i: usize, workload: &str| -> R<u16> {
                    match get(p, "targetPort") {
                        Some(Value::String(n)) => named_ports[i].get(n).copied().ok_or_else(|| {
                            ManifestError::at(
                                format!("{path}.targetPort"),
                                format!("{n:?} names no container port of {workload}"),
                            )
                        }),
                        Some(t) => port(t, &format!("{path}.targetPort")),
                        None => Ok(svc_port),
                    }
                };
                let host = match get(p, "nodePort") {
                    Some(n) => port(n, &format!("{path}.nodePort"))?,
                    None => svc_port,
                };
                let protocol = match get(p, "protocol").and_then(Value::as_str).unwrap_or("TCP") {
                    "TCP" => Protocol::Tcp,
                    "UDP" => Protocol::Udp,
                    o => return Err(ManifestError::at(format!("{path}.protocol"), format!("{o:?} is not TCP or UDP"))),
                };
                for &i in &targets {
                    if out.deployments[i].network == skiff_model::NetworkMode::Host {
                        let w = format!(
                            "{path}: {} is on its nodes' own network (hostNetwork): reached at the node's address, \
                             not through this Service",
                            out.deployments[i].name
                        );
                        if !out.warnings.contains(&w) {
                            out.warnings.push(w);
                        }
                        continue;
                    }
                    let target = target_of(i, &out.deployments[i].name)?;
                    let d = &mut out.deployments[i];
                    let published = PortMapping { host_ip: None, host_port: host, container_port: target, protocol };
                    if s.publish && !d.ports.contains(&published) {
                        d.ports.push(published);
                    }
                    match d.expose.iter().find(|e| e.is(svc_port, protocol)) {
                        None => d.expose.push(skiff_model::mesh::ServicePort { port: svc_port, target, protocol }),
                        // One address per deployment: a port means one target port, whichever
                        // of its Services is called.
                        Some(e) if e.target != target => out.warnings.push(format!(
                            "{path}: port {svc_port} of {} already reaches its port {}; this Service's {svc_port} -> \
                             {target} does not",
                            d.name, e.target
                        )),
                        Some(_) => {}
                    }
                    if s.name != d.name && !d.aliases.contains(&s.name) {
                        d.aliases.push(s.name.clone());
                    }
                }
            }
            Ok(())
        })();
        if let Err(e) = applied {
            match before {
                Some(b) => {
                    out.deployments = b;
                    out.warnings.push(format!("{e}; this kept Service is not applied"));
                }
                None => return Err(e),
            }
        }
    }
    // Autoscalers of Deployments in these manifests go onto them.
    let mut external = vec![];
    for a in std::mem::take(&mut out.autoscalers) {
        match out.deployments.iter_mut().find(|d| d.name == a.target) {
            Some(d) if d.autoscale.is_some() => {
                return Err(ManifestError::at(
                    format!("{}.spec.scaleTargetRef", a.path),
                    format!("Deployment {:?} already has an autoscaler", a.target),
                ))
            }
            // A Pods metric of a workload nobody scrapes (a prometheus-adapter setup, say):
            // the workload runs unscaled, said so, rather than not at all.
            Some(d) if d.scrape.is_none() && a.spec.metrics.iter().any(|m| m.kind.as_deref() == Some("Pods")) => {
                out.warnings.push(format!(
                    "{}: a Pods metric is read from the workload's own metrics, and Deployment {:?} has no \
                     prometheus.io/scrape annotation; this autoscaler is not applied",
                    a.path, a.target
                ));
            }
            Some(d) => d.autoscale = Some(a.spec),
            None => external.push(a),
        }
    }
    out.autoscalers = external;
    out.warnings.extend(objects.missing.take());
    out.warnings.extend(warnings_kept);
    for (d, path) in out.deployments.iter().zip(&paths) {
        d.validate().map_err(|e| ManifestError::at(path, e.to_string()))?;
    }
    Ok(out)
}

/// A workload imported: the deployment, its pods' labels (what Services select), and its
/// container ports by name (what a Service's `targetPort` may name).
type Workload = (Deployment, BTreeMap<String, String>, BTreeMap<String, u16>);

fn workload(
    v: &Value,
    kind: &str,
    name: &str,
    stack: &str,
    path: &str,
    objects: &Objects,
    warnings: &mut Vec<String>,
) -> R<Vec<Workload>> {
    // A Pod is its own template (one instance); the controllers hold one in spec.template,
    // a CronJob in spec.jobTemplate.spec.template.
    let (spec, sp, cron) = match kind {
        "Pod" => (&Value::Null, path.to_string(), None),
        "CronJob" => {
            let cron = get(v, "spec").ok_or_else(|| ManifestError::at(format!("{path}.spec"), "is required"))?;
            let jp = format!("{path}.spec.jobTemplate.spec");
            let js = get(cron, "jobTemplate")
                .and_then(|t| get(t, "spec"))
                .ok_or_else(|| ManifestError::at(&jp, "is required"))?;
            (js, jp, Some(cron))
        }
        _ => {
            let spec = get(v, "spec").ok_or_else(|| ManifestError::at(format!("{path}.spec"), "is required"))?;
            (spec, format!("{path}.spec"), None)
        }
    };
    let known: &[&str] = match kind {
        "Job" | "CronJob" => &[
            "completions",
            "parallelism",
            "backoffLimit",
            "activeDeadlineSeconds",
            "ttlSecondsAfterFinished",
            "template",
            "selector",
            "suspend",
        ],
        "StatefulSet" => &[
            "replicas",
            "selector",
            "template",
            "updateStrategy",
            "minReadySeconds",
            "serviceName",
            "podManagementPolicy",
            "volumeClaimTemplates",
            "revisionHistoryLimit",
        ],
        _ => &["replicas", "selector", "template", "strategy", "updateStrategy", "minReadySeconds"],
    };
    let (tpl, tp) = if kind == "Pod" {
        (v, path.to_string())
    } else {
        unknown(spec, known, &sp, warnings);
        let tpl = get(spec, "template").ok_or_else(|| ManifestError::at(format!("{sp}.template"), "is required"))?;
        (tpl, format!("{sp}.template"))
    };
    let labels = match get(tpl, "metadata").and_then(|m| get(m, "labels")) {
        Some(l) => map_of_strings(l, &format!("{tp}.metadata.labels"))?,
        None => BTreeMap::new(),
    };
    let pod = get(tpl, "spec").ok_or_else(|| ManifestError::at(format!("{tp}.spec"), "is required"))?;
    let pp = format!("{tp}.spec");
    unknown(
        pod,
        &[
            "containers",
            "nodeSelector",
            "restartPolicy",
            "terminationGracePeriodSeconds",
            "runtimeClassName",
            "hostAliases",
            "dnsConfig",
            "securityContext",
            "volumes",
            "hostNetwork",
        ],
        &pp,
        warnings,
    );
    let containers = match get(pod, "containers") {
        Some(Value::Sequence(c)) if !c.is_empty() => c,
        _ => return Err(ManifestError::at(format!("{pp}.containers"), "must list at least one container")),
    };
    // A pod of several containers (they share its network and emptyDirs).
    let shared = containers.len() > 1;
    // What the pod's containers have in common, then each one's own.
    let mut base = Deployment::new(name, "");
    base.stack = stack.to_string();
    base.pod_labels = labels.clone();
    base.labels = get(v, "metadata")
        .and_then(|m| get(m, "labels"))
        .map(|l| map_of_strings(l, &format!("{path}.metadata.labels")))
        .transpose()?
        .unwrap_or_default();
    pod_options(&mut base, pod, &pp, warnings)?;
    // The node's own network: its ports are the node's (no Service publishes them).
    let host_network = boolean(pod, "hostNetwork", &pp)?;
    if host_network {
        base.network = skiff_model::NetworkMode::Host;
    }
    if let Some(ns) = get(pod, "nodeSelector") {
        base.placement.node_selector = map_of_strings(ns, &format!("{pp}.nodeSelector"))?;
    }
    // A RuntimeClass names the handler: `wasmtime` (or `wasm`) runs the pod's image as a
    // WASI program, as runwasi's classes do.
    if let Some(rc) = get(pod, "runtimeClassName") {
        let rp = format!("{pp}.runtimeClassName");
        base.runtime = crate::runtime_named(&string(rc, &rp)?, &rp)?;
    }
    base.restart = match get(pod, "restartPolicy").and_then(Value::as_str).unwrap_or("Always") {
        "Always" => RestartPolicy::Always,
        "OnFailure" => RestartPolicy::OnFailure { max_retries: None },
        "Never" => RestartPolicy::No,
        o => {
            return Err(ManifestError::at(
                format!("{pp}.restartPolicy"),
                format!("{o:?} is not Always, OnFailure or Never"),
            ))
        }
    };
    if let Some(g) = get(pod, "terminationGracePeriodSeconds") {
        let s = g.as_u64().ok_or_else(|| {
            ManifestError::at(format!("{pp}.terminationGracePeriodSeconds"), "must be a number of seconds")
        })?;
        base.stop_grace_period_ms = s * 1000;
    }
    if kind == "Job" || kind == "CronJob" {
        if shared {
            return Err(ManifestError::at(
                format!("{pp}.containers"),
                "a Job's pod of several containers is not supported (one container runs to completion)",
            ));
        }
        let job = job_spec(spec, &sp, cron, &format!("{path}.spec"), warnings)?;
        // Both retry the pod where it is (Never makes a new pod in Kubernetes), up to the
        // backoff limit.
        base.restart =
            match base.restart {
                RestartPolicy::Always => return Err(ManifestError::at(
                    format!("{pp}.restartPolicy"),
                    "a Job's pods run to completion: OnFailure or Never (Always is the default only for other kinds)",
                )),
                _ => RestartPolicy::OnFailure { max_retries: Some(job.backoff_limit) },
            };
        base.replicas = job.completions;
        base.job = Some(job);
    } else if kind == "DaemonSet" {
        base.placement.mode = PlacementMode::Global;
        if get(spec, "replicas").is_some() {
            return Err(ManifestError::at(
                format!("{path}.spec.replicas"),
                "a DaemonSet runs one per matching node; replicas does not apply",
            ));
        }
    } else if let Some(r) = get(spec, "replicas") {
        let n = r.as_i64().ok_or_else(|| ManifestError::at(format!("{path}.spec.replicas"), "must be a number"))?;
        base.replicas = u32::try_from(n)
            .map_err(|_| ManifestError::at(format!("{path}.spec.replicas"), format!("{n} must be 0 or more")))?;
    }
    if base.job.is_none() {
        strategy(&mut base, spec, &format!("{path}.spec"), warnings)?;
    }
    if kind == "StatefulSet" {
        if shared {
            return Err(ManifestError::at(
                format!("{pp}.containers"),
                "a StatefulSet's pod of several containers is not supported yet (one container per pod)",
            ));
        }
        stateful(&mut base, spec, &sp)?;
    }
    let claims = if kind == "StatefulSet" { claim_templates(spec, &sp, warnings)? } else { vec![] };
    // A pod of several containers: the first is the deployment of the workload's name
    // (what Services, autoscalers and `skiff scale` address); each other one a deployment
    // `NAME-CONTAINER` beside each of its instances, in its network, with its volumes.
    if shared && base.runtime != skiff_model::RuntimeKind::Oci {
        return Err(ManifestError::at(
            format!("{pp}.runtimeClassName"),
            "a pod of several containers runs under runc here (its containers share one network namespace)",
        ));
    }
    // How many of the pod's containers mount each volume.
    let mut mounted_by: BTreeMap<String, usize> = BTreeMap::new();
    for c in containers {
        if let Some(Value::Sequence(m)) = get(c, "volumeMounts") {
            let names: std::collections::BTreeSet<&str> =
                m.iter().filter_map(|x| get(x, "name").and_then(Value::as_str)).collect();
            for n in names {
                *mounted_by.entry(n.to_string()).or_default() += 1;
            }
        }
    }
    let mut out: Vec<Workload> = vec![];
    let mut all_ports = vec![];
    let mut all_named = BTreeMap::new();
    for (i, c) in containers.iter().enumerate() {
        let cp = format!("{pp}.containers[{i}]");
        let mut d = base.clone();
        d.image = required(c, "image", &cp)?;
        if i > 0 {
            let own = required(c, "name", &cp)?;
            d.name = format!("{name}-{own}");
            skiff_model::validate::check_name("name", &d.name).map_err(|e| {
                ManifestError::at(format!("{cp}.name"), format!("{}: the deployment of this container", e.problem))
            })?;
            d.pod_of = Some(name.to_string());
            d.placement.mode = PlacementMode::Replicated;
            // In the first's network: what that network has (hosts, DNS, its sysctls) is
            // the first's.
            if !host_network {
                d.network = skiff_model::NetworkMode::Service;
                d.network_service = Some(name.to_string());
                d.extra_hosts.clear();
                d.dns = Default::default();
                d.hostname = None;
                d.sysctls.retain(|k, _| !k.starts_with("net."));
            }
            // Services select the first only.
            d.pod_labels.clear();
        }
        // Warnings about what the containers share are said once.
        let mut said = vec![];
        let (named, ports) = container(&mut d, c, &cp, objects, &mut said)?;
        volumes(&mut d, pod, c, &claims, shared.then_some(&mounted_by), &pp, &cp, objects, &mut said)?;
        // On the host's network a port is the node's own: `hostPort` names it again.
        if host_network {
            for p in std::mem::take(&mut d.ports) {
                if p.host_port != p.container_port {
                    return Err(ManifestError::at(
                        format!("{cp}.ports"),
                        format!(
                            "hostPort {} differs from containerPort {}: on the host's network they are one",
                            p.host_port, p.container_port
                        ),
                    ));
                }
            }
        }
        // One network: a container's host ports are published at the first's address.
        if i > 0 {
            let host_ports = std::mem::take(&mut d.ports);
            for p in host_ports {
                if !out[0].0.ports.contains(&p) {
                    out[0].0.ports.push(p);
                }
            }
        }
        for w in said {
            if !warnings.contains(&w) {
                warnings.push(w);
            }
        }
        all_ports.extend(ports);
        all_named.extend(named);
        // Only the first is selected by Services: the others are reached through its address.
        out.push((d, if i == 0 { labels.clone() } else { BTreeMap::new() }, BTreeMap::new()));
    }
    // Prometheus' annotations on the pod: where agents read its own metrics (any of its
    // containers' ports, in the one network they share).
    if let Some(a) = get(tpl, "metadata").and_then(|m| get(m, "annotations")) {
        let ap = format!("{tp}.metadata.annotations");
        out[0].0.scrape = skiff_model::metrics::Scrape::from_annotations(&map_of_strings(a, &ap)?, &all_ports)
            .map_err(|(k, e)| ManifestError::at(format!("{ap}.{k}"), e))?;
    }
    out[0].2 = all_named;
    Ok(out)
}

/// One container of a pod onto its deployment: command, environment, resources, probe
/// and ports. Returns its container ports by name and all of them.
fn container(
    d: &mut Deployment,
    containers: &Value,
    cp: &str,
    objects: &Objects,
    warnings: &mut Vec<String>,
) -> R<(BTreeMap<String, u16>, Vec<u16>)> {
    unknown(
        containers,
        &[
            "name",
            "image",
            "command",
            "args",
            "env",
            "envFrom",
            "ports",
            "resources",
            "workingDir",
            "tty",
            "stdin",
            "volumeMounts",
            "readinessProbe",
        ],
        cp,
        warnings,
    );
    if let Some(c) = get(containers, "command") {
        d.entrypoint = Some(strings(c, &format!("{cp}.command"))?);
    }
    if let Some(a) = get(containers, "args") {
        d.command = Some(strings(a, &format!("{cp}.args"))?);
    }
    for (key, field) in [("tty", &mut d.tty), ("stdin", &mut d.stdin_open)] {
        if let Some(b) = get(containers, key) {
            *field = b.as_bool().ok_or_else(|| ManifestError::at(format!("{cp}.{key}"), "must be true or false"))?;
        }
    }
    if let Some(p) = get(containers, "readinessProbe") {
        d.healthcheck = readiness(p, &format!("{cp}.readinessProbe"), warnings)?;
    }
    if let Some(w) = get(containers, "workingDir") {
        d.working_dir = Some(string(w, &format!("{cp}.workingDir"))?);
    }
    if let Some(Value::Sequence(env)) = get(containers, "env") {
        for (i, e) in env.iter().enumerate() {
            let ep = format!("{cp}.env[{i}]");
            unknown(e, &["name", "value", "valueFrom"], &ep, warnings);
            let k = required(e, "name", &ep)?;
            if let Some(from) = get(e, "valueFrom") {
                let fp = format!("{ep}.valueFrom");
                let (secret, r) = match (get(from, "configMapKeyRef"), get(from, "secretKeyRef")) {
                    (Some(r), _) => (false, r),
                    (_, Some(r)) => (true, r),
                    _ => {
                        warnings.push(format!("{fp}: only configMapKeyRef and secretKeyRef are supported; not set"));
                        continue;
                    }
                };
                let rp = format!("{fp}.{}", if secret { "secretKeyRef" } else { "configMapKeyRef" });
                let (obj, key) = (required(r, "name", &rp)?, required(r, "key", &rp)?);
                let optional = get(r, "optional").and_then(Value::as_bool).unwrap_or(false);
                let Some(data) = objects.take(secret, &obj, optional, &rp)? else { continue };
                match data.get(&key) {
                    Some(v) => {
                        let text = String::from_utf8(v.clone())
                            .map_err(|_| ManifestError::at(format!("{rp}.key"), format!("{key:?} is not text")))?;
                        d.env.insert(k.clone(), text);
                        if secret && !d.secret_env.contains(&k) {
                            d.secret_env.push(k);
                        }
                    }
                    None if optional => {}
                    None => return Err(ManifestError::at(format!("{rp}.key"), format!("{obj} has no key {key:?}"))),
                }
                continue;
            }
            let val = get(e, "value").map(|x| string(x, &format!("{ep}.value"))).transpose()?.unwrap_or_default();
            d.env.insert(k, val);
        }
    }
    if let Some(Value::Sequence(from)) = get(containers, "envFrom") {
        for (i, e) in from.iter().enumerate() {
            let ep = format!("{cp}.envFrom[{i}]");
            unknown(e, &["configMapRef", "secretRef", "prefix"], &ep, warnings);
            let (secret, r, rp) = match (get(e, "configMapRef"), get(e, "secretRef")) {
                (Some(r), _) => (false, r, format!("{ep}.configMapRef")),
                (_, Some(r)) => (true, r, format!("{ep}.secretRef")),
                _ => return Err(ManifestError::at(ep, "needs configMapRef or secretRef")),
            };
            let obj = required(r, "name", &rp)?;
            let optional = get(r, "optional").and_then(Value::as_bool).unwrap_or(false);
            let prefix = get(e, "prefix").map(|p| string(p, &format!("{ep}.prefix"))).transpose()?.unwrap_or_default();
            let Some(data) = objects.take(secret, &obj, optional, &rp)? else { continue };
            for (k, v) in data {
                // As Kubernetes: keys that are no variable name are skipped; `env` wins.
                let Ok(text) = String::from_utf8(v.clone()) else { continue };
                let name = format!("{prefix}{k}");
                if d.env.contains_key(&name) {
                    continue;
                }
                d.env.insert(name.clone(), text);
                if secret {
                    d.secret_env.push(name);
                }
            }
        }
    }
    if let Some(r) = get(containers, "resources") {
        let rp = format!("{cp}.resources");
        unknown(r, &["limits", "requests"], &rp, warnings);
        for (section, reservation) in [("limits", false), ("requests", true)] {
            let Some(sv) = get(r, section) else { continue };
            let sp = format!("{rp}.{section}");
            // Extended resources (`nvidia.com/gpu: 1`) are CDI kinds; Kubernetes wants
            // requests equal to limits for them, so limits decide.
            let extended: Vec<&str> = sv
                .as_mapping()
                .map(|m| m.keys().filter_map(Value::as_str).filter(|k| k.contains('/')).collect())
                .unwrap_or_default();
            let mut known = vec!["cpu", "memory"];
            known.extend(&extended);
            unknown(sv, &known, &sp, warnings);
            for kind in extended.iter().filter(|_| !reservation) {
                let kp = format!("{sp}.{kind}");
                let n = get(sv, kind).map(|x| string(x, &kp)).transpose()?.unwrap_or_default();
                let count = n
                    .parse::<u32>()
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or_else(|| ManifestError::at(&kp, format!("{n:?} is not a whole number of devices")))?;
                let r = skiff_model::DeviceRequest { kind: kind.to_string(), ids: vec![], count };
                r.check().map_err(|e| ManifestError::at(&kp, e))?;
                d.device_requests.push(r);
            }
            if let Some(c) = get(sv, "cpu") {
                let s = string(c, &format!("{sp}.cpu"))?;
                let m =
                    skiff_model::parse_cpus(&s).map_err(|e| ManifestError::at(format!("{sp}.cpu"), e.to_string()))?;
                if reservation {
                    d.resources.cpus_reservation_millis = Some(m)
                } else {
                    d.resources.cpus_millis = Some(m)
                }
            }
            if let Some(mv) = get(sv, "memory") {
                let s = string(mv, &format!("{sp}.memory"))?;
                // Kubernetes' quantities: `128M` is 128·10⁶ bytes, `128Mi` 128·2²⁰.
                let b = skiff_model::autoscale::milli_value(&s)
                    .ok()
                    .filter(|m| *m > 0)
                    .map(|m| (m as u64).div_ceil(1000))
                    .ok_or_else(|| ManifestError::at(format!("{sp}.memory"), format!("{s:?} is not a size")))?;
                if reservation {
                    d.resources.memory_reservation_bytes = Some(b)
                } else {
                    d.resources.memory_bytes = Some(b)
                }
            }
        }
    }
    // Ports by name, for a Service's `targetPort: NAME`.
    let mut named = BTreeMap::new();
    let mut container_ports = vec![];
    if let Some(Value::Sequence(ports)) = get(containers, "ports") {
        for (i, p) in ports.iter().enumerate() {
            // Container ports only document what listens; publishing is the Service's job
            // (or `hostPort`, which publishes on the node as Kubernetes does).
            let pp = format!("{cp}.ports[{i}]");
            unknown(p, &["containerPort", "hostPort", "protocol", "name"], &pp, warnings);
            if let Some(c) = get(p, "containerPort") {
                let c = port(c, &format!("{pp}.containerPort"))?;
                container_ports.push(c);
                if let Some(n) = get(p, "name").and_then(Value::as_str) {
                    named.insert(n.to_string(), c);
                }
            }
            if let Some(h) = get(p, "hostPort") {
                let cport = get(p, "containerPort")
                    .ok_or_else(|| ManifestError::at(format!("{pp}.containerPort"), "is required"))?;
                let protocol = if get(p, "protocol").and_then(Value::as_str) == Some("UDP") {
                    Protocol::Udp
                } else {
                    Protocol::Tcp
                };
                d.ports.push(PortMapping {
                    host_ip: None,
                    host_port: port(h, &format!("{pp}.hostPort"))?,
                    container_port: port(cport, &format!("{pp}.containerPort"))?,
                    protocol,
                });
            }
        }
    }
    Ok((named, container_ports))
}

/// A container's `readinessProbe` as the health check that decides its readiness (an
/// unhealthy instance gets no traffic and holds updates and ordered starts, and is not
/// restarted for it, as Kubernetes treats readiness). `exec` probes only: the others
/// are warned about.
fn readiness(p: &Value, path: &str, warnings: &mut Vec<String>) -> R<Option<skiff_model::HealthCheck>> {
    unknown(
        p,
        &[
            "exec",
            "httpGet",
            "tcpSocket",
            "grpc",
            "initialDelaySeconds",
            "periodSeconds",
            "timeoutSeconds",
            "failureThreshold",
            "successThreshold",
        ],
        path,
        warnings,
    );
    let Some(exec) = get(p, "exec") else {
        warnings.push(format!("{path}: only exec probes are supported yet; not checked"));
        return Ok(None);
    };
    let test = get(exec, "command")
        .map(|c| strings(c, &format!("{path}.exec.command")))
        .transpose()?
        .filter(|c| !c.is_empty())
        .ok_or_else(|| ManifestError::at(format!("{path}.exec.command"), "is required"))?;
    let secs = |key: &str, default: u64, min: u64| -> R<u64> {
        match get(p, key) {
            None => Ok(default),
            Some(v) => v.as_u64().filter(|n| *n >= min).ok_or_else(|| {
                ManifestError::at(format!("{path}.{key}"), format!("must be a whole number, at least {min}"))
            }),
        }
    };
    if secs("successThreshold", 1, 1)? != 1 {
        warnings.push(format!("{path}.successThreshold: one success makes it ready here"));
    }
    Ok(Some(skiff_model::HealthCheck {
        test,
        shell: false,
        interval_ms: secs("periodSeconds", 10, 1)? * 1000,
        timeout_ms: secs("timeoutSeconds", 1, 1)? * 1000,
        retries: u32::try_from(secs("failureThreshold", 3, 1)?).unwrap_or(u32::MAX),
        start_period_ms: secs("initialDelaySeconds", 0, 0)? * 1000,
    }))
}

/// A StatefulSet's own settings: its governing service, how its pods start, and its
/// updates (one pod at a time from the highest, stopped before its replacement starts).
fn stateful(d: &mut Deployment, spec: &Value, sp: &str) -> R<()> {
    use skiff_model::rollout::IntOrPercent;
    use skiff_model::stateful::{PodManagement, Stateful};
    let service = get(spec, "serviceName").map(|s| string(s, &format!("{sp}.serviceName"))).transpose()?;
    let pod_management = match get(spec, "podManagementPolicy")
        .map(|p| string(p, &format!("{sp}.podManagementPolicy")))
        .transpose()?
        .as_deref()
    {
        None | Some("OrderedReady") => PodManagement::OrderedReady,
        Some("Parallel") => PodManagement::Parallel,
        Some(o) => {
            return Err(ManifestError::at(
                format!("{sp}.podManagementPolicy"),
                format!("{o:?} is not OrderedReady or Parallel"),
            ))
        }
    };
    d.stateful = Some(Stateful { service: service.filter(|s| !s.is_empty()), pod_management });
    // Kubernetes' StatefulSet: no surge; `maxUnavailable` (1 unless given) at a time.
    let given =
        get(spec, "updateStrategy").and_then(|u| get(u, "rollingUpdate")).and_then(|r| get(r, "maxUnavailable"));
    d.update.max_surge = IntOrPercent::Int(0);
    if given.is_none() {
        d.update.max_unavailable = IntOrPercent::Int(1);
    }
    // Across a fleet, one node's instances at a time (each node replaces its own from
    // the highest, one at a time), rather than waves that double.
    d.update.wave_growth = 1;
    Ok(())
}

/// The claim templates of a StatefulSet: each becomes a volume of every instance's own.
fn claim_templates(spec: &Value, sp: &str, warnings: &mut Vec<String>) -> R<Vec<String>> {
    let Some(list) = get(spec, "volumeClaimTemplates") else { return Ok(vec![]) };
    let Value::Sequence(list) = list else {
        return Err(ManifestError::at(format!("{sp}.volumeClaimTemplates"), "must be a list"));
    };
    let mut out = vec![];
    for (i, c) in list.iter().enumerate() {
        let cp = format!("{sp}.volumeClaimTemplates[{i}]");
        let name = get(c, "metadata")
            .map(|m| required(m, "name", &format!("{cp}.metadata")))
            .transpose()?
            .ok_or_else(|| ManifestError::at(format!("{cp}.metadata.name"), "is required"))?;
        skiff_model::validate::check_volume_name(&format!("{cp}.metadata.name"), &name)
            .map_err(|e| ManifestError::at(format!("{cp}.metadata.name"), e.problem))?;
        warnings.push(format!(
            "{cp}: a named volume \"{name}-POD\" of each pod's own on the node that runs it; its storage class, size \
             and access modes are not enforced"
        ));
        out.push(name);
    }
    Ok(out)
}

/// `v.key` as a boolean (false when absent).
fn boolean(v: &Value, key: &str, path: &str) -> R<bool> {
    match get(v, key) {
        None => Ok(false),
        Some(b) => b.as_bool().ok_or_else(|| ManifestError::at(format!("{path}.{key}"), "must be true or false")),
    }
}

/// A Job's `spec` (at `jp`), with a CronJob's own `spec` (`cron`, at `cp`) around it.
fn job_spec(js: &Value, jp: &str, cron: Option<&Value>, cp: &str, warnings: &mut Vec<String>) -> R<JobSpec> {
    let num = |v: &Value, key: &str, p: &str| -> R<Option<u64>> {
        get(v, key)
            .map(|x| x.as_u64().ok_or_else(|| ManifestError::at(format!("{p}.{key}"), "must be a number, 0 or more")))
            .transpose()
    };
    let small = |v: Option<u64>, key: &str| -> R<Option<u32>> {
        v.map(|n| u32::try_from(n).map_err(|_| ManifestError::at(format!("{jp}.{key}"), "is too large"))).transpose()
    };
    let parallelism = small(num(js, "parallelism", jp)?, "parallelism")?;
    if parallelism == Some(0) {
        return Err(ManifestError::at(format!("{jp}.parallelism"), "0 (a paused job) is not supported"));
    }
    let completions = match (small(num(js, "completions", jp)?, "completions")?, parallelism) {
        (Some(c), _) => c,
        // A work queue: each of the parallel pods must succeed here.
        (None, Some(p)) if p > 1 => {
            warnings.push(format!("{jp}.completions: not set (a work queue): runs as {p} completions"));
            p
        }
        (None, _) => 1,
    };
    let mut job = JobSpec {
        completions,
        // Kubernetes never runs more at once than remain to complete.
        parallelism: parallelism.unwrap_or(1).clamp(1, completions.max(1)),
        backoff_limit: small(num(js, "backoffLimit", jp)?, "backoffLimit")?.unwrap_or(6),
        active_deadline_seconds: num(js, "activeDeadlineSeconds", jp)?,
        ttl_seconds_after_finished: num(js, "ttlSecondsAfterFinished", jp)?,
        schedule: None,
    };
    if let Some(c) = cron {
        unknown(
            c,
            &[
                "schedule",
                "timeZone",
                "concurrencyPolicy",
                "startingDeadlineSeconds",
                "suspend",
                "jobTemplate",
                "successfulJobsHistoryLimit",
                "failedJobsHistoryLimit",
            ],
            cp,
            warnings,
        );
        for k in ["successfulJobsHistoryLimit", "failedJobsHistoryLimit"] {
            if get(c, k).is_some() {
                warnings.push(format!("{cp}.{k}: the last run's instances are kept until the next run"));
            }
        }
        if job.ttl_seconds_after_finished.take().is_some() {
            warnings.push(format!("{jp}.ttlSecondsAfterFinished: a run is kept until the next run"));
        }
        let policy = match get(c, "concurrencyPolicy").map(|p| string(p, &format!("{cp}.concurrencyPolicy"))) {
            None => ConcurrencyPolicy::Allow,
            Some(p) => match p?.as_str() {
                "Allow" => ConcurrencyPolicy::Allow,
                "Forbid" => ConcurrencyPolicy::Forbid,
                "Replace" => ConcurrencyPolicy::Replace,
                o => {
                    return Err(ManifestError::at(
                        format!("{cp}.concurrencyPolicy"),
                        format!("{o:?} is not Allow, Forbid or Replace"),
                    ))
                }
            },
        };
        if policy == ConcurrencyPolicy::Allow {
            warnings.push(format!(
                "{cp}.concurrencyPolicy: Allow runs no two runs at once on skiff (a time while one runs is skipped, as Forbid)"
            ));
        }
        let schedule = Schedule {
            cron: required(c, "schedule", cp)?,
            time_zone: get(c, "timeZone").map(|z| string(z, &format!("{cp}.timeZone"))).transpose()?,
            concurrency_policy: policy,
            starting_deadline_seconds: num(c, "startingDeadlineSeconds", cp)?,
            suspend: boolean(c, "suspend", cp)?,
        };
        if let Err(e) = schedule.parsed() {
            let key = if e.contains("time zone") { "timeZone" } else { "schedule" };
            return Err(ManifestError::at(format!("{cp}.{key}"), e));
        }
        job.schedule = Some(schedule);
    } else if boolean(js, "suspend", jp)? {
        return Err(ManifestError::at(format!("{jp}.suspend"), "a suspended Job is not supported"));
    }
    Ok(job)
}

/// `strategy` (Deployment) or `updateStrategy` (DaemonSet), with Kubernetes' defaults of
/// 25% / 25%, and `minReadySeconds` as the time a new instance must stay ready.
fn strategy(d: &mut Deployment, spec: &Value, path: &str, warnings: &mut Vec<String>) -> R<()> {
    use skiff_model::rollout::{IntOrPercent, Strategy};
    d.update.max_surge = IntOrPercent::Percent(25);
    d.update.max_unavailable = IntOrPercent::Percent(25);
    if let Some(m) = get(spec, "minReadySeconds") {
        let s = m.as_u64().ok_or_else(|| ManifestError::at(format!("{path}.minReadySeconds"), "must be a number"))?;
        d.update.monitor_ms = s * 1000;
    }
    let key = if get(spec, "updateStrategy").is_some() { "updateStrategy" } else { "strategy" };
    let Some(st) = get(spec, key) else { return Ok(()) };
    let sp = format!("{path}.{key}");
    unknown(st, &["type", "rollingUpdate"], &sp, warnings);
    match get(st, "type").map(|t| string(t, &format!("{sp}.type"))).transpose()?.as_deref() {
        None | Some("RollingUpdate") => d.update.strategy = Strategy::Rolling,
        Some("Recreate") if key == "strategy" => d.update.strategy = Strategy::Recreate,
        Some("OnDelete") => return Err(ManifestError::at(format!("{sp}.type"), "OnDelete is not supported")),
        Some(o) => {
            return Err(ManifestError::at(format!("{sp}.type"), format!("{o:?} is not RollingUpdate or Recreate")))
        }
    }
    let Some(ru) = get(st, "rollingUpdate") else { return Ok(()) };
    let rp = format!("{sp}.rollingUpdate");
    unknown(ru, &["maxSurge", "maxUnavailable"], &rp, warnings);
    for (k, field) in [("maxSurge", &mut d.update.max_surge), ("maxUnavailable", &mut d.update.max_unavailable)] {
        if let Some(v) = get(ru, k) {
            let s = string(v, &format!("{rp}.{k}"))?;
            *field = IntOrPercent::parse(&s).map_err(|e| ManifestError::at(format!("{rp}.{k}"), e))?;
        }
    }
    d.update.check().map_err(|(field, problem)| {
        let k = if field == "max_surge" { "maxSurge" } else { "maxUnavailable" };
        ManifestError::at(format!("{rp}.{k}"), problem)
    })?;
    Ok(())
}

/// The files of a `configMap` or `secret` volume (`c`): every key, or its `items`, with
/// `defaultMode` (0644) or an item's `mode`. `None`: the object is not in the manifests.
fn object_files(
    c: &Value,
    secret: bool,
    vp: &str,
    objects: &Objects,
) -> R<Option<Vec<skiff_model::options::MountedFile>>> {
    use skiff_model::options::MountedFile;
    let cp = format!("{vp}.{}", if secret { "secret" } else { "configMap" });
    let name_key = if secret { "secretName" } else { "name" };
    let obj = required(c, name_key, &cp)?;
    let optional = get(c, "optional").and_then(Value::as_bool).unwrap_or(false);
    // Kubernetes reads YAML 1.1, where `0600` is octal; the parser here keeps such a
    // value as the text it is.
    let mode = |x: Option<&Value>, p: &str| -> R<Option<u32>> {
        x.map(|m| {
            string(m, p)
                .ok()
                .and_then(|t| crate::file_mode(&t))
                .ok_or_else(|| ManifestError::at(p, "must be a file mode (0 to 0777)"))
        })
        .transpose()
    };
    let default_mode = mode(get(c, "defaultMode"), &format!("{cp}.defaultMode"))?.unwrap_or(0o644);
    let Some(data) = objects.take(secret, &obj, optional, &cp)? else { return Ok(None) };
    let Some(Value::Sequence(items)) = get(c, "items") else {
        return Ok(Some(data.iter().map(|(k, content)| MountedFile::new(k.clone(), content, default_mode)).collect()));
    };
    let mut files = vec![];
    for (j, it) in items.iter().enumerate() {
        let ip = format!("{cp}.items[{j}]");
        let text = |key: &str| get(it, key).map(|k| string(k, &format!("{ip}.{key}"))).transpose();
        let (key, path) = (text("key")?.unwrap_or_default(), text("path")?.unwrap_or_default());
        let m = mode(get(it, "mode"), &format!("{ip}.mode"))?.unwrap_or(default_mode);
        match data.get(&key) {
            Some(content) => files.push(MountedFile::new(path, content, m)),
            None if optional => {}
            None => return Err(ManifestError::at(format!("{ip}.key"), format!("{obj} has no key {key:?}"))),
        }
    }
    Ok(Some(files))
}

/// The ConfigMaps and Secrets of the manifests, by (is a Secret, name): each key's
/// content. Workloads take what they use; what none used is warned about.
struct Objects {
    by: BTreeMap<(bool, String), BTreeMap<String, Vec<u8>>>,
    used: std::cell::RefCell<std::collections::BTreeSet<(bool, String)>>,
    /// Warnings for references to objects these manifests do not hold.
    missing: std::cell::RefCell<Vec<String>>,
}

impl Objects {
    fn read(docs: &[(&str, usize, Value)], many_files: bool) -> R<Objects> {
        use base64::Engine;
        let mut by = BTreeMap::new();
        for (file, _, v) in docs {
            let kind = get(v, "kind").and_then(Value::as_str).unwrap_or_default();
            let secret = match kind {
                "ConfigMap" => false,
                "Secret" => true,
                _ => continue,
            };
            let Some(name) = get(v, "metadata").and_then(|m| get(m, "name")).and_then(Value::as_str) else { continue };
            let path = if many_files { format!("{file}: {kind}/{name}") } else { format!("{kind}/{name}") };
            let mut data = BTreeMap::new();
            // Plain text: a ConfigMap's `data`, a Secret's `stringData`; base64: a
            // ConfigMap's `binaryData`, a Secret's `data`.
            let (plain, encoded) = if secret { ("stringData", "data") } else { ("data", "binaryData") };
            if let Some(m) = get(v, encoded) {
                for (k, x) in map_of_strings(m, &format!("{path}.{encoded}"))? {
                    let bytes = base64::engine::general_purpose::STANDARD
                        .decode(x.trim())
                        .map_err(|_| ManifestError::at(format!("{path}.{encoded}.{k}"), "is not base64"))?;
                    data.insert(k, bytes);
                }
            }
            if let Some(m) = get(v, plain) {
                for (k, x) in map_of_strings(m, &format!("{path}.{plain}"))? {
                    data.insert(k, x.into_bytes());
                }
            }
            if by.insert((secret, name.to_string()), data).is_some() {
                return Err(ManifestError::at(path, "is defined twice"));
            }
        }
        Ok(Objects { by, used: Default::default(), missing: Default::default() })
    }

    /// The content of a ConfigMap (or Secret) a workload refers to at `path`; `None` when
    /// these manifests do not hold it (said as a warning unless it is optional: skiff
    /// keeps no objects besides the manifests', so what it would give is not given).
    fn take(&self, secret: bool, name: &str, optional: bool, path: &str) -> R<Option<BTreeMap<String, Vec<u8>>>> {
        let key = (secret, name.to_string());
        match self.by.get(&key) {
            Some(d) => {
                self.used.borrow_mut().insert(key);
                Ok(Some(d.clone()))
            }
            None => {
                if !optional {
                    let kind = if secret { "Secret" } else { "ConfigMap" };
                    self.missing.borrow_mut().push(format!(
                        "{path}: {kind} {name:?} is not in these manifests (apply it with them); not given"
                    ));
                }
                Ok(None)
            }
        }
    }

    fn was_used(&self, secret: bool, name: &str) -> bool {
        self.used.borrow().contains(&(secret, name.to_string()))
    }
}

/// A pod's volumes as its container mounts them: a `persistentVolumeClaim` is the named
/// volume of the claim's name on the node, `hostPath` a bind mount, `emptyDir` a volume of
/// the instance's own (`medium: Memory`: a tmpfs). Others are warned about and not mounted.
#[allow(clippy::too_many_arguments)]
fn volumes(
    d: &mut Deployment,
    pod: &Value,
    container: &Value,
    claims: &[String],
    shared: Option<&BTreeMap<String, usize>>,
    pp: &str,
    cp: &str,
    objects: &Objects,
    warnings: &mut Vec<String>,
) -> R<()> {
    use skiff_model::{Tmpfs, Volume, VolumeSource};
    let mut sources: BTreeMap<String, (Option<VolumeSource>, Option<u64>)> = BTreeMap::new();
    let mut given: BTreeMap<String, (Vec<skiff_model::options::MountedFile>, bool)> = BTreeMap::new();
    if let Some(Value::Sequence(list)) = get(pod, "volumes") {
        for (i, v) in list.iter().enumerate() {
            let vp = format!("{pp}.volumes[{i}]");
            let name = required(v, "name", &vp)?;
            let source = if let Some(c) = get(v, "persistentVolumeClaim") {
                let claim = required(c, "claimName", &format!("{vp}.persistentVolumeClaim"))?;
                (Some(VolumeSource::Named { name: claim }), None)
            } else if let Some(h) = get(v, "hostPath") {
                let path = required(h, "path", &format!("{vp}.hostPath"))?;
                (Some(VolumeSource::Bind { path }), None)
            } else if let Some((secret, c)) =
                get(v, "configMap").map(|c| (false, c)).or(get(v, "secret").map(|c| (true, c)))
            {
                if let Some(files) = object_files(c, secret, &vp, objects)? {
                    given.insert(name, (files, secret));
                }
                continue;
            } else if let Some(e) = get(v, "emptyDir") {
                match get(e, "medium").and_then(Value::as_str) {
                    Some("Memory") => {
                        let size = match get(e, "sizeLimit") {
                            Some(s) => {
                                let text = string(s, &format!("{vp}.emptyDir.sizeLimit"))?;
                                let m = skiff_model::autoscale::milli_value(&text).ok().filter(|m| *m > 0).ok_or_else(
                                    || {
                                        ManifestError::at(
                                            format!("{vp}.emptyDir.sizeLimit"),
                                            format!("{text:?} is not a size"),
                                        )
                                    },
                                )?;
                                Some((m as u64).div_ceil(1000))
                            }
                            None => None,
                        };
                        if shared.is_some_and(|m| m.get(&name).is_some_and(|n| *n > 1)) {
                            warnings.push(format!(
                                "{vp}: a memory emptyDir is a tmpfs of each container's own here, not shared \
                                 between the pod's containers"
                            ));
                        }
                        (None, Some(size.unwrap_or(0)))
                    }
                    // Shared by the pod's containers, or the one container's own.
                    _ if shared.is_some() => (Some(VolumeSource::Pod { name: name.clone() }), None),
                    _ => (Some(VolumeSource::Anonymous), None),
                }
            } else {
                let kind = v.as_mapping().and_then(|m| m.keys().filter_map(Value::as_str).find(|k| *k != "name"));
                warnings.push(format!("{vp}: {} volumes are not supported yet; not mounted", kind.unwrap_or("these")));
                continue;
            };
            sources.insert(name, source);
        }
    }
    // A claim template's name mounts each pod's own volume; it takes the place of a pod
    // volume of that name, as the StatefulSet controller's `updateStorage` does.
    for c in claims {
        given.remove(c);
        sources.insert(c.clone(), (Some(VolumeSource::Claim { name: c.clone() }), None));
    }
    let Some(Value::Sequence(mounts)) = get(container, "volumeMounts") else { return Ok(()) };
    for (i, m) in mounts.iter().enumerate() {
        let mp = format!("{cp}.volumeMounts[{i}]");
        unknown(m, &["name", "mountPath", "readOnly", "subPath"], &mp, warnings);
        let (name, target) = (required(m, "name", &mp)?, required(m, "mountPath", &mp)?);
        let read_only = get(m, "readOnly").and_then(Value::as_bool).unwrap_or(false);
        // `subPath`: one file of a ConfigMap or Secret at mountPath (the usual way to put a
        // config file beside an image's others), or a directory below a hostPath.
        let sub = get(m, "subPath").map(|x| string(x, &format!("{mp}.subPath"))).transpose()?;
        let sp = format!("{mp}.subPath");
        if let Some(s) = &sub {
            if s.is_empty() || s.starts_with('/') || s.split('/').any(|p| p.is_empty() || p == "..") {
                return Err(ManifestError::at(sp, format!("{s:?} is not a relative path without ..")));
            }
        }
        if let Some((files, secret)) = given.get(&name) {
            let files = match &sub {
                None => files.clone(),
                Some(s) => match files.iter().find(|f| &f.path == s) {
                    Some(f) => vec![skiff_model::options::MountedFile { path: String::new(), ..f.clone() }],
                    None => return Err(ManifestError::at(sp, format!("{s:?} is not a file of volume {name:?}"))),
                },
            };
            d.files.push(skiff_model::options::FileMount { target, files, secret: *secret });
            continue;
        }
        match (sources.get(&name), &sub) {
            (Some((Some(VolumeSource::Bind { path }), _)), Some(s)) => {
                let source = VolumeSource::Bind { path: format!("{}/{s}", path.trim_end_matches('/')) };
                d.volumes.push(Volume { source, target, read_only });
            }
            (Some(_), Some(_)) => {
                return Err(ManifestError::at(sp, "is supported on configMap, secret and hostPath volumes only"))
            }
            (s, _) => match s {
                Some((Some(source), _)) => d.volumes.push(Volume { source: source.clone(), target, read_only }),
                Some((None, size)) => {
                    d.tmpfs.push(Tmpfs { target, size_bytes: size.filter(|s| *s > 0), mode: None });
                }
                None if get(pod, "volumes").is_some_and(|v| {
                    v.as_sequence()
                        .is_some_and(|l| l.iter().any(|x| get(x, "name").and_then(Value::as_str) == Some(&name)))
                }) => {} // warned about above
                None => {
                    return Err(ManifestError::at(format!("{mp}.name"), format!("{name:?} is not a volume of the pod")))
                }
            },
        }
    }
    Ok(())
}

/// A pod's `hostAliases` (lines of /etc/hosts), `dnsConfig` (its own name servers, search
/// domains and options) and `securityContext.sysctls`.
fn pod_options(d: &mut Deployment, pod: &Value, pp: &str, warnings: &mut Vec<String>) -> R<()> {
    if let Some(Value::Sequence(aliases)) = get(pod, "hostAliases") {
        for (i, a) in aliases.iter().enumerate() {
            let ap = format!("{pp}.hostAliases[{i}]");
            unknown(a, &["ip", "hostnames"], &ap, warnings);
            let ip = get(a, "ip").map(|x| string(x, &format!("{ap}.ip"))).transpose()?.unwrap_or_default();
            let names = get(a, "hostnames").map(|h| strings(h, &format!("{ap}.hostnames"))).transpose()?;
            for host in names.unwrap_or_default() {
                d.extra_hosts.push(skiff_model::options::ExtraHost { host, ip: ip.clone() });
            }
        }
    }
    if let Some(dc) = get(pod, "dnsConfig") {
        let dp = format!("{pp}.dnsConfig");
        unknown(dc, &["nameservers", "searches", "options"], &dp, warnings);
        if let Some(n) = get(dc, "nameservers") {
            d.dns.servers = strings(n, &format!("{dp}.nameservers"))?;
        }
        if let Some(sv) = get(dc, "searches") {
            d.dns.search = strings(sv, &format!("{dp}.searches"))?;
        }
        if let Some(Value::Sequence(opts)) = get(dc, "options") {
            for (i, o) in opts.iter().enumerate() {
                let op = format!("{dp}.options[{i}]");
                let name = get(o, "name").map(|x| string(x, &format!("{op}.name"))).transpose()?.unwrap_or_default();
                match get(o, "value").map(|x| string(x, &format!("{op}.value"))).transpose()? {
                    Some(v) => d.dns.options.push(format!("{name}:{v}")),
                    None => d.dns.options.push(name),
                }
            }
        }
    }
    if let Some(sc) = get(pod, "securityContext") {
        let sp = format!("{pp}.securityContext");
        unknown(sc, &["sysctls"], &sp, warnings);
        if let Some(Value::Sequence(list)) = get(sc, "sysctls") {
            for (i, x) in list.iter().enumerate() {
                let xp = format!("{sp}.sysctls[{i}]");
                let name = required(x, "name", &xp)?;
                let value = get(x, "value").map(|v| string(v, &format!("{xp}.value"))).transpose()?.unwrap_or_default();
                d.sysctls.insert(name, value);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use skiff_model::VolumeSource;

    #[test]
    fn jobs_and_cron_jobs_become_run_to_completion_deployments() {
        let m = r#"
apiVersion: batch/v1
kind: Job
metadata: {name: migrate}
spec:
  completions: 3
  parallelism: 5
  backoffLimit: 2
  activeDeadlineSeconds: 600
  ttlSecondsAfterFinished: 60
  template:
    spec:
      restartPolicy: Never
      containers: [{name: m, image: "tool:1", command: [migrate]}]
---
apiVersion: batch/v1
kind: CronJob
metadata: {name: upload}
spec:
  schedule: "30 2 * * *"
  timeZone: Europe/Berlin
  concurrencyPolicy: Replace
  startingDeadlineSeconds: 300
  successfulJobsHistoryLimit: 3
  jobTemplate:
    spec:
      template:
        spec:
          restartPolicy: OnFailure
          containers: [{name: u, image: "up:1"}]
"#;
        let i = import_k8s(m, "edge").unwrap();
        let job = i.deployments.iter().find(|d| d.name == "migrate").unwrap();
        let j = job.job.as_ref().unwrap();
        assert_eq!((j.completions, j.parallelism, j.backoff_limit), (3, 3, 2), "parallelism capped at completions");
        assert_eq!((j.active_deadline_seconds, j.ttl_seconds_after_finished), (Some(600), Some(60)));
        assert_eq!((job.replicas, job.restart), (3, RestartPolicy::OnFailure { max_retries: Some(2) }));
        let cron = i.deployments.iter().find(|d| d.name == "upload").unwrap();
        let s = cron.job.as_ref().unwrap().schedule.as_ref().unwrap();
        assert_eq!((s.cron.as_str(), s.time_zone.as_deref()), ("30 2 * * *", Some("Europe/Berlin")));
        assert_eq!((s.concurrency_policy, s.starting_deadline_seconds), (ConcurrencyPolicy::Replace, Some(300)));
        assert!(i.warnings.iter().any(|w| w.contains("successfulJobsHistoryLimit")), "{:?}", i.warnings);
        for d in &i.deployments {
            d.validate().unwrap();
        }
        let bad = |from: &str, to: &str| import_k8s(&m.replace(from, to), "edge").unwrap_err().to_string();
        assert_eq!(
            bad("restartPolicy: Never", "restartPolicy: Always"),
            "Job/migrate.spec.template.spec.restartPolicy: a Job's pods run to completion: OnFailure or Never (Always is the default only for other kinds)"
        );
        assert_eq!(
            bad("concurrencyPolicy: Replace", "concurrencyPolicy: Sometimes"),
            "CronJob/upload.spec.concurrencyPolicy: \"Sometimes\" is not Allow, Forbid or Replace"
        );
        assert!(bad("30 2 * * *", "at night")
            .starts_with("CronJob/upload.spec.schedule: \"at night\" is not a cron pattern"));
        assert_eq!(
            bad("timeZone: Europe/Berlin", "timeZone: Moon/Base"),
            "CronJob/upload.spec.timeZone: \"Moon/Base\" is not an IANA time zone"
        );
        assert_eq!(
            bad("startingDeadlineSeconds: 300", "suspend: sometimes"),
            "CronJob/upload.spec.suspend: must be true or false"
        );
        assert_eq!(
            bad("parallelism: 5", "parallelism: 0"),
            "Job/migrate.spec.parallelism: 0 (a paused job) is not supported"
        );
    }

    #[test]
    fn pods_replication_controllers_claims_and_volumes() {
        let m = r#"
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: data}
spec: {accessModes: [ReadWriteOnce], resources: {requests: {storage: 1Gi}}}
---
apiVersion: v1
kind: PersistentVolume
metadata: {name: pv}
spec: {capacity: {storage: 1Gi}}
---
apiVersion: v1
kind: Pod
metadata: {name: db, labels: {app: db}}
spec:
  restartPolicy: OnFailure
  volumes:
  - {name: data, persistentVolumeClaim: {claimName: data}}
  - {name: host, hostPath: {path: /srv/logs}}
  - {name: scratch, emptyDir: {}}
  - {name: fast, emptyDir: {medium: Memory, sizeLimit: 64Mi}}
  - {name: nfs, nfs: {server: x, path: /}}
  containers:
  - name: db
    image: db
    volumeMounts:
    - {name: data, mountPath: /var/lib/db}
    - {name: host, mountPath: /logs, readOnly: true}
    - {name: scratch, mountPath: /tmp/s}
    - {name: fast, mountPath: /cache}
    - {name: nfs, mountPath: /nfs}
---
apiVersion: v1
kind: ReplicationController
metadata: {name: web}
spec:
  replicas: 2
  selector: {app: web}
  template:
    metadata: {labels: {app: web}}
    spec:
      nodeSelector:
      containers: [{name: web, image: web}]
"#;
        let i = import_k8s(m, "default").unwrap();
        let db = &i.deployments[0];
        assert_eq!((db.name.as_str(), db.replicas), ("db", 1));
        assert_eq!(db.restart, RestartPolicy::OnFailure { max_retries: None });
        let v: Vec<(&VolumeSource, &str, bool)> =
            db.volumes.iter().map(|v| (&v.source, v.target.as_str(), v.read_only)).collect();
        assert_eq!(
            v,
            [
                (&VolumeSource::Named { name: "data".into() }, "/var/lib/db", false),
                (&VolumeSource::Bind { path: "/srv/logs".into() }, "/logs", true),
                (&VolumeSource::Anonymous, "/tmp/s", false),
            ]
        );
        assert_eq!(db.tmpfs[0].target, "/cache");
        assert_eq!(db.tmpfs[0].size_bytes, Some(64 << 20));
        let web = &i.deployments[1];
        assert_eq!((web.name.as_str(), web.replicas), ("web", 2));
        let said = i.warnings.join("\n");
        assert!(said.contains("PersistentVolumeClaim/data: a named volume"), "{said}");
        assert!(said.contains("PersistentVolume/pv: kind PersistentVolume is not acted on"), "{said}");
        assert!(said.contains("Pod/db.spec.volumes[4]: nfs volumes are not supported yet"), "{said}");
        let bad = m.replace("- {name: nfs, mountPath: /nfs}", "- {name: nope, mountPath: /nfs}");
        let e = import_k8s(&bad, "default").unwrap_err().to_string();
        assert!(
            e.contains("Pod/db.spec.containers[0].volumeMounts[4].name: \"nope\" is not a volume of the pod"),
            "{e}"
        );
    }

    #[test]
    #[allow(clippy::type_complexity)]
    fn config_maps_and_secrets_give_variables_and_files() {
        let m = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  template:
    metadata: {labels: {app: web}}
    spec:
      volumes:
      - {name: conf, configMap: {name: web-conf, items: [{key: nginx.conf, path: conf.d/site.conf, mode: 0600}]}}
      - {name: all, configMap: {name: web-conf, defaultMode: 0640}}
      - {name: tls, secret: {secretName: web-tls}}
      - {name: gone, configMap: {name: elsewhere}}
      containers:
      - name: web
        image: web
        env:
        - {name: MODE, valueFrom: {configMapKeyRef: {name: web-conf, key: mode}}}
        - {name: PASS, valueFrom: {secretKeyRef: {name: web-tls, key: password}}}
        - {name: OPT, valueFrom: {secretKeyRef: {name: nope, key: x, optional: true}}}
        - {name: POD, valueFrom: {fieldRef: {fieldPath: metadata.name}}}
        envFrom: [{configMapRef: {name: web-conf}, prefix: CFG_}]
        volumeMounts:
        - {name: conf, mountPath: /etc/nginx}
        - {name: all, mountPath: /etc/all}
        - {name: tls, mountPath: /etc/tls, readOnly: true}
        - {name: gone, mountPath: /etc/gone}
        - {name: all, mountPath: /etc/nginx/nginx.conf, subPath: nginx.conf}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: web-conf}
data: {mode: edge, nginx.conf: "server {}"}
---
apiVersion: v1
kind: Secret
metadata: {name: web-tls}
data: {password: c2VjcmV0}
stringData: {key.pem: PEM}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: unused}
data: {a: b}
"#;
        let i = import_k8s(m, "default").unwrap();
        let d = &i.deployments[0];
        assert_eq!(d.env["MODE"], "edge");
        assert_eq!(d.env["PASS"], "secret");
        assert_eq!(d.env["CFG_mode"], "edge");
        assert!(!d.env.contains_key("OPT") && !d.env.contains_key("POD"));
        assert_eq!(d.secret_env, ["PASS"]);
        let f: Vec<(&str, Vec<(&str, String, u32)>, bool)> = d
            .files
            .iter()
            .map(|m| {
                let files = m
                    .files
                    .iter()
                    .map(|f| (f.path.as_str(), String::from_utf8(f.content().unwrap()).unwrap(), f.mode))
                    .collect();
                (m.target.as_str(), files, m.secret)
            })
            .collect();
        assert_eq!(
            f,
            [
                ("/etc/nginx", vec![("conf.d/site.conf", "server {}".to_string(), 0o600)], false),
                ("/etc/all", vec![("mode", "edge".into(), 0o640), ("nginx.conf", "server {}".into(), 0o640)], false),
                ("/etc/tls", vec![("key.pem", "PEM".into(), 0o644), ("password", "secret".into(), 0o644)], true),
                ("/etc/nginx/nginx.conf", vec![("", "server {}".into(), 0o640)], false),
            ]
        );
        let said = i.warnings.join("\n");
        assert!(said.contains("ConfigMap/unused: used by no workload"), "{said}");
        assert!(said.contains("volumes[3].configMap: ConfigMap \"elsewhere\" is not in these manifests"), "{said}");
        assert!(said.contains("env[3].valueFrom: only configMapKeyRef and secretKeyRef"), "{said}");
        assert!(!said.contains("nope"), "an optional one is not warned about: {said}");
        // Readers never see a secret's content.
        let shown = serde_norway::to_string(&d.clone().redacted()).unwrap();
        assert!(
            !shown.contains("c2VjcmV0") && !shown.contains("PASS: secret") && shown.contains("<redacted>"),
            "{shown}"
        );
        let bad = m.replace("key: nginx.conf", "key: missing.conf");
        let e = import_k8s(&bad, "default").unwrap_err().to_string();
        assert!(e.contains("volumes[0].configMap.items[0].key: web-conf has no key \"missing.conf\""), "{e}");
    }

    #[test]
    fn a_service_on_its_own_selects_stored_deployments_of_its_namespace() {
        let app = import_k8s(APP, "default").unwrap();
        let web = app.deployments.iter().find(|d| d.name == "web").unwrap().clone();
        assert_eq!(web.pod_labels["app"], "web");
        let svc = "apiVersion: v1\nkind: Service\nmetadata: {name: front}\nspec:\n  type: NodePort\n  selector: {app: web}\n  ports: [{port: 8080, targetPort: 80, nodePort: 30080}]\n";
        // Alone, selecting nothing yet: kept, as kubectl keeps it, and said so.
        let alone = import_k8s(svc, "default").unwrap();
        assert!(alone.deployments.is_empty());
        assert!(
            alone.warnings.iter().any(|w| w.contains("Service/front: selects no workload")),
            "{:?}",
            alone.warnings
        );
        assert_eq!((alone.services[0].name.as_str(), alone.services[0].stack.as_str()), ("front", "default"));
        let k = import_k8s_beside(&[("", svc)], "default", std::slice::from_ref(&web)).unwrap();
        let d = &k.deployments[0];
        assert_eq!(d.name, "web");
        assert!(d.expose.contains(&skiff_model::mesh::ServicePort::tcp(8080, 80)), "{:?}", d.expose);
        assert!(d.aliases.contains(&"front".to_string()), "{:?}", d.aliases);
        assert_eq!(d.ports.iter().filter(|p| p.host_port == 30080).count(), 1);
        // Applied again on what it made: nothing more.
        let again = import_k8s_beside(&[("", svc)], "default", std::slice::from_ref(d)).unwrap();
        assert_eq!(&again.deployments[0], d);
        // A UDP port is a UDP service port, beside a TCP one of the same number.
        let dns = "apiVersion: v1\nkind: Service\nmetadata: {name: dns}\nspec:\n  selector: {app: web}\n  ports: [{port: 53, targetPort: 5353, protocol: UDP}, {port: 53, targetPort: 5353}]\n";
        let k = import_k8s_beside(&[("", dns)], "default", std::slice::from_ref(&web)).unwrap();
        let both = [skiff_model::mesh::ServicePort::udp(53, 5353), skiff_model::mesh::ServicePort::tcp(53, 5353)];
        assert!(both.iter().all(|p| k.deployments[0].expose.contains(p)), "{:?}", k.deployments[0].expose);
        assert!(k.warnings.is_empty(), "{:?}", k.warnings);
        // Another namespace's deployment is not selected.
        let other = Deployment { stack: "cams".into(), ..web.clone() };
        let k = import_k8s_beside(&[("", svc)], "default", &[other]).unwrap();
        assert!(k.deployments.is_empty(), "kept, not applied to another namespace's");
        // The Deployment applied later, alone: the kept Service selects it (its targetPort
        // by the container port's name too), as if in the same files.
        let named = svc.replace("targetPort: 80", "targetPort: http");
        let kept = import_k8s(&named, "default").unwrap().services;
        let deploy = "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\nspec:\n  selector: {matchLabels: {app: web}}\n  template:\n    metadata: {labels: {app: web}}\n    spec:\n      containers: [{name: w, image: web:1, ports: [{containerPort: 80, name: http}]}]\n";
        let k = import_k8s_with(&[("", deploy)], "default", &[], &kept).unwrap();
        let d = &k.deployments[0];
        assert!(d.expose.contains(&skiff_model::mesh::ServicePort::tcp(8080, 80)), "{:?}", d.expose);
        assert!(d.aliases.contains(&"front".to_string()) && d.ports.iter().any(|p| p.host_port == 30080));
        assert!(k.services.is_empty() && k.warnings.is_empty(), "nothing new to keep or say: {:?}", k.warnings);
        // A kept Service the new workload does not fit (no port named http): said, and
        // nothing of it applied; the workload goes in.
        let unnamed = deploy.replace(", name: http", "");
        let k = import_k8s_with(&[("", &unnamed)], "default", &[], &kept).unwrap();
        assert!(k.deployments[0].aliases.is_empty() && k.deployments[0].ports.is_empty());
        assert!(k.warnings.iter().any(|w| w.contains("(kept)") && w.contains("not applied")), "{:?}", k.warnings);
        // The record keeps what selecting takes, not annotations.
        assert!(!kept[0].document.contains("annotations") && kept[0].document.contains("selector"));
        // Another namespace's kept Service does not reach it.
        let far = skiff_model::api::KeptService { stack: "cams".into(), ..kept[0].clone() };
        let k = import_k8s_with(&[("", deploy)], "default", &[], &[far]).unwrap();
        assert!(k.deployments[0].aliases.is_empty());
    }

    #[test]
    fn host_aliases_dns_config_and_sysctls_map_over() {
        let m = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  template:
    metadata: {labels: {app: web}}
    spec:
      hostAliases: [{ip: 10.1.2.3, hostnames: [foo.local, bar.local]}]
      dnsConfig:
        nameservers: [1.2.3.4]
        searches: [ns1.svc.cluster-domain.example]
        options: [{name: ndots, value: "2"}, {name: edns0}]
      securityContext: {sysctls: [{name: net.ipv4.ip_local_port_range, value: "32768 60999"}]}
      containers: [{name: web, image: web}]
"#;
        let i = import_k8s(m, "default").unwrap();
        let d = &i.deployments[0];
        assert_eq!(d.extra_hosts.len(), 2);
        assert_eq!((d.extra_hosts[1].host.as_str(), d.extra_hosts[1].ip.as_str()), ("bar.local", "10.1.2.3"));
        assert_eq!(d.dns.servers, ["1.2.3.4"]);
        assert_eq!(d.dns.options, ["ndots:2", "edns0"]);
        assert_eq!(d.sysctls["net.ipv4.ip_local_port_range"], "32768 60999");
        assert!(i.warnings.is_empty(), "{:?}", i.warnings);
    }

    const APP: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, labels: {tier: front}}
spec:
  replicas: 1
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      nodeSelector: {site: factory-3}
      containers:
      - name: web
        image: registry.local/web:1.2
        args: ["httpd", "-f"]
        env: [{name: MODE, value: edge}]
        ports: [{containerPort: 80}]
        resources: {limits: {cpu: 500m, memory: 128Mi}, requests: {cpu: 100m, memory: 64Mi}}
        livenessProbe: {httpGet: {path: /, port: 80}}
---
apiVersion: apps/v1
kind: DaemonSet
metadata: {name: analyser, namespace: cams}
spec:
  template:
    metadata: {labels: {app: analyser}}
    spec:
      nodeSelector: {camera: "true"}
      containers: [{name: a, image: analyser:2}]
---
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  type: NodePort
  selector: {app: web}
  ports: [{port: 80, targetPort: 80, nodePort: 30080}]
"#;

    #[test]
    fn deployments_daemonsets_and_services() {
        assert!(is_k8s(APP));
        assert!(!is_k8s("services:\n  web:\n    image: x\n"));
        let k = import_k8s(APP, "default").unwrap();
        let web = &k.deployments[0];
        assert_eq!((web.name.as_str(), web.replicas, web.stack.as_str()), ("web", 1, "default"));
        assert_eq!(web.command.as_deref(), Some(&["httpd".to_string(), "-f".to_string()][..]));
        assert_eq!(web.env["MODE"], "edge");
        assert_eq!((web.resources.cpus_millis, web.resources.memory_bytes), (Some(500), Some(128 << 20)));
        assert_eq!(
            (web.resources.cpus_reservation_millis, web.resources.memory_reservation_bytes),
            (Some(100), Some(64 << 20))
        );
        assert_eq!(web.placement.node_selector["site"], "factory-3");
        assert_eq!(
            web.ports,
            [PortMapping { host_ip: None, host_port: 30080, container_port: 80, protocol: Protocol::Tcp }]
        );
        assert_eq!(web.restart, RestartPolicy::Always);
        let a = &k.deployments[1];
        assert_eq!((a.placement.mode, a.stack.as_str()), (PlacementMode::Global, "cams"));
        assert_eq!(
            k.warnings,
            ["Deployment/web.spec.template.spec.containers[0].livenessProbe: not supported yet, ignored"]
        );
    }

    #[test]
    fn cluster_configuration_is_skipped_and_cluster_ip_publishes_nothing() {
        let extra = "---\napiVersion: v1\nkind: ServiceAccount\nmetadata: {name: web}\n\
                     ---\napiVersion: rbac.authorization.k8s.io/v1\nkind: RoleBinding\nmetadata: {name: rb}\n\
                     ---\napiVersion: policy/v1\nkind: PodDisruptionBudget\nmetadata: {name: pdb}\n\
                     ---\napiVersion: cert-manager.io/v1\nkind: Certificate\nmetadata: {name: tls}\n\
                     ---\napiVersion: v1\nkind: Service\nmetadata: {name: internal}\nspec:\n  selector: {app: web}\n  ports: [{port: 8081, targetPort: 8080}]\n";
        let k = import_k8s(&format!("{APP}{extra}"), "default").unwrap();
        assert_eq!(k.deployments.len(), 2);
        assert_eq!(
            k.deployments[0].ports.len(),
            1,
            "only the NodePort service publishes: {:?}",
            k.deployments[0].ports
        );
        for w in [
            "ServiceAccount/web: kind ServiceAccount is not acted on by skiff, skipped",
            "RoleBinding/rb: kind RoleBinding is not acted on by skiff, skipped",
            "PodDisruptionBudget/pdb: kind PodDisruptionBudget is not acted on by skiff, skipped",
            "Certificate/tls: custom resource (cert-manager.io/v1) is not acted on by skiff, skipped",
        ] {
            assert!(k.warnings.iter().any(|x| x == w), "{w}: {:?}", k.warnings);
        }
        // The ClusterIP service is a fleet service: its name and port reach web's 8080.
        use skiff_model::mesh::ServicePort;
        assert!(k.deployments[0].expose.contains(&ServicePort::tcp(8081, 8080)), "{:?}", k.deployments[0].expose);
        assert!(k.deployments[0].aliases.contains(&"internal".to_string()));
        assert!(!k.warnings.iter().any(|w| w.contains("Service/internal")), "{:?}", k.warnings);
        // A kind of Kubernetes' own that skiff would have to act on is still refused.
        let e =
            import_k8s("apiVersion: apps/v1\nkind: ControllerRevision\nmetadata: {name: db}\n", "default").unwrap_err();
        assert!(e.to_string().contains("kind \"ControllerRevision\" is not supported"), "{e}");
    }

    #[test]
    fn a_pods_other_containers_run_beside_the_first_in_its_network_with_its_volumes() {
        let m = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: shop}
spec:
  replicas: 3
  selector: {matchLabels: {app: web}}
  template:
    metadata:
      labels: {app: web}
      annotations: {prometheus.io/scrape: "true", prometheus.io/port: "9100"}
    spec:
      nodeSelector: {site: a}
      hostAliases: [{ip: 10.0.0.9, hostnames: [plc]}]
      containers:
      - name: app
        image: app:1
        ports: [{containerPort: 8080, name: http}]
        resources: {requests: {cpu: 100m}}
        volumeMounts: [{name: logs, mountPath: /var/log/app}, {name: cache, mountPath: /cache}, {name: scratch, mountPath: /tmp/a}]
      - name: shipper
        image: shipper:2
        args: [--from, /logs]
        ports: [{containerPort: 9100, name: metrics}, {containerPort: 9200, hostPort: 19200}]
        volumeMounts: [{name: logs, mountPath: /logs, readOnly: true}, {name: scratch, mountPath: /tmp/s}]
      volumes:
      - {name: logs, emptyDir: {}}
      - {name: cache, emptyDir: {}}
      - {name: scratch, emptyDir: {medium: Memory}}
      - {name: gone, gitRepo: {repository: x}}
---
apiVersion: v1
kind: Service
metadata: {name: web-metrics, namespace: shop}
spec:
  selector: {app: web}
  ports: [{port: 9100, targetPort: metrics}]
---
apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
metadata: {name: web, namespace: shop}
spec:
  scaleTargetRef: {apiVersion: apps/v1, kind: Deployment, name: web}
  minReplicas: 1
  maxReplicas: 5
  metrics: [{type: Resource, resource: {name: cpu, target: {type: Utilization, averageUtilization: 60}}}]
"#;
        let k = import_k8s(m, "default").unwrap();
        let [web, side] = &k.deployments[..] else { panic!("{:?}", k.deployments) };
        assert_eq!((web.name.as_str(), web.image.as_str(), web.pod_of.as_deref()), ("web", "app:1", None));
        assert_eq!(
            (side.name.as_str(), side.image.as_str(), side.pod_of.as_deref()),
            ("web-shipper", "shipper:2", Some("web"))
        );
        assert_eq!((side.network, side.network_service.as_deref()), (skiff_model::NetworkMode::Service, Some("web")));
        assert_eq!((side.stack.as_str(), side.command.clone()), ("shop", Some(vec!["--from".into(), "/logs".into()])));
        assert_eq!(side.placement.node_selector, web.placement.node_selector, "the pod's placement, the same nodes");
        // What comes with the first's network is the first's: hosts, host ports, labels.
        assert_eq!((web.extra_hosts.len(), side.extra_hosts.len()), (1, 0));
        assert_eq!(web.ports.iter().map(|p| (p.host_port, p.container_port)).collect::<Vec<_>>(), [(19200, 9200)]);
        assert!(side.ports.is_empty() && side.pod_labels.is_empty());
        // The pod's emptyDir is one directory both mount; the memory one each its own.
        let pod = |n: &str| skiff_model::VolumeSource::Pod { name: n.into() };
        let vols = |d: &Deployment| {
            d.volumes.iter().map(|v| (v.source.clone(), v.target.clone(), v.read_only)).collect::<Vec<_>>()
        };
        assert_eq!(vols(web), [(pod("logs"), "/var/log/app".into(), false), (pod("cache"), "/cache".into(), false)]);
        assert_eq!(vols(side), [(pod("logs"), "/logs".into(), true)]);
        assert_eq!((web.tmpfs.len(), side.tmpfs.len()), (1, 1));
        // The Service reaches the first container's deployment, at the port the other
        // names; the autoscaler and the scrape are the first's too.
        assert_eq!(web.expose, [skiff_model::mesh::ServicePort::tcp(9100, 9100)]);
        assert!(side.expose.is_empty() && side.aliases.is_empty() && side.autoscale.is_none());
        assert!(web.aliases.contains(&"web-metrics".to_string()));
        assert!(web.autoscale.is_some());
        assert_eq!(web.scrape.as_ref().map(|s| s.port), Some(9100));
        assert_eq!(
            k.warnings.iter().filter(|w| w.contains("gitRepo volumes are not supported")).count(),
            1,
            "a pod's warning is said once: {:?}",
            k.warnings
        );
        assert!(k
            .warnings
            .iter()
            .any(|w| w.contains("volumes[2]: a memory emptyDir is a tmpfs of each container's own")));
        for d in &k.deployments {
            d.validate().unwrap();
        }
        // A single container keeps its emptyDir as its own.
        let one = m.replace("      - name: shipper\n        image: shipper:2\n        args: [--from, /logs]\n        ports: [{containerPort: 9100, name: metrics}, {containerPort: 9200, hostPort: 19200}]\n        volumeMounts: [{name: logs, mountPath: /logs, readOnly: true}, {name: scratch, mountPath: /tmp/s}]\n", "");
        let k = import_k8s(&one.replace("targetPort: metrics", "targetPort: http"), "default").unwrap();
        assert_eq!(k.deployments.len(), 1);
        assert_eq!(k.deployments[0].volumes[0].source, skiff_model::VolumeSource::Anonymous);
    }

    /// `hostNetwork`: the pod's containers on the node's own network, its ports the
    /// node's (a Service does not publish them).
    #[test]
    fn a_host_network_pod_runs_on_the_nodes_network() {
        let m = r#"
apiVersion: apps/v1
kind: DaemonSet
metadata: {name: csi}
spec:
  selector: {matchLabels: {app: csi}}
  template:
    metadata: {labels: {app: csi}}
    spec:
      hostNetwork: true
      hostAliases: [{ip: 10.0.0.9, hostnames: [plc]}]
      containers:
      - {name: registrar, image: reg:1, ports: [{containerPort: 9809, hostPort: 9809}]}
      - {name: driver, image: drv:1}
---
apiVersion: v1
kind: Service
metadata: {name: csi}
spec:
  type: NodePort
  selector: {app: csi}
  ports: [{port: 9809}]
"#;
        let k = import_k8s(m, "default").unwrap();
        let [first, driver] = &k.deployments[..] else { panic!("{:?}", k.deployments) };
        assert_eq!((first.network, driver.network), (skiff_model::NetworkMode::Host, skiff_model::NetworkMode::Host));
        assert_eq!((first.placement.mode, driver.placement.mode), (PlacementMode::Global, PlacementMode::Replicated));
        assert_eq!((driver.pod_of.as_deref(), driver.network_service.as_deref()), (Some("csi"), None));
        assert_eq!(driver.extra_hosts.len(), 1, "on the host's network each has its own hosts file");
        assert!(first.ports.is_empty() && first.expose.is_empty());
        assert!(
            k.warnings.iter().any(|w| w.starts_with("Service/csi.spec.ports[0]: csi is on its nodes' own network")),
            "{:?}",
            k.warnings
        );
        for d in &k.deployments {
            d.validate().unwrap();
        }
        let e = import_k8s(&m.replace("hostPort: 9809", "hostPort: 80"), "default").unwrap_err().to_string();
        assert!(e.contains("containers[0].ports: hostPort 80 differs from containerPort 9809"), "{e}");
    }

    #[test]
    fn stateful_sets_number_their_pods_and_give_each_its_own_volumes() {
        const SET: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: nginx}
spec:
  clusterIP: None
  selector: {app: nginx}
  ports: [{port: 80, name: web}]
---
apiVersion: apps/v1
kind: StatefulSet
metadata: {name: web, namespace: shop}
spec:
  serviceName: nginx
  replicas: 3
  selector: {matchLabels: {app: nginx}}
  updateStrategy: {type: RollingUpdate, rollingUpdate: {partition: 1}}
  template:
    metadata: {labels: {app: nginx}}
    spec:
      containers:
      - name: nginx
        image: nginx-slim:0.8
        ports: [{containerPort: 80, name: web}]
        volumeMounts: [{name: www, mountPath: /usr/share/nginx/html}]
  volumeClaimTemplates:
  - metadata: {name: www}
    spec: {accessModes: [ReadWriteOnce], resources: {requests: {storage: 1Gi}}}
"#;
        use skiff_model::stateful::{PodManagement, Stateful};
        let k = import_k8s(SET, "shop").unwrap();
        let d = &k.deployments[0];
        assert_eq!(
            d.stateful,
            Some(Stateful { service: Some("nginx".into()), pod_management: PodManagement::OrderedReady })
        );
        assert_eq!((d.replicas, d.instance_name(1).as_str()), (3, "web-0"));
        assert_eq!(d.volumes[0].source, VolumeSource::Claim { name: "www".into() });
        assert_eq!(d.update.budget(3).surge, 0, "stopped before its replacement starts");
        assert_eq!(d.update.budget(3).unavailable, 1, "one at a time");
        assert_eq!((d.update.wave_size, d.update.wave_growth), (1, 1), "one node at a time");
        assert!(d.aliases.contains(&"nginx".to_string()), "the headless service's name reaches it");
        let said = k.warnings.join("\n");
        assert!(said.contains("volumeClaimTemplates[0]: a named volume \"www-POD\""), "{said}");
        assert!(said.contains("rollingUpdate.partition"), "not acted on, said so: {said}");

        // An exec readiness probe is the health check readiness comes from.
        let probed = SET.replace(
            "        ports: [{containerPort: 80, name: web}]",
            "        ports: [{containerPort: 80, name: web}]\n        readinessProbe: {exec: {command: [test, -f, /ready]}, \
             periodSeconds: 2, initialDelaySeconds: 5, failureThreshold: 4}",
        );
        let hc = import_k8s(&probed, "shop").unwrap().deployments[0].healthcheck.clone().unwrap();
        assert_eq!(
            (hc.test, hc.shell, hc.interval_ms, hc.timeout_ms, hc.retries, hc.start_period_ms),
            (vec!["test".into(), "-f".into(), "/ready".into()], false, 2000, 1000, 4, 5000)
        );
        let http = probed.replace("exec: {command: [test, -f, /ready]}", "httpGet: {path: /, port: 80}");
        let k = import_k8s(&http, "shop").unwrap();
        assert!(k.deployments[0].healthcheck.is_none());
        assert!(k.warnings.iter().any(|w| w.contains("readinessProbe: only exec probes")), "{:?}", k.warnings);
        let bad = probed.replace("periodSeconds: 2", "periodSeconds: 0");
        assert_eq!(
            import_k8s(&bad, "shop").unwrap_err().to_string(),
            "StatefulSet/web.spec.template.spec.containers[0].readinessProbe.periodSeconds: must be a whole number, at least 1"
        );

        let parallel = SET.replace("serviceName: nginx", "serviceName: nginx\n  podManagementPolicy: Parallel");
        let k = import_k8s(&parallel, "shop").unwrap();
        assert!(!k.deployments[0].ordered());
        let bad = SET.replace("serviceName: nginx", "serviceName: nginx\n  podManagementPolicy: Sometimes");
        assert_eq!(
            import_k8s(&bad, "shop").unwrap_err().to_string(),
            "StatefulSet/web.spec.podManagementPolicy: \"Sometimes\" is not OrderedReady or Parallel"
        );
        let clash = SET.replace("      containers:", "      volumes: [{name: www, emptyDir: {}}]\n      containers:");
        let k = import_k8s(&clash, "shop").unwrap();
        assert_eq!(k.deployments[0].volumes[0].source, VolumeSource::Claim { name: "www".into() }, "the template wins");
        let unnamed = SET.replace("- metadata: {name: www}", "- metadata: {}");
        assert!(import_k8s(&unnamed, "shop")
            .unwrap_err()
            .to_string()
            .contains("volumeClaimTemplates[0].metadata.name"));
    }

    #[test]
    fn a_target_port_may_name_a_container_port() {
        let app = APP.replace("ports: [{containerPort: 80}]", "ports: [{containerPort: 8080, name: http}]");
        let svc = "---\napiVersion: v1\nkind: Service\nmetadata: {name: front}\nspec:\n  selector: {app: web}\n  ports: [{port: 8000, targetPort: http}]\n";
        let k = import_k8s(&format!("{app}{svc}"), "default").unwrap();
        let web = k.deployments.iter().find(|d| d.name == "web").unwrap();
        assert!(web.expose.contains(&skiff_model::mesh::ServicePort::tcp(8000, 8080)), "{:?}", web.expose);
        // Another Service on a port already served, to another target: warned, not merged.
        let clash = svc.replace("port: 8000", "port: 80").replace("name: front", "name: other");
        let k = import_k8s(&format!("{app}{clash}"), "default").unwrap();
        assert!(
            k.warnings
                .iter()
                .any(|w| w.starts_with("Service/other.spec.ports[0]: port 80 of web already reaches its port 80")),
            "{:?}",
            k.warnings
        );
        let bad = svc.replace("targetPort: http", "targetPort: grpc");
        let e = import_k8s(&format!("{app}{bad}"), "default").unwrap_err().to_string();
        assert!(e.contains("Service/front.spec.ports[0].targetPort: \"grpc\" names no container port of web"), "{e}");
    }

    #[test]
    fn bad_manifests_name_the_field() {
        let err = |t: &str| import_k8s(t, "default").unwrap_err().to_string();
        let base = "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: w}\nspec:\n  template:\n    spec:\n      containers: [{name: c, image: i}]\n";
        assert_eq!(
            err("apiVersion: v1\nkind: Widget\nmetadata: {name: c}\n"),
            "Widget/c: kind \"Widget\" is not supported (Deployment, DaemonSet, StatefulSet, ReplicaSet, ReplicationController, Pod, \
             Job, CronJob, Service, HorizontalPodAutoscaler, PersistentVolumeClaim, ConfigMap, Secret)"
        );
        assert!(err(&base.replace("spec:\n  template", "spec:\n  replicas: -2\n  template"))
            .contains("Deployment/w.spec.replicas: -2 must be 0 or more"));
        let two = base.replace("[{name: c, image: i}]", "[{name: c, image: i}, {name: d, image: j}]");
        assert_eq!(
            err(&two.replace("kind: Deployment", "kind: StatefulSet")),
            "StatefulSet/w.spec.template.spec.containers: a StatefulSet's pod of several containers is not supported \
             yet (one container per pod)"
        );
        assert!(err(&two.replace("{name: d, image: j}", "{image: j}")).contains("containers[1].name: is required"));
        assert!(err(&format!("{two}---\n{}", base.replace("name: w}", "name: w-d}")))
            .contains("Deployment/w-d: \"w-d\" is defined already, by Deployment/w (container d)"));
        assert!(err(&base.replace("[{name: c, image: i}]", "[]")).contains("must list at least one container"));
        let long = format!("{{name: {}, image: j}}", "x".repeat(62));
        assert!(
            err(&two.replace("{name: d, image: j}", &long)).contains("containers[1].name: \"w-xxxx"),
            "a name past 63 characters is said where it comes from"
        );
        assert!(err(
            &two.replace("    spec:\n      containers", "    spec:\n      runtimeClassName: gvisor\n      containers")
        )
        .contains("spec.template.spec.runtimeClassName: a pod of several containers runs under runc here"));
        assert!(err(&base.replace("image: i}", "image: i, resources: {limits: {memory: 12XB}}}"))
            .contains("Deployment/w.spec.template.spec.containers[0].resources.limits.memory"));
        assert!(err(&format!("{base}---\napiVersion: v1\nkind: Service\nmetadata: {{name: s}}\nspec:\n  type: NodePort\n  ports: [{{port: 80}}]\n")).contains("Service/s.spec.selector: is required"));
        assert!(err("apiVersion: v1\nkind: Deployment\nspec: {}\n").contains("metadata.name is required"));
        let three = import_k8s(&APP.replace("replicas: 1", "replicas: 3"), "default").unwrap();
        assert_eq!(three.deployments[0].replicas, 3, "replicas behind one host port are balanced by the node proxy");
        assert!(err("kind: [").contains("not valid YAML"));
    }

    #[test]
    fn extended_resources_are_cdi_device_requests() {
        let base = "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: w}\nspec:\n  template:\n    spec:\n      containers: [{name: c, image: i, resources: {limits: LIM, requests: LIM}}]\n";
        let d =
            &import_k8s(&base.replace("LIM", "{nvidia.com/gpu: 2, memory: 1Gi}"), "default").unwrap().deployments[0];
        assert_eq!(
            d.device_requests,
            [skiff_model::DeviceRequest { kind: "nvidia.com/gpu".into(), ids: vec![], count: 2 }]
        );
        let e = import_k8s(&base.replace("LIM", "{nvidia.com/gpu: 0.5}"), "default").unwrap_err().to_string();
        assert!(e.contains("resources.limits.nvidia.com/gpu: \"0.5\" is not a whole number of devices"), "{e}");
    }

    #[test]
    fn a_runtime_class_picks_the_runtime() {
        let base = "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: w}\nspec:\n  template:\n    spec:\n      runtimeClassName: RC\n      containers: [{name: c, image: i}]\n";
        let d = &import_k8s(&base.replace("RC", "wasmtime"), "default").unwrap().deployments[0];
        assert_eq!(d.runtime, skiff_model::RuntimeKind::Wasm);
        let d = &import_k8s(&base.replace("RC", "runc"), "default").unwrap().deployments[0];
        assert_eq!(d.runtime, skiff_model::RuntimeKind::Oci);
        let d = &import_k8s(&base.replace("RC", "gvisor"), "default").unwrap().deployments[0];
        assert_eq!(d.runtime, skiff_model::RuntimeKind::Runsc);
        let e = import_k8s(&base.replace("RC", "kata"), "default").unwrap_err().to_string();
        assert_eq!(
            e,
            "Deployment/w.spec.template.spec.runtimeClassName: \"kata\" is not a runtime skiff has \
             (oci or runc; runsc or gvisor; wasm, wasmtime or io.containerd.wasmtime.v1)"
        );
    }

    #[test]
    fn several_files_are_one_set_and_errors_name_the_file() {
        let dep = "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: api}\nspec:\n  template:\n    metadata: {labels: {app: api}}\n    spec:\n      containers: [{name: c, image: i}]\n";
        let svc = "apiVersion: v1\nkind: Service\nmetadata: {name: api}\nspec:\n  type: NodePort\n  selector: {app: api}\n  ports: [{port: 80, nodePort: 30080}]\n";
        let k = import_k8s_files(&[("api.yaml", dep), ("svc.yaml", svc)], "default").unwrap();
        assert_eq!(k.deployments[0].ports[0].host_port, 30080, "the Service in another file publishes");
        let k = import_k8s_files(&[("api.yaml", dep), ("svc.yaml", &svc.replace("app: api", "app: nope"))], "default")
            .unwrap();
        assert!(k.deployments[0].ports.is_empty(), "selects nothing here");
        assert!(
            k.warnings.iter().any(|w| w.starts_with("svc.yaml: Service/api: selects no workload")),
            "kept, said so with its file: {:?}",
            k.warnings
        );
        let e = import_k8s_files(&[("a.yaml", dep), ("b.yaml", &format!("---\n{dep}"))], "default")
            .unwrap_err()
            .to_string();
        assert_eq!(e, "b.yaml: Deployment/api: \"api\" is defined already, by a.yaml: Deployment/api");
        let e =
            import_k8s_files(&[("a.yaml", dep), ("b.yaml", "kind: Deployment\n")], "default").unwrap_err().to_string();
        assert_eq!(e, "b.yaml: document 1: metadata.name is required");
        let one = import_k8s(&dep.replace("image: i", "image: i, bogus: 1"), "default").unwrap();
        assert!(one.warnings.iter().all(|w| w.starts_with("Deployment/api")), "one file: no prefix {:?}", one.warnings);
    }

    #[test]
    fn tty_and_stdin_are_read() {
        let base = "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: w}\nspec:\n  template:\n    spec:\n      containers: [{name: c, image: i, TERM}]\n";
        let d = &import_k8s(&base.replace("TERM", "tty: true, stdin: true"), "default").unwrap().deployments[0];
        assert!(d.tty && d.stdin_open);
        let d = &import_k8s(&base.replace("TERM", "tty: false"), "default").unwrap().deployments[0];
        assert!(!d.tty && !d.stdin_open);
        let e = import_k8s(&base.replace("TERM", "tty: yes-please"), "default").unwrap_err().to_string();
        assert!(e.ends_with("containers[0].tty: must be true or false"), "{e}");
    }

    #[test]
    fn memory_is_a_kubernetes_quantity() {
        let base = "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: w}\nspec:\n  template:\n    spec:\n      containers: [{name: c, image: i, resources: {limits: {memory: MEM}}}]\n";
        let mem =
            |q: &str| import_k8s(&base.replace("MEM", q), "default").map(|k| k.deployments[0].resources.memory_bytes);
        assert_eq!(mem("128Mi").unwrap(), Some(128 << 20));
        assert_eq!(mem("128M").unwrap(), Some(128_000_000), "decimal M, as Kubernetes");
        assert_eq!(mem("1G").unwrap(), Some(1_000_000_000));
        assert_eq!(mem("134217728").unwrap(), Some(134_217_728));
        assert!(mem("12XB").unwrap_err().to_string().ends_with("resources.limits.memory: \"12XB\" is not a size"));
    }

    #[test]
    fn strategies_and_min_ready_seconds() {
        use skiff_model::rollout::{IntOrPercent, Strategy};
        let base = "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: w}\nspec:\n  replicas: 4\n  template:\n    spec:\n      containers: [{name: c, image: i}]\n";
        let d = &import_k8s(base, "default").unwrap().deployments[0];
        assert_eq!(
            (d.update.max_surge, d.update.max_unavailable),
            (IntOrPercent::Percent(25), IntOrPercent::Percent(25))
        );
        let t = format!("{base}  minReadySeconds: 7\n  strategy: {{type: RollingUpdate, rollingUpdate: {{maxSurge: 2, maxUnavailable: \"0%\"}}}}\n");
        let d = &import_k8s(&t, "default").unwrap().deployments[0];
        assert_eq!((d.update.max_surge, d.update.max_unavailable), (IntOrPercent::Int(2), IntOrPercent::Percent(0)));
        assert_eq!(d.update.monitor_ms, 7_000);
        let d = &import_k8s(&format!("{base}  strategy: {{type: Recreate}}\n"), "default").unwrap().deployments[0];
        assert_eq!(d.update.strategy, Strategy::Recreate);
        let err = |t: &str| import_k8s(t, "default").unwrap_err().to_string();
        assert_eq!(
            err(&format!("{base}  strategy: {{rollingUpdate: {{maxSurge: 0, maxUnavailable: 0}}}}\n")),
            "Deployment/w.spec.strategy.rollingUpdate.maxUnavailable: may not be 0 when max_surge is 0 (nothing could be replaced)"
        );
        assert_eq!(
            err(&format!("{base}  strategy: {{rollingUpdate: {{maxSurge: lots}}}}\n")),
            "Deployment/w.spec.strategy.rollingUpdate.maxSurge: \"lots\" is not a count or a percentage"
        );
    }

    #[test]
    fn horizontal_pod_autoscalers() {
        let hpa = |target: &str, extra: &str| {
            format!(
                "---\napiVersion: autoscaling/v2\nkind: HorizontalPodAutoscaler\nmetadata: {{name: web-hpa}}\nspec:\n  \
                 scaleTargetRef: {{apiVersion: apps/v1, kind: Deployment, name: {target}}}\n  minReplicas: 2\n  maxReplicas: 10\n  \
                 metrics: [{{type: Resource, resource: {{name: cpu, target: {{type: Utilization, averageUtilization: 70}}}}}}]\n{extra}"
            )
        };
        // Onto the Deployment of the same file, with its behavior.
        let k = import_k8s(
            &format!("{APP}{}", hpa("web", "  behavior: {scaleDown: {stabilizationWindowSeconds: 60}}\n")),
            "default",
        )
        .unwrap();
        let a = k.deployments[0].autoscale.as_ref().unwrap();
        assert_eq!((a.min_replicas, a.max_replicas), (2, 10));
        assert_eq!(a.metrics[0].average_utilization, Some(70));
        assert_eq!(a.behavior.as_ref().unwrap().scale_down.as_ref().unwrap().stabilization_window_seconds, Some(60));
        assert!(k.autoscalers.is_empty());
        // A Deployment elsewhere: left for the hub to resolve.
        let k = import_k8s(&hpa("other", ""), "default").unwrap();
        assert_eq!(
            (k.autoscalers[0].target.as_str(), k.autoscalers[0].path.as_str()),
            ("other", "HorizontalPodAutoscaler/web-hpa")
        );
        let err = |t: &str| import_k8s(t, "default").unwrap_err().to_string();
        assert_eq!(
            err(&format!("{APP}{}", hpa("web", "").replace("minReplicas: 2", "minReplicas: 20"))),
            "Deployment/web: autoscale.minReplicas: 20 is more than maxReplicas 10"
        );
        // Per-container metrics are not read: the autoscaler is left out, said so.
        let k = import_k8s(
            &format!(
                "{APP}{}",
                hpa("web", "").replace("type: Resource, resource", "type: ContainerResource, containerResource")
            ),
            "default",
        )
        .unwrap();
        assert!(k.deployments[0].autoscale.is_none());
        assert!(
            k.warnings.iter().any(|w| w.contains("ContainerResource metrics are not supported yet")),
            "{:?}",
            k.warnings
        );
        assert_eq!(
            err(&hpa("web", "").replace("type: Resource", "type: Widgets")),
            "HorizontalPodAutoscaler/web-hpa.spec.metrics[0].type: \"Widgets\" metrics are not supported (Resource, Pods, Object or External)"
        );
        // The workload's own metrics, read where Prometheus' annotations say.
        let own = |annotations: &str, metric: &str| {
            let app = APP.replacen(
                "metadata: {labels: {app: web}}",
                &format!("metadata: {{labels: {{app: web}}, annotations: {{{annotations}}}}}"),
                1,
            );
            let h = hpa("web", "").replacen(
                "metrics: [{type: Resource, resource: {name: cpu, target: {type: Utilization, averageUtilization: 70}}}]",
                &format!("metrics: [{metric}]"),
                1,
            );
            import_k8s(&format!("{app}{h}"), "default")
        };
        let pods = "{type: Pods, pods: {metric: {name: queue_depth, selector: {matchLabels: {queue: in}}}, target: {type: AverageValue, averageValue: 5}}}";
        let k = own("prometheus.io/scrape: \"true\", prometheus.io/path: /stats", pods).unwrap();
        let web = &k.deployments[0];
        assert_eq!(web.scrape, Some(skiff_model::metrics::Scrape { port: 80, path: "/stats".into() }));
        let m = &web.autoscale.as_ref().unwrap().metrics[0];
        assert_eq!(
            (m.kind.as_deref(), m.name.as_deref(), m.average_value.as_deref()),
            (Some("Pods"), Some("queue_depth"), Some("5"))
        );
        assert_eq!(m.selector.get("queue").map(String::as_str), Some("in"));
        let k = own("prometheus.io/scrape: \"true\", prometheus.io/port: \"9102\"", "{type: Object, object: {metric: {name: requests}, describedObject: {apiVersion: apps/v1, kind: Deployment, name: gateway}, target: {type: Value, value: 10k}}}").unwrap();
        assert_eq!(k.deployments[0].scrape.as_ref().map(|s| (s.port, s.path.as_str())), Some((9102, "/metrics")));
        let ext =
            "{type: External, external: {metric: {name: backlog}, target: {type: AverageValue, averageValue: 30}}}";
        assert!(own("team: a", ext).unwrap().deployments[0].autoscale.is_some());
        // A pods metric needs the workload scraped: unscaled, said so (a prometheus-adapter
        // setup); bad annotations and selectors are named.
        let k = own("team: a", pods).unwrap();
        assert!(k.deployments[0].autoscale.is_none());
        assert!(
            k.warnings
                .iter()
                .any(|w| w.contains("has no prometheus.io/scrape annotation; this autoscaler is not applied")),
            "{:?}",
            k.warnings
        );
        assert_eq!(
            own("prometheus.io/scrape: \"yes\"", ext).unwrap_err().to_string(),
            "Deployment/web.spec.template.metadata.annotations.prometheus.io/scrape: \"yes\" is not \"true\" or \"false\""
        );
        assert_eq!(
            own("prometheus.io/scrape: \"true\", prometheus.io/port: \"http\"", ext).unwrap_err().to_string(),
            "Deployment/web.spec.template.metadata.annotations.prometheus.io/port: \"http\" is not a port number"
        );
        assert_eq!(
            own("a: b", &ext.replace("{name: backlog}", "{name: backlog, selector: {matchExpressions: []}}")).unwrap_err().to_string(),
            "HorizontalPodAutoscaler/web-hpa.spec.metrics[0].external.metric.selector.matchExpressions: is not supported (matchLabels is)"
        );
        assert_eq!(
            err(&hpa("web", "").replace("kind: Deployment", "kind: DaemonSet")),
            "HorizontalPodAutoscaler/web-hpa.spec.scaleTargetRef.kind: DaemonSet cannot be autoscaled (a Deployment or StatefulSet can)"
        );
        assert!(
            err(&hpa("web", "  behavior: {scaleUp: {surprise: 1}}\n")).contains("behavior: unknown field `surprise`")
        );
        // Utilization needs a request (or a limit): the analyser has neither.
        assert_eq!(
            err(&format!("{APP}{}", hpa("analyser", ""))),
            "DaemonSet/analyser: autoscale: a global deployment runs one instance per node"
        );
        let no_request =
            APP.replace("resources: {limits: {cpu: 500m, memory: 128Mi}, requests: {cpu: 100m, memory: 64Mi}}", "");
        assert_eq!(
            err(&format!("{no_request}{}", hpa("web", ""))),
            "Deployment/web: autoscale.metrics[0]: Utilization of cpu needs a cpu reservation or limit to be a percentage of"
        );
    }
}
