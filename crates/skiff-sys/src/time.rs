//! The wall clock, read in one place, and the [`Clock`] seam the roles read time through:
//! decision code takes the time as an input; the hub's controllers and the agent's loop
//! read it from a `Clock`, so tests run them on a [`ManualClock`] that moves only when told.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

pub trait Clock: Send + Sync {
    /// Milliseconds since the Unix epoch.
    fn now_ms(&self) -> u64;

    /// How long until `at_ms` (zero once it has passed).
    fn until(&self, at_ms: u64) -> std::time::Duration {
        std::time::Duration::from_millis(at_ms.saturating_sub(self.now_ms()))
    }
}

/// The wall clock ([`now_ms`]).
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        now_ms()
    }

    /// Not rounded to the millisecond: a restart due at `at_ms` is not started up to a
    /// millisecond late because `now_ms` truncates.
    fn until(&self, at_ms: u64) -> std::time::Duration {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        std::time::Duration::from_millis(at_ms).saturating_sub(now)
    }
}

/// A clock that stands still until [`ManualClock::advance`] or [`ManualClock::set`].
#[derive(Debug, Default)]
pub struct ManualClock(AtomicU64);

impl ManualClock {
    pub fn at(ms: u64) -> Arc<Self> {
        Arc::new(ManualClock(AtomicU64::new(ms)))
    }

    pub fn advance(&self, ms: u64) {
        self.0.fetch_add(ms, Ordering::SeqCst);
    }

    pub fn set(&self, ms: u64) {
        self.0.store(ms, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// The wall clock, shared.
pub fn system() -> Arc<dyn Clock> {
    Arc::new(SystemClock)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manual_clock_moves_only_when_told() {
        let c = ManualClock::at(1_000);
        assert_eq!(c.now_ms(), 1_000);
        c.advance(250);
        assert_eq!(c.now_ms(), 1_250);
        c.set(5);
        assert_eq!(c.now_ms(), 5);
        assert!(SystemClock.now_ms() > 1_600_000_000_000, "the wall clock is past 2020");
    }

    #[test]
    fn until_counts_down_to_zero() {
        let c = ManualClock::at(1_000);
        assert_eq!(c.until(1_250), std::time::Duration::from_millis(250));
        assert_eq!(c.until(900), std::time::Duration::ZERO);
        let now = SystemClock.now_ms();
        let d = SystemClock.until(now + 1_000);
        assert!(d <= std::time::Duration::from_millis(1_000), "{d:?}");
        assert_eq!(SystemClock.until(now - 1), std::time::Duration::ZERO);
    }
}
