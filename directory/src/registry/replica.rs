//! A replica of a directory whose table lives in etcd (`BAKER_STORE=etcd://...`).
//!
//! The registry's table is then a mirror: [`Registry::run_replica`] reads the whole table at
//! one etcd revision, then follows etcd's watch from that revision, and applies each change
//! with the revision etcd gave it, publishing it on the change feed as the memory store would.
//! Every replica so publishes the same changes in the same order, and the watch stream's
//! `index` is the etcd revision. When the watch breaks (a member died, quorum lost, the
//! revision compacted), the replica reads a new snapshot once etcd answers again and publishes
//! only what differs from its mirror; an instance removed meanwhile goes out with the cause
//! etcd still holds for its removal (each replica's last), else as `expired`.
//!
//! Changes go to etcd, never to the mirror directly. A registrar's instance is a key bound to
//! the session lease of the replica that takes its heartbeats (the replica's own lease,
//! [`REPLICA_LEASE`]); that replica keeps the instance's TTL deadline itself, with the timer
//! the memory store uses. A heartbeat that changes nothing moves the deadline and writes
//! nothing, while etcd renewed the session within half its TTL (else it is answered 503, and
//! the registrar moves on); any other registration is one conditional put, which also takes
//! over an instance whose registrar moved here from another replica. An instance whose
//! deadline passes is deleted if still bound to this replica's session, with no cause: every
//! replica publishes it as `expired`; one whose replica died goes with that replica's session.
//! A deregistration deletes the key in a transaction that also writes why (see
//! [`crate::etcd`]), a route is a plain key. The call answers once etcd has committed the
//! change and this replica's mirror has applied it, so a client reads its own writes from the
//! replica it wrote to.
//!
//! Docker discovery says, synchronously, which containers this replica's engine runs; a
//! reconciler writes them to etcd bound to the replica's own lease ([`REPLICA_LEASE`]), and
//! never touches a Docker instance bound to another replica's lease: two replicas watching
//! the same engine do not fight over its containers, and when one dies the other takes them
//! over once its lease has run out.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use baker_client::change::{MaintenanceAction, RemoveCause};
use baker_client::maintenance::Maintenance;
use baker_client::model::{
    Instance, InstanceId, Route, RouteResponse, ServiceName, Source, ValidSpec,
};
use futures_util::StreamExt;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{
    check_takeover, instance_of, joined_as, same_but_last_seen, unix_millis, Conflict, DrainError,
    Outcome, Refused, Registry, RouteError, Table,
};
use crate::etcd::{
    lease_seconds, Change, DrainRecord, Etcd, EtcdError, Put, Removal, RouteRecord, Snapshot, Swap,
    REQUEST_TIMEOUT,
};
use crate::metrics::Metrics;
use crate::quota::{Exceeded, Quotas};
use crate::store::MemoryStore;

/// TTL of a replica's own lease, which its Docker instances and its removal causes are bound
/// to: a replica that dies takes its containers out of the table within this time.
pub const REPLICA_LEASE: Duration = Duration::from_secs(10);
/// How often the Docker reconciler looks again without being asked.
const RECONCILE_EVERY: Duration = Duration::from_secs(5);

/// Why a change written through the registry failed.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error(transparent)]
    Conflict(#[from] Conflict),
    #[error(transparent)]
    Quota(#[from] Exceeded),
    /// etcd could not commit it (quorum lost, or no member answered).
    #[error(transparent)]
    Unavailable(#[from] EtcdError),
}

impl From<Refused> for WriteError {
    fn from(r: Refused) -> Self {
        match r {
            Refused::Conflict(c) => WriteError::Conflict(c),
            Refused::Quota(q) => WriteError::Quota(q),
            Refused::NotStored => WriteError::Unavailable(EtcdError::NotStored),
        }
    }
}

/// What a registry in etcd mode holds beside its mirror.
pub(super) struct Replica {
    etcd: Etcd,
    /// The etcd revision the mirror has applied.
    applied: watch::Sender<u64>,
    /// Whether the mirror follows etcd's watch from a snapshot (`Ok`), or why not: from
    /// start-up until the first snapshot is read, and from a broken watch until the next one.
    following: watch::Sender<Result<(), String>>,
    /// This replica's own lease, granted when first needed and again after it ran out.
    lease: tokio::sync::Mutex<Option<i64>>,
    /// The session: this replica's lease as last granted or renewed (0: none), which the
    /// registrars' instances it keeps alive are bound to, and when etcd last confirmed it.
    session: std::sync::Mutex<(i64, Option<Instant>)>,
    /// The Docker instances this replica's engine runs, and why those it dropped went.
    docker: std::sync::Mutex<Discovered>,
    /// Wakes the Docker reconciler.
    kick: Notify,
}

#[derive(Default)]
struct Discovered {
    wanted: BTreeMap<(ServiceName, InstanceId), Instance>,
    dropped: HashMap<(ServiceName, InstanceId), RemoveCause>,
    /// When each wanted container was last added to `wanted` (a start seen by this engine).
    since: HashMap<(ServiceName, InstanceId), Instant>,
    /// Containers another replica removed for a reason of the engine's (stopped, died, ...),
    /// and when this replica learnt it: another replica on the same engine saw the stop
    /// first, and this one's own event is on its way. Such a container is not written again
    /// for [`STOPPED_ELSEWHERE`], unless this engine started it since.
    stopped_elsewhere: HashMap<(ServiceName, InstanceId), Instant>,
}

impl Discovered {
    /// Whether the wanted container `key` was removed by another replica for a reason of the
    /// engine's since this replica last saw it start, lately enough to wait for this
    /// replica's own event instead of writing it again.
    fn stopped_elsewhere(&self, key: &(ServiceName, InstanceId)) -> bool {
        self.stopped_elsewhere.get(key).is_some_and(|at| {
            at.elapsed() < STOPPED_ELSEWHERE && self.since.get(key).is_none_or(|s| s <= at)
        })
    }
}

/// How long a container another replica removed as stopped is left alone by this one, while
/// its own engine still lists it as running: its own stop event comes within this.
const STOPPED_ELSEWHERE: Duration = Duration::from_secs(10);

impl Replica {
    fn discovered(&self) -> std::sync::MutexGuard<'_, Discovered> {
        self.docker
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// This replica's lease, granted now if it has none.
    async fn own_lease(&self) -> Result<i64, EtcdError> {
        let mut lease = self.lease.lock().await;
        if let Some(id) = *lease {
            return Ok(id);
        }
        let id = self
            .etcd
            .grant(lease_seconds(REPLICA_LEASE.as_millis() as u64))
            .await?;
        tracing::info!(
            lease = format_args!("{id:x}"),
            "granted this replica's lease"
        );
        *lease = Some(id);
        self.renewed(id);
        Ok(id)
    }

    /// Notes that etcd confirmed the session `lease` (0: it ran out) just now.
    fn renewed(&self, lease: i64) {
        let mut s = self.session.lock().unwrap_or_else(|p| p.into_inner());
        *s = (lease, (lease != 0).then(Instant::now));
    }

    /// The session lease (0: none).
    fn session_lease(&self) -> i64 {
        self.session.lock().unwrap_or_else(|p| p.into_inner()).0
    }

    /// The session lease if etcd confirmed it within the last half of [`REPLICA_LEASE`]:
    /// only then may a heartbeat be answered without writing to etcd, since the instances
    /// bound to it are sure to outlive the heartbeat's answer. `None`: no session yet; an
    /// error when etcd has not confirmed it lately.
    fn fresh_session(&self) -> Result<Option<i64>, EtcdError> {
        let (lease, at) = *self.session.lock().unwrap_or_else(|p| p.into_inner());
        match at {
            None => Ok(None),
            Some(at) if at.elapsed() <= REPLICA_LEASE / 2 => Ok(Some(lease)),
            Some(at) => Err(EtcdError::SessionStale(at.elapsed())),
        }
    }

    /// Notes whether the mirror follows etcd (`Ok`), or why not.
    fn set_following(&self, state: Result<(), String>) {
        self.following.send_modify(|f| *f = state);
    }

    /// Waits until the mirror has applied `revision`, for [`REQUEST_TIMEOUT`] at most; a
    /// change committed but not applied by then is answered with an error (503), never as
    /// done.
    async fn applied(&self, revision: i64) -> Result<(), EtcdError> {
        if self.caught_up(revision).await {
            return Ok(());
        }
        tracing::warn!(
            revision,
            "the mirror has not applied a committed change in time; answering 503"
        );
        Err(EtcdError::NotApplied(REQUEST_TIMEOUT))
    }

    /// Waits until the mirror has applied `revision`, for [`REQUEST_TIMEOUT`] at most;
    /// whether it has.
    async fn caught_up(&self, revision: i64) -> bool {
        let revision = u64::try_from(revision).unwrap_or_default();
        let mut rx = self.applied.subscribe();
        let waited = tokio::time::timeout(REQUEST_TIMEOUT, rx.wait_for(|a| *a >= revision)).await;
        matches!(waited, Ok(Ok(_)))
    }
}

/// Whether etcd refused a write because its lease ran out.
fn lease_gone(e: &EtcdError) -> bool {
    matches!(e, EtcdError::LeaseNotFound)
}

impl Registry {
    /// A replica's registry: its table a mirror of the one in etcd, which
    /// [`Registry::run_replica`] keeps up to date.
    pub fn with_etcd(
        etcd: Etcd,
        metrics: std::sync::Arc<Metrics>,
        event_capacity: usize,
        quotas: Quotas,
    ) -> Registry {
        let replica = Replica {
            etcd,
            applied: watch::Sender::new(0),
            following: watch::Sender::new(Err("no snapshot read yet".into())),
            lease: tokio::sync::Mutex::new(None),
            session: std::sync::Mutex::new((0, None)),
            docker: std::sync::Mutex::new(Discovered::default()),
            kick: Notify::new(),
        };
        Registry::with_store(
            Box::new(MemoryStore::default()),
            None,
            Some(replica),
            metrics,
            event_capacity,
            quotas,
        )
    }

    /// Whether the table lives in etcd.
    pub fn is_replica(&self) -> bool {
        self.inner.replica.is_some()
    }

    /// Whether this replica's mirror follows etcd (`Ok`), or why not; `None` in memory mode.
    pub fn following(&self) -> Option<Result<(), String>> {
        self.inner
            .replica
            .as_ref()
            .map(|r| r.following.borrow().clone())
    }

    /// The etcd revision this replica's mirror has applied; `None` in memory mode.
    pub fn applied_revision(&self) -> Option<u64> {
        self.inner.replica.as_ref().map(|r| *r.applied.borrow())
    }

    /// Registers or renews `service`/`id` from the API, answering once the change is stored:
    /// at once in memory, after etcd's commit (and this replica's mirror) with etcd. The
    /// instance answered is marked `up` or `draining` by its service's drains, on both stores.
    pub async fn register(
        &self,
        service: &ServiceName,
        id: &InstanceId,
        spec: ValidSpec,
    ) -> Result<Instance, WriteError> {
        let Some(replica) = &self.inner.replica else {
            return Ok(self.upsert(service, id, spec, Source::Registrar)?);
        };
        let mut instance = instance_of(service, id, spec, Source::Registrar);
        let key = (service.clone(), id.clone());
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
        let session = match replica.session_lease() {
            0 => replica.own_lease().await?,
            lease => lease,
        };
        if let (Some(old), Some(lease)) = (&existing, owner) {
            if lease == session && same_but_last_seen(old, &instance) {
                // Only a session etcd confirmed lately vouches for the instance.
                replica.fresh_session()?;
                // This replica keeps it alive: a local deadline, nothing written to etcd.
                self.inner.metrics.heartbeats.inc();
                tracing::trace!("heartbeat from {service}/{id}");
                let mut t = self.lock();
                if t.owners.get(&key) == Some(&session) {
                    let before = t.next_deadline();
                    let deadline = Instant::now() + Duration::from_millis(instance.ttl_ms);
                    t.lease(service, id, Some(deadline));
                    t.store.renew(service, id, instance.last_seen);
                    self.rearm(before, t.next_deadline());
                    let mut instance = instance;
                    instance.mark(t.store.maintenance(service));
                    return Ok(instance);
                }
            }
        }
        if existing.is_some() {
            self.inner.metrics.heartbeats.inc();
        }
        // New, changed, or bound to another replica's session (its registrar moved here): one
        // conditional put binds it to this one's, if etcd still holds what the mirror saw.
        let mut expected = existing.as_ref().and(owner);
        for _ in 0..2 {
            match replica
                .etcd
                .put_instance_if(&instance, session, expected)
                .await
            {
                Ok(Put::Written(revision)) => {
                    replica.applied(revision).await?;
                    instance.mark(self.lock().store.maintenance(service));
                    return Ok(instance);
                }
                Ok(Put::Held(holder)) => {
                    tracing::debug!(
                        %service, %id, holder = format_args!("{holder:x}"),
                        "the instance changed in etcd since the mirror saw it; writing again"
                    );
                    expected = (holder != 0).then_some(holder);
                }
                Err(e) if lease_gone(&e) => {
                    *replica.lease.lock().await = None;
                    replica.renewed(0);
                    return Err(e.into());
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(EtcdError::Contended.into())
    }

    /// Deregisters `service`/`id` from the API, answering once the change is stored; `None`
    /// when it was not registered. An instance Docker discovered is not the API's to remove.
    pub async fn unregister(
        &self,
        service: &ServiceName,
        id: &InstanceId,
    ) -> Result<Option<Instance>, WriteError> {
        let Some(replica) = &self.inner.replica else {
            return Ok(self.deregister(service, id)?);
        };
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
        let removal = Removal {
            service: service.clone(),
            id: id.clone(),
            cause: RemoveCause::Deregistered,
        };
        let lease = replica.own_lease().await?;
        let (revision, deleted) = match replica
            .etcd
            .remove_instances(std::slice::from_ref(&removal), lease)
            .await
        {
            Err(e) if lease_gone(&e) => {
                *replica.lease.lock().await = None;
                let lease = replica.own_lease().await?;
                replica.etcd.remove_instances(&[removal], lease).await?
            }
            other => other?,
        };
        if deleted == 0 {
            return Ok(None);
        }
        replica.applied(revision).await?;
        Ok(Some(existing))
    }

    /// [`Registry::set_route`] with etcd: the route is a key, its record naming the call
    /// that set or cleared it (`origin`), committed before this returns.
    pub(super) async fn set_route_through_etcd(
        &self,
        replica: &Replica,
        service: &ServiceName,
        route: Option<Route>,
        origin: Option<String>,
    ) -> Result<Option<RouteResponse>, RouteError> {
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
        let record = RouteRecord {
            route,
            origin,
            at: unix_millis(),
        };
        // The record of a cleared route is bound to this replica's lease: it carries the
        // clearing to the other replicas, and then goes.
        let lease = match record.route {
            Some(_) => None,
            None => Some(replica.own_lease().await?),
        };
        let revision = match replica.etcd.set_route(service, &record, lease).await {
            Err(e) if lease_gone(&e) => {
                *replica.lease.lock().await = None;
                let lease = Some(replica.own_lease().await?);
                replica.etcd.set_route(service, &record, lease).await?
            }
            other => other?,
        };
        replica.applied(revision).await?;
        Ok(Some(RouteResponse {
            index: u64::try_from(revision).unwrap_or_default(),
            service: service.clone(),
            route: record.route,
        }))
    }

    /// Writes `service`'s drains `next`, changed by `action`, if the key is still at `seen`
    /// (the revision this replica's mirror last saw it written at); answers once etcd has
    /// committed it and the mirror has applied it, with the index of the change. `None` when
    /// another replica wrote the service's drains first: the mirror then has them, and the
    /// caller decides again.
    pub(super) async fn write_drains_through_etcd(
        &self,
        replica: &Replica,
        service: &ServiceName,
        next: Maintenance,
        action: MaintenanceAction,
        seen: i64,
    ) -> Result<Option<u64>, DrainError> {
        let record = DrainRecord {
            maintenance: next,
            action,
            at: unix_millis(),
        };
        // The record of an undrain that left no drain is bound to this replica's lease: it
        // carries the undrain to the other replicas, and then goes.
        let lease = if record.maintenance.is_empty() {
            Some(replica.own_lease().await?)
        } else {
            None
        };
        let swap = match replica
            .etcd
            .set_maintenance(service, &record, seen, lease)
            .await
        {
            Err(e) if lease_gone(&e) => {
                *replica.lease.lock().await = None;
                let lease = Some(replica.own_lease().await?);
                replica
                    .etcd
                    .set_maintenance(service, &record, seen, lease)
                    .await?
            }
            other => other?,
        };
        match swap {
            Swap::Done(revision) => {
                replica.applied(revision).await?;
                Ok(Some(u64::try_from(revision).unwrap_or_default()))
            }
            Swap::Stale(revision) if replica.caught_up(revision).await => {
                tracing::debug!(%service, "another replica changed the drains first; deciding again");
                Ok(None)
            }
            // The mirror cannot show what changed: deciding again would decide the same.
            Swap::Stale(_) => Err(EtcdError::Timeout(REQUEST_TIMEOUT).into()),
        }
    }

    /// [`Registry::upsert`] with etcd. Docker's instances become wanted, and the reconciler
    /// writes them. A registrar's is refused: it is written by [`Registry::register`], which
    /// answers once etcd has committed it and the mirror has applied it.
    pub(super) fn upsert_through_etcd(
        &self,
        service: &ServiceName,
        id: &InstanceId,
        spec: ValidSpec,
        source: Source,
    ) -> Result<Instance, Refused> {
        let replica = self.inner.replica.as_ref().expect("called in etcd mode");
        let instance = instance_of(service, id, spec, source);
        {
            let t = self.lock();
            check_takeover(&t, service, id, source)?;
            t.admit(&self.inner.quotas, service, id)
                .inspect_err(|e| self.refused(e))?;
        }
        match source {
            Source::Docker => {
                let key = (service.clone(), id.clone());
                let mut d = replica.discovered();
                d.dropped.remove(&key);
                if !d.wanted.contains_key(&key) {
                    d.since.insert(key.clone(), Instant::now());
                }
                d.wanted.insert(key, instance.clone());
                drop(d);
                replica.kick.notify_one();
            }
            Source::Registrar => return Err(Refused::NotStored),
        }
        Ok(instance)
    }

    /// [`Registry::deregister`] with etcd: refused, as it must be written by
    /// [`Registry::unregister`], which answers once etcd has committed it.
    pub(super) fn deregister_through_etcd(
        &self,
        service: &ServiceName,
        id: &InstanceId,
    ) -> Result<Option<Instance>, Refused> {
        match self.lock().store.instance(service, id) {
            Some(i) if i.source == Source::Docker => Err(Conflict {
                service: service.clone(),
                id: id.clone(),
            }
            .into()),
            _ => Err(Refused::NotStored),
        }
    }

    /// [`Registry::remove`] with etcd: Docker discovery drops a container; the reconciler
    /// deletes its key with `cause`.
    pub(super) fn remove_through_etcd(
        &self,
        service: &ServiceName,
        id: &InstanceId,
        cause: RemoveCause,
    ) -> bool {
        let replica = self.inner.replica.as_ref().expect("called in etcd mode");
        let key = (service.clone(), id.clone());
        let mut d = replica.discovered();
        let was = d.wanted.remove(&key).is_some();
        d.since.remove(&key);
        d.dropped.insert(key, cause);
        drop(d);
        replica.kick.notify_one();
        was
    }

    /// [`Registry::sync_source`] with etcd: Docker's wanted instances become exactly these.
    pub(super) fn sync_source_through_etcd(
        &self,
        source: Source,
        desired: BTreeMap<(ServiceName, InstanceId), ValidSpec>,
    ) {
        let replica = self.inner.replica.as_ref().expect("called in etcd mode");
        if source != Source::Docker {
            tracing::error!(%source, "only Docker's instances are synced");
            return;
        }
        let mut d = replica.discovered();
        let wanted: BTreeMap<_, _> = desired
            .into_iter()
            .map(|((service, id), spec)| {
                let instance = instance_of(&service, &id, spec, source);
                ((service, id), instance)
            })
            .collect();
        let gone: Vec<_> = d
            .wanted
            .keys()
            .filter(|k| !wanted.contains_key(*k))
            .cloned()
            .collect();
        for key in gone {
            d.since.remove(&key);
            d.dropped.insert(key, RemoveCause::DockerResync);
        }
        let now = Instant::now();
        for key in wanted.keys() {
            d.dropped.remove(key);
            if !d.wanted.contains_key(key) {
                d.since.insert(key.clone(), now);
            }
        }
        d.wanted = wanted;
        drop(d);
        replica.kick.notify_one();
    }

    /// Expires the instances bound to this replica's session whose TTL deadline is at or
    /// before `now`: each key is deleted if it is still bound to the session, with no cause,
    /// so every replica publishes the removal as `expired`. One that could not be deleted
    /// (etcd away) is tried again a second later; the session's own end removes it otherwise.
    /// While the session is stale (heartbeats are refused), the due instances get their TTL
    /// again instead.
    pub(super) async fn expire_through_etcd(&self, now: Instant) {
        let replica = self.inner.replica.as_ref().expect("called in etcd mode");
        let session = replica.session_lease();
        let due: Vec<(ServiceName, InstanceId)> = {
            let mut t = self.lock();
            let mut due = Vec::new();
            while let Some((deadline, service, id)) = t.deadlines.first().cloned() {
                if deadline > now {
                    break;
                }
                t.lease(&service, &id, None);
                if t.owners.get(&(service.clone(), id.clone())) == Some(&session) {
                    due.push((service, id));
                }
            }
            due
        };
        if replica.fresh_session().is_err() {
            // Cut off from etcd: the heartbeats of these instances may have been refused, and
            // no lease runs out without a leader either. Each gets its TTL again, as etcd gives
            // every lease its TTL again when a new leader is elected.
            let mut t = self.lock();
            let before = t.next_deadline();
            for (service, id) in due {
                let Some(ttl) = t.store.instance(&service, &id).map(|i| i.ttl_ms) else {
                    continue;
                };
                t.lease(
                    &service,
                    &id,
                    Some(now + Duration::from_millis(ttl.max(1000))),
                );
            }
            self.rearm(before, t.next_deadline());
            return;
        }
        if due.is_empty() {
            return;
        }
        let last = match replica.etcd.expire_instances(&due, session).await {
            // An instance not deleted was renewed through another replica meanwhile, or is
            // already gone.
            Ok((revision, _)) => revision,
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
                return;
            }
        };
        if last > 0 {
            let _ = replica.caught_up(last).await;
        }
    }

    /// Keeps this replica's mirror, its own lease and its Docker instances in step with etcd,
    /// until `shutdown` is cancelled; then deletes its Docker instances, so they leave at once
    /// rather than after [`REPLICA_LEASE`], and revokes its lease unless registrars'
    /// instances are bound to it (they move with their registrars). Nothing in memory mode.
    pub async fn run_replica(self, shutdown: CancellationToken) {
        let Some(replica) = &self.inner.replica else {
            return;
        };
        tokio::join!(
            self.follow(shutdown.clone()),
            self.keep_lease(shutdown.clone()),
            self.reconcile_docker(shutdown.clone()),
        );
        let Some(lease) = *replica.lease.lock().await else {
            return;
        };
        // Registrars' instances bound to the session stay: their registrars move to another
        // replica, which takes them over with one write each, or they go with the session.
        // This replica's containers go now.
        let (docker, registrars): (Vec<Removal>, usize) = {
            let t = self.lock();
            let mut docker = Vec::new();
            let mut registrars = 0;
            for (key, owner) in &t.owners {
                if *owner != lease {
                    continue;
                }
                match t.store.instance(&key.0, &key.1).map(|i| i.source) {
                    Some(Source::Docker) => docker.push(Removal {
                        service: key.0.clone(),
                        id: key.1.clone(),
                        cause: RemoveCause::Expired,
                    }),
                    Some(Source::Registrar) => registrars += 1,
                    None => {}
                }
            }
            (docker, registrars)
        };
        if !docker.is_empty() {
            if let Err(e) = replica.etcd.remove_instances(&docker, lease).await {
                tracing::warn!(cause = %e, "could not remove this replica's containers");
            }
        }
        if registrars == 0 {
            if let Err(e) = replica.etcd.revoke(lease).await {
                tracing::warn!(cause = %e, "could not revoke this replica's lease");
            }
        } else {
            tracing::info!(
                "leaving {registrars} registrar instance(s) on this replica's lease: their \
                 registrars move to another replica, or they go with the lease"
            );
        }
    }

    /// Waits until the mirror holds a first snapshot and follows etcd from it, or `limit`
    /// passes.
    pub async fn first_snapshot(&self, limit: Duration) {
        if let Some(replica) = &self.inner.replica {
            let mut rx = replica.following.subscribe();
            let _ = tokio::time::timeout(limit, rx.wait_for(|f| f.is_ok())).await;
        }
    }

    /// The mirror: a snapshot, then etcd's watch from its revision; again after every break
    /// (a compacted revision included: the new snapshot is read at the newest revision).
    /// Says whether it follows etcd ([`Registry::following`]) as it goes.
    async fn follow(&self, shutdown: CancellationToken) {
        let replica = self.inner.replica.as_ref().expect("called in etcd mode");
        let mut pause = Duration::from_millis(100);
        let mut warned = false;
        loop {
            let snapshot = tokio::select! {
                _ = shutdown.cancelled() => return,
                s = replica.etcd.snapshot() => s,
            };
            let watched = match snapshot {
                Ok(snapshot) => {
                    let revision = snapshot.revision;
                    self.resync(snapshot);
                    replica.etcd.watch(revision).await
                }
                Err(e) => Err(e),
            };
            let stream = match watched {
                Ok(s) => s,
                Err(e) => {
                    replica.set_following(Err(baker_client::errors::chain(&e)));
                    if !warned {
                        tracing::warn!(cause = %e, "cannot follow etcd; serving the last view");
                        warned = true;
                    }
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(pause) => {}
                    }
                    pause = (pause * 2).min(Duration::from_secs(1));
                    continue;
                }
            };
            if warned {
                tracing::info!("following etcd again");
                warned = false;
            }
            replica.set_following(Ok(()));
            pause = Duration::from_millis(100);
            let mut stream = std::pin::pin!(stream);
            loop {
                let item = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    item = stream.next() => item,
                };
                match item {
                    Some(Ok((revision, change))) => self.apply_mirrored(revision, change),
                    Some(Err(e @ EtcdError::Compacted(_))) => {
                        tracing::warn!(
                            cause = %e,
                            "etcd compacted past this replica's revision; reading a new snapshot"
                        );
                        replica.set_following(Err(baker_client::errors::chain(&e)));
                        break;
                    }
                    Some(Err(e)) => {
                        tracing::warn!(cause = %e, "etcd's watch broke; reading a new snapshot");
                        replica.set_following(Err(baker_client::errors::chain(&e)));
                        break;
                    }
                    None => {
                        replica.set_following(Err("etcd's watch ended".into()));
                        break;
                    }
                }
            }
        }
    }

    /// Applies one change read from etcd at `revision`, publishing it with that revision.
    fn apply_mirrored(&self, revision: i64, change: Change) {
        let replica = self.inner.replica.as_ref().expect("called in etcd mode");
        let rev = u64::try_from(revision).unwrap_or_default();
        let mut kick = false;
        {
            let mut t = self.lock();
            match change {
                Change::Instance { instance, lease } => {
                    self.mirror_put(&mut t, rev, instance, lease)
                }
                Change::InstanceGone { service, id } => {
                    let cause = match &t.causes {
                        (r, causes) if *r == rev => {
                            causes.get(&(service.clone(), id.clone())).copied()
                        }
                        _ => None,
                    };
                    kick =
                        self.mirror_take(&mut t, rev, &service, &id, cause) == Some(Source::Docker);
                }
                Change::Route { service, record } => {
                    self.mirror_route(&mut t, rev, &service, record)
                }
                Change::RouteCleared { service } => {
                    self.mirror_route(&mut t, rev, &service, route_cleared())
                }
                Change::Maintenance { service, record } => {
                    t.drain_revisions.insert(service.clone(), revision);
                    self.mirror_drains(&mut t, rev, &service, record);
                }
                Change::MaintenanceCleared { service } => {
                    t.drain_revisions.remove(&service);
                    if let Some(record) = cleared(&t, &service) {
                        self.mirror_drains(&mut t, rev, &service, record);
                    }
                }
                Change::Causes(removals) => {
                    t.causes = (
                        rev,
                        removals
                            .into_iter()
                            .map(|r| ((r.service, r.id), r.cause))
                            .collect(),
                    );
                }
            }
        }
        replica.applied.send_if_modified(|a| {
            let newer = rev > *a;
            if newer {
                *a = rev;
            }
            newer
        });
        if kick {
            // Another replica's container may have lost its owner: this one may take it.
            replica.kick.notify_one();
        }
    }

    fn mirror_put(&self, t: &mut Table, rev: u64, mut instance: Instance, lease: i64) {
        let key = (instance.service.clone(), instance.id.clone());
        t.owners.insert(key.clone(), lease);
        let before = t.store.revision();
        t.store.set_revision(rev.saturating_sub(1));
        let now = Instant::now();
        let (ttl, source) = (instance.ttl_ms, instance.source);
        let (outcome, revision) = t.put(&mut instance, now);
        // An instance bound to this replica's session expires here, by its TTL; one bound to
        // another's expires there (or with that session).
        let session = self.inner.replica.as_ref().map(|r| r.session_lease());
        if source == Source::Registrar && session == Some(lease) {
            let before = t.next_deadline();
            let deadline = now + Duration::from_millis(ttl);
            t.lease(&key.0, &key.1, Some(deadline));
            self.rearm(before, t.next_deadline());
        }
        if outcome == Outcome::Renewed {
            t.store.set_revision(before);
        } else {
            self.publish_upsert(t, outcome, revision, instance);
        }
    }

    /// Removes an instance etcd deleted at `rev`; `cause` is `None` when its lease ran out.
    /// Returns its source, if it was in the table.
    fn mirror_take(
        &self,
        t: &mut Table,
        rev: u64,
        service: &ServiceName,
        id: &InstanceId,
        cause: Option<RemoveCause>,
    ) -> Option<Source> {
        let owner = t.owners.remove(&(service.clone(), id.clone()));
        let before = t.store.revision();
        t.store.set_revision(rev.saturating_sub(1));
        let Some((revision, instance)) = t.take(service, id) else {
            t.store.set_revision(before);
            return None;
        };
        let source = instance.source;
        let replica = self.inner.replica.as_ref().expect("called in etcd mode");
        // Another replica's container, gone for a reason of its engine (not as `expired`:
        // its lease ran out, or its replica stopped and handed it over, when this replica is
        // to take it over): if this engine runs it too, its stop event here is on its way.
        if source == Source::Docker
            && cause.is_some_and(|c| c != RemoveCause::Expired)
            && owner.is_some_and(|o| o != replica.session_lease())
        {
            let mut d = replica.discovered();
            let now = Instant::now();
            d.stopped_elsewhere
                .retain(|_, at| now.duration_since(*at) < STOPPED_ELSEWHERE);
            d.stopped_elsewhere
                .insert((service.clone(), id.clone()), now);
        }
        let cause = cause.unwrap_or_else(|| {
            self.inner.metrics.expiries.inc();
            tracing::info!(
                "expired {service}/{id}: its lease of {} ms ran out",
                instance.ttl_ms
            );
            RemoveCause::Expired
        });
        if cause != RemoveCause::Expired {
            tracing::info!("deregistered {service}/{id} ({source}, {})", cause.as_str());
        }
        self.inner
            .metrics
            .deregistrations
            .get_or_create(&source.into())
            .inc();
        self.publish_remove(t, revision, instance, cause);
        Some(source)
    }

    /// Applies `service`'s route as etcd holds it at `rev`, with the origin and time its
    /// record gives, publishing it if it differs from the mirror's.
    fn mirror_route(&self, t: &mut Table, rev: u64, service: &ServiceName, record: RouteRecord) {
        if t.store.route(service) == record.route.as_ref() {
            return;
        }
        t.store.set_revision(rev.saturating_sub(1));
        let at = if record.at > 0 {
            record.at
        } else {
            unix_millis()
        };
        self.apply_route(t, service, record.route, record.origin, at);
    }

    /// Applies `service`'s drains as etcd holds them at `rev`, publishing them if they differ
    /// from the mirror's.
    fn mirror_drains(&self, t: &mut Table, rev: u64, service: &ServiceName, record: DrainRecord) {
        let held = t.store.maintenance(service).cloned().unwrap_or_default();
        if held == record.maintenance {
            return;
        }
        t.store.set_revision(rev.saturating_sub(1));
        self.apply_drains(t, service, record.maintenance, record.action, record.at);
    }

    /// Makes the mirror what `snapshot` says, publishing only what differs, at its revision.
    fn resync(&self, snapshot: Snapshot) {
        let replica = self.inner.replica.as_ref().expect("called in etcd mode");
        let rev = u64::try_from(snapshot.revision).unwrap_or_default();
        {
            let mut t = self.lock();
            let mut now: HashMap<(ServiceName, InstanceId), (Instance, i64)> = snapshot
                .instances
                .into_iter()
                .map(|(i, lease)| ((i.service.clone(), i.id.clone()), (i, lease)))
                .collect();
            // A removal whose cause etcd still holds, made after the mirror's last change, was
            // made while this replica was not watching: it goes out with its own cause.
            let seen = i64::try_from(t.store.revision()).unwrap_or(i64::MAX);
            let held: Vec<(ServiceName, InstanceId, Source)> = t
                .store
                .services(None)
                .into_values()
                .flatten()
                .map(|i| (i.service, i.id, i.source))
                .collect();
            for (service, id, source) in held {
                let key = (service.clone(), id.clone());
                if !now.contains_key(&key) {
                    let told = snapshot
                        .causes
                        .get(&key)
                        .filter(|(_, at)| *at > seen)
                        .map(|(cause, _)| *cause);
                    let cause = told.or(match source {
                        Source::Docker => Some(RemoveCause::DockerResync),
                        // No cause: its lease ran out.
                        Source::Registrar => None,
                    });
                    self.mirror_take(&mut t, rev, &service, &id, cause);
                }
            }
            for (_, (instance, lease)) in now.drain() {
                self.mirror_put(&mut t, rev, instance, lease);
            }
            for (service, _) in t.store.routes() {
                if !snapshot.routes.contains_key(&service) {
                    self.mirror_route(&mut t, rev, &service, route_cleared());
                }
            }
            for (service, record) in snapshot.routes {
                self.mirror_route(&mut t, rev, &service, record);
            }
            t.drain_revisions = snapshot
                .maintenance
                .iter()
                .map(|(service, (_, written))| (service.clone(), *written))
                .collect();
            for service in t.store.all_maintenance().into_keys() {
                if !snapshot.maintenance.contains_key(&service) {
                    if let Some(record) = cleared(&t, &service) {
                        self.mirror_drains(&mut t, rev, &service, record);
                    }
                }
            }
            for (service, (record, _)) in snapshot.maintenance {
                self.mirror_drains(&mut t, rev, &service, record);
            }
            if t.store.revision() < rev {
                t.store.set_revision(rev);
            }
        }
        replica.applied.send_if_modified(|a| {
            let newer = rev > *a;
            if newer {
                *a = rev;
            }
            newer
        });
        replica.kick.notify_one();
        tracing::info!(revision = rev, "mirror in step with etcd");
    }

    /// Renews this replica's lease a few times per TTL; a lease that ran out (the replica was
    /// cut off from etcd for longer) is replaced, and the reconciler writes the Docker
    /// instances again on the new one.
    async fn keep_lease(&self, shutdown: CancellationToken) {
        let replica = self.inner.replica.as_ref().expect("called in etcd mode");
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(REPLICA_LEASE / 4) => {}
            }
            let Some(lease) = *replica.lease.lock().await else {
                continue;
            };
            match replica.etcd.keep_alive(lease).await {
                Ok(true) => replica.renewed(lease),
                Ok(false) => {
                    tracing::warn!("this replica's lease ran out; taking a new one");
                    *replica.lease.lock().await = None;
                    replica.renewed(0);
                    replica.kick.notify_one();
                }
                Err(e) => tracing::warn!(cause = %e, "could not renew this replica's lease"),
            }
        }
    }

    /// Writes the Docker instances this replica wants and deletes those it dropped, whenever
    /// discovery or the mirror changes, and every few seconds.
    async fn reconcile_docker(&self, shutdown: CancellationToken) {
        let replica = self.inner.replica.as_ref().expect("called in etcd mode");
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = replica.kick.notified() => {}
                _ = tokio::time::sleep(RECONCILE_EVERY) => {}
            }
            let wanted_any = {
                let d = replica.discovered();
                !d.wanted.is_empty() || !d.dropped.is_empty()
            };
            if !wanted_any && self.lock().owners.is_empty() {
                continue;
            }
            if let Err(e) = self.reconcile_once(replica).await {
                tracing::warn!(cause = %e, "could not write Docker's instances to etcd");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    }

    async fn reconcile_once(&self, replica: &Replica) -> Result<(), EtcdError> {
        let lease = replica.own_lease().await?;
        let (puts, removals) = {
            let t = self.lock();
            let mut d = replica.discovered();
            // Each with the lease its key is bound to as the mirror knows it (`None`: absent).
            let puts: Vec<(Instance, Option<i64>)> = d
                .wanted
                .iter()
                .filter_map(|(key, want)| {
                    let owner = t.owners.get(key).copied();
                    let put = match t.store.instance(&key.0, &key.1) {
                        None => !d.stopped_elsewhere(key),
                        // Another replica's container: its lease says when it goes.
                        Some(i) if i.source == Source::Docker && owner != Some(lease) => false,
                        Some(i) => owner != Some(lease) || !same_but_last_seen(i, want),
                    };
                    let stored = t.store.instance(&key.0, &key.1);
                    let expected = stored.and(owner);
                    put.then(|| {
                        let mut want = want.clone();
                        joined_as(&mut want, stored);
                        (want, expected)
                    })
                })
                .collect();
            let mut removals: Vec<Removal> = Vec::new();
            for (key, owner) in &t.owners {
                if *owner != lease || d.wanted.contains_key(key) {
                    continue;
                }
                let Some(i) = t.store.instance(&key.0, &key.1) else {
                    continue;
                };
                if i.source == Source::Docker {
                    removals.push(Removal {
                        service: key.0.clone(),
                        id: key.1.clone(),
                        cause: d
                            .dropped
                            .get(key)
                            .copied()
                            .unwrap_or(RemoveCause::DockerResync),
                    });
                }
            }
            d.dropped.retain(|key, _| t.owners.get(key) == Some(&lease));
            (puts, removals)
        };
        let mut last = 0;
        for (instance, expected) in &puts {
            match replica
                .etcd
                .put_instance_if(instance, lease, *expected)
                .await
            {
                Ok(Put::Written(revision)) => last = last.max(revision),
                // Another replica wrote it first: the mirror learns whose it is from the
                // watch, and this replica leaves it alone from then on.
                Ok(Put::Held(holder)) => tracing::debug!(
                    service = %instance.service,
                    id = %instance.id,
                    holder = format_args!("{holder:x}"),
                    "another replica holds a container this engine runs"
                ),
                Err(e) if lease_gone(&e) => {
                    *replica.lease.lock().await = None;
                    return Err(e);
                }
                Err(e) => return Err(e),
            }
        }
        if !removals.is_empty() {
            let (revision, _) = replica.etcd.remove_instances(&removals, lease).await?;
            last = last.max(revision);
        }
        if last > 0 {
            replica.applied(last).await?;
        }
        Ok(())
    }
}

/// The record of a route whose key is gone from etcd without a record of its clearing (its
/// clearing record ran out while this replica was not watching, or it was deleted by hand):
/// cleared by the store itself.
fn route_cleared() -> RouteRecord {
    RouteRecord {
        route: None,
        origin: Some("etcd".into()),
        at: unix_millis(),
    }
}

/// The record of `service`'s drains when its key is gone from etcd with drains still in the
/// mirror (deleted by hand, say): none left, lifted by the store itself. `None` when the
/// mirror holds none.
fn cleared(t: &Table, service: &ServiceName) -> Option<DrainRecord> {
    let held = t.store.maintenance(service)?;
    let first = held.entries(service).into_iter().next()?;
    Some(DrainRecord {
        maintenance: Maintenance::default(),
        action: MaintenanceAction {
            drained: false,
            target: first.target()?,
            reason: first.reason,
            origin: "etcd".into(),
        },
        at: unix_millis(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::etcd::StoreUrl;
    use crate::feed::Receiver;
    use baker_client::change::Change as Published;

    /// A mirror fed by hand: no member answers at this address.
    async fn mirror() -> Registry {
        let url: StoreUrl = "etcd://127.0.0.1:9".parse().unwrap();
        let etcd = Etcd::connect(&url)
            .await
            .expect("connecting waits for no member");
        Registry::with_etcd(
            etcd,
            std::sync::Arc::new(Metrics::new()),
            64,
            Quotas::default(),
        )
    }

    fn spec() -> ValidSpec {
        ValidSpec {
            address: "10.0.0.1".parse().unwrap(),
            port: 8080,
            version: "1".parse().unwrap(),
            weight: 100,
            tags: vec![],
            ttl_ms: 6000,
            node: None,
        }
    }

    fn instance(id: &str) -> Instance {
        let spec = spec();
        instance_of(
            &"web".parse().unwrap(),
            &id.parse().unwrap(),
            spec,
            Source::Registrar,
        )
    }

    /// (id, cause) of each removal published.
    fn removals(rx: &mut Receiver) -> Vec<(String, RemoveCause)> {
        let mut out = Vec::new();
        while let Some(p) = rx.try_recv() {
            if let Published::Remove {
                cause, instance, ..
            } = &p.change
            {
                out.push((instance.id.to_string(), *cause));
            }
        }
        out
    }

    #[tokio::test]
    async fn a_resync_gives_removals_made_during_the_gap_the_cause_etcd_still_holds() {
        let r = mirror().await;
        for (rev, id) in [(5, "a"), (6, "b"), (7, "c")] {
            r.apply_mirrored(
                rev,
                Change::Instance {
                    instance: instance(id),
                    lease: 1,
                },
            );
        }
        let mut sub = r.subscribe(None, false);
        // The watch broke at revision 7. Meanwhile a was deregistered (its cause still in
        // etcd), b's lease ran out, and c was deregistered before the mirror's last change
        // (an old cause naming it again is not this removal's).
        let mut snapshot = Snapshot {
            revision: 12,
            ..Snapshot::default()
        };
        let key = |id: &str| ("web".parse().unwrap(), id.parse().unwrap());
        snapshot
            .causes
            .insert(key("a"), (RemoveCause::Deregistered, 10));
        snapshot
            .causes
            .insert(key("c"), (RemoveCause::Deregistered, 4));
        r.resync(snapshot);
        let mut got = removals(&mut sub.feed);
        got.sort_by(|x, y| x.0.cmp(&y.0));
        assert_eq!(
            got,
            [
                ("a".to_owned(), RemoveCause::Deregistered),
                ("b".to_owned(), RemoveCause::Expired),
                ("c".to_owned(), RemoveCause::Expired),
            ]
        );
    }

    #[test]
    fn a_container_stopped_elsewhere_waits_for_this_engines_event_unless_it_started_since() {
        let key: (ServiceName, InstanceId) = ("web".parse().unwrap(), "c1".parse().unwrap());
        let now = Instant::now();
        let mut d = Discovered::default();
        assert!(!d.stopped_elsewhere(&key), "nothing known: written");
        // Seen starting here, then removed by another replica as stopped: left alone.
        d.since.insert(key.clone(), now - Duration::from_secs(3));
        d.stopped_elsewhere
            .insert(key.clone(), now - Duration::from_secs(1));
        assert!(d.stopped_elsewhere(&key));
        // Started again here after that removal: written.
        d.since.insert(key.clone(), now);
        assert!(!d.stopped_elsewhere(&key));
        // The removal is older than the grace and this engine still lists it: written.
        d.since.insert(key.clone(), now - STOPPED_ELSEWHERE * 3);
        d.stopped_elsewhere
            .insert(key.clone(), now - STOPPED_ELSEWHERE * 2);
        assert!(!d.stopped_elsewhere(&key));
    }

    #[tokio::test]
    async fn a_heartbeat_that_changes_nothing_is_answered_by_the_replica_alone() {
        let r = mirror().await;
        let replica = r.inner.replica.as_ref().unwrap();
        let web: ServiceName = "web".parse().unwrap();
        let (a, b): (InstanceId, InstanceId) = ("a".parse().unwrap(), "b".parse().unwrap());
        replica.renewed(7);
        // `a` is bound to this replica's session: it expires here, by its TTL.
        r.apply_mirrored(
            5,
            Change::Instance {
                instance: instance("a"),
                lease: 7,
            },
        );
        // `b` is bound to another replica's: that one expires it.
        r.apply_mirrored(
            6,
            Change::Instance {
                instance: instance("b"),
                lease: 8,
            },
        );
        let deadline = r.next_deadline().expect("a has a deadline here");
        assert!(!r.lock().leases.contains_key(&(web.clone(), b)));
        tokio::time::sleep(Duration::from_millis(20)).await;
        // No member answers at this address: only an answer without etcd comes back at once.
        let answered =
            tokio::time::timeout(Duration::from_millis(500), r.register(&web, &a, spec()))
                .await
                .expect("answered without etcd")
                .unwrap();
        assert_eq!(answered.id, a);
        assert!(
            r.next_deadline().unwrap() > deadline,
            "the heartbeat moved a's deadline"
        );
        assert_eq!(*replica.applied.borrow(), 6, "nothing was written");
    }

    #[tokio::test]
    async fn a_replica_whose_session_is_stale_refuses_heartbeats() {
        let r = mirror().await;
        let replica = r.inner.replica.as_ref().unwrap();
        r.apply_mirrored(
            5,
            Change::Instance {
                instance: instance("a"),
                lease: 7,
            },
        );
        // etcd last confirmed the session more than half a lease ago.
        *replica.session.lock().unwrap() = (
            7,
            Some(Instant::now() - REPLICA_LEASE / 2 - Duration::from_millis(10)),
        );
        let web: ServiceName = "web".parse().unwrap();
        let a: InstanceId = "a".parse().unwrap();
        let refused = r.register(&web, &a, spec()).await.unwrap_err();
        assert!(
            matches!(refused, WriteError::Unavailable(EtcdError::SessionStale(_))),
            "{refused}"
        );
    }

    #[tokio::test]
    async fn a_registrars_change_is_never_answered_before_etcd_has_it() {
        let r = mirror().await;
        let (web, a) = ("web".parse().unwrap(), "a".parse().unwrap());
        // The calls that cannot wait for etcd refuse, rather than answer and write later.
        let refused = r.upsert(&web, &a, spec(), Source::Registrar).unwrap_err();
        assert!(matches!(refused, Refused::NotStored), "{refused}");
        let refused = r.deregister(&web, &a).unwrap_err();
        assert!(matches!(refused, Refused::NotStored), "{refused}");
        assert!(r.services().services.is_empty());
    }

    #[tokio::test]
    async fn a_mirrored_route_change_carries_the_origin_and_time_of_its_record() {
        let r = mirror().await;
        let mut sub = r.subscribe(None, false);
        let web: ServiceName = "web".parse().unwrap();
        let route: Route = [("1".parse().unwrap(), 100)].into();
        let set = RouteRecord {
            route: Some(route.clone()),
            origin: Some("cli:ops from 127.0.0.1".into()),
            at: 1_700_000_000_000,
        };
        r.apply_mirrored(
            5,
            Change::Route {
                service: web.clone(),
                record: set,
            },
        );
        let cleared = RouteRecord {
            route: None,
            origin: Some("cli:ops from 127.0.0.1".into()),
            at: 1_700_000_000_500,
        };
        r.apply_mirrored(
            6,
            Change::Route {
                service: web.clone(),
                record: cleared,
            },
        );
        // The cleared record's lease runs out: nothing more to publish.
        r.apply_mirrored(
            7,
            Change::RouteCleared {
                service: web.clone(),
            },
        );
        let mut got = Vec::new();
        while let Some(p) = sub.feed.try_recv() {
            if let Published::Route {
                index,
                at,
                route,
                origin,
                ..
            } = &p.change
            {
                got.push((*index, *at, route.is_some(), origin.clone()));
            }
        }
        let ops = Some("cli:ops from 127.0.0.1".to_owned());
        assert_eq!(
            got,
            [
                (5, 1_700_000_000_000, true, ops.clone()),
                (6, 1_700_000_000_500, false, ops)
            ]
        );
    }
}
