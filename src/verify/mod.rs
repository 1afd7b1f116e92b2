//! The verification service (design §7): an index fed by a watch, a pure decision, and the HTTP
//! endpoints, served over rustls (HTTP/1.1 and HTTP/2) or plain HTTP for local use.

pub mod decision;
pub mod http;
pub mod index;
pub mod last_used;
pub mod leak_report;
pub mod leaks;
pub mod limiter;
pub mod tls;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::FutureExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::ServerConfig;
use tracing::{debug, info};

use self::http::{App, Body, CallFuture};

/// How long a connection that has not sent a request yet may take to send one once the listener
/// has closed (it connected just before).
const FIRST_REQUEST_GRACE: Duration = Duration::from_secs(1);

/// The HTTP settings of every connection `serve` answers (the benchmark's baseline uses them
/// too): a request's headers within 10 s, bounded buffers and HTTP/2 limits.
pub fn connection_builder() -> Builder<TokioExecutor> {
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(10))
        .max_buf_size(64 * 1024);
    builder.http2().max_header_list_size(32 * 1024).max_concurrent_streams(256);
    builder
}

/// Set on SIGTERM, before the listener closes. While it is set, /readyz answers 503 and every
/// HTTP/1.1 answer carries `Connection: close`: a client then ends its keep-alive connection
/// itself, after an answer, instead of the server closing it idle at shutdown just as the client
/// sends a request on it (the client sees EOF, and a POST is not retried). HTTP/2 needs nothing
/// here: its connections get a GOAWAY when the listener closes, which clients retry behind.
pub type Draining = Arc<AtomicBool>;

/// One connection's service: `app` for requests from `peer`.
struct Connection {
    app: App,
    peer: SocketAddr,
    /// Told when a request arrives (see `serve`).
    arrived: Arc<tokio::sync::Notify>,
    draining: Draining,
}

type Finish = fn(hyper::Response<Body>) -> Result<hyper::Response<Body>, Infallible>;

/// The answer with `Connection: close` (hyper then closes the connection once it is written).
fn last_on_connection(mut resp: hyper::Response<Body>) -> hyper::Response<Body> {
    resp.headers_mut().insert(hyper::header::CONNECTION, hyper::header::HeaderValue::from_static("close"));
    resp
}

impl hyper::service::Service<hyper::Request<Incoming>> for Connection {
    type Response = hyper::Response<Body>;
    type Error = Infallible;
    type Future = futures::future::Map<CallFuture, Finish>;

    fn call(&self, req: hyper::Request<Incoming>) -> Self::Future {
        self.arrived.notify_one();
        let finish: Finish =
            if req.version() < hyper::Version::HTTP_2 && self.draining.load(Ordering::Relaxed) {
                |resp| Ok(last_on_connection(resp))
            } else {
                Ok
            };
        self.app.call(req, self.peer).map(finish)
    }
}

/// Serves `app` on `listener` until `shutdown` resolves: TLS when `tls` is given. Then no new
/// connection is accepted, requests in flight are answered (keep-alive connections close after
/// their current request) and this returns once every connection has ended. While `draining` is
/// set, HTTP/1.1 connections close after each answer (see [`Draining`]).
pub async fn serve(
    listener: TcpListener,
    app: impl Into<App>,
    tls: Option<Arc<ServerConfig>>,
    draining: Draining,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = app.into();
    let addr = listener.local_addr()?;
    if tls.is_some() {
        info!(%addr, "serving HTTPS (HTTP/1.1 and HTTP/2)");
    } else {
        info!(%addr, "serving plain HTTP");
    }
    let acceptor = tls.map(TlsAcceptor::from);
    let (closing_tx, closing) = tokio::sync::watch::channel(false);
    let mut connections = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => { debug!(error = %e, "accept failed"); continue; }
            },
            () = &mut shutdown => break,
            // Reap finished connections so the set stays small.
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
        };
        let acceptor = acceptor.clone();
        let app = app.clone();
        let closing = closing.clone();
        let draining = draining.clone();
        connections.spawn(async move {
            // Answers go out whole, in one write: no reason to wait for an ACK before the next.
            let _ = tcp.set_nodelay(true);
            let Some(acceptor) = acceptor else {
                return connection(tcp, app, peer, draining, closing).await;
            };
            // A client that never finishes the handshake does not hold a task forever.
            let Ok(Ok(stream)) = tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await
            else {
                return;
            };
            connection(stream, app, peer, draining, closing).await;
        });
    }
    drop(listener);
    info!(%addr, open = connections.len(), "no longer accepting connections; finishing requests in flight");
    let _ = closing_tx.send(true);
    while connections.join_next().await.is_some() {}
    Ok(())
}

/// Answers the requests of one connection until it ends, or until `closing` is set and the
/// request in flight (if any) is answered.
async fn connection<S>(
    stream: S,
    app: App,
    peer: SocketAddr,
    draining: Draining,
    mut closing: tokio::sync::watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // A connection made just before the listener closed gets a moment for its first request
    // instead of being closed as idle.
    let first_request = Arc::new(tokio::sync::Notify::new());
    let service = Connection { app, peer, arrived: first_request.clone(), draining };
    let builder = connection_builder();
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    let result = tokio::select! {
        // Polled first: a request that has already arrived is read before a shutdown can treat
        // the connection as idle.
        biased;
        r = conn.as_mut() => r,
        () = async { drop(closing.wait_for(|c| *c).await); } => {
            tokio::select! {
                r = conn.as_mut() => r,
                () = async {
                    tokio::select! {
                        () = first_request.notified() => {},
                        () = tokio::time::sleep(FIRST_REQUEST_GRACE) => {},
                    }
                } => {
                    // Finish the request in flight (HTTP/2: GOAWAY, open streams complete).
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            }
        }
    };
    if let Err(e) = result {
        debug!(error = %e, %peer, "connection ended with an error");
    }
}
