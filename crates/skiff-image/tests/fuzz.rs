//! Property tests of what images bring in from outside, as fuzzers would drive them:
//! image layouts whose index, manifest and config are JSON of any shape (or a real one
//! with a value swapped), and layer tar streams of hostile entries or flipped bytes.
//! Whatever comes in: no panic, no hang, nothing written outside the layer directory,
//! and a refused image leaves no tag.

#![allow(clippy::unwrap_used)] // tests may panic on setup failures

use proptest::prelude::*;
use serde_json::{json, Value};
use skiff_image::{unpack_layer, ImageStore};
use skiff_testkit::{ImageBuilder, LayerBuilder};
use std::path::Path;

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        "[ -~]{0,20}".prop_map(Value::String),
        prop::sample::select(vec![
            "sha256:0000000000000000000000000000000000000000000000000000000000000000",
            "application/vnd.oci.image.manifest.v1+json",
            "application/vnd.oci.image.index.v1+json",
            "application/vnd.oci.image.layer.v1.tar+gzip",
            "linux",
            "amd64",
            "../../etc/passwd",
        ])
        .prop_map(|s| Value::String(s.into())),
    ];
    let keys = vec![
        "schemaVersion",
        "mediaType",
        "manifests",
        "layers",
        "config",
        "digest",
        "size",
        "platform",
        "architecture",
        "os",
        "variant",
        "annotations",
        "rootfs",
        "diff_ids",
        "Entrypoint",
        "Cmd",
        "Env",
    ];
    leaf.prop_recursive(3, 32, 6, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::vec((prop::sample::select(keys.clone()), inner), 0..6)
                .prop_map(|kv| Value::Object(kv.into_iter().map(|(k, v)| (k.to_string(), v)).collect())),
        ]
    })
}

/// Loads `layout` into a fresh store; checks that a refusal tags nothing.
fn load(layout: &Path) {
    let t = tempfile::tempdir().unwrap();
    let store = ImageStore::open(t.path().join("store")).unwrap();
    if store.load(layout, None).is_err() {
        assert!(store.list().unwrap().is_empty(), "a refused load tagged an image");
    }
}

/// A real, loadable layout to mutate.
fn base_layout(dir: &Path) -> Vec<std::path::PathBuf> {
    let tiny = LayerBuilder::new().file("a", 0o644, b"x").unwrap().finish().unwrap();
    let img = ImageBuilder { layers: vec![tiny], ..ImageBuilder::busybox().unwrap() };
    img.write_oci_layout(dir, "localhost/fuzz:1").unwrap();
    let mut files = vec![dir.join("index.json")];
    for e in std::fs::read_dir(dir.join("blobs/sha256")).unwrap().flatten() {
        if std::fs::metadata(e.path()).unwrap().len() < 4096 {
            files.push(e.path()); // the JSON blobs (manifest, config), not the layers
        }
    }
    files
}

/// One tar entry a hostile layer could hold.
#[derive(Debug, Clone)]
enum Entry {
    File(String, Vec<u8>, u32),
    Dir(String),
    Symlink(String, String),
    Hardlink(String, String),
    Device(String),
    Whiteout(String),
    Fifo(String),
}

fn path() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-c]{1,2}(/[a-c]{1,2}){0,2}",
        Just("../escape".to_string()),
        Just("/abs".to_string()),
        Just("a/../../up".to_string()),
        Just(".wh..wh..opq".to_string()),
        Just("a/.wh.b".to_string()),
    ]
}

fn entry() -> impl Strategy<Value = Entry> {
    prop_oneof![
        (path(), prop::collection::vec(any::<u8>(), 0..64), prop::sample::select(vec![0o644u32, 0o4755, 0o777]))
            .prop_map(|(p, d, m)| Entry::File(p, d, m)),
        path().prop_map(Entry::Dir),
        (path(), prop_oneof![path(), Just("/etc".to_string()), Just("..".to_string())])
            .prop_map(|(p, t)| Entry::Symlink(p, t)),
        (path(), path()).prop_map(|(p, t)| Entry::Hardlink(p, t)),
        path().prop_map(Entry::Device),
        path().prop_map(Entry::Whiteout),
        path().prop_map(Entry::Fifo),
    ]
}

fn tar_of(entries: &[Entry]) -> Vec<u8> {
    let mut b = LayerBuilder::new();
    for e in entries {
        let r = match e {
            Entry::File(p, d, m) => b.file(p, *m, d),
            Entry::Dir(p) => b.dir(p, 0o755),
            Entry::Symlink(p, t) => b.symlink(p, t),
            Entry::Hardlink(p, t) => b.hardlink(p, t),
            Entry::Device(p) => b.char_device(p, 1, 3),
            Entry::Whiteout(p) => b.whiteout(p),
            Entry::Fifo(p) => b.fifo(p),
        };
        b = match r {
            Ok(b) => b,
            Err(_) => return vec![],
        };
    }
    b.finish().unwrap_or_default()
}

/// Everything under `dir`, following no link.
fn walk(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        out.push(e.path());
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            walk(&e.path(), out);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(150))]

    #[test]
    fn a_layout_whose_json_is_anything_is_loaded_or_refused_cleanly(which in 0usize..8, v in json_value()) {
        let t = tempfile::tempdir().unwrap();
        let files = base_layout(t.path());
        let f = &files[which % files.len()];
        std::fs::write(f, serde_json::to_vec(&v).unwrap()).unwrap();
        load(t.path());
    }

    #[test]
    fn a_layout_with_flipped_bytes_is_loaded_or_refused_cleanly(which in 0usize..8, at in 0usize..2000, byte in any::<u8>()) {
        let t = tempfile::tempdir().unwrap();
        let files = base_layout(t.path());
        let f = &files[which % files.len()];
        let mut b = std::fs::read(f).unwrap();
        let at = at % b.len().max(1);
        if !b.is_empty() {
            b[at] = byte;
        }
        std::fs::write(f, b).unwrap();
        load(t.path());
    }

    /// Hostile tar streams (needs root: device nodes, ownership): nothing lands outside
    /// the layer directory, whatever the entries and wherever a byte flips.
    #[test]
    fn a_hostile_layer_writes_nothing_outside_its_directory(
        entries in prop::collection::vec(entry(), 0..12),
        flip in prop::option::of((0usize..4096, any::<u8>())),
    ) {
        if skiff_testkit::privileged_skip_reason().is_some() {
            return Ok(());
        }
        let mut tar = tar_of(&entries);
        if let (Some((at, byte)), false) = (flip, tar.is_empty()) {
            let at = at % tar.len();
            tar[at] = byte;
        }
        let outer = tempfile::tempdir().unwrap();
        let root = outer.path().join("layer");
        std::fs::create_dir(&root).unwrap();
        let _ = unpack_layer(&tar[..], &root);
        let beside: Vec<_> = std::fs::read_dir(outer.path()).unwrap().flatten().map(|e| e.file_name()).collect();
        prop_assert_eq!(beside, vec![std::ffi::OsString::from("layer")]);
        let mut all = vec![];
        walk(&root, &mut all);
        for p in all {
            prop_assert!(p.starts_with(&root), "{}", p.display());
        }
        prop_assert!(!Path::new("/abs").exists() && !Path::new("/escape").exists());
    }
}
