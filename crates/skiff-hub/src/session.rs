//! The API's side of an interactive exec (`GET /api/v1/instances/{name}/exec`, a
//! WebSocket): the client's spec starts a [`Session`] on the instance's node (in this
//! process, or through its tunnel), then input and output are carried both ways at once
//! until the command ends. Messages are [`skiff_model::api::ExecControl`]'s.

use crate::node::{NodeLink, Session};
use axum::extract::ws::{Message, WebSocket};
use skiff_model::api::{ExecControl, ExecEnd, EXEC_STDERR, EXEC_STDOUT};
use skiff_model::proto::{SessionInput, SessionOutput, SessionSpec, INPUT_CHUNK};
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

/// How often the client is pinged (it is given up on after three periods of silence).
const PING_EVERY: Duration = Duration::from_secs(20);

/// How long the client has to send its spec.
const SPEC_WAIT: Duration = Duration::from_secs(30);

/// Input read from the client but not yet taken by the session: past this, the client's
/// messages wait in its socket (TCP pushes back), while output keeps flowing.
const PENDING_INPUT: usize = 8;

/// Serves one exec's WebSocket until the command ends or the client leaves (which ends
/// the command).
pub async fn serve(node: Arc<dyn NodeLink>, instance: String, mut socket: WebSocket) {
    let spec = match tokio::time::timeout(SPEC_WAIT, socket.recv()).await {
        Ok(Some(Ok(Message::Text(t)))) => serde_json::from_str::<SessionSpec>(t.as_str())
            .map_err(|e| format!("the exec's spec: {e}"))
            .and_then(|s| s.validate().map(|()| s)),
        Ok(_) => Err("the exec's first message must be its spec (JSON text)".to_string()),
        Err(_) => Err(format!("no exec spec within {SPEC_WAIT:?}")),
    };
    let spec = match spec {
        Ok(s) => s,
        Err(e) => return end(&mut socket, ExecEnd { exit: None, error: Some(e) }).await,
    };
    tracing::info!(%instance, node = %node.name(), tty = spec.tty, stdin = spec.stdin, argv0 = spec.argv.first().map_or("", |a| a.as_str()), attach = spec.attach, "exec");
    match node.session(&instance, spec).await {
        Ok(s) => relay(&instance, s, socket).await,
        Err(e) => end(&mut socket, ExecEnd { exit: None, error: Some(e.to_string()) }).await,
    }
}

/// Serves one port-forward connection's WebSocket: the instance's bytes out as stdout
/// messages, the client's in as binary ones; `eof` shuts the sending side.
pub async fn serve_forward(
    node: Arc<dyn NodeLink>,
    instance: String,
    port: u16,
    protocol: skiff_model::Protocol,
    mut socket: WebSocket,
) {
    tracing::info!(%instance, node = %node.name(), port, ?protocol, "port-forward");
    match node.connect(&instance, port, protocol).await {
        Ok(s) => relay(&instance, s, socket).await,
        Err(e) => end(&mut socket, ExecEnd { exit: None, error: Some(e.to_string()) }).await,
    }
}

/// Carries a session both ways until it ends or the client leaves (which ends it).
async fn relay(instance: &str, session: Session, mut socket: WebSocket) {
    let Session { input, mut output } = session;
    let mut pending: VecDeque<SessionInput> = VecDeque::new();
    // A client whose link died without a word (a laptop shut, a NAT timeout) is noticed by
    // its missing pongs: its command is ended, not left running for ever.
    let mut ping = tokio::time::interval(PING_EVERY);
    let mut last_rx = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = ping.tick() => {
                if pending.len() >= PENDING_INPUT {
                    // Not reading now (the session is not taking input): nothing to judge.
                    last_rx = tokio::time::Instant::now();
                } else if last_rx.elapsed() > PING_EVERY * 3 {
                    tracing::warn!(%instance, "the exec's client went silent; ending its command");
                    return;
                }
                if socket.send(Message::Ping(Vec::new().into())).await.is_err() {
                    return;
                }
            }
            m = socket.recv(), if pending.len() < PENDING_INPUT => match m {
                Some(Ok(Message::Binary(b))) => {
                    last_rx = tokio::time::Instant::now();
                    pending.extend(b.chunks(INPUT_CHUNK).map(|c| SessionInput::Data(c.to_vec())));
                }
                Some(Ok(Message::Text(t))) => {
                    last_rx = tokio::time::Instant::now();
                    match serde_json::from_str::<ExecControl>(t.as_str()) {
                        Ok(ExecControl::Resize { cols, rows }) => pending.push_back(SessionInput::Resize { cols, rows }),
                        Ok(ExecControl::Eof) => pending.push_back(SessionInput::End),
                        Err(e) => {
                            let error = Some(format!("an exec control message: {e}"));
                            return end(&mut socket, ExecEnd { exit: None, error }).await;
                        }
                    }
                }
                Some(Ok(Message::Close(_))) => {
                    // The client left (an attach detaching, say): what it sent before goes
                    // on, for a moment; then dropping `output` ends the command.
                    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), async {
                        for i in pending.drain(..) {
                            if input.send(i).await.is_err() {
                                return;
                            }
                        }
                    })
                    .await;
                    return;
                }
                Some(Err(_)) | None => return,
                Some(Ok(_)) => last_rx = tokio::time::Instant::now(),
            },
            room = input.reserve(), if !pending.is_empty() => match (room, pending.pop_front()) {
                (Ok(room), Some(i)) => room.send(i),
                _ => pending.clear(),
            },
            o = output.recv() => {
                let (stream, data) = match o {
                    Some(SessionOutput::Stdout(d)) => (EXEC_STDOUT, d),
                    Some(SessionOutput::Stderr(d)) => (EXEC_STDERR, d),
                    Some(SessionOutput::Exit(code)) => {
                        return end(&mut socket, ExecEnd { exit: Some(code), error: None }).await;
                    }
                    Some(SessionOutput::Error(e)) => return end(&mut socket, ExecEnd { exit: None, error: Some(e) }).await,
                    None => {
                        let error = Some("the exec ended without an exit code".to_string());
                        return end(&mut socket, ExecEnd { exit: None, error }).await;
                    }
                };
                let mut msg = Vec::with_capacity(data.len() + 1);
                msg.push(stream);
                msg.extend_from_slice(&data);
                if socket.send(Message::Binary(msg.into())).await.is_err() {
                    return;
                }
                // The client took it: alive, though too busy to answer pings (a reader
                // that paused writes nothing back while its output waits).
                last_rx = tokio::time::Instant::now();
            }
        }
    }
}

/// Sends the exec's end and closes the socket.
async fn end(socket: &mut WebSocket, e: ExecEnd) {
    if let Ok(text) = serde_json::to_string(&e) {
        let _ = socket.send(Message::Text(text.into())).await;
    }
    let _ = socket.send(Message::Close(None)).await;
}
