//! Unpacks one image layer (a tar stream) into its own directory, in the form overlayfs
//! expects for a lower directory:
//!
//! * a whiteout `.wh.NAME` becomes a 0/0 character device `NAME`;
//! * an opaque marker `.wh..wh..opq` becomes the `trusted.overlay.opaque=y` xattr on its
//!   directory;
//! * hard links, symlinks, devices, fifos, ownership, modes and xattrs are kept.
//!
//! Every entry is checked before anything is written: absolute paths and `..` components
//! are rejected, and no entry may be written through a symlink (a layer that creates
//! `etc -> /host/etc` and then `etc/passwd` would otherwise write outside the layer).
//! The first bad entry aborts the whole layer; the caller removes the partial directory.

use std::fs;
use std::io::Read;
use std::os::unix::fs::{lchown, symlink, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum UnpackError {
    #[error("entry {path:?}: absolute paths are not allowed in a layer")]
    AbsolutePath { path: String },
    #[error("entry {path:?}: '..' components are not allowed in a layer")]
    ParentTraversal { path: String },
    #[error("entry {path:?}: writes through the symlink {link:?}")]
    ThroughSymlink { path: String, link: String },
    #[error("entry {path:?}: {problem}")]
    BadEntry { path: String, problem: String },
    #[error("entry {path:?}: {}", crate::error::with_causes(source))]
    Io { path: String, source: std::io::Error },
    #[error("reading the layer tar: {0}")]
    Tar(std::io::Error),
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct UnpackStats {
    pub entries: u64,
    pub whiteouts: u64,
}

const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE: &str = ".wh..wh..opq";

/// Turns a tar path into a clean relative path, or rejects it.
fn clean_path(raw: &str) -> Result<Option<PathBuf>, UnpackError> {
    let p = Path::new(raw);
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::RootDir | Component::Prefix(_) => {
                return Err(UnpackError::AbsolutePath { path: raw.to_string() });
            }
            Component::ParentDir => return Err(UnpackError::ParentTraversal { path: raw.to_string() }),
            Component::CurDir => {}
            Component::Normal(n) => out.push(n),
        }
    }
    Ok(if out.as_os_str().is_empty() { None } else { Some(out) })
}

/// Makes sure every ancestor of `rel` inside `root` is a real directory (creating missing
/// ones), never a symlink.
fn ensure_parents(root: &Path, rel: &Path, raw: &str) -> Result<(), UnpackError> {
    let mut cur = root.to_path_buf();
    let Some(parent) = rel.parent() else {
        return Ok(());
    };
    for c in parent.components() {
        cur.push(c);
        match fs::symlink_metadata(&cur) {
            Ok(m) if m.file_type().is_symlink() => {
                return Err(UnpackError::ThroughSymlink {
                    path: raw.to_string(),
                    link: cur.strip_prefix(root).unwrap_or(&cur).display().to_string(),
                });
            }
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(UnpackError::BadEntry {
                    path: raw.to_string(),
                    problem: format!("parent {} is not a directory", cur.display()),
                });
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                fs::create_dir(&cur).map_err(|source| UnpackError::Io { path: raw.to_string(), source })?;
                fs::set_permissions(&cur, fs::Permissions::from_mode(0o755))
                    .map_err(|source| UnpackError::Io { path: raw.to_string(), source })?;
            }
            Err(source) => return Err(UnpackError::Io { path: raw.to_string(), source }),
        }
    }
    Ok(())
}

/// Removes whatever non-directory sits at `target` so that creating it cannot follow an
/// earlier symlink of the same layer.
fn clear_target(target: &Path, raw: &str) -> Result<(), UnpackError> {
    match fs::symlink_metadata(target) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => fs::remove_file(target).map_err(|source| UnpackError::Io { path: raw.to_string(), source }),
        Err(_) => Ok(()),
    }
}

fn mknod(target: &Path, kind: nix::sys::stat::SFlag, mode: u32, major: u64, minor: u64) -> std::io::Result<()> {
    use nix::sys::stat::{makedev, Mode};
    nix::sys::stat::mknod(target, kind, Mode::from_bits_truncate(mode), makedev(major, minor))
        .map_err(std::io::Error::from)
}

/// Unpacks an uncompressed layer tar stream into `root`, which must exist.
pub fn unpack_layer<R: Read>(reader: R, root: &Path) -> Result<UnpackStats, UnpackError> {
    let mut ar = tar::Archive::new(reader);
    ar.set_preserve_permissions(true);
    ar.set_preserve_ownerships(true);
    ar.set_unpack_xattrs(true);
    ar.set_preserve_mtime(true);
    let mut stats = UnpackStats::default();
    for entry in ar.entries().map_err(UnpackError::Tar)? {
        let mut entry = entry.map_err(UnpackError::Tar)?;
        let raw = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let io = |source| UnpackError::Io { path: raw.clone(), source };
        let Some(rel) = clean_path(&raw)? else {
            continue;
        };
        stats.entries += 1;
        if stats.entries > crate::bomb::MAX_ENTRIES {
            let problem = format!("more than {} entries in one layer (an inode bomb)", crate::bomb::MAX_ENTRIES);
            return Err(UnpackError::BadEntry { path: raw, problem });
        }
        ensure_parents(root, &rel, &raw)?;
        let target = root.join(&rel);
        let name = rel.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();

        if name == OPAQUE {
            stats.whiteouts += 1;
            let dir = target.parent().unwrap_or(root);
            xattr::set(dir, "trusted.overlay.opaque", b"y").map_err(io)?;
            continue;
        }
        if let Some(hidden) = name.strip_prefix(WHITEOUT_PREFIX) {
            stats.whiteouts += 1;
            if hidden.is_empty() || hidden == "." || hidden == ".." {
                return Err(UnpackError::BadEntry { path: raw, problem: "malformed whiteout".into() });
            }
            let wh = target.with_file_name(hidden);
            clear_target(&wh, &raw)?;
            if wh.is_dir() {
                fs::remove_dir_all(&wh).map_err(io)?;
            }
            mknod(&wh, nix::sys::stat::SFlag::S_IFCHR, 0, 0, 0).map_err(io)?;
            continue;
        }

        let header = entry.header();
        let mode = header.mode().unwrap_or(0o644) & 0o7777;
        let uid = header.uid().unwrap_or(0);
        let gid = header.gid().unwrap_or(0);
        let kind = header.entry_type();
        match kind {
            tar::EntryType::Directory => {
                match fs::symlink_metadata(&target) {
                    Ok(m) if m.is_dir() => {}
                    Ok(_) => {
                        fs::remove_file(&target).map_err(io)?;
                        fs::create_dir(&target).map_err(io)?;
                    }
                    Err(_) => fs::create_dir(&target).map_err(io)?,
                }
                lchown(&target, Some(uid as u32), Some(gid as u32)).map_err(io)?;
                fs::set_permissions(&target, fs::Permissions::from_mode(mode)).map_err(io)?;
                set_xattrs(&mut entry, &target).map_err(io)?;
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                clear_target(&target, &raw)?;
                entry.unpack(&target).map_err(io)?;
            }
            tar::EntryType::Symlink => {
                let link = entry.link_name().map_err(io)?.ok_or_else(|| UnpackError::BadEntry {
                    path: raw.clone(),
                    problem: "symlink without a target".into(),
                })?;
                clear_target(&target, &raw)?;
                symlink(&link, &target).map_err(io)?;
                lchown(&target, Some(uid as u32), Some(gid as u32)).map_err(io)?;
            }
            tar::EntryType::Link => {
                let link_raw =
                    entry.link_name_bytes().map(|b| String::from_utf8_lossy(&b).into_owned()).ok_or_else(|| {
                        UnpackError::BadEntry { path: raw.clone(), problem: "hard link without a target".into() }
                    })?;
                let link_rel = clean_path(&link_raw)?.ok_or_else(|| UnpackError::BadEntry {
                    path: raw.clone(),
                    problem: "hard link to the layer root".into(),
                })?;
                ensure_parents(root, &link_rel, &link_raw)?;
                let src = root.join(&link_rel);
                if fs::symlink_metadata(&src).is_err() {
                    return Err(UnpackError::BadEntry {
                        path: raw,
                        problem: format!("hard link target {link_raw:?} is not in this layer"),
                    });
                }
                clear_target(&target, &raw)?;
                // linkat without AT_SYMLINK_FOLLOW: links the symlink itself, never its target.
                fs::hard_link(&src, &target).map_err(io)?;
            }
            tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => {
                use nix::sys::stat::SFlag;
                let sflag = match kind {
                    tar::EntryType::Char => SFlag::S_IFCHR,
                    tar::EntryType::Block => SFlag::S_IFBLK,
                    _ => SFlag::S_IFIFO,
                };
                let major = header.device_major().ok().flatten().unwrap_or(0);
                let minor = header.device_minor().ok().flatten().unwrap_or(0);
                clear_target(&target, &raw)?;
                mknod(&target, sflag, mode, u64::from(major), u64::from(minor)).map_err(io)?;
                lchown(&target, Some(uid as u32), Some(gid as u32)).map_err(io)?;
            }
            tar::EntryType::XGlobalHeader
            | tar::EntryType::XHeader
            | tar::EntryType::GNULongName
            | tar::EntryType::GNULongLink => {}
            other => {
                return Err(UnpackError::BadEntry {
                    path: raw,
                    problem: format!("unsupported tar entry type {other:?}"),
                });
            }
        }
    }
    Ok(stats)
}

fn set_xattrs<R: Read>(entry: &mut tar::Entry<'_, R>, target: &Path) -> std::io::Result<()> {
    let Some(exts) = entry.pax_extensions()? else {
        return Ok(());
    };
    for ext in exts {
        let ext = ext?;
        let Ok(key) = ext.key() else { continue };
        if let Some(name) = key.strip_prefix("SCHILY.xattr.") {
            // Best effort, as Docker: some filesystems refuse some namespaces.
            if let Err(e) = xattr::set(target, name, ext.value_bytes()) {
                tracing::debug!(path = %target.display(), xattr = name, error = %e, "xattr not set");
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_paths() {
        assert_eq!(clean_path("./a/b").unwrap(), Some(PathBuf::from("a/b")));
        assert_eq!(clean_path("./").unwrap(), None);
        assert!(matches!(clean_path("/etc/passwd"), Err(UnpackError::AbsolutePath { .. })));
        assert!(matches!(clean_path("a/../../x"), Err(UnpackError::ParentTraversal { .. })));
        assert!(matches!(clean_path(".."), Err(UnpackError::ParentTraversal { .. })));
    }
}
