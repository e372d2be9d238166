//! Runtime threat detection: every program a container starts, as the kernel reports it
//! (the process connector, no polling), attributed to its instance by cgroup and judged by
//! Falco-style rules (`rules.rs`: the shipped set, then the node's files). A match is a
//! `SecurityAlert` event on the instance — shipped to the hub with the node's other
//! events, kept while it is offline — and the rule's `action` (`restart`: the container
//! is killed and its restart policy applies; `stop`: killed and not started again by this
//! agent).
//!
//! Cost: nothing while nothing starts; per exec on the host, one read of
//! `/proc/PID/cgroup` (host processes end there), and for a container's process the few
//! `/proc` reads the rules' conditions ask for (fields are read lazily). The thread reads events as they come; a burst that overflows the
//! socket's 4 MiB buffer loses events, counted and logged.

pub mod rules;

use crate::Agent;
use rules::{Action, Rule};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tracing::{info, warn};

/// What the detector knows of one container.
#[derive(Debug, Clone)]
struct Known {
    instance: String,
    deployment: String,
    image: String,
    runtime: skiff_model::RuntimeKind,
    /// The overlay's writable layer: a program found there was not in the image.
    upper: std::path::PathBuf,
}

/// Counters, for tests and the bench.
#[derive(Debug, Default)]
pub struct Stats {
    pub execs: AtomicU64,
    pub in_containers: AtomicU64,
    pub alerts: AtomicU64,
    pub lost: AtomicU64,
}

/// Loads the shipped rules and the node's rule files (`--detect-rules`, in order).
pub fn load_rules(files: &[std::path::PathBuf]) -> Result<Vec<Rule>, String> {
    let mut texts = vec![("default rules".to_string(), rules::DEFAULT_RULES.to_string())];
    for f in files {
        let t = std::fs::read_to_string(f).map_err(|e| format!("{}: {e}", f.display()))?;
        texts.push((f.display().to_string(), t));
    }
    let refs: Vec<(&str, &str)> = texts.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
    rules::parse(&refs)
}

/// The container id of a process, from its cgroup path (`…/skiff/<id>`), if it is one of
/// ours.
fn container_of(cgroup: &str) -> Option<&str> {
    cgroup.lines().find_map(|l| {
        let path = l.splitn(3, ':').nth(2)?;
        let rest = &path[path.find("/skiff/")? + "/skiff/".len()..];
        let id = rest.split('/').next()?;
        (!id.is_empty()).then_some(id)
    })
}

/// A `/proc` file as text. What a workload controls (its arguments, its name) may be any
/// bytes: read lossily, so bytes that are no UTF-8 cannot hide a process from the rules.
fn read(path: String) -> Option<String> {
    std::fs::read(path).ok().map(|b| String::from_utf8_lossy(&b).into_owned())
}

/// `/proc/PID/cmdline` as one line of at most 1024 bytes (cut on a character boundary).
fn cmdline(raw: &str) -> String {
    let c = raw.split('\0').filter(|s| !s.is_empty()).collect::<Vec<_>>().join(" ");
    let mut end = c.len().min(1024);
    while !c.is_char_boundary(end) {
        end -= 1;
    }
    c[..end].to_string()
}

/// Process `pid` of container `id` as rules see it: each field read from `/proc` when a
/// condition first asks for it (most programs are judged on their name and executable
/// alone), then kept. A process gone meanwhile has no more fields.
struct Proc<'a> {
    pid: i32,
    id: &'a str,
    known: &'a Known,
    cache: std::cell::RefCell<HashMap<&'static str, Option<String>>>,
    /// `/proc/PID/status`, read once for the fields it holds.
    status: std::cell::OnceCell<Option<String>>,
}

impl Proc<'_> {
    fn read_field(&self, name: &str) -> Option<String> {
        let pid = self.pid;
        let status_field = |key: &str| {
            let status = self.status.get_or_init(|| read(format!("/proc/{pid}/status"))).as_ref()?;
            status.lines().find_map(|l| l.strip_prefix(key)).map(|v| v.trim().to_string())
        };
        Some(match name {
            "evt.type" => "execve".into(),
            "proc.pid" => pid.to_string(),
            "proc.name" => read(format!("/proc/{pid}/comm"))?.trim_end().to_string(),
            "proc.exe" => std::fs::read_link(format!("/proc/{pid}/exe")).ok()?.to_string_lossy().into_owned(),
            "proc.cmdline" => cmdline(&read(format!("/proc/{pid}/cmdline"))?),
            "proc.vpid" => status_field("NSpid:")?.split_whitespace().last()?.to_string(),
            "user.uid" => status_field("Uid:")?.split_whitespace().next()?.to_string(),
            "proc.pname" => {
                let ppid = status_field("PPid:")?;
                read(format!("/proc/{ppid}/comm"))?.trim_end().to_string()
            }
            // Written after the start: the file is in the overlay's upper layer.
            "proc.exe_writable" => {
                let exe = rules::Fields::field(self, "proc.exe")?;
                let rel = exe.trim_start_matches('/');
                (!rel.is_empty() && self.known.upper.join(rel).exists()).to_string()
            }
            "container.id" => self.id.to_string(),
            "container.name" => self.known.instance.clone(),
            "container.deployment" => self.known.deployment.clone(),
            "container.image" => self.known.image.clone(),
            _ => return None,
        })
    }
}

impl rules::Fields for Proc<'_> {
    fn field(&self, name: &str) -> Option<String> {
        if let Some(v) = self.cache.borrow().get(name) {
            return v.clone();
        }
        let v = self.read_field(name);
        // Only known fields are cached (rules name no others: they are checked at load).
        if let Some(key) = rules::FIELDS.iter().find(|f| **f == name) {
            self.cache.borrow_mut().insert(key, v.clone());
        }
        v
    }
}

pub struct Detector {
    pub stats: Arc<Stats>,
}

impl Detector {
    /// Starts the detector thread for `agent` with `rules`. Fails when the kernel's process
    /// connector cannot be opened (no CAP_NET_ADMIN, a kernel without it).
    pub fn start(agent: &Arc<Agent>, rules: Vec<Rule>) -> std::io::Result<Detector> {
        let mut events = skiff_runtime::procconn::ProcEvents::open()?;
        let stats = Arc::new(Stats::default());
        let (weak, st) = (Arc::downgrade(agent), Arc::clone(&stats));
        std::thread::Builder::new().name("detect".into()).spawn(move || {
            let mut known: HashMap<String, Option<Known>> = HashMap::new();
            loop {
                let batch = match events.recv() {
                    Ok(b) => b,
                    Err(e) if e.raw_os_error() == Some(nix::errno::Errno::ENOBUFS as i32) => {
                        let n = st.lost.fetch_add(1, Ordering::Relaxed);
                        if n.is_power_of_two() {
                            warn!("threat detection lost process events in a burst ({} times so far)", n + 1);
                        }
                        continue;
                    }
                    Err(e) => {
                        warn!("threat detection stopped: {e}");
                        return;
                    }
                };
                let Some(agent) = weak.upgrade() else { return };
                for skiff_runtime::procconn::ProcEvent::Exec { pid, tgid } in batch {
                    if pid != tgid {
                        continue;
                    }
                    st.execs.fetch_add(1, Ordering::Relaxed);
                    let Some(cg) = read(format!("/proc/{pid}/cgroup")) else { continue };
                    let Some(id) = container_of(&cg) else { continue };
                    st.in_containers.fetch_add(1, Ordering::Relaxed);
                    if !known.contains_key(id) {
                        if known.len() > 4096 {
                            known.clear();
                        }
                        known.insert(id.to_string(), agent.detect_lookup(id));
                    }
                    let Some(Some(k)) = known.get(id) else { continue };
                    let ev = Proc { pid, id, known: k, cache: Default::default(), status: Default::default() };
                    for r in rules.iter().filter(|r| rules::eval(&r.condition, &ev)) {
                        st.alerts.fetch_add(1, Ordering::Relaxed);
                        agent.security_alert(k, id, r, &ev);
                    }
                }
            }
        })?;
        Ok(Detector { stats })
    }
}

impl Agent {
    /// The instance behind container `id`, if it is this agent's.
    fn detect_lookup(&self, id: &str) -> Option<Known> {
        let rows = self.db(|s| s.instances()).ok()?;
        let r = rows.into_iter().find(|r| r.container_id == id)?;
        let upper = self.runtimes.of(r.spec.runtime).instance_dir(id).join("upper");
        Some(Known {
            instance: r.name,
            deployment: r.spec.name.clone(),
            image: r.spec.image.clone(),
            runtime: r.spec.runtime,
            upper,
        })
    }

    /// Records a rule's match and carries out its action.
    fn security_alert(self: &Arc<Self>, k: &Known, id: &str, r: &Rule, ev: &impl rules::Fields) {
        let msg = format!("{:?} {}: {}", r.priority, r.name, rules::render(&r.output, ev));
        info!(instance = %k.instance, "{msg}");
        self.event(&k.instance, "SecurityAlert", &msg);
        if r.action == Action::None {
            return;
        }
        if r.action == Action::Stop {
            if let Ok(mut s) = self.security_stopped.lock() {
                s.insert(k.instance.clone());
            }
        }
        let rt = self.runtimes.of(k.runtime);
        let what = if r.action == Action::Stop { "stopped" } else { "restarted" };
        match rt.signal(id, "KILL") {
            Ok(()) => self.event(&k.instance, "SecurityAction", &format!("{what} by rule {:?}", r.name)),
            Err(e) => warn!(instance = %k.instance, "rule {:?}: {e}", r.name),
        }
    }

    /// Whether a rule stopped `instance` (it is not started again by this agent).
    pub(crate) fn stopped_by_rule(&self, instance: &str) -> bool {
        self.security_stopped.lock().is_ok_and(|s| s.contains(instance))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn containers_are_found_by_cgroup_on_v1_and_v2() {
        let v1 = "12:memory:/skiff/ab12-web-1-3f\n1:name=systemd:/user.slice\n";
        assert_eq!(container_of(v1), Some("ab12-web-1-3f"));
        let v2 = "0::/skiff/ab12-web-1-3f\n";
        assert_eq!(container_of(v2), Some("ab12-web-1-3f"));
        assert_eq!(container_of("0::/system.slice/sshd.service\n"), None);
        assert_eq!(container_of("0::/skiff/\n"), None);
    }

    #[test]
    fn a_workload_cannot_crash_or_dodge_the_detector_with_its_arguments() {
        // A long argument of multi-byte characters is cut on a character boundary.
        // ("sh -c x" is 7 bytes: byte 1024 falls inside a two-byte "é".)
        let long = format!("sh\0-c\0x{}", "é".repeat(800));
        let c = cmdline(&long);
        assert!(c.len() == 1023 && c.starts_with("sh -c xé"), "{}", c.len());
        // Bytes that are no UTF-8 still leave the rest of the line readable.
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("cmdline");
        std::fs::write(&f, b"cat\0/etc/shadow\0\xff\xfe").unwrap();
        let line = cmdline(&read(f.display().to_string()).unwrap());
        assert!(line.starts_with("cat /etc/shadow"), "{line}");
    }

    #[test]
    fn the_shipped_rules_load() {
        assert!(load_rules(&[]).unwrap().len() >= 4);
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("local.yaml");
        std::fs::write(&f, "- rule: Terminal shell in container\n  enabled: false\n").unwrap();
        let r = load_rules(std::slice::from_ref(&f)).unwrap();
        assert!(!r.iter().any(|r| r.name == "Terminal shell in container"));
        std::fs::write(&f, "- rule: x\n  condition: proc.nope = 1\n  output: o\n").unwrap();
        assert!(load_rules(&[f]).unwrap_err().contains("proc.nope"));
    }
}
