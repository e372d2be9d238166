//! `skiff agent --serve-cache ADDR`: this node is its site's image cache. The other
//! nodes of the site (same `site` label; the hub tells them where the cache is) ask it
//! for an image's chunks before they ask the hub: the cache pulls the image once, through
//! its own hub (so itself only the chunks it lacks), and the site's WAN carries each
//! update once.
//!
//! ```text
//! POST /skiff/v1/images/resolve   the site's token; pulls (once at a time per image)
//! POST /skiff/v1/images/chunks    the site's token; chunks by sha256
//! GET  /v2/...                    read-only OCI distribution API over the images held:
//!                                 a registry mirror for Docker or containerd on the LAN
//! ```
//!
//! Architecture Invariant: a cache is trusted with nothing. Nodes take the image's
//! identity (its top digest) and chunk lists from the hub and check every chunk; the
//! cache supplies bytes only. The token (derived by the hub per site) keeps nodes of
//! other sites and other hosts on the LAN from making the cache pull images.

use crate::Agent;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use sha2::Digest as _;
use skiff_image::proxy::{ResolveRequest, CACHE_PATH};
use std::sync::{Arc, Mutex};

pub struct SiteCache {
    agent: Arc<Agent>,
    /// The site's token, as the hub last said it (`None` until it has).
    token: Mutex<Option<String>>,
    /// One pull at a time per image.
    pulls: skiff_image::proxy::Flights,
    /// The layers of the images resolved here: the only ones chunks are served from.
    served: Mutex<std::collections::HashSet<String>>,
}

impl SiteCache {
    pub fn new(agent: Arc<Agent>) -> Arc<Self> {
        Arc::new(SiteCache { agent, token: Mutex::new(None), pulls: Default::default(), served: Default::default() })
    }

    pub fn set_token(&self, token: String) {
        if let Ok(mut t) = self.token.lock() {
            *t = Some(token);
        }
    }

    fn authorized(&self, headers: &HeaderMap) -> bool {
        let given =
            headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
        let want = self.token.lock().ok().and_then(|t| t.clone());
        match (given, want) {
            // Compared as digests: the time taken says nothing about the token.
            (Some(g), Some(w)) if !w.is_empty() => sha2::Sha256::digest(g) == sha2::Sha256::digest(&w),
            _ => false,
        }
    }
}

pub fn router(cache: Arc<SiteCache>) -> Router {
    Router::new()
        .route(&format!("{CACHE_PATH}/resolve"), post(resolve))
        .route(&format!("{CACHE_PATH}/chunks"), post(chunks))
        .route("/v2/", get(|| async { ([(header::CONTENT_TYPE, "application/json")], "{}") }))
        .route("/v2/{*rest}", get(registry).head(registry))
        .layer(axum::extract::DefaultBodyLimit::max(64 << 10))
        .with_state(cache)
}

fn error(status: StatusCode, msg: impl Into<String>) -> Response {
    (status, axum::Json(serde_json::json!({"error": msg.into()}))).into_response()
}

async fn resolve(State(c): State<Arc<SiteCache>>, headers: HeaderMap, body: Bytes) -> Response {
    if !c.authorized(&headers) {
        return error(StatusCode::UNAUTHORIZED, "a site cache serves the nodes of its site (token)");
    }
    let req: ResolveRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("request: {e}")),
    };
    let platform = match skiff_image::registry::parse_platform(&req.platform) {
        Ok(p) => p,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.to_string()),
    };
    if let Err(e) = skiff_image::registry::RemoteRef::parse(&req.reference) {
        return error(StatusCode::BAD_REQUEST, e.to_string());
    }
    let Some(mut opts) = c.agent.cfg.pull.clone() else {
        return error(StatusCode::NOT_FOUND, "this node pulls no images");
    };
    let Some(hub) = opts.hub.clone() else {
        return error(StatusCode::NOT_FOUND, "this node pulls from registries, not through a hub");
    };
    opts.platform = Some(platform.clone());
    let _one = c.pulls.enter(&req.reference).await;
    let images = Arc::clone(c.agent.images());
    // Through the hub only (never straight from a registry with this node's credentials):
    // the hub decides whether the site may have the image. Pulled again each time, for a
    // tag may have moved; only what changed crosses.
    if let Err(e) = skiff_image::proxy::pull(Arc::clone(&images), &hub, &req.reference, &opts).await {
        return error(StatusCode::BAD_GATEWAY, skiff_image::error::with_causes(&e));
    }
    let reference = req.reference.clone();
    match tokio::task::spawn_blocking(move || images.resolved(&reference, &platform)).await {
        Ok(Ok(r)) => {
            if let Ok(mut s) = c.served.lock() {
                s.extend(r.layers.iter().map(|l| l.diff_id.clone()));
            }
            axum::Json(r).into_response()
        }
        Ok(Err(e)) => error(StatusCode::BAD_GATEWAY, skiff_image::error::with_causes(&e)),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn chunks(State(c): State<Arc<SiteCache>>, headers: HeaderMap, body: Bytes) -> Response {
    if !c.authorized(&headers) {
        return error(StatusCode::UNAUTHORIZED, "a site cache serves the nodes of its site (token)");
    }
    let images = Arc::clone(c.agent.images());
    let layers = c.served.lock().map(|s| s.clone()).unwrap_or_default();
    match tokio::task::spawn_blocking(move || images.proxy_chunks(&body, &layers)).await {
        Ok(Ok(bytes)) => ([(header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response(),
        Ok(Err(e)) => error(StatusCode::NOT_FOUND, skiff_image::error::with_causes(&e)),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// `/v2/<name>/manifests/<reference>` and `/v2/<name>/blobs/<digest>`, read-only.
async fn registry(State(c): State<Arc<SiteCache>>, method: Method, Path(rest): Path<String>) -> Response {
    let oci_error = |status: StatusCode, code: &str, msg: &str| {
        (status, axum::Json(serde_json::json!({"errors": [{"code": code, "message": msg}]}))).into_response()
    };
    let images = Arc::clone(c.agent.images());
    let head = method == Method::HEAD;
    if let Some((name, reference)) = rest.rsplit_once("/manifests/") {
        let (name, reference) = (name.to_string(), reference.to_string());
        let found = tokio::task::spawn_blocking(move || images.mirror_manifest(&name, &reference)).await;
        return match found {
            Ok(Ok(Some((media, bytes)))) => {
                let digest = format!("sha256:{}", hex::encode(sha2::Sha256::digest(&bytes)));
                let len = bytes.len().to_string();
                let hdrs = [
                    (header::CONTENT_TYPE, media),
                    (header::HeaderName::from_static("docker-content-digest"), digest),
                    (header::CONTENT_LENGTH, len),
                ];
                if head {
                    (hdrs, ()).into_response()
                } else {
                    (hdrs, bytes).into_response()
                }
            }
            Ok(Ok(None)) => oci_error(StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN", "not held by this cache"),
            Ok(Err(e)) => oci_error(StatusCode::BAD_REQUEST, "MANIFEST_INVALID", &e.to_string()),
            Err(e) => oci_error(StatusCode::INTERNAL_SERVER_ERROR, "UNKNOWN", &e.to_string()),
        };
    }
    if let Some((_, digest)) = rest.rsplit_once("/blobs/") {
        let Ok(path) = images.blob_path(digest) else {
            return oci_error(StatusCode::BAD_REQUEST, "DIGEST_INVALID", "not a sha256 digest");
        };
        let file = match tokio::fs::File::open(&path).await {
            Ok(f) => f,
            Err(_) => return oci_error(StatusCode::NOT_FOUND, "BLOB_UNKNOWN", "not held by this cache"),
        };
        let len = file.metadata().await.map(|m| m.len()).unwrap_or(0).to_string();
        let hdrs = [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (header::HeaderName::from_static("docker-content-digest"), digest.to_string()),
            (header::CONTENT_LENGTH, len),
        ];
        if head {
            return (hdrs, ()).into_response();
        }
        let body = axum::body::Body::from_stream(tokio_util_stream(file));
        return (hdrs, body).into_response();
    }
    oci_error(StatusCode::NOT_FOUND, "NAME_UNKNOWN", "not a registry path this cache serves")
}

/// A file as a stream of byte chunks (256 KiB reads).
fn tokio_util_stream(
    file: tokio::fs::File,
) -> impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static {
    futures_util::stream::unfold(file, |mut f| async move {
        use tokio::io::AsyncReadExt;
        let mut buf = vec![0u8; 256 << 10];
        match f.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok(Bytes::from(buf)), f))
            }
            Err(e) => Some((Err(e), f)),
        }
    })
}
