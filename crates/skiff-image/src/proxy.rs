//! The hub as image proxy: it pulls an image from the registry once (with its own
//! credentials and mirrors), keeps it, and serves each agent the manifest, config,
//! signatures and every layer's chunk list; the agent fetches only the chunks that no
//! layer it holds has, several per request, rebuilds each layer's exact tar and checks its
//! diff_id. An agent that cannot get an image from its hub pulls from the registry.
//!
//! ```text
//! POST <base>/resolve  {"reference", "platform"}  -> Resolved (JSON)
//! POST <base>/chunks   N × 32-byte sha256          -> the N chunks, concatenated
//! ```
//! `<base>` is `/api/v1/nodes/<node>/images` on the hub, behind the node's certificate.
//!
//! Architecture Invariant: the hub vouches for nothing. The agent checks the manifest and
//! config by their digests (the top digest is what the reference resolved to, and what
//! signatures sign), each chunk by its sha256 and each layer by the config's diff_id.

use crate::chunks::{self, ChunkRef, Pool, MAX_SIZE};
use crate::digest::{sha256_hex, sha256_of};
use crate::error::{with_causes, IoContext};
use crate::registry::{PullOptions, PullReport};
use crate::store::{LayerRef, Manifest, Platform};
use crate::trust::StoredSignature;
use crate::{ImageError, ImageStore};
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::sync::Arc;
use std::time::Duration;

/// Chunks asked for in one request (at most `MAX_BATCH * MAX_SIZE` bytes back).
pub const MAX_BATCH: usize = 256;
/// A batch is closed once it holds this many bytes.
const BATCH_BYTES: u64 = 4 << 20;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ResolveRequest {
    pub reference: String,
    /// `os/arch[/variant]`.
    pub platform: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Resolved {
    pub reference: String,
    /// The manifest or index the reference points at.
    pub top: String,
    /// Top, the platform's manifest and its config, base64, by digest.
    pub blobs: BTreeMap<String, String>,
    #[serde(default)]
    pub signatures: Vec<StoredSignature>,
    pub layers: Vec<ProxyLayer>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProxyLayer {
    pub digest: String,
    pub diff_id: String,
    pub size: u64,
    /// The chunk list (`chunks::encode_list`), base64.
    pub chunks: String,
}

/// How an agent reaches its hub's image proxy.
#[derive(Clone)]
pub struct HubImages {
    /// The hub the node is connected to (`https://hub:port`; the agent's tunnel changes it
    /// when it moves to another hub of the fleet).
    pub hub: Arc<std::sync::RwLock<String>>,
    pub node: String,
    /// A client that presents the node's certificate (made per pull: it is renewed).
    pub client: Arc<dyn Fn() -> Result<reqwest::Client, String> + Send + Sync>,
}

impl HubImages {
    fn at(&self, what: &str) -> String {
        let hub = self.hub.read().map(|h| h.trim_end_matches('/').to_string()).unwrap_or_default();
        format!("{hub}/api/v1/nodes/{}/{what}", self.node)
    }

    /// `https://hub:port/api/v1/nodes/<node>/images`.
    pub fn base(&self) -> String {
        self.at("images")
    }

    /// `https://hub:port/api/v1/nodes/<node>/site-caches`: the site's caches and token.
    pub fn site_caches(&self) -> String {
        self.at("site-caches")
    }
}

/// Where a site cache answers (`<url>/skiff/v1/images/resolve`, `.../chunks`).
pub const CACHE_PATH: &str = "/skiff/v1/images";

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn unb64(s: &str, what: &str) -> Result<Vec<u8>, ImageError> {
    base64::engine::general_purpose::STANDARD
        .decode(s)
        .map_err(|e| ImageError::Malformed { what: what.into(), problem: format!("not base64: {e}") })
}

fn proxy_err(what: impl Into<String>, problem: impl Into<String>) -> ImageError {
    ImageError::Registry { registry: "hub".into(), what: what.into(), problem: problem.into() }
}

// ---- the hub's side ----

/// One pull at a time per image (several nodes asking a hub or a site cache for the same
/// update wait for the first pull and share it).
#[derive(Default)]
pub struct Flights(tokio::sync::Mutex<std::collections::HashMap<String, Arc<tokio::sync::Mutex<()>>>>);

impl Flights {
    pub async fn enter(&self, key: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = Arc::clone(self.0.lock().await.entry(key.to_string()).or_default());
        lock.lock_owned().await
    }
}

/// Resolves `reference` for `platform` in the hub's store: pulled from the registry (a
/// tag may have moved), or as stored when the registry cannot be reached. Each layer's
/// tar is kept uncompressed beside it so chunks can be read at their offsets.
pub async fn resolve(store: Arc<ImageStore>, req: &ResolveRequest, opts: &PullOptions) -> Result<Resolved, ImageError> {
    let platform = crate::registry::parse_platform(&req.platform)?;
    let opts = PullOptions { platform: Some(platform.clone()), ..opts.clone() };
    if let Err(e) = crate::registry::pull(Arc::clone(&store), &req.reference, &opts).await {
        if store.top_digest(&req.reference).is_err() {
            return Err(e);
        }
        tracing::warn!(image = %req.reference, "serving the stored image: the registry failed: {e}");
    }
    let reference = req.reference.clone();
    tokio::task::spawn_blocking(move || store.resolved(&reference, &platform))
        .await
        .map_err(|e| proxy_err("resolve", e.to_string()))?
}

impl ImageStore {
    /// The answer to a resolve for an image this store holds (a site cache answers with it).
    pub fn resolved(&self, reference: &str, platform: &Platform) -> Result<Resolved, ImageError> {
        let _lease = self.lease()?;
        let info = self.inspect_platform(reference, platform)?;
        if info.wasm.is_some() {
            return Err(ImageError::UnsupportedMediaType(format!(
                "{reference} is a WebAssembly artifact; the hub proxies container images"
            )));
        }
        let top = self.top_digest(reference)?;
        let mut blobs = BTreeMap::new();
        for d in [&top, &info.manifest_digest, &info.config_digest] {
            blobs.insert(d.clone(), b64(&self.read_blob(d)?));
        }
        let mut layers = vec![];
        for l in &info.layers {
            self.keep_tar(l)?;
            let index = self.chunk_index(l)?;
            layers.push(ProxyLayer {
                digest: l.digest.clone(),
                diff_id: l.diff_id.clone(),
                size: l.size,
                chunks: b64(&chunks::encode_list(&index.chunks)),
            });
        }
        Ok(Resolved { reference: info.reference, top: top.clone(), blobs, signatures: self.signatures(&top)?, layers })
    }

    /// Keeps a layer's uncompressed tar as the blob named by its diff_id.
    fn keep_tar(&self, l: &LayerRef) -> Result<(), ImageError> {
        if self.has_blob(&l.diff_id) {
            return Ok(());
        }
        let tmp = self.tmp_dir("tar")?;
        let res = (|| {
            let path = tmp.join("layer.tar");
            let mut f = fs::File::create(&path).ctx("create", &path)?;
            std::io::copy(&mut self.open_layer_stream(&l.digest)?, &mut f).ctx("write", &path)?;
            drop(f);
            self.put_blob_file(&path, Some(&l.diff_id)).map(|_| ())
        })();
        let _ = fs::remove_dir_all(&tmp);
        res
    }

    /// Removes the least recently used images of `order` (oldest first; the last, just
    /// served, stays) while the store's blobs take more than `limit` bytes. Returns the
    /// references removed.
    pub fn evict_lru(&self, limit: u64, order: &[String]) -> Result<Vec<String>, ImageError> {
        let mut gone = vec![];
        for r in order.iter().take(order.len().saturating_sub(1)) {
            if self.blob_bytes()? <= limit {
                break;
            }
            match self.remove(r, &Default::default()) {
                Ok(()) | Err(ImageError::NotFound(_)) => gone.push(r.clone()),
                // Untagged; collected by the next eviction once no pull runs.
                Err(ImageError::Busy) => {
                    gone.push(r.clone());
                    break;
                }
                Err(e) => return Err(e),
            }
            tracing::info!(image = %r, "evicted from the image cache (least recently used)");
        }
        Ok(gone)
    }

    fn blob_bytes(&self) -> Result<u64, ImageError> {
        let dir = self.root().join("blobs/sha256");
        let entries = fs::read_dir(&dir).ctx("read", &dir)?;
        Ok(entries.flatten().filter_map(|e| e.metadata().ok()).map(|m| m.len()).sum())
    }

    /// The chunks named in `body` (32 bytes each), concatenated, read from the kept tars
    /// of `layers` (the layers of images the asker resolved here) and checked.
    pub fn proxy_chunks(&self, body: &[u8], layers: &HashSet<String>) -> Result<Vec<u8>, ImageError> {
        use std::os::unix::fs::FileExt;
        if body.is_empty() || !body.len().is_multiple_of(32) || body.len() / 32 > MAX_BATCH {
            return Err(proxy_err("chunks", format!("want 1 to {MAX_BATCH} sha256 digests of 32 bytes each")));
        }
        let _lease = self.lease()?;
        let wanted: Vec<[u8; 32]> = body
            .chunks_exact(32)
            .map(|d| {
                let mut a = [0u8; 32];
                a.copy_from_slice(d);
                a
            })
            .collect();
        let set: HashSet<[u8; 32]> = wanted.iter().copied().collect();
        let found = self.find_chunks_in(&set, layers.iter().cloned(), true)?;
        let mut out = Vec::new();
        for d in &wanted {
            let loc = found.get(d).ok_or_else(|| {
                proxy_err("chunks", format!("no chunk sha256:{} in the images resolved here", hex::encode(d)))
            })?;
            let path = self.blob_path(&loc.diff_id)?;
            let start = out.len();
            out.resize(start + loc.len as usize, 0);
            let read = |buf: &mut [u8]| -> Result<bool, ImageError> {
                let f = fs::File::open(&path).ctx("open", &path)?;
                f.read_exact_at(buf, loc.offset).ctx("read", &path)?;
                Ok(ChunkRef::of(buf).digest == *d)
            };
            // A kept tar that went bad on disk is made again from the layer's blob, once.
            let good = read(&mut out[start..])? || (self.repair_tar(&loc.diff_id)? && read(&mut out[start..])?);
            if !good {
                return Err(proxy_err("chunks", format!("the kept tar of layer {} is damaged", loc.diff_id)));
            }
        }
        Ok(out)
    }

    /// Makes a layer's kept tar again from its (compressed) blob; false when there is none.
    fn repair_tar(&self, diff_id: &str) -> Result<bool, ImageError> {
        let Some(index) = self.stored_chunk_index(diff_id)? else { return Ok(false) };
        if index.source == diff_id || !self.has_blob(&index.source) {
            return Ok(false);
        }
        tracing::warn!(layer = %diff_id, "the kept tar does not match its digest; made again from {}", index.source);
        let path = self.blob_path(diff_id)?;
        fs::remove_file(&path).ctx("remove", &path)?;
        self.keep_tar(&LayerRef { digest: index.source, diff_id: diff_id.to_string(), size: 0 })?;
        Ok(true)
    }
}

/// Reads at most `limit` bytes of an answer (a hub, a cache or an error page may be
/// anyone's: memory is not theirs to take).
async fn read_capped(mut resp: reqwest::Response, limit: usize) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    while let Some(piece) = resp.chunk().await.map_err(|e| with_causes(&e))? {
        if out.len() + piece.len() > limit {
            return Err(format!("the answer is longer than {limit} bytes"));
        }
        out.extend_from_slice(&piece);
    }
    Ok(out)
}

/// The answer to a resolve (its manifests, config and chunk lists) is at most this long.
const MAX_RESOLVED: usize = 64 << 20;

/// An unsuccessful answer as a message: its JSON `error`, else its text (both capped).
async fn failure(resp: reqwest::Response) -> String {
    let status = resp.status();
    let body = read_capped(resp, 64 << 10).await.unwrap_or_default();
    let msg = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(String::from))
        .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
    format!("HTTP {status}: {msg}")
}

/// The caches of the node's site and the site's token, as its hub tells them.
pub async fn site_caches(client: &reqwest::Client, url: &str) -> Result<skiff_model::proto::SiteCaches, String> {
    let resp = client.get(url).timeout(Duration::from_secs(30)).send().await.map_err(|e| with_causes(&e))?;
    if !resp.status().is_success() {
        return Err(failure(resp).await);
    }
    serde_json::from_slice(&read_capped(resp, 1 << 20).await?).map_err(|e| e.to_string())
}

// ---- the agent's side ----

/// Pulls `reference` through the hub's image proxy into `store`: only chunks no stored
/// layer has cross the link. A pull that is cut resumes from the chunks it kept.
pub async fn pull(
    store: Arc<ImageStore>,
    hub: &HubImages,
    reference: &str,
    opts: &PullOptions,
) -> Result<PullReport, ImageError> {
    let client = (hub.client)().map_err(|e| proxy_err("client", e))?;
    let platform = opts.platform.clone().unwrap_or_else(crate::store::host_platform);
    let req = ResolveRequest { reference: reference.to_string(), platform: platform.to_string() };
    let base = hub.base();
    let url = format!("{base}/resolve");
    // The hub may be pulling the image from its registry meanwhile.
    let resp = client
        .post(&url)
        .timeout(Duration::from_secs(900))
        .json(&req)
        .send()
        .await
        .map_err(|e| proxy_err("resolve", with_causes(&e)))?;
    if !resp.status().is_success() {
        return Err(proxy_err("resolve", failure(resp).await));
    }
    let body = read_capped(resp, MAX_RESOLVED).await.map_err(|e| proxy_err("resolve", e))?;
    let r: Resolved = serde_json::from_slice(&body).map_err(|e| proxy_err("resolve", e.to_string()))?;
    let mut received = body.len() as u64;
    let _lease = store.lease()?;
    let (layers, lists, blobs) = check(&r, reference, &platform)?;
    // The image policy judges the signatures the hub passed on, before any chunk moves.
    let trust = match opts.policy.as_deref().and_then(|p| Some((p, p.rule_for(reference)?))) {
        Some((policy, rule)) => {
            let v = crate::trust::verify_stored(&r.signatures, &crate::policy::repository_of(reference), &r.top, rule);
            let j = crate::trust::Judgement { mode: rule.mode, verdict: v };
            if let (crate::trust::Verdict::Rejected(reason), false) = (&j.verdict, j.allows()) {
                return Err(ImageError::Untrusted {
                    image: reference.to_string(),
                    digest: r.top.clone(),
                    policy: policy.source_name(),
                    reason: reason.clone(),
                });
            }
            Some(j)
        }
        None => None,
    };
    // Another pull of the same image (the node's own, beside the site cache's) goes first.
    let pool_path = store.root().join("tmp").join(format!("partial-chunks-{}", sha256_hex(&r.top)?));
    let mut pool = tokio::task::spawn_blocking(move || Pool::resume(pool_path))
        .await
        .map_err(|e| proxy_err("pool", e.to_string()))??;
    let todo: Vec<usize> =
        (0..layers.len()).filter(|&i| !store.layer_dir(&layers[i].diff_id).is_ok_and(|d| d.exists())).collect();
    // Chunks from layers this node holds, then the rest from the hub.
    let mut need = HashSet::new();
    for &i in &todo {
        need.extend(lists[i].iter().map(|c| c.digest).filter(|d| !pool.contains(d)));
    }
    let (st, n) = (Arc::clone(&store), need.clone());
    let (found, mut pool) = tokio::task::spawn_blocking(move || -> Result<_, ImageError> {
        let found = st.find_chunks(&n)?;
        st.gather_chunks(&found, &mut pool)?;
        Ok((found, pool))
    })
    .await
    .map_err(|e| proxy_err("gather", e.to_string()))??;
    let mut remote: Vec<ChunkRef> = vec![];
    let mut seen = HashSet::new();
    for &i in &todo {
        for c in &lists[i] {
            if need.contains(&c.digest) && !found.contains_key(&c.digest) && seen.insert(c.digest) {
                remote.push(*c);
            }
        }
    }
    let reused: u64 = found.values().map(|l| u64::from(l.len)).sum();
    let total: u64 = remote.iter().map(|c| u64::from(c.len)).sum();
    opts.note(&format!(
        "{reference}: {} chunks ({} B) from the hub, {} B from layers on this node",
        remote.len(),
        total,
        reused
    ));
    (opts.progress)(crate::registry::PullEvent::Total { size: total + reused, present: reused });
    // A cache of this node's site first: the site's WAN carries each chunk once.
    let mut from_cache = 0;
    if !remote.is_empty() {
        from_cache = from_site_cache(&client, hub, &req, &r.top, &remote, &mut pool, opts).await;
        received += from_cache;
    }
    received += fetch(&client, &base, None, &remote, &mut pool, opts, reference).await?;
    let (st, r2, rebuilt) = (Arc::clone(&store), r.clone(), todo.len());
    tokio::task::spawn_blocking(move || -> Result<(), ImageError> {
        let tmp = st.tmp_dir("rebuild")?;
        let res = (|| {
            for &i in &todo {
                st.rebuild_layer(&layers[i], &lists[i], &pool, &tmp)?;
            }
            for (digest, bytes) in &blobs {
                st.put_blob_bytes(bytes, Some(digest))?;
            }
            if !r2.signatures.is_empty() {
                st.put_signatures(&r2.top, &r2.signatures)?;
            }
            Ok(())
        })();
        let _ = fs::remove_dir_all(&tmp);
        if res.is_ok() {
            pool.discard();
        }
        res
    })
    .await
    .map_err(|e| proxy_err("rebuild", e.to_string()))??;
    store.tag(reference, &r.top)?;
    opts.note(&format!("{reference}: pulled {} through the hub", r.top));
    Ok(PullReport {
        reference: crate::normalize_reference(reference),
        digest: r.top.clone(),
        endpoint: "hub".into(),
        bytes_received: received,
        bytes_from_cache: from_cache,
        bytes_reused: reused,
        blobs_fetched: rebuilt,
        blobs_present: r.layers.len() - rebuilt,
        trust,
    })
}

/// Fetches what it can of `remote` from a cache of the node's site (which pulls the image
/// through its own hub first, once for the site). Returns the bytes received from it; what
/// it could not give is left for the hub.
async fn from_site_cache(
    client: &reqwest::Client,
    hub: &HubImages,
    req: &ResolveRequest,
    top: &str,
    remote: &[ChunkRef],
    pool: &mut Pool,
    opts: &PullOptions,
) -> u64 {
    let site = match site_caches(client, &hub.site_caches()).await {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!("site caches not known: {e}");
            return 0;
        }
    };
    let Ok(plain) = reqwest::Client::builder().connect_timeout(Duration::from_secs(5)).build() else { return 0 };
    let mut got = 0;
    for url in &site.caches {
        let base = format!("{}{CACHE_PATH}", url.trim_end_matches('/'));
        let resolved = async {
            let resp = plain
                .post(format!("{base}/resolve"))
                .bearer_auth(&site.token)
                .timeout(Duration::from_secs(900))
                .json(req)
                .send()
                .await
                .map_err(|e| with_causes(&e))?;
            if !resp.status().is_success() {
                return Err(failure(resp).await);
            }
            let r: Resolved =
                serde_json::from_slice(&read_capped(resp, MAX_RESOLVED).await?).map_err(|e| e.to_string())?;
            // The hub says which image the reference is; a cache only supplies chunks.
            if r.top != top {
                return Err(format!("it holds {} for {}, the hub says {top}", r.top, req.reference));
            }
            Ok(())
        }
        .await;
        if let Err(e) = resolved {
            opts.note(&format!("{}: site cache {url} cannot help ({e})", req.reference));
            continue;
        }
        let opts = PullOptions { max_attempts: 3, ..opts.clone() };
        match fetch(&plain, &base, Some(&site.token), remote, pool, &opts, &req.reference).await {
            Ok(n) => got += n,
            Err(e) => opts.note(&format!("{}: site cache {url} failed ({e}); the hub sends the rest", req.reference)),
        }
        if remote.iter().all(|c| pool.contains(&c.digest)) {
            break;
        }
    }
    got
}

type Checked = (Vec<LayerRef>, Vec<Vec<ChunkRef>>, BTreeMap<String, Vec<u8>>);

/// The layers of a resolved image as its manifest and config (checked by their digests)
/// name them, with the hub's chunk lists; the blobs kept are top, manifest and config only.
fn check(r: &Resolved, reference: &str, platform: &Platform) -> Result<Checked, ImageError> {
    let mut blobs = BTreeMap::new();
    for (d, b) in &r.blobs {
        let bytes = unb64(b, d)?;
        if sha256_of(&bytes) != sha256_hex(d)? {
            return Err(proxy_err(d.clone(), "blob does not match its digest"));
        }
        blobs.insert(d.clone(), bytes);
    }
    let bad = |d: &str, problem: String| proxy_err(d, problem);
    let image = crate::store::image_from_blobs(&blobs, &r.top, None, platform, reference, &bad)?;
    blobs.retain(|d, _| *d == r.top || *d == image.manifest || *d == image.config);
    if image.layers.len() != r.layers.len() {
        return Err(proxy_err(&r.top, "the manifest and the hub disagree on the number of layers"));
    }
    let mut lists = vec![];
    for (l, p) in image.layers.iter().zip(&r.layers) {
        if p.diff_id != l.diff_id || p.digest != l.digest {
            return Err(proxy_err(&p.digest, "the hub's layer is not the manifest's"));
        }
        lists.push(chunks::decode_list(&unb64(&p.chunks, &p.digest)?, &p.digest)?);
    }
    Ok((image.layers, lists, blobs))
}

/// Answers with damaged chunks before the hub is given up on.
const DAMAGED_LIMIT: u32 = 3;

enum Failure {
    /// The request failed or was cut: asked again (what had arrived is kept).
    Link(String),
    /// The server says it will not: not asked again.
    Refused(String),
    /// A chunk did not match its digest.
    Damaged(String),
}

/// Fetches `remote` into `pool` in batches, each chunk checked as it arrives; a cut
/// request is asked again for what it had not delivered. Returns the bytes received.
async fn fetch(
    client: &reqwest::Client,
    base: &str,
    token: Option<&str>,
    remote: &[ChunkRef],
    pool: &mut Pool,
    opts: &PullOptions,
    reference: &str,
) -> Result<u64, ImageError> {
    let url = format!("{base}/chunks");
    let mut received = 0u64;
    let (mut failures, mut damaged) = (0u32, 0u32);
    let total: u64 = remote.iter().map(|c| u64::from(c.len)).sum();
    let mut done = 0u64;
    loop {
        let left: Vec<&ChunkRef> = remote.iter().filter(|c| !pool.contains(&c.digest)).collect();
        if left.is_empty() {
            return Ok(received);
        }
        let mut batch = vec![];
        let mut bytes = 0u64;
        for c in left {
            if batch.len() == MAX_BATCH || bytes >= BATCH_BYTES {
                break;
            }
            bytes += u64::from(c.len);
            batch.push(*c);
        }
        let body: Vec<u8> = batch.iter().flat_map(|c| c.digest).collect();
        let res = async {
            let mut request = client.post(&url).timeout(Duration::from_secs(300)).body(body);
            if let Some(t) = token {
                request = request.bearer_auth(t);
            }
            let resp = request.send().await.map_err(|e| Failure::Link(with_causes(&e)))?;
            let status = resp.status();
            if !status.is_success() {
                let msg = failure(resp).await;
                // The server will not give these chunks (not a passing trouble of the link).
                let last = status.is_client_error() && status.as_u16() != 408 && status.as_u16() != 429;
                return Err(if last { Failure::Refused(msg) } else { Failure::Link(msg) });
            }
            let mut resp = resp;
            let mut buf: Vec<u8> = Vec::with_capacity(MAX_SIZE);
            let mut next = 0usize;
            while let Some(piece) = resp.chunk().await.map_err(|e| Failure::Link(with_causes(&e)))? {
                received += piece.len() as u64;
                buf.extend_from_slice(&piece);
                let owed: usize = batch[next..].iter().map(|c| c.len as usize).sum();
                if buf.len() > owed {
                    return Err(Failure::Damaged(format!(
                        "the answer holds more than the {} chunks asked",
                        batch.len()
                    )));
                }
                while let Some(c) = batch.get(next).filter(|c| buf.len() >= c.len as usize) {
                    let data: Vec<u8> = buf.drain(..c.len as usize).collect();
                    if ChunkRef::of(&data).digest != c.digest {
                        return Err(Failure::Damaged(format!("chunk {} does not match its digest", c.name())));
                    }
                    pool.put(c.digest, &data).map_err(|e| Failure::Link(e.to_string()))?;
                    done += u64::from(c.len);
                    next += 1;
                }
            }
            if next < batch.len() {
                return Err(Failure::Link(format!("the answer ended after {next} of {} chunks", batch.len())));
            }
            Ok(())
        }
        .await;
        (opts.progress)(crate::registry::PullEvent::Blob { digest: reference, size: total, done });
        match res {
            Ok(()) => failures = 0,
            Err(f) => {
                // A damaged chunk is asked for again (it may have been damaged on the way),
                // but a hub that keeps serving damaged ones is left for the registry.
                let (e, limit) = match f {
                    Failure::Link(e) => (e, opts.max_attempts.max(1)),
                    Failure::Refused(e) => (e, 0),
                    Failure::Damaged(e) => {
                        damaged += 1;
                        (e, if damaged >= DAMAGED_LIMIT { 0 } else { u32::MAX })
                    }
                };
                failures += 1;
                if failures >= limit {
                    return Err(ImageError::Transfer {
                        registry: "hub".into(),
                        what: format!("{reference}: chunks"),
                        message: e,
                        attempts: failures,
                    });
                }
                let wait = crate::registry::backoff(failures, reference);
                opts.note(&format!("{reference}: fetching chunks from the hub failed ({e}); again in {wait:?}"));
                tokio::time::sleep(wait).await;
            }
        }
    }
}

// ---- a site cache as a registry mirror ----

impl ImageStore {
    /// The manifest a registry mirror answers for `name` (the repository, without the
    /// registry) and `reference` (a tag or a manifest digest), with its media type; `None`
    /// when the store holds no such image. Layers held only as tars (an image pulled
    /// through the hub has no compressed blobs) are named by their diff_ids in a rewritten
    /// manifest, so a tag pulls; a manifest asked for by digest is served as stored.
    pub fn mirror_manifest(&self, name: &str, reference: &str) -> Result<Option<(String, Vec<u8>)>, ImageError> {
        let media = |m: &Manifest| {
            m.media_type.clone().unwrap_or_else(|| {
                if m.is_index() { crate::store::MT_OCI_INDEX } else { crate::store::MT_OCI_MANIFEST }.to_string()
            })
        };
        if reference.starts_with("sha256:") {
            sha256_hex(reference)?;
            if !self.has_blob(reference) {
                return Ok(None);
            }
            let bytes = self.read_blob(reference)?;
            let m: Manifest = serde_json::from_slice(&bytes)
                .map_err(|e| ImageError::Malformed { what: reference.into(), problem: e.to_string() })?;
            return Ok(Some((media(&m), bytes)));
        }
        let same_repo = |repo: &str| repo == name || repo.strip_prefix("library/") == Some(name);
        let found = self.list()?.into_iter().find(|s| {
            crate::registry::RemoteRef::parse(&s.reference)
                .is_ok_and(|r| same_repo(&r.repository) && r.reference == reference)
        });
        let Some(found) = found else { return Ok(None) };
        let info = match self.inspect(&found.reference) {
            Ok(i) if i.wasm.is_none() => i,
            _ => return Ok(None),
        };
        let bytes = self.read_blob(&info.manifest_digest)?;
        let m: Manifest = serde_json::from_slice(&bytes)
            .map_err(|e| ImageError::Malformed { what: info.manifest_digest.clone(), problem: e.to_string() })?;
        if info.layers.iter().all(|l| self.has_blob(&l.digest)) {
            return Ok(Some((media(&m), bytes)));
        }
        let mut v: serde_json::Value = serde_json::from_slice(&bytes)
            .map_err(|e| ImageError::Malformed { what: info.manifest_digest.clone(), problem: e.to_string() })?;
        let mut layers = vec![];
        for (d, l) in m.layers.iter().flatten().zip(&info.layers) {
            if self.has_blob(&l.digest) {
                layers.push(
                    serde_json::to_value(d)
                        .map_err(|e| ImageError::Malformed { what: l.digest.clone(), problem: e.to_string() })?,
                );
            } else {
                let size = fs::metadata(self.blob_path(&l.diff_id)?).ctx("stat", self.blob_path(&l.diff_id)?)?.len();
                layers.push(
                    serde_json::json!({"mediaType": crate::store::MT_OCI_LAYER, "digest": l.diff_id, "size": size}),
                );
            }
        }
        v["layers"] = serde_json::Value::Array(layers);
        v["mediaType"] = serde_json::Value::String(crate::store::MT_OCI_MANIFEST.into());
        if let Some(c) = v.get_mut("config") {
            c["mediaType"] = serde_json::Value::String(crate::store::MT_OCI_CONFIG.into());
        }
        let out = serde_json::to_vec(&v)
            .map_err(|e| ImageError::Malformed { what: "manifest".into(), problem: e.to_string() })?;
        Ok(Some((crate::store::MT_OCI_MANIFEST.into(), out)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A one-route HTTP server on loopback: the n-th request (from 0) gets `answer(n)` as
    /// (status, body). Returns its base URL and the request count.
    async fn server(answer: impl Fn(usize) -> (u16, Vec<u8>) + Send + Sync + 'static) -> (String, Arc<AtomicUsize>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", l.local_addr().unwrap());
        let count = Arc::new(AtomicUsize::new(0));
        let c = Arc::clone(&count);
        tokio::spawn(async move {
            for _ in 0..50 {
                let Ok((mut s, _)) = l.accept().await else { return };
                let mut req = vec![];
                let mut buf = [0u8; 4096];
                // Headers, then as much body as Content-Length says.
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    let n = s.read(&mut buf).await.unwrap_or(0);
                    if n == 0 {
                        break;
                    }
                    req.extend_from_slice(&buf[..n]);
                }
                let text = String::from_utf8_lossy(&req).to_lowercase();
                let len: usize = text
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length: ").and_then(|v| v.trim().parse().ok()))
                    .unwrap_or(0);
                let head = req.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4).unwrap_or(req.len());
                let mut have = req.len() - head;
                while have < len {
                    let n = s.read(&mut buf).await.unwrap_or(0);
                    if n == 0 {
                        break;
                    }
                    have += n;
                }
                let (status, body) = answer(c.fetch_add(1, Ordering::SeqCst));
                let head =
                    format!("HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
                let _ = s.write_all(head.as_bytes()).await;
                let _ = s.write_all(&body).await;
            }
        });
        (base, count)
    }

    fn chunks_and_bytes() -> (Vec<ChunkRef>, Vec<u8>) {
        let data = skiff_testkit::incompressible(200_000, 9);
        (chunks::chunk_stream(&data[..]).unwrap(), data)
    }

    #[tokio::test]
    async fn a_chunk_damaged_on_the_way_is_refused_and_asked_again() {
        let (list, data) = chunks_and_bytes();
        let good = data.clone();
        let (base, count) = server(move |n| {
            let mut body = good.clone();
            if n == 0 {
                body[100] ^= 1;
            }
            (200, body)
        })
        .await;
        let dir = tempfile::tempdir().unwrap();
        let mut pool = Pool::create(dir.path().join("pool")).unwrap();
        let opts = PullOptions { max_attempts: 3, ..Default::default() };
        let client = reqwest::Client::new();
        let got = fetch(&client, &base, None, &list, &mut pool, &opts, "t").await.unwrap();
        assert_eq!(count.load(Ordering::SeqCst), 2, "the damaged answer, then a good one");
        assert!(got > data.len() as u64, "the damaged answer counts too: {got}");
        let mut back = vec![];
        std::io::Read::read_to_end(&mut pool.reader(&list), &mut back).unwrap();
        assert_eq!(back, data);
    }

    #[tokio::test]
    async fn a_server_that_sends_more_than_asked_or_refuses_is_given_up() {
        let (list, data) = chunks_and_bytes();
        let dir = tempfile::tempdir().unwrap();
        let opts = PullOptions { max_attempts: 20, ..Default::default() };
        let client = reqwest::Client::new();
        // Every answer damaged: given up after three, not twenty.
        let bad = data.clone();
        let (base, count) = server(move |_| {
            let mut b = bad.clone();
            b[0] ^= 1;
            (200, b)
        })
        .await;
        let mut pool = Pool::create(dir.path().join("p1")).unwrap();
        let e = fetch(&client, &base, None, &list, &mut pool, &opts, "t").await.unwrap_err();
        assert!(e.to_string().contains("does not match its digest"), "{e}");
        assert_eq!(count.load(Ordering::SeqCst), DAMAGED_LIMIT as usize);
        // More bytes than the chunks asked for: refused as damaged, memory not taken.
        let more = [data.clone(), vec![0u8; 1 << 20]].concat();
        let (base, _) = server(move |_| (200, more.clone())).await;
        let mut pool = Pool::create(dir.path().join("p2")).unwrap();
        let e = fetch(&client, &base, None, &list[..1], &mut pool, &opts, "t").await.unwrap_err();
        assert!(e.to_string().contains("more than the"), "{e}");
        // A refusal (403) is final at once.
        let (base, count) = server(|_| (403, br#"{"error":"not yours"}"#.to_vec())).await;
        let mut pool = Pool::create(dir.path().join("p3")).unwrap();
        let e = fetch(&client, &base, None, &list, &mut pool, &opts, "t").await.unwrap_err();
        assert!(e.to_string().contains("not yours"), "{e}");
        assert_eq!(count.load(Ordering::SeqCst), 1);
    }
}
