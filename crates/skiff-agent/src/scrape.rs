//! Workloads' own metrics: an instance whose deployment asks for it (`Deployment::scrape`,
//! from Prometheus' `prometheus.io/*` annotations or labels) is read over HTTP at every
//! metrics interval, in the Prometheus text format, and the series some autoscaler uses
//! (the names the hub sends with the assignment) ride along with the next sample.
//!
//! The text comes from the workload, which may be hostile: the body is read up to
//! [`MAX_BODY`] within a timeout, parsed by [`parse_exposition`] (which skips what does
//! not parse and bounds labels), and at most [`MAX_SERIES`] series are kept per instance.
//! Counters are shipped as their value (no rate is taken).

use crate::state::InstanceRow;
use crate::Agent;
use skiff_model::metrics::{parse_exposition, series_bytes, Series, MAX_SERIES, MAX_SERIES_BYTES};
use skiff_model::{InstanceState, NetworkMode};
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use tracing::debug;

/// The most of a metrics page that is read.
pub const MAX_BODY: usize = 1 << 20;
/// How long one page may take.
const TIMEOUT: Duration = Duration::from_secs(2);
/// The most series bytes one sample of the node carries (20 samples sent at once after a
/// reconnect stay well within the hub's frame limit).
const MAX_SAMPLE_SERIES_BYTES: usize = 16 << 10;

/// The series of `text` whose name is in `wanted`: at most [`MAX_SERIES`], and at most
/// [`MAX_SERIES_BYTES`] of names and labels (a sample must stay well within a frame).
pub fn parse(text: &str, wanted: &[String]) -> Vec<Series> {
    let mut bytes = 0;
    parse_exposition(text)
        .filter(|s| wanted.contains(&s.name))
        .take(MAX_SERIES)
        .take_while(|s| {
            bytes += series_bytes(s);
            bytes <= MAX_SERIES_BYTES
        })
        .collect()
}

/// Where the agent keeps the names to scrape.
pub(crate) const NAMES_KEY: &str = "scrape/names";

impl Agent {
    /// The metric names to scrape and ship (from the hub's assignment), kept for the next
    /// start.
    pub fn set_scraped_metrics(&self, names: Vec<String>) {
        if self.scrape_names.lock().is_ok_and(|n| *n == names) {
            return;
        }
        if let Ok(text) = serde_json::to_string(&names) {
            if let Err(e) = self.db(|s| s.set_meta(NAMES_KEY, &text)) {
                tracing::warn!(error = %e, "keeping the names of the metrics to scrape");
            }
        }
        self.set_scraped_names(names);
    }

    pub(crate) fn set_scraped_names(&self, names: Vec<String>) {
        if let Ok(mut n) = self.scrape_names.lock() {
            *n = names;
        }
    }

    /// The series last scraped from the instance of `container_id`.
    pub(crate) fn scraped(&self, container_id: &str) -> Vec<Series> {
        self.scraped.lock().ok().and_then(|s| s.get(container_id).cloned()).unwrap_or_default()
    }

    /// Where an instance's metrics page is reached from the host.
    fn scrape_address(r: &InstanceRow, rows: &[InstanceRow], port: u16) -> Option<SocketAddr> {
        let ip_of = |row: &InstanceRow| row.ip.as_deref().and_then(|i| i.parse::<IpAddr>().ok());
        let ip = match r.spec.network {
            NetworkMode::Bridge => ip_of(r)?,
            NetworkMode::Host => IpAddr::V4(Ipv4Addr::LOCALHOST),
            NetworkMode::Service => {
                let owner = crate::network_owner(r);
                rows.iter().find(|o| o.name == owner).and_then(ip_of)?
            }
            _ => return None,
        };
        Some(SocketAddr::new(ip, port))
    }

    /// Scrapes every running instance that asks for it, while names are wanted; until
    /// `shutdown`.
    pub(crate) async fn scrape_loop(self: Arc<Self>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        // No redirects: a workload must not point the agent (in the host's network) anywhere
        // but at itself.
        let client =
            reqwest::Client::builder().timeout(TIMEOUT).no_proxy().redirect(reqwest::redirect::Policy::none()).build();
        let client = match client {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "no HTTP client: workloads' own metrics are not read");
                return;
            }
        };
        loop {
            self.scrape_once(&client).await;
            tokio::select! {
                _ = tokio::time::sleep(self.cfg.metrics_every) => {}
                _ = shutdown.changed() => return,
            }
        }
    }

    async fn scrape_once(&self, client: &reqwest::Client) {
        let wanted = self.scrape_names.lock().map(|n| n.clone()).unwrap_or_default();
        let rows = if wanted.is_empty() { vec![] } else { self.db(|s| s.instances()).unwrap_or_default() };
        let targets: Vec<(String, String, String)> = rows
            .iter()
            .filter(|r| r.state == InstanceState::Running)
            .filter_map(|r| {
                let s = r.spec.scrape.as_ref()?;
                let at = Self::scrape_address(r, &rows, s.port)?;
                Some((r.container_id.clone(), r.name.clone(), format!("http://{at}{}", s.path)))
            })
            .collect();
        // A few at a time: each page may hold up to MAX_BODY while it is read.
        use futures_util::StreamExt;
        let wanted = Arc::new(wanted);
        let jobs: Vec<(String, String)> = targets.iter().map(|(_, name, url)| (name.clone(), url.clone())).collect();
        let pages: Vec<Option<Vec<Series>>> = futures_util::stream::iter(jobs.into_iter().map(|(name, url)| {
            let (client, wanted) = (client.clone(), Arc::clone(&wanted));
            async move {
                match fetch(&client, &url).await {
                    Ok(text) => {
                        let series = parse(&text, &wanted);
                        debug!(instance = %name, %url, series = series.len(), "scraped its metrics");
                        Some(series)
                    }
                    Err(e) => {
                        debug!(instance = %name, %url, error = %e, "scraping its metrics");
                        None
                    }
                }
            }
        }))
        .buffered(4)
        .collect()
        .await;
        // The node's whole sample stays bounded too: instances past the budget ship none.
        let mut budget = MAX_SAMPLE_SERIES_BYTES;
        let found: HashMap<String, Vec<Series>> = targets
            .into_iter()
            .zip(pages)
            .filter_map(|((id, _, _), page)| {
                let page = page?;
                let size: usize = page.iter().map(series_bytes).sum();
                budget = budget.checked_sub(size)?;
                Some((id, page))
            })
            .collect();
        if let Ok(mut s) = self.scraped.lock() {
            *s = found;
        }
    }
}

/// The page at `url`, read up to [`MAX_BODY`] (what is past it is left unread).
async fn fetch(client: &reqwest::Client, url: &str) -> Result<String, String> {
    let mut resp = client.get(url).send().await.map_err(|e| e.to_string())?;
    if !resp.status().is_success() {
        return Err(format!("HTTP {}", resp.status()));
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| e.to_string())? {
        let room = MAX_BODY - body.len();
        body.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if body.len() >= MAX_BODY {
            break;
        }
    }
    Ok(String::from_utf8_lossy(&body).into_owned())
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_wanted_names_and_at_most_max_series() {
        let many: String = (0..1000).map(|i| format!("m{{i=\"{i}\"}} 1\nother 2\n")).collect();
        let got = super::parse(&many, &["m".to_string()]);
        assert_eq!(got.len(), super::MAX_SERIES);
        assert!(got.iter().all(|s| s.name == "m"));
        assert!(super::parse(&many, &[]).is_empty());
    }
}
