//! docker-compose → deployments.

use crate::{interpolate, parse_duration_ms, shell_split, short, ManifestError};
use serde_norway::{Mapping, Value};
use skiff_model::{
    parse_bytes, parse_cpus, Dependency, DependencyCondition, Deployment, DeviceMapping, DeviceRequest, HealthCheck,
    NetworkMode, PlacementMode, PortMapping, Protocol, RestartPolicy, Volume, VolumeSource,
};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq)]
pub struct ComposeImport {
    pub project: String,
    pub deployments: Vec<Deployment>,
    /// Keys that were ignored, each naming its path.
    pub warnings: Vec<String>,
    /// The services' `build:` sections, in file order.
    pub builds: Vec<BuildSpec>,
}

/// How one service's image is built (compose `build:`), into the tag its deployment runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildSpec {
    /// The compose service's name.
    pub service: String,
    /// The image it is tagged as: the service's `image`, else `localhost/PROJECT-SERVICE:latest`.
    pub tag: String,
    /// Whether the service names no image of its own: it runs only what is built.
    pub build_only: bool,
    /// The build context, a directory on this machine (unless `remote`).
    pub context: PathBuf,
    /// A Git repository as the context (`https://…/repo.git#REF:DIR`, `git@…`, `git://…`,
    /// `github.com/…`, as Docker takes them): fetched when built.
    pub remote: Option<GitContext>,
    /// The Dockerfile, relative to the context (`Dockerfile` when unset).
    pub dockerfile: Option<String>,
    /// A Dockerfile given in the compose file itself (`dockerfile_inline`).
    pub dockerfile_inline: Option<String>,
    pub args: BTreeMap<String, String>,
    /// The stage of a multi-stage Dockerfile to build up to.
    pub target: Option<String>,
}

/// A Git repository as a build context, as Docker reads one: `URL[#REF][:DIR]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GitContext {
    /// What `git` fetches from (`github.com/…` made `https://github.com/…`).
    pub url: String,
    /// A branch, tag or commit (the repository's `HEAD` when unset).
    pub reference: Option<String>,
    /// The context's directory in the repository (its root when unset).
    pub dir: Option<String>,
}

impl GitContext {
    /// `None` when `c` is no remote context (a directory); an error when it is one but
    /// not one Git can fetch or its fragment does not parse.
    pub fn parse(c: &str) -> Option<Result<GitContext, String>> {
        let git = ["git://", "git@", "https://", "http://", "ssh://", "github.com/"];
        if !git.iter().any(|p| c.starts_with(p)) {
            return c.contains("://").then(|| Err("a remote build context is a Git URL (https, ssh or git)".into()));
        }
        let (url, fragment) = c.split_once('#').unwrap_or((c, ""));
        let url = if url.starts_with("github.com/") { format!("https://{url}") } else { url.to_string() };
        let (reference, dir) = fragment.split_once(':').unwrap_or((fragment, ""));
        let some = |s: &str| (!s.is_empty()).then(|| s.to_string());
        // Nothing git would read as an option, nor a way out of the checkout.
        let bad_ref = |r: &str| r.starts_with('-') || r.chars().any(|ch| ch.is_whitespace() || ch.is_control());
        if reference.is_empty() && !dir.is_empty() && fragment.starts_with(':') {
            // `#:DIR`: the default branch's directory.
        } else if bad_ref(reference) {
            return Some(Err(format!("{reference:?} is not a branch, tag or commit")));
        }
        if dir.starts_with('/') || dir.split('/').any(|p| p == "..") {
            return Some(Err(format!("{dir:?}: the directory is relative to the repository, without ..")));
        }
        if url.chars().any(|ch| ch.is_whitespace() || ch.is_control()) {
            return Some(Err("a URL has no spaces".into()));
        }
        Some(Ok(GitContext { url, reference: some(reference), dir: some(dir.trim_end_matches('/')) }))
    }
}

type R<T> = Result<T, ManifestError>;

struct Ctx<'a> {
    dir: &'a Path,
    env: &'a dyn Fn(&str) -> Option<String>,
    read_file: &'a dyn Fn(&Path) -> std::io::Result<String>,
    warnings: Vec<String>,
    builds: Vec<BuildSpec>,
    /// Top-level `secrets` (true) and `configs` (false) by name: their content, or `None`
    /// for an `external` one (kept elsewhere; nothing here can read it).
    given: BTreeMap<(bool, String), Option<Vec<u8>>>,
}

/// Imports a compose file. `dir` resolves relative paths (bind mounts, env files);
/// `env` supplies interpolation variables, and `dir/.env` (as Compose reads it) the
/// defaults for those `env` lacks; `read_file` reads `.env` and env files.
pub fn import_compose(
    text: &str,
    dir: &Path,
    default_project: &str,
    env: &dyn Fn(&str) -> Option<String>,
    read_file: &dyn Fn(&Path) -> std::io::Result<String>,
) -> R<ComposeImport> {
    import_file(text, dir, default_project, None, env, read_file, 0)
}

/// How deep `include` may go (a loop of files otherwise never ends).
const INCLUDE_DEPTH: usize = 8;

/// [`import_compose`] of one file; `project`: the including file's project, which an
/// included file joins whatever its own `name:` says.
fn import_file(
    text: &str,
    dir: &Path,
    default_project: &str,
    project_of_includer: Option<&str>,
    env: &dyn Fn(&str) -> Option<String>,
    read_file: &dyn Fn(&Path) -> std::io::Result<String>,
    depth: usize,
) -> R<ComposeImport> {
    let dotenv = match read_file(&dir.join(".env")) {
        Ok(t) => crate::parse_dotenv(&t),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Default::default(),
        Err(e) => return Err(ManifestError::at(".env", format!("cannot be read: {e}"))),
    };
    let env = &move |k: &str| env(k).or_else(|| dotenv.get(k).cloned());
    let mut root: Value = serde_norway::from_str(text).map_err(|e| ManifestError::Yaml(e.to_string()))?;
    // `<<: *defaults`: YAML merge keys, as Compose applies them.
    root.apply_merge().map_err(|e| ManifestError::Yaml(e.to_string()))?;
    interpolate_all(&mut root, "", env)?;
    if root.is_null() {
        root = Value::Mapping(Mapping::new());
    }
    let top = root
        .as_mapping()
        .ok_or_else(|| ManifestError::at("(root)", "a compose file must be a mapping with a services key"))?;
    let mut cx = Ctx { dir, env, read_file, warnings: vec![], builds: vec![], given: BTreeMap::new() };
    let mut services = None;
    let mut networks_at = None;
    let mut includes = None;
    let mut project = sanitize_project(default_project);
    for (k, v) in top {
        let key = key_str(k, "(root)")?;
        match key.as_str() {
            "services" => services = Some(v),
            "networks" => networks_at = Some(v),
            "name" => project = sanitize_project(&str_of(v, "name")?),
            "include" => includes = Some(v),
            "version" => {}
            "secrets" | "configs" => top_level_files(&mut cx, key == "secrets", v)?,
            "volumes" => {
                if let Some(m) = v.as_mapping() {
                    for (n, def) in m {
                        if let Some(dm) = def.as_mapping() {
                            for (dk, _) in dm {
                                cx.warnings.push(format!(
                                    "volumes.{}.{}: not supported yet, ignored",
                                    key_str(n, "volumes")?,
                                    key_str(dk, "volumes")?
                                ));
                            }
                        }
                    }
                }
            }
            k if k.starts_with("x-") => {}
            other => cx.warnings.push(format!("{other}: not supported yet, ignored")),
        }
    }
    if let Some(p) = project_of_includer {
        project = p.to_string();
    }
    // `include`: other compose files whose services join this project, each read with
    // its own directory (and `.env`) as Compose reads them.
    let mut included = vec![];
    if let Some(list) = includes {
        let s = list.as_sequence().ok_or_else(|| ManifestError::at("include", "must be a list"))?;
        for (i, entry) in s.iter().enumerate() {
            let p = format!("include[{i}]");
            let (paths, project_dir) = match entry {
                Value::Mapping(m) => {
                    for k in m.keys().filter_map(Value::as_str).filter(|k| !["path", "project_directory"].contains(k)) {
                        cx.warnings.push(format!("{p}.{k}: not supported yet, ignored"));
                    }
                    let paths = match m.get("path") {
                        Some(Value::Sequence(_)) => list_of_strings(&m["path"], &format!("{p}.path"))?,
                        Some(x) => vec![str_of(x, &format!("{p}.path"))?],
                        None => return Err(ManifestError::at(p, "needs path")),
                    };
                    let pd =
                        m.get("project_directory").map(|x| str_of(x, &format!("{p}.project_directory"))).transpose()?;
                    (paths, pd)
                }
                other => (vec![str_of(other, &p)?], None),
            };
            for path in paths {
                if path.contains("://") || path.starts_with("oci:") || path.starts_with("git@") {
                    return Err(ManifestError::at(
                        &p,
                        format!("{path:?}: a remote file is not supported; fetch it here"),
                    ));
                }
                if depth >= INCLUDE_DEPTH {
                    return Err(ManifestError::at(
                        &p,
                        format!("includes more than {INCLUDE_DEPTH} files deep (a loop?)"),
                    ));
                }
                let file = PathBuf::from(short::normalize(&dir.join(&path)));
                let text =
                    read_file(&file).map_err(|e| ManifestError::at(&p, format!("reading {}: {e}", file.display())))?;
                let base = match &project_dir {
                    Some(d) => PathBuf::from(short::normalize(&dir.join(d))),
                    None => file.parent().map(Path::to_path_buf).unwrap_or_else(|| dir.to_path_buf()),
                };
                let inner = import_file(&text, &base, &project, Some(&project), env, read_file, depth + 1)
                    .map_err(|e| ManifestError::at(&p, format!("{}: {e}", file.display())))?;
                included.push(inner);
            }
        }
    }
    let empty = Mapping::new();
    let services = match services {
        None | Some(Value::Null) => &empty,
        Some(v) => v.as_mapping().ok_or_else(|| ManifestError::at("services", "must be a mapping"))?,
    };
    if services.is_empty() {
        cx.warnings.push("services: the file defines no services".into());
    }
    let nets = networks(&mut cx, &project, networks_at)?;
    // Services with `profiles:` run only when one of them is active (COMPOSE_PROFILES, as
    // Compose reads it).
    let active: Vec<String> = (cx.env)("COMPOSE_PROFILES")
        .map(|p| p.split(',').map(|x| x.trim().to_string()).filter(|x| !x.is_empty()).collect())
        .unwrap_or_default();
    let mut names = BTreeMap::new();
    for name in services.keys() {
        let name = key_str(name, "services")?;
        let d = deployment_name(&name);
        if let Some(other) = names.insert(d.clone(), name.clone()) {
            return Err(ManifestError::at(
                format!("services.{name}"),
                format!("is named {d:?} on the node, as {other:?} is (names are lower-case there)"),
            ));
        }
    }
    // Each service with `extends` resolved, and whether it runs: no profiles, an active
    // one, or a running service depends on it (Compose starts those too).
    let mut resolved = vec![];
    for (name, svc) in services {
        let name = key_str(name, "services")?;
        let svc = extended(&mut cx, services, &name, svc, 0)?;
        let profiles = match svc.as_mapping().and_then(|m| m.get("profiles")) {
            Some(p) => list_of_strings(p, &format!("services.{name}.profiles"))?,
            None => vec![],
        };
        let on = profiles.is_empty() || profiles.iter().any(|w| active.contains(w) || (w == "*" && !active.is_empty()));
        resolved.push((name, svc, profiles, on));
    }
    for _ in 0..resolved.len() {
        let wanted: Vec<String> = resolved.iter().filter(|r| r.3).flat_map(|r| dependency_names(&r.1)).collect();
        let mut changed = false;
        for r in resolved.iter_mut().filter(|r| !r.3 && wanted.contains(&r.0)) {
            r.3 = true;
            changed = true;
        }
        if !changed {
            break;
        }
    }
    let mut deployments = vec![];
    for (name, svc, profiles, on) in &resolved {
        if !on {
            cx.warnings.push(format!(
                "services.{name}: not started (its profiles {profiles:?} are not active; set COMPOSE_PROFILES)"
            ));
            continue;
        }
        let d = service(&mut cx, &project, &nets, name, svc)?;
        deployments.push(d);
    }
    let mut out = ComposeImport { project, deployments, warnings: cx.warnings, builds: cx.builds };
    for inner in included {
        for d in inner.deployments {
            if out.deployments.iter().any(|x| x.name == d.name) {
                return Err(ManifestError::at(
                    format!("services.{}", d.name),
                    "is defined both here and in an included file",
                ));
            }
            out.deployments.push(d);
        }
        out.warnings.extend(inner.warnings);
        out.builds.extend(inner.builds);
    }
    for d in &out.deployments {
        let Some(other) = &d.network_service else { continue };
        if !out.deployments.iter().any(|x| x.name == *other) {
            let path = format!("services.{}.network_mode", d.name);
            return Err(ManifestError::at(
                path,
                format!("service {other:?} is not in the file (or not in an active profile)"),
            ));
        }
    }
    Ok(out)
}

fn sanitize_project(s: &str) -> String {
    let s: String =
        s.to_ascii_lowercase().chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_').collect();
    let s = s.trim_start_matches(|c: char| !c.is_ascii_alphanumeric()).to_string();
    if s.is_empty() {
        "default".into()
    } else {
        s
    }
}

fn interpolate_all(v: &mut Value, path: &str, env: &dyn Fn(&str) -> Option<String>) -> R<()> {
    match v {
        Value::String(s) => {
            *s =
                interpolate(s, env).map_err(|e| ManifestError::at(if path.is_empty() { "(root)" } else { path }, e))?;
        }
        Value::Sequence(seq) => {
            for (i, x) in seq.iter_mut().enumerate() {
                interpolate_all(x, &format!("{path}[{i}]"), env)?;
            }
        }
        Value::Mapping(m) => {
            for (k, x) in m.iter_mut() {
                let ks = k.as_str().unwrap_or("?").to_string();
                let p = if path.is_empty() { ks } else { format!("{path}.{ks}") };
                interpolate_all(x, &p, env)?;
            }
        }
        _ => {}
    }
    Ok(())
}

fn key_str(k: &Value, path: &str) -> R<String> {
    match k {
        Value::String(s) => Ok(s.clone()),
        Value::Number(n) => Ok(n.to_string()),
        Value::Bool(b) => Ok(b.to_string()),
        _ => Err(ManifestError::at(path, "keys must be strings")),
    }
}

/// A scalar as a string (numbers and booleans too, as compose accepts `cpus: 0.5`).
fn scalar(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn str_of(v: &Value, path: &str) -> R<String> {
    scalar(v).ok_or_else(|| ManifestError::at(path, "must be a string"))
}

fn bool_of(v: &Value, path: &str) -> R<bool> {
    match v {
        Value::Bool(b) => Ok(*b),
        Value::String(s) if s == "true" || s == "false" => Ok(s == "true"),
        _ => Err(ManifestError::at(path, format!("{} is not a boolean", show(v)))),
    }
}

fn show(v: &Value) -> String {
    scalar(v).map(|s| format!("{s:?}")).unwrap_or_else(|| "this value".into())
}

fn list_of_strings(v: &Value, path: &str) -> R<Vec<String>> {
    match v {
        Value::Sequence(s) => s.iter().enumerate().map(|(i, x)| str_of(x, &format!("{path}[{i}]"))).collect(),
        _ => Err(ManifestError::at(path, "must be a list of strings")),
    }
}

/// `command: "a b"` (shell-split) or `command: [a, b]`.
fn argv(v: &Value, path: &str) -> R<Vec<String>> {
    match v {
        Value::String(s) => shell_split(s).map_err(|e| ManifestError::at(path, e)),
        Value::Sequence(_) => list_of_strings(v, path),
        _ => Err(ManifestError::at(path, "must be a string or a list of strings")),
    }
}

/// `environment:`/`labels:` as a mapping or a list of `K=V` (a bare `K` takes the value
/// from the environment, as compose does).
fn key_values(cx: &Ctx<'_>, v: &Value, path: &str, out: &mut BTreeMap<String, String>) -> R<()> {
    match v {
        Value::Mapping(m) => {
            for (k, val) in m {
                let k = key_str(k, path)?;
                let val = match val {
                    Value::Null => (cx.env)(&k).unwrap_or_default(),
                    other => str_of(other, &format!("{path}.{k}"))?,
                };
                out.insert(k, val);
            }
        }
        Value::Sequence(s) => {
            for (i, item) in s.iter().enumerate() {
                let item = str_of(item, &format!("{path}[{i}]"))?;
                match item.split_once('=') {
                    Some((k, val)) => out.insert(k.to_string(), val.to_string()),
                    None => out.insert(item.clone(), (cx.env)(&item).unwrap_or_default()),
                };
            }
        }
        _ => return Err(ManifestError::at(path, "must be a mapping or a list of KEY=VALUE")),
    }
    Ok(())
}

/// `x-skiff-signature`: the deployment's signature rule; a key or certificate given as a
/// file name (relative to the compose file) is read into it, since the rule travels.
fn signature(cx: &Ctx<'_>, v: &Value, path: &str) -> R<skiff_model::SignatureRule> {
    let mut rule: skiff_model::SignatureRule =
        serde_norway::from_value(v.clone()).map_err(|e| ManifestError::at(path, e.to_string()))?;
    let read = |field: String, s: &mut String| -> R<()> {
        if !s.contains("-----BEGIN") {
            let p = cx.dir.join(&*s);
            *s = (cx.read_file)(&p).map_err(|e| ManifestError::at(&field, format!("reading {}: {e}", p.display())))?;
        }
        Ok(())
    };
    for (i, k) in rule.keys.iter_mut().enumerate() {
        read(format!("{path}.keys[{i}]"), k)?;
    }
    for (i, c) in rule.notation.iter_mut().flat_map(|n| n.trust_store.iter_mut()).enumerate() {
        read(format!("{path}.notation.trust_store[{i}]"), c)?;
    }
    Ok(rule)
}

fn env_file(cx: &Ctx<'_>, file: &str, path: &str, out: &mut BTreeMap<String, String>) -> R<()> {
    let p = cx.dir.join(file);
    let text = (cx.read_file)(&p).map_err(|e| ManifestError::at(path, format!("reading {}: {e}", p.display())))?;
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line);
        let (k, v) = line
            .split_once('=')
            .ok_or_else(|| ManifestError::at(path, format!("{}:{}: expected KEY=VALUE", p.display(), n + 1)))?;
        let v = v.trim();
        let v = v
            .strip_prefix('"')
            .and_then(|x| x.strip_suffix('"'))
            .or_else(|| v.strip_prefix('\'').and_then(|x| x.strip_suffix('\'')))
            .unwrap_or(v);
        out.insert(k.trim().to_string(), v.to_string());
    }
    Ok(())
}

fn cpus(v: &Value, path: &str) -> R<u64> {
    let s = str_of(v, path)?;
    parse_cpus(&s).or_else(|e| {
        // Less than a thousandth of a core (Docker counts in billionths): the least skiff
        // counts, one thousandth.
        match s.trim().parse::<f64>() {
            Ok(x) if x > 0.0 && x < 0.001 => Ok(1),
            _ => Err(ManifestError::at(path, e.to_string())),
        }
    })
}

fn bytes(v: &Value, path: &str) -> R<u64> {
    let s = str_of(v, path)?;
    parse_bytes(&s).map_err(|e| ManifestError::at(path, e.to_string()))
}

fn int(v: &Value, path: &str) -> R<i64> {
    match v {
        Value::Number(n) if n.is_i64() => n.as_i64().ok_or_else(|| ManifestError::at(path, "is not an integer")),
        Value::String(s) => s.parse().map_err(|_| ManifestError::at(path, format!("{s:?} is not an integer"))),
        _ => Err(ManifestError::at(path, format!("{} is not an integer", show(v)))),
    }
}

fn duration(v: &Value, path: &str) -> R<u64> {
    let s = str_of(v, path)?;
    parse_duration_ms(&s)
        .ok_or_else(|| ManifestError::at(path, format!("{s:?} is not a duration (examples: 10s, 1m30s, 500ms)")))
}

/// `logging: {driver: json-file, options: {max-size: 10m, max-file: "3"}}`: how the
/// instances' log files are rotated (they are always JSON lines, as `json-file` writes).
fn logging(cx: &mut Ctx<'_>, v: &Value, path: &str) -> R<skiff_model::LogOptions> {
    let mut o = skiff_model::LogOptions::default();
    for (k, x) in mapping(v, path)? {
        let key = key_str(k, path)?;
        let p = format!("{path}.{key}");
        match key.as_str() {
            "driver" => match str_of(x, &p)?.as_str() {
                "json-file" | "local" => {}
                other => cx.warnings.push(format!("{p}: {other:?} is not supported; logs are kept as json-file")),
            },
            "options" => {
                for (ok, ov) in mapping(x, &p)? {
                    let okey = key_str(ok, &p)?;
                    let op = format!("{p}.{okey}");
                    match okey.as_str() {
                        "max-size" | "max-file" => {
                            o.set(&okey, &str_of(ov, &op)?).map_err(|e| ManifestError::at(&op, e))?
                        }
                        _ => cx.warnings.push(format!("{op}: not supported yet, ignored")),
                    }
                }
            }
            _ => cx.warnings.push(format!("{p}: not supported yet, ignored")),
        }
    }
    Ok(o)
}

/// `x-skiff-wasm: {timeout: 30s, pool: 8, allow_local: true}`: settings of the wasm runtime.
fn wasm_options(cx: &mut Ctx<'_>, v: &Value, path: &str) -> R<skiff_model::WasmOptions> {
    let mut o = skiff_model::WasmOptions::default();
    for (k, x) in mapping(v, path)? {
        let key = key_str(k, path)?;
        let p = format!("{path}.{key}");
        match key.as_str() {
            "timeout" => o.timeout_ms = Some(duration(x, &p)?),
            "pool" => {
                let n = int(x, &p)?;
                o.pool = Some(u32::try_from(n).map_err(|_| ManifestError::at(&p, format!("{n} is not a pool size")))?);
            }
            "allow_local" => {
                o.allow_local = x.as_bool().ok_or_else(|| ManifestError::at(&p, "must be true or false"))?;
            }
            _ => cx.warnings.push(format!("{p}: not supported yet, ignored")),
        }
    }
    Ok(o)
}

fn mapping<'v>(v: &'v Value, path: &str) -> R<&'v Mapping> {
    v.as_mapping().ok_or_else(|| ManifestError::at(path, "must be a mapping"))
}

/// A network of the file, as the node sees it.
struct Net {
    /// Its name on the node.
    name: String,
    /// `driver: macvlan`: the segment (addresses per service).
    macvlan: Option<skiff_model::Macvlan>,
}

/// Top-level `networks:`: each key's network on the node, named as Compose names it
/// (`name:` as written, an external one by its key, the others `<project>_<key>`).
fn networks(cx: &mut Ctx<'_>, project: &str, v: Option<&Value>) -> R<BTreeMap<String, Net>> {
    let mut out = BTreeMap::new();
    let Some(m) = v.filter(|v| !v.is_null()).map(|v| mapping(v, "networks")).transpose()? else { return Ok(out) };
    for (k, def) in m {
        let key = key_str(k, "networks")?;
        let path = format!("networks.{key}");
        let (mut external, mut name, mut driver) = (false, None, None);
        let (mut parent, mut ipam) = (None, None);
        if let Some(dm) = def.as_mapping() {
            for (dk, dv) in dm {
                let dkey = key_str(dk, &path)?;
                let p = format!("{path}.{dkey}");
                match dkey.as_str() {
                    "external" => {
                        external = match dv {
                            // The old form: `external: {name: N}`.
                            Value::Mapping(em) => {
                                if let Some(n) = em.get("name") {
                                    name = Some(str_of(n, &format!("{p}.name"))?);
                                }
                                true
                            }
                            other => bool_of(other, &p)?,
                        }
                    }
                    "name" => name = Some(str_of(dv, &p)?),
                    "driver" => driver = Some((str_of(dv, &p)?, p)),
                    "driver_opts" => {
                        for (ok, ov) in mapping(dv, &p)? {
                            let okey = key_str(ok, &p)?;
                            match okey.as_str() {
                                "parent" => parent = Some(str_of(ov, &format!("{p}.parent"))?),
                                _ => cx.warnings.push(format!("{p}.{okey}: not supported yet, ignored")),
                            }
                        }
                    }
                    "ipam" => ipam = Some((dv, p)),
                    // Meaningless on one bridge: any instance may join any network.
                    "attachable" => {}
                    _ => cx.warnings.push(format!("{p}: not supported yet, ignored")),
                }
            }
        } else if !def.is_null() {
            return Err(ManifestError::at(&path, "must be a mapping"));
        }
        let macvlan = match driver {
            Some((d, p)) if d == "macvlan" => {
                let parent = parent.ok_or_else(|| {
                    ManifestError::at(format!("{path}.driver_opts.parent"), "is required for macvlan")
                })?;
                let mut m = skiff_model::Macvlan { parent, subnet: None, gateway: None, ip_range: None, ip: None };
                if let Some((v, p)) = ipam {
                    macvlan_ipam(cx, &mut m, v, &p)?;
                }
                let _ = p;
                Some(m)
            }
            Some((d, p)) => {
                if d != "bridge" {
                    cx.warnings
                        .push(format!("{p}: {d:?} is not supported yet: joined as a network on the node's bridge"));
                }
                if let Some((_, p)) = ipam {
                    cx.warnings.push(format!(
                        "{p}: not supported yet, ignored (the network gets a subnet of each node's pool, --subnet)"
                    ));
                }
                None
            }
            None => {
                if let Some((_, p)) = ipam {
                    cx.warnings.push(format!(
                        "{p}: not supported yet, ignored (the network gets a subnet of each node's pool, --subnet)"
                    ));
                }
                None
            }
        };
        let resolved = match (external, name) {
            (_, Some(n)) => n,
            (true, None) => key.clone(),
            (false, None) => format!("{project}_{key}"),
        };
        out.insert(key, Net { name: resolved, macvlan });
    }
    Ok(out)
}

/// The services a service's `depends_on` names, as written.
fn dependency_names(svc: &Value) -> Vec<String> {
    match svc.as_mapping().and_then(|m| m.get("depends_on")) {
        Some(Value::Sequence(l)) => l.iter().filter_map(|v| v.as_str().map(str::to_string)).collect(),
        Some(Value::Mapping(m)) => m.keys().filter_map(|k| k.as_str().map(str::to_string)).collect(),
        _ => vec![],
    }
}

/// A service's deployment name: Compose allows capitals and dots in service names, a
/// deployment's name is a host name (lower-case letters, digits, `-` and `_`).
fn deployment_name(service: &str) -> String {
    service.chars().map(|c| if c == '.' { '-' } else { c.to_ascii_lowercase() }).collect()
}

/// Keys whose lists replace the base's under `extends` (as Compose merges them); other
/// lists are joined, mappings merged key by key, scalars replaced.
const REPLACED_LISTS: &[&str] = &["command", "entrypoint", "test", "dns", "dns_search", "tmpfs"];

/// `extends:` resolved: the base service (in this file, or `file:` beside it), its own
/// `extends` first, with the service's keys over it. At most 8 deep.
fn extended(cx: &mut Ctx<'_>, services: &Mapping, name: &str, svc: &Value, depth: usize) -> R<Value> {
    let path = format!("services.{name}.extends");
    let Some(ext) = svc.as_mapping().and_then(|m| m.get("extends")) else {
        let mut own = svc.clone();
        untag(&mut own);
        return Ok(own);
    };
    if depth >= 8 {
        return Err(ManifestError::at(&path, "extends more than 8 services deep (a loop?)"));
    }
    let (base_name, file) = match ext {
        Value::String(s) => (s.clone(), None),
        Value::Mapping(m) => {
            let base = m.get("service").map(|v| str_of(v, &format!("{path}.service"))).transpose()?;
            let file = m.get("file").map(|v| str_of(v, &format!("{path}.file"))).transpose()?;
            (base.ok_or_else(|| ManifestError::at(&path, "needs service"))?, file)
        }
        _ => return Err(ManifestError::at(&path, "must be a service name or a mapping")),
    };
    let base = match file {
        None => {
            let b = services
                .get(base_name.as_str())
                .ok_or_else(|| ManifestError::at(&path, format!("no service {base_name:?} in this file")))?;
            extended(cx, services, &base_name, b, depth + 1)?
        }
        Some(f) => {
            let p = cx.dir.join(&f);
            let text =
                (cx.read_file)(&p).map_err(|e| ManifestError::at(&path, format!("reading {}: {e}", p.display())))?;
            let mut other: Value =
                serde_norway::from_str(&text).map_err(|e| ManifestError::at(&path, format!("{}: {e}", p.display())))?;
            other.apply_merge().map_err(|e| ManifestError::at(&path, format!("{}: {e}", p.display())))?;
            interpolate_all(&mut other, "", cx.env)?;
            let others = other
                .get("services")
                .and_then(Value::as_mapping)
                .cloned()
                .ok_or_else(|| ManifestError::at(&path, format!("{} has no services", p.display())))?;
            let b = others
                .get(base_name.as_str())
                .ok_or_else(|| ManifestError::at(&path, format!("no service {base_name:?} in {}", p.display())))?;
            extended(cx, &others, &base_name, b, depth + 1)?
        }
    };
    let mut out = base;
    if let Some(m) = out.as_mapping_mut() {
        m.remove("extends");
    }
    let mut own = svc.clone();
    if let Some(m) = own.as_mapping_mut() {
        m.remove("extends");
    }
    merge_into(&mut out, own, "");
    untag(&mut out);
    Ok(out)
}

/// Compose's merge tags: `!reset` (the value is dropped: back to the default) and
/// `!override` (it replaces the base's instead of merging with it).
fn tagged(v: &Value) -> Option<(&str, &Value)> {
    let Value::Tagged(t) = v else { return None };
    ["reset", "override"].into_iter().find(|n| t.tag == *n).map(|n| (n, &t.value))
}

/// What is left of the merge tags once merged: a `!reset` key is dropped, an `!override`
/// is its value.
fn untag(v: &mut Value) {
    match v {
        Value::Mapping(m) => {
            m.retain(|_, x| tagged(x).is_none_or(|(n, _)| n != "reset"));
            for (_, x) in m.iter_mut() {
                if let Some((_, inner)) = tagged(x) {
                    *x = inner.clone();
                }
                untag(x);
            }
        }
        Value::Sequence(s) => s.iter_mut().for_each(untag),
        _ => {}
    }
}

fn merge_into(base: &mut Value, over: Value, key: &str) {
    match (base, over) {
        (Value::Mapping(b), Value::Mapping(o)) => {
            for (k, v) in o {
                let name = k.as_str().unwrap_or_default().to_string();
                match tagged(&v) {
                    Some(("reset", _)) => {
                        b.remove(&k);
                        continue;
                    }
                    Some((_, inner)) => {
                        b.insert(k, inner.clone());
                        continue;
                    }
                    None => {}
                }
                match b.get_mut(&k) {
                    Some(existing) => merge_into(existing, v, &name),
                    None => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (Value::Sequence(b), Value::Sequence(o)) if !REPLACED_LISTS.contains(&key) => {
            for v in o {
                if !b.contains(&v) {
                    b.push(v);
                }
            }
        }
        (b, o) => *b = o,
    }
}

/// A macvlan network's `ipam.config[0]`: subnet, ip_range and gateway.
fn macvlan_ipam(cx: &mut Ctx<'_>, m: &mut skiff_model::Macvlan, v: &Value, path: &str) -> R<()> {
    for (k, x) in mapping(v, path)? {
        let key = key_str(k, path)?;
        let p = format!("{path}.{key}");
        match key.as_str() {
            "config" => {
                let list = x.as_sequence().ok_or_else(|| ManifestError::at(&p, "must be a list"))?;
                for (i, c) in list.iter().enumerate() {
                    let cp = format!("{p}[{i}]");
                    if i > 0 {
                        cx.warnings.push(format!("{cp}: only the first subnet is used"));
                        continue;
                    }
                    for (ck, cv) in mapping(c, &cp)? {
                        let ckey = key_str(ck, &cp)?;
                        let vp = format!("{cp}.{ckey}");
                        match ckey.as_str() {
                            "subnet" => m.subnet = Some(str_of(cv, &vp)?),
                            "ip_range" => m.ip_range = Some(str_of(cv, &vp)?),
                            "gateway" => m.gateway = Some(str_of(cv, &vp)?),
                            _ => cx.warnings.push(format!("{vp}: not supported yet, ignored")),
                        }
                    }
                }
            }
            "driver" => {}
            _ => cx.warnings.push(format!("{p}: not supported yet, ignored")),
        }
    }
    Ok(())
}

/// A service's `networks:` (a list of keys, or a mapping of keys to their options): each
/// key, where it was written, and its `ipv4_address`.
fn service_networks(cx: &mut Ctx<'_>, v: &Value, path: &str) -> R<Vec<(String, String, Option<String>)>> {
    let mut keys = vec![];
    match v {
        Value::Sequence(s) => {
            for (i, x) in s.iter().enumerate() {
                let p = format!("{path}[{i}]");
                keys.push((str_of(x, &p)?, p, None));
            }
        }
        Value::Mapping(m) => {
            for (k, opts) in m {
                let key = key_str(k, path)?;
                let p = format!("{path}.{key}");
                let mut ip = None;
                match opts {
                    Value::Null => {}
                    Value::Mapping(om) => {
                        for (ok, ov) in om {
                            let okey = key_str(ok, &p)?;
                            match okey.as_str() {
                                "ipv4_address" => ip = Some(str_of(ov, &format!("{p}.{okey}"))?),
                                _ => cx.warnings.push(format!("{p}.{okey}: not supported yet, ignored")),
                            }
                        }
                    }
                    _ => return Err(ManifestError::at(&p, "must be a mapping")),
                }
                keys.push((key, p, ip));
            }
        }
        _ => return Err(ManifestError::at(path, "must be a list or a mapping")),
    }
    Ok(keys)
}

fn service(cx: &mut Ctx<'_>, project: &str, nets: &BTreeMap<String, Net>, name: &str, svc: &Value) -> R<Deployment> {
    let base = format!("services.{name}");
    let m = mapping(svc, &base)?;
    let mut d = Deployment::new(deployment_name(name), "");
    d.stack = project.to_string();
    let mut net_keys = vec![];
    let mut image = None;
    let mut env_files = vec![];
    let mut env = BTreeMap::new();
    let mut build = None;
    for (k, v) in m {
        let key = key_str(k, &base)?;
        let path = format!("{base}.{key}");
        match key.as_str() {
            "image" => image = Some(str_of(v, &path)?),
            "build" => build = Some(build_spec(cx, v, &path)?),
            "command" => d.command = Some(argv(v, &path)?),
            "entrypoint" => d.entrypoint = Some(argv(v, &path)?),
            "environment" => key_values(cx, v, &path, &mut env)?,
            "env_file" => match v {
                Value::Sequence(s) => {
                    for (i, x) in s.iter().enumerate() {
                        let p = format!("{path}[{i}]");
                        let (f, required) = match x {
                            Value::Mapping(fm) => (
                                fm.get("path")
                                    .map(|p2| str_of(p2, &p))
                                    .transpose()?
                                    .ok_or_else(|| ManifestError::at(&p, "needs a path"))?,
                                fm.get("required")
                                    .map(|r| bool_of(r, &format!("{p}.required")))
                                    .transpose()?
                                    .unwrap_or(true),
                            ),
                            other => (str_of(other, &p)?, true),
                        };
                        env_files.push((f, p, required));
                    }
                }
                other => env_files.push((str_of(other, &path)?, path.clone(), true)),
            },
            "ports" => {
                let s = v.as_sequence().ok_or_else(|| ManifestError::at(&path, "must be a list"))?;
                for (i, p) in s.iter().enumerate() {
                    let at = format!("{path}[{i}]");
                    let (mapping, range) = port(p, &at)?;
                    if let Some(r) = range {
                        cx.warnings.push(format!(
                            "{at}: host ports {r}: the first, {}, is published (every instance on a node shares it)",
                            mapping.host_port
                        ));
                    }
                    d.ports.push(mapping);
                }
            }
            "expose" => {
                let s = v.as_sequence().ok_or_else(|| ManifestError::at(&path, "must be a list"))?;
                for (i, x) in s.iter().enumerate() {
                    let p = format!("{path}[{i}]");
                    for port in exposed(x, &p)? {
                        if !d.expose.contains(&port) {
                            d.expose.push(port);
                        }
                    }
                }
            }
            "volumes" => {
                let s = v.as_sequence().ok_or_else(|| ManifestError::at(&path, "must be a list"))?;
                for (i, x) in s.iter().enumerate() {
                    let p = format!("{path}[{i}]");
                    let is_tmpfs = x.as_mapping().and_then(|m| m.get("type")).and_then(Value::as_str) == Some("tmpfs");
                    if is_tmpfs {
                        d.tmpfs.push(tmpfs_volume(x, &p)?);
                    } else {
                        d.volumes.push(volume(cx, x, &p)?);
                    }
                }
            }
            "tmpfs" => {
                for (i, t) in one_or_many(v, &path)?.iter().enumerate() {
                    d.tmpfs.push(tmpfs_short(t, &format!("{path}[{i}]"))?);
                }
            }
            "restart" => {
                let s = str_of(v, &path)?;
                d.restart = RestartPolicy::parse(&s).ok_or_else(|| {
                    ManifestError::at(
                        &path,
                        format!("{s:?} is not a restart policy (no, always, on-failure[:N], unless-stopped)"),
                    )
                })?;
            }
            "deploy" => deploy(cx, &mut d, v, &path)?,
            "cpu_shares" => {
                d.resources.cpu_shares =
                    Some(int(v, &path)?.try_into().map_err(|_| ManifestError::at(&path, "must be positive"))?)
            }
            "cpus" => d.resources.cpus_millis = Some(cpus(v, &path)?),
            "mem_limit" => d.resources.memory_bytes = Some(bytes(v, &path)?),
            "mem_reservation" => d.resources.memory_reservation_bytes = Some(bytes(v, &path)?),
            "pids_limit" => d.resources.pids_limit = Some(int(v, &path)?),
            "healthcheck" => d.healthcheck = healthcheck(v, &path)?,
            "depends_on" => d.depends_on = depends_on(v, &path)?,
            "user" => d.user = Some(str_of(v, &path)?),
            "working_dir" => d.working_dir = Some(str_of(v, &path)?),
            "hostname" => d.hostname = Some(str_of(v, &path)?),
            "read_only" => d.read_only = bool_of(v, &path)?,
            "tty" => d.tty = bool_of(v, &path)?,
            "stdin_open" => d.stdin_open = bool_of(v, &path)?,
            "cap_add" => d.cap_add = list_of_strings(v, &path)?,
            "cap_drop" => d.cap_drop = list_of_strings(v, &path)?,
            "devices" => {
                for (i, s) in list_of_strings(v, &path)?.iter().enumerate() {
                    // compose-spec: an entry may be a CDI device name.
                    if DeviceRequest::looks_like_cdi(s) {
                        let r = DeviceRequest::parse_cdi(s).ok_or_else(|| {
                            ManifestError::at(
                                format!("{path}[{i}]"),
                                format!("{s:?} is not a CDI device name (vendor.com/class=NAME)"),
                            )
                        })?;
                        d.device_requests.push(r);
                    } else {
                        d.devices.push(device(s, &format!("{path}[{i}]"))?);
                    }
                }
            }
            "labels" => key_values(cx, v, &path, &mut d.labels)?,
            "logging" => d.logging = logging(cx, v, &path)?,
            "network_mode" => {
                let s = str_of(v, &path)?;
                if let Some(other) = s.strip_prefix("service:") {
                    d.network = NetworkMode::Service;
                    d.network_service = Some(deployment_name(other));
                } else if s.starts_with("container:") {
                    return Err(ManifestError::at(
                        &path,
                        format!(
                            "{s:?}: a container outside the file is not supported (name its service: service:NAME)"
                        ),
                    ));
                } else {
                    d.network = short::network_mode(&s).map_err(|e| ManifestError::at(&path, e))?;
                }
            }
            "networks" => net_keys = service_networks(cx, v, &path)?,
            // Handled before: the service runs only with an active profile.
            "profiles" => {}
            "stop_grace_period" => d.stop_grace_period_ms = duration(v, &path)?,
            "sysctls" => key_values(cx, v, &path, &mut d.sysctls)?,
            "ulimits" => d.ulimits = ulimits(v, &path)?,
            "shm_size" => d.shm_size_bytes = Some(bytes(v, &path)?),
            "init" => d.init = bool_of(v, &path)?,
            "extra_hosts" => d.extra_hosts = extra_hosts(v, &path)?,
            "dns" => d.dns.servers = one_or_many(v, &path)?,
            "dns_search" => d.dns.search = one_or_many(v, &path)?,
            "dns_opt" => d.dns.options = list_of_strings(v, &path)?,
            "x-skiff-autoscale" => d.autoscale = Some(crate::hpa::spec(v, &path)?),
            "x-skiff-signature" => d.signature = Some(signature(cx, v, &path)?),
            "runtime" | "x-skiff-runtime" => d.runtime = crate::runtime_named(&str_of(v, &path)?, &path)?,
            // Docker+Wasm marks a WASI service by its platform; others follow the node.
            "platform" => {
                let p = str_of(v, &path)?;
                match p.split_once('/') {
                    Some((os, "wasm")) if os.starts_with("wasi") => d.runtime = skiff_model::RuntimeKind::Wasm,
                    _ => cx.warnings.push(format!(
                        "{path}: {p:?} ignored (only wasi/wasm is read: it selects the wasm runtime; \
                         containers run as the node's platform)"
                    )),
                }
            }
            "x-skiff-wasm" => d.wasm = wasm_options(cx, v, &path)?,
            "secrets" | "configs" => service_files(cx, &mut d, key == "secrets", v, &path)?,
            k if k.starts_with("x-") => {}
            _ => cx.warnings.push(format!("{path}: not supported yet, ignored")),
        }
    }
    for (f, p, required) in env_files {
        let mut from_file = BTreeMap::new();
        // `required: false`: a missing file is no error (any other failure still is).
        if !required && (cx.read_file)(&cx.dir.join(&f)).is_err_and(|e| e.kind() == std::io::ErrorKind::NotFound) {
            continue;
        }
        env_file(cx, &f, &p, &mut from_file)?;
        for (k, v) in from_file {
            env.entry(k).or_insert(v); // `environment:` wins over env_file
        }
    }
    d.env = env;
    // A service with both runs its image (pulled, or built by `skiff build`); one with a
    // build only runs what is built, under the name compose gives it.
    let build_only = image.is_none();
    d.image =
        match (image, &build) {
            (Some(i), _) => i,
            (None, Some(_)) => format!("localhost/{project}-{}:latest", d.name),
            // Compose runs a provider service by a plugin of that name (`docker model`, a
            // cloud's), which it refuses without; skiff has none.
            (None, None) if m.contains_key("provider") => return Err(ManifestError::at(
                format!("{base}.provider"),
                "a provider service is run by a compose plugin, which skiff does not have; give the service an image",
            )),
            (None, None) => return Err(ManifestError::at(format!("{base}.image"), "is required")),
        };
    if let Some(b) = build {
        if !build_only {
            cx.warnings.push(format!("{base}.build: the image {} is pulled as it is (skiff build builds it)", d.image));
        }
        cx.builds.push(BuildSpec { service: name.to_string(), tag: d.image.clone(), build_only, ..b });
    }
    // Without `networks:` a service joins the project's default network, which the file
    // may rename or make external under `networks: default:`.
    let implicit = format!("{project}_default");
    let default = nets.get("default").map(|n| n.name.clone()).unwrap_or_else(|| implicit.clone());
    if net_keys.is_empty() && default != implicit {
        d.networks = vec![default.clone()];
    }
    let listed = net_keys.len();
    for (key, p, ip) in net_keys {
        let net = match nets.get(&key) {
            Some(n) => n,
            None if key == "default" => {
                if !d.networks.contains(&default) {
                    d.networks.push(default.clone());
                }
                continue;
            }
            None => return Err(ManifestError::at(p, format!("network {key:?} is not declared under networks"))),
        };
        if let Some(m) = &net.macvlan {
            if listed > 1 {
                return Err(ManifestError::at(
                    p,
                    "a macvlan network cannot be joined beside others (not supported yet)",
                ));
            }
            if d.network != NetworkMode::Bridge {
                return Err(ManifestError::at(p, "network_mode and networks cannot be combined"));
            }
            d.network = NetworkMode::Macvlan;
            d.macvlan = Some(skiff_model::Macvlan {
                ip: ip.clone(),
                ip_range: if ip.is_some() { None } else { m.ip_range.clone() },
                ..m.clone()
            });
            continue;
        }
        if ip.is_some() {
            cx.warnings.push(format!("{p}.ipv4_address: not supported yet on the bridge, ignored"));
        }
        if !d.networks.contains(&net.name) {
            d.networks.push(net.name.clone());
        }
    }
    // Scraped for the autoscaler's own metrics as Prometheus' labels ask.
    let ports: Vec<u16> = d.ports.iter().map(|p| p.container_port).chain(d.expose.iter().map(|p| p.target)).collect();
    d.scrape = skiff_model::metrics::Scrape::from_annotations(&d.labels, &ports)
        .map_err(|(k, e)| ManifestError::at(format!("{base}.labels.{k}"), e))?;
    d.validate().map_err(|e| ManifestError::at(format!("{base}.{}", e.field), e.problem))?;
    Ok(d)
}

/// A service's `build:`: a context directory or Git URL, or `context`, `dockerfile`,
/// `dockerfile_inline`, `args` and `target` (other keys warned about).
fn build_spec(cx: &mut Ctx<'_>, v: &Value, path: &str) -> R<BuildSpec> {
    let mut b = BuildSpec {
        service: String::new(),
        tag: String::new(),
        build_only: false,
        context: cx.dir.to_path_buf(),
        remote: None,
        dockerfile: None,
        dockerfile_inline: None,
        args: BTreeMap::new(),
        target: None,
    };
    let mut context = None;
    match v {
        Value::Mapping(m) => {
            for (k, x) in m {
                let key = key_str(k, path)?;
                let p = format!("{path}.{key}");
                match key.as_str() {
                    "context" => context = Some(str_of(x, &p)?),
                    "dockerfile" => b.dockerfile = Some(str_of(x, &p)?),
                    "dockerfile_inline" => b.dockerfile_inline = Some(str_of(x, &p)?),
                    "args" => key_values(cx, x, &p, &mut b.args)?,
                    "target" => b.target = Some(str_of(x, &p)?),
                    _ => cx.warnings.push(format!("{p}: not supported yet, ignored")),
                }
            }
        }
        other => context = Some(str_of(other, path)?),
    }
    if let Some(c) = context {
        match GitContext::parse(&c) {
            Some(g) => b.remote = Some(g.map_err(|e| ManifestError::at(path, format!("{c:?}: {e}")))?),
            None => b.context = PathBuf::from(short::normalize(&cx.dir.join(&c))),
        }
    }
    if b.dockerfile.is_some() && b.dockerfile_inline.is_some() {
        return Err(ManifestError::at(path, "dockerfile and dockerfile_inline exclude each other"));
    }
    Ok(b)
}

/// Top-level `secrets:` or `configs:`: each from a `file` (relative to the compose file),
/// an `environment` variable, a config's `content`, or `external`.
fn top_level_files(cx: &mut Ctx<'_>, secret: bool, v: &Value) -> R<()> {
    let what = if secret { "secrets" } else { "configs" };
    for (k, def) in mapping(v, what)? {
        let name = key_str(k, what)?;
        let p = format!("{what}.{name}");
        let m = mapping(def, &p)?;
        let get = |key: &str| m.get(key).map(|x| str_of(x, &format!("{p}.{key}"))).transpose();
        let content = if let Some(f) = get("file")? {
            let at = short::normalize(&cx.dir.join(&f));
            let text = (cx.read_file)(Path::new(&at))
                .map_err(|e| ManifestError::at(format!("{p}.file"), format!("reading {at}: {e}")))?;
            Some(text.into_bytes())
        } else if let Some(var) = get("environment")? {
            let value = (cx.env)(&var)
                .ok_or_else(|| ManifestError::at(format!("{p}.environment"), format!("{var} is not set")))?;
            Some(value.into_bytes())
        } else if let (Some(c), false) = (get("content")?, secret) {
            Some(c.into_bytes())
        } else if m.get("external").is_some_and(|x| bool_of(x, &format!("{p}.external")).unwrap_or(false)) {
            None
        } else {
            let from = if secret { "file or environment" } else { "file, environment or content" };
            return Err(ManifestError::at(p, format!("needs {from} (or external: true)")));
        };
        cx.given.insert((secret, name), content);
    }
    Ok(())
}

/// A service's `secrets:` or `configs:`, short (`- name`) or long (`source`, `target`,
/// `mode`; `uid`/`gid` warned about): each one file, read-only, at `/run/secrets/NAME`
/// (a secret) or `/NAME` (a config) unless `target` says where; mode 0444.
fn service_files(cx: &mut Ctx<'_>, d: &mut Deployment, secret: bool, v: &Value, path: &str) -> R<()> {
    let s = v.as_sequence().ok_or_else(|| ManifestError::at(path, "must be a list"))?;
    for (i, x) in s.iter().enumerate() {
        let p = format!("{path}[{i}]");
        let (source, target, mode) = match x {
            Value::Mapping(m) => {
                for k in m.keys().filter_map(Value::as_str) {
                    match k {
                        "source" | "target" | "mode" => {}
                        other => cx.warnings.push(format!("{p}.{other}: not supported yet, ignored")),
                    }
                }
                let get = |key: &str| m.get(key).map(|y| str_of(y, &format!("{p}.{key}"))).transpose();
                let source = get("source")?.ok_or_else(|| ManifestError::at(&p, "needs source"))?;
                let mode = match m.get("mode") {
                    Some(y) => {
                        let text =
                            scalar(y).ok_or_else(|| ManifestError::at(format!("{p}.mode"), "must be a number"))?;
                        crate::file_mode(&text).ok_or_else(|| {
                            ManifestError::at(format!("{p}.mode"), format!("{text:?} is not a file mode"))
                        })?
                    }
                    None => 0o444,
                };
                (source, get("target")?, mode)
            }
            other => (str_of(other, &p)?, None, 0o444),
        };
        let content = match cx.given.get(&(secret, source.clone())) {
            Some(Some(c)) => c.clone(),
            Some(None) => {
                cx.warnings.push(format!("{p}: {source:?} is external (kept elsewhere); not mounted"));
                continue;
            }
            None => {
                let what = if secret { "secrets" } else { "configs" };
                return Err(ManifestError::at(p, format!("{source:?} is not declared under the top-level {what}")));
            }
        };
        let target = match target {
            Some(t) if t.starts_with('/') => t,
            Some(t) if secret => format!("/run/secrets/{t}"),
            Some(t) => format!("/{t}"),
            None if secret => format!("/run/secrets/{source}"),
            None => format!("/{source}"),
        };
        let file = skiff_model::options::MountedFile::new("", &content, mode);
        d.files.push(skiff_model::options::FileMount { target, files: vec![file], secret });
    }
    Ok(())
}

/// A string or a list of strings (`dns: 8.8.8.8`, `dns: [8.8.8.8, 9.9.9.9]`).
fn one_or_many(v: &Value, path: &str) -> R<Vec<String>> {
    match v {
        Value::Sequence(_) => list_of_strings(v, path),
        other => Ok(vec![str_of(other, path)?]),
    }
}

/// `ulimits: {nproc: 65535, nofile: {soft: 20000, hard: 40000}}`.
fn ulimits(v: &Value, path: &str) -> R<BTreeMap<String, skiff_model::options::Ulimit>> {
    let value = |x: &Value, p: &str| -> R<u64> {
        let text = scalar(x).ok_or_else(|| ManifestError::at(p, "must be a number"))?;
        skiff_model::options::Ulimit::value(&text).map_err(|e| ManifestError::at(p, e))
    };
    let mut out = BTreeMap::new();
    for (k, x) in mapping(v, path)? {
        let name = key_str(k, path)?;
        let p = format!("{path}.{name}");
        let u = match x {
            Value::Mapping(m) => {
                let get = |key: &str| {
                    m.get(key)
                        .map(|y| value(y, &format!("{p}.{key}")))
                        .transpose()?
                        .ok_or_else(|| ManifestError::at(&p, format!("needs {key}")))
                };
                skiff_model::options::Ulimit { soft: get("soft")?, hard: get("hard")? }
            }
            other => {
                let n = value(other, &p)?;
                skiff_model::options::Ulimit { soft: n, hard: n }
            }
        };
        out.insert(name, u);
    }
    Ok(out)
}

/// `extra_hosts`: a list of `HOST:IP` / `HOST=IP`, or a mapping of host to address (or a
/// list of addresses).
fn extra_hosts(v: &Value, path: &str) -> R<Vec<skiff_model::options::ExtraHost>> {
    use skiff_model::options::ExtraHost;
    match v {
        Value::Sequence(_) => list_of_strings(v, path)?
            .iter()
            .enumerate()
            .map(|(i, s)| ExtraHost::parse(s).map_err(|e| ManifestError::at(format!("{path}[{i}]"), e)))
            .collect(),
        Value::Mapping(m) => {
            let mut out = vec![];
            for (k, x) in m {
                let host = key_str(k, path)?;
                let p = format!("{path}.{host}");
                for ip in one_or_many(x, &p)? {
                    let ip = ip.trim_start_matches('[').trim_end_matches(']').to_string();
                    out.push(ExtraHost { host: host.clone(), ip });
                }
            }
            Ok(out)
        }
        _ => Err(ManifestError::at(path, "must be a list of HOST:IP or a mapping")),
    }
}

/// One `ports` entry, and the host port range it named (`"6005-6015:80"`: Docker picks a
/// free one of the range per container; here the first is published).
fn port(v: &Value, path: &str) -> R<(PortMapping, Option<String>)> {
    match v {
        Value::Mapping(m) => {
            let mut target = None;
            let mut published = None;
            let mut host_ip = None;
            let mut protocol = Protocol::Tcp;
            for (k, x) in m {
                let k = key_str(k, path)?;
                let p = format!("{path}.{k}");
                match k.as_str() {
                    "target" => target = Some(int(x, &p)?),
                    "published" => published = Some(int(x, &p)?),
                    "host_ip" => host_ip = Some(str_of(x, &p)?),
                    "protocol" => {
                        protocol = match str_of(x, &p)?.as_str() {
                            "tcp" => Protocol::Tcp,
                            "udp" => Protocol::Udp,
                            o => return Err(ManifestError::at(&p, format!("{o:?} is not tcp or udp"))),
                        }
                    }
                    "mode" | "name" | "app_protocol" => {}
                    _ => return Err(ManifestError::at(&p, "unknown port key")),
                }
            }
            let target = target.ok_or_else(|| ManifestError::at(path, "needs target"))?;
            let published = published.unwrap_or(target);
            let ok = |n: i64| (1..=65535).contains(&n);
            if !ok(target) || !ok(published) {
                return Err(ManifestError::at(path, "ports must be between 1 and 65535"));
            }
            Ok((PortMapping { host_ip, host_port: published as u16, container_port: target as u16, protocol }, None))
        }
        other => {
            let s = str_of(other, path)?;
            let bad = || {
                ManifestError::at(path, format!("{s:?} is not a port mapping (examples: 8080:80, 127.0.0.1:53:53/udp)"))
            };
            if let Some(m) = PortMapping::parse(&s) {
                return Ok((m, None));
            }
            // A host range to one container port: `[IP:]A-B:C[/proto]`.
            let (spec, proto) = s.rsplit_once('/').map_or((s.as_str(), None), |(a, p)| (a, Some(p)));
            let (head, container) = spec.rsplit_once(':').ok_or_else(bad)?;
            let (ip, range) = head.rsplit_once(':').map_or((None, head), |(ip, r)| (Some(ip), r));
            let (a, b) = range.split_once('-').ok_or_else(bad)?;
            let (first, last) = (a.parse::<u16>().map_err(|_| bad())?, b.parse::<u16>().map_err(|_| bad())?);
            if first == 0 || last < first {
                return Err(bad());
            }
            let one = format!(
                "{}{first}:{container}{}",
                ip.map(|i| format!("{i}:")).unwrap_or_default(),
                proto.map(|p| format!("/{p}")).unwrap_or_default()
            );
            let m = PortMapping::parse(&one).ok_or_else(bad)?;
            Ok((m, Some(range.to_string())))
        }
    }
}

/// `tmpfs:` entries: `/run` or `/run:size=64m,mode=1777` (options as `mount -t tmpfs`).
fn tmpfs_short(s: &str, path: &str) -> R<skiff_model::Tmpfs> {
    let (target, opts) = s.split_once(':').unwrap_or((s, ""));
    let mut t = skiff_model::Tmpfs { target: target.to_string(), size_bytes: None, mode: None };
    for o in opts.split(',').filter(|o| !o.is_empty()) {
        match o.split_once('=') {
            Some(("size", v)) => {
                t.size_bytes = Some(parse_bytes(v).map_err(|e| ManifestError::at(path, e.to_string()))?);
            }
            Some(("mode", v)) => {
                t.mode = Some(
                    u32::from_str_radix(v, 8)
                        .map_err(|_| ManifestError::at(path, format!("mode {v:?} is not octal")))?,
                );
            }
            // Mount flags Docker passes through (noexec, uid=...): the defaults are kept.
            _ => {}
        }
    }
    Ok(t)
}

/// A volume of `type: tmpfs`: `target`, and `tmpfs: {size, mode}`.
fn tmpfs_volume(v: &Value, path: &str) -> R<skiff_model::Tmpfs> {
    let m = mapping(v, path)?;
    let target = m
        .get("target")
        .map(|x| str_of(x, &format!("{path}.target")))
        .transpose()?
        .ok_or_else(|| ManifestError::at(path, "needs target"))?;
    let mut t = skiff_model::Tmpfs { target, size_bytes: None, mode: None };
    if let Some(o) = m.get("tmpfs") {
        let om = mapping(o, &format!("{path}.tmpfs"))?;
        if let Some(size) = om.get("size") {
            t.size_bytes = Some(bytes(size, &format!("{path}.tmpfs.size"))?);
        }
        if let Some(mode) = om.get("mode") {
            let p = format!("{path}.tmpfs.mode");
            // Written as 1777 (read as octal, as Docker does) or as a number.
            let text = scalar(mode).ok_or_else(|| ManifestError::at(&p, "must be a number"))?;
            t.mode = Some(
                u32::from_str_radix(&text, 8).map_err(|_| ManifestError::at(&p, format!("{text:?} is not octal")))?,
            );
        }
    }
    Ok(t)
}

fn volume(cx: &Ctx<'_>, v: &Value, path: &str) -> R<Volume> {
    let home = (cx.env)("HOME").map(PathBuf::from);
    match v {
        Value::Mapping(m) => {
            let get = |k: &str| m.get(k).map(|x| str_of(x, &format!("{path}.{k}"))).transpose();
            let kind = get("type")?.unwrap_or_else(|| "volume".into());
            let target = get("target")?.ok_or_else(|| ManifestError::at(path, "needs target"))?;
            let source = get("source")?;
            let read_only =
                m.get("read_only").map(|x| bool_of(x, &format!("{path}.read_only"))).transpose()?.unwrap_or(false);
            let source = match (kind.as_str(), source) {
                ("bind", Some(s)) => match short::volume_source(&s, cx.dir, home.as_deref())
                    .map_err(|e| ManifestError::at(format!("{path}.source"), e))?
                {
                    VolumeSource::Named { name } => VolumeSource::Bind { path: short::normalize(&cx.dir.join(name)) },
                    b => b,
                },
                ("volume", Some(s)) => VolumeSource::Named { name: s },
                ("volume", None) => VolumeSource::Anonymous,
                ("bind", None) => return Err(ManifestError::at(path, "needs source")),
                (other, _) => {
                    return Err(ManifestError::at(
                        format!("{path}.type"),
                        format!("{other:?} is not supported (bind, volume)"),
                    ))
                }
            };
            Ok(Volume { source, target, read_only })
        }
        other => {
            let s = str_of(other, path)?;
            short::volume(&s, cx.dir, home.as_deref()).map_err(|e| ManifestError::at(path, e))
        }
    }
}

/// `deploy.resources.reservations.devices[i]`: `device_ids` naming CDI devices
/// (`nvidia.com/gpu=0`, or bare ids of the driver's kind), or a `count` (`all`, the
/// default) of the kind `driver` / `capabilities` name (`nvidia`, `gpu`: nvidia.com/gpu;
/// `cdi` needs qualified ids).
fn device_reservation(cx: &mut Ctx<'_>, v: &Value, path: &str) -> R<Vec<DeviceRequest>> {
    let m = mapping(v, path)?;
    let mut driver = None;
    let mut caps = vec![];
    let mut ids = vec![];
    let mut count = None;
    for (k, x) in m {
        let k = key_str(k, path)?;
        let p = format!("{path}.{k}");
        match k.as_str() {
            "driver" => driver = Some(str_of(x, &p)?),
            "capabilities" => caps = list_of_strings(x, &p)?,
            "device_ids" => ids = list_of_strings(x, &p)?,
            "count" => {
                count = Some(match x.as_str() {
                    Some("all") => 0,
                    _ => u32::try_from(int(x, &p)?)
                        .ok()
                        .filter(|n| *n > 0)
                        .ok_or_else(|| ManifestError::at(&p, "must be all or a number of 1 or more"))?,
                })
            }
            _ => cx.warnings.push(format!("{p}: not supported yet, ignored")),
        }
    }
    if count.is_some() && !ids.is_empty() {
        return Err(ManifestError::at(path, "count and device_ids exclude each other"));
    }
    let kind = match (driver.as_deref(), caps.iter().any(|c| c == "gpu")) {
        (Some("nvidia"), _) | (None, true) => Some(skiff_model::GPU_KIND.to_string()),
        (Some(k), _) if k.contains('/') => Some(k.to_string()),
        _ => None,
    };
    let mut out = vec![];
    for (i, id) in ids.iter().enumerate() {
        let p = format!("{path}.device_ids[{i}]");
        let r = if id.contains('=') {
            DeviceRequest::parse_cdi(id)
        } else {
            kind.as_ref().map(|k| DeviceRequest { kind: k.clone(), ids: vec![id.clone()], count: 0 })
        };
        out.push(r.ok_or_else(|| {
            ManifestError::at(
                &p,
                format!("{id:?} is not a CDI device name (vendor.com/class=NAME), and no driver names its kind"),
            )
        })?);
    }
    if ids.is_empty() {
        let kind = kind.ok_or_else(|| {
            ManifestError::at(path, "names no device kind: give capabilities: [gpu], driver: nvidia, or CDI device_ids")
        })?;
        out.push(DeviceRequest { kind, ids: vec![], count: count.unwrap_or(0) });
    }
    for r in &out {
        r.check().map_err(|e| ManifestError::at(path, e))?;
    }
    Ok(out)
}

fn device(s: &str, path: &str) -> R<DeviceMapping> {
    DeviceMapping::parse(s).ok_or_else(|| ManifestError::at(path, format!("{s:?} is not HOST[:CONTAINER[:rwm]]")))
}

fn healthcheck(v: &Value, path: &str) -> R<Option<HealthCheck>> {
    let m = mapping(v, path)?;
    if let Some(dis) = m.get("disable") {
        if bool_of(dis, &format!("{path}.disable"))? {
            return Ok(None);
        }
    }
    let mut hc = HealthCheck {
        test: vec![],
        shell: false,
        interval_ms: 30_000,
        timeout_ms: 30_000,
        retries: 3,
        start_period_ms: 0,
    };
    for (k, x) in m {
        let k = key_str(k, path)?;
        let p = format!("{path}.{k}");
        match k.as_str() {
            "test" => match x {
                Value::String(s) => {
                    hc.test = vec![s.clone()];
                    hc.shell = true;
                }
                Value::Sequence(_) => {
                    let l = list_of_strings(x, &p)?;
                    match l.first().map(String::as_str) {
                        Some("NONE") => return Ok(None),
                        Some("CMD") => hc.test = l[1..].to_vec(),
                        Some("CMD-SHELL") => {
                            hc.test = vec![l[1..].join(" ")];
                            hc.shell = true;
                        }
                        _ => return Err(ManifestError::at(&p, "a list must start with CMD, CMD-SHELL or NONE")),
                    }
                }
                _ => return Err(ManifestError::at(&p, "must be a string or a list")),
            },
            "interval" => hc.interval_ms = duration(x, &p)?,
            "timeout" => hc.timeout_ms = duration(x, &p)?,
            "start_period" => hc.start_period_ms = duration(x, &p)?,
            // Accepted; checks in the start period run at `interval`.
            "start_interval" => {
                duration(x, &p)?;
            }
            "retries" => hc.retries = int(x, &p)?.try_into().map_err(|_| ManifestError::at(&p, "must be 0 or more"))?,
            "disable" => {}
            _ => return Err(ManifestError::at(&p, "unknown healthcheck key")),
        }
    }
    if hc.test.is_empty() {
        return Err(ManifestError::at(format!("{path}.test"), "is required"));
    }
    Ok(Some(hc))
}

fn depends_on(v: &Value, path: &str) -> R<Vec<Dependency>> {
    match v {
        Value::Sequence(_) => Ok(list_of_strings(v, path)?
            .into_iter()
            .map(|name| Dependency { name: deployment_name(&name), condition: DependencyCondition::ServiceStarted })
            .collect()),
        Value::Mapping(m) => {
            let mut out = vec![];
            for (k, x) in m {
                let name = key_str(k, path)?;
                let p = format!("{path}.{name}");
                let mut condition = DependencyCondition::ServiceStarted;
                if let Some(c) = mapping(x, &p)?.get("condition") {
                    condition = match str_of(c, &format!("{p}.condition"))?.as_str() {
                        "service_started" => DependencyCondition::ServiceStarted,
                        "service_healthy" => DependencyCondition::ServiceHealthy,
                        "service_completed_successfully" => DependencyCondition::ServiceCompletedSuccessfully,
                        o => {
                            return Err(ManifestError::at(
                                format!("{p}.condition"),
                                format!("{o:?} is not a condition"),
                            ))
                        }
                    };
                }
                out.push(Dependency { name: deployment_name(&name), condition });
            }
            Ok(out)
        }
        _ => Err(ManifestError::at(path, "must be a list or a mapping")),
    }
}

fn deploy(cx: &mut Ctx<'_>, d: &mut Deployment, v: &Value, path: &str) -> R<()> {
    for (k, x) in mapping(v, path)? {
        let k = key_str(k, path)?;
        let p = format!("{path}.{k}");
        match k.as_str() {
            "replicas" => {
                let n = int(x, &p)?;
                d.replicas = u32::try_from(n).map_err(|_| ManifestError::at(&p, format!("{n} must be 0 or more")))?;
            }
            "resources" => {
                for (rk, rv) in mapping(x, &p)? {
                    let rk = key_str(rk, &p)?;
                    let rp = format!("{p}.{rk}");
                    let reservations = match rk.as_str() {
                        "limits" => false,
                        "reservations" => true,
                        _ => {
                            cx.warnings.push(format!("{rp}: not supported yet, ignored"));
                            continue;
                        }
                    };
                    for (lk, lv) in mapping(rv, &rp)? {
                        let lk = key_str(lk, &rp)?;
                        let lp = format!("{rp}.{lk}");
                        match (lk.as_str(), reservations) {
                            ("cpus", false) => d.resources.cpus_millis = Some(cpus(lv, &lp)?),
                            ("cpus", true) => d.resources.cpus_reservation_millis = Some(cpus(lv, &lp)?),
                            ("memory", false) => d.resources.memory_bytes = Some(bytes(lv, &lp)?),
                            ("memory", true) => d.resources.memory_reservation_bytes = Some(bytes(lv, &lp)?),
                            ("pids", false) => d.resources.pids_limit = Some(int(lv, &lp)?),
                            ("devices", true) => {
                                let list = lv.as_sequence().ok_or_else(|| ManifestError::at(&lp, "must be a list"))?;
                                for (i, dv) in list.iter().enumerate() {
                                    d.device_requests.extend(device_reservation(cx, dv, &format!("{lp}[{i}]"))?);
                                }
                            }
                            _ => cx.warnings.push(format!("{lp}: not supported yet, ignored")),
                        }
                    }
                }
            }
            "restart_policy" => {
                let m = mapping(x, &p)?;
                let cond = m
                    .get("condition")
                    .map(|c| str_of(c, &format!("{p}.condition")))
                    .transpose()?
                    .unwrap_or_else(|| "any".into());
                let max = m.get("max_attempts").map(|c| int(c, &format!("{p}.max_attempts"))).transpose()?;
                d.restart = match cond.as_str() {
                    "none" => RestartPolicy::No,
                    "any" => RestartPolicy::Always,
                    "on-failure" => RestartPolicy::OnFailure { max_retries: max.map(|n| n.max(0) as u32) },
                    o => {
                        return Err(ManifestError::at(
                            format!("{p}.condition"),
                            format!("{o:?} is not none, on-failure or any"),
                        ))
                    }
                };
                for (rk, _) in m {
                    let rk = key_str(rk, &p)?;
                    if rk != "condition" && rk != "max_attempts" {
                        cx.warnings.push(format!("{p}.{rk}: not supported yet, ignored"));
                    }
                }
            }
            "labels" => key_values(cx, x, &p, &mut d.labels)?,
            "mode" => {
                d.placement.mode = match str_of(x, &p)?.as_str() {
                    "replicated" => PlacementMode::Replicated,
                    "global" => PlacementMode::Global,
                    o => return Err(ManifestError::at(&p, format!("{o:?} is not replicated or global"))),
                }
            }
            "placement" => placement(cx, d, x, &p)?,
            "x-skiff-reschedule-after" => d.placement.reschedule_after_ms = Some(duration(x, &p)?),
            "update_config" => update_config(cx, d, x, &p)?,
            _ => cx.warnings.push(format!("{p}: not supported yet, ignored")),
        }
    }
    Ok(())
}

/// `deploy.update_config` as Docker applies it (parallelism 1, stop-first unless said),
/// with skiff's `x-skiff-strategy` (rolling, blue-green, recreate), `x-skiff-node-strategy`
/// and `x-skiff-rollback-window`.
fn update_config(cx: &mut Ctx<'_>, d: &mut Deployment, v: &Value, path: &str) -> R<()> {
    use skiff_model::rollout::{FailureAction, IntOrPercent, NodeStrategy, Strategy};
    let u = &mut d.update;
    let (mut parallelism, mut start_first) = (1i64, false);
    for (k, x) in mapping(v, path)? {
        let k = key_str(k, path)?;
        let p = format!("{path}.{k}");
        let word = |x: &Value| str_of(x, &p);
        match k.as_str() {
            "parallelism" => {
                parallelism = int(x, &p)?;
                if parallelism < 0 {
                    return Err(ManifestError::at(&p, format!("{parallelism} must be 0 (all at once) or more")));
                }
            }
            "delay" => u.delay_ms = duration(x, &p)?,
            "monitor" => u.monitor_ms = duration(x, &p)?,
            "order" => {
                start_first = match word(x)?.as_str() {
                    "start-first" => true,
                    "stop-first" => false,
                    o => return Err(ManifestError::at(&p, format!("{o:?} is not start-first or stop-first"))),
                }
            }
            "failure_action" => {
                u.failure_action = match word(x)?.as_str() {
                    "rollback" => FailureAction::Rollback,
                    "pause" => FailureAction::Pause,
                    "continue" => FailureAction::Continue,
                    o => return Err(ManifestError::at(&p, format!("{o:?} is not rollback, pause or continue"))),
                }
            }
            "max_failure_ratio" => {
                let r = word(x)?;
                u.max_failure_ratio = r
                    .parse::<f64>()
                    .ok()
                    .filter(|f| (0.0..=1.0).contains(f))
                    .ok_or_else(|| ManifestError::at(&p, format!("{r:?} is not a ratio between 0 and 1")))?;
            }
            "x-skiff-strategy" => {
                u.strategy = match word(x)?.as_str() {
                    "rolling" => Strategy::Rolling,
                    "blue-green" => Strategy::BlueGreen,
                    "recreate" => Strategy::Recreate,
                    o => return Err(ManifestError::at(&p, format!("{o:?} is not rolling, blue-green or recreate"))),
                }
            }
            "x-skiff-node-strategy" => {
                u.node_strategy = match word(x)?.as_str() {
                    "download-then-kill" => NodeStrategy::DownloadThenKill,
                    "kill-then-download" => NodeStrategy::KillThenDownload,
                    "delete-then-download" => NodeStrategy::DeleteThenDownload,
                    "hand-over" => NodeStrategy::HandOver,
                    o => {
                        return Err(ManifestError::at(
                            &p,
                            format!(
                            "{o:?} is not download-then-kill, kill-then-download, delete-then-download or hand-over"
                        ),
                        ))
                    }
                }
            }
            "x-skiff-rollback-window" => u.rollback_window_ms = duration(x, &p)?,
            "x-skiff-wave-size" | "x-skiff-wave-growth" => {
                let n = u32::try_from(int(x, &p)?)
                    .ok()
                    .filter(|n| *n >= 1)
                    .ok_or_else(|| ManifestError::at(&p, "must be a whole number of at least 1"))?;
                if k == "x-skiff-wave-size" {
                    u.wave_size = n
                } else {
                    u.wave_growth = n
                }
            }
            _ => cx.warnings.push(format!("{p}: not supported yet, ignored")),
        }
    }
    let batch = if parallelism == 0 { IntOrPercent::Percent(100) } else { IntOrPercent::Int(parallelism as u32) };
    (u.max_surge, u.max_unavailable) =
        if start_first { (batch, IntOrPercent::Int(0)) } else { (IntOrPercent::Int(0), batch) };
    Ok(())
}

/// One of Swarm's placement constraints as a node selector: `node.labels.KEY==V`, and the
/// node's own attributes under Kubernetes' well-known labels, which every node has
/// (`node.hostname` → `kubernetes.io/hostname`, `node.platform.arch` →
/// `kubernetes.io/arch` in Go's names, `node.platform.os` → `kubernetes.io/os`). Every
/// node is a worker: `node.role==worker` holds everywhere, `node.role==manager` is
/// warned about and ignored, as are `!=` and `node.id` constraints. `None`: nothing to
/// select on.
fn constraint(cx: &mut Ctx<'_>, c: &str, path: &str) -> R<Option<(String, String)>> {
    let ignored = |cx: &mut Ctx<'_>, why: &str| {
        cx.warnings.push(format!("{path}: {c:?} {why}, ignored"));
        Ok(None)
    };
    if c.contains("!=") {
        return ignored(cx, "is not supported yet (only ==)");
    }
    let Some((lhs, rhs)) = c.split_once("==") else {
        return Err(ManifestError::at(path, format!("{c:?} is not KEY==VALUE")));
    };
    let (lhs, rhs) = (lhs.trim(), rhs.trim().to_string());
    if let Some(key) = lhs.strip_prefix("node.labels.") {
        return Ok(Some((key.to_string(), rhs)));
    }
    match lhs {
        "node.hostname" => Ok(Some(("kubernetes.io/hostname".into(), rhs))),
        "node.platform.os" => Ok(Some(("kubernetes.io/os".into(), rhs.to_lowercase()))),
        "node.platform.arch" => {
            let arch = match rhs.as_str() {
                "x86_64" => "amd64",
                "aarch64" | "armv8" => "arm64",
                "armv7l" | "armv7" | "armhf" => "arm",
                other => other,
            };
            Ok(Some(("kubernetes.io/arch".into(), arch.to_string())))
        }
        "node.role" if rhs == "worker" => Ok(None),
        "node.role" => ignored(cx, "has no match (skiff's nodes are all workers; the hub is not a node)"),
        "node.id" | "engine.labels" => ignored(cx, "is not supported yet"),
        _ if lhs.starts_with("engine.labels.") => ignored(cx, "is not supported yet"),
        _ => Err(ManifestError::at(path, format!("{c:?}: {lhs:?} is not a placement attribute"))),
    }
}

/// `constraints: ["node.labels.site==factory-3"]` (see [`constraint`]) and
/// `preferences: [{spread: node.labels.site}]`.
fn placement(cx: &mut Ctx<'_>, d: &mut Deployment, v: &Value, path: &str) -> R<()> {
    for (k, x) in mapping(v, path)? {
        let k = key_str(k, path)?;
        let p = format!("{path}.{k}");
        match k.as_str() {
            "constraints" => {
                for (i, c) in list_of_strings(x, &p)?.iter().enumerate() {
                    let cp = format!("{p}[{i}]");
                    if let Some((key, value)) = constraint(cx, c, &cp)? {
                        d.placement.node_selector.insert(key, value);
                    }
                }
            }
            "preferences" => {
                let Value::Sequence(list) = x else {
                    return Err(ManifestError::at(&p, "must be a list of {spread: node.labels.KEY}"));
                };
                for (i, pref) in list.iter().enumerate() {
                    let pp = format!("{p}[{i}].spread");
                    let spread = mapping(pref, &format!("{p}[{i}]"))?
                        .get("spread")
                        .ok_or_else(|| ManifestError::at(&pp, "is required"))
                        .and_then(|s| str_of(s, &pp))?;
                    let key = spread
                        .strip_prefix("node.labels.")
                        .ok_or_else(|| ManifestError::at(&pp, format!("{spread:?} must be node.labels.KEY")))?;
                    if d.placement.spread_by.is_some() {
                        cx.warnings.push(format!("{pp}: only the first spread preference is used"));
                    } else {
                        d.placement.spread_by = Some(key.to_string());
                    }
                }
            }
            _ => cx.warnings.push(format!("{p}: not supported yet, ignored")),
        }
    }
    Ok(())
}

/// One `expose` entry: `80`, `"80"`, `"80/tcp"`, `"53/udp"`, or a range `"8000-8010"` (at
/// most 64 ports).
fn exposed(v: &Value, path: &str) -> R<Vec<skiff_model::mesh::ServicePort>> {
    let text = match v {
        Value::Number(n) => n.to_string(),
        other => str_of(other, path)?,
    };
    let (ports, proto) = text.split_once('/').unwrap_or((text.as_str(), "tcp"));
    let one = |p: &str| -> R<u16> {
        p.trim().parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(|| {
            ManifestError::at(path, format!("{text:?} is not a port (1 to 65535), a range A-B or PORT/PROTOCOL"))
        })
    };
    let (a, b) = match ports.split_once('-') {
        Some((a, b)) => (one(a)?, one(b)?),
        None => (one(ports)?, one(ports)?),
    };
    if b < a || b - a >= 64 {
        return Err(ManifestError::at(path, format!("{text:?}: a range of 1 to 64 ports, low to high")));
    }
    let protocol = match proto {
        "tcp" => Protocol::Tcp,
        "udp" => Protocol::Udp,
        other => return Err(ManifestError::at(path, format!("{other:?} is not a protocol (tcp, udp)"))),
    };
    Ok((a..=b).map(|port| skiff_model::mesh::ServicePort { port, target: port, protocol }).collect())
}
