//! Random bytes from the kernel (`getrandom(2)`). There is no fallback: a process that
//! cannot get randomness must not make keys, tokens or serials out of zeros.

/// The kernel would not give random bytes.
#[derive(Debug, thiserror::Error)]
#[error("reading random bytes from the kernel: {0}")]
pub struct RandomError(String);

/// `N` random bytes.
pub fn bytes<const N: usize>() -> Result<[u8; N], RandomError> {
    let mut b = [0u8; N];
    getrandom::fill(&mut b).map_err(|e| RandomError(e.to_string()))?;
    Ok(b)
}

/// `2 × n` lower-case hex characters of `n` random bytes.
pub fn hex(n: usize) -> Result<String, RandomError> {
    let mut b = vec![0u8; n];
    getrandom::fill(&mut b).map_err(|e| RandomError(e.to_string()))?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

#[cfg(test)]
mod tests {
    #[test]
    fn bytes_differ_and_hex_has_the_length_asked() {
        assert_ne!(super::bytes::<16>().unwrap(), super::bytes::<16>().unwrap());
        let h = super::hex(6).unwrap();
        assert_eq!(h.len(), 12);
        assert!(h.chars().all(|c| c.is_ascii_hexdigit()));
    }
}
