//! Caps on open connections, in total and per source address, and on how fast one address
//! may open new ones: a flood from one address (or a NAT full of misbehaving devices)
//! takes at most its share of a listener and of the CPU its handshakes cost, and the
//! process never runs out of file descriptors. Each accepted connection holds a guard;
//! dropping it gives the slot back.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// How many connections a listener keeps open at once.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ConnLimits {
    pub total: usize,
    pub per_ip: usize,
    /// New connections one address may open per second, and in a burst (`None`: any).
    pub rate_per_ip: Option<(f64, f64)>,
}

impl ConnLimits {
    /// `per_ip` per address and at most `total`, but never more than the file descriptors
    /// this process may open, minus `reserve` for everything else it does.
    pub fn within_fd_limit(total: usize, per_ip: usize, reserve: usize) -> Self {
        let fds = rustix::process::getrlimit(rustix::process::Resource::Nofile).current.unwrap_or(1024) as usize;
        ConnLimits { total: total.min(fds.saturating_sub(reserve).max(16)), per_ip, rate_per_ip: None }
    }

    /// Also at most `per_second` new connections from one address (and `burst` at once).
    pub fn with_rate(mut self, per_second: f64, burst: f64) -> Self {
        self.rate_per_ip = Some((per_second, burst));
        self
    }
}

/// Raises this process's soft limit on open files to its hard limit (as Go's runtime and
/// most servers do): the distribution's default soft limit (often 1024) is far below
/// what a hub's tunnels or an agent's published ports need. Returns the limit now.
pub fn raise_fd_limit() -> usize {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut r = getrlimit(Resource::Nofile);
    if r.current < r.maximum {
        r.current = r.maximum;
        let _ = setrlimit(Resource::Nofile, r);
    }
    getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX) as usize
}

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("{0} connections open, the most this listener takes")]
    Total(usize),
    #[error("{1} connections open from {0}, the most one address may have")]
    PerIp(IpAddr, usize),
    #[error("{0} opens connections faster than one address may")]
    Rate(IpAddr),
}

#[derive(Default)]
struct Open {
    total: usize,
    by_ip: HashMap<IpAddr, usize>,
    /// Per address: tokens left and when they were counted.
    buckets: HashMap<IpAddr, (f64, std::time::Instant)>,
}

/// Whom a connection counts against: an IPv4 address (also when it arrives IPv4-mapped),
/// or an IPv6 host's /64 — one host hands itself a new address from its /64 at will.
pub fn source(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(std::net::Ipv6Addr::from(u128::from(v6) & !((1u128 << 64) - 1))),
        },
    }
}

/// The connections open on one listener.
#[derive(Clone)]
pub struct ConnCounter {
    limits: ConnLimits,
    open: Arc<Mutex<Open>>,
}

/// One open connection's slot.
pub struct ConnGuard {
    ip: IpAddr,
    open: Arc<Mutex<Open>>,
}

impl ConnCounter {
    pub fn new(limits: ConnLimits) -> Self {
        ConnCounter { limits, open: Arc::default() }
    }

    /// A slot for a connection from `ip`, if it is within the limits.
    pub fn try_enter(&self, ip: IpAddr) -> Result<ConnGuard, Refused> {
        self.try_enter_at(ip, std::time::Instant::now())
    }

    /// [`ConnCounter::try_enter`] at `now` (tests pass their own clock).
    pub fn try_enter_at(&self, ip: IpAddr, now: std::time::Instant) -> Result<ConnGuard, Refused> {
        let ip = source(ip);
        let mut o = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if o.total >= self.limits.total {
            return Err(Refused::Total(o.total));
        }
        let n = o.by_ip.get(&ip).copied().unwrap_or(0);
        if n >= self.limits.per_ip {
            return Err(Refused::PerIp(ip, n));
        }
        if let Some((rate, burst)) = self.limits.rate_per_ip {
            if o.buckets.len() > 65_536 {
                // Forget addresses whose buckets are full again (bounded memory).
                o.buckets.retain(|_, (tokens, at)| {
                    *tokens + now.saturating_duration_since(*at).as_secs_f64() * rate < burst
                });
                if o.buckets.len() > 65_536 {
                    // Still that many busy sources: start over rather than scan them all
                    // on every connection (the total and per-source caps still hold).
                    o.buckets.clear();
                }
            }
            let (tokens, at) = o.buckets.entry(ip).or_insert((burst, now));
            *tokens = (*tokens + now.saturating_duration_since(*at).as_secs_f64() * rate).min(burst);
            *at = now;
            if *tokens < 1.0 {
                return Err(Refused::Rate(ip));
            }
            *tokens -= 1.0;
        }
        o.total += 1;
        *o.by_ip.entry(ip).or_default() += 1;
        Ok(ConnGuard { ip, open: Arc::clone(&self.open) })
    }

    /// Connections open now (in total).
    pub fn open(&self) -> usize {
        self.open.lock().map(|o| o.total).unwrap_or(0)
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        let mut o = self.open.lock().unwrap_or_else(|p| p.into_inner());
        o.total = o.total.saturating_sub(1);
        if let Some(n) = o.by_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                o.by_ip.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_address_cannot_take_every_slot() {
        let c = ConnCounter::new(ConnLimits { total: 5, per_ip: 3, rate_per_ip: None });
        let (a, b): (IpAddr, IpAddr) = ("127.0.0.2".parse().unwrap(), "127.0.0.1".parse().unwrap());
        let flood: Vec<_> = (0..10).filter_map(|_| c.try_enter(a).ok()).collect();
        assert_eq!(flood.len(), 3);
        assert_eq!(c.try_enter(a).err(), Some(Refused::PerIp(a, 3)));
        let admin = c.try_enter(b).unwrap();
        let _b2 = c.try_enter(b).unwrap();
        assert_eq!(c.try_enter(b).err(), Some(Refused::Total(5)));
        drop(admin);
        assert!(c.try_enter(b).is_ok(), "a slot given back is free again");
        drop(flood);
        assert_eq!(c.open(), 1, "only the second admin connection is still open");
        assert!(ConnLimits::within_fd_limit(usize::MAX, 1, 100).total < usize::MAX);
    }

    #[test]
    fn an_ipv6_host_counts_by_its_64_and_mapped_ipv4_as_ipv4() {
        let c = ConnCounter::new(ConnLimits { total: 100, per_ip: 2, rate_per_ip: None });
        let mut held = vec![];
        for a in ["2001:db8:1:2::1", "2001:db8:1:2:ffff::9"] {
            held.push(c.try_enter(a.parse().unwrap()).unwrap());
        }
        assert!(matches!(c.try_enter("2001:db8:1:2:abcd::1".parse().unwrap()), Err(Refused::PerIp(..))));
        assert!(c.try_enter("2001:db8:1:3::1".parse().unwrap()).is_ok(), "another /64");
        held.push(c.try_enter("::ffff:10.0.0.1".parse().unwrap()).unwrap());
        held.push(c.try_enter("10.0.0.1".parse().unwrap()).unwrap());
        assert!(matches!(c.try_enter("10.0.0.1".parse().unwrap()), Err(Refused::PerIp(..))));
    }

    #[test]
    fn one_address_opens_connections_no_faster_than_its_rate() {
        let c = ConnCounter::new(ConnLimits { total: 1000, per_ip: 1000, rate_per_ip: Some((10.0, 20.0)) });
        let (a, b): (IpAddr, IpAddr) = ("127.0.0.2".parse().unwrap(), "127.0.0.1".parse().unwrap());
        let t0 = std::time::Instant::now();
        let burst = (0..100).filter(|_| c.try_enter_at(a, t0).is_ok()).count();
        assert_eq!(burst, 20, "a burst of 20, then nothing");
        assert_eq!(c.try_enter_at(a, t0).err(), Some(Refused::Rate(a)));
        assert!(c.try_enter_at(b, t0).is_ok(), "other addresses have their own rate");
        let later = t0 + std::time::Duration::from_secs(1);
        assert_eq!((0..100).filter(|_| c.try_enter_at(a, later).is_ok()).count(), 10, "then 10 a second");
    }
}
