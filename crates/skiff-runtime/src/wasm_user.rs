//! Who a WebAssembly instance runs as once its shim has set up (see `wasm.rs`): the same
//! in builds with and without the `wasm` feature, since the agent makes volumes for them.

/// FNV-1a: stable across builds and machines.
fn fnv(s: &str) -> u32 {
    s.bytes().fold(0x811c_9dc5u32, |h, b| (h ^ u32::from(b)).wrapping_mul(0x0100_0193))
}

/// The unprivileged user a wasm instance's shim becomes once it has set up: one per
/// instance (by its container id), from a range no distribution gives its users
/// (600000000 and up), so a guest that escaped wasmtime owns nothing on the host but its
/// own `state/` directory — not even its replicas'.
pub fn uid_for(container_id: &str) -> u32 {
    600_000_000 + fnv(container_id) % 100_000_000
}

/// The group of every instance of a wasm deployment: the volumes the agent makes for the
/// deployment are its (shared by the replicas, as a container's replicas share them).
pub fn gid_for(deployment: &str) -> u32 {
    700_000_000 + fnv(deployment) % 100_000_000
}

#[cfg(test)]
mod tests {
    #[test]
    fn users_are_stable_and_outside_the_distribution_s_range() {
        assert_eq!(super::uid_for("ab12-web-1-aaaaaa"), super::uid_for("ab12-web-1-aaaaaa"));
        assert_ne!(super::uid_for("ab12-web-1-aaaaaa"), super::uid_for("ab12-web-2-aaaaaa"));
        assert!((600_000_000..700_000_000).contains(&super::uid_for("x")));
        assert!((700_000_000..800_000_000).contains(&super::gid_for("web")));
    }
}
