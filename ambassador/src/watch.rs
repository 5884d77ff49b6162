//! Following the directory's watch stream, and deciding what the ambassador believes is live.
//!
//! The directory is soft state: after it restarts, its first snapshot is empty or partial until
//! the registrars' next heartbeats. [`Tracker`] therefore treats a snapshot that follows an
//! earlier one as untrusted for removals: an instance it no longer lists is held for a grace
//! period (the longest TTL seen) and dropped only if nothing lists it again by then. Additions
//! apply at once. While the directory is unreachable nothing changes at all.

use baker_client::errors::chain;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use baker_client::backoff::Backoff;
use baker_client::model::{Instance, State, WatchEvent, DEFAULT_TTL_MS};
use baker_client::DirectoryClient;
use futures_util::StreamExt;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::ServiceRoute;
use crate::metrics::Metrics;
use crate::plan::{plan, Desired};

/// The directory's state as received, plus instances held through a grace period.
#[derive(Debug, Default)]
pub struct Tracker {
    state: State,
    seen_snapshot: bool,
    held: BTreeMap<(String, String), (Instance, Instant)>,
    max_ttl: Option<Duration>,
    grace: Option<Duration>,
}

impl Tracker {
    /// A tracker whose grace period is `grace`, or the longest TTL seen when `None`.
    pub fn new(grace: Option<Duration>) -> Self {
        Tracker {
            grace,
            ..Default::default()
        }
    }

    fn grace(&self) -> Duration {
        self.grace
            .or(self.max_ttl)
            .unwrap_or(Duration::from_millis(DEFAULT_TTL_MS))
    }

    /// Applies one event received at `now`.
    pub fn apply(&mut self, event: WatchEvent, now: Instant) {
        let is_snapshot = matches!(event, WatchEvent::Snapshot { .. });
        let old = if is_snapshot && self.seen_snapshot {
            Some(std::mem::take(&mut self.state.services))
        } else {
            None
        };
        self.state.apply(event);
        if is_snapshot {
            self.seen_snapshot = true;
        }
        for inst in self.state.services.values().flatten() {
            let ttl = Duration::from_millis(inst.ttl_ms);
            if self.max_ttl.is_none_or(|m| ttl > m) {
                self.max_ttl = Some(ttl);
            }
        }
        if let Some(old) = old {
            let until = now + self.grace();
            for inst in old.into_values().flatten() {
                let key = (inst.service.clone(), inst.id.clone());
                if !self.lists(&key) && !self.held.contains_key(&key) {
                    tracing::info!(
                        service = %inst.service, id = %inst.id,
                        "a fresh directory snapshot lacks this instance; keeping it for {:?}",
                        self.grace()
                    );
                    self.held.insert(key, (inst, until));
                }
            }
        }
        let listed: Vec<_> = self
            .held
            .keys()
            .filter(|k| self.lists(k))
            .cloned()
            .collect();
        for k in listed {
            self.held.remove(&k);
        }
    }

    fn lists(&self, (service, id): &(String, String)) -> bool {
        self.state
            .services
            .get(service)
            .is_some_and(|v| v.iter().any(|i| &i.id == id))
    }

    /// What counts as live at `now`: the directory's state plus held instances, with expired
    /// holds dropped.
    pub fn view(&mut self, now: Instant) -> State {
        self.held.retain(|_, (_, until)| *until > now);
        let mut state = self.state.clone();
        for (inst, _) in self.held.values() {
            state
                .services
                .entry(inst.service.clone())
                .or_default()
                .push(inst.clone());
        }
        state
    }

    /// When the next hold expires.
    pub fn next_expiry(&self) -> Option<Instant> {
        self.held.values().map(|(_, t)| *t).min()
    }

    pub fn index(&self) -> u64 {
        self.state.index
    }
}

/// Follows the directory forever (until `shutdown`), publishing the planned servers.
pub async fn run(
    client: DirectoryClient,
    services: Vec<ServiceRoute>,
    grace: Option<Duration>,
    desired: watch::Sender<Desired>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let mut tracker = Tracker::new(grace);
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    let publish = |tracker: &mut Tracker| {
        let view = tracker.view(Instant::now());
        let d = plan(&view, &services);
        desired.send_if_modified(|cur| {
            if *cur != d {
                *cur = d;
                true
            } else {
                false
            }
        });
    };
    let mut was_connected = false;
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => return,
            s = client.watch() => s,
        };
        match stream {
            Err(e) => {
                tracing::warn!(directory = %client.base(), "cannot watch the directory: {}", chain(&e));
            }
            Ok(stream) => {
                tracing::info!(directory = %client.base(), "watching the directory");
                metrics.directory_connected.set(1);
                if was_connected {
                    metrics.directory_reconnects.inc();
                }
                was_connected = true;
                let mut stream = std::pin::pin!(stream);
                let mut first = true;
                loop {
                    let expiry = tracker.next_expiry();
                    let ev = tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = sleep_until_opt(expiry) => { publish(&mut tracker); continue; }
                        ev = stream.next() => ev,
                    };
                    match ev {
                        Some(Ok(ev)) => {
                            if first {
                                backoff.reset();
                                first = false;
                            }
                            let ping = matches!(ev, WatchEvent::Ping { .. });
                            tracker.apply(ev, Instant::now());
                            if !ping {
                                metrics.watch_events.inc();
                                publish(&mut tracker);
                            }
                        }
                        Some(Err(e)) => {
                            tracing::warn!(directory = %client.base(), "lost the directory's watch stream: {}; keeping the last known servers", chain(&e));
                            break;
                        }
                        None => break,
                    }
                }
                metrics.directory_connected.set(0);
            }
        }
        let delay = backoff.next_delay();
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = hold_while_sleeping(&mut tracker, delay, &publish) => {}
        }
    }
}

/// Sleeps `delay`, still publishing when a hold expires meanwhile.
async fn hold_while_sleeping(
    tracker: &mut Tracker,
    delay: Duration,
    publish: &impl Fn(&mut Tracker),
) {
    let end = Instant::now() + delay;
    loop {
        match tracker.next_expiry().filter(|t| *t < end) {
            Some(t) => {
                tokio::time::sleep_until(t).await;
                publish(tracker);
            }
            None => {
                tokio::time::sleep_until(end).await;
                return;
            }
        }
    }
}

async fn sleep_until_opt(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inst(id: &str) -> Instance {
        Instance {
            port: 80,
            ttl_ms: 3000,
            ..Instance::sample("svc", id)
        }
    }

    fn snapshot(index: u64, ids: &[&str]) -> WatchEvent {
        let mut services = BTreeMap::new();
        if !ids.is_empty() {
            services.insert("svc".to_string(), ids.iter().map(|i| inst(i)).collect());
        }
        WatchEvent::Snapshot {
            index,
            services,
            routes: BTreeMap::new(),
        }
    }

    fn ids(state: &State) -> Vec<String> {
        let mut v: Vec<String> = state
            .services
            .get("svc")
            .map(|v| v.iter().map(|i| i.id.clone()).collect())
            .unwrap_or_default();
        v.sort();
        v
    }

    #[tokio::test(start_paused = true)]
    async fn first_snapshot_and_events_apply_at_once() {
        let mut t = Tracker::new(None);
        let now = Instant::now();
        t.apply(snapshot(5, &["a", "b"]), now);
        assert_eq!(ids(&t.view(now)), ["a", "b"]);
        t.apply(
            WatchEvent::Service {
                index: 6,
                service: "svc".into(),
                instances: vec![inst("a")],
            },
            now,
        );
        assert_eq!(ids(&t.view(now)), ["a"], "a removal event applies at once");
        assert!(t.next_expiry().is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn fresh_empty_snapshot_does_not_drop_live_servers_until_grace_ends() {
        let mut t = Tracker::new(None);
        let now = Instant::now();
        t.apply(snapshot(40, &["a", "b"]), now);
        // The directory restarted: lower index, empty table.
        t.apply(snapshot(1, &[]), now);
        assert_eq!(ids(&t.view(now)), ["a", "b"]);
        assert_eq!(
            t.next_expiry(),
            Some(now + Duration::from_millis(3000)),
            "grace = max TTL"
        );
        // Additions apply at once; a returning instance is no longer held.
        t.apply(
            WatchEvent::Service {
                index: 2,
                service: "svc".into(),
                instances: vec![inst("a"), inst("c")],
            },
            now,
        );
        assert_eq!(ids(&t.view(now)), ["a", "b", "c"]);
        let later = now + Duration::from_millis(3001);
        assert_eq!(ids(&t.view(later)), ["a", "c"], "b never came back");
        assert!(t.next_expiry().is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn explicit_grace_wins() {
        let mut t = Tracker::new(Some(Duration::from_secs(10)));
        let now = Instant::now();
        t.apply(snapshot(1, &["a"]), now);
        t.apply(snapshot(2, &[]), now);
        assert_eq!(t.next_expiry(), Some(now + Duration::from_secs(10)));
    }
}
