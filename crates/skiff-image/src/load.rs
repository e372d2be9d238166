//! `skiff image load`: `docker save` tarballs, OCI image layouts (directories) and
//! oci-archive tarballs (an OCI layout in a tar).

use crate::error::IoContext;
use crate::store::{Descriptor, Manifest, MT_OCI_CONFIG, MT_OCI_LAYER, MT_OCI_LAYER_GZIP, MT_OCI_MANIFEST};
use crate::{digest::sha256_hex, ImageError, ImageStore};
use serde::Deserialize;
use std::fs;
use std::io::Read;
use std::path::Path;

#[derive(Deserialize)]
struct DockerSaveEntry {
    #[serde(rename = "Config")]
    config: String,
    #[serde(rename = "RepoTags", default)]
    repo_tags: Option<Vec<String>>,
    #[serde(rename = "Layers")]
    layers: Vec<String>,
}

#[derive(Deserialize)]
struct DiffIds {
    rootfs: RootFs,
}
#[derive(Deserialize)]
struct RootFs {
    diff_ids: Vec<String>,
}

fn malformed(what: impl Into<String>, problem: impl Into<String>) -> ImageError {
    ImageError::Malformed { what: what.into(), problem: problem.into() }
}

/// Joins a path from an archive's metadata onto its root, refusing to leave it.
fn inside(root: &Path, rel: &str) -> Result<std::path::PathBuf, ImageError> {
    let p = Path::new(rel);
    if p.is_absolute() || p.components().any(|c| matches!(c, std::path::Component::ParentDir)) {
        return Err(malformed(rel, "path leaves the archive"));
    }
    Ok(root.join(p))
}

impl ImageStore {
    /// Loads every image in `path` and returns the references it tagged. `tag` names the
    /// image when the archive does not (an OCI layout whose index has no name).
    pub fn load(&self, path: &Path, tag: Option<&str>) -> Result<Vec<String>, ImageError> {
        let meta = fs::metadata(path).ctx("open", path)?;
        if meta.is_file() && is_wasm_file(path)? {
            // A bare module or component: stored as a Wasm OCI artifact.
            let name = match tag {
                Some(t) => t.to_string(),
                None => crate::wasm::file_reference(path)?,
            };
            self.import_wasm(path, &name)?;
            return Ok(vec![crate::normalize_reference(&name)]);
        }
        let _lease = self.lease()?;
        if meta.is_dir() {
            return self.load_dir(path, tag);
        }
        let tmp = self.tmp_dir("load")?;
        let res = (|| {
            let f = fs::File::open(path).ctx("open", path)?;
            let mut head = [0u8; 2];
            let mut peek = fs::File::open(path).ctx("open", path)?;
            let n = peek.read(&mut head).ctx("read", path)?;
            let reader: Box<dyn Read> =
                if n == 2 && head == [0x1f, 0x8b] { Box::new(flate2::read::GzDecoder::new(f)) } else { Box::new(f) };
            // tar's Archive::unpack refuses entries that would leave `tmp`.
            tar::Archive::new(reader)
                .unpack(&tmp)
                .map_err(|e| malformed(path.display().to_string(), format!("not a readable tar archive: {e}")))?;
            self.load_dir(&tmp, tag)
        })();
        let _ = fs::remove_dir_all(&tmp);
        res.map_err(|e| match e {
            ImageError::UnknownFormat { .. } => ImageError::UnknownFormat { path: path.to_path_buf() },
            e => e,
        })
    }

    fn load_dir(&self, dir: &Path, tag: Option<&str>) -> Result<Vec<String>, ImageError> {
        if dir.join("manifest.json").is_file() {
            self.load_docker_save(dir, tag)
        } else if dir.join("oci-layout").is_file() && dir.join("index.json").is_file() {
            self.load_oci_layout(dir, tag)
        } else {
            Err(ImageError::UnknownFormat { path: dir.to_path_buf() })
        }
    }

    fn load_docker_save(&self, dir: &Path, tag: Option<&str>) -> Result<Vec<String>, ImageError> {
        let mpath = dir.join("manifest.json");
        let entries: Vec<DockerSaveEntry> = serde_json::from_slice(&fs::read(&mpath).ctx("read", &mpath)?)
            .map_err(|e| malformed("manifest.json", e.to_string()))?;
        let mut tagged = vec![];
        for entry in entries {
            let cfg_path = inside(dir, &entry.config)?;
            let config_digest = self.put_blob_file(&cfg_path, expected_from_name(&entry.config).as_deref())?;
            let cfg: DiffIds = serde_json::from_slice(&self.read_blob(&config_digest)?)
                .map_err(|e| malformed(&config_digest, e.to_string()))?;
            if cfg.rootfs.diff_ids.len() != entry.layers.len() {
                return Err(malformed(&config_digest, "number of layers does not match rootfs.diff_ids"));
            }
            let mut layers = vec![];
            for (l, diff_id) in entry.layers.iter().zip(&cfg.rootfs.diff_ids) {
                sha256_hex(diff_id)?;
                let lp = inside(dir, l)?;
                let digest = self.put_blob_file(&lp, expected_from_name(l).as_deref())?;
                let size = fs::metadata(&lp).ctx("stat", &lp)?.len();
                let gz = is_gzip(&self.blob_path(&digest)?)?;
                let layer = crate::store::LayerRef { digest: digest.clone(), diff_id: diff_id.clone(), size };
                self.ensure_layer(&layer)?;
                layers.push(Descriptor {
                    media_type: if gz { MT_OCI_LAYER_GZIP } else { MT_OCI_LAYER }.into(),
                    digest,
                    size,
                    platform: None,
                    annotations: Default::default(),
                });
            }
            let cfg_size = fs::metadata(self.blob_path(&config_digest)?).ctx("stat", &cfg_path)?.len();
            let manifest = Manifest {
                schema_version: 2,
                media_type: Some(MT_OCI_MANIFEST.into()),
                config: Some(Descriptor {
                    media_type: MT_OCI_CONFIG.into(),
                    digest: config_digest.clone(),
                    size: cfg_size,
                    platform: None,
                    annotations: Default::default(),
                }),
                layers: Some(layers),
                manifests: None,
            };
            let bytes = serde_json::to_vec(&manifest).map_err(|e| malformed("manifest", e.to_string()))?;
            let md = self.put_blob_bytes(&bytes, None)?;
            let mut names = entry.repo_tags.unwrap_or_default();
            if names.is_empty() {
                names.push(tag.map(str::to_string).unwrap_or_else(|| config_digest.clone()));
            }
            for n in names {
                self.tag(&n, &md)?;
                tagged.push(crate::normalize_reference(&n));
            }
        }
        Ok(tagged)
    }

    fn load_oci_layout(&self, dir: &Path, tag: Option<&str>) -> Result<Vec<String>, ImageError> {
        let ipath = dir.join("index.json");
        let index: Manifest = serde_json::from_slice(&fs::read(&ipath).ctx("read", &ipath)?)
            .map_err(|e| malformed("index.json", e.to_string()))?;
        let mut tagged = vec![];
        for desc in index.manifests.unwrap_or_default() {
            self.copy_tree(dir, &desc.digest)?;
            let ann = &desc.annotations;
            let name = match (ann.get("io.containerd.image.name"), ann.get("org.opencontainers.image.ref.name"), tag) {
                (_, _, Some(t)) => t.to_string(),
                (Some(n), _, _) => n.clone(),
                (None, Some(r), _) if r.contains('/') || r.contains(':') => r.clone(),
                (None, Some(_), None) | (None, None, None) => {
                    return Err(malformed(
                        dir.display().to_string(),
                        "the OCI layout does not name its image; pass --tag NAME",
                    ));
                }
            };
            self.tag(&name, &desc.digest)?;
            // Unpack now when the image has a variant for this machine (or a WebAssembly
            // one), so errors show at load.
            let resolved = match self.resolve(&name) {
                Err(ImageError::NoPlatform { .. }) => self.resolve_for(&name, crate::Target::Wasm),
                r => r,
            };
            match resolved {
                Ok(_) | Err(ImageError::NoPlatform { .. }) => {}
                Err(e) => return Err(e),
            }
            tagged.push(crate::normalize_reference(&name));
        }
        Ok(tagged)
    }

    /// Copies a manifest or index and everything it references from an OCI layout.
    fn copy_tree(&self, dir: &Path, digest: &str) -> Result<(), ImageError> {
        let src = dir.join("blobs/sha256").join(sha256_hex(digest)?);
        self.put_blob_file(&src, Some(digest))?;
        let m: Manifest =
            serde_json::from_slice(&self.read_blob(digest)?).map_err(|e| malformed(digest, e.to_string()))?;
        for d in m.manifests.iter().flatten() {
            self.copy_tree(dir, &d.digest)?;
        }
        for d in m.config.iter().chain(m.layers.iter().flatten()) {
            let src = dir.join("blobs/sha256").join(sha256_hex(&d.digest)?);
            if !self.has_blob(&d.digest) {
                self.put_blob_file(&src, Some(&d.digest))?;
            }
        }
        Ok(())
    }
}

/// Newer `docker save` names files `blobs/sha256/<hex>`: that name is a digest to verify.
fn expected_from_name(name: &str) -> Option<String> {
    let hex = name.strip_prefix("blobs/sha256/")?;
    Some(format!("sha256:{hex}"))
}

fn is_wasm_file(p: &Path) -> Result<bool, ImageError> {
    let mut f = fs::File::open(p).ctx("open", p)?;
    let mut b = [0u8; 8];
    let n = f.read(&mut b).ctx("read", p)?;
    Ok(crate::WasmKind::detect(&b[..n]).is_some())
}

fn is_gzip(p: &Path) -> Result<bool, ImageError> {
    let mut f = fs::File::open(p).ctx("open", p)?;
    let mut b = [0u8; 2];
    Ok(f.read(&mut b).ctx("read", p)? == 2 && b == [0x1f, 0x8b])
}
