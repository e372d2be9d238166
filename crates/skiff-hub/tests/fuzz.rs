//! Property tests of the API's bodies, as a fuzzer would drive the hub: applies, tokens,
//! joins and execs whose JSON is of any shape, or a valid apply with one value swapped.
//! The hub answers every one (in process, through its real router) with a success or a
//! 4xx that says where the body is wrong — never a 500, never a panic — and a refused
//! apply stores nothing.

#![allow(clippy::unwrap_used)] // tests may panic on setup failures

use axum::body::Body;
use proptest::prelude::*;
use serde_json::{json, Value};
use skiff_hub::store::{SqliteStore, Store};
use skiff_hub::Hub;
use std::sync::Arc;
use tower::ServiceExt;

const ADMIN: &str = "admin-token-for-the-fuzzer";

fn hub(dir: &std::path::Path) -> Arc<Hub> {
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&dir.join("hub.db")).unwrap());
    let ca = skiff_hub::pki::Ca::load_or_create(&dir.join("pki")).unwrap();
    let fleet = Arc::new(skiff_hub::fleet::Fleet::new(ca, Arc::clone(&store), skiff_hub::clock::system()).unwrap());
    Arc::new(Hub::new(store, Arc::new(skiff_hub::nodes::Remote(fleet)), ADMIN.into()))
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>().prop_map(|f| json!(f)),
        "[ -~]{0,16}".prop_map(Value::String),
        prop::sample::select(vec!["web", "busybox", "512Mi", "always", "host", "wasm", "0.5", "80"])
            .prop_map(|s| Value::String(s.into())),
    ];
    let keys = vec![
        "deployments",
        "name",
        "image",
        "replicas",
        "resources",
        "memory_bytes",
        "cpus_millis",
        "ports",
        "env",
        "volumes",
        "restart",
        "network",
        "runtime",
        "prune_stack",
        "dry_run",
        "stack",
        "token",
        "node",
        "csr",
        "spec",
        "os",
        "arch",
        "argv",
        "timeout_ms",
        "ttl_seconds",
        "uses",
        "replace",
        "role",
        "healthcheck",
        "depends_on",
        "placement",
        "update",
        "autoscale",
        "wasm",
        "cap_add",
        "devices",
        "labels",
    ];
    leaf.prop_recursive(4, 48, 6, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::vec((prop::sample::select(keys.clone()), inner), 0..6)
                .prop_map(|kv| Value::Object(kv.into_iter().map(|(k, v)| (k.to_string(), v)).collect())),
        ]
    })
}

/// A valid apply to start mutations from.
fn valid_apply() -> Value {
    let d = skiff_model::Deployment::new("web", "busybox");
    json!({"deployments": [serde_json::to_value(d).unwrap()]})
}

/// Swaps the value at a random place in `v` (by a walk of `path` choices) for `with`.
fn swap(v: &mut Value, path: &[usize], with: Value) {
    let Some((&first, rest)) = path.split_first() else {
        *v = with;
        return;
    };
    match v {
        Value::Object(m) if !m.is_empty() => {
            let k = m.keys().nth(first % m.len()).cloned().unwrap();
            swap(m.get_mut(&k).unwrap(), rest, with);
        }
        Value::Array(a) if !a.is_empty() => {
            let n = a.len();
            swap(&mut a[first % n], rest, with);
        }
        other => *other = with,
    }
}

/// Sends `body` to `path` and returns (status, error message if any).
fn call(rt: &tokio::runtime::Runtime, hub: &Arc<Hub>, method: &str, path: &str, body: Vec<u8>) -> (u16, String) {
    let req = axum::http::Request::builder()
        .method(method)
        .uri(path)
        .header("authorization", format!("Bearer {ADMIN}"))
        .header("content-type", "application/json")
        .body(Body::from(body))
        .unwrap();
    rt.block_on(async {
        let resp = skiff_hub::api::router(Arc::clone(hub)).oneshot(req).await.unwrap();
        let status = resp.status().as_u16();
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20).await.unwrap();
        let err = serde_json::from_slice::<Value>(&bytes).ok().and_then(|v| v["error"].as_str().map(str::to_string));
        (status, err.unwrap_or_default())
    })
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap()
}

/// A 4xx says what is wrong and where (`field: problem`).
fn explained(status: u16, err: &str) -> bool {
    (400..500).contains(&status) && err.contains(": ") && err.len() > 4
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn applies_of_any_shape_get_a_success_or_a_400_naming_the_field(body in json_value()) {
        let t = tempfile::tempdir().unwrap();
        let (hub, rt) = (hub(t.path()), rt());
        let (status, err) = call(&rt, &hub, "POST", "/api/v1/apply", serde_json::to_vec(&body).unwrap());
        prop_assert!(status == 200 || explained(status, &err), "{status} {err} for {body}");
        if status != 200 {
            prop_assert!(hub.store.list().unwrap().is_empty(), "a refused apply stored something");
        }
    }

    #[test]
    fn a_valid_apply_with_one_value_swapped_is_applied_or_refused_by_field(
        path in prop::collection::vec(0usize..16, 0..6),
        with in json_value(),
    ) {
        let t = tempfile::tempdir().unwrap();
        let (hub, rt) = (hub(t.path()), rt());
        let mut body = valid_apply();
        swap(&mut body, &path, with);
        let (status, err) = call(&rt, &hub, "POST", "/api/v1/apply", serde_json::to_vec(&body).unwrap());
        prop_assert!(status == 200 || explained(status, &err), "{status} {err} for {body}");
        if status != 200 {
            prop_assert!(hub.store.list().unwrap().is_empty(), "a refused apply stored something");
        }
    }

    #[test]
    fn tokens_joins_and_execs_of_any_shape_are_answered_without_a_500(body in json_value(), raw in prop::collection::vec(any::<u8>(), 0..64)) {
        let t = tempfile::tempdir().unwrap();
        let (hub, rt) = (hub(t.path()), rt());
        for (method, path) in [("POST", "/api/v1/tokens"), ("POST", "/api/v1/join"), ("POST", "/api/v1/instances/web-1/exec"), ("POST", "/api/v1/deployments/web/undo")] {
            for b in [serde_json::to_vec(&body).unwrap(), raw.clone()] {
                let (status, err) = call(&rt, &hub, method, path, b);
                prop_assert!(status < 500, "{method} {path}: {status} {err}");
                if status >= 400 {
                    prop_assert!(!err.is_empty(), "{method} {path}: {status} without a reason");
                }
            }
        }
    }
}
