//! The `.deb` (scripts/package-deb.sh) installs on this Debian machine: the binary, the
//! systemd units (which systemd's own checker accepts), man pages and completions; and
//! `skiff install` writes a unit and flags that systemd accepts, refusing bad flags.
//! A service restart as systemd does it (SIGTERM to the main process only, as
//! `KillMode=process` says) leaves the containers running.

#![allow(clippy::unwrap_used)] // tests may panic on setup failures

mod common;

use common::{Node, IMAGE};
use skiff_testkit::require_privileged;
use std::path::Path;
use std::process::Command;

type R = anyhow::Result<()>;

/// `systemd-analyze verify` on units: fine only when it says nothing at all (it reports
/// unknown keys and bad values as warnings with a zero exit).
fn verify(units: &[&Path]) -> anyhow::Result<()> {
    let out = Command::new("systemd-analyze").arg("verify").args(units).output()?;
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    anyhow::ensure!(out.status.success() && said.trim().is_empty(), "systemd-analyze verify {units:?}: {said}");
    Ok(())
}

/// Removes the package when the test ends, passed or not.
struct Installed;

impl Drop for Installed {
    fn drop(&mut self) {
        let _ = Command::new("dpkg").args(["--purge", "skiff"]).output();
    }
}

#[test]
fn the_deb_installs_units_that_systemd_accepts_and_a_restart_keeps_containers() -> R {
    require_privileged!();
    let status = Command::new("dpkg-query").args(["-W", "-f", "${Status}", "skiff"]).output()?;
    if String::from_utf8_lossy(&status.stdout).contains("installed") {
        eprintln!("skipped: a skiff package is installed on this machine already; not replacing it");
        return Ok(());
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let out_dir = tempfile::tempdir()?;
    let built = Command::new(root.join("scripts/package-deb.sh"))
        .env("SKIFF_BIN", common::bin())
        .env("OUT_DIR", out_dir.path())
        .env("DEB_COMPRESS", "gzip")
        .output()?;
    anyhow::ensure!(built.status.success(), "package-deb.sh: {}", String::from_utf8_lossy(&built.stderr));
    let deb = String::from_utf8_lossy(&built.stdout).trim().to_string();
    let arch =
        String::from_utf8_lossy(&Command::new("dpkg").arg("--print-architecture").output()?.stdout).trim().to_string();
    assert!(deb.ends_with(&format!("skiff_{}_{arch}.deb", env!("CARGO_PKG_VERSION"))), "{deb}");
    let contents =
        String::from_utf8_lossy(&Command::new("dpkg-deb").args(["--contents", &deb]).output()?.stdout).into_owned();
    for f in [
        "./usr/bin/skiff",
        "./lib/systemd/system/skiff-agent.service",
        "./lib/systemd/system/skiff-hub.service",
        "./lib/systemd/system/skiff-up.service",
        "./usr/share/man/man1/skiff.1.gz",
        "./usr/share/man/man1/skiff-exec.1.gz",
        "./usr/share/bash-completion/completions/skiff",
        "./usr/share/zsh/vendor-completions/_skiff",
        "./usr/share/fish/vendor_completions.d/skiff.fish",
    ] {
        assert!(contents.contains(f), "{f} not in the package:\n{contents}");
    }
    let info = String::from_utf8_lossy(&Command::new("dpkg-deb").args(["--field", &deb, "Depends"]).output()?.stdout)
        .into_owned();
    // runc always; a dynamically linked binary (this test's debug build) also a glibc
    // at least as new as its newest symbol.
    let info = info.trim();
    assert!(info == "runc" || (info.starts_with("libc6 (>= 2.") && info.ends_with("), runc")), "Depends: {info}");

    let _installed = Installed;
    let inst = Command::new("dpkg").args(["-i", &deb]).output()?;
    anyhow::ensure!(inst.status.success(), "dpkg -i: {}", String::from_utf8_lossy(&inst.stderr));
    let v = Command::new("/usr/bin/skiff").arg("--version").output()?;
    assert_eq!(String::from_utf8_lossy(&v.stdout).trim(), format!("skiff {}", env!("CARGO_PKG_VERSION")));
    verify(&[
        Path::new("/lib/systemd/system/skiff-agent.service"),
        Path::new("/lib/systemd/system/skiff-hub.service"),
        Path::new("/lib/systemd/system/skiff-up.service"),
    ])?;
    let bash = std::fs::read_to_string("/usr/share/bash-completion/completions/skiff")?;
    assert!(bash.contains("exec") && bash.contains("--interactive"), "bash completion names the verbs and flags");

    // `skiff install` writes a unit and flags under a root; bad flags are refused there.
    let n = Node::new()?;
    let dest = tempfile::tempdir()?;
    let d = dest.path().to_str().unwrap();
    let token = n.write("token", "t")?;
    let args = ["install", "agent", "--root", d, "--no-start", "--", "--hub", "https://127.0.0.1:7443"];
    n.ok(&[&args[..], &["--token-file", token.to_str().unwrap(), "--label", "site=a"]].concat())?;
    let unit = dest.path().join("etc/systemd/system/skiff-agent.service");
    verify(&[&unit])?;
    let flags = std::fs::read_to_string(dest.path().join("etc/default/skiff-agent"))?;
    assert!(flags.contains("SKIFF_AGENT_ARGS=\"--hub https://127.0.0.1:7443 --token-file"), "{flags}");
    let bad = n.cli(&["install", "agent", "--root", d, "--no-start", "--", "--hubb", "x"])?;
    assert!(!bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("--hubb"), "{bad:?}");

    // Under systemd (Type=notify): readiness reaches $NOTIFY_SOCKET, and no child takes
    // the socket (runc, seeing it, would wait for the container to say it is ready).
    let mut n = n;
    let sock = n.data().join("notify.sock");
    let listener = std::os::unix::net::UnixDatagram::bind(&sock)?;
    listener.set_read_timeout(Some(std::time::Duration::from_secs(60)))?;
    n.up_env.push(("NOTIFY_SOCKET".into(), sock.display().to_string()));
    let ready = |l: &std::os::unix::net::UnixDatagram| -> anyhow::Result<String> {
        let mut buf = [0u8; 256];
        let k = l.recv(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf[..k]).into_owned())
    };
    n.up(None)?;
    assert_eq!(ready(&listener)?, "READY=1\n");
    // What systemd does on `systemctl restart` with KillMode=process: SIGTERM to the main
    // process only, then a new one. The containers run on, the same processes.
    n.ok(&["run", IMAGE, "--name", "keep", "--", "sleep", "1000"])?;
    let before = n.wait_running("keep-1")?;
    n.terminate_up()?;
    n.up(None)?;
    assert_eq!(ready(&listener)?, "READY=1\n");
    let after = n.wait_running("keep-1")?;
    assert_eq!((after.pid, after.restarts), (before.pid, 0), "the container ran on through the restart");
    Ok(())
}
