//! Tokens: join tokens for nodes, and API tokens with a role for people and programs
//! (Prometheus gets a `metrics` token, a dashboard a `read` one; neither can change
//! anything). The hub keeps only a token's sha256; the secret is shown once.
//!
//! * Join tokens (`SK1.<ca sha256>.<id>.<secret>`) expire after 24 h unless told
//!   otherwise (kubeadm's bootstrap tokens do the same), may be limited to N joins, and
//!   may name the one node a join with them replaces.
//! * API tokens (`SKA1.<id>.<secret>`) carry a role and last until revoked unless a TTL
//!   is given. The admin token in `admin.conf` is the hub's own, always `admin`.

use crate::store::{Store, TokenRecord, TokenRole};
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// How long a join token lasts when nothing else is asked.
pub const JOIN_TOKEN_TTL: Duration = Duration::from_secs(24 * 3600);

/// `POST /api/v1/tokens`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenRequest {
    /// Seconds until it expires (join tokens: 24 h when absent).
    #[serde(default)]
    pub ttl_seconds: Option<u64>,
    /// How many nodes may join with it (join tokens only; absent: any until it expires).
    #[serde(default)]
    pub uses: Option<u32>,
    /// The existing node a join with this token replaces (join tokens only).
    #[serde(default)]
    pub replace: Option<String>,
    #[serde(default)]
    pub role: TokenRole,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CreatedToken {
    pub id: String,
    /// Shown once; the hub keeps only its hash.
    pub token: String,
    pub expires_ms: Option<u64>,
    #[serde(default)]
    pub role: TokenRole,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NoFleet(String),
    #[error("{0}")]
    Internal(String),
    /// The store is out of reach: nothing was changed (503).
    #[error("{0}")]
    Unavailable(String),
}

impl From<crate::store::StoreError> for TokenError {
    fn from(e: crate::store::StoreError) -> Self {
        match e {
            crate::store::StoreError::OutOfReach(m) => TokenError::Unavailable(m),
            e => TokenError::Internal(e.to_string()),
        }
    }
}

/// Makes a token as `req` asks. A join token needs the fingerprint of the hub's CA (a hub
/// that takes remote nodes).
pub fn create(
    store: &dyn Store,
    ca_sha256: Option<&str>,
    req: &TokenRequest,
    now_ms: u64,
) -> Result<CreatedToken, TokenError> {
    let invalid = |m: &str| Err(TokenError::Invalid(m.to_string()));
    if req.ttl_seconds == Some(0) {
        return invalid("ttl: must be more than 0");
    }
    if req.role != TokenRole::Join {
        if req.uses.is_some() {
            return invalid("uses: only join tokens have a number of uses");
        }
        if req.replace.is_some() {
            return invalid("replace: only a join token replaces a node");
        }
    }
    if req.uses == Some(0) {
        return invalid("uses: must be at least 1");
    }
    if let Some(n) = &req.replace {
        skiff_model::validate::check_name("replace", n).map_err(|e| TokenError::Invalid(e.to_string()))?;
    }
    let ttl = match (req.ttl_seconds, req.role) {
        (Some(s), _) => Some(Duration::from_secs(s)),
        (None, TokenRole::Join) => Some(JOIN_TOKEN_TTL),
        (None, _) => None,
    };
    let expires_ms = ttl.map(|t| now_ms.saturating_add(t.as_millis() as u64));
    let id = crate::pki::random_hex().map_err(|e| TokenError::Internal(e.to_string()))?[..12].to_string();
    let secret = crate::pki::random_hex().map_err(|e| TokenError::Internal(e.to_string()))?;
    let token = match req.role {
        TokenRole::Join => {
            let ca = ca_sha256.ok_or_else(|| {
                TokenError::NoFleet("this hub takes no remote nodes (run `skiff hub` to join nodes)".into())
            })?;
            skiff_model::proto::JoinToken { ca_sha256: ca.to_string(), id: id.clone(), secret: secret.clone() }
                .to_string()
        }
        _ => format!("SKA1.{id}.{secret}"),
    };
    let rec = TokenRecord {
        id: id.clone(),
        secret_sha256: crate::pki::secret_hash(&secret),
        created_ms: now_ms,
        expires_ms,
        revoked: false,
        role: req.role,
        // A replacement is for one device unless more uses are asked for: a replace token
        // that stayed usable could revoke the new device again and again.
        max_uses: req.uses.or(req.replace.as_ref().map(|_| 1)),
        used: 0,
        replace: req.replace.clone(),
    };
    store.create_token(&rec)?;
    Ok(CreatedToken { id, token, expires_ms, role: req.role })
}

/// The token record behind `<id>.<secret>` if the secret matches (in constant time).
pub fn lookup(store: &dyn Store, id: &str, secret: &str) -> Result<Option<TokenRecord>, TokenError> {
    let Some(rec) = store.token(id)? else { return Ok(None) };
    let hash = crate::pki::secret_hash(secret);
    Ok(crate::api::constant_time_eq(hash.as_bytes(), rec.secret_sha256.as_bytes()).then_some(rec))
}

/// The role a bearer token grants: the hub's admin token, or a live API token. An error
/// only when the store is out of reach (the token may well be good): any other failure
/// grants nothing.
pub fn authenticate(
    store: &dyn Store,
    admin_token: &str,
    bearer: &str,
    now_ms: u64,
) -> Result<Option<TokenRole>, TokenError> {
    if crate::api::constant_time_eq(bearer.as_bytes(), admin_token.as_bytes()) {
        return Ok(Some(TokenRole::Admin));
    }
    let Some((id, secret)) = bearer.strip_prefix("SKA1.").and_then(|rest| rest.split_once('.')) else {
        return Ok(None);
    };
    let rec = match lookup(store, id, secret) {
        Ok(Some(rec)) => rec,
        Err(e @ TokenError::Unavailable(_)) => return Err(e),
        Ok(None) | Err(_) => return Ok(None),
    };
    let live = !rec.revoked && rec.expires_ms.is_none_or(|e| e > now_ms) && rec.role != TokenRole::Join;
    Ok(live.then_some(rec.role))
}

/// The role a request needs: metrics for the two metrics reads, read for any other read
/// (tokens excepted), admin for everything else.
pub fn required_role(method: &axum::http::Method, path: &str) -> TokenRole {
    // An exec's and a port-forward's WebSockets open with a GET, and they run commands
    // or reach into instances: admin, as the exec's POST. What hubs ask each other
    // (`/api/v1/hub/`) is for hubs, which hold the admin token.
    let acts = path.ends_with("/exec") || path.ends_with("/portforward");
    let read = (method == axum::http::Method::GET || method == axum::http::Method::HEAD) && !acts;
    if read && (path == "/metrics" || path == "/api/v1/metrics") {
        TokenRole::Metrics
    } else if read && !path.starts_with("/api/v1/tokens") && !path.starts_with("/api/v1/hub/") {
        TokenRole::Read
    } else {
        TokenRole::Admin
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SqliteStore;
    use axum::http::Method;

    #[test]
    fn roles_open_only_their_routes() {
        let t = tempfile::tempdir().unwrap();
        let s = SqliteStore::open(&t.path().join("hub.db")).unwrap();
        let now = 1_000_000;
        let mk = |role, ttl| {
            create(&s, None, &TokenRequest { role, ttl_seconds: ttl, ..Default::default() }, now).unwrap().token
        };
        let (metrics, read, admin) =
            (mk(TokenRole::Metrics, None), mk(TokenRole::Read, None), mk(TokenRole::Admin, None));
        let short = mk(TokenRole::Read, Some(5));
        assert!(metrics.starts_with("SKA1."));
        let role = |tok: &str, at| authenticate(&s, "the-admin-token", tok, at).unwrap();
        assert_eq!(role("the-admin-token", now), Some(TokenRole::Admin));
        assert_eq!(role(&metrics, now), Some(TokenRole::Metrics));
        assert_eq!(role(&read, now), Some(TokenRole::Read));
        assert_eq!(role(&admin, now), Some(TokenRole::Admin));
        assert_eq!(role(&short, now + 4_000), Some(TokenRole::Read));
        assert_eq!(role(&short, now + 5_000), None, "expired");
        assert_eq!(role(&read.replace(&read[read.len() - 4..], "0000"), now), None, "wrong secret");
        assert_eq!(role("SKA1.nothing.here", now), None);
        s.revoke_token(read.split('.').nth(1).unwrap()).unwrap();
        assert_eq!(role(&read, now), None, "revoked");

        let need = |m: &Method, p: &str| required_role(m, p);
        assert_eq!(need(&Method::GET, "/metrics"), TokenRole::Metrics);
        assert_eq!(need(&Method::GET, "/api/v1/metrics"), TokenRole::Metrics);
        assert_eq!(need(&Method::GET, "/api/v1/deployments"), TokenRole::Read);
        assert_eq!(need(&Method::GET, "/api/v1/instances/web-1/logs"), TokenRole::Read);
        assert_eq!(need(&Method::GET, "/api/v1/tokens"), TokenRole::Admin);
        assert_eq!(need(&Method::GET, "/api/v1/hub/peer"), TokenRole::Admin, "what hubs tell each other");
        assert_eq!(need(&Method::POST, "/api/v1/apply"), TokenRole::Admin);
        assert_eq!(need(&Method::POST, "/api/v1/instances/web-1/exec"), TokenRole::Admin);
        assert_eq!(need(&Method::GET, "/api/v1/instances/web-1/exec"), TokenRole::Admin, "the interactive exec");
        assert_eq!(need(&Method::GET, "/api/v1/instances/web-1/portforward"), TokenRole::Admin);
        assert_eq!(need(&Method::POST, "/api/v1/instances/web-1/restart"), TokenRole::Admin);
        assert_eq!(need(&Method::DELETE, "/api/v1/deployments/web"), TokenRole::Admin);
        assert_eq!(need(&Method::POST, "/api/v1/images"), TokenRole::Admin, "a pushed image");
        assert_eq!(need(&Method::GET, "/api/v1/k8s-services"), TokenRole::Read);
        assert_eq!(need(&Method::DELETE, "/api/v1/k8s-services/default/web"), TokenRole::Admin);
    }

    #[test]
    fn join_tokens_expire_in_a_day_and_bad_requests_name_the_field() {
        let t = tempfile::tempdir().unwrap();
        let s = SqliteStore::open(&t.path().join("hub.db")).unwrap();
        let ca = "ab".repeat(32);
        let j = create(&s, Some(&ca), &TokenRequest::default(), 0).unwrap();
        assert_eq!(j.expires_ms, Some(24 * 3600 * 1000));
        assert!(skiff_model::proto::JoinToken::parse(&j.token).is_ok());
        assert_eq!(authenticate(&s, "x", &j.token, 1).unwrap(), None, "a join token is no API credential");
        let bad = |r: TokenRequest, ca: Option<&str>| create(&s, ca, &r, 0).unwrap_err().to_string();
        assert!(bad(TokenRequest { ttl_seconds: Some(0), ..Default::default() }, Some(&ca)).starts_with("ttl:"));
        assert!(bad(TokenRequest { uses: Some(0), ..Default::default() }, Some(&ca)).starts_with("uses:"));
        let r = TokenRequest { uses: Some(1), role: TokenRole::Read, ..Default::default() };
        assert!(bad(r, Some(&ca)).starts_with("uses:"));
        let r = TokenRequest { replace: Some("Bad Name".into()), ..Default::default() };
        assert!(bad(r, Some(&ca)).starts_with("replace"));
        assert!(bad(TokenRequest::default(), None).contains("takes no remote nodes"));
    }
}
