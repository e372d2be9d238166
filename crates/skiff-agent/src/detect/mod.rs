//! Runtime threat detection: what containers do, as the kernel reports it — no polling,
//! one thread waiting on the kernel's sources — attributed to its instance and judged by
//! Falco-style rules (`rules.rs`: the shipped set, then the node's files):
//!
//! | event (`evt.type`) | source | attributed by |
//! |---|---|---|
//! | `execve`: a program started | the process connector | the process's cgroup |
//! | `open` (`evt.is_open_write`): a file written | fanotify on each container's overlay | the writer's cgroup |
//! | `listen`: a listening socket | the seccomp filter's `SCMP_ACT_LOG` on `listen`, read from the audit multicast | the caller's cgroup |
//! | `seccomp`: a call the filter refused | the same records (`SECCOMP_FILTER_FLAG_LOG`, runc ≥ 1.2), or the call itself handed to the agent's listener (`SCMP_ACT_NOTIFY`, runc 1.1: `refused.rs`), answered EPERM, then judged | the caller's cgroup (for a handed-over call, read while it waits) |
//! | `connect`: a new flow out of a container | connection tracking's events in the host's namespace | its source address |
//!
//! A match is a `SecurityAlert` event on the instance — shipped to the hub with the
//! node's other events, kept while it is offline — and the rule's `action` (`restart`:
//! the container is killed and its restart policy applies; `stop`: killed and not started
//! again by this agent).
//!
//! Limits: a process that exits within microseconds of its exec can be gone before its
//! command line is read (its fields are `<NA>`); a container's overlay is watched from its
//! entrypoint's exec, so what runc itself writes while setting it up is not reported;
//! gVisor (`runsc`) containers run their programs inside the sandbox, where none of these
//! sources reach; flows are seen only for bridge-networked containers whose traffic the
//! host tracks (the outbound NAT does).
//!
//! Cost: nothing while nothing happens; per exec on the host, one read of
//! `/proc/PID/cgroup` (host processes end there), and for a container's process the few
//! `/proc` reads the rules' conditions ask for (fields are read lazily); per new flow on
//! the host, a parse and a map lookup. A burst that overflows a socket's buffer loses
//! events, counted and logged.

pub mod refused;
pub mod rules;

use crate::Agent;
use rules::{Action, Rule};
use skiff_runtime::audit::{AuditEvents, SeccompRecord};
use skiff_runtime::conntrack::{Flow, NewFlows};
use skiff_runtime::fswrites::FileWrites;
use skiff_runtime::procconn::{ProcEvent, ProcEvents};
use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::os::fd::AsFd;
use std::path::PathBuf;
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
    upper: PathBuf,
    /// The overlay, as the node mounts it.
    rootfs: PathBuf,
    /// Its device number when it was looked up (a remade overlay has another).
    rootfs_dev: Option<u64>,
}

/// The device number of what is mounted at `rootfs`.
fn overlay_dev(rootfs: &std::path::Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(rootfs).ok().map(|m| m.dev())
}

/// Counters, for tests and the bench.
#[derive(Debug, Default)]
pub struct Stats {
    pub execs: AtomicU64,
    pub in_containers: AtomicU64,
    pub writes: AtomicU64,
    pub flows: AtomicU64,
    pub seccomp: AtomicU64,
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
    read_capped(path, 1 << 20)
}

/// At most `max` bytes of a `/proc` file: what a workload controls (its arguments, its
/// socket table) may be large.
fn read_capped(path: String, max: u64) -> Option<String> {
    use std::io::Read;
    let mut b = vec![];
    std::fs::File::open(path).ok()?.take(max).read_to_end(&mut b).ok()?;
    Some(String::from_utf8_lossy(&b).into_owned())
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

fn exe_of(pid: i32) -> Option<String> {
    std::fs::read_link(format!("/proc/{pid}/exe")).ok().map(|p| p.to_string_lossy().into_owned())
}

/// None once the process has exited: a zombie's command line reads empty.
fn cmdline_of(pid: i32) -> Option<String> {
    read_capped(format!("/proc/{pid}/cmdline"), 4096).map(|c| cmdline(&c)).filter(|c| !c.is_empty())
}

/// One event from the kernel.
#[derive(Debug)]
enum What {
    Exec,
    /// A file written, as the container names it.
    Write(String),
    Connect(Flow),
    Seccomp(SeccompRecord),
}

impl What {
    fn evt_type(&self) -> &'static str {
        match self {
            What::Exec => "execve",
            What::Write(_) => "open",
            What::Connect(_) => "connect",
            What::Seccomp(r) if r.action() == "log" && r.syscall_name() == Some("listen") => "listen",
            What::Seccomp(_) => "seccomp",
        }
    }
}

/// One event of container `id` as rules see it: the event's own fields, and those of
/// process `pid` (none for a flow) read from `/proc` when a condition first asks for them
/// (most programs are judged on their name and executable alone), then kept. A process
/// gone meanwhile has no more fields.
struct Ev<'a> {
    pid: Option<i32>,
    id: &'a str,
    known: &'a Known,
    what: &'a What,
    cache: std::cell::RefCell<HashMap<&'static str, Option<String>>>,
    /// `/proc/PID/status`, read once for the fields it holds.
    status: std::cell::OnceCell<Option<String>>,
    /// The socket a `listen` made listen, found once.
    listening: std::cell::OnceCell<Option<(IpAddr, u16)>>,
}

impl Ev<'_> {
    /// The fields a process loses when it exits, read at once. A process that exits
    /// within microseconds of its exec can still be gone first: its fields are then `<NA>`.
    fn early(pid: i32) -> HashMap<&'static str, Option<String>> {
        HashMap::from([("proc.exe", exe_of(pid)), ("proc.cmdline", cmdline_of(pid))])
    }

    fn proc_field(&self, name: &str) -> Option<String> {
        let pid = self.pid?;
        let status_field = |key: &str| {
            let status = self.status.get_or_init(|| read(format!("/proc/{pid}/status"))).as_ref()?;
            status.lines().find_map(|l| l.strip_prefix(key)).map(|v| v.trim().to_string())
        };
        Some(match name {
            "proc.pid" => pid.to_string(),
            "proc.name" => read(format!("/proc/{pid}/comm"))?.trim_end().to_string(),
            "proc.exe" => exe_of(pid)?,
            "proc.cmdline" => cmdline_of(pid)?,
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
            _ => return None,
        })
    }

    /// The `fd.*` fields: the file written, the flow's ends (client = local = the
    /// container, server = remote), or the socket a `listen` opened.
    fn fd_field(&self, name: &str) -> Option<String> {
        let ends = match self.what {
            What::Write(path) => {
                let p = std::path::Path::new(path);
                return match name {
                    "fd.name" => Some(path.clone()),
                    "fd.directory" => p.parent().map(|d| d.display().to_string()),
                    "fd.filename" => p.file_name().map(|f| f.to_string_lossy().into_owned()),
                    _ => None,
                };
            }
            What::Connect(f) => Some(((f.src, f.sport), (f.dst, f.dport), f.l4proto())),
            What::Seccomp(_) if self.what.evt_type() == "listen" => {
                let (ip, port) = (*self.listening.get_or_init(|| self.pid.and_then(listening_socket)))?;
                Some(((ip, port), (ip, port), "tcp".to_string()))
            }
            _ => None,
        };
        let ((lip, lport), (rip, rport), proto) = ends?;
        let sock = |ip: IpAddr, port: u16| match ip {
            IpAddr::V6(_) => format!("[{ip}]:{port}"),
            IpAddr::V4(_) => format!("{ip}:{port}"),
        };
        Some(match name {
            "fd.name" if self.what.evt_type() == "listen" => sock(lip, lport),
            "fd.name" => format!("{}->{}", sock(lip, lport), sock(rip, rport)),
            "fd.l4proto" => proto,
            "fd.cip" | "fd.lip" => lip.to_string(),
            "fd.sip" | "fd.rip" => rip.to_string(),
            "fd.cport" | "fd.lport" => lport.to_string(),
            "fd.sport" | "fd.rport" => rport.to_string(),
            _ => return None,
        })
    }

    fn read_field(&self, name: &str) -> Option<String> {
        Some(match name {
            "evt.type" => self.what.evt_type().to_string(),
            "evt.is_open_write" => matches!(self.what, What::Write(_)).to_string(),
            "container.id" => self.id.to_string(),
            "container.name" => self.known.instance.clone(),
            "container.deployment" => self.known.deployment.clone(),
            "container.image" => self.known.image.clone(),
            "seccomp.syscall" | "seccomp.action" => {
                let What::Seccomp(r) = self.what else { return None };
                match name {
                    "seccomp.action" => r.action().to_string(),
                    _ => r.syscall_name().map(str::to_string).unwrap_or_else(|| r.syscall.to_string()),
                }
            }
            n if n.starts_with("fd.") => return self.fd_field(n),
            n => return self.proc_field(n),
        })
    }
}

impl rules::Fields for Ev<'_> {
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

/// The TCP socket process `pid` listens on: its socket inodes matched with the listening
/// entries of its network namespace. The seccomp record is written as `listen` is
/// entered, so the socket may be a moment from listening: looked for a few times, 1 ms
/// apart.
fn listening_socket(pid: i32) -> Option<(IpAddr, u16)> {
    // Bounded in time and in what is read: a process with a million descriptors or a
    // namespace with a huge socket table costs the detector no more than this.
    let deadline = std::time::Instant::now() + std::time::Duration::from_millis(20);
    while std::time::Instant::now() < deadline {
        let inodes: HashSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .ok()?
            .take(4096)
            .filter_map(|e| {
                let l = std::fs::read_link(e.ok()?.path()).ok()?;
                let l = l.to_str()?;
                Some(l.strip_prefix("socket:[")?.strip_suffix(']')?.to_string())
            })
            .collect();
        for table in ["tcp", "tcp6"] {
            let text = read_capped(format!("/proc/{pid}/net/{table}"), 4 << 20).unwrap_or_default();
            if let Some(found) = text.lines().skip(1).find_map(|l| listening_entry(l, &inodes)) {
                return Some(found);
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    None
}

/// A line of `/proc/net/tcp{,6}` in LISTEN state (`0A`) whose inode is one of `inodes`.
fn listening_entry(line: &str, inodes: &HashSet<String>) -> Option<(IpAddr, u16)> {
    let cols: Vec<&str> = line.split_whitespace().collect();
    if cols.get(3) != Some(&"0A") || !inodes.contains(*cols.get(9)?) {
        return None;
    }
    let (addr, port) = cols.get(1)?.split_once(':')?;
    // The kernel prints each 32-bit word of the address as a number of this machine.
    let words: Vec<[u8; 4]> = (0..addr.len() / 8)
        .map(|i| u32::from_str_radix(addr.get(i * 8..i * 8 + 8)?, 16).ok().map(u32::to_ne_bytes))
        .collect::<Option<_>>()?;
    let ip = match words.as_slice() {
        [a] => IpAddr::from(*a),
        [a, b, c, d] => IpAddr::from(<[u8; 16]>::try_from([*a, *b, *c, *d].concat()).ok()?),
        _ => return None,
    };
    Some((ip, u16::from_str_radix(port, 16).ok()?))
}

/// The running detector, as the agent holds it.
pub struct Detector {
    pub stats: Arc<Stats>,
    /// What containers' seccomp filters report for it.
    pub seccomp_audit: skiff_runtime::seccomp::Audit,
}

/// The kernel's event sources the detector waits on. Only the process events are
/// required; each other source that cannot be opened is logged and left out.
struct Sources {
    procs: ProcEvents,
    audit: Option<AuditEvents>,
    flows: Option<NewFlows>,
    writes: Option<FileWrites>,
    /// Refused calls from the seccomp listener, and the socket that says some wait.
    refused: Option<(std::sync::mpsc::Receiver<refused::Refused>, std::os::unix::net::UnixStream)>,
}

fn optional<T>(what: &str, r: std::io::Result<T>) -> Option<T> {
    r.map_err(|e| warn!("threat detection runs without {what}: {e}")).ok()
}

/// What the detector thread keeps between events.
#[derive(Default)]
struct Seen {
    /// Containers by id (None: not one of this agent's).
    known: HashMap<String, Option<Known>>,
    /// Container ids by address, rebuilt when a container was first seen since.
    ips: HashMap<IpAddr, String>,
    ips_stale: bool,
    /// When the address map was last rebuilt for an address it lacked.
    ips_rebuilt: Option<std::time::Instant>,
    /// Alerts per (instance, rule) in the current minute, and how many were held back.
    alerts: Windows,
}

/// One minute of one rule's alerts for one instance.
struct Window {
    start: std::time::Instant,
    sent: u32,
    held: u32,
}

/// At most this many alerts of one rule for one instance a minute: a workload looping on
/// what a rule watches must not flood the node's events (and push older alerts out
/// before they reach the hub). The rest are counted and reported.
const ALERTS_PER_MINUTE: u32 = 10;

type Windows = HashMap<(String, String), Window>;

/// Whether an alert of `rule` for `instance` goes out now; a note to send with it about
/// alerts held back.
fn admit_alert(alerts: &mut Windows, instance: &str, rule: &str) -> (bool, Option<String>) {
    let now = std::time::Instant::now();
    if alerts.len() > 4096 {
        alerts.retain(|_, w| now.duration_since(w.start).as_secs() < 60);
    }
    let w = alerts.entry((instance.to_string(), rule.to_string())).or_insert(Window { start: now, sent: 0, held: 0 });
    let mut note = None;
    if now.duration_since(w.start).as_secs() >= 60 {
        if w.held > 0 {
            note = Some(format!("{} more alerts of rule {rule:?} were held back in the minute before", w.held));
        }
        *w = Window { start: now, sent: 0, held: 0 };
    }
    if w.sent < ALERTS_PER_MINUTE {
        w.sent += 1;
        if w.sent == ALERTS_PER_MINUTE {
            note = Some(format!("alerts of rule {rule:?} are held back for the rest of the minute (at most {ALERTS_PER_MINUTE} a minute)"));
        }
        (true, note)
    } else {
        w.held += 1;
        (false, note)
    }
}

impl Detector {
    /// Starts the detector thread for `agent` with `rules`. Fails when the kernel's process
    /// connector cannot be opened (no CAP_NET_ADMIN, a kernel without it).
    pub fn start(agent: &Arc<Agent>, rules: Vec<Rule>) -> std::io::Result<Detector> {
        let mut src = Sources {
            procs: ProcEvents::open()?,
            audit: optional("seccomp records (listening sockets, refused calls)", AuditEvents::open()),
            flows: optional("connection tracking events (outbound connections)", NewFlows::open()),
            writes: optional("fanotify (files written)", FileWrites::open()),
            refused: None,
        };
        let runc = skiff_runtime::runc::Runc::new("");
        let denials = src.audit.is_some() && runc.seccomp_flags().iter().any(|f| f == "SECCOMP_FILTER_FLAG_LOG");
        // Where runc cannot have refused calls logged, the filters hand them to the agent,
        // while a rule looks at them (runc's handshake with the listener costs each
        // container start a few milliseconds).
        let wanted = rules.iter().any(Rule::watches_refused_calls);
        let listener = agent.seccomp_listener.as_ref().filter(|_| !denials && wanted);
        if let Some(l) = listener {
            src.refused = optional("refused calls from the seccomp listener", l.report());
        }
        if !denials && wanted && src.refused.is_none() {
            info!("refused system calls are not reported: this runc cannot log them (SECCOMP_FILTER_FLAG_LOG, runc 1.2), nor can they be handed over here (SCMP_ACT_NOTIFY, Linux 5.8)");
        }
        let seccomp_audit = skiff_runtime::seccomp::Audit {
            listens: src.audit.is_some(),
            denials,
            notify: listener.filter(|_| src.refused.is_some()).map(|l| l.path.clone()),
        };
        let stats = Arc::new(Stats::default());
        let (weak, st) = (Arc::downgrade(agent), Arc::clone(&stats));
        let mut seen = Seen { ips_stale: true, ..Default::default() };
        // Containers that run already (the agent restarted) are watched from now.
        if let Some(w) = &src.writes {
            for k in agent.detect_running() {
                let _ = w.watch(&k.rootfs);
            }
        }
        std::thread::Builder::new().name("detect".into()).spawn(move || loop {
            let ready = {
                use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
                let mut fds = vec![PollFd::new(src.procs.as_fd(), PollFlags::POLLIN)];
                fds.extend(src.audit.as_ref().map(|a| PollFd::new(a.as_fd(), PollFlags::POLLIN)));
                fds.extend(src.flows.as_ref().map(|f| PollFd::new(f.as_fd(), PollFlags::POLLIN)));
                fds.extend(src.writes.as_ref().map(|w| PollFd::new(w.as_fd(), PollFlags::POLLIN)));
                fds.extend(src.refused.as_ref().map(|(_, w)| PollFd::new(w.as_fd(), PollFlags::POLLIN)));
                match poll(&mut fds, PollTimeout::NONE) {
                    Ok(_) => fds.iter().map(|f| f.revents().is_some_and(|r| !r.is_empty())).collect::<Vec<_>>(),
                    Err(nix::errno::Errno::EINTR) => continue,
                    Err(e) => {
                        warn!("threat detection stopped: {e}");
                        return;
                    }
                }
            };
            let Some(agent) = weak.upgrade() else { return };
            let mut events: Vec<(Option<i32>, What)> = vec![];
            let mut ready = ready.into_iter();
            if ready.next() == Some(true) {
                match src.procs.recv() {
                    Ok(b) => {
                        events.extend(b.into_iter().filter_map(|ProcEvent::Exec { pid, tgid }| {
                            (pid == tgid).then_some((Some(pid), What::Exec))
                        }))
                    }
                    Err(e) if e.raw_os_error() == Some(nix::errno::Errno::ENOBUFS as i32) => st.lost(),
                    Err(e) => {
                        warn!("threat detection stopped: {e}");
                        return;
                    }
                }
            }
            if let Some(a) = src.audit.as_mut().filter(|_| ready.next() == Some(true)) {
                match a.recv() {
                    Ok(recs) => events.extend(recs.into_iter().map(|r| (Some(r.pid), What::Seccomp(r)))),
                    Err(_) => st.lost(),
                }
            }
            if let Some(f) = src.flows.as_mut().filter(|_| ready.next() == Some(true)) {
                match f.recv() {
                    Ok(flows) => events.extend(flows.into_iter().map(|f| (None, What::Connect(f)))),
                    Err(_) => st.lost(),
                }
            }
            if let Some(w) = src.writes.as_ref().filter(|_| ready.next() == Some(true)) {
                match w.recv() {
                    Ok((ws, lost)) => {
                        if lost {
                            st.lost();
                        }
                        events.extend(ws.into_iter().map(|w| (Some(w.pid), What::Write(w.path))));
                    }
                    Err(_) => st.lost(),
                }
            }
            let mut refused = vec![];
            if let Some((rx, wake)) = src.refused.as_ref().filter(|_| ready.next() == Some(true)) {
                let mut buf = [0u8; 256];
                while matches!(std::io::Read::read(&mut &*wake, &mut buf), Ok(n) if n > 0) {}
                refused.extend(rx.try_iter().take(4096));
            }
            for r in refused {
                judge(
                    &agent,
                    &rules,
                    &st,
                    &mut seen,
                    src.writes.as_ref(),
                    Some(r.record.pid),
                    What::Seccomp(r.record),
                    Some(r.id),
                );
            }
            for (pid, what) in events {
                judge(&agent, &rules, &st, &mut seen, src.writes.as_ref(), pid, what, None);
            }
        })?;
        Ok(Detector { stats, seccomp_audit })
    }
}

impl Stats {
    fn lost(&self) {
        // Said the 1st, 2nd, 4th, 8th... time.
        let n = self.lost.fetch_add(1, Ordering::Relaxed) + 1;
        if n.is_power_of_two() {
            warn!("threat detection lost events in a burst ({n} times so far)");
        }
    }
}

/// Attributes one event to its container and runs the rules on it.
#[allow(clippy::too_many_arguments)]
fn judge(
    agent: &Arc<Agent>,
    rules: &[Rule],
    st: &Stats,
    seen: &mut Seen,
    writes: Option<&FileWrites>,
    pid: Option<i32>,
    what: What,
    // The container, when the source already knows it (the caller may be gone by now).
    id_hint: Option<String>,
) {
    let counter = match what {
        What::Exec => &st.execs,
        What::Write(_) => &st.writes,
        What::Connect(_) => &st.flows,
        What::Seccomp(_) => &st.seccomp,
    };
    counter.fetch_add(1, Ordering::Relaxed);
    let id = match (&what, pid, id_hint) {
        (_, _, Some(id)) => id,
        // A flow from the node itself (loopback) is no container's.
        (What::Connect(f), _, None) if f.src.is_loopback() => return,
        (What::Connect(f), _, None) => {
            // Rebuilt when a container was first seen since, and for an address it lacks
            // (an instance whose address was recorded after that), at most once a second.
            let lacks = !seen.ips.contains_key(&f.src)
                && seen.ips_rebuilt.is_none_or(|t| t.elapsed() >= std::time::Duration::from_secs(1));
            if seen.ips_stale || lacks {
                seen.ips = agent.detect_addresses();
                seen.ips_stale = false;
                seen.ips_rebuilt = Some(std::time::Instant::now());
            }
            let Some(id) = seen.ips.get(&f.src) else { return };
            id.clone()
        }
        (_, Some(pid), None) => {
            let Some(cg) = read(format!("/proc/{pid}/cgroup")) else { return };
            let Some(id) = container_of(&cg) else { return };
            id.to_string()
        }
        (_, None, None) => return,
    };
    if matches!(what, What::Exec) {
        st.in_containers.fetch_add(1, Ordering::Relaxed);
    }
    // What a process loses first when it exits (its memory: the command line, the
    // executable) is read before anything slower.
    let mut early = pid.filter(|_| matches!(what, What::Exec)).map(Ev::early).unwrap_or_default();
    // A refused call's process name, read while it waited for its answer (it may have
    // exited since).
    if let What::Seccomp(r) = &what {
        if !r.comm.is_empty() {
            early.insert("proc.name", Some(r.comm.clone()));
        }
    }
    // A container id comes back when an instance is removed and made again: a program
    // started on another overlay than the one seen is a new container.
    let remade = matches!(what, What::Exec)
        && seen.known.get(&id).is_some_and(|k| k.as_ref().is_some_and(|k| k.rootfs_dev != overlay_dev(&k.rootfs)));
    if remade || !seen.known.contains_key(&id) {
        if seen.known.len() > 4096 {
            seen.known.clear();
        }
        let k = agent.detect_lookup(&id);
        if let (Some(k), Some(w)) = (&k, writes) {
            if k.runtime == skiff_model::RuntimeKind::Oci {
                if let Err(e) = w.watch(&k.rootfs) {
                    warn!(instance = %k.instance, "files written in it are not watched: {e}");
                }
            }
        }
        seen.known.insert(id.clone(), k);
        seen.ips_stale = true;
    }
    let Some(Some(k)) = seen.known.get(&id) else { return };
    let what = match what {
        What::Write(p) => What::Write(skiff_runtime::fswrites::in_container(&p, &k.rootfs)),
        w => w,
    };
    let ev = Ev {
        pid,
        id: &id,
        known: k,
        what: &what,
        cache: early.into(),
        status: Default::default(),
        listening: Default::default(),
    };
    for r in rules.iter().filter(|r| rules::eval(&r.condition, &ev)) {
        st.alerts.fetch_add(1, Ordering::Relaxed);
        let (send, note) = admit_alert(&mut seen.alerts, &k.instance, &r.name);
        if let Some(note) = note {
            agent.event(&k.instance, "SecurityAlert", &note);
        }
        agent.security_alert(k, &id, r, &ev, send);
    }
}

impl Agent {
    /// The instance behind container `id`, if it is this agent's.
    fn detect_lookup(&self, id: &str) -> Option<Known> {
        let rows = self.db(|s| s.instances()).ok()?;
        rows.into_iter().find(|r| r.container_id == id).map(|r| self.detect_known(r))
    }

    fn detect_known(&self, r: crate::state::InstanceRow) -> Known {
        let dir = self.runtimes.of(r.spec.runtime).instance_dir(&r.container_id);
        Known {
            instance: r.name,
            deployment: r.spec.name.clone(),
            image: r.spec.image.clone(),
            runtime: r.spec.runtime,
            upper: dir.join("upper"),
            rootfs_dev: overlay_dev(&dir.join("rootfs")),
            rootfs: dir.join("rootfs"),
        }
    }

    /// The runc containers running now.
    fn detect_running(&self) -> Vec<Known> {
        let rows = self.db(|s| s.instances()).unwrap_or_default();
        rows.into_iter()
            .filter(|r| r.pid.is_some() && r.spec.runtime == skiff_model::RuntimeKind::Oci)
            .map(|r| self.detect_known(r))
            .collect()
    }

    /// Container ids by their address on a bridge.
    fn detect_addresses(&self) -> HashMap<IpAddr, String> {
        let rows = self.db(|s| s.instances()).unwrap_or_default();
        rows.into_iter()
            .flat_map(|r| r.all_addresses().into_iter().map(move |a| (IpAddr::V4(a), r.container_id.clone())))
            .collect()
    }

    /// Records a rule's match (unless alerts of it are held back: `send`) and carries out
    /// its action (always).
    fn security_alert(self: &Arc<Self>, k: &Known, id: &str, r: &Rule, ev: &impl rules::Fields, send: bool) {
        if send {
            let msg = format!("{:?} {}: {}", r.priority, r.name, rules::render(&r.output, ev));
            info!(instance = %k.instance, "{msg}");
            self.event(&k.instance, "SecurityAlert", &msg);
        }
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
    fn a_flood_of_one_rule_is_held_back_and_counted() {
        let mut seen = Windows::default();
        let sent: Vec<(bool, Option<String>)> = (0..15).map(|_| admit_alert(&mut seen, "web-1", "r")).collect();
        assert_eq!(sent.iter().filter(|(s, _)| *s).count(), ALERTS_PER_MINUTE as usize);
        assert!(sent[ALERTS_PER_MINUTE as usize - 1].1.as_deref().is_some_and(|n| n.contains("held back")));
        // Other rules and instances have their own minute.
        assert!(admit_alert(&mut seen, "web-2", "r").0 && admit_alert(&mut seen, "web-1", "other").0);
        // A minute later the count held back is reported with the next alert.
        let w = seen.get_mut(&("web-1".to_string(), "r".to_string())).unwrap();
        w.start -= std::time::Duration::from_secs(61);
        let (send, note) = admit_alert(&mut seen, "web-1", "r");
        assert!(send && note.is_some_and(|n| n.starts_with("5 more alerts")));
    }

    #[test]
    fn listening_sockets_are_found_by_inode_in_both_tables() {
        let inodes: HashSet<String> = ["4242".to_string()].into();
        // Lines of /proc/net/tcp and tcp6 as this machine prints them.
        let v4 = "   1: 00000000:1E61 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4242 1 0000000000000000 100 0 0 10 0";
        assert_eq!(listening_entry(v4, &inodes), Some((IpAddr::from([0, 0, 0, 0]), 7777)));
        let lo = v4.replace("00000000:1E61", &format!("{:08X}:1E61", u32::from_ne_bytes([127, 0, 0, 1])));
        assert_eq!(listening_entry(&lo, &inodes), Some((IpAddr::from([127, 0, 0, 1]), 7777)));
        let v6 = "   0: 00000000000000000000000000000000:0050 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4242 1 0000000000000000 100 0 0 10 0";
        assert_eq!(listening_entry(v6, &inodes), Some(("::".parse().unwrap(), 80)));
        assert_eq!(listening_entry(&v4.replace(" 0A ", " 01 "), &inodes), None, "not listening");
        assert_eq!(listening_entry(&v4.replace("4242", "99"), &inodes), None, "another process's socket");
    }

    #[test]
    fn the_shipped_rules_load() {
        assert!(load_rules(&[]).unwrap().len() >= 4);
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("local.yaml");
        std::fs::write(&f, "- rule: Terminal shell in container\n  enabled: false\n").unwrap();
        let r = load_rules(std::slice::from_ref(&f)).unwrap();
        assert!(!r.iter().any(|r| r.name == "Terminal shell in container"));
        // Refused calls are handed over only while a rule looks at them.
        assert!(r.iter().any(|r| r.watches_refused_calls()));
        std::fs::write(&f, "- rule: System call refused by seccomp\n  enabled: false\n").unwrap();
        let r = load_rules(std::slice::from_ref(&f)).unwrap();
        assert!(!r.iter().any(|r| r.watches_refused_calls()), "only the shipped rule names them");
        std::fs::write(&f, "- rule: x\n  condition: proc.nope = 1\n  output: o\n").unwrap();
        assert!(load_rules(&[f]).unwrap_err().contains("proc.nope"));
    }
}
