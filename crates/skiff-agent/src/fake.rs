//! A scriptable [`Runtime`] for in-process tests of the reconcile loop: instances "run"
//! as entries in a table, a test ends one with the exit it wants, and every call is
//! counted. Paired with a `ManualClock`, a test drives the agent's passes one by one
//! with no process, cgroup or sleep.

use skiff_model::ExitStatus;
use skiff_runtime::cgroup::{CgroupLimits, CgroupStats};
use skiff_runtime::runc::ExecOutput;
use skiff_runtime::{CreateRequest, Liveness, Runtime, RuntimeError};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

#[derive(Debug, Default)]
struct Table {
    live: BTreeMap<String, Liveness>,
    next_pid: i32,
    starts: usize,
    signals: Vec<(String, String)>,
    failing_starts: usize,
    /// `create` makes no directory (so nothing can be written into it).
    no_dirs: bool,
}

pub(crate) struct FakeRuntime {
    dir: PathBuf,
    table: Mutex<Table>,
}

impl FakeRuntime {
    pub(crate) fn new(dir: PathBuf) -> Self {
        FakeRuntime { dir, table: Mutex::new(Table { next_pid: 1000, ..Default::default() }) }
    }

    fn with<T>(&self, f: impl FnOnce(&mut Table) -> T) -> T {
        f(&mut self.table.lock().expect("fake runtime lock"))
    }

    /// Ends the running instance `id` with `code` at `at_ms`.
    pub(crate) fn exit(&self, id: &str, code: i32, at_ms: u64) {
        let status = ExitStatus { code, signal: None, oom_killed: false, finished_at_ms: at_ms, message: None };
        self.with(|t| t.live.insert(id.to_string(), Liveness::Exited(status)));
    }

    /// How many times instances were started.
    pub(crate) fn starts(&self) -> usize {
        self.with(|t| t.starts)
    }

    /// From now on `create` makes no instance directory.
    pub(crate) fn without_dirs(&self) {
        self.with(|t| t.no_dirs = true);
    }

    /// The next `n` starts fail.
    pub(crate) fn fail_starts(&self, n: usize) {
        self.with(|t| t.failing_starts = n);
    }

    /// Ids of instances that run now.
    pub(crate) fn running(&self) -> Vec<String> {
        self.with(|t| {
            t.live.iter().filter(|(_, l)| matches!(l, Liveness::Running { .. })).map(|(id, _)| id.clone()).collect()
        })
    }

    /// Whether `create` made the instance's directory and `remove` has not taken it.
    pub(crate) fn instance_dir_exists(&self, id: &str) -> bool {
        self.instance_dir(id).exists()
    }

    /// The signals sent, as (id, signal).
    pub(crate) fn signals(&self) -> Vec<(String, String)> {
        self.with(|t| t.signals.clone())
    }
}

impl Runtime for FakeRuntime {
    fn kind(&self) -> &'static str {
        "fake"
    }

    fn create(&self, req: &CreateRequest<'_>) -> Result<(), RuntimeError> {
        let dir = self.instance_dir(&req.id);
        if !self.with(|t| t.no_dirs) {
            std::fs::create_dir_all(&dir).map_err(|source| RuntimeError::Io {
                op: "create",
                path: dir.clone(),
                source,
            })?;
        }
        self.with(|t| {
            t.live.entry(req.id.clone()).or_insert(Liveness::Gone);
        });
        Ok(())
    }

    fn start(&self, id: &str) -> Result<i32, RuntimeError> {
        self.with(|t| {
            if t.failing_starts > 0 {
                t.failing_starts -= 1;
                let what = "a start the test made fail".to_string();
                return Err(RuntimeError::Unsupported { id: id.to_string(), what });
            }
            t.next_pid += 1;
            t.starts += 1;
            t.live.insert(id.to_string(), Liveness::Running { pid: t.next_pid });
            Ok(t.next_pid)
        })
    }

    fn liveness(&self, id: &str) -> Liveness {
        self.with(|t| t.live.get(id).cloned().unwrap_or(Liveness::Gone))
    }

    /// Nothing to watch: the agent polls the fake instead.
    fn watch_pid(&self, _id: &str) -> Option<i32> {
        None
    }

    /// A stop signal ends a running instance as a process that honours it would (143).
    fn signal(&self, id: &str, signal: &str) -> Result<(), RuntimeError> {
        self.with(|t| {
            t.signals.push((id.to_string(), signal.to_string()));
            if let Some(l @ Liveness::Running { .. }) = t.live.get_mut(id) {
                let status =
                    ExitStatus { code: 143, signal: Some(15), oom_killed: false, finished_at_ms: 0, message: None };
                *l = Liveness::Exited(status);
            }
        });
        Ok(())
    }

    fn exec(&self, _id: &str, _argv: &[String], _timeout: Duration) -> Result<ExecOutput, RuntimeError> {
        Ok(ExecOutput { code: 0, stdout: vec![], stderr: vec![] })
    }

    fn update_hosts(&self, _id: &str, _hosts: &str) -> Result<(), RuntimeError> {
        Ok(())
    }

    fn remove(&self, id: &str) -> Result<(), RuntimeError> {
        self.with(|t| t.live.remove(id));
        let _ = std::fs::remove_dir_all(self.instance_dir(id));
        Ok(())
    }

    fn log_path(&self, id: &str) -> PathBuf {
        self.instance_dir(id).join("container.log")
    }

    fn instance_dir(&self, id: &str) -> PathBuf {
        self.dir.join(id)
    }

    fn stats(&self, _id: &str) -> CgroupStats {
        CgroupStats::default()
    }

    fn limits(&self, _id: &str) -> CgroupLimits {
        CgroupLimits::default()
    }

    fn known(&self) -> Vec<String> {
        self.with(|t| t.live.keys().cloned().collect())
    }
}
