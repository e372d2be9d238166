//! A node attacked the ways a stolen device, a hostile image or a local user would attack
//! it: every test runs the real `skiff up` (real runc, overlayfs, cgroups) and tries the
//! attack for real — a static probe making the system calls Docker forbids, an
//! unprivileged local user going after the data directory, images whose `/etc/passwd` is
//! `/dev/zero` or a FIFO, a workload that asks for the host's root, a corrupt `agent.db`.

#![allow(clippy::unwrap_used)] // tests may panic on setup failures

mod common;

use anyhow::Context;
use common::{wait_for, Node, IMAGE};
use skiff_model::{InstanceState, InstanceStatus};
use skiff_testkit::{require_privileged, wasm, ImageBuilder, LayerBuilder};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

type R = anyhow::Result<()>;
const SEC: Duration = Duration::from_secs(1);

fn failed(i: &InstanceStatus) -> bool {
    matches!(i.state, InstanceState::Failed | InstanceState::Exited | InstanceState::Restarting)
}

/// Runs `argv` as the unprivileged local user `nobody`; whether it succeeded, and stderr.
/// Through a shell: setpriv keeps its capabilities until its own exec, so the path of
/// `argv[0]` must be resolved by a process that has none.
fn as_nobody(argv: &[&str]) -> (bool, String) {
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--", "/bin/sh", "-c", "exec \"$0\" \"$@\""])
        .args(argv)
        .output()
        .expect("setpriv (util-linux)");
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// A probe that makes the calls Docker's profile denies, and those every workload needs,
/// each answered `ok` or `errno N` — inside a container under the default filter.
#[test]
fn the_seccomp_filter_denies_what_docker_denies_and_lets_workloads_run() -> R {
    require_privileged!();
    let mut n = Node::new()?;
    let probe = skiff_testkit::seccomp_probe()?;
    let img = ImageBuilder::busybox()?.layer(LayerBuilder::new().file("probe", 0o755, &probe)?.finish()?);
    n.load(&img, "localhost/probe:1")?;
    n.up(None)?;
    n.ok(&["run", "localhost/probe:1", "--name", "probe", "--restart", "no", "--", "/probe"])?;
    n.wait_instance("probe-1", 30 * SEC, "exited", failed)?;
    let out = n.ok(&["logs", "probe-1"])?;
    let result = |call: &str| {
        out.lines().find_map(|l| l.strip_prefix(&format!("{call} "))).map(str::to_string).unwrap_or_default()
    };
    // EPERM (1) is the filter's answer, ENOSYS (38) runc's for calls newer than its
    // libseccomp; a call the kernel refused by itself, or allowed, would say otherwise.
    for denied in [
        "io_uring_setup",
        "socket_af_vsock",
        "socket_af_alg",
        "personality_read_implies_exec",
        "fanotify_init",
        "lsm_list_modules",
        "unshare_user",
    ] {
        // EPERM from the profile; ENOSYS from runc's stub for a call newer than libseccomp.
        let r = result(denied);
        assert!(r == "errno 1" || r == "errno 38", "{denied} must be denied by the filter ({r}):\n{out}");
    }
    for allowed in ["getpid", "socket_af_inet", "personality_query", "fork_wait", "write_tmp"] {
        assert_eq!(result(allowed), "ok", "{allowed} must work:\n{out}");
    }
    // A normal workload (a shell, a server) still runs under the filter.
    n.ok(&["run", IMAGE, "--name", "web", "--", "httpd", "-f", "-p", "80", "-h", "/www"])?;
    n.wait_running("web-1")?;
    assert_eq!(n.ok(&["exec", "web-1", "--", "sh", "-c", "echo $((6 * 7))"])?.trim(), "42");
    let page = n.ok(&["exec", "web-1", "--", "wget", "-q", "-O", "-", "http://127.0.0.1/"])?;
    assert_eq!(page, "hello from skiff\n", "a server answers under the filter");
    Ok(())
}

/// A local user on the device (`nobody`) goes after the data directory: the stores with
/// their environment secrets, a bundle's spec, the log, and a setuid-root binary an image
/// unpacked into the store.
#[test]
fn a_local_user_reads_no_secret_and_runs_no_setuid_file_from_the_data_directory() -> R {
    require_privileged!();
    let mut n = Node::new()?;
    let sh = std::fs::read("/bin/busybox")?;
    let img = ImageBuilder::busybox()?.layer(LayerBuilder::new().file("suid-sh", 0o4755, &sh)?.finish()?);
    n.load(&img, "localhost/suid:1")?;
    n.up(None)?;
    n.ok(&["run", "localhost/suid:1", "--name", "app", "-e", "API_SECRET=hunter2", "--", "sleep", "1000"])?;
    let app = n.wait_running("app-1")?;
    let data = n.data();
    let bundle = data.join("instances").join(&app.container_id);
    let setuid = std::fs::read_dir(data.join("images/layers"))?
        .flatten()
        .map(|e| e.path().join("suid-sh"))
        .find(|p| p.exists())
        .expect("the setuid file is in the store");
    assert_eq!(std::fs::metadata(&setuid)?.permissions().mode() & 0o4000, 0o4000, "kept setuid for the container");
    for secret in [data.join("agent.db"), data.join("hub.db"), data.join("admin.conf"), bundle.join("config.json")] {
        let (ok, err) = as_nobody(&["cat", secret.to_str().unwrap()]);
        assert!(!ok, "nobody read {}", secret.display());
        assert!(err.contains("Permission denied"), "{}: {err}", secret.display());
    }
    let (ok, err) = as_nobody(&[setuid.to_str().unwrap(), "-c", "id"]);
    assert!(!ok && err.contains("Permission denied"), "nobody ran the setuid binary: {err}");
    let (ok, _) = as_nobody(&["ls", data.to_str().unwrap()]);
    assert!(!ok, "the data directory is not listable");
    let mode = std::fs::metadata(data)?.permissions().mode() & 0o777;
    assert_eq!(mode, 0o711);
    // Inside, the container's own users are unaffected by the agent's restrictive umask.
    n.ok(&["run", IMAGE, "--name", "unpriv", "-u", "65534", "--", "sleep", "1000"])?;
    n.wait_running("unpriv-1")?;
    let hosts = n.ok(&["exec", "unpriv-1", "--", "cat", "/etc/hosts"])?;
    assert!(hosts.contains("unpriv-1"), "{hosts}");
    assert!(n.ok(&["exec", "unpriv-1", "--", "ls", "/"])?.contains("bin"));
    Ok(())
}

/// Images whose account files lead the agent astray: `/etc/passwd` a link to the host's
/// `/dev/zero` (read it on the host and the agent's memory is gone), `/etc/group` a FIFO
/// (open it and a start hangs for ever). Both fail at once with a reason, and the node
/// goes on.
#[test]
fn a_hostile_image_cannot_make_the_agent_read_forever_or_hang() -> R {
    require_privileged!();
    let mut n = Node::new()?;
    let zero = ImageBuilder::busybox()?.layer(LayerBuilder::new().symlink("etc/passwd", "/dev/zero")?.finish()?);
    n.load(&zero, "localhost/zero:1")?;
    let fifo = ImageBuilder::busybox()?.layer(LayerBuilder::new().fifo("etc/group")?.finish()?);
    n.load(&fifo, "localhost/fifo:1")?;
    n.up(None)?;
    n.ok(&["run", "localhost/zero:1", "--name", "zero", "-u", "app", "--restart", "no", "--", "true"])?;
    let z = n.wait_instance("zero-1", 30 * SEC, "failed", |i| i.state == InstanceState::Failed)?;
    assert!(z.message.as_deref().unwrap_or("").contains("no such user"), "{z:?}");
    n.ok(&["run", "localhost/fifo:1", "--name", "fifo", "-u", "0:staff", "--restart", "no", "--", "true"])?;
    let f = n.wait_instance("fifo-1", 30 * SEC, "failed", |i| i.state == InstanceState::Failed)?;
    assert!(f.message.as_deref().unwrap_or("").contains("not a regular file"), "{f:?}");
    // The agent is well: a normal container starts.
    n.ok(&["run", IMAGE, "--name", "after", "--", "sleep", "1000"])?;
    n.wait_running("after-1")?;
    Ok(())
}

/// Docker's masked paths are masked (`/proc/interrupts` tells what other tenants do).
#[test]
fn proc_interrupts_is_masked() -> R {
    require_privileged!();
    let mut n = Node::new()?;
    n.up(None)?;
    n.ok(&["run", IMAGE, "--name", "m", "--", "sleep", "1000"])?;
    n.wait_running("m-1")?;
    assert_eq!(n.ok(&["exec", "m-1", "--", "cat", "/proc/interrupts"])?, "", "masked: /dev/null");
    assert!(!std::fs::read_to_string("/proc/interrupts")?.is_empty(), "the host's is not empty");
    Ok(())
}

/// The node reports its runc, flags one with known escapes, and refuses to start with a
/// runc older than `--require-runc-min`.
#[test]
fn runc_is_reported_flagged_and_can_be_required() -> R {
    require_privileged!();
    let mut n = Node::new()?;
    let refused = n.up_refused_with(None, &["--require-runc-min", "99.0"])?;
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("is older than 99.0, the least --require-runc-min allows"), "{err}");
    n.up(None)?;
    let version = String::from_utf8(Command::new("runc").arg("--version").output()?.stdout)?;
    let version = skiff_runtime::runc::parse_version(&version).unwrap();
    let out = n.cli(&["get", "nodes"])?;
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("RUNC") && table.contains(&version), "{table}");
    let warned = String::from_utf8_lossy(&out.stderr).contains("container-escape flaws");
    assert_eq!(warned, skiff_model::platform::runc_advisory(&version).is_some(), "runc {version}");
    Ok(())
}

/// The node's policy refuses, on the node, what it does not allow — whatever the hub
/// sent — naming the rule; and without any policy, the data directory is never mounted.
#[test]
fn the_node_policy_refuses_what_it_does_not_allow() -> R {
    require_privileged!();
    let mut n = Node::new()?;
    let allowed = tempfile::tempdir()?;
    let policy = n.write(
        "policy.yaml",
        &format!(
            "bind_mounts: {{allowed: [{}]}}\ncapabilities: {{allowed: [NET_ADMIN]}}\nhost_network: false\n",
            allowed.path().display()
        ),
    )?;
    n.up_with(None, &["--policy", policy.to_str().unwrap()])?;
    let refused = |name: &str, args: &[&str], rule: &str| -> R {
        let mut all = vec!["run", IMAGE, "--name", name, "--restart", "no"];
        all.extend(args);
        all.extend(["--", "sleep", "1000"]);
        n.ok(&all)?;
        let i = n.wait_instance(&format!("{name}-1"), 30 * SEC, "failed", |i| i.state == InstanceState::Failed)?;
        let msg = i.message.unwrap_or_default();
        assert!(msg.contains("refused by the node's policy") && msg.contains(rule), "{name}: {msg}");
        Ok(())
    };
    refused("etc", &["-v", "/etc:/host-etc"], "bind_mounts.allowed")?;
    refused("root", &["-v", "/:/host"], "data directory")?;
    refused("hostnet", &["--network", "host"], "host_network")?;
    refused("admin", &["--cap-add", "SYS_ADMIN"], "capabilities.allowed")?;
    let ok = format!("{}:/data", allowed.path().display());
    n.ok(&["run", IMAGE, "--name", "fine", "-v", &ok, "--cap-add", "NET_ADMIN", "--", "sleep", "1000"])?;
    n.wait_running("fine-1")?;
    assert!(n.events()?.iter().any(|e| e.reason == "PolicyViolation" && e.object == "etc-1"));
    // A policy file with a mistake is refused at start, naming the field.
    let bad = n.write("bad-policy.yaml", "capabilities: {allowed: [FLY]}\n")?;
    let out = n.up_refused_with(None, &["--policy", bad.to_str().unwrap()])?;
    assert!(String::from_utf8_lossy(&out.stderr).contains("capabilities.allowed[0]"));
    Ok(())
}

/// A power cut leaves `agent.db` unreadable: the agent moves it aside, rebuilds from the
/// instances on the node, and nothing restarts.
#[test]
fn a_corrupt_agent_db_is_rebuilt_from_the_node_without_restarting_anything() -> R {
    require_privileged!();
    let mut n = Node::new()?;
    n.up(None)?;
    n.ok(&["run", IMAGE, "--name", "keep", "--replicas", "2", "--", "sleep", "1000"])?;
    let before: Vec<_> =
        ["keep-1", "keep-2"].iter().map(|i| n.wait_running(i).map(|s| s.pid)).collect::<Result<_, _>>()?;
    n.kill_up()?;
    let db = n.data().join("agent.db");
    for suffix in ["-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", db.display()));
    }
    let mut garbage = std::fs::read(&db)?;
    garbage[..100].copy_from_slice(&[0x5a; 100]);
    std::fs::write(&db, garbage)?;
    n.up(None)?;
    let after: Vec<_> =
        ["keep-1", "keep-2"].iter().map(|i| n.wait_running(i).map(|s| s.pid)).collect::<Result<_, _>>()?;
    assert_eq!(after, before, "the same processes: nothing restarted");
    assert!(n.events()?.iter().any(|e| e.reason == "StateRebuilt"), "{:?}", n.events()?);
    let aside = std::fs::read_dir(n.data())?
        .flatten()
        .any(|e| e.file_name().to_string_lossy().starts_with("agent.db.corrupt-"));
    assert!(aside, "the corrupt file is kept for a post-mortem");
    Ok(())
}

/// A WebAssembly program runs as an unprivileged user of its own, without capabilities,
/// inside a cgroup with its limits, and with `network: none` in an empty namespace.
#[test]
fn a_wasm_program_runs_unprivileged_in_its_own_cgroup_and_network_namespace() -> R {
    require_privileged!();
    let mut n = Node::bare()?;
    n.up(None)?;
    let ticker = wasm::write(n.data(), "ticker.wasm", &wasm::ticker(200)?)?;
    let ticker = ticker.to_str().unwrap();
    // The first start launches a shim; the second is made by the spare shim the first
    // left ready, whose cgroup (entered when it started) becomes the instance's.
    check_wasm_instance(&n, ticker, "t", None)?;
    let instances = n.data().join("wasm/instances");
    let spare = wait_for(30 * SEC, "a spare shim", || {
        std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            cmd.contains(&format!("shim --spare {}", instances.display())).then_some(pid)
        })
    })?;
    let v1 = !Path::new("/sys/fs/cgroup/cgroup.controllers").exists();
    if v1 {
        let spare_cg = skiff_runtime::cgroup::spare_cgroup(spare);
        wait_for(10 * SEC, "the spare in its own cgroup", || {
            let cgroups = std::fs::read_to_string(format!("/proc/{spare}/cgroup")).ok()?;
            cgroups.lines().any(|l| l.contains(":memory:") && l.ends_with(&spare_cg)).then_some(())
        })?;
    }
    check_wasm_instance(&n, ticker, "u", Some(spare))?;
    if v1 {
        let left = format!("/sys/fs/cgroup/memory{}", skiff_runtime::cgroup::spare_cgroup(spare));
        assert!(!Path::new(&left).exists(), "the spare's cgroup became the instance's: {left} is gone");
    }
    Ok(())
}

/// Runs `ticker` as `name` and checks that it runs unprivileged, with no network, in its
/// own cgroup with its limit, and that its cgroup goes with it. `spare`: the pid the
/// instance must have (the spare shim that became it).
fn check_wasm_instance(n: &Node, ticker: &str, name: &str, spare: Option<u32>) -> R {
    n.ok(&["run", ticker, "--name", name, "--network", "none", "--memory", "8m"])?;
    let t = n.wait_running(&format!("{name}-1"))?;
    let pid = t.pid.unwrap();
    if let Some(spare) = spare {
        assert_eq!(pid as u32, spare, "the spare shim became the instance");
    }
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |k: &str| status.lines().find_map(|l| l.strip_prefix(k)).unwrap_or("").trim().to_string();
    let uid = skiff_runtime::wasm::uid_for(&t.container_id);
    assert_eq!(field("Uid:").split_whitespace().next(), Some(uid.to_string().as_str()), "{status}");
    assert_eq!(field("CapEff:"), "0000000000000000");
    assert_eq!(field("NoNewPrivs:"), "1");
    let ns = |p: &str| std::fs::read_link(p).unwrap();
    assert_ne!(ns(&format!("/proc/{pid}/ns/net")), ns("/proc/self/ns/net"), "network none: a namespace of its own");
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))?;
    let want = format!("/skiff/{}", t.container_id);
    assert!(
        cgroups
            .lines()
            .any(|l| l.contains(":memory:") && l.ends_with(&want) || l.starts_with("0::") && l.ends_with(&want)),
        "{cgroups}"
    );
    let limit = skiff_runtime::cgroup::Cgroups::detect().limits(&want).memory_bytes;
    assert_eq!(limit, Some((8 << 20) + skiff_runtime::wasm::SHIM_OVERHEAD));
    // Its log still grows (written as that user), and the agent still stops it.
    let logs = n.data().join("wasm/instances").join(&t.container_id).join("state/container.log");
    wait_for(10 * SEC, "ticks", || (std::fs::read_to_string(&logs).ok()?.lines().count() > 2).then_some(()))?;
    n.ok(&["delete", "deployment", name])?;
    wait_for(30 * SEC, "the instance gone", || n.instances().ok()?.is_empty().then_some(()))?;
    assert!(!Path::new(&format!("/proc/{pid}")).exists());
    // Its cgroup goes with it (in every hierarchy it entered).
    let dirs: Vec<String> = if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        vec![format!("/sys/fs/cgroup{want}")]
    } else {
        ["memory", "pids", "cpu", "cpuacct"].iter().map(|c| format!("/sys/fs/cgroup/{c}{want}")).collect()
    };
    wait_for(10 * SEC, "its cgroup removed", || dirs.iter().all(|d| !Path::new(d).exists()).then_some(()))
        .with_context(|| format!("left: {:?}", dirs.iter().filter(|d| Path::new(d).exists()).collect::<Vec<_>>()))?;
    Ok(())
}

/// `skiff up` on an address other than loopback serves TLS from its own CA (pinned in
/// admin.conf): the admin token never crosses a network in clear.
#[test]
fn skiff_up_off_loopback_serves_tls_only() -> R {
    require_privileged!();
    let mut n = Node::new()?;
    let port = common::free_port();
    let (bridge, subnet) = (n.bridge.clone(), n.subnet.clone());
    let listen = format!("0.0.0.0:{port}");
    n.spawn(&["up", "--listen", &listen, "--bridge", &bridge, "--subnet", &subnet])?;
    wait_for(30 * SEC, "the API", || {
        (n.data().join("admin.conf").exists() && n.cli(&["get", "nodes"]).ok()?.status.success()).then_some(())
    })?;
    let conf: serde_json::Value = serde_json::from_slice(&std::fs::read(n.data().join("admin.conf"))?)?;
    assert_eq!(conf["server"], format!("https://127.0.0.1:{port}"));
    assert!(conf["ca"].as_str().is_some_and(|c| c.contains("BEGIN CERTIFICATE")));
    assert!(n.ok(&["get", "nodes"])?.contains("Ready"), "the CLI talks TLS with the pinned CA");
    let plain = common::http_get(port, "/api/v1/health").unwrap_or_default();
    assert!(!plain.contains("ok"), "no plain HTTP: {plain:?}");
    Ok(())
}

/// A command whose reader went away (`skiff get ... | grep -q`, `| head`) ends as other
/// tools do on SIGPIPE (exit 141, nothing on stderr), not with a panic and a backtrace.
#[test]
fn a_reader_that_went_away_ends_the_command_quietly() -> R {
    let data = tempfile::tempdir()?;
    let (reader, writer) = std::io::pipe()?;
    drop(reader);
    let out = std::process::Command::new(common::bin())
        .args(["--data", &data.path().display().to_string(), "image", "ls"])
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .output()?;
    assert_eq!(out.status.code(), Some(141), "{out:?}");
    assert!(out.stderr.is_empty(), "{}", String::from_utf8_lossy(&out.stderr));
    Ok(())
}
