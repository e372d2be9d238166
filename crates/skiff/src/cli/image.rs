//! `skiff image ...`: this machine's image store.

use super::Cli;
use crate::output::{self, Format};
use anyhow::Result;
use clap::Subcommand;
use std::path::{Path, PathBuf};

#[derive(Subcommand)]
pub enum ImageCmd {
    /// Load images from a `docker save` tarball, an OCI layout directory or an oci-archive.
    Load {
        /// The tarball, OCI layout directory or oci-archive.
        file: PathBuf,
        /// Name for an image whose archive does not name it.
        #[arg(long)]
        tag: Option<String>,
    },
    /// Pull an image from a registry (resumable, verified; the variant for this machine
    /// unless --platform says otherwise).
    Pull {
        /// The image (`registry.example/app:2`, `busybox`, `app@sha256:...`).
        reference: String,
        /// os/arch[/variant], e.g. linux/arm64 or linux/arm/v7.
        #[arg(long)]
        platform: Option<String>,
        /// Registry reached over plain HTTP (loopback registries always are).
        #[arg(long = "insecure-registry")]
        insecure_registry: Vec<String>,
        /// Cap on the download rate over all layers, in bytes per second (e.g. 500K, 2M).
        #[arg(long = "limit-rate", value_parser = parse_rate)]
        limit_rate: Option<u64>,
        /// Layers downloaded at once.
        #[arg(long = "max-concurrent-downloads", default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=64))]
        max_concurrent_downloads: u16,
    },
    /// Write images to a `docker save` tarball (for `docker load`, `skopeo`, `skiff image load`).
    Save {
        /// The images (one or more).
        #[arg(required = true)]
        references: Vec<String>,
        /// The tarball to write.
        #[arg(short = 'o', long = "output")]
        output: PathBuf,
    },
    /// List images.
    Ls {
        /// table, json or yaml.
        #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
        output: Format,
    },
    /// Remove an image (refused while a deployment uses it).
    Rm {
        /// The image: a name, an ID or a digest.
        reference: String,
    },
    /// Give a stored image another name (as `docker tag`).
    Tag {
        /// The image: a name, an ID or a digest.
        source: String,
        /// The new name (`registry.example/team/app:2`).
        target: String,
    },
    /// Show an image's config and layers.
    Inspect {
        /// The image: a name, an ID or a digest.
        reference: String,
    },
    /// Remove blobs and layers no image needs.
    Prune,
    /// Sign an image in its registry as `cosign sign --key` does (the tag
    /// sha256-<digest>.sig; `cosign verify` accepts it), or with `--cert` as `notation
    /// sign` does (a JWS envelope referring to the image; `notation verify` accepts it).
    Sign {
        /// The image in its registry (signed by digest).
        reference: String,
        /// Private key: PEM PKCS#8, ECDSA P-256 or Ed25519 (`skiff image keygen`, `openssl genpkey`).
        #[arg(long)]
        key: PathBuf,
        /// Sign with Notation: the key's certificate (code signing), then its issuers (PEM).
        #[arg(long)]
        cert: Option<PathBuf>,
        /// Registry reached over plain HTTP (loopback registries always are).
        #[arg(long = "insecure-registry")]
        insecure_registry: Vec<String>,
    },
    /// Check an image's signatures in its registry — cosign's against public keys,
    /// Notation's against a trust store — without pulling it. Exit status 1 when no
    /// trusted signature vouches for it.
    Verify {
        /// The image in its registry.
        reference: String,
        /// Public key (PEM), repeatable: any one of them may have signed.
        #[arg(long, required_unless_present = "trust_store")]
        key: Vec<PathBuf>,
        /// Notation: root certificates (PEM), repeatable.
        #[arg(long = "trust-store")]
        trust_store: Vec<PathBuf>,
        /// Notation: whom the trust store vouches for ("x509.subject: C=US, O=Example, CN=signer"),
        /// repeatable; `*` for anyone it vouches for.
        #[arg(long = "trusted-identity", requires = "trust_store", default_value = "*")]
        trusted_identity: Vec<String>,
        /// Accept a signature made for another repository (only the digest must match).
        #[arg(long)]
        any_identity: bool,
        /// Registry reached over plain HTTP (loopback registries always are).
        #[arg(long = "insecure-registry")]
        insecure_registry: Vec<String>,
    },
    /// Make a signing key pair: PREFIX.key (private, PKCS#8, mode 0600) and PREFIX.pub.
    Keygen {
        /// PREFIX of the two files.
        #[arg(short = 'o', long = "output", default_value = "cosign")]
        output: PathBuf,
        /// Ed25519 instead of ECDSA P-256 (cosign's default).
        #[arg(long)]
        ed25519: bool,
    },
}

#[derive(Subcommand)]
pub enum BundleCmd {
    /// Write IMAGE to a bundle file: the manifest, config and the chunks of its layers,
    /// less every chunk the layers of --since hold.
    Create {
        /// The image to carry (stored here).
        image: String,
        /// An older image the receiving nodes hold: its chunks are left out.
        #[arg(long)]
        since: Option<String>,
        /// os/arch[/variant] of a multi-platform image (default: this machine's).
        #[arg(long)]
        platform: Option<String>,
        /// The bundle file to write.
        #[arg(short = 'o', long = "output")]
        output: PathBuf,
    },
    /// Rebuild and store the image in a bundle (every layer checked against its diff_id).
    Load {
        /// The bundle file.
        file: PathBuf,
    },
    /// Show what a bundle holds.
    Inspect {
        /// The bundle file.
        file: PathBuf,
        /// table, json or yaml.
        #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
        output: Format,
    },
}

pub(super) fn bundle(data: &Path, cmd: &BundleCmd) -> Result<i32> {
    use skiff_model::format_bytes;
    match cmd {
        BundleCmd::Create { image, since, platform, output } => {
            let platform = platform.as_deref().map(skiff_image::registry::parse_platform).transpose()?;
            let store = skiff_image::ImageStore::open(data.join("images"))?;
            eprintln!("bundling {image}{} ...", since.as_ref().map(|s| format!(" --since {s}")).unwrap_or_default());
            let h = store.bundle_create(image, since.as_deref(), platform.as_ref(), output)?;
            outln!(
                "wrote {}: {} ({}), {} of {} in {} chunks ({} compressed)",
                output.display(),
                h.reference,
                h.platform,
                format_bytes(h.carried_bytes),
                format_bytes(h.tar_bytes()),
                h.carried_chunks,
                format_bytes(h.carried_compressed),
            );
        }
        BundleCmd::Load { file } => {
            let store = skiff_image::ImageStore::open(data.join("images"))?;
            eprintln!("loading bundle {} ...", file.display());
            let l = store.bundle_load(file)?;
            outln!(
                "Loaded image: {} ({} layers rebuilt: {} from the bundle, {} reused from this node; {} already here)",
                l.reference,
                l.layers_rebuilt,
                format_bytes(l.bytes_from_bundle),
                format_bytes(l.bytes_reused),
                l.layers_present,
            );
        }
        BundleCmd::Inspect { file, output: f } => {
            let (h, size) = skiff_image::bundle::inspect(file)?;
            if !f.is_table() {
                return output::structured(&h, *f).map(|()| 0);
            }
            outln!("image:     {} ({})", h.reference, h.platform);
            outln!("manifest:  {}", h.manifest);
            match &h.since {
                Some(s) => outln!("since:     {} ({})", s.reference, s.manifest),
                None => outln!("since:     - (a complete image)"),
            }
            outln!("layers:    {} ({} uncompressed)", h.layers.len(), format_bytes(h.tar_bytes()));
            outln!(
                "carries:   {} chunks, {} ({} compressed); file {}",
                h.carried_chunks,
                format_bytes(h.carried_bytes),
                format_bytes(h.carried_compressed),
                format_bytes(size)
            );
        }
    }
    Ok(0)
}

/// Pull settings for the CLI: the registries config (`--registries`, else the default
/// path when it exists) and progress on stderr.
pub fn pull_options(cli: &Cli) -> Result<skiff_image::registry::PullOptions> {
    use skiff_image::hosts::{RegistriesConfig, DEFAULT_PATH};
    let registries = match &cli.registries {
        Some(p) => RegistriesConfig::load(p, true)?,
        None => RegistriesConfig::load(Path::new(DEFAULT_PATH), false)?,
    };
    Ok(skiff_image::registry::PullOptions {
        registries,
        progress: crate::progress::pull_progress(),
        ..Default::default()
    })
}

/// `--limit-rate`: a positive size per second (`500K`, `2M`, `1048576`).
pub(super) fn parse_rate(s: &str) -> Result<u64, String> {
    match skiff_model::parse_bytes(s) {
        Ok(0) => Err("must be more than 0 bytes per second".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

pub(super) fn image(data: &Path, cmd: &ImageCmd) -> Result<i32> {
    let store = skiff_image::ImageStore::open(data.join("images"))?;
    match cmd {
        ImageCmd::Load { file, tag } => {
            eprintln!("loading {} ...", file.display());
            for r in store.load(file, tag.as_deref())? {
                outln!("Loaded image: {r}");
            }
        }
        ImageCmd::Ls { output: f } => {
            let v = store.list()?;
            output::print(&v, *f, &["REFERENCE", "PLATFORM", "DIGEST", "SIZE"], |i| {
                vec![
                    i.reference.clone(),
                    i.platform.clone(),
                    i.digest.chars().take(19).collect(),
                    skiff_model::format_bytes(i.size),
                ]
            })?;
        }
        ImageCmd::Rm { reference } => {
            store.remove(reference, &skiff_agent::state::images_in_use(data)?)?;
            outln!("Untagged: {reference}");
        }
        ImageCmd::Tag { source, target } => {
            if target.contains('@') {
                // A digest names content: it cannot be given to other content.
                anyhow::bail!("TARGET {target:?}: a tag cannot carry a digest (name[:tag])");
            }
            skiff_image::reference::validate_reference(target).map_err(|e| anyhow::anyhow!("TARGET: {e}"))?;
            let digest = store.top_digest(source)?;
            store.tag(target, &digest)?;
            outln!("{} -> {digest}", skiff_image::reference::normalize_reference(target));
        }
        ImageCmd::Inspect { reference } => {
            outln!("{}", serde_json::to_string_pretty(&store.inspect(reference)?)?);
        }
        ImageCmd::Pull { .. } | ImageCmd::Sign { .. } | ImageCmd::Verify { .. } => {}
        ImageCmd::Keygen { output, ed25519 } => keygen(output, *ed25519)?,
        ImageCmd::Save { references, output } => {
            store.save(references, output)?;
            outln!("saved {} image(s) to {}", references.len(), output.display());
        }
        ImageCmd::Prune => {
            let freed = store.gc()?;
            outln!("freed {}", skiff_model::format_bytes(freed));
        }
    }
    Ok(0)
}

/// `skiff image keygen`: a key pair for `skiff image sign` (refuses to overwrite).
fn keygen(prefix: &Path, ed25519: bool) -> Result<()> {
    let private = skiff_image::trust::PrivateKey::generate_pem(ed25519)?;
    let public = skiff_image::trust::PrivateKey::from_pem(&private)?.public_pem;
    let with = |ext: &str| {
        let mut p = prefix.as_os_str().to_owned();
        p.push(ext);
        PathBuf::from(p)
    };
    let (key_path, pub_path) = (with(".key"), with(".pub"));
    for p in [&key_path, &pub_path] {
        anyhow::ensure!(!p.exists(), "{} exists; not overwriting it", p.display());
    }
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&key_path)
        .map_err(|e| anyhow::anyhow!("{}: {e}", key_path.display()))?;
    f.write_all(private.as_bytes())?;
    std::fs::write(&pub_path, public).map_err(|e| anyhow::anyhow!("{}: {e}", pub_path.display()))?;
    outln!("Private key written to {}", key_path.display());
    outln!("Public key written to {}", pub_path.display());
    Ok(())
}

fn read_text(p: &Path) -> Result<String> {
    std::fs::read_to_string(p).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))
}

/// `skiff image sign` and `skiff image verify`: signatures in the registry.
async fn signatures(cli: &Cli, cmd: &ImageCmd) -> Result<i32> {
    use skiff_image::trust::{PrivateKey, PublicKey, Verdict};
    let mut opts = pull_options(cli)?;
    match cmd {
        ImageCmd::Sign { reference, key, cert, insecure_registry } => {
            let key =
                PrivateKey::from_pem(&read_text(key)?).map_err(|e| anyhow::anyhow!("--key {}: {e}", key.display()))?;
            opts.insecure = insecure_registry.clone();
            let r = match cert {
                Some(c) => skiff_image::registry::sign_notation(reference, &key, &read_text(c)?, &opts)
                    .await
                    .map_err(|e| anyhow::anyhow!("--cert {}: {e}", c.display()))?,
                None => skiff_image::registry::sign(reference, &key, &opts).await?,
            };
            if r.added {
                let how = if cert.is_some() { " with Notation" } else { "" };
                outln!("Signed {} ({}){how}: {}", reference, r.digest, r.signature_ref);
            } else {
                outln!("{} ({}) already carries this key's signature: {}", reference, r.digest, r.signature_ref);
            }
            Ok(0)
        }
        ImageCmd::Verify { reference, key, trust_store, trusted_identity, any_identity, insecure_registry } => {
            let keys = key
                .iter()
                .map(|k| PublicKey::from_pem(&read_text(k)?).map_err(|e| anyhow::anyhow!("--key {}: {e}", k.display())))
                .collect::<Result<Vec<_>>>()?;
            let identity = if *any_identity {
                skiff_image::trust::IdentityCheck::Any
            } else {
                skiff_image::trust::IdentityCheck::Repository
            };
            let notation = if trust_store.is_empty() {
                None
            } else {
                let mut roots = vec![];
                for f in trust_store {
                    roots.extend(
                        skiff_image::notation::Certificate::from_pem_bundle(&read_text(f)?)
                            .map_err(|e| anyhow::anyhow!("--trust-store {}: {e}", f.display()))?,
                    );
                }
                let identities = trusted_identity
                    .iter()
                    .map(|i| {
                        skiff_image::notation::Identity::parse(i)
                            .map_err(|e| anyhow::anyhow!("--trusted-identity: {e}"))
                    })
                    .collect::<Result<Vec<_>>>()?;
                Some(skiff_image::notation::TrustPolicy { roots, identities })
            };
            let rule = skiff_image::policy::Rule {
                pattern: "**".into(),
                mode: skiff_image::policy::Mode::Enforce,
                keys,
                identity,
                notation,
            };
            opts.insecure = insecure_registry.clone();
            opts.progress = std::sync::Arc::new(|_| {});
            let (digest, j) = skiff_image::registry::verify(reference, &rule, &opts).await?;
            match j.verdict {
                Verdict::Verified { key } => {
                    outln!("{reference} ({digest}): verified, signed by {key}");
                    Ok(0)
                }
                Verdict::Rejected(why) => {
                    eprintln!("{reference} ({digest}): NOT verified: {why}");
                    Ok(1)
                }
            }
        }
        _ => image(&cli.data, cmd),
    }
}

/// `skiff image pull`: into this machine's store, with its own flags over `--registries`.
pub(super) async fn pull(cli: &Cli, cmd: &ImageCmd) -> Result<i32> {
    let ImageCmd::Pull { reference, platform, insecure_registry, limit_rate, max_concurrent_downloads } = cmd else {
        return signatures(cli, cmd).await;
    };
    let store = std::sync::Arc::new(skiff_image::ImageStore::open(cli.data.join("images"))?);
    let mut opts = pull_options(cli)?;
    // The node's image rules apply to what is pulled into its store by hand too.
    let policy = skiff_image::policy::ImagePolicy::load(Path::new(skiff_agent::policy::DEFAULT_PATH), false)
        .map_err(|e| anyhow::anyhow!(e))?;
    if !policy.rules.is_empty() {
        opts.policy = Some(std::sync::Arc::new(policy));
    }
    opts.platform = platform.as_deref().map(skiff_image::registry::parse_platform).transpose()?;
    opts.insecure = insecure_registry.clone();
    opts.limit_rate = *limit_rate;
    opts.parallel = usize::from(*max_concurrent_downloads);
    let r = skiff_image::registry::pull(store, reference, &opts).await?;
    outln!(
        "{} {} from {} ({} fetched, {} already present, {} received)",
        r.reference,
        r.digest,
        r.endpoint,
        r.blobs_fetched,
        r.blobs_present,
        skiff_model::format_bytes(r.bytes_received)
    );
    Ok(0)
}
