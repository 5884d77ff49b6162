//! `GET /v1/watch`: the NDJSON stream of the table, one [`WatchEvent`] per line.
//!
//! A watcher gets a snapshot, then every change in index order (of the services it asked for,
//! when filtered), and a `ping` after each quiet
//! [`Config::watch_ping`](crate::config::Config::watch_ping). A v2 watcher gets each change as
//! it was published (one instance, or one service's route) with the index of the previous line
//! of its own stream as `prev`; a v1 watcher gets the service's whole instance list. Each watcher has its own forwarder
//! task that moves lines from the registry's feed into the watcher's bounded queue without ever
//! waiting on the watcher: a watcher whose queue overflows (in lines or bytes) is disconnected,
//! so a slow or stalled reader can neither hold up the others nor make the directory's memory
//! grow; it reconnects and gets a fresh snapshot. On shutdown every stream ends cleanly, and so
//! does a stream that needed a token once that token is no longer in force ([`Grant`]).
//!
//! [`WatchEvent`]: baker_client::model::WatchEvent

use std::collections::BTreeSet;
use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use axum::body::Body;
use baker_client::model::{ServiceName, WatchEvent};
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::feed::RecvError;
use crate::registry::{Registry, Subscription};
use crate::tokens::{Token, Tokens};

/// Content type of the stream.
pub const CONTENT_TYPE: &str = "application/x-ndjson";

/// How much a watcher may fall behind.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub ping: std::time::Duration,
    pub backlog_lines: usize,
    pub backlog_bytes: usize,
}

/// The token a watch needed: the stream ends once the token is no longer in force (taken out
/// of the tokens file, given another secret, or a role that does not read), within a second of
/// the file's change.
pub struct Grant {
    tokens: Arc<Tokens>,
    token: Token,
    reloads: tokio::sync::watch::Receiver<u64>,
}

impl Grant {
    /// The grant of `token`, checked again on every reload of `tokens` from now on.
    pub fn new(tokens: Arc<Tokens>, token: Token) -> Grant {
        let reloads = tokens.reloads();
        Grant {
            tokens,
            token,
            reloads,
        }
    }

    /// Whether the token is in force now (checked once as the watch opens: a reload between
    /// the call's check and the grant would be missed otherwise).
    pub fn holds(&self) -> bool {
        self.tokens.still_reads(&self.token)
    }

    /// Returns once a reload leaves the token no longer in force. Cancel-safe: nothing is
    /// checked but on a reload.
    async fn revoked(&mut self) {
        loop {
            if self.reloads.changed().await.is_err() {
                // The tokens are never read again: the grant holds as long as the stream.
                std::future::pending::<()>().await;
            }
            if !self.holds() {
                return;
            }
        }
    }
}

/// What ends a stream cleanly: the directory's shutdown, or the revocation of the token the
/// watch needed.
struct Ends {
    shutdown: CancellationToken,
    grant: Option<Grant>,
}

/// Waits for `grant` to be revoked; forever without one.
async fn revoked(grant: &mut Option<Grant>) {
    match grant {
        Some(g) => g.revoked().await,
        None => std::future::pending().await,
    }
}

/// What a watcher asked for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Request {
    /// The stream's form: 1 (whole service lists) or 2 (one instance per change).
    pub version: Version,
    /// Only these services (and their routes); all when `None`.
    pub only: Option<BTreeSet<ServiceName>>,
}

/// The stream's form.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Version {
    /// Each instance change as the service's whole new instance list (the default for now,
    /// kept for watchers older than v2).
    #[default]
    V1,
    /// Each instance change as that one instance, with its cause; each line with `prev`.
    V2,
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
/// the body would wait for the stalled reader); `shutdown` ends the stream cleanly, as does
/// the revocation of `grant`, the token the watch needed.
pub fn open(
    registry: &Registry,
    request: Request,
    limits: Limits,
    connection: CancellationToken,
    shutdown: CancellationToken,
    peer: String,
    grant: Option<Grant>,
) -> Body {
    let legacy = request.version == Version::V1;
    let subscription = registry.subscribe(request.only, legacy);
    let (tx, rx) = mpsc::channel(limits.backlog_lines.max(2));
    let queued_bytes = Arc::new(AtomicUsize::new(0));
    let queue = Queue {
        tx,
        queued_bytes: queued_bytes.clone(),
        max_bytes: limits.backlog_bytes,
    };
    let metrics = registry.metrics().clone();
    metrics.watchers.inc();
    tracing::debug!(
        "watcher {peer} connected at index {}",
        subscription.snapshot.index
    );
    let span = tracing::info_span!("watch", %peer);
    tokio::spawn(
        forward(
            registry.clone(),
            subscription,
            legacy,
            queue,
            limits,
            connection,
            Ends { shutdown, grant },
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
    mut subscription: Subscription,
    legacy: bool,
    queue: Queue,
    limits: Limits,
    connection: CancellationToken,
    mut ends: Ends,
) {
    let metrics = registry.metrics().clone();
    // The index of the last line sent: the next line's `prev`, and a ping's index.
    let mut index = subscription.snapshot.index;
    let mut ping_at = Instant::now() + limits.ping;
    let mut ok = queue.push(subscription.snapshot.bytes.clone());
    while ok {
        tokio::select! {
            biased;
            _ = ends.shutdown.cancelled() => break,
            _ = revoked(&mut ends.grant) => {
                let token = ends.grant.as_ref().map_or("", |g| g.token.name.as_str());
                tracing::info!(token, "ending a watch: its token is no longer in force");
                break;
            }
            _ = queue.tx.closed() => {
                tracing::debug!("watcher went away");
                break;
            }
            change = subscription.feed.recv() => match change {
                Ok(change) => {
                    let line = match (legacy, change.legacy()) {
                        (true, Some(line)) => line.clone(),
                        // Subscribed as v1 under the same lock the change was built under:
                        // its v1 line is there.
                        (true, None) => {
                            tracing::error!(index = change.index(), "a change lacks its v1 line");
                            ok = false;
                            continue;
                        }
                        (false, _) => change.line(index),
                    };
                    index = change.index();
                    ok = queue.push(line);
                    tracing::debug!(index, "sent a change to a watcher");
                    ping_at = Instant::now() + limits.ping;
                }
                Err(RecvError::Lagged) => ok = false,
                Err(RecvError::Closed) => break,
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
    use baker_client::model::{InstanceId, ServiceName, ValidSpec};
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
            node: None,
            zone: None,
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
        r.register(&svc("a"), &iid("1"), spec(0)).await.unwrap();
        let mut body = open(
            &r,
            Request::default(),
            LIMITS,
            CancellationToken::new(),
            CancellationToken::new(),
            "test".parse().unwrap(),
            None,
        );
        assert!(matches!(
            next_event(&mut body).await,
            WatchEvent::Snapshot { index: 1, .. }
        ));
        r.register(&svc("b"), &iid("1"), spec(0)).await.unwrap();
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
            Request::default(),
            LIMITS,
            connection.clone(),
            CancellationToken::new(),
            "slow".into(),
            None,
        );
        for i in 0..20 {
            r.register(&svc("a"), &iid(&i.to_string()), spec(4))
                .await
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
            Request::default(),
            LIMITS,
            CancellationToken::new(),
            shutdown.clone(),
            "t".parse().unwrap(),
            None,
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

    #[tokio::test(start_paused = true)]
    async fn v2_sends_one_instance_per_change_with_prev_and_filters() {
        let (r, _dir) = registry();
        r.register(&svc("a"), &iid("1"), spec(0)).await.unwrap();
        let request = Request {
            version: Version::V2,
            only: Some([svc("b")].into()),
        };
        let mut body = open(
            &r,
            request,
            LIMITS,
            CancellationToken::new(),
            CancellationToken::new(),
            "test".into(),
            None,
        );
        match next_event(&mut body).await {
            WatchEvent::Snapshot {
                index, services, ..
            } => assert_eq!((index, services.len()), (1, 0)),
            other => panic!("not a snapshot: {other:?}"),
        }
        r.register(&svc("a"), &iid("2"), spec(0)).await.unwrap();
        r.register(&svc("b"), &iid("1"), spec(0)).await.unwrap();
        r.register(&svc("a"), &iid("3"), spec(0)).await.unwrap();
        r.unregister(&svc("b"), &iid("1")).await.unwrap();
        match next_event(&mut body).await {
            WatchEvent::Upsert {
                index,
                prev,
                instance,
                ..
            } => assert_eq!((index, prev, instance.id.as_str()), (3, 1, "1")),
            other => panic!("not an upsert: {other:?}"),
        }
        match next_event(&mut body).await {
            WatchEvent::Remove { index, prev, .. } => assert_eq!((index, prev), (5, 3)),
            other => panic!("not a removal: {other:?}"),
        }
        assert_eq!(next_event(&mut body).await, WatchEvent::Ping { index: 5 });
    }
}
