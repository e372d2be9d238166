//! Outbound NAT for the node's bridge, as Docker's bridge driver does it: forwarding on,
//! the bridge's subnet masqueraded on its way out of any other interface, and traffic
//! forwarded to and from the bridge accepted even where the host's FORWARD policy is DROP
//! (installing docker.io sets it so).
//!
//! Two firewalls are supported, chosen at start: nftables (`nft`, current Debian and
//! OpenWrt's fw4) with one table of our own per bridge, replaced atomically; and iptables
//! (legacy or its nft back end) with a chain of our own per bridge. Where `iptables` is
//! present and its FORWARD chain drops by default, the accept rules also go there: in
//! nftables a packet must pass every base chain on the hook, so an accept in our table
//! does not undo a drop in another.

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

    pub fn parse(s: &str) -> Result<Option<Firewall>, String> {
        match s {
            "auto" => Ok(Firewall::detect()),
            "nft" | "nftables" => Ok(Some(Firewall::Nft)),
            "iptables" => Ok(Some(Firewall::Iptables)),
            "none" => Ok(None),
            other => Err(format!("{other:?} is not a firewall: use auto, nft, iptables or none")),
        }
    }
}

/// Where `tool` is: on `PATH`, or in the sbin directories a service's `PATH` may lack.
fn locate(tool: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin", "/usr/local/sbin"].map(std::path::PathBuf::from))
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

fn found(tool: &str) -> bool {
    locate(tool).is_some()
}

/// Runs `tool args` with `stdin`; the error names the command and carries its stderr.
fn run(tool: &str, args: &[&str], stdin: Option<&str>) -> Result<String, NetError> {
    use std::io::Write;
    let err = |m: String| NetError::Firewall { command: format!("{tool} {}", args.join(" ")), message: m };
    let mut child = Command::new(locate(tool).unwrap_or_else(|| tool.into()))
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
}

impl Nat {
    /// nftables' table (identifiers allow letters, digits, `_` and `.`).
    fn table(&self) -> String {
        let name: String =
            self.bridge.chars().map(|c| if c.is_ascii_alphanumeric() || c == '_' { c } else { '_' }).collect();
        format!("skiff_{name}")
    }

    /// iptables' chain for this bridge (at most 28 bytes: `SKIFF-` and a 15-byte name).
    fn chain(&self) -> String {
        format!("SKIFF-{}", self.bridge)
    }

    /// The nftables script that replaces our table in one transaction.
    pub fn nft_script(&self) -> String {
        let (t, br, net) = (self.table(), &self.bridge, self.subnet);
        format!(
            "table ip {t}\ndelete table ip {t}\n\
             table ip {t} {{\n\
             \tchain postrouting {{\n\t\ttype nat hook postrouting priority srcnat; policy accept;\n\
             \t\tip saddr {net} oifname != \"{br}\" masquerade\n\t}}\n\
             \tchain forward {{\n\t\ttype filter hook forward priority filter; policy accept;\n\
             \t\tiifname \"{br}\" accept\n\
             \t\toifname \"{br}\" ct state established,related accept\n\t}}\n\
             }}\n"
        )
    }

    /// The iptables rules as (table, chain, rule) for `-A`/`-D`.
    fn iptables_forward(&self) -> Vec<Vec<String>> {
        let br = self.bridge.clone();
        vec![
            vec!["-i".into(), br.clone(), "-j".into(), "ACCEPT".into()],
            vec![
                "-o".into(),
                br,
                "-m".into(),
                "conntrack".into(),
                "--ctstate".into(),
                "RELATED,ESTABLISHED".into(),
                "-j".into(),
                "ACCEPT".into(),
            ],
        ]
    }

    fn iptables_masquerade(&self) -> Vec<String> {
        vec![
            "-s".into(),
            self.subnet.to_string(),
            "!".into(),
            "-o".into(),
            self.bridge.clone(),
            "-j".into(),
            "MASQUERADE".into(),
        ]
    }

    /// Turns forwarding on and writes the rules (idempotent: a restarted agent replaces
    /// what a killed one left).
    pub fn ensure(&self) -> Result<(), NetError> {
        std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")
            .map_err(|e| NetError::Firewall { command: "enable ip_forward".into(), message: e.to_string() })?;
        match self.firewall {
            Firewall::Nft => {
                run("nft", &["-f", "-"], Some(&self.nft_script()))?;
                // iptables' own FORWARD chain (docker.io's DROP policy) must accept too.
                if found("iptables") && iptables_forward_drops() {
                    self.ensure_iptables_forward()?;
                }
            }
            Firewall::Iptables => {
                self.ensure_iptables_forward()?;
                let rule = self.iptables_masquerade();
                let r: Vec<&str> = rule.iter().map(String::as_str).collect();
                if run("iptables", &[&["-t", "nat", "-C", "POSTROUTING"][..], &r].concat(), None).is_err() {
                    run("iptables", &[&["-t", "nat", "-A", "POSTROUTING"][..], &r].concat(), None)?;
                }
            }
        }
        Ok(())
    }

    /// Our chain in iptables' filter table, jumped to first from FORWARD.
    fn ensure_iptables_forward(&self) -> Result<(), NetError> {
        let chain = self.chain();
        let _ = run("iptables", &["-N", &chain], None); // exists: fine
        run("iptables", &["-F", &chain], None)?;
        for rule in self.iptables_forward() {
            let r: Vec<&str> = rule.iter().map(String::as_str).collect();
            run("iptables", &[&["-A", &chain][..], &r].concat(), None)?;
        }
        if run("iptables", &["-C", "FORWARD", "-j", &chain], None).is_err() {
            run("iptables", &["-I", "FORWARD", "-j", &chain], None)?;
        }
        Ok(())
    }

    /// Removes every rule [`Nat::ensure`] wrote (forwarding stays on, as Docker leaves it).
    pub fn remove(&self) {
        if self.firewall == Firewall::Nft {
            let _ = run("nft", &["delete", "table", "ip", &self.table()], None);
        } else {
            let rule = self.iptables_masquerade();
            let r: Vec<&str> = rule.iter().map(String::as_str).collect();
            // Bounded: a rule added twice (two agents racing) is deleted twice.
            for _ in 0..8 {
                if run("iptables", &[&["-t", "nat", "-D", "POSTROUTING"][..], &r].concat(), None).is_err() {
                    break;
                }
            }
        }
        if found("iptables") {
            let chain = self.chain();
            for _ in 0..8 {
                if run("iptables", &["-D", "FORWARD", "-j", &chain], None).is_err() {
                    break;
                }
            }
            let _ = run("iptables", &["-F", &chain], None);
            let _ = run("iptables", &["-X", &chain], None);
        }
    }
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
        let nat =
            Nat { bridge: "sk-t1".into(), subnet: Subnet::parse("10.99.0.0/24").unwrap(), firewall: Firewall::Nft };
        let s = nat.nft_script();
        assert!(s.starts_with("table ip skiff_sk_t1\ndelete table ip skiff_sk_t1\n"), "{s}");
        assert!(s.contains("ip saddr 10.99.0.0/24 oifname != \"sk-t1\" masquerade"), "{s}");
        assert!(s.contains("oifname \"sk-t1\" ct state established,related accept"), "{s}");
        assert_eq!(nat.chain(), "SKIFF-sk-t1");
        assert_eq!(nat.iptables_masquerade().join(" "), "-s 10.99.0.0/24 ! -o sk-t1 -j MASQUERADE");
    }

    #[test]
    fn firewalls_parse() {
        assert_eq!(Firewall::parse("nft"), Ok(Some(Firewall::Nft)));
        assert_eq!(Firewall::parse("iptables"), Ok(Some(Firewall::Iptables)));
        assert_eq!(Firewall::parse("none"), Ok(None));
        assert!(Firewall::parse("pf").unwrap_err().contains("auto, nft, iptables or none"));
    }
}
