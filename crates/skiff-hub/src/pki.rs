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
use skiff_model::proto::JoinToken;
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

/// Writes a secret durably (mode 0600; synced, renamed into place, directory synced).
pub fn write_private(path: &Path, text: &str) -> Result<(), PkiError> {
    skiff_sys::durable::write(path, text.as_bytes(), 0o600).map_err(|e| PkiError::Io { path: e.path, source: e.source })
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
        // The certificate last: a crash in between leaves no CA (made anew at the next
        // start), never a certificate without its key.
        write_private(&key_path, &key.serialize_pem())?;
        write_private(&pem_path, &pem)?;
        Ok(Ca { key, signer, pem })
    }

    pub fn pem(&self) -> &str {
        &self.pem
    }

    /// A secret for `purpose`, derived from the CA's key (HMAC-SHA256): the same on every
    /// start and every hub sharing the CA, unknown to anyone without the key.
    pub fn derive_secret(&self, purpose: &str) -> String {
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &self.key.serialize_der());
        hex::encode(ring::hmac::sign(&key, purpose.as_bytes()).as_ref())
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
    /// asked for), is good for client authentication only, and for `ttl` from `now_ms`
    /// (back-dated by a quarter of that, at most 5 minutes, for clocks a little behind).
    pub fn sign_node(
        &self,
        node: &str,
        csr_pem: &str,
        now_ms: u64,
        ttl: std::time::Duration,
    ) -> Result<NodeCert, PkiError> {
        let mut csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| PkiError::Invalid(format!("csr: not a PEM certificate signing request: {e}")))?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, node);
        csr.params.distinguished_name = dn;
        csr.params.subject_alt_names.clear();
        csr.params.is_ca = IsCa::ExplicitNoCa;
        csr.params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        csr.params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let serial = serial_bytes()?;
        csr.params.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
        let back = (ttl / 4).min(std::time::Duration::from_secs(300));
        let not_after_ms = now_ms.saturating_add(ttl.as_millis() as u64);
        csr.params.not_before = datetime(now_ms.saturating_sub(back.as_millis() as u64))?;
        csr.params.not_after = datetime(not_after_ms)?;
        let key_sha256 = sha256_hex(rcgen::PublicKeyData::der_bytes(&csr.public_key));
        let cert = csr.signed_by(&self.signer, &self.key)?;
        // X.509 times have whole seconds.
        Ok(NodeCert {
            pem: cert.pem(),
            serial: hex::encode(serial),
            not_after_ms: not_after_ms / 1000 * 1000,
            key_sha256,
        })
    }
}

/// A signed node certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeCert {
    pub pem: String,
    /// Hex, as the TLS layer reports it for the connection.
    pub serial: String,
    pub not_after_ms: u64,
    /// The sha256 of the certified public key.
    pub key_sha256: String,
}

fn datetime(ms: u64) -> Result<time::OffsetDateTime, PkiError> {
    time::OffsetDateTime::from_unix_timestamp((ms / 1000) as i64)
        .map_err(|e| PkiError::Invalid(format!("certificate time: {e}")))
}

/// 16 random bytes from the kernel, as a positive non-zero certificate serial (RFC 5280).
fn serial_bytes() -> Result<[u8; 16], PkiError> {
    let mut b = skiff_sys::random::bytes::<16>().map_err(|e| PkiError::Invalid(e.to_string()))?;
    b[0] = (b[0] & 0x7f) | 0x01;
    Ok(b)
}

/// A random token part: 32 hex characters.
pub fn random_hex() -> Result<String, PkiError> {
    skiff_sys::random::hex(16).map_err(|e| PkiError::Invalid(e.to_string()))
}

/// A new join token for the CA with this fingerprint.
pub fn new_join_token(ca_sha256: &str) -> Result<JoinToken, PkiError> {
    Ok(JoinToken { ca_sha256: ca_sha256.to_string(), id: random_hex()?[..12].to_string(), secret: random_hex()? })
}

/// What the hub stores instead of a token's secret.
pub fn secret_hash(secret: &str) -> String {
    sha256_hex(secret.as_bytes())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A node's key and CSR, as an agent makes them.
    pub(crate) fn csr(node: &str) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(DnType::CommonName, node);
        (key.serialize_pem(), p.serialize_request(&key).unwrap().pem().unwrap())
    }

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

        let (_key, csr) = tests::csr("evil-asks-for-this-name");
        let day = std::time::Duration::from_secs(86_400);
        let now = 1_800_000_000_000;
        let c = ca.sign_node("pi-7", &csr, now, 90 * day).unwrap();
        assert_eq!(c.serial.len(), 32);
        assert_eq!(c.not_after_ms, now + 90 * 86_400_000);
        let der = first_der(&c.pem).unwrap();
        let (_, parsed) = x509_parser::parse_x509_certificate(&der).unwrap();
        assert_eq!(parsed.subject().to_string(), "CN=pi-7", "the hub names the node");
        assert_eq!(parsed.issuer().to_string(), format!("CN={CA_CN}"));
        let v = parsed.validity();
        assert_eq!(v.not_after.timestamp() * 1000, c.not_after_ms as i64, "90 days, not the year 4096");
        assert_eq!(v.not_before.timestamp() * 1000, (now - 300_000) as i64, "five minutes back for slow clocks");
        assert!(ca.sign_node("pi-7", "garbage", now, day).unwrap_err().to_string().contains("csr: not a PEM"));
    }
}
