//! `skiff cp`: files between this machine and an instance on any node, as a tar stream
//! over the exec session (the way `kubectl cp` works: the container needs `tar` and `sh`,
//! as busybox has). Docker's naming rules: to an existing directory the source goes
//! inside it under its own name; to any other path it is written under that name.
//!
//! What comes out of a container is untrusted: it is unpacked by the `tar` crate, which
//! writes nothing outside the destination (no `..`, no absolute paths, no way out through
//! a symlink it made), and sets no owners.

use crate::client::Client;
use anyhow::{bail, Context, Result};
use futures_util::{SinkExt, StreamExt};
use skiff_model::api::{ExecEnd, EXEC_STDERR, EXEC_STDOUT};
use skiff_model::proto::{SessionSpec, INPUT_CHUNK};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use tokio_tungstenite::tungstenite::Message;

/// `INSTANCE:PATH`, or a local path (one with a `/` before any `:`, or no `:` at all, is
/// local: `./a:b` is a file here).
#[derive(Debug, PartialEq, Eq)]
enum Place {
    Local(PathBuf),
    Remote { instance: String, path: String },
}

fn place(s: &str) -> Result<Place> {
    match s.split_once(':') {
        Some((i, p)) if !i.is_empty() && !i.contains('/') => {
            if p.is_empty() {
                bail!("{s:?}: the path in the instance is missing (INSTANCE:/path)");
            }
            // As docker cp: a relative path in the container is from its root.
            let path = if p.starts_with('/') { p.to_string() } else { format!("/{p}") };
            Ok(Place::Remote { instance: i.to_string(), path })
        }
        _ if s.is_empty() => bail!("an empty path"),
        _ => Ok(Place::Local(PathBuf::from(s))),
    }
}

/// `path`'s last component and its directory, as the container's shell sees them.
fn split_remote(path: &str) -> (String, String) {
    let trimmed = path.trim_end_matches('/');
    let trimmed = if trimmed.is_empty() { "/" } else { trimmed };
    match trimmed.rsplit_once('/') {
        Some(("", base)) => ("/".into(), base.into()),
        Some((dir, base)) => (dir.into(), base.into()),
        None => (".".into(), trimmed.into()),
    }
}

pub(super) async fn cp(c: &Client, src: &str, dst: &str) -> Result<i32> {
    match (place(src)?, place(dst)?) {
        (Place::Remote { instance, path }, Place::Local(to)) => from_instance(c, &instance, &path, &to).await,
        (Place::Local(from), Place::Remote { instance, path }) => to_instance(c, &instance, &from, &path).await,
        (Place::Local(_), Place::Local(_)) => bail!("one side must be INSTANCE:PATH (both are local paths)"),
        (Place::Remote { .. }, Place::Remote { .. }) => bail!("one side must be a local path (both are in instances)"),
    }
}

/// Whether a path names a directory's contents (`dir/.`, as docker cp reads it).
fn contents_of(path: &str) -> Option<&str> {
    path.strip_suffix("/.").or((path == ".").then_some("."))
}

/// Copies `path` out of `instance` to `to` (`path/.`: its contents, into `to`).
async fn from_instance(c: &Client, instance: &str, path: &str, to: &Path) -> Result<i32> {
    let contents = contents_of(path).map(|p| if p.is_empty() { "/" } else { p });
    let (dir, base) = match contents {
        Some(p) => (p.to_string(), ".".to_string()),
        None => split_remote(path),
    };
    let argv: Vec<String> = ["tar", "cf", "-", "-C", &dir, &base].iter().map(|s| s.to_string()).collect();
    if contents.is_some() && !to.exists() {
        std::fs::create_dir(to).with_context(|| format!("making {}", to.display()))?;
    }
    // Unpacked next to the destination, then moved into place: a failed copy leaves
    // nothing half-written under the destination's name.
    let into_dir = to.is_dir();
    let parent = if into_dir {
        to.to_path_buf()
    } else {
        to.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")).to_path_buf()
    };
    if !parent.is_dir() {
        bail!("{}: no such directory here", parent.display());
    }
    let stage = tempfile::Builder::new()
        .prefix(".skiff-cp-")
        .tempdir_in(&parent)
        .with_context(|| format!("a directory in {}", parent.display()))?;
    let (reader, writer) = std::io::pipe()?;
    let dest = stage.path().to_path_buf();
    let unpack = std::thread::spawn(move || -> std::io::Result<()> {
        let mut a = tar::Archive::new(reader);
        // Modes without setuid, setgid or sticky bits: nothing from a container gains
        // root's rights on this machine.
        a.set_preserve_permissions(false);
        a.set_mask(0o022);
        a.set_preserve_ownerships(false);
        a.set_unpack_xattrs(false);
        a.set_overwrite(true);
        let r = a.unpack(&dest);
        // Whatever is left unread (a refused archive) is drained, so the sender ends.
        let mut rest = a.into_inner();
        let _ = std::io::copy(&mut rest, &mut std::io::sink());
        r
    });
    let (code, stderr) = piped(c, instance, argv, None::<std::io::Empty>, writer).await?;
    let unpacked = unpack.join().map_err(|_| anyhow::anyhow!("unpacking panicked"))?;
    if code != 0 {
        bail!("tar in {instance} ended with {code}: {}", stderr.trim());
    }
    unpacked.context("unpacking what the instance sent")?;
    if contents.is_some() {
        merge_into(stage.path(), to)?;
        return Ok(0);
    }
    let got = stage.path().join(&base);
    let target = if into_dir { to.join(&base) } else { to.to_path_buf() };
    if is_real_dir(&target) && is_real_dir(&got) {
        // As docker cp: into the directory that is there, what it holds kept.
        merge_into(&got, &target)?;
        return Ok(0);
    }
    std::fs::rename(&got, &target).with_context(|| format!("moving into {}", target.display()))?;
    Ok(0)
}

/// A directory, not a symlink to one.
fn is_real_dir(p: &Path) -> bool {
    std::fs::symlink_metadata(p).is_ok_and(|m| m.is_dir())
}

/// Moves what `from` holds into the directory `to`: a directory into one of the same name
/// there, anything else in place of what has its name (a symlink there is replaced, never
/// followed: nothing lands outside `to`).
fn merge_into(from: &Path, to: &Path) -> Result<()> {
    for e in std::fs::read_dir(from).with_context(|| format!("reading {}", from.display()))? {
        let e = e?;
        let (src, dst) = (e.path(), to.join(e.file_name()));
        if is_real_dir(&src) && is_real_dir(&dst) {
            merge_into(&src, &dst)?;
            continue;
        }
        if is_real_dir(&dst) {
            bail!("{}: a directory is there, and a file comes", dst.display());
        }
        if std::fs::symlink_metadata(&dst).is_ok() {
            std::fs::remove_file(&dst).with_context(|| format!("replacing {}", dst.display()))?;
        }
        std::fs::rename(&src, &dst).with_context(|| format!("moving into {}", dst.display()))?;
    }
    Ok(())
}

/// Copies `from` (a file or a directory here) to `path` in `instance`.
async fn to_instance(c: &Client, instance: &str, from: &Path, path: &str) -> Result<i32> {
    let contents = from.to_str().and_then(contents_of).is_some();
    let meta = std::fs::symlink_metadata(from).with_context(|| format!("{}", from.display()))?;
    if contents && !meta.is_dir() {
        bail!("{}: not a directory", from.display());
    }
    let base = match from.file_name() {
        _ if contents => ".".to_string(),
        Some(n) => n.to_string_lossy().into_owned(),
        None => bail!("{}: which file?", from.display()),
    };
    // A directory's contents into the path (made if missing); else into an existing
    // directory under its own name, or under the path's name.
    let (target_dir, name) = if contents || path.ends_with('/') || is_dir_in(c, instance, path).await? {
        (path.trim_end_matches('/').to_string(), base)
    } else {
        split_remote(path)
    };
    let target_dir = if target_dir.is_empty() { "/".to_string() } else { target_dir };
    let mut argv: Vec<String> = ["tar", "xf", "-", "-C", &target_dir].iter().map(|s| s.to_string()).collect();
    if contents {
        let script = "mkdir -p \"$1\" && exec tar xf - -C \"$1\"";
        argv = ["sh", "-c", script, "sh", &target_dir].iter().map(|s| s.to_string()).collect();
    }
    let (reader, mut writer) = std::io::pipe()?;
    let from = from.to_path_buf();
    let pack = std::thread::spawn(move || -> std::io::Result<()> {
        let mut b = tar::Builder::new(&mut writer);
        b.follow_symlinks(false);
        if meta.is_dir() {
            // `name` is "." for a directory's contents: its entries at the top.
            b.append_dir_all(&name, &from)?;
        } else {
            b.append_path_with_name(&from, &name)?;
        }
        b.finish()?;
        drop(b);
        writer.flush()
    });
    let (code, stderr) = piped(c, instance, argv, Some(reader), std::io::sink()).await?;
    let packed = pack.join().map_err(|_| anyhow::anyhow!("packing panicked"))?;
    // The instance's side first: its tar failing early breaks our pipe, and its own
    // message says why.
    if code != 0 {
        bail!("tar in {instance} ended with {code}: {}", stderr.trim());
    }
    packed.context("reading what to copy")?;
    Ok(0)
}

/// Whether `path` is a directory in the instance.
async fn is_dir_in(c: &Client, instance: &str, path: &str) -> Result<bool> {
    let argv = vec!["test".to_string(), "-d".to_string(), path.to_string()];
    let (code, _) = piped(c, instance, argv, None::<std::io::Empty>, std::io::sink()).await?;
    Ok(code == 0)
}

/// Sends what `input` gives as a session's standard input (binary messages, then `eof`),
/// from a thread: a read that never returns (a terminal's) must not hold up the exit.
/// With `detach`, its keys are held back as they are typed; once they are all typed the
/// sender is told and nothing more is read.
pub(super) fn send_input(
    mut input: impl Read + Send + 'static,
    tx: tokio::sync::mpsc::Sender<Message>,
    mut detach: Option<(DetachKeys, tokio::sync::mpsc::Sender<()>)>,
) {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; INPUT_CHUNK];
        loop {
            match input.read(&mut buf) {
                Ok(0) | Err(_) => {
                    let eof = serde_json::to_string(&skiff_model::api::ExecControl::Eof).unwrap_or_default();
                    let _ = tx.blocking_send(Message::Text(eof.into()));
                    return;
                }
                Ok(n) => {
                    let (bytes, detached) = match detach.as_mut() {
                        Some((keys, _)) => keys.feed(&buf[..n]),
                        None => (buf[..n].to_vec(), false),
                    };
                    if !bytes.is_empty() && tx.blocking_send(Message::Binary(bytes.into())).is_err() {
                        return;
                    }
                    if detached {
                        if let Some((_, told)) = detach.take() {
                            let _ = told.blocking_send(());
                        }
                        return;
                    }
                }
            }
        }
    });
}

/// Keys that detach from an attached terminal (Docker's `--detach-keys`), and how much of
/// them was typed so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct DetachKeys {
    keys: Vec<u8>,
    typed: usize,
}

impl DetachKeys {
    /// Docker's spelling: comma-separated keys, each `ctrl-X` (X a letter or one of
    /// `@[\]^_`) or one character.
    pub(super) fn parse(s: &str) -> Result<DetachKeys, String> {
        let mut keys = vec![];
        for k in s.split(',') {
            let byte = match k.strip_prefix("ctrl-").map(str::as_bytes) {
                Some([c]) if c.is_ascii_alphabetic() => c.to_ascii_lowercase() - b'a' + 1,
                Some([c]) if b"@[\\]^_".contains(c) => c - b'@',
                None if k.len() == 1 && k.is_ascii() => k.as_bytes()[0],
                _ => {
                    return Err(format!(
                        "{k:?} is not a key (a letter or sign, or ctrl- with a letter or one of @[\\]^_)"
                    ))
                }
            };
            keys.push(byte);
        }
        Ok(DetachKeys { keys, typed: 0 })
    }

    /// Takes typed bytes: what to pass on, and whether the keys are now all typed (what
    /// came after them is dropped). Keys of an unfinished sequence are held back, and
    /// passed on as typed once a different key breaks it.
    pub(super) fn feed(&mut self, input: &[u8]) -> (Vec<u8>, bool) {
        let mut out = Vec::with_capacity(input.len());
        for &b in input {
            if b != self.keys[self.typed] {
                out.extend_from_slice(&self.keys[..self.typed]);
                self.typed = 0;
                if b != self.keys[0] {
                    out.push(b);
                    continue;
                }
            }
            self.typed += 1;
            if self.typed == self.keys.len() {
                return (out, true);
            }
        }
        (out, false)
    }
}

/// Runs `argv` in `instance` with `input` as its standard input (none: it reads
/// nothing); its standard output goes to `output`. The exit code and what it wrote on
/// standard error (the first 64 KiB).
async fn piped(
    c: &Client,
    instance: &str,
    argv: Vec<String>,
    input: Option<impl Read + Send + 'static>,
    mut output: impl Write + Send + 'static,
) -> Result<(i32, String)> {
    let spec = SessionSpec { argv, stdin: input.is_some(), ..Default::default() };
    let ws = c.websocket(&format!("/api/v1/instances/{instance}/exec")).await?;
    let (mut to_hub, mut from_hub) = ws.split();
    to_hub.send(Message::Text(serde_json::to_string(&spec)?.into())).await?;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Message>(8);
    match input {
        Some(input) => send_input(input, tx, None),
        None => drop(tx),
    }
    let sender = tokio::spawn(async move {
        while let Some(m) = rx.recv().await {
            if to_hub.send(m).await.is_err() {
                return;
            }
        }
    });
    // Output is written by a thread of its own: the pipe's reader may take its time.
    let (out_tx, mut out_rx) = tokio::sync::mpsc::channel::<Vec<u8>>(16);
    let writer = std::thread::spawn(move || -> std::io::Result<()> {
        while let Some(b) = out_rx.blocking_recv() {
            output.write_all(&b)?;
        }
        output.flush()
    });
    let mut stderr = String::new();
    let end = loop {
        match from_hub.next().await {
            Some(Ok(Message::Binary(b))) => match b.split_first() {
                Some((&EXEC_STDOUT, data)) if out_tx.send(data.to_vec()).await.is_err() => {
                    break Err(anyhow::anyhow!("the copy's receiving side stopped"));
                }
                Some((&EXEC_STDERR, data)) if stderr.len() < 64 << 10 => {
                    stderr.push_str(&String::from_utf8_lossy(data))
                }
                _ => {}
            },
            Some(Ok(Message::Text(t))) => {
                break serde_json::from_str::<ExecEnd>(t.as_str()).map_err(anyhow::Error::from)
            }
            Some(Ok(Message::Close(_))) | None => {
                break Err(anyhow::anyhow!("the hub closed the copy before it ended"))
            }
            Some(Err(e)) => break Err(anyhow::anyhow!("the copy's connection: {e}")),
            Some(Ok(_)) => {}
        }
    };
    sender.abort();
    drop(out_tx);
    let written = writer.join().map_err(|_| anyhow::anyhow!("writing panicked"))?;
    let code = match end? {
        ExecEnd { exit: Some(code), .. } => code,
        ExecEnd { error: Some(e), .. } => bail!("{e}"),
        ExecEnd { .. } => bail!("the hub ended the copy without saying how"),
    };
    // A failed write here matters only if the command succeeded (else its error says more).
    if code == 0 {
        written.context("writing what the instance sent")?;
    }
    Ok((code, stderr))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detach_keys_are_read_and_watched_for_as_docker_does() {
        let mut k = DetachKeys::parse("ctrl-p,ctrl-q").unwrap();
        assert_eq!(k.keys, vec![0x10, 0x11]);
        assert_eq!(k.feed(b"ls\r"), (b"ls\r".to_vec(), false));
        // Half the sequence is held back, then passed on when broken.
        assert_eq!(k.feed(b"\x10"), (vec![], false));
        assert_eq!(k.feed(b"x"), (b"\x10x".to_vec(), false));
        // Ctrl-P twice: the first goes on, the second may start the sequence.
        assert_eq!(k.feed(b"a\x10\x10"), (b"a\x10".to_vec(), false));
        assert_eq!(k.feed(b"\x11after"), (vec![], true));
        let mut k = DetachKeys::parse("ctrl-@,ctrl-_,Z").unwrap();
        assert_eq!(k.keys, vec![0, 0x1f, b'Z']);
        assert_eq!(k.feed(b"\0\x1fZ"), (vec![], true));
        assert_eq!(DetachKeys::parse("ctrl-A").unwrap().keys, vec![1]);
        for bad in ["", "ctrl-", "ctrl-1", "ab", "ctrl-p,,ctrl-q", "é"] {
            assert!(DetachKeys::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn places_are_read_as_docker_cp_reads_them() {
        let r = |i: &str, p: &str| Place::Remote { instance: i.into(), path: p.into() };
        assert_eq!(place("web-1:/etc/hosts").unwrap(), r("web-1", "/etc/hosts"));
        assert_eq!(place("web-1:data").unwrap(), r("web-1", "/data"), "from the container's root, as docker cp");
        assert_eq!(place("./a:b").unwrap(), Place::Local("./a:b".into()));
        assert_eq!(place("out").unwrap(), Place::Local("out".into()));
        assert!(place("web-1:").unwrap_err().to_string().contains("path in the instance is missing"));
        assert_eq!(split_remote("/etc/hosts"), ("/etc".into(), "hosts".into()));
        assert_eq!(split_remote("/data/"), ("/".into(), "data".into()));
        assert_eq!(split_remote("rel"), (".".into(), "rel".into()));
        assert_eq!(contents_of("/data/."), Some("/data"));
        assert_eq!(contents_of("/."), Some(""));
        assert_eq!(contents_of("./model/."), Some("./model"));
        assert_eq!(contents_of("/data/.x"), None);
    }

    #[test]
    fn merging_keeps_what_is_there_and_never_follows_a_symlink() {
        let t = tempfile::tempdir().unwrap();
        let (from, to, outside) = (t.path().join("from"), t.path().join("to"), t.path().join("outside"));
        for d in [from.join("sub"), to.join("sub"), outside.clone()] {
            std::fs::create_dir_all(d).unwrap();
        }
        std::fs::write(from.join("sub/new"), "new").unwrap();
        std::fs::write(from.join("top"), "fresh").unwrap();
        std::fs::create_dir(from.join("link")).unwrap();
        std::fs::write(from.join("link/x"), "x").unwrap();
        std::fs::write(to.join("sub/kept"), "kept").unwrap();
        std::fs::write(to.join("top"), "stale").unwrap();
        std::os::unix::fs::symlink(&outside, to.join("link")).unwrap();
        merge_into(&from, &to).unwrap();
        assert_eq!(std::fs::read_to_string(to.join("sub/kept")).unwrap(), "kept");
        assert_eq!(std::fs::read_to_string(to.join("sub/new")).unwrap(), "new");
        assert_eq!(std::fs::read_to_string(to.join("top")).unwrap(), "fresh");
        assert!(is_real_dir(&to.join("link")), "the symlink was replaced by the directory");
        assert!(std::fs::read_dir(&outside).unwrap().next().is_none(), "nothing written through the symlink");
    }
}
