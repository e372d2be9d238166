//! Notation (Notary Project) signatures: a JWS envelope (`application/jose+json`) in an
//! artifact whose `subject` is the signed manifest, found through the OCI referrers API or
//! its tag fallback (`sha256-<hex>`, an index). Verified as `notation verify` does for the
//! `notary.x509` and `notary.x509.signingAuthority` schemes, without the network:
//!
//! * the envelope: `cty` is Notation's payload, every `crit` header is one this verifier
//!   knows (a signature that needs a verification plugin is refused), the expiry has not
//!   passed;
//! * the signature: by the first certificate of `x5c` (`PS256`/`PS384`/`PS512`,
//!   `ES256`/`ES384`) over the protected header and the payload;
//! * the chain: each certificate signed by the next, every issuer a CA, all valid now; the
//!   last one is in the trust store or signed by a certificate in it; the signing
//!   certificate may sign (key usage) code (extended key usage);
//! * the identity: the signing certificate's subject holds every attribute of one of the
//!   trusted identities (`x509.subject: C=US, ST=WA, O=Example, CN=signer`), or `*`;
//! * the payload: its `targetArtifact` is the image's manifest digest.
//!
//! Not checked: RFC 3161 timestamps (certificates must be valid now) and revocation (CRL
//! and OCSP need the network). COSE envelopes are refused with a message saying so.

use crate::trust::KeyError;
use base64::Engine;
use ring::signature::{self as sig, UnparsedPublicKey};
use serde::Deserialize;
use x509_parser::prelude::{FromDer, X509Certificate};

/// The artifact type (and config media type) of a Notation signature manifest.
pub const ARTIFACT_TYPE: &str = "application/vnd.cncf.notary.signature";
/// The media type of a JWS envelope.
pub const JWS: &str = "application/jose+json";
/// The media type of a COSE envelope (not verified by skiff).
pub const COSE: &str = "application/cose";
const PAYLOAD_CTY: &str = "application/vnd.cncf.notary.payload.v1+json";
const SCHEME: &str = "io.cncf.notary.signingScheme";
const SIGNING_TIME: &str = "io.cncf.notary.signingTime";
const AUTHENTIC_TIME: &str = "io.cncf.notary.authenticSigningTime";
const EXPIRY: &str = "io.cncf.notary.expiry";

/// A certificate of a trust store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Certificate {
    der: Vec<u8>,
    /// Its subject, for messages.
    pub subject: String,
}

impl Certificate {
    /// Every `CERTIFICATE` of a PEM text (a trust store file may hold several).
    pub fn from_pem_bundle(pem: &str) -> Result<Vec<Certificate>, KeyError> {
        let mut out = vec![];
        for p in x509_parser::pem::Pem::iter_from_buffer(pem.as_bytes()) {
            let p = p.map_err(|e| KeyError::Pem(e.to_string()))?;
            if p.label != "CERTIFICATE" {
                return Err(KeyError::Label(format!("{} (want CERTIFICATE)", p.label)));
            }
            let (_, c) = X509Certificate::from_der(&p.contents).map_err(|e| KeyError::Der(e.to_string()))?;
            out.push(Certificate { subject: c.subject().to_string(), der: p.contents.clone() });
        }
        if out.is_empty() {
            return Err(KeyError::Pem("no CERTIFICATE in it".into()));
        }
        Ok(out)
    }
}

/// Whom a trust store's certificates are trusted to vouch for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    /// `*`: any signing certificate the trust store vouches for.
    Any,
    /// `x509.subject: C=US, ST=WA, O=Example, CN=signer`: attributes the signing
    /// certificate's subject must all hold.
    Subject(Vec<(String, String)>),
}

impl Identity {
    pub fn parse(s: &str) -> Result<Identity, String> {
        if s.trim() == "*" {
            return Ok(Identity::Any);
        }
        let dn = s
            .trim()
            .strip_prefix("x509.subject:")
            .ok_or_else(|| format!("{s:?} is neither \"*\" nor \"x509.subject: <distinguished name>\""))?;
        let attrs =
            parse_dn(dn).ok_or_else(|| format!("{dn:?} is not a distinguished name (C=US, O=Example, CN=signer)"))?;
        Ok(Identity::Subject(attrs))
    }
}

fn parse_dn(dn: &str) -> Option<Vec<(String, String)>> {
    let attrs: Vec<(String, String)> = dn
        .split(',')
        .map(|part| {
            let (k, v) = part.split_once('=')?;
            let (k, v) = (k.trim(), v.trim());
            (!k.is_empty() && !v.is_empty()).then(|| (k.to_ascii_uppercase(), v.to_string()))
        })
        .collect::<Option<_>>()?;
    (!attrs.is_empty()).then_some(attrs)
}

/// A policy rule's Notation part: the trust store and the trusted identities.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustPolicy {
    pub roots: Vec<Certificate>,
    pub identities: Vec<Identity>,
}

#[derive(Deserialize)]
struct Envelope {
    payload: String,
    protected: String,
    #[serde(default)]
    header: Header,
    signature: String,
}

#[derive(Deserialize, Default)]
struct Header {
    #[serde(default)]
    x5c: Vec<String>,
}

#[derive(Deserialize)]
struct Payload {
    #[serde(rename = "targetArtifact")]
    target: Target,
}

#[derive(Deserialize)]
struct Target {
    digest: String,
}

fn b64url(s: &str) -> Result<Vec<u8>, String> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(s.trim_end_matches('='))
        .map_err(|e| format!("not base64url: {e}"))
}

/// Verifies the JWS `envelope` for the manifest `digest` under `policy` at `now` (Unix
/// seconds). `Ok` names the signing certificate; `Err` says what was wrong.
pub fn verify(envelope: &[u8], digest: &str, policy: &TrustPolicy, now: i64) -> Result<String, String> {
    let env: Envelope = serde_json::from_slice(envelope).map_err(|e| format!("not a JWS envelope: {e}"))?;
    let protected_bytes = b64url(&env.protected).map_err(|e| format!("protected header {e}"))?;
    let protected: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&protected_bytes).map_err(|e| format!("protected header: {e}"))?;
    let text = |k: &str| protected.get(k).and_then(|v| v.as_str());
    if text("cty") != Some(PAYLOAD_CTY) {
        return Err(format!("content type {:?} is not Notation's payload", text("cty").unwrap_or("")));
    }
    let crit: Vec<&str> =
        protected.get("crit").and_then(|c| c.as_array()).into_iter().flatten().filter_map(|v| v.as_str()).collect();
    for c in &crit {
        if c.starts_with("io.cncf.notary.verificationPlugin") {
            return Err(format!("it needs a verification plugin ({c}), which skiff does not run"));
        }
        if ![SCHEME, EXPIRY, AUTHENTIC_TIME].contains(c) {
            return Err(format!("critical header {c:?} is not one skiff knows"));
        }
        if !protected.contains_key(*c) {
            return Err(format!("critical header {c:?} is listed but missing"));
        }
    }
    match (text(SCHEME), crit.contains(&SCHEME)) {
        (Some("notary.x509"), true) if text(SIGNING_TIME).is_some() => {}
        (Some("notary.x509.signingAuthority"), true) if text(AUTHENTIC_TIME).is_some() => {}
        (scheme, _) => return Err(format!("signing scheme {scheme:?} is not notary.x509 with its signing time")),
    }
    if let Some(expiry) = text(EXPIRY) {
        let at = parse_rfc3339(expiry).ok_or_else(|| format!("expiry {expiry:?} is not a time"))?;
        if now > at {
            return Err(format!("the signature expired at {expiry}"));
        }
    }
    let ders: Vec<Vec<u8>> = env
        .header
        .x5c
        .iter()
        .map(|c| base64::engine::general_purpose::STANDARD.decode(c).map_err(|e| format!("x5c: {e}")))
        .collect::<Result<_, _>>()?;
    let chain: Vec<X509Certificate<'_>> = ders
        .iter()
        .map(|d| X509Certificate::from_der(d).map(|(_, c)| c).map_err(|e| format!("x5c: {e}")))
        .collect::<Result<_, _>>()?;
    let leaf = chain.first().ok_or("the envelope carries no certificate (x5c)")?;
    let signing_input = format!("{}.{}", env.protected, env.payload);
    let signature = b64url(&env.signature).map_err(|e| format!("signature {e}"))?;
    let alg = match text("alg") {
        Some("PS256") => &sig::RSA_PSS_2048_8192_SHA256 as &dyn sig::VerificationAlgorithm,
        Some("PS384") => &sig::RSA_PSS_2048_8192_SHA384,
        Some("PS512") => &sig::RSA_PSS_2048_8192_SHA512,
        Some("ES256") => &sig::ECDSA_P256_SHA256_FIXED,
        Some("ES384") => &sig::ECDSA_P384_SHA384_FIXED,
        other => return Err(format!("algorithm {other:?} is not one skiff verifies (PS256/384/512, ES256/384)")),
    };
    UnparsedPublicKey::new(alg, &leaf.public_key().subject_public_key.data)
        .verify(signing_input.as_bytes(), &signature)
        .map_err(|_| format!("the signature does not match its certificate ({})", leaf.subject()))?;
    check_chain(&chain, &ders, policy, now)?;
    check_signing_certificate(leaf)?;
    let trusted = policy.identities.iter().any(|i| match i {
        Identity::Any => true,
        Identity::Subject(want) => subject_attributes(leaf).is_some_and(|have| want.iter().all(|w| have.contains(w))),
    });
    if !trusted {
        return Err(format!("the signing certificate's subject ({}) is not a trusted identity", leaf.subject()));
    }
    let payload: Payload =
        serde_json::from_slice(&b64url(&env.payload)?).map_err(|e| format!("the payload is not Notation's: {e}"))?;
    if payload.target.digest != digest {
        return Err(format!("the signature is for {}, not {digest}", payload.target.digest));
    }
    Ok(format!("certificate {}", leaf.subject()))
}

/// Each certificate signed by the next, each issuer a CA, all valid at `now`, the last one
/// in the trust store or signed by one of its certificates.
fn check_chain(chain: &[X509Certificate<'_>], ders: &[Vec<u8>], policy: &TrustPolicy, now: i64) -> Result<(), String> {
    let at = x509_parser::time::ASN1Time::from_timestamp(now).map_err(|e| e.to_string())?;
    for c in chain {
        if !c.validity().is_valid_at(at) {
            return Err(format!(
                "certificate {} is valid from {} to {}, not now",
                c.subject(),
                c.validity().not_before,
                c.validity().not_after
            ));
        }
    }
    for pair in chain.windows(2) {
        let (child, issuer) = (&pair[0], &pair[1]);
        if !issuer.is_ca() {
            return Err(format!("certificate {} issued {} but is no CA", issuer.subject(), child.subject()));
        }
        if let Ok(Some(ku)) = issuer.key_usage() {
            if !ku.value.key_cert_sign() {
                return Err(format!("certificate {} may not sign certificates (key usage)", issuer.subject()));
            }
        }
        weak_signature(child)?;
        child
            .verify_signature(Some(issuer.public_key()))
            .map_err(|_| format!("certificate {} is not signed by {}", child.subject(), issuer.subject()))?;
    }
    let (last, last_der) = chain.last().zip(ders.last()).ok_or("no certificate")?;
    if root_is_not(last_der, policy) {
        weak_signature(last)?;
    }
    let anchored = policy.roots.iter().any(|root| {
        root.der == *last_der
            || X509Certificate::from_der(&root.der).is_ok_and(|(_, r)| {
                r.is_ca() && r.validity().is_valid_at(at) && last.verify_signature(Some(r.public_key())).is_ok()
            })
    });
    if !anchored {
        return Err(format!("certificate {} does not lead to the trust store", last.subject()));
    }
    Ok(())
}

/// Whether `der` is none of the trust store's certificates (whose own signatures are
/// not what makes them trusted).
fn root_is_not(der: &[u8], policy: &TrustPolicy) -> bool {
    !policy.roots.iter().any(|r| r.der == der)
}

/// Refuses a certificate signed with SHA-1 (x509-parser would verify it, as RSA keys
/// from 1024 bits; Notation accepts neither).
fn weak_signature(c: &X509Certificate<'_>) -> Result<(), String> {
    use x509_parser::oid_registry as oids;
    let alg = &c.signature_algorithm.algorithm;
    if *alg == oids::OID_PKCS1_SHA1WITHRSA || *alg == oids::OID_SHA1_WITH_RSA {
        return Err(format!("certificate {} is signed with SHA-1", c.subject()));
    }
    Ok(())
}

/// The signing certificate may sign, and sign code, when it says what it is for; it is
/// no CA (a chain of one self-signed signing certificate is fine).
fn check_signing_certificate(leaf: &X509Certificate<'_>) -> Result<(), String> {
    if leaf.is_ca() {
        return Err(format!("certificate {} is a CA, not a signing certificate", leaf.subject()));
    }
    if let Ok(Some(ku)) = leaf.key_usage() {
        if !ku.value.digital_signature() {
            return Err(format!("certificate {} may not make signatures (key usage)", leaf.subject()));
        }
    }
    if let Ok(Some(eku)) = leaf.extended_key_usage() {
        if !eku.value.code_signing {
            return Err(format!("certificate {} is not for code signing (extended key usage)", leaf.subject()));
        }
    }
    Ok(())
}

/// A certificate's subject as (attribute, value) pairs, read from its parsed names (not
/// from text: a value may hold `, O=...`). `None` for a subject a trusted identity cannot
/// be matched against: an attribute twice, or several in one RDN (Notation refuses both).
fn subject_attributes(c: &X509Certificate<'_>) -> Option<Vec<(String, String)>> {
    use x509_parser::oid_registry as oids;
    let short = [
        (oids::OID_X509_COUNTRY_NAME, "C"),
        (oids::OID_X509_STATE_OR_PROVINCE_NAME, "ST"),
        (oids::OID_X509_LOCALITY_NAME, "L"),
        (oids::OID_X509_ORGANIZATION_NAME, "O"),
        (oids::OID_X509_ORGANIZATIONAL_UNIT, "OU"),
        (oids::OID_X509_COMMON_NAME, "CN"),
    ];
    let mut out: Vec<(String, String)> = vec![];
    for rdn in c.subject().iter_rdn() {
        let attrs: Vec<_> = rdn.iter().collect();
        let [a] = attrs.as_slice() else { return None };
        let name = short
            .iter()
            .find(|(oid, _)| oid == a.attr_type())
            .map(|(_, n)| n.to_string())
            .unwrap_or_else(|| a.attr_type().to_id_string());
        if out.iter().any(|(n, _)| *n == name) {
            return None;
        }
        out.push((name, a.as_str().ok()?.to_string()));
    }
    Some(out)
}

/// A JWS envelope, as `notation sign` makes one (scheme `notary.x509`, `ES256`), for the
/// manifest `target` (`{digest, mediaType, size}`), signed with `key`, whose certificate
/// is the first of `chain_pem` (then its issuers, up to the root or not). The signing time
/// is `now` (`2026-12-04T10:00:00Z`).
pub fn sign(
    target: &serde_json::Value,
    key: &crate::trust::PrivateKey,
    chain_pem: &str,
    now: &str,
) -> Result<Vec<u8>, String> {
    let mut ders = vec![];
    for p in x509_parser::pem::Pem::iter_from_buffer(chain_pem.as_bytes()) {
        let p = p.map_err(|e| format!("certificate chain: {e}"))?;
        if p.label == "CERTIFICATE" {
            ders.push(p.contents);
        }
    }
    let leaf_der = ders.first().ok_or("certificate chain: no CERTIFICATE in it")?;
    let (_, leaf) = X509Certificate::from_der(leaf_der).map_err(|e| format!("certificate chain: {e}"))?;
    if leaf.public_key().raw != key.public_spki().as_slice() {
        return Err(format!("the key is not the one of the first certificate ({})", leaf.subject()));
    }
    check_signing_certificate(&leaf)?;
    let protected = serde_json::json!({
        "alg": "ES256",
        "crit": [SCHEME],
        "cty": PAYLOAD_CTY,
        SCHEME: "notary.x509",
        SIGNING_TIME: now,
    });
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let protected = b64(&serde_json::to_vec(&protected).map_err(|e| e.to_string())?);
    let payload =
        b64(&serde_json::to_vec(&serde_json::json!({ "targetArtifact": target })).map_err(|e| e.to_string())?);
    let signature = key.sign_es256(format!("{protected}.{payload}").as_bytes()).map_err(|e| e.to_string())?;
    let x5c: Vec<String> = ders.iter().map(|d| base64::engine::general_purpose::STANDARD.encode(d)).collect();
    let env = serde_json::json!({
        "payload": payload,
        "protected": protected,
        "header": {"x5c": x5c, "io.cncf.notary.signingAgent": concat!("skiff/", env!("CARGO_PKG_VERSION"))},
        "signature": b64(&signature),
    });
    serde_json::to_vec(&env).map_err(|e| e.to_string())
}

/// `secs` (Unix) as RFC 3339 in UTC: `2026-12-04T10:00:00Z`.
pub fn format_rfc3339(secs: i64) -> String {
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // The civil date of a day count (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// Unix seconds of an RFC 3339 time (`2023-06-27T13:21:21+08:00`, `...Z`, fractions).
pub fn parse_rfc3339(s: &str) -> Option<i64> {
    let (date, rest) = s.split_once(['T', 't'])?;
    let mut d = date.split('-').map(|p| p.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let (time, offset) = match rest.find(['Z', 'z', '+', '-']) {
        Some(i) => rest.split_at(i),
        None => return None,
    };
    let mut t = time.split(':');
    let (hh, mm) = (t.next()?.parse::<i64>().ok()?, t.next()?.parse::<i64>().ok()?);
    let ss = t.next()?.split('.').next()?.parse::<i64>().ok()?;
    let off = match offset {
        "Z" | "z" => 0,
        o => {
            let sign = if o.starts_with('-') { -1 } else { 1 };
            let (oh, om) = o[1..].split_once(':')?;
            sign * (oh.parse::<i64>().ok()? * 3600 + om.parse::<i64>().ok()? * 60)
        }
    };
    if !(0..=9999).contains(&y) || !(1..=12).contains(&m) || !(1..=31).contains(&day) {
        return None;
    }
    if !(0..24).contains(&hh) || !(0..60).contains(&mm) || !(0..=60).contains(&ss) {
        return None;
    }
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * ((m + 9) % 12) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + hh * 3600 + mm * 60 + ss - off)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/notation/");
    /// 2026-12-04, when these fixtures were checked.
    const NOW: i64 = 1_796_342_400;

    fn file(name: &str) -> Vec<u8> {
        std::fs::read(format!("{DIR}{name}")).unwrap()
    }

    fn trusting(root: &str, identity: &str) -> TrustPolicy {
        TrustPolicy {
            roots: Certificate::from_pem_bundle(&String::from_utf8(file(root)).unwrap()).unwrap(),
            identities: vec![Identity::parse(identity).unwrap()],
        }
    }

    const E2E_DIGEST: &str = "sha256:b8479de3f88fb259a0a9ea82a5b2a052a1ef3c4ebbcfc61482d5ae4c831f8af9";

    #[test]
    fn signatures_made_by_notation_verify() {
        // Signed by the notation CLI in its end-to-end tests (PS256, a self-signed certificate).
        let e2e = trusting("root-e2e.pem", "x509.subject: C=US, ST=WA, L=Seattle, O=Notary, CN=e2e");
        let who = verify(&file("sig1-e2e-valid.jws.json"), E2E_DIGEST, &e2e, NOW).unwrap();
        assert!(who.contains("CN=e2e"), "{who}");
        // The manifest it names is the one of the fixture (the digest is that of its bytes).
        assert_eq!(format!("sha256:{}", crate::digest::sha256_of(&file("target1-e2e-manifest.json"))), E2E_DIGEST);
        // A two-certificate chain to notation-go's test root (PS384).
        let ca = trusting("root-notation-test-root.pem", "*");
        let d3 = "sha256:60043cf45eaebc4c0867fea485a039b598f52fd09fd5b07b0b2d2f88fad9d74e";
        verify(&file("sig3-chain2-ps384.jws.json"), d3, &ca, NOW).unwrap();
        // notation-go's timestamp fixtures: with and without an RFC 3161 countersignature.
        let alpine = trusting("root-alpine.pem", "x509.subject: CN=alpine");
        let d4 = "sha256:c0669ef34cdc14332c0f1ab0c2c01acb91d96014b172f1a76f3a39e63d1f0bda";
        verify(&file("sig4-alpine.jws.json"), d4, &alpine, NOW).unwrap();
        verify(&file("sig5-alpine-with-timestamp.jws.json"), d4, &alpine, NOW).unwrap();
    }

    #[test]
    fn what_notation_refuses_is_refused() {
        let e2e = trusting("root-e2e.pem", "*");
        let sig1 = file("sig1-e2e-valid.jws.json");
        let other = format!("sha256:{}", "1".repeat(64));
        assert!(verify(&sig1, &other, &e2e, NOW).unwrap_err().contains("is for sha256:b847"));
        // Another trust store, another identity.
        let ca = trusting("root-notation-test-root.pem", "*");
        assert!(verify(&sig1, E2E_DIGEST, &ca, NOW).unwrap_err().contains("does not lead to the trust store"));
        let who = trusting("root-e2e.pem", "x509.subject: C=US, ST=WA, O=Someone Else");
        assert!(verify(&sig1, E2E_DIGEST, &who, NOW).unwrap_err().contains("not a trusted identity"));
        // An expired signature (notation's own fixture), a broken one, certificates out of date.
        let e = verify(&file("sig2-e2e-expired-signature.jws.json"), E2E_DIGEST, &e2e, NOW).unwrap_err();
        assert!(e.contains("expired at 2023-06-27T13:21:21+08:00"), "{e}");
        let d3 = "sha256:60043cf45eaebc4c0867fea485a039b598f52fd09fd5b07b0b2d2f88fad9d74e";
        let e = verify(&file("neg-ca-invalid-signature.jws.json"), d3, &ca, NOW).unwrap_err();
        assert!(e.contains("does not match its certificate"), "{e}");
        assert!(verify(&file("neg-ca-expired-envelope.jws.json"), d3, &ca, NOW).unwrap_err().contains("expired"));
        let in_2200 = parse_rfc3339("2200-01-01T00:00:00Z").unwrap();
        assert!(verify(&sig1, E2E_DIGEST, &e2e, in_2200).unwrap_err().contains("not now"));
        // A payload changed after signing.
        let mut env: serde_json::Value = serde_json::from_slice(&sig1).unwrap();
        let forged = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(format!("{{\"targetArtifact\":{{\"digest\":\"{other}\",\"mediaType\":\"x\",\"size\":1}}}}"));
        env["payload"] = forged.into();
        let e = verify(&serde_json::to_vec(&env).unwrap(), &other, &e2e, NOW).unwrap_err();
        assert!(e.contains("does not match its certificate"), "{e}");
        // A critical header this verifier does not know (notation-core-go's conformance file).
        let e = verify(&file("parseonly-es256-conformance-nox5c.jws.json"), E2E_DIGEST, &e2e, NOW).unwrap_err();
        assert!(e.contains("signedCritKey1") || e.contains("content type"), "{e}");
    }

    #[test]
    fn what_skiff_signs_verifies_and_nothing_else_does() {
        let pki = skiff_testkit::tls::code_signing("release").unwrap();
        let key = crate::trust::PrivateKey::from_pem(&pki.key_pem).unwrap();
        let target = serde_json::json!({"digest": E2E_DIGEST, "mediaType": "application/vnd.oci.image.manifest.v1+json", "size": 517});
        let env = sign(&target, &key, &pki.chain_pem, "2026-12-04T10:00:00Z").unwrap();
        let store = Certificate::from_pem_bundle(&pki.root_pem).unwrap();
        let policy = |who: &str| TrustPolicy { roots: store.clone(), identities: vec![Identity::parse(who).unwrap()] };
        let who = verify(&env, E2E_DIGEST, &policy("x509.subject: C=US, O=skiff, CN=release"), NOW).unwrap();
        assert!(who.contains("CN=release"), "{who}");
        assert!(verify(&env, E2E_DIGEST, &policy("x509.subject: CN=other"), NOW).is_err());
        // Another key than the certificate's is refused when signing.
        let other =
            crate::trust::PrivateKey::from_pem(&crate::trust::PrivateKey::generate_pem(false).unwrap()).unwrap();
        assert!(sign(&target, &other, &pki.chain_pem, "2026-12-04T10:00:00Z")
            .unwrap_err()
            .contains("not the one of the first certificate"));
        // A subject whose value reads like more attributes is not those attributes.
        let spoof = skiff_testkit::tls::code_signing("evil, CN=release").unwrap();
        let spoof_key = crate::trust::PrivateKey::from_pem(&spoof.key_pem).unwrap();
        let env = sign(&target, &spoof_key, &spoof.chain_pem, "2026-12-04T10:00:00Z").unwrap();
        let spoof_store = TrustPolicy {
            roots: Certificate::from_pem_bundle(&spoof.root_pem).unwrap(),
            identities: vec![Identity::parse("x509.subject: O=skiff, CN=release").unwrap()],
        };
        let e = verify(&env, E2E_DIGEST, &spoof_store, NOW).unwrap_err();
        assert!(e.contains("not a trusted identity"), "{e}");
        assert!(
            parse_rfc3339("99999999999-01-01T00:00:00Z").is_none() && parse_rfc3339("2026-01-01T25:00:00Z").is_none()
        );
        // A CA certificate is no signer: it may not sign code.
        let root_only = skiff_testkit::tls::code_signing("x").unwrap();
        let e = sign(&target, &key, &root_only.root_pem, "2026-12-04T10:00:00Z").unwrap_err();
        assert!(e.contains("not the one") || e.contains("code signing"), "{e}");
    }

    #[test]
    fn identities_and_times_parse() {
        assert_eq!(Identity::parse("*").unwrap(), Identity::Any);
        assert_eq!(
            Identity::parse("x509.subject: C=US, o=Notary").unwrap(),
            Identity::Subject(vec![("C".into(), "US".into()), ("O".into(), "Notary".into())])
        );
        assert!(Identity::parse("CN=x").is_err() && Identity::parse("x509.subject: CN").is_err());
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(parse_rfc3339("2023-06-27T13:21:21+08:00"), Some(1_687_843_281));
        assert_eq!(parse_rfc3339("2023-06-27T05:21:21.5Z"), Some(1_687_843_281));
        assert_eq!(parse_rfc3339("2023-13-01T00:00:00Z"), None);
        for t in [0, 951_782_400, 1_687_843_281, NOW, 4_102_444_799] {
            assert_eq!(parse_rfc3339(&format_rfc3339(t)), Some(t), "{}", format_rfc3339(t));
        }
        assert_eq!(format_rfc3339(951_782_400), "2000-02-29T00:00:00Z");
    }
}
