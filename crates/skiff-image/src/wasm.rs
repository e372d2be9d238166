//! WebAssembly images, in the three shapes the ecosystem ships them:
//!
//! * **Wasm OCI artifacts** (CNCF TAG Runtime layout, `wkg`, `oci-wasm`): config
//!   `application/vnd.wasm.config.v0+json` (`architecture: wasm`, `os: wasip1|wasip2`) and
//!   one `application/wasm` layer that *is* the module or component.
//! * **Older artifact layer types**: `application/vnd.wasm.content.layer.v1+wasm`
//!   (wasm-to-oci, Spin) and `application/vnd.bytecodealliance.wasm.component.layer.v0+wasm`
//!   (runwasi). Also raw layers, never unpacked.
//! * **`wasi/wasm` platform images** (Docker+Wasm): ordinary images whose config says
//!   `os: wasi, architecture: wasm`; the module is a file in the (tar) layers, named by
//!   the entrypoint (`/hello.wasm`).
//!
//! A raw layer is stored as a verified blob like any other; the runtime reads the module
//! straight from `blobs/`. Module identity (what the runtime's compile cache is keyed by)
//! is the layer digest for artifacts, and the diff_id of the layer holding the file plus
//! its path for platform images: both are verified content addresses, so nothing is
//! hashed again at start.

use crate::digest::sha256_hex;
use crate::error::IoContext;
use crate::store::{Descriptor, ImageInfo, Manifest, Platform, MT_OCI_MANIFEST};
use crate::{ImageError, ImageStore};
use sha2::{Digest, Sha256};
pub use skiff_model::WasmKind;
use std::path::{Component, Path, PathBuf};

/// Layer media types whose blob is a WebAssembly binary (not a tar).
pub const WASM_LAYER_TYPES: [&str; 3] = [
    "application/wasm",
    "application/vnd.wasm.content.layer.v1+wasm",
    "application/vnd.bytecodealliance.wasm.component.layer.v0+wasm",
];

/// Config media types of Wasm artifacts (CNCF v0; wasm-to-oci's v1).
pub const WASM_CONFIG_TYPES: [&str; 2] = ["application/vnd.wasm.config.v0+json", "application/vnd.wasm.config.v1+json"];

/// The config media type skiff writes (the CNCF layout's).
pub const MT_WASM_CONFIG: &str = WASM_CONFIG_TYPES[0];
/// The layer media type skiff writes (the CNCF layout's).
pub const MT_WASM_LAYER: &str = WASM_LAYER_TYPES[0];

pub fn is_wasm_layer(media_type: &str) -> bool {
    WASM_LAYER_TYPES.contains(&media_type)
}

/// Whether a manifest is a Wasm artifact (a raw module layer) rather than a filesystem image.
pub fn is_artifact(m: &Manifest) -> bool {
    m.config.as_ref().is_some_and(|c| WASM_CONFIG_TYPES.contains(&c.media_type.as_str()))
        || m.layers.iter().flatten().any(|l| is_wasm_layer(&l.media_type))
}

/// Which entry of a multi-platform image a caller runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Target {
    /// This machine's Linux platform (containers).
    Host,
    /// Any WebAssembly platform: `wasi/wasm` (Docker), `wasip1/wasm` or `wasip2/wasm` (CNCF).
    Wasm,
}

impl Target {
    pub fn platform(self) -> Platform {
        match self {
            Target::Host => crate::store::host_platform(),
            Target::Wasm => wasm_platform(),
        }
    }
}

impl From<skiff_model::RuntimeKind> for Target {
    fn from(kind: skiff_model::RuntimeKind) -> Self {
        match kind {
            skiff_model::RuntimeKind::Oci | skiff_model::RuntimeKind::Runsc => Target::Host,
            skiff_model::RuntimeKind::Wasm => Target::Wasm,
        }
    }
}

/// The platform wasm images are asked for by; it matches every `wasi*` OS.
pub fn wasm_platform() -> Platform {
    Platform { architecture: "wasm".into(), os: "wasi".into(), variant: None }
}

impl Platform {
    pub fn is_wasm(&self) -> bool {
        self.architecture == "wasm"
    }
}

/// The module (or component) of a wasm image, as the runtime loads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WasmModule {
    /// The binary on disk: a blob, or a file in an unpacked layer.
    pub path: PathBuf,
    /// A stable content identity (hex): keys the compile cache.
    pub id: String,
}

fn malformed(what: impl Into<String>, problem: impl Into<String>) -> ImageError {
    ImageError::Malformed { what: what.into(), problem: problem.into() }
}

impl ImageStore {
    /// Finds the WebAssembly binary of `info`: the artifact's wasm layer, or for a
    /// `wasi/wasm` image the file `entry` (its entrypoint, `/app.wasm`) in the topmost
    /// layer that has it. `resolve_for(.., Target::Wasm)` must have unpacked the layers.
    pub fn wasm_module(&self, info: &ImageInfo, entry: Option<&str>) -> Result<WasmModule, ImageError> {
        if let Some(layer) = &info.wasm {
            let path = self.blob_path(&layer.digest)?;
            return Ok(WasmModule { path, id: sha256_hex(&layer.digest)?.to_string() });
        }
        let Some(entry) = entry else {
            return Err(malformed(
                &info.reference,
                "a wasi/wasm image names its module in its entrypoint (e.g. /app.wasm); it has none",
            ));
        };
        let rel = Path::new(entry.trim_start_matches('/'));
        if rel.as_os_str().is_empty() || rel.components().any(|c| !matches!(c, Component::Normal(_))) {
            return Err(malformed(&info.reference, format!("entrypoint {entry:?} is not a path in the image")));
        }
        for l in info.layers.iter().rev() {
            let dir = self.layer_dir(&l.diff_id)?;
            let p = dir.join(rel);
            // Checked without following links, on the way as well: a layer's symlink is no
            // module, and a directory that is a link (`app -> /etc`) must not lead the
            // host to its own files.
            if through_link(&dir, rel) {
                break;
            }
            match std::fs::symlink_metadata(&p) {
                Ok(m) if m.is_file() => {
                    let id = Sha256::digest(format!("{}\0{}", l.diff_id, rel.display()));
                    return Ok(WasmModule { path: p, id: hex::encode(id) });
                }
                // A whiteout or a directory hides anything below it.
                Ok(_) => break,
                Err(_) => continue,
            }
        }
        Err(malformed(&info.reference, format!("the image has no file {entry} (its entrypoint) to run")))
    }

    /// Stores a `.wasm` file as a Wasm OCI artifact (CNCF layout) tagged `reference`;
    /// returns the manifest digest. The same file always makes the same artifact.
    pub fn import_wasm(&self, file: &Path, reference: &str) -> Result<String, ImageError> {
        let _lease = self.lease()?;
        let mut head = [0u8; 8];
        let n = std::io::Read::read(&mut std::fs::File::open(file).ctx("open", file)?, &mut head).ctx("read", file)?;
        let kind = WasmKind::detect(&head[..n]).ok_or_else(|| {
            malformed(file.display().to_string(), "not a WebAssembly binary (no \\0asm module or component header)")
        })?;
        let layer = self.put_blob_file(file, None)?;
        let size = std::fs::metadata(file).ctx("stat", file)?.len();
        let config = serde_json::json!({
            // Fixed, so that importing the same file twice gives the same image.
            "created": "1970-01-01T00:00:00Z",
            "architecture": "wasm",
            "os": kind.artifact_os(),
            "layerDigests": [layer],
        });
        let config = serde_json::to_vec(&config).map_err(|e| malformed("config", e.to_string()))?;
        let config_digest = self.put_blob_bytes(&config, None)?;
        let desc = |media_type: &str, digest: String, size: u64| Descriptor {
            media_type: media_type.into(),
            digest,
            size,
            platform: None,
            annotations: Default::default(),
        };
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": MT_OCI_MANIFEST,
            "artifactType": MT_WASM_LAYER,
            "config": desc(MT_WASM_CONFIG, config_digest, config.len() as u64),
            "layers": [desc(MT_WASM_LAYER, layer, size)],
        });
        let bytes = serde_json::to_vec(&manifest).map_err(|e| malformed("manifest", e.to_string()))?;
        let digest = self.put_blob_bytes(&bytes, None)?;
        self.tag(reference, &digest)?;
        Ok(digest)
    }
}

/// The sha256 of a file, in hex: a `.wasm` file's content identity (its compile cache key).
pub fn file_digest(file: &Path) -> Result<String, ImageError> {
    let mut f = std::fs::File::open(file).ctx("open", file)?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).ctx("read", file)?;
    Ok(hex::encode(h.finalize()))
}

/// The reference `skiff run ./app.wasm` gives a file whose sha256 is `digest` (hex):
/// `localhost/wasm/<stem>:<12 hex of it>`, so that a changed file is a new template (and
/// rolls out as one).
pub fn reference_for(file: &Path, digest: &str) -> String {
    let stem = file.file_stem().map(|s| s.to_string_lossy().to_ascii_lowercase()).unwrap_or_default();
    let clean: String = stem.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '-' }).collect();
    let clean = clean.trim_matches('-');
    let name = if clean.is_empty() { "module" } else { clean };
    format!("localhost/wasm/{name}:{}", &digest[..12.min(digest.len())])
}

/// [`reference_for`] the file's own digest.
pub fn file_reference(file: &Path) -> Result<String, ImageError> {
    Ok(reference_for(file, &file_digest(file)?))
}

/// Whether a directory on the way from `dir` to `rel` is a symlink (or not a directory).
fn through_link(dir: &Path, rel: &Path) -> bool {
    let mut at = dir.to_path_buf();
    let parents: Vec<_> = rel.components().collect();
    for c in &parents[..parents.len().saturating_sub(1)] {
        at.push(c);
        match std::fs::symlink_metadata(&at) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => return true,
            Err(_) => return false,
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn artifacts_are_told_by_config_or_layer_type() {
        let d = |mt: &str| Descriptor {
            media_type: mt.into(),
            digest: "sha256:00".into(),
            size: 1,
            platform: None,
            annotations: Default::default(),
        };
        let m = |config: &str, layer: &str| Manifest {
            schema_version: 2,
            media_type: None,
            config: Some(d(config)),
            layers: Some(vec![d(layer)]),
            manifests: None,
        };
        assert!(is_artifact(&m(MT_WASM_CONFIG, "application/wasm")));
        assert!(is_artifact(&m(
            "application/vnd.oci.image.config.v1+json",
            "application/vnd.wasm.content.layer.v1+wasm"
        )));
        assert!(!is_artifact(&m("application/vnd.oci.image.config.v1+json", crate::store::MT_OCI_LAYER_GZIP)));
    }

    #[test]
    fn file_references_carry_the_content_hash() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("Hello World.wasm");
        std::fs::write(&f, b"\0asm\x01\0\0\0").unwrap();
        let r = file_reference(&f).unwrap();
        assert!(r.starts_with("localhost/wasm/hello-world:"), "{r}");
        assert_eq!(r.len(), "localhost/wasm/hello-world:".len() + 12);
    }
}
