//! sha256 digests and a reader that hashes what passes through it.

use crate::ImageError;
use sha2::{Digest as _, Sha256};
use std::io::Read;

/// Validates `sha256:<64 lower-case hex>` and returns the hex part.
pub fn sha256_hex(digest: &str) -> Result<&str, ImageError> {
    let hex = digest.strip_prefix("sha256:").ok_or_else(|| ImageError::BadDigest(digest.to_string()))?;
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        return Err(ImageError::BadDigest(digest.to_string()));
    }
    Ok(hex)
}

pub fn sha256_of(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Hashes and counts every byte read through it.
pub struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
    pub bytes: u64,
}

impl<R: Read> HashingReader<R> {
    pub fn new(inner: R) -> Self {
        HashingReader { inner, hasher: Sha256::new(), bytes: 0 }
    }

    /// Reads to the end (so trailing padding is hashed too) and returns the hex digest.
    pub fn finish(mut self) -> std::io::Result<String> {
        std::io::copy(&mut self, &mut std::io::sink())?;
        Ok(hex::encode(self.hasher.finalize()))
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests() {
        let good = format!("sha256:{}", "a".repeat(64));
        assert!(sha256_hex(&good).is_ok());
        for bad in
            ["", "sha256:", "md5:abc", &format!("sha256:{}", "A".repeat(64)), &format!("sha256:{}/..", "a".repeat(61))]
        {
            assert!(sha256_hex(bad).is_err(), "{bad}");
        }
        let mut r = HashingReader::new(&b"abc"[..]);
        let mut v = vec![];
        r.read_to_end(&mut v).unwrap();
        assert_eq!(r.finish().unwrap(), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }
}
