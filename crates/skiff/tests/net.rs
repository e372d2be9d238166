//! The node's own networking against a real kernel: bridge, veth and namespaces made
//! through netlink with no iproute2 on the agent's PATH; outbound NAT through nftables and
//! through iptables, beside a host whose FORWARD policy drops (as installing docker.io
//! leaves it). The tests of this binary run one at a time: one changes the host's FORWARD
//! policy for its duration.

mod common;

use anyhow::{bail, Context, Result};
use common::{wait_for, Node, Uplink, IMAGE};
use skiff_testkit::require_privileged;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
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

/// The network namespace of this node's only instance.
fn instance_netns(n: &Node) -> Result<String> {
    let state = skiff_agent::state::State::open(&n.data().join("agent.db"))?;
    let id = state.meta("node_id")?.context("no node id in agent.db")?;
    let mut found = skiff_runtime::network::list_netns(&format!("skiff-{id}-"));
    match (found.pop(), found.is_empty()) {
        (Some(ns), true) => Ok(ns),
        _ => bail!("expected one instance namespace of node {id}"),
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
        n.ok(&["run", IMAGE, "--name", "idle", "--", "sh", "-c", serve])?;
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
            let knock = run(
                "ip",
                &[
                    "netns",
                    "exec",
                    &wan.netns,
                    "sh",
                    "-c",
                    &format!("timeout 5 busybox wget -q -O - http://{ip}:8080/i; echo status=$?"),
                ],
            );
            let _ = run("ip", &["-n", &wan.netns, "route", "del", &n.subnet]);
            let knock = knock?;
            assert!(
                !knock.contains("inside") && !knock.contains("status=0"),
                "{firewall}: the wan reached idle-1: {knock}"
            );
        }
        // The rules stay while an instance on the bridge outlives the agent (asked from
        // inside its namespace: with the agent gone there is no `skiff exec`)...
        let netns = instance_netns(&n)?;
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
    n.ok(&["run", IMAGE, "--name", "idle", "--", "sleep", "1000000"])?;
    let ip = n.wait_running("idle-1")?.ip.context("idle-1 has no address")?;
    let gateway = n.subnet.replace(".0/24", ".1");

    // The bridge holds the gateway's address and a MAC derived from it.
    let bridge = run("ip", &["-o", "-4", "addr", "show", &n.bridge])?;
    assert!(bridge.contains(&format!("{gateway}/24")), "{bridge}");
    // The instance's namespace: eth0 with its address and derived MAC, up; lo up; the
    // default route through the gateway.
    let ns = instance_netns(&n)?;
    let eth0 = run("ip", &["-n", &ns, "-o", "addr", "show", "eth0"])?;
    assert!(eth0.contains(&format!("inet {ip}/24")), "{eth0}");
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
