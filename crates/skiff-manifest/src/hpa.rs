//! Autoscalers: an `autoscaling/v2` HorizontalPodAutoscaler's spec (also compose's
//! `x-skiff-autoscale`, which takes the same fields) as an [`AutoscaleSpec`].

use crate::ManifestError;
use serde_norway::Value;
use skiff_model::autoscale::{AutoscaleSpec, Behavior, MetricSpec};

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
            average_value: None,
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

/// `{type: Resource, resource: {name: cpu, target: {type: Utilization, averageUtilization: 70}}}`.
fn metric(v: &Value, path: &str) -> R<MetricSpec> {
    match get(v, "type").and_then(Value::as_str) {
        Some("Resource") => {}
        Some(other) => {
            return Err(ManifestError::at(
                format!("{path}.type"),
                format!("{other:?} metrics are not supported (Resource: cpu or memory)"),
            ))
        }
        None => return Err(ManifestError::at(format!("{path}.type"), "is required")),
    }
    let r = get(v, "resource").ok_or_else(|| ManifestError::at(format!("{path}.resource"), "is required"))?;
    let name = get(r, "name").and_then(Value::as_str).unwrap_or_default();
    let t = get(r, "target").ok_or_else(|| ManifestError::at(format!("{path}.resource.target"), "is required"))?;
    let tp = format!("{path}.resource.target");
    let average_value = match get(t, "averageValue") {
        None => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Number(n)) => Some(n.to_string()),
        Some(_) => return Err(ManifestError::at(format!("{tp}.averageValue"), "must be a quantity")),
    };
    Ok(MetricSpec {
        resource: name.to_string(),
        target_type: get(t, "type").and_then(Value::as_str).unwrap_or_default().to_string(),
        average_utilization: int(get(t, "averageUtilization"), &format!("{tp}.averageUtilization"))?,
        average_value,
    })
}

/// The target of a HorizontalPodAutoscaler: `scaleTargetRef.name` of a Deployment.
pub fn target(v: &Value, path: &str) -> R<String> {
    let r =
        get(v, "scaleTargetRef").ok_or_else(|| ManifestError::at(format!("{path}.scaleTargetRef"), "is required"))?;
    match get(r, "kind").and_then(Value::as_str) {
        Some("Deployment") => {}
        other => {
            return Err(ManifestError::at(
                format!("{path}.scaleTargetRef.kind"),
                format!("{} cannot be autoscaled (a Deployment can)", other.unwrap_or("(none)")),
            ))
        }
    }
    get(r, "name")
        .and_then(Value::as_str)
        .map(str::to_string)
        .ok_or_else(|| ManifestError::at(format!("{path}.scaleTargetRef.name"), "is required"))
}
