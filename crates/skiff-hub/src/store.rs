//! The hub's store of desired state. Every change bumps one global revision, and every
//! object carries the revision that last changed it (so watchers can ask "what changed
//! since N"). SQLite is the embedded default; the etcd backend implements the same trait.

use rusqlite::{params, Connection, OptionalExtension};
use skiff_model::api::ApplyResponse;
pub use skiff_model::proto::NodeSpec;
use skiff_model::rollout::{self, Revision, RolloutState};
use skiff_model::Deployment;
use std::path::Path;
use std::sync::Mutex;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("hub store: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("hub store holds an unreadable record: {0}")]
    Json(#[from] serde_json::Error),
    #[error("hub store lock poisoned")]
    Poisoned,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Stored {
    pub revision: u64,
    pub spec: Deployment,
}

pub trait Store: Send + Sync {
    /// Creates or updates `deployments` and (with `prune_stack`) deletes the stack's
    /// others, atomically. With `dry_run` nothing is written.
    fn apply(
        &self,
        deployments: &[Deployment],
        prune_stack: Option<&str>,
        dry_run: bool,
    ) -> Result<ApplyResponse, StoreError>;
    fn list(&self) -> Result<Vec<Stored>, StoreError>;
    fn get(&self, name: &str) -> Result<Option<Stored>, StoreError>;
    /// Returns whether it existed.
    fn delete(&self, name: &str) -> Result<bool, StoreError>;
    fn revision(&self) -> Result<u64, StoreError>;

    fn create_token(&self, t: &TokenRecord) -> Result<(), StoreError>;
    fn token(&self, id: &str) -> Result<Option<TokenRecord>, StoreError>;
    fn tokens(&self) -> Result<Vec<TokenRecord>, StoreError>;
    /// Returns whether it existed.
    fn revoke_token(&self, id: &str) -> Result<bool, StoreError>;

    /// Records a (re-)joined node with the serial of its new certificate; an earlier
    /// certificate of the same name stops being accepted.
    fn put_node(&self, name: &str, cert_serial: &str, joined_ms: u64, info: &NodeSpec) -> Result<u64, StoreError>;
    fn node(&self, name: &str) -> Result<Option<NodeRecord>, StoreError>;
    fn nodes(&self) -> Result<Vec<NodeRecord>, StoreError>;
    /// Returns whether it existed.
    fn revoke_node(&self, name: &str) -> Result<bool, StoreError>;

    /// `name`'s revision history, oldest first (at most `HISTORY_LIMIT`).
    fn history(&self, name: &str) -> Result<Vec<Revision>, StoreError>;
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
    fn slots(&self) -> Result<Vec<crate::schedule::Slot>, StoreError>;
    /// Replaces the placement; bumps the revision only when it changed. Returns the revision.
    fn set_slots(&self, slots: &[crate::schedule::Slot]) -> Result<u64, StoreError>;
}

fn token_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<TokenRecord> {
    Ok(TokenRecord {
        id: r.get(0)?,
        secret_sha256: r.get(1)?,
        created_ms: r.get::<_, i64>(2)? as u64,
        expires_ms: r.get::<_, Option<i64>>(3)?.map(|v| v as u64),
        revoked: r.get::<_, i64>(4)? != 0,
    })
}

fn node_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<(NodeRecord, String)> {
    Ok((
        NodeRecord {
            name: r.get(0)?,
            revision: r.get::<_, i64>(1)? as u64,
            cert_serial: r.get(2)?,
            revoked: r.get::<_, i64>(3)? != 0,
            joined_ms: r.get::<_, i64>(4)? as u64,
            info: NodeSpec::default(),
        },
        r.get(5)?,
    ))
}

const TOKEN_COLS: &str = "id, secret_sha256, created_ms, expires_ms, revoked";
const NODE_COLS: &str = "name, revision, cert_serial, revoked, joined_ms, info";

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
) -> Result<(), StoreError> {
    let newest: Option<(i64, String)> = tx
        .query_row(
            "SELECT revision, template FROM history WHERE deployment = ?1 ORDER BY revision DESC LIMIT 1",
            [&d.name],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    let tpl = rollout::template_hash(d);
    let now = crate::fleet::now_ms() as i64;
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

/// A join token as the hub keeps it: the secret's sha256, never the secret.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TokenRecord {
    pub id: String,
    pub secret_sha256: String,
    pub created_ms: u64,
    pub expires_ms: Option<u64>,
    pub revoked: bool,
}

/// A joined node: the serial of the one certificate it may use, and what it said of itself.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct NodeRecord {
    pub name: String,
    pub revision: u64,
    pub cert_serial: String,
    pub revoked: bool,
    pub joined_ms: u64,
    pub info: NodeSpec,
}

impl SqliteStore {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let mut conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        // WAL + NORMAL: a commit survives a crash of the process; a power cut may lose the
        // newest commits but never corrupts the store. The CLI re-applies on doubt.
        conn.pragma_update(None, "synchronous", "NORMAL")?;
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
                        record_revision(&tx, d, prev.as_ref(), "apply")?;
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

    fn delete(&self, name: &str) -> Result<bool, StoreError> {
        let mut conn = self.conn()?;
        let tx = conn.transaction()?;
        let n = tx.execute("DELETE FROM deployments WHERE name = ?1", [name])?;
        if n > 0 {
            bump(&tx)?;
            tx.execute("DELETE FROM history WHERE deployment = ?1", [name])?;
        }
        tx.commit()?;
        Ok(n > 0)
    }

    fn revision(&self) -> Result<u64, StoreError> {
        let conn = self.conn()?;
        Ok(conn.query_row("SELECT value FROM meta WHERE key = 'revision'", [], |r| r.get::<_, i64>(0))? as u64)
    }

    fn create_token(&self, t: &TokenRecord) -> Result<(), StoreError> {
        self.conn()?.execute(
            "INSERT INTO join_tokens (id, secret_sha256, created_ms, expires_ms, revoked) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![t.id, t.secret_sha256, t.created_ms as i64, t.expires_ms.map(|v| v as i64), t.revoked as i64],
        )?;
        Ok(())
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

    fn put_node(&self, name: &str, cert_serial: &str, joined_ms: u64, info: &NodeSpec) -> Result<u64, StoreError> {
        let mut conn = self.conn()?;
        let tx = conn.transaction()?;
        let rev = bump(&tx)?;
        tx.execute(
            "INSERT INTO nodes (name, revision, cert_serial, revoked, joined_ms, info) VALUES (?1, ?2, ?3, 0, ?4, ?5)
             ON CONFLICT(name) DO UPDATE SET revision = excluded.revision, cert_serial = excluded.cert_serial,
                 revoked = 0, joined_ms = excluded.joined_ms, info = excluded.info",
            params![name, rev as i64, cert_serial, joined_ms as i64, serde_json::to_string(info)?],
        )?;
        tx.commit()?;
        Ok(rev)
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

    fn nodes(&self) -> Result<Vec<NodeRecord>, StoreError> {
        let conn = self.conn()?;
        let mut st = conn.prepare(&format!("SELECT {NODE_COLS} FROM nodes ORDER BY name"))?;
        let rows: Vec<(NodeRecord, String)> = st.query_map([], node_row)?.collect::<Result<_, _>>()?;
        rows.into_iter()
            .map(|(mut n, info)| {
                n.info = serde_json::from_str(&info)?;
                Ok(n)
            })
            .collect()
    }

    fn slots(&self) -> Result<Vec<crate::schedule::Slot>, StoreError> {
        let conn = self.conn()?;
        let mut st = conn.prepare("SELECT deployment, idx, node FROM slots ORDER BY deployment, idx")?;
        let v = st
            .query_map([], |r| {
                Ok(crate::schedule::Slot { deployment: r.get(0)?, index: r.get::<_, i64>(1)? as u32, node: r.get(2)? })
            })?
            .collect::<Result<_, _>>()?;
        Ok(v)
    }

    fn set_slots(&self, slots: &[crate::schedule::Slot]) -> Result<u64, StoreError> {
        let mut sorted = slots.to_vec();
        sorted.sort();
        if self.slots()? == sorted {
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

    fn revoke_node(&self, name: &str) -> Result<bool, StoreError> {
        let mut conn = self.conn()?;
        let tx = conn.transaction()?;
        let n = tx.execute("UPDATE nodes SET revoked = 1 WHERE name = ?1", [name])?;
        if n > 0 {
            bump(&tx)?;
        }
        tx.commit()?;
        Ok(n > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_keeps_ten_templates_not_scales() {
        let t = tempfile::tempdir().unwrap();
        let s = SqliteStore::open(&t.path().join("hub.db")).unwrap();
        let mut d = Deployment::new("web", "img:0");
        s.apply(std::slice::from_ref(&d), None, false).unwrap();
        d.replicas = 3;
        s.apply(std::slice::from_ref(&d), None, false).unwrap();
        let h = s.history("web").unwrap();
        assert_eq!(h.len(), 1, "a scale is not a revision");
        assert_eq!(h[0].state, RolloutState::Progressing);
        d.image = "img:dry".into();
        s.apply(std::slice::from_ref(&d), None, true).unwrap();
        assert_eq!(s.history("web").unwrap().len(), 1, "a dry run records nothing");
        for i in 1..=11 {
            d.image = format!("img:{i}");
            s.apply(std::slice::from_ref(&d), None, false).unwrap();
        }
        let h = s.history("web").unwrap();
        assert_eq!(h.len(), 10);
        assert_eq!((h[0].revision, h[9].revision, h[9].image.as_str()), (3, 12, "img:11"));
        assert!(h[..9].iter().all(|r| r.state == RolloutState::Superseded));
        s.set_rollout("web", 12, RolloutState::Failed, Some("apply"), Some("web-1 unhealthy")).unwrap();
        let last = s.history("web").unwrap().pop().unwrap();
        assert_eq!((last.state, last.message.as_deref()), (RolloutState::Failed, Some("web-1 unhealthy")));
        s.delete("web").unwrap();
        assert!(s.history("web").unwrap().is_empty());
    }

    #[test]
    fn an_update_on_several_nodes_starts_with_its_first_wave() {
        use crate::schedule::Slot;
        let t = tempfile::tempdir().unwrap();
        let s = SqliteStore::open(&t.path().join("hub.db")).unwrap();
        let mut d = Deployment::new("web", "img:1");
        d.replicas = 3;
        s.apply(std::slice::from_ref(&d), None, false).unwrap();
        let slot = |i: u32, n: &str| Slot { deployment: "web".into(), index: i, node: n.into() };
        s.set_slots(&[slot(1, "b"), slot(2, "a"), slot(3, "c")]).unwrap();
        assert_eq!(s.history("web").unwrap()[0].nodes, None, "a new deployment goes everywhere");
        d.image = "img:2".into();
        s.apply(std::slice::from_ref(&d), None, false).unwrap();
        assert_eq!(s.history("web").unwrap()[1].nodes, Some(vec!["a".to_string()]));
        let rev = s.revision().unwrap();
        assert!(s.set_wave("web", 2, &["a".into(), "b".into()]).unwrap() > rev, "a wave changes assignments");
        assert_eq!(s.history("web").unwrap()[1].nodes.as_ref().map(Vec::len), Some(2));
    }

    #[test]
    fn apply_is_atomic_and_revisioned() {
        let t = tempfile::tempdir().unwrap();
        let s = SqliteStore::open(&t.path().join("hub.db")).unwrap();
        let mut a = Deployment::new("a", "img");
        a.stack = "demo".into();
        let mut b = Deployment::new("b", "img");
        b.stack = "demo".into();
        let r = s.apply(&[a.clone(), b.clone()], Some("demo"), false).unwrap();
        assert_eq!(r.created, ["a", "b"]);
        assert_eq!(s.revision().unwrap(), 2);
        let r = s.apply(&[a.clone()], Some("demo"), true).unwrap();
        assert_eq!((r.unchanged.as_slice(), r.deleted.as_slice()), (&["a".to_string()][..], &["b".to_string()][..]));
        assert_eq!(s.list().unwrap().len(), 2, "dry run changed nothing");
        a.replicas = 3;
        let r = s.apply(&[a], Some("demo"), false).unwrap();
        assert_eq!((r.updated.len(), r.deleted.len()), (1, 1));
        assert_eq!(s.get("a").unwrap().unwrap().revision, 3);
        assert!(s.delete("a").unwrap());
        assert!(!s.delete("a").unwrap());
    }

    #[test]
    fn tokens_and_nodes_persist_and_revoke() {
        let t = tempfile::tempdir().unwrap();
        let path = t.path().join("hub.db");
        let s = SqliteStore::open(&path).unwrap();
        let tok = TokenRecord {
            id: "abc".into(),
            secret_sha256: "h".into(),
            created_ms: 1,
            expires_ms: Some(10),
            revoked: false,
        };
        s.create_token(&tok).unwrap();
        assert!(s.create_token(&tok).is_err(), "ids are unique");
        let info = NodeSpec { os: "linux".into(), arch: "arm64".into(), cpu_millis: 4000, ..Default::default() };
        let r1 = s.put_node("pi", "01", 5, &info).unwrap();
        let r2 = s.put_node("pi", "02", 6, &info).unwrap();
        assert!(r2 > r1);
        drop(s);
        let s = SqliteStore::open(&path).unwrap();
        assert_eq!(s.token("abc").unwrap(), Some(tok));
        assert!(s.revoke_token("abc").unwrap() && s.token("abc").unwrap().unwrap().revoked);
        assert!(!s.revoke_token("nope").unwrap());
        let n = s.node("pi").unwrap().unwrap();
        assert_eq!((n.cert_serial.as_str(), n.info.arch.as_str(), n.revoked), ("02", "arm64", false));
        assert!(s.revoke_node("pi").unwrap() && s.nodes().unwrap()[0].revoked);
    }
}
