//! Where the CLI finds its hub: `--config FILE`, then `$SKIFF_CONFIG`, then
//! `~/.config/skiff/config`, then `<data>/admin.conf` (written by `skiff up` / `skiff hub`).

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClientConfig {
    pub server: String,
    pub token: String,
    /// The hub's CA (PEM): the only certificate authority the CLI trusts for `server`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<String>,
    /// Other hubs of the same store (one is active at a time): the CLI uses the first of
    /// `server` and these that answers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub servers: Vec<String>,
}

impl ClientConfig {
    /// `server` if it answers, else the first of `servers` that does (a TCP connection
    /// within a second each: a standby hub does not listen). `server` when none does, so
    /// the error names it.
    pub fn answering(&self) -> String {
        if self.servers.is_empty() {
            return self.server.clone();
        }
        let answers = |url: &str| {
            let Ok(u) = reqwest::Url::parse(url) else { return false };
            let (Some(host), Some(port)) = (u.host_str(), u.port_or_known_default()) else { return false };
            let host = host.trim_start_matches('[').trim_end_matches(']');
            let addrs = std::net::ToSocketAddrs::to_socket_addrs(&(host, port)).map(|a| a.collect::<Vec<_>>());
            addrs
                .unwrap_or_default()
                .iter()
                .any(|a| std::net::TcpStream::connect_timeout(a, std::time::Duration::from_secs(1)).is_ok())
        };
        std::iter::once(&self.server).chain(&self.servers).find(|s| answers(s)).unwrap_or(&self.server).clone()
    }
}

pub fn find(explicit: Option<&Path>, data: &Path) -> Result<(PathBuf, ClientConfig)> {
    let mut candidates: Vec<PathBuf> = vec![];
    if let Some(p) = explicit {
        candidates.push(p.to_path_buf());
    } else {
        if let Some(p) = std::env::var_os("SKIFF_CONFIG") {
            candidates.push(PathBuf::from(p));
        }
        if let Some(h) = std::env::var_os("HOME") {
            candidates.push(PathBuf::from(h).join(".config/skiff/config"));
        }
        candidates.push(data.join("admin.conf"));
    }
    for c in &candidates {
        if c.exists() {
            let text = std::fs::read_to_string(c).with_context(|| format!("reading {}", c.display()))?;
            let cfg: ClientConfig =
                serde_json::from_str(&text).with_context(|| format!("{}: not a skiff client config", c.display()))?;
            return Ok((c.clone(), cfg));
        }
    }
    if explicit.is_some() || std::env::var_os("SKIFF_CONFIG").is_some() {
        bail!("config file {} does not exist", candidates[0].display());
    }
    bail!(
        "cannot find a hub: none of {} exists; start one with `skiff up` (or pass --config FILE / --data DIR)",
        candidates.iter().map(|c| c.display().to_string()).collect::<Vec<_>>().join(", ")
    )
}

/// Writes the operator config readable by its owner only.
pub fn write(path: &Path, cfg: &ClientConfig) -> Result<()> {
    skiff_sys::durable::write(path, serde_json::to_string_pretty(cfg)?.as_bytes(), 0o600)?;
    Ok(())
}
