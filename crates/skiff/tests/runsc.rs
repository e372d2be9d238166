//! The `runsc` runtime class: a deployment sandboxed by gVisor on real `runsc`, with the
//! same limits, logs, published ports, health checks, exec and restart policy as runc.
//! Where gVisor cannot run, the node must say why and refuse the deployment instead.

#![allow(clippy::unwrap_used)] // tests may panic on setup failures

mod common;

use common::{http_get, wait_for, Node, IMAGE};
use skiff_model::{Health, InstanceState};
use std::time::Duration;

type R = anyhow::Result<()>;
const SEC: Duration = Duration::from_secs(1);

#[test]
fn a_gvisor_sandbox_runs_like_a_container() -> R {
    let platform = skiff_runtime::runc::RUNSC_DEFAULT_PLATFORM;
    let mut n = Node::new()?;
    let port = common::free_port();
    n.up_compose(&format!(
        r#"name: sandbox
services:
  web:
    image: {IMAGE}
    runtime: runsc
    command: [sh, -c, "cat /proc/version; touch /tmp/ok; exec httpd -f -p 8080 -h /www"]
    mem_limit: 128m
    ports: ["{port}:8080"]
    healthcheck: {{test: [CMD, test, -f, /tmp/ok], interval: 1s, timeout: 5s, retries: 3}}
    stop_grace_period: 1s
  crash:
    image: {IMAGE}
    runtime: gvisor
    command: [sh, -c, "echo crashing; exit 3"]
    restart: on-failure:2
"#
    ))?;
    let nodes: serde_json::Value = serde_json::from_str(&n.ok(&["get", "nodes", "-o", "json"])?)?;
    let offered = nodes[0]["runtimes"].as_array().cloned().unwrap_or_default();
    if let Err(why) = skiff_agent::runsc_status() {
        // The machine cannot run gVisor: the node does not offer it and says why.
        eprintln!("gVisor (platform {platform}) cannot run here: {why}");
        assert!(!offered.iter().any(|r| r == "runsc"), "{offered:?}");
        let i = n.wait_instance("web-1", 30 * SEC, "refused", |i| i.state == InstanceState::Failed)?;
        assert!(i.message.unwrap_or_default().contains("cannot run runsc"));
        return Ok(());
    }
    eprintln!("gVisor platform: {platform}");
    assert!(offered.iter().any(|r| r == "runsc"), "{offered:?}");
    assert!(nodes[0]["versions"]["runsc"].is_string(), "{nodes}");

    let web = n.wait_running("web-1")?;
    // The workload sees gVisor's kernel, not the host's.
    let logs = wait_for(30 * SEC, "the sandbox's first log line", || {
        n.ok(&["logs", "web-1"]).ok().filter(|l| l.contains("Linux version"))
    })?;
    let host = std::fs::read_to_string("/proc/version")?;
    assert!(!host.contains(logs.lines().next().unwrap_or_default().trim()), "{logs} is the host's kernel");
    let inside = n.ok(&["exec", "web-1", "--", "cat", "/proc/version"])?;
    assert_eq!(inside.trim(), logs.lines().find(|l| l.contains("Linux version")).unwrap_or_default().trim());
    // The published port reaches the server through the sandbox (gVisor's sockets in the instance's namespace).
    let page = wait_for(30 * SEC, "the published port", || http_get(port, "/").ok().filter(|p| !p.is_empty()))?;
    assert_eq!(page, "hello from skiff\n");
    n.wait_instance("web-1", 30 * SEC, "healthy", |i| i.health == Some(Health::Healthy))?;
    // The memory limit is on the sandbox's cgroup (cgroup v1 here, v2 on most devices).
    let stats = skiff_runtime::cgroup::Cgroups::detect().limits(&format!("/skiff/{}", web.container_id));
    assert_eq!(stats.memory_bytes, Some(128 << 20), "{stats:?}");

    // Exit codes reach the restart policy: on-failure:2 restarts twice, then stops.
    let crash = n.wait_instance("crash-1", 60 * SEC, "given up", |i| {
        i.state != InstanceState::Running && i.restarts == 2 && i.finished_at_ms.is_some()
    })?;
    assert_eq!(crash.exit_code, Some(3), "{crash:?}");
    assert!(n.ok(&["logs", "crash-1"])?.contains("crashing"));

    // Deleting leaves no sandbox behind.
    n.ok(&["delete", "web"])?;
    wait_for(30 * SEC, "the sandbox to go", || {
        let out = std::process::Command::new("runsc")
            .arg("--root")
            .arg(n.data().join("runsc/state"))
            .arg("list")
            .arg("-q")
            .output()
            .ok()?;
        (!String::from_utf8_lossy(&out.stdout).contains(&web.container_id)).then_some(())
    })?;
    Ok(())
}

#[test]
fn runsc_refuses_the_host_network() -> R {
    let mut n = Node::new()?;
    n.up(None)?;
    let out = n.cli(&["run", IMAGE, "--runtime", "runsc", "--network", "host", "--", "true"])?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("network") && err.contains("runsc"), "{err}");
    Ok(())
}
