//! Networks on the node's bridge, as Docker's user-defined networks isolate stacks: an
//! instance reaches another instance only if the two share a network (each deployment
//! joins its stack's own network unless it names others, and a network named by several
//! stacks joins them). Enforced in the bridge itself by one nftables table of ours per
//! bridge (family `bridge`, `skiff_<bridge>_lan`), replaced in one transaction whenever an
//! instance joins or leaves:
//!
//! - *prerouting*: a frame from one of our veths must carry that instance's own MAC and
//!   IPv4 address (IP, and ARP's sender fields too); anything else from it (a forged
//!   address, IPv6, VLAN tags) is dropped before the bridge learns its source MAC. A
//!   workload with `CAP_NET_RAW` (Docker's default) can therefore neither pose as a
//!   neighbour to slip past the rule below, nor steal a neighbour's frames by claiming its
//!   MAC.
//! - *forward*: a frame passes from one port to another only if both ports are in one
//!   network's set (unicast, and each copy of a broadcast or multicast, which the bridge
//!   checks per output port).
//!
//! Each network has its own subnet on the node (Docker's address per network): an
//! instance holds an address on each of its networks, all on its one veth, and reaches a
//! peer at the peer's address on a network they share (on-link, so bridged). Traffic to
//! the host and beyond (the gateways, published ports, the outside) is routed, not
//! bridged, and is left to [`crate::nat`] and [`crate::ports`] — except the routed way
//! round these rules, which prerouting drops too: a frame from an instance to the
//! gateway's MAC for an instance's address (the host would route it from the bridge back
//! onto the bridge, from one network's subnet to another's; a published port's hairpin is
//! addressed to the host, not to an instance). It is dropped here rather than in the IP family because where
//! `br_netfilter` is loaded (Docker loads it) bridged frames also cross the IP forward
//! hook from the bridge to the bridge, indistinguishable from routed ones. The bridge
//! family needs no `br_netfilter`; it needs `nft` (with `--firewall iptables` too).

use crate::nat::{run, Nat};
use crate::network::{mac_of, NetError};
use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

/// An instance on the bridge: its addresses (one per network; its MAC is derived from
/// the first) and the networks it joined.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub addresses: Vec<Ipv4Addr>,
    pub networks: Vec<String>,
}

impl Member {
    /// Its veth's elements of the `ports` set: the veth, its MAC, each address.
    fn ports(&self, veth: &str) -> Vec<String> {
        let mac = self.addresses.first().map(|a| mac_of(*a)).unwrap_or_default();
        self.addresses.iter().map(|a| format!("\"{veth}\" . {mac} . {a}")).collect()
    }
}

/// Who is on the bridge, by the host end of their veth. The table is written whole at
/// the agent's start and when a network appears; an instance joining or leaving only adds
/// or deletes its set elements (a whole table costs the kernel ~15 ms to replace, an
/// element ~1 ms beside nft's own start).
#[derive(Debug, Default)]
pub struct Lan {
    members: BTreeMap<String, Member>,
    /// Each network's set number in the table as last written whole (`None`: not written,
    /// or found missing).
    sets: Option<BTreeMap<String, usize>>,
}

impl Nat {
    /// nftables' bridge-family table of the node's networks.
    pub fn lan_table(&self) -> String {
        format!("{}_lan", self.table())
    }
}

impl Lan {
    /// Adds a member without writing (the table is written whole next).
    pub fn insert(&mut self, veth: &str, member: Member) {
        self.members.insert(veth.to_string(), member);
    }

    /// Joins `veth` to its networks: its elements added to the table, or the table
    /// written whole if it was not yet, or names a network the table has no set for.
    pub fn admit(&mut self, nat: &Nat, veth: &str, member: Member) -> Result<(), NetError> {
        let same = self.members.get(veth) == Some(&member);
        let changed = self.members.insert(veth.to_string(), member.clone()).is_some() && !same;
        let script = match &self.sets {
            Some(sets) if !changed => elements("add", &nat.lan_table(), veth, &member, sets, &BTreeMap::new()),
            _ => None,
        };
        match script {
            Some(s) => run("nft", &["-f", "-"], Some(&s)).map(|_| ()).or_else(|_| self.write(nat)),
            None => self.write(nat),
        }
    }

    /// Takes `veth` off its networks (its elements deleted, or the table written whole).
    pub fn forget(&mut self, nat: &Nat, veth: &str) -> Result<(), NetError> {
        let Some(member) = self.members.remove(veth) else { return Ok(()) };
        let script = self
            .sets
            .as_ref()
            .and_then(|sets| elements("delete", &nat.lan_table(), veth, &member, sets, &self.members));
        match script {
            Some(s) => run("nft", &["-f", "-"], Some(&s)).map(|_| ()).or_else(|_| self.write(nat)),
            None => self.write(nat),
        }
    }

    /// Each network's set number, as [`Lan::script`] numbers them.
    fn numbering(&self) -> BTreeMap<String, usize> {
        let names: BTreeSet<&String> = self.members.values().flat_map(|m| &m.networks).collect();
        names.into_iter().enumerate().map(|(i, n)| (n.clone(), i)).collect()
    }

    /// The table for the members as they are, on the bridge of `nat`.
    pub fn script(&self, nat: &Nat) -> String {
        let table = nat.lan_table();
        let gateway_mac = mac_of(nat.subnet.gateway());
        let elements = |items: Vec<String>| {
            if items.is_empty() {
                String::new()
            } else {
                format!(" elements = {{ {} }};", items.join(", "))
            }
        };
        let veths = elements(self.members.keys().map(|v| format!("\"{v}\"")).collect());
        let ports = elements(self.members.iter().flat_map(|(v, m)| m.ports(v)).collect());
        let held: BTreeSet<&Ipv4Addr> = self.members.values().flat_map(|m| &m.addresses).collect();
        let addrs = elements(held.iter().map(|a| a.to_string()).collect());
        let mut networks: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
        for (veth, m) in &self.members {
            for n in &m.networks {
                networks.entry(n).or_default().insert(veth);
            }
        }
        // Numbered in name order, as [`Lan::numbering`] numbers them.
        let mut sets = String::new();
        let mut rules = String::new();
        // Sets are numbered (network names may hold characters nft's names may not); a
        // comment line names each.
        for (i, (name, veths)) in networks.iter().enumerate() {
            let members = elements(veths.iter().map(|v| format!("\"{v}\"")).collect());
            sets.push_str(&format!("\t# net{i}: {}\n\tset net{i} {{ type ifname;{members} }}\n", quoted(name)));
            rules.push_str(&format!("\t\tiifname @net{i} oifname @net{i} accept\n"));
        }
        format!(
            "table bridge {table}\ndelete table bridge {table}\n\
             table bridge {table} {{\n\
             \tset veths {{ type ifname;{veths} }}\n\
             \tset ports {{ type ifname . ether_addr . ipv4_addr;{ports} }}\n\
             \tset addrs {{ type ipv4_addr;{addrs} }}\n\
             {sets}\
             \tchain prerouting {{\n\t\ttype filter hook prerouting priority -200; policy accept;\n\
             \t\tiifname != @veths accept\n\
             \t\tether daddr {gateway_mac} ip daddr @addrs drop\n\
             \t\tmeta protocol ip iifname . ether saddr . ip saddr @ports accept\n\
             \t\tmeta protocol arp iifname . ether saddr . arp saddr ip @ports \
             iifname . arp saddr ether . arp saddr ip @ports accept\n\
             \t\tdrop\n\t}}\n\
             \tchain forward {{\n\t\ttype filter hook forward priority 0; policy accept;\n\
             \t\tiifname != @veths accept\n\
             \t\toifname != @veths accept\n\
             {rules}\
             \t\tdrop\n\t}}\n\
             }}\n"
        )
    }

    /// Forgets what was written, so the next change writes the table whole (it was found
    /// missing: someone flushed the ruleset).
    pub fn rewrite(&mut self) {
        self.sets = None;
    }

    /// Writes the table whole.
    pub fn write(&mut self, nat: &Nat) -> Result<(), NetError> {
        self.sets = None;
        run("nft", &["-f", "-"], Some(&self.script(nat)))?;
        self.sets = Some(self.numbering());
        Ok(())
    }
}

/// The nft commands that `op` (`add` or `delete`) one member's elements; `None` if a
/// network of its has no set in the table.
/// `others`: the members besides it (an address one of them holds too, for a moment
/// while an address passes on, stays in `addrs`).
fn elements(
    op: &str,
    table: &str,
    veth: &str,
    m: &Member,
    sets: &BTreeMap<String, usize>,
    others: &BTreeMap<String, Member>,
) -> Option<String> {
    let mut s = format!(
        "{op} element bridge {table} veths {{ \"{veth}\" }}\n{op} element bridge {table} ports {{ {} }}\n",
        m.ports(veth).join(", "),
    );
    let held = |a: &Ipv4Addr| others.iter().any(|(v, o)| v != veth && o.addresses.contains(a));
    let addrs: Vec<String> = m.addresses.iter().filter(|a| !held(a)).map(|a| a.to_string()).collect();
    if !addrs.is_empty() {
        s.push_str(&format!("{op} element bridge {table} addrs {{ {} }}\n", addrs.join(", ")));
    }
    for n in &m.networks {
        s.push_str(&format!("{op} element bridge {table} net{} {{ \"{veth}\" }}\n", sets.get(n)?));
    }
    Some(s)
}

/// A network's name inside an nft comment: letters, digits and `_.-` only (the model's
/// rule), anything else dropped.
fn quoted(name: &str) -> String {
    name.chars().filter(|c| c.is_ascii_alphanumeric() || "_.-".contains(*c)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nat::Firewall;
    use crate::network::Subnet;

    #[test]
    fn ports_pass_only_within_a_shared_network_and_only_with_their_own_addresses() {
        let mut lan = Lan::default();
        let m = |last: u8, nets: &[&str]| Member {
            addresses: vec![Ipv4Addr::new(10, 9, 0, last)],
            networks: nets.iter().map(|n| n.to_string()).collect(),
        };
        let mut two = m(2, &["a_default", "plant"]);
        two.addresses.push(Ipv4Addr::new(10, 9, 0, 66));
        lan.insert("vska", two);
        lan.insert("vskb", m(3, &["b_default"]));
        lan.insert("vskc", m(4, &["plant"]));
        let nat = Nat {
            bridge: "br".into(),
            subnet: Subnet::parse("10.9.0.0/24").unwrap(),
            firewall: Firewall::Nft,
            services: None,
        };
        let s = lan.script(&nat);
        assert!(s.starts_with("table bridge skiff_br_lan\ndelete table bridge skiff_br_lan\n"), "{s}");
        assert!(s.contains("ether daddr 02:42:0a:09:00:01 ip daddr @addrs drop"), "routed: {s}");
        assert!(
            s.contains("set addrs { type ipv4_addr; elements = { 10.9.0.2, 10.9.0.3, 10.9.0.4, 10.9.0.66 }; }"),
            "{s}"
        );
        assert!(s.contains("set veths { type ifname; elements = { \"vska\", \"vskb\", \"vskc\" }; }"), "{s}");
        assert!(
            s.contains(
                "\"vska\" . 02:42:0a:09:00:02 . 10.9.0.2, \"vska\" . 02:42:0a:09:00:02 . 10.9.0.66, \
                 \"vskb\" . 02:42:0a:09:00:03 . 10.9.0.3"
            ),
            "a second network's address, with the first one's MAC: {s}"
        );
        assert!(s.contains("\t# net0: a_default\n\tset net0 { type ifname; elements = { \"vska\" }; }"), "{s}");
        assert!(s.contains("set net2 { type ifname; elements = { \"vska\", \"vskc\" }; }"), "{s}");
        assert_eq!(s.matches("oifname @net").count(), 3, "{s}");
        assert!(s.contains("iifname . arp saddr ether . arp saddr ip @ports accept\n\t\tdrop"), "{s}");
        let sets = lan.numbering();
        assert_eq!(sets.get("plant"), Some(&2));
        let add = elements("add", "t", "vskd", &m(5, &["plant"]), &sets, &BTreeMap::new()).unwrap();
        assert_eq!(
            add,
            "add element bridge t veths { \"vskd\" }\nadd element bridge t ports { \"vskd\" . 02:42:0a:09:00:05 . 10.9.0.5 }\n\
             add element bridge t addrs { 10.9.0.5 }\nadd element bridge t net2 { \"vskd\" }\n"
        );
        assert!(
            elements("add", "t", "vske", &m(6, &["new"]), &sets, &BTreeMap::new()).is_none(),
            "a new network needs the whole table"
        );
        // An address another member holds too stays in `addrs` when this one leaves.
        let others = BTreeMap::from([("vskc".to_string(), m(4, &["plant"]))]);
        let del = elements("delete", "t", "vskd", &m(4, &["plant"]), &sets, &others).unwrap();
        assert!(del.contains("delete element bridge t ports") && !del.contains(" addrs "), "{del}");
        let empty = Lan::default().script(&nat);
        assert!(empty.contains("set veths { type ifname; }") && !empty.contains("@net0"), "{empty}");
        assert!(empty.contains("set addrs { type ipv4_addr; }"), "{empty}");
    }
}
