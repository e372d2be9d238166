//! The hub's store as an operator moves it: a hub on a real etcd, a backup taken while it
//! runs, a new hub machine restored from it, and a move from SQLite to etcd; the node's
//! workload runs on untouched through all of it.

#![cfg(feature = "etcd")]
#![allow(clippy::unwrap_used)] // tests may panic on setup failures

mod common;

use common::fleet::{agent, hub_instances, hub_with, start_agent_in, wait_placed, wait_ready};
use common::{free_port, wait_for, Node, IMAGE};
use skiff_model::InstanceState;
use skiff_testkit::etcd::Etcd;
use std::time::Duration;

type R = anyhow::Result<()>;
const SEC: Duration = Duration::from_secs(1);

fn pids(h: &Node) -> Vec<(String, Option<i32>)> {
    let mut v: Vec<_> = hub_instances(h).into_iter().map(|i| (i.name, i.pid)).collect();
    v.sort();
    v
}

/// `skiff hub` on `h`'s data directory, listening on `port`, with `extra` arguments.
fn start_hub(h: &mut Node, port: &str, extra: &[&str]) -> R {
    let listen = format!("127.0.0.1:{port}");
    let mut args = vec!["hub", "--listen", &listen, "--advertise", "127.0.0.1"];
    args.extend(extra);
    let _ = std::fs::remove_file(h.data().join("admin.conf"));
    h.spawn(&args)?;
    wait_for(30 * SEC, "the hub", || {
        (h.data().join("admin.conf").exists() && h.cli(&["get", "nodes"]).ok()?.status.success()).then_some(())
    })
}

#[test]
fn a_hub_on_etcd_is_backed_up_restored_elsewhere_and_moved_back_while_its_node_runs_on() -> R {
    skiff_testkit::require_privileged!();
    let e = Etcd::start(1)?;
    let fleet = e.url("/fleet");
    let mut a = hub_with("127.0.0.1", &["--store", &fleet])?;
    let token = a.ok(&["token", "create"])?.trim().to_string();
    let node = agent(&a, &token, "edge-1", &[])?;
    a.ok(&["run", IMAGE, "--name", "svc", "--restart", "always", "--", "sleep", "1000"])?;
    wait_placed(&a, &[("edge-1", "svc-1")])?;
    let before = pids(&a);
    let server = a.server()?;
    let port = server.rsplit(':').next().unwrap().to_string();

    // A backup while the hub runs: the store from etcd, the CA from the data directory.
    let backup = a.data().join("backup.json");
    let out = a.ok(&["hub", "backup", "--store", &fleet, "-o", backup.to_str().unwrap()])?;
    let meta = std::fs::metadata(&backup)?;
    assert_eq!(std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o077, 0, "it holds the CA's key");
    let text = std::fs::read_to_string(&backup)?;
    assert!(text.contains("\"svc\"") && text.contains("edge-1") && text.contains("PRIVATE KEY"), "{out}");

    // The hub's machine is lost. A new one is restored from the backup (on SQLite) and
    // takes its address: the node reconnects, and nothing restarts.
    a.kill_up()?;
    let mut c = Node::bare()?;
    c.ok(&["hub", "restore", backup.to_str().unwrap()])?;
    start_hub(&mut c, &port, &[])?;
    wait_ready(&c, "edge-1")?;
    wait_placed(&c, &[("edge-1", "svc-1")])?;
    assert_eq!(pids(&c), before, "the same process through the move");
    let again = c.cli(&["hub", "restore", backup.to_str().unwrap()])?;
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(!again.status.success() && err.contains("already holds a fleet"), "{err}");

    // Back onto etcd under another prefix: stop the hub, migrate, start it on etcd.
    c.kill_up()?;
    let moved = e.url("/moved");
    let out = c.cli(&["hub", "migrate", "--from", "sqlite", "--to", &moved])?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("1 deployments, 1 nodes"));
    start_hub(&mut c, &port, &["--store", &moved])?;
    wait_ready(&c, "edge-1")?;
    wait_placed(&c, &[("edge-1", "svc-1")])?;
    assert_eq!(pids(&c), before);
    // A change through the moved store reaches the node.
    c.ok(&["delete", "deployment", "svc"])?;
    wait_placed(&c, &[])?;

    // Bad stores are refused with what is wrong.
    for (store, says) in [
        ("redis://127.0.0.1:6379", "neither sqlite nor etcd://"),
        ("etcd://127.0.0.1", "is not HOST:PORT"),
        ("etcd://127.0.0.1:1", "etcd at http://127.0.0.1:1"),
        ("sqlite:", "the path is missing"),
    ] {
        let out = Node::bare()?.cli(&["hub", "--listen", "127.0.0.1:0", "--store", store])?;
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(says), "{store}: {err}");
    }
    drop(node);
    Ok(())
}

/// Three instances updated one at a time, each counted ready 2 s after its start.
const ROLL: &str = r#"
name: ha
services:
  roll:
    image: localhost/skiff-test:1
    command: ["sleep", "1000"]
    environment: {APP: "REV"}
    stop_grace_period: 1s
    deploy:
      replicas: 3
      update_config: {parallelism: 1, monitor: 2s, order: stop-first}
"#;

/// The node's containers and their processes, as its runc has them (at least one).
fn runc_pids(n: &Node) -> anyhow::Result<Vec<(String, i64)>> {
    let out = std::process::Command::new("runc")
        .arg("--root")
        .arg(n.data().join("runc"))
        .args(["list", "-f", "json"])
        .output()?;
    anyhow::ensure!(out.status.success(), "runc list: {}", String::from_utf8_lossy(&out.stderr));
    let v: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout)?;
    let mut all: Vec<(String, i64)> =
        v.iter().map(|c| (c["id"].as_str().unwrap_or_default().to_string(), c["pid"].as_i64().unwrap_or(0))).collect();
    all.sort();
    anyhow::ensure!(!all.is_empty() && all.iter().all(|(_, p)| *p > 0), "runc list: {all:?}");
    Ok(all)
}

fn admin_token(h: &Node) -> String {
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(h.data().join("admin.conf")).unwrap()).unwrap();
    v["token"].as_str().unwrap_or_default().to_string()
}

/// How often the agent of node `edge-{i}` on `n` connected to hub `h` (by its log).
fn tunnels_to(n: &Node, h: &Node, i: usize) -> usize {
    let url = format!("{}/api/v1/nodes/edge-{i}/tunnel", h.server().unwrap().replacen("https://", "wss://", 1));
    // The log's colours off (tracing colours a field's name apart from its value).
    let mut plain = String::new();
    let mut chars = n.log().chars().collect::<Vec<_>>().into_iter();
    while let Some(ch) = chars.next() {
        if ch == '\x1b' {
            chars.by_ref().find(|c| *c == 'm');
        } else {
            plain.push(ch);
        }
    }
    let hub = format!("hub={url}");
    plain.lines().filter(|l| l.contains("connected to the hub") && l.contains(&hub)).count()
}

/// Two hubs on a three-member etcd: one leads, one stands by (serving too). The one that leads is
/// killed; the standby takes over within the lease, with the shared CA and admin token,
/// and the node (given hub a only: it learns b from the hubs) follows it without
/// restarting its workload. The first hub, back, stands by; a clean stop of the active
/// one hands over at once. Then every etcd member stops: the hub is cut off — it shows
/// what it last read and reaches the node, changes are refused with a reason, workloads
/// run on — and when etcd returns the same hub process stands by and leads again.
#[test]
fn a_standby_hub_takes_over_from_a_dead_one_and_the_node_follows_without_a_restart() -> R {
    skiff_testkit::require_privileged!();
    // A three-member etcd: losing one member changes nothing (checked below).
    let mut e = Etcd::start(3)?;
    let store = e.url("/ha");
    // A short lease for a (it dies; b waits that long), a long one for b (it stops
    // cleanly and gives its lease up: a need not wait it out).
    let mut a = hub_with("127.0.0.1", &["--store", &store, "--lease-ttl", "3s"])?;
    let port_a = a.server()?.rsplit(':').next().unwrap().to_string();
    let port_b = free_port().to_string();
    // The store's secrets (the CA, the admin token) are sealed with a's key: a hub with
    // a key of its own is refused, naming the flag that fixes it.
    let out = Node::bare()?.cli(&["hub", "--listen", "127.0.0.1:0", "--store", &store])?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("sealed with secrets key") && err.contains("--secrets-key"), "{err}");
    let key = a.data().join("pki/secrets.key");
    let key = key.to_str().unwrap();
    let mut b = Node::bare()?;
    let listen_b = format!("127.0.0.1:{port_b}");
    b.spawn(&[
        "hub",
        "--listen",
        &listen_b,
        "--advertise",
        "127.0.0.1",
        "--store",
        &store,
        "--lease-ttl",
        "60s",
        "--secrets-key",
        key,
    ])?;
    wait_for(30 * SEC, "hub b standing by", || b.log().contains("stands by to lead").then_some(()))?;
    let pid_a = a.up_pid().unwrap();
    assert!(b.log().contains(&format!("(pid {pid_a}, ")), "names the active hub: {}", b.log());
    assert!(std::net::TcpStream::connect(&listen_b).is_ok(), "a hub that stands by serves too");

    let token = a.ok(&["token", "create"])?.trim().to_string();
    let mut node = Node::new()?;
    // The agent is given hub a only: it learns the others from the hubs.
    start_agent_in(None, &mut node, &a.server()?, Some(&token), Some("edge-1"), &[], &[])?;
    wait_for(30 * SEC, "the agent to join", || node.data().join("pki/joined.json").exists().then_some(()))?;
    a.ok(&["run", IMAGE, "--name", "svc", "--restart", "always", "--", "sleep", "1000"])?;
    wait_placed(&a, &[("edge-1", "svc-1")])?;
    // A scaled deployment, and one whose rolling update is under way when the hub dies.
    a.ok(&["scale", "svc=2"])?;
    let roll = a.write("roll.yaml", &ROLL.replace("REV", "1"))?;
    a.ok(&["apply", "-f", roll.to_str().unwrap()])?;
    let placed =
        [("edge-1", "roll-1"), ("edge-1", "roll-2"), ("edge-1", "roll-3"), ("edge-1", "svc-1"), ("edge-1", "svc-2")];
    let v1 = wait_placed(&a, &placed)?.into_iter().find(|i| i.deployment == "roll").unwrap().template;
    let before = pids(&a).into_iter().filter(|(n, _)| n.starts_with("svc-")).collect::<Vec<_>>();

    // The operator's config names every hub of the store (b registered as it started),
    // and so does the node's list, told over its tunnel.
    wait_for(30 * SEC, "hub b in a's admin.conf", || {
        std::fs::read_to_string(a.data().join("admin.conf")).ok()?.contains(&listen_b).then_some(())
    })?;
    wait_for(30 * SEC, "hub b in the node's list", || {
        std::fs::read_to_string(node.data().join("pki/hubs.json")).ok()?.contains(&listen_b).then_some(())
    })?;

    // The update starts (one instance at a time, each ready 2 s before the next); once its
    // first new instance runs, the active hub dies without a word (its lease is not given
    // up).
    a.write("roll.yaml", &ROLL.replace("REV", "2"))?;
    a.ok(&["apply", "-f", roll.to_str().unwrap()])?;
    let updated_before = wait_for(60 * SEC, "the update's first new instance", || {
        let new: Vec<(String, Option<i32>)> = hub_instances(&a)
            .into_iter()
            .filter(|i| {
                i.deployment == "roll" && i.template != v1 && i.state == InstanceState::Running && i.pid.is_some()
            })
            .map(|i| (i.name, i.pid))
            .collect();
        (!new.is_empty()).then_some(new)
    })?;
    a.kill_up()?;
    assert!(updated_before.len() < 3, "the update was still under way: {updated_before:?}");
    let t0 = std::time::Instant::now();
    wait_for(60 * SEC, "hub b active", || b.log().contains("hub leads its store").then_some(()))?;
    let took_over = t0.elapsed();
    wait_for(30 * SEC, "hub b serving", || b.cli(&["get", "nodes"]).ok()?.status.success().then_some(()))?;
    assert_eq!(admin_token(&b), admin_token(&a), "one admin token for the hubs of a store");
    // The CLI with a's config reaches b now. It shows what the node shipped to a (a
    // shipped event is not shipped again): the hubs' store keeps nodes' events.
    assert!(a.ok(&["get", "nodes"])?.contains("edge-1"));
    let events: Vec<skiff_model::EventRecord> = serde_json::from_str(&b.ok(&["get", "events", "-o", "json"])?)?;
    assert!(
        events.iter().any(|e| e.object == "svc-1" && e.reason == "Started" && e.node.as_deref() == Some("edge-1")),
        "{events:?}"
    );
    wait_for(60 * SEC, "edge-1 on hub b", || (tunnels_to(&node, &b, 1) > 0).then_some(()))?;
    wait_ready(&b, "edge-1")?;
    let followed = t0.elapsed();
    // The update goes on from where it was: it completes, and the instances it had
    // already replaced are not replaced again. The scaled deployment keeps its count.
    b.ok(&["rollout", "status", "roll", "--timeout", "2m"])?;
    let after = wait_placed(&b, &placed)?;
    assert!(after.iter().filter(|i| i.deployment == "roll").all(|i| i.template != v1), "{after:?}");
    for (name, pid) in &updated_before {
        assert!(after.iter().any(|i| &i.name == name && &i.pid == pid), "{name} replaced again: {after:?}");
    }
    let svc: Vec<_> = pids(&b).into_iter().filter(|(n, _)| n.starts_with("svc-")).collect();
    assert_eq!(svc, before, "the scaled deployment ran on through the failover, two instances");
    eprintln!("failover: hub a killed; hub b active after {took_over:?}, node edge-1 Ready on it after {followed:?}");
    b.ok(&["delete", "deployment", "roll"])?;
    b.ok(&["scale", "svc=1"])?;
    wait_placed(&b, &[("edge-1", "svc-1")])?;
    // etcd's leader member is lost: the hub goes on, and a change through it reaches the
    // node.
    let leader = e.leader().expect("etcd has a leader");
    e.kill(leader);
    b.ok(&["run", IMAGE, "--name", "two", "--", "sleep", "1000"])?;
    wait_placed(&b, &[("edge-1", "svc-1"), ("edge-1", "two-1")])?;
    assert!(b.log().contains("hub leads its store") && !b.log().contains("cut off from its store"), "{}", b.log());

    // Hub a comes back: it stands by. Hub b stops cleanly: a takes over at once.
    let listen_a = format!("127.0.0.1:{port_a}");
    a.spawn(&["hub", "--listen", &listen_a, "--advertise", "127.0.0.1", "--store", &store, "--lease-ttl", "3s"])?;
    wait_for(30 * SEC, "hub a standing by", || a.log().contains("stands by to lead").then_some(()))?;
    let t1 = std::time::Instant::now();
    let dialled = tunnels_to(&node, &a, 1);
    b.terminate_up()?;
    wait_for(30 * SEC, "hub a active", || a.log().contains("hub leads its store").then_some(()))?;
    // Ready on a already, as b last told it: wait for the node's own tunnel to a.
    wait_for(60 * SEC, "edge-1 back on hub a", || (tunnels_to(&node, &a, 1) > dialled).then_some(()))?;
    // Bounds, not timings: well inside b's 60 s lease.
    assert!(t1.elapsed() < Duration::from_secs(45), "a clean stop hands the lease over: {:?}", t1.elapsed());
    wait_ready(&a, "edge-1")?;
    wait_placed(&a, &[("edge-1", "svc-1"), ("edge-1", "two-1")])?;

    // Every etcd member stops. The hub loses its lease and is cut off: it shows what it
    // last read (saying so), reaches the node through its tunnel, refuses every change
    // with a message that says why and that nothing changed; the node's workloads run on.
    // (Those scaled away and deleted above are gone first: `sleep` ignores SIGTERM, so
    // its grace period runs out.)
    let running =
        wait_for(60 * SEC, "svc-1 and two-1 alone on the node", || runc_pids(&node).ok().filter(|p| p.len() == 2))?;
    // What the hub reads to reach an instance, it has read (the node dialled it a moment
    // ago; what it shows once cut off is what it last read).
    wait_for(30 * SEC, "an exec through hub a", || a.ok(&["exec", "two-1", "--", "true"]).ok())?;
    let led = a.log().matches("hub leads its store").count();
    let hub_pid = a.up_pid();
    for i in 0..e.members.len() {
        e.kill(i);
    }
    wait_for(60 * SEC, "hub a cut off from the store", || a.log().contains("serving what it last read").then_some(()))?;
    let out = a.cli(&["get", "deployments"])?;
    let (shown, said) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && shown.contains("svc") && shown.contains("two"), "{shown}{said}");
    assert!(said.contains("warning: the hub's store cannot be reached") && said.contains("changes nothing"), "{said}");
    assert!(a.ok(&["get", "nodes"])?.contains("edge-1"));
    assert_eq!(a.ok(&["exec", "two-1", "--", "echo", "through the tunnel"])?.trim(), "through the tunnel");
    // The node was told, and looks for another hub that answers (none does: b stopped).
    wait_for(30 * SEC, "the node told of the cut-off", || {
        node.log().contains("the hub is cut off from its store").then_some(())
    })?;
    for change in [
        &["run", IMAGE, "--name", "three", "--", "sleep", "1000"][..],
        &["scale", "svc=3"],
        &["delete", "deployment", "two"],
        &["delete", "node", "edge-1"],
        &["token", "create"],
    ] {
        let out = a.cli(change)?;
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains("cannot be reached") && err.contains("nothing was changed"),
            "{change:?}: {err}"
        );
    }
    assert!(a.ok(&["get", "deployments"])?.contains("two"));
    assert_eq!(runc_pids(&node)?, running, "the workloads run on without the store");
    // etcd comes back: the same hub process leads again, the node returns to it, and a
    // change goes through; no container was restarted.
    e.restart_all()?;
    let t2 = std::time::Instant::now();
    wait_for(60 * SEC, "hub a active again", || (a.log().matches("hub leads its store").count() > led).then_some(()))?;
    let led_again = t2.elapsed();
    assert_eq!(a.up_pid(), hub_pid, "the same hub process");
    wait_for(30 * SEC, "hub a serving", || a.cli(&["get", "nodes"]).ok()?.status.success().then_some(()))?;
    wait_ready(&a, "edge-1")?;
    eprintln!("etcd back: hub a active again after {led_again:?}, node edge-1 Ready on it after {:?}", t2.elapsed());
    let log = a.log();
    let said: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("skiff: hub") || l.contains("waiting for the store"))
        .map(str::trim)
        .collect();
    eprintln!("hub a said: {said:#?}");
    a.ok(&["run", IMAGE, "--name", "three", "--", "sleep", "1000"])?;
    wait_placed(&a, &[("edge-1", "svc-1"), ("edge-1", "three-1"), ("edge-1", "two-1")])?;
    let kept: Vec<_> = runc_pids(&node)?.into_iter().filter(|(id, _)| running.iter().any(|(r, _)| r == id)).collect();
    assert_eq!(kept, running, "no container restarted");
    a.ok(&["delete", "deployment", "three"])?;
    a.ok(&["delete", "deployment", "svc"])?;
    a.ok(&["delete", "deployment", "two"])?;
    wait_placed(&a, &[])?;
    drop(node);
    Ok(())
}

/// A TCP forwarder on 127.0.0.1 to `to` that can be cut: every connection through it
/// closed and no new one taken (a fault: the link from one hub to etcd). Stopped on drop.
struct Cuttable {
    port: u16,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
    open: std::sync::Arc<std::sync::Mutex<Vec<std::net::TcpStream>>>,
}

impl Cuttable {
    fn to(to: &str) -> anyhow::Result<Cuttable> {
        use std::sync::atomic::Ordering;
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        l.set_nonblocking(true)?;
        let port = l.local_addr()?.port();
        let cut = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let open = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (c, o, to) = (cut.clone(), open.clone(), to.to_string());
        std::thread::spawn(move || {
            while !c.load(Ordering::SeqCst) {
                let Ok((a, _)) = l.accept() else {
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                };
                let Ok(b) = std::net::TcpStream::connect(&to) else { continue };
                let _ = a.set_nonblocking(false);
                let (Ok(a2), Ok(b2)) = (a.try_clone(), b.try_clone()) else { continue };
                if let Ok(mut v) = o.lock() {
                    v.extend([a.try_clone(), b.try_clone()].into_iter().flatten());
                }
                for (mut from, mut into) in [(a, b2), (b, a2)] {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut into);
                        let _ = into.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        Ok(Cuttable { port, cut, open })
    }

    fn cut(&self) {
        self.cut.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Ok(mut v) = self.open.lock() {
            for s in v.drain(..) {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
        }
    }
}

impl Drop for Cuttable {
    fn drop(&mut self) {
        self.cut();
    }
}

/// The active hub loses its link to etcd, while another hub of the store still reaches
/// it: the first is cut off (it shows what it last read and changes nothing); the other
/// takes over once the lease runs out; the first sees it answer, closes its connections
/// and stands by; the node follows to the new leader; nothing restarts.
#[test]
fn a_hub_cut_off_from_etcd_hands_its_nodes_to_the_hub_that_still_reaches_it() -> R {
    skiff_testkit::require_privileged!();
    let e = Etcd::start(1)?;
    let direct = e.url("/cut");
    let member = direct.trim_start_matches("etcd://").split('/').next().unwrap().to_string();
    let link = Cuttable::to(&member)?;
    let via_link = format!("etcd://127.0.0.1:{}/cut", link.port);
    let a = hub_with("127.0.0.1", &["--store", &via_link, "--lease-ttl", "3s"])?;
    let key = a.data().join("pki/secrets.key");
    let mut c = Node::bare()?;
    let port_c = free_port().to_string();
    let listen_c = format!("127.0.0.1:{port_c}");
    let key = key.to_str().unwrap();
    c.spawn(&[
        "hub",
        "--listen",
        &listen_c,
        "--advertise",
        "127.0.0.1",
        "--store",
        &direct,
        "--lease-ttl",
        "3s",
        "--secrets-key",
        key,
    ])?;
    wait_for(30 * SEC, "hub c standing by", || c.log().contains("stands by to lead").then_some(()))?;
    let token = a.ok(&["token", "create"])?.trim().to_string();
    let mut node = Node::new()?;
    start_agent_in(None, &mut node, &a.server()?, Some(&token), Some("edge-1"), &[], &[])?;
    wait_for(30 * SEC, "the agent to join", || node.data().join("pki/joined.json").exists().then_some(()))?;
    a.ok(&["run", IMAGE, "--name", "svc", "--", "sleep", "1000"])?;
    wait_placed(&a, &[("edge-1", "svc-1")])?;
    // c is among the hubs a tells the node (and looks for, once cut off).
    wait_for(30 * SEC, "hub c in the node's list", || {
        std::fs::read_to_string(node.data().join("pki/hubs.json")).ok()?.contains(&listen_c).then_some(())
    })?;
    let running = runc_pids(&node)?;

    link.cut();
    wait_for(60 * SEC, "hub a cut off", || a.log().contains("serving what it last read").then_some(()))?;
    wait_for(60 * SEC, "hub c active", || c.log().contains("hub leads its store").then_some(()))?;
    wait_for(60 * SEC, "hub a to see c lead and stand by", || {
        a.log().contains(&format!("the hub at https://{listen_c} leads now; standing by again")).then_some(())
    })?;
    wait_ready(&c, "edge-1")?;
    wait_placed(&c, &[("edge-1", "svc-1")])?;
    c.ok(&["run", IMAGE, "--name", "after", "--", "sleep", "1000"])?;
    wait_placed(&c, &[("edge-1", "after-1"), ("edge-1", "svc-1")])?;
    let kept: Vec<_> = runc_pids(&node)?.into_iter().filter(|(id, _)| running.iter().any(|(r, _)| r == id)).collect();
    assert_eq!(kept, running, "no container restarted");
    c.ok(&["delete", "deployment", "after"])?;
    c.ok(&["delete", "deployment", "svc"])?;
    wait_placed(&c, &[])?;
    drop(node);
    Ok(())
}

/// Every hub of a store serves at once: three hubs on etcd, an agent dialling each. Every
/// hub lists every node Ready (each learns the others' nodes from them); a change made
/// through a hub that does not lead is placed by the one that does, onto nodes of all
/// three; an exec sent to a hub that does not hold the instance's node goes to the one
/// that does. A hub that stands by dies: its node moves to another hub. The hub that leads
/// dies: another leads, its node moves too, and a scale goes through. No container
/// restarts.
#[test]
fn every_hub_of_a_store_serves_its_own_nodes_and_the_one_that_leads_places_them_all() -> R {
    skiff_testkit::require_privileged!();
    let e = Etcd::start(1)?;
    let store = e.url("/aa");
    let mut a = hub_with("127.0.0.1", &["--store", &store, "--lease-ttl", "3s"])?;
    wait_for(30 * SEC, "hub a leading", || a.log().contains("hub leads its store").then_some(()))?;
    let key = a.data().join("pki/secrets.key");
    let extra = ["--store", &store, "--lease-ttl", "3s", "--secrets-key", key.to_str().unwrap()];
    let mut b = hub_with("127.0.0.1", &extra)?;
    let c = hub_with("127.0.0.1", &extra)?;
    let token = a.ok(&["token", "create", "--uses", "3"])?.trim().to_string();
    let mut nodes = vec![];
    for (i, h) in [&a, &b, &c].into_iter().enumerate() {
        let mut n = Node::new()?;
        // Each joins through its own hub, and dials it.
        start_agent_in(None, &mut n, &h.server()?, Some(&token), Some(&format!("edge-{}", i + 1)), &[], &[])?;
        nodes.push(n);
    }
    for h in [&a, &b, &c] {
        for i in 1..=3 {
            wait_ready(h, &format!("edge-{i}"))?;
        }
    }
    for (i, h) in [&a, &b, &c].into_iter().enumerate() {
        assert!(tunnels_to(&nodes[i], h, i + 1) > 0, "edge-{} on its own hub: {}", i + 1, nodes[i].log());
    }
    assert!(!b.log().contains("hub leads its store") && !c.log().contains("hub leads its store"));
    // Through c, which does not lead: a places it, on every node (one each).
    c.ok(&["run", IMAGE, "--name", "web", "--replicas", "3", "--stop-timeout", "1", "--", "sleep", "1000"])?;
    let placed = wait_for(60 * SEC, "web on every node", || {
        let v: Vec<_> = hub_instances(&b)
            .into_iter()
            .filter(|i| i.deployment == "web" && i.state == InstanceState::Running && i.pid.is_some())
            .collect();
        let mut on: Vec<&str> = v.iter().map(|i| i.node.as_str()).collect();
        on.sort();
        (on == ["edge-1", "edge-2", "edge-3"]).then_some(v)
    })?;
    let on = |n: &str| placed.iter().find(|i| i.node == n).unwrap().name.clone();
    // Through a, to an instance on c's node: the CLI is sent on to c (once a's config
    // names c, rewritten every 10 s).
    wait_for(30 * SEC, "hub c in a's admin.conf", || {
        let conf = std::fs::read_to_string(a.data().join("admin.conf")).ok()?;
        conf.contains(c.server().ok()?.as_str()).then_some(())
    })?;
    assert_eq!(a.ok(&["exec", &on("edge-3"), "--", "echo", "through c"])?.trim(), "through c");
    let before: Vec<(String, Option<i32>)> = placed.iter().map(|i| (i.name.clone(), i.pid)).collect();

    // b, which stands by, dies: its node moves to another hub.
    b.kill_up()?;
    wait_for(60 * SEC, "edge-2 on another hub", || {
        (tunnels_to(&nodes[1], &a, 2) + tunnels_to(&nodes[1], &c, 2) > 0).then_some(())
    })?;
    wait_for(30 * SEC, "an exec on edge-2 again", || {
        a.ok(&["exec", &on("edge-2"), "--", "echo", "moved"]).ok().filter(|o| o.trim() == "moved")
    })?;
    // a, which leads, dies: c leads, and a's node moves to it.
    a.kill_up()?;
    wait_for(60 * SEC, "hub c leading", || c.log().contains("hub leads its store").then_some(()))?;
    wait_for(60 * SEC, "edge-1 on hub c", || (tunnels_to(&nodes[0], &c, 1) > 0).then_some(()))?;
    c.ok(&["scale", "web=4"])?;
    let after = wait_for(60 * SEC, "web scaled to 4", || {
        let v: Vec<_> = hub_instances(&c)
            .into_iter()
            .filter(|i| i.deployment == "web" && i.state == InstanceState::Running && i.pid.is_some())
            .collect();
        (v.len() == 4).then_some(v)
    })?;
    for (name, pid) in &before {
        assert!(after.iter().any(|i| &i.name == name && &i.pid == pid), "{name} restarted: {after:?}");
    }
    c.ok(&["delete", "deployment", "web"])?;
    wait_placed(&c, &[])?;
    drop(nodes);
    Ok(())
}
