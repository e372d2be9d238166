//! The node's one outbound connection to its hub (`skiff agent`): a WebSocket over mutual
//! TLS that the agent dials and keeps open, so a node behind NAT needs no inbound port.
//! Assignments come in and are persisted before they are acted on; status, events and
//! resource samples go out when they change (and wait in `agent.db` until acknowledged);
//! logs and exec requests are served on the same connection. The frames are
//! [`skiff_model::proto`]'s: the agent's own go deflated to a hub that says it reads them.
//!
//! While the hub is unreachable the agent keeps running from `agent.db`, and dials again
//! with jittered back-off.
//!
//! The node's certificate is renewed on this connection when a third of its life is left
//! (or the hub asks): a new key, a CSR, the hub's `renewed` certificate stored in place,
//! then a new connection with it. No restart and no token are needed; a node that was
//! away until its certificate expired needs a new token ([`crate::join`]).

use crate::join::Identity;
use crate::Agent;
use futures_util::{SinkExt, StreamExt};
use skiff_model::metrics::{PackedSample, Shipment, Shipper};
use skiff_model::proto::{
    Answer, Control, NodeStatus, Op, Reply, Request, SessionInput, SessionOutput, CHUNK_BYTES, INPUT_WINDOW,
    PING_EVERY, STREAM_WINDOW,
};
use skiff_model::Protocol;
use std::sync::Arc;
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;

/// 1 s doubling to 15 s, with up to 50 % jitter: a healed link is noticed within
/// seconds, and a restarted hub is not met by every node at once.
pub fn backoff(failures: u32) -> Duration {
    let base = (1000u64 << failures.min(4)).min(15_000);
    let jitter = skiff_sys::random::bytes::<1>().map(|b| u64::from(b[0] % 128)).unwrap_or(64) * base / 256;
    Duration::from_millis(base + jitter)
}

/// Buffered samples sent in one frame (after a partition, the backlog goes out in these).
const METRICS_PER_FRAME: usize = 20;

/// The hub pings every 20 s; this long without any frame means the link is gone.
const SILENCE: Duration = Duration::from_secs(45);

/// Keeps the one connection to the hub open (reconnecting with jittered back-off) and
/// runs the protocol on it, until the task is dropped.
/// With several hubs (any hub of a store serves), a failed connection tries the
/// next one at once; the back-off applies once every hub has failed. The hubs are those
/// given (`hubs`), then those the hubs named (`Identity::learned_hubs`, read again before
/// each connection). `connected` is set to the hub a connection is made to (where the
/// node's image pulls go).
pub async fn run(
    agent: Arc<Agent>,
    hubs: Vec<String>,
    node: String,
    id: Arc<Identity>,
    every: Duration,
    connected: Arc<std::sync::RwLock<String>>,
) {
    let mut failures = 0u32;
    let mut at = 0usize;
    // Hubs that said they were cut off from their store, and when: not moved to again for
    // a while (with the store down for every hub, a node would go back and forth).
    let mut cut_off_hubs: std::collections::HashMap<String, tokio::time::Instant> = Default::default();
    loop {
        let bases = candidates(&hubs, &id.learned_hubs());
        if bases.is_empty() {
            tracing::error!("no hub to connect to");
            return;
        }
        let base = &bases[at % bases.len()];
        let url = &format!("{base}/api/v1/nodes/{node}/tunnel").replacen("https://", "wss://", 1);
        // Read at each connection: a renewal replaces the certificate.
        let tls = match id.tls() {
            Ok(t) => Arc::new(t),
            Err(e) => {
                failures += 1;
                tracing::error!("the node's identity: {e}");
                tokio::time::sleep(backoff(failures)).await;
                continue;
            }
        };
        if id.not_after_ms().is_ok_and(|t| t <= skiff_runtime::time::now_ms()) {
            // Workloads keep running; only a new token brings the node back to its hub.
            failures += 1;
            tracing::error!(
                "the certificate of node {node} has expired: the hub will not take it. On the hub, make a token \
                 to join it again (skiff token create --replace {node}), then restart the agent with --token-file"
            );
            tokio::time::sleep(backoff(failures).max(Duration::from_secs(60))).await;
            continue;
        }
        let connector = tokio_tungstenite::Connector::Rustls(tls);
        let dial = tokio_tungstenite::connect_async_tls_with_config(url.as_str(), None, true, Some(connector));
        // Bounded: a SYN into a dead link would otherwise wait out the kernel's retries.
        match tokio::time::timeout(Duration::from_secs(10), dial).await {
            Ok(Ok((ws, answer))) => {
                failures = 0;
                let header = answer.headers().get(skiff_model::proto::TUNNEL_FEATURES).and_then(|v| v.to_str().ok());
                let deflate = skiff_model::proto::tunnel_reads(header, skiff_model::proto::FEATURE_DEFLATE);
                if let Ok(mut c) = connected.write() {
                    c.clone_from(base);
                }
                tracing::info!(hub = %url, "connected to the hub");
                cut_off_hubs.retain(|_, at| at.elapsed() < CUT_OFF_MEMORY);
                let others: Vec<String> =
                    bases.iter().filter(|b| *b != base && !cut_off_hubs.contains_key(*b)).cloned().collect();
                let (to, cut) = serve(&agent, &id, ws, every, others, deflate).await;
                if cut {
                    cut_off_hubs.insert(base.clone(), tokio::time::Instant::now());
                }
                if let Some(to) = to {
                    // The hub was cut off from its store and another answers, not known
                    // to be cut off too. Dialled at once.
                    tracing::warn!(hub = %url, to = %to, "leaving a hub cut off from its store for one that answers");
                    at = bases.iter().position(|b| *b == to).unwrap_or(at + 1);
                    continue;
                }
                tracing::warn!(hub = %url, "lost the hub; running from local state");
            }
            Ok(Err(e)) => {
                failures += 1;
                at += 1;
                tracing::warn!(hub = %url, "cannot connect to the hub: {e}");
            }
            Err(_) => {
                failures += 1;
                at += 1;
                tracing::warn!(hub = %url, "cannot connect to the hub: connecting took more than 10 s");
            }
        }
        // The next hub at once (with a little jitter), until every one has failed.
        let wait = if failures > 0 && !at.is_multiple_of(bases.len()) {
            backoff(0) / 4
        } else {
            backoff(failures / bases.len() as u32)
        };
        tokio::time::sleep(wait).await;
    }
}

/// The hubs to try, in order: those given, then those learned, once each.
fn candidates(given: &[String], learned: &[String]) -> Vec<String> {
    let mut out: Vec<String> = vec![];
    for h in given.iter().chain(learned) {
        let h = h.trim_end_matches('/').to_string();
        if !out.contains(&h) {
            out.push(h);
        }
    }
    out
}

fn frame(c: &Control) -> String {
    serde_json::to_string(c).unwrap_or_default()
}

/// `c` as it goes to the hub: deflated when the hub reads that (`deflate`) and it is
/// shorter, else text. (The hub simulators of `xtask` send theirs so too.)
pub fn message(c: &Control, deflate: bool) -> Message {
    let text = frame(c);
    match deflate.then(|| skiff_model::proto::deflate_frame(&text)).flatten() {
        Some(z) => Message::Binary(z.into()),
        None => Message::Text(text.into()),
    }
}

/// Whether a certificate valid from `not_before` to `not_after` (ms) should be renewed at
/// `now`: when a third of its life is left.
pub fn due_for_renewal((not_before, not_after): (u64, u64), now: u64) -> bool {
    not_after.saturating_sub(now) < not_after.saturating_sub(not_before) / 3
}

/// Runs the protocol on one connection until it ends (or a renewed certificate wants a
/// new one).
/// Returns another hub to move to, when this one said it is cut off from its store and
/// that one answers (`others`: the other hubs known), and whether it said so.
async fn serve<S>(
    agent: &Arc<Agent>,
    id: &Identity,
    mut ws: tokio_tungstenite::WebSocketStream<S>,
    every: Duration,
    others: Vec<String>,
    deflate: bool,
) -> (Option<String>, bool)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let hello = Control::Hello {
        revision: agent.hello_revision(),
        runtimes: Some(crate::runtimes()),
        versions: Some(agent.versions().clone()),
        devices: Some(agent.device_counts()),
        features: Some(vec![skiff_model::proto::FEATURE_MESH_UDP.to_string()]),
        digest: agent.hello_digest(),
    };
    if ws.send(message(&hello, deflate)).await.is_err() {
        return (None, false);
    }
    // Frames go out through a writer task that owns the socket's sending half: this loop
    // never waits on a send while the hub may be waiting on it to read (a session's input
    // against its output). Replies to requests come in on `tx`, the loop's own frames on
    // `out`.
    let (tx, rx) = tokio::sync::mpsc::channel::<String>(256);
    let (sink, mut ws) = ws.split();
    let (out, own) = tokio::sync::mpsc::channel::<Message>(64);
    let writer = tokio::spawn(write_frames(sink, rx, own));
    // Requests being answered, with the credit of each one's stream.
    let mut running: std::collections::HashMap<u64, Running> = Default::default();
    let mut tick = tokio::time::interval(every.min(SILENCE / 4));
    // The instances last reported: status goes out only when it changed (or events wait).
    let mut reported: Option<String> = None;
    // Samples sent on this connection (acknowledged or not): each goes out once per link.
    let mut metrics_sent = 0u64;
    let mut shipper = Shipper::default();
    // A link that dies silently (no FIN, TCP retransmitting for minutes) is noticed by the
    // hub's pings stopping: the connection is dropped and made anew.
    let mut last_rx = tokio::time::Instant::now();
    debug_assert!(SILENCE > PING_EVERY * 2);
    // The key of a renewal asked for on this connection, until its certificate comes.
    let mut renewing: Option<(String, tokio::time::Instant)> = None;
    let mut renew_now = false;
    // Since the hub said it is cut off from its store: when the other hubs were last
    // looked at, and the one that answered.
    let mut cut_off: Option<tokio::time::Instant> = None;
    let mut moving_to: Option<String> = None;
    loop {
        tokio::select! {
            m = ws.next() => match m {
                Some(Ok(Message::Text(t))) => {
                    last_rx = tokio::time::Instant::now();
                    match serde_json::from_str::<Control>(t.as_str()) {
                        Ok(Control::Assign { assignment }) => {
                            let all: Vec<_> =
                                assignment.deployments.into_iter().map(|x| (std::sync::Arc::unwrap_or_clone(x.spec), Some(x.indexes))).collect();
                            if let Err(e) = agent.set_assignment(&all, assignment.revision, &assignment.metrics, assignment.digest.as_deref()) {
                                // Not stored, not acted on: drop the connection, so the
                                // hub (seeing the old revision in the next hello) sends it
                                // again, instead of believing it delivered.
                                tracing::error!("storing the assignment failed, reconnecting to get it again: {e}");
                                break;
                            }
                            skiff_sys::crash::point("agent.assignment.stored");
                        }
                        Ok(Control::Ack { events_through }) => {
                            if let Err(e) = agent.events_shipped(events_through) {
                                tracing::warn!("recording shipped events: {e}");
                            }
                        }
                        Ok(Control::MetricsAck { through }) => {
                            if let Err(e) = agent.metrics_shipped(through) {
                                tracing::warn!("recording shipped samples: {e}");
                            }
                        }
                        Ok(Control::RenewNow) => renew_now = true,
                        Ok(Control::CutOff) => {
                            tracing::warn!("the hub is cut off from its store; looking for another hub that answers");
                            let now = tokio::time::Instant::now();
                            cut_off = Some(now.checked_sub(CUT_OFF_PROBE).unwrap_or(now));
                        }
                        Ok(Control::Services { view }) => {
                            if let Err(e) = agent.set_mesh_view(view) {
                                tracing::warn!("{e}");
                            }
                        }
                        Ok(Control::Hubs { hubs }) => match id.learn_hubs(&hubs) {
                            Ok(true) => tracing::info!(hubs = %hubs.join(", "), "the fleet's hubs"),
                            Ok(false) => {}
                            Err(e) => tracing::warn!("keeping the fleet's hubs: {e}"),
                        },
                        Ok(Control::Renewed { cert }) => {
                            let Some((key, _)) = renewing.take() else { continue };
                            match id.install_renewal(&key, &cert) {
                                Ok(()) => {
                                    tracing::info!("certificate renewed; reconnecting with it");
                                    break;
                                }
                                Err(e) => tracing::error!("storing the renewed certificate: {e}"),
                            }
                        }
                        Ok(_) => {}
                        Err(_) => {
                            let Ok(req) = serde_json::from_str::<Request>(t.as_str()) else {
                                // A newer hub's request: answered, not left to time out.
                                let Some(id) = unknown_request_id(t.as_str()) else {
                                    // A control frame this agent cannot read (a newer hub's):
                                    // said, not silently left.
                                    let kind = control_kind(t.as_str());
                                    tracing::warn!(%kind, "a frame from the hub this agent cannot read: upgrade it");
                                    continue;
                                };
                                {
                                    let answer = Answer::Error(format!(
                                        "this node's agent (skiff {}) does not know this request: upgrade it",
                                        env!("CARGO_PKG_VERSION")
                                    ));
                                    if let Ok(f) = serde_json::to_string(&Reply { id, answer }) {
                                        let _ = tx.try_send(f);
                                    }
                                }
                                continue;
                            };
                            match req.op {
                                Op::Cancel => {
                                    if let Some(r) = running.remove(&req.id) {
                                        r.task.abort();
                                    }
                                }
                                Op::Credit { frames } => {
                                    if let Some(r) = running.get(&req.id) {
                                        r.credit.add_permits((frames.min(STREAM_WINDOW)) as usize);
                                    }
                                }
                                Op::Input { data } => give(&mut running, req.id, SessionInput::Data(data)),
                                Op::Resize { cols, rows } => give(&mut running, req.id, SessionInput::Resize { cols, rows }),
                                Op::InputEnd => give(&mut running, req.id, SessionInput::End),
                                op => {
                                    let credit = Arc::new(tokio::sync::Semaphore::new(STREAM_WINDOW as usize));
                                    let out = Replies { id: req.id, tx: tx.clone(), credit: Arc::clone(&credit) };
                                    let (in_tx, in_rx) = tokio::sync::mpsc::channel(INPUT_WINDOW as usize);
                                    let a = Arc::clone(agent);
                                    let (input, task) = match op {
                                        Op::Session { instance, spec } => {
                                            let open = async move { a.exec_session(&instance, spec).await };
                                            (Some(in_tx), tokio::spawn(session(open, in_rx, out)))
                                        }
                                        Op::Connect { instance, port } => {
                                            let open = async move { a.connect_session(&instance, port, Protocol::Tcp).await };
                                            (Some(in_tx), tokio::spawn(session(open, in_rx, out)))
                                        }
                                        Op::Datagrams { instance, port } => {
                                            let open = async move { a.connect_session(&instance, port, Protocol::Udp).await };
                                            (Some(in_tx), tokio::spawn(session(open, in_rx, out)))
                                        }
                                        op => (None, tokio::spawn(answer(a, op, out))),
                                    };
                                    running.insert(req.id, Running { task, credit, input });
                                }
                            }
                        }
                    }
                }
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break,
                Some(Ok(Message::Ping(payload))) => {
                    last_rx = tokio::time::Instant::now();
                    // A ping's payload acknowledges samples (the id, as text).
                    let through = std::str::from_utf8(&payload).ok().and_then(|t| t.parse::<u64>().ok());
                    if let Some(through) = through.filter(|t| *t <= metrics_sent) {
                        if let Err(e) = agent.metrics_shipped(through) {
                            tracing::warn!("recording shipped samples: {e}");
                        }
                    }
                }
                Some(Ok(_)) => last_rx = tokio::time::Instant::now(),
            },
            _ = out.closed() => break,
            _ = tick.tick() => {
                if last_rx.elapsed() > SILENCE {
                    tracing::warn!("no word from the hub for {SILENCE:?}; reconnecting");
                    break;
                }
                if cut_off.is_some_and(|at| at.elapsed() >= CUT_OFF_PROBE) {
                    cut_off = Some(tokio::time::Instant::now());
                    moving_to = answering(&others).await;
                    if moving_to.is_some() {
                        break;
                    }
                }
                let due = renew_now || id.validity().is_ok_and(|v| due_for_renewal(v, skiff_runtime::time::now_ms()));
                // An answer that never came (the hub refused, or restarted): ask again later.
                if renewing.as_ref().is_some_and(|(_, at)| at.elapsed() > Duration::from_secs(300)) {
                    renewing = None;
                }
                if due && renewing.is_none() {
                    match crate::join::node_csr(agent.node_name()) {
                        Ok((key, csr)) => {
                            if !send_msg(&out, message(&Control::Renew { csr }, deflate)).await {
                                break;
                            }
                            tracing::info!("asked the hub to renew the node's certificate");
                            renewing = Some((key, tokio::time::Instant::now()));
                            renew_now = false;
                        }
                        Err(e) => tracing::warn!("making a key to renew the certificate: {e}"),
                    }
                }
                // Samples too wait in agent.db (bounded) until acknowledged. A backlog from a
                // partition goes out at once, so the hub soon has the current one.
                // Steady figures wait for a batch; the first on a connection goes whole,
                // the rest as deltas (see `metrics::Shipper`).
                let mut lost = false;
                while let Ok(samples) = agent.unshipped_metrics(metrics_sent, METRICS_PER_FRAME) {
                    let Some(&(through, _)) = samples.last() else { break };
                    let packed: Vec<PackedSample> = samples.iter().map(|(_, s)| PackedSample::from(s).sorted()).collect();
                    let Some(shipment) = shipper.ship(&packed) else { break };
                    let c = match shipment {
                        Shipment::Whole(samples) => Control::Metrics { samples, through },
                        Shipment::Deltas(samples) => Control::MetricsDelta { samples, through },
                    };
                    if !send_msg(&out, message(&c, deflate)).await {
                        lost = true;
                        break;
                    }
                    metrics_sent = through;
                }
                if lost {
                    break;
                }
                // Events wait in agent.db until the hub acknowledges them: a partition delays
                // them, and a restart of either side loses none.
                let events = agent.unshipped_events(500).unwrap_or_default();
                let instances = agent.instances().unwrap_or_default();
                let problems = agent.pressure();
                let now = serde_json::to_string(&(&instances, &problems)).unwrap_or_default();
                if reported.as_deref() == Some(now.as_str()) && events.is_empty() {
                    continue;
                }
                let status = NodeStatus {
                    instances,
                    events_through: events.last().map(|(id, _)| *id).unwrap_or(0),
                    events: events.into_iter().map(|(_, e)| e).collect(),
                    problems,
                    cache: agent.cfg.cache_url.clone(),
                    mesh: agent.cfg.mesh_advertise.clone(),
                };
                if !send_msg(&out, message(&Control::Status { status }, deflate)).await {
                    break;
                }
                reported = Some(now);
            }
        }
        running.retain(|_, r| !r.task.is_finished());
    }
    for r in running.values() {
        r.task.abort();
    }
    drop(out);
    writer.abort();
    (moving_to, cut_off.is_some())
}

/// How often the other hubs are looked at while this one is cut off from its store.
const CUT_OFF_PROBE: Duration = Duration::from_secs(5);

/// How long a hub that said it is cut off is not moved to again.
const CUT_OFF_MEMORY: Duration = Duration::from_secs(300);

/// The first of `hubs` (`https://HOST:PORT`) that takes a TCP connection within 2 s.
pub async fn answering(hubs: &[String]) -> Option<String> {
    let tries = hubs.iter().map(|h| async move {
        let addr = h.strip_prefix("https://")?.split('/').next()?.to_string();
        let ok = matches!(
            tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(addr)).await,
            Ok(Ok(_))
        );
        ok.then(|| h.clone())
    });
    futures_util::future::join_all(tries).await.into_iter().flatten().next()
}

/// How long one frame may wait for the writer before the connection is given up on.
const SEND_WAIT: Duration = Duration::from_secs(10);

/// Queues one frame for the hub; false when the connection is gone or stuck.
async fn send_msg(out: &tokio::sync::mpsc::Sender<Message>, m: Message) -> bool {
    matches!(tokio::time::timeout(SEND_WAIT, out.send(m)).await, Ok(Ok(())))
}

/// Writes the connection's frames: replies to the hub's requests and the loop's own,
/// until either side is gone.
async fn write_frames<S>(
    mut sink: futures_util::stream::SplitSink<tokio_tungstenite::WebSocketStream<S>, Message>,
    mut replies: tokio::sync::mpsc::Receiver<String>,
    mut own: tokio::sync::mpsc::Receiver<Message>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    loop {
        let m = tokio::select! {
            m = own.recv() => match m { Some(m) => m, None => break },
            f = replies.recv() => match f { Some(f) => Message::Text(f.into()), None => break },
        };
        if sink.send(m).await.is_err() {
            break;
        }
    }
    let _ = sink.close().await;
}

/// A request being answered: its task, its stream's credit and, for a session, where its
/// input goes.
struct Running {
    task: tokio::task::JoinHandle<()>,
    credit: Arc<tokio::sync::Semaphore>,
    input: Option<tokio::sync::mpsc::Sender<SessionInput>>,
}

/// Hands one input frame to its session without waiting: a hub that sends beyond the
/// session's window loses the session (as an agent beyond its stream's window does).
fn give(running: &mut std::collections::HashMap<u64, Running>, id: u64, input: SessionInput) {
    let Some(r) = running.get(&id) else { return };
    let Some(tx) = r.input.as_ref() else { return };
    if let Err(tokio::sync::mpsc::error::TrySendError::Full(_)) = tx.try_send(input) {
        tracing::warn!(request = id, "the hub sent a session more input than its window; session ended");
        if let Some(r) = running.remove(&id) {
            r.task.abort();
        }
    }
}

/// Serves one session (an interactive exec, or a port-forward connection) once `open`
/// made it: its output goes back as `data` answers (within the stream's credit), its
/// input comes as requests of the same id and is acknowledged (`took`) as it is passed
/// on; `took 0` first says it started. The end (an exit code) is the last answer. When
/// this task is aborted (the hub cancelled, the tunnel went), the session's channels
/// drop and its command or connection ends.
async fn session(
    open: impl std::future::Future<Output = Result<crate::session::Session, crate::AgentError>>,
    mut input: tokio::sync::mpsc::Receiver<SessionInput>,
    out: Replies,
) {
    let (to_cmd, mut from_cmd) = match open.await {
        Ok(s) => s,
        Err(e) => {
            out.send(Answer::Error(e.to_string())).await;
            return;
        }
    };
    if !out.send(Answer::Took { frames: 0 }).await {
        return;
    }
    let mut took = 0u32;
    let mut input_open = true;
    // One input frame waiting for room on the command's side. Output keeps flowing while
    // it waits: a command that stops reading its stdin until its stdout is read (`cat` of
    // a large input) must not stall both.
    let mut pending: Option<SessionInput> = None;
    loop {
        tokio::select! {
            o = from_cmd.recv() => {
                let a = match o {
                    Some(SessionOutput::Stdout(data)) => Answer::Data { stream: "stdout".into(), data },
                    Some(SessionOutput::Stderr(data)) => Answer::Data { stream: "stderr".into(), data },
                    Some(SessionOutput::Exit(code)) => {
                        Answer::Exec(skiff_model::proto::ExecResult { code, stdout: String::new(), stderr: String::new() })
                    }
                    Some(SessionOutput::Error(e)) => Answer::Error(e),
                    None => Answer::Error("the exec ended without an exit code".into()),
                };
                let last = a.is_last();
                if !out.send(a).await || last {
                    return;
                }
            }
            i = input.recv(), if input_open && pending.is_none() => match i {
                Some(i) => pending = Some(i),
                None => input_open = false,
            },
            room = to_cmd.reserve(), if pending.is_some() => {
                match (room, pending.take()) {
                    (Ok(room), Some(i)) => room.send(i),
                    _ => input_open = false,
                }
                took += 1;
                if took >= INPUT_WINDOW / 2 {
                    if !out.send(Answer::Took { frames: took }).await {
                        return;
                    }
                    took = 0;
                }
            }
        }
    }
}

/// Where one request's answers go: frames on the tunnel, within the stream's credit.
struct Replies {
    id: u64,
    tx: tokio::sync::mpsc::Sender<String>,
    credit: Arc<tokio::sync::Semaphore>,
}

impl Replies {
    /// Sends one answer once the hub has granted room for it (the last one of a stream
    /// needs none); false when the tunnel is gone.
    async fn send(&self, answer: Answer) -> bool {
        if !answer.is_last() {
            match self.credit.acquire().await {
                Ok(p) => p.forget(),
                Err(_) => return false,
            }
        }
        match serde_json::to_string(&Reply { id: self.id, answer }) {
            Ok(f) => self.tx.send(f).await.is_ok(),
            Err(_) => false,
        }
    }
}

/// The id of a frame that carries one but is no request this agent knows.
/// The `type` of a control frame (at most 32 characters), or `?`.
fn control_kind(text: &str) -> String {
    #[derive(serde::Deserialize)]
    struct Typed {
        #[serde(rename = "type")]
        kind: String,
    }
    let kind = serde_json::from_str::<Typed>(text).map(|t| t.kind).unwrap_or_else(|_| "?".into());
    kind.chars().take(32).collect()
}

fn unknown_request_id(text: &str) -> Option<u64> {
    #[derive(serde::Deserialize)]
    struct WithId {
        id: u64,
    }
    serde_json::from_str::<WithId>(text).ok().map(|w| w.id)
}

/// `text` in pieces of at most `max` bytes, cut at character boundaries.
fn chunks(text: &str, max: usize) -> impl Iterator<Item = &str> {
    let mut rest = text;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let mut end = rest.len().min(max);
        while !rest.is_char_boundary(end) {
            end -= 1;
        }
        let (head, tail) = rest.split_at(end);
        rest = tail;
        Some(head)
    })
}

/// Serves one request from the hub: its answers go back as frames.
async fn answer(agent: Arc<Agent>, op: Op, out: Replies) {
    match op {
        Op::Logs { instance, tail, follow } => match agent.log_stream(&instance, tail, follow) {
            Ok(mut lines) => {
                while let Some(l) = lines.recv().await {
                    if !out.send(Answer::Log(l)).await {
                        return;
                    }
                }
                out.send(Answer::End).await;
            }
            Err(e) => {
                out.send(Answer::Error(e.to_string())).await;
            }
        },
        Op::Exec { instance, argv, timeout_ms } => {
            let r = match agent.exec_result(&instance, argv, Duration::from_millis(timeout_ms)).await {
                Ok(r) => r,
                Err(e) => {
                    out.send(Answer::Error(e.to_string())).await;
                    return;
                }
            };
            for (stream, text) in [("stdout", &r.stdout), ("stderr", &r.stderr)] {
                for piece in chunks(text, CHUNK_BYTES) {
                    if !out.send(Answer::Output { stream: stream.into(), data: piece.to_string() }).await {
                        return;
                    }
                }
            }
            let end = skiff_model::proto::ExecResult { code: r.code, stdout: String::new(), stderr: String::new() };
            out.send(Answer::Exec(end)).await;
        }
        Op::Act { instance, action } => match agent.act_on(&instance, action) {
            Ok(()) => {
                out.send(Answer::End).await;
            }
            Err(e) => {
                out.send(Answer::Error(e.to_string())).await;
            }
        },
        // Served by `session`, or routed to one.
        Op::Session { .. }
        | Op::Connect { .. }
        | Op::Datagrams { .. }
        | Op::Input { .. }
        | Op::Resize { .. }
        | Op::InputEnd => {}
        Op::Cancel | Op::Credit { .. } => {}
    }
}

#[cfg(test)]
mod tests {
    /// A hub that takes a connection is one to move to; a dead address or one that is not
    /// a hub's URL is passed over.
    #[tokio::test]
    async fn the_hub_that_answers_is_the_one_to_move_to() {
        let dead = {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            format!("https://{}", l.local_addr().unwrap())
        };
        assert_eq!(super::answering(std::slice::from_ref(&dead)).await, None);
        let live = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let live = format!("https://{}", live.local_addr().unwrap());
        let all = [dead, "http://not-a-hub".to_string(), live.clone()];
        assert_eq!(super::answering(&all).await, Some(live));
    }

    #[test]
    fn a_request_of_a_newer_hub_is_answered_by_its_id() {
        let newer = r#"{"id":7,"op":"teleport","instance":"web-1"}"#;
        assert!(serde_json::from_str::<skiff_model::proto::Request>(newer).is_err());
        assert_eq!(super::unknown_request_id(newer), Some(7));
        assert_eq!(super::unknown_request_id(r#"{"type":"renewed"}"#), None);
    }

    #[test]
    fn given_hubs_come_first_then_learned_ones_once_each() {
        let v = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(
            super::candidates(&v(&["https://a:1/", "https://b:1"]), &v(&["https://c:1", "https://a:1"])),
            v(&["https://a:1", "https://b:1", "https://c:1"])
        );
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(t.path().join("pki")).unwrap();
        let id = crate::join::Identity::new(t.path());
        assert!(id.learned_hubs().is_empty());
        assert!(id.learn_hubs(&v(&["https://a:1", "http://x:1", "https://b:2"])).unwrap());
        assert!(!id.learn_hubs(&v(&["https://a:1", "https://b:2"])).unwrap(), "unchanged");
        assert!(!id.learn_hubs(&[]).unwrap(), "an empty list forgets nothing");
        assert_eq!(id.learned_hubs(), v(&["https://a:1", "https://b:2"]));
    }

    #[test]
    fn output_is_cut_at_character_boundaries() {
        let text = "aé".repeat(10);
        let parts: Vec<&str> = super::chunks(&text, 4).collect();
        assert_eq!(parts.concat(), text);
        assert!(parts.iter().all(|p| p.len() <= 4 && !p.is_empty()));
        assert_eq!(super::chunks("", 4).count(), 0);
    }

    #[test]
    fn certificates_are_renewed_with_a_third_of_their_life_left() {
        let day = 86_400_000;
        assert!(!super::due_for_renewal((0, 90 * day), 59 * day));
        assert!(super::due_for_renewal((0, 90 * day), 61 * day));
        assert!(super::due_for_renewal((0, 90 * day), 91 * day), "expired");
        let waits: Vec<u64> = (0..7).map(|f| super::backoff(f).as_millis() as u64 / 1000).collect();
        assert!(
            waits.iter().zip([1, 2, 4, 8, 15, 15, 15]).all(|(w, base)| *w >= base && *w < base * 3 / 2 + 1),
            "{waits:?}"
        );
    }
}
