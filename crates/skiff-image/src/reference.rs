//! Image references, normalised as Docker does: `busybox` → `docker.io/library/busybox:latest`.

/// Normalises an image reference. A reference with a digest keeps it; one without a tag
/// gets `:latest`; a first component without `.`/`:` (and not `localhost`) means Docker Hub.
pub fn normalize_reference(r: &str) -> String {
    let r = r.trim();
    let (name, suffix) = match r.split_once('@') {
        Some((n, d)) => (n.to_string(), format!("@{d}")),
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
        name
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
        ] {
            assert_eq!(normalize_reference(i), want, "{i}");
        }
    }
}
