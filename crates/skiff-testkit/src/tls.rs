//! Certificates for tests: a fresh CA and a server certificate for 127.0.0.1 / localhost.

use std::path::{Path, PathBuf};

/// Writes `ca.pem`, `server.pem` and `server.key` into `dir`; returns their paths.
pub fn server_cert(dir: &Path) -> anyhow::Result<(PathBuf, PathBuf, PathBuf)> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
    };
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, "skiff test CA");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let ca_cert = ca.self_signed(&ca_key)?;
    let key = KeyPair::generate()?;
    let mut p = CertificateParams::new(vec!["localhost".to_string()])?;
    p.subject_alt_names.push(SanType::IpAddress("127.0.0.1".parse()?));
    p.distinguished_name.push(DnType::CommonName, "127.0.0.1");
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let cert = p.signed_by(&key, &ca_cert, &ca_key)?;
    let paths = (dir.join("ca.pem"), dir.join("server.pem"), dir.join("server.key"));
    std::fs::write(&paths.0, ca_cert.pem())?;
    std::fs::write(&paths.1, cert.pem())?;
    std::fs::write(&paths.2, key.serialize_pem())?;
    Ok(paths)
}

/// A code-signing certificate for Notation tests: a fresh root CA and a leaf
/// (`C=US, O=skiff, CN=<cn>`, key usage digital signature, extended key usage code
/// signing) issued by it, with the leaf's P-256 key.
pub struct CodeSigning {
    pub root_pem: String,
    /// The leaf, then the root (what `x5c` carries).
    pub chain_pem: String,
    /// PKCS#8.
    pub key_pem: String,
}

pub fn code_signing(cn: &str) -> anyhow::Result<CodeSigning> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose};
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, format!("{cn} root"));
    ca.distinguished_name.push(DnType::OrganizationName, "skiff");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
    let root = ca.self_signed(&ca_key)?;
    let key = KeyPair::generate()?;
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    p.distinguished_name.push(DnType::CountryName, "US");
    p.distinguished_name.push(DnType::OrganizationName, "skiff");
    p.distinguished_name.push(DnType::CommonName, cn);
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::CodeSigning];
    let leaf = p.signed_by(&key, &root, &ca_key)?;
    Ok(CodeSigning {
        root_pem: root.pem(),
        chain_pem: format!("{}{}", leaf.pem(), root.pem()),
        key_pem: key.serialize_pem(),
    })
}
