//! The operator pages (`docs/operations/*.md`) run as written: every line of their `sh`
//! blocks, page after page in the order their README lists them, against a hub, a node
//! and a registry on this machine. Their `yaml NAME` blocks are the files they use. The
//! pages' example names are mapped onto this machine (see `Docs::new`); commands that
//! keep running (an agent, `logs -f`, `get -w`, `exec -it`, `attach`, `port-forward`) are
//! driven as a person would (a terminal, a browser) and then left.

#![allow(clippy::unwrap_used)] // tests may panic on setup failures

mod common;

use common::fleet::{hub, wait_ready};
use common::{wait_for, Forward, Node, Terminal};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

type R = anyhow::Result<()>;
const SEC: Duration = Duration::from_secs(1);
const NODE: &str = "factory-3-gw";

/// What a page holds: shell lines to run, and files.
#[derive(Debug, PartialEq)]
enum Block {
    Sh(Vec<String>),
    File(String, String),
}

fn blocks(text: &str) -> Vec<Block> {
    let mut out = vec![];
    let mut open: Option<(String, Vec<String>)> = None;
    for line in text.lines() {
        if let Some(info) = line.strip_prefix("```") {
            match open.take() {
                None => open = Some((info.trim().to_string(), vec![])),
                Some((info, lines)) if info == "sh" => out.push(Block::Sh(lines)),
                Some((info, lines)) => {
                    if let Some(name) = info.strip_prefix("yaml ") {
                        out.push(Block::File(name.trim().to_string(), lines.join("\n") + "\n"));
                    }
                }
            }
            continue;
        }
        if let Some((_, lines)) = open.as_mut() {
            lines.push(line.to_string());
        }
    }
    out
}

/// The pages in the order the README lists them; every page of the directory is there.
fn pages(dir: &Path) -> anyhow::Result<Vec<String>> {
    let readme = std::fs::read_to_string(dir.join("README.md"))?;
    let listed: Vec<String> = readme
        .lines()
        .filter_map(|l| l.split_once("](")?.1.split_once(')').map(|(p, _)| p.to_string()))
        .filter(|p| p.ends_with(".md"))
        .collect();
    for e in std::fs::read_dir(dir)?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        anyhow::ensure!(name == "README.md" || listed.contains(&name), "{name} is not listed in the README");
    }
    Ok(listed)
}

/// What some lines must print (beside succeeding), by the start of the line as written.
const EXPECT: &[(&str, &str)] = &[
    ("skiff get nodes", NODE),
    ("skiff describe node", "site: factory-3"),
    ("skiff get deployments", "console"),
    ("skiff ps", "web-1"),
    ("skiff rollout history web", "app:2"),
    ("skiff exec web-1 -- cat /etc/app.conf", "version="),
    ("skiff top instances", "web-1"),
    ("skiff bundle inspect", "app:2"),
    ("skiff image ls", "app"),
    ("skiff completion bash", "complete"),
];

struct Docs {
    hub: Node,
    agent: Option<Node>,
    /// Nodes started only to look at their first words (the JSON-logging agent).
    others: Vec<Node>,
    _registry: skiff_testkit::registry::Registry,
    work: tempfile::TempDir,
    map: Vec<(String, String)>,
    roots: usize,
}

impl Docs {
    fn new() -> anyhow::Result<Docs> {
        let registry = skiff_testkit::registry::Registry::start()?;
        let images = tempfile::tempdir()?;
        for v in ["1", "2"] {
            let layer = skiff_testkit::LayerBuilder::new()
                .dir("www", 0o755)?
                .file("www/index.html", 0o644, format!("app version {v}\n").as_bytes())?
                .file("etc/app.conf", 0o644, format!("version={v}\n").as_bytes())?
                .dir("var/log", 0o755)?
                .finish()?;
            let img = skiff_testkit::ImageBuilder::busybox()?.layer(layer).cmd(&[
                "sh",
                "-c",
                "echo app started | tee -a /var/log/app.log; exec httpd -f -v -p 80 -h /www",
            ]);
            let dir = images.path().join(v);
            img.write_oci_layout(&dir, "app")?;
            registry.push(&dir, &format!("app:{v}"))?;
        }
        let hub = hub()?;
        let work = tempfile::tempdir()?;
        let at = |p: &str| work.path().join(p).display().to_string();
        let map = vec![
            ("https://hub.example:7443".to_string(), hub.server()?),
            ("hub.example".into(), "127.0.0.1".into()),
            ("registry.example.com".into(), format!("127.0.0.1:{}", registry.port)),
            ("/etc/skiff/".into(), at("etc/skiff/")),
            ("/srv/stack/".into(), at("srv/stack/")),
            ("/mnt/image".into(), at("mnt/image")),
            ("30080".into(), common::free_port().to_string()),
            ("8080".into(), common::free_port().to_string()),
        ];
        Ok(Docs { hub, agent: None, others: vec![], _registry: registry, work, map, roots: 0 })
    }

    /// The pages' names mapped, in one pass (a mapped value is never mapped again).
    fn subst(&self, text: &str) -> String {
        let mut out = String::with_capacity(text.len());
        let mut rest = text;
        'scan: while !rest.is_empty() {
            for (from, to) in &self.map {
                if let Some(after) = rest.strip_prefix(from.as_str()) {
                    out.push_str(to);
                    rest = after;
                    continue 'scan;
                }
            }
            let c = rest.chars().next().unwrap_or_default();
            out.push(c);
            rest = &rest[c.len_utf8()..];
        }
        out
    }

    fn write(&self, name: &str, text: &str) -> R {
        let text = self.subst(text);
        for p in [self.work.path().join(name), self.work.path().join("srv/stack").join(name)] {
            std::fs::create_dir_all(p.parent().unwrap())?;
            std::fs::write(p, &text)?;
        }
        Ok(())
    }

    /// Runs one line of a page (as written; `line` has its names mapped already).
    fn run(&mut self, line: &str) -> R {
        let words = skiff_manifest::shell_split(line).map_err(|e| anyhow::anyhow!("{line}: {e}"))?;
        let w: Vec<&str> = words.iter().map(String::as_str).collect();
        match w.as_slice() {
            ["skiff", "agent", rest @ ..] => self.agent(rest),
            ["skiff", "--log-format", "json", "agent", rest @ ..] => self.json_agent(rest),
            ["skiff", "install", ..] => self.install(&w[1..]),
            ["skiff", "exec", "-it", ..] => {
                let mut t = Terminal::spawn(&self.hub, &w[1..], (100, 30))?;
                t.expect("# ", 30 * SEC)?;
                t.send("echo in-$((40+2))\r")?;
                t.expect("in-42", 20 * SEC)?;
                t.send("exit\r")?;
                anyhow::ensure!(t.wait(20 * SEC)? == 0, "{line}: {}", t.screen());
                Ok(())
            }
            ["skiff", "attach", instance, ..] => {
                self.hub.wait_running(instance)?;
                let mut t = Terminal::spawn(&self.hub, &w[1..], (100, 30))?;
                t.send("echo attached-$((1+1))\r")?;
                t.expect("attached-2", 20 * SEC)?;
                t.send("\x10\x11")?;
                anyhow::ensure!(t.wait(20 * SEC)? == 0, "{line}: {}", t.screen());
                self.hub.wait_running(instance)?;
                Ok(())
            }
            ["skiff", "port-forward", _, ports] => {
                let local: u16 = ports.split(':').next().unwrap_or_default().parse()?;
                let mut f = Forward::start(&self.hub, &w[1..])?;
                let page = wait_for(30 * SEC, "the forwarded port", || {
                    common::http_get(local, "/").ok().filter(|p| p.contains("app version"))
                })?;
                f.stop();
                println!("{page}");
                Ok(())
            }
            ["skiff", "logs" | "get", .., "-f" | "-w"] => self.follow(line, &w[1..]),
            _ => {
                let out = self.shell(line)?;
                for (start, want) in EXPECT {
                    if line.starts_with(&self.subst(start)) {
                        anyhow::ensure!(out.contains(want), "{line} printed no {want:?}:\n{out}");
                    }
                }
                Ok(())
            }
        }
    }

    /// A line through `sh`, in the pages' directory, as the hub's administrator.
    fn shell(&self, line: &str) -> anyhow::Result<String> {
        let bin = Path::new(common::bin()).parent().unwrap().to_path_buf();
        let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());
        let out = Command::new("sh")
            .arg("-c")
            .arg(line)
            .current_dir(self.work.path())
            .env("SKIFF_DATA", self.hub.data())
            .env("PATH", path)
            .stdin(std::process::Stdio::null())
            .output()?;
        let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        anyhow::ensure!(out.status.success(), "{line}: {}\n{stdout}{stderr}", out.status);
        println!("$ {line}\n{stdout}{stderr}");
        Ok(stdout.into_owned())
    }

    /// The node: the page's agent command, on a data directory, bridge and subnet of its
    /// own, named as the pages name it.
    fn agent(&mut self, rest: &[&str]) -> R {
        let mut a = Node::new()?;
        let (bridge, subnet) = (a.bridge.clone(), a.subnet.clone());
        let mut args = vec!["agent"];
        args.extend(rest);
        args.extend(["--name", NODE, "--bridge", &bridge, "--subnet", &subnet, "--heartbeat", "1"]);
        a.spawn(&args)?;
        wait_for(30 * SEC, "the agent to join", || a.data().join("pki/joined.json").exists().then_some(()))?;
        wait_ready(&self.hub, NODE)?;
        self.agent = Some(a);
        Ok(())
    }

    /// An agent logging JSON: its first line is a JSON object. (Its token was used by the
    /// first node, so it goes no further; it is stopped.)
    fn json_agent(&mut self, rest: &[&str]) -> R {
        let mut a = Node::bare()?;
        let (bridge, subnet) = (a.bridge.clone(), a.subnet.clone());
        let mut args = vec!["--log-format", "json", "agent"];
        args.extend(rest);
        args.extend(["--name", "json-probe", "--bridge", &bridge, "--subnet", &subnet]);
        a.spawn(&args)?;
        let first = wait_for(30 * SEC, "the agent's first log line", || {
            std::fs::read_to_string(&a.up_log).ok()?.lines().find(|l| !l.trim().is_empty()).map(String::from)
        })?;
        let v: serde_json::Value = serde_json::from_str(&first).map_err(|e| anyhow::anyhow!("{first:?}: {e}"))?;
        anyhow::ensure!(v.is_object() && v.get("level").is_some(), "not a JSON log record: {first}");
        a.kill_up()?;
        self.others.push(a);
        Ok(())
    }

    /// `skiff install` into a scratch root (`--root`, unless the page gives one) without
    /// starting anything; the role's flags file is there after it.
    fn install(&mut self, args: &[&str]) -> R {
        self.roots += 1;
        let root: PathBuf = self.work.path().join(format!("root-{}", self.roots));
        let root_s = root.display().to_string();
        let split = args.iter().position(|a| *a == "--").unwrap_or(args.len());
        let mut argv: Vec<&str> = args[..split].to_vec();
        let given = argv.iter().position(|a| *a == "--root").and_then(|i| argv.get(i + 1).copied());
        if given.is_none() {
            argv.extend(["--root", &root_s]);
        }
        if !argv.contains(&"--no-start") {
            argv.push("--no-start");
        }
        argv.extend(&args[split..]);
        let line = std::iter::once("skiff").chain(argv.iter().copied()).map(shell_quote).collect::<Vec<_>>().join(" ");
        self.shell(&line)?;
        let root = given.map(PathBuf::from).unwrap_or(root);
        let role = args.get(1).copied().unwrap_or_default();
        let flags = std::fs::read_to_string(root.join(format!("etc/default/skiff-{role}")))?;
        let last = args.last().copied().unwrap_or_default();
        anyhow::ensure!(flags.contains(last), "the flags of {role} lack {last:?}: {flags}");
        Ok(())
    }

    /// A command that keeps running: it prints something and is still running (it
    /// follows) a moment later; then it is stopped.
    fn follow(&self, line: &str, args: &[&str]) -> R {
        let log = self.work.path().join("follow.out");
        let mut child = Command::new(common::bin())
            .arg("--data")
            .arg(self.hub.data())
            .args(args)
            .stdout(std::fs::File::create(&log)?)
            .stderr(std::process::Stdio::null())
            .spawn()?;
        let shown = wait_for(30 * SEC, line, || {
            std::fs::read_to_string(&log).ok().filter(|t| t.lines().any(|l| !l.trim().is_empty()))
        });
        std::thread::sleep(SEC);
        let following = matches!(child.try_wait(), Ok(None));
        let _ = child.kill();
        let _ = child.wait();
        let shown = shown?;
        println!("$ {line}\n{shown}");
        anyhow::ensure!(following, "{line} ended instead of following");
        Ok(())
    }
}

impl Docs {
    /// What a failure is read with: the node as the hub sees it, and the agent's last words.
    fn state(&self) -> String {
        let node = self.hub.ok(&["describe", "node", NODE]).unwrap_or_else(|e| e.to_string());
        let log = self.agent.as_ref().map(Node::log).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        format!(
            "--- describe node\n{node}--- the agent's last lines\n{}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        )
    }
}

fn shell_quote(s: &str) -> String {
    if !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_./:=@,".contains(c)) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

#[test]
fn the_operator_pages_run_as_written() -> R {
    skiff_testkit::require_privileged!();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/operations");
    let mut docs = Docs::new()?;
    let mut ran = 0;
    for page in pages(&dir)? {
        let text = std::fs::read_to_string(dir.join(&page))?;
        println!("## {page}");
        for block in blocks(&text) {
            match block {
                Block::File(name, text) => docs.write(&name, &text)?,
                Block::Sh(lines) => {
                    for line in lines.iter().filter(|l| !l.trim().is_empty()) {
                        let mapped = docs.subst(line);
                        docs.run(&mapped).map_err(|e| anyhow::anyhow!("{page}: {line}: {e:#}\n{}", docs.state()))?;
                        ran += 1;
                    }
                }
            }
        }
    }
    assert!(ran >= 50, "only {ran} lines ran");
    Ok(())
}

#[test]
fn pages_are_read_as_blocks() {
    let text =
        "# T\n```sh\nskiff ps\n\nskiff get nodes\n```\ntext\n```yaml a.yaml\nx: 1\n```\n```yaml\nnot: a file\n```\n";
    assert_eq!(
        blocks(text),
        [
            Block::Sh(vec!["skiff ps".into(), "".into(), "skiff get nodes".into()]),
            Block::File("a.yaml".into(), "x: 1\n".into())
        ]
    );
}
