//! Signed images: the `images:` rules of the node's policy applied to what it runs.
//!
//! A pull checks the signatures before it downloads any layer and refuses an image a rule
//! enforces and no trusted key signed (`skiff_image::registry`); the signatures it read
//! are kept beside the image. Before an instance starts, the image in the store is judged
//! again with those kept signatures — an image loaded from a file, or pulled before the
//! rule existed, meets the same rule, offline too. Every refusal is an `Untrusted` event
//! naming the image, its digest and the reason; under `warn` the event is recorded once
//! per image digest and the image runs. Verified images are remembered per name and digest.

use crate::Agent;
use skiff_image::trust::{Judgement, Verdict};

impl Agent {
    /// The node's image rules (none: no image is checked).
    pub fn image_policy(&self) -> &skiff_image::policy::ImagePolicy {
        &self.cfg.policy.image_policy
    }

    /// Judges the stored image `image` for `instance`: `Err` with the message to show when
    /// the policy refuses it. Verified images are remembered per name and digest. An image stored
    /// without signatures (pulled before this version kept them) has them fetched from its
    /// registry, when this node pulls, and kept.
    pub(crate) async fn judge_stored(&self, instance: &str, image: &str) -> Result<(), String> {
        let policy = self.image_policy();
        if policy.rules.is_empty() {
            return Ok(());
        }
        let digest = self.images.top_digest(image).unwrap_or_default();
        // Remembered per name and digest: the same digest under another name may meet
        // another rule.
        let key = format!("{digest} {image}");
        if self.trusted.lock().is_ok_and(|t| t.contains(&key)) {
            return Ok(());
        }
        let named = !image.starts_with("sha256:") && !image.contains('@');
        if let (Some(opts), Ok(true), true) = (
            &self.cfg.pull,
            self.images.signatures(&digest).map(|s| s.is_empty()),
            named && policy.rule_for(image).is_some(),
        ) {
            match skiff_image::registry::signatures(image, &digest, opts).await {
                Ok(sigs) if !sigs.is_empty() => {
                    if let Err(e) = self.images.put_signatures(&digest, &sigs) {
                        tracing::warn!("{image}: keeping its signatures: {e}");
                    }
                }
                Ok(_) => {}
                Err(e) => tracing::debug!("{image}: no signatures from the registry: {e}"),
            }
        }
        let judgement = match self.images.judge(image, policy) {
            Ok(None) => return Ok(()),
            Ok(Some(j)) => j,
            Err(e) => Judgement {
                mode: skiff_image::policy::Mode::Enforce,
                verdict: Verdict::Rejected(format!("its signatures cannot be read: {e}")),
            },
        };
        let verified = matches!(judgement.verdict, Verdict::Verified { .. });
        let res = self.record_judgement(instance, image, &digest, &judgement);
        if verified {
            if let Ok(mut t) = self.trusted.lock() {
                t.insert(key);
            }
        }
        res
    }

    /// Turns a judgement into events: a refusal each time, a warning once per digest.
    /// (Verified images are remembered by [`Agent::judge_stored`], per name and digest.)
    pub(crate) fn record_judgement(
        &self,
        instance: &str,
        image: &str,
        digest: &str,
        j: &Judgement,
    ) -> Result<(), String> {
        match &j.verdict {
            Verdict::Verified { .. } => Ok(()),
            Verdict::Rejected(reason) if j.allows() => {
                let first = self.warned.lock().is_ok_and(|mut w| w.insert(digest.to_string()));
                if first {
                    let msg = format!(
                        "{image} ({digest}): {reason}; running it because the image policy ({}) only warns",
                        self.image_policy().source_name()
                    );
                    self.event(instance, "Untrusted", &msg);
                }
                Ok(())
            }
            Verdict::Rejected(reason) => {
                let msg = format!(
                    "image {image} ({digest}) is refused by the image policy ({}): {reason}",
                    self.image_policy().source_name()
                );
                self.event(instance, "Untrusted", &msg);
                Err(msg)
            }
        }
    }
}
