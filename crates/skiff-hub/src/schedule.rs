//! Placement: which node runs which instance of which deployment. Pure: the hub passes
//! in nodes, deployments, image platforms and the current slots, and gets back the new
//! slots plus, for what could not be placed, the reasons (as the Kubernetes scheduler
//! words them: "0/3 nodes are available: 1 didn't match the node selector, ...").
//!
//! Rules, in order:
//! * A slot is one instance (`web-2` is slot 2 of `web`). Slots stay where they are while
//!   their node exists and still matches — also while it is NotReady or Unknown: the edge
//!   default is that a site whose uplink is down keeps its workloads. Only a deployment
//!   with `reschedule_after` gives up a node that has been away that long.
//! * `global`: one slot on every matching node that has room, whatever its state.
//! * `replicated`: slots above `replicas` go (highest first); missing ones go to Ready,
//!   matching nodes with room, choosing the least-used spread domain (`spread_by`), then the
//!   node with the fewest instances of the deployment, then of anything, then by name.
//! * Matching: every `node_selector` label equal, and an architecture the image has (any,
//!   when the image's platforms are unknown); `arm/v7` nodes also run v6 and v5 images. A
//!   WebAssembly deployment matches nodes offering the wasm runtime, whatever their
//!   architecture, if its image has a wasm platform (or its platforms are unknown).
//! * Room: reservations (`cpus_reservation`, `memory_reservation`) of the node's slots
//!   fit within its capacity.

use skiff_model::{Deployment, PlacementMode, RuntimeKind};
use std::collections::{BTreeMap, BTreeSet};

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum NodeState {
    Ready,
    NotReady,
    Unknown,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeView {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// `amd64`, `arm64`, `arm`, ...
    pub arch: String,
    /// `v7` for `arm/v7`.
    pub variant: Option<String>,
    pub cpu_millis: u64,
    pub memory_bytes: u64,
    /// Runtime backends it offers (`oci`, `wasm`).
    pub runtimes: Vec<String>,
    /// Versions of what runs workloads (`runc` → `1.1.5`).
    pub versions: BTreeMap<String, String>,
    /// CDI devices by kind (`nvidia.com/gpu` → 2).
    pub devices: BTreeMap<String, u32>,
    pub state: NodeState,
    /// When `state` last changed, in ms since the epoch.
    pub state_since_ms: u64,
}

/// One instance of a deployment on a node: `index` 2 of `web` is `web-2`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub struct Slot {
    pub deployment: String,
    pub index: u32,
    pub node: String,
}

/// `(architecture, variant)` pairs an image offers.
pub type Platforms = Vec<(String, Option<String>)>;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Every slot, sorted.
    pub slots: Vec<Slot>,
    /// Deployment → why some of its instances have no node.
    pub unschedulable: BTreeMap<String, String>,
}

impl Plan {
    pub fn on_node<'a>(&'a self, node: &'a str) -> impl Iterator<Item = &'a Slot> + 'a {
        self.slots.iter().filter(move |s| s.node == node)
    }
}

/// Whether a node of `arch`/`variant` runs an image built for `img_arch`/`img_variant`.
pub fn arch_runs(arch: &str, variant: Option<&str>, img_arch: &str, img_variant: Option<&str>) -> bool {
    if arch != img_arch {
        return false;
    }
    match (arch, variant, img_variant) {
        (_, _, None) => true,
        ("arm", Some(v), Some(iv)) => {
            let n = |s: &str| s.trim_start_matches('v').parse::<u32>().unwrap_or(0);
            n(iv) <= n(v)
        }
        ("arm", None, Some(_)) => false,
        _ => true,
    }
}

/// Lower is better: instances of the deployment in the node's spread domain, on the node,
/// instances of anything on the node, then the node's name.
type Rank<'a> = (usize, usize, u32, &'a str);

#[derive(Default, Clone)]
struct Used {
    cpu: u64,
    mem: u64,
    all: u32,
    /// CDI devices by kind.
    devices: BTreeMap<String, u32>,
}

/// Counts one more instance of `d` on `n`.
fn take<'n>(used: &mut BTreeMap<&'n str, Used>, n: &'n NodeView, d: &Deployment) {
    let u = used.entry(n.name.as_str()).or_default();
    let (cpu, mem) = need(d);
    u.cpu += cpu;
    u.mem += mem;
    u.all += 1;
    for (kind, k) in devices_needed(d, n) {
        *u.devices.entry(kind).or_default() += k;
    }
}

/// What `take` took for one instance of `d` on `n`, given back (a kept slot dropped).
fn give_back<'n>(used: &mut BTreeMap<&'n str, Used>, n: &'n NodeView, d: &Deployment) {
    let u = used.entry(n.name.as_str()).or_default();
    let (cpu, mem) = need(d);
    u.cpu = u.cpu.saturating_sub(cpu);
    u.mem = u.mem.saturating_sub(mem);
    u.all = u.all.saturating_sub(1);
    for (kind, k) in devices_needed(d, n) {
        if let Some(have) = u.devices.get_mut(&kind) {
            *have = have.saturating_sub(k);
        }
    }
}

/// The devices one instance of `d` takes on `n`, by kind: its ids (`all`: every one the
/// node has), its count, or all of the kind.
fn devices_needed(d: &Deployment, n: &NodeView) -> BTreeMap<String, u32> {
    let mut out: BTreeMap<String, u32> = BTreeMap::new();
    for r in &d.device_requests {
        let has = n.devices.get(&r.kind).copied().unwrap_or(0);
        let k = match (r.ids.as_slice(), r.count) {
            (ids, _) if ids.iter().any(|i| i == "all") => has.max(1),
            ([], 0) => has.max(1),
            ([], c) => c,
            (ids, _) => ids.len() as u32,
        };
        *out.entry(r.kind.clone()).or_default() += k;
    }
    out
}

fn need(d: &Deployment) -> (u64, u64) {
    (d.resources.cpus_reservation_millis.unwrap_or(0), d.resources.memory_reservation_bytes.unwrap_or(0))
}

/// A node's label `key`: its own, else Kubernetes' well-known labels every node has
/// (`kubernetes.io/hostname`, `kubernetes.io/arch`, `kubernetes.io/os`).
fn label<'a>(n: &'a NodeView, key: &str) -> Option<&'a str> {
    n.labels.get(key).map(String::as_str).or(match key {
        "kubernetes.io/hostname" => Some(n.name.as_str()),
        "kubernetes.io/arch" => Some(n.arch.as_str()),
        "kubernetes.io/os" => Some("linux"),
        _ => None,
    })
}

/// Why `n` is not a node `d` is for (its labels, runtime or architecture), if it is not.
/// A WebAssembly deployment runs on any architecture, on nodes offering the wasm runtime,
/// from an image that has a wasm platform.
fn mismatch(d: &Deployment, n: &NodeView, platforms: Option<&Platforms>) -> Option<&'static str> {
    if d.placement.node_selector.iter().any(|(k, v)| label(n, k) != Some(v.as_str())) {
        return Some("didn't match the node selector");
    }
    if d.device_requests.iter().any(|r| n.devices.get(&r.kind).copied().unwrap_or(0) == 0) {
        return Some("have none of the requested devices");
    }
    if d.runtime == RuntimeKind::Runsc && !n.runtimes.iter().any(|r| r == RuntimeKind::Runsc.as_str()) {
        return Some("don't offer the runsc runtime (gVisor)");
    }
    if d.runtime == RuntimeKind::Wasm {
        if !n.runtimes.iter().any(|r| r == RuntimeKind::Wasm.as_str()) {
            return Some("don't offer the wasm runtime");
        }
        if platforms.is_some_and(|p| !p.iter().any(|(a, _)| a == "wasm")) {
            return Some("can't run the image: it has no wasm platform");
        }
        return None;
    }
    if let Some(p) = platforms {
        if !p.iter().any(|(a, v)| arch_runs(&n.arch, n.variant.as_deref(), a, v.as_deref())) {
            return Some("have an architecture the image is not built for");
        }
    }
    None
}

/// Why `n`, with `used` taken, has no room for one more instance of `d`, if it has not.
fn no_room(d: &Deployment, n: &NodeView, used: &Used) -> Option<&'static str> {
    let (cpu, mem) = need(d);
    if used.cpu + cpu > n.cpu_millis {
        return Some("Insufficient cpu");
    }
    if used.mem + mem > n.memory_bytes {
        return Some("Insufficient memory");
    }
    for (kind, k) in devices_needed(d, n) {
        if used.devices.get(&kind).copied().unwrap_or(0) + k > n.devices.get(&kind).copied().unwrap_or(0) {
            return Some("Insufficient devices");
        }
    }
    None
}

fn reasons(total: usize, counts: BTreeMap<&'static str, usize>) -> String {
    let parts: Vec<String> = counts.iter().map(|(r, c)| format!("{c} {r}")).collect();
    format!("0/{total} nodes are available: {}", parts.join(", "))
}

/// Places every deployment; see the module rules.
pub fn schedule(
    deployments: &[Deployment],
    platforms: &BTreeMap<String, Platforms>,
    nodes: &[NodeView],
    current: &[Slot],
    now_ms: u64,
) -> Plan {
    let by_name: BTreeMap<&str, &NodeView> = nodes.iter().map(|n| (n.name.as_str(), n)).collect();
    let mut used: BTreeMap<&str, Used> = nodes.iter().map(|n| (n.name.as_str(), Used::default())).collect();
    let mut deps: Vec<&Deployment> = deployments.iter().collect();
    // Those sharing another's network (or pod) after the others: they go where it went.
    let beside_another = |d: &Deployment| d.network_service.is_some() || d.pod_of.is_some();
    deps.sort_by(|a, b| (beside_another(a), &a.name).cmp(&(beside_another(b), &b.name)));
    let wanted: BTreeSet<&str> = deps.iter().map(|d| d.name.as_str()).collect();

    // First pass: which current slots stay. Their reservations are counted before any new
    // slot is placed, so a kept instance is never pushed out by a new one.
    let mut kept: BTreeMap<&str, Vec<Slot>> = BTreeMap::new();
    let mut current_of: BTreeMap<&str, Vec<&Slot>> = BTreeMap::new();
    for s in current {
        current_of.entry(s.deployment.as_str()).or_default().push(s);
    }
    for d in &deps {
        let plat = platforms.get(&d.image);
        let mut mine = current_of.remove(d.name.as_str()).unwrap_or_default();
        mine.sort();
        let mut seen_idx = BTreeSet::new();
        let mut seen_node = BTreeSet::new();
        let entry = kept.entry(d.name.as_str()).or_default();
        for s in mine {
            let Some(n) = by_name.get(s.node.as_str()) else { continue };
            let stays = match d.placement.mode {
                PlacementMode::Global => seen_node.insert(s.node.clone()),
                // A pod's other container: as many as its first has (checked beside it).
                PlacementMode::Replicated => {
                    s.index >= 1 && (d.pod_of.is_some() || s.index <= d.replicas) && seen_idx.insert(s.index)
                }
            };
            let gone_too_long = d
                .placement
                .reschedule_after_ms
                .is_some_and(|after| n.state != NodeState::Ready && now_ms.saturating_sub(n.state_since_ms) >= after);
            // A kept slot only has to still match: room was checked when it was placed.
            if stays && mismatch(d, n, plat).is_none() && !gone_too_long {
                take(&mut used, n, d);
                entry.push(s.clone());
            }
        }
    }

    let mut plan = Plan::default();
    for d in &deps {
        let plat = platforms.get(&d.image);
        let mut slots = kept.remove(d.name.as_str()).unwrap_or_default();
        let mut refused: BTreeMap<&'static str, usize> = BTreeMap::new();
        let mut missing = 0usize;
        if let Some(owner) = d.pod_of.as_ref().or(d.network_service.as_ref()) {
            match beside(d, owner, &deps, &plan.slots, &by_name, plat, &mut used, &mut slots) {
                Ok(m) => missing = m,
                Err(why) => {
                    plan.unschedulable.insert(d.name.clone(), why);
                    continue;
                }
            }
            if missing > 0 {
                let why = format!(
                    "{missing} instance(s) not placed: {owner} has no instance of the same number on a node that fits"
                );
                plan.unschedulable.insert(d.name.clone(), why);
            }
            plan.slots.extend(slots);
            continue;
        }
        match d.placement.mode {
            PlacementMode::Global => {
                let have: BTreeSet<String> = slots.iter().map(|s| s.node.clone()).collect();
                let mut taken: BTreeSet<u32> = slots.iter().map(|s| s.index).collect();
                let mut next = 1u32;
                for n in nodes.iter().filter(|n| !have.contains(&n.name)) {
                    if mismatch(d, n, plat).is_some() {
                        continue; // not a node this deployment is for
                    }
                    let u = used.get(n.name.as_str()).cloned().unwrap_or_default();
                    match no_room(d, n, &u) {
                        None => {
                            while taken.contains(&next) {
                                next += 1;
                            }
                            let index = next;
                            taken.insert(index);
                            take(&mut used, n, d);
                            slots.push(Slot { deployment: d.name.clone(), index, node: n.name.clone() });
                        }
                        Some(r) => {
                            *refused.entry(r).or_default() += 1;
                            missing += 1;
                        }
                    }
                }
            }
            PlacementMode::Replicated => {
                if d.job.is_some() {
                    // Kept instances of a job elsewhere than its first are placed again.
                    let first = slots.iter().find(|s| s.index == 1).map(|s| s.node.clone());
                    slots.retain(|s| first.as_ref().is_none_or(|f| *f == s.node));
                }
                let taken: BTreeSet<u32> = slots.iter().map(|s| s.index).collect();
                // Instances of `d` per node and per spread domain, kept up to date below.
                let mut on_node: BTreeMap<String, usize> = BTreeMap::new();
                let mut in_domain: BTreeMap<String, usize> = BTreeMap::new();
                for s in &slots {
                    *on_node.entry(s.node.clone()).or_default() += 1;
                    if let Some(v) = by_name.get(s.node.as_str()).and_then(|x| spread_value(x, &d.placement.spread_by))
                    {
                        *in_domain.entry(v.clone()).or_default() += 1;
                    }
                }
                for index in (1..=d.replicas).filter(|i| !taken.contains(i)) {
                    // A job's instances run together, on the node of its first.
                    let together = d.job.as_ref().and(slots.iter().find(|s| s.index == 1)).map(|s| s.node.clone());
                    let mut best: Option<(Rank<'_>, &NodeView)> = None;
                    refused.clear();
                    for n in nodes.iter().filter(|n| together.as_ref().is_none_or(|t| *t == n.name)) {
                        let u = used.get(n.name.as_str()).cloned().unwrap_or_default();
                        if n.state != NodeState::Ready {
                            *refused.entry("were not ready").or_default() += 1;
                            continue;
                        }
                        if let Some(r) = mismatch(d, n, plat).or_else(|| no_room(d, n, &u)) {
                            *refused.entry(r).or_default() += 1;
                            continue;
                        }
                        let domain = spread_value(n, &d.placement.spread_by);
                        let key = (
                            domain.and_then(|v| in_domain.get(v)).copied().unwrap_or(0),
                            on_node.get(&n.name).copied().unwrap_or(0),
                            u.all,
                            n.name.as_str(),
                        );
                        if best.as_ref().is_none_or(|(k, _)| key < *k) {
                            best = Some((key, n));
                        }
                    }
                    match best {
                        Some((_, n)) => {
                            take(&mut used, n, d);
                            *on_node.entry(n.name.clone()).or_default() += 1;
                            if let Some(v) = spread_value(n, &d.placement.spread_by) {
                                *in_domain.entry(v.clone()).or_default() += 1;
                            }
                            slots.push(Slot { deployment: d.name.clone(), index, node: n.name.clone() });
                        }
                        None => missing += 1,
                    }
                }
            }
        }
        if missing > 0 {
            let why =
                if refused.is_empty() { "0/0 nodes are available".to_string() } else { reasons(nodes.len(), refused) };
            plan.unschedulable.insert(d.name.clone(), format!("{missing} instance(s) not placed: {why}"));
        }
        plan.slots.extend(slots);
    }
    plan.slots.retain(|s| wanted.contains(s.deployment.as_str()));
    plan.slots.sort();
    plan
}

/// Places `d`, which shares `owner`'s network: each of its instances on the node of
/// `owner`'s instance of the same number (`placed`), or not at all. `slots` (those kept)
/// loses any that is elsewhere now. Returns how many were not placed; `Err` when `owner`
/// is not one to share.
#[allow(clippy::too_many_arguments)]
fn beside<'n>(
    d: &Deployment,
    owner: &str,
    deps: &[&Deployment],
    placed: &[Slot],
    by_name: &BTreeMap<&str, &'n NodeView>,
    plat: Option<&Platforms>,
    used: &mut BTreeMap<&'n str, Used>,
    slots: &mut Vec<Slot>,
) -> Result<usize, String> {
    match deps.iter().find(|o| o.name == owner) {
        None => return Err(format!("it shares the network of {owner}, which is not deployed")),
        Some(o) if o.network_service.is_some() => {
            return Err(format!("it shares the network of {owner}, which shares another's: name that one"))
        }
        Some(o) if o.stack != d.stack => {
            return Err(format!("it shares the network of {owner}, of stack {:?}: only one of its own stack", o.stack))
        }
        Some(_) => {}
    }
    let of_owner: BTreeMap<u32, &str> =
        placed.iter().filter(|s| s.deployment == owner).map(|s| (s.index, s.node.as_str())).collect();
    // Kept ones with nothing of the owner beside them any more go, and give back what
    // the first pass reserved for them.
    let (stay, gone): (Vec<Slot>, Vec<Slot>) =
        std::mem::take(slots).into_iter().partition(|s| of_owner.get(&s.index) == Some(&s.node.as_str()));
    *slots = stay;
    for s in gone {
        if let Some(n) = by_name.get(s.node.as_str()) {
            give_back(used, n, d);
        }
    }
    let taken: BTreeSet<u32> = slots.iter().map(|s| s.index).collect();
    let mut missing = 0;
    // A pod's other container has one beside each of its first's, however many.
    let wanted: Vec<u32> = match &d.pod_of {
        Some(_) => of_owner.keys().copied().collect(),
        None => (1..=d.replicas).collect(),
    };
    for index in wanted.into_iter().filter(|i| !taken.contains(i)) {
        let Some(n) = of_owner.get(&index).and_then(|node| by_name.get(node)) else {
            missing += 1;
            continue;
        };
        let u = used.get(n.name.as_str()).cloned().unwrap_or_default();
        if n.state != NodeState::Ready || mismatch(d, n, plat).or_else(|| no_room(d, n, &u)).is_some() {
            missing += 1;
            continue;
        }
        take(used, n, d);
        slots.push(Slot { deployment: d.name.clone(), index, node: n.name.clone() });
    }
    Ok(missing)
}

fn spread_value<'a>(n: &'a NodeView, key: &Option<String>) -> Option<&'a String> {
    key.as_ref().and_then(|k| n.labels.get(k))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, arch: &str, labels: &[(&str, &str)]) -> NodeView {
        NodeView {
            name: name.into(),
            labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            arch: arch.into(),
            variant: None,
            cpu_millis: 4000,
            memory_bytes: 4 << 30,
            runtimes: vec!["oci".into()],
            versions: BTreeMap::new(),
            devices: BTreeMap::new(),
            state: NodeState::Ready,
            state_since_ms: 0,
        }
    }

    fn dep(name: &str, replicas: u32) -> Deployment {
        let mut d = Deployment::new(name, "img");
        d.replicas = replicas;
        d
    }

    fn where_(p: &Plan, d: &str) -> Vec<(u32, String)> {
        p.slots.iter().filter(|s| s.deployment == d).map(|s| (s.index, s.node.clone())).collect()
    }

    fn none() -> BTreeMap<String, Platforms> {
        BTreeMap::new()
    }

    #[test]
    fn replicas_spread_over_nodes_then_sites() {
        let nodes = [
            node("a1", "amd64", &[("site", "a")]),
            node("a2", "amd64", &[("site", "a")]),
            node("b1", "amd64", &[("site", "b")]),
        ];
        let p = schedule(&[dep("web", 3)], &none(), &nodes, &[], 0);
        assert_eq!(where_(&p, "web"), [(1, "a1".into()), (2, "a2".into()), (3, "b1".into())]);
        let mut d = dep("web", 2);
        d.placement.spread_by = Some("site".into());
        let p = schedule(&[d], &none(), &nodes, &[], 0);
        assert_eq!(where_(&p, "web"), [(1, "a1".into()), (2, "b1".into())], "one per site first");
    }

    /// A job's instances go together, on one node.
    #[test]
    fn a_jobs_instances_are_placed_together() {
        let nodes = [node("a", "amd64", &[]), node("b", "amd64", &[])];
        let mut j = dep("batch", 3);
        j.job = Some(skiff_model::job::JobSpec { completions: 3, ..Default::default() });
        let p = schedule(&[j.clone(), dep("web", 1)], &none(), &nodes, &[], 0);
        let nodes_of: BTreeSet<String> = where_(&p, "batch").into_iter().map(|(_, n)| n).collect();
        assert_eq!((where_(&p, "batch").len(), nodes_of.len()), (3, 1), "{:?}", p.slots);
    }

    /// A deployment sharing another's network goes beside it, instance by instance, and
    /// follows it when it moves.
    #[test]
    fn a_shared_network_places_each_instance_beside_its_owner() {
        let nodes = [node("a", "amd64", &[]), node("b", "amd64", &[]), node("c", "amd64", &[])];
        let mut side = dep("side", 3);
        side.network = skiff_model::NetworkMode::Service;
        side.network_service = Some("web".into());
        // "side" sorts before "web": it is still placed after it.
        let p = schedule(&[side.clone(), dep("web", 2)], &none(), &nodes, &[], 0);
        assert_eq!(where_(&p, "web"), [(1, "a".into()), (2, "b".into())]);
        assert_eq!(where_(&p, "side"), [(1, "a".into()), (2, "b".into())]);
        let why = &p.unschedulable["side"];
        assert!(why.starts_with("1 instance(s) not placed: web has no instance of the same number"), "{why}");
        // web-2 moves (its node is gone): side-2 moves with it.
        let moved: Vec<Slot> = p.slots.iter().filter(|s| s.node != "b").cloned().collect();
        let p = schedule(&[side.clone(), dep("web", 2)], &none(), &[nodes[0].clone(), nodes[2].clone()], &moved, 0);
        assert_eq!(where_(&p, "side"), [(1, "a".into()), (2, "c".into())]);
        assert_eq!(where_(&p, "web"), where_(&p, "side"));
        // Sharing one that shares, or one not deployed: said, nothing placed.
        let mut third = side.clone();
        third.name = "third".into();
        third.network_service = Some("side".into());
        let p = schedule(&[side.clone(), third, dep("web", 2)], &none(), &nodes, &[], 0);
        assert!(p.unschedulable["third"].contains("which shares another's"), "{:?}", p.unschedulable);
        assert!(where_(&p, "third").is_empty());
        let p = schedule(std::slice::from_ref(&side), &none(), &nodes, &[], 0);
        assert_eq!(p.unschedulable["side"], "it shares the network of web, which is not deployed");
        let mut other = dep("web", 1);
        other.stack = "other".into();
        let p = schedule(&[side, other], &none(), &nodes, &[], 0);
        assert_eq!(
            p.unschedulable["side"],
            "it shares the network of web, of stack \"other\": only one of its own stack"
        );
    }

    /// A pod's other container runs one beside each of its first's instances, however
    /// many it has (scaled, or one per node), whatever its own replicas say.
    #[test]
    fn a_pods_other_container_follows_its_first_instance_by_instance() {
        let nodes = [node("a", "amd64", &[]), node("b", "amd64", &[]), node("c", "amd64", &[])];
        let mut side = dep("web-shipper", 1);
        side.pod_of = Some("web".into());
        side.network = skiff_model::NetworkMode::Service;
        side.network_service = Some("web".into());
        let p = schedule(&[side.clone(), dep("web", 3)], &none(), &nodes, &[], 0);
        assert_eq!(where_(&p, "web-shipper"), where_(&p, "web"));
        assert_eq!(where_(&p, "web").len(), 3);
        assert!(p.unschedulable.is_empty(), "{:?}", p.unschedulable);
        // Scaled down: its third goes with the first's.
        let p = schedule(&[side.clone(), dep("web", 2)], &none(), &nodes, &p.slots, 0);
        assert_eq!(where_(&p, "web-shipper"), [(1, "a".into()), (2, "b".into())]);
        // Beside a global one (on the host's network): one per node, the same numbers.
        let mut web = dep("web", 1);
        web.placement.mode = PlacementMode::Global;
        web.network = skiff_model::NetworkMode::Host;
        side.network = skiff_model::NetworkMode::Host;
        side.network_service = None;
        let p = schedule(&[side, web], &none(), &nodes, &[], 0);
        assert_eq!(where_(&p, "web").len(), 3);
        assert_eq!(where_(&p, "web-shipper"), where_(&p, "web"));
    }

    #[test]
    fn selector_arch_and_resources_decide_and_explain() {
        let mut pi = node("pi", "arm", &[("camera", "true")]);
        pi.variant = Some("v7".into());
        let nodes = [pi, node("x86", "amd64", &[("camera", "true")]), node("arm64", "arm64", &[])];
        let mut platforms = BTreeMap::new();
        platforms.insert("img".to_string(), vec![("arm".to_string(), Some("v6".to_string()))]);
        let mut d = dep("cam", 1);
        d.placement.node_selector.insert("camera".into(), "true".into());
        let p = schedule(std::slice::from_ref(&d), &platforms, &nodes, &[], 0);
        assert_eq!(where_(&p, "cam"), [(1, "pi".into())], "arm/v7 runs a v6 image");

        d.replicas = 2;
        d.resources.memory_reservation_bytes = Some(3 << 30);
        let p = schedule(&[d], &platforms, &nodes, &[], 0);
        assert_eq!(where_(&p, "cam"), [(1, "pi".into())]);
        assert_eq!(
            p.unschedulable["cam"],
            "1 instance(s) not placed: 0/3 nodes are available: 1 Insufficient memory, \
             1 didn't match the node selector, 1 have an architecture the image is not built for"
        );
    }

    #[test]
    fn every_node_carries_kubernetes_well_known_labels() {
        let nodes = [node("gw-1", "arm64", &[]), node("gw-2", "amd64", &[])];
        let mut d = dep("mqtt", 1);
        d.placement.node_selector.insert("kubernetes.io/hostname".into(), "gw-2".into());
        d.placement.node_selector.insert("kubernetes.io/os".into(), "linux".into());
        let p = schedule(std::slice::from_ref(&d), &none(), &nodes, &[], 0);
        assert_eq!(where_(&p, "mqtt"), [(1, "gw-2".into())]);
        let mut d = dep("infer", 1);
        d.placement.node_selector.insert("kubernetes.io/arch".into(), "arm64".into());
        let p = schedule(&[d], &none(), &nodes, &[], 0);
        assert_eq!(where_(&p, "infer"), [(1, "gw-1".into())]);
        // A node's own label of the same name wins.
        let labelled = [node("gw-3", "amd64", &[("kubernetes.io/hostname", "renamed")])];
        let mut d = dep("x", 1);
        d.placement.node_selector.insert("kubernetes.io/hostname".into(), "renamed".into());
        let p = schedule(&[d], &none(), &labelled, &[], 0);
        assert_eq!(where_(&p, "x"), [(1, "gw-3".into())]);
    }

    #[test]
    fn global_runs_once_on_every_matching_node_and_follows_labels() {
        let mut nodes = vec![node("n1", "amd64", &[("camera", "true")]), node("n2", "amd64", &[])];
        let mut d = dep("analyser", 1);
        d.placement.mode = PlacementMode::Global;
        d.placement.node_selector.insert("camera".into(), "true".into());
        let p = schedule(std::slice::from_ref(&d), &none(), &nodes, &[], 0);
        assert_eq!(where_(&p, "analyser"), [(1, "n1".into())]);
        // A new camera node (even one not ready yet) gets one; a node that loses the label
        // loses it; n1 keeps its index.
        nodes.push(node("n3", "amd64", &[("camera", "true")]));
        nodes[2].state = NodeState::NotReady;
        nodes[1].labels.insert("camera".into(), "true".into());
        let p = schedule(std::slice::from_ref(&d), &none(), &nodes, &p.slots, 0);
        assert_eq!(where_(&p, "analyser"), [(1, "n1".into()), (2, "n2".into()), (3, "n3".into())]);
        nodes[0].labels.clear();
        let p = schedule(&[d], &none(), &nodes, &p.slots, 0);
        assert_eq!(where_(&p, "analyser"), [(2, "n2".into()), (3, "n3".into())]);
    }

    #[test]
    fn a_lost_node_keeps_its_instances_unless_reschedule_after_says_otherwise() {
        let mut nodes = [node("a", "amd64", &[]), node("b", "amd64", &[])];
        let p = schedule(&[dep("web", 2)], &none(), &nodes, &[], 0);
        assert_eq!(where_(&p, "web"), [(1, "a".into()), (2, "b".into())]);
        nodes[1].state = NodeState::Unknown;
        nodes[1].state_since_ms = 1_000;
        let later = 1_000 + 3_600_000;
        let again = schedule(&[dep("web", 2)], &none(), &nodes, &p.slots, later);
        assert_eq!(again.slots, p.slots, "an hour away changes nothing by default");
        let mut d = dep("web", 2);
        d.placement.reschedule_after_ms = Some(60_000);
        let moved = schedule(std::slice::from_ref(&d), &none(), &nodes, &p.slots, 1_000 + 59_999);
        assert_eq!(moved.slots, p.slots, "not yet");
        let moved = schedule(&[d], &none(), &nodes, &p.slots, 1_000 + 60_000);
        assert_eq!(where_(&moved, "web"), [(1, "a".into()), (2, "a".into())]);
    }

    #[test]
    fn scaling_keeps_placed_instances_and_deleting_frees_room() {
        let nodes = [node("a", "amd64", &[]), node("b", "amd64", &[])];
        let p = schedule(&[dep("web", 3), dep("db", 1)], &none(), &nodes, &[], 0);
        let up = schedule(&[dep("web", 5), dep("db", 1)], &none(), &nodes, &p.slots, 0);
        for s in p.slots.iter() {
            assert!(up.slots.contains(s), "{s:?} stays");
        }
        assert_eq!(where_(&up, "web").len(), 5);
        let down = schedule(&[dep("web", 2)], &none(), &nodes, &up.slots, 0);
        assert_eq!(where_(&down, "web"), where_(&up, "web")[..2].to_vec());
        assert!(where_(&down, "db").is_empty(), "deleted");

        // Reservations: a full node takes no more, but what it runs stays.
        let mut big = dep("big", 2);
        big.resources.cpus_reservation_millis = Some(3000);
        let p = schedule(std::slice::from_ref(&big), &none(), &nodes, &[], 0);
        assert_eq!(where_(&p, "big"), [(1, "a".into()), (2, "b".into())]);
        big.replicas = 3;
        let p = schedule(&[big], &none(), &nodes, &p.slots, 0);
        assert_eq!(where_(&p, "big").len(), 2);
        assert!(p.unschedulable["big"].contains("2 Insufficient cpu"), "{:?}", p.unschedulable);
    }

    #[test]
    fn ten_thousand_nodes_place_in_one_pass() {
        // Not a timing test: it shows the placement is not quadratic in practice by
        // finishing at all in a debug build, and checks the counts.
        let nodes: Vec<NodeView> =
            (0..10_000).map(|i| node(&format!("n{i:05}"), "amd64", &[("site", &format!("s{}", i % 50))])).collect();
        let mut g = dep("agent-side", 1);
        g.placement.mode = PlacementMode::Global;
        let mut r = dep("web", 200);
        r.placement.spread_by = Some("site".into());
        let p = schedule(&[g.clone(), r.clone()], &none(), &nodes, &[], 0);
        assert_eq!(where_(&p, "agent-side").len(), 10_000);
        assert_eq!(where_(&p, "web").len(), 200);
        let again = schedule(&[g, r], &none(), &nodes, &p.slots, 0);
        assert_eq!(again.slots, p.slots, "stable");
    }

    #[test]
    fn device_requests_place_by_free_devices() {
        let mut nodes = vec![node("cpu", "amd64", &[]), node("jetson", "arm64", &[]), node("rig", "amd64", &[])];
        nodes[1].devices.insert("nvidia.com/gpu".into(), 1);
        nodes[2].devices.insert("nvidia.com/gpu".into(), 2);
        let mut d = dep("infer", 4);
        d.device_requests = vec![skiff_model::DeviceRequest { kind: "nvidia.com/gpu".into(), ids: vec![], count: 1 }];
        let p = schedule(std::slice::from_ref(&d), &BTreeMap::new(), &nodes, &[], 0);
        let mut on: Vec<&str> = p.slots.iter().map(|s| s.node.as_str()).collect();
        on.sort();
        assert_eq!(on, ["jetson", "rig", "rig"], "one GPU each, three GPUs in all");
        assert_eq!(
            p.unschedulable["infer"],
            "1 instance(s) not placed: 0/3 nodes are available: 2 Insufficient devices, 1 have none of the requested devices"
        );
        // Kept slots hold their devices: a second deployment finds none free.
        let mut other = dep("other", 1);
        other.device_requests = d.device_requests.clone();
        let p2 = schedule(&[d, other], &BTreeMap::new(), &nodes, &p.slots, 0);
        assert!(p2.slots.iter().all(|s| s.deployment == "infer"));
        assert!(p2.unschedulable.contains_key("other"));
    }

    #[test]
    fn runsc_goes_only_to_nodes_that_offer_gvisor() {
        let mut nodes = vec![node("a", "amd64", &[]), node("b", "amd64", &[])];
        nodes[1].runtimes.push("runsc".into());
        let mut d = dep("sandboxed", 2);
        d.runtime = RuntimeKind::Runsc;
        let p = schedule(std::slice::from_ref(&d), &BTreeMap::new(), &nodes, &[], 0);
        assert_eq!(p.slots.len(), 2);
        assert!(p.slots.iter().all(|s| s.node == "b"));
        nodes[1].runtimes.pop();
        let p = schedule(std::slice::from_ref(&d), &BTreeMap::new(), &nodes, &[], 0);
        assert!(p.slots.is_empty());
        assert!(p.unschedulable["sandboxed"].contains("runsc"), "{}", p.unschedulable["sandboxed"]);
    }

    #[test]
    fn wasm_goes_to_nodes_with_the_runtime_on_any_architecture() {
        let mut nodes = vec![node("pi", "arm", &[]), node("nuc", "amd64", &[]), node("old", "arm64", &[])];
        nodes[0].variant = Some("v7".into());
        nodes[0].runtimes.push("wasm".into());
        nodes[1].runtimes.push("wasm".into());
        let mut d = dep("fn", 4);
        d.runtime = RuntimeKind::Wasm;
        let mut platforms = BTreeMap::new();
        platforms.insert("img".to_string(), vec![("wasm".to_string(), None)]);
        let p = schedule(std::slice::from_ref(&d), &platforms, &nodes, &[], 0);
        let mut on: Vec<String> = p.slots.iter().map(|s| s.node.clone()).collect();
        on.sort();
        on.dedup();
        assert_eq!(on, ["nuc", "pi"]);
        // A container image is no wasm program.
        platforms.insert("img".to_string(), vec![("amd64".to_string(), None)]);
        let p = schedule(std::slice::from_ref(&d), &platforms, &nodes, &[], 0);
        assert!(p.slots.is_empty());
        assert_eq!(
            p.unschedulable["fn"],
            "4 instance(s) not placed: 0/3 nodes are available: 2 can't run the image: it has no wasm platform, \
             1 don't offer the wasm runtime"
        );
        // And a wasm-only image runs no container.
        platforms.insert("img".to_string(), vec![("wasm".to_string(), None)]);
        let p = schedule(&[dep("c", 1)], &platforms, &nodes, &[], 0);
        assert!(p.slots.is_empty());
    }

    #[test]
    fn arch_rules() {
        assert!(arch_runs("arm", Some("v7"), "arm", Some("v6")));
        assert!(!arch_runs("arm", Some("v6"), "arm", Some("v7")));
        assert!(arch_runs("arm64", None, "arm64", Some("v8")));
        assert!(!arch_runs("arm64", None, "arm", Some("v7")));
        assert!(arch_runs("amd64", None, "amd64", None));
    }
}
