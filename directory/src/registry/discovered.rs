//! The containers this registry's Docker engine runs, and the plan that writes them.
//!
//! Docker discovery says, synchronously, which containers the engine runs
//! ([`Registry::upsert`](super::Registry::upsert), [`remove`](super::Registry::remove),
//! [`sync_source`](super::Registry::sync_source)); the reconciler commits them bound to this
//! registry's session, and never touches a container bound to another replica's: two replicas
//! watching the same engine do not fight over its containers, and when one dies the other takes
//! them over once its lease has run out. In memory there is one owner, and the plan reduces to
//! writing what changed.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use baker_client::change::RemoveCause;
use baker_client::model::{Instance, InstanceId, ServiceName, Source};
use tokio::time::Instant;

use super::{joined_as, same_but_last_seen, Table};
use crate::etcd::Removal;

/// How often the Docker reconciler looks again without being asked.
pub(super) const RECONCILE_EVERY: Duration = Duration::from_secs(5);

/// How long a container another replica removed as stopped is left alone by this one, while
/// its own engine still lists it as running: its own stop event comes within this.
pub(super) const STOPPED_ELSEWHERE: Duration = Duration::from_secs(10);

type Key = (ServiceName, InstanceId);

/// Which discovery found an instance: the engine's containers, or a swarm's tasks. Each
/// resynchronises only its own ([`Registry::sync_source`](super::Registry::sync_source) is the
/// containers'), so the two run side by side on a manager without undoing each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Finder {
    /// Labelled containers of this engine (`docker.rs`).
    #[default]
    Containers,
    /// Tasks of labelled swarm services (`swarm.rs`).
    Swarm,
}

#[derive(Default)]
pub(super) struct Discovered {
    wanted: BTreeMap<Key, Instance>,
    /// The discovery that wants each key of `wanted`.
    origins: HashMap<Key, Finder>,
    dropped: HashMap<Key, RemoveCause>,
    /// When each wanted container was last added to `wanted` (a start seen by this engine).
    since: HashMap<Key, Instant>,
    /// Containers another replica removed for a reason of the engine's (stopped, died, ...),
    /// and when this replica learnt it: another replica on the same engine saw the stop
    /// first, and this one's own event is on its way. Such a container is not written again
    /// for [`STOPPED_ELSEWHERE`], unless this engine started it since.
    stopped_elsewhere: HashMap<Key, Instant>,
}

impl Discovered {
    /// The engine runs `instance`, found by `origin`.
    pub(super) fn want(&mut self, instance: Instance, origin: Finder) {
        let key = (instance.service.clone(), instance.id.clone());
        self.dropped.remove(&key);
        self.origins.insert(key.clone(), origin);
        if !self.wanted.contains_key(&key) {
            self.since.insert(key.clone(), Instant::now());
        }
        self.wanted.insert(key, instance);
    }

    /// The engine no longer runs `service`/`id`, for `cause`; whether it did.
    pub(super) fn drop_one(
        &mut self,
        service: &ServiceName,
        id: &InstanceId,
        cause: RemoveCause,
    ) -> bool {
        let key = (service.clone(), id.clone());
        let was = self.wanted.remove(&key).is_some();
        self.since.remove(&key);
        self.origins.remove(&key);
        self.dropped.insert(key, cause);
        was
    }

    /// The engine runs exactly `wanted` of the instances `origin` finds; its others went on a
    /// resync. Instances of the other origin stay as they are.
    pub(super) fn want_only(&mut self, origin: Finder, mut wanted: BTreeMap<Key, Instance>) {
        let gone: Vec<Key> = self
            .wanted
            .keys()
            .filter(|k| {
                !wanted.contains_key(*k)
                    && self.origins.get(*k).copied().unwrap_or_default() == origin
            })
            .cloned()
            .collect();
        for key in gone {
            self.since.remove(&key);
            self.origins.remove(&key);
            self.dropped.insert(key, RemoveCause::DockerResync);
        }
        for (key, instance) in &self.wanted {
            if self.origins.get(key).copied().unwrap_or_default() != origin
                && !wanted.contains_key(key)
            {
                wanted.insert(key.clone(), instance.clone());
            }
        }
        for key in wanted.keys() {
            if !self.origins.contains_key(key) {
                self.origins.insert(key.clone(), origin);
            }
        }
        let now = Instant::now();
        for key in wanted.keys() {
            self.dropped.remove(key);
            if !self.wanted.contains_key(key) {
                self.since.insert(key.clone(), now);
            }
        }
        self.wanted = wanted;
    }

    /// Another replica removed `service`/`id` for a reason of the engine's just now.
    pub(super) fn stopped_elsewhere(&mut self, service: &ServiceName, id: &InstanceId) {
        let now = Instant::now();
        self.stopped_elsewhere
            .retain(|_, at| now.duration_since(*at) < STOPPED_ELSEWHERE);
        self.stopped_elsewhere
            .insert((service.clone(), id.clone()), now);
    }

    /// Whether the engine runs nothing and dropped nothing.
    pub(super) fn is_idle(&self) -> bool {
        self.wanted.is_empty() && self.dropped.is_empty()
    }

    /// Whether the wanted container `key` was removed by another replica for a reason of the
    /// engine's since this replica last saw it start, lately enough to wait for this
    /// replica's own event instead of writing it again.
    fn waits(&self, key: &Key) -> bool {
        self.stopped_elsewhere.get(key).is_some_and(|at| {
            at.elapsed() < STOPPED_ELSEWHERE && self.since.get(key).is_none_or(|s| s <= at)
        })
    }

    /// What to commit so that the table holds the containers the engine runs, bound to
    /// `owner`: each put with the owner the table shows its key held by (`None`: absent), and
    /// the removals of `owner`'s containers the engine no longer runs. Forgets the drops whose
    /// instance is no longer `owner`'s (gone, or another replica's).
    pub(super) fn plan(
        &mut self,
        t: &Table,
        owner: i64,
    ) -> (Vec<(Instance, Option<i64>)>, Vec<Removal>) {
        let puts = self
            .wanted
            .iter()
            .filter_map(|(key, want)| {
                let held = t.owners.get(key).copied();
                let stored = t.store.instance(&key.0, &key.1);
                let put = match stored {
                    None => !self.waits(key),
                    // Another replica's container: its lease says when it goes.
                    Some(i) if i.source == Source::Docker && held != Some(owner) => false,
                    Some(i) => held != Some(owner) || !same_but_last_seen(i, want),
                };
                put.then(|| {
                    let mut want = want.clone();
                    joined_as(&mut want, stored);
                    (want, stored.and(held))
                })
            })
            .collect();
        // Every container this engine ran and no longer runs was dropped, with its cause: the
        // plan costs what discovery changed, not the size of the table.
        self.dropped
            .retain(|key, _| t.owners.get(key) == Some(&owner));
        let removals = self
            .dropped
            .iter()
            .filter(|(key, _)| {
                !self.wanted.contains_key(*key)
                    && t.store
                        .instance(&key.0, &key.1)
                        .is_some_and(|i| i.source == Source::Docker)
            })
            .map(|((service, id), cause)| Removal {
                service: service.clone(),
                id: id.clone(),
                cause: *cause,
                by: Some(baker_client::change::by::DOCKER.to_owned()),
            })
            .collect();
        (puts, removals)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use baker_client::model::InstanceSpec;

    fn instance(id: &str) -> Instance {
        let spec = InstanceSpec {
            address: "10.0.0.1".into(),
            port: 80,
            version: None,
            weight: None,
            tags: Vec::new(),
            ttl_ms: None,
            zone: None,
        }
        .validate()
        .unwrap();
        super::super::instance_of(
            &"web".parse().unwrap(),
            &id.parse().unwrap(),
            spec,
            Source::Docker,
        )
    }

    fn key(id: &str) -> Key {
        ("web".parse().unwrap(), id.parse().unwrap())
    }

    #[test]
    fn a_containers_resync_leaves_the_swarms_tasks_alone() {
        let mut d = Discovered::default();
        d.want(instance("task.1"), Finder::Swarm);
        d.want(instance("c1"), Finder::Containers);
        d.want(instance("c2"), Finder::Containers);
        // The containers resync: c2 is gone, c3 came; the swarm's task stays.
        d.want_only(
            Finder::Containers,
            BTreeMap::from([(key("c1"), instance("c1")), (key("c3"), instance("c3"))]),
        );
        let wanted: Vec<&str> = d.wanted.keys().map(|k| k.1.as_str()).collect();
        assert_eq!(wanted, ["c1", "c3", "task.1"]);
        assert_eq!(
            d.dropped.keys().map(|k| k.1.as_str()).collect::<Vec<_>>(),
            ["c2"]
        );
        // And a swarm drop leaves the containers alone.
        assert!(d.drop_one(
            &key("task.1").0,
            &key("task.1").1,
            RemoveCause::DockerStopped
        ));
        d.want_only(
            Finder::Containers,
            BTreeMap::from([(key("c1"), instance("c1")), (key("c3"), instance("c3"))]),
        );
        assert_eq!(d.wanted.len(), 2);
    }

    #[test]
    fn a_container_stopped_elsewhere_waits_for_this_engines_event_unless_it_started_since() {
        let key: Key = ("web".parse().unwrap(), "c1".parse().unwrap());
        let now = Instant::now();
        let mut d = Discovered::default();
        assert!(!d.waits(&key), "nothing known: written");
        // Seen starting here, then removed by another replica as stopped: left alone.
        d.since.insert(key.clone(), now - Duration::from_secs(3));
        d.stopped_elsewhere
            .insert(key.clone(), now - Duration::from_secs(1));
        assert!(d.waits(&key));
        // Started again here after that removal: written.
        d.since.insert(key.clone(), now);
        assert!(!d.waits(&key));
        // The removal is older than the grace and this engine still lists it: written.
        d.since.insert(key.clone(), now - STOPPED_ELSEWHERE * 3);
        d.stopped_elsewhere
            .insert(key.clone(), now - STOPPED_ELSEWHERE * 2);
        assert!(!d.waits(&key));
    }
}
