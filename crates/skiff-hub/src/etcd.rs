//! The hub's store on etcd (`skiff hub --store etcd://HOST:2379[,HOST:2379...][/PREFIX]`):
//! the same [`Store`] as SQLite, so any number of hubs can share one state.
//!
//! Layout, under the prefix (default `/skiff`), every value JSON:
//! `revision` (the store's own counter, bumped as SQLite's is), `deployments/NAME`,
//! `history/NAME` (a deployment's revisions, newest last), `progressing/NAME` (present
//! while its newest revision rolls out), `tokens/ID`, `nodes/NAME`, `revoked/SERIAL`,
//! `slots/DEPLOYMENT`, and `lock`, which every write rewrites.
//!
//! Every change is one etcd transaction, optimistic and serializable: the reads are made
//! at one etcd revision, and the commit succeeds only if `lock` is unchanged since then
//! (else the change is computed again from fresh reads, a bounded number of times). The
//! hub writes on changes, not heartbeats, so writers seldom meet.
//!
//! The trait is synchronous (as SQLite is); the client is async, so requests go to a
//! runtime of the store's own and the caller's thread waits for the answer: one request
//! at most [`TIMEOUT`], sent again within [`WINDOW`] while etcd is between leaders. An
//! unreachable etcd is an error naming the endpoints, never a hang.

use crate::schedule::Slot;
use crate::store::{
    Dump, DumpedDeployment, JoinRefused, Joined, Lead, NodeJoin, NodeList, NodeRecord, NodeSpec, RevokedCert, Store,
    StoreError, Stored, StoredNode, TokenRecord, DUMP_FORMAT, HISTORY_LIMIT,
};
use etcd_client::{Client, Compare, CompareOp, ConnectOptions, GetOptions, Txn, TxnOp};
use serde::de::DeserializeOwned;
use serde::Serialize;
use skiff_model::api::ApplyResponse;
use skiff_model::rollout::{self, Revision, RolloutState};
use skiff_model::Deployment;
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

mod members;
mod watched;

use members::Members;

/// How long one request to etcd may take before it is given up.
pub const TIMEOUT: Duration = Duration::from_secs(5);
/// How long a request that may be sent again is, while etcd is between leaders, before
/// the store says it is unreachable. A member lost makes the others elect a leader in
/// seconds, longer on a loaded machine; a request that hung on a member meanwhile is
/// sent again (two tries of [`TIMEOUT`]).
pub const WINDOW: Duration = Duration::from_secs(12);
/// Attempts at one change when other hubs keep changing the store meanwhile.
const ATTEMPTS: usize = 20;
/// etcd's default `--max-txn-ops`.
const MAX_TXN_OPS: usize = 128;
/// Keys per read of a directory: a whole directory of 100,000 nodes is ~100 MB.
const PAGE: i64 = 1000;
/// The largest answer the store takes from etcd (gRPC's default is 4 MB; one page of
/// large deployments' histories may pass it).
const MAX_MESSAGE: usize = 256 << 20;

/// The first key after every key that starts with `prefix` (etcd's range end).
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// Every key under `dir` with its value and modification revision, read at etcd revision
/// `at` (0: now) in pages of [`PAGE`] keys, all at one revision; and that revision.
#[allow(clippy::type_complexity)]
async fn read_pages(
    client: Client,
    dir: String,
    at: i64,
) -> Result<(i64, Vec<(String, Vec<u8>, i64)>), etcd_client::Error> {
    read_pages_with(client, dir, at, false).await
}

/// [`read_pages`]; with `keys_only`, the keys and their mod revisions without the values.
async fn read_pages_with(
    client: Client,
    dir: String,
    at: i64,
    keys_only: bool,
) -> Result<(i64, Vec<(String, Vec<u8>, i64)>), etcd_client::Error> {
    let end = prefix_end(dir.as_bytes());
    let mut kv = client.kv_client().max_decoding_message_size(MAX_MESSAGE);
    let mut from = dir.into_bytes();
    let mut rev = at;
    let mut out = Vec::new();
    loop {
        let mut o = GetOptions::new().with_range(end.clone()).with_limit(PAGE);
        if keys_only {
            o = o.with_keys_only();
        }
        if rev > 0 {
            o = o.with_revision(rev);
        }
        let r = kv.get(from.clone(), Some(o)).await?;
        if rev <= 0 {
            rev = r.header().map(|h| h.revision()).unwrap_or(0);
        }
        for kv in r.kvs() {
            out.push((String::from_utf8_lossy(kv.key()).into_owned(), kv.value().to_vec(), kv.mod_revision()));
        }
        match (r.more(), r.kvs().last()) {
            (true, Some(last)) => {
                from = last.key().to_vec();
                from.push(0);
            }
            _ => return Ok((rev, out)),
        }
    }
}

/// A random number (a write's nonce).
fn rand_u64() -> u64 {
    let mut b = [0u8; 8];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b);
    u64::from_le_bytes(b)
}

/// How long to wait before asking again while etcd is between leaders.
const RETRY: Duration = Duration::from_millis(200);

/// Whether an error is etcd being between leaders or one member being gone (the next
/// try reaches another), not an answer.
fn transient(e: &etcd_client::Error) -> bool {
    match e {
        // gRPC's UNAVAILABLE (14: "leader changed", "no leader", a member going away, a
        // request timed out in etcd), CANCELLED (1: the connection closed under the request
        // as its member died; the channel's own limit, a request that hung on a member
        // between leaders) and DEADLINE_EXCEEDED (4).
        etcd_client::Error::GRpcStatus(s) => {
            matches!(i32::from(s.code()), 1 | 4 | 14) || s.message().contains("leader")
        }
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
        _ => false,
    }
}

/// Where the store lives: `etcd://HOST:PORT[,HOST:PORT...][/PREFIX]`, with TLS files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdTarget {
    pub endpoints: Vec<String>,
    pub prefix: String,
    pub tls: Option<EtcdTls>,
}

/// TLS to etcd: the CA that signed its certificate, and a client certificate if it asks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdTls {
    pub ca: std::path::PathBuf,
    pub cert: Option<std::path::PathBuf>,
    pub key: Option<std::path::PathBuf>,
}

impl EtcdTarget {
    /// Parses `etcd://HOST:PORT[,HOST:PORT...][/PREFIX]` (`etcds://` for TLS, whose files
    /// are given apart). Errors name what is wrong.
    pub fn parse(url: &str, tls: Option<EtcdTls>) -> Result<Self, String> {
        let (scheme, rest) = url.split_once("://").ok_or_else(|| format!("{url:?}: expected etcd://HOST:PORT"))?;
        let secure = match scheme {
            "etcd" => false,
            "etcds" => true,
            _ => return Err(format!("{url:?}: the scheme must be etcd:// or etcds://")),
        };
        if secure != tls.is_some() {
            return Err(format!("{url:?}: etcds:// goes with --etcd-ca (and etcd:// without it)"));
        }
        let (hosts, prefix) = match rest.split_once('/') {
            Some((h, p)) => (h, format!("/{}", p.trim_matches('/'))),
            None => (rest, "/skiff".to_string()),
        };
        if prefix == "/" || prefix.contains("//") {
            return Err(format!("{url:?}: the prefix after the hosts must name a path, such as /skiff"));
        }
        let mut endpoints = Vec::new();
        for h in hosts.split(',') {
            let port = h.rsplit_once(':').map(|(_, p)| p);
            match port.map(str::parse::<u16>) {
                Some(Ok(p)) if p > 0 && !h.starts_with(':') => {}
                _ => return Err(format!("{url:?}: {h:?} is not HOST:PORT")),
            }
            endpoints.push(format!("{}://{h}", if secure { "https" } else { "http" }));
        }
        Ok(EtcdTarget { endpoints, prefix, tls })
    }
}

pub struct EtcdStore {
    members: Arc<Members>,
    rt: Rt,
    prefix: String,
    endpoints: String,
    /// While this hub leads (and after it lost the lead): the value of the leader key
    /// that every write requires.
    fence: Arc<Mutex<Option<String>>>,
    /// The lease this hub leads with.
    lease: Arc<Mutex<Option<i64>>>,
    /// One change of this hub's at a time: its changes never make each other start over
    /// (every change is checked against the one `lock` key).
    changing: Mutex<()>,
    /// The node records, kept current by a watch.
    watched: Arc<watched::Watched>,
    /// Reads of the marker the watch's copy is checked against, shared by those who ask
    /// at once.
    marker_reads: watched::SharedReads,
    /// The placement as last read, with its keys' mod revisions.
    #[allow(clippy::type_complexity)]
    slots_read: Mutex<Option<(Vec<(String, i64)>, Arc<Vec<Slot>>)>>,
    /// The store's revision, as a watch of its key sees it move.
    revisions: tokio::sync::watch::Receiver<u64>,
}

/// The store's runtime, shut down without waiting: it may be dropped from async code,
/// where a runtime may not block.
struct Rt(Option<tokio::runtime::Runtime>);

impl Drop for Rt {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

/// One change: reads at one etcd revision (seeing its own writes), writes kept until the
/// commit.
struct Tx<'a> {
    store: &'a EtcdStore,
    at: i64,
    lock_mod: i64,
    writes: BTreeMap<String, Option<Vec<u8>>>,
}

impl Tx<'_> {
    fn key(&self, k: &str) -> String {
        format!("{}/{k}", self.store.prefix)
    }

    fn get<T: DeserializeOwned>(&self, k: &str) -> Result<Option<T>, StoreError> {
        let key = self.key(k);
        let raw = match self.writes.get(&key) {
            Some(w) => w.clone(),
            None => self.store.read(&key, false, self.at)?.into_iter().next().map(|(_, v)| v),
        };
        raw.map(|v| serde_json::from_slice(&v).map_err(StoreError::from)).transpose()
    }

    /// Every value under `dir/`, by key (without the directory).
    fn list<T: DeserializeOwned>(&self, dir: &str) -> Result<BTreeMap<String, T>, StoreError> {
        self.list_from(dir, "")
    }

    /// The values of `dir` whose keys (after `dir/`) start with `start`, by that key: one
    /// prefix read, not the whole directory.
    fn list_from<T: DeserializeOwned>(&self, dir: &str, start: &str) -> Result<BTreeMap<String, T>, StoreError> {
        let base = self.key(&format!("{dir}/"));
        let p = format!("{base}{start}");
        let mut all: BTreeMap<String, Vec<u8>> = self.store.read(&p, true, self.at)?.into_iter().collect();
        for (k, v) in self.writes.range(p.clone()..).take_while(|(k, _)| k.starts_with(&p)) {
            match v {
                Some(v) => all.insert(k.clone(), v.clone()),
                None => all.remove(k),
            };
        }
        all.into_iter().map(|(k, v)| Ok((k[base.len()..].to_string(), serde_json::from_slice(&v)?))).collect()
    }

    fn put<T: Serialize>(&mut self, k: &str, v: &T) -> Result<(), StoreError> {
        let key = self.key(k);
        self.writes.insert(key, Some(serde_json::to_vec(v)?));
        Ok(())
    }

    fn delete(&mut self, k: &str) {
        let key = self.key(k);
        self.writes.insert(key, None);
    }

    fn bump(&mut self) -> Result<u64, StoreError> {
        let rev = self.get::<u64>("revision")?.unwrap_or(0) + 1;
        self.put("revision", &rev)?;
        Ok(rev)
    }

    fn put_history(&mut self, name: &str, h: &[Revision]) -> Result<(), StoreError> {
        if h.is_empty() {
            self.delete(&format!("history/{name}"));
        } else {
            self.put(&format!("history/{name}"), &h)?;
        }
        if h.last().is_some_and(|r| r.state == RolloutState::Progressing) {
            self.put(&format!("progressing/{name}"), &true)
        } else {
            self.delete(&format!("progressing/{name}"));
            Ok(())
        }
    }

    fn history(&self, name: &str) -> Result<Vec<Revision>, StoreError> {
        Ok(self.get(&format!("history/{name}"))?.unwrap_or_default())
    }

    /// Revokes the node's current (and pending) certificate serials.
    fn revoke_serials(&mut self, n: &StoredNode, now_ms: u64) -> Result<(), StoreError> {
        let serials = std::iter::once(&n.record.cert_serial).chain(n.record.next_serial.as_ref());
        for s in serials {
            self.revoke(s, &n.record.name, now_ms)?;
        }
        Ok(())
    }

    /// Records `serial` as revoked, unless it is already.
    fn revoke(&mut self, serial: &str, node: &str, revoked_ms: u64) -> Result<(), StoreError> {
        let k = format!("revoked/{serial}");
        if self.get::<RevokedCert>(&k)?.is_none() {
            self.put(&k, &RevokedCert { serial: serial.into(), node: node.into(), revoked_ms })?;
        }
        Ok(())
    }

    /// Appends a revision when `d`'s template differs from its newest one (as SQLite's
    /// `record_revision`).
    fn record_revision(
        &mut self,
        d: &Deployment,
        old: Option<&Deployment>,
        cause: &str,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        let mut h = self.history(&d.name)?;
        let tpl = rollout::template_hash(d);
        let entry = |rev: u64, spec: &Deployment, state: RolloutState, cause: &str| Revision {
            revision: rev,
            template: rollout::template_hash(spec),
            image: spec.image.clone(),
            created_ms: now_ms,
            state,
            cause: cause.into(),
            nodes: None,
            message: None,
            spec: spec.clone(),
        };
        let last = match (h.last(), old) {
            (Some(r), _) if r.template == tpl => return Ok(()),
            (Some(r), _) => r.revision,
            (None, Some(o)) if rollout::template_hash(o) != tpl => {
                h.push(entry(1, o, RolloutState::Complete, "stored before history was kept"));
                1
            }
            (None, _) => 0,
        };
        for r in h.iter_mut().filter(|r| r.state == RolloutState::Progressing) {
            r.state = RolloutState::Superseded;
        }
        let mut new = entry(last + 1, d, RolloutState::Progressing, cause);
        // An update of a deployment on several nodes starts with its first wave.
        let mut nodes: Vec<String> = self
            .get::<Vec<(u32, String)>>(&format!("slots/{}", d.name))?
            .unwrap_or_default()
            .into_iter()
            .map(|s| s.1)
            .collect();
        nodes.sort();
        nodes.dedup();
        if last > 0 && nodes.len() > 1 {
            new.nodes = Some(nodes.into_iter().take(d.update.wave_size as usize).collect());
        }
        h.push(new);
        let keep_after = (last + 1).saturating_sub(HISTORY_LIMIT as u64);
        h.retain(|r| r.revision > keep_after);
        self.put_history(&d.name, &h)
    }
}

impl EtcdStore {
    /// Connects (at most [`TIMEOUT`]) and checks that etcd answers.
    pub fn open(target: &EtcdTarget) -> Result<Self, StoreError> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("skiff-etcd")
            .enable_all()
            .build()
            .map_err(|e| StoreError::Etcd(format!("starting the etcd client: {e}")))?;
        let rt = Rt(Some(rt));
        let handle = rt.0.as_ref().map(|r| r.handle().clone()).ok_or_else(|| StoreError::Etcd("no runtime".into()))?;
        let endpoints = target.endpoints.join(",");
        let mut opts = ConnectOptions::new().with_connect_timeout(TIMEOUT).with_timeout(TIMEOUT);
        if let Some(tls) = &target.tls {
            let read = |p: &std::path::Path| {
                std::fs::read(p).map_err(|e| StoreError::Etcd(format!("reading {}: {e}", p.display())))
            };
            let mut t =
                etcd_client::TlsOptions::new().ca_certificate(etcd_client::Certificate::from_pem(read(&tls.ca)?));
            match (&tls.cert, &tls.key) {
                (Some(c), Some(k)) => t = t.identity(etcd_client::Identity::from_pem(read(c)?, read(k)?)),
                (None, None) => {}
                _ => return Err(StoreError::Etcd("--etcd-cert and --etcd-key go together".into())),
            }
            opts = opts.with_tls(t);
        }
        // Not `block_on`: the caller may be async code itself.
        let eps = target.endpoints.clone();
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let first = rand_u64() as usize;
        handle.spawn(async move {
            let _ = tx.send(tokio::time::timeout(TIMEOUT, Members::connect(&eps, opts, first)).await);
        });
        let members = match rx.recv_timeout(TIMEOUT + Duration::from_secs(1)) {
            Ok(Ok(Ok(m))) => Arc::new(m),
            Ok(Ok(Err(e))) => return Err(StoreError::Etcd(format!("etcd at {endpoints}: {e}"))),
            _ => {
                let secs = TIMEOUT.as_secs();
                return Err(StoreError::Etcd(format!("etcd at {endpoints}: no answer within {secs} s")));
            }
        };
        let (moved, revisions) = tokio::sync::watch::channel(0);
        let s = EtcdStore {
            members,
            rt,
            prefix: target.prefix.clone(),
            endpoints,
            fence: Default::default(),
            lease: Default::default(),
            changing: Mutex::new(()),
            watched: Arc::default(),
            marker_reads: Default::default(),
            slots_read: Mutex::new(None),
            revisions,
        };
        s.revision()?;
        let keep = watched::keep(Arc::clone(&s.members), s.prefix.clone(), Arc::downgrade(&s.watched));
        handle.spawn(keep);
        handle.spawn(watched::follow_revision(Arc::clone(&s.members), format!("{}/revision", s.prefix), moved));
        Ok(s)
    }

    /// Runs `f` with a client on the store's runtime and waits for it (at most
    /// [`TIMEOUT`]).
    fn call<T, F, Fut>(&self, what: &str, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: Fn(Client) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, etcd_client::Error>> + Send + 'static,
    {
        self.call_with(what, true, f)
    }

    /// As `call`; without `retry` an error is returned as it comes (a write whose
    /// outcome is unknown must not simply be sent again).
    fn call_with<T, F, Fut>(&self, what: &str, retry: bool, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: Fn(Client) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, etcd_client::Error>> + Send + 'static,
    {
        let rt = self.rt.0.as_ref().ok_or_else(|| StoreError::Etcd("the store is closed".into()))?;
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let members = Arc::clone(&self.members);
        // Again on the next member while one is lost, hung or between leaders, within the
        // window; a member that refuses connections is tried again within one request's
        // time only (every member refusing them is etcd down).
        let window = if retry { WINDOW } else { TIMEOUT };
        rt.spawn(async move {
            let start = tokio::time::Instant::now();
            let deadline = start + window;
            let r = loop {
                let this_try = deadline.min(tokio::time::Instant::now() + TIMEOUT);
                let (member, client) = members.current();
                let r = tokio::time::timeout_at(this_try, f(client)).await;
                let (why, until) = match &r {
                    Ok(Err(e @ (etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_)))) => {
                        (e.to_string(), start + TIMEOUT)
                    }
                    Ok(Err(e)) if transient(e) => (e.to_string(), deadline),
                    Err(_) => (format!("no answer within {} s", TIMEOUT.as_secs()), deadline),
                    _ => break r,
                };
                members.failed(member, &why);
                if !retry || tokio::time::Instant::now() + RETRY >= until {
                    break r;
                }
                tracing::debug!(error = %why, "etcd: again");
                tokio::time::sleep(RETRY).await;
            };
            let _ = tx.send(r);
        });
        let unreachable =
            || StoreError::Etcd(format!("etcd at {}: {what}: no answer within {} s", self.endpoints, window.as_secs()));
        match rx.recv_timeout(window + Duration::from_secs(1)) {
            Ok(Ok(Ok(v))) => Ok(v),
            Ok(Ok(Err(e))) => Err(StoreError::Etcd(format!("etcd at {}: {what}: {e}", self.endpoints))),
            Ok(Err(_)) | Err(_) => Err(unreachable()),
        }
    }

    /// The values at `key` (or under it, with `prefix`) at etcd revision `at` (0: now).
    fn read(&self, key: &str, prefix: bool, at: i64) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let key = key.to_string();
        let (_, kvs) = self.read_at(key, prefix, at)?;
        Ok(kvs.into_iter().map(|(k, v, _)| (k, v)).collect())
    }

    /// The values and their mod revisions, and the etcd revision they were read at.
    #[allow(clippy::type_complexity)]
    fn read_at(&self, key: String, prefix: bool, at: i64) -> Result<(i64, Vec<(String, Vec<u8>, i64)>), StoreError> {
        self.call("read", move |mut c| {
            let key = key.clone();
            async move {
                if prefix {
                    return read_pages(c, key, at).await;
                }
                let o = (at > 0).then(|| GetOptions::new().with_revision(at));
                let r = c.get(key, o).await?;
                let rev = r.header().map(|h| h.revision()).unwrap_or(0);
                let kvs = r
                    .kvs()
                    .iter()
                    .map(|kv| (String::from_utf8_lossy(kv.key()).into_owned(), kv.value().to_vec(), kv.mod_revision()))
                    .collect();
                Ok((rev, kvs))
            }
        })
    }

    fn begin(&self) -> Result<Tx<'_>, StoreError> {
        let (at, kvs) = self.read_at(format!("{}/lock", self.prefix), false, 0)?;
        Ok(Tx { store: self, at, lock_mod: kvs.first().map(|k| k.2).unwrap_or(0), writes: BTreeMap::new() })
    }

    /// Applies the writes if nobody wrote since the reads; `false`: someone did.
    fn commit(&self, tx: Tx<'_>) -> Result<bool, StoreError> {
        if tx.writes.is_empty() {
            return Ok(true);
        }
        let mut ops = self.ops(tx.writes);
        if ops.len() + 1 > MAX_TXN_OPS {
            return Err(StoreError::Etcd(format!(
                "one change would write {} keys; etcd takes at most {MAX_TXN_OPS} in a transaction",
                ops.len() + 1
            )));
        }
        let lock = format!("{}/lock", self.prefix);
        // The lock gets a value of this attempt's own: after an error that leaves the
        // outcome unknown (etcd between leaders), reading it back says whether it landed.
        let nonce = format!("{:016x}", rand_u64());
        ops.push(TxnOp::put(lock.clone(), nonce.clone(), None));
        let mut when = vec![Compare::mod_revision(lock, CompareOp::Equal, tx.lock_mod)];
        // A hub that leads writes only while it still does (a deposed one is fenced off).
        let fence = self.fence.lock().map_err(|_| StoreError::Poisoned)?.clone();
        if let Some(id) = &fence {
            when.push(Compare::value(self.leader_key(), CompareOp::Equal, id.clone()));
        }
        let txn = Txn::new().when(when).and_then(ops);
        let sent = self.call_with("write", false, move |mut c| {
            let txn = txn.clone();
            async move { Ok(c.txn(txn).await?.succeeded()) }
        });
        let done = match sent {
            Ok(done) => done,
            Err(e) => {
                // Landed or not: the lock says. Not landed: computed again from fresh reads.
                let now = self.read(&format!("{}/lock", self.prefix), false, 0).map_err(|_| e)?;
                now.first().is_some_and(|(_, v)| *v == nonce.as_bytes())
            }
        };
        if !done && fence.is_some() {
            let now = self.read(&self.leader_key(), false, 0)?.into_iter().next().map(|(_, v)| v);
            if now.as_deref() != fence.as_deref().map(str::as_bytes) {
                return Err(StoreError::Etcd("this hub is no longer the active one: its write is refused".into()));
            }
        }
        Ok(done)
    }

    /// The revision of the last change of a node record, as a read begun after this call
    /// sees it (one read for all who ask at once).
    fn marker_revision(&self) -> Result<i64, StoreError> {
        self.marker_reads.get(|| {
            let (_, kvs) = self.read_at(format!("{}/{}", self.prefix, watched::MARKER), false, 0)?;
            Ok(kvs.first().map(|k| k.2).unwrap_or(0))
        })
    }

    fn leader_key(&self) -> String {
        format!("{}/leader", self.prefix)
    }

    /// The operations of a transaction writing `writes`; with the marker the node records'
    /// watch is read against, when they change a node record.
    fn ops(&self, writes: BTreeMap<String, Option<Vec<u8>>>) -> Vec<TxnOp> {
        let nodes = format!("{}/nodes/", self.prefix);
        let marks = writes.keys().any(|k| k.starts_with(&nodes));
        let mut ops: Vec<TxnOp> = writes
            .into_iter()
            .map(|(k, v)| match v {
                Some(v) => TxnOp::put(k, v, None),
                None => TxnOp::delete(k, None),
            })
            .collect();
        if marks {
            ops.push(TxnOp::put(format!("{}/{}", self.prefix, watched::MARKER), Vec::new(), None));
        }
        ops
    }

    /// Writes keys no change reads to decide (state: events, controllers' memory) as they
    /// are: fenced as every write, but without the store's lock, so a stream of events
    /// never makes an apply start over. Puts and deletes of whole keys may be sent again.
    fn put_fenced(&self, writes: Vec<(String, Option<Vec<u8>>)>) -> Result<(), StoreError> {
        if writes.is_empty() {
            return Ok(());
        }
        let ops: Vec<TxnOp> = writes
            .into_iter()
            .map(|(k, v)| match v {
                Some(v) => TxnOp::put(k, v, None),
                None => TxnOp::delete(k, None),
            })
            .collect();
        let fence = self.fence.lock().map_err(|_| StoreError::Poisoned)?.clone();
        let when: Vec<Compare> =
            fence.into_iter().map(|id| Compare::value(self.leader_key(), CompareOp::Equal, id)).collect();
        let txn = Txn::new().when(when).and_then(ops);
        let done = self.call("write", move |mut c| {
            let txn = txn.clone();
            async move { Ok(c.txn(txn).await?.succeeded()) }
        })?;
        if !done {
            return Err(StoreError::Etcd("this hub is no longer the active one: its write is refused".into()));
        }
        Ok(())
    }

    /// Runs one change, again from fresh reads while other writers get in between: one
    /// at a time in this hub, and after a random wait that doubles at each try against
    /// the other hubs' (many hubs joining nodes at once do not starve one another).
    /// `f` returns the result and whether to write (a dry run does not).
    fn change<T>(&self, mut f: impl FnMut(&mut Tx<'_>) -> Result<(T, bool), StoreError>) -> Result<T, StoreError> {
        let _one = self.changing.lock().map_err(|_| StoreError::Poisoned)?;
        for attempt in 0..ATTEMPTS {
            let mut tx = self.begin()?;
            let (out, write) = f(&mut tx)?;
            if !write || self.commit(tx)? {
                return Ok(out);
            }
            let ceiling_ms = 2u64 << attempt.min(7);
            std::thread::sleep(Duration::from_millis(rand_u64() % ceiling_ms));
        }
        Err(StoreError::Etcd(format!("the store kept changing under {ATTEMPTS} attempts at one change; try again")))
    }

    /// Writes a batch of an import, only while the store is still empty (no `revision`,
    /// no hub leading it); puts are idempotent, so a batch may be sent again.
    fn write_unchecked(&self, batch: &mut Tx<'_>) -> Result<(), StoreError> {
        let ops = self.ops(std::mem::take(&mut batch.writes));
        let empty = vec![
            Compare::create_revision(format!("{}/revision", self.prefix), CompareOp::Equal, 0),
            Compare::create_revision(self.leader_key(), CompareOp::Equal, 0),
        ];
        let done = self.call("import", move |mut c| {
            let txn = Txn::new().when(empty.clone()).and_then(ops.clone());
            async move { c.txn(txn).await.map(|r| r.succeeded()) }
        })?;
        if !done {
            return Err(StoreError::NotEmpty(format!("{} changed while it was being restored", self.prefix)));
        }
        Ok(())
    }

    fn now(&self) -> Result<Tx<'_>, StoreError> {
        Ok(Tx { store: self, at: 0, lock_mod: 0, writes: BTreeMap::new() })
    }
}

impl Store for EtcdStore {
    fn apply(
        &self,
        deployments: &[Deployment],
        prune_stack: Option<&str>,
        dry_run: bool,
        now_ms: u64,
    ) -> Result<ApplyResponse, StoreError> {
        self.change(|tx| {
            let mut resp = ApplyResponse::default();
            for d in deployments {
                let old: Option<DumpedDeployment> = tx.get(&format!("deployments/{}", d.name))?;
                match old.map(|o| o.spec) {
                    Some(o) if o == *d => resp.unchanged.push(d.name.clone()),
                    prev => {
                        if !dry_run {
                            tx.record_revision(d, prev.as_ref(), "apply", now_ms)?;
                        }
                        let revision = tx.bump()?;
                        tx.put(&format!("deployments/{}", d.name), &DumpedDeployment { revision, spec: d.clone() })?;
                        if prev.is_some() {
                            resp.updated.push(d.name.clone())
                        } else {
                            resp.created.push(d.name.clone())
                        }
                    }
                }
            }
            if let Some(stack) = prune_stack {
                let all: BTreeMap<String, DumpedDeployment> = tx.list("deployments")?;
                for (n, doc) in all {
                    if doc.spec.stack == stack && !deployments.iter().any(|d| d.name == n) {
                        tx.bump()?;
                        tx.delete(&format!("deployments/{n}"));
                        tx.put_history(&n, &[])?;
                        resp.deleted.push(n);
                    }
                }
            }
            Ok((resp, !dry_run))
        })
    }

    fn list(&self) -> Result<Vec<Stored>, StoreError> {
        let all: BTreeMap<String, DumpedDeployment> = self.now()?.list("deployments")?;
        Ok(all.into_values().map(|d| Stored { revision: d.revision, spec: d.spec }).collect())
    }

    fn get(&self, name: &str) -> Result<Option<Stored>, StoreError> {
        let d: Option<DumpedDeployment> = self.now()?.get(&format!("deployments/{name}"))?;
        Ok(d.map(|d| Stored { revision: d.revision, spec: d.spec }))
    }

    fn delete_all(&self, names: &[String]) -> Result<Vec<String>, StoreError> {
        self.change(|tx| {
            let mut gone = vec![];
            for name in names {
                if tx.get::<DumpedDeployment>(&format!("deployments/{name}"))?.is_some() {
                    tx.delete(&format!("deployments/{name}"));
                    tx.bump()?;
                    tx.put_history(name, &[])?;
                    gone.push(name.clone());
                }
            }
            let changed = !gone.is_empty();
            Ok((gone, changed))
        })
    }

    fn revision(&self) -> Result<u64, StoreError> {
        Ok(self.now()?.get::<u64>("revision")?.unwrap_or(0))
    }

    fn create_token(&self, t: &TokenRecord) -> Result<(), StoreError> {
        self.change(|tx| {
            if tx.get::<TokenRecord>(&format!("tokens/{}", t.id))?.is_some() {
                return Err(StoreError::Exists(format!("token {}", t.id)));
            }
            tx.put(&format!("tokens/{}", t.id), t)?;
            Ok(((), true))
        })
    }

    fn token(&self, id: &str) -> Result<Option<TokenRecord>, StoreError> {
        self.now()?.get(&format!("tokens/{id}"))
    }

    fn tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        let mut v: Vec<TokenRecord> = self.now()?.list::<TokenRecord>("tokens")?.into_values().collect();
        v.sort_by(|a, b| (a.created_ms, &a.id).cmp(&(b.created_ms, &b.id)));
        Ok(v)
    }

    fn revoke_token(&self, id: &str) -> Result<bool, StoreError> {
        self.change(|tx| {
            let Some(mut t) = tx.get::<TokenRecord>(&format!("tokens/{id}"))? else { return Ok((false, false)) };
            t.revoked = true;
            tx.put(&format!("tokens/{id}"), &t)?;
            Ok((true, true))
        })
    }

    fn join_node(&self, j: &NodeJoin<'_>) -> Result<Result<Joined, JoinRefused>, StoreError> {
        self.change(|tx| {
            let Some(mut t) = tx.get::<TokenRecord>(&format!("tokens/{}", j.token_id))? else {
                return Ok((Err(JoinRefused::UnknownToken(j.token_id.into())), false));
            };
            let row: Option<StoredNode> = tx.get(&format!("nodes/{}", j.name))?;
            // The same device repeating a join whose answer it lost (see SQLite's).
            let retry = row.as_ref().is_some_and(|n| {
                n.key_sha256.as_deref() == Some(j.key_sha256) && n.token_id.as_deref() == Some(j.token_id)
            });
            let exists = row.is_some();
            if let Some(r) = crate::store::join_refusal(&t, j, exists, retry) {
                return Ok((Err(r), false));
            }
            if let Some(old) = &row {
                tx.revoke_serials(old, j.now_ms)?;
            }
            if !retry {
                t.used += 1;
                tx.put(&format!("tokens/{}", t.id), &t)?;
            }
            let revision = tx.bump()?;
            let doc = StoredNode {
                record: NodeRecord {
                    name: j.name.into(),
                    revision,
                    cert_serial: j.serial.into(),
                    joined_ms: j.now_ms,
                    info: j.info.clone(),
                    not_after_ms: Some(j.not_after_ms),
                    next_serial: None,
                    next_not_after_ms: None,
                },
                key_sha256: Some(j.key_sha256.into()),
                next_key_sha256: None,
                token_id: Some(j.token_id.into()),
            };
            tx.put(&format!("nodes/{}", j.name), &doc)?;
            Ok((Ok(Joined { replaced: exists && !retry, retry }), true))
        })
    }

    fn set_node_info(&self, name: &str, info: &NodeSpec) -> Result<(), StoreError> {
        self.change(|tx| {
            let rev = tx.bump()?;
            if let Some(mut n) = tx.get::<StoredNode>(&format!("nodes/{name}"))? {
                n.record.info = info.clone();
                n.record.revision = rev;
                tx.put(&format!("nodes/{name}"), &n)?;
            }
            Ok(((), true))
        })
    }

    fn renew_cert(&self, name: &str, serial: &str, not_after_ms: u64, key_sha256: &str) -> Result<(), StoreError> {
        self.change(|tx| {
            let Some(mut n) = tx.get::<StoredNode>(&format!("nodes/{name}"))? else { return Ok(((), false)) };
            n.record.next_serial = Some(serial.into());
            n.record.next_not_after_ms = Some(not_after_ms);
            n.next_key_sha256 = Some(key_sha256.into());
            tx.put(&format!("nodes/{name}"), &n)?;
            Ok(((), true))
        })
    }

    fn promote_cert(&self, name: &str, serial: &str, now_ms: u64) -> Result<(), StoreError> {
        self.change(|tx| {
            let Some(mut n) = tx.get::<StoredNode>(&format!("nodes/{name}"))? else { return Ok(((), false)) };
            if n.record.next_serial.as_deref() != Some(serial) {
                return Ok(((), false));
            }
            let old = n.record.cert_serial.clone();
            tx.revoke(&old, name, now_ms)?;
            n.record.cert_serial = serial.into();
            n.record.not_after_ms = n.record.next_not_after_ms.take();
            n.record.next_serial = None;
            if let Some(k) = n.next_key_sha256.take() {
                n.key_sha256 = Some(k);
            }
            tx.put(&format!("nodes/{name}"), &n)?;
            Ok(((), true))
        })
    }

    /// As [`EtcdStore::nodes`]: a node connecting looks its record up several times.
    fn node(&self, name: &str) -> Result<Option<NodeRecord>, StoreError> {
        if let Some(n) = self.watched.node_at(self.marker_revision()?, name) {
            return Ok(n);
        }
        Ok(self.now()?.get::<StoredNode>(&format!("nodes/{name}"))?.map(|n| n.record))
    }

    /// From the watch's copy once it has delivered the marker's last change (see
    /// [`watched`]); read whole while it cannot.
    fn nodes(&self) -> Result<NodeList, StoreError> {
        if let Some(nodes) = self.watched.nodes_at(self.marker_revision()?) {
            return Ok(nodes);
        }
        // Said (every 10 s at most): at 100,000 nodes this is 100 MB from etcd, and a new
        // copy of every record.
        static SAID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let now = skiff_sys::time::now_ms();
        let said = SAID.load(std::sync::atomic::Ordering::Relaxed);
        if now.saturating_sub(said) >= 10_000
            && SAID
                .compare_exchange(said, now, std::sync::atomic::Ordering::Relaxed, std::sync::atomic::Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!("reading every node record from etcd: the watch that keeps them is down or behind");
        }
        Ok(Arc::new(self.now()?.list::<StoredNode>("nodes")?.into_values().map(|n| Arc::new(n.record)).collect()))
    }

    fn revoke_node(&self, name: &str, now_ms: u64) -> Result<bool, StoreError> {
        self.change(|tx| {
            let Some(n) = tx.get::<StoredNode>(&format!("nodes/{name}"))? else { return Ok((false, false)) };
            tx.revoke_serials(&n, now_ms)?;
            tx.delete(&format!("nodes/{name}"));
            tx.bump()?;
            Ok((true, true))
        })
    }

    fn is_revoked(&self, serial: &str) -> Result<bool, StoreError> {
        Ok(self.now()?.get::<RevokedCert>(&format!("revoked/{serial}"))?.is_some())
    }

    fn history(&self, name: &str) -> Result<Vec<Revision>, StoreError> {
        self.now()?.history(name)
    }

    fn progressing(&self) -> Result<Vec<String>, StoreError> {
        Ok(self.now()?.list::<bool>("progressing")?.into_keys().collect())
    }

    fn set_wave(&self, name: &str, revision: u64, nodes: &[String]) -> Result<u64, StoreError> {
        self.change(|tx| {
            let mut h = tx.history(name)?;
            if let Some(r) = h.iter_mut().find(|r| r.revision == revision) {
                r.nodes = Some(nodes.to_vec());
                tx.put_history(name, &h)?;
            }
            Ok((tx.bump()?, true))
        })
    }

    fn set_rollout(
        &self,
        name: &str,
        revision: u64,
        state: RolloutState,
        cause: Option<&str>,
        message: Option<&str>,
    ) -> Result<(), StoreError> {
        self.change(|tx| {
            let mut h = tx.history(name)?;
            let Some(r) = h.iter_mut().find(|r| r.revision == revision) else { return Ok(((), false)) };
            r.state = state;
            if let Some(c) = cause {
                r.cause = c.into();
            }
            if let Some(m) = message {
                r.message = Some(m.into());
            }
            tx.put_history(name, &h)?;
            Ok(((), true))
        })
    }

    fn shared(&self, key: &str, value: &str) -> Result<String, StoreError> {
        let k = format!("{}/shared/{key}", self.prefix);
        let (k2, v) = (k.clone(), value.as_bytes().to_vec());
        self.call("write", move |mut c| {
            let txn = Txn::new()
                .when(vec![Compare::create_revision(k2.clone(), CompareOp::Equal, 0)])
                .and_then(vec![TxnOp::put(k2.clone(), v.clone(), None)]);
            async move { c.txn(txn).await.map(|_| ()) }
        })?;
        let kept = self.read(&k, false, 0)?.into_iter().next().map(|(_, v)| v);
        let kept = kept.ok_or_else(|| StoreError::Etcd(format!("{k} vanished after it was written")))?;
        String::from_utf8(kept).map_err(|_| StoreError::Etcd(format!("{k} is not text")))
    }

    fn shared_value(&self, key: &str) -> Result<Option<String>, StoreError> {
        let v = self.read(&format!("{}/shared/{key}", self.prefix), false, 0)?.into_iter().next().map(|(_, v)| v);
        Ok(v.map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    fn campaign(&self, id: &str, ttl: Duration) -> Option<tokio::sync::watch::Receiver<Lead>> {
        let rt = self.rt.0.as_ref()?;
        let (tx, rx) = tokio::sync::watch::channel(Lead::Standby(None));
        let c = Campaign {
            members: Arc::clone(&self.members),
            key: self.leader_key(),
            id: id.to_string(),
            ttl_s: ttl.as_secs().max(2) as i64,
            fence: Arc::clone(&self.fence),
            lease: Arc::clone(&self.lease),
        };
        rt.spawn(c.run(tx));
        Some(rx)
    }

    fn hubs(&self, add: Option<&str>) -> Result<Vec<String>, StoreError> {
        if let Some(url) = add {
            let (k, v) = (format!("{}/hubs/{url}", self.prefix), url.as_bytes().to_vec());
            self.call("write", move |mut c| {
                let (k, v) = (k.clone(), v.clone());
                async move { c.put(k, v, None).await.map(|_| ()) }
            })?;
        }
        let all = self.read(&format!("{}/hubs/", self.prefix), true, 0)?;
        Ok(all.into_iter().map(|(_, v)| String::from_utf8_lossy(&v).into_owned()).collect())
    }

    fn revisions(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        Some(self.revisions.clone())
    }

    fn resign(&self) {
        let Some(lease) = self.lease.lock().ok().and_then(|mut l| l.take()) else { return };
        match self.call("resign", move |mut c| async move { c.lease_revoke(lease).await.map(|_| ()) }) {
            Ok(()) => tracing::info!("gave up the store's lease"),
            Err(e) => tracing::warn!(error = %e, "giving up the store's lease: a standby takes over when it expires"),
        }
    }

    fn put_state(&self, key: &str, value: Option<&str>) -> Result<(), StoreError> {
        self.put_states(&[(key.to_string(), value.map(String::from))])
    }

    fn put_states(&self, changes: &[(String, Option<String>)]) -> Result<(), StoreError> {
        // Within etcd's operations per transaction.
        for part in changes.chunks(100) {
            // One operation per key (etcd refuses a key twice in a transaction): the last.
            let mut writes = BTreeMap::new();
            for (key, value) in part {
                let v = value.as_ref().map(serde_json::to_vec).transpose()?;
                writes.insert(format!("{}/state/{key}", self.prefix), v);
            }
            self.put_fenced(writes.into_iter().collect())?;
        }
        Ok(())
    }

    fn states(&self, prefix: &str) -> Result<Vec<(String, String)>, StoreError> {
        let all: BTreeMap<String, String> = self.now()?.list_from("state", prefix)?;
        Ok(all.into_iter().collect())
    }

    fn export(&self) -> Result<Dump, StoreError> {
        // Every read at one etcd revision: a consistent copy while hubs keep running.
        let tx = self.begin()?;
        let slots: BTreeMap<String, Vec<(u32, String)>> = tx.list("slots")?;
        Ok(Dump {
            format: DUMP_FORMAT,
            revision: tx.get::<u64>("revision")?.unwrap_or(0),
            deployments: tx.list::<DumpedDeployment>("deployments")?.into_values().collect(),
            history: tx.list("history")?,
            tokens: {
                let mut v: Vec<TokenRecord> = tx.list::<TokenRecord>("tokens")?.into_values().collect();
                v.sort_by(|a, b| (a.created_ms, &a.id).cmp(&(b.created_ms, &b.id)));
                v
            },
            nodes: tx.list::<StoredNode>("nodes")?.into_values().collect(),
            revoked: tx.list::<RevokedCert>("revoked")?.into_values().collect(),
            slots: flatten_slots(slots),
            state: tx.list("state")?,
        })
    }

    fn import(&self, dump: &Dump) -> Result<(), StoreError> {
        if dump.format != DUMP_FORMAT {
            return Err(StoreError::DumpFormat(dump.format));
        }
        let tx = self.begin()?;
        if tx.get::<u64>("revision")?.is_some() {
            return Err(StoreError::NotEmpty(format!(
                "{} on etcd already holds a fleet; restore into an empty prefix",
                self.prefix
            )));
        }
        if !self.read(&self.leader_key(), false, 0)?.is_empty() {
            return Err(StoreError::NotEmpty(format!(
                "a hub is running on {} (it holds the store's lease); stop it before restoring",
                self.prefix
            )));
        }
        // More keys than one transaction takes: batches, and the revision last, so an
        // import cut short leaves a store that counts as empty and can be imported again.
        let mut batch = Tx { store: self, at: 0, lock_mod: tx.lock_mod, writes: BTreeMap::new() };
        let mut puts: Vec<(String, Vec<u8>)> = Vec::new();
        let mut put = |k: String, v: Result<Vec<u8>, serde_json::Error>| -> Result<(), StoreError> {
            puts.push((k, v?));
            Ok(())
        };
        for d in &dump.deployments {
            put(format!("deployments/{}", d.spec.name), serde_json::to_vec(d))?;
        }
        for (name, h) in &dump.history {
            put(format!("history/{name}"), serde_json::to_vec(h))?;
            if h.last().is_some_and(|r| r.state == RolloutState::Progressing) {
                put(format!("progressing/{name}"), serde_json::to_vec(&true))?;
            }
        }
        for t in &dump.tokens {
            put(format!("tokens/{}", t.id), serde_json::to_vec(t))?;
        }
        for n in &dump.nodes {
            put(format!("nodes/{}", n.record.name), serde_json::to_vec(n))?;
        }
        for c in &dump.revoked {
            put(format!("revoked/{}", c.serial), serde_json::to_vec(c))?;
        }
        let mut by_deployment: BTreeMap<&str, Vec<(u32, &str)>> = BTreeMap::new();
        for s in &dump.slots {
            by_deployment.entry(&s.deployment).or_default().push((s.index, &s.node));
        }
        for (d, s) in by_deployment {
            put(format!("slots/{d}"), serde_json::to_vec(&s))?;
        }
        for (k, v) in &dump.state {
            put(format!("state/{k}"), serde_json::to_vec(v))?;
        }
        // Room for the node records' marker.
        for chunk in puts.chunks(MAX_TXN_OPS - 1) {
            batch.writes = chunk.iter().map(|(k, v)| (batch.key(k), Some(v.clone()))).collect();
            self.write_unchecked(&mut batch)?;
        }
        batch.writes.clear();
        batch.put("revision", &dump.revision)?;
        self.write_unchecked(&mut batch)
    }

    /// Read again only when a deployment's placement changed: every hub reads the
    /// placement at each move of the store, and one deployment on 100,000 nodes is 2 MB.
    /// Its keys' mod revisions (a keys-only read) tell whether the last read still holds.
    fn slots(&self) -> Result<Arc<Vec<Slot>>, StoreError> {
        let dir = format!("{}/slots/", self.prefix);
        let (at, keys) = {
            let dir = dir.clone();
            self.call("read", move |c| read_pages_with(c, dir.clone(), 0, true))?
        };
        let stamp: Vec<(String, i64)> = keys.into_iter().map(|(k, _, m)| (k, m)).collect();
        let kept =
            self.slots_read.lock().ok().and_then(|k| k.as_ref().filter(|(s, _)| *s == stamp).map(|k| Arc::clone(&k.1)));
        if let Some(slots) = kept {
            return Ok(slots);
        }
        let (_, kvs) = self.read_at(dir.clone(), true, at)?;
        let all = kvs
            .iter()
            .map(|(k, v, _)| Ok((k[dir.len()..].to_string(), serde_json::from_slice(v)?)))
            .collect::<Result<BTreeMap<String, Vec<(u32, String)>>, StoreError>>()?;
        let slots = Arc::new(flatten_slots(all));
        if let Ok(mut k) = self.slots_read.lock() {
            *k = Some((stamp, Arc::clone(&slots)));
        }
        Ok(slots)
    }

    fn set_slots(&self, slots: &[Slot]) -> Result<u64, StoreError> {
        let mut sorted = slots.to_vec();
        sorted.sort();
        let mut wanted: BTreeMap<String, Vec<(u32, String)>> = BTreeMap::new();
        for s in &sorted {
            wanted.entry(s.deployment.clone()).or_default().push((s.index, s.node.clone()));
        }
        self.change(|tx| {
            let now: BTreeMap<String, Vec<(u32, String)>> = tx.list("slots")?;
            if now == wanted {
                return Ok((tx.get::<u64>("revision")?.unwrap_or(0), false));
            }
            // Only what changed is written: one key per deployment whose placement moved.
            for d in now.keys().filter(|d| !wanted.contains_key(*d)) {
                tx.delete(&format!("slots/{d}"));
            }
            for (d, s) in wanted.iter().filter(|(d, s)| now.get(*d) != Some(s)) {
                tx.put(&format!("slots/{d}"), s)?;
            }
            Ok((tx.bump()?, true))
        })
    }
}

/// One hub's bid for the store's lease: the leader key, put with a lease of `ttl_s` only
/// where none exists; kept alive every third of the TTL. A keep-alive that fails or comes
/// back expired ends the lead for good (the hub stops; a supervisor starts it again as a
/// standby). The lease's TTL is what a takeover waits after a leader dies.
struct Campaign {
    members: Arc<Members>,
    key: String,
    id: String,
    ttl_s: i64,
    fence: Arc<Mutex<Option<String>>>,
    lease: Arc<Mutex<Option<i64>>>,
}

impl Campaign {
    async fn run(self, tx: tokio::sync::watch::Sender<Lead>) {
        let third = Duration::from_millis(self.ttl_s as u64 * 1000 / 3);
        let lease = loop {
            // While a hub leads, a standby only reads who: a bid is a lease granted and
            // revoked, two writes to etcd's log, twice a second per standby.
            let who = self.leader().await;
            let bid = if who.is_some() { Ok(None) } else { self.try_lead().await };
            match bid {
                Ok(Some(lease)) => break lease,
                Ok(None) => {
                    let who = if who.is_some() { who } else { self.leader().await };
                    tx.send_if_modified(|l| {
                        let new = Lead::Standby(who);
                        (*l != new).then(|| *l = new).is_some()
                    });
                }
                Err(e) => tracing::warn!(error = %e, "campaigning for the store's lease"),
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
            if tx.is_closed() {
                return;
            }
        };
        // The fence before the news: no write of this hub's goes out unfenced.
        if let Ok(mut f) = self.fence.lock() {
            *f = Some(self.id.clone());
        }
        if let Ok(mut l) = self.lease.lock() {
            *l = Some(lease);
        }
        let _ = tx.send(Lead::Active);
        let why = self.keep(lease, third).await;
        tracing::error!(%why, "lost the store's lease");
        let _ = tx.send(Lead::Lost(why));
    }

    /// Puts the leader key if there is none; the lease if this hub now leads. Says who
    /// leads otherwise.
    async fn try_lead(&self) -> Result<Option<i64>, etcd_client::Error> {
        let (member, mut c) = self.members.current();
        let bid = async {
            let lease = tokio::time::timeout(TIMEOUT, c.lease_grant(self.ttl_s, None))
                .await
                .map_err(|_| etcd_client::Error::LeaseKeepAliveError("no answer".into()))??
                .id();
            let with_lease = Some(etcd_client::PutOptions::new().with_lease(lease));
            let put = TxnOp::put(self.key.clone(), self.id.clone(), with_lease);
            let txn = Txn::new()
                .when(vec![Compare::create_revision(self.key.clone(), CompareOp::Equal, 0)])
                .and_then(vec![put]);
            let won = tokio::time::timeout(TIMEOUT, c.txn(txn))
                .await
                .map_err(|_| etcd_client::Error::LeaseKeepAliveError("no answer".into()))??
                .succeeded();
            if !won {
                let _ = c.lease_revoke(lease).await;
            }
            Ok(won.then_some(lease))
        };
        let r: Result<_, etcd_client::Error> = bid.await;
        if let Err(e) = &r {
            self.members.failed(member, &e.to_string());
        }
        r
    }

    /// The hub that leads now, as it names itself.
    async fn leader(&self) -> Option<String> {
        let (member, mut c) = self.members.current();
        let r = match tokio::time::timeout(TIMEOUT, c.get(self.key.clone(), None)).await {
            Ok(Ok(r)) => r,
            _ => {
                self.members.failed(member, "reading who leads");
                return None;
            }
        };
        r.kvs().first().map(|kv| String::from_utf8_lossy(kv.value()).into_owned())
    }

    /// Keeps the lease alive until it cannot; why it ended. A keep-alive stream that
    /// breaks (the etcd member it went to is gone) is made again on another, for as long
    /// as the lease may still be alive; only an answer that the lease is gone, or no
    /// answer within its TTL, ends the lead.
    async fn keep(&self, lease: i64, every: Duration) -> String {
        let ttl = Duration::from_secs(self.ttl_s as u64);
        let mut last_ok = tokio::time::Instant::now();
        loop {
            if last_ok.elapsed() >= ttl {
                return format!("no keep-alive answered within the lease's {} s", self.ttl_s);
            }
            let (member, mut c) = self.members.current();
            let (mut keeper, mut stream) = match tokio::time::timeout(every, c.lease_keep_alive(lease)).await {
                Ok(Ok(k)) => k,
                _ => {
                    self.members.failed(member, "making the lease's keep-alive stream");
                    tokio::time::sleep(RETRY).await;
                    continue;
                }
            };
            loop {
                if keeper.keep_alive().await.is_err() {
                    break;
                }
                match tokio::time::timeout(every, stream.message()).await {
                    Ok(Ok(Some(r))) if r.ttl() > 0 => last_ok = tokio::time::Instant::now(),
                    Ok(Ok(Some(_))) => return "the lease expired (etcd did not hear from this hub in time)".into(),
                    _ => break,
                }
                tokio::time::sleep(every).await;
            }
            self.members.failed(member, "the lease's keep-alive stream broke");
            tracing::warn!("the lease's keep-alive stream broke; making it again");
        }
    }
}

/// Slots kept per deployment, as one sorted list.
fn flatten_slots(all: BTreeMap<String, Vec<(u32, String)>>) -> Vec<Slot> {
    let mut v: Vec<Slot> = all
        .into_iter()
        .flat_map(|(d, s)| s.into_iter().map(move |(index, node)| Slot { deployment: d.clone(), index, node }))
        .collect();
    v.sort();
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_urls_name_hosts_and_a_prefix_and_bad_ones_say_what_is_wrong() {
        let t = EtcdTarget::parse("etcd://10.0.0.1:2379,10.0.0.2:2379", None).unwrap();
        assert_eq!(t.endpoints, ["http://10.0.0.1:2379", "http://10.0.0.2:2379"]);
        assert_eq!(t.prefix, "/skiff");
        assert_eq!(EtcdTarget::parse("etcd://h:2379/fleet/a/", None).unwrap().prefix, "/fleet/a");
        let tls = EtcdTls { ca: "ca.pem".into(), cert: None, key: None };
        let t = EtcdTarget::parse("etcds://h:2379", Some(tls.clone())).unwrap();
        assert_eq!(t.endpoints, ["https://h:2379"]);
        for (url, tls, why) in [
            ("h:2379", None, "expected etcd://"),
            ("http://h:2379", None, "etcd:// or etcds://"),
            ("etcds://h:2379", None, "--etcd-ca"),
            ("etcd://h:2379", Some(tls), "--etcd-ca"),
            ("etcd://h", None, "\"h\" is not HOST:PORT"),
            ("etcd://h:0", None, "is not HOST:PORT"),
            ("etcd://:2379", None, "is not HOST:PORT"),
            ("etcd://a:1,,b:2", None, "\"\" is not HOST:PORT"),
            ("etcd://h:2379/", None, "must name a path"),
        ] {
            let e = EtcdTarget::parse(url, tls).unwrap_err();
            assert!(e.contains(why), "{url}: {e}");
        }
    }
}
