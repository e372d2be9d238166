//! Links, addresses, routes and named network namespaces through netlink, so a node needs
//! no iproute2 (BusyBox's `ip`, on OpenWrt and Yocto images, has no `-batch` and no
//! `netns`). Messages are built with `netlink-packet-route` and sent on a blocking
//! `NETLINK_ROUTE` socket, one request at a time, each acknowledged.
//!
//! A socket belongs to the network namespace it was opened in: [`Rtnl::open_in`] opens
//! one on a short-lived thread that first joins the target namespace.

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REQUEST,
};
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{
    InfoData, InfoKind, InfoMacVlan, InfoVeth, LinkAttribute, LinkFlags, LinkInfo, LinkMessage, MacVlanMode,
};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol};
use netlink_packet_route::route::{RouteScope, RouteType};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};
use std::fs::File;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// What a request failed with: the operation, and the kernel's error (an errno).
#[derive(Debug, thiserror::Error)]
#[error("{op}: {source}")]
pub struct NlError {
    pub op: String,
    #[source]
    pub source: std::io::Error,
}

impl NlError {
    fn new(op: impl Into<String>, source: std::io::Error) -> Self {
        NlError { op: op.into(), source }
    }

    /// The request found what it was to make already there.
    pub fn exists(&self) -> bool {
        self.source.raw_os_error() == Some(libc::EEXIST)
    }
}

/// A `NETLINK_ROUTE` socket in one network namespace.
pub struct Rtnl {
    sock: Socket,
    seq: u32,
    /// The namespace the socket is in, when not the caller's.
    ns: Option<File>,
}

impl Rtnl {
    /// A socket in the caller's network namespace.
    pub fn open() -> Result<Self, NlError> {
        let op = |e| NlError::new("open a netlink socket", e);
        let mut sock = Socket::new(NETLINK_ROUTE).map_err(op)?;
        // The kernel answers at once; a request never answered fails instead of holding a
        // thread forever.
        let timeout = nix::sys::time::TimeVal::new(5, 0);
        nix::sys::socket::setsockopt(&sock, nix::sys::socket::sockopt::ReceiveTimeout, &timeout)
            .map_err(|e| op(e.into()))?;
        sock.bind_auto().map_err(op)?;
        sock.connect(&SocketAddr::new(0, 0)).map_err(op)?;
        Ok(Rtnl { sock, seq: 0, ns: None })
    }

    /// A socket in the network namespace `ns` (a bind-mounted namespace file): opened on a
    /// thread that joins `ns` first, so no other thread of the process changes namespace.
    pub fn open_in(ns: &File, name: &str) -> Result<Self, NlError> {
        let mut nl = in_netns(ns, name, Rtnl::open)?;
        nl.ns = Some(ns.try_clone().map_err(|e| NlError::new(format!("open network namespace {name}"), e))?);
        Ok(nl)
    }

    /// Sends one request and waits for its acknowledgement.
    fn request(&mut self, op: &str, msg: RouteNetlinkMessage, flags: u16) -> Result<(), NlError> {
        self.seq = self.seq.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
        header.sequence_number = self.seq;
        let mut packet = NetlinkMessage::new(header, NetlinkPayload::from(msg));
        packet.finalize();
        let mut buf = vec![0u8; packet.buffer_len()];
        packet.serialize(&mut buf);
        self.sock.send(&buf, 0).map_err(|e| NlError::new(op, e))?;
        // Bounded: an acknowledged request ends with its ACK or error; no dumps are asked.
        for _ in 0..64 {
            let (data, _) = self.sock.recv_from_full().map_err(|e| NlError::new(op, e))?;
            let mut at = 0;
            while at < data.len() {
                let reply = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&data[at..])
                    .map_err(|e| NlError::new(op, std::io::Error::other(e.to_string())))?;
                let len = reply.header.length as usize;
                if reply.header.sequence_number == self.seq {
                    if let NetlinkPayload::Error(e) = reply.payload {
                        return match e.code {
                            None => Ok(()),
                            Some(code) => Err(NlError::new(op, std::io::Error::from_raw_os_error(-code.get()))),
                        };
                    }
                }
                if len == 0 {
                    break;
                }
                at += len.next_multiple_of(4);
            }
        }
        Err(NlError::new(op, std::io::Error::other("no acknowledgement")))
    }

    /// The index of the interface `name` in the socket's namespace, if it exists. Asked
    /// with `if_nametoindex`, not netlink: decoding a link's every attribute is code and
    /// memory a node need not spend.
    pub fn index(&mut self, name: &str) -> Result<Option<u32>, NlError> {
        let find = || match nix::net::if_::if_nametoindex(name) {
            Ok(i) => Ok(Some(i)),
            Err(nix::Error::ENODEV | nix::Error::ENXIO) => Ok(None),
            Err(e) => Err(NlError::new(format!("find interface {name}"), e.into())),
        };
        match &self.ns {
            None => find(),
            Some(ns) => in_netns(ns, name, find),
        }
    }

    fn must_index(&mut self, name: &str) -> Result<u32, NlError> {
        self.index(name)?.ok_or_else(|| {
            NlError::new(format!("find interface {name}"), std::io::Error::from_raw_os_error(libc::ENODEV))
        })
    }

    /// Creates a bridge with the MAC address `mac`.
    pub fn add_bridge(&mut self, name: &str, mac: [u8; 6]) -> Result<(), NlError> {
        let mut m = LinkMessage::default();
        m.attributes.push(LinkAttribute::IfName(name.to_string()));
        m.attributes.push(LinkAttribute::Address(mac.to_vec()));
        m.attributes.push(LinkAttribute::LinkInfo(vec![LinkInfo::Kind(InfoKind::Bridge)]));
        self.request(&format!("create bridge {name}"), RouteNetlinkMessage::NewLink(m), NLM_F_CREATE | NLM_F_EXCL)
    }

    /// Creates a veth pair: `name` here, `peer` in the namespace `ns`.
    pub fn add_veth(&mut self, name: &str, peer: &str, ns: &File) -> Result<(), NlError> {
        let mut p = LinkMessage::default();
        p.attributes.push(LinkAttribute::IfName(peer.to_string()));
        p.attributes.push(LinkAttribute::NetNsFd(ns.as_raw_fd()));
        let mut m = LinkMessage::default();
        m.attributes.push(LinkAttribute::IfName(name.to_string()));
        m.attributes.push(LinkAttribute::LinkInfo(vec![
            LinkInfo::Kind(InfoKind::Veth),
            LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(p))),
        ]));
        self.request(&format!("create veth {name}"), RouteNetlinkMessage::NewLink(m), NLM_F_CREATE | NLM_F_EXCL)
    }

    /// Creates `name` in the network namespace `ns` as a macvlan (bridge mode) of the
    /// interface with index `parent` in this socket's namespace.
    pub fn add_macvlan(&mut self, name: &str, parent: u32, ns: &File) -> Result<(), NlError> {
        let mut m = LinkMessage::default();
        m.attributes.push(LinkAttribute::IfName(name.to_string()));
        m.attributes.push(LinkAttribute::Link(parent));
        m.attributes.push(LinkAttribute::NetNsFd(ns.as_raw_fd()));
        m.attributes.push(LinkAttribute::LinkInfo(vec![
            LinkInfo::Kind(InfoKind::MacVlan),
            LinkInfo::Data(InfoData::MacVlan(vec![InfoMacVlan::Mode(MacVlanMode::Bridge)])),
        ]));
        self.request(&format!("create macvlan {name}"), RouteNetlinkMessage::NewLink(m), NLM_F_CREATE | NLM_F_EXCL)
    }

    /// Changes the interface `name`: its MAC address, its bridge, up.
    pub fn set_link(&mut self, name: &str, mac: Option<[u8; 6]>, bridge: Option<u32>, up: bool) -> Result<(), NlError> {
        let index = self.must_index(name)?;
        let mut m = LinkMessage::default();
        m.header.index = index;
        if up {
            m.header.flags = LinkFlags::Up;
            m.header.change_mask = LinkFlags::Up;
        }
        if let Some(mac) = mac {
            m.attributes.push(LinkAttribute::Address(mac.to_vec()));
        }
        if let Some(b) = bridge {
            m.attributes.push(LinkAttribute::Controller(b));
        }
        let what =
            [mac.map(|_| "set the MAC address of"), bridge.map(|_| "add to the bridge"), up.then_some("bring up")]
                .into_iter()
                .flatten()
                .collect::<Vec<_>>()
                .join(", ");
        self.request(&format!("{what} interface {name}"), RouteNetlinkMessage::SetLink(m), 0)
    }

    /// Gives `name` the address `addr/prefix` (an address it already has is fine).
    pub fn add_address(&mut self, name: &str, addr: Ipv4Addr, prefix: u8) -> Result<(), NlError> {
        let index = self.must_index(name)?;
        let mut m = AddressMessage::default();
        m.header.family = AddressFamily::Inet;
        m.header.prefix_len = prefix;
        m.header.index = index;
        m.attributes.push(AddressAttribute::Local(addr.into()));
        m.attributes.push(AddressAttribute::Address(addr.into()));
        let bits = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
        m.attributes.push(AddressAttribute::Broadcast(Ipv4Addr::from(u32::from(addr) | !bits)));
        match self.request(
            &format!("add address {addr}/{prefix} to {name}"),
            RouteNetlinkMessage::NewAddress(m),
            NLM_F_CREATE | NLM_F_EXCL,
        ) {
            Err(e) if e.exists() => Ok(()),
            r => r,
        }
    }

    /// The default route, through `gateway`.
    pub fn add_default_route(&mut self, gateway: Ipv4Addr) -> Result<(), NlError> {
        let mut m = RouteMessage::default();
        m.header.address_family = AddressFamily::Inet;
        m.header.table = RouteHeader::RT_TABLE_MAIN;
        m.header.protocol = RouteProtocol::Boot;
        m.header.scope = RouteScope::Universe;
        m.header.kind = RouteType::Unicast;
        m.attributes.push(RouteAttribute::Gateway(RouteAddress::Inet(gateway)));
        self.request(
            &format!("add the default route via {gateway}"),
            RouteNetlinkMessage::NewRoute(m),
            NLM_F_CREATE | NLM_F_EXCL,
        )
    }

    /// Makes every address of `net/prefix` one of the host's own (a `local` route in the
    /// local table, on `lo`: Linux's "AnyIP"), so a program can listen on any of them
    /// without each being added to an interface. There already is fine.
    pub fn add_local_route(&mut self, net: Ipv4Addr, prefix: u8) -> Result<(), NlError> {
        let lo = self.must_index("lo")?;
        match self.request(
            &format!("add the local route {net}/{prefix}"),
            RouteNetlinkMessage::NewRoute(local_route(net, prefix, lo)),
            NLM_F_CREATE | NLM_F_EXCL,
        ) {
            Err(e) if e.exists() => Ok(()),
            r => r,
        }
    }

    /// Removes the route [`Rtnl::add_local_route`] made (gone already is fine).
    pub fn del_local_route(&mut self, net: Ipv4Addr, prefix: u8) -> Result<(), NlError> {
        let lo = self.must_index("lo")?;
        match self.request(
            &format!("remove the local route {net}/{prefix}"),
            RouteNetlinkMessage::DelRoute(local_route(net, prefix, lo)),
            0,
        ) {
            Err(e) if e.source.raw_os_error() == Some(libc::ESRCH) => Ok(()),
            r => r,
        }
    }

    /// Removes the interface `name` (gone already is fine).
    pub fn del_link(&mut self, name: &str) -> Result<(), NlError> {
        let mut m = LinkMessage::default();
        m.attributes.push(LinkAttribute::IfName(name.to_string()));
        match self.request(&format!("remove interface {name}"), RouteNetlinkMessage::DelLink(m), 0) {
            Err(e) if e.source.raw_os_error() == Some(libc::ENODEV) => Ok(()),
            r => r,
        }
    }
}

fn local_route(net: Ipv4Addr, prefix: u8, lo: u32) -> RouteMessage {
    let mut m = RouteMessage::default();
    m.header.address_family = AddressFamily::Inet;
    // RT_TABLE_LOCAL (netlink-packet-route names only main and unspec).
    m.header.table = 255;
    m.header.protocol = RouteProtocol::Boot;
    m.header.scope = RouteScope::Host;
    m.header.kind = RouteType::Local;
    m.header.destination_prefix_length = prefix;
    m.attributes.push(RouteAttribute::Destination(RouteAddress::Inet(net)));
    m.attributes.push(RouteAttribute::Oif(lo));
    m
}

/// Runs `f` on a short-lived thread that first joins the network namespace `ns` (named
/// `name` in errors), so no other thread of the process changes namespace.
fn in_netns<T: Send>(ns: &File, name: &str, f: impl FnOnce() -> Result<T, NlError> + Send) -> Result<T, NlError> {
    on_thread_in(ns, f).map_err(|e| NlError::new(format!("join network namespace {name}"), e)).and_then(|r| r)
}

/// Runs `f` on a short-lived thread that first joins the network namespace `ns`: what
/// it starts (a process forked from that thread) is born in the namespace, and no other
/// thread of the process changes namespace.
pub fn on_thread_in<T: Send>(ns: &File, f: impl FnOnce() -> T + Send) -> std::io::Result<T> {
    std::thread::scope(|s| {
        s.spawn(|| {
            nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)?;
            Ok(f())
        })
        .join()
        .unwrap_or_else(|_| Err(std::io::Error::other("thread panicked")))
    })
}

/// Where named network namespaces live (as iproute2's `ip netns`).
pub const NETNS_DIR: &str = "/var/run/netns";

/// Creates the named network namespace `name`: a new namespace, kept by a bind mount of it
/// on `/var/run/netns/NAME` (as `ip netns add`), made on a thread that ends afterwards.
pub fn netns_add(name: &str) -> Result<PathBuf, NlError> {
    let path = Path::new(NETNS_DIR).join(name);
    let op = format!("create network namespace {name}");
    std::fs::create_dir_all(NETNS_DIR).map_err(|e| NlError::new(&op, e))?;
    shared_netns_dir();
    std::fs::OpenOptions::new().write(true).create_new(true).open(&path).map_err(|e| NlError::new(&op, e))?;
    let made = std::thread::scope(|s| {
        s.spawn(|| -> nix::Result<()> {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)?;
            nix::mount::mount(
                Some("/proc/thread-self/ns/net"),
                &path,
                None::<&str>,
                nix::mount::MsFlags::MS_BIND,
                None::<&str>,
            )
        })
        .join()
        .unwrap_or(Err(nix::Error::EIO))
    });
    if let Err(e) = made {
        let _ = std::fs::remove_file(&path);
        return Err(NlError::new(&op, e.into()));
    }
    Ok(path)
}

/// Makes `/var/run/netns` a shared mount, as `ip netns add` does (once per process): a
/// mount namespace made later (by another tool) then sees a namespace's removal instead
/// of keeping its own copy of the bind mount, which would keep the namespace alive.
fn shared_netns_dir() {
    static DONE: std::sync::Once = std::sync::Once::new();
    DONE.call_once(|| {
        use nix::mount::{mount, MsFlags};
        let shared =
            || mount(None::<&str>, NETNS_DIR, None::<&str>, MsFlags::MS_SHARED | MsFlags::MS_REC, None::<&str>);
        if shared().is_err() {
            // Not a mount point yet: bind it onto itself first.
            let bound =
                mount(Some(NETNS_DIR), NETNS_DIR, None::<&str>, MsFlags::MS_BIND | MsFlags::MS_REC, None::<&str>);
            if bound.is_ok() {
                let _ = shared();
            }
        }
    });
}

/// Removes the named network namespace (gone already is fine).
pub fn netns_del(name: &str) {
    let path = Path::new(NETNS_DIR).join(name);
    let _ = nix::mount::umount2(&path, nix::mount::MntFlags::MNT_DETACH);
    let _ = std::fs::remove_file(&path);
}
