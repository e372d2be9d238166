//! Fleet services between nodes (`skiff_agent::mesh`): a hub and three agents as separate
//! processes, real runc containers calling each other by name across nodes — directly
//! between agents over mutual TLS, or relayed through the hub for a node that takes no
//! inbound connection — and the same while the hub is gone.

#![allow(clippy::unwrap_used)] // tests may panic on setup failures

mod common;

use common::fleet::{agent_with, hub, wait_placed};
use common::{free_port, wait_for, Node};
use std::process::Command;
use std::time::Duration;

type R = anyhow::Result<()>;
const SEC: Duration = Duration::from_secs(1);

/// Each agent's service range: its own, since the agents of this test share the host's
/// network namespace (on separate machines every node uses the default).
fn range(i: u32) -> String {
    format!("10.{}.{}.0/24", 240 + i, std::process::id() % 250)
}

/// `wget -q -O - URL` inside a container (through runc: the container's own resolv.conf
/// and network), with the output or why it failed.
fn wget(n: &Node, container: &str, url: &str) -> Result<String, String> {
    let out = Command::new("timeout")
        .args(["20", "runc", "--root"])
        .arg(n.data().join("runc"))
        .args(["exec", container, "wget", "-q", "-O", "-", url])
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
    }
}

/// Waits until `url` answers `want` from `container` (the hub's view travels to nodes
/// within a few seconds of a change).
fn answers(n: &Node, container: &str, url: &str, want: &str) -> R {
    let mut last = String::new();
    let got = wait_for(60 * SEC, &format!("{url} from {container}"), || match wget(n, container, url) {
        Ok(t) if t == want => Some(t),
        Ok(t) => {
            last = t;
            None
        }
        Err(e) => {
            last = e;
            None
        }
    });
    got.map(|_| ()).map_err(|e| anyhow::anyhow!("{e}; last: {last}"))
}

/// The local routes of the agents' service ranges, removed at the end (agents killed
/// on purpose leave theirs).
struct Routes(Vec<String>);

impl Drop for Routes {
    fn drop(&mut self) {
        for r in &self.0 {
            let _ = Command::new("ip").args(["route", "del", "local", r, "dev", "lo", "table", "local"]).output();
        }
    }
}

const STACK: &str = r#"
name: shop
services:
  db:
    image: localhost/skiff-test:1
    command: ["sh", "-c", "mkdir -p /www && echo db on $$HOSTNAME > /www/index.html && exec httpd -f -p 8080 -h /www"]
    expose: ["8080"]
    deploy: {placement: {constraints: ["node.labels.role==b"]}}
  far:
    image: localhost/skiff-test:1
    command: ["sh", "-c", "mkdir -p /www && echo far on $$HOSTNAME > /www/index.html && exec httpd -f -p 8080 -h /www"]
    expose: ["8080"]
    deploy: {placement: {constraints: ["node.labels.role==c"]}}
  client:
    image: localhost/skiff-test:1
    command: ["sleep", "3600"]
    deploy: {placement: {constraints: ["node.labels.role==a"]}}
"#;

const OTHER: &str = r#"
name: other
services:
  stranger:
    image: localhost/skiff-test:1
    command: ["sleep", "3600"]
    deploy: {placement: {constraints: ["node.labels.role==a"]}}
"#;

#[test]
fn services_are_reached_by_name_across_nodes_directly_relayed_and_while_the_hub_is_gone() -> R {
    skiff_testkit::require_privileged!();
    let _routes = Routes((0..3).map(range).collect());
    let mut h = hub()?;
    let token = h.ok(&["token", "create", "--uses", "3"])?.trim().to_string();
    let (pa, pb) = (free_port(), free_port());
    let (listen_a, listen_b) = (format!("127.0.0.1:{pa}"), format!("127.0.0.1:{pb}"));
    let (ra, rb, rc) = (range(0), range(1), range(2));
    let a_args = ["--service-range", &ra, "--mesh-listen", &listen_a];
    let mut a = agent_with(&h, &token, "node-a", &["role=a", "site=s1"], &a_args)?;
    let _b = agent_with(
        &h,
        &token,
        "node-b",
        &["role=b", "site=s1"],
        &["--service-range", &rb, "--mesh-listen", &listen_b],
    )?;
    // Node c takes no inbound connection: it is reached through the hub only.
    let _c = agent_with(&h, &token, "node-c", &["role=c", "site=s2"], &["--service-range", &rc])?;
    let stack = h.write("shop.yaml", STACK)?;
    h.ok(&["apply", "-f", stack.to_str().unwrap()])?;
    let other = h.write("other.yaml", OTHER)?;
    h.ok(&["apply", "-f", other.to_str().unwrap()])?;
    let all =
        wait_placed(&h, &[("node-a", "client-1"), ("node-a", "stranger-1"), ("node-b", "db-1"), ("node-c", "far-1")])?;
    let id = |name: &str| all.iter().find(|i| i.name == name).unwrap().container_id.clone();
    let (client, stranger) = (id("client-1"), id("stranger-1"));

    // By name across nodes: directly to node b's agent, relayed to node c.
    answers(&a, &client, "http://db:8080/", "db on db-1")?;
    answers(&a, &client, "http://far:8080/", "far on far-1")?;
    // Kubernetes' and the stack-qualified forms of the name.
    answers(&a, &client, "http://db.shop:8080/", "db on db-1")?;
    answers(&a, &client, "http://db.shop.svc.cluster.local:8080/", "db on db-1")?;
    // Another stack's instance on the same node finds neither the name nor the address.
    let e = wget(&a, &stranger, "http://db:8080/").unwrap_err();
    assert!(e.contains("bad address") || e.contains("resolve"), "{e}");
    assert!(wget(&a, &stranger, "http://db.shop:8080/").is_err(), "another stack cannot call it by its full name");

    // `skiff get services`: each service, its port, where it runs and what serves.
    let listed = h.ok(&["get", "services"])?;
    let line = |name: &str| listed.lines().find(|l| l.starts_with(&format!("{name} "))).unwrap_or_default().to_string();
    assert!(line("db").contains("8080") && line("db").contains("node-b:1/1"), "{listed}");
    assert!(line("far").contains("node-c:1/1"), "{listed}");
    assert!(line("client").is_empty(), "a deployment that serves no port is no service: {listed}");
    let described = h.ok(&["describe", "service", "db"])?;
    assert!(described.contains("stack: shop") && described.contains("node: node-b"), "{described}");
    assert!(!h.cli(&["get", "service", "nope"])?.status.success());

    // The hub goes away: the direct path needs no hub, the relay does.
    h.kill_up()?;
    answers(&a, &client, "http://db:8080/", "db on db-1")?;
    assert!(wget(&a, &client, "http://far:8080/").is_err(), "no relay without the hub");
    // A restarted agent has the services it last heard of, and reaches them directly.
    a.interrupt_up()?;
    common::fleet::start_agent_in(None, &mut a, &h.server()?, None, None, &[], &a_args)?;
    answers(&a, &client, "http://db:8080/", "db on db-1")?;
    Ok(())
}
