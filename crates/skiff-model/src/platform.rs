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

/// A version as (major, minor, patch, pre-release) from `1.2.8`, `1.4.0-rc.3`, `v1.1.5`,
/// ordered as releases are: `1.4.0-rc.1` < `1.4.0-rc.3` < `1.4.0`. The last part is the
/// release candidate's number (`-rc.N`, `-rcN`), 0 for another pre-release tag, and
/// `u32::MAX` for a release.
pub fn version_key(v: &str) -> Option<(u32, u32, u32, u32)> {
    let v = v.trim().trim_start_matches('v');
    let v = v.split('+').next()?;
    let (core, pre) = match v.split_once('-') {
        Some((c, p)) => (c, Some(p)),
        None => (v, None),
    };
    let mut it = core.split('.').map(|p| p.parse::<u32>());
    let major = it.next()?.ok()?;
    let minor = it.next().unwrap_or(Ok(0)).ok()?;
    let patch = it.next().unwrap_or(Ok(0)).ok()?;
    let pre = match pre {
        None => u32::MAX,
        Some(p) => p
            .strip_prefix("rc")
            .map(|n| n.trim_start_matches('.'))
            .and_then(|n| n.parse::<u32>().ok())
            .map_or(0, |n| n.min(u32::MAX - 1)),
    };
    Some((major, minor, patch, pre))
}

/// Why a runc version is unsafe, if it is: before 1.2.8, and 1.3 before 1.3.3, runc has
/// container-escape flaws (CVE-2025-31133, CVE-2025-52565, CVE-2025-52881: a container
/// can make runc write to host files through /dev/null, /dev/console or /proc masks).
pub fn runc_advisory(version: &str) -> Option<String> {
    let Some(v) = version_key(version) else {
        return Some(format!("runc {version}: version not understood; cannot tell if it is safe"));
    };
    const RELEASE: u32 = u32::MAX;
    // The fixes came in 1.2.8, 1.3.3 and 1.4.0-rc.3.
    let fixed = match (v.0, v.1) {
        (1, 2) => Some(((1, 2, 8, RELEASE), "1.2.8")),
        (1, 3) => Some(((1, 3, 3, RELEASE), "1.3.3")),
        (1, 4) => Some(((1, 4, 0, 3), "1.4.0-rc.3")),
        (0, _) | (1, 0) | (1, 1) => Some(((1, 2, 8, RELEASE), "1.2.8")),
        _ => None,
    };
    match fixed {
        Some((f, name)) if v < f => Some(format!(
            "runc {version} has container-escape flaws (CVE-2025-31133, CVE-2025-52565, CVE-2025-52881); \
             upgrade to {name} or later"
        )),
        _ => None,
    }
}

#[cfg(test)]
mod runc_tests {
    use super::*;

    #[test]
    fn runc_versions_before_the_fixes_are_flagged() {
        for bad in ["1.1.5", "1.2.7", "1.3.2", "1.0.0-rc93", "0.1.1", "1.2.8-rc.1", "1.4.0-rc.1", "1.4.0-rc2"] {
            assert!(runc_advisory(bad).is_some_and(|m| m.contains("CVE-2025-31133")), "{bad}");
        }
        for ok in ["1.2.8", "1.2.10", "1.3.3", "1.4.0", "1.4.0-rc.3", "2.0.0"] {
            assert_eq!(runc_advisory(ok), None, "{ok}");
        }
        assert!(runc_advisory("banana").is_some_and(|m| m.contains("not understood")));
        assert_eq!(version_key("v1.3.3-rc.1"), Some((1, 3, 3, 1)));
        assert!(version_key("1.2.8") > version_key("1.2.7"));
        assert!(
            version_key("1.4.0") > version_key("1.4.0-rc.3") && version_key("1.4.0-rc.3") > version_key("1.4.0-rc.1")
        );
        assert!(version_key("1.4.0-beta") < version_key("1.4.0-rc.1"));
    }
}
