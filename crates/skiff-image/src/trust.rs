//! Image signatures in cosign's key-based format ("simple signing"), byte-compatible with
//! `cosign sign --key` / `cosign verify --key`.
//!
//! * The signatures of the manifest `sha256:<hex>` of `registry/repo` live at the tag
//!   `registry/repo:sha256-<hex>.sig`: an OCI manifest with one layer per signature, of
//!   media type [`SIMPLE_SIGNING`], whose blob is the signed payload and whose annotation
//!   [`SIGNATURE_ANNOTATION`] holds the signature in base64.
//! * The payload is JSON naming the image: `critical.image.docker-manifest-digest` (the
//!   digest the signature vouches for), `critical.identity.docker-reference` (the
//!   repository it was signed as) and `critical.type`.
//! * Keys are PEM `PUBLIC KEY`s (SubjectPublicKeyInfo): ECDSA P-256 (cosign's default;
//!   ASN.1 DER signatures over SHA-256), Ed25519 (signs the payload itself) and RSA
//!   (PKCS#1 v1.5 or PSS over SHA-256).
//!
//! Verification needs no network beyond the registry (or store) holding the image: no
//! transparency log is consulted, so an offline node verifies what it holds.

use crate::digest::sha256_hex;
use crate::policy::{repository_of, ImagePolicy, Mode, Rule};
use crate::store::{Descriptor, Manifest};
use base64::Engine;
use ring::signature::{self as sig, UnparsedPublicKey};
use serde::{Deserialize, Serialize};
use x509_parser::prelude::FromDer;

/// Media type of a signature layer (the payload blob).
pub const SIMPLE_SIGNING: &str = "application/vnd.dev.cosign.simplesigning.v1+json";
/// Annotation of a signature layer holding the base64 signature.
pub const SIGNATURE_ANNOTATION: &str = "dev.cosignproject.cosign/signature";
/// `critical.type` of a container image signature.
pub const PAYLOAD_TYPE: &str = "cosign container image signature";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("not a PEM document: {0}")]
    Pem(String),
    #[error("PEM label {0:?}: want PUBLIC KEY")]
    Label(String),
    #[error("not a SubjectPublicKeyInfo: {0}")]
    Der(String),
    #[error("unsupported key type {0} (supported: ECDSA P-256, Ed25519, RSA)")]
    Unsupported(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Algorithm {
    P256,
    Ed25519,
    Rsa,
}

/// A public key a signature may be verified with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey {
    alg: Algorithm,
    /// The key as ring takes it: the EC point, the raw Ed25519 key, or PKCS#1 RSAPublicKey.
    raw: Vec<u8>,
    /// `sha256:` of the SubjectPublicKeyInfo, shortened: how messages name the key.
    pub id: String,
}

impl PublicKey {
    /// Reads a PEM `PUBLIC KEY` (what `cosign generate-key-pair` writes to `cosign.pub`).
    pub fn from_pem(pem: &str) -> Result<Self, KeyError> {
        let (p, _) = x509_parser::pem::Pem::read(std::io::Cursor::new(pem.trim_start().as_bytes()))
            .map_err(|e| KeyError::Pem(e.to_string()))?;
        if p.label != "PUBLIC KEY" {
            return Err(KeyError::Label(p.label));
        }
        Self::from_spki_der(&p.contents)
    }

    pub fn from_spki_der(der: &[u8]) -> Result<Self, KeyError> {
        use x509_parser::oid_registry as oids;
        let (_, spki) =
            x509_parser::x509::SubjectPublicKeyInfo::from_der(der).map_err(|e| KeyError::Der(e.to_string()))?;
        let oid = &spki.algorithm.algorithm;
        let alg = if *oid == oids::OID_KEY_TYPE_EC_PUBLIC_KEY {
            let curve = spki.algorithm.parameters.as_ref().and_then(|p| p.as_oid().ok());
            if curve.as_ref() != Some(&oids::OID_EC_P256) {
                let name = curve.map(|c| c.to_id_string()).unwrap_or_else(|| "unnamed".into());
                return Err(KeyError::Unsupported(format!("ECDSA on curve {name}")));
            }
            Algorithm::P256
        } else if *oid == oids::OID_SIG_ED25519 {
            Algorithm::Ed25519
        } else if *oid == oids::OID_PKCS1_RSAENCRYPTION {
            Algorithm::Rsa
        } else {
            return Err(KeyError::Unsupported(oid.to_id_string()));
        };
        let id = format!("sha256:{}", &crate::digest::sha256_of(der)[..16]);
        Ok(PublicKey { alg, raw: spki.subject_public_key.data.to_vec(), id })
    }

    /// Whether `signature` is this key's over `message`.
    pub fn verify(&self, message: &[u8], signature: &[u8]) -> bool {
        let check = |alg: &'static dyn sig::VerificationAlgorithm| {
            UnparsedPublicKey::new(alg, &self.raw).verify(message, signature).is_ok()
        };
        match self.alg {
            Algorithm::P256 => check(&sig::ECDSA_P256_SHA256_ASN1),
            Algorithm::Ed25519 => check(&sig::ED25519),
            Algorithm::Rsa => check(&sig::RSA_PKCS1_2048_8192_SHA256) || check(&sig::RSA_PSS_2048_8192_SHA256),
        }
    }
}

/// A private key to sign with: PEM PKCS#8 (`PRIVATE KEY`), ECDSA P-256 or Ed25519 — what
/// `openssl genpkey` and `skiff image keygen` write.
pub struct PrivateKey {
    pair: SigningPair,
    /// The PKCS#8 document (a JWS signature needs the key again, signing in another form).
    pkcs8: Vec<u8>,
    /// The matching public key, PEM.
    pub public_pem: String,
}

enum SigningPair {
    P256(ring::signature::EcdsaKeyPair),
    Ed25519(ring::signature::Ed25519KeyPair),
}

impl PrivateKey {
    pub fn from_pem(pem: &str) -> Result<Self, KeyError> {
        use ring::signature::KeyPair;
        let (p, _) = x509_parser::pem::Pem::read(std::io::Cursor::new(pem.trim_start().as_bytes()))
            .map_err(|e| KeyError::Pem(e.to_string()))?;
        match p.label.as_str() {
            "PRIVATE KEY" => {}
            "EC PRIVATE KEY" => {
                return Err(KeyError::Unsupported(
                    "SEC1 (EC PRIVATE KEY); convert it with `openssl pkcs8 -topk8 -nocrypt -in KEY`".into(),
                ))
            }
            l if l.starts_with("ENCRYPTED") => {
                return Err(KeyError::Unsupported(format!(
                    "{l}; export it unencrypted as PKCS#8 (`openssl pkcs8 -topk8 -nocrypt`) or make one with `skiff image keygen`"
                )))
            }
            other => return Err(KeyError::Label(other.to_string())),
        }
        let rng = ring::rand::SystemRandom::new();
        let pair = if let Ok(k) =
            ring::signature::EcdsaKeyPair::from_pkcs8(&sig::ECDSA_P256_SHA256_ASN1_SIGNING, &p.contents, &rng)
        {
            SigningPair::P256(k)
        } else if let Ok(k) = ring::signature::Ed25519KeyPair::from_pkcs8_maybe_unchecked(&p.contents) {
            SigningPair::Ed25519(k)
        } else {
            return Err(KeyError::Unsupported("a PKCS#8 key that is neither ECDSA P-256 nor Ed25519".into()));
        };
        let spki = match &pair {
            SigningPair::P256(k) => spki_der(&P256_SPKI_PREFIX, k.public_key().as_ref()),
            SigningPair::Ed25519(k) => spki_der(&ED25519_SPKI_PREFIX, k.public_key().as_ref()),
        };
        Ok(PrivateKey { pair, pkcs8: p.contents.clone(), public_pem: to_pem("PUBLIC KEY", &spki) })
    }

    /// A new key, PEM PKCS#8: ECDSA P-256 (cosign's default), or Ed25519.
    pub fn generate_pem(ed25519: bool) -> Result<String, KeyError> {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = if ed25519 {
            ring::signature::Ed25519KeyPair::generate_pkcs8(&rng)
        } else {
            ring::signature::EcdsaKeyPair::generate_pkcs8(&sig::ECDSA_P256_SHA256_ASN1_SIGNING, &rng)
        }
        .map_err(|_| KeyError::Der("key generation failed".into()))?;
        Ok(to_pem("PRIVATE KEY", pkcs8.as_ref()))
    }

    /// The signature cosign stores for `message`: ASN.1 DER ECDSA over SHA-256, or Ed25519.
    pub fn sign(&self, message: &[u8]) -> Result<Vec<u8>, KeyError> {
        match &self.pair {
            SigningPair::P256(k) => k
                .sign(&ring::rand::SystemRandom::new(), message)
                .map(|s| s.as_ref().to_vec())
                .map_err(|_| KeyError::Der("signing failed".into())),
            SigningPair::Ed25519(k) => Ok(k.sign(message).as_ref().to_vec()),
        }
    }
}

impl PrivateKey {
    /// A JWS `ES256` signature of `message` (r and s, 32 bytes each): ECDSA P-256 keys only.
    pub fn sign_es256(&self, message: &[u8]) -> Result<Vec<u8>, KeyError> {
        let rng = ring::rand::SystemRandom::new();
        let k = ring::signature::EcdsaKeyPair::from_pkcs8(&sig::ECDSA_P256_SHA256_FIXED_SIGNING, &self.pkcs8, &rng)
            .map_err(|_| KeyError::Unsupported("a key that is not ECDSA P-256 (Notation signs with ES256)".into()))?;
        k.sign(&rng, message).map(|s| s.as_ref().to_vec()).map_err(|_| KeyError::Der("signing failed".into()))
    }

    /// The SubjectPublicKeyInfo of the key, DER.
    pub fn public_spki(&self) -> Vec<u8> {
        x509_parser::pem::Pem::read(std::io::Cursor::new(self.public_pem.as_bytes()))
            .map(|(p, _)| p.contents)
            .unwrap_or_default()
    }
}

/// SubjectPublicKeyInfo DER up to the key bits, for a 65-byte P-256 point.
const P256_SPKI_PREFIX: [u8; 26] = [
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce,
    0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];
/// The same for a 32-byte Ed25519 key.
const ED25519_SPKI_PREFIX: [u8; 12] = [0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00];

fn spki_der(prefix: &[u8], key: &[u8]) -> Vec<u8> {
    [prefix, key].concat()
}

/// PEM text: `der` in base64, 64 characters a line, between the `label` lines.
fn to_pem(label: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let lines: Vec<&str> = b64.as_bytes().chunks(64).map(|c| std::str::from_utf8(c).unwrap_or_default()).collect();
    format!("-----BEGIN {label}-----\n{}\n-----END {label}-----\n", lines.join("\n"))
}

/// The tag holding the signatures of the manifest `digest`: `sha256-<hex>.sig`.
pub fn signature_tag(digest: &str) -> Result<String, crate::ImageError> {
    Ok(format!("sha256-{}.sig", sha256_hex(digest)?))
}

/// cosign's simple-signing payload. Field order is the one cosign writes (Go's
/// `encoding/json` over its structs), so that [`payload`] produces the same bytes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Payload {
    pub critical: Critical,
    #[serde(default)]
    pub optional: Option<serde_json::Map<String, serde_json::Value>>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Critical {
    pub identity: Identity,
    pub image: ImageClaim,
    #[serde(rename = "type")]
    pub kind: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Identity {
    #[serde(rename = "docker-reference")]
    pub docker_reference: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImageClaim {
    #[serde(rename = "docker-manifest-digest")]
    pub docker_manifest_digest: String,
}

/// The payload `cosign sign` writes for the manifest `digest` of `repository`
/// (`registry/repo`, no tag).
pub fn payload(repository: &str, digest: &str) -> Vec<u8> {
    let p = Payload {
        critical: Critical {
            identity: Identity { docker_reference: repository.to_string() },
            image: ImageClaim { docker_manifest_digest: digest.to_string() },
            kind: PAYLOAD_TYPE.to_string(),
        },
        optional: None,
    };
    serde_json::to_vec(&p).unwrap_or_default()
}

/// Which repositories a signature's `docker-reference` may name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IdentityCheck {
    /// The image's own repository (`registry/repo`): a signature made for another image
    /// does not vouch for this one even when the key is trusted.
    #[default]
    Repository,
    /// Any: only the digest must match (cosign's default).
    Any,
}

/// What verification concluded: the key that vouched, or why none did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// `key` names who signed: the key's id (`key sha256:…` from [`verify_stored`]) or
    /// the Notation signing certificate (`certificate CN=…`).
    Verified {
        key: String,
    },
    Rejected(String),
}

/// One signature of a signature manifest: its layer, with the payload blob read.
pub struct Signed<'a> {
    pub layer: &'a Descriptor,
    pub payload: Vec<u8>,
}

/// The signature layers of a signature manifest (the payload blobs are read by the
/// caller, from a registry or from the store, and must match their digests).
pub fn signature_layers(m: &Manifest) -> Vec<&Descriptor> {
    m.layers.iter().flatten().filter(|l| l.media_type == SIMPLE_SIGNING).collect()
}

/// Checks the signatures of the image `repository@digest`: one is enough if a trusted
/// key made it over a payload naming this digest (and this repository, unless `identity`
/// says any). The reason of a rejection names what was wrong with each signature.
pub fn verify(
    signed: &[Signed<'_>],
    repository: &str,
    digest: &str,
    keys: &[PublicKey],
    identity: IdentityCheck,
) -> Verdict {
    if signed.is_empty() {
        return Verdict::Rejected("the signature manifest holds no cosign signature".into());
    }
    let mut why = vec![];
    for s in signed {
        match verify_one(s, repository, digest, keys, identity) {
            Ok(key) => return Verdict::Verified { key },
            Err(e) => why.push(e),
        }
    }
    why.dedup();
    Verdict::Rejected(why.join("; "))
}

fn verify_one(
    s: &Signed<'_>,
    repository: &str,
    digest: &str,
    keys: &[PublicKey],
    identity: IdentityCheck,
) -> Result<String, String> {
    let b64 = s.layer.annotations.get(SIGNATURE_ANNOTATION).ok_or("a signature layer has no signature annotation")?;
    // Some signers wrap the base64 in lines.
    let b64: String = b64.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    let signature =
        base64::engine::general_purpose::STANDARD.decode(b64).map_err(|e| format!("a signature is not base64: {e}"))?;
    let key = keys
        .iter()
        .find(|k| k.verify(&s.payload, &signature))
        .ok_or_else(|| "no trusted key made the signature".to_string())?;
    // Only a payload a trusted key signed is worth reading.
    let p: Payload =
        serde_json::from_slice(&s.payload).map_err(|e| format!("the signed payload is not cosign's: {e}"))?;
    if p.critical.kind != PAYLOAD_TYPE {
        return Err(format!("the signed payload's type is {:?}, not {PAYLOAD_TYPE:?}", p.critical.kind));
    }
    if p.critical.image.docker_manifest_digest != digest {
        return Err(format!("the signature is for {}, not {digest}", p.critical.image.docker_manifest_digest));
    }
    let signed_as = repository_of(&p.critical.identity.docker_reference);
    if identity == IdentityCheck::Repository && !same_repository(&signed_as, repository) {
        return Err(format!("the signature was made for {signed_as}, not {repository}"));
    }
    Ok(key.id.clone())
}

fn same_repository(a: &str, b: &str) -> bool {
    repository_of(a) == repository_of(b)
}

/// A signature as the store keeps it: its layer (with the signature annotation) and the
/// payload it signs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredSignature {
    pub layer: Descriptor,
    /// The payload, base64 (kept byte-exact).
    pub payload: String,
}

impl StoredSignature {
    pub fn new(layer: Descriptor, payload: &[u8]) -> Self {
        StoredSignature { layer, payload: base64::engine::general_purpose::STANDARD.encode(payload) }
    }

    fn payload_bytes(&self) -> Option<Vec<u8>> {
        base64::engine::general_purpose::STANDARD.decode(&self.payload).ok()
    }
}

/// How a policy's rule judged an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Judgement {
    pub mode: Mode,
    pub verdict: Verdict,
}

impl Judgement {
    /// Whether the image may be used: verified, or only warned about.
    pub fn allows(&self) -> bool {
        matches!(self.verdict, Verdict::Verified { .. }) || self.mode == Mode::Warn
    }
}

/// The signatures kept for an image judged by `rule`: cosign's with its keys, Notation's
/// with its trust store; one that verifies is enough. A rejection names what was wrong
/// with each kind.
pub fn verify_stored(stored: &[StoredSignature], repository: &str, digest: &str, rule: &Rule) -> Verdict {
    if stored.is_empty() {
        return Verdict::Rejected(format!(
            "no signature (the registry has no {} and no Notation signature refers to it)",
            signature_tag(digest).unwrap_or_default()
        ));
    }
    let mut why = vec![];
    if !rule.keys.is_empty() {
        let payloads: Vec<Option<Vec<u8>>> = stored.iter().map(StoredSignature::payload_bytes).collect();
        let signed: Vec<Signed<'_>> = stored
            .iter()
            .zip(payloads)
            .filter(|(s, _)| s.layer.media_type == SIMPLE_SIGNING)
            .filter_map(|(s, p)| Some(Signed { layer: &s.layer, payload: p? }))
            .collect();
        match verify(&signed, repository, digest, &rule.keys, rule.identity) {
            Verdict::Verified { key } => return Verdict::Verified { key: format!("key {key}") },
            Verdict::Rejected(r) => why.push(r),
        }
    }
    if let Some(trust) = &rule.notation {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or_default();
        let envelopes: Vec<&StoredSignature> = stored
            .iter()
            .filter(|s| [crate::notation::JWS, crate::notation::COSE].contains(&s.layer.media_type.as_str()))
            .collect();
        if envelopes.is_empty() {
            why.push("no Notation signature".into());
        }
        for s in envelopes {
            let outcome = match (s.layer.media_type.as_str(), s.payload_bytes()) {
                (crate::notation::COSE, _) => Err("a COSE envelope (skiff verifies Notation's JWS ones)".into()),
                (_, None) => Err("an unreadable envelope".into()),
                (_, Some(env)) => crate::notation::verify(&env, digest, trust, now),
            };
            match outcome {
                Ok(who) => return Verdict::Verified { key: who },
                Err(e) => why.push(format!("Notation: {e}")),
            }
        }
    }
    why.dedup();
    Verdict::Rejected(why.join("; "))
}

impl crate::ImageStore {
    fn signatures_path(&self, digest: &str) -> Result<std::path::PathBuf, crate::ImageError> {
        Ok(self.root().join("signatures").join(format!("{}.json", sha256_hex(digest)?)))
    }

    /// Keeps the signatures of the manifest (or index) `digest`, replacing those kept.
    pub fn put_signatures(&self, digest: &str, sigs: &[StoredSignature]) -> Result<(), crate::ImageError> {
        let path = self.signatures_path(digest)?;
        let dir = self.root().join("signatures");
        std::fs::create_dir_all(&dir).map_err(|source| crate::ImageError::Io { op: "create", path: dir, source })?;
        let bytes = serde_json::to_vec(sigs)
            .map_err(|e| crate::ImageError::Malformed { what: "signatures".into(), problem: e.to_string() })?;
        skiff_sys::durable::write(&path, &bytes, 0o600).map_err(|e| crate::ImageError::Io {
            op: "write",
            path: e.path,
            source: e.source,
        })
    }

    /// The signatures kept for `digest` (none when there are none).
    pub fn signatures(&self, digest: &str) -> Result<Vec<StoredSignature>, crate::ImageError> {
        let path = self.signatures_path(digest)?;
        match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b)
                .map_err(|e| crate::ImageError::Malformed { what: path.display().to_string(), problem: e.to_string() }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(vec![]),
            Err(source) => Err(crate::ImageError::Io { op: "read", path, source }),
        }
    }

    /// Judges the stored image `reference` by `policy` with the signatures kept beside it:
    /// `None` when no rule names it. However the image is named (a digest, an image ID,
    /// another tag), every name the store has for its digest meets its rule, and the
    /// strictest outcome counts: an enforcing rejection, then a warning, then a
    /// verification. For a node that got the image from a file, a bundle or before the
    /// policy existed.
    pub fn judge(&self, reference: &str, policy: &ImagePolicy) -> Result<Option<Judgement>, crate::ImageError> {
        let digest = self.top_digest(reference)?;
        let mut names = self.names_of(&digest)?;
        names.push(reference.to_string());
        let sigs = self.signatures(&digest)?;
        let mut out: Option<Judgement> = None;
        for name in &names {
            let Some(rule) = policy.rule_for(name) else { continue };
            let j = Judgement { mode: rule.mode, verdict: verify_stored(&sigs, &repository_of(name), &digest, rule) };
            let rank = |j: &Judgement| match (&j.verdict, j.mode) {
                (Verdict::Rejected(_), Mode::Enforce) => 2,
                (Verdict::Rejected(_), Mode::Warn) => 1,
                (Verdict::Verified { .. }, _) => 0,
            };
            if out.as_ref().is_none_or(|o| rank(&j) > rank(o)) {
                out = Some(j);
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_is_cosigns_bytes() {
        let d = format!("sha256:{}", "a".repeat(64));
        let p = payload("127.0.0.1:5000/app", &d);
        assert_eq!(
            String::from_utf8(p).unwrap(),
            format!(
                "{{\"critical\":{{\"identity\":{{\"docker-reference\":\"127.0.0.1:5000/app\"}},\"image\":{{\"docker-manifest-digest\":\"{d}\"}},\"type\":\"cosign container image signature\"}},\"optional\":null}}"
            )
        );
    }

    #[test]
    fn repository_identity_ignores_tags_and_docker_hub_spelling() {
        assert!(same_repository("busybox", "docker.io/library/busybox"));
        // cosign names Docker Hub images index.docker.io/...
        assert!(same_repository("index.docker.io/library/busybox", "busybox:1.36"));
        assert!(same_repository("Registry.Example.com:443/plant/app", "registry.example.com/plant/app"));
        assert!(same_repository("127.0.0.1:5000/app:v1", "127.0.0.1:5000/app"));
        assert!(!same_repository("127.0.0.1:5000/app", "127.0.0.1:5000/other"));
        assert!(!same_repository("127.0.0.1:5001/app", "127.0.0.1:5000/app"));
    }

    fn pkcs8_pem(der: &[u8]) -> String {
        to_pem("PRIVATE KEY", der)
    }

    fn signed_layer(payload: &[u8], key: &PrivateKey) -> Descriptor {
        let b64 = base64::engine::general_purpose::STANDARD.encode(key.sign(payload).unwrap());
        Descriptor {
            media_type: SIMPLE_SIGNING.into(),
            digest: format!("sha256:{}", crate::digest::sha256_of(payload)),
            size: payload.len() as u64,
            platform: None,
            annotations: [(SIGNATURE_ANNOTATION.to_string(), b64)].into(),
        }
    }

    #[test]
    fn own_signatures_verify_for_both_key_types_and_nothing_else() {
        let rng = ring::rand::SystemRandom::new();
        let p256 = ring::signature::EcdsaKeyPair::generate_pkcs8(&sig::ECDSA_P256_SHA256_ASN1_SIGNING, &rng).unwrap();
        let ed = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
        let other = ring::signature::EcdsaKeyPair::generate_pkcs8(&sig::ECDSA_P256_SHA256_ASN1_SIGNING, &rng).unwrap();
        let other = PublicKey::from_pem(&PrivateKey::from_pem(&pkcs8_pem(other.as_ref())).unwrap().public_pem).unwrap();
        let d = format!("sha256:{}", "b".repeat(64));
        let repo = "127.0.0.1:5000/app";
        for der in [p256.as_ref(), ed.as_ref()] {
            let key = PrivateKey::from_pem(&pkcs8_pem(der)).unwrap();
            let public = PublicKey::from_pem(&key.public_pem).unwrap();
            let payload = payload(repo, &d);
            let layer = signed_layer(&payload, &key);
            let ok = |p: &[u8], r: &str, dg: &str, key: &PublicKey, id| {
                verify(&[Signed { layer: &layer, payload: p.to_vec() }], r, dg, std::slice::from_ref(key), id)
            };
            assert_eq!(
                ok(&payload, repo, &d, &public, IdentityCheck::Repository),
                Verdict::Verified { key: public.id.clone() }
            );
            // Wrong key, another image, another repository, a changed payload.
            assert!(
                matches!(ok(&payload, repo, &d, &other, IdentityCheck::Repository), Verdict::Rejected(r) if r.contains("no trusted key"))
            );
            let d2 = format!("sha256:{}", "c".repeat(64));
            assert!(
                matches!(ok(&payload, repo, &d2, &public, IdentityCheck::Repository), Verdict::Rejected(r) if r.contains("not sha256:ccc"))
            );
            assert!(
                matches!(ok(&payload, "127.0.0.1:5000/x", &d, &public, IdentityCheck::Repository), Verdict::Rejected(r) if r.contains("made for 127.0.0.1:5000/app"))
            );
            assert!(matches!(
                ok(&payload, "127.0.0.1:5000/x", &d, &public, IdentityCheck::Any),
                Verdict::Verified { .. }
            ));
            let mut changed = payload.clone();
            changed[10] ^= 1;
            assert!(matches!(ok(&changed, repo, &d, &public, IdentityCheck::Repository), Verdict::Rejected(_)));
        }
    }

    /// A signature layer as containers/image stores it (see tests/fixtures/cosign/SOURCE.md).
    fn containers_image_signature(bytes: &[u8]) -> (Descriptor, Vec<u8>) {
        let json = bytes.strip_prefix(b"\0sigstore-json\n").expect("sigstore-json prefix");
        let v: serde_json::Value = serde_json::from_slice(json).unwrap();
        let payload = base64::engine::general_purpose::STANDARD.decode(v["payload"].as_str().unwrap()).unwrap();
        let layer = Descriptor {
            media_type: v["mimeType"].as_str().unwrap().into(),
            digest: format!("sha256:{}", crate::digest::sha256_of(&payload)),
            size: payload.len() as u64,
            platform: None,
            annotations: serde_json::from_value(v["annotations"].clone()).unwrap(),
        };
        (layer, payload)
    }

    const CI: &str = "127.0.0.1:5000/ignored";

    #[test]
    fn signatures_made_by_cosign_verify() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/cosign/containers-image/");
        let read = |f: &str| std::fs::read(format!("{dir}{f}")).unwrap();
        let key = PublicKey::from_pem(&String::from_utf8(read("cosign.pub")).unwrap()).unwrap();
        let digest = format!("sha256:{}", crate::digest::sha256_of(&read("manifest.json")));
        let repo = "192.168.64.2:5000/cosign-signed-single-sample";
        for f in ["signature-valid", "signature-valid-2"] {
            let (layer, p) = containers_image_signature(&read(f));
            // Our payload for the same image is cosign's, byte for byte.
            assert_eq!(payload(repo, &digest), p, "{f}");
            let v = verify(
                &[Signed { layer: &layer, payload: p }],
                repo,
                &digest,
                std::slice::from_ref(&key),
                IdentityCheck::Repository,
            );
            assert_eq!(v, Verdict::Verified { key: key.id.clone() }, "{f}");
        }
        // The manifest changed after signing; a signature by a key nobody trusts; both.
        let (layer, p) = containers_image_signature(&read("signature-valid"));
        let modified = format!("sha256:{}", crate::digest::sha256_of(&read("manifest-modified.json")));
        let v = verify(
            &[Signed { layer: &layer, payload: p.clone() }],
            repo,
            &modified,
            std::slice::from_ref(&key),
            IdentityCheck::Repository,
        );
        assert!(matches!(&v, Verdict::Rejected(r) if r.contains("the signature is for sha256:634a8f35")), "{v:?}");
        let (other, po) = containers_image_signature(&read("signature-unknown-key"));
        let v = verify(
            &[Signed { layer: &other, payload: po.clone() }],
            repo,
            &digest,
            std::slice::from_ref(&key),
            IdentityCheck::Repository,
        );
        assert_eq!(v, Verdict::Rejected("no trusted key made the signature".into()));
        // One good signature among bad ones is enough.
        let both = [Signed { layer: &other, payload: po }, Signed { layer: &layer, payload: p }];
        assert!(matches!(
            verify(&both, repo, &digest, std::slice::from_ref(&key), IdentityCheck::Repository),
            Verdict::Verified { .. }
        ));
        assert!(
            matches!(verify(&both, CI, &digest, &[key], IdentityCheck::Repository), Verdict::Rejected(r) if r.contains("made for 192.168.64.2:5000/cosign-signed-single-sample"))
        );
    }

    #[test]
    fn an_rsa_signature_made_by_cosign_verifies() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/cosign/containers-image/");
        let read = |f: &str| std::fs::read(format!("{dir}{f}")).unwrap();
        let cert = read("pki-rsa-leaf.pem");
        let (_, pem) = x509_parser::pem::parse_x509_pem(&cert).unwrap();
        let x509 = pem.parse_x509().unwrap();
        let key = PublicKey::from_spki_der(x509.public_key().raw).unwrap();
        let (layer, p) = containers_image_signature(&read("signature-pki-rsa"));
        let digest = format!("sha256:{}", crate::digest::sha256_of(&read("manifest-pki.json")));
        let signed = [Signed { layer: &layer, payload: p }];
        let v = verify(&signed, CI, &digest, std::slice::from_ref(&key), IdentityCheck::Any);
        assert_eq!(v, Verdict::Verified { key: key.id.clone() });
    }

    #[test]
    fn a_signature_manifest_made_by_cosign_v3_verifies() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/cosign/cosign-v3/");
        let read = |f: &str| std::fs::read(format!("{dir}{f}")).unwrap();
        let m: Manifest = serde_json::from_slice(&read("signature-manifest.json")).unwrap();
        let layers = signature_layers(&m);
        assert_eq!(layers.len(), 1);
        let p = read("payload.json");
        assert_eq!(layers[0].digest, format!("sha256:{}", crate::digest::sha256_of(&p)));
        let key = PublicKey::from_pem(&String::from_utf8(read("cosign.pub")).unwrap()).unwrap();
        let digest = "sha256:f20c43161d73848408ef247f0ec7111b19fe58ffebc0cbcaa0d2c8bda4967268";
        let repo = "localhost:15381/tobby/fixture";
        assert_eq!(payload(repo, digest), p);
        let signed = [Signed { layer: layers[0], payload: p }];
        assert_eq!(
            verify(&signed, repo, digest, std::slice::from_ref(&key), IdentityCheck::Repository),
            Verdict::Verified { key: key.id }
        );
        assert_eq!(
            signature_tag(digest).unwrap(),
            "sha256-f20c43161d73848408ef247f0ec7111b19fe58ffebc0cbcaa0d2c8bda4967268.sig"
        );
    }

    #[test]
    fn keys_of_other_kinds_are_named_in_the_error() {
        assert!(matches!(PublicKey::from_pem("hello"), Err(KeyError::Pem(_))));
        let cert = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        assert_eq!(PublicKey::from_pem(cert), Err(KeyError::Label("CERTIFICATE".into())));
    }
}
