//! The hub's store of desired state. Every change bumps one global revision, and every
//! object carries the revision that last changed it (so watchers can ask "what changed
//! since N"). SQLite is the embedded default; the etcd backend implements the same trait.

use rusqlite::{params, Connection, OptionalExtension};
use skiff_model::api::ApplyResponse;
pub use skiff_model::proto::NodeSpec;
use skiff_model::rollout::{self, Revision, RolloutState};
use skiff_model::Deployment;
use std::path::Path;
use std::sync::{Arc, Mutex};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("hub store: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("hub store holds an unreadable record: {0}")]
    Json(#[from] serde_json::Error),
    #[error("hub store lock poisoned")]
    Poisoned,
    #[error("hub store: {0}")]
    Etcd(String),
    /// The hub is cut off from its store (see [`crate::remember`]).
    #[error("{0}")]
    OutOfReach(String),
    #[error("hub store: {0} exists already")]
    Exists(String),
    #[error("hub store: {0}")]
    NotEmpty(String),
    #[error("hub store: a dump of format {0}; this skiff reads format {DUMP_FORMAT}")]
    DumpFormat(u32),
    /// A sealed secret that does not open (see [`crate::seal`]).
    #[error("hub store: {0}")]
    Sealed(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Stored {
    pub revision: u64,
    pub spec: Deployment,
}

/// The node records as [`Store::nodes`] gives them: sorted by name, shared.
pub type NodeList = Arc<Vec<Arc<NodeRecord>>>;

/// The record named `name` in a [`NodeList`] (sorted by name, so a binary search).
pub fn find_node<'a>(nodes: &'a [Arc<NodeRecord>], name: &str) -> Option<&'a NodeRecord> {
    nodes.binary_search_by(|n| n.name.as_str().cmp(name)).ok().map(|i| &*nodes[i])
}

pub trait Store: Send + Sync {
    /// Creates or updates `deployments` and (with `prune_stack`) deletes the stack's
    /// others, atomically. With `dry_run` nothing is written.
    fn apply(
        &self,
        deployments: &[Deployment],
        prune_stack: Option<&str>,
        dry_run: bool,
        now_ms: u64,
    ) -> Result<ApplyResponse, StoreError>;
    fn list(&self) -> Result<Vec<Stored>, StoreError>;
    fn get(&self, name: &str) -> Result<Option<Stored>, StoreError>;
    /// Returns whether it existed.
    fn delete(&self, name: &str) -> Result<bool, StoreError> {
        Ok(!self.delete_all(&[name.to_string()])?.is_empty())
    }
    /// Deletes these deployments (and their histories) together, atomically; returns
    /// those that existed.
    fn delete_all(&self, names: &[String]) -> Result<Vec<String>, StoreError>;
    fn revision(&self) -> Result<u64, StoreError>;

    fn create_token(&self, t: &TokenRecord) -> Result<(), StoreError>;
    fn token(&self, id: &str) -> Result<Option<TokenRecord>, StoreError>;
    fn tokens(&self) -> Result<Vec<TokenRecord>, StoreError>;
    /// Returns whether it existed.
    fn revoke_token(&self, id: &str) -> Result<bool, StoreError>;

    /// Records a joining node, in one transaction with the use of its token: the token
    /// must still be usable (not revoked, not expired at `j.now_ms`, uses left) and the
    /// name free, unless the token was made to replace that node. A replaced node's
    /// certificates are revoked. `Ok(Err(_))` says why the join is refused.
    fn join_node(&self, j: &NodeJoin<'_>) -> Result<Result<Joined, JoinRefused>, StoreError>;
    /// Changes what a node says of itself (its runtimes); bumps the revision.
    fn set_node_info(&self, name: &str, info: &NodeSpec) -> Result<(), StoreError>;
    /// Records a renewed certificate (and the sha256 of its key), accepted beside the
    /// current one until the node first presents it ([`Store::promote_cert`]).
    fn renew_cert(&self, name: &str, serial: &str, not_after_ms: u64, key_sha256: &str) -> Result<(), StoreError>;
    /// The node now uses its renewed certificate: the previous one is revoked.
    fn promote_cert(&self, name: &str, serial: &str, now_ms: u64) -> Result<(), StoreError>;
    fn node(&self, name: &str) -> Result<Option<NodeRecord>, StoreError>;
    /// Every node record, sorted by name. Shared, not copied: a hub of 100,000 nodes
    /// reads them at each placement and each change of the services' table.
    fn nodes(&self) -> Result<NodeList, StoreError>;
    /// Revokes the node's certificates (for good) and forgets the node, so its name may
    /// join again with a new token. Returns whether it existed.
    fn revoke_node(&self, name: &str, now_ms: u64) -> Result<bool, StoreError>;
    /// Whether a certificate serial has been revoked.
    fn is_revoked(&self, serial: &str) -> Result<bool, StoreError>;

    /// `name`'s revision history, oldest first (at most `HISTORY_LIMIT`).
    fn history(&self, name: &str) -> Result<Vec<Revision>, StoreError>;
    /// Deployments whose newest revision is still rolling out (what the rollout controller
    /// has to look at; usually none).
    fn progressing(&self) -> Result<Vec<String>, StoreError>;
    /// Moves a revision's rollout on to more nodes (bumps the revision: assignments change).
    fn set_wave(&self, name: &str, revision: u64, nodes: &[String]) -> Result<u64, StoreError>;
    /// Records how a revision's rollout ended, and optionally why it was made.
    fn set_rollout(
        &self,
        name: &str,
        revision: u64,
        state: RolloutState,
        cause: Option<&str>,
        message: Option<&str>,
    ) -> Result<(), StoreError>;

    /// Where each instance is placed (see `schedule`).
    fn slots(&self) -> Result<Arc<Vec<crate::schedule::Slot>>, StoreError>;
    /// Replaces the placement; bumps the revision only when it changed. Returns the revision.
    fn set_slots(&self, slots: &[crate::schedule::Slot]) -> Result<u64, StoreError>;

    /// A value every hub on this store shares (the CA, the admin token): `value` if the
    /// store had none (it is kept), else the one kept. A store only one hub uses keeps
    /// nothing: `value` itself.
    fn shared(&self, _key: &str, value: &str) -> Result<String, StoreError> {
        Ok(value.to_string())
    }

    /// The shared value under `key`, if the store keeps one.
    fn shared_value(&self, _key: &str) -> Result<Option<String>, StoreError> {
        Ok(None)
    }

    /// Competes to be the one active hub of a store several hubs share; `None` when only
    /// one hub can use it. The receiver says whether this hub leads now: it turns true
    /// once the hub holds the store's lease, and false, for good, if it loses it (the hub
    /// must then stop; writes made after are refused by the store).
    fn campaign(&self, _id: &str, _ttl: std::time::Duration) -> Option<tokio::sync::watch::Receiver<Lead>> {
        None
    }

    /// The URLs of the hubs of this store (adding `add` first): a store only one hub
    /// uses knows only that one.
    fn hubs(&self, add: Option<&str>) -> Result<Vec<String>, StoreError> {
        Ok(add.into_iter().map(String::from).collect())
    }

    /// Gives up the lead now (a clean stop), so a standby need not wait out the lease.
    fn resign(&self) {}

    /// The store's revision as it moves, for a store other hubs change too: a hub learns
    /// of another's change at once, not at its next look. `None`: only this hub changes it.
    fn revisions(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        None
    }

    /// Why the hub answers from what it last read and writes nothing, while it does
    /// (see [`crate::remember`]).
    fn out_of_reach(&self) -> Option<String> {
        None
    }

    /// Controllers' state that must outlive a hub (an autoscaler's stabilization window):
    /// `value` under `key`, or no value (`None`).
    fn put_state(&self, key: &str, value: Option<&str>) -> Result<(), StoreError>;
    /// Several state changes at once (in one transaction where the store has them).
    fn put_states(&self, changes: &[(String, Option<String>)]) -> Result<(), StoreError> {
        for (key, value) in changes {
            self.put_state(key, value.as_deref())?;
        }
        Ok(())
    }
    /// Every state value whose key starts with `prefix`, by key.
    fn states(&self, prefix: &str) -> Result<Vec<(String, String)>, StoreError>;

    /// Everything the store holds, for a backup or a move to another store.
    fn export(&self) -> Result<Dump, StoreError>;
    /// Fills an empty store from a dump; a store that holds anything is refused
    /// ([`StoreError::NotEmpty`]) and left as it is.
    fn import(&self, dump: &Dump) -> Result<(), StoreError>;
}

/// Where a hub stands among the hubs of its store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lead {
    /// Another hub is active (named when known); this one takes over when it goes.
    Standby(Option<String>),
    /// This hub holds the store's lease.
    Active,
    /// This hub held the lease and lost it: it must stop acting.
    Lost(String),
}

/// The whole of a store (`skiff hub backup`, `restore`, `migrate`), as JSON.
#[derive(Debug, Clone, PartialEq, Default, serde::Serialize, serde::Deserialize)]
pub struct Dump {
    /// The dump's format (this one: 1).
    pub format: u32,
    pub revision: u64,
    pub deployments: Vec<DumpedDeployment>,
    /// Each deployment's revisions, oldest first.
    pub history: std::collections::BTreeMap<String, Vec<Revision>>,
    pub tokens: Vec<TokenRecord>,
    pub nodes: Vec<StoredNode>,
    pub revoked: Vec<RevokedCert>,
    pub slots: Vec<crate::schedule::Slot>,
    /// Controllers' state ([`Store::put_state`]).
    #[serde(default)]
    pub state: std::collections::BTreeMap<String, String>,
}

pub const DUMP_FORMAT: u32 = 1;

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DumpedDeployment {
    pub revision: u64,
    pub spec: Deployment,
}

/// A node as a store keeps it: its record and what only the store needs (the key and
/// the token it joined with, which tell a repeated join from a takeover).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StoredNode {
    #[serde(flatten)]
    pub record: NodeRecord,
    pub key_sha256: Option<String>,
    pub next_key_sha256: Option<String>,
    pub token_id: Option<String>,
}

/// A revoked certificate serial, kept for good.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RevokedCert {
    pub serial: String,
    pub node: String,
    pub revoked_ms: u64,
}

fn token_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<TokenRecord> {
    let role: String = r.get(5)?;
    Ok(TokenRecord {
        id: r.get(0)?,
        secret_sha256: r.get(1)?,
        created_ms: r.get::<_, i64>(2)? as u64,
        expires_ms: r.get::<_, Option<i64>>(3)?.map(|v| v as u64),
        revoked: r.get::<_, i64>(4)? != 0,
        role: TokenRole::parse(&role).unwrap_or(TokenRole::Join),
        max_uses: r.get::<_, Option<i64>>(6)?.map(|v| v as u32),
        used: r.get::<_, i64>(7)? as u32,
        replace: r.get(8)?,
    })
}

fn node_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<(NodeRecord, String)> {
    Ok((
        NodeRecord {
            name: r.get(0)?,
            revision: r.get::<_, i64>(1)? as u64,
            cert_serial: r.get(2)?,
            joined_ms: r.get::<_, i64>(3)? as u64,
            info: NodeSpec::default(),
            not_after_ms: r.get::<_, Option<i64>>(5)?.map(|v| v as u64),
            next_serial: r.get(6)?,
            next_not_after_ms: r.get::<_, Option<i64>>(7)?.map(|v| v as u64),
        },
        r.get(4)?,
    ))
}

const TOKEN_COLS: &str = "id, secret_sha256, created_ms, expires_ms, revoked, role, max_uses, used, replace_node";
const NODE_COLS: &str = "name, revision, cert_serial, joined_ms, info, not_after_ms, next_serial, next_not_after_ms";

/// Why a join with token `t` is refused, if it is (`exists`: the name is taken; `retry`:
/// by this very node, asking again with its key and token). Both stores judge by it.
pub(crate) fn join_refusal(t: &TokenRecord, j: &NodeJoin<'_>, exists: bool, retry: bool) -> Option<JoinRefused> {
    if t.role != TokenRole::Join {
        Some(JoinRefused::NotAJoinToken(t.id.clone()))
    } else if t.revoked {
        Some(JoinRefused::TokenRevoked(t.id.clone()))
    } else if t.expires_ms.is_some_and(|e| e <= j.now_ms) {
        Some(JoinRefused::TokenExpired(t.id.clone()))
    } else if !retry && t.max_uses.is_some_and(|m| t.used >= m) {
        Some(JoinRefused::TokenUsedUp(t.id.clone(), t.used))
    } else if exists && !retry && t.replace.as_deref() != Some(j.name) {
        Some(JoinRefused::NameTaken(j.name.into()))
    } else {
        None
    }
}

fn slot_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<crate::schedule::Slot> {
    Ok(crate::schedule::Slot { deployment: r.get(0)?, index: r.get::<_, i64>(1)? as u32, node: r.get(2)? })
}

/// Inserts a token row (ids are unique: a second is an error).
fn insert_token(conn: &Connection, t: &TokenRecord) -> Result<(), StoreError> {
    conn.execute(
        "INSERT INTO join_tokens (id, secret_sha256, created_ms, expires_ms, revoked, role, max_uses, used, replace_node)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        params![
            t.id,
            t.secret_sha256,
            t.created_ms as i64,
            t.expires_ms.map(|v| v as i64),
            t.revoked as i64,
            t.role.as_str(),
            t.max_uses.map(i64::from),
            i64::from(t.used),
            t.replace
        ],
    )?;
    Ok(())
}

/// Revokes the node's current (and pending) certificate serials.
fn revoke_serials(tx: &rusqlite::Transaction<'_>, name: &str, now_ms: u64) -> Result<(), StoreError> {
    tx.execute(
        "INSERT OR IGNORE INTO revoked_certs (serial, node, revoked_ms)
         SELECT cert_serial, name, ?2 FROM nodes WHERE name = ?1
         UNION ALL SELECT next_serial, name, ?2 FROM nodes WHERE name = ?1 AND next_serial IS NOT NULL",
        params![name, now_ms as i64],
    )?;
    Ok(())
}

pub struct SqliteStore {
    conn: Mutex<Connection>,
}

const MIGRATIONS: &[&str] = &[
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
     INSERT INTO meta (key, value) VALUES ('revision', 0);
     CREATE TABLE deployments (name TEXT PRIMARY KEY, stack TEXT NOT NULL, revision INTEGER NOT NULL, spec TEXT NOT NULL);",
    "CREATE TABLE join_tokens (id TEXT PRIMARY KEY, secret_sha256 TEXT NOT NULL, created_ms INTEGER NOT NULL,
                               expires_ms INTEGER, revoked INTEGER NOT NULL DEFAULT 0);
     CREATE TABLE nodes (name TEXT PRIMARY KEY, revision INTEGER NOT NULL, cert_serial TEXT NOT NULL,
                         revoked INTEGER NOT NULL DEFAULT 0, joined_ms INTEGER NOT NULL, info TEXT NOT NULL);",
    "CREATE TABLE slots (deployment TEXT NOT NULL, idx INTEGER NOT NULL, node TEXT NOT NULL,
                         PRIMARY KEY (deployment, idx));",
    // Each deployment's templates, newest last, with how their rollout went.
    "CREATE TABLE history (deployment TEXT NOT NULL, revision INTEGER NOT NULL, template TEXT NOT NULL,
                           created_ms INTEGER NOT NULL, state TEXT NOT NULL, cause TEXT NOT NULL,
                           message TEXT, spec TEXT NOT NULL, PRIMARY KEY (deployment, revision));",
    // Fleet rollouts in waves: the nodes a revision has reached (NULL: all).
    "ALTER TABLE history ADD COLUMN nodes TEXT;",
    // Tokens with a role and a number of uses; certificates that expire and renew; revoked
    // certificates kept for good (a deleted node's name may join again, its old
    // certificate never).
    "ALTER TABLE join_tokens ADD COLUMN role TEXT NOT NULL DEFAULT 'join';
     ALTER TABLE join_tokens ADD COLUMN max_uses INTEGER;
     ALTER TABLE join_tokens ADD COLUMN used INTEGER NOT NULL DEFAULT 0;
     ALTER TABLE join_tokens ADD COLUMN replace_node TEXT;
     ALTER TABLE nodes ADD COLUMN not_after_ms INTEGER;
     ALTER TABLE nodes ADD COLUMN next_serial TEXT;
     ALTER TABLE nodes ADD COLUMN next_not_after_ms INTEGER;
     ALTER TABLE nodes ADD COLUMN key_sha256 TEXT;
     ALTER TABLE nodes ADD COLUMN next_key_sha256 TEXT;
     CREATE TABLE revoked_certs (serial TEXT PRIMARY KEY, node TEXT NOT NULL, revoked_ms INTEGER NOT NULL);
     INSERT OR IGNORE INTO revoked_certs SELECT cert_serial, name, 0 FROM nodes WHERE revoked = 1;
     DELETE FROM nodes WHERE revoked = 1;",
    // The token a node joined with: only that token may repeat its join.
    "ALTER TABLE nodes ADD COLUMN token_id TEXT;",
    // Controllers' state that outlives the hub (autoscalers' windows).
    "CREATE TABLE state (key TEXT PRIMARY KEY, value TEXT NOT NULL);",
];

/// Revisions kept per deployment (Kubernetes' `revisionHistoryLimit`).
pub const HISTORY_LIMIT: i64 = 10;

/// Appends a revision when `d`'s template differs from its newest one (a scale or a
/// change of update settings is not a revision). The previous one, if it was still in
/// progress, is superseded. A deployment stored before history was kept gets its stored
/// spec as revision 1 first, so it can be rolled back to.
fn record_revision(
    tx: &rusqlite::Transaction<'_>,
    d: &Deployment,
    old: Option<&Deployment>,
    cause: &str,
    now_ms: u64,
) -> Result<(), StoreError> {
    let newest: Option<(i64, String)> = tx
        .query_row(
            "SELECT revision, template FROM history WHERE deployment = ?1 ORDER BY revision DESC LIMIT 1",
            [&d.name],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    let tpl = rollout::template_hash(d);
    let now = now_ms as i64;
    let insert = |rev: i64, spec: &Deployment, state: RolloutState, cause: &str| {
        tx.execute(
            "INSERT INTO history (deployment, revision, template, created_ms, state, cause, spec)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                spec.name,
                rev,
                rollout::template_hash(spec),
                now,
                state.as_str(),
                cause,
                serde_json::to_string(spec)?
            ],
        )
        .map_err(StoreError::from)
    };
    let last = match (newest, old) {
        (Some((_, t)), _) if t == tpl => return Ok(()),
        (Some((rev, _)), _) => rev,
        (None, Some(o)) if rollout::template_hash(o) != tpl => {
            insert(1, o, RolloutState::Complete, "stored before history was kept")?;
            1
        }
        (None, _) => 0,
    };
    tx.execute("UPDATE history SET state = 'superseded' WHERE deployment = ?1 AND state = 'progressing'", [&d.name])?;
    insert(last + 1, d, RolloutState::Progressing, cause)?;
    // An update of a deployment on several nodes starts with its first wave.
    let nodes: Vec<String> = {
        let mut st = tx.prepare("SELECT DISTINCT node FROM slots WHERE deployment = ?1 ORDER BY node")?;
        let v = st.query_map([&d.name], |r| r.get(0))?.collect::<Result<_, _>>()?;
        v
    };
    if last > 0 && nodes.len() > 1 {
        let first: Vec<&String> = nodes.iter().take(d.update.wave_size as usize).collect();
        tx.execute(
            "UPDATE history SET nodes = ?3 WHERE deployment = ?1 AND revision = ?2",
            params![d.name, last + 1, serde_json::to_string(&first)?],
        )?;
    }
    tx.execute(
        "DELETE FROM history WHERE deployment = ?1 AND revision <= ?2",
        params![d.name, last + 1 - HISTORY_LIMIT],
    )?;
    Ok(())
}

fn revision_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Revision> {
    let json_err = |i: usize, e: serde_json::Error| {
        rusqlite::Error::FromSqlConversionFailure(i, rusqlite::types::Type::Text, Box::new(e))
    };
    let spec: String = r.get(6)?;
    let spec: Deployment = serde_json::from_str(&spec).map_err(|e| json_err(6, e))?;
    let nodes: Option<String> = r.get(7)?;
    let nodes = nodes.map(|n| serde_json::from_str(&n)).transpose().map_err(|e| json_err(7, e))?;
    let state: String = r.get(3)?;
    Ok(Revision {
        revision: r.get::<_, i64>(0)? as u64,
        template: r.get(1)?,
        image: spec.image.clone(),
        created_ms: r.get::<_, i64>(2)? as u64,
        state: RolloutState::parse(&state).unwrap_or(RolloutState::Failed),
        cause: r.get(4)?,
        message: r.get(5)?,
        nodes,
        spec,
    })
}

/// A token as the hub keeps it: the secret's sha256, never the secret.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TokenRecord {
    pub id: String,
    pub secret_sha256: String,
    pub created_ms: u64,
    pub expires_ms: Option<u64>,
    pub revoked: bool,
    /// What the token is for: joining a node, or calling the API.
    #[serde(default)]
    pub role: TokenRole,
    /// Joins it may make (None: any number until it expires).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_uses: Option<u32>,
    #[serde(default)]
    pub used: u32,
    /// The node a join with this token may replace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replace: Option<String>,
}

/// What a token lets its bearer do.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenRole {
    /// Join a node (`skiff agent`); not an API credential.
    #[default]
    Join,
    /// Scrape `/metrics` and read `/api/v1/metrics` (Prometheus).
    Metrics,
    /// Every read of the API (lists, logs, events, metrics), no change.
    Read,
    /// Everything.
    Admin,
}

impl TokenRole {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "join" => Some(TokenRole::Join),
            "metrics" => Some(TokenRole::Metrics),
            "read" => Some(TokenRole::Read),
            "admin" => Some(TokenRole::Admin),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            TokenRole::Join => "join",
            TokenRole::Metrics => "metrics",
            TokenRole::Read => "read",
            TokenRole::Admin => "admin",
        }
    }
}

/// A joined node: the serial of the one certificate it may use (and of a renewed one not
/// used yet), and what it said of itself.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct NodeRecord {
    pub name: String,
    pub revision: u64,
    pub cert_serial: String,
    pub joined_ms: u64,
    pub info: NodeSpec,
    /// When the certificate expires (None: a certificate from before they expired).
    #[serde(default)]
    pub not_after_ms: Option<u64>,
    /// A renewed certificate, accepted once the node presents it.
    #[serde(default)]
    pub next_serial: Option<String>,
    #[serde(default)]
    pub next_not_after_ms: Option<u64>,
}

/// A join, as [`Store::join_node`] records it.
pub struct NodeJoin<'a> {
    pub token_id: &'a str,
    pub name: &'a str,
    pub serial: &'a str,
    /// The sha256 of the node's public key: a join of an existing name with the same key
    /// is that node asking again (its answer was lost), not a takeover.
    pub key_sha256: &'a str,
    pub not_after_ms: u64,
    pub info: &'a NodeSpec,
    pub now_ms: u64,
}

/// A recorded join.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Joined {
    /// The node existed and this join replaced it (its old certificates are revoked).
    pub replaced: bool,
    /// The node joined before with the same key: a retry (no use of the token counted).
    pub retry: bool,
}

/// Why a join was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JoinRefused {
    #[error("token {0}: unknown token")]
    UnknownToken(String),
    #[error("token {0}: has been revoked")]
    TokenRevoked(String),
    #[error("token {0}: has expired")]
    TokenExpired(String),
    #[error("token {0}: has been used {1} time(s), all it may be")]
    TokenUsedUp(String, u32),
    #[error("token {0}: is not a join token")]
    NotAJoinToken(String),
    #[error(
        "node {0:?} exists; to replace it, delete it first (skiff delete node {0}) or make a token for \
         replacing it (skiff token create --replace {0})"
    )]
    NameTaken(String),
}

impl SqliteStore {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let mut conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        // WAL + FULL: every commit is on disk before it is acknowledged, so a power cut
        // loses no join (a node holding a certificate the hub forgot would be refused for
        // good) and no apply the CLI was told succeeded. The hub writes rarely (changes,
        // not heartbeats), so the fsync per commit costs little.
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        let v: usize = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        for (i, m) in MIGRATIONS.iter().enumerate().skip(v) {
            let tx = conn.transaction()?;
            tx.execute_batch(m)?;
            tx.pragma_update(None, "user_version", i + 1)?;
            tx.commit()?;
        }
        Ok(SqliteStore { conn: Mutex::new(conn) })
    }

    fn conn(&self) -> Result<std::sync::MutexGuard<'_, Connection>, StoreError> {
        self.conn.lock().map_err(|_| StoreError::Poisoned)
    }
}

fn bump(tx: &rusqlite::Transaction<'_>) -> Result<u64, StoreError> {
    tx.execute("UPDATE meta SET value = value + 1 WHERE key = 'revision'", [])?;
    Ok(tx.query_row("SELECT value FROM meta WHERE key = 'revision'", [], |r| r.get::<_, i64>(0))? as u64)
}

impl Store for SqliteStore {
    fn apply(
        &self,
        deployments: &[Deployment],
        prune_stack: Option<&str>,
        dry_run: bool,
        now_ms: u64,
    ) -> Result<ApplyResponse, StoreError> {
        let mut conn = self.conn()?;
        let tx = conn.transaction()?;
        let mut resp = ApplyResponse::default();
        for d in deployments {
            let old: Option<String> =
                tx.query_row("SELECT spec FROM deployments WHERE name = ?1", [&d.name], |r| r.get(0)).optional()?;
            let old: Option<Deployment> = old.map(|s| serde_json::from_str(&s)).transpose()?;
            match old {
                Some(o) if o == *d => resp.unchanged.push(d.name.clone()),
                prev => {
                    if !dry_run {
                        record_revision(&tx, d, prev.as_ref(), "apply", now_ms)?;
                    }
                    let rev = bump(&tx)?;
                    tx.execute(
                        "INSERT INTO deployments (name, stack, revision, spec) VALUES (?1, ?2, ?3, ?4)
                         ON CONFLICT(name) DO UPDATE SET stack = excluded.stack, revision = excluded.revision, spec = excluded.spec",
                        params![d.name, d.stack, rev as i64, serde_json::to_string(d)?],
                    )?;
                    if prev.is_some() {
                        resp.updated.push(d.name.clone())
                    } else {
                        resp.created.push(d.name.clone())
                    }
                }
            }
        }
        if let Some(stack) = prune_stack {
            let names: Vec<String> = {
                let mut st = tx.prepare("SELECT name FROM deployments WHERE stack = ?1 ORDER BY name")?;
                let v = st.query_map([stack], |r| r.get(0))?.collect::<Result<_, _>>()?;
                v
            };
            for n in names {
                if !deployments.iter().any(|d| d.name == n) {
                    bump(&tx)?;
                    tx.execute("DELETE FROM deployments WHERE name = ?1", [&n])?;
                    tx.execute("DELETE FROM history WHERE deployment = ?1", [&n])?;
                    resp.deleted.push(n);
                }
            }
        }
        if dry_run {
            tx.rollback()?;
        } else {
            tx.commit()?;
        }
        Ok(resp)
    }

    fn list(&self) -> Result<Vec<Stored>, StoreError> {
        let conn = self.conn()?;
        let mut st = conn.prepare("SELECT revision, spec FROM deployments ORDER BY name")?;
        let rows = st.query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)))?;
        let mut out = vec![];
        for r in rows {
            let (rev, spec) = r?;
            out.push(Stored { revision: rev as u64, spec: serde_json::from_str(&spec)? });
        }
        Ok(out)
    }

    fn get(&self, name: &str) -> Result<Option<Stored>, StoreError> {
        let conn = self.conn()?;
        let row: Option<(i64, String)> = conn
            .query_row("SELECT revision, spec FROM deployments WHERE name = ?1", [name], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        Ok(match row {
            Some((rev, spec)) => Some(Stored { revision: rev as u64, spec: serde_json::from_str(&spec)? }),
            None => None,
        })
    }

    fn delete_all(&self, names: &[String]) -> Result<Vec<String>, StoreError> {
        let mut conn = self.conn()?;
        let tx = conn.transaction()?;
        let mut gone = vec![];
        for name in names {
            if tx.execute("DELETE FROM deployments WHERE name = ?1", [name])? > 0 {
                bump(&tx)?;
                tx.execute("DELETE FROM history WHERE deployment = ?1", [name])?;
                gone.push(name.clone());
            }
        }
        tx.commit()?;
        Ok(gone)
    }

    fn revision(&self) -> Result<u64, StoreError> {
        let conn = self.conn()?;
        Ok(conn.query_row("SELECT value FROM meta WHERE key = 'revision'", [], |r| r.get::<_, i64>(0))? as u64)
    }

    fn create_token(&self, t: &TokenRecord) -> Result<(), StoreError> {
        insert_token(&*self.conn()?, t)
    }

    fn token(&self, id: &str) -> Result<Option<TokenRecord>, StoreError> {
        let q = format!("SELECT {TOKEN_COLS} FROM join_tokens WHERE id = ?1");
        Ok(self.conn()?.query_row(&q, [id], token_row).optional()?)
    }

    fn tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        let conn = self.conn()?;
        let mut st = conn.prepare(&format!("SELECT {TOKEN_COLS} FROM join_tokens ORDER BY created_ms, id"))?;
        let v = st.query_map([], token_row)?.collect::<Result<_, _>>()?;
        Ok(v)
    }

    fn revoke_token(&self, id: &str) -> Result<bool, StoreError> {
        Ok(self.conn()?.execute("UPDATE join_tokens SET revoked = 1 WHERE id = ?1", [id])? > 0)
    }

    fn join_node(&self, j: &NodeJoin<'_>) -> Result<Result<Joined, JoinRefused>, StoreError> {
        let mut conn = self.conn()?;
        let tx = conn.transaction()?;
        let q = format!("SELECT {TOKEN_COLS} FROM join_tokens WHERE id = ?1");
        let Some(t) = tx.query_row(&q, [j.token_id], token_row).optional()? else {
            return Ok(Err(JoinRefused::UnknownToken(j.token_id.into())));
        };
        let row: Option<(Option<String>, Option<String>)> = tx
            .query_row("SELECT key_sha256, token_id FROM nodes WHERE name = ?1", [j.name], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .optional()?;
        let exists = row.is_some();
        // The same device repeating a join whose answer it lost: the same key and the
        // same (still valid) token, so no use is counted. Another token never gets a
        // certificate for an existing name this way.
        let retry = row
            .is_some_and(|(key, token)| key.as_deref() == Some(j.key_sha256) && token.as_deref() == Some(j.token_id));
        if let Some(r) = join_refusal(&t, j, exists, retry) {
            return Ok(Err(r));
        }
        if exists {
            revoke_serials(&tx, j.name, j.now_ms)?;
            tx.execute("DELETE FROM nodes WHERE name = ?1", [j.name])?;
        }
        if !retry {
            tx.execute("UPDATE join_tokens SET used = used + 1 WHERE id = ?1", [j.token_id])?;
        }
        let rev = bump(&tx)?;
        tx.execute(
            "INSERT INTO nodes (name, revision, cert_serial, revoked, joined_ms, info, not_after_ms, key_sha256, token_id)
             VALUES (?1, ?2, ?3, 0, ?4, ?5, ?6, ?7, ?8)",
            params![
                j.name,
                rev as i64,
                j.serial,
                j.now_ms as i64,
                serde_json::to_string(j.info)?,
                j.not_after_ms as i64,
                j.key_sha256,
                j.token_id
            ],
        )?;
        tx.commit()?;
        Ok(Ok(Joined { replaced: exists && !retry, retry }))
    }

    fn set_node_info(&self, name: &str, info: &NodeSpec) -> Result<(), StoreError> {
        let mut conn = self.conn()?;
        let tx = conn.transaction()?;
        let rev = bump(&tx)?;
        tx.execute(
            "UPDATE nodes SET info = ?2, revision = ?3 WHERE name = ?1",
            params![name, serde_json::to_string(info)?, rev as i64],
        )?;
        tx.commit()?;
        Ok(())
    }

    fn renew_cert(&self, name: &str, serial: &str, not_after_ms: u64, key_sha256: &str) -> Result<(), StoreError> {
        self.conn()?.execute(
            "UPDATE nodes SET next_serial = ?2, next_not_after_ms = ?3, next_key_sha256 = ?4 WHERE name = ?1",
            params![name, serial, not_after_ms as i64, key_sha256],
        )?;
        Ok(())
    }

    fn promote_cert(&self, name: &str, serial: &str, now_ms: u64) -> Result<(), StoreError> {
        let mut conn = self.conn()?;
        let tx = conn.transaction()?;
        tx.execute(
            "INSERT OR IGNORE INTO revoked_certs (serial, node, revoked_ms)
             SELECT cert_serial, name, ?3 FROM nodes WHERE name = ?1 AND next_serial = ?2",
            params![name, serial, now_ms as i64],
        )?;
        tx.execute(
            "UPDATE nodes SET cert_serial = next_serial, not_after_ms = next_not_after_ms,
                 key_sha256 = COALESCE(next_key_sha256, key_sha256), next_serial = NULL,
                 next_not_after_ms = NULL, next_key_sha256 = NULL WHERE name = ?1 AND next_serial = ?2",
            params![name, serial],
        )?;
        tx.commit()?;
        Ok(())
    }

    fn is_revoked(&self, serial: &str) -> Result<bool, StoreError> {
        let n: i64 =
            self.conn()?.query_row("SELECT COUNT(*) FROM revoked_certs WHERE serial = ?1", [serial], |r| r.get(0))?;
        Ok(n > 0)
    }

    fn node(&self, name: &str) -> Result<Option<NodeRecord>, StoreError> {
        let q = format!("SELECT {NODE_COLS} FROM nodes WHERE name = ?1");
        let row = self.conn()?.query_row(&q, [name], node_row).optional()?;
        row.map(|(mut n, info)| {
            n.info = serde_json::from_str(&info)?;
            Ok(n)
        })
        .transpose()
    }

    fn nodes(&self) -> Result<NodeList, StoreError> {
        let conn = self.conn()?;
        let mut st = conn.prepare(&format!("SELECT {NODE_COLS} FROM nodes ORDER BY name"))?;
        let rows: Vec<(NodeRecord, String)> = st.query_map([], node_row)?.collect::<Result<_, _>>()?;
        let nodes = rows
            .into_iter()
            .map(|(mut n, info)| {
                n.info = serde_json::from_str(&info)?;
                Ok(Arc::new(n))
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        Ok(Arc::new(nodes))
    }

    fn slots(&self) -> Result<Arc<Vec<crate::schedule::Slot>>, StoreError> {
        let conn = self.conn()?;
        let mut st = conn.prepare("SELECT deployment, idx, node FROM slots ORDER BY deployment, idx")?;
        let v = st.query_map([], slot_row)?.collect::<Result<_, _>>()?;
        Ok(Arc::new(v))
    }

    fn set_slots(&self, slots: &[crate::schedule::Slot]) -> Result<u64, StoreError> {
        let mut sorted = slots.to_vec();
        sorted.sort();
        if *self.slots()? == sorted {
            return self.revision();
        }
        let mut conn = self.conn()?;
        let tx = conn.transaction()?;
        tx.execute("DELETE FROM slots", [])?;
        for s in &sorted {
            tx.execute(
                "INSERT INTO slots (deployment, idx, node) VALUES (?1, ?2, ?3)",
                params![s.deployment, s.index as i64, s.node],
            )?;
        }
        let rev = bump(&tx)?;
        tx.commit()?;
        Ok(rev)
    }

    fn history(&self, name: &str) -> Result<Vec<Revision>, StoreError> {
        let conn = self.conn()?;
        let mut st = conn.prepare(
            "SELECT revision, template, created_ms, state, cause, message, spec, nodes FROM history
             WHERE deployment = ?1 ORDER BY revision",
        )?;
        let rows = st.query_map([name], revision_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn progressing(&self) -> Result<Vec<String>, StoreError> {
        let conn = self.conn()?;
        let mut st = conn.prepare_cached(
            "SELECT h.deployment FROM history h
             WHERE h.state = ?1 AND h.revision = (SELECT MAX(revision) FROM history WHERE deployment = h.deployment)
             ORDER BY h.deployment",
        )?;
        let rows = st.query_map([RolloutState::Progressing.as_str()], |r| r.get::<_, String>(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn set_wave(&self, name: &str, revision: u64, nodes: &[String]) -> Result<u64, StoreError> {
        let mut conn = self.conn()?;
        let tx = conn.transaction()?;
        tx.execute(
            "UPDATE history SET nodes = ?3 WHERE deployment = ?1 AND revision = ?2",
            params![name, revision as i64, serde_json::to_string(nodes)?],
        )?;
        let rev = bump(&tx)?;
        tx.commit()?;
        Ok(rev)
    }

    fn set_rollout(
        &self,
        name: &str,
        revision: u64,
        state: RolloutState,
        cause: Option<&str>,
        message: Option<&str>,
    ) -> Result<(), StoreError> {
        let conn = self.conn()?;
        conn.execute(
            "UPDATE history SET state = ?3, cause = COALESCE(?4, cause), message = COALESCE(?5, message)
             WHERE deployment = ?1 AND revision = ?2",
            params![name, revision as i64, state.as_str(), cause, message],
        )?;
        Ok(())
    }

    fn put_state(&self, key: &str, value: Option<&str>) -> Result<(), StoreError> {
        let conn = self.conn()?;
        match value {
            Some(v) => conn.execute(
                "INSERT INTO state (key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                params![key, v],
            )?,
            None => conn.execute("DELETE FROM state WHERE key = ?1", [key])?,
        };
        Ok(())
    }

    fn states(&self, prefix: &str) -> Result<Vec<(String, String)>, StoreError> {
        let conn = self.conn()?;
        let mut st = conn.prepare("SELECT key, value FROM state WHERE substr(key, 1, length(?1)) = ?1 ORDER BY key")?;
        let v = st.query_map([prefix], |r| Ok((r.get(0)?, r.get(1)?)))?.collect::<Result<_, _>>()?;
        Ok(v)
    }

    fn export(&self) -> Result<Dump, StoreError> {
        let mut conn = self.conn()?;
        // One read transaction: a consistent copy while the hub keeps running.
        let tx = conn.transaction()?;
        let revision =
            tx.query_row("SELECT value FROM meta WHERE key = 'revision'", [], |r| r.get::<_, i64>(0))? as u64;
        let deployments = {
            let mut st = tx.prepare("SELECT revision, spec FROM deployments ORDER BY name")?;
            let rows: Vec<(i64, String)> =
                st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?.collect::<Result<_, _>>()?;
            rows.into_iter()
                .map(|(rev, spec)| Ok(DumpedDeployment { revision: rev as u64, spec: serde_json::from_str(&spec)? }))
                .collect::<Result<Vec<_>, StoreError>>()?
        };
        let mut history = std::collections::BTreeMap::new();
        {
            let mut st = tx.prepare(
                "SELECT revision, template, created_ms, state, cause, message, spec, nodes, deployment FROM history
                 ORDER BY deployment, revision",
            )?;
            let rows = st.query_map([], |r| Ok((r.get::<_, String>(8)?, revision_row(r)?)))?;
            for row in rows {
                let (d, rev) = row?;
                history.entry(d).or_insert_with(Vec::new).push(rev);
            }
        }
        let tokens = {
            let mut st = tx.prepare(&format!("SELECT {TOKEN_COLS} FROM join_tokens ORDER BY created_ms, id"))?;
            let v = st.query_map([], token_row)?.collect::<Result<_, _>>()?;
            v
        };
        let nodes = {
            let mut st = tx.prepare(&format!(
                "SELECT {NODE_COLS}, key_sha256, next_key_sha256, token_id FROM nodes ORDER BY name"
            ))?;
            // The record's info is JSON, read after the query.
            let rows: Vec<(StoredNode, String)> = st
                .query_map([], |r| {
                    let (record, info) = node_row(r)?;
                    Ok((
                        StoredNode { record, key_sha256: r.get(8)?, next_key_sha256: r.get(9)?, token_id: r.get(10)? },
                        info,
                    ))
                })?
                .collect::<Result<_, _>>()?;
            rows.into_iter()
                .map(|(mut n, info)| {
                    n.record.info = serde_json::from_str(&info)?;
                    Ok(n)
                })
                .collect::<Result<Vec<_>, StoreError>>()?
        };
        let revoked = {
            let mut st = tx.prepare("SELECT serial, node, revoked_ms FROM revoked_certs ORDER BY serial")?;
            let v = st
                .query_map([], |r| {
                    Ok(RevokedCert { serial: r.get(0)?, node: r.get(1)?, revoked_ms: r.get::<_, i64>(2)? as u64 })
                })?
                .collect::<Result<_, _>>()?;
            v
        };
        let state = {
            let mut st = tx.prepare("SELECT key, value FROM state ORDER BY key")?;
            let v = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?.collect::<Result<_, _>>()?;
            v
        };
        let slots = {
            let mut st = tx.prepare("SELECT deployment, idx, node FROM slots ORDER BY deployment, idx")?;
            let v = st.query_map([], slot_row)?.collect::<Result<_, _>>()?;
            v
        };
        Ok(Dump { format: DUMP_FORMAT, revision, deployments, history, tokens, nodes, revoked, slots, state })
    }

    fn import(&self, dump: &Dump) -> Result<(), StoreError> {
        if dump.format != DUMP_FORMAT {
            return Err(StoreError::DumpFormat(dump.format));
        }
        let mut conn = self.conn()?;
        let tx = conn.transaction()?;
        let held: i64 = tx.query_row(
            "SELECT (SELECT value FROM meta WHERE key = 'revision') + (SELECT COUNT(*) FROM deployments)
                  + (SELECT COUNT(*) FROM join_tokens) + (SELECT COUNT(*) FROM nodes)",
            [],
            |r| r.get(0),
        )?;
        if held > 0 {
            return Err(StoreError::NotEmpty("the target already holds a fleet; restore into an empty one".into()));
        }
        tx.execute("UPDATE meta SET value = ?1 WHERE key = 'revision'", [dump.revision as i64])?;
        for d in &dump.deployments {
            tx.execute(
                "INSERT INTO deployments (name, stack, revision, spec) VALUES (?1, ?2, ?3, ?4)",
                params![d.spec.name, d.spec.stack, d.revision as i64, serde_json::to_string(&d.spec)?],
            )?;
        }
        for (name, revs) in &dump.history {
            for r in revs {
                tx.execute(
                    "INSERT INTO history (deployment, revision, template, created_ms, state, cause, message, spec, nodes)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                    params![
                        name,
                        r.revision as i64,
                        r.template,
                        r.created_ms as i64,
                        r.state.as_str(),
                        r.cause,
                        r.message,
                        serde_json::to_string(&r.spec)?,
                        r.nodes.as_ref().map(serde_json::to_string).transpose()?
                    ],
                )?;
            }
        }
        for t in &dump.tokens {
            insert_token(&tx, t)?;
        }
        for n in &dump.nodes {
            let r = &n.record;
            tx.execute(
                "INSERT INTO nodes (name, revision, cert_serial, revoked, joined_ms, info, not_after_ms, next_serial,
                                    next_not_after_ms, key_sha256, next_key_sha256, token_id)
                 VALUES (?1, ?2, ?3, 0, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
                params![
                    r.name,
                    r.revision as i64,
                    r.cert_serial,
                    r.joined_ms as i64,
                    serde_json::to_string(&r.info)?,
                    r.not_after_ms.map(|v| v as i64),
                    r.next_serial,
                    r.next_not_after_ms.map(|v| v as i64),
                    n.key_sha256,
                    n.next_key_sha256,
                    n.token_id
                ],
            )?;
        }
        for c in &dump.revoked {
            tx.execute(
                "INSERT OR IGNORE INTO revoked_certs (serial, node, revoked_ms) VALUES (?1, ?2, ?3)",
                params![c.serial, c.node, c.revoked_ms as i64],
            )?;
        }
        for s in &dump.slots {
            tx.execute(
                "INSERT INTO slots (deployment, idx, node) VALUES (?1, ?2, ?3)",
                params![s.deployment, s.index as i64, s.node],
            )?;
        }
        for (k, v) in &dump.state {
            tx.execute("INSERT INTO state (key, value) VALUES (?1, ?2)", params![k, v])?;
        }
        tx.commit()?;
        Ok(())
    }

    fn revoke_node(&self, name: &str, now_ms: u64) -> Result<bool, StoreError> {
        let mut conn = self.conn()?;
        let tx = conn.transaction()?;
        revoke_serials(&tx, name, now_ms)?;
        let n = tx.execute("DELETE FROM nodes WHERE name = ?1", [name])?;
        if n > 0 {
            bump(&tx)?;
        }
        tx.commit()?;
        Ok(n > 0)
    }
}
