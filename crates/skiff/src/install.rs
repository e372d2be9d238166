//! `skiff install agent|hub|up [-- FLAGS...]`: the role as a systemd service that survives
//! a reboot. The unit files are the ones the `.deb` ships (`packaging/systemd/`); the
//! role's flags go to `/etc/default/skiff-ROLE`, checked first by the same parser the
//! role uses, so a typo fails here and not at the next boot.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Role {
    Agent,
    Hub,
    Up,
}

impl Role {
    fn name(self) -> &'static str {
        match self {
            Role::Agent => "agent",
            Role::Hub => "hub",
            Role::Up => "up",
        }
    }

    /// The unit file as shipped.
    pub fn unit(self) -> &'static str {
        match self {
            Role::Agent => include_str!("../../../packaging/systemd/skiff-agent.service"),
            Role::Hub => include_str!("../../../packaging/systemd/skiff-hub.service"),
            Role::Up => include_str!("../../../packaging/systemd/skiff-up.service"),
        }
    }

    fn variable(self) -> String {
        format!("SKIFF_{}_ARGS", self.name().to_uppercase())
    }
}

#[derive(clap::Args, Debug)]
pub struct InstallArgs {
    /// Which role runs as a service.
    pub role: Role,
    /// Write under this directory instead of `/` (for images and packages); nothing is
    /// started then.
    #[arg(long, default_value = "/")]
    pub root: PathBuf,
    /// Write the files but start nothing.
    #[arg(long)]
    pub no_start: bool,
    /// The role's flags, after `--` (`skiff install agent -- --hub https://hub:7443
    /// --token-file /etc/skiff/join-token`).
    #[arg(last = true)]
    pub flags: Vec<String>,
}

/// Flags whose values are paths, in any role.
const PATH_FLAGS: &[&str] = &[
    "-f",
    "--file",
    "--token-file",
    "--policy",
    "--detect-rules",
    "--cdi-spec-dir",
    "--alert-rules",
    "--etcd-ca",
    "--etcd-cert",
    "--etcd-key",
    "--registries",
    "--data",
    "--config",
];

/// The flags as the service will get them: a relative path given to a path flag is made
/// absolute from here (a service starts in `/`); nothing else is touched.
fn absolute_flags(flags: &[String]) -> Vec<String> {
    let abs = |v: &str| -> String {
        let p = Path::new(v);
        if v.is_empty() || v == "-" || p.is_absolute() {
            return v.to_string();
        }
        std::path::absolute(p).map(|a| a.display().to_string()).unwrap_or_else(|_| v.to_string())
    };
    let mut out = Vec::with_capacity(flags.len());
    let mut next_is_path = false;
    for f in flags {
        if next_is_path {
            out.push(abs(f));
            next_is_path = false;
            continue;
        }
        match f.split_once('=') {
            Some((k, v)) if PATH_FLAGS.contains(&k) => out.push(format!("{k}={}", abs(v))),
            _ => {
                next_is_path = PATH_FLAGS.contains(&f.as_str());
                out.push(f.clone());
            }
        }
    }
    out
}

/// The files `install` writes (paths under `root`) and their contents. A unit the
/// package installed (`/lib/systemd/system`) is used as it is: only the flags are written.
pub fn files(args: &InstallArgs, bin: &Path) -> Result<Vec<(PathBuf, String, u32)>> {
    let role = args.role;
    if let Some(f) = args.flags.iter().find(|f| *f == "--token" || f.starts_with("--token=")) {
        bail!("{f}: a service's flags are visible to every local user (/proc/PID/cmdline); use --token-file");
    }
    let flags = absolute_flags(&args.flags);
    // The role's own parser checks the flags now.
    let mut argv: Vec<String> = vec!["skiff".into()];
    if role == Role::Hub {
        argv.extend(["--data".into(), "/var/lib/skiff-hub".into()]);
    }
    argv.push(role.name().into());
    argv.extend(flags.iter().cloned());
    if let Err(e) = <crate::cli::Cli as clap::Parser>::try_parse_from(&argv) {
        bail!("the {} flags after --: {}", role.name(), e.render().to_string().trim());
    }
    // systemd splits `$VAR` at white space and takes quotes literally there.
    if let Some(f) =
        flags.iter().find(|f| f.is_empty() || f.contains(|c: char| c.is_whitespace() || "\"'\\$".contains(c)))
    {
        bail!("the {} flag {f:?}: a service's flags cannot hold spaces, quotes, '\\' or '$'", role.name());
    }
    let name = role.name();
    let under = |p: &str| args.root.join(p.trim_start_matches('/'));
    let env =
        format!("# Flags of `skiff {name}` (written by skiff install).\n{}=\"{}\"\n", role.variable(), flags.join(" "));
    let mut out = vec![(under(&format!("/etc/default/skiff-{name}")), env, 0o600)];
    let packaged =
        under(&format!("/lib/systemd/system/skiff-{name}.service")).exists() && bin == Path::new("/usr/bin/skiff");
    if !packaged {
        let unit = role.unit().replace("/usr/bin/skiff ", &format!("{} ", bin.display()));
        out.insert(0, (under(&format!("/etc/systemd/system/skiff-{name}.service")), unit, 0o644));
    }
    Ok(out)
}

pub fn install(args: &InstallArgs) -> Result<i32> {
    let bin = std::env::current_exe().context("finding this program")?;
    let files = files(args, &bin)?;
    for (path, text, mode) in &files {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        skiff_sys::durable::write(path, text.as_bytes(), *mode)
            .with_context(|| format!("writing {}", path.display()))?;
        outln!("wrote {}", path.display());
    }
    let unit = format!("skiff-{}.service", args.role.name());
    let systemd = Path::new("/run/systemd/system").is_dir();
    if args.no_start || args.root != Path::new("/") || !systemd {
        if !systemd && args.root == Path::new("/") && !args.no_start {
            eprintln!("systemd is not running here: start it with `systemctl enable --now {unit}` where it is");
        }
        return Ok(0);
    }
    // A restart, not only a start: a running service takes its new flags (its
    // containers run on through it).
    for cmd in [vec!["daemon-reload"], vec!["enable", unit.as_str()], vec!["restart", unit.as_str()]] {
        let st = std::process::Command::new("systemctl").args(&cmd).status().context("running systemctl")?;
        if !st.success() {
            bail!("systemctl {} failed ({st})", cmd.join(" "));
        }
    }
    outln!("{unit} enabled and started");
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(role: Role, flags: &[&str]) -> InstallArgs {
        InstallArgs {
            role,
            root: "/tmp/r".into(),
            no_start: true,
            flags: flags.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn flags_are_checked_by_the_roles_own_parser_and_written_beside_the_unit() {
        let bin = Path::new("/opt/skiff/bin/skiff");
        let f = files(&args(Role::Agent, &["--hub", "https://hub:7443", "--token-file", "/etc/skiff/t"]), bin).unwrap();
        assert_eq!(f[0].0, Path::new("/tmp/r/etc/systemd/system/skiff-agent.service"));
        assert!(f[0].1.contains("ExecStart=/opt/skiff/bin/skiff agent $SKIFF_AGENT_ARGS"), "{}", f[0].1);
        assert!(
            f[0].1.contains("KillMode=process") && f[0].1.contains("Delegate=yes") && f[0].1.contains("Type=notify")
        );
        assert_eq!(
            f[1].1.lines().last(),
            Some("SKIFF_AGENT_ARGS=\"--hub https://hub:7443 --token-file /etc/skiff/t\"")
        );
        assert_eq!(f[1].2, 0o600, "the flags may name secrets' files");
        let e = files(&args(Role::Agent, &["--hubb", "x"]), bin).unwrap_err().to_string();
        assert!(e.contains("the agent flags after --") && e.contains("--hubb"), "{e}");
        let e = files(&args(Role::Up, &["--listen", "127.0.0.1:1 x"]), bin).unwrap_err().to_string();
        assert!(e.contains("cannot hold spaces"), "{e}");
        let e = files(&args(Role::Agent, &["--hub", "https://h:1", "--token", "secret"]), bin).unwrap_err().to_string();
        assert!(e.contains("use --token-file"), "{e}");
        // A relative path given to a path flag is made absolute (services start in /);
        // other values are left alone, though a file of that name may be here.
        let here = std::env::current_dir().unwrap();
        let flags: Vec<String> =
            ["-f", "compose.yaml", "--policy=p.yaml", "--name", "Cargo.toml", "--token-file", "/etc/t"]
                .iter()
                .map(|s| s.to_string())
                .collect();
        let at = |f: &str| here.join(f).display().to_string();
        assert_eq!(
            absolute_flags(&flags),
            vec![
                "-f".to_string(),
                at("compose.yaml"),
                format!("--policy={}", at("p.yaml")),
                "--name".into(),
                "Cargo.toml".into(),
                "--token-file".into(),
                "/etc/t".into()
            ]
        );
        let hub = files(&args(Role::Hub, &["--listen", "0.0.0.0:7443"]), bin).unwrap();
        assert!(hub[0].1.contains("ExecStart=/opt/skiff/bin/skiff --data /var/lib/skiff-hub hub $SKIFF_HUB_ARGS"));
    }
}
