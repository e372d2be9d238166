//! Node networking for the `bridge` mode: one Linux bridge per node and, per instance, a
//! network namespace joined to it by a veth pair. Done with iproute2's `ip`, so there is
//! no netlink code to maintain and no iptables dependency (published ports go through the
//! agent's userspace proxy).

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Command;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum NetError {
    #[error("ip {args}: {message}")]
    Ip { args: String, message: String },
    #[error("{0:?} is not an IPv4 subnet like 10.213.0.0/24")]
    BadSubnet(String),
    #[error("subnet {0} has no free address left")]
    Exhausted(String),
    #[error("network interface {0} exists and is not a bridge (choose another with --bridge)")]
    NotABridge(String),
    #[error("{command}: {message}")]
    Firewall { command: String, message: String },
}

fn ip(args: &[&str]) -> Result<(), NetError> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| NetError::Ip { args: args.join(" "), message: e.to_string() })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(NetError::Ip { args: args.join(" "), message: String::from_utf8_lossy(&out.stderr).trim().to_string() })
    }
}

/// Runs `ip [pre...] -batch -` with `script` on stdin; stops at the first failing line.
fn ip_batch(pre: &[&str], script: &str) -> Result<(), NetError> {
    use std::io::Write;
    let args = format!("{} -batch -", pre.join(" "));
    let err = |m: String| NetError::Ip { args: args.clone(), message: m };
    let mut child = Command::new("ip")
        .args(pre)
        .args(["-batch", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| err(e.to_string()))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(script.as_bytes()).map_err(|e| err(e.to_string()))?;
    }
    let out = child.wait_with_output().map_err(|e| err(e.to_string()))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(err(String::from_utf8_lossy(&out.stderr).trim().to_string()))
    }
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
}

impl std::fmt::Display for Subnet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.base, self.prefix)
    }
}

#[derive(Debug, Clone)]
pub struct Bridge {
    pub name: String,
    pub subnet: Subnet,
}

fn exists(path: &str) -> bool {
    std::path::Path::new(path).exists()
}

impl Bridge {
    /// Creates the bridge (idempotent) and gives it the gateway address.
    ///
    /// Its MAC address is set, derived from the gateway's address as an instance's is: a
    /// bridge left to itself takes the lowest MAC of its ports and changes it as veths
    /// come and go, and an instance that cached the old one sends its answers (and its
    /// resets) to an address nobody holds until it asks again.
    pub fn ensure(&self) -> Result<(), NetError> {
        let mac = mac_of(self.subnet.gateway());
        if !exists(&format!("/sys/class/net/{}", self.name)) {
            ip(&["link", "add", &self.name, "address", &mac, "type", "bridge"])?;
        } else if !exists(&format!("/sys/class/net/{}/bridge", self.name)) {
            return Err(NetError::NotABridge(self.name.clone()));
        } else if std::fs::read_to_string(format!("/sys/class/net/{}/address", self.name))
            .is_ok_and(|a| a.trim() != mac)
        {
            ip(&["link", "set", &self.name, "address", &mac])?;
        }
        let cidr = format!("{}/{}", self.subnet.gateway(), self.subnet.prefix);
        let _ = ip(&["addr", "add", &cidr, "dev", &self.name]); // EEXIST is fine
        ip(&["link", "set", &self.name, "up"])
    }

    pub fn remove(&self) {
        let _ = ip(&["link", "del", &self.name]);
    }

    /// Creates `netns` with `eth0` at `addr`, joined to the bridge through a veth pair.
    /// Two `ip -batch` runs (host side, then inside the namespace) instead of seven.
    pub fn attach(&self, netns: &str, addr: Ipv4Addr) -> Result<PathBuf, NetError> {
        let host_if = veth_name(netns);
        self.detach(netns);
        let host = format!(
            "netns add {netns}\nlink add {host_if} type veth peer name eth0 netns {netns}\nlink set {host_if} master {}\nlink set {host_if} up\n",
            self.name
        );
        let inside = format!(
            "link set eth0 address {}\naddr add {addr}/{} dev eth0\nlink set eth0 up\nlink set lo up\nroute add default via {}\n",
            mac_of(addr),
            self.subnet.prefix,
            self.subnet.gateway()
        );
        let r = ip_batch(&[], &host).and_then(|_| ip_batch(&["-n", netns], &inside));
        if let Err(e) = r {
            self.detach(netns);
            return Err(e);
        }
        Ok(netns_path(netns))
    }

    /// Removes the namespace and its veth (idempotent).
    pub fn detach(&self, netns: &str) {
        let host_if = veth_name(netns);
        if exists(&format!("/sys/class/net/{host_if}")) {
            let _ = ip(&["link", "del", &host_if]);
        }
        if exists(&netns_path(netns).display().to_string()) {
            let _ = ip(&["netns", "del", netns]);
        }
    }
}

/// The MAC address of the instance at `addr`, derived from it as Docker does: when an
/// address passes to a new instance (a replacement during an update), neighbours' ARP
/// caches still hold the right address, so the new instance is reachable at once.
pub fn mac_of(addr: Ipv4Addr) -> String {
    let [a, b, c, d] = addr.octets();
    format!("02:42:{a:02x}:{b:02x}:{c:02x}:{d:02x}")
}

pub fn netns_path(netns: &str) -> PathBuf {
    PathBuf::from("/var/run/netns").join(netns)
}

/// Interface names are limited to 15 bytes: `vsk` + 10 hex digits of a hash.
pub fn veth_name(netns: &str) -> String {
    use sha2::{Digest, Sha256};
    let h = hex::encode(Sha256::digest(netns.as_bytes()));
    format!("vsk{}", &h[..10])
}

/// Namespaces left behind with the given prefix (for cleanup at startup).
pub fn list_netns(prefix: &str) -> Vec<String> {
    std::fs::read_dir("/var/run/netns")
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
        assert_eq!(mac_of(Ipv4Addr::new(10, 213, 0, 12)), "02:42:0a:d5:00:0c");
    }
}
