//! Data-driven compose import checks: each case is a compose file and the expected error
//! or a property of the result.

#![allow(clippy::unwrap_used)] // tests may panic on setup failures

use skiff_manifest::{import_compose, ComposeImport, ManifestError};
use skiff_model::{DependencyCondition, NetworkMode, Protocol, RestartPolicy, VolumeSource};
use std::path::Path;

fn env(k: &str) -> Option<String> {
    match k {
        "TAG" => Some("1.2".into()),
        "HOME" => Some("/home/u".into()),
        "FROM_ENV" => Some("yes".into()),
        _ => None,
    }
}

fn files(p: &Path) -> std::io::Result<String> {
    match p.to_str() {
        Some("/stack/app.env") => Ok("# comment\nA=from-file\nB=\"quoted\"\nexport C=c\n".into()),
        Some("/stack/sub/db.yaml") => {
            Ok("name: other\nservices:\n  db:\n    image: db\n    env_file: [db.env]\n    volumes: [./data:/data]\n"
                .into())
        }
        Some("/stack/sub/db.env") => Ok("WHERE=sub\n".into()),
        Some("/stack/loop.yaml") => Ok("include: [loop.yaml]\nservices: {}\n".into()),
        _ => Err(std::io::Error::new(std::io::ErrorKind::NotFound, "no such file")),
    }
}

fn import(yaml: &str) -> Result<ComposeImport, ManifestError> {
    import_compose(yaml, Path::new("/stack"), "My Stack", &env, &files)
}

fn err(yaml: &str) -> String {
    import(yaml).unwrap_err().to_string()
}

#[test]
fn full_service() {
    let c = import(
        r#"
services:
  web:
    image: "registry.local/web:${TAG}"
    command: sh -c 'httpd -f -p 80'
    environment:
      X: "1"
      A: override
      FROM_ENV:
    env_file: app.env
    ports: ["8080:80", "127.0.0.1:5353:53/udp", {target: 9000, published: 9001}]
    volumes: ["./data:/data:ro", "cache:/cache", {type: bind, source: /srv, target: /srv}]
    restart: on-failure:3
    deploy:
      replicas: 1
      resources:
        limits: {cpus: "0.5", memory: 64M, pids: 100}
        reservations: {cpus: 0.25, memory: 32m}
    cpu_shares: 2048
    healthcheck:
      test: ["CMD", "wget", "-q", "-O-", "http://localhost/"]
      interval: 2s
      timeout: 1s
      retries: 5
      start_period: 10s
    depends_on:
      db: {condition: service_healthy}
    user: "1000:1000"
    working_dir: /www
    read_only: true
    tty: true
    stdin_open: true
    cap_add: [NET_ADMIN]
    cap_drop: [ALL]
    labels: [team=edge]
  db:
    image: db
    network_mode: host
    stop_grace_period: 1m30s
"#,
    )
    .unwrap();
    assert_eq!(c.project, "mystack");
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);
    let web = &c.deployments[0];
    assert_eq!(web.image, "registry.local/web:1.2");
    assert_eq!(web.command.as_deref().unwrap(), ["sh", "-c", "httpd -f -p 80"]);
    assert_eq!(web.env["A"], "override");
    assert_eq!(web.env["B"], "quoted");
    assert_eq!(web.env["C"], "c");
    assert_eq!(web.env["FROM_ENV"], "yes");
    assert_eq!(web.ports[1].protocol, Protocol::Udp);
    assert_eq!(web.ports[1].host_ip.as_deref(), Some("127.0.0.1"));
    assert_eq!((web.ports[2].host_port, web.ports[2].container_port), (9001, 9000));
    assert_eq!(web.volumes[0].source, VolumeSource::Bind { path: "/stack/data".into() });
    assert!(web.volumes[0].read_only);
    assert_eq!(web.volumes[1].source, VolumeSource::Named { name: "cache".into() });
    assert_eq!(web.restart, RestartPolicy::OnFailure { max_retries: Some(3) });
    assert_eq!(web.resources.cpus_millis, Some(500));
    assert_eq!(web.resources.memory_bytes, Some(64 << 20));
    assert_eq!(web.resources.pids_limit, Some(100));
    assert_eq!(web.resources.cpus_reservation_millis, Some(250));
    assert_eq!(web.resources.cpu_shares, Some(2048));
    let hc = web.healthcheck.as_ref().unwrap();
    assert_eq!((hc.interval_ms, hc.timeout_ms, hc.retries, hc.start_period_ms), (2000, 1000, 5, 10_000));
    assert_eq!(web.depends_on[0].condition, DependencyCondition::ServiceHealthy);
    assert!(web.read_only);
    assert!(web.tty && web.stdin_open);
    assert_eq!(web.labels["team"], "edge");
    assert_eq!(c.deployments[1].network, NetworkMode::Host);
    assert_eq!(c.deployments[1].stop_grace_period_ms, 90_000);
    assert!(c.deployments.iter().all(|d| d.stack == "mystack"));
}

#[test]
fn unsupported_keys_warn_with_their_path() {
    let c = import("name: demo\nnetworks: {front: {}}\nservices:\n  web:\n    image: a\n    logging: {driver: syslog}\n    deploy: {endpoint_mode: vip, placement: {max_replicas_per_node: 1}}\n    x-skiff-note: fine\n").unwrap();
    assert_eq!(
        c.warnings,
        [
            "services.web.logging.driver: \"syslog\" is not supported; logs are kept as json-file",
            "services.web.deploy.endpoint_mode: not supported yet, ignored",
            "services.web.deploy.placement.max_replicas_per_node: not supported yet, ignored"
        ]
    );
}

#[test]
fn errors_name_the_path_and_problem() {
    let cases = [
        ("services:\n  web:\n    image: a\n    deploy: {resources: {limits: {memory: 12XB}}}\n", "services.web.deploy.resources.limits.memory: \"12XB\" is not a size (examples: 512m, 1g, 512Mi, 1048576)"),
        ("services:\n  web:\n    image: a\n    cpus: lots\n", "services.web.cpus: \"lots\" is not a cpu amount (examples: 0.5, 2, 500m)"),
        ("services:\n  web:\n    image: a\n    ports: [\"99999:80\"]\n", "services.web.ports[0]: \"99999:80\" is not a port mapping (examples: 8080:80, 127.0.0.1:53:53/udp)"),
        ("services:\n  web:\n    image: a\n    restart: sometimes\n", "services.web.restart: \"sometimes\" is not a restart policy (no, always, on-failure[:N], unless-stopped)"),
        ("services:\n  web:\n    command: x\n", "services.web.image: is required"),
        ("services:\n  web:\n    image: a\n    deploy: {replicas: -1}\n", "services.web.deploy.replicas: -1 must be 0 or more"),
        ("services:\n  web!:\n    image: a\n", "services.web!.name: \"web!\" is not a valid name (lower-case letters, digits, '-' and '_', at most 63 characters)"),
        ("services:\n  web:\n    image: a\n    healthcheck: {test: [CMD], interval: soon}\n", "services.web.healthcheck.interval: \"soon\" is not a duration (examples: 10s, 1m30s, 500ms)"),
        ("services:\n  web:\n    image: a\n    env_file: missing.env\n", "services.web.env_file: reading /stack/missing.env: no such file"),
        ("services:\n  web:\n    image: ${NOPE:?set NOPE}\n", "services.web.image: required variable NOPE is missing a value: set NOPE"),
        ("services:\n  web:\n    image: a\n    read_only: maybe\n", "services.web.read_only: \"maybe\" is not a boolean"),
        ("services: []\n", "services: must be a mapping"),
        ("- a\n", "(root): a compose file must be a mapping with a services key"),
        ("services:\n  web:\n    image: a\n    deploy: {resources: {limits: {memory: 1k}}}\n", "services.web.resources.memory: 1024 bytes is below the minimum of 6MiB"),
    ];
    for (yaml, want) in cases {
        assert_eq!(err(yaml), want, "for:\n{yaml}");
    }
    assert!(err("services: {web: [").starts_with("not valid YAML"));
}

#[test]
fn compose_examples_in_repo_import() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples");
    let mut n = 0;
    for entry in std::fs::read_dir(&root).unwrap().flatten() {
        let f = entry.path().join("compose.yaml");
        if f.exists() {
            let text = std::fs::read_to_string(&f).unwrap();
            let c = import_compose(&text, &entry.path(), "x", &|_| None, &|p| std::fs::read_to_string(p)).unwrap();
            assert!(!c.deployments.is_empty());
            n += 1;
        }
    }
    assert!(n >= 1, "no example compose files found");
}

#[test]
fn placement_modes_constraints_and_spread() {
    let c = import(
        r#"
services:
  analyser:
    image: a
    deploy:
      mode: global
      placement:
        constraints: ["node.labels.camera == true", "node.labels.site==factory-3"]
  api:
    image: b
    deploy:
      replicas: 4
      placement:
        preferences: [{spread: node.labels.site}]
      x-skiff-reschedule-after: 10m
"#,
    )
    .unwrap();
    let a = c.deployments.iter().find(|d| d.name == "analyser").unwrap();
    assert_eq!(a.placement.mode, skiff_model::PlacementMode::Global);
    assert_eq!(a.placement.node_selector.get("camera").map(String::as_str), Some("true"));
    assert_eq!(a.placement.node_selector.get("site").map(String::as_str), Some("factory-3"));
    let b = c.deployments.iter().find(|d| d.name == "api").unwrap();
    assert_eq!((b.replicas, b.placement.spread_by.as_deref()), (4, Some("site")));
    assert_eq!(b.placement.reschedule_after_ms, Some(600_000));
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);

    for (yaml, want) in [
        ("services:\n  a:\n    image: a\n    deploy:\n      mode: daemon\n", "services.a.deploy.mode: \"daemon\" is not replicated or global"),
        ("services:\n  a:\n    image: a\n    deploy:\n      placement:\n        constraints: [\"node.spaceship==x\"]\n", "services.a.deploy.placement.constraints[0]: \"node.spaceship==x\": \"node.spaceship\" is not a placement attribute"),
        ("services:\n  a:\n    image: a\n    deploy:\n      placement:\n        preferences: [{spread: node.id}]\n", "services.a.deploy.placement.preferences[0].spread: \"node.id\" must be node.labels.KEY"),
        ("services:\n  a:\n    image: a\n    deploy:\n      placement:\n        constraints: [\"node.labels.bad key==x\"]\n", "placement.node_selector.bad key"),
    ] {
        let e = err(yaml);
        assert!(e.contains(want), "want {want:?} in {e:?}");
    }
}

#[test]
fn update_config_maps_to_batches_and_strategies() {
    use skiff_model::rollout::{FailureAction, IntOrPercent, NodeStrategy, Strategy};
    let c = import(
        "services:\n  web:\n    image: a\n    deploy:\n      replicas: 4\n      update_config:\n        parallelism: 2\n        delay: 5s\n        order: start-first\n        failure_action: pause\n        monitor: 10s\n        max_failure_ratio: 0.25\n        x-skiff-node-strategy: hand-over\n  api:\n    image: b\n    deploy:\n      update_config: {parallelism: 0, x-skiff-strategy: blue-green, x-skiff-rollback-window: 2m}\n  plain:\n    image: c\n",
    )
    .unwrap();
    let by = |n: &str| c.deployments.iter().find(|d| d.name == n).unwrap().update.clone();
    let web = by("web");
    assert_eq!((web.max_surge, web.max_unavailable), (IntOrPercent::Int(2), IntOrPercent::Int(0)));
    assert_eq!((web.delay_ms, web.monitor_ms, web.max_failure_ratio), (5_000, 10_000, 0.25));
    assert_eq!((web.failure_action, web.node_strategy), (FailureAction::Pause, NodeStrategy::HandOver));
    let api = by("api");
    assert_eq!(api.strategy, Strategy::BlueGreen);
    assert_eq!(api.max_unavailable, IntOrPercent::Percent(100), "parallelism 0: all at once, Docker's stop-first");
    assert_eq!(api.rollback_window_ms, 120_000);
    assert!(by("plain").is_default(), "no update_config: skiff's start-first default");

    for (yaml, want) in [
        ("order: sideways", "services.web.deploy.update_config.order: \"sideways\" is not start-first or stop-first"),
        ("parallelism: -1", "services.web.deploy.update_config.parallelism: -1 must be 0 (all at once) or more"),
        (
            "max_failure_ratio: 2",
            "services.web.deploy.update_config.max_failure_ratio: \"2\" is not a ratio between 0 and 1",
        ),
        (
            "x-skiff-strategy: canary",
            "services.web.deploy.update_config.x-skiff-strategy: \"canary\" is not rolling, blue-green or recreate",
        ),
    ] {
        let e = err(&format!("services:\n  web:\n    image: a\n    deploy:\n      update_config: {{{yaml}}}\n"));
        assert_eq!(e, want);
    }
}

#[test]
fn wasm_services() {
    use skiff_model::RuntimeKind;
    let c = import(
        r#"
services:
  fn:
    image: registry.local/fn:1
    x-skiff-runtime: wasm
    x-skiff-wasm: {timeout: 2s, pool: 8}
    ports: ["8080:8080"]
    deploy: {resources: {limits: {cpus: "0.5", memory: 1M}}}
  docker-wasm:
    image: registry.local/hello-wasm:1
    platform: wasi/wasm
    runtime: io.containerd.wasmtime.v1
  box:
    image: busybox
    platform: linux/amd64
"#,
    )
    .unwrap();
    let by = |n: &str| c.deployments.iter().find(|d| d.name == n).unwrap();
    let f = by("fn");
    assert_eq!(f.runtime, RuntimeKind::Wasm);
    assert_eq!((f.wasm.timeout_ms, f.wasm.pool), (Some(2000), Some(8)));
    assert_eq!(f.resources.memory_bytes, Some(1 << 20));
    assert_eq!(by("docker-wasm").runtime, RuntimeKind::Wasm);
    assert_eq!(by("box").runtime, RuntimeKind::Oci);
    assert!(
        c.warnings.iter().any(|w| w.starts_with("services.box.platform: \"linux/amd64\" ignored")),
        "{:?}",
        c.warnings
    );

    assert_eq!(
        err("services:\n  a:\n    image: x\n    runtime: nvidia\n"),
        "services.a.runtime: \"nvidia\" is not a runtime skiff has (oci or runc; runsc or gvisor; wasm, wasmtime or io.containerd.wasmtime.v1)"
    );
    assert_eq!(
        err("services:\n  a:\n    image: x\n    x-skiff-wasm: {timeout: 5s}\n"),
        "services.a.wasm: is only read by the wasm runtime (runtime: wasm)"
    );
    assert_eq!(
        err("services:\n  a:\n    image: x\n    x-skiff-runtime: wasm\n    user: nobody\n"),
        "services.a.user: is not supported by the wasm runtime"
    );
    assert_eq!(
        err("services:\n  a:\n    image: x\n    x-skiff-runtime: wasm\n    x-skiff-wasm: {timeout: soon}\n"),
        "services.a.x-skiff-wasm.timeout: \"soon\" is not a duration (examples: 10s, 1m30s, 500ms)"
    );
}

/// `.env` beside the compose file supplies what the environment lacks; the environment
/// wins; an unreadable `.env` is an error, a missing one is not.
#[test]
fn dot_env_supplies_defaults_the_environment_wins() {
    let yaml = "services:\n  web:\n    image: \"web:${TAG}\"\n    environment: [\"MODE=${MODE}\"]\n";
    let env = |k: &str| (k == "MODE").then(|| "from-env".to_string());
    let files = |p: &Path| match p.to_str() {
        Some("/stack/.env") => Ok("TAG=1.2\nMODE=from-dotenv\n".to_string()),
        _ => Err(std::io::Error::new(std::io::ErrorKind::NotFound, "no such file")),
    };
    let c = import_compose(yaml, Path::new("/stack"), "s", &env, &files).unwrap();
    assert_eq!(c.deployments[0].image, "web:1.2");
    assert_eq!(c.deployments[0].env.get("MODE").map(String::as_str), Some("from-env"));
    let denied = |_: &Path| Err(std::io::Error::new(std::io::ErrorKind::PermissionDenied, "denied"));
    let e = import_compose(yaml, Path::new("/stack"), "s", &env, &denied).unwrap_err().to_string();
    assert_eq!(e, ".env: cannot be read: denied");
}

#[test]
fn cdi_devices_and_gpu_reservations() {
    use skiff_model::DeviceRequest;
    let req = |kind: &str, ids: &[&str], count| DeviceRequest {
        kind: kind.into(),
        ids: ids.iter().map(|s| s.to_string()).collect(),
        count,
    };
    // Docker's GPU examples, and CDI names in devices.
    let c = import(
        "services:\n  a:\n    image: i\n    devices: [/dev/ttyUSB0, vendor.com/fpga=all]\n    deploy:\n      resources:\n        reservations:\n          devices:\n            - {driver: nvidia, count: 1, capabilities: [gpu]}\n            - {capabilities: [gpu], device_ids: ['0', '3']}\n            - {driver: cdi, device_ids: [intel.com/gpu=card1]}\n            - {capabilities: [gpu]}\n",
    )
    .unwrap();
    let d = &c.deployments[0];
    assert_eq!(d.devices.len(), 1);
    assert_eq!(
        d.device_requests,
        [
            req("vendor.com/fpga", &["all"], 0),
            req("nvidia.com/gpu", &[], 1),
            req("nvidia.com/gpu", &["0"], 0),
            req("nvidia.com/gpu", &["3"], 0),
            req("intel.com/gpu", &["card1"], 0),
            req("nvidia.com/gpu", &[], 0),
        ]
    );
    assert!(err("services:\n  a:\n    image: i\n    devices: [vendor/=x]\n")
        .contains("services.a.devices[0]: \"vendor/=x\" is not a CDI device name"));
    let e = err("services:\n  a:\n    image: i\n    deploy: {resources: {reservations: {devices: [{driver: cdi, device_ids: ['0']}]}}}\n");
    assert!(e.contains("services.a.deploy.resources.reservations.devices[0].device_ids[0]"), "{e}");
    let e = err("services:\n  a:\n    image: i\n    deploy: {resources: {reservations: {devices: [{count: 2}]}}}\n");
    assert!(e.contains("names no device kind"), "{e}");
    let e = err("services:\n  a:\n    image: i\n    deploy: {resources: {reservations: {devices: [{capabilities: [gpu], count: 0}]}}}\n");
    assert!(e.contains("count: must be all or a number of 1 or more"), "{e}");
}

#[test]
fn networks_are_named_as_compose_names_them() {
    let c = import(
        r#"
name: shop
services:
  web:
    image: web
    networks: [front, default]
  db:
    image: db
    networks:
      back:
        aliases: [database]
      plant:
  lone:
    image: lone
networks:
  front: {}
  back:
    driver: bridge
    internal: true
  plant:
    external: true
  legacy:
    external:
      name: old-plant
  renamed:
    name: custom
"#,
    )
    .unwrap();
    let by = |n: &str| c.deployments.iter().find(|d| d.name == n).unwrap();
    assert_eq!(by("web").networks, ["shop_front", "shop_default"]);
    assert_eq!(by("db").networks, ["shop_back", "plant"]);
    assert!(by("lone").networks.is_empty(), "the implicit default network");
    assert_eq!(by("lone").joined_networks(), ["shop_default"]);
    assert!(c.warnings.contains(&"networks.back.internal: not supported yet, ignored".to_string()), "{:?}", c.warnings);
    assert!(c.warnings.iter().any(|w| w.starts_with("services.db.networks.back.aliases")), "{:?}", c.warnings);

    // A renamed or external default network is where services without networks go.
    let c =
        import("services:\n  a:\n    image: a\nnetworks:\n  default:\n    external: true\n    name: lan\n").unwrap();
    assert_eq!(c.deployments[0].networks, ["lan"]);

    assert_eq!(
        err("services:\n  a:\n    image: a\n    networks: [nowhere]\n"),
        "services.a.networks[0]: network \"nowhere\" is not declared under networks"
    );
    assert_eq!(
        err("services:\n  a:\n    image: a\n    network_mode: host\n    networks: [default]\n"),
        "services.a.networks: joins networks on the bridge: needs network: bridge"
    );
    assert_eq!(
        err("services:\n  a:\n    image: a\n    networks: [x]\nnetworks:\n  x:\n    name: \"bad name\"\n"),
        "services.a.networks[0]: \"bad name\" is not a network name (letters, digits, '_', '.' and '-', at most 64 characters)"
    );
}

#[test]
fn macvlan_networks_give_services_addresses_on_the_parent_s_segment() {
    let c = import(
        r#"
services:
  cam:
    image: cam
    networks:
      lan:
        ipv4_address: 192.168.1.50
  workers:
    image: w
    deploy: {replicas: 3}
    networks: [lan]
networks:
  lan:
    driver: macvlan
    driver_opts: {parent: eth0}
    ipam:
      config:
        - subnet: 192.168.1.0/24
          ip_range: 192.168.1.64/27
          gateway: 192.168.1.1
"#,
    )
    .unwrap();
    let cam = &c.deployments[0];
    assert_eq!(cam.network, NetworkMode::Macvlan);
    let m = cam.macvlan.as_ref().unwrap();
    assert_eq!((m.parent.as_str(), m.ip.as_deref(), m.ip_range.as_deref()), ("eth0", Some("192.168.1.50"), None));
    let w = c.deployments[1].macvlan.as_ref().unwrap();
    assert_eq!(
        (w.subnet.as_deref(), w.ip_range.as_deref(), w.gateway.as_deref()),
        (Some("192.168.1.0/24"), Some("192.168.1.64/27"), Some("192.168.1.1"))
    );
    assert!(c.deployments[1].networks.is_empty());

    let lan = "networks:\n  lan:\n    driver: macvlan\n";
    assert_eq!(
        err(&format!("services:\n  a:\n    image: a\n    networks: [lan]\n{lan}")),
        "networks.lan.driver_opts.parent: is required for macvlan"
    );
    let lan = format!("{lan}    driver_opts: {{parent: eth0}}\n");
    assert_eq!(
        err(&format!("services:\n  a:\n    image: a\n    networks: [lan]\n{lan}")),
        "services.a.macvlan: needs ip or ip_range: addresses on a shared segment are never guessed"
    );
    assert_eq!(
        err(&format!("services:\n  a:\n    image: a\n    networks: [lan, default]\n{lan}")),
        "services.a.networks[0]: a macvlan network cannot be joined beside others (not supported yet)"
    );
}

#[test]
fn valid_files_compose_accepts_are_accepted() {
    // YAML merge keys, capitals and dots in service names (depends_on follows them).
    let c = import(
        r#"
x-base: &base
  image: base:1
  environment: {A: "1"}
  restart: always
services:
  serviceA:
    <<: *base
    environment: {B: "2"}
  web.api:
    <<: *base
    depends_on: [serviceA]
"#,
    )
    .unwrap();
    let a = &c.deployments[0];
    assert_eq!((a.name.as_str(), a.image.as_str()), ("servicea", "base:1"));
    assert_eq!(a.env.get("B").map(String::as_str), Some("2"));
    assert!(!a.env.contains_key("A"), "an explicit key wins over the merged one, as YAML says");
    assert_eq!(a.restart, RestartPolicy::Always);
    assert_eq!(c.deployments[1].name, "web-api");
    assert_eq!(c.deployments[1].depends_on[0].name, "servicea");
    assert_eq!(
        err("services:\n  Web:\n    image: a\n  web:\n    image: b\n"),
        "services.web: is named \"web\" on the node, as \"Web\" is (names are lower-case there)"
    );

    // An empty file, or one with no services, defines nothing.
    for empty in ["", "services: {}\n", "x-note: nothing yet\n"] {
        let c = import(empty).unwrap();
        assert!(c.deployments.is_empty() && c.warnings.iter().any(|w| w.contains("no services")), "{empty:?}");
    }

    // healthcheck.start_interval, an optional env file that is missing, tiny reservations.
    let c = import(
        "services:\n  a:\n    image: a\n    healthcheck:\n      test: [CMD, true]\n      start_interval: 1s\n    \
         env_file:\n      - path: missing.env\n        required: false\n      - app.env\n    \
         deploy:\n      resources:\n        reservations: {cpus: '0.0001'}\n",
    )
    .unwrap();
    let a = &c.deployments[0];
    assert_eq!(a.env.get("A").map(String::as_str), Some("from-file"));
    assert_eq!(a.resources.cpus_reservation_millis, Some(1));
    assert!(err("services:\n  a:\n    image: a\n    env_file:\n      - path: missing.env\n").contains("missing.env"));

    // Swarm's placement attributes.
    let c = import(
        "services:\n  a:\n    image: a\n    deploy:\n      placement:\n        constraints:\n          \
         - node.hostname==gw-1\n          - node.platform.arch==aarch64\n          - node.role==worker\n          \
         - node.role==manager\n          - node.labels.site!=lab\n",
    )
    .unwrap();
    let sel = &c.deployments[0].placement.node_selector;
    assert_eq!(sel.get("kubernetes.io/hostname").map(String::as_str), Some("gw-1"));
    assert_eq!(sel.get("kubernetes.io/arch").map(String::as_str), Some("arm64"));
    assert_eq!(sel.len(), 2, "{sel:?}");
    assert_eq!(c.warnings.len(), 2, "{:?}", c.warnings);
}

#[test]
fn extends_and_profiles() {
    let c = import(
        r#"
services:
  base:
    image: base:1
    environment: {A: "1", B: "1"}
    ports: ["8080:80"]
    command: ["serve", "--base"]
  web:
    extends: base
    environment: {B: "2"}
    ports: ["9090:90"]
    command: ["serve"]
  debug:
    image: tools
    profiles: [debug]
  migrate:
    image: migrate
    profiles: [tools]
  app:
    image: app
    depends_on: [migrate]
"#,
    )
    .unwrap();
    let by = |n: &str| c.deployments.iter().find(|d| d.name == n);
    let web = by("web").unwrap();
    assert_eq!(web.image, "base:1");
    assert_eq!((web.env["A"].as_str(), web.env["B"].as_str()), ("1", "2"));
    assert_eq!(web.ports.len(), 2, "lists are joined");
    assert_eq!(web.command.as_deref(), Some(&["serve".to_string()][..]), "a command replaces the base's");
    assert!(by("debug").is_none(), "a service of an inactive profile is not started");
    assert!(c.warnings.iter().any(|w| w.starts_with("services.debug: not started")), "{:?}", c.warnings);
    assert!(by("migrate").is_some(), "a service another depends on is started, whatever its profile");

    let with_profile = import_compose(
        "services:\n  debug:\n    image: tools\n    profiles: [debug]\n",
        Path::new("/stack"),
        "p",
        &|k| (k == "COMPOSE_PROFILES").then(|| "debug".to_string()),
        &files,
    )
    .unwrap();
    assert_eq!(with_profile.deployments.len(), 1);

    assert_eq!(
        err("services:\n  a:\n    extends: nowhere\n    image: a\n"),
        "services.a.extends: no service \"nowhere\" in this file"
    );
    assert!(err("services:\n  a:\n    extends: b\n  b:\n    extends: a\n").contains("more than 8"));
}

#[test]
fn tmpfs_as_a_key_and_as_a_volume() {
    let c = import(
        "services:\n  a:\n    image: a\n    tmpfs: [/run, \"/cache:size=64m,mode=700\"]\n    volumes:\n      \
         - type: tmpfs\n        target: /scratch\n        tmpfs: {size: 1g, mode: 1770}\n",
    )
    .unwrap();
    let t = &c.deployments[0].tmpfs;
    assert_eq!(t.len(), 3);
    assert_eq!((t[0].target.as_str(), t[0].size_bytes, t[0].mode), ("/run", None, None));
    assert_eq!((t[1].target.as_str(), t[1].size_bytes, t[1].mode), ("/cache", Some(64 << 20), Some(0o700)));
    assert_eq!((t[2].target.as_str(), t[2].size_bytes, t[2].mode), ("/scratch", Some(1 << 30), Some(0o1770)));
    assert!(c.deployments[0].volumes.is_empty());
    assert_eq!(
        err("services:\n  a:\n    image: a\n    tmpfs: relative\n"),
        "services.a.tmpfs[0].target: \"relative\" is not an absolute path below / without . or .."
    );
}

#[test]
fn logging_options_rotate_the_log_files() {
    let c = import(
        "services:\n  web:\n    image: x\n    logging:\n      driver: json-file\n      options:\n        max-size: 5m\n        max-file: \"4\"\n        compress: \"true\"\n",
    )
    .unwrap();
    let l = c.deployments[0].logging;
    assert_eq!((l.max_size_bytes, l.max_files), (Some(5 << 20), Some(4)));
    assert!(c.warnings.iter().any(|w| w.contains("services.web.logging.options.compress")), "{:?}", c.warnings);
    let c = import("services:\n  web:\n    image: x\n    logging:\n      driver: syslog\n").unwrap();
    assert!(c.warnings.iter().any(|w| w.contains("\"syslog\" is not supported")), "{:?}", c.warnings);
    let e = err("services:\n  web:\n    image: x\n    logging:\n      options:\n        max-size: huge\n");
    assert!(e.contains("services.web.logging.options.max-size: \"huge\" is not a size"), "{e}");
    let e = err("services:\n  web:\n    image: x\n    logging:\n      options:\n        max-file: \"3\"\n");
    assert!(e.contains("services.web.logging.max_files: needs max-size"), "{e}");
}

#[test]
fn sysctls_ulimits_shm_init_extra_hosts_and_dns() {
    let c = import(
        r#"
services:
  web:
    image: web
    sysctls: [net.core.somaxconn=1024]
    ulimits: {nproc: 65535, nofile: {soft: 20000, hard: 40000}, memlock: -1}
    shm_size: 256m
    init: true
    extra_hosts: ["db:10.0.0.5", "gw=host-gateway", "v6:[fe80::1]"]
    dns: 9.9.9.9
    dns_search: [corp.example, example]
    dns_opt: [ndots:2]
  other:
    image: web
    extra_hosts: {db: 10.0.0.6, twice: [10.0.0.7, 10.0.0.8]}
    dns: [1.1.1.1, 8.8.8.8]
"#,
    )
    .unwrap();
    let web = &c.deployments[0];
    assert_eq!(web.sysctls["net.core.somaxconn"], "1024");
    assert_eq!(web.ulimits["nproc"], skiff_model::options::Ulimit { soft: 65535, hard: 65535 });
    assert_eq!(web.ulimits["nofile"], skiff_model::options::Ulimit { soft: 20000, hard: 40000 });
    assert_eq!(web.ulimits["memlock"].hard, u64::MAX);
    assert_eq!(web.shm_size_bytes, Some(256 << 20));
    assert!(web.init);
    let hosts: Vec<(&str, &str)> = web.extra_hosts.iter().map(|h| (h.host.as_str(), h.ip.as_str())).collect();
    assert_eq!(hosts, [("db", "10.0.0.5"), ("gw", "host-gateway"), ("v6", "fe80::1")]);
    assert_eq!(web.dns.servers, ["9.9.9.9"]);
    assert_eq!(web.dns.search, ["corp.example", "example"]);
    assert_eq!(web.dns.options, ["ndots:2"]);
    let other = &c.deployments[1];
    assert_eq!(other.extra_hosts.len(), 3);
    assert_eq!(other.dns.servers, ["1.1.1.1", "8.8.8.8"]);
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);

    for (yaml, says) in [
        ("services: {a: {image: x, sysctls: {kernel.hostname: x}}}", "services.a.sysctls.kernel.hostname"),
        ("services: {a: {image: x, network_mode: host, sysctls: {net.core.somaxconn: 1}}}", "network of its own"),
        ("services: {a: {image: x, ulimits: {nofile: {soft: 2}}}}", "services.a.ulimits.nofile: needs hard"),
        ("services: {a: {image: x, ulimits: {nofile: lots}}}", "services.a.ulimits.nofile"),
        ("services: {a: {image: x, extra_hosts: [nohost]}}", "services.a.extra_hosts[0]"),
        ("services: {a: {image: x, dns: [dns.example]}}", "services.a.dns.servers[0]"),
        ("services: {a: {image: x, shm_size: 1}}", "services.a.shm_size"),
    ] {
        let e = err(yaml);
        assert!(e.contains(says), "{yaml}: {e}");
    }
}

#[test]
fn secrets_and_configs_become_read_only_files() {
    let c = import(
        r#"
services:
  web:
    image: web
    secrets: [db_pass, {source: api_key, target: key.txt, mode: 0400}]
    configs: [site, {source: app, target: /etc/app.conf}]
secrets:
  db_pass: {file: ./app.env}
  api_key: {environment: FROM_ENV}
  vault: {external: true}
configs:
  site: {content: "hello"}
  app: {file: app.env}
"#,
    )
    .unwrap();
    let web = &c.deployments[0];
    let got: Vec<(&str, String, u32, bool)> = web
        .files
        .iter()
        .map(|m| {
            (m.target.as_str(), String::from_utf8(m.files[0].content().unwrap()).unwrap(), m.files[0].mode, m.secret)
        })
        .collect();
    let env_file = "# comment\nA=from-file\nB=\"quoted\"\nexport C=c\n".to_string();
    assert_eq!(
        got,
        [
            ("/run/secrets/db_pass", env_file.clone(), 0o444, true),
            ("/run/secrets/key.txt", "yes".to_string(), 0o400, true),
            ("/site", "hello".to_string(), 0o444, false),
            ("/etc/app.conf", env_file, 0o444, false),
        ]
    );
    for (yaml, says) in [
        (
            "services: {a: {image: x, secrets: [nope]}}",
            "services.a.secrets[0]: \"nope\" is not declared under the top-level secrets",
        ),
        ("services: {a: {image: x}}\nsecrets: {s: {file: ./missing}}", "secrets.s.file: reading /stack/missing"),
        ("services: {a: {image: x}}\nsecrets: {s: {content: x}}", "secrets.s: needs file or environment"),
        (
            "services: {a: {image: x, secrets: [{source: s, mode: 999}]}}\nsecrets: {s: {environment: FROM_ENV}}",
            "services.a.secrets[0].mode",
        ),
    ] {
        let e = err(yaml);
        assert!(e.contains(says), "{yaml}: {e}");
    }
}

#[test]
fn included_files_join_the_project_read_from_their_own_directory() {
    let c = import("include: [sub/db.yaml]\nservices:\n  web:\n    image: web\n    depends_on: [db]\n").unwrap();
    assert_eq!(c.project, "mystack");
    let db = c.deployments.iter().find(|d| d.name == "db").unwrap();
    assert_eq!(db.stack, "mystack", "the including file's project, whatever the included file's name says");
    assert_eq!(db.env["WHERE"], "sub", "its env_file read beside it");
    assert_eq!(db.volumes[0].source, VolumeSource::Bind { path: "/stack/sub/data".into() });
    let long = import("include: [{path: [sub/db.yaml]}]\nservices: {}\n").unwrap();
    assert_eq!(long.deployments.len(), 1);
    for (yaml, says) in [
        (
            "include: [sub/db.yaml]\nservices: {db: {image: x}}\n",
            "services.db: is defined both here and in an included file",
        ),
        ("include: [missing.yaml]\nservices: {}\n", "include[0]: reading /stack/missing.yaml"),
        ("include: [loop.yaml]\nservices: {}\n", "deep (a loop?)"),
        ("include: [\"https://example.com/c.yaml\"]\nservices: {}\n", "a remote file is not supported"),
    ] {
        let e = err(yaml);
        assert!(e.contains(says), "{yaml}: {e}");
    }
}

/// `network_mode: service:NAME` shares that service's network (its instance of the same
/// number); `container:` names something outside the file; a missing service is named.
#[test]
fn network_mode_service_shares_another_services_network() {
    let i = import(
        "services:\n  Web.App: {image: web, ports: ['8080:80']}\n  side: {image: side, network_mode: 'service:Web.App'}\n",
    )
    .unwrap();
    let side = i.deployments.iter().find(|d| d.name == "side").unwrap();
    assert_eq!(side.network, skiff_model::NetworkMode::Service);
    assert_eq!(side.network_service.as_deref(), Some("web-app"));
    assert!(side.validate().is_ok());
    assert_eq!(
        err("services:\n  side: {image: side, network_mode: 'service:db'}\n"),
        "services.side.network_mode: service \"db\" is not in the file (or not in an active profile)"
    );
    assert!(err("services:\n  side: {image: side, network_mode: 'container:abc'}\n")
        .starts_with("services.side.network_mode: \"container:abc\": a container outside the file is not supported"));
    let e = err("services:\n  a: {image: a}\n  side: {image: s, network_mode: 'service:a', ports: ['80:80']}\n");
    assert!(e.contains("ports") && e.contains("bridge"), "{e}");
}

/// A range of host ports for one container port (Docker picks a free one per container):
/// the first is published, said so; a malformed range is still an error.
#[test]
fn a_host_port_range_publishes_its_first_port() {
    let c = import("services:\n  a:\n    image: x\n    ports: [\"6005-6015:80\", \"127.0.0.1:7000-7001:53/udp\"]\n")
        .unwrap();
    let p = &c.deployments[0].ports;
    assert_eq!(p[0], skiff_model::PortMapping::parse("6005:80").unwrap());
    assert_eq!(p[1], skiff_model::PortMapping::parse("127.0.0.1:7000:53/udp").unwrap());
    assert!(
        c.warnings.iter().any(|w| w.contains("ports[0]: host ports 6005-6015: the first, 6005")),
        "{:?}",
        c.warnings
    );
    for bad in ["6015-6005:80", "0-5:80", "a-b:80", "6005-:80"] {
        assert!(
            err(&format!("services:\n  a:\n    image: x\n    ports: [\"{bad}\"]\n")).contains("is not a port mapping"),
            "{bad}"
        );
    }
}

/// `expose`: ports its peers reach through the fleet's services, TCP or UDP, ranges
/// spelled out, each port and protocol once; a protocol that is neither is an error.
#[test]
fn exposed_ports_are_tcp_or_udp_service_ports() {
    use skiff_model::mesh::ServicePort;
    let c = import("services:\n  dns:\n    image: x\n    expose: [53, \"53/udp\", \"5000-5001/udp\", \"53/tcp\"]\n")
        .unwrap();
    assert_eq!(
        c.deployments[0].expose,
        [
            ServicePort::tcp(53, 53),
            ServicePort::udp(53, 53),
            ServicePort::udp(5000, 5000),
            ServicePort::udp(5001, 5001)
        ]
    );
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);
    let e = err("services:\n  dns:\n    image: x\n    expose: [\"53/sctp\"]\n");
    assert!(e.starts_with("services.dns.expose[0]: \"sctp\" is not a protocol"), "{e}");
}

/// Compose's merge tags in `extends`: `!reset` drops what the base set, `!override`
/// replaces a list rather than merging it; left over where nothing is merged, a `!reset`
/// is no value and an `!override` its own.
#[test]
fn reset_and_override_tags_change_what_extends_merges() {
    let c = import(
        "services:\n  init:\n    image: alpine\n    command: sleep infinity\n    ports: [\"80:80\"]\n    environment: {A: a}\n  \
         base:\n    extends: {service: init}\n    command: !reset\n    ports: !override [\"81:81\"]\n  \
         alone:\n    image: alpine\n    command: !reset\n    environment: !override {B: b}\n",
    )
    .unwrap();
    let get = |n: &str| c.deployments.iter().find(|d| d.name == n).unwrap();
    let base = get("base");
    assert_eq!(base.command, None, "reset to the image's");
    assert_eq!(base.ports, [skiff_model::PortMapping::parse("81:81").unwrap()], "replaced, not merged");
    assert_eq!(base.env.get("A").map(String::as_str), Some("a"));
    let alone = get("alone");
    assert_eq!((alone.command.clone(), alone.env.get("B").map(String::as_str)), (None, Some("b")));
}

/// A Git URL as the context, as Docker takes one: `URL#REF:DIR`; the forms Git cannot
/// fetch, an option for a reference and a way out of the checkout are refused.
#[test]
fn a_git_repository_is_a_build_context() {
    let build = |c: &str| {
        let i = import(&format!("services:\n  app:\n    build: {c}\n"))?;
        Ok::<_, ManifestError>(i.builds[0].remote.clone())
    };
    let g = build("https://github.com/docker/compose.git").unwrap().unwrap();
    assert_eq!((g.url.as_str(), g.reference, g.dir), ("https://github.com/docker/compose.git", None, None));
    let g = build("github.com/acme/app#v1.2:src/web/").unwrap().unwrap();
    assert_eq!(g.url, "https://github.com/acme/app");
    assert_eq!((g.reference.as_deref(), g.dir.as_deref()), (Some("v1.2"), Some("src/web")));
    let g = build("'git@host:acme/app.git#:svc'").unwrap().unwrap();
    assert_eq!((g.url.as_str(), g.reference, g.dir.as_deref()), ("git@host:acme/app.git", None, Some("svc")));
    assert_eq!(build("./app").unwrap(), None);
    let refused = |c: &str| build(c).unwrap_err().to_string();
    assert_eq!(
        refused("ftp://host/ctx.tar"),
        "services.app.build: \"ftp://host/ctx.tar\": a remote build context is a Git URL (https, ssh or git)"
    );
    assert!(refused("'git://h/r.git#--upload-pack=x'").contains("\"--upload-pack=x\" is not a branch, tag or commit"));
    assert!(refused("git://h/r.git#main:../up").contains("relative to the repository, without .."));
}
