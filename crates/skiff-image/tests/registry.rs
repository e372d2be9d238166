//! Pulls from a real registry (Debian's `docker-registry`, the CNCF distribution server)
//! on 127.0.0.1, with images pushed by `skopeo`, through a TCP proxy that injects faults.

#![allow(clippy::unwrap_used)] // tests may panic on setup failures

use skiff_image::hosts::RegistriesConfig;
use skiff_image::registry::{parse_platform, platforms, pull, PullOptions};
use skiff_image::{ImageError, ImageStore};
use skiff_testkit::registry::{Auth, FaultProxy, Registry, StatusServer, PASSWORD, USER};
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

/// Collects the pull's notes (retries, fallbacks) as they are shown.
fn noting(o: &mut PullOptions) -> Arc<std::sync::Mutex<Vec<String>>> {
    let notes = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let sink = Arc::clone(&notes);
    o.progress = Arc::new(move |e| {
        if let skiff_image::registry::PullEvent::Note(l) = e {
            sink.lock().unwrap().push(l.to_string());
        }
    });
    notes
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

    // What the hub places by: the platforms, read without storing anything.
    let listed: Vec<String> = rt().block_on(platforms(&reference, &opts()))?.iter().map(ToString::to_string).collect();
    assert_eq!(listed, ["linux/amd64", "linux/arm64", "linux/arm/v7"]);
    let single = tmp.path().join("single");
    arch_image("arm", Some("v6"))?.write_oci_layout(&single, "single")?;
    reg.push(&single, "team/single:1")?;
    let one = rt().block_on(platforms(&format!("127.0.0.1:{}/team/single:1", reg.port), &opts()))?;
    assert_eq!(one.iter().map(ToString::to_string).collect::<Vec<_>>(), ["linux/arm/v6"], "from the config");
    let missing = rt().block_on(platforms(&format!("127.0.0.1:{}/team/none:1", reg.port), &opts())).unwrap_err();
    assert!(missing.to_string().contains("manifest team/none:1: not found"), "{missing}");

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

/// Pushes a small image as `repo_tag`; returns the pull reference.
fn small_image(reg: &Registry, dir: &std::path::Path, repo_tag: &str) -> anyhow::Result<String> {
    let layout = dir.join(repo_tag.replace([':', '/'], "_"));
    ImageBuilder::busybox()?
        .layer(LayerBuilder::new().file("etc/tag", 0o644, repo_tag.as_bytes())?.finish()?)
        .write_oci_layout(&layout, "x")?;
    reg.push(&layout, repo_tag)?;
    Ok(format!("127.0.0.1:{}/{repo_tag}", reg.port))
}

#[test]
fn basic_auth_over_tls_with_a_ca_file() -> R {
    skiff_testkit::require_registry_tools!();
    let reg = Registry::start_with(true, Auth::Htpasswd)?;
    let tmp = tempfile::tempdir()?;
    let reference = small_image(&reg, tmp.path(), "team/private:1")?;
    let store = Arc::new(ImageStore::open(tmp.path().join("store"))?);
    let ca = RegistriesConfig { ca_file: reg.ca_file.clone(), ..Default::default() };

    // No credentials: the registry's 401, said as such.
    let mut o = opts();
    o.registries = ca.clone();
    let err = rt().block_on(pull(Arc::clone(&store), &reference, &o)).unwrap_err().to_string();
    assert!(err.contains("manifest team/private:1: authentication required"), "{err}");
    // Wrong password: the same.
    o.docker_config = Some(reg.docker_config(tmp.path(), USER, "wrong")?);
    let err = rt().block_on(pull(Arc::clone(&store), &reference, &o)).unwrap_err().to_string();
    assert!(err.contains("authentication required"), "{err}");
    // Right credentials, but the CA is not trusted: the certificate problem, not plain HTTP's.
    let mut o = opts();
    o.docker_config = Some(reg.docker_config(tmp.path(), USER, PASSWORD)?);
    let err = rt().block_on(pull(Arc::clone(&store), &reference, &o)).unwrap_err().to_string();
    assert!(err.contains("certificate") && err.contains("UnknownIssuer"), "{err}");
    assert!(store.list()?.is_empty());

    // Credentials and the CA file: pulled over HTTPS.
    o.registries = ca;
    let rep = rt().block_on(pull(Arc::clone(&store), &reference, &o))?;
    assert_eq!(rep.endpoint, format!("127.0.0.1:{}", reg.port));
    let info = store.resolve(&reference)?;
    let top = store.layer_dir(&info.layers.last().unwrap().diff_id)?;
    assert_eq!(std::fs::read_to_string(top.join("etc/tag"))?, "team/private:1");

    // A CA file that is not PEM is named.
    let bad = tmp.path().join("bad.pem");
    std::fs::write(&bad, "not a certificate")?;
    o.registries = RegistriesConfig { ca_file: Some(bad.clone()), ..Default::default() };
    let err = rt().block_on(pull(Arc::clone(&store), &reference, &o)).unwrap_err().to_string();
    assert!(err.contains(&bad.display().to_string()), "{err}");
    Ok(())
}

#[test]
fn bearer_token_challenge_flow() -> R {
    skiff_testkit::require_registry_tools!();
    let reg = Registry::start_with(true, Auth::Token)?;
    let tmp = tempfile::tempdir()?;
    let reference = small_image(&reg, tmp.path(), "team/tok:1")?;
    let issued_by_push = reg.tokens.as_ref().unwrap().issued.load(Ordering::Relaxed);
    assert!(issued_by_push > 0, "skopeo went through the token server");
    let store = Arc::new(ImageStore::open(tmp.path().join("store"))?);
    let ca = RegistriesConfig { ca_file: reg.ca_file.clone(), ..Default::default() };

    // The token server turns away a client without credentials; the message says where.
    let mut o = opts();
    o.registries = ca.clone();
    let err = rt().block_on(pull(Arc::clone(&store), &reference, &o)).unwrap_err().to_string();
    assert!(err.contains(": token: authentication required"), "{err}");

    o.docker_config = Some(reg.docker_config(tmp.path(), USER, PASSWORD)?);
    rt().block_on(pull(Arc::clone(&store), &reference, &o))?;
    assert!(store.resolve(&reference).is_ok());
    assert!(reg.tokens.as_ref().unwrap().issued.load(Ordering::Relaxed) > issued_by_push, "the pull used a token");
    Ok(())
}

#[test]
fn mirrors_are_tried_first_and_fall_through() -> R {
    skiff_testkit::require_registry_tools!();
    let (upstream, mirror) = (Registry::start()?, Registry::start()?);
    let tmp = tempfile::tempdir()?;
    // The mirror has team/a; only upstream has team/b.
    let a_on_mirror = small_image(&mirror, tmp.path(), "team/a:1")?;
    let b = small_image(&upstream, tmp.path(), "team/b:1")?;
    let a = a_on_mirror.replace(&mirror.port.to_string(), &upstream.port.to_string());
    let dead = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let mut mirrors = std::collections::BTreeMap::new();
    mirrors.insert(
        format!("127.0.0.1:{}", upstream.port),
        vec![format!("http://127.0.0.1:{dead}"), format!("http://127.0.0.1:{}", mirror.port)],
    );
    let mut o = opts();
    o.registries = RegistriesConfig { mirrors, ..Default::default() };
    let notes = noting(&mut o);
    let store = Arc::new(ImageStore::open(tmp.path().join("store"))?);

    // team/a: the dead mirror falls through, the second mirror serves it (upstream lacks it).
    let rep = rt().block_on(pull(Arc::clone(&store), &a, &o))?;
    assert_eq!(rep.endpoint, format!("127.0.0.1:{}", mirror.port));
    assert!(notes.lock().unwrap().iter().any(|n| n.contains(&format!("mirror http://127.0.0.1:{dead} failed"))));
    // team/b: both mirrors fail (one dead, one 404), upstream serves it.
    let rep = rt().block_on(pull(Arc::clone(&store), &b, &o))?;
    assert_eq!(rep.endpoint, format!("127.0.0.1:{}", upstream.port));
    assert_eq!(store.list()?.len(), 2);
    // Nothing serves team/c: the upstream's answer is the one reported.
    let err = rt().block_on(pull(Arc::clone(&store), &b.replace("team/b", "team/c"), &o)).unwrap_err();
    assert!(err.to_string().contains(&format!("registry 127.0.0.1:{}: manifest team/c:1: not found", upstream.port)));
    Ok(())
}

#[test]
fn registry_answers_give_precise_messages() -> R {
    skiff_testkit::require_registry_tools!();
    let tmp = tempfile::tempdir()?;
    let store = Arc::new(ImageStore::open(tmp.path().join("store"))?);
    let mut o = opts();
    o.max_attempts = 2;
    let pull_from = |s: &StatusServer| {
        rt().block_on(pull(Arc::clone(&store), &format!("127.0.0.1:{}/team/x:1", s.port), &o)).unwrap_err().to_string()
    };
    let json = "application/json";
    let cases = [
        (
            StatusServer::start(429, json, r#"{"errors":[{"code":"TOOMANYREQUESTS","message":"slow down"}]}"#)?,
            "rate limited by the registry; retry later: slow down (gave up after 2 attempts)",
        ),
        (
            StatusServer::start(503, "text/plain", "down for maintenance")?,
            "registry error 503 (gave up after 2 attempts)",
        ),
        (
            StatusServer::start(
                401,
                json,
                r#"{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}"#,
            )?,
            "authentication required (skiff login, or credentials in the Docker config)",
        ),
        (StatusServer::start(403, json, "{}")?, "manifest team/x:1: access denied"),
        (StatusServer::start(200, "application/vnd.oci.image.manifest.v1+json", "{not json")?, "key must be a string"),
        (
            StatusServer::start(
                200,
                "application/vnd.oci.image.manifest.v1+json",
                r#"{"schemaVersion":2,"mediaType":"application/vnd.example.thing+json"}"#,
            )?,
            "unsupported media type application/vnd.example.thing+json",
        ),
    ];
    for (server, want) in &cases {
        let err = pull_from(server);
        assert!(err.contains(want), "want {want:?} in {err:?}");
        assert!(err.contains(&format!("127.0.0.1:{}", server.port)) || !want.contains("gave up"), "{err}");
    }
    // Retried answers were asked twice, final ones once.
    assert_eq!(cases[0].0.hits.load(Ordering::Relaxed), 2);
    assert_eq!(cases[1].0.hits.load(Ordering::Relaxed), 2);
    assert_eq!(cases[3].0.hits.load(Ordering::Relaxed), 1);
    assert!(store.list()?.is_empty());
    Ok(())
}

#[test]
fn a_full_disk_fails_the_pull_cleanly_and_a_later_pull_resumes() -> R {
    skiff_testkit::require_registry_tools!();
    let reg = Registry::start()?;
    let tmp = tempfile::tempdir()?;
    let layout = tmp.path().join("big");
    let mut img =
        ImageBuilder::busybox()?.layer(LayerBuilder::new().file("blob", 0o644, &incompressible(8 << 20, 3))?.finish()?);
    img.gzip = true;
    img.write_oci_layout(&layout, "big")?;
    reg.push(&layout, "team/big:1")?;
    let reference = format!("127.0.0.1:{}/team/big:1", reg.port);

    let disk = skiff_testkit::Tmpfs::mount(6 << 20)?;
    let store = Arc::new(ImageStore::open(disk.path().join("store"))?);
    let err = rt().block_on(pull(Arc::clone(&store), &reference, &opts())).unwrap_err().to_string();
    assert!(err.contains("No space left on device") || err.contains("no space for it"), "{err}");
    // Consistent: nothing tagged, no blob or layer of this pull kept, only the partial
    // download (for a resume).
    assert!(store.list()?.is_empty());
    assert_eq!(std::fs::read_dir(store.root().join("blobs/sha256"))?.count(), 0);
    assert_eq!(std::fs::read_dir(store.root().join("layers"))?.count(), 0);
    let partial: u64 = std::fs::read_dir(store.root().join("tmp"))?
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("partial-"))
        .map(|e| e.metadata().unwrap().len())
        .sum();
    assert!(partial > 1 << 20, "the partial download is kept: {partial} B");

    // More room: the pull completes, without fetching again what the partial file holds.
    disk.resize(64 << 20)?;
    let rep = rt().block_on(pull(Arc::clone(&store), &reference, &opts()))?;
    let image_size: u64 =
        std::fs::read_dir(layout.join("blobs/sha256"))?.map(|e| e.unwrap().metadata().unwrap().len()).sum();
    assert!(
        rep.bytes_received + partial <= image_size + (64 << 10),
        "{} + {partial} vs {image_size}",
        rep.bytes_received
    );
    assert!(store.resolve(&reference).is_ok());
    Ok(())
}

#[test]
fn the_high_water_mark_prunes_unused_images_oldest_first() -> R {
    skiff_testkit::require_privileged!();
    let tmp = tempfile::tempdir()?;
    let disk = skiff_testkit::Tmpfs::mount(24 << 20)?;
    let store = ImageStore::open(disk.path().join("store"))?;
    for (i, name) in ["localhost/a:1", "localhost/b:1", "localhost/c:1"].iter().enumerate() {
        let layout = tmp.path().join(format!("l{i}"));
        let mut img = ImageBuilder::busybox()?
            .layer(LayerBuilder::new().file("data", 0o644, &incompressible(3 << 20, 11 * (i as u64 + 1)))?.finish()?);
        img.gzip = true;
        img.write_oci_layout(&layout, name)?;
        store.load(&layout, None)?;
        let info = store.resolve(name)?;
        for l in &info.layers {
            store.ensure_layer(l)?;
        }
        std::thread::sleep(std::time::Duration::from_millis(20)); // distinct store times
    }
    let used = store.disk_used_percent()?;
    assert!(used > 50.0, "{used}");
    let in_use: std::collections::BTreeSet<String> = ["localhost/a:1".to_string()].into();

    // Below the mark: nothing happens.
    assert_eq!(store.prune_to_watermark(&skiff_image::GcPolicy::new(95, 90).unwrap(), &in_use)?, None);
    assert_eq!(store.list()?.len(), 3);

    // Above it, but every image was stored within the minimum age (2 min by default):
    // nothing goes, as an image loaded for a deployment still on its way must stay.
    let low = (used - 30.0).floor() as u8; // one image (about 6 MiB of 24) is not enough
    let policy = skiff_image::GcPolicy::new(used as u8 - 1, low).unwrap();
    assert!(store.prune_to_watermark(&policy, &in_use)?.unwrap().removed.is_empty());
    assert_eq!(store.list()?.len(), 3);

    // Old enough: unused images go, oldest first, until the low mark; the one in use
    // stays, and so do its layers.
    let p = store.prune_to_watermark(&policy.with_min_age(std::time::Duration::ZERO), &in_use)?.unwrap();
    assert_eq!(p.removed, ["localhost/b:1", "localhost/c:1"]);
    assert!(p.used_percent_after < p.used_percent_before && p.freed_bytes > 6 << 20, "{p:?}");
    let left: Vec<String> = store.list()?.into_iter().map(|i| i.reference).collect();
    assert_eq!(left, ["localhost/a:1"]);
    for l in store.resolve("localhost/a:1")?.layers {
        assert!(store.layer_dir(&l.diff_id)?.is_dir());
    }
    // While a pull holds the store, pruning waits for the next round.
    let _lease = store.lease()?;
    assert_eq!(store.prune_to_watermark(&skiff_image::GcPolicy::new(1, 0).unwrap(), &[].into())?, None);
    Ok(())
}

/// Wasm images as the ecosystem pushes them: a CNCF Wasm OCI artifact, one with the older
/// wasm-to-oci layer type, and an index holding both a container and a `wasi/wasm` image.
#[test]
fn wasm_artifacts_and_wasi_platform_images_are_pulled_for_the_wasm_runtime() -> R {
    use skiff_image::{wasm::wasm_platform, Target};
    skiff_testkit::require_registry_tools!();
    let reg = Registry::start()?;
    let tmp = tempfile::tempdir()?;
    let module = skiff_testkit::wasm::hello()?;
    let component = skiff_testkit::wasm::command_component()?;
    let art = tmp.path().join("art");
    skiff_testkit::wasm::write_artifact_layout(&art, "hello", &module, None)?;
    reg.push(&art, "wasm/hello:1")?;
    let old = tmp.path().join("old");
    skiff_testkit::wasm::write_artifact_layout(
        &old,
        "p2",
        &component,
        Some("application/vnd.wasm.content.layer.v1+wasm"),
    )?;
    reg.push(&old, "wasm/p2:1")?;
    let multi = tmp.path().join("multi");
    ImageBuilder::write_multi_arch_layout(&multi, "multi", &[ImageBuilder::busybox()?, ImageBuilder::wasi(&module)?])?;
    reg.push(&multi, "wasm/multi:1")?;
    let r = |name: &str| format!("127.0.0.1:{}/wasm/{name}", reg.port);

    // What the hub places by.
    let p: Vec<String> = rt().block_on(platforms(&r("hello:1"), &opts()))?.iter().map(ToString::to_string).collect();
    assert_eq!(p, ["wasi/wasm"]);
    let p: Vec<String> = rt().block_on(platforms(&r("multi:1"), &opts()))?.iter().map(ToString::to_string).collect();
    assert_eq!(p, [format!("linux/{}", skiff_testkit::host_arch()), "wasi/wasm".to_string()]);

    let store = Arc::new(ImageStore::open(tmp.path().join("store"))?);
    let wasm = PullOptions { platform: Some(wasm_platform()), ..opts() };
    for name in ["hello:1", "p2:1", "multi:1"] {
        rt().block_on(pull(Arc::clone(&store), &r(name), &wasm))?;
    }
    // An artifact's module is its layer blob, verified and never unpacked.
    let info = store.inspect_for(&r("hello:1"), Target::Wasm)?;
    assert_eq!(info.platform, "wasip1/wasm");
    assert!(info.layers.is_empty());
    let m = store.wasm_module(&info, None)?;
    assert_eq!(std::fs::read(&m.path)?, module);
    assert_eq!(format!("sha256:{}", m.id), info.wasm.as_ref().unwrap().digest);
    let info = store.inspect_for(&r("p2:1"), Target::Wasm)?;
    assert_eq!(
        (info.platform.as_str(), std::fs::read(store.wasm_module(&info, None)?.path)?),
        ("wasip2/wasm", component)
    );
    // A wasi/wasm image's module is the file its entrypoint names, in its unpacked layers.
    let info = store.resolve_for(&r("multi:1"), Target::Wasm)?;
    assert_eq!(info.config.entrypoint.as_deref(), Some(&["/app.wasm".to_string()][..]));
    assert_eq!(std::fs::read(store.wasm_module(&info, Some("/app.wasm"))?.path)?, module);
    assert!(store.wasm_module(&info, Some("/nope.wasm")).unwrap_err().to_string().contains("has no file /nope.wasm"));
    assert!(store.wasm_module(&info, Some("../etc/passwd")).is_err(), "paths stay inside the image");

    // Each image is what it is: the host's variant of the index was not pulled, an
    // artifact runs no container and a container image no wasm program.
    let e = store.inspect_for(&r("hello:1"), Target::Host).unwrap_err();
    assert!(matches!(e, ImageError::NoPlatform { .. }), "{e}");
    let listed = store.inspect(&r("hello:1"))?;
    assert_eq!(listed.platform, "wasip1/wasm", "listing falls back to the wasm platform");
    let by_id = store.inspect(&listed.config_digest[7..19])?;
    assert_eq!(by_id.manifest_digest, listed.manifest_digest, "and so does an image ID");
    let host = Arc::new(ImageStore::open(tmp.path().join("host"))?);
    rt().block_on(pull(Arc::clone(&host), &r("multi:1"), &opts()))?;
    host.resolve_for(&r("multi:1"), Target::Host)?;
    let single = tmp.path().join("single");
    ImageBuilder::busybox()?.write_oci_layout(&single, "box")?;
    host.load(&single, Some("box:1"))?;
    let e = host.inspect_for("box:1", Target::Wasm).unwrap_err().to_string();
    assert!(e.contains("has no manifest for wasi/wasm; it has: linux/"), "{e}");

    // Moved without a registry: saved (an oci-archive, since artifacts are no tars),
    // loaded elsewhere, the same module.
    let tar = tmp.path().join("bundle.tar");
    store.save(&[r("hello:1"), r("multi:1")], &tar)?;
    let other = ImageStore::open(tmp.path().join("other"))?;
    let loaded = other.load(&tar, None)?;
    assert_eq!(loaded.len(), 2);
    let info = other.inspect_for(&r("hello:1"), Target::Wasm)?;
    assert_eq!(std::fs::read(other.wasm_module(&info, None)?.path)?, module);
    // And a bare .wasm file loads as an artifact named by its content.
    let file = skiff_testkit::wasm::write(tmp.path(), "Tool.wasm", &module)?;
    let names = other.load(&file, None)?;
    assert!(names[0].starts_with("localhost/wasm/tool:"), "{names:?}");
    assert_eq!(other.inspect_for(&names[0], Target::Wasm)?.platform, "wasip1/wasm");
    let junk = tmp.path().join("junk.tar");
    std::fs::write(&junk, b"\0asm\x01\0\0\0 not really")?;
    assert!(other.load(&junk, Some("junk:1")).is_ok(), "stored as bytes; checked when it runs");
    Ok(())
}

/// The app layer of the test's zstd:chunked images: a model file (an edit of 1 MiB in
/// its middle between versions), a small config that changes, libraries that do not, and
/// in the second version a new file.
fn chunked_app_layer(model: &[u8], version: &str, added: bool) -> anyhow::Result<Vec<u8>> {
    let mut l = LayerBuilder::new().dir("app", 0o755)?.file("app/model.bin", 0o644, model)?.file(
        "app/broker.conf",
        0o644,
        format!("listen 1883\nversion {version}\n").as_bytes(),
    )?;
    for i in 0..20 {
        l = l.file(&format!("app/lib{i}.so"), 0o644, &incompressible(20_000, 100 + i))?;
    }
    if added {
        l = l.file("app/added.bin", 0o644, &incompressible(300_000, 13))?;
    }
    l.finish()
}

/// The (layer descriptor, TOC entries) of the last layer of `repo_tag` in `reg`.
fn chunked_toc(reg: &Registry, repo_tag: &str) -> anyhow::Result<(skiff_image::store::Descriptor, serde_json::Value)> {
    let out = std::process::Command::new("skopeo")
        .args(["inspect", "--raw", "--tls-verify=false"])
        .arg(format!("docker://127.0.0.1:{}/{repo_tag}", reg.port))
        .output()?;
    anyhow::ensure!(out.status.success(), "skopeo inspect: {}", String::from_utf8_lossy(&out.stderr));
    let m: skiff_image::store::Manifest = serde_json::from_slice(&out.stdout)?;
    let desc = m.layers.unwrap().pop().unwrap();
    assert_eq!(desc.media_type, skiff_image::store::MT_OCI_LAYER_ZSTD);
    let r = skiff_image::chunked::toc_ref(&desc).expect("zstd:chunked annotations")?;
    let blob = std::fs::read(reg.blob_file(&desc.digest))?;
    let raw = &blob[r.offset as usize..(r.offset + r.len) as usize];
    let mut json = vec![];
    std::io::Read::read_to_end(&mut skiff_image::zstd::ZstdFrames::new(raw), &mut json)?;
    let toc: serde_json::Value = serde_json::from_slice(&json)?;
    Ok((desc, toc["entries"].clone()))
}

#[test]
fn zstd_chunked_layers_are_pulled_by_the_parts_the_node_lacks() -> R {
    skiff_testkit::require_registry_tools!();
    let reg = Registry::start()?;
    let tmp = tempfile::tempdir()?;
    const MODEL: usize = 24 << 20;
    let old_model = incompressible(MODEL, 11);
    let mut new_model = old_model.clone();
    new_model[MODEL / 2..MODEL / 2 + (1 << 20)].copy_from_slice(&incompressible(1 << 20, 12));
    for (tag, model, added) in [("1", &old_model, false), ("2", &new_model, true)] {
        let layout = tmp.path().join(format!("app{tag}"));
        ImageBuilder::busybox()?.layer(chunked_app_layer(model, tag, added)?).write_oci_layout(&layout, "app")?;
        // skopeo writes containers/storage's zstd:chunked, as `podman push` does.
        reg.push_with(&layout, &format!("team/app:{tag}"), &["--dest-compress-format", "zstd:chunked"])?;
    }
    let (layer2, toc2) = chunked_toc(&reg, "team/app:2")?;

    // The first version is pulled whole (nothing to build on); its TOCs are kept. Both
    // through a proxy that counts the bytes.
    let proxy = FaultProxy::start(reg.port, None, None)?;
    let store = Arc::new(ImageStore::open(tmp.path().join("store"))?);
    let v1 = format!("127.0.0.1:{}/team/app:1", proxy.port);
    rt().block_on(pull(Arc::clone(&store), &v1, &opts()))?;
    assert_eq!(std::fs::read_dir(store.root().join("tocs"))?.count(), 2, "a TOC per zstd:chunked layer");

    // The second: only the changed chunks, the new file and the tar headers cross the link.
    let before = proxy.down.load(Ordering::Relaxed);
    let mut o = opts();
    let notes = noting(&mut o);
    let v2 = format!("127.0.0.1:{}/team/app:2", proxy.port);
    let rep = rt().block_on(pull(Arc::clone(&store), &v2, &o))?;
    let through = proxy.down.load(Ordering::Relaxed) - before;
    let notes = notes.lock().unwrap().clone();
    eprintln!(
        "figures: zstd:chunked layer {} B; pulled through the proxy {through} B ({:.1} %); reused {} B; notes: {notes:?}",
        layer2.size,
        through as f64 * 100.0 / layer2.size as f64,
        rep.bytes_reused
    );
    assert!(notes.iter().any(|n| n.contains("zstd:chunked: fetching")), "{notes:?}");
    assert!(through < 2_600_000, "{through} bytes through the proxy for a 1 MiB edit and a 300 kB file");
    assert!(rep.bytes_reused >= (MODEL - (2 << 20)) as u64, "reused {}", rep.bytes_reused);
    let info = store.resolve(&v2)?;
    let dir = store.layer_dir(&info.layers.last().unwrap().diff_id)?;
    assert!(std::fs::read(dir.join("app/model.bin"))? == new_model, "the edited file is whole");
    assert_eq!(std::fs::read(dir.join("app/added.bin"))?, incompressible(300_000, 13));
    assert_eq!(std::fs::read_to_string(dir.join("app/broker.conf"))?, "listen 1883\nversion 2\n");

    // Any zstd client can read the same layers whole: a store with nothing pulls v2
    // without ranges, and its diff_ids check out.
    let fresh = Arc::new(ImageStore::open(tmp.path().join("fresh"))?);
    let whole = rt().block_on(pull(Arc::clone(&fresh), &v2, &opts()))?;
    assert_eq!(whole.bytes_reused, 0);
    assert_eq!(fresh.resolve(&v2)?.layers, info.layers);

    // Only layers of the same repository lend their files: what a node finds shows in the
    // ranges it fetches, and a registry's TOC must not be able to test guesses about the
    // files of images from elsewhere. A node holding v1 as other/app fetches v2 whole.
    reg.push_with(&tmp.path().join("app1"), "other/app:1", &["--dest-compress-format", "zstd:chunked"])?;
    let foreign = Arc::new(ImageStore::open(tmp.path().join("foreign"))?);
    rt().block_on(pull(Arc::clone(&foreign), &format!("127.0.0.1:{}/other/app:1", proxy.port), &opts()))?;
    let rep = rt().block_on(pull(Arc::clone(&foreign), &v2, &opts()))?;
    assert_eq!(rep.bytes_reused, 0, "nothing taken from another repository's layers");

    // A damaged part (a byte of the new file's frames, as the registry now sends it) is
    // refused by its chunk digest; the whole blob then fails its own digest, and nothing of
    // v2 is kept.
    let added = toc2.as_array().unwrap().iter().find(|e| e["name"] == "app/added.bin").unwrap();
    let (start, end) = (added["offset"].as_u64().unwrap(), added["endOffset"].as_u64().unwrap());
    let path = reg.blob_file(&layer2.digest);
    let mut blob = std::fs::read(&path)?;
    blob[((start + end) / 2) as usize] ^= 0xff;
    std::fs::write(&path, &blob)?;
    let other = Arc::new(ImageStore::open(tmp.path().join("other"))?);
    rt().block_on(pull(Arc::clone(&other), &v1, &opts()))?;
    let mut o = opts();
    o.max_attempts = 2;
    let notes = noting(&mut o);
    let err = rt().block_on(pull(Arc::clone(&other), &v2, &o)).unwrap_err();
    assert!(matches!(err, ImageError::DigestMismatch { .. }), "{err}");
    let notes = notes.lock().unwrap().clone();
    assert!(
        notes.iter().any(|n| n.contains("the chunk of app/added.bin at") && n.contains("does not match its digest")),
        "{notes:?}"
    );
    assert_eq!(other.list()?.len(), 1, "only v1");
    assert!(!other.layer_dir(&info.layers.last().unwrap().diff_id)?.exists());
    Ok(())
}
