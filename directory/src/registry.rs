//! The table of live instances and routes: its change index, its TTL timer and its event feed.
//!
//! [`Registry`] is a cheap, cloneable handle. The HTTP API and Docker discovery change the
//! table only through it, and every real change does three things under one lock: bump the
//! index, record the change, and publish one watch line (the service's whole new instance list,
//! or its route). A heartbeat that changes nothing but `last_seen` is not a change: it bumps no
//! index and publishes nothing, so the `last_seen` carried by a watch event is the time of the
//! instance's last change, while `GET /v1/services` shows the time of its last heartbeat.
//!
//! Instances registered over the API ([`Source::Registrar`]) expire when no heartbeat renews
//! them within their `ttl_ms`; [`Registry::run_expiry`] sleeps until the earliest deadline, it
//! is not driven by reads. Instances from Docker never expire by TTL: the engine says when they
//! go ([`Registry::remove`], [`Registry::sync_source`]).
//!
//! Sources do not overwrite each other from the API: a registration or deregistration over the
//! API of an instance that Docker discovered is refused ([`Conflict`]), since the API's
//! short-lived copy would expire and leave the healthy container missing. Docker discovery, the
//! engine's own account of a running container, takes over an API-registered instance of the
//! same id instead (logged as a warning); the registrar's next heartbeat is then refused.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use baker_client::model::{
    route_falls_back, Instance, InstanceId, Route, RouteResponse, RoutesResponse, ServiceName,
    ServiceResponse, ServicesResponse, Source, ValidSpec, WatchEvent,
};
use bytes::Bytes;
use tokio::sync::{broadcast, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::metrics::{Metrics, ServiceLabel};
use crate::routes::{RouteStore, StoreError};

/// One NDJSON line of the watch stream, serialized once and shared by every watcher.
#[derive(Debug, Clone)]
pub struct Line {
    /// The index the line brings a watcher to.
    pub index: u64,
    /// The JSON text, newline included.
    pub bytes: Bytes,
}

impl Line {
    fn of(event: &WatchEvent) -> Line {
        // Serializing strings, integers and maps of them cannot fail.
        let mut bytes = serde_json::to_vec(event).expect("watch events always serialize");
        bytes.push(b'\n');
        Line {
            index: event.index(),
            bytes: Bytes::from(bytes),
        }
    }
}

/// A handle on the directory's table. Clones share the same table.
#[derive(Clone)]
pub struct Registry {
    inner: Arc<Inner>,
}

struct Inner {
    /// The table. A std mutex: it is never held across an await, only for in-memory updates.
    table: Mutex<Table>,
    /// Every change, in index order. Sent while `table` is locked, so a subscriber that takes a
    /// snapshot under the same lock sees each change exactly once.
    events: broadcast::Sender<Line>,
    /// Wakes the expiry timer when a deadline earlier than all others appears.
    wake: Notify,
    metrics: Arc<Metrics>,
    store: RouteStore,
    /// Serializes route writes, so that each one persists the routes as the previous one left them.
    route_writes: tokio::sync::Mutex<()>,
    /// The newest snapshot line built, shared by every watcher that subscribes at its index:
    /// hundreds of watchers reconnecting together cost one serialization, not hundreds, and
    /// none of it happens under the table's lock.
    snapshot: Mutex<Option<Line>>,
}

#[derive(Default)]
struct Table {
    index: u64,
    services: BTreeMap<ServiceName, BTreeMap<InstanceId, Entry>>,
    routes: BTreeMap<ServiceName, Route>,
    /// TTL deadlines of expiring instances, earliest first.
    deadlines: BTreeSet<(Instant, ServiceName, InstanceId)>,
    /// Services that have had a live instance since the directory started.
    known: BTreeSet<ServiceName>,
    /// Services whose route falls back to all their live instances, because none of the
    /// versions it routes to has one ([`route_falls_back`]).
    falling_back: BTreeSet<ServiceName>,
}

struct Entry {
    instance: Instance,
    deadline: Option<Instant>,
}

/// Counts and logs what a `put` did to `instance`; true when watchers must hear of it.
fn record(m: &Metrics, outcome: Outcome, instance: &Instance) -> bool {
    let Instance {
        service,
        id,
        address,
        port,
        version,
        weight,
        source,
        ..
    } = instance;
    match outcome {
        Outcome::Added => {
            m.registrations.get_or_create(&(*source).into()).inc();
            tracing::info!(
                "registered {service}/{id} at {address}:{port} (version {version}, weight {weight}, {source})"
            );
        }
        Outcome::Changed => tracing::info!(
            "updated {service}/{id}: now at {address}:{port} (version {version}, weight {weight}, {source})"
        ),
        Outcome::Renewed => return false,
    }
    true
}

/// A call over the API that would change an instance another source owns.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "instance {service}/{id} was discovered from Docker: the API may not replace or remove it \
     (it leaves when its container stops or loses its baker.service label); register under \
     another id"
)]
pub struct Conflict {
    pub service: ServiceName,
    pub id: InstanceId,
}

/// What an upsert did to the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// A new instance.
    Added,
    /// An existing instance whose address, port, version, weight, tags, TTL or source changed.
    Changed,
    /// A heartbeat: only `last_seen` (and the TTL deadline) moved.
    Renewed,
}

fn unix_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

/// Whether two instances differ in anything a consumer acts on (all but `last_seen`).
fn same_but_last_seen(a: &Instance, b: &Instance) -> bool {
    a.address == b.address
        && a.port == b.port
        && a.version == b.version
        && a.weight == b.weight
        && a.tags == b.tags
        && a.source == b.source
        && a.ttl_ms == b.ttl_ms
}

impl Table {
    fn put(
        &mut self,
        service: &ServiceName,
        id: &InstanceId,
        spec: ValidSpec,
        source: Source,
        now: Instant,
    ) -> (Instance, Outcome) {
        let instance = Instance {
            service: service.clone(),
            id: id.clone(),
            address: spec.address,
            port: spec.port,
            version: spec.version,
            weight: spec.weight,
            tags: spec.tags,
            source,
            ttl_ms: spec.ttl_ms,
            last_seen: unix_millis(),
        };
        let deadline = match source {
            Source::Registrar => Some(now + Duration::from_millis(spec.ttl_ms)),
            Source::Docker => None,
        };
        if !self.known.contains(service) {
            self.known.insert(service.clone());
        }
        let entries = self.services.entry(service.to_owned()).or_default();
        let outcome = match entries.get_mut(id) {
            Some(entry) => {
                let outcome = if same_but_last_seen(&entry.instance, &instance) {
                    Outcome::Renewed
                } else {
                    Outcome::Changed
                };
                if let Some(old) = entry.deadline {
                    self.deadlines.remove(&(old, service.clone(), id.clone()));
                }
                entry.instance = instance.clone();
                entry.deadline = deadline;
                outcome
            }
            None => {
                entries.insert(
                    id.clone(),
                    Entry {
                        instance: instance.clone(),
                        deadline,
                    },
                );
                Outcome::Added
            }
        };
        if let Some(d) = deadline {
            self.deadlines.insert((d, service.clone(), id.clone()));
        }
        (instance, outcome)
    }

    /// Where the registered `service`/`id` came from, if it is registered.
    fn source_of(&self, service: &ServiceName, id: &InstanceId) -> Option<Source> {
        Some(self.services.get(service)?.get(id)?.instance.source)
    }

    fn take(&mut self, service: &ServiceName, id: &InstanceId) -> Option<Instance> {
        let entries = self.services.get_mut(service)?;
        let entry = entries.remove(id)?;
        if let Some(d) = entry.deadline {
            self.deadlines.remove(&(d, service.clone(), id.clone()));
        }
        Some(entry.instance)
    }

    fn instances(&self, service: &ServiceName) -> Vec<Instance> {
        self.services
            .get(service)
            .map(|m| m.values().map(|e| e.instance.clone()).collect())
            .unwrap_or_default()
    }

    fn all_instances(&self) -> BTreeMap<ServiceName, Vec<Instance>> {
        self.services
            .iter()
            .filter(|(_, m)| !m.is_empty())
            .map(|(s, m)| (s.clone(), m.values().map(|e| e.instance.clone()).collect()))
            .collect()
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.deadlines.first().map(|(d, _, _)| *d)
    }
}

impl Registry {
    /// A registry holding `routes` (as loaded from `store`), persisting route changes to `store`.
    ///
    /// `event_capacity` bounds the feed between the table and the watchers' own queues.
    pub fn new(
        store: RouteStore,
        routes: BTreeMap<ServiceName, Route>,
        metrics: Arc<Metrics>,
        event_capacity: usize,
    ) -> Registry {
        let (events, _) = broadcast::channel(event_capacity.max(16));
        metrics.routes.set(routes.len() as i64);
        Registry {
            inner: Arc::new(Inner {
                table: Mutex::new(Table {
                    routes,
                    ..Table::default()
                }),
                events,
                wake: Notify::new(),
                metrics,
                store,
                route_writes: tokio::sync::Mutex::new(()),
                snapshot: Mutex::new(None),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        // A panic while holding the lock leaves a consistent table (each change is applied
        // before it is published), so a poisoned lock is still usable.
        self.inner
            .table
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The metrics this registry updates.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.inner.metrics
    }

    /// Bumps the index and publishes `service`'s whole instance list. Called with the lock held.
    fn publish_service(&self, t: &mut Table, service: &ServiceName) {
        let instances = t.instances(service);
        if instances.is_empty() {
            t.services.remove(service);
            self.inner.metrics.instances.remove(&ServiceLabel {
                service: service.to_string(),
            });
        } else {
            self.inner
                .metrics
                .instances
                .get_or_create(&ServiceLabel {
                    service: service.to_string(),
                })
                .set(instances.len() as i64);
        }
        t.index += 1;
        self.inner.metrics.changes.inc();
        let line = Line::of(&WatchEvent::Service {
            index: t.index,
            service: service.clone(),
            instances,
        });
        // No receiver is fine: nobody is watching.
        let _ = self.inner.events.send(line);
        self.follow_fallback(t, service);
    }

    /// Notes whether `service`'s route now falls back to all its live instances, logging and
    /// counting a change. Called with the lock held, after any change to its instances or route.
    fn follow_fallback(&self, t: &mut Table, service: &ServiceName) {
        let instances = t.services.get(service);
        let versions = instances
            .into_iter()
            .flat_map(|m| m.values().map(|e| e.instance.version.as_str()));
        let route = t.routes.get(service);
        let now = route.is_some_and(|r| route_falls_back(r, versions));
        if now == t.falling_back.contains(service) {
            return;
        }
        if now {
            let live = instances.map_or(0, BTreeMap::len);
            tracing::warn!(
                service = %service,
                route = %route.map(describe).unwrap_or_default(),
                live,
                "no live instance has a version the route sends traffic to: the service falls \
                 back to all its live instances by their weights until one does"
            );
            t.falling_back.insert(service.clone());
        } else {
            tracing::info!(service = %service, "no longer falling back to all live instances");
            t.falling_back.remove(service);
        }
        self.inner
            .metrics
            .routes_falling_back
            .set(t.falling_back.len() as i64);
    }

    /// Whether `service` has had a live instance since the directory started, or has a route.
    /// A route for any other service needs `force`: its name is likely a mistake.
    pub fn knows(&self, service: &ServiceName) -> bool {
        let t = self.lock();
        t.known.contains(service) || t.routes.contains_key(service)
    }

    /// Wakes the expiry timer if `after` is earlier than `before`.
    fn rearm(&self, before: Option<Instant>, after: Option<Instant>) {
        if let Some(a) = after {
            if before.is_none_or(|b| a < b) {
                self.inner.wake.notify_one();
            }
        }
    }

    /// Registers or renews `service`/`id` (idempotent).
    ///
    /// A new instance, or one whose address, port, version, weight, tags, TTL or source
    /// changed, is published to watchers; a plain heartbeat only renews the TTL and `last_seen`.
    /// A registrar's registration of an instance Docker discovered is refused and changes
    /// nothing; Docker's replaces a registrar's.
    pub fn upsert(
        &self,
        service: &ServiceName,
        id: &InstanceId,
        spec: ValidSpec,
        source: Source,
    ) -> Result<Instance, Conflict> {
        let mut t = self.lock();
        check_takeover(&t, service, id, source)?;
        let before = t.next_deadline();
        let (instance, outcome) = t.put(service, id, spec, source, Instant::now());
        self.rearm(before, t.next_deadline());
        if outcome != Outcome::Added {
            self.inner.metrics.heartbeats.inc();
        }
        if record(&self.inner.metrics, outcome, &instance) {
            self.publish_service(&mut t, service);
        } else {
            tracing::trace!("heartbeat from {service}/{id}");
        }
        Ok(instance)
    }

    /// Deregisters `service`/`id` on an API call: removes it now and returns it, `None` if it
    /// was not registered. An instance Docker discovered is not the API's to remove.
    pub fn deregister(
        &self,
        service: &ServiceName,
        id: &InstanceId,
    ) -> Result<Option<Instance>, Conflict> {
        let mut t = self.lock();
        if t.source_of(service, id) == Some(Source::Docker) {
            return Err(Conflict {
                service: service.clone(),
                id: id.clone(),
            });
        }
        Ok(self.take(&mut t, service, id))
    }

    /// Removes `service`/`id` now, whatever its source; `false` if it was not registered.
    pub fn remove(&self, service: &ServiceName, id: &InstanceId) -> bool {
        let mut t = self.lock();
        self.take(&mut t, service, id).is_some()
    }

    /// Removes `service`/`id` and publishes the change. Called with the lock held.
    fn take(&self, t: &mut Table, service: &ServiceName, id: &InstanceId) -> Option<Instance> {
        let instance = t.take(service, id)?;
        self.inner
            .metrics
            .deregistrations
            .get_or_create(&instance.source.into())
            .inc();
        tracing::info!("deregistered {service}/{id} ({})", instance.source);
        self.publish_service(t, service);
        Some(instance)
    }

    /// Makes the instances of `source` exactly `instances` (service, id, spec): adds and updates
    /// those listed, removes those of `source` not listed, and leaves other sources alone.
    /// Publishes one event per service that changed, none for services that did not.
    pub fn sync_source(
        &self,
        source: Source,
        instances: Vec<(ServiceName, InstanceId, ValidSpec)>,
    ) {
        let mut t = self.lock();
        let before = t.next_deadline();
        let now = Instant::now();
        let desired: BTreeMap<(ServiceName, InstanceId), ValidSpec> = instances
            .into_iter()
            .map(|(s, id, spec)| ((s, id), spec))
            .collect();
        let stale: Vec<(ServiceName, InstanceId)> = t
            .services
            .iter()
            .flat_map(|(s, entries)| {
                entries
                    .iter()
                    .filter(|(_, e)| e.instance.source == source)
                    .map(move |(id, _)| (s.clone(), id.clone()))
            })
            .filter(|key| !desired.contains_key(key))
            .collect();
        let m = Arc::clone(&self.inner.metrics);
        let mut changed = BTreeSet::new();
        for (service, id) in stale {
            if t.take(&service, &id).is_some() {
                m.deregistrations.get_or_create(&source.into()).inc();
                tracing::info!("deregistered {service}/{id} ({source}, gone on resync)");
                changed.insert(service);
            }
        }
        for ((service, id), spec) in desired {
            if check_takeover(&t, &service, &id, source).is_err() {
                continue;
            }
            let (instance, outcome) = t.put(&service, &id, spec, source, now);
            if record(&m, outcome, &instance) {
                changed.insert(service);
            }
        }
        self.rearm(before, t.next_deadline());
        for service in changed {
            self.publish_service(&mut t, &service);
        }
    }

    /// Removes every expiring instance whose deadline is at or before `now`; returns how many.
    pub fn expire_due(&self, now: Instant) -> usize {
        let mut t = self.lock();
        let mut changed = BTreeSet::new();
        let mut count = 0;
        while let Some((deadline, service, id)) = t.deadlines.first().cloned() {
            if deadline > now {
                break;
            }
            t.deadlines.pop_first();
            if let Some(entries) = t.services.get_mut(&service) {
                if let Some(entry) = entries.remove(&id) {
                    count += 1;
                    self.inner.metrics.expiries.inc();
                    tracing::info!(
                        "expired {service}/{id}: no heartbeat for {} ms",
                        entry.instance.ttl_ms
                    );
                    changed.insert(service);
                }
            }
        }
        for service in changed {
            self.publish_service(&mut t, &service);
        }
        count
    }

    /// The earliest TTL deadline, if any instance can expire.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.lock().next_deadline()
    }

    /// Expires instances as their deadlines pass, until `shutdown` is cancelled.
    pub async fn run_expiry(self, shutdown: CancellationToken) {
        loop {
            let next = self.next_deadline();
            let woken = self.inner.wake.notified();
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = woken => {}
                _ = sleep_until(next) => {
                    self.expire_due(Instant::now());
                }
            }
        }
    }

    /// The current change index.
    pub fn index(&self) -> u64 {
        self.lock().index
    }

    /// Every service with its live instances.
    pub fn services(&self) -> ServicesResponse {
        let t = self.lock();
        ServicesResponse {
            index: t.index,
            services: t.all_instances(),
        }
    }

    /// One service's instances and route; `None` when it has neither.
    pub fn service(&self, service: &ServiceName) -> Option<ServiceResponse> {
        let t = self.lock();
        let instances = t.instances(service);
        let route = t.routes.get(service).cloned();
        if instances.is_empty() && route.is_none() {
            return None;
        }
        Some(ServiceResponse {
            index: t.index,
            service: service.clone(),
            instances,
            route,
        })
    }

    /// Every route.
    pub fn routes(&self) -> RoutesResponse {
        let t = self.lock();
        RoutesResponse {
            index: t.index,
            routes: t.routes.clone(),
        }
    }

    /// A snapshot line of the whole table, and a receiver of every change after it.
    ///
    /// The receiver is taken under the table's lock together with the snapshot's index, so the
    /// watcher sees each later change exactly once; the snapshot itself is serialized outside
    /// the lock, once per index.
    pub fn subscribe(&self) -> (Line, broadcast::Receiver<Line>) {
        let (index, services, routes, rx) = {
            let t = self.lock();
            let rx = self.inner.events.subscribe();
            if let Some(line) = self.cached_snapshot(t.index) {
                return (line, rx);
            }
            (t.index, t.all_instances(), t.routes.clone(), rx)
        };
        let line = Line::of(&WatchEvent::Snapshot {
            index,
            services,
            routes,
        });
        let mut cache = self
            .inner
            .snapshot
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if cache.as_ref().is_none_or(|c| c.index < index) {
            *cache = Some(line.clone());
        }
        (line, rx)
    }

    fn cached_snapshot(&self, index: u64) -> Option<Line> {
        let cache = self
            .inner
            .snapshot
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        cache.as_ref().filter(|c| c.index == index).cloned()
    }

    /// Sets (`Some`) or clears (`None`) `service`'s route. Returns `Ok(None)` when clearing a
    /// route that does not exist. Setting the route a service already has changes nothing.
    ///
    /// The route is durable before this returns `Ok`, but watchers hear of it while it is being
    /// written: the write (two fsyncs) starts first, then the change is applied and published,
    /// then the write is awaited. So ambassadors apply a route in the time of one watch event,
    /// not of one fsync, and the answer still waits for the disk. If the write fails, the
    /// previous route is applied and published again, and the error returned: no route stays
    /// in effect that the directory did not persist. If the directory dies before the write
    /// ends, it restarts with the routes on disk, and every ambassador, reconnecting, replaces
    /// all its routes with that snapshot's (ambassadors hold no route of their own), so none
    /// stays on a route the directory lost; the caller got no answer, so it knows nothing was
    /// confirmed.
    pub async fn set_route(
        &self,
        service: &ServiceName,
        route: Option<Route>,
    ) -> Result<Option<RouteResponse>, StoreError> {
        let _writing = self.inner.route_writes.lock().await;
        let (mut routes, previous) = {
            let t = self.lock();
            let current = t.routes.get(service);
            if current == route.as_ref() {
                return Ok(current.is_some().then(|| RouteResponse {
                    index: t.index,
                    service: service.clone(),
                    route: current.cloned(),
                }));
            }
            (t.routes.clone(), current.cloned())
        };
        match &route {
            Some(r) => routes.insert(service.clone(), r.clone()),
            None => routes.remove(service),
        };
        let store = self.inner.store.clone();
        let write = tokio::task::spawn_blocking(move || store.save(&routes));
        let index = self.apply_route(service, route.clone());
        let saved = write.await.map_err(|e| StoreError::Write {
            path: self.inner.store.path(),
            source: std::io::Error::other(e),
        });
        if let Err(e) = saved.and_then(|r| r) {
            let index = self.apply_route(service, previous);
            tracing::error!(
                %service, index, cause = %baker_client::errors::chain(&e),
                "the route could not be saved; the previous route applies again"
            );
            return Err(e);
        }
        tracing::debug!(%service, index, "the route is on disk");
        Ok(Some(RouteResponse {
            index,
            service: service.clone(),
            route,
        }))
    }

    /// Applies and publishes `service`'s route; returns the index of the change.
    fn apply_route(&self, service: &ServiceName, route: Option<Route>) -> u64 {
        let mut t = self.lock();
        match &route {
            Some(r) => {
                t.routes.insert(service.clone(), r.clone());
                tracing::info!("route of {service} set to {}", describe(r));
            }
            None => {
                t.routes.remove(service);
                tracing::info!("route of {service} cleared");
            }
        }
        t.index += 1;
        self.inner.metrics.changes.inc();
        self.inner.metrics.routes.set(t.routes.len() as i64);
        let index = t.index;
        let _ = self.inner.events.send(Line::of(&WatchEvent::Route {
            index,
            service: service.clone(),
            route,
        }));
        self.follow_fallback(&mut t, service);
        index
    }
}

/// Whether `source` may put `service`/`id`: a registrar may not replace a Docker instance;
/// Docker replaces a registrar's, with a warning.
fn check_takeover(
    t: &Table,
    service: &ServiceName,
    id: &InstanceId,
    source: Source,
) -> Result<(), Conflict> {
    match (t.source_of(service, id), source) {
        (Some(Source::Docker), Source::Registrar) => Err(Conflict {
            service: service.clone(),
            id: id.clone(),
        }),
        (Some(Source::Registrar), Source::Docker) => {
            tracing::warn!(
                service = %service,
                id = %id,
                "a Docker container takes over an instance registered over the API; \
                 registrations of this id are refused while the container runs"
            );
            Ok(())
        }
        _ => Ok(()),
    }
}

/// `1=90%, 2=10%`.
fn describe(route: &Route) -> String {
    route
        .iter()
        .map(|(v, p)| format!("{v}={p}%"))
        .collect::<Vec<_>>()
        .join(", ")
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(name: &str) -> ServiceName {
        name.parse().unwrap()
    }

    fn iid(id: &str) -> InstanceId {
        id.parse().unwrap()
    }

    fn spec(port: u16, ttl_ms: u64) -> ValidSpec {
        ValidSpec {
            address: "10.0.0.1".parse().unwrap(),
            port,
            version: "1".parse().unwrap(),
            weight: 100,
            tags: vec![],
            ttl_ms,
        }
    }

    fn registry() -> (Registry, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let store = RouteStore::open(dir.path()).unwrap();
        let routes = store.load().unwrap();
        (
            Registry::new(store, routes, Arc::new(Metrics::new()), 64),
            dir,
        )
    }

    fn events(rx: &mut broadcast::Receiver<Line>) -> Vec<WatchEvent> {
        let mut out = Vec::new();
        while let Ok(line) = rx.try_recv() {
            out.push(serde_json::from_slice(&line.bytes).unwrap());
        }
        out
    }

    fn ids(event: &WatchEvent) -> (u64, String, Vec<String>) {
        match event {
            WatchEvent::Service {
                index,
                service,
                instances,
            } => (
                *index,
                service.to_string(),
                instances.iter().map(|i| i.id.to_string()).collect(),
            ),
            other => panic!("not a service event: {other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn heartbeats_publish_nothing_but_changes_do() {
        let (r, _dir) = registry();
        let (snapshot, mut rx) = r.subscribe();
        assert_eq!(snapshot.index, 0);
        r.upsert(
            &svc("emitter"),
            &iid("a"),
            spec(80, 1000),
            Source::Registrar,
        )
        .unwrap();
        r.upsert(
            &svc("emitter"),
            &iid("a"),
            spec(80, 1000),
            Source::Registrar,
        )
        .unwrap();
        r.upsert(
            &svc("emitter"),
            &iid("a"),
            spec(80, 1000),
            Source::Registrar,
        )
        .unwrap();
        assert_eq!(r.index(), 1);
        let mut heavier = spec(80, 1000);
        heavier.weight = 50;
        r.upsert(&svc("emitter"), &iid("a"), heavier, Source::Registrar)
            .unwrap();
        r.upsert(
            &svc("emitter"),
            &iid("b"),
            spec(81, 1000),
            Source::Registrar,
        )
        .unwrap();
        let got: Vec<_> = events(&mut rx).iter().map(ids).collect();
        assert_eq!(
            got,
            [
                (1, "emitter".parse().unwrap(), vec!["a".parse().unwrap()]),
                (2, "emitter".parse().unwrap(), vec!["a".parse().unwrap()]),
                (
                    3,
                    "emitter".parse().unwrap(),
                    vec!["a".parse().unwrap(), "b".parse().unwrap()]
                ),
            ]
        );
        assert_eq!(r.metrics().heartbeats.get(), 3);
        assert_eq!(r.services().services["emitter"][0].weight, 50);
    }

    #[tokio::test(start_paused = true)]
    async fn silence_expires_on_the_timer_and_heartbeats_keep_alive() {
        let (r, _dir) = registry();
        let shutdown = CancellationToken::new();
        let timer = tokio::spawn(r.clone().run_expiry(shutdown.clone()));
        let (_, mut rx) = r.subscribe();
        r.upsert(
            &svc("emitter"),
            &iid("a"),
            spec(80, 1000),
            Source::Registrar,
        )
        .unwrap();
        r.upsert(
            &svc("emitter"),
            &iid("b"),
            spec(81, 3000),
            Source::Registrar,
        )
        .unwrap();
        // Keep `a` alive for 5 s with a heartbeat every 500 ms.
        for _ in 0..10 {
            tokio::time::sleep(Duration::from_millis(500)).await;
            r.upsert(
                &svc("emitter"),
                &iid("a"),
                spec(80, 1000),
                Source::Registrar,
            )
            .unwrap();
        }
        // `b` went silent at t=0 and expired at t=3 s, with no read to drive it.
        let got: Vec<_> = events(&mut rx).iter().map(ids).collect();
        assert_eq!(
            got,
            [
                (1, "emitter".parse().unwrap(), vec!["a".parse().unwrap()]),
                (
                    2,
                    "emitter".parse().unwrap(),
                    vec!["a".parse().unwrap(), "b".parse().unwrap()]
                ),
                (3, "emitter".parse().unwrap(), vec!["a".parse().unwrap()]),
            ]
        );
        // Now `a` goes silent: it expires 1 s after its last heartbeat, not before.
        tokio::time::sleep(Duration::from_millis(990)).await;
        assert_eq!(r.services().services["emitter"].len(), 1);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(r.services().services.is_empty());
        assert!(r.service(&svc("emitter")).is_none());
        let got: Vec<_> = events(&mut rx).iter().map(ids).collect();
        assert_eq!(got, [(4, "emitter".parse().unwrap(), vec![])]);
        assert_eq!(r.metrics().expiries.get(), 2);
        shutdown.cancel();
        timer.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_shorter_ttl_rearms_the_timer() {
        let (r, _dir) = registry();
        let shutdown = CancellationToken::new();
        let timer = tokio::spawn(r.clone().run_expiry(shutdown.clone()));
        r.upsert(&svc("s"), &iid("long"), spec(80, 60_000), Source::Registrar)
            .unwrap();
        tokio::task::yield_now().await;
        r.upsert(&svc("s"), &iid("short"), spec(81, 200), Source::Registrar)
            .unwrap();
        tokio::time::sleep(Duration::from_millis(250)).await;
        let left: Vec<_> = r.services().services["s"]
            .iter()
            .map(|i| i.id.clone())
            .collect();
        assert_eq!(left, ["long"]);
        shutdown.cancel();
        timer.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn docker_instances_never_expire_by_ttl() {
        let (r, _dir) = registry();
        r.upsert(&svc("web"), &iid("c1"), spec(80, 100), Source::Docker)
            .unwrap();
        assert_eq!(r.next_deadline(), None);
        tokio::time::advance(Duration::from_secs(3600)).await;
        assert_eq!(r.expire_due(Instant::now()), 0);
        assert_eq!(r.services().services["web"].len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn the_api_cannot_take_over_a_docker_instance() {
        let (r, _dir) = registry();
        r.upsert(&svc("web"), &iid("c1"), spec(80, 100), Source::Docker)
            .unwrap();
        let (_, mut rx) = r.subscribe();
        // A short-lived registration of the same id is refused and changes nothing ...
        let err = r
            .upsert(&svc("web"), &iid("c1"), spec(9999, 100), Source::Registrar)
            .unwrap_err();
        assert!(err.to_string().contains("discovered from Docker"), "{err}");
        assert_eq!(r.deregister(&svc("web"), &iid("c1")), Err(err));
        assert!(events(&mut rx).is_empty());
        // ... so nothing expires, and the container's instance stays.
        assert_eq!(r.next_deadline(), None);
        tokio::time::advance(Duration::from_secs(60)).await;
        assert_eq!(r.expire_due(Instant::now()), 0);
        let web = &r.services().services["web"];
        assert_eq!((web[0].port, web[0].source), (80, Source::Docker));
        // Another id is fine.
        r.upsert(&svc("web"), &iid("c2"), spec(81, 100), Source::Registrar)
            .unwrap();
        assert_eq!(
            r.deregister(&svc("web"), &iid("c2")).unwrap().unwrap().id,
            "c2"
        );
        assert_eq!(r.deregister(&svc("web"), &iid("c2")), Ok(None));
    }

    #[tokio::test(start_paused = true)]
    async fn docker_takes_over_an_api_instance_of_the_same_id() {
        let (r, _dir) = registry();
        r.upsert(&svc("web"), &iid("c1"), spec(80, 100), Source::Registrar)
            .unwrap();
        r.sync_source(Source::Docker, vec![(svc("web"), iid("c1"), spec(81, 100))]);
        assert_eq!(
            r.next_deadline(),
            None,
            "the registrar's TTL no longer applies"
        );
        tokio::time::advance(Duration::from_secs(60)).await;
        assert_eq!(r.expire_due(Instant::now()), 0);
        let web = &r.services().services["web"];
        assert_eq!((web[0].port, web[0].source), (81, Source::Docker));
        // The registrar's next heartbeat is refused; once the container is gone, it is not.
        assert!(r
            .upsert(&svc("web"), &iid("c1"), spec(80, 100), Source::Registrar)
            .is_err());
        r.sync_source(Source::Docker, vec![]);
        r.upsert(&svc("web"), &iid("c1"), spec(80, 100), Source::Registrar)
            .unwrap();
    }

    #[tokio::test]
    async fn deregister_removes_at_once() {
        let (r, _dir) = registry();
        let (_, mut rx) = r.subscribe();
        r.upsert(
            &svc("emitter"),
            &iid("a"),
            spec(80, 6000),
            Source::Registrar,
        )
        .unwrap();
        assert!(r.remove(&svc("emitter"), &iid("a")));
        assert!(!r.remove(&svc("emitter"), &iid("a")));
        assert!(r.services().services.is_empty());
        assert_eq!(r.next_deadline(), None);
        let got: Vec<_> = events(&mut rx).iter().map(ids).collect();
        assert_eq!(
            got,
            [
                (1, "emitter".parse().unwrap(), vec!["a".parse().unwrap()]),
                (2, "emitter".parse().unwrap(), vec![])
            ]
        );
        assert_eq!(
            r.metrics()
                .deregistrations
                .get_or_create(&Source::Registrar.into())
                .get(),
            1
        );
    }

    #[tokio::test]
    async fn sync_source_replaces_exactly_that_source_and_publishes_only_changes() {
        let (r, _dir) = registry();
        r.upsert(
            &svc("web"),
            &iid("by-hand"),
            spec(80, 6000),
            Source::Registrar,
        )
        .unwrap();
        r.sync_source(
            Source::Docker,
            vec![
                (
                    "web".parse().unwrap(),
                    "c1".parse().unwrap(),
                    spec(81, 6000),
                ),
                (
                    "web".parse().unwrap(),
                    "c2".parse().unwrap(),
                    spec(82, 6000),
                ),
                (
                    "db".parse().unwrap(),
                    "c3".parse().unwrap(),
                    spec(5432, 6000),
                ),
            ],
        );
        let (snapshot, mut rx) = r.subscribe();
        assert_eq!(snapshot.index, 3);
        // Same set again: nothing changes, nothing is published.
        r.sync_source(
            Source::Docker,
            vec![
                (
                    "web".parse().unwrap(),
                    "c1".parse().unwrap(),
                    spec(81, 6000),
                ),
                (
                    "web".parse().unwrap(),
                    "c2".parse().unwrap(),
                    spec(82, 6000),
                ),
                (
                    "db".parse().unwrap(),
                    "c3".parse().unwrap(),
                    spec(5432, 6000),
                ),
            ],
        );
        assert!(events(&mut rx).is_empty());
        // c2 gone, db unchanged, a new service appears.
        r.sync_source(
            Source::Docker,
            vec![
                (
                    "web".parse().unwrap(),
                    "c1".parse().unwrap(),
                    spec(81, 6000),
                ),
                (
                    "db".parse().unwrap(),
                    "c3".parse().unwrap(),
                    spec(5432, 6000),
                ),
                (
                    "cache".parse().unwrap(),
                    "c4".parse().unwrap(),
                    spec(6379, 6000),
                ),
            ],
        );
        let got: Vec<_> = events(&mut rx).iter().map(ids).collect();
        assert_eq!(
            got,
            [
                (4, "cache".parse().unwrap(), vec!["c4".parse().unwrap()]),
                (
                    5,
                    "web".parse().unwrap(),
                    vec!["by-hand".parse().unwrap(), "c1".parse().unwrap()]
                ),
            ]
        );
        // An empty sync removes every Docker instance and leaves the registrar's.
        r.sync_source(Source::Docker, vec![]);
        let all = r.services().services;
        assert_eq!(all.keys().collect::<Vec<_>>(), ["web"]);
        assert_eq!(all["web"][0].id, "by-hand");
    }

    #[tokio::test]
    async fn routes_persist_publish_and_ignore_no_ops() {
        let (r, dir) = registry();
        let (_, mut rx) = r.subscribe();
        let route: Route = [("1".parse().unwrap(), 90), ("2".parse().unwrap(), 10)].into();
        let set = r
            .set_route(&svc("emitter"), Some(route.clone()))
            .await
            .unwrap()
            .unwrap();
        assert_eq!((set.index, set.route.as_ref()), (1, Some(&route)));
        let again = r
            .set_route(&svc("emitter"), Some(route.clone()))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(again.index, 1);
        // It is on disk, and a new registry starts with it.
        let store = RouteStore::open(dir.path()).unwrap();
        assert_eq!(store.load().unwrap()["emitter"], route);
        let cleared = r.set_route(&svc("emitter"), None).await.unwrap().unwrap();
        assert_eq!((cleared.index, cleared.route), (2, None));
        assert!(r.set_route(&svc("emitter"), None).await.unwrap().is_none());
        assert!(store.load().unwrap().is_empty());
        let got = events(&mut rx);
        assert_eq!(
            got,
            [
                WatchEvent::Route {
                    index: 1,
                    service: "emitter".parse().unwrap(),
                    route: Some(route)
                },
                WatchEvent::Route {
                    index: 2,
                    service: "emitter".parse().unwrap(),
                    route: None
                },
            ]
        );
    }

    #[tokio::test]
    async fn a_failed_route_write_leaves_the_previous_route_in_effect() {
        let (r, dir) = registry();
        let route: Route = [("1".parse().unwrap(), 100)].into();
        r.set_route(&svc("emitter"), Some(route.clone()))
            .await
            .unwrap();
        let (_, mut rx) = r.subscribe();
        // Make the data directory unwritable by replacing it with a file.
        let data = dir.path().to_owned();
        drop(dir);
        std::fs::write(&data, "not a directory").unwrap();
        let canary: Route = [("1".parse().unwrap(), 90), ("2".parse().unwrap(), 10)].into();
        assert!(r
            .set_route(&svc("emitter"), Some(canary.clone()))
            .await
            .is_err());
        assert_eq!(r.routes().routes, [(svc("emitter"), route.clone())].into());
        // Watchers heard of the new route while it was written, then of the old one again.
        assert_eq!(
            events(&mut rx),
            [
                WatchEvent::Route {
                    index: 2,
                    service: svc("emitter"),
                    route: Some(canary)
                },
                WatchEvent::Route {
                    index: 3,
                    service: svc("emitter"),
                    route: Some(route)
                },
            ]
        );
        // A failed write of a new route leaves none.
        assert!(r
            .set_route(&svc("other"), Some([("1".parse().unwrap(), 100)].into()))
            .await
            .is_err());
        assert!(!r.routes().routes.contains_key("other"));
        std::fs::remove_file(&data).unwrap();
    }

    #[tokio::test]
    async fn snapshot_and_feed_do_not_overlap() {
        let (r, _dir) = registry();
        r.upsert(&svc("a"), &iid("1"), spec(80, 6000), Source::Registrar)
            .unwrap();
        let (snapshot, mut rx) = r.subscribe();
        r.upsert(&svc("b"), &iid("1"), spec(80, 6000), Source::Registrar)
            .unwrap();
        let snap: WatchEvent = serde_json::from_slice(&snapshot.bytes).unwrap();
        let mut state = baker_client::State::default();
        state.apply(snap);
        for e in events(&mut rx) {
            assert!(e.index() > state.index);
            state.apply(e);
        }
        assert_eq!(state.services, r.services().services);
        assert_eq!(state.index, r.index());
    }
}
