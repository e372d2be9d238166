//! Platform names in OCI spelling (`linux/amd64`, `linux/arm/v7`).

/// This machine's architecture and variant as OCI image platforms name them.
pub fn host_arch() -> (&'static str, Option<&'static str>) {
    oci_arch(std::env::consts::ARCH)
}

/// Maps a Rust `target_arch` to OCI `architecture` (+ `variant`).
pub fn oci_arch(rust_arch: &'static str) -> (&'static str, Option<&'static str>) {
    match rust_arch {
        "x86_64" => ("amd64", None),
        "aarch64" => ("arm64", None),
        "arm" => ("arm", Some("v7")),
        "x86" => ("386", None),
        other => (other, None),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn names() {
        assert_eq!(super::oci_arch("x86_64"), ("amd64", None));
        assert_eq!(super::oci_arch("arm"), ("arm", Some("v7")));
    }
}

/// A version as (major, minor, patch) from `1.2.8`, `1.3.3-rc.1`, `v1.1.5`; pre-releases
/// count as their release.
pub fn version_triple(v: &str) -> Option<(u32, u32, u32)> {
    let v = v.trim().trim_start_matches('v');
    let core = v.split(['-', '+']).next()?;
    let mut it = core.split('.').map(|p| p.parse::<u32>());
    let major = it.next()?.ok()?;
    let minor = it.next().unwrap_or(Ok(0)).ok()?;
    let patch = it.next().unwrap_or(Ok(0)).ok()?;
    Some((major, minor, patch))
}

/// Why a runc version is unsafe, if it is: before 1.2.8, and 1.3 before 1.3.3, runc has
/// container-escape flaws (CVE-2025-31133, CVE-2025-52565, CVE-2025-52881: a container
/// can make runc write to host files through /dev/null, /dev/console or /proc masks).
pub fn runc_advisory(version: &str) -> Option<String> {
    let Some(v) = version_triple(version) else {
        return Some(format!("runc {version}: version not understood; cannot tell if it is safe"));
    };
    let fixed = match (v.0, v.1) {
        (1, 2) => Some((1, 2, 8)),
        (1, 3) => Some((1, 3, 3)),
        (0, _) | (1, 0) | (1, 1) => Some((1, 2, 8)),
        _ => None,
    };
    match fixed {
        Some(f) if v < f => Some(format!(
            "runc {version} has container-escape flaws (CVE-2025-31133, CVE-2025-52565, CVE-2025-52881); \
             upgrade to {}.{}.{} or later",
            f.0, f.1, f.2
        )),
        _ => None,
    }
}

#[cfg(test)]
mod runc_tests {
    use super::*;

    #[test]
    fn runc_versions_before_the_fixes_are_flagged() {
        for bad in ["1.1.5", "1.2.7", "1.3.2", "1.0.0-rc93", "0.1.1"] {
            assert!(runc_advisory(bad).is_some_and(|m| m.contains("CVE-2025-31133")), "{bad}");
        }
        for ok in ["1.2.8", "1.2.10", "1.3.3", "1.4.0", "1.4.0-rc.3", "2.0.0"] {
            assert_eq!(runc_advisory(ok), None, "{ok}");
        }
        assert!(runc_advisory("banana").is_some_and(|m| m.contains("not understood")));
        assert_eq!(version_triple("v1.3.3-rc.1"), Some((1, 3, 3)));
        assert!(version_triple("1.2.8") > version_triple("1.2.7"));
    }
}
