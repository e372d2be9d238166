//! Step *pull*: an image an instance needs and the store lacks is pulled in the
//! background, one pull per image, while the instance waits Pending with the pull's
//! progress as its message. A failed pull is retried after 5 s doubling to 5 min; the
//! loop is woken when a pull ends.

use crate::{Agent, PullState};
use skiff_image::Target;
use skiff_model::RuntimeKind;
use std::sync::Arc;

/// Wait after the `failures`-th failed pull of an image: 5 s doubling to 5 min.
pub(crate) fn pull_backoff_ms(failures: u32) -> u64 {
    (5_000u64 << failures.saturating_sub(1).min(6)).min(300_000)
}

impl Agent {
    /// Starts pulling `image` for `instance` unless a pull runs or failed recently; says
    /// what the instance waits for and when to look again.
    pub(crate) fn pull_missing(self: &Arc<Self>, instance: &str, image: &str, runtime: RuntimeKind) -> (String, u64) {
        let Some(mut opts) = self.cfg.pull.clone() else { return (format!("image {image} not found"), 5_000) };
        opts.platform = Some(Target::from(runtime).platform());
        let Ok(mut pulls) = self.pulls.lock() else { return ("image pulls: lock poisoned".into(), 5_000) };
        let now = self.now_ms();
        let failures = match pulls.get(image) {
            Some(PullState::Running) => return (format!("pulling {image}"), 1_000),
            Some(PullState::Failed { failures, retry_at_ms, error }) if *retry_at_ms > now => {
                let secs = (retry_at_ms - now).div_ceil(1000);
                return (format!("pulling {image} failed: {error}; trying again in {secs} s"), retry_at_ms - now);
            }
            Some(PullState::Failed { failures, .. }) => *failures,
            None => 0,
        };
        pulls.insert(image.to_string(), PullState::Running);
        drop(pulls);
        self.event(instance, "Pulling", image);
        let me = Arc::clone(self);
        let waiting = format!("pulling {image}");
        let (instance, image) = (instance.to_string(), image.to_string());
        tokio::spawn(async move {
            let res = skiff_image::registry::pull(Arc::clone(&me.images), &image, &opts).await;
            let state = match res {
                Ok(rep) => {
                    me.count_image_bytes(&rep);
                    let mut msg =
                        format!("{image} ({}) from {}, {} B received", rep.digest, rep.endpoint, rep.bytes_received);
                    if rep.bytes_from_cache > 0 || rep.bytes_reused > 0 {
                        msg += &format!(
                            " ({} B of them from the site cache; {} B reused from layers on this node)",
                            rep.bytes_from_cache, rep.bytes_reused
                        );
                    }
                    me.event(&instance, "Pulled", &msg);
                    if let Some(j) = &rep.trust {
                        let source = me.image_policy().source_name();
                        let _ = me.record_judgement(&instance, &image, &rep.digest, j, &source);
                    }
                    None
                }
                Err(e) => {
                    let error = skiff_image::error::with_causes(&e);
                    let reason = match e {
                        skiff_image::ImageError::Untrusted { .. } => "Untrusted",
                        _ => "PullFailed",
                    };
                    me.event(&instance, reason, &format!("{image}: {error}"));
                    let failures = failures + 1;
                    Some(PullState::Failed { failures, retry_at_ms: me.now_ms() + pull_backoff_ms(failures), error })
                }
            };
            if let Ok(mut pulls) = me.pulls.lock() {
                match state {
                    Some(s) => pulls.insert(image, s),
                    None => pulls.remove(&image),
                };
            }
            me.notify.notify_one();
        });
        (waiting, 1_000)
    }
}
