//! Property tests of the importers, as fuzzers would drive them: compose files and
//! Kubernetes manifests built from their real keys with values of any shape, valid files
//! with one value swapped for garbage, and plain garbage. Whatever comes in, the import
//! returns (no panic, no hang) and a refusal names the field it is about.

#![allow(clippy::unwrap_used)] // tests may panic on setup failures

use proptest::prelude::*;
use serde_norway::{Mapping, Value};
use skiff_manifest::{import_compose, import_k8s, ManifestError};
use std::path::Path;

/// Keys compose files use, at service level and below.
const SERVICE_KEYS: &[&str] = &[
    "image",
    "command",
    "entrypoint",
    "environment",
    "env_file",
    "ports",
    "volumes",
    "restart",
    "deploy",
    "healthcheck",
    "depends_on",
    "network_mode",
    "networks",
    "user",
    "working_dir",
    "hostname",
    "cap_add",
    "cap_drop",
    "devices",
    "read_only",
    "labels",
    "cpu_shares",
    "mem_limit",
    "cpus",
    "stop_signal",
    "stop_grace_period",
    "runtime",
    "platform",
    "x-skiff-runtime",
    "x-skiff-wasm",
    "build",
    "resources",
    "limits",
    "reservations",
    "memory",
    "replicas",
    "mode",
    "placement",
    "constraints",
    "preferences",
    "update_config",
    "parallelism",
    "order",
    "test",
    "interval",
    "timeout",
    "retries",
    "start_period",
    "condition",
    "target",
    "published",
    "protocol",
    "source",
    "type",
    "read_only",
    "x-skiff-autoscale",
];

/// Keys Kubernetes objects use.
const K8S_KEYS: &[&str] = &[
    "apiVersion",
    "kind",
    "metadata",
    "name",
    "namespace",
    "labels",
    "spec",
    "replicas",
    "selector",
    "matchLabels",
    "template",
    "containers",
    "image",
    "args",
    "command",
    "env",
    "value",
    "ports",
    "containerPort",
    "resources",
    "limits",
    "requests",
    "cpu",
    "memory",
    "volumeMounts",
    "mountPath",
    "volumes",
    "hostPath",
    "path",
    "nodeSelector",
    "strategy",
    "rollingUpdate",
    "maxSurge",
    "maxUnavailable",
    "type",
    "port",
    "targetPort",
    "nodePort",
    "scaleTargetRef",
    "minReplicas",
    "maxReplicas",
    "metrics",
    "runtimeClassName",
    "livenessProbe",
    "readinessProbe",
    "exec",
];

fn scalar() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| Value::Number(n.into())),
        any::<f64>().prop_map(|f| Value::Number(f.into())),
        "[a-zA-Z0-9:./_${}\\- =]{0,24}".prop_map(Value::String),
        prop::sample::select(vec!["80:80", "0.5", "64m", "512Mi", "always", "host", "none", "1s", "${X:-y}", "web:1"])
            .prop_map(|s| Value::String(s.into())),
    ]
}

/// A value of any shape, nested up to three levels, whose keys come from `keys`.
fn value(keys: &'static [&'static str]) -> impl Strategy<Value = Value> {
    scalar().prop_recursive(3, 24, 6, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Sequence),
            prop::collection::vec((prop::sample::select(keys), inner), 0..6).prop_map(|kv| {
                let mut m = Mapping::new();
                for (k, v) in kv {
                    m.insert(Value::String(k.to_string()), v);
                }
                Value::Mapping(m)
            }),
        ]
    })
}

/// A service: an image (mostly), then real keys with values of any shape.
fn service() -> impl Strategy<Value = Value> {
    (any::<bool>(), prop::collection::vec((prop::sample::select(SERVICE_KEYS), value(SERVICE_KEYS)), 0..6)).prop_map(
        |(image, kv)| {
            let mut m = Mapping::new();
            if image {
                m.insert("image".into(), Value::String("busybox".into()));
            }
            for (k, v) in kv {
                m.insert(Value::String(k.to_string()), v);
            }
            Value::Mapping(m)
        },
    )
}

/// A compose file: services of any shape.
fn compose_doc() -> impl Strategy<Value = String> {
    prop::collection::vec(("[a-z][a-z0-9-]{0,8}", prop_oneof![service(), value(SERVICE_KEYS)]), 0..3).prop_map(
        |services| {
            let mut s = Mapping::new();
            for (name, v) in services {
                s.insert(Value::String(name), v);
            }
            let mut root = Mapping::new();
            root.insert(Value::String("services".into()), Value::Mapping(s));
            serde_norway::to_string(&Value::Mapping(root)).unwrap_or_default()
        },
    )
}

/// A Kubernetes document of a kind skiff reads, with any spec.
fn k8s_doc() -> impl Strategy<Value = String> {
    (
        prop::sample::select(vec![
            ("apps/v1", "Deployment"),
            ("apps/v1", "DaemonSet"),
            ("v1", "Service"),
            ("autoscaling/v2", "HorizontalPodAutoscaler"),
            ("v1", "ConfigMap"),
        ]),
        "[a-z][a-z0-9-]{0,8}",
        value(K8S_KEYS),
    )
        .prop_map(|((api, kind), name, spec)| {
            let mut meta = Mapping::new();
            meta.insert("name".into(), Value::String(name));
            let mut root = Mapping::new();
            root.insert("apiVersion".into(), Value::String(api.into()));
            root.insert("kind".into(), Value::String(kind.into()));
            root.insert("metadata".into(), Value::Mapping(meta));
            root.insert("spec".into(), spec);
            serde_norway::to_string(&Value::Mapping(root)).unwrap_or_default()
        })
}

fn compose(text: &str) -> Result<skiff_manifest::ComposeImport, ManifestError> {
    let env = |k: &str| (k == "X").then(|| "x".to_string());
    let files = |_: &Path| Err(std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"));
    import_compose(text, Path::new("/stack"), "stack", &env, &files)
}

/// A refusal of a well-formed YAML document names the field: `a.b[2].c: problem`.
fn names_a_field(e: &ManifestError) -> bool {
    match e {
        ManifestError::Invalid { path, problem } => !path.is_empty() && !problem.is_empty(),
        ManifestError::Yaml(m) => !m.is_empty(),
    }
}

const VALID_COMPOSE: &str = "services:\n  web:\n    image: busybox\n    ports: ['8080:80']\n    deploy:\n      resources:\n        limits: {cpus: '0.5', memory: 64M}\n    healthcheck:\n      test: [CMD, true]\n      interval: 2s\n";

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn compose_files_of_any_shape_are_imported_or_refused_by_field(doc in compose_doc()) {
        match compose(&doc) {
            Ok(i) => prop_assert!(i.deployments.iter().all(|d| d.validate().is_ok()), "{doc}"),
            Err(e) => prop_assert!(matches!(e, ManifestError::Invalid { .. }) && names_a_field(&e), "{doc}\n{e}"),
        }
    }

    #[test]
    fn kubernetes_manifests_of_any_shape_are_imported_or_refused_by_field(doc in k8s_doc()) {
        match import_k8s(&doc, "default") {
            Ok(i) => prop_assert!(i.deployments.iter().all(|d| d.validate().is_ok())),
            Err(e) => prop_assert!(matches!(e, ManifestError::Invalid { .. }) && names_a_field(&e), "{doc}\n{e}"),
        }
    }

    #[test]
    fn a_valid_file_with_one_value_swapped_is_still_handled(at in 0usize..200, junk in "[ -~]{0,12}") {
        let mut text = VALID_COMPOSE.to_string();
        let at = at.min(text.len());
        if text.is_char_boundary(at) {
            text.insert_str(at, &junk);
        }
        if let Err(e) = compose(&text) {
            prop_assert!(names_a_field(&e));
        }
    }

    #[test]
    fn garbage_is_refused_without_a_panic(text in "\\PC{0,400}") {
        let _ = compose(&text);
        let _ = import_k8s(&text, "default");
    }
}
