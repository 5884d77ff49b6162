//! The table of live instances and routes: its revisions, its TTL timer and its change feed.
//!
//! [`Registry`] is a cheap, cloneable handle. The HTTP API and Docker discovery change the
//! table only through it, and every change takes one way in, whatever the store: the registry
//! decides it over the table (takeover, quotas, drains, route checks: functions of the table
//! alone), its [`Backend`](backend::Backend) commits it and gives it a revision, and the
//! committed change reaches the table through [`Registry::apply`], which applies it to the
//! [`Store`] at that revision and publishes one [`Change`] on the [`feed`](crate::feed) with
//! its cause and time. In memory the backend applies at once, after writing routes and drains
//! ahead to the data directory; with etcd it commits one transaction and the change comes back
//! through etcd's watch ([`replica`]). A call is answered once its change is applied. A change
//! to one instance carries that instance only, so its cost does not grow with the size of its
//! service. A heartbeat that changes nothing but `last_seen` is not a change: it gets no
//! revision, publishes nothing and is not written to any store, so the `last_seen` carried by
//! a change is the time of the instance's last change, while `GET /v1/services` shows the time
//! of its last heartbeat.
//!
//! Instances registered over the API ([`Source::Registrar`]) expire when no heartbeat renews
//! them within their `ttl_ms`. Each is owned by the registry that takes its heartbeats (with
//! etcd, it is bound to that replica's session lease), which keeps its deadline;
//! [`Registry::run_expiry`] sleeps until the earliest one, it is not driven by reads. Instances
//! from Docker never expire by TTL: the engine says when they go ([`Registry::remove`],
//! [`Registry::sync_source`]), and the registry's Docker reconciler writes what the engine
//! runs.
//!
//! Sources do not overwrite each other from the API: a registration or deregistration over the
//! API of an instance that Docker discovered is refused ([`Conflict`]), since the API's
//! short-lived copy would expire and leave the healthy container missing. Docker discovery, the
//! engine's own account of a running container, takes over an API-registered instance of the
//! same id instead (logged as a warning); the registrar's next heartbeat is then refused.
//!
//! Every change names who made it (its `by`): the name of the token of the call that made it
//! (`anonymous` without one, while changes need none), `docker` for Docker discovery, `expiry`
//! for an instance that outlived its TTL ([`baker_client::change::by`]). It travels with the
//! committed change: in the instance's value and in the removal's causes with etcd, so that
//! every replica publishes the same `by`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use baker_client::change::{by, Change, MaintenanceAction, RemoveCause, UpsertCause};
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

use crate::etcd::{DrainRecord, Removal, RouteRecord};
use crate::feed::{Feed, Published, Receiver};
use crate::metrics::{Metrics, QuotaLabel, ServiceLabel};
use crate::quota::{Exceeded, Occupancy, Quotas};
use crate::routes::{RouteStore, StoreError};
use crate::store::{MemoryStore, Store};

mod backend;
mod discovered;

pub use discovered::Finder;
#[cfg(test)]
mod fake;
mod known;
mod replica;

use backend::{Backend, CommitError, Committed, Entry, MemoryBackend, Proposal};
use replica::cleared;
pub use replica::REPLICA_LEASE;

/// Where an operator's call came from, for the route or drain change it makes: `from` in
/// words (`cli:alice from 10.0.0.5 with token deploy`), and `by`, the name of its token (or
/// `BAKER_TOKEN`, `anonymous`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub from: String,
    pub by: String,
}

impl From<&str> for Origin {
    /// A call from `from` with no token.
    fn from(from: &str) -> Origin {
        Origin {
            from: from.to_owned(),
            by: by::ANONYMOUS.to_owned(),
        }
    }
}

impl From<String> for Origin {
    fn from(from: String) -> Origin {
        Origin {
            from,
            by: by::ANONYMOUS.to_owned(),
        }
    }
}

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
    /// The limits on growth, checked on the table as changes are decided (and, in memory,
    /// again as they are applied).
    quotas: Quotas,
    /// Where changes are committed: the data directory, or etcd.
    backend: Box<dyn Backend>,
    /// The containers this registry's Docker engine runs, which its reconciler writes.
    docker: Mutex<discovered::Discovered>,
    /// Wakes the Docker reconciler.
    kick: Notify,
    /// Serializes the changes of hard state (routes, drains) made through this registry: each
    /// is decided on the state the previous one left, so a quota checked at the decision still
    /// holds at the commit.
    hard_writes: tokio::sync::Mutex<()>,
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
    /// TTL deadlines of the instances this registry owns, earliest first ...
    deadlines: BTreeSet<(Instant, ServiceName, InstanceId)>,
    /// ... and each such instance's deadline.
    leases: HashMap<(ServiceName, InstanceId), Instant>,
    /// Services that have had a live instance since the directory started, the
    /// `BAKER_MAX_SERVICES` seen last.
    known: known::Known,
    /// Services whose route falls back to all their live instances, because none of the
    /// targets it routes to has one ([`route_falls_back_by_version`]).
    falling_back: BTreeSet<ServiceName>,
    /// The owner each instance is bound to: the session of the registry that took its
    /// heartbeats or runs its container (always 0 in memory; an etcd lease with etcd).
    owners: HashMap<(ServiceName, InstanceId), i64>,
    /// The revision each service's drains were last written at, which a drain decided on them
    /// expects to find (another write in between makes it decide again).
    drain_revisions: HashMap<ServiceName, u64>,
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
}

/// Why a registration or deregistration failed: it changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error(transparent)]
    Conflict(#[from] Conflict),
    #[error(transparent)]
    Quota(#[from] Exceeded),
    /// etcd could not commit it (quorum lost, or no member answered).
    #[error(transparent)]
    Unavailable(#[from] crate::etcd::EtcdError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<Refused> for WriteError {
    fn from(r: Refused) -> Self {
        match r {
            Refused::Conflict(c) => WriteError::Conflict(c),
            Refused::Quota(q) => WriteError::Quota(q),
        }
    }
}

impl From<CommitError> for WriteError {
    fn from(e: CommitError) -> Self {
        match e {
            CommitError::Refused(r) => r.into(),
            CommitError::Unavailable(e) => WriteError::Unavailable(e),
            CommitError::Store(e) => WriteError::Store(e),
        }
    }
}

/// Why a change of the hard state (a route, a drain or an undrain) failed: it changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum ChangeError {
    #[error(transparent)]
    Conflict(#[from] Conflict),
    #[error(transparent)]
    Quota(#[from] Exceeded),
    #[error(transparent)]
    Store(#[from] StoreError),
    /// etcd could not commit it (quorum lost, or no member answered).
    #[error(transparent)]
    Unavailable(#[from] crate::etcd::EtcdError),
}

impl From<CommitError> for ChangeError {
    fn from(e: CommitError) -> Self {
        match e {
            CommitError::Refused(Refused::Quota(q)) => ChangeError::Quota(q),
            CommitError::Refused(Refused::Conflict(c)) => ChangeError::Conflict(c),
            CommitError::Store(e) => ChangeError::Store(e),
            CommitError::Unavailable(e) => ChangeError::Unavailable(e),
        }
    }
}

/// Why a route change failed.
pub type RouteError = ChangeError;

/// Why a drain or undrain failed.
pub type DrainError = ChangeError;

/// What a put did to the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// A new instance.
    Added,
    /// An existing instance whose address, port, version, weight, tags, TTL, source or
    /// node changed.
    Changed,
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
        && a.zone == b.zone
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

    /// Where the registered `service`/`id` came from, if it is registered.
    fn source_of(&self, service: &ServiceName, id: &InstanceId) -> Option<Source> {
        Some(self.store.instance(service, id)?.source)
    }

    /// Removes `service`/`id`, a change made at `revision`; its last value.
    fn take(&mut self, revision: u64, service: &ServiceName, id: &InstanceId) -> Option<Instance> {
        let taken = self.store.remove(revision, service, id)?;
        self.lease(service, id, None);
        self.owners.remove(&(service.clone(), id.clone()));
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
        Registry::with_backend(
            Box::new(MemoryStore::new(routes, maintenance)),
            Box::new(MemoryBackend::new(route_file)),
            metrics,
            event_capacity,
            quotas,
        )
    }

    /// A registry over `store`, committing changes through `backend`.
    fn with_backend(
        store: Box<dyn Store>,
        backend: Box<dyn Backend>,
        metrics: Arc<Metrics>,
        event_capacity: usize,
        quotas: Quotas,
    ) -> Registry {
        let mut table = Table {
            store,
            feed: Feed::new(event_capacity),
            deadlines: BTreeSet::new(),
            leases: HashMap::new(),
            known: known::Known::new(quotas.services),
            falling_back: BTreeSet::new(),
            owners: HashMap::new(),
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
                backend,
                docker: Mutex::new(discovered::Discovered::default()),
                kick: Notify::new(),
                hard_writes: tokio::sync::Mutex::new(()),
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

    /// Whether the table lives in etcd (this registry is one of its replicas).
    pub fn is_replica(&self) -> bool {
        self.inner.backend.following().is_some()
    }

    /// Whether this replica's table follows etcd (`Ok`), or why not; `None` in memory mode.
    pub fn following(&self) -> Option<Result<(), String>> {
        self.inner.backend.following()
    }

    /// The etcd revision this replica's table has applied; `None` in memory mode.
    pub fn applied_revision(&self) -> Option<u64> {
        self.inner.backend.applied_revision()
    }

    /// Waits until the table holds a first snapshot of its store, or `limit` passes (at once
    /// in memory).
    pub async fn first_snapshot(&self, limit: Duration) {
        self.inner.backend.first_snapshot(limit).await
    }

    /// Keeps the store's side going until `shutdown` is cancelled: the Docker reconciler and,
    /// with etcd, the watch that feeds the table and the session; then does what the store
    /// needs done before the process exits (with etcd: this replica's containers leave at
    /// once, and its lease is revoked unless registrars' instances are bound to it).
    pub async fn run_store(self, shutdown: CancellationToken) {
        tokio::join!(
            self.inner.backend.run(&self, shutdown.clone()),
            self.reconcile_docker(shutdown.clone()),
        );
        self.inner.backend.leave(&self).await;
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
        by: Option<String>,
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
            by,
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
        by: Option<String>,
    ) {
        instance.mark(t.store.maintenance(&instance.service));
        let change = Change::Remove {
            index: revision,
            at: unix_millis(),
            cause,
            instance,
            by,
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

    /// Registers or renews `service`/`id` from the API, answering once the change is applied:
    /// the registrar's heartbeats end here.
    ///
    /// A heartbeat that changes nothing, of an instance this registry owns, moves its deadline
    /// and writes nothing (with etcd, only while etcd confirmed the session lately: else it is
    /// refused, 503, and the registrar moves on). A new instance, a changed one, or one owned
    /// by another replica (its registrar moved here) is committed, bound to this registry's
    /// session, and published. A registration of an instance Docker discovered is refused and
    /// changes nothing, as is a new instance past a quota. The instance answered is marked
    /// `up` or `draining` by its service's drains.
    pub async fn register(
        &self,
        service: &ServiceName,
        id: &InstanceId,
        spec: ValidSpec,
    ) -> Result<Instance, WriteError> {
        self.register_by(service, id, spec, by::ANONYMOUS).await
    }

    /// [`Registry::register`] on a call `by` (its token's name): a new or changed instance
    /// records it, a heartbeat that changes nothing does not.
    pub async fn register_by(
        &self,
        service: &ServiceName,
        id: &InstanceId,
        spec: ValidSpec,
        by: &str,
    ) -> Result<Instance, WriteError> {
        let backend = &self.inner.backend;
        let mut instance = instance_of(service, id, spec, Source::Registrar);
        let session = backend.session().await?;
        let key = (service.clone(), id.clone());
        for _ in 0..3 {
            let (existing, owner) = {
                let t = self.lock();
                check_takeover(&t, service, id, Source::Registrar)?;
                t.admit(&self.inner.quotas, service, id)
                    .inspect_err(|e| self.refused(e))?;
                (
                    t.store.instance(service, id).cloned(),
                    t.owners.get(&key).copied(),
                )
            };
            joined_as(&mut instance, existing.as_ref());
            if let (Some(old), Some(owner)) = (&existing, owner) {
                if owner == session && same_but_last_seen(old, &instance) {
                    // Only a session the store confirmed lately vouches for the instance.
                    backend.vouch()?;
                    let mut t = self.lock();
                    if t.owners.get(&key) == Some(&session) {
                        self.inner.metrics.heartbeats.inc();
                        tracing::trace!("heartbeat from {service}/{id}");
                        let before = t.next_deadline();
                        let deadline = Instant::now() + Duration::from_millis(instance.ttl_ms);
                        t.lease(service, id, Some(deadline));
                        t.store.renew(service, id, instance.last_seen);
                        self.rearm(before, t.next_deadline());
                        instance.mark(t.store.maintenance(service));
                        return Ok(instance);
                    }
                    continue;
                }
            }
            let proposal = Proposal::Put {
                instance: instance.clone(),
                owner: session,
                expected: existing.as_ref().and(owner),
                by: by.to_owned(),
            };
            match backend.commit(self, proposal).await? {
                Committed::Done { .. } => {
                    if existing.is_some() {
                        self.inner.metrics.heartbeats.inc();
                    }
                    instance.mark(self.lock().store.maintenance(service));
                    return Ok(instance);
                }
                // Written elsewhere since the table showed it: decide again on what it shows
                // now (the backend answers once the table has caught up).
                Committed::Held(holder) => tracing::debug!(
                    %service, %id, holder = format_args!("{holder:x}"),
                    "the instance changed since it was read; deciding again"
                ),
                Committed::Stale => {}
            }
        }
        Err(crate::etcd::EtcdError::Contended.into())
    }

    /// Deregisters `service`/`id` from the API, answering once the change is applied; `None`
    /// when it was not registered. An instance Docker discovered is not the API's to remove.
    pub async fn unregister(
        &self,
        service: &ServiceName,
        id: &InstanceId,
    ) -> Result<Option<Instance>, WriteError> {
        self.unregister_by(service, id, by::ANONYMOUS).await
    }

    /// [`Registry::unregister`] on a call `by` (its token's name), which the removal records.
    pub async fn unregister_by(
        &self,
        service: &ServiceName,
        id: &InstanceId,
        by: &str,
    ) -> Result<Option<Instance>, WriteError> {
        let existing = {
            let t = self.lock();
            match t.store.instance(service, id) {
                Some(i) if i.source == Source::Docker => {
                    return Err(Conflict {
                        service: service.clone(),
                        id: id.clone(),
                    }
                    .into())
                }
                other => other.cloned(),
            }
        };
        let Some(existing) = existing else {
            return Ok(None);
        };
        let removals = vec![Removal {
            service: service.clone(),
            id: id.clone(),
            cause: RemoveCause::Deregistered,
            by: Some(by.to_owned()),
        }];
        match self
            .inner
            .backend
            .commit(self, Proposal::Remove { removals })
            .await?
        {
            Committed::Done { changed, .. } if changed > 0 => Ok(Some(existing)),
            _ => Ok(None),
        }
    }

    /// Notes that Docker runs `service`/`id` as `spec` says; the reconciler writes it. A
    /// registrar's instance of the same id is taken over (with a warning); a new instance past
    /// a quota is refused and changes nothing.
    pub fn upsert(
        &self,
        service: &ServiceName,
        id: &InstanceId,
        spec: ValidSpec,
    ) -> Result<Instance, Refused> {
        self.upsert_from(Finder::Containers, service, id, spec)
    }

    /// [`Registry::upsert`] for the discovery `origin` (a swarm's tasks, or the containers).
    pub fn upsert_from(
        &self,
        origin: Finder,
        service: &ServiceName,
        id: &InstanceId,
        spec: ValidSpec,
    ) -> Result<Instance, Refused> {
        let instance = instance_of(service, id, spec, Source::Docker);
        {
            let t = self.lock();
            check_takeover(&t, service, id, Source::Docker)?;
            t.admit(&self.inner.quotas, service, id)
                .inspect_err(|e| self.refused(e))?;
        }
        self.discovered().want(instance.clone(), origin);
        self.inner.kick.notify_one();
        Ok(instance)
    }

    /// Notes that Docker no longer runs `service`/`id`, for `cause`; the reconciler removes
    /// it. `false` if it was not running.
    pub fn remove(&self, service: &ServiceName, id: &InstanceId, cause: RemoveCause) -> bool {
        let was = self.discovered().drop_one(service, id, cause);
        self.inner.kick.notify_one();
        was
    }

    /// Makes the containers Docker runs exactly `instances` (service, id, spec); the reconciler
    /// writes those that changed and removes the others. Instances past a quota are left out,
    /// with one warning. A swarm's tasks ([`Finder::Swarm`]) are not touched.
    pub fn sync_source(&self, instances: Vec<(ServiceName, InstanceId, ValidSpec)>) {
        let mut wanted = BTreeMap::new();
        let mut over_quota: Option<(Exceeded, usize)> = None;
        {
            let t = self.lock();
            for (service, id, spec) in instances {
                if check_takeover(&t, &service, &id, Source::Docker).is_err() {
                    continue;
                }
                if let Err(e) = t.admit(&self.inner.quotas, &service, &id) {
                    self.count_refusal(&e);
                    over_quota.get_or_insert((e, 0)).1 += 1;
                    continue;
                }
                let instance = instance_of(&service, &id, spec, Source::Docker);
                wanted.insert((service, id), instance);
            }
        }
        if let Some((first, count)) = over_quota {
            tracing::warn!(
                source = %Source::Docker,
                refused = count,
                "{count} instance(s) not registered, the first because {first}"
            );
        }
        self.discovered().want_only(Finder::Containers, wanted);
        self.inner.kick.notify_one();
    }

    fn discovered(&self) -> MutexGuard<'_, discovered::Discovered> {
        self.inner
            .docker
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Applies one committed change at `revision`, and publishes it if it changed the table:
    /// the only way a change reaches the table, whatever the store. Called with the lock held.
    /// Whether the table changed.
    fn apply(&self, t: &mut Table, revision: u64, entry: Entry) -> bool {
        match entry {
            Entry::Put {
                instance,
                owner,
                by,
            } => self.apply_put(t, revision, instance, owner, by),
            Entry::Gone {
                service,
                id,
                cause,
                by,
            } => self
                .apply_gone(t, revision, &service, &id, cause, by)
                .is_some(),
            Entry::Route { service, record } => self.apply_route(t, revision, &service, record),
            Entry::Drains { service, record } => {
                t.drain_revisions.insert(service.clone(), revision);
                self.apply_drains(t, revision, &service, record)
            }
            Entry::DrainsGone { service } => {
                t.drain_revisions.remove(&service);
                match cleared(t, &service) {
                    Some(record) => self.apply_drains(t, revision, &service, record),
                    None => false,
                }
            }
        }
    }

    /// Puts `instance`, bound to `owner`, at `revision`. An instance of a registrar bound to
    /// this registry's session gets its TTL deadline here; one bound to another's expires
    /// there (or with that session). A put that changes nothing but `last_seen` is no change.
    fn apply_put(
        &self,
        t: &mut Table,
        revision: u64,
        mut instance: Instance,
        owner: i64,
        by: Option<String>,
    ) -> bool {
        let (service, id) = (instance.service.clone(), instance.id.clone());
        t.owners.insert((service.clone(), id.clone()), owner);
        t.known.note(&service);
        let before = t.next_deadline();
        let deadline = (instance.source == Source::Registrar
            && owner == self.inner.backend.current_session())
        .then(|| Instant::now() + Duration::from_millis(instance.ttl_ms));
        t.lease(&service, &id, deadline);
        self.rearm(before, t.next_deadline());
        let old = t.store.instance(&service, &id);
        joined_as(&mut instance, old);
        let outcome = match old {
            Some(old) if same_but_last_seen(old, &instance) => {
                t.store.renew(&service, &id, instance.last_seen);
                return false;
            }
            Some(_) => Outcome::Changed,
            None => Outcome::Added,
        };
        t.store.put(revision, instance.clone());
        self.publish_upsert(t, outcome, revision, instance, by);
        true
    }

    /// Removes `service`/`id` at `revision`, for `cause` (`None`: it expired), by `by`
    /// (`None`: the cause's own). Returns its source, if it was in the table.
    fn apply_gone(
        &self,
        t: &mut Table,
        revision: u64,
        service: &ServiceName,
        id: &InstanceId,
        cause: Option<RemoveCause>,
        by: Option<String>,
    ) -> Option<Source> {
        let owner = t.owners.get(&(service.clone(), id.clone())).copied();
        let instance = t.take(revision, service, id)?;
        let source = instance.source;
        // Another replica's container, gone for a reason of its engine (not as `expired`: its
        // lease ran out, or its replica stopped and handed it over, when this one is to take
        // it over): if this engine runs it too, its own stop event is on its way.
        if source == Source::Docker
            && cause.is_some_and(|c| c != RemoveCause::Expired)
            && owner.is_some_and(|o| o != self.inner.backend.current_session())
        {
            self.discovered().stopped_elsewhere(service, id);
        }
        let cause = cause.unwrap_or_else(|| {
            self.inner.metrics.expiries.inc();
            tracing::info!(
                "expired {service}/{id}: no heartbeat for {} ms",
                instance.ttl_ms
            );
            RemoveCause::Expired
        });
        let by = by.or_else(|| cause.made_by().map(str::to_owned));
        if cause != RemoveCause::Expired {
            tracing::info!("deregistered {service}/{id} ({source}, {})", cause.as_str());
        }
        self.inner
            .metrics
            .deregistrations
            .get_or_create(&source.into())
            .inc();
        self.publish_remove(t, revision, instance, cause, by);
        if source == Source::Docker {
            // Another replica's container may have lost its owner: this one may take it.
            self.inner.kick.notify_one();
        }
        Some(source)
    }

    /// Writes the Docker instances this registry's engine runs and removes those it dropped,
    /// whenever discovery or the table changes, and every few seconds, until `shutdown`.
    pub async fn reconcile_docker(&self, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = self.inner.kick.notified() => {}
                _ = tokio::time::sleep(discovered::RECONCILE_EVERY) => {}
            }
            if let Err(e) = self.reconcile_once().await {
                tracing::warn!(cause = %e, "could not write Docker's instances");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    }

    /// One pass of the Docker reconciler: puts what the engine runs and the table lacks (or
    /// holds otherwise), removes this registry's containers the engine no longer runs.
    pub(crate) async fn reconcile_once(&self) -> Result<(), CommitError> {
        if self.discovered().is_idle() {
            return Ok(());
        }
        let owner = self.inner.backend.session().await?;
        let (puts, removals) = {
            let t = self.lock();
            let mut d = self.discovered();
            d.plan(&t, owner)
        };
        // Removals first: what the engine dropped makes room for what it started.
        if !removals.is_empty() {
            self.inner
                .backend
                .commit(self, Proposal::Remove { removals })
                .await?;
        }
        for (instance, expected) in puts {
            let (service, id) = (instance.service.clone(), instance.id.clone());
            let proposal = Proposal::Put {
                instance,
                owner,
                expected,
                by: by::DOCKER.to_owned(),
            };
            match self.inner.backend.commit(self, proposal).await {
                Ok(Committed::Held(holder)) => tracing::debug!(
                    %service, %id, holder = format_args!("{holder:x}"),
                    "another replica holds a container this engine runs"
                ),
                Ok(_) => {}
                // Refused on the table as it now stands (a quota filled meanwhile): the next
                // pass decides again.
                Err(CommitError::Refused(r)) => {
                    tracing::debug!(%service, %id, cause = %r, "container not written")
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
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

    /// Expires the instances this registry owns whose TTL deadline is at or before `now`:
    /// each is removed if it is still owned here and was not renewed meanwhile (with etcd:
    /// still bound to this replica's session), with no cause, so it is published as
    /// `expired`. Returns how many went. One that could not be removed (etcd away) is tried
    /// again a second later (the session's own end removes it otherwise). While the session
    /// is stale (heartbeats are refused), the due instances get their TTL again instead.
    pub async fn expire(&self, now: Instant) -> usize {
        let owner = self.inner.backend.current_session();
        let due: Vec<(ServiceName, InstanceId)> = {
            let mut t = self.lock();
            let mut due = Vec::new();
            while let Some((deadline, service, id)) = t.deadlines.first().cloned() {
                if deadline > now {
                    break;
                }
                t.lease(&service, &id, None);
                if t.owners.get(&(service.clone(), id.clone())) == Some(&owner) {
                    due.push((service, id));
                }
            }
            due
        };
        if due.is_empty() {
            return 0;
        }
        if self.inner.backend.vouch().is_err() {
            // Cut off from etcd: the heartbeats of these instances may have been refused, and
            // no lease runs out without a leader either. Each gets its TTL again, as etcd gives
            // every lease its TTL again when a new leader is elected.
            let mut t = self.lock();
            let before = t.next_deadline();
            for (service, id) in due {
                let Some(ttl) = t.store.instance(&service, &id).map(|i| i.ttl_ms) else {
                    continue;
                };
                let again = now + Duration::from_millis(ttl.max(1000));
                t.lease(&service, &id, Some(again));
            }
            self.rearm(before, t.next_deadline());
            return 0;
        }
        let proposal = Proposal::Expire {
            due: due.clone(),
            owner,
        };
        match self.inner.backend.commit(self, proposal).await {
            Ok(Committed::Done { changed, .. }) => changed,
            Ok(_) => 0,
            Err(e) => {
                tracing::warn!(
                    cause = %e,
                    "could not expire {} instances (first {}/{}); trying again",
                    due.len(),
                    due[0].0,
                    due[0].1
                );
                let mut t = self.lock();
                let before = t.next_deadline();
                let again = Instant::now() + Duration::from_secs(1);
                for (service, id) in due {
                    if t.store.instance(&service, &id).is_some()
                        && !t.leases.contains_key(&(service.clone(), id.clone()))
                    {
                        t.lease(&service, &id, Some(again));
                    }
                }
                self.rearm(before, t.next_deadline());
                0
            }
        }
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
                    self.expire(Instant::now()).await;
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
    /// The route is committed before anything is applied or published (written ahead to the
    /// data directory in memory, two fsyncs; one transaction with etcd), and the call answers
    /// once it is applied: a route that answered survives a crash, and one that could not be
    /// stored changed nothing and was never published.
    pub async fn set_route(
        &self,
        service: &ServiceName,
        route: Option<Route>,
    ) -> Result<Option<RouteResponse>, RouteError> {
        self.set_route_by(service, route, None).await
    }

    /// [`Registry::set_route`], recording where the call came from and who made it
    /// (`origin`) on the change (on disk nothing but the route: a directory that restarts has
    /// no origin to give; in etcd, with the route).
    pub async fn set_route_by(
        &self,
        service: &ServiceName,
        route: Option<Route>,
        origin: Option<Origin>,
    ) -> Result<Option<RouteResponse>, RouteError> {
        // One change of hard state at a time through this registry: the quota checked here
        // still holds when the route is committed.
        let _writing = self.inner.hard_writes.lock().await;
        {
            let t = self.lock();
            let current = t.store.route(service);
            if current == route.as_ref() {
                return Ok(current.is_some().then(|| RouteResponse {
                    index: t.store.revision(),
                    service: service.clone(),
                    route: current.cloned(),
                }));
            }
            if current.is_none() {
                self.inner
                    .quotas
                    .admit_route(service, t.store.route_count())
                    .inspect_err(|e| self.refused(e))?;
            }
        }
        let (origin, by) = match origin {
            Some(o) => (Some(o.from), Some(o.by)),
            None => (None, None),
        };
        let record = RouteRecord {
            route,
            origin,
            at: unix_millis(),
            by,
        };
        let proposal = Proposal::Route {
            service: service.clone(),
            record: record.clone(),
        };
        let index = match self.inner.backend.commit(self, proposal).await? {
            Committed::Done { revision, .. } => revision,
            Committed::Held(_) | Committed::Stale => self.index(),
        };
        Ok(Some(RouteResponse {
            index,
            service: service.clone(),
            route: record.route,
        }))
    }

    /// Applies `service`'s route as `record` says at `revision`, with the origin and time of
    /// the call that set or cleared it, publishing it if it differs from the table's.
    /// Called with the lock held.
    fn apply_route(
        &self,
        t: &mut Table,
        revision: u64,
        service: &ServiceName,
        record: RouteRecord,
    ) -> bool {
        if t.store.route(service) == record.route.as_ref() {
            return false;
        }
        t.store.set_route(revision, service, record.route.clone());
        match &record.route {
            Some(r) => tracing::info!("route of {service} set to {}", describe(r)),
            None => tracing::info!("route of {service} cleared"),
        }
        self.inner.metrics.routes.set(t.store.route_count() as i64);
        let change = Change::Route {
            index: revision,
            at: if record.at > 0 {
                record.at
            } else {
                unix_millis()
            },
            service: service.clone(),
            route: record.route,
            origin: record.origin,
            by: record.by,
        };
        self.publish(t, change);
        true
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
        origin: Origin,
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
                    origin: origin.from.clone(),
                };
                let entry = MaintenanceEntry::of(service, &target, &drain);
                next.insert(target.clone(), drain);
                Ok(DrainPlan::Write {
                    next,
                    action: MaintenanceAction {
                        drained: true,
                        target: target.clone(),
                        reason: reason.clone(),
                        origin: origin.from.clone(),
                        by: Some(origin.by.clone()),
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
        origin: Origin,
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
                    origin: origin.from.clone(),
                    by: Some(origin.by.clone()),
                },
                entry: MaintenanceEntry::of(service, &target, &old),
            })
        })
        .await
    }

    /// Decides a change of `service`'s drains with `decide` (under the table's lock), commits
    /// it, and answers once it is applied. When another write (another replica's, with etcd)
    /// changed the service's drains between the decision and the commit, decides again on
    /// the drains it left.
    async fn change_drains(
        &self,
        service: &ServiceName,
        decide: impl Fn(&Table) -> Result<DrainPlan, DrainError>,
    ) -> Result<Option<DrainResponse>, DrainError> {
        // One change of hard state at a time through this registry: each decides on the
        // drains the previous one left.
        let _writing = self.inner.hard_writes.lock().await;
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
            let proposal = Proposal::Drains {
                service: service.clone(),
                record: DrainRecord {
                    maintenance: next,
                    action,
                    at: unix_millis(),
                },
                seen: seen.unwrap_or_default(),
            };
            match self.inner.backend.commit(self, proposal).await? {
                Committed::Done { revision, .. } => {
                    return Ok(Some(DrainResponse {
                        index: revision,
                        drain: entry,
                    }))
                }
                Committed::Held(_) | Committed::Stale => {
                    tracing::debug!(%service, "the drains changed since they were read; deciding again");
                }
            }
        }
    }

    /// Applies `service`'s drains as `record` says at `revision`, publishing them with the
    /// drain or undrain that left them so if they differ from the table's. Called with the
    /// lock held.
    fn apply_drains(
        &self,
        t: &mut Table,
        revision: u64,
        service: &ServiceName,
        record: DrainRecord,
    ) -> bool {
        let held = t.store.maintenance(service).cloned().unwrap_or_default();
        if held == record.maintenance {
            return false;
        }
        let DrainRecord {
            maintenance,
            action,
            at,
        } = record;
        t.store
            .set_maintenance(revision, service, maintenance.clone());
        self.inner.metrics.drains.set(t.drain_count() as i64);
        let verb = if action.drained {
            "drained"
        } else {
            "undrained"
        };
        let (target, origin) = (&action.target, &action.origin);
        tracing::info!(%service, %target, %origin, "{verb} {service} {target}");
        let change = Change::Maintenance {
            index: revision,
            at,
            service: service.clone(),
            maintenance,
            action,
        };
        self.publish(t, change);
        true
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
        zone: spec.zone,
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
pub(crate) mod tests {
    use super::*;
    use crate::maintenance::MaintenanceFiles;
    use futures_util::FutureExt;

    fn svc(name: &str) -> ServiceName {
        name.parse().unwrap()
    }

    fn iid(id: &str) -> InstanceId {
        id.parse().unwrap()
    }

    pub(super) fn spec(port: u16, ttl_ms: u64) -> ValidSpec {
        ValidSpec {
            address: "10.0.0.1".parse().unwrap(),
            port,
            version: "1".parse().unwrap(),
            weight: 100,
            tags: vec![],
            ttl_ms,
            node: None,
            zone: None,
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
        r.register(&svc("emitter"), &iid("a"), spec(80, 1000))
            .await
            .unwrap();
        r.register(&svc("emitter"), &iid("a"), spec(80, 1000))
            .await
            .unwrap();
        r.register(&svc("emitter"), &iid("a"), spec(80, 1000))
            .await
            .unwrap();
        assert_eq!(r.index(), 1);
        let mut heavier = spec(80, 1000);
        heavier.weight = 50;
        r.register(&svc("emitter"), &iid("a"), heavier)
            .await
            .unwrap();
        r.register(&svc("emitter"), &iid("b"), spec(81, 1000))
            .await
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

    #[tokio::test(start_paused = true)]
    async fn a_new_zone_is_a_change_and_the_same_zone_a_heartbeat() {
        let (r, _dir) = registry();
        let mut sub = r.subscribe(None, false);
        let zoned = |zone: Option<&str>| ValidSpec {
            zone: zone.map(|z| z.parse().unwrap()),
            ..spec(80, 1000)
        };
        for zone in [Some("zone-a"), Some("zone-a"), Some("zone-b"), None] {
            r.register(&svc("emitter"), &iid("a"), zoned(zone))
                .await
                .unwrap();
        }
        let got: Vec<_> = events(&mut sub.feed).iter().map(ids).collect();
        assert_eq!(
            got,
            [
                id4(1, "registered", "emitter", "a"),
                id4(2, "changed", "emitter", "a"),
                id4(3, "changed", "emitter", "a"),
            ]
        );
        assert_eq!(r.services().services["emitter"][0].zone, None);
    }

    #[tokio::test]
    async fn an_instance_keeps_when_it_joined_through_heartbeats_and_changes() {
        let (r, _dir) = registry();
        let mut sub = r.subscribe(None, false);
        let (emitter, a) = (svc("emitter"), iid("a"));
        let put = |spec| r.register(&emitter, &a, spec);
        let joined = put(spec(80, 1000)).await.unwrap();
        assert_eq!(joined.since, joined.last_seen);
        std::thread::sleep(Duration::from_millis(5));
        let renewed = put(spec(80, 1000)).await.unwrap();
        assert_eq!(renewed.since, joined.since, "a heartbeat keeps it");
        assert!(renewed.last_seen > joined.since);
        std::thread::sleep(Duration::from_millis(5));
        let mut heavier = spec(80, 1000);
        heavier.weight = 50;
        let changed = put(heavier).await.unwrap();
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
        r.unregister(&svc("emitter"), &iid("a")).await.unwrap();
        std::thread::sleep(Duration::from_millis(5));
        let again = put(spec(80, 1000)).await.unwrap();
        assert!(again.since > joined.since, "registered anew, it joins anew");
    }

    #[tokio::test(start_paused = true)]
    async fn silence_expires_on_the_timer_and_heartbeats_keep_alive() {
        let (r, _dir) = registry();
        let shutdown = CancellationToken::new();
        let timer = tokio::spawn(r.clone().run_expiry(shutdown.clone()));
        let mut sub = r.subscribe(None, false);
        let rx = &mut sub.feed;
        r.register(&svc("emitter"), &iid("a"), spec(80, 1000))
            .await
            .unwrap();
        r.register(&svc("emitter"), &iid("b"), spec(81, 3000))
            .await
            .unwrap();
        // Keep `a` alive for 5 s with a heartbeat every 500 ms.
        for _ in 0..10 {
            tokio::time::sleep(Duration::from_millis(500)).await;
            r.register(&svc("emitter"), &iid("a"), spec(80, 1000))
                .await
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
        r.register(&svc("s"), &iid("long"), spec(80, 60_000))
            .await
            .unwrap();
        tokio::task::yield_now().await;
        r.register(&svc("s"), &iid("short"), spec(81, 200))
            .await
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
        r.upsert(&svc("web"), &iid("c1"), spec(80, 100)).unwrap();
        r.reconcile_once().await.unwrap();
        assert_eq!(r.next_deadline(), None);
        tokio::time::advance(Duration::from_secs(3600)).await;
        assert_eq!(r.expire(Instant::now()).await, 0);
        assert_eq!(r.services().services["web"].len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn the_api_cannot_take_over_a_docker_instance() {
        let (r, _dir) = registry();
        r.upsert(&svc("web"), &iid("c1"), spec(80, 100)).unwrap();
        r.reconcile_once().await.unwrap();
        let mut sub = r.subscribe(None, false);
        let rx = &mut sub.feed;
        // A short-lived registration of the same id is refused and changes nothing ...
        let err = r
            .register(&svc("web"), &iid("c1"), spec(9999, 100))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("discovered from Docker"), "{err}");
        let refused = r.unregister(&svc("web"), &iid("c1")).await.unwrap_err();
        assert_eq!(refused.to_string(), err.to_string());
        assert!(events(rx).is_empty());
        // ... so nothing expires, and the container's instance stays.
        assert_eq!(r.next_deadline(), None);
        tokio::time::advance(Duration::from_secs(60)).await;
        assert_eq!(r.expire(Instant::now()).await, 0);
        let web = &r.services().services["web"];
        assert_eq!((web[0].port, web[0].source), (80, Source::Docker));
        // Another id is fine.
        r.register(&svc("web"), &iid("c2"), spec(81, 100))
            .await
            .unwrap();
        assert_eq!(
            r.unregister(&svc("web"), &iid("c2"))
                .await
                .unwrap()
                .unwrap()
                .id,
            "c2"
        );
        assert!(matches!(
            r.unregister(&svc("web"), &iid("c2")).await,
            Ok(None)
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn docker_takes_over_an_api_instance_of_the_same_id() {
        let (r, _dir) = registry();
        r.register(&svc("web"), &iid("c1"), spec(80, 100))
            .await
            .unwrap();
        r.sync_source(vec![(svc("web"), iid("c1"), spec(81, 100))]);
        r.reconcile_once().await.unwrap();
        assert_eq!(
            r.next_deadline(),
            None,
            "the registrar's TTL no longer applies"
        );
        tokio::time::advance(Duration::from_secs(60)).await;
        assert_eq!(r.expire(Instant::now()).await, 0);
        let web = &r.services().services["web"];
        assert_eq!((web[0].port, web[0].source), (81, Source::Docker));
        // The registrar's next heartbeat is refused; once the container is gone, it is not.
        assert!(r
            .register(&svc("web"), &iid("c1"), spec(80, 100))
            .await
            .is_err());
        r.sync_source(vec![]);
        r.reconcile_once().await.unwrap();
        r.register(&svc("web"), &iid("c1"), spec(80, 100))
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn deregister_removes_at_once() {
        let (r, _dir) = registry();
        let mut sub = r.subscribe(None, false);
        let rx = &mut sub.feed;
        r.register(&svc("emitter"), &iid("a"), spec(80, 6000))
            .await
            .unwrap();
        let (emitter, a) = (svc("emitter"), iid("a"));
        assert!(r.unregister(&emitter, &a).await.unwrap().is_some());
        assert!(r.unregister(&emitter, &a).await.unwrap().is_none());
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
        r.register(&svc("web"), &iid("by-hand"), spec(80, 6000))
            .await
            .unwrap();
        r.sync_source(vec![
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
        ]);
        r.reconcile_once().await.unwrap();
        let mut sub = r.subscribe(None, false);
        let (snapshot, rx) = (sub.snapshot.clone(), &mut sub.feed);
        assert_eq!(snapshot.index, 4, "one revision per instance");
        // Same set again: nothing changes, nothing is published.
        r.sync_source(vec![
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
        ]);
        r.reconcile_once().await.unwrap();
        assert!(events(rx).is_empty());
        // c2 gone, db unchanged, a new service appears.
        r.sync_source(vec![
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
        ]);
        r.reconcile_once().await.unwrap();
        let got: Vec<_> = events(rx).iter().map(ids).collect();
        assert_eq!(
            got,
            [
                id4(5, "docker_resync", "web", "c2"),
                id4(6, "docker", "cache", "c4"),
            ]
        );
        // An empty sync removes every Docker instance and leaves the registrar's.
        r.sync_source(vec![]);
        r.reconcile_once().await.unwrap();
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
    async fn a_failed_route_write_changes_nothing_and_publishes_nothing() {
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
        // Written ahead: a route that could not be stored was never published.
        assert!(events(&mut sub.feed).is_empty());
        assert_eq!(r.index(), 1);
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
        r.register(&svc("a"), &iid("1"), spec(80, 6000))
            .await
            .unwrap();
        // The snapshot of index 1 is cached.
        drop(r.subscribe(None, false));
        let mut sub = r.subscribe_then(None, true, || {
            // Where the cache used to be read a second time: a change, and a newer subscriber
            // that replaces the cached snapshot with index 2's.
            r.register(&svc("b"), &iid("1"), spec(80, 6000))
                .now_or_never()
                .expect("a registration in memory never waits")
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

    #[tokio::test]
    async fn the_services_known_are_bounded_and_live_ones_always_known() {
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
            r.register(&svc(name), &iid("1"), spec(80, 6000))
                .await
                .unwrap();
            r.unregister(&svc(name), &iid("1")).await.unwrap().unwrap();
        }
        assert!(
            !r.knows(&svc("a")),
            "the service gone longest ago is forgotten"
        );
        assert!(r.knows(&svc("b")) && r.knows(&svc("c")));
        r.register(&svc("a"), &iid("1"), spec(80, 6000))
            .await
            .unwrap();
        r.register(&svc("d"), &iid("1"), spec(80, 6000))
            .await
            .unwrap();
        assert!(
            r.knows(&svc("a")) && r.knows(&svc("d")),
            "live services are known"
        );
        assert_eq!(r.lock().known.len(), 2);
    }

    #[tokio::test]
    async fn snapshot_and_feed_do_not_overlap() {
        let (r, _dir) = registry();
        r.register(&svc("a"), &iid("1"), spec(80, 6000))
            .await
            .unwrap();
        let mut sub = r.subscribe(None, false);
        let (snapshot, rx) = (sub.snapshot.clone(), &mut sub.feed);
        r.register(&svc("b"), &iid("1"), spec(80, 6000))
            .await
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
            r.register(&svc("big"), &iid(&i.to_string()), spec(80, 60_000))
                .await
                .unwrap();
        }
        let mut v2 = r.subscribe(None, false);
        r.register(&svc("big"), &iid("new"), spec(80, 60_000))
            .await
            .unwrap();
        let p = v2.feed.try_recv().unwrap();
        assert!(p.legacy().is_none(), "no v1 watcher: no whole-service line");
        assert_eq!(ids(&p.change), id4(51, "registered", "big", "new"));
        let mut v1 = r.subscribe(None, true);
        r.unregister(&svc("big"), &iid("new")).await.unwrap();
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
                cause: RemoveCause::Deregistered,
                ..
            }
        ));
        drop(v1);
        assert_eq!(v2.feed.try_recv().unwrap().index(), 52);
        r.register(&svc("big"), &iid("new"), spec(80, 60_000))
            .await
            .unwrap();
        assert!(v2.feed.try_recv().unwrap().legacy().is_none());
    }

    #[tokio::test]
    async fn a_filtered_subscription_sees_only_its_services() {
        let (r, _dir) = registry();
        r.register(&svc("a"), &iid("1"), spec(80, 60_000))
            .await
            .unwrap();
        r.register(&svc("b"), &iid("1"), spec(80, 60_000))
            .await
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
        r.register(&svc("a"), &iid("2"), spec(80, 60_000))
            .await
            .unwrap();
        r.register(&svc("c"), &iid("1"), spec(80, 60_000))
            .await
            .unwrap();
        r.set_route(&svc("a"), Some([("1".parse().unwrap(), 100)].into()))
            .await
            .unwrap();
        r.unregister(&svc("b"), &iid("1")).await.unwrap();
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
        r.upsert(&svc("web"), &iid("c1"), spec(80, 100)).unwrap();
        r.reconcile_once().await.unwrap();
        r.remove(&svc("web"), &iid("c1"), RemoveCause::DockerUnhealthy);
        r.reconcile_once().await.unwrap();
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
        let a = r.register(&web, &iid("a"), spec(80, 60_000)).await.unwrap();
        assert_eq!(a.state, InstanceState::Draining);
        r.upsert(&web, &iid("b"), spec(81, 60_000)).unwrap();
        r.reconcile_once().await.unwrap();
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
