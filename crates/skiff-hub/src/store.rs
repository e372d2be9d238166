//! The hub's store of desired state. Every change bumps one global revision, and every
//! object carries the revision that last changed it (so watchers can ask "what changed
//! since N"). SQLite is the embedded default; the etcd backend implements the same trait.

use rusqlite::{params, Connection, OptionalExtension};
use skiff_model::api::ApplyResponse;
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
}

pub struct SqliteStore {
    conn: Mutex<Connection>,
}

const MIGRATIONS: &[&str] = &["CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
     INSERT INTO meta (key, value) VALUES ('revision', 0);
     CREATE TABLE deployments (name TEXT PRIMARY KEY, stack TEXT NOT NULL, revision INTEGER NOT NULL, spec TEXT NOT NULL);"];

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
        }
        tx.commit()?;
        Ok(n > 0)
    }

    fn revision(&self) -> Result<u64, StoreError> {
        let conn = self.conn()?;
        Ok(conn.query_row("SELECT value FROM meta WHERE key = 'revision'", [], |r| r.get::<_, i64>(0))? as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
