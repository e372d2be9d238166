//! New connections without polling: the kernel's connection-tracking events
//! (`NETLINK_NETFILTER`, `NFNLGRP_CONNTRACK_NEW`) in the host's network namespace. A
//! container on a bridge reaches anything beyond its node through the host, where its
//! flows are tracked (the outbound NAT needs it): each new flow is reported once, with
//! the container's address as its source. Needs CAP_NET_ADMIN (root).

use netlink_sys::protocols::NETLINK_NETFILTER;
use std::net::IpAddr;
use std::os::fd::{AsFd, BorrowedFd};

const NFNLGRP_CONNTRACK_NEW: u32 = 1;
/// `NFNL_SUBSYS_CTNETLINK << 8 | IPCTNL_MSG_CT_NEW`.
const CT_NEW: u16 = 1 << 8;
/// nlmsghdr (16) + nfgenmsg (4).
const ATTRS_AT: usize = 20;
const CTA_TUPLE_ORIG: u16 = 1;
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
}
