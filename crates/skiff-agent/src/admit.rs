//! Admission: before a deployment is stored for this node (`skiff up`'s in-process hub),
//! the node says whether it can run it — its image is in the store for the deployment's
//! runtime or is pulled now, as `docker run` does, and a WebAssembly program compiles
//! (into the cache, so the first start is warm) with imports the runtime provides. A
//! deployment the node refuses is never stored.

use crate::Agent;
use skiff_image::{ImageError, Target};
use skiff_model::{Deployment, RuntimeKind};
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum AdmitError {
    #[error("{image} is not in the local store and pulling it failed: {pull}")]
    NotPulled { image: String, pull: ImageError },
    /// Stored, but not for this runtime's platform: that is the telling part.
    #[error("{stored}, and pulling it failed: {pull}")]
    WrongPlatform { stored: ImageError, pull: ImageError },
    #[error("{0}")]
    Untrusted(String),
    #[error("{0}")]
    Devices(String),
    /// The deployment's signature rule does not parse (a key, a certificate).
    #[error("{0}")]
    Signature(String),
    #[error("this node does not offer the {runtime} runtime: {why}")]
    RuntimeUnavailable { runtime: RuntimeKind, why: String },
    #[error("{image} is not a program the wasm runtime can run: {why}")]
    NotRunnable { image: String, why: String },
    #[error("{0}")]
    Init(String),
}

impl AdmitError {
    /// The deployment's field the refusal is about.
    pub fn field(&self) -> &'static str {
        match self {
            AdmitError::Devices(_) => "device_requests",
            AdmitError::Signature(_) => "signature",
            AdmitError::RuntimeUnavailable { .. } => "runtime",
            AdmitError::Init(_) => "init",
            _ => "image",
        }
    }
}

impl Agent {
    /// Makes sure `d`'s image is in the store for `d`'s runtime: present, or pulled now
    /// for that runtime's platform.
    pub async fn ensure_image(&self, d: &Deployment) -> Result<(), AdmitError> {
        let image = &d.image;
        let target = Target::from(d.runtime);
        let Err(stored) = self.images().inspect_for(image, target) else {
            return self.judge_stored(&d.name, d).await.map_err(AdmitError::Untrusted);
        };
        let mut opts = self.pull_options().cloned().unwrap_or_default();
        opts.platform = Some(target.platform());
        if !self.image_policy().rules.is_empty() {
            opts.policy = Some(Arc::clone(&self.cfg.policy.image_policy));
        }
        match skiff_image::registry::pull(Arc::clone(self.images()), image, &opts).await {
            Ok(rep) => {
                if let Some(j) = &rep.trust {
                    let source = self.image_policy().source_name();
                    self.record_judgement(&d.name, image, &rep.digest, j, &source).map_err(AdmitError::Untrusted)?;
                }
                // The deployment's own rule, with the signatures the pull kept.
                self.judge_deployment(&d.name, d).await.map_err(AdmitError::Untrusted)
            }
            Err(e @ ImageError::Untrusted { .. }) => {
                let msg = e.to_string();
                self.event(&d.name, "Untrusted", &msg);
                Err(AdmitError::Untrusted(msg))
            }
            Err(pull) => Err(match stored {
                ImageError::NotFound(_) => AdmitError::NotPulled { image: image.clone(), pull },
                stored => AdmitError::WrongPlatform { stored, pull },
            }),
        }
    }

    /// Whether this node can run `d` now: [`Agent::ensure_image`], then, for a wasm
    /// deployment, its program compiled and checked (on a blocking thread).
    pub async fn admit(self: &Arc<Self>, d: &Deployment) -> Result<(), AdmitError> {
        if let (RuntimeKind::Runsc, Err(why)) = (d.runtime, crate::runsc_status()) {
            return Err(AdmitError::RuntimeUnavailable { runtime: d.runtime, why: why.clone() });
        }
        self.check_devices(d).map_err(AdmitError::Devices)?;
        if d.init {
            skiff_runtime::oci::init_available().map_err(AdmitError::Init)?;
        }
        crate::trust::deployment_policy(d).map_err(AdmitError::Signature)?;
        self.ensure_image(d).await?;
        if d.runtime != RuntimeKind::Wasm {
            return Ok(());
        }
        let (me, d2) = (Arc::clone(self), d.clone());
        let checked = tokio::task::spawn_blocking(move || me.check_wasm(&d2)).await;
        let why = match checked {
            Ok(Ok(_)) => return Ok(()),
            Ok(Err(why)) => why,
            Err(e) => format!("the check did not finish: {e}"),
        };
        Err(AdmitError::NotRunnable { image: d.image.clone(), why })
    }

    /// Compiles `d`'s program into the cache and checks its imports and exports; says
    /// what the program is. The image must be in the store. A program is checked once
    /// per agent: the answer depends only on its content (its id) and this build.
    fn check_wasm(&self, d: &Deployment) -> Result<&'static str, String> {
        let info = self.images().resolve_for(&d.image, Target::Wasm).map_err(|e| e.to_string())?;
        let module = self.wasm_module(d, &info).map_err(|e| e.to_string())?;
        if let Some(kind) = self.wasm_checked.lock().ok().and_then(|c| c.get(&module.id).copied()) {
            return Ok(kind);
        }
        let kind = skiff_runtime::wasm::check(&module, &self.cfg.data_dir.join("wasm/cache"))?;
        if let Ok(mut c) = self.wasm_checked.lock() {
            c.insert(module.id, kind);
        }
        Ok(kind)
    }
}
