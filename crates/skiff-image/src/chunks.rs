//! Chunk index: content-defined chunks (FastCDC) of each layer's uncompressed tar stream,
//! each named by its sha256. Two versions of a layer that differ by an edit in one file
//! share every chunk but those around the edit, so an update (a bundle, a fetch from a
//! cache) carries only the chunks the node lacks and the node rebuilds the exact tar from
//! chunks of layers it already holds, then checks the tar's diff_id.
//!
//! ```text
//! <root>/chunks/<diff-id-hex>   the index of one unpacked layer (binary, see `encode`)
//! ```
//!
//! An index is written when a layer is unpacked (the stream is chunked as it passes,
//! in memory bounded by the largest chunk) and made on demand for layers unpacked before.
//! Architecture Invariant: an index is only a hint; every chunk read from a layer is
//! checked against its digest, and a rebuilt layer against its diff_id.

use crate::digest::sha256_hex;
use crate::error::IoContext;
use crate::store::LayerRef;
use crate::{ImageError, ImageStore};
use sha2::{Digest as _, Sha256};
use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::{BufReader, Read, Write};
use std::path::PathBuf;

/// Chunk sizes (bytes). Chosen by measurement (`cargo run -p xtask -- chunk-sizes`, see
/// ARCHITECTURE.md): 16 KiB on average keeps the delta of a 1 MiB edit near 1 MiB and
/// finds most of what two builds of one program share, for an index of 36 bytes per
/// chunk (0.2 % of the layer).
pub const MIN_SIZE: usize = 4 << 10;
pub const AVG_SIZE: usize = 16 << 10;
pub const MAX_SIZE: usize = 64 << 10;

const MAGIC: &[u8; 13] = b"skiff-chunks\x01";
/// One entry of an encoded chunk list: the sha256, then the length (u32, little endian).
pub const ENTRY_LEN: usize = 36;

/// A chunk: its sha256 and its length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ChunkRef {
    pub digest: [u8; 32],
    pub len: u32,
}

impl ChunkRef {
    pub fn of(data: &[u8]) -> ChunkRef {
        ChunkRef { digest: Sha256::digest(data).into(), len: data.len() as u32 }
    }

    pub fn name(&self) -> String {
        format!("sha256:{}", hex::encode(self.digest))
    }
}

/// A chunk list as bytes: `ENTRY_LEN` bytes per chunk.
pub fn encode_list(chunks: &[ChunkRef]) -> Vec<u8> {
    let mut out = Vec::with_capacity(chunks.len() * ENTRY_LEN);
    for c in chunks {
        out.extend_from_slice(&c.digest);
        out.extend_from_slice(&c.len.to_le_bytes());
    }
    out
}

pub fn decode_list(bytes: &[u8], what: &str) -> Result<Vec<ChunkRef>, ImageError> {
    if !bytes.len().is_multiple_of(ENTRY_LEN) {
        return Err(malformed(
            what,
            format!("{} bytes is not a whole number of {ENTRY_LEN}-byte entries", bytes.len()),
        ));
    }
    bytes
        .chunks_exact(ENTRY_LEN)
        .map(|e| {
            let mut digest = [0u8; 32];
            digest.copy_from_slice(&e[..32]);
            let len = u32::from_le_bytes([e[32], e[33], e[34], e[35]]);
            if len == 0 || len as usize > MAX_SIZE {
                return Err(malformed(what, format!("a chunk of {len} bytes (chunks are 1..={MAX_SIZE})")));
            }
            Ok(ChunkRef { digest, len })
        })
        .collect()
}

fn malformed(what: &str, problem: impl Into<String>) -> ImageError {
    ImageError::Malformed { what: what.to_string(), problem: problem.into() }
}

/// Cuts a stream into content-defined chunks as it is pushed in. Memory: at most one
/// pushed buffer plus `MAX_SIZE`.
pub struct Chunker {
    buf: Vec<u8>,
    start: usize,
    sizes: (usize, usize, usize),
    masks: (u64, u64),
}

impl Default for Chunker {
    fn default() -> Self {
        Chunker::with_sizes(MIN_SIZE, AVG_SIZE, MAX_SIZE)
    }
}

impl Chunker {
    /// Other chunk sizes than the store's: for measuring which to choose.
    pub fn with_sizes(min: usize, avg: usize, max: usize) -> Chunker {
        Chunker {
            buf: Vec::with_capacity(2 * max),
            start: 0,
            sizes: (min, avg, max),
            masks: fastcdc::v2020::select_masks(avg, fastcdc::v2020::Normalization::Level1),
        }
    }

    fn cut(&self, data: &[u8]) -> usize {
        let (s, l) = self.masks;
        let (min, avg, max) = self.sizes;
        fastcdc::v2020::cut(data, min, avg, max, s, l, s << 1, l << 1).1
    }

    /// Adds `data`; `sink` gets each chunk that is complete.
    pub fn push<E>(&mut self, data: &[u8], sink: &mut impl FnMut(&[u8]) -> Result<(), E>) -> Result<(), E> {
        self.buf.extend_from_slice(data);
        while self.buf.len() - self.start >= self.sizes.2 {
            let n = self.cut(&self.buf[self.start..]);
            sink(&self.buf[self.start..self.start + n])?;
            self.start += n;
        }
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        Ok(())
    }

    /// Ends the stream: `sink` gets the chunks still held.
    pub fn finish<E>(mut self, sink: &mut impl FnMut(&[u8]) -> Result<(), E>) -> Result<(), E> {
        while self.start < self.buf.len() {
            let n = self.cut(&self.buf[self.start..]).max(1);
            sink(&self.buf[self.start..self.start + n])?;
            self.start += n;
        }
        Ok(())
    }
}

/// The chunk list of everything `r` yields.
pub fn chunk_stream(mut r: impl Read) -> std::io::Result<Vec<ChunkRef>> {
    let mut out = ChunkingReader::new(&mut r);
    std::io::copy(&mut out, &mut std::io::sink())?;
    Ok(out.finish())
}

/// Chunks (and names the chunks of) everything read through it.
pub struct ChunkingReader<R> {
    inner: R,
    chunker: Chunker,
    chunks: Vec<ChunkRef>,
}

impl<R: Read> ChunkingReader<R> {
    pub fn new(inner: R) -> Self {
        ChunkingReader { inner, chunker: Chunker::default(), chunks: vec![] }
    }

    /// The chunks of what was read (call after the end of the stream).
    pub fn finish(self) -> Vec<ChunkRef> {
        let mut chunks = self.chunks;
        let _ = self.chunker.finish(&mut |c: &[u8]| -> Result<(), ()> {
            chunks.push(ChunkRef::of(c));
            Ok(())
        });
        chunks
    }
}

impl<R: Read> Read for ChunkingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        let chunks = &mut self.chunks;
        let _ = self.chunker.push(&buf[..n], &mut |c: &[u8]| -> Result<(), ()> {
            chunks.push(ChunkRef::of(c));
            Ok(())
        });
        Ok(n)
    }
}

/// The stored index of one layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkIndex {
    /// The blob the stream was read from (the layer's, possibly compressed).
    pub source: String,
    pub chunks: Vec<ChunkRef>,
}

impl ChunkIndex {
    pub fn total(&self) -> u64 {
        self.chunks.iter().map(|c| u64::from(c.len)).sum()
    }

    /// `MAGIC`, the three sizes (u32 LE), the source digest (u16 LE length, bytes), then
    /// the chunk list.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = MAGIC.to_vec();
        for s in [MIN_SIZE, AVG_SIZE, MAX_SIZE] {
            out.extend_from_slice(&(s as u32).to_le_bytes());
        }
        out.extend_from_slice(&(self.source.len() as u16).to_le_bytes());
        out.extend_from_slice(self.source.as_bytes());
        out.extend_from_slice(&encode_list(&self.chunks));
        out
    }

    /// `None` for an index made with other chunk sizes (it is made again).
    pub fn decode(bytes: &[u8], what: &str) -> Result<Option<ChunkIndex>, ImageError> {
        let rest = bytes.strip_prefix(&MAGIC[..]).ok_or_else(|| malformed(what, "not a chunk index"))?;
        if rest.len() < 14 {
            return Err(malformed(what, "truncated"));
        }
        let u32_at = |i: usize| u32::from_le_bytes([rest[i], rest[i + 1], rest[i + 2], rest[i + 3]]) as usize;
        if (u32_at(0), u32_at(4), u32_at(8)) != (MIN_SIZE, AVG_SIZE, MAX_SIZE) {
            return Ok(None);
        }
        let slen = u16::from_le_bytes([rest[12], rest[13]]) as usize;
        let rest = &rest[14..];
        if rest.len() < slen {
            return Err(malformed(what, "truncated"));
        }
        let source = std::str::from_utf8(&rest[..slen]).map_err(|_| malformed(what, "source is not UTF-8"))?;
        sha256_hex(source)?;
        Ok(Some(ChunkIndex { source: source.to_string(), chunks: decode_list(&rest[slen..], what)? }))
    }
}

/// Where a chunk can be read from this store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    pub diff_id: String,
    pub offset: u64,
    pub len: u32,
}

impl ImageStore {
    fn chunks_dir(&self) -> PathBuf {
        self.root().join("chunks")
    }

    fn index_path(&self, diff_id: &str) -> Result<PathBuf, ImageError> {
        Ok(self.chunks_dir().join(sha256_hex(diff_id)?))
    }

    /// Keeps the chunk index of the layer `diff_id`, made from the blob `source`.
    pub(crate) fn put_chunk_index(&self, diff_id: &str, index: &ChunkIndex) -> Result<(), ImageError> {
        let dir = self.chunks_dir();
        fs::create_dir_all(&dir).ctx("create", &dir)?;
        let path = self.index_path(diff_id)?;
        skiff_sys::durable::write(&path, &index.encode(), 0o644).map_err(|e| ImageError::Io {
            op: "write",
            path: e.path,
            source: e.source,
        })
    }

    pub(crate) fn stored_chunk_index(&self, diff_id: &str) -> Result<Option<ChunkIndex>, ImageError> {
        let path = self.index_path(diff_id)?;
        match fs::read(&path) {
            Ok(b) => ChunkIndex::decode(&b, &path.display().to_string()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(ImageError::Io { op: "read", path, source: e }),
        }
    }

    /// The chunk index of a stored layer, made (and kept) now if it has none.
    pub fn chunk_index(&self, layer: &LayerRef) -> Result<ChunkIndex, ImageError> {
        if let Some(i) = self.stored_chunk_index(&layer.diff_id)? {
            return Ok(i);
        }
        let source = self.layer_source(&layer.diff_id, &layer.digest)?;
        let mut hashing = crate::digest::HashingReader::new(self.open_layer_stream(&source)?);
        let chunks = chunk_stream(&mut hashing).ctx("read", self.blob_path(&source)?)?;
        let actual = hashing.finish().ctx("read", self.blob_path(&source)?)?;
        if format!("sha256:{actual}") != layer.diff_id {
            return Err(ImageError::DiffIdMismatch { digest: source, expected: layer.diff_id.clone(), actual });
        }
        let index = ChunkIndex { source: layer.digest.clone(), chunks };
        self.put_chunk_index(&layer.diff_id, &index)?;
        Ok(index)
    }

    /// The blob holding a layer's stream: the uncompressed tar (named by its diff_id, as a
    /// rebuilt layer is kept) when stored, else the layer blob.
    pub(crate) fn layer_source(&self, diff_id: &str, digest: &str) -> Result<String, ImageError> {
        if self.has_blob(diff_id) {
            return Ok(diff_id.to_string());
        }
        if self.has_blob(digest) {
            return Ok(digest.to_string());
        }
        Err(malformed(diff_id, "neither the layer blob nor its uncompressed tar is stored"))
    }

    /// A stored blob as the uncompressed stream it holds (gzip and zstd are decoded).
    pub(crate) fn open_layer_stream(&self, digest: &str) -> Result<Box<dyn Read + Send>, ImageError> {
        let path = self.blob_path(digest)?;
        let f = fs::File::open(&path).ctx("open", &path)?;
        let mut r = BufReader::with_capacity(256 << 10, f);
        let head = std::io::BufRead::fill_buf(&mut r).ctx("read", &path)?;
        if head.starts_with(&[0x1f, 0x8b]) {
            Ok(Box::new(BufReader::with_capacity(1 << 20, flate2::bufread::MultiGzDecoder::new(r))))
        } else if crate::zstd::is_zstd(head) {
            Ok(Box::new(BufReader::with_capacity(1 << 20, crate::zstd::ZstdFrames::new(r))))
        } else {
            Ok(Box::new(r))
        }
    }

    /// Where each of `wanted` is found among the layers this store holds (only those
    /// found are in the answer). Reads every index once; memory is bounded by `wanted`.
    pub fn find_chunks(&self, wanted: &HashSet<[u8; 32]>) -> Result<HashMap<[u8; 32], Location>, ImageError> {
        let dir = self.chunks_dir();
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(HashMap::new()),
            Err(e) => return Err(ImageError::Io { op: "read", path: dir, source: e }),
        };
        let layers = entries.flatten().map(|e| format!("sha256:{}", e.file_name().to_string_lossy()));
        self.find_chunks_in(wanted, layers, false)
    }

    /// `find_chunks` among `layers` only; with `tar_only`, only in layers whose tar is kept
    /// (read at offsets, as a proxy does).
    pub(crate) fn find_chunks_in(
        &self,
        wanted: &HashSet<[u8; 32]>,
        layers: impl IntoIterator<Item = String>,
        tar_only: bool,
    ) -> Result<HashMap<[u8; 32], Location>, ImageError> {
        let mut found = HashMap::new();
        for diff_id in layers {
            if found.len() == wanted.len() {
                break;
            }
            if tar_only && !self.has_blob(&diff_id) {
                continue;
            }
            // Only layers that are whole: unpacked, with a stream to read them from.
            if sha256_hex(&diff_id).is_err() || !self.layer_dir(&diff_id).is_ok_and(|d| d.exists()) {
                continue;
            }
            let Ok(Some(index)) = self.stored_chunk_index(&diff_id) else { continue };
            if self.layer_source(&diff_id, &index.source).is_err() {
                continue;
            }
            let mut offset = 0u64;
            for c in &index.chunks {
                if wanted.contains(&c.digest) && !found.contains_key(&c.digest) {
                    found.insert(c.digest, Location { diff_id: diff_id.clone(), offset, len: c.len });
                }
                offset += u64::from(c.len);
            }
        }
        Ok(found)
    }

    /// Copies the chunks at `found` from the layers that hold them into `pool`, each
    /// checked against its digest. One sequential read per layer.
    pub(crate) fn gather_chunks(&self, found: &HashMap<[u8; 32], Location>, pool: &mut Pool) -> Result<(), ImageError> {
        let mut by_layer: HashMap<&str, Vec<([u8; 32], &Location)>> = HashMap::new();
        for (d, l) in found {
            by_layer.entry(l.diff_id.as_str()).or_default().push((*d, l));
        }
        for (diff_id, mut list) in by_layer {
            list.sort_by_key(|(_, l)| l.offset);
            let index = self.stored_chunk_index(diff_id)?.ok_or_else(|| malformed(diff_id, "chunk index vanished"))?;
            let source = self.layer_source(diff_id, &index.source)?;
            let mut r = self.open_layer_stream(&source)?;
            let path = self.blob_path(&source)?;
            let mut pos = 0u64;
            let mut buf = vec![0u8; MAX_SIZE];
            for (digest, loc) in list {
                std::io::copy(&mut (&mut r).take(loc.offset - pos), &mut std::io::sink()).ctx("read", &path)?;
                let chunk = &mut buf[..loc.len as usize];
                r.read_exact(chunk).ctx("read", &path)?;
                pos = loc.offset + u64::from(loc.len);
                if ChunkRef::of(chunk).digest != digest {
                    return Err(malformed(
                        &format!("layer {diff_id}"),
                        "a chunk read back from the store does not match its index (the store is damaged)",
                    ));
                }
                pool.put(digest, chunk)?;
            }
        }
        Ok(())
    }

    /// Rebuilds a layer's tar from `list` in `pool`, unpacks it (checking the diff_id)
    /// and keeps the tar, by its diff_id, as the source of later deltas.
    pub(crate) fn rebuild_layer(
        &self,
        l: &LayerRef,
        list: &[ChunkRef],
        pool: &Pool,
        tmp: &std::path::Path,
    ) -> Result<(), ImageError> {
        self.keep_rebuilt(l, pool.reader(list), tmp)
    }

    /// Unpacks a layer's rebuilt tar `src` (checking the diff_id) and keeps the tar, by
    /// its diff_id, as the source of later deltas. `tmp` holds the tar meanwhile.
    pub(crate) fn keep_rebuilt(&self, l: &LayerRef, src: impl Read, tmp: &std::path::Path) -> Result<(), ImageError> {
        let tar_path = tmp.join(crate::store::io_tmp_name(&format!("layer-{}", &sha256_hex(&l.diff_id)?[..12])));
        let tar = fs::File::create(&tar_path).ctx("create", &tar_path)?;
        let mut w = std::io::BufWriter::new(tar);
        // The chunks as they are (not what the unpacker makes of them: a gzip of the tar
        // would unpack to the diff_id too) must hash to the diff_id: that is the blob kept.
        let mut raw = crate::digest::HashingReader::new(Tee { r: src, w: &mut w });
        let unpacked = self.unpack_to_tmp(l, &mut raw).and_then(|u| match raw.finish() {
            Ok(hex) if format!("sha256:{hex}") == l.diff_id => Ok(u),
            other => {
                let _ = fs::remove_dir_all(&u);
                Err(ImageError::Malformed {
                    what: format!("layer {}", l.diff_id),
                    problem: match other {
                        Ok(hex) => format!("its chunks make sha256:{hex}, not the uncompressed tar"),
                        Err(e) => e.to_string(),
                    },
                })
            }
        });
        let unpacked = match unpacked {
            Ok(u) => u,
            Err(e) => {
                let _ = fs::remove_file(&tar_path);
                return Err(e);
            }
        };
        let tar = w.into_inner().map_err(|e| e.into_error()).ctx("write", &tar_path);
        if let Err(e) = tar.and_then(|f| f.sync_all().ctx("sync", &tar_path)) {
            let _ = fs::remove_dir_all(&unpacked);
            let _ = fs::remove_file(&tar_path);
            return Err(e);
        }
        crate::store::durable_rename(&tar_path, &self.blob_path(&l.diff_id)?)?;
        self.place_layer(l, &unpacked)?;
        Ok(())
    }
}

/// Copies `r` to `w` as it is read.
struct Tee<R, W> {
    r: R,
    w: W,
}

impl<R: Read, W: Write> Read for Tee<R, W> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.r.read(buf)?;
        self.w.write_all(&buf[..n])?;
        Ok(n)
    }
}

/// Chunks kept in one file while an image is rebuilt: records of the chunk's sha256, its
/// length (u32 LE) and its bytes. A pool under `tmp/partial-*` outlives a killed pull:
/// reopened, it keeps every whole record whose bytes match its digest and drops the rest.
pub struct Pool {
    path: PathBuf,
    file: fs::File,
    end: u64,
    at: HashMap<[u8; 32], (u64, u32)>,
    keep: bool,
    /// A resumable pool is one process's at a time (two pulls of one image wait in turn).
    _lock: Option<nix::fcntl::Flock<fs::File>>,
}

impl Pool {
    /// A new pool, removed when dropped.
    pub fn create(path: PathBuf) -> Result<Pool, ImageError> {
        let file = fs::OpenOptions::new().read(true).write(true).create_new(true).open(&path).ctx("create", &path)?;
        Ok(Pool { path, file, end: 0, at: HashMap::new(), keep: false, _lock: None })
    }

    /// The pool at `path`, with the chunks an earlier run left in it; kept when dropped
    /// (the caller removes it once the image is stored). Waits while another holds it.
    pub fn resume(path: PathBuf) -> Result<Pool, ImageError> {
        use std::os::unix::fs::MetadataExt;
        // Locked, and still the file at `path`: a pull that finished meanwhile removed the
        // one we waited on (then we start a new one).
        let (mut file, lock) = loop {
            let file = fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .ctx("open", &path)?;
            let lock = crate::gc::lock_exclusive(file.try_clone().ctx("open", &path)?, &path)?;
            let same = match (file.metadata(), fs::metadata(&path)) {
                (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
                _ => false,
            };
            if same {
                break (file, lock);
            }
        };
        let mut at = HashMap::new();
        let mut end = 0u64;
        let mut r = BufReader::new(&mut file);
        let mut head = [0u8; ENTRY_LEN];
        let mut buf = vec![0u8; MAX_SIZE];
        while r.read_exact(&mut head).is_ok() {
            let c = match decode_list(&head, "pool") {
                Ok(c) => c[0],
                Err(_) => break,
            };
            let data = &mut buf[..c.len as usize];
            if r.read_exact(data).is_err() || ChunkRef::of(data).digest != c.digest {
                break;
            }
            at.insert(c.digest, (end + ENTRY_LEN as u64, c.len));
            end += (ENTRY_LEN + c.len as usize) as u64;
        }
        drop(r);
        file.set_len(end).ctx("truncate", &path)?;
        Ok(Pool { path, file, end, at, keep: true, _lock: Some(lock) })
    }

    pub fn contains(&self, digest: &[u8; 32]) -> bool {
        self.at.contains_key(digest)
    }

    /// Keeps a chunk the caller has checked.
    pub fn put(&mut self, digest: [u8; 32], data: &[u8]) -> Result<(), ImageError> {
        if self.at.contains_key(&digest) {
            return Ok(());
        }
        use std::os::unix::fs::FileExt;
        let len = data.len() as u32;
        let mut rec = encode_list(&[ChunkRef { digest, len }]);
        rec.extend_from_slice(data);
        // At the end as recorded: a write that failed half-way is written over by the next.
        self.file.write_all_at(&rec, self.end).ctx("write", &self.path)?;
        self.at.insert(digest, (self.end + ENTRY_LEN as u64, len));
        self.end += rec.len() as u64;
        Ok(())
    }

    /// The concatenation of `chunks`, read from the pool.
    pub fn reader<'a>(&'a self, chunks: &'a [ChunkRef]) -> PoolReader<'a> {
        PoolReader { pool: self, chunks, next: 0, buf: Vec::new(), at: 0 }
    }

    /// Removes a resumable pool.
    pub fn discard(mut self) {
        self.keep = false;
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        if !self.keep {
            let _ = fs::remove_file(&self.path);
        }
    }
}

pub struct PoolReader<'a> {
    pool: &'a Pool,
    chunks: &'a [ChunkRef],
    next: usize,
    buf: Vec<u8>,
    at: usize,
}

impl Read for PoolReader<'_> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        use std::os::unix::fs::FileExt;
        if self.at == self.buf.len() {
            let Some(c) = self.chunks.get(self.next) else { return Ok(0) };
            self.next += 1;
            let &(off, len) = self
                .pool
                .at
                .get(&c.digest)
                .ok_or_else(|| std::io::Error::other(format!("chunk {} is not in the rebuild pool", c.name())))?;
            self.buf.resize(len as usize, 0);
            self.pool.file.read_exact_at(&mut self.buf, off)?;
            self.at = 0;
        }
        let n = out.len().min(self.buf.len() - self.at);
        out[..n].copy_from_slice(&self.buf[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(len: usize, seed: u64) -> Vec<u8> {
        skiff_testkit::incompressible(len, seed)
    }

    fn chunks_of(d: &[u8]) -> Vec<ChunkRef> {
        chunk_stream(d).unwrap()
    }

    #[test]
    fn chunks_cover_the_stream_and_do_not_depend_on_read_sizes() {
        let d = data(3 << 20, 1);
        let whole = chunks_of(&d);
        assert_eq!(whole.iter().map(|c| c.len as usize).sum::<usize>(), d.len());
        assert!(whole.iter().all(|c| (c.len as usize) <= MAX_SIZE));
        assert!(whole[..whole.len() - 1].iter().all(|c| (c.len as usize) >= MIN_SIZE));
        // Pushed in odd pieces, the same chunks.
        let mut chunker = Chunker::default();
        let mut got = vec![];
        let mut sink = |c: &[u8]| -> Result<(), ()> {
            got.push(ChunkRef::of(c));
            Ok(())
        };
        for piece in d.chunks(7919) {
            chunker.push(piece, &mut sink).unwrap();
        }
        chunker.finish(&mut sink).unwrap();
        assert_eq!(got, whole);
        let avg = d.len() / whole.len();
        assert!((AVG_SIZE / 2..AVG_SIZE * 2).contains(&avg), "average chunk {avg}");
    }

    #[test]
    fn an_edit_changes_only_the_chunks_around_it() {
        let a = data(8 << 20, 2);
        let mut b = a.clone();
        // 64 KiB replaced in the middle, and 1000 bytes inserted near the start.
        b[4 << 20..(4 << 20) + (64 << 10)].copy_from_slice(&data(64 << 10, 3));
        b.splice(100_000..100_000, data(1000, 4));
        let old: HashSet<[u8; 32]> = chunks_of(&a).iter().map(|c| c.digest).collect();
        let new = chunks_of(&b);
        let changed: usize = new.iter().filter(|c| !old.contains(&c.digest)).map(|c| c.len as usize).sum();
        assert!(changed >= 65 << 10, "{changed}");
        assert!(changed < (64 << 10) + 6 * MAX_SIZE, "{changed} bytes differ for a 65 KiB edit");
    }

    #[test]
    fn index_round_trip_and_bad_input() {
        let index = ChunkIndex { source: format!("sha256:{}", "a".repeat(64)), chunks: chunks_of(&data(300_000, 5)) };
        let bytes = index.encode();
        assert_eq!(ChunkIndex::decode(&bytes, "x").unwrap(), Some(index.clone()));
        assert!(ChunkIndex::decode(&bytes[..bytes.len() - 1], "x").is_err());
        assert!(ChunkIndex::decode(b"nope", "x").is_err());
        // Another chunk size: stale, not an error.
        let mut other = bytes.clone();
        other[MAGIC.len() + 4] ^= 1;
        assert_eq!(ChunkIndex::decode(&other, "x").unwrap(), None);
        let mut zero = encode_list(&index.chunks);
        zero[32..36].copy_from_slice(&0u32.to_le_bytes());
        assert!(decode_list(&zero, "x").unwrap_err().to_string().contains("a chunk of 0 bytes"));
    }

    #[test]
    fn pool_reads_back_a_concatenation() {
        let dir = tempfile::tempdir().unwrap();
        let d = data(500_000, 6);
        let chunks = chunks_of(&d);
        let mut pool = Pool::create(dir.path().join("pool")).unwrap();
        let mut off = 0;
        // Stored in reverse order, read in stream order.
        let mut spans = vec![];
        for c in &chunks {
            spans.push((off, *c));
            off += c.len as usize;
        }
        for (off, c) in spans.iter().rev() {
            pool.put(c.digest, &d[*off..*off + c.len as usize]).unwrap();
        }
        let mut back = vec![];
        pool.reader(&chunks).read_to_end(&mut back).unwrap();
        assert_eq!(back, d);
        let path = dir.path().join("pool");
        drop(pool);
        assert!(!path.exists());
    }

    #[test]
    fn a_resumed_pool_keeps_whole_chunks_and_drops_a_torn_or_damaged_tail() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("partial-pool");
        let d = data(300_000, 7);
        let chunks = chunks_of(&d);
        assert!(chunks.len() >= 4);
        let mut off = 0;
        let mut pool = Pool::resume(path.clone()).unwrap();
        for c in &chunks[..3] {
            pool.put(c.digest, &d[off..off + c.len as usize]).unwrap();
            off += c.len as usize;
        }
        drop(pool);
        assert!(path.exists(), "a resumable pool outlives its process");
        // The third record torn half-way, as by a kill.
        let full = fs::metadata(&path).unwrap().len();
        let f = fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(full - u64::from(chunks[2].len) / 2).unwrap();
        let pool = Pool::resume(path.clone()).unwrap();
        assert!(pool.contains(&chunks[0].digest) && pool.contains(&chunks[1].digest));
        assert!(!pool.contains(&chunks[2].digest));
        let mut back = vec![];
        pool.reader(&chunks[..2]).read_to_end(&mut back).unwrap();
        assert_eq!(back, d[..(chunks[0].len + chunks[1].len) as usize]);
        drop(pool);
        // A flipped byte in the second record: only the first survives.
        let mut bytes = fs::read(&path).unwrap();
        let at = ENTRY_LEN * 2 + chunks[0].len as usize + 10;
        bytes[at] ^= 1;
        fs::write(&path, &bytes).unwrap();
        let pool = Pool::resume(path.clone()).unwrap();
        assert!(pool.contains(&chunks[0].digest) && !pool.contains(&chunks[1].digest));
        pool.discard();
        assert!(!path.exists());
    }
}
