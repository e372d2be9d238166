//! Joining a hub (once per data directory) and the node's identity on disk.
//!
//! Trust on first use, checked: the agent fetches the hub's CA and trusts it only if its
//! sha256 is the one the join token carries (as K3s does). The node's key is made here
//! and never leaves the node; the hub signs a CSR and names the node in the certificate.
//!
//! ```text
//! <data>/pki/ca.pem       the hub's CA (pinned)
//! <data>/pki/node.key     the node's private key (0600)
//! <data>/pki/node.pem     its certificate
//! <data>/pki/node.next.*  a renewed key and certificate on their way in
//! <data>/pki/joined.json  which hub, under which name
//! <data>/pki/hubs.json    every hub of the fleet's store, as the hubs last said
//! ```
//!
//! Certificates expire (90 days by default) and are renewed over the tunnel when a third
//! of their life is left ([`crate::tunnel`]): a new key is made, its certificate written
//! as `node.next.key`/`node.next.pem`, then each renamed over the current one. A crash in
//! between is finished at the next load (the hub accepts the old certificate until it
//! first sees the new one, so either pair works).

use skiff_model::proto::{JoinRequest, JoinResponse, JoinToken, NodeSpec};
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("{path} joined {joined} before; use another --data to join {wanted}")]
    OtherHub { path: PathBuf, joined: String, wanted: String },
    #[error(
        "a join token is required to join (skiff token create, on the hub; then --token-file FILE or SKIFF_TOKEN)"
    )]
    NoToken,
    #[error("no hub given to join (--hub URL)")]
    NoHub,
    #[error(transparent)]
    BadToken(#[from] skiff_model::proto::BadToken),
    #[error("cannot reach the hub at {hub}: {message}")]
    Unreachable { hub: String, message: String },
    #[error(
        "the hub at {hub} presents CA sha256:{got}, the token names sha256:{want}: wrong hub, or someone in between"
    )]
    WrongCa { hub: String, got: String, want: String },
    #[error("the hub refused to join this node: {0}")]
    Refused(String),
    #[error("{0}")]
    Pki(String),
    #[error(
        "the certificate of node {node} expired at {expired}; on the hub, make a token to join it again \
         (skiff token create --replace {node}) and start the agent with --token-file FILE"
    )]
    Expired { node: String, expired: String },
}

/// Which hub this data directory joined, under which name.
#[derive(serde::Serialize, serde::Deserialize)]
struct Joined {
    hub: String,
    node: String,
}

/// The node's identity files.
pub struct Identity {
    pub dir: PathBuf,
}

impl Identity {
    pub fn new(data: &Path) -> Self {
        Identity { dir: data.join("pki") }
    }

    pub fn path(&self, f: &str) -> PathBuf {
        self.dir.join(f)
    }

    fn read(&self, f: &str) -> Result<String, JoinError> {
        let p = self.path(f);
        std::fs::read_to_string(&p).map_err(|e| JoinError::File { path: p, message: e.to_string() })
    }

    pub fn ca(&self) -> Result<String, JoinError> {
        self.read("ca.pem")
    }

    /// The TLS client configuration that presents the node's certificate and trusts only
    /// the hub's CA. Finishes a renewal a crash interrupted.
    pub fn tls(&self) -> Result<rustls::ClientConfig, JoinError> {
        self.finish_renewal()?;
        crate::tls::client_config(&self.ca()?, &self.read("node.pem")?, &self.read("node.key")?)
            .map_err(|e| JoinError::Pki(format!("the node's certificate: {e}")))
    }

    /// The node's certificate and key (PEM) as they are now. Finishing a renewal is left
    /// to the tunnel (`tls`), which alone installs one: a reader elsewhere (the mesh, on
    /// every call) finishing it halfway would pair the new certificate with the old key.
    pub fn current_pair(&self) -> Result<(String, String), JoinError> {
        Ok((self.read("node.pem")?, self.read("node.key")?))
    }

    /// As `tls`, with the pair as it is now (see `current_pair`).
    pub fn current_tls(&self) -> Result<rustls::ClientConfig, JoinError> {
        let (cert, key) = self.current_pair()?;
        crate::tls::client_config(&self.ca()?, &cert, &key)
            .map_err(|e| JoinError::Pki(format!("the node's certificate: {e}")))
    }

    /// When the node's certificate expires (ms since the epoch).
    pub fn not_after_ms(&self) -> Result<u64, JoinError> {
        Ok(validity(&self.read("node.pem")?)?.1)
    }

    /// (not before, not after) of the node's certificate, ms since the epoch.
    pub fn validity(&self) -> Result<(u64, u64), JoinError> {
        validity(&self.read("node.pem")?)
    }

    /// Stores a renewed key and certificate in place of the current ones.
    pub fn install_renewal(&self, key: &str, cert: &str) -> Result<(), JoinError> {
        validity(cert)?;
        self.write("node.next.key", key)?;
        self.write("node.next.pem", cert)?;
        skiff_sys::crash::point("agent.renew.written");
        self.finish_renewal()
    }

    /// Moves a complete `node.next.*` pair over the current one (key first; a crash after
    /// it leaves the certificate for the next load to move).
    fn finish_renewal(&self) -> Result<(), JoinError> {
        let (nk, np) = (self.path("node.next.key"), self.path("node.next.pem"));
        if !np.exists() {
            // A key without its certificate is a renewal that never completed.
            let _ = std::fs::remove_file(&nk);
            return Ok(());
        }
        let mv = |from: &Path, to: &str| {
            skiff_sys::durable::rename(from, &self.path(to))
                .map_err(|e| JoinError::File { path: e.path, message: e.source.to_string() })
        };
        if nk.exists() {
            mv(&nk, "node.key")?;
            skiff_sys::crash::point("agent.renew.key-moved");
        }
        mv(&np, "node.pem")
    }

    fn write(&self, f: &str, text: &str) -> Result<(), JoinError> {
        skiff_sys::durable::write(&self.path(f), text.as_bytes(), 0o600)
            .map_err(|e| JoinError::File { path: e.path, message: e.source.to_string() })
    }

    /// Every hub of the fleet's store, as the hubs last said (at the join, then over the
    /// tunnel): where the agent goes when its own hub is gone. Kept across restarts.
    pub fn learned_hubs(&self) -> Vec<String> {
        let Ok(bytes) = skiff_sys::regular::read(&self.path("hubs.json"), 64 << 10) else { return vec![] };
        let list: Vec<String> = serde_json::from_slice(&bytes).unwrap_or_default();
        skiff_model::proto::usable_hubs(&list)
    }

    /// Keeps the hubs a hub named (usable entries only); whether the list changed.
    pub fn learn_hubs(&self, hubs: &[String]) -> Result<bool, JoinError> {
        let list = skiff_model::proto::usable_hubs(hubs);
        if list.is_empty() || list == self.learned_hubs() {
            return Ok(false);
        }
        let text = serde_json::to_string_pretty(&list).map_err(|e| JoinError::Pki(e.to_string()))?;
        self.write("hubs.json", &text)?;
        Ok(true)
    }
}

/// (not before, not after) of the first certificate in a PEM text, ms since the epoch.
pub fn validity(cert_pem: &str) -> Result<(u64, u64), JoinError> {
    let p = pem::parse(cert_pem).map_err(|e| JoinError::Pki(format!("not a PEM certificate: {e}")))?;
    let (_, c) = x509_parser::parse_x509_certificate(p.contents())
        .map_err(|e| JoinError::Pki(format!("not an X.509 certificate: {e}")))?;
    let ms = |t: x509_parser::time::ASN1Time| (t.timestamp().max(0) as u64).saturating_mul(1000);
    Ok((ms(c.validity().not_before), ms(c.validity().not_after)))
}

/// A key made here and a CSR for it naming `node` (the hub names the node anyway).
pub fn node_csr(node: &str) -> Result<(String, String), JoinError> {
    let key = rcgen::KeyPair::generate().map_err(|e| JoinError::Pki(e.to_string()))?.serialize_pem();
    let csr = csr_for(&key, node)?;
    Ok((key, csr))
}

/// A CSR naming `node` for the key in `key_pem`.
fn csr_for(key_pem: &str, node: &str) -> Result<String, JoinError> {
    let pki = |e: rcgen::Error| JoinError::Pki(e.to_string());
    let key = rcgen::KeyPair::from_pem(key_pem).map_err(pki)?;
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(pki)?;
    p.distinguished_name.push(rcgen::DnType::CommonName, node);
    p.serialize_request(&key).map_err(pki)?.pem().map_err(pki)
}

/// The sha256 (hex) of the first certificate of a PEM text, as a join token names a CA.
pub fn ca_fingerprint(pem_text: &str) -> Result<String, JoinError> {
    let p = pem::parse(pem_text).map_err(|e| JoinError::Pki(format!("not a PEM certificate: {e}")))?;
    Ok(hex::encode(<sha2::Sha256 as sha2::Digest>::digest(p.contents())))
}

/// Joins the hub at `hub` unless this data directory already has; returns the node name.
pub async fn join(
    id: &Identity,
    hubs: &[String],
    token: Option<&str>,
    name: &str,
    spec: NodeSpec,
) -> Result<String, JoinError> {
    // Joined before: through one of these hubs (hubs of one store share one CA).
    if let Ok(t) = std::fs::read_to_string(id.path("joined.json")) {
        let j: Joined = serde_json::from_str(&t)
            .map_err(|e| JoinError::File { path: id.path("joined.json"), message: e.to_string() })?;
        let hub = hubs.iter().find(|h| **h == j.hub).unwrap_or(&j.hub);
        if !hubs.contains(hub) {
            return Err(JoinError::OtherHub { path: id.dir.clone(), joined: j.hub, wanted: hubs.join(",") });
        }
        return join_at(id, hub, token, name, spec).await;
    }
    // A first join through the first hub that answers (the others may be standbys).
    let mut last = JoinError::NoHub;
    for hub in hubs {
        match join_at(id, hub, token, name, spec.clone()).await {
            Err(e @ JoinError::Unreachable { .. }) => {
                tracing::warn!(%hub, error = %e, "joining: trying the next hub");
                last = e;
            }
            r => return r,
        }
    }
    Err(last)
}

async fn join_at(
    id: &Identity,
    hub: &str,
    token: Option<&str>,
    name: &str,
    spec: NodeSpec,
) -> Result<String, JoinError> {
    let joined = id.path("joined.json");
    let mut name = name.to_string();
    if let Ok(t) = std::fs::read_to_string(&joined) {
        let j: Joined =
            serde_json::from_str(&t).map_err(|e| JoinError::File { path: joined.clone(), message: e.to_string() })?;
        if j.hub != hub {
            return Err(JoinError::OtherHub { path: id.dir.clone(), joined: j.hub, wanted: hub.to_string() });
        }
        id.finish_renewal()?;
        let now = skiff_runtime::time::now_ms();
        let not_after = id.not_after_ms()?;
        if not_after > now {
            return Ok(j.node);
        }
        // Expired while the node was away: only a new token brings it back.
        if token.is_none() {
            let at = std::time::UNIX_EPOCH + Duration::from_millis(not_after);
            return Err(JoinError::Expired { node: j.node, expired: skiff_runtime::time::rfc3339_nanos(at) });
        }
        tracing::warn!(node = %j.node, "the node's certificate expired; joining again with the token given");
        // The same node, under the name it had.
        name = j.node;
    }
    let name = name.as_str();
    let token = JoinToken::parse(token.ok_or(JoinError::NoToken)?)?;
    let base = hub.trim_end_matches('/');
    let unreachable = |e: reqwest::Error| JoinError::Unreachable {
        hub: base.to_string(),
        message: skiff_image::error::with_causes(&e),
    };
    // The CA is fetched without trusting anything, then checked against the token.
    let probe = reqwest::Client::builder()
        .danger_accept_invalid_certs(true)
        .connect_timeout(Duration::from_secs(10))
        .build()
        .map_err(unreachable)?;
    let ca_pem = probe
        .get(format!("{base}/api/v1/cacerts"))
        .send()
        .await
        .and_then(|r| r.error_for_status())
        .map_err(unreachable)?
        .text()
        .await
        .map_err(unreachable)?;
    let got = ca_fingerprint(&ca_pem)?;
    if got != token.ca_sha256 {
        return Err(JoinError::WrongCa { hub: base.to_string(), got, want: token.ca_sha256 });
    }
    // The key is kept before it is used: a join whose answer is lost (a crash, a cut
    // link) is asked again with the same key, which the hub recognises as this node.
    std::fs::create_dir_all(&id.dir).map_err(|e| JoinError::File { path: id.dir.clone(), message: e.to_string() })?;
    let key = match std::fs::read_to_string(id.path("node.key")) {
        Ok(k) => k,
        Err(_) => {
            let key = rcgen::KeyPair::generate().map_err(|e| JoinError::Pki(e.to_string()))?.serialize_pem();
            id.write("node.key", &key)?;
            key
        }
    };
    skiff_sys::crash::point("agent.join.key-written");
    let csr = csr_for(&key, name)?;
    let client = pinned(&ca_pem)?;
    let req = JoinRequest { token: token.credential(), node: name.to_string(), csr, spec };
    let resp = client.post(format!("{base}/api/v1/join")).json(&req).send().await.map_err(unreachable)?;
    let status = resp.status();
    let text = resp.text().await.map_err(unreachable)?;
    if !status.is_success() {
        let msg = serde_json::from_str::<skiff_model::api::ErrorBody>(&text).map(|e| e.error).unwrap_or(text);
        return Err(JoinError::Refused(format!("{msg} ({status})")));
    }
    let resp: JoinResponse = serde_json::from_str(&text).map_err(|e| JoinError::Refused(e.to_string()))?;
    skiff_sys::crash::point("agent.join.answered");
    // The record of the join last: a crash before it leaves a node that joins again.
    id.write("node.pem", &resp.cert)?;
    id.write("ca.pem", &resp.ca)?;
    id.learn_hubs(&resp.hubs)?;
    skiff_sys::crash::point("agent.join.cert-written");
    let j = serde_json::to_vec_pretty(&Joined { hub: hub.to_string(), node: name.to_string() })
        .map_err(|e| JoinError::Pki(e.to_string()))?;
    skiff_sys::durable::write(&joined, &j, 0o600)
        .map_err(|e| JoinError::File { path: e.path, message: e.source.to_string() })?;
    Ok(name.to_string())
}

/// A client that trusts only the hub's CA (for joining).
fn pinned(ca_pem: &str) -> Result<reqwest::Client, JoinError> {
    let cert = reqwest::Certificate::from_pem(ca_pem.as_bytes()).map_err(|e| JoinError::Pki(e.to_string()))?;
    reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(cert)
        .connect_timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| JoinError::Pki(e.to_string()))
}

/// What this machine offers, as the node reports it at join.
pub fn node_spec(labels: std::collections::BTreeMap<String, String>, cdi_dirs: &[std::path::PathBuf]) -> NodeSpec {
    let (arch, variant) = skiff_model::platform::host_arch();
    let cpus = std::thread::available_parallelism().map(|n| n.get() as u64).unwrap_or(1);
    let mem_kib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| t.lines().find(|l| l.starts_with("MemTotal:")).map(str::to_string))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse::<u64>().ok()))
        .unwrap_or(0);
    NodeSpec {
        labels,
        os: "linux".into(),
        arch: arch.into(),
        variant: variant.map(str::to_string),
        cpu_millis: cpus * 1000,
        memory_bytes: mem_kib * 1024,
        runtimes: crate::runtimes(),
        versions: crate::runtime_versions(),
        devices: crate::devices::counts(&skiff_runtime::cdi::Registry::load(cdi_dirs)),
    }
}
