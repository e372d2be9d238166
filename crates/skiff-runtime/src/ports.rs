//! Published ports in the kernel: DNAT rules beside the bridge's NAT ([`crate::nat`]), so
//! a published port keeps answering while the agent is away (restarting, upgrading,
//! killed): workloads outlive the agent, and so does the way in to them. Connections to
//! any of the host's addresses on the port (from outside, from the host itself, from
//! instances) go to the instances that serve, round robin; with none serving, new
//! connections are dropped and the client's retried SYN finds the instance that serves by
//! then.
//!
//! Connections from the host's loopback need `route_localnet` on the bridge (a packet from
//! 127.0.0.1 is routed out of it, then masqueraded). That setting would also let a
//! neighbour on the bridge reach the host's loopback-only services, so packets arriving
//! from the bridge for 127.0.0.0/8 are dropped before connection tracking sees them (as
//! Docker does since CVE-2020-8558 showed the hole), and the drop is written first.
//!
//! nftables: one table of ours per bridge (`skiff_<bridge>_ports`), replaced in one
//! transaction. iptables: a chain `SKIFFP-<bridge>` in the nat table (jumped to from
//! PREROUTING and OUTPUT for local destinations), in the filter table (INPUT: ports with
//! no instance serving) and in the raw table (the loopback drop).

use crate::nat::{ensure_iptables_chain, found, remove_iptables_chain, run, strings, Firewall, Nat};
use crate::network::NetError;
use skiff_model::Protocol;
use std::net::{Ipv4Addr, SocketAddrV4};

/// One published port as the kernel forwards it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct PortRule {
    pub protocol: Protocol,
    /// The host address it answers on; `None`: every address of the host.
    pub bind: Option<Ipv4Addr>,
    pub port: u16,
    /// The serving instances' addresses and ports, chosen round robin per connection.
    pub targets: Vec<SocketAddrV4>,
}

impl PortRule {
    fn proto(&self) -> &'static str {
        match self.protocol {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }

    /// The rule in nftables' syntax, for the table's `ports` chain.
    fn nft(&self) -> String {
        let to = match self.targets.as_slice() {
            [] => "drop".to_string(),
            [one] => format!("dnat to {one}"),
            many => {
                let map: Vec<String> =
                    many.iter().enumerate().map(|(i, t)| format!("{i} : {} . {}", t.ip(), t.port())).collect();
                format!("dnat to numgen inc mod {} map {{ {} }}", many.len(), map.join(", "))
            }
        };
        let daddr = self.bind.map(|a| format!("ip daddr {a} ")).unwrap_or_default();
        format!("{daddr}{} dport {} {to}", self.proto(), self.port)
    }

    /// The rule's match in iptables' syntax.
    fn iptables_match(&self) -> Vec<String> {
        let mut m = vec![];
        if let Some(a) = self.bind {
            m.extend(["-d".to_string(), a.to_string()]);
        }
        m.extend(["-p", self.proto(), "--dport"].map(str::to_string));
        m.push(self.port.to_string());
        m
    }
}

/// iptables' jumps to the nat chain: from PREROUTING and OUTPUT, for packets to one of the
/// host's addresses.
const NAT_JUMPS: &[(&str, &[&str])] = &[
    ("PREROUTING", &["-m", "addrtype", "--dst-type", "LOCAL"]),
    ("OUTPUT", &["-m", "addrtype", "--dst-type", "LOCAL"]),
];

impl Nat {
    /// nftables' table of the published ports.
    pub fn ports_table(&self) -> String {
        format!("{}_ports", self.table())
    }

    /// iptables' chain of the published ports (at most 28 bytes).
    pub fn ports_chain(&self) -> String {
        format!("SKIFFP-{}", self.bridge)
    }

    /// The nftables script that replaces the ports table in one transaction.
    pub fn nft_ports_script(&self, rules: &[PortRule]) -> String {
        let (t, br) = (self.ports_table(), &self.bridge);
        // The services' virtual addresses are the host's own but the agent's: first out.
        let services = self.services.map(|s| format!("\t\tip daddr {s} return\n")).unwrap_or_default();
        let ports: String = rules.iter().map(|r| format!("\t\t{}\n", r.nft())).collect();
        let ports = format!("{services}{ports}");
        format!(
            "table ip {t}\ndelete table ip {t}\n\
             table ip {t} {{\n\
             \tchain raw {{\n\t\ttype filter hook prerouting priority -300; policy accept;\n\
             \t\tiifname \"{br}\" ip daddr 127.0.0.0/8 drop\n\
             \t\tiifname \"{br}\" ip saddr 127.0.0.0/8 drop\n\t}}\n\
             \tchain prerouting {{\n\t\ttype nat hook prerouting priority -100; policy accept;\n\
             \t\tfib daddr type local jump ports\n\t}}\n\
             \tchain output {{\n\t\ttype nat hook output priority -100; policy accept;\n\
             \t\tfib daddr type local jump ports\n\t}}\n\
             \tchain ports {{\n{ports}\t}}\n\
             }}\n"
        )
    }

    /// iptables' rules: (nat chain: the DNATs, filter chain: drops for ports nobody serves).
    fn iptables_ports(&self, rules: &[PortRule]) -> (Vec<Vec<String>>, Vec<Vec<String>>) {
        let (mut dnat, mut drop) = (vec![], vec![]);
        // The services' virtual addresses are the host's own but the agent's: first out.
        if let Some(s) = self.services {
            let back = vec!["-d".to_string(), s.to_string(), "-j".to_string(), "RETURN".to_string()];
            dnat.push(back.clone());
            drop.push(back);
        }
        for r in rules {
            let n = r.targets.len();
            if n == 0 {
                let mut rule = r.iptables_match();
                rule.extend(["-j", "DROP"].map(str::to_string));
                drop.push(rule);
            }
            for (i, t) in r.targets.iter().enumerate() {
                let mut rule = r.iptables_match();
                if i + 1 < n {
                    // As kube-proxy: the i-th of n takes 1/(n-i) of what the ones before left.
                    let p = format!("{:.5}", 1.0 / (n - i) as f64);
                    rule.extend(["-m", "statistic", "--mode", "random", "--probability", &p].map(str::to_string));
                }
                rule.extend(["-j", "DNAT", "--to-destination"].map(str::to_string));
                rule.push(t.to_string());
                dnat.push(rule);
            }
        }
        (dnat, drop)
    }

    /// Makes the kernel forward exactly `rules` (replacing what was there, in one
    /// transaction per table). On failure the earlier rules stay. `first` (the first write
    /// of an agent's run) also removes what the other firewall may hold from an earlier run.
    pub fn publish(&self, rules: &[PortRule], first: bool) -> Result<(), NetError> {
        match self.firewall {
            Firewall::Nft => {
                run("nft", &["-f", "-"], Some(&self.nft_ports_script(rules)))?;
                if first && found("iptables") {
                    self.remove_iptables_ports();
                }
            }
            Firewall::Iptables => {
                if first && found("nft") {
                    let _ = run("nft", &["delete", "table", "ip", &self.ports_table()], None);
                }
                let chain = self.ports_chain();
                let (dnat, drop) = self.iptables_ports(rules);
                let br = self.bridge.as_str();
                let loopback = [
                    &["-i", br, "-d", "127.0.0.0/8", "-j", "DROP"][..],
                    &["-i", br, "-s", "127.0.0.0/8", "-j", "DROP"],
                ];
                ensure_iptables_chain(&chain, "raw", &[("PREROUTING", &[])], &strings(&loopback))?;
                ensure_iptables_chain(&chain, "filter", &[("INPUT", &[])], &drop)?;
                ensure_iptables_chain(&chain, "nat", NAT_JUMPS, &dnat)?;
            }
        }
        // Last: the drop of loopback-addressed packets from the bridge is in place. Only
        // while a port is published: nothing else needs it.
        self.set_route_localnet(!rules.is_empty())
    }

    /// Whether the ports' rules are still in the kernel (a flushed ruleset took them, and
    /// with them the loopback drop that `route_localnet` needs).
    pub fn ports_present(&self) -> bool {
        match self.firewall {
            Firewall::Nft => run("nft", &["list", "table", "ip", &self.ports_table()], None).is_ok(),
            Firewall::Iptables => run("iptables", &["-t", "raw", "-S", &self.ports_chain()], None).is_ok(),
        }
    }

    fn set_route_localnet(&self, on: bool) -> Result<(), NetError> {
        let path = format!("/proc/sys/net/ipv4/conf/{}/route_localnet", self.bridge);
        let want = if on { "1" } else { "0" };
        if std::fs::read_to_string(&path).is_ok_and(|v| v.trim() == want) {
            return Ok(());
        }
        std::fs::write(&path, want)
            .map_err(|e| NetError::Firewall { command: format!("write {path}"), message: e.to_string() })
    }

    /// Removes the published ports' rules (with either firewall).
    pub(crate) fn remove_ports(&self) {
        let _ = self.set_route_localnet(false);
        if found("nft") {
            let _ = run("nft", &["delete", "table", "ip", &self.ports_table()], None);
        }
        if found("iptables") {
            self.remove_iptables_ports();
        }
    }

    fn remove_iptables_ports(&self) {
        let chain = self.ports_chain();
        remove_iptables_chain(&chain, "raw", &[("PREROUTING", &[])]);
        remove_iptables_chain(&chain, "filter", &[("INPUT", &[])]);
        remove_iptables_chain(&chain, "nat", NAT_JUMPS);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::network::Subnet;

    fn nat(firewall: Firewall) -> Nat {
        Nat { bridge: "sk-t1".into(), subnet: Subnet::parse("10.99.0.0/24").unwrap(), firewall, services: None }
    }

    fn rules() -> Vec<PortRule> {
        let t = |last: u8, port| SocketAddrV4::new(Ipv4Addr::new(10, 99, 0, last), port);
        vec![
            PortRule { protocol: Protocol::Tcp, bind: None, port: 8080, targets: vec![t(2, 80), t(3, 80), t(4, 80)] },
            PortRule { protocol: Protocol::Udp, bind: Some(Ipv4Addr::LOCALHOST), port: 53, targets: vec![t(5, 5353)] },
            PortRule { protocol: Protocol::Tcp, bind: None, port: 9000, targets: vec![] },
        ]
    }

    #[test]
    fn nftables_forwards_each_port_round_robin_and_drops_where_nobody_serves() {
        let s = nat(Firewall::Nft).nft_ports_script(&rules());
        assert!(s.starts_with("table ip skiff_sk_t1_ports\ndelete table ip skiff_sk_t1_ports\n"), "{s}");
        assert!(
            s.contains("tcp dport 8080 dnat to numgen inc mod 3 map { 0 : 10.99.0.2 . 80, 1 : 10.99.0.3 . 80, 2 : 10.99.0.4 . 80 }"),
            "{s}"
        );
        assert!(s.contains("\t\tip daddr 127.0.0.1 udp dport 53 dnat to 10.99.0.5:5353\n"), "{s}");
        assert!(s.contains("\t\ttcp dport 9000 drop\n"), "{s}");
        assert!(s.contains("iifname \"sk-t1\" ip daddr 127.0.0.0/8 drop"), "{s}");
        assert!(s.contains("iifname \"sk-t1\" ip saddr 127.0.0.0/8 drop"), "{s}");
        assert_eq!(s.matches("fib daddr type local jump ports").count(), 2, "prerouting and output: {s}");
    }

    #[test]
    fn iptables_splits_connections_as_kube_proxy_does() {
        let (dnat, drop) = nat(Firewall::Iptables).iptables_ports(&rules());
        let dnat: Vec<String> = dnat.iter().map(|r| r.join(" ")).collect();
        assert_eq!(
            dnat,
            [
                "-p tcp --dport 8080 -m statistic --mode random --probability 0.33333 -j DNAT --to-destination 10.99.0.2:80",
                "-p tcp --dport 8080 -m statistic --mode random --probability 0.50000 -j DNAT --to-destination 10.99.0.3:80",
                "-p tcp --dport 8080 -j DNAT --to-destination 10.99.0.4:80",
                "-d 127.0.0.1 -p udp --dport 53 -j DNAT --to-destination 10.99.0.5:5353",
            ]
        );
        assert_eq!(drop, [strings(&[&["-p", "tcp", "--dport", "9000", "-j", "DROP"]]).concat()]);
        assert_eq!(nat(Firewall::Iptables).ports_chain(), "SKIFFP-sk-t1");
    }
}
