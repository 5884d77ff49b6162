//! The accept loop: a bounded number of HTTP/1.1 connections, each with a header read
//! timeout, each closable on its own (a watcher that falls behind), all drained on shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::Request;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

/// Handed to every request as an extension: who is calling, and a way to close the connection.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    /// Cancelling closes the connection at once, whatever it is doing.
    pub close: CancellationToken,
}

/// Connection limits.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Open connections at most; more wait in the kernel's accept queue.
    pub max_connections: usize,
    /// Time a client has to send a request's headers.
    pub header_timeout: Duration,
    /// Time connections get to finish after shutdown begins.
    pub grace: Duration,
}

/// Serves `app` on `listener` until `shutdown` is cancelled, then drains the connections
/// (in-flight requests finish, watch streams end) for at most `limits.grace`, and returns.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    shutdown: CancellationToken,
) {
    let tracker = TaskTracker::new();
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let mut warned = false;
    loop {
        if slots.available_permits() == 0 && !warned {
            tracing::warn!(
                "{} connections open, the limit: new ones wait until one closes",
                limits.max_connections
            );
            warned = true;
        }
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            permit = slots.clone().acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Typically out of file descriptors: wait a little for some to close.
                    tracing::warn!("accepting a connection failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        if slots.available_permits() > 0 {
            warned = false;
        }
        tracker.spawn(connection(
            stream,
            peer,
            app.clone(),
            limits,
            shutdown.clone(),
            permit,
        ));
    }
    drop(listener);
    tracker.close();
    tracker.wait().await;
}

async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    app: Router,
    limits: Limits,
    shutdown: CancellationToken,
    _slot: OwnedSemaphorePermit,
) {
    let _ = stream.set_nodelay(true);
    let close = CancellationToken::new();
    let info = ConnInfo {
        peer,
        close: close.clone(),
    };
    let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
        req.extensions_mut().insert(info.clone());
        app.clone().oneshot(req)
    });
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .keep_alive(true);
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    tokio::select! {
        ended = conn.as_mut() => {
            if let Err(e) = ended {
                tracing::debug!("connection from {peer} ended: {e}");
            }
        }
        _ = close.cancelled() => tracing::debug!("closed the connection from {peer}"),
        _ = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = close.cancelled() => {}
                _ = tokio::time::sleep(limits.grace) => {
                    tracing::debug!("closed the connection from {peer}: shutdown grace period over");
                }
            }
        }
    }
}
