//! Decompression bombs: a layer is a few bytes of gzip that could inflate to fill the
//! disk of a small device (a 1 MB blob of zeros inflates to 1 GB). While a layer is
//! unpacked, the bytes coming out of the decompressor are counted and the unpack stops
//! with [`crate::ImageError::TooLarge`] once they pass the smaller of
//!
//! * [`MAX_RATIO`] times the layer's declared (compressed) size, with a floor of
//!   [`MIN_LIMIT`] — gzip cannot legitimately exceed about 1032:1, so a stream that does
//!   is no honest gzip layer of that size;
//! * the space the store's filesystem had free when the unpack began, less a reserve
//!   (2 % of the filesystem, at least [`RESERVE`]): a layer never fills the disk the
//!   agent's state and the workloads' volumes live on;
//!
//! and a layer may hold at most [`MAX_ENTRIES`] files (an inode bomb of empty files
//! compresses to almost nothing too).

use std::io::Read;
use std::path::Path;
use std::sync::{Arc, Mutex};

/// Uncompressed bytes per compressed byte a layer may come to (gzip's ceiling is ~1032).
pub const MAX_RATIO: u64 = 1100;
/// The least a layer may come to, whatever its declared size.
pub const MIN_LIMIT: u64 = 64 << 20;
/// Entries (headers) in one layer's tar stream.
pub const MAX_ENTRIES: u64 = 2_000_000;
/// Space a layer leaves free: 2 % of the filesystem, at least this.
pub const RESERVE: u64 = 1 << 20;

/// The limit for one unpack, shared by the reader that counts and whoever asks why it
/// stopped.
#[derive(Clone, Debug)]
pub struct Cap {
    limit: u64,
    why: &'static str,
    exceeded: Arc<Mutex<Option<String>>>,
}

impl Cap {
    /// The limit for a layer of `declared` compressed bytes unpacked under `store_root`.
    pub fn for_layer(declared: u64, store_root: &Path) -> Cap {
        let by_ratio = declared.saturating_mul(MAX_RATIO).max(MIN_LIMIT);
        let by_disk = free_for_layers(store_root);
        match by_disk {
            Some(d) if d < by_ratio => Cap::new(d, "the space left on the disk: no space for it"),
            _ => Cap::new(by_ratio, "its compressed size times 1100"),
        }
    }

    pub fn new(limit: u64, why: &'static str) -> Cap {
        Cap { limit, why, exceeded: Arc::default() }
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Why the unpack was stopped, if it was.
    pub fn exceeded(&self) -> Option<String> {
        self.exceeded.lock().ok()?.clone()
    }

    fn trip(&self) {
        if let Ok(mut e) = self.exceeded.lock() {
            e.get_or_insert_with(|| self.why.to_string());
        }
    }
}

/// Bytes free on the store's filesystem for layers (free space less the reserve), if
/// the filesystem can be asked.
pub(crate) fn free_for_layers(root: &Path) -> Option<u64> {
    let st = nix::sys::statvfs::statvfs(root).ok()?;
    let frsize = st.fragment_size() as u64;
    let total = (st.blocks() as u64).saturating_mul(frsize);
    let free = (st.blocks_available() as u64).saturating_mul(frsize);
    let reserve = (total / 50).max(RESERVE);
    Some(free.saturating_sub(reserve))
}

/// A reader that stops (with an error) after `cap.limit()` bytes.
pub struct Capped<R> {
    inner: R,
    read: u64,
    cap: Cap,
}

impl<R> Capped<R> {
    pub fn new(inner: R, cap: Cap) -> Self {
        Capped { inner, read: 0, cap }
    }
}

impl<R: Read> Read for Capped<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read += n as u64;
        if self.read > self.cap.limit {
            self.cap.trip();
            return Err(std::io::Error::other(format!("more than {} bytes unpacked", self.cap.limit)));
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stream_past_its_cap_stops_and_says_why() {
        let cap = Cap::new(1000, "test");
        let mut r = Capped::new(std::io::repeat(0).take(5000), cap.clone());
        let mut out = vec![];
        assert!(r.read_to_end(&mut out).is_err());
        assert!(out.len() <= 1000 + 8192);
        assert_eq!(cap.exceeded().as_deref(), Some("test"));
        let ok = Cap::new(1000, "test");
        assert!(Capped::new(std::io::repeat(0).take(1000), ok.clone()).read_to_end(&mut vec![]).is_ok());
        assert_eq!(ok.exceeded(), None);
        let t = tempfile::tempdir().unwrap();
        let c = Cap::for_layer(1, t.path());
        assert!(c.limit() <= MIN_LIMIT, "a 1-byte layer may come to 64 MiB at most");
        assert!(Cap::for_layer(u64::MAX / 2, t.path()).limit() < u64::MAX / 2, "never past the free disk");
    }
}
