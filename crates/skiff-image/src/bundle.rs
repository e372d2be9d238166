//! Delta bundles: an image in one file for a node with no link to a registry (the
//! `docker save` on a USB stick), carrying only the chunks an older image lacks.
//!
//! A bundle is a tar:
//!
//! ```text
//! skiff-bundle.json          Header: what the bundle holds and what it was made --since
//! blobs/sha256/<hex>         the top manifest (or index), the platform's manifest, config
//! signatures.json            the signatures kept for the top digest (when there are any)
//! layers/<diff-id-hex>       each layer's chunk list (chunks::encode_list)
//! carried                    the chunk list of the chunks in `chunks.gz`, in order
//! chunks.gz                  those chunks, concatenated, gzip-compressed
//! ```
//!
//! Loading rebuilds each layer's exact tar from the carried chunks and the chunks of layers
//! the node holds, and unpacks it only if it hashes to the diff_id the config names; the
//! manifest and config enter the store by their digests. What the bundle's header says is
//! only believed where those digests vouch for it. A bundle that needs chunks the node
//! lacks is refused before anything is written, naming the image it was made against.

use crate::chunks::{self, ChunkRef, Pool};
use crate::digest::{sha256_hex, sha256_of};
use crate::error::IoContext;
use crate::store::{LayerRef, Platform};
use crate::trust::StoredSignature;
use crate::{ImageError, ImageStore};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::Path;

pub const FORMAT: u32 = 1;
type Entry<'a> = tar::Entry<'a, BufReader<fs::File>>;
const HEADER: &str = "skiff-bundle.json";
const CARRIED: &str = "carried";
const CHUNKS: &str = "chunks.gz";
/// Bounds on what a bundle's metadata may make us hold in memory.
const MAX_JSON: u64 = 16 << 20;
const MAX_LIST: u64 = 256 << 20;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Header {
    pub format: u32,
    /// The name the image is stored under when loaded.
    pub reference: String,
    /// The manifest or index `reference` points at.
    pub top: String,
    /// The manifest of `platform` (`top` itself for a single-platform image).
    pub manifest: String,
    pub config: String,
    pub platform: String,
    /// The image whose chunks were left out; `None` for a complete image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<Since>,
    pub layers: Vec<BundleLayer>,
    /// min, average and max chunk size the chunk lists were cut with.
    pub chunk_sizes: [u32; 3],
    /// The chunks in `chunks.gz`.
    pub carried_chunks: u64,
    /// Their bytes before and after compression.
    pub carried_bytes: u64,
    pub carried_compressed: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Since {
    pub reference: String,
    pub manifest: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct BundleLayer {
    pub digest: String,
    pub diff_id: String,
    /// The layer blob's size (as the manifest says).
    pub size: u64,
    /// The uncompressed tar's size, and how many chunks it is cut into.
    pub tar_size: u64,
    pub chunks: u64,
}

impl Header {
    pub fn tar_bytes(&self) -> u64 {
        self.layers.iter().map(|l| l.tar_size).sum()
    }
}

/// What a load did.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Loaded {
    pub reference: String,
    pub manifest: String,
    pub layers_rebuilt: usize,
    pub layers_present: usize,
    /// Uncompressed bytes taken from the bundle, and from layers the node held.
    pub bytes_from_bundle: u64,
    pub bytes_reused: u64,
}

fn sizes() -> [u32; 3] {
    [chunks::MIN_SIZE as u32, chunks::AVG_SIZE as u32, chunks::MAX_SIZE as u32]
}

fn damaged(path: &Path, problem: impl Into<String>) -> ImageError {
    ImageError::Malformed { what: format!("bundle {}", path.display()), problem: problem.into() }
}

impl ImageStore {
    /// Writes a bundle of `reference` (for `platform`, else this machine's) to `out`,
    /// leaving out every chunk the layers of `since` hold.
    pub fn bundle_create(
        &self,
        reference: &str,
        since: Option<&str>,
        platform: Option<&Platform>,
        out: &Path,
    ) -> Result<Header, ImageError> {
        let _lease = self.lease()?;
        let want = platform.cloned().unwrap_or_else(crate::store::host_platform);
        let info = self.inspect_platform(reference, &want)?;
        if info.wasm.is_some() {
            return Err(ImageError::UnsupportedMediaType(format!(
                "{reference} is a WebAssembly artifact; bundles carry container images (write it with `skiff image save`)"
            )));
        }
        let top = self.top_digest(reference)?;
        let mut old = HashSet::new();
        let since = match since {
            Some(s) => {
                let o = self.inspect_platform(s, &want)?;
                for l in &o.layers {
                    old.extend(self.chunk_index(l)?.chunks.iter().map(|c| c.digest));
                }
                Some(Since { reference: o.reference, manifest: o.manifest_digest })
            }
            None => None,
        };
        let mut lists = vec![];
        let mut carried: Vec<ChunkRef> = vec![];
        let mut taken = HashSet::new();
        for l in &info.layers {
            let index = self.chunk_index(l)?;
            for c in &index.chunks {
                if !old.contains(&c.digest) && taken.insert(c.digest) {
                    carried.push(*c);
                }
            }
            lists.push(index.chunks);
        }
        let tmp = self.tmp_dir("bundle")?;
        let res = (|| {
            let gz_path = tmp.join(CHUNKS);
            self.write_chunks(&info.layers, &lists, &taken, &gz_path)?;
            let header = Header {
                format: FORMAT,
                reference: info.reference.clone(),
                top: top.clone(),
                manifest: info.manifest_digest.clone(),
                config: info.config_digest.clone(),
                platform: info.platform.clone(),
                since,
                layers: info
                    .layers
                    .iter()
                    .zip(&lists)
                    .map(|(l, c)| BundleLayer {
                        digest: l.digest.clone(),
                        diff_id: l.diff_id.clone(),
                        size: l.size,
                        tar_size: c.iter().map(|c| u64::from(c.len)).sum(),
                        chunks: c.len() as u64,
                    })
                    .collect(),
                chunk_sizes: sizes(),
                carried_chunks: carried.len() as u64,
                carried_bytes: carried.iter().map(|c| u64::from(c.len)).sum(),
                carried_compressed: fs::metadata(&gz_path).ctx("stat", &gz_path)?.len(),
            };
            let partial = tmp.join("bundle.tar");
            let file = fs::File::create(&partial).ctx("create", &partial)?;
            let mut b = tar::Builder::new(BufWriter::new(file));
            let json = serde_json::to_vec_pretty(&header)
                .map_err(|e| ImageError::Malformed { what: "bundle header".into(), problem: e.to_string() })?;
            crate::save::add_entry(&mut b, HEADER, json.len() as u64, &json[..]).ctx("write", &partial)?;
            let mut blobs = vec![top.clone(), info.manifest_digest.clone(), info.config_digest.clone()];
            blobs.dedup();
            for d in &blobs {
                let bytes = self.read_blob(d)?;
                let name = format!("blobs/sha256/{}", sha256_hex(d)?);
                crate::save::add_entry(&mut b, &name, bytes.len() as u64, &bytes[..]).ctx("write", &partial)?;
            }
            let sigs = self.signatures(&top)?;
            if !sigs.is_empty() {
                let bytes = serde_json::to_vec(&sigs)
                    .map_err(|e| ImageError::Malformed { what: "signatures".into(), problem: e.to_string() })?;
                crate::save::add_entry(&mut b, "signatures.json", bytes.len() as u64, &bytes[..])
                    .ctx("write", &partial)?;
            }
            for (l, c) in info.layers.iter().zip(&lists) {
                let bytes = chunks::encode_list(c);
                let name = format!("layers/{}", sha256_hex(&l.diff_id)?);
                crate::save::add_entry(&mut b, &name, bytes.len() as u64, &bytes[..]).ctx("write", &partial)?;
            }
            let bytes = chunks::encode_list(&carried);
            crate::save::add_entry(&mut b, CARRIED, bytes.len() as u64, &bytes[..]).ctx("write", &partial)?;
            let gz = fs::File::open(&gz_path).ctx("open", &gz_path)?;
            crate::save::add_entry(&mut b, CHUNKS, header.carried_compressed, BufReader::new(gz))
                .ctx("write", &partial)?;
            crate::save::finish_tar(b, &partial)?;
            // Renamed when whole; across filesystems, copied beside `out` first.
            if fs::rename(&partial, out).is_err() {
                let beside = out.with_extension("partial");
                fs::copy(&partial, &beside).ctx("write", &beside)?;
                fs::rename(&beside, out).ctx("rename", out)?;
            }
            Ok(header)
        })();
        let _ = fs::remove_dir_all(&tmp);
        res
    }

    /// Writes the chunks of `layers` that are in `wanted` (each once, in stream order)
    /// into a gzip file, reading each layer that has one once.
    fn write_chunks(
        &self,
        layers: &[LayerRef],
        lists: &[Vec<ChunkRef>],
        wanted: &HashSet<[u8; 32]>,
        path: &Path,
    ) -> Result<(), ImageError> {
        let file = fs::File::create(path).ctx("create", path)?;
        let mut gz = flate2::write::GzEncoder::new(BufWriter::new(file), flate2::Compression::default());
        let mut written = HashSet::new();
        let mut buf = vec![0u8; chunks::MAX_SIZE];
        for (l, list) in layers.iter().zip(lists) {
            if !list.iter().any(|c| wanted.contains(&c.digest) && !written.contains(&c.digest)) {
                continue;
            }
            let source = self.layer_source(&l.diff_id, &l.digest)?;
            let mut r = self.open_layer_stream(&source)?;
            let blob = self.blob_path(&source)?;
            for c in list {
                let chunk = &mut buf[..c.len as usize];
                r.read_exact(chunk).ctx("read", &blob)?;
                if wanted.contains(&c.digest) && written.insert(c.digest) {
                    if ChunkRef::of(chunk).digest != c.digest {
                        return Err(ImageError::Malformed {
                            what: format!("layer {}", l.diff_id),
                            problem: "a chunk read back from the store does not match its index (the store is damaged)"
                                .into(),
                        });
                    }
                    gz.write_all(chunk).ctx("write", path)?;
                }
            }
        }
        gz.finish().ctx("write", path)?.into_inner().map_err(|e| e.into_error()).ctx("write", path)?;
        Ok(())
    }

    /// Loads a bundle: checks that every chunk it needs is in it or in a layer this node
    /// holds, rebuilds and verifies each layer, then stores and tags the image.
    pub fn bundle_load(&self, path: &Path) -> Result<Loaded, ImageError> {
        let _lease = self.lease()?;
        let file = fs::File::open(path).ctx("open", path)?;
        let mut archive = tar::Archive::new(BufReader::with_capacity(1 << 20, file));
        let mut entries = archive.entries().ctx("read", path)?;
        let mut next = || -> Result<Option<(String, Entry<'_>)>, ImageError> {
            match entries.next() {
                None => Ok(None),
                Some(e) => {
                    let e = e.ctx("read", path)?;
                    let name = e.path().ctx("read", path)?.to_string_lossy().into_owned();
                    Ok(Some((name, e)))
                }
            }
        };
        let read_small = |name: &str, e: &mut Entry<'_>, limit: u64| {
            if e.size() > limit {
                return Err(damaged(path, format!("{name} is {} bytes (at most {limit})", e.size())));
            }
            let mut v = Vec::with_capacity(e.size() as usize);
            e.read_to_end(&mut v).ctx("read", path)?;
            Ok(v)
        };
        let first = next().map_err(|e| damaged(path, format!("not a skiff bundle (not a tar archive: {e})")))?;
        let header: Header = match first {
            Some((name, mut e)) if name == HEADER => {
                let bytes = read_small(&name, &mut e, MAX_JSON)?;
                let v: serde_json::Value =
                    serde_json::from_slice(&bytes).map_err(|e| damaged(path, format!("{HEADER}: {e}")))?;
                let format = v.get("format").and_then(|f| f.as_u64()).unwrap_or(0);
                if format != u64::from(FORMAT) {
                    return Err(damaged(path, format!("bundle format {format}; this skiff reads format {FORMAT}")));
                }
                serde_json::from_value(v).map_err(|e| damaged(path, format!("{HEADER}: {e}")))?
            }
            _ => return Err(damaged(path, format!("not a skiff bundle (its first entry is not {HEADER})"))),
        };
        if header.chunk_sizes != sizes() {
            return Err(damaged(
                path,
                format!("made with chunk sizes {:?}; this skiff cuts {:?}", header.chunk_sizes, sizes()),
            ));
        }
        let mut blobs = BTreeMap::new();
        let mut sigs: Vec<StoredSignature> = vec![];
        let mut lists = BTreeMap::new();
        let mut carried = None;
        let mut gz_entry = None;
        // Only what the header names, each once, and all of it within one budget.
        let named: HashSet<&str> =
            [&header.top, &header.manifest, &header.config].into_iter().map(|d| d.as_str()).collect();
        let layer_ids: HashSet<&str> = header.layers.iter().map(|l| l.diff_id.as_str()).collect();
        let mut budget = MAX_LIST;
        while let Some((name, mut e)) = next()? {
            let mut take = |limit: u64| {
                let bytes = read_small(&name, &mut e, limit.min(budget))?;
                budget -= bytes.len() as u64;
                Ok::<_, ImageError>(bytes)
            };
            if let Some(hex) = name.strip_prefix("blobs/sha256/") {
                let digest = format!("sha256:{hex}");
                if !named.contains(digest.as_str()) || blobs.contains_key(&digest) {
                    return Err(damaged(path, format!("unexpected entry {name}")));
                }
                let bytes = take(MAX_JSON)?;
                if sha256_of(&bytes) != hex {
                    return Err(damaged(path, format!("{name} does not match its digest")));
                }
                blobs.insert(digest, bytes);
            } else if name == "signatures.json" {
                let bytes = take(MAX_JSON)?;
                sigs = serde_json::from_slice(&bytes).map_err(|e| damaged(path, format!("{name}: {e}")))?;
            } else if let Some(hex) = name.strip_prefix("layers/") {
                let diff_id = format!("sha256:{hex}");
                if !layer_ids.contains(diff_id.as_str()) || lists.contains_key(&diff_id) {
                    return Err(damaged(path, format!("unexpected entry {name}")));
                }
                let bytes = take(MAX_LIST)?;
                lists.insert(diff_id, chunks::decode_list(&bytes, &name)?);
            } else if name == CARRIED {
                let bytes = take(MAX_LIST)?;
                carried = Some(chunks::decode_list(&bytes, &name)?);
            } else if name == CHUNKS {
                gz_entry = Some(e);
                break;
            } else {
                return Err(damaged(path, format!("unexpected entry {name}")));
            }
        }
        let (Some(carried), Some(gz_entry)) = (carried, gz_entry) else {
            return Err(damaged(path, format!("truncated: no {CARRIED} or {CHUNKS}")));
        };
        let layers = self.check_bundle_image(path, &header, &blobs)?;
        // Every carried chunk belongs to a layer, once; together no more than the disk holds.
        let listed: HashSet<[u8; 32]> = lists.values().flatten().map(|c| c.digest).collect();
        let mut seen = HashSet::new();
        if let Some(c) = carried.iter().find(|c| !listed.contains(&c.digest) || !seen.insert(c.digest)) {
            return Err(damaged(path, format!("it carries chunk {} twice or for no layer", c.name())));
        }
        let carried_bytes: u64 = carried.iter().map(|c| u64::from(c.len)).sum();
        if let Some(free) = crate::bomb::free_for_layers(self.root()) {
            if carried_bytes > free {
                return Err(damaged(path, format!("its chunks take {carried_bytes} bytes; the disk has {free} left")));
            }
        }
        let list_of = |l: &LayerRef| {
            lists.get(&l.diff_id).ok_or_else(|| damaged(path, format!("no chunk list for layer {}", l.diff_id)))
        };
        // What must be rebuilt, and where each chunk comes from: all of it is known
        // before anything is written.
        let todo: Vec<&LayerRef> =
            layers.iter().filter(|l| !self.layer_dir(&l.diff_id).is_ok_and(|d| d.exists())).collect();
        let in_bundle: HashSet<[u8; 32]> = carried.iter().map(|c| c.digest).collect();
        let mut local = HashSet::new();
        for l in &todo {
            local.extend(list_of(l)?.iter().filter(|c| !in_bundle.contains(&c.digest)).map(|c| c.digest));
        }
        let found = self.find_chunks(&local)?;
        if found.len() < local.len() {
            let missing: Vec<&ChunkRef> = todo
                .iter()
                .flat_map(|l| list_of(l).into_iter().flatten())
                .filter(|c| local.contains(&c.digest) && !found.contains_key(&c.digest))
                .collect::<Vec<_>>();
            let mut seen = HashSet::new();
            let (n, bytes) = missing
                .iter()
                .filter(|c| seen.insert(c.digest))
                .fold((0u64, 0u64), |(n, b), c| (n + 1, b + u64::from(c.len)));
            return Err(ImageError::BundleIncomplete {
                path: path.to_path_buf(),
                chunks: n,
                bytes,
                since: match &header.since {
                    Some(s) => {
                        format!("it was made --since {} ({}); load or pull that image first", s.reference, s.manifest)
                    }
                    None => "it claims to be complete, so it is damaged".into(),
                },
            });
        }
        let tmp = self.tmp_dir("bundle-load")?;
        let res = (|| {
            let mut pool = Pool::create(tmp.join("pool"))?;
            let mut gz = flate2::read::MultiGzDecoder::new(BufReader::with_capacity(256 << 10, gz_entry));
            let mut buf = vec![0u8; chunks::MAX_SIZE];
            for (i, c) in carried.iter().enumerate() {
                let chunk = &mut buf[..c.len as usize];
                gz.read_exact(chunk)
                    .map_err(|e| damaged(path, format!("{CHUNKS}: chunk {} of {}: {e}", i + 1, carried.len())))?;
                if ChunkRef::of(chunk).digest != c.digest {
                    return Err(damaged(
                        path,
                        format!("chunk {} of {} ({}) does not match its digest", i + 1, carried.len(), c.name()),
                    ));
                }
                pool.put(c.digest, chunk)?;
            }
            self.gather_chunks(&found, &mut pool)?;
            let mut loaded = Loaded {
                reference: header.reference.clone(),
                manifest: header.manifest.clone(),
                layers_rebuilt: 0,
                layers_present: layers.len() - todo.len(),
                bytes_from_bundle: 0,
                bytes_reused: 0,
            };
            for l in &todo {
                let list = list_of(l)?;
                for c in list.iter() {
                    if in_bundle.contains(&c.digest) {
                        loaded.bytes_from_bundle += u64::from(c.len);
                    } else {
                        loaded.bytes_reused += u64::from(c.len);
                    }
                }
                self.rebuild_layer(l, list, &pool, &tmp)?;
                loaded.layers_rebuilt += 1;
            }
            for (digest, bytes) in &blobs {
                self.put_blob_bytes(bytes, Some(digest))?;
            }
            if !sigs.is_empty() {
                self.put_signatures(&header.top, &sigs)?;
            }
            self.tag(&header.reference, &header.top)?;
            Ok(loaded)
        })();
        let _ = fs::remove_dir_all(&tmp);
        res
    }

    /// The layers of the bundle's image, from its manifest and config (which the digests
    /// vouch for), checked against what the header says.
    fn check_bundle_image(
        &self,
        path: &Path,
        header: &Header,
        blobs: &BTreeMap<String, Vec<u8>>,
    ) -> Result<Vec<LayerRef>, ImageError> {
        crate::registry::RemoteRef::parse(&header.reference)
            .map_err(|e| damaged(path, format!("reference {:?}: {e}", header.reference)))?;
        let bad = |d: &str, problem: String| damaged(path, format!("blob {d}: {problem}"));
        let platform = crate::registry::parse_platform(&header.platform)?;
        let image = crate::store::image_from_blobs(
            blobs,
            &header.top,
            Some(&header.manifest),
            &platform,
            &header.reference,
            &bad,
        )?;
        if image.config != header.config {
            return Err(damaged(path, format!("manifest {} does not name config {}", header.manifest, header.config)));
        }
        if image.layers.len() != header.layers.len() {
            return Err(damaged(path, "the manifest, config and header disagree on the number of layers"));
        }
        for (l, h) in image.layers.iter().zip(&header.layers) {
            if h.digest != l.digest || h.diff_id != l.diff_id {
                return Err(damaged(path, format!("the header's layer {} is not the manifest's", h.digest)));
            }
        }
        Ok(image.layers)
    }
}

/// A bundle's header (read from its first entry) and the file's size.
pub fn inspect(path: &Path) -> Result<(Header, u64), ImageError> {
    let file = fs::File::open(path).ctx("open", path)?;
    let size = file.metadata().ctx("stat", path)?.len();
    let mut archive = tar::Archive::new(BufReader::new(file));
    let mut entries = archive.entries().ctx("read", path)?;
    let not_bundle = || damaged(path, format!("not a skiff bundle (its first entry is not {HEADER})"));
    let mut e = entries.next().ok_or_else(not_bundle)?.map_err(|_| not_bundle())?;
    if e.path().ctx("read", path)?.to_string_lossy() != HEADER || e.size() > MAX_JSON {
        return Err(not_bundle());
    }
    let mut bytes = vec![];
    e.read_to_end(&mut bytes).ctx("read", path)?;
    let header = serde_json::from_slice(&bytes).map_err(|e| damaged(path, format!("{HEADER}: {e}")))?;
    Ok((header, size))
}
