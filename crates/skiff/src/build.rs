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
    if !b.context.is_dir() {
        bail!("{field}: context {} is not a directory", b.context.display());
    }
    let work = data.join("build");
    std::fs::create_dir_all(work.join("tmp")).with_context(|| format!("{}", work.display()))?;
    let dockerfile = match (&b.dockerfile_inline, &b.dockerfile) {
        (Some(text), _) => {
            let p = work.join("tmp").join(format!("Dockerfile.{}", b.service));
            std::fs::write(&p, text).with_context(|| format!("{}", p.display()))?;
            p
        }
        (None, Some(f)) => b.context.join(f),
        (None, None) => b.context.join("Dockerfile"),
    };
    if !dockerfile.is_file() {
        bail!("{field}: {} is not a file", dockerfile.display());
    }
    eprintln!("building {} from {} ...", b.tag, b.context.display());
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
    args.extend(["-t".into(), b.tag.clone().into(), b.context.clone().into_os_string()]);
    buildah(&work, &args).with_context(|| field.clone())?;
    let archive = work.join("tmp").join(format!("{}.tar", b.service));
    let dest = format!("oci-archive:{}:{}", archive.display(), b.tag);
    buildah(&work, &["push".into(), b.tag.clone().into(), dest.into()]).with_context(|| field.clone())?;
    let loaded = skiff_image::ImageStore::open(data.join("images"))?.load(&archive, Some(&b.tag));
    let _ = std::fs::remove_file(&archive);
    loaded.with_context(|| format!("{field}: loading the built image"))?;
    eprintln!("built {}", b.tag);
    Ok(())
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
