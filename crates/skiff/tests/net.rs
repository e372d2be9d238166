//! The node's own networking against a real kernel: outbound NAT through nftables and
//! through iptables, beside a host whose FORWARD policy drops (as installing docker.io
//! leaves it). One test: it changes the host's FORWARD policy for its duration, which no
//! other test in this binary may see.

mod common;

use anyhow::{bail, Context, Result};
use common::{wait_for, Node, Uplink, IMAGE};
use skiff_testkit::require_privileged;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

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

fn nft_table(n: &Node) -> String {
    let name: String = n.bridge.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect();
    format!("skiff_{name}")
}

#[test]
fn containers_reach_the_outside_through_nat_with_nftables_and_with_iptables() -> Result<()> {
    require_privileged!();
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
    let _policy = ForwardPolicy::set("DROP")?;

    for firewall in ["none", "nft", "iptables"] {
        let mut n = Node::new()?;
        n.up_with(None, &["--firewall", firewall])?;
        n.ok(&["run", IMAGE, "--name", "idle", "--", "sleep", "1000000"])?;
        n.wait_running("idle-1")?;
        let got = fetch(&n, &url)?;
        if firewall == "none" {
            // The control: without our rules the host drops (or cannot answer) the traffic.
            assert!(got.contains("status=") && !got.contains("status=0"), "no NAT, yet the wan answered: {got}");
        } else {
            assert_eq!(got.trim(), "hello from the wan\nstatus=0", "through {firewall}: {}", n.log());
            assert_eq!(std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward")?.trim(), "1");
        }
        // The rules stay while an instance on the bridge outlives the agent (asked from
        // inside its namespace: with the agent gone there is no `skiff exec`)...
        let netns = instance_netns(&n)?;
        n.kill_up()?;
        if firewall != "none" {
            let got = run(
                "ip",
                &["netns", "exec", &netns, "busybox", "timeout", "5", "busybox", "wget", "-q", "-O", "-", &url],
            )?;
            assert_eq!(got.trim(), "hello from the wan", "{firewall}: the agent is away");
        }
        // ...and go when the node shuts down with nothing left on the bridge.
        n.up_with(None, &["--firewall", firewall])?;
        n.ok(&["delete", "deployment", "idle"])?;
        wait_for(Duration::from_secs(30), "idle's instance to go", || n.instances().ok()?.is_empty().then_some(()))?;
        n.interrupt_up()?;
        let chain = format!("SKIFF-{}", n.bridge);
        assert!(run("iptables", &["-S", &chain]).is_err(), "{firewall}: iptables chain {chain} left behind");
        let nat = run("iptables", &["-t", "nat", "-S", "POSTROUTING"])?;
        assert!(!nat.contains(&n.subnet), "{firewall}: masquerade left behind: {nat}");
        let table = nft_table(&n);
        assert!(run("nft", &["list", "table", "ip", &table]).is_err(), "{firewall}: nft table {table} left behind");
    }
    Ok(())
}
