//! How the agent learns that an instance ended: the kernel says so. Each running
//! instance's shim is watched through a pidfd (readable once the shim is gone, which it
//! is only after writing `exit.json`) by one thread sleeping in `epoll`, so an exit wakes
//! the agent's loop within milliseconds and nothing re-reads every instance's files while
//! nothing happens.
//!
//! Contract: [`Exits::quiet`] is true only while a watch is in place and has not fired;
//! for every other running instance the caller asks the runtime
//! ([`skiff_runtime::Runtime::liveness`]). A shim that cannot be watched (a kernel without
//! pidfds) is listed as unwatched and the caller polls it.

use skiff_sys::pidfd::Watcher;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use tokio::sync::Notify;

pub(crate) struct Exits {
    /// Started with the first watch (a node with no instance has no watcher thread).
    watcher: Mutex<Option<Watcher>>,
    wake: Arc<Notify>,
    /// Container id → its watch key, and back.
    keys: Mutex<HashMap<String, u64>>,
    ids: Arc<Mutex<HashMap<u64, String>>>,
    /// Containers whose shim ended since the caller last looked.
    ended: Arc<Mutex<HashSet<String>>>,
    /// Running containers whose shim could not be watched.
    unwatched: Mutex<HashSet<String>>,
}

impl Exits {
    /// `wake` is notified when a watched shim ends.
    pub fn new(wake: Arc<Notify>) -> Self {
        Exits {
            watcher: Mutex::new(None),
            wake,
            keys: Default::default(),
            ids: Default::default(),
            ended: Default::default(),
            unwatched: Default::default(),
        }
    }

    /// Whether the container's end will be reported: a watch is in place and has not fired.
    pub fn quiet(&self, id: &str) -> bool {
        self.keys.lock().is_ok_and(|k| k.contains_key(id)) && !self.ended.lock().is_ok_and(|e| e.contains(id))
    }

    /// Watches `pid` as the shim of container `id`; `still_ours` is asked once the pidfd is
    /// open (the pidfd then holds that very process, whatever happens to the number) and
    /// must confirm the pid is still the instance's shim. Returns whether a watch is in
    /// place; if not, the container is marked for polling.
    pub fn watch(&self, id: &str, pid: i32, still_ours: impl FnOnce() -> bool) -> bool {
        self.forget(id);
        let key = skiff_sys::pidfd::open(pid).ok().filter(|_| still_ours()).and_then(|fd| {
            let mut w = self.watcher.lock().ok()?;
            if w.is_none() {
                let (ids, ended, wake) = (Arc::clone(&self.ids), Arc::clone(&self.ended), Arc::clone(&self.wake));
                *w = Some(
                    Watcher::start(move |key| {
                        if let Some(id) = ids.lock().ok().and_then(|mut m| m.remove(&key)) {
                            if let Ok(mut e) = ended.lock() {
                                e.insert(id);
                            }
                            wake.notify_one();
                        }
                    })
                    .ok()?,
                );
            }
            // The key is known to `ids` before the watch can fire.
            let mut ids = self.ids.lock().ok()?;
            let key = w.as_ref()?.add(fd).ok()?;
            ids.insert(key, id.to_string());
            Some(key)
        });
        match key {
            Some(key) => {
                if let Ok(mut k) = self.keys.lock() {
                    k.insert(id.to_string(), key);
                }
                true
            }
            None => {
                self.poll_instead(id);
                false
            }
        }
    }

    /// Marks `id` as running without a watch: the caller polls it.
    pub fn poll_instead(&self, id: &str) {
        if let Ok(mut u) = self.unwatched.lock() {
            u.insert(id.to_string());
        }
    }

    /// Stops watching `id` (it ended, or it is being removed).
    pub fn forget(&self, id: &str) {
        if let Some(key) = self.keys.lock().ok().and_then(|mut k| k.remove(id)) {
            if let Some(w) = self.watcher.lock().ok().as_ref().and_then(|w| w.as_ref()) {
                w.remove(key);
            }
            if let Ok(mut ids) = self.ids.lock() {
                ids.remove(&key);
            }
        }
        for set in [&*self.ended, &self.unwatched] {
            if let Ok(mut s) = set.lock() {
                s.remove(id);
            }
        }
    }

    /// Whether some running instance has to be polled.
    pub fn any_unwatched(&self) -> bool {
        self.unwatched.lock().is_ok_and(|u| !u.is_empty())
    }

    /// Stops the watcher thread (the agent is stopping).
    pub fn clear(&self) {
        if let Ok(mut w) = self.watcher.lock() {
            *w = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn an_exit_wakes_the_loop_and_a_reused_pid_is_not_watched() {
        let wake = Arc::new(Notify::new());
        let exits = Exits::new(Arc::clone(&wake));
        let mut child = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        assert!(exits.watch("c1", child.id() as i32, || true));
        assert!(exits.quiet("c1") && !exits.any_unwatched());
        child.kill().unwrap();
        child.wait().unwrap();
        tokio::time::timeout(Duration::from_secs(5), wake.notified()).await.unwrap();
        assert!(!exits.quiet("c1"), "fired: the caller looks");
        exits.forget("c1");
        assert!(!exits.quiet("c1"));
        // The pid is no longer the instance's by the time the pidfd is open: polled instead.
        let mut other = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        assert!(!exits.watch("c2", other.id() as i32, || false));
        assert!(exits.any_unwatched() && !exits.quiet("c2"));
        exits.forget("c2");
        assert!(!exits.any_unwatched());
        other.kill().unwrap();
        other.wait().unwrap();
        exits.clear();
    }
}
