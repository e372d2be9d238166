//! End-to-end tests on one node: real `skiff up`, real runc, overlayfs, cgroups, netns.
//! They need root; elsewhere they skip with a reason (CI runs them as root with
//! SKIFF_REQUIRE_PRIVILEGED=1, which turns a skip into a failure).

#![allow(clippy::unwrap_used)] // tests may panic on setup failures

mod common;

use anyhow::Context;
use common::{free_port, http_get, wait_for, Node, IMAGE};
use skiff_model::InstanceState;
use skiff_runtime::cgroup::{shares_to_weight, CgroupVersion, Cgroups};
use skiff_testkit::require_privileged;
use std::time::Duration;

type R = anyhow::Result<()>;
const SEC: Duration = Duration::from_secs(1);

#[test]
fn limits_reach_the_cgroup() -> R {
    require_privileged!();
    let mut n = Node::new()?;
    n.up(None)?;
    n.ok(&[
        "run",
        IMAGE,
        "--name",
        "lim",
        "--cpus",
        "0.5",
        "--memory",
        "48m",
        "--cpu-shares",
        "512",
        "--pids-limit",
        "50",
        "--",
        "sleep",
        "1000",
    ])?;
    let i = n.wait_running("lim-1")?;
    let cg = Cgroups::detect();
    let l = cg.limits(&format!("/skiff/{}", i.container_id));
    assert_eq!((l.cpu_quota_us, l.cpu_period_us), (Some(50_000), Some(100_000)));
    assert_eq!(l.memory_bytes, Some(48 << 20));
    assert_eq!(l.memory_swap_bytes, Some(48 << 20), "swap limited to the memory limit");
    assert_eq!(l.pids_max, Some(50));
    match cg.version {
        CgroupVersion::V1 => assert_eq!(l.cpu_shares, Some(512)),
        CgroupVersion::V2 => assert_eq!(l.cpu_weight, Some(shares_to_weight(512))),
    }
    Ok(())
}

#[test]
fn memory_limit_oom_kills_and_is_reported() -> R {
    require_privileged!();
    let mut n = Node::new()?;
    n.up(None)?;
    // `tail` buffers /dev/zero looking for a newline that never comes.
    n.ok(&["run", IMAGE, "--name", "hog", "--memory", "16m", "--", "tail", "/dev/zero"])?;
    let i = n.wait_instance("hog-1", 60 * SEC, "OOM-killed", |i| i.state == InstanceState::Exited)?;
    assert!(i.oom_killed, "{i:?}");
    assert_eq!(i.exit_code, Some(137));
    assert!(n.events()?.iter().any(|e| e.object == "hog-1" && e.reason == "OOMKilled"));
    Ok(())
}

#[test]
fn restart_always_backs_off_and_on_failure_gives_up() -> R {
    require_privileged!();
    let mut n = Node::new()?;
    n.up(None)?;
    n.ok(&["run", IMAGE, "--name", "crashy", "--restart", "always", "--", "sh", "-c", "echo up; exit 3"])?;
    n.ok(&["run", IMAGE, "--name", "limited", "--restart", "on-failure:3", "--", "sh", "-c", "exit 1"])?;
    n.wait_instance("crashy-1", 30 * SEC, "restarted 4 times", |i| i.restarts >= 4)?;
    let starts: Vec<u64> = n
        .events()?
        .iter()
        .filter(|e| e.object == "crashy-1" && (e.reason == "Started" || e.reason == "Restarted"))
        .map(|e| e.time_ms)
        .collect();
    let gaps: Vec<u64> = starts.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(gaps.len() >= 4, "{gaps:?}");
    // 100, 200, 400, 800 ms of backoff on top of a constant start cost: the gaps grow.
    assert!(gaps[3] > gaps[0] + 400, "delays should grow: {gaps:?}");
    let l = n.wait_instance("limited-1", 30 * SEC, "given up", |i| i.state == InstanceState::Exited)?;
    assert_eq!((l.restarts, l.exit_code), (3, Some(1)));
    std::thread::sleep(2 * SEC);
    assert_eq!(n.instance("limited-1")?.restarts, 3, "no restart after giving up");
    let logs = n.ok(&["logs", "crashy-1"])?;
    assert!(logs.lines().filter(|l| *l == "up").count() >= 5, "every run's output is kept: {logs}");
    Ok(())
}

#[test]
fn agent_kill_keeps_containers_logs_and_exit_codes() -> R {
    require_privileged!();
    let mut n = Node::new()?;
    let compose = n.up_compose(&format!(
            "name: keep\nservices:\n  counter:\n    image: {IMAGE}\n    stop_grace_period: 1s\n    command: [\"sh\", \"-c\", \"i=0; while true; do i=$$((i+1)); echo line $$i; sleep 0.1; done\"]\n  short:\n    image: {IMAGE}\n    command: [\"sh\", \"-c\", \"sleep 2; exit 7\"]\n"
        ))?;
    let before = n.wait_running("counter-1")?;
    n.wait_running("short-1")?;
    n.kill_up()?;
    // While no agent runs, the counter keeps logging and `short` exits with 7.
    std::thread::sleep(3 * SEC);
    n.up(Some(&compose))?;
    let after = n.wait_running("counter-1")?;
    assert_eq!(after.pid, before.pid, "the container was not restarted");
    assert_eq!(after.restarts, 0);
    let short = n.wait_instance("short-1", 10 * SEC, "exited", |i| i.state == InstanceState::Exited)?;
    assert_eq!(short.exit_code, Some(7), "exit code recorded while the agent was down");
    std::thread::sleep(SEC);
    let logs = n.ok(&["logs", "counter-1"])?;
    let nums: Vec<u64> = logs.lines().filter_map(|l| l.strip_prefix("line ")?.parse().ok()).collect();
    assert!(nums.len() > 40, "logged through the outage: {}", nums.len());
    assert!(nums.iter().enumerate().all(|(i, v)| *v == i as u64 + 1), "no line lost or repeated");
    Ok(())
}

#[test]
fn security_defaults_deny_mount_and_namespaces() -> R {
    require_privileged!();
    let mut n = Node::new()?;
    n.up(None)?;
    n.ok(&["run", IMAGE, "--name", "sec", "--", "sleep", "1000"])?;
    n.wait_running("sec-1")?;
    let out = n.cli(&["exec", "sec-1", "--", "mount", "-t", "tmpfs", "none", "/mnt"])?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr).to_lowercase();
    assert!(err.contains("permission denied") || err.contains("not permitted"), "{err}");
    let out = n.cli(&["exec", "sec-1", "--", "unshare", "-n", "true"])?;
    assert!(!out.status.success(), "creating a network namespace must fail");
    let status = n.ok(&["exec", "sec-1", "--", "cat", "/proc/self/status"])?;
    assert!(status.contains("NoNewPrivs:\t1"), "{status}");
    let caps = status.lines().find(|l| l.starts_with("CapBnd:")).unwrap_or_default().to_string();
    // CAP_SYS_ADMIN (bit 21) is not in the bounding set.
    let bnd = u64::from_str_radix(caps.trim_start_matches("CapBnd:").trim(), 16)?;
    assert_eq!(bnd & (1 << 21), 0, "{caps}");
    let kcore = n.cli(&["exec", "sec-1", "--", "sh", "-c", "head -c1 /proc/kcore | wc -c"])?;
    assert_eq!(String::from_utf8_lossy(&kcore.stdout).trim(), "0", "/proc/kcore is masked");
    Ok(())
}

#[test]
fn stack_services_resolve_and_ports_publish() -> R {
    require_privileged!();
    let mut n = Node::new()?;
    let port = free_port();
    n.up_compose(&format!(
        r#"name: net
services:
  server:
    image: {IMAGE}
    command: ["httpd", "-f", "-p", "80", "-h", "/www"]
    ports: ["127.0.0.1:{port}:80"]
    stop_grace_period: 1s
    healthcheck:
      test: ["CMD", "wget", "-q", "-O", "/dev/null", "http://127.0.0.1/"]
      interval: 500ms
      retries: 3
  client:
    image: {IMAGE}
    depends_on: {{server: {{condition: service_healthy}}}}
    stop_grace_period: 1s
    command: ["sh", "-c", "wget -q -O- http://server/ && sleep 1000"]
"#
    ))?;
    let server =
        n.wait_instance("server-1", 30 * SEC, "healthy", |i| i.health == Some(skiff_model::Health::Healthy))?;
    let client = n.wait_running("client-1")?;
    assert!(client.started_at_ms >= server.started_at_ms);
    assert_eq!(http_get(port, "/")?, "hello from skiff\n", "published port answers from the host");
    let logs = wait_for(10 * SEC, "client output", || n.ok(&["logs", "client"]).ok().filter(|l| l.contains("hello")))?;
    assert_eq!(logs.trim(), "client-1 | hello from skiff", "the client reached the server by service name");
    let out = n.ok(&["exec", "client-1", "--", "cat", "/etc/hosts"])?;
    assert!(out.contains("server-1 server"), "{out}");
    let table = n.ok(&["get", "instances"])?;
    assert!(table.lines().any(|l| l.starts_with("server-1") && l.contains("healthy")), "{table}");
    Ok(())
}

#[test]
fn whiteouts_hide_lower_files_at_runtime() -> R {
    require_privileged!();
    let mut n = Node::new()?;
    let top =
        skiff_testkit::LayerBuilder::new().whiteout("www/index.html")?.file("www/new.html", 0o644, b"new")?.finish()?;
    n.load(&skiff_testkit::ImageBuilder::busybox()?.layer(top), "localhost/whiteout:1")?;
    n.up(None)?;
    n.ok(&["run", "localhost/whiteout:1", "--name", "wh", "--", "sleep", "1000"])?;
    n.wait_running("wh-1")?;
    assert_eq!(n.ok(&["exec", "wh-1", "--", "ls", "/www"])?.trim(), "new.html");
    Ok(())
}

#[test]
fn bad_input_is_rejected_and_nothing_starts() -> R {
    require_privileged!();
    let mut n = Node::new()?;
    let bad = n.write(
        "bad.yaml",
        &format!("services:\n  web:\n    image: {IMAGE}\n    deploy: {{resources: {{limits: {{memory: 12XB}}}}}}\n"),
    )?;
    let out = n.up_refused(&bad)?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(r#"services.web.deploy.resources.limits.memory: "12XB" is not a size"#), "{err}");
    assert!(!n.data().join("agent.db").exists(), "nothing was started or stored");

    let missing = n.write("missing.yaml", "services:\n  web:\n    image: localhost/nope:1\n")?;
    let out = n.up_refused(&missing)?;
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("services.web.image: localhost/nope:1 is not in the local store and pulling it failed: registry localhost: manifest nope:1: cannot reach it"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    n.up(None)?;
    let out = n.cli(&["run", IMAGE, "--memory", "12XB"])?;
    assert!(String::from_utf8_lossy(&out.stderr).contains(r#"--memory: "12XB" is not a size"#));
    let out = n.cli(&["run", IMAGE, "--name", "Bad_Name"])?;
    assert!(String::from_utf8_lossy(&out.stderr).contains("name: \"Bad_Name\" is not a valid name"));
    let out = n.cli(&["run", "localhost/absent:1", "--name", "absent"])?;
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(
            "deployments.absent.image: localhost/absent:1 is not in the local store and pulling it failed: registry localhost"
        ),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(n.ok(&["get", "deployments", "-o", "json"])?.trim() == "[]", "nothing stored");
    let out = n.cli(&["delete", "deployment", "ghost"])?;
    assert!(String::from_utf8_lossy(&out.stderr).contains("deployment \"ghost\" not found"));
    Ok(())
}

#[test]
fn ctrl_c_stops_the_stack_and_cleans_up() -> R {
    require_privileged!();
    let mut n = Node::new()?;
    n.up_compose(&format!(
        "name: bye\nservices:\n  a:\n    image: {IMAGE}\n    command: [sleep, '1000']\n    stop_grace_period: 1s\n"
    ))?;
    let a = n.wait_running("a-1")?;
    let pid = a.pid.unwrap_or_default();
    n.interrupt_up()?;
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists(), "container process is gone");
    let left: Vec<_> = std::fs::read_dir(n.data().join("instances"))?.collect();
    assert!(left.is_empty(), "instance directories removed");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo")?;
    assert!(!mounts.contains(&n.data().display().to_string()), "no mounts left");
    assert!(
        !skiff_runtime::network::netns_path(&format!("skiff-{}", a.container_id)).exists(),
        "network namespace removed"
    );
    Ok(())
}

#[test]
fn lost_containers_come_back_after_an_agent_restart() -> R {
    require_privileged!();
    let mut n = Node::new()?;
    let compose = n.up_compose(&format!("name: boot\nservices:\n  svc:\n    image: {IMAGE}\n    restart: always\n    stop_grace_period: 1s\n    command: [sleep, '1000']\n  once:\n    image: {IMAGE}\n    restart: \"no\"\n    command: [sleep, '1000']\n"))?;
    let before = n.wait_running("svc-1")?;
    n.wait_running("once-1")?;
    n.kill_up()?;
    // As after a power cut: shims and containers die without recording anything.
    let data = n.data().display().to_string();
    let shims = std::process::Command::new("pgrep").args(["-f", &format!("skiff shim --bundle {data}")]).output()?;
    for pid in String::from_utf8_lossy(&shims.stdout).split_whitespace() {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid.parse()?), nix::sys::signal::Signal::SIGKILL);
    }
    for i in n_pids(&n)? {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(i), nix::sys::signal::Signal::SIGKILL);
    }
    std::thread::sleep(SEC);
    n.up(Some(&compose))?;
    let after = n.wait_instance("svc-1", 30 * SEC, "running again", |i| {
        i.state == InstanceState::Running && i.pid.is_some() && i.pid != before.pid
    })?;
    assert_eq!(after.restarts, 1);
    let once = n.wait_instance("once-1", 30 * SEC, "exited", |i| i.state == InstanceState::Exited)?;
    assert_eq!(once.exit_code, Some(255), "restart: no stays down, reported as lost");
    assert!(once.message.unwrap_or_default().contains("lost"));
    Ok(())
}

/// Host pids of the node's containers, from the shims' init.pid files.
fn n_pids(n: &Node) -> anyhow::Result<Vec<i32>> {
    let mut v = vec![];
    for e in std::fs::read_dir(n.data().join("instances"))? {
        if let Ok(p) = std::fs::read_to_string(e?.path().join("init.pid")) {
            v.push(p.trim().parse()?);
        }
    }
    Ok(v)
}

#[test]
fn volumes_read_only_rootfs_and_network_modes() -> R {
    require_privileged!();
    let mut n = Node::new()?;
    n.up(None)?;
    // Outside the data directory: the node's policy never lets a workload bind that.
    let outside = tempfile::tempdir()?;
    let host_dir = outside.path().join("bind-src");
    std::fs::create_dir_all(&host_dir)?;
    std::fs::write(host_dir.join("in.txt"), "from host")?;
    let bind = format!("{}:/in:ro", host_dir.display());
    n.ok(&["run", IMAGE, "--name", "vol", "-v", "cache:/cache", "-v", &bind, "--read-only", "--", "sleep", "1000"])?;
    n.wait_running("vol-1")?;
    assert_eq!(n.ok(&["exec", "vol-1", "--", "cat", "/in/in.txt"])?, "from host");
    assert!(!n.cli(&["exec", "vol-1", "--", "touch", "/in/x"])?.status.success(), "bind mounted read-only");
    assert!(!n.cli(&["exec", "vol-1", "--", "touch", "/x"])?.status.success(), "read-only rootfs");
    n.ok(&["exec", "vol-1", "--", "sh", "-c", "echo kept > /cache/f"])?;
    let named = n.data().join("volumes/cache/_data/f");
    assert_eq!(std::fs::read_to_string(&named)?, "kept\n", "named volume lives under the data dir");
    // A new deployment with the same named volume sees the data.
    n.ok(&["run", IMAGE, "--name", "vol2", "-v", "cache:/cache", "--", "sleep", "1000"])?;
    n.wait_running("vol2-1")?;
    assert_eq!(n.ok(&["exec", "vol2-1", "--", "cat", "/cache/f"])?, "kept\n");
    // A tmpfs (compose `tmpfs:`) is writable on a read-only rootfs, with its size and mode.
    let file = n.write(
        "tmpfs.yaml",
        &format!("services:\n  scratch:\n    image: {IMAGE}\n    command: [sleep, \"1000\"]\n    read_only: true\n    tmpfs: [\"/scratch:size=1m,mode=700\"]\n"),
    )?;
    n.ok(&["apply", "-f", &file.to_string_lossy()])?;
    n.wait_running("scratch-1")?;
    n.ok(&["exec", "scratch-1", "--", "sh", "-c", "echo x > /scratch/f"])?;
    let mounts = n.ok(&["exec", "scratch-1", "--", "cat", "/proc/mounts"])?;
    let line = mounts.lines().find(|l| l.split_whitespace().nth(1) == Some("/scratch")).unwrap_or_default();
    assert!(
        line.starts_with("tmpfs /scratch tmpfs") && line.contains("size=1024k") && line.contains("mode=700"),
        "{mounts}"
    );

    // An anonymous volume (compose's `- /etc`) starts with what the image has there (as
    // a new named volume does), and keeps what was written across its slot's restarts.
    let file = n.write(
        "anon.yaml",
        &format!("services:\n  anon:\n    image: {IMAGE}\n    command: [sleep, \"1000\"]\n    stop_grace_period: 1s\n    volumes: [\"/etc\", \"fresh:/bin\"]\n"),
    )?;
    n.ok(&["apply", "-f", &file.to_string_lossy()])?;
    let first = n.wait_running("anon-1")?;
    assert!(n.ok(&["exec", "anon-1", "--", "cat", "/etc/passwd"])?.starts_with("root:"), "filled from the image");
    assert!(n.data().join("volumes/fresh/_data/busybox").is_file(), "a new named volume is filled too");
    let mounts = n.ok(&["exec", "anon-1", "--", "cat", "/proc/mounts"])?;
    assert!(mounts.lines().any(|l| l.split_whitespace().nth(1) == Some("/etc")), "{mounts}");
    n.ok(&["exec", "anon-1", "--", "sh", "-c", "echo kept > /etc/mine"])?;
    n.ok(&["restart", "anon-1"])?;
    wait_for(60 * SEC, "anon-1 replaced", || {
        let i = n.instance("anon-1").ok()?;
        (i.state == InstanceState::Running && i.pid.is_some() && i.pid != first.pid).then_some(())
    })?;
    assert_eq!(n.ok(&["exec", "anon-1", "--", "cat", "/etc/mine"])?, "kept\n");
    let anon = n.data().join("volumes/.anonymous/anon-1");
    assert!(anon.is_dir());
    // Gone with its deployment (the node's cleanup runs every 30 s).
    n.ok(&["delete", "anon"])?;
    wait_for(90 * SEC, "the anonymous volume removed", || (!anon.exists()).then_some(()))?;
    assert!(n.data().join("volumes/fresh/_data/busybox").is_file(), "named volumes stay");

    n.ok(&["run", IMAGE, "--name", "isolated", "--network", "none", "--", "sleep", "1000"])?;
    n.ok(&["run", IMAGE, "--name", "hostnet", "--network", "host", "--", "sleep", "1000"])?;
    let iso = n.wait_running("isolated-1")?;
    n.wait_running("hostnet-1")?;
    assert!(iso.ip.is_none());
    let links = n.ok(&["exec", "isolated-1", "--", "ls", "/sys/class/net"])?;
    assert_eq!(links.split_whitespace().collect::<Vec<_>>(), ["lo"], "network none has loopback only");
    let host_links = n.ok(&["exec", "hostnet-1", "--", "ls", "/sys/class/net"])?;
    assert!(host_links.contains(&n.bridge), "host network sees the host's interfaces: {host_links}");
    Ok(())
}

/// skiff's own init (what a released, static binary mounts as /sbin/docker-init), run on
/// the host: the command's exit code, signals passed on, orphans reaped.
#[test]
fn skiffs_own_init_passes_signals_and_exit_codes_and_reaps_orphans() -> R {
    use std::os::unix::process::CommandExt;
    let init = || {
        let mut c = std::process::Command::new(common::bin());
        c.arg0("docker-init");
        c
    };
    assert_eq!(init().args(["--", "sh", "-c", "exit 7"]).status()?.code(), Some(7));
    assert_eq!(init().args(["/no/such/program"]).status()?.code(), Some(127));
    assert_eq!(init().status()?.code(), Some(2), "no command");
    // An orphan (the subshell's `sleep 1`) comes to the init, which reaps it: no zombie
    // among its children by the time the command ends.
    let mut c = init()
        .args(["--", "sh", "-c", "(sleep 1 &); sleep 3; cat /proc/$PPID/task/$PPID/children"])
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let pid = c.id();
    std::thread::sleep(2 * SEC);
    let kids = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))?;
    for kid in kids.split_whitespace() {
        let stat = std::fs::read_to_string(format!("/proc/{kid}/stat")).unwrap_or_default();
        let state = stat.rsplit_once(") ").map(|(_, r)| r.chars().next()).unwrap_or_default();
        assert_ne!(state, Some('Z'), "a zombie under the init: {stat}");
    }
    assert!(c.wait()?.success());
    // SIGTERM to the init reaches the command (which ends by it: 128 + 15).
    let mut c = init().args(["--", "sleep", "100"]).spawn()?;
    std::thread::sleep(SEC / 2);
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(c.id() as i32), nix::sys::signal::Signal::SIGTERM)?;
    assert_eq!(c.wait()?.code(), Some(143));
    Ok(())
}

/// Processes of an instance in the zombie state (from inside it).
fn zombies(n: &Node, instance: &str) -> anyhow::Result<usize> {
    let stats = n.ok(&["exec", instance, "--", "sh", "-c", "cat /proc/[0-9]*/stat 2>/dev/null"])?;
    // `PID (COMM) STATE ...`: the state follows the command's closing parenthesis.
    Ok(stats.lines().filter(|l| l.rsplit_once(") ").is_some_and(|(_, rest)| rest.starts_with('Z'))).count())
}

#[test]
fn sysctls_ulimits_shm_init_hosts_and_dns_reach_the_container() -> R {
    require_privileged!();
    let mut n = Node::new()?;
    n.up(None)?;
    // An orphan (the subshell's `sleep 1`) is left to process 1 to reap: the init does;
    // `sleep` as process 1 (no init) never does, and its zombie stays.
    let orphan = "(sleep 1 &); exec sleep 1000";
    let file = n.write(
        "opts.yaml",
        &format!(
            r#"services:
  tuned:
    image: {IMAGE}
    command: [sh, -c, "{orphan}"]
    init: true
    sysctls: {{net.core.somaxconn: "1024"}}
    ulimits: {{nofile: {{soft: 1000, hard: 2000}}, core: 0}}
    shm_size: 128m
    extra_hosts: ["db.example:10.1.2.3", "host.docker.internal=host-gateway"]
    dns_search: corp.example
    dns_opt: ["ndots:2"]
  plain:
    image: {IMAGE}
    command: [sh, -c, "{orphan}"]
    stop_grace_period: 2s
"#
        ),
    )?;
    n.ok(&["apply", "-f", &file.to_string_lossy()])?;
    n.wait_running("tuned-1")?;
    n.wait_running("plain-1")?;
    let read = |path: &str| n.ok(&["exec", "tuned-1", "--", "cat", path]);
    assert_eq!(read("/proc/sys/net/core/somaxconn")?.trim(), "1024");
    assert_eq!(n.ok(&["exec", "plain-1", "--", "cat", "/proc/sys/net/core/somaxconn"])?.trim(), "4096", "own netns");
    // The container's own processes (process 1 here, whose children inherit them). Not an
    // exec'd one: runc 1.1.5 sets those from its side while the new process's Go runtime
    // may raise its soft limit to the hard one after, a race that lost once in CI here.
    let limits = read("/proc/1/limits")?;
    let limit = |name: &str| -> Option<String> {
        let rest = limits.lines().find_map(|l| l.strip_prefix(name))?;
        Some(rest.split_whitespace().take(2).collect::<Vec<_>>().join(" "))
    };
    assert_eq!(limit("Max open files").as_deref(), Some("1000 2000"), "{limits}");
    assert_eq!(limit("Max core file size").as_deref(), Some("0 0"), "{limits}");
    let mounts = read("/proc/mounts")?;
    let shm = mounts.lines().find(|l| l.split_whitespace().nth(1) == Some("/dev/shm")).unwrap_or_default();
    assert!(shm.contains("size=131072k"), "{mounts}");
    assert!(read("/proc/1/cmdline")?.starts_with("/sbin/docker-init\0--\0sh\0"), "the init is process 1");
    let hosts = read("/etc/hosts")?;
    assert!(hosts.contains("10.1.2.3\tdb.example\n"), "{hosts}");
    let gateway = n.ok(&["exec", "tuned-1", "--", "sh", "-c", "ip route | awk '/default/ {print $3}'"])?;
    assert!(hosts.contains(&format!("{}\thost.docker.internal\n", gateway.trim())), "{hosts} / {gateway}");
    let resolv = read("/etc/resolv.conf")?;
    assert!(resolv.contains("search corp.example\n") && resolv.contains("options ndots:2\n"), "{resolv}");
    // The orphan's zombie: reaped under the init, kept without one.
    wait_for(30 * SEC, "the orphan's end", || (zombies(&n, "plain-1").ok()? == 1).then_some(()))?;
    assert_eq!(zombies(&n, "tuned-1")?, 0, "the init reaps orphans");
    // The init passes SIGTERM on (the command ends by it: 128 + 15); `sleep` as process 1
    // ignores it and is killed after its grace period (137).
    n.ok(&["stop", "tuned-1"])?;
    n.ok(&["stop", "plain-1"])?;
    let code = |name: &str| {
        n.wait_instance(name, 60 * SEC, "stopped", |i| i.state == InstanceState::Exited).map(|i| i.exit_code)
    };
    assert_eq!(code("tuned-1")?, Some(143));
    assert_eq!(code("plain-1")?, Some(137));

    // The same through `skiff run`'s flags, and bad values named.
    n.ok(&[
        "run",
        IMAGE,
        "--name",
        "flags",
        "--init",
        "--ulimit",
        "nofile=300:400",
        "--sysctl",
        "kernel.shmmni=2048",
        "--add-host",
        "a.example:10.9.9.9",
        "--dns-option",
        "timeout:1",
        "--shm-size",
        "1m",
        "--",
        "sleep",
        "1000",
    ])?;
    n.wait_running("flags-1")?;
    let got = n.ok(&["exec", "flags-1", "--", "sh", "-c",
        "ulimit -n; cat /proc/sys/kernel/shmmni; grep a.example /etc/hosts; grep options /etc/resolv.conf; grep /dev/shm /proc/mounts"])?;
    for want in ["300\n", "2048\n", "10.9.9.9\ta.example", "options timeout:1", "size=1024k"] {
        assert!(got.contains(want), "{want:?} in {got}");
    }
    for (args, says) in [
        (&["--sysctl", "kernel.hostname=x"][..], "sysctls.kernel.hostname"),
        (&["--sysctl", "net.core.somaxconn=1", "--network", "host"][..], "network of its own"),
        (&["--ulimit", "nofile=9:1"][..], "ulimits.nofile"),
        (&["--ulimit", "files=1"][..], "ulimits.files"),
        (&["--add-host", "nohost"][..], "--add-host"),
        (&["--dns", "127.0.0.1"][..], "loopback"),
    ] {
        let mut argv = vec!["run", IMAGE, "--name", "bad"];
        argv.extend_from_slice(args);
        let out = n.cli(&argv)?;
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(says), "{args:?}: {err}");
    }
    assert!(!n.ok(&["get", "deployments"])?.contains("bad"), "nothing half-applied");

    // A dry run asks no registry: an image no registry can give is planned, and said to
    // be pulled; one the node holds is not.
    let dry = n.write(
        "dry.yaml",
        "services:\n  far:\n    image: 127.0.0.1:9/nowhere/app:1\n  near:\n    image: localhost/skiff-test:1\n",
    )?;
    let out = n.ok(&["apply", "--dry-run", "-f", &dry.to_string_lossy()])?;
    assert!(out.contains("deployment far created (dry run)"), "{out}");
    assert!(out.contains("would pull 127.0.0.1:9/nowhere/app:1") && !out.contains("would pull localhost"), "{out}");
    assert!(!n.ok(&["get", "deployments"])?.contains("far"), "a dry run stores nothing");
    Ok(())
}

#[test]
fn config_maps_secrets_and_compose_configs_reach_the_container_and_secrets_stay_unseen() -> R {
    require_privileged!();
    let mut n = Node::new()?;
    n.up(None)?;
    n.write("pass.txt", "s3cr3t-from-file")?;
    let compose = n.write(
        "files.yaml",
        &format!(
            r#"services:
  app:
    image: {IMAGE}
    command: [sleep, "1000"]
    user: "1000"
    secrets: [db_pass]
    configs: [{{source: site, target: /etc/site.conf, mode: 0440}}]
secrets:
  db_pass: {{file: ./pass.txt}}
configs:
  site: {{content: "listen 80"}}
"#
        ),
    )?;
    n.ok(&["apply", "-f", &compose.to_string_lossy()])?;
    n.wait_running("app-1")?;
    let exec = |i: &str, cmd: &str| n.ok(&["exec", i, "--", "sh", "-c", cmd]);
    assert_eq!(exec("app-1", "cat /run/secrets/db_pass")?, "s3cr3t-from-file", "read as its user (1000)");
    assert_eq!(exec("app-1", "stat -c %a /run/secrets/db_pass /etc/site.conf")?, "444\n440\n");
    assert!(
        !n.cli(&["exec", "app-1", "--", "sh", "-c", "echo x > /run/secrets/db_pass"])?.status.success(),
        "read-only"
    );

    let k8s = n.write(
        "k8s.yaml",
        &format!(
            r#"apiVersion: apps/v1
kind: Deployment
metadata: {{name: web}}
spec:
  template:
    metadata: {{labels: {{app: web}}}}
    spec:
      volumes: [{{name: conf, configMap: {{name: web-conf, items: [{{key: a.conf, path: conf.d/a.conf}}]}}}}]
      containers:
      - name: web
        image: {IMAGE}
        command: [sleep, "1000"]
        env: [{{name: TOKEN, valueFrom: {{secretKeyRef: {{name: web-secret, key: token}}}}}}]
        volumeMounts: [{{name: conf, mountPath: /etc/web}}]
---
apiVersion: v1
kind: ConfigMap
metadata: {{name: web-conf}}
data: {{a.conf: "mode edge"}}
---
apiVersion: v1
kind: Secret
metadata: {{name: web-secret}}
stringData: {{token: tok-123}}
"#
        ),
    )?;
    n.ok(&["apply", "-f", &k8s.to_string_lossy()])?;
    n.wait_running("web-1")?;
    // The ConfigMap volume holds only its files (the image's /etc/web would be hidden).
    assert_eq!(exec("web-1", "find /etc/web -type f")?, "/etc/web/conf.d/a.conf\n");
    assert_eq!(exec("web-1", "cat /etc/web/conf.d/a.conf; echo; echo $TOKEN")?, "mode edge\ntok-123\n");
    // Readers see no secret: not the file's, not the variable's.
    let shown = n.ok(&["get", "deployments", "-o", "yaml"])?;
    assert!(!shown.contains("tok-123") && !shown.contains("s3cr3t"), "{shown}");
    assert!(shown.contains("<redacted>"), "{shown}");
    assert!(shown.contains("mode edge") || shown.contains("bW9kZSBlZGdl"), "a ConfigMap is no secret: {shown}");
    // Nor does the hub's store on disk (its database and log) hold them: they are sealed
    // with the key in pki/secrets.key.
    use base64::Engine;
    let b64 = |t: &str| base64::engine::general_purpose::STANDARD.encode(t);
    let mut stored = vec![];
    for f in std::fs::read_dir(n.data())? {
        let f = f?;
        if f.file_name().to_string_lossy().starts_with("hub.db") {
            stored.extend(std::fs::read(f.path())?);
        }
    }
    let holds = |t: &str| stored.windows(t.len()).any(|w| w == t.as_bytes());
    assert!(holds("web-secret") || holds("TOKEN"), "the store was read");
    assert!(!holds("tok-123") && !holds(&b64("s3cr3t-from-file")[..20]), "a secret is in hub.db");
    assert!(holds(&b64("mode edge")), "a ConfigMap is stored as it is");
    // A Service in a file of its own selects the stored deployment (as kubectl applies
    // it); its secrets, read back redacted, are kept.
    let svc = n.write(
        "svc.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: front}\nspec:\n  selector: {app: web}\n  ports: [{port: 8080, targetPort: 80}]\n",
    )?;
    n.ok(&["apply", "-f", &svc.to_string_lossy()])?;
    let services = n.ok(&["get", "services", "-o", "wide"])?;
    let line = services.lines().find(|l| l.starts_with("web ")).unwrap_or_default();
    assert!(line.contains("8080") && line.contains("front"), "{services}");
    // Read back, scaled and applied again: the secrets are kept.
    n.ok(&["scale", "web=2", "app=2"])?;
    n.wait_running("web-2")?;
    n.wait_running("app-2")?;
    assert_eq!(exec("web-2", "echo $TOKEN")?, "tok-123\n");
    assert_eq!(exec("app-2", "cat /run/secrets/db_pass")?, "s3cr3t-from-file");
    Ok(())
}

/// `network_mode: service:web`: the sidecar shares web's network (one address, one
/// localhost, web's name and hosts). When web is replaced by an update, its network is
/// new: the sidecar starts again in it, and still reaches web on localhost.
#[test]
fn a_sidecar_shares_its_services_network_and_follows_it_through_an_update() -> R {
    require_privileged!();
    let mut n = Node::new()?;
    n.up(None)?;
    let compose = |version: &str| {
        format!(
            r#"services:
  web:
    image: {IMAGE}
    environment: {{VERSION: "{version}"}}
    command: ["sh", "-c", "mkdir -p /www && echo web-$$VERSION > /www/index.html && exec httpd -f -p 8080 -h /www"]
  side:
    image: {IMAGE}
    network_mode: "service:web"
    command: [sleep, "1000"]
"#
        )
    };
    let file = n.write("side.yaml", &compose("1"))?;
    n.ok(&["apply", "-f", &file.to_string_lossy()])?;
    let web = n.wait_running("web-1")?;
    n.wait_running("side-1")?;
    let exec = |i: &str, cmd: &str| n.ok(&["exec", i, "--", "sh", "-c", cmd]);
    let fetch = || exec("side-1", "wget -q -O- http://127.0.0.1:8080/");
    assert_eq!(fetch()?, "web-1\n", "web's localhost");
    assert_eq!(exec("side-1", "hostname")?, "web-1\n");
    let ip = web.ip.clone().unwrap_or_default();
    assert!(!ip.is_empty() && exec("side-1", "ip -4 addr show eth0")?.contains(&format!("{ip}/")), "web's address");
    assert!(exec("side-1", "cat /etc/hosts")?.contains(&format!("{ip}\tweb-1 web")), "web's hosts");
    assert_eq!(n.instance("side-1")?.ip, None, "no address of its own");

    // web is replaced: side follows it into the new network.
    let first = n.instance("side-1")?.pid;
    n.write("side.yaml", &compose("2"))?;
    n.ok(&["apply", "-f", &file.to_string_lossy()])?;
    wait_for(Duration::from_secs(60), "side-1 reaching web v2", || {
        let now = n.instance("side-1").ok()?;
        (now.state == skiff_model::InstanceState::Running && now.pid.is_some())
            .then(|| fetch().ok())
            .flatten()
            .filter(|b| b == "web-2\n")
    })?;
    assert_ne!(n.instance("side-1")?.pid, first, "started again");
    assert!(n.events()?.iter().any(|e| e.reason == "NetworkReplaced"), "said why");
    // Bad input is named.
    let bad = n.write("bad.yaml", "services:\n  side: {image: x, network_mode: 'service:nope'}\n")?;
    let out = n.cli(&["apply", "-f", &bad.to_string_lossy()])?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("services.side.network_mode: service \"nope\" is not in the file"),
        "{err}"
    );
    Ok(())
}

/// Kubernetes Jobs and CronJobs under real runc: completions one at a time, a failed
/// attempt retried, a finished job deleted after its TTL, and a CronJob's run at its time
/// by the node's clock; `skiff get jobs` shows each.
#[test]
fn jobs_run_to_completion_and_cron_jobs_run_at_their_times() -> R {
    require_privileged!();
    let mut n = Node::new()?;
    n.up(None)?;
    // Outside the data directory (the node's policy refuses binds into it).
    let tmp = tempfile::tempdir()?;
    let work = tmp.path();
    let m = n.write(
        "jobs.yaml",
        &format!(
            r#"apiVersion: batch/v1
kind: Job
metadata: {{name: batch}}
spec:
  completions: 2
  parallelism: 1
  backoffLimit: 3
  template:
    spec:
      restartPolicy: OnFailure
      volumes: [{{name: w, hostPath: {{path: {work}}}}}]
      containers:
      - name: b
        image: {IMAGE}
        command: ["sh", "-c", "if mkdir /w/tried 2>/dev/null; then exit 1; fi; echo done-$(hostname)"]
        volumeMounts: [{{name: w, mountPath: /w}}]
---
apiVersion: batch/v1
kind: Job
metadata: {{name: short}}
spec:
  ttlSecondsAfterFinished: 1
  template: {{spec: {{restartPolicy: Never, containers: [{{name: s, image: {IMAGE}, command: ["true"]}}]}}}}
---
apiVersion: batch/v1
kind: CronJob
metadata: {{name: tick}}
spec:
  schedule: "* * * * *"
  concurrencyPolicy: Forbid
  jobTemplate:
    spec:
      template:
        spec:
          restartPolicy: Never
          containers: [{{name: t, image: {IMAGE}, command: ["sh", "-c", "echo tick"]}}]
"#,
            work = work.display()
        ),
    )?;
    n.ok(&["apply", "-f", &m.to_string_lossy()])?;
    let jobs = || -> anyhow::Result<Vec<skiff_model::job::JobView>> {
        Ok(serde_json::from_str(&n.ok(&["get", "jobs", "-o", "json"])?)?)
    };
    let job = |name: &str| jobs().ok()?.into_iter().find(|j| j.name == name);
    use skiff_model::job::RunState;
    let batch = wait_for(Duration::from_secs(60), "batch complete", || {
        job("batch").filter(|j| j.run.state == RunState::Complete)
    })
    .with_context(|| format!("jobs: {:?}\ninstances: {:?}\nlog: {}", jobs().ok(), n.instances().ok(), n.log()))?;
    assert_eq!((batch.run.succeeded, batch.run.failures), (2, 1), "{batch:?}");
    let (one, two) = (n.instance("batch-1")?, n.instance("batch-2")?);
    assert_eq!((one.restarts, one.exit_code, two.exit_code), (1, Some(0), Some(0)));
    let (started, finished) = (two.started_at_ms.unwrap_or(0), one.finished_at_ms.unwrap_or(u64::MAX));
    assert!(started >= finished, "parallelism 1: one at a time ({started} < {finished})");
    assert_eq!(n.ok(&["logs", "batch-2"])?, "done-batch-2\n");
    let table = n.ok(&["get", "jobs"])?;
    let line = table.lines().find(|l| l.starts_with("batch ")).unwrap_or_default();
    assert!(line.contains("Complete") && line.contains("2/2"), "{table}");

    // Finished, then deleted after its TTL by the hub.
    wait_for(Duration::from_secs(60), "short deleted", || {
        (!n.ok(&["get", "deployments"]).ok()?.contains("short")).then_some(())
    })?;
    assert!(n.events()?.iter().any(|e| e.reason == "JobDeleted" && e.object == "short"));

    // The CronJob's first time comes within a minute; its run completes (read before the
    // next minute's run replaces it).
    let tick = wait_for(Duration::from_secs(90), "tick's run complete", || {
        let j = job("tick").filter(|j| j.run.state == RunState::Complete)?;
        (n.ok(&["logs", "tick-1"]).ok()? == "tick\n").then_some(j)
    })?;
    assert_eq!(tick.schedule.as_deref(), Some("* * * * *"));
    assert!(n.events()?.iter().any(|e| e.reason == "RunStarted" && e.object == "tick"));
    Ok(())
}

/// A service with only a `build:` (a quarter of real compose files have one): `skiff up`
/// builds it with buildah, multi-stage, with its build arguments and target, and runs it;
/// `skiff build` builds again on its own.
#[test]
fn build_only_services_are_built_and_run() -> R {
    require_privileged!();
    let mut n = Node::new()?;
    let ctx = n.dir.path().join("app");
    std::fs::create_dir_all(&ctx)?;
    std::fs::copy("/bin/busybox", ctx.join("busybox"))?;
    std::fs::write(
        ctx.join("Dockerfile"),
        r#"FROM scratch AS base
COPY busybox /bin/busybox
FROM base AS build
ARG GREETING=none
RUN ["/bin/busybox", "sh", "-c", "/bin/busybox mkdir -p /out && /bin/busybox echo built $GREETING > /out/msg"]
FROM base AS final
COPY --from=build /out/msg /msg
CMD ["/bin/busybox", "sleep", "1000"]
FROM base AS broken
RUN ["/bin/busybox", "false"]
"#,
    )?;
    let compose = n.up_compose(
        "name: bt\nservices:\n  app:\n    build: {context: ./app, args: {GREETING: hi}, target: final}\n    stop_grace_period: 1s\n",
    )?;
    n.wait_running("app-1")?;
    assert_eq!(n.ok(&["exec", "app-1", "--", "/bin/busybox", "cat", "/msg"])?, "built hi\n");
    let images = n.ok(&["image", "ls"])?;
    assert!(images.contains("localhost/bt-app:latest"), "{images}");
    // `skiff build` alone: the broken stage, when it is the target, fails the build.
    n.ok(&["build", "-f", &compose.to_string_lossy()])?;
    let broken =
        n.write("broken.yaml", "name: bt\nservices:\n  app:\n    build: {context: ./app, target: broken}\n")?;
    let out = n.cli(&["build", "-f", &broken.to_string_lossy()])?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("services.app.build: buildah failed"), "{err}");
    let out = n.cli(&["build", "-f", &compose.to_string_lossy(), "nope"])?;
    assert!(String::from_utf8_lossy(&out.stderr).contains("nope: no service of that name has a build section"));

    // The same context from a Git repository (served by git's own daemon on loopback),
    // as Docker takes one: `URL#REF:DIR`, a tag and a directory in it.
    let repo = n.dir.path().join("git/shop.git");
    let work = n.dir.path().join("work");
    std::fs::create_dir_all(work.join("deploy"))?;
    for f in ["Dockerfile", "busybox"] {
        std::fs::copy(ctx.join(f), work.join("deploy").join(f))?;
    }
    let git = |dir: &std::path::Path, args: &[&str]| -> R {
        let out = std::process::Command::new("git")
            .current_dir(dir)
            .args(["-c", "user.name=t", "-c", "user.email=t@example.com"])
            .args(args)
            .output()?;
        anyhow::ensure!(out.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        Ok(())
    };
    std::os::unix::fs::symlink("/etc", work.join("outside"))?;
    git(&work, &["init", "-q", "-b", "main"])?;
    git(&work, &["add", "."])?;
    git(&work, &["commit", "-q", "-m", "v1"])?;
    git(&work, &["tag", "v1"])?;
    git(&work, &["clone", "-q", "--bare", ".", repo.to_str().unwrap_or_default()])?;
    let port = common::free_port();
    // git's daemon itself (`git daemon` would run it as a child, left behind on a kill).
    let exec_path = std::process::Command::new("git").arg("--exec-path").output()?;
    let daemon = std::path::Path::new(String::from_utf8_lossy(&exec_path.stdout).trim()).join("git-daemon");
    let _daemon = common::Started::spawn(std::process::Command::new(daemon).args([
        "--reuseaddr",
        "--export-all",
        "--listen=127.0.0.1",
        &format!("--port={port}"),
        &format!("--base-path={}", n.dir.path().join("git").display()),
    ]))?;
    wait_for(30 * SEC, "git daemon", || std::net::TcpStream::connect(("127.0.0.1", port)).ok())?;
    let remote = n.write(
        "remote.yaml",
        &format!(
            "name: bt\nservices:\n  fromgit:\n    build: {{context: 'git://127.0.0.1:{port}/shop.git#v1:deploy', args: \
             {{GREETING: git}}, target: final}}\n    command: [/bin/busybox, sleep, '1000']\n    stop_grace_period: 1s\n"
        ),
    )?;
    n.ok(&["apply", "-f", &remote.to_string_lossy()])?;
    n.wait_running("fromgit-1")?;
    assert_eq!(n.ok(&["exec", "fromgit-1", "--", "/bin/busybox", "cat", "/msg"])?, "built git\n");
    assert!(
        std::fs::read_dir(n.data().join("build/tmp"))?
            .all(|e| !e.is_ok_and(|e| e.file_name().to_string_lossy().starts_with("context-"))),
        "the checkout is removed after the build"
    );
    let missing = n.write(
        "missing.yaml",
        &format!("name: bt\nservices:\n  fromgit:\n    build: 'git://127.0.0.1:{port}/shop.git#v9'\n"),
    )?;
    n.write(
        "linked.yaml",
        &format!("name: bt\nservices:\n  fromgit:\n    build: 'git://127.0.0.1:{port}/shop.git#v1:outside'\n"),
    )?;
    let out = n.cli(&["build", "-f", &missing.to_string_lossy()])?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("no branch, tag or commit \"v9\""), "{err}");
    // A link in the repository to a host directory is no context.
    let out = n.cli(&["build", "-f", &missing.to_string_lossy().replace("missing", "linked")])?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("/etc leads out of the repository"), "{err}");
    Ok(())
}

#[test]
fn run_and_up_pull_from_a_registry() -> R {
    skiff_testkit::require_registry_tools!();
    let reg = skiff_testkit::registry::Registry::start()?;
    let layout = tempfile::tempdir()?;
    skiff_testkit::ImageBuilder::busybox()?.write_oci_layout(layout.path(), "x")?;
    reg.push(layout.path(), "edge/app:1")?;
    let image = format!("127.0.0.1:{}/edge/app:1", reg.port);
    let mut n = Node::new()?;
    n.up_compose(&format!(
        "name: pulled\nservices:\n  a:\n    image: {image}\n    command: [sleep, '1000']\n    stop_grace_period: 1s\n"
    ))?;
    n.wait_running("a-1")?;
    n.ok(&["image", "rm", &image]).expect_err("an image in use cannot be removed");
    n.ok(&[
        "run",
        &format!("127.0.0.1:{}/edge/app@{}", reg.port, n.image_digest(&image)?),
        "--name",
        "bydigest",
        "--",
        "true",
    ])?;
    let out = n.cli(&["image", "pull", &format!("127.0.0.1:{}/edge/missing:1", reg.port)])?;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("manifest edge/missing:1: not found"));
    Ok(())
}

#[test]
fn a_pull_killed_half_way_resumes_where_it_stopped() -> R {
    skiff_testkit::require_registry_tools!();
    let reg = skiff_testkit::registry::Registry::start()?;
    let layout = tempfile::tempdir()?;
    let big =
        skiff_testkit::LayerBuilder::new().file("blob", 0o644, &skiff_testkit::incompressible(4 << 20, 3))?.finish()?;
    skiff_testkit::ImageBuilder::busybox()?.layer(big).write_oci_layout(layout.path(), "x")?;
    reg.push(layout.path(), "edge/big:1")?;
    let image_size: u64 =
        std::fs::read_dir(layout.path().join("blobs/sha256"))?.map(|e| e.unwrap().metadata().unwrap().len()).sum();
    let proxy = skiff_testkit::registry::FaultProxy::start_with(reg.port, None, None, Some(2 << 20))?;
    let image = format!("127.0.0.1:{}/edge/big:1", proxy.port);
    let n = Node::new()?;
    let tmp = n.data().join("images/tmp");
    let partial_bytes = || -> u64 {
        std::fs::read_dir(&tmp)
            .map(|rd| {
                rd.flatten()
                    .filter(|e| e.file_name().to_string_lossy().starts_with("partial-"))
                    .map(|e| e.metadata().map(|m| m.len()).unwrap_or(0))
                    .max()
                    .unwrap_or(0)
            })
            .unwrap_or(0)
    };
    let mut child = std::process::Command::new(common::bin())
        .arg("--data")
        .arg(n.data())
        .args(["image", "pull", &image])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    wait_for(60 * SEC, "half of the big layer", || (partial_bytes() > 2 << 20).then_some(()))?;
    child.kill()?;
    child.wait()?;
    // What the killed run kept: complete blobs plus the partial download.
    let stored: u64 =
        std::fs::read_dir(n.data().join("images/blobs/sha256"))?.map(|e| e.unwrap().metadata().unwrap().len()).sum();
    let had = partial_bytes() + stored;
    let before = proxy.down.load(std::sync::atomic::Ordering::Relaxed);
    n.ok(&["image", "pull", &image])?;
    let second = proxy.down.load(std::sync::atomic::Ordering::Relaxed) - before;
    let needed = image_size - had;
    let again = second.saturating_sub(needed);
    eprintln!(
        "figures: image {image_size} B, had {had} B at SIGKILL, second run moved {second} B, re-downloaded {again} B"
    );
    assert!(
        again * 10 <= had,
        "re-downloaded {again} bytes of the {had} it had (second run moved {second}, needed {needed})"
    );
    assert!(n.ok(&["image", "ls"])?.contains("edge/big:1"));
    Ok(())
}

#[test]
fn metrics_show_cpu_burners_at_their_limits() -> R {
    require_privileged!();
    let mut n = Node::new()?;
    n.up(None)?;
    let burn = ["--", "sh", "-c", "while :; do :; done"];
    n.ok(&[&["run", IMAGE, "--name", "one", "--cpus", "1"][..], &burn].concat())?;
    n.ok(&[&["run", IMAGE, "--name", "half", "--cpus", "0.5"][..], &burn].concat())?;
    n.ok(&["run", IMAGE, "--name", "idle", "--", "sleep", "1000"])?;
    for i in ["one-1", "half-1", "idle-1"] {
        n.wait_running(i)?;
    }
    let cpu = |rows: &[serde_json::Value], name: &str| {
        rows.iter().find(|r| r["instance"] == name).and_then(|r| r["cpu_cores"].as_f64())
    };
    // Samples every second. Each burner must show near its limit in some window (other
    // tests compete for the CPUs, so not every window does), and never above it: the
    // quota caps whatever the load.
    let (mut top_one, mut top_half) = (0.0f64, 0.0f64);
    wait_for(Duration::from_secs(90), "one-1 near 1 core and half-1 near 0.5 in `skiff top`", || {
        let rows: Vec<serde_json::Value> =
            serde_json::from_str(&n.ok(&["top", "instances", "-o", "json"]).ok()?).ok()?;
        let (one, half, idle) = (cpu(&rows, "one-1")?, cpu(&rows, "half-1")?, cpu(&rows, "idle-1")?);
        assert!(one < 1.1 && half < 0.6 && idle < 0.05, "one {one}, half {half}, idle {idle}");
        (top_one, top_half) = (top_one.max(one), top_half.max(half));
        (top_one > 0.8 && top_half > 0.4).then_some(())
    })
    .with_context(|| format!("highest seen: one {top_one}, half {top_half}"))?;
    let node: Vec<serde_json::Value> = serde_json::from_str(&n.ok(&["top", "nodes", "-o", "json"])?)?;
    assert!(node[0]["cpu_cores"].as_f64().unwrap_or(0.0) >= 1.0, "the node sees the burners: {node:?}");
    assert!(node[0]["memory_total_bytes"].as_u64().unwrap_or(0) > 0);
    let table = n.ok(&["top", "instances"])?;
    assert!(table.starts_with("NAME") && table.contains("one-1"), "{table}");

    // An instance's traffic, counted on its veth: idle-1 knocks on a closed port of its
    // gateway (a SYN out, a reset back).
    let gateway = n.subnet.replace(".0/24", ".1");
    n.ok(&["exec", "idle-1", "--", "sh", "-c", &format!("wget -q -O /dev/null http://{gateway}:9/ || true")])?;
    wait_for(Duration::from_secs(30), "idle-1's traffic in `skiff top`", || {
        let rows: Vec<serde_json::Value> =
            serde_json::from_str(&n.ok(&["top", "instances", "-o", "json"]).ok()?).ok()?;
        let idle = rows.iter().find(|r| r["instance"] == "idle-1")?;
        (idle["tx_bytes"].as_u64()? > 0 && idle["rx_bytes"].as_u64()? > 0).then_some(())
    })?;

    // The same figures for Prometheus, behind the admin token.
    let conf: serde_json::Value = serde_json::from_slice(&std::fs::read(n.data().join("admin.conf"))?)?;
    let url = format!("{}/metrics", conf["server"].as_str().unwrap_or_default());
    let token = conf["token"].as_str().unwrap_or_default().to_string();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let (text, anon) = rt.block_on(async {
        let c = reqwest::Client::new();
        let text = c.get(&url).bearer_auth(&token).send().await?.error_for_status()?.text().await?;
        let anon = c.get(&url).send().await?.status();
        anyhow::Ok((text, anon))
    })?;
    assert_eq!(anon, 401);
    assert!(text.contains("skiff_instance_cpu_usage_cores{node=") && text.contains("instance=\"one-1\"}"), "{text}");
    assert!(text.contains("skiff_deployment_instances_running{deployment=\"half\"} 1.0"), "{text}");
    assert!(text.ends_with("# EOF\n"));
    Ok(())
}

/// The replica count the hub holds for `name`.
fn replicas_of(n: &Node, name: &str) -> Option<u64> {
    let all: Vec<serde_json::Value> = serde_json::from_str(&n.ok(&["get", "deployments", "-o", "json"]).ok()?).ok()?;
    all.iter().find(|d| d["spec"]["name"] == name)?["spec"]["replicas"].as_u64()
}

/// The last decision of `name`'s autoscaler.
fn autoscaler_of(n: &Node, name: &str) -> Option<serde_json::Value> {
    let all: Vec<serde_json::Value> = serde_json::from_str(&n.ok(&["get", "autoscalers", "-o", "json"]).ok()?).ok()?;
    all.into_iter().find(|a| a["deployment"] == name)
}

#[test]
fn the_autoscaler_scales_out_on_cpu_and_back_in_when_load_stops() -> R {
    require_privileged!();
    let mut n = Node::new()?;
    // Each instance burns its 0.2 CPU (its request, taken from the limit) while /tmp/load
    // exists; the target is 50 % of the request.
    let compose = n.write(
        "compose.yaml",
        &format!(
            "name: auto\nservices:\n  burn:\n    image: {IMAGE}\n    stop_grace_period: 1s\n    \
             command: [sh, -c, 'while :; do if [ -f /tmp/load ]; then :; else sleep 0.2; fi; done']\n    \
             deploy: {{resources: {{limits: {{cpus: '0.2'}}}}}}\n    x-skiff-autoscale:\n      \
             minReplicas: 1\n      maxReplicas: 3\n      \
             metrics: [{{type: Resource, resource: {{name: cpu, target: {{type: Utilization, averageUtilization: 50}}}}}}]\n      \
             behavior: {{scaleDown: {{stabilizationWindowSeconds: 5}}}}\n"
        ),
    )?;
    n.up_with(Some(&compose), &["--autoscale-interval", "1"])?;
    n.wait_running("burn-1")?;
    let replicas = |n: &Node| replicas_of(n, "burn");
    let status = |n: &Node| autoscaler_of(n, "burn");
    // Idle at 0 %: the autoscaler holds at its minimum.
    let idle = wait_for(Duration::from_secs(30), "a decision while idle", || status(&n))?;
    assert_eq!(idle["desiredReplicas"], 1, "{idle}");
    assert_eq!(replicas(&n), Some(1));

    // Load on burn-1: about 100 % of its request against 50 % → 2 replicas (3 when a
    // window measures a hair over the quota: a ratio of 2.02 rounds up), and the new one
    // idles.
    n.ok(&["exec", "burn-1", "--", "touch", "/tmp/load"])?;
    wait_for(Duration::from_secs(60), "a scale-out", || (replicas(&n)? >= 2).then_some(()))?;
    n.wait_running("burn-2")?;
    // Load on both: 100 % → 4, capped at maxReplicas 3.
    n.ok(&["exec", "burn-2", "--", "touch", "/tmp/load"])?;
    wait_for(Duration::from_secs(60), "a scale-out to 3", || (replicas(&n)? == 3).then_some(()))?;
    let events = n.events()?;
    let rescales: Vec<_> = events.iter().filter(|e| e.object == "burn" && e.reason == "SuccessfulRescale").collect();
    let why = "reason: cpu resource utilization (percentage of request) above target";
    assert!(!rescales.is_empty() && rescales.iter().all(|e| e.message.contains(why)), "{rescales:?}");
    assert!(rescales.iter().any(|e| e.message.starts_with("New size: 3;")), "{rescales:?}");

    // The load stops: after the 5 s scale-down window, back to the minimum.
    for i in ["burn-1", "burn-2"] {
        n.ok(&["exec", i, "--", "rm", "-f", "/tmp/load"])?;
    }
    wait_for(Duration::from_secs(60), "a scale-in to 1", || (replicas(&n)? == 1).then_some(()))?;
    let s = status(&n).unwrap();
    assert_eq!((s["minReplicas"].as_i64(), s["maxReplicas"].as_i64()), (Some(1), Some(3)));

    // A Kubernetes HPA for a deployment that does not exist is refused, naming it.
    let hpa = n.write(
        "hpa.yaml",
        "apiVersion: autoscaling/v2\nkind: HorizontalPodAutoscaler\nmetadata: {name: h}\nspec:\n  \
         scaleTargetRef: {apiVersion: apps/v1, kind: Deployment, name: nothere}\n  maxReplicas: 4\n",
    )?;
    let out = n.cli(&["apply", "-f", hpa.to_str().unwrap()])?;
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("HorizontalPodAutoscaler/h.spec.scaleTargetRef: deployment \"nothere\" not found"),
        "{out:?}"
    );
    // One for the running deployment replaces its autoscaler.
    std::fs::write(&hpa, std::fs::read_to_string(&hpa)?.replace("nothere", "burn"))?;
    n.ok(&["apply", "-f", hpa.to_str().unwrap()])?;
    wait_for(Duration::from_secs(30), "the new autoscaler in effect", || {
        (status(&n)?["maxReplicas"].as_i64()? == 4).then_some(())
    })?;
    Ok(())
}

/// A compose file for the rollout test: `web` answers `VERSION` on a published port.
/// An autoscaler on the workload's own Prometheus metric (a Pods metric): each instance
/// serves `queue_depth` on /metrics, the agent scrapes it at every sample because of the
/// `prometheus.io/*` labels, and the hub scales on its per-pod average.
#[test]
fn the_autoscaler_scales_on_a_workloads_own_prometheus_metric() -> R {
    require_privileged!();
    let mut n = Node::new()?;
    n.rust_log = "info,skiff_agent::scrape=debug".into();
    // Every instance serves the page written in /www/metrics of its own filesystem.
    let compose = n.write(
        "compose.yaml",
        &format!(
            "name: own\nservices:\n  queue:\n    image: {IMAGE}\n    stop_grace_period: 1s\n    \
             command: [sh, -c, 'mkdir -p /www && echo queue_depth 0 > /www/metrics && exec httpd -f -p 9100 -h /www']\n    \
             labels: {{prometheus.io/scrape: 'true', prometheus.io/port: '9100', prometheus.io/path: /metrics}}\n    \
             x-skiff-autoscale:\n      minReplicas: 1\n      maxReplicas: 3\n      \
             metrics: [{{type: Pods, pods: {{metric: {{name: queue_depth, selector: {{matchLabels: {{queue: in}}}}}}, \
             target: {{type: AverageValue, averageValue: '5'}}}}}}]\n      \
             behavior: {{scaleDown: {{stabilizationWindowSeconds: 2}}}}\n"
        ),
    )?;
    n.up_with(Some(&compose), &["--autoscale-interval", "1"])?;
    n.wait_running("queue-1")?;
    let replicas = |n: &Node| replicas_of(n, "queue");
    let status = |n: &Node| autoscaler_of(n, "queue");
    let page = |n: &Node, instance: &str, text: &str| -> R {
        n.ok(&["exec", instance, "--", "sh", "-c", &format!("printf '{text}' > /www/metrics")])?;
        Ok(())
    };
    // The page has the metric but no series with queue="in": the metric is missing, and
    // the autoscaler says so and holds.
    let missing = wait_for(Duration::from_secs(30), "a decision without the series", || {
        status(&n).filter(|s| s["reason"].as_str().is_some_and(|r| r.contains("unable to get metric queue_depth")))
    })?;
    assert!(missing["reason"].as_str().unwrap().starts_with("FailedGetPodsMetric: "), "{missing}");
    assert_eq!(replicas(&n), Some(1));
    // 12 waiting on the one instance (the other queue and other metrics do not count):
    // 12/5 → ceil(2.4) = 3.
    page(
        &n,
        "queue-1",
        "# TYPE queue_depth gauge\\nqueue_depth{queue=\"in\"} 12\\nqueue_depth{queue=\"out\"} 500\\nother 9\\n",
    )?;
    wait_for(Duration::from_secs(60), "a scale-out to 3", || (replicas(&n)? == 3).then_some(()))
        .with_context(|| format!("autoscaler: {:?}\nlog: {}", status(&n), n.log()))?;
    let s = wait_for(Duration::from_secs(30), "the average shown", || {
        status(&n).filter(|s| s["currentAverageValue"] == "12")
    })?;
    assert_eq!(s["desiredReplicas"], 3, "{s}");
    let events = n.events()?;
    let rescales: Vec<_> = events.iter().filter(|e| e.object == "queue" && e.reason == "SuccessfulRescale").collect();
    assert!(
        rescales.iter().any(
            |e| e.message.starts_with("New size: 3;") && e.message.contains("pods metric queue_depth above target")
        ),
        "{rescales:?}"
    );
    // The new instances report 0 (their page's first line does not match the selector
    // either: they are missing until written), then 1 each: (1+1+1)/3 = 1 of 5 → 1.
    for i in ["queue-1", "queue-2", "queue-3"] {
        n.wait_running(i)?;
        page(&n, i, "queue_depth{queue=\"in\"} 1\\n")?;
    }
    wait_for(Duration::from_secs(60), "a scale-in to 1", || (replicas(&n)? == 1).then_some(()))?;
    Ok(())
}

/// `listen` is the port httpd binds (not 80: the health check and the proxy both fail).
fn versioned(port: u16, version: &str, listen: u16, update: &str) -> String {
    format!(
        r#"name: roll
services:
  web:
    image: {IMAGE}
    environment: {{VERSION: "{version}"}}
    command: ["sh", "-c", "mkdir -p /v && echo $$VERSION > /v/index.html && exec httpd -f -p {listen} -h /v"]
    ports: ["127.0.0.1:{port}:80"]
    stop_grace_period: 2s
    healthcheck:
      test: ["CMD", "wget", "-q", "-O", "/dev/null", "http://127.0.0.1/"]
      interval: 300ms
      retries: 3
    deploy:
      replicas: 2
      update_config: {{{update}}}
"#
    )
}

#[test]
fn rolling_and_blue_green_updates_fail_no_request_and_a_broken_version_rolls_back() -> R {
    updates_fail_no_request("none")
}

/// The same updates with the published port forwarded by the kernel (nftables): a
/// stopping instance is drained by its connections in the host's connection table.
#[test]
fn updates_through_kernel_forwarded_ports_fail_no_request() -> R {
    updates_fail_no_request("nft")
}

/// Rolling and blue-green updates under steady traffic through the published port (the
/// agent's proxy with `firewall` none, else the kernel's rules).
fn updates_fail_no_request(firewall: &'static str) -> R {
    use skiff_testkit::traffic::{report, Traffic};
    require_privileged!();
    // The two variants one at a time: side by side on 2 cores, each one's rollbacks (a
    // crash loop's back-off, health checks) ran past the waits below.
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut n = Node::new()?;
    n.firewall = firewall;
    // Each proxied connection's fate, for a request that fails.
    n.rust_log = "info,skiff_agent::proxy=debug".into();
    let port = free_port();
    let rolling = "order: start-first, parallelism: 1, monitor: 1s";
    let file = n.up_compose(&versioned(port, "v1", 80, rolling))?;
    // The gateway's MAC address stays put while veths come and go.
    let bridge_mac = || std::fs::read_to_string(format!("/sys/class/net/{}/address", n.bridge)).unwrap_or_default();
    let gateway_mac = skiff_runtime::network::mac_of(n.subnet.replace(".0/24", ".1").parse()?);
    assert_eq!(bridge_mac().trim(), gateway_mac);
    let status = |n: &Node| -> anyhow::Result<String> { n.ok(&["rollout", "status", "web", "--timeout", "90s"]) };
    status(&n)?;
    let apply = |n: &Node, text: String| -> R {
        std::fs::write(&file, text)?;
        n.ok(&["apply", "-f", &file.to_string_lossy()])?;
        Ok(())
    };
    let serving = |n: &Node| -> anyhow::Result<Vec<String>> {
        let mut v: Vec<String> =
            n.instances()?.into_iter().filter(|i| i.deployment == "web" && !i.retiring).map(|i| i.template).collect();
        v.dedup();
        Ok(v)
    };

    let traffic = Traffic::start(port, "/", Duration::from_millis(5), 100_000, Duration::from_secs(600));
    wait_for(10 * SEC, "first answers", || traffic.samples().iter().any(|s| s.body.is_ok()).then_some(()))?;

    // Rolling: one at a time, the new one beside the old until ready.
    apply(&n, versioned(port, "v2", 80, rolling))?;
    let out = status(&n)?;
    assert!(out.contains("revision 2: complete (2 of 2 updated, 2 ready, 0 old)"), "{out}");
    assert_eq!(serving(&n)?.len(), 1, "every replica runs one template");
    let retired = n.events()?;
    assert!(retired.iter().any(|e| e.reason == "Retiring" && e.object == "web-1"), "{retired:?}");

    // Blue-green: both new instances come up beside the old; traffic moves at once.
    let bg = "order: start-first, monitor: 1s, x-skiff-strategy: blue-green, x-skiff-rollback-window: 3s";
    let before_v3 = traffic.samples().len();
    apply(&n, versioned(port, "v3", 80, bg))?;
    let out = status(&n)?;
    assert!(out.contains("revision 3: complete"), "{out}");
    wait_for(20 * SEC, "the old version gone after its window", || {
        n.instances().ok().filter(|v| v.iter().all(|i| !i.retiring)).map(|_| ())
    })
    .with_context(|| format!("instances: {:#?}\nevents: {:#?}", n.instances().ok(), n.events().ok()))?;
    // The sampler may still be in a request begun before the switch (bounded by its own
    // timeouts; a request that failed is counted below).
    wait_for(30 * SEC, "v3 answering through the port", || {
        let s = traffic.samples();
        s[before_v3..].iter().any(|x| x.body.as_deref().is_ok_and(|b| b.trim() == "v3")).then_some(())
    })
    .with_context(|| {
        format!(
            "samples since the switch: {:?}",
            &traffic.samples()[before_v3..].iter().rev().take(5).collect::<Vec<_>>()
        )
    })?;
    let s = traffic.samples();
    let bodies: Vec<&str> = s[before_v3..].iter().filter_map(|x| x.body.as_deref().ok()).map(str::trim).collect();
    let first_v3 = bodies.iter().position(|b| *b == "v3").context("v3 answered")?;
    assert!(bodies[first_v3..].iter().all(|b| *b == "v3"), "after the switch only v3 answers");
    assert!(bodies[..first_v3].iter().all(|b| *b == "v2"), "before the switch only v2 answers");

    // A version that never listens: its health check fails, the hub rolls back, and v3
    // (kept beside it) answers throughout.
    let before_v4 = traffic.samples().len();
    apply(&n, versioned(port, "v4", 8080, rolling))?;
    let out = n.cli(&["rollout", "status", "web", "--timeout", "90s"])?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "a failed rollout exits 1: {text}");
    assert!(text.contains("revision 4: failed") && text.contains("web-1 is unhealthy"), "{text}");
    // Bounds, not timings: on a loaded 2-core machine a rollback past health checks and
    // crash-loop back-offs has taken over 30 s.
    let out = wait_for(90 * SEC, "the rollback to complete", || {
        n.ok(&["rollout", "status", "web", "--no-wait"]).ok().filter(|o| o.contains("revision 5: complete"))
    })
    .with_context(|| {
        format!("status: {:?}\ninstances: {:#?}", n.ok(&["rollout", "status", "web", "--no-wait"]), n.instances().ok())
    })?;
    assert!(out.contains("2 of 2 updated"), "{out}");
    let history = n.ok(&["rollout", "history", "web"])?;
    assert!(history.lines().any(|l| l.starts_with("4 ") && l.contains("failed")), "{history}");
    assert!(history.contains("rollback to revision 3 (revision 4 failed)"), "{history}");
    let events = n.events()?;
    assert!(events.iter().any(|e| e.reason == "RolledBack" && e.object == "web"), "{events:?}");
    let s = traffic.samples();
    assert!(s[before_v4..].iter().filter_map(|x| x.body.as_deref().ok()).all(|b| b.trim() == "v3"), "v3 kept serving");

    // A version that crash-loops (restart: always, exits at once): rolled back too.
    let before_v5 = traffic.samples().len();
    let crashing = versioned(port, "v5", 80, rolling).replace(
        r#"command: ["sh", "-c", "mkdir"#,
        r#"restart: always
    command: ["sh", "-c", "exit 1; mkdir"#,
    );
    apply(&n, crashing)?;
    let out = n.cli(&["rollout", "status", "web", "--timeout", "90s"])?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success() && text.contains("revision 6: failed"), "{text}");
    assert!(text.contains("web-1 restarted") || text.contains("web-1 exited"), "{text}");
    wait_for(90 * SEC, "the second rollback to complete", || {
        n.ok(&["rollout", "status", "web", "--no-wait"]).ok().filter(|o| o.contains("revision 7: complete"))
    })
    .with_context(|| {
        format!("status: {:?}\ninstances: {:#?}", n.ok(&["rollout", "status", "web", "--no-wait"]), n.instances().ok())
    })?;
    let s = traffic.samples();
    assert!(s[before_v5..].iter().filter_map(|x| x.body.as_deref().ok()).all(|b| b.trim() == "v3"), "v3 kept serving");

    // Undo goes back to the newest complete revision before: v2.
    let out = n.ok(&["rollout", "undo", "web"])?;
    assert!(out.contains("undo to revision 2"), "{out}");
    status(&n)?;
    wait_for(10 * SEC, "v2 answering", || http_get(port, "/").ok().filter(|b| b.trim() == "v2"))?;
    let bad = n.cli(&["rollout", "undo", "web", "--to-revision", "99"])?;
    assert!(String::from_utf8_lossy(&bad.stderr).contains("to_revision: web has no revision 99"));

    let r = report(&traffic.finish());
    assert_eq!(bridge_mac().trim(), gateway_mac, "the bridge kept its address through the updates");
    // The log without its colours.
    let log: String = n
        .log()
        .split('\x1b')
        .enumerate()
        .map(|(i, p)| if i == 0 { p } else { p.split_once('m').map_or(p, |x| x.1) })
        .collect();
    let warnings: Vec<&str> = log.lines().filter(|l| l.contains("WARN")).collect();
    // Connections that took a second or more, or found no target, and the agent's events.
    let slow: Vec<&str> = log
        .lines()
        .filter(|l| {
            l.contains("no target took")
                || l.contains("INFO") && l.contains("event")
                || l.split("total_ms=")
                    .nth(1)
                    .and_then(|t| t.split(' ').next()?.parse::<u64>().ok())
                    .is_some_and(|ms| ms >= 1000)
        })
        .collect();
    assert!(r.sent > 200, "{r:?}");
    assert_eq!(
        r.failed, 0,
        "no request failed during the updates: {r:?}\nthe node's warnings: {warnings:#?}\nslow connections and events: {slow:#?}"
    );
    // No connection was sent to an instance that was already drained and stopped (it
    // would hang until the connect timed out, then try the next).
    let stale: Vec<&&str> = warnings.iter().filter(|l| l.contains("no answer from the target")).collect();
    assert!(stale.is_empty(), "connections sent to stopped instances: {stale:#?}\n{r:?}");
    eprintln!("rollout traffic: {r:?}");
    Ok(())
}

#[test]
fn an_alert_rule_fires_scales_out_and_resolves() -> R {
    require_privileged!();
    let mut n = Node::new()?;
    let bad = n.write(
        "bad-rules.yaml",
        "groups:\n- name: edge\n  rules:\n  - alert: Hot\n    expr: skiff_node_temperature > 70\n",
    )?;
    let out = n.up_refused_with(None, &["--alert-rules", &bad.to_string_lossy()])?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("groups[0].rules[0].expr: skiff_node_temperature is not a metric of the hub"), "{err}");
    assert!(!n.data().join("agent.db").exists(), "nothing was started");

    // `burn` uses its 0.3 CPU while /tmp/load exists; the rule adds an instance while the
    // deployment uses more than 0.2 cores for 2 s, up to 2.
    let rules = n.write(
        "rules.yaml",
        "groups:\n- name: edge\n  rules:\n  - alert: BurnHot\n    \
         expr: skiff_deployment_cpu_usage_cores{deployment=\"burn\"} > 0.2\n    for: 2s\n    \
         labels: {severity: warning}\n    x-skiff-scale-out: {deployment: burn, step: 1, max: 2}\n",
    )?;
    let compose = n.write(
        "compose.yaml",
        &format!(
            "name: alert\nservices:\n  burn:\n    image: {IMAGE}\n    stop_grace_period: 1s\n    \
             command: [sh, -c, 'while :; do if [ -f /tmp/load ]; then :; else sleep 0.2; fi; done']\n    \
             deploy: {{resources: {{limits: {{cpus: '0.3'}}}}}}\n"
        ),
    )?;
    n.up_with(Some(&compose), &["--alert-rules", &rules.to_string_lossy(), "--alert-interval", "1"])?;
    n.wait_running("burn-1")?;
    let alerts = |n: &Node| -> Vec<serde_json::Value> {
        n.ok(&["get", "alerts", "-o", "json"]).ok().and_then(|t| serde_json::from_str(&t).ok()).unwrap_or_default()
    };
    assert!(alerts(&n).is_empty(), "idle: no alert");

    n.ok(&["exec", "burn-1", "--", "touch", "/tmp/load"])?;
    let firing = wait_for(Duration::from_secs(60), "the alert firing", || {
        alerts(&n).into_iter().find(|a| a["state"] == "firing" && a["action"].is_string())
    })?;
    assert_eq!(firing["labels"]["deployment"], "burn", "{firing}");
    assert_eq!(firing["labels"]["severity"], "warning", "{firing}");
    assert_eq!(firing["action"], "scaled burn from 1 to 2", "{firing}");
    n.wait_running("burn-2")?;
    let table = n.ok(&["get", "alerts"])?;
    assert!(table.lines().any(|l| l.starts_with("BurnHot") && l.contains("firing")), "{table}");
    let events = n.events()?;
    assert!(events.iter().any(|e| e.reason == "AlertScaledOut" && e.object == "burn"), "{events:?}");

    n.ok(&["exec", "burn-1", "--", "rm", "-f", "/tmp/load"])?;
    wait_for(Duration::from_secs(60), "the alert resolved", || alerts(&n).is_empty().then_some(()))?;
    assert!(n.events()?.iter().any(|e| e.reason == "AlertResolved"));
    Ok(())
}

/// When the agent cannot start (here: an interface with the bridge's name that is not a
/// bridge), `skiff up` says why and exits non-zero instead of accepting deployments no
/// loop would ever start. (With fleet services the bridge is made when the agent opens,
/// before its DNS binds on it; without, when its loop starts.)
#[test]
fn skiff_up_stops_when_its_agent_loop_dies() -> anyhow::Result<()> {
    require_privileged!();
    let mut n = Node::new()?;
    let bridge = n.bridge.clone();
    let peer = format!("{}p", &bridge[..bridge.len().min(14)]);
    let ip = |args: &[&str]| std::process::Command::new("ip").args(args).status();
    anyhow::ensure!(ip(&["link", "add", &bridge, "type", "veth", "peer", "name", &peer])?.success(), "veth");
    struct Link(String);
    impl Drop for Link {
        fn drop(&mut self) {
            let _ = std::process::Command::new("ip").args(["link", "del", &self.0]).status();
        }
    }
    let _link = Link(bridge.clone());
    let subnet = n.subnet.clone();
    n.spawn(&["up", "--listen", "127.0.0.1:0", "--bridge", &bridge, "--subnet", &subnet])?;
    let st = n.wait_exit(Duration::from_secs(30))?;
    let log = n.log();
    assert!(!st.success(), "exited with {st}: {log}");
    assert!(log.contains(&format!("network interface {bridge} exists and is not a bridge")), "{log}");
    Ok(())
}

#[test]
fn run_takes_docker_habits_detach_env_files_and_labels() -> R {
    require_privileged!();
    let mut n = Node::new()?;
    n.up(None)?;
    let env = n.write("app.env", "# settings\nA=from-file\nB=from-file\n\nC\n")?;
    let env = env.to_string_lossy().to_string();
    let args = ["run", IMAGE, "-d", "--name", "envs", "--env-file", &env, "-e", "B=flag", "-l", "team=edge"];
    n.ok(&[&args[..], &["--", "sleep", "1000"]].concat())?;
    n.wait_running("envs-1")?;
    let got = n.ok(&["exec", "envs-1", "--", "sh", "-c", "echo \"$A-$B-${C-unset}\""])?;
    assert_eq!(
        got.trim(),
        "from-file-flag-",
        "the file first, --env over it; a bare key takes the shell's (unset: empty)"
    );
    let deployments = n.ok(&["get", "deployments", "-o", "json"])?;
    assert!(deployments.contains("\"team\": \"edge\""), "{deployments}");
    let missing = n.cli(&["run", IMAGE, "--name", "nope", "--env-file", "/nonexistent.env"])?;
    let err = String::from_utf8_lossy(&missing.stderr);
    assert!(!missing.status.success() && err.contains("--env-file /nonexistent.env"), "{err}");
    Ok(())
}

/// `skiff bundle`: a node without a registry gets v2 of an app as a file holding only what
/// v1 lacks, runs it under runc, and a node without v1 refuses the file and stores nothing.
#[test]
fn a_delta_bundle_updates_a_node_that_holds_the_old_image() -> R {
    require_privileged!();
    use sha2::Digest as _;
    let (v1, v2) = ("localhost/bundled:1", "localhost/bundled:2");
    let old = skiff_testkit::incompressible(4 << 20, 21);
    let mut new = old.clone();
    new[2 << 20..(2 << 20) + (128 << 10)].copy_from_slice(&skiff_testkit::incompressible(128 << 10, 22));
    let image = |data: &[u8], extra: bool| -> anyhow::Result<skiff_testkit::ImageBuilder> {
        let mut l = skiff_testkit::LayerBuilder::new().file("data/blob", 0o644, data)?;
        if extra {
            l = l.file("data/added", 0o644, b"appended\n")?;
        }
        Ok(skiff_testkit::ImageBuilder::busybox()?.layer(l.finish()?))
    };
    let build = Node::bare()?;
    build.load(&image(&old, false)?, v1)?;
    build.load(&image(&new, true)?, v2)?;
    let file = build.data().join("app-2.bundle");
    let f = file.to_str().unwrap_or_default();
    let said = build.ok(&["bundle", "create", v2, "--since", v1, "-o", f])?;
    assert!(said.contains("wrote") && said.contains(v2), "{said}");
    let size = std::fs::metadata(&file)?.len();
    assert!(size < 1 << 20, "a {size}-byte bundle for a 128 KiB edit of a 4 MiB file");
    let shown = build.ok(&["bundle", "inspect", f])?;
    assert!(shown.contains(&format!("since:     {v1}")), "{shown}");
    let json: serde_json::Value = serde_json::from_str(&build.ok(&["bundle", "inspect", f, "-o", "json"])?)?;
    assert_eq!(json["since"]["reference"], v1);

    let mut n = Node::bare()?;
    n.load(&image(&old, false)?, v1)?;
    let said = n.ok(&["bundle", "load", f])?;
    assert!(said.contains(&format!("Loaded image: {v2}")) && said.contains("1 layers rebuilt"), "{said}");
    n.up(None)?;
    n.ok(&["run", v2, "--name", "app", "--", "sleep", "1000"])?;
    n.wait_running("app-1")?;
    let got = n.ok(&["exec", "app-1", "--", "sh", "-c", "sha256sum /data/blob; cat /data/added"])?;
    assert_eq!(got, format!("{}  /data/blob\nappended\n", hex::encode(sha2::Sha256::digest(&new))));

    let fresh = Node::bare()?;
    let out = fresh.cli(&["bundle", "load", f])?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains(&format!("--since {v1}")) && err.contains("nothing was loaded"),
        "{err}"
    );
    assert_eq!(fresh.ok(&["image", "ls", "-o", "json"])?.trim(), "[]");
    let out = fresh.data().join("x.bundle");
    let bad = fresh.cli(&["bundle", "create", v2, "-o", out.to_str().unwrap_or_default(), "--platform", "linux"])?;
    assert!(!bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("not a platform"));
    Ok(())
}
