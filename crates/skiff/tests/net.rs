//! The node's own networking against a real kernel: bridge, veth and namespaces made
//! through netlink with no iproute2 on the agent's PATH; outbound NAT through nftables and
//! through iptables, beside a host whose FORWARD policy drops (as installing docker.io
//! leaves it); published ports forwarded by the kernel, answering while the agent is away.
//! The tests of this binary run one at a time: one changes the host's FORWARD policy for
//! its duration.

mod common;

use anyhow::{bail, Context, Result};
use common::{wait_for, Node, Uplink, IMAGE};
use skiff_testkit::require_privileged;
use std::collections::BTreeSet;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

static SERIAL: Mutex<()> = Mutex::new(());

/// Sets iptables' FORWARD policy for as long as it lives; the old one comes back on drop.
struct ForwardPolicy {
    old: String,
}

impl ForwardPolicy {
    fn set(policy: &str) -> Result<Self> {
        let out = Command::new("iptables").args(["-S", "FORWARD"]).output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let old = text
            .lines()
            .find_map(|l| l.strip_prefix("-P FORWARD "))
            .map(str::to_string)
            .context("no FORWARD policy in iptables -S")?;
        run("iptables", &["-P", "FORWARD", policy])?;
        Ok(ForwardPolicy { old })
    }
}

impl Drop for ForwardPolicy {
    fn drop(&mut self) {
        let _ = run("iptables", &["-P", "FORWARD", &self.old]);
    }
}

/// Puts the host's `ip_forward` back as it was (the agent turns it on).
struct IpForward(String);

impl IpForward {
    const PATH: &str = "/proc/sys/net/ipv4/ip_forward";

    fn save() -> Result<Self> {
        Ok(IpForward(std::fs::read_to_string(Self::PATH)?))
    }
}

impl Drop for IpForward {
    fn drop(&mut self) {
        let _ = std::fs::write(Self::PATH, &self.0);
    }
}

fn run(tool: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(tool).args(args).output().with_context(|| format!("running {tool}"))?;
    if !out.status.success() {
        bail!("{tool} {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// busybox httpd serving `hello` inside the namespace; killed on drop.
struct Server {
    child: Child,
    _dir: tempfile::TempDir,
}

impl Server {
    fn start(netns: &str, port: u16) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        std::fs::write(dir.path().join("hello"), "hello from the wan\n")?;
        let child = Command::new("ip")
            .args(["netns", "exec", netns, "busybox", "httpd", "-f", "-p", &port.to_string(), "-h"])
            .arg(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        Ok(Server { child, _dir: dir })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What `wget` inside `idle-1` gets from `url` (bounded: an unanswered SYN is retried for
/// minutes otherwise).
/// The last line is wget's exit status, so a failed fetch is told from a failed exec.
fn fetch(n: &Node, url: &str) -> Result<String> {
    n.ok(&["exec", "idle-1", "--", "sh", "-c", &format!("timeout 5 wget -q -O - {url}; echo status=$?")])
}

/// What `url` answers, asked from network namespace `ns` (bounded), with wget's exit
/// status last.
fn wget_from(ns: &str, url: &str) -> Result<String> {
    run("ip", &["netns", "exec", ns, "sh", "-c", &format!("timeout 5 busybox wget -q -O - {url}; echo status=$?")])
}

/// The network namespace of this node's instance `name`.
fn instance_netns(n: &Node, name: &str) -> Result<String> {
    let id = node_id(n)?;
    let found = skiff_runtime::network::list_netns(&format!("skiff-{id}-{name}-"));
    match found.as_slice() {
        [ns] => Ok(ns.clone()),
        _ => bail!("expected one namespace of {name} on node {id}, found {found:?}"),
    }
}

fn have(tool: &str) -> bool {
    Command::new(tool).arg("--version").output().is_ok_and(|o| o.status.success())
}

#[test]
fn containers_reach_the_outside_through_nat_with_nftables_and_with_iptables() -> Result<()> {
    require_privileged!();
    let _one_at_a_time = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    for tool in ["nft", "iptables"] {
        if !have(tool) {
            bail!("{tool} is not installed (scripts/deps.sh installs it)");
        }
    }
    // The "wan": a namespace on the far side of a veth whose only route is its own /24,
    // so an answer reaches a container only if its request left with the host's address.
    let wan = Uplink::new()?;
    let wan_ip = format!("{}.2", wan.host_ip.strip_suffix(".1").context("the uplink's host end is .1")?);
    let port = 18_080;
    let _server = Server::start(&wan.netns, port)?;
    let url = format!("http://{wan_ip}:{port}/hello");
    let _forwarding = IpForward::save()?;
    let _policy = ForwardPolicy::set("DROP")?;

    for firewall in ["none", "nft", "iptables"] {
        let mut n = Node::new()?;
        n.firewall = firewall;
        n.up_with(None, &[])?;
        // idle serves a file on 8080, which nothing outside the node may reach.
        let serve = "echo inside > /tmp/i && httpd -p 8080 -h /tmp && exec sleep 1000000";
        n.ok(&["run", IMAGE, "--name", "idle", "--stop-timeout", "1", "--", "sh", "-c", serve])?;
        let ip = n.wait_running("idle-1")?.ip.context("idle-1 has no address")?;
        let got = fetch(&n, &url)?;
        if firewall == "none" {
            // The control: without our rules the host drops (or cannot answer) the traffic.
            assert!(got.contains("status=") && !got.contains("status=0"), "no NAT, yet the wan answered: {got}");
        } else {
            assert_eq!(got.trim(), "hello from the wan\nstatus=0", "through {firewall}: {}", n.log());
            assert_eq!(std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward")?.trim(), "1");
            // Forwarding is on, yet a host that routes the bridge's subnet through the node
            // cannot open connections to an instance, even where FORWARD accepts by default.
            let _accepting = ForwardPolicy::set("ACCEPT")?;
            let route = ["-n", &wan.netns, "route", "add", &n.subnet, "via", &wan.host_ip];
            run("ip", &route)?;
            let knock = wget_from(&wan.netns, &format!("http://{ip}:8080/i"));
            let _ = run("ip", &["-n", &wan.netns, "route", "del", &n.subnet]);
            let knock = knock?;
            assert!(
                !knock.contains("inside") && !knock.contains("status=0"),
                "{firewall}: the wan reached idle-1: {knock}"
            );
        }
        // The rules stay while an instance on the bridge outlives the agent (asked from
        // inside its namespace: with the agent gone there is no `skiff exec`)...
        let netns = instance_netns(&n, "idle-1")?;
        n.terminate_up()?;
        if firewall != "none" {
            let got = run(
                "ip",
                &["netns", "exec", &netns, "busybox", "timeout", "5", "busybox", "wget", "-q", "-O", "-", &url],
            )?;
            assert_eq!(got.trim(), "hello from the wan", "{firewall}: the agent is away");
        }
        // ...are written once however often the agent starts...
        n.up_with(None, &[])?;
        let names = n.nat().context("the node's subnet")?;
        let chain = names.chain();
        let jumps = |table: &str, from: &str| -> Result<usize> {
            Ok(run("iptables", &["-t", table, "-S", from])?
                .lines()
                .filter(|l| l.ends_with(&format!("-j {chain}")))
                .count())
        };
        let expected = if firewall == "iptables" { 1 } else { 0 };
        assert_eq!(jumps("nat", "POSTROUTING")?, expected, "{firewall}: masquerade jumps");
        if firewall != "none" {
            assert_eq!(jumps("filter", "FORWARD")?, 1, "{firewall}: FORWARD jumps (its policy drops)");
        }
        // ...and go when the node shuts down with nothing left on the bridge.
        n.ok(&["delete", "deployment", "idle"])?;
        wait_for(Duration::from_secs(30), "idle's instance to go", || n.instances().ok()?.is_empty().then_some(()))?;
        n.interrupt_up()?;
        assert!(run("iptables", &["-S", &chain]).is_err(), "{firewall}: iptables chain {chain} left behind");
        assert!(run("iptables", &["-t", "nat", "-S", &chain]).is_err(), "{firewall}: nat chain {chain} left behind");
        let table = names.table();
        assert!(run("nft", &["list", "table", "ip", &table]).is_err(), "{firewall}: nft table {table} left behind");
    }
    Ok(())
}

#[test]
fn the_agent_sets_up_bridge_networking_without_iproute2() -> Result<()> {
    require_privileged!();
    let _one_at_a_time = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // The agent's PATH holds runc and nothing else: no `ip` to run.
    let tools = tempfile::tempdir()?;
    let runc = run("sh", &["-c", "command -v runc"])?;
    std::os::unix::fs::symlink(runc.trim(), tools.path().join("runc"))?;
    let mut n = Node::new()?;
    n.up_env.push(("PATH".into(), tools.path().display().to_string()));
    n.up_with(None, &[])?;
    n.ok(&["run", IMAGE, "--name", "idle", "--stop-timeout", "1", "--", "sleep", "1000000"])?;
    let ip = n.wait_running("idle-1")?.ip.context("idle-1 has no address")?;
    let gateway = n.subnet.replace(".0/24", ".1");

    // The bridge holds the gateway's address and a MAC derived from it.
    let bridge = run("ip", &["-o", "-4", "addr", "show", &n.bridge])?;
    assert!(bridge.contains(&format!("{gateway}/24")), "{bridge}");
    // The instance's namespace: eth0 with its address and derived MAC, up; lo up; the
    // default route through the gateway.
    let ns = instance_netns(&n, "idle-1")?;
    let eth0 = run("ip", &["-n", &ns, "-o", "addr", "show", "eth0"])?;
    // On its network's own subnet: a /28 of the node's /24 pool (the first one, whose
    // gateway is the pool's).
    assert!(eth0.contains(&format!("inet {ip}/28")), "{eth0}");
    let link = run("ip", &["-n", &ns, "link", "show", "eth0"])?;
    let mac = skiff_runtime::network::mac_of(ip.parse()?);
    assert!(link.contains(&mac) && link.contains("state UP"), "{link}");
    let lo = run("ip", &["-n", &ns, "link", "show", "lo"])?;
    assert!(lo.contains("UP"), "{lo}");
    let routes = run("ip", &["-n", &ns, "route"])?;
    assert!(routes.contains(&format!("default via {gateway}")), "{routes}");
    // Traffic flows both ways: the host answers (a reset from a closed port).
    let knock = n.ok(&["exec", "idle-1", "--", "sh", "-c", &format!("wget -q -O - http://{gateway}:9/ 2>&1; true")])?;
    assert!(knock.contains("refused"), "the gateway did not answer: {knock}");

    // Deleting the instance removes its namespace and veth.
    n.ok(&["delete", "deployment", "idle"])?;
    wait_for(Duration::from_secs(30), "idle's instance to go", || n.instances().ok()?.is_empty().then_some(()))?;
    assert!(!std::path::Path::new("/var/run/netns").join(&ns).exists(), "{ns} left behind");
    let veths = run("ip", &["-o", "link", "show", "master", &n.bridge])?;
    assert!(veths.trim().is_empty(), "veths left on the bridge: {veths}");
    Ok(())
}

/// What `http://ADDR:PORT/i` answers, asked from the test's process (bounded).
fn get(addr: &str, port: u16) -> Result<String> {
    use std::io::{Read, Write};
    let to: std::net::SocketAddr = format!("{addr}:{port}").parse()?;
    let mut s = std::net::TcpStream::connect_timeout(&to, Duration::from_secs(3))?;
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    write!(s, "GET /i HTTP/1.0\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    out.split_once("\r\n\r\n").map(|(_, b)| b.trim().to_string()).context("an answer without a body")
}

/// Which instances answer on `port` in `tries` requests from the host's loopback.
fn answering(port: u16, tries: usize) -> BTreeSet<String> {
    (0..tries).filter_map(|_| get("127.0.0.1", port).ok()).collect()
}

/// Requests to a published port every 50 ms from another thread, until stopped (at most
/// 2,000): how many were answered, and the failures.
struct Prober {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<(usize, Vec<String>)>,
}

impl Prober {
    fn start(port: u16) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let (mut ok, mut failed) = (0, vec![]);
            for _ in 0..2_000 {
                if flag.load(Ordering::Relaxed) {
                    break;
                }
                match get("127.0.0.1", port) {
                    Ok(b) if b.starts_with("web-") => ok += 1,
                    other => failed.push(format!("{other:?}")),
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            (ok, failed)
        });
        Prober { stop, thread }
    }

    fn finish(self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or((0, vec!["the prober panicked".into()]))
    }
}

#[test]
fn published_ports_are_forwarded_by_the_kernel_and_answer_while_the_agent_is_away() -> Result<()> {
    require_privileged!();
    let _one_at_a_time = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let wan = Uplink::new()?;
    let _forwarding = IpForward::save()?;
    for firewall in ["nft", "iptables"] {
        let mut n = Node::new()?;
        n.firewall = firewall;
        n.up_with(None, &[])?;
        let nat = n.nat().context("the node's subnet")?;
        let gateway = n.subnet.replace(".0/24", ".1");
        let port = common::free_port();
        let serve = "hostname > /tmp/i && exec httpd -f -p 8080 -h /tmp";
        let publish = format!("{port}:8080");
        n.ok(&[
            "run",
            IMAGE,
            "--name",
            "web",
            "--stop-timeout",
            "1",
            "--replicas",
            "2",
            "-p",
            &publish,
            "--",
            "sh",
            "-c",
            serve,
        ])?;
        // Both replicas answer on the port, in turn.
        let both = wait_for(Duration::from_secs(60), "both replicas to answer on the published port", || {
            Some(answering(port, 12)).filter(|seen| seen.len() == 2)
        })?;
        assert_eq!(both, BTreeSet::from(["web-1".to_string(), "web-2".to_string()]), "{firewall}");
        // The kernel forwards it, not a proxy.
        let rules = if firewall == "nft" {
            run("nft", &["list", "table", "ip", &nat.ports_table()])?
        } else {
            run("iptables", &["-t", "nat", "-S", &nat.ports_chain()])?
        };
        assert!(rules.contains(&format!("dport {port}")), "{firewall}: {rules}");
        // From another network, to the host's address there...
        let from_wan = wget_from(&wan.netns, &format!("http://{}:{port}/i", wan.host_ip))?;
        assert!(from_wan.starts_with("web-") && from_wan.contains("status=0"), "{firewall}: from the wan: {from_wan}");
        // ...and from an instance, to the gateway (the answer comes back the way it went).
        for _ in 0..4 {
            let cmd = format!("wget -q -O - http://{gateway}:{port}/i; echo status=$?");
            let hairpin = n.ok(&["exec", "web-1", "--", "sh", "-c", &cmd])?;
            assert!(hairpin.starts_with("web-") && hairpin.contains("status=0"), "{firewall}: hairpin: {hairpin}");
        }

        // The agent is killed and started again: the port answers throughout.
        let prober = Prober::start(port);
        std::thread::sleep(Duration::from_millis(500));
        n.kill_up()?;
        std::thread::sleep(Duration::from_secs(2));
        let away = get("127.0.0.1", port);
        assert!(away.as_ref().is_ok_and(|b| b.starts_with("web-")), "{firewall}: with the agent away: {away:?}");
        n.up_with(None, &[])?;
        wait_for(Duration::from_secs(30), "the restarted agent to report web-1", || n.wait_running("web-1").ok())?;
        std::thread::sleep(Duration::from_secs(2));
        let (ok, failed) = prober.finish();
        assert!(
            failed.is_empty(),
            "{firewall}: {} of {} requests failed around the restart: {failed:?}\n{}",
            failed.len(),
            ok + failed.len(),
            n.log()
        );
        assert!(ok >= 40, "{firewall}: only {ok} requests answered");
        assert_eq!(answering(port, 12).len(), 2, "{firewall}: both replicas serve after the restart");

        // A port another program holds is reported, not taken over.
        let busy = std::net::TcpListener::bind("0.0.0.0:0")?;
        let busy_port = busy.local_addr()?.port();
        let publish = format!("{busy_port}:8080");
        n.ok(&["run", IMAGE, "--name", "other", "--stop-timeout", "1", "-p", &publish, "--", "sh", "-c", serve])?;
        let other = n.wait_instance("other-1", Duration::from_secs(30), "a port error", |i| {
            i.message.as_deref().is_some_and(|m| m.contains("publishing"))
        })?;
        assert!(other.message.as_deref().is_some_and(|m| m.contains("in use")), "{firewall}: {other:?}");
        drop(busy);

        // A neighbour on the bridge cannot reach the host's loopback-only services (a local
        // DNS resolver, say), although the bridge routes 127.0.0.0/8 for the published
        // ports (route_localnet).
        let secret = std::net::UdpSocket::bind("127.0.0.1:0")?;
        let secret_at = secret.local_addr()?;
        secret.set_read_timeout(Some(Duration::from_secs(2)))?;
        let route_localnet = format!("/proc/sys/net/ipv4/conf/{}/route_localnet", n.bridge);
        assert_eq!(std::fs::read_to_string(&route_localnet)?.trim(), "1");
        let ns = instance_netns(&n, "web-1")?;
        // The neighbour sends to 127.0.0.1 through its gateway (its own loopback routes gone).
        for local in ["127.0.0.0/8", "127.0.0.1"] {
            run("ip", &["-n", &ns, "route", "del", "local", local, "dev", "lo", "table", "local"])?;
        }
        run("ip", &["-n", &ns, "route", "add", "127.0.0.0/8", "via", &gateway])?;
        let knock = |what: &str| -> Result<bool> {
            let path = skiff_runtime::network::netns_path(&ns);
            std::thread::spawn(move || -> Result<()> {
                let f = std::fs::File::open(path)?;
                nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET)?;
                std::net::UdpSocket::bind("0.0.0.0:0")?.send_to(b"knock", secret_at)?;
                Ok(())
            })
            .join()
            .map_err(|_| anyhow::anyhow!("the sender panicked"))??;
            let mut buf = [0u8; 16];
            let reached = secret.recv_from(&mut buf).is_ok();
            eprintln!("{firewall}: {what}: reached={reached}");
            Ok(reached)
        };
        assert!(!knock("with the drop")?, "{firewall}: a neighbour reached the host's {secret_at}");
        // The control: without the drop, the same datagram arrives.
        if firewall == "nft" {
            run("nft", &["flush", "chain", "ip", &nat.ports_table(), "raw"])?;
        } else {
            run("iptables", &["-t", "raw", "-F", &nat.ports_chain()])?;
        }
        assert!(knock("without the drop (control)")?, "{firewall}: the control did not reach {secret_at}");

        // Everything goes when the node shuts down with nothing left.
        for d in ["web", "other"] {
            n.ok(&["delete", "deployment", d])?;
        }
        wait_for(Duration::from_secs(30), "the instances to go", || n.instances().ok()?.is_empty().then_some(()))?;
        n.interrupt_up()?;
        assert!(run("nft", &["list", "table", "ip", &nat.ports_table()]).is_err(), "{firewall}: ports table left");
        if let Ok(v) = std::fs::read_to_string(&route_localnet) {
            assert_eq!(v.trim(), "0", "{firewall}: route_localnet left on");
        }
        for table in ["nat", "filter", "raw"] {
            let left = run("iptables", &["-t", table, "-S", &nat.ports_chain()]);
            assert!(left.is_err(), "{firewall}: {table} chain left: {left:?}");
        }
    }
    Ok(())
}

fn node_id(n: &Node) -> Result<String> {
    let state = skiff_agent::state::State::open(&n.data().join("agent.db"))?;
    state.meta("node_id")?.context("no node id in agent.db")
}

/// What `wget` inside instance `from` gets from `url`, with its exit status last.
fn wget_in(n: &Node, from: &str, url: &str) -> Result<String> {
    n.ok(&["exec", from, "--", "sh", "-c", &format!("timeout 3 wget -q -O - {url} 2>&1; echo status=$?")])
}

/// Echo requests the instance's namespace has received (`/proc/net/snmp`, Icmp InEchos).
fn echoes_received(ns: &str) -> Result<u64> {
    let snmp = run("ip", &["netns", "exec", ns, "cat", "/proc/net/snmp"])?;
    let mut icmp = snmp.lines().filter(|l| l.starts_with("Icmp:"));
    let (names, values) = (icmp.next().context("Icmp header")?, icmp.next().context("Icmp values")?);
    let at = names.split_whitespace().position(|f| f == "InEchos").context("InEchos")?;
    Ok(values.split_whitespace().nth(at).context("InEchos value")?.parse()?)
}

#[test]
fn stacks_reach_each_other_only_through_a_shared_network_and_cannot_forge_addresses() -> Result<()> {
    require_privileged!();
    let _one_at_a_time = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut n = Node::new()?;
    n.firewall = "nft";
    n.up_with(None, &[])?;
    let serve = "hostname > /tmp/i && exec httpd -f -p 8080 -h /tmp";
    let sleeper = |name: &str, networks: &str| {
        format!("  {name}:\n    image: {IMAGE}\n    command: [\"sleep\", \"1000000\"]\n    stop_grace_period: 1s\n{networks}")
    };
    // Stack a: a server on its own network and on the shared "plant", and a client.
    let a = format!(
        "name: a\nservices:\n  web:\n    image: {IMAGE}\n    command: [\"sh\", \"-c\", \"{serve}\"]\n    stop_grace_period: 1s\n    \
         networks: [default, plant]\n{}networks:\n  plant:\n    external: true\n",
        sleeper("client", "")
    );
    // Stack b: a neighbour on nothing shared. Stack c: a gauge on the plant network.
    let b = format!("name: b\nservices:\n{}", sleeper("probe", ""));
    let c = format!(
        "name: c\nservices:\n{}networks:\n  plant:\n    external: true\n",
        sleeper("gauge", "    networks: [plant]\n")
    );
    for (file, text) in [("a.yaml", a), ("b.yaml", b), ("c.yaml", c)] {
        let path = n.write(file, &text)?;
        n.ok(&["apply", "-f", &path.to_string_lossy()])?;
    }
    let (mut ip, mut on) = (std::collections::HashMap::new(), std::collections::HashMap::new());
    for i in ["web-1", "client-1", "probe-1", "gauge-1"] {
        let st = n.wait_running(i)?;
        ip.insert(i, st.ip.with_context(|| format!("{i} has no address"))?);
        on.insert(i, st.networks);
    }
    // Each network has a subnet of its own (a /28 of the node's /24 pool here), and web an
    // address on each of its two: on a_default (its first, `ip`) and on plant, as its
    // interface holds them.
    let pool = skiff_runtime::network::Subnet::parse(&n.subnet)?;
    let block = |a: &str| -> Result<String> {
        Ok(pool.block_of(a.parse()?, 28).with_context(|| format!("{a} is outside the pool {pool}"))?.to_string())
    };
    let web_plant = on["web-1"].get("plant").context("web's address on plant")?.clone();
    assert_eq!(on["web-1"].get("a_default"), Some(&ip["web-1"]), "{on:?}");
    assert_eq!(on["client-1"].get("a_default"), Some(&ip["client-1"]), "{on:?}");
    assert_eq!(on["gauge-1"].get("plant"), Some(&ip["gauge-1"]), "{on:?}");
    assert_eq!(block(&ip["web-1"])?, block(&ip["client-1"])?, "one network, one subnet");
    assert_eq!(block(&web_plant)?, block(&ip["gauge-1"])?, "one network, one subnet");
    let subnets: std::collections::BTreeSet<String> =
        [&ip["web-1"], &web_plant, &ip["probe-1"]].into_iter().map(|a| block(a)).collect::<Result<_>>()?;
    assert_eq!(subnets.len(), 3, "a_default, plant and b_default each have their own: {subnets:?}");
    let held = run("ip", &["-n", &instance_netns(&n, "web-1")?, "-4", "-o", "addr", "show", "dev", "eth0"])?;
    assert!(
        held.contains(&format!("{}/28", ip["web-1"])) && held.contains(&format!("{web_plant}/28")),
        "web's interface: {held}"
    );
    let web = format!("http://{}:8080/i", ip["web-1"]);
    let check = |n: &Node| -> Result<()> {
        // Same stack: by name and by address.
        let got = wget_in(n, "client-1", "http://web:8080/i")?;
        assert_eq!(got.trim(), "web-1\nstatus=0", "client -> web by name");
        assert_eq!(wget_in(n, "client-1", &web)?.trim(), "web-1\nstatus=0", "client -> web");
        // Another stack on nothing shared: not by address, and no name for it.
        let got = wget_in(n, "probe-1", &web)?;
        assert!(!got.contains("web-1") && !got.contains("status=0"), "probe (stack b) reached web: {got}");
        let hosts = n.ok(&["exec", "probe-1", "--", "cat", "/etc/hosts"])?;
        let lists = |a: &str| hosts.lines().any(|l| l.split('\t').next() == Some(a));
        assert!(!lists(&ip["web-1"]) && !lists(&web_plant) && !hosts.contains("client"), "probe's /etc/hosts: {hosts}");
        // A stack on the shared network reaches web, by name too (at web's address on
        // plant), but not web's stack-mate, nor web at its address on a_default.
        let got = wget_in(n, "gauge-1", "http://web:8080/i")?;
        assert_eq!(got.trim(), "web-1\nstatus=0", "gauge -> web over plant by name");
        let hosts = n.ok(&["exec", "gauge-1", "--", "cat", "/etc/hosts"])?;
        assert!(hosts.contains(&format!("{web_plant}\tweb-1 web\n")), "gauge's /etc/hosts: {hosts}");
        let got = wget_in(n, "gauge-1", &web)?;
        assert!(!got.contains("web-1") && !got.contains("status=0"), "gauge reached web on a_default: {got}");
        let got = wget_in(n, "gauge-1", &format!("http://{}:9/", ip["client-1"]))?;
        assert!(!got.contains("refused"), "gauge reached client (not on plant): {got}");
        Ok(())
    };
    check(&n)?;
    // Each reaches the host (a reset from a closed port) through its own network's
    // gateway, the bridge's address on that network's subnet.
    for i in ["probe-1", "gauge-1"] {
        let knock = format!("wget -q -O - http://{}:9/ 2>&1; true", n.subnet.replace(".0/24", ".1"));
        let got = n.ok(&["exec", i, "--", "sh", "-c", &knock])?;
        assert!(got.contains("refused"), "{i} did not reach the host: {got}");
        let routes = run("ip", &["-n", &instance_netns(&n, i)?, "route"])?;
        let gateway = pool.block_of(ip[i].parse()?, 28).context("block")?.gateway();
        assert!(routes.contains(&format!("default via {gateway} ")), "{i}: {routes}");
    }

    // The agent is killed and its table deleted while it is away: started again, it
    // rebuilds the table from what runs.
    let nat = n.nat().context("the node's subnet")?;
    let gateway = n.subnet.replace(".0/24", ".1");
    n.kill_up()?;
    run("nft", &["delete", "table", "bridge", &nat.lan_table()])?;
    n.up_with(None, &[])?;
    n.wait_running("web-1")?;
    check(&n)?;

    // The routed way round: probe sends its packets for web to the gateway's MAC, so the
    // host would route them from the bridge back onto it. (Web's address is on another
    // network's subnet, so that is probe's own route to it; the one below makes it on-link,
    // so that the neighbour entries set here decide where the frames go.)
    let (probe_ns, web_ns) = (instance_netns(&n, "probe-1")?, instance_netns(&n, "web-1")?);
    run("ip", &["-n", &probe_ns, "route", "add", &format!("{}/32", ip["web-1"]), "dev", "eth0"])?;
    let gateway_mac = skiff_runtime::network::mac_of(gateway.parse()?);
    run("ip", &["-n", &probe_ns, "neigh", "replace", &ip["web-1"], "lladdr", &gateway_mac, "dev", "eth0"])?;
    let echoes = |what: &str, src: &str| -> Result<u64> {
        let before = echoes_received(&web_ns)?;
        let ping = ["netns", "exec", &probe_ns, "busybox", "ping", "-c", "2", "-W", "1", "-I", src, &ip["web-1"]];
        let _ = run("ip", &ping);
        let got = echoes_received(&web_ns)? - before;
        eprintln!("{what}: {got} echo requests arrived");
        Ok(got)
    };
    assert_eq!(echoes("routed through the gateway", &ip["probe-1"])?, 0, "probe reached web through the host");

    // probe claims client's MAC: the bridge must not learn it on probe's port.
    let client_ns = instance_netns(&n, "client-1")?;
    let (client_mac, probe_mac) = (
        skiff_runtime::network::mac_of(ip["client-1"].parse()?),
        skiff_runtime::network::mac_of(ip["probe-1"].parse()?),
    );
    let learned_on = |mac: &str| -> Result<String> {
        let fdb = run("bridge", &["fdb", "show", "br", &n.bridge])?;
        Ok(fdb.lines().find(|l| l.starts_with(mac)).and_then(|l| l.split_whitespace().nth(2)).unwrap_or("").to_string())
    };
    let client_port = skiff_runtime::network::veth_name(&client_ns);
    let probe_port = skiff_runtime::network::veth_name(&probe_ns);
    n.ok(&["exec", "client-1", "--", "sh", "-c", &format!("ping -c 1 -W 1 {gateway} >/dev/null; true")])?;
    assert_eq!(learned_on(&client_mac)?, client_port);
    let claim = |what: &str| -> Result<String> {
        run("ip", &["-n", &probe_ns, "link", "set", "eth0", "address", &client_mac])?;
        let _ = run("ip", &["netns", "exec", &probe_ns, "busybox", "ping", "-c", "1", "-W", "1", &gateway]);
        run("ip", &["-n", &probe_ns, "link", "set", "eth0", "address", &probe_mac])?;
        let port = learned_on(&client_mac)?;
        eprintln!("{what}: client's MAC learned on {port}");
        Ok(port)
    };
    assert_eq!(claim("claimed")?, client_port, "probe took client's MAC");

    // probe forges client's address (root on the host gives its namespace that address,
    // as CAP_NET_RAW inside would let it write such packets) and pings web with it: the
    // bridge drops the frames at probe's port.
    let forged = format!("{}/32", ip["client-1"]);
    run("ip", &["-n", &probe_ns, "addr", "add", &forged, "dev", "eth0"])?;
    let web_mac = skiff_runtime::network::mac_of(ip["web-1"].parse()?);
    run("ip", &["-n", &probe_ns, "neigh", "replace", &ip["web-1"], "lladdr", &web_mac, "dev", "eth0"])?;
    assert_eq!(echoes("forged", &ip["client-1"])?, 0, "frames with client's address left probe's port");

    // The controls. Without the bridge's prerouting rules, the MAC claim and the routed
    // way round get through...
    run("nft", &["flush", "chain", "bridge", &nat.lan_table(), "prerouting"])?;
    assert_eq!(claim("claimed, without the checks (control)")?, probe_port, "the MAC control failed");
    run("ip", &["-n", &probe_ns, "neigh", "replace", &ip["web-1"], "lladdr", &gateway_mac, "dev", "eth0"])?;
    {
        let _accepting = ForwardPolicy::set("ACCEPT")?;
        assert!(echoes("routed, without the checks (control)", &ip["probe-1"])? > 0, "the routed control failed");
    }
    // ...and without the forward rules too (a forged address is also stopped there: probe's
    // port is on no network of web's), the forged frames arrive, and probe reaches web
    // with its own address: what kept it out above were the network rules.
    run("ip", &["-n", &probe_ns, "neigh", "replace", &ip["web-1"], "lladdr", &web_mac, "dev", "eth0"])?;
    run("nft", &["flush", "chain", "bridge", &nat.lan_table(), "forward"])?;
    assert!(echoes("forged, without the checks (control)", &ip["client-1"])? > 0, "the forged control failed");
    run("ip", &["-n", &probe_ns, "addr", "del", &forged, "dev", "eth0"])?;
    // (Web's answers on-link too: bridged, as before networks had subnets of their own.)
    run("ip", &["-n", &web_ns, "route", "add", &format!("{}/32", ip["probe-1"]), "dev", "eth0"])?;
    let got = wget_in(&n, "probe-1", &web)?;
    assert_eq!(got.trim(), "web-1\nstatus=0", "the control: probe -> web without the forward rules");

    for d in ["web", "client", "probe", "gauge"] {
        n.ok(&["delete", "deployment", d])?;
    }
    wait_for(Duration::from_secs(30), "the instances to go", || n.instances().ok()?.is_empty().then_some(()))?;
    n.interrupt_up()?;
    assert!(run("nft", &["list", "table", "bridge", &nat.lan_table()]).is_err(), "the bridge table was left");
    Ok(())
}

/// A segment of the "plant network": a veth pair whose host end is the macvlan parent and
/// whose other end is a device on the segment — a namespace serving `hello` over HTTP.
/// Removed on drop.
struct Segment {
    parent: String,
    ns: String,
    /// The segment's first three octets.
    net: String,
    _server: Option<Server>,
}

impl Segment {
    fn new() -> Result<Self> {
        let id = std::process::id() % 100_000;
        let (parent, ns, net) = (format!("skmv{id}"), format!("skmvp{id}"), format!("10.252.{}", id % 250));
        run("ip", &["netns", "add", &ns])?;
        let mut seg = Segment { parent: parent.clone(), ns: ns.clone(), net: net.clone(), _server: None };
        run("ip", &["link", "add", &parent, "type", "veth", "peer", "name", "skmvdev", "netns", &ns])?;
        run("ip", &["addr", "add", &format!("{net}.1/24"), "dev", &parent])?;
        run("ip", &["link", "set", &parent, "up"])?;
        run("ip", &["-n", &ns, "addr", "add", &format!("{net}.2/24"), "dev", "skmvdev"])?;
        run("ip", &["-n", &ns, "link", "set", "skmvdev", "up"])?;
        run("ip", &["-n", &ns, "link", "set", "lo", "up"])?;
        seg._server = Some(Server::start(&ns, 8080)?);
        Ok(seg)
    }

    /// What `url` answers, asked from the segment's device.
    fn fetch(&self, url: &str) -> Result<String> {
        wget_from(&self.ns, url)
    }
}

impl Drop for Segment {
    fn drop(&mut self) {
        let _ = run("ip", &["netns", "del", &self.ns]);
        let _ = run("ip", &["link", "del", &self.parent]);
    }
}

#[test]
fn macvlan_gives_instances_their_own_addresses_on_the_parent_s_segment() -> Result<()> {
    require_privileged!();
    let _one_at_a_time = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let seg = Segment::new()?;
    let mut n = Node::new()?;
    n.up_with(None, &[])?;
    let serve = "hostname > /tmp/i && exec httpd -f -p 8080 -h /tmp";
    // One instance at a fixed address; the subnet is the parent's own on this node.
    let fixed = format!("{}.10", seg.net);
    let network = format!("macvlan:{},ip={fixed}", seg.parent);
    n.ok(&["run", IMAGE, "--name", "cam", "--stop-timeout", "1", "--network", &network, "--", "sh", "-c", serve])?;
    let cam = n.wait_running("cam-1")?;
    assert_eq!(cam.ip.as_deref(), Some(fixed.as_str()));
    // The segment reaches it at its address, and it reaches the segment.
    assert_eq!(seg.fetch(&format!("http://{fixed}:8080/i"))?.trim(), "cam-1\nstatus=0");
    let cmd = format!("timeout 5 wget -q -O - http://{}.2:8080/hello; echo status=$?", seg.net);
    assert_eq!(n.ok(&["exec", "cam-1", "--", "sh", "-c", &cmd])?.trim(), "hello from the wan\nstatus=0");
    // Its MAC is derived from its address, as on the bridge.
    let ns = instance_netns(&n, "cam-1")?;
    let link = run("ip", &["-d", "-n", &ns, "link", "show", "eth0"])?;
    assert!(
        link.contains(&skiff_runtime::network::mac_of(fixed.parse()?)) && link.contains("macvlan mode bridge"),
        "{link}"
    );

    // Replicas leased from a range, as a compose file with an ipam config asks.
    let compose = format!(
        "name: plant\nservices:\n  workers:\n    image: {IMAGE}\n    command: [\"sh\", \"-c\", \"{serve}\"]\n    stop_grace_period: 1s\n    \
         deploy: {{replicas: 2}}\n    networks: [lan]\nnetworks:\n  lan:\n    driver: macvlan\n    \
         driver_opts: {{parent: {}}}\n    ipam:\n      config:\n        - subnet: {net}.0/24\n          \
         ip_range: {net}.64/29\n",
        seg.parent,
        net = seg.net
    );
    let file = n.write("plant.yaml", &compose)?;
    n.ok(&["apply", "-f", &file.to_string_lossy()])?;
    let range = skiff_runtime::network::Subnet::parse(&format!("{}.64/29", seg.net))?;
    let mut seen = BTreeSet::new();
    for w in ["workers-1", "workers-2"] {
        let ip = n.wait_running(w)?.ip.with_context(|| format!("{w} has no address"))?;
        assert!(range.contains(ip.parse()?), "{w} at {ip}, outside {range}");
        assert_eq!(seg.fetch(&format!("http://{ip}:8080/i"))?.trim(), format!("{w}\nstatus=0"));
        seen.insert(ip);
    }
    assert_eq!(seen.len(), 2, "two replicas, two addresses: {seen:?}");

    // The node's own bridge is no segment: refused, naming it.
    let on_bridge = format!("macvlan:{},ip=10.9.9.8,subnet=10.9.9.0/24", n.bridge);
    n.ok(&["run", IMAGE, "--name", "sneak", "--stop-timeout", "1", "--network", &on_bridge, "--", "sleep", "1000000"])?;
    let sneak = n.wait_instance("sneak-1", Duration::from_secs(30), "a message", |i| i.message.is_some())?;
    assert!(sneak.message.as_deref().is_some_and(|m| m.contains("this node's bridge")), "{sneak:?}");

    // A parent this node lacks: the instance fails, naming it.
    n.ok(&[
        "run",
        IMAGE,
        "--name",
        "lost",
        "--network",
        "macvlan:skmvnone0,ip=10.9.9.9,subnet=10.9.9.0/24",
        "--",
        "sleep",
        "1000000",
    ])?;
    let lost = n.wait_instance("lost-1", Duration::from_secs(30), "a message", |i| i.message.is_some())?;
    assert!(lost.message.as_deref().is_some_and(|m| m.contains("skmvnone0")), "{lost:?}");

    for d in ["cam", "workers", "lost", "sneak"] {
        n.ok(&["delete", "deployment", d])?;
    }
    wait_for(Duration::from_secs(30), "the instances to go", || n.instances().ok()?.is_empty().then_some(()))?;
    assert!(!skiff_runtime::network::netns_path(&ns).exists(), "{ns} left behind");
    Ok(())
}
