//! The hub's identities: its own CA (made on first start), the hub's server certificate,
//! node client certificates signed from the node's CSR at join, and join tokens.
//!
//! A join token is `SK1.<ca-sha256>.<id>.<secret>`, as K3s embeds its CA hash: the agent
//! fetches the CA from the hub, trusts it only if its sha256 is the one in the token, then
//! presents `<id>.<secret>` over TLS. The hub keeps the sha256 of the secret only.
//!
//! Architecture Invariant: the CA key never leaves `<data>/pki/ca.key` (0600); node keys
//! never leave the node (the hub signs a CSR).

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum PkiError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("certificate: {0}")]
    Cert(#[from] rcgen::Error),
    #[error("{0}")]
    Invalid(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PkiError + '_ {
    move |source| PkiError::Io { path: path.to_path_buf(), source }
}

const CA_CN: &str = "skiff hub CA";

/// The hub's certificate authority.
pub struct Ca {
    key: KeyPair,
    /// Rebuilt from the key and the fixed subject on each start, to sign with; the PEM
    /// handed to clients is the one written on first start (same subject, same key).
    signer: rcgen::Certificate,
    pem: String,
}

fn ca_params() -> Result<CertificateParams, PkiError> {
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, CA_CN);
    p.distinguished_name = dn;
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    p.not_before = rcgen::date_time_ymd(2024, 1, 1);
    p.not_after = rcgen::date_time_ymd(2124, 1, 1);
    Ok(p)
}

/// Writes a secret (mode 0600, synced, renamed into place).
pub fn write_private(path: &Path, text: &str) -> Result<(), PkiError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f =
        std::fs::OpenOptions::new().create(true).write(true).truncate(true).mode(0o600).open(&tmp).map_err(io(&tmp))?;
    f.write_all(text.as_bytes()).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// The DER bytes of the first certificate in a PEM text.
pub fn first_der(pem: &str) -> Result<Vec<u8>, PkiError> {
    let p = pem::parse(pem).map_err(|e| PkiError::Invalid(format!("not a PEM certificate: {e}")))?;
    Ok(p.into_contents())
}

impl Ca {
    /// Loads `<dir>/ca.key` and `<dir>/ca.pem`, creating both on first start.
    pub fn load_or_create(dir: &Path) -> Result<Ca, PkiError> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let (key_path, pem_path) = (dir.join("ca.key"), dir.join("ca.pem"));
        if key_path.exists() && pem_path.exists() {
            let key_pem = std::fs::read_to_string(&key_path).map_err(io(&key_path))?;
            let key = KeyPair::from_pem(&key_pem)?;
            let pem = std::fs::read_to_string(&pem_path).map_err(io(&pem_path))?;
            let signer = ca_params()?.self_signed(&key)?;
            return Ok(Ca { key, signer, pem });
        }
        let key = KeyPair::generate()?;
        let signer = ca_params()?.self_signed(&key)?;
        let pem = signer.pem();
        write_private(&key_path, &key.serialize_pem())?;
        std::fs::write(&pem_path, &pem).map_err(io(&pem_path))?;
        Ok(Ca { key, signer, pem })
    }

    pub fn pem(&self) -> &str {
        &self.pem
    }

    /// The sha256 of the CA certificate (DER), as join tokens carry it.
    pub fn fingerprint(&self) -> Result<String, PkiError> {
        Ok(sha256_hex(&first_der(&self.pem)?))
    }

    /// A server certificate for the hub, valid for `names` (DNS names or IP addresses).
    pub fn server_cert(&self, names: &[String]) -> Result<(String, String), PkiError> {
        let key = KeyPair::generate()?;
        let mut p = CertificateParams::new(Vec::<String>::new())?;
        p.distinguished_name.push(DnType::CommonName, "skiff hub");
        for n in names {
            p.subject_alt_names.push(match n.parse::<std::net::IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(n.clone().try_into()?),
            });
        }
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let cert = p.signed_by(&key, &self.signer, &self.key)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// Signs a node's CSR: the certificate names the node (CN = `node`, whatever the CSR
    /// asked for) and is good for client authentication only. Returns (PEM, serial hex).
    pub fn sign_node(&self, node: &str, csr_pem: &str) -> Result<(String, String), PkiError> {
        let mut csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| PkiError::Invalid(format!("csr: not a PEM certificate signing request: {e}")))?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, node);
        csr.params.distinguished_name = dn;
        csr.params.subject_alt_names.clear();
        csr.params.is_ca = IsCa::ExplicitNoCa;
        csr.params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        csr.params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let serial: [u8; 16] = rand_bytes();
        csr.params.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
        let cert = csr.signed_by(&self.signer, &self.key)?;
        Ok((cert.pem(), hex::encode(serial)))
    }
}

/// 16 random bytes from the kernel.
fn rand_bytes() -> [u8; 16] {
    let mut b = [0u8; 16];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = std::io::Read::read_exact(&mut f, &mut b);
    }
    // Keep serials positive and non-zero (RFC 5280).
    b[0] = (b[0] & 0x7f) | 0x01;
    b
}

/// A random token part: 32 hex characters.
pub fn random_hex() -> String {
    hex::encode(rand_bytes())
}

/// A key and CSR for a node (made on the node).
pub fn node_csr(node: &str) -> Result<(String, String), PkiError> {
    let key = KeyPair::generate()?;
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    p.distinguished_name.push(DnType::CommonName, node);
    let csr = p.serialize_request(&key)?;
    Ok((key.serialize_pem(), csr.pem()?))
}

/// The parts of a join token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinToken {
    pub ca_sha256: String,
    pub id: String,
    pub secret: String,
}

impl JoinToken {
    pub fn new(ca_sha256: &str) -> Self {
        JoinToken { ca_sha256: ca_sha256.to_string(), id: random_hex()[..12].to_string(), secret: random_hex() }
    }

    pub fn parse(s: &str) -> Result<Self, PkiError> {
        let bad =
            || PkiError::Invalid("not a join token (SK1.<ca sha256>.<id>.<secret>; see `skiff token create`)".into());
        let parts: Vec<&str> = s.trim().split('.').collect();
        let [prefix, ca, id, secret] = parts.as_slice() else { return Err(bad()) };
        let hex_ok = |x: &str, n: usize| x.len() == n && x.chars().all(|c| c.is_ascii_hexdigit());
        if *prefix != "SK1" || !hex_ok(ca, 64) || !hex_ok(id, 12) || !hex_ok(secret, 32) {
            return Err(bad());
        }
        Ok(JoinToken { ca_sha256: ca.to_string(), id: id.to_string(), secret: secret.to_string() })
    }

    /// What the hub stores instead of the secret.
    pub fn secret_hash(&self) -> String {
        sha256_hex(self.secret.as_bytes())
    }
}

impl std::fmt::Display for JoinToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SK1.{}.{}.{}", self.ca_sha256, self.id, self.secret)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ca_survives_a_restart_and_signs_node_csrs() {
        let tmp = tempfile::tempdir().unwrap();
        let ca = Ca::load_or_create(tmp.path()).unwrap();
        let fp = ca.fingerprint().unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(tmp.path().join("ca.key")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        drop(ca);
        let ca = Ca::load_or_create(tmp.path()).unwrap();
        assert_eq!(ca.fingerprint().unwrap(), fp, "same CA after a restart");

        let (_key, csr) = node_csr("evil-asks-for-this-name").unwrap();
        let (cert, serial) = ca.sign_node("pi-7", &csr).unwrap();
        assert_eq!(serial.len(), 32);
        let der = first_der(&cert).unwrap();
        let (_, parsed) = x509_parser::parse_x509_certificate(&der).unwrap();
        assert_eq!(parsed.subject().to_string(), "CN=pi-7", "the hub names the node");
        assert_eq!(parsed.issuer().to_string(), format!("CN={CA_CN}"));
        assert!(ca.sign_node("pi-7", "garbage").unwrap_err().to_string().contains("csr: not a PEM"));
    }

    #[test]
    fn join_tokens_round_trip_and_reject_garbage() {
        let t = JoinToken::new(&"ab".repeat(32));
        let s = t.to_string();
        assert_eq!(JoinToken::parse(&s).unwrap(), t);
        assert_ne!(t.secret_hash(), t.secret);
        for bad in ["", "SK1.x.y.z", &s.replace("SK1", "SK2"), &format!("{s}.extra")] {
            assert!(JoinToken::parse(bad).is_err(), "{bad}");
        }
    }
}
