//! Who may read what under the data directory. Unpacked layers keep their setuid binaries
//! and device nodes, the stores hold environment secrets, instance bundles hold whole
//! specs: none of it is for local users. As Docker's `/var/lib/docker` (0710), the data
//! directory is traversable but not listable (0711) and everything directly in it is
//! its owner's alone (directories 0700, files 0600). Processes that must reach one
//! place below (a WebAssembly shim after it dropped privileges) get that place opened
//! up explicitly with [`traversable`].

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
#[error("securing {path}: {source}")]
pub struct PermError {
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

/// The process's file-creation mask: nothing new is readable by group or others unless
/// its mode is set explicitly afterwards.
pub const UMASK: u32 = 0o077;

/// Sets the process umask to [`UMASK`].
pub fn restrict_umask() {
    rustix::process::umask(rustix::fs::Mode::from_bits_truncate(UMASK));
}

/// Makes `data` 0711 and every entry directly in it owner-only (directories 0700, files
/// 0600), except the names in `traversable_dirs`, which become 0711 (their own entries
/// are then secured by whoever owns them). Symlinks are left alone. Creates `data`.
pub fn secure_data_dir(data: &Path, traversable_dirs: &[&str]) -> Result<(), PermError> {
    let err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| PermError { path, source }
    };
    std::fs::create_dir_all(data).map_err(err(data))?;
    set_mode(data, 0o711).map_err(err(data))?;
    for entry in std::fs::read_dir(data).map_err(err(data))? {
        let entry = entry.map_err(err(data))?;
        let path = entry.path();
        let ft = entry.file_type().map_err(err(&path))?;
        let mode = if ft.is_dir() {
            let name = entry.file_name();
            if traversable_dirs.iter().any(|d| name == std::ffi::OsStr::new(d)) {
                0o711
            } else {
                0o700
            }
        } else if ft.is_file() {
            0o600
        } else {
            continue;
        };
        set_mode(&path, mode).map_err(err(&path))?;
    }
    Ok(())
}

/// Makes a directory (created if missing) traversable but not listable by others (0711).
pub fn traversable(dir: &Path) -> Result<(), PermError> {
    let err = |source| PermError { path: dir.to_path_buf(), source };
    std::fs::create_dir_all(dir).map_err(err)?;
    set_mode(dir, 0o711).map_err(err)
}

fn set_mode(path: &Path, mode: u32) -> std::io::Result<()> {
    let meta = std::fs::symlink_metadata(path)?;
    if meta.permissions().mode() & 0o7777 != mode {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_data_dir_is_traversable_and_its_entries_private() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("data");
        std::fs::create_dir_all(d.join("images/layers")).unwrap();
        std::fs::create_dir_all(d.join("wasm")).unwrap();
        std::fs::write(d.join("hub.db"), "secret").unwrap();
        std::fs::set_permissions(d.join("hub.db"), std::fs::Permissions::from_mode(0o644)).unwrap();
        std::os::unix::fs::symlink("/etc", d.join("link")).unwrap();
        secure_data_dir(&d, &["wasm"]).unwrap();
        let mode = |p: &str| std::fs::symlink_metadata(d.join(p)).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode(""), 0o711);
        assert_eq!(mode("images"), 0o700);
        assert_eq!(mode("wasm"), 0o711);
        assert_eq!(mode("hub.db"), 0o600);
        assert_eq!(std::fs::metadata("/etc").unwrap().permissions().mode() & 0o777, 0o755, "links not followed");
    }
}
