//! Serving a `wasi:http/proxy` component over HTTP/1.1, as `wasmtime serve` and the
//! serverless runtimes do: every request gets a fresh instance in its own store (so no
//! state leaks between requests), built from the pre-instantiated component in
//! microseconds. With `pool: N` the instances come from the pooling allocator's N
//! pre-reserved slots and at most N requests run at once; the rest wait their turn.
//!
//! Per request: the memory limit applies to its instance (over it: 500, and the log
//! says why), the CPU share to the whole process, and `timeout` to the request (504 if
//! the handler has not answered by then; a response body still streaming is cut).
//! A trap or a handler that never answers is a 500 and a line in the instance's log;
//! the server goes on.
//!
//! The listener faces whatever reaches the published port: at most [`MAX_CONNECTIONS`]
//! connections are open at once (more are closed at once), a request's headers must come
//! within [`HEADER_TIMEOUT`] (also between requests on a kept-alive connection), and at
//! most [`DEFAULT_CONCURRENCY`] requests run at once without a `pool` (each is an
//! instance with its own memory budget).

use crate::check::P2State;
use crate::limits::CpuShare;
use crate::run::{human, outcome, p2_state};
use crate::{Outcome, Output, Spec};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;
use wasmtime_wasi_http::io::TokioIo;
use wasmtime_wasi_http::p2::bindings::http::types::Scheme;
use wasmtime_wasi_http::p2::bindings::ProxyPre;
use wasmtime_wasi_http::p2::body::HyperOutgoingBody;
use wasmtime_wasi_http::WasiHttpView;

/// Open connections per instance.
pub const MAX_CONNECTIONS: usize = 1024;
/// How long a request's headers may take (and a kept-alive connection may idle).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Requests handled at once when no pool says otherwise.
pub const DEFAULT_CONCURRENCY: usize = 64;

struct Server {
    pre: ProxyPre<P2State>,
    spec: Spec,
    cpu: Option<CpuShare>,
    timeout: Option<Duration>,
    slots: Option<Semaphore>,
    stdout: Output,
    stderr: Output,
}

type Response = hyper::Response<HyperOutgoingBody>;

fn plain(status: u16, text: &str) -> Response {
    let body = Full::new(Bytes::from(format!("{text}\n"))).map_err(|never: Infallible| match never {}).boxed_unsync();
    let mut r = hyper::Response::new(body);
    *r.status_mut() = hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
    r
}

pub(crate) async fn serve(
    pre: ProxyPre<P2State>,
    listeners: Vec<std::net::TcpListener>,
    spec: Spec,
    cpu: Option<CpuShare>,
    stdout: Output,
    stderr: Output,
) -> Outcome {
    let server = Arc::new(Server {
        pre,
        cpu,
        timeout: spec.timeout_ms.map(Duration::from_millis),
        slots: Some(Semaphore::new(spec.pool.map(|n| n as usize).unwrap_or(DEFAULT_CONCURRENCY))),
        spec,
        stdout,
        stderr,
    });
    let mut accepts = tokio::task::JoinSet::new();
    let open = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    for l in listeners {
        let l = match tokio::net::TcpListener::from_std(l) {
            Ok(l) => l,
            Err(e) => return Outcome { code: 1, oom: false, message: Some(format!("listening: {e}")) },
        };
        let (server, open) = (Arc::clone(&server), Arc::clone(&open));
        accepts.spawn(async move {
            loop {
                let stream = match l.accept().await {
                    Ok((s, _)) => s,
                    // Out of descriptors and the like: pass, rather than spin.
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let Ok(slot) = Arc::clone(&open).try_acquire_owned() else {
                    drop(stream);
                    continue;
                };
                let server = Arc::clone(&server);
                tokio::spawn(async move {
                    let _slot = slot;
                    let service = hyper::service::service_fn(move |req| {
                        let server = Arc::clone(&server);
                        async move { Ok::<_, Infallible>(server.handle(req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .keep_alive(true)
                        .timer(hyper_util::rt::TokioTimer::new())
                        .header_read_timeout(HEADER_TIMEOUT)
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
    }
    // The accept loops end only with the process.
    while accepts.join_next().await.is_some() {}
    Outcome { code: 1, oom: false, message: Some("the HTTP listeners closed".into()) }
}

impl Server {
    fn log(&self, line: String) {
        let _ = self.stderr.write_all(format!("{line}\n").as_bytes());
    }

    async fn handle(&self, req: hyper::Request<Incoming>) -> Response {
        let what = format!("{} {}", req.method(), req.uri().path());
        let _slot = match &self.slots {
            Some(s) => s.acquire().await.ok(),
            None => None,
        };
        let state = match p2_state(&self.spec, &self.stdout, &self.stderr, false) {
            Ok(s) => s,
            Err(e) => {
                self.log(format!("{what}: {e}"));
                return plain(500, "internal server error");
            }
        };
        let mut store = crate::limits::store(self.pre.engine(), state, self.cpu.clone(), self.timeout.is_some());
        let (tx, rx) = tokio::sync::oneshot::channel();
        let params = store.data_mut().http().new_incoming_request(Scheme::Http, req).and_then(|req| {
            let out = store.data_mut().http().new_response_outparam(tx)?;
            Ok((req, out))
        });
        let (req, out) = match params {
            Ok(p) => p,
            Err(e) => {
                self.log(format!("{what}: {e:#}"));
                return plain(500, "internal server error");
            }
        };
        let pre = self.pre.clone();
        let timeout = self.timeout;
        // The handler runs in its own task: it may go on writing the body after the
        // response head is sent. The timeout bounds it either way.
        let task = tokio::spawn(async move {
            let call = async {
                let proxy = pre.instantiate_async(&mut store).await?;
                proxy.wasi_http_incoming_handler().call_handle(&mut store, req, out).await.map(|()| 0)
            };
            let r = match timeout {
                Some(t) => {
                    tokio::time::timeout(t, call).await.unwrap_or_else(|_| Err(wasmtime::format_err!("timed out")))
                }
                None => call.await,
            };
            (r, store.data_mut().memory.exceeded.take())
        });
        let answer = async {
            match rx.await {
                Ok(Ok(resp)) => resp,
                Ok(Err(code)) => {
                    self.log(format!("{what}: the handler answered with error {code:?}"));
                    plain(500, "internal server error")
                }
                // The handler ended without setting a response: say why.
                Err(_) => {
                    let why = match task.await {
                        Ok((r, exceeded)) => {
                            let o = outcome(r, exceeded, &self.stderr);
                            o.message.unwrap_or_else(|| format!("exited with code {}", o.code))
                        }
                        Err(e) => e.to_string(),
                    };
                    self.log(format!("{what}: no response: {why}"));
                    plain(500, "internal server error")
                }
            }
        };
        match timeout {
            Some(t) => tokio::time::timeout(t, answer).await.unwrap_or_else(|_| {
                self.log(format!("{what}: no response within {} (wasm.timeout)", human(t)));
                plain(504, "gateway timeout")
            }),
            None => answer.await,
        }
    }
}
