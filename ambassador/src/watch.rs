//! Following the directory's watch stream, and deciding what the ambassador believes is live.
//!
//! The directory is soft state: after it restarts, its first snapshot is empty or partial until
//! the registrars' next heartbeats. [`Tracker`] therefore treats a snapshot that follows an
//! earlier one as untrusted for removals: an instance of a routed service that it no longer
//! lists is held, and dropped only if nothing lists it again once the directory has been up
//! (streaming) for that service's grace ([`service_grace`]: its longest TTL, at most the cap
//! `BAKER_GRACE`), and in any case once it has been held for the cap ([`hold_end`]).
//! Additions apply at once. While the directory is unreachable nothing changes, except that
//! holds older than the cap end.
//!
//! The ambassador watches only the services it needs ([`Tracker::covered`]): those it routes,
//! and the other services their routes send traffic to. When a route names a service outside
//! the watch, [`run`] reconnects at once with the wider filter: the new stream starts with a
//! snapshot of every watched service, so nothing that changed before or during the switch is
//! missed, and since the new filter holds the old one no instance goes missing from it.

use baker_client::errors::chain;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use baker_client::backoff::Backoff;
use baker_client::model::{Instance, InstanceId, ServiceName, State, WatchEvent};
use baker_client::DirectoryClient;
use futures_util::StreamExt;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::ServiceRoute;
use crate::locality::Locality;
use crate::metrics::Metrics;
use crate::plan::{fallbacks, plan, Desired};

/// How long a routed service's instances missing from a fresh snapshot are held once the
/// directory is up: the longest TTL among `instances` (the service's instances the ambassador
/// knows of), at most `cap`. Its registrars heartbeat within one TTL, so an instance still
/// missing by then is gone.
pub fn service_grace<'a>(
    instances: impl IntoIterator<Item = &'a Instance>,
    cap: Duration,
) -> Duration {
    instances
        .into_iter()
        .map(|i| Duration::from_millis(i.ttl_ms))
        .max()
        .unwrap_or_default()
        .min(cap)
}

/// When a hold that began at `held_at` ends: once the directory has been up since `up_since`
/// (`None` while it is unreachable) for `grace`, and at the latest `cap` after it began, so a
/// directory that keeps dropping the stream cannot keep a removed instance forever.
pub fn hold_end(
    held_at: Instant,
    up_since: Option<Instant>,
    grace: Duration,
    cap: Duration,
) -> Instant {
    let latest = held_at + cap;
    match up_since {
        Some(up) => latest.min(up + grace),
        None => latest,
    }
}

/// An instance a fresh snapshot lacked.
#[derive(Debug)]
struct Hold {
    instance: Instance,
    since: Instant,
}

/// The directory's state as received, plus instances held through a grace period.
#[derive(Debug)]
pub struct Tracker {
    state: State,
    seen_snapshot: bool,
    /// Services the ambassador routes: holds are kept (and graces computed) for these and the
    /// services their routes send traffic to only.
    routed: BTreeSet<ServiceName>,
    cap: Duration,
    held: BTreeMap<(ServiceName, InstanceId), Hold>,
    /// Grace of each service with held instances, fixed by the snapshot that held them.
    graces: BTreeMap<ServiceName, Duration>,
    /// Since when the directory has been streaming (its last snapshot); `None` while away.
    up_since: Option<Instant>,
}

impl Tracker {
    /// A tracker for the `routed` services whose holds last at most `cap`.
    pub fn new(routed: impl IntoIterator<Item = ServiceName>, cap: Duration) -> Self {
        Tracker {
            state: State::default(),
            seen_snapshot: false,
            routed: routed.into_iter().collect(),
            cap,
            held: BTreeMap::new(),
            graces: BTreeMap::new(),
            up_since: None,
        }
    }

    /// Applies one event received at `now`.
    pub fn apply(&mut self, event: WatchEvent, now: Instant) {
        let is_snapshot = matches!(event, WatchEvent::Snapshot { .. });
        let old = if is_snapshot && self.seen_snapshot {
            let covered = self.covered();
            Some((std::mem::take(&mut self.state.services), covered))
        } else {
            None
        };
        self.state.apply(event);
        if is_snapshot {
            self.seen_snapshot = true;
            self.up_since = Some(now);
        }
        if let Some((old, mut covered)) = old {
            covered.extend(self.covered());
            self.hold_missing(old, &covered, now);
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
        self.graces
            .retain(|svc, _| self.held.keys().any(|(s, _)| s == svc));
    }

    /// The services whose instances the routed services need: themselves, and every other
    /// service their routes (as last received) send traffic to.
    pub fn covered(&self) -> BTreeSet<ServiceName> {
        let mut out = self.routed.clone();
        for service in &self.routed {
            if let Some(route) = self.state.routes.get(service) {
                out.extend(route.other_services(service).into_iter().cloned());
            }
        }
        out
    }

    /// Holds the instances of `old` in `covered` services that the fresh snapshot just applied
    /// lacks.
    fn hold_missing(
        &mut self,
        old: BTreeMap<ServiceName, Vec<Instance>>,
        covered: &BTreeSet<ServiceName>,
        now: Instant,
    ) {
        for (service, instances) in old {
            if !covered.contains(&service) {
                continue;
            }
            let held = self
                .held
                .values()
                .filter(|h| h.instance.service == service)
                .map(|h| &h.instance);
            let fresh = self.state.services.get(&service).into_iter().flatten();
            let grace = service_grace(instances.iter().chain(held).chain(fresh), self.cap);
            if grace.is_zero() {
                continue;
            }
            self.graces.insert(service.clone(), grace);
            for inst in instances {
                let key = (inst.service.clone(), inst.id.clone());
                if self.lists(&key) || self.held.contains_key(&key) {
                    continue;
                }
                tracing::info!(
                    service = %inst.service, id = %inst.id, grace = ?grace,
                    "a fresh directory snapshot lacks this instance; keeping it for the grace period"
                );
                self.held.insert(
                    key,
                    Hold {
                        instance: inst,
                        since: now,
                    },
                );
            }
        }
    }

    /// The directory's stream ended: held instances stay until it is up again (or the cap).
    pub fn disconnected(&mut self) {
        self.up_since = None;
    }

    fn lists(&self, (service, id): &(ServiceName, InstanceId)) -> bool {
        self.state
            .services
            .get(service)
            .is_some_and(|v| v.iter().any(|i| &i.id == id))
    }

    fn end_of(&self, (service, _): &(ServiceName, InstanceId), hold: &Hold) -> Instant {
        let grace = self.graces.get(service).copied().unwrap_or(self.cap);
        hold_end(hold.since, self.up_since, grace, self.cap)
    }

    /// What counts as live at `now`: the directory's state plus held instances, with ended
    /// holds dropped.
    pub fn view(&mut self, now: Instant) -> State {
        let ended: Vec<_> = self
            .held
            .iter()
            .filter(|(k, h)| self.end_of(k, h) <= now)
            .map(|(k, _)| k.clone())
            .collect();
        for k in ended {
            tracing::info!(service = %k.0, id = %k.1, "the grace period ended; the instance did not come back");
            self.held.remove(&k);
        }
        let mut state = self.state.clone();
        for h in self.held.values() {
            state
                .services
                .entry(h.instance.service.clone())
                .or_default()
                .push(h.instance.clone());
        }
        state
    }

    /// When the next hold ends.
    pub fn next_expiry(&self) -> Option<Instant> {
        self.held.iter().map(|(k, h)| self.end_of(k, h)).min()
    }

    pub fn index(&self) -> u64 {
        self.state.index
    }
}

/// Follows the directory forever (until `shutdown`), publishing the planned servers.
pub async fn run(
    client: DirectoryClient,
    services: Vec<ServiceRoute>,
    locality: Option<Locality>,
    grace_cap: Duration,
    desired: watch::Sender<Desired>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let mut tracker = Tracker::new(services.iter().map(|s| s.name.clone()), grace_cap);
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    // A snapshot is published even when the plan stays the same: it tells the owner that
    // the directory answered.
    let publish = |tracker: &mut Tracker, snapshot: bool| {
        let view = tracker.view(Instant::now());
        let d = plan(&view, &services, locality.as_ref());
        metrics.note_fallbacks(&fallbacks(&view, &services));
        if snapshot || *desired.borrow() != d {
            tracing::debug!(index = tracker.index(), "planned the servers");
            metrics.progress.plan_changing();
            desired.send_replace(d);
        }
        metrics.progress.planned(tracker.index());
    };
    // Only the services it routes and those their routes send to: its memory and work follow
    // its routes, not the directory.
    let mut was_connected = false;
    let mut widened_last = false;
    loop {
        let watching = tracker.covered();
        let filter: Vec<ServiceName> = watching.iter().cloned().collect();
        let mut widen = false;
        let stream = tokio::select! {
            _ = shutdown.cancelled() => return,
            s = client.watch_services(Some(&filter)) => s,
        };
        match stream {
            Err(e) => {
                tracing::warn!(directory = %client.base(), "cannot watch the directory: {}", chain(&e));
            }
            Ok(stream) => {
                // The replica this stream comes from: once it breaks, the client already
                // points at the next one.
                let source = client.base().to_owned();
                tracing::info!(directory = %source, "watching the directory");
                metrics.directory_connected.set(1);
                if was_connected && !widened_last {
                    metrics.directory_reconnects.inc();
                }
                was_connected = true;
                let mut stream = std::pin::pin!(stream);
                let mut first = true;
                loop {
                    let expiry = tracker.next_expiry();
                    let ev = tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = sleep_until_opt(expiry) => { publish(&mut tracker, false); continue; }
                        ev = stream.next() => ev,
                    };
                    match ev {
                        Some(Ok(ev)) => {
                            if first {
                                backoff.reset();
                                first = false;
                            }
                            let ping = matches!(ev, WatchEvent::Ping { .. });
                            if !ping {
                                tracing::debug!(
                                    index = ev.index(),
                                    "received a change from the directory"
                                );
                            }
                            let snapshot = matches!(ev, WatchEvent::Snapshot { .. });
                            tracker.apply(ev, Instant::now());
                            if !ping {
                                metrics.watch_events.inc();
                                publish(&mut tracker, snapshot);
                            }
                            let wanted = tracker.covered();
                            if !wanted.is_subset(&watching) {
                                let new: Vec<String> = wanted
                                    .difference(&watching)
                                    .map(ToString::to_string)
                                    .collect();
                                tracing::info!(
                                    services = %new.join(","),
                                    "a route sends traffic to services outside the watch; \
                                     watching them too"
                                );
                                widen = true;
                                break;
                            }
                        }
                        Some(Err(e)) => {
                            tracing::warn!(directory = %source, "lost the directory's watch stream: {}; keeping the last known servers", chain(&e));
                            break;
                        }
                        None => break,
                    }
                }
                tracker.disconnected();
                metrics.directory_connected.set(0);
            }
        }
        widened_last = widen;
        if widen {
            // A wider watch, at once: its snapshot holds everything the old one had and more.
            continue;
        }
        let end = Instant::now() + backoff.next_delay();
        // Holds may still end (at the cap) while the directory is away.
        loop {
            let wake = tracker.next_expiry().filter(|t| *t < end);
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep_until(wake.unwrap_or(end)) => {}
            }
            if wake.is_none() {
                break;
            }
            publish(&mut tracker, false);
        }
    }
}

/// Sleeps until `t`, or forever when there is none: a `select!` arm for an optional deadline.
pub(crate) async fn sleep_until_opt(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CAP: Duration = Duration::from_secs(30);

    fn inst(service: &str, id: &str, ttl_ms: u64) -> Instance {
        Instance {
            port: 80,
            ttl_ms,
            ..Instance::sample(service, id)
        }
    }

    /// A snapshot of `svc` instances with a 3 s TTL, plus `extra` instances of any service.
    fn snapshot_with(index: u64, ids: &[&str], extra: &[Instance]) -> WatchEvent {
        let mut services: BTreeMap<ServiceName, Vec<Instance>> = BTreeMap::new();
        for id in ids {
            services
                .entry("svc".parse().unwrap())
                .or_default()
                .push(inst("svc", id, 3000));
        }
        for i in extra {
            services
                .entry(i.service.clone())
                .or_default()
                .push(i.clone());
        }
        WatchEvent::Snapshot {
            index,
            services,
            routes: BTreeMap::new(),
            maintenance: BTreeMap::new(),
        }
    }

    fn snapshot(index: u64, ids: &[&str]) -> WatchEvent {
        snapshot_with(index, ids, &[])
    }

    fn tracker() -> Tracker {
        Tracker::new(["svc".parse().unwrap(), "other".parse().unwrap()], CAP)
    }

    fn ids(state: &State, service: &str) -> Vec<String> {
        let mut v: Vec<String> = state
            .services
            .get(service)
            .map(|v| v.iter().map(|i| i.id.to_string()).collect())
            .unwrap_or_default();
        v.sort();
        v
    }

    #[test]
    fn service_grace_is_the_longest_ttl_up_to_the_cap() {
        let a = inst("svc", "a", 3000);
        let b = inst("svc", "b", 5000);
        let day = inst("svc", "c", 86_400_000);
        assert_eq!(service_grace([&a, &b], CAP), Duration::from_secs(5));
        assert_eq!(service_grace([&a, &day], CAP), CAP);
        assert_eq!(service_grace([], CAP), Duration::ZERO);
        assert_eq!(service_grace([&b], Duration::ZERO), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn hold_end_counts_from_the_directory_being_up_and_never_passes_the_cap() {
        let t0 = Instant::now();
        let grace = Duration::from_secs(3);
        assert_eq!(hold_end(t0, Some(t0), grace, CAP), t0 + grace);
        // Up again later: the grace counts from then.
        let up = t0 + Duration::from_secs(10);
        assert_eq!(hold_end(t0, Some(up), grace, CAP), up + grace);
        // Away: only the cap ends it; and it ends there even if the directory came up late.
        assert_eq!(hold_end(t0, None, grace, CAP), t0 + CAP);
        assert_eq!(hold_end(t0, Some(t0 + CAP), grace, CAP), t0 + CAP);
    }

    #[tokio::test(start_paused = true)]
    async fn first_snapshot_and_events_apply_at_once() {
        let mut t = tracker();
        let now = Instant::now();
        t.apply(snapshot(5, &["a", "b"]), now);
        assert_eq!(ids(&t.view(now), "svc"), ["a", "b"]);
        t.apply(
            WatchEvent::Service {
                index: 6,
                service: "svc".parse().unwrap(),
                instances: vec![inst("svc", "a", 3000)],
            },
            now,
        );
        assert_eq!(
            ids(&t.view(now), "svc"),
            ["a"],
            "a removal event applies at once"
        );
        assert!(t.next_expiry().is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn fresh_empty_snapshot_does_not_drop_live_servers_until_grace_ends() {
        let mut t = tracker();
        let now = Instant::now();
        t.apply(snapshot(40, &["a", "b"]), now);
        // The directory restarted: lower index, empty table.
        t.apply(snapshot(1, &[]), now);
        assert_eq!(ids(&t.view(now), "svc"), ["a", "b"]);
        assert_eq!(
            t.next_expiry(),
            Some(now + Duration::from_millis(3000)),
            "grace = the service's TTL"
        );
        // Additions apply at once; a returning instance is no longer held.
        t.apply(
            WatchEvent::Service {
                index: 2,
                service: "svc".parse().unwrap(),
                instances: vec![inst("svc", "a", 3000), inst("svc", "c", 3000)],
            },
            now,
        );
        assert_eq!(ids(&t.view(now), "svc"), ["a", "b", "c"]);
        let later = now + Duration::from_millis(3001);
        assert_eq!(ids(&t.view(later), "svc"), ["a", "c"], "b never came back");
        assert!(t.next_expiry().is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_long_ttl_elsewhere_changes_nothing() {
        let mut t = tracker();
        let now = Instant::now();
        // A day-long TTL in a service this ambassador does not route.
        let stranger = inst("unrouted", "x", 86_400_000);
        t.apply(snapshot_with(10, &["a", "b"], &[stranger]), now);
        t.apply(snapshot(1, &["a"]), now);
        assert_eq!(t.next_expiry(), Some(now + Duration::from_secs(3)));
        assert!(ids(&t.view(now), "unrouted").is_empty(), "not held at all");
        assert_eq!(ids(&t.view(now + Duration::from_secs(3)), "svc"), ["a"]);
    }

    #[tokio::test(start_paused = true)]
    async fn each_service_has_its_own_grace() {
        let mut t = tracker();
        let now = Instant::now();
        let slow = inst("other", "o", 20_000);
        t.apply(snapshot_with(10, &["a"], &[slow]), now);
        t.apply(snapshot(1, &[]), now);
        assert_eq!(
            ids(&t.view(now + Duration::from_secs(3)), "svc"),
            Vec::<String>::new()
        );
        assert_eq!(ids(&t.view(now + Duration::from_secs(3)), "other"), ["o"]);
        assert_eq!(
            ids(&t.view(now + Duration::from_secs(20)), "other"),
            Vec::<String>::new()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_day_long_ttl_is_capped() {
        let mut t = tracker();
        let now = Instant::now();
        let day = inst("svc", "d", 86_400_000);
        t.apply(snapshot_with(10, &["a"], &[day]), now);
        t.apply(snapshot(1, &[]), now);
        assert_eq!(t.next_expiry(), Some(now + CAP));
    }

    #[tokio::test(start_paused = true)]
    async fn the_grace_waits_for_the_directory_to_be_up() {
        let mut t = tracker();
        let t0 = Instant::now();
        t.apply(snapshot(10, &["a", "b"]), t0);
        t.apply(snapshot(1, &["a"]), t0);
        // The directory goes away again right after its snapshot: "b" stays held...
        t.disconnected();
        let back = t0 + Duration::from_secs(10);
        assert_eq!(ids(&t.view(back), "svc"), ["a", "b"]);
        // ...until the directory has been up for the grace once it is back.
        t.apply(snapshot(1, &["a"]), back);
        assert_eq!(t.next_expiry(), Some(back + Duration::from_secs(3)));
        assert_eq!(
            ids(&t.view(back + Duration::from_secs(2)), "svc"),
            ["a", "b"]
        );
        assert_eq!(ids(&t.view(back + Duration::from_secs(3)), "svc"), ["a"]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_flapping_stream_keeps_nothing_past_the_cap() {
        let mut t = tracker();
        let t0 = Instant::now();
        t.apply(snapshot(10, &["a", "b"]), t0);
        let mut now = t0;
        // Reconnects every second, never up for a whole TTL.
        while now < t0 + CAP {
            t.apply(snapshot(1, &["a"]), now);
            t.disconnected();
            now += Duration::from_secs(1);
        }
        assert_eq!(ids(&t.view(now), "svc"), ["a"]);
    }

    #[tokio::test(start_paused = true)]
    async fn servers_of_a_routed_to_service_are_held_too() {
        let mut t = tracker();
        let now = Instant::now();
        assert_eq!(t.covered().len(), 2);
        let route: baker_client::Route = {
            let splits = [("svc@*".to_owned(), 70), ("barker@*".to_owned(), 30)].into();
            baker_client::model::validate_route_of(&"svc".parse().unwrap(), &splits).unwrap()
        };
        let with_route = |index: u64, barker: &[Instance]| {
            let WatchEvent::Snapshot { services, .. } = snapshot_with(index, &["a"], barker) else {
                unreachable!()
            };
            WatchEvent::Snapshot {
                index,
                services,
                routes: [("svc".parse().unwrap(), route.clone())].into(),
                maintenance: BTreeMap::new(),
            }
        };
        t.apply(with_route(10, &[inst("barker", "x", 4000)]), now);
        let covered: Vec<String> = t.covered().iter().map(ToString::to_string).collect();
        assert_eq!(covered, ["barker", "other", "svc"]);
        // A restarted directory's snapshot lacks barker's instance: held for barker's TTL.
        t.apply(with_route(1, &[]), now);
        assert_eq!(ids(&t.view(now), "barker"), ["x"]);
        assert_eq!(t.next_expiry(), Some(now + Duration::from_secs(4)));
        assert!(ids(&t.view(now + Duration::from_secs(4)), "barker").is_empty());
        // A service no route names is not held.
        let mut t = tracker();
        t.apply(snapshot_with(10, &["a"], &[inst("barker", "x", 4000)]), now);
        t.apply(snapshot(1, &["a"]), now);
        assert!(ids(&t.view(now), "barker").is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_zero_cap_holds_nothing() {
        let mut t = Tracker::new(["svc".parse().unwrap()], Duration::ZERO);
        let now = Instant::now();
        t.apply(snapshot(10, &["a", "b"]), now);
        t.apply(snapshot(1, &["a"]), now);
        assert_eq!(ids(&t.view(now), "svc"), ["a"]);
        assert!(t.next_expiry().is_none());
    }
}
