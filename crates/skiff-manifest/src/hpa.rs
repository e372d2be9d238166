//! Autoscalers: an `autoscaling/v2` HorizontalPodAutoscaler's spec (also compose's
//! `x-skiff-autoscale`, which takes the same fields) as an [`AutoscaleSpec`].

use crate::ManifestError;
use serde_norway::Value;
use skiff_model::autoscale::{AutoscaleSpec, Behavior, MetricSpec, ObjectRef};

type R<T> = Result<T, ManifestError>;

fn get<'a>(v: &'a Value, k: &str) -> Option<&'a Value> {
    v.as_mapping().and_then(|m| m.get(k))
}

fn int(v: Option<&Value>, path: &str) -> R<Option<i32>> {
    match v {
        None => Ok(None),
        Some(x) => x
            .as_i64()
            .and_then(|n| i32::try_from(n).ok())
            .map(Some)
            .ok_or_else(|| ManifestError::at(path, "must be a whole number")),
    }
}

/// `{minReplicas, maxReplicas, metrics, behavior}` at `path`. Fields other than these
/// (and `scaleTargetRef`, which the caller reads) are errors: an autoscaler that quietly
/// ignores part of its spec would scale wrongly.
pub fn spec(v: &Value, path: &str) -> R<AutoscaleSpec> {
    let m = v.as_mapping().ok_or_else(|| ManifestError::at(path, "must be a mapping"))?;
    for k in m.keys() {
        let k = k.as_str().unwrap_or_default();
        if !["minReplicas", "maxReplicas", "metrics", "behavior", "scaleTargetRef"].contains(&k) {
            return Err(ManifestError::at(format!("{path}.{k}"), "is not an autoscaler field"));
        }
    }
    let max = int(get(v, "maxReplicas"), &format!("{path}.maxReplicas"))?
        .ok_or_else(|| ManifestError::at(format!("{path}.maxReplicas"), "is required"))?;
    let min = int(get(v, "minReplicas"), &format!("{path}.minReplicas"))?.unwrap_or(1);
    let metrics = match get(v, "metrics") {
        // Kubernetes' default: 80 % of the CPU request.
        None => vec![MetricSpec {
            resource: "cpu".into(),
            target_type: "Utilization".into(),
            average_utilization: Some(80),
            ..Default::default()
        }],
        Some(Value::Sequence(list)) => {
            list.iter().enumerate().map(|(i, x)| metric(x, &format!("{path}.metrics[{i}]"))).collect::<R<_>>()?
        }
        Some(_) => return Err(ManifestError::at(format!("{path}.metrics"), "must be a list")),
    };
    let behavior = match get(v, "behavior") {
        None => None,
        Some(b) => Some(
            serde_norway::from_value::<Behavior>(b.clone())
                .map_err(|e| ManifestError::at(format!("{path}.behavior"), e.to_string()))?,
        ),
    };
    Ok(AutoscaleSpec { min_replicas: min, max_replicas: max, metrics, behavior })
}

/// `{type: Resource, resource: {name: cpu, target: {type: Utilization, averageUtilization: 70}}}`,
/// `{type: Pods, pods: {metric: {name, selector}, target}}`, `{type: Object, object: {metric,
/// describedObject, target}}`, `{type: External, external: {metric, target}}`.
fn metric(v: &Value, path: &str) -> R<MetricSpec> {
    let kind = match get(v, "type").and_then(Value::as_str) {
        Some(k @ ("Resource" | "Pods" | "Object" | "External")) => k,
        Some(other) => {
            return Err(ManifestError::at(
                format!("{path}.type"),
                format!("{other:?} metrics are not supported (Resource, Pods, Object or External)"),
            ))
        }
        None => return Err(ManifestError::at(format!("{path}.type"), "is required")),
    };
    let key = match kind {
        "Resource" => "resource",
        "Pods" => "pods",
        "Object" => "object",
        _ => "external",
    };
    let sp = format!("{path}.{key}");
    let src = get(v, key).ok_or_else(|| ManifestError::at(&sp, "is required"))?;
    let t = get(src, "target").ok_or_else(|| ManifestError::at(format!("{sp}.target"), "is required"))?;
    let tp = format!("{sp}.target");
    let quantity = |k: &str| -> R<Option<String>> {
        match get(t, k) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(Value::Number(n)) => Ok(Some(n.to_string())),
            Some(_) => Err(ManifestError::at(format!("{tp}.{k}"), "must be a quantity")),
        }
    };
    let mut m = MetricSpec {
        kind: (kind != "Resource").then(|| kind.to_string()),
        target_type: get(t, "type").and_then(Value::as_str).unwrap_or_default().to_string(),
        average_utilization: int(get(t, "averageUtilization"), &format!("{tp}.averageUtilization"))?,
        average_value: quantity("averageValue")?,
        value: quantity("value")?,
        ..Default::default()
    };
    if kind == "Resource" {
        m.resource = get(src, "name").and_then(Value::as_str).unwrap_or_default().to_string();
        return Ok(m);
    }
    let mp = format!("{sp}.metric");
    let metric = get(src, "metric").ok_or_else(|| ManifestError::at(&mp, "is required"))?;
    m.name = get(metric, "name").and_then(Value::as_str).map(str::to_string);
    if let Some(sel) = get(metric, "selector") {
        if get(sel, "matchExpressions").is_some() {
            return Err(ManifestError::at(
                format!("{mp}.selector.matchExpressions"),
                "is not supported (matchLabels is)",
            ));
        }
        if let Some(l) = get(sel, "matchLabels") {
            m.selector = crate::k8s::map_of_strings(l, &format!("{mp}.selector.matchLabels"))?;
        }
    }
    if kind == "Object" {
        let op = format!("{sp}.describedObject");
        let o = get(src, "describedObject").ok_or_else(|| ManifestError::at(&op, "is required"))?;
        let field = |k: &str| get(o, k).and_then(Value::as_str).unwrap_or_default().to_string();
        m.described_object = Some(ObjectRef { kind: field("kind"), name: field("name") });
    }
    Ok(m)
}

/// The target of a HorizontalPodAutoscaler: `scaleTargetRef.name` of a Deployment.
pub fn target(v: &Value, path: &str) -> R<String> {
    let r =
        get(v, "scaleTargetRef").ok_or_else(|| ManifestError::at(format!("{path}.scaleTargetRef"), "is required"))?;
    match get(r, "kind").and_then(Value::as_str) {
        Some("Deployment" | "StatefulSet") => {}
        other => {
            return Err(ManifestError::at(
                format!("{path}.scaleTargetRef.kind"),
                format!("{} cannot be autoscaled (a Deployment or StatefulSet can)", other.unwrap_or("(none)")),
            ))
        }
    }
    get(r, "name")
        .and_then(Value::as_str)
        .map(str::to_string)
        .ok_or_else(|| ManifestError::at(format!("{path}.scaleTargetRef.name"), "is required"))
}
