//! Image references, normalised as Docker does: `busybox` → `docker.io/library/busybox:latest`.

/// The names of Docker Hub.
const DOCKER_HUB: &[&str] = &["docker.io", "index.docker.io", "registry-1.docker.io"];

/// The normalised name of `r` without its tag or digest (`localhost:5000/app:1` →
/// `localhost:5000/app`): what `NAME@DIGEST` is written with.
pub fn reference_name(r: &str) -> String {
    let n = normalize_reference(r);
    match n.split_once('@') {
        Some((name, _)) => name.to_string(),
        None => n.rsplit_once(':').map_or(n.clone(), |(name, _)| name.to_string()),
    }
}

/// Normalises an image reference. A reference with a digest keeps it (and drops a tag
/// beside it); one without a tag gets `:latest`; a first component without `.`/`:` (and
/// not `localhost`) means Docker Hub, whose one-part names are under `library/`.
pub fn normalize_reference(r: &str) -> String {
    let r = r.trim();
    let (name, suffix) = match r.split_once('@') {
        // `name:tag@digest`: the digest names the image, the tag is dropped (as Docker does).
        Some((n, d)) => {
            let last = n.rsplit('/').next().unwrap_or(n);
            let n = if last.contains(':') { n.rsplit_once(':').map_or(n, |(n, _)| n) } else { n };
            (n.to_string(), format!("@{d}"))
        }
        None => {
            let last = r.rsplit('/').next().unwrap_or(r);
            if last.contains(':') {
                let (n, t) = r.rsplit_once(':').unwrap_or((r, "latest"));
                (n.to_string(), format!(":{t}"))
            } else {
                (r.to_string(), ":latest".to_string())
            }
        }
    };
    let first = name.split('/').next().unwrap_or("");
    let has_registry = name.contains('/') && (first.contains('.') || first.contains(':') || first == "localhost");
    let name = if has_registry {
        // Docker Hub's official images live under library/, also when the hub is named.
        match name.split_once('/') {
            Some((hub, repo)) if DOCKER_HUB.contains(&hub) && !repo.contains('/') => format!("{hub}/library/{repo}"),
            _ => name,
        }
    } else if name.contains('/') {
        format!("docker.io/{name}")
    } else {
        format!("docker.io/library/{name}")
    };
    format!("{name}{suffix}")
}

/// Checks a reference a user gives as a new name (`skiff image tag`) by Docker's grammar:
/// lower-case path components of letters, digits and separators (`.`, `_`, `__`, `-`),
/// an optional registry host (with a port) first, then an optional `:tag` of up to 128
/// word characters, dots and dashes (not first), or `@sha256:` and 64 hex digits.
pub fn validate_reference(r: &str) -> Result<(), String> {
    let (name, digest) = match r.split_once('@') {
        Some((n, d)) => (n, Some(d)),
        None => (r, None),
    };
    if let Some(d) = digest {
        let hex = d.strip_prefix("sha256:").ok_or_else(|| format!("{r:?}: the digest must be sha256:HEX"))?;
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
            return Err(format!("{r:?}: the digest must be sha256 and 64 lower-case hex digits"));
        }
    }
    let (name, tag) = match name.rsplit_once(':') {
        Some((n, t)) if !t.contains('/') => (n, Some(t)),
        _ => (name, None),
    };
    if let Some(t) = tag {
        let ok = !t.is_empty()
            && t.len() <= 128
            && t.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
            && !t.starts_with(['.', '-']);
        if !ok {
            return Err(format!("{r:?}: the tag {t:?} must be 1-128 letters, digits, '_', '.' or '-' (not first)"));
        }
    }
    if name.is_empty() || name.len() > 255 {
        return Err(format!("{r:?}: the name must be 1 to 255 characters"));
    }
    let mut parts: Vec<&str> = name.split('/').collect();
    let first = parts[0];
    if parts.len() > 1 && (first.contains(['.', ':']) || first == "localhost") {
        let host_ok = first.bytes().all(|b| b.is_ascii_alphanumeric() || b".-:".contains(&b))
            && !first.starts_with(['.', '-', ':']);
        if !host_ok {
            return Err(format!("{r:?}: {first:?} is not a registry host"));
        }
        parts.remove(0);
    }
    for p in parts {
        let ok = !p.is_empty()
            && p.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
            && p.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
            && p.ends_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit());
        if !ok {
            return Err(format!("{r:?}: {p:?} must be lower-case letters, digits and '.', '_' or '-' between them"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_references_name_is_without_its_tag_or_digest() {
        assert_eq!(reference_name("localhost:5000/app:1"), "localhost:5000/app");
        assert_eq!(reference_name("localhost/bt-app"), "localhost/bt-app");
        assert_eq!(reference_name("busybox"), "docker.io/library/busybox");
        assert_eq!(reference_name(&format!("x@sha256:{}", "a".repeat(64))), "docker.io/library/x");
    }

    #[test]
    fn new_names_follow_dockers_grammar() {
        for ok in [
            "busybox",
            "app:1",
            "reg.io:5000/team/app:v1.2-rc_1",
            "localhost/x",
            "a/b__c",
            &format!("x@sha256:{}", "a".repeat(64)),
        ] {
            assert_eq!(validate_reference(ok), Ok(()), "{ok}");
        }
        for (bad, says) in [
            ("Busybox", "lower-case"),
            ("app:", "the tag"),
            ("app:-x", "the tag"),
            ("a//b", "lower-case"),
            ("x@sha256:abc", "64 lower-case hex"),
            ("x@md5:abc", "sha256:HEX"),
            ("", "1 to 255"),
            ("app-", "lower-case"),
        ] {
            let e = validate_reference(bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn normalizes() {
        for (i, want) in [
            ("busybox", "docker.io/library/busybox:latest"),
            ("team/app:1", "docker.io/team/app:1"),
            ("localhost/skiff-demo", "localhost/skiff-demo:latest"),
            ("127.0.0.1:5000/a/b:2", "127.0.0.1:5000/a/b:2"),
            ("reg.io/a@sha256:abc", "reg.io/a@sha256:abc"),
            ("localhost:5000/x", "localhost:5000/x:latest"),
            // Docker's normalisation: the hub named, and a tag beside a digest.
            ("docker.io/busybox", "docker.io/library/busybox:latest"),
            ("index.docker.io/busybox:1.36", "index.docker.io/library/busybox:1.36"),
            ("docker.io/team/app", "docker.io/team/app:latest"),
            ("busybox:1.36@sha256:abc", "docker.io/library/busybox@sha256:abc"),
            ("localhost:5000/x:2@sha256:abc", "localhost:5000/x@sha256:abc"),
        ] {
            assert_eq!(normalize_reference(i), want, "{i}");
        }
    }
}
