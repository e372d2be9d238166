//! `skiff port-forward TARGET [LOCAL:]REMOTE...`: local ports that reach a port inside an
//! instance on any node (through the hub, and the node's tunnel), as `kubectl
//! port-forward`. Each local connection is one WebSocket to the hub; the agent connects
//! to 127.0.0.1:REMOTE in the instance's own network namespace.

use crate::client::Client;
use anyhow::{bail, Context, Result};
use std::sync::Arc;

/// `[LOCAL:]REMOTE` (`8080`, `18080:80`, `:80` for any free local port).
fn ports(s: &str) -> Result<(u16, u16)> {
    let port = |p: &str, what: &str| -> Result<u16> {
        p.parse::<u16>()
            .ok()
            .filter(|p| *p > 0)
            .with_context(|| format!("{s:?}: the {what} port {p:?} is not 1 to 65535"))
    };
    match s.split_once(':') {
        Some(("", r)) => Ok((0, port(r, "remote")?)),
        Some((l, r)) => Ok((port(l, "local")?, port(r, "remote")?)),
        None => {
            let p = port(s, "remote")?;
            Ok((p, p))
        }
    }
}

/// The instance behind `target`: an instance's name, or a deployment's (its first
/// running instance, as kubectl picks one pod).
async fn instance_of(c: &Client, target: &str) -> Result<String> {
    let all: Vec<skiff_model::InstanceStatus> = c.get("/api/v1/instances").await?;
    if all.iter().any(|i| i.name == target) {
        return Ok(target.to_string());
    }
    let mut mine: Vec<&skiff_model::InstanceStatus> =
        all.iter().filter(|i| i.deployment == target && i.state == skiff_model::InstanceState::Running).collect();
    mine.sort_by(|a, b| a.name.cmp(&b.name));
    match mine.first() {
        Some(i) => Ok(i.name.clone()),
        None => bail!("no instance {target:?}, and no running instance of a deployment {target:?}"),
    }
}

pub(super) async fn port_forward(c: Client, target: &str, specs: &[String], address: &str) -> Result<i32> {
    let pairs: Vec<(u16, u16)> = specs.iter().map(|s| ports(s)).collect::<Result<_>>()?;
    let instance = instance_of(&c, target).await?;
    let c = Arc::new(c);
    let mut listeners = vec![];
    for (local, remote) in pairs {
        let l = tokio::net::TcpListener::bind((address, local))
            .await
            .with_context(|| format!("--address {address}, port {local}"))?;
        outln!("Forwarding from {} -> {remote} (instance {instance})", l.local_addr()?);
        listeners.push((l, remote));
    }
    let mut tasks = tokio::task::JoinSet::new();
    for (l, remote) in listeners {
        let (c, instance) = (Arc::clone(&c), instance.clone());
        tasks.spawn(async move {
            loop {
                let (conn, peer) = match l.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        // Out of descriptors, say: not a busy loop.
                        eprintln!("port-forward: accepting: {e}");
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let (c, instance) = (Arc::clone(&c), instance.clone());
                tokio::spawn(async move {
                    if let Err(e) = forward(&c, &instance, remote, conn).await {
                        eprintln!("port-forward {peer} -> {instance}:{remote}: {}", crate::cli::report(&e));
                    }
                });
            }
        });
    }
    tokio::select! {
        _ = tokio::signal::ctrl_c() => Ok(0),
        _ = tasks.join_next() => Ok(1),
    }
}

/// Carries one local connection to the instance's port and back.
async fn forward(c: &Client, instance: &str, port: u16, conn: tokio::net::TcpStream) -> Result<()> {
    let ws = c.websocket(&format!("/api/v1/instances/{instance}/portforward?port={port}")).await?;
    skiff_agent::mesh::relay::splice(ws, conn).await.map_err(|e| anyhow::anyhow!("{e}"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn port_pairs_are_read_as_kubectl_reads_them() {
        assert_eq!(super::ports("8080").unwrap(), (8080, 8080));
        assert_eq!(super::ports("18080:80").unwrap(), (18080, 80));
        assert_eq!(super::ports(":80").unwrap(), (0, 80));
        assert!(super::ports("0").unwrap_err().to_string().contains("the remote port \"0\" is not 1 to 65535"));
        assert!(super::ports("x:80").unwrap_err().to_string().contains("local port \"x\""));
        assert!(super::ports("80:70000").is_err());
    }
}
