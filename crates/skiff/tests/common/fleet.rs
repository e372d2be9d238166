//! A hub and agents as separate processes (`skiff hub`, `skiff agent`), each with its own
//! data directory, node name, labels, bridge and subnet, talking TLS over loopback.

use super::{wait_for, Node};
use skiff_model::{InstanceState, InstanceStatus};
use std::time::Duration;

type R = anyhow::Result<()>;
const SEC: Duration = Duration::from_secs(1);

pub fn hub() -> anyhow::Result<Node> {
    hub_on("127.0.0.1")
}

/// A hub listening on `ip` (a free port), naming that address in its certificate.
pub fn hub_on(ip: &str) -> anyhow::Result<Node> {
    hub_with(ip, &[])
}

/// As `hub_on`, with `extra` arguments to `skiff hub`.
pub fn hub_with(ip: &str, extra: &[&str]) -> anyhow::Result<Node> {
    let mut h = Node::bare()?;
    let listen = format!("{ip}:0");
    let mut args = vec!["hub", "--listen", &listen, "--advertise", ip];
    args.extend(extra);
    h.spawn(&args)?;
    wait_for(30 * SEC, "the hub", || {
        (h.data().join("admin.conf").exists() && h.cli(&["get", "nodes"]).ok()?.status.success()).then_some(())
    })?;
    Ok(h)
}

/// Waits until the hub lists node `name` as Ready.
pub fn wait_ready(h: &Node, name: &str) -> R {
    wait_for(30 * SEC, &format!("{name} ready"), || {
        h.ok(&["get", "nodes"]).ok().filter(|t| t.lines().any(|l| l.starts_with(name) && l.contains("Ready")))
    })?;
    Ok(())
}

pub fn agent(hub: &Node, token: &str, name: &str, labels: &[&str]) -> anyhow::Result<Node> {
    agent_with(hub, token, name, labels, &[])
}

/// As `agent`, with `extra` arguments to `skiff agent`.
pub fn agent_with(hub: &Node, token: &str, name: &str, labels: &[&str], extra: &[&str]) -> anyhow::Result<Node> {
    let mut a = Node::new()?;
    start_agent_in(None, &mut a, &hub.server()?, Some(token), Some(name), labels, extra)?;
    wait_for(30 * SEC, "the agent to join", || a.data().join("pki/joined.json").exists().then_some(()))?;
    Ok(a)
}

/// `skiff agent` on `a`'s data dir, bridge and subnet (a token and name only to join).
pub fn start_agent(a: &mut Node, server: &str, token: Option<&str>, name: Option<&str>, labels: &[&str]) -> R {
    start_agent_in(None, a, server, token, name, labels, &[])
}

/// As `start_agent`, inside the network namespace `netns` when given.
pub fn start_agent_in(
    netns: Option<&str>,
    a: &mut Node,
    server: &str,
    token: Option<&str>,
    name: Option<&str>,
    labels: &[&str],
    extra: &[&str],
) -> R {
    let (bridge, subnet) = (a.bridge.clone(), a.subnet.clone());
    let mut args = vec![
        "agent",
        "--hub",
        server,
        "--heartbeat",
        "1",
        "--metrics-interval",
        "1",
        "--bridge",
        &bridge,
        "--subnet",
        &subnet,
    ];
    let token_file = a.data().join("join-token");
    let token_path = token_file.display().to_string();
    if let Some(t) = token {
        std::fs::write(&token_file, t)?;
        args.extend(["--token-file", &token_path]);
    }
    if let Some(n) = name {
        args.extend(["--name", n]);
    }
    for l in labels {
        args.extend(["--label", l]);
    }
    args.extend(extra);
    a.spawn_in(netns, &args)
}

pub fn hub_instances(h: &Node) -> Vec<InstanceStatus> {
    h.ok(&["get", "instances", "-o", "json"]).ok().and_then(|t| serde_json::from_str(&t).ok()).unwrap_or_default()
}

/// Waits until the hub reports exactly `want` running instances (node, instance name).
pub fn wait_placed(h: &Node, want: &[(&str, &str)]) -> anyhow::Result<Vec<InstanceStatus>> {
    let mut want: Vec<(String, String)> = want.iter().map(|(n, i)| (n.to_string(), i.to_string())).collect();
    want.sort();
    wait_for(60 * SEC, &format!("instances {want:?}"), || {
        let all = hub_instances(h);
        let mut got: Vec<(String, String)> = all
            .iter()
            .filter(|i| i.state == InstanceState::Running && i.pid.is_some())
            .map(|i| (i.node.clone(), i.name.clone()))
            .collect();
        got.sort();
        (got == want).then_some(all)
    })
}
