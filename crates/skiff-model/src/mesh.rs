//! Fleet services: every deployment is a service its peers reach by name, on its node or
//! any other.
//!
//! Each node answers its instances' DNS queries (on the bridge's gateway address) with a
//! *virtual address* per service, taken from the node's service range
//! ([`DEFAULT_SERVICE_RANGE`] unless told otherwise) by [`virtual_addresses`] (the same
//! function on every node and the hub, so a name resolves alike on nodes of one range).
//! The agent holds every `(virtual address, port)` a service answers on and sends each
//! connection to an endpoint: an instance on its own node first, then a node of its own
//! `site`, then any; directly over mutual TLS to the other node's agent when that node
//! can be reached ([`Dial`] opens the connection), else relayed through the hub.
//!
//! The hub tells each node, in a [`MeshView`], the services it may reach (those sharing a
//! network with something it runs) with their endpoints on other nodes, and which nodes
//! may reach each of its own: a node reaches nothing past that, and serves no one else.

use crate::{Deployment, Protocol};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

/// Where services' virtual addresses come from unless a node is told otherwise: beside
/// the default bridge subnet (`10.213.0.0/20`), clear of it.
pub const DEFAULT_SERVICE_RANGE: (Ipv4Addr, u8) = (Ipv4Addr::new(10, 213, 128, 0), 17);

/// A port a service answers on (`port`, as its clients call it) and the port of its
/// instances that serves it (`target`), over TCP or UDP (a port number may be both, as
/// DNS's 53 is).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServicePort {
    pub port: u16,
    pub target: u16,
    /// TCP unless said (and then not written, so TCP ports read as they always did).
    #[serde(default, skip_serializing_if = "Protocol::is_tcp")]
    pub protocol: Protocol,
}

impl ServicePort {
    pub fn tcp(port: u16, target: u16) -> ServicePort {
        ServicePort { port, target, protocol: Protocol::Tcp }
    }

    pub fn udp(port: u16, target: u16) -> ServicePort {
        ServicePort { port, target, protocol: Protocol::Udp }
    }

    /// Whether it is `port` over `protocol`.
    pub fn is(&self, port: u16, protocol: Protocol) -> bool {
        self.port == port && self.protocol == protocol
    }
}

impl std::fmt::Display for ServicePort {
    /// `80`, `80->8080`, `53/udp`: as `get services` shows it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.port)?;
        if self.target != self.port {
            write!(f, "->{}", self.target)?;
        }
        if self.protocol == Protocol::Udp {
            write!(f, "/udp")?;
        }
        Ok(())
    }
}

/// A service as one node needs to know it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Service {
    /// The deployment's name.
    pub name: String,
    pub stack: String,
    /// Other names it answers to (a Kubernetes Service that selects it).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub aliases: Vec<String>,
    /// The networks its instances join: only instances sharing one reach it.
    pub networks: Vec<String>,
    pub ports: Vec<ServicePort>,
    /// Its instances on other nodes, by node.
    #[serde(default)]
    pub endpoints: Vec<Endpoint>,
    /// A stateful set's instance as a service of its own (`web-0.nginx`): the one
    /// instance it reaches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
}

impl Service {
    /// `d` as a service, without endpoints: a deployment on the bridge that serves ports
    /// (none otherwise).
    pub fn of(d: &Deployment) -> Option<Service> {
        let ports = service_ports(d);
        (d.network == crate::NetworkMode::Bridge && !ports.is_empty()).then(|| Service {
            name: d.name.clone(),
            stack: d.stack.clone(),
            aliases: d.aliases.clone(),
            networks: d.joined_networks(),
            ports,
            endpoints: vec![],
            instance: None,
        })
    }

    /// The instance of stateful set `d` in `slot` as a service of its own, under its
    /// stable name through the governing service (`web-0.nginx`, and so
    /// `web-0.nginx.NAMESPACE.svc.cluster.local`), with the set's ports. None for other
    /// deployments, or a set without a governing service or ports.
    pub fn of_instance(d: &Deployment, slot: u32) -> Option<Service> {
        let name = d.stable_names(slot).into_iter().next()?;
        let s = Service::of(d)?;
        Some(Service { name, aliases: vec![], instance: Some(d.instance_name(slot)), ..s })
    }

    /// Whether reported instance `name` of `deployment` serves it.
    pub fn served_by(&self, deployment: &str, name: &str) -> bool {
        match &self.instance {
            Some(i) => i == name && name.strip_prefix(deployment).is_some_and(|r| r.starts_with('-')),
            None => self.name == deployment,
        }
    }

    /// Its port `port` over `protocol`, if it has one.
    pub fn port(&self, port: u16, protocol: Protocol) -> Option<&ServicePort> {
        self.ports.iter().find(|p| p.is(port, protocol))
    }

    /// Whether something joined to `networks` reaches it (they share one).
    pub fn shares_a_network(&self, networks: &BTreeSet<String>) -> bool {
        self.networks.iter().any(|n| networks.contains(n))
    }
}

/// A node that runs instances of a service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Endpoint {
    pub node: String,
    /// The node's `site` label: a client prefers endpoints of its own site.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site: Option<String>,
    /// Where the node's agent takes direct connections (`host:port`); none: relayed only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mesh: Option<String>,
    /// Its instances that serve (running, and healthy where checked), of `total`.
    pub ready: u32,
    pub total: u32,
}

/// What the hub tells a node of the fleet's services.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MeshView {
    /// The services the node's instances may reach, with their endpoints elsewhere.
    #[serde(default)]
    pub services: Vec<Service>,
    /// For each deployment the node runs: the other nodes that may reach it.
    #[serde(default)]
    pub clients: BTreeMap<String, BTreeSet<String>>,
    /// The certificate serials (hex) each node named above holds now (its current one and
    /// a renewal it asked for): a direct connection is made or taken only with one of them,
    /// so a deleted node's certificate, or a replaced one, reaches nothing.
    #[serde(default)]
    pub certs: BTreeMap<String, Vec<String>>,
    /// The node's own `site` label, as the hub has it (the labels were given at join).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site: Option<String>,
}

impl MeshView {
    /// The view for an agent that predates UDP service ports: TCP ports only.
    pub fn tcp_only(mut self) -> MeshView {
        for s in &mut self.services {
            s.ports.retain(|p| p.protocol.is_tcp());
        }
        self
    }
}

/// `d` for an agent that predates UDP service ports: the UDP ports it exposes left out.
pub fn tcp_only(d: &mut Deployment) {
    d.expose.retain(|p| p.protocol.is_tcp());
}

/// One service as `skiff get services` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceInfo {
    pub name: String,
    pub stack: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub aliases: Vec<String>,
    /// Its virtual address in the default service range.
    pub address: String,
    pub ports: Vec<ServicePort>,
    pub networks: Vec<String>,
    /// Per node: its instances that serve, of all.
    pub endpoints: Vec<Endpoint>,
}

/// The first line of a direct connection between agents (JSON): which service and port
/// the caller wants. The answer is one line too: `ok`, or why not.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Dial {
    pub service: String,
    pub port: u16,
    /// UDP: after `ok`, each datagram travels as a 2-byte big-endian length and its
    /// bytes, both ways ([`DATAGRAM_MAX`] at most).
    #[serde(default, skip_serializing_if = "Protocol::is_tcp")]
    pub protocol: Protocol,
}

/// The largest datagram the mesh carries (a UDP payload's limit over IPv4).
pub const DATAGRAM_MAX: usize = 65_507;

/// The longest first line either side of a direct connection sends.
pub const DIAL_LINE_MAX: usize = 512;

/// The ports `d` answers on as a service: what it `expose`s (compose `expose`, a
/// Kubernetes Service's ports), then the container ports it publishes, each port once.
pub fn service_ports(d: &Deployment) -> Vec<ServicePort> {
    let mut out: Vec<ServicePort> = vec![];
    let published =
        d.ports.iter().map(|p| ServicePort { port: p.container_port, target: p.container_port, protocol: p.protocol });
    for p in d.expose.iter().copied().chain(published) {
        if !out.iter().any(|o| o.is(p.port, p.protocol)) {
            out.push(p);
        }
    }
    out
}

/// Whether `s` is a mesh address a node may state: `host:port`, short and plain.
pub fn valid_mesh_addr(s: &str) -> bool {
    let Some((host, port)) = s.rsplit_once(':') else { return false };
    s.len() <= 128
        && !host.is_empty()
        && host.bytes().all(|b| b.is_ascii_alphanumeric() || b".-[]:".contains(&b))
        && port.parse::<u16>().is_ok_and(|p| p > 0)
}

fn fnv(s: &str) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in s.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

/// Each service's virtual address in `range`: where its name's hash points, or the next
/// free one when another service has it (names in order of their hash, then name, so the
/// same set gives the same addresses everywhere). More names than addresses: the rest
/// get none.
pub fn virtual_addresses<'a>(
    (base, prefix): (Ipv4Addr, u8),
    names: impl IntoIterator<Item = &'a str>,
) -> BTreeMap<String, Ipv4Addr> {
    let size = 1u32.checked_shl(32 - u32::from(prefix.clamp(8, 30))).unwrap_or(4);
    // .0 and the last address are never handed out.
    let usable = size - 2;
    let mut names: Vec<(u32, &str)> = names.into_iter().map(|n| (fnv(n) % usable, n)).collect();
    names.sort();
    names.dedup();
    let mut taken = BTreeSet::new();
    let mut out = BTreeMap::new();
    for (h, n) in names {
        let mut slot = h;
        for _ in 0..usable {
            if taken.insert(slot) {
                out.insert(n.to_string(), Ipv4Addr::from(u32::from(base) + 1 + slot));
                break;
            }
            slot = (slot + 1) % usable;
        }
    }
    out
}

/// The endpoints worth calling, in the order to try them: those with ready instances,
/// of `site` first, each group turned by `turn` so calls spread over nodes.
pub fn by_locality<'a>(endpoints: &'a [Endpoint], site: Option<&str>, turn: usize) -> Vec<&'a Endpoint> {
    let ready = endpoints.iter().filter(|e| e.ready > 0);
    let (mut near, mut far): (Vec<&Endpoint>, Vec<&Endpoint>) =
        ready.partition(|e| site.is_some() && e.site.as_deref() == site);
    for group in [&mut near, &mut far] {
        if !group.is_empty() {
            let n = turn % group.len();
            group.rotate_left(n);
        }
    }
    near.extend(far);
    near
}

/// The names a service answers to for a client in `client_stack`: its name and aliases,
/// bare when the client is of the same stack, and everywhere as `NAME.STACK`,
/// `NAME.STACK.svc` and `NAME.STACK.svc.cluster.local` (Kubernetes' form, the stack being
/// the namespace of imported manifests).
pub fn answers_to(s: &Service, client_stack: &str, query: &str) -> bool {
    let q = query.trim_end_matches('.').to_ascii_lowercase();
    std::iter::once(&s.name).chain(&s.aliases).any(|n| {
        let stacked = format!("{n}.{}", s.stack);
        (q == *n && s.stack == client_stack)
            || q == stacked
            || q == format!("{stacked}.svc")
            || q == format!("{stacked}.svc.cluster.local")
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{PortMapping, Protocol};

    #[test]
    fn addresses_are_stable_distinct_and_inside_the_range() {
        let r = DEFAULT_SERVICE_RANGE;
        let a = virtual_addresses(r, ["web", "db", "cache"]);
        let b = virtual_addresses(r, ["cache", "web", "db", "db"]);
        assert_eq!(a, b, "the same set gives the same addresses, whatever the order");
        let set: BTreeSet<_> = a.values().collect();
        assert_eq!(set.len(), 3);
        for ip in a.values() {
            let o = ip.octets();
            assert_eq!((o[0], o[1]), (10, 213));
            assert!(o[2] >= 128, "{ip} inside 10.213.128.0/17");
            assert!(*ip != Ipv4Addr::new(10, 213, 128, 0) && *ip != Ipv4Addr::new(10, 213, 255, 255));
        }
        // Many names: every one gets its own address, colliding hashes included.
        let names: Vec<String> = (0..5000).map(|i| format!("svc-{i}")).collect();
        let many = virtual_addresses(r, names.iter().map(String::as_str));
        assert_eq!(many.values().collect::<BTreeSet<_>>().len(), 5000);
        // A range too small for them all: distinct addresses while they last.
        let small = virtual_addresses((Ipv4Addr::new(10, 9, 0, 0), 30), ["a", "b", "c"]);
        assert_eq!(small.len(), 2);
        assert_ne!(small.values().next(), small.values().nth(1));
        // A name keeps its address when an unrelated one is added (no collision here).
        let more = virtual_addresses(r, ["web", "db", "cache", "queue"]);
        assert_eq!(more["web"], a["web"]);
    }

    #[test]
    fn endpoints_of_the_same_site_come_first_and_calls_spread() {
        let ep = |node: &str, site: Option<&str>, ready: u32| Endpoint {
            node: node.into(),
            site: site.map(str::to_string),
            mesh: None,
            ready,
            total: 1,
        };
        let all = vec![
            ep("far-1", Some("b"), 1),
            ep("near-1", Some("a"), 1),
            ep("near-2", Some("a"), 1),
            ep("down", Some("a"), 0),
        ];
        let names = |turn| by_locality(&all, Some("a"), turn).iter().map(|e| e.node.clone()).collect::<Vec<_>>();
        assert_eq!(names(0), ["near-1", "near-2", "far-1"], "no unready node, its own site first");
        assert_eq!(names(1), ["near-2", "near-1", "far-1"]);
        let anywhere = by_locality(&all, None, 0);
        assert_eq!(anywhere.len(), 3);
    }

    #[test]
    fn names_answer_within_their_stack_and_qualified_everywhere() {
        let s = Service {
            name: "db".into(),
            stack: "shop".into(),
            aliases: vec!["postgres".into()],
            networks: vec!["shop_default".into()],
            ports: vec![],
            endpoints: vec![],
            instance: None,
        };
        assert!(answers_to(&s, "shop", "db"));
        assert!(answers_to(&s, "shop", "DB."));
        assert!(answers_to(&s, "shop", "postgres"));
        assert!(!answers_to(&s, "other", "db"), "bare names stay in their stack");
        assert!(answers_to(&s, "other", "db.shop"));
        assert!(answers_to(&s, "other", "postgres.shop.svc.cluster.local"));
        assert!(answers_to(&s, "other", "db.shop.svc"));
        assert!(!answers_to(&s, "shop", "db.other"));
        assert!(!answers_to(&s, "shop", "tasks.db"));
    }

    #[test]
    fn ports_are_what_it_exposes_then_what_it_publishes() {
        let mut d = Deployment::new("web", "img");
        d.expose = vec![ServicePort::tcp(80, 8080), ServicePort::udp(53, 5353)];
        d.ports = vec![
            PortMapping { host_ip: None, host_port: 8080, container_port: 8080, protocol: Protocol::Tcp },
            PortMapping { host_ip: None, host_port: 9090, container_port: 80, protocol: Protocol::Tcp },
            // A published UDP port is a UDP service port, beside the TCP one of that number.
            PortMapping { host_ip: None, host_port: 8080, container_port: 8080, protocol: Protocol::Udp },
            PortMapping { host_ip: None, host_port: 53, container_port: 53, protocol: Protocol::Udp },
        ];
        assert_eq!(
            service_ports(&d),
            vec![
                ServicePort::tcp(80, 8080),
                ServicePort::udp(53, 5353),
                ServicePort::tcp(8080, 8080),
                ServicePort::udp(8080, 8080)
            ]
        );
        let shown: Vec<String> = service_ports(&d).iter().map(ToString::to_string).collect();
        assert_eq!(shown, ["80->8080", "53->5353/udp", "8080", "8080/udp"]);
        // TCP is written as before; UDP says so.
        assert_eq!(serde_json::to_string(&ServicePort::tcp(80, 80)).unwrap(), r#"{"port":80,"target":80}"#);
        let udp = r#"{"port":53,"target":53,"protocol":"udp"}"#;
        assert_eq!(serde_json::to_string(&ServicePort::udp(53, 53)).unwrap(), udp);
        assert_eq!(serde_json::from_str::<ServicePort>(udp).unwrap(), ServicePort::udp(53, 53));
    }

    /// An agent that predates UDP service ports is sent TCP ones only: nothing in its
    /// frames it would refuse.
    #[test]
    fn an_older_agent_is_sent_tcp_ports_only() {
        let mut d = Deployment::new("dns", "img");
        d.expose = vec![ServicePort::udp(53, 53), ServicePort::tcp(53, 53)];
        let view = MeshView { services: vec![Service::of(&d).unwrap()], ..Default::default() };
        assert!(serde_json::to_string(&view).unwrap().contains("udp"));
        let old = view.tcp_only();
        assert_eq!(old.services[0].ports, [ServicePort::tcp(53, 53)]);
        assert!(!serde_json::to_string(&old).unwrap().contains("protocol"));
        tcp_only(&mut d);
        assert_eq!(d.expose, [ServicePort::tcp(53, 53)]);
    }

    #[test]
    fn a_deployment_is_a_service_on_the_bridge_with_ports() {
        let mut d = Deployment::new("web", "img");
        assert_eq!(Service::of(&d), None, "no port: no service");
        d.expose = vec![ServicePort::tcp(80, 8080)];
        let s = Service::of(&d).unwrap();
        assert_eq!((s.networks.clone(), s.ports.clone()), (vec!["default_default".to_string()], d.expose.clone()));
        assert!(s.shares_a_network(&["default_default".to_string()].into()));
        assert!(!s.shares_a_network(&["other_default".to_string()].into()));
        assert_eq!(Service::of_instance(&d, 1), None, "not a stateful set");
        d.stateful = Some(crate::stateful::Stateful { service: Some("pg".into()), pod_management: Default::default() });
        let one = Service::of_instance(&d, 2).unwrap();
        assert_eq!(
            (one.name.as_str(), one.instance.as_deref(), one.ports.clone()),
            ("web-1.pg", Some("web-1"), d.expose.clone())
        );
        assert!(
            answers_to(&one, "other", "web-1.pg.default.svc.cluster.local") && answers_to(&one, "default", "web-1.pg")
        );
        assert!(one.served_by("web", "web-1") && !one.served_by("web", "web-0"));
        assert!(s.served_by("web", "web-0") && !s.served_by("db", "db-0"));
        d.network = crate::NetworkMode::Host;
        assert_eq!(Service::of(&d), None, "host network: not on the bridge");
    }

    #[test]
    fn mesh_addresses_are_host_and_port() {
        assert!(valid_mesh_addr("10.0.0.2:7946"));
        assert!(valid_mesh_addr("gw.example:7946"));
        assert!(valid_mesh_addr("[::1]:7946"));
        for bad in ["10.0.0.2", ":7946", "a b:1", "h:0", "h:99999", &format!("{}:1", "a".repeat(200))] {
            assert!(!valid_mesh_addr(bad), "{bad}");
        }
    }
}
