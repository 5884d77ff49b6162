//! The table of live instances and routes: its revisions, its TTL timer and its change feed.
//!
//! [`Registry`] is a cheap, cloneable handle. The HTTP API and Docker discovery change the
//! table only through it, and every real change does three things under one lock: apply it to
//! the [`Store`] (which gives it the next revision), and publish one [`Change`] on the
//! [`feed`](crate::feed) with its cause and time. A change to one instance carries that
//! instance only, so its cost does not grow with the size of its service. A heartbeat that
//! changes nothing but `last_seen` is not a change: it gets no revision and publishes nothing,
//! so the `last_seen` carried by a change is the time of the instance's last change, while
//! `GET /v1/services` shows the time of its last heartbeat.
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

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use baker_client::change::{Change, MaintenanceAction, RemoveCause, UpsertCause};
use baker_client::events::unix_millis;
use baker_client::maintenance::{
    Drain, DrainResponse, InstanceState, Maintenance, MaintenanceEntry, Reason, Target,
};
use baker_client::model::{
    route_falls_back_by_version, Instance, InstanceId, Route, RouteResponse, RoutesResponse,
    ServiceName, ServiceResponse, ServicesResponse, Source, ValidSpec, Version, WatchEvent,
};
use bytes::Bytes;
use tokio::sync::{broadcast, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::feed::{Feed, Published, Receiver};
use crate::maintenance::MaintenanceFiles;
use crate::metrics::{Metrics, QuotaLabel, ServiceLabel};
use crate::quota::{Exceeded, Occupancy, Quotas};
use crate::routes::{RouteStore, StoreError};
use crate::store::{MemoryStore, Store};

mod known;
mod replica;

pub use replica::{WriteError, REPLICA_LEASE};

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
    /// Wakes the expiry timer when a deadline earlier than all others appears.
    wake: Notify,
    metrics: Arc<Metrics>,
    /// The limits on growth, checked under the table's lock.
    quotas: Quotas,
    /// Where routes persist in memory mode; `None` with etcd, which holds them.
    route_file: Option<RouteStore>,
    /// With etcd: the connection, and how far this replica's mirror has come.
    replica: Option<replica::Replica>,
    /// One lock per service whose route is being written: a service's route writes run one
    /// at a time (each persists the route the previous one left), other services' alongside.
    route_writes: Mutex<HashMap<ServiceName, Arc<tokio::sync::Mutex<()>>>>,
    /// Where drains persist, one file per service; `None` when the table lives in etcd.
    maintenance_files: Option<MaintenanceFiles>,
    /// Serializes drain writes, so that each one persists the drains as the previous one left
    /// them.
    maintenance_writes: tokio::sync::Mutex<()>,
    /// The newest unfiltered snapshot line built, shared by every watcher that subscribes at
    /// its index: hundreds of watchers reconnecting together cost one serialization, not
    /// hundreds, and none of it happens under the table's lock.
    snapshot: Mutex<Option<Line>>,
}

struct Table {
    store: Box<dyn Store>,
    /// Every change, published in revision order while the table is locked, so a subscriber
    /// that takes a snapshot under the same lock sees each later change exactly once.
    feed: Feed,
    /// TTL deadlines of expiring instances, earliest first ...
    deadlines: BTreeSet<(Instant, ServiceName, InstanceId)>,
    /// ... and each expiring instance's deadline.
    leases: HashMap<(ServiceName, InstanceId), Instant>,
    /// Services that have had a live instance since the directory started, the
    /// `BAKER_MAX_SERVICES` seen last.
    known: known::Known,
    /// Services whose route falls back to all their live instances, because none of the
    /// targets it routes to has one ([`route_falls_back_by_version`]).
    falling_back: BTreeSet<ServiceName>,
    /// Whether every registrar instance expires here by its TTL (memory); with etcd, only those
    /// bound to this replica's session do, and their deadlines are set by the replica.
    local_expiry: bool,
    /// With etcd: the lease each instance's key is bound to.
    owners: HashMap<(ServiceName, InstanceId), i64>,
    /// With etcd: the revision each service's drains key was last written at, which a drain
    /// written through this replica expects to find (another replica's write in between makes
    /// it decide again).
    drain_revisions: HashMap<ServiceName, i64>,
    /// With etcd: why the instances deleted at one revision went, as that revision's
    /// transaction said; a deletion with no cause is a lease that ran out.
    causes: (u64, HashMap<(ServiceName, InstanceId), RemoveCause>),
    /// For each service another service's route sends traffic to, the services routing to it:
    /// a change of its instances may start or end their fallback.
    targeted_by: BTreeMap<ServiceName, BTreeSet<ServiceName>>,
}

impl Table {
    /// Notes that `service`'s route now names the other services of `route` (none when cleared).
    fn index_targets(&mut self, service: &ServiceName, route: Option<&Route>) {
        self.targeted_by.retain(|_, by| {
            by.remove(service);
            !by.is_empty()
        });
        if let Some(route) = route {
            for other in route.other_services(service) {
                self.targeted_by
                    .entry(other.clone())
                    .or_default()
                    .insert(service.clone());
            }
        }
    }
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

/// Why a registration was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error(transparent)]
    Conflict(#[from] Conflict),
    #[error(transparent)]
    Quota(#[from] Exceeded),
    /// The table lives in etcd, where a registrar's change is written by
    /// [`Registry::register`] or [`Registry::unregister`], which answer once it is stored.
    #[error("the table lives in etcd: a registrar's change is written by register or unregister")]
    NotStored,
}

/// Why a change of the hard state (a route, a drain or an undrain) failed: it changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum ChangeError {
    #[error(transparent)]
    Quota(#[from] Exceeded),
    #[error(transparent)]
    Store(#[from] StoreError),
    /// etcd could not commit it (quorum lost, or no member answered).
    #[error(transparent)]
    Unavailable(#[from] crate::etcd::EtcdError),
}

/// Why a route change failed.
pub type RouteError = ChangeError;

/// Why a drain or undrain failed.
pub type DrainError = ChangeError;

/// What an upsert did to the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// A new instance.
    Added,
    /// An existing instance whose address, port, version, weight, tags, TTL, source or
    /// node changed.
    Changed,
    /// A heartbeat: only `last_seen` (and the TTL deadline) moved.
    Renewed,
}

/// Keeps the time `old`, the instance `instance` replaces, joined the directory: a change or a
/// heartbeat does not make an instance new.
fn joined_as(instance: &mut Instance, old: Option<&Instance>) {
    if let Some(old) = old.filter(|o| o.since != 0) {
        instance.since = old.since;
    }
}

/// Whether two instances differ in anything a consumer acts on (all but `last_seen` and
/// `since`).
fn same_but_last_seen(a: &Instance, b: &Instance) -> bool {
    a.address == b.address
        && a.port == b.port
        && a.version == b.version
        && a.weight == b.weight
        && a.tags == b.tags
        && a.source == b.source
        && a.ttl_ms == b.ttl_ms
        && a.node == b.node
}

impl Table {
    /// Sets (or clears) the TTL deadline of `service`/`id`.
    fn lease(&mut self, service: &ServiceName, id: &InstanceId, deadline: Option<Instant>) {
        let key = (service.clone(), id.clone());
        let old = match deadline {
            Some(d) => self.leases.insert(key, d),
            None => self.leases.remove(&key),
        };
        if let Some(old) = old {
            self.deadlines.remove(&(old, service.clone(), id.clone()));
        }
        if let Some(d) = deadline {
            self.deadlines.insert((d, service.clone(), id.clone()));
        }
    }

    /// Puts `instance`, keeping when it joined if it was there (`instance` is given that time
    /// too); returns what it did and, for a change, its revision.
    fn put(&mut self, instance: &mut Instance, now: Instant) -> (Outcome, u64) {
        let deadline = match instance.source {
            Source::Registrar if self.local_expiry => {
                Some(now + Duration::from_millis(instance.ttl_ms))
            }
            _ => None,
        };
        let (service, id) = (instance.service.clone(), instance.id.clone());
        self.known.note(&service);
        self.lease(&service, &id, deadline);
        let old = self.store.instance(&service, &id);
        joined_as(instance, old);
        let outcome = match old {
            Some(old) if same_but_last_seen(old, instance) => {
                self.store.renew(&service, &id, instance.last_seen);
                return (Outcome::Renewed, self.store.revision());
            }
            Some(_) => Outcome::Changed,
            None => Outcome::Added,
        };
        let (revision, _) = self.store.put(instance.clone());
        (outcome, revision)
    }

    /// Where the registered `service`/`id` came from, if it is registered.
    fn source_of(&self, service: &ServiceName, id: &InstanceId) -> Option<Source> {
        Some(self.store.instance(service, id)?.source)
    }

    /// Removes `service`/`id`; its revision and last value.
    fn take(&mut self, service: &ServiceName, id: &InstanceId) -> Option<(u64, Instance)> {
        let taken = self.store.remove(service, id)?;
        self.lease(service, id, None);
        if self.store.count(service) == 0 {
            self.known.touch(service);
        }
        Some(taken)
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.deadlines.first().map(|(d, _, _)| *d)
    }

    /// `service`'s instances, each marked `up` or `draining` by the service's drains.
    fn marked(&self, service: &ServiceName) -> Vec<Instance> {
        let mut list = self.store.instances(service);
        mark_all(&mut list, self.store.maintenance(service));
        list
    }

    /// Every service's instances (only those in `only` when given), marked by their drains.
    fn marked_services(
        &self,
        only: Option<&BTreeSet<ServiceName>>,
    ) -> BTreeMap<ServiceName, Vec<Instance>> {
        let mut services = self.store.services(only);
        for (name, list) in &mut services {
            mark_all(list, self.store.maintenance(name));
        }
        services
    }

    /// Whether `service`/`id` may be put: always if it is registered, else if it fits `quotas`.
    fn admit(
        &self,
        quotas: &Quotas,
        service: &ServiceName,
        id: &InstanceId,
    ) -> Result<(), Exceeded> {
        if self.store.instance(service, id).is_some() {
            return Ok(());
        }
        let (services, instances) = self.store.totals();
        let occupancy = Occupancy {
            in_service: self.store.count(service),
            services,
            instances,
        };
        quotas.admit_instance(service, occupancy)
    }

    /// How many drains are in place, in every service.
    fn drain_count(&self) -> usize {
        self.store
            .all_maintenance()
            .values()
            .map(Maintenance::len)
            .sum()
    }

    /// Whether a new drain of `service` fits `quotas`, whichever store holds the drains.
    fn admit_drain(&self, quotas: &Quotas, service: &ServiceName) -> Result<(), Exceeded> {
        quotas.admit_drain(service, self.drain_count())
    }
}

/// A subscription to the change feed, with the snapshot it starts from. Dropping it
/// unsubscribes.
pub struct Subscription {
    /// The snapshot (only the filtered services' when filtered).
    pub snapshot: Line,
    /// Every change after the snapshot, of the filtered services when filtered.
    pub feed: Receiver,
    _registration: Registration,
}

/// A subscriber's place in the feed: dropping it unsubscribes (and stops counting a v1
/// watcher). It never exists while the table's lock is held, so dropping it (even while
/// unwinding) cannot deadlock on that lock.
struct Registration {
    registry: Registry,
    id: u64,
    only: Option<BTreeSet<ServiceName>>,
    legacy: bool,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.registry
            .lock()
            .feed
            .unsubscribe(self.id, self.only.as_ref(), self.legacy);
    }
}

/// A claim on one service's route-write lock. Dropping it, when the write is done or when the
/// call is cancelled (its client went away, its deadline passed), forgets the lock once no
/// other call holds or waits for it: the locks in memory are those of the route writes under
/// way, never one per service ever written.
struct RouteClaim {
    registry: Registry,
    service: ServiceName,
    lock: Arc<tokio::sync::Mutex<()>>,
}

impl Drop for RouteClaim {
    fn drop(&mut self) {
        let mut locks = self
            .registry
            .inner
            .route_writes
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        // Clones are made under this lock only: the map's and this claim's make two when no
        // other call has one.
        if Arc::strong_count(&self.lock) == 2 {
            locks.remove(&self.service);
        }
    }
}

/// What a snapshot is made from, read under the table's lock.
enum SnapshotSource {
    /// The cached line of the subscription's index.
    Cached(Line),
    /// The table's content at that index, to serialize outside the lock.
    Table(
        BTreeMap<ServiceName, Vec<Instance>>,
        BTreeMap<ServiceName, Route>,
        BTreeMap<ServiceName, Maintenance>,
    ),
}

impl Registry {
    /// A registry holding `routes` (as loaded from `route_file`), persisting route changes to
    /// `route_file`, with its table in memory.
    ///
    /// `event_capacity` bounds how far an unfiltered subscriber of the feed may fall behind.
    pub fn new(
        route_file: RouteStore,
        routes: BTreeMap<ServiceName, Route>,
        metrics: Arc<Metrics>,
        event_capacity: usize,
    ) -> Registry {
        Registry::with_quotas(
            route_file,
            routes,
            BTreeMap::new(),
            metrics,
            event_capacity,
            Quotas::default(),
        )
    }

    /// [`Registry::new`] with the drains loaded from the data directory and the given quotas.
    pub fn with_quotas(
        route_file: RouteStore,
        routes: BTreeMap<ServiceName, Route>,
        maintenance: BTreeMap<ServiceName, Maintenance>,
        metrics: Arc<Metrics>,
        event_capacity: usize,
        quotas: Quotas,
    ) -> Registry {
        metrics.routes.set(routes.len() as i64);
        metrics
            .drains
            .set(maintenance.values().map(Maintenance::len).sum::<usize>() as i64);
        Registry::with_store(
            Box::new(MemoryStore::new(routes, maintenance)),
            Some(route_file),
            None,
            metrics,
            event_capacity,
            quotas,
        )
    }

    /// A registry over `store`; drains persist beside `route_file`, in its data directory.
    fn with_store(
        store: Box<dyn Store>,
        route_file: Option<RouteStore>,
        replica: Option<replica::Replica>,
        metrics: Arc<Metrics>,
        event_capacity: usize,
        quotas: Quotas,
    ) -> Registry {
        let local_expiry = replica.is_none();
        let mut table = Table {
            store,
            feed: Feed::new(event_capacity),
            deadlines: BTreeSet::new(),
            leases: HashMap::new(),
            known: known::Known::new(quotas.services),
            falling_back: BTreeSet::new(),
            local_expiry,
            owners: HashMap::new(),
            causes: (0, HashMap::new()),
            drain_revisions: HashMap::new(),
            targeted_by: BTreeMap::new(),
        };
        for (service, route) in table.store.routes() {
            table.index_targets(&service, Some(&route));
        }
        Registry {
            inner: Arc::new(Inner {
                table: Mutex::new(table),
                wake: Notify::new(),
                metrics,
                quotas,
                maintenance_files: route_file
                    .as_ref()
                    .map(|f| MaintenanceFiles::under(f.data())),
                route_file,
                replica,
                route_writes: Mutex::new(HashMap::new()),
                maintenance_writes: tokio::sync::Mutex::new(()),
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

    /// Publishes `change`, which the store just applied. Called with the lock held.
    fn publish(&self, t: &mut Table, change: Change) {
        let service = change.service().clone();
        let count = t.store.count(&service);
        let label = ServiceLabel {
            service: service.to_string(),
        };
        if count == 0 {
            self.inner.metrics.instances.remove(&label);
        } else {
            self.inner
                .metrics
                .instances
                .get_or_create(&label)
                .set(count as i64);
        }
        self.inner.metrics.changes.inc();
        if let Change::Route { route, .. } = &change {
            t.index_targets(&service, route.as_ref());
        }
        // A v1 watcher gets the service's whole list: built only while one is subscribed.
        let legacy = t.feed.wants_legacy().then(|| {
            let event = match &change {
                Change::Route {
                    index,
                    service,
                    route,
                    ..
                } => WatchEvent::Route {
                    index: *index,
                    prev: None,
                    at: None,
                    service: service.clone(),
                    route: route.clone(),
                },
                _ => WatchEvent::Service {
                    index: change.index(),
                    service: service.clone(),
                    instances: t.marked(&service),
                },
            };
            Line::of(&event).bytes
        });
        t.feed.publish(Published::new(change, legacy));
        self.follow_fallback(t, &service);
        let routing: Vec<ServiceName> = t
            .targeted_by
            .get(&service)
            .map(|by| by.iter().cloned().collect())
            .unwrap_or_default();
        for other in routing {
            self.follow_fallback(t, &other);
        }
    }

    /// Publishes the upsert of `instance` at `revision`. Called with the lock held.
    fn publish_upsert(
        &self,
        t: &mut Table,
        outcome: Outcome,
        revision: u64,
        mut instance: Instance,
    ) {
        instance.mark(t.store.maintenance(&instance.service));
        let cause = match (outcome, instance.source) {
            (_, Source::Docker) => UpsertCause::Docker,
            (Outcome::Changed, _) => UpsertCause::Changed,
            _ => UpsertCause::Registered,
        };
        if outcome == Outcome::Added {
            self.inner
                .metrics
                .registrations
                .get_or_create(&instance.source.into())
                .inc();
        }
        log_upsert(outcome, &instance);
        let change = Change::Upsert {
            index: revision,
            at: instance.last_seen,
            cause,
            instance,
        };
        self.publish(t, change);
    }

    /// Publishes the removal of `instance` at `revision`. Called with the lock held.
    fn publish_remove(
        &self,
        t: &mut Table,
        revision: u64,
        mut instance: Instance,
        cause: RemoveCause,
    ) {
        instance.mark(t.store.maintenance(&instance.service));
        let change = Change::Remove {
            index: revision,
            at: unix_millis(),
            cause,
            instance,
        };
        self.publish(t, change);
    }

    /// Notes whether `service`'s route now falls back to all its live instances, logging and
    /// counting a change. Called with the lock held, after any change to its instances or route.
    fn follow_fallback(&self, t: &mut Table, service: &ServiceName) {
        let route = t.store.route(service);
        let now = match route {
            Some(r) => {
                let mut live: Vec<(ServiceName, Version)> = Vec::new();
                for s in std::iter::once(service).chain(r.other_services(service)) {
                    live.extend(t.store.versions(s).into_iter().map(|v| (s.clone(), v)));
                }
                route_falls_back_by_version(r, service, live.iter().map(|(s, v)| (s, v)))
            }
            None => false,
        };
        if now == t.falling_back.contains(service) {
            return;
        }
        if now {
            let live = t.store.count(service);
            tracing::warn!(
                service = %service,
                route = %route.map(describe).unwrap_or_default(),
                live,
                "no live instance belongs to a target the route sends traffic to: the service \
                 falls back to all its live instances by their weights until one does"
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

    /// Whether `service` has a live instance or a route, or had a live instance since the
    /// directory started (of the last `BAKER_MAX_SERVICES` services that had one). A route for
    /// any other service needs `force`: its name is likely a mistake.
    pub fn knows(&self, service: &ServiceName) -> bool {
        let t = self.lock();
        t.store.count(service) > 0 || t.known.contains(service) || t.store.route(service).is_some()
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
    /// nothing; Docker's replaces a registrar's. A new instance past a quota is refused and
    /// changes nothing.
    pub fn upsert(
        &self,
        service: &ServiceName,
        id: &InstanceId,
        spec: ValidSpec,
        source: Source,
    ) -> Result<Instance, Refused> {
        if self.inner.replica.is_some() {
            return self.upsert_through_etcd(service, id, spec, source);
        }
        let mut instance = instance_of(service, id, spec, source);
        let mut t = self.lock();
        check_takeover(&t, service, id, source)?;
        t.admit(&self.inner.quotas, service, id)
            .inspect_err(|e| self.refused(e))?;
        let before = t.next_deadline();
        let (outcome, revision) = t.put(&mut instance, Instant::now());
        self.rearm(before, t.next_deadline());
        if outcome != Outcome::Added {
            self.inner.metrics.heartbeats.inc();
        }
        if outcome == Outcome::Renewed {
            tracing::trace!("heartbeat from {service}/{id}");
        } else {
            self.publish_upsert(&mut t, outcome, revision, instance.clone());
        }
        instance.mark(t.store.maintenance(service));
        Ok(instance)
    }

    /// Deregisters `service`/`id` on an API call: removes it now and returns it, `None` if it
    /// was not registered. An instance Docker discovered is not the API's to remove.
    pub fn deregister(
        &self,
        service: &ServiceName,
        id: &InstanceId,
    ) -> Result<Option<Instance>, Refused> {
        if self.inner.replica.is_some() {
            return self.deregister_through_etcd(service, id);
        }
        let mut t = self.lock();
        if t.source_of(service, id) == Some(Source::Docker) {
            return Err(Conflict {
                service: service.clone(),
                id: id.clone(),
            }
            .into());
        }
        Ok(self.take(&mut t, service, id, RemoveCause::Deregistered))
    }

    /// Removes `service`/`id` now, whatever its source, for `cause`; `false` if it was not
    /// registered.
    pub fn remove(&self, service: &ServiceName, id: &InstanceId, cause: RemoveCause) -> bool {
        if self.inner.replica.is_some() {
            return self.remove_through_etcd(service, id, cause);
        }
        let mut t = self.lock();
        self.take(&mut t, service, id, cause).is_some()
    }

    /// Removes `service`/`id` and publishes the change. Called with the lock held.
    fn take(
        &self,
        t: &mut Table,
        service: &ServiceName,
        id: &InstanceId,
        cause: RemoveCause,
    ) -> Option<Instance> {
        let (revision, instance) = t.take(service, id)?;
        self.inner
            .metrics
            .deregistrations
            .get_or_create(&instance.source.into())
            .inc();
        tracing::info!(
            "deregistered {service}/{id} ({}, {})",
            instance.source,
            cause.as_str()
        );
        self.publish_remove(t, revision, instance.clone(), cause);
        Some(instance)
    }

    /// Makes the instances of `source` exactly `instances` (service, id, spec): adds and updates
    /// those listed, removes those of `source` not listed, and leaves other sources alone.
    /// Publishes one change per instance that changed, none for the others.
    pub fn sync_source(
        &self,
        source: Source,
        instances: Vec<(ServiceName, InstanceId, ValidSpec)>,
    ) {
        let desired: BTreeMap<(ServiceName, InstanceId), ValidSpec> = instances
            .into_iter()
            .map(|(s, id, spec)| ((s, id), spec))
            .collect();
        if self.inner.replica.is_some() {
            return self.sync_source_through_etcd(source, desired);
        }
        let mut t = self.lock();
        let before = t.next_deadline();
        let now = Instant::now();
        let stale: Vec<(ServiceName, InstanceId)> = t
            .store
            .of_source(source)
            .into_iter()
            .filter(|key| !desired.contains_key(key))
            .collect();
        for (service, id) in stale {
            if let Some((revision, instance)) = t.take(&service, &id) {
                self.inner
                    .metrics
                    .deregistrations
                    .get_or_create(&source.into())
                    .inc();
                tracing::info!("deregistered {service}/{id} ({source}, gone on resync)");
                self.publish_remove(&mut t, revision, instance, RemoveCause::DockerResync);
            }
        }
        let mut over_quota: Option<(Exceeded, usize)> = None;
        for ((service, id), spec) in desired {
            if check_takeover(&t, &service, &id, source).is_err() {
                continue;
            }
            if let Err(e) = t.admit(&self.inner.quotas, &service, &id) {
                self.count_refusal(&e);
                let refused = over_quota.get_or_insert((e, 0));
                refused.1 += 1;
                continue;
            }
            let mut instance = instance_of(&service, &id, spec, source);
            let (outcome, revision) = t.put(&mut instance, now);
            if outcome != Outcome::Renewed {
                self.publish_upsert(&mut t, outcome, revision, instance);
            }
        }
        if let Some((first, count)) = over_quota {
            tracing::warn!(
                %source,
                refused = count,
                "{count} instance(s) not registered, the first because {first}"
            );
        }
        self.rearm(before, t.next_deadline());
    }

    /// Counts and logs a change refused by a quota.
    fn refused(&self, e: &Exceeded) {
        self.count_refusal(e);
        tracing::warn!(quota = e.quota.name(), "{e}");
    }

    fn count_refusal(&self, e: &Exceeded) {
        self.inner
            .metrics
            .quota_refusals
            .get_or_create(&QuotaLabel {
                quota: e.quota.name(),
            })
            .inc();
    }

    /// Removes every expiring instance whose deadline is at or before `now`; returns how many.
    pub fn expire_due(&self, now: Instant) -> usize {
        let mut t = self.lock();
        let mut count = 0;
        while let Some((deadline, service, id)) = t.deadlines.first().cloned() {
            if deadline > now {
                break;
            }
            if let Some((revision, instance)) = t.take(&service, &id) {
                count += 1;
                self.inner.metrics.expiries.inc();
                tracing::info!(
                    "expired {service}/{id}: no heartbeat for {} ms",
                    instance.ttl_ms
                );
                self.publish_remove(&mut t, revision, instance, RemoveCause::Expired);
            } else {
                t.deadlines.pop_first();
            }
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
                    if self.inner.replica.is_some() {
                        self.expire_through_etcd(Instant::now()).await;
                    } else {
                        self.expire_due(Instant::now());
                    }
                }
            }
        }
    }

    /// The current revision.
    pub fn index(&self) -> u64 {
        self.lock().store.revision()
    }

    /// Every service with its live instances.
    pub fn services(&self) -> ServicesResponse {
        let t = self.lock();
        ServicesResponse {
            index: t.store.revision(),
            services: t.marked_services(None),
        }
    }

    /// The first `n` services with live instances, in name order, and how many there are.
    pub fn live_services(&self, n: usize) -> (Vec<ServiceName>, usize) {
        let t = self.lock();
        (t.store.service_names(n), t.store.totals().0)
    }

    /// One service's instances and route; `None` when it has neither.
    pub fn service(&self, service: &ServiceName) -> Option<ServiceResponse> {
        let t = self.lock();
        let instances = t.marked(service);
        let route = t.store.route(service).cloned();
        if instances.is_empty() && route.is_none() {
            return None;
        }
        Some(ServiceResponse {
            index: t.store.revision(),
            service: service.clone(),
            instances,
            route,
        })
    }

    /// Every route.
    pub fn routes(&self) -> RoutesResponse {
        let t = self.lock();
        RoutesResponse {
            index: t.store.revision(),
            routes: t.store.routes(),
        }
    }

    /// One service's route, `None` when it has none.
    pub fn route(&self, service: &ServiceName) -> Option<RouteResponse> {
        let t = self.lock();
        Some(RouteResponse {
            index: t.store.revision(),
            service: service.clone(),
            route: Some(t.store.route(service)?.clone()),
        })
    }

    /// Every change from now on, for a consumer of the whole feed (an event history, say). A
    /// consumer that falls behind gets [`RecvError::Lagged`](crate::feed::RecvError) and should
    /// start again from [`Registry::subscribe`]'s snapshot.
    pub fn changes(&self) -> broadcast::Receiver<Arc<Published>> {
        let mut t = self.lock();
        match t.feed.subscribe(None, false).1 {
            Receiver::All(rx) => rx,
            Receiver::Filtered(_) => unreachable!("an unfiltered subscription is a broadcast"),
        }
    }

    /// A snapshot of the table (of the services in `only`, when given), and a receiver of every
    /// change after it (to those services). `legacy` marks a v1 watcher, which needs each
    /// instance change as its service's whole list.
    ///
    /// The receiver is taken under the table's lock together with the snapshot's index, so the
    /// watcher sees each later change exactly once; the unfiltered snapshot is serialized
    /// outside the lock, once per index.
    pub fn subscribe(&self, only: Option<BTreeSet<ServiceName>>, legacy: bool) -> Subscription {
        self.subscribe_then(only, legacy, || {})
    }

    /// [`Registry::subscribe`], running `between` after the table's lock is released and
    /// before the snapshot is serialized: what a test needs to put other subscribers and
    /// changes exactly there.
    ///
    /// Everything the snapshot needs is read once, under the lock: either the cached line of
    /// the subscription's index, or the table's content to serialize. Nothing read then is read
    /// again after the lock is released, so no subscriber or change in between can make the
    /// snapshot disagree with the feed. The feed is subscribed last under the lock and the
    /// [`Registration`] that unsubscribes it (and releases the v1 watcher count) exists as soon
    /// as the lock is released, whatever happens next.
    fn subscribe_then(
        &self,
        only: Option<BTreeSet<ServiceName>>,
        legacy: bool,
        between: impl FnOnce(),
    ) -> Subscription {
        let (id, feed, index, source) = {
            let mut t = self.lock();
            let index = t.store.revision();
            let source = match &only {
                None => match self.cached_snapshot(index) {
                    Some(line) => SnapshotSource::Cached(line),
                    None => SnapshotSource::Table(
                        t.marked_services(None),
                        t.store.routes(),
                        t.store.all_maintenance(),
                    ),
                },
                Some(only) => SnapshotSource::Table(
                    t.marked_services(Some(only)),
                    only.iter()
                        .filter_map(|s| Some((s.clone(), t.store.route(s)?.clone())))
                        .collect(),
                    only.iter()
                        .filter_map(|s| Some((s.clone(), t.store.maintenance(s)?.clone())))
                        .collect(),
                ),
            };
            let (id, feed) = t.feed.subscribe(only.as_ref(), legacy);
            (id, feed, index, source)
        };
        let registration = Registration {
            registry: self.clone(),
            id,
            only,
            legacy,
        };
        between();
        let snapshot = match source {
            SnapshotSource::Cached(line) => line,
            SnapshotSource::Table(services, routes, maintenance) => {
                let line = Line::of(&WatchEvent::Snapshot {
                    index,
                    services,
                    routes,
                    maintenance,
                });
                if registration.only.is_none() {
                    let mut cache = self
                        .inner
                        .snapshot
                        .lock()
                        .unwrap_or_else(|poisoned| poisoned.into_inner());
                    if cache.as_ref().is_none_or(|c| c.index < index) {
                        *cache = Some(line.clone());
                    }
                }
                line
            }
        };
        Subscription {
            snapshot,
            feed,
            _registration: registration,
        }
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
    /// route that does not exist. Setting the route a service already has changes nothing; a new
    /// route past the routes quota is refused.
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
    ) -> Result<Option<RouteResponse>, RouteError> {
        self.set_route_by(service, route, None).await
    }

    /// [`Registry::set_route`], recording where the call came from (`origin`) on the change
    /// (on disk nothing but the route: a directory that restarts has no origin to give; in
    /// etcd, with the route).
    pub async fn set_route_by(
        &self,
        service: &ServiceName,
        route: Option<Route>,
        origin: Option<String>,
    ) -> Result<Option<RouteResponse>, RouteError> {
        let file = match (&self.inner.route_file, &self.inner.replica) {
            (_, Some(replica)) => {
                return self
                    .set_route_through_etcd(replica, service, route, origin)
                    .await
            }
            (Some(file), None) => file.clone(),
            (None, None) => unreachable!("a registry has a route file or a replica"),
        };
        let claim = self.route_claim(service);
        let _writing = claim.lock.lock().await;
        self.set_route_locked(&file, service, route, origin).await
    }

    /// [`Registry::set_route_by`], with `service`'s route writes held.
    async fn set_route_locked(
        &self,
        file: &RouteStore,
        service: &ServiceName,
        route: Option<Route>,
        origin: Option<String>,
    ) -> Result<Option<RouteResponse>, RouteError> {
        let (index, previous, write) = {
            let mut t = self.lock();
            let current = t.store.route(service);
            if current == route.as_ref() {
                return Ok(current.is_some().then(|| RouteResponse {
                    index: t.store.revision(),
                    service: service.clone(),
                    route: current.cloned(),
                }));
            }
            if current.is_none() {
                // Checked and applied under one lock: routes of other services set at the same
                // time cannot slip past the quota together.
                self.inner
                    .quotas
                    .admit_route(service, t.store.route_count())
                    .inspect_err(|e| self.refused(e))?;
            }
            let previous = current.cloned();
            let (file, name, value) = (file.clone(), service.clone(), route.clone());
            let write = tokio::task::spawn_blocking(move || match value {
                Some(r) => file.put(&name, &r),
                None => file.clear(&name),
            });
            let index = self.apply_route(&mut t, service, route.clone(), origin, unix_millis());
            (index, previous, write)
        };
        let saved = write.await.map_err(|e| StoreError::Write {
            path: file.path_of(service),
            source: std::io::Error::other(e),
        });
        if let Err(e) = saved.and_then(|r| r) {
            let index = self.apply_route(&mut self.lock(), service, previous, None, unix_millis());
            tracing::error!(
                %service, index, cause = %baker_client::errors::chain(&e),
                "the route could not be saved; the previous route applies again"
            );
            return Err(e.into());
        }
        tracing::debug!(%service, index, "the route is on disk");
        Ok(Some(RouteResponse {
            index,
            service: service.clone(),
            route,
        }))
    }

    /// A claim on the lock that serializes the route writes of `service`. Routes of different
    /// services are written side by side, each to its own file.
    fn route_claim(&self, service: &ServiceName) -> RouteClaim {
        let mut locks = self
            .inner
            .route_writes
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        RouteClaim {
            registry: self.clone(),
            service: service.clone(),
            lock: locks.entry(service.clone()).or_default().clone(),
        }
    }

    /// Applies and publishes `service`'s route, set or cleared by a call from `origin` at
    /// `at` (`None`: put back by the directory); returns the index of the change. Called with
    /// the lock held.
    fn apply_route(
        &self,
        t: &mut Table,
        service: &ServiceName,
        route: Option<Route>,
        origin: Option<String>,
        at: u64,
    ) -> u64 {
        let (revision, _) = t.store.set_route(service, route.clone());
        match &route {
            Some(r) => tracing::info!("route of {service} set to {}", describe(r)),
            None => tracing::info!("route of {service} cleared"),
        }
        self.inner.metrics.routes.set(t.store.route_count() as i64);
        let change = Change::Route {
            index: revision,
            at,
            service: service.clone(),
            route,
            origin,
        };
        self.publish(t, change);
        revision
    }

    /// Every drain, by service.
    pub fn maintenance(&self) -> (u64, BTreeMap<ServiceName, Maintenance>) {
        let t = self.lock();
        (t.store.revision(), t.store.all_maintenance())
    }

    /// Drains `target` of `service` for `reason`, on a call from `origin`. Returns the drain in
    /// place after the call.
    ///
    /// Draining what is drained already for the same reason changes nothing; for another
    /// reason, the new drain replaces the old. A new drain past the drains quota is refused. A
    /// drain may name an instance or version that is not registered (yet): it applies to any
    /// that registers later.
    ///
    /// The service's drains are stored before anything is applied or published (on disk in
    /// memory mode, committed by etcd with etcd): a drain that answered survives a crash, and
    /// one that could not be stored changed nothing.
    pub async fn drain(
        &self,
        service: &ServiceName,
        target: Target,
        reason: Option<Reason>,
        origin: String,
    ) -> Result<DrainResponse, DrainError> {
        let written = self
            .change_drains(service, |t| {
                let mut next = t.store.maintenance(service).cloned().unwrap_or_default();
                match next.get(&target) {
                    Some(old) if old.reason == reason => {
                        return Ok(DrainPlan::Answer(Some(DrainResponse {
                            index: t.store.revision(),
                            drain: MaintenanceEntry::of(service, &target, old),
                        })));
                    }
                    Some(_) => {}
                    None => t
                        .admit_drain(&self.inner.quotas, service)
                        .inspect_err(|e| self.refused(e))?,
                }
                let drain = Drain {
                    reason: reason.clone(),
                    since: unix_millis(),
                    origin: origin.clone(),
                };
                let entry = MaintenanceEntry::of(service, &target, &drain);
                next.insert(target.clone(), drain);
                Ok(DrainPlan::Write {
                    next,
                    action: MaintenanceAction {
                        drained: true,
                        target: target.clone(),
                        reason: reason.clone(),
                        origin: origin.clone(),
                    },
                    entry,
                })
            })
            .await?;
        Ok(written.expect("a drain always answers with the drain in place"))
    }

    /// Lifts the drain of `target` of `service`, on a call from `origin`. Returns the drain
    /// lifted, `Ok(None)` when `target` was not drained. Stored before it answers, as
    /// [`Registry::drain`].
    pub async fn undrain(
        &self,
        service: &ServiceName,
        target: Target,
        origin: String,
    ) -> Result<Option<DrainResponse>, DrainError> {
        self.change_drains(service, |t| {
            let mut next = t.store.maintenance(service).cloned().unwrap_or_default();
            let Some(old) = next.remove(&target) else {
                return Ok(DrainPlan::Answer(None));
            };
            Ok(DrainPlan::Write {
                next,
                action: MaintenanceAction {
                    drained: false,
                    target: target.clone(),
                    reason: old.reason.clone(),
                    origin: origin.clone(),
                },
                entry: MaintenanceEntry::of(service, &target, &old),
            })
        })
        .await
    }

    /// Decides a change of `service`'s drains with `decide` (under the table's lock), stores
    /// it, then applies and publishes it. With etcd, when another replica changed the
    /// service's drains between the decision and the write, decides again on its drains.
    async fn change_drains(
        &self,
        service: &ServiceName,
        decide: impl Fn(&Table) -> Result<DrainPlan, DrainError>,
    ) -> Result<Option<DrainResponse>, DrainError> {
        // One drain write at a time in this process: each stores the drains the previous
        // one left.
        let _writing = self.inner.maintenance_writes.lock().await;
        loop {
            let (plan, seen) = {
                let t = self.lock();
                (decide(&t)?, t.drain_revisions.get(service).copied())
            };
            let (next, action, entry) = match plan {
                DrainPlan::Answer(answer) => return Ok(answer),
                DrainPlan::Write {
                    next,
                    action,
                    entry,
                } => (next, action, entry),
            };
            let index = match &self.inner.replica {
                Some(replica) => {
                    let seen = seen.unwrap_or_default();
                    match self
                        .write_drains_through_etcd(replica, service, next, action, seen)
                        .await?
                    {
                        Some(index) => index,
                        None => continue,
                    }
                }
                None => self.save_drains(service, next, action).await?,
            };
            return Ok(Some(DrainResponse {
                index,
                drain: entry,
            }));
        }
    }

    /// Writes `service`'s drains `next` to the data directory, then applies and publishes
    /// them with `action`; the index of the change.
    async fn save_drains(
        &self,
        service: &ServiceName,
        next: Maintenance,
        action: MaintenanceAction,
    ) -> Result<u64, DrainError> {
        let files = self
            .inner
            .maintenance_files
            .clone()
            .expect("a registry whose table is in memory has a data directory");
        let dir = files.dir().to_owned();
        let (svc, drains) = (service.clone(), next.clone());
        tokio::task::spawn_blocking(move || files.save(&svc, &drains))
            .await
            .map_err(|e| StoreError::Write {
                path: dir,
                source: std::io::Error::other(e),
            })??;
        let mut t = self.lock();
        Ok(self.apply_drains(&mut t, service, next, action, unix_millis()))
    }

    /// Applies and publishes `service`'s drains `next`, changed by `action` at `at`; returns
    /// the index of the change. Called with the lock held.
    fn apply_drains(
        &self,
        t: &mut Table,
        service: &ServiceName,
        next: Maintenance,
        action: MaintenanceAction,
        at: u64,
    ) -> u64 {
        let (revision, _) = t.store.set_maintenance(service, next.clone());
        self.inner.metrics.drains.set(t.drain_count() as i64);
        let (verb, target, origin) = (
            if action.drained {
                "drained"
            } else {
                "undrained"
            },
            &action.target,
            &action.origin,
        );
        tracing::info!(%service, %target, %origin, "{verb} {service} {target}");
        let change = Change::Maintenance {
            index: revision,
            at,
            service: service.clone(),
            maintenance: next,
            action,
        };
        self.publish(t, change);
        revision
    }
}

/// What a drain or undrain does to a service's drains, decided under the table's lock.
enum DrainPlan {
    /// Nothing to change: the answer as things stand (`None`: an undrain of nothing).
    Answer(Option<DrainResponse>),
    /// Store the service's drains `next`, changed by `action`, and answer with `entry`.
    Write {
        next: Maintenance,
        action: MaintenanceAction,
        entry: MaintenanceEntry,
    },
}

/// Marks each of `list` by `maintenance`.
fn mark_all(list: &mut [Instance], maintenance: Option<&Maintenance>) {
    for i in list {
        i.mark(maintenance);
    }
}

/// The instance `spec` describes, last seen now and joined now ([`joined_as`] keeps an
/// earlier start).
fn instance_of(
    service: &ServiceName,
    id: &InstanceId,
    spec: ValidSpec,
    source: Source,
) -> Instance {
    let now = unix_millis();
    Instance {
        service: service.clone(),
        id: id.clone(),
        address: spec.address,
        port: spec.port,
        version: spec.version,
        weight: spec.weight,
        tags: spec.tags,
        source,
        ttl_ms: spec.ttl_ms,
        last_seen: now,
        since: now,
        state: InstanceState::Up,
        reason: None,
        node: spec.node,
    }
}

/// Logs what an upsert did to `instance`.
fn log_upsert(outcome: Outcome, instance: &Instance) {
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
        Outcome::Added => tracing::info!(
            "registered {service}/{id} at {address}:{port} (version {version}, weight {weight}, {source})"
        ),
        Outcome::Changed => tracing::info!(
            "updated {service}/{id}: now at {address}:{port} (version {version}, weight {weight}, {source})"
        ),
        Outcome::Renewed => {}
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
            node: None,
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

    fn events(rx: &mut Receiver) -> Vec<Change> {
        let mut out = Vec::new();
        while let Some(p) = rx.try_recv() {
            out.push(p.change.clone());
        }
        out
    }

    /// (index, cause, service, id) of an instance change.
    fn ids(change: &Change) -> (u64, &'static str, String, String) {
        match change {
            Change::Upsert {
                index,
                cause,
                instance,
                ..
            } => (
                *index,
                cause.as_str(),
                instance.service.to_string(),
                instance.id.to_string(),
            ),
            Change::Remove {
                index,
                cause,
                instance,
                ..
            } => (
                *index,
                cause.as_str(),
                instance.service.to_string(),
                instance.id.to_string(),
            ),
            other => panic!("not an instance change: {other:?}"),
        }
    }

    fn id4(
        index: u64,
        cause: &'static str,
        service: &str,
        id: &str,
    ) -> (u64, &'static str, String, String) {
        (index, cause, service.into(), id.into())
    }

    #[tokio::test(start_paused = true)]
    async fn heartbeats_publish_nothing_but_changes_do() {
        let (r, _dir) = registry();
        let mut sub = r.subscribe(None, false);
        let (snapshot, rx) = (sub.snapshot.clone(), &mut sub.feed);
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
        let got: Vec<_> = events(rx).iter().map(ids).collect();
        assert_eq!(
            got,
            [
                id4(1, "registered", "emitter", "a"),
                id4(2, "changed", "emitter", "a"),
                id4(3, "registered", "emitter", "b"),
            ]
        );
        assert_eq!(r.metrics().heartbeats.get(), 3);
        assert_eq!(r.services().services["emitter"][0].weight, 50);
    }

    #[tokio::test]
    async fn an_instance_keeps_when_it_joined_through_heartbeats_and_changes() {
        let (r, _dir) = registry();
        let mut sub = r.subscribe(None, false);
        let put = |spec| {
            r.upsert(&svc("emitter"), &iid("a"), spec, Source::Registrar)
                .unwrap()
        };
        let joined = put(spec(80, 1000));
        assert_eq!(joined.since, joined.last_seen);
        std::thread::sleep(Duration::from_millis(5));
        let renewed = put(spec(80, 1000));
        assert_eq!(renewed.since, joined.since, "a heartbeat keeps it");
        assert!(renewed.last_seen > joined.since);
        std::thread::sleep(Duration::from_millis(5));
        let mut heavier = spec(80, 1000);
        heavier.weight = 50;
        let changed = put(heavier);
        assert_eq!(changed.since, joined.since, "a change keeps it");
        let listed = &r.services().services["emitter"][0];
        assert_eq!((listed.since, listed.weight), (joined.since, 50));
        let published: Vec<u64> = events(&mut sub.feed)
            .iter()
            .filter_map(|e| match e {
                Change::Upsert { instance, .. } => Some(instance.since),
                _ => None,
            })
            .collect();
        assert_eq!(published, [joined.since, joined.since]);
        r.remove(&svc("emitter"), &iid("a"), RemoveCause::Deregistered);
        std::thread::sleep(Duration::from_millis(5));
        let again = put(spec(80, 1000));
        assert!(again.since > joined.since, "registered anew, it joins anew");
    }

    #[tokio::test(start_paused = true)]
    async fn silence_expires_on_the_timer_and_heartbeats_keep_alive() {
        let (r, _dir) = registry();
        let shutdown = CancellationToken::new();
        let timer = tokio::spawn(r.clone().run_expiry(shutdown.clone()));
        let mut sub = r.subscribe(None, false);
        let rx = &mut sub.feed;
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
        let got: Vec<_> = events(rx).iter().map(ids).collect();
        assert_eq!(
            got,
            [
                id4(1, "registered", "emitter", "a"),
                id4(2, "registered", "emitter", "b"),
                id4(3, "expired", "emitter", "b"),
            ]
        );
        // Now `a` goes silent: it expires 1 s after its last heartbeat, not before.
        tokio::time::sleep(Duration::from_millis(990)).await;
        assert_eq!(r.services().services["emitter"].len(), 1);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(r.services().services.is_empty());
        assert!(r.service(&svc("emitter")).is_none());
        let got: Vec<_> = events(rx).iter().map(ids).collect();
        assert_eq!(got, [id4(4, "expired", "emitter", "a")]);
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
        let mut sub = r.subscribe(None, false);
        let rx = &mut sub.feed;
        // A short-lived registration of the same id is refused and changes nothing ...
        let err = r
            .upsert(&svc("web"), &iid("c1"), spec(9999, 100), Source::Registrar)
            .unwrap_err();
        assert!(err.to_string().contains("discovered from Docker"), "{err}");
        assert_eq!(r.deregister(&svc("web"), &iid("c1")), Err(err));
        assert!(events(rx).is_empty());
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
        let mut sub = r.subscribe(None, false);
        let rx = &mut sub.feed;
        r.upsert(
            &svc("emitter"),
            &iid("a"),
            spec(80, 6000),
            Source::Registrar,
        )
        .unwrap();
        assert!(r.remove(&svc("emitter"), &iid("a"), RemoveCause::Deregistered));
        assert!(!r.remove(&svc("emitter"), &iid("a"), RemoveCause::Deregistered));
        assert!(r.services().services.is_empty());
        assert_eq!(r.next_deadline(), None);
        let got: Vec<_> = events(rx).iter().map(ids).collect();
        assert_eq!(
            got,
            [
                id4(1, "registered", "emitter", "a"),
                id4(2, "deregistered", "emitter", "a"),
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
        let mut sub = r.subscribe(None, false);
        let (snapshot, rx) = (sub.snapshot.clone(), &mut sub.feed);
        assert_eq!(snapshot.index, 4, "one revision per instance");
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
        assert!(events(rx).is_empty());
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
        let got: Vec<_> = events(rx).iter().map(ids).collect();
        assert_eq!(
            got,
            [
                id4(5, "docker_resync", "web", "c2"),
                id4(6, "docker", "cache", "c4"),
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
        let mut sub = r.subscribe(None, false);
        let rx = &mut sub.feed;
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
        let got: Vec<_> = events(rx)
            .into_iter()
            .map(|c| match c {
                Change::Route {
                    index,
                    service,
                    route,
                    ..
                } => (index, service.to_string(), route),
                other => panic!("not a route change: {other:?}"),
            })
            .collect();
        assert_eq!(
            got,
            [
                (1, "emitter".into(), Some(route)),
                (2, "emitter".into(), None)
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
        let mut sub = r.subscribe(None, false);
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
        let got: Vec<_> = events(&mut sub.feed)
            .into_iter()
            .map(|c| match c {
                Change::Route { index, route, .. } => (index, route),
                other => panic!("not a route change: {other:?}"),
            })
            .collect();
        assert_eq!(got, [(2, Some(canary)), (3, Some(route))]);
        // A failed write of a new route leaves none.
        assert!(r
            .set_route(&svc("other"), Some([("1".parse().unwrap(), 100)].into()))
            .await
            .is_err());
        assert!(!r.routes().routes.contains_key("other"));
        std::fs::remove_file(&data).unwrap();
    }

    #[tokio::test]
    async fn a_newer_subscriber_right_after_the_lock_changes_nothing_and_the_v1_count_follows() {
        let (r, _dir) = registry();
        let legacy = |r: &Registry| r.lock().feed.legacy_watchers();
        r.upsert(&svc("a"), &iid("1"), spec(80, 6000), Source::Registrar)
            .unwrap();
        // The snapshot of index 1 is cached.
        drop(r.subscribe(None, false));
        let mut sub = r.subscribe_then(None, true, || {
            // Where the cache used to be read a second time: a change, and a newer subscriber
            // that replaces the cached snapshot with index 2's.
            r.upsert(&svc("b"), &iid("1"), spec(80, 6000), Source::Registrar)
                .unwrap();
            let newer = r.subscribe(None, true);
            assert_eq!(newer.snapshot.index, 2);
            assert_eq!(legacy(&r), 2);
        });
        assert_eq!(sub.snapshot.index, 1);
        let snap: WatchEvent = serde_json::from_slice(&sub.snapshot.bytes).unwrap();
        let mut state = baker_client::State::default();
        state.apply(snap);
        for c in events(&mut sub.feed) {
            let prev = state.index;
            state.apply(WatchEvent::of_change(c, prev));
        }
        assert_eq!(state.services, r.services().services);
        assert_eq!(legacy(&r), 1, "the newer subscriber is gone");
        drop(sub);
        assert_eq!(legacy(&r), 0);

        // Whatever fails once the lock is released, the subscription is undone.
        for only in [None, Some(BTreeSet::from([svc("a")]))] {
            let failed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                r.subscribe_then(only, true, || panic!("failing between lock and snapshot"))
            }));
            assert!(failed.is_err());
            assert_eq!(legacy(&r), 0);
            assert_eq!(r.lock().feed.filtered_on(&svc("a")), 0);
        }
    }

    #[test]
    fn the_services_known_are_bounded_and_live_ones_always_known() {
        let dir = tempfile::tempdir().unwrap();
        let r = Registry::with_quotas(
            RouteStore::open(dir.path()).unwrap(),
            BTreeMap::new(),
            BTreeMap::new(),
            Arc::new(Metrics::new()),
            64,
            Quotas {
                services: 2,
                ..Quotas::default()
            },
        );
        for name in ["a", "b", "c"] {
            r.upsert(&svc(name), &iid("1"), spec(80, 6000), Source::Registrar)
                .unwrap();
            r.deregister(&svc(name), &iid("1")).unwrap().unwrap();
        }
        assert!(
            !r.knows(&svc("a")),
            "the service gone longest ago is forgotten"
        );
        assert!(r.knows(&svc("b")) && r.knows(&svc("c")));
        r.upsert(&svc("a"), &iid("1"), spec(80, 6000), Source::Registrar)
            .unwrap();
        r.upsert(&svc("d"), &iid("1"), spec(80, 6000), Source::Registrar)
            .unwrap();
        assert!(
            r.knows(&svc("a")) && r.knows(&svc("d")),
            "live services are known"
        );
        assert_eq!(r.lock().known.len(), 2);
    }

    #[tokio::test]
    async fn a_cancelled_route_write_leaves_no_lock_behind() {
        let (r, _dir) = registry();
        let locks = |r: &Registry| r.inner.route_writes.lock().unwrap().len();
        let route: Route = [("1".parse().unwrap(), 100)].into();
        let a = svc("a");
        let held = r.route_claim(&a);
        let writing = held.lock.lock().await;
        let waiting = r.set_route(&a, Some(route.clone()));
        assert!(tokio::time::timeout(Duration::from_millis(50), waiting)
            .await
            .is_err());
        assert_eq!(locks(&r), 1);
        drop(writing);
        drop(held);
        assert_eq!(locks(&r), 0, "the cancelled call's claim is gone with it");
        r.set_route(&a, Some(route)).await.unwrap();
        assert_eq!(locks(&r), 0);
    }

    #[tokio::test]
    async fn snapshot_and_feed_do_not_overlap() {
        let (r, _dir) = registry();
        r.upsert(&svc("a"), &iid("1"), spec(80, 6000), Source::Registrar)
            .unwrap();
        let mut sub = r.subscribe(None, false);
        let (snapshot, rx) = (sub.snapshot.clone(), &mut sub.feed);
        r.upsert(&svc("b"), &iid("1"), spec(80, 6000), Source::Registrar)
            .unwrap();
        let snap: WatchEvent = serde_json::from_slice(&snapshot.bytes).unwrap();
        let mut state = baker_client::State::default();
        state.apply(snap);
        for c in events(rx) {
            assert!(c.index() > state.index);
            let prev = state.index;
            state.apply(WatchEvent::of_change(c, prev));
        }
        assert_eq!(state.services, r.services().services);
        assert_eq!(state.index, r.index());
    }

    #[tokio::test]
    async fn a_change_carries_one_instance_and_v1_lines_only_for_v1_watchers() {
        let (r, _dir) = registry();
        for i in 0..50 {
            r.upsert(
                &svc("big"),
                &iid(&i.to_string()),
                spec(80, 60_000),
                Source::Registrar,
            )
            .unwrap();
        }
        let mut v2 = r.subscribe(None, false);
        r.upsert(
            &svc("big"),
            &iid("new"),
            spec(80, 60_000),
            Source::Registrar,
        )
        .unwrap();
        let p = v2.feed.try_recv().unwrap();
        assert!(p.legacy().is_none(), "no v1 watcher: no whole-service line");
        assert_eq!(ids(&p.change), id4(51, "registered", "big", "new"));
        let mut v1 = r.subscribe(None, true);
        r.remove(&svc("big"), &iid("new"), RemoveCause::DockerStopped);
        let p = v1.feed.try_recv().unwrap();
        let legacy: WatchEvent = serde_json::from_slice(p.legacy().unwrap()).unwrap();
        match legacy {
            WatchEvent::Service {
                index, instances, ..
            } => assert_eq!((index, instances.len()), (52, 50)),
            other => panic!("not a v1 service event: {other:?}"),
        }
        let line: WatchEvent = serde_json::from_slice(&p.line(51)).unwrap();
        assert!(matches!(
            line,
            WatchEvent::Remove {
                index: 52,
                prev: 51,
                cause: RemoveCause::DockerStopped,
                ..
            }
        ));
        drop(v1);
        assert_eq!(v2.feed.try_recv().unwrap().index(), 52);
        r.upsert(
            &svc("big"),
            &iid("new"),
            spec(80, 60_000),
            Source::Registrar,
        )
        .unwrap();
        assert!(v2.feed.try_recv().unwrap().legacy().is_none());
    }

    #[tokio::test]
    async fn a_filtered_subscription_sees_only_its_services() {
        let (r, _dir) = registry();
        r.upsert(&svc("a"), &iid("1"), spec(80, 60_000), Source::Registrar)
            .unwrap();
        r.upsert(&svc("b"), &iid("1"), spec(80, 60_000), Source::Registrar)
            .unwrap();
        let route: Route = [("1".parse().unwrap(), 100)].into();
        r.set_route(&svc("b"), Some(route.clone())).await.unwrap();
        let only: BTreeSet<ServiceName> = [svc("b"), svc("c")].into();
        let mut sub = r.subscribe(Some(only.clone()), false);
        let snap: WatchEvent = serde_json::from_slice(&sub.snapshot.bytes).unwrap();
        match snap {
            WatchEvent::Snapshot {
                index,
                services,
                routes,
                ..
            } => {
                assert_eq!(index, 3);
                assert_eq!(services.keys().collect::<Vec<_>>(), ["b"]);
                assert_eq!(routes.into_iter().collect::<Vec<_>>(), [(svc("b"), route)]);
            }
            other => panic!("not a snapshot: {other:?}"),
        }
        r.upsert(&svc("a"), &iid("2"), spec(80, 60_000), Source::Registrar)
            .unwrap();
        r.upsert(&svc("c"), &iid("1"), spec(80, 60_000), Source::Registrar)
            .unwrap();
        r.set_route(&svc("a"), Some([("1".parse().unwrap(), 100)].into()))
            .await
            .unwrap();
        r.deregister(&svc("b"), &iid("1")).unwrap();
        let got: Vec<_> = events(&mut sub.feed).iter().map(ids).collect();
        assert_eq!(
            got,
            [
                id4(5, "registered", "c", "1"),
                id4(7, "deregistered", "b", "1")
            ]
        );
        assert_eq!(r.lock().feed.filtered_on(&svc("b")), 1);
        drop(sub);
        assert_eq!(r.lock().feed.filtered_on(&svc("b")), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn changes_carry_their_cause_and_time() {
        let (r, _dir) = registry();
        let mut feed = r.changes();
        let before = unix_millis();
        r.upsert(&svc("web"), &iid("c1"), spec(80, 100), Source::Docker)
            .unwrap();
        r.remove(&svc("web"), &iid("c1"), RemoveCause::DockerUnhealthy);
        let a = feed.try_recv().unwrap();
        let b = feed.try_recv().unwrap();
        assert_eq!(ids(&a.change), id4(1, "docker", "web", "c1"));
        assert_eq!(ids(&b.change), id4(2, "docker_unhealthy", "web", "c1"));
        assert!(a.change.at() >= before && b.change.at() >= a.change.at());
    }

    #[tokio::test]
    async fn drains_persist_mark_instances_and_apply_to_later_registrations() {
        let (r, dir) = registry();
        let mut v1 = r.subscribe(None, true);
        let web = svc("web");
        // Drained before it registers.
        let drained = r
            .drain(
                &web,
                Target::Instance(iid("a")),
                Some("disk swap".parse().unwrap()),
                "cli from 127.0.0.1".into(),
            )
            .await
            .unwrap();
        assert_eq!(drained.index, 1);
        assert_eq!(drained.drain.id.as_ref().map(|i| i.as_str()), Some("a"));
        let a = r
            .upsert(&web, &iid("a"), spec(80, 60_000), Source::Registrar)
            .unwrap();
        assert_eq!(a.state, InstanceState::Draining);
        r.upsert(&web, &iid("b"), spec(81, 60_000), Source::Docker)
            .unwrap();
        let changes = events(&mut v1.feed);
        match &changes[1] {
            Change::Upsert { instance, .. } => {
                assert_eq!(instance.state, InstanceState::Draining);
                assert_eq!(instance.reason.as_ref().unwrap().as_str(), "disk swap");
            }
            other => panic!("not an upsert: {other:?}"),
        }
        // Draining the same for the same reason changes nothing; a version drain marks b.
        let again = r
            .drain(
                &web,
                Target::Instance(iid("a")),
                Some("disk swap".parse().unwrap()),
                "ui from 10.0.0.2".into(),
            )
            .await
            .unwrap();
        assert_eq!(
            (again.index, again.drain.origin.as_str()),
            (3, "cli from 127.0.0.1")
        );
        r.drain(
            &web,
            Target::Version("1".parse().unwrap()),
            None,
            "cli from 127.0.0.1".into(),
        )
        .await
        .unwrap();
        let p = v1.feed.try_recv().unwrap();
        p.change.index();
        let legacy: WatchEvent = serde_json::from_slice(p.legacy().unwrap()).unwrap();
        match legacy {
            WatchEvent::Service { instances, .. } => {
                assert!(instances.iter().all(|i| i.state == InstanceState::Draining))
            }
            other => panic!("a v1 watcher gets the service's list, got {other:?}"),
        }
        // On disk, and loaded by the next directory.
        let files = MaintenanceFiles::open(dir.path()).unwrap();
        let loaded = files.load().unwrap();
        assert_eq!(loaded["web"].len(), 2);
        let (_, all) = r.maintenance();
        assert_eq!(all, loaded);
        // Undrain: b is up again, a still drained by its own drain.
        let lifted = r
            .undrain(
                &web,
                Target::Version("1".parse().unwrap()),
                "cli from 127.0.0.1".into(),
            )
            .await
            .unwrap()
            .unwrap();
        assert_eq!(lifted.index, 5);
        let list = &r.services().services["web"];
        assert_eq!(
            list.iter().map(|i| i.state).collect::<Vec<_>>(),
            [InstanceState::Draining, InstanceState::Up]
        );
        assert!(r
            .undrain(&web, Target::Version("1".parse().unwrap()), "x".into())
            .await
            .unwrap()
            .is_none());
        r.undrain(&web, Target::Instance(iid("a")), "x".into())
            .await
            .unwrap()
            .unwrap();
        assert!(files.load().unwrap().is_empty());
        assert_eq!(r.metrics().drains.get(), 0);
    }

    #[tokio::test]
    async fn a_drain_that_cannot_be_written_changes_nothing() {
        let (r, dir) = registry();
        let mut sub = r.subscribe(None, false);
        let data = dir.path().to_owned();
        drop(dir);
        std::fs::write(&data, "not a directory").unwrap();
        assert!(r
            .drain(&svc("web"), Target::Instance(iid("a")), None, "x".into())
            .await
            .is_err());
        assert!(r.maintenance().1.is_empty());
        assert!(events(&mut sub.feed).is_empty());
        std::fs::remove_file(&data).unwrap();
    }
}
