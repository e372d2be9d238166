//! Day-2 verbs on stored deployments — `scale`, `restart`, `stop`, `start` — and
//! `version`. Each reads the stored deployment, changes one thing and applies it back, so
//! the hub validates it as any apply and nothing is half-done.

use crate::client::Client;
use anyhow::{bail, Context, Result};
use skiff_model::api::{ApplyRequest, ApplyResponse, DeploymentView};
use skiff_model::{Deployment, PlacementMode};

use skiff_model::rollout::RESTARTED_AT;

/// The label `stop` keeps the replica count in, for `start`.
pub const STOPPED_REPLICAS: &str = "skiff.dev/stopped-replicas";

/// `NAME=N` pairs, checked before anything is asked of the hub.
fn parse_scale(items: &[String]) -> Result<Vec<(String, u32)>> {
    let mut out: Vec<(String, u32)> = vec![];
    for it in items {
        let (name, n) = it.split_once('=').with_context(|| format!("{it:?}: want NAME=REPLICAS (web=3)"))?;
        let n: u32 = n.trim().parse().map_err(|_| anyhow::anyhow!("{it:?}: {n:?} is not a replica count"))?;
        if name.is_empty() {
            bail!("{it:?}: the deployment's name is missing");
        }
        if out.iter().any(|(x, _)| x == name) {
            bail!("{it:?}: {name} is named twice");
        }
        out.push((name.to_string(), n));
    }
    if out.is_empty() {
        bail!("name at least one deployment: skiff scale NAME=REPLICAS ...");
    }
    Ok(out)
}

async fn stored(c: &Client, name: &str) -> Result<Deployment> {
    let v: DeploymentView = c.get(&format!("/api/v1/deployments/{name}")).await?;
    Ok(v.spec)
}

/// `names` parted into deployments and instances; `deployment/NAME` and `instance/NAME`
/// say which when a name is both. A name that is neither, or both unsaid, is an error
/// before anything is changed.
async fn deployments_and_instances(c: &Client, names: &[String]) -> Result<(Vec<String>, Vec<String>)> {
    let all: Vec<skiff_model::InstanceStatus> = c.get("/api/v1/instances").await?;
    let (mut deployments, mut instances) = (vec![], vec![]);
    for given in names {
        if let Some(n) = given.strip_prefix("deployment/") {
            deployments.push(n.to_string());
            continue;
        }
        let (name, only_instance) = match given.strip_prefix("instance/") {
            Some(n) => (n, true),
            None => (given.as_str(), false),
        };
        let instance = all.iter().find(|i| i.name == name);
        let deployment = match c.get::<DeploymentView>(&format!("/api/v1/deployments/{name}")).await {
            Ok(_) => !only_instance,
            Err(e) if super::view::is_status(&e, reqwest::StatusCode::NOT_FOUND) => false,
            Err(e) => return Err(e),
        };
        match (deployment, instance) {
            (true, Some(i)) => bail!(
                "{name:?} is a deployment and an instance of deployment {}: say deployment/{name} or instance/{name}",
                i.deployment
            ),
            (true, None) => deployments.push(name.to_string()),
            (false, Some(_)) => instances.push(name.to_string()),
            (false, None) if only_instance => bail!("no instance named {name:?}"),
            (false, None) => bail!("no deployment or instance named {name:?}"),
        }
    }
    Ok((deployments, instances))
}

/// Asks each instance's node to `action` it (`skiff restart|stop|start web-1`).
async fn act_on_instances(c: &Client, instances: &[String], action: &str, done: &str) -> Result<()> {
    for name in instances {
        let _: serde_json::Value =
            c.post(&format!("/api/v1/instances/{name}/{action}"), &serde_json::json!({})).await?;
        outln!("instance {name} {done}");
    }
    Ok(())
}

/// Applies changed deployments in one transaction.
async fn apply(c: &Client, deployments: Vec<Deployment>) -> Result<ApplyResponse> {
    let r: ApplyResponse = c.post("/api/v1/apply", &ApplyRequest { deployments, ..Default::default() }).await?;
    super::deploy::print_notes(&r);
    Ok(r)
}

fn replicated(d: &Deployment) -> Result<()> {
    if let Some(first) = &d.pod_of {
        bail!("deployment {} is another container of {first}'s pods: it runs one beside each; scale {first}", d.name);
    }
    if d.placement.mode == PlacementMode::Global {
        bail!("deployment {} runs one instance on every matching node (global): it has no replica count", d.name);
    }
    Ok(())
}

/// `skiff scale web=3 [api=0 ...]`.
pub(super) async fn scale(c: &Client, items: &[String]) -> Result<i32> {
    let wanted = parse_scale(items)?;
    let mut changed = vec![];
    for (name, n) in &wanted {
        let mut d = stored(c, name).await?;
        replicated(&d)?;
        if let Some(a) = &d.autoscale {
            eprintln!(
                "warning: deployment {name} has an autoscaler: it keeps the count within {}..{}",
                a.min_replicas, a.max_replicas
            );
        }
        d.replicas = *n;
        // A count set now is the one `start` would go back to.
        d.labels.remove(STOPPED_REPLICAS);
        changed.push(d);
    }
    apply(c, changed).await?;
    for (name, n) in wanted {
        outln!("deployment {name} scaled to {n}");
    }
    Ok(0)
}

/// Reads each named deployment, lets `change` change it (or say why it stays as it is),
/// applies the changed ones together, and says `done` of each name.
async fn change_each(
    c: &Client,
    names: &[String],
    done: &str,
    mut change: impl FnMut(&mut Deployment) -> Result<Option<&'static str>>,
) -> Result<i32> {
    let mut changed = vec![];
    for name in names {
        let mut d = stored(c, name).await?;
        match change(&mut d)? {
            Some(already) => eprintln!("deployment {name} is already {already}"),
            None => changed.push(d),
        }
    }
    if !changed.is_empty() {
        apply(c, changed).await?;
    }
    for name in names {
        outln!("deployment {name} {done}");
    }
    Ok(0)
}

/// `skiff restart NAME...`: every instance replaced, by the deployment's update strategy
/// (`skiff rollout status NAME` follows it). An instance's name (not a deployment's):
/// that one alone, on its node, ended (stop signal, grace period) and started again from
/// its own spec, as `docker restart`.
pub(super) async fn restart(c: &Client, names: &[String], now_ms: u64) -> Result<i32> {
    let (deployments, instances) = deployments_and_instances(c, names).await?;
    if !deployments.is_empty() {
        change_each(c, &deployments, "restarting", |d| {
            d.labels.insert(RESTARTED_AT.into(), now_ms.to_string());
            Ok(None)
        })
        .await?;
    }
    act_on_instances(c, &instances, "restart", "restarting").await?;
    Ok(0)
}

/// `skiff stop NAME...`: no instances, the count kept for `start`. An instance's name:
/// that one stopped and held so (whatever its restart policy) until `skiff start` names it.
pub(super) async fn stop(c: &Client, names: &[String]) -> Result<i32> {
    let (deployments, instances) = deployments_and_instances(c, names).await?;
    if !deployments.is_empty() {
        change_each(c, &deployments, "stopped", |d| {
            replicated(d)?;
            if d.autoscale.is_some() {
                bail!(
                    "deployment {} has an autoscaler, which would start it again: `skiff scale` it within its range",
                    d.name
                );
            }
            if d.replicas == 0 {
                return Ok(Some("stopped"));
            }
            d.labels.insert(STOPPED_REPLICAS.into(), d.replicas.to_string());
            d.replicas = 0;
            Ok(None)
        })
        .await?;
    }
    act_on_instances(c, &instances, "stop", "stopping").await?;
    Ok(0)
}

/// `skiff start NAME...`: the count `stop` kept (1 when it kept none); an instance's
/// name: that one, stopped by `skiff stop`, runs again.
pub(super) async fn start(c: &Client, names: &[String]) -> Result<i32> {
    let (deployments, instances) = deployments_and_instances(c, names).await?;
    if !deployments.is_empty() {
        change_each(c, &deployments, "started", |d| {
            replicated(d)?;
            let kept = d.labels.remove(STOPPED_REPLICAS);
            if d.replicas > 0 && kept.is_none() {
                return Ok(Some("running"));
            }
            d.replicas = kept.and_then(|k| k.parse().ok()).unwrap_or(1).max(d.replicas);
            Ok(None)
        })
        .await?;
    }
    act_on_instances(c, &instances, "start", "starting").await?;
    Ok(0)
}

/// `skiff version`: this program's, the hub's and each node's (agent and runtimes).
pub(super) async fn version(c: Option<Client>) -> Result<i32> {
    outln!("client: skiff {}", env!("CARGO_PKG_VERSION"));
    let Some(c) = c else {
        outln!("hub: - (no client config)");
        return Ok(0);
    };
    match c.get::<skiff_model::api::Version>("/api/v1/version").await {
        Ok(v) => outln!("hub: skiff {}", v.version),
        Err(e) => {
            outln!("hub: - ({})", crate::cli::report(&e));
            return Ok(1);
        }
    }
    let nodes: Vec<skiff_hub::NodeInfo> = c.get("/api/v1/nodes").await?;
    for n in nodes {
        let skiff = n.versions.get("skiff").map(String::as_str).unwrap_or("-");
        let rest: Vec<String> =
            n.versions.iter().filter(|(k, _)| *k != "skiff").map(|(k, v)| format!("{k} {v}")).collect();
        outln!("node {}: skiff {skiff}; {}", n.name, if rest.is_empty() { "-".into() } else { rest.join(", ") });
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scale_arguments_are_checked_before_anything_is_asked() {
        assert_eq!(parse_scale(&["web=3".into(), "api=0".into()]).unwrap(), vec![("web".into(), 3), ("api".into(), 0)]);
        let err =
            |a: &[&str]| parse_scale(&a.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap_err().to_string();
        assert_eq!(err(&["web"]), "\"web\": want NAME=REPLICAS (web=3)");
        assert_eq!(err(&["web=x"]), "\"web=x\": \"x\" is not a replica count");
        assert_eq!(err(&["web=-1"]), "\"web=-1\": \"-1\" is not a replica count");
        assert_eq!(err(&["=2"]), "\"=2\": the deployment's name is missing");
        assert_eq!(err(&["a=1", "a=2"]), "\"a=2\": a is named twice");
        assert!(err(&[]).starts_with("name at least one"));
    }
}
