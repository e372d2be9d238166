//! Named crash points for fault-injection tests: `SKIFF_CRASH_AT=<name>` makes the process
//! SIGKILL itself when it reaches the point of that name — no destructors, no flushing,
//! as close to a power cut as a process can get without the kernel losing its page cache.
//! Tests kill a pull or a join at every step and check that what remains is the old state
//! or the new one, never a mix. Unset (always, outside tests), a point costs one load.

use std::sync::OnceLock;

static WANTED: OnceLock<Option<String>> = OnceLock::new();

/// Dies here if `SKIFF_CRASH_AT` names this point.
pub fn point(name: &str) {
    let wanted = WANTED.get_or_init(|| std::env::var("SKIFF_CRASH_AT").ok().filter(|s| !s.is_empty()));
    if wanted.as_deref() == Some(name) {
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
        // SIGKILL cannot be caught; should raise fail, end at once anyway.
        std::process::abort();
    }
}
