//! The etcd backend: a replica of a directory whose table lives in etcd
//! (`BAKER_STORE=etcd://...`).
//!
//! The registry's table is then a mirror: [`EtcdBackend::run`] reads the whole table at one
//! etcd revision, then follows etcd's watch from that revision, and gives each change to
//! [`Registry::apply`] with the revision etcd gave it, as the memory backend gives its own.
//! Every replica so publishes the same changes in the same order, and the watch stream's
//! `index` is the etcd revision. When the watch breaks (a member died, quorum lost, the
//! revision compacted), the replica reads a new snapshot once etcd answers again and applies
//! only what differs from its mirror; an instance removed meanwhile goes out with the cause
//! etcd still holds for its removal (each replica's last), else as `expired`.
//!
//! A commit is one transaction (chunked under `--max-txn-ops`), and answers once this
//! replica's mirror has applied it, so a client reads its own writes from the replica it
//! wrote to. A registrar's instance is a key bound to the session lease of the replica that
//! takes its heartbeats (the replica's own lease, [`REPLICA_LEASE`]); that replica keeps the
//! instance's TTL deadline itself, and a heartbeat that changes nothing writes nothing, while
//! etcd renewed the session within half its TTL (else it is answered 503, and the registrar
//! moves on). A put is conditional on the holder the mirror saw, which is how a registrar
//! that moved to another replica moves its instance with one write. An instance whose
//! deadline passes is deleted if still bound to this replica's session, with no cause: every
//! replica publishes it as `expired`; one whose replica died goes with that replica's session.
//! A deregistration deletes the key in a transaction that also writes why (see
//! [`crate::etcd`]); a route is a plain key, drains a key written if unchanged since read.
//!
//! Docker's containers are written by the registry's reconciler bound to the replica's own
//! lease, and it never touches a container bound to another replica's lease: two replicas
//! watching the same engine do not fight over its containers, and when one dies the other
//! takes them over once its lease has run out.

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use baker_client::change::{by, MaintenanceAction, RemoveCause};
use baker_client::maintenance::Maintenance;
use baker_client::model::{Instance, InstanceId, ServiceName, Source};
use futures_util::StreamExt;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::backend::{Backend, CommitError, Committed, Entry, Proposal};
use super::{unix_millis, Registry, Table};
use crate::etcd::{
    lease_seconds, Change, DrainRecord, Etcd, EtcdError, Put, Removal, RouteRecord, Snapshot, Swap,
    REQUEST_TIMEOUT,
};
use crate::metrics::Metrics;
use crate::quota::Quotas;
use crate::store::MemoryStore;

/// TTL of a replica's own lease, which its Docker instances and its removal causes are bound
/// to: a replica that dies takes its containers out of the table within this time.
pub const REPLICA_LEASE: Duration = Duration::from_secs(10);

/// Why the instances deleted at one revision went and who removed them, as that revision's
/// transaction said: a deletion with no cause is a lease that ran out.
type Causes = (
    u64,
    HashMap<(ServiceName, InstanceId), (RemoveCause, Option<String>)>,
);

/// The table in etcd; the registry's table its mirror.
pub(super) struct EtcdBackend {
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
}

impl EtcdBackend {
    fn new(etcd: Etcd) -> EtcdBackend {
        EtcdBackend {
            etcd,
            applied: watch::Sender::new(0),
            following: watch::Sender::new(Err("no snapshot read yet".into())),
            lease: tokio::sync::Mutex::new(None),
            session: std::sync::Mutex::new((0, None)),
        }
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

    /// Forgets a lease etcd no longer knows: the next write takes a new one.
    async fn lease_lost(&self) {
        *self.lease.lock().await = None;
        self.renewed(0);
    }

    /// Runs `write` bound to this replica's lease; once more with a new lease if etcd no
    /// longer knew it.
    async fn with_lease<T, F, Fut>(&self, write: F) -> Result<T, EtcdError>
    where
        F: Fn(i64) -> Fut,
        Fut: std::future::Future<Output = Result<T, EtcdError>>,
    {
        let lease = self.own_lease().await?;
        match write(lease).await {
            Err(EtcdError::LeaseNotFound) => {
                self.lease_lost().await;
                write(self.own_lease().await?).await
            }
            other => other,
        }
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

    /// Notes that the mirror has applied `revision`.
    fn advanced(&self, revision: u64) {
        self.applied.send_if_modified(|a| {
            let newer = revision > *a;
            if newer {
                *a = revision;
            }
            newer
        });
    }

    /// Waits until the mirror has applied `revision`, for [`REQUEST_TIMEOUT`] at most; a
    /// change committed but not applied by then is answered with an error (503), never as
    /// done.
    async fn applied(&self, revision: i64) -> Result<u64, EtcdError> {
        if self.caught_up(revision).await {
            return Ok(u64::try_from(revision).unwrap_or_default());
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

    /// The mirror: a snapshot, then etcd's watch from its revision; again after every break
    /// (a compacted revision included: the new snapshot is read at the newest revision).
    /// Says whether it follows etcd ([`Backend::following`]) as it goes.
    async fn follow(&self, registry: &Registry, shutdown: CancellationToken) {
        let mut pause = Duration::from_millis(100);
        let mut warned = false;
        loop {
            let snapshot = tokio::select! {
                _ = shutdown.cancelled() => return,
                s = self.etcd.snapshot() => s,
            };
            let watched = match snapshot {
                Ok(snapshot) => {
                    let revision = snapshot.revision;
                    self.resync(registry, snapshot);
                    self.etcd.watch(revision).await
                }
                Err(e) => Err(e),
            };
            let stream = match watched {
                Ok(s) => s,
                Err(e) => {
                    self.set_following(Err(baker_client::errors::chain(&e)));
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
            self.set_following(Ok(()));
            pause = Duration::from_millis(100);
            let mut causes: Causes = (0, HashMap::new());
            let mut stream = std::pin::pin!(stream);
            loop {
                let item = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    item = stream.next() => item,
                };
                match item {
                    Some(Ok((revision, change))) => {
                        self.apply_watched(registry, &mut causes, revision, change)
                    }
                    Some(Err(e @ EtcdError::Compacted(_))) => {
                        tracing::warn!(
                            cause = %e,
                            "etcd compacted past this replica's revision; reading a new snapshot"
                        );
                        self.set_following(Err(baker_client::errors::chain(&e)));
                        break;
                    }
                    Some(Err(e)) => {
                        tracing::warn!(cause = %e, "etcd's watch broke; reading a new snapshot");
                        self.set_following(Err(baker_client::errors::chain(&e)));
                        break;
                    }
                    None => {
                        self.set_following(Err("etcd's watch ended".into()));
                        break;
                    }
                }
            }
        }
    }

    /// Applies one change read from etcd's watch at `revision`.
    fn apply_watched(
        &self,
        registry: &Registry,
        causes: &mut Causes,
        revision: i64,
        change: Change,
    ) {
        let rev = u64::try_from(revision).unwrap_or_default();
        let entry = match change {
            Change::Instance {
                instance,
                lease,
                by,
            } => Some(Entry::Put {
                instance,
                owner: lease,
                by,
            }),
            Change::InstanceGone { service, id } => {
                let told = match &*causes {
                    (r, by_key) if *r == rev => by_key.get(&(service.clone(), id.clone())).cloned(),
                    _ => None,
                };
                let (cause, by) = told.map_or((None, None), |(c, by)| (Some(c), by));
                Some(Entry::Gone {
                    service,
                    id,
                    cause,
                    by,
                })
            }
            Change::Route { service, record } => Some(Entry::Route { service, record }),
            Change::RouteCleared { service } => Some(Entry::Route {
                service,
                record: route_cleared(),
            }),
            Change::Maintenance { service, record } => Some(Entry::Drains { service, record }),
            Change::MaintenanceCleared { service } => Some(Entry::DrainsGone { service }),
            Change::Causes(removals) => {
                *causes = (
                    rev,
                    removals
                        .into_iter()
                        .map(|r| ((r.service, r.id), (r.cause, r.by)))
                        .collect(),
                );
                None
            }
        };
        if let Some(entry) = entry {
            registry.apply(&mut registry.lock(), rev, entry);
        }
        self.advanced(rev);
    }

    /// Makes the mirror what `snapshot` says, publishing only what differs, at its revision.
    fn resync(&self, registry: &Registry, snapshot: Snapshot) {
        let rev = u64::try_from(snapshot.revision).unwrap_or_default();
        {
            let mut t = registry.lock();
            let mut now: HashMap<(ServiceName, InstanceId), (Instance, i64, Option<String>)> =
                snapshot
                    .instances
                    .into_iter()
                    .map(|(i, lease, by)| ((i.service.clone(), i.id.clone()), (i, lease, by)))
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
                        .filter(|(_, _, at)| *at > seen)
                        .map(|(cause, by, _)| (*cause, by.clone()));
                    let (cause, by) = match (told, source) {
                        (Some((cause, by)), _) => (Some(cause), by),
                        (None, Source::Docker) => (Some(RemoveCause::DockerResync), None),
                        // No cause: its lease ran out.
                        (None, Source::Registrar) => (None, None),
                    };
                    let gone = Entry::Gone {
                        service,
                        id,
                        cause,
                        by,
                    };
                    registry.apply(&mut t, rev, gone);
                }
            }
            for (_, (instance, lease, by)) in now.drain() {
                let put = Entry::Put {
                    instance,
                    owner: lease,
                    by,
                };
                registry.apply(&mut t, rev, put);
            }
            for (service, _) in t.store.routes() {
                if !snapshot.routes.contains_key(&service) {
                    let record = route_cleared();
                    registry.apply(&mut t, rev, Entry::Route { service, record });
                }
            }
            for (service, record) in snapshot.routes {
                registry.apply(&mut t, rev, Entry::Route { service, record });
            }
            for service in t.store.all_maintenance().into_keys() {
                if !snapshot.maintenance.contains_key(&service) {
                    registry.apply(&mut t, rev, Entry::DrainsGone { service });
                }
            }
            let mut written = HashMap::new();
            for (service, (record, at)) in snapshot.maintenance {
                written.insert(service.clone(), u64::try_from(at).unwrap_or_default());
                registry.apply(&mut t, rev, Entry::Drains { service, record });
            }
            // What a drain decided on this snapshot expects: the revision each drains key was
            // last written at.
            t.drain_revisions = written;
            t.store.advance(rev);
        }
        self.advanced(rev);
        registry.inner.kick.notify_one();
        tracing::info!(revision = rev, "mirror in step with etcd");
    }

    /// Renews this replica's lease a few times per TTL; a lease that ran out (the replica was
    /// cut off from etcd for longer) is replaced, and the reconciler writes the Docker
    /// instances again on the new one.
    async fn keep_lease(&self, registry: &Registry, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(REPLICA_LEASE / 4) => {}
            }
            let Some(lease) = *self.lease.lock().await else {
                continue;
            };
            match self.etcd.keep_alive(lease).await {
                Ok(true) => self.renewed(lease),
                Ok(false) => {
                    tracing::warn!("this replica's lease ran out; taking a new one");
                    self.lease_lost().await;
                    registry.inner.kick.notify_one();
                }
                Err(e) => tracing::warn!(cause = %e, "could not renew this replica's lease"),
            }
        }
    }
}

#[async_trait]
impl Backend for EtcdBackend {
    async fn commit(
        &self,
        registry: &Registry,
        proposal: Proposal,
    ) -> Result<Committed, CommitError> {
        let done = |revision: u64, changed: usize| Ok(Committed::Done { revision, changed });
        match proposal {
            Proposal::Put {
                instance,
                owner,
                expected,
                by,
            } => match self
                .etcd
                .put_instance_if(&instance, Some(&by), owner, expected)
                .await
            {
                Ok(Put::Written(revision)) => done(self.applied(revision).await?, 1),
                Ok(Put::Held { holder, revision }) => {
                    // The caller decides again on the mirror, once it shows what etcd held;
                    // a mirror that cannot catch up cannot decide (503: the client moves on).
                    if !self.caught_up(revision).await {
                        return Err(EtcdError::NotApplied(REQUEST_TIMEOUT).into());
                    }
                    Ok(Committed::Held(holder))
                }
                Err(EtcdError::LeaseNotFound) => {
                    self.lease_lost().await;
                    Err(EtcdError::LeaseNotFound.into())
                }
                Err(e) => Err(e.into()),
            },
            Proposal::Remove { removals } => {
                let (revision, deleted) = self
                    .with_lease(|lease| self.etcd.remove_instances(&removals, lease))
                    .await?;
                if deleted == 0 {
                    return done(registry.index(), 0);
                }
                done(self.applied(revision).await?, deleted as usize)
            }
            Proposal::Expire { due, owner } => {
                let (revision, deleted) = self.etcd.expire_instances(&due, owner).await?;
                let changed = deleted.iter().filter(|d| **d).count();
                if revision > 0 {
                    self.caught_up(revision).await;
                }
                done(registry.index(), changed)
            }
            Proposal::Route { service, record } => {
                // The record of a cleared route is bound to this replica's lease: it carries
                // the clearing to the other replicas, and then goes.
                let revision = match record.route {
                    Some(_) => self.etcd.set_route(&service, &record, None).await?,
                    None => {
                        self.with_lease(|lease| self.etcd.set_route(&service, &record, Some(lease)))
                            .await?
                    }
                };
                done(self.applied(revision).await?, 1)
            }
            Proposal::Drains {
                service,
                record,
                seen,
            } => {
                // The record of an undrain that left no drain is bound to this replica's
                // lease: it carries the undrain to the other replicas, and then goes.
                let seen = i64::try_from(seen).unwrap_or(i64::MAX);
                let swap = if record.maintenance.is_empty() {
                    self.with_lease(|lease| {
                        self.etcd
                            .set_maintenance(&service, &record, seen, Some(lease))
                    })
                    .await?
                } else {
                    self.etcd
                        .set_maintenance(&service, &record, seen, None)
                        .await?
                };
                match swap {
                    Swap::Done(revision) => done(self.applied(revision).await?, 1),
                    Swap::Stale(revision) if self.caught_up(revision).await => Ok(Committed::Stale),
                    // The mirror cannot show what changed: deciding again would decide the same.
                    Swap::Stale(_) => Err(EtcdError::Timeout(REQUEST_TIMEOUT).into()),
                }
            }
        }
    }

    async fn session(&self) -> Result<i64, CommitError> {
        match self.session_lease() {
            0 => Ok(self.own_lease().await?),
            lease => Ok(lease),
        }
    }

    fn current_session(&self) -> i64 {
        self.session_lease()
    }

    fn vouch(&self) -> Result<(), CommitError> {
        self.fresh_session()?;
        Ok(())
    }

    async fn run(&self, registry: &Registry, shutdown: CancellationToken) {
        tokio::join!(
            self.follow(registry, shutdown.clone()),
            self.keep_lease(registry, shutdown.clone()),
        );
    }

    /// Deletes this replica's Docker instances, so they leave at once rather than after
    /// [`REPLICA_LEASE`], and revokes its lease unless registrars' instances are bound to it
    /// (they move with their registrars to another replica, which takes them over with one
    /// write each, or they go with the session).
    async fn leave(&self, registry: &Registry) {
        let Some(lease) = *self.lease.lock().await else {
            return;
        };
        let (docker, registrars): (Vec<Removal>, usize) = {
            let t = registry.lock();
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
                        by: Some(by::EXPIRY.to_owned()),
                    }),
                    Some(Source::Registrar) => registrars += 1,
                    None => {}
                }
            }
            (docker, registrars)
        };
        if !docker.is_empty() {
            if let Err(e) = self.etcd.remove_instances(&docker, lease).await {
                tracing::warn!(cause = %e, "could not remove this replica's containers");
            }
        }
        if registrars == 0 {
            if let Err(e) = self.etcd.revoke(lease).await {
                tracing::warn!(cause = %e, "could not revoke this replica's lease");
            }
        } else {
            tracing::info!(
                "leaving {registrars} registrar instance(s) on this replica's lease: their \
                 registrars move to another replica, or they go with the lease"
            );
        }
    }

    fn following(&self) -> Option<Result<(), String>> {
        Some(self.following.borrow().clone())
    }

    fn applied_revision(&self) -> Option<u64> {
        Some(*self.applied.borrow())
    }

    async fn first_snapshot(&self, limit: Duration) {
        let mut rx = self.following.subscribe();
        let _ = tokio::time::timeout(limit, rx.wait_for(|f| f.is_ok())).await;
    }

    #[cfg(test)]
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

impl Registry {
    /// A replica's registry: its table a mirror of the one in etcd, which
    /// [`Registry::run_store`] keeps up to date.
    pub fn with_etcd(
        etcd: Etcd,
        metrics: std::sync::Arc<Metrics>,
        event_capacity: usize,
        quotas: Quotas,
    ) -> Registry {
        Registry::with_backend(
            Box::new(MemoryStore::default()),
            Box::new(EtcdBackend::new(etcd)),
            metrics,
            event_capacity,
            quotas,
        )
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
        by: Some(by::STORE.to_owned()),
    }
}

/// The record of `service`'s drains when its record is gone from the store with drains still
/// in the table (deleted by hand, say): none left, lifted by the store itself. `None` when
/// the table holds none.
pub(super) fn cleared(t: &Table, service: &ServiceName) -> Option<DrainRecord> {
    let held = t.store.maintenance(service)?;
    let first = held.entries(service).into_iter().next()?;
    Some(DrainRecord {
        maintenance: Maintenance::default(),
        action: MaintenanceAction {
            drained: false,
            target: first.target()?,
            reason: first.reason,
            origin: "etcd".into(),
            by: Some(by::STORE.to_owned()),
        },
        at: unix_millis(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::etcd::StoreUrl;
    use crate::feed::Receiver;
    use crate::registry::{instance_of, WriteError};
    use baker_client::change::Change as Published;
    use baker_client::model::{Route, ValidSpec};

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

    /// The mirror's backend, driven by hand.
    fn etcd(r: &Registry) -> &EtcdBackend {
        r.inner
            .backend
            .as_any()
            .downcast_ref()
            .expect("an etcd replica")
    }

    /// Gives the mirror one change as etcd's watch would, at `revision`.
    fn watched(r: &Registry, revision: i64, change: Change) {
        etcd(r).apply_watched(r, &mut (0, HashMap::new()), revision, change);
    }

    fn spec() -> ValidSpec {
        crate::registry::tests::spec(8080, 6000)
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

    /// (id, cause, by) of each removal published.
    fn removals(rx: &mut Receiver) -> Vec<(String, RemoveCause, Option<String>)> {
        let mut out = Vec::new();
        while let Some(p) = rx.try_recv() {
            if let Published::Remove {
                cause,
                instance,
                by,
                ..
            } = &p.change
            {
                out.push((instance.id.to_string(), *cause, by.clone()));
            }
        }
        out
    }

    #[tokio::test]
    async fn a_resync_gives_removals_made_during_the_gap_the_cause_etcd_still_holds() {
        let r = mirror().await;
        for (rev, id) in [(5, "a"), (6, "b"), (7, "c")] {
            watched(
                &r,
                rev,
                Change::Instance {
                    instance: instance(id),
                    lease: 1,
                    by: None,
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
        snapshot.causes.insert(
            key("a"),
            (RemoveCause::Deregistered, Some("web-reg".into()), 10),
        );
        snapshot
            .causes
            .insert(key("c"), (RemoveCause::Deregistered, None, 4));
        etcd(&r).resync(&r, snapshot);
        let mut got = removals(&mut sub.feed);
        got.sort_by(|x, y| x.0.cmp(&y.0));
        assert_eq!(
            got,
            [
                (
                    "a".to_owned(),
                    RemoveCause::Deregistered,
                    Some("web-reg".into())
                ),
                ("b".to_owned(), RemoveCause::Expired, Some("expiry".into())),
                ("c".to_owned(), RemoveCause::Expired, Some("expiry".into())),
            ]
        );
    }

    #[tokio::test]
    async fn a_heartbeat_that_changes_nothing_is_answered_by_the_replica_alone() {
        let r = mirror().await;
        let replica = etcd(&r);
        let web: ServiceName = "web".parse().unwrap();
        let (a, b): (InstanceId, InstanceId) = ("a".parse().unwrap(), "b".parse().unwrap());
        replica.renewed(7);
        // `a` is bound to this replica's session: it expires here, by its TTL.
        watched(
            &r,
            5,
            Change::Instance {
                instance: instance("a"),
                lease: 7,
                by: None,
            },
        );
        // `b` is bound to another replica's: that one expires it.
        watched(
            &r,
            6,
            Change::Instance {
                instance: instance("b"),
                lease: 8,
                by: None,
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
        let replica = etcd(&r);
        watched(
            &r,
            5,
            Change::Instance {
                instance: instance("a"),
                lease: 7,
                by: None,
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
    async fn a_container_is_in_the_table_only_once_etcd_has_it() {
        let r = mirror().await;
        let (web, a) = ("web".parse().unwrap(), "a".parse().unwrap());
        // Discovery notes what the engine runs; the reconciler writes it to etcd, and the
        // mirror shows it when etcd's watch does, never before.
        r.upsert(&web, &a, spec()).unwrap();
        assert!(r.services().services.is_empty());
        let mut container = instance("a");
        container.source = Source::Docker;
        watched(
            &r,
            5,
            Change::Instance {
                instance: container,
                lease: 7,
                by: None,
            },
        );
        assert_eq!(r.services().services["web"].len(), 1);
    }

    #[tokio::test]
    async fn a_mirrored_route_change_carries_the_origin_and_time_of_its_record() {
        let r = mirror().await;
        let mut sub = r.subscribe(None, false);
        let web: ServiceName = "web".parse().unwrap();
        let route: Route = [("1".parse().unwrap(), 100)].into();
        let set = RouteRecord {
            route: Some(route.clone()),
            origin: Some("cli:ops from 127.0.0.1 with token ops".into()),
            at: 1_700_000_000_000,
            by: Some("ops".into()),
        };
        watched(
            &r,
            5,
            Change::Route {
                service: web.clone(),
                record: set,
            },
        );
        let cleared = RouteRecord {
            route: None,
            origin: Some("cli:ops from 127.0.0.1 with token ops".into()),
            at: 1_700_000_000_500,
            by: Some("ops".into()),
        };
        watched(
            &r,
            6,
            Change::Route {
                service: web.clone(),
                record: cleared,
            },
        );
        // The cleared record's lease runs out: nothing more to publish.
        watched(
            &r,
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
                by,
                ..
            } = &p.change
            {
                got.push((*index, *at, route.is_some(), origin.clone(), by.clone()));
            }
        }
        let ops = Some("cli:ops from 127.0.0.1 with token ops".to_owned());
        let by = Some("ops".to_owned());
        assert_eq!(
            got,
            [
                (5, 1_700_000_000_000, true, ops.clone(), by.clone()),
                (6, 1_700_000_000_500, false, ops, by)
            ]
        );
    }
}
