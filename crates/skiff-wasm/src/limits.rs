//! Limits on one WebAssembly workload.
//!
//! * **Memory** (`--memory`): every linear memory and table of a store counts against one
//!   budget (a table element as 8 bytes). Growing past it is a trap whose message says
//!   so; the instance ends as OOM-killed, as a container over its memory limit does.
//! * **CPU** (`--cpus`): a token bucket over the *process's* CPU time (what `/proc` and
//!   `top` show for the instance, host calls included). The epoch advances every
//!   [`crate::engine::EPOCH_TICK`]; at each tick a running store charges the bucket
//!   and, when it is in debt, sleeps the debt off before running on. So a busy loop gets
//!   `cpus` of one core, averaged over time, with bursts of at most one 100 ms period's
//!   quota — the CFS quota's semantics, enforced between wasm instructions.
//! * **Time** (`wasm.timeout`): see `run.rs`; a tick also yields to the executor so a
//!   timer can end a guest that never calls the host.

use std::sync::{Arc, Mutex};
use std::time::Duration;
use wasmtime::ResourceLimiter;

/// Bytes a table element counts for.
const TABLE_ELEMENT_BYTES: u64 = 8;

/// The memory budget of one store. `exceeded` keeps what went over, for the outcome.
#[derive(Debug, Default)]
pub struct Memory {
    cap: Option<u64>,
    used: u64,
    pub exceeded: Option<String>,
}

impl Memory {
    pub fn new(cap: Option<u64>) -> Self {
        Memory { cap, used: 0, exceeded: None }
    }

    fn grow(&mut self, what: &str, current: u64, desired: u64) -> wasmtime::Result<bool> {
        let after = self.used.saturating_sub(current).saturating_add(desired);
        if let Some(cap) = self.cap {
            if after > cap {
                let msg = format!(
                    "memory limit of {} reached: {what} asked to grow from {} to {} (in use: {})",
                    skiff_model::format_bytes(cap),
                    skiff_model::format_bytes(current),
                    skiff_model::format_bytes(desired),
                    skiff_model::format_bytes(self.used),
                );
                self.exceeded = Some(msg.clone());
                return Err(wasmtime::format_err!(msg));
            }
        }
        self.used = after;
        Ok(true)
    }
}

impl ResourceLimiter for Memory {
    fn memory_growing(&mut self, current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        self.grow("a linear memory", current as u64, desired as u64)
    }

    fn table_growing(&mut self, current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        self.grow("a table", current as u64 * TABLE_ELEMENT_BYTES, desired as u64 * TABLE_ELEMENT_BYTES)
    }
}

/// A CPU share as a token bucket. Times are durations since any fixed origin: `now` on
/// a monotonic clock, `cpu` the process's CPU time. Pure, so it is tested on numbers.
///
/// The credit at `now` is what was saved at the last rebase, plus `rate` per second of
/// wall time since, minus the CPU spent since. It starts at one burst and never holds
/// more than that.
#[derive(Debug, Clone)]
pub struct CpuBucket {
    /// Cores' worth of CPU per second of wall time (0.5 for `--cpus 0.5`).
    rate: f64,
    /// The most unused CPU that can be spent at once, in seconds.
    burst: f64,
    saved: f64,
    t_ref: Duration,
    cpu_ref: Duration,
}

/// One CFS period: the burst a bucket allows is the quota of one.
const PERIOD: Duration = Duration::from_millis(100);

impl CpuBucket {
    pub fn new(cpus_millis: u64, now: Duration, cpu: Duration) -> Self {
        let rate = cpus_millis as f64 / 1000.0;
        let burst = PERIOD.as_secs_f64() * rate;
        CpuBucket { rate, burst, saved: burst, t_ref: now, cpu_ref: cpu }
    }

    /// Charges the CPU used so far; returns how long to pause to be back within the share.
    pub fn debt(&mut self, now: Duration, cpu: Duration) -> Option<Duration> {
        let earned = now.saturating_sub(self.t_ref).as_secs_f64() * self.rate;
        let spent = cpu.saturating_sub(self.cpu_ref).as_secs_f64();
        let credit = self.saved + earned - spent;
        if credit > self.burst {
            // Idle time earns one burst at most.
            (self.t_ref, self.cpu_ref, self.saved) = (now, cpu, self.burst);
            return None;
        }
        (credit < 0.0).then(|| Duration::from_secs_f64(-credit / self.rate))
    }
}

/// The process's CPU time (all threads).
pub fn process_cpu() -> Duration {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_PROCESS_CPUTIME_ID)
        .map(|t| Duration::new(t.tv_sec() as u64, t.tv_nsec() as u32))
        .unwrap_or_default()
}

/// A monotonic clock reading.
pub fn monotonic() -> Duration {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| Duration::new(t.tv_sec() as u64, t.tv_nsec() as u32))
        .unwrap_or_default()
}

/// The process-wide CPU share, shared by every store the process runs.
#[derive(Clone)]
pub struct CpuShare(Arc<Mutex<CpuBucket>>);

impl CpuShare {
    pub fn new(cpus_millis: u64) -> Self {
        CpuShare(Arc::new(Mutex::new(CpuBucket::new(cpus_millis, monotonic(), process_cpu()))))
    }

    /// How long to pause now, if at all.
    pub fn pause(&self) -> Option<Duration> {
        self.0.lock().ok()?.debt(monotonic(), process_cpu())
    }
}

/// Store data that carries a [`Memory`] budget.
pub trait Limited: Send + 'static {
    fn memory(&mut self) -> &mut Memory;
}

/// A store for one instance under the limits: its memory budget, and the tick handler
/// (see [`on_tick`]).
pub fn store<T: Limited>(
    engine: &wasmtime::Engine,
    state: T,
    cpu: Option<CpuShare>,
    yield_always: bool,
) -> wasmtime::Store<T> {
    let mut store = wasmtime::Store::new(engine, state);
    store.limiter(|s| s.memory());
    on_tick(&mut store, cpu, yield_always);
    store
}

/// Installs the tick handler on a store: throttle to the CPU share, and yield to the
/// executor at every tick when `yield_always` (so timers can fire while the guest runs).
fn on_tick<T: 'static>(store: &mut wasmtime::Store<T>, cpu: Option<CpuShare>, yield_always: bool) {
    use wasmtime::UpdateDeadline;
    if cpu.is_none() && !yield_always {
        // Nothing to watch: the epoch never reaches this deadline.
        store.set_epoch_deadline(u64::MAX / 2);
        return;
    }
    store.set_epoch_deadline(1);
    store.epoch_deadline_callback(move |_| {
        let pause = cpu.as_ref().and_then(CpuShare::pause);
        Ok(match pause {
            Some(d) => UpdateDeadline::YieldCustom(1, Box::pin(tokio::time::sleep(d))),
            None if yield_always => UpdateDeadline::Yield(1),
            None => UpdateDeadline::Continue(1),
        })
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_busy_loop_pays_back_what_it_takes_above_its_share() {
        let mut b = CpuBucket::new(250, ms(0), ms(0));
        // Within the burst (25 ms of one 100 ms period): no pause.
        assert_eq!(b.debt(ms(10), ms(10)), None);
        // 60 ms of CPU after 60 ms: earned 15, burst 25, so 20 ms over: 80 ms at 0.25.
        let d = b.debt(ms(60), ms(60)).unwrap();
        assert!((d.as_secs_f64() - 0.080).abs() < 1e-9, "{d:?}");
        // After the pause nothing is owed.
        assert_eq!(b.debt(ms(140), ms(60)), None);
    }

    #[test]
    fn over_a_long_run_usage_converges_to_the_share() {
        // Simulate a guest that runs flat out, checked every 10 ms of its own running.
        let mut b = CpuBucket::new(200, ms(0), ms(0));
        let (mut now, mut cpu) = (ms(0), ms(0));
        for _ in 0..10_000 {
            now += ms(10);
            cpu += ms(10);
            if let Some(p) = b.debt(now, cpu) {
                now += p;
            }
        }
        let share = cpu.as_secs_f64() / now.as_secs_f64();
        assert!((share - 0.2).abs() < 0.005, "{share}");
    }

    #[test]
    fn idle_time_earns_one_burst_at_most() {
        let mut b = CpuBucket::new(500, ms(0), ms(0));
        assert_eq!(b.debt(ms(10_000), ms(0)), None);
        // 10 s idle, then 100 ms flat out: only 50 ms was saved, 25 ms more earned.
        let d = b.debt(ms(10_050), ms(100)).unwrap();
        assert!((d.as_secs_f64() - 0.050).abs() < 1e-9, "{d:?}");
    }

    #[test]
    fn memory_and_tables_share_one_budget() {
        let mut m = Memory::new(Some(200 << 10));
        assert!(m.memory_growing(0, 128 << 10, None).unwrap());
        assert!(m.table_growing(0, 1024, None).unwrap());
        // Up to the cap exactly is allowed; a page more is not.
        assert!(m.memory_growing(128 << 10, 192 << 10, None).unwrap());
        let err = m.memory_growing(192 << 10, 256 << 10, None).unwrap_err();
        assert!(err.to_string().starts_with("memory limit of 200Ki reached: a linear memory"), "{err}");
        assert!(m.exceeded.is_some());
        let mut free = Memory::new(None);
        assert!(free.memory_growing(0, 1 << 30, None).unwrap());
    }
}
