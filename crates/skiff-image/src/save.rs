//! `skiff image save`: the classic `docker save` tarball (`manifest.json`, `<id>.json`,
//! `<diff-id>/layer.tar`, `repositories`), which `docker load` and
//! `skopeo copy docker-archive:` read. Layers are written uncompressed, as Docker does,
//! so each `layer.tar` hashes to its diff_id.

use crate::digest::sha256_hex;
use crate::error::IoContext;
use crate::{ImageError, ImageStore};
use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{BufReader, Read};
use std::path::Path;

fn add_bytes<W: std::io::Write>(b: &mut tar::Builder<W>, path: &str, data: &[u8]) -> std::io::Result<()> {
    add_entry(b, path, data.len() as u64, data)
}

/// A regular file of `size` bytes read from `data` (mode 0644, time 0: archives of the
/// same content are the same bytes).
pub(crate) fn add_entry<W: std::io::Write>(
    b: &mut tar::Builder<W>,
    path: &str,
    size: u64,
    data: impl Read,
) -> std::io::Result<()> {
    let mut h = tar::Header::new_ustar();
    h.set_size(size);
    h.set_mode(0o644);
    h.set_mtime(0);
    h.set_entry_type(tar::EntryType::Regular);
    b.append_data(&mut h, path, data)
}

/// Ends a tar written to `path` through a buffer, and syncs it.
pub(crate) fn finish_tar(b: tar::Builder<std::io::BufWriter<fs::File>>, path: &Path) -> Result<(), ImageError> {
    let w = b.into_inner().ctx("write", path)?;
    w.into_inner()
        .map_err(|e| ImageError::Io { op: "write", path: path.to_path_buf(), source: e.into_error() })?
        .sync_all()
        .ctx("sync", path)
}

impl ImageStore {
    /// Writes `references` (this machine's variant of each) to `out`, atomically. A
    /// `docker save` tarball cannot carry a Wasm artifact (its layer is no tar), so when
    /// one of them is, all are written as an oci-archive instead.
    pub fn save(&self, references: &[String], out: &Path) -> Result<(), ImageError> {
        let infos = references.iter().map(|r| self.inspect(r)).collect::<Result<Vec<_>, _>>()?;
        let tmp = out.with_extension("partial");
        let res = (|| {
            if infos.iter().any(|i| i.wasm.is_some()) {
                return self
                    .write_oci_archive(&infos, references, &tmp)
                    .and_then(|()| fs::rename(&tmp, out).ctx("rename", out));
            }
            let file = fs::File::create(&tmp).ctx("create", &tmp)?;
            let mut b = tar::Builder::new(std::io::BufWriter::new(file));
            let mut written = BTreeSet::new();
            let mut manifest = vec![];
            let mut repositories: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
            for (info, reference) in infos.iter().zip(references) {
                let config_name = format!("{}.json", sha256_hex(&info.config_digest)?);
                if written.insert(config_name.clone()) {
                    add_bytes(&mut b, &config_name, &self.read_blob(&info.config_digest)?).ctx("write", &tmp)?;
                }
                let mut layers = vec![];
                for l in &info.layers {
                    let name = format!("{}/layer.tar", sha256_hex(&l.diff_id)?);
                    if written.insert(name.clone()) {
                        // A layer rebuilt from chunks is kept as its tar, named by its diff_id.
                        let blob = if self.has_blob(&l.digest) { &l.digest } else { &l.diff_id };
                        self.append_layer(&mut b, &name, blob).ctx("write", &tmp)?;
                    }
                    layers.push(name);
                }
                let tag = crate::normalize_reference(reference);
                let tags = if tag.contains('@') { vec![] } else { vec![tag.clone()] };
                if let (Some((repo, t)), Some(top)) = (tag.rsplit_once(':'), info.layers.last()) {
                    if !tag.contains('@') {
                        repositories
                            .entry(repo.to_string())
                            .or_default()
                            .insert(t.to_string(), sha256_hex(&top.diff_id)?.to_string());
                    }
                }
                manifest.push(serde_json::json!({"Config": config_name, "RepoTags": tags, "Layers": layers}));
            }
            let m = serde_json::to_vec(&manifest)
                .map_err(|e| ImageError::Malformed { what: "manifest.json".into(), problem: e.to_string() })?;
            add_bytes(&mut b, "manifest.json", &m).ctx("write", &tmp)?;
            let r = serde_json::to_vec(&repositories)
                .map_err(|e| ImageError::Malformed { what: "repositories".into(), problem: e.to_string() })?;
            add_bytes(&mut b, "repositories", &r).ctx("write", &tmp)?;
            finish_tar(b, &tmp)?;
            fs::rename(&tmp, out).ctx("rename", out)
        })();
        if res.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        res
    }

    /// An OCI image layout in a tar (`oci-layout`, `index.json`, `blobs/sha256/*`): every
    /// blob of each image's chosen manifest, as stored, with the reference as its name.
    fn write_oci_archive(
        &self,
        infos: &[crate::ImageInfo],
        references: &[String],
        tmp: &Path,
    ) -> Result<(), ImageError> {
        let file = fs::File::create(tmp).ctx("create", tmp)?;
        let mut b = tar::Builder::new(std::io::BufWriter::new(file));
        let mut written = BTreeSet::new();
        let mut index = vec![];
        for (info, reference) in infos.iter().zip(references) {
            let manifest = self.read_blob(&info.manifest_digest)?;
            let digests = std::iter::once(info.manifest_digest.clone())
                .chain(std::iter::once(info.config_digest.clone()))
                .chain(info.layers.iter().map(|l| l.digest.clone()))
                .chain(info.wasm.iter().map(|w| w.digest.clone()));
            for d in digests {
                let name = format!("blobs/sha256/{}", sha256_hex(&d)?);
                if written.insert(name.clone()) {
                    b.append_path_with_name(self.blob_path(&d)?, &name).ctx("write", tmp)?;
                }
            }
            let name = crate::normalize_reference(reference);
            index.push(serde_json::json!({
                "mediaType": crate::store::MT_OCI_MANIFEST,
                "digest": info.manifest_digest,
                "size": manifest.len(),
                "annotations": {"io.containerd.image.name": name, "org.opencontainers.image.ref.name": name},
            }));
        }
        let index = serde_json::to_vec(&serde_json::json!({"schemaVersion": 2, "manifests": index}))
            .map_err(|e| ImageError::Malformed { what: "index.json".into(), problem: e.to_string() })?;
        add_bytes(&mut b, "index.json", &index).ctx("write", tmp)?;
        add_bytes(&mut b, "oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#).ctx("write", tmp)?;
        finish_tar(b, tmp)
    }

    /// Appends a layer blob as an uncompressed tar entry (decompressed into `tmp/` first,
    /// since a tar header needs the size).
    fn append_layer<W: std::io::Write>(
        &self,
        b: &mut tar::Builder<W>,
        name: &str,
        digest: &str,
    ) -> std::io::Result<()> {
        let blob = self.blob_path(digest).map_err(std::io::Error::other)?;
        let mut f = BufReader::new(fs::File::open(&blob)?);
        let mut magic = [0u8; 2];
        let n = f.read(&mut magic)?;
        let head = std::io::Cursor::new(magic[..n].to_vec()).chain(f);
        if n == 2 && magic == [0x1f, 0x8b] {
            let plain = self.tmp_dir("save").map_err(std::io::Error::other)?;
            let p = plain.join("layer.tar");
            std::io::copy(&mut flate2::read::MultiGzDecoder::new(head), &mut fs::File::create(&p)?)?;
            let r = b.append_path_with_name(&p, name);
            let _ = fs::remove_dir_all(&plain);
            r
        } else {
            b.append_path_with_name(&blob, name)
        }
    }
}
