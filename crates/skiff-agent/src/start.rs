//! Steps *prepare* and *start*: the node's policy is checked first (nothing of a
//! refused workload is made), then the image's signatures (`trust.rs`); then the bundle — image layers, volumes, /etc files,
//! rootfs and spec — is made while the network namespace is set up beside it, and the
//! runtime starts the instance. A start that fails counts as a run that exited 127 for
//! the restart policy; a missing image sends the instance back to Pending.

use crate::state::{Addresses, InstanceRow};
use crate::{blocking, rebuild, Agent, AgentError};
use skiff_image::Target;
use skiff_model::{Deployment, Health, InstanceState, NetworkMode, RuntimeKind, VolumeSource};
use skiff_runtime::network::{has_link, netns_path, veth_name, MacvlanLink};
use skiff_runtime::{CreateRequest, Liveness, Runtime};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::Arc;
use tracing::{debug, warn};

impl Agent {
    /// Resolves image, network and volumes, creates the container and starts its shim.
    pub(crate) async fn start_instance(self: &Arc<Self>, mut r: InstanceRow) -> Result<(), AgentError> {
        // The node's own policy first: nothing of a refused workload is made.
        let refused = match (r.spec.runtime, crate::runsc_status()) {
            _ if self.stopped_by_rule(&r.name) => {
                Some(("SecurityAction", "stopped by a threat-detection rule; not started again".to_string()))
            }
            (RuntimeKind::Runsc, Err(why)) => {
                Some(("RuntimeUnavailable", format!("this node cannot run runsc: {why}")))
            }
            _ => self.cfg.policy.check(&r.spec, &self.cfg.data_dir).err().map(|v| ("PolicyViolation", v.to_string())),
        };
        if let Some((reason, msg)) = refused {
            r.state = InstanceState::Failed;
            r.next_start_ms = None;
            r.message = Some(msg.clone());
            self.db(|s| s.put_instance(&r))?;
            self.event(&r.name, reason, &msg);
            return Ok(());
        }
        if self.cfg.pull.is_some() && self.images.inspect_for(&r.spec.image, Target::from(r.spec.runtime)).is_err() {
            let (message, retry_ms) = self.pull_missing(&r.name, &r.spec.image, r.spec.runtime);
            r.state = InstanceState::Pending;
            r.message = Some(message);
            r.next_start_ms = Some(self.now_ms() + retry_ms);
            self.db(|s| s.put_instance(&r))?;
            return Ok(());
        }
        // Devices held by other instances: wait for them, as for an image.
        if let Err(crate::devices::NotGranted::Busy(m)) = self.try_grant(&r)? {
            r.state = InstanceState::Pending;
            r.message = Some(format!("waiting for devices: {m}"));
            r.next_start_ms = Some(self.now_ms() + 5_000);
            self.db(|s| s.put_instance(&r))?;
            return Ok(());
        }
        // Signed as the node's image rules ask (judged with the signatures kept beside it).
        if let Err(msg) = self.judge_stored(&r.name, &r.spec).await {
            r.state = InstanceState::Failed;
            r.next_start_ms = None;
            r.message = Some(msg);
            self.db(|s| s.put_instance(&r))?;
            return Ok(());
        }
        let me = Arc::clone(self);
        let r2 = r.clone();
        let res = blocking(move || me.start_blocking(&r2)).await;
        let now = self.now_ms();
        match res {
            Ok((pid, ip, addresses)) => {
                let restarted = r.state == InstanceState::Restarting;
                if restarted {
                    r.restarts += 1;
                }
                r.state = InstanceState::Running;
                r.pid = Some(pid);
                r.ip = ip.map(|i| i.to_string());
                r.addresses = addresses;
                r.started_at_ms = Some(now);
                r.next_start_ms = None;
                r.message = None;
                r.health = r.spec.healthcheck.as_ref().map(|_| Health::Starting);
                r.health_failures = 0;
                self.db(|s| s.put_instance(&r))?;
                self.event(&r.name, if restarted { "Restarted" } else { "Started" }, &format!("pid {pid}"));
                self.start_health(&r);
                self.watch_exit(&r).await;
                // The next pass judges its readiness now, not at the loop's next tick: the
                // hub already counts it as serving, and other nodes' calls come at once.
                self.notify.notify_one();
            }
            Err(AgentError::Image(e @ skiff_image::ImageError::NotFound(_))) => {
                // The image may be loaded later: keep trying, slowly.
                r.state = InstanceState::Pending;
                r.message = Some(e.to_string());
                r.next_start_ms = Some(now + 5_000);
                self.db(|s| s.put_instance(&r))?;
            }
            Err(e) => {
                warn!(instance = %r.name, error = %e, "start failed");
                // Counts as a failed run (exit 127, as a shell reports) for the restart policy;
                // an instance that will not be retried is Failed rather than Exited.
                let exit = skiff_model::ExitStatus {
                    code: 127,
                    signal: None,
                    oom_killed: false,
                    finished_at_ms: now,
                    message: None,
                };
                let mut r = self.on_exit(r, exit, now, Some(("Failed", &e.to_string())));
                if r.state == InstanceState::Exited {
                    r.state = InstanceState::Failed;
                }
                self.db(|s| s.put_instance(&r))?;
            }
        }
        Ok(())
    }

    /// Starts the instance: its pid, its address, and on the bridge its address on each
    /// network.
    pub(crate) fn start_blocking(&self, r: &InstanceRow) -> Result<(i32, Option<Ipv4Addr>, Addresses), AgentError> {
        let id = &r.container_id;
        let t0 = std::time::Instant::now();
        let rt = self.runtimes.of(r.spec.runtime);
        if let Liveness::Running { pid } = rt.liveness(id) {
            if pid > 0 {
                let ip = r.ip.as_ref().and_then(|i| i.parse().ok());
                // Running already (the agent died between its start and its row's update):
                // on the bridge's networks all the same.
                if r.spec.network == NetworkMode::Bridge && ip.is_some() {
                    self.lan_admit(&self.netns_name(id), r.all_addresses(), &r.spec)?;
                }
                return Ok((pid, ip, r.addresses.clone()));
            }
        }
        // The network namespace is set up on a second thread while the rootfs is mounted
        // and the bundle written: its path is known in advance, only runc needs it ready.
        let (mut addrs, mut macvlan) = (vec![], None);
        let ns = match r.spec.network {
            NetworkMode::Bridge => {
                let (pool, prefix, networks) =
                    (self.bridge.subnet, self.bridge.network_prefix, r.spec.joined_networks());
                addrs = self.db(|s| s.network_leases(&r.name, &networks, pool, prefix))?;
                Some(self.netns_name(id))
            }
            NetworkMode::Macvlan => {
                macvlan = Some(self.macvlan_link(r)?);
                Some(self.netns_name(id))
            }
            // Another instance's namespace, joined as it is: nothing to attach.
            NetworkMode::Service => Some(self.joined_network(r)?.0),
            NetworkMode::None | NetworkMode::Host => None,
        };
        let ip = addrs.first().map(|a| a.ip).or(macvlan.as_ref().map(|(_, ip)| *ip));
        let addresses: Addresses = match r.spec.network {
            NetworkMode::Bridge => r.spec.joined_networks().into_iter().zip(addrs.iter().map(|a| a.ip)).collect(),
            _ => Addresses::new(),
        };
        std::thread::scope(|scope| {
            let net = scope.spawn(|| -> Result<(), AgentError> {
                let (Some(ns), Some(_)) = (&ns, ip) else { return Ok(()) };
                if let Some((link, ip)) = &macvlan {
                    if !netns_path(ns).exists() {
                        link.attach(ns, *ip)?;
                    }
                    return Ok(());
                }
                let attached = netns_path(ns).exists() && has_link(&veth_name(ns));
                if !attached {
                    self.bridge.attach(ns, &addrs)?;
                }
                Ok(())
            });
            // The bridge's network table names the veth before it exists: written beside
            // the namespace, not after it (both are done before runc starts the process).
            let lan = scope.spawn(|| -> Result<(), AgentError> {
                match (&ns, ip, &macvlan) {
                    (Some(ns), Some(_), None) => self.lan_admit(ns, addrs.iter().map(|a| a.ip).collect(), &r.spec),
                    _ => Ok(()),
                }
            });
            let created = self.create_bundle(&*rt, r, ns.as_deref().map(netns_path), ip);
            let panicked = |what: &str| AgentError::Other(format!("{what} panicked"));
            let net = net.join().unwrap_or_else(|_| Err(panicked("network setup")));
            let lan = lan.join().unwrap_or_else(|_| Err(panicked("the network table's update")));
            created.and(net).and(lan)
        })?;
        let prepared = t0.elapsed();
        // What a rebuild of agent.db finds this instance by (see `rebuild`): written
        // durably beside the start, not before it (two fsyncs a start need not wait for).
        let rec = InstanceRow { ip: ip.map(|i| i.to_string()), addresses: addresses.clone(), ..r.clone() };
        let dir = rt.instance_dir(id);
        let (started, recorded) = std::thread::scope(|scope| {
            let recorded = scope.spawn(|| rebuild::write_record(&dir, &rec));
            let started = rt.start(id);
            (started, recorded.join())
        });
        let pid = started?;
        debug!(instance = %r.name, prepared_ms = prepared.as_secs_f64() * 1e3,
            started_ms = t0.elapsed().as_secs_f64() * 1e3, "started");
        // No instance runs without its record (a rebuild could not find it): one whose
        // record could not be written is stopped, and the start counts as failed.
        let unrecorded = match recorded {
            Ok(Ok(())) => return Ok((pid, ip, addresses)),
            Ok(Err(e)) => e.to_string(),
            Err(_) => "writing it panicked".to_string(),
        };
        let _ = rt.signal(id, "KILL");
        Err(AgentError::Other(format!("the instance's record was not written ({unrecorded}); stopped")))
    }

    /// What an instance of `network: service` joins: the network namespace of the
    /// deployment's instance of the same number, running on this node (its primary, not
    /// one kept through an update), and that instance.
    pub(crate) fn joined_network(&self, r: &InstanceRow) -> Result<(String, InstanceRow), AgentError> {
        let (name, t) = self.network_owner(r)?;
        let wait = |why: &str| AgentError::Other(format!("waiting for {name}'s network ({why})"));
        let t = t.ok_or_else(|| wait("not here"))?;
        // Stacks are kept apart: a network is shared only within one.
        if t.spec.stack != r.spec.stack {
            return Err(AgentError::Other(format!(
                "network_service: {name} is of stack {:?}, not {:?}: a network is shared only within a stack",
                t.spec.stack, r.spec.stack
            )));
        }
        if t.state != InstanceState::Running {
            return Err(wait("not running"));
        }
        // Not a macvlan one: its interface (address, MAC) would outlive it in the sharer.
        if t.spec.network != NetworkMode::Bridge {
            return Err(AgentError::Other(format!(
                "network_service: {name} has no network of its own to share (network: {:?})",
                t.spec.network
            )));
        }
        let ns = self.netns_name(&t.container_id);
        if !netns_path(&ns).exists() {
            return Err(wait("no namespace yet"));
        }
        Ok((ns, t))
    }

    /// Whether a running instance of `network: service` is still in the network it
    /// joined: `false` once that instance was replaced (a new namespace) or is gone.
    pub(crate) fn still_joined(&self, r: &InstanceRow) -> bool {
        use std::os::unix::fs::MetadataExt;
        let Some(pid) = r.pid.filter(|p| *p > 0) else { return true };
        let Ok(mine) = std::fs::metadata(format!("/proc/{pid}/ns/net")) else { return true };
        // Whatever its state (a restart keeps its namespace): the namespace it holds now.
        let Ok((_, Some(t))) = self.network_owner(r) else { return false };
        let ns = netns_path(&self.netns_name(&t.container_id));
        std::fs::metadata(ns).is_ok_and(|m| (m.dev(), m.ino()) == (mine.dev(), mine.ino()))
    }

    /// The name of the instance whose network `r` shares, and its row if it has one.
    fn network_owner(&self, r: &InstanceRow) -> Result<(String, Option<InstanceRow>), AgentError> {
        let name = crate::network_owner(r);
        let other = r.spec.network_service.as_deref().unwrap_or_default();
        let rows = self.db(|s| s.instances())?;
        let t = rows.into_iter().find(|x| x.name == name && x.deployment == other);
        Ok((name, t))
    }

    /// A macvlan instance's interface and address: the subnet as given or the parent's on
    /// this node; the fixed address, or one leased from the range.
    fn macvlan_link(&self, r: &InstanceRow) -> Result<(MacvlanLink, Ipv4Addr), AgentError> {
        let m = r.spec.macvlan.as_ref().ok_or_else(|| AgentError::Other("network: macvlan without macvlan".into()))?;
        // The node's own bridge and instances' veths are not segments: an instance there
        // would sit beside the others outside every rule of the bridge.
        if m.parent == self.bridge.name || m.parent.starts_with("vsk") || m.parent == "lo" {
            return Err(AgentError::Other(format!(
                "macvlan.parent: {:?} is this node's bridge, an instance's interface or loopback",
                m.parent
            )));
        }
        let bad = |what: &str, v: &str| AgentError::Other(format!("macvlan.{what}: {v:?} does not parse"));
        let own = MacvlanLink::parent_subnet(&m.parent).ok();
        let prefix = match (&m.subnet, own) {
            (Some(s), _) => s.parse::<ipnet::Ipv4Net>().map_err(|_| bad("subnet", s))?.prefix_len(),
            (None, Some((_, p))) => p,
            (None, None) => return Err(skiff_runtime::network::NetError::ParentWithoutSubnet(m.parent.clone()).into()),
        };
        let gateway = m.gateway.as_deref().map(|g| g.parse::<Ipv4Addr>().map_err(|_| bad("gateway", g))).transpose()?;
        let ip = match (&m.ip, &m.ip_range) {
            (Some(ip), _) => ip.parse().map_err(|_| bad("ip", ip))?,
            (None, Some(range)) => {
                let net = range.parse::<ipnet::Ipv4Net>().map_err(|_| bad("ip_range", range))?;
                // Starting at the instance's slot: replicas on other nodes of the same
                // segment (each node leases on its own) take other addresses.
                let hosts: Vec<Ipv4Addr> =
                    net.hosts().filter(|h| Some(*h) != gateway && Some(*h) != own.map(|o| o.0)).collect();
                let start = crate::slot_of(r).unwrap_or(1).saturating_sub(1) as usize % hosts.len().max(1);
                let (tail, head) = hosts.split_at(start.min(hosts.len()));
                self.db(|s| s.lease(&r.name, head.iter().chain(tail).copied(), range))?
            }
            (None, None) => return Err(AgentError::Other("macvlan: needs ip or ip_range".into())),
        };
        Ok((MacvlanLink { parent: m.parent.clone(), prefix, gateway }, ip))
    }

    /// Image, volumes, /etc files, rootfs and spec: everything but the network and start.
    pub(crate) fn create_bundle(
        &self,
        rt: &dyn Runtime,
        r: &InstanceRow,
        netns: Option<PathBuf>,
        ip: Option<Ipv4Addr>,
    ) -> Result<(), AgentError> {
        let info = self.images.resolve_for(&r.spec.image, Target::from(r.spec.runtime))?;
        let wasm = match r.spec.runtime {
            RuntimeKind::Wasm => Some(self.wasm_module(&r.spec, &info)?),
            RuntimeKind::Oci | RuntimeKind::Runsc => None,
        };
        let layer_dirs =
            info.layers.iter().map(|l| self.images.layer_dir(&l.diff_id)).collect::<Result<Vec<_>, _>>()?;
        let (mut volumes, fill) = self.volumes(&r.spec, &anonymous_owner(r))?;
        volumes.extend(write_files(&rt.instance_dir(&r.container_id), &r.spec)?);
        // Sharing another instance's network is sharing its name, hosts and resolver too.
        let joined = match r.spec.network {
            NetworkMode::Service => Some(self.joined_network(r)?.1),
            _ => None,
        };
        let net = joined.as_ref().unwrap_or(r);
        let hosts = match net.spec.network {
            NetworkMode::Host => std::fs::read_to_string("/etc/hosts").unwrap_or_default() + &self.extra_hosts(&r.spec),
            _ if joined.is_some() => {
                self.hosts_for(&net.spec, &net.name, net.ip.as_ref().and_then(|i| i.parse().ok()))?
            }
            _ => self.hosts_for(&r.spec, &r.name, ip)?,
        };
        let (cdi_devices, cdi_edits) = self.grant_devices(r)?;
        let req = CreateRequest {
            id: r.container_id.clone(),
            hostname: net.spec.hostname.clone().unwrap_or_else(|| net.name.clone()),
            deployment: &r.spec,
            image: &info,
            layer_dirs,
            netns,
            hosts,
            resolv_conf: resolv_conf(
                net.spec.network,
                Some(self.bridge.subnet.gateway()).filter(|_| self.dns && net.spec.network == NetworkMode::Bridge),
                &net.spec.dns,
            ),
            volumes,
            fill_volumes: fill,
            wasm,
            cdi_devices,
            cdi_edits,
            // runc's containers only: gVisor's programs make their calls to its own kernel.
            seccomp_audit: match r.spec.runtime {
                RuntimeKind::Oci => self.detector.get().map(|d| d.seccomp_audit.clone()).unwrap_or_default(),
                _ => Default::default(),
            },
        };
        rt.create(&req)?;
        Ok(())
    }

    /// The WebAssembly program a wasm deployment runs: the artifact's module, or the file
    /// its argv[0] names in a `wasi/wasm` image.
    pub(crate) fn wasm_module(
        &self,
        d: &Deployment,
        info: &skiff_image::ImageInfo,
    ) -> Result<skiff_image::WasmModule, AgentError> {
        let argv = skiff_runtime::wasm::argv(d, info);
        Ok(self.images.wasm_module(info, argv.first().map(String::as_str))?)
    }

    /// The volumes of an instance (`owner`: its slot, for anonymous ones), resolved and
    /// made: (host path, target, read only), and those just made (volumes, not host
    /// paths) that the image's content at their target is to fill.
    #[allow(clippy::type_complexity)]
    pub(crate) fn volumes(
        &self,
        d: &Deployment,
        owner: &str,
    ) -> Result<(Vec<(PathBuf, String, bool)>, Vec<(PathBuf, String)>), AgentError> {
        use std::os::unix::fs::PermissionsExt;
        let mut out = vec![];
        let mut fill = vec![];
        let wasm = d.runtime == RuntimeKind::Wasm;
        let volumes = self.cfg.data_dir.join("volumes");
        // A pod's volumes are its first container's slot's: `web-2`'s for `web-shipper-2`.
        let pod = match (&d.pod_of, d.slot_named(owner)) {
            (Some(first), Some(slot)) => format!("{first}-{slot}"),
            _ => owner.to_string(),
        };
        for v in &d.volumes {
            let (src, named) = match &v.source {
                VolumeSource::Bind { path } => (PathBuf::from(path), false),
                // Empty when new, as an emptyDir (not filled from either image).
                VolumeSource::Pod { name } => {
                    let src = volumes.join(ANONYMOUS).join(&pod).join(format!("pod-{name}")).join("_data");
                    if !src.exists() {
                        std::fs::create_dir_all(&src)
                            .and_then(|_| std::fs::set_permissions(&src, std::fs::Permissions::from_mode(0o777)))
                            .map_err(|e| AgentError::Other(format!("volume source {}: {e}", src.display())))?;
                    }
                    out.push((src, v.target.clone(), v.read_only));
                    continue;
                }
                VolumeSource::Named { name } => (volumes.join(name).join("_data"), true),
                VolumeSource::Claim { name } => {
                    (volumes.join(skiff_model::stateful::claim_volume(name, owner)).join("_data"), true)
                }
                // By its target: a volume added or moved in an update keeps its own data.
                VolumeSource::Anonymous => {
                    (volumes.join(ANONYMOUS).join(owner).join(target_key(&v.target)).join("_data"), true)
                }
            };
            let made = !src.exists();
            if made && named && !wasm {
                fill.push((src.clone(), v.target.clone()));
            }
            let fail = |e: std::io::Error| AgentError::Other(format!("volume source {}: {e}", src.display()));
            if made {
                // As `docker run -v` does, a missing source becomes an empty directory
                // (0755, as Docker makes it, whatever the agent's umask).
                std::fs::create_dir_all(&src)
                    .and_then(|_| std::fs::set_permissions(&src, std::fs::Permissions::from_mode(0o755)))
                    .map_err(fail)?;
            }
            // A wasm program runs as an unprivileged user of its deployment's group: the
            // volumes the agent made for it are that group's (setgid, so what one replica
            // writes the others read), and the way to a named one is traversable. A named
            // volume made for something else (a container's database, another wasm
            // deployment) is never handed over: it stays as it is.
            let gid_raw = skiff_runtime::wasm::gid_for(&d.name);
            let ours = made || {
                use std::os::unix::fs::MetadataExt;
                named && std::fs::symlink_metadata(&src).is_ok_and(|m| m.is_dir() && m.gid() == gid_raw)
            };
            if wasm && named && !ours {
                warn!(deployment = %d.name, volume = %src.display(), "named volume belongs to another deployment; left as it is");
            }
            if wasm && ours {
                let gid = nix::unistd::Gid::from_raw(gid_raw);
                nix::unistd::chown(&src, None, Some(gid)).map_err(|e| fail(e.into()))?;
                std::fs::set_permissions(&src, std::fs::Permissions::from_mode(0o2770)).map_err(fail)?;
                if let Some(parent) = src.parent().filter(|_| named) {
                    skiff_sys::perms::traversable(parent).map_err(|e| AgentError::Other(e.to_string()))?;
                }
            }
            out.push((src, v.target.clone(), v.read_only));
        }
        Ok((out, fill))
    }
}

/// Writes the deployment's files (ConfigMap and Secret volumes, compose configs and
/// secrets) beside the instance, `<instance dir>/files/<n>`, readable by the container's
/// users as the mode says (only root's: the directory above is the agent's): the mounts
/// to add, read-only. Written anew at each start, so they are the spec's.
fn write_files(dir: &std::path::Path, d: &Deployment) -> Result<Vec<(PathBuf, String, bool)>, AgentError> {
    use std::os::unix::fs::PermissionsExt;
    let mut out = vec![];
    if d.files.is_empty() {
        return Ok(out);
    }
    let fail = |p: &std::path::Path| {
        let p = p.to_path_buf();
        move |e: std::io::Error| AgentError::Other(format!("files: {}: {e}", p.display()))
    };
    let mode = |p: &std::path::Path, m: u32| std::fs::set_permissions(p, std::fs::Permissions::from_mode(m));
    let base = dir.join("files");
    if base.exists() {
        std::fs::remove_dir_all(&base).map_err(fail(&base))?;
    }
    for (i, m) in d.files.iter().enumerate() {
        let root = base.join(i.to_string());
        // Every directory here is traversable (the files' own modes say who reads them).
        std::fs::create_dir_all(&root).and_then(|()| mode(&root, 0o755)).map_err(fail(&root))?;
        let single = m.files.len() == 1 && m.files[0].path.is_empty();
        for f in &m.files {
            let p = if single { root.join("file") } else { root.join(&f.path) };
            let parent = p.parent().unwrap_or(&root);
            std::fs::create_dir_all(parent).map_err(fail(parent))?;
            for a in parent.ancestors().take_while(|a| *a != root && a.starts_with(&root)) {
                mode(a, 0o755).map_err(fail(a))?;
            }
            std::fs::write(&p, f.content().map_err(|e| fail(&p)(std::io::Error::other(e)))?)
                .and_then(|()| mode(&p, f.mode))
                .map_err(fail(&p))?;
        }
        out.push((if single { root.join("file") } else { root }, m.target.clone(), true));
    }
    Ok(out)
}

/// Where anonymous volumes live, under the node's `volumes` (not a volume name: those
/// start with a letter or digit).
pub(crate) const ANONYMOUS: &str = ".anonymous";

/// An anonymous volume's directory name: its target's FNV-1a hash (a target may be any
/// path; a name must be one short component).
fn target_key(target: &str) -> String {
    let h = target.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
    format!("{h:016x}")
}

/// Whose anonymous volumes (and claim volumes) an instance mounts: its deployment's slot
/// (`web-2`), which keeps them across restarts and updates; the instance's own name
/// without a slot.
fn anonymous_owner(r: &InstanceRow) -> String {
    match crate::slot_of(r) {
        Some(slot) => r.spec.instance_name(slot),
        None => r.name.clone(),
    }
}

/// The host's resolv.conf without loopback name servers, which a container's own
/// network namespace cannot reach; with the node's DNS (`dns`, on the bridge), that
/// alone as the name server (it forwards what is not the fleet's to the host's, or to the
/// deployment's own servers). The deployment's servers, search domains and options
/// replace the host's.
fn resolv_conf(network: NetworkMode, dns: Option<std::net::Ipv4Addr>, own: &skiff_model::options::DnsConfig) -> String {
    let host = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    if network == NetworkMode::Host && own.is_default() {
        return host;
    }
    let mut out: String = host
        .lines()
        .filter(|l| {
            let mut it = l.split_whitespace();
            match (it.next(), it.next()) {
                (Some("nameserver"), _) if dns.is_some() || !own.servers.is_empty() => false,
                (Some("nameserver"), Some(a)) => network == NetworkMode::Host || !(a.starts_with("127.") || a == "::1"),
                (Some("search" | "domain"), _) if !own.search.is_empty() => false,
                (Some("options"), _) if !own.options.is_empty() => false,
                _ => true,
            }
        })
        .map(|l| format!("{l}\n"))
        .collect();
    match dns {
        Some(ip) => out.push_str(&format!("nameserver {ip}\n")),
        None => own.servers.iter().for_each(|s| out.push_str(&format!("nameserver {s}\n"))),
    }
    if !own.search.is_empty() {
        out.push_str(&format!("search {}\n", own.search.join(" ")));
    }
    if !own.options.is_empty() {
        out.push_str(&format!("options {}\n", own.options.join(" ")));
    }
    out
}
