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
        file: PathBuf,
        /// Name for an image whose archive does not name it.
        #[arg(long)]
        tag: Option<String>,
    },
    /// Pull an image from a registry (resumable, verified; the variant for this machine
    /// unless --platform says otherwise).
    Pull {
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
        #[arg(required = true)]
        references: Vec<String>,
        #[arg(short = 'o', long = "output")]
        output: PathBuf,
    },
    /// List images.
    Ls {
        #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
        output: Format,
    },
    /// Remove an image (refused while a deployment uses it).
    Rm { reference: String },
    /// Show an image's config and layers.
    Inspect { reference: String },
    /// Remove blobs and layers no image needs.
    Prune,
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
                println!("Loaded image: {r}");
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
            println!("Untagged: {reference}");
        }
        ImageCmd::Inspect { reference } => {
            println!("{}", serde_json::to_string_pretty(&store.inspect(reference)?)?);
        }
        ImageCmd::Pull { .. } => {}
        ImageCmd::Save { references, output } => {
            store.save(references, output)?;
            println!("saved {} image(s) to {}", references.len(), output.display());
        }
        ImageCmd::Prune => {
            let freed = store.gc()?;
            println!("freed {}", skiff_model::format_bytes(freed));
        }
    }
    Ok(0)
}

/// `skiff image pull`: into this machine's store, with its own flags over `--registries`.
pub(super) async fn pull(cli: &Cli, cmd: &ImageCmd) -> Result<i32> {
    let ImageCmd::Pull { reference, platform, insecure_registry, limit_rate, max_concurrent_downloads } = cmd else {
        return image(&cli.data, cmd);
    };
    let store = std::sync::Arc::new(skiff_image::ImageStore::open(cli.data.join("images"))?);
    let mut opts = pull_options(cli)?;
    opts.platform = platform.as_deref().map(skiff_image::registry::parse_platform).transpose()?;
    opts.insecure = insecure_registry.clone();
    opts.limit_rate = *limit_rate;
    opts.parallel = usize::from(*max_concurrent_downloads);
    let r = skiff_image::registry::pull(store, reference, &opts).await?;
    println!(
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
