//! `skiff exec` end to end on one node: a real terminal (a pseudo-terminal the test makes,
//! typed into as a person would), pipes, exit codes, and a caller that goes away.

#![allow(clippy::unwrap_used)] // tests may panic on setup failures

mod common;

use common::{wait_for, Forward, Node, Terminal, IMAGE};
use skiff_testkit::require_privileged;
use std::time::Duration;

type R = anyhow::Result<()>;
const SEC: Duration = Duration::from_secs(1);

/// One ustar entry (`kind` `0` file, `1` hard link, `2` symlink) with `data`, written by
/// hand: a hostile archive's names are what no archiver would write.
fn tar_entry(name: &str, kind: u8, link: &str, data: &[u8]) -> Vec<u8> {
    let mut h = vec![0u8; 512];
    h[..name.len()].copy_from_slice(name.as_bytes());
    h[100..108].copy_from_slice(b"0000644\0");
    h[108..116].copy_from_slice(b"0000000\0");
    h[116..124].copy_from_slice(b"0000000\0");
    h[124..136].copy_from_slice(format!("{:011o}\0", data.len()).as_bytes());
    h[136..148].copy_from_slice(b"00000000000\0");
    h[156] = kind;
    h[157..157 + link.len()].copy_from_slice(link.as_bytes());
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|b| u32::from(*b)).sum();
    h[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
    h.extend_from_slice(data);
    h.resize(512 + data.len().div_ceil(512) * 512, 0);
    h
}

/// Runs `script` with `sh -c` in box-1; its output.
fn sh(n: &Node, script: &str) -> anyhow::Result<String> {
    n.ok(&["exec", "box-1", "--", "sh", "-c", script])
}

/// Processes in the instance whose command line is `cmd`.
fn running(n: &Node, instance: &str, cmd: &str) -> anyhow::Result<usize> {
    let ps = n.ok(&["exec", instance, "--", "ps", "-o", "args"])?;
    Ok(ps.lines().filter(|l| l.trim() == cmd).count())
}

#[test]
fn exec_streams_pipes_and_gives_a_terminal() -> R {
    require_privileged!();
    let mut n = Node::new()?;
    n.up(None)?;
    n.ok(&["run", IMAGE, "--name", "box", "--", "sleep", "1000"])?;
    n.wait_running("box-1")?;

    // -i: a pipe in; stdout and stderr apart; the command's exit code.
    let script = "read x; echo got $x; echo oops >&2; exit 4";
    let out = n.cli_input(&["exec", "-i", "box-1", "--", "sh", "-c", script], b"hello\n")?;
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "got hello\n");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "oops\n");
    // More than the windows hold, both ways at once: `cat` writes as it reads.
    let big: Vec<u8> = (0..3_000_000u32).map(|i| b'a' + (i % 26) as u8).collect();
    let out = n.cli_input(&["exec", "-i", "box-1", "--", "cat"], &big)?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.stdout == big, "cat gave back {} of {} bytes, or others", out.stdout.len(), big.len());
    // A reader that pauses gets every byte, though the command ended long before (its
    // output waits in the session's buffers meanwhile).
    let mut slow = std::process::Command::new(common::bin())
        .arg("--data")
        .arg(n.data())
        .args(["exec", "box-1", "--", "head", "-c", "8000000", "/dev/zero"])
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    std::thread::sleep(5 * SEC);
    let mut got = vec![];
    std::io::Read::read_to_end(&mut slow.stdout.take().unwrap(), &mut got)?;
    assert!(slow.wait()?.success());
    assert_eq!(got.len(), 8_000_000, "a paused reader lost output");
    // Without -i the command reads nothing (its stdin is /dev/null), and ends.
    let out = n.cli_input(&["exec", "box-1", "--", "sh", "-c", "cat; echo done"], b"ignored\n")?;
    assert_eq!(String::from_utf8_lossy(&out.stdout), "done\n");
    // -it needs a terminal, as in docker.
    let out = n.cli_input(&["exec", "-it", "box-1", "--", "sh"], b"")?;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("the input device is not a TTY"), "{out:?}");
    let out = n.cli(&["exec", "-i", "nothing-1", "--", "sh"])?;
    assert!(String::from_utf8_lossy(&out.stderr).contains("instance \"nothing-1\" not found"), "{out:?}");

    // cp both ways, as docker cp names things.
    let here = n.data().join("cp");
    std::fs::create_dir_all(here.join("model/sub"))?;
    std::fs::write(here.join("hello.txt"), "hi there\n")?;
    let blob: Vec<u8> = (0..5_000_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    std::fs::write(here.join("model/weights"), &blob)?;
    std::fs::write(here.join("model/sub/config"), "layers: 3\n")?;
    let at = |p: &str| here.join(p).to_string_lossy().into_owned();
    n.ok(&["cp", &at("hello.txt"), "box-1:/tmp/greeting"])?;
    assert_eq!(n.ok(&["exec", "box-1", "--", "cat", "/tmp/greeting"])?, "hi there\n", "a file under a new name");
    n.ok(&["cp", &at("model"), "box-1:/tmp"])?;
    let listed = n.ok(&["exec", "box-1", "--", "sh", "-c", "cat /tmp/model/sub/config; wc -c < /tmp/model/weights"])?;
    assert_eq!(listed, "layers: 3\n5000000\n", "a directory into an existing one, under its own name");
    n.ok(&["cp", "box-1:/tmp/model", &at("back")])?;
    assert!(std::fs::read(here.join("back/weights"))? == blob, "5 MB out of the instance, unchanged");
    assert_eq!(std::fs::read_to_string(here.join("back/sub/config"))?, "layers: 3\n");
    n.ok(&["cp", "box-1:/etc/hostname", &at("model")])?;
    assert_eq!(
        std::fs::read_to_string(here.join("model/hostname"))?.trim(),
        "box-1",
        "a file into an existing directory"
    );
    // A directory's contents (`DIR/.`), both ways; a directory onto one of its name merges.
    n.ok(&["cp", &format!("{}/.", at("model")), "box-1:/tmp/flat"])?;
    assert_eq!(sh(&n, "cat /tmp/flat/sub/config; wc -c < /tmp/flat/weights")?, "layers: 3\n5000000\n");
    n.ok(&["cp", "box-1:/tmp/flat/.", &at("contents")])?;
    assert!(std::fs::read(here.join("contents/weights"))? == blob, "the contents, not the directory");
    assert_eq!(std::fs::read_to_string(here.join("contents/sub/config"))?, "layers: 3\n");
    sh(&n, "echo changed > /tmp/model/sub/config")?;
    n.ok(&["cp", "box-1:/tmp/model", &at("")])?;
    assert_eq!(std::fs::read_to_string(here.join("model/sub/config"))?, "changed\n", "merged into model/");
    assert!(here.join("model/hostname").exists(), "what was there is kept");
    let missing = n.cli(&["cp", "box-1:/nope", &at("x")])?;
    assert!(String::from_utf8_lossy(&missing.stderr).contains("tar in box-1 ended with"), "{missing:?}");
    assert!(!here.join("x").exists(), "nothing written for a failed copy");
    let both = n.cli(&["cp", &at("hello.txt"), &at("y")])?;
    assert!(String::from_utf8_lossy(&both.stderr).contains("one side must be INSTANCE:PATH"), "{both:?}");
    // A container that sends a crafted archive (its own `tar`) writes nothing outside the
    // destination: not through `..`, not through a symlink it made, not as a hard link to a
    // file of this machine; and the copy fails.
    let outside = here.display().to_string();
    let mut evil = vec![];
    evil.extend(tar_entry("../escaped-cp", b'0', "", b"pwn\n"));
    evil.extend(tar_entry("link", b'2', &outside, b""));
    evil.extend(tar_entry("link/through-link", b'0', "", b"pwn\n"));
    evil.extend(tar_entry("hard", b'1', "/etc/hostname", b""));
    evil.resize(evil.len() + 1024, 0);
    std::fs::write(here.join("evil.tar"), &evil)?;
    n.ok(&["cp", &at("evil.tar"), "box-1:/tmp/evil.tar"])?;
    sh(&n, "rm /bin/tar && printf '#!/bin/sh\\ncat /tmp/evil.tar\\n' > /bin/tar && chmod +x /bin/tar")?;
    let evil_cp = n.cli(&["cp", "box-1:/tmp/anything", &at("inside")])?;
    assert!(!evil_cp.status.success(), "{evil_cp:?}");
    for f in ["escaped-cp", "through-link", "inside"] {
        assert!(!here.join(f).exists(), "{f} written outside the destination");
    }
    assert!(!n.data().join("escaped-cp").exists());

    // port-forward: a local port reaches a server that listens only on the instance's own
    // loopback (the deployment's name picks its instance).
    sh(&n, "mkdir -p /www && echo forwarded-ok > /www/index.html && httpd -p 127.0.0.1:8081 -h /www")?;
    let local = common::free_port();
    let mut fwd = Forward::start(&n, &["port-forward", "box", &format!("{local}:8081")])?;
    let page =
        wait_for(30 * SEC, "the forwarded port", || common::http_get(local, "/").ok().filter(|p| !p.is_empty()))?;
    assert_eq!(page, "forwarded-ok\n");
    assert_eq!(common::http_get(local, "/")?, "forwarded-ok\n", "a second connection");
    fwd.stop();
    let bad = n.cli(&["port-forward", "box-1", "0"])?;
    assert!(String::from_utf8_lossy(&bad.stderr).contains("is not 1 to 65535"), "{bad:?}");

    // -it on a real terminal: a shell sized as the window, resized with it.
    let mut t = Terminal::spawn(&n, &["exec", "-it", "box-1", "--", "sh"], (100, 40))?;
    t.expect("# ", 30 * SEC)?;
    t.send("stty size; tty\r")?;
    t.expect("40 100", 10 * SEC)?;
    t.expect("/dev/pts/", 10 * SEC)?;
    t.resize(120, 50)?;
    t.send("stty size\r")?;
    t.expect("50 120", 10 * SEC)?;
    t.send("echo $TERM-$((6*7))\r")?;
    t.expect("xterm-42", 10 * SEC)?;
    // Ctrl-C interrupts the command in the foreground, not the shell.
    t.send("echo started; sleep 600\r")?;
    t.expect("started", 10 * SEC)?;
    std::thread::sleep(SEC / 2);
    t.send("\x03")?;
    t.send("echo after-$((3+4))\r")?;
    t.expect("after-7", 20 * SEC)?;
    t.send("exit 3\r")?;
    assert_eq!(t.wait(20 * SEC)?, 3, "the shell's exit code");
    // Ctrl-D at the prompt ends the shell.
    let mut t = Terminal::spawn(&n, &["exec", "-it", "box-1", "--", "sh"], (80, 24))?;
    t.expect("# ", 30 * SEC)?;
    t.send("\x04")?;
    assert_eq!(t.wait(20 * SEC)?, 0);

    // A caller that goes away ends its command in the container.
    let mut t = Terminal::spawn(&n, &["exec", "-it", "box-1", "--", "sleep", "777"], (80, 24))?;
    wait_for(30 * SEC, "sleep 777 in the instance", || running(&n, "box-1", "sleep 777").ok().filter(|c| *c == 1))?;
    t.kill();
    wait_for(30 * SEC, "sleep 777 to end", || running(&n, "box-1", "sleep 777").ok().filter(|c| *c == 0))?;
    // Output comes as it is written, not at the end (a long command shows progress).
    let mut t = Terminal::spawn(&n, &["exec", "box-1", "--", "sh", "-c", "echo first; sleep 600"], (80, 24))?;
    t.expect("first", 20 * SEC)?;
    t.kill();
    wait_for(30 * SEC, "sleep 600 to end", || running(&n, "box-1", "sleep 600").ok().filter(|c| *c == 0))?;
    Ok(())
}

#[test]
fn attach_reaches_a_terminal_its_shim_holds() -> R {
    require_privileged!();
    let mut n = Node::new()?;
    n.up(None)?;
    n.ok(&["run", "-d", "-it", IMAGE, "--name", "term", "--", "sh"])?;
    n.wait_running("term-1")?;

    // Attached from a real terminal: the container's own shell, sized as the window.
    let mut t = Terminal::spawn(&n, &["attach", "term-1"], (100, 40))?;
    t.send("X=kept; stty size\r")?;
    t.expect("40 100", 20 * SEC)?;
    t.resize(120, 50)?;
    t.send("stty size; echo hi-$((6*7))\r")?;
    t.expect("50 120", 10 * SEC)?;
    t.expect("hi-42", 10 * SEC)?;
    // Ctrl-P Ctrl-Q detaches; the shell runs on.
    t.send("\x10\x11")?;
    t.expect("read escape sequence", 10 * SEC)?;
    assert_eq!(t.wait(20 * SEC)?, 0);
    assert!(n.ok(&["ps"])?.lines().any(|l| l.contains("term-1") && l.contains("running")), "{}", n.ok(&["ps"])?);
    // What the terminal showed is in its log, line by line.
    let logs = n.ok(&["logs", "term-1"])?;
    assert!(logs.lines().any(|l| l == "hi-42"), "{logs:?}");

    // The terminal is the shim's: an agent killed and started again attaches to the same
    // shell (its variable still set).
    n.kill_up()?;
    n.up(None)?;
    n.wait_running("term-1")?;
    let mut t = Terminal::spawn(&n, &["attach", "term-1"], (80, 24))?;
    t.send("echo again-$X\r")?;
    t.expect("again-kept", 20 * SEC)?;
    // Not from a pipe: the keys go to a terminal.
    let out = n.cli_input(&["attach", "term-1"], b"")?;
    assert!(String::from_utf8_lossy(&out.stderr).contains("the input device is not a TTY"), "{out:?}");
    let out = n.cli(&["attach", "--detach-keys", "ctrl-1", "term-1"])?;
    assert!(String::from_utf8_lossy(&out.stderr).contains("--detach-keys: \"ctrl-1\" is not a key"), "{out:?}");
    // The shell's exit ends the attachment with its code.
    t.send("exit 5\r")?;
    assert_eq!(t.wait(20 * SEC)?, 5, "the instance's exit code");

    // Without a terminal: stdin kept open (-i) takes what an attachment pipes in; stdout
    // and stderr come apart.
    let script = "read l; echo got-$l; echo oops >&2; exit 7";
    n.ok(&["run", "-d", "-i", IMAGE, "--name", "pipe", "--restart", "no", "--", "sh", "-c", script])?;
    n.wait_running("pipe-1")?;
    let out = n.cli_input(&["attach", "pipe-1"], b"one\n")?;
    assert_eq!(String::from_utf8_lossy(&out.stdout), "got-one\n", "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "oops\n");
    assert_eq!(out.status.code(), Some(7));

    // `run -it` without -d: this terminal is the container's once it runs, with what it
    // showed before (its prompt).
    let out = n.cli_input(&["run", "-it", IMAGE, "--name", "nope", "--", "sh"], b"")?;
    assert!(String::from_utf8_lossy(&out.stderr).contains("the input device is not a TTY"), "{out:?}");
    assert!(n.cli(&["get", "deployments", "nope"]).is_ok_and(|o| !o.status.success()), "nothing stored");
    let mut t = Terminal::spawn(
        &n,
        &["run", "-it", "--restart", "no", IMAGE, "--name", "direct", "--", "sh", "-c", "echo pre-$((3*3)); exec sh"],
        (80, 24),
    )?;
    // Written before the attach: shown all the same.
    t.expect("pre-9", 60 * SEC)?;
    t.send("echo direct-$((2*3))\r")?;
    t.expect("direct-6", 20 * SEC)?;
    t.send("exit 4\r")?;
    assert_eq!(t.wait(20 * SEC)?, 4);
    // `run -i` from a pipe: the end of the input is the end of the container's stdin.
    let out = n.cli_input(
        &["run", "-i", "--restart", "no", IMAGE, "--name", "piped", "--", "sh", "-c", "cat; echo eof"],
        b"one\ntwo\n",
    )?;
    assert_eq!(String::from_utf8_lossy(&out.stdout), "one\ntwo\neof\n", "{out:?}");
    assert_eq!(out.status.code(), Some(0));
    // A command over before it could be attached: its output and its code all the same.
    let out =
        n.cli(&["run", "-t", "--restart", "no", IMAGE, "--name", "quick", "--", "sh", "-c", "echo done-fast; exit 3"])?;
    assert!(String::from_utf8_lossy(&out.stdout).contains("done-fast"), "{out:?}");
    assert_eq!(out.status.code(), Some(3));
    // A watcher without a terminal does not resize a terminal container (a person's).
    n.ok(&["run", "-d", "-it", IMAGE, "--name", "sized", "--", "sh"])?;
    n.wait_running("sized-1")?;
    let mut t = Terminal::spawn(&n, &["attach", "sized-1"], (132, 43))?;
    t.send("stty size\r")?;
    t.expect("43 132", 20 * SEC)?;
    let mut watcher = std::process::Command::new(common::bin())
        .args(["--data", n.data().to_str().unwrap(), "attach", "--no-stdin", "sized-1"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .spawn()?;
    std::thread::sleep(2 * SEC);
    assert!(matches!(watcher.try_wait(), Ok(None)), "the watcher is attached");
    // (`expect` takes what it matched: this is the size printed now.)
    t.send("stty size\r")?;
    t.expect("43 132", 20 * SEC)?;
    let _ = watcher.kill();
    let _ = watcher.wait();
    Ok(())
}
