//! Pulls from a real registry (Debian's `docker-registry`, the CNCF distribution server)
//! on 127.0.0.1, with images pushed by `skopeo`, through a TCP proxy that injects faults.

#![allow(clippy::unwrap_used)] // tests may panic on setup failures

use skiff_image::registry::{parse_platform, pull, PullOptions};
use skiff_image::{ImageError, ImageStore};
use skiff_testkit::registry::{FaultProxy, Registry};
use skiff_testkit::{incompressible, ImageBuilder, LayerBuilder};
use std::sync::atomic::Ordering;
use std::sync::Arc;

type R = anyhow::Result<()>;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

fn opts() -> PullOptions {
    PullOptions { docker_config: None, ..Default::default() }
}

fn arch_image(arch: &str, variant: Option<&str>) -> anyhow::Result<ImageBuilder> {
    let mut img = ImageBuilder::busybox()?.layer(LayerBuilder::new().file("arch", 0o644, arch.as_bytes())?.finish()?);
    img.architecture = arch.into();
    img.variant = variant.map(Into::into);
    Ok(img)
}

#[test]
fn multi_arch_index_picks_this_machines_variant() -> R {
    skiff_testkit::require_registry_tools!();
    let reg = Registry::start()?;
    let tmp = tempfile::tempdir()?;
    let layout = tmp.path().join("multi");
    let images = [arch_image("amd64", None)?, arch_image("arm64", None)?, arch_image("arm", Some("v7"))?];
    ImageBuilder::write_multi_arch_layout(&layout, "multi", &images)?;
    reg.push(&layout, "team/multi:1")?;
    let reference = format!("127.0.0.1:{}/team/multi:1", reg.port);

    let store = Arc::new(ImageStore::open(tmp.path().join("store"))?);
    rt().block_on(pull(Arc::clone(&store), &reference, &opts()))?;
    let info = store.resolve(&reference)?;
    let (host, _) = skiff_model::platform::host_arch();
    let top = info.layers.last().unwrap();
    assert_eq!(std::fs::read_to_string(store.layer_dir(&top.diff_id)?.join("arch"))?, host, "this machine's variant");

    // Another variant on request; a missing one lists what the image has.
    let other = Arc::new(ImageStore::open(tmp.path().join("store2"))?);
    let mut o = opts();
    o.platform = Some(parse_platform("linux/arm/v7")?);
    let rep = rt().block_on(pull(Arc::clone(&other), &reference, &o))?;
    assert!(rep.blobs_fetched >= 3);
    let mut o = opts();
    o.platform = Some(parse_platform("linux/riscv64")?);
    let err = rt().block_on(pull(Arc::new(ImageStore::open(tmp.path().join("store3"))?), &reference, &o)).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("image {reference} has no manifest for linux/riscv64; it has: linux/amd64, linux/arm64, linux/arm/v7")
    );
    Ok(())
}

#[test]
fn pull_survives_connections_cut_every_256_kib() -> R {
    skiff_testkit::require_registry_tools!();
    let reg = Registry::start()?;
    let tmp = tempfile::tempdir()?;
    let layout = tmp.path().join("big");
    let mut img =
        ImageBuilder::busybox()?.layer(LayerBuilder::new().file("blob", 0o644, &incompressible(3 << 20, 7))?.finish()?);
    img.gzip = true;
    img.write_oci_layout(&layout, "big")?;
    reg.push(&layout, "team/big:1")?;
    let image_size: u64 =
        std::fs::read_dir(layout.join("blobs/sha256"))?.map(|e| e.unwrap().metadata().unwrap().len()).sum();

    let proxy = FaultProxy::start(reg.port, Some(256 << 10), None)?;
    let reference = format!("127.0.0.1:{}/team/big:1", proxy.port);
    let store = Arc::new(ImageStore::open(tmp.path().join("store"))?);
    let rep = rt().block_on(pull(Arc::clone(&store), &reference, &opts()))?;
    let info = store.resolve(&reference)?;
    assert_eq!(info.layers.len(), 2);
    let through = proxy.down.load(Ordering::Relaxed);
    let payload = rep.bytes_received;
    eprintln!("figures: image {image_size} B, blob payload received {payload} B, bytes through the proxy {through} B");
    // Every blob verified (resolve unpacked and checked diff_ids); little was sent twice.
    assert!(payload <= image_size * 11 / 10, "payload {payload} for an image of {image_size}");
    assert!(
        through <= image_size * 11 / 10 + 64 * 1024,
        "bytes through the proxy {through} for an image of {image_size}"
    );
    Ok(())
}

#[test]
fn a_flipped_byte_is_rejected_and_the_store_is_unchanged() -> R {
    skiff_testkit::require_registry_tools!();
    let reg = Registry::start()?;
    let tmp = tempfile::tempdir()?;
    let layout = tmp.path().join("img");
    ImageBuilder::busybox()?.write_oci_layout(&layout, "img")?;
    reg.push(&layout, "team/img:1")?;
    // Flip a byte deep in every response: manifests are short, so only the layer suffers.
    let proxy = FaultProxy::start(reg.port, None, Some(100_000))?;
    let store = Arc::new(ImageStore::open(tmp.path().join("store"))?);
    let mut o = opts();
    o.max_attempts = 2;
    let err = rt().block_on(pull(Arc::clone(&store), &format!("127.0.0.1:{}/team/img:1", proxy.port), &o)).unwrap_err();
    assert!(matches!(err, ImageError::DigestMismatch { .. }), "{err}");
    assert!(store.list()?.is_empty(), "nothing tagged");
    assert_eq!(std::fs::read_dir(store.root().join("blobs/sha256"))?.count(), 0, "no blob kept");
    assert_eq!(std::fs::read_dir(store.root().join("layers"))?.count(), 0, "nothing unpacked");

    // Missing images and registries give precise messages.
    let err = rt().block_on(pull(Arc::clone(&store), &format!("127.0.0.1:{}/team/none:1", reg.port), &o)).unwrap_err();
    assert!(err.to_string().contains("manifest team/none:1: not found"), "{err}");
    Ok(())
}

#[test]
fn save_is_read_back_by_skopeo_and_by_load() -> R {
    skiff_testkit::require_registry_tools!();
    let tmp = tempfile::tempdir()?;
    let store = ImageStore::open(tmp.path().join("store"))?;
    let layout = tmp.path().join("layout");
    ImageBuilder::busybox()?
        .layer(LayerBuilder::new().file("etc/motd", 0o644, b"saved")?.finish()?)
        .write_oci_layout(&layout, "localhost/saved:1")?;
    store.load(&layout, None)?;
    let out = tmp.path().join("saved.tar");
    store.save(&["localhost/saved:1".to_string()], &out)?;

    let inspect = std::process::Command::new("skopeo")
        .arg("inspect")
        .arg(format!("docker-archive:{}", out.display()))
        .output()?;
    assert!(inspect.status.success(), "{}", String::from_utf8_lossy(&inspect.stderr));
    let v: serde_json::Value = serde_json::from_slice(&inspect.stdout)?;
    assert_eq!(v["Layers"].as_array().map(Vec::len), Some(2));
    let copy = std::process::Command::new("skopeo")
        .args([
            "copy",
            &format!("docker-archive:{}", out.display()),
            &format!("oci:{}:x", tmp.path().join("back").display()),
        ])
        .output()?;
    assert!(copy.status.success(), "{}", String::from_utf8_lossy(&copy.stderr));

    // And back into a fresh store: same layers.
    let again = ImageStore::open(tmp.path().join("store2"))?;
    assert_eq!(again.load(&out, None)?, vec!["localhost/saved:1".to_string()]);
    let (a, b) = (store.inspect("localhost/saved:1")?, again.inspect("localhost/saved:1")?);
    assert_eq!(
        a.layers.iter().map(|l| &l.diff_id).collect::<Vec<_>>(),
        b.layers.iter().map(|l| &l.diff_id).collect::<Vec<_>>()
    );
    assert_eq!(a.config_digest, b.config_digest);
    Ok(())
}
