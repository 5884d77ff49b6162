//! `GET /v1/watch`: the NDJSON stream of the table, one [`WatchEvent`] per line.
//!
//! A watcher gets a snapshot, then every change in index order, and a `ping` after each quiet
//! [`Config::watch_ping`](crate::config::Config::watch_ping). Each watcher has its own forwarder
//! task that moves lines from the registry's feed into the watcher's bounded queue without ever
//! waiting on the watcher: a watcher whose queue overflows (in lines or bytes) is disconnected,
//! so a slow or stalled reader can neither hold up the others nor make the directory's memory
//! grow; it reconnects and gets a fresh snapshot. On shutdown every stream ends cleanly.
//!
//! [`WatchEvent`]: baker_client::model::WatchEvent

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use axum::body::Body;
use baker_client::model::WatchEvent;
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::{broadcast, mpsc};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::registry::{Line, Registry};

/// Content type of the stream.
pub const CONTENT_TYPE: &str = "application/x-ndjson";

/// How much a watcher may fall behind.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub ping: std::time::Duration,
    pub backlog_lines: usize,
    pub backlog_bytes: usize,
}

/// A watcher's bounded queue: lines waiting to be written to its connection.
struct Queue {
    tx: mpsc::Sender<Bytes>,
    queued_bytes: Arc<AtomicUsize>,
    max_bytes: usize,
}

impl Queue {
    /// Queues `bytes` without waiting; `false` when the watcher is too far behind.
    fn push(&self, bytes: Bytes) -> bool {
        let len = bytes.len();
        let queued = self.queued_bytes.load(Ordering::Acquire);
        // One line is always accepted into an empty queue, however large (a big snapshot).
        if queued > 0 && queued + len > self.max_bytes {
            return false;
        }
        self.queued_bytes.fetch_add(len, Ordering::AcqRel);
        match self.tx.try_send(bytes) {
            Ok(()) => true,
            Err(_) => {
                self.queued_bytes.fetch_sub(len, Ordering::AcqRel);
                false
            }
        }
    }
}

/// Opens a watch stream for `peer`: the response body, fed by a forwarder task.
///
/// `connection` closes the watcher's connection outright (used when it falls behind: ending
/// the body would wait for the stalled reader); `shutdown` ends the stream cleanly.
pub fn open(
    registry: &Registry,
    limits: Limits,
    connection: CancellationToken,
    shutdown: CancellationToken,
    peer: String,
) -> Body {
    let (snapshot, feed) = registry.subscribe();
    let (tx, rx) = mpsc::channel(limits.backlog_lines.max(2));
    let queued_bytes = Arc::new(AtomicUsize::new(0));
    let queue = Queue {
        tx,
        queued_bytes: queued_bytes.clone(),
        max_bytes: limits.backlog_bytes,
    };
    let metrics = registry.metrics().clone();
    metrics.watchers.inc();
    tracing::debug!("watcher {peer} connected at index {}", snapshot.index);
    let span = tracing::info_span!("watch", %peer);
    tokio::spawn(
        forward(
            registry.clone(),
            snapshot,
            feed,
            queue,
            limits,
            connection,
            shutdown,
        )
        .instrument(span),
    );
    let sent = metrics.clone();
    let stream = ReceiverStream::new(rx).map(move |bytes| {
        queued_bytes.fetch_sub(bytes.len(), Ordering::AcqRel);
        sent.watch_events.inc();
        Ok::<_, Infallible>(bytes)
    });
    Body::from_stream(stream)
}

async fn forward(
    registry: Registry,
    snapshot: Line,
    mut feed: broadcast::Receiver<Line>,
    queue: Queue,
    limits: Limits,
    connection: CancellationToken,
    shutdown: CancellationToken,
) {
    let metrics = registry.metrics().clone();
    let mut index = snapshot.index;
    let mut ping_at = Instant::now() + limits.ping;
    let mut ok = queue.push(snapshot.bytes);
    while ok {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            _ = queue.tx.closed() => {
                tracing::debug!("watcher went away");
                break;
            }
            line = feed.recv() => match line {
                Ok(line) => {
                    index = line.index;
                    ok = queue.push(line.bytes);
                    tracing::debug!(index, "sent a change to a watcher");
                    ping_at = Instant::now() + limits.ping;
                }
                Err(broadcast::error::RecvError::Lagged(_)) => ok = false,
                Err(broadcast::error::RecvError::Closed) => break,
            },
            _ = tokio::time::sleep_until(ping_at) => {
                ok = queue.push(ping(index));
                ping_at = Instant::now() + limits.ping;
            }
        }
    }
    if !ok {
        tracing::warn!(
            "disconnecting a watcher that fell behind ({} bytes queued); it will get a fresh snapshot when it reconnects",
            queue.queued_bytes.load(Ordering::Acquire)
        );
        metrics.watchers_dropped.inc();
        connection.cancel();
    }
    metrics.watchers.dec();
    // Dropping `queue` ends the body: the stream finishes cleanly if the connection still runs.
}

fn ping(index: u64) -> Bytes {
    // A ping holds one integer: serialization cannot fail.
    let mut line = serde_json::to_vec(&WatchEvent::Ping { index }).expect("ping always serializes");
    line.push(b'\n');
    Bytes::from(line)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;
    use crate::routes::RouteStore;
    use baker_client::model::{InstanceId, ServiceName, Source, ValidSpec};
    use http_body_util::BodyExt;
    use std::time::Duration;

    fn svc(name: &str) -> ServiceName {
        name.parse().unwrap()
    }

    fn iid(id: &str) -> InstanceId {
        id.parse().unwrap()
    }

    fn registry() -> (Registry, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let store = RouteStore::open(dir.path()).unwrap();
        (
            Registry::new(store, Default::default(), Arc::new(Metrics::new()), 64),
            dir,
        )
    }

    fn spec(tags: usize) -> ValidSpec {
        ValidSpec {
            address: "10.0.0.1".parse().unwrap(),
            port: 80,
            version: "1".parse().unwrap(),
            weight: 100,
            tags: (0..tags)
                .map(|i| format!("tag-{i:0>40}").parse().unwrap())
                .collect(),
            ttl_ms: 60_000,
        }
    }

    const LIMITS: Limits = Limits {
        ping: Duration::from_secs(5),
        backlog_lines: 8,
        backlog_bytes: 4096,
    };

    async fn next_event(body: &mut Body) -> WatchEvent {
        let frame = body.frame().await.unwrap().unwrap();
        let data = frame.into_data().unwrap();
        serde_json::from_slice(&data).unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn snapshot_then_events_then_pings() {
        let (r, _dir) = registry();
        r.upsert(&svc("a"), &iid("1"), spec(0), Source::Registrar)
            .unwrap();
        let mut body = open(
            &r,
            LIMITS,
            CancellationToken::new(),
            CancellationToken::new(),
            "test".parse().unwrap(),
        );
        assert!(matches!(
            next_event(&mut body).await,
            WatchEvent::Snapshot { index: 1, .. }
        ));
        r.upsert(&svc("b"), &iid("1"), spec(0), Source::Registrar)
            .unwrap();
        assert!(matches!(
            next_event(&mut body).await,
            WatchEvent::Service { index: 2, .. }
        ));
        let started = Instant::now();
        assert_eq!(next_event(&mut body).await, WatchEvent::Ping { index: 2 });
        assert_eq!(started.elapsed(), Duration::from_secs(5));
        assert_eq!(r.metrics().watchers.get(), 1);
    }

    #[tokio::test]
    async fn a_stalled_watcher_is_cut_off() {
        let (r, _dir) = registry();
        let connection = CancellationToken::new();
        let _body = open(
            &r,
            LIMITS,
            connection.clone(),
            CancellationToken::new(),
            "slow".into(),
        );
        for i in 0..20 {
            r.upsert(&svc("a"), &iid(&i.to_string()), spec(4), Source::Registrar)
                .unwrap();
        }
        tokio::time::timeout(Duration::from_secs(5), connection.cancelled())
            .await
            .expect("the stalled watcher's connection is closed");
        assert_eq!(r.metrics().watchers_dropped.get(), 1);
        tokio::time::timeout(Duration::from_secs(5), async {
            while r.metrics().watchers.get() != 0 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn shutdown_ends_the_stream() {
        let (r, _dir) = registry();
        let shutdown = CancellationToken::new();
        let mut body = open(
            &r,
            LIMITS,
            CancellationToken::new(),
            shutdown.clone(),
            "t".parse().unwrap(),
        );
        assert!(matches!(
            next_event(&mut body).await,
            WatchEvent::Snapshot { .. }
        ));
        shutdown.cancel();
        let end = tokio::time::timeout(Duration::from_secs(5), body.frame())
            .await
            .unwrap();
        assert!(end.is_none());
    }
}
