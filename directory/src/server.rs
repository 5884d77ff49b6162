//! The accept loop: a bounded number of HTTP/1.1 connections, each with a header read
//! timeout, each closable on its own (a watcher that falls behind), all drained on shutdown.
//!
//! Watch streams live for hours, other requests for milliseconds, so they do not share slots
//! equally: every connection takes one of `max_connections` slots, and a connection that turns
//! into a watch stream also takes one of `max_watches` (fewer), which it holds as long as the
//! stream. However many watchers connect, `max_connections - max_watches` slots stay for
//! heartbeats, route changes and `/healthz`. A connection whose writes make no progress for
//! `write_stall` (its client reads nothing: a watcher that never reads its snapshot) is closed,
//! so it does not keep its slot either.
//!
//! An answer may come before the request's body was read (a 401, a 413, a bad name in the
//! path): the rest of that body is then read and discarded, within a bound ([`Drained`]), so
//! that a client still sending it gets the answer instead of a broken pipe.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::server::conn::http1;
use hyper::Request;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use crate::metrics::Metrics;
use crate::tls;

/// Handed to every request as an extension: who is calling, and a way to close the connection.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    /// Cancelling closes the connection at once, whatever it is doing.
    pub close: CancellationToken,
    /// The watch slots: a watch stream holds one for as long as it runs.
    pub watch_slots: Arc<Semaphore>,
    /// How many watch slots there are in all.
    pub max_watches: usize,
}

/// Connection limits.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Open connections at most; more wait in the kernel's accept queue.
    pub max_connections: usize,
    /// Open watch streams at most (fewer than `max_connections`); more are refused with 503.
    pub max_watches: usize,
    /// Time a client has to send a request's headers.
    pub header_timeout: Duration,
    /// Time a connection's writes may make no progress before it is closed.
    pub write_stall: Duration,
    /// Time connections get to finish after shutdown begins.
    pub grace: Duration,
}

/// Serves `app` on `listener` until `shutdown` is cancelled, then drains the connections
/// (in-flight requests finish, watch streams end) for at most `limits.grace`, and returns.
/// With `tls`, every connection is HTTPS (a plain HTTP request is answered 400, telling the
/// client to use `https://`).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    tls: Option<Arc<tls::Reloading>>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let tracker = TaskTracker::new();
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let watch_slots = Arc::new(Semaphore::new(limits.max_watches));
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
        let info = ConnInfo {
            peer,
            close: CancellationToken::new(),
            watch_slots: watch_slots.clone(),
            max_watches: limits.max_watches,
        };
        tracker.spawn(connection(
            stream,
            info,
            app.clone(),
            limits,
            tls.as_ref().map(|t| t.acceptor()),
            metrics.clone(),
            shutdown.clone(),
            permit,
        ));
    }
    drop(listener);
    tracker.close();
    tracker.wait().await;
}

#[allow(clippy::too_many_arguments)]
async fn connection(
    stream: TcpStream,
    info: ConnInfo,
    app: Router,
    limits: Limits,
    tls: Option<tokio_rustls::TlsAcceptor>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    _slot: OwnedSemaphorePermit,
) {
    let _ = stream.set_nodelay(true);
    let peer = info.peer;
    let stream = Watched::new(stream);
    let writes = stream.writes.clone();
    let Some(acceptor) = tls else {
        return http(stream, writes, info, app, limits, metrics, shutdown).await;
    };
    // The handshake shares the request headers' deadline: a client that connects and sends
    // nothing does not keep its slot.
    let handshake = async {
        if !starts_with_handshake(&stream.io).await? {
            plain_http_refused(stream).await;
            return Ok(None);
        }
        acceptor.accept(stream).await.map(Some)
    };
    let stream = tokio::select! {
        _ = shutdown.cancelled() => return,
        done = tokio::time::timeout(limits.header_timeout, handshake) => match done {
            Ok(Ok(Some(s))) => s,
            Ok(Ok(None)) => return,
            Ok(Err(e)) => {
                metrics.tls_handshakes_failed.inc();
                tracing::debug!("the TLS handshake with {peer} failed: {e}");
                return;
            }
            Err(_) => {
                metrics.tls_handshakes_failed.inc();
                tracing::debug!("the TLS handshake with {peer} took too long");
                return;
            }
        },
    };
    http(stream, writes, info, app, limits, metrics, shutdown).await
}

/// Whether the client's first byte opens a TLS handshake (a record of type 22), without
/// consuming it.
async fn starts_with_handshake(stream: &TcpStream) -> io::Result<bool> {
    let mut first = [0u8; 1];
    let n = stream.peek(&mut first).await?;
    Ok(n == 1 && first[0] == 0x16)
}

/// Answers a plain HTTP request sent to the HTTPS port in words the client can show, and
/// closes the connection (after reading what the client sent, so that the close is not a
/// reset that loses the answer).
async fn plain_http_refused(mut stream: Watched) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const BODY: &str = "{\"error\":\"this directory serves HTTPS only: use an https:// URL for it \
                        (BAKER_DIRECTORY or --directory)\"}";
    let answer = format!(
        "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
         connection: close\r\n\r\n{BODY}",
        BODY.len()
    );
    let mut buf = [0u8; 4096];
    let _ = tokio::time::timeout(Duration::from_millis(100), stream.read(&mut buf)).await;
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        stream.write_all(answer.as_bytes()).await?;
        stream.shutdown().await?;
        // Until the client closes its side: what it still sends is read and dropped.
        while stream.read(&mut buf).await? > 0 {}
        io::Result::Ok(())
    })
    .await;
}

/// Serves HTTP/1.1 on `stream` (plain, or TLS over a [`Watched`] connection) until it ends.
async fn http<S>(
    stream: S,
    writes: Arc<Writes>,
    info: ConnInfo,
    app: Router,
    limits: Limits,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (peer, close) = (info.peer, info.close.clone());
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let mut req = req.map(Drained::new);
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
        _ = writes.stalled(limits.write_stall) => {
            metrics.connections_stalled.inc();
            tracing::info!(
                %peer,
                "closed a connection whose client read nothing for {:?}",
                limits.write_stall
            );
        }
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

/// File descriptors the directory needs besides its connections (listener, data files,
/// Docker, logs), with room to spare.
const SPARE_FILES: u64 = 64;

/// Raises the soft limit on open files to the hard limit, as every connection is a file and
/// the usual soft default (1024) is far below the default `max_connections`; when even the
/// hard limit leaves fewer files than `max_connections` need, lowers `max_connections` (and
/// `max_watches` with it, to half of them at most) to what the limit holds and says so, so
/// that connections past the limit wait in the accept queue for a slot, and refused watches
/// give theirs back, instead of failing to be accepted (`EMFILE`) with registrations among
/// them. Returns the limit found, `None` when it could not be read.
pub fn fit_open_files(max_connections: &mut usize, max_watches: &mut usize) -> Option<u64> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok(limits) => limits,
        Err(e) => {
            tracing::warn!(cause = %e, "cannot read the open-file limit");
            return None;
        }
    };
    let limit = if soft < hard {
        match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => hard,
            Err(e) => {
                tracing::warn!(cause = %e, soft, hard, "cannot raise the open-file limit");
                soft
            }
        }
    } else {
        soft
    };
    let (connections, watches) = fitted(limit, *max_connections, *max_watches);
    if connections < *max_connections {
        tracing::warn!(
            "the open-file limit is {limit}: BAKER_MAX_CONNECTIONS lowered from {} to \
             {connections} and BAKER_MAX_WATCHES from {} to {watches}, so that connections past \
             them wait for a slot instead of failing; raise the limit (ulimit -n, docker run \
             --ulimit nofile=N) to serve more",
            *max_connections,
            *max_watches
        );
        (*max_connections, *max_watches) = (connections, watches);
    } else {
        tracing::debug!(limit, "open-file limit");
    }
    Some(limit)
}

/// The connection and watch caps that an open-file limit of `limit` holds: `max_connections`
/// less [`SPARE_FILES`] at most (and 16 at least), and half of those for watches at most.
fn fitted(limit: u64, max_connections: usize, max_watches: usize) -> (usize, usize) {
    let room = usize::try_from(limit.saturating_sub(SPARE_FILES))
        .unwrap_or(usize::MAX)
        .max(16);
    if room >= max_connections {
        return (max_connections, max_watches);
    }
    (room, max_watches.min(room / 2))
}

/// When a connection's writes were last blocked without progress.
#[derive(Debug)]
struct Writes {
    start: Instant,
    /// Milliseconds from `start` to when the socket last refused a write, plus one; 0 while
    /// writes go through.
    blocked_at: AtomicU64,
}

impl Writes {
    fn blocked(&self) {
        if self.blocked_at.load(Ordering::Relaxed) == 0 {
            let at = self.start.elapsed().as_millis() as u64 + 1;
            self.blocked_at.store(at, Ordering::Relaxed);
        }
    }

    fn progressed(&self) {
        self.blocked_at.store(0, Ordering::Relaxed);
    }

    /// How long writes have been blocked without progress, if they are.
    fn blocked_for(&self) -> Option<Duration> {
        match self.blocked_at.load(Ordering::Relaxed) {
            0 => None,
            at => Some(
                self.start
                    .elapsed()
                    .saturating_sub(Duration::from_millis(at - 1)),
            ),
        }
    }

    /// Returns once writes have been blocked for `limit` without any progress.
    async fn stalled(&self, limit: Duration) {
        let tick = (limit / 4).max(Duration::from_millis(10));
        loop {
            tokio::time::sleep(tick).await;
            if self.blocked_for().is_some_and(|d| d >= limit) {
                return;
            }
        }
    }
}

/// A connection's socket, noting when the peer stops taking what is written.
struct Watched {
    io: TcpStream,
    writes: Arc<Writes>,
}

impl Watched {
    fn new(io: TcpStream) -> Watched {
        Watched {
            io,
            writes: Arc::new(Writes {
                start: Instant::now(),
                blocked_at: AtomicU64::new(0),
            }),
        }
    }

    fn note<T>(&self, polled: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        match &polled {
            Poll::Pending => self.writes.blocked(),
            Poll::Ready(_) => self.writes.progressed(),
        }
        polled
    }
}

impl AsyncRead for Watched {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_write(cx, buf);
        this.note(polled)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.note(polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// Most of a request body that was answered before it was read, read to be discarded.
pub const DRAIN_BYTES: u64 = 8 << 20;
/// Longest time spent reading a request body that was answered before it was read.
pub const DRAIN_TIME: Duration = Duration::from_secs(10);
/// Longest wait for more of such a body: a client that sends nothing for this long is not
/// still sending (it may be the slow client a 408 answered), and its connection closes.
pub const DRAIN_IDLE: Duration = Duration::from_secs(2);

/// A request's body that, dropped before its end (the answer came first: a 401, a 413, a bad
/// name in the path), is read to its end in the background and discarded, up to
/// [`DRAIN_BYTES`] within [`DRAIN_TIME`], as long as more comes within [`DRAIN_IDLE`].
///
/// Without it, hyper closes a connection whose request body was not read, and the kernel resets
/// a connection closed with data it never read: a client still sending the body fails to
/// write, and most clients (reqwest, hence Baker's own CLI, registrar and ambassador) report a
/// broken pipe instead of the status and the JSON error. Read to its end, the body leaves the
/// connection clean: the client finishes sending, reads the answer, and may keep the
/// connection. A body declared larger than the bound, or one that goes on past it, is not
/// worth the wait: the connection closes as before.
pub struct Drained {
    body: Option<Incoming>,
    /// The body ended (or failed) while it was read.
    ended: bool,
}

impl Drained {
    fn new(body: Incoming) -> Drained {
        Drained {
            body: Some(body),
            ended: false,
        }
    }
}

impl Body for Drained {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        let Some(body) = this.body.as_mut() else {
            return Poll::Ready(None);
        };
        let polled = Pin::new(body).poll_frame(cx);
        if matches!(polled, Poll::Ready(None | Some(Err(_)))) {
            this.ended = true;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.body.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.body
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint)
    }
}

impl Drop for Drained {
    fn drop(&mut self) {
        let Some(body) = self.body.take() else {
            return;
        };
        if self.ended || body.is_end_stream() || body.size_hint().lower() > DRAIN_BYTES {
            return;
        }
        // Dropped by a handler or a layer, always on the runtime; without one, hyper closes.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(discard(body));
        }
    }
}

/// Reads `body` to its end, up to [`DRAIN_BYTES`] within [`DRAIN_TIME`], each part within
/// [`DRAIN_IDLE`]; dropping it then lets hyper go on with the connection (or close it, when
/// the end was not reached).
async fn discard(mut body: Incoming) {
    use http_body_util::BodyExt;
    let mut read = 0u64;
    let reading = async {
        loop {
            match tokio::time::timeout(DRAIN_IDLE, body.frame()).await {
                Ok(Some(Ok(frame))) => {
                    read += frame.data_ref().map_or(0, |d| d.len() as u64);
                    if read > DRAIN_BYTES {
                        return false;
                    }
                }
                Ok(None) => return true,
                Ok(Some(Err(_))) | Err(_) => return false,
            }
        }
    };
    let ended = tokio::time::timeout(DRAIN_TIME, reading).await == Ok(true);
    if !ended {
        tracing::debug!(
            read,
            "closing a connection whose rejected request body did not end"
        );
    }
}

/// A response body that holds a slot (a watch slot) until the body is dropped.
pub struct Holding<B> {
    body: B,
    _slot: Option<OwnedSemaphorePermit>,
}

impl<B> Holding<B> {
    pub fn new(body: B, slot: Option<OwnedSemaphorePermit>) -> Holding<B> {
        Holding { body, _slot: slot }
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for Holding<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::get;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const BIG: usize = 64 << 20;

    #[test]
    fn the_caps_fit_the_open_file_limit() {
        // Room for the defaults: unchanged.
        assert_eq!(fitted(1 << 20, 8192, 4096), (8192, 4096));
        assert_eq!(fitted(8192 + SPARE_FILES, 8192, 4096), (8192, 4096));
        // A container's usual 1024: the spare files kept, watches at half.
        assert_eq!(fitted(1024, 8192, 4096), (960, 480));
        // Fewer watches asked for than half: kept.
        assert_eq!(fitted(1024, 8192, 100), (960, 100));
        // A tiny limit still leaves a few connections.
        assert_eq!(fitted(10, 8192, 4096), (16, 8));
    }

    #[tokio::test]
    async fn a_client_that_reads_nothing_is_closed_after_the_write_stall() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = Router::new().route("/big", get(|| async { vec![b'x'; BIG] }));
        let limits = Limits {
            max_connections: 4,
            max_watches: 2,
            header_timeout: Duration::from_secs(5),
            write_stall: Duration::from_millis(300),
            grace: Duration::from_millis(100),
        };
        let metrics = Arc::new(Metrics::new());
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(serve(
            listener,
            app,
            limits,
            None,
            metrics.clone(),
            shutdown.clone(),
        ));
        let mut client = TcpStream::connect(addr).await.unwrap();
        client
            .write_all(b"GET /big HTTP/1.1\r\nHost: d\r\n\r\n")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(metrics.connections_stalled.get(), 1);
        // What the kernel buffered comes, then the end: far less than the whole answer.
        let mut got = 0;
        let mut buf = vec![0; 1 << 16];
        let read_all = async {
            loop {
                match client.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => got += n,
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(5), read_all)
            .await
            .expect("the connection is closed");
        assert!(got < BIG / 2, "got {got} bytes");
        shutdown.cancel();
        server.await.unwrap();
    }
}
