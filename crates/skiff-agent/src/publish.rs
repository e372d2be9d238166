//! Step *publish*: each running instance's /etc/hosts names the peers that share a
//! network with it (written only on a change), published ports send traffic to the
//! instances the update planner says serve, and the bridge's network table
//! ([`skiff_runtime::isolation`]) follows instances as they start and go.
//!
//! Where the node's firewall is ours (`--firewall nft|iptables`, or found by `auto`), the
//! kernel forwards published IPv4 ports ([`skiff_runtime::ports`]): they keep answering
//! while the agent restarts. The agent holds a socket on each such port, so a port another
//! program uses is reported instead of silently taken over, and no other program can take
//! it later. Without a firewall (and for IPv6 addresses) the agent's proxy forwards.

use crate::proxy::{PortKey, Proxies};
use crate::{blocking, Agent, AgentError};
use skiff_model::{Deployment, InstanceState, NetworkMode, Protocol};
use skiff_runtime::isolation::{Lan, Member};
use skiff_runtime::nat::Nat;
use skiff_runtime::network::{has_link, veth_name};
use skiff_runtime::ports::PortRule;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use tracing::warn;

/// Who forwards the published ports.
#[derive(Default)]
pub(crate) struct Ports {
    pub proxies: Proxies,
    /// Set once the node's firewall rules are written: the kernel forwards IPv4 ports.
    pub kernel: Option<KernelPorts>,
}

#[derive(Default)]
pub(crate) struct KernelPorts {
    /// The rules last written (none yet at start: those of an earlier run stay until the
    /// first sync replaces them).
    written: Option<Vec<PortRule>>,
    held: HashMap<PortKey, Held>,
}

/// A socket bound on a published port (not listening: should the rules ever be missing, a
/// client is refused rather than left hanging in a backlog nobody accepts from), so
/// nothing else binds it.
struct Held(#[allow(dead_code)] std::os::fd::OwnedFd);

impl Held {
    fn bind(key: &PortKey) -> std::io::Result<Held> {
        use nix::sys::socket::SockType;
        let SocketAddr::V4(at) = key.bind else { return Err(std::io::Error::other("not an IPv4 address")) };
        let kind = match key.protocol {
            Protocol::Tcp => SockType::Stream,
            Protocol::Udp => SockType::Datagram,
        };
        Ok(Held(bind_reuseport(at, kind)?))
    }
}

/// A socket bound to `at` with `SO_REUSEPORT` (close-on-exec, non-blocking): a published
/// port's and a fleet service's on its virtual address (the same port on another address
/// of the host's) may both be bound; a program of its own on the port (or of another
/// user) still stops the bind.
pub(crate) fn bind_reuseport(
    at: std::net::SocketAddrV4,
    kind: nix::sys::socket::SockType,
) -> std::io::Result<std::os::fd::OwnedFd> {
    use nix::sys::socket::{bind, setsockopt, socket, sockopt, AddressFamily, SockFlag, SockaddrIn};
    let fd = socket(AddressFamily::Inet, kind, SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK, None)?;
    setsockopt(&fd, sockopt::ReusePort, &true)?;
    bind(std::os::fd::AsRawFd::as_raw_fd(&fd), &SockaddrIn::from(at))?;
    Ok(fd)
}

impl KernelPorts {
    /// Forwards exactly `ports` (each with its targets); the ports that cannot be
    /// published, with why.
    async fn sync(&mut self, nat: &Nat, ports: HashMap<PortKey, Vec<SocketAddr>>) -> Vec<(PortKey, String)> {
        let mut errors = vec![];
        self.held.retain(|k, _| ports.contains_key(k));
        let mut rules = vec![];
        for (key, targets) in ports {
            let IpAddr::V4(bind) = key.bind.ip() else { continue };
            if !self.held.contains_key(&key) {
                match Held::bind(&key) {
                    Ok(h) => {
                        self.held.insert(key.clone(), h);
                    }
                    Err(e) => {
                        errors.push((key, e.to_string()));
                        continue;
                    }
                }
            }
            let mut targets: Vec<SocketAddrV4> = targets
                .into_iter()
                .filter_map(|t| match t {
                    SocketAddr::V4(v4) => Some(v4),
                    SocketAddr::V6(_) => None,
                })
                .collect();
            targets.sort();
            let bind = (!bind.is_unspecified()).then_some(bind);
            rules.push(PortRule { protocol: key.protocol, bind, port: key.bind.port(), targets });
        }
        rules.sort();
        if self.written.as_ref() != Some(&rules) {
            let (nat, new, first) = (nat.clone(), rules.clone(), self.written.is_none());
            match blocking(move || nat.publish(&new, first)).await {
                Ok(()) => self.written = Some(rules),
                Err(e) => {
                    for r in &rules {
                        let bind = IpAddr::V4(r.bind.unwrap_or(Ipv4Addr::UNSPECIFIED));
                        let key = PortKey { bind: SocketAddr::new(bind, r.port), protocol: r.protocol };
                        errors.push((key, e.to_string()));
                    }
                }
            }
        }
        errors
    }
}

impl Agent {
    /// The node's networks, when its firewall is ours and `nft` is there to enforce them
    /// (the bridge family): the instances on the bridge that run now.
    pub(crate) fn open_lan(&self, rows: &[crate::state::InstanceRow]) -> Result<(), AgentError> {
        let mut lan = Lan::default();
        // Every instance whose veth exists, whatever its row says (one killed with the
        // agent between its start and its row's update is running all the same).
        for r in rows.iter().filter(|r| r.spec.network == NetworkMode::Bridge) {
            let ns = self.netns_name(&r.container_id);
            let veth = veth_name(&ns);
            let addresses = r.all_addresses();
            if addresses.is_empty() || !has_link(&veth) {
                continue;
            }
            lan.insert(&veth, Member { addresses, networks: r.spec.joined_networks() });
        }
        lan.write(&self.nat)?;
        if let Ok(mut l) = self.lan.lock() {
            *l = Some(lan);
        }
        Ok(())
    }

    /// Joins an instance to its networks on the bridge: before its process starts, so its
    /// first packets already pass.
    /// `addresses`: the first is the one its MAC is derived from.
    pub(crate) fn lan_admit(&self, netns: &str, addresses: Vec<Ipv4Addr>, spec: &Deployment) -> Result<(), AgentError> {
        let Ok(mut guard) = self.lan.lock() else { return Err(AgentError::Other("the network table's lock".into())) };
        let Some(lan) = guard.as_mut() else { return Ok(()) };
        Ok(lan.admit(&self.nat, &veth_name(netns), Member { addresses, networks: spec.joined_networks() })?)
    }

    /// Whether the kernel still holds the rules this agent wrote (a restarted nftables
    /// service flushes the whole ruleset): what is missing is written again, so networks
    /// are enforced again and `route_localnet` never stays on without its loopback drop.
    pub(crate) async fn recheck_firewall(self: &Arc<Self>) {
        let me = Arc::clone(self);
        let lan_missing = blocking(move || {
            let Ok(mut guard) = me.lan.lock() else { return false };
            let Some(lan) = guard.as_mut() else { return false };
            if skiff_runtime::nat::run_ok("nft", &["list", "table", "bridge", &me.nat.lan_table()]) {
                return false;
            }
            lan.rewrite();
            if let Err(e) = lan.write(&me.nat) {
                warn!(error = %e, "writing the bridge's network table again");
            }
            true
        })
        .await;
        let mut ports = self.ports.lock().await;
        if let Some(k) = ports.kernel.as_mut().filter(|k| k.written.is_some()) {
            let nat = self.nat.clone();
            if !blocking(move || nat.ports_present()).await {
                warn!("the published ports' rules were gone: writing them again");
                k.written = None;
            }
        }
        drop(ports);
        if lan_missing {
            warn!("the bridge's network table was gone: written again");
        }
    }

    /// Takes an instance off the bridge's networks (before its veth goes).
    pub(crate) fn lan_forget(&self, netns: &str) {
        let Ok(mut guard) = self.lan.lock() else { return };
        let Some(lan) = guard.as_mut() else { return };
        if let Err(e) = lan.forget(&self.nat, &veth_name(netns)) {
            warn!(error = %e, "rewriting the bridge's network table");
        }
    }

    /// Writes `r`'s `/etc/hosts` as `hosts_for` makes it, when it changed since this agent
    /// last wrote it.
    fn write_hosts(&self, r: &crate::state::InstanceRow, spec: &Deployment, me: &str, ip: Option<Ipv4Addr>) {
        let Ok(h) = self.hosts_for(spec, me, ip) else { return };
        let same = self.hosts_written.lock().is_ok_and(|w| w.get(&r.container_id) == Some(&h));
        if !same && self.runtimes.of(r.spec.runtime).update_hosts(&r.container_id, &h).is_ok() {
            if let Ok(mut w) = self.hosts_written.lock() {
                w.insert(r.container_id.clone(), h);
            }
        }
    }

    /// `/etc/hosts` for one instance: itself plus every addressed instance that shares a
    /// network with it, reachable by instance name and by deployment (service) name.
    pub(crate) fn hosts_for(&self, spec: &Deployment, me: &str, my_ip: Option<Ipv4Addr>) -> Result<String, AgentError> {
        let rows = self.db(|s| s.instances())?;
        let mine: BTreeSet<String> = spec.joined_networks().into_iter().collect();
        let mut out = String::from("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n");
        if let Some(ip) = my_ip {
            let row = rows.iter().find(|r| r.name == me);
            let dep = row.map(|r| r.deployment.clone()).unwrap_or_default();
            let stable: String =
                row.map(crate::stable_names).unwrap_or_default().iter().map(|n| format!(" {n}")).collect();
            out.push_str(&format!("{ip}\t{me} {dep}{stable}\n"));
        }
        // Peers on the bridge only: a macvlan instance is on another segment (and the host
        // cannot reach it through the parent), and sees no peers itself.
        let shares = |r: &&crate::state::InstanceRow| {
            spec.network == NetworkMode::Bridge
                && r.spec.network == NetworkMode::Bridge
                && r.spec.joined_networks().iter().any(|n| mine.contains(n))
        };
        for r in rows.iter().filter(|r| r.name != me && r.state == InstanceState::Running).filter(shares) {
            // Switched away from (blue-green): reachable by its own name, not the service's.
            let service = if r.retire_at_ms.is_some() { "" } else { r.deployment.as_str() };
            // At its address on a network the two share.
            if let Some(ip) = r.address_for(&mine) {
                let stable: String = crate::stable_names(r).iter().map(|n| format!(" {n}")).collect();
                out.push_str(&format!("{ip}\t{} {service}{stable}\n", r.name).replace("  ", " ").replace(" \n", "\n"));
            }
        }
        out.push_str(&self.extra_hosts(spec));
        Ok(out)
    }

    /// `/etc/hosts` lines of the deployment's `extra_hosts`, `host-gateway` being the node
    /// as its bridge's instances reach it.
    pub(crate) fn extra_hosts(&self, d: &Deployment) -> String {
        let gateway = self.bridge.subnet.gateway().to_string();
        d.extra_hosts
            .iter()
            .map(|h| {
                let ip = if h.ip == skiff_model::options::HOST_GATEWAY { &gateway } else { &h.ip };
                format!("{ip}\t{}\n", h.host)
            })
            .collect()
    }

    pub(crate) async fn sync_hosts_and_ports(self: &Arc<Self>) -> Result<(), AgentError> {
        // Held from before the state is read until the targets are set: two syncs at once
        // (the loop's and a stop's) would otherwise race, and the older state, written
        // last, put an instance that was drained and stopped back on its ports (a
        // connection there hangs until the connect times out).
        let mut forwarders = self.ports.lock().await;
        let rows = self.db(|s| s.instances())?;
        // Until the loop has judged which instances serve (just after a start), ports keep
        // what they had: for the kernel's rules, those the earlier run wrote.
        let serving = self.serving.lock().ok().and_then(|s| s.clone());
        let stopping: HashSet<String> = self.stopping.lock().map(|s| s.clone()).unwrap_or_default();
        // Each published port with the instances that serve it, and the deployment's
        // instance names (to report a port that cannot be bound).
        let mut ports: HashMap<PortKey, Vec<SocketAddr>> = HashMap::new();
        let mut owners: HashMap<PortKey, Vec<String>> = HashMap::new();
        // An instance sharing another's network sees that one's hosts.
        for r in rows.iter().filter(|r| r.state == InstanceState::Running && r.spec.network == NetworkMode::Service) {
            let owner = crate::network_owner(r);
            if let Some(t) = rows.iter().find(|t| t.name == owner && t.spec.network == NetworkMode::Bridge) {
                self.write_hosts(r, &t.spec, &t.name, t.ip.as_ref().and_then(|i| i.parse().ok()));
            }
        }
        for r in rows.iter().filter(|r| r.state == InstanceState::Running && r.spec.network == NetworkMode::Bridge) {
            let my_ip = r.ip.as_ref().and_then(|i| i.parse().ok());
            self.write_hosts(r, &r.spec, &r.name, my_ip);
            let serves = serving.as_ref().is_some_and(|s| serves(s, &stopping, r));
            for p in &r.spec.ports {
                let bind_ip: IpAddr =
                    p.host_ip.as_ref().and_then(|i| i.parse().ok()).unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
                let key = PortKey { bind: SocketAddr::new(bind_ip, p.host_port), protocol: p.protocol };
                owners.entry(key.clone()).or_default().push(r.name.clone());
                let targets = ports.entry(key).or_default();
                if let (true, Some(ip)) = (serves, my_ip) {
                    targets.push(SocketAddr::new(IpAddr::V4(ip), p.container_port));
                }
            }
        }
        if serving.is_none() {
            return Ok(());
        }
        let mut failed: Vec<(PortKey, String)> = vec![];
        let Ports { proxies, kernel } = &mut *forwarders;
        let (by_kernel, by_proxy): (HashMap<_, _>, HashMap<_, _>) =
            ports.into_iter().partition(|(k, _)| kernel.is_some() && k.bind.is_ipv4());
        for (key, targets) in &by_proxy {
            if let Err(e) = proxies.ensure(key.clone(), targets.clone()).await {
                failed.push((key.clone(), e.to_string()));
            }
        }
        let keep: Vec<PortKey> = by_proxy.into_keys().collect();
        proxies.retain(&keep);
        if let Some(k) = kernel {
            failed.extend(k.sync(&self.nat, by_kernel).await);
        }
        drop(forwarders);
        let mut port_errors = vec![];
        for (key, e) in failed {
            for n in owners.get(&key).into_iter().flatten() {
                port_errors.push((n.clone(), format!("publishing {}: {e}", key.bind)));
            }
        }
        for (name, msg) in port_errors {
            if let Some(mut r) = self.db(|s| s.instance(&name))? {
                if r.message.as_deref() != Some(&msg) {
                    r.message = Some(msg.clone());
                    self.db(|s| s.put_instance(&r))?;
                    self.event(&name, "PortError", &msg);
                }
            }
        }
        Ok(())
    }
}

/// Whether instance `r` serves: the loop judged it one of its deployment's serving
/// instances (`serving`), and it is not being stopped. Published ports and the fleet's
/// services send traffic only to these.
pub(crate) fn serves(
    serving: &HashMap<String, Vec<String>>,
    stopping: &HashSet<String>,
    r: &crate::state::InstanceRow,
) -> bool {
    !stopping.contains(&r.container_id) && serving.get(&r.deployment).is_some_and(|n| n.contains(&r.name))
}
