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
//! <data>/pki/joined.json  which hub, under which name
//! ```

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
    /// the hub's CA.
    pub fn tls(&self) -> Result<rustls::ClientConfig, JoinError> {
        crate::tls::client_config(&self.ca()?, &self.read("node.pem")?, &self.read("node.key")?)
            .map_err(|e| JoinError::Pki(format!("the node's certificate: {e}")))
    }

    fn write(&self, f: &str, text: &str) -> Result<(), JoinError> {
        skiff_sys::durable::write(&self.path(f), text.as_bytes(), 0o600)
            .map_err(|e| JoinError::File { path: e.path, message: e.source.to_string() })
    }
}

/// A key made here and a CSR for it naming `node` (the hub names the node anyway).
pub fn node_csr(node: &str) -> Result<(String, String), JoinError> {
    let pki = |e: rcgen::Error| JoinError::Pki(e.to_string());
    let key = rcgen::KeyPair::generate().map_err(pki)?;
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(pki)?;
    p.distinguished_name.push(rcgen::DnType::CommonName, node);
    let csr = p.serialize_request(&key).map_err(pki)?;
    Ok((key.serialize_pem(), csr.pem().map_err(pki)?))
}

/// The sha256 (hex) of the first certificate of a PEM text, as a join token names a CA.
pub fn ca_fingerprint(pem_text: &str) -> Result<String, JoinError> {
    let p = pem::parse(pem_text).map_err(|e| JoinError::Pki(format!("not a PEM certificate: {e}")))?;
    Ok(hex::encode(<sha2::Sha256 as sha2::Digest>::digest(p.contents())))
}

/// Joins the hub at `hub` unless this data directory already has; returns the node name.
pub async fn join(
    id: &Identity,
    hub: &str,
    token: Option<&str>,
    name: &str,
    spec: NodeSpec,
) -> Result<String, JoinError> {
    let joined = id.path("joined.json");
    if let Ok(t) = std::fs::read_to_string(&joined) {
        let j: Joined =
            serde_json::from_str(&t).map_err(|e| JoinError::File { path: joined.clone(), message: e.to_string() })?;
        if j.hub == hub {
            return Ok(j.node);
        }
        return Err(JoinError::OtherHub { path: id.dir.clone(), joined: j.hub, wanted: hub.to_string() });
    }
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
    let (key, csr) = node_csr(name)?;
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
    std::fs::create_dir_all(&id.dir).map_err(|e| JoinError::File { path: id.dir.clone(), message: e.to_string() })?;
    // The record of the join last: a crash before it leaves a node that joins again.
    id.write("node.key", &key)?;
    id.write("node.pem", &resp.cert)?;
    id.write("ca.pem", &resp.ca)?;
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
pub fn node_spec(labels: std::collections::BTreeMap<String, String>) -> NodeSpec {
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
    }
}
