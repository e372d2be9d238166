//! Secrets sealed at rest: what a store holds of a deployment's secret variables and
//! secret files, and the values every hub of a store shares (the CA, the admin token), is
//! encrypted with a key that lives beside the hub (`<data>/pki/secrets.key`, or
//! `--secrets-key`), never in the store. A copy of `hub.db`, of etcd's data or of its
//! traffic shows no secret.
//!
//! [`SealedStore`] wraps any [`Store`]: it seals on the way in and opens on the way out,
//! so the hub, the API and the nodes' assignments see plain values (the API redacts them;
//! a node is sent only the deployments placed on it).
//!
//! Sealing is deterministic (a nonce derived from the key, the value's place and the value,
//! as SIV does): the same secret seals to the same text, so a store still tells an
//! unchanged apply from a changed one, and a changed secret still makes a new revision.
//! The value's place (deployment, variable or file) is authenticated too: a sealed value
//! moved elsewhere in the store does not open. A value stored before sealing reads as it
//! is, and is sealed at its deployment's next change.
//!
//! Architecture Invariant: the secrets key never enters a store; every hub of one store
//! holds the same key, and a hub with another is refused at its start.

use crate::store::{
    Dump, JoinRefused, Joined, Lead, NodeJoin, NodeRecord, NodeSpec, Store, StoreError, Stored, TokenRecord,
};
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305, NONCE_LEN};
use ring::hmac;
use skiff_model::api::ApplyResponse;
use skiff_model::rollout::{self, Revision, RolloutState};
use skiff_model::Deployment;
use std::path::Path;
use std::sync::Arc;

/// What a sealed value starts with.
pub const SEALED: &str = "sealed:v1:";

/// The shared value (unsealed) that names the key a store's secrets are sealed with.
const KEY_ID: &str = "secrets_key_id";

/// The same, where a store keeps no shared values (SQLite): with controllers' state. It
/// stays with the store: never in a dump (a restore seals with its own key).
const KEY_STATE: &str = "seal/key_id";

/// A key file could not be used.
#[derive(Debug, thiserror::Error)]
#[error("secrets key {path}: {what}")]
pub struct KeyError {
    pub path: String,
    pub what: String,
}

/// The key secrets are sealed with.
pub struct SecretKey {
    aead: LessSafeKey,
    nonce: hmac::Key,
    id: String,
}

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SecretKey({})", self.id)
    }
}

impl SecretKey {
    /// The key of 32 random bytes (its sealing and nonce keys are derived from them).
    pub fn from_bytes(master: &[u8; 32]) -> Self {
        let k = hmac::Key::new(hmac::HMAC_SHA256, master);
        let derive = |what: &str| hmac::sign(&k, what.as_bytes());
        let enc = derive("skiff secrets: sealing v1");
        // A 32-byte key is what ChaCha20-Poly1305 takes: this cannot fail.
        let unbound = UnboundKey::new(&CHACHA20_POLY1305, enc.as_ref()).unwrap_or_else(|_| unreachable!());
        SecretKey {
            aead: LessSafeKey::new(unbound),
            nonce: hmac::Key::new(hmac::HMAC_SHA256, derive("skiff secrets: nonces v1").as_ref()),
            id: hex::encode(&derive("skiff secrets: key id v1").as_ref()[..6]),
        }
    }

    /// Reads the key file (base64 of 32 bytes), making it (mode 0600) when there is none.
    /// Hubs starting at once on one file all read the one key the first of them made. A
    /// file others may read is refused.
    pub fn load_or_create(path: &Path) -> Result<Self, KeyError> {
        use base64::Engine;
        use std::os::unix::fs::PermissionsExt;
        let bad = |what: String| KeyError { path: path.display().to_string(), what };
        if !path.exists() {
            let fresh = skiff_sys::random::bytes::<32>().map_err(|e| bad(e.to_string()))?;
            let text = format!("{}\n", base64::engine::general_purpose::STANDARD.encode(fresh));
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir).map_err(|e| bad(format!("making its directory: {e}")))?;
            }
            if skiff_sys::durable::create_new(path, text.as_bytes(), 0o600).map_err(|e| bad(e.to_string()))? {
                tracing::info!(path = %path.display(), "made a new secrets key: back it up with the hub's data");
            }
        }
        let meta = std::fs::metadata(path).map_err(|e| bad(e.to_string()))?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(bad(format!("others may read it (mode {mode:o}): chmod 600 it")));
        }
        let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(text.trim())
            .map_err(|e| bad(format!("not base64 ({e})")))?;
        let master: [u8; 32] = bytes.try_into().map_err(|b: Vec<u8>| bad(format!("{} bytes, not 32", b.len())))?;
        Ok(SecretKey::from_bytes(&master))
    }

    /// A short name of the key (not a secret): which key sealed a value.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// `plain`, sealed for `place` (where it is kept: it is authenticated with it).
    pub fn seal(&self, place: &str, plain: &str) -> String {
        use base64::Engine;
        let mut ctx = hmac::Context::with_key(&self.nonce);
        ctx.update(place.as_bytes());
        ctx.update(&[0]);
        ctx.update(plain.as_bytes());
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&ctx.sign().as_ref()[..NONCE_LEN]);
        let mut out = plain.as_bytes().to_vec();
        // Sealing in memory only fails for inputs of more than 256 GiB.
        let tag = self
            .aead
            .seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), Aad::from(place.as_bytes()), &mut out)
            .unwrap_or_else(|_| unreachable!());
        let mut blob = nonce.to_vec();
        blob.extend_from_slice(&out);
        blob.extend_from_slice(tag.as_ref());
        format!("{SEALED}{}:{}", self.id, base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(blob))
    }

    /// The plain value of what [`SecretKey::seal`] made for `place`; a value that is not
    /// sealed (stored before sealing) as it is.
    pub fn open(&self, place: &str, text: &str) -> Result<String, StoreError> {
        use base64::Engine;
        let Some(rest) = text.strip_prefix(SEALED) else { return Ok(text.to_string()) };
        let bad = |why: &str| StoreError::Sealed(format!("{place}: {why}"));
        let (id, blob) = rest.split_once(':').ok_or_else(|| bad("a sealed value without its key's id"))?;
        if id != self.id {
            return Err(bad(&format!(
                "sealed with secrets key {id}, and this hub's key is {}: start it with the key the store's other hubs use (--secrets-key)",
                self.id
            )));
        }
        let blob = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(blob).map_err(|_| bad("not base64"))?;
        if blob.len() < NONCE_LEN + CHACHA20_POLY1305.tag_len() {
            return Err(bad("too short to be sealed"));
        }
        let (nonce, sealed) = blob.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| bad("a bad nonce"))?;
        let mut sealed = sealed.to_vec();
        let plain = self
            .aead
            .open_in_place(nonce, Aad::from(place.as_bytes()), &mut sealed)
            .map_err(|_| bad("does not open with this hub's secrets key (altered, or moved from elsewhere)"))?;
        String::from_utf8(plain.to_vec()).map_err(|_| bad("not text"))
    }

    /// `d` with its secrets sealed.
    pub fn seal_spec(&self, d: &Deployment) -> Deployment {
        let mut d = d.clone();
        self.each_secret(&mut d, |place, v| Ok(self.seal(place, v))).unwrap_or_else(|_: StoreError| unreachable!());
        d
    }

    /// `d` with its secrets opened.
    pub fn open_spec(&self, mut d: Deployment) -> Result<Deployment, StoreError> {
        self.each_secret(&mut d, |place, v| self.open(place, v))?;
        Ok(d)
    }

    /// Replaces each secret value of `d` by `f(its place, it)`.
    fn each_secret(
        &self,
        d: &mut Deployment,
        f: impl Fn(&str, &str) -> Result<String, StoreError>,
    ) -> Result<(), StoreError> {
        let name = d.name.clone();
        for k in &d.secret_env {
            if let Some(v) = d.env.get_mut(k) {
                *v = f(&format!("deployments/{name}/env/{k}"), v)?;
            }
        }
        for m in d.files.iter_mut().filter(|m| m.secret) {
            for file in &mut m.files {
                file.data = f(&format!("deployments/{name}/files/{}/{}", m.target, file.path), &file.data)?;
            }
        }
        Ok(())
    }

    /// A revision opened, its template that of the plain spec (what nodes report).
    fn open_revision(&self, mut r: Revision) -> Result<Revision, StoreError> {
        r.spec = self.open_spec(r.spec)?;
        r.template = rollout::template_hash(&r.spec);
        Ok(r)
    }

    /// A revision sealed, its template that of the sealed spec (what the store compares).
    fn seal_revision(&self, r: &Revision) -> Revision {
        let spec = self.seal_spec(&r.spec);
        Revision { template: rollout::template_hash(&spec), spec, ..r.clone() }
    }
}

/// A store whose secrets are sealed with a key the hub holds (see the module's docs).
pub struct SealedStore {
    inner: Arc<dyn Store>,
    key: SecretKey,
}

impl SealedStore {
    /// Wraps `inner`; refused when the store's secrets are sealed with another key (a hub
    /// of a shared store started with a key of its own).
    pub fn new(inner: Arc<dyn Store>, key: SecretKey) -> Result<Self, StoreError> {
        let refused = |kept: &str| {
            StoreError::Sealed(format!(
                "the store's secrets are sealed with secrets key {kept}, and this hub's key is {}: give every hub of the store the same key file (--secrets-key; the first hub made it as <data>/pki/secrets.key)",
                key.id()
            ))
        };
        let kept = inner.shared(KEY_ID, key.id())?;
        if kept != key.id() {
            return Err(refused(&kept));
        }
        if inner.shared_value(KEY_ID)?.is_none() {
            match inner.states(KEY_STATE)?.into_iter().find(|(k, _)| k == KEY_STATE) {
                Some((_, kept)) if kept != key.id() => return Err(refused(&kept)),
                Some(_) => {}
                None => inner.put_state(KEY_STATE, Some(key.id()))?,
            }
        }
        Ok(SealedStore { inner, key })
    }

    fn opened(&self, s: Stored) -> Result<Stored, StoreError> {
        Ok(Stored { revision: s.revision, spec: self.key.open_spec(s.spec)? })
    }
}

impl Store for SealedStore {
    fn apply(
        &self,
        deployments: &[Deployment],
        prune_stack: Option<&str>,
        dry_run: bool,
        now_ms: u64,
    ) -> Result<ApplyResponse, StoreError> {
        let sealed: Vec<Deployment> = deployments.iter().map(|d| self.key.seal_spec(d)).collect();
        self.inner.apply(&sealed, prune_stack, dry_run, now_ms)
    }
    fn list(&self) -> Result<Vec<Stored>, StoreError> {
        self.inner.list()?.into_iter().map(|s| self.opened(s)).collect()
    }
    fn get(&self, name: &str) -> Result<Option<Stored>, StoreError> {
        self.inner.get(name)?.map(|s| self.opened(s)).transpose()
    }
    fn delete_all(&self, names: &[String]) -> Result<Vec<String>, StoreError> {
        self.inner.delete_all(names)
    }
    fn revision(&self) -> Result<u64, StoreError> {
        self.inner.revision()
    }
    fn create_token(&self, t: &TokenRecord) -> Result<(), StoreError> {
        self.inner.create_token(t)
    }
    fn token(&self, id: &str) -> Result<Option<TokenRecord>, StoreError> {
        self.inner.token(id)
    }
    fn tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        self.inner.tokens()
    }
    fn revoke_token(&self, id: &str) -> Result<bool, StoreError> {
        self.inner.revoke_token(id)
    }
    fn join_node(&self, j: &NodeJoin<'_>) -> Result<Result<Joined, JoinRefused>, StoreError> {
        self.inner.join_node(j)
    }
    fn set_node_info(&self, name: &str, info: &NodeSpec) -> Result<(), StoreError> {
        self.inner.set_node_info(name, info)
    }
    fn renew_cert(&self, name: &str, serial: &str, not_after_ms: u64, key_sha256: &str) -> Result<(), StoreError> {
        self.inner.renew_cert(name, serial, not_after_ms, key_sha256)
    }
    fn promote_cert(&self, name: &str, serial: &str, now_ms: u64) -> Result<(), StoreError> {
        self.inner.promote_cert(name, serial, now_ms)
    }
    fn node(&self, name: &str) -> Result<Option<NodeRecord>, StoreError> {
        self.inner.node(name)
    }
    fn nodes(&self) -> Result<crate::store::NodeList, StoreError> {
        self.inner.nodes()
    }
    fn revoke_node(&self, name: &str, now_ms: u64) -> Result<bool, StoreError> {
        self.inner.revoke_node(name, now_ms)
    }
    fn is_revoked(&self, serial: &str) -> Result<bool, StoreError> {
        self.inner.is_revoked(serial)
    }
    fn history(&self, name: &str) -> Result<Vec<Revision>, StoreError> {
        self.inner.history(name)?.into_iter().map(|r| self.key.open_revision(r)).collect()
    }
    fn progressing(&self) -> Result<Vec<String>, StoreError> {
        self.inner.progressing()
    }
    fn set_wave(&self, name: &str, revision: u64, nodes: &[String]) -> Result<u64, StoreError> {
        self.inner.set_wave(name, revision, nodes)
    }
    fn set_rollout(
        &self,
        name: &str,
        revision: u64,
        state: RolloutState,
        cause: Option<&str>,
        message: Option<&str>,
    ) -> Result<(), StoreError> {
        self.inner.set_rollout(name, revision, state, cause, message)
    }
    fn slots(&self) -> Result<std::sync::Arc<Vec<crate::schedule::Slot>>, StoreError> {
        self.inner.slots()
    }
    fn set_slots(&self, slots: &[crate::schedule::Slot]) -> Result<u64, StoreError> {
        self.inner.set_slots(slots)
    }
    fn shared(&self, key: &str, value: &str) -> Result<String, StoreError> {
        let place = format!("shared/{key}");
        self.key.open(&place, &self.inner.shared(key, &self.key.seal(&place, value))?)
    }
    fn shared_value(&self, key: &str) -> Result<Option<String>, StoreError> {
        let place = format!("shared/{key}");
        self.inner.shared_value(key)?.map(|v| self.key.open(&place, &v)).transpose()
    }
    fn campaign(&self, id: &str, ttl: std::time::Duration) -> Option<tokio::sync::watch::Receiver<Lead>> {
        self.inner.campaign(id, ttl)
    }
    fn hubs(&self, add: Option<&str>) -> Result<Vec<String>, StoreError> {
        self.inner.hubs(add)
    }
    fn resign(&self) {
        self.inner.resign()
    }
    fn revisions(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        self.inner.revisions()
    }
    fn put_state(&self, key: &str, value: Option<&str>) -> Result<(), StoreError> {
        self.inner.put_state(key, value)
    }
    fn put_states(&self, changes: &[(String, Option<String>)]) -> Result<(), StoreError> {
        self.inner.put_states(changes)
    }
    fn states(&self, prefix: &str) -> Result<Vec<(String, String)>, StoreError> {
        self.inner.states(prefix)
    }
    /// Opened: a dump moves to a store with another key (a backup holds the CA's key,
    /// and is as secret).
    fn export(&self) -> Result<Dump, StoreError> {
        let mut d = self.inner.export()?;
        d.state.remove(KEY_STATE);
        for x in &mut d.deployments {
            x.spec = self.key.open_spec(std::mem::replace(&mut x.spec, Deployment::new("", "")))?;
        }
        for h in d.history.values_mut() {
            *h = std::mem::take(h).into_iter().map(|r| self.key.open_revision(r)).collect::<Result<_, _>>()?;
        }
        Ok(d)
    }
    fn import(&self, dump: &Dump) -> Result<(), StoreError> {
        let mut d = dump.clone();
        d.state.remove(KEY_STATE);
        for x in &mut d.deployments {
            x.spec = self.key.seal_spec(&x.spec);
        }
        for h in d.history.values_mut() {
            *h = h.iter().map(|r| self.key.seal_revision(r)).collect();
        }
        self.inner.import(&d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SqliteStore;
    use skiff_model::options::{FileMount, MountedFile};

    fn key(b: u8) -> SecretKey {
        SecretKey::from_bytes(&[b; 32])
    }

    fn with_secrets() -> Deployment {
        let mut d = Deployment::new("db", "postgres:16");
        d.env.insert("POSTGRES_PASSWORD".into(), "hunter2-very-secret".into());
        d.env.insert("PGPORT".into(), "5432".into());
        d.secret_env = vec!["POSTGRES_PASSWORD".into()];
        let file = |text: &[u8]| vec![MountedFile::new("", text, 0o400)];
        d.files = vec![
            FileMount { target: "/run/secrets/tls.key".into(), files: file(b"-----PRIVATE KEY-----"), secret: true },
            FileMount { target: "/etc/app.conf".into(), files: file(b"plain config"), secret: false },
        ];
        d
    }

    #[test]
    fn sealing_is_deterministic_bound_to_its_place_and_its_key() {
        let k = key(1);
        let a = k.seal("deployments/db/env/P", "s3cret");
        assert!(a.starts_with(SEALED) && !a.contains("s3cret"), "{a}");
        assert_eq!(a, k.seal("deployments/db/env/P", "s3cret"), "same value, same place: same text");
        assert_ne!(a, k.seal("deployments/db/env/P", "s3cret2"));
        assert_ne!(a, k.seal("deployments/web/env/P", "s3cret"));
        assert_eq!(k.open("deployments/db/env/P", &a).unwrap(), "s3cret");
        let moved = k.open("deployments/web/env/P", &a).unwrap_err().to_string();
        assert!(moved.contains("deployments/web/env/P") && moved.contains("does not open"), "{moved}");
        let other = key(2).open("deployments/db/env/P", &a).unwrap_err().to_string();
        assert!(other.contains(&format!("sealed with secrets key {}", k.id())), "{other}");
        // One bit changed anywhere: refused, never a wrong value.
        let mut tampered = a.clone().into_bytes();
        let last = tampered.len() - 3;
        tampered[last] = if tampered[last] == b'A' { b'B' } else { b'A' };
        assert!(k.open("deployments/db/env/P", &String::from_utf8(tampered).unwrap()).is_err());
        assert_eq!(k.open("x", "stored before sealing").unwrap(), "stored before sealing");
        assert!(k.open("x", "sealed:v1:nocolon").is_err());
    }

    #[test]
    fn a_store_holds_secrets_sealed_and_the_hub_reads_them_plain() {
        let t = tempfile::tempdir().unwrap();
        let db = t.path().join("hub.db");
        let raw: Arc<dyn Store> = Arc::new(SqliteStore::open(&db).unwrap());
        let s = SealedStore::new(Arc::clone(&raw), key(1)).unwrap();
        let d = with_secrets();
        let r = s.apply(std::slice::from_ref(&d), None, false, 1).unwrap();
        assert_eq!(r.created, vec!["db"]);
        assert_eq!(s.get("db").unwrap().unwrap().spec, d);
        assert_eq!(s.list().unwrap()[0].spec, d);
        let h = s.history("db").unwrap();
        assert_eq!((h.len(), &h[0].spec), (1, &d));
        assert_eq!(h[0].template, rollout::template_hash(&d), "what nodes report");
        // The same apply again is no change; a changed secret is a new revision.
        assert_eq!(s.apply(std::slice::from_ref(&d), None, false, 2).unwrap().unchanged, vec!["db"]);
        let mut d2 = d.clone();
        d2.env.insert("POSTGRES_PASSWORD".into(), "rotated".into());
        assert_eq!(s.apply(std::slice::from_ref(&d2), None, false, 3).unwrap().updated, vec!["db"]);
        assert_eq!(s.history("db").unwrap().len(), 2);
        assert_eq!(s.shared("admin_token", "tok-123").unwrap(), "tok-123");
        // What is on disk holds none of them, but the plain config and variable.
        drop((s, raw));
        let bytes = std::fs::read(&db).unwrap();
        let has = |needle: &[u8]| bytes.windows(needle.len()).any(|w| w == needle);
        use base64::Engine;
        let b64 = |t: &[u8]| base64::engine::general_purpose::STANDARD.encode(t).into_bytes();
        for secret in [&b"hunter2-very-secret"[..], b"rotated"] {
            assert!(!has(secret), "{} is in hub.db", String::from_utf8_lossy(secret));
        }
        assert!(!has(&b64(b"-----PRIVATE KEY-----")), "the secret file is in hub.db");
        assert!(has(&b64(b"plain config")) && has(b"5432"), "what is not secret stays readable");
        // A hub with another key is refused at once (a lost or mistyped key file); and
        // a sealed value read with another key does not open.
        let raw: Arc<dyn Store> = Arc::new(SqliteStore::open(&db).unwrap());
        let e = SealedStore::new(Arc::clone(&raw), key(2)).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains(&format!("sealed with secrets key {}", key(1).id())) && e.contains("--secrets-key"), "{e}");
        let sealed = raw.get("db").unwrap().unwrap().spec.env["POSTGRES_PASSWORD"].clone();
        let e = key(2).open("deployments/db/env/POSTGRES_PASSWORD", &sealed).unwrap_err().to_string();
        assert!(e.contains("deployments/db/env/POSTGRES_PASSWORD") && e.contains("--secrets-key"), "{e}");
    }

    #[test]
    fn dumps_are_plain_and_an_import_seals_with_the_new_stores_key() {
        let t = tempfile::tempdir().unwrap();
        let open = |n: &str, k: u8| {
            let raw: Arc<dyn Store> = Arc::new(SqliteStore::open(&t.path().join(n)).unwrap());
            SealedStore::new(raw, key(k)).unwrap()
        };
        let a = open("a.db", 1);
        let d = with_secrets();
        a.apply(std::slice::from_ref(&d), None, false, 1).unwrap();
        let dump = a.export().unwrap();
        assert_eq!(dump.deployments[0].spec, d);
        assert_eq!(dump.history["db"][0].template, rollout::template_hash(&d));
        let b = open("b.db", 2);
        b.import(&dump).unwrap();
        assert_eq!(b.export().unwrap(), dump, "the copy reads the same");
        assert_eq!(b.apply(std::slice::from_ref(&d), None, false, 2).unwrap().unchanged, vec!["db"]);
    }

    #[test]
    fn key_files_are_made_once_private_and_checked() {
        use std::os::unix::fs::PermissionsExt;
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("pki/secrets.key");
        let a = SecretKey::load_or_create(&p).unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(SecretKey::load_or_create(&p).unwrap().id(), a.id(), "the same key on every start");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = SecretKey::load_or_create(&p).unwrap_err().to_string();
        assert!(e.contains("mode 644") && e.contains("chmod 600"), "{e}");
        std::fs::write(&p, "c2hvcnQ=\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        let e = SecretKey::load_or_create(&p).unwrap_err().to_string();
        assert!(e.contains("5 bytes, not 32"), "{e}");
    }
}
