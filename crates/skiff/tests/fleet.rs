//! A hub and agents as separate processes (`skiff hub`, `skiff agent`), each with its own
//! data directory, node name, labels, bridge and subnet, talking TLS over loopback.

#![allow(clippy::unwrap_used)] // tests may panic on setup failures

mod common;

use common::fleet::{
    agent, agent_with, hub, hub_instances, hub_on, start_agent, start_agent_in, wait_placed, wait_ready,
};
use common::{wait_for, Node, Terminal, IMAGE};
use skiff_model::{InstanceState, InstanceStatus};
use std::time::Duration;

type R = anyhow::Result<()>;

/// Where the first test's web and analyser instances run, throughout.
const PLACED: [(&str, &str); 4] =
    [("site-a-1", "web-1"), ("site-b-1", "web-2"), ("site-c-1", "web-3"), ("site-a-1", "analyser-1")];
const SEC: Duration = Duration::from_secs(1);

/// A power cut: the agent, every shim and every container die at once, and the mounts,
/// network namespaces, cgroups and bridge are gone, as after a reboot.
fn reboot(n: &mut Node) -> R {
    n.kill_up()?;
    let dir = n.data().display().to_string();
    for p in std::fs::read_dir("/proc")?.flatten() {
        let Ok(pid) = p.file_name().to_string_lossy().parse::<i32>() else { continue };
        let cmd =
            String::from_utf8_lossy(&std::fs::read(p.path().join("cmdline")).unwrap_or_default()).replace('\0', " ");
        if cmd.contains(" shim ") && cmd.contains(&dir) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
        }
    }
    n.cleanup();
    Ok(())
}

/// Writes `text` as `file` in the hub's directory and `skiff apply -f`s it (with
/// `extra` arguments); returns what it printed.
fn apply(h: &Node, file: &str, text: &str, extra: &[&str]) -> anyhow::Result<String> {
    let p = h.write(file, text)?;
    let mut args = vec!["apply", "-f", p.to_str().unwrap_or_default()];
    args.extend(extra);
    h.ok(&args)
}

/// An instance as the agent itself records it in `agent.db` (agents serve no API).
fn local_instance(n: &Node, name: &str) -> anyhow::Result<skiff_agent::state::InstanceRow> {
    let s = skiff_agent::state::State::open(&n.data().join("agent.db"))?;
    s.instances()?.into_iter().find(|r| r.name == name).ok_or_else(|| anyhow::anyhow!("no instance {name}"))
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

fn pids(all: &[InstanceStatus]) -> Vec<(String, Option<i32>, u32)> {
    let mut v: Vec<_> = all.iter().map(|i| (i.name.clone(), i.pid, i.restarts)).collect();
    v.sort();
    v
}

#[test]
fn placement_offline_autonomy_and_node_authorization() -> R {
    skiff_testkit::require_privileged!();
    let mut h = hub()?;
    let token = h.ok(&["token", "create", "--ttl", "1h"])?.trim().to_string();
    let a = agent(&h, &token, "site-a-1", &["site=a", "camera=true"])?;
    let b = agent(&h, &token, "site-b-1", &["site=b"])?;
    let c = agent(&h, &token, "site-c-1", &["site=c"])?;
    wait_for(30 * SEC, "three nodes Ready", || {
        let t = h.ok(&["get", "nodes"]).ok()?;
        (t.matches("Ready").count() == 3).then_some(())
    })?;

    // Replicas spread over both nodes; the global, selected one only where camera=true.
    h.ok(&["run", IMAGE, "--name", "web", "--replicas", "3", "--", "sleep", "1000"])?;
    let cams = format!(
        "name: cams\nservices:\n  analyser:\n    image: {IMAGE}\n    command: [sleep, '1000']\n    deploy:\n      mode: global\n      placement:\n        constraints: [node.labels.camera==true]\n"
    );
    // --dry-run shows the placement and changes nothing.
    let plan = apply(&h, "cam.yaml", &cams, &["--dry-run"])?;
    assert!(
        plan.contains("deployment analyser created (dry run)") && plan.contains("analyser-1 on site-a-1"),
        "{plan}"
    );
    assert!(!h.ok(&["get", "deployments"])?.contains("analyser"));
    apply(&h, "cam.yaml", &cams, &[])?;
    let before = wait_placed(&h, &PLACED)?;

    // Kubernetes manifests: a DaemonSet with a nodeSelector runs once on each match.
    apply(
        &h,
        "ds.yaml",
        &format!(
            "apiVersion: apps/v1\nkind: DaemonSet\nmetadata: {{name: k8s-ds}}\nspec:\n  template:\n    spec:\n      nodeSelector: {{site: b}}\n      containers: [{{name: c, image: \"{IMAGE}\", command: [sleep, \"1000\"]}}]\n"
        ),
        &[],
    )?;
    wait_placed(&h, &[&PLACED[..], &[("site-b-1", "k8s-ds-1")]].concat())?;
    h.ok(&["delete", "deployment", "k8s-ds"])?;

    // `--selector` pins a deployment to matching nodes; none matching is said so.
    h.ok(&[
        "run",
        IMAGE,
        "--name",
        "only-b",
        "--selector",
        "site=b",
        "--",
        "sh",
        "-c",
        "echo hello from b; sleep 1000",
    ])?;
    wait_placed(&h, &[&PLACED[..], &[("site-b-1", "only-b-1")]].concat())?;
    // Logs and exec reach node b through its tunnel (the agent's outbound WebSocket).
    let logs = wait_for(30 * SEC, "logs through the tunnel", || {
        h.ok(&["logs", "only-b-1"]).ok().filter(|l| l.contains("hello from b"))
    })?;
    assert_eq!(logs.trim(), "hello from b");
    assert_eq!(
        h.ok(&["exec", "only-b-1", "--", "sh", "-c", "echo $((6*7)) on $(cat /etc/hostname)"])?.trim(),
        "42 on only-b-1"
    );
    h.ok(&["delete", "deployment", "only-b"])?;
    let out = h.cli(&["run", IMAGE, "--name", "bad", "--selector", "no key=x"])?;
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not a label key"));

    // Node authorization: node a's certificate reads its own assignments, not b's.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let ca = std::fs::read_to_string(a.data().join("pki/ca.pem"))?;
    let id = std::fs::read_to_string(a.data().join("pki/node.pem"))?
        + &std::fs::read(a.data().join("pki/node.key")).map(|b| String::from_utf8_lossy(&b).into_owned())?;
    let client = reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(ca.as_bytes())?)
        .identity(reqwest::Identity::from_pem(id.as_bytes())?)
        .build()?;
    let server = h.server()?;
    let (own, other, anon) = rt.block_on(async {
        let get = |c: &reqwest::Client, n: &str| c.get(format!("{server}/api/v1/nodes/{n}/assignments")).send();
        let own = get(&client, "site-a-1").await?.status();
        let other = get(&client, "site-b-1").await?;
        let other = (other.status(), other.text().await?);
        let plain = reqwest::Client::builder()
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(ca.as_bytes())?)
            .build()?;
        let anon = get(&plain, "site-a-1").await?.status();
        anyhow::Ok((own, other, anon))
    })?;
    // Bad input at the API: each refused with a status and a message naming the problem.
    let (oversize, malformed, badtoken) = rt.block_on(async {
        // No pooled connections: the server closes the one it refused the oversize body
        // on, and a request racing that close would fail for a reason not under test.
        let plain = reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(ca.as_bytes())?)
            .build()?;
        let join = format!("{server}/api/v1/join");
        // Refused with 413, or cut off before the client finished sending it (a 400
        // would mean the body was read and parsed: no limit).
        let big = match plain.post(&join).body(vec![b'x'; 2 << 20]).send().await {
            Ok(r) => r.status() == 413,
            Err(_) => true,
        };
        let bad = plain.post(&join).body("{not json").send().await?;
        let bad = (bad.status(), bad.text().await?);
        let body = serde_json::json!({"token": "abc.def", "node": "x", "csr": "", "spec": {"os": "linux", "arch": "amd64", "cpu_millis": 1, "memory_bytes": 1}});
        let tok = plain.post(&join).json(&body).send().await?;
        anyhow::Ok((big, bad, (tok.status(), tok.text().await?)))
    })?;
    assert!(oversize, "a 2 MiB body is refused");
    assert_eq!(malformed.0, 400);
    assert!(malformed.1.contains("request body"), "{}", malformed.1);
    assert_eq!(badtoken.0, 401);
    assert!(badtoken.1.contains("token: unknown token"), "{}", badtoken.1);
    let bad_kind = h.write("cm.yaml", "apiVersion: v1\nkind: Widget\nmetadata: {name: c}\n")?;
    let out = h.cli(&["apply", "-f", bad_kind.to_str().unwrap()])?;
    assert!(String::from_utf8_lossy(&out.stderr).contains("kind \"Widget\" is not supported"));
    let negative = h.write("neg.yaml", "services:\n  w:\n    image: x\n    deploy: {replicas: -1}\n")?;
    let out = h.cli(&["apply", "-f", negative.to_str().unwrap()])?;
    assert!(String::from_utf8_lossy(&out.stderr).contains("services.w.deploy.replicas: -1 must be 0 or more"));
    assert_eq!(own, 200);
    assert_eq!(other.0, 403, "{}", other.1);
    assert!(other.1.contains("node \\\"site-a-1\\\" may not act for node \\\"site-b-1\\\""), "{}", other.1);
    assert_eq!(anon, 401);

    // A change that places nothing on these nodes moves the hub's revision on and is not
    // sent to them. When the hub comes back below, each node's hello says the digest of
    // the part it holds, and the hub sends it nothing again: the resync is incremental.
    let out = h.cli(&["run", IMAGE, "--name", "nowhere", "--selector", "site=none", "--", "sleep", "1000"])?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let held = |n: &Node| -> anyhow::Result<(u64, Option<String>)> {
        let s = skiff_agent::state::State::open(&n.data().join("agent.db"))?;
        Ok((s.desired_revision()?, s.meta(skiff_agent::state::DIGEST_KEY)?))
    };
    let held_before = [held(&a)?, held(&b)?, held(&c)?];
    assert!(held_before.iter().all(|(_, d)| d.is_some()), "{held_before:?}");

    // The hub goes away: the agents keep their workloads; agent b restarts meanwhile and
    // restores its instance from local state, same process, no restart.
    h.kill_up()?;
    let mut b = b;
    b.interrupt_up()?;
    let server = h.server()?;
    start_agent(&mut b, &server, None, None, &[])?;
    wait_for(30 * SEC, "agent b to re-adopt web-2", || b.log().contains("re-adopted running instance").then_some(()))?;
    let web2 = local_instance(&b, "web-2")?;
    assert_eq!(web2.pid, before.iter().find(|i| i.name == "web-2").and_then(|i| i.pid));
    assert_eq!((web2.state, web2.restarts), (InstanceState::Running, 0));

    // The hub comes back on the same address: the agents resync, nothing restarts.
    let port = server.rsplit(':').next().unwrap().to_string();
    h.spawn(&["hub", "--listen", &format!("127.0.0.1:{port}")])?;
    let after = wait_placed(&h, &PLACED)?;
    assert_eq!(pids(&after), pids(&before), "same processes, zero restarts");
    wait_ready(&h, "site-a-1")?;
    std::thread::sleep(2 * SEC);
    assert_eq!([held(&a)?, held(&b)?, held(&c)?], held_before, "no assignment sent again");
    h.ok(&["delete", "deployment", "nowhere"])?;

    // A change after the heal reaches the nodes: scale down.
    h.ok(&["delete", "deployment", "analyser"])?;
    wait_placed(&h, &[("site-a-1", "web-1"), ("site-b-1", "web-2"), ("site-c-1", "web-3")])?;

    // Bad input: an unknown token and a revoked node are refused with a reason.
    let out = h.cli(&["delete", "node", "ghost"])?;
    assert!(String::from_utf8_lossy(&out.stderr).contains("node \"ghost\" not found"));
    h.ok(&["delete", "deployment", "web"])?;
    wait_placed(&h, &[])?;

    // Revoking a node cuts its connection, and it cannot come back.
    h.ok(&["delete", "node", "site-a-1"])?;
    wait_for(30 * SEC, "node a refused after revocation", || a.log().contains("403 Forbidden").then_some(()))?;
    assert!(!h.ok(&["get", "nodes"])?.contains("site-a-1"));

    // A node with less free disk than its floor says DiskPressure and takes no new work;
    // a floor that makes no sense is refused, naming the flag.
    let bad = Node::bare()?.cli(&["agent", "--hub", &h.server()?, "--disk-pressure-below", "120%"])?;
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success() && err.contains("--disk-pressure-below") && err.contains("0% to 100%"), "{err}");
    let d = agent_with(&h, &token, "site-d-1", &["site=d"], &["--disk-pressure-below", "100%"])?;
    let described = wait_for(30 * SEC, "node d under disk pressure", || {
        h.ok(&["describe", "node", "site-d-1"]).ok().filter(|t| t.contains("state: NotReady"))
    })?;
    assert!(described.contains("DiskPressure: ") && described.contains("below 100%"), "{described}");
    let out = h.cli(&["run", IMAGE, "--name", "on-d", "--selector", "site=d", "--", "sleep", "1000"])?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && err.contains("1 were not ready"), "{err}");
    assert!(hub_instances(&h).iter().all(|i| i.deployment != "on-d"));
    h.ok(&["delete", "deployment", "on-d"])?;
    drop((a, b, c, d));
    Ok(())
}

#[test]
fn a_node_rebooted_while_offline_brings_its_workloads_back() -> R {
    skiff_testkit::require_privileged!();
    let mut h = hub()?;
    let token = h.ok(&["token", "create"])?.trim().to_string();
    let mut a = agent(&h, &token, "solo", &[])?;
    h.ok(&["run", IMAGE, "--name", "svc", "--replicas", "2", "--restart", "always", "--", "sleep", "1000"])?;
    let before = wait_placed(&h, &[("solo", "svc-1"), ("solo", "svc-2")])?;

    // The uplink is gone, then the device loses power; it boots with the hub unreachable.
    let server = h.server()?;
    h.kill_up()?;
    let offline_since = now_ms();
    reboot(&mut a)?;
    start_agent(&mut a, &server, None, None, &[])?;
    let back = wait_for(60 * SEC, "svc-1 and svc-2 running again from local state", || {
        let rows: Vec<_> = ["svc-1", "svc-2"].iter().filter_map(|n| local_instance(&a, n).ok()).collect();
        let fresh = rows.iter().all(|r| {
            r.state == InstanceState::Running
                && r.pid.is_some()
                && before.iter().find(|b| b.name == r.name).is_some_and(|b| b.pid != r.pid)
        });
        (rows.len() == 2 && fresh).then_some(rows)
    })?;

    // The hub returns: the node reports what it runs, and nothing is replaced or restarted.
    let port = server.rsplit(':').next().unwrap().to_string();
    h.spawn(&["hub", "--listen", &format!("127.0.0.1:{port}")])?;
    let after = wait_placed(&h, &[("solo", "svc-1"), ("solo", "svc-2")])?;
    // What happened offline (the starts after the reboot) reaches the hub from agent.db.
    wait_for(30 * SEC, "the offline events at the hub", || {
        let evs: Vec<skiff_model::EventRecord> =
            serde_json::from_str(&h.ok(&["get", "events", "-o", "json"]).ok()?).ok()?;
        evs.iter().any(|e| e.object == "svc-2" && e.time_ms >= offline_since).then_some(())
    })?;
    std::thread::sleep(3 * SEC);
    for r in &back {
        let now = local_instance(&a, &r.name)?;
        assert_eq!((now.pid, now.restarts), (r.pid, r.restarts), "{} untouched after reconnect", r.name);
        assert_eq!(after.iter().find(|i| i.name == r.name).and_then(|i| i.pid), r.pid);
    }
    h.ok(&["delete", "deployment", "svc"])?;
    wait_placed(&h, &[])?;
    Ok(())
}

#[test]
fn images_are_placed_by_platform_and_pulled_by_the_agent() -> R {
    skiff_testkit::require_registry_tools!();
    let reg = skiff_testkit::registry::Registry::start()?;
    let tmp = tempfile::tempdir()?;
    let arch = |a: &str| -> anyhow::Result<skiff_testkit::ImageBuilder> {
        let mut img = skiff_testkit::ImageBuilder::busybox()?;
        (img.architecture, img.variant) = (a.to_string(), None);
        Ok(img)
    };
    let host = skiff_testkit::host_arch();
    let other = if host == "arm64" { "amd64" } else { "arm64" };
    skiff_testkit::ImageBuilder::write_multi_arch_layout(&tmp.path().join("m"), "m", &[arch(host)?, arch(other)?])?;
    reg.push(&tmp.path().join("m"), "edge/multi:1")?;
    arch(other)?.write_oci_layout(&tmp.path().join("f"), "f")?;
    reg.push(&tmp.path().join("f"), "edge/foreign:1")?;
    let at = |repo: &str| format!("127.0.0.1:{}/{repo}", reg.port);

    let h = hub()?;
    let token = h.ok(&["token", "create"])?.trim().to_string();
    let port = common::free_port();
    let a = agent_with(&h, &token, "edge-1", &[], &["--metrics-listen", &format!("127.0.0.1:{port}")])?;
    wait_for(30 * SEC, "the node Ready", || h.ok(&["get", "nodes"]).ok()?.contains("Ready").then_some(()))?;

    // An image the node does not have: placed, then pulled by the agent itself. A watch
    // started before sees the list change without asking again.
    let watch = common::Watch::start(&h, "instances")?;
    watch.until(10 * SEC, |v: &Vec<InstanceStatus>| v.is_empty())?;
    h.ok(&["run", &at("edge/multi:1"), "--name", "pulled", "--", "sleep", "1000"])?;
    watch.until(60 * SEC, |v: &Vec<InstanceStatus>| {
        v.iter().any(|i| i.name == "pulled-1" && i.state == InstanceState::Running)
    })?;
    drop(watch);
    wait_placed(&h, &[("edge-1", "pulled-1")])?;
    // Its figures: at the hub (`skiff top`, shipped through the tunnel) and on the node's
    // own Prometheus endpoint.
    wait_for(30 * SEC, "pulled-1 in the hub's samples", || {
        let rows: Vec<serde_json::Value> =
            serde_json::from_str(&h.ok(&["top", "instances", "-o", "json"]).ok()?).ok()?;
        rows.iter().any(|r| r["instance"] == "pulled-1" && r["node"] == "edge-1").then_some(())
    })?;
    let local = wait_for(30 * SEC, "the node's own /metrics", || {
        common::http_get(port, "/metrics").ok().filter(|t| t.contains("instance=\"pulled-1\""))
    })?;
    assert!(local.contains("skiff_node_memory_total_bytes{node=\"edge-1\"}"), "{local}");
    let events = |h: &Node| -> Vec<(String, String)> {
        let evs: Vec<skiff_model::EventRecord> =
            h.ok(&["get", "events", "-o", "json"]).ok().and_then(|t| serde_json::from_str(&t).ok()).unwrap_or_default();
        evs.into_iter().map(|e| (e.object, e.reason)).collect()
    };
    wait_for(30 * SEC, "Pulling and Pulled events at the hub", || {
        let e = events(&h);
        let has = |r: &str| e.iter().any(|(o, x)| o == "pulled-1" && x == r);
        (has("Pulling") && has("Pulled")).then_some(())
    })?;

    // An image built only for another architecture is placed nowhere, and says why.
    let out = h.cli(&["run", &at("edge/foreign:1"), "--name", "foreign", "--", "sleep", "1000"])?;
    let why = "0/1 nodes are available: 1 have an architecture the image is not built for";
    assert!(out.status.success() && String::from_utf8_lossy(&out.stderr).contains(why), "{out:?}");
    assert!(h.ok(&["describe", "deployment", "foreign"])?.contains(why));

    // A registry nobody can reach: the hub warns and places on any architecture; the
    // node keeps the instance pending, saying why, and tries again later.
    let closed = format!("127.0.0.1:{}/edge/gone:1", common::free_port());
    let out = h.cli(&["run", &closed, "--name", "gone", "--", "true"])?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && stderr.contains("platforms unknown"), "{stderr}");
    let pending = wait_for(30 * SEC, "gone-1 pending with the pull failure", || {
        hub_instances(&h).into_iter().find(|i| {
            i.name == "gone-1"
                && i.message.as_deref().is_some_and(|m| m.contains("failed") && m.contains("trying again"))
        })
    })?;
    assert_eq!(pending.state, InstanceState::Pending);
    assert!(events(&h).iter().any(|(o, r)| o == "gone-1" && r == "PullFailed"));
    assert_eq!(local_instance(&a, "pulled-1")?.state, InstanceState::Running);
    for d in ["pulled", "foreign", "gone"] {
        h.ok(&["delete", "deployment", d])?;
    }
    wait_placed(&h, &[])?;

    // Node update strategies. Three versions of an app, each its own image.
    for v in 1..=3u8 {
        let layer = skiff_testkit::LayerBuilder::new().file("version", 0o644, &[b'0' + v])?.finish()?;
        let dir = tmp.path().join(format!("app{v}"));
        skiff_testkit::ImageBuilder::busybox()?.layer(layer).write_oci_layout(&dir, "app")?;
        reg.push(&dir, &format!("edge/app:{v}"))?;
    }
    let app = |v: u8, update: &str| {
        format!(
            "name: strat\nservices:\n  app:\n    image: {}\n    command: [sleep, '1000']\n    stop_grace_period: 1s\n    \
             deploy: {{update_config: {{{update}}}}}\n",
            at(&format!("edge/app:{v}"))
        )
    };
    // Time of the first event `reason` about `object` (after `since`).
    let when = |h: &Node, object: &str, reason: &str, since: u64| -> Option<u64> {
        let evs: Vec<skiff_model::EventRecord> =
            h.ok(&["get", "events", "-o", "json"]).ok().and_then(|t| serde_json::from_str(&t).ok()).unwrap_or_default();
        evs.into_iter().find(|e| e.object == object && e.reason == reason && e.time_ms >= since).map(|e| e.time_ms)
    };
    let store = || skiff_image::ImageStore::open(a.data().join("images"));
    let has = |v: u8| -> bool { store().is_ok_and(|s| s.inspect(&at(&format!("edge/app:{v}"))).is_ok()) };
    apply(&h, "app.yaml", &app(1, "x-skiff-node-strategy: delete-then-download"), &[])?;
    h.ok(&["rollout", "status", "app", "--timeout", "60s"])?;
    assert!(has(1));

    // delete-then-download: the old instance stops and its image goes before the new one
    // is pulled (a disk that cannot hold both).
    let t = now_ms();
    apply(&h, "app.yaml", &app(2, "x-skiff-node-strategy: delete-then-download"), &[])?;
    h.ok(&["rollout", "status", "app", "--timeout", "60s"])?;
    let (removed, dropped, pulling) = wait_for(30 * SEC, "the events of the update", || {
        Some((
            when(&h, "app-1", "Removed", t)?,
            when(&h, &at("edge/app:1"), "ImageRemoved", t)?,
            when(&h, "app-1", "Pulling", t)?,
        ))
    })?;
    assert!(removed <= dropped && dropped <= pulling, "stop {removed}, delete {dropped}, then pull {pulling}");
    assert!(!has(1) && has(2), "only the new image is left");

    // download-then-kill (the default) with stop-first: the new image is in the store
    // before the old instance stops.
    let t = now_ms();
    apply(&h, "app.yaml", &app(3, "order: stop-first"), &[])?;
    h.ok(&["rollout", "status", "app", "--timeout", "60s"])?;
    let (pulled, removed) = wait_for(30 * SEC, "the events of the update", || {
        Some((when(&h, "app-1", "Pulled", t)?, when(&h, "app-1", "Removed", t)?))
    })?;
    assert!(pulled <= removed, "pulled {pulled} before the old one stopped {removed}");
    assert!(has(2) && has(3), "download-then-kill keeps the old image");
    h.ok(&["delete", "deployment", "app"])?;
    wait_placed(&h, &[])?;
    Ok(())
}

#[test]
fn a_60_s_partition_restarts_nothing_and_heals_in_seconds() -> R {
    skiff_testkit::require_privileged!();
    // Declared first, so dropped last: after the processes inside it are gone.
    let uplink = common::Uplink::new()?;
    let h = hub_on(&uplink.host_ip)?;
    let token = h.ok(&["token", "create"])?.trim().to_string();
    let mut a = Node::new()?;
    start_agent_in(Some(&uplink.netns), &mut a, &h.server()?, Some(&token), Some("site-1"), &[], &[])?;
    let state = |h: &Node| -> Option<String> {
        h.ok(&["get", "nodes", "-o", "json"])
            .ok()
            .and_then(|t| serde_json::from_str::<Vec<skiff_hub::NodeInfo>>(&t).ok())?
            .into_iter()
            .find(|n| n.name == "site-1")
            .map(|n| n.state)
    };
    wait_for(30 * SEC, "site-1 Ready", || (state(&h)? == "Ready").then_some(()))?;
    let tick = "while true; do echo tick; sleep 0.1; done";
    let run = |h: &Node, replicas: &str| {
        h.ok(&["run", IMAGE, "--name", "chatty", "--replicas", replicas, "--restart", "always", "--", "sh", "-c", tick])
    };
    run(&h, "2")?;
    let before = wait_placed(&h, &[("site-1", "chatty-1"), ("site-1", "chatty-2")])?;

    // The uplink dies for 60 s; meanwhile the deployment is scaled up at the hub.
    let down_at = std::time::Instant::now();
    let down_ms = now_ms();
    uplink.set(false)?;
    run(&h, "3")?;
    wait_for(60 * SEC, "the hub to see site-1 as Unknown", || (state(&h)? == "Unknown").then_some(()))?;
    std::thread::sleep((60 * SEC).saturating_sub(down_at.elapsed()));
    for b in &before {
        let now = local_instance(&a, &b.name)?;
        assert_eq!((now.pid, now.restarts), (b.pid, 0), "{} kept running through the partition", b.name);
    }

    // The link heals: the node catches up (the third instance) without touching the others.
    let healed_ms = now_ms();
    uplink.set(true)?;
    let after = wait_placed(&h, &[("site-1", "chatty-1"), ("site-1", "chatty-2"), ("site-1", "chatty-3")])?;
    for b in &before {
        let now = after.iter().find(|i| i.name == b.name).unwrap();
        assert_eq!((now.pid, now.restarts), (b.pid, 0), "{} untouched after the heal", b.name);
    }
    // An interactive shell reaches the node (in its own network namespace, behind its
    // uplink) through its tunnel: typed into, resized, its exit code returned; input and
    // output larger than the tunnel's windows flow both ways at once.
    let mut t = Terminal::spawn(&h, &["exec", "-it", "chatty-1", "--", "sh"], (90, 30))?;
    t.expect("# ", 30 * SEC)?;
    t.send("stty size; hostname\r")?;
    t.expect("30 90", 10 * SEC)?;
    t.expect("chatty-1", 10 * SEC)?;
    t.resize(132, 43)?;
    t.send("stty size\r")?;
    t.expect("43 132", 10 * SEC)?;
    t.send("exit 5\r")?;
    assert_eq!(t.wait(20 * SEC)?, 5);
    let big: Vec<u8> = (0..2_000_000u32).map(|i| b'a' + (i % 26) as u8).collect();
    let out = h.cli_input(&["exec", "-i", "chatty-1", "--", "cat"], &big)?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        out.stdout == big,
        "cat through the tunnel gave back {} of {} bytes, or others",
        out.stdout.len(),
        big.len()
    );
    // A port inside the instance, forwarded from here through the node's tunnel.
    let serve = "mkdir -p /www && echo through-the-tunnel > /www/index.html && httpd -p 127.0.0.1:8081 -h /www";
    h.ok(&["exec", "chatty-1", "--", "sh", "-c", serve])?;
    let local = common::free_port();
    let _fwd = common::Forward::start(&h, &["port-forward", "chatty-1", &format!("{local}:8081")])?;
    let page =
        wait_for(30 * SEC, "the forwarded port", || common::http_get(local, "/").ok().filter(|p| !p.is_empty()))?;
    assert_eq!(page, "through-the-tunnel\n");
    // Samples taken offline waited in agent.db (bounded); after the heal the hub has a
    // fresh one and the node's buffer is acknowledged past them.
    wait_for(30 * SEC, "a fresh sample of site-1 at the hub", || {
        let rows: Vec<serde_json::Value> = serde_json::from_str(&h.ok(&["top", "nodes", "-o", "json"]).ok()?).ok()?;
        rows.iter().any(|r| r["name"] == "site-1" && r["time_ms"].as_u64() > Some(healed_ms)).then_some(())
    })?;
    let db = skiff_agent::state::State::open(&a.data().join("agent.db"))?;
    let offline: Vec<u64> = db
        .metrics_since(0, 10_000)?
        .into_iter()
        .filter(|(_, m)| m.time_ms > down_ms + 5_000 && m.time_ms < healed_ms)
        .map(|(id, _)| id)
        .collect();
    assert!(offline.len() >= 30, "sampled every second while offline: {}", offline.len());
    // Acknowledged (a backlog at once, a steady sample with the hub's next ping).
    let last = *offline.last().unwrap();
    wait_for(30 * SEC, "the offline samples acknowledged", || {
        let acked: u64 = db.meta("metrics_shipped").ok()??.parse().ok()?;
        (acked >= last).then_some(())
    })?;
    h.ok(&["delete", "deployment", "chatty"])?;
    wait_placed(&h, &[])?;
    drop((a, h));
    Ok(())
}

/// `waves` on three nodes: version `version`, healthy or not.
fn waved(version: &str, healthy: bool) -> String {
    format!(
        "name: waves\nservices:\n  wv:\n    image: {IMAGE}\n    environment: {{VERSION: \"{version}\"}}\n    \
         command: [sleep, '1000']\n    stop_grace_period: 1s\n    \
         healthcheck: {{test: [CMD, {}], interval: 300ms, retries: 2}}\n    \
         deploy:\n      replicas: 3\n      \
         update_config: {{order: start-first, monitor: 1s, x-skiff-wave-size: 1, x-skiff-wave-growth: 2}}\n",
        if healthy { "true" } else { "false" }
    )
}

#[test]
fn a_fleet_rollout_goes_in_growing_waves_and_a_failed_wave_rolls_back() -> R {
    skiff_testkit::require_privileged!();
    let h = hub()?;
    let token = h.ok(&["token", "create", "--ttl", "1h"])?.trim().to_string();
    let _a = agent(&h, &token, "site-a-1", &["site=a"])?;
    let _b = agent(&h, &token, "site-b-1", &["site=b"])?;
    let _c = agent(&h, &token, "site-c-1", &["site=c"])?;
    wait_for(30 * SEC, "three nodes Ready", || {
        (h.ok(&["get", "nodes"]).ok()?.matches("Ready").count() == 3).then_some(())
    })?;
    apply(&h, "waves.yaml", &waved("v1", true), &[])?;
    h.ok(&["rollout", "status", "wv", "--timeout", "60s"])?;
    let v1: Vec<InstanceStatus> = hub_instances(&h);
    let nodes: std::collections::BTreeSet<&str> = v1.iter().map(|i| i.node.as_str()).collect();
    assert_eq!(nodes.len(), 3, "one instance per node: {v1:?}");
    let old = v1[0].template.clone();

    // v2: which nodes run it, as seen from the hub, until every node does.
    apply(&h, "waves.yaml", &waved("v2", true), &[])?;
    let mut seen: Vec<usize> = vec![];
    let done = wait_for(90 * SEC, "v2 on every node", || {
        let all = hub_instances(&h);
        let new: std::collections::BTreeSet<String> =
            all.iter().filter(|i| i.template != old && !i.retiring).map(|i| i.node.clone()).collect();
        if seen.last() != Some(&new.len()) {
            seen.push(new.len());
        }
        (new.len() == 3 && all.iter().all(|i| i.template != old)).then_some(all)
    })?;
    let events = h.ok(&["get", "events"])?;
    assert!(seen.contains(&1), "the first wave is one node: {seen:?}\n{events}");
    assert!(seen.windows(2).all(|w| w[0] <= w[1]), "waves only grow: {seen:?}");
    let status = h.ok(&["rollout", "status", "wv", "--timeout", "60s"])?;
    assert!(status.contains("revision 2: complete"), "{status}");
    let events = h.ok(&["get", "events", "-o", "json"])?;
    assert_eq!(events.matches("WaveStarted").count(), 2, "1 node, then 2, then 3: {events}");
    let v2 = done[0].template.clone();

    // v3 fails its health check in the first wave: rolled back there; the other two nodes
    // never run it and their instances are untouched.
    let before: Vec<(String, Option<i32>)> =
        done.iter().filter(|i| i.node != "site-a-1").map(|i| (i.name.clone(), i.pid)).collect();
    apply(&h, "waves.yaml", &waved("v3", false), &[])?;
    let out = h.cli(&["rollout", "status", "wv", "--timeout", "90s"])?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success() && text.contains("revision 3: failed"), "{text}");
    let back = wait_for(60 * SEC, "the rollback complete", || {
        let all = hub_instances(&h);
        (all.len() == 3 && all.iter().all(|i| i.template == v2 && i.state == InstanceState::Running)).then_some(all)
    })?;
    let after: Vec<(String, Option<i32>)> =
        back.iter().filter(|i| i.node != "site-a-1").map(|i| (i.name.clone(), i.pid)).collect();
    assert_eq!(before, after, "nodes outside the failed wave kept their instances");
    let history = h.ok(&["rollout", "history", "wv"])?;
    assert!(history.contains("rollback to revision 2 (revision 3 failed)"), "{history}");
    Ok(())
}

#[test]
fn wasm_programs_go_to_nodes_offering_the_runtime_and_are_pulled_for_it() -> R {
    skiff_testkit::require_privileged!();
    skiff_testkit::require_registry_tools!();
    let reg = skiff_testkit::registry::Registry::start()?;
    let tmp = tempfile::tempdir()?;
    let push = |name: &str, module: Vec<u8>| -> R {
        let dir = tmp.path().join(name);
        skiff_testkit::wasm::write_artifact_layout(&dir, name, &module, None)?;
        reg.push(&dir, &format!("wasm/{name}:1"))
    };
    push("hello", skiff_testkit::wasm::hello()?)?;
    push("bad", skiff_testkit::wasm::bad_import()?)?;
    skiff_testkit::ImageBuilder::busybox()?.write_oci_layout(&tmp.path().join("box"), "box")?;
    reg.push(&tmp.path().join("box"), "edge/box:1")?;
    let at = |repo: &str| format!("127.0.0.1:{}/{repo}", reg.port);

    let h = hub()?;
    let token = h.ok(&["token", "create"])?.trim().to_string();
    let a = agent(&h, &token, "edge-1", &[])?;
    wait_for(30 * SEC, "the node Ready", || h.ok(&["get", "nodes"]).ok()?.contains("Ready").then_some(()))?;
    let nodes: Vec<serde_json::Value> = serde_json::from_str(&h.ok(&["get", "nodes", "-o", "json"])?)?;
    let mut offered = vec!["oci", "wasm"];
    if skiff_agent::runsc_status().is_ok() {
        offered.push("runsc");
    }
    assert_eq!(nodes[0]["runtimes"], serde_json::json!(offered), "{nodes:?}");

    // Placed by the hub, pulled for the wasm platform by the agent, its output read
    // through the tunnel.
    h.ok(&["run", &at("wasm/hello:1"), "--runtime", "wasm", "--name", "hello", "--", "x"])?;
    let i = wait_for(60 * SEC, "hello-1 to run and exit", || {
        let v: Vec<InstanceStatus> = serde_json::from_str(&h.ok(&["get", "instances", "-o", "json"]).ok()?).ok()?;
        v.into_iter().find(|i| i.name == "hello-1" && i.state == InstanceState::Exited)
    })?;
    assert_eq!((i.exit_code, i.node.as_str()), (Some(0), "edge-1"), "{i:?}");
    assert_eq!(h.ok(&["logs", "hello-1"])?, "hello from wasm\nargs: hello x\nenv: \n");

    // A program the node cannot run fails at create, with the reason and no process.
    h.ok(&["run", &at("wasm/bad:1"), "--runtime", "wasm", "--name", "bad"])?;
    let i = wait_for(60 * SEC, "bad-1 to fail", || {
        let v: Vec<InstanceStatus> = serde_json::from_str(&h.ok(&["get", "instances", "-o", "json"]).ok()?).ok()?;
        v.into_iter().find(|i| i.name == "bad-1" && i.state == InstanceState::Failed)
    })?;
    let msg = i.message.unwrap_or_default();
    assert!(msg.contains("did not start: unsupported imports: env::host_magic"), "{msg}");
    assert!(i.pid.is_none());

    // A container image is no wasm program: placed nowhere, and the apply says why.
    let out = h.cli(&["run", &at("edge/box:1"), "--runtime", "wasm", "--name", "box"])?;
    let why = "0/1 nodes are available: 1 can't run the image: it has no wasm platform";
    assert!(out.status.success() && String::from_utf8_lossy(&out.stderr).contains(why), "{out:?}");
    assert!(!hub_instances(&h).iter().any(|i| i.deployment == "box"));
    drop(a);
    Ok(())
}

/// CDI devices are node resources: the hub learns each node's device counts and places
/// instances asking for devices only where enough are free, saying why the rest wait.
#[test]
fn device_requests_are_placed_where_the_devices_are() -> R {
    skiff_testkit::require_privileged!();
    let h = hub()?;
    let token = h.ok(&["token", "create"])?.trim().to_string();
    let plain = agent(&h, &token, "plain-1", &[])?;
    let cdi = tempfile::tempdir()?;
    std::fs::write(
        cdi.path().join("accel.yaml"),
        "cdiVersion: 0.6.0\nkind: example.com/accel\ndevices:\n  - {name: '0', containerEdits: {env: [ACCEL=0], deviceNodes: [{path: /dev/accel0, hostPath: /dev/null}]}}\n",
    )?;
    let accel = agent_with(&h, &token, "accel-1", &[], &["--cdi-spec-dir", cdi.path().to_str().unwrap()])?;
    wait_ready(&h, "plain-1")?;
    wait_ready(&h, "accel-1")?;
    let nodes: Vec<serde_json::Value> = serde_json::from_str(&h.ok(&["get", "nodes", "-o", "json"])?)?;
    let of = |n: &str| nodes.iter().find(|x| x["name"] == n).map(|x| x["devices"].clone());
    assert_eq!(of("accel-1"), Some(serde_json::json!({"example.com/accel": 1})), "{nodes:?}");
    assert_eq!(of("plain-1"), Some(serde_json::Value::Null), "{nodes:?}");

    let compose = h.write(
        "infer.yaml",
        "services:\n  infer:\n    image: localhost/skiff-test:1\n    command: [sleep, '1000']\n    deploy:\n      replicas: 2\n      resources: {reservations: {devices: [{driver: example.com/accel, count: 1}]}}\n",
    )?;
    let out = h.cli(&["apply", "-f", compose.to_str().unwrap()])?;
    let why = "0/2 nodes are available: 1 Insufficient devices, 1 have none of the requested devices";
    assert!(out.status.success() && String::from_utf8_lossy(&out.stderr).contains(why), "{out:?}");
    wait_placed(&h, &[("accel-1", "infer-1")])?;
    drop((plain, accel));
    Ok(())
}

/// The hub as image proxy: an agent behind a counting link gets v2 of an app as the
/// chunks v1 lacks (the hub pulled from the registry once), runs it with the exact bytes,
/// counts where its bytes came from, and a hub copy damaged on disk is mended, not sent.
#[test]
fn an_update_through_the_hub_sends_only_the_changed_chunks() -> R {
    skiff_testkit::require_registry_tools!();
    use sha2::Digest as _;
    let reg = skiff_testkit::registry::Registry::start()?;
    let tmp = tempfile::tempdir()?;
    let old = skiff_testkit::incompressible(8 << 20, 31);
    let mut new = old.clone();
    new[4 << 20..(4 << 20) + (256 << 10)].copy_from_slice(&skiff_testkit::incompressible(256 << 10, 32));
    for (v, data) in [(1, &old), (2, &new), (3, &new)] {
        let mut l = skiff_testkit::LayerBuilder::new().file("data/blob", 0o644, data)?;
        if v > 1 {
            l = l.file("data/added", 0o644, format!("appended {}\n", v.max(2) - 1).as_bytes())?;
        }
        let dir = tmp.path().join(format!("v{v}"));
        skiff_testkit::ImageBuilder::busybox()?.layer(l.finish()?).write_oci_layout(&dir, "app")?;
        reg.push(&dir, &format!("edge/delta:{v}"))?;
    }
    let at = |v: u8| format!("127.0.0.1:{}/edge/delta:{v}", reg.port);
    // v1 and v2 are signed; the node's policy wants it (v3 is not: refused, via the hub).
    let key = tmp.path().join("fleet");
    let keys = [key.with_extension("key"), key.with_extension("pub")].map(|p| p.display().to_string());
    let h0 = Node::bare()?;
    h0.ok(&["image", "keygen", "-o", &key.display().to_string()])?;
    for v in [1, 2] {
        h0.ok(&["image", "sign", &at(v), "--key", &keys[0]])?;
    }
    let policy = tmp.path().join("policy.yaml");
    std::fs::write(
        &policy,
        format!("images:\n  - match: \"127.0.0.1:{}/edge/**\"\n    keys: [{}]\n", reg.port, keys[1]),
    )?;
    let app = |v: u8| {
        format!(
            "name: delta\nservices:\n  app:\n    image: {}\n    command: [sleep, '1000']\n    stop_grace_period: 1s\n",
            at(v)
        )
    };

    let h = hub()?;
    let token = h.ok(&["token", "create"])?.trim().to_string();
    // The agent reaches the hub through a link that counts what comes down it.
    let hub_port: u16 = h.server()?.rsplit(':').next().unwrap_or_default().parse()?;
    let link = skiff_testkit::registry::FaultProxy::start(hub_port, None, None)?;
    let mut a = Node::new()?;
    let metrics_port = common::free_port();
    let metrics = format!("127.0.0.1:{metrics_port}");
    // A hub that is down comes first: the agent joins and connects through the next one,
    // and its image pulls go to the hub it is connected to.
    let server = format!("https://127.0.0.1:{},https://127.0.0.1:{}", common::free_port(), link.port);
    let policy_arg = policy.display().to_string();
    let extra = ["--metrics-listen", metrics.as_str(), "--policy", policy_arg.as_str()];
    start_agent_in(None, &mut a, &server, Some(&token), Some("edge-1"), &[], &extra)?;
    wait_ready(&h, "edge-1")?;
    let down = || link.down.load(std::sync::atomic::Ordering::Relaxed);
    let pulled = |v: u8| -> anyhow::Result<String> {
        let since = now_ms();
        apply(&h, "app.yaml", &app(v), &[])?;
        h.ok(&["rollout", "status", "app", "--timeout", "90s"])?;
        let evs: Vec<skiff_model::EventRecord> = serde_json::from_str(&h.ok(&["get", "events", "-o", "json"])?)?;
        let e = evs.into_iter().find(|e| e.reason == "Pulled" && e.time_ms >= since && e.message.contains(&at(v)));
        Ok(e.map(|e| e.message).unwrap_or_default())
    };

    let before = down();
    let said = pulled(1)?;
    assert!(said.contains("from hub"), "{said}");
    let first = down() - before;
    assert!(first > 8 << 20, "the first version crosses whole: {first} B");

    let before = down();
    let said = pulled(2)?;
    let second = down() - before;
    assert!(said.contains("from hub"), "{said}");
    // 256 KiB changed and a file added, plus the chunks around them, the manifest, the
    // chunk lists and a few seconds of status: a small part of the 8 MiB layer.
    eprintln!("over the agent's link: v1 {first} B, v2 {second} B; the agent says: {said}");
    assert!(second < 1536 << 10, "v2 took {second} B over the link (v1 took {first} B)");
    let got = h.ok(&["exec", "app-1", "--", "sh", "-c", "sha256sum /data/blob; cat /data/added"])?;
    assert_eq!(got, format!("{}  /data/blob\nappended 1\n", hex::encode(sha2::Sha256::digest(&new))));
    // The signatures came through the hub: the node judged them before any chunk moved.
    // An unsigned v3 is refused (and stored nowhere on the node).
    let since = now_ms();
    apply(&h, "app.yaml", &app(3), &[])?;
    wait_for(60 * SEC, "v3 refused as untrusted", || {
        let evs: Vec<skiff_model::EventRecord> =
            serde_json::from_str(&h.ok(&["get", "events", "-o", "json"]).ok()?).ok()?;
        evs.into_iter().find(|e| e.reason == "Untrusted" && e.time_ms >= since && e.message.contains(&at(3)))
    })?;
    assert!(a.cli(&["image", "inspect", &at(3)])?.status.code() != Some(0));
    apply(&h, "app.yaml", &app(2), &[])?;
    h.ok(&["rollout", "status", "app", "--timeout", "90s"])?;
    // The node counts where its image bytes came from.
    let text = common::http_get(metrics_port, "/metrics")?;
    let count = |source: &str| -> u64 {
        let key = format!("skiff_image_bytes_total{{node=\"edge-1\",source=\"{source}\"}} ");
        text.lines().find_map(|l| l.strip_prefix(&key)?.parse().ok()).unwrap_or(0)
    };
    assert!(count("hub") > 8 << 20 && count("reused") > 7 << 20 && count("registry") == 0, "{text}");

    // A hub whose kept copy of v2 went bad on disk (a byte inside the edit): the hub finds
    // out before it sends the chunk, makes the copy again from the layer's blob, and the
    // node that needs those chunks gets v2 intact, through the hub.
    h.ok(&["delete", "deployment", "app"])?;
    wait_placed(&h, &[])?;
    let wiped = wait_for(30 * SEC, "the node's images removed", || {
        [1, 2]
            .iter()
            .all(|v| {
                a.cli(&["image", "rm", &at(*v)])
                    .is_ok_and(|o| o.status.success() || String::from_utf8_lossy(&o.stderr).contains("not found"))
            })
            .then_some(())
    });
    wiped?;
    // (v3 holds the same file: its copy is damaged too, whichever the hub reads from.)
    let hub_images = skiff_image::ImageStore::open(h.data().join("images"))?;
    for v in [2, 3] {
        let data = hub_images.inspect(&at(v))?.layers[1].diff_id.clone();
        let tar = hub_images.blob_path(&data)?;
        let mut bytes = std::fs::read(&tar)?;
        bytes[(4 << 20) + (128 << 10)] ^= 0x01;
        std::fs::write(&tar, &bytes)?;
    }
    let said = pulled(2)?;
    assert!(said.contains("from hub"), "{said}");
    let got = h.ok(&["exec", "app-1", "--", "sh", "-c", "sha256sum /data/blob; cat /data/added"])?;
    assert_eq!(got, format!("{}  /data/blob\nappended 1\n", hex::encode(sha2::Sha256::digest(&new))));
    let log = std::fs::read_to_string(&h.up_log).unwrap_or_default();
    assert!(log.contains("the kept tar does not match its digest"), "the hub says what it mended");
    h.ok(&["delete", "deployment", "app"])?;
    wait_placed(&h, &[])?;
    Ok(())
}

/// A site behind one WAN link: the gateway serves the site's image cache, so an image and
/// then its update cross the WAN once for three nodes; the cache is also a read-only
/// registry mirror (skopeo copies from it) and makes no pull for a caller without the
/// site's token.
#[test]
fn a_site_downloads_an_update_over_the_wan_once() -> R {
    skiff_testkit::require_registry_tools!();
    let reg = skiff_testkit::registry::Registry::start()?;
    let tmp = tempfile::tempdir()?;
    let old = skiff_testkit::incompressible(8 << 20, 41);
    let mut new = old.clone();
    new[2 << 20..(2 << 20) + (256 << 10)].copy_from_slice(&skiff_testkit::incompressible(256 << 10, 42));
    for (v, data) in [(1, &old), (2, &new)] {
        let l = skiff_testkit::LayerBuilder::new().file("data/blob", 0o644, data)?.finish()?;
        let dir = tmp.path().join(format!("v{v}"));
        skiff_testkit::ImageBuilder::busybox()?.layer(l).write_oci_layout(&dir, "app")?;
        // Named as Docker Hub names its official images, for Docker's registry mirror.
        reg.push(&dir, &format!("library/site:{v}"))?;
    }
    let at = |v: u8| format!("127.0.0.1:{}/library/site:{v}", reg.port);
    let app = |v: u8| {
        format!(
            "name: site\nservices:\n  app:\n    image: {}\n    command: [sleep, '1000']\n    stop_grace_period: 1s\n    \
             deploy: {{mode: global}}\n",
            at(v)
        )
    };
    let h = common::fleet::hub_with("127.0.0.1", &["--site-cache", "gw"])?;
    let token = h.ok(&["token", "create"])?.trim().to_string();
    let hub_port: u16 = h.server()?.rsplit(':').next().unwrap_or_default().parse()?;
    let wan = skiff_testkit::registry::FaultProxy::start(hub_port, None, None)?;
    let server = format!("https://127.0.0.1:{}", wan.port);
    let cache_port = common::free_port();
    let cache_addr = format!("127.0.0.1:{cache_port}");
    let mut gw = Node::new()?;
    let extra = ["--serve-cache", cache_addr.as_str()];
    common::fleet::start_agent_in(None, &mut gw, &server, Some(&token), Some("gw"), &["site=plant-1"], &extra)?;
    let mut nodes = vec![];
    for name in ["n1", "n2"] {
        let mut n = Node::new()?;
        start_agent(&mut n, &server, Some(&token), Some(name), &["site=plant-1"])?;
        nodes.push(n);
    }
    for name in ["gw", "n1", "n2"] {
        wait_ready(&h, name)?;
    }
    let down = || wan.down.load(std::sync::atomic::Ordering::Relaxed);
    let roll = |v: u8| -> anyhow::Result<(u64, Vec<String>)> {
        let (before, since) = (down(), now_ms());
        apply(&h, "app.yaml", &app(v), &[])?;
        h.ok(&["rollout", "status", "app", "--timeout", "120s"])?;
        let pulled = wait_for(30 * SEC, "three Pulled events", || {
            let evs: Vec<skiff_model::EventRecord> =
                serde_json::from_str(&h.ok(&["get", "events", "-o", "json"]).ok()?).ok()?;
            let p: Vec<String> = evs
                .into_iter()
                .filter(|e| e.reason == "Pulled" && e.time_ms >= since && e.message.contains(&at(v)))
                .map(|e| format!("{}: {}", e.node.unwrap_or_default(), e.message))
                .collect();
            (p.len() == 3).then_some(p)
        })?;
        Ok((down() - before, pulled))
    };
    let (first, said) = roll(1)?;
    eprintln!("v1 over the WAN: {first} B\n{}", said.join("\n"));
    for n in std::iter::once(&gw).chain(&nodes) {
        let log = std::fs::read_to_string(&n.up_log).unwrap_or_default();
        for l in log.lines().filter(|l| l.contains("not through") || l.contains("cannot help") || l.contains("failed"))
        {
            eprintln!("LOG {l}");
        }
    }
    assert!(first > 8 << 20 && first < 10 << 20, "8 MiB crossed once for three nodes, not {first} B");
    let (second, said) = roll(2)?;
    eprintln!("v2 over the WAN: {second} B\n{}", said.join("\n"));
    assert!(second < 1 << 20, "the 256 KiB edit crossed once for three nodes, not {second} B");
    for n in ["n1", "n2"] {
        assert!(
            said.iter().any(|p| p.starts_with(&format!("{n}: "))
                && p.contains("from the site cache")
                && !p.contains("(0 B of them")),
            "{n} took chunks from the cache: {said:?}"
        );
    }

    // A read-only registry mirror: skopeo copies v2 from the cache, and a Docker daemon
    // with the cache as its registry mirror pulls `site:2` (Docker Hub is out of reach:
    // only the mirror can have answered).
    let copied = tmp.path().join("copied");
    let out = std::process::Command::new("skopeo")
        .args(["copy", "-q", "--src-tls-verify=false", &format!("docker://{cache_addr}/library/site:2")])
        .arg(format!("oci:{}:site", copied.display()))
        .output()?;
    assert!(out.status.success(), "skopeo: {}", String::from_utf8_lossy(&out.stderr));
    let docker = skiff_testkit::Dockerd::start(
        &tmp.path().join("docker"),
        &["--registry-mirror", &format!("http://{cache_addr}"), "--insecure-registry", &cache_addr],
    )?;
    docker.cli(&["pull", "-q", "site:2"])?;
    let layers = docker.cli(&["image", "inspect", "-f", "{{json .RootFS.Layers}}", "site:2"])?;
    let want: Vec<String> = skiff_image::ImageStore::open(gw.data().join("images"))?
        .inspect(&at(2))?
        .layers
        .into_iter()
        .map(|l| l.diff_id)
        .collect();
    assert_eq!(serde_json::from_str::<Vec<String>>(&layers)?, want, "Docker holds the same layers");
    drop(docker);
    // No pull for a caller without the site's token.
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", cache_port))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let body = format!("{{\"reference\":\"{}\",\"platform\":\"linux/amd64\"}}", at(1));
    write!(
        s,
        "POST /skiff/v1/images/resolve HTTP/1.0\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut answer = String::new();
    s.read_to_string(&mut answer)?;
    assert!(answer.starts_with("HTTP/1.0 401") || answer.starts_with("HTTP/1.1 401"), "{answer}");
    h.ok(&["delete", "deployment", "app"])?;
    wait_placed(&h, &[])?;
    drop(nodes);
    Ok(())
}

/// A pull through the hub killed half-way (the agent SIGKILLed over a slow link) resumes
/// from the chunks it kept: the image crosses the link about once, not once and a half.
#[test]
fn a_pull_killed_half_way_resumes_from_the_chunks_it_kept() -> R {
    skiff_testkit::require_registry_tools!();
    let reg = skiff_testkit::registry::Registry::start()?;
    let tmp = tempfile::tempdir()?;
    let data = skiff_testkit::incompressible(16 << 20, 51);
    let l = skiff_testkit::LayerBuilder::new().file("data/blob", 0o644, &data)?.finish()?;
    skiff_testkit::ImageBuilder::busybox()?.layer(l).write_oci_layout(&tmp.path().join("v1"), "app")?;
    reg.push(&tmp.path().join("v1"), "edge/big:1")?;
    let image = format!("127.0.0.1:{}/edge/big:1", reg.port);
    let h = hub()?;
    let token = h.ok(&["token", "create"])?.trim().to_string();
    let hub_port: u16 = h.server()?.rsplit(':').next().unwrap_or_default().parse()?;
    // 2 MiB/s per connection: the 16 MiB layer takes seconds, time to pull the plug.
    let link = skiff_testkit::registry::FaultProxy::start_with(hub_port, None, None, Some(2 << 20))?;
    let server = format!("https://127.0.0.1:{}", link.port);
    let mut a = Node::new()?;
    start_agent(&mut a, &server, Some(&token), Some("edge-1"), &[])?;
    wait_ready(&h, "edge-1")?;
    let down = || link.down.load(std::sync::atomic::Ordering::Relaxed);
    let before = down();
    apply(&h, "big.yaml", &format!("services:\n  big:\n    image: {image}\n    command: [sleep, '1000']\n"), &[])?;
    let pool = |a: &Node| -> u64 {
        std::fs::read_dir(a.data().join("images/tmp"))
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("partial-chunks-"))
            .filter_map(|e| e.metadata().ok())
            .map(|m| m.len())
            .sum()
    };
    wait_for(60 * SEC, "6 MiB of chunks kept", || (pool(&a) > 6 << 20).then_some(()))?;
    a.kill_up()?;
    let kept = pool(&a);
    let first = down() - before;
    start_agent(&mut a, &server, None, None, &[])?;
    h.ok(&["rollout", "status", "big", "--timeout", "120s"])?;
    let total = down() - before;
    eprintln!("kept {kept} B at the kill ({first} B had crossed); {total} B in all for a {} B layer", data.len());
    assert!(pool(&a) == 0, "the pool goes once the image is stored");
    assert!(total < data.len() as u64 + (3 << 20), "resumed, not started over: {total} B for {} B", data.len());
    let got = h.ok(&["exec", "big-1", "--", "sha256sum", "/data/blob"])?;
    use sha2::Digest as _;
    assert!(got.starts_with(&hex::encode(sha2::Sha256::digest(&data))), "{got}");
    h.ok(&["delete", "deployment", "big"])?;
    wait_placed(&h, &[])?;
    Ok(())
}

/// A compose service with only a `build:` on a fleet: `skiff apply` builds it where it
/// runs (buildah), hands the image to the hub, and the node pulls it through the hub's
/// image proxy (no registry anywhere) and runs it by digest. The same build is not sent
/// again; a changed one rolls the service.
#[test]
fn an_image_built_by_the_operator_reaches_fleet_nodes_through_the_hub() -> R {
    skiff_testkit::require_privileged!();
    let h = hub()?;
    let token = h.ok(&["token", "create"])?.trim().to_string();
    let _a = agent(&h, &token, "edge-1", &[])?;
    wait_ready(&h, "edge-1")?;
    let ctx = h.dir.path().join("app");
    std::fs::create_dir_all(&ctx)?;
    std::fs::copy("/bin/busybox", ctx.join("busybox"))?;
    std::fs::write(
        ctx.join("Dockerfile"),
        "FROM scratch\nCOPY busybox /bin/busybox\nCOPY msg /msg\nCMD [\"/bin/busybox\", \"sleep\", \"1000\"]\n",
    )?;
    std::fs::write(ctx.join("msg"), "v1\n")?;
    let compose =
        h.write("compose.yaml", "name: bt\nservices:\n  app:\n    build: ./app\n    stop_grace_period: 1s\n")?;
    let file = compose.to_str().unwrap();
    let first = h.cli(&["apply", "-f", file])?;
    let said = String::from_utf8_lossy(&first.stderr).to_string();
    assert!(first.status.success() && said.contains("sending localhost/bt-app:latest to the hub"), "{said}");
    wait_placed(&h, &[("edge-1", "app-1")])?;
    assert_eq!(h.ok(&["exec", "app-1", "--", "/bin/busybox", "cat", "/msg"])?, "v1\n");
    let image = |h: &Node| -> String {
        let out = h.ok(&["get", "deployments", "app", "-o", "json"]).unwrap();
        let d: serde_json::Value = serde_json::from_str(&out).unwrap();
        let d = if d.is_array() { d[0].clone() } else { d };
        d["spec"]["image"].as_str().map(str::to_string).unwrap_or(out)
    };
    let v1 = image(&h);
    assert!(v1.starts_with("localhost/bt-app@sha256:"), "run by digest: {v1}");
    // The same build again: nothing sent, nothing changed.
    let again = h.cli(&["apply", "-f", file])?;
    let said = String::from_utf8_lossy(&again.stderr).to_string();
    assert!(again.status.success() && said.contains("is on the hub already"), "{said}");
    assert!(!said.contains("sending"), "{said}");
    assert_eq!(image(&h), v1);
    // A dry run builds nothing and plans against the build that runs.
    let plan = h.ok(&["apply", "--dry-run", "-f", file])?;
    assert!(plan.contains("deployment app unchanged (dry run)"), "{plan}");
    // A changed build: a new digest, and the node runs it.
    std::fs::write(ctx.join("msg"), "v2\n")?;
    h.ok(&["apply", "-f", file])?;
    assert_ne!(image(&h), v1);
    wait_for(90 * SEC, "app-1 on the new build", || {
        (h.ok(&["exec", "app-1", "--", "/bin/busybox", "cat", "/msg"]).ok()? == "v2\n").then_some(())
    })?;
    Ok(())
}
