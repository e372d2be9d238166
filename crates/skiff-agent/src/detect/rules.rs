//! Runtime threat-detection rules: a subset of Falco's rule files.
//!
//! ```yaml
//! - macro: shell_procs
//!   condition: proc.name in (sh, bash, ash, dash, zsh, ksh)
//! - rule: Terminal shell in container
//!   desc: A shell started in a container other than as its main process
//!   condition: spawned_process and container and shell_procs and proc.vpid != 1 and not proc.pname in (shell_names)
//!   output: "Shell in container (instance=%container.name cmdline=%proc.cmdline parent=%proc.pname)"
//!   priority: WARNING
//!   action: none            # skiff's addition: none | stop | restart
//! - list: shell_names
//!   items: [sh, bash, ash, dash, zsh, ksh]
//! ```
//!
//! Conditions: `and`, `or`, `not`, parentheses; comparisons `=`, `!=`, `<`, `>`, `in (...)`,
//! `startswith`, `endswith`, `contains`, `pmatch (...)` (path prefixes), `glob`; a bare
//! field is true when it is `true`; macro names expand; a list name inside `in (...)`
//! expands to its items. Fields are those of [`Event`]; an unknown field, macro or list is
//! an error when the file is loaded, naming the rule.

use serde::Deserialize;
use std::collections::BTreeMap;

/// What a rule sees of one event.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Event {
    /// `execve` (a process started a program).
    pub evt_type: String,
    pub fields: BTreeMap<&'static str, String>,
}

/// Where a rule reads an event's fields from: a map (tests, and a whole event), or the
/// detector's lazy view of a live process, which reads only what a condition asks for.
pub trait Fields {
    fn field(&self, name: &str) -> Option<String>;
}

impl Fields for Event {
    fn field(&self, name: &str) -> Option<String> {
        self.fields.get(name).cloned()
    }
}

/// The fields a condition or an output may name.
pub const FIELDS: &[&str] = &[
    "evt.type",
    "proc.name",
    "proc.exe",
    "proc.cmdline",
    "proc.pid",
    "proc.vpid",
    "proc.pname",
    "proc.exe_writable",
    "user.uid",
    "container.id",
    "container.name",
    "container.deployment",
    "container.image",
    "evt.is_open_write",
    "fd.name",
    "fd.directory",
    "fd.filename",
    "fd.l4proto",
    "fd.cip",
    "fd.sip",
    "fd.lip",
    "fd.rip",
    "fd.cport",
    "fd.sport",
    "fd.lport",
    "fd.rport",
    "fd.cnet",
    "fd.snet",
    "fd.lnet",
    "fd.rnet",
    "seccomp.syscall",
    "seccomp.action",
];

/// The network fields: each compares its address field with networks (`10.0.0.0/8`) or
/// addresses, with `=`, `!=` and `in`.
const NET_FIELDS: &[(&str, &str)] =
    &[("fd.cnet", "fd.cip"), ("fd.snet", "fd.sip"), ("fd.lnet", "fd.lip"), ("fd.rnet", "fd.rip")];

fn network(s: &str) -> Option<ipnet::IpNet> {
    s.parse().ok().or_else(|| s.parse::<std::net::IpAddr>().ok().map(ipnet::IpNet::from))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Priority {
    Debug,
    Informational,
    Notice,
    Warning,
    Error,
    Critical,
    Alert,
    Emergency,
}

impl Priority {
    fn parse(s: &str) -> Option<Self> {
        Some(match s.to_ascii_uppercase().as_str() {
            "DEBUG" => Priority::Debug,
            "INFO" | "INFORMATIONAL" => Priority::Informational,
            "NOTICE" => Priority::Notice,
            "WARNING" | "WARN" => Priority::Warning,
            "ERROR" => Priority::Error,
            "CRITICAL" => Priority::Critical,
            "ALERT" => Priority::Alert,
            "EMERGENCY" => Priority::Emergency,
            _ => return None,
        })
    }
}

/// What the agent does to the instance when a rule fires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    None,
    Stop,
    Restart,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    pub name: String,
    pub condition: Expr,
    pub output: String,
    pub priority: Priority,
    pub action: Action,
}

impl Rule {
    /// Whether the rule looks at refused system calls (`evt.type` `seccomp`, or a
    /// `seccomp.*` field): only then are they handed to the agent, which costs each
    /// container start runc's handshake with the listener.
    pub fn watches_refused_calls(&self) -> bool {
        self.condition.names_seccomp()
    }
}

impl Expr {
    fn names_seccomp(&self) -> bool {
        match self {
            Expr::And(a, b) | Expr::Or(a, b) => a.names_seccomp() || b.names_seccomp(),
            Expr::Not(a) => a.names_seccomp(),
            Expr::Cmp { field, values, .. } => {
                field.starts_with("seccomp.") || (field == "evt.type" && values.iter().any(|v| v == "seccomp"))
            }
            Expr::Truthy(field) => field.starts_with("seccomp."),
            Expr::Const(_) => false,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    And(Box<Expr>, Box<Expr>),
    Or(Box<Expr>, Box<Expr>),
    Not(Box<Expr>),
    Cmp { field: String, op: Op, values: Vec<String> },
    Truthy(String),
    Const(bool),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Eq,
    Ne,
    Lt,
    Gt,
    In,
    StartsWith,
    EndsWith,
    Contains,
    Pmatch,
    Glob,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Item {
    rule: Option<String>,
    #[serde(rename = "macro")]
    macro_: Option<String>,
    list: Option<String>,
    #[serde(default)]
    desc: Option<String>,
    condition: Option<String>,
    output: Option<String>,
    priority: Option<String>,
    #[serde(default)]
    items: Vec<serde_norway::Value>,
    #[serde(default)]
    action: Option<String>,
    #[serde(default)]
    enabled: Option<bool>,
    #[serde(default)]
    tags: Vec<String>,
}

struct RawRule {
    name: String,
    condition: String,
    output: String,
    priority: String,
    action: String,
    enabled: bool,
}

/// Parses rule files (in order; a later rule of the same name replaces an earlier one).
pub fn parse(files: &[(&str, &str)]) -> Result<Vec<Rule>, String> {
    let mut macros: BTreeMap<String, String> = BTreeMap::new();
    let mut lists: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut raw_rules: Vec<RawRule> = vec![];
    for (file, text) in files {
        let items: Vec<Item> = if text.trim().is_empty() {
            vec![]
        } else {
            serde_norway::from_str(text).map_err(|e| format!("{file}: {e}"))?
        };
        for (i, it) in items.into_iter().enumerate() {
            let at = |what: &str| format!("{file}: item {i} ({what})");
            let _ = (&it.desc, &it.tags);
            match (&it.rule, &it.macro_, &it.list) {
                // A rule without a condition changes one defined before: turns it on or
                // off, or gives it another priority or action (Falco's overrides).
                (Some(r), None, None) if it.condition.is_none() => match raw_rules.iter_mut().find(|x| &x.name == r) {
                    Some(x) => {
                        x.enabled = it.enabled.unwrap_or(x.enabled);
                        x.priority = it.priority.clone().unwrap_or_else(|| x.priority.clone());
                        x.action = it.action.clone().unwrap_or_else(|| x.action.clone());
                        x.output = it.output.clone().unwrap_or_else(|| x.output.clone());
                    }
                    None if it.enabled == Some(false) => {}
                    None => return Err(format!("{}: condition missing (and no rule of that name before)", at(r))),
                },
                (Some(r), None, None) => {
                    let output = it.output.clone().ok_or_else(|| format!("{}: output missing", at(r)))?;
                    raw_rules.retain(|x| &x.name != r);
                    raw_rules.push(RawRule {
                        name: r.clone(),
                        condition: it.condition.clone().unwrap_or_default(),
                        output,
                        priority: it.priority.clone().unwrap_or_else(|| "WARNING".into()),
                        action: it.action.clone().unwrap_or_else(|| "none".into()),
                        enabled: it.enabled.unwrap_or(true),
                    });
                }
                (None, Some(m), None) => {
                    let cond = it.condition.clone().ok_or_else(|| format!("{}: condition missing", at(m)))?;
                    macros.insert(m.clone(), cond);
                }
                (None, None, Some(l)) => {
                    let items = it
                        .items
                        .iter()
                        .map(|v| match v {
                            serde_norway::Value::String(s) => Ok(s.clone()),
                            serde_norway::Value::Number(n) => Ok(n.to_string()),
                            _ => Err(format!("{}: items must be strings", at(l))),
                        })
                        .collect::<Result<Vec<_>, _>>()?;
                    lists.insert(l.clone(), items);
                }
                _ => return Err(format!("{file}: item {i}: give exactly one of rule, macro, list")),
            }
        }
    }
    let mut rules = vec![];
    // A rule turned off is still checked: a mistake in it shows before it is turned on.
    for RawRule { name, condition: cond, output, priority: prio, action, enabled } in raw_rules {
        let bad = |e: String| format!("rule {name:?}: {e}");
        let condition = Parser::new(&cond, &macros, &lists, 0).and_then(|mut p| p.parse_all()).map_err(bad)?;
        check_output(&output).map_err(bad)?;
        let priority = Priority::parse(&prio).ok_or_else(|| bad(format!("priority {prio:?} is not one of Falco's")))?;
        let action = match action.as_str() {
            "none" => Action::None,
            "stop" => Action::Stop,
            "restart" => Action::Restart,
            other => return Err(bad(format!("action {other:?} is not none, stop or restart"))),
        };
        if enabled {
            rules.push(Rule { name, condition, output, priority, action });
        }
    }
    Ok(rules)
}

fn check_output(output: &str) -> Result<(), String> {
    for (i, _) in output.match_indices('%') {
        let f = field_at(&output[i + 1..]);
        if !FIELDS.contains(&f) {
            return Err(format!("output names unknown field %{f}"));
        }
    }
    Ok(())
}

fn field_at(s: &str) -> &str {
    let end = s.find(|c: char| !(c.is_ascii_alphanumeric() || c == '.' || c == '_')).unwrap_or(s.len());
    s[..end].trim_end_matches('.')
}

/// The output with `%field` replaced by the event's values.
pub fn render(output: &str, ev: &impl Fields) -> String {
    let mut out = String::new();
    let mut rest = output;
    while let Some(i) = rest.find('%') {
        out.push_str(&rest[..i]);
        let f = field_at(&rest[i + 1..]);
        out.push_str(ev.field(f).as_deref().unwrap_or("<NA>"));
        rest = &rest[i + 1 + f.len()..];
    }
    out.push_str(rest);
    out
}

/// Whether `e` holds for `ev`.
pub fn eval(e: &Expr, ev: &impl Fields) -> bool {
    match e {
        Expr::And(a, b) => eval(a, ev) && eval(b, ev),
        Expr::Or(a, b) => eval(a, ev) || eval(b, ev),
        Expr::Not(a) => !eval(a, ev),
        Expr::Const(b) => *b,
        Expr::Truthy(f) => ev.field(f).is_some_and(|v| v == "true"),
        Expr::Cmp { field, op, values } if field.ends_with("net") => {
            let Some((_, addr)) = NET_FIELDS.iter().find(|(f, _)| f == field) else { return false };
            let Some(ip) = ev.field(addr).and_then(|a| a.parse::<std::net::IpAddr>().ok()) else { return false };
            let inside = values.iter().filter_map(|n| network(n)).any(|n| n.contains(&ip));
            if *op == Op::Ne {
                !inside
            } else {
                inside
            }
        }
        Expr::Cmp { field, op, values } => {
            // A field that cannot be read (a process gone meanwhile) differs from every
            // value: `proc.vpid != 1` must not hide an event whose process exited.
            let Some(v) = ev.field(field) else { return *op == Op::Ne };
            let v = &v;
            let first = values.first().map(String::as_str).unwrap_or_default();
            let num = |s: &str| s.parse::<i64>().ok();
            match op {
                Op::Eq => v == first,
                Op::Ne => v != first,
                Op::Lt => matches!((num(v), num(first)), (Some(a), Some(b)) if a < b),
                Op::Gt => matches!((num(v), num(first)), (Some(a), Some(b)) if a > b),
                Op::In => values.iter().any(|x| x == v),
                Op::StartsWith => v.starts_with(first),
                Op::EndsWith => v.ends_with(first),
                Op::Contains => v.contains(first),
                Op::Pmatch => values.iter().any(|p| v == p || v.starts_with(&format!("{}/", p.trim_end_matches('/')))),
                Op::Glob => glob(first, v),
            }
        }
    }
}

fn glob(p: &str, s: &str) -> bool {
    match p.split_once('*') {
        None => p == s,
        Some((head, rest)) => {
            let Some(after) = s.strip_prefix(head) else { return false };
            (0..=after.len()).filter(|i| after.is_char_boundary(*i)).any(|i| glob(rest, &after[i..]))
        }
    }
}

struct Parser<'a> {
    toks: Vec<String>,
    pos: usize,
    macros: &'a BTreeMap<String, String>,
    lists: &'a BTreeMap<String, Vec<String>>,
    depth: usize,
}

fn tokenize(s: &str) -> Result<Vec<String>, String> {
    let mut out = vec![];
    let mut chars = s.chars().peekable();
    while let Some(&c) = chars.peek() {
        if c.is_whitespace() {
            chars.next();
        } else if c == '(' || c == ')' || c == ',' {
            out.push(c.to_string());
            chars.next();
        } else if c == '"' || c == '\'' {
            chars.next();
            let mut t = String::from("\"");
            loop {
                match chars.next() {
                    Some(x) if x == c => break,
                    Some(x) => t.push(x),
                    None => return Err("unterminated quote".into()),
                }
            }
            out.push(t);
        } else if c == '!' || c == '=' || c == '<' || c == '>' {
            let mut t = String::new();
            while let Some(&x) = chars.peek() {
                if "!=<>".contains(x) {
                    t.push(x);
                    chars.next();
                } else {
                    break;
                }
            }
            out.push(t);
        } else {
            let mut t = String::new();
            while let Some(&x) = chars.peek() {
                if x.is_whitespace() || "(),!=<>\"'".contains(x) {
                    break;
                }
                t.push(x);
                chars.next();
            }
            out.push(t);
        }
    }
    Ok(out)
}

impl<'a> Parser<'a> {
    fn new(
        s: &str,
        macros: &'a BTreeMap<String, String>,
        lists: &'a BTreeMap<String, Vec<String>>,
        depth: usize,
    ) -> Result<Self, String> {
        if depth > 16 {
            return Err("macros nest more than 16 deep (a macro that names itself?)".into());
        }
        Ok(Parser { toks: tokenize(s)?, pos: 0, macros, lists, depth })
    }

    fn peek(&self) -> Option<&str> {
        self.toks.get(self.pos).map(String::as_str)
    }

    fn next(&mut self) -> Option<String> {
        let t = self.toks.get(self.pos).cloned();
        self.pos += 1;
        t
    }

    fn parse_all(&mut self) -> Result<Expr, String> {
        let e = self.or()?;
        match self.peek() {
            None => Ok(e),
            Some(t) => Err(format!("unexpected {t:?}")),
        }
    }

    fn or(&mut self) -> Result<Expr, String> {
        let mut e = self.and()?;
        while self.peek() == Some("or") {
            self.next();
            e = Expr::Or(Box::new(e), Box::new(self.and()?));
        }
        Ok(e)
    }

    fn and(&mut self) -> Result<Expr, String> {
        let mut e = self.not()?;
        while self.peek() == Some("and") {
            self.next();
            e = Expr::And(Box::new(e), Box::new(self.not()?));
        }
        Ok(e)
    }

    fn not(&mut self) -> Result<Expr, String> {
        if self.peek() == Some("not") {
            self.next();
            return Ok(Expr::Not(Box::new(self.not()?)));
        }
        self.atom()
    }

    fn atom(&mut self) -> Result<Expr, String> {
        let t = self.next().ok_or("condition ends too early")?;
        if t == "(" {
            let e = self.or()?;
            return match self.next().as_deref() {
                Some(")") => Ok(e),
                _ => Err("missing )".into()),
            };
        }
        if let Some(m) = self.macros.get(&t) {
            return Parser::new(m, self.macros, self.lists, self.depth + 1)?
                .parse_all()
                .map_err(|e| format!("macro {t}: {e}"));
        }
        if !FIELDS.contains(&t.as_str()) {
            return Err(format!("{t:?} is not a field, macro or operator (fields: {})", FIELDS.join(", ")));
        }
        let op = match self.peek() {
            Some("=") | Some("==") => Op::Eq,
            Some("!=") => Op::Ne,
            Some("<") => Op::Lt,
            Some(">") => Op::Gt,
            Some("in") => Op::In,
            Some("startswith") => Op::StartsWith,
            Some("endswith") => Op::EndsWith,
            Some("contains") => Op::Contains,
            Some("pmatch") => Op::Pmatch,
            Some("glob") => Op::Glob,
            _ => return Ok(Expr::Truthy(t)),
        };
        self.next();
        let values = if matches!(op, Op::In | Op::Pmatch) {
            if self.next().as_deref() != Some("(") {
                return Err(format!("{t} {op:?}: a ( list ) follows"));
            }
            let mut v = vec![];
            loop {
                match self.next() {
                    Some(x) if x == ")" => break,
                    Some(x) if x == "," => continue,
                    Some(x) => match self.lists.get(&x) {
                        Some(items) => v.extend(items.iter().cloned()),
                        None => v.push(x.trim_start_matches('"').to_string()),
                    },
                    None => return Err("missing ) after a list".into()),
                }
            }
            v
        } else {
            let v = self.next().ok_or_else(|| format!("{t}: a value follows the operator"))?;
            vec![v.trim_start_matches('"').to_string()]
        };
        if NET_FIELDS.iter().any(|(f, _)| *f == t) {
            if !matches!(op, Op::Eq | Op::Ne | Op::In) {
                return Err(format!("{t} takes =, != or in"));
            }
            if let Some(bad) = values.iter().find(|v| network(v).is_none()) {
                return Err(format!("{t}: {bad:?} is not a network (10.0.0.0/8) or an address"));
            }
        }
        Ok(Expr::Cmp { field: t, op, values })
    }
}

/// Rules shipped with skiff, applied unless the node's rule files say otherwise.
pub const DEFAULT_RULES: &str = r#"
- list: shell_binaries
  items: [sh, bash, ash, dash, zsh, ksh, csh, tcsh, busybox]
- macro: spawned_process
  condition: evt.type = execve
- macro: container
  condition: container.id != host
- rule: Terminal shell in container
  desc: A shell started in a container other than as its main process or by another shell (someone got a shell, e.g. through exec)
  condition: spawned_process and container and proc.name in (shell_binaries) and proc.vpid != 1 and not proc.pname in (shell_binaries)
  output: "Shell started in container (instance=%container.name image=%container.image cmdline=%proc.cmdline parent=%proc.pname)"
  priority: WARNING
- rule: Drop and execute new binary in container
  desc: A program that is not in the image (written after the container started) was executed
  condition: spawned_process and container and proc.exe_writable
  output: "Executed a program not in the image (instance=%container.name exe=%proc.exe cmdline=%proc.cmdline)"
  priority: CRITICAL
- rule: Read sensitive file through proc
  desc: A program named a host path through /proc/<pid>/root or read credential files
  condition: spawned_process and container and (proc.cmdline contains /proc/1/root or proc.cmdline contains /etc/shadow or proc.cmdline contains /proc/self/environ)
  output: "Sensitive path named (instance=%container.name cmdline=%proc.cmdline)"
  priority: ERROR
- rule: Network tool in container
  desc: A network reconnaissance or transfer tool was started
  condition: spawned_process and container and proc.name in (nc, ncat, netcat, nmap, socat, tcpdump)
  output: "Network tool started (instance=%container.name cmdline=%proc.cmdline)"
  priority: NOTICE
- macro: open_write
  condition: evt.type = open and evt.is_open_write
- rule: Write below etc
  desc: A file below /etc was written in a container (its configuration changed at run time)
  condition: open_write and container and fd.name pmatch (/etc)
  output: "File below /etc written (instance=%container.name file=%fd.name cmdline=%proc.cmdline)"
  priority: ERROR
- rule: Write below binary dir
  desc: A file below a directory of programs or libraries was written in a container
  condition: open_write and container and fd.name pmatch (/bin, /sbin, /usr, /lib, /lib32, /lib64)
  output: "File below a binary directory written (instance=%container.name file=%fd.name cmdline=%proc.cmdline)"
  priority: ERROR
- rule: Listening socket opened in container
  desc: A program other than the container's main process started listening for connections (a backdoor, a tunnel)
  condition: evt.type = listen and container and proc.vpid != 1
  output: "New listening socket (instance=%container.name port=%fd.lport cmdline=%proc.cmdline)"
  priority: NOTICE
- list: allowed_outbound_destination_networks
  items: []
- rule: Unexpected outbound connection destination
  desc: A container connected out of its node to an address outside the allowed networks (turn it on, with the list, in a rule file of the node)
  condition: evt.type = connect and container and not fd.rnet in (allowed_outbound_destination_networks)
  output: "Outbound connection outside the allowed networks (instance=%container.name connection=%fd.name proto=%fd.l4proto)"
  priority: NOTICE
  enabled: false
- rule: System call refused by seccomp
  desc: The container's seccomp filter refused a call (exploits and escapes try calls containers do not need)
  condition: evt.type = seccomp and container
  output: "System call refused (instance=%container.name syscall=%seccomp.syscall action=%seccomp.action process=%proc.name)"
  priority: NOTICE
"#;

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(pairs: &[(&'static str, &str)]) -> Event {
        Event { evt_type: "execve".into(), fields: pairs.iter().map(|(k, v)| (*k, v.to_string())).collect() }
    }

    fn exec(name: &str, vpid: &str, parent: &str) -> Event {
        ev(&[
            ("evt.type", "execve"),
            ("container.id", "abc"),
            ("container.name", "web-1"),
            ("container.image", "busybox"),
            ("proc.name", name),
            ("proc.vpid", vpid),
            ("proc.pname", parent),
            ("proc.cmdline", name),
            ("proc.exe_writable", "false"),
        ])
    }

    #[test]
    fn default_rules_fire_on_what_they_describe() {
        let rules = parse(&[("default", DEFAULT_RULES)]).unwrap();
        let fired =
            |e: &Event| rules.iter().filter(|r| eval(&r.condition, e)).map(|r| r.name.clone()).collect::<Vec<_>>();
        assert_eq!(fired(&exec("sh", "7", "runc:[2:INIT]")), ["Terminal shell in container"]);
        assert!(fired(&exec("sh", "1", "runc:[2:INIT]")).is_empty(), "the main process");
        assert!(fired(&exec("sh", "9", "sh")).is_empty(), "a shell's child shell");
        assert!(fired(&exec("sleep", "9", "sh")).is_empty());
        let mut dropped = exec("miner", "9", "sh");
        dropped.fields.insert("proc.exe_writable", "true".into());
        dropped.fields.insert("proc.exe", "/tmp/miner".into());
        assert_eq!(fired(&dropped), ["Drop and execute new binary in container"]);
        let mut cat = exec("cat", "9", "sh");
        cat.fields.insert("proc.cmdline", "cat /etc/shadow".into());
        assert_eq!(fired(&cat), ["Read sensitive file through proc"]);
        let mut host = exec("sh", "7", "sshd");
        host.fields.insert("container.id", "host".into());
        assert!(fired(&host).is_empty(), "host processes are not containers");
        let r = &rules[0];
        assert_eq!(
            render(&r.output, &exec("sh", "7", "runc:[2:INIT]")),
            "Shell started in container (instance=web-1 image=busybox cmdline=sh parent=runc:[2:INIT])"
        );
    }

    #[test]
    fn operators_lists_macros_and_overrides() {
        let file = "- list: l\n  items: [a, b]\n- macro: m\n  condition: proc.name in (l, c)\n- rule: r\n  condition: m and not (proc.pid < 10 or proc.exe pmatch (/usr/bin)) and proc.cmdline glob \"*x*\"\n  output: \"%proc.name\"\n  priority: error\n  action: stop\n";
        let rules = parse(&[("f", file)]).unwrap();
        assert_eq!((rules[0].priority, rules[0].action), (Priority::Error, Action::Stop));
        let e = |name: &str, pid: &str, exe: &str, cmd: &str| {
            eval(
                &rules[0].condition,
                &ev(&[("proc.name", name), ("proc.pid", pid), ("proc.exe", exe), ("proc.cmdline", cmd)]),
            )
        };
        assert!(e("a", "50", "/tmp/a", "axe"));
        assert!(e("c", "50", "/tmp/a", "x"));
        assert!(!e("d", "50", "/tmp/a", "x"));
        assert!(!e("a", "5", "/tmp/a", "x"));
        assert!(!e("a", "50", "/usr/bin/a", "x"));
        assert!(!e("a", "50", "/tmp/a", "y"));
        // Multi-byte text (a workload's own arguments) is matched, never sliced apart.
        assert!(e("a", "50", "/tmp/a", "ééxéé"));
        assert!(!e("a", "50", "/tmp/a", "éééé"));
        // A later file disables or replaces a rule.
        let off = parse(&[("f", file), ("g", "- rule: r\n  enabled: false\n")]).unwrap();
        assert!(off.is_empty());
        // ... or turns a rule shipped off back on, with another action.
        let on = parse(&[
            ("f", &file.replace("action: stop", "enabled: false")),
            ("g", "- rule: r\n  enabled: true\n  action: restart\n"),
        ])
        .unwrap();
        assert_eq!(on.iter().map(|r| (r.name.as_str(), r.action)).collect::<Vec<_>>(), [("r", Action::Restart)]);
    }

    #[test]
    fn networks_match_addresses_by_prefix() {
        let file = "- list: ok\n  items: [\"10.0.0.0/8\", \"2001:db8::/32\", 192.0.2.7]\n- rule: out\n  condition: evt.type = connect and not fd.rnet in (ok)\n  output: \"%fd.name\"\n";
        let rules = parse(&[("f", file)]).unwrap();
        let to = |ip: &str| eval(&rules[0].condition, &ev(&[("evt.type", "connect"), ("fd.rip", ip)]));
        assert!(!to("10.1.2.3") && !to("2001:db8::1") && !to("192.0.2.7"));
        assert!(to("192.0.2.8") && to("8.8.8.8") && to("2001:db9::1"));
        let inside = Expr::Cmp { field: "fd.rnet".into(), op: Op::In, values: vec!["0.0.0.0/0".into()] };
        assert!(!eval(&inside, &ev(&[("evt.type", "connect")])), "no address is in no network");
        let bad = parse(&[("f", "- rule: r\n  condition: fd.rnet in (10.0.0.0/33)\n  output: o\n")]).unwrap_err();
        assert!(bad.contains("\"10.0.0.0/33\" is not a network"), "{bad}");
        let op = parse(&[("f", "- rule: r\n  condition: fd.rnet startswith 10\n  output: o\n")]).unwrap_err();
        assert!(op.contains("fd.rnet takes =, != or in"), "{op}");
    }

    #[test]
    fn shipped_rules_judge_writes_listens_flows_and_refused_calls() {
        let rules = parse(&[("default", DEFAULT_RULES)]).unwrap();
        let fired = |pairs: &[(&'static str, &str)]| {
            let mut e = ev(&[("container.id", "abc"), ("container.name", "web-1")]);
            e.fields.extend(pairs.iter().map(|(k, v)| (*k, v.to_string())));
            rules.iter().filter(|r| eval(&r.condition, &e)).map(|r| r.name.clone()).collect::<Vec<_>>()
        };
        let write = |f: &str| fired(&[("evt.type", "open"), ("evt.is_open_write", "true"), ("fd.name", f)]);
        assert_eq!(write("/etc/passwd"), ["Write below etc"]);
        assert_eq!(write("/usr/lib/libc.so"), ["Write below binary dir"]);
        assert!(write("/etcetera/x").is_empty() && write("/tmp/x").is_empty() && write("/var/lib/db").is_empty());
        assert_eq!(fired(&[("evt.type", "listen"), ("proc.vpid", "12")]), ["Listening socket opened in container"]);
        assert!(fired(&[("evt.type", "listen"), ("proc.vpid", "1")]).is_empty(), "the main process serves");
        assert!(fired(&[("evt.type", "connect"), ("fd.rip", "1.1.1.1")]).is_empty(), "shipped off");
        assert_eq!(fired(&[("evt.type", "seccomp"), ("seccomp.syscall", "mount")]), ["System call refused by seccomp"]);
    }

    #[test]
    fn mistakes_name_the_rule() {
        let e = |t: &str| parse(&[("f", t)]).unwrap_err();
        assert!(e("- rule: r\n  condition: proc.nam = x\n  output: o\n")
            .contains("rule \"r\": \"proc.nam\" is not a field"));
        assert!(e("- rule: r\n  condition: proc.name in (a\n  output: o\n").contains("missing )"));
        assert!(
            e("- rule: r\n  condition: proc.name = x\n  output: \"%proc.nme\"\n").contains("unknown field %proc.nme")
        );
        assert!(e("- rule: r\n  condition: proc.name = x\n  output: o\n  priority: LOUD\n").contains("priority"));
        assert!(e("- rule: r\n  condition: proc.name = x\n  output: o\n  action: kill\n").contains("action \"kill\""));
        assert!(e("- macro: m\n  condition: m\n- rule: r\n  condition: m\n  output: o\n").contains("16 deep"));
        assert!(e("- rule: r\n  output: o\n").contains("condition missing"));
    }
}
