//! `/api/v1`: JSON over HTTP, bearer-token authenticated, with a request body limit.

use crate::{Hub, NodeInfo};
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use skiff_model::api::{ApplyRequest, DeploymentView, ErrorBody};
use skiff_model::Protocol;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tracing::info_span;

pub const MAX_BODY: usize = 1 << 20;

pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(ErrorBody { error: self.1 })).into_response()
    }
}

fn bad(msg: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, msg.into())
}
fn not_found(msg: impl Into<String>) -> ApiError {
    ApiError(StatusCode::NOT_FOUND, msg.into())
}
fn internal(msg: impl std::fmt::Display) -> ApiError {
    ApiError(StatusCode::INTERNAL_SERVER_ERROR, msg.to_string())
}
/// A store's failure: 503 while the hub is cut off from it (nothing was changed).
fn store_error(e: crate::store::StoreError) -> ApiError {
    match e {
        crate::store::StoreError::OutOfReach(m) => ApiError(StatusCode::SERVICE_UNAVAILABLE, m),
        e => internal(e),
    }
}

type Shared = Arc<Hub>;

pub fn router(hub: Shared) -> Router {
    // Nodes authenticate with their certificate (checked per request in `node_of_peer`);
    // joining with a token; the CA is public.
    let fleet = Router::new()
        .route("/api/v1/cacerts", get(cacerts))
        .route("/api/v1/join", post(join))
        .route("/api/v1/nodes/{name}/assignments", get(assignments))
        .route("/api/v1/nodes/{name}/status", axum::routing::put(node_status))
        .route("/api/v1/nodes/{name}/tunnel", get(tunnel))
        .route("/api/v1/nodes/{name}/images/{call}", post(images))
        .route("/api/v1/nodes/{name}/site-caches", get(site_caches))
        .route("/api/v1/nodes/{name}/mesh/{service}/{port}", get(mesh_relay))
        .route("/api/v1/nodes/{name}/mesh/{service}/{port}/udp", get(mesh_relay_udp));
    Router::new()
        .route("/api/v1/tokens", post(create_token).get(list_tokens))
        .route("/api/v1/tokens/{id}", axum::routing::delete(revoke_token))
        .route("/api/v1/nodes/{name}", axum::routing::delete(revoke_node))
        .route("/api/v1/apply", post(apply))
        .route("/api/v1/deployments", get(list_deployments))
        .route("/api/v1/deployments/{name}", get(get_deployment).delete(delete_deployment))
        .route("/api/v1/deployments/{name}/rollout", get(rollout_status))
        .route("/api/v1/deployments/{name}/history", get(rollout_history))
        .route("/api/v1/deployments/{name}/undo", post(rollout_undo))
        .route("/api/v1/instances", get(list_instances))
        .route("/api/v1/instances/{name}/logs", get(logs))
        .route("/api/v1/instances/{name}/exec", post(exec).get(exec_session))
        .route("/api/v1/instances/{name}/portforward", get(port_forward))
        .route("/api/v1/instances/{name}/{action}", post(act_on_instance))
        .route("/api/v1/nodes", get(nodes))
        .route("/api/v1/services", get(services))
        .route("/api/v1/jobs", get(jobs))
        .route("/api/v1/images", post(push_image))
        .route("/api/v1/k8s-services", get(kept_services))
        .route("/api/v1/k8s-services/{stack}/{name}", axum::routing::delete(forget_service))
        .route("/api/v1/events", get(events))
        .route("/api/v1/hub/peer", get(peer_state))
        .route("/api/v1/metrics", get(samples))
        .route("/api/v1/autoscalers", get(autoscalers))
        .route("/api/v1/alerts", get(alerts))
        .route(
            "/api/v1/version",
            get(|| async { Json(skiff_model::api::Version { version: env!("CARGO_PKG_VERSION").into() }) }),
        )
        .route("/metrics", get(prometheus))
        .route_layer(middleware::from_fn_with_state(Arc::clone(&hub), auth))
        .merge(fleet)
        .route("/api/v1/health", get(|| async { "ok" }))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(middleware::from_fn(trace))
        .with_state(hub)
}

async fn trace(req: Request, next: Next) -> Response {
    use tracing::Instrument;
    // Attached to the request's future, not entered across its awaits (an entered span
    // would be current for whatever else ran on the thread meanwhile).
    let span = info_span!("api", method = %req.method(), path = %req.uri().path());
    next.run(req).instrument(span).await
}

/// Bearer tokens: the hub's admin token, or an API token whose role covers the route
/// (`metrics` < `read` < `admin`, see [`crate::tokens::required_role`]).
async fn auth(State(hub): State<Shared>, req: Request, next: Next) -> Response {
    let bearer =
        req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    let need = crate::tokens::required_role(req.method(), req.uri().path());
    let role = match bearer {
        Some(b) => {
            let (store, admin, b) = (Arc::clone(&hub.store), hub.admin_token.clone(), b.to_string());
            let now = hub.clock.now_ms();
            tokio::task::spawn_blocking(move || crate::tokens::authenticate(&*store, &admin, &b, now))
                .await
                .unwrap_or(Ok(None))
        }
        None => Ok(None),
    };
    // Cut off before the request came: every write it would make is refused.
    let cut_before = hub.store.out_of_reach().is_some();
    let role = match role {
        Ok(r) => r,
        // An API token the hub has not read since it was cut off: it cannot tell.
        Err(e) => {
            return cut_off_marked(
                &hub,
                ApiError(StatusCode::SERVICE_UNAVAILABLE, e.to_string()).into_response(),
                cut_before,
            )
        }
    };
    match role {
        None => ApiError(
            StatusCode::UNAUTHORIZED,
            "missing or wrong bearer token (see admin.conf in the hub's data directory)".into(),
        )
        .into_response(),
        Some(r) if r < need => ApiError(
            StatusCode::FORBIDDEN,
            format!(
                "this token's role is {}; {} {} needs {}",
                r.as_str(),
                req.method(),
                req.uri().path(),
                need.as_str()
            ),
        )
        .into_response(),
        Some(_) => {
            let resp = next.run(req).await;
            cut_off_marked(&hub, resp, cut_before)
        }
    }
}

/// While the hub is cut off from its store: the `Warning` on every answer, and on a 503
/// to a request that came once it was cut off, [`skiff_model::api::UNCHANGED_HEADER`]
/// (nothing was written for it, so the CLI may send it to another hub).
fn cut_off_marked(hub: &Hub, mut resp: Response, cut_before: bool) -> Response {
    let Some(why) = hub.store.out_of_reach() else { return resp };
    if let Ok(v) = header::HeaderValue::from_str(&out_of_reach_warning(&why)) {
        resp.headers_mut().insert(header::WARNING, v);
    }
    if cut_before && resp.status() == StatusCode::SERVICE_UNAVAILABLE {
        resp.headers_mut().insert(skiff_model::api::UNCHANGED_HEADER, header::HeaderValue::from_static("cut-off"));
    }
    resp
}

/// The `Warning` header (RFC 7234's form, as Kubernetes' API sends warnings) of every
/// answer while the hub is cut off from its store: what it shows may be stale.
fn out_of_reach_warning(why: &str) -> String {
    let why: String =
        why.chars().map(|c| if c.is_ascii_graphic() && c != '"' && c != '\\' { c } else { ' ' }).collect();
    format!(
        "199 skiff \"the hub's store cannot be reached ({}): this is what the hub last read, and it changes nothing until the store answers\"",
        why.split_whitespace().collect::<Vec<_>>().join(" ")
    )
}

/// A JSON request body, or a 400 naming where it is wrong: `request body:
/// deployments[0].resources: unknown field `memroy`` (the path, then serde's words).
fn parse_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let de = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." {
            bad(format!("request body: {inner}"))
        } else {
            bad(format!("request body: {path}: {inner}"))
        }
    })
}

pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn apply(State(hub): State<Shared>, body: axum::body::Bytes) -> Result<Response, ApiError> {
    let req: ApplyRequest = parse_body(&body)?;
    Ok(Json(hub.apply(&req).await.map_err(hub_error)?).into_response())
}

/// A stored deployment with its instances, picked out of `all`, and why some have no
/// node, from `unschedulable` (both fetched once per request).
fn view(
    all: &[skiff_model::InstanceStatus],
    unschedulable: &BTreeMap<String, String>,
    s: crate::store::Stored,
) -> DeploymentView {
    let instances = all.iter().filter(|i| i.deployment == s.spec.name).cloned().collect();
    let unschedulable = unschedulable.get(&s.spec.name).cloned();
    DeploymentView { revision: s.revision, spec: s.spec.redacted(), instances, unschedulable, wanted: None }
}

fn unschedulable(hub: &Hub) -> BTreeMap<String, String> {
    hub.nodes.unschedulable()
}

/// `?wait=S`: how long a watch may hold the request.
#[derive(Deserialize, Default)]
struct WatchQuery {
    wait: Option<u64>,
}

/// The longest a watch holds a request, and how often it looks again meanwhile when no
/// change wakes it (remote nodes' reports, autoscaler and alert state).
const MAX_WAIT: Duration = Duration::from_secs(60);
const WATCH_EVERY: Duration = Duration::from_secs(1);

/// Serves `read()` as JSON with an `ETag` naming its content. A request whose
/// `If-None-Match` names the current content gets 304; with `?wait=S` it is held until the
/// content changes (200 with the new one) or S seconds pass (at most 60; then 304). This
/// is the long-poll watch CLIs and UIs follow lists with (`skiff get -w`), as Consul's
/// blocking queries: a client that missed changes in between gets the newest whole list.
async fn watched<T: serde::Serialize>(
    q: &WatchQuery,
    headers: &axum::http::HeaderMap,
    mut changes: Vec<tokio::sync::watch::Receiver<u64>>,
    read: impl Fn() -> Result<T, ApiError>,
) -> Result<Response, ApiError> {
    let have = headers.get(header::IF_NONE_MATCH).and_then(|v| v.to_str().ok()).map(str::to_string);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(q.wait.unwrap_or(0)).min(MAX_WAIT);
    loop {
        let body = serde_json::to_vec(&read()?).map_err(internal)?;
        let digest = <sha2::Sha256 as sha2::Digest>::digest(&body);
        let tag = format!("\"{}\"", hex::encode(&digest[..12]));
        if have.as_deref() != Some(tag.as_str()) {
            return Ok(
                ([(header::CONTENT_TYPE, "application/json".to_string()), (header::ETAG, tag)], body).into_response()
            );
        }
        let now = tokio::time::Instant::now();
        if now >= deadline {
            return Ok((StatusCode::NOT_MODIFIED, [(header::ETAG, tag)]).into_response());
        }
        // Woken by a change of the in-process node or the stored revision, else by the
        // timer; a change that does not alter this list sends nothing.
        let timer = deadline.min(now + WATCH_EVERY);
        let changed = async {
            if changes.is_empty() {
                return std::future::pending().await;
            }
            let (r, _, _) = futures_util::future::select_all(changes.iter_mut().map(|c| Box::pin(c.changed()))).await;
            if r.is_err() {
                // That source is gone (shutting down): the timer alone from here.
                tokio::time::sleep_until(timer).await;
            }
        };
        tokio::select! {
            _ = changed => {}
            _ = tokio::time::sleep_until(timer) => {}
        }
    }
}

async fn list_deployments(
    State(hub): State<Shared>,
    Query(q): Query<WatchQuery>,
    headers: axum::http::HeaderMap,
) -> Result<Response, ApiError> {
    watched(&q, &headers, hub.changes(), || {
        let stored = hub.store.list().map_err(store_error)?;
        let all = hub.instances();
        let why = unschedulable(&hub);
        // A pod's other containers are shown with as many wanted as its first.
        let counts: BTreeMap<String, u32> =
            stored.iter().map(|s| (s.spec.name.clone(), crate::rollouts::wanted(&s.spec, &all))).collect();
        let mut views: Vec<DeploymentView> = stored.into_iter().map(|s| view(&all, &why, s)).collect();
        for v in views.iter_mut() {
            v.wanted = v.spec.pod_of.as_ref().and_then(|o| counts.get(o)).copied();
        }
        Ok(views)
    })
    .await
}

async fn services(
    State(hub): State<Shared>,
    Query(q): Query<WatchQuery>,
    headers: axum::http::HeaderMap,
) -> Result<Response, ApiError> {
    watched(&q, &headers, hub.changes(), || service_list(&hub)).await
}

async fn jobs(
    State(hub): State<Shared>,
    Query(q): Query<WatchQuery>,
    headers: axum::http::HeaderMap,
) -> Result<Response, ApiError> {
    watched(&q, &headers, hub.changes(), || {
        let stored: Vec<skiff_model::Deployment> =
            hub.store.list().map_err(store_error)?.into_iter().map(|s| s.spec).collect();
        Ok(skiff_model::job::views(&stored, &hub.instances()))
    })
    .await
}

/// Every deployment that serves ports on the bridge is a service: its ports, and per node
/// its instances that serve of all.
fn service_list(hub: &Hub) -> Result<Vec<skiff_model::mesh::ServiceInfo>, ApiError> {
    use skiff_model::mesh::{virtual_addresses, Endpoint, Service, ServiceInfo, DEFAULT_SERVICE_RANGE};
    let services: Vec<Service> =
        hub.store.list().map_err(store_error)?.into_iter().filter_map(|s| Service::of(&s.spec)).collect();
    let all = hub.instances();
    let sites: std::collections::BTreeMap<String, String> =
        node_list(hub)?.into_iter().filter_map(|n| Some((n.name, n.labels.get("site")?.clone()))).collect();
    let vips = virtual_addresses(DEFAULT_SERVICE_RANGE, services.iter().map(|s| s.name.as_str()));
    Ok(services
        .into_iter()
        .map(|s| {
            let mut by_node: std::collections::BTreeMap<&str, (u32, u32)> = Default::default();
            for i in all.iter().filter(|i| i.deployment == s.name) {
                let e = by_node.entry(i.node.as_str()).or_default();
                e.0 += u32::from(crate::fleet::serves(i));
                e.1 += 1;
            }
            let endpoints = by_node
                .into_iter()
                .map(|(node, (ready, total))| Endpoint {
                    node: node.to_string(),
                    site: sites.get(node).cloned(),
                    mesh: None,
                    ready,
                    total,
                })
                .collect();
            ServiceInfo {
                address: vips.get(&s.name).map(|a| a.to_string()).unwrap_or_default(),
                name: s.name,
                stack: s.stack,
                aliases: s.aliases,
                ports: s.ports,
                networks: s.networks,
                endpoints,
            }
        })
        .collect())
}

async fn get_deployment(
    State(hub): State<Shared>,
    Path(name): Path<String>,
    Query(q): Query<WatchQuery>,
    headers: axum::http::HeaderMap,
) -> Result<Response, ApiError> {
    watched(&q, &headers, hub.changes(), || {
        let s = hub
            .store
            .get(&name)
            .map_err(store_error)?
            .ok_or_else(|| not_found(format!("deployment {name:?} not found")))?;
        let owner = s.spec.pod_of.as_ref().map(|o| hub.store.get(o)).transpose().map_err(store_error)?.flatten();
        let all = hub.instances();
        let mut v = view(&all, &unschedulable(&hub), s);
        v.wanted = owner.map(|o| crate::rollouts::wanted(&o.spec, &all));
        Ok(v)
    })
    .await
}

fn hub_error(e: crate::ApplyError) -> ApiError {
    match e {
        crate::ApplyError::Invalid(m) => bad(m),
        crate::ApplyError::Internal(m) => internal(m),
        crate::ApplyError::Unavailable(m) => ApiError(StatusCode::SERVICE_UNAVAILABLE, m),
    }
}

/// A node's failure by kind: an instance it does not have is not found, a node out of
/// reach is unavailable, a node that did not answer timed out, and one that could not act
/// on the instance (it is not running, its log is gone) is a conflict with its state.
fn node_error(e: crate::NodeError) -> ApiError {
    use crate::NodeError as N;
    let status = match &e {
        N::NoInstance(_) => StatusCode::NOT_FOUND,
        N::Unreachable(_) => StatusCode::SERVICE_UNAVAILABLE,
        N::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
        N::Refused(_) | N::RefusedField { .. } => StatusCode::BAD_REQUEST,
        N::Failed(_) => StatusCode::CONFLICT,
    };
    ApiError(status, e.to_string())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PeerQuery {
    #[serde(default)]
    epoch: String,
    #[serde(default)]
    since: u64,
    #[serde(default)]
    samples: bool,
}

/// What another hub of the store asks each second: this hub's nodes that changed since
/// it last asked (see `fleet/peers.rs`).
async fn peer_state(
    State(hub): State<Shared>,
    q: Result<Query<PeerQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = q.map_err(|e| bad(e.body_text()))?;
    let f = fleet_of(&hub)?;
    Ok(Json(f.peer_state(&q.epoch, q.since, q.samples)).into_response())
}

/// A `421 Misdirected Request` when `instance`'s node has its tunnel on another hub of
/// the store: this hub cannot reach it, that one can (its URL in
/// [`skiff_model::api::NODE_HUB_HEADER`]).
fn elsewhere(hub: &Hub, instance: &str) -> Option<Response> {
    let f = hub.nodes.fleet()?;
    let node = f.node_of_instance(instance)?;
    let other = f.hub_of(&node)?;
    let msg = format!("instance {instance:?} runs on node {node:?}, whose tunnel is on the hub at {other}");
    let mut resp = ApiError(StatusCode::MISDIRECTED_REQUEST, msg).into_response();
    let v = header::HeaderValue::from_str(&other).ok()?;
    resp.headers_mut().insert(skiff_model::api::NODE_HUB_HEADER, v);
    Some(resp)
}

/// Where the newest revision's rollout stands (watchable).
async fn rollout_status(
    State(hub): State<Shared>,
    Path(name): Path<String>,
    Query(q): Query<WatchQuery>,
    headers: axum::http::HeaderMap,
) -> Result<Response, ApiError> {
    watched(&q, &headers, hub.changes(), || {
        hub.rollout_status(&name).map_err(hub_error)?.ok_or_else(|| not_found(format!("deployment {name:?} not found")))
    })
    .await
}

async fn rollout_history(State(hub): State<Shared>, Path(name): Path<String>) -> Result<Response, ApiError> {
    let h = hub.rollout_history(&name).map_err(hub_error)?;
    let h = h.ok_or_else(|| not_found(format!("deployment {name:?} not found")))?;
    // Readers never see a secret, in any revision.
    let h: Vec<skiff_model::rollout::Revision> =
        h.into_iter().map(|r| skiff_model::rollout::Revision { spec: r.spec.redacted(), ..r }).collect();
    Ok(Json(h).into_response())
}

async fn rollout_undo(
    State(hub): State<Shared>,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let req: skiff_model::rollout::UndoRequest = if body.is_empty() { Default::default() } else { parse_body(&body)? };
    if hub.store.get(&name).map_err(store_error)?.is_none() {
        return Err(not_found(format!("deployment {name:?} not found")));
    }
    let now = hub.clock.now_ms();
    let r = hub.rollout_undo(&name, req.to_revision, now).map_err(hub_error)?;
    Ok(Json(skiff_model::rollout::Revision { spec: r.spec.redacted(), ..r }).into_response())
}

async fn delete_deployment(State(hub): State<Shared>, Path(name): Path<String>) -> Result<StatusCode, ApiError> {
    let stored = hub.store.list().map_err(store_error)?;
    if !stored.iter().any(|s| s.spec.name == name) {
        return Err(not_found(format!("deployment {name:?} not found")));
    }
    // A pod's other containers go with its first (as a pod goes whole).
    let members: Vec<String> =
        stored.iter().filter(|s| s.spec.pod_of.as_deref() == Some(&name)).map(|s| s.spec.name.clone()).collect();
    let dependents: Vec<String> = stored
        .into_iter()
        .filter(|s| !members.contains(&s.spec.name))
        .filter(|s| {
            let on = |n: &str| n == name || members.iter().any(|m| m == n);
            s.spec.depends_on.iter().any(|d| on(&d.name)) || s.spec.network_service.as_deref().is_some_and(on)
        })
        .map(|s| s.spec.name)
        .collect();
    if !dependents.is_empty() {
        return Err(ApiError(
            StatusCode::CONFLICT,
            format!("deployment {name:?} is a dependency of {}; delete those first", dependents.join(", ")),
        ));
    }
    // The pod at once: never its first without some of its containers.
    let mut pod = members;
    pod.push(name.clone());
    if !hub.store.delete_all(&pod).map_err(store_error)?.contains(&name) {
        return Err(not_found(format!("deployment {name:?} not found")));
    }
    hub.sync_nodes().map_err(|e| hub_error(e.into()))?;
    Ok(StatusCode::NO_CONTENT)
}

async fn list_instances(
    State(hub): State<Shared>,
    Query(q): Query<WatchQuery>,
    headers: axum::http::HeaderMap,
) -> Result<Response, ApiError> {
    watched(&q, &headers, hub.changes(), || Ok(hub.instances())).await
}

#[derive(Deserialize)]
struct LogQuery {
    #[serde(default)]
    follow: bool,
    tail: Option<usize>,
}

/// Newline-delimited JSON `LogLine`s of an instance, or of every instance of a
/// deployment (each line then carries the instance name in `stream` as `name/stdout`,
/// however many there are).
async fn logs(
    State(hub): State<Shared>,
    Path(name): Path<String>,
    Query(q): Query<LogQuery>,
) -> Result<Response, ApiError> {
    let targets: Vec<String> = if hub.node_of(&name).is_some() {
        vec![name.clone()]
    } else {
        let mut v: Vec<String> = hub.instances().into_iter().filter(|i| i.deployment == name).map(|i| i.name).collect();
        v.sort();
        v
    };
    if targets.is_empty() {
        return Err(not_found(format!("no instance or deployment named {name:?}")));
    }
    // Every one on another hub (one instance, or a deployment this hub holds no node of):
    // the CLI asks that hub. A deployment spread over several hubs' nodes shows what this
    // hub reaches.
    let (here, away): (Vec<String>, Vec<String>) = targets.into_iter().partition(|t| elsewhere(&hub, t).is_none());
    if here.is_empty() {
        if let Some(resp) = away.first().and_then(|t| elsewhere(&hub, t)) {
            return Ok(resp);
        }
    }
    let targets = here;
    let (tx, rx) = tokio::sync::mpsc::channel::<String>(256);
    // A deployment's lines always carry their instance's name (as `docker compose logs`):
    // one instance now may be several after a scale or during a rollout.
    let prefix = hub.node_of(&name).is_none();
    // The containers followed so far, by id: a replaced or added one (a rollout, a
    // restart, a scale-up) is followed too once it appears, from its first line.
    let mut seen: std::collections::HashSet<String> = hub
        .instances()
        .into_iter()
        .filter(|i| i.name == name || i.deployment == name)
        .map(|i| i.container_id)
        .collect();
    for t in targets {
        let node = hub.node_of(&t).ok_or_else(|| not_found(format!("instance {t:?} not found")))?;
        let lines = node.logs(&t, q.tail, q.follow).map_err(node_error)?;
        tokio::spawn(pump_logs(lines, t, prefix, tx.clone()));
    }
    if q.follow {
        let (hub, tx, name) = (Arc::clone(&hub), tx.clone(), name.clone());
        tokio::spawn(async move {
            // Rounds in a row with nothing of the target: it was deleted, and the stream
            // ends once its last lines are out (as kubectl's does).
            let mut absent = 0;
            while !tx.is_closed() && absent < 3 {
                tokio::time::sleep(Duration::from_secs(2)).await;
                let now = hub.instances();
                absent = if now.iter().any(|i| i.name == name || i.deployment == name) { 0 } else { absent + 1 };
                for i in now {
                    if (i.name != name && i.deployment != name)
                        || i.container_id.is_empty()
                        || seen.contains(&i.container_id)
                    {
                        continue;
                    }
                    let Some(lines) = hub.node_of(&i.name).and_then(|n| n.logs(&i.name, None, true).ok()) else {
                        continue;
                    };
                    seen.insert(i.container_id);
                    tokio::spawn(pump_logs(lines, i.name, prefix, tx.clone()));
                }
            }
        });
    }
    drop(tx);
    // A followed log that stays quiet still sends an empty line every 30 s, so the
    // connection is not closed as idle (readers skip empty lines).
    let keepalive = if q.follow { Duration::from_secs(30) } else { Duration::MAX };
    let stream = futures_util::stream::unfold(rx, move |mut rx| async move {
        let next = match tokio::time::timeout(keepalive, rx.recv()).await {
            Ok(line) => line?,
            Err(_) => "\n".to_string(),
        };
        Some((Ok::<_, std::convert::Infallible>(next), rx))
    });
    Ok(([(header::CONTENT_TYPE, "application/x-ndjson")], Body::from_stream(stream)).into_response())
}

/// Passes one instance's log lines on as JSON lines (named by `instance` when several
/// are interleaved), until either side ends.
async fn pump_logs(
    mut lines: tokio::sync::mpsc::Receiver<skiff_model::LogLine>,
    instance: String,
    prefix: bool,
    tx: tokio::sync::mpsc::Sender<String>,
) {
    while let Some(mut l) = lines.recv().await {
        if prefix {
            l.stream = format!("{instance}/{}", l.stream);
        }
        let mut s = serde_json::to_string(&l).unwrap_or_default();
        s.push('\n');
        if tx.send(s).await.is_err() {
            return;
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExecBody {
    argv: Vec<String>,
    #[serde(default)]
    timeout_ms: Option<u64>,
}

async fn exec(
    State(hub): State<Shared>,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let b: ExecBody = parse_body(&body)?;
    if b.argv.is_empty() {
        return Err(bad("argv: must not be empty"));
    }
    if let Some(resp) = elsewhere(&hub, &name) {
        return Ok(resp);
    }
    let node = hub.node_of(&name).ok_or_else(|| not_found(format!("instance {name:?} not found")))?;
    let timeout = Duration::from_millis(b.timeout_ms.unwrap_or(60_000).min(3_600_000));
    let r = node.exec(&name, b.argv, timeout).await.map_err(node_error)?;
    Ok(Json(r).into_response())
}

/// `skiff restart|stop|start web-1`: the instance's node acts on it.
async fn act_on_instance(
    State(hub): State<Shared>,
    Path((name, action)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let act = skiff_model::proto::InstanceAction::parse(&action)
        .ok_or_else(|| not_found(format!("no action {action:?} on instances (restart, stop, start)")))?;
    if let Some(resp) = elsewhere(&hub, &name) {
        return Ok(resp);
    }
    let node = hub.node_of(&name).ok_or_else(|| not_found(format!("instance {name:?} not found")))?;
    node.act(&name, act).await.map_err(node_error)?;
    Ok((StatusCode::ACCEPTED, Json(serde_json::json!({ "instance": name, "action": action }))).into_response())
}

/// The interactive exec (see [`skiff_model::api::ExecControl`] for its messages).
async fn exec_session(
    State(hub): State<Shared>,
    Path(name): Path<String>,
    ws: axum::extract::WebSocketUpgrade,
) -> Result<Response, ApiError> {
    if let Some(resp) = elsewhere(&hub, &name) {
        return Ok(resp);
    }
    let node = hub.node_of(&name).ok_or_else(|| not_found(format!("instance {name:?} not found")))?;
    let ws = ws.max_message_size(MAX_BODY).max_frame_size(MAX_BODY);
    Ok(ws.on_upgrade(move |socket| crate::session::serve(node, name, socket)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ForwardQuery {
    port: u16,
}

/// One TCP connection to a port inside an instance (`skiff port-forward`), as a WebSocket
/// carrying its bytes both ways.
async fn port_forward(
    State(hub): State<Shared>,
    Path(name): Path<String>,
    q: Result<Query<ForwardQuery>, axum::extract::rejection::QueryRejection>,
    ws: axum::extract::WebSocketUpgrade,
) -> Result<Response, ApiError> {
    let Query(q) = q.map_err(|e| bad(format!("port: {}", e.body_text())))?;
    if q.port == 0 {
        return Err(bad("port: must be 1 to 65535"));
    }
    if let Some(resp) = elsewhere(&hub, &name) {
        return Ok(resp);
    }
    let node = hub.node_of(&name).ok_or_else(|| not_found(format!("instance {name:?} not found")))?;
    let ws = ws.max_message_size(MAX_BODY).max_frame_size(MAX_BODY);
    Ok(ws.on_upgrade(move |socket| crate::session::serve_forward(node, name, q.port, Protocol::Tcp, socket)))
}

async fn nodes(
    State(hub): State<Shared>,
    Query(q): Query<WatchQuery>,
    headers: axum::http::HeaderMap,
) -> Result<Response, ApiError> {
    watched(&q, &headers, hub.changes(), || node_list(&hub)).await
}

fn node_list(hub: &Hub) -> Result<Vec<NodeInfo>, ApiError> {
    hub.nodes.list(&hub.instances()).map_err(|e| hub_error(e.into()))
}

fn fleet_error(e: crate::fleet::FleetError) -> ApiError {
    use crate::fleet::FleetError as F;
    match e {
        F::Invalid(m) => bad(m),
        F::Unauthenticated(m) => ApiError(StatusCode::UNAUTHORIZED, m),
        F::Forbidden(m) => ApiError(StatusCode::FORBIDDEN, m),
        F::NotFound(m) => not_found(m),
        F::Conflict(m) => ApiError(StatusCode::CONFLICT, m),
        F::Internal(m) => internal(m),
        F::Unavailable(m) => ApiError(StatusCode::SERVICE_UNAVAILABLE, m),
    }
}

fn fleet_of(hub: &Hub) -> Result<&Arc<crate::fleet::Fleet>, ApiError> {
    hub.nodes.fleet().ok_or_else(|| not_found("this hub takes no remote nodes (run `skiff hub`)"))
}

async fn cacerts(State(hub): State<Shared>) -> Result<Response, ApiError> {
    let f = fleet_of(&hub)?;
    Ok(([(header::CONTENT_TYPE, "application/x-pem-file")], f.ca.pem().to_string()).into_response())
}

async fn join(State(hub): State<Shared>, body: axum::body::Bytes) -> Result<Response, ApiError> {
    let f = fleet_of(&hub)?;
    let req: skiff_model::proto::JoinRequest = parse_body(&body)?;
    // Off the async threads: a join waits on the store (and on the hub's other changes),
    // and many nodes join at once: a few at a time, the rest waiting without a thread.
    let _turn = f.joining.acquire().await.map_err(internal)?;
    let f = Arc::clone(f);
    let joined = tokio::task::spawn_blocking(move || f.join(&req)).await.map_err(internal)?;
    Ok(Json(joined.map_err(fleet_error)?).into_response())
}

async fn create_token(State(hub): State<Shared>, body: axum::body::Bytes) -> Result<Response, ApiError> {
    let req: crate::tokens::TokenRequest = if body.is_empty() { Default::default() } else { parse_body(&body)? };
    let ca = hub.nodes.fleet().map(|f| f.ca_sha256.clone());
    let now = hub.clock.now_ms();
    let t = crate::tokens::create(&*hub.store, ca.as_deref(), &req, now).map_err(|e| match e {
        crate::tokens::TokenError::Invalid(m) => bad(m),
        crate::tokens::TokenError::NoFleet(m) => not_found(m),
        crate::tokens::TokenError::Internal(m) => internal(m),
        crate::tokens::TokenError::Unavailable(m) => ApiError(StatusCode::SERVICE_UNAVAILABLE, m),
    })?;
    Ok((StatusCode::CREATED, Json(t)).into_response())
}

async fn list_tokens(State(hub): State<Shared>) -> Result<Response, ApiError> {
    let mut v = hub.store.tokens().map_err(store_error)?;
    for t in &mut v {
        t.secret_sha256.clear();
    }
    Ok(Json(v).into_response())
}

async fn revoke_token(State(hub): State<Shared>, Path(id): Path<String>) -> Result<StatusCode, ApiError> {
    if !hub.store.revoke_token(&id).map_err(store_error)? {
        return Err(not_found(format!("token {id:?} not found")));
    }
    Ok(StatusCode::NO_CONTENT)
}

async fn revoke_node(State(hub): State<Shared>, Path(name): Path<String>) -> Result<StatusCode, ApiError> {
    fleet_of(&hub)?.revoke_node(&name).map_err(fleet_error)?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
struct AssignQuery {
    /// Answer once the revision passes this one (long-poll).
    after: Option<u64>,
    /// Seconds to wait for that, at most 60.
    wait: Option<u64>,
}

async fn assignments(
    State(hub): State<Shared>,
    peer: Option<axum::Extension<crate::tls::Peer>>,
    Path(name): Path<String>,
    Query(q): Query<AssignQuery>,
) -> Result<Response, ApiError> {
    let f = fleet_of(&hub)?;
    let peer = peer.map(|p| p.0).unwrap_or_default();
    f.authorize(&peer, &name).map_err(fleet_error)?;
    let a = match q.after {
        Some(after) => {
            let wait = Duration::from_secs(q.wait.unwrap_or(30).min(60));
            let a = f.wait_assignment(&name, after, wait).await.map_err(fleet_error)?;
            // The node may have been deleted or replaced while it waited.
            f.authorize(&peer, &name).map_err(fleet_error)?;
            a
        }
        None => f.assignment(&name).map_err(fleet_error)?,
    };
    Ok(Json(a).into_response())
}

/// The image caches of the node's site and the site's token.
async fn site_caches(
    State(hub): State<Shared>,
    peer: Option<axum::Extension<crate::tls::Peer>>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let f = fleet_of(&hub)?;
    f.authorize(&peer.map(|p| p.0).unwrap_or_default(), &name).map_err(fleet_error)?;
    Ok(Json(f.site_caches(&name).map_err(fleet_error)?).into_response())
}

/// The image proxy, for nodes: `resolve` (JSON) and `chunks` (sha256 digests → bytes).
async fn images(
    State(hub): State<Shared>,
    peer: Option<axum::Extension<crate::tls::Peer>>,
    Path((name, call)): Path<(String, String)>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let f = fleet_of(&hub)?;
    f.authorize(&peer.map(|p| p.0).unwrap_or_default(), &name).map_err(fleet_error)?;
    let proxy = f.image_proxy().ok_or_else(|| not_found("this hub proxies no images"))?;
    let (handler, content_type) = match call.as_str() {
        "resolve" => {
            let image = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v.get("reference").and_then(|r| r.as_str()).map(String::from))
                .ok_or_else(|| bad("request: want {\"reference\": IMAGE, \"platform\": OS/ARCH}"))?;
            if !f.may_pull(&name, &image) {
                return Err(ApiError(
                    StatusCode::FORBIDDEN,
                    format!("image {image} is not in the work of node {name} (or of its site, for a site cache)"),
                ));
            }
            (&proxy.resolve, "application/json")
        }
        "chunks" => (&proxy.chunks, "application/octet-stream"),
        other => return Err(not_found(format!("no image call {other:?} (resolve, chunks)"))),
    };
    match handler(name, body.to_vec()).await {
        Ok(bytes) => Ok(([(header::CONTENT_TYPE, content_type)], bytes).into_response()),
        Err((status, msg)) => Err(ApiError(StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY), msg)),
    }
}

/// The Kubernetes Services the hub keeps (as applied), which `skiff apply` reads.
async fn kept_services(State(hub): State<Shared>) -> Result<Json<Vec<skiff_model::api::KeptService>>, ApiError> {
    Ok(Json(hub.kept_services().map_err(store_error)?))
}

/// `skiff delete -f` of a Service: the hub keeps it no more.
async fn forget_service(
    State(hub): State<Shared>,
    Path((stack, name)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    match hub.forget_service(&stack, &name).map_err(store_error)? {
        true => Ok(StatusCode::NO_CONTENT),
        false => Err(not_found(format!("service {stack}/{name} not found"))),
    }
}

#[derive(Debug, serde::Deserialize)]
struct PushQuery {
    reference: String,
    /// `sha256:…`: the build the pusher has; answered without a body if the hub holds it.
    digest: Option<String>,
}

/// `POST /api/v1/images?reference=REF[&digest=D]`: an image built by the operator (an OCI
/// archive in the body; none, when the hub already holds build `D`), kept by a fleet's hub and offered to the nodes that run it through the
/// image proxy (`skiff apply` of a compose file with `build:` on a fleet).
async fn push_image(
    State(hub): State<Shared>,
    Query(q): Query<PushQuery>,
    body: axum::body::Body,
) -> Result<Json<skiff_model::api::ImagePushed>, ApiError> {
    let f = fleet_of(&hub)?;
    let push = f.image_proxy().and_then(|p| p.push.clone()).ok_or_else(|| {
        ApiError(StatusCode::CONFLICT, "this hub keeps no images: its nodes pull from registries".into())
    })?;
    match push(q.reference, q.digest, body).await {
        Ok(p) => Ok(Json(p)),
        Err((status, msg)) => Err(ApiError(StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY), msg)),
    }
}

/// A node's call to a fleet service it cannot reach directly, relayed to a node that runs
/// it over that node's tunnel (as port-forward's connections are).
async fn mesh_relay(
    State(hub): State<Shared>,
    peer: Option<axum::Extension<crate::tls::Peer>>,
    Path((name, service, port)): Path<(String, String, u16)>,
    ws: axum::extract::WebSocketUpgrade,
) -> Result<Response, ApiError> {
    relay_to(hub, peer, (name, service, port), Protocol::Tcp, ws)
}

/// The same for a UDP port: a flow's datagrams, each framed (a path of its own, so a
/// hub that predates it answers 404 rather than relay them to a TCP port).
async fn mesh_relay_udp(
    State(hub): State<Shared>,
    peer: Option<axum::Extension<crate::tls::Peer>>,
    Path((name, service, port)): Path<(String, String, u16)>,
    ws: axum::extract::WebSocketUpgrade,
) -> Result<Response, ApiError> {
    relay_to(hub, peer, (name, service, port), Protocol::Udp, ws)
}

fn relay_to(
    hub: Shared,
    peer: Option<axum::Extension<crate::tls::Peer>>,
    (name, service, port): (String, String, u16),
    protocol: Protocol,
    ws: axum::extract::WebSocketUpgrade,
) -> Result<Response, ApiError> {
    let f = Arc::clone(fleet_of(&hub)?);
    f.authorize(&peer.map(|p| p.0).unwrap_or_default(), &name).map_err(fleet_error)?;
    static TURN: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let turn = TURN.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let (node, instance, target) = f.relay_target(&name, &service, port, protocol, turn).map_err(fleet_error)?;
    tracing::debug!(from = %name, %service, to = %node, %instance, ?protocol, "mesh relay");
    let link: Arc<dyn crate::node::NodeLink> = Arc::new(crate::tunnel::RemoteLink { name: node, fleet: f });
    let ws = ws.max_message_size(MAX_BODY).max_frame_size(MAX_BODY);
    Ok(ws.on_upgrade(move |socket| crate::session::serve_forward(link, instance, target, protocol, socket)))
}

/// The node's tunnel: a WebSocket its agent keeps open, carrying logs and exec.
async fn tunnel(
    State(hub): State<Shared>,
    peer: Option<axum::Extension<crate::tls::Peer>>,
    Path(name): Path<String>,
    ws: axum::extract::WebSocketUpgrade,
) -> Result<Response, ApiError> {
    let f = Arc::clone(fleet_of(&hub)?);
    let peer = peer.map(|p| p.0).unwrap_or_default();
    // A store read: off the async threads (thousands of nodes dial at once).
    let (f2, p2, n2) = (Arc::clone(&f), peer.clone(), name.clone());
    tokio::task::spawn_blocking(move || f2.authorize(&p2, &n2)).await.map_err(internal)?.map_err(fleet_error)?;
    // Small buffers: tens of thousands of mostly idle tunnels, whose frames are small (the
    // default 128 KiB read buffer per connection would dominate the hub's memory).
    let ws = ws.read_buffer_size(8 << 10).write_buffer_size(0).max_message_size(MAX_BODY).max_frame_size(MAX_BODY);
    let mut answer = ws.on_upgrade(move |socket| crate::tunnel::serve(f, name, peer, socket));
    // The node may deflate its frames (an agent that predates the header never does).
    answer.headers_mut().insert(
        skiff_model::proto::TUNNEL_FEATURES,
        axum::http::HeaderValue::from_static(skiff_model::proto::FEATURE_DEFLATE),
    );
    Ok(answer)
}

async fn node_status(
    State(hub): State<Shared>,
    peer: Option<axum::Extension<crate::tls::Peer>>,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let f = fleet_of(&hub)?;
    f.authorize(&peer.map(|p| p.0).unwrap_or_default(), &name).map_err(fleet_error)?;
    let st: skiff_model::proto::NodeStatus = parse_body(&body)?;
    if let Some(i) = st.instances.iter().find(|i| i.node != name) {
        return Err(ApiError(StatusCode::FORBIDDEN, format!("instances[{}]: belongs to node {:?}", i.name, i.node)));
    }
    Ok(Json(f.heartbeat(&name, st).map_err(fleet_error)?).into_response())
}

#[derive(Deserialize)]
struct EventQuery {
    limit: Option<usize>,
    wait: Option<u64>,
}

async fn events(
    State(hub): State<Shared>,
    Query(q): Query<EventQuery>,
    headers: axum::http::HeaderMap,
) -> Result<Response, ApiError> {
    let limit = q.limit.unwrap_or(100).min(10_000);
    watched(&WatchQuery { wait: q.wait }, &headers, hub.changes(), || {
        let mut all = hub.nodes.events(limit);
        all.extend(hub.autoscaler.events());
        all.extend(hub.rollouts.events());
        all.extend(hub.alerts.events());
        all.sort_by_key(|e| e.time_ms);
        Ok(all)
    })
    .await
}

/// The alerts pending or firing (watchable).
async fn alerts(
    State(hub): State<Shared>,
    Query(q): Query<WatchQuery>,
    headers: axum::http::HeaderMap,
) -> Result<Response, ApiError> {
    watched(&q, &headers, hub.changes(), || Ok(hub.alerts.list())).await
}

/// The autoscaled deployments with their newest decision.
async fn autoscalers(
    State(hub): State<Shared>,
    Query(q): Query<WatchQuery>,
    headers: axum::http::HeaderMap,
) -> Result<Response, ApiError> {
    watched(&q, &headers, hub.changes(), || Ok(hub.autoscaler.statuses())).await
}

/// The newest resource sample of every node (`skiff top`).
async fn samples(
    State(hub): State<Shared>,
    Query(q): Query<WatchQuery>,
    headers: axum::http::HeaderMap,
) -> Result<Response, ApiError> {
    watched(&q, &headers, hub.changes(), || Ok(hub.metrics())).await
}

/// The fleet's metrics for Prometheus (OpenMetrics text).
async fn prometheus(State(hub): State<Shared>) -> Response {
    let text = crate::metrics::render(&hub.metrics(), crate::metrics::MAX_INSTANCE_SERIES, hub.clock.now_ms());
    ([(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], text).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    async fn round(n: &Arc<AtomicU64>, tag: Option<&str>, wait: u64) -> (StatusCode, String) {
        let mut headers = axum::http::HeaderMap::new();
        if let Some(t) = tag {
            headers.insert(header::IF_NONE_MATCH, t.parse().unwrap());
        }
        let r =
            watched(&WatchQuery { wait: Some(wait) }, &headers, vec![], || Ok(vec![n.load(Ordering::SeqCst)])).await;
        let r = r.unwrap_or_else(|e| panic!("{}", e.1));
        let tag = r.headers()[header::ETAG].to_str().unwrap().to_string();
        (r.status(), tag)
    }

    #[tokio::test]
    async fn a_watch_answers_when_the_content_changes_or_the_wait_ends() {
        let n = Arc::new(AtomicU64::new(1));
        let (status, first) = round(&n, None, 0).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(round(&n, Some(&first), 0).await, (StatusCode::NOT_MODIFIED, first.clone()), "unchanged");
        let bump = Arc::clone(&n);
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            bump.store(2, Ordering::SeqCst);
        });
        let (status, second) = round(&n, Some(&first), 30).await;
        assert_eq!(status, StatusCode::OK, "held until the content changed");
        assert_ne!(second, first);
        assert_eq!(round(&n, Some(&second), 1).await.0, StatusCode::NOT_MODIFIED, "the wait ran out");
        assert_eq!(round(&n, Some("\"stale\""), 30).await, (StatusCode::OK, second), "a stale tag gets the list now");
    }
}
