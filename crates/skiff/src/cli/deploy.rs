//! `skiff apply`, `skiff run` and `skiff delete`: what changes the desired state.

use super::{client, parse_selector, Cli};
use anyhow::{bail, Context, Result};
use clap::Args;
use skiff_model::api::{ApplyRequest, ApplyResponse, DeploymentView};
use skiff_model::{Deployment, DeviceMapping, DeviceRequest, NetworkMode, PortMapping, RestartPolicy, RuntimeKind};
use std::path::{Path, PathBuf};

#[derive(Args)]
pub struct RunArgs {
    /// An image reference, or (with the wasm runtime) a .wasm file on this machine.
    pub image: String,
    /// oci (a container under runc), runsc (a container in a gVisor sandbox) or wasm (a
    /// WASI program under wasmtime); a .wasm file implies wasm.
    #[arg(long)]
    pub runtime: Option<String>,
    /// wasm: stop a command after this long (exit code 124); an HTTP component answers 504
    /// to a request still running then (5s, 500ms, 1m).
    #[arg(long = "wasm-timeout")]
    pub wasm_timeout: Option<String>,
    /// wasm HTTP components: serve from a pool of N pre-reserved instances, N requests at
    /// a time (default: a fresh instance per request, no bound).
    #[arg(long = "wasm-pool")]
    pub wasm_pool: Option<u32>,
    /// wasm: let the program connect to loopback, link-local (cloud metadata) and the
    /// node's own addresses (out of bounds by default).
    #[arg(long = "wasm-allow-local")]
    pub wasm_allow_local: bool,
    /// The deployment's name (default: from the image's name).
    #[arg(long)]
    pub name: Option<String>,
    /// Accepted for `docker run -d` habits: `skiff run` always returns once the deployment
    /// is stored, and the node runs it.
    #[arg(short = 'd', long)]
    pub detach: bool,
    /// Keep the container's standard input open for `skiff attach` (as `docker run -i`);
    /// with -t and without -d, this terminal is attached once it runs.
    #[arg(short = 'i', long)]
    pub interactive: bool,
    /// Run the container on a terminal its shim holds (as `docker run -t`), for
    /// `skiff attach`.
    #[arg(short = 't', long)]
    pub tty: bool,
    /// CPU limit in cores (0.5) or millicores (500m).
    #[arg(long)]
    pub cpus: Option<String>,
    /// Memory limit (512m, 1g, 512Mi); swap is limited to the same amount.
    #[arg(short = 'm', long)]
    pub memory: Option<String>,
    /// Relative CPU weight (1024 is the default).
    #[arg(long)]
    pub cpu_shares: Option<u64>,
    /// At most this many processes and threads.
    #[arg(long)]
    pub pids_limit: Option<i64>,
    /// no | always | on-failure[:N] | unless-stopped
    #[arg(long, default_value = "no")]
    pub restart: String,
    /// KEY=VALUE, or KEY to take its value from this shell (repeatable).
    #[arg(short = 'e', long = "env")]
    pub env: Vec<String>,
    /// A file of KEY=VALUE lines (`#` comments; a bare KEY takes this shell's value),
    /// read before `--env` (repeatable).
    #[arg(long = "env-file")]
    pub env_file: Vec<std::path::PathBuf>,
    /// A label KEY=VALUE on the deployment (repeatable).
    #[arg(short = 'l', long = "label")]
    pub label: Vec<String>,
    /// Log file options, as Docker's json-file driver: `max-size=10m`, `max-file=3`
    /// (repeatable; the node's default is 10m and 3).
    #[arg(long = "log-opt", value_name = "KEY=VALUE")]
    pub log_opt: Vec<String>,
    /// [IP:]HOST_PORT:CONTAINER_PORT[/udp], or PORT (repeatable).
    #[arg(short = 'p', long = "publish")]
    pub publish: Vec<String>,
    /// SOURCE:TARGET[:ro]; a SOURCE starting with /, . or ~ is a host path (./data from
    /// the current directory, as compose reads it), anything else a volume name.
    #[arg(short = 'v', long = "volume")]
    pub volume: Vec<String>,
    /// bridge (the default), host, none, macvlan:PARENT[,ip=A|ip_range=CIDR][,subnet=CIDR]
    /// [,gateway=A] (an address of its own on PARENT's segment), service:NAME (the network
    /// of deployment NAME's instance of the same number: one address and localhost, as
    /// `docker run --network container:`), or the name of a network to join on the bridge
    /// (repeat to join several): instances reach only instances that share a network.
    #[arg(long)]
    pub network: Vec<String>,
    /// Mount the image's root filesystem read-only.
    #[arg(long)]
    pub read_only: bool,
    /// USER[:GROUP], by name (from the image's /etc/passwd) or number.
    #[arg(short = 'u', long)]
    pub user: Option<String>,
    /// The working directory inside the container.
    #[arg(short = 'w', long)]
    pub workdir: Option<String>,
    /// Replaces the image's entrypoint (a command line, split as a shell would).
    #[arg(long)]
    pub entrypoint: Option<String>,
    /// A capability beyond Docker's default set (NET_ADMIN, SYS_TIME, ...), repeatable.
    #[arg(long)]
    pub cap_add: Vec<String>,
    /// A capability to drop from the default set (or ALL), repeatable.
    #[arg(long)]
    pub cap_drop: Vec<String>,
    /// A host device, HOST[:CONTAINER[:rwm]], or a CDI device, vendor.com/class=NAME
    /// (`nvidia.com/gpu=0`, `nvidia.com/gpu=all`), repeatable.
    #[arg(long)]
    pub device: Vec<String>,
    /// GPUs, as Docker's --gpus: all, a count, or device=ID[,ID] (CDI kind nvidia.com/gpu);
    /// the instance is placed only where that many are free.
    #[arg(long)]
    pub gpus: Option<String>,
    /// Run only an image signed with this cosign public key (PEM file), repeatable; checked
    /// on every node beside its own image policy.
    #[arg(long = "verify-key")]
    pub verify_key: Vec<std::path::PathBuf>,
    /// With --verify-key: enforce (refuse an image no key signed) or warn (run it, with an
    /// event).
    #[arg(long = "verify-mode", requires = "verify_key", value_parser = ["enforce", "warn"])]
    pub verify_mode: Option<String>,
    /// A kernel parameter of the container's own namespaces, KEY=VALUE
    /// (net.core.somaxconn=1024, kernel.shmmax=...), repeatable.
    #[arg(long)]
    pub sysctl: Vec<String>,
    /// A process limit, NAME=SOFT[:HARD] (nofile=1024:4096; -1 for none), repeatable.
    #[arg(long)]
    pub ulimit: Vec<String>,
    /// The size of /dev/shm (64m by default).
    #[arg(long = "shm-size")]
    pub shm_size: Option<String>,
    /// Run an init as process 1: it passes signals on and reaps zombies.
    #[arg(long)]
    pub init: bool,
    /// A line of /etc/hosts, HOST:IP (IP may be host-gateway: this node), repeatable.
    #[arg(long = "add-host")]
    pub add_host: Vec<String>,
    /// A name server for what is not the fleet's (repeatable, at most 3).
    #[arg(long)]
    pub dns: Vec<String>,
    /// A DNS search domain (repeatable).
    #[arg(long = "dns-search")]
    pub dns_search: Vec<String>,
    /// A resolver option (ndots:2, timeout:1; repeatable).
    #[arg(long = "dns-option")]
    pub dns_option: Vec<String>,
    /// How many instances to run.
    #[arg(long, default_value_t = 1)]
    pub replicas: u32,
    /// Node label KEY=VALUE the instances must run on (repeatable).
    #[arg(long = "selector")]
    pub selector: Vec<String>,
    /// Seconds between SIGTERM and SIGKILL on stop.
    #[arg(long, default_value_t = 10)]
    pub stop_timeout: u64,
    /// The command and its arguments, after `--` (default: the image's).
    #[arg(last = true)]
    pub command: Vec<String>,
}

pub fn print_apply(r: &ApplyResponse, dry_run: bool) {
    let suffix = if dry_run { " (dry run)" } else { "" };
    for (verb, names) in
        [("created", &r.created), ("updated", &r.updated), ("unchanged", &r.unchanged), ("deleted", &r.deleted)]
    {
        for n in names {
            outln!("deployment {n} {verb}{suffix}");
        }
    }
    for (instance, node) in &r.placement {
        outln!("  {instance} on {node}");
    }
    for (node, images) in &r.pulls {
        for image in images {
            outln!("  {node} would pull {image}");
        }
    }
    print_notes(r);
}

/// Warnings, and instances that found no node, on stderr: the apply itself succeeded.
pub(super) fn print_notes(r: &ApplyResponse) {
    for w in &r.warnings {
        eprintln!("warning: {w}");
    }
    for (d, why) in &r.unschedulable {
        eprintln!("warning: {d}: {why}");
    }
}

/// The .wasm file `skiff run` names instead of an image, if it does: an existing file
/// that is a WebAssembly binary (a path that ends in .wasm must be one).
pub(super) fn wasm_file(a: &RunArgs) -> Result<Option<PathBuf>> {
    let p = PathBuf::from(&a.image);
    let looks_like_file = a.image.ends_with(".wasm") || a.image.starts_with('.') || a.image.starts_with('/');
    if !p.is_file() {
        if a.image.ends_with(".wasm") {
            bail!("{}: no such file (a .wasm file to run must exist on this machine)", a.image);
        }
        return Ok(None);
    }
    let mut head = [0u8; 8];
    let n = std::io::Read::read(&mut std::fs::File::open(&p)?, &mut head)?;
    if skiff_model::WasmKind::detect(&head[..n]).is_none() {
        if looks_like_file {
            bail!("{}: not a WebAssembly binary (no \\0asm module or component header)", a.image);
        }
        return Ok(None);
    }
    if a.runtime.as_deref().is_some_and(|r| RuntimeKind::parse(r) != Some(RuntimeKind::Wasm)) {
        bail!("--runtime: {} is a WebAssembly file; it runs with --runtime wasm", a.image);
    }
    Ok(Some(p))
}

/// Checks a .wasm file (sha256 `digest`) as the node will (compiled into this machine's
/// compile cache, imports and exports checked), then stores it as the image `reference`.
/// Nothing is stored when the check fails.
pub(super) fn import_wasm_file(data: &Path, file: &Path, digest: &str, reference: &str) -> Result<()> {
    let module = skiff_image::WasmModule { path: file.to_path_buf(), id: digest.to_string() };
    let what = skiff_runtime::wasm::check(&module, &data.join("wasm/cache"))
        .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
    skiff_image::ImageStore::open(data.join("images"))?.import_wasm(file, reference)?;
    eprintln!("{}: {what}, stored as {reference}", file.display());
    Ok(())
}

/// The deployment `skiff run` asks for, running `image`; `from_file`: the image is the
/// .wasm file named on the command line (the wasm runtime, unless told otherwise).
pub(super) fn deployment_from_run(a: &RunArgs, image: String, from_file: bool) -> Result<Deployment> {
    let base = image.rsplit('/').next().unwrap_or(&image).split([':', '@']).next().unwrap_or("app");
    let name = match &a.name {
        Some(n) => n.clone(),
        None => {
            let suffix = skiff_sys::random::hex(2)?;
            let clean: String =
                base.to_ascii_lowercase().chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-').collect();
            format!("{}-{suffix}", if clean.is_empty() { "app" } else { &clean })
        }
    };
    let mut d = Deployment::new(name, image.clone());
    d.runtime = match &a.runtime {
        Some(r) => RuntimeKind::parse(r).with_context(|| format!("--runtime: {r:?} is not oci, runsc or wasm"))?,
        None if from_file => RuntimeKind::Wasm,
        None => RuntimeKind::Oci,
    };
    if let Some(t) = &a.wasm_timeout {
        d.wasm.timeout_ms = Some(
            skiff_manifest::parse_duration_ms(t)
                .with_context(|| format!("--wasm-timeout: {t:?} is not a duration (examples: 5s, 500ms, 1m)"))?,
        );
    }
    d.wasm.pool = a.wasm_pool;
    d.wasm.allow_local = a.wasm_allow_local;
    if let Some(c) = &a.cpus {
        d.resources.cpus_millis = Some(skiff_model::parse_cpus(c).map_err(|e| anyhow::anyhow!("--cpus: {e}"))?);
    }
    if let Some(m) = &a.memory {
        d.resources.memory_bytes = Some(skiff_model::parse_bytes(m).map_err(|e| anyhow::anyhow!("--memory: {e}"))?);
    }
    d.resources.cpu_shares = a.cpu_shares;
    d.resources.pids_limit = a.pids_limit;
    d.restart = RestartPolicy::parse(&a.restart)
        .with_context(|| format!("--restart: {:?} is not no, always, on-failure[:N] or unless-stopped", a.restart))?;
    let set_env = |env: &mut std::collections::BTreeMap<String, String>, kv: &str| {
        match kv.split_once('=') {
            Some((k, v)) => env.insert(k.into(), v.into()),
            None => env.insert(kv.to_string(), std::env::var(kv).unwrap_or_default()),
        };
    };
    for f in &a.env_file {
        let text = std::fs::read_to_string(f).with_context(|| format!("--env-file {}", f.display()))?;
        for line in text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
            set_env(&mut d.env, line);
        }
    }
    for kv in &a.env {
        set_env(&mut d.env, kv);
    }
    for kv in &a.label {
        let (k, v) = kv.split_once('=').unwrap_or((kv.as_str(), ""));
        d.labels.insert(k.to_string(), v.to_string());
    }
    for kv in &a.log_opt {
        let (k, v) = kv.split_once('=').with_context(|| format!("--log-opt {kv:?}: want KEY=VALUE (max-size=10m)"))?;
        d.logging.set(k, v).map_err(|e| anyhow::anyhow!("--log-opt {k}: {e}"))?;
    }
    for p in &a.publish {
        d.ports.push(PortMapping::parse(p).with_context(|| {
            format!("--publish: {p:?} is not a port mapping (examples: 8080:80, 127.0.0.1:53:53/udp)")
        })?);
    }
    // As `docker run -v`: a source that is a path (`/`, `.`, `~`) binds it, from the
    // current directory; anything else names a volume. Compose reads the same way.
    let cwd = std::env::current_dir().context("--volume: the current directory")?;
    let home = std::env::var_os("HOME").map(std::path::PathBuf::from);
    for v in &a.volume {
        let vol =
            skiff_manifest::short::volume(v, &cwd, home.as_deref()).map_err(|e| anyhow::anyhow!("--volume: {e}"))?;
        d.volumes.push(vol);
    }
    for n in &a.network {
        match n.as_str() {
            "bridge" | "host" | "none" if a.network.len() == 1 => {
                d.network = skiff_manifest::short::network_mode(n).map_err(|e| anyhow::anyhow!("--network: {e}"))?;
            }
            "bridge" | "host" | "none" => anyhow::bail!("--network: {n} cannot be combined with other networks"),
            m if m.starts_with("macvlan:") && a.network.len() == 1 => {
                d.network = NetworkMode::Macvlan;
                d.macvlan = Some(skiff_manifest::short::macvlan(m).map_err(|e| anyhow::anyhow!("--network: {e}"))?);
            }
            m if m.starts_with("macvlan:") => anyhow::bail!("--network: {m} cannot be combined with other networks"),
            // As `docker run --network container:NAME`, by deployment.
            m if m.starts_with("service:") && a.network.len() == 1 => {
                d.network = NetworkMode::Service;
                d.network_service = Some(m["service:".len()..].to_string());
            }
            m if m.starts_with("service:") => anyhow::bail!("--network: {m} cannot be combined with other networks"),
            name => d.networks.push(name.to_string()),
        }
    }
    d.read_only = a.read_only;
    d.tty = a.tty;
    d.stdin_open = a.interactive;
    d.user = a.user.clone();
    d.working_dir = a.workdir.clone();
    if let Some(e) = &a.entrypoint {
        d.entrypoint = Some(if e.is_empty() { vec![] } else { vec![e.clone()] });
    }
    d.cap_add = a.cap_add.clone();
    d.cap_drop = a.cap_drop.clone();
    for dev in &a.device {
        if DeviceRequest::looks_like_cdi(dev) {
            d.device_requests.push(
                DeviceRequest::parse_cdi(dev)
                    .with_context(|| format!("--device: {dev:?} is not a CDI device name (vendor.com/class=NAME)"))?,
            );
            continue;
        }
        d.devices
            .push(DeviceMapping::parse(dev).with_context(|| {
                format!("--device: {dev:?} is not HOST[:CONTAINER[:rwm]] or vendor.com/class=NAME")
            })?);
    }
    if let Some(g) = &a.gpus {
        d.device_requests.push(
            DeviceRequest::parse_gpus(g)
                .with_context(|| format!("--gpus: {g:?} is not all, a count or device=ID[,ID...]"))?,
        );
    }
    if !a.verify_key.is_empty() {
        let mut keys = vec![];
        for k in &a.verify_key {
            let pem = std::fs::read_to_string(k).with_context(|| format!("--verify-key {}", k.display()))?;
            skiff_image::trust::PublicKey::from_pem(&pem)
                .map_err(|e| anyhow::anyhow!("--verify-key {}: {e}", k.display()))?;
            keys.push(pem);
        }
        d.signature = Some(skiff_model::SignatureRule { mode: a.verify_mode.clone(), keys, ..Default::default() });
    }
    for kv in &a.sysctl {
        let (k, v) = kv.split_once('=').with_context(|| format!("--sysctl {kv:?}: want KEY=VALUE"))?;
        d.sysctls.insert(k.to_string(), v.to_string());
    }
    for u in &a.ulimit {
        let (name, limit) = skiff_model::options::Ulimit::parse(u).map_err(|e| anyhow::anyhow!("--ulimit: {e}"))?;
        d.ulimits.insert(name, limit);
    }
    if let Some(s) = &a.shm_size {
        d.shm_size_bytes = Some(skiff_model::parse_bytes(s).map_err(|e| anyhow::anyhow!("--shm-size: {e}"))?);
    }
    d.init = a.init;
    for h in &a.add_host {
        d.extra_hosts.push(skiff_model::options::ExtraHost::parse(h).map_err(|e| anyhow::anyhow!("--add-host: {e}"))?);
    }
    d.dns = skiff_model::options::DnsConfig {
        servers: a.dns.clone(),
        search: a.dns_search.clone(),
        options: a.dns_option.clone(),
    };
    d.replicas = a.replicas;
    d.placement.node_selector = parse_selector(&a.selector)?;
    d.stop_grace_period_ms = a.stop_timeout * 1000;
    if !a.command.is_empty() {
        d.command = Some(a.command.clone());
    }
    d.validate().map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(d)
}

/// What one apply of `-f` files holds.
pub(super) struct Manifests {
    pub deployments: Vec<skiff_model::Deployment>,
    pub warnings: Vec<String>,
    /// A compose file's project: its stack is replaced whole.
    pub prune_stack: Option<String>,
    pub autoscalers: Vec<skiff_model::api::AttachAutoscaler>,
    /// A compose file's `build:` sections.
    pub builds: Vec<skiff_manifest::BuildSpec>,
    /// The manifests' Services, for the hub to keep.
    pub services: Vec<skiff_model::api::KeptService>,
}

/// The `-f` files read (`-`: standard input, once): (name, text, directory).
type Texts = Vec<(String, String, PathBuf)>;

/// Reads the `-f` files: Kubernetes manifests, any number, applied together as `kubectl
/// apply -f a -f b`; or one compose file (docker compose merges several as overrides,
/// which skiff does not).
pub(super) fn read_manifests(files: &[PathBuf]) -> Result<Manifests> {
    import_texts(read_texts(files)?, &[], &[])
}

/// Whether manifests hold a Kubernetes Service (which may select stored deployments).
fn has_k8s_service(texts: &Texts) -> bool {
    texts.iter().any(|(_, t, _)| skiff_manifest::is_k8s(t) && t.contains("Service"))
}

fn read_texts(files: &[PathBuf]) -> Result<Texts> {
    let mut texts: Texts = vec![];
    let mut stdin_read = false;
    for f in files {
        if f.as_os_str() == "-" {
            if stdin_read {
                bail!("-f -: standard input can be read once");
            }
            stdin_read = true;
            let mut t = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut t).context("reading standard input")?;
            texts.push(("standard input".into(), t, std::env::current_dir().unwrap_or_else(|_| ".".into())));
        } else {
            let t = std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
            let dir =
                f.canonicalize().ok().and_then(|p| p.parent().map(Path::to_path_buf)).unwrap_or_else(|| ".".into());
            texts.push((f.display().to_string(), t, dir));
        }
    }
    Ok(texts)
}

/// The manifests of `texts`, a Service selecting `stored` deployments too, and the `kept`
/// Services selecting their workloads.
fn import_texts(
    texts: Texts,
    stored: &[skiff_model::Deployment],
    kept: &[skiff_model::api::KeptService],
) -> Result<Manifests> {
    let compose: Vec<&(String, String, PathBuf)> =
        texts.iter().filter(|(_, t, _)| !skiff_manifest::is_k8s(t)).collect();
    if let Some((name, text, dir)) = compose.first() {
        if texts.len() > 1 {
            bail!(
                "-f: {name} is a compose file, and several files were given: docker compose merges them as \
                 overrides, which skiff does not; apply one compose file at a time"
            );
        }
        let c = crate::up::compose_in(text, dir).with_context(|| name.clone())?;
        return Ok(Manifests {
            deployments: c.deployments,
            warnings: c.warnings,
            prune_stack: Some(c.project),
            autoscalers: vec![],
            builds: c.builds,
            services: vec![],
        });
    }
    // One set, as kubectl reads several files: a Service or an autoscaler in one file
    // selects a Deployment in another (errors name the file).
    let files: Vec<(&str, &str)> = texts.iter().map(|(n, t, _)| (n.as_str(), t.as_str())).collect();
    let k =
        skiff_manifest::import_k8s_with(&files, "default", stored, kept).with_context(|| match files.as_slice() {
            [(one, _)] => one.to_string(),
            _ => "the manifests".to_string(),
        })?;
    let out = Manifests {
        deployments: k.deployments,
        warnings: k.warnings,
        prune_stack: None,
        autoscalers: k.autoscalers,
        builds: vec![],
        services: k.services,
    };
    Ok(out)
}

/// `skiff apply -f FILE...`: Kubernetes manifests are applied as `kubectl apply` does (no
/// pruning); a compose file replaces its whole stack.
pub(super) async fn apply(cli: &Cli, files: &[PathBuf], dry_run: bool, selector: &[String]) -> Result<i32> {
    let selector = parse_selector(selector)?;
    // A Service applied on its own selects deployments already stored.
    let texts = read_texts(files)?;
    let c = client(cli)?;
    let stored: Vec<skiff_model::Deployment> = match has_k8s_service(&texts) {
        true => c.get::<Vec<DeploymentView>>("/api/v1/deployments").await?.into_iter().map(|v| v.spec).collect(),
        false => vec![],
    };
    // Services applied before select the workloads of these manifests too.
    let k8s = texts.iter().any(|(_, t, _)| skiff_manifest::is_k8s(t));
    let kept: Vec<skiff_model::api::KeptService> = match k8s {
        true => match c.get("/api/v1/k8s-services").await {
            Ok(k) => k,
            // An older hub keeps none.
            Err(e) if super::view::is_status(&e, reqwest::StatusCode::NOT_FOUND) => vec![],
            Err(e) => return Err(e),
        },
        false => vec![],
    };
    let Manifests { mut deployments, warnings, prune_stack, autoscalers, builds, services } =
        import_texts(texts, &stored, &kept)?;
    for w in &warnings {
        eprintln!("warning: {w}");
    }
    // Images only built here: on this machine's node (`skiff up`'s data directory), built
    // into its store when missing; on a fleet, built here and handed to the hub, which
    // offers them to its nodes, and run by digest (a new build rolls the deployment).
    let local = cli.data.join("agent.db").exists();
    let unbuilt: Vec<&skiff_manifest::BuildSpec> =
        builds.iter().filter(|b| b.build_only && !(local && crate::build::is_built(&cli.data, &b.tag))).collect();
    if !unbuilt.is_empty() && !dry_run {
        if local {
            crate::build::build_all(&cli.data, &builds, &[], true)?;
        } else {
            let work = build_dir(cli);
            for b in &unbuilt {
                let by_digest = crate::build::build_and_push(&c, &work, b).await?;
                for d in deployments.iter_mut().filter(|d| d.image == b.tag) {
                    d.image.clone_from(&by_digest);
                }
            }
        }
    }
    for b in unbuilt.iter().filter(|_| dry_run) {
        eprintln!("{}: {} would be built (dry run: not built)", b.service, b.tag);
        // On a fleet a build runs by digest: the plan compares with the build stored now.
        if local {
            continue;
        }
        let name = skiff_image::reference_name(&b.tag);
        for d in deployments.iter_mut().filter(|d| d.image == b.tag) {
            let path = format!("/api/v1/deployments/{}", d.name);
            if let Ok(v) = c.get::<DeploymentView>(&path).await {
                if v.spec.image.starts_with(&format!("{name}@")) {
                    d.image = v.spec.image;
                }
            }
        }
    }
    for d in &mut deployments {
        d.placement.node_selector.extend(selector.clone());
    }
    let req = ApplyRequest { deployments, prune_stack, dry_run, autoscalers, services };
    let r: ApplyResponse = c.post("/api/v1/apply", &req).await?;
    print_apply(&r, dry_run);
    // Only Kubernetes pods have other containers.
    if k8s {
        drop_left_containers(&c, &req.deployments, dry_run).await?;
    }
    Ok(0)
}

/// A pod's template is applied whole (as kubectl replaces a pod's containers): a stored
/// container of one of `sent`'s pods that the manifest no longer has is deleted.
async fn drop_left_containers(c: &crate::client::Client, sent: &[Deployment], dry_run: bool) -> Result<()> {
    let firsts: Vec<&str> = sent.iter().filter(|d| d.pod_of.is_none()).map(|d| d.name.as_str()).collect();
    if firsts.is_empty() {
        return Ok(());
    }
    let stored: Vec<DeploymentView> = c.get("/api/v1/deployments").await?;
    for v in stored {
        let Some(first) = v.spec.pod_of.as_deref().filter(|f| firsts.contains(f)) else { continue };
        let name = &v.spec.name;
        if sent.iter().any(|d| d.name == *name) {
            continue;
        }
        if dry_run {
            outln!("deployment {name} would be deleted: no longer a container of {first}'s pods");
            continue;
        }
        c.delete(&format!("/api/v1/deployments/{name}")).await?;
        outln!("deployment {name} deleted: no longer a container of {first}'s pods");
    }
    Ok(())
}

/// Where the CLI builds images for a fleet: buildah's storage (its layer cache) under the
/// data directory when it can write there, else under the user's cache.
fn build_dir(cli: &Cli) -> std::path::PathBuf {
    let data = cli.data.join("build");
    if std::fs::create_dir_all(&data).is_ok() {
        return data;
    }
    std::env::var_os("XDG_CACHE_HOME")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| std::path::Path::new(&h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir)
        .join("skiff/build")
}

/// `skiff run IMAGE|FILE.wasm`.
pub(super) async fn run(cli: &Cli, args: &RunArgs) -> Result<i32> {
    if args.interactive && args.tty && !args.detach && !skiff_sys::pty::is_terminal(std::io::stdin()) {
        anyhow::bail!("the input device is not a TTY: -it needs a terminal (add -d to start it detached)");
    }
    // A .wasm file is stored as an image last, once the deployment is valid and the
    // program checked: a refused run stores nothing.
    let file = match wasm_file(args)? {
        Some(f) => {
            let digest = skiff_image::wasm::file_digest(&f)?;
            Some((f, digest))
        }
        None => None,
    };
    let image = match &file {
        Some((f, digest)) => skiff_image::wasm::reference_for(f, digest),
        None => args.image.clone(),
    };
    let d = deployment_from_run(args, image, file.is_some())?;
    if let Some((f, digest)) = &file {
        import_wasm_file(&cli.data, f, digest, &d.image)?;
    }
    let name = d.name.clone();
    let req = ApplyRequest { deployments: vec![d], ..Default::default() };
    let r: ApplyResponse = client(cli)?.post("/api/v1/apply", &req).await?;
    if r.unchanged.contains(&name) {
        eprintln!("deployment {name} is already running with this spec");
    }
    print_notes(&r);
    if (args.interactive || args.tty) && !args.detach {
        // As `docker run -it`: this terminal becomes the container's once it runs, with
        // what it wrote before then; the end of piped input is the end of its stdin.
        let how = super::view::Attach { no_stdin: !args.interactive, replay: true, stdin_once: true };
        return match super::view::first_running(cli, &name).await? {
            super::view::Started::Running(instance) => {
                match super::view::attach(cli, &instance, how, super::view::DEFAULT_DETACH_KEYS).await {
                    Ok(code) => Ok(code),
                    // It ended between the look and the attach: as below.
                    Err(e) => match super::view::first_running(cli, &name).await {
                        Ok(super::view::Started::Exited(instance, code)) => output_and_code(cli, &instance, code).await,
                        _ => Err(e),
                    },
                }
            }
            // Over before it could be attached (`run -t IMAGE ls`): its output and code.
            super::view::Started::Exited(instance, code) => output_and_code(cli, &instance, code).await,
        };
    }
    outln!("{name}");
    Ok(0)
}

/// What an instance that already ended wrote, and its exit code (`skiff run -t` of a
/// command over before it could be attached).
async fn output_and_code(cli: &Cli, instance: &str, code: i32) -> Result<i32> {
    let c = client(cli)?;
    super::view::logs(&c, instance, false, None, false, super::view::LogWindow::default()).await?;
    Ok(code)
}

/// `skiff delete -f FILE...` (and `skiff down -f`): what the files applied. A compose
/// file's stack goes whole, in one change (as `docker compose down`: its own project's
/// deployments only); a manifest's deployments one by one, as `kubectl delete -f`, those
/// already gone said so, not an error.
pub(super) async fn delete_files(cli: &Cli, files: &[PathBuf]) -> Result<i32> {
    let m = read_manifests(files)?;
    let c = client(cli)?;
    if let Some(stack) = m.prune_stack {
        let req = ApplyRequest { deployments: vec![], prune_stack: Some(stack.clone()), ..Default::default() };
        let r: ApplyResponse = c.post("/api/v1/apply", &req).await?;
        for name in &r.deleted {
            outln!("deployment {name} deleted");
        }
        if r.deleted.is_empty() {
            eprintln!("stack {stack} has no deployments");
        }
        return Ok(0);
    }
    for k in &m.services {
        match c.delete(&format!("/api/v1/k8s-services/{}/{}", k.stack, k.name)).await {
            // As kubectl's: the Service goes; the workloads it reached keep its ports and
            // name until they are applied again.
            Ok(()) => outln!("service {} deleted", k.name),
            Err(e) if super::view::is_status(&e, reqwest::StatusCode::NOT_FOUND) => {
                eprintln!("service {} was not there", k.name);
            }
            Err(e) => return Err(e),
        }
    }
    // A pod's other containers first: its first's delete would take them along.
    let mut order: Vec<&Deployment> = m.deployments.iter().collect();
    order.sort_by_key(|d| d.pod_of.is_none());
    for d in order {
        let name = &d.name;
        match c.delete(&format!("/api/v1/deployments/{name}")).await {
            Ok(()) => outln!("deployment {name} deleted"),
            Err(e) if super::view::is_status(&e, reqwest::StatusCode::NOT_FOUND) => {
                eprintln!("deployment {name} was not there");
            }
            Err(e) => return Err(e),
        }
    }
    Ok(0)
}

pub(super) async fn delete(cli: &Cli, kind_or_name: &str, name: Option<&String>) -> Result<i32> {
    let name = match (kind_or_name, name) {
        ("deployment" | "deployments" | "deploy", Some(n)) => n.clone(),
        ("node" | "nodes", Some(n)) => {
            client(cli)?.delete(&format!("/api/v1/nodes/{n}")).await?;
            outln!("node {n} revoked: its certificate is no longer accepted");
            return Ok(0);
        }
        (other, None) => other.to_string(),
        (other, Some(_)) => {
            bail!("cannot delete {other:?}: deployments and nodes can be deleted (skiff delete deployment|node NAME)")
        }
    };
    client(cli)?.delete(&format!("/api/v1/deployments/{name}")).await?;
    outln!("deployment {name} deleted");
    Ok(0)
}
