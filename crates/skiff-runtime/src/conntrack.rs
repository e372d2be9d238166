//! New connections without polling: the kernel's connection-tracking events
//! (`NETLINK_NETFILTER`, `NFNLGRP_CONNTRACK_NEW`) in the host's network namespace. A
//! container on a bridge reaches anything beyond its node through the host, where its
//! flows are tracked (the outbound NAT needs it): each new flow is reported once, with
//! the container's address as its source. Needs CAP_NET_ADMIN (root).
//!
//! [`forwarded_to`] dumps the table instead, to count a published port's open connections
//! to an instance that is to stop.

use netlink_sys::protocols::NETLINK_NETFILTER;
use std::net::IpAddr;
use std::os::fd::{AsFd, BorrowedFd};

const NFNLGRP_CONNTRACK_NEW: u32 = 1;
/// `NFNL_SUBSYS_CTNETLINK << 8 | IPCTNL_MSG_CT_NEW`.
const CT_NEW: u16 = 1 << 8;
/// `NFNL_SUBSYS_CTNETLINK << 8 | IPCTNL_MSG_CT_GET`.
const CT_GET: u16 = 1 << 8 | 1;
/// `NFNL_SUBSYS_CTNETLINK << 8 | IPCTNL_MSG_CT_DELETE`.
const CT_DELETE: u16 = 1 << 8 | 2;
/// nlmsghdr (16) + nfgenmsg (4).
const ATTRS_AT: usize = 20;
const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_STATUS: u16 = 3;
const CTA_PROTOINFO: u16 = 4;
const CTA_PROTOINFO_TCP: u16 = 1;
const CTA_PROTOINFO_TCP_STATE: u16 = 1;
/// `IPS_DST_NAT`: the flow's destination was rewritten (a published port's DNAT).
const IPS_DST_NAT: u32 = 1 << 5;
/// TCP states from SYN_SENT to LAST_ACK: the connection may still carry data.
const TCP_OPEN_STATES: std::ops::RangeInclusive<u8> = 1..=6;
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const CTA_IP_V6_SRC: u16 = 3;
const CTA_IP_V6_DST: u16 = 4;
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_SRC_PORT: u16 = 2;
const CTA_PROTO_DST_PORT: u16 = 3;

/// A new flow, as its first packet was sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Flow {
    /// IP protocol number (6 tcp, 17 udp, 1 icmp, ...).
    pub proto: u8,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub sport: u16,
    pub dport: u16,
}

impl Flow {
    /// Falco's name of the protocol: `tcp`, `udp`, `icmp`, or its number.
    pub fn l4proto(&self) -> String {
        match self.proto {
            6 => "tcp".into(),
            17 => "udp".into(),
            1 | 58 => "icmp".into(),
            n => n.to_string(),
        }
    }
}

/// The host's new-connection events.
pub struct NewFlows(crate::multicast::Multicast);

impl NewFlows {
    pub fn open() -> std::io::Result<Self> {
        crate::multicast::Multicast::join(NETLINK_NETFILTER, NFNLGRP_CONNTRACK_NEW, 2 << 20).map(NewFlows)
    }

    /// The new flows waiting; see [`crate::multicast::Multicast::drain`].
    pub fn recv(&mut self) -> std::io::Result<Vec<Flow>> {
        self.0.drain(parse)
    }
}

impl AsFd for NewFlows {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

/// Open TCP connections whose destination was rewritten (DNAT) to `to`: a published
/// port's connections to an instance, which must end before the instance stops. Counted
/// from a dump of the host's connection table (bounded by the kernel's table size, with a
/// 5 s receive timeout).
pub fn forwarded_to(to: IpAddr) -> std::io::Result<usize> {
    let mut count = 0;
    dump(to, |flow| {
        if open_forward_to(flow, to) {
            count += 1;
        }
    })?;
    Ok(count)
}

/// Deletes every tracked flow whose destination was rewritten (DNAT) to `to`, of any
/// protocol: after an instance stops, a steady UDP client (syslog, CoAP) would otherwise
/// keep its flow, and so its packets, pointed at the address, which the next instance to
/// lease it then receives; an open TCP connection's next packet, tracked again, meets the
/// port's rules anew and is reset instead of going on to an address nobody answers at.
/// Only for an address no instance holds any more. Returns how many were deleted.
pub fn forget_forwarded_to(to: IpAddr) -> std::io::Result<usize> {
    let mut tuples = vec![];
    let sock = dump(to, |flow| tuples.extend(forwarded_tuple(flow, to)))?;
    let n = tuples.len();
    for t in tuples {
        // Gone already (it timed out in between) is fine.
        let _ = sock.send(&delete_request(family_of(to), &t), 0);
    }
    Ok(n)
}

fn family_of(a: IpAddr) -> u8 {
    match a {
        IpAddr::V4(_) => libc::AF_INET as u8,
        IpAddr::V6(_) => libc::AF_INET6 as u8,
    }
}

/// Dumps the host's connection table of `to`'s family, handing each flow's attributes to
/// `each`; the socket, for requests that follow.
fn dump(to: IpAddr, mut each: impl FnMut(&[u8])) -> std::io::Result<netlink_sys::Socket> {
    use netlink_sys::{Socket, SocketAddr};
    let mut sock = Socket::new(NETLINK_NETFILTER)?;
    let timeout = nix::sys::time::TimeVal::new(5, 0);
    nix::sys::socket::setsockopt(&sock, nix::sys::socket::sockopt::ReceiveTimeout, &timeout)?;
    sock.bind_auto()?;
    sock.connect(&SocketAddr::new(0, 0))?;
    sock.send(&dump_request(family_of(to)), 0)?;
    // Bounded: the dump ends with NLMSG_DONE; a table of millions of flows is a few
    // thousand datagrams.
    for _ in 0..1_000_000 {
        let (data, _) = sock.recv_from_full()?;
        match dump_part(&data, &mut each) {
            DumpPart::More => {}
            DumpPart::Done => return Ok(sock),
            DumpPart::Failed(errno) => return Err(std::io::Error::from_raw_os_error(errno)),
        }
    }
    Err(std::io::Error::other("connection table dump did not end"))
}

/// The original-direction tuple attribute (as the kernel sent it) of a flow DNAT'd to `to`.
fn forwarded_tuple(b: &[u8], to: IpAddr) -> Option<Vec<u8>> {
    if !forwarded_by_us(b, to) {
        return None;
    }
    let orig = find(b, CTA_TUPLE_ORIG)?;
    // The attribute again, header and all: its payload, with a nested type.
    let mut attr = Vec::with_capacity(4 + orig.len());
    attr.extend_from_slice(&((4 + orig.len()) as u16).to_ne_bytes());
    attr.extend_from_slice(&(CTA_TUPLE_ORIG | 0x8000).to_ne_bytes());
    attr.extend_from_slice(orig);
    while attr.len() % 4 != 0 {
        attr.push(0);
    }
    Some(attr)
}

fn delete_request(family: u8, tuple: &[u8]) -> Vec<u8> {
    const NLM_F_REQUEST: u16 = 1;
    let mut m = Vec::with_capacity(ATTRS_AT + tuple.len());
    m.extend_from_slice(&((ATTRS_AT + tuple.len()) as u32).to_ne_bytes());
    m.extend_from_slice(&CT_DELETE.to_ne_bytes());
    m.extend_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    m.extend_from_slice(&2u32.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.extend_from_slice(&[family, 0, 0, 0]);
    m.extend_from_slice(tuple);
    m
}

fn dump_request(family: u8) -> Vec<u8> {
    const NLM_F_REQUEST: u16 = 1;
    const NLM_F_DUMP: u16 = 0x300;
    let mut m = Vec::with_capacity(ATTRS_AT);
    m.extend_from_slice(&(ATTRS_AT as u32).to_ne_bytes());
    m.extend_from_slice(&CT_GET.to_ne_bytes());
    m.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    m.extend_from_slice(&1u32.to_ne_bytes()); // sequence
    m.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel's
    m.extend_from_slice(&[family, 0, 0, 0]); // nfgenmsg: family, version 0, resource 0
    m
}

enum DumpPart {
    More,
    Done,
    Failed(i32),
}

/// Hands each flow of one datagram of a dump to `each`; whether the dump ended there.
fn dump_part(mut b: &[u8], each: &mut impl FnMut(&[u8])) -> DumpPart {
    const NLMSG_ERROR: u16 = 2;
    const NLMSG_DONE: u16 = 3;
    while b.len() >= 16 {
        let len = u32::from_ne_bytes([b[0], b[1], b[2], b[3]]) as usize;
        if len < 16 || len > b.len() {
            break;
        }
        match u16::from_ne_bytes([b[4], b[5]]) {
            NLMSG_DONE => return DumpPart::Done,
            NLMSG_ERROR => {
                let code = b.get(16..20).map(|e| i32::from_ne_bytes([e[0], e[1], e[2], e[3]])).unwrap_or(0);
                if code != 0 {
                    return DumpPart::Failed(-code);
                }
            }
            CT_NEW if len >= ATTRS_AT => each(&b[ATTRS_AT..len]),
            _ => {}
        }
        b = &b[((len + 3) & !3).min(b.len())..];
    }
    DumpPart::More
}

/// Whether a dumped flow's destination was rewritten to `to` (its answers come from it).
fn forwarded_by_us(b: &[u8], to: IpAddr) -> bool {
    let status = find(b, CTA_STATUS).and_then(|s| s.get(..4)).map(|s| u32::from_be_bytes([s[0], s[1], s[2], s[3]]));
    let from = find(b, CTA_TUPLE_REPLY)
        .and_then(|t| find(t, CTA_TUPLE_IP))
        .and_then(|ips| find(ips, CTA_IP_V4_SRC).or_else(|| find(ips, CTA_IP_V6_SRC)))
        .and_then(ip);
    status.is_some_and(|s| s & IPS_DST_NAT != 0) && from == Some(to)
}

/// Whether a dumped flow is an open TCP connection DNAT'd to `to`.
fn open_forward_to(b: &[u8], to: IpAddr) -> bool {
    forwarded_by_us(b, to) && tcp_state(b).is_some_and(|s| TCP_OPEN_STATES.contains(&s))
}

/// A TCP flow's state (none for other protocols).
fn tcp_state(b: &[u8]) -> Option<u8> {
    find(b, CTA_PROTOINFO)
        .and_then(|p| find(p, CTA_PROTOINFO_TCP))
        .and_then(|t| find(t, CTA_PROTOINFO_TCP_STATE))
        .and_then(|s| s.first().copied())
}

/// Netlink attributes: (type without its flags, payload).
fn attrs(mut b: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        let len = u16::from_ne_bytes([*b.first()?, *b.get(1)?]) as usize;
        let kind = u16::from_ne_bytes([*b.get(2)?, *b.get(3)?]) & 0x3fff;
        if len < 4 || len > b.len() {
            return None;
        }
        let payload = &b[4..len];
        b = &b[((len + 3) & !3).min(b.len())..];
        Some((kind, payload))
    })
}

fn find(b: &[u8], kind: u16) -> Option<&[u8]> {
    attrs(b).find(|(k, _)| *k == kind).map(|(_, p)| p)
}

fn ip(b: &[u8]) -> Option<IpAddr> {
    match b.len() {
        4 => Some(IpAddr::from(<[u8; 4]>::try_from(b).ok()?)),
        16 => Some(IpAddr::from(<[u8; 16]>::try_from(b).ok()?)),
        _ => None,
    }
}

fn port(b: &[u8]) -> u16 {
    match b {
        [h, l, ..] => u16::from_be_bytes([*h, *l]),
        _ => 0,
    }
}

/// The new flows of one datagram (it may hold several netlink messages).
fn parse(mut b: &[u8]) -> Vec<Flow> {
    let mut out = vec![];
    while b.len() >= ATTRS_AT {
        let len = u32::from_ne_bytes([b[0], b[1], b[2], b[3]]) as usize;
        if len < ATTRS_AT || len > b.len() {
            break;
        }
        if u16::from_ne_bytes([b[4], b[5]]) == CT_NEW {
            if let Some(f) = flow(&b[ATTRS_AT..len]) {
                out.push(f);
            }
        }
        b = &b[((len + 3) & !3).min(b.len())..];
    }
    out
}

fn flow(b: &[u8]) -> Option<Flow> {
    let orig = find(b, CTA_TUPLE_ORIG)?;
    let ips = find(orig, CTA_TUPLE_IP)?;
    let (src, dst) = match (find(ips, CTA_IP_V4_SRC), find(ips, CTA_IP_V4_DST)) {
        (Some(s), Some(d)) => (ip(s)?, ip(d)?),
        _ => (ip(find(ips, CTA_IP_V6_SRC)?)?, ip(find(ips, CTA_IP_V6_DST)?)?),
    };
    let proto = find(orig, CTA_TUPLE_PROTO)?;
    Some(Flow {
        proto: *find(proto, CTA_PROTO_NUM)?.first()?,
        src,
        dst,
        sport: find(proto, CTA_PROTO_SRC_PORT).map(port).unwrap_or(0),
        dport: find(proto, CTA_PROTO_DST_PORT).map(port).unwrap_or(0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attr(kind: u16, payload: &[u8]) -> Vec<u8> {
        let mut a = vec![];
        a.extend_from_slice(&((4 + payload.len()) as u16).to_ne_bytes());
        a.extend_from_slice(&kind.to_ne_bytes());
        a.extend_from_slice(payload);
        while !a.len().is_multiple_of(4) {
            a.push(0);
        }
        a
    }

    fn nested(kind: u16, parts: &[Vec<u8>]) -> Vec<u8> {
        attr(kind | 0x8000, &parts.concat())
    }

    fn message(kind: u16, body: Vec<u8>) -> Vec<u8> {
        let mut m = vec![0u8; ATTRS_AT];
        m[0..4].copy_from_slice(&((ATTRS_AT + body.len()) as u32).to_ne_bytes());
        m[4..6].copy_from_slice(&kind.to_ne_bytes());
        m.extend(body);
        m
    }

    #[test]
    fn new_flows_are_read_from_nested_attributes() {
        let tuple = |src: [u8; 4], dst: [u8; 4], dport: u16| {
            nested(
                CTA_TUPLE_ORIG,
                &[
                    nested(CTA_TUPLE_IP, &[attr(CTA_IP_V4_SRC, &src), attr(CTA_IP_V4_DST, &dst)]),
                    nested(
                        CTA_TUPLE_PROTO,
                        &[
                            attr(CTA_PROTO_NUM, &[6]),
                            attr(CTA_PROTO_SRC_PORT, &40000u16.to_be_bytes()),
                            attr(CTA_PROTO_DST_PORT, &dport.to_be_bytes()),
                        ],
                    ),
                ],
            )
        };
        let mut b = message(CT_NEW, tuple([10, 88, 0, 5], [1, 2, 3, 4], 443));
        b.extend(message(CT_NEW | 2, tuple([9, 9, 9, 9], [8, 8, 8, 8], 53))); // a delete
        b.extend(message(CT_NEW, tuple([10, 88, 0, 6], [10, 88, 0, 1], 8080)));
        let f = parse(&b);
        assert_eq!(f.len(), 2, "{f:?}");
        assert_eq!(f[0].src, IpAddr::from([10, 88, 0, 5]));
        assert_eq!((f[0].dst, f[0].sport, f[0].dport), (IpAddr::from([1, 2, 3, 4]), 40000, 443));
        assert_eq!(f[0].l4proto(), "tcp");
        assert_eq!(f[1].dport, 8080);
        assert!(parse(&b[..30]).is_empty(), "a short datagram");
    }

    #[test]
    fn a_dump_counts_open_forwarded_connections_to_one_address() {
        let flow = |reply_src: [u8; 4], status: u32, tcp_state: u8| {
            [
                nested(CTA_TUPLE_REPLY, &[nested(CTA_TUPLE_IP, &[attr(CTA_IP_V4_SRC, &reply_src)])]),
                attr(CTA_STATUS, &status.to_be_bytes()),
                nested(CTA_PROTOINFO, &[nested(CTA_PROTOINFO_TCP, &[attr(CTA_PROTOINFO_TCP_STATE, &[tcp_state])])]),
            ]
            .concat()
        };
        let to = IpAddr::from([10, 88, 0, 5]);
        let mut b = message(CT_NEW, flow([10, 88, 0, 5], IPS_DST_NAT | 0x8, 3)); // established
        b.extend(message(CT_NEW, flow([10, 88, 0, 5], IPS_DST_NAT, 7))); // time_wait: over
        b.extend(message(CT_NEW, flow([10, 88, 0, 5], 0x8, 3))); // not forwarded by us
        b.extend(message(CT_NEW, flow([10, 88, 0, 6], IPS_DST_NAT, 3))); // another instance
        b.extend(message(CT_NEW, flow([10, 88, 0, 5], IPS_DST_NAT, 5))); // close_wait
        let count = |b: &[u8]| {
            let mut n = 0;
            let part = dump_part(b, &mut |f: &[u8]| n += usize::from(open_forward_to(f, to)));
            (part, n)
        };
        assert!(matches!(count(&b), (DumpPart::More, 2)));
        b.extend(message(3, vec![])); // NLMSG_DONE
        assert!(matches!(count(&b), (DumpPart::Done, 2)));
        let mut err = message(2, vec![]);
        err.truncate(16);
        err.extend_from_slice(&(-libc::EPERM).to_ne_bytes());
        let len = err.len() as u32;
        err[0..4].copy_from_slice(&len.to_ne_bytes());
        assert!(matches!(count(&err), (DumpPart::Failed(libc::EPERM), 0)));
        assert_eq!(dump_request(2).len(), ATTRS_AT);
    }

    #[test]
    fn a_forwarded_flow_is_deleted_by_its_original_tuple() {
        let orig = nested(CTA_TUPLE_ORIG, &[nested(CTA_TUPLE_IP, &[attr(CTA_IP_V4_SRC, &[192, 168, 1, 9])])]);
        let flow = |reply_src: [u8; 4], status: u32| {
            [
                orig.clone(),
                nested(CTA_TUPLE_REPLY, &[nested(CTA_TUPLE_IP, &[attr(CTA_IP_V4_SRC, &reply_src)])]),
                attr(CTA_STATUS, &status.to_be_bytes()),
            ]
            .concat()
        };
        let to = IpAddr::from([10, 88, 0, 5]);
        assert_eq!(forwarded_tuple(&flow([10, 88, 0, 5], IPS_DST_NAT), to), Some(orig.clone()));
        assert_eq!(forwarded_tuple(&flow([10, 88, 0, 5], 0), to), None, "not ours");
        assert_eq!(forwarded_tuple(&flow([10, 88, 0, 6], IPS_DST_NAT), to), None, "another address");
        let tcp = |state: u8| {
            let info = nested(CTA_PROTOINFO, &[nested(CTA_PROTOINFO_TCP, &[attr(CTA_PROTOINFO_TCP_STATE, &[state])])]);
            [flow([10, 88, 0, 5], IPS_DST_NAT), info].concat()
        };
        assert_eq!(forwarded_tuple(&tcp(3), to), Some(orig.clone()), "an established connection goes");
        assert_eq!(forwarded_tuple(&tcp(7), to), Some(orig.clone()), "one in time_wait too");
        let del = delete_request(2, &orig);
        assert_eq!(u16::from_ne_bytes([del[4], del[5]]), CT_DELETE);
        assert_eq!(&del[ATTRS_AT..], &orig[..]);
    }
}
