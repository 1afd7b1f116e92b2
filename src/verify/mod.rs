//! The verification service (design §7): an index fed by a watch, a pure decision, and the HTTP
//! endpoints, served over rustls (HTTP/1.1 and HTTP/2) or plain HTTP for local use.

pub mod decision;
pub mod http;
pub mod index;
pub mod last_used;
pub mod limiter;
pub mod tls;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::ServerConfig;
use tower::ServiceExt;
use tracing::{debug, info};

/// How long a connection that has not sent a request yet may take to send one once the listener
/// has closed (it connected just before).
const FIRST_REQUEST_GRACE: Duration = Duration::from_secs(1);

/// Serves `app` on `listener` until `shutdown` resolves: TLS when `tls` is given. Then no new
/// connection is accepted, requests in flight are answered (keep-alive connections close after
/// their current request) and this returns once every connection has ended.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    tls: Option<Arc<ServerConfig>>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let addr = listener.local_addr()?;
    let Some(tls) = tls else {
        info!(%addr, "serving plain HTTP");
        return axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>())
            .with_graceful_shutdown(shutdown)
            .await;
    };
    info!(%addr, "serving HTTPS (HTTP/1.1 and HTTP/2)");
    let acceptor = TlsAcceptor::from(tls);
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
        let mut closing = closing.clone();
        connections.spawn(async move {
            // A client that never finishes the handshake does not hold a task forever.
            let Ok(Ok(stream)) = tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await
            else {
                return;
            };
            // Told when a request arrives: a connection made just before the listener closed
            // gets a moment for its first request instead of being closed as idle.
            let first_request = Arc::new(tokio::sync::Notify::new());
            let arrived = first_request.clone();
            let svc = app.map_request(move |mut req: hyper::Request<hyper::body::Incoming>| {
                req.extensions_mut().insert(ConnectInfo(peer));
                arrived.notify_one();
                req
            });
            let mut builder = Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .max_buf_size(64 * 1024);
            builder.http2().max_header_list_size(32 * 1024).max_concurrent_streams(256);
            let conn = builder.serve_connection(TokioIo::new(stream), TowerToHyperService::new(svc));
            tokio::pin!(conn);
            let result = tokio::select! {
                // Polled first: a request that has already arrived is read before a shutdown
                // can treat the connection as idle.
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
        });
    }
    drop(listener);
    info!(%addr, open = connections.len(), "no longer accepting connections; finishing requests in flight");
    let _ = closing_tx.send(true);
    while connections.join_next().await.is_some() {}
    Ok(())
}
