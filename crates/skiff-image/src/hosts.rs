//! Where and how to reach registries: `/etc/skiff/registries.yaml`.
//!
//! ```yaml
//! # Registries reached over plain HTTP (loopback ones always are, as Docker allows).
//! insecure_registries: ["10.0.0.5:5000"]
//! # PEM certificates trusted in addition to the system roots, for every registry.
//! ca_file: /etc/skiff/registry-ca.pem
//! # Tried in order before the registry itself; a mirror that fails falls through.
//! mirrors:
//!   docker.io: ["https://mirror.site-3.example:5000", "http://127.0.0.1:5001"]
//! ```

use crate::ImageError;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub const DEFAULT_PATH: &str = "/etc/skiff/registries.yaml";

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RegistriesConfig {
    #[serde(default)]
    pub insecure_registries: Vec<String>,
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    #[serde(default)]
    pub mirrors: BTreeMap<String, Vec<String>>,
}

/// One place to fetch an image from: a mirror or the registry itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// `http://host:port` or `https://host:port`, no trailing slash.
    pub base: String,
    /// `host:port` as written, for messages and credentials.
    pub host: String,
    pub mirror: bool,
    /// HTTPS tried first on a registry that may be plain HTTP (as Docker does): only a
    /// failure to connect or to agree on TLS falls through to `http://`.
    pub probe: bool,
}

fn config_error(path: &Path, problem: impl Into<String>) -> ImageError {
    ImageError::Malformed { what: path.display().to_string(), problem: problem.into() }
}

/// `docker.io` and `index.docker.io` name the registry Docker Hub serves at `registry-1.docker.io`.
pub fn canonical_registry(name: &str) -> &str {
    match name {
        "docker.io" | "index.docker.io" => "registry-1.docker.io",
        other => other,
    }
}

impl RegistriesConfig {
    /// Reads `path`; a missing file is an empty config unless `required`.
    pub fn load(path: &Path, required: bool) -> Result<Self, ImageError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => return Ok(Self::default()),
            Err(e) => return Err(ImageError::Io { op: "read", path: path.to_path_buf(), source: e }),
        };
        Self::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Self, ImageError> {
        if text.trim().is_empty() {
            return Ok(Self::default());
        }
        let cfg: RegistriesConfig = serde_norway::from_str(text).map_err(|e| config_error(path, e.to_string()))?;
        for (i, r) in cfg.insecure_registries.iter().enumerate() {
            if r.is_empty() || r.contains('/') || r.chars().any(char::is_whitespace) {
                return Err(config_error(
                    path,
                    format!("insecure_registries[{i}]: {r:?} is not a host[:port] (no scheme, no path)"),
                ));
            }
        }
        for (reg, urls) in &cfg.mirrors {
            for (i, u) in urls.iter().enumerate() {
                split_url(u).map_err(|p| config_error(path, format!("mirrors.{reg}[{i}]: {u:?} {p}")))?;
            }
        }
        Ok(cfg)
    }

    /// Mirrors of `registry` (in order), then the registry itself.
    pub fn endpoints(&self, registry: &str, extra_insecure: &[String]) -> Vec<Endpoint> {
        let mut out = vec![];
        for (name, urls) in &self.mirrors {
            if canonical_registry(name) == registry {
                for u in urls {
                    if let Ok((scheme, host)) = split_url(u) {
                        let base = format!("{scheme}://{host}");
                        out.push(Endpoint { base, host: host.to_string(), mirror: true, probe: false });
                    }
                }
            }
        }
        let plain = is_loopback(registry)
            || self.insecure_registries.iter().chain(extra_insecure).any(|i| canonical_registry(i) == registry);
        let host = registry.to_string();
        out.push(Endpoint { base: format!("https://{registry}"), host: host.clone(), mirror: false, probe: plain });
        if plain {
            out.push(Endpoint { base: format!("http://{registry}"), host, mirror: false, probe: false });
        }
        out
    }
}

/// `scheme://host[:port][/]` → (scheme, host[:port]).
fn split_url(u: &str) -> Result<(&str, &str), &'static str> {
    let (scheme, rest) = u.split_once("://").ok_or("needs a scheme: http:// or https://")?;
    if scheme != "http" && scheme != "https" {
        return Err("needs a scheme: http:// or https://");
    }
    let host = rest.strip_suffix('/').unwrap_or(rest);
    if host.is_empty() || host.contains('/') || host.chars().any(char::is_whitespace) {
        return Err("must be scheme://host[:port] without a path");
    }
    Ok((scheme, host))
}

/// `localhost`, `127.x.y.z` or `[::1]`, with or without a port.
pub fn is_loopback(registry: &str) -> bool {
    let host = if let Some(rest) = registry.strip_prefix('[') {
        rest.split_once(']').map(|(h, _)| h).unwrap_or(rest)
    } else {
        registry.rsplit_once(':').map(|(h, _)| h).unwrap_or(registry)
    };
    host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_put_mirrors_first_and_pick_the_scheme() {
        let cfg = RegistriesConfig::parse(
            "insecure_registries: [\"10.0.0.5:5000\"]\nmirrors:\n  docker.io: [\"https://m.example:5000/\", \"http://127.0.0.1:5001\"]\n",
            Path::new("r.yaml"),
        )
        .unwrap();
        let e = cfg.endpoints("registry-1.docker.io", &[]);
        let bases: Vec<&str> = e.iter().map(|e| e.base.as_str()).collect();
        assert_eq!(bases, ["https://m.example:5000", "http://127.0.0.1:5001", "https://registry-1.docker.io"]);
        assert!(e[0].mirror && !e[2].mirror && !e[2].probe);
        // Plain HTTP is allowed: HTTPS first, then HTTP.
        let plain = |r: &str, extra: &[String]| -> Vec<(String, bool)> {
            cfg.endpoints(r, extra).into_iter().map(|e| (e.base, e.probe)).collect()
        };
        let both = |h: &str| vec![(format!("https://{h}"), true), (format!("http://{h}"), false)];
        assert_eq!(plain("10.0.0.5:5000", &[]), both("10.0.0.5:5000"));
        assert_eq!(plain("127.0.0.1:5000", &[]), both("127.0.0.1:5000"));
        assert_eq!(plain("[::1]:5000", &[]), both("[::1]:5000"));
        assert_eq!(plain("reg.example", &["reg.example".into()]), both("reg.example"));
        assert_eq!(plain("reg.example", &[]), vec![("https://reg.example".to_string(), false)]);
    }

    #[test]
    fn bad_configs_name_the_field() {
        let p = Path::new("r.yaml");
        let err = |t: &str| RegistriesConfig::parse(t, p).unwrap_err().to_string();
        assert!(err("mirrors:\n  docker.io: [\"m.example\"]\n")
            .contains("mirrors.docker.io[0]: \"m.example\" needs a scheme"));
        assert!(err("mirrors:\n  docker.io: [\"http://m/x\"]\n").contains("without a path"));
        assert!(err("insecure_registries: [\"http://x\"]\n").contains("insecure_registries[0]"));
        assert!(err("mirror: {}\n").contains("unknown field `mirror`"), "{}", err("mirror: {}\n"));
        assert_eq!(RegistriesConfig::parse("", p).unwrap(), RegistriesConfig::default());
        assert!(RegistriesConfig::load(Path::new("/nonexistent/r.yaml"), false).is_ok());
        assert!(RegistriesConfig::load(Path::new("/nonexistent/r.yaml"), true).is_err());
    }
}
