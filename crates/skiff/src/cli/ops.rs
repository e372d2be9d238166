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
    match c.get::<DeploymentView>(&format!("/api/v1/deployments/{name}")).await {
        Ok(v) => Ok(v.spec),
        Err(e) if super::view::is_status(&e, reqwest::StatusCode::NOT_FOUND) => match instance(c, name).await? {
            Some(i) => Err(anyhow::anyhow!(
                "{name} is an instance of deployment {dep}: its instances run as the deployment says \
                 (`skiff restart {name}` replaces this one, `skiff scale {dep}=N` sets how many run, \
                 `skiff stop {dep}` stops them all)",
                dep = i.deployment
            )),
            None => Err(e),
        },
        Err(e) => Err(e),
    }
}

/// The instance named `name`, if the hub lists one.
async fn instance(c: &Client, name: &str) -> Result<Option<skiff_model::InstanceStatus>> {
    let all: Vec<skiff_model::InstanceStatus> = c.get("/api/v1/instances").await?;
    Ok(all.into_iter().find(|i| i.name == name))
}

/// Applies changed deployments in one transaction.
async fn apply(c: &Client, deployments: Vec<Deployment>) -> Result<ApplyResponse> {
    let r: ApplyResponse = c.post("/api/v1/apply", &ApplyRequest { deployments, ..Default::default() }).await?;
    super::deploy::print_notes(&r);
    Ok(r)
}

fn replicated(d: &Deployment) -> Result<()> {
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
/// (`skiff rollout status NAME` follows it).
/// An instance's name (not a deployment's) is replaced alone, by its node: a new
/// container of the same spec in its place, as `docker restart` (or deleting a pod).
pub(super) async fn restart(c: &Client, names: &[String], now_ms: u64) -> Result<i32> {
    let mut deployments = vec![];
    let mut instances = vec![];
    for name in names {
        let is_deployment = match c.get::<DeploymentView>(&format!("/api/v1/deployments/{name}")).await {
            Ok(_) => true,
            Err(e) if super::view::is_status(&e, reqwest::StatusCode::NOT_FOUND) => false,
            Err(e) => return Err(e),
        };
        match (is_deployment, instance(c, name).await?) {
            (true, _) => deployments.push(name.clone()),
            (false, Some(_)) => instances.push(name.clone()),
            (false, None) => bail!("no deployment or instance named {name:?}"),
        }
    }
    if !deployments.is_empty() {
        change_each(c, &deployments, "restarting", |d| {
            d.labels.insert(RESTARTED_AT.into(), now_ms.to_string());
            Ok(None)
        })
        .await?;
    }
    for name in instances {
        let _: serde_json::Value = c.post(&format!("/api/v1/instances/{name}/restart"), &serde_json::json!({})).await?;
        outln!("instance {name} restarting (a new container takes its place)");
    }
    Ok(0)
}

/// `skiff stop NAME...`: no instances, the count kept for `start`.
pub(super) async fn stop(c: &Client, names: &[String]) -> Result<i32> {
    change_each(c, names, "stopped", |d| {
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
    .await
}

/// `skiff start NAME...`: the count `stop` kept (1 when it kept none).
pub(super) async fn start(c: &Client, names: &[String]) -> Result<i32> {
    change_each(c, names, "started", |d| {
        replicated(d)?;
        let kept = d.labels.remove(STOPPED_REPLICAS);
        if d.replicas > 0 && kept.is_none() {
            return Ok(Some("running"));
        }
        d.replicas = kept.and_then(|k| k.parse().ok()).unwrap_or(1).max(d.replicas);
        Ok(None)
    })
    .await
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
