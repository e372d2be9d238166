//! The node records as a watch keeps them: read whole once, then changed by etcd's
//! events, so a hub that places 100,000 nodes every few seconds does not read them all
//! from etcd each time (100 MB a read, which also takes etcd's CPU).
//!
//! Current, not merely recent: every change of a node record also rewrites one marker key
//! ([`MARKER`]) in the same transaction, and the watch covers the marker. A reader reads
//! the marker's modification revision (one small read) and takes the records once the
//! watch has delivered that revision: what it gets is what a read of every record would
//! have returned then, whichever hub wrote last. While the watch is down, or lags beyond
//! [`CATCH_UP`], the reader reads the records from etcd as before.

use super::Members;
use super::TIMEOUT;
use crate::store::{NodeList, NodeRecord, StoredNode};
use etcd_client::{Client, EventType, WatchOptions};
use std::collections::BTreeMap;
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::Duration;

/// The key, beside `nodes/`, that every change of a node record rewrites.
pub(super) const MARKER: &str = "nodes-changed";
/// How long a reader waits for the watch to deliver the revision it read.
const CATCH_UP: Duration = Duration::from_secs(1);
/// How long after a broken watch the records are read again and a new one made.
const AGAIN: Duration = Duration::from_secs(1);

#[derive(Default)]
struct Cache {
    /// While a watch keeps `nodes` current.
    live: bool,
    /// The etcd revision `nodes` is current at.
    rev: i64,
    nodes: BTreeMap<String, Arc<NodeRecord>>,
    /// `nodes` as a list, made at the first read after a change and shared until the next.
    list: Option<NodeList>,
}

/// The records and the watch's progress, shared with the task that keeps them.
#[derive(Default)]
pub(super) struct Watched {
    cache: Mutex<Cache>,
    moved: Condvar,
}

impl Watched {
    /// The records once the watch has delivered etcd revision `at` (the marker's), or
    /// `None`: no watch, or it has not caught up within [`CATCH_UP`].
    pub(super) fn nodes_at(&self, at: i64) -> Option<NodeList> {
        let c = self.cache.lock().ok()?;
        let (mut c, _) = self.moved.wait_timeout_while(c, CATCH_UP, |c| c.live && c.rev < at).ok()?;
        if !(c.live && c.rev >= at) {
            return None;
        }
        let c = &mut *c;
        Some(Arc::clone(c.list.get_or_insert_with(|| Arc::new(c.nodes.values().cloned().collect()))))
    }

    /// One record (`Some(None)`: none of that name) once the watch has delivered `at`;
    /// `None` as [`Watched::nodes_at`].
    pub(super) fn node_at(&self, at: i64, name: &str) -> Option<Option<NodeRecord>> {
        let c = self.cache.lock().ok()?;
        let (c, _) = self.moved.wait_timeout_while(c, CATCH_UP, |c| c.live && c.rev < at).ok()?;
        (c.live && c.rev >= at).then(|| c.nodes.get(name).map(|n| NodeRecord::clone(n)))
    }

    fn set(&self, f: impl FnOnce(&mut Cache)) {
        if let Ok(mut c) = self.cache.lock() {
            f(&mut c);
            c.list = None;
        }
        self.moved.notify_all();
    }
}

/// The marker's revision, read at most once at a time however many ask: a reader gets
/// the answer of a read that began after it asked (so it sees every change made before),
/// sharing it with everyone else who asked meanwhile. Thousands of nodes connecting at
/// once each look their record up several times; etcd answers a read per round trip, not
/// one per lookup.
#[derive(Default)]
pub(super) struct SharedReads {
    state: Mutex<Reads>,
    done: Condvar,
}

#[derive(Default)]
struct Reads {
    /// Reads begun, and the number of the last that answered, with its answer.
    begun: u64,
    answered: u64,
    value: i64,
    /// Whether one is under way.
    reading: bool,
}

/// What a caller of [`SharedReads::get`] does.
enum Turn {
    /// A read begun after it asked has answered this.
    Answered(i64),
    /// It reads for everyone: this is the read's number.
    Reads(u64),
    /// It reads for itself (the read under way hangs).
    Alone,
}

impl SharedReads {
    /// The answer of a read begun after this call: `read` runs in one caller at a time,
    /// the others wait for it (at most [`CATCH_UP`] each time round, then read alone). A
    /// failed read is its caller's error; those who waited for it start another.
    pub(super) fn get<E>(&self, read: impl FnOnce() -> Result<i64, E>) -> Result<i64, E> {
        let n = match self.turn() {
            Turn::Answered(v) => return Ok(v),
            Turn::Reads(n) => n,
            Turn::Alone => return read(),
        };
        let r = read();
        if let Ok(mut s) = self.state.lock() {
            s.reading = false;
            if let Ok(v) = &r {
                (s.answered, s.value) = (n, *v);
            }
        }
        self.done.notify_all();
        r
    }

    fn turn(&self) -> Turn {
        let Ok(mut s) = self.state.lock() else { return Turn::Alone };
        // A read under way began before this call: only the next one will do.
        let need = s.begun + 1;
        loop {
            if s.answered >= need {
                return Turn::Answered(s.value);
            }
            if !s.reading {
                s.reading = true;
                s.begun += 1;
                return Turn::Reads(s.begun);
            }
            s = match self.done.wait_timeout(s, CATCH_UP) {
                Ok((s, t)) if !t.timed_out() || s.answered >= need => s,
                _ => return Turn::Alone,
            };
        }
    }
}

/// Keeps `w` current for as long as the store holds it: reads every record under
/// `PREFIX/nodes/`, watches `PREFIX/nodes` (the records and the marker) from the next
/// revision, and starts again after a break (a compacted revision, a lost member).
pub(super) async fn keep(members: Arc<Members>, prefix: String, w: Weak<Watched>) {
    loop {
        let Some(watched) = w.upgrade() else { return };
        let (member, client) = members.current();
        if let Err(e) = follow(&client, &prefix, &watched).await {
            tracing::debug!(error = %e, "watching the node records; reading them again");
            members.failed(member, &e);
        }
        watched.set(|c| c.live = false);
        drop(watched);
        tokio::time::sleep(AGAIN).await;
    }
}

fn record(key: &[u8], value: &[u8], dir: &str) -> Option<(String, NodeRecord)> {
    let name = std::str::from_utf8(key).ok()?.strip_prefix(dir)?;
    match serde_json::from_slice::<StoredNode>(value) {
        Ok(n) => Some((name.to_string(), n.record)),
        Err(e) => {
            tracing::warn!(node = name, error = %e, "a node record that does not read");
            None
        }
    }
}

async fn follow(client: &Client, prefix: &str, w: &Watched) -> Result<(), String> {
    let dir = format!("{prefix}/nodes/");
    let (rev, kvs) = super::read_pages(client.clone(), dir.clone(), 0).await.map_err(|e| e.to_string())?;
    let nodes: BTreeMap<String, Arc<NodeRecord>> =
        kvs.iter().filter_map(|(k, v, _)| record(k.as_bytes(), v, &dir)).map(|(k, n)| (k, Arc::new(n))).collect();
    let mut c = client.clone();
    let opts = WatchOptions::new().with_prefix().with_start_revision(rev + 1);
    let mut stream = tokio::time::timeout(TIMEOUT, c.watch(format!("{prefix}/nodes"), Some(opts)))
        .await
        .map_err(|_| "no answer".to_string())?
        .map_err(|e| e.to_string())?;
    w.set(|c| *c = Cache { live: true, rev, nodes, list: None });
    while let Some(r) = stream.message().await.map_err(|e| e.to_string())? {
        if r.canceled() {
            return Err(format!("the watch was cancelled ({})", r.cancel_reason()));
        }
        if r.events().is_empty() {
            continue;
        }
        w.set(|c| {
            for e in r.events() {
                let Some(kv) = e.kv() else { continue };
                c.rev = c.rev.max(kv.mod_revision());
                match e.event_type() {
                    EventType::Put => {
                        if let Some((name, n)) = record(kv.key(), kv.value(), &dir) {
                            c.nodes.insert(name, Arc::new(n));
                        }
                    }
                    EventType::Delete => {
                        if let Some(name) = std::str::from_utf8(kv.key()).ok().and_then(|k| k.strip_prefix(&dir)) {
                            c.nodes.remove(name);
                        }
                    }
                }
            }
        });
    }
    Err("the watch ended".into())
}

/// Sends the store's revision (the value of `key`) each time it moves, from its value
/// now, until nobody listens; a broken watch is made again after [`AGAIN`].
pub(super) async fn follow_revision(members: Arc<Members>, key: String, tx: tokio::sync::watch::Sender<u64>) {
    let send = |raw: &[u8]| {
        if let Ok(rev) = serde_json::from_slice::<u64>(raw) {
            tx.send_if_modified(|r| (rev > *r).then(|| *r = rev).is_some());
        }
    };
    while !tx.is_closed() {
        let (member, mut c) = members.current();
        let watched = async {
            let now = c.get(key.clone(), None).await?;
            if let Some(kv) = now.kvs().first() {
                send(kv.value());
            }
            let from = now.header().map(|h| h.revision()).unwrap_or(0) + 1;
            let mut stream = c.watch(key.clone(), Some(WatchOptions::new().with_start_revision(from))).await?;
            while let Some(r) = stream.message().await? {
                if r.canceled() {
                    break;
                }
                for kv in r.events().iter().filter_map(|e| e.kv()) {
                    send(kv.value());
                }
            }
            Ok::<(), etcd_client::Error>(())
        };
        tokio::select! {
            r = watched => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "watching the store's revision; again");
                    members.failed(member, &e.to_string());
                }
            }
            _ = tx.closed() => return,
        }
        tokio::time::sleep(AGAIN).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn node(name: &str) -> NodeRecord {
        NodeRecord {
            name: name.into(),
            revision: 1,
            cert_serial: "s".into(),
            joined_ms: 1,
            info: Default::default(),
            not_after_ms: None,
            next_serial: None,
            next_not_after_ms: None,
        }
    }

    /// A reader waits for the watch to deliver the revision it read; a watch that is
    /// down, or does not get there in time, sends it to etcd instead.
    #[test]
    fn a_reader_waits_for_the_revision_it_read_and_never_takes_an_older_copy() {
        let w = Arc::new(Watched::default());
        assert!(w.nodes_at(0).is_none(), "no watch yet");
        w.set(|c| {
            *c = Cache { live: true, rev: 5, nodes: [("a".to_string(), Arc::new(node("a")))].into(), list: None }
        });
        assert_eq!(w.nodes_at(5).unwrap().len(), 1);
        let later = Arc::clone(&w);
        let event = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            later.set(|c| {
                c.nodes.insert("b".into(), Arc::new(node("b")));
                c.rev = 7;
            });
        });
        let names: Vec<String> = w.nodes_at(7).unwrap().iter().map(|n| n.name.clone()).collect();
        assert_eq!(names, ["a", "b"], "the copy as of revision 7, not the one before");
        event.join().unwrap();
        assert!(w.nodes_at(8).is_none(), "revision 8 never came: read from etcd");
        w.set(|c| c.live = false);
        assert!(w.nodes_at(7).is_none(), "a broken watch's copy is not used");
    }

    /// Many asking at once share few reads, and each gets the answer of a read begun
    /// after it asked (never one already under way: it could miss a change made just
    /// before); a failed read fails only its own caller.
    #[test]
    fn lookups_at_once_share_reads_begun_after_they_asked() {
        use std::sync::atomic::{AtomicI64, Ordering};
        let shared = Arc::new(SharedReads::default());
        let begun = Arc::new(AtomicI64::new(0));
        let callers = 16;
        let start = Arc::new(std::sync::Barrier::new(callers));
        let threads: Vec<_> = (0..callers)
            .map(|_| {
                let (shared, begun, start) = (Arc::clone(&shared), Arc::clone(&begun), Arc::clone(&start));
                std::thread::spawn(move || {
                    start.wait();
                    let asked = begun.load(Ordering::SeqCst);
                    let got = shared
                        .get(|| {
                            let n = begun.fetch_add(1, Ordering::SeqCst) + 1;
                            std::thread::sleep(Duration::from_millis(100));
                            Ok::<i64, String>(n)
                        })
                        .unwrap();
                    assert!(got > asked, "read {got} began before the caller asked (after read {asked})");
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let reads = begun.load(Ordering::SeqCst);
        assert!(reads <= 4, "{callers} lookups at once made {reads} reads");
        // A failed read is its caller's error; the next caller reads again.
        assert_eq!(shared.get(|| Err::<i64, _>("etcd is gone")), Err("etcd is gone"));
        assert_eq!(shared.get(|| Ok::<i64, &str>(42)), Ok(42));
    }
}
