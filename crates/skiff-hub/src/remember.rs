//! A store that remembers what it last read, for a hub whose store goes out of reach.
//!
//! When the active hub of a shared store (etcd) loses the store's lease because the store
//! no longer answers, it is [`Remembering::cut_off`]: from then on every read answers from
//! the copy of its last successful read — `skiff get`, `describe`, logs and exec through
//! the nodes' tunnels keep working — and every write is refused at once with a message
//! that says nothing was changed ([`StoreError::OutOfReach`]). Nothing is written while cut
//! off, so a request that comes once the hub is cut off changes nothing (the API marks its
//! 503, and the CLI may send it to another hub); one under way at the moment of the cut-off
//! may have made its first write and not its second. No controller runs (the hub stops
//! them). The hub starts over as a standby once the store answers again (or another hub
//! leads).
//!
//! Before the hub is cut off every read goes to the store (a failed one is an error, never
//! an older copy: the controllers write what they read), and a write that changes who may
//! do what forgets the copies of tokens, nodes and revoked certificates.
//!
//! Architecture Invariant: a hub cut off from its store changes nothing, anywhere.

use crate::schedule::Slot;
use crate::store::{
    find_node, Dump, JoinRefused, Joined, Lead, NodeJoin, NodeList, NodeRecord, NodeSpec, Store, StoreError, Stored,
    TokenRecord,
};
use skiff_model::api::ApplyResponse;
use skiff_model::rollout::{Revision, RolloutState};
use skiff_model::Deployment;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Entries kept per keyed read (a node by name, a serial's revocation): more are
/// forgotten wholesale (every key comes from an authenticated caller).
const KEYED_MAX: usize = 10_000;

/// What the store last answered to each read.
#[derive(Default)]
struct Seen {
    list: Option<Vec<Stored>>,
    revision: Option<u64>,
    tokens: Option<Vec<TokenRecord>>,
    token: HashMap<String, Option<TokenRecord>>,
    nodes: Option<NodeList>,
    node: HashMap<String, Option<NodeRecord>>,
    revoked: HashMap<String, bool>,
    history: HashMap<String, Vec<Revision>>,
    progressing: Option<Vec<String>>,
    slots: Option<Arc<Vec<Slot>>>,
    shared: HashMap<String, Option<String>>,
    states: HashMap<String, Vec<(String, String)>>,
    hubs: Option<Vec<String>>,
}

fn keep<V>(m: &mut HashMap<String, V>, k: &str, v: V) {
    if m.len() >= KEYED_MAX && !m.contains_key(k) {
        m.clear();
    }
    m.insert(k.to_string(), v);
}

pub struct Remembering {
    inner: Arc<dyn Store>,
    /// Whether copies are kept at all: only on a store hubs campaign for (etcd), the only
    /// kind a hub can be cut off from; a SQLite hub pays nothing.
    keeping: std::sync::atomic::AtomicBool,
    /// Why the store is out of reach, while it is.
    cut: Mutex<Option<String>>,
    seen: Mutex<Seen>,
}

impl Remembering {
    pub fn new(inner: Arc<dyn Store>) -> Self {
        Remembering {
            inner,
            keeping: std::sync::atomic::AtomicBool::new(false),
            cut: Mutex::new(None),
            seen: Mutex::new(Seen::default()),
        }
    }

    /// Keeps copies from now on, whatever the store (a store hubs campaign for turns
    /// this on by itself).
    pub fn keeping(self) -> Self {
        self.keeping.store(true, std::sync::atomic::Ordering::Relaxed);
        self
    }

    /// From now on reads answer from memory and writes are refused (`why` says why).
    pub fn cut_off(&self, why: &str) {
        if let Ok(mut c) = self.cut.lock() {
            *c = Some(why.to_string());
        }
    }

    /// Whether the store itself answers now (asked even while cut off).
    pub fn answers(&self) -> bool {
        self.inner.revision().is_ok()
    }

    fn why(&self) -> Option<String> {
        self.cut.lock().ok().and_then(|c| c.clone())
    }

    fn refused(why: &str) -> StoreError {
        StoreError::OutOfReach(format!(
            "the hub's store cannot be reached ({why}); nothing was changed. The hub shows what it last read, \
             and nodes keep running their workloads, until the store answers again"
        ))
    }

    /// A read: from the store while it answers (the answer kept), else from the copy.
    fn read<T: Clone>(
        &self,
        what: &str,
        fresh: impl FnOnce() -> Result<T, StoreError>,
        put: impl FnOnce(&mut Seen, &T),
        get: impl FnOnce(&Seen) -> Option<T>,
    ) -> Result<T, StoreError> {
        let kept = |s: &Mutex<Seen>| s.lock().ok().and_then(|s| get(&s));
        match self.why() {
            Some(why) => kept(&self.seen).ok_or_else(|| {
                StoreError::OutOfReach(format!(
                    "the hub's store cannot be reached ({why}), and this hub has not read {what} before"
                ))
            }),
            None => match fresh() {
                Ok(v) => {
                    if self.keeping.load(std::sync::atomic::Ordering::Relaxed) {
                        if let Ok(mut s) = self.seen.lock() {
                            put(&mut s, &v);
                        }
                    }
                    Ok(v)
                }
                Err(e) => Err(e),
            },
        }
    }

    /// A write: refused while cut off.
    fn write<T>(&self, f: impl FnOnce() -> Result<T, StoreError>) -> Result<T, StoreError> {
        match self.why() {
            Some(why) => Err(Self::refused(&why)),
            None => f(),
        }
    }

    /// A write that changes who may do what (tokens, nodes, certificates): the copies
    /// of those answers are forgotten, so a cut-off that comes before they are read
    /// again refuses (the node lists are read again every second) rather than trusting a
    /// revoked token or node.
    fn write_identity<T>(&self, f: impl FnOnce() -> Result<T, StoreError>) -> Result<T, StoreError> {
        let r = self.write(f);
        if let Ok(mut s) = self.seen.lock() {
            s.tokens = None;
            s.token.clear();
            s.nodes = None;
            s.node.clear();
            s.revoked.clear();
        }
        r
    }
}

impl Store for Remembering {
    fn apply(
        &self,
        deployments: &[Deployment],
        prune_stack: Option<&str>,
        dry_run: bool,
        now_ms: u64,
    ) -> Result<ApplyResponse, StoreError> {
        self.write(|| self.inner.apply(deployments, prune_stack, dry_run, now_ms))
    }

    fn list(&self) -> Result<Vec<Stored>, StoreError> {
        self.read("the deployments", || self.inner.list(), |s, v| s.list = Some(v.clone()), |s| s.list.clone())
    }

    fn get(&self, name: &str) -> Result<Option<Stored>, StoreError> {
        self.read(
            "the deployments",
            || self.inner.get(name),
            |_, _| {},
            |s| s.list.as_ref().map(|l| l.iter().find(|d| d.spec.name == name).cloned()),
        )
    }

    fn delete_all(&self, names: &[String]) -> Result<Vec<String>, StoreError> {
        self.write(|| self.inner.delete_all(names))
    }

    fn revision(&self) -> Result<u64, StoreError> {
        self.read("the revision", || self.inner.revision(), |s, v| s.revision = Some(*v), |s| s.revision)
    }

    fn create_token(&self, t: &TokenRecord) -> Result<(), StoreError> {
        self.write_identity(|| self.inner.create_token(t))
    }

    fn token(&self, id: &str) -> Result<Option<TokenRecord>, StoreError> {
        self.read(
            "that token",
            || self.inner.token(id),
            |s, v| keep(&mut s.token, id, v.clone()),
            |s| s.token.get(id).cloned().or_else(|| s.tokens.as_ref().map(|t| t.iter().find(|t| t.id == id).cloned())),
        )
    }

    fn tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        self.read("the tokens", || self.inner.tokens(), |s, v| s.tokens = Some(v.clone()), |s| s.tokens.clone())
    }

    fn revoke_token(&self, id: &str) -> Result<bool, StoreError> {
        self.write_identity(|| self.inner.revoke_token(id))
    }

    fn join_node(&self, j: &NodeJoin<'_>) -> Result<Result<Joined, JoinRefused>, StoreError> {
        self.write_identity(|| self.inner.join_node(j))
    }

    fn set_node_info(&self, name: &str, info: &NodeSpec) -> Result<(), StoreError> {
        self.write_identity(|| self.inner.set_node_info(name, info))
    }

    fn renew_cert(&self, name: &str, serial: &str, not_after_ms: u64, key_sha256: &str) -> Result<(), StoreError> {
        self.write_identity(|| self.inner.renew_cert(name, serial, not_after_ms, key_sha256))
    }

    fn promote_cert(&self, name: &str, serial: &str, now_ms: u64) -> Result<(), StoreError> {
        self.write_identity(|| self.inner.promote_cert(name, serial, now_ms))
    }

    fn node(&self, name: &str) -> Result<Option<NodeRecord>, StoreError> {
        self.read(
            "that node",
            || self.inner.node(name),
            |s, v| keep(&mut s.node, name, v.clone()),
            |s| s.node.get(name).cloned().or_else(|| s.nodes.as_ref().map(|n| find_node(n, name).cloned())),
        )
    }

    fn nodes(&self) -> Result<NodeList, StoreError> {
        self.read("the nodes", || self.inner.nodes(), |s, v| s.nodes = Some(v.clone()), |s| s.nodes.clone())
    }

    fn revoke_node(&self, name: &str, now_ms: u64) -> Result<bool, StoreError> {
        self.write_identity(|| self.inner.revoke_node(name, now_ms))
    }

    fn is_revoked(&self, serial: &str) -> Result<bool, StoreError> {
        self.read(
            "that certificate",
            || self.inner.is_revoked(serial),
            |s, v| keep(&mut s.revoked, serial, *v),
            |s| s.revoked.get(serial).copied(),
        )
    }

    fn history(&self, name: &str) -> Result<Vec<Revision>, StoreError> {
        self.read(
            "that history",
            || self.inner.history(name),
            |s, v| keep(&mut s.history, name, v.clone()),
            |s| s.history.get(name).cloned(),
        )
    }

    fn progressing(&self) -> Result<Vec<String>, StoreError> {
        self.read(
            "the rollouts",
            || self.inner.progressing(),
            |s, v| s.progressing = Some(v.clone()),
            |s| s.progressing.clone(),
        )
    }

    fn set_wave(&self, name: &str, revision: u64, nodes: &[String]) -> Result<u64, StoreError> {
        self.write(|| self.inner.set_wave(name, revision, nodes))
    }

    fn set_rollout(
        &self,
        name: &str,
        revision: u64,
        state: RolloutState,
        cause: Option<&str>,
        message: Option<&str>,
    ) -> Result<(), StoreError> {
        self.write(|| self.inner.set_rollout(name, revision, state, cause, message))
    }

    fn slots(&self) -> Result<Arc<Vec<Slot>>, StoreError> {
        self.read("the placement", || self.inner.slots(), |s, v| s.slots = Some(v.clone()), |s| s.slots.clone())
    }

    fn set_slots(&self, slots: &[Slot]) -> Result<u64, StoreError> {
        self.write(|| self.inner.set_slots(slots))
    }

    fn shared(&self, key: &str, value: &str) -> Result<String, StoreError> {
        self.write(|| self.inner.shared(key, value))
    }

    fn shared_value(&self, key: &str) -> Result<Option<String>, StoreError> {
        self.read(
            "that shared value",
            || self.inner.shared_value(key),
            |s, v| keep(&mut s.shared, key, v.clone()),
            |s| s.shared.get(key).cloned(),
        )
    }

    fn campaign(&self, id: &str, ttl: std::time::Duration) -> Option<tokio::sync::watch::Receiver<Lead>> {
        let lead = self.inner.campaign(id, ttl);
        self.keeping.store(lead.is_some(), std::sync::atomic::Ordering::Relaxed);
        lead
    }

    fn hubs(&self, add: Option<&str>) -> Result<Vec<String>, StoreError> {
        if add.is_some() {
            return self.write(|| self.inner.hubs(add));
        }
        self.read("the hubs", || self.inner.hubs(None), |s, v| s.hubs = Some(v.clone()), |s| s.hubs.clone())
    }

    fn resign(&self) {
        self.inner.resign()
    }

    fn revisions(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        self.inner.revisions()
    }

    fn put_state(&self, key: &str, value: Option<&str>) -> Result<(), StoreError> {
        self.write(|| self.inner.put_state(key, value))
    }

    fn put_states(&self, changes: &[(String, Option<String>)]) -> Result<(), StoreError> {
        self.write(|| self.inner.put_states(changes))
    }

    fn states(&self, prefix: &str) -> Result<Vec<(String, String)>, StoreError> {
        self.read(
            "that state",
            || self.inner.states(prefix),
            |s, v| keep(&mut s.states, prefix, v.clone()),
            |s| s.states.get(prefix).cloned(),
        )
    }

    fn export(&self) -> Result<Dump, StoreError> {
        self.write(|| self.inner.export())
    }

    fn import(&self, dump: &Dump) -> Result<(), StoreError> {
        self.write(|| self.inner.import(dump))
    }

    fn out_of_reach(&self) -> Option<String> {
        self.why()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SqliteStore;

    #[test]
    fn cut_off_it_reads_what_it_saw_and_writes_nothing() {
        let t = tempfile::tempdir().unwrap();
        let inner: Arc<dyn Store> = Arc::new(SqliteStore::open(&t.path().join("hub.db")).unwrap());
        let r = Remembering::new(Arc::clone(&inner)).keeping();
        r.apply(&[Deployment::new("web", "img:1")], None, false, 1).unwrap();
        assert_eq!(r.list().unwrap().len(), 1);
        assert_eq!(r.history("web").unwrap().len(), 1);
        let rev = r.revision().unwrap();
        assert!(r.out_of_reach().is_none());

        r.cut_off("etcd at 127.0.0.1:2379 does not answer");
        assert_eq!(r.out_of_reach().as_deref(), Some("etcd at 127.0.0.1:2379 does not answer"));
        // Reads: what it saw, also a deployment by name from the list it read.
        assert_eq!(r.list().unwrap()[0].spec.image, "img:1");
        assert_eq!(r.get("web").unwrap().map(|s| s.spec.image), Some("img:1".into()));
        assert_eq!(r.get("db").unwrap(), None);
        assert_eq!(r.history("web").unwrap().len(), 1);
        assert_eq!(r.revision().unwrap(), rev);
        // What it never read is an error that says so.
        let e = r.tokens().unwrap_err().to_string();
        assert!(e.contains("does not answer") && e.contains("has not read the tokens"), "{e}");
        // Writes: refused, naming the cause; the store is untouched.
        let e = r.apply(&[Deployment::new("web", "img:2")], None, false, 2).unwrap_err().to_string();
        assert!(e.contains("nothing was changed") && e.contains("does not answer"), "{e}");
        assert!(r.delete("web").is_err() && r.put_state("k", Some("v")).is_err() && r.set_slots(&[]).is_err());
        assert_eq!(inner.list().unwrap()[0].spec.image, "img:1");
        assert_eq!(inner.revision().unwrap(), rev);
        assert!(inner.states("k").unwrap().is_empty());
        assert!(r.answers(), "the store itself is asked");
    }

    /// Through the real router, cut off: every change is a 503 that says why (never a
    /// 500, which would tell the operator the hub is broken), and so is a read of what the
    /// hub never saw; what it saw still answers.
    #[test]
    fn the_api_refuses_every_change_with_a_503_while_cut_off() {
        use tower::ServiceExt;
        let t = tempfile::tempdir().unwrap();
        let inner: Arc<dyn Store> = Arc::new(SqliteStore::open(&t.path().join("hub.db")).unwrap());
        let r = Arc::new(Remembering::new(inner).keeping());
        let store: Arc<dyn Store> = Arc::clone(&r) as Arc<dyn Store>;
        let ca = crate::pki::Ca::load_or_create(&t.path().join("pki")).unwrap();
        let fleet = crate::fleet::Fleet::new(ca, Arc::clone(&store), crate::clock::system()).unwrap();
        let nodes = Arc::new(crate::nodes::Remote(Arc::new(fleet)));
        let hub = Arc::new(crate::Hub::new(store, nodes, "admin".into()));
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let call_as = |bearer: &str, method: &str, path: &str, body: &str| -> (u16, String, bool) {
            let req = axum::http::Request::builder()
                .method(method)
                .uri(path)
                .header("authorization", format!("Bearer {bearer}"))
                .header("content-type", "application/json")
                .body(axum::body::Body::from(body.to_string()))
                .unwrap();
            rt.block_on(async {
                let resp = crate::api::router(Arc::clone(&hub)).oneshot(req).await.unwrap();
                let status = resp.status().as_u16();
                let unchanged = resp.headers().get(skiff_model::api::UNCHANGED_HEADER).is_some_and(|v| v == "cut-off");
                let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20).await.unwrap();
                (status, String::from_utf8_lossy(&bytes).into_owned(), unchanged)
            })
        };
        let call = |method: &str, path: &str, body: &str| call_as("admin", method, path, body);
        let apply = |image: &str| format!(r#"{{"deployments":[{{"name":"web","image":"{image}"}}]}}"#);
        for image in ["img:1", "img:2"] {
            assert_eq!(call("POST", "/api/v1/apply", &apply(image)).0, 200);
        }
        for read in ["/api/v1/deployments/web", "/api/v1/deployments/web/history"] {
            assert_eq!(call("GET", read, "").0, 200, "{read}");
        }

        r.cut_off("etcd at 127.0.0.1:2379 does not answer");
        for (method, path, body) in [
            ("POST", "/api/v1/apply", apply("img:3").as_str()),
            ("POST", "/api/v1/deployments/web/undo", r#"{"to_revision":1}"#),
            ("DELETE", "/api/v1/deployments/web", ""),
            ("POST", "/api/v1/tokens", ""),
            ("DELETE", "/api/v1/tokens/abc", ""),
            ("DELETE", "/api/v1/nodes/edge-1", ""),
            ("DELETE", "/api/v1/k8s-services/s/n", ""),
            ("GET", "/api/v1/tokens", ""),
        ] {
            let (status, said, unchanged) = call(method, path, body);
            assert_eq!(status, 503, "{method} {path}: {said}");
            assert!(said.contains("does not answer") && unchanged, "{method} {path}: {said} (marked: {unchanged})");
        }
        // An API token it has not read since: it cannot tell (not "wrong token").
        let (status, said, unchanged) = call_as("SKA1.abc.def", "GET", "/api/v1/deployments", "");
        assert!(status == 503 && said.contains("does not answer") && unchanged, "{status} {said}");
        for read in ["/api/v1/deployments/web", "/api/v1/deployments/web/history"] {
            let (status, said, unchanged) = call("GET", read, "");
            assert!(status == 200 && said.contains("img:2") && !unchanged, "{read}: {status} {said}");
        }
    }

    /// A revoked token is not trusted from an older copy once the hub is cut off.
    #[test]
    fn identity_changes_forget_the_copies() {
        let t = tempfile::tempdir().unwrap();
        let inner: Arc<dyn Store> = Arc::new(SqliteStore::open(&t.path().join("hub.db")).unwrap());
        let r = Remembering::new(inner).keeping();
        let tok = TokenRecord {
            id: "t1".into(),
            secret_sha256: "x".into(),
            created_ms: 1,
            expires_ms: None,
            revoked: false,
            role: Default::default(),
            max_uses: None,
            used: 0,
            replace: None,
        };
        r.create_token(&tok).unwrap();
        assert!(r.token("t1").unwrap().is_some_and(|t| !t.revoked));
        assert!(r.revoke_token("t1").unwrap());
        r.cut_off("gone");
        let e = r.token("t1").unwrap_err().to_string();
        assert!(e.contains("has not read that token"), "{e}");
    }
}
