//! `skiff rollout status|history|undo` and `skiff autoscale simulate`.

use super::parse_ttl;
use crate::client::Client;
use crate::output::{self, Format};
use anyhow::{Context, Result};
use clap::Subcommand;
use skiff_model::rollout::{Revision, RolloutState, RolloutStatus};
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Subcommand)]
pub enum AutoscaleCmd {
    /// Print, as JSON, what the autoscaler decides for the situation in FILE (Kubernetes
    /// HPA semantics; see the README's reference).
    Simulate {
        /// The situation: the autoscaler's spec, replicas and metric samples (YAML or JSON).
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
    },
}

#[derive(Subcommand)]
pub enum RolloutCmd {
    /// Follow the newest revision's rollout until it completes (exit 0) or fails (exit 1).
    Status {
        /// The deployment.
        name: String,
        /// Print the state once instead of following it.
        #[arg(long)]
        no_wait: bool,
        /// Give up after this long, e.g. 90s or 10m (exit 1).
        #[arg(long, value_parser = parse_ttl, default_value = "10m")]
        timeout: u64,
        /// table, json or yaml.
        #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
        output: Format,
    },
    /// The deployment's revisions (the newest 10), oldest first.
    History {
        /// The deployment.
        name: String,
        /// table, json or yaml.
        #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
        output: Format,
    },
    /// Go back to the previous revision, or to --to-revision N.
    Undo {
        /// The deployment.
        name: String,
        /// The revision to go back to (`skiff rollout history NAME`); default: the one
        /// before the current.
        #[arg(long)]
        to_revision: Option<u64>,
    },
}

pub(super) fn rollout_line(s: &RolloutStatus) -> String {
    let mut line = format!(
        "{} revision {}: {} ({} of {} updated, {} ready, {} old)",
        s.deployment,
        s.revision,
        s.state.as_str(),
        s.updated,
        s.desired,
        s.ready,
        s.old
    );
    if let Some(m) = &s.message {
        line.push_str(&format!(": {m}"));
    }
    line
}

pub(super) async fn rollout(c: &Client, cmd: &RolloutCmd) -> Result<i32> {
    match cmd {
        RolloutCmd::Status { name, no_wait, timeout, output } => {
            let path = format!("/api/v1/deployments/{name}/rollout");
            let deadline = tokio::time::Instant::now() + Duration::from_secs(*timeout);
            let mut s: RolloutStatus = c.get(&path).await?;
            let pinned = s.revision;
            let mut last = String::new();
            loop {
                if s.revision != pinned {
                    // A newer revision (an automatic rollback, another apply): report how
                    // the followed one ended.
                    let h: Vec<Revision> = c.get(&format!("/api/v1/deployments/{name}/history")).await?;
                    let Some(r) = h.iter().find(|r| r.revision == pinned) else {
                        eprintln!("error: revision {pinned} of {name} is no longer in its history");
                        return Ok(1);
                    };
                    let why = r.message.as_deref().map(|m| format!(": {m}")).unwrap_or_default();
                    outln!("{name} revision {pinned}: {}{why}", r.state.as_str());
                    outln!(
                        "{name} revision {}: {} ({})",
                        s.revision,
                        s.state.as_str(),
                        h.last().map(|l| l.cause.as_str()).unwrap_or("")
                    );
                    return Ok(if r.state == RolloutState::Complete { 0 } else { 1 });
                }
                let line = rollout_line(&s);
                if !output.is_table() {
                    output::structured(&s, *output)?;
                } else if line != last {
                    outln!("{line}");
                }
                last = line;
                match s.state {
                    RolloutState::Complete => return Ok(0),
                    RolloutState::Failed | RolloutState::Superseded => return Ok(1),
                    RolloutState::Progressing if *no_wait => return Ok(0),
                    RolloutState::Progressing => {}
                }
                if tokio::time::Instant::now() >= deadline {
                    eprintln!("error: {name} did not finish its rollout within {timeout} s");
                    return Ok(1);
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
                s = c.get(&path).await?;
            }
        }
        RolloutCmd::History { name, output } => {
            let h: Vec<Revision> = c.get(&format!("/api/v1/deployments/{name}/history")).await?;
            output::print(&h, *output, &["REVISION", "TEMPLATE", "IMAGE", "STATE", "AGE", "CAUSE", "MESSAGE"], |r| {
                vec![
                    r.revision.to_string(),
                    r.template.clone(),
                    r.image.clone(),
                    r.state.as_str().to_string(),
                    output::age(Some(r.created_ms)),
                    r.cause.clone(),
                    r.message.clone().unwrap_or_default(),
                ]
            })?;
            Ok(0)
        }
        RolloutCmd::Undo { name, to_revision } => {
            let body = skiff_model::rollout::UndoRequest { to_revision: *to_revision };
            let r: Revision = c.post(&format!("/api/v1/deployments/{name}/undo"), &body).await?;
            outln!("{name} rolled back: revision {} ({}, {})", r.revision, r.image, r.cause);
            Ok(0)
        }
    }
}

/// `skiff autoscale simulate -f FILE`: what the autoscaler decides, as JSON.
pub(super) fn simulate(file: &Path) -> Result<i32> {
    use skiff_model::autoscale::{decide, Scenario};
    let text = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let scenario: Scenario =
        serde_json::from_str(&text).with_context(|| format!("{}: not a scenario", file.display()))?;
    let situation = scenario.check().with_context(|| format!("{}", file.display()))?;
    outln!("{}", serde_json::to_string_pretty(&decide(&situation))?);
    Ok(0)
}
