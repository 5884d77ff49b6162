//! Quotas: how many instances, services, routes, drains and ambassadors' reports the directory
//! accepts.
//!
//! Each quota is a `BAKER_MAX_*` variable whose default a real fleet does not reach by accident;
//! its only purpose is that one misbehaving client (a registrar in a loop minting new ids, a
//! script creating routes) cannot grow the directory's table, memory and watch streams without
//! bound. A quota refuses only growth: renewing or changing an instance that is registered, or
//! changing a route that exists, is always accepted, so reaching a quota never takes down what
//! runs. Over the API a refusal is a 429 naming the quota and its variable; for Docker discovery
//! it is a warning, and the container is registered at its next event once there is room.
//!
//! Checking costs the same whatever the size of the table: the store keeps its counts of
//! instances, services and routes as changes happen ([`crate::store::Store::totals`]), so a
//! new instance is checked against three numbers, not a scan of every service.

use baker_client::config::vars::{
    ENV_MAX_AMBASSADORS, ENV_MAX_DRAINS, ENV_MAX_INSTANCES, ENV_MAX_INSTANCES_PER_SERVICE,
    ENV_MAX_ROUTES, ENV_MAX_SERVICES,
};
use baker_client::model::{InstanceId, ServiceName};

/// Default of `BAKER_MAX_INSTANCES_PER_SERVICE`.
pub const DEFAULT_INSTANCES_PER_SERVICE: usize = 20_000;
/// Default of `BAKER_MAX_SERVICES`.
pub const DEFAULT_SERVICES: usize = 10_000;
/// Default of `BAKER_MAX_ROUTES`.
pub const DEFAULT_ROUTES: usize = 10_000;
/// Default of `BAKER_MAX_INSTANCES`.
pub const DEFAULT_INSTANCES: usize = 250_000;
/// Default of `BAKER_MAX_DRAINS`.
pub const DEFAULT_DRAINS: usize = 10_000;
/// Default of `BAKER_MAX_AMBASSADORS`.
pub const DEFAULT_AMBASSADORS: usize = 10_000;

/// The limits in force.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quotas {
    /// Live instances in one service.
    pub instances_per_service: usize,
    /// Services with at least one live instance.
    pub services: usize,
    /// Routes set.
    pub routes: usize,
    /// Live instances in all.
    pub instances: usize,
    /// Drains (of instances and versions) in place, over all services.
    pub drains: usize,
    /// Ambassadors whose reports are kept ([`crate::ambassadors`]).
    pub ambassadors: usize,
}

impl Default for Quotas {
    fn default() -> Self {
        Quotas {
            instances_per_service: DEFAULT_INSTANCES_PER_SERVICE,
            services: DEFAULT_SERVICES,
            routes: DEFAULT_ROUTES,
            instances: DEFAULT_INSTANCES,
            drains: DEFAULT_DRAINS,
            ambassadors: DEFAULT_AMBASSADORS,
        }
    }
}

/// One quota.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quota {
    InstancesPerService,
    Services,
    Routes,
    Instances,
    Drains,
    Ambassadors,
}

impl Quota {
    /// The quota's name in error bodies and metrics.
    pub fn name(self) -> &'static str {
        match self {
            Quota::InstancesPerService => "instances_per_service",
            Quota::Services => "services",
            Quota::Routes => "routes",
            Quota::Instances => "instances",
            Quota::Drains => "drains",
            Quota::Ambassadors => "ambassadors",
        }
    }

    /// The variable that sets it.
    pub fn variable(self) -> &'static str {
        match self {
            Quota::InstancesPerService => ENV_MAX_INSTANCES_PER_SERVICE,
            Quota::Services => ENV_MAX_SERVICES,
            Quota::Routes => ENV_MAX_ROUTES,
            Quota::Instances => ENV_MAX_INSTANCES,
            Quota::Drains => ENV_MAX_DRAINS,
            Quota::Ambassadors => ENV_MAX_AMBASSADORS,
        }
    }
}

/// A change refused because it would take the table past a quota.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", self.describe())]
pub struct Exceeded {
    pub quota: Quota,
    /// The limit in force.
    pub limit: usize,
    /// What the refused change was for.
    pub subject: Subject,
}

/// What a refused change was for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subject {
    /// An instance, route or drain of this service.
    Service(ServiceName),
    /// The report of this ambassador.
    Ambassador(InstanceId),
}

impl Exceeded {
    fn describe(&self) -> String {
        let service = match &self.subject {
            Subject::Service(s) => s.as_str(),
            Subject::Ambassador(id) => id.as_str(),
        };
        let what = match self.quota {
            Quota::InstancesPerService => {
                format!("service {service} has {} live instances", self.limit)
            }
            Quota::Services => format!("{} services have live instances", self.limit),
            Quota::Routes => format!("{} routes are set", self.limit),
            Quota::Instances => format!("{} instances are live", self.limit),
            Quota::Drains => format!("{} drains are in place", self.limit),
            Quota::Ambassadors => format!("{} ambassadors are reporting", self.limit),
        };
        let refused = match self.quota {
            Quota::Routes => format!("a route for {service} is refused"),
            Quota::Drains => format!("a new drain in {service} is refused"),
            Quota::Ambassadors => format!("the report of ambassador {service} is refused"),
            _ => format!("a new instance of {service} is refused"),
        };
        format!(
            "quota {} reached: {what}, the most {} allows, so {refused}; raise {} if the \
             fleet really is this large",
            self.quota.name(),
            self.quota.variable(),
            self.quota.variable(),
        )
    }
}

/// What the table holds, as far as an instance's quotas care.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Occupancy {
    /// Live instances of the service the new instance joins.
    pub in_service: usize,
    /// Services with live instances.
    pub services: usize,
    /// Live instances in all.
    pub instances: usize,
}

impl Quotas {
    /// Whether one more (new) instance of `service` fits. The service's own limit is checked
    /// first, then the number of services (when the instance would start a new one), then the
    /// total.
    pub fn admit_instance(&self, service: &ServiceName, now: Occupancy) -> Result<(), Exceeded> {
        let refuse = |quota, limit| {
            Err(Exceeded {
                quota,
                limit,
                subject: Subject::Service(service.clone()),
            })
        };
        if now.in_service >= self.instances_per_service {
            return refuse(Quota::InstancesPerService, self.instances_per_service);
        }
        if now.in_service == 0 && now.services >= self.services {
            return refuse(Quota::Services, self.services);
        }
        if now.instances >= self.instances {
            return refuse(Quota::Instances, self.instances);
        }
        Ok(())
    }

    /// Whether one more (new) route, for `service`, fits beside `routes` existing ones.
    pub fn admit_route(&self, service: &ServiceName, routes: usize) -> Result<(), Exceeded> {
        if routes >= self.routes {
            return Err(Exceeded {
                quota: Quota::Routes,
                limit: self.routes,
                subject: Subject::Service(service.clone()),
            });
        }
        Ok(())
    }

    /// Whether one more drain in `service` fits, with `drains` in place.
    pub fn admit_drain(&self, service: &ServiceName, drains: usize) -> Result<(), Exceeded> {
        if drains >= self.drains {
            return Err(Exceeded {
                quota: Quota::Drains,
                limit: self.drains,
                subject: Subject::Service(service.clone()),
            });
        }
        Ok(())
    }

    /// Whether the report of a new ambassador `id` fits beside `ambassadors` kept ones.
    pub fn admit_ambassador(&self, id: &InstanceId, ambassadors: usize) -> Result<(), Exceeded> {
        if ambassadors >= self.ambassadors {
            return Err(Exceeded {
                quota: Quota::Ambassadors,
                limit: self.ambassadors,
                subject: Subject::Ambassador(id.clone()),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMALL: Quotas = Quotas {
        instances_per_service: 3,
        services: 2,
        routes: 1,
        instances: 5,
        drains: 1,
        ambassadors: 2,
    };

    fn svc() -> ServiceName {
        "emitter".parse().unwrap()
    }

    fn occupancy(in_service: usize, services: usize, instances: usize) -> Occupancy {
        Occupancy {
            in_service,
            services,
            instances,
        }
    }

    fn refused(o: Occupancy) -> Option<Quota> {
        SMALL.admit_instance(&svc(), o).err().map(|e| e.quota)
    }

    #[test]
    fn each_instance_quota_refuses_growth_past_it() {
        assert_eq!(refused(occupancy(2, 2, 4)), None);
        assert_eq!(
            refused(occupancy(3, 2, 4)),
            Some(Quota::InstancesPerService)
        );
        // A new service when there are as many as allowed; joining an existing one is fine.
        assert_eq!(refused(occupancy(0, 2, 3)), Some(Quota::Services));
        assert_eq!(refused(occupancy(1, 2, 3)), None);
        assert_eq!(refused(occupancy(1, 2, 5)), Some(Quota::Instances));
        // The most specific quota is named first.
        assert_eq!(
            refused(occupancy(3, 9, 9)),
            Some(Quota::InstancesPerService)
        );
    }

    #[test]
    fn route_quota() {
        assert!(SMALL.admit_route(&svc(), 0).is_ok());
        let e = SMALL.admit_route(&svc(), 1).unwrap_err();
        assert_eq!((e.quota, e.limit), (Quota::Routes, 1));
    }

    #[test]
    fn errors_name_the_quota_its_variable_and_the_service() {
        let e = SMALL
            .admit_instance(&svc(), occupancy(3, 1, 3))
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "quota instances_per_service reached: service emitter has 3 live instances, the \
             most BAKER_MAX_INSTANCES_PER_SERVICE allows, so a new instance of emitter is \
             refused; raise BAKER_MAX_INSTANCES_PER_SERVICE if the fleet really is this large"
        );
        let e = SMALL.admit_route(&svc(), 1).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("quota routes reached: 1 routes are set, the most BAKER_MAX_ROUTES"),
            "{e}"
        );
    }

    mod registry {
        use super::*;
        use crate::metrics::Metrics;
        use crate::registry::{Refused, Registry, RouteError, WriteError};
        use crate::routes::RouteStore;
        use baker_client::model::{InstanceId, Route, ValidSpec};
        use std::sync::Arc;

        fn spec() -> ValidSpec {
            ValidSpec {
                address: "10.0.0.1".parse().unwrap(),
                port: 80,
                version: "1".parse().unwrap(),
                weight: 100,
                tags: vec![],
                ttl_ms: 60_000,
                node: None,
                zone: None,
            }
        }

        fn registry(quotas: Quotas) -> (Registry, tempfile::TempDir) {
            let dir = tempfile::tempdir().unwrap();
            let store = RouteStore::open(dir.path()).unwrap();
            let metrics = Arc::new(Metrics::new());
            let r = Registry::with_quotas(
                store,
                Default::default(),
                Default::default(),
                metrics,
                64,
                quotas,
            );
            (r, dir)
        }

        async fn put(r: &Registry, service: &str, id: &str) -> Result<(), Quota> {
            let (s, i): (ServiceName, InstanceId) = (service.parse().unwrap(), id.parse().unwrap());
            match r.register(&s, &i, spec()).await {
                Ok(_) => Ok(()),
                Err(WriteError::Quota(e)) => Err(e.quota),
                Err(other) => panic!("{other}"),
            }
        }

        #[tokio::test]
        async fn a_full_table_refuses_new_instances_and_still_takes_heartbeats() {
            let (r, _dir) = registry(SMALL);
            for id in ["1", "2", "3"] {
                put(&r, "a", id).await.unwrap();
            }
            assert_eq!(put(&r, "a", "4").await, Err(Quota::InstancesPerService));
            put(&r, "a", "3").await.unwrap();
            put(&r, "b", "1").await.unwrap();
            assert_eq!(put(&r, "c", "1").await, Err(Quota::Services));
            put(&r, "b", "2").await.unwrap();
            assert_eq!(put(&r, "b", "3").await, Err(Quota::Instances));
            // The refusals changed nothing.
            let services = r.services().services;
            assert_eq!(services.values().map(Vec::len).sum::<usize>(), 5);
            assert!(!services.contains_key("c"));
            // Room made, room taken.
            let (a, three) = ("a".parse().unwrap(), "3".parse().unwrap());
            r.unregister(&a, &three).await.unwrap().unwrap();
            put(&r, "b", "3").await.unwrap();
            let text = r.metrics().encode();
            for needle in [
                "baker_directory_quota_refusals_total{quota=\"instances_per_service\"} 1",
                "baker_directory_quota_refusals_total{quota=\"services\"} 1",
                "baker_directory_quota_refusals_total{quota=\"instances\"} 1",
            ] {
                assert!(text.contains(needle), "{needle} missing from {text}");
            }
        }

        #[tokio::test]
        async fn docker_instances_past_a_quota_are_left_out_and_the_rest_registered() {
            let (r, _dir) = registry(SMALL);
            let listed = (0..5)
                .map(|i| ("d".parse().unwrap(), i.to_string().parse().unwrap(), spec()))
                .collect();
            r.sync_source(listed);
            r.reconcile_once().await.unwrap();
            assert_eq!(r.services().services["d"].len(), 3);
            let (d, nine) = ("d".parse().unwrap(), "9".parse().unwrap());
            let refused = r.upsert(&d, &nine, spec()).unwrap_err();
            assert!(matches!(refused, Refused::Quota(_)), "{refused}");
        }

        #[tokio::test]
        async fn a_new_route_past_the_quota_is_refused_and_existing_ones_still_change() {
            let (r, dir) = registry(SMALL);
            let route = |v: &str| -> Route { [(v.parse().unwrap(), 100)].into() };
            let (a, b): (ServiceName, ServiceName) = ("a".parse().unwrap(), "b".parse().unwrap());
            r.set_route(&a, Some(route("1"))).await.unwrap();
            match r.set_route(&b, Some(route("1"))).await {
                Err(RouteError::Quota(e)) => assert_eq!(e.quota, Quota::Routes),
                other => panic!("{other:?}"),
            }
            r.set_route(&a, Some(route("2"))).await.unwrap();
            assert_eq!(r.routes().routes.len(), 1);
            let reloaded = RouteStore::open(dir.path()).unwrap().load().unwrap();
            assert_eq!(reloaded.keys().collect::<Vec<_>>(), [&a]);
        }
    }
}
