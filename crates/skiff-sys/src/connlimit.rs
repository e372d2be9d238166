//! Caps on open connections, in total and per source address: a flood from one address
//! (or a NAT full of misbehaving devices) takes at most its share of a listener, and the
//! process never runs out of file descriptors. Each accepted connection holds a guard;
//! dropping it gives the slot back.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// How many connections a listener keeps open at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnLimits {
    pub total: usize,
    pub per_ip: usize,
}

impl ConnLimits {
    /// `per_ip` per address and at most `total`, but never more than the file descriptors
    /// this process may open, minus `reserve` for everything else it does.
    pub fn within_fd_limit(total: usize, per_ip: usize, reserve: usize) -> Self {
        let fds = rustix::process::getrlimit(rustix::process::Resource::Nofile).current.unwrap_or(1024) as usize;
        ConnLimits { total: total.min(fds.saturating_sub(reserve).max(16)), per_ip }
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
}

#[derive(Default)]
struct Open {
    total: usize,
    by_ip: HashMap<IpAddr, usize>,
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
        let mut o = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if o.total >= self.limits.total {
            return Err(Refused::Total(o.total));
        }
        let n = o.by_ip.get(&ip).copied().unwrap_or(0);
        if n >= self.limits.per_ip {
            return Err(Refused::PerIp(ip, n));
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
        let c = ConnCounter::new(ConnLimits { total: 5, per_ip: 3 });
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
}
