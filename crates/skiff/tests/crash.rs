//! Crash safety: a pull, a join and a certificate renewal killed (SIGKILL, through the
//! `SKIFF_CRASH_AT` crash points) at every step leave the old state or the new one —
//! never a tag without its layers, a node the hub forgot, or a key without its
//! certificate — and the next run finishes the job. And an assignment the agent could
//! not store (a full disk) is sent again.

#![allow(clippy::unwrap_used)] // tests may panic on setup failures

mod common;

use common::fleet::{agent, hub, hub_with, start_agent, wait_placed, wait_ready};
use common::{wait_for, Node, IMAGE};
use skiff_testkit::registry::Registry;
use skiff_testkit::{ImageBuilder, LayerBuilder};
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};
use std::time::Duration;

type R = anyhow::Result<()>;
const SEC: Duration = Duration::from_secs(1);

/// `skiff ARGS` on `n` that dies at `point`; returns whether it was killed there.
fn crash_at(n: &Node, point: &str, args: &[&str]) -> anyhow::Result<bool> {
    let st = Command::new(common::bin())
        .arg("--data")
        .arg(n.data())
        .args(args)
        .env("SKIFF_CRASH_AT", point)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()?;
    Ok(st.signal() == Some(9))
}

#[test]
fn a_pull_killed_at_any_step_leaves_the_old_image_or_the_new() -> R {
    skiff_testkit::require_registry_tools!();
    let reg = Registry::start()?;
    let tmp = tempfile::tempdir()?;
    let layout = tmp.path().join("app");
    let img = ImageBuilder::busybox()?.layer(LayerBuilder::new().file("app/data", 0o644, &[7u8; 300_000])?.finish()?);
    img.write_oci_layout(&layout, "app")?;
    reg.push(&layout, "edge/app:1")?;
    let reference = format!("127.0.0.1:{}/edge/app:1", reg.port);
    for point in [
        "image.blob.synced",
        "image.blob.stored",
        "image.layer.synced",
        "image.layer.placed",
        "image.refs.synced",
        "image.refs.renamed",
    ] {
        let n = Node::bare()?;
        assert!(crash_at(&n, point, &["image", "pull", &reference])?, "{point}: the pull reached it and died");
        let store = skiff_image::ImageStore::open(n.data().join("images"))?;
        let tagged = store.list()?.iter().any(|s| s.reference.contains("edge/app"));
        if tagged {
            // The new state: the whole image, every layer verified.
            store.resolve(&reference).map_err(|e| anyhow::anyhow!("{point}: tagged but broken: {e}"))?;
            assert_eq!(point, "image.refs.renamed", "tagged before its last step");
        } else {
            assert!(store.resolve(&reference).is_err(), "{point}: the old state, no image");
        }
        // The next pull finishes the job.
        n.ok(&["image", "pull", &reference])?;
        let store = skiff_image::ImageStore::open(n.data().join("images"))?;
        store.resolve(&reference).map_err(|e| anyhow::anyhow!("{point}: after the next pull: {e}"))?;
    }
    Ok(())
}

#[test]
fn a_join_killed_at_any_step_is_finished_by_the_next_start_with_the_same_token() -> R {
    skiff_testkit::require_privileged!();
    let mut h = hub()?;
    let server = h.server()?;
    for (i, point) in ["agent.join.key-written", "agent.join.answered", "agent.join.cert-written"].iter().enumerate() {
        let name = format!("node-{i}");
        // One use: a retry of the same join must not need a second.
        let t = h.ok(&["token", "create", "--uses", "1"])?.trim().to_string();
        let mut a = Node::new()?;
        let token_file = a.write("join-token", &t)?;
        let (bridge, subnet) = (a.bridge.clone(), a.subnet.clone());
        let file = token_file.display().to_string();
        let args = [
            "agent",
            "--hub",
            &server,
            "--token-file",
            &file,
            "--name",
            &name,
            "--bridge",
            &bridge,
            "--subnet",
            &subnet,
        ];
        assert!(crash_at(&a, point, &args)?, "{point}: the join reached it and died");
        start_agent(&mut a, &server, Some(&t), Some(&name), &[])?;
        wait_ready(&h, &name).map_err(|e| anyhow::anyhow!("after a crash at {point}: {e}"))?;
    }
    // The hub dies after storing a join, before answering it: the agent asks again.
    let t = h.ok(&["token", "create", "--uses", "1"])?.trim().to_string();
    let port = server.rsplit(':').next().unwrap().to_string();
    h.kill_up()?;
    h.spawn_env(&["hub", "--listen", &format!("127.0.0.1:{port}")], &[("SKIFF_CRASH_AT", "hub.join.stored")])?;
    wait_for(30 * SEC, "the hub back", || h.cli(&["get", "nodes"]).ok()?.status.success().then_some(()))?;
    let mut a = Node::new()?;
    start_agent(&mut a, &server, Some(&t), Some("late"), &[])?;
    assert!(!a.wait_exit(30 * SEC)?.success(), "no answer: the join failed");
    h.wait_exit(10 * SEC)?;
    h.spawn(&["hub", "--listen", &format!("127.0.0.1:{port}")])?;
    wait_for(30 * SEC, "the hub back", || h.cli(&["get", "nodes"]).ok()?.status.success().then_some(()))?;
    start_agent(&mut a, &server, Some(&t), Some("late"), &[])?;
    wait_ready(&h, "late")?;
    Ok(())
}

#[test]
fn a_renewal_killed_half_way_is_finished_at_the_next_start() -> R {
    skiff_testkit::require_privileged!();
    let h = hub_with("127.0.0.1", &["--node-cert-ttl", "30s"])?;
    let server = h.server()?;
    let t = h.ok(&["token", "create"])?.trim().to_string();
    let mut a = Node::new()?;
    let (bridge, subnet) = (a.bridge.clone(), a.subnet.clone());
    let token_file = a.write("join-token", &t)?;
    a.spawn_env(
        &[
            "agent",
            "--hub",
            &server,
            "--token-file",
            token_file.to_str().unwrap(),
            "--name",
            "edge",
            "--bridge",
            &bridge,
            "--subnet",
            &subnet,
        ],
        &[("SKIFF_CRASH_AT", "agent.renew.key-moved")],
    )?;
    // The renewal moved the new key in, then the agent died before the certificate.
    let st = a.wait_exit(90 * SEC)?;
    assert_eq!(st.signal(), Some(9), "{}", a.log());
    let pki = a.data().join("pki");
    assert!(pki.join("node.next.pem").exists() && !pki.join("node.next.key").exists());
    start_agent(&mut a, &server, None, None, &[])?;
    wait_for(30 * SEC, "the renewal finished", || (!pki.join("node.next.pem").exists()).then_some(()))?;
    wait_ready(&h, "edge")?;
    Ok(())
}

/// The agent cannot store an assignment (its disk is full): it drops the connection, and
/// the hub sends the assignment again once the agent can take it.
#[test]
fn an_assignment_the_agent_could_not_store_is_sent_again() -> R {
    skiff_testkit::require_privileged!();
    let h = hub()?;
    let t = h.ok(&["token", "create"])?.trim().to_string();
    let disk = skiff_testkit::Tmpfs::mount(48 << 20)?;
    let mut a = Node::bare_in(disk.path())?;
    a.load(&ImageBuilder::busybox()?, IMAGE)?;
    start_agent(&mut a, &h.server()?, Some(&t), Some("tiny"), &[])?;
    wait_ready(&h, "tiny")?;
    // Fill the disk to the last byte.
    let filler = disk.path().join("filler");
    let st = nix::sys::statvfs::statvfs(disk.path())?;
    let free = st.blocks_available() as u64 * st.fragment_size() as u64;
    let _ = std::fs::write(&filler, vec![0u8; free as usize]);
    h.ok(&["run", IMAGE, "--name", "later", "--", "sleep", "100000"])?;
    wait_for(30 * SEC, "the agent failing to store it", || {
        a.log().contains("storing the assignment failed, reconnecting to get it again").then_some(())
    })?;
    std::fs::remove_file(&filler)?;
    wait_placed(&h, &[("tiny", "later-1")])?;
    drop(a);
    Ok(())
}

/// A hub restarted with its nodes connected resumes them where they were.
#[test]
fn a_node_joined_before_a_hub_restart_keeps_working() -> R {
    skiff_testkit::require_privileged!();
    let mut h = hub()?;
    let server = h.server()?;
    let t = h.ok(&["token", "create"])?.trim().to_string();
    let _a = agent(&h, &t, "steady", &[])?;
    h.ok(&["run", IMAGE, "--name", "s", "--", "sleep", "100000"])?;
    let before = wait_placed(&h, &[("steady", "s-1")])?;
    let port = server.rsplit(':').next().unwrap().to_string();
    h.kill_up()?;
    h.spawn(&["hub", "--listen", &format!("127.0.0.1:{port}")])?;
    let after = wait_placed(&h, &[("steady", "s-1")])?;
    assert_eq!(before[0].pid, after[0].pid);
    Ok(())
}
