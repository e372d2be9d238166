//! The agent's local state in SQLite (`<data>/agent.db`): the desired deployments it was
//! given (persisted *before* it acts on them), its instances, address leases and events.
//! Migrations are numbered and applied in order, tracked by `PRAGMA user_version`.

use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};
use skiff_model::metrics::MetricsSample;
use skiff_model::{Deployment, EventRecord, Health, InstanceState};
use skiff_runtime::network::{Address, Subnet};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::Ipv4Addr;
use std::path::Path;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum StateError {
    #[error("state database: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("state database holds an unreadable record: {0}")]
    Json(#[from] serde_json::Error),
    #[error("no free address left in {0}")]
    NoAddress(String),
    #[error(
        "no subnet of /{prefix} left in the pool {pool} for network {network:?} \
         (one per network with instances here): give the node a larger --subnet or a longer --network-prefix"
    )]
    NoSubnet { network: String, pool: String, prefix: u8 },
    #[error("state database is corrupt: {0}")]
    Corrupt(String),
}

/// Whether `e` says the database file itself is damaged (not, say, a full disk).
fn is_corruption(e: &StateError) -> bool {
    match e {
        StateError::Corrupt(_) | StateError::Json(_) => true,
        StateError::Sql(rusqlite::Error::SqliteFailure(f, _)) => {
            matches!(f.code, rusqlite::ErrorCode::DatabaseCorrupt | rusqlite::ErrorCode::NotADatabase)
        }
        _ => false,
    }
}

const MIGRATIONS: &[&str] = &[
    // 1: initial schema
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
     CREATE TABLE deployments (name TEXT PRIMARY KEY, spec TEXT NOT NULL);
     CREATE TABLE instances (name TEXT PRIMARY KEY, data TEXT NOT NULL);
     CREATE TABLE leases (ip TEXT PRIMARY KEY, instance TEXT NOT NULL UNIQUE);
     CREATE TABLE events (id INTEGER PRIMARY KEY AUTOINCREMENT, time_ms INTEGER NOT NULL, object TEXT NOT NULL, reason TEXT NOT NULL, message TEXT NOT NULL);",
    // 2: the instance numbers a hub placed on this node (NULL: 1..=replicas, all here)
    "ALTER TABLE deployments ADD COLUMN indexes TEXT;",
    // 3: resource samples waiting to ship to the hub (bounded)
    "CREATE TABLE metrics (id INTEGER PRIMARY KEY AUTOINCREMENT, data TEXT NOT NULL);",
    // 4: an address per (instance, network): each network has a subnet of its own on the
    // node. '' is a macvlan lease, or one from before (the instance's one address).
    "CREATE TABLE leases2 (ip TEXT PRIMARY KEY, instance TEXT NOT NULL, network TEXT NOT NULL DEFAULT '',
                           UNIQUE (instance, network));
     INSERT INTO leases2 (ip, instance) SELECT ip, instance FROM leases;
     DROP TABLE leases;
     ALTER TABLE leases2 RENAME TO leases;",
];

/// Every lease whose address parses: (address, instance, network).
fn all_leases(conn: &Connection) -> Result<Vec<(Ipv4Addr, String, String)>, StateError> {
    let mut st = conn.prepare("SELECT ip, instance, network FROM leases")?;
    let all = st.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get(1)?, r.get(2)?)))?;
    let mut out = vec![];
    for row in all {
        let (ip, instance, network) = row?;
        if let Ok(ip) = ip.parse() {
            out.push((ip, instance, network));
        }
    }
    Ok(out)
}

/// An instance's address on each network it joined on the bridge.
pub type Addresses = BTreeMap<String, Ipv4Addr>;

/// One instance as the agent tracks it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceRow {
    pub name: String,
    pub deployment: String,
    pub container_id: String,
    /// The spec the instance was created from; a different desired spec recreates it.
    pub spec: Deployment,
    pub state: InstanceState,
    pub health: Option<Health>,
    #[serde(default)]
    pub health_failures: u32,
    pub pid: Option<i32>,
    /// On the bridge, its address on its first network (the one its MAC is derived from,
    /// that published ports and the host reach it at); on macvlan, its address.
    pub ip: Option<String>,
    /// On the bridge, its address on each network it joined (each network's subnet is
    /// its own). Empty for one started before (its `ip` is on all of them).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub addresses: Addresses,
    pub restarts: u32,
    /// Consecutive quick failures, for the backoff.
    pub streak: u32,
    pub exit_code: Option<i32>,
    pub oom_killed: bool,
    pub started_at_ms: Option<u64>,
    pub finished_at_ms: Option<u64>,
    pub next_start_ms: Option<u64>,
    pub message: Option<String>,
    /// Kept running beside its replacement during an update (see `update`).
    #[serde(default)]
    pub retiring: bool,
    /// Running, healthy if probed and its published port answering, since.
    #[serde(default)]
    pub ready_since_ms: Option<u64>,
    /// Blue-green: no longer serving; stops at this time.
    #[serde(default)]
    pub retire_at_ms: Option<u64>,
    /// Stopped by `skiff stop INSTANCE`: not started again, whatever its restart policy,
    /// until `skiff start INSTANCE`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub held: bool,
    /// `skiff restart INSTANCE`: its container is being ended; its exit starts it again
    /// at once, from its own spec.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub restart_requested: bool,
}

impl InstanceRow {
    /// On the bridge, its address on each network it joined, in the order it joined them
    /// (the first is `ip`): as started, or, for one started before each network had a
    /// subnet of its own, its one address on all of them.
    pub fn network_addresses(&self) -> Vec<(String, Ipv4Addr)> {
        let networks = self.spec.joined_networks();
        if !self.addresses.is_empty() {
            return networks
                .into_iter()
                .filter_map(|n| {
                    let a = *self.addresses.get(&n)?;
                    Some((n, a))
                })
                .collect();
        }
        let Some(ip) = self.ip.as_deref().and_then(|i| i.parse().ok()) else { return vec![] };
        networks.into_iter().map(|n| (n, ip)).collect()
    }

    /// The address a peer on `networks` reaches it at: on the first of its own networks
    /// the peer joined too.
    pub fn address_for(&self, networks: &BTreeSet<String>) -> Option<Ipv4Addr> {
        self.network_addresses().into_iter().find(|(n, _)| networks.contains(n)).map(|(_, a)| a)
    }

    /// Every address it holds on the bridge, each once, `ip` (its MAC's) first.
    pub fn all_addresses(&self) -> Vec<Ipv4Addr> {
        let mut out: Vec<Ipv4Addr> = self.ip.as_deref().and_then(|i| i.parse().ok()).into_iter().collect();
        for a in self.addresses.values() {
            if !out.contains(a) {
                out.push(*a);
            }
        }
        out
    }

    /// A new instance, not started yet.
    pub fn pending(name: String, deployment: String, container_id: String, spec: Deployment) -> Self {
        InstanceRow {
            name,
            deployment,
            container_id,
            spec,
            state: InstanceState::Pending,
            health: None,
            health_failures: 0,
            pid: None,
            ip: None,
            addresses: BTreeMap::new(),
            restarts: 0,
            streak: 0,
            exit_code: None,
            oom_killed: false,
            started_at_ms: None,
            finished_at_ms: None,
            next_start_ms: None,
            message: None,
            retiring: false,
            ready_since_ms: None,
            retire_at_ms: None,
            held: false,
            restart_requested: false,
        }
    }
}

/// The meta key of the hub's digest of the assignment held ([`State::set_assignment`]).
pub const DIGEST_KEY: &str = "assignment_digest";

pub struct State {
    conn: Connection,
}

impl State {
    /// Rows changed through this connection since it opened: what moved since it was last
    /// read tells watchers whether to look again.
    pub fn total_changes(&self) -> u64 {
        self.conn.total_changes()
    }

    /// Opens `agent.db`; one that is not a database, or fails SQLite's integrity check
    /// (a power cut on a card that lies about flushes, a bad block), is moved aside as
    /// `agent.db.corrupt-<ms>` (with its WAL) and a new one is made. Returns where the
    /// old one went, if it was moved: the agent then rebuilds from the node.
    pub fn open_or_recover(path: &Path, now_ms: u64) -> Result<(Self, Option<std::path::PathBuf>), StateError> {
        let why = match State::open(path) {
            Ok(s) => match s.check() {
                Ok(()) => return Ok((s, None)),
                Err(e) => e,
            },
            Err(e) => e,
        };
        if !is_corruption(&why) {
            return Err(why);
        }
        let aside = path.with_file_name(format!(
            "{}.corrupt-{now_ms}",
            path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
        ));
        for suffix in ["", "-wal", "-shm"] {
            let from = std::path::PathBuf::from(format!("{}{suffix}", path.display()));
            if from.exists() {
                let to = std::path::PathBuf::from(format!("{}{suffix}", aside.display()));
                std::fs::rename(&from, &to)
                    .map_err(|e| StateError::Corrupt(format!("moving {} aside: {e}", from.display())))?;
            }
        }
        tracing::error!(path = %path.display(), aside = %aside.display(), error = %why, "agent.db is corrupt; moved aside");
        Ok((State::open(path)?, Some(aside)))
    }

    /// SQLite's quick integrity check, and that the records parse.
    fn check(&self) -> Result<(), StateError> {
        let verdict: String = self.conn.query_row("PRAGMA quick_check", [], |r| r.get(0))?;
        if verdict != "ok" {
            return Err(StateError::Corrupt(verdict));
        }
        self.instances()?;
        self.desired_slots()?;
        Ok(())
    }

    pub fn open(path: &Path) -> Result<Self, StateError> {
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        // Instance bookkeeping survives a crash of the agent (WAL); only the desired state
        // must also survive a power cut, so `set_desired` commits with synchronous=FULL.
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        let mut s = State { conn };
        s.migrate()?;
        Ok(s)
    }

    fn migrate(&mut self) -> Result<(), StateError> {
        let v: usize = self.conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        for (i, m) in MIGRATIONS.iter().enumerate().skip(v) {
            let tx = self.conn.transaction()?;
            tx.execute_batch(m)?;
            tx.pragma_update(None, "user_version", i + 1)?;
            tx.commit()?;
        }
        Ok(())
    }

    pub fn meta(&self, key: &str) -> Result<Option<String>, StateError> {
        Ok(self.conn.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0)).optional()?)
    }

    pub fn delete_meta(&self, key: &str) -> Result<(), StateError> {
        self.conn.execute("DELETE FROM meta WHERE key = ?1", [key])?;
        Ok(())
    }

    /// Sets several meta values in one transaction (all or none).
    pub fn set_metas(&mut self, values: &[(&str, &str)]) -> Result<(), StateError> {
        let tx = self.conn.transaction()?;
        for (k, v) in values {
            tx.execute(
                "INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                [k, v],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Every meta key that starts with `prefix`.
    pub fn meta_keys(&self, prefix: &str) -> Result<Vec<String>, StateError> {
        let mut st = self.conn.prepare("SELECT key FROM meta WHERE substr(key, 1, length(?1)) = ?1 ORDER BY key")?;
        let v = st.query_map([prefix], |r| r.get(0))?.collect::<Result<_, _>>()?;
        Ok(v)
    }

    pub fn set_meta(&self, key: &str, value: &str) -> Result<(), StateError> {
        self.conn.execute(
            "INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            [key, value],
        )?;
        Ok(())
    }

    /// Replaces the desired deployments in one transaction, durably (fsync) before it
    /// returns: the agent acts on nothing it has not persisted.
    /// Like `set_desired`, with the instance numbers to run here for each deployment
    /// (`None`: all of `1..=replicas`).
    pub fn set_desired_slots(
        &mut self,
        deployments: &[(Deployment, Option<Vec<u32>>)],
        revision: u64,
    ) -> Result<(), StateError> {
        self.set_assignment(deployments, revision, None, None)
    }

    /// As [`State::set_desired_slots`], with the names of the metrics to scrape (from a
    /// hub's assignment) in the same transaction.
    pub fn set_assignment(
        &mut self,
        deployments: &[(Deployment, Option<Vec<u32>>)],
        revision: u64,
        metrics: Option<&[String]>,
        digest: Option<&str>,
    ) -> Result<(), StateError> {
        self.conn.pragma_update(None, "synchronous", "FULL")?;
        let r = self.write_desired(deployments, revision, metrics, digest);
        self.conn.pragma_update(None, "synchronous", "NORMAL")?;
        r
    }

    fn write_desired(
        &mut self,
        deployments: &[(Deployment, Option<Vec<u32>>)],
        revision: u64,
        metrics: Option<&[String]>,
        digest: Option<&str>,
    ) -> Result<(), StateError> {
        let tx = self.conn.transaction()?;
        // The hub's digest of exactly this assignment, or none (never an older one's).
        match digest {
            Some(d) => tx.execute(
                "INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                [DIGEST_KEY, d],
            )?,
            None => tx.execute("DELETE FROM meta WHERE key = ?1", [DIGEST_KEY])?,
        };
        if let Some(names) = metrics {
            tx.execute(
                "INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                [crate::scrape::NAMES_KEY, &serde_json::to_string(names)?],
            )?;
        }
        tx.execute("DELETE FROM deployments", [])?;
        for (d, idx) in deployments {
            let idx = idx.as_ref().map(serde_json::to_string).transpose()?;
            tx.execute(
                "INSERT INTO deployments (name, spec, indexes) VALUES (?1, ?2, ?3)",
                params![d.name, serde_json::to_string(d)?, idx],
            )?;
        }
        tx.execute("INSERT INTO meta (key, value) VALUES ('desired_revision', ?1) ON CONFLICT(key) DO UPDATE SET value = excluded.value", [revision.to_string()])?;
        tx.commit()?;
        Ok(())
    }

    /// Every row of a one-column query of JSON documents.
    fn json_rows<T: serde::de::DeserializeOwned>(&self, sql: &str) -> Result<Vec<T>, StateError> {
        let mut st = self.conn.prepare(sql)?;
        let rows = st.query_map([], |r| r.get::<_, String>(0))?;
        let mut out = vec![];
        for r in rows {
            out.push(serde_json::from_str(&r?)?);
        }
        Ok(out)
    }

    pub fn desired(&self) -> Result<Vec<Deployment>, StateError> {
        self.json_rows("SELECT spec FROM deployments ORDER BY name")
    }

    /// Each desired deployment with the instance numbers this node runs.
    pub fn desired_slots(&self) -> Result<Vec<(Deployment, Vec<u32>)>, StateError> {
        let mut st = self.conn.prepare("SELECT spec, indexes FROM deployments ORDER BY name")?;
        let rows = st.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, Option<String>>(1)?)))?;
        let mut out = vec![];
        for row in rows {
            let (spec, idx) = row?;
            let d: Deployment = serde_json::from_str(&spec)?;
            let idx: Option<Vec<u32>> = idx.map(|i| serde_json::from_str(&i)).transpose()?;
            out.push((d, idx));
        }
        // Without the hub's slots: a pod's other container has the slots of its first.
        let own = |d: &Deployment, idx: &Option<Vec<u32>>| idx.clone().unwrap_or_else(|| (1..=d.replicas).collect());
        let of_first: std::collections::BTreeMap<String, Vec<u32>> =
            out.iter().map(|(d, i)| (d.name.clone(), own(d, i))).collect();
        Ok(out
            .into_iter()
            .map(|(d, idx)| {
                let slots = match (&idx, &d.pod_of) {
                    (None, Some(first)) => of_first.get(first).cloned().unwrap_or_default(),
                    _ => own(&d, &idx),
                };
                (d, slots)
            })
            .collect())
    }

    pub fn desired_revision(&self) -> Result<u64, StateError> {
        Ok(self.meta("desired_revision")?.and_then(|v| v.parse().ok()).unwrap_or(0))
    }

    pub fn instances(&self) -> Result<Vec<InstanceRow>, StateError> {
        self.json_rows("SELECT data FROM instances ORDER BY name")
    }

    pub fn instance(&self, name: &str) -> Result<Option<InstanceRow>, StateError> {
        let data: Option<String> =
            self.conn.query_row("SELECT data FROM instances WHERE name = ?1", [name], |r| r.get(0)).optional()?;
        Ok(data.map(|d| serde_json::from_str(&d)).transpose()?)
    }

    pub fn put_instance(&self, row: &InstanceRow) -> Result<(), StateError> {
        self.conn.execute(
            "INSERT INTO instances (name, data) VALUES (?1, ?2) ON CONFLICT(name) DO UPDATE SET data = excluded.data",
            params![row.name, serde_json::to_string(row)?],
        )?;
        Ok(())
    }

    /// Gives an instance (and its address lease) another name, in one transaction.
    pub fn rename_instance(&mut self, row: &InstanceRow, old: &str) -> Result<(), StateError> {
        let tx = self.conn.transaction()?;
        tx.execute("DELETE FROM instances WHERE name = ?1", [old])?;
        tx.execute(
            "INSERT INTO instances (name, data) VALUES (?1, ?2)",
            params![row.name, serde_json::to_string(row)?],
        )?;
        tx.execute("UPDATE leases SET instance = ?1 WHERE instance = ?2", [&row.name, old])?;
        tx.commit()?;
        Ok(())
    }

    /// Records that `instance` holds `ip` on `network` (rebuilding leases from the
    /// instances; '' for a macvlan one).
    pub fn set_lease(&self, instance: &str, network: &str, ip: &str) -> Result<(), StateError> {
        self.conn.execute(
            "INSERT INTO leases (ip, instance, network) VALUES (?1, ?2, ?3) ON CONFLICT DO NOTHING",
            [ip, instance, network],
        )?;
        Ok(())
    }

    pub fn delete_instance(&self, name: &str) -> Result<(), StateError> {
        self.conn.execute("DELETE FROM instances WHERE name = ?1", [name])?;
        self.conn.execute("DELETE FROM leases WHERE instance = ?1", [name])?;
        Ok(())
    }

    /// Every lease: instance name → its addresses, with the network of each ('' for a
    /// macvlan one, or one from before networks had subnets of their own).
    pub fn leases(&self) -> Result<HashMap<String, Vec<(String, Ipv4Addr)>>, StateError> {
        let mut out: HashMap<String, Vec<(String, Ipv4Addr)>> = HashMap::new();
        for (ip, instance, network) in all_leases(&self.conn)? {
            out.entry(instance).or_default().push((network, ip));
        }
        Ok(out)
    }

    /// A macvlan instance's address: its existing lease, or the lowest free one of
    /// `candidates` (leases of it on the bridge's networks are given back).
    pub fn lease(
        &self,
        instance: &str,
        candidates: impl Iterator<Item = Ipv4Addr>,
        subnet: &str,
    ) -> Result<Ipv4Addr, StateError> {
        self.conn.execute("DELETE FROM leases WHERE instance = ?1 AND network != ''", [instance])?;
        if let Some(ip) = self
            .conn
            .query_row("SELECT ip FROM leases WHERE instance = ?1", [instance], |r| r.get::<_, String>(0))
            .optional()?
        {
            // A lease from another subnet (the deployment moved to another network) is
            // given back.
            let within = |ip: &Ipv4Addr| subnet.parse::<ipnet::Ipv4Net>().map_or(true, |n| n.contains(ip));
            match ip.parse::<Ipv4Addr>() {
                Ok(ip) if within(&ip) => return Ok(ip),
                _ => {
                    self.conn.execute("DELETE FROM leases WHERE instance = ?1", [instance])?;
                }
            }
        }
        let mut st = self.conn.prepare("SELECT ip FROM leases")?;
        let used: HashSet<String> = st.query_map([], |r| r.get::<_, String>(0))?.collect::<Result<_, _>>()?;
        for c in candidates {
            if !used.contains(&c.to_string()) {
                self.conn.execute(
                    "INSERT INTO leases (ip, instance) VALUES (?1, ?2)",
                    [c.to_string(), instance.to_string()],
                )?;
                return Ok(c);
            }
        }
        Err(StateError::NoAddress(subnet.to_string()))
    }

    /// Leases from before each network had a subnet of its own (network ''), of
    /// instances on the bridge, are counted on their first network: that network's
    /// subnet is then the one around them, so the new instances of a network that still
    /// has such old ones here get addresses on-link with them (the old hold the whole
    /// pool's prefix). Done at the agent's start.
    pub fn adopt_old_leases(&self) -> Result<usize, StateError> {
        let mut n = 0;
        for r in self.instances()?.iter().filter(|r| r.spec.network == skiff_model::NetworkMode::Bridge) {
            let (Some(ip), true, Some(first)) =
                (&r.ip, r.addresses.is_empty(), r.spec.joined_networks().into_iter().next())
            else {
                continue;
            };
            n += self.conn.execute(
                "UPDATE OR IGNORE leases SET network = ?1 WHERE instance = ?2 AND ip = ?3 AND network = ''",
                [&first, &r.name, ip],
            )?;
        }
        Ok(n)
    }

    /// A bridge instance's address on each of `networks`, in their order. Each network
    /// has a subnet of prefix `prefix` cut from `pool`: the one its leases on this node
    /// are in, else the lowest that holds no lease (so a network's subnet is free again
    /// once its last instance here is gone). Within it, the instance keeps its lease, else
    /// takes the lowest free address. Its leases on other networks are given back (it
    /// left them), and so is one from outside its network's subnet.
    pub fn network_leases(
        &mut self,
        instance: &str,
        networks: &[String],
        pool: Subnet,
        prefix: u8,
    ) -> Result<Vec<Address>, StateError> {
        let tx = self.conn.transaction()?;
        let mut rows = all_leases(&tx)?;
        let give_back = |tx: &rusqlite::Transaction, rows: &mut Vec<(Ipv4Addr, String, String)>, net: &str| {
            rows.retain(|(_, i, n)| !(i == instance && n == net));
            tx.execute("DELETE FROM leases WHERE instance = ?1 AND network = ?2", [instance, net])
        };
        let left: BTreeSet<String> =
            rows.iter().filter(|(_, i, n)| i == instance && !networks.contains(n)).map(|(_, _, n)| n.clone()).collect();
        for n in &left {
            give_back(&tx, &mut rows, n)?;
        }
        let mut out = Vec::with_capacity(networks.len());
        for net in networks {
            let theirs = rows.iter().filter(|(_, _, n)| n == net).find_map(|(ip, _, _)| pool.block_of(*ip, prefix));
            let subnet = match theirs {
                Some(b) => b,
                None => pool
                    .blocks(prefix)
                    .find(|b| !rows.iter().any(|(ip, _, _)| b.contains(*ip)))
                    .ok_or_else(|| StateError::NoSubnet { network: net.clone(), pool: pool.to_string(), prefix })?,
            };
            let mine = rows.iter().find(|(_, i, n)| i == instance && n == net).map(|(ip, _, _)| *ip);
            let ip = match mine {
                Some(ip) if subnet.contains(ip) => ip,
                other => {
                    if other.is_some() {
                        give_back(&tx, &mut rows, net)?;
                    }
                    let used: HashSet<Ipv4Addr> = rows.iter().map(|(ip, _, _)| *ip).collect();
                    let ip = subnet
                        .hosts()
                        .find(|h| !used.contains(h))
                        .ok_or_else(|| StateError::NoAddress(format!("{subnet} (network {net})")))?;
                    tx.execute(
                        "INSERT INTO leases (ip, instance, network) VALUES (?1, ?2, ?3)",
                        [ip.to_string().as_str(), instance, net],
                    )?;
                    rows.push((ip, instance.to_string(), net.clone()));
                    ip
                }
            };
            out.push(Address { ip, subnet });
        }
        tx.commit()?;
        Ok(out)
    }

    pub fn event(&self, time_ms: u64, object: &str, reason: &str, message: &str) -> Result<(), StateError> {
        self.conn.execute(
            "INSERT INTO events (time_ms, object, reason, message) VALUES (?1, ?2, ?3, ?4)",
            params![time_ms as i64, object, reason, message],
        )?;
        // Bounded: keep the newest 10 000.
        self.conn.execute("DELETE FROM events WHERE id <= (SELECT MAX(id) FROM events) - 10000", [])?;
        Ok(())
    }

    /// Stores a resource sample, keeping the newest `keep`.
    pub fn push_metrics(&self, sample: &MetricsSample, keep: usize) -> Result<(), StateError> {
        self.conn.execute("INSERT INTO metrics (data) VALUES (?1)", [serde_json::to_string(sample)?])?;
        self.conn.execute("DELETE FROM metrics WHERE id <= (SELECT MAX(id) FROM metrics) - ?1", [keep as i64])?;
        Ok(())
    }

    /// Samples after id `after`, oldest first, at most `limit`, with their ids.
    pub fn metrics_since(&self, after: u64, limit: usize) -> Result<Vec<(u64, MetricsSample)>, StateError> {
        let mut st = self.conn.prepare("SELECT id, data FROM metrics WHERE id > ?1 ORDER BY id LIMIT ?2")?;
        let rows = st.query_map(params![after as i64, limit as i64], |r| {
            Ok((r.get::<_, i64>(0)? as u64, r.get::<_, String>(1)?))
        })?;
        let mut out = vec![];
        for row in rows {
            let (id, data) = row?;
            out.push((id, serde_json::from_str(&data)?));
        }
        Ok(out)
    }

    /// Events after id `after`, oldest first, at most `limit`, with their ids: what a node
    /// has not yet shipped to its hub (kept on disk, bounded as above, while offline).
    pub fn events_since(&self, after: u64, limit: usize) -> Result<Vec<(u64, EventRecord)>, StateError> {
        let mut st = self
            .conn
            .prepare("SELECT id, time_ms, object, reason, message FROM events WHERE id > ?1 ORDER BY id LIMIT ?2")?;
        let rows = st.query_map(params![after as i64, limit as i64], |r| {
            Ok((
                r.get::<_, i64>(0)? as u64,
                EventRecord {
                    time_ms: r.get::<_, i64>(1)? as u64,
                    object: r.get(2)?,
                    reason: r.get(3)?,
                    message: r.get(4)?,
                    node: None,
                },
            ))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub fn events(&self, limit: usize) -> Result<Vec<EventRecord>, StateError> {
        let mut st = self.conn.prepare(
            "SELECT time_ms, object, reason, message FROM (SELECT * FROM events ORDER BY id DESC LIMIT ?1) ORDER BY id",
        )?;
        let rows = st.query_map([limit as i64], |r| {
            Ok(EventRecord {
                time_ms: r.get::<_, i64>(0)? as u64,
                object: r.get(1)?,
                reason: r.get(2)?,
                message: r.get(3)?,
                node: None,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

/// Image reference (normalized) → the deployments of this node's desired state that use
/// it, from `agent.db` in `data_dir` (none when no agent ever ran there): what `skiff
/// image rm` must not remove.
pub fn images_in_use(data_dir: &Path) -> Result<std::collections::BTreeMap<String, Vec<String>>, StateError> {
    let mut m: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    let db = data_dir.join("agent.db");
    if !db.exists() {
        return Ok(m);
    }
    for d in State::open(&db)?.desired()? {
        m.entry(skiff_image::normalize_reference(&d.image)).or_default().push(d.name);
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn desired_and_leases_persist() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("agent.db");
        {
            let mut s = State::open(&p).unwrap();
            let mut api = Deployment::new("api", "img");
            api.replicas = 5;
            let mut side = Deployment::new("web-side", "img");
            side.pod_of = Some("web".into());
            let mut web = Deployment::new("web", "img");
            web.replicas = 2;
            s.set_desired_slots(&[(web, None), (api, Some(vec![2, 5])), (side, None)], 7).unwrap();
            let c = || (2..10).map(|i| Ipv4Addr::new(10, 0, 0, i));
            assert_eq!(s.lease("web-1", c(), "n").unwrap(), Ipv4Addr::new(10, 0, 0, 2));
            assert_eq!(s.lease("web-2", c(), "n").unwrap(), Ipv4Addr::new(10, 0, 0, 3));
            assert_eq!(s.lease("web-1", c(), "n").unwrap(), Ipv4Addr::new(10, 0, 0, 2), "stable per instance");
            s.event(1, "web-1", "Started", "pid 5").unwrap();
        }
        let s = State::open(&p).unwrap();
        assert_eq!(s.desired().unwrap()[1].name, "web");
        let slots: Vec<(String, Vec<u32>)> = s.desired_slots().unwrap().into_iter().map(|(d, i)| (d.name, i)).collect();
        assert_eq!(
            slots,
            [("api".to_string(), vec![2, 5]), ("web".to_string(), vec![1, 2]), ("web-side".to_string(), vec![1, 2])],
            "placed numbers, or all; a pod's other container those of its first"
        );
        assert_eq!(s.desired_revision().unwrap(), 7);
        s.delete_instance("web-1").unwrap();
        let c = (2..10).map(|i| Ipv4Addr::new(10, 0, 0, i));
        assert_eq!(s.lease("db-1", c, "n").unwrap(), Ipv4Addr::new(10, 0, 0, 2), "released address is reused");
        assert_eq!(s.events(10).unwrap().len(), 1);
        s.event(2, "web-1", "Exited", "code 0").unwrap();
        let since: Vec<(u64, String)> =
            s.events_since(1, 10).unwrap().into_iter().map(|(i, e)| (i, e.reason)).collect();
        assert_eq!(since, [(2, "Exited".to_string())]);
        let full = (2..4).map(|i| Ipv4Addr::new(10, 0, 0, i));
        assert!(matches!(s.lease("x-1", full, "n"), Err(StateError::NoAddress(_))));
    }

    #[test]
    fn each_network_gets_a_subnet_of_the_pool_and_each_instance_an_address_on_each_of_its_networks() {
        let t = tempfile::tempdir().unwrap();
        let mut s = State::open(&t.path().join("agent.db")).unwrap();
        let pool = Subnet::parse("10.9.0.0/24").unwrap();
        let nets = |n: &[&str]| n.iter().map(|n| n.to_string()).collect::<Vec<_>>();
        let at = |s: &mut State, i: &str, n: &[&str]| -> Vec<String> {
            s.network_leases(i, &nets(n), pool, 28).unwrap().iter().map(|a| format!("{}@{}", a.ip, a.subnet)).collect()
        };
        // A lease from before networks had subnets of their own (network '') holds its address.
        s.set_lease("old-1", "", "10.9.0.2").unwrap();
        assert_eq!(at(&mut s, "a-1", &["a_default"]), ["10.9.0.18@10.9.0.16/28"], "the lowest subnet holding no lease");
        assert_eq!(at(&mut s, "b-1", &["b_default"]), ["10.9.0.34@10.9.0.32/28"]);
        assert_eq!(
            at(&mut s, "a-2", &["a_default", "b_default"]),
            ["10.9.0.19@10.9.0.16/28", "10.9.0.35@10.9.0.32/28"],
            "one address per network, in the order joined"
        );
        assert_eq!(
            at(&mut s, "a-2", &["a_default", "b_default"]),
            ["10.9.0.19@10.9.0.16/28", "10.9.0.35@10.9.0.32/28"]
        );
        // It leaves b: that lease is given back.
        assert_eq!(at(&mut s, "a-2", &["a_default"]), ["10.9.0.19@10.9.0.16/28"]);
        let held = s.leases().unwrap();
        assert_eq!(held["a-2"], [("a_default".to_string(), Ipv4Addr::new(10, 9, 0, 19))]);
        // The last instance of b goes: its subnet is free for the next network.
        s.delete_instance("b-1").unwrap();
        assert_eq!(at(&mut s, "c-1", &["c_default"]), ["10.9.0.34@10.9.0.32/28"]);
        // The old lease is given back when its instance starts again on the bridge.
        assert_eq!(at(&mut s, "old-1", &["a_default"]), ["10.9.0.20@10.9.0.16/28"]);
        assert!(!s.leases().unwrap()["old-1"].iter().any(|(n, _)| n.is_empty()));
        assert_eq!(at(&mut s, "d-1", &["d_default"]), ["10.9.0.2@10.9.0.0/28"], "the first subnet is free again");
        // 16 subnets of /28 in a /24: three are taken (d, a, c), thirteen more networks fit.
        for i in 0..13 {
            at(&mut s, &format!("n{i}-1"), &[&format!("n{i}")]);
        }
        let full = s.network_leases("z-1", &nets(&["z"]), pool, 28).unwrap_err();
        assert!(full.to_string().contains("no subnet of /28 left in the pool 10.9.0.0/24 for network \"z\""), "{full}");
        // A subnet's addresses run out (13 in a /28).
        for i in 0..12 {
            at(&mut s, &format!("d-{}", i + 2), &["d_default"]);
        }
        let e = s.network_leases("d-99", &nets(&["d_default"]), pool, 28).unwrap_err();
        assert!(e.to_string().contains("no free address left in 10.9.0.0/28 (network d_default)"), "{e}");
    }

    #[test]
    fn leases_from_before_subnets_per_network_are_kept_and_new_instances_join_them_on_link() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("agent.db");
        {
            // An agent.db as the agent before left it (schema 3): one lease per instance.
            let c = Connection::open(&p).unwrap();
            for m in &MIGRATIONS[..3] {
                c.execute_batch(m).unwrap();
            }
            c.pragma_update(None, "user_version", 3).unwrap();
            c.execute("INSERT INTO leases (ip, instance) VALUES ('10.9.0.5', 'web-1')", []).unwrap();
        }
        let mut s = State::open(&p).unwrap();
        assert_eq!(s.leases().unwrap()["web-1"], [(String::new(), Ipv4Addr::new(10, 9, 0, 5))]);
        let mut web = InstanceRow::pending("web-1".into(), "web".into(), "x-web-1".into(), Deployment::new("web", "i"));
        web.ip = Some("10.9.0.5".into());
        s.put_instance(&web).unwrap();
        assert_eq!(s.adopt_old_leases().unwrap(), 1);
        assert_eq!(s.leases().unwrap()["web-1"], [("default_default".to_string(), Ipv4Addr::new(10, 9, 0, 5))]);
        let pool = Subnet::parse("10.9.0.0/24").unwrap();
        let got = s.network_leases("web-2", &["default_default".to_string()], pool, 28).unwrap();
        assert_eq!(got[0].subnet.to_string(), "10.9.0.0/28", "beside the old one");
        let other = s.network_leases("db-1", &["other".to_string()], pool, 28).unwrap();
        assert_eq!(other[0].subnet.to_string(), "10.9.0.16/28");
        let again = s.network_leases("web-1", &["default_default".to_string()], pool, 28).unwrap();
        assert_eq!(again[0].ip, Ipv4Addr::new(10, 9, 0, 5), "the old one keeps its address when started again");
    }
}
