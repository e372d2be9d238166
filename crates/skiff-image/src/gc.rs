//! Garbage collection: removing what no reference reaches, and pruning unused images when
//! the disk holding the store crosses a high-water mark (kubelet's image GC: above
//! `high_percent` used, remove the least recently stored unused images until at or below
//! `low_percent`). Images in use are never removed.
//!
//! Architecture Invariant: a pull or load holds a shared lease (`flock(LOCK_SH)` on
//! `<root>/gc.lock`) from its first blob to its tag; collection takes the lock exclusively
//! and without waiting, so it never removes blobs a running pull has stored but not yet
//! tagged. A collection that finds the store busy does nothing.

use crate::error::IoContext;
use crate::{normalize_reference, ImageError, ImageStore};
use nix::fcntl::{Flock, FlockArg};
use std::collections::BTreeSet;
use std::fs::File;

/// When automatic pruning starts and where it stops, in percent of the disk used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GcPolicy {
    pub high_percent: u8,
    pub low_percent: u8,
    /// Images stored more recently than this are never pruned (kubelet's
    /// `--minimum-image-ttl-duration`): one loaded or pulled for a deployment that has
    /// not reached the node yet must survive until it does.
    pub min_age: std::time::Duration,
}

/// Kubelet's default minimum image age.
pub const DEFAULT_MIN_AGE: std::time::Duration = std::time::Duration::from_secs(120);

impl Default for GcPolicy {
    /// Kubelet's defaults.
    fn default() -> Self {
        GcPolicy { high_percent: 85, low_percent: 80, min_age: DEFAULT_MIN_AGE }
    }
}

impl GcPolicy {
    pub fn new(high_percent: u8, low_percent: u8) -> Result<Self, String> {
        if high_percent == 0 || high_percent > 100 {
            return Err(format!("image GC high-water mark {high_percent}% must be within 1..=100"));
        }
        if low_percent >= high_percent {
            return Err(format!(
                "image GC low-water mark {low_percent}% must be below the high-water mark {high_percent}%"
            ));
        }
        Ok(GcPolicy { high_percent, low_percent, min_age: DEFAULT_MIN_AGE })
    }

    pub fn with_min_age(self, min_age: std::time::Duration) -> Self {
        GcPolicy { min_age, ..self }
    }
}

/// What an automatic prune did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Pruned {
    /// References removed, oldest first.
    pub removed: Vec<String>,
    pub freed_bytes: u64,
    pub used_percent_before: f64,
    pub used_percent_after: f64,
}

/// Held by pulls and loads; see the module invariant.
pub struct Lease(#[allow(dead_code)] Flock<File>);

fn lock_file(store: &ImageStore) -> Result<File, ImageError> {
    let p = store.root().join("gc.lock");
    std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&p).ctx("open", &p)
}

/// Waits for `arg` on `f` (the file at `path`, for messages).
fn lock(f: File, arg: FlockArg, path: &std::path::Path) -> Result<Flock<File>, ImageError> {
    Flock::lock(f, arg).map_err(|(_, e)| ImageError::Io { op: "lock", path: path.to_path_buf(), source: e.into() })
}

/// Waits for the exclusive lock of `f` (a partial download, a chunk pool).
pub(crate) fn lock_exclusive(f: File, path: &std::path::Path) -> Result<Flock<File>, ImageError> {
    lock(f, FlockArg::LockExclusive, path)
}

impl ImageStore {
    /// A shared lease for a pull or load; waits only while a collection runs.
    pub fn lease(&self) -> Result<Lease, ImageError> {
        lock(lock_file(self)?, FlockArg::LockShared, &self.root().join("gc.lock")).map(Lease)
    }

    /// The exclusive lock for collection, or `None` while a pull or load holds a lease.
    pub(crate) fn try_exclusive(&self) -> Result<Option<Flock<File>>, ImageError> {
        let f = lock_file(self)?;
        match Flock::lock(f, FlockArg::LockExclusiveNonblock) {
            Ok(l) => Ok(Some(l)),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(None),
            Err((_, e)) => {
                Err(ImageError::Io { op: "lock", path: self.root().join("gc.lock"), source: std::io::Error::from(e) })
            }
        }
    }

    /// Percent of the store's filesystem in use (capacity minus what is available to
    /// unprivileged users, as `df` and the kubelet count it).
    pub fn disk_used_percent(&self) -> Result<f64, ImageError> {
        let s = nix::sys::statvfs::statvfs(self.root()).map_err(|e| ImageError::Io {
            op: "statvfs",
            path: self.root().to_path_buf(),
            source: std::io::Error::from(e),
        })?;
        let frsize = s.fragment_size() as f64;
        let total = s.blocks() as f64 * frsize;
        if total <= 0.0 {
            return Ok(0.0);
        }
        Ok((total - s.blocks_available() as f64 * frsize) / total * 100.0)
    }

    /// Prunes unused images, least recently stored first, when the disk is above the
    /// high-water mark, until it is at or below the low-water mark. `in_use` holds the
    /// references of running or desired workloads. Returns `None` when nothing was due or
    /// a pull holds the store.
    pub fn prune_to_watermark(
        &self,
        policy: &GcPolicy,
        in_use: &BTreeSet<String>,
    ) -> Result<Option<Pruned>, ImageError> {
        let before = self.disk_used_percent()?;
        if before < f64::from(policy.high_percent) {
            return Ok(None);
        }
        let Some(_lock) = self.try_exclusive()? else {
            return Ok(None);
        };
        let in_use: BTreeSet<String> = in_use.iter().map(|r| normalize_reference(r)).collect();
        let mut out = Pruned { used_percent_before: before, ..Default::default() };
        out.freed_bytes += self.gc_unlocked()?;
        let low = f64::from(policy.low_percent);
        let mut candidates: Vec<(std::time::SystemTime, String)> = vec![];
        let young = std::time::SystemTime::now().checked_sub(policy.min_age).unwrap_or(std::time::UNIX_EPOCH);
        let refs = self.refs_map()?;
        let used_digests: BTreeSet<&String> =
            refs.iter().filter(|(r, _)| in_use.contains(*r)).map(|(_, d)| d).collect();
        for (r, d) in &refs {
            if in_use.contains(r) || used_digests.contains(d) {
                continue;
            }
            let stored = self.blob_path(d).ok().and_then(|p| p.metadata().ok()).and_then(|m| m.modified().ok());
            let stored = stored.unwrap_or(std::time::UNIX_EPOCH);
            if stored > young {
                continue;
            }
            candidates.push((stored, r.clone()));
        }
        candidates.sort();
        for (_, r) in candidates {
            if self.disk_used_percent()? <= low {
                break;
            }
            self.untag(&r)?;
            out.freed_bytes += self.gc_unlocked()?;
            out.removed.push(r);
        }
        out.used_percent_after = self.disk_used_percent()?;
        Ok(Some(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies_are_checked() {
        assert_eq!(GcPolicy::new(90, 70), Ok(GcPolicy { high_percent: 90, low_percent: 70, min_age: DEFAULT_MIN_AGE }));
        assert!(GcPolicy::new(70, 70).unwrap_err().contains("below the high-water mark 70%"));
        assert!(GcPolicy::new(101, 70).unwrap_err().contains("within 1..=100"));
        assert_eq!(GcPolicy::default(), GcPolicy { high_percent: 85, low_percent: 80, min_age: DEFAULT_MIN_AGE });
    }

    #[test]
    fn collection_waits_for_no_pull() {
        let tmp = tempfile::tempdir().unwrap();
        let store = ImageStore::open(tmp.path()).unwrap();
        let lease = store.lease().unwrap();
        let second = store.lease().unwrap();
        assert!(store.try_exclusive().unwrap().is_none(), "a lease blocks collection");
        assert!(matches!(store.gc(), Err(ImageError::Busy)));
        drop((lease, second));
        assert!(store.try_exclusive().unwrap().is_some());
        assert_eq!(store.gc().unwrap(), 0);
    }
}
