//! Where the directory's table lives: instances, routes and drains, and the revision of the last
//! change.
//!
//! [`Store`] is the storage interface the [`Registry`](crate::registry::Registry) works through:
//! the registry decides (who may change what, TTLs, causes, logging, publishing), the store
//! holds. [`MemoryStore`] keeps everything in this process (routes also persist to
//! `routes/<service>.json`, written by the registry as it applies them). Another implementation (etcd:
//! leases for instances, keys for routes, the etcd revision as the index) can stand in without
//! the API or the watch stream knowing.
//!
//! Every operation that changes the table is given the revision the change was committed at (the
//! registry's backend numbers changes: the next one in memory, etcd's own revision with etcd);
//! operations that change nothing a consumer acts on ([`Store::renew`]) take none. Costs follow the change,
//! not the size of what changed: putting or removing one instance of a service of 10,000 is a
//! map update, and the versions live in a service are counted as they change rather than
//! recounted.

use std::collections::{BTreeMap, BTreeSet};

use baker_client::maintenance::Maintenance;
use baker_client::model::{Instance, InstanceId, Route, ServiceName, Source, Version};

/// The table's storage operations. Called with the registry's lock held, so implementations
/// need no locking of their own.
pub trait Store: Send {
    /// The revision of the last change (0 for an empty table that never changed).
    fn revision(&self) -> u64;
    /// Moves the revision of the last change up to `revision` (a snapshot read at a revision
    /// with no change of its own here); never down.
    fn advance(&mut self, revision: u64);
    /// One instance, if registered.
    fn instance(&self, service: &ServiceName, id: &InstanceId) -> Option<&Instance>;
    /// Adds or replaces an instance, a change made at `revision`; returns the instance it
    /// replaced.
    fn put(&mut self, revision: u64, instance: Instance) -> Option<Instance>;
    /// Notes a heartbeat: only `last_seen` moves. Not a change: no revision.
    fn renew(&mut self, service: &ServiceName, id: &InstanceId, last_seen: u64) -> bool;
    /// Removes an instance, a change made at `revision` if it was registered; returns it.
    fn remove(&mut self, revision: u64, service: &ServiceName, id: &InstanceId)
        -> Option<Instance>;
    /// Sets or clears a route, a change made at `revision`; returns the old route.
    fn set_route(
        &mut self,
        revision: u64,
        service: &ServiceName,
        route: Option<Route>,
    ) -> Option<Route>;
    /// One service's route.
    fn route(&self, service: &ServiceName) -> Option<&Route>;
    /// Every route.
    fn routes(&self) -> BTreeMap<ServiceName, Route>;
    /// How many routes are set.
    fn route_count(&self) -> usize {
        self.routes().len()
    }
    /// Replaces a service's drains (an empty [`Maintenance`] clears them), a change made at
    /// `revision`; returns the drains it replaced (empty when there were none).
    fn set_maintenance(
        &mut self,
        revision: u64,
        service: &ServiceName,
        maintenance: Maintenance,
    ) -> Maintenance;
    /// One service's drains, if it has any.
    fn maintenance(&self, service: &ServiceName) -> Option<&Maintenance>;
    /// Every service's drains (services with none are absent).
    fn all_maintenance(&self) -> BTreeMap<ServiceName, Maintenance>;
    /// How many instances `service` has.
    fn count(&self, service: &ServiceName) -> usize;
    /// The distinct versions of `service`'s live instances.
    fn versions(&self, service: &ServiceName) -> Vec<Version>;
    /// One service's instances, sorted by id.
    fn instances(&self, service: &ServiceName) -> Vec<Instance>;
    /// Every service with live instances and its instances sorted by id; only those named in
    /// `only` when given.
    fn services(
        &self,
        only: Option<&BTreeSet<ServiceName>>,
    ) -> BTreeMap<ServiceName, Vec<Instance>>;
    /// The first `n` services with live instances, in name order.
    fn service_names(&self, n: usize) -> Vec<ServiceName>;
    /// The ids of every instance from `source`.
    fn of_source(&self, source: Source) -> Vec<(ServiceName, InstanceId)>;
    /// How many services have live instances, and how many live instances there are in all.
    /// Checked on every new instance against the quotas: it must not scan the table.
    fn totals(&self) -> (usize, usize);
}

/// One service's instances, and how many of them run each version.
#[derive(Default)]
struct Service {
    instances: BTreeMap<InstanceId, Instance>,
    versions: BTreeMap<Version, usize>,
}

impl Service {
    fn count_version(&mut self, version: &Version, up: bool) {
        if up {
            *self.versions.entry(version.clone()).or_default() += 1;
        } else if let Some(n) = self.versions.get_mut(version) {
            *n -= 1;
            if *n == 0 {
                self.versions.remove(version);
            }
        }
    }
}

/// The table in this process's memory.
#[derive(Default)]
pub struct MemoryStore {
    revision: u64,
    services: BTreeMap<ServiceName, Service>,
    /// Live instances in all services, counted as they come and go.
    instances: usize,
    routes: BTreeMap<ServiceName, Route>,
    maintenance: BTreeMap<ServiceName, Maintenance>,
}

impl MemoryStore {
    /// A store holding `routes` and `maintenance` (as loaded from `routes/` and `maintenance/`), at
    /// revision 0.
    pub fn new(
        routes: BTreeMap<ServiceName, Route>,
        mut maintenance: BTreeMap<ServiceName, Maintenance>,
    ) -> MemoryStore {
        maintenance.retain(|_, m| !m.is_empty());
        MemoryStore {
            routes,
            maintenance,
            ..MemoryStore::default()
        }
    }
}

impl Store for MemoryStore {
    fn revision(&self) -> u64 {
        self.revision
    }

    fn advance(&mut self, revision: u64) {
        self.revision = self.revision.max(revision);
    }

    fn instance(&self, service: &ServiceName, id: &InstanceId) -> Option<&Instance> {
        self.services.get(service)?.instances.get(id)
    }

    fn put(&mut self, revision: u64, instance: Instance) -> Option<Instance> {
        let entry = self.services.entry(instance.service.clone()).or_default();
        entry.count_version(&instance.version, true);
        let old = entry.instances.insert(instance.id.clone(), instance);
        match &old {
            Some(old) => entry.count_version(&old.version, false),
            None => self.instances += 1,
        }
        self.revision = revision;
        old
    }

    fn renew(&mut self, service: &ServiceName, id: &InstanceId, last_seen: u64) -> bool {
        match self
            .services
            .get_mut(service)
            .and_then(|s| s.instances.get_mut(id))
        {
            Some(i) => {
                i.last_seen = last_seen;
                true
            }
            None => false,
        }
    }

    fn remove(
        &mut self,
        revision: u64,
        service: &ServiceName,
        id: &InstanceId,
    ) -> Option<Instance> {
        let entry = self.services.get_mut(service)?;
        let old = entry.instances.remove(id)?;
        entry.count_version(&old.version, false);
        self.instances -= 1;
        if entry.instances.is_empty() {
            self.services.remove(service);
        }
        self.revision = revision;
        Some(old)
    }

    fn set_route(
        &mut self,
        revision: u64,
        service: &ServiceName,
        route: Option<Route>,
    ) -> Option<Route> {
        self.revision = revision;
        match route {
            Some(r) => self.routes.insert(service.clone(), r),
            None => self.routes.remove(service),
        }
    }

    fn route(&self, service: &ServiceName) -> Option<&Route> {
        self.routes.get(service)
    }

    fn routes(&self) -> BTreeMap<ServiceName, Route> {
        self.routes.clone()
    }

    fn route_count(&self) -> usize {
        self.routes.len()
    }

    fn set_maintenance(
        &mut self,
        revision: u64,
        service: &ServiceName,
        maintenance: Maintenance,
    ) -> Maintenance {
        self.revision = revision;
        let old = if maintenance.is_empty() {
            self.maintenance.remove(service)
        } else {
            self.maintenance.insert(service.clone(), maintenance)
        };
        old.unwrap_or_default()
    }

    fn maintenance(&self, service: &ServiceName) -> Option<&Maintenance> {
        self.maintenance.get(service)
    }

    fn all_maintenance(&self) -> BTreeMap<ServiceName, Maintenance> {
        self.maintenance.clone()
    }

    fn count(&self, service: &ServiceName) -> usize {
        self.services.get(service).map_or(0, |s| s.instances.len())
    }

    fn versions(&self, service: &ServiceName) -> Vec<Version> {
        self.services
            .get(service)
            .map(|s| s.versions.keys().cloned().collect())
            .unwrap_or_default()
    }

    fn instances(&self, service: &ServiceName) -> Vec<Instance> {
        self.services
            .get(service)
            .map(|s| s.instances.values().cloned().collect())
            .unwrap_or_default()
    }

    fn services(
        &self,
        only: Option<&BTreeSet<ServiceName>>,
    ) -> BTreeMap<ServiceName, Vec<Instance>> {
        let list = |s: &Service| s.instances.values().cloned().collect();
        match only {
            None => self
                .services
                .iter()
                .map(|(name, s)| (name.clone(), list(s)))
                .collect(),
            Some(only) => only
                .iter()
                .filter_map(|name| Some((name.clone(), list(self.services.get(name)?))))
                .collect(),
        }
    }

    fn totals(&self) -> (usize, usize) {
        (self.services.len(), self.instances)
    }

    fn service_names(&self, n: usize) -> Vec<ServiceName> {
        self.services.keys().take(n).cloned().collect()
    }

    fn of_source(&self, source: Source) -> Vec<(ServiceName, InstanceId)> {
        self.services
            .iter()
            .flat_map(|(name, s)| {
                s.instances
                    .values()
                    .filter(move |i| i.source == source)
                    .map(move |i| (name.clone(), i.id.clone()))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use baker_client::maintenance::{Drain, Target};

    fn inst(service: &str, id: &str, version: &str) -> Instance {
        Instance {
            version: version.parse().unwrap(),
            ..Instance::sample(service, id)
        }
    }

    #[test]
    fn every_change_takes_its_revision_and_renewals_none() {
        let mut s = MemoryStore::default();
        assert_eq!(s.put(1, inst("a", "1", "1")), None);
        assert!(s.renew(&"a".parse().unwrap(), &"1".parse().unwrap(), 42));
        assert_eq!(s.revision(), 1);
        let old = s.put(2, inst("a", "1", "2"));
        assert_eq!(old.map(|o| o.version.to_string()), Some("1".into()));
        assert_eq!(s.revision(), 2);
        let route: Route = [("2".parse().unwrap(), 100)].into();
        assert_eq!(s.set_route(3, &"a".parse().unwrap(), Some(route)), None);
        let gone = s
            .remove(4, &"a".parse().unwrap(), &"1".parse().unwrap())
            .unwrap();
        assert_eq!(gone.version.as_str(), "2");
        assert!(s
            .remove(5, &"a".parse().unwrap(), &"1".parse().unwrap())
            .is_none());
        assert_eq!(s.revision(), 4, "removing nothing is no change");
        s.advance(3);
        assert_eq!(s.revision(), 4, "never down");
        let mut drains = Maintenance::default();
        drains.insert(
            Target::Version("2".parse().unwrap()),
            Drain {
                reason: None,
                since: 1,
                origin: "test".into(),
            },
        );
        let a: ServiceName = "a".parse().unwrap();
        let old = s.set_maintenance(5, &a, drains.clone());
        assert_eq!((s.revision(), old.is_empty()), (5, true));
        assert_eq!(s.maintenance(&a), Some(&drains));
        let old = s.set_maintenance(6, &a, Maintenance::default());
        assert_eq!((s.revision(), old), (6, drains));
        assert!(s.maintenance(&a).is_none() && s.all_maintenance().is_empty());
    }

    #[test]
    fn versions_are_counted_as_instances_come_and_go() {
        let mut s = MemoryStore::default();
        let a: ServiceName = "a".parse().unwrap();
        s.put(1, inst("a", "1", "1"));
        s.put(2, inst("a", "2", "1"));
        s.put(3, inst("a", "3", "2"));
        assert_eq!(s.versions(&a), ["1", "2"]);
        s.put(4, inst("a", "3", "1"));
        assert_eq!(s.versions(&a), ["1"]);
        s.remove(9, &a, &"1".parse().unwrap());
        s.remove(10, &a, &"2".parse().unwrap());
        assert_eq!(s.versions(&a), ["1"]);
        s.remove(11, &a, &"3".parse().unwrap());
        assert!(s.versions(&a).is_empty());
        assert_eq!(s.count(&a), 0);
        assert!(
            s.services(None).is_empty(),
            "an empty service is no service"
        );
    }

    #[test]
    fn totals_are_counted_as_instances_come_and_go() {
        let recount = |s: &MemoryStore| {
            let services = s.services(None);
            (
                services.len(),
                services.values().map(Vec::len).sum::<usize>(),
            )
        };
        let mut s = MemoryStore::default();
        assert_eq!(s.totals(), (0, 0));
        // A deterministic mix of new instances, replacements, removals and misses.
        let mut x: u64 = 7;
        for _ in 0..5_000 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let (service, id) = (
                format!("s{}", (x >> 33) % 13),
                format!("{}", (x >> 40) % 17),
            );
            if (x >> 20) % 3 == 0 {
                s.remove(12, &service.parse().unwrap(), &id.parse().unwrap());
            } else {
                s.put(5, inst(&service, &id, "1"));
            }
            assert_eq!(s.totals(), recount(&s));
        }
        assert!(s.totals().1 > 0);
    }

    #[test]
    fn services_can_be_filtered() {
        let mut s = MemoryStore::default();
        s.put(6, inst("a", "1", "1"));
        s.put(7, inst("b", "1", "1"));
        s.put(8, inst("c", "1", "1"));
        let only: BTreeSet<ServiceName> = ["a".parse().unwrap(), "z".parse().unwrap()].into();
        let got = s.services(Some(&only));
        assert_eq!(got.keys().map(|k| k.as_str()).collect::<Vec<_>>(), ["a"]);
        assert_eq!(s.services(None).len(), 3);
    }
}
