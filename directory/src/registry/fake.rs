//! A backend that behaves as etcd does for the registries that share it, for unit tests of the
//! logic etcd mode relies on without a member: revisions of its own, each instance's key held
//! by a session checked as a put commits, drains written only if unchanged since they were
//! read, and every committed change delivered to every registry's table after the commit, as a
//! watch would.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use baker_client::model::{InstanceId, ServiceName};
use tokio_util::sync::CancellationToken;

use super::backend::{Backend, CommitError, Committed, Entry, Proposal};
use super::Registry;
use crate::etcd::EtcdError;
use crate::metrics::Metrics;
use crate::quota::Quotas;
use crate::store::MemoryStore;

/// The store the fake replicas share.
#[derive(Default)]
pub(super) struct FakeStore {
    state: Mutex<State>,
    /// Every registry over this store: each gets every committed change.
    registries: Mutex<Vec<Registry>>,
    /// How many changes were committed (heartbeats that change nothing are not).
    commits: AtomicUsize,
    /// How many drain writes found the drains written since they were read.
    stale: AtomicUsize,
}

#[derive(Default)]
struct State {
    revision: u64,
    /// The session holding each instance's key.
    keys: HashMap<(ServiceName, InstanceId), i64>,
    /// The revision each service's drains were last written at.
    drains: HashMap<ServiceName, u64>,
}

/// One replica over a [`FakeStore`], with its own session.
pub(super) struct FakeReplica {
    store: Arc<FakeStore>,
    session: i64,
    /// Whether the store confirmed the session lately.
    pub(super) fresh: AtomicBool,
}

impl FakeStore {
    /// A registry over this store whose session is `session`.
    pub(super) fn replica(self: &Arc<Self>, session: i64, quotas: Quotas) -> Registry {
        let backend = FakeReplica {
            store: self.clone(),
            session,
            fresh: AtomicBool::new(true),
        };
        let registry = Registry::with_backend(
            Box::new(MemoryStore::default()),
            Box::new(backend),
            Arc::new(Metrics::new()),
            64,
            quotas,
        );
        self.registries.lock().unwrap().push(registry.clone());
        registry
    }

    /// Gives every registry `entries`, committed at `revision`, once the committing call has
    /// let others run (a watch delivers after the commit answered).
    async fn deliver(&self, revision: u64, entries: Vec<Entry>) {
        tokio::task::yield_now().await;
        let registries = self.registries.lock().unwrap().clone();
        for r in registries {
            let mut t = r.lock();
            for entry in &entries {
                r.apply(&mut t, revision, entry.clone());
            }
        }
    }
}

#[async_trait]
impl Backend for FakeReplica {
    async fn commit(
        &self,
        registry: &Registry,
        proposal: Proposal,
    ) -> Result<Committed, CommitError> {
        let step = {
            let mut s = self.store.state.lock().unwrap();
            let next = s.revision + 1;
            let entries = match proposal {
                Proposal::Put {
                    instance,
                    owner,
                    expected,
                    by,
                } => {
                    let key = (instance.service.clone(), instance.id.clone());
                    let held = s.keys.get(&key).copied();
                    if held != expected && held != Some(owner) {
                        return Ok(Committed::Held(held.unwrap_or_default()));
                    }
                    s.keys.insert(key, owner);
                    Ok(vec![Entry::Put {
                        instance,
                        owner,
                        by: Some(by),
                    }])
                }
                Proposal::Remove { removals } => Ok(removals
                    .into_iter()
                    .filter(|r| s.keys.remove(&(r.service.clone(), r.id.clone())).is_some())
                    .map(|r| Entry::Gone {
                        service: r.service,
                        id: r.id,
                        cause: Some(r.cause),
                        by: r.by,
                    })
                    .collect()),
                Proposal::Expire { due, owner } => {
                    let held: Vec<_> = due
                        .into_iter()
                        .filter(|key| s.keys.get(key) == Some(&owner))
                        .collect();
                    for key in &held {
                        s.keys.remove(key);
                    }
                    Ok(held
                        .into_iter()
                        .map(|(service, id)| Entry::Gone {
                            service,
                            id,
                            cause: None,
                            by: None,
                        })
                        .collect())
                }
                Proposal::Route { service, record } => Ok(vec![Entry::Route { service, record }]),
                Proposal::Drains {
                    service,
                    record,
                    seen,
                } => {
                    let written = s.drains.get(&service).copied().unwrap_or(0);
                    if written != seen {
                        self.store.stale.fetch_add(1, Ordering::SeqCst);
                        Err((service, written))
                    } else {
                        s.drains.insert(service.clone(), next);
                        Ok(vec![Entry::Drains { service, record }])
                    }
                }
            };
            if let Ok(entries) = &entries {
                if !entries.is_empty() {
                    s.revision = next;
                }
            }
            entries.map(|e| (next, e))
        };
        let (revision, entries) = match step {
            Ok(committed) => committed,
            Err((service, written)) => {
                // As etcd's backend does: answered once the table shows that write.
                while registry.lock().drain_revisions.get(&service) != Some(&written) {
                    tokio::task::yield_now().await;
                }
                return Ok(Committed::Stale);
            }
        };
        if entries.is_empty() {
            return Ok(Committed::Done {
                revision: registry.index(),
                changed: 0,
            });
        }
        self.store.commits.fetch_add(1, Ordering::SeqCst);
        let changed = entries.len();
        self.store.deliver(revision, entries).await;
        Ok(Committed::Done { revision, changed })
    }

    async fn session(&self) -> Result<i64, CommitError> {
        Ok(self.session)
    }

    fn current_session(&self) -> i64 {
        self.session
    }

    fn vouch(&self) -> Result<(), CommitError> {
        match self.fresh.load(Ordering::SeqCst) {
            true => Ok(()),
            false => Err(EtcdError::SessionStale(Duration::from_secs(6)).into()),
        }
    }

    async fn run(&self, _registry: &Registry, shutdown: CancellationToken) {
        shutdown.cancelled().await;
    }

    async fn leave(&self, _registry: &Registry) {}

    fn following(&self) -> Option<Result<(), String>> {
        Some(Ok(()))
    }

    fn applied_revision(&self) -> Option<u64> {
        Some(self.store.state.lock().unwrap().revision)
    }

    async fn first_snapshot(&self, _limit: Duration) {}

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use baker_client::change::Change;
    use baker_client::maintenance::Target;
    use baker_client::model::{Source, ValidSpec};
    use tokio::time::Instant;

    fn spec() -> ValidSpec {
        crate::registry::tests::spec(8080, 3000)
    }

    /// Two replicas over one fake store, with sessions 1 and 2.
    fn two() -> (Arc<FakeStore>, Registry, Registry) {
        let store = Arc::new(FakeStore::default());
        let (a, b) = (
            store.replica(1, Quotas::default()),
            store.replica(2, Quotas::default()),
        );
        (store, a, b)
    }

    fn commits(store: &FakeStore) -> usize {
        store.commits.load(Ordering::SeqCst)
    }

    fn owner(r: &Registry, id: &str) -> Option<i64> {
        let key = ("web".parse().unwrap(), id.parse().unwrap());
        r.lock().owners.get(&key).copied()
    }

    #[tokio::test(start_paused = true)]
    async fn heartbeats_end_at_the_replica_that_owns_the_instance() {
        let (store, a, b) = two();
        let (web, x) = ("web".parse().unwrap(), "x".parse().unwrap());
        a.register(&web, &x, spec()).await.unwrap();
        assert_eq!(commits(&store), 1);
        assert_eq!((owner(&a, "x"), owner(&b, "x")), (Some(1), Some(1)));
        assert!(a.next_deadline().is_some() && b.next_deadline().is_none());
        for _ in 0..3 {
            tokio::time::advance(Duration::from_secs(1)).await;
            a.register(&web, &x, spec()).await.unwrap();
        }
        assert_eq!(
            commits(&store),
            1,
            "heartbeats that change nothing write nothing"
        );
        // A changed registration is a change: committed, and seen on every replica.
        let mut heavier = spec();
        heavier.weight = 50;
        a.register(&web, &x, heavier).await.unwrap();
        assert_eq!(commits(&store), 2);
        assert_eq!(b.services().services["web"][0].weight, 50);
        // A replica the store has not confirmed lately cannot vouch for a heartbeat.
        let backend: &FakeReplica = a.inner.backend.as_any().downcast_ref().unwrap();
        backend.fresh.store(false, Ordering::SeqCst);
        let mut again = spec();
        again.weight = 50;
        let refused = a.register(&web, &x, again).await.unwrap_err();
        assert!(refused.to_string().contains("session"), "{refused}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_registrar_that_moves_takes_its_instance_with_one_write_and_nothing_leaves() {
        let (store, a, b) = two();
        let (web, x) = ("web".parse().unwrap(), "x".parse().unwrap());
        a.register(&web, &x, spec()).await.unwrap();
        let (mut on_a, mut on_b) = (a.subscribe(None, false), b.subscribe(None, false));
        // Its registrar now heartbeats through b: one conditional write moves it.
        b.register(&web, &x, spec()).await.unwrap();
        assert_eq!(commits(&store), 2);
        assert_eq!((owner(&a, "x"), owner(&b, "x")), (Some(2), Some(2)));
        assert!(on_a.feed.try_recv().is_none() && on_b.feed.try_recv().is_none());
        assert!(
            a.next_deadline().is_none(),
            "a no longer keeps its deadline"
        );
        b.register(&web, &x, spec()).await.unwrap();
        assert_eq!(commits(&store), 2);
        // Nobody heartbeats it any more: it expires on its owner's timer, once, everywhere.
        tokio::time::advance(Duration::from_millis(3001)).await;
        assert_eq!(a.expire(Instant::now()).await, 0);
        assert_eq!(b.expire(Instant::now()).await, 1);
        for (r, sub) in [(&a, &mut on_a), (&b, &mut on_b)] {
            assert!(r.services().services.is_empty());
            match sub.feed.try_recv().map(|p| p.change.clone()) {
                Some(Change::Remove { cause, .. }) => assert_eq!(cause.as_str(), "expired"),
                other => panic!("expected the expiry, got {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn drains_written_side_by_side_on_two_replicas_are_both_kept() {
        let (store, a, b) = two();
        let web: ServiceName = "web".parse().unwrap();
        let (one, two) = (
            Target::Version("1".parse().unwrap()),
            Target::Version("2".parse().unwrap()),
        );
        let (drained_a, drained_b) = tokio::join!(
            a.drain(&web, one, None, "a".into()),
            b.drain(&web, two, None, "b".into())
        );
        drained_a.unwrap();
        drained_b.unwrap();
        assert_eq!(
            store.stale.load(Ordering::SeqCst),
            1,
            "one was decided again"
        );
        for r in [&a, &b] {
            assert_eq!(r.maintenance().1[&web].len(), 2, "neither drain was lost");
        }
    }

    #[tokio::test]
    async fn a_quota_is_checked_on_the_table_before_anything_is_written() {
        let store = Arc::new(FakeStore::default());
        let quotas = Quotas {
            instances: 1,
            ..Quotas::default()
        };
        let a = store.replica(1, quotas);
        let web: ServiceName = "web".parse().unwrap();
        a.register(&web, &"x".parse().unwrap(), spec())
            .await
            .unwrap();
        let refused = a
            .register(&web, &"y".parse().unwrap(), spec())
            .await
            .unwrap_err();
        assert!(
            matches!(refused, super::super::WriteError::Quota(_)),
            "{refused}"
        );
        assert_eq!(commits(&store), 1);
        assert_eq!(a.services().services["web"][0].source, Source::Registrar);
    }
}
