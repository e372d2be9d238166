//! `skiff hub` on a shared store: each second, asks every other hub of the store what its
//! nodes are (what changed since it last asked; see `skiff_hub::fleet::PeerState`), and
//! wakes this hub's own nodes when the store's revision moves (a placement the hub that
//! leads stored reaches every hub's nodes so): at once where the store says so (etcd's
//! watch), else at the next second.
//!
//! Hubs reach each other as the CLI reaches them: over TLS pinned to the fleet's CA, with
//! the admin token; a node's certificate, for client authentication only, does not pass
//! for a hub's.

use skiff_hub::fleet::{Fleet, PeerState};
use std::sync::Arc;
use std::time::Duration;

/// How often every other hub is asked.
const EVERY: Duration = Duration::from_secs(1);

/// Runs until aborted. `me`: this hub's own URL (not asked).
pub async fn run(fleet: Arc<Fleet>, me: String, token: String) {
    tokio::join!(ask_peers(Arc::clone(&fleet), me, token), follow_store(fleet));
}

/// Wakes this hub's nodes as soon as the store's revision moves (a placement the hub
/// that leads stored), not at the next question to the other hubs.
async fn follow_store(fleet: Arc<Fleet>) {
    let mut moved = skiff_hub::controllers::StoreMoves::new(fleet.store_revisions());
    if !moved.says() {
        return;
    }
    loop {
        moved.next().await;
        let f = Arc::clone(&fleet);
        let _ = tokio::task::spawn_blocking(move || f.revision_changed()).await;
    }
}

/// Asks every other hub each second what changed among its nodes.
async fn ask_peers(fleet: Arc<Fleet>, me: String, token: String) {
    let http = match client(&fleet) {
        Ok(h) => h,
        Err(e) => {
            tracing::error!("the client for the other hubs: {e:#}; this hub learns nothing of their nodes");
            return;
        }
    };
    let hubs = fleet.hubs();
    // Peers that failed last time (said once, and again once they answer).
    let mut failing: std::collections::BTreeSet<String> = Default::default();
    let mut tick = tokio::time::interval(EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let f = Arc::clone(&fleet);
        let _ = tokio::task::spawn_blocking(move || f.revision_changed()).await;
        let others: Vec<String> = hubs.borrow().iter().filter(|h| **h != me).cloned().collect();
        let asks = others.iter().map(|peer| ask(&http, &fleet, peer, &token));
        let answers = futures_util::future::join_all(asks).await;
        for (peer, answer) in others.into_iter().zip(answers) {
            match answer {
                Ok(st) => {
                    if failing.remove(&peer) {
                        tracing::info!(%peer, "the hub answers again");
                    }
                    let f = Arc::clone(&fleet);
                    let _ = tokio::task::spawn_blocking(move || f.merge_peer_state(&peer, st)).await;
                }
                Err(e) => {
                    if failing.insert(peer.clone()) {
                        tracing::warn!(%peer, "asking the hub about its nodes: {e:#}");
                    }
                }
            }
        }
    }
}

/// One question to `peer`: what changed since the generation this hub last saw of it.
async fn ask(http: &reqwest::Client, fleet: &Fleet, peer: &str, token: &str) -> anyhow::Result<PeerState> {
    let (epoch, since) = fleet.peer_cursor(peer);
    let url = format!("{}/api/v1/hub/peer", peer.trim_end_matches('/'));
    let samples = if fleet.leads() { "true" } else { "false" };
    let since = since.to_string();
    let q = [("epoch", epoch.as_str()), ("since", since.as_str()), ("samples", samples)];
    let resp = http.get(url).query(&q).bearer_auth(token).send().await?.error_for_status()?;
    Ok(resp.json().await?)
}

/// Trusts the fleet's CA only; short timeouts, as a dead hub must not hold up the others.
fn client(fleet: &Fleet) -> anyhow::Result<reqwest::Client> {
    let cert = reqwest::Certificate::from_pem(fleet.ca.pem().as_bytes())?;
    Ok(reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(cert)
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(10))
        .build()?)
}
