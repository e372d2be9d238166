//! WebAssembly workloads end to end: a real `skiff up`, real shims running wasmtime, real
//! network namespaces and the agent's port proxy, a real registry (docker-registry) for
//! OCI wasm images. The programs are built from WAT at test time (`skiff_testkit::wasm`).
//! They need root; elsewhere they skip with a reason.

#![allow(clippy::unwrap_used)] // tests may panic on setup failures

mod common;

use anyhow::Context;
use common::{free_port, http_get, wait_for, Node};
use skiff_model::{InstanceState, InstanceStatus};
use skiff_testkit::{require_privileged, wasm};
use std::path::PathBuf;
use std::time::{Duration, Instant};

type R = anyhow::Result<()>;
const SEC: Duration = Duration::from_secs(1);

/// Writes a test program into the node's data directory; returns its path.
fn program(n: &Node, name: &str, bytes: anyhow::Result<Vec<u8>>) -> anyhow::Result<String> {
    Ok(wasm::write(n.data(), name, &bytes?)?.display().to_string())
}

fn ended(i: &InstanceStatus) -> bool {
    matches!(i.state, InstanceState::Exited | InstanceState::Failed)
}

/// Where the instance's shim writes (shim.log, container.log, exit.json) once it runs as
/// the instance's own unprivileged user.
fn bundle(n: &Node, i: &InstanceStatus) -> PathBuf {
    n.data().join("wasm/instances").join(&i.container_id).join("state")
}

/// CPU time (user + system) a process has used.
fn cpu_time(pid: i32) -> anyhow::Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let (ticks, _) = skiff_runtime::procfs::parse_stat(&stat).context("parsing /proc/PID/stat")?;
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)?.unwrap_or(100) as f64;
    Ok(Duration::from_secs_f64(ticks as f64 / hz))
}

#[test]
fn a_wasm_file_runs_with_its_output_in_the_logs_its_exit_code_and_restart_policy_and_its_volumes() -> R {
    require_privileged!();
    let mut n = Node::bare()?;
    n.up(None)?;
    let hello = program(&n, "hello.wasm", wasm::hello())?;
    let out = n.cli(&["run", &hello, "--name", "hello", "-e", "GREETING=hi", "--", "a", "b"])?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("hello.wasm: WASI preview 1 command module, stored as localhost/wasm/hello:"), "{said}");
    let i = n.wait_instance("hello-1", 30 * SEC, "exited", ended)?;
    assert_eq!((i.state, i.exit_code), (InstanceState::Exited, Some(0)), "{i:?}");
    let logs = n.cli(&["logs", "hello-1"])?;
    assert_eq!(String::from_utf8_lossy(&logs.stdout), "hello from wasm\nargs: hello a b\nenv: GREETING=hi\n");
    assert_eq!(String::from_utf8_lossy(&logs.stderr), "to stderr\n");

    // The next start is handed to a spare shim, started ahead of need and waiting.
    let spares = || -> Vec<i32> {
        let mark = format!("shim\0--spare\0{}", n.data().join("wasm/instances").display());
        std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_string_lossy().parse::<i32>().ok())
            .filter(|pid| {
                std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| String::from_utf8_lossy(&c).contains(&mark))
            })
            .collect()
    };
    let spare = wait_for(10 * SEC, "a spare shim", || spares().first().copied())?;
    // Exit codes and restart policies as for containers: on-failure:2 gives up after two restarts.
    let exit3 = program(&n, "exit3.wasm", wasm::exit_with(3))?;
    n.ok(&["run", &exit3, "--name", "three", "--restart", "on-failure:2"])?;
    let i = n.wait_instance("three-1", 60 * SEC, "given up after 2 restarts", |i| ended(i) && i.restarts == 2)?;
    assert_eq!(i.exit_code, Some(3));
    assert_eq!(n.ok(&["logs", "three-1"])?.matches("exiting with 3\n").count(), 3);
    let events = n.events()?;
    assert!(events.iter().any(|e| e.object == "three-1" && e.message.contains("exited with code 3")));
    let first = events.iter().find(|e| e.object == "three-1" && e.reason == "Started").unwrap();
    assert_eq!(first.message, format!("pid {spare}"), "three-1 ran in the spare shim");

    // The compile cache: `skiff run` compiled the module once; each of the three starts
    // loaded that artifact.
    let id = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(std::fs::read(&exit3)?));
    let artifacts: Vec<_> = std::fs::read_dir(n.data().join("wasm/cache"))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|f| f.starts_with(&id) && f.ends_with(".cwasm"))
        .collect();
    assert_eq!(artifacts.len(), 1, "{artifacts:?}");
    let shim_log = std::fs::read_to_string(bundle(&n, &i).join("shim.log"))?;
    assert_eq!(
        shim_log.matches("WASI preview 1 command module loaded from the compile cache").count(),
        3,
        "{shim_log}"
    );
    assert!(!shim_log.contains("compiled"), "{shim_log}");

    // Volumes are preopened directories, read-only when asked. Outside the data directory
    // (the node's policy refuses binding that), and writable by the program's user: it
    // runs unprivileged.
    let outside = tempfile::tempdir()?;
    let host = outside.path().join("files");
    std::fs::create_dir(&host)?;
    std::fs::write(host.join("in.txt"), "from the host\n")?;
    use std::os::unix::fs::PermissionsExt;
    for (p, mode) in [(outside.path(), 0o755), (host.as_path(), 0o777), (&host.join("in.txt"), 0o644)] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))?;
    }
    let files = program(&n, "files.wasm", wasm::files())?;
    let vol = format!("{}:/data", host.display());
    n.ok(&["run", &files, "--name", "rw", "-v", &vol])?;
    let i = n.wait_instance("rw-1", 30 * SEC, "exited", ended)?;
    assert_eq!(i.exit_code, Some(0), "{i:?}");
    assert_eq!(n.ok(&["logs", "rw-1"])?, "read: from the host\n");
    assert_eq!(std::fs::read_to_string(host.join("out.txt"))?, "written by wasm\n");
    std::fs::remove_file(host.join("out.txt"))?;
    n.ok(&["run", &files, "--name", "ro", "-v", &format!("{vol}:ro")])?;
    let i = n.wait_instance("ro-1", 30 * SEC, "exited", ended)?;
    assert_eq!(i.exit_code, Some(2), "{i:?}");
    assert!(!host.join("out.txt").exists());
    Ok(())
}

#[test]
fn memory_cpu_and_time_limits_hold() -> R {
    require_privileged!();
    let mut n = Node::bare()?;
    n.up(None)?;
    // --memory caps linear memory: growing past it traps, reported as an OOM kill.
    let grow = program(&n, "grow.wasm", wasm::grow(64))?;
    n.ok(&["run", &grow, "--name", "grow", "--memory", "1m"])?;
    let i = n.wait_instance("grow-1", 30 * SEC, "stopped by its memory limit", ended)?;
    assert!(i.oom_killed, "{i:?}");
    assert_eq!(i.exit_code, Some(137));
    let msg = i.message.unwrap_or_default();
    assert!(msg.contains("memory limit of 1Mi reached: a linear memory asked to grow"), "{msg}");
    assert!(n.events()?.iter().any(|e| e.object == "grow-1" && e.reason == "OOMKilled"));
    // Without the limit the same program gets its 4 MiB.
    n.ok(&["run", &grow, "--name", "free"])?;
    assert_eq!(n.wait_instance("free-1", 30 * SEC, "exited", ended)?.exit_code, Some(0));

    // --wasm-timeout ends even a loop that never calls the host.
    let busy = program(&n, "busy.wasm", wasm::busy())?;
    n.ok(&["run", &busy, "--name", "late", "--wasm-timeout", "1s"])?;
    let i = n.wait_instance("late-1", 30 * SEC, "timed out", ended)?;
    assert_eq!(i.exit_code, Some(124), "{i:?}");
    assert!(i.message.unwrap_or_default().contains("timed out after 1s (wasm.timeout)"));

    // --cpus: a busy loop gets its share of one core and no more, measured from the
    // process's own CPU accounting.
    n.ok(&["run", &busy, "--name", "burn", "--cpus", "0.2"])?;
    let pid = n.wait_running("burn-1")?.pid.unwrap();
    std::thread::sleep(SEC);
    let (c0, t0) = (cpu_time(pid)?, Instant::now());
    std::thread::sleep(4 * SEC);
    let share = (cpu_time(pid)? - c0).as_secs_f64() / t0.elapsed().as_secs_f64();
    assert!(share <= 0.2 * 1.25, "the busy loop used {share:.3} of a core with --cpus 0.2");
    assert!(share >= 0.05, "the busy loop hardly ran: {share:.3} of a core");
    Ok(())
}

#[test]
fn a_wasm_workload_outlives_the_agent_and_an_http_component_serves_its_published_port() -> R {
    require_privileged!();
    let mut n = Node::bare()?;
    n.up(None)?;
    let ticker = program(&n, "ticker.wasm", wasm::ticker(200))?;
    n.ok(&["run", &ticker, "--name", "tick", "--restart", "always"])?;
    let http = program(&n, "http.wasm", wasm::http_component())?;
    let port = free_port();
    let out = n.cli(&["run", &http, "--name", "web", "--replicas", "2", "-p", &format!("{port}:8080")])?;
    assert!(String::from_utf8_lossy(&out.stderr).contains("WASI 0.2 HTTP component (wasi:http/proxy)"));
    let tick = n.wait_running("tick-1")?;
    let webs = [n.wait_running("web-1")?, n.wait_running("web-2")?];
    // Through the agent's proxy to the instances' own addresses, once they are ready.
    let body =
        wait_for(30 * SEC, "the component to answer", || http_get(port, "/hello?x=1").ok().filter(|b| !b.is_empty()))?;
    assert_eq!(body, "hello from wasm http /hello?x=1\n");
    for w in &webs {
        let ip = w.ip.as_deref().context("an instance address")?;
        assert!(ip.starts_with(n.subnet.rsplit_once('.').unwrap().0), "{ip} on {}", n.subnet);
    }
    // A trap is a 500 for that request; the server goes on.
    assert_eq!(http_get(port, "/trap")?, "internal server error\n");
    assert_eq!(http_get(port, "/after")?, "hello from wasm http /after\n");
    assert!(n.ok(&["logs", "web"])?.is_empty(), "errors go to stderr");
    let errs = String::from_utf8_lossy(&n.cli(&["logs", "web"])?.stderr).into_owned();
    assert!(errs.contains("GET /trap: no response: wasm trap: wasm `unreachable` instruction executed"), "{errs}");
    // There is nothing to exec into.
    let out = n.cli(&["exec", "tick-1", "--", "ls"])?;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("a WebAssembly instance has no shell"));

    // The agent dies (SIGKILL): the shims run on; when it comes back it adopts them.
    n.kill_up()?;
    let ticks = n.data().join("wasm/instances").join(&tick.container_id).join("state/container.log");
    let before = std::fs::read_to_string(&ticks)?.lines().count();
    wait_for(10 * SEC, "ticks while the agent is away", || {
        (std::fs::read_to_string(&ticks).ok()?.lines().count() > before + 3).then_some(())
    })?;
    n.up(None)?;
    let again = n.wait_running("tick-1")?;
    assert_eq!((again.pid, again.restarts), (tick.pid, 0), "the same process, never restarted");
    for w in &webs {
        let now = n.wait_running(&w.name)?;
        assert_eq!((now.pid, now.restarts), (w.pid, 0), "{} was restarted", w.name);
    }
    wait_for(30 * SEC, "the port to answer again", || http_get(port, "/back").ok().filter(|b| !b.is_empty()))?;
    assert!(!n.events()?.iter().any(|e| e.reason == "Restarted" || e.reason == "Lost"));
    Ok(())
}

#[test]
fn bad_programs_and_bad_input_are_refused_with_nothing_stored() -> R {
    require_privileged!();
    let mut n = Node::new()?;
    n.up(None)?;
    let err = |args: &[&str]| -> anyhow::Result<String> {
        let out = n.cli(args)?;
        assert!(!out.status.success(), "skiff {} was accepted", args.join(" "));
        Ok(String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let garbage = program(&n, "garbage.wasm", Ok(b"#!/bin/sh\necho hi\n".to_vec()))?;
    assert!(err(&["run", &garbage])?.contains("garbage.wasm: not a WebAssembly binary"));
    let bad = program(&n, "bad.wasm", wasm::bad_import())?;
    let e = err(&["run", &bad])?;
    assert!(e.contains("bad.wasm: unsupported imports: env::host_magic"), "{e}");
    let reactor = program(&n, "reactor.wasm", wasm::reactor())?;
    let e = err(&["run", &reactor])?;
    assert!(e.contains("exports no _start function: it is a WASI reactor (a library), not a command"), "{e}");
    let truncated = program(&n, "cut.wasm", Ok(wasm::hello()?[..40].to_vec()))?;
    assert!(err(&["run", &truncated])?.contains("invalid WebAssembly in"));
    let hello = program(&n, "hello.wasm", wasm::hello())?;
    assert!(err(&["run", &hello, "--runtime", "oci"])?.contains("it runs with --runtime wasm"));
    assert!(err(&["run", &hello, "--user", "1000"])?.contains("user: is not supported by the wasm runtime"));
    assert!(err(&["run", &hello, "--wasm-timeout", "soon"])?.contains("--wasm-timeout: \"soon\" is not a duration"));
    assert!(
        err(&["run", &hello, "--runtime", "wasm", "--wasm-pool", "0"])?.contains("wasm.pool: 0 is outside 1..=1000")
    );
    assert!(err(&["run", "missing.wasm"])?.contains("missing.wasm: no such file"));
    assert!(
        err(&["run", common::IMAGE, "--runtime", "crun"])?.contains("--runtime: \"crun\" is not oci, runsc or wasm")
    );
    // A container image is no WebAssembly program: the apply is refused, naming the field.
    let f = n.write(
        "wrong.yaml",
        &format!("services:\n  box:\n    image: {}\n    x-skiff-runtime: wasm\n", common::IMAGE),
    )?;
    let e = err(&["apply", "-f", f.to_str().unwrap()])?;
    assert!(e.contains("deployments.box.image: image localhost/skiff-test:1 has no manifest for wasi/wasm"), "{e}");
    // Nothing was stored: no deployment, no wasm image.
    assert_eq!(n.ok(&["get", "deployments", "-o", "json"])?.trim(), "[]");
    assert!(!n.ok(&["image", "ls"])?.contains("localhost/wasm/"));
    Ok(())
}

#[test]
fn oci_wasm_images_run_from_a_registry_and_move_offline_as_a_bundle() -> R {
    require_privileged!();
    skiff_testkit::require_registry_tools!();
    let reg = skiff_testkit::registry::Registry::start()?;
    let tmp = tempfile::tempdir()?;
    let layout = |name: &str| tmp.path().join(name);
    wasm::write_artifact_layout(&layout("hello"), "hello", &wasm::hello()?, None)?;
    reg.push(&layout("hello"), "wasm/hello:1")?;
    let p2 = wasm::command_component()?;
    wasm::write_artifact_layout(&layout("p2"), "p2", &p2, Some("application/vnd.wasm.content.layer.v1+wasm"))?;
    reg.push(&layout("p2"), "wasm/p2:1")?;
    let images = [skiff_testkit::ImageBuilder::busybox()?, skiff_testkit::ImageBuilder::wasi(&wasm::hello()?)?];
    skiff_testkit::ImageBuilder::write_multi_arch_layout(&layout("multi"), "multi", &images)?;
    reg.push(&layout("multi"), "wasm/multi:1")?;
    let port = reg.port;
    let r = |name: &str| format!("127.0.0.1:{port}/wasm/{name}");

    // One compose file: a CNCF artifact, an older artifact type holding a 0.2 component,
    // and one multi-platform image run both as a WASI program and as a container.
    let mut n = Node::bare()?;
    n.up_compose(&format!(
        "name: edge\nservices:\n  \
           artifact:\n    image: {}\n    x-skiff-runtime: wasm\n    command: [x, y]\n  \
           component:\n    image: {}\n    runtime: io.containerd.wasmtime.v1\n  \
           wasi:\n    image: {}\n    platform: wasi/wasm\n    command: [one]\n  \
           container:\n    image: {}\n    command: [echo, from a container]\n",
        r("hello:1"),
        r("p2:1"),
        r("multi:1"),
        r("multi:1"),
    ))?;
    for (inst, want) in [
        ("artifact-1", "hello from wasm\nargs: hello x y\nenv: \n"),
        ("component-1", "hello from wasm\nargs: p2\nenv: \n"),
        ("wasi-1", "hello from wasm\nargs: /app.wasm one\nenv: \n"),
        ("container-1", "from a container\n"),
    ] {
        let i = n.wait_instance(inst, 60 * SEC, "exited", ended)?;
        assert_eq!(i.exit_code, Some(0), "{i:?}");
        assert_eq!(n.ok(&["logs", inst])?, want, "{inst}");
    }
    let ls = n.ok(&["image", "ls"])?;
    assert!(ls.lines().any(|l| l.contains("wasm/hello:1") && l.contains("wasip1/wasm")), "{ls}");

    // Moved without a network: saved here, loaded on another node with the registry gone.
    let tar = tmp.path().join("bundle.tar");
    n.ok(&["image", "save", &r("hello:1"), &r("p2:1"), "-o", tar.to_str().unwrap()])?;
    drop(reg);
    let mut m = Node::bare()?;
    m.ok(&["image", "load", tar.to_str().unwrap()])?;
    m.up(None)?;
    m.ok(&["run", &r("p2:1"), "--runtime", "wasm", "--name", "offline", "--", "a"])?;
    let i = m.wait_instance("offline-1", 60 * SEC, "exited", ended)?;
    assert_eq!(i.exit_code, Some(0), "{i:?}");
    assert_eq!(m.ok(&["logs", "offline-1"])?, "hello from wasm\nargs: p2 a\nenv: \n");
    Ok(())
}
