//! WebAssembly test programs, built from source at test time with nothing but crates:
//! WAT text for WASI preview 1 modules (the `wat` crate), the preview 1 → 0.2 adapter
//! for a command component (as `wasm-tools component new --adapt` makes one), and a
//! hand-written core module encoded against the `wasi:http/proxy` world (vendored WIT in
//! `wit/`) for an HTTP component (as `wit-bindgen` output would be).
//!
//! Every module writes through one helper, `$out(fd, ptr, len)`, whose iovec and result
//! live at bytes 32..44 of memory.

use anyhow::{Context, Result};

/// The imports every preview 1 program here shares; the program's own come after them.
const IMPORTS: &str = r#"
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
"#;

/// The memory and the helper every program here shares (after all imports).
const HELPERS: &str = r#"
  (memory (export "memory") 1)
  (func $out (param $fd i32) (param $ptr i32) (param $len i32)
    (i32.store (i32.const 32) (local.get $ptr))
    (i32.store (i32.const 36) (local.get $len))
    (drop (call $fd_write (local.get $fd) (i32.const 32) (i32.const 1) (i32.const 40))))
"#;

/// A module of the shared imports, `imports`, the shared helpers, then `body`.
fn module_with(imports: &str, body: &str) -> Result<Vec<u8>> {
    wat::parse_str(format!("(module {IMPORTS} {imports} {HELPERS} {body})")).context("assembling a test module")
}

fn module(body: &str) -> Result<Vec<u8>> {
    module_with("", body)
}

/// A WAT string literal for `s` at `offset`, and the call that prints it to `fd`.
fn text(offset: u32, s: &str) -> (String, String) {
    let esc: String = s.bytes().map(|b| format!("\\{b:02x}")).collect();
    (
        format!("(data (i32.const {offset}) \"{esc}\")"),
        format!("(call $out (i32.const 1) (i32.const {offset}) (i32.const {}))", s.len()),
    )
}

/// Prints `hello from wasm`, then `args: ARGV...` and `env: K=V...` on stdout and
/// `to stderr` on stderr; exits 0.
pub fn hello() -> Result<Vec<u8>> {
    module_with(
        r#"
  (import "wasi_snapshot_preview1" "args_sizes_get" (func $args_sizes_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "args_get" (func $args_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "environ_sizes_get" (func $environ_sizes_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "environ_get" (func $environ_get (param i32 i32) (result i32)))
"#,
        r#"
  (data (i32.const 64) "hello from wasm\n")
  (data (i32.const 96) "args:")
  (data (i32.const 112) "env:")
  (data (i32.const 128) "to stderr\n")
  (data (i32.const 144) " \n")
  ;; Prints LABEL, a space, then a block of NUL-terminated strings joined by spaces.
  (func $block (param $label i32) (param $llen i32) (param $buf i32) (param $len i32)
    (local $i i32)
    (call $out (i32.const 1) (local.get $label) (local.get $llen))
    (call $out (i32.const 1) (i32.const 144) (i32.const 1))
    (if (i32.eqz (local.get $len)) (then (call $out (i32.const 1) (i32.const 145) (i32.const 1)) (return)))
    (block $done (loop $l
      (br_if $done (i32.ge_u (local.get $i) (local.get $len)))
      (if (i32.eqz (i32.load8_u (i32.add (local.get $buf) (local.get $i))))
        (then (i32.store8 (i32.add (local.get $buf) (local.get $i)) (i32.const 32))))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br $l)))
    (i32.store8 (i32.sub (i32.add (local.get $buf) (local.get $len)) (i32.const 1)) (i32.const 10))
    (call $out (i32.const 1) (local.get $buf) (local.get $len)))
  (func (export "_start")
    (call $out (i32.const 1) (i32.const 64) (i32.const 16))
    (drop (call $args_sizes_get (i32.const 16) (i32.const 20)))
    (drop (call $args_get (i32.const 1024) (i32.const 8192)))
    (call $block (i32.const 96) (i32.const 5) (i32.const 8192) (i32.load (i32.const 20)))
    (drop (call $environ_sizes_get (i32.const 16) (i32.const 20)))
    (drop (call $environ_get (i32.const 2048) (i32.const 16384)))
    (call $block (i32.const 112) (i32.const 4) (i32.const 16384) (i32.load (i32.const 20)))
    (call $out (i32.const 2) (i32.const 128) (i32.const 10)))
"#,
    )
}

/// Prints `exiting with CODE` and exits with `code`.
pub fn exit_with(code: i32) -> Result<Vec<u8>> {
    let (data, print) = text(64, &format!("exiting with {code}\n"));
    module(&format!(r#"{data} (func (export "_start") {print} (call $proc_exit (i32.const {code})))"#))
}

/// Grows its memory one 64 KiB page at a time by `pages` pages (from one), printing
/// before and after; exits 0 if it got them all.
pub fn grow(pages: u32) -> Result<Vec<u8>> {
    let (d1, p1) = text(64, "growing memory\n");
    let (d2, p2) = text(96, &format!("grew by {pages} pages\n"));
    module(&format!(
        r#"{d1} {d2}
  (func (export "_start") (local $i i32)
    {p1}
    (loop $l
      (drop (memory.grow (i32.const 1)))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $l (i32.lt_u (local.get $i) (i32.const {pages}))))
    {p2})"#
    ))
}

/// Prints `burning cpu` and spins forever without calling the host.
pub fn busy() -> Result<Vec<u8>> {
    let (data, print) = text(64, "burning cpu\n");
    module(&format!(r#"{data} (func (export "_start") {print} (loop $l (br $l)))"#))
}

/// Sleeps forever in `poll_oneoff`, waking every `every_ms`; prints `tick` at each wake
/// when `ticks`.
fn sleeper(every_ms: u64, ticks: bool) -> Result<Vec<u8>> {
    let (data, print) = text(64, "tick\n");
    let print = if ticks { print } else { String::new() };
    module_with(
        r#"(import "wasi_snapshot_preview1" "poll_oneoff" (func $poll (param i32 i32 i32 i32) (result i32)))"#,
        &format!(
            r#"{data}
  (func (export "_start")
    ;; One relative clock subscription at 200: tag 0 (clock) at +8, monotonic clock at +16,
    ;; timeout (ns) at +24, precision at +32, flags at +40.
    (i32.store8 (i32.const 208) (i32.const 0))
    (i32.store (i32.const 216) (i32.const 1))
    (i64.store (i32.const 224) (i64.const {ns}))
    (i64.store (i32.const 232) (i64.const 0))
    (i32.store16 (i32.const 240) (i32.const 0))
    (loop $l
      {print}
      (drop (call $poll (i32.const 200) (i32.const 256) (i32.const 1) (i32.const 300)))
      (br $l)))"#,
            ns = every_ms * 1_000_000
        ),
    )
}

/// Creates the file `go` in its first preopened directory (a start signal a benchmark
/// waits on, as `touch /b/go` in a container), then sleeps forever. (A FIFO would not do:
/// WASI writes to files at a position, which a FIFO has not.)
pub fn signal() -> Result<Vec<u8>> {
    module_with(
        r#"
  (import "wasi_snapshot_preview1" "path_open"
    (func $path_open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_close" (func $fd_close (param i32) (result i32)))
  (import "wasi_snapshot_preview1" "poll_oneoff" (func $poll (param i32 i32 i32 i32) (result i32)))
"#,
        r#"
  (data (i32.const 64) "go")
  (func (export "_start")
    ;; oflags CREAT (1), rights FD_WRITE (64).
    (if (call $path_open (i32.const 3) (i32.const 0) (i32.const 64) (i32.const 2) (i32.const 1)
                         (i64.const 64) (i64.const 0) (i32.const 0) (i32.const 16))
      (then (call $proc_exit (i32.const 3))))
    (drop (call $fd_close (i32.load (i32.const 16))))
    (i32.store8 (i32.const 208) (i32.const 0))
    (i32.store (i32.const 216) (i32.const 1))
    (i64.store (i32.const 224) (i64.const 3600000000000))
    (loop $l
      (drop (call $poll (i32.const 200) (i32.const 256) (i32.const 1) (i32.const 300)))
      (br $l)))
"#,
    )
}

/// Prints `tick` every `every_ms` forever (a long-running service).
pub fn ticker(every_ms: u64) -> Result<Vec<u8>> {
    sleeper(every_ms, true)
}

/// Sleeps forever, silently (an idle instance).
pub fn idle() -> Result<Vec<u8>> {
    sleeper(3_600_000, false)
}

/// Reads `in.txt` from its first preopened directory and prints `read: CONTENT`, then
/// writes `written by wasm` to `out.txt` there. Exits 3 if it cannot open `in.txt`, 2 if
/// it cannot create `out.txt` (a read-only volume).
pub fn files() -> Result<Vec<u8>> {
    module_with(
        r#"
  (import "wasi_snapshot_preview1" "path_open"
    (func $path_open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_read" (func $fd_read (param i32 i32 i32 i32) (result i32)))
"#,
        r#"
  (data (i32.const 64) "in.txt")
  (data (i32.const 80) "out.txt")
  (data (i32.const 96) "written by wasm\n")
  (data (i32.const 128) "read: ")
  (data (i32.const 144) "cannot open in.txt\n")
  (data (i32.const 176) "cannot write out.txt\n")
  (func (export "_start") (local $fd i32)
    ;; fd 3 is the first preopen; rights: FD_READ (2), FD_WRITE (64); oflags CREAT|TRUNC (9).
    (if (call $path_open (i32.const 3) (i32.const 0) (i32.const 64) (i32.const 6) (i32.const 0)
                         (i64.const 2) (i64.const 0) (i32.const 0) (i32.const 16))
      (then (call $out (i32.const 2) (i32.const 144) (i32.const 19)) (call $proc_exit (i32.const 3))))
    (local.set $fd (i32.load (i32.const 16)))
    (i32.store (i32.const 0) (i32.const 4096))
    (i32.store (i32.const 4) (i32.const 1024))
    (drop (call $fd_read (local.get $fd) (i32.const 0) (i32.const 1) (i32.const 8)))
    (call $out (i32.const 1) (i32.const 128) (i32.const 6))
    (call $out (i32.const 1) (i32.const 4096) (i32.load (i32.const 8)))
    (if (call $path_open (i32.const 3) (i32.const 0) (i32.const 80) (i32.const 7) (i32.const 9)
                         (i64.const 64) (i64.const 0) (i32.const 0) (i32.const 16))
      (then (call $out (i32.const 2) (i32.const 176) (i32.const 21)) (call $proc_exit (i32.const 2))))
    (local.set $fd (i32.load (i32.const 16)))
    (call $out (local.get $fd) (i32.const 96) (i32.const 16)))
"#,
    )
}

/// A module that imports a function no WASI host has (`env::host_magic`).
pub fn bad_import() -> Result<Vec<u8>> {
    module_with(r#"(import "env" "host_magic" (func $magic))"#, r#"(func (export "_start") (call $magic))"#)
}

/// A reactor: exports `_initialize` and no `_start`.
pub fn reactor() -> Result<Vec<u8>> {
    module(r#"(func (export "_initialize"))"#)
}

/// A WASI 0.2 command component: [`hello`] adapted with wasmtime's preview 1 command
/// adapter.
pub fn command_component() -> Result<Vec<u8>> {
    wit_component::ComponentEncoder::default()
        .module(&hello()?)?
        .adapter(
            wasi_preview1_component_adapter_provider::WASI_SNAPSHOT_PREVIEW1_ADAPTER_NAME,
            wasi_preview1_component_adapter_provider::WASI_SNAPSHOT_PREVIEW1_COMMAND_ADAPTER,
        )?
        .validate(true)
        .encode()
        .context("encoding the command component")
}

/// The WASI 0.2.12 packages the HTTP component is encoded against, in dependency order.
const WIT: [(&str, &str); 7] = [
    ("io.wit", include_str!("../wit/deps/io.wit")),
    ("clocks.wit", include_str!("../wit/deps/clocks.wit")),
    ("random.wit", include_str!("../wit/deps/random.wit")),
    ("filesystem.wit", include_str!("../wit/deps/filesystem.wit")),
    ("sockets.wit", include_str!("../wit/deps/sockets.wit")),
    ("cli.wit", include_str!("../wit/deps/cli.wit")),
    ("http.wit", include_str!("../wit/deps/http.wit")),
];

/// The core module of the HTTP component, in the canonical ABI. It answers every request
/// `200 hello from wasm http PATH`; a path starting `/tr` (`/trap`) traps and one starting
/// `/sp` (`/spin`) spins forever.
const HTTP_CORE: &str = r#"(module
  (import "wasi:http/types@0.2.12" "[method]incoming-request.path-with-query" (func $path (param i32 i32)))
  (import "wasi:http/types@0.2.12" "[resource-drop]incoming-request" (func $drop_req (param i32)))
  (import "wasi:http/types@0.2.12" "[constructor]fields" (func $fields (result i32)))
  (import "wasi:http/types@0.2.12" "[constructor]outgoing-response" (func $response (param i32) (result i32)))
  (import "wasi:http/types@0.2.12" "[method]outgoing-response.body" (func $body (param i32 i32)))
  (import "wasi:http/types@0.2.12" "[method]outgoing-body.write" (func $write (param i32 i32)))
  (import "wasi:http/types@0.2.12" "[static]response-outparam.set"
    (func $set (param i32 i32 i32 i32 i64 i32 i32 i32 i32)))
  (import "wasi:http/types@0.2.12" "[static]outgoing-body.finish" (func $finish (param i32 i32 i32 i32)))
  (import "wasi:io/streams@0.2.12" "[method]output-stream.blocking-write-and-flush"
    (func $write_flush (param i32 i32 i32 i32)))
  (import "wasi:io/streams@0.2.12" "[resource-drop]output-stream" (func $drop_stream (param i32)))
  (memory (export "memory") 1)
  (global $heap (mut i32) (i32.const 16384))
  (data (i32.const 1024) "hello from wasm http ")
  ;; A bump allocator: strings the host passes in (the path) land here.
  (func (export "cabi_realloc") (param i32 i32) (param $align i32) (param $size i32) (result i32)
    (local $p i32) (local $end i32)
    (local.set $p (i32.and (i32.add (global.get $heap) (i32.sub (local.get $align) (i32.const 1)))
                           (i32.sub (i32.const 0) (local.get $align))))
    (local.set $end (i32.add (local.get $p) (local.get $size)))
    (if (i32.gt_u (local.get $end) (i32.mul (memory.size) (i32.const 65536)))
      (then (drop (memory.grow (i32.add (i32.const 1)
        (i32.div_u (i32.sub (local.get $end) (i32.mul (memory.size) (i32.const 65536))) (i32.const 65536)))))))
    (global.set $heap (local.get $end))
    (local.get $p))
  (func (export "wasi:http/incoming-handler@0.2.12#handle") (param $req i32) (param $outparam i32)
    (local $resp i32) (local $body i32) (local $stream i32) (local $ptr i32) (local $len i32) (local $c i32)
    ;; option<string> at 64: tag at +0, pointer at +4, length at +8.
    (call $path (local.get $req) (i32.const 64))
    (if (i32.load8_u (i32.const 64))
      (then (local.set $ptr (i32.load (i32.const 68))) (local.set $len (i32.load (i32.const 72)))))
    (call $drop_req (local.get $req))
    ;; The two bytes after the slash: "tr" (/trap) traps, "sp" (/spin) spins.
    (if (i32.gt_u (local.get $len) (i32.const 2))
      (then
        (local.set $c (i32.load16_u (i32.add (local.get $ptr) (i32.const 1))))
        (if (i32.eq (local.get $c) (i32.const 0x7274)) (then unreachable))
        (if (i32.eq (local.get $c) (i32.const 0x7073)) (then (loop $spin (br $spin))))))
    (local.set $resp (call $response (call $fields)))
    ;; result<outgoing-body> at 80, result<output-stream> at 96: handle at +4.
    (call $body (local.get $resp) (i32.const 80))
    (local.set $body (i32.load (i32.const 84)))
    (call $write (local.get $body) (i32.const 96))
    (local.set $stream (i32.load (i32.const 100)))
    (call $set (local.get $outparam) (i32.const 0) (local.get $resp)
               (i32.const 0) (i64.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0))
    (memory.copy (i32.const 2048) (i32.const 1024) (i32.const 21))
    (memory.copy (i32.const 2069) (local.get $ptr) (local.get $len))
    (i32.store8 (i32.add (i32.const 2069) (local.get $len)) (i32.const 10))
    (call $write_flush (local.get $stream) (i32.const 2048) (i32.add (local.get $len) (i32.const 22)) (i32.const 112))
    (call $drop_stream (local.get $stream))
    (call $finish (local.get $body) (i32.const 0) (i32.const 0) (i32.const 128)))
)"#;

/// A `wasi:http/proxy` component answering `hello from wasm http PATH`.
pub fn http_component() -> Result<Vec<u8>> {
    let mut resolve = wit_parser::Resolve::default();
    for (name, text) in WIT {
        resolve.push_str(name, text).with_context(|| format!("parsing {name}"))?;
    }
    let pkg = resolve
        .push_str("world.wit", "package skiff:test;\nworld http-hello {\n  include wasi:http/proxy@0.2.12;\n}\n")
        .context("parsing the test world")?;
    let world = resolve.select_world(&[pkg], Some("http-hello"))?;
    let mut core = wat::parse_str(HTTP_CORE).context("assembling the HTTP core module")?;
    wit_component::embed_component_metadata(&mut core, &resolve, world, wit_component::StringEncoding::UTF8)?;
    wit_component::ComponentEncoder::default()
        .module(&core)?
        .validate(true)
        .encode()
        .context("encoding the HTTP component")
}

/// Writes a Wasm OCI artifact (CNCF layout: config `application/vnd.wasm.config.v0+json`,
/// one layer of `layer_type`, default `application/wasm`) as an OCI layout naming it
/// `name`. Returns the manifest digest.
pub fn write_artifact_layout(
    dir: &std::path::Path,
    name: &str,
    module: &[u8],
    layer_type: Option<&str>,
) -> Result<String> {
    use sha2::{Digest, Sha256};
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs)?;
    let put = |b: &[u8]| -> Result<(String, usize)> {
        let hex = hex::encode(Sha256::digest(b));
        std::fs::write(blobs.join(&hex), b)?;
        Ok((format!("sha256:{hex}"), b.len()))
    };
    let (ld, ls) = put(module)?;
    let os = match skiff_model::WasmKind::detect(module) {
        Some(k) => k.artifact_os(),
        None => "wasip1",
    };
    let config = serde_json::json!({
        "created": "2026-01-01T00:00:00Z", "architecture": "wasm", "os": os, "layerDigests": [ld],
    });
    let (cd, cs) = put(&serde_json::to_vec(&config)?)?;
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "artifactType": "application/wasm",
        "config": {"mediaType": "application/vnd.wasm.config.v0+json", "digest": cd, "size": cs},
        "layers": [{"mediaType": layer_type.unwrap_or("application/wasm"), "digest": ld, "size": ls}],
    });
    let (md, ms) = put(&serde_json::to_vec(&manifest)?)?;
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": md, "size": ms,
        "annotations": {"io.containerd.image.name": name, "org.opencontainers.image.ref.name": name},
    }]});
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&index)?)?;
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    Ok(md)
}

/// Writes `bytes` to `dir/name` and returns the path.
pub fn write(dir: &std::path::Path, name: &str, bytes: &[u8]) -> Result<std::path::PathBuf> {
    let p = dir.join(name);
    std::fs::write(&p, bytes)?;
    Ok(p)
}
