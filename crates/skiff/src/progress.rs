//! Pull progress on stderr: one bar per blob plus a total on a terminal (as `docker pull`
//! shows), plain lines otherwise (each blob at start, every quarter, and when verified).

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use skiff_image::registry::{Progress, PullEvent};
use std::collections::HashMap;
use std::io::IsTerminal;
use std::sync::{Arc, Mutex};

pub fn pull_progress() -> Progress {
    if std::io::stderr().is_terminal() {
        bars()
    } else {
        lines()
    }
}

fn short(digest: &str) -> &str {
    let hex = digest.trim_start_matches("sha256:");
    &hex[..hex.len().min(12)]
}

fn lines() -> Progress {
    // digest -> quarters already printed
    let seen: Mutex<HashMap<String, u64>> = Mutex::new(HashMap::new());
    Arc::new(move |ev: PullEvent<'_>| match ev {
        PullEvent::Note(l) => eprintln!("{l}"),
        PullEvent::Total { size, present } => eprintln!(
            "{} to fetch ({} already here)",
            skiff_model::format_bytes(size.saturating_sub(present)),
            skiff_model::format_bytes(present)
        ),
        PullEvent::Blob { digest, size, done } => {
            let Ok(mut seen) = seen.lock() else { return };
            let quarter = done.saturating_mul(4).checked_div(size).unwrap_or(4);
            let last = seen.get(digest).copied();
            if last.is_some_and(|q| quarter <= q) {
                return;
            }
            seen.insert(digest.to_string(), quarter);
            let s = short(digest);
            match (last, quarter) {
                (_, 4) if done == size => eprintln!("{s}: {} verified", skiff_model::format_bytes(size)),
                (None, _) if done > 0 => eprintln!(
                    "{s}: resuming at {} of {}",
                    skiff_model::format_bytes(done),
                    skiff_model::format_bytes(size)
                ),
                _ => eprintln!("{s}: {} of {}", skiff_model::format_bytes(done), skiff_model::format_bytes(size)),
            }
        }
    })
}

struct Bars {
    multi: MultiProgress,
    total: Option<ProgressBar>,
    blobs: HashMap<String, (ProgressBar, u64)>,
}

fn bars() -> Progress {
    let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
    let state = Mutex::new(Bars { multi, total: None, blobs: HashMap::new() });
    let blob_style = ProgressStyle::with_template("{prefix}: {wide_bar} {bytes}/{total_bytes} {msg}")
        .unwrap_or_else(|_| ProgressStyle::default_bar());
    let total_style =
        ProgressStyle::with_template("total       : {wide_bar} {bytes}/{total_bytes} {bytes_per_sec} {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar());
    Arc::new(move |ev: PullEvent<'_>| {
        let Ok(mut st) = state.lock() else { return };
        match ev {
            PullEvent::Note(l) => {
                let _ = st.multi.println(l);
            }
            PullEvent::Total { size, present } => {
                let bar = st.multi.add(ProgressBar::new(size).with_style(total_style.clone()));
                bar.set_position(present);
                st.total = Some(bar);
            }
            PullEvent::Blob { digest, size, done } => {
                let Bars { multi, total, blobs } = &mut *st;
                let (bar, last) = blobs.entry(digest.to_string()).or_insert_with(|| {
                    let bar =
                        ProgressBar::new(size).with_style(blob_style.clone()).with_prefix(short(digest).to_string());
                    let bar = match total {
                        Some(t) => multi.insert_before(t, bar),
                        None => multi.add(bar),
                    };
                    // Blobs already here were counted by `Total`; a resumed one was not.
                    if done == size {
                        bar.set_message("already here");
                        (bar, done)
                    } else {
                        (bar, 0)
                    }
                });
                if let Some(t) = total {
                    if done >= *last {
                        t.inc(done - *last);
                    }
                }
                *last = done;
                bar.set_position(done);
                if done == size {
                    if bar.message().is_empty() {
                        bar.set_message("verified");
                    }
                    bar.finish();
                }
                if total.as_ref().is_some_and(|t| t.position() >= t.length().unwrap_or(0)) {
                    if let Some(t) = total {
                        t.finish();
                    }
                }
            }
        }
    })
}

/// A spinner with a message on a terminal's stderr (the message once as a line
/// otherwise), for a wait of unknown length; gone when dropped.
pub fn waiting(message: &str) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        eprintln!("{message}");
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new_spinner().with_message(message.to_string());
    bar.enable_steady_tick(std::time::Duration::from_millis(120));
    bar
}

#[cfg(test)]
mod tests {
    #[test]
    fn short_digests() {
        assert_eq!(super::short("sha256:0123456789abcdef"), "0123456789ab");
        assert_eq!(super::short("abc"), "abc");
    }
}
