//! Checks that need the whole desired state, done before anything is stored.

use skiff_model::{Deployment, ValidationError};
use std::collections::BTreeMap;

/// Checks `incoming` against every stored deployment of its names (`stored`, before any
/// prune): instances are named from 1, a stateful set's from 0, so one cannot become the
/// other (a name would mean two instances), and a set's governing service and pod
/// management do not change (Kubernetes' fields are immutable too): delete it first.
pub fn check_kind(incoming: &[Deployment], stored: &[Deployment]) -> Result<(), ValidationError> {
    for d in incoming {
        let Some(old) = stored.iter().find(|e| e.name == d.name) else { continue };
        let field = format!("deployments.{}.stateful", d.name);
        match (&old.stateful, &d.stateful) {
            (None, None) => {}
            (Some(a), Some(b)) if a == b => {}
            (Some(_), Some(_)) => {
                return Err(ValidationError::new(
                    field,
                    format!("a stateful set's service and pod management do not change; delete {} first", d.name),
                ))
            }
            (was, _) => {
                let (was, is) =
                    if was.is_some() { ("stateful set", "deployment") } else { ("deployment", "stateful set") };
                return Err(ValidationError::new(
                    field,
                    format!("{} runs as a {was}; delete it before applying it as a {is}", d.name),
                ));
            }
        }
    }
    Ok(())
}

/// Validates `incoming` as it would stand together with `existing` (the stored
/// deployments it does not replace). Errors are prefixed with the deployment's name.
pub fn check_apply(incoming: &[Deployment], existing: &[Deployment]) -> Result<(), ValidationError> {
    let mut seen = BTreeMap::new();
    for d in incoming {
        d.validate().map_err(|e| ValidationError::new(format!("deployments.{}.{}", d.name, e.field), e.problem))?;
        if seen.insert(d.name.clone(), ()).is_some() {
            return Err(ValidationError::new(format!("deployments.{}", d.name), "appears twice"));
        }
    }
    let merged: Vec<&Deployment> =
        incoming.iter().chain(existing.iter().filter(|e| !incoming.iter().any(|d| d.name == e.name))).collect();
    for d in incoming {
        for (i, dep) in d.depends_on.iter().enumerate() {
            if !merged.iter().any(|m| m.name == dep.name && m.stack == d.stack) {
                return Err(ValidationError::new(
                    format!("deployments.{}.depends_on[{i}]", d.name),
                    format!("{:?} is not a deployment of stack {:?}", dep.name, d.stack),
                ));
            }
        }
    }
    // A shared network: the owner of the same stack, on the bridge, sharing none itself
    // (checked for the incoming ones, and the stored ones whose owner changes).
    let incoming_named = |n: &str| incoming.iter().any(|d| d.name == n);
    for m in &merged {
        let Some(owner) = &m.network_service else { continue };
        let Some((o, field)) = named_by(&merged, &incoming_named, m, owner, "network_service")? else { continue };
        if o.stateful.is_some() {
            return Err(ValidationError::new(field, format!("{owner} is a stateful set: its network is not shared")));
        }
        if o.network != skiff_model::NetworkMode::Bridge {
            return Err(ValidationError::new(
                field,
                format!("{owner} has no bridge network of its own to share (network: {:?})", o.network),
            ));
        }
    }
    // Another container of a pod: beside the first container's deployment, of the same
    // stack, in the same network (the host's for both, or the first's).
    for m in &merged {
        let Some(owner) = &m.pod_of else { continue };
        let Some((o, field)) = named_by(&merged, &incoming_named, m, owner, "pod_of")? else { continue };
        if o.pod_of.is_some() {
            return Err(ValidationError::new(field, format!("{owner} is another's container itself: name that one")));
        }
        if (o.network == skiff_model::NetworkMode::Host) != (m.network == skiff_model::NetworkMode::Host) {
            return Err(ValidationError::new(
                field,
                format!("{owner} and its pod's other containers are all on the host's network or none is"),
            ));
        }
        if o.job.is_some() || o.stateful.is_some() {
            return Err(ValidationError::new(
                field,
                format!("{owner} is a job or a stateful set: its pods have one container here"),
            ));
        }
    }
    let mut ports: BTreeMap<(u16, skiff_model::Protocol), &str> = BTreeMap::new();
    // Stored deployments first, so a conflict is reported on the incoming one.
    for d in merged.iter().skip(incoming.len()).chain(merged.iter().take(incoming.len())) {
        for p in &d.ports {
            if let Some(other) = ports.insert((p.host_port, p.protocol), &d.name) {
                if other != d.name {
                    return Err(ValidationError::new(
                        format!("deployments.{}.ports", d.name),
                        format!("host port {} is already published by {other}", p.host_port),
                    ));
                }
            }
        }
    }
    // Dependency cycles would wait forever.
    for d in incoming {
        let mut stack = vec![(d.name.as_str(), 0usize)];
        let mut path = vec![d.name.as_str()];
        while let Some((n, depth)) = stack.pop() {
            path.truncate(depth);
            path.push(n);
            if depth > merged.len() {
                return Err(ValidationError::new(
                    format!("deployments.{}.depends_on", d.name),
                    format!("dependency cycle: {}", path.join(" -> ")),
                ));
            }
            if let Some(m) = merged.iter().find(|m| m.name == n) {
                for dep in &m.depends_on {
                    if dep.name == d.name {
                        path.push(&d.name);
                        return Err(ValidationError::new(
                            format!("deployments.{}.depends_on", d.name),
                            format!("dependency cycle: {}", path.join(" -> ")),
                        ));
                    }
                    stack.push((&dep.name, depth + 1));
                }
            }
        }
    }
    Ok(())
}

/// The deployment of `m`'s stack that its `key` names (`owner`), with the field's path;
/// `None` when neither `m` nor that one is applied now (nothing of theirs changes).
fn named_by<'a>(
    merged: &[&'a Deployment],
    incoming_named: &dyn Fn(&str) -> bool,
    m: &Deployment,
    owner: &str,
    key: &str,
) -> Result<Option<(&'a Deployment, String)>, ValidationError> {
    if !incoming_named(&m.name) && !incoming_named(owner) {
        return Ok(None);
    }
    let field = format!("deployments.{}.{key}", m.name);
    match merged.iter().find(|o| o.name == owner && o.stack == m.stack) {
        Some(o) => Ok(Some((o, field))),
        None => Err(ValidationError::new(field, format!("{owner:?} is not a deployment of stack {:?}", m.stack))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use skiff_model::{Dependency, PortMapping};

    fn dep(name: &str, on: &[&str]) -> Deployment {
        let mut d = Deployment::new(name, "img");
        d.depends_on = on.iter().map(|n| Dependency { name: n.to_string(), condition: Default::default() }).collect();
        d
    }

    #[test]
    fn a_pods_other_container_is_beside_a_first_of_its_stack() {
        let member = |owner: &str| {
            let mut d = dep("side", &[]);
            d.pod_of = Some(owner.into());
            d.network = skiff_model::NetworkMode::Service;
            d.network_service = Some(owner.into());
            d
        };
        assert!(check_apply(&[member("web"), dep("web", &[])], &[]).is_ok());
        assert!(check_apply(&[member("web")], &[dep("web", &[])]).is_ok(), "beside a stored one");
        let err = |i: &[Deployment], e: &[Deployment]| check_apply(i, e).unwrap_err().to_string();
        let mut other_stack = dep("web", &[]);
        other_stack.stack = "b".into();
        assert_eq!(
            err(&[member("web"), other_stack], &[]),
            "deployments.side.network_service: \"web\" is not a deployment of stack \"default\""
        );
        let mut host = member("web");
        host.network = skiff_model::NetworkMode::Host;
        host.network_service = None;
        assert_eq!(
            err(&[host.clone(), dep("web", &[])], &[]),
            "deployments.side.pod_of: web and its pod's other containers are all on the host's network or none is"
        );
        let mut web = dep("web", &[]);
        web.network = skiff_model::NetworkMode::Host;
        assert!(check_apply(&[host, web], &[]).is_ok());
        let mut job = dep("web", &[]);
        job.job = Some(skiff_model::job::JobSpec { completions: 1, parallelism: 1, ..Default::default() });
        job.restart = skiff_model::RestartPolicy::No;
        assert_eq!(
            err(&[member("web"), job], &[]),
            "deployments.side.pod_of: web is a job or a stateful set: its pods have one container here"
        );
    }

    #[test]
    fn a_shared_network_is_one_of_the_same_stack_on_the_bridge() {
        let side = |owner: &str| {
            let mut d = dep("side", &[]);
            d.network = skiff_model::NetworkMode::Service;
            d.network_service = Some(owner.into());
            d
        };
        assert!(check_apply(&[side("web"), dep("web", &[])], &[]).is_ok());
        let err = |i: &[Deployment], e: &[Deployment]| check_apply(i, e).unwrap_err().to_string();
        assert_eq!(
            err(&[side("web")], &[]),
            "deployments.side.network_service: \"web\" is not a deployment of stack \"default\""
        );
        let mut other = dep("web", &[]);
        other.stack = "other".into();
        assert_eq!(
            err(&[side("web")], &[other]),
            "deployments.side.network_service: \"web\" is not a deployment of stack \"default\""
        );
        let mut host = dep("web", &[]);
        host.network = skiff_model::NetworkMode::Host;
        assert_eq!(
            err(&[host], &[side("web")]),
            "deployments.side.network_service: web has no bridge network of its own to share (network: Host)"
        );
        let mut chain = side("side");
        chain.name = "third".into();
        assert!(err(&[chain], &[side("web"), dep("web", &[])]).contains("has no bridge network of its own"));
    }

    #[test]
    fn cross_checks() {
        assert!(check_apply(&[dep("a", &[]), dep("b", &["a"])], &[]).is_ok());
        assert_eq!(
            check_apply(&[dep("b", &["zz"])], &[]).unwrap_err().to_string(),
            "deployments.b.depends_on[0]: \"zz\" is not a deployment of stack \"default\""
        );
        assert!(check_apply(&[dep("a", &["b"]), dep("b", &["a"])], &[])
            .unwrap_err()
            .to_string()
            .contains("dependency cycle"));
        let mut p1 = dep("p1", &[]);
        p1.ports = vec![PortMapping::parse("80:80").unwrap()];
        let mut p2 = dep("p2", &[]);
        p2.ports = vec![PortMapping::parse("80:8080").unwrap()];
        assert_eq!(
            check_apply(&[p2], &[p1]).unwrap_err().to_string(),
            "deployments.p2.ports: host port 80 is already published by p1"
        );
        assert_eq!(
            check_apply(&[dep("a", &[]), dep("a", &[])], &[]).unwrap_err().to_string(),
            "deployments.a: appears twice"
        );
        let mut set = dep("web", &[]);
        set.stateful = Some(skiff_model::stateful::Stateful { service: None, pod_management: Default::default() });
        set.update.max_surge = skiff_model::rollout::IntOrPercent::Int(0);
        set.update.max_unavailable = skiff_model::rollout::IntOrPercent::Int(1);
        assert_eq!(
            check_kind(std::slice::from_ref(&set), &[dep("web", &[])]).unwrap_err().to_string(),
            "deployments.web.stateful: web runs as a deployment; delete it before applying it as a stateful set"
        );
        assert!(check_kind(&[dep("web", &[])], &[set.clone()])
            .unwrap_err()
            .to_string()
            .contains("runs as a stateful set"));
        assert!(check_kind(&[set.clone()], std::slice::from_ref(&set)).is_ok());
        let mut other = set.clone();
        other.stateful.as_mut().unwrap().service = Some("pg".into());
        assert!(check_kind(&[other], &[set]).unwrap_err().to_string().contains("do not change"));
    }
}
