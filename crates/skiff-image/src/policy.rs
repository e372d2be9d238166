//! Which images must be signed, by whom: `/etc/skiff/policy.yaml` on a node.
//!
//! ```yaml
//! images:
//!   - match: "registry.example.com/plant/**"   # the image's registry/repository
//!     mode: enforce                             # enforce (default) | warn
//!     keys:
//!       - /etc/skiff/keys/plant.pub             # a file holding a PEM public key,
//!       - |                                     # or the PEM itself
//!         -----BEGIN PUBLIC KEY-----
//!         ...
//!     identity: repository                      # repository (default) | any
//!   - match: "registry.example.com/vendor/*"
//!     notation:                                 # Notation signatures (X.509)
//!       trust_store:                            # root certificates: files or PEM
//!         - /etc/skiff/notation/vendor-ca.pem
//!       identities:                             # whom they may vouch for, or "*"
//!         - "x509.subject: C=US, O=Vendor, CN=release"
//! ```
//!
//! The first rule whose pattern matches an image's name (normalised: `busybox` is
//! `docker.io/library/busybox`) decides; an image no rule matches is not checked. In a
//! pattern `*` stands for any characters but `/`, `**` for any characters.
//! A rule may name cosign keys, a Notation trust store, or both: one signature either
//! verifies is enough.
//! Under `enforce` an image without a valid signature by one of the keys is refused before
//! it is stored (and, if it got into the store some other way, before it runs); under
//! `warn` it is used and the node records an event.

use crate::notation::{Certificate, Identity, TrustPolicy};
use crate::trust::{IdentityCheck, PublicKey};
use serde::Deserialize;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Enforce,
    Warn,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub pattern: String,
    pub mode: Mode,
    pub keys: Vec<PublicKey>,
    pub identity: IdentityCheck,
    /// Notation: the trust store and trusted identities.
    pub notation: Option<TrustPolicy>,
}

/// The rules of a node, in order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImagePolicy {
    pub rules: Vec<Rule>,
    /// Where it was read from, for messages.
    pub source: Option<PathBuf>,
}

/// A rule as written (`images:` of the policy file).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRule {
    #[serde(rename = "match")]
    pub pattern: Option<String>,
    pub mode: Option<String>,
    #[serde(default)]
    pub keys: Vec<String>,
    pub identity: Option<String>,
    pub notation: Option<RawNotation>,
}

/// A rule's `notation:` as written.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawNotation {
    #[serde(default)]
    pub trust_store: Vec<String>,
    #[serde(default)]
    pub identities: Vec<String>,
}

#[derive(Deserialize)]
struct ImagesSection {
    #[serde(default)]
    images: Vec<RawRule>,
}

impl ImagePolicy {
    /// Reads the `images:` section of the policy file at `path` (other sections are the
    /// agent's); a missing file is no policy unless `required`. Errors name the field.
    pub fn load(path: &Path, required: bool) -> Result<Self, String> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => return Ok(Self::default()),
            Err(e) => return Err(format!("{}: {e}", path.display())),
        };
        let raw: ImagesSection = if text.trim().is_empty() {
            ImagesSection { images: vec![] }
        } else {
            serde_norway::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?
        };
        let base = path.parent().unwrap_or(Path::new("/"));
        Self::from_rules(&raw.images, Some(path.into()), |p| std::fs::read_to_string(base.join(p)))
            .map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Checks the rules as written and reads their keys (key files through `read`). Errors
    /// name the field: `images[0].keys[1]: /etc/skiff/k.pub: No such file or directory`.
    pub fn from_rules(
        raw: &[RawRule],
        source: Option<PathBuf>,
        read: impl Fn(&Path) -> std::io::Result<String>,
    ) -> Result<Self, String> {
        Self::named_rules(raw, source, read, |i| format!("images[{i}]"))
    }

    /// As [`ImagePolicy::from_rules`] for one rule whose errors name it `name`
    /// (`signature.keys[0]: ...` for a deployment's `signature:`).
    pub fn from_rule(
        raw: &RawRule,
        name: &str,
        source: Option<PathBuf>,
        read: impl Fn(&Path) -> std::io::Result<String>,
    ) -> Result<Self, String> {
        Self::named_rules(std::slice::from_ref(raw), source, read, |_| name.to_string())
    }

    fn named_rules(
        raw: &[RawRule],
        source: Option<PathBuf>,
        read: impl Fn(&Path) -> std::io::Result<String>,
        name: impl Fn(usize) -> String,
    ) -> Result<Self, String> {
        let mut rules = vec![];
        for (i, r) in raw.iter().enumerate() {
            let rule = name(i);
            let at = |f: &str| format!("{rule}.{f}");
            let pattern = r
                .pattern
                .clone()
                .ok_or_else(|| format!("{}: missing (a pattern such as registry.example.com/team/**)", at("match")))?;
            if pattern.is_empty() || pattern.chars().any(|c| c.is_whitespace() || c.is_ascii_uppercase()) {
                return Err(format!(
                    "{}: {pattern:?} is not an image name pattern (lower case, no spaces)",
                    at("match")
                ));
            }
            let mode = match r.mode.as_deref() {
                None | Some("enforce") => Mode::Enforce,
                Some("warn") => Mode::Warn,
                Some(other) => return Err(format!("{}: {other:?} is not one of enforce, warn", at("mode"))),
            };
            let identity = match r.identity.as_deref() {
                None | Some("repository") => IdentityCheck::Repository,
                Some("any") => IdentityCheck::Any,
                Some(other) => return Err(format!("{}: {other:?} is not one of repository, any", at("identity"))),
            };
            if r.keys.is_empty() && r.notation.is_none() {
                return Err(format!(
                    "{}: no key: list at least one public key (a file or PEM text), or give notation:",
                    at("keys")
                ));
            }
            // A file named, or the PEM itself.
            let text = |at: &str, v: &str| {
                if v.contains("-----BEGIN") {
                    Ok(v.to_string())
                } else {
                    read(Path::new(v)).map_err(|e| format!("{at}: {v}: {e}"))
                }
            };
            let mut keys = vec![];
            for (k, key) in r.keys.iter().enumerate() {
                let at = at(&format!("keys[{k}]"));
                keys.push(PublicKey::from_pem(&text(&at, key)?).map_err(|e| format!("{at}: {e}"))?);
            }
            let notation = match &r.notation {
                None => None,
                Some(n) => {
                    if n.trust_store.is_empty() {
                        return Err(format!("{}: list at least one root certificate", at("notation.trust_store")));
                    }
                    if n.identities.is_empty() {
                        return Err(format!(
                            "{}: list whom the trust store vouches for (\"x509.subject: C=.., O=.., CN=..\") or \"*\"",
                            at("notation.identities")
                        ));
                    }
                    let mut roots = vec![];
                    for (k, c) in n.trust_store.iter().enumerate() {
                        let at = at(&format!("notation.trust_store[{k}]"));
                        roots.extend(Certificate::from_pem_bundle(&text(&at, c)?).map_err(|e| format!("{at}: {e}"))?);
                    }
                    let identities = n
                        .identities
                        .iter()
                        .enumerate()
                        .map(|(k, i)| {
                            Identity::parse(i).map_err(|e| format!("{}: {e}", at(&format!("notation.identities[{k}]"))))
                        })
                        .collect::<Result<_, _>>()?;
                    Some(TrustPolicy { roots, identities })
                }
            };
            rules.push(Rule { pattern, mode, keys, identity, notation });
        }
        Ok(ImagePolicy { rules, source })
    }

    /// Where the policy came from, for messages.
    pub fn source_name(&self) -> String {
        self.source.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "built in".into())
    }

    /// The rule for the image `reference` (any spelling; tag and digest are ignored).
    pub fn rule_for(&self, reference: &str) -> Option<&Rule> {
        let name = repository_of(reference);
        self.rules.iter().find(|r| glob(&r.pattern, &name))
    }
}

/// `registry/repository` of a reference, normalised as Docker does, with one spelling
/// per registry: the host lower-cased, `:443` dropped, Docker Hub's aliases
/// (`index.docker.io`, `registry-1.docker.io`) as `docker.io` — every spelling a pull
/// reaches the same server by meets the same rule.
pub fn repository_of(reference: &str) -> String {
    let full = crate::normalize_reference(reference);
    let name = full.split('@').next().unwrap_or(&full);
    let name = match name.rsplit_once(':') {
        Some((n, tag)) if !tag.contains('/') => n,
        _ => name,
    };
    let (host, path) = name.split_once('/').unwrap_or((name, ""));
    let host = host.to_ascii_lowercase();
    let host = host.strip_suffix(":443").unwrap_or(&host);
    let host = match crate::hosts::canonical_registry(host) {
        "registry-1.docker.io" => "docker.io",
        h => h,
    };
    format!("{host}/{path}")
}

/// `*`: any run of characters but `/`; `**`: any run of characters.
fn glob(pattern: &str, name: &str) -> bool {
    let (p, n) = (pattern.as_bytes(), name.as_bytes());
    // Backtracking over at most pattern × name steps: both are short.
    fn go(p: &[u8], n: &[u8]) -> bool {
        match p {
            [] => n.is_empty(),
            [b'*', b'*', rest @ ..] => (0..=n.len()).any(|i| go(rest, &n[i..])),
            [b'*', rest @ ..] => {
                let seg = n.iter().position(|&c| c == b'/').unwrap_or(n.len());
                (0..=seg).any(|i| go(rest, &n[i..]))
            }
            [c, rest @ ..] => n.first() == Some(c) && go(rest, &n[1..]),
        }
    }
    go(p, n)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "-----BEGIN PUBLIC KEY-----\nMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEhyQCx0E9wQWSFI9ULGwy3BuRklnt\nIqozY1iUdN9wHfZdsNWSGx5I5LXcXrSBqUuxEyZvQjbgcBv3cfcBFVMjog==\n-----END PUBLIC KEY-----\n";

    fn parse(text: &str) -> Result<ImagePolicy, String> {
        let raw: ImagesSection = if text.is_empty() {
            ImagesSection { images: vec![] }
        } else {
            serde_norway::from_str(text).map_err(|e| e.to_string())?
        };
        ImagePolicy::from_rules(&raw.images, None, |p| {
            if p == Path::new("/k.pub") {
                Ok(KEY.to_string())
            } else {
                Err(std::io::Error::from(std::io::ErrorKind::NotFound))
            }
        })
    }

    #[test]
    fn globs() {
        assert!(glob("docker.io/library/*", "docker.io/library/busybox"));
        assert!(!glob("docker.io/*", "docker.io/library/busybox"));
        assert!(glob("docker.io/**", "docker.io/library/busybox"));
        assert!(glob("**", "127.0.0.1:5000/a/b"));
        assert!(glob("127.0.0.1:5000/app", "127.0.0.1:5000/app"));
        assert!(!glob("127.0.0.1:5000/app", "127.0.0.1:5000/apps"));
        assert!(glob("*/team/*-svc", "r.example/team/web-svc"));
    }

    #[test]
    fn first_matching_rule_decides_and_names_are_normalised() {
        let p = parse(&format!(
            "images:\n  - match: docker.io/library/*\n    mode: warn\n    keys: [/k.pub]\n  - match: \"**\"\n    keys:\n      - |\n{}",
            KEY.lines().map(|l| format!("        {l}\n")).collect::<String>()
        ))
        .unwrap();
        assert_eq!(p.rule_for("busybox:1.36").unwrap().mode, Mode::Warn);
        assert_eq!(p.rule_for("127.0.0.1:5000/app@sha256:00").unwrap().mode, Mode::Enforce);
        assert_eq!(p.rules[1].identity, IdentityCheck::Repository);
        assert!(ImagePolicy::default().rule_for("busybox").is_none());
    }

    #[test]
    fn errors_name_the_field() {
        let e = |t: &str| parse(t).unwrap_err();
        assert!(
            e("images:\n  - keys: [/k.pub]\n").contains("images[0].match: missing"),
            "{}",
            e("images:\n  - keys: [/k.pub]\n")
        );
        assert!(e("images:\n  - match: a\n    mode: enforcing\n    keys: [/k.pub]\n")
            .contains("images[0].mode: \"enforcing\""));
        assert!(e("images:\n  - match: a\n").contains("images[0].keys: no key"));
        assert!(
            e("images:\n  - match: a\n    keys: [/k.pub, /missing.pub]\n").contains("images[0].keys[1]: /missing.pub")
        );
        assert!(e("images:\n  - match: a\n    keys: [/k.pub]\n    identity: who\n").contains("images[0].identity"));
        assert!(e("images:\n  - match: a\n    keys: [/k.pub]\n    color: red\n").contains("unknown field `color`"));
        assert!(parse("").unwrap().rules.is_empty());
    }

    #[test]
    fn notation_trust_stores_and_identities_are_read_and_checked() {
        let root = include_str!("../tests/fixtures/notation/root-e2e.pem");
        let indented: String = root.lines().map(|l| format!("          {l}\n")).collect();
        let p = parse(&format!(
            "images:\n  - match: \"**\"\n    notation:\n      trust_store:\n        - |\n{indented}      identities: [\"x509.subject: C=US, O=Notary\", \"*\"]\n"
        ))
        .unwrap();
        let n = p.rules[0].notation.as_ref().unwrap();
        assert_eq!((n.roots.len(), n.identities.len()), (1, 2));
        assert!(n.roots[0].subject.contains("CN=e2e") && p.rules[0].keys.is_empty());
        let e = |t: &str| parse(t).unwrap_err();
        let rule = |n: &str| format!("images:\n  - match: a\n    notation:\n{n}");
        assert!(e(&rule("      identities: [\"*\"]\n")).contains("images[0].notation.trust_store: list at least one"));
        assert!(e(&rule("      trust_store: [/k.pub]\n")).contains("images[0].notation.identities: list whom"));
        let bad_store = e(&rule("      trust_store: [/k.pub]\n      identities: [\"*\"]\n"));
        assert!(
            bad_store.contains("images[0].notation.trust_store[0]") && bad_store.contains("want CERTIFICATE"),
            "{bad_store}"
        );
        let bad_identity =
            e(&rule(&format!("      trust_store:\n        - |\n{indented}      identities: [\"CN=x\"]\n")));
        assert!(bad_identity.contains("images[0].notation.identities[0]"), "{bad_identity}");
    }
}
