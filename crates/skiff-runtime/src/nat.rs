//! Outbound NAT for the node's bridge, as Docker's bridge driver does it: forwarding on,
//! the bridge's subnet masqueraded on its way out of any other interface, traffic
//! forwarded from the bridge (and answers back to it) accepted even where the host's
//! FORWARD policy is DROP (installing docker.io sets it so), and new connections forwarded
//! into the bridge from elsewhere dropped: with forwarding on, a LAN host routing the
//! bridge's subnet through the node must not reach unpublished ports (published ports go
//! through the agent's proxy, host-local traffic, never forwarded).
//!
//! Two firewalls are supported, chosen at start: nftables (`nft`) with one table of our own
//! per bridge, replaced atomically; and iptables (legacy or its nft back end) with a chain
//! of our own per bridge in the filter and nat tables. Where `iptables` is present and its
//! FORWARD chain drops by default, the accept rules also go there: a packet must pass
//! every base chain on the hook, so an accept in our table does not undo a drop in another.
//! Other nftables rulesets that drop forwarded traffic (OpenWrt's fw4, firewalld) are not
//! changed: they need a zone or rule of their own for the bridge.

use crate::network::{NetError, Subnet};
use std::process::{Command, Stdio};

/// The firewall tool the rules are written with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Firewall {
    Nft,
    Iptables,
}

impl Firewall {
    /// `nft` when installed, else `iptables`, else none (the bridge then reaches only
    /// its host, as before).
    pub fn detect() -> Option<Firewall> {
        if found("nft") {
            Some(Firewall::Nft)
        } else if found("iptables") {
            Some(Firewall::Iptables)
        } else {
            None
        }
    }

    pub fn parse(s: &str) -> Result<FirewallSetting, String> {
        let explicit = |f| Ok(FirewallSetting { firewall: Some(f), explicit: true });
        match s {
            "auto" => Ok(FirewallSetting::auto()),
            "nft" | "nftables" => explicit(Firewall::Nft),
            "iptables" => explicit(Firewall::Iptables),
            "none" => Ok(FirewallSetting { firewall: None, explicit: true }),
            other => Err(format!("{other:?} is not a firewall: use auto, nft, iptables or none")),
        }
    }
}

/// `--firewall`: which firewall writes the rules, and whether it was asked for by name
/// (then a failure to write them stops the agent; found by `auto`, it is a warning).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FirewallSetting {
    pub firewall: Option<Firewall>,
    pub explicit: bool,
}

impl FirewallSetting {
    pub fn auto() -> Self {
        FirewallSetting { firewall: Firewall::detect(), explicit: false }
    }

    pub fn none() -> Self {
        FirewallSetting { firewall: None, explicit: true }
    }
}

/// Where `tool` is: on `PATH`, or in the sbin directories a service's `PATH` may lack.
pub(crate) fn locate(tool: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin", "/usr/local/sbin"].map(std::path::PathBuf::from))
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

pub fn found(tool: &str) -> bool {
    locate(tool).is_some()
}

/// Whether `tool args` succeeds.
pub fn run_ok(tool: &str, args: &[&str]) -> bool {
    run(tool, args, None).is_ok()
}

/// Runs `tool args` with `stdin`; the error names the command and carries its stderr.
pub(crate) fn run(tool: &str, args: &[&str], stdin: Option<&str>) -> Result<String, NetError> {
    use std::io::Write;
    let err = |m: String| NetError::Firewall { command: format!("{tool} {}", args.join(" ")), message: m };
    // iptables waits for the xtables lock another writer (Docker, firewalld) holds, instead
    // of failing at once and being read as "no such rule".
    let wait: &[&str] = if tool.starts_with("iptables") { &["-w", "5"] } else { &[] };
    let mut child = Command::new(locate(tool).unwrap_or_else(|| tool.into()))
        .args(wait)
        .args(args)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| err(e.to_string()))?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes()).map_err(|e| err(e.to_string()))?;
    }
    let out = child.wait_with_output().map_err(|e| err(e.to_string()))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(err(String::from_utf8_lossy(&out.stderr).trim().to_string()))
    }
}

/// The NAT and forwarding rules of one bridge.
#[derive(Debug, Clone)]
pub struct Nat {
    pub bridge: String,
    pub subnet: Subnet,
    pub firewall: Firewall,
    /// The fleet services' virtual addresses (local to the host, the agent's own): never
    /// taken by a published port's rules.
    pub services: Option<Subnet>,
}

impl Nat {
    /// nftables' table: the bridge's name with anything but letters, digits and `_` as `_`.
    pub fn table(&self) -> String {
        let name: String =
            self.bridge.chars().map(|c| if c.is_ascii_alphanumeric() || c == '_' { c } else { '_' }).collect();
        format!("skiff_{name}")
    }

    /// iptables' chain for this bridge (at most 28 bytes: `SKIFF-` and a 15-byte name).
    pub fn chain(&self) -> String {
        format!("SKIFF-{}", self.bridge)
    }

    /// The nftables script that replaces our table in one transaction (numeric priorities:
    /// srcnat is 100 and filter 0, names older nft does not know).
    pub fn nft_script(&self) -> String {
        let (t, br, net) = (self.table(), &self.bridge, self.subnet);
        format!(
            "table ip {t}\ndelete table ip {t}\n\
             table ip {t} {{\n\
             \tchain postrouting {{\n\t\ttype nat hook postrouting priority 100; policy accept;\n\
             \t\tip saddr {net} oifname != \"{br}\" masquerade\n\
             \t\toifname \"{br}\" ip saddr 127.0.0.0/8 masquerade\n\
             \t\toifname \"{br}\" ip saddr {net} ct status dnat masquerade\n\t}}\n\
             \tchain forward {{\n\t\ttype filter hook forward priority 0; policy accept;\n\
             \t\tiifname \"{br}\" accept\n\
             \t\toifname \"{br}\" ct state established,related accept\n\
             \t\toifname \"{br}\" ct status dnat accept\n\
             \t\toifname \"{br}\" drop\n\t}}\n\
             }}\n"
        )
    }

    /// The rules of our filter chain, in order, for `-A`.
    fn iptables_forward(&self) -> Vec<Vec<String>> {
        let br = self.bridge.as_str();
        let rules: [&[&str]; 4] = [
            &["-i", br, "-j", "ACCEPT"],
            &["-o", br, "-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED", "-j", "ACCEPT"],
            &["-o", br, "-m", "conntrack", "--ctstate", "DNAT", "-j", "ACCEPT"],
            &["-o", br, "-j", "DROP"],
        ];
        strings(&rules)
    }

    fn iptables_masquerade(&self) -> Vec<Vec<String>> {
        let (net, br) = (self.subnet.to_string(), self.bridge.as_str());
        let rules: [&[&str]; 3] = [
            &["-s", &net, "!", "-o", br, "-j", "MASQUERADE"],
            &["-s", "127.0.0.0/8", "-o", br, "-j", "MASQUERADE"],
            &["-s", &net, "-o", br, "-m", "conntrack", "--ctstate", "DNAT", "-j", "MASQUERADE"],
        ];
        strings(&rules)
    }

    /// Turns forwarding on and writes the rules (idempotent: a restarted agent replaces
    /// what a killed one left). On failure nothing of ours is left half-written.
    pub fn ensure(&self) -> Result<(), NetError> {
        let r = self.write();
        if r.is_err() {
            // Only what this call wrote: running instances keep their published ports and
            // their networks' rules.
            self.remove_nat();
        }
        r
    }

    fn write(&self) -> Result<(), NetError> {
        match self.firewall {
            Firewall::Nft => {
                run("nft", &["-f", "-"], Some(&self.nft_script()))?;
                // iptables' own FORWARD chain (docker.io's DROP policy) must accept too.
                if found("iptables") && iptables_forward_drops() {
                    ensure_iptables_chain(&self.chain(), "filter", &[("FORWARD", &[])], &self.iptables_forward())?;
                }
            }
            Firewall::Iptables => {
                let chain = self.chain();
                ensure_iptables_chain(&chain, "filter", &[("FORWARD", &[])], &self.iptables_forward())?;
                ensure_iptables_chain(&chain, "nat", &[("POSTROUTING", &[])], &self.iptables_masquerade())?;
            }
        }
        // Last: nothing is forwarded before the rules that guard the bridge are in place.
        std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")
            .map_err(|e| NetError::Firewall { command: "enable ip_forward".into(), message: e.to_string() })
    }

    /// Removes every rule [`Nat::ensure`], [`Nat::publish`] and [`crate::isolation::Lan`] wrote, with either firewall
    /// (one chosen at an earlier start leaves nothing behind either); forwarding stays on,
    /// as Docker leaves it.
    pub fn remove(&self) {
        self.remove_ports();
        if found("nft") {
            let _ = run("nft", &["delete", "table", "bridge", &self.lan_table()], None);
        }
        self.remove_nat();
    }

    /// Removes the outbound NAT's table or chains (with either firewall).
    fn remove_nat(&self) {
        if found("nft") {
            let _ = run("nft", &["delete", "table", "ip", &self.table()], None);
        }
        if found("iptables") {
            let chain = self.chain();
            for (table, from) in [("filter", "FORWARD"), ("nat", "POSTROUTING")] {
                remove_iptables_chain(&chain, table, &[(from, &[])]);
            }
        }
    }
}

pub(crate) fn strings(rules: &[&[&str]]) -> Vec<Vec<String>> {
    rules.iter().map(|r| r.iter().map(|a| a.to_string()).collect()).collect()
}

/// Our chain `chain` in `table`, holding `rules`, jumped to first from each `(from, when)`
/// (the base chain, and the match its packets need).
pub(crate) fn ensure_iptables_chain(
    chain: &str,
    table: &str,
    jumps: &[(&str, &[&str])],
    rules: &[Vec<String>],
) -> Result<(), NetError> {
    let ipt = |args: &[&str]| run("iptables", &[&["-t", table][..], args].concat(), None);
    // The chain's rules replaced in one commit (declaring a chain empties it): a restarted
    // agent leaves no moment in which running instances' traffic meets a half-written chain.
    run("iptables-restore", &["--noflush"], Some(&iptables_restore_script(table, chain, rules)))?;
    for (from, when) in jumps {
        let jump = [&[*from], *when, &["-j", chain]].concat();
        if ipt(&[&["-C"][..], &jump].concat()).is_err() {
            ipt(&[&["-I"][..], &jump].concat())?;
        }
    }
    Ok(())
}

/// Removes `chain` from `table` and its jumps from each `(from, when)`.
pub(crate) fn remove_iptables_chain(chain: &str, table: &str, jumps: &[(&str, &[&str])]) {
    let ipt = |args: &[&str]| run("iptables", &[&["-t", table][..], args].concat(), None);
    for (from, when) in jumps {
        let jump = [&["-D", *from], *when, &["-j", chain]].concat();
        // Bounded: a jump added twice (two agents racing) is deleted twice.
        for _ in 0..8 {
            if ipt(&jump).is_err() {
                break;
            }
        }
    }
    let _ = ipt(&["-F", chain]);
    let _ = ipt(&["-X", chain]);
}

/// `iptables-restore` input that empties `chain` in `table` (making it if need be) and fills
/// it with `rules`.
fn iptables_restore_script(table: &str, chain: &str, rules: &[Vec<String>]) -> String {
    let mut s = format!("*{table}\n:{chain} - [0:0]\n");
    for rule in rules {
        s.push_str(&format!("-A {chain} {}\n", rule.join(" ")));
    }
    s.push_str("COMMIT\n");
    s
}

/// Whether iptables' filter FORWARD chain drops what no rule accepts.
fn iptables_forward_drops() -> bool {
    run("iptables", &["-S", "FORWARD"], None).is_ok_and(|s| s.lines().any(|l| l.trim() == "-P FORWARD DROP"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_nft_table_is_named_for_the_bridge_and_masquerades_only_leaving_traffic() {
        let nat = Nat {
            bridge: "sk-t1".into(),
            subnet: Subnet::parse("10.99.0.0/24").unwrap(),
            firewall: Firewall::Nft,
            services: None,
        };
        let s = nat.nft_script();
        assert!(s.starts_with("table ip skiff_sk_t1\ndelete table ip skiff_sk_t1\n"), "{s}");
        assert!(s.contains("ip saddr 10.99.0.0/24 oifname != \"sk-t1\" masquerade"), "{s}");
        assert!(
            s.contains("oifname \"sk-t1\" ct status dnat accept\n\t\toifname \"sk-t1\" drop"),
            "a published port's connections pass, nothing else: {s}"
        );
        assert!(s.contains("oifname \"sk-t1\" ip saddr 10.99.0.0/24 ct status dnat masquerade"), "hairpin: {s}");
        assert_eq!(nat.chain(), "SKIFF-sk-t1");
        assert_eq!(nat.iptables_masquerade()[0].join(" "), "-s 10.99.0.0/24 ! -o sk-t1 -j MASQUERADE");
        assert_eq!(
            iptables_restore_script("nat", &nat.chain(), &nat.iptables_masquerade()[..1]),
            "*nat\n:SKIFF-sk-t1 - [0:0]\n-A SKIFF-sk-t1 -s 10.99.0.0/24 ! -o sk-t1 -j MASQUERADE\nCOMMIT\n"
        );
        let forward: Vec<String> = nat.iptables_forward().iter().map(|r| r.join(" ")).collect();
        assert_eq!(forward[2..], ["-o sk-t1 -m conntrack --ctstate DNAT -j ACCEPT", "-o sk-t1 -j DROP"]);
    }

    #[test]
    fn firewalls_parse() {
        assert_eq!(Firewall::parse("nft"), Ok(FirewallSetting { firewall: Some(Firewall::Nft), explicit: true }));
        assert_eq!(
            Firewall::parse("iptables"),
            Ok(FirewallSetting { firewall: Some(Firewall::Iptables), explicit: true })
        );
        assert_eq!(Firewall::parse("none"), Ok(FirewallSetting::none()));
        assert!(!Firewall::parse("auto").unwrap().explicit);
        assert!(Firewall::parse("pf").unwrap_err().contains("auto, nft, iptables or none"));
    }
}
