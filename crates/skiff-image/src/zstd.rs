//! zstd-compressed layers (`application/vnd.oci.image.layer.v1.tar+zstd`, and the
//! zstd:chunked variant), decoded in pure Rust with `ruzstd`.
//!
//! A layer is a sequence of zstd frames; skippable frames (zstd:chunked keeps its table of
//! contents and footer in them) decode to nothing. The window a frame may ask for is
//! bounded: a layer cannot make a small device allocate more than `MAX_WINDOW`.

use ruzstd::decoding::errors::{FrameDecoderError, ReadFrameHeaderError};
use ruzstd::decoding::{BlockDecodingStrategy, FrameDecoder};
use std::io::{BufRead, Read};

/// zstd's frame magic, as the first bytes of a stream.
pub const MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];

/// The largest window a frame may ask for (zstd's levels up to 19 use at most 8 MiB;
/// `--long` needs more and is refused with a clear error).
pub const MAX_WINDOW: u64 = 64 << 20;

/// Whether `head` starts a zstd frame (a skippable frame also counts: zstd:chunked
/// layers never start with one, but a zstd stream may).
pub fn is_zstd(head: &[u8]) -> bool {
    head.starts_with(&MAGIC) || is_skippable(head)
}

/// Whether `head` starts a skippable frame (magic `0x184D2A5?`, little-endian).
pub fn is_skippable(head: &[u8]) -> bool {
    head.len() >= 4 && head[1..4] == [0x2a, 0x4d, 0x18] && head[0] & 0xf0 == 0x50
}

/// `Read` over every frame of a zstd stream, in order.
pub struct ZstdFrames<R> {
    src: R,
    dec: FrameDecoder,
    in_frame: bool,
}

impl<R: BufRead> ZstdFrames<R> {
    pub fn new(src: R) -> Self {
        let mut dec = FrameDecoder::new();
        dec.set_max_window_size(MAX_WINDOW);
        ZstdFrames { src, dec, in_frame: false }
    }
}

fn bad(e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, format!("zstd: {e}"))
}

impl<R: BufRead> Read for ZstdFrames<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        // Bounded: each turn decodes a block, opens a frame or skips one, and the input is finite.
        loop {
            if self.in_frame {
                if self.dec.can_collect() > 0 {
                    return self.dec.read(buf);
                }
                if self.dec.is_finished() {
                    self.in_frame = false;
                    continue;
                }
                self.dec.decode_blocks(&mut self.src, BlockDecodingStrategy::UptoBlocks(1)).map_err(bad)?;
                continue;
            }
            if self.src.fill_buf()?.is_empty() {
                return Ok(0);
            }
            match self.dec.reset(&mut self.src) {
                Ok(()) => self.in_frame = true,
                Err(FrameDecoderError::ReadFrameHeaderError(ReadFrameHeaderError::SkipFrame { length, .. })) => {
                    let skipped = std::io::copy(&mut (&mut self.src).take(u64::from(length)), &mut std::io::sink())?;
                    if skipped != u64::from(length) {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::UnexpectedEof,
                            "zstd: the stream ends inside a skippable frame",
                        ));
                    }
                }
                Err(e) => return Err(bad(e)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(data: &[u8]) -> Vec<u8> {
        ruzstd::encoding::compress_to_vec(data, ruzstd::encoding::CompressionLevel::Fastest)
    }

    fn skippable(data: &[u8]) -> Vec<u8> {
        let mut v = vec![0x50, 0x2a, 0x4d, 0x18];
        v.extend_from_slice(&(data.len() as u32).to_le_bytes());
        v.extend_from_slice(data);
        v
    }

    fn decode(b: &[u8]) -> std::io::Result<Vec<u8>> {
        let mut out = vec![];
        ZstdFrames::new(std::io::BufReader::with_capacity(7, b)).read_to_end(&mut out)?;
        Ok(out)
    }

    #[test]
    fn frames_decode_in_order_and_skippable_frames_to_nothing() {
        let a: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut stream = frame(&a);
        stream.extend(skippable(b"table of contents"));
        stream.extend(frame(b"tail"));
        stream.extend(frame(b""));
        stream.extend(skippable(b""));
        assert!(is_zstd(&stream));
        assert!(is_zstd(&skippable(b"x")));
        assert!(!is_zstd(&[0x1f, 0x8b, 8, 0]));
        let mut want = a.clone();
        want.extend_from_slice(b"tail");
        assert_eq!(decode(&stream).unwrap(), want);
        assert_eq!(decode(&[]).unwrap(), Vec::<u8>::new());
    }

    #[test]
    fn damage_is_an_error_not_a_short_stream() {
        let mut stream = frame(b"hello world, hello world");
        stream.extend(skippable(b"toc"));
        let cut = &stream[..stream.len() - 1];
        assert_eq!(decode(cut).unwrap_err().kind(), std::io::ErrorKind::UnexpectedEof);
        let mut bad_magic = frame(b"x");
        bad_magic.extend_from_slice(b"garbage!");
        assert!(decode(&bad_magic).unwrap_err().to_string().contains("zstd"), "named");
        let truncated = frame(&[7u8; 5000]);
        assert!(decode(&truncated[..truncated.len() / 2]).is_err());
    }
}
