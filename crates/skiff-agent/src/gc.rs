//! Step *gc*: what no instance needs goes — unused images when the disk passes the
//! high-water mark (never one of a desired deployment or of an instance still on the
//! node), compiled wasm programs of images that are gone, and an image an update left
//! behind once nothing runs on it.

use crate::{blocking, Agent};
use skiff_image::Target;
use skiff_model::{Deployment, RuntimeKind};
use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use tracing::{debug, info, warn};

impl Agent {
    /// Prunes unused images when the disk is above the high-water mark; images of desired
    /// deployments and of every instance still on the node (an old version being replaced
    /// runs on its layers) are never removed.
    pub async fn prune_images(self: &Arc<Self>) -> Option<skiff_image::Pruned> {
        let policy = self.cfg.image_gc?;
        let mut in_use: std::collections::BTreeSet<String> =
            self.db(|s| s.desired()).ok()?.into_iter().map(|d| d.image).collect();
        in_use.extend(self.db(|s| s.instances()).ok()?.into_iter().map(|r| r.spec.image));
        let images = Arc::clone(&self.images);
        match blocking(move || images.prune_to_watermark(&policy, &in_use)).await {
            Ok(Some(p)) => {
                let msg = format!(
                    "disk {:.0}% used (high-water mark {}%): removed {} unused image(s) [{}], freed {}; now {:.0}%",
                    p.used_percent_before,
                    policy.high_percent,
                    p.removed.len(),
                    p.removed.join(", "),
                    skiff_model::format_bytes(p.freed_bytes),
                    p.used_percent_after
                );
                info!("{msg}");
                self.event(&self.cfg.node_name, "ImagesPruned", &msg);
                Some(p)
            }
            Ok(None) => None,
            Err(e) => {
                warn!(error = %e, "image pruning failed");
                None
            }
        }
    }

    /// Removes the anonymous volumes of slots whose deployment is no longer on the node
    /// (neither desired nor with an instance left).
    pub async fn prune_anonymous_volumes(self: &Arc<Self>) {
        let (Ok(desired), Ok(rows)) = (self.db(|s| s.desired()), self.db(|s| s.instances())) else { return };
        let mut kept: HashSet<String> = desired.into_iter().map(|d| d.name).collect();
        kept.extend(rows.into_iter().map(|r| r.deployment));
        let dir = self.cfg.data_dir.join("volumes").join(crate::start::ANONYMOUS);
        let removed = blocking(move || {
            let mut removed = vec![];
            for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                let owner = e.file_name().to_string_lossy().to_string();
                let deployment = owner.rsplit_once('-').map_or(owner.as_str(), |(d, _)| d);
                if !kept.contains(deployment) && std::fs::remove_dir_all(e.path()).is_ok() {
                    removed.push(owner);
                }
            }
            removed
        })
        .await;
        if !removed.is_empty() {
            info!(slots = %removed.join(", "), "anonymous volumes of deployments gone from the node removed");
        }
    }

    /// Removes compiled WebAssembly programs that no desired deployment or instance runs,
    /// and those of another wasmtime build (after an upgrade). Returns the bytes freed.
    pub async fn prune_wasm_cache(self: &Arc<Self>) -> u64 {
        let (Ok(desired), Ok(rows)) = (self.db(|s| s.desired()), self.db(|s| s.instances())) else { return 0 };
        let wasm: Vec<Deployment> = desired
            .into_iter()
            .chain(rows.into_iter().map(|r| r.spec))
            .filter(|d| d.runtime == RuntimeKind::Wasm)
            .collect();
        let me = Arc::clone(self);
        blocking(move || {
            let keep: HashSet<String> = wasm
                .iter()
                .filter_map(|d| {
                    let info = me.images.inspect_for(&d.image, Target::Wasm).ok()?;
                    me.wasm_module(d, &info).ok().map(|m| m.id)
                })
                .collect();
            // Admission's memory of checked programs goes only as far as the cache does.
            if let Ok(mut checked) = me.wasm_checked.lock() {
                checked.retain(|id, _| keep.contains(id));
            }
            skiff_runtime::wasm::prune_cache(&me.cfg.data_dir.join("wasm/cache"), |id| keep.contains(id))
        })
        .await
    }

    /// Delete-then-download: removes an image that no instance and no desired deployment
    /// of the node uses any more.
    pub(crate) fn drop_unused_image(&self, image: &str) {
        let (Ok(rows), Ok(desired)) = (self.db(|s| s.instances()), self.desired()) else { return };
        let mut in_use: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let users = rows.iter().map(|r| (&r.spec.image, &r.name)).chain(desired.iter().map(|d| (&d.image, &d.name)));
        for (image, user) in users {
            in_use.entry(skiff_image::normalize_reference(image)).or_default().push(user.clone());
        }
        match self.images.remove(image, &in_use) {
            Ok(()) => self.event(image, "ImageRemoved", "deleted before its replacement downloads"),
            Err(e) => debug!(image, error = %e, "image kept"),
        }
    }
}
