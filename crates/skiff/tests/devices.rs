//! CDI devices on real runc: a CDI spec written by the test (device nodes backed by
//! /dev/null and /dev/zero, a driver file mounted in, environment, a hook) stands in for
//! the NVIDIA container toolkit's; `--device vendor/class=NAME`, compose reservations with
//! a count, and `--gpus` on a node without GPUs.

#![allow(clippy::unwrap_used)] // tests may panic on setup failures

mod common;

use common::{wait_for, Node, IMAGE};
use skiff_model::InstanceState;
use std::time::Duration;

type R = anyhow::Result<()>;
const SEC: Duration = Duration::from_secs(1);

#[test]
fn cdi_devices_reach_the_container_and_counts_share_them_out() -> R {
    let mut n = Node::new()?;
    let cdi = n.data().join("cdi");
    std::fs::create_dir(&cdi)?;
    let driver = n.write("driver.txt", "accel driver 1.0\n")?;
    let hook_ran = n.data().join("hook-ran");
    std::fs::write(
        cdi.join("accel.yaml"),
        format!(
            r#"cdiVersion: "0.6.0"
kind: example.com/accel
devices:
  - name: "0"
    containerEdits:
      deviceNodes: [{{path: /dev/accel0, hostPath: /dev/null}}]
      env: [ACCEL=0]
  - name: "1"
    containerEdits:
      deviceNodes: [{{path: /dev/accel1, hostPath: /dev/zero, permissions: r}}]
      env: [ACCEL=1]
containerEdits:
  env: [ACCEL_DRIVER=1.0]
  mounts: [{{hostPath: {driver}, containerPath: /opt/accel/driver.txt, options: [ro, nosuid, nodev, bind]}}]
  hooks: [{{hookName: createRuntime, path: /bin/sh, args: [sh, -c, "echo ran >> {hook}"]}}]
"#,
            driver = driver.display(),
            hook = hook_ran.display()
        ),
    )?;
    n.up_with(None, &["--cdi-spec-dir", cdi.to_str().unwrap()])?;

    // One named device.
    n.ok(&[
        "run",
        IMAGE,
        "--name",
        "one",
        "--device",
        "example.com/accel=1",
        "--",
        "sh",
        "-c",
        "ls -l /dev/accel1; cat /opt/accel/driver.txt; echo ACCEL=$ACCEL DRIVER=$ACCEL_DRIVER; sleep 1000",
    ])?;
    n.wait_running("one-1")?;
    let logs =
        wait_for(30 * SEC, "the device listing", || n.ok(&["logs", "one-1"]).ok().filter(|l| l.contains("ACCEL=")))?;
    assert!(logs.contains("1,   5") || logs.contains("1, 5"), "the node of /dev/zero: {logs}");
    assert!(logs.contains("accel driver 1.0") && logs.contains("ACCEL=1 DRIVER=1.0"), "{logs}");
    assert_eq!(n.ok(&["exec", "one-1", "--", "sh", "-c", "head -c 4 /dev/accel1 | wc -c"])?.trim(), "4");
    // The device cgroup rule carries the spec's permissions (runc's defaults allow
    // /dev/zero anyway, so this is read from the spec rather than tried), and the
    // annotation says which device the instance holds.
    let one = n.instance("one-1")?;
    let spec: serde_json::Value = serde_json::from_slice(&std::fs::read(
        n.data().join("instances").join(&one.container_id).join("config.json"),
    )?)?;
    let rules = spec["linux"]["resources"]["devices"].as_array().unwrap();
    assert!(
        rules.iter().any(|r| r["allow"] == true && r["major"] == 1 && r["minor"] == 5 && r["access"] == "r"),
        "{rules:?}"
    );
    assert_eq!(spec["annotations"]["skiff.dev/cdi-devices"], "example.com/accel=1");
    assert!(std::fs::read_to_string(&hook_ran)?.contains("ran"), "the CDI hook ran");
    n.ok(&["delete", "one"])?;
    wait_for(30 * SEC, "one-1 gone", || n.instance("one-1").is_err().then_some(()))?;

    // A count: two replicas, one device each, different ones; a third finds none free.
    let compose = n.write(
        "infer.yaml",
        "name: infer\nservices:\n  model:\n    image: localhost/skiff-test:1\n    command: [sh, -c, 'echo ACCEL=$$ACCEL; sleep 1000']\n    stop_grace_period: 1s\n    deploy:\n      replicas: 2\n      resources:\n        reservations:\n          devices: [{driver: example.com/accel, count: 1}]\n",
    )?;
    n.ok(&["apply", "-f", compose.to_str().unwrap()])?;
    let mut got = vec![];
    for i in ["model-1", "model-2"] {
        n.wait_running(i)?;
        got.push(wait_for(30 * SEC, "ACCEL", || n.ok(&["logs", i]).ok().filter(|l| l.contains("ACCEL=")))?);
    }
    got.sort();
    assert_eq!(got, ["ACCEL=0\n", "ACCEL=1\n"]);
    // A device another instance holds: the newcomer waits for it (Pending), not fails.
    n.ok(&["run", IMAGE, "--name", "third", "--device", "example.com/accel=0", "--", "sleep", "1000"])?;
    let i = n.wait_instance("third-1", 30 * SEC, "waiting", |i| {
        i.message.as_deref().is_some_and(|m| m.contains("waiting for devices"))
    })?;
    assert_eq!(i.state, InstanceState::Pending, "{i:?}");
    assert!(i.message.unwrap_or_default().contains("held by another instance"));
    n.ok(&["delete", "model"])?;
    n.wait_instance("third-1", 60 * SEC, "running once the device is free", |i| i.state == InstanceState::Running)?;

    // --gpus on a node without GPUs: refused at once, saying what the node has.
    let out = n.cli(&["run", IMAGE, "--name", "gpu", "--gpus", "1", "--", "true"])?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("needs 1 × nvidia.com/gpu, this node has 2 × example.com/accel"),
        "{err}"
    );
    Ok(())
}
