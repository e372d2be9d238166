//! Reading and following an instance's log across rotations.

use skiff_model::LogLine;
use std::io::{BufRead, BufReader, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::time::Duration;
use tokio::sync::mpsc;

/// Streams the last `tail` lines (all when None), then, with `follow`, new lines as they
/// are written, until `alive` says the instance is gone or the receiver is dropped.
pub fn stream(
    path: PathBuf,
    tail: Option<usize>,
    follow: bool,
    alive: impl Fn() -> bool + Send + 'static,
) -> mpsc::Receiver<LogLine> {
    let (tx, rx) = mpsc::channel(256);
    tokio::spawn(async move {
        let p = path.clone();
        let (lines, mut pos) = match tokio::task::spawn_blocking(move || {
            let lines = skiff_runtime::logs::read_all(&p);
            let pos = std::fs::metadata(&p).map(|m| (m.ino(), m.len())).unwrap_or((0, 0));
            (lines, pos)
        })
        .await
        {
            Ok(v) => v,
            Err(_) => return,
        };
        let skip = tail.map(|t| lines.len().saturating_sub(t)).unwrap_or(0);
        for l in lines.into_iter().skip(skip) {
            if tx.send(l).await.is_err() {
                return;
            }
        }
        if !follow {
            return;
        }
        let mut gone_ticks = 0;
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if tx.is_closed() {
                return;
            }
            let p = path.clone();
            let (new, np) = match tokio::task::spawn_blocking(move || read_from(&p, pos)).await {
                Ok(v) => v,
                Err(_) => return,
            };
            pos = np;
            for l in new {
                if tx.send(l).await.is_err() {
                    return;
                }
            }
            if !alive() {
                gone_ticks += 1;
                if gone_ticks > 2 {
                    return;
                }
            }
        }
    });
    rx
}

/// New complete lines after (inode, offset); a new inode means the file was rotated.
fn read_from(path: &std::path::Path, (ino, off): (u64, u64)) -> (Vec<LogLine>, (u64, u64)) {
    let Ok(mut f) = skiff_sys::regular::open(path) else {
        return (vec![], (ino, off));
    };
    let Ok(m) = f.metadata() else {
        return (vec![], (ino, off));
    };
    let start = if m.ino() == ino && m.len() >= off { off } else { 0 };
    if f.seek(SeekFrom::Start(start)).is_err() {
        return (vec![], (ino, off));
    }
    let mut r = BufReader::new(f);
    let mut out = vec![];
    let mut consumed = start;
    let mut buf = String::new();
    loop {
        buf.clear();
        match r.read_line(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) if buf.ends_with('\n') => {
                consumed += n as u64;
                if let Ok(l) = serde_json::from_str::<LogLine>(&buf) {
                    out.push(l);
                }
            }
            Ok(_) => break, // partial line: read it next time
        }
    }
    (out, (m.ino(), consumed))
}
