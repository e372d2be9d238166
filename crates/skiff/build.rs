//! Links `skiff` as a position-dependent executable. A PIE of this size has ~20 000
//! relocations that every process applies at start, dirtying ~0.9 MB of pages; each
//! per-container shim is a `skiff` process, so that cost is paid once per container.
//! (Release builds from `scripts/build-release.sh` are fully static and position-
//! dependent through RUSTFLAGS already; adding `-no-pie` there would break the link.)
fn main() {
    let static_crt = std::env::var("CARGO_CFG_TARGET_FEATURE").is_ok_and(|f| f.split(',').any(|x| x == "crt-static"));
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux") && !static_crt {
        println!("cargo:rustc-link-arg-bins=-no-pie");
    }
}
