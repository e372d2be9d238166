//! Registry-native partial pulls of zstd:chunked layers: only the files (and parts of
//! files) a node lacks cross the link, fetched with HTTP range requests from any plain
//! registry.
//!
//! A zstd:chunked layer (containers/storage's format; `skopeo copy --dest-compress-format
//! zstd:chunked`, `podman push --compression-format zstd:chunked`) is an ordinary zstd
//! stream whose frames split where file contents start and end, with a table of contents
//! (TOC) in a skippable frame near the end. The layer's annotations give the TOC's place
//! and its sha256. Each regular file is one or more content chunks, each its own frames,
//! named by the sha256 of its uncompressed bytes; tar headers and padding sit in the
//! frames between them.
//!
//! A pull:
//! 1. fetches the TOC (one range) and checks it against the annotation's checksum;
//! 2. finds each chunk among the layers the node holds (through their kept TOCs by digest,
//!    or at the same path and offset), reading and hashing it;
//! 3. fetches everything else, tar headers included, in multi-range requests;
//! 4. rebuilds the exact uncompressed tar from fetched frames and local chunks, checking
//!    each chunk's digest, and unpacks it; the whole stream must hash to the diff_id.
//!
//! Every byte is verified: the manifest pins the TOC, the TOC pins every chunk, the config
//! pins the whole stream. Anything unexpected (a registry ignoring ranges, a damaged
//! chunk) makes the pull fetch the whole blob instead, as any other layer.

use crate::digest::sha256_hex;
use crate::error::{ImageError, IoContext};
use crate::store::{Descriptor, ImageStore, LayerRef};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::fs;
use std::io::{BufReader, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Where the TOC is (`offset:length:uncompressed length:type`), under containers/storage's
/// current key and the one it used before.
const POSITION: [&str; 2] =
    ["io.github.containers.zstd-chunked.manifest-position", "io.containers.zstd-chunked.manifest-position"];
/// The sha256 of the TOC's bytes as stored in the blob (compressed).
const CHECKSUM: [&str; 2] =
    ["io.github.containers.zstd-chunked.manifest-checksum", "io.containers.zstd-chunked.manifest-checksum"];
/// A TOC larger than this (compressed, or as JSON) is refused.
const MAX_TOC: u64 = 16 << 20;
const MAX_TOC_JSON: u64 = 128 << 20;
/// Wanted ranges closer than this are fetched as one.
const MERGE_GAP: u64 = 4 << 10;
/// Ranges asked for in one request.
const RANGES_PER_REQUEST: usize = 64;
/// A partial pull is made only when it fetches at most this share of the blob (percent).
const WORTH_PERCENT: u64 = 75;
/// The longest run of zeros taken as such without fetching it.
const MAX_ZEROS: u64 = 64 << 20;

/// Where a zstd:chunked layer's TOC is, from the layer's annotations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TocRef {
    /// The TOC's first byte in the blob (inside its skippable frame).
    pub offset: u64,
    pub len: u64,
    pub uncompressed: u64,
    pub checksum: String,
}

/// The TOC a zstd:chunked layer's annotations point at; `None` for any other layer.
pub fn toc_ref(desc: &Descriptor) -> Option<Result<TocRef, ImageError>> {
    let pos = POSITION.iter().find_map(|k| desc.annotations.get(*k))?;
    let sum = CHECKSUM.iter().find_map(|k| desc.annotations.get(*k));
    Some(parse_ref(desc, pos, sum))
}

fn malformed(desc: &Descriptor, problem: impl Into<String>) -> ImageError {
    ImageError::Malformed { what: format!("zstd:chunked layer {}", desc.digest), problem: problem.into() }
}

fn parse_ref(desc: &Descriptor, pos: &str, sum: Option<&String>) -> Result<TocRef, ImageError> {
    let sum = sum.ok_or_else(|| malformed(desc, "the TOC position is annotated but not its checksum"))?;
    sha256_hex(sum)?;
    let fields: Vec<&str> = pos.split(':').collect();
    let [o, l, u, t] = fields[..] else {
        return Err(malformed(desc, format!("manifest-position {pos:?} is not offset:length:uncompressed:type")));
    };
    let num = |s: &str| {
        s.parse::<u64>().map_err(|_| malformed(desc, format!("manifest-position {pos:?}: {s:?} is not a number")))
    };
    let (offset, len, uncompressed, kind) = (num(o)?, num(l)?, num(u)?, num(t)?);
    if kind != 1 {
        return Err(malformed(desc, format!("a TOC of type {kind} (only 1, zstd, is known)")));
    }
    if len == 0 || offset < 8 || offset.checked_add(len).is_none_or(|end| end > desc.size) {
        return Err(malformed(desc, format!("manifest-position {pos:?} is outside the {}-byte blob", desc.size)));
    }
    if len > MAX_TOC || uncompressed > MAX_TOC_JSON {
        return Err(malformed(desc, format!("a TOC of {len} bytes ({uncompressed} as JSON) is too large")));
    }
    Ok(TocRef { offset, len, uncompressed, checksum: sum.clone() })
}

/// A zstd:chunked TOC: the entries in stream order (unknown fields are ignored).
#[derive(Debug, serde::Deserialize)]
pub(crate) struct Toc {
    #[serde(default)]
    entries: Vec<Entry>,
}

#[derive(Debug, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct Entry {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    size: u64,
    #[serde(default)]
    digest: String,
    #[serde(default)]
    offset: u64,
    #[serde(default)]
    end_offset: u64,
    #[serde(default)]
    chunk_size: u64,
    #[serde(default)]
    chunk_offset: u64,
    #[serde(default)]
    chunk_digest: String,
    #[serde(default)]
    chunk_type: String,
}

/// One content chunk: `len` bytes of file `name` at `at`, stored compressed in the blob at
/// `start..end` (whole frames).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Piece {
    pub name: String,
    pub at: u64,
    pub len: u64,
    pub digest: [u8; 32],
    pub zeros: bool,
    pub start: u64,
    pub end: u64,
}

fn digest_bytes(d: &str, name: &str) -> Result<[u8; 32], String> {
    let hex = d.strip_prefix("sha256:").ok_or_else(|| format!("{name}: digest {d:?} is not sha256"))?;
    let mut out = [0u8; 32];
    hex::decode_to_slice(hex, &mut out).map_err(|_| format!("{name}: digest {d:?} is not sha256"))?;
    Ok(out)
}

impl Toc {
    pub(crate) fn parse(json: &[u8]) -> Result<Toc, String> {
        serde_json::from_slice(json).map_err(|e| format!("TOC: {e}"))
    }

    /// The content chunks, in stream order, each checked to follow the one before and to
    /// lie below `data_end` (where the TOC's frame starts).
    pub(crate) fn pieces(&self, data_end: u64) -> Result<Vec<Piece>, String> {
        let mut out: Vec<Piece> = vec![];
        let mut file: Option<(usize, &Entry)> = None;
        for e in &self.entries {
            if e.kind == "chunk" {
                let Some((_, reg)) = file else { return Err(format!("{}: a chunk without its file", e.name)) };
                if e.name != reg.name {
                    return Err(format!("{}: a chunk among the chunks of {}", e.name, reg.name));
                }
                let Some(prev) = out.last_mut() else { return Err(format!("{}: a chunk without its file", e.name)) };
                if Some(e.chunk_offset) != prev.at.checked_add(prev.len) {
                    return Err(format!("{}: the chunk at {} does not follow the one before", e.name, e.chunk_offset));
                }
                prev.end = e.offset;
                let len = if e.chunk_size > 0 { e.chunk_size } else { reg.size.saturating_sub(e.chunk_offset) };
                out.push(Piece {
                    name: reg.name.clone(),
                    at: e.chunk_offset,
                    len,
                    digest: digest_bytes(&e.chunk_digest, &e.name)?,
                    zeros: e.chunk_type == "zeros",
                    start: e.offset,
                    end: 0,
                });
                continue;
            }
            close_file(&mut out, file.take())?;
            if e.kind == "reg" && e.size > 0 {
                let len = if e.chunk_size > 0 { e.chunk_size.min(e.size) } else { e.size };
                let d = if e.chunk_digest.is_empty() { &e.digest } else { &e.chunk_digest };
                out.push(Piece {
                    name: e.name.clone(),
                    at: 0,
                    len,
                    digest: digest_bytes(d, &e.name)?,
                    zeros: e.chunk_type == "zeros",
                    start: e.offset,
                    end: 0,
                });
                file = Some((out.len() - 1, e));
            }
        }
        close_file(&mut out, file.take())?;
        let mut prev_end = 0;
        for p in &out {
            if p.start < prev_end || p.end <= p.start || p.end > data_end || p.len == 0 {
                return Err(format!(
                    "{}: chunk at {} is stored at {}..{}, out of order or outside the layer's data",
                    p.name, p.at, p.start, p.end
                ));
            }
            prev_end = p.end;
        }
        Ok(out)
    }
}

/// Ends a file's chunks at its `endOffset` and checks that they hold its size.
fn close_file(out: &mut [Piece], file: Option<(usize, &Entry)>) -> Result<(), String> {
    let Some((first, reg)) = file else { return Ok(()) };
    let total = out[first..].iter().try_fold(0u64, |t, p| t.checked_add(p.len));
    if total != Some(reg.size) {
        let total = total.map_or_else(|| "more than 2^64".to_string(), |t| t.to_string());
        return Err(format!("{}: its chunks hold {total} bytes, not {}", reg.name, reg.size));
    }
    if let Some(last) = out.last_mut() {
        last.end = reg.end_offset;
    }
    Ok(())
}

/// Where a chunk comes from when it is not fetched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Local {
    Zeros,
    /// Bytes `at..at+len` of `name` in the unpacked layer at `root`.
    File {
        root: PathBuf,
        name: String,
        at: u64,
    },
}

/// Streams `len` bytes of `name` at `at` in the tree `root` (resolved inside it).
fn open_at(root: &Path, name: &str, at: u64, len: u64) -> std::io::Result<impl Read> {
    let f = skiff_sys::inroot::open_regular(root, name).map_err(std::io::Error::other)?;
    Ok(BufReader::with_capacity(64 << 10, At { f: Arc::new(f), pos: at, end: at + len }))
}

/// `Read` over `pos..end` of a file, by positional reads.
struct At {
    f: Arc<fs::File>,
    pos: u64,
    end: u64,
}

impl Read for At {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let want = (self.end - self.pos).min(buf.len() as u64) as usize;
        if want == 0 {
            return Ok(0);
        }
        let n = self.f.read_at(&mut buf[..want], self.pos)?;
        if n == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "the file is shorter than its chunk"));
        }
        self.pos += n as u64;
        Ok(n)
    }
}

/// `Read` of `len` zero bytes.
fn zeros(len: u64) -> impl Read {
    std::io::repeat(0).take(len)
}

/// Whether `r` yields exactly the chunk `digest` of `len` bytes.
fn matches(r: std::io::Result<impl Read>, len: u64, digest: &[u8; 32]) -> bool {
    let Ok(mut r) = r else { return false };
    let mut h = Sha256::new();
    matches!(std::io::copy(&mut r, &mut h), Ok(n) if n == len) && h.finalize().as_slice() == digest
}

impl ImageStore {
    fn tocs_dir(&self) -> PathBuf {
        self.root().join("tocs")
    }

    fn toc_path(&self, diff_id: &str) -> Result<PathBuf, ImageError> {
        Ok(self.tocs_dir().join(sha256_hex(diff_id)?))
    }

    /// Keeps the (uncompressed) TOC of the zstd:chunked layer `diff_id`, so that later
    /// partial pulls find its chunks by digest.
    pub(crate) fn put_toc(&self, diff_id: &str, json: &[u8]) -> Result<(), ImageError> {
        let dir = self.tocs_dir();
        fs::create_dir_all(&dir).ctx("create", &dir)?;
        skiff_sys::durable::write(&self.toc_path(diff_id)?, json, 0o644).map_err(|e| ImageError::Io {
            op: "write",
            path: e.path,
            source: e.source,
        })
    }

    fn stored_toc(&self, diff_id: &str) -> Option<Toc> {
        let bytes = skiff_sys::regular::read(&self.toc_path(diff_id).ok()?, MAX_TOC_JSON).ok()?;
        Toc::parse(&bytes).ok()
    }

    /// The layers of the images this store holds from `registry`/`repository` (the
    /// platform this node runs). Only those may give a partial pull its chunks: the TOC
    /// that asks is the registry's word, and what the node finds (or not) shows in the
    /// ranges it fetches, so looking in another repository's layers would let a registry
    /// test guesses about their files.
    pub(crate) fn layers_of_repository(&self, registry: &str, repository: &str) -> std::collections::HashSet<String> {
        let mut out = std::collections::HashSet::new();
        for reference in self.refs_map().unwrap_or_default().into_keys() {
            let same = crate::registry::RemoteRef::parse(&reference)
                .is_ok_and(|r| r.registry == registry && r.repository == repository);
            if let (true, Ok(info)) = (same, self.resolve(&reference)) {
                out.extend(info.layers.into_iter().map(|l| l.diff_id));
            }
        }
        out
    }

    /// The layers held whole (unpacked), by diff_id, with their directories.
    fn held_layers(&self) -> Vec<(String, PathBuf)> {
        let dir = self.root().join("layers");
        let mut out: Vec<(String, PathBuf)> = fs::read_dir(&dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                (name.len() == 64 && name.bytes().all(|b| b.is_ascii_hexdigit()))
                    .then(|| (format!("sha256:{name}"), e.path()))
            })
            .collect();
        out.sort();
        out
    }

    /// Which of `pieces` the layers `allowed` hold, each read and checked now: zero
    /// chunks, chunks named in the TOCs of those layers, and chunks at the same path and
    /// offset in one of them (an unchanged file, or an edit that kept the file's length).
    /// A place is read once however many pieces name it.
    pub(crate) fn find_local(
        &self,
        pieces: &[Piece],
        allowed: &std::collections::HashSet<String>,
    ) -> Vec<Option<Local>> {
        let mut found: Vec<Option<Local>> = vec![None; pieces.len()];
        let mut wanted: HashMap<[u8; 32], Vec<usize>> = HashMap::new();
        // Runs of zeros, by length (each length hashed once, and only up to a bound).
        let mut zero_digests: HashMap<u64, [u8; 32]> = HashMap::new();
        for (i, p) in pieces.iter().enumerate() {
            let zero = p.zeros
                && p.len <= MAX_ZEROS
                && *zero_digests.entry(p.len).or_insert_with(|| {
                    let mut h = Sha256::new();
                    let _ = std::io::copy(&mut zeros(p.len), &mut h);
                    h.finalize().into()
                }) == p.digest;
            if zero {
                found[i] = Some(Local::Zeros);
            } else {
                wanted.entry(p.digest).or_default().push(i);
            }
        }
        let layers: Vec<(String, PathBuf)> =
            self.held_layers().into_iter().filter(|(d, _)| allowed.contains(d)).collect();
        // Each place read at most once, found or not.
        let mut tried: std::collections::HashSet<(PathBuf, String, u64, u64)> = Default::default();
        let mut check = |root: &PathBuf, name: &str, at: u64, len: u64, digest: &[u8; 32]| {
            tried.insert((root.clone(), name.to_string(), at, len))
                && matches(open_at(root, name, at, len), len, digest)
        };
        for (diff_id, root) in &layers {
            let Some(held) = self.stored_toc(diff_id).and_then(|t| t.pieces(u64::MAX).ok()) else { continue };
            for h in held {
                let Some(idx) = wanted.get(&h.digest) else { continue };
                let open = idx.iter().any(|&i| found[i].is_none() && pieces[i].len == h.len);
                if open && check(root, &h.name, h.at, h.len, &h.digest) {
                    for &i in idx {
                        if found[i].is_none() && pieces[i].len == h.len {
                            found[i] = Some(Local::File { root: root.clone(), name: h.name.clone(), at: h.at });
                        }
                    }
                }
            }
        }
        for (i, p) in pieces.iter().enumerate() {
            if found[i].is_some() {
                continue;
            }
            for (_, root) in &layers {
                if check(root, &p.name, p.at, p.len, &p.digest) {
                    found[i] = Some(Local::File { root: root.clone(), name: p.name.clone(), at: p.at });
                    break;
                }
            }
        }
        found
    }

    /// Keeps the TOC of a zstd:chunked layer whose whole blob is stored (best effort:
    /// without it, later pulls still find unchanged files by path).
    pub(crate) fn keep_toc_from_blob(&self, desc: &Descriptor, diff_id: &str) {
        let Some(Ok(r)) = toc_ref(desc) else { return };
        if self.toc_path(diff_id).is_ok_and(|p| p.exists()) {
            return;
        }
        let read = || -> Result<Vec<u8>, String> {
            let path = self.blob_path(&desc.digest).map_err(|e| e.to_string())?;
            let f = fs::File::open(&path).map_err(|e| e.to_string())?;
            let mut raw = vec![0u8; r.len as usize];
            f.read_exact_at(&mut raw, r.offset).map_err(|e| e.to_string())?;
            decode_toc(&r, &raw)
        };
        match read() {
            Ok(json) => {
                if let Err(e) = self.put_toc(diff_id, &json) {
                    tracing::warn!(layer = %diff_id, "zstd:chunked TOC not kept: {e}");
                }
            }
            Err(e) => tracing::warn!(layer = %diff_id, "zstd:chunked TOC not read: {e}"),
        }
    }
}

/// Checks a TOC's stored bytes against the annotated checksum and decompresses them.
pub(crate) fn decode_toc(r: &TocRef, raw: &[u8]) -> Result<Vec<u8>, String> {
    let actual = format!("sha256:{}", hex::encode(Sha256::digest(raw)));
    if actual != r.checksum {
        return Err(format!("the TOC's bytes are {actual}, not the annotated {}", r.checksum));
    }
    let mut json = vec![];
    crate::zstd::ZstdFrames::new(raw).take(MAX_TOC_JSON + 1).read_to_end(&mut json).map_err(|e| format!("TOC: {e}"))?;
    if json.len() as u64 > MAX_TOC_JSON {
        return Err("the TOC is too large".into());
    }
    Ok(json)
}

/// What a partial pull fetches and what it takes from the node.
#[derive(Debug)]
pub(crate) struct Plan {
    pub pieces: Vec<Piece>,
    pub local: Vec<Option<Local>>,
    /// Where the layer's data ends: the TOC's skippable frame starts here.
    pub data_end: u64,
    /// Blob ranges to fetch (`start..end`), sorted and apart.
    pub ranges: Vec<(u64, u64)>,
}

impl Plan {
    pub(crate) fn new(pieces: Vec<Piece>, local: Vec<Option<Local>>, data_end: u64) -> Plan {
        // Everything but the chunks found here: headers and padding between chunks too.
        let mut ranges: Vec<(u64, u64)> = vec![];
        let mut push = |s: u64, e: u64| {
            if s >= e {
                return;
            }
            match ranges.last_mut() {
                Some(last) if s <= last.1 + MERGE_GAP => last.1 = last.1.max(e),
                _ => ranges.push((s, e)),
            }
        };
        let mut pos = 0;
        for (p, l) in pieces.iter().zip(&local) {
            push(pos, p.start);
            if l.is_none() {
                push(p.start, p.end);
            }
            pos = p.end;
        }
        push(pos, data_end);
        Plan { pieces, local, data_end, ranges }
    }

    pub(crate) fn fetch_bytes(&self) -> u64 {
        self.ranges.iter().map(|(s, e)| e - s).sum()
    }

    /// Bytes of the layer's files taken from the node.
    pub(crate) fn reused_bytes(&self) -> u64 {
        self.pieces.iter().zip(&self.local).filter(|(_, l)| l.is_some()).map(|(p, _)| p.len).sum()
    }

    pub(crate) fn worth_it(&self, blob_size: u64) -> bool {
        self.reused_bytes() > 0 && self.fetch_bytes() * 100 <= blob_size * WORTH_PERCENT
    }

    fn fetched(&self, s: u64, e: u64) -> bool {
        let i = self.ranges.partition_point(|r| r.1 < e);
        self.ranges.get(i).is_some_and(|r| r.0 <= s && e <= r.1)
    }

    /// The uncompressed tar, from the fetched bytes (in `parts`, at their blob offsets)
    /// and the node's chunks; each chunk checked against its digest as it passes.
    pub(crate) fn stream(self, parts: fs::File) -> Rebuild {
        let parts = Arc::new(parts);
        let mut segs = vec![];
        let mut pos = 0;
        for (p, l) in self.pieces.iter().zip(&self.local) {
            if pos < p.start {
                segs.push(Seg::Frames { start: pos, end: p.start, check: None });
            }
            let check = Some((p.len, p.digest, format!("{} at {}", p.name, p.at)));
            segs.push(match l {
                _ if self.fetched(p.start, p.end) => Seg::Frames { start: p.start, end: p.end, check },
                Some(l) => Seg::Local { local: l.clone(), len: p.len, check },
                None => Seg::Missing(p.name.clone()),
            });
            pos = p.end;
        }
        if pos < self.data_end {
            segs.push(Seg::Frames { start: pos, end: self.data_end, check: None });
        }
        Rebuild { parts, segs: segs.into_iter(), cur: None, check: None, hasher: Sha256::new(), n: 0 }
    }
}

type Check = Option<(u64, [u8; 32], String)>;

enum Seg {
    Frames { start: u64, end: u64, check: Check },
    Local { local: Local, len: u64, check: Check },
    Missing(String),
}

/// `Read` over a rebuilt layer's uncompressed tar.
pub(crate) struct Rebuild {
    parts: Arc<fs::File>,
    segs: std::vec::IntoIter<Seg>,
    cur: Option<Box<dyn Read + Send>>,
    check: Check,
    hasher: Sha256,
    n: u64,
}

impl Rebuild {
    fn open(&mut self, seg: Seg) -> std::io::Result<Box<dyn Read + Send>> {
        Ok(match seg {
            Seg::Frames { start, end, check } => {
                self.check = check;
                let at = At { f: Arc::clone(&self.parts), pos: start, end };
                Box::new(crate::zstd::ZstdFrames::new(BufReader::with_capacity(64 << 10, at)))
            }
            Seg::Local { local: Local::Zeros, len, check } => {
                self.check = check;
                Box::new(zeros(len))
            }
            Seg::Local { local: Local::File { root, name, at }, len, check } => {
                self.check = check;
                Box::new(open_at(&root, &name, at, len)?)
            }
            Seg::Missing(name) => {
                return Err(std::io::Error::other(format!("{name}: a chunk was neither fetched nor found")))
            }
        })
    }

    /// Ends a segment: a chunk must have had exactly its length and digest.
    fn close(&mut self) -> std::io::Result<()> {
        let hasher = std::mem::take(&mut self.hasher);
        let n = std::mem::take(&mut self.n);
        if let Some((len, digest, what)) = self.check.take() {
            if n != len || hasher.finalize().as_slice() != digest {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("the chunk of {what} does not match its digest in the TOC"),
                ));
            }
        }
        Ok(())
    }
}

impl Read for Rebuild {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            let Some(cur) = self.cur.as_mut() else {
                let Some(seg) = self.segs.next() else { return Ok(0) };
                self.cur = Some(self.open(seg)?);
                continue;
            };
            let n = cur.read(buf)?;
            if n > 0 {
                if self.check.is_some() {
                    self.hasher.update(&buf[..n]);
                    self.n += n as u64;
                }
                return Ok(n);
            }
            self.cur = None;
            self.close()?;
        }
    }
}

/// What a partial pull did.
pub(crate) struct Partial {
    /// Bytes of the layer's files taken from the node.
    pub reused: u64,
}

/// Pulls the zstd:chunked `layer` by its parts: `Ok(None)` when that is not worth it (or
/// the layer is not zstd:chunked), and the caller fetches the whole blob.
pub(crate) async fn pull_layer(
    store: &Arc<ImageStore>,
    client: &crate::registry::Client,
    desc: &Descriptor,
    layer: &LayerRef,
    opts: &crate::registry::PullOptions,
) -> Result<Option<Partial>, ImageError> {
    let Some(r) = toc_ref(desc) else { return Ok(None) };
    let r = r?;
    let hex = sha256_hex(&desc.digest)?.to_string();
    let _one = crate::registry::one_download(store, &hex).await?;
    if store.has_blob(&desc.digest) || store.layer_dir(&layer.diff_id).is_ok_and(|d| d.exists()) {
        return Ok(Some(Partial { reused: 0 }));
    }
    let (st, registry, repository) = (Arc::clone(store), client.r.registry.clone(), client.r.repository.clone());
    let allowed = crate::error::blocking("plan", move || st.layers_of_repository(&registry, &repository)).await?;
    if allowed.is_empty() {
        return Ok(None);
    }
    let short = hex[..12].to_string();
    let what = format!("blob {} (zstd:chunked)", desc.digest);
    // The TOC with the skippable frame's header before it: the data ends there.
    let data_end = r.offset - 8;
    let head = fetch_small(client, &what, &desc.digest, data_end, r.offset + r.len).await?;
    let Some(head) = head else { return Ok(None) };
    let (frame, raw) = head.split_at(8);
    if !crate::zstd::is_skippable(frame) || u32::from_le_bytes([frame[4], frame[5], frame[6], frame[7]]) as u64 != r.len
    {
        return Err(malformed(desc, "the TOC is not in a skippable frame of its own"));
    }
    let json = decode_toc(&r, raw).map_err(|p| malformed(desc, p))?;
    let toc = Toc::parse(&json).map_err(|p| malformed(desc, p))?;
    let pieces = toc.pieces(data_end).map_err(|p| malformed(desc, p))?;
    // The files together are no larger than the layer may unpack to.
    let limit = crate::bomb::Cap::for_layer(desc.size, store.root()).limit();
    if pieces.iter().try_fold(0u64, |t, p| t.checked_add(p.len)).is_none_or(|t| t > limit) {
        return Err(malformed(desc, format!("its TOC names more than the {limit} bytes the layer may unpack to")));
    }
    let st = Arc::clone(store);
    let plan = crate::error::blocking("plan", move || {
        let local = st.find_local(&pieces, &allowed);
        Plan::new(pieces, local, data_end)
    })
    .await?;
    if !plan.worth_it(desc.size) {
        opts.note(&format!(
            "{short}: zstd:chunked, but {} of {} bytes would be fetched; fetching the whole layer",
            plan.fetch_bytes(),
            desc.size
        ));
        return Ok(None);
    }
    let (fetch, reused) = (plan.fetch_bytes(), plan.reused_bytes());
    opts.note(&format!(
        "{short}: zstd:chunked: fetching {fetch} of {} bytes in {} ranges; {reused} bytes of its files are here",
        desc.size,
        plan.ranges.len()
    ));
    let parts_path = store.root().join("tmp").join(crate::store::io_tmp_name(&format!("chunked-{}", &hex[..12])));
    let parts = fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&parts_path)
        .ctx("open", &parts_path)?;
    let result = async {
        fetch_ranges(client, &what, desc, &plan.ranges, &parts, opts).await?;
        let (st, layer) = (Arc::clone(store), layer.clone());
        let tmp = store.root().join("tmp");
        crate::error::blocking("rebuild", move || {
            st.keep_rebuilt(&layer, plan.stream(parts), &tmp)?;
            // Best effort: without it, later pulls still find unchanged files by path.
            if let Err(e) = st.put_toc(&layer.diff_id, &json) {
                tracing::warn!(layer = %layer.diff_id, "zstd:chunked TOC not kept: {e}");
            }
            Ok::<(), ImageError>(())
        })
        .await?
    }
    .await;
    let _ = fs::remove_file(&parts_path);
    result?;
    (opts.progress)(crate::registry::PullEvent::Blob { digest: &desc.digest, size: fetch, done: fetch });
    Ok(Some(Partial { reused }))
}

/// Bytes `start..end` of a blob in one request; `None` when the registry ignores ranges.
async fn fetch_small(
    client: &crate::registry::Client,
    what: &str,
    digest: &str,
    start: u64,
    end: u64,
) -> Result<Option<Vec<u8>>, ImageError> {
    let mut resp = client.get_ranges(what, digest, &format!("bytes={start}-{}", end - 1)).await?;
    if resp.status().as_u16() != 206 {
        return Ok(None);
    }
    let want = (end - start) as usize;
    let mut body = Vec::with_capacity(want.min(1 << 20));
    // Read no further than asked for: a registry cannot make the node hold more.
    while let Some(c) = resp.chunk().await.map_err(|e| client.err(what, e.to_string()))? {
        client.arrived(c.len()).await;
        if body.len() + c.len() > want {
            return Err(client.err(what, format!("asked for {want} bytes, got more")));
        }
        body.extend_from_slice(&c);
    }
    if body.len() != want {
        return Err(client.err(what, format!("asked for {want} bytes, got {}", body.len())));
    }
    Ok(Some(body))
}

/// Fetches `ranges` of the blob into `parts` at their own offsets, in multi-range
/// requests; what a cut connection leaves missing is asked for again (attempts without
/// progress are bounded as for any blob).
async fn fetch_ranges(
    client: &crate::registry::Client,
    what: &str,
    desc: &Descriptor,
    ranges: &[(u64, u64)],
    parts: &fs::File,
    opts: &crate::registry::PullOptions,
) -> Result<(), ImageError> {
    let total: u64 = ranges.iter().map(|(s, e)| e - s).sum();
    let mut missing: Vec<(u64, u64)> = ranges.to_vec();
    let mut failures = 0u32;
    let mut done = 0u64;
    // Bounded: each round either makes progress or counts a failure.
    for _ in 0..100_000 {
        if missing.is_empty() {
            return Ok(());
        }
        if client.cancel.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(client.err(what, "cancelled"));
        }
        let batch: Vec<(u64, u64)> = missing.iter().take(RANGES_PER_REQUEST).copied().collect();
        let header =
            format!("bytes={}", batch.iter().map(|(s, e)| format!("{s}-{}", e - 1)).collect::<Vec<_>>().join(","));
        let mut got: Vec<(u64, u64)> = vec![];
        let outcome = async {
            let resp = client.get_ranges(what, &desc.digest, &header).await?;
            if resp.status().as_u16() != 206 {
                let status = resp.status();
                return Err(client
                    .err(what, format!("ranges refused: {}", crate::registry::Client::status_problem(status, ""))));
            }
            read_parts(client, what, resp, desc.size, &batch, parts, &mut got, |n| {
                done += n;
                (opts.progress)(crate::registry::PullEvent::Blob { digest: &desc.digest, size: total, done });
            })
            .await
        }
        .await;
        let before: u64 = missing.iter().map(|(s, e)| e - s).sum();
        missing = subtract(&missing, &got);
        let after: u64 = missing.iter().map(|(s, e)| e - s).sum();
        match outcome {
            Err(e @ ImageError::Registry { .. }) if after == before => return Err(e),
            // A round that brought nothing counts against the attempts, an error or not.
            r if after == before => {
                failures += 1;
                let e = r.err().unwrap_or_else(|| client.err(what, "the registry sent none of the ranges asked for"));
                if failures >= client.attempts.max(1) {
                    return Err(e);
                }
                opts.note(&format!("{what}: {e}; retrying"));
                tokio::time::sleep(crate::registry::backoff(failures, what)).await;
            }
            _ => failures = 0,
        }
    }
    Err(client.err(what, "too many rounds"))
}

/// `have` minus `got`, both sorted lists of disjoint `start..end` ranges.
fn subtract(have: &[(u64, u64)], got: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut out = vec![];
    for &(mut s, e) in have {
        for &(gs, ge) in got {
            if ge <= s || gs >= e {
                continue;
            }
            if gs > s {
                out.push((s, gs));
            }
            s = s.max(ge);
            if s >= e {
                break;
            }
        }
        if s < e {
            out.push((s, e));
        }
    }
    out
}

/// Reads a 206 answer (one range, or `multipart/byteranges`) into `parts`, noting each
/// range written in `got` (a range cut short counts up to where it was cut). Only parts
/// inside the ranges `asked` are taken, each once: an answer cannot make the node write
/// more than it asked for, nor go on forever.
#[allow(clippy::too_many_arguments)]
async fn read_parts(
    client: &crate::registry::Client,
    what: &str,
    resp: reqwest::Response,
    size: u64,
    asked: &[(u64, u64)],
    parts: &fs::File,
    got: &mut Vec<(u64, u64)>,
    mut progress: impl FnMut(u64),
) -> Result<(), ImageError> {
    let inside = |(s, e): (u64, u64)| asked.iter().any(|&(a, b)| a <= s && e <= b);
    let ct = resp.headers().get(reqwest::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    let single = resp
        .headers()
        .get(reqwest::header::CONTENT_RANGE)
        .and_then(|v| v.to_str().ok())
        .map(|v| content_range(v, size))
        .transpose()
        .map_err(|p| client.err(what, p))?;
    let mut body = Body { resp, buf: bytes::Bytes::new() };
    let boundary = ct
        .strip_prefix("multipart/byteranges")
        .and_then(|rest| rest.split(';').find_map(|p| p.trim().strip_prefix("boundary=")))
        .map(|b| b.trim_matches('"').to_string());
    let Some(boundary) = boundary else {
        let (s, e) = single.ok_or_else(|| client.err(what, "a 206 answer without Content-Range"))?;
        if !inside((s, e)) {
            return Err(client.err(what, format!("sent bytes {s}..{e}, which were not asked for")));
        }
        return body.copy_to(client, what, parts, s, e, got, &mut progress).await;
    };
    // Parts: `--boundary`, headers, a blank line, the bytes; then `--boundary--`. At most
    // one part per range asked for.
    for _ in 0..=asked.len() {
        let mut line = body.line(client, what).await?;
        if line.is_empty() {
            line = body.line(client, what).await?;
        }
        if line == format!("--{boundary}--") {
            return Ok(());
        }
        if line != format!("--{boundary}") {
            return Err(client.err(what, format!("unexpected line in a multipart answer: {line:?}")));
        }
        let mut range = None;
        for _ in 0..64 {
            let h = body.line(client, what).await?;
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                if k.trim().eq_ignore_ascii_case("content-range") {
                    range = Some(content_range(v.trim(), size).map_err(|p| client.err(what, p))?);
                }
            }
        }
        let (s, e) = range.ok_or_else(|| client.err(what, "a part without Content-Range"))?;
        if !inside((s, e)) || got.iter().any(|&(a, b)| a < e && s < b) {
            return Err(client.err(what, format!("sent bytes {s}..{e}, which were not asked for")));
        }
        body.copy_to(client, what, parts, s, e, got, &mut progress).await?;
    }
    Err(client.err(what, "a multipart answer with more parts than ranges asked for"))
}

/// `bytes a-b/size` as `a..b+1`, checked against the blob's size.
fn content_range(v: &str, size: u64) -> Result<(u64, u64), String> {
    let bad = || format!("bad Content-Range {v:?}");
    let spec = v.strip_prefix("bytes ").ok_or_else(bad)?;
    let (range, total) = spec.split_once('/').ok_or_else(bad)?;
    let (a, b) = range.split_once('-').ok_or_else(bad)?;
    let (a, b) = (a.parse::<u64>().map_err(|_| bad())?, b.parse::<u64>().map_err(|_| bad())?);
    if a > b || b >= size || (total != "*" && total.parse::<u64>().ok() != Some(size)) {
        return Err(bad());
    }
    Ok((a, b + 1))
}

/// A response body read as lines and byte counts.
struct Body {
    resp: reqwest::Response,
    buf: bytes::Bytes,
}

impl Body {
    async fn fill(&mut self, client: &crate::registry::Client, what: &str) -> Result<bool, ImageError> {
        if !self.buf.is_empty() {
            return Ok(true);
        }
        match self.resp.chunk().await {
            Ok(Some(c)) => {
                client.arrived(c.len()).await;
                self.buf = c;
                Ok(true)
            }
            Ok(None) => Ok(false),
            Err(e) => Err(ImageError::Unreachable {
                registry: client.endpoint.host.clone(),
                what: what.to_string(),
                problem: e.to_string(),
            }),
        }
    }

    /// A line without its CRLF (at most 4 KiB).
    async fn line(&mut self, client: &crate::registry::Client, what: &str) -> Result<String, ImageError> {
        let mut line = vec![];
        loop {
            if !self.fill(client, what).await? {
                return Err(client.err(what, "the multipart answer ends early"));
            }
            if let Some(i) = self.buf.iter().position(|&b| b == b'\n') {
                line.extend_from_slice(&self.buf.split_to(i + 1)[..i]);
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                return Ok(String::from_utf8_lossy(&line).into_owned());
            }
            line.extend_from_slice(&std::mem::take(&mut self.buf));
            if line.len() > 4096 {
                return Err(client.err(what, "a multipart header line is too long"));
            }
        }
    }

    /// Writes the body's next `e - s` bytes to `parts` at `s`.
    #[allow(clippy::too_many_arguments)]
    async fn copy_to(
        &mut self,
        client: &crate::registry::Client,
        what: &str,
        parts: &fs::File,
        s: u64,
        e: u64,
        got: &mut Vec<(u64, u64)>,
        progress: &mut impl FnMut(u64),
    ) -> Result<(), ImageError> {
        let mut pos = s;
        let result = async {
            while pos < e {
                if client.cancel.load(std::sync::atomic::Ordering::Relaxed) {
                    return Err(client.err(what, "cancelled"));
                }
                if !self.fill(client, what).await? {
                    return Err(ImageError::Unreachable {
                        registry: client.endpoint.host.clone(),
                        what: what.to_string(),
                        problem: format!("connection closed at {pos} in {s}..{e}"),
                    });
                }
                let n = ((e - pos) as usize).min(self.buf.len());
                let c = self.buf.split_to(n);
                parts.write_all_at(&c, pos).ctx("write", "a partial layer")?;
                pos += n as u64;
                progress(n as u64);
            }
            Ok(())
        }
        .await;
        if pos > s {
            // Kept sorted by insertion (parts come in order, mostly at the end).
            let at = got.partition_point(|r| r.0 < s);
            got.insert(at, (s, pos));
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(b: &[u8]) -> String {
        format!("sha256:{}", hex::encode(Sha256::digest(b)))
    }

    #[test]
    fn positions_are_checked() {
        let mut desc = Descriptor {
            media_type: crate::store::MT_OCI_LAYER_ZSTD.into(),
            digest: d(b"x"),
            size: 1000,
            platform: None,
            annotations: Default::default(),
        };
        assert!(toc_ref(&desc).is_none(), "a plain zstd layer");
        desc.annotations.insert(POSITION[1].into(), "900:50:300:1".into());
        assert!(toc_ref(&desc).unwrap().unwrap_err().to_string().contains("not its checksum"));
        desc.annotations.insert(CHECKSUM[1].into(), d(b"toc"));
        assert_eq!(
            toc_ref(&desc).unwrap().unwrap(),
            TocRef { offset: 900, len: 50, uncompressed: 300, checksum: d(b"toc") }
        );
        for (pos, why) in [
            ("990:50:300:1", "outside"),
            ("4:1:1:1", "outside"),
            ("900:50:300:2", "type 2"),
            ("900:x:300:1", "not a number"),
            ("900:50", "offset:length"),
        ] {
            desc.annotations.insert(POSITION[0].into(), pos.into());
            let e = toc_ref(&desc).unwrap().unwrap_err().to_string();
            assert!(e.contains(why), "{pos}: {e}");
        }
    }

    fn toc(entries: serde_json::Value) -> Toc {
        Toc::parse(serde_json::json!({"version": 1, "entries": entries}).to_string().as_bytes()).unwrap()
    }

    #[test]
    fn pieces_follow_files_and_chunks_in_order() {
        let t = toc(serde_json::json!([
            {"type": "dir", "name": "a/"},
            {"type": "reg", "name": "a/big", "size": 10, "digest": d(b"whole"), "offset": 100, "endOffset": 180,
             "chunkSize": 4, "chunkDigest": d(b"1234")},
            {"type": "chunk", "name": "a/big", "offset": 130, "chunkOffset": 4, "chunkSize": 6,
             "chunkDigest": d(b"567890"), "chunkType": "zeros"},
            {"type": "reg", "name": "a/empty", "size": 0},
            {"type": "symlink", "name": "a/link", "linkName": "big"},
            {"type": "reg", "name": "a/small", "size": 3, "digest": d(b"abc"), "offset": 200, "endOffset": 220},
        ]));
        let p = t.pieces(300).unwrap();
        assert_eq!(p.len(), 3);
        assert_eq!((p[0].at, p[0].len, p[0].start, p[0].end, p[0].zeros), (0, 4, 100, 130, false));
        assert_eq!((p[1].at, p[1].len, p[1].start, p[1].end, p[1].zeros), (4, 6, 130, 180, true));
        assert_eq!((p[2].name.as_str(), p[2].len, p[2].start, p[2].end), ("a/small", 3, 200, 220));
        assert_eq!(hex::encode(p[2].digest), d(b"abc")[7..]);
        assert!(t.pieces(210).unwrap_err().contains("outside"), "past the data's end");

        let short = toc(serde_json::json!([
            {"type": "reg", "name": "f", "size": 10, "digest": d(b"x"), "offset": 1, "endOffset": 5, "chunkSize": 4,
             "chunkDigest": d(b"x")},
        ]));
        assert!(short.pieces(100).unwrap_err().contains("hold 4 bytes, not 10"));
        let stray = toc(serde_json::json!([
            {"type": "chunk", "name": "f", "offset": 1, "chunkOffset": 4, "chunkSize": 6, "chunkDigest": d(b"x")},
        ]));
        assert!(stray.pieces(100).unwrap_err().contains("without its file"));
        let md5 = toc(serde_json::json!([
            {"type": "reg", "name": "f", "size": 1, "digest": "md5:00", "offset": 1, "endOffset": 5},
        ]));
        assert!(md5.pieces(100).unwrap_err().contains("not sha256"));
        let backwards = toc(serde_json::json!([
            {"type": "reg", "name": "f", "size": 1, "digest": d(b"a"), "offset": 50, "endOffset": 60},
            {"type": "reg", "name": "g", "size": 1, "digest": d(b"b"), "offset": 10, "endOffset": 20},
        ]));
        assert!(backwards.pieces(100).unwrap_err().contains("out of order"));
    }

    fn piece(start: u64, end: u64) -> Piece {
        Piece { name: "f".into(), at: 0, len: 1, digest: [0; 32], zeros: false, start, end }
    }

    #[test]
    fn plans_fetch_everything_but_what_is_here_and_merge_close_ranges() {
        let here = Some(Local::Zeros);
        let pieces = vec![piece(100, 50_000), piece(50_010, 60_000), piece(70_000, 200_000), piece(200_100, 300_000)];
        let plan = Plan::new(pieces.clone(), vec![here.clone(), None, here.clone(), here.clone()], 400_000);
        // Headers before the first chunk; the second chunk with the headers around it;
        // the gaps between chunks found here; the tail.
        assert_eq!(plan.ranges, vec![(0, 100), (50_000, 70_000), (200_000, 200_100), (300_000, 400_000)]);
        assert!(plan.fetched(50_010, 60_000));
        assert!(!plan.fetched(70_000, 200_000));
        assert_eq!(plan.reused_bytes(), 3);
        assert!(plan.worth_it(1_000_000));
        let none_here = Plan::new(pieces, vec![None; 4], 400_000);
        assert_eq!(none_here.ranges, vec![(0, 400_000)]);
        assert!(!none_here.worth_it(400_100));
    }

    #[test]
    fn ranges_are_subtracted_and_content_ranges_checked() {
        assert_eq!(subtract(&[(0, 10), (20, 30)], &[(0, 4), (22, 30)]), vec![(4, 10), (20, 22)]);
        assert_eq!(subtract(&[(0, 10)], &[]), vec![(0, 10)]);
        assert_eq!(subtract(&[(0, 10)], &[(0, 10)]), vec![]);
        assert_eq!(subtract(&[(0, 10)], &[(3, 5)]), vec![(0, 3), (5, 10)]);
        assert_eq!(content_range("bytes 0-9/100", 100), Ok((0, 10)));
        assert_eq!(content_range("bytes 5-5/*", 100), Ok((5, 6)));
        assert!(content_range("bytes 0-100/100", 100).is_err());
        assert!(content_range("bytes 9-3/100", 100).is_err());
        assert!(content_range("bytes 0-9/99", 100).is_err());
        assert!(content_range("items 0-9/100", 100).is_err());
    }

    #[test]
    fn a_rebuild_checks_every_chunk() {
        // Frames: header "H", chunk "abc" (fetched), header "I", chunk of zeros (here).
        let frame = |b: &[u8]| ruzstd::encoding::compress_to_vec(b, ruzstd::encoding::CompressionLevel::Fastest);
        let mut blob = frame(b"H");
        let s1 = blob.len() as u64;
        blob.extend(frame(b"abc"));
        let e1 = blob.len() as u64;
        blob.extend(frame(b"I"));
        let s2 = blob.len() as u64;
        blob.extend(frame(&[0u8; 5]));
        let e2 = blob.len() as u64;
        let mk = |digest: [u8; 32]| {
            vec![
                Piece { name: "a".into(), at: 0, len: 3, digest, zeros: false, start: s1, end: e1 },
                Piece {
                    name: "z".into(),
                    at: 0,
                    len: 5,
                    digest: Sha256::digest([0u8; 5]).into(),
                    zeros: true,
                    start: s2,
                    end: e2,
                },
            ]
        };
        let t = tempfile::tempdir().unwrap();
        let parts = t.path().join("parts");
        std::fs::write(&parts, &blob).unwrap();
        let good = Plan::new(mk(Sha256::digest(b"abc").into()), vec![None, Some(Local::Zeros)], e2);
        let mut out = vec![];
        good.stream(fs::File::open(&parts).unwrap()).read_to_end(&mut out).unwrap();
        assert_eq!(out, b"HabcI\0\0\0\0\0");
        let bad = Plan::new(mk(Sha256::digest(b"abd").into()), vec![None, Some(Local::Zeros)], e2);
        let err = bad.stream(fs::File::open(&parts).unwrap()).read_to_end(&mut vec![]).unwrap_err();
        assert!(err.to_string().contains("the chunk of a at 0 does not match"), "{err}");
    }
}
