//! Checks that need the whole desired state, done before anything is stored.

use skiff_model::{Deployment, ValidationError};
use std::collections::BTreeMap;

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
    }
}
