//! `skiff login` / `skiff logout`: registry credentials in the Docker config format
//! (`$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`), where pulls — this
//! machine's agent's too, as root — and the Docker CLI find them. Credential helpers named
//! there (`credHelpers`, `credsStore`) are honoured when pulling.

use super::Cli;
use anyhow::{bail, Context, Result};
use skiff_image::registry::{docker_config_key, docker_config_path};
use std::path::Path;

/// `registry.example:5000` from what a user types (`https://registry.example:5000/`);
/// Docker Hub when none.
fn registry_of(server: Option<&str>) -> Result<String> {
    let s = server.unwrap_or("docker.io").trim();
    let s = s.strip_prefix("https://").or_else(|| s.strip_prefix("http://")).unwrap_or(s);
    let s = s.trim_end_matches('/');
    // Docker Hub's own key, as `docker login` is given it.
    let s = s.strip_suffix("/v1").unwrap_or(s);
    if s.is_empty() || s.contains('/') || !s.bytes().all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b)) {
        bail!("SERVER: {s:?} is not a registry host (registry.example.com[:port])");
    }
    Ok(s.to_string())
}

fn read_config(path: &Path) -> Result<serde_json::Map<String, serde_json::Value>> {
    match std::fs::read_to_string(path) {
        Ok(t) if t.trim().is_empty() => Ok(Default::default()),
        Ok(t) => match serde_json::from_str::<serde_json::Value>(&t) {
            Ok(serde_json::Value::Object(m)) => Ok(m),
            Ok(_) => bail!("{}: not a JSON object", path.display()),
            Err(e) => bail!("{}: {e}", path.display()),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Default::default()),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

fn write_config(path: &Path, config: &serde_json::Map<String, serde_json::Value>) -> Result<()> {
    if let Some(dir) = path.parent() {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("creating {}", dir.display()))?;
    }
    let text = serde_json::to_string_pretty(config)? + "\n";
    skiff_sys::durable::write(path, text.as_bytes(), 0o600).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

pub(super) async fn login(
    cli: &Cli,
    server: Option<&str>,
    user: Option<&str>,
    password: Option<&str>,
    password_stdin: bool,
) -> Result<i32> {
    use base64::Engine;
    let registry = registry_of(server)?;
    let user = user.filter(|u| !u.is_empty()).context("-u/--username: the user name is needed")?;
    let password = match (password, password_stdin) {
        (Some(_), true) => bail!("--password and --password-stdin: give one"),
        (Some(p), false) => {
            eprintln!("warning: --password is seen by other local users (ps); use --password-stdin");
            p.to_string()
        }
        (None, true) => {
            let mut line = String::new();
            std::io::stdin().read_line(&mut line).context("reading the password from standard input")?;
            line.trim_end_matches(['\n', '\r']).to_string()
        }
        (None, false) => {
            bail!("--password-stdin: the password is needed (echo \"$PASS\" | skiff login -u USER --password-stdin)")
        }
    };
    if password.is_empty() {
        bail!("the password is empty");
    }
    let opts = super::pull_options(cli)?;
    skiff_image::registry::check_login(&registry, user, &password, &opts).await?;
    let path = docker_config_path().context("neither DOCKER_CONFIG nor HOME is set: no place for credentials")?;
    let mut config = read_config(&path)?;
    let key = docker_config_key(&registry);
    // Where the config keeps this registry's credentials in a helper, they go there (as
    // `docker login` does), not in the file.
    if let Some(helper) =
        skiff_image::registry::credential_helper_for(&serde_json::Value::Object(config.clone()), &registry)
    {
        let creds = serde_json::json!({"ServerURL": key, "Username": user, "Secret": password});
        skiff_image::registry::run_credential_helper(&helper, "store", creds.to_string().as_bytes())
            .map_err(|e| anyhow::anyhow!("storing the credentials with the config's helper: {e}"))?;
        eprintln!("credentials kept by docker-credential-{helper}");
        outln!("Login Succeeded");
        return Ok(0);
    }
    let auths = config.entry("auths").or_insert_with(|| serde_json::json!({}));
    let Some(auths) = auths.as_object_mut() else { bail!("{}: \"auths\" is not an object", path.display()) };
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    auths.insert(key, serde_json::json!({ "auth": auth }));
    write_config(&path, &config)?;
    eprintln!("credentials kept in {} (mode 0600)", path.display());
    outln!("Login Succeeded");
    Ok(0)
}

pub(super) fn logout(server: Option<&str>) -> Result<i32> {
    let registry = registry_of(server)?;
    let key = docker_config_key(&registry);
    let path = docker_config_path().context("neither DOCKER_CONFIG nor HOME is set")?;
    let mut config = read_config(&path)?;
    if let Some(helper) =
        skiff_image::registry::credential_helper_for(&serde_json::Value::Object(config.clone()), &registry)
    {
        skiff_image::registry::run_credential_helper(&helper, "erase", key.as_bytes())
            .map_err(|e| anyhow::anyhow!("erasing the credentials with the config's helper: {e}"))?;
    }
    let removed = config.get_mut("auths").and_then(|a| a.as_object_mut()).and_then(|a| a.remove(&key)).is_some();
    if !removed {
        outln!("Not logged in to {key}");
        return Ok(0);
    }
    write_config(&path, &config)?;
    outln!("Removing login credentials for {key}");
    Ok(0)
}

#[cfg(test)]
mod tests {
    #[test]
    fn servers_are_read_as_docker_login_reads_them() {
        assert_eq!(super::registry_of(None).unwrap(), "docker.io");
        assert_eq!(super::registry_of(Some("https://index.docker.io/v1/")).unwrap(), "index.docker.io");
        assert_eq!(super::registry_of(Some("127.0.0.1:5000")).unwrap(), "127.0.0.1:5000");
        assert_eq!(super::registry_of(Some("https://reg.example/")).unwrap(), "reg.example");
        assert!(super::registry_of(Some("reg.example/team")).unwrap_err().to_string().contains("not a registry host"));
        assert_eq!(skiff_image::registry::docker_config_key("docker.io"), "https://index.docker.io/v1/");
        assert_eq!(skiff_image::registry::docker_config_key("127.0.0.1:5000"), "127.0.0.1:5000");
    }
}
