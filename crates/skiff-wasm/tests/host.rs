//! The host in-process: programs built from WAT, run to their end, their output captured.
//! No root needed.
#![allow(clippy::unwrap_used)] // tests may panic on setup failures

use skiff_testkit::wasm;
use skiff_wasm::{Outcome, Output, Preopen, Spec, WasmError};
use std::io::{Read, Write};
use std::path::Path;
use std::sync::{Arc, Mutex};

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

fn spec(dir: &Path, name: &str, bytes: &[u8]) -> Spec {
    let module = wasm::write(dir, name, bytes).unwrap();
    let id = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(bytes));
    Spec {
        module,
        module_id: id,
        cache_dir: dir.join("cache"),
        argv: vec![name.to_string(), "a".into(), "b".into()],
        env: vec![("GREETING".into(), "hi".into())],
        ..Default::default()
    }
}

fn run(s: &Spec) -> (Outcome, String, String) {
    let (out, err) = (Captured::default(), Captured::default());
    let o = skiff_wasm::prepare(s).unwrap().run(Output::new(out.clone()), Output::new(err.clone()));
    (o, out.text(), err.text())
}

#[test]
fn a_command_prints_its_arguments_and_environment_and_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    let (o, out, err) = run(&spec(dir.path(), "hello.wasm", &wasm::hello().unwrap()));
    assert_eq!(o, Outcome { code: 0, oom: false, message: None });
    assert_eq!(out, "hello from wasm\nargs: hello.wasm a b\nenv: GREETING=hi\n");
    assert_eq!(err, "to stderr\n");
}

#[test]
fn proc_exit_is_the_exit_code() {
    let dir = tempfile::tempdir().unwrap();
    let (o, out, _) = run(&spec(dir.path(), "exit.wasm", &wasm::exit_with(3).unwrap()));
    assert_eq!((o.code, o.oom), (3, false));
    assert_eq!(out, "exiting with 3\n");
}

#[test]
fn growing_past_the_memory_limit_traps_with_a_message() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = spec(dir.path(), "grow.wasm", &wasm::grow(64).unwrap());
    let (o, out, _) = run(&s);
    assert_eq!(o.code, 0, "{o:?}");
    assert_eq!(out, "growing memory\ngrew by 64 pages\n");
    s.memory_bytes = Some(1 << 20);
    let (o, out, _) = run(&s);
    assert_eq!((o.code, o.oom), (137, true), "{o:?}");
    let msg = o.message.unwrap();
    assert!(msg.starts_with("memory limit of 1Mi reached: a linear memory asked to grow"), "{msg}");
    assert_eq!(out, "growing memory\n");
}

#[test]
fn an_initial_memory_above_the_limit_fails_at_instantiation() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = spec(dir.path(), "hello.wasm", &wasm::hello().unwrap());
    s.memory_bytes = Some(32 << 10);
    let (o, out, _) = run(&s);
    assert_eq!((o.code, o.oom), (137, true), "{o:?}");
    assert!(out.is_empty());
}

#[test]
fn a_busy_loop_is_stopped_by_its_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = spec(dir.path(), "busy.wasm", &wasm::busy().unwrap());
    s.timeout_ms = Some(300);
    let (o, out, _) = run(&s);
    assert_eq!(o, Outcome { code: 124, oom: false, message: Some("timed out after 300ms (wasm.timeout)".into()) });
    assert_eq!(out, "burning cpu\n");
}

#[test]
fn a_sleeping_command_is_stopped_by_its_timeout_too() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = spec(dir.path(), "idle.wasm", &wasm::idle().unwrap());
    s.timeout_ms = Some(1000);
    assert_eq!(run(&s).0.code, 124);
}

#[test]
fn the_second_start_loads_the_compiled_artifact_and_a_damaged_one_is_recompiled() {
    let dir = tempfile::tempdir().unwrap();
    let s = spec(dir.path(), "hello.wasm", &wasm::hello().unwrap());
    assert!(!skiff_wasm::prepare(&s).unwrap().cached);
    assert!(skiff_wasm::prepare(&s).unwrap().cached);
    let artifacts: Vec<_> = std::fs::read_dir(&s.cache_dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "cwasm"))
        .collect();
    assert_eq!(artifacts.len(), 1);
    let name = artifacts[0].file_name().unwrap().to_string_lossy().into_owned();
    assert!(name.starts_with(&format!("{}-", s.module_id)), "{name}");
    // One flipped byte: the checksum catches it, the artifact is compiled again.
    let mut bytes = std::fs::read(&artifacts[0]).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&artifacts[0], &bytes).unwrap();
    let p = skiff_wasm::prepare(&s).unwrap();
    assert!(!p.cached);
    let (o, out, _) = run(&s);
    assert_eq!((o.code, out.lines().next()), (0, Some("hello from wasm")));
    // Another engine configuration is another key: both artifacts are kept.
    let mut pooled = s.clone();
    pooled.pool = Some(2);
    pooled.memory_bytes = Some(1 << 20);
    assert!(!skiff_wasm::prepare(&pooled).unwrap().cached);
    assert_eq!(
        std::fs::read_dir(&s.cache_dir)
            .unwrap()
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "cwasm"))
            .count(),
        2
    );
    // Pruning for the default engine keeps its artifact only.
    let engine_id = skiff_wasm::engine::id(&skiff_wasm::engine::engine(None, None).unwrap());
    let cache = skiff_wasm::cache::Cache::open(&s.cache_dir).unwrap();
    assert!(cache.prune(|| Some(engine_id.clone()), |_| true) > 0);
    assert!(cache.artifact_path(&s.module_id, &engine_id).exists());
    assert!(skiff_wasm::prepare(&s).unwrap().cached);
    cache.prune(|| Some(engine_id.clone()), |_| false);
    assert!(skiff_wasm::prepare(&s).unwrap().cached, "just compiled: kept (it may be for an apply in flight)");
    let old = std::time::SystemTime::now() - skiff_wasm::cache::MIN_AGE * 2;
    for e in std::fs::read_dir(&s.cache_dir).unwrap().flatten() {
        std::fs::File::options().write(true).open(e.path()).unwrap().set_modified(old).unwrap();
    }
    cache.prune(|| Some(engine_id.clone()), |_| false);
    assert!(!skiff_wasm::prepare(&s).unwrap().cached);
}

fn prepare_err(name: &str, bytes: &[u8]) -> String {
    let dir = tempfile::tempdir().unwrap();
    match skiff_wasm::prepare(&spec(dir.path(), name, bytes)) {
        Ok(_) => panic!("{name} was accepted"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn bad_programs_are_refused_before_anything_runs_and_the_error_names_the_problem() {
    let e = prepare_err("garbage.wasm", b"#!/bin/sh\necho not wasm\n");
    assert!(e.ends_with("garbage.wasm is not a WebAssembly binary (no \\0asm module or component header)"), "{e}");
    let e = prepare_err("truncated.wasm", b"\0asm\x01\0\0\0\x01\x05");
    assert!(e.starts_with("invalid WebAssembly in "), "{e}");
    let e = prepare_err("import.wasm", &wasm::bad_import().unwrap());
    assert!(e.starts_with("unsupported imports: env::host_magic (the wasm runtime provides WASI preview 1"), "{e}");
    let e = prepare_err("reactor.wasm", &wasm::reactor().unwrap());
    assert_eq!(e, "the module exports no _start function: it is a WASI reactor (a library), not a command");
    let e = skiff_wasm::check(Path::new("/nonexistent/x.wasm"), "00", &tempfile::tempdir().unwrap().path().join("c"));
    assert!(matches!(e, Err(WasmError::Io { op: "read", .. })), "{e:?}");
}

#[test]
fn preopened_directories_are_readable_and_writable_unless_read_only() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    std::fs::write(data.join("in.txt"), "from the host\n").unwrap();
    let mut s = spec(dir.path(), "files.wasm", &wasm::files().unwrap());
    s.preopens = vec![Preopen { host: data.clone(), guest: "/data".into(), read_only: false }];
    let (o, out, _) = run(&s);
    assert_eq!(o.code, 0, "{o:?}");
    assert_eq!(out, "read: from the host\n");
    assert_eq!(std::fs::read_to_string(data.join("out.txt")).unwrap(), "written by wasm\n");
    std::fs::remove_file(data.join("out.txt")).unwrap();
    s.preopens[0].read_only = true;
    let (o, _, err) = run(&s);
    assert_eq!(o.code, 2, "{o:?}");
    assert_eq!(err, "cannot write out.txt\n");
    assert!(!data.join("out.txt").exists());
}

#[test]
fn a_preview2_command_component_runs_like_the_module_it_was_adapted_from() {
    let dir = tempfile::tempdir().unwrap();
    let s = spec(dir.path(), "hello.component.wasm", &wasm::command_component().unwrap());
    let p = skiff_wasm::prepare(&s).unwrap();
    assert_eq!(p.program().describe(), "WASI 0.2 command component");
    let (o, out, err) = run(&s);
    assert_eq!(o.code, 0, "{o:?}");
    assert_eq!(out, "hello from wasm\nargs: hello.component.wasm a b\nenv: GREETING=hi\n");
    assert_eq!(err, "to stderr\n");
}

fn get(port: u16, path: &str) -> String {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(20))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").unwrap();
    let mut r = String::new();
    s.read_to_string(&mut r).unwrap();
    r
}

#[test]
fn an_http_component_answers_each_request_from_a_fresh_instance() {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut s = spec(dir.path(), "http.wasm", &wasm::http_component().unwrap());
    s.http_ports = vec![port];
    s.timeout_ms = Some(500);
    s.pool = Some(4);
    let p = skiff_wasm::prepare(&s).unwrap();
    assert_eq!(p.program().describe(), "WASI 0.2 HTTP component (wasi:http/proxy)");
    let err = Captured::default();
    let e2 = err.clone();
    // Serves until the test process ends.
    std::thread::spawn(move || p.run(Output::new(std::io::sink()), Output::new(e2)));
    for path in ["/", "/hello?x=1", "/there", "/t"] {
        let r = get(port, path);
        assert!(r.starts_with("HTTP/1.1 200 OK"), "{r}");
        assert!(r.contains(&format!("hello from wasm http {path}\n")), "{r}");
    }
    assert!(get(port, "/trap").starts_with("HTTP/1.1 500"));
    assert!(get(port, "/spin").starts_with("HTTP/1.1 504"));
    // And it goes on serving.
    assert!(get(port, "/after").contains("hello from wasm http /after\n"));
    let log = err.text();
    assert!(log.contains("GET /trap: no response: wasm trap: wasm `unreachable` instruction executed"), "{log}");
    assert!(log.contains("GET /spin: no response within 500ms (wasm.timeout)"), "{log}");
}
