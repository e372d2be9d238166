//! Chunk indexes and delta bundles between real stores on a real filesystem.

#![allow(clippy::unwrap_used)] // tests may panic on setup failures

use skiff_image::policy::{ImagePolicy, RawRule};
use skiff_image::store::Descriptor;
use skiff_image::trust::{self, PrivateKey, StoredSignature, Verdict};
use skiff_image::{ImageError, ImageStore};
use skiff_testkit::{incompressible, require_privileged, ImageBuilder, LayerBuilder};
use std::path::Path;

type R = anyhow::Result<()>;

const V1: &str = "localhost/delta/app:1";
const V2: &str = "localhost/delta/app:2";

/// Two versions of an app: busybox plus a data layer whose 6 MiB file differs by a
/// 256 KiB edit in the middle, and whose second version adds a file.
fn versions(dir: &Path) -> anyhow::Result<(std::path::PathBuf, std::path::PathBuf)> {
    let old = incompressible(6 << 20, 7);
    let mut new = old.clone();
    new[3 << 20..(3 << 20) + (256 << 10)].copy_from_slice(&incompressible(256 << 10, 8));
    let v1 = ImageBuilder::busybox()?.layer(LayerBuilder::new().file("data/blob", 0o644, &old)?.finish()?);
    let v2 = ImageBuilder::busybox()?
        .layer(LayerBuilder::new().file("data/blob", 0o644, &new)?.file("data/added", 0o644, b"appended")?.finish()?);
    let (l1, l2) = (dir.join("v1"), dir.join("v2"));
    v1.write_oci_layout(&l1, V1)?;
    v2.write_oci_layout(&l2, V2)?;
    Ok((l1, l2))
}

/// A store "a" that holds both versions, and their layouts.
fn holding_both(dir: &Path) -> anyhow::Result<(ImageStore, std::path::PathBuf, std::path::PathBuf)> {
    let (l1, l2) = versions(dir)?;
    let a = store(dir, "a");
    a.load(&l1, None)?;
    a.load(&l2, None)?;
    Ok((a, l1, l2))
}

fn store(dir: &Path, name: &str) -> ImageStore {
    ImageStore::open(dir.join(name)).unwrap()
}

/// Nothing of an image that was refused: no reference, no layer, no leftover in tmp/.
fn assert_untouched(s: &ImageStore, before: &[String]) {
    let refs: Vec<String> = s.list().unwrap().into_iter().map(|i| i.reference).collect();
    assert_eq!(refs, before);
    let tmp: Vec<_> = std::fs::read_dir(s.root().join("tmp")).unwrap().collect();
    assert!(tmp.is_empty(), "{tmp:?}");
}

#[test]
fn a_delta_bundle_carries_the_changed_chunks_and_rebuilds_the_exact_layer() -> R {
    require_privileged!();
    let tmp = tempfile::tempdir()?;
    let (a, l1, _) = holding_both(tmp.path())?;
    // v2 is signed (as a pull from a registry with cosign signatures keeps them).
    let (policy, sig) = signed(&a.top_digest(V2)?)?;
    a.put_signatures(&a.top_digest(V2)?, &[sig])?;
    let out = tmp.path().join("v2.bundle");
    let h = a.bundle_create(V2, Some(V1), None, &out)?;
    let data = &h.layers[1];
    assert!(data.tar_size > 6 << 20, "{data:?}");
    // The 256 KiB edit and the added file, plus the chunks cut around them.
    assert!(h.carried_bytes >= 256 << 10 && h.carried_bytes < (256 << 10) + 8 * 64 * 1024, "{h:?}");
    let file_size = std::fs::metadata(&out)?.len();
    assert!(file_size < h.carried_compressed + (64 << 10), "{file_size} for {h:?}");
    assert_eq!(skiff_image::bundle::inspect(&out)?, (h.clone(), file_size));

    // A node that holds v1 rebuilds v2 from it.
    let b = store(tmp.path(), "b");
    b.load(&l1, None)?;
    let loaded = b.bundle_load(&out)?;
    assert_eq!((loaded.layers_rebuilt, loaded.layers_present), (1, 1));
    assert_eq!(loaded.bytes_from_bundle + loaded.bytes_reused, data.tar_size);
    let want = a.resolve(V2)?;
    let got = b.resolve(V2)?;
    assert_eq!(got, want);
    let dir = b.layer_dir(&got.layers[1].diff_id)?;
    assert_eq!(std::fs::read(dir.join("data/added"))?, b"appended");
    assert_eq!(
        std::fs::read(dir.join("data/blob"))?,
        std::fs::read(a.layer_dir(&want.layers[1].diff_id)?.join("data/blob"))?
    );
    // The signature came along: the node's image policy verifies the bundled image.
    let verdict = b.judge(V2, &policy)?.map(|j| j.verdict);
    assert!(matches!(verdict, Some(Verdict::Verified { .. })), "{verdict:?}");

    // The rebuilt layer serves later work without the registry's blob: v1 goes, v2 is
    // bundled whole from b and loaded on a fresh node, and b can still save it.
    b.remove(V1, &Default::default())?;
    let whole = tmp.path().join("whole.bundle");
    let h2 = b.bundle_create(V2, None, None, &whole)?;
    // Everything, less the chunks that repeat inside the image (carried once).
    assert!(h2.since.is_none() && h2.carried_bytes > h2.tar_bytes() * 9 / 10, "{h2:?}");
    let c = store(tmp.path(), "c");
    assert_eq!(c.bundle_load(&whole)?.layers_rebuilt, 2);
    assert_eq!(c.resolve(V2)?, want);
    b.save(&[V2.to_string()], &tmp.path().join("saved.tar"))?;
    let d = store(tmp.path(), "d");
    d.load(&tmp.path().join("saved.tar"), None)?;
    let saved = d.resolve(V2)?;
    let ids = |i: &skiff_image::ImageInfo| i.layers.iter().map(|l| l.diff_id.clone()).collect::<Vec<_>>();
    assert_eq!(ids(&saved), ids(&want));
    // Control: the same image without its signature is refused by the same policy.
    let verdict = d.judge(V2, &policy)?.map(|j| j.verdict);
    assert!(matches!(verdict, Some(Verdict::Rejected(_))), "{verdict:?}");
    Ok(())
}

/// A policy that wants localhost/delta/* signed by a new key, and that key's cosign
/// signature of `digest`.
fn signed(digest: &str) -> anyhow::Result<(ImagePolicy, StoredSignature)> {
    use base64::Engine as _;
    let key = PrivateKey::from_pem(&PrivateKey::generate_pem(false)?)?;
    let payload = trust::payload("localhost/delta/app", digest);
    let layer = Descriptor {
        media_type: trust::SIMPLE_SIGNING.into(),
        digest: format!("sha256:{}", skiff_image::digest::sha256_of(&payload)),
        size: payload.len() as u64,
        platform: None,
        annotations: [(
            trust::SIGNATURE_ANNOTATION.to_string(),
            base64::engine::general_purpose::STANDARD.encode(key.sign(&payload)?),
        )]
        .into(),
    };
    let rule = RawRule {
        pattern: Some("localhost/delta/*".into()),
        mode: Some("enforce".into()),
        keys: vec!["k.pub".into()],
        identity: None,
        notation: None,
    };
    let policy = ImagePolicy::from_rules(&[rule], None, |_| Ok(key.public_pem.clone())).map_err(anyhow::Error::msg)?;
    Ok((policy, StoredSignature::new(layer, &payload)))
}

/// A stored layer's uncompressed tar, read from its blob.
fn tar_of(s: &ImageStore, l: &skiff_image::store::LayerRef) -> Vec<u8> {
    let blob = std::fs::read(s.blob_path(&l.digest).unwrap()).unwrap();
    let mut out = vec![];
    std::io::Read::read_to_end(&mut flate2::read::MultiGzDecoder::new(&blob[..]), &mut out).unwrap();
    out
}

#[test]
fn a_delta_bundle_is_refused_where_the_old_image_is_missing_and_a_damaged_one_anywhere() -> R {
    require_privileged!();
    let tmp = tempfile::tempdir()?;
    let (a, l1, _) = holding_both(tmp.path())?;
    let out = tmp.path().join("v2.bundle");
    a.bundle_create(V2, Some(V1), None, &out)?;

    let empty = store(tmp.path(), "empty");
    let err = empty.bundle_load(&out).unwrap_err();
    assert!(matches!(err, ImageError::BundleIncomplete { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains(&format!("--since {V1}")) && msg.contains("nothing was loaded"), "{msg}");
    assert_untouched(&empty, &[]);
    assert_eq!(std::fs::read_dir(empty.root().join("layers"))?.count(), 0);

    // One byte of the carried chunks flipped: refused by the gzip check or a chunk's digest.
    let b = store(tmp.path(), "b");
    b.load(&l1, None)?;
    let bytes = std::fs::read(&out)?;
    let mut archive = tar::Archive::new(&bytes[..]);
    let (pos, len) = archive
        .entries()?
        .map(|e| e.unwrap())
        .find(|e| e.path().unwrap().to_string_lossy() == "chunks.gz")
        .map(|e| (e.raw_file_position() as usize, e.size() as usize))
        .unwrap();
    let mut bad = bytes.clone();
    bad[pos + len / 2] ^= 0x40;
    let damaged = tmp.path().join("damaged.bundle");
    std::fs::write(&damaged, &bad)?;
    let err = b.bundle_load(&damaged).unwrap_err().to_string();
    assert!(err.contains("damaged.bundle") && (err.contains("chunks.gz") || err.contains("does not match")), "{err}");
    assert_untouched(&b, &[V1.to_string()]);

    // Not a bundle at all, and a header of a newer format.
    let err = b.bundle_load(&l1.join("index.json")).unwrap_err().to_string();
    assert!(err.contains("not a skiff bundle"), "{err}");
    let text = String::from_utf8_lossy(&bytes).into_owned();
    let newer = text.replacen("\"format\": 1", "\"format\": 9", 1);
    assert_ne!(newer, text);
    std::fs::write(&damaged, newer.as_bytes())?;
    let err = b.bundle_load(&damaged).unwrap_err().to_string();
    assert!(err.contains("bundle format 9; this skiff reads format 1"), "{err}");
    assert_untouched(&b, &[V1.to_string()]);
    Ok(())
}

#[test]
fn layers_are_indexed_as_they_are_unpacked_and_the_index_goes_with_the_layer() -> R {
    require_privileged!();
    let tmp = tempfile::tempdir()?;
    let (l1, _) = versions(tmp.path())?;
    let s = store(tmp.path(), "s");
    s.load(&l1, None)?;
    let info = s.resolve(V1)?;
    let chunks = s.root().join("chunks");
    for l in &info.layers {
        assert!(chunks.join(l.diff_id.trim_start_matches("sha256:")).exists());
        let index = s.chunk_index(l)?;
        assert_eq!(index.source, l.digest);
        // The same chunks as cutting the layer's tar now.
        let tar = tar_of(&s, l);
        assert_eq!(index.chunks, skiff_image::chunks::chunk_stream(&tar[..])?);
    }
    // An index made before (or lost) is made again on demand.
    let data = &info.layers[1];
    std::fs::remove_file(chunks.join(data.diff_id.trim_start_matches("sha256:")))?;
    assert_eq!(s.chunk_index(data)?.total(), tar_of(&s, data).len() as u64);
    s.remove(V1, &Default::default())?;
    assert_eq!(std::fs::read_dir(&chunks)?.count(), 0);
    Ok(())
}
