//! The CLI's HTTP client for the hub API.

use crate::config::ClientConfig;
use anyhow::{Context, Result};
use serde::de::DeserializeOwned;
use serde::Serialize;
use skiff_model::api::ErrorBody;

pub struct Client {
    http: reqwest::Client,
    cfg: ClientConfig,
    /// The hub this command moved to, from one cut off from the store (see `elsewhere`).
    moved: std::sync::Mutex<Option<String>>,
    /// For the other hubs tried then: with a short connect timeout, as `answering` has.
    other_http: std::sync::OnceLock<reqwest::Client>,
}

/// The hub answered with an error: its status and what it said. Callers decide by the
/// status (`e.downcast_ref::<ApiError>()`), not by the text.
#[derive(Debug, thiserror::Error)]
#[error("{message} ({status})")]
pub struct ApiError {
    pub status: reqwest::StatusCode,
    pub message: String,
}

/// Says the hub's `Warning` header (`199 skiff "TEXT"`) on stderr, once per command.
fn warn_once(resp: &reqwest::Response) {
    static SAID: std::sync::Once = std::sync::Once::new();
    let Some(text) = resp.headers().get(reqwest::header::WARNING).and_then(|v| v.to_str().ok()) else { return };
    let text = text.split_once(" skiff ").map(|(_, t)| t).unwrap_or(text).trim_matches('"');
    SAID.call_once(|| eprintln!("warning: {text}"));
}

/// A hub's refusal that changed nothing because it was cut off from its store before the
/// request came: the request may go to another hub as it is.
fn refused_cut_off(resp: &reqwest::Response) -> bool {
    resp.status() == reqwest::StatusCode::SERVICE_UNAVAILABLE
        && resp.headers().get(skiff_model::api::UNCHANGED_HEADER).is_some_and(|v| v == "cut-off")
}

/// The hub a `421 Misdirected Request` names as holding the instance's node (see
/// [`skiff_model::api::NODE_HUB_HEADER`]), if the config names that hub too: the admin
/// token goes only to hubs the operator's config lists.
fn node_hub(cfg: &ClientConfig, status: reqwest::StatusCode, headers: &reqwest::header::HeaderMap) -> Option<String> {
    if status != reqwest::StatusCode::MISDIRECTED_REQUEST {
        return None;
    }
    let hub = headers.get(skiff_model::api::NODE_HUB_HEADER)?.to_str().ok()?.trim_end_matches('/');
    std::iter::once(&cfg.server).chain(&cfg.servers).find(|s| s.trim_end_matches('/') == hub).cloned()
}

/// `req` sent to the hub at `base` instead.
fn sent_to(req: &reqwest::Request, base: &str) -> Option<reqwest::Request> {
    let base = reqwest::Url::parse(base).ok()?;
    let mut r = req.try_clone()?;
    let url = r.url_mut();
    url.set_scheme(base.scheme()).ok()?;
    url.set_host(base.host_str()).ok()?;
    url.set_port(base.port_or_known_default()).ok()?;
    Some(r)
}

/// The HTTP client for `cfg`'s hubs, trusting only its CA (when it has one).
fn http_client(cfg: &ClientConfig, connect_timeout: Option<std::time::Duration>) -> Result<reqwest::Client> {
    let mut b = reqwest::Client::builder();
    if let Some(t) = connect_timeout {
        b = b.connect_timeout(t);
    }
    if let Some(ca) = &cfg.ca {
        // Pinned: the hub's own CA only, not the system roots.
        let cert = reqwest::Certificate::from_pem(ca.as_bytes()).context("the config's ca is not a PEM certificate")?;
        b = b.tls_built_in_root_certs(false).add_root_certificate(cert);
    } else if cfg.server.starts_with("http://") {
        // No TLS to verify (a hub on loopback): the system's roots are not read (some
        // hundred files, most of a short command's time).
        b = b.tls_built_in_root_certs(false);
    }
    b.build().context("building the HTTP client")
}

impl Client {
    pub fn new(mut cfg: ClientConfig) -> Result<Self> {
        cfg.server = cfg.answering();
        let http = http_client(&cfg, None)?;
        Ok(Client { http, cfg, moved: Default::default(), other_http: Default::default() })
    }

    /// Why nothing answered: one hub not running, or (`refused`: no connection was made
    /// at all, so no request went out) no hub of a shared store leading.
    fn unreachable(&self, refused: bool) -> String {
        if self.cfg.servers.is_empty() || !refused {
            return format!("cannot reach the hub at {} (is `skiff up` or `skiff hub` running?)", self.base());
        }
        let mut all: Vec<&str> = vec![];
        for s in std::iter::once(&self.cfg.server).chain(&self.cfg.servers) {
            if !all.contains(&s.as_str()) {
                all.push(s);
            }
        }
        format!(
            "no hub answers ({}): a hub of a shared store that starts again waits for the store before it \
             serves, so the store (etcd) may be out of reach; nothing was changed, and nodes keep running their \
             workloads",
            all.join(", ")
        )
    }

    /// The hub this command talks to: the config's that answered, or the one it moved to.
    fn base(&self) -> String {
        self.moved.lock().ok().and_then(|m| m.clone()).unwrap_or_else(|| self.cfg.server.clone())
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base().trim_end_matches('/'))
    }

    pub async fn send(&self, req: reqwest::RequestBuilder) -> Result<reqwest::Response> {
        let req = req.bearer_auth(&self.cfg.token).build().context("building the request")?;
        let spare = req.try_clone();
        let resp = self.http.execute(req).await.map_err(|e| {
            anyhow::anyhow!(skiff_image::error::with_causes(&e)).context(self.unreachable(e.is_connect()))
        })?;
        let resp = match spare {
            Some(spare) if refused_cut_off(&resp) => self.elsewhere(spare).await.unwrap_or(resp),
            // The instance's node is on another hub of the store: asked there, once.
            Some(spare) => match node_hub(&self.cfg, resp.status(), resp.headers()).and_then(|h| sent_to(&spare, &h)) {
                Some(there) => self.http.execute(there).await.map_err(|e| {
                    anyhow::anyhow!(skiff_image::error::with_causes(&e)).context(self.unreachable(e.is_connect()))
                })?,
                None => resp,
            },
            _ => resp,
        };
        warn_once(&resp);
        if resp.status().is_success() || resp.status() == reqwest::StatusCode::NOT_MODIFIED {
            return Ok(resp);
        }
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        let message = serde_json::from_str::<ErrorBody>(&text).map(|e| e.error).unwrap_or(text);
        Err(ApiError { status, message }.into())
    }

    /// `req`, which a hub cut off from the store refused without changing anything, to
    /// the config's other hubs in turn: the first answer that is not such a refusal, nor
    /// a failure of that hub's own (a node not yet back on its tunnel is no better). Another
    /// hub of the store may lead by now (a partition between the first and the store, not
    /// the CLI); the rest of the command goes to it. Only refusals are sent again: an
    /// answer the cut-off hub gave (a read of what it last saw, an exec, a restart through
    /// a node's tunnel) stands, with its warning.
    async fn elsewhere(&self, req: reqwest::Request) -> Option<reqwest::Response> {
        let current = self.base();
        let http = match self.other_http.get() {
            Some(h) => h,
            None => {
                let h = http_client(&self.cfg, Some(std::time::Duration::from_secs(2))).ok()?;
                self.other_http.get_or_init(|| h)
            }
        };
        for other in std::iter::once(&self.cfg.server).chain(&self.cfg.servers).filter(|s| **s != current) {
            let Some(r) = sent_to(&req, other) else { continue };
            match http.execute(r).await {
                Ok(resp) if !refused_cut_off(&resp) && !resp.status().is_server_error() => {
                    if let Ok(mut m) = self.moved.lock() {
                        *m = Some(other.clone());
                    }
                    return Some(resp);
                }
                _ => continue,
            }
        }
        None
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        Ok(self.send(self.http.get(self.url(path))).await?.json().await?)
    }

    pub async fn post<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> Result<T> {
        Ok(self.send(self.http.post(self.url(path)).json(body)).await?.json().await?)
    }

    /// POSTs raw `bytes` (an image archive) to `path` with `query`.
    pub async fn post_bytes<T: DeserializeOwned>(
        &self,
        path: &str,
        query: &[(&str, &str)],
        bytes: Vec<u8>,
    ) -> Result<T> {
        let req =
            self.http.post(self.url(path)).query(query).header(reqwest::header::CONTENT_TYPE, "application/x-tar");
        Ok(self.send(req.body(bytes)).await?.json().await?)
    }

    pub async fn delete(&self, path: &str) -> Result<()> {
        self.send(self.http.delete(self.url(path))).await?;
        Ok(())
    }

    /// One round of a long-poll watch: the list at `path` once it differs from the
    /// version `tag` names (waiting up to `wait` seconds), with its new tag; `None` when
    /// nothing changed in that time.
    pub async fn watch(&self, path: &str, tag: Option<&str>, wait: u64) -> Result<Option<(Vec<u8>, String)>> {
        let mut req = self.http.get(self.url(path)).query(&[("wait", wait)]);
        if let Some(t) = tag {
            req = req.header(reqwest::header::IF_NONE_MATCH, t);
        }
        let resp = self.send(req).await?;
        if resp.status() == reqwest::StatusCode::NOT_MODIFIED {
            return Ok(None);
        }
        let tag = resp.headers().get(reqwest::header::ETAG).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
        Ok(Some((resp.bytes().await?.to_vec(), tag)))
    }

    /// Opens a WebSocket to `path` (the interactive exec), with the token, trusting only
    /// the config's CA.
    pub async fn websocket(
        &self,
        path: &str,
    ) -> Result<tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>> {
        match self.websocket_at(&self.base(), path).await? {
            Ok(ws) => Ok(ws),
            // The instance's node is on another hub of the store: dialled there, once.
            Err(hub) => match self.websocket_at(&hub, path).await? {
                Ok(ws) => Ok(ws),
                Err(again) => anyhow::bail!("the hub at {hub} sent this to the hub at {again} in turn"),
            },
        }
    }

    /// The WebSocket at `base`, or the other hub that a `421` names.
    async fn websocket_at(
        &self,
        base: &str,
        path: &str,
    ) -> Result<
        std::result::Result<
            tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
            String,
        >,
    > {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let url = format!("{}{path}", base.trim_end_matches('/'));
        let url = match url.strip_prefix("https://") {
            Some(rest) => format!("wss://{rest}"),
            None => url.replacen("http://", "ws://", 1),
        };
        let mut req = url.as_str().into_client_request().with_context(|| format!("the hub's address {url}"))?;
        let auth = format!("Bearer {}", self.cfg.token).parse().context("the config's token is not a header value")?;
        req.headers_mut().insert(reqwest::header::AUTHORIZATION, auth);
        let connector = match (&self.cfg.ca, url.starts_with("wss://")) {
            (Some(ca), true) => {
                let tls = skiff_agent::tls::trusting(ca).map_err(|e| anyhow::anyhow!("the config's ca: {e}"))?;
                Some(tokio_tungstenite::Connector::Rustls(std::sync::Arc::new(tls)))
            }
            // No CA of its own: the system's roots, as the other commands use.
            _ => None,
        };
        let dial = tokio_tungstenite::connect_async_tls_with_config(req, None, false, connector);
        let (ws, _) = match tokio::time::timeout(std::time::Duration::from_secs(30), dial).await {
            Ok(Ok(ws)) => ws,
            Ok(Err(tokio_tungstenite::tungstenite::Error::Http(resp))) => {
                let status = resp.status();
                if let Some(hub) = node_hub(&self.cfg, status, resp.headers()) {
                    return Ok(Err(hub));
                }
                let text = resp.body().as_deref().map(String::from_utf8_lossy).unwrap_or_default().to_string();
                let message = serde_json::from_str::<ErrorBody>(&text).map(|e| e.error).unwrap_or(text);
                return Err(ApiError { status, message }.into());
            }
            Ok(Err(e)) => {
                use tokio_tungstenite::tungstenite::Error as WsError;
                let refused = matches!(&e, WsError::Io(io) if io.kind() == std::io::ErrorKind::ConnectionRefused);
                return Err(anyhow::anyhow!(e)).with_context(|| self.unreachable(refused));
            }
            Err(_) => anyhow::bail!("the hub at {base} did not answer within 30 s"),
        };
        Ok(Ok(ws))
    }

    pub async fn stream(&self, path: &str) -> Result<reqwest::Response> {
        self.send(self.http.get(self.url(path))).await
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use skiff_hub::store::{SqliteStore, Store};
    use std::sync::Arc;

    /// A `421` sends the CLI, with its admin token, only to a hub its config lists: a
    /// hub's (or anything's) word cannot draw the token to another address (invariant 7).
    #[test]
    fn a_misdirected_answer_is_followed_only_to_a_hub_the_config_lists() {
        let cfg = ClientConfig {
            server: "https://10.0.0.1:7443".into(),
            token: "admin".into(),
            ca: None,
            servers: vec!["https://10.0.0.2:7443".into()],
        };
        let said = |hub: &str| {
            let mut h = reqwest::header::HeaderMap::new();
            h.insert(skiff_model::api::NODE_HUB_HEADER, hub.parse().unwrap());
            h
        };
        let misdirected = reqwest::StatusCode::MISDIRECTED_REQUEST;
        assert_eq!(
            node_hub(&cfg, misdirected, &said("https://10.0.0.2:7443/")).as_deref(),
            Some("https://10.0.0.2:7443")
        );
        assert_eq!(node_hub(&cfg, misdirected, &said("https://attacker.example:7443")), None);
        assert_eq!(node_hub(&cfg, misdirected, &said("https://10.0.0.2:7443.evil")), None);
        assert_eq!(node_hub(&cfg, reqwest::StatusCode::OK, &said("https://10.0.0.2:7443")), None, "only a 421");
        assert_eq!(node_hub(&cfg, misdirected, &reqwest::header::HeaderMap::new()), None);
    }

    /// A real hub's API on loopback (plain HTTP) over `store`; its address.
    async fn serve(store: Arc<dyn Store>, pki: &std::path::Path) -> String {
        let ca = skiff_hub::pki::Ca::load_or_create(pki).unwrap();
        let fleet = skiff_hub::fleet::Fleet::new(ca, Arc::clone(&store), skiff_hub::clock::system()).unwrap();
        let nodes = Arc::new(skiff_hub::nodes::Remote(Arc::new(fleet)));
        let hub = Arc::new(skiff_hub::Hub::new(store, nodes, "admin".into()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, skiff_hub::api::router(hub)).await });
        format!("http://{addr}")
    }

    /// A real hub's API on loopback over TLS with `cert_pem`/`key_pem` (from the CA in `pki`).
    async fn serve_tls(store: Arc<dyn Store>, pki: &std::path::Path, cert_pem: &str, key_pem: &str) -> String {
        let ca = skiff_hub::pki::Ca::load_or_create(pki).unwrap();
        let tls = skiff_hub::tls::server_config(cert_pem, key_pem, ca.pem()).unwrap();
        let fleet = skiff_hub::fleet::Fleet::new(ca, Arc::clone(&store), skiff_hub::clock::system()).unwrap();
        let nodes = Arc::new(skiff_hub::nodes::Remote(Arc::new(fleet)));
        let hub = Arc::new(skiff_hub::Hub::new(store, nodes, "admin".into()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cfg = skiff_hub::serve::ServeConfig::new(Some(tls), 100, 100, 100.0);
        let (stop, stopped) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            skiff_hub::serve::serve(listener, skiff_hub::api::router(hub), cfg, stopped).await;
            drop(stop);
        });
        format!("https://{addr}")
    }

    /// Invariant 7: the CLI sends its admin token on to the other hubs of its config only
    /// over TLS pinned to the fleet's CA, and a node's certificate (signed by that CA, but
    /// for client authentication only and naming no address) does not pass for a hub's:
    /// a node that listens on a hub's address gets no request, hence no token. The
    /// control: a hub's own certificate from the same CA takes the change.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_node_posing_as_a_hub_gets_no_request_and_no_token() {
        let t = tempfile::tempdir().unwrap();
        let ca = skiff_hub::pki::Ca::load_or_create(&t.path().join("pki")).unwrap();
        let inner: Arc<dyn Store> = Arc::new(SqliteStore::open(&t.path().join("hub.db")).unwrap());
        let remembering = Arc::new(skiff_hub::remember::Remembering::new(Arc::clone(&inner)).keeping());
        let cut = serve(Arc::clone(&remembering) as Arc<dyn Store>, &t.path().join("pki")).await;
        remembering.cut_off("etcd at 127.0.0.1:2379 does not answer");
        // The node's: its own key and CSR (asking for 127.0.0.1 would not help: the CA
        // names the node only), signed as at its join.
        let (node_key, csr) = skiff_agent::join::node_csr("edge-1").unwrap();
        let now = skiff_runtime::time::now_ms();
        let node = ca.sign_node("edge-1", &csr, now, std::time::Duration::from_secs(3600)).unwrap();
        let posing_store: Arc<dyn Store> = Arc::new(SqliteStore::open(&t.path().join("posing.db")).unwrap());
        let posing = serve_tls(Arc::clone(&posing_store), &t.path().join("pki"), &node.pem, &node_key).await;
        let (hub_cert, hub_key) = ca.server_cert(&["127.0.0.1".to_string()]).unwrap();
        let real = serve_tls(Arc::clone(&inner), &t.path().join("pki"), &hub_cert, &hub_key).await;
        let config = |servers: Vec<String>| ClientConfig {
            server: cut.clone(),
            token: "admin".into(),
            ca: Some(ca.pem().to_string()),
            servers,
        };
        let apply = serde_json::json!({"deployments": [{"name": "web", "image": "img:1"}]});

        let only_posing = Client::new(config(vec![posing.clone()])).unwrap();
        let e = only_posing.post::<_, serde_json::Value>("/api/v1/apply", &apply).await.unwrap_err();
        let e = e.downcast_ref::<ApiError>().unwrap();
        assert_eq!(e.status, reqwest::StatusCode::SERVICE_UNAVAILABLE, "the cut-off hub's refusal stands: {e}");
        let with_real = Client::new(config(vec![posing, real])).unwrap();
        with_real.post::<_, serde_json::Value>("/api/v1/apply", &apply).await.unwrap();
        assert_eq!(inner.list().unwrap().len(), 1, "the hub took it");
        assert!(posing_store.list().unwrap().is_empty(), "the node posing as a hub took nothing");
    }

    /// Two hubs of one store; the config's first is cut off from it (a partition), the
    /// other reaches it. A change the first refused goes to the other, and so does the
    /// rest of that command; a read the cut-off hub answered stands (with its warning);
    /// with no other hub named, the refusal is what the CLI gets.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_change_a_cut_off_hub_refused_goes_to_one_that_is_not() {
        let t = tempfile::tempdir().unwrap();
        let inner: Arc<dyn Store> = Arc::new(SqliteStore::open(&t.path().join("hub.db")).unwrap());
        let remembering = Arc::new(skiff_hub::remember::Remembering::new(Arc::clone(&inner)).keeping());
        let cut = serve(Arc::clone(&remembering) as Arc<dyn Store>, &t.path().join("pki")).await;
        let reaching = serve(inner, &t.path().join("pki")).await;
        let config =
            |servers: Vec<String>| ClientConfig { server: cut.clone(), token: "admin".into(), ca: None, servers };
        let apply = |image: &str| serde_json::json!({"deployments": [{"name": "web", "image": image}]});
        let image = |listed: &[serde_json::Value]| listed[0]["spec"]["image"].as_str().unwrap_or_default().to_string();
        let before = Client::new(config(vec![])).unwrap();
        before.post::<_, serde_json::Value>("/api/v1/apply", &apply("img:1")).await.unwrap();
        assert_eq!(image(&before.get::<Vec<serde_json::Value>>("/api/v1/deployments").await.unwrap()), "img:1");
        remembering.cut_off("etcd at 127.0.0.1:2379 does not answer");

        let alone = Client::new(config(vec![])).unwrap();
        let e = alone.post::<_, serde_json::Value>("/api/v1/apply", &apply("img:2")).await.unwrap_err();
        let e = e.downcast_ref::<ApiError>().unwrap();
        assert!(e.status == reqwest::StatusCode::SERVICE_UNAVAILABLE && e.message.contains("does not answer"), "{e}");

        let both = Client::new(config(vec![reaching.clone()])).unwrap();
        both.post::<_, serde_json::Value>("/api/v1/apply", &apply("img:2")).await.unwrap();
        assert_eq!(image(&both.get::<Vec<serde_json::Value>>("/api/v1/deployments").await.unwrap()), "img:2");
        // A new command starts at the cut-off hub again, whose read stands: what it last saw.
        let again = Client::new(config(vec![reaching])).unwrap();
        assert_eq!(image(&again.get::<Vec<serde_json::Value>>("/api/v1/deployments").await.unwrap()), "img:1");
    }
}
