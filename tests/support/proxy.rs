//! A TCP proxy on loopback for partition tests. `freeze` stops bytes in both directions while
//! every connection stays open (a partition the peers cannot see); `cut_and_thaw` then drops
//! every connection and lets new ones through (the partition heals, old connections are dead).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{AbortHandle, JoinHandle};

pub struct Proxy {
    pub port: u16,
    frozen: watch::Sender<bool>,
    connections: Arc<Mutex<Vec<AbortHandle>>>,
    accept: JoinHandle<()>,
}

impl Proxy {
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (frozen, _) = watch::channel(false);
        let connections: Arc<Mutex<Vec<AbortHandle>>> = Arc::default();
        let accept = tokio::spawn({
            let (frozen, connections) = (frozen.clone(), connections.clone());
            async move {
                while let Ok((client, _)) = listener.accept().await {
                    let Ok(server) = TcpStream::connect(upstream).await else { continue };
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    let (f1, f2) = (frozen.subscribe(), frozen.subscribe());
                    let task = tokio::spawn(async move {
                        tokio::join!(pump(cr, sw, f1), pump(sr, cw, f2));
                    });
                    connections.lock().unwrap().push(task.abort_handle());
                }
            }
        });
        Self { port, frozen, connections, accept }
    }

    pub fn freeze(&self) {
        self.frozen.send_replace(true);
    }

    /// Drops every connection (frozen or not) and lets bytes flow again.
    pub fn cut_and_thaw(&self) {
        for c in self.connections.lock().unwrap().drain(..) {
            c.abort();
        }
        self.frozen.send_replace(false);
    }
}

/// Copies one direction, holding each chunk while frozen.
async fn pump(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, mut frozen: watch::Receiver<bool>) {
    let mut buf = vec![0u8; 16 * 1024];
    while let Ok(n) = from.read(&mut buf).await {
        if frozen.wait_for(|f| !*f).await.is_err() {
            return;
        }
        if n == 0 || to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        for c in self.connections.lock().unwrap().drain(..) {
            c.abort();
        }
    }
}
