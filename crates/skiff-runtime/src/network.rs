//! Node networking for the `bridge` mode: one Linux bridge per node and, per instance, a
//! network namespace joined to it by a veth pair. Done through netlink
//! ([`crate::netlink`]): no iproute2 needed on the node. Outbound NAT is [`crate::nat`];
//! published ports are the kernel's DNAT ([`crate::ports`]) or the agent's proxy.

use crate::netlink::{netns_add, netns_del, NlError, Rtnl, NETNS_DIR};
use std::fs::File;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum NetError {
    #[error(transparent)]
    Netlink(#[from] NlError),
    #[error("{0:?} is not an IPv4 subnet like 10.213.0.0/24")]
    BadSubnet(String),
    #[error("subnet {0} has no free address left")]
    Exhausted(String),
    #[error("network interface {0} exists and is not a bridge (choose another with --bridge)")]
    NotABridge(String),
    #[error("bridge {0} is missing (removed while the agent ran?): restart the agent to make it again")]
    NoBridge(String),
    #[error("macvlan parent interface {0:?} does not exist on this node")]
    NoParent(String),
    #[error("macvlan parent interface {0:?} has no IPv4 address to take the subnet from: set macvlan.subnet")]
    ParentWithoutSubnet(String),
    #[error("{command}: {message}")]
    Firewall { command: String, message: String },
}

/// A subnet such as `10.213.0.0/24`: `.1` is the bridge, instances get the rest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subnet {
    pub base: Ipv4Addr,
    pub prefix: u8,
}

impl Subnet {
    pub fn parse(s: &str) -> Result<Self, NetError> {
        let bad = || NetError::BadSubnet(s.to_string());
        let (a, p) = s.split_once('/').ok_or_else(bad)?;
        let base: Ipv4Addr = a.parse().map_err(|_| bad())?;
        let prefix: u8 = p.parse().map_err(|_| bad())?;
        if !(8..=30).contains(&prefix) {
            return Err(bad());
        }
        let mask = u32::MAX << (32 - prefix);
        Ok(Subnet { base: Ipv4Addr::from(u32::from(base) & mask), prefix })
    }

    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.base) + 1)
    }

    /// Host addresses usable by instances (excluding network, gateway and broadcast).
    pub fn hosts(&self) -> impl Iterator<Item = Ipv4Addr> {
        let base = u32::from(self.base);
        let size = 1u32 << (32 - self.prefix);
        (2..size - 1).map(move |i| Ipv4Addr::from(base + i))
    }

    pub fn contains(&self, a: Ipv4Addr) -> bool {
        let mask = u32::MAX << (32 - self.prefix);
        u32::from(a) & mask == u32::from(self.base)
    }

    /// The subnet of prefix `prefix` within this one that holds `a`.
    pub fn block_of(&self, a: Ipv4Addr, prefix: u8) -> Option<Subnet> {
        let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
        (self.contains(a) && prefix >= self.prefix && prefix <= 30)
            .then(|| Subnet { base: Ipv4Addr::from(u32::from(a) & mask), prefix })
    }

    /// This subnet cut into subnets of prefix `prefix`, lowest first (none if it is
    /// larger than this one or holds no instance).
    pub fn blocks(&self, prefix: u8) -> impl Iterator<Item = Subnet> {
        let (base, me) = (u32::from(self.base), self.prefix);
        let count = if (me..=30).contains(&prefix) { 1u32 << (prefix - me) } else { 0 };
        (0..count).map(move |i| Subnet { base: Ipv4Addr::from(base + (i << (32 - prefix))), prefix })
    }

    /// The prefix of each network's subnet in this pool when none is given: the pool cut
    /// in 16, a /24 at most (so `10.213.0.0/20` gives 16 networks of 253 instances, a /24
    /// 16 of 13), a /30 at least.
    pub fn default_network_prefix(&self) -> u8 {
        (self.prefix + 4).clamp(24, 30)
    }
}

/// An instance's address on one network: the address, and its network's subnet on this
/// node (`.1` of it is the bridge).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Address {
    pub ip: Ipv4Addr,
    pub subnet: Subnet,
}

impl std::fmt::Display for Subnet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.base, self.prefix)
    }
}

/// The node's bridge. `subnet` is the pool its networks' subnets are cut from, each of
/// prefix `network_prefix`: the bridge holds `.1` of the pool (its own address, where the
/// node's DNS answers) and `.1` of each network's subnet (the instances' gateway there).
#[derive(Debug, Clone)]
pub struct Bridge {
    pub name: String,
    pub subnet: Subnet,
    pub network_prefix: u8,
}

impl Bridge {
    /// Creates the bridge (idempotent) and gives it the gateway address.
    ///
    /// Its MAC address is set, derived from the gateway's address as an instance's is: a
    /// bridge left to itself takes the lowest MAC of its ports and changes it as veths
    /// come and go, and an instance that cached the old one sends its answers (and its
    /// resets) to an address nobody holds until it asks again.
    pub fn ensure(&self) -> Result<(), NetError> {
        let mac = mac_bytes(self.subnet.gateway());
        let mut nl = Rtnl::open()?;
        let sys = format!("/sys/class/net/{}", self.name);
        if nl.index(&self.name)?.is_none() {
            nl.add_bridge(&self.name, mac)?;
        } else if !std::path::Path::new(&sys).exists() {
            // /sys shows another network namespace's links (an agent started with
            // `nsenter --net`): what it says of this one cannot be read there.
        } else if !std::path::Path::new(&sys).join("bridge").exists() {
            return Err(NetError::NotABridge(self.name.clone()));
        } else if std::fs::read_to_string(format!("{sys}/address")).unwrap_or_default().trim()
            != mac_of(self.subnet.gateway())
        {
            nl.set_link(&self.name, Some(mac), None, false)?;
        }
        nl.add_address(&self.name, self.subnet.gateway(), self.subnet.prefix)?;
        nl.set_link(&self.name, None, None, true)?;
        Ok(())
    }

    pub fn remove(&self) {
        if let Ok(mut nl) = Rtnl::open() {
            let _ = nl.del_link(&self.name);
        }
    }

    /// Creates `netns` with `eth0` joined to the bridge through a veth pair, holding one
    /// address per network (the first one's MAC, and its gateway the default route). The
    /// bridge takes each network's gateway address first.
    pub fn attach(&self, netns: &str, addrs: &[Address]) -> Result<PathBuf, NetError> {
        self.detach(netns);
        let r = self.attach_inner(netns, addrs);
        if r.is_err() {
            self.detach(netns);
        }
        r
    }

    fn attach_inner(&self, netns: &str, addrs: &[Address]) -> Result<PathBuf, NetError> {
        let first = addrs.first().ok_or_else(|| NetError::BadSubnet("(no address)".into()))?;
        let host_if = veth_name(netns);
        let mut host = Rtnl::open()?;
        let bridge = host.index(&self.name)?.ok_or_else(|| NetError::NoBridge(self.name.clone()))?;
        for a in addrs {
            // The pool's own gateway is the bridge's address already (over the whole pool).
            if a.subnet.gateway() != self.subnet.gateway() {
                host.add_address(&self.name, a.subnet.gateway(), a.subnet.prefix)?;
            }
        }
        let path = netns_add(netns)?;
        let ns = File::open(&path).map_err(|e| NlError { op: format!("open network namespace {netns}"), source: e })?;
        host.add_veth(&host_if, "eth0", &ns)?;
        host.set_link(&host_if, None, Some(bridge), true)?;
        let mut inside = Rtnl::open_in(&ns, netns)?;
        inside.set_link("eth0", Some(mac_bytes(first.ip)), None, false)?;
        for a in addrs {
            inside.add_address("eth0", a.ip, a.subnet.prefix)?;
        }
        inside.set_link("eth0", None, None, true)?;
        inside.set_link("lo", None, None, true)?;
        inside.add_default_route(first.subnet.gateway())?;
        Ok(path)
    }

    /// Removes the namespace and its veth (idempotent).
    pub fn detach(&self, netns: &str) {
        // Asked of the kernel, not of /sys (which may show another namespace's links).
        if let Ok(mut nl) = Rtnl::open() {
            let _ = nl.del_link(&veth_name(netns));
        }
        netns_del(netns);
    }
}

/// An instance's own interface on a host interface's segment (Docker's macvlan driver,
/// bridge mode): `eth0` in the instance's namespace, with its own MAC (derived from its
/// address, as on the bridge) and address; a default route only through a gateway named.
/// The host itself cannot reach it through the parent (macvlan's rule); the segment can.
#[derive(Debug, Clone)]
pub struct MacvlanLink {
    pub parent: String,
    pub prefix: u8,
    pub gateway: Option<Ipv4Addr>,
}

impl MacvlanLink {
    /// The subnet of `parent`'s first IPv4 address on this host.
    pub fn parent_subnet(parent: &str) -> Result<(Ipv4Addr, u8), NetError> {
        let addrs =
            nix::ifaddrs::getifaddrs().map_err(|e| NlError { op: "list addresses".into(), source: e.into() })?;
        for a in addrs.filter(|a| a.interface_name == parent) {
            let (Some(ip), Some(mask)) = (a.address, a.netmask) else { continue };
            if let (Some(ip), Some(mask)) = (ip.as_sockaddr_in(), mask.as_sockaddr_in()) {
                let prefix = u32::from(mask.ip()).count_ones() as u8;
                return Ok((ip.ip(), prefix));
            }
        }
        Err(NetError::ParentWithoutSubnet(parent.to_string()))
    }

    /// Creates `netns` with its macvlan `eth0` at `addr` (replacing what a crash left).
    pub fn attach(&self, netns: &str, addr: Ipv4Addr) -> Result<PathBuf, NetError> {
        netns_del(netns);
        let r = self.attach_inner(netns, addr);
        if r.is_err() {
            netns_del(netns);
        }
        r
    }

    fn attach_inner(&self, netns: &str, addr: Ipv4Addr) -> Result<PathBuf, NetError> {
        let mut host = Rtnl::open()?;
        let parent = host.index(&self.parent)?.ok_or_else(|| NetError::NoParent(self.parent.clone()))?;
        let path = netns_add(netns)?;
        let ns = File::open(&path).map_err(|e| NlError { op: format!("open network namespace {netns}"), source: e })?;
        host.add_macvlan("eth0", parent, &ns)?;
        let mut inside = Rtnl::open_in(&ns, netns)?;
        inside.set_link("eth0", Some(mac_bytes(addr)), None, false)?;
        inside.add_address("eth0", addr, self.prefix)?;
        inside.set_link("eth0", None, None, true)?;
        inside.set_link("lo", None, None, true)?;
        if let Some(gw) = self.gateway {
            inside.add_default_route(gw)?;
        }
        Ok(path)
    }
}

fn mac_bytes(addr: Ipv4Addr) -> [u8; 6] {
    let [a, b, c, d] = addr.octets();
    [0x02, 0x42, a, b, c, d]
}

/// The MAC address of the instance at `addr`, derived from it as Docker does: when an
/// address passes to a new instance (a replacement during an update), neighbours' ARP
/// caches still hold the right address, so the new instance is reachable at once.
pub fn mac_of(addr: Ipv4Addr) -> String {
    mac_bytes(addr).map(|b| format!("{b:02x}")).join(":")
}

/// Whether the host has an interface `name` (as its /sys shows the agent's namespace).
pub fn has_link(name: &str) -> bool {
    std::path::Path::new("/sys/class/net").join(name).exists()
}

pub fn netns_path(netns: &str) -> PathBuf {
    PathBuf::from(NETNS_DIR).join(netns)
}

/// Interface names are limited to 15 bytes: `vsk` + 10 hex digits of a hash.
pub fn veth_name(netns: &str) -> String {
    use sha2::{Digest, Sha256};
    let h = hex::encode(Sha256::digest(netns.as_bytes()));
    format!("vsk{}", &h[..10])
}

/// Namespaces left behind with the given prefix (for cleanup at startup).
pub fn list_netns(prefix: &str) -> Vec<String> {
    std::fs::read_dir(NETNS_DIR)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(prefix))
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnets() {
        let s = Subnet::parse("10.213.0.7/24").unwrap();
        assert_eq!(s.to_string(), "10.213.0.0/24");
        assert_eq!(s.gateway(), Ipv4Addr::new(10, 213, 0, 1));
        assert_eq!(s.hosts().next(), Some(Ipv4Addr::new(10, 213, 0, 2)));
        assert_eq!(s.hosts().count(), 253);
        assert!(s.contains(Ipv4Addr::new(10, 213, 0, 200)));
        assert!(!s.contains(Ipv4Addr::new(10, 213, 1, 2)));
        for bad in ["10.0.0.0", "10.0.0.0/33", "x/24", "10.0.0.0/31"] {
            assert!(Subnet::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(veth_name("skiff-abc").len(), 13);
        let pool = Subnet::parse("10.213.0.0/20").unwrap();
        assert_eq!(pool.default_network_prefix(), 24);
        assert_eq!(Subnet::parse("10.9.0.0/24").unwrap().default_network_prefix(), 28);
        assert_eq!(Subnet::parse("10.0.0.0/8").unwrap().default_network_prefix(), 24);
        let blocks: Vec<String> = pool.blocks(24).map(|b| b.to_string()).collect();
        assert_eq!((blocks.len(), blocks[0].as_str(), blocks[15].as_str()), (16, "10.213.0.0/24", "10.213.15.0/24"));
        assert_eq!(pool.blocks(19).count(), 0, "larger than the pool");
        assert_eq!(pool.blocks(20).count(), 1);
        let b = pool.block_of(Ipv4Addr::new(10, 213, 3, 77), 24).unwrap();
        assert_eq!((b.to_string(), b.gateway()), ("10.213.3.0/24".into(), Ipv4Addr::new(10, 213, 3, 1)));
        assert_eq!(pool.block_of(Ipv4Addr::new(10, 214, 3, 77), 24), None, "outside the pool");
        assert_eq!(
            Subnet::parse("10.9.0.0/24").unwrap().block_of(Ipv4Addr::new(10, 9, 0, 37), 28).map(|b| b.to_string()),
            Some("10.9.0.32/28".into())
        );
        assert_eq!(mac_of(Ipv4Addr::new(10, 213, 0, 12)), "02:42:0a:d5:00:0c");
    }
}
