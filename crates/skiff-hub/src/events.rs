//! The hub's own events (autoscaler, rollouts, alerts, the fleet's security events): a
//! bounded list, merged with the nodes' events by `GET /api/v1/events`. Once given the
//! store ([`EventLog::persist`]), each event is also written there under
//! `events/SOURCE/TIME-SEQ` (the oldest deleted past the limit), so a hub that starts or
//! takes over shows what the one before it recorded. The writes go through a thread of
//! the log's own, batched: recording an event never waits on the store (a controller
//! holding a lock, an API handler on an async worker). A quiet fleet writes nothing.

use crate::store::Store;
use skiff_model::EventRecord;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};

/// The store's state keys of events.
const PREFIX: &str = "events/";

/// What the writer thread is asked to do.
enum Op {
    /// A state key set (`Some`) or deleted.
    Put(String, Option<String>),
    /// Answered once everything sent before is written.
    Flush(mpsc::Sender<()>),
}

/// The newest `limit` events, oldest first.
pub struct EventLog {
    source: &'static str,
    limit: usize,
    /// Each event with its key in the store.
    events: Mutex<VecDeque<(String, EventRecord)>>,
    writer: OnceLock<Mutex<mpsc::Sender<Op>>>,
    /// Tells apart events of one millisecond.
    seq: AtomicU64,
    /// The newest key time: keys only go forward, even on a hub whose clock is behind the
    /// one before it (the oldest key is the one trimmed, and the order is the one shown).
    last_ms: AtomicU64,
    /// At most this many events of one node (`EventRecord::node`): a node that ships many
    /// pushes out its own oldest, never another node's.
    per_node: Option<usize>,
}

impl EventLog {
    pub fn new(source: &'static str, limit: usize) -> Self {
        EventLog {
            source,
            limit,
            events: Mutex::default(),
            writer: OnceLock::new(),
            seq: AtomicU64::new(0),
            last_ms: AtomicU64::new(0),
            per_node: None,
        }
    }

    /// Keeps at most `n` events of any one node.
    pub fn with_per_node(mut self, n: usize) -> Self {
        self.per_node = Some(n.max(1));
        self
    }

    fn prefix(&self) -> String {
        format!("{PREFIX}{}/", self.source)
    }

    /// A key after every one before: its time is the event's, or just after the newest.
    fn key(&self, time_ms: u64) -> String {
        let mut prev = self.last_ms.load(Ordering::Relaxed);
        let t = loop {
            let t = time_ms.max(prev.saturating_add(1));
            match self.last_ms.compare_exchange(prev, t, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => break t,
                Err(p) => prev = p,
            }
        };
        format!("{}{t:016}-{:08}", self.prefix(), self.seq.fetch_add(1, Ordering::Relaxed))
    }

    fn send(&self, ops: Vec<Op>) {
        if let Some(w) = self.writer.get().and_then(|w| w.lock().ok()) {
            for op in ops {
                let _ = w.send(op);
            }
        }
    }

    /// Loads the events `store` kept (before the ones recorded since, which are written
    /// now), and writes every later one there too. Records that do not read are deleted;
    /// a store that cannot be read is said once and the log starts afresh.
    pub fn persist(&self, store: Arc<dyn Store>) {
        let mut ops = vec![];
        match store.states(&self.prefix()) {
            Ok(mut kept) => {
                kept.sort();
                let mut loaded = vec![];
                for (k, v) in kept {
                    match serde_json::from_str::<EventRecord>(&v) {
                        Ok(r) => loaded.push((k, r)),
                        Err(_) => ops.push(Op::Put(k, None)),
                    }
                }
                if let Some(t) = loaded.last().and_then(|(k, _)| key_time(k)) {
                    self.last_ms.fetch_max(t, Ordering::Relaxed);
                }
                if let Ok(mut e) = self.events.lock() {
                    // Recorded before: written now, after what was kept.
                    let early: Vec<(String, EventRecord)> = e.drain(..).collect();
                    e.extend(loaded);
                    for (_, r) in early {
                        let key = self.key(r.time_ms);
                        ops.push(Op::Put(key.clone(), serde_json::to_string(&r).ok()));
                        e.push_back((key, r));
                    }
                    while e.len() > self.limit {
                        ops.extend(e.pop_front().map(|(k, _)| Op::Put(k, None)));
                    }
                }
            }
            Err(e) => {
                // Not written either: keys this hub could not read back, it could not trim.
                tracing::warn!(source = self.source, error = %e, "reading the events kept: these events stay in memory");
                return;
            }
        }
        let (tx, rx) = mpsc::channel();
        let source = self.source;
        let spawned = std::thread::Builder::new()
            .name(format!("events-{source}"))
            .spawn(move || write_events(source, &*store, &rx));
        if let Err(e) = spawned {
            tracing::warn!(source, error = %e, "no writer for events: they are kept in memory only");
            return;
        }
        if self.writer.set(Mutex::new(tx)).is_ok() {
            self.send(ops);
        }
    }

    pub fn push(&self, time_ms: u64, object: &str, reason: &str, message: String) {
        tracing::info!(source = self.source, object, reason, %message, "event");
        self.record(
            time_ms,
            EventRecord { time_ms, object: object.into(), reason: reason.into(), message, node: None },
        );
    }

    /// Records an event as it is (a node's, shipped to the hub), at `now_ms` by the
    /// hub's clock (its place in the log: never a time a node wrote).
    pub fn record(&self, now_ms: u64, record: EventRecord) {
        let key = self.key(now_ms);
        let mut ops = vec![Op::Put(key.clone(), serde_json::to_string(&record).ok())];
        if let Ok(mut e) = self.events.lock() {
            if let (Some(cap), Some(node)) = (self.per_node, record.node.as_deref()) {
                let mut same = e.iter().enumerate().filter(|(_, (_, r))| r.node.as_deref() == Some(node));
                if let Some((oldest, _)) = same.next() {
                    if same.count() + 1 >= cap {
                        ops.extend(e.remove(oldest).map(|(k, _)| Op::Put(k, None)));
                    }
                }
            }
            e.push_back((key, record));
            while e.len() > self.limit {
                ops.extend(e.pop_front().map(|(k, _)| Op::Put(k, None)));
            }
        }
        self.send(ops);
    }

    /// Forgets every event of `node`, here and in the store.
    pub fn forget_node(&self, node: &str) {
        let mut ops = vec![];
        if let Ok(mut e) = self.events.lock() {
            e.retain(|(k, r)| {
                let keep = r.node.as_deref() != Some(node);
                if !keep {
                    ops.push(Op::Put(k.clone(), None));
                }
                keep
            });
        }
        self.send(ops);
    }

    /// Takes in what other hubs of the store kept since this one loaded (a hub that takes
    /// the lead shows what the one before it recorded), the newest `limit` of all.
    pub fn reload(&self, store: &dyn Store) {
        let Ok(kept) = store.states(&self.prefix()) else { return };
        let mut ops = vec![];
        if let Ok(mut e) = self.events.lock() {
            let have: std::collections::HashSet<String> = e.iter().map(|(k, _)| k.clone()).collect();
            let mut all: Vec<(String, EventRecord)> = e.drain(..).collect();
            for (k, v) in kept.into_iter().filter(|(k, _)| !have.contains(k)) {
                if let Ok(r) = serde_json::from_str::<EventRecord>(&v) {
                    all.push((k, r));
                }
            }
            all.sort_by(|a, b| a.0.cmp(&b.0));
            if let Some(t) = all.last().and_then(|(k, _)| key_time(k)) {
                self.last_ms.fetch_max(t, Ordering::Relaxed);
            }
            let over = all.len().saturating_sub(self.limit);
            ops.extend(all.drain(..over).map(|(k, _)| Op::Put(k, None)));
            e.extend(all);
        }
        self.send(ops);
    }

    pub fn list(&self) -> Vec<EventRecord> {
        self.events.lock().map(|e| e.iter().map(|(_, r)| r.clone()).collect()).unwrap_or_default()
    }

    /// Waits (at most 5 s) until every event recorded so far is in the store.
    pub fn flush(&self) {
        let (tx, rx) = mpsc::channel();
        self.send(vec![Op::Flush(tx)]);
        let _ = rx.recv_timeout(std::time::Duration::from_secs(5));
    }
}

/// The time part of an event's key.
fn key_time(key: &str) -> Option<u64> {
    key.rsplit('/').next()?.split('-').next()?.parse().ok()
}

/// The writer thread: each batch of what is waiting, in one store call, until the log
/// goes away.
fn write_events(source: &str, store: &dyn Store, rx: &mpsc::Receiver<Op>) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![];
        let mut flushes = vec![];
        for op in std::iter::once(first).chain(std::iter::from_fn(|| rx.try_recv().ok())).take(500) {
            match op {
                Op::Put(k, v) => batch.push((k, v)),
                Op::Flush(done) => flushes.push(done),
            }
        }
        if !batch.is_empty() {
            if let Err(e) = store.put_states(&batch) {
                tracing::warn!(source, error = %e, events = batch.len(), "keeping events in the store");
            }
        }
        for f in flushes {
            let _ = f.send(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SqliteStore;

    /// What one hub recorded is what the next one on the store shows: the newest within
    /// the limit, then what it recorded itself before it had the store (written too);
    /// an unreadable record is deleted; two events of one millisecond both kept.
    #[test]
    fn events_outlive_the_hub_that_recorded_them() {
        let t = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&t.path().join("hub.db")).unwrap());
        let first = EventLog::new("rollouts", 3);
        first.persist(Arc::clone(&store));
        for i in 0..5 {
            first.push(1_000 + i / 2, "web", "RolloutComplete", format!("revision {i}"));
        }
        first.flush();
        let kept = store.states("events/rollouts/").unwrap();
        assert_eq!(kept.len(), 3, "the oldest are deleted past the limit: {kept:?}");
        store.put_state("events/rollouts/0000000000000001-broken", Some("{not json")).unwrap();
        // The next hub's clock is behind: its keys still sort after the ones it found.
        let next = EventLog::new("rollouts", 3);
        next.push(500, "db", "RolloutComplete", "early".into());
        next.persist(Arc::clone(&store));
        next.flush();
        let got: Vec<String> = next.list().into_iter().map(|e| e.message).collect();
        assert_eq!(got, ["revision 3", "revision 4", "early"]);
        let keys: Vec<String> = store.states("events/rollouts/").unwrap().into_iter().map(|(k, _)| k).collect();
        assert_eq!(keys.len(), 3, "the broken record and the oldest are gone: {keys:?}");
        let third = EventLog::new("rollouts", 3);
        third.persist(Arc::clone(&store));
        assert_eq!(third.list().last().map(|e| e.message.as_str()), Some("early"), "written, and last");
        // Another source's events are its own.
        let other = EventLog::new("alerts", 3);
        other.persist(store);
        assert!(other.list().is_empty());
    }

    /// A node that ships many events pushes out its own oldest, never another node's;
    /// the next hub on the store shows both nodes' events.
    #[test]
    fn a_chatty_node_pushes_out_only_its_own_events() {
        let t = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&t.path().join("hub.db")).unwrap());
        let log = EventLog::new("nodes", 10).with_per_node(3);
        log.persist(Arc::clone(&store));
        let ev = |node: &str, i: u64| EventRecord {
            time_ms: 1_000 + i,
            object: "web-1".into(),
            reason: "Started".into(),
            message: format!("{node} {i}"),
            node: Some(node.into()),
        };
        log.record(1, ev("quiet", 0));
        log.record(2, ev("quiet", 1));
        for i in 2..50 {
            log.record(1_000 + i, ev("chatty", i));
        }
        log.flush();
        let shown = |l: &EventLog| l.list().into_iter().map(|e| e.message).collect::<Vec<_>>();
        assert_eq!(shown(&log), ["quiet 0", "quiet 1", "chatty 47", "chatty 48", "chatty 49"]);
        assert_eq!(store.states("events/nodes/").unwrap().len(), 5, "the pushed out are deleted");
        let next = EventLog::new("nodes", 10).with_per_node(3);
        next.persist(Arc::clone(&store));
        assert_eq!(shown(&next), shown(&log));
        // A deleted node's events go, in the store too.
        next.forget_node("chatty");
        next.flush();
        assert_eq!(shown(&next), ["quiet 0", "quiet 1"]);
        assert_eq!(store.states("events/nodes/").unwrap().len(), 2);
    }
}
