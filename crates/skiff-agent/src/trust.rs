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
use skiff_image::policy::{ImagePolicy, RawNotation, RawRule};
use skiff_image::trust::{Judgement, Verdict};
use skiff_model::Deployment;

/// A deployment's own signature rule (`signature:`) as an image policy of one rule for
/// its image; `Err` names the field when a key or certificate does not parse
/// (`signature.keys[0]: ...`).
pub(crate) fn deployment_policy(d: &Deployment) -> Result<Option<ImagePolicy>, String> {
    let Some(s) = &d.signature else { return Ok(None) };
    let raw = RawRule {
        pattern: Some("**".into()),
        mode: s.mode.clone(),
        keys: s.keys.clone(),
        identity: s.identity.clone(),
        notation: s
            .notation
            .as_ref()
            .map(|n| RawNotation { trust_store: n.trust_store.clone(), identities: n.identities.clone() }),
    };
    let source = Some(format!("deployment {}", d.name).into());
    let no_files = |_: &std::path::Path| -> std::io::Result<String> {
        Err(std::io::Error::other("a deployment carries keys as PEM text, not file names"))
    };
    ImagePolicy::from_rule(&raw, "signature", source, no_files).map(Some)
}

impl Agent {
    /// The node's image rules (none: no image is checked).
    pub fn image_policy(&self) -> &skiff_image::policy::ImagePolicy {
        &self.cfg.policy.image_policy
    }

    /// Judges the stored image `image` for `instance`: `Err` with the message to show when
    /// the policy refuses it. Verified images are remembered per name and digest. An image stored
    /// without signatures (pulled before this version kept them) has them fetched from its
    /// registry, when this node pulls, and kept.
    pub(crate) async fn judge_stored(&self, instance: &str, d: &Deployment) -> Result<(), String> {
        let image = d.image.as_str();
        self.judge_by(instance, image, self.image_policy(), true).await?;
        self.judge_deployment(instance, d).await
    }

    /// Judges the stored image of `d` by the deployment's own rule, when it has one (not
    /// remembered: it may change with the deployment; judging kept signatures is local).
    pub(crate) async fn judge_deployment(&self, instance: &str, d: &Deployment) -> Result<(), String> {
        match deployment_policy(d)? {
            Some(p) => self.judge_by(instance, &d.image, &p, false).await,
            None => Ok(()),
        }
    }

    /// Judges the stored `image` by `policy` (the node's, or a deployment's);
    /// `remember` keeps a verification for the next start.
    async fn judge_by(&self, instance: &str, image: &str, policy: &ImagePolicy, remember: bool) -> Result<(), String> {
        if policy.rules.is_empty() {
            return Ok(());
        }
        let digest = self.images.top_digest(image).unwrap_or_default();
        // Remembered per name and digest: the same digest under another name may meet
        // another rule.
        let key = format!("{digest} {image}");
        if remember && self.trusted.lock().is_ok_and(|t| t.contains(&key)) {
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
        let res = self.record_judgement(instance, image, &digest, &judgement, &policy.source_name());
        if verified && remember {
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
        source: &str,
    ) -> Result<(), String> {
        match &j.verdict {
            Verdict::Verified { .. } => Ok(()),
            Verdict::Rejected(reason) if j.allows() => {
                let first = self.warned.lock().is_ok_and(|mut w| w.insert(digest.to_string()));
                if first {
                    let msg = format!(
                        "{image} ({digest}): {reason}; running it because the image policy ({source}) only warns"
                    );
                    self.event(instance, "Untrusted", &msg);
                }
                Ok(())
            }
            Verdict::Rejected(reason) => {
                let msg = format!("image {image} ({digest}) is refused by the image policy ({source}): {reason}");
                self.event(instance, "Untrusted", &msg);
                Err(msg)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_deployment_rule_that_does_not_parse_names_its_field() {
        let mut d = Deployment::new("web", "img:1");
        assert_eq!(deployment_policy(&d), Ok(None));
        let garbage = "-----BEGIN PUBLIC KEY-----\nnot base64\n-----END PUBLIC KEY-----\n";
        d.signature = Some(skiff_model::SignatureRule { keys: vec![garbage.into()], ..Default::default() });
        let e = deployment_policy(&d).unwrap_err();
        assert!(e.starts_with("signature.keys[0]: "), "{e}");
        let key =
            skiff_image::trust::PrivateKey::from_pem(&skiff_image::trust::PrivateKey::generate_pem(false).unwrap())
                .unwrap()
                .public_pem;
        d.signature =
            Some(skiff_model::SignatureRule { keys: vec![key], mode: Some("warn".into()), ..Default::default() });
        let p = deployment_policy(&d).unwrap().unwrap();
        assert_eq!((p.rules[0].mode, p.source_name()), (skiff_image::policy::Mode::Warn, "deployment web".to_string()));
    }
}
