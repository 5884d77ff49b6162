//! The change feed: each [`Change`] published once, delivered to the watchers that care.
//!
//! The registry publishes every change under its table lock, in revision order. Unfiltered
//! watchers (and any other consumer of every change, such as an event history) share one
//! broadcast channel: publishing costs the same whatever their number. A watcher filtered by
//! service is registered under each service it names, and a change is handed only to the
//! watchers of its service: a change to one service costs nothing for watchers of others.
//!
//! A change is serialized at most once for all v2 watchers, outside the table lock, by the
//! first watcher that sends it; each watcher only prefixes its own `prev`. The v1 line (the
//! service's whole instance list) is built, under the lock, only while a v1 watcher is
//! subscribed.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, OnceLock};

use baker_client::change::Change;
use baker_client::model::ServiceName;
use bytes::{BufMut, Bytes, BytesMut};
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;

/// Hands each change of `changes` (from [`Registry::changes`](crate::Registry::changes)) to
/// `each`, until `shutdown` or the end of the feed. A consumer that fell behind misses changes:
/// `lagged` is told how many, and it goes on with the next.
pub async fn consume(
    mut changes: broadcast::Receiver<Arc<Published>>,
    shutdown: &CancellationToken,
    mut each: impl FnMut(&Published),
    mut lagged: impl FnMut(u64),
) {
    loop {
        let published = tokio::select! {
            _ = shutdown.cancelled() => return,
            p = changes.recv() => p,
        };
        match published {
            Ok(p) => each(&p),
            Err(broadcast::error::RecvError::Lagged(n)) => lagged(n),
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

/// One change as published: the change, and its serialized forms.
#[derive(Debug)]
pub struct Published {
    pub change: Change,
    /// The change's JSON, newline included, without `prev`: serialized on first use.
    body: OnceLock<Bytes>,
    /// The v1 line, when a v1 watcher was subscribed as the change happened.
    legacy: Option<Bytes>,
}

impl Published {
    pub fn new(change: Change, legacy: Option<Bytes>) -> Published {
        Published {
            change,
            body: OnceLock::new(),
            legacy,
        }
    }

    /// The revision of the change.
    pub fn index(&self) -> u64 {
        self.change.index()
    }

    /// The v2 line of this change for a stream whose previous line had index `prev`.
    ///
    /// `{"prev":12,` followed by the shared serialization with its opening brace cut: the
    /// change is serialized once, however many watchers send it.
    pub fn line(&self, prev: u64) -> Bytes {
        let body = self.body.get_or_init(|| {
            // A change holds names, numbers and maps of them: serialization cannot fail.
            let mut bytes = serde_json::to_vec(&self.change).expect("changes always serialize");
            bytes.push(b'\n');
            Bytes::from(bytes)
        });
        let prefix = format!("{{\"prev\":{prev},");
        let mut line = BytesMut::with_capacity(prefix.len() + body.len());
        line.put_slice(prefix.as_bytes());
        line.put_slice(&body[1..]);
        line.freeze()
    }

    /// The v1 line of this change, if one was built.
    pub fn legacy(&self) -> Option<&Bytes> {
        self.legacy.as_ref()
    }
}

/// A subscriber's end of the feed.
pub enum Receiver {
    /// Every change.
    All(broadcast::Receiver<Arc<Published>>),
    /// The changes of some services.
    Filtered(mpsc::UnboundedReceiver<Arc<Published>>),
}

/// Why a receiver yields no more changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecvError {
    /// The subscriber fell too far behind and missed changes.
    Lagged,
    /// The feed is gone.
    Closed,
}

impl Receiver {
    /// The next change.
    pub async fn recv(&mut self) -> Result<Arc<Published>, RecvError> {
        match self {
            Receiver::All(rx) => rx.recv().await.map_err(|e| match e {
                broadcast::error::RecvError::Lagged(_) => RecvError::Lagged,
                broadcast::error::RecvError::Closed => RecvError::Closed,
            }),
            Receiver::Filtered(rx) => rx.recv().await.ok_or(RecvError::Closed),
        }
    }

    /// The next change if one is waiting.
    pub fn try_recv(&mut self) -> Option<Arc<Published>> {
        match self {
            Receiver::All(rx) => rx.try_recv().ok(),
            Receiver::Filtered(rx) => rx.try_recv().ok(),
        }
    }
}

/// The filtered subscribers of one service: (subscriber id, its channel).
type Filtered = Vec<(u64, mpsc::UnboundedSender<Arc<Published>>)>;

/// The subscribers. Lives under the registry's table lock.
pub struct Feed {
    all: broadcast::Sender<Arc<Published>>,
    by_service: HashMap<ServiceName, Filtered>,
    next_id: u64,
    /// v1 watchers subscribed.
    legacy: usize,
}

impl Feed {
    /// A feed whose unfiltered subscribers may fall `capacity` changes behind.
    pub fn new(capacity: usize) -> Feed {
        let (all, _) = broadcast::channel(capacity.max(16));
        Feed {
            all,
            by_service: HashMap::new(),
            next_id: 0,
            legacy: 0,
        }
    }

    /// Whether a v1 watcher is subscribed: then changes need their v1 line.
    pub fn wants_legacy(&self) -> bool {
        self.legacy > 0
    }

    /// Hands `published` to every unfiltered subscriber and to those filtered on its service.
    pub fn publish(&mut self, published: Published) {
        let published = Arc::new(published);
        if let Some(subs) = self.by_service.get_mut(published.change.service()) {
            subs.retain(|(_, tx)| tx.send(published.clone()).is_ok());
            if subs.is_empty() {
                self.by_service.remove(published.change.service());
            }
        }
        // No receiver is fine: nobody is watching.
        let _ = self.all.send(published);
    }

    /// Subscribes to the changes of the services in `only` (all when `None`); `legacy` counts
    /// a v1 watcher until [`Feed::unsubscribe`]. Returns the receiver and an id to unsubscribe.
    pub fn subscribe(
        &mut self,
        only: Option<&BTreeSet<ServiceName>>,
        legacy: bool,
    ) -> (u64, Receiver) {
        self.next_id += 1;
        let id = self.next_id;
        if legacy {
            self.legacy += 1;
        }
        let rx = match only {
            None => Receiver::All(self.all.subscribe()),
            Some(services) => {
                let (tx, rx) = mpsc::unbounded_channel();
                for s in services {
                    self.by_service
                        .entry(s.clone())
                        .or_default()
                        .push((id, tx.clone()));
                }
                Receiver::Filtered(rx)
            }
        };
        (id, rx)
    }

    /// Forgets subscriber `id`, subscribed with `only` and `legacy`.
    pub fn unsubscribe(&mut self, id: u64, only: Option<&BTreeSet<ServiceName>>, legacy: bool) {
        if legacy {
            self.legacy = self.legacy.saturating_sub(1);
        }
        for s in only.into_iter().flatten() {
            if let Some(subs) = self.by_service.get_mut(s) {
                subs.retain(|(sub, _)| *sub != id);
                if subs.is_empty() {
                    self.by_service.remove(s);
                }
            }
        }
    }

    /// How many v1 watchers are subscribed.
    pub fn legacy_watchers(&self) -> usize {
        self.legacy
    }

    /// How many filtered subscriptions are registered for `service` (for tests and metrics).
    pub fn filtered_on(&self, service: &ServiceName) -> usize {
        self.by_service.get(service).map_or(0, Vec::len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use baker_client::change::UpsertCause;
    use baker_client::model::{Instance, WatchEvent};

    fn upsert(index: u64, service: &str) -> Published {
        Published::new(
            Change::Upsert {
                index,
                at: 7,
                cause: UpsertCause::Registered,
                instance: Instance::sample(service, "a"),
                by: None,
            },
            None,
        )
    }

    #[test]
    fn a_line_is_the_change_with_the_streams_prev() {
        let p = upsert(13, "emitter");
        for prev in [12, 3] {
            let line = p.line(prev);
            assert_eq!(line.last(), Some(&b'\n'));
            let event: WatchEvent = serde_json::from_slice(&line).unwrap();
            assert_eq!(event, WatchEvent::of_change(p.change.clone(), prev));
        }
    }

    #[tokio::test]
    async fn filtered_subscribers_get_only_their_services() {
        let mut feed = Feed::new(16);
        let only: BTreeSet<ServiceName> = ["a".parse().unwrap()].into();
        let (id, mut filtered) = feed.subscribe(Some(&only), false);
        let (_, mut all) = feed.subscribe(None, false);
        feed.publish(upsert(1, "b"));
        feed.publish(upsert(2, "a"));
        assert_eq!(filtered.recv().await.unwrap().index(), 2);
        assert!(filtered.try_recv().is_none());
        assert_eq!(all.recv().await.unwrap().index(), 1);
        assert_eq!(all.recv().await.unwrap().index(), 2);
        feed.unsubscribe(id, Some(&only), false);
        assert_eq!(feed.filtered_on(&"a".parse().unwrap()), 0);
    }
}
