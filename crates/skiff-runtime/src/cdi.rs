//! CDI, the Container Device Interface (the spec the NVIDIA container toolkit, Intel's and
//! others' device plugins write to `/etc/cdi` and `/var/run/cdi`): a device is named
//! `vendor.com/class=name`, and using it means applying its *container edits* — device
//! nodes, mounts, environment, hooks — to the OCI spec.
//!
//! * Spec files are JSON or YAML (`*.json`, `*.yaml`); a file in a later directory
//!   overrides one of the same name's kind and device in an earlier one (`/var/run/cdi`,
//!   written at boot, over `/etc/cdi`). A file that does not parse is reported and skipped.
//! * `vendor.com/class=all` is every device of the class.
//! * A device's edits come after its spec's own `containerEdits` (applied once per spec).
//! * A device node without `type`/`major`/`minor` takes them from the host's node
//!   (`hostPath`, else `path`); its cgroup rule allows `permissions` (default `rwm`).

use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Where CDI specs live, lowest priority first.
pub const DEFAULT_DIRS: &[&str] = &["/etc/cdi", "/var/run/cdi"];

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CdiError {
    #[error("{0:?} is not a CDI device name (want vendor.com/class=name)")]
    BadName(String),
    #[error("unknown CDI device {name}; this node has: {have}")]
    Unknown { name: String, have: String },
    #[error("CDI device {name}: {problem}")]
    Edit { name: String, problem: String },
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ContainerEdits {
    #[serde(default)]
    pub env: Vec<String>,
    #[serde(default)]
    pub device_nodes: Vec<DeviceNode>,
    #[serde(default)]
    pub mounts: Vec<Mount>,
    #[serde(default)]
    pub hooks: Vec<Hook>,
    #[serde(default, rename = "additionalGIDs")]
    pub additional_gids: Vec<u32>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct DeviceNode {
    pub path: String,
    #[serde(default)]
    pub host_path: Option<String>,
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
    #[serde(default)]
    pub major: Option<i64>,
    #[serde(default)]
    pub minor: Option<i64>,
    #[serde(default)]
    pub file_mode: Option<u32>,
    #[serde(default)]
    pub permissions: Option<String>,
    #[serde(default)]
    pub uid: Option<u32>,
    #[serde(default)]
    pub gid: Option<u32>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Mount {
    pub host_path: String,
    pub container_path: String,
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
    #[serde(default)]
    pub options: Vec<String>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Hook {
    pub hook_name: String,
    pub path: String,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub env: Vec<String>,
    #[serde(default)]
    pub timeout: Option<i64>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct SpecFile {
    #[allow(dead_code)]
    cdi_version: String,
    kind: String,
    #[serde(default)]
    devices: Vec<SpecDevice>,
    #[serde(default)]
    container_edits: ContainerEdits,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct SpecDevice {
    name: String,
    #[serde(default)]
    container_edits: ContainerEdits,
}

/// The CDI devices of a node.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    /// kind → (device name → its edits, its spec's index).
    devices: BTreeMap<String, BTreeMap<String, (ContainerEdits, usize)>>,
    /// Spec-wide edits, by index.
    spec_edits: Vec<ContainerEdits>,
    /// Files that could not be read, and why.
    pub problems: Vec<String>,
}

/// Splits `vendor.com/class=name` into (`vendor.com/class`, `name`), checking CDI's rules:
/// the vendor is a domain-like name, the class and name are [A-Za-z0-9_.:-].
pub fn parse_name(s: &str) -> Result<(&str, &str), CdiError> {
    let bad = || CdiError::BadName(s.to_string());
    let (kind, name) = s.split_once('=').ok_or_else(bad)?;
    skiff_model::DeviceRequest::parse_cdi(s).ok_or_else(bad)?;
    Ok((kind, name))
}

/// Whether `s` looks like a CDI device name rather than a host path.
pub fn is_cdi_name(s: &str) -> bool {
    skiff_model::DeviceRequest::looks_like_cdi(s) && parse_name(s).is_ok()
}

impl Registry {
    /// Reads every spec file of `dirs` (missing directories are fine).
    pub fn load(dirs: &[PathBuf]) -> Registry {
        let mut r = Registry::default();
        for dir in dirs {
            let Ok(rd) = std::fs::read_dir(dir) else { continue };
            let mut files: Vec<PathBuf> = rd.flatten().map(|e| e.path()).collect();
            files.sort();
            for f in files {
                let ext = f.extension().and_then(|e| e.to_str()).unwrap_or_default();
                if !matches!(ext, "json" | "yaml" | "yml") {
                    continue;
                }
                if let Err(e) = r.add_file(&f) {
                    r.problems.push(format!("{}: {e}", f.display()));
                }
            }
        }
        r
    }

    fn add_file(&mut self, f: &Path) -> Result<(), String> {
        let text = std::fs::read_to_string(f).map_err(|e| e.to_string())?;
        let spec: SpecFile = if f.extension().is_some_and(|e| e == "json") {
            serde_json::from_str(&text).map_err(|e| e.to_string())?
        } else {
            serde_norway::from_str(&text).map_err(|e| e.to_string())?
        };
        self.add(spec)
    }

    /// Adds a spec given as JSON or YAML text (tests, and `load`).
    pub fn add_text(&mut self, text: &str) -> Result<(), String> {
        let spec: SpecFile = serde_norway::from_str(text).map_err(|e| e.to_string())?;
        self.add(spec)
    }

    fn add(&mut self, spec: SpecFile) -> Result<(), String> {
        let (vendor, class) =
            spec.kind.split_once('/').ok_or_else(|| format!("kind {:?} is not vendor/class", spec.kind))?;
        parse_name(&format!("{vendor}/{class}=x"))
            .map_err(|_| format!("kind {:?} is not vendor.com/class", spec.kind))?;
        if spec.devices.is_empty() {
            return Err(format!("kind {} lists no devices", spec.kind));
        }
        for d in &spec.devices {
            parse_name(&format!("{vendor}/{class}={}", d.name)).map_err(|e| e.to_string())?;
            if d.name == "all" {
                return Err("a device may not be named \"all\"".into());
            }
        }
        let idx = self.spec_edits.len();
        self.spec_edits.push(spec.container_edits);
        let kind = self.devices.entry(spec.kind).or_default();
        for d in spec.devices {
            kind.insert(d.name, (d.container_edits, idx));
        }
        Ok(())
    }

    /// Every device, as `kind → names`.
    pub fn inventory(&self) -> BTreeMap<String, Vec<String>> {
        self.devices.iter().map(|(k, v)| (k.clone(), v.keys().cloned().collect())).collect()
    }

    /// Fully qualified names of the devices `name` stands for (`=all` expands).
    pub fn expand(&self, name: &str) -> Result<Vec<String>, CdiError> {
        let (kind, dev) = parse_name(name)?;
        let unknown = || CdiError::Unknown { name: name.to_string(), have: self.names().join(", ") };
        let devs = self.devices.get(kind).ok_or_else(unknown)?;
        if dev == "all" {
            return Ok(devs.keys().map(|d| format!("{kind}={d}")).collect());
        }
        devs.get(dev).map(|_| vec![name.to_string()]).ok_or_else(unknown)
    }

    fn names(&self) -> Vec<String> {
        let all: Vec<String> =
            self.devices.iter().flat_map(|(k, v)| v.keys().map(move |d| format!("{k}={d}"))).collect();
        if all.is_empty() {
            vec!["none (no CDI specs in /etc/cdi or /var/run/cdi)".into()]
        } else {
            all
        }
    }

    /// The edits of `names` (qualified, expanded): each spec's own edits once, then each
    /// device's, in order.
    pub fn edits(&self, names: &[String]) -> Result<Vec<(String, ContainerEdits)>, CdiError> {
        let mut out = vec![];
        let mut specs_done = BTreeSet::new();
        for name in names {
            let (kind, dev) = parse_name(name)?;
            let (edits, idx) = self
                .devices
                .get(kind)
                .and_then(|d| d.get(dev))
                .ok_or_else(|| CdiError::Unknown { name: name.clone(), have: self.names().join(", ") })?;
            if specs_done.insert(*idx) {
                out.push((format!("{kind} (spec)"), self.spec_edits[*idx].clone()));
            }
            out.push((name.clone(), edits.clone()));
        }
        Ok(out)
    }
}

/// Applies container edits to a generated OCI spec (as JSON): environment (a later value
/// of a variable wins), device nodes with their cgroup rules, mounts, hooks and groups.
pub fn apply(spec: &mut Value, edits: &[(String, ContainerEdits)]) -> Result<(), CdiError> {
    for (name, e) in edits {
        let err = |problem: String| CdiError::Edit { name: name.clone(), problem };
        if let Some(env) = spec["process"]["env"].as_array_mut() {
            for kv in &e.env {
                let key = kv.split('=').next().unwrap_or_default();
                env.retain(|v| v.as_str().and_then(|s| s.split('=').next()) != Some(key));
                env.push(json!(kv));
            }
        }
        for d in &e.device_nodes {
            if !d.path.starts_with('/') {
                return Err(err(format!("device node path {:?} is not absolute", d.path)));
            }
            let host = d.host_path.clone().unwrap_or_else(|| d.path.clone());
            let (kind, major, minor) = match (&d.kind, d.major, d.minor) {
                (Some(k), Some(ma), Some(mi)) => (k.clone(), ma, mi),
                _ => {
                    let (k, ma, mi) = crate::spec::device_numbers(Path::new(&host))
                        .ok_or_else(|| err(format!("{host} is not a device node on this host")))?;
                    (d.kind.clone().unwrap_or_else(|| k.to_string()), ma as i64, mi as i64)
                }
            };
            if !matches!(kind.as_str(), "c" | "b" | "u" | "p") {
                return Err(err(format!("device node {}: type {kind:?} is not c, b, u or p", d.path)));
            }
            if !clean(&d.path) || !clean(&host) {
                return Err(err(format!("device node {}: . or .. in the path", d.path)));
            }
            let perms = d.permissions.clone().unwrap_or_else(|| "rwm".into());
            if perms.is_empty() || !perms.chars().all(|c| "rwm".contains(c)) {
                return Err(err(format!("device node {}: permissions {perms:?} are not a subset of rwm", d.path)));
            }
            let mut node = json!({"path": d.path, "type": kind, "major": major, "minor": minor,
                "fileMode": d.file_mode.unwrap_or(0o666)});
            node["uid"] = json!(d.uid.unwrap_or(0));
            node["gid"] = json!(d.gid.unwrap_or(0));
            push(spec, &["linux", "devices"], node);
            // The cgroup knows character and block devices: `u` (unbuffered) is a
            // character device, a FIFO (`p`) needs no rule.
            let cg = match kind.as_str() {
                "b" => Some("b"),
                "p" => None,
                _ => Some("c"),
            };
            if let Some(cg) = cg {
                let rule = json!({"allow": true, "type": cg, "major": major, "minor": minor, "access": perms});
                push(spec, &["linux", "resources", "devices"], rule);
            }
        }
        for m in &e.mounts {
            if !clean(&m.container_path) || !clean(&m.host_path) {
                return Err(err(format!(
                    "mount {} -> {}: paths must be absolute, without . or ..",
                    m.host_path, m.container_path
                )));
            }
            let kind = m.kind.clone().unwrap_or_else(|| "bind".into());
            let mut options = m.options.clone();
            if kind == "bind" && !options.iter().any(|o| o == "bind" || o == "rbind") {
                options.push("rbind".into());
            }
            let mount =
                json!({"destination": m.container_path, "type": kind, "source": m.host_path, "options": options});
            push(spec, &["mounts"], mount);
        }
        for h in &e.hooks {
            let stage = match h.hook_name.as_str() {
                "prestart" | "createRuntime" | "createContainer" | "startContainer" | "poststart" | "poststop" => {
                    h.hook_name.as_str()
                }
                other => return Err(err(format!("hook {other:?} is not an OCI hook stage"))),
            };
            if !clean(&h.path) {
                return Err(err(format!("hook {}: the path must be absolute, without . or ..", h.path)));
            }
            let mut hook = json!({"path": h.path, "args": h.args, "env": h.env});
            if let Some(t) = h.timeout {
                hook["timeout"] = json!(t);
            }
            push(spec, &["hooks", stage], hook);
        }
        for g in &e.additional_gids {
            push(spec, &["process", "user", "additionalGids"], json!(g));
        }
    }
    Ok(())
}

/// An absolute path without `.` or `..` components.
fn clean(p: &str) -> bool {
    p.starts_with('/') && !p.split('/').any(|c| c == "." || c == "..")
}

/// Appends `v` to the array at `path`, creating objects and the array on the way.
fn push(spec: &mut Value, path: &[&str], v: Value) {
    let mut cur = spec;
    for (i, key) in path.iter().enumerate() {
        let last = i + 1 == path.len();
        if !cur.get(key).is_some_and(|c| if last { c.is_array() } else { c.is_object() }) {
            cur[*key] = if last { json!([]) } else { json!({}) };
        }
        cur = &mut cur[*key];
    }
    if let Some(a) = cur.as_array_mut() {
        a.push(v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The NVIDIA container toolkit's shape (`nvidia-ctk cdi generate`), pointed at
    /// harmless host files.
    const SPEC: &str = r#"
cdiVersion: "0.5.0"
kind: nvidia.com/gpu
devices:
  - name: "0"
    containerEdits:
      deviceNodes:
        - path: /dev/nvidia0
          hostPath: /dev/null
  - name: "1"
    containerEdits:
      deviceNodes:
        - {path: /dev/nvidia1, type: c, major: 1, minor: 5, permissions: rw}
      env: [GPU_SLOT=1]
containerEdits:
  env: [NVIDIA_VISIBLE_DEVICES=void, GPU_SLOT=unset]
  mounts:
    - {hostPath: /etc/hostname, containerPath: /usr/lib/libcuda.so.1, options: [ro, nosuid, nodev, bind]}
  hooks:
    - {hookName: createContainer, path: /usr/bin/nvidia-ctk, args: [nvidia-ctk, hook, update-ldcache]}
"#;

    #[test]
    fn names_follow_cdi_rules() {
        assert_eq!(parse_name("nvidia.com/gpu=0"), Ok(("nvidia.com/gpu", "0")));
        assert_eq!(parse_name("vendor.example/fpga=GPU-3f4a:1"), Ok(("vendor.example/fpga", "GPU-3f4a:1")));
        for bad in ["nvidia.com/gpu", "gpu=0", "/dev/null", "nvidia.com/=0", "nvidia.com/gpu=", "a b/c=d"] {
            assert!(parse_name(bad).is_err(), "{bad}");
        }
        assert!(is_cdi_name("nvidia.com/gpu=all") && !is_cdi_name("/dev/ttyUSB0:/dev/ttyUSB0"));
    }

    #[test]
    fn edits_apply_in_order_with_all_expanding() {
        let mut r = Registry::default();
        r.add_text(SPEC).unwrap();
        assert_eq!(r.inventory()["nvidia.com/gpu"], ["0", "1"]);
        let all = r.expand("nvidia.com/gpu=all").unwrap();
        assert_eq!(all, ["nvidia.com/gpu=0", "nvidia.com/gpu=1"]);
        let e = r.expand("nvidia.com/gpu=7").unwrap_err().to_string();
        assert!(e.contains("unknown CDI device nvidia.com/gpu=7") && e.contains("nvidia.com/gpu=1"), "{e}");
        let mut spec = json!({"process": {"env": ["PATH=/bin", "GPU_SLOT=x"], "user": {"uid": 0, "gid": 0}},
            "mounts": [], "linux": {"devices": [], "resources": {"devices": [{"allow": false, "access": "rwm"}]}}});
        apply(&mut spec, &r.edits(&all).unwrap()).unwrap();
        let env: Vec<&str> = spec["process"]["env"].as_array().unwrap().iter().filter_map(|v| v.as_str()).collect();
        assert_eq!(env, ["PATH=/bin", "NVIDIA_VISIBLE_DEVICES=void", "GPU_SLOT=1"]);
        let devs = spec["linux"]["devices"].as_array().unwrap();
        assert_eq!(devs.len(), 2);
        assert_eq!(
            (devs[0]["path"].as_str(), devs[0]["type"].as_str(), devs[0]["major"].as_i64(), devs[0]["minor"].as_i64()),
            (Some("/dev/nvidia0"), Some("c"), Some(1), Some(3))
        );
        let rules = spec["linux"]["resources"]["devices"].as_array().unwrap();
        assert_eq!(rules[2]["access"], "rw");
        assert_eq!(spec["mounts"][0]["destination"], "/usr/lib/libcuda.so.1");
        assert_eq!(spec["hooks"]["createContainer"][0]["path"], "/usr/bin/nvidia-ctk");
        // The spec's own edits once, however many of its devices.
        assert_eq!(spec["mounts"].as_array().unwrap().len(), 1);
    }

    #[test]
    fn broken_specs_are_reported_not_fatal() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("good.yaml"), SPEC).unwrap();
        std::fs::write(dir.path().join("bad.json"), "{").unwrap();
        std::fs::write(dir.path().join("named-all.yaml"), "cdiVersion: 0.5.0\nkind: x.com/y\ndevices: [{name: all}]\n")
            .unwrap();
        std::fs::write(dir.path().join("empty.yaml"), "cdiVersion: 0.5.0\nkind: x.com/y\n").unwrap();
        std::fs::write(dir.path().join("badkind.yaml"), "cdiVersion: 0.5.0\nkind: 'x y/z'\ndevices: [{name: a}]\n")
            .unwrap();
        let r = Registry::load(&[dir.path().to_path_buf(), "/nonexistent".into()]);
        assert_eq!(r.inventory().len(), 1);
        assert_eq!(r.problems.len(), 4, "{:?}", r.problems);
        let mut spec = json!({"process": {"env": []}});
        let bad = vec![(
            "x".to_string(),
            ContainerEdits {
                device_nodes: vec![DeviceNode {
                    path: "/dev/x".into(),
                    host_path: Some("/etc/hostname".into()),
                    ..Default::default()
                }],
                ..Default::default()
            },
        )];
        assert!(apply(&mut spec, &bad).unwrap_err().to_string().contains("not a device node"));
        let edits = |e: ContainerEdits| vec![("x".to_string(), e)];
        let mount = |h: &str, c: &str| ContainerEdits {
            mounts: vec![Mount { host_path: h.into(), container_path: c.into(), ..Default::default() }],
            ..Default::default()
        };
        let e = apply(&mut spec, &edits(mount("/etc/../root", "/x"))).unwrap_err().to_string();
        assert!(e.contains("without . or .."), "{e}");
        assert!(apply(&mut spec, &edits(mount("/etc/hostname", "x/../../y"))).is_err());
        let hook = ContainerEdits {
            hooks: vec![Hook { hook_name: "prestart".into(), path: "bin/sh".into(), ..Default::default() }],
            ..Default::default()
        };
        assert!(apply(&mut spec, &edits(hook)).unwrap_err().to_string().contains("hook bin/sh"));
    }
}
