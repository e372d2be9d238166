//! Pulling from OCI distribution registries (`/v2/` API) over links that drop.
//!
//! * Manifests: OCI index, Docker manifest list, OCI manifest, Docker schema2. An index is
//!   resolved to the platform asked for (default: this machine); when none matches, the
//!   error lists what the image has.
//! * Blobs land in `tmp/partial-<hex>` (a stable name, so a killed process resumes too),
//!   continue with `Range: bytes=N-` after a dropped connection (from scratch only when
//!   the registry ignores ranges), and enter the store only after their sha256 matched.
//! * Retries: exponential backoff with jitter, bounded in count.
//! * Auth: anonymous, and the bearer-token challenge (`WWW-Authenticate: Bearer realm=…`)
//!   with basic credentials from a Docker `config.json` when present.
//! * HTTPS (rustls with ring) trusting the system roots plus an optional CA file; plain
//!   HTTP for loopback registries (as Docker allows) and `insecure_registries`.
//! * Mirrors (`crate::hosts`) are tried first; a failing mirror falls through to the next
//!   endpoint, and partial downloads carry over since they are named by digest.
//! * `--limit-rate`: one token bucket shared by every download of a pull.

use crate::digest::{sha256_hex, sha256_of, HashingReader};
use crate::error::{with_causes, IoContext};
use crate::hosts::{Endpoint, RegistriesConfig};
use crate::store::{
    choose_platform, Descriptor, Manifest, Platform, MT_DOCKER_LIST, MT_DOCKER_MANIFEST, MT_OCI_INDEX, MT_OCI_MANIFEST,
};
use crate::{ImageError, ImageStore};
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A parsed reference: `registry/repository` plus a tag or a digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteRef {
    pub registry: String,
    pub repository: String,
    /// A tag, or `sha256:…`.
    pub reference: String,
}

impl RemoteRef {
    pub fn parse(r: &str) -> Result<Self, ImageError> {
        let bad = || ImageError::BadReference(r.to_string());
        if r.is_empty() || r.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(bad());
        }
        let full = crate::normalize_reference(r);
        let (name, reference) = match full.split_once('@') {
            Some((n, d)) => {
                sha256_hex(d).map_err(|_| bad())?;
                (n.to_string(), d.to_string())
            }
            None => {
                let (n, t) = full.rsplit_once(':').ok_or_else(bad)?;
                (n.to_string(), t.to_string())
            }
        };
        let (registry, repository) = name.split_once('/').ok_or_else(bad)?;
        let ok_repo = !repository.is_empty()
            && repository.split('/').all(|c| {
                !c.is_empty()
                    && c.chars().all(|ch| ch.is_ascii_lowercase() || ch.is_ascii_digit() || "._-".contains(ch))
            });
        if !ok_repo || reference.is_empty() {
            return Err(bad());
        }
        let registry = crate::hosts::canonical_registry(registry).to_string();
        Ok(RemoteRef { registry, repository: repository.to_string(), reference })
    }
}

/// `os/arch[/variant]`.
pub fn parse_platform(s: &str) -> Result<Platform, ImageError> {
    let parts: Vec<&str> = s.split('/').collect();
    match parts.as_slice() {
        [os, arch] if !os.is_empty() && !arch.is_empty() => {
            Ok(Platform { os: os.to_string(), architecture: arch.to_string(), variant: None })
        }
        [os, arch, v] if !os.is_empty() && !arch.is_empty() && !v.is_empty() => {
            Ok(Platform { os: os.to_string(), architecture: arch.to_string(), variant: Some(v.to_string()) })
        }
        _ => Err(ImageError::BadPlatform(s.to_string())),
    }
}

/// What a pull reports while it runs: the CLI draws bars on a terminal, lines otherwise.
#[derive(Debug, Clone, Copy)]
pub enum PullEvent<'a> {
    /// A line worth showing as is: platform chosen, retries, a mirror falling through.
    Note(&'a str),
    /// The blobs to fetch are known: `size` bytes in all, `present` of them already here.
    Total { size: u64, present: u64 },
    /// `done` of a blob's `size` bytes are on disk (sent when a download starts or resumes,
    /// as bytes arrive, and with `done == size` once the blob is verified and stored).
    Blob { digest: &'a str, size: u64, done: u64 },
}

pub type Progress = Arc<dyn Fn(PullEvent<'_>) + Send + Sync>;

#[derive(Clone)]
pub struct PullOptions {
    pub platform: Option<Platform>,
    /// Registries reached over plain HTTP besides those in `registries` (loopback ones always are).
    pub insecure: Vec<String>,
    /// Mirrors, insecure registries and the extra CA file.
    pub registries: RegistriesConfig,
    /// Attempts without progress before a blob download gives up (mirrors get fewer).
    pub max_attempts: u32,
    pub parallel: usize,
    /// A Docker `config.json` with `auths`.
    pub docker_config: Option<PathBuf>,
    /// Bytes per second over all downloads of the pull.
    pub limit_rate: Option<u64>,
    /// Which images must be signed by whom (`/etc/skiff/policy.yaml`).
    pub policy: Option<Arc<crate::policy::ImagePolicy>>,
    pub progress: Progress,
    /// The hub's image proxy, tried before the registry (an agent of a hub).
    pub hub: Option<crate::proxy::HubImages>,
}

impl Default for PullOptions {
    fn default() -> Self {
        PullOptions {
            platform: None,
            insecure: vec![],
            registries: RegistriesConfig::default(),
            max_attempts: 20,
            parallel: 3,
            docker_config: docker_config_path(),
            limit_rate: None,
            policy: None,
            progress: Arc::new(|_| {}),
            hub: None,
        }
    }
}

impl PullOptions {
    pub(crate) fn note(&self, line: &str) {
        (self.progress)(PullEvent::Note(line));
    }
}

#[derive(Debug, Clone, Default)]
pub struct PullReport {
    pub reference: String,
    pub digest: String,
    /// Where the image came from: the registry or one of its mirrors (`host:port`).
    pub endpoint: String,
    /// Bytes received from the registry for blobs and manifests (or from the hub).
    pub bytes_received: u64,
    /// Through the hub: bytes a cache of the node's site sent (counted in
    /// `bytes_received`), and bytes taken from layers the node held.
    pub bytes_from_cache: u64,
    pub bytes_reused: u64,
    pub blobs_fetched: usize,
    pub blobs_present: usize,
    /// How the image policy judged the image (`None`: no rule names it).
    pub trust: Option<crate::trust::Judgement>,
}

/// A token bucket without burst credit: after `n` bytes, wait until `n / rate` seconds
/// past the later of now and the end of the previous grant.
struct RateLimit {
    rate: u64,
    next_free: tokio::sync::Mutex<tokio::time::Instant>,
}

impl RateLimit {
    fn new(rate: u64) -> Self {
        RateLimit { rate: rate.max(1), next_free: tokio::sync::Mutex::new(tokio::time::Instant::now()) }
    }

    async fn take(&self, n: u64) {
        let due = {
            let mut next = self.next_free.lock().await;
            let start = (*next).max(tokio::time::Instant::now());
            *next = start + Duration::from_secs_f64(n as f64 / self.rate as f64);
            *next
        };
        tokio::time::sleep_until(due).await;
    }
}

pub(crate) struct Client {
    http: reqwest::Client,
    pub(crate) endpoint: Endpoint,
    pub(crate) r: RemoteRef,
    token: Mutex<Option<String>>,
    basic: Option<String>,
    /// Attempts without progress before giving up on this endpoint.
    pub(crate) attempts: u32,
    pub(crate) received: Arc<AtomicU64>,
    limit: Option<Arc<RateLimit>>,
    /// Set when another download of the pull failed: the rest stop at their next chunk.
    pub(crate) cancel: std::sync::atomic::AtomicBool,
}

const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json";
const MAX_MANIFEST: usize = 4 << 20;
const MANIFEST_ATTEMPTS: u32 = 4;

/// The Docker config this process reads and `skiff login` writes: `$DOCKER_CONFIG/config.json`,
/// else `~/.docker/config.json` (as the Docker CLI).
pub fn docker_config_path() -> Option<PathBuf> {
    match std::env::var_os("DOCKER_CONFIG") {
        Some(d) if !d.is_empty() => Some(PathBuf::from(d).join("config.json")),
        _ => std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker/config.json")),
    }
}

/// The key a registry's credentials have in a Docker config (`auths`, `credHelpers`):
/// Docker Hub's is `https://index.docker.io/v1/`, others' their `host[:port]`.
pub fn docker_config_key(registry: &str) -> String {
    match crate::hosts::canonical_registry(registry) {
        "registry-1.docker.io" => "https://index.docker.io/v1/".to_string(),
        r => r.to_string(),
    }
}

/// The keys a registry's entries may have in a Docker config.
fn config_keys(registry: &str) -> Vec<String> {
    let mut want = vec![registry.to_string(), format!("https://{registry}"), format!("http://{registry}")];
    if docker_config_key(registry).starts_with("https://index.docker.io") {
        want.extend(["https://index.docker.io/v1".into(), "index.docker.io".into(), "docker.io".into()]);
    }
    want
}

fn key_matches(want: &[String], k: &str) -> bool {
    want.iter().any(|w| k.trim_end_matches('/') == w || k.starts_with(&format!("{w}/")))
}

/// The credential helper a Docker config names for `registry`: its own (`credHelpers`),
/// else the config's store (`credsStore`).
pub fn credential_helper_for(config: &serde_json::Value, registry: &str) -> Option<String> {
    let want = config_keys(registry);
    let own = config
        .get("credHelpers")
        .and_then(|h| h.as_object())
        .and_then(|h| h.iter().find(|(k, _)| key_matches(&want, k)).and_then(|(_, helper)| helper.as_str()));
    own.or_else(|| config.get("credsStore").and_then(|s| s.as_str())).map(str::to_string)
}

/// `user:password` (base64) for `registry` from a Docker config: its credential helper
/// (`credHelpers`), its `auths` entry, or the config's store (`credsStore`), in that
/// order, as the Docker CLI looks them up.
fn basic_auth_from(config: Option<&PathBuf>, registry: &str) -> Option<String> {
    let text = std::fs::read_to_string(config?).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    let want = config_keys(registry);
    let key = docker_config_key(registry);
    let own_helper =
        v.get("credHelpers").and_then(|h| h.as_object()).is_some_and(|h| h.keys().any(|k| key_matches(&want, k)));
    if own_helper {
        return credential_helper_for(&v, registry).and_then(|h| helper_get(&h, &key));
    }
    let entry = v.get("auths").and_then(|a| a.as_object()).and_then(|a| a.iter().find(|(k, _)| key_matches(&want, k)));
    if let Some(auth) = entry.and_then(|(_, e)| e.get("auth")).and_then(|a| a.as_str()) {
        return Some(auth.to_string());
    }
    credential_helper_for(&v, registry).and_then(|h| helper_get(&h, &key))
}

/// Credentials a helper gave lately, by (helper, server): a pull makes several clients,
/// and a helper (`pass`, a keychain) may be slow; asked again after a minute.
type HelperCache = std::collections::HashMap<(String, String), (std::time::Instant, Option<String>)>;
static HELPER_CACHE: std::sync::LazyLock<Mutex<HelperCache>> = std::sync::LazyLock::new(Default::default);

/// Asks a credential helper for `server`'s credentials (base64 `user:secret`).
fn helper_get(name: &str, server: &str) -> Option<String> {
    use base64::Engine;
    let k = (name.to_string(), server.to_string());
    if let Some((at, v)) = HELPER_CACHE.lock().ok().and_then(|c| c.get(&k).cloned()) {
        if at.elapsed() < Duration::from_secs(60) {
            return v;
        }
    }
    #[derive(serde::Deserialize)]
    struct Creds {
        #[serde(rename = "Username")]
        username: String,
        #[serde(rename = "Secret")]
        secret: String,
    }
    let got = run_credential_helper(name, "get", server.as_bytes())
        .map_err(|e| tracing::warn!(helper = name, "credential helper: {e}"))
        .ok()
        .and_then(|out| serde_json::from_slice::<Creds>(&out).ok())
        .map(|c| base64::engine::general_purpose::STANDARD.encode(format!("{}:{}", c.username, c.secret)));
    if let Ok(mut c) = HELPER_CACHE.lock() {
        c.insert(k, (std::time::Instant::now(), got.clone()));
    }
    got
}

/// Runs `docker-credential-NAME ACTION` (`get`, `store`, `erase`) with `input` on its
/// stdin, bounded to 10 s; its stdout.
pub fn run_credential_helper(name: &str, action: &str, input: &[u8]) -> Result<Vec<u8>, String> {
    use std::io::Write;
    if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)) {
        return Err(format!("{name:?}: a credential helper's name is letters, digits, '-', '_' or '.'"));
    }
    let bin = format!("docker-credential-{name}");
    let mut child = std::process::Command::new(&bin)
        .arg(action)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("{bin}: {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(input);
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if std::time::Instant::now() > deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("{bin} {action} did not answer in 10 s"));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(format!("{bin}: {e}")),
        }
    }
    let out = child.wait_with_output().map_err(|e| format!("{bin}: {e}"))?;
    if !out.status.success() {
        return Err(format!("{bin} {action}: {}", String::from_utf8_lossy(&out.stderr).trim()));
    }
    Ok(out.stdout)
}

/// Checks `user` and `password` against `registry` (`skiff login`): its `/v2/` with them,
/// through its token server when it has one. Mirrors are not asked.
pub async fn check_login(registry: &str, user: &str, password: &str, opts: &PullOptions) -> Result<(), ImageError> {
    use base64::Engine;
    let registry = crate::hosts::canonical_registry(registry);
    let http = http_client(opts)?;
    let r =
        RemoteRef { registry: registry.into(), repository: "library/skiff-login".into(), reference: "latest".into() };
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    let mut last = None;
    for endpoint in opts.registries.endpoints(registry, &opts.insecure).into_iter().filter(|e| !e.mirror) {
        let mut c = Client::new(&http, &endpoint, &r, opts, Arc::default(), None);
        c.basic = Some(basic.clone());
        match c.send(reqwest::Method::GET, "login", "/v2/", None, None, None).await {
            Ok(resp) if resp.status().is_success() => return Ok(()),
            Ok(resp) if resp.status() == reqwest::StatusCode::UNAUTHORIZED => {
                return Err(c.err("login", "the user name or password is wrong"))
            }
            Ok(resp) => {
                let status = resp.status();
                let body = resp.text().await.unwrap_or_default();
                return Err(c.err("login", Client::status_problem(status, &body)));
            }
            // HTTPS tried first on a registry that may be plain HTTP: the next endpoint.
            Err(e @ ImageError::Unreachable { .. }) if endpoint.probe => last = Some(e),
            // The token server turned the credentials away.
            Err(ImageError::Registry { what, problem, .. })
                if what == "token" && problem.starts_with("authentication required") =>
            {
                return Err(c.err("login", "the user name or password is wrong (the token server refused them)"))
            }
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| ImageError::NotFound(format!("no endpoint for registry {registry}"))))
}

/// `Bearer realm="…",service="…",scope="…"` → its parameters.
fn challenge(h: &str) -> Option<(String, Vec<(String, String)>)> {
    let (scheme, rest) = h.split_once(' ')?;
    let mut params = vec![];
    let mut rest = rest.trim();
    while !rest.is_empty() {
        let (k, after) = rest.split_once('=')?;
        let after = after.trim_start();
        let (v, tail) = if let Some(q) = after.strip_prefix('"') {
            let end = q.find('"')?;
            (&q[..end], &q[end + 1..])
        } else {
            let end = after.find(',').unwrap_or(after.len());
            (&after[..end], &after[end..])
        };
        params.push((k.trim().to_string(), v.to_string()));
        rest = tail.trim_start_matches(|c: char| c == ',' || c.is_whitespace());
    }
    Some((scheme.to_ascii_lowercase(), params))
}

impl Client {
    fn new(
        http: &reqwest::Client,
        endpoint: &Endpoint,
        r: &RemoteRef,
        opts: &PullOptions,
        received: Arc<AtomicU64>,
        limit: Option<Arc<RateLimit>>,
    ) -> Self {
        Client {
            http: http.clone(),
            basic: basic_auth_from(opts.docker_config.as_ref(), &endpoint.host),
            attempts: match endpoint {
                Endpoint { probe: true, .. } => 1,
                Endpoint { mirror: true, .. } => opts.max_attempts.min(3),
                _ => opts.max_attempts,
            },
            endpoint: endpoint.clone(),
            r: r.clone(),
            token: Mutex::new(None),
            received,
            limit,
            cancel: false.into(),
        }
    }

    /// The platforms of the image `self.r` names: an index lists them, a single
    /// manifest's config names its one.
    async fn platforms(&self, opts: &PullOptions) -> Result<Vec<Platform>, ImageError> {
        let (bytes, digest) = self.manifest(&self.r.reference, opts).await?;
        let m: Manifest = serde_json::from_slice(&bytes)
            .map_err(|e| ImageError::Malformed { what: digest.clone(), problem: e.to_string() })?;
        if m.is_index() {
            return Ok(m.manifests.unwrap_or_default().into_iter().filter_map(|d| d.platform).collect());
        }
        // Whatever an artifact's config says (some are `{}`), its layer is a wasm binary.
        if crate::wasm::is_artifact(&m) {
            return Ok(vec![crate::wasm::wasm_platform()]);
        }
        let config =
            m.config.ok_or_else(|| ImageError::Malformed { what: digest, problem: "manifest has no config".into() })?;
        sha256_hex(&config.digest)?;
        let what = format!("config {}", config.digest);
        let path = format!("/v2/{}/blobs/{}", self.r.repository, config.digest);
        let (bytes, _) = self.small_once(&what, &path, None, &config.digest).await.map_err(|(e, _)| e)?;
        #[derive(serde::Deserialize)]
        struct Config {
            os: String,
            architecture: String,
            #[serde(default)]
            variant: Option<String>,
        }
        let c: Config = serde_json::from_slice(&bytes)
            .map_err(|e| ImageError::Malformed { what: config.digest.clone(), problem: e.to_string() })?;
        Ok(vec![Platform { os: c.os, architecture: c.architecture, variant: c.variant }])
    }

    pub(crate) fn err(&self, what: &str, problem: impl Into<String>) -> ImageError {
        ImageError::Registry { registry: self.endpoint.host.clone(), what: what.to_string(), problem: problem.into() }
    }

    pub(crate) fn status_problem(status: reqwest::StatusCode, body: &str) -> String {
        let detail = serde_json::from_str::<serde_json::Value>(body)
            .ok()
            .and_then(|v| v["errors"][0]["message"].as_str().map(str::to_string))
            .map(|m| format!(": {m}"))
            .unwrap_or_default();
        let what = match status.as_u16() {
            401 => "authentication required (skiff login, or credentials in the Docker config)".to_string(),
            403 => "access denied".to_string(),
            404 => "not found".to_string(),
            429 => "rate limited by the registry; retry later".to_string(),
            s if s >= 500 => format!("registry error {s}"),
            s => format!("unexpected HTTP {s}"),
        };
        format!("{what}{detail}")
    }

    /// Sends a GET with auth, answering one bearer challenge.
    async fn get(
        &self,
        what: &str,
        path: &str,
        accept: Option<&str>,
        range_from: u64,
    ) -> Result<reqwest::Response, ImageError> {
        let range = (range_from > 0).then(|| format!("bytes={range_from}-"));
        self.send(reqwest::Method::GET, what, path, accept, range.as_deref(), None).await
    }

    /// GETs the byte ranges `ranges` (`Range: bytes=a-b,c-d...`, ends inclusive) of a blob.
    pub(crate) async fn get_ranges(
        &self,
        what: &str,
        digest: &str,
        ranges: &str,
    ) -> Result<reqwest::Response, ImageError> {
        let path = format!("/v2/{}/blobs/{digest}", self.r.repository);
        self.send(reqwest::Method::GET, what, &path, None, Some(ranges), None).await
    }

    /// Waits as the pull's rate limit says after `n` bytes arrived, and counts them.
    pub(crate) async fn arrived(&self, n: usize) {
        if let Some(l) = &self.limit {
            l.take(n as u64).await;
        }
        self.received.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Sends a request with auth, answering one bearer challenge. `path` is below the
    /// endpoint, or a whole URL (an upload's `Location`). A body is `(content type, bytes)`;
    /// `range` a `Range` header's value.
    async fn send(
        &self,
        method: reqwest::Method,
        what: &str,
        path: &str,
        accept: Option<&str>,
        range: Option<&str>,
        body: Option<(&str, bytes::Bytes)>,
    ) -> Result<reqwest::Response, ImageError> {
        let url = if path.starts_with("http://") || path.starts_with("https://") {
            path.to_string()
        } else {
            format!("{}{path}", self.endpoint.base)
        };
        for round in 0..2 {
            let mut req = self.http.request(method.clone(), &url);
            if let Some((ct, b)) = &body {
                req = req.header(reqwest::header::CONTENT_TYPE, *ct).body(b.clone());
            }
            if let Some(a) = accept {
                req = req.header(reqwest::header::ACCEPT, a);
            }
            if let Some(r) = range {
                req = req.header(reqwest::header::RANGE, r);
            }
            let token = self.token.lock().ok().and_then(|t| t.clone());
            if let Some(t) = token {
                req = req.bearer_auth(t);
            } else if let Some(b) = &self.basic {
                req = req.header(reqwest::header::AUTHORIZATION, format!("Basic {b}"));
            }
            let resp = req.send().await.map_err(|e| ImageError::Unreachable {
                registry: self.endpoint.host.clone(),
                what: what.to_string(),
                problem: with_causes(&e),
            })?;
            if resp.status() == reqwest::StatusCode::UNAUTHORIZED && round == 0 {
                let h = resp
                    .headers()
                    .get(reqwest::header::WWW_AUTHENTICATE)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
                if let Some((scheme, params)) = h.as_deref().and_then(challenge) {
                    if scheme == "bearer" {
                        self.fetch_token(&params).await?;
                        continue;
                    }
                }
            }
            return Ok(resp);
        }
        Err(self.err(what, "authentication required (skiff login, or credentials in the Docker config)"))
    }

    async fn fetch_token(&self, params: &[(String, String)]) -> Result<(), ImageError> {
        let get = |k: &str| params.iter().find(|(pk, _)| pk == k).map(|(_, v)| v.clone());
        let realm = get("realm").ok_or_else(|| self.err("token", "bearer challenge without realm"))?;
        let mut req = self.http.get(&realm);
        let mut q = vec![];
        if let Some(s) = get("service") {
            q.push(("service", s));
        }
        q.push(("scope", get("scope").unwrap_or_else(|| format!("repository:{}:pull", self.r.repository))));
        req = req.query(&q);
        if let Some(b) = &self.basic {
            req = req.header(reqwest::header::AUTHORIZATION, format!("Basic {b}"));
        }
        let resp =
            req.send().await.map_err(|e| self.err("token", format!("cannot reach {realm}: {}", with_causes(&e))))?;
        let status = resp.status();
        let body = resp.text().await.unwrap_or_default();
        if !status.is_success() {
            return Err(self.err("token", Self::status_problem(status, &body)));
        }
        let v: serde_json::Value =
            serde_json::from_str(&body).map_err(|e| self.err("token", format!("malformed token response: {e}")))?;
        let t = v["token"]
            .as_str()
            .or_else(|| v["access_token"].as_str())
            .ok_or_else(|| self.err("token", "token response has no token"))?;
        if let Ok(mut slot) = self.token.lock() {
            *slot = Some(t.to_string());
        }
        Ok(())
    }

    /// A manifest or index: bytes, verified against `digest` when the reference is one.
    /// Transport errors, 429 and 5xx are retried with backoff, up to `self.attempts`.
    async fn manifest(&self, reference: &str, opts: &PullOptions) -> Result<(Vec<u8>, String), ImageError> {
        let what = format!("manifest {}:{reference}", self.r.repository);
        // A few tries only: a manifest is small, and an unreachable registry should say so
        // in seconds (blob downloads keep going for as long as they make progress).
        let attempts = self.attempts.clamp(1, MANIFEST_ATTEMPTS);
        for attempt in 0..attempts {
            if attempt > 0 {
                tokio::time::sleep(backoff(attempt, &what)).await;
            }
            match self.manifest_once(&what, reference).await {
                Ok(m) => return Ok(m),
                Err((e, true)) if attempt + 1 < attempts => opts.note(&format!("{e}; retrying")),
                Err((e @ (ImageError::Registry { .. } | ImageError::Unreachable { .. }), true)) if attempts > 1 => {
                    let message = match e {
                        ImageError::Unreachable { problem, .. } => format!("cannot reach it: {problem}"),
                        ImageError::Registry { problem, .. } => problem,
                        other => other.to_string(),
                    };
                    return Err(ImageError::Transfer { registry: self.endpoint.host.clone(), what, message, attempts });
                }
                Err((e, _)) => return Err(e),
            }
        }
        Err(self.err(&what, "no attempt made"))
    }

    /// One try; the flag says whether another may succeed.
    async fn manifest_once(&self, what: &str, reference: &str) -> Result<(Vec<u8>, String), (ImageError, bool)> {
        let path = format!("/v2/{}/manifests/{reference}", self.r.repository);
        self.small_once(what, &path, Some(MANIFEST_ACCEPT), reference).await
    }

    /// One try at a document of at most 4 MiB (a manifest, an image config), verified
    /// against `reference` when it is a digest.
    async fn small_once(
        &self,
        what: &str,
        path: &str,
        accept: Option<&str>,
        reference: &str,
    ) -> Result<(Vec<u8>, String), (ImageError, bool)> {
        let resp = self.get(what, path, accept, 0).await.map_err(|e| {
            let retry = matches!(e, ImageError::Unreachable { .. });
            (e, retry)
        })?;
        let status = resp.status();
        if !status.is_success() {
            let body = resp.text().await.unwrap_or_default();
            let retry = status.as_u16() == 429 || status.is_server_error();
            return Err((self.err(what, Self::status_problem(status, &body)), retry));
        }
        let mut body = vec![];
        let mut resp = resp;
        while let Some(c) = resp.chunk().await.map_err(|e| (self.err(what, with_causes(&e)), true))? {
            body.extend_from_slice(&c);
            if body.len() > MAX_MANIFEST {
                return Err((self.err(what, "larger than 4 MiB"), false));
            }
        }
        self.received.fetch_add(body.len() as u64, Ordering::Relaxed);
        let digest = format!("sha256:{}", sha256_of(&body));
        if reference.starts_with("sha256:") && reference != digest {
            let actual = digest.trim_start_matches("sha256:").into();
            return Err((ImageError::DigestMismatch { digest: reference.to_string(), actual }, false));
        }
        Ok((body, digest))
    }
}

impl Client {
    /// Uploads a small blob unless the registry has it (monolithic upload: POST, then PUT).
    async fn upload_blob(&self, bytes: &[u8]) -> Result<Descriptor, ImageError> {
        use reqwest::Method;
        let digest = format!("sha256:{}", sha256_of(bytes));
        let what = format!("upload {digest}");
        let repo = &self.r.repository;
        let head = self.send(Method::HEAD, &what, &format!("/v2/{repo}/blobs/{digest}"), None, None, None).await?;
        if !head.status().is_success() {
            let resp = self.send(Method::POST, &what, &format!("/v2/{repo}/blobs/uploads/"), None, None, None).await?;
            let location =
                resp.headers().get(reqwest::header::LOCATION).and_then(|v| v.to_str().ok()).map(str::to_string);
            let status = resp.status();
            if status != reqwest::StatusCode::ACCEPTED {
                let body = resp.text().await.unwrap_or_default();
                return Err(self.err(&what, Self::status_problem(status, &body)));
            }
            let location = location.ok_or_else(|| self.err(&what, "upload started without a Location"))?;
            let sep = if location.contains('?') { '&' } else { '?' };
            let url = format!("{location}{sep}digest={digest}");
            let body = Some(("application/octet-stream", bytes::Bytes::copy_from_slice(bytes)));
            let resp = self.send(Method::PUT, &what, &url, None, None, body).await?;
            let status = resp.status();
            if !status.is_success() {
                let body = resp.text().await.unwrap_or_default();
                return Err(self.err(&what, Self::status_problem(status, &body)));
            }
        }
        Ok(Descriptor {
            media_type: String::new(),
            digest,
            size: bytes.len() as u64,
            platform: None,
            annotations: Default::default(),
        })
    }

    async fn put_manifest(&self, tag: &str, media_type: &str, bytes: Vec<u8>) -> Result<(), ImageError> {
        let what = format!("manifest {}:{tag}", self.r.repository);
        let path = format!("/v2/{}/manifests/{tag}", self.r.repository);
        let resp = self.send(reqwest::Method::PUT, &what, &path, None, None, Some((media_type, bytes.into()))).await?;
        let status = resp.status();
        if !status.is_success() {
            let body = resp.text().await.unwrap_or_default();
            return Err(self.err(&what, Self::status_problem(status, &body)));
        }
        Ok(())
    }
}

/// Runs `f` against the registry of `reference` itself, never a mirror (what is pushed
/// belongs there), trying its endpoints in order while one that was only a probe is
/// unreachable.
async fn at_registry<T>(
    reference: &str,
    opts: &PullOptions,
    f: impl AsyncFn(&Client) -> Result<T, ImageError>,
) -> Result<T, ImageError> {
    let r = RemoteRef::parse(reference)?;
    let http = http_client(opts)?;
    let mut res = Err(ImageError::BadReference(reference.to_string()));
    for endpoint in opts.registries.endpoints(&r.registry, &opts.insecure).into_iter().filter(|e| !e.mirror) {
        let client = Client::new(&http, &endpoint, &r, opts, Default::default(), None);
        res = f(&client).await;
        match &res {
            Err(ImageError::Unreachable { .. }) if endpoint.probe => continue,
            _ => break,
        }
    }
    res
}

/// What `sign` did.
#[derive(Debug, Clone)]
pub struct SignReport {
    /// The manifest (or index) digest signed.
    pub digest: String,
    /// `registry/repo:sha256-<hex>.sig`.
    pub signature_ref: String,
    /// False when the registry already held this very signature.
    pub added: bool,
}

/// Signs the manifest `reference` names, as `cosign sign --key` does: the simple-signing
/// payload is uploaded and its signature added as a layer of the tag `sha256-<hex>.sig`
/// (keeping the signatures already there). Goes to the registry itself, never a mirror.
pub async fn sign(
    reference: &str,
    key: &crate::trust::PrivateKey,
    opts: &PullOptions,
) -> Result<SignReport, ImageError> {
    use crate::trust;
    return at_registry(reference, opts, async |client| sign_at(client, reference, key, opts).await).await;

    async fn sign_at(
        client: &Client,
        reference: &str,
        key: &trust::PrivateKey,
        opts: &PullOptions,
    ) -> Result<SignReport, ImageError> {
        let (_, digest) = client.manifest(&client.r.reference, opts).await?;
        let repository = crate::policy::repository_of(reference);
        let payload = trust::payload(&repository, &digest);
        let signature =
            key.sign(&payload).map_err(|e| ImageError::Malformed { what: "key".into(), problem: e.to_string() })?;
        let tag = trust::signature_tag(&digest)?;
        let mut layers = match client.manifest(&tag, opts).await {
            Ok((b, d)) => {
                let m: Manifest = serde_json::from_slice(&b)
                    .map_err(|e| ImageError::Malformed { what: d, problem: e.to_string() })?;
                m.layers.unwrap_or_default()
            }
            Err(ImageError::Registry { problem, .. }) if problem.starts_with("not found") => vec![],
            Err(e) => return Err(e),
        };
        let signature_ref = format!("{repository}:{tag}");
        let mut layer = client.upload_blob(&payload).await?;
        layer.media_type = trust::SIMPLE_SIGNING.into();
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD.encode(&signature);
        // ECDSA signatures differ each time: an existing one by the same key over the same
        // payload counts as this one.
        let public = trust::PublicKey::from_pem(&key.public_pem)
            .map_err(|e| ImageError::Malformed { what: "key".into(), problem: e.to_string() })?;
        let have = layers.iter().any(|l| {
            l.digest == layer.digest
                && l.annotations.get(trust::SIGNATURE_ANNOTATION).is_some_and(|s| {
                    base64::engine::general_purpose::STANDARD.decode(s).is_ok_and(|s| public.verify(&payload, &s))
                })
        });
        if have {
            return Ok(SignReport { digest, signature_ref, added: false });
        }
        layer.annotations.insert(trust::SIGNATURE_ANNOTATION.into(), b64);
        layers.push(layer);
        // cosign's config: an empty image whose diff_ids are the payloads.
        let config = serde_json::json!({
            "architecture": "", "created": "0001-01-01T00:00:00Z",
            "history": [{"created": "0001-01-01T00:00:00Z"}], "os": "",
            "rootfs": {"type": "layers", "diff_ids": layers.iter().map(|l| l.digest.clone()).collect::<Vec<_>>()},
            "config": {}
        });
        let config_bytes = serde_json::to_vec(&config).unwrap_or_default();
        let mut config_desc = client.upload_blob(&config_bytes).await?;
        config_desc.media_type = crate::store::MT_OCI_CONFIG.into();
        let m = Manifest {
            schema_version: 2,
            media_type: Some(MT_OCI_MANIFEST.into()),
            config: Some(config_desc),
            layers: Some(layers),
            manifests: None,
        };
        let bytes =
            serde_json::to_vec(&m).map_err(|e| ImageError::Malformed { what: tag.clone(), problem: e.to_string() })?;
        client.put_manifest(&tag, MT_OCI_MANIFEST, bytes).await?;
        opts.note(&format!("{reference}: signed {digest} as {signature_ref}"));
        Ok(SignReport { digest, signature_ref, added: true })
    }
}

/// 200 ms doubling to 10 s, with up to 50 % jitter (seeded by what is retried).
pub(crate) fn backoff(failures: u32, what: &str) -> Duration {
    let base = (200u64 << failures.min(6)).min(10_000);
    let seed = format!("{what}{failures}{}", std::process::id());
    let jitter = u64::from(sha256_of(seed.as_bytes()).as_bytes()[0]) * base / 512;
    Duration::from_millis(base + jitter)
}

fn http_client(opts: &PullOptions) -> Result<reqwest::Client, ImageError> {
    let mut b = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .read_timeout(Duration::from_secs(30))
        .user_agent(concat!("skiff/", env!("CARGO_PKG_VERSION")));
    if let Some(ca) = &opts.registries.ca_file {
        let pem = std::fs::read(ca).ctx("read", ca)?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| ImageError::Malformed {
            what: ca.display().to_string(),
            problem: format!("not a PEM certificate bundle: {e}"),
        })?;
        if certs.is_empty() {
            return Err(ImageError::Malformed {
                what: ca.display().to_string(),
                problem: "holds no PEM certificate".into(),
            });
        }
        for c in certs {
            b = b.add_root_certificate(c);
        }
    }
    b.build().map_err(|e| ImageError::Malformed { what: "HTTP client".into(), problem: with_causes(&e) })
}

/// Pulls `reference` into `store` and tags it, from the first endpoint (mirrors, then the
/// registry) that serves it. On failure nothing new is tagged and the blobs this pull added
/// are removed again; partial layer downloads stay for a resume.
pub async fn pull(store: Arc<ImageStore>, reference: &str, opts: &PullOptions) -> Result<PullReport, ImageError> {
    let r = RemoteRef::parse(reference)?;
    // Through the hub first: only the chunks this node lacks cross the link. A hub that
    // cannot help leaves the pull to the registry.
    // (A refusal by the policy there is judged again here, with the registry's signatures:
    // the hub may have failed to read them.)
    if let Some(hub) = &opts.hub {
        match crate::proxy::pull(Arc::clone(&store), hub, reference, opts).await {
            Ok(rep) => return Ok(rep),
            Err(e) => opts.note(&format!("{reference}: not through the hub ({e}); pulling from the registry")),
        }
    }
    let _lease = store.lease()?;
    let endpoints = opts.registries.endpoints(&r.registry, &opts.insecure);
    let http = http_client(opts)?;
    let received = Arc::new(AtomicU64::new(0));
    let limit = opts.limit_rate.map(|b| Arc::new(RateLimit::new(b)));
    let added = Arc::new(Mutex::new(Vec::<PathBuf>::new()));
    let mut res = Err(ImageError::BadReference(reference.to_string()));
    let mut probe_err = None;
    for (i, endpoint) in endpoints.iter().enumerate() {
        let client = Arc::new(Client::new(&http, endpoint, &r, opts, Arc::clone(&received), limit.clone()));
        res = pull_inner(&store, &client, reference, opts, &added).await;
        match res {
            Err(e @ ImageError::Unreachable { .. }) if endpoint.probe => {
                tracing::debug!("{}: {e}; trying plain HTTP", endpoint.base);
                probe_err = Some(e);
                res = Err(ImageError::BadReference(reference.to_string()));
            }
            Err(ref e) if endpoint.mirror => {
                opts.note(&format!("mirror {} failed ({e}); trying {}", endpoint.base, endpoints[i + 1].base));
            }
            _ => break,
        }
    }
    // Plain HTTP answered 400 where HTTPS failed: the server speaks TLS, and the TLS
    // failure (an unknown certificate, say) is the one worth reporting.
    if let (Err(ImageError::Registry { problem, .. }), Some(p)) = (&res, probe_err) {
        if problem.starts_with("unexpected HTTP 400") {
            res = Err(p);
        }
    }
    if res.is_err() {
        let added = added.lock().map(|a| a.clone()).unwrap_or_default();
        for p in added {
            let _ = if p.is_dir() { std::fs::remove_dir_all(&p) } else { std::fs::remove_file(&p) };
        }
    }
    res.map(|mut rep| {
        rep.bytes_received = received.load(Ordering::Relaxed);
        // Chunks an earlier pull through the hub kept for a resume are not needed now.
        if let Ok(hex) = sha256_hex(&rep.digest) {
            let _ = std::fs::remove_file(store.root().join("tmp").join(format!("partial-chunks-{hex}")));
        }
        rep
    })
}

/// The platforms `reference` is built for, read from the registry (its manifest, and the
/// config of a single-platform image) without storing anything: what the hub places by.
/// Mirrors are tried first, as for a pull; each endpoint gets one try, so that an apply
/// is not held up by a registry that is down (the image then places on any architecture).
pub async fn platforms(reference: &str, opts: &PullOptions) -> Result<Vec<Platform>, ImageError> {
    let r = RemoteRef::parse(reference)?;
    let http = http_client(opts)?;
    let opts = PullOptions { max_attempts: 1, ..opts.clone() };
    let mut res = Err(ImageError::BadReference(reference.to_string()));
    for endpoint in opts.registries.endpoints(&r.registry, &opts.insecure) {
        let client = Client::new(&http, &endpoint, &r, &opts, Default::default(), None);
        res = client.platforms(&opts).await;
        if res.is_ok() {
            break;
        }
    }
    res
}

async fn pull_inner(
    store: &Arc<ImageStore>,
    client: &Arc<Client>,
    reference: &str,
    opts: &PullOptions,
    added: &Arc<Mutex<Vec<PathBuf>>>,
) -> Result<PullReport, ImageError> {
    let say = |m: String| opts.note(&m);
    let (top_bytes, top_digest) = client.manifest(&client.r.reference, opts).await?;
    let top: Manifest = serde_json::from_slice(&top_bytes)
        .map_err(|e| ImageError::Malformed { what: top_digest.clone(), problem: e.to_string() })?;
    // Noted before they are created, so that a failure removes them whenever it strikes.
    let remember = |p: Result<PathBuf, ImageError>| {
        if let (Ok(p), Ok(mut a)) = (p, added.lock()) {
            a.push(p);
        }
    };
    // Signatures first: an image the policy refuses is not downloaded at all.
    // Without a rule they are still kept when the registry has them (one small request),
    // so that a rule made later, or a node the image is carried to, can judge it offline.
    let (trust, signatures) = match opts.policy.as_deref().and_then(|p| Some((p, p.rule_for(reference)?))) {
        Some((policy, rule)) => {
            let (j, sigs) = check_signatures(client, reference, &top_digest, policy, rule, opts).await?;
            (Some(j), sigs)
        }
        None => match fetch_signatures(client, &top_digest, opts).await {
            Ok(sigs) => (None, sigs),
            Err(e) => {
                tracing::debug!("{reference}: signatures not read: {e}");
                (None, vec![])
            }
        },
    };
    let (manifest, manifest_digest) = if top.is_index() {
        let want = opts.platform.clone().unwrap_or_else(crate::store::host_platform);
        let list = top.manifests.clone().unwrap_or_default();
        let chosen = choose_platform(&list, &want, reference)?.clone();
        say(format!("{reference}: platform {want} -> {}", chosen.digest));
        let (b, d) = client.manifest(&chosen.digest, opts).await?;
        if !store.has_blob(&d) {
            remember(store.blob_path(&d));
        }
        store.put_blob_bytes(&b, Some(&d))?;
        let m: Manifest = serde_json::from_slice(&b)
            .map_err(|e| ImageError::Malformed { what: d.clone(), problem: e.to_string() })?;
        (m, d)
    } else {
        (top.clone(), top_digest.clone())
    };
    match manifest.media_type.as_deref() {
        None | Some(MT_OCI_MANIFEST) | Some(MT_DOCKER_MANIFEST) => {}
        Some(MT_OCI_INDEX) | Some(MT_DOCKER_LIST) => {
            return Err(ImageError::Malformed {
                what: manifest_digest,
                problem: "an index points at another index".into(),
            });
        }
        Some(other) => return Err(ImageError::UnsupportedMediaType(other.to_string())),
    }
    let config = manifest.config.clone().ok_or_else(|| ImageError::Malformed {
        what: manifest_digest.clone(),
        problem: "manifest has no config".into(),
    })?;
    let layers = manifest.layers.clone().unwrap_or_default();
    let mut report = PullReport {
        reference: crate::normalize_reference(reference),
        digest: top_digest.clone(),
        endpoint: client.endpoint.host.clone(),
        trust,
        ..Default::default()
    };
    let all = || std::iter::once(&config).chain(&layers);
    let present_bytes: u64 = all().filter(|d| store.has_blob(&d.digest)).map(|d| d.size).sum();
    (opts.progress)(PullEvent::Total { size: all().map(|d| d.size).sum(), present: present_bytes });
    // The config first: its diff_ids let each layer be unpacked as soon as it arrives.
    sha256_hex(&config.digest)?;
    if store.has_blob(&config.digest) {
        report.blobs_present += 1;
    } else {
        report.blobs_fetched += 1;
        remember(store.blob_path(&config.digest));
        fetch_blob(store, client, &config, opts, None).await?;
    }
    // A Wasm artifact's layers are stored as verified blobs and never unpacked.
    let diff_ids: Vec<Option<String>> = if crate::wasm::is_artifact(&manifest) {
        vec![None; layers.len()]
    } else {
        let diff_ids = store.diff_ids(&config.digest)?;
        if diff_ids.len() != layers.len() {
            return Err(ImageError::Malformed {
                what: config.digest.clone(),
                problem: format!("config lists {} diff_ids for {} layers", diff_ids.len(), layers.len()),
            });
        }
        diff_ids.into_iter().map(Some).collect()
    };
    let sem = Arc::new(tokio::sync::Semaphore::new(opts.parallel.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    for (desc, diff_id) in layers.into_iter().zip(diff_ids) {
        sha256_hex(&desc.digest)?;
        // A layer rebuilt from chunks (a bundle) has its tar but not the registry's blob.
        let rebuilt = |d: &String| store.has_blob(d) && store.layer_dir(d).is_ok_and(|p| p.exists());
        let present = store.has_blob(&desc.digest) || diff_id.as_ref().is_some_and(rebuilt);
        if present {
            (opts.progress)(PullEvent::Blob { digest: &desc.digest, size: desc.size, done: desc.size });
            report.blobs_present += 1;
        } else {
            report.blobs_fetched += 1;
        }
        if !present {
            remember(store.blob_path(&desc.digest));
        }
        if let Some(diff_id) = &diff_id {
            if !store.layer_dir(diff_id).is_ok_and(|d| d.exists()) {
                remember(store.layer_dir(diff_id));
            }
        }
        let (store, client, sem, opts) = (Arc::clone(store), Arc::clone(client), Arc::clone(&sem), opts.clone());
        tasks.spawn(async move {
            let _permit = sem.acquire_owned().await;
            let layer =
                diff_id.map(|diff_id| crate::store::LayerRef { digest: desc.digest.clone(), diff_id, size: desc.size });
            let mut reused = 0;
            if !present {
                // A zstd:chunked layer: only what the node lacks, when that is worth it.
                let partial = match &layer {
                    Some(l) => match crate::chunked::pull_layer(&store, &client, &desc, l, &opts).await {
                        Ok(p) => p,
                        Err(e) if client.cancel.load(Ordering::Relaxed) => return Err(e),
                        Err(e) => {
                            opts.note(&format!("{}: not by its parts ({e}); fetching the whole layer", desc.digest));
                            None
                        }
                    },
                    None => None,
                };
                match partial {
                    Some(p) => reused = p.reused,
                    None => fetch_blob(&store, &client, &desc, &opts, layer.as_ref()).await?,
                }
            }
            if client.cancel.load(Ordering::Relaxed) {
                return Err(client.err(&desc.digest, "cancelled"));
            }
            let Some(layer) = layer else { return Ok(reused) };
            // Already unpacked while it downloaded, unless the download had to resume.
            let st = Arc::clone(&store);
            crate::error::blocking("unpack", move || {
                st.ensure_layer(&layer)?;
                // Its TOC, so that later versions are pulled by their parts.
                if st.has_blob(&desc.digest) {
                    st.keep_toc_from_blob(&desc, &layer.diff_id);
                }
                Ok(reused)
            })
            .await?
        });
    }
    // On the first failure the others are told to stop, and are waited for: what they
    // were writing is finished or removed before the caller cleans up.
    let mut first_err = None;
    while let Some(r) = tasks.join_next().await {
        let err = match r {
            Ok(Ok(reused)) => {
                report.bytes_reused += reused;
                continue;
            }
            Ok(Err(e)) => e,
            Err(e) => ImageError::Malformed { what: "download task".into(), problem: e.to_string() },
        };
        client.cancel.store(true, Ordering::Relaxed);
        first_err.get_or_insert(err);
    }
    if let Some(e) = first_err {
        return Err(e);
    }
    // Every layer is stored, unpacked and verified by now: the top manifest (or index),
    // then the tag, come last.
    if !store.has_blob(&top_digest) {
        remember(store.blob_path(&top_digest));
    }
    store.put_blob_bytes(&top_bytes, Some(&top_digest))?;
    if !signatures.is_empty() {
        store.put_signatures(&top_digest, &signatures)?;
    }
    store.tag(reference, &top_digest)?;
    say(format!("{reference}: pulled {top_digest}"));
    Ok(report)
}

/// The signatures of the manifest `digest` in the client's repository: cosign's and
/// Notation's, each read and checked against its digest.
async fn fetch_signatures(
    client: &Client,
    digest: &str,
    opts: &PullOptions,
) -> Result<Vec<crate::trust::StoredSignature>, ImageError> {
    let mut sigs = fetch_cosign(client, digest, opts).await?;
    // Notation's artifacts are looked up beside: a registry that answers that lookup
    // badly must not cost the cosign signatures already read.
    match fetch_notation(client, digest, opts).await {
        Ok(n) => sigs.extend(n),
        Err(e) if sigs.is_empty() => return Err(e),
        Err(e) => tracing::debug!("{digest}: Notation signatures not read: {e}"),
    }
    Ok(sigs)
}

/// Whether a registry answered that it has no such manifest or tag.
fn not_found(e: &ImageError) -> bool {
    matches!(e, ImageError::Registry { problem, .. } if problem.starts_with("not found"))
}

/// The cosign signatures of `digest` (the tag `sha256-<hex>.sig`; none when there is no
/// such tag).
async fn fetch_cosign(
    client: &Client,
    digest: &str,
    opts: &PullOptions,
) -> Result<Vec<crate::trust::StoredSignature>, ImageError> {
    use crate::trust;
    let tag = trust::signature_tag(digest)?;
    let (bytes, d) = match client.manifest(&tag, opts).await {
        Ok(m) => m,
        Err(e) if not_found(&e) => return Ok(vec![]),
        Err(e) => return Err(e),
    };
    let m: Manifest =
        serde_json::from_slice(&bytes).map_err(|e| ImageError::Malformed { what: d, problem: e.to_string() })?;
    let mut sigs = vec![];
    for layer in trust::signature_layers(&m).into_iter().take(MAX_SIGNATURES) {
        sha256_hex(&layer.digest)?;
        let what = format!("signature payload {}", layer.digest);
        let path = format!("/v2/{}/blobs/{}", client.r.repository, layer.digest);
        let (payload, _) = client.small_once(&what, &path, None, &layer.digest).await.map_err(|(e, _)| e)?;
        sigs.push(trust::StoredSignature::new(layer.clone(), &payload));
    }
    Ok(sigs)
}

/// The artifacts referring to `digest`: the OCI referrers API's index, or where the
/// registry has none (the Distribution registry 2.x) the index its tag fallback keeps
/// (`sha256-<hex>`). `None` when there is neither.
async fn referrers(client: &Client, digest: &str, opts: &PullOptions) -> Result<Option<serde_json::Value>, ImageError> {
    let index = match referrers_api(client, digest).await {
        Some(b) => b,
        None => match client.manifest(&referrers_tag(digest)?, opts).await {
            Ok((b, _)) => b,
            Err(e) if not_found(&e) => return Ok(None),
            Err(e) => return Err(e),
        },
    };
    let v: serde_json::Value = serde_json::from_slice(&index)
        .map_err(|e| ImageError::Malformed { what: format!("referrers of {digest}"), problem: e.to_string() })?;
    Ok(Some(v))
}

/// The referrers API's index of `digest`; `None` where the registry has no such API
/// (or does not answer it).
async fn referrers_api(client: &Client, digest: &str) -> Option<Vec<u8>> {
    let path = format!("/v2/{}/referrers/{digest}", client.r.repository);
    client.small_once("referrers", &path, Some(MT_OCI_INDEX), "").await.ok().map(|(b, _)| b)
}

/// The tag of the referrers fallback: `sha256-<hex>`.
fn referrers_tag(digest: &str) -> Result<String, ImageError> {
    Ok(format!("sha256-{}", sha256_hex(digest)?))
}

/// The Notation signatures of `digest`: referrers of the signature artifact type whose
/// `subject` is `digest`, each envelope read and checked against its digest.
async fn fetch_notation(
    client: &Client,
    digest: &str,
    opts: &PullOptions,
) -> Result<Vec<crate::trust::StoredSignature>, ImageError> {
    use crate::notation;
    let Some(index) = referrers(client, digest, opts).await? else { return Ok(vec![]) };
    let mut sigs = vec![];
    let listed = index["manifests"].as_array().cloned().unwrap_or_default();
    for d in listed.iter().filter(|d| d["artifactType"] == notation::ARTIFACT_TYPE).take(MAX_SIGNATURES) {
        let Some(sig_digest) = d["digest"].as_str() else { continue };
        sha256_hex(sig_digest)?;
        let (bytes, _) = client.manifest(sig_digest, opts).await?;
        let m: serde_json::Value = serde_json::from_slice(&bytes)
            .map_err(|e| ImageError::Malformed { what: sig_digest.to_string(), problem: e.to_string() })?;
        let kind = m["artifactType"].as_str().or(m["config"]["mediaType"].as_str());
        if m["subject"]["digest"] != digest || kind != Some(notation::ARTIFACT_TYPE) {
            continue;
        }
        for layer in m["layers"].as_array().into_iter().flatten() {
            let Ok(layer) = serde_json::from_value::<Descriptor>(layer.clone()) else { continue };
            if ![notation::JWS, notation::COSE].contains(&layer.media_type.as_str()) {
                continue;
            }
            // Envelopes are a few KiB (a certificate chain and a timestamp): bounded in
            // size and number, whatever a registry lists.
            if layer.size > MAX_ENVELOPE || sigs.len() >= MAX_SIGNATURES {
                continue;
            }
            sha256_hex(&layer.digest)?;
            let what = format!("signature envelope {}", layer.digest);
            let path = format!("/v2/{}/blobs/{}", client.r.repository, layer.digest);
            let (envelope, _) = client.small_once(&what, &path, None, &layer.digest).await.map_err(|(e, _)| e)?;
            sigs.push(crate::trust::StoredSignature::new(layer, &envelope));
        }
    }
    Ok(sigs)
}

/// Signs the manifest `reference` names as `notation sign` does (a JWS envelope, ES256,
/// scheme `notary.x509`, by `key` whose certificate heads `chain_pem`): the signature is
/// an artifact whose subject is the manifest, listed in the referrers fallback index
/// where the registry has no referrers API. Goes to the registry itself, never a mirror.
pub async fn sign_notation(
    reference: &str,
    key: &crate::trust::PrivateKey,
    chain_pem: &str,
    opts: &PullOptions,
) -> Result<SignReport, ImageError> {
    return at_registry(reference, opts, async |client| notation_at(client, reference, key, chain_pem, opts).await)
        .await;

    async fn notation_at(
        client: &Client,
        reference: &str,
        key: &crate::trust::PrivateKey,
        chain_pem: &str,
        opts: &PullOptions,
    ) -> Result<SignReport, ImageError> {
        use crate::notation;
        use serde_json::json;
        let (bytes, digest) = client.manifest(&client.r.reference, opts).await?;
        let head: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
        let media_type = head["mediaType"].as_str().unwrap_or(MT_OCI_MANIFEST).to_string();
        let subject = json!({"mediaType": media_type, "digest": digest, "size": bytes.len()});
        let now = notation::format_rfc3339(
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0),
        );
        let envelope = notation::sign(&subject, key, chain_pem, &now)
            .map_err(|problem| ImageError::Malformed { what: "notation signature".into(), problem })?;
        let layer = client.upload_blob(&envelope).await?;
        let config = client.upload_blob(b"{}").await?;
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": MT_OCI_MANIFEST,
            "config": {"mediaType": notation::ARTIFACT_TYPE, "digest": config.digest, "size": config.size},
            "layers": [{"mediaType": notation::JWS, "digest": layer.digest, "size": layer.size}],
            "subject": subject,
            "annotations": {"org.opencontainers.image.created": now},
        });
        let manifest_bytes = serde_json::to_vec(&manifest).unwrap_or_default();
        let sig_digest = format!("sha256:{}", sha256_of(&manifest_bytes));
        let size = manifest_bytes.len();
        client.put_manifest(&sig_digest, MT_OCI_MANIFEST, manifest_bytes).await?;
        // A registry with the referrers API lists it by its subject; others need the
        // fallback index (read, added to, written back).
        if referrers_api(client, &digest).await.is_none() {
            let tag = referrers_tag(&digest)?;
            let mut index = match client.manifest(&tag, opts).await {
                Ok((b, d)) => serde_json::from_slice::<serde_json::Value>(&b)
                    .map_err(|e| ImageError::Malformed { what: d, problem: e.to_string() })?,
                Err(e) if not_found(&e) => json!({"schemaVersion": 2, "mediaType": MT_OCI_INDEX, "manifests": []}),
                Err(e) => return Err(e),
            };
            let entry = json!({
                "mediaType": MT_OCI_MANIFEST, "digest": sig_digest, "size": size,
                "artifactType": notation::ARTIFACT_TYPE,
                "annotations": {"org.opencontainers.image.created": now},
            });
            match index["manifests"].as_array_mut() {
                Some(list) => list.push(entry),
                None => index["manifests"] = json!([entry]),
            }
            client.put_manifest(&tag, MT_OCI_INDEX, serde_json::to_vec(&index).unwrap_or_default()).await?;
        }
        let repository = crate::policy::repository_of(reference);
        let signature_ref = format!("{repository}@{sig_digest}");
        opts.note(&format!("{reference}: signed {digest} with Notation as {signature_ref}"));
        Ok(SignReport { digest, signature_ref, added: true })
    }
}

/// The signatures the registry of `reference` holds for its manifest `digest` (mirrors
/// first, as for a pull): for an image stored without them.
pub async fn signatures(
    reference: &str,
    digest: &str,
    opts: &PullOptions,
) -> Result<Vec<crate::trust::StoredSignature>, ImageError> {
    let r = RemoteRef::parse(reference)?;
    let http = http_client(opts)?;
    let mut res = Ok(vec![]);
    for endpoint in opts.registries.endpoints(&r.registry, &opts.insecure) {
        let client = Client::new(&http, &endpoint, &r, opts, Default::default(), None);
        res = fetch_signatures(&client, digest, opts).await;
        if res.as_ref().is_ok_and(|s| !s.is_empty()) {
            break;
        }
    }
    res
}

/// Checks the signatures `reference` has in its registry against `rule` without pulling
/// the image (`skiff image verify`): the digest judged and the judgement. A refusal is an
/// answer here, not an error.
pub async fn verify(
    reference: &str,
    rule: &crate::policy::Rule,
    opts: &PullOptions,
) -> Result<(String, crate::trust::Judgement), ImageError> {
    let r = RemoteRef::parse(reference)?;
    let http = http_client(opts)?;
    let policy = crate::policy::ImagePolicy { rules: vec![rule.clone()], source: None };
    let warn = crate::policy::Rule { mode: crate::policy::Mode::Warn, ..rule.clone() };
    let mut res = Err(ImageError::BadReference(reference.to_string()));
    for endpoint in opts.registries.endpoints(&r.registry, &opts.insecure) {
        let client = Client::new(&http, &endpoint, &r, opts, Default::default(), None);
        res = async {
            let (_, digest) = client.manifest(&r.reference, opts).await?;
            let (j, _) = check_signatures(&client, reference, &digest, &policy, &warn, opts).await?;
            Ok((digest, crate::trust::Judgement { mode: rule.mode, ..j }))
        }
        .await;
        // A mirror without the signature tags must not hide the registry's.
        let verified = matches!(&res, Ok((_, j)) if matches!(j.verdict, crate::trust::Verdict::Verified { .. }));
        if verified || (res.is_ok() && !endpoint.mirror) {
            break;
        }
    }
    res
}

/// At most this many signatures of one image are read.
const MAX_SIGNATURES: usize = 32;
/// The largest Notation envelope read.
const MAX_ENVELOPE: u64 = 256 << 10;

/// Reads the cosign signatures of `digest` (the tag `sha256-<hex>.sig` of the same
/// repository) and judges them by `rule`; refuses, before anything is stored, an image the
/// rule enforces and no signature vouches for. Returns the signatures to keep beside it.
async fn check_signatures(
    client: &Client,
    reference: &str,
    digest: &str,
    policy: &crate::policy::ImagePolicy,
    rule: &crate::policy::Rule,
    opts: &PullOptions,
) -> Result<(crate::trust::Judgement, Vec<crate::trust::StoredSignature>), ImageError> {
    use crate::trust::{self, Judgement, Verdict};
    // Signatures that cannot be read are no signatures: refused under enforce, a warning
    // under warn (the pull goes on).
    let (sigs, verdict) = match fetch_signatures(client, digest, opts).await {
        Ok(sigs) => {
            let v = trust::verify_stored(&sigs, &crate::policy::repository_of(reference), digest, rule);
            (sigs, v)
        }
        Err(e) => (vec![], Verdict::Rejected(format!("its signatures cannot be read: {e}"))),
    };
    let judgement = Judgement { mode: rule.mode, verdict };
    match &judgement.verdict {
        Verdict::Verified { key } => opts.note(&format!("{reference}: signature verified ({key})")),
        Verdict::Rejected(reason) if judgement.allows() => {
            opts.note(&format!("{reference}: WARNING: not trusted ({reason}); the image policy only warns"))
        }
        Verdict::Rejected(reason) => {
            return Err(ImageError::Untrusted {
                image: reference.to_string(),
                digest: digest.to_string(),
                policy: policy.source_name(),
                reason: reason.clone(),
            })
        }
    }
    Ok((judgement, sigs))
}

/// Unpacks a layer as its bytes arrive, in a blocking task fed through a bounded channel,
/// so that a download from the first byte needs no second pass over the blob.
struct StreamUnpack {
    tx: tokio::sync::mpsc::Sender<bytes::Bytes>,
    task: tokio::task::JoinHandle<Result<PathBuf, ImageError>>,
}

/// `Read` over the chunks of a `StreamUnpack`; the end of the channel is the end of input.
struct ChannelReader {
    rx: tokio::sync::mpsc::Receiver<bytes::Bytes>,
    cur: bytes::Bytes,
}

impl std::io::Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.cur.is_empty() {
            match self.rx.blocking_recv() {
                Some(b) => self.cur = b,
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.cur.len());
        buf[..n].copy_from_slice(&self.cur.split_to(n));
        Ok(n)
    }
}

impl StreamUnpack {
    fn start(store: &Arc<ImageStore>, layer: &crate::store::LayerRef) -> Self {
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let (store, layer) = (Arc::clone(store), layer.clone());
        let task = tokio::task::spawn_blocking(move || {
            store.unpack_to_tmp(&layer, ChannelReader { rx, cur: bytes::Bytes::new() })
        });
        StreamUnpack { tx, task }
    }

    /// The unpacked, diff_id-verified directory, if the unpack got every byte and succeeded.
    async fn finish(self) -> Option<PathBuf> {
        drop(self.tx);
        self.task.await.ok()?.ok()
    }

    /// Stops the unpack (the download will resume from a later offset) and removes its work.
    async fn abandon(self) {
        if let Some(tmp) = self.finish().await {
            let _ = std::fs::remove_dir_all(tmp);
        }
    }
}

/// One download of a blob at a time in a store (two pulls sharing a layer, a hub serving
/// several nodes): the second finds it stored. Held until dropped.
pub(crate) async fn one_download(
    store: &Arc<ImageStore>,
    hex: &str,
) -> Result<nix::fcntl::Flock<std::fs::File>, ImageError> {
    let lock_path = store.root().join("tmp").join(format!("lock-{hex}"));
    crate::error::blocking("download", move || {
        let f = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&lock_path);
        crate::gc::lock_exclusive(f.ctx("open", &lock_path)?, &lock_path)
    })
    .await?
}

/// Downloads one blob with resume and retries, then verifies and commits it. A layer
/// (`unpack`) downloaded from its first byte is unpacked on the way.
async fn fetch_blob(
    store: &Arc<ImageStore>,
    client: &Client,
    desc: &Descriptor,
    opts: &PullOptions,
    unpack: Option<&crate::store::LayerRef>,
) -> Result<(), ImageError> {
    let hex = sha256_hex(&desc.digest)?.to_string();
    let short = &hex[..12];
    let partial = store.root().join("tmp").join(format!("partial-{hex}"));
    let _one = one_download(store, &hex).await?;
    if store.has_blob(&desc.digest) {
        return Ok(());
    }
    let what = format!("blob {}", desc.digest);
    let mut last_err = String::new();
    // Only attempts that make no progress count against `max_attempts` and back off: a
    // link that drops every few MB keeps going as long as bytes arrive. `HARD_CAP` bounds
    // the loop regardless.
    const HARD_CAP: u32 = 100_000;
    let mut failures = 0u32;
    let mut before = u64::MAX;
    // The digest is computed as bytes arrive; a resumed file's prefix is hashed once.
    let mut hasher: Option<(sha2::Sha256, u64)> = None;
    for round in 0..HARD_CAP {
        if client.cancel.load(Ordering::Relaxed) {
            return Err(client.err(&what, "cancelled"));
        }
        let now_have = std::fs::metadata(&partial).map(|m| m.len()).unwrap_or(0);
        if round > 0 {
            if now_have > before {
                failures = 0;
            } else {
                failures += 1;
                if failures >= client.attempts.max(1) {
                    break;
                }
                tokio::time::sleep(backoff(failures, &format!("{hex}{round}"))).await;
            }
        }
        before = now_have;
        let mut have = now_have;
        if have > desc.size {
            have = 0;
        }
        if have == desc.size && desc.size > 0 {
            break;
        }
        let resp =
            match client.get(&what, &format!("/v2/{}/blobs/{}", client.r.repository, desc.digest), None, have).await {
                Ok(r) => r,
                Err(e) => {
                    last_err = e.to_string();
                    opts.note(&format!("{short}: {last_err}; retrying"));
                    continue;
                }
            };
        let status = resp.status();
        let append = match status.as_u16() {
            206 => true,
            200 => false,
            416 if have == desc.size => break,
            s if s == 429 || s >= 500 => {
                last_err = Client::status_problem(status, "");
                continue;
            }
            _ => {
                let body = resp.text().await.unwrap_or_default();
                return Err(client.err(&what, Client::status_problem(status, &body)));
            }
        };
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(append)
            .write(true)
            .truncate(!append)
            .open(&partial)
            .ctx("open", &partial)?;
        let start = if append { have } else { 0 };
        if hasher.as_ref().map(|(_, n)| *n) != Some(start) {
            hasher = Some((prefix_hash(&partial, start)?, start));
        }
        let mut resp = resp;
        let mut got = if append { have } else { 0 };
        (opts.progress)(PullEvent::Blob { digest: &desc.digest, size: desc.size, done: got });
        let mut stream = unpack
            .filter(|l| !append && !store.layer_dir(&l.diff_id).is_ok_and(|d| d.exists()))
            .map(|l| StreamUnpack::start(store, l));
        let mut cut = false;
        let mut fatal = None;
        loop {
            if client.cancel.load(Ordering::Relaxed) {
                cut = true;
                last_err = "cancelled".into();
                break;
            }
            match resp.chunk().await {
                Ok(Some(c)) => {
                    client.arrived(c.len()).await;
                    got += c.len() as u64;
                    if got > desc.size {
                        let _ = std::fs::remove_file(&partial);
                        fatal = Some(client.err(
                            &what,
                            format!("registry sent more than the {} bytes the manifest declares", desc.size),
                        ));
                        break;
                    }
                    if let Err(e) = f.write_all(&c).ctx("write", &partial) {
                        fatal = Some(e);
                        break;
                    }
                    if let Some(s) = &stream {
                        if s.tx.send(c.clone()).await.is_err() {
                            // The unpack failed; unpacking from the stored blob will say why.
                            if let Some(s) = stream.take() {
                                s.abandon().await;
                            }
                        }
                    }
                    if let Some((h, n)) = hasher.as_mut() {
                        sha2::Digest::update(h, &c);
                        *n += c.len() as u64;
                    }
                    if got < desc.size {
                        (opts.progress)(PullEvent::Blob { digest: &desc.digest, size: desc.size, done: got });
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    last_err = e.to_string();
                    cut = true;
                    break;
                }
            }
        }
        if let (None, Err(e)) = (&fatal, f.flush().ctx("write", &partial)) {
            fatal = Some(e);
        }
        drop(f);
        if let Some(e) = fatal {
            // Waits for the unpack to stop, so no work of it outlives the pull.
            if let Some(s) = stream.take() {
                s.abandon().await;
            }
            return Err(e);
        }
        if cut || got < desc.size {
            if let Some(s) = stream.take() {
                s.abandon().await;
            }
            if last_err.is_empty() || !cut {
                last_err = format!("connection closed at {got} of {} bytes", desc.size);
            }
            opts.note(&format!("{short}: {last_err}; resuming at {got}"));
            continue;
        }
        let actual = hasher.take().map(|(h, _)| hex::encode(sha2::Digest::finalize(h)));
        let committed = commit(store, &partial, &desc.digest, actual);
        if let (Some(s), Some(layer)) = (stream.take(), unpack) {
            match (&committed, s.finish().await) {
                (Ok(()), Some(tmp)) => {
                    store.place_layer(layer, &tmp)?;
                }
                (Err(_), Some(tmp)) => {
                    let _ = std::fs::remove_dir_all(tmp);
                }
                (_, None) => {}
            }
        }
        committed?;
        (opts.progress)(PullEvent::Blob { digest: &desc.digest, size: desc.size, done: desc.size });
        return Ok(());
    }
    let have = std::fs::metadata(&partial).map(|m| m.len()).unwrap_or(0);
    if have == desc.size {
        commit(store, &partial, &desc.digest, None)?;
        (opts.progress)(PullEvent::Blob { digest: &desc.digest, size: desc.size, done: desc.size });
        return Ok(());
    }
    Err(ImageError::Transfer {
        registry: client.endpoint.host.clone(),
        what,
        message: last_err,
        attempts: client.attempts,
    })
}

/// The sha256 state of the first `len` bytes of `path`.
fn prefix_hash(path: &std::path::Path, len: u64) -> Result<sha2::Sha256, ImageError> {
    let mut h = <sha2::Sha256 as sha2::Digest>::new();
    if len > 0 {
        let f = std::fs::File::open(path).ctx("open", path)?;
        let mut r = std::io::Read::take(std::io::BufReader::new(f), len);
        std::io::copy(&mut r, &mut h).ctx("read", path)?;
    }
    Ok(h)
}

/// Verifies a complete partial file (by the digest computed while it arrived, else by
/// reading it) and renames it into the store.
fn commit(
    store: &ImageStore,
    partial: &std::path::Path,
    digest: &str,
    computed: Option<String>,
) -> Result<(), ImageError> {
    let actual = match computed {
        Some(a) => a,
        None => {
            let f = std::fs::File::open(partial).ctx("open", partial)?;
            HashingReader::new(std::io::BufReader::new(f)).finish().ctx("read", partial)?
        }
    };
    if format!("sha256:{actual}") != digest {
        let _ = std::fs::remove_file(partial);
        return Err(ImageError::DigestMismatch { digest: digest.to_string(), actual });
    }
    let dst = store.blob_path(digest)?;
    // Synced before it is named by its digest: a blob in `blobs/` after a power cut is a
    // whole one.
    std::fs::File::open(partial).and_then(|f| f.sync_all()).ctx("sync", partial)?;
    skiff_sys::crash::point("image.blob.synced");
    crate::store::durable_rename(partial, &dst)?;
    skiff_sys::crash::point("image.blob.stored");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references() {
        let r = RemoteRef::parse("127.0.0.1:5000/team/app:1.4").unwrap();
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str(), r.reference.as_str()),
            ("127.0.0.1:5000", "team/app", "1.4")
        );
        assert!(crate::hosts::is_loopback(&r.registry));
        let r = RemoteRef::parse("busybox").unwrap();
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str(), r.reference.as_str()),
            ("registry-1.docker.io", "library/busybox", "latest")
        );
        assert!(!crate::hosts::is_loopback(&r.registry));
        // Docker Hub named by host, and a tag beside a digest (the digest decides).
        let r = RemoteRef::parse("docker.io/busybox").unwrap();
        assert_eq!((r.registry.as_str(), r.repository.as_str()), ("registry-1.docker.io", "library/busybox"));
        let d = format!("sha256:{}", "a".repeat(64));
        let r = RemoteRef::parse(&format!("busybox:1.36@{d}")).unwrap();
        assert_eq!((r.repository.as_str(), r.reference.as_str()), ("library/busybox", d.as_str()));
        for bad in ["", "a b", "Reg/UPPER:1", "x@sha256:zz"] {
            assert!(RemoteRef::parse(bad).is_err(), "{bad}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn rate_limit_spaces_bytes_out_on_a_paused_clock() {
        let l = RateLimit::new(1000);
        let t0 = tokio::time::Instant::now();
        for _ in 0..10 {
            l.take(500).await;
        }
        assert_eq!(t0.elapsed(), Duration::from_secs(5));
        // Idle time earns no burst: the next 1000 bytes still take a second.
        tokio::time::sleep(Duration::from_secs(60)).await;
        let t1 = tokio::time::Instant::now();
        l.take(1000).await;
        assert_eq!(t1.elapsed(), Duration::from_secs(1));
    }

    #[test]
    fn platforms_and_challenges() {
        assert_eq!(parse_platform("linux/arm/v7").unwrap().variant.as_deref(), Some("v7"));
        assert!(parse_platform("linux").is_err());
        let (s, p) = challenge(
            r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull""#,
        )
        .unwrap();
        assert_eq!(s, "bearer");
        assert_eq!(p[0], ("realm".into(), "https://auth.example/token".into()));
        assert_eq!(p[2], ("scope".into(), "repository:a/b:pull".into()));
    }
}
