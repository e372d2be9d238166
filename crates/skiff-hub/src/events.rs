//! The hub's own events (autoscaler, rollouts, alerts, the fleet's security events): a
//! bounded list, merged with the nodes' events by `GET /api/v1/events`. Once given the
//! store ([`EventLog::persist`]), each event is also written there under
//! `events/SOURCE/TIME-SEQ` (and the oldest deleted past the limit), so a hub that starts
//! or takes over shows what the one before it recorded. One write per event: a quiet
//! fleet writes nothing.

use crate::store::Store;
use skiff_model::EventRecord;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

/// The store's state keys of events.
const PREFIX: &str = "events/";

/// The newest `limit` events, oldest first.
pub struct EventLog {
    source: &'static str,
    limit: usize,
    /// Each event with its key in the store.
    events: Mutex<VecDeque<(String, EventRecord)>>,
    store: OnceLock<Arc<dyn Store>>,
    /// Tells apart events of one millisecond.
    seq: AtomicU64,
}

impl EventLog {
    pub fn new(source: &'static str, limit: usize) -> Self {
        EventLog { source, limit, events: Mutex::default(), store: OnceLock::new(), seq: AtomicU64::new(0) }
    }

    fn prefix(&self) -> String {
        format!("{PREFIX}{}/", self.source)
    }

    /// Loads the events `store` kept (before the ones pushed since), and writes every
    /// later one there too. An unreadable store or record is skipped, said once.
    pub fn persist(&self, store: Arc<dyn Store>) {
        match store.states(&self.prefix()) {
            Ok(mut kept) => {
                kept.sort();
                let loaded: Vec<(String, EventRecord)> =
                    kept.into_iter().filter_map(|(k, v)| Some((k, serde_json::from_str(&v).ok()?))).collect();
                let mut past = vec![];
                if let Ok(mut e) = self.events.lock() {
                    for item in loaded.into_iter().rev() {
                        e.push_front(item);
                    }
                    while e.len() > self.limit {
                        past.extend(e.pop_front().map(|(k, _)| k));
                    }
                }
                for k in past {
                    let _ = store.put_state(&k, None);
                }
            }
            Err(e) => tracing::warn!(source = self.source, error = %e, "reading the events kept: starting afresh"),
        }
        let _ = self.store.set(store);
    }

    pub fn push(&self, time_ms: u64, object: &str, reason: &str, message: String) {
        tracing::info!(source = self.source, object, reason, %message, "event");
        let record = EventRecord { time_ms, object: object.into(), reason: reason.into(), message, node: None };
        let key = format!("{}{time_ms:016}-{:08}", self.prefix(), self.seq.fetch_add(1, Ordering::Relaxed));
        let mut past = vec![];
        if let Ok(mut e) = self.events.lock() {
            e.push_back((key.clone(), record.clone()));
            while e.len() > self.limit {
                past.extend(e.pop_front().map(|(k, _)| k));
            }
        }
        if let Some(store) = self.store.get() {
            let text = serde_json::to_string(&record).unwrap_or_default();
            if let Err(e) = store.put_state(&key, Some(&text)) {
                tracing::warn!(source = self.source, error = %e, "keeping an event in the store");
            }
            for k in past {
                let _ = store.put_state(&k, None);
            }
        }
    }

    pub fn list(&self) -> Vec<EventRecord> {
        self.events.lock().map(|e| e.iter().map(|(_, r)| r.clone()).collect()).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SqliteStore;

    /// What one hub recorded is what the next one on the store shows, the newest within
    /// the limit, after anything it had itself.
    #[test]
    fn events_outlive_the_hub_that_recorded_them() {
        let t = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&t.path().join("hub.db")).unwrap());
        let first = EventLog::new("rollouts", 3);
        first.persist(Arc::clone(&store));
        for i in 0..5 {
            first.push(1_000 + i, "web", "RolloutComplete", format!("revision {i}"));
        }
        assert_eq!(store.states("events/rollouts/").unwrap().len(), 3, "the oldest are deleted past the limit");
        store.put_state("events/rollouts/0000000000000001-broken", Some("{not json")).unwrap();
        let next = EventLog::new("rollouts", 3);
        next.push(2_000, "db", "RolloutComplete", "early".into());
        next.persist(Arc::clone(&store));
        let got: Vec<String> = next.list().into_iter().map(|e| e.message).collect();
        assert_eq!(got, ["revision 3", "revision 4", "early"]);
        // Another source's events are its own.
        let other = EventLog::new("alerts", 3);
        other.persist(store);
        assert!(other.list().is_empty());
    }
}
