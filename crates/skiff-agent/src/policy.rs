//! The node's own policy (`/etc/skiff/policy.yaml`, or `--policy FILE`): what a workload
//! may ask of this node, whatever the hub sent. A deployment that breaks it does not start
//! here; its instance fails with the rule named, and a `PolicyViolation` event says so.
//!
//! ```yaml
//! bind_mounts:
//!   allowed: [/srv/data, /var/log/app]   # host paths (and what is below them) that may be
//!                                        # bind-mounted; absent: any
//!   denied: [/var/lib/skiff-hub]         # never, even below an allowed path
//! capabilities:
//!   allowed: [NET_ADMIN, SYS_TIME]       # beyond Docker's default set; absent: any
//! devices:
//!   allowed: ["/dev/ttyUSB*", /dev/video0]  # host devices that may be mapped; absent: any
//! host_network: false                    # the host's network namespace (default: true)
//! macvlan:                               # addresses on host segments (default: any,
//!   parents: [eth1]                      # none with host_network: false); [] = none
//! privileged: false                      # cap_add: [ALL] (default: true)
//! images:                                # signed images (`skiff_image::policy`): the first
//!   - match: "registry.example.com/**"   # rule naming an image decides
//!     mode: enforce                      # enforce | warn
//!     keys: [/etc/skiff/keys/fleet.pub]  # cosign public keys (files or PEM text)
//! ```
//!
//! Without a file the policy is Docker's allowance, with one exception that no file
//! lifts: the agent's data directory — node key, CA key of a hub on the same data
//! directory, every image layer and every instance's secrets — is never bind-mounted,
//! nor anything that holds it (`/`, `/var`, `/var/lib`), nor anything below it. Paths
//! are compared after symlinks are resolved.

use serde::Deserialize;
use skiff_model::validate::normalize_cap;
use skiff_model::{Deployment, NetworkMode, VolumeSource};
use std::path::{Path, PathBuf};

/// Where the policy is read from when no `--policy` is given (when it exists).
pub const DEFAULT_PATH: &str = "/etc/skiff/policy.yaml";

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    #[serde(default)]
    pub bind_mounts: PathRules,
    #[serde(default)]
    pub capabilities: Allowed,
    #[serde(default)]
    pub devices: Allowed,
    #[serde(default)]
    pub host_network: Option<bool>,
    /// Which host interfaces `network: macvlan` may use (absent: any).
    #[serde(default)]
    pub macvlan: Option<MacvlanRule>,
    #[serde(default)]
    pub privileged: Option<bool>,
    /// Which images must be signed, by whom (see `skiff_image::policy`).
    #[serde(default)]
    pub images: Vec<skiff_image::policy::RawRule>,
    /// `images`, checked and with their keys read.
    #[serde(skip)]
    pub image_policy: std::sync::Arc<skiff_image::policy::ImagePolicy>,
    /// Where it was read from (for messages).
    #[serde(skip)]
    pub source: Option<PathBuf>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PathRules {
    #[serde(default)]
    pub allowed: Option<Vec<String>>,
    #[serde(default)]
    pub denied: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Allowed {
    #[serde(default)]
    pub allowed: Option<Vec<String>>,
}

/// `macvlan:` in the node's policy: the host interfaces instances may join.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MacvlanRule {
    pub parents: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("{path}: {message}")]
    Read { path: PathBuf, message: String },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// A workload the policy refuses: the rule, and what broke it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("refused by the node's policy ({source_file}, {rule}): {what}")]
pub struct Violation {
    pub rule: &'static str,
    pub what: String,
    pub source_file: String,
}

impl Policy {
    /// `explicit` (which must exist), else [`DEFAULT_PATH`] if it exists, else the default.
    pub fn load(explicit: Option<&Path>) -> Result<Policy, PolicyError> {
        let path = match explicit {
            Some(p) => p.to_path_buf(),
            None if Path::new(DEFAULT_PATH).exists() => PathBuf::from(DEFAULT_PATH),
            None => return Ok(Policy::default()),
        };
        let text = std::fs::read_to_string(&path)
            .map_err(|e| PolicyError::Read { path: path.clone(), message: e.to_string() })?;
        let base = path.parent().unwrap_or(Path::new("/")).to_path_buf();
        let mut p = Policy::parse_at(&text, &base, Some(&path))
            .map_err(|message| PolicyError::Invalid { path: path.clone(), message })?;
        p.source = Some(path);
        Ok(p)
    }

    /// Parses and checks a policy file's text; errors name the field.
    pub fn parse(text: &str) -> Result<Policy, String> {
        Policy::parse_at(text, Path::new("/"), None)
    }

    /// [`Policy::parse`] with key files of `images:` read relative to `base`.
    fn parse_at(text: &str, base: &Path, source: Option<&Path>) -> Result<Policy, String> {
        if text.trim().is_empty() {
            return Ok(Policy::default());
        }
        let mut p: Policy = serde_norway::from_str(text).map_err(|e| e.to_string())?;
        p.image_policy = std::sync::Arc::new(skiff_image::policy::ImagePolicy::from_rules(
            &p.images,
            source.map(Path::to_path_buf),
            |f| std::fs::read_to_string(base.join(f)),
        )?);
        for (i, c) in p.capabilities.allowed.iter().flatten().enumerate() {
            if normalize_cap(c).is_none() {
                return Err(format!("capabilities.allowed[{i}]: {c:?} is not a capability"));
            }
        }
        for (field, list) in [("bind_mounts.allowed", p.bind_mounts.allowed.iter().flatten().collect::<Vec<_>>())]
            .into_iter()
            .chain([("bind_mounts.denied", p.bind_mounts.denied.iter().collect())])
            .chain([("devices.allowed", p.devices.allowed.iter().flatten().collect())])
        {
            for (i, path) in list.iter().enumerate() {
                // devices.allowed also names CDI devices (`nvidia.com/gpu=*`).
                let cdi = field == "devices.allowed" && skiff_model::DeviceRequest::looks_like_cdi(path);
                if !path.starts_with('/') && !cdi {
                    return Err(format!("{field}[{i}]: {path:?} is not an absolute path"));
                }
            }
        }
        Ok(p)
    }

    fn violation(&self, rule: &'static str, what: String) -> Violation {
        let source_file = self.source.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "default".into());
        Violation { rule, what, source_file }
    }

    /// Whether `d` may run on this node, whose data directory is `data_dir` (named volumes
    /// live there by design and are not bind mounts).
    pub fn check(&self, d: &Deployment, data_dir: &Path) -> Result<(), Violation> {
        let data = resolve(data_dir);
        for v in &d.volumes {
            let VolumeSource::Bind { path } = &v.source else { continue };
            if !skiff_model::validate::is_clean_absolute(path) {
                return Err(self.violation("bind mounts", format!("bind mount {path}: . or .. in the path")));
            }
            let src = resolve(Path::new(path));
            if src.starts_with(&data) || data.starts_with(&src) {
                return Err(self.violation(
                    "data directory",
                    format!(
                        "bind mount {path}: it is, holds or is inside the agent's data directory {}",
                        data.display()
                    ),
                ));
            }
            if self.bind_mounts.denied.iter().any(|p| src.starts_with(resolve(Path::new(p)))) {
                return Err(self.violation("bind_mounts.denied", format!("bind mount {path}")));
            }
            if let Some(allowed) = &self.bind_mounts.allowed {
                if !allowed.iter().any(|p| src.starts_with(resolve(Path::new(p)))) {
                    return Err(self.violation("bind_mounts.allowed", format!("bind mount {path}")));
                }
            }
        }
        let caps: Vec<String> = d.cap_add.iter().filter_map(|c| normalize_cap(c)).collect();
        if caps.iter().any(|c| c == "ALL") && self.privileged == Some(false) {
            return Err(self.violation("privileged", "cap_add: ALL".into()));
        }
        if let Some(allowed) = &self.capabilities.allowed {
            let allowed: Vec<String> = allowed.iter().filter_map(|c| normalize_cap(c)).collect();
            for c in caps.iter().filter(|c| !skiff_runtime::spec::DEFAULT_CAPS.contains(&c.as_str()) && *c != "ALL") {
                if !allowed.contains(c) {
                    return Err(self.violation("capabilities.allowed", format!("cap_add: {c}")));
                }
            }
        }
        if let Some(allowed) = &self.devices.allowed {
            for dev in &d.devices {
                if !skiff_model::validate::is_clean_absolute(&dev.host_path)
                    || !allowed.iter().any(|p| glob(p, &dev.host_path))
                {
                    return Err(self.violation("devices.allowed", format!("device {}", dev.host_path)));
                }
            }
        }
        if let Some(allowed) = &self.devices.allowed {
            // CDI devices by name (`nvidia.com/gpu=*` allows any GPU, a count included).
            for r in &d.device_requests {
                let names: Vec<String> = if r.ids.is_empty() {
                    vec![format!("{}=*", r.kind)]
                } else {
                    r.ids.iter().map(|i| format!("{}={i}", r.kind)).collect()
                };
                if let Some(n) = names.iter().find(|n| !allowed.iter().any(|p| glob(p, n))) {
                    return Err(self.violation("devices.allowed", format!("device {n}")));
                }
            }
        }
        if d.network == NetworkMode::Host && self.host_network == Some(false) {
            return Err(self.violation("host_network", "network: host".into()));
        }
        if let Some(m) = &d.macvlan {
            match &self.macvlan {
                Some(rule) if !rule.parents.iter().any(|p| p == &m.parent) => {
                    return Err(self.violation("macvlan.parents", format!("macvlan on {}", m.parent)));
                }
                // A node that keeps workloads off the host's network keeps them off its
                // segments too, unless its policy names the parents it allows.
                None if self.host_network == Some(false) => {
                    return Err(self.violation("host_network", format!("macvlan on {}", m.parent)));
                }
                _ => {}
            }
        }
        Ok(())
    }
}

/// The path with symlinks resolved as far as it exists (a missing tail is kept as is).
fn resolve(p: &Path) -> PathBuf {
    let mut existing = p.to_path_buf();
    let mut tail = vec![];
    loop {
        if let Ok(c) = existing.canonicalize() {
            return tail.into_iter().rev().fold(c, |acc, part| acc.join(part));
        }
        match (existing.file_name().map(|n| n.to_os_string()), existing.parent()) {
            (Some(name), Some(parent)) => {
                tail.push(name);
                existing = parent.to_path_buf();
            }
            _ => return p.to_path_buf(),
        }
    }
}

/// `*` matches any run of characters within one path part (never a `/`); everything
/// else matches itself.
fn glob(pattern: &str, text: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == text,
        Some((head, rest)) => {
            let Some(after) = text.strip_prefix(head) else { return false };
            let part = after.find('/').unwrap_or(after.len());
            (0..=part).filter(|i| after.is_char_boundary(*i)).any(|i| glob(rest, &after[i..]))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use skiff_model::{DeviceMapping, Volume};

    fn bind(d: &mut Deployment, path: &str) {
        d.volumes.push(Volume {
            source: VolumeSource::Bind { path: path.into() },
            target: "/host".into(),
            read_only: false,
        });
    }

    #[test]
    fn cdi_devices_meet_devices_allowed() {
        let p = Policy::parse("devices: {allowed: [/dev/ttyUSB*, nvidia.com/gpu=*]}\n").unwrap();
        let data = std::path::Path::new("/var/lib/skiff");
        let with = |kind: &str, ids: &[&str], count| {
            let mut d = Deployment::new("x", "i");
            d.device_requests = vec![skiff_model::DeviceRequest {
                kind: kind.into(),
                ids: ids.iter().map(|s| s.to_string()).collect(),
                count,
            }];
            p.check(&d, data).err().map(|v| v.what)
        };
        assert_eq!(with("nvidia.com/gpu", &[], 1), None);
        assert_eq!(with("nvidia.com/gpu", &["0"], 0), None);
        assert_eq!(with("vendor.com/fpga", &["0"], 0), Some("device vendor.com/fpga=0".into()));
        assert!(Policy::parse("devices: {allowed: [dev/x]}\n").unwrap_err().contains("devices.allowed[0]"));
    }

    #[test]
    fn the_default_allows_what_docker_allows_but_the_data_directory() {
        let t = tempfile::tempdir().unwrap();
        let data = t.path().join("var/lib/skiff");
        std::fs::create_dir_all(data.join("pki")).unwrap();
        std::os::unix::fs::symlink(&data, t.path().join("innocent")).unwrap();
        let p = Policy::default();
        let mut ok = Deployment::new("web", "img");
        bind(&mut ok, "/srv/anything");
        ok.cap_add = vec!["ALL".into()];
        ok.network = NetworkMode::Host;
        ok.devices.push(DeviceMapping {
            host_path: "/dev/mem".into(),
            container_path: "/dev/mem".into(),
            permissions: "rwm".into(),
        });
        assert_eq!(p.check(&ok, &data), Ok(()));
        for bad in [
            "/",
            t.path().to_str().unwrap(),
            data.to_str().unwrap(),
            data.join("pki").to_str().unwrap(),
            t.path().join("innocent/pki").to_str().unwrap(),
        ] {
            let mut d = Deployment::new("web", "img");
            bind(&mut d, bad);
            let v = p.check(&d, &data).unwrap_err();
            assert_eq!(v.rule, "data directory", "{bad}");
            assert!(v.to_string().contains("refused by the node's policy (default, data directory)"), "{v}");
        }
    }

    #[test]
    fn a_policy_file_narrows_mounts_capabilities_devices_and_network() {
        let p = Policy::parse(
            "bind_mounts: {allowed: [/srv], denied: [/srv/secret]}\n\
             capabilities: {allowed: [NET_ADMIN]}\n\
             devices: {allowed: ['/dev/ttyUSB*']}\n\
             host_network: false\n\
             macvlan: {parents: [eth1]}\n\
             privileged: false\n",
        )
        .unwrap();
        let data = Path::new("/var/lib/skiff");
        let check = |f: &dyn Fn(&mut Deployment)| {
            let mut d = Deployment::new("web", "img");
            f(&mut d);
            p.check(&d, data).err().map(|v| v.rule)
        };
        assert_eq!(check(&|d| bind(d, "/srv/data")), None);
        assert_eq!(check(&|d| bind(d, "/etc")), Some("bind_mounts.allowed"));
        assert_eq!(check(&|d| bind(d, "/srv/secret/x")), Some("bind_mounts.denied"));
        // `..` cannot walk out of an allowed directory, nor a missing one into the data.
        assert_eq!(check(&|d| bind(d, "/srv/nope/../../var/lib/skiff")), Some("bind mounts"));
        assert_eq!(check(&|d| bind(d, "/x/../var/lib/skiff")), Some("bind mounts"));
        assert_eq!(check(&|d| d.cap_add = vec!["net_admin".into(), "CHOWN".into()]), None);
        assert_eq!(check(&|d| d.cap_add = vec!["SYS_ADMIN".into()]), Some("capabilities.allowed"));
        assert_eq!(check(&|d| d.cap_add = vec!["ALL".into()]), Some("privileged"));
        let usb =
            |h: &str| DeviceMapping { host_path: h.into(), container_path: "/dev/x".into(), permissions: "rw".into() };
        assert_eq!(check(&|d| d.devices.push(usb("/dev/ttyUSB0"))), None);
        assert_eq!(check(&|d| d.devices.push(usb("/dev/sda"))), Some("devices.allowed"));
        assert_eq!(check(&|d| d.network = NetworkMode::Host), Some("host_network"));
        let macvlan = |parent: &str| skiff_model::Macvlan {
            parent: parent.into(),
            subnet: None,
            gateway: None,
            ip_range: None,
            ip: Some("192.168.1.5".into()),
        };
        let on = |parent: &'static str| {
            move |d: &mut Deployment| {
                d.network = NetworkMode::Macvlan;
                d.macvlan = Some(macvlan(parent));
            }
        };
        assert_eq!(check(&on("eth1")), None);
        assert_eq!(check(&on("eth0")), Some("macvlan.parents"));
        // Without a macvlan rule, host_network: false keeps instances off segments too.
        let strict = Policy::parse("host_network: false\n").unwrap();
        let mut d = Deployment::new("web", "img");
        on("eth1")(&mut d);
        assert_eq!(strict.check(&d, data).err().map(|v| v.rule), Some("host_network"));
        assert!(Policy::parse("{}").unwrap().check(&d, data).is_ok(), "no policy: any parent");
        for (bad, field) in [
            ("capabilities: {allowed: [FLY]}", "capabilities.allowed[0]"),
            ("bind_mounts: {allowed: [srv]}", "bind_mounts.allowed[0]"),
            ("host_network: maybe", "host_network"),
            ("surprise: 1", "unknown field `surprise`"),
        ] {
            let e = Policy::parse(bad).unwrap_err();
            assert!(e.contains(field), "{bad}: {e}");
        }
        assert!(glob("/dev/tty*", "/dev/ttyACM0") && !glob("/dev/tty*", "/dev/sda") && glob("/a*b*c", "/aXbYc"));
        assert!(glob("/dev/bus/usb/*/*", "/dev/bus/usb/001/002"));
        assert!(!glob("/dev/bus/usb/*", "/dev/bus/usb/../../sda") && !glob("/dev/snd/*", "/dev/snd/x/y"));
    }
}
