//! The event history: the last changes of the table, for `GET /v1/events`.
//!
//! [`History::follow`] is one more consumer of the change feed ([`Registry::changes`]): each
//! change becomes an [`Event`] (kind, cause in words, origin of an operator's call) appended to
//! a ring of at most `BAKER_HISTORY` events, the oldest dropped first. Nothing else writes to
//! it, so the history holds exactly what the watch stream sent, in revision order. A consumer
//! that fell behind the feed would miss changes: it logs how many and counts them in
//! `baker_directory_history_missed_total`, and goes on.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use baker_client::events::Event;
use baker_client::model::ServiceName;
use tokio_util::sync::CancellationToken;

use crate::Registry;

/// Default of `BAKER_HISTORY`.
pub const DEFAULT_CAPACITY: usize = 10_000;
/// Most events one `GET /v1/events` answers with.
pub const MAX_LIMIT: usize = 10_000;
/// Events one `GET /v1/events` answers with when it names no `limit`.
pub const DEFAULT_LIMIT: usize = 1_000;

/// What `GET /v1/events` asks for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Query {
    /// Events at or after this time (ms since the Unix epoch).
    pub since: Option<u64>,
    /// Events at or before this time.
    pub until: Option<u64>,
    /// Events of this service only.
    pub service: Option<ServiceName>,
    /// The newest this many of those that match.
    pub limit: usize,
}

/// The last events, oldest first.
#[derive(Debug)]
pub struct History {
    events: Mutex<VecDeque<Event>>,
    capacity: usize,
}

impl History {
    /// A history keeping at most `capacity` events (at least one).
    pub fn new(capacity: usize) -> History {
        let capacity = capacity.max(1);
        History {
            events: Mutex::new(VecDeque::with_capacity(capacity.min(DEFAULT_CAPACITY))),
            capacity,
        }
    }

    /// How many events it keeps at most.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Appends `event`, dropping the oldest when full.
    pub fn push(&self, event: Event) {
        let mut events = self.events.lock().unwrap_or_else(|p| p.into_inner());
        if events.len() == self.capacity {
            events.pop_front();
        }
        events.push_back(event);
    }

    /// The events matching `query`, oldest first: the newest `query.limit` of them.
    pub fn query(&self, query: &Query) -> Vec<Event> {
        let events = self.events.lock().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<Event> = events
            .iter()
            .rev()
            .filter(|e| query.until.is_none_or(|u| e.at <= u))
            .filter(|e| query.since.is_none_or(|s| e.at >= s))
            .filter(|e| query.service.as_ref().is_none_or(|s| &e.service == s))
            .take(query.limit)
            .cloned()
            .collect();
        out.reverse();
        out
    }

    /// How many events it holds.
    pub fn len(&self) -> usize {
        self.events.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Records every change of `registry` until `shutdown`.
    pub async fn follow(self: Arc<Self>, registry: Registry, shutdown: CancellationToken) {
        crate::feed::consume(
            registry.changes(),
            &shutdown,
            |p| self.push(Event::of(&p.change)),
            |n| {
                registry.metrics().history_missed.inc_by(n);
                tracing::warn!(
                    missed = n,
                    "the history fell behind the change feed and misses {n} change(s)"
                );
            },
        )
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use baker_client::events::EventKind;

    fn event(index: u64, at: u64, service: &str) -> Event {
        Event {
            index,
            at,
            service: service.parse().unwrap(),
            id: None,
            kind: EventKind::RouteSet,
            cause: "set".into(),
            origin: None,
            by: None,
            version: None,
            address: None,
            route: None,
            reason: None,
        }
    }

    fn indexes(events: &[Event]) -> Vec<u64> {
        events.iter().map(|e| e.index).collect()
    }

    #[test]
    fn it_is_bounded_and_filtered_newest_last() {
        let h = History::new(5);
        for i in 1..=8 {
            h.push(event(i, i * 10, if i % 2 == 0 { "a" } else { "b" }));
        }
        assert_eq!(h.len(), 5, "the oldest went");
        let all = Query {
            limit: 100,
            ..Query::default()
        };
        assert_eq!(indexes(&h.query(&all)), [4, 5, 6, 7, 8]);
        let a = Query {
            service: Some("a".parse().unwrap()),
            ..all.clone()
        };
        assert_eq!(indexes(&h.query(&a)), [4, 6, 8]);
        let window = Query {
            since: Some(50),
            until: Some(70),
            ..all.clone()
        };
        assert_eq!(indexes(&h.query(&window)), [5, 6, 7]);
        let newest = Query {
            limit: 2,
            ..all.clone()
        };
        assert_eq!(indexes(&h.query(&newest)), [7, 8]);
    }

    #[tokio::test]
    async fn it_follows_the_change_feed() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::routes::RouteStore::open(dir.path()).unwrap();
        let registry = Registry::new(
            store,
            Default::default(),
            Arc::new(crate::metrics::Metrics::new()),
            64,
        );
        let h = Arc::new(History::new(100));
        let stop = CancellationToken::new();
        let task = tokio::spawn(h.clone().follow(registry.clone(), stop.clone()));
        tokio::task::yield_now().await;
        registry
            .set_route_by(
                &"web".parse().unwrap(),
                Some([("1".parse().unwrap(), 100)].into()),
                Some("cli from 127.0.0.1".into()),
            )
            .await
            .unwrap();
        registry
            .drain(
                &"web".parse().unwrap(),
                baker_client::maintenance::Target::Instance("a".parse().unwrap()),
                None,
                "ui from 127.0.0.1".into(),
            )
            .await
            .unwrap();
        let all = Query {
            limit: 10,
            ..Query::default()
        };
        for _ in 0..100 {
            if h.len() == 2 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let got: Vec<_> = h
            .query(&all)
            .into_iter()
            .map(|e| (e.kind, e.by.unwrap_or_default()))
            .collect();
        let by = |kind, by: &str| (kind, by.to_owned());
        assert_eq!(
            got,
            [
                by(EventKind::RouteSet, "anonymous"),
                by(EventKind::Drained, "anonymous")
            ]
        );
        stop.cancel();
        task.await.unwrap();
    }
}
