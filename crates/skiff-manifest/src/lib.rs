//! Imports docker-compose files (compose-spec) and Kubernetes manifests (Deployment,
//! DaemonSet, Service) into skiff deployments.
//!
//! Keys skiff does not support yet produce a warning naming the key; invalid values are
//! errors naming the path and the problem (`services.web.deploy.resources.limits.memory:
//! "12XB" is not a size`). Nothing partial is returned on error.
//!
//! Architecture Invariant: this crate does no I/O besides reading the env files a compose
//! file names (through the `read_file` callback), and knows nothing of the store.
#![forbid(unsafe_code)]

mod compose;
pub mod hpa;
mod interpolate;
mod k8s;
pub mod short;

pub use compose::{import_compose, BuildSpec, ComposeImport, GitContext};
pub use interpolate::interpolate;
pub use k8s::{import_k8s, import_k8s_beside, import_k8s_files, import_k8s_with, is_k8s, K8sImport};

use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ManifestError {
    #[error("{path}: {problem}")]
    Invalid { path: String, problem: String },
    #[error("not valid YAML: {0}")]
    Yaml(String),
}

impl ManifestError {
    pub fn at(path: impl Into<String>, problem: impl Into<String>) -> Self {
        ManifestError::Invalid { path: path.into(), problem: problem.into() }
    }
}

/// The variables of a `.env` file beside a compose file (`KEY=VALUE` lines; `#` comments
/// and blank lines skipped; a value in double quotes loses them), as Compose reads it for
/// interpolation defaults.
pub fn parse_dotenv(text: &str) -> std::collections::HashMap<String, String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().trim_matches('"').to_string()))
        .collect()
}

/// Splits a command line as a POSIX shell would split words (quotes and backslashes), as
/// compose does for string `command:` and `entrypoint:`.
pub fn shell_split(s: &str) -> Result<Vec<String>, String> {
    let mut out = vec![];
    let mut cur = String::new();
    let mut in_word = false;
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            '\'' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(c) => cur.push(c),
                        None => return Err("unterminated single quote".into()),
                    }
                }
            }
            '"' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(c @ ('"' | '\\' | '$' | '`')) => cur.push(c),
                            Some(c) => {
                                cur.push('\\');
                                cur.push(c);
                            }
                            None => return Err("unterminated double quote".into()),
                        },
                        Some(c) => cur.push(c),
                        None => return Err("unterminated double quote".into()),
                    }
                }
            }
            '\\' => {
                in_word = true;
                if let Some(c) = chars.next() {
                    cur.push(c);
                }
            }
            c if c.is_whitespace() => {
                if in_word {
                    out.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            c => {
                in_word = true;
                cur.push(c);
            }
        }
    }
    if in_word {
        out.push(cur);
    }
    Ok(out)
}

/// The runtime a manifest names: `oci`/`runc` (and containerd's `io.containerd.runc.*`),
/// or `wasm`/`wasmtime` and the WASI shims Docker+Wasm names
/// (`io.containerd.wasmtime.v1`, `io.containerd.wasmedge.v1`, `io.containerd.wasmer.v1`),
/// whose WASI programs wasmtime runs. Anything else is an error at `path`.
pub fn runtime_named(name: &str, path: &str) -> Result<skiff_model::RuntimeKind, ManifestError> {
    use skiff_model::RuntimeKind;
    if let Some(k) = RuntimeKind::parse(name) {
        return Ok(k);
    }
    match name {
        "io.containerd.runc.v1" | "io.containerd.runc.v2" => Ok(RuntimeKind::Oci),
        "io.containerd.runsc.v1" => Ok(RuntimeKind::Runsc),
        "io.containerd.wasmtime.v1"
        | "io.containerd.wasmtime.v2"
        | "io.containerd.wasmedge.v1"
        | "io.containerd.wasmer.v1" => Ok(RuntimeKind::Wasm),
        other => Err(ManifestError::at(
            path,
            format!(
                "{other:?} is not a runtime skiff has (oci or runc; runsc or gvisor; wasm, wasmtime or io.containerd.wasmtime.v1)"
            ),
        )),
    }
}

/// Parses compose durations: `1m30s`, `10s`, `500ms`, `1h`, `2.5s`; a bare number is seconds.
/// A file's permission bits as compose and Kubernetes files write them: `0440` is octal
/// (YAML 1.1, which both tools read, and which the parser here keeps as text), `420` the
/// number itself; at most 0777.
pub(crate) fn file_mode(text: &str) -> Option<u32> {
    let n = if text.starts_with('0') { u32::from_str_radix(text, 8).ok() } else { text.parse().ok() };
    n.filter(|n| *n <= 0o777)
}

pub fn parse_duration_ms(s: &str) -> Option<u64> {
    let s = s.trim();
    if s.is_empty() {
        return None;
    }
    if let Ok(n) = s.parse::<f64>() {
        return (n >= 0.0).then_some((n * 1000.0) as u64);
    }
    let mut total = 0f64;
    let mut num = String::new();
    let mut rest = s;
    while !rest.is_empty() {
        num.clear();
        let end = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(rest.len());
        num.push_str(&rest[..end]);
        rest = &rest[end..];
        let uend = rest.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(rest.len());
        let unit = &rest[..uend];
        rest = &rest[uend..];
        let v: f64 = num.parse().ok()?;
        let mult = match unit {
            "h" => 3_600_000.0,
            "m" => 60_000.0,
            "s" => 1000.0,
            "ms" => 1.0,
            "us" | "µs" => 0.001,
            "ns" => 0.000_001,
            _ => return None,
        };
        total += v * mult;
    }
    Some(total as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits() {
        assert_eq!(shell_split(r#"sh -c 'echo "hi there"' x\ y"#).unwrap(), ["sh", "-c", "echo \"hi there\"", "x y"]);
        assert_eq!(shell_split("  a   b ").unwrap(), ["a", "b"]);
        assert_eq!(shell_split(r#""""#).unwrap(), [""]);
        assert!(shell_split("'open").is_err());
    }

    #[test]
    fn dotenv_files() {
        let v = parse_dotenv("# c\n\nTAG=1.2\n NAME = \"web app\" \nBROKEN\nURL=http://x/?a=b\n");
        assert_eq!(v.len(), 3);
        assert_eq!((v["TAG"].as_str(), v["NAME"].as_str(), v["URL"].as_str()), ("1.2", "web app", "http://x/?a=b"));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration_ms("1m30s"), Some(90_000));
        assert_eq!(parse_duration_ms("500ms"), Some(500));
        assert_eq!(parse_duration_ms("2.5s"), Some(2500));
        assert_eq!(parse_duration_ms("10"), Some(10_000));
        assert_eq!(parse_duration_ms("1x"), None);
        assert_eq!(parse_duration_ms(""), None);
    }
}
