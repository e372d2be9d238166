//! The hub's clock, injected: every controller, the store's transactions and the fleet's
//! heartbeat bookkeeping read the time through one [`Clock`] (`skiff_sys::time`'s seam),
//! so tests run them on a [`ManualClock`] that moves only when told.

pub use skiff_sys::time::{system, Clock, ManualClock, SystemClock};
