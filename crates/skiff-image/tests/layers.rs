//! Layer unpacking and image loading against a real filesystem. Device nodes, ownership
//! and trusted.* xattrs need root; without it these tests skip with a reason.

#![allow(clippy::unwrap_used)] // tests may panic on setup failures

use skiff_image::{unpack_layer, ImageError, ImageStore, UnpackError};
use skiff_testkit::{require_privileged, ImageBuilder, LayerBuilder};
use std::os::unix::fs::FileTypeExt;

type R = anyhow::Result<()>;

fn unpack(tar: &[u8]) -> (tempfile::TempDir, Result<(), UnpackError>) {
    let outer = tempfile::tempdir().unwrap();
    let root = outer.path().join("layer");
    std::fs::create_dir(&root).unwrap();
    let r = unpack_layer(tar, &root).map(|_| ());
    (outer, r)
}

/// Nothing but `layer/` may exist next to the layer dir after a rejected unpack.
fn assert_nothing_outside(outer: &tempfile::TempDir) {
    let names: Vec<_> = std::fs::read_dir(outer.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names, vec![std::ffi::OsString::from("layer")]);
}

#[test]
fn traversal_is_rejected() -> R {
    require_privileged!();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("dotdot", LayerBuilder::new().file("a/../../escaped", 0o644, b"x")?.finish()?),
        ("absolute", LayerBuilder::new().file("/escaped-abs", 0o644, b"x")?.finish()?),
        ("symlink-parent", LayerBuilder::new().symlink("link", "..")?.file("link/escaped", 0o644, b"x")?.finish()?),
        (
            "symlink-abs-parent",
            LayerBuilder::new().symlink("etc", "/tmp")?.file("etc/escaped-via-abs", 0o644, b"x")?.finish()?,
        ),
        ("hardlink-out", LayerBuilder::new().hardlink("passwd", "../../../etc/passwd")?.finish()?),
        ("hardlink-abs", LayerBuilder::new().hardlink("passwd", "/etc/passwd")?.finish()?),
    ];
    for (name, tar) in cases {
        let (outer, r) = unpack(&tar);
        let err = r.expect_err(name);
        assert!(
            matches!(
                err,
                UnpackError::ParentTraversal { .. }
                    | UnpackError::AbsolutePath { .. }
                    | UnpackError::ThroughSymlink { .. }
            ),
            "{name}: {err}"
        );
        assert_nothing_outside(&outer);
        assert!(!std::path::Path::new("/tmp/escaped-via-abs").exists());
    }
    Ok(())
}

#[test]
fn whiteouts_opaque_links_and_devices() -> R {
    require_privileged!();
    let tar = LayerBuilder::new()
        .dir("d", 0o755)?
        .file("d/keep", 0o600, b"k")?
        .hardlink("d/keep-link", "d/keep")?
        .symlink("abs-link", "/etc/hostname")?
        .whiteout("gone")?
        .opaque("d")?
        .char_device("null", 1, 3)?
        .finish()?;
    let (outer, r) = unpack(&tar);
    r?;
    let root = outer.path().join("layer");
    let wh = std::fs::symlink_metadata(root.join("gone"))?;
    assert!(wh.file_type().is_char_device(), "whiteout becomes a 0/0 char device");
    assert_eq!(xattr::get(root.join("d"), "trusted.overlay.opaque")?.as_deref(), Some(&b"y"[..]));
    use std::os::unix::fs::MetadataExt;
    assert_eq!(std::fs::metadata(root.join("d/keep"))?.ino(), std::fs::metadata(root.join("d/keep-link"))?.ino());
    assert_eq!(std::fs::metadata(root.join("d/keep"))?.mode() & 0o777, 0o600);
    assert_eq!(std::fs::read_link(root.join("abs-link"))?, std::path::PathBuf::from("/etc/hostname"));
    let null = std::fs::symlink_metadata(root.join("null"))?;
    assert!(null.file_type().is_char_device());
    assert_eq!(null.rdev(), nix::sys::stat::makedev(1, 3));
    Ok(())
}

#[test]
fn load_oci_layout_and_docker_save() -> R {
    require_privileged!();
    let tmp = tempfile::tempdir()?;
    let store = ImageStore::open(tmp.path().join("store"))?;
    let img = ImageBuilder::busybox()?.layer(LayerBuilder::new().file("etc/motd", 0o644, b"two")?.finish()?);
    let layout = tmp.path().join("layout");
    img.write_oci_layout(&layout, "localhost/test/oci:1")?;
    assert_eq!(store.load(&layout, None)?, vec!["localhost/test/oci:1".to_string()]);
    let info = store.resolve("localhost/test/oci:1")?;
    assert_eq!(info.layers.len(), 2);
    assert_eq!(std::fs::read(store.layer_dir(&info.layers[1].diff_id)?.join("etc/motd"))?, b"two");

    let save = tmp.path().join("save.tar");
    img.write_docker_save(&save, "localhost/test/saved:2")?;
    assert_eq!(store.load(&save, None)?, vec!["localhost/test/saved:2".to_string()]);
    let saved = store.resolve("localhost/test/saved:2")?;
    // Same content: both forms share the unpacked layers.
    assert_eq!(
        saved.layers.iter().map(|l| &l.diff_id).collect::<Vec<_>>(),
        info.layers.iter().map(|l| &l.diff_id).collect::<Vec<_>>()
    );
    assert_eq!(store.list()?.len(), 2);

    store.remove("localhost/test/oci:1", &Default::default())?;
    assert!(matches!(store.resolve("localhost/test/oci:1"), Err(ImageError::NotFound(_))));
    assert!(store.resolve("localhost/test/saved:2").is_ok(), "shared layers survive removal of the other image");
    Ok(())
}

#[test]
fn corrupt_blob_and_bad_diff_id_are_rejected() -> R {
    require_privileged!();
    let tmp = tempfile::tempdir()?;
    let store = ImageStore::open(tmp.path().join("store"))?;
    let layout = tmp.path().join("layout");
    let md = ImageBuilder::busybox()?.write_oci_layout(&layout, "localhost/corrupt:1")?;
    // Flip one byte of the layer blob.
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("blobs/sha256").join(md.trim_start_matches("sha256:")))?)?;
    let layer = m["layers"][0]["digest"].as_str().unwrap().trim_start_matches("sha256:").to_string();
    let lp = layout.join("blobs/sha256").join(&layer);
    let mut bytes = std::fs::read(&lp)?;
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&lp, bytes)?;
    let err = store.load(&layout, None).unwrap_err();
    assert!(matches!(&err, ImageError::DigestMismatch { digest, .. } if digest.contains(&layer)), "{err}");
    assert!(store.list()?.is_empty(), "nothing tagged");
    assert_eq!(std::fs::read_dir(store.root().join("layers"))?.count(), 0, "nothing unpacked");

    // A config whose diff_id does not match the layer content.
    let tmp2 = tempfile::tempdir()?;
    let mut img = ImageBuilder::busybox()?;
    img.gzip = false;
    let save = tmp2.path().join("bad.tar");
    img.write_docker_save(&save, "localhost/baddiff:1")?;
    // Rewrite: swap the layer for different bytes, keeping the config's diff_id.
    let unpacked = tmp2.path().join("x");
    tar::Archive::new(std::fs::File::open(&save)?).unpack(&unpacked)?;
    std::fs::write(unpacked.join("layer0/layer.tar"), LayerBuilder::new().file("evil", 0o644, b"e")?.finish()?)?;
    let err = store.load(&unpacked, None).unwrap_err();
    assert!(matches!(err, ImageError::DiffIdMismatch { .. }), "{err}");
    assert!(store.list()?.is_empty());
    Ok(())
}

/// A few dozen KB of gzip that inflates to 48 MB on a store with 24 MB of room: the
/// unpack stops before the disk is full, says why, and leaves nothing behind.
#[test]
fn a_decompression_bomb_is_refused_before_it_fills_the_disk() -> R {
    require_privileged!();
    let disk = skiff_testkit::Tmpfs::mount(24 << 20)?;
    let store = ImageStore::open(disk.path().join("store"))?;
    let tmp = tempfile::tempdir()?;
    let zeros = vec![0u8; 48 << 20];
    let img = ImageBuilder::busybox()?.layer(LayerBuilder::new().file("bomb", 0o644, &zeros)?.finish()?);
    drop(zeros);
    let layout = tmp.path().join("bomb");
    img.write_oci_layout(&layout, "localhost/bomb:1")?;
    let blob_sizes: Vec<u64> =
        std::fs::read_dir(layout.join("blobs/sha256"))?.map(|e| e.unwrap().metadata().unwrap().len()).collect();
    assert!(blob_sizes.iter().all(|s| *s < 2 << 20), "the bomb is small: {blob_sizes:?}");
    let err = store.load(&layout, None).and_then(|_| store.resolve("localhost/bomb:1")).unwrap_err();
    assert!(matches!(&err, ImageError::TooLarge { why, .. } if why.contains("space left")), "{err}");
    assert!(err.to_string().contains("decompression bomb"), "{err}");
    let layers: Vec<_> = std::fs::read_dir(store.root().join("layers"))?.flatten().map(|e| e.file_name()).collect();
    assert!(layers.iter().all(|n| !n.to_string_lossy().starts_with('.')), "no partial unpack left: {layers:?}");
    let st = nix::sys::statvfs::statvfs(disk.path())?;
    let free = st.blocks_available() as u64 * st.fragment_size() as u64;
    assert!(free > 4 << 20, "the disk was not filled: {free} B free");
    Ok(())
}
