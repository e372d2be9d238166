//! A TCP connection carried over one of the hub's WebSocket sessions: `skiff
//! port-forward`'s connections, and the mesh's connections to nodes that cannot be reached
//! directly (the hub relays them over the other node's tunnel, as Tailscale's DERP
//! relays, so neither node needs an inbound port).
//!
//! The hub's side speaks `skiff_model::api`'s exec framing: the instance's bytes come as
//! binary messages tagged stdout, ours go as untagged binary messages, our end of input is
//! an `eof` control, and the end of the session an `ExecEnd` text message.

use futures_util::{SinkExt, StreamExt};
use skiff_model::api::{ExecControl, ExecEnd, EXEC_STDOUT};
use skiff_model::proto::INPUT_CHUNK;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// Carries `conn` over `ws` both ways until either side ends; the session's error, if it
/// ended with one.
pub async fn splice<S, C>(ws: WebSocketStream<S>, conn: C) -> Result<(), String>
where
    S: AsyncRead + AsyncWrite + Unpin,
    C: AsyncRead + AsyncWrite + Unpin,
{
    let (mut to_hub, mut from_hub) = ws.split();
    let (mut rd, mut wr) = tokio::io::split(conn);
    let up = async move {
        let mut buf = vec![0u8; INPUT_CHUNK];
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => {
                    let eof = serde_json::to_string(&ExecControl::Eof).unwrap_or_default();
                    let _ = to_hub.send(Message::Text(eof.into())).await;
                    // Kept open: the answer may still come (the instance closes first).
                    std::future::pending::<()>().await;
                }
                Ok(n) => {
                    if to_hub.send(Message::Binary(buf[..n].to_vec().into())).await.is_err() {
                        return;
                    }
                }
            }
        }
    };
    let down = async move {
        while let Some(m) = from_hub.next().await {
            match m.map_err(|e| e.to_string())? {
                Message::Binary(b) => {
                    if let Some((&EXEC_STDOUT, data)) = b.split_first() {
                        wr.write_all(data).await.map_err(|e| e.to_string())?;
                    }
                }
                Message::Text(t) => {
                    let end: ExecEnd = serde_json::from_str(t.as_str()).map_err(|e| e.to_string())?;
                    let _ = wr.shutdown().await;
                    return match end.error {
                        Some(e) => Err(e),
                        None => Ok(()),
                    };
                }
                Message::Close(_) => break,
                _ => {}
            }
        }
        let _ = wr.shutdown().await;
        Ok(())
    };
    tokio::select! {
        r = down => r,
        () = up => Ok(()),
    }
}
