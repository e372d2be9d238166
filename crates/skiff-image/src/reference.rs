//! Image references, normalised as Docker does: `busybox` → `docker.io/library/busybox:latest`.

/// The names of Docker Hub.
const DOCKER_HUB: &[&str] = &["docker.io", "index.docker.io", "registry-1.docker.io"];

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

#[cfg(test)]
mod tests {
    use super::*;

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
