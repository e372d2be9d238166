//! The agent's one outbound connection (`/api/v1/nodes/{name}/tunnel`, a WebSocket over
//! mutual TLS) carrying control, status, logs and exec for a node behind NAT.
//!
//! Frames are JSON text.
//! * [`Control`] frames (tagged `type`): the agent says `hello` with the revision it
//!   holds and sends `status` (instances, unshipped events) when it changed; the hub
//!   `assign`s when the node's assignment differs from what the node holds and `ack`s
//!   events. After a reconnect only a changed assignment is sent — a restarted hub
//!   sends nothing to nodes that are current.
//! * Requests (hub → agent, `id` chosen by the hub, `op`: logs, exec, cancel) and
//!   [`Reply`]s for that id: log lines then `end`, an exec result, or an error.
//!
//! Liveness: the hub pings every 20 s unless the node was heard from in the last 10 s;
//! any frame or pong marks the node seen. A ping's payload acknowledges resource samples.

use crate::{BoxFuture, NodeError, NodeLink, Session};
use skiff_model::metrics::{MAX_INSTANCES, MAX_SAMPLES_PER_FRAME, METRICS_BATCH};
use skiff_model::proto::{
    Answer, Assignment, Control, ExecResult, InstanceAction, Op, Reply, Request, SessionInput, SessionOutput,
    SessionSpec, INPUT_WINDOW, PING_EVERY, STREAM_WINDOW,
};
use skiff_model::{Deployment, EventRecord, InstanceStatus, LogLine};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;

/// Where the tunnel's frames go out: a writer task owns the socket's sending half, so the
/// loop that reads never waits on a send (a node that sends while it is not reading — a
/// session's output against its input — would otherwise hold both ends).
type Out = mpsc::Sender<axum::extract::ws::Message>;

/// How long one frame may wait for the writer before the tunnel is given up on.
const SEND_WAIT: Duration = Duration::from_secs(10);

/// Queues one message for the node; false when the tunnel is gone or stuck.
async fn send_msg(out: &Out, m: axum::extract::ws::Message) -> bool {
    matches!(tokio::time::timeout(SEND_WAIT, out.send(m)).await, Ok(Ok(())))
}

/// Sends the acknowledgement of samples received (if one is owed); false: the link is gone.
async fn ack_now(out: &Out, unacked: &mut Option<u64>) -> bool {
    let Some(through) = unacked.take() else { return true };
    send_frame(out, &Control::MetricsAck { through }).await
}

/// Tells the node the store's hubs as they are now (nothing while none are known); false
/// when the socket is gone.
async fn tell_hubs(out: &Out, hubs: &mut tokio::sync::watch::Receiver<Vec<String>>) -> bool {
    let list = hubs.borrow_and_update().clone();
    list.is_empty() || send_frame(out, &Control::Hubs { hubs: list }).await
}

/// Tells the node this hub is cut off from its store, if it is (once).
async fn tell_cut_off(out: &Out, cut_off: &mut tokio::sync::watch::Receiver<bool>) -> bool {
    let cut = *cut_off.borrow_and_update();
    !cut || send_frame(out, &Control::CutOff).await
}

/// A deflated frame as the text it carries (the hub's header says nodes may send them);
/// one that does not inflate to text within the hub's bound ends the tunnel.
fn inflated<E>(
    m: Option<Result<axum::extract::ws::Message, E>>,
    node: &str,
) -> Option<Result<axum::extract::ws::Message, E>> {
    use axum::extract::ws::Message;
    match m {
        Some(Ok(Message::Binary(b))) => match skiff_model::proto::inflate_frame(&b, crate::api::MAX_BODY) {
            Ok(text) => Some(Ok(Message::Text(text.into()))),
            Err(e) => {
                tracing::warn!(%node, error = %e, "closing the tunnel");
                None
            }
        },
        m => m,
    }
}

/// Sends one control frame; false when the socket is gone.
async fn send_frame(out: &Out, c: &Control) -> bool {
    let Ok(frame) = serde_json::to_string(c) else { return true };
    send_msg(out, axum::extract::ws::Message::Text(frame.into())).await
}

/// Writes the tunnel's frames: requests from the hub's streams (`requests`) and the
/// loop's own frames (`own`), until either side is gone.
async fn write_frames(
    mut sink: futures_util::stream::SplitSink<axum::extract::ws::WebSocket, axum::extract::ws::Message>,
    mut requests: mpsc::Receiver<String>,
    mut own: mpsc::Receiver<axum::extract::ws::Message>,
) {
    use axum::extract::ws::Message;
    use futures_util::SinkExt;
    loop {
        let m = tokio::select! {
            m = own.recv() => match m { Some(m) => m, None => break },
            f = requests.recv() => match f { Some(f) => Message::Text(f.into()), None => break },
        };
        if sink.send(m).await.is_err() {
            break;
        }
    }
    let _ = sink.close().await;
}

/// Serves a node's tunnel until it closes: control frames, requests and liveness.
pub async fn serve(
    f: Arc<crate::fleet::Fleet>,
    name: String,
    peer: crate::tls::Peer,
    socket: axum::extract::ws::WebSocket,
) {
    use axum::extract::ws::Message;
    use futures_util::StreamExt;
    let (tx, rx) = mpsc::channel::<String>(256);
    let t = f.open_tunnel(&name, tx);
    let (sink, mut socket) = socket.split();
    let (out, own) = mpsc::channel::<Message>(64);
    let writer = tokio::spawn(write_frames(sink, rx, own));
    // Checked again now that the tunnel is registered: a delete or a replacement between
    // the upgrade's check and here would otherwise leave this tunnel open. (Off the async
    // threads, as the store's other reads on connecting: on etcd each is a round trip,
    // and thousands of nodes connecting at once must not hold up TLS handshakes.)
    let authorized = {
        let (f, peer, name) = (Arc::clone(&f), peer.clone(), name.clone());
        tokio::task::spawn_blocking(move || f.authorize_again(&peer, &name)).await
    };
    let authorized = authorized.unwrap_or_else(|e| Err(crate::fleet::FleetError::Internal(e.to_string())));
    if let Err(e) = authorized {
        tracing::warn!(node = %name, error = %e, "tunnel refused");
        f.close_tunnel(&name, t.serial);
        return;
    }
    f.touch(&name);
    tracing::info!(node = %name, "tunnel open");
    // Woken when what nodes are told changed (not at every move of the store's revision).
    let mut changes = f.wakes();
    // The fleet's services this node may reach, told after the hello and on each change.
    let mut mesh_changes = f.mesh_changes();
    let mut pushed_view: Option<skiff_model::mesh::MeshView> = None;
    let mut cut_from: Option<u64> = None;
    // The store's hubs: told once the node said hello, and again when they change; and
    // whether this hub is cut off from the store.
    let mut hubs = f.hubs();
    let mut cut_off = f.cut_off();
    // The revision the node holds (from its hello) and the digest of its part, and what
    // was last pushed to it.
    let mut node_rev: Option<u64> = None;
    let mut node_digest: Option<String> = None;
    let mut pushed: Option<(Vec<skiff_model::proto::Assigned>, Vec<String>)> = None;
    // Whether the node reads UDP service ports (its hello says).
    let mut udp = false;
    // Ticks at half the ping period: a quiet node is pinged every 20 s, one heard from
    // lately at least every 30 s (the agent gives up after 45 s without a word).
    let mut ping = tokio::time::interval(PING_EVERY / 2);
    // The sample deltas are made from (the last one received on this connection), and
    // the newest sample id not yet acknowledged (the next ping says it).
    let mut metrics_base: Option<skiff_model::metrics::PackedSample> = None;
    let mut unacked: Option<u64> = None;
    let mut last_ping = tokio::time::Instant::now();
    // A node whose link died silently stops answering: drop its tunnel (it will dial again).
    let mut last_rx = tokio::time::Instant::now();
    let send = |c: &Control| serde_json::to_string(c).ok();
    // Control frames cost the hub work (a status is filtered and stored, a hello may write
    // the store): a node gets a budget of them, and one that floods loses its tunnel.
    let mut budget = FrameBudget::new(tokio::time::Instant::now());
    loop {
        let mut push = false;
        tokio::select! {
            m = socket.next() => match inflated(m, &name) {
                Some(Ok(Message::Text(text))) => {
                    f.touch(&name);
                    last_rx = tokio::time::Instant::now();
                    let control = serde_json::from_str::<Control>(text.as_str());
                    // Control frames, and frames that answer nothing the hub asked, come
                    // out of the budget; answers to the hub's requests are bounded by
                    // their streams' credit.
                    let budgeted = match &control {
                        Ok(_) => true,
                        Err(_) => !t.deliver(text.as_str()).await,
                    };
                    if budgeted && !budget.take_for(tokio::time::Instant::now(), text.len()) {
                        // A delta dropped would leave the next ones without their base.
                        if matches!(control, Ok(Control::MetricsDelta { .. })) {
                            break;
                        }
                        if budget.dropped > FrameBudget::CLOSE_AFTER {
                            let msg = format!("sent more than {} control frames a second; tunnel closed", FrameBudget::PER_SECOND);
                            f.security.push(f.now_ms(), &name, "FrameFlood", msg);
                            break;
                        }
                        continue;
                    }
                    match control {
                        Ok(Control::Hello { revision, runtimes, versions, devices, features, digest }) => {
                            node_digest = digest;
                            udp = features.is_some_and(|f| f.iter().any(|x| x == skiff_model::proto::FEATURE_MESH_UDP));
                            let (f2, n2) = (Arc::clone(&f), name.clone());
                            let (recorded, stale) = tokio::task::spawn_blocking(move || {
                                let recorded =
                                    f2.set_node_facts(&n2, runtimes.as_deref(), versions.as_ref(), devices.as_ref());
                                let stale = f2.store_node(&n2).is_some_and(|rec| f2.should_renew(&rec, f2.now_ms()));
                                (recorded, stale)
                            })
                            .await
                            .unwrap_or((Ok(()), false));
                            if let Err(e) = recorded {
                                tracing::warn!(node = %name, error = ?e, "recording runtimes");
                            }
                            node_rev = Some(revision);
                            push = true;
                            if !tell_hubs(&out, &mut hubs).await || !tell_cut_off(&out, &mut cut_off).await {
                                break;
                            }
                            if stale {
                                if let Some(frame) = send(&Control::RenewNow) {
                                    if !send_msg(&out, Message::Text(frame.into())).await {
                                        break;
                                    }
                                }
                            }
                        }
                        Ok(Control::Renew { csr }) => {
                            let reply = match f.renew(&peer, &name, &csr) {
                                Ok(cert) => Control::Renewed { cert },
                                Err(e) => {
                                    tracing::warn!(node = %name, error = ?e, "certificate renewal refused");
                                    continue;
                                }
                            };
                            if let Some(frame) = send(&reply) {
                                if !send_msg(&out, Message::Text(frame.into())).await {
                                    break;
                                }
                            }
                        }
                        Ok(Control::Status { status }) => {
                            let ack = f.report(&name, status);
                            if ack.events_through > 0 {
                                if let Some(frame) = send(&Control::Ack { events_through: ack.events_through }) {
                                    if !send_msg(&out, Message::Text(frame.into())).await {
                                        break;
                                    }
                                }
                            }
                        }
                        Ok(Control::Metrics { samples, .. }) if samples.len() > MAX_SAMPLES_PER_FRAME => break,
                        Ok(Control::MetricsDelta { samples, .. }) if samples.len() > MAX_SAMPLES_PER_FRAME => break,
                        Ok(Control::Metrics { samples, through }) => {
                            if samples.iter().any(|s| s.2.len() > MAX_INSTANCES) {
                                break;
                            }
                            metrics_base = samples.last().cloned().map(|s| s.sorted());
                            let backlog = samples.len() > METRICS_BATCH;
                            f.record_metrics(&name, samples.into_iter().map(|p| p.unpack(&name)).collect());
                            unacked = Some(through);
                            if backlog && !ack_now(&out, &mut unacked).await {
                                break;
                            }
                        }
                        Ok(Control::MetricsDelta { samples, through }) => {
                            // Each delta rebuilds a sample from the one before on this
                            // connection; one that does not fit ends the tunnel (the node
                            // reconnects and starts again from a whole sample).
                            // The hub keeps each node's newest sample: only that one is
                            // unpacked.
                            let mut base = metrics_base.take();
                            for d in &samples {
                                match base.as_ref().map(|b| d.apply(b)) {
                                    Some(Ok(s)) => base = Some(s),
                                    Some(Err(e)) => {
                                        tracing::warn!(node = %name, error = %e, "a metrics delta that does not fit");
                                        base = None;
                                        break;
                                    }
                                    None => break,
                                }
                            }
                            let Some(newest) = base else { break };
                            metrics_base = Some(newest.clone());
                            let backlog = samples.len() > METRICS_BATCH;
                            f.record_metrics(&name, vec![newest.unpack(&name)]);
                            unacked = Some(through);
                            // A backlog (after a partition) frees the node's buffer at once;
                            // a steady batch is acknowledged by the next ping.
                            if backlog && !ack_now(&out, &mut unacked).await {
                                break;
                            }
                        }
                        Ok(_) | Err(_) => {}
                    }
                }
                Some(Ok(Message::Pong(_))) => {
                    f.touch(&name);
                    last_rx = tokio::time::Instant::now();
                }
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break,
                Some(Ok(_)) => {}
            },
            _ = out.closed() => break,
            r = changes.changed() => {
                if r.is_err() {
                    break;
                }
                push = true;
            }
            r = mesh_changes.changed() => {
                if r.is_err() {
                    break;
                }
                push = true;
            }
            r = hubs.changed(), if node_rev.is_some() => {
                if r.is_err() {
                    break;
                }
                if !tell_hubs(&out, &mut hubs).await {
                    break;
                }
            }
            r = cut_off.changed(), if node_rev.is_some() => {
                if r.is_err() || !tell_cut_off(&out, &mut cut_off).await {
                    break;
                }
            }
            _ = t.kick.notified() => break,
            _ = ping.tick() => {
                if last_rx.elapsed() > PING_EVERY * 3 {
                    break;
                }
                // A node heard from lately needs no ping, unless samples wait for their
                // acknowledgement (the ping carries it) or its last ping is 25 s old.
                let since = last_ping.elapsed();
                let wanted = unacked.is_some() || last_rx.elapsed() >= PING_EVERY / 2;
                let due = (wanted && since + PING_EVERY / 4 >= PING_EVERY) || since >= PING_EVERY * 5 / 4;
                if !due {
                    continue;
                }
                let payload = unacked.take().map(|t| t.to_string().into_bytes()).unwrap_or_default();
                if !send_msg(&out, Message::Ping(payload.into())).await {
                    break;
                }
                last_ping = tokio::time::Instant::now();
            }
        }
        let Some(held) = node_rev.filter(|_| push) else { continue };
        // The view is cut again only from a table other than the one it was last cut from.
        let table = match f.mesh_table() {
            Ok(t) if cut_from != Some(t.id()) => Some(t),
            Ok(_) => None,
            Err(e) => {
                tracing::warn!(node = %name, error = %e, "the fleet's services");
                None
            }
        };
        if let Some(t) = table {
            let view = crate::fleet::Fleet::view_in(&t, &name);
            let view = if udp { view } else { view.tcp_only() };
            if pushed_view.as_ref() != Some(&view) {
                if let Some(frame) = send(&Control::Services { view: view.clone() }) {
                    if !send_msg(&out, Message::Text(frame.into())).await {
                        break;
                    }
                }
                pushed_view = Some(view);
            }
            cut_from = Some(t.id());
        }
        let Ok((mut a, specs)) = f.assignment_and_specs(&name) else { continue };
        if !udp {
            // A spec of its own only where there is something to leave out.
            for d in a.deployments.iter_mut().filter(|d| d.spec.expose.iter().any(|p| !p.protocol.is_tcp())) {
                skiff_model::mesh::tcp_only(std::sync::Arc::make_mut(&mut d.spec));
            }
        }
        // Behind on first contact (another revision, and another part than the one the
        // node holds — any hub's digest of it): send once. Later: only when this node's
        // part changed.
        // The digest only where it is asked for: on first contact, and in what is sent
        // (not on every wake of a tunnel whose part is unchanged).
        let mut made = None;
        let stale = match &pushed {
            None if held == a.revision => false,
            None => {
                made = wire(&a, &specs);
                made.as_ref().is_none_or(|w| node_digest.as_deref() != Some(w.digest.as_str()))
            }
            Some((d, m)) => *d != a.deployments || *m != a.metrics,
        };
        if stale {
            pushed = Some((a.deployments.clone(), a.metrics.clone()));
            node_rev = Some(a.revision);
            if let Some(w) = made.or_else(|| wire(&a, &specs)) {
                if !send_msg(&out, Message::Text(w.frame.into())).await {
                    break;
                }
            }
        } else if pushed.is_none() {
            pushed = Some((a.deployments, a.metrics));
        }
    }
    drop(out);
    writer.abort();
    f.close_tunnel(&name, t.serial);
    tracing::info!(node = %name, "tunnel closed");
}

/// A token bucket over a node's control frames.
struct FrameBudget {
    tokens: f64,
    at: tokio::time::Instant,
    dropped: u32,
}

impl FrameBudget {
    const PER_SECOND: f64 = 20.0;
    const BURST: f64 = 200.0;
    /// Frames dropped over budget before the tunnel is closed.
    const CLOSE_AFTER: u32 = 100;

    fn new(now: tokio::time::Instant) -> Self {
        FrameBudget { tokens: Self::BURST, at: now, dropped: 0 }
    }

    /// Each started 64 KiB of a frame's text costs a frame more: a long frame (or a
    /// deflated one that inflates long) is not read at the price of a short one.
    const BYTES_PER_FRAME: usize = 64 << 10;

    /// Whether a frame of `len` bytes of text arriving `now` is within budget.
    fn take_for(&mut self, now: tokio::time::Instant, len: usize) -> bool {
        let cost = 1.0 + (len / Self::BYTES_PER_FRAME) as f64;
        let secs = now.saturating_duration_since(self.at).as_secs_f64();
        self.at = now;
        self.tokens = (self.tokens + secs * Self::PER_SECOND).min(Self::BURST);
        if self.tokens >= Self::BURST {
            // A full bucket again: the node behaved for a while; old drops are forgiven.
            self.dropped = 0;
        }
        if self.tokens >= cost {
            self.tokens -= cost;
            true
        } else {
            self.dropped += 1;
            false
        }
    }
}

/// One node's open tunnel, as the hub holds it.
pub struct Tunnel {
    /// Frames to send to the agent.
    pub out: mpsc::Sender<String>,
    pending: Mutex<HashMap<u64, mpsc::Sender<Answer>>>,
    next: AtomicU64,
    /// Tells this tunnel apart from a newer one of the same node.
    pub serial: u64,
    /// Closes the tunnel from the hub's side (the node was revoked).
    pub kick: tokio::sync::Notify,
}

impl Tunnel {
    pub fn new(out: mpsc::Sender<String>, serial: u64) -> Self {
        Tunnel {
            out,
            pending: Mutex::new(HashMap::new()),
            next: AtomicU64::new(1),
            serial,
            kick: tokio::sync::Notify::new(),
        }
    }

    /// Sends `op`; its answers come from the returned [`Stream`] until `End`, a result,
    /// an error, or the tunnel closing. Dropping the stream cancels the request on the
    /// agent.
    pub fn request(self: &Arc<Self>, op: Op) -> Result<Stream, NodeError> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        // Room for the whole window: the agent never has more in flight, so a delivery
        // never waits for the consumer.
        let (tx, rx) = mpsc::channel(STREAM_WINDOW as usize + 1);
        self.pending.lock().map_err(|_| NodeError::Failed("tunnel lock poisoned".into()))?.insert(id, tx);
        let frame = serde_json::to_string(&Request { id, op }).map_err(|e| NodeError::Failed(e.to_string()))?;
        self.out.try_send(frame).map_err(|_| NodeError::Failed("the node's tunnel is busy or closed".into()))?;
        Ok(Stream { id, rx, tunnel: Arc::clone(self), taken: 0 })
    }

    /// Routes one frame from the agent to its request's stream, without waiting: an agent
    /// that sends beyond its window loses the stream.
    /// Hands a reply to the request it answers; false if it answers nothing pending.
    pub async fn deliver(&self, frame: &str) -> bool {
        let Ok(r) = serde_json::from_str::<Reply>(frame) else {
            tracing::debug!("tunnel: unreadable frame");
            return false;
        };
        let last = r.answer.is_last();
        let tx = {
            let Ok(mut p) = self.pending.lock() else { return false };
            if last {
                p.remove(&r.id)
            } else {
                p.get(&r.id).cloned()
            }
        };
        let Some(tx) = tx else { return false };
        if let Err(mpsc::error::TrySendError::Full(_)) = tx.try_send(r.answer) {
            tracing::warn!(request = r.id, "tunnel: the node sent beyond its window; stream dropped");
            self.cancel(r.id);
        }
        true
    }

    /// Forgets a request and tells the agent to stop it.
    fn cancel(&self, id: u64) {
        let was_pending = self.pending.lock().map(|mut p| p.remove(&id).is_some()).unwrap_or(false);
        if was_pending {
            if let Ok(f) = serde_json::to_string(&Request { id, op: Op::Cancel }) {
                // A full queue must not lose the cancel (the agent would keep a session's
                // command running): it waits for room in a task of its own.
                if let Err(mpsc::error::TrySendError::Full(f)) = self.out.try_send(f) {
                    if let Ok(rt) = tokio::runtime::Handle::try_current() {
                        let out = self.out.clone();
                        rt.spawn(async move { tokio::time::timeout(SEND_WAIT * 3, out.send(f)).await });
                    }
                }
            }
        }
    }
}

/// The answers to one request, with the flow control that keeps it from stalling the
/// tunnel: credit is granted as answers are taken.
pub struct Stream {
    id: u64,
    rx: mpsc::Receiver<Answer>,
    tunnel: Arc<Tunnel>,
    /// Answers taken since credit was last granted.
    taken: u32,
}

impl Stream {
    /// The next answer (`None` once the stream ended or the tunnel closed).
    pub async fn next(&mut self) -> Option<Answer> {
        let a = self.rx.recv().await?;
        self.taken += 1;
        if self.taken >= STREAM_WINDOW / 2 && !a.is_last() {
            let frames = std::mem::take(&mut self.taken);
            if let Ok(f) = serde_json::to_string(&Request { id: self.id, op: Op::Credit { frames } }) {
                // Waits for room in the outgoing queue: this stream's consumer is the one
                // that waits, nobody else.
                let _ = self.tunnel.out.send(f).await;
            }
        }
        Some(a)
    }
}

impl Stream {
    /// Sends another request of this stream's id (a session's input), waiting for room in
    /// the outgoing queue; false when the tunnel is gone.
    async fn send(&self, op: Op) -> bool {
        match serde_json::to_string(&Request { id: self.id, op }) {
            Ok(f) => self.tunnel.out.send(f).await.is_ok(),
            Err(_) => false,
        }
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.tunnel.cancel(self.id);
    }
}

/// The most exec output (each of stdout and stderr) the hub keeps for one answer.
pub const MAX_EXEC_OUTPUT: usize = 64 << 20;

/// A node reached through its tunnel: what the hub's views need from a remote node.
pub struct RemoteLink {
    pub name: String,
    pub fleet: Arc<crate::fleet::Fleet>,
}

impl RemoteLink {
    fn tunnel(&self) -> Result<Arc<Tunnel>, NodeError> {
        self.fleet.tunnel(&self.name).ok_or_else(|| NodeError::Unreachable(self.name.clone()))
    }
}

impl NodeLink for RemoteLink {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn instances(&self) -> Result<Vec<InstanceStatus>, NodeError> {
        Ok(self.fleet.reported_instances().into_iter().filter(|i| i.node == self.name).collect())
    }

    fn events(&self, limit: usize) -> Result<Vec<EventRecord>, NodeError> {
        Ok(self.fleet.events(Some(&self.name), limit))
    }

    fn has_instance(&self, instance: &str) -> bool {
        self.instances().map(|v| v.iter().any(|i| i.name == instance)).unwrap_or(false)
    }

    fn logs(&self, instance: &str, tail: Option<usize>, follow: bool) -> Result<mpsc::Receiver<LogLine>, NodeError> {
        let mut answers = self.tunnel()?.request(Op::Logs { instance: instance.to_string(), tail, follow })?;
        let (tx, rx) = mpsc::channel(256);
        tokio::spawn(async move {
            loop {
                // The reader may leave while the node is quiet: notice at once, not at the
                // next line (dropping `answers` cancels on the agent).
                let a = tokio::select! {
                    a = answers.next() => a,
                    _ = tx.closed() => return,
                };
                let Some(a) = a else { return };
                match a {
                    Answer::Log(l) => {
                        if tx.send(l).await.is_err() {
                            return; // dropping `answers` cancels on the agent
                        }
                    }
                    Answer::Error(e) => {
                        tracing::warn!("remote logs: {e}");
                        return;
                    }
                    _ => return,
                }
            }
        });
        Ok(rx)
    }

    fn exec(
        &self,
        instance: &str,
        argv: Vec<String>,
        timeout: Duration,
    ) -> BoxFuture<'_, Result<ExecResult, NodeError>> {
        let instance = instance.to_string();
        Box::pin(async move {
            let op = Op::Exec { instance, argv, timeout_ms: timeout.as_millis() as u64 };
            let mut answers = self.tunnel()?.request(op)?;
            let (mut stdout, mut stderr) = (String::new(), String::new());
            let deadline = tokio::time::Instant::now() + timeout + Duration::from_secs(10);
            loop {
                match tokio::time::timeout_at(deadline, answers.next()).await {
                    Ok(Some(Answer::Output { stream, data })) => {
                        let buf = if stream == "stderr" { &mut stderr } else { &mut stdout };
                        if buf.len() + data.len() <= MAX_EXEC_OUTPUT {
                            buf.push_str(&data);
                        }
                    }
                    Ok(Some(Answer::Exec(r))) => {
                        stdout.push_str(&r.stdout);
                        stderr.push_str(&r.stderr);
                        return Ok(ExecResult { code: r.code, stdout, stderr });
                    }
                    Ok(Some(Answer::Error(e))) => return Err(NodeError::Failed(e)),
                    Ok(_) => {
                        return Err(NodeError::Failed(format!(
                            "node {:?} closed the tunnel before answering",
                            self.name
                        )))
                    }
                    Err(_) => return Err(NodeError::Timeout(self.name.clone())),
                }
            }
        })
    }

    fn session(&self, instance: &str, spec: SessionSpec) -> BoxFuture<'_, Result<Session, NodeError>> {
        Box::pin(self.open_session(Op::Session { instance: instance.to_string(), spec }))
    }

    fn connect(
        &self,
        instance: &str,
        port: u16,
        protocol: skiff_model::Protocol,
    ) -> BoxFuture<'_, Result<Session, NodeError>> {
        let instance = instance.to_string();
        Box::pin(self.open_session(match protocol {
            skiff_model::Protocol::Tcp => Op::Connect { instance, port },
            skiff_model::Protocol::Udp => Op::Datagrams { instance, port },
        }))
    }

    fn act(&self, instance: &str, action: InstanceAction) -> BoxFuture<'_, Result<(), NodeError>> {
        let op = Op::Act { instance: instance.to_string(), action };
        Box::pin(async move {
            let mut answers = self.tunnel()?.request(op)?;
            match tokio::time::timeout(Duration::from_secs(30), answers.next()).await {
                Ok(Some(Answer::End)) => Ok(()),
                Ok(Some(Answer::Error(e))) => Err(NodeError::Failed(e)),
                Ok(_) => Err(NodeError::Failed(format!("node {:?} closed the tunnel before answering", self.name))),
                Err(_) => Err(NodeError::Timeout(self.name.clone())),
            }
        })
    }
}

impl RemoteLink {
    /// Sends a request that opens a session (`session`, `connect`) and relays it once the
    /// node says it started.
    async fn open_session(&self, op: Op) -> Result<Session, NodeError> {
        {
            let mut answers = self.tunnel()?.request(op)?;
            let (out_tx, out_rx) = mpsc::channel(64);
            match tokio::time::timeout(SESSION_START, answers.next()).await {
                Ok(Some(Answer::Took { .. })) => {}
                Ok(Some(Answer::Error(e))) => return Err(NodeError::Failed(e)),
                Ok(_) => {
                    return Err(NodeError::Failed(format!("node {:?} closed the tunnel before answering", self.name)))
                }
                Err(_) => {
                    return Err(NodeError::Failed(format!(
                        "node {:?} did not start the exec in {SESSION_START:?} (is its agent older than the hub?)",
                        self.name
                    )))
                }
            }
            let (in_tx, in_rx) = mpsc::channel(INPUT_WINDOW as usize);
            tokio::spawn(relay_session(answers, in_rx, out_tx));
            Ok(Session { input: in_tx, output: out_rx })
        }
    }
}

/// How long a node has to say a session started (an agent too old to know sessions says
/// nothing at all).
const SESSION_START: Duration = Duration::from_secs(30);

/// Carries one session between the hub's caller and the agent: output answers to the
/// caller, the caller's input down as requests within the agent's input window.
async fn relay_session(
    mut answers: Stream,
    mut input: mpsc::Receiver<SessionInput>,
    output: mpsc::Sender<SessionOutput>,
) {
    // Input frames the agent has not yet said it took.
    let mut in_flight = 0u32;
    let mut input_open = true;
    loop {
        tokio::select! {
            a = answers.next() => {
                let o = match a {
                    Some(Answer::Data { stream, data }) if stream == "stderr" => SessionOutput::Stderr(data),
                    Some(Answer::Data { data, .. }) => SessionOutput::Stdout(data),
                    Some(Answer::Took { frames }) => {
                        in_flight = in_flight.saturating_sub(frames);
                        continue;
                    }
                    Some(Answer::Exec(r)) => SessionOutput::Exit(r.code),
                    Some(Answer::Error(e)) => SessionOutput::Error(e),
                    Some(_) => continue,
                    None => SessionOutput::Error("the node's tunnel closed during the exec".into()),
                };
                let last = matches!(o, SessionOutput::Exit(_) | SessionOutput::Error(_));
                // Dropping `answers` (returning) cancels the exec on the agent.
                if output.send(o).await.is_err() || last {
                    return;
                }
            }
            i = input.recv(), if input_open && in_flight < INPUT_WINDOW => {
                let op = match i {
                    Some(SessionInput::Data(data)) => Op::Input { data },
                    Some(SessionInput::Resize { cols, rows }) => Op::Resize { cols, rows },
                    Some(SessionInput::End) | None => {
                        input_open = false;
                        Op::InputEnd
                    }
                };
                if !answers.send(op).await {
                    let _ = output.send(SessionOutput::Error("the node's tunnel closed during the exec".into())).await;
                    return;
                }
                in_flight += 1;
            }
            _ = output.closed() => return,
        }
    }
}

/// Each distinct spec of the nodes' parts as JSON, made once per revision: a deployment on
/// 100,000 nodes is serialized once by a hub, not twice for every node (its digest and its
/// frame). By the spec's address, with the spec kept beside it, so that address is its own.
#[derive(Default)]
pub struct SpecsJson(HashMap<usize, (Arc<Deployment>, String)>);

impl SpecsJson {
    pub fn of<'a>(specs: impl IntoIterator<Item = &'a Arc<Deployment>>) -> Self {
        let mut m = HashMap::new();
        for s in specs {
            if let Ok(j) = serde_json::to_string(&**s) {
                m.insert(Arc::as_ptr(s) as usize, (Arc::clone(s), j));
            }
        }
        SpecsJson(m)
    }

    fn get(&self, spec: &Arc<Deployment>) -> Option<&str> {
        let (s, j) = self.0.get(&(Arc::as_ptr(spec) as usize))?;
        Arc::ptr_eq(s, spec).then_some(j.as_str())
    }
}

/// A node's assignment as it is sent.
pub struct Wire {
    /// What the node's part is, as a hub tells it in an assignment and the node says it
    /// back in its hello ([`skiff_model::proto::Assignment::digest`]): sha256 of the JSON of
    /// `[deployments, metrics]`, 32 hex digits. Every hub of a store makes the same of the
    /// same part.
    pub digest: String,
    /// The `assign` frame, with that digest: the bytes serde makes of [`Control::Assign`].
    pub frame: String,
}

/// `a` as it is sent, each spec's JSON taken from `specs` where it is there (made here
/// where it is not: a spec the tunnel trimmed for a node).
pub fn wire(a: &Assignment, specs: &SpecsJson) -> Option<Wire> {
    use sha2::Digest;
    let mut deps = Vec::with_capacity(1024);
    deps.push(b'[');
    for (i, d) in a.deployments.iter().enumerate() {
        if i > 0 {
            deps.push(b',');
        }
        deps.extend_from_slice(br#"{"spec":"#);
        match specs.get(&d.spec) {
            Some(j) => deps.extend_from_slice(j.as_bytes()),
            None => serde_json::to_writer(&mut deps, &*d.spec).ok()?,
        }
        deps.extend_from_slice(br#","indexes":"#);
        serde_json::to_writer(&mut deps, &d.indexes).ok()?;
        deps.push(b'}');
    }
    deps.push(b']');
    let metrics = serde_json::to_vec(&a.metrics).ok()?;
    let mut h = sha2::Sha256::new();
    for part in [&b"["[..], &deps, b",", &metrics, b"]"] {
        h.update(part);
    }
    let digest: String = h.finalize()[..16].iter().map(|b| format!("{b:02x}")).collect();
    let mut f = Vec::with_capacity(deps.len() + metrics.len() + 128);
    f.extend_from_slice(br#"{"type":"assign","assignment":{"revision":"#);
    f.extend_from_slice(a.revision.to_string().as_bytes());
    f.extend_from_slice(br#","deployments":"#);
    f.extend_from_slice(&deps);
    if !a.metrics.is_empty() {
        f.extend_from_slice(br#","metrics":"#);
        f.extend_from_slice(&metrics);
    }
    f.extend_from_slice(br#","digest":""#);
    f.extend_from_slice(digest.as_bytes());
    f.extend_from_slice(br#""}}"#);
    Some(Wire { frame: String::from_utf8(f).ok()?, digest })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The frame made by hand is the frame serde makes of the assignment with its digest,
    /// and the digest is sha256 of serde's JSON of the part; with metrics and without. A
    /// spec's JSON comes from the cache, by the spec itself (an equal copy is made anew).
    #[test]
    fn an_assignment_is_sent_as_serde_makes_it_with_each_spec_made_once() {
        use sha2::Digest;
        use skiff_model::proto::Assigned;
        let mut web = Deployment::new("web", "img:1");
        web.env.insert("A".into(), "x \"quoted\" é".into());
        let (web, db) = (Arc::new(web), Arc::new(Deployment::new("db", "img:2")));
        let specs = SpecsJson::of([&web]);
        for metrics in [vec![], vec!["rps".to_string(), "queue".to_string()]] {
            let a = Assignment {
                revision: 7,
                deployments: vec![
                    Assigned { spec: Arc::clone(&web), indexes: vec![1, 3] },
                    Assigned { spec: Arc::clone(&db), indexes: vec![2] },
                ],
                metrics,
                digest: None,
            };
            let w = wire(&a, &specs).unwrap();
            let part = serde_json::to_vec(&(&a.deployments, &a.metrics)).unwrap();
            let digest: String = sha2::Sha256::digest(&part)[..16].iter().map(|b| format!("{b:02x}")).collect();
            assert_eq!(w.digest, digest);
            let sent = Control::Assign { assignment: Assignment { digest: Some(digest), ..a.clone() } };
            assert_eq!(w.frame, serde_json::to_string(&sent).unwrap());
        }
        let mut cached = SpecsJson::of([&web]);
        cached.0.values_mut().for_each(|(_, j)| *j = r#""made once""#.into());
        let copy = Arc::new((*web).clone());
        let a = |spec: &Arc<Deployment>| Assignment {
            revision: 1,
            deployments: vec![Assigned { spec: Arc::clone(spec), indexes: vec![1] }],
            metrics: vec![],
            digest: None,
        };
        assert!(wire(&a(&web), &cached).unwrap().frame.contains(r#"{"spec":"made once","indexes":[1]}"#));
        assert!(!wire(&a(&copy), &cached).unwrap().frame.contains("made once"));
    }

    #[test]
    fn a_flooding_node_runs_out_of_budget() {
        let t0 = tokio::time::Instant::now();
        let mut b = FrameBudget::new(t0);
        let taken = (0..1000).filter(|_| b.take_for(t0, 0)).count();
        assert_eq!(taken, 200, "the burst");
        assert_eq!(b.dropped, 800);
        let later = t0 + Duration::from_secs(1);
        assert_eq!((0..100).filter(|_| b.take_for(later, 0)).count(), 20, "then 20 a second");
        assert!(b.dropped > FrameBudget::CLOSE_AFTER);
        assert!(b.take_for(later + Duration::from_secs(11), 0));
        assert_eq!(b.dropped, 0, "a node quiet long enough to refill starts again with a clean slate");
        // Long frames cost more: 1 MiB of text is 17 frames' worth.
        let t1 = later + Duration::from_secs(30);
        let mut b = FrameBudget::new(t1);
        assert_eq!((0..20).filter(|_| b.take_for(t1, 1 << 20)).count(), 11, "200 / 17");
        assert!(b.take_for(t1, 100), "a short one still fits");
    }

    fn log(id: u64, text: &str) -> String {
        let line = LogLine { time: "t".into(), stream: "stdout".into(), log: text.into() };
        serde_json::to_string(&Reply { id, answer: Answer::Log(line) }).unwrap()
    }

    /// A `logs -f` reader that stops reading stalls nothing: deliveries never wait, an
    /// agent that ignores its window loses that stream, and other requests go on.
    #[tokio::test]
    async fn a_stalled_reader_stalls_only_its_own_stream() {
        let (out_tx, mut out_rx) = mpsc::channel(16);
        let t = Arc::new(Tunnel::new(out_tx, 1));
        let stalled = t.request(Op::Logs { instance: "a".into(), tail: None, follow: true }).unwrap();
        let mut other = t.request(Op::Logs { instance: "b".into(), tail: None, follow: true }).unwrap();
        let (a, b): (Request, Request) = (
            serde_json::from_str(&out_rx.recv().await.unwrap()).unwrap(),
            serde_json::from_str(&out_rx.recv().await.unwrap()).unwrap(),
        );
        let all = tokio::time::timeout(Duration::from_secs(5), async {
            for i in 0..1000 {
                t.deliver(&log(a.id, &format!("{i}"))).await;
            }
        });
        assert!(all.await.is_ok(), "1000 frames for a reader that never reads: delivered without waiting");
        let cancel: Request = serde_json::from_str(&out_rx.recv().await.unwrap()).unwrap();
        assert_eq!(cancel, Request { id: a.id, op: Op::Cancel }, "beyond the window: the stream is dropped");
        // The other stream flows, granting credit as its reader takes frames.
        for i in 0..STREAM_WINDOW {
            t.deliver(&log(b.id, &format!("{i}"))).await;
        }
        for _ in 0..STREAM_WINDOW {
            assert!(matches!(other.next().await, Some(Answer::Log(_))));
        }
        let credit: Request = serde_json::from_str(&out_rx.recv().await.unwrap()).unwrap();
        assert_eq!(credit, Request { id: b.id, op: Op::Credit { frames: STREAM_WINDOW / 2 } });
        drop(stalled);
    }

    fn reply(id: u64, answer: Answer) -> String {
        serde_json::to_string(&Reply { id, answer }).unwrap()
    }

    /// A session's input goes down within the agent's window (a terminal pasted into never
    /// floods the node); its output comes up in order and ends with the exit code.
    #[tokio::test]
    async fn a_session_sends_input_within_its_window() {
        let (out_tx, mut out_rx) = mpsc::channel(256);
        let t = Arc::new(Tunnel::new(out_tx, 1));
        let spec =
            SessionSpec { argv: vec!["sh".into()], tty: true, stdin: true, cols: 80, rows: 24, ..Default::default() };
        let answers = t.request(Op::Session { instance: "x".into(), spec }).unwrap();
        let start: Request = serde_json::from_str(&out_rx.recv().await.unwrap()).unwrap();
        let (in_tx, in_rx) = mpsc::channel(256);
        let (o_tx, mut o_rx) = mpsc::channel(8);
        tokio::spawn(relay_session(answers, in_rx, o_tx));
        for i in 0..100u8 {
            in_tx.send(SessionInput::Data(vec![i])).await.unwrap();
        }
        let mut sent = vec![];
        while let Ok(Some(f)) = tokio::time::timeout(Duration::from_millis(300), out_rx.recv()).await {
            sent.push(serde_json::from_str::<Request>(&f).unwrap());
        }
        assert_eq!(sent.len(), INPUT_WINDOW as usize, "no more than the window before the agent takes some");
        assert_eq!(sent[0], Request { id: start.id, op: Op::Input { data: vec![0] } });
        t.deliver(&reply(start.id, Answer::Took { frames: 16 })).await;
        let mut more = 0;
        while let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(300), out_rx.recv()).await {
            more += 1;
        }
        assert_eq!(more, 16, "as many more as the agent took");
        t.deliver(&reply(start.id, Answer::Data { stream: "stdout".into(), data: b"hi".to_vec() })).await;
        t.deliver(&reply(start.id, Answer::Data { stream: "stderr".into(), data: vec![0xff] })).await;
        t.deliver(&reply(start.id, Answer::Exec(ExecResult { code: 3, stdout: String::new(), stderr: String::new() })))
            .await;
        assert_eq!(o_rx.recv().await, Some(SessionOutput::Stdout(b"hi".to_vec())));
        assert_eq!(o_rx.recv().await, Some(SessionOutput::Stderr(vec![0xff])), "bytes, not text");
        assert_eq!(o_rx.recv().await, Some(SessionOutput::Exit(3)));
        assert_eq!(o_rx.recv().await, None);
    }

    #[tokio::test]
    async fn answers_reach_their_request_and_dropping_cancels() {
        let (out_tx, mut out_rx) = mpsc::channel(16);
        let t = Arc::new(Tunnel::new(out_tx, 1));
        let mut a = t.request(Op::Logs { instance: "x".into(), tail: None, follow: true }).unwrap();
        let sent: Request = serde_json::from_str(&out_rx.recv().await.unwrap()).unwrap();
        t.deliver(
            &serde_json::to_string(&Reply {
                id: sent.id,
                answer: Answer::Log(LogLine { time: "t".into(), stream: "stdout".into(), log: "hi\n".into() }),
            })
            .unwrap(),
        )
        .await;
        assert!(matches!(a.next().await, Some(Answer::Log(l)) if l.log == "hi\n"));
        drop(a);
        let cancel: Request = serde_json::from_str(&out_rx.recv().await.unwrap()).unwrap();
        assert_eq!(cancel, Request { id: sent.id, op: Op::Cancel });
    }
}
