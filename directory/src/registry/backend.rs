//! Where a change the registry decided is made durable: the one write path, whatever the store.
//!
//! The registry decides a change over its table (takeover, quotas, drains, route checks), then
//! hands it to its [`Backend`] as a [`Proposal`]. The backend commits it and gives it a revision,
//! and every committed change reaches the table the same way: as an [`Entry`] given to
//! [`Registry::apply`] with its revision. [`MemoryBackend`] writes the hard state (routes,
//! drains) ahead to the data directory, then applies at the next revision under the table's
//! lock; the etcd backend ([`super::replica`]) commits one transaction and applies what etcd's
//! watch delivers, the revision being etcd's. The registry answers a call once the table has
//! applied its change, so a client reads its own writes on both stores.
//!
//! A proposal carries the conditions it was decided on, which the backend checks as it commits
//! (under the table's lock in memory, as the transaction's comparisons with etcd): a put expects
//! the key to be held by the owner the table showed, a drain write the drains' revision the
//! table showed. A decision made stale by another write in between is answered
//! [`Committed::Held`] or [`Committed::Stale`], and the registry decides again.

use async_trait::async_trait;
use baker_client::change::RemoveCause;
use baker_client::model::{Instance, InstanceId, ServiceName, Source};
use tokio_util::sync::CancellationToken;

use super::{Conflict, Refused, Registry};
use crate::etcd::{DrainRecord, EtcdError, Removal, RouteRecord};
use crate::maintenance::MaintenanceFiles;
use crate::routes::{RouteStore, StoreError};

/// A change the registry decided, for its backend to commit.
#[derive(Debug, Clone)]
pub(crate) enum Proposal {
    /// Put `instance` bound to `owner`, if its key is held by `expected` (`None`: absent) or
    /// already by `owner`; `by` registered it (a token's name, or `docker`).
    Put {
        instance: Instance,
        owner: i64,
        expected: Option<i64>,
        by: String,
    },
    /// Remove these instances, each for its cause.
    Remove { removals: Vec<Removal> },
    /// Remove, as expired, those of these instances still held by `owner`.
    Expire {
        due: Vec<(ServiceName, InstanceId)>,
        owner: i64,
    },
    /// Set or clear a service's route, as `record` says.
    Route {
        service: ServiceName,
        record: RouteRecord,
    },
    /// Write a service's drains, if they were last written at revision `seen` (0: never).
    Drains {
        service: ServiceName,
        record: DrainRecord,
        seen: u64,
    },
}

/// A committed change, as the table applies it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Entry {
    /// An instance put (new, changed, or bound to another owner), by `by` (`None`: an older
    /// replica's write, which does not say).
    Put {
        instance: Instance,
        owner: i64,
        by: Option<String>,
    },
    /// An instance removed, for `cause` (`None`: it expired), by `by` (`None`: the cause's
    /// own, [`RemoveCause::made_by`]).
    Gone {
        service: ServiceName,
        id: InstanceId,
        cause: Option<RemoveCause>,
        by: Option<String>,
    },
    /// A service's route set or cleared.
    Route {
        service: ServiceName,
        record: RouteRecord,
    },
    /// A service's drains written.
    Drains {
        service: ServiceName,
        record: DrainRecord,
    },
    /// A service's drains record gone from the store (its last drain lifted, or deleted by
    /// hand): any drain the table still holds is lifted.
    DrainsGone { service: ServiceName },
}

/// What committing a proposal did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Committed {
    /// Committed and applied at `revision` (the table's revision when nothing changed);
    /// `changed` instances were put or removed (for a route or drains, 1).
    Done { revision: u64, changed: usize },
    /// A put not made: the key is held by this other owner (`0`: it is absent).
    Held(i64),
    /// A drains write not made: they were written since they were read; the table has caught
    /// up with that write.
    Stale,
}

/// Why a commit failed: nothing was changed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CommitError {
    /// The change was refused on the table as it stood at the commit.
    #[error(transparent)]
    Refused(#[from] Refused),
    /// The data directory could not be written.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// etcd could not commit it (quorum lost, or no member answered).
    #[error(transparent)]
    Unavailable(#[from] EtcdError),
}

/// Where the registry's table lives.
#[async_trait]
pub(crate) trait Backend: Send + Sync {
    /// Commits `proposal`, answering once `registry`'s table has applied it.
    async fn commit(
        &self,
        registry: &Registry,
        proposal: Proposal,
    ) -> Result<Committed, CommitError>;

    /// The owner that instances written through this registry are bound to, taking one now if
    /// there is none (a session lease with etcd).
    async fn session(&self) -> Result<i64, CommitError>;

    /// The owner as it stands (0: none yet), without waiting.
    fn current_session(&self) -> i64;

    /// Whether this registry may, now, answer a heartbeat that changes nothing by itself:
    /// the instances it owns are sure to outlive the answer.
    fn vouch(&self) -> Result<(), CommitError>;

    /// Keeps the backend's side going until `shutdown`: with etcd, the watch that feeds the
    /// table and the session.
    async fn run(&self, registry: &Registry, shutdown: CancellationToken);

    /// What is left to do once `run` has returned, before the process exits.
    async fn leave(&self, registry: &Registry);

    /// Whether the table follows the store (`Ok`), or why not; `None` when the table is the
    /// store.
    fn following(&self) -> Option<Result<(), String>>;

    /// The revision of the store the table has applied; `None` when the table is the store.
    fn applied_revision(&self) -> Option<u64>;

    /// Waits until the table holds a first snapshot of the store, for `limit` at most.
    async fn first_snapshot(&self, limit: std::time::Duration);

    /// The backend itself, for tests that drive it by hand.
    #[cfg(test)]
    fn as_any(&self) -> &dyn std::any::Any;
}

/// The table in this process's memory; routes and drains written ahead to the data directory.
pub(crate) struct MemoryBackend {
    routes: RouteStore,
    drains: MaintenanceFiles,
}

impl MemoryBackend {
    pub(crate) fn new(routes: RouteStore) -> MemoryBackend {
        let drains = MaintenanceFiles::under(routes.data());
        MemoryBackend { routes, drains }
    }

    /// Applies `entries` at the revisions after the table's, under one lock, each checked by
    /// `admit` first; how many changed the table, and the revision after them.
    fn apply_all(registry: &Registry, entries: impl IntoIterator<Item = Entry>) -> (usize, u64) {
        let mut t = registry.lock();
        let mut changed = 0;
        for entry in entries {
            let next = t.store.revision() + 1;
            if registry.apply(&mut t, next, entry) {
                changed += 1;
            }
        }
        (changed, t.store.revision())
    }
}

/// Runs a blocking write of the data directory off the runtime's threads.
async fn write_ahead(
    path: std::path::PathBuf,
    write: impl FnOnce() -> Result<(), StoreError> + Send + 'static,
) -> Result<(), StoreError> {
    tokio::task::spawn_blocking(write)
        .await
        .map_err(|e| StoreError::Write {
            path,
            source: std::io::Error::other(e),
        })?
}

#[async_trait]
impl Backend for MemoryBackend {
    async fn commit(
        &self,
        registry: &Registry,
        proposal: Proposal,
    ) -> Result<Committed, CommitError> {
        match proposal {
            Proposal::Put {
                instance,
                owner,
                expected,
                by,
            } => {
                let mut t = registry.lock();
                let (service, id) = (&instance.service, &instance.id);
                let held = t
                    .store
                    .instance(service, id)
                    .map(|_| t.owners.get(&(service.clone(), id.clone())).copied());
                let held = held.map(Option::unwrap_or_default);
                if held != expected && held != Some(owner) {
                    return Ok(Committed::Held(held.unwrap_or_default()));
                }
                // Checked again under the lock the change is applied under: a container
                // discovered meanwhile is not overwritten by a registrar, and two registrations
                // decided side by side cannot both pass a quota with room for one. (A
                // container taking over a registrar's instance was warned of as it was decided.)
                if instance.source == Source::Registrar
                    && t.store.instance(service, id).map(|i| i.source) == Some(Source::Docker)
                {
                    return Err(Refused::from(Conflict {
                        service: service.clone(),
                        id: id.clone(),
                    })
                    .into());
                }
                if held.is_none() {
                    t.admit(&registry.inner.quotas, service, id)
                        .inspect_err(|e| registry.refused(e))
                        .map_err(Refused::from)?;
                }
                let next = t.store.revision() + 1;
                let put = Entry::Put {
                    instance,
                    owner,
                    by: Some(by),
                };
                let changed = usize::from(registry.apply(&mut t, next, put));
                Ok(Committed::Done {
                    revision: t.store.revision(),
                    changed,
                })
            }
            Proposal::Remove { removals } => {
                let (changed, revision) = MemoryBackend::apply_all(
                    registry,
                    removals.into_iter().map(|r| Entry::Gone {
                        service: r.service,
                        id: r.id,
                        cause: Some(r.cause),
                        by: r.by,
                    }),
                );
                Ok(Committed::Done { revision, changed })
            }
            Proposal::Expire { due, owner } => {
                let mut t = registry.lock();
                let mut changed = 0;
                for (service, id) in due {
                    let key = (service.clone(), id.clone());
                    // Renewed since it was found due: it has a deadline again.
                    let renewed = t.leases.contains_key(&key);
                    let held = t.store.instance(&service, &id).is_some()
                        && t.owners.get(&key) == Some(&owner);
                    if held && !renewed {
                        let next = t.store.revision() + 1;
                        let gone = Entry::Gone {
                            service,
                            id,
                            cause: None,
                            by: None,
                        };
                        changed += usize::from(registry.apply(&mut t, next, gone));
                    }
                }
                Ok(Committed::Done {
                    revision: t.store.revision(),
                    changed,
                })
            }
            Proposal::Route { service, record } => {
                let (file, name, route) =
                    (self.routes.clone(), service.clone(), record.route.clone());
                write_ahead(self.routes.path_of(&service), move || match route {
                    Some(r) => file.put(&name, &r),
                    None => file.clear(&name),
                })
                .await?;
                tracing::debug!(%service, "the route is on disk");
                let (changed, revision) =
                    MemoryBackend::apply_all(registry, [Entry::Route { service, record }]);
                Ok(Committed::Done { revision, changed })
            }
            Proposal::Drains {
                service,
                record,
                seen,
            } => {
                if registry
                    .lock()
                    .drain_revisions
                    .get(&service)
                    .copied()
                    .unwrap_or(0)
                    != seen
                {
                    return Ok(Committed::Stale);
                }
                let (files, name, drains) = (
                    self.drains.clone(),
                    service.clone(),
                    record.maintenance.clone(),
                );
                write_ahead(self.drains.dir().to_owned(), move || {
                    files.save(&name, &drains)
                })
                .await?;
                let (changed, revision) =
                    MemoryBackend::apply_all(registry, [Entry::Drains { service, record }]);
                Ok(Committed::Done { revision, changed })
            }
        }
    }

    async fn session(&self) -> Result<i64, CommitError> {
        Ok(0)
    }

    fn current_session(&self) -> i64 {
        0
    }

    fn vouch(&self) -> Result<(), CommitError> {
        Ok(())
    }

    async fn run(&self, _registry: &Registry, shutdown: CancellationToken) {
        shutdown.cancelled().await;
    }

    async fn leave(&self, _registry: &Registry) {}

    fn following(&self) -> Option<Result<(), String>> {
        None
    }

    fn applied_revision(&self) -> Option<u64> {
        None
    }

    async fn first_snapshot(&self, _limit: std::time::Duration) {}

    #[cfg(test)]
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}
