//! `skiff build` and the builds `skiff up` and `skiff apply` do: a compose service's
//! `build:` run by an existing builder, Debian's `buildah` (as root, each step under runc
//! on the host's network, storage of its own under the data directory), then loaded into the node's image store
//! under the tag its deployment runs. Multi-stage Dockerfiles, `--target` and build
//! arguments are buildah's own.

use anyhow::{bail, Context, Result};
use skiff_manifest::BuildSpec;
use std::path::Path;

/// Whether the node's store at `data` holds `tag` already.
pub fn is_built(data: &Path, tag: &str) -> bool {
    skiff_image::ImageStore::open(data.join("images")).is_ok_and(|s| s.inspect(tag).is_ok())
}

/// Builds `b` and loads the image into the store at `data`. buildah's output (its
/// progress) goes to this terminal's standard error.
pub fn build(data: &Path, b: &BuildSpec) -> Result<()> {
    let field = format!("services.{}.build", b.service);
    let (archive, _) = build_archive(&data.join("build"), b)?;
    let loaded = skiff_image::ImageStore::open(data.join("images"))?.load(&archive, Some(&b.tag));
    let _ = std::fs::remove_file(&archive);
    loaded.with_context(|| format!("{field}: loading the built image"))?;
    eprintln!("built {}", b.tag);
    Ok(())
}

/// Builds `b` with buildah's storage under `work` into an OCI archive there; returns the
/// archive and the image's manifest digest.
pub fn build_archive(work: &Path, b: &BuildSpec) -> Result<(std::path::PathBuf, String)> {
    let field = format!("services.{}.build", b.service);
    std::fs::create_dir_all(work.join("tmp")).with_context(|| format!("{}", work.display()))?;
    // A Git context is fetched for this build and removed after it.
    let (fetched, context) = match &b.remote {
        Some(g) => {
            let (f, c) = fetch_context(work, &b.service, g).with_context(|| field.clone())?;
            (Some(f), c)
        }
        None => (None, b.context.clone()),
    };
    if !context.is_dir() {
        bail!("{field}: context {} is not a directory", context.display());
    }
    let dockerfile = match (&b.dockerfile_inline, &b.dockerfile) {
        (Some(text), _) => {
            let p = work.join("tmp").join(format!("Dockerfile.{}", b.service));
            std::fs::write(&p, text).with_context(|| format!("{}", p.display()))?;
            p
        }
        (None, Some(f)) => context.join(f),
        (None, None) => context.join("Dockerfile"),
    };
    if !dockerfile.is_file() {
        bail!("{field}: {} is not a file", dockerfile.display());
    }
    if let (None, Some(f), Some(g)) = (&b.dockerfile_inline, &fetched, &b.remote) {
        let resolved = dockerfile.canonicalize().with_context(|| field.clone())?;
        within(&f.0, &resolved, &without_credentials(&g.url)).with_context(|| field.clone())?;
    }
    eprintln!("building {} from {} ...", b.tag, context.display());
    // Each step in a runc container of its own (pid, mount, ipc and uts namespaces,
    // Docker's default capabilities), not a chroot with every capability; on the host's
    // network (buildah's own would add a bridge and firewall rules to the host).
    let mut args: Vec<std::ffi::OsString> =
        ["build", "--isolation", "oci", "--network", "host", "--layers"].into_iter().map(Into::into).collect();
    args.extend(["-f".into(), dockerfile.into_os_string()]);
    for (k, v) in &b.args {
        args.extend(["--build-arg".into(), format!("{k}={v}").into()]);
    }
    if let Some(t) = &b.target {
        args.extend(["--target".into(), t.into()]);
    }
    args.extend(["-t".into(), b.tag.clone().into(), context.into_os_string()]);
    buildah(work, &args).with_context(|| field.clone())?;
    // Named by process too: two applies at once do not write one file.
    let stem = format!("{}-{}", b.service, std::process::id());
    let archive = work.join("tmp").join(format!("{stem}.tar"));
    let digest_file = work.join("tmp").join(format!("{stem}.digest"));
    let dest = format!("oci-archive:{}:{}", archive.display(), b.tag);
    let push = ["push".into(), "--digestfile".into(), digest_file.clone().into(), b.tag.clone().into(), dest.into()];
    let pushed = buildah(work, &push).with_context(|| field.clone());
    let digest = std::fs::read_to_string(&digest_file).unwrap_or_default().trim().to_string();
    let _ = std::fs::remove_file(&digest_file);
    if let Err(e) = pushed {
        let _ = std::fs::remove_file(&archive);
        return Err(e);
    }
    Ok((archive, digest))
}

/// Builds `b` here and hands the image to the fleet's hub (`POST /api/v1/images`), which
/// offers it to the nodes that run it; returns `NAME@DIGEST`, the reference that runs
/// this build (a new build is a new reference, so its deployment rolls). The archive is
/// sent only when the hub does not hold this build already.
pub async fn build_and_push(c: &crate::client::Client, work: &Path, b: &BuildSpec) -> Result<String> {
    let field = format!("services.{}.build", b.service);
    let (work2, b2) = (work.to_path_buf(), b.clone());
    let (archive, digest) = tokio::task::spawn_blocking(move || build_archive(&work2, &b2)).await??;
    let name = skiff_image::reference_name(&b.tag);
    let query = [("reference", b.tag.as_str()), ("digest", digest.as_str())];
    let have = match c.post_bytes::<skiff_model::api::ImagePushed>("/api/v1/images", &query, vec![]).await {
        Ok(p) if !digest.is_empty() => Some(p),
        Ok(_) => None,
        Err(e)
            if e.downcast_ref::<crate::client::ApiError>()
                .is_some_and(|a| a.status == reqwest::StatusCode::NOT_FOUND) =>
        {
            None
        }
        Err(e) => {
            let _ = std::fs::remove_file(&archive);
            return Err(e.context(format!("{field}: offering {} to the hub", b.tag)));
        }
    };
    let pushed = match have {
        Some(p) => {
            eprintln!("{} is on the hub already ({})", b.tag, p.digest);
            Ok(p)
        }
        None => match tokio::fs::read(&archive).await.with_context(|| format!("{}", archive.display())) {
            Ok(bytes) => {
                eprintln!("sending {} to the hub ({}) ...", b.tag, skiff_model::format_bytes(bytes.len() as u64));
                c.post_bytes("/api/v1/images", &[("reference", b.tag.as_str())], bytes)
                    .await
                    .with_context(|| format!("{field}: sending {} to the hub", b.tag))
            }
            Err(e) => Err(e),
        },
    };
    let _ = std::fs::remove_file(&archive);
    Ok(format!("{name}@{}", pushed?.digest))
}

/// A Git context's checkout (its resolved path), removed when dropped.
struct Fetched(std::path::PathBuf);

impl Drop for Fetched {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Fetches a Git context as Docker does (the reference only, shallow; its submodules;
/// without `.git`) into `work/tmp`; returns the checkout and the context's directory in it.
fn fetch_context(work: &Path, service: &str, g: &skiff_manifest::GitContext) -> Result<(Fetched, std::path::PathBuf)> {
    // Checkouts a build that was killed left behind (its process is gone).
    for e in std::fs::read_dir(work.join("tmp")).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let pid = name.strip_prefix("context-").and_then(|r| r.rsplit_once('-')).map(|(_, pid)| pid.to_string());
        if pid.is_some_and(|p| !Path::new("/proc").join(p).exists()) {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
    let dir = work.join("tmp").join(format!("context-{service}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("{}", dir.display()))?;
    // Resolved once: what the context and Dockerfile must stay in.
    let root = dir.canonicalize().with_context(|| format!("{}", dir.display()))?;
    let fetched = Fetched(root.clone());
    let reference = g.reference.as_deref().unwrap_or("HEAD");
    let shown = without_credentials(&g.url);
    eprintln!("fetching the build context {shown} ({reference}) ...");
    git(&dir, &["init", "-q"])?;
    // A commit a server does not hand out by itself: every branch and tag, then it.
    if git(&dir, &["fetch", "-q", "--depth", "1", "--", &g.url, reference]).is_err() {
        git(&dir, &["fetch", "-q", "--tags", "--", &g.url, "+refs/heads/*:refs/remotes/origin/*"])?;
        git(&dir, &["rev-parse", "-q", "--verify", &format!("{reference}^{{commit}}")])
            .map_err(|_| anyhow::anyhow!("{shown}: no branch, tag or commit {reference:?}"))?;
        git(&dir, &["update-ref", "FETCH_HEAD", &format!("{reference}^{{commit}}")])?;
    }
    git(&dir, &["checkout", "-q", "--detach", "FETCH_HEAD"])?;
    if dir.join(".gitmodules").exists() {
        git(&dir, &["submodule", "update", "-q", "--init", "--recursive", "--depth", "1"])?;
    }
    let _ = std::fs::remove_dir_all(dir.join(".git"));
    // The context, followed through any link the repository holds, stays in the checkout:
    // a link to `/` would make the host the context of a build that runs as root.
    let context = match &g.dir {
        Some(d) => root.join(d),
        None => root.clone(),
    };
    let missing = || anyhow::anyhow!("{shown}: {} is not a directory of {reference}", g.dir.as_deref().unwrap_or("."));
    let context = context.canonicalize().map_err(|_| missing())?;
    if !context.is_dir() {
        return Err(missing());
    }
    within(&root, &context, &shown)?;
    Ok((fetched, context))
}

/// Refuses `path` (resolved) outside the checkout `root`.
fn within(root: &Path, path: &Path, url: &str) -> Result<()> {
    if !path.starts_with(root) {
        bail!("{url}: {} leads out of the repository (a symbolic link)", path.display());
    }
    Ok(())
}

/// A URL as shown on a terminal: without a user's password or token.
fn without_credentials(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => match rest.split_once('/').unwrap_or((rest, "")) {
            (authority, path) if authority.contains('@') => {
                let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
                format!("{scheme}://***@{host}/{path}")
            }
            _ => url.to_string(),
        },
        None => url.to_string(),
    }
}

/// Runs git in `dir`, never asking for a password (a build is not interactive), and
/// giving up on a transfer that stalls for a minute.
fn git(dir: &Path, args: &[&str]) -> Result<()> {
    let mut cmd = std::process::Command::new("git");
    if std::env::var_os("GIT_SSH_COMMAND").is_none() {
        cmd.env("GIT_SSH_COMMAND", "ssh -o BatchMode=yes");
    }
    let status = cmd
        .current_dir(dir)
        .env("GIT_TERMINAL_PROMPT", "0")
        .args(["-c", "http.lowSpeedLimit=1", "-c", "http.lowSpeedTime=60", "-c", "advice.detachedHead=false"])
        // No local paths or helper programs as submodules.
        .args(["-c", "protocol.file.allow=never", "-c", "protocol.ext.allow=never"])
        .args(args)
        .stdout(std::process::Stdio::from(std::io::stderr()))
        .status();
    match status {
        Ok(s) if s.success() => Ok(()),
        Ok(s) => bail!("git {} failed ({s})", args.first().unwrap_or(&"")),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("a Git build context needs git, which is not installed (apt-get install git)")
        }
        Err(e) => Err(anyhow::Error::new(e).context("running git")),
    }
}

/// Runs buildah on its own storage under `work`, with Docker's umask (022) for what the
/// build's steps make: the caller's may be the agent's 077.
fn buildah(work: &Path, args: &[std::ffi::OsString]) -> Result<()> {
    let status = std::process::Command::new("sh")
        .arg("-c")
        .arg("umask 022; exec buildah \"$@\"")
        .arg("buildah")
        .arg("--root")
        .arg(work.join("storage"))
        .arg("--runroot")
        .arg(work.join("run"))
        .arg("--storage-driver")
        .arg("vfs")
        .args(args)
        .stdout(std::process::Stdio::from(std::io::stderr()))
        .status()
        .context("running buildah")?;
    match status.code() {
        Some(0) => Ok(()),
        Some(127) => bail!("building images needs buildah, which is not installed (apt-get install buildah)"),
        _ => bail!("buildah failed ({status})"),
    }
}

/// Builds what `import` builds: every service named in `only` (all with `build:` when
/// empty), or with `missing_only` those build-only services whose image the store lacks.
pub fn build_all(data: &Path, builds: &[BuildSpec], only: &[String], missing_only: bool) -> Result<usize> {
    for s in only {
        if !builds.iter().any(|b| &b.service == s) {
            bail!("{s}: no service of that name has a build section");
        }
    }
    let mut n = 0;
    for b in builds.iter().filter(|b| only.is_empty() || only.contains(&b.service)) {
        if missing_only && (!b.build_only || is_built(data, &b.tag)) {
            continue;
        }
        build(data, b)?;
        n += 1;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_url_is_shown_without_its_credentials() {
        assert_eq!(without_credentials("https://bob:tok@git.example/r.git"), "https://***@git.example/r.git");
        assert_eq!(without_credentials("https://git.example/a@b.git"), "https://git.example/a@b.git");
        assert_eq!(without_credentials("git@host:r.git"), "git@host:r.git");
    }

    #[test]
    fn a_path_out_of_the_checkout_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().canonicalize().unwrap();
        assert!(within(&root, &root.join("a/b"), "u").is_ok());
        let e = within(&root, Path::new("/etc"), "u").unwrap_err().to_string();
        assert_eq!(e, "u: /etc leads out of the repository (a symbolic link)");
    }
}
