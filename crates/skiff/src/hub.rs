//! `skiff hub`: the control plane as a networked service for many nodes, over TLS with
//! its own CA. Writes `<data>/admin.conf` (server URL, admin token, CA) for the CLI.

use crate::config::ClientConfig;
use anyhow::{Context, Result};
use clap::Args;
use skiff_hub::store::{Lead, SqliteStore, Store};
use skiff_hub::Hub;
use std::sync::Arc;
use std::time::Duration;

#[derive(Args)]
pub struct HubArgs {
    #[command(subcommand)]
    pub action: Option<HubAction>,
    /// Address to serve the API and the node endpoints on (TLS).
    #[arg(long, default_value = "0.0.0.0:7443")]
    pub listen: String,
    /// Names (DNS or IP) nodes and operators reach the hub by; go into its certificate.
    /// The first one goes into admin.conf. Loopback and this host's name are always in.
    #[arg(long = "advertise")]
    pub advertise: Vec<String>,
    /// How long node certificates are valid (renewed over the tunnel with a third left),
    /// e.g. 90d, 12h, 30m.
    #[arg(long, default_value = "90d", value_parser = crate::cli::parse_duration)]
    pub node_cert_ttl: Duration,
    /// Bound on the images the hub keeps for its nodes (pulled once from the registry,
    /// served as chunks); the least recently asked for go first. 0 proxies no images.
    #[arg(long, default_value = "20G", value_parser = parse_cache_size)]
    pub image_cache_size: u64,
    /// A node allowed to serve its site's image cache (`skiff agent --serve-cache`), which
    /// gives it the images of every node with its `site` label; repeatable.
    #[arg(long = "site-cache", value_name = "NODE")]
    pub site_caches: Vec<String>,
    /// Where the fleet's state is kept: `sqlite` (hub.db in the data directory), or
    /// `etcd://HOST:PORT[,HOST:PORT...][/PREFIX]`, shared by any number of hubs
    /// (`etcds://` for TLS, with --etcd-ca). The prefix defaults to /skiff.
    #[arg(long, default_value = "sqlite")]
    pub store: String,
    #[command(flatten)]
    pub etcd: EtcdArgs,
    #[command(flatten)]
    pub seal: SealArgs,
    /// Hubs on one etcd store: every one serves the API and nodes' tunnels, one of them
    /// runs the controllers (placement, rollouts, the autoscaler, alerts), and another
    /// takes that over within this time of its loss.
    #[arg(long, default_value = "10s", value_parser = crate::cli::parse_duration)]
    pub lease_ttl: Duration,
    /// Set by a hub that lost the store's lease and started itself again
    /// (`stand_by_again`): the milliseconds it had led. Not for operators.
    #[arg(long, hide = true)]
    pub standing_by_again: Option<u64>,
    #[command(flatten)]
    pub conns: ConnArgs,
    #[command(flatten)]
    pub autoscale: crate::up::AutoscaleArgs,
    #[command(flatten)]
    pub alerts: crate::up::AlertArgs,
}

/// The hub's state, kept apart from a running hub.
#[derive(clap::Subcommand)]
pub enum HubAction {
    /// Write everything the store holds (deployments, their history, tokens, nodes,
    /// revoked certificates, placement) and the hub's CA to FILE: a consistent copy, also
    /// while hubs run. The file holds the CA's key: it is written readable by root only.
    Backup {
        /// The backup file to write (it holds the CA's key: keep it as secret).
        #[arg(short = 'o', long, value_name = "FILE")]
        output: std::path::PathBuf,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Fill an empty store (and the data directory's CA) from a backup; a store that holds
    /// a fleet already is refused and left as it is.
    Restore {
        /// A file `skiff hub backup` wrote.
        file: std::path::PathBuf,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Copy one store into another, empty one, e.g. `--from sqlite --to etcd://HOST:2379`.
    /// Stop the hubs on the old store first; start them on the new one after.
    Migrate {
        /// `sqlite` (the data directory's hub.db), `sqlite:PATH` or `etcd://...`.
        #[arg(long)]
        from: String,
        /// The same forms as --from.
        #[arg(long)]
        to: String,
        #[command(flatten)]
        etcd: EtcdArgs,
        #[command(flatten)]
        seal: SealArgs,
    },
}

/// Which store a `skiff hub` action works on.
#[derive(Args, Clone)]
pub struct StoreArgs {
    /// `sqlite` (the data directory's hub.db), `sqlite:PATH` or
    /// `etcd://HOST:PORT[,HOST:PORT...][/PREFIX]` (`etcds://` with --etcd-ca).
    #[arg(long, default_value = "sqlite")]
    pub store: String,
    #[command(flatten)]
    pub etcd: EtcdArgs,
    #[command(flatten)]
    pub seal: SealArgs,
}

/// The key the store's secrets are sealed with.
#[derive(Args, Clone, Default)]
pub struct SealArgs {
    /// The key (base64 of 32 bytes, mode 0600) that seals the secrets the store holds
    /// (secret variables and files, the shared CA key and admin token); made on first use.
    /// Every hub of one store needs the same key. Default: <data>/pki/secrets.key.
    #[arg(long, value_name = "FILE")]
    pub secrets_key: Option<std::path::PathBuf>,
}

impl SealArgs {
    /// The key file these args name, or the data directory's.
    pub fn key(&self, data: &std::path::Path) -> Result<skiff_hub::seal::SecretKey> {
        let path = self.secrets_key.clone().unwrap_or_else(|| data.join("pki").join("secrets.key"));
        Ok(skiff_hub::seal::SecretKey::load_or_create(&path)?)
    }
}

/// A backup file: the store and the CA that signed its nodes' certificates.
#[derive(serde::Serialize, serde::Deserialize)]
struct Backup {
    skiff_hub_backup: u32,
    ca_pem: Option<String>,
    ca_key: Option<String>,
    store: skiff_hub::store::Dump,
}

pub fn action(cli: &crate::cli::Cli, action: &HubAction) -> Result<i32> {
    let data = &cli.data;
    let pki = data.join("pki");
    match action {
        HubAction::Backup { output, store } => {
            if store.store == "sqlite" && !data.join("hub.db").exists() {
                anyhow::bail!("{}: no hub store here (back up on the hub's --data, or name --store)", data.display());
            }
            let s = open_store(data, &store.store, &store.etcd, &store.seal)?;
            // The CA the store's hubs share, else this data directory's: nodes' certificates
            // are only good with it.
            let ca = fleet_ca(&*s, &pki)?.context(
                "no CA to back up: neither the store nor this data directory's pki/ holds one (use the hub's --data)",
            )?;
            let dump = s.export()?;
            let b = Backup { skiff_hub_backup: 1, ca_pem: Some(ca.0), ca_key: Some(ca.1), store: dump };
            let text = serde_json::to_string_pretty(&b)?;
            skiff_hub::pki::write_private(output, &text).with_context(|| format!("writing {}", output.display()))?;
            let d = &b.store;
            eprintln!(
                "skiff: backed up revision {} ({} deployments, {} nodes, {} tokens, the CA) to {}",
                d.revision,
                d.deployments.len(),
                d.nodes.len(),
                d.tokens.len(),
                output.display()
            );
            Ok(0)
        }
        HubAction::Restore { file, store } => {
            let text = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
            let b: Backup =
                serde_json::from_str(&text).with_context(|| format!("{}: not a skiff hub backup", file.display()))?;
            if b.skiff_hub_backup != 1 {
                anyhow::bail!(
                    "{}: a backup of format {}; this skiff reads format 1",
                    file.display(),
                    b.skiff_hub_backup
                );
            }
            let (Some(pem), Some(key)) = (&b.ca_pem, &b.ca_key) else {
                anyhow::bail!(
                    "{}: the backup holds no CA: its nodes' certificates could not be checked",
                    file.display()
                );
            };
            let ca = serde_json::to_string(&(pem, key))?;
            // Checked before anything is written: the data directory's CA and the store's
            // (hubs share one) must be the backup's or none.
            match std::fs::read_to_string(pki.join("ca.pem")) {
                Ok(p) if p == *pem => {}
                Ok(_) => anyhow::bail!(
                    "{} holds another CA than the backup's; restore into a fresh data directory",
                    pki.display()
                ),
                Err(_) => {}
            }
            let s = open_store(data, &store.store, &store.etcd, &store.seal)?;
            if s.shared_value("ca")?.is_some_and(|kept| kept != ca) {
                anyhow::bail!(
                    "{}: the store keeps another CA than the backup's; restore into an empty one",
                    store.store
                );
            }
            s.import(&b.store)?;
            s.shared("ca", &ca)?;
            if !pki.join("ca.pem").exists() {
                crate::secure_data_dir(data)?;
                std::fs::create_dir_all(&pki)?;
                skiff_hub::pki::write_private(&pki.join("ca.key"), key)?;
                skiff_hub::pki::write_private(&pki.join("ca.pem"), pem)?;
            }
            eprintln!("skiff: restored revision {} into {}", b.store.revision, store.store);
            Ok(0)
        }
        HubAction::Migrate { from, to, etcd, seal } => {
            if from == to {
                anyhow::bail!("--from and --to: the same store");
            }
            let (src, dst) = (open_store(data, from, etcd, seal)?, open_store(data, to, etcd, seal)?);
            let ca = fleet_ca(&*src, &pki)?
                .context("no CA to carry: neither --from's store nor this data directory's pki/ holds one")?;
            let ca = serde_json::to_string(&ca)?;
            if dst.shared_value("ca")?.is_some_and(|kept| kept != ca) {
                anyhow::bail!("{to}: the store keeps another CA than {from}'s; migrate into an empty one");
            }
            let dump = src.export()?;
            dst.import(&dump)?;
            // Hubs started on the new store sign and trust with the CA its nodes know.
            dst.shared("ca", &ca)?;
            anyhow::ensure!(dst.export()? == dump, "the copy in {to} differs from {from}; check both before use");
            eprintln!(
                "skiff: copied revision {} ({} deployments, {} nodes) from {from} to {to}",
                dump.revision,
                dump.deployments.len(),
                dump.nodes.len()
            );
            Ok(0)
        }
    }
}

/// The fleet's CA (certificate, key): the one the store's hubs share, else the data
/// directory's.
fn fleet_ca(store: &dyn Store, pki: &std::path::Path) -> Result<Option<(String, String)>> {
    if let Some(kept) = store.shared_value("ca")? {
        return Ok(Some(serde_json::from_str(&kept).context("the store's CA")?));
    }
    let read = |f: &str| std::fs::read_to_string(pki.join(f)).ok();
    Ok(read("ca.pem").zip(read("ca.key")))
}

/// TLS to etcd (`--store etcds://...`).
#[derive(Args, Clone, Default)]
pub struct EtcdArgs {
    /// The CA certificate (PEM) that signed etcd's server certificates.
    #[arg(long, value_name = "FILE")]
    pub etcd_ca: Option<std::path::PathBuf>,
    /// A client certificate (PEM) for etcd servers that ask for one (with --etcd-key).
    #[arg(long, value_name = "FILE", requires = "etcd_key")]
    pub etcd_cert: Option<std::path::PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, value_name = "FILE", requires = "etcd_cert")]
    pub etcd_key: Option<std::path::PathBuf>,
}

/// Opens the hub's store as `--store` says, its secrets sealed with `seal`'s key.
pub fn open_store(data: &std::path::Path, store: &str, etcd: &EtcdArgs, seal: &SealArgs) -> Result<Arc<dyn Store>> {
    let raw = open_raw_store(data, store, etcd)?;
    let key = seal.key(data)?;
    Ok(Arc::new(skiff_hub::seal::SealedStore::new(raw, key)?))
}

fn open_raw_store(data: &std::path::Path, store: &str, etcd: &EtcdArgs) -> Result<Arc<dyn Store>> {
    if store == "sqlite" || store.starts_with("sqlite:") {
        if etcd.etcd_ca.is_some() || etcd.etcd_cert.is_some() {
            anyhow::bail!("--etcd-ca, --etcd-cert: only with --store etcds://...");
        }
        let path = match store.strip_prefix("sqlite:") {
            Some("") => anyhow::bail!("--store sqlite:PATH: the path is missing"),
            Some(p) => std::path::PathBuf::from(p),
            None => data.join("hub.db"),
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let s = SqliteStore::open(&path).with_context(|| format!("opening {}", path.display()))?;
        return Ok(Arc::new(s));
    }
    if !(store.starts_with("etcd://") || store.starts_with("etcds://")) {
        anyhow::bail!("--store: {store:?} is neither sqlite nor etcd://HOST:PORT[,HOST:PORT...][/PREFIX]");
    }
    open_etcd(store, etcd)
}

#[cfg(feature = "etcd")]
fn open_etcd(store: &str, etcd: &EtcdArgs) -> Result<Arc<dyn Store>> {
    use skiff_hub::etcd::{EtcdStore, EtcdTarget, EtcdTls};
    let tls = etcd.etcd_ca.clone().map(|ca| EtcdTls { ca, cert: etcd.etcd_cert.clone(), key: etcd.etcd_key.clone() });
    if tls.is_none() && etcd.etcd_cert.is_some() {
        anyhow::bail!("--etcd-cert: goes with --etcd-ca and --store etcds://...");
    }
    let target = EtcdTarget::parse(store, tls).map_err(|e| anyhow::anyhow!("--store: {e}"))?;
    let s = EtcdStore::open(&target)?;
    tracing::info!(endpoints = ?target.endpoints, prefix = %target.prefix, "the store is on etcd");
    Ok(Arc::new(s))
}

#[cfg(not(feature = "etcd"))]
fn open_etcd(store: &str, _etcd: &EtcdArgs) -> Result<Arc<dyn Store>> {
    anyhow::bail!("--store {store}: this skiff was built without its etcd feature (cargo build --features etcd)")
}

/// Limits on the API's connections (a flood from one address cannot lock the operator out).
#[derive(Args, Clone)]
pub struct ConnArgs {
    /// The most connections open at once (agents' tunnels included); never more than the
    /// process's file limit allows.
    #[arg(long, default_value_t = 16_384)]
    pub max_connections: usize,
    /// The most connections open at once from one address (a site behind one NAT counts
    /// as one address).
    #[arg(long, default_value_t = 1024)]
    pub max_connections_per_ip: usize,
    /// New connections one address may open per second (ten times that at once): TLS
    /// handshakes cost CPU, and a flood of them must not starve the operator.
    #[arg(long, default_value_t = 100.0)]
    pub connection_rate_per_ip: f64,
}

impl ConnArgs {
    pub fn serve_config(&self, tls: Option<rustls::ServerConfig>) -> skiff_hub::serve::ServeConfig {
        let (max, per_ip, rate) = (self.max_connections, self.max_connections_per_ip, self.connection_rate_per_ip);
        skiff_hub::serve::ServeConfig::new(tls, max, per_ip, rate)
    }
}

pub async fn hub(cli: &crate::cli::Cli, args: &HubArgs) -> Result<i32> {
    if let Some(a) = &args.action {
        return action(cli, a);
    }
    use tokio::signal::unix::{signal, SignalKind};
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let data = &cli.data;
    crate::secure_data_dir(data)?;
    skiff_sys::connlimit::raise_fd_limit();
    // Started again after losing the store's lease (`stand_by_again`): the store was
    // reached before, so while it cannot be reached it is waited for rather than given up
    // on (any other error still ends the hub). One that led only briefly waits a little
    // first: a store that comes and goes does not make it start over and over.
    let again = args.standing_by_again.is_some();
    if args.standing_by_again.is_some_and(|ms| ms < 30_000) {
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
    let remembering = loop {
        match open_store(data, &args.store, &args.etcd, &args.seal) {
            Ok(s) => break Arc::new(skiff_hub::remember::Remembering::new(s)),
            Err(e) if again && matches!(e.downcast_ref(), Some(skiff_hub::store::StoreError::Etcd(_))) => {
                tracing::warn!("waiting for the store: {e:#}");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                    _ = sigint.recv() => return Ok(0),
                    _ = sigterm.recv() => return Ok(0),
                }
            }
            Err(e) => return Err(e),
        }
    };
    let store: Arc<dyn Store> = Arc::clone(&remembering) as Arc<dyn Store>;
    // Several hubs on one store: all serve, one leads (runs the controllers).
    // Unique even for hubs in containers sharing a host name and pid 1: the store fences
    // writes by it.
    let nonce = skiff_hub::pki::random_hex()?;
    let me = format!("{} (pid {}, {}) {}", skiff_agent::hostname(), std::process::id(), args.listen, &nonce[..8]);
    // Known to the other hubs of the store before it waits (when its port is known).
    if let Some(port) = args.listen.rsplit_once(':').and_then(|(_, p)| p.parse::<u16>().ok()).filter(|p| *p > 0) {
        // Registered again once it leads, if the store is away now.
        if let Err(e) = store.hubs(Some(&hub_url(&args.advertise, port))) {
            tracing::warn!("registering this hub with the store: {e}");
        }
    }
    let mut lead = store.campaign(&me, args.lease_ttl);
    let ca = shared_ca(&*store, &data.join("pki"))?;
    let listener =
        tokio::net::TcpListener::bind(&args.listen).await.with_context(|| format!("listening on {}", args.listen))?;
    let addr = listener.local_addr()?;
    let tls = server_tls(&ca, addr, &args.advertise)?;
    let ca_pem = ca.pem().to_string();
    let pushed = Arc::new(Pushed::open(data)?);
    let lookup = platform_lookup(cli, Arc::clone(&pushed))?;
    let clock = skiff_hub::clock::system();
    let mut fleet = skiff_hub::fleet::Fleet::new(ca, Arc::clone(&store), Arc::clone(&clock))?
        .with_platform_lookup(lookup)
        .with_cert_ttl(args.node_cert_ttl)
        .with_site_caches(args.site_caches.iter().cloned());
    if args.image_cache_size > 0 {
        fleet = fleet.with_image_proxy(image_proxy(cli, args.image_cache_size, pushed)?);
    }
    // On a shared store, placement waits for the lease; alone, this hub leads.
    fleet.set_leads(lead.is_none());
    let fleet = Arc::new(fleet);
    let admin_token = store.shared("admin_token", &crate::up::admin_token(data)?)?;
    let conf_path = data.join("admin.conf");
    let server = hub_url(&args.advertise, addr.port());
    // The other hubs of the store go into admin.conf too (the CLI uses whichever
    // answers), and again whenever one is added.
    let conf = ClientConfig { server: server.clone(), token: admin_token.clone(), ca: Some(ca_pem), servers: vec![] };
    // Nodes are told every hub (this one first), to follow when theirs goes away.
    let with_me = |all: Vec<String>, me: &str| -> Vec<String> {
        std::iter::once(me.to_string()).chain(all.into_iter().filter(|h| h != me)).collect()
    };
    let all = with_me(store.hubs(Some(&server))?, &server);
    fleet.set_hubs(&all);
    let mut known = all[1..].to_vec();
    crate::config::write(&conf_path, &ClientConfig { servers: known.clone(), ..conf.clone() })?;
    let (store2, conf_path2, server2, fleet2) =
        (Arc::clone(&store), conf_path.clone(), server.clone(), Arc::clone(&fleet));
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(10)).await;
            let s = Arc::clone(&store2);
            let Ok(Ok(all)) = tokio::task::spawn_blocking(move || s.hubs(None)).await else { continue };
            let all = with_me(all, &server2);
            fleet2.set_hubs(&all);
            let now: Vec<String> = all[1..].to_vec();
            if now != known {
                known = now;
                if let Err(e) =
                    crate::config::write(&conf_path2, &ClientConfig { servers: known.clone(), ..conf.clone() })
                {
                    tracing::warn!(error = %e, "writing admin.conf");
                }
            }
        }
    });
    // What the other hubs' nodes are, asked of them each second (and who leads).
    let peers = lead.is_some().then(|| {
        let f = Arc::clone(&fleet);
        tokio::spawn(crate::hub_peers::run(f, server.clone(), admin_token.clone()))
    });
    let nodes_told = Arc::clone(&fleet);
    let hub = Arc::new(
        Hub::new(Arc::clone(&store), Arc::new(skiff_hub::nodes::Remote(fleet)), admin_token)
            .with_clock(clock)
            .with_autoscaler(args.autoscale.config(15))
            .with_alerts(args.alerts.load()?),
    );
    let every = crate::up::every(&args.autoscale, &args.alerts);
    // A lone hub places once before serving; then joins and returning nodes within a
    // second. On a shared store, the hub that leads does, from when it leads.
    let mut controllers = None;
    if lead.is_none() {
        hub.sync_nodes()?;
        controllers = Some(skiff_hub::controllers::spawn(Arc::clone(&hub), every));
    }
    let (_stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let serving = args.conns.serve_config(Some(tls));
    let mut server_task =
        tokio::spawn(skiff_hub::serve::serve(listener, skiff_hub::api::router(Arc::clone(&hub)), serving, stop_rx));
    eprintln!("skiff: hub on {server} (listening on {addr}), config in {}", conf_path.display());
    crate::notify_ready();
    let mut led_since = std::time::Instant::now();
    let ttl = args.lease_ttl;
    let why = loop {
        let leading = controllers.is_some();
        let abort = controllers.as_ref().map(|c| c.abort_handle());
        let controllers_died = async {
            match controllers.as_mut() {
                Some(c) => c.await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = sigint.recv() => break None,
            _ = sigterm.recv() => break None,
            r = &mut server_task => {
                if let Some(a) = abort {
                    a.abort();
                }
                return Err(crate::role_died("the API server", r));
            }
            r = controllers_died => {
                server_task.abort();
                return Err(crate::role_died("the controllers", r));
            }
            why = store_gone({ let r = Arc::clone(&remembering); move || r.answers() }, ttl), if lead.is_some() && !leading => {
                break Some(why);
            }
            l = next_lead(&mut lead) => match l {
                Lead::Active if !leading => {
                    // In a task of its own: the store's lease lost meanwhile is heard here.
                    let h = Arc::clone(&hub);
                    controllers = Some(tokio::spawn(async move {
                        let took = Arc::clone(&h);
                        match tokio::task::spawn_blocking(move || took.take_lead()).await {
                            Ok(Err(e)) => tracing::warn!("placing on taking the lead: {e}"),
                            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                            _ => {}
                        }
                        eprintln!("skiff: hub leads its store; it runs the controllers");
                        skiff_hub::controllers::run(h, every).await
                    }));
                    led_since = std::time::Instant::now();
                }
                Lead::Standby(Some(who)) => eprintln!("skiff: hub serving; {who} leads the store, and this hub stands by to lead"),
                Lead::Lost(why) => break Some(why),
                _ => {}
            },
        }
    };
    if let Some(why) = why {
        if let Some(c) = controllers.take() {
            c.abort();
        }
        nodes_told.set_leads(false);
        // Cut off: it serves what it last read (nodes' tunnels, logs and exec too) and
        // changes nothing, until the store answers again or another hub leads.
        remembering.cut_off(&why);
        nodes_told.set_cut_off();
        eprintln!("skiff: hub cut off from its store ({why}); serving what it last read, changing nothing");
        tokio::select! {
            _ = sigint.recv() => {}
            _ = sigterm.recv() => {}
            r = &mut server_task => return Err(crate::role_died("the API server", r)),
            how = until_the_store_or_a_peer({ let r = Arc::clone(&remembering); move || r.answers() }, Arc::clone(&nodes_told)) => {
                server_task.abort();
                if let Some(p) = peers {
                    p.abort();
                }
                eprintln!("skiff: {how}; standing by again");
                // Its lease given up where the store hears (another hub then need
                // not wait it out).
                let s = Arc::clone(&store);
                let _ = tokio::time::timeout(Duration::from_secs(2), tokio::task::spawn_blocking(move || s.resign())).await;
                return Err(stand_by_again(led_since.elapsed()));
            }
        }
    }
    if let Some(c) = controllers {
        c.abort();
    }
    if let Some(p) = peers {
        p.abort();
    }
    server_task.abort();
    // A standby takes over now rather than after the lease runs out.
    store.resign();
    eprintln!("skiff: hub stopped");
    Ok(0)
}

/// While cut off from the store: returns once the store answers again, or once another
/// hub of the store says it leads (this one's nodes should move to a hub that reaches the
/// store). Asked every 2 s.
async fn until_the_store_or_a_peer(
    answers: impl Fn() -> bool + Clone + Send + 'static,
    fleet: Arc<skiff_hub::fleet::Fleet>,
) -> String {
    loop {
        let ask = answers.clone();
        if tokio::task::spawn_blocking(ask).await.unwrap_or(false) {
            return "the store answers again".into();
        }
        if let Some(p) = fleet.leading_peer() {
            return format!("the hub at {p} leads now");
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// For a hub that does not lead: returns why once the store has not answered for `ttl`
/// (asked every 2 s), as the lead of one that does would be lost by then.
async fn store_gone(answers: impl Fn() -> bool + Clone + Send + 'static, ttl: Duration) -> String {
    let mut since: Option<std::time::Instant> = None;
    loop {
        let ask = answers.clone();
        if tokio::task::spawn_blocking(ask).await.unwrap_or(false) {
            since = None;
        } else if since.get_or_insert_with(std::time::Instant::now).elapsed() >= ttl {
            return format!("the store did not answer for {} s", ttl.as_secs());
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// The campaign's next news (never, for a store no hubs campaign for).
async fn next_lead(lead: &mut Option<tokio::sync::watch::Receiver<Lead>>) -> Lead {
    let Some(l) = lead.as_mut() else { return std::future::pending().await };
    if l.changed().await.is_err() {
        return Lead::Lost("the store's campaign ended".into());
    }
    let now = l.borrow_and_update().clone();
    now
}

/// A hub that lost the store's lease (the store out of reach, or another hub leading)
/// starts again as the same program with the same arguments: every connection of its
/// time as the active hub closes (nodes move to the hub that leads), nothing it held in
/// memory survives, and it stands by — waiting for the store if need be — to lead again.
/// Only if that fails does it exit (the error says so).
fn stand_by_again(led: Duration) -> anyhow::Error {
    use std::os::unix::process::CommandExt;
    let mut args = std::env::args_os();
    let arg0 = args.next().unwrap_or_default();
    // The flag of an earlier start again is replaced, not repeated.
    let mut kept = vec![];
    while let Some(a) = args.next() {
        if a == "--standing-by-again" {
            args.next();
        } else if !a.to_string_lossy().starts_with("--standing-by-again=") {
            kept.push(a);
        }
    }
    let led = format!("--standing-by-again={}", led.as_millis());
    let e = std::process::Command::new("/proc/self/exe").arg0(arg0).args(kept).arg(led).exec();
    anyhow::anyhow!("this hub is no longer the active one, and starting it again to stand by failed: {e}")
}

/// The URL operators and agents reach this hub by.
fn hub_url(advertise: &[String], port: u16) -> String {
    let host = advertise.first().cloned().unwrap_or_else(|| "127.0.0.1".into());
    let host = if host.contains(':') { format!("[{host}]") } else { host };
    format!("https://{host}:{port}")
}

/// The hub's CA: the one every hub of the store shares (this data directory's, if the
/// store had none yet), kept in the data directory too.
fn shared_ca(store: &dyn Store, pki: &std::path::Path) -> Result<skiff_hub::pki::Ca> {
    let local = skiff_hub::pki::Ca::load_or_create(pki)?;
    let mine = ca_json(pki)?;
    let kept = store.shared("ca", &mine)?;
    if kept == mine {
        return Ok(local);
    }
    let (pem, key): (String, String) = serde_json::from_str(&kept).context("the store's CA")?;
    // The key first, as the CA is made: never a certificate without its key.
    skiff_hub::pki::write_private(&pki.join("ca.key"), &key)?;
    skiff_hub::pki::write_private(&pki.join("ca.pem"), &pem)?;
    tracing::info!("took the CA the other hubs of the store share");
    Ok(skiff_hub::pki::Ca::load_or_create(pki)?)
}

/// The data directory's CA, as the store shares it.
fn ca_json(pki: &std::path::Path) -> Result<String> {
    let read =
        |f: &str| std::fs::read_to_string(pki.join(f)).with_context(|| format!("reading {}", pki.join(f).display()));
    Ok(serde_json::to_string(&(read("ca.pem")?, read("ca.key")?))?)
}

/// The hub's TLS: a server certificate from its CA naming `advertise`, loopback, this
/// host's name and the address it listens on.
pub fn server_tls(
    ca: &skiff_hub::pki::Ca,
    addr: std::net::SocketAddr,
    advertise: &[String],
) -> Result<rustls::ServerConfig> {
    let mut names = advertise.to_vec();
    names.extend(["127.0.0.1".to_string(), "::1".to_string(), "localhost".to_string(), skiff_agent::hostname()]);
    if !addr.ip().is_unspecified() {
        names.push(addr.ip().to_string());
    }
    names.dedup();
    let (cert, key) = ca.server_cert(&names)?;
    skiff_hub::tls::server_config(&cert, &key, ca.pem()).map_err(anyhow::Error::msg)
}

fn parse_cache_size(s: &str) -> Result<u64, String> {
    skiff_model::parse_bytes(s).map_err(|e| e.to_string())
}

/// The images operators pushed to this hub (built where no registry is named): served to
/// nodes from the hub's store without asking a registry, never evicted. Kept in
/// `<data>/pushed-images.json`.
pub(crate) struct Pushed {
    path: std::path::PathBuf,
    refs: std::sync::Mutex<std::collections::BTreeSet<String>>,
}

/// The largest image archive a push may send.
const MAX_PUSH_BYTES: u64 = 8 << 30;

impl Pushed {
    fn open(data: &std::path::Path) -> Result<Self> {
        let path = data.join("pushed-images.json");
        let refs = match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).with_context(|| format!("{}", path.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Default::default(),
            Err(e) => return Err(e).with_context(|| format!("{}", path.display())),
        };
        Ok(Pushed { path, refs: std::sync::Mutex::new(refs) })
    }

    fn contains(&self, reference: &str) -> bool {
        let r = skiff_image::normalize_reference(reference);
        self.refs.lock().is_ok_and(|s| s.contains(&r))
    }

    fn add(&self, refs: &[String]) -> std::io::Result<()> {
        self.change(|set| set.extend(refs.iter().map(|r| skiff_image::normalize_reference(r))))
    }

    fn remove(&self, reference: &str) -> std::io::Result<()> {
        self.change(|set| {
            set.remove(&skiff_image::normalize_reference(reference));
        })
    }

    /// Changes the set on disk first, then in memory: they never disagree.
    fn change(&self, f: impl FnOnce(&mut std::collections::BTreeSet<String>)) -> std::io::Result<()> {
        let mut set = self.refs.lock().map_err(|_| std::io::Error::other("lock poisoned"))?;
        let mut next = set.clone();
        f(&mut next);
        let bytes = serde_json::to_vec(&next).map_err(std::io::Error::other)?;
        skiff_sys::durable::write(&self.path, &bytes, 0o600).map_err(std::io::Error::other)?;
        *set = next;
        Ok(())
    }

    /// Streams an OCI archive into `store` as `reference`, tagged by digest as well.
    async fn take(
        self: Arc<Self>,
        store: Arc<skiff_image::ImageStore>,
        reference: String,
        digest: Option<String>,
        body: axum::body::Body,
    ) -> Result<skiff_model::api::ImagePushed, (u16, String)> {
        use futures_util::StreamExt;
        use tokio::io::AsyncWriteExt;
        skiff_image::registry::RemoteRef::parse(&reference).map_err(|e| (400, e.to_string()))?;
        if reference.contains('@') {
            return Err((400, format!("{reference}: push a tag, not a digest")));
        }
        let reference = skiff_image::normalize_reference(&reference);
        // Only names no registry serves: a push never shadows a registry's image.
        if !reference.starts_with("localhost/") {
            return Err((400, format!("{reference}: only localhost/NAME images are pushed (a built service's)")));
        }
        let internal = |e: &dyn std::fmt::Display| (500, e.to_string());
        // The same build again: tagged, nothing sent (404: not here, send it).
        if let Some(d) = digest {
            let by_digest = format!("{}@{d}", skiff_image::reference_name(&reference));
            let not_here = || (404, format!("{by_digest} is not here: send its archive"));
            if !self.contains(&by_digest) {
                return Err(not_here());
            }
            let (st, r, dd) = (Arc::clone(&store), reference.clone(), d.clone());
            let tagged = tokio::task::spawn_blocking(move || st.tag(&r, &dd)).await.map_err(|e| internal(&e))?;
            if tagged.is_err() {
                // Recorded, but the store lost it: forgotten, and asked for again.
                let _ = self.remove(&by_digest);
                return Err(not_here());
            }
            self.add(std::slice::from_ref(&reference)).map_err(|e| internal(&e))?;
            return Ok(skiff_model::api::ImagePushed { reference, digest: d });
        }
        let dir = store.root().join("tmp");
        tokio::fs::create_dir_all(&dir).await.map_err(|e| internal(&e))?;
        let archive =
            Removed(dir.join(format!("push-{}.tar", skiff_hub::pki::random_hex().map_err(|e| internal(&e))?)));
        let mut file = tokio::fs::File::create(&archive.0).await.map_err(|e| internal(&e))?;
        let mut stream = body.into_data_stream();
        let mut total = 0u64;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| (400, format!("reading the archive: {e}")))?;
            total += chunk.len() as u64;
            if total > MAX_PUSH_BYTES {
                let most = skiff_model::format_bytes(MAX_PUSH_BYTES);
                return Err((413, format!("an image archive may be {most} at most")));
            }
            file.write_all(&chunk).await.map_err(|e| internal(&e))?;
        }
        file.sync_all().await.map_err(|e| internal(&e))?;
        drop(file);
        // Loaded and recorded to the end even if the request goes away meanwhile (a
        // large image on a small hub): a later push finds it by its digest.
        let (me, r) = (Arc::clone(&self), reference.clone());
        let done = tokio::task::spawn_blocking(move || -> Result<String, (u16, String)> {
            let bad = |e: skiff_image::ImageError| (400, skiff_image::error::with_causes(&e));
            let names = store.load(&archive.0, Some(&r)).map_err(bad)?;
            if names != [r.clone()] {
                return Err((400, format!("the archive names {names:?}: one image, {r}, is expected")));
            }
            let digest = store.top_digest(&r).map_err(bad)?;
            let by_digest = format!("{}@{digest}", skiff_image::reference_name(&r));
            store.tag(&by_digest, &digest).map_err(bad)?;
            me.add(&[r.clone(), by_digest]).map_err(|e| (500, e.to_string()))?;
            tracing::info!(image = %r, %digest, "image pushed: offered to the nodes that run it");
            drop(archive);
            Ok(digest)
        });
        let digest = done.await.map_err(|e| internal(&e))??;
        Ok(skiff_model::api::ImagePushed { reference, digest })
    }
}

/// A file removed when dropped (a push's archive, whatever happens to the request).
struct Removed(std::path::PathBuf);

impl Drop for Removed {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The image proxy over `<data>/images`: pulls with the hub's registries settings, keeps
/// at most `limit` bytes (least recently resolved images evicted first; pushed images
/// are served from the store as they are, and kept).
fn image_proxy(cli: &crate::cli::Cli, limit: u64, pushed: Arc<Pushed>) -> Result<skiff_hub::fleet::ImageProxy> {
    use skiff_image::proxy::{self, ResolveRequest};
    let store = Arc::new(skiff_image::ImageStore::open(cli.data.join("images"))?);
    let opts = skiff_image::registry::PullOptions { progress: Arc::new(|_| {}), ..crate::cli::pull_options(cli)? };
    let used = Arc::new(std::sync::Mutex::new(std::collections::BTreeMap::<String, u64>::new()));
    let flights = Arc::new(proxy::Flights::default());
    // The layers each node was answered with: the only ones it may ask chunks of.
    let served =
        Arc::new(std::sync::Mutex::new(std::collections::HashMap::<String, std::collections::HashSet<String>>::new()));
    let (st, sv, pu) = (Arc::clone(&store), Arc::clone(&served), Arc::clone(&pushed));
    let resolve: skiff_hub::fleet::ImageCall = Arc::new(move |node: String, body: Vec<u8>| {
        let (store, opts, used, flights) = (Arc::clone(&st), opts.clone(), Arc::clone(&used), Arc::clone(&flights));
        let (served, pushed) = (Arc::clone(&sv), Arc::clone(&pu));
        Box::pin(async move {
            let req: ResolveRequest = serde_json::from_slice(&body).map_err(|e| (400, format!("request: {e}")))?;
            skiff_image::registry::RemoteRef::parse(&req.reference).map_err(|e| (400, e.to_string()))?;
            let _one = flights.enter(&req.reference).await;
            let status_of = |e: skiff_image::ImageError| {
                let status = match e {
                    skiff_image::ImageError::BadPlatform(_) | skiff_image::ImageError::NoPlatform { .. } => 400,
                    skiff_image::ImageError::NotFound(_) => 404,
                    _ => 502,
                };
                (status, skiff_image::error::with_causes(&e))
            };
            // A pushed image has no registry: the store's is the one.
            let own = pushed.contains(&req.reference);
            let r = if own {
                let platform = skiff_image::registry::parse_platform(&req.platform).map_err(status_of)?;
                let (st, reference) = (Arc::clone(&store), req.reference.clone());
                tokio::task::spawn_blocking(move || {
                    // Built for one platform: a node of another gets no image to fail on.
                    let built = skiff_image::registry::parse_platform(&st.inspect(&reference)?.platform)?;
                    if (built.os.as_str(), built.architecture.as_str())
                        != (platform.os.as_str(), platform.architecture.as_str())
                    {
                        return Err(skiff_image::ImageError::NotFound(format!(
                            "{reference} was built for {}/{}, not {}/{}",
                            built.os, built.architecture, platform.os, platform.architecture
                        )));
                    }
                    st.resolved(&reference, &platform)
                })
                .await
                .map_err(|e| (500, e.to_string()))?
                .map_err(status_of)?
            } else {
                proxy::resolve(Arc::clone(&store), &req, &opts).await.map_err(status_of)?
            };
            if let Ok(mut s) = served.lock() {
                s.entry(node).or_default().extend(r.layers.iter().map(|l| l.diff_id.clone()));
            }
            if own {
                return serde_json::to_vec(&r).map_err(|e| (500, e.to_string()));
            }
            let order = {
                let mut u = used.lock().map_err(|_| (500, "lock poisoned".to_string()))?;
                u.insert(r.reference.clone(), skiff_runtime::time::now_ms());
                let mut v: Vec<(u64, String)> = u.iter().map(|(k, t)| (*t, k.clone())).collect();
                v.sort();
                v.into_iter().map(|(_, k)| k).collect::<Vec<_>>()
            };
            let st = Arc::clone(&store);
            let evicted = tokio::task::spawn_blocking(move || st.evict_lru(limit, &order)).await;
            if let Ok(Ok(gone)) = &evicted {
                if let Ok(mut u) = used.lock() {
                    for g in gone {
                        u.remove(g);
                    }
                }
            }
            serde_json::to_vec(&r).map_err(|e| (500, e.to_string()))
        })
    });
    let store_push = Arc::clone(&store);
    let chunks: skiff_hub::fleet::ImageCall = Arc::new(move |node: String, body: Vec<u8>| {
        let store = Arc::clone(&store);
        let layers = served.lock().ok().and_then(|s| s.get(&node).cloned()).unwrap_or_default();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || store.proxy_chunks(&body, &layers))
                .await
                .map_err(|e| (500, e.to_string()))?
                .map_err(|e| (404, skiff_image::error::with_causes(&e)))
        })
    });
    let push: skiff_hub::fleet::ImagePush =
        Arc::new(move |reference: String, digest: Option<String>, body: axum::body::Body| {
            let (store, pushed) = (Arc::clone(&store_push), Arc::clone(&pushed));
            Box::pin(async move { pushed.take(store, reference, digest, body).await })
        });
    Ok(skiff_hub::fleet::ImageProxy { resolve, chunks, push: Some(push) })
}

/// The hub reads an image's platforms from its registry (mirrors and CA as a pull would
/// use them, from `--registries`): Linux ones only, so attestation entries (`unknown/unknown`)
/// and other systems' images do not count.
fn platform_lookup(cli: &crate::cli::Cli, pushed: Arc<Pushed>) -> Result<skiff_hub::fleet::PlatformLookup> {
    let opts = skiff_image::registry::PullOptions { progress: Arc::new(|_| {}), ..crate::cli::pull_options(cli)? };
    let images = cli.data.join("images");
    Ok(Arc::new(move |image: String| {
        let opts = opts.clone();
        // A pushed image's platform is the one it was built for, as stored here.
        let own = pushed.contains(&image).then(|| images.clone());
        Box::pin(async move {
            if let Some(root) = own {
                let info = tokio::task::spawn_blocking(move || skiff_image::ImageStore::open(root)?.inspect(&image))
                    .await
                    .map_err(|e| e.to_string())?
                    .map_err(|e| e.to_string())?;
                let mut parts = info.platform.splitn(3, '/').skip(1);
                let arch = parts.next().unwrap_or_default().to_string();
                return Ok(vec![(arch, parts.next().map(str::to_string))]);
            }
            let all = skiff_image::registry::platforms(&image, &opts).await.map_err(|e| e.to_string())?;
            Ok(all.into_iter().filter(|p| p.os == "linux").map(|p| (p.architecture, p.variant)).collect())
        })
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Cut off, a hub starts over once the store answers, or once another hub of the
    /// store says it leads and is not cut off (the nodes should move to one that reaches
    /// the store); not before.
    #[tokio::test]
    async fn a_cut_off_hub_waits_for_the_store_or_a_leading_peer() {
        let t = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&t.path().join("hub.db")).unwrap());
        let ca = skiff_hub::pki::Ca::load_or_create(&t.path().join("pki")).unwrap();
        let fleet = Arc::new(skiff_hub::fleet::Fleet::new(ca, store, skiff_hub::clock::system()).unwrap());
        let asked = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = Arc::clone(&asked);
        let back = move || count.fetch_add(1, std::sync::atomic::Ordering::SeqCst) >= 1;
        assert_eq!(until_the_store_or_a_peer(back, Arc::clone(&fleet)).await, "the store answers again");
        assert_eq!(asked.load(std::sync::atomic::Ordering::SeqCst), 2, "asked again after a wait");

        // A peer that stands by, or leads but is cut off itself, is no reason; one that
        // leads is.
        let said = |leads: bool, cut_off: bool| skiff_hub::fleet::PeerState {
            epoch: "e".into(),
            generation: 0,
            full: true,
            leads,
            cut_off,
            nodes: vec![],
        };
        fleet.merge_peer_state("https://b:1", said(false, false));
        fleet.merge_peer_state("https://c:1", said(true, true));
        let waited =
            tokio::time::timeout(Duration::from_secs(3), until_the_store_or_a_peer(|| false, Arc::clone(&fleet)));
        assert!(waited.await.is_err(), "still cut off");
        fleet.merge_peer_state("https://c:1", said(true, false));
        let how = until_the_store_or_a_peer(|| false, fleet).await;
        assert_eq!(how, "the hub at https://c:1 leads now");
    }

    fn archive_of(dir: &std::path::Path) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        b.append_dir_all(".", dir).unwrap();
        b.into_inner().unwrap()
    }

    /// A pushed image: kept under its tag and digest, asked for again by digest without
    /// its archive, never under a registry's name, and its archive gone in every case.
    #[tokio::test]
    async fn a_pushed_image_is_kept_by_tag_and_digest() {
        let t = tempfile::tempdir().unwrap();
        let store = Arc::new(skiff_image::ImageStore::open(t.path().join("images")).unwrap());
        let pushed = Arc::new(Pushed::open(t.path()).unwrap());
        let push = |r: &str, d: Option<&str>, body: Vec<u8>| {
            Arc::clone(&pushed).take(
                Arc::clone(&store),
                r.to_string(),
                d.map(str::to_string),
                axum::body::Body::from(body),
            )
        };
        let e = push("docker.io/library/nginx:1", None, vec![]).await.unwrap_err();
        assert_eq!(e.0, 400, "{e:?}");
        assert!(e.1.contains("only localhost/NAME images"), "{e:?}");
        let e = push("localhost/app:1", Some(&format!("sha256:{}", "a".repeat(64))), vec![]).await.unwrap_err();
        assert_eq!(e.0, 404, "not here: send it");
        assert_eq!(push("localhost/app:1", None, b"not a tar".to_vec()).await.unwrap_err().0, 400);

        let layout = t.path().join("layout");
        skiff_testkit::ImageBuilder::busybox().unwrap().write_oci_layout(&layout, "localhost/app:1").unwrap();
        let p = push("localhost/app:1", None, archive_of(&layout)).await.unwrap();
        assert_eq!(p.reference, "localhost/app:1");
        let by_digest = format!("localhost/app@{}", p.digest);
        assert!(pushed.contains("localhost/app:1") && pushed.contains(&by_digest));
        assert_eq!(store.top_digest(&by_digest).unwrap(), p.digest);
        // Again by digest: tagged, nothing sent.
        let again = push("localhost/app:1", Some(&p.digest), vec![]).await.unwrap();
        assert_eq!(again.digest, p.digest);
        // Kept across a restart of the hub.
        assert!(Pushed::open(t.path()).unwrap().contains(&by_digest));
        let tmp: Vec<_> =
            std::fs::read_dir(t.path().join("images/tmp")).unwrap().flatten().map(|e| e.file_name()).collect();
        assert!(!tmp.iter().any(|n| n.to_string_lossy().starts_with("push-")), "archives removed: {tmp:?}");
    }
}
