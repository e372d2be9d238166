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
