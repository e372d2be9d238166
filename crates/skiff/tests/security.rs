//! The fleet attacked as a thief, an insider or the network would attack it, with real
//! processes and real certificates: a device pulled off the wall whose key and
//! certificate now speak for the attacker, a join token that leaked, a log reader that
//! stalls, a flood of connections. Each test fails on the behaviour issue 13 reported.

#![allow(clippy::unwrap_used)] // tests may panic on setup failures

mod common;

use common::fleet::{agent, hub, hub_instances, hub_with, start_agent, wait_placed, wait_ready};
use common::{wait_for, Node, IMAGE};
use futures_util::{SinkExt, StreamExt};
use std::sync::Arc;
use std::time::Duration;

type R = anyhow::Result<()>;
const SEC: Duration = Duration::from_secs(1);

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

fn read(p: std::path::PathBuf) -> String {
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// An HTTPS client holding a node's own key and certificate (what a thief of the device
/// has), trusting the hub's CA.
fn as_node(a: &Node) -> reqwest::Client {
    let pki = a.data().join("pki");
    let identity = format!("{}{}", read(pki.join("node.pem")), read(pki.join("node.key")));
    reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(read(pki.join("ca.pem")).as_bytes()).unwrap())
        .identity(reqwest::Identity::from_pem(identity.as_bytes()).unwrap())
        .build()
        .unwrap()
}

/// A client with a bearer token, trusting the hub's CA.
fn with_token(h: &Node) -> reqwest::Client {
    let conf: serde_json::Value = serde_json::from_slice(&std::fs::read(h.data().join("admin.conf")).unwrap()).unwrap();
    let ca = conf["ca"].as_str().unwrap();
    reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(ca.as_bytes()).unwrap())
        .build()
        .unwrap()
}

fn token(h: &Node, args: &[&str]) -> anyhow::Result<String> {
    let mut all = vec!["token", "create"];
    all.extend(args);
    Ok(h.ok(&all)?.trim().to_string())
}

/// Tokens expire, are used up, and never take over a name; replacement is something the
/// admin asks for, and it closes the old device's tunnel for good.
#[test]
fn join_tokens_expire_are_used_up_and_cannot_take_over_a_name() -> R {
    skiff_testkit::require_privileged!();
    let h = hub()?;
    let server = h.server()?;
    let once = token(&h, &["--uses", "1"])?;
    let ls = h.ok(&["token", "ls"])?;
    assert!(ls.contains("0/1") && ls.contains("join"), "{ls}");
    let a = agent(&h, &once, "pi-a", &[])?;
    wait_placed(&h, &[])?;
    wait_for(30 * SEC, "pi-a Ready", || h.ok(&["get", "nodes"]).ok().filter(|t| t.contains("Ready")))?;

    // A single-use token joins one node.
    let mut b = Node::new()?;
    start_agent(&mut b, &server, Some(&once), Some("pi-b"), &[])?;
    assert!(!b.wait_exit(30 * SEC)?.success());
    assert!(b.log().contains("has been used 1 time(s), all it may be"), "{}", b.log());

    // A leaked reusable token cannot take over pi-a.
    let leaked = token(&h, &[])?;
    let mut thief = Node::new()?;
    start_agent(&mut thief, &server, Some(&leaked), Some("pi-a"), &[])?;
    assert!(!thief.wait_exit(30 * SEC)?.success());
    assert!(thief.log().contains("skiff token create --replace pi-a"), "{}", thief.log());
    let nodes = h.ok(&["get", "nodes"])?;
    assert!(nodes.lines().any(|l| l.starts_with("pi-a") && l.contains("Ready")), "{nodes}");

    // The admin replaces pi-a (a re-imaged device): the old one is cut off for good.
    let replace = token(&h, &["--replace", "pi-a"])?;
    let mut newer = Node::new()?;
    start_agent(&mut newer, &server, Some(&replace), Some("pi-a"), &[])?;
    wait_for(30 * SEC, "the replacement to join", || newer.data().join("pki/joined.json").exists().then_some(()))?;
    wait_for(30 * SEC, "the old device refused", || a.log().contains("403 Forbidden").then_some(()))?;
    let (code, body) = rt().block_on(async {
        let r = as_node(&a).get(format!("{server}/api/v1/nodes/pi-a/assignments")).send().await?;
        anyhow::Ok((r.status().as_u16(), r.text().await?))
    })?;
    assert_eq!(code, 403);
    assert!(body.contains("revoked"), "{body}");
    assert!(h.events()?.iter().any(|e| e.reason == "NodeReplaced" && e.object == "pi-a"));

    // A token on the command line still works, with a warning.
    let mut c = Node::new()?;
    let t = token(&h, &[])?;
    let bridge = c.bridge.clone();
    let subnet = c.subnet.clone();
    c.spawn(&["agent", "--hub", &server, "--token", &t, "--name", "pi-c", "--bridge", &bridge, "--subnet", &subnet])?;
    wait_for(30 * SEC, "pi-c to join", || c.data().join("pki/joined.json").exists().then_some(()))?;
    assert!(c.log().contains("warning: --token puts the join token on the command line"), "{}", c.log());
    Ok(())
}

/// `reqwest` futures in a blocking test.
trait AwaitBlocking {
    type Out;
    fn await_blocking(self) -> Self::Out;
}

impl<F: std::future::Future> AwaitBlocking for F {
    type Out = F::Output;
    fn await_blocking(self) -> F::Output {
        rt().block_on(self)
    }
}

/// A thief holding node a's key and certificate: it cannot read b's assignments, make the
/// hub believe it runs b's instance (and so draw b's exec to itself), inflate its
/// samples past its CPUs, or churn the fleet's revision with its hello.
#[test]
fn a_stolen_node_reaches_nothing_beyond_its_own_slots() -> R {
    skiff_testkit::require_privileged!();
    let h = hub()?;
    let server = h.server()?;
    let t = token(&h, &[])?;
    let a = agent(&h, &t, "node-a", &[])?;
    let _b = agent(&h, &t, "node-b", &[])?;
    // Both Ready before the run: a node still starting up would leave both replicas to
    // the other one (a join is done before the agent's first hello).
    wait_ready(&h, "node-a")?;
    wait_ready(&h, "node-b")?;
    h.ok(&["run", IMAGE, "--name", "web", "--replicas", "2", "--", "sleep", "100000"])?;
    let placed = wait_for(60 * SEC, "web on both nodes", || {
        let all = hub_instances(&h);
        let nodes: std::collections::BTreeSet<_> =
            all.iter().filter(|i| i.pid.is_some()).map(|i| i.node.clone()).collect();
        (nodes.len() == 2).then_some(all)
    })?;
    let on_b = placed.iter().find(|i| i.node == "node-b").unwrap().clone();
    let on_a = placed.iter().find(|i| i.node == "node-a").unwrap().clone();
    let stolen = as_node(&a);
    let rt = rt();

    // b's assignments are not a's to read.
    let r = rt.block_on(stolen.get(format!("{server}/api/v1/nodes/node-b/assignments")).send())?;
    assert_eq!(r.status(), 403);

    // A secret reaches only the node whose workload uses it: a's assignment holds a's
    // secret, never b's.
    let secrets = |node: &str, value: &str| {
        format!(
            "apiVersion: v1\nkind: Secret\nmetadata: {{name: s-{node}}}\nstringData: {{k: {value}}}\n---\n\
             apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: sec-{node}}}\nspec:\n  template:\n    spec:\n\
             \x20     nodeSelector: {{kubernetes.io/hostname: node-{node}}}\n\
             \x20     containers: [{{name: c, image: \"{IMAGE}\", command: [sleep, \"100000\"],\n\
             \x20       env: [{{name: K, valueFrom: {{secretKeyRef: {{name: s-{node}, key: k}}}}}}]}}]\n"
        )
    };
    let file =
        h.write("secrets.yaml", &format!("{}---\n{}", secrets("a", "for-node-a"), secrets("b", "only-for-node-b")))?;
    h.ok(&["apply", "-f", &file.to_string_lossy()])?;
    let assigned = || -> Option<String> {
        let r = rt.block_on(stolen.get(format!("{server}/api/v1/nodes/node-a/assignments")).send()).ok()?;
        rt.block_on(r.text()).ok()
    };
    wait_for(60 * SEC, "a's secret in a's assignment", || assigned()?.contains("for-node-a").then_some(()))?;
    wait_for(60 * SEC, "sec-b placed on node-b", || {
        hub_instances(&h).iter().any(|i| i.name == "sec-b-1" && i.node == "node-b").then_some(())
    })?;
    let mine = assigned().unwrap_or_default();
    assert!(mine.contains("for-node-a"), "{mine}");
    assert!(!mine.contains("only-for-node-b") && !mine.contains("sec-b"), "b's secret reached a: {mine}");
    h.ok(&["delete", "deployment", "sec-a"])?;
    h.ok(&["delete", "deployment", "sec-b"])?;

    // Its certificate is no API credential: it cannot attach an autoscaler to a
    // deployment (which would rescale it onto other nodes), and `web` is unchanged.
    let hpa = serde_json::json!({"deployments": [], "autoscalers": [{"target": "web", "spec": {
        "minReplicas": 1, "maxReplicas": 20,
        "metrics": [{"resource": "cpu", "targetType": "AverageValue", "averageValue": "1m"}]}}]});
    let r = rt.block_on(stolen.post(format!("{server}/api/v1/apply")).json(&hpa).send())?;
    assert_eq!(r.status(), 401);
    let web = h.ok(&["describe", "deployment", "web"])?;
    assert!(web.contains("replicas: 2") && !web.contains("maxReplicas"), "no autoscaler was attached: {web}");

    // a claims b's instance as its own.
    let mut forged = on_b.clone();
    forged.node = "node-a".into();
    let mut own = on_a.clone();
    own.restarts = 0;
    let status = serde_json::json!({"instances": [own, forged]});
    let r = rt.block_on(stolen.put(format!("{server}/api/v1/nodes/node-a/status")).json(&status).send())?;
    assert!(r.status().is_success(), "{}", r.status());
    let all = hub_instances(&h);
    assert!(all.iter().filter(|i| i.name == on_b.name).all(|i| i.node == "node-b"), "{all:?}");
    // The admin's exec of b's instance still goes to b.
    let out = h.ok(&["exec", &on_b.name, "--", "cat", "/etc/hostname"])?;
    assert_eq!(out.trim(), on_b.name);
    assert!(h.events()?.iter().any(|e| e.reason == "ReportRefused" && e.object == "node-a"), "{:?}", h.events()?);

    // On its tunnel: the newest sample, claiming b's instance and a thousand CPUs, then a
    // flood of hellos.
    let pki = a.data().join("pki");
    let tls = skiff_agent::tls::client_config(
        &read(pki.join("ca.pem")),
        &read(pki.join("node.pem")),
        &read(pki.join("node.key")),
    )
    .map_err(anyhow::Error::msg)?;
    let url = format!("{}/api/v1/nodes/node-a/tunnel", server.replacen("https://", "wss://", 1));
    let tls = Arc::new(tls);
    let connect = || {
        let connector = tokio_tungstenite::Connector::Rustls(Arc::clone(&tls));
        tokio_tungstenite::connect_async_tls_with_config(url.clone(), None, false, Some(connector))
    };
    // Whether the hub closes the tunnel within 20 s.
    async fn closed_by_hub<S>(ws: &mut tokio_tungstenite::WebSocketStream<S>) -> bool
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let end = tokio::time::timeout(Duration::from_secs(20), async {
            while let Some(m) = ws.next().await {
                if m.is_err() || matches!(m, Ok(tokio_tungstenite::tungstenite::Message::Close(_))) {
                    break;
                }
            }
        })
        .await;
        end.is_ok()
    }
    let future = skiff_runtime::time::now_ms() + 3_600_000;
    let closed = rt.block_on(async {
        let (mut ws, answer) = connect().await?;
        let header = answer.headers().get(skiff_model::proto::TUNNEL_FEATURES).and_then(|v| v.to_str().ok());
        assert!(skiff_model::proto::tunnel_reads(header, skiff_model::proto::FEATURE_DEFLATE), "{header:?}");
        let mut sample = skiff_model::metrics::MetricsSample::example("node-b", future);
        sample.instances[0].instance = on_a.name.clone();
        sample.instances[0].deployment = "web".into();
        sample.instances[0].cpu_cores = Some(1000.0);
        sample.instances[1].instance = on_b.name.clone();
        sample.instances[1].deployment = "web".into();
        let packed: skiff_model::metrics::PackedSample = (&sample).into();
        // Deflated, as agents send frames to a hub that reads them.
        let frame = serde_json::json!({"type": "metrics", "samples": [packed], "through": 1}).to_string();
        let frame = skiff_model::proto::deflate_frame(&frame).expect("a sample deflates");
        ws.send(tokio_tungstenite::tungstenite::Message::Binary(frame.into())).await?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        for i in 0..1000 {
            let runtimes = if i % 2 == 0 { vec!["oci"] } else { vec!["oci", "wasm"] };
            let hello = serde_json::json!({"type": "hello", "revision": 0, "runtimes": runtimes}).to_string();
            if ws.send(tokio_tungstenite::tungstenite::Message::Text(hello.into())).await.is_err() {
                return anyhow::Ok(true);
            }
        }
        // The hub closes a tunnel that floods.
        anyhow::Ok(closed_by_hub(&mut ws).await)
    })?;
    assert!(closed, "the flooding tunnel was closed");
    assert!(h.events()?.iter().any(|e| e.reason == "FrameFlood" && e.object == "node-a"));
    // A frame past the hub's bounds ends the tunnel too: 65 samples in one delta frame
    // (64 at most), and a sample of more than 1,024 instances.
    for frame in [
        serde_json::json!({"type": "metricsdelta", "samples": vec![serde_json::json!([1, [], []]); 65], "through": 1}),
        {
            let mut sample = skiff_model::metrics::MetricsSample::example("node-a", future);
            let one = sample.instances[0].clone();
            sample.instances = vec![one; 1025];
            let packed: skiff_model::metrics::PackedSample = (&sample).into();
            serde_json::json!({"type": "metrics", "samples": [packed], "through": 1})
        },
    ] {
        let closed = rt.block_on(async {
            let (mut ws, _) = connect().await?;
            let hello = serde_json::json!({"type": "hello", "revision": 0}).to_string();
            ws.send(tokio_tungstenite::tungstenite::Message::Text(hello.into())).await?;
            ws.send(tokio_tungstenite::tungstenite::Message::Text(frame.to_string().into())).await?;
            anyhow::Ok(closed_by_hub(&mut ws).await)
        })?;
        assert!(closed, "a tunnel sending {} was closed", frame["type"]);
    }
    // And a deflated frame that is not DEFLATE, or inflates past the hub's bound.
    let bomb = {
        use std::io::Write;
        let mut z = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
        z.write_all(" ".repeat(2 << 20).as_bytes())?;
        z.finish()?
    };
    for frame in [b"not deflate at all".to_vec(), bomb] {
        let closed = rt.block_on(async {
            let (mut ws, _) = connect().await?;
            let hello = serde_json::json!({"type": "hello", "revision": 0}).to_string();
            ws.send(tokio_tungstenite::tungstenite::Message::Text(hello.into())).await?;
            ws.send(tokio_tungstenite::tungstenite::Message::Binary(frame.into())).await?;
            anyhow::Ok(closed_by_hub(&mut ws).await)
        })?;
        assert!(closed, "a tunnel sending a bad deflated frame was closed");
    }
    let samples: Vec<skiff_model::metrics::MetricsSample> = rt.block_on(async {
        let conf: serde_json::Value = serde_json::from_slice(&std::fs::read(h.data().join("admin.conf"))?)?;
        let admin = conf["token"].as_str().unwrap_or_default().to_string();
        let r = with_token(&h).get(format!("{server}/api/v1/metrics")).bearer_auth(admin).send().await?;
        anyhow::Ok(r.json().await?)
    })?;
    let a_sample = samples.iter().find(|s| s.node == "node-a").expect("node a's newest sample");
    assert_eq!(a_sample.time_ms, future, "the forged sample is the newest: {a_sample:?}");
    assert!(a_sample.instances.iter().all(|i| i.instance != on_b.name), "b's instance dropped: {a_sample:?}");
    let cores = std::thread::available_parallelism()?.get() as f64;
    let claimed = a_sample.instances.iter().filter_map(|i| i.cpu_cores).fold(0.0, f64::max);
    assert!(claimed <= cores, "capped at the node's {cores} CPUs: {claimed}");
    Ok(())
}

/// Certificates expire: a connected node renews its own over the tunnel (no restart, no
/// token, nothing restarted), its old one is refused from then on; a node away until its
/// certificate expired needs a new token, while its workloads keep running.
#[test]
fn node_certificates_renew_over_the_tunnel_and_an_expired_node_needs_a_new_token() -> R {
    skiff_testkit::require_privileged!();
    let h = hub_with("127.0.0.1", &["--node-cert-ttl", "30s"])?;
    let server = h.server()?;
    let t = token(&h, &[])?;
    let mut a = agent(&h, &t, "edge-1", &[])?;
    h.ok(&["run", IMAGE, "--name", "keep", "--", "sleep", "100000"])?;
    let before = wait_placed(&h, &[("edge-1", "keep-1")])?[0].pid;
    let pem = a.data().join("pki/node.pem");
    let first = read(pem.clone());
    let old_client = as_node(&a);
    // Renewed with a third of 37.5 s left: about 25 s after the join.
    wait_for(60 * SEC, "the certificate renewed", || (read(pem.clone()) != first).then_some(()))?;
    wait_for(30 * SEC, "the hub seeing the new certificate", || {
        let r = old_client.get(format!("{server}/api/v1/nodes/edge-1/assignments")).send().await_blocking().ok()?;
        (r.status() == 403).then_some(())
    })?;
    let after = wait_placed(&h, &[("edge-1", "keep-1")])?[0].pid;
    assert_eq!(after, before, "nothing restarted");
    assert!(a.log().contains("certificate renewed"), "{}", a.log());

    // Away until the certificate expires: its workloads run on; back, it needs a token.
    a.kill_up()?;
    let not_after = skiff_agent::join::validity(&read(pem.clone()))?.1;
    wait_for(60 * SEC, "the certificate to expire", || {
        (skiff_runtime::time::now_ms() > not_after + 1000).then_some(())
    })?;
    let (bridge, subnet) = (a.bridge.clone(), a.subnet.clone());
    a.spawn(&["agent", "--hub", &server, "--bridge", &bridge, "--subnet", &subnet])?;
    assert!(!a.wait_exit(30 * SEC)?.success());
    assert!(a.log().contains("skiff token create --replace edge-1"), "{}", a.log());
    let pid = before.unwrap();
    assert!(std::path::Path::new(&format!("/proc/{pid}")).exists(), "the workload ran on meanwhile");
    let replace = token(&h, &["--replace", "edge-1"])?;
    start_agent(&mut a, &server, Some(&replace), None, &[])?;
    let back = wait_placed(&h, &[("edge-1", "keep-1")])?[0].pid;
    assert_eq!(back, before, "adopted, not restarted");
    Ok(())
}

/// API tokens carry a role: a metrics token scrapes and reads nothing else, a read token
/// reads and changes nothing, a revoked one is nothing.
#[test]
fn api_tokens_open_only_their_routes() -> R {
    skiff_testkit::require_privileged!();
    let h = hub()?;
    let server = h.server()?;
    let metrics = token(&h, &["--role", "metrics"])?;
    let read_only = token(&h, &["--role", "read"])?;
    assert!(metrics.starts_with("SKA1.") && read_only.starts_with("SKA1."));
    let c = with_token(&h);
    let status = |tok: &str, method: &str, path: &str| -> u16 {
        let url = format!("{server}{path}");
        let req = match method {
            "GET" => c.get(url),
            _ => c.post(url).json(&serde_json::json!({"deployments": []})),
        };
        req.bearer_auth(tok).send().await_blocking().map(|r| r.status().as_u16()).unwrap_or(0)
    };
    assert_eq!(status(&metrics, "GET", "/metrics"), 200);
    assert_eq!(status(&metrics, "GET", "/api/v1/metrics"), 200);
    assert_eq!(status(&metrics, "GET", "/api/v1/deployments"), 403);
    assert_eq!(status(&read_only, "GET", "/api/v1/deployments"), 200);
    assert_eq!(status(&read_only, "GET", "/api/v1/tokens"), 403);
    assert_eq!(status(&read_only, "POST", "/api/v1/apply"), 403);
    let id = read_only.split('.').nth(1).unwrap();
    h.ok(&["token", "revoke", id])?;
    assert_eq!(status(&read_only, "GET", "/api/v1/deployments"), 401);
    Ok(())
}

/// A `logs -f` reader that stops reading, and an exec with 3 MB of output: neither
/// breaks the node's tunnel, and assignments keep arriving.
#[test]
fn a_stalled_log_reader_and_a_large_exec_output_do_not_break_the_tunnel() -> R {
    skiff_testkit::require_privileged!();
    let h = hub()?;
    let server = h.server()?;
    let t = token(&h, &[])?;
    let _a = agent(&h, &t, "edge-1", &[])?;
    h.ok(&["run", IMAGE, "--name", "chatty", "--", "sh", "-c", "i=0; while true; do echo line $i; i=$((i+1)); done"])?;
    wait_placed(&h, &[("edge-1", "chatty-1")])?;
    let conf: serde_json::Value = serde_json::from_slice(&std::fs::read(h.data().join("admin.conf"))?)?;
    let admin = conf["token"].as_str().unwrap().to_string();
    let rt = rt();
    // Opened, then never read.
    let stalled = rt.block_on(
        with_token(&h).get(format!("{server}/api/v1/instances/chatty-1/logs?follow=true")).bearer_auth(&admin).send(),
    )?;
    assert!(stalled.status().is_success());
    std::thread::sleep(5 * SEC);
    let out = h.cli(&["exec", "chatty-1", "--", "sh", "-c", "yes xxxxxxxxxxxxxxx | head -c 3000000"])?;
    assert!(out.status.success(), "{:?} {}", out.status, String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.stdout.len(), 3_000_000);
    assert!(out.stdout.chunks(16).all(|c| c.iter().take(15).all(|b| *b == b'x')), "intact");
    h.ok(&["run", IMAGE, "--name", "later", "--", "sleep", "100000"])?;
    wait_placed(&h, &[("edge-1", "chatty-1"), ("edge-1", "later-1")])?;
    drop(stalled);
    Ok(())
}

/// A thousand idle connections from one address: the hub closes what is over that
/// address's share, and the admin (another address) is served.
#[test]
fn a_connection_flood_does_not_lock_the_admin_out() -> R {
    skiff_testkit::require_privileged!();
    let h = hub_with("127.0.0.1", &["--max-connections-per-ip", "100"])?;
    let server = h.server()?;
    let addr: std::net::SocketAddr = server.trim_start_matches("https://").parse()?;
    let mut flood = vec![];
    for _ in 0..1000 {
        flood.push(connect_from(addr, [127, 0, 0, 2])?);
    }
    let out = h.cli(&["get", "nodes"])?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // Most of the flood was closed at once.
    let mut closed = 0;
    for s in &mut flood {
        use std::io::Read;
        s.set_read_timeout(Some(Duration::from_millis(20)))?;
        let mut b = [0u8; 1];
        if matches!(s.read(&mut b), Ok(0)) {
            closed += 1;
        }
    }
    assert!(closed >= 850, "{closed} of 1000 closed");
    Ok(())
}

/// A (blocking) TCP connection to `to` from the loopback address `from`.
fn connect_from(to: std::net::SocketAddr, from: [u8; 4]) -> anyhow::Result<std::net::TcpStream> {
    let s = rt().block_on(async {
        let sock = tokio::net::TcpSocket::new_v4()?;
        sock.bind(std::net::SocketAddr::from((from, 0)))?;
        sock.connect(to).await
    })?;
    let s = s.into_std()?;
    s.set_nonblocking(false)?;
    Ok(s)
}
