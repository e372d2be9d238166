//! The hub's own events (autoscaler, rollouts, alerts): a bounded list in memory, merged
//! with the nodes' events by `GET /api/v1/events`.

use skiff_model::EventRecord;
use std::collections::VecDeque;
use std::sync::Mutex;

/// The newest `limit` events, oldest first.
pub struct EventLog {
    source: &'static str,
    limit: usize,
    events: Mutex<VecDeque<EventRecord>>,
}

impl EventLog {
    pub fn new(source: &'static str, limit: usize) -> Self {
        EventLog { source, limit, events: Mutex::default() }
    }

    pub fn push(&self, time_ms: u64, object: &str, reason: &str, message: String) {
        tracing::info!(source = self.source, object, reason, %message, "event");
        if let Ok(mut e) = self.events.lock() {
            e.push_back(EventRecord { time_ms, object: object.into(), reason: reason.into(), message, node: None });
            while e.len() > self.limit {
                e.pop_front();
            }
        }
    }

    pub fn list(&self) -> Vec<EventRecord> {
        self.events.lock().map(|e| e.iter().cloned().collect()).unwrap_or_default()
    }
}
