//! The verbs Docker and kubectl users type from habit, end to end on one node (real
//! `skiff up`, real runc): ps, get NAME / -l / -o wide, scale, restart, stop/start, apply
//! from standard input and from several files, delete -f / down -f, version, and logs
//! with a time window.

#![allow(clippy::unwrap_used)] // tests may panic on setup failures

mod common;

use anyhow::Context;
use common::{wait_for, Node, IMAGE};
use skiff_testkit::require_privileged;
use std::time::Duration;

type R = anyhow::Result<()>;
const SEC: Duration = Duration::from_secs(1);

fn k8s(name: &str, replicas: u32, labels: &str) -> String {
    format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: {name}\n  labels: {{{labels}}}\nspec:\n  replicas: {replicas}\n  \
         selector: {{matchLabels: {{app: {name}}}}}\n  template:\n    metadata: {{labels: {{app: {name}}}}}\n    spec:\n      \
         terminationGracePeriodSeconds: 1\n      containers:\n      - name: main\n        image: {IMAGE}\n        command: [sh, -c, 'echo hello from {name}; sleep 1000']\n"
    )
}

fn instance_names(n: &Node) -> Vec<String> {
    n.instances().unwrap_or_default().into_iter().map(|i| i.name).collect()
}

#[test]
fn day_two_verbs_do_what_docker_and_kubectl_users_expect() -> R {
    require_privileged!();
    let mut n = Node::new()?;
    n.up(None)?;

    // apply from standard input, and from several files at once (kubectl's way).
    let out = n.cli_input(&["apply", "-f", "-"], k8s("front", 1, "tier: web").as_bytes())?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (a, b) =
        (n.write("a.yaml", &k8s("api", 1, "tier: backend"))?, n.write("b.yaml", &k8s("db", 1, "tier: backend"))?);
    n.ok(&["apply", "-f", a.to_str().unwrap(), "-f", b.to_str().unwrap()])?;
    for i in ["front-1", "api-1", "db-1"] {
        n.wait_running(i)?;
    }
    let compose = n.write(
        "compose.yaml",
        &format!("name: shop\nservices:\n  cart:\n    image: {IMAGE}\n    command: [sleep, '1000']\n    stop_grace_period: 1s\n"),
    )?;
    let twice = n.cli(&["apply", "-f", compose.to_str().unwrap(), "-f", a.to_str().unwrap()])?;
    assert!(String::from_utf8_lossy(&twice.stderr).contains("apply one compose file at a time"), "{twice:?}");
    n.ok(&["apply", "-f", compose.to_str().unwrap()])?;
    n.wait_running("cart-1")?;

    // get NAME, -l, -o wide; ps.
    let one = n.ok(&["get", "deployments", "api"])?;
    assert!(one.contains("api") && !one.contains("front"), "{one}");
    let missing = n.cli(&["get", "deployments", "nope"])?;
    assert!(String::from_utf8_lossy(&missing.stderr).contains("deployment \"nope\" not found"), "{missing:?}");
    let backend = n.ok(&["get", "deployments", "-l", "tier=backend", "-o", "json"])?;
    let names: Vec<String> = serde_json::from_str::<Vec<serde_json::Value>>(&backend)?
        .iter()
        .map(|d| d["spec"]["name"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(names, ["api", "db"]);
    let not_web = n.ok(&["get", "instances", "-l", "tier!=web,tier", "-o", "json"])?;
    assert!(not_web.contains("api-1") && not_web.contains("db-1") && !not_web.contains("front-1"), "{not_web}");
    let bad = n.cli(&["get", "nodes", "-l", "x=y"])?;
    assert!(String::from_utf8_lossy(&bad.stderr).contains("-l: only deployments"), "{bad:?}");
    let names = n.ok(&["get", "deployments", "-l", "tier=backend", "-o", "jsonpath={.items[*].spec.name}"])?;
    assert_eq!(names, "api db");
    let range = "jsonpath={range .items[*]}{.name}:{.state}{\"\\n\"}{end}";
    let each = n.ok(&["get", "instances", "-l", "tier=backend", "-o", range])?;
    assert_eq!(each, "api-1:running\ndb-1:running\n");
    assert_eq!(n.ok(&["get", "instances", "api-1", "-o", "jsonpath={.name}"])?, "api-1", "one named: the root");
    let bad = n.cli(&["get", "deployments", "-o", "jsonpath={.items[*}"])?;
    assert!(String::from_utf8_lossy(&bad.stderr).contains("without its ']'"), "{bad:?}");
    let wide = n.ok(&["get", "instances", "-o", "wide"])?;
    assert!(wide.lines().next().unwrap_or_default().contains("NODE") && wide.contains(IMAGE), "{wide}");
    let ps = n.ok(&["ps"])?;
    assert!(ps.contains("cart-1") && ps.contains("front-1"), "{ps}");

    // scale: up and down, several at once; bad input changes nothing.
    n.ok(&["scale", "api=3", "db=0"])?;
    wait_for(60 * SEC, "api scaled to 3, db to 0", || {
        let names = instance_names(&n);
        let api = names.iter().filter(|i| i.starts_with("api-")).count();
        (api == 3 && !names.iter().any(|i| i.starts_with("db-"))).then_some(())
    })?;
    let bad = n.cli(&["scale", "api=1", "front=x"])?;
    assert!(String::from_utf8_lossy(&bad.stderr).contains("\"front=x\": \"x\" is not a replica count"), "{bad:?}");
    assert_eq!(instance_names(&n).iter().filter(|i| i.starts_with("api-")).count(), 3, "nothing half-applied");

    // restart replaces every instance (new containers), by the update strategy; a
    // `logs -f` of the deployment follows the new container too.
    let mut follow = std::process::Command::new(common::bin())
        .args(["--data", n.data().to_str().unwrap(), "logs", "-f", "front"])
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let followed = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let (mut out, got) = (follow.stdout.take().unwrap(), std::sync::Arc::clone(&followed));
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(k) = std::io::Read::read(&mut out, &mut buf) {
            if k == 0 {
                return;
            }
            got.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..k]));
        }
    });
    wait_for(30 * SEC, "the first container's line", || {
        followed.lock().unwrap().contains("hello from front").then_some(())
    })?;
    assert!(
        followed.lock().unwrap().contains("front-1 | hello from front"),
        "a deployment's lines name their instance"
    );
    let before = n.instance("front-1")?.container_id;
    n.ok(&["restart", "front"])?;
    wait_for(60 * SEC, "front-1 replaced", || {
        let i = n.instance("front-1").ok()?;
        (i.container_id != before && i.state == skiff_model::InstanceState::Running).then_some(())
    })?;
    wait_for(30 * SEC, "the new container's line in the same logs -f", || {
        (followed.lock().unwrap().matches("hello from front").count() >= 2).then_some(())
    })?;
    // (kept running: it ends by itself when `front` is deleted, below)

    // Applying the unchanged file again keeps the restart: nothing is replaced (as
    // kubectl keeps its restart annotation).
    let again = n.cli_input(&["apply", "-f", "-"], k8s("front", 1, "tier: web").as_bytes())?;
    assert_eq!(String::from_utf8_lossy(&again.stdout).trim(), "deployment front unchanged", "{again:?}");

    // stop keeps the count, start brings it back; a scale in between is what start uses.
    n.ok(&["stop", "api"])?;
    wait_for(60 * SEC, "api stopped", || (!instance_names(&n).iter().any(|i| i.starts_with("api-"))).then_some(()))?;
    n.ok(&["start", "api"])?;
    wait_for(60 * SEC, "api back at 3", || {
        (instance_names(&n).iter().filter(|i| i.starts_with("api-")).count() == 3).then_some(())
    })?;
    n.ok(&["stop", "api"])?;
    n.ok(&["scale", "api=2"])?;
    n.ok(&["stop", "api"])?;
    n.ok(&["start", "api"])?;
    wait_for(60 * SEC, "api at the 2 it was scaled to", || {
        (instance_names(&n).iter().filter(|i| i.starts_with("api-")).count() == 2).then_some(())
    })?;

    // One instance: restart replaces it alone (a new process in its slot); its sibling
    // runs on. stop holds one stopped, whatever its restart policy, until start.
    let (one, other) = (n.wait_running("api-1")?, n.wait_running("api-2")?);
    let said = n.ok(&["restart", "api-1"])?;
    assert!(said.contains("instance api-1 restarting"), "{said}");
    wait_for(60 * SEC, "api-1 replaced", || {
        let i = n.instance("api-1").ok()?;
        (i.state == skiff_model::InstanceState::Running && i.pid.is_some() && i.pid != one.pid).then_some(())
    })?;
    std::thread::sleep(3 * SEC);
    assert_eq!(n.instance("api-2")?.pid, other.pid, "its sibling was not touched");
    let api: serde_json::Value = serde_json::from_str(&n.ok(&["get", "deployments", "api", "-o", "json"])?)?;
    let api = if api.is_array() { api[0].clone() } else { api };
    assert_eq!(api["spec"]["name"], "api", "{api}");
    assert!(api["spec"]["labels"].get("skiff.dev/restarted-at").is_none(), "not a deployment restart: {api}");
    let api1 = n.wait_running("api-1")?;
    assert!(n.ok(&["stop", "api-2"])?.contains("instance api-2 stopping"));
    let stopped = wait_for(60 * SEC, "api-2 stopped", || {
        n.instance("api-2").ok().filter(|i| i.state == skiff_model::InstanceState::Exited)
    })?;
    assert!(stopped.message.as_deref().unwrap_or_default().contains("stopped by request"), "{stopped:?}");
    // Its restart policy (always) does not bring it back while it is held.
    std::thread::sleep(3 * SEC);
    assert_eq!(n.instance("api-2")?.state, skiff_model::InstanceState::Exited);
    assert_eq!(n.instance("api-1")?.pid, api1.pid, "its sibling runs on");
    assert!(n.ok(&["start", "api-2"])?.contains("instance api-2 starting"));
    wait_for(60 * SEC, "api-2 running again", || {
        let i = n.instance("api-2").ok()?;
        (i.state == skiff_model::InstanceState::Running && i.pid.is_some() && i.pid != other.pid).then_some(())
    })?;
    let missing = n.cli(&["restart", "nothing-9"])?;
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no deployment or instance named \"nothing-9\""));

    // --log-opt: this deployment's log files rotate at 16 KiB, two kept.
    let talk = "i=0; while [ $i -lt 3000 ]; do echo line-$i-padding-padding-padding; i=$((i+1)); done; sleep 1000";
    n.ok(&[
        "run",
        IMAGE,
        "--name",
        "talk",
        "--log-opt",
        "max-size=16k",
        "--log-opt",
        "max-file=2",
        "--",
        "sh",
        "-c",
        talk,
    ])?;
    let talk1 = n.wait_running("talk-1")?;
    let dir = n.data().join("instances").join(&talk1.container_id);
    wait_for(30 * SEC, "the log rotated", || dir.join("container.log.1").exists().then_some(()))?;
    wait_for(30 * SEC, "every line written", || {
        std::fs::read_to_string(dir.join("container.log")).ok()?.contains("line-2999-").then_some(())
    })?;
    assert!(!dir.join("container.log.2").exists(), "two files kept in all");
    for f in ["container.log", "container.log.1"] {
        let size = std::fs::metadata(dir.join(f))?.len();
        assert!(size <= (16 << 10) + 256, "{f}: {size} bytes");
    }
    let bad = n.cli(&["run", IMAGE, "--name", "nope", "--log-opt", "max-size=lots"])?;
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--log-opt max-size: \"lots\" is not a size"), "{bad:?}");
    let bad = n.cli(&["run", IMAGE, "--name", "nope", "--log-opt", "mode=non-blocking"])?;
    assert!(
        String::from_utf8_lossy(&bad.stderr)
            .contains("--log-opt mode: the json-file driver takes max-size and max-file"),
        "{bad:?}"
    );
    n.ok(&["delete", "deployment", "talk"])?;

    // logs with a time window.
    let all = n.ok(&["logs", "front-1"])?;
    assert!(all.contains("hello from front"), "{all}");
    assert_eq!(n.ok(&["logs", "front-1", "--until", "2000-01-01T00:00:00Z"])?, "", "nothing before 2000");
    assert!(n.ok(&["logs", "front-1", "--since", "1h"])?.contains("hello from front"));
    let later = n.ok(&["logs", "front-1", "--since", "2999-01-01T00:00:00Z"])?;
    assert_eq!(later, "", "nothing written yet in 2999");
    let bad = n.cli(&["logs", "front-1", "--since", "yesterday"])?;
    assert!(String::from_utf8_lossy(&bad.stderr).contains("neither a duration"), "{bad:?}");

    // version: this program, the hub, the node's agent and runc.
    let v = n.ok(&["version"])?;
    let me = env!("CARGO_PKG_VERSION");
    assert!(v.contains(&format!("client: skiff {me}")) && v.contains(&format!("hub: skiff {me}")), "{v}");
    assert!(
        v.lines().any(|l| l.starts_with("node ") && l.contains(&format!("skiff {me}")) && l.contains("runc ")),
        "{v}"
    );

    // --log-format json: every log line one JSON object (for log shippers).
    let out = std::process::Command::new(common::bin())
        .args(["--data", n.data().to_str().unwrap(), "get", "nodes", "-o", "json"])
        .env("RUST_LOG", "debug")
        .env("SKIFF_LOG_FORMAT", "json")
        .output()?;
    let logs = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && !logs.trim().is_empty(), "{out:?}");
    for line in logs.lines() {
        let v: serde_json::Value = serde_json::from_str(line).map_err(|e| anyhow::anyhow!("{line:?}: {e}"))?;
        assert!(v["level"].is_string() && v["timestamp"].is_string(), "{line}");
    }

    // delete -f / down -f remove what the files applied.
    n.ok(&["delete", "-f", a.to_str().unwrap(), "-f", b.to_str().unwrap()])?;
    n.ok(&["down", "-f", compose.to_str().unwrap()])?;
    let gone = n.cli(&["delete", "-f", a.to_str().unwrap()])?;
    assert!(gone.status.success() && String::from_utf8_lossy(&gone.stderr).contains("deployment api was not there"));
    wait_for(60 * SEC, "only front left", || (instance_names(&n) == ["front-1"]).then_some(()))?;
    // The `logs -f front` started before the restart ends once front is deleted.
    n.ok(&["delete", "deployment", "front"])?;
    let ended = wait_for(60 * SEC, "logs -f to end with its deployment", || follow.try_wait().ok().flatten());
    if ended.is_err() {
        let _ = follow.kill();
    }
    assert!(ended?.success());
    // `top` shows no instance that is gone, though the node's newest sample still has it.
    let top = n.ok(&["top", "instances", "-o", "json"])?;
    assert!(!top.contains("\"api-") && !top.contains("\"cart-") && !top.contains("\"front-"), "{top}");
    Ok(())
}

/// One rule for `skiff up`'s end: Ctrl-C stops everything the node runs and leaves nothing
/// behind (the given stack is removed; other deployments are kept and come back with the
/// next `skiff up`); SIGTERM leaves everything running (tested in `package.rs`).
#[test]
fn ctrl_c_stops_everything_and_the_next_up_starts_what_was_kept() -> R {
    require_privileged!();
    let mut n = Node::new()?;
    let compose = n.write(
        "compose.yaml",
        &format!("name: st\nservices:\n  svc:\n    image: {IMAGE}\n    command: [sleep, '1000']\n    stop_grace_period: 1s\n"),
    )?;
    n.up(Some(&compose))?;
    n.ok(&["run", IMAGE, "--name", "extra", "--stop-timeout", "1", "--", "sleep", "1000"])?;
    n.wait_running("svc-1")?;
    n.wait_running("extra-1")?;
    n.interrupt_up()?;
    let runc =
        std::process::Command::new("runc").arg("--root").arg(n.data().join("runc")).args(["list", "-q"]).output()?;
    assert_eq!(String::from_utf8_lossy(&runc.stdout).trim(), "", "no container left running");
    let id = skiff_agent::state::State::open(&n.data().join("agent.db"))?.meta("node_id")?.unwrap_or_default();
    assert!(skiff_runtime::network::list_netns(&format!("skiff-{id}-")).is_empty(), "no network namespace left");
    n.up(None)?;
    n.wait_running("extra-1")?;
    let names = instance_names(&n);
    assert!(!names.iter().any(|i| i.starts_with("svc-")), "the stack Ctrl-C stopped is gone: {names:?}");
    Ok(())
}

/// A Kubernetes StatefulSet on one node (real runc): pods named from 0, each started once
/// the one before it is ready (its exec readiness probe), each with a volume of its own
/// that it finds again after a scale down and up, and a stable name through the headless
/// service in `/etc/hosts` and the node's DNS.
#[test]
fn a_stateful_set_starts_in_order_and_keeps_each_pods_volume() -> R {
    require_privileged!();
    let mut n = Node::new()?;
    n.up(None)?;
    let set = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: db}}\nspec:\n  clusterIP: None\n  selector: {{app: web}}\n  \
         ports: [{{port: 80}}]\n---\napiVersion: apps/v1\nkind: StatefulSet\nmetadata: {{name: web}}\nspec:\n  \
         serviceName: db\n  replicas: 3\n  selector: {{matchLabels: {{app: web}}}}\n  template:\n    metadata: \
         {{labels: {{app: web}}}}\n    spec:\n      terminationGracePeriodSeconds: 1\n      containers:\n      - name: main\n        image: {IMAGE}\n        \
         command: [sleep, '1000']\n        readinessProbe: {{exec: {{command: [test, -f, /tmp/ready]}}, periodSeconds: 1}}\n        \
         volumeMounts: [{{name: data, mountPath: /data}}]\n  volumeClaimTemplates:\n  - metadata: {{name: data}}\n    \
         spec: {{accessModes: [ReadWriteOnce], resources: {{requests: {{storage: 1Gi}}}}}}\n"
    );
    let file = n.write("set.yaml", &set)?;
    n.ok(&["apply", "-f", file.to_str().unwrap()])?;
    n.wait_running("web-0")?;
    // web-0's probe fails until told otherwise: three failures make it unhealthy, and
    // web-1 has not started meanwhile.
    wait_for(60 * SEC, "web-0 unhealthy", || {
        (n.instance("web-0").ok()?.health == Some(skiff_model::Health::Unhealthy)).then_some(())
    })?;
    let waiting = n.instance("web-1")?;
    assert_eq!(waiting.state, skiff_model::InstanceState::Pending, "{waiting:?}");
    assert_eq!(waiting.message.as_deref(), Some("waiting for web-0 to be ready (ordered start)"));
    assert!(n.instance("web-2").is_ok_and(|i| i.state == skiff_model::InstanceState::Pending));
    for (i, name) in ["web-0", "web-1", "web-2"].iter().enumerate() {
        n.wait_running(name)?;
        n.ok(&["exec", name, "--", "sh", "-c", &format!("echo {name} > /data/who; touch /tmp/ready")])?;
        if let Some(next) = ["web-1", "web-2"].get(i) {
            n.wait_running(next)?;
        }
    }
    // Each its own volume, made under the node's data directory by Kubernetes' claim name.
    for name in ["web-0", "web-1", "web-2"] {
        let file = n.data().join(format!("volumes/data-{name}/_data/who"));
        assert_eq!(std::fs::read_to_string(&file)?.trim(), name, "{}", file.display());
    }
    // Stable names: web-0.db, as /etc/hosts and the node's DNS give them to a peer.
    let ip0 = n.instance("web-0")?.ip.unwrap_or_default();
    let hosts = n.ok(&["exec", "web-1", "--", "cat", "/etc/hosts"])?;
    assert!(hosts.lines().any(|l| l.starts_with(&format!("{ip0}\t")) && l.contains(" web-0.db ")), "{hosts}");
    let dns = n.ok(&["exec", "web-1", "--", "nslookup", "web-0.db.default.svc.cluster.local"])?;
    assert!(dns.contains(&ip0), "{dns}");

    // Down to 1 (from the top), up to 2: web-1 finds its own data again.
    n.ok(&["scale", "web=1"])?;
    wait_for(60 * SEC, "web scaled to 1", || (instance_names(&n) == ["web-0"]).then_some(()))?;
    n.ok(&["scale", "web=2"])?;
    n.wait_running("web-1")?;
    assert_eq!(n.ok(&["exec", "web-1", "--", "cat", "/data/who"])?.trim(), "web-1");
    // Deleting the set keeps the volumes (Kubernetes' Retain), as it keeps claims.
    n.ok(&["delete", "deployment", "web"])?;
    wait_for(60 * SEC, "web gone", || instance_names(&n).is_empty().then_some(()))?;
    assert!(n.data().join("volumes/data-web-2/_data/who").exists());
    Ok(())
}

/// A pod of two containers: the second runs beside each instance of the first, in its
/// network (`localhost` is the first's) with the pod's emptyDir shared; a Service reaches
/// the first; scaling the first scales both; deleting it deletes both.
#[test]
fn a_pods_second_container_shares_its_network_and_volume_and_follows_its_scale() -> R {
    require_privileged!();
    let mut n = Node::new()?;
    n.up(None)?;
    let port = common::free_port();
    let pod = n.write(
        "pod.yaml",
        &format!(
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: web}}\nspec:\n  selector: {{matchLabels: {{app: web}}}}\n  \
             template:\n    metadata: {{labels: {{app: web}}}}\n    spec:\n      terminationGracePeriodSeconds: 1\n      containers:\n      - name: app\n        \
             image: {IMAGE}\n        command: [httpd, -f, -p, '80', -h, /www]\n        \
             ports: [{{containerPort: 80, name: http}}]\n        volumeMounts: [{{name: www, mountPath: /www}}]\n      \
             - name: writer\n        image: {IMAGE}\n        \
             command: [sh, -c, 'echo from-the-writer > /out/index.html && exec sleep 1000']\n        \
             volumeMounts: [{{name: www, mountPath: /out}}]\n      volumes: [{{name: www, emptyDir: {{}}}}]\n---\n\
             apiVersion: v1\nkind: Service\nmetadata: {{name: front}}\nspec:\n  type: NodePort\n  selector: {{app: web}}\n  \
             ports: [{{port: 8080, targetPort: http, nodePort: {port}}}]\n"
        ),
    )?;
    n.ok(&["apply", "-f", pod.to_str().unwrap()])?;
    n.wait_running("web-1")?;
    n.wait_running("web-writer-1")?;
    // What the writer put in the pod's volume is what the first serves, through the Service.
    let got = wait_for(60 * SEC, "the Service's node port", || {
        common::http_get(port, "/").ok().filter(|b| b.contains("from-the-writer"))
    })?;
    assert_eq!(got.trim(), "from-the-writer");
    // One network: the writer reaches the first on its own localhost.
    let local = n.ok(&["exec", "web-writer-1", "--", "wget", "-q", "-O", "-", "http://127.0.0.1/"])?;
    assert_eq!(local.trim(), "from-the-writer");
    // Scaling the first scales the pod.
    n.ok(&["scale", "web=2"])?;
    n.wait_running("web-writer-2")?;
    n.wait_running("web-2")?;
    assert_eq!(instance_names(&n), ["web-1", "web-2", "web-writer-1", "web-writer-2"]);
    let second = n.ok(&["exec", "web-writer-2", "--", "wget", "-q", "-O", "-", "http://127.0.0.1/"])?;
    assert_eq!(second.trim(), "from-the-writer");
    // The other container is counted, rolled out and scaled as the first's.
    let listed = n.ok(&["get", "deployments"])?;
    assert!(listed.lines().any(|l| l.starts_with("web-writer ") && l.contains(" 2/2 ")), "{listed}");
    let status = n.ok(&["rollout", "status", "web-writer", "--timeout", "60s"])?;
    assert!(status.contains("complete (2 of 2 updated, 2 ready"), "{status}");
    let out = n.cli(&["scale", "web-writer=3"])?;
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && said.contains("another container of web's pods"), "{said}");
    // Applied again without the writer: the pod's template is whole, the writer goes.
    let text = std::fs::read_to_string(&pod)?;
    let (head, rest) = text.split_once("      - name: writer").ok_or_else(|| anyhow::anyhow!("the writer"))?;
    let alone = format!("{head}{}", &rest[rest.find("      volumes:").ok_or_else(|| anyhow::anyhow!("volumes"))?..]);
    std::fs::write(&pod, alone)?;
    let out = n.ok(&["apply", "-f", pod.to_str().unwrap()])?;
    assert!(out.contains("deployment web-writer deleted: no longer a container of web's pods"), "{out}");
    // (The manifest names no replicas: one, as applied.)
    wait_for(60 * SEC, "the writer gone", || (instance_names(&n) == ["web-1"]).then_some(()))
        .with_context(|| format!("{:#?}", n.instances().ok()))?;
    // The pod goes whole.
    n.ok(&["delete", "deployment", "web"])?;
    wait_for(60 * SEC, "the pod gone", || instance_names(&n).is_empty().then_some(()))?;
    assert!(n.cli(&["get", "deployment", "web-writer"])?.status.code() != Some(0));
    Ok(())
}

/// A Service applied before the Deployment it selects (kubectl applies each object on its
/// own): kept by the hub, it reaches the Deployment applied later, its targetPort named
/// by the container's port; `delete -f` forgets it.
#[test]
fn a_service_applied_before_its_deployment_reaches_it() -> R {
    require_privileged!();
    let mut n = Node::new()?;
    n.up(None)?;
    let port = common::free_port();
    let svc = n.write(
        "svc.yaml",
        &format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: front}}\nspec:\n  type: NodePort\n  selector: {{app: web}}\n  \
             ports: [{{port: 8080, targetPort: http, nodePort: {port}}}]\n"
        ),
    )?;
    let out = n.cli(&["apply", "-f", svc.to_str().unwrap()])?;
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && said.contains("Service/front: selects no workload"), "{said}");
    let deploy = n.write(
        "web.yaml",
        &format!(
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: web}}\nspec:\n  selector: {{matchLabels: {{app: web}}}}\n  \
             template:\n    metadata: {{labels: {{app: web}}}}\n    spec:\n      containers:\n      - name: web\n        \
             image: {IMAGE}\n        command: [sh, -c, 'mkdir -p /www && echo hi > /www/index.html && exec httpd -f -p 80 -h /www']\n        \
             ports: [{{containerPort: 80, name: http}}]\n"
        ),
    )?;
    n.ok(&["apply", "-f", deploy.to_str().unwrap()])?;
    n.wait_running("web-1")?;
    let got = wait_for(60 * SEC, "the Service's node port", || common::http_get(port, "/").ok())?;
    assert_eq!(got.trim(), "hi");
    assert_eq!(n.ok(&["delete", "-f", svc.to_str().unwrap()])?.trim(), "service front deleted");
    let again = n.cli(&["delete", "-f", svc.to_str().unwrap()])?;
    assert!(String::from_utf8_lossy(&again.stderr).contains("service front was not there"), "{again:?}");
    Ok(())
}
