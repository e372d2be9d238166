//! Runtime threat detection on real containers: the kernel's process events, the shipped
//! rules and a node's own rule file with an action. Each check fails if the detector saw
//! nothing: the alert names the instance and what it ran.

#![allow(clippy::unwrap_used)] // tests may panic on setup failures

mod common;

use common::{wait_for, Node, IMAGE};
use skiff_model::{EventRecord, InstanceState};
use std::time::Duration;

type R = anyhow::Result<()>;
const SEC: Duration = Duration::from_secs(1);

fn security(n: &Node) -> Vec<EventRecord> {
    n.ok(&["get", "events", "--type", "security", "-o", "json"])
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default()
}

#[test]
fn shells_new_binaries_and_rule_actions_are_caught() -> R {
    let mut n = Node::new()?;
    let rules = n.write(
        "rules.yaml",
        "- rule: No wget\n  condition: spawned_process and container and proc.name = wget and container.deployment = victim\n  output: \"wget in %container.name: %proc.cmdline\"\n  priority: CRITICAL\n  action: stop\n",
    )?;
    n.up_with(None, &["--detect-rules", rules.to_str().unwrap()])?;
    n.ok(&["run", IMAGE, "--name", "web", "--", "sleep", "1000"])?;
    n.wait_running("web-1")?;
    // Its main process, and a shell's children, are no alert.
    n.ok(&["run", IMAGE, "--name", "quiet", "--", "sh", "-c", "sleep 1; true; sleep 1000"])?;
    n.wait_running("quiet-1")?;

    // Someone gets a shell in the container.
    n.ok(&["exec", "web-1", "--", "sh", "-c", "echo hi"])?;
    let alert = wait_for(30 * SEC, "the shell alert", || {
        security(&n)
            .into_iter()
            .find(|e| e.reason == "SecurityAlert" && e.message.contains("Terminal shell in container"))
    })?;
    assert_eq!(alert.object, "web-1");
    assert!(
        alert.message.contains("cmdline=sh -c echo hi") && alert.message.starts_with("Warning"),
        "{}",
        alert.message
    );

    // A binary dropped into the container and run.
    n.ok(&["exec", "web-1", "--", "sh", "-c", "cp /bin/busybox /tmp/true && /tmp/true"])?;
    let dropped = wait_for(30 * SEC, "the dropped-binary alert", || {
        security(&n).into_iter().find(|e| e.message.contains("Drop and execute new binary"))
    })?;
    assert!(dropped.message.contains("exe=/tmp/true"), "{}", dropped.message);

    // The node's own rule stops the instance for good.
    n.ok(&["run", IMAGE, "--name", "victim", "--restart", "always", "--", "sleep", "1000"])?;
    n.wait_running("victim-1")?;
    let _ = n.cli(&["exec", "victim-1", "--", "wget", "-q", "-O", "/dev/null", "http://127.0.0.1:1/"])?;
    let stopped = n.wait_instance("victim-1", 30 * SEC, "stopped by the rule", |i| {
        i.state == InstanceState::Failed && i.message.as_deref().is_some_and(|m| m.contains("threat-detection rule"))
    })?;
    assert!(stopped.pid.is_none());
    let ev = security(&n);
    assert!(ev.iter().any(|e| e.reason == "SecurityAlert" && e.message.starts_with("Critical No wget")), "{ev:?}");
    assert!(ev.iter().any(|e| e.reason == "SecurityAction" && e.object == "victim-1"), "{ev:?}");
    assert!(!ev.iter().any(|e| e.object == "quiet-1"), "no alert for a shell entrypoint: {ev:?}");
    assert!(ev.iter().all(|e| e.reason != "Started"), "--type security keeps security events only");
    Ok(())
}

#[test]
fn a_rule_file_with_a_mistake_is_refused_at_start() -> R {
    let n = Node::bare()?;
    let bad = n.write("rules.yaml", "- rule: r\n  condition: proc.nam = sh\n  output: o\n")?;
    let out = n.up_refused_with(None, &["--detect-rules", bad.to_str().unwrap()])?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--detect-rules") && err.contains("\"proc.nam\" is not a field"), "{err}");
    Ok(())
}
