//! The on-disk store:
//!
//! ```text
//! <root>/blobs/sha256/<hex>     verified blobs: manifests, indexes, configs, layer tars
//!                               (a layer rebuilt from chunks: its tar, named by its diff_id)
//! <root>/layers/<diff-id-hex>/  unpacked layers in overlay form (see `unpack`)
//! <root>/chunks/<diff-id-hex>   each unpacked layer's chunk index (see `chunks`)
//! <root>/tocs/<diff-id-hex>     a zstd:chunked layer's table of contents (see `chunked`)
//! <root>/refs.json              reference -> top manifest (or index) digest
//! <root>/tmp/                   partial work; `partial-*` downloads are kept for a resume,
//!                               the rest may be deleted at startup
//! <root>/gc.lock                shared by pulls and loads, exclusive for collection (`gc`)
//! ```
//!
//! Registry pulls and loads plug in at `put_blob_*` and `tag`: whatever brings the bytes,
//! they enter the store only through digest verification.

use crate::chunks::{ChunkIndex, ChunkingReader};
use crate::digest::{sha256_hex, sha256_of, HashingReader};
use crate::error::IoContext;
use crate::wasm::Target;
use crate::{normalize_reference, ImageError};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};

pub const MT_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const MT_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const MT_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const MT_DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const MT_OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const MT_OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";
pub const MT_OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const MT_OCI_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Descriptor {
    #[serde(rename = "mediaType", default)]
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Platform {
    pub architecture: String,
    pub os: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

/// The platform of this machine, in OCI spelling.
pub fn host_platform() -> Platform {
    let (arch, variant) = skiff_model::platform::host_arch();
    Platform { architecture: arch.into(), os: "linux".into(), variant: variant.map(Into::into) }
}

/// The entry of an index for `want`; a missing variant matches any. The error lists
/// the platforms the image has.
pub fn choose_platform<'a>(
    list: &'a [Descriptor],
    want: &Platform,
    reference: &str,
) -> Result<&'a Descriptor, ImageError> {
    // Wasm images name their OS wasi (Docker), wasip1 or wasip2 (Wasm OCI artifacts).
    let os_matches = |os: &str| os == want.os || (want.is_wasm() && os.starts_with("wasi"));
    let matches = |p: &Platform| {
        os_matches(&p.os)
            && p.architecture == want.architecture
            && (want.variant.is_none() || p.variant.is_none() || p.variant == want.variant)
    };
    list.iter().find(|d| d.platform.as_ref().is_some_and(matches)).ok_or_else(|| {
        let have: Vec<String> = list.iter().filter_map(|d| d.platform.as_ref().map(|p| p.to_string())).collect();
        ImageError::NoPlatform { reference: reference.into(), want: want.to_string(), have: have.join(", ") }
    })
}

/// An image manifest or an index (both parse into this; which one it is shows in
/// `media_type` or in which of `layers` / `manifests` is present).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    #[serde(rename = "schemaVersion")]
    pub schema_version: u32,
    #[serde(rename = "mediaType", default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<Descriptor>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layers: Option<Vec<Descriptor>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifests: Option<Vec<Descriptor>>,
}

impl Manifest {
    pub fn is_index(&self) -> bool {
        self.manifests.is_some() || matches!(self.media_type.as_deref(), Some(MT_OCI_INDEX | MT_DOCKER_LIST))
    }
}

/// The runtime-relevant part of an image config (`config` in the OCI config JSON).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ImageConfig {
    #[serde(rename = "Entrypoint", default, skip_serializing_if = "Option::is_none")]
    pub entrypoint: Option<Vec<String>>,
    #[serde(rename = "Cmd", default, skip_serializing_if = "Option::is_none")]
    pub cmd: Option<Vec<String>>,
    #[serde(rename = "Env", default, skip_serializing_if = "Option::is_none")]
    pub env: Option<Vec<String>>,
    #[serde(rename = "WorkingDir", default, skip_serializing_if = "Option::is_none")]
    pub working_dir: Option<String>,
    #[serde(rename = "User", default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(rename = "StopSignal", default, skip_serializing_if = "Option::is_none")]
    pub stop_signal: Option<String>,
    #[serde(rename = "Labels", default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Clone, Deserialize)]
struct RootFs {
    #[serde(default)]
    diff_ids: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
struct ConfigFile {
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    os: String,
    #[serde(default)]
    variant: Option<String>,
    #[serde(default)]
    config: Option<ImageConfig>,
    rootfs: RootFs,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LayerRef {
    /// Digest of the blob as stored (possibly compressed).
    pub digest: String,
    /// Digest of the uncompressed tar; names the unpacked directory.
    pub diff_id: String,
    pub size: u64,
}

/// A resolved, runnable image.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ImageInfo {
    pub reference: String,
    pub manifest_digest: String,
    /// The image ID, as Docker shows it.
    pub config_digest: String,
    pub platform: String,
    pub config: ImageConfig,
    pub layers: Vec<LayerRef>,
    /// A Wasm OCI artifact's module layer (a raw WebAssembly binary, never unpacked);
    /// `layers` is then empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wasm: Option<Descriptor>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImageSummary {
    pub reference: String,
    pub digest: String,
    pub size: u64,
    /// `linux/amd64`, `wasip1/wasm`, ...; empty when the image cannot be read.
    #[serde(default)]
    pub platform: String,
}

pub struct ImageStore {
    root: PathBuf,
    /// `refs.json` as last read, and images resolved from it: a lookup costs one `stat`
    /// while nothing changed. Manifests and configs are content-addressed, so a resolved
    /// image stays true while its reference points at the same digest; any change of
    /// `refs.json` (by this process or another) starts the cache afresh.
    cache: std::sync::Mutex<Option<RefsCache>>,
}

struct RefsCache {
    stamp: Option<Stamp>,
    refs: BTreeMap<String, String>,
    images: std::collections::HashMap<(String, String, Target), ImageInfo>,
}

/// What tells one `refs.json` from another without reading it (every write renames a
/// new file over it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
}

impl Stamp {
    fn of(m: &fs::Metadata) -> Stamp {
        use std::os::unix::fs::MetadataExt;
        Stamp {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
        }
    }
}

/// `refs.json` is read, changed and written back: one change at a time in this process
/// (two pulls ending together, an eviction beside a pull).
static REFS_WRITE: std::sync::Mutex<()> = std::sync::Mutex::new(());

pub(crate) fn io_tmp_name(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    format!("{prefix}-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed))
}

impl ImageStore {
    /// Opens (creating if needed) a store rooted at `root`.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, ImageError> {
        let root = root.into();
        for d in ["blobs/sha256", "layers", "tmp"] {
            fs::create_dir_all(root.join(d)).ctx("create", root.join(d))?;
        }
        Ok(ImageStore { root, cache: Default::default() })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// A fresh directory under `tmp/` for partial work; the caller removes it.
    pub fn tmp_dir(&self, prefix: &str) -> Result<PathBuf, ImageError> {
        let p = self.root.join("tmp").join(io_tmp_name(prefix));
        fs::create_dir_all(&p).ctx("create", &p)?;
        Ok(p)
    }

    pub fn blob_path(&self, digest: &str) -> Result<PathBuf, ImageError> {
        Ok(self.root.join("blobs/sha256").join(sha256_hex(digest)?))
    }

    pub fn has_blob(&self, digest: &str) -> bool {
        self.blob_path(digest).is_ok_and(|p| p.exists())
    }

    /// The overlay lower directory of an unpacked layer.
    pub fn layer_dir(&self, diff_id: &str) -> Result<PathBuf, ImageError> {
        Ok(self.root.join("layers").join(sha256_hex(diff_id)?))
    }

    pub fn put_blob_bytes(&self, bytes: &[u8], expected: Option<&str>) -> Result<String, ImageError> {
        let actual = sha256_of(bytes);
        let digest = format!("sha256:{actual}");
        if let Some(e) = expected {
            sha256_hex(e)?;
            if e != digest {
                return Err(ImageError::DigestMismatch { digest: e.to_string(), actual });
            }
        }
        let dst = self.blob_path(&digest)?;
        if !dst.exists() {
            let tmp = self.root.join("tmp").join(io_tmp_name("blob"));
            let mut f = fs::File::create(&tmp).ctx("create", &tmp)?;
            f.write_all(bytes).ctx("write", &tmp)?;
            f.sync_all().ctx("sync", &tmp)?;
            durable_rename(&tmp, &dst)?;
        }
        Ok(digest)
    }

    /// Verifies `src` against `expected` (or computes its digest) and copies it in.
    pub fn put_blob_file(&self, src: &Path, expected: Option<&str>) -> Result<String, ImageError> {
        let f = fs::File::open(src).ctx("open", src)?;
        let tmp = self.root.join("tmp").join(io_tmp_name("blob"));
        let mut out = fs::File::create(&tmp).ctx("create", &tmp)?;
        let mut r = HashingReader::new(BufReader::new(f));
        let res = std::io::copy(&mut r, &mut out).ctx("copy", src).and_then(|_| out.sync_all().ctx("sync", &tmp));
        if let Err(e) = res {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        let actual = r.finish().ctx("read", src)?;
        let digest = format!("sha256:{actual}");
        if let Some(e) = expected {
            if e != digest {
                let _ = fs::remove_file(&tmp);
                return Err(ImageError::DigestMismatch { digest: e.to_string(), actual });
            }
        }
        let dst = self.blob_path(&digest)?;
        durable_rename(&tmp, &dst)?;
        Ok(digest)
    }

    pub fn read_blob(&self, digest: &str) -> Result<Vec<u8>, ImageError> {
        let p = self.blob_path(digest)?;
        let bytes = fs::read(&p).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => {
                ImageError::Malformed { what: digest.to_string(), problem: "blob is missing from the store".into() }
            }
            _ => ImageError::Io { op: "read", path: p.clone(), source: e },
        })?;
        Ok(bytes)
    }

    fn read_json<T: serde::de::DeserializeOwned>(&self, digest: &str) -> Result<T, ImageError> {
        let bytes = self.read_blob(digest)?;
        serde_json::from_slice(&bytes)
            .map_err(|e| ImageError::Malformed { what: digest.to_string(), problem: e.to_string() })
    }

    /// Unpacks a layer blob (a plain, gzip or zstd tar) into `layers/<diff_id>`, verifying the
    /// uncompressed digest. Idempotent.
    pub fn ensure_layer(&self, layer: &LayerRef) -> Result<PathBuf, ImageError> {
        let dst = self.layer_dir(&layer.diff_id)?;
        if dst.exists() {
            return Ok(dst);
        }
        // A layer rebuilt from chunks is kept as its uncompressed tar, named by its diff_id.
        let digest =
            if !self.has_blob(&layer.digest) && self.has_blob(&layer.diff_id) { &layer.diff_id } else { &layer.digest };
        let blob = self.blob_path(digest)?;
        let f = fs::File::open(&blob).ctx("open", &blob)?;
        let tmp = self.unpack_to_tmp(layer, BufReader::new(f))?;
        self.place_layer(layer, &tmp)
    }

    /// Unpacks a layer's (possibly gzip- or zstd-compressed) bytes into a fresh hidden directory
    /// under `layers/` and checks the diff_id; the directory is removed on any failure.
    pub(crate) fn unpack_to_tmp(&self, layer: &LayerRef, mut src: impl Read) -> Result<PathBuf, ImageError> {
        let tmp = self.root.join("layers").join(format!(".{}", io_tmp_name("unpack")));
        fs::create_dir(&tmp).ctx("create", &tmp)?;
        let result = (|| {
            let mut magic = [0u8; 4];
            let n = read_full(&mut src, &mut magic).ctx("read", &layer.digest)?;
            let head = std::io::Cursor::new(magic[..n].to_vec()).chain(src);
            // Large buffers on both sides of the inflater: it runs fastest on big windows.
            let decompressed: Box<dyn Read> = if n >= 2 && magic[..2] == [0x1f, 0x8b] {
                let compressed = BufReader::with_capacity(256 << 10, head);
                Box::new(BufReader::with_capacity(1 << 20, flate2::bufread::MultiGzDecoder::new(compressed)))
            } else if crate::zstd::is_zstd(&magic[..n]) {
                Box::new(crate::zstd::ZstdFrames::new(BufReader::with_capacity(256 << 10, head)))
            } else {
                Box::new(head)
            };
            let cap = crate::bomb::Cap::for_layer(layer.size, &self.root);
            // Chunked as it passes, for the layer's chunk index.
            let mut chunking = ChunkingReader::new(crate::bomb::Capped::new(decompressed, cap.clone()));
            let mut hashing = HashingReader::new(&mut chunking);
            let unpacked = crate::unpack_layer(&mut hashing, &tmp);
            if let Some(why) = cap.exceeded() {
                return Err(ImageError::TooLarge { digest: layer.digest.clone(), limit: cap.limit(), why });
            }
            unpacked.map_err(|source| ImageError::Unpack { digest: layer.digest.clone(), source })?;
            let actual = hashing.finish().ctx("read", &layer.digest)?;
            if format!("sha256:{actual}") != layer.diff_id {
                return Err(ImageError::DiffIdMismatch {
                    digest: layer.digest.clone(),
                    expected: layer.diff_id.clone(),
                    actual,
                });
            }
            let index = ChunkIndex { source: layer.digest.clone(), chunks: chunking.finish() };
            if let Err(e) = self.put_chunk_index(&layer.diff_id, &index) {
                tracing::warn!(layer = %layer.diff_id, "chunk index not kept (later updates send the whole layer): {e}");
            }
            Ok(())
        })();
        match result {
            Ok(()) => Ok(tmp),
            Err(e) => {
                let _ = fs::remove_dir_all(&tmp);
                Err(e)
            }
        }
    }

    /// Renames a verified unpack directory to `layers/<diff_id>`, once everything in it is
    /// on disk: a layer directory that exists after a power cut is a whole one.
    pub(crate) fn place_layer(&self, layer: &LayerRef, tmp: &Path) -> Result<PathBuf, ImageError> {
        let dst = self.layer_dir(&layer.diff_id)?;
        if let Err(e) = skiff_sys::durable::sync_filesystem(tmp) {
            let _ = fs::remove_dir_all(tmp);
            return Err(ImageError::Io { op: "sync", path: tmp.to_path_buf(), source: e.source });
        }
        skiff_sys::crash::point("image.layer.synced");
        match fs::rename(tmp, &dst) {
            Ok(()) => {
                let _ = skiff_sys::durable::sync_parent(&dst);
                skiff_sys::crash::point("image.layer.placed");
                Ok(dst)
            }
            // Unpacked meanwhile by someone else (the same layer twice in one pull).
            Err(_) if dst.exists() => {
                let _ = fs::remove_dir_all(tmp);
                Ok(dst)
            }
            Err(e) => {
                let _ = fs::remove_dir_all(tmp);
                Err(ImageError::Io { op: "rename", path: dst, source: e })
            }
        }
    }

    fn refs_path(&self) -> PathBuf {
        self.root.join("refs.json")
    }

    fn refs(&self) -> Result<BTreeMap<String, String>, ImageError> {
        let path = self.refs_path();
        let stamp = match fs::metadata(&path) {
            Ok(m) => Some(Stamp::of(&m)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(ImageError::Io { op: "stat", path, source: e }),
        };
        if let Some(c) = self.cache.lock().ok().as_ref().and_then(|c| c.as_ref()).filter(|c| c.stamp == stamp) {
            return Ok(c.refs.clone());
        }
        let refs: BTreeMap<String, String> = match fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b)
                .map_err(|e| ImageError::Malformed { what: path.display().to_string(), problem: e.to_string() })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(ImageError::Io { op: "read", path, source: e }),
        };
        if let Ok(mut c) = self.cache.lock() {
            *c = Some(RefsCache { stamp, refs: refs.clone(), images: Default::default() });
        }
        Ok(refs)
    }

    /// `image_for`, remembered while `refs.json` stays the same.
    fn image_cached(&self, reference: &str, top: &str, target: Target) -> Result<ImageInfo, ImageError> {
        let key = (reference.to_string(), top.to_string(), target);
        if let Some(info) = self.cache.lock().ok().and_then(|c| c.as_ref()?.images.get(&key).cloned()) {
            return Ok(info);
        }
        let info = self.image_for(reference, top, &target.platform())?;
        if let Ok(mut c) = self.cache.lock() {
            if let Some(c) = c.as_mut() {
                c.images.insert(key, info.clone());
            }
        }
        Ok(info)
    }

    fn write_refs(&self, refs: &BTreeMap<String, String>) -> Result<(), ImageError> {
        let tmp = self.root.join("tmp").join(io_tmp_name("refs"));
        let bytes = serde_json::to_vec_pretty(refs)
            .map_err(|e| ImageError::Malformed { what: "refs".into(), problem: e.to_string() })?;
        fs::write(&tmp, bytes).ctx("write", &tmp)?;
        let f = fs::File::open(&tmp).ctx("open", &tmp)?;
        f.sync_all().ctx("sync", &tmp)?;
        skiff_sys::crash::point("image.refs.synced");
        durable_rename(&tmp, &self.refs_path())?;
        skiff_sys::crash::point("image.refs.renamed");
        Ok(())
    }

    /// Points `reference` at a stored manifest or index.
    pub fn tag(&self, reference: &str, digest: &str) -> Result<(), ImageError> {
        if !self.has_blob(digest) {
            return Err(ImageError::Malformed {
                what: digest.into(),
                problem: "cannot tag a blob that is not stored".into(),
            });
        }
        let _one = REFS_WRITE.lock();
        let mut refs = self.refs()?;
        refs.insert(normalize_reference(reference), digest.to_string());
        self.write_refs(&refs)
    }

    /// The manifest or index digest `reference` points at, however it is spelled: a
    /// name, `name@sha256:…`, a manifest digest, or an image ID (as `inspect` finds it).
    pub fn top_digest(&self, reference: &str) -> Result<String, ImageError> {
        let refs = self.refs()?;
        if let Some(d) = refs.get(&normalize_reference(reference)).or_else(|| refs.get(reference)) {
            return Ok(d.clone());
        }
        match reference.rsplit_once('@') {
            Some((_, d)) if self.has_blob(d) => return Ok(d.to_string()),
            Some(_) => return Err(ImageError::NotFound(reference.to_string())),
            None => {}
        }
        if reference.starts_with("sha256:") && self.has_blob(reference) {
            return Ok(reference.to_string());
        }
        let info = self.inspect(reference)?;
        Ok(refs.get(&info.reference).cloned().unwrap_or(info.manifest_digest))
    }

    /// Every name in the store that points at the manifest or index `digest`.
    pub fn names_of(&self, digest: &str) -> Result<Vec<String>, ImageError> {
        Ok(self.refs()?.into_iter().filter(|(_, d)| d == digest).map(|(r, _)| r).collect())
    }

    /// Resolves a reference (`name:tag`, a short name, or an image/manifest digest) to a
    /// runnable image for the host platform, unpacking its layers if needed.
    pub fn resolve(&self, reference: &str) -> Result<ImageInfo, ImageError> {
        self.resolve_for(reference, Target::Host)
    }

    /// `resolve` for the entry of a multi-platform image that `target` runs.
    pub fn resolve_for(&self, reference: &str, target: Target) -> Result<ImageInfo, ImageError> {
        let info = self.inspect_for(reference, target)?;
        for l in &info.layers {
            self.ensure_layer(l)?;
        }
        Ok(info)
    }

    /// Like `resolve`, without unpacking. An image that offers no platform of this
    /// machine but a WebAssembly one (a wasm artifact or index) is shown as that, also when
    /// named by its image ID.
    pub fn inspect(&self, reference: &str) -> Result<ImageInfo, ImageError> {
        match self.inspect_for(reference, Target::Host) {
            Err(e @ (ImageError::NoPlatform { .. } | ImageError::NotFound(_))) => {
                self.inspect_for(reference, Target::Wasm).map_err(|_| e)
            }
            r => r,
        }
    }

    /// Like `resolve_for`, without unpacking.
    pub fn inspect_for(&self, reference: &str, target: Target) -> Result<ImageInfo, ImageError> {
        let refs = self.refs()?;
        let norm = normalize_reference(reference);
        let (name, top) = if let Some(d) = refs.get(&norm).or_else(|| refs.get(reference)) {
            (norm.clone(), d.clone())
        } else if reference.starts_with("sha256:") && self.has_blob(reference) {
            (reference.to_string(), reference.to_string())
        } else {
            // An image ID (config digest), full or a prefix of at least 12 hex digits.
            let want = reference.trim_start_matches("sha256:");
            let mut found = None;
            if want.len() >= 12 && want.bytes().all(|b| b.is_ascii_hexdigit()) {
                for (r, d) in &refs {
                    if let Ok(info) = self.image_cached(r, d, target) {
                        if info.config_digest.trim_start_matches("sha256:").starts_with(want) {
                            found = Some((r.clone(), d.clone()));
                            break;
                        }
                    }
                }
            }
            found.ok_or_else(|| ImageError::NotFound(reference.to_string()))?
        };
        self.image_cached(&name, &top, target)
    }

    /// `inspect` for the entry of a multi-platform image made for `platform` (which need
    /// not be this machine's: a bundle made here for devices of another kind).
    pub fn inspect_platform(&self, reference: &str, platform: &Platform) -> Result<ImageInfo, ImageError> {
        let top = self.top_digest(reference)?;
        let name = self.names_of(&top)?.into_iter().next().unwrap_or_else(|| reference.to_string());
        self.image_for(&name, &top, platform)
    }

    fn image_for(&self, reference: &str, top: &str, want: &Platform) -> Result<ImageInfo, ImageError> {
        let m: Manifest = self.read_json(top)?;
        let (manifest_digest, m) = if m.is_index() {
            // Only the entries that were pulled (or loaded) count: a pull stores the one
            // platform it was asked for.
            let list = m.manifests.unwrap_or_default();
            let stored: Vec<Descriptor> = list.into_iter().filter(|d| self.has_blob(&d.digest)).collect();
            let d = choose_platform(&stored, want, reference)?;
            (d.digest.clone(), self.read_json::<Manifest>(&d.digest)?)
        } else {
            (top.to_string(), m)
        };
        let config_desc = m.config.clone().ok_or_else(|| ImageError::Malformed {
            what: manifest_digest.clone(),
            problem: "manifest has no config".into(),
        })?;
        let wrong_kind =
            |have: String| ImageError::NoPlatform { reference: reference.to_string(), want: want.to_string(), have };
        if crate::wasm::is_artifact(&m) {
            let info = self.artifact_for(reference, manifest_digest, config_desc, m)?;
            return if want.is_wasm() { Ok(info) } else { Err(wrong_kind(info.platform)) };
        }
        let layers = m.layers.unwrap_or_default();
        let cfg: ConfigFile = self.read_json(&config_desc.digest)?;
        if cfg.rootfs.diff_ids.len() != layers.len() {
            return Err(ImageError::Malformed {
                what: config_desc.digest.clone(),
                problem: format!("config lists {} diff_ids for {} layers", cfg.rootfs.diff_ids.len(), layers.len()),
            });
        }
        let layers = layers
            .iter()
            .zip(&cfg.rootfs.diff_ids)
            .map(|(l, diff)| {
                match l.media_type.as_str() {
                    ""
                    | MT_OCI_LAYER
                    | MT_OCI_LAYER_GZIP
                    | MT_OCI_LAYER_ZSTD
                    | "application/vnd.docker.image.rootfs.diff.tar.gzip"
                    | "application/vnd.docker.image.rootfs.diff.tar" => {}
                    other => return Err(ImageError::UnsupportedMediaType(other.to_string())),
                }
                sha256_hex(diff)?;
                Ok(LayerRef { digest: l.digest.clone(), diff_id: diff.clone(), size: l.size })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let platform = Platform { architecture: cfg.architecture, os: cfg.os, variant: cfg.variant };
        // A single manifest is what it is: a wasi/wasm image runs no container, a container
        // image no WebAssembly program.
        if platform.is_wasm() != want.is_wasm() {
            return Err(wrong_kind(platform.to_string()));
        }
        Ok(ImageInfo {
            reference: reference.to_string(),
            manifest_digest,
            config_digest: config_desc.digest,
            platform: platform.to_string(),
            config: cfg.config.unwrap_or_default(),
            layers,
            wasm: None,
        })
    }

    /// A Wasm OCI artifact: its first wasm layer is the module; its config (when it is
    /// JSON) names the platform, `wasip1/wasm` or `wasip2/wasm`.
    fn artifact_for(
        &self,
        reference: &str,
        manifest_digest: String,
        config_desc: Descriptor,
        m: Manifest,
    ) -> Result<ImageInfo, ImageError> {
        let layer = m.layers.unwrap_or_default().into_iter().find(|l| crate::wasm::is_wasm_layer(&l.media_type));
        let layer = layer.ok_or_else(|| ImageError::Malformed {
            what: manifest_digest.clone(),
            problem: format!("a wasm artifact needs a layer of type {}", crate::wasm::WASM_LAYER_TYPES.join(" or ")),
        })?;
        sha256_hex(&layer.digest)?;
        #[derive(Deserialize, Default)]
        struct WasmConfig {
            #[serde(default)]
            architecture: String,
            #[serde(default)]
            os: String,
        }
        let cfg: WasmConfig = self.read_json(&config_desc.digest).unwrap_or_default();
        let platform = Platform {
            architecture: if cfg.architecture.is_empty() { "wasm".into() } else { cfg.architecture },
            os: if cfg.os.is_empty() { "wasi".into() } else { cfg.os },
            variant: None,
        };
        Ok(ImageInfo {
            reference: reference.to_string(),
            manifest_digest,
            config_digest: config_desc.digest,
            platform: platform.to_string(),
            config: ImageConfig::default(),
            layers: vec![],
            wasm: Some(layer),
        })
    }

    pub fn list(&self) -> Result<Vec<ImageSummary>, ImageError> {
        let mut out = vec![];
        for (r, d) in self.refs()? {
            let info = self.inspect(&r).ok();
            let size =
                info.as_ref().map(|i| i.layers.iter().map(|l| l.size).chain(i.wasm.iter().map(|w| w.size)).sum());
            let platform = info.map(|i| i.platform).unwrap_or_default();
            out.push(ImageSummary { reference: r, digest: d, size: size.unwrap_or(0), platform });
        }
        Ok(out)
    }

    /// Removes a reference, then every blob and layer no reference needs any more.
    /// `in_use` lists references that running workloads need; those are refused.
    pub fn remove(&self, reference: &str, in_use: &BTreeMap<String, Vec<String>>) -> Result<(), ImageError> {
        let one = REFS_WRITE.lock();
        let mut refs = self.refs()?;
        let norm = normalize_reference(reference);
        let key = if refs.contains_key(&norm) {
            norm
        } else if refs.contains_key(reference) {
            reference.to_string()
        } else {
            return Err(ImageError::NotFound(reference.to_string()));
        };
        if let Some(users) = in_use.get(&key).filter(|u| !u.is_empty()) {
            return Err(ImageError::InUse { reference: key, users: users.join(", ") });
        }
        refs.remove(&key);
        self.write_refs(&refs)?;
        drop(one);
        self.gc()?;
        Ok(())
    }

    pub(crate) fn refs_map(&self) -> Result<BTreeMap<String, String>, ImageError> {
        self.refs()
    }

    /// Removes one reference as it is spelled in `refs.json` (blobs stay until collected).
    pub(crate) fn untag(&self, reference: &str) -> Result<(), ImageError> {
        let _one = REFS_WRITE.lock();
        let mut refs = self.refs()?;
        if refs.remove(reference).is_some() {
            self.write_refs(&refs)?;
        }
        Ok(())
    }

    /// Deletes blobs and unpacked layers that no reference reaches. Returns the number of
    /// bytes freed (blobs only). Refused with `Busy` while a pull or load runs.
    pub fn gc(&self) -> Result<u64, ImageError> {
        let Some(_lock) = self.try_exclusive()? else {
            return Err(ImageError::Busy);
        };
        self.gc_unlocked()
    }

    pub(crate) fn gc_unlocked(&self) -> Result<u64, ImageError> {
        let mut keep_blobs = BTreeSet::new();
        let mut keep_layers = BTreeSet::new();
        for (_, top) in self.refs()? {
            keep_blobs.insert(top.clone());
            let Ok(m) = self.read_json::<Manifest>(&top) else {
                continue;
            };
            let manifests: Vec<String> = match m.manifests {
                Some(list) => list.into_iter().map(|d| d.digest).collect(),
                None => vec![top.clone()],
            };
            for md in manifests {
                keep_blobs.insert(md.clone());
                let Ok(m) = self.read_json::<Manifest>(&md) else {
                    continue;
                };
                if let Some(c) = &m.config {
                    keep_blobs.insert(c.digest.clone());
                    if let Ok(cfg) = self.read_json::<ConfigFile>(&c.digest) {
                        keep_layers
                            .extend(cfg.rootfs.diff_ids.iter().map(|d| d.trim_start_matches("sha256:").to_string()));
                    }
                }
                for l in m.layers.unwrap_or_default() {
                    keep_blobs.insert(l.digest);
                }
            }
        }
        // A layer rebuilt from chunks keeps its uncompressed tar, named by its diff_id.
        let keep_blob_hex: BTreeSet<String> = keep_blobs
            .iter()
            .map(|d| d.trim_start_matches("sha256:").to_string())
            .chain(keep_layers.iter().cloned())
            .collect();
        let mut freed = 0;
        let blobs = self.root.join("blobs/sha256");
        for e in fs::read_dir(&blobs).ctx("read", &blobs)?.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !keep_blob_hex.contains(&name) {
                freed += e.metadata().map(|m| m.len()).unwrap_or(0);
                fs::remove_file(e.path()).ctx("remove", e.path())?;
            }
        }
        // Signatures go with the image they sign.
        let sigs = self.root.join("signatures");
        for e in fs::read_dir(&sigs).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !name.strip_suffix(".json").is_some_and(|hex| keep_blob_hex.contains(hex)) {
                fs::remove_file(e.path()).ctx("remove", e.path())?;
            }
        }
        let layers = self.root.join("layers");
        for e in fs::read_dir(&layers).ctx("read", &layers)?.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !keep_layers.contains(&name) {
                fs::remove_dir_all(e.path()).ctx("remove", e.path())?;
            }
        }
        // Chunk indexes and zstd:chunked TOCs go with their layers.
        for dir in ["chunks", "tocs"] {
            for e in fs::read_dir(self.root.join(dir)).into_iter().flatten().flatten() {
                if !keep_layers.contains(&*e.file_name().to_string_lossy()) {
                    fs::remove_file(e.path()).ctx("remove", e.path())?;
                }
            }
        }
        Ok(freed)
    }

    /// The diff_ids listed by a stored image config.
    pub fn diff_ids(&self, config_digest: &str) -> Result<Vec<String>, ImageError> {
        let cfg: ConfigFile = self.read_json(config_digest)?;
        for d in &cfg.rootfs.diff_ids {
            sha256_hex(d)?;
        }
        Ok(cfg.rootfs.diff_ids)
    }

    /// Removes leftovers of interrupted work, keeping partial downloads (`partial-*`),
    /// which a later pull resumes. Does nothing while a pull or load runs.
    pub fn clean_tmp(&self) -> Result<(), ImageError> {
        let Some(_lock) = self.try_exclusive()? else {
            return Ok(());
        };
        let layers = self.root.join("layers");
        for e in fs::read_dir(&layers).ctx("read", &layers)?.flatten() {
            if e.file_name().to_string_lossy().starts_with('.') {
                let _ = fs::remove_dir_all(e.path());
            }
        }
        let tmp = self.root.join("tmp");
        for e in fs::read_dir(&tmp).ctx("read", &tmp)?.flatten() {
            if e.file_name().to_string_lossy().starts_with("partial-") {
                continue;
            }
            let p = e.path();
            let _ = if p.is_dir() { fs::remove_dir_all(&p) } else { fs::remove_file(&p) };
        }
        Ok(())
    }
}

/// An image as its blobs say: the manifest, its config and its layers.
pub(crate) struct FromBlobs {
    pub manifest: String,
    pub config: String,
    pub layers: Vec<LayerRef>,
}

/// Reads an image out of `blobs` (each already checked against its digest) that reached us
/// without the store: through the hub, a site cache or a bundle. `top` is a manifest or an
/// index; the manifest is `manifest` when given (top itself or listed in it), else top's
/// entry for `platform`. `bad` makes the error for a blob and a problem.
pub(crate) fn image_from_blobs(
    blobs: &BTreeMap<String, Vec<u8>>,
    top: &str,
    manifest: Option<&str>,
    platform: &Platform,
    reference: &str,
    bad: &dyn Fn(&str, String) -> ImageError,
) -> Result<FromBlobs, ImageError> {
    let json = |d: &str| -> Result<serde_json::Value, ImageError> {
        let b = blobs.get(d).ok_or_else(|| bad(d, "blob is missing".into()))?;
        serde_json::from_slice(b).map_err(|e| bad(d, e.to_string()))
    };
    let parse = |d: &str| -> Result<Manifest, ImageError> {
        serde_json::from_value(json(d)?).map_err(|e| bad(d, e.to_string()))
    };
    let t = parse(top)?;
    let manifest = match manifest {
        Some(m) if m == top => m.to_string(),
        Some(m) if t.manifests.iter().flatten().any(|d| d.digest == m) => m.to_string(),
        Some(m) => return Err(bad(top, format!("does not list manifest {m}"))),
        None if t.is_index() => {
            choose_platform(t.manifests.as_deref().unwrap_or_default(), platform, reference)?.digest.clone()
        }
        None => top.to_string(),
    };
    let m = parse(&manifest)?;
    let config = m.config.as_ref().ok_or_else(|| bad(&manifest, "manifest has no config".into()))?.digest.clone();
    let diff_ids: Vec<String> = json(&config)?
        .pointer("/rootfs/diff_ids")
        .and_then(|v| serde_json::from_value(v.clone()).ok())
        .ok_or_else(|| bad(&config, "config has no rootfs.diff_ids".into()))?;
    let descs = m.layers.unwrap_or_default();
    if descs.len() != diff_ids.len() {
        return Err(bad(&config, format!("config lists {} diff_ids for {} layers", diff_ids.len(), descs.len())));
    }
    let mut layers = vec![];
    for (l, diff_id) in descs.iter().zip(diff_ids) {
        sha256_hex(&l.digest)?;
        sha256_hex(&diff_id)?;
        layers.push(LayerRef { digest: l.digest.clone(), diff_id, size: l.size });
    }
    Ok(FromBlobs { manifest, config, layers })
}

fn read_full<R: Read>(r: &mut R, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Renames a synced temporary into the store and flushes the directory holding it.
pub(crate) fn durable_rename(tmp: &Path, dst: &Path) -> Result<(), ImageError> {
    skiff_sys::durable::rename(tmp, dst).map_err(|e| ImageError::Io { op: "rename", path: e.path, source: e.source })
}
