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
    command: ["sh", "-c", "mkdir -p /www && echo db on $$HOSTNAME > /www/index.html && exec httpd -f -p PORT -h /www"]
    expose: ["PORT", "UDPPORT/udp"]
    deploy: {placement: {constraints: ["node.labels.role==b"]}}
  far:
    image: localhost/skiff-test:1
    command: ["sh", "-c", "mkdir -p /www && echo far on $$HOSTNAME > /www/index.html && exec httpd -f -p 8080 -h /www"]
    expose: ["8080", "UDPPORT/udp"]
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
    command: ["sh", "-c", "mkdir -p /www && echo stranger > /www/index.html && exec httpd -f -p 8080 -h /www"]
    # The same port as db's, published on the client's node: db's calls are not taken.
    ports: ["PORT:8080"]
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
    let (port, udp_port) = (free_port(), free_port());
    let stack =
        h.write("shop.yaml", &STACK.replace("UDPPORT", &udp_port.to_string()).replace("PORT", &port.to_string()))?;
    h.ok(&["apply", "-f", stack.to_str().unwrap()])?;
    let other = h.write("other.yaml", &OTHER.replace("PORT", &port.to_string()))?;
    h.ok(&["apply", "-f", other.to_str().unwrap()])?;
    let all =
        wait_placed(&h, &[("node-a", "client-1"), ("node-a", "stranger-1"), ("node-b", "db-1"), ("node-c", "far-1")])?;
    let id = |name: &str| all.iter().find(|i| i.name == name).unwrap().container_id.clone();
    let pid = |name: &str| all.iter().find(|i| i.name == name).unwrap().pid.unwrap();
    let (client, stranger) = (id("client-1"), id("stranger-1"));

    let db_url = format!("http://db:{port}/");
    // By name across nodes: directly to node b's agent, relayed to node c.
    answers(&a, &client, &db_url, "db on db-1")?;
    answers(&a, &client, "http://far:8080/", "far on far-1")?;
    // Kubernetes' and the stack-qualified forms of the name.
    answers(&a, &client, &format!("http://db.shop:{port}/"), "db on db-1")?;
    answers(&a, &client, &format!("http://db.shop.svc.cluster.local:{port}/"), "db on db-1")?;
    // Another stack's instance on the same node finds neither the name nor the address.
    let e = wget(&a, &stranger, &db_url).unwrap_err();
    assert!(e.contains("bad address") || e.contains("resolve"), "{e}");
    assert!(
        wget(&a, &stranger, &format!("http://db.shop:{port}/")).is_err(),
        "another stack cannot call it by its full name"
    );
    // UDP by name too: to node b directly, to node c through the hub's relay; each
    // datagram's answer comes back from the service's address. Another stack's instance
    // sending to the same address gets nothing.
    let _db_udp = UdpEcho::start(pid("db-1"), udp_port, "db")?;
    let _far_udp = UdpEcho::start(pid("far-1"), udp_port, "far")?;
    let (db_vip, far_vip) = (resolve(&a, &client, "db")?, resolve(&a, &client, "far")?);
    udp_answers(pid("client-1"), (db_vip, udp_port), "db")?;
    udp_answers(pid("client-1"), (far_vip, udp_port), "far")?;
    // More flows than one instance may hold (64): the oldest make room, each is answered.
    let many: Vec<std::net::UdpSocket> =
        in_netns(pid("client-1"), || (0..66).map(|_| std::net::UdpSocket::bind("0.0.0.0:0")).collect())?;
    for (i, s) in many.iter().enumerate() {
        assert_eq!(udp_call(s, (db_vip, udp_port), &format!("f{i}"))?, Some(format!("db:f{i}")), "flow {i}");
    }
    let strangers = in_netns(pid("stranger-1"), || std::net::UdpSocket::bind("0.0.0.0:0"))?;
    for i in 0..3 {
        let got = udp_call(&strangers, (db_vip, udp_port), &format!("hi{i}"))?;
        assert_eq!(got, None, "another stack's datagram is answered");
    }

    // The stranger's port, published on node a, is the same number as db's: both work.
    let published = wait_for(30 * SEC, "the stranger's published port", || common::http_get(port, "/").ok());
    assert_eq!(published?.trim(), "stranger");
    answers(&a, &client, &db_url, "db on db-1")?;

    // `skiff get services`: each service, its port, where it runs and what serves.
    let listed = h.ok(&["get", "services"])?;
    let line = |name: &str| listed.lines().find(|l| l.starts_with(&format!("{name} "))).unwrap_or_default().to_string();
    assert!(line("db").contains(&port.to_string()) && line("db").contains("node-b:1/1"), "{listed}");
    assert!(line("far").contains("node-c:1/1"), "{listed}");
    assert!(line("client").is_empty(), "a deployment that serves no port is no service: {listed}");
    let described = h.ok(&["describe", "service", "db"])?;
    assert!(described.contains("stack: shop") && described.contains("node: node-b"), "{described}");
    assert!(!h.cli(&["get", "service", "nope"])?.status.success());

    // The hub goes away: the direct path needs no hub, the relay does.
    h.kill_up()?;
    answers(&a, &client, &db_url, "db on db-1")?;
    assert!(wget(&a, &client, "http://far:8080/").is_err(), "no relay without the hub");
    // A restarted agent has the services it last heard of, and reaches them directly.
    a.interrupt_up()?;
    common::fleet::start_agent_in(None, &mut a, &h.server()?, None, None, &[], &a_args)?;
    answers(&a, &client, &db_url, "db on db-1")?;
    Ok(())
}

/// The address `name` resolves to inside `container` (its node's DNS).
fn resolve(n: &Node, container: &str, name: &str) -> anyhow::Result<std::net::Ipv4Addr> {
    let out = Command::new("timeout")
        .args(["20", "runc", "--root"])
        .arg(n.data().join("runc"))
        .args(["exec", container, "nslookup", name])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    // The last `Address:` is the answer's (the first is the server's).
    let last = text.lines().filter_map(|l| l.strip_prefix("Address:")).next_back();
    last.and_then(|a| a.trim().parse().ok()).ok_or_else(|| anyhow::anyhow!("nslookup {name}: {text}"))
}

/// Runs `f` on a thread in the network namespace of process `pid` (a container's): a
/// socket made there stays there.
fn in_netns<T: Send + 'static>(pid: i32, f: impl FnOnce() -> std::io::Result<T> + Send + 'static) -> anyhow::Result<T> {
    std::thread::spawn(move || -> anyhow::Result<T> {
        let ns = std::fs::File::open(format!("/proc/{pid}/ns/net"))?;
        nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET)?;
        Ok(f()?)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("a thread in the namespace panicked"))?
}

/// A UDP server on `port` inside a container: each datagram is answered `TAG:` and
/// itself. Stops when dropped.
struct UdpEcho(std::sync::Arc<std::sync::atomic::AtomicBool>);

impl UdpEcho {
    fn start(pid: i32, port: u16, tag: &str) -> anyhow::Result<UdpEcho> {
        let s = in_netns(pid, move || std::net::UdpSocket::bind(("0.0.0.0", port)))?;
        s.set_read_timeout(Some(SEC / 2))?;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (done, tag) = (std::sync::Arc::clone(&stop), tag.to_string());
        std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            // Bounded: 10 minutes at most.
            for _ in 0..1200 {
                if done.load(std::sync::atomic::Ordering::Relaxed) {
                    return;
                }
                if let Ok((n, from)) = s.recv_from(&mut buf) {
                    let mut answer = format!("{tag}:").into_bytes();
                    answer.extend_from_slice(&buf[..n]);
                    let _ = s.send_to(&answer, from);
                }
            }
        });
        Ok(UdpEcho(stop))
    }
}

impl Drop for UdpEcho {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// One datagram to `to` and its answer, if one comes within two seconds.
fn udp_call(s: &std::net::UdpSocket, to: (std::net::Ipv4Addr, u16), text: &str) -> anyhow::Result<Option<String>> {
    s.set_read_timeout(Some(2 * SEC))?;
    s.send_to(text.as_bytes(), to)?;
    let mut buf = [0u8; 2048];
    match s.recv_from(&mut buf) {
        Ok((n, from)) => {
            assert_eq!(from, to.into(), "the answer comes from the service's address");
            Ok(Some(String::from_utf8_lossy(&buf[..n]).into_owned()))
        }
        Err(_) => Ok(None),
    }
}

/// Waits until a datagram from the container of `pid` to `to` is answered by `tag`'s
/// server, then checks that a flow keeps its boundaries and order: three more in a row.
fn udp_answers(pid: i32, to: (std::net::Ipv4Addr, u16), tag: &str) -> R {
    let s = in_netns(pid, || std::net::UdpSocket::bind("0.0.0.0:0"))?;
    let want = format!("{tag}:hello");
    wait_for(60 * SEC, &format!("a UDP answer from {tag}"), || {
        udp_call(&s, to, "hello").ok().flatten().filter(|a| *a == want)
    })?;
    for i in 0..3 {
        assert_eq!(udp_call(&s, to, &format!("n{i}"))?, Some(format!("{tag}:n{i}")));
    }
    Ok(())
}

const SET: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: pg, namespace: shop}
spec: {clusterIP: None, selector: {app: db}, ports: [{port: PORT}]}
---
apiVersion: apps/v1
kind: StatefulSet
metadata: {name: db, namespace: shop}
spec:
  serviceName: pg
  replicas: 2
  selector: {matchLabels: {app: db}}
  template:
    metadata: {labels: {app: db}}
    spec:
      containers:
      - name: db
        image: localhost/skiff-test:1
        command: [sh, -c, "mkdir -p /www && echo db on $HOSTNAME > /www/index.html && exec httpd -f -p PORT -h /www"]
"#;

/// A StatefulSet over two nodes: db-0 first (db-1 is placed once db-0 is reported
/// ready), and each instance reached from the other node by its stable name through the
/// governing service, `db-0.pg` and Kubernetes' `db-0.pg.shop.svc.cluster.local`.
#[test]
fn a_stateful_sets_instances_reach_each_other_by_name_across_nodes() -> R {
    skiff_testkit::require_privileged!();
    let _routes = Routes((6..8).map(range).collect());
    let h = hub()?;
    let token = h.ok(&["token", "create", "--uses", "2"])?.trim().to_string();
    let (pa, pb) = (free_port(), free_port());
    let (listen_a, listen_b) = (format!("127.0.0.1:{pa}"), format!("127.0.0.1:{pb}"));
    let (ra, rb) = (range(6), range(7));
    let a = agent_with(&h, &token, "node-a", &["role=a"], &["--service-range", &ra, "--mesh-listen", &listen_a])?;
    let b = agent_with(&h, &token, "node-b", &["role=b"], &["--service-range", &rb, "--mesh-listen", &listen_b])?;
    common::fleet::wait_ready(&h, "node-a")?;
    common::fleet::wait_ready(&h, "node-b")?;
    let port = free_port();
    let set = h.write("set.yaml", &SET.replace("PORT", &port.to_string()))?;
    h.ok(&["apply", "-f", set.to_str().unwrap()])?;
    // Spread over the two nodes, db-0 on the first by name.
    let all = wait_placed(&h, &[("node-a", "db-0"), ("node-b", "db-1")])?;
    let id = |name: &str| all.iter().find(|i| i.name == name).unwrap().container_id.clone();
    answers(&b, &id("db-1"), &format!("http://db-0.pg:{port}/"), "db on db-0")?;
    answers(&b, &id("db-1"), &format!("http://db-0.pg.shop.svc.cluster.local:{port}/"), "db on db-0")?;
    answers(&a, &id("db-0"), &format!("http://db-1.pg:{port}/"), "db on db-1")?;
    // The set's own name spreads over both; a name of no instance resolves to nothing.
    assert!(wget(&a, &id("db-0"), &format!("http://db-7.pg:{port}/")).is_err());
    Ok(())
}

fn ip(ns: Option<&str>, args: &[&str]) -> R {
    let mut cmd = Command::new("ip");
    if let Some(ns) = ns {
        cmd.args(["-n", ns]);
    }
    let out = cmd.args(args).output()?;
    anyhow::ensure!(out.status.success(), "ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    Ok(())
}

fn in_ns(ns: &str, program: &str, args: &[&str], input: &str) -> R {
    use std::io::Write;
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns, program])
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    child.stdin.take().unwrap().write_all(input.as_bytes())?;
    let out = child.wait_with_output()?;
    anyhow::ensure!(out.status.success(), "{program} in {ns}: {}", String::from_utf8_lossy(&out.stderr));
    Ok(())
}

/// A small internet: the host reaches a "cloud" namespace (the hub) over a veth; a "wan"
/// namespace routes between the cloud and two site routers, each masquerading its own
/// site's LAN, so the sites reach the cloud but never each other. Removed on drop.
struct Wan {
    names: Vec<String>,
    host_if: String,
    host_route: String,
    /// The hub's address (cloud's side of the wan), site A's and site B's LAN host.
    hub_ip: String,
    site_a: (String, String),
    site_b: (String, String),
    cloud: (String, String),
}

impl Wan {
    fn new() -> anyhow::Result<Self> {
        let k = std::process::id() % 250;
        let tag = std::process::id() % 100_000;
        let ns = |n: &str| format!("skw{tag}{n}");
        let names: Vec<String> = ["c", "w", "ra", "sa", "rb", "sb"].iter().map(|n| ns(n)).collect();
        let host_if = format!("skw{tag}h");
        let wan = Wan {
            names: names.clone(),
            host_if: host_if.clone(),
            host_route: format!("10.252.{k}.0/24"),
            hub_ip: format!("10.252.{k}.2"),
            site_a: (ns("sa"), format!("10.255.{k}.2")),
            site_b: (ns("sb"), format!("10.255.{k}.130")),
            cloud: (ns("c"), format!("skw{tag}cw")),
        };
        for n in &names {
            ip(None, &["netns", "add", n])?;
            ip(Some(n), &["link", "set", "lo", "up"])?;
        }
        // (namespace a, its address, namespace b, its address, prefix)
        let (c, w, ra, sa, rb, sb) = (&names[0], &names[1], &names[2], &names[3], &names[4], &names[5]);
        let links = [
            (c, format!("10.252.{k}.2"), w, format!("10.252.{k}.1"), 24, "cw"),
            (w, format!("10.253.{k}.1"), ra, format!("10.253.{k}.2"), 24, "wa"),
            (w, format!("10.254.{k}.1"), rb, format!("10.254.{k}.2"), 24, "wb"),
            (ra, format!("10.255.{k}.1"), sa, format!("10.255.{k}.2"), 25, "la"),
            (rb, format!("10.255.{k}.129"), sb, format!("10.255.{k}.130"), 25, "lb"),
        ];
        for (a, a_ip, b, b_ip, prefix, name) in &links {
            let (ia, ib) = (format!("skw{tag}{name}"), format!("skw{tag}{name}p"));
            ip(None, &["link", "add", &ia, "netns", a, "type", "veth", "peer", "name", &ib, "netns", b])?;
            ip(Some(a), &["addr", "add", &format!("{a_ip}/{prefix}"), "dev", &ia])?;
            ip(Some(b), &["addr", "add", &format!("{b_ip}/{prefix}"), "dev", &ib])?;
            ip(Some(a), &["link", "set", &ia, "up"])?;
            ip(Some(b), &["link", "set", &ib, "up"])?;
        }
        // The host's way to the cloud (the operator's CLI reaches the hub).
        ip(None, &["link", "add", &host_if, "type", "veth", "peer", "name", &format!("{host_if}p"), "netns", c])?;
        ip(None, &["addr", "add", &format!("10.251.{k}.1/24"), "dev", &host_if])?;
        ip(None, &["link", "set", &host_if, "up"])?;
        ip(Some(c), &["addr", "add", &format!("10.251.{k}.2/24"), "dev", &format!("{host_if}p")])?;
        ip(Some(c), &["link", "set", &format!("{host_if}p"), "up"])?;
        ip(None, &["route", "add", &wan.host_route, "via", &format!("10.251.{k}.2")])?;
        // Routes: the cloud knows the routers' wan sides; routers and sites go out by default.
        for net in [format!("10.253.{k}.0/24"), format!("10.254.{k}.0/24")] {
            ip(Some(c), &["route", "add", &net, "via", &format!("10.252.{k}.1")])?;
        }
        ip(Some(ra), &["route", "add", "default", "via", &format!("10.253.{k}.1")])?;
        ip(Some(rb), &["route", "add", "default", "via", &format!("10.254.{k}.1")])?;
        ip(Some(sa), &["route", "add", "default", "via", &format!("10.255.{k}.1")])?;
        ip(Some(sb), &["route", "add", "default", "via", &format!("10.255.{k}.129")])?;
        for r in [w, ra, rb] {
            in_ns(r, "sysctl", &["-qw", "net.ipv4.ip_forward=1"], "")?;
        }
        for (r, out) in [(ra, format!("skw{tag}wap")), (rb, format!("skw{tag}wbp"))] {
            let rules = format!(
                "table ip skwnat {{\n chain post {{\n  type nat hook postrouting priority 100;\n  oifname \"{out}\" masquerade\n }}\n}}\n"
            );
            in_ns(r, "nft", &["-f", "-"], &rules)?;
        }
        Ok(wan)
    }
}

impl Drop for Wan {
    fn drop(&mut self) {
        let _ = ip(None, &["route", "del", &self.host_route]);
        let _ = ip(None, &["link", "del", &self.host_if]);
        for n in &self.names {
            let _ = ip(None, &["netns", "del", n]);
        }
    }
}

const SITES: &str = r#"
name: plant
services:
  db:
    image: localhost/skiff-test:1
    command: ["sh", "-c", "mkdir -p /www && echo db on $$HOSTNAME > /www/index.html && touch /www/ok && exec httpd -f -p 8080 -h /www"]
    expose: ["8080"]
    healthcheck: {test: [CMD, test, -f, /www/ok], interval: 1s, timeout: 5s, retries: 1}
    deploy:
      replicas: 2
      placement: {constraints: ["node.labels.db==yes"], preferences: [{spread: node.labels.site}]}
  slow:
    image: localhost/skiff-test:1
    command: ["sh", "-c", "printf '#!/bin/sh\\nsleep 4\\necho late\\n' > /slow && chmod +x /slow && exec nc -ll -p 9000 -e /slow"]
    expose: ["9000"]
    deploy: {placement: {constraints: ["node.labels.db==yes", "node.labels.site==a"]}}
  client:
    image: localhost/skiff-test:1
    command: ["sleep", "3600"]
    deploy: {placement: {constraints: ["node.labels.role==client"]}}
"#;

#[test]
fn across_nat_sites_a_call_prefers_its_own_site_moves_when_unready_and_survives_losing_the_hub() -> R {
    skiff_testkit::require_privileged!();
    // Declared first, so dropped last: after the processes inside it are gone.
    let wan = Wan::new()?;
    let _routes = Routes((3..6).map(range).collect());
    let mut h = Node::bare()?;
    let listen = format!("{}:0", wan.hub_ip);
    h.spawn_in(Some(&wan.cloud.0), &["hub", "--listen", &listen, "--advertise", &wan.hub_ip])?;
    wait_for(30 * SEC, "the hub", || {
        (h.data().join("admin.conf").exists() && h.cli(&["get", "nodes"]).ok()?.status.success()).then_some(())
    })?;
    let token = h.ok(&["token", "create", "--uses", "3"])?.trim().to_string();
    let server = h.server()?;
    let (sa, sa_ip) = &wan.site_a;
    let (sb, sb_ip) = &wan.site_b;
    let start = |ns: &str, name: &str, labels: &[&str], range_i: u32, mesh: String| -> anyhow::Result<Node> {
        let mut n = Node::new()?;
        let r = range(range_i);
        let extra = ["--service-range", r.as_str(), "--mesh-listen", mesh.as_str()];
        common::fleet::start_agent_in(Some(ns), &mut n, &server, Some(&token), Some(name), labels, &extra)?;
        wait_for(30 * SEC, "the agent to join", || n.data().join("pki/joined.json").exists().then_some(()))?;
        Ok(n)
    };
    let a1 = start(sa, "a1", &["site=a", "role=client"], 3, format!("{sa_ip}:{}", free_port()))?;
    let a2 = start(sa, "a2", &["site=a", "db=yes"], 4, format!("{sa_ip}:{}", free_port()))?;
    // b1 states its LAN address, which site A cannot reach: calls to it are relayed.
    let _b1 = start(sb, "b1", &["site=b", "db=yes"], 5, format!("{sb_ip}:{}", free_port()))?;
    let file = h.write("plant.yaml", SITES)?;
    h.ok(&["apply", "-f", file.to_str().unwrap()])?;
    let placed = wait_for(90 * SEC, "client-1 on a1, db on a2 and b1", || {
        let all = common::fleet::hub_instances(&h);
        let on = |node: &str, d: &str| {
            all.iter().any(|i| i.node == node && i.deployment == d && i.state == skiff_model::InstanceState::Running)
        };
        (on("a1", "client") && on("a2", "db") && on("b1", "db") && on("a2", "slow")).then_some(all)
    });
    let all = placed.map_err(|e| {
        let nodes = h.ok(&["get", "nodes"]).unwrap_or_default();
        let inst = h.ok(&["get", "instances", "-o", "wide"]).unwrap_or_default();
        anyhow::anyhow!("{e}\n{nodes}\n{inst}\n{}\n--- a1:\n{}", h.log(), a1.log())
    })?;
    let id = |name: &str| all.iter().find(|i| i.name == name).unwrap().container_id.clone();
    let on_a2 = all.iter().find(|i| i.node == "a2").unwrap();
    let on_b1 = all.iter().find(|i| i.node == "b1").unwrap();
    let client = id("client-1");
    let (near, far) = (format!("db on {}", on_a2.name), format!("db on {}", on_b1.name));

    // Its own site first: every call goes to a2's instance (directly, agent to agent).
    answers(&a1, &client, "http://db:8080/", &near)?;
    for _ in 0..5 {
        assert_eq!(wget(&a1, &client, "http://db:8080/").unwrap(), near);
    }
    // a2's instance stops being ready: calls go to b1's, across the NAT, through the hub.
    let unready = |n: &Node, c: &str, cmd: &str| {
        Command::new("runc").arg("--root").arg(n.data().join("runc")).args(["exec", c, "sh", "-c", cmd]).output()
    };
    unready(&a2, &on_a2.container_id, "rm /www/ok")?;
    answers(&a1, &client, "http://db:8080/", &far)?;
    // Ready again: back to its own site.
    unready(&a2, &on_a2.container_id, "touch /www/ok")?;
    answers(&a1, &client, "http://db:8080/", &near)?;

    // The cloud loses its link: calls within the site go on, those open then (the
    // answer comes 4 s later) and new ones.
    let (runc_root, c) = (a1.data().join("runc"), client.clone());
    let open = std::thread::spawn(move || {
        Command::new("runc")
            .arg("--root")
            .arg(runc_root)
            .args(["exec", &c, "sh", "-c", "sleep 8 | nc slow 9000"])
            .output()
    });
    std::thread::sleep(2 * SEC);
    ip(Some(&wan.cloud.0), &["link", "set", &wan.cloud.1, "down"])?;
    let late = open.join().unwrap()?;
    assert_eq!(String::from_utf8_lossy(&late.stdout).trim(), "late", "{}", String::from_utf8_lossy(&late.stderr));
    for _ in 0..5 {
        assert_eq!(wget(&a1, &client, "http://db:8080/").unwrap(), near);
    }
    Ok(())
}
