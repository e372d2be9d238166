//! Networks on the node's bridge, as Docker's user-defined networks isolate stacks: an
//! instance reaches another instance only if the two share a network (each deployment
//! joins its stack's own network unless it names others, and a network named by several
//! stacks joins them). Enforced in the bridge itself by one nftables table of ours per
//! bridge (family `bridge`, `skiff_<bridge>_lan`), replaced in one transaction whenever an
//! instance joins or leaves:
//!
//! - *prerouting*: a frame from one of our veths must carry that instance's own IPv4
//!   address (IP and ARP); anything else from it (a forged source, IPv6, VLAN tags) is
//!   dropped. A workload with `CAP_NET_RAW` (Docker's default) can therefore not pose as a
//!   neighbour to slip past the rules below, or as another instance to the host.
//! - *forward*: IPv4 between two instances passes only if both addresses are in one
//!   network's set.
//!
//! Traffic to the host and beyond (the gateway, published ports, the outside) is routed,
//! not bridged, and is left to [`crate::nat`] and [`crate::ports`]. The bridge family needs
//! no `br_netfilter`; it needs `nft` (with `--firewall iptables` too).

use crate::nat::{run, Nat};
use crate::network::NetError;
use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

/// An instance on the bridge: its address and the networks it joined.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub ip: Ipv4Addr,
    pub networks: Vec<String>,
}

/// Who is on the bridge, by the host end of their veth.
#[derive(Debug, Default)]
pub struct Lan {
    members: BTreeMap<String, Member>,
    written: Option<String>,
}

impl Nat {
    /// nftables' bridge-family table of the node's networks.
    pub fn lan_table(&self) -> String {
        format!("{}_lan", self.table())
    }
}

impl Lan {
    pub fn admit(&mut self, veth: &str, member: Member) {
        self.members.insert(veth.to_string(), member);
    }

    pub fn forget(&mut self, veth: &str) {
        self.members.remove(veth);
    }

    /// The table for the members as they are.
    pub fn script(&self, table: &str) -> String {
        let elements = |items: Vec<String>| {
            if items.is_empty() {
                String::new()
            } else {
                format!(" elements = {{ {} }};", items.join(", "))
            }
        };
        let veths = elements(self.members.keys().map(|v| format!("\"{v}\"")).collect());
        let ports = elements(self.members.iter().map(|(v, m)| format!("\"{v}\" . {}", m.ip)).collect());
        let mut networks: BTreeMap<&str, BTreeSet<Ipv4Addr>> = BTreeMap::new();
        for m in self.members.values() {
            for n in &m.networks {
                networks.entry(n).or_default().insert(m.ip);
            }
        }
        let mut sets = String::new();
        let mut rules = String::new();
        // Sets are numbered (network names may hold characters nft's names may not); the
        // comment names each.
        for (i, (name, ips)) in networks.iter().enumerate() {
            let ips = elements(ips.iter().map(Ipv4Addr::to_string).collect());
            sets.push_str(&format!("\tset net{i} {{ type ipv4_addr;{ips} comment \"{}\"; }}\n", quoted(name)));
            rules.push_str(&format!("\t\tip saddr @net{i} ip daddr @net{i} accept\n"));
        }
        format!(
            "table bridge {table}\ndelete table bridge {table}\n\
             table bridge {table} {{\n\
             \tset veths {{ type ifname;{veths} }}\n\
             \tset ports {{ type ifname . ipv4_addr;{ports} }}\n\
             {sets}\
             \tchain prerouting {{\n\t\ttype filter hook prerouting priority -200; policy accept;\n\
             \t\tiifname != @veths accept\n\
             \t\tmeta protocol ip iifname . ip saddr @ports accept\n\
             \t\tmeta protocol arp iifname . arp saddr ip @ports accept\n\
             \t\tdrop\n\t}}\n\
             \tchain forward {{\n\t\ttype filter hook forward priority 0; policy accept;\n\
             \t\tiifname != @veths accept\n\
             \t\toifname != @veths accept\n\
             \t\tmeta protocol != ip accept\n\
             {rules}\
             \t\tdrop\n\t}}\n\
             }}\n"
        )
    }

    /// Writes the table if it changed since the last write.
    pub fn write(&mut self, nat: &Nat) -> Result<(), NetError> {
        let script = self.script(&nat.lan_table());
        if self.written.as_ref() == Some(&script) {
            return Ok(());
        }
        run("nft", &["-f", "-"], Some(&script))?;
        self.written = Some(script);
        Ok(())
    }
}

/// A network's name inside an nft comment: letters, digits and `_.-` only (the model's
/// rule), anything else dropped.
fn quoted(name: &str) -> String {
    name.chars().filter(|c| c.is_ascii_alphanumeric() || "_.-".contains(*c)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instances_pass_only_within_a_shared_network_and_only_with_their_own_address() {
        let mut lan = Lan::default();
        let m = |last: u8, nets: &[&str]| Member {
            ip: Ipv4Addr::new(10, 9, 0, last),
            networks: nets.iter().map(|n| n.to_string()).collect(),
        };
        lan.admit("vska", m(2, &["a_default", "plant"]));
        lan.admit("vskb", m(3, &["b_default"]));
        lan.admit("vskc", m(4, &["plant"]));
        let s = lan.script("skiff_br_lan");
        assert!(s.starts_with("table bridge skiff_br_lan\ndelete table bridge skiff_br_lan\n"), "{s}");
        assert!(s.contains("set veths { type ifname; elements = { \"vska\", \"vskb\", \"vskc\" }; }"), "{s}");
        assert!(s.contains("elements = { \"vska\" . 10.9.0.2, \"vskb\" . 10.9.0.3, \"vskc\" . 10.9.0.4 };"), "{s}");
        assert!(s.contains("set net0 { type ipv4_addr; elements = { 10.9.0.2 }; comment \"a_default\"; }"), "{s}");
        assert!(
            s.contains("set net2 { type ipv4_addr; elements = { 10.9.0.2, 10.9.0.4 }; comment \"plant\"; }"),
            "{s}"
        );
        assert_eq!(s.matches("ip saddr @net").count(), 3, "{s}");
        assert!(s.contains("meta protocol ip iifname . ip saddr @ports accept\n\t\tmeta protocol arp iifname . arp saddr ip @ports accept\n\t\tdrop"), "{s}");
        lan.forget("vska");
        lan.forget("vskb");
        lan.forget("vskc");
        let empty = lan.script("t");
        assert!(empty.contains("set veths { type ifname; }") && !empty.contains("@net0"), "{empty}");
    }
}
