//! Several hubs serving one store at once: each holds the tunnels of the nodes that
//! dialled it, and learns from every other hub, by asking it each second, what that hub's
//! nodes are — their state, instances, mesh address and site cache, and for the hub that
//! leads their newest samples. Only changes travel: a hub numbers its nodes' changes (a
//! generation, within an epoch that is new at each start) and answers a peer with what
//! changed since the generation that peer last saw. Nothing of it is written to the store:
//! a heartbeat stays in the memory of the hub that heard it.
//!
//! A node another hub holds is believed only as that hub tells it (hubs trust each other:
//! they share the store and the admin token); the node itself is still believed only about
//! its own slots, by the hub that holds its tunnel.

use super::{Fleet, Seen};
use crate::schedule::NodeState;
use serde::{Deserialize, Serialize};
use skiff_model::metrics::MetricsSample;
use skiff_model::InstanceStatus;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::Ordering;

/// One node as the hub holding (or last holding) its tunnel knows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerNode {
    pub name: String,
    /// Its tunnel is open on that hub now.
    pub connected: bool,
    pub state: NodeState,
    pub since_ms: u64,
    #[serde(default)]
    pub problems: Vec<String>,
    #[serde(default)]
    pub cache: Option<String>,
    #[serde(default)]
    pub mesh: Option<String>,
    #[serde(default)]
    pub instances: Vec<InstanceStatus>,
    /// Its newest sample, when asked for (the hub that leads runs the autoscaler).
    #[serde(default)]
    pub sample: Option<MetricsSample>,
}

/// A hub's answer to a peer: its nodes that changed since `since` (all of them when the
/// peer's epoch is not this one's), and its own role.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerState {
    pub epoch: String,
    pub generation: u64,
    /// Every node this hub holds or held is in it (the peer forgets what it had of it).
    pub full: bool,
    pub leads: bool,
    pub cut_off: bool,
    pub nodes: Vec<PeerNode>,
}

/// This hub's nodes' changes, numbered: a generation is taken and its node recorded
/// under one lock, so an answer that says it is current to generation G holds every
/// change numbered up to G (a change numbered before the answer but recorded after it
/// would never be told).
#[derive(Debug, Default)]
pub(super) struct Changes {
    generation: u64,
    changed_at: HashMap<String, u64>,
    sampled_at: HashMap<String, u64>,
}

impl Changes {
    fn next(&mut self) -> u64 {
        self.generation += 1;
        self.generation
    }
}

/// What a hub knows of one peer.
#[derive(Debug, Default)]
pub(super) struct PeerView {
    epoch: String,
    generation: u64,
    /// The nodes whose tunnels are open on it.
    connected: BTreeSet<String>,
    leads: bool,
    cut_off: bool,
    heard_ms: u64,
    /// When its nodes were last counted heard from (see [`REFRESH_MS`]).
    refreshed_ms: u64,
}

/// How often the nodes a peer holds are counted heard from, through it: well within
/// the heartbeat grace, and not each second for each of 100,000 nodes.
const REFRESH_MS: u64 = 5_000;
/// How often a hub looks for its own nodes gone silent (every peer's question asks).
const SWEEP_MS: u64 = 1_000;

/// A peer that has not answered for this long is not counted as leading.
const PEER_STALE_MS: u64 = 5_000;

impl Fleet {
    /// Whether this hub runs the controllers (placement among them). Only the hub that
    /// holds the store's lease does; the others hold tunnels and serve the API.
    pub fn set_leads(&self, leads: bool) {
        self.leads.store(leads, Ordering::Relaxed);
        if leads {
            // What the peers know, with samples, from the start.
            if let Ok(mut p) = self.peers.lock() {
                p.values_mut().for_each(|v| v.epoch.clear());
            }
            self.dirty.store(true, Ordering::Relaxed);
        }
    }

    pub fn leads(&self) -> bool {
        self.leads.load(Ordering::Relaxed)
    }

    /// A change of what peers are told of `node`.
    pub(super) fn node_changed(&self, node: &str) {
        if let Ok(mut c) = self.changes.lock() {
            let g = c.next();
            c.changed_at.insert(node.to_string(), g);
        }
    }

    /// A new sample of `node` (told only to a peer that asks for samples).
    pub(super) fn node_sampled(&self, node: &str) {
        if let Ok(mut c) = self.changes.lock() {
            let g = c.next();
            c.sampled_at.insert(node.to_string(), g);
        }
    }

    /// Nodes held here whose heartbeats stopped are Unknown now: a change to tell peers.
    /// At most every [`SWEEP_MS`], in one pass.
    fn sweep(&self, now: u64) {
        let last = self.swept_ms.load(Ordering::Relaxed);
        if last != 0 && now.saturating_sub(last) < SWEEP_MS {
            return;
        }
        self.swept_ms.store(now, Ordering::Relaxed);
        let silent: Vec<String> = match self.seen.lock() {
            Ok(mut s) => {
                s.iter_mut().filter_map(|(n, v)| (v.via.is_none() && v.went_silent(now)).then(|| n.clone())).collect()
            }
            Err(_) => return,
        };
        for n in silent {
            self.node_changed(&n);
        }
    }

    /// What a peer that saw `since` of `epoch` is told (see [`PeerState`]).
    pub fn peer_state(&self, epoch: &str, since: u64, samples: bool) -> PeerState {
        let now = self.clock.now_ms();
        self.sweep(now);
        let full = epoch != self.epoch;
        let since = if full { 0 } else { since };
        let (generation, names) = match self.changes.lock() {
            Ok(c) => {
                let after = |m: &HashMap<String, u64>| -> Vec<String> {
                    m.iter().filter(|(_, g)| **g > since).map(|(n, _)| n.clone()).collect()
                };
                let mut names: BTreeSet<String> = after(&c.changed_at).into_iter().collect();
                if samples {
                    names.extend(after(&c.sampled_at));
                }
                (c.generation, names)
            }
            // Told nothing, and as current as the question: asked again from there.
            Err(_) => (since, BTreeSet::new()),
        };
        // Only the names told of: the whole set of tunnels is 17,000 names on a busy hub.
        let tunnels: BTreeSet<String> = self
            .tunnels
            .lock()
            .map(|t| names.iter().filter(|n| t.contains_key(*n)).cloned().collect())
            .unwrap_or_default();
        let nodes = names
            .into_iter()
            .filter_map(|name| {
                let (state, since_ms) = self.state_of(&name, now);
                let seen = self.seen.lock().ok()?.get(&name).cloned()?;
                let instances = self.statuses.lock().ok().and_then(|s| s.get(&name).cloned()).unwrap_or_default();
                let sample = if samples { self.samples.lock().ok().and_then(|s| s.get(&name).cloned()) } else { None };
                Some(PeerNode {
                    connected: seen.via.is_none() && tunnels.contains(&name),
                    state,
                    since_ms,
                    problems: seen.problems,
                    cache: seen.cache,
                    mesh: seen.mesh,
                    instances,
                    sample,
                    name,
                })
            })
            .collect();
        PeerState {
            epoch: self.epoch.clone(),
            generation,
            full,
            leads: self.leads(),
            cut_off: *self.cut_off.borrow(),
            nodes,
        }
    }

    /// Where this hub's view of `peer` stands: the epoch and generation to ask it from.
    pub fn peer_cursor(&self, peer: &str) -> (String, u64) {
        self.peers.lock().ok().and_then(|p| p.get(peer).map(|v| (v.epoch.clone(), v.generation))).unwrap_or_default()
    }

    /// Takes in what `peer` (its URL) answered: its nodes are believed as it tells them,
    /// unless this hub holds the node's tunnel itself.
    pub fn merge_peer_state(&self, peer: &str, st: PeerState) {
        let now = self.clock.now_ms();
        let tunnels: BTreeSet<String> = self
            .tunnels
            .lock()
            .map(|t| st.nodes.iter().filter(|n| t.contains_key(&n.name)).map(|n| n.name.clone()).collect())
            .unwrap_or_default();
        let (mut placement, mut mesh) = (false, false);
        let connected = {
            let Ok(mut peers) = self.peers.lock() else { return };
            let v = peers.entry(peer.to_string()).or_default();
            if st.full {
                v.connected.clear();
            }
            for n in &st.nodes {
                if n.connected {
                    v.connected.insert(n.name.clone());
                } else {
                    v.connected.remove(&n.name);
                }
            }
            v.epoch.clone_from(&st.epoch);
            v.generation = st.generation;
            v.leads = st.leads;
            v.cut_off = st.cut_off;
            v.heard_ms = now;
            if st.full || now.saturating_sub(v.refreshed_ms) >= REFRESH_MS {
                v.refreshed_ms = now;
                v.connected.clone()
            } else {
                BTreeSet::new()
            }
        };
        let via = Some(peer.to_string());
        for n in st.nodes {
            if tunnels.contains(&n.name) {
                continue;
            }
            {
                let Ok(mut seen) = self.seen.lock() else { return };
                // A peer's word that it no longer holds the node counts only if it was the
                // one believed.
                if !n.connected && seen.get(&n.name).is_some_and(|s| s.via != via) {
                    continue;
                }
                let s = seen.entry(n.name.clone()).or_insert_with(|| Seen::new(now));
                placement |= s.state != n.state;
                mesh |= s.mesh != n.mesh;
                s.via.clone_from(&via);
                s.last_ms = now;
                s.state = n.state;
                s.since_ms = n.since_ms;
                s.told = (n.state, n.since_ms);
                s.problems = n.problems;
                s.cache = n.cache;
                s.mesh = n.mesh;
            }
            if let Ok(mut all) = self.statuses.lock() {
                let serving = |v: &[InstanceStatus]| -> BTreeMap<(String, String), bool> {
                    v.iter().map(|i| ((i.deployment.clone(), i.name.clone()), super::mesh::serves(i))).collect()
                };
                mesh |= all.get(&n.name).map(|o| serving(o)).unwrap_or_default() != serving(&n.instances);
                all.insert(n.name.clone(), n.instances);
            }
            if let Some(sample) = n.sample {
                if let Ok(mut all) = self.samples.lock() {
                    if all.get(&n.name).is_none_or(|m| m.time_ms < sample.time_ms) {
                        all.insert(n.name.clone(), sample);
                    }
                }
            }
        }
        // The peer answered: the nodes it holds were heard from, through it, and are as
        // it last told (a node that went Unknown here while the peer did not answer,
        // and did not change there meanwhile, is not told again).
        if let Ok(mut seen) = self.seen.lock() {
            for name in &connected {
                if let Some(s) = seen.get_mut(name).filter(|s| s.via == via) {
                    placement |= s.heard_via(now);
                }
            }
        }
        if placement {
            self.dirty.store(true, Ordering::Relaxed);
        }
        if mesh {
            self.mesh_moved();
            if self.ordered_held.load(Ordering::Relaxed) {
                self.dirty.store(true, Ordering::Relaxed);
            }
        }
    }

    /// The hub that holds `node`'s tunnel, when it is another one (as that hub told).
    pub fn hub_of(&self, node: &str) -> Option<String> {
        if self.tunnel(node).is_some() {
            return None;
        }
        let via = self.seen.lock().ok()?.get(node)?.via.clone()?;
        let holds = self.peers.lock().ok()?.get(&via).is_some_and(|p| p.connected.contains(node));
        holds.then_some(via)
    }

    /// Another hub that leads the store and is not cut off from it, as it answered within
    /// the last seconds.
    pub fn leading_peer(&self) -> Option<String> {
        let now = self.clock.now_ms();
        let peers = self.peers.lock().ok()?;
        peers
            .iter()
            .find(|(_, v)| v.leads && !v.cut_off && now.saturating_sub(v.heard_ms) <= PEER_STALE_MS)
            .map(|(k, _)| k.clone())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::super::tests::{any, fleet, join_req, status};
    use super::*;
    use skiff_model::proto::NodeStatus;

    /// Two fleets on one store, as two hubs: what one's nodes are reaches the other, by
    /// changes only.
    #[tokio::test]
    async fn a_peer_learns_another_hubs_nodes_by_their_changes_only() {
        let (_d, a) = fleet();
        let (_e, b) = fleet();
        let (tx, _rx) = tokio::sync::mpsc::channel(4);
        let t = a.open_tunnel("n1", tx);
        a.touch("n1");
        a.report("n1", NodeStatus { instances: vec![], ..Default::default() });
        let first = a.peer_state("", 0, false);
        assert!(first.full);
        assert_eq!(first.nodes.len(), 1);
        assert!(first.nodes[0].connected);
        assert_eq!(first.nodes[0].state, NodeState::Ready);
        let mesh = *b.mesh_changes().borrow();
        b.merge_peer_state("https://a:1", first);
        assert_eq!(*b.mesh_changes().borrow(), mesh, "a node that serves nothing changes no service");
        assert_eq!(b.state_of("n1", b.now_ms()).0, NodeState::Ready);
        assert_eq!(b.hub_of("n1").as_deref(), Some("https://a:1"));
        assert_eq!(a.hub_of("n1"), None, "held here");
        // Nothing changed: nothing is sent.
        let (epoch, since) = b.peer_cursor("https://a:1");
        let idle = a.peer_state(&epoch, since, false);
        assert!(!idle.full && idle.nodes.is_empty(), "{idle:?}");
        // A heartbeat is no change either.
        a.touch("n1");
        assert!(a.peer_state(&epoch, since, false).nodes.is_empty());
        // A sample goes only to a peer that asks for samples.
        let sample = MetricsSample::example("n1", 5);
        a.node_sampled("n1");
        a.samples.lock().unwrap().insert("n1".into(), sample);
        assert!(a.peer_state(&epoch, since, false).nodes.is_empty());
        assert_eq!(a.peer_state(&epoch, since, true).nodes[0].sample.as_ref().map(|s| s.time_ms), Some(5));
        // The tunnel closes: the peer stops counting it as held there.
        a.close_tunnel("n1", t.serial);
        let closed = a.peer_state(&epoch, since, false);
        assert!(!closed.nodes[0].connected);
        b.merge_peer_state("https://a:1", closed);
        assert_eq!(b.hub_of("n1"), None);
        // Another epoch (the hub started again): everything again.
        assert!(a.peer_state("other", 99, false).full);
    }

    /// A node moved from one hub to another: the hub it left no longer speaks for it.
    #[tokio::test]
    async fn the_hub_that_holds_a_node_speaks_for_it() {
        let (_d, a) = fleet();
        let (_e, b) = fleet();
        let (_f, c) = fleet();
        let (tx, _rx) = tokio::sync::mpsc::channel(4);
        let t = a.open_tunnel("n1", tx.clone());
        a.touch("n1");
        c.merge_peer_state("https://a:1", a.peer_state("", 0, false));
        assert_eq!(c.hub_of("n1").as_deref(), Some("https://a:1"));
        // It moves to b.
        a.close_tunnel("n1", t.serial);
        b.open_tunnel("n1", tx);
        b.touch("n1");
        c.merge_peer_state("https://b:1", b.peer_state("", 0, false));
        assert_eq!(c.hub_of("n1").as_deref(), Some("https://b:1"));
        // a's late word that it does not hold it changes nothing.
        c.merge_peer_state("https://a:1", a.peer_state("", 0, false));
        assert_eq!(c.hub_of("n1").as_deref(), Some("https://b:1"));
        assert_eq!(c.state_of("n1", c.now_ms()).0, NodeState::Ready);
        // b's word about a node whose tunnel c holds changes nothing on c.
        let (tx2, _rx2) = tokio::sync::mpsc::channel(4);
        c.open_tunnel("n2", tx2);
        c.touch("n2");
        let (tx3, _rx3) = tokio::sync::mpsc::channel(4);
        b.open_tunnel("n2", tx3);
        b.touch("n2");
        b.report("n2", NodeStatus { problems: vec!["disk".into()], ..Default::default() });
        c.merge_peer_state("https://b:1", b.peer_state("", 0, false));
        assert_eq!(c.state_of("n2", c.now_ms()).0, NodeState::Ready);
        assert_eq!(c.hub_of("n2"), None);
    }

    /// Instances another hub's node reports are the fleet's too (rollouts and services
    /// read them on the hub that leads).
    #[tokio::test]
    async fn another_hubs_nodes_instances_are_seen_and_only_a_leader_places() {
        let (_d, a) = fleet();
        let (_e, b) = fleet();
        let (tx, _rx) = tokio::sync::mpsc::channel(4);
        a.open_tunnel("n1", tx);
        a.touch("n1");
        let mut st = a.peer_state("", 0, false);
        st.nodes[0].instances = vec![status("n1", "web", "web-1", "abc")];
        b.merge_peer_state("https://a:1", st);
        assert_eq!(b.reported_instances().len(), 1);
        assert!(b.leads(), "a lone hub leads");
        // A hub that does not lead places nothing, whatever it is asked.
        let tok = any(&b);
        b.join(&join_req(&tok, "n9")).unwrap();
        b.heartbeat("n9", NodeStatus::default()).unwrap();
        b.store.apply(&[skiff_model::Deployment::new("web", "img")], None, false, 1).unwrap();
        b.set_leads(false);
        assert!(!b.leads());
        b.tick(true).unwrap();
        assert!(b.reschedule().unwrap().slots.is_empty());
        assert!(b.store.slots().unwrap().is_empty());
        b.set_leads(true);
        b.tick(false).unwrap();
        assert_eq!(b.store.slots().unwrap().len(), 1);
        // A change another hub stored is placed at the leader's next tick.
        b.store.apply(&[skiff_model::Deployment::new("api", "img")], None, false, 2).unwrap();
        b.tick(false).unwrap();
        assert_eq!(b.store.slots().unwrap().len(), 2, "placed without being told");
        b.set_leads(false);
        assert!(!b.peer_state("", 0, false).leads);
        assert_eq!(a.leading_peer(), None);
        a.merge_peer_state("https://b:1", b.peer_state("", 0, false));
        assert_eq!(a.leading_peer(), None, "b does not lead");
        b.set_leads(true);
        a.merge_peer_state("https://b:1", b.peer_state("", 0, false));
        assert_eq!(a.leading_peer().as_deref(), Some("https://b:1"));
    }

    /// Nodes change on many threads while a peer asks again and again from the
    /// generation each answer said: every change reaches it. (A generation taken before
    /// its node was recorded was once skipped by an answer in between, and 12,507 of
    /// 100,000 nodes stayed NotReady at the hub that leads.)
    #[test]
    fn a_peer_asking_from_each_answer_hears_of_every_change_made_meanwhile() {
        let (_d, a) = fleet();
        let a = std::sync::Arc::new(a);
        let (threads, each) = (4, 3_000);
        let done = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let touchers: Vec<_> = (0..threads)
            .map(|t| {
                let (a, done) = (std::sync::Arc::clone(&a), std::sync::Arc::clone(&done));
                std::thread::spawn(move || {
                    for i in 0..each {
                        a.touch(&format!("n{t}-{i}"));
                    }
                    done.fetch_add(1, Ordering::SeqCst);
                })
            })
            .collect();
        let mut told = BTreeSet::new();
        let (mut epoch, mut since) = (String::new(), 0);
        // Bounded: the touchers end; one question after they did takes the rest.
        for _ in 0..1_000_000 {
            let finished = done.load(Ordering::SeqCst) == threads;
            let st = a.peer_state(&epoch, since, false);
            told.extend(st.nodes.into_iter().map(|n| n.name));
            (epoch, since) = (st.epoch, st.generation);
            if finished {
                break;
            }
        }
        for t in touchers {
            t.join().unwrap();
        }
        assert_eq!(told.len(), threads * each, "changes numbered before an answer but left out of it");
    }

    /// A peer that did not answer for longer than the heartbeat grace: its nodes went
    /// Unknown here. Once it answers again they are as it last told, though nothing of
    /// them changed there (a change-only answer does not name them). At 100,000 nodes,
    /// 5,608 stayed Unknown at the hub that leads after two peers were slow to answer.
    #[test]
    fn a_peers_nodes_are_as_it_told_again_once_it_answers_after_a_silence() {
        let (_d, a) = fleet();
        let t = tempfile::tempdir().unwrap();
        let store: std::sync::Arc<dyn crate::store::Store> =
            std::sync::Arc::new(crate::store::SqliteStore::open(&t.path().join("hub.db")).unwrap());
        let ca = crate::pki::Ca::load_or_create(&t.path().join("pki")).unwrap();
        let clock = crate::clock::ManualClock::at(a.now_ms());
        let b = Fleet::new(ca, store, clock.clone()).unwrap();
        let (tx, _rx) = tokio::sync::mpsc::channel(4);
        a.open_tunnel("n1", tx);
        a.touch("n1");
        b.merge_peer_state("https://a:1", a.peer_state("", 0, false));
        assert_eq!(b.state_of("n1", b.now_ms()).0, NodeState::Ready);
        clock.advance(crate::fleet::HEARTBEAT_GRACE_MS + 1_000);
        assert_eq!(b.state_of("n1", b.now_ms()).0, NodeState::Unknown, "a's answers stopped");
        let (epoch, since) = b.peer_cursor("https://a:1");
        let again = a.peer_state(&epoch, since, false);
        assert!(again.nodes.is_empty(), "nothing changed at a: {again:?}");
        b.merge_peer_state("https://a:1", again);
        assert_eq!(b.state_of("n1", b.now_ms()).0, NodeState::Ready, "a holds it and last told it Ready");
    }
}
