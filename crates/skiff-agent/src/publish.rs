//! Step *publish*: each running instance's /etc/hosts names its stack's peers (written
//! only on a change), and published ports send traffic to the instances the update
//! planner says serve.

use crate::proxy::PortKey;
use crate::{Agent, AgentError};
use skiff_model::{InstanceState, NetworkMode};
use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

impl Agent {
    /// `/etc/hosts` for one instance: itself plus every addressed instance of its stack,
    /// reachable by instance name and by deployment (service) name.
    pub(crate) fn hosts_for(&self, stack: &str, me: &str, my_ip: Option<Ipv4Addr>) -> Result<String, AgentError> {
        let rows = self.db(|s| s.instances())?;
        let mut out = String::from("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n");
        if let Some(ip) = my_ip {
            let dep = rows.iter().find(|r| r.name == me).map(|r| r.deployment.clone()).unwrap_or_default();
            out.push_str(&format!("{ip}\t{me} {dep}\n"));
        }
        for r in rows.iter().filter(|r| r.spec.stack == stack && r.name != me && r.state == InstanceState::Running) {
            // Switched away from (blue-green): reachable by its own name, not the service's.
            let service = if r.retire_at_ms.is_some() { "" } else { r.deployment.as_str() };
            if let Some(ip) = &r.ip {
                out.push_str(&format!("{ip}\t{} {service}\n", r.name).replace(" \n", "\n"));
            }
        }
        Ok(out)
    }

    pub(crate) async fn sync_hosts_and_ports(self: &Arc<Self>) -> Result<(), AgentError> {
        // Held from before the state is read until the targets are set: two syncs at once
        // (the loop's and a stop's) would otherwise race, and the older state, written
        // last, put an instance that was drained and stopped back on its ports (a
        // connection there hangs until the connect times out).
        let mut proxies = self.proxies.lock().await;
        let rows = self.db(|s| s.instances())?;
        let serving = self.serving.lock().map(|s| s.clone()).unwrap_or_default();
        let stopping: HashSet<String> = self.stopping.lock().map(|s| s.clone()).unwrap_or_default();
        // Each published port with the instances that serve it and the deployment's
        // instance names (to report a port that cannot be bound).
        let mut ports: HashMap<PortKey, (Vec<SocketAddr>, Vec<String>)> = HashMap::new();
        for r in rows.iter().filter(|r| r.state == InstanceState::Running && r.spec.network == NetworkMode::Bridge) {
            let my_ip = r.ip.as_ref().and_then(|i| i.parse().ok());
            if let Ok(h) = self.hosts_for(&r.spec.stack, &r.name, my_ip) {
                // Written only when it changed since this agent last wrote it.
                let same = self.hosts_written.lock().is_ok_and(|w| w.get(&r.container_id) == Some(&h));
                if !same && self.runtimes.of(r.spec.runtime).update_hosts(&r.container_id, &h).is_ok() {
                    if let Ok(mut w) = self.hosts_written.lock() {
                        w.insert(r.container_id.clone(), h);
                    }
                }
            }
            let serves =
                !stopping.contains(&r.name) && serving.get(&r.deployment).is_some_and(|names| names.contains(&r.name));
            for p in &r.spec.ports {
                let bind_ip: IpAddr =
                    p.host_ip.as_ref().and_then(|i| i.parse().ok()).unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
                let key = PortKey { bind: SocketAddr::new(bind_ip, p.host_port), protocol: p.protocol };
                let entry = ports.entry(key).or_default();
                entry.1.push(r.name.clone());
                if let (true, Some(ip)) = (serves, my_ip) {
                    entry.0.push(SocketAddr::new(IpAddr::V4(ip), p.container_port));
                }
            }
        }
        let mut port_errors = vec![];
        for (key, (targets, names)) in &ports {
            if let Err(e) = proxies.ensure(key.clone(), targets.clone()).await {
                for n in names {
                    port_errors.push((n.clone(), format!("publishing {}: {e}", key.bind)));
                }
            }
        }
        let keep: Vec<PortKey> = ports.into_keys().collect();
        proxies.retain(&keep);
        drop(proxies);
        for (name, msg) in port_errors {
            if let Some(mut r) = self.db(|s| s.instance(&name))? {
                if r.message.as_deref() != Some(&msg) {
                    r.message = Some(msg.clone());
                    self.db(|s| s.put_instance(&r))?;
                    self.event(&name, "PortError", &msg);
                }
            }
        }
        Ok(())
    }
}
