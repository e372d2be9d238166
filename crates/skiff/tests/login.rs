//! `skiff login`/`logout` against a real registry (docker-registry behind a token server,
//! Docker Hub's flow): credentials are checked first, kept in Docker's config format
//! (`$DOCKER_CONFIG/config.json`, 0600) where pulls find them, and forgotten; a
//! credential helper named in the config is honoured; `image tag` names a stored image.

#![allow(clippy::unwrap_used)] // tests may panic on setup failures

mod common;

use skiff_testkit::registry::{Auth, Registry, PASSWORD, USER};
use std::process::{Command, Output};

type R = anyhow::Result<()>;

/// The CLI with its own data directory and Docker config directory, `input` on stdin.
fn skiff(
    data: &std::path::Path,
    docker: &std::path::Path,
    path: Option<&str>,
    args: &[&str],
    input: &str,
) -> anyhow::Result<Output> {
    use std::io::Write;
    let mut c = Command::new(common::bin());
    c.arg("--data").arg(data).args(args).env("DOCKER_CONFIG", docker);
    if let Some(p) = path {
        c.env("PATH", p);
    }
    let mut child = c
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    child.stdin.take().unwrap().write_all(input.as_bytes())?;
    Ok(child.wait_with_output()?)
}

fn says(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

#[test]
fn login_keeps_credentials_where_pulls_find_them() -> R {
    skiff_testkit::require_registry_tools!();
    let reg = Registry::start_with(false, Auth::Token)?;
    let tmp = tempfile::tempdir()?;
    let layout = tmp.path().join("layout");
    skiff_testkit::ImageBuilder::busybox()?.write_oci_layout(&layout, "x")?;
    reg.push(&layout, "team/private:1")?;
    reg.push(&layout, "team/private:2")?;
    let (data, docker) = (tmp.path().join("data"), tmp.path().join("docker"));
    let server = format!("127.0.0.1:{}", reg.port);
    let image = |tag: &str| format!("{server}/team/private:{tag}");
    let run = |args: &[&str], input: &str| skiff(&data, &docker, None, args, input);

    let anon = run(&["image", "pull", &image("1")], "")?;
    assert!(!anon.status.success() && says(&anon).contains("authentication required"), "{}", says(&anon));
    let wrong = run(&["login", &server, "-u", USER, "--password-stdin"], "nope\n")?;
    assert!(!wrong.status.success() && says(&wrong).contains("the user name or password is wrong"), "{}", says(&wrong));
    assert!(!docker.join("config.json").exists(), "nothing kept for wrong credentials");
    let no_user = run(&["login", &server, "--password-stdin"], "x\n")?;
    assert!(says(&no_user).contains("-u/--username"), "{}", says(&no_user));

    let ok = run(&["login", &server, "-u", USER, "--password-stdin"], &format!("{PASSWORD}\n"))?;
    assert!(ok.status.success() && says(&ok).contains("Login Succeeded"), "{}", says(&ok));
    let config = docker.join("config.json");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&config)?.permissions().mode() & 0o777, 0o600);
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&config)?)?;
    assert!(v["auths"][&server]["auth"].is_string(), "{v}");
    let pulled = run(&["image", "pull", &image("1")], "")?;
    assert!(pulled.status.success(), "{}", says(&pulled));

    // image tag: another name for a stored image; a bad name is refused.
    let tagged = run(&["image", "tag", &image("1"), "localhost/mine:edge"], "")?;
    assert!(tagged.status.success(), "{}", says(&tagged));
    assert!(says(&run(&["image", "ls"], "")?).contains("localhost/mine:edge"));
    let bad = run(&["image", "tag", &image("1"), "Mine:x"], "")?;
    assert!(!bad.status.success() && says(&bad).contains("TARGET"), "{}", says(&bad));
    let digest = format!("localhost/mine@sha256:{}", "a".repeat(64));
    let bad = run(&["image", "tag", &image("1"), &digest], "")?;
    assert!(!bad.status.success() && says(&bad).contains("a tag cannot carry a digest"), "{}", says(&bad));

    // logout forgets them: the next pull is refused again.
    let out = run(&["logout", &server], "")?;
    assert!(says(&out).contains(&format!("Removing login credentials for {server}")), "{}", says(&out));
    let again = run(&["image", "pull", &image("2")], "")?;
    assert!(!again.status.success() && says(&again).contains("authentication required"), "{}", says(&again));

    // A credential helper the config names (`credsStore`), as Docker Desktop and pass use.
    let bin = tmp.path().join("bin");
    std::fs::create_dir(&bin)?;
    let helper = bin.join("docker-credential-fake");
    let asked = tmp.path().join("asked");
    std::fs::write(
        &helper,
        format!(
            "#!/bin/sh\ncat > {}\necho '{{\"ServerURL\":\"x\",\"Username\":\"{USER}\",\"Secret\":\"{PASSWORD}\"}}'\n",
            asked.display()
        ),
    )?;
    std::fs::set_permissions(&helper, std::fs::Permissions::from_mode(0o755))?;
    std::fs::write(&config, r#"{"auths": {}, "credsStore": "fake"}"#)?;
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());
    let helped = skiff(&data, &docker, Some(&path), &["image", "pull", &image("2")], "")?;
    assert!(helped.status.success(), "{}", says(&helped));
    assert_eq!(std::fs::read_to_string(&asked)?, server, "the helper was asked for this registry");
    // With a helper named, login stores through it (`store`, the credentials as JSON on
    // its stdin), not in the file.
    let stored = skiff(
        &data,
        &docker,
        Some(&path),
        &["login", &server, "-u", USER, "--password-stdin"],
        &format!("{PASSWORD}\n"),
    )?;
    assert!(stored.status.success(), "{}", says(&stored));
    let given: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&asked)?)?;
    assert_eq!(
        (given["ServerURL"].as_str(), given["Username"].as_str()),
        (Some(server.as_str()), Some(USER)),
        "{given}"
    );
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&config)?)?;
    assert_eq!(v["auths"], serde_json::json!({}), "no password in the file: {v}");
    Ok(())
}
