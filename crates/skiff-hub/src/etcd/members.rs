//! The etcd members a hub talks to: a client of each, and the one in use. Every request,
//! watch and keep-alive goes to the member in use; one that fails there as a lost, hung or
//! cut-off member does (no connection, no answer within [`TIMEOUT`], no leader) moves the
//! hub to the next member, and what comes after goes there.
//!
//! Not one channel balanced over all members: it sends each request to a member picked
//! at random among those whose connection is up, and a hung member's connection stays up
//! (SIGSTOP, a machine that froze, a link that drops packets without a reset): one request
//! in three went to it again, each lost for [`TIMEOUT`].
//!
//! HTTP/2 pings on connections with requests or watches open find a hung member's
//! connection dead within [`PING_EVERY`] + [`TIMEOUT`], so a watch on it breaks and is made
//! again on the next member. (No pings on idle connections: etcd refuses a client that pings
//! without open streams, by default.)

use super::TIMEOUT;
use etcd_client::{Client, ConnectOptions};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// How often a connection with requests or watches open is pinged (etcd's default
/// `--grpc-keepalive-min-time` is 5 s: pinged more often, it closes the connection).
pub(super) const PING_EVERY: Duration = Duration::from_secs(10);

pub(super) struct Members {
    /// Each member's endpoint and a client of it alone.
    each: Vec<(String, Client)>,
    /// The index of the member in use.
    in_use: AtomicUsize,
}

impl Members {
    /// A client of each endpoint (connecting in the background); the one used first is
    /// picked at random, so a store's hubs spread over the members.
    pub(super) async fn connect(
        endpoints: &[String],
        opts: ConnectOptions,
        first: usize,
    ) -> Result<Members, etcd_client::Error> {
        let opts = opts
            .with_keep_alive(PING_EVERY, TIMEOUT)
            .with_keep_alive_while_idle(false)
            // A member cut off from most of the others says so at once ("no leader"),
            // rather than holding the request until the timeout.
            .with_require_leader(true);
        let mut each = Vec::with_capacity(endpoints.len());
        for e in endpoints {
            each.push((e.clone(), Client::connect([e.as_str()], Some(opts.clone())).await?));
        }
        if each.is_empty() {
            return Err(etcd_client::Error::InvalidArgs("no etcd endpoints".into()));
        }
        let n = each.len();
        Ok(Members { each, in_use: AtomicUsize::new(first % n) })
    }

    /// The member in use: its index (to say which one failed) and its client.
    pub(super) fn current(&self) -> (usize, Client) {
        let i = self.in_use.load(Ordering::Acquire) % self.each.len();
        (i, self.each[i].1.clone())
    }

    /// Member `i` failed a request as a lost or hung member does: the next one is used
    /// (unless another caller moved on from `i` already).
    pub(super) fn failed(&self, i: usize, why: &str) {
        let n = self.each.len();
        if n > 1 && self.in_use.compare_exchange(i, (i + 1) % n, Ordering::AcqRel, Ordering::Acquire).is_ok() {
            let (from, to) = (&self.each[i].0, &self.each[(i + 1) % n].0);
            tracing::info!(%from, %to, %why, "etcd member failed a request; moving to the next one");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_failed_member_moves_everyone_to_the_next_once() {
        let eps: Vec<String> =
            ["http://127.0.0.1:1", "http://127.0.0.1:2", "http://127.0.0.1:3"].map(String::from).into();
        let m = Members::connect(&eps, ConnectOptions::new(), 4).await.unwrap();
        assert_eq!(m.current().0, 1, "the first one picked, within the members");
        m.failed(1, "test");
        assert_eq!(m.current().0, 2);
        // A caller that saw member 1 fail too, late: no second move.
        m.failed(1, "test");
        assert_eq!(m.current().0, 2);
        m.failed(2, "test");
        assert_eq!(m.current().0, 0, "round the members");
        let one = Members::connect(&eps[..1], ConnectOptions::new(), 0).await.unwrap();
        one.failed(0, "test");
        assert_eq!(one.current().0, 0);
    }
}
