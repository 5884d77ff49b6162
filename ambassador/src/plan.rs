//! Which servers each backend should have, at which weight: a pure function of the directory's
//! state and the configured services.
//!
//! With no route, every instance serves in proportion to its own weight. With a route
//! (`{"1": 90, "2": 10}`, or `{"monolith@*": 70, "barker@*": 30}` naming other services) each
//! target receives its percentage of the traffic whatever its number of instances, shared
//! among its instances by their weights; a target with no live instance gives its share to the
//! other targets, and versions of the service the route does not name get weight 0 (kept as
//! servers, so that a later route change is a weight change). The instances of another
//! service that belong to a target are servers of the backend too (named `service:id`), at
//! weight 0 while the target's share is 0.
//!
//! An instance an operator drained (its `state` is `draining`) stays a server, at weight 0 and
//! marked to drain: it takes no new requests, and the weights above are shared among the
//! others, so a route's split holds while one of its instances is out.
//!
//! With a zone (`BAKER_ZONE`), each share is split again between the instances of the
//! ambassador's zone and the others by the rule in [`crate::locality`], and every instance of
//! another zone also has a backup twin (`failover:service:id`) that takes the traffic the
//! moment the zone's last server is down, before the directory says so.
//!
//! A route whose targets all lack live instances would leave no server with a weight: the
//! service then falls back to all its own live instances by their own weights, as with no
//! route ([`route_falls_back`]), until an instance of a target appears. [`fallbacks`] says
//! which services are in that state, for the log and metrics; [`watched`] which services'
//! instances the plan reads.

use std::borrow::Borrow;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use baker_client::model::{
    route_falls_back, Address, Instance, InstanceId, Route, ServiceName, State, Target, Version,
    MAX_WEIGHT,
};
use serde::Serialize;

use crate::config::ServiceRoute;
use crate::locality::{self, Locality};

/// The tag that makes an instance a backup: it serves only while no other server of its
/// backend is up.
pub const BACKUP_TAG: &str = "backup";

/// HAProxy's name of a server, unique in its backend: the instance id for an instance of the
/// backend's own service, `service:id` for an instance of another service (a route's share),
/// `backup:service:id` for a backup instance, and `failover:service:id` for the backup twin of
/// an instance of another zone. Names cannot hold `:`, so the three forms
/// never collide; and since HAProxy cannot turn a server into a backup at run time, an
/// instance that becomes one is a new server (added first, the old one drained).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct ServerName(String);

impl ServerName {
    /// The server of `instance` in the backend of `backend`.
    pub fn of(backend: &ServiceName, instance: &Instance) -> ServerName {
        if is_backup(instance) {
            ServerName(format!("backup:{}:{}", instance.service, instance.id))
        } else if instance.service == *backend {
            ServerName(instance.id.to_string())
        } else {
            ServerName(format!("{}:{}", instance.service, instance.id))
        }
    }

    /// The backup twin of `instance`, an instance of another zone than the ambassador's.
    pub fn failover_of(instance: &Instance) -> ServerName {
        ServerName(format!(
            "{FAILOVER_PREFIX}{}:{}",
            instance.service, instance.id
        ))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// How the names of failover twins start.
const FAILOVER_PREFIX: &str = "failover:";

/// The instance (`service`, `id`) the server named `name` is the failover twin of, when it is
/// one.
pub fn failover_instance(name: &str) -> Option<(&str, &str)> {
    name.strip_prefix(FAILOVER_PREFIX)?.split_once(':')
}

impl From<InstanceId> for ServerName {
    /// An instance of the backend's own service.
    fn from(id: InstanceId) -> Self {
        ServerName(id.into())
    }
}

impl Borrow<str> for ServerName {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ServerName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl PartialEq<str> for ServerName {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

impl PartialEq<&str> for ServerName {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

/// Whether `instance` is tagged [`BACKUP_TAG`].
pub fn is_backup(instance: &Instance) -> bool {
    instance.tags.iter().any(|t| t.as_str() == BACKUP_TAG)
}

/// One server HAProxy should run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DesiredServer {
    /// HAProxy's server name (a safe HAProxy identifier by construction).
    pub name: ServerName,
    /// The service the instance belongs to.
    pub service: ServiceName,
    pub address: Address,
    pub port: u16,
    /// HAProxy weight, 0..=256.
    pub weight: u16,
    pub version: Version,
    /// A backup server: used only while no other server of the backend is up.
    pub backup: bool,
    /// Drained by an operator: kept, but HAProxy sends it no new request (`state drain`).
    pub drain: bool,
    /// The instance runs in the ambassador's zone.
    pub local: bool,
}

#[cfg(test)]
impl DesiredServer {
    /// A server of the backend's own service `svc`, version 1, for tests.
    pub(crate) fn sample(name: &str, address: &str, port: u16, weight: u16) -> DesiredServer {
        DesiredServer {
            name: ServerName::from(name.parse::<InstanceId>().unwrap()),
            service: "svc".parse().unwrap(),
            address: address.parse().unwrap(),
            port,
            weight,
            version: "1".parse().unwrap(),
            backup: false,
            drain: false,
            local: false,
        }
    }
}

/// A backend's servers by name.
pub type Backend = BTreeMap<ServerName, DesiredServer>;

/// Every configured service's backend, by service name.
pub type Desired = BTreeMap<ServiceName, Backend>;

/// Plans every configured service's servers from the directory's state, preferring the
/// instances of `locality`'s zone when the ambassador has one.
pub fn plan(state: &State, services: &[ServiceRoute], locality: Option<&Locality>) -> Desired {
    let mut desired = Desired::new();
    for svc in services {
        let route = state.routes.get(&svc.name);
        let (serving, drained): (Vec<&Instance>, Vec<&Instance>) =
            candidates(state, &svc.name, route)
                .into_iter()
                .partition(|i| i.state.is_up());
        let (active, failover) = match locality {
            None => (weights(&svc.name, &serving, route), None),
            Some(l) => {
                let w = locality::weights(l, &svc.name, &serving, route);
                (w.active, Some(w.failover))
            }
        };
        let mut backend = Backend::new();
        let mut add = |name: ServerName, i: &Instance, weight: u16, backup: bool| {
            let server = DesiredServer {
                name: name.clone(),
                service: i.service.clone(),
                address: i.address.clone(),
                port: i.port,
                weight,
                version: i.version.clone(),
                backup,
                drain: !i.state.is_up(),
                local: locality.is_some_and(|l| l.is_local(i)),
            };
            backend.insert(name, server);
        };
        let all = serving.iter().enumerate().map(|(pos, i)| {
            let twin = failover.as_ref().map(|f| f[pos]);
            (*i, active[pos], twin)
        });
        let all = all.chain(
            drained
                .iter()
                .map(|i| (*i, 0, failover.as_ref().map(|_| 0))),
        );
        for (i, weight, twin) in all {
            add(ServerName::of(&svc.name, i), i, weight, is_backup(i));
            // Every instance of another zone waits as a backup too, for the moment its zone
            // has no server left (a backup-tagged one is a backup already).
            if let (Some(w), Some(l)) = (twin, locality) {
                if !l.is_local(i) && !is_backup(i) {
                    add(ServerName::failover_of(i), i, w, true);
                }
            }
        }
        desired.insert(svc.name.clone(), backend);
    }
    desired
}

/// Every configured service, and whether its route falls back to all its live instances
/// because none of the targets it sends traffic to has a live one.
pub fn fallbacks(state: &State, services: &[ServiceRoute]) -> BTreeMap<String, bool> {
    services
        .iter()
        .map(|svc| {
            let route = state.routes.get(&svc.name);
            let mut instances = candidates(state, &svc.name, route);
            instances.retain(|i| i.state.is_up());
            let falls_back = route
                .is_some_and(|route| route_falls_back(route, &svc.name, instances.iter().copied()));
            (svc.name.to_string(), falls_back)
        })
        .collect()
}

/// The services whose instances the ambassador needs to plan `services`: the services
/// themselves, and every other service their routes name.
pub fn watched(state: &State, services: &[ServiceRoute]) -> BTreeSet<ServiceName> {
    let mut out: BTreeSet<ServiceName> = services.iter().map(|s| s.name.clone()).collect();
    for svc in services {
        if let Some(route) = state.routes.get(&svc.name) {
            out.extend(route.other_services(&svc.name).into_iter().cloned());
        }
    }
    out
}

/// The instances a backend may have: every usable instance of its own service, and those of
/// other services that belong to one of its route's targets (at 0 % too, so that moving
/// traffic to them later is a weight change, not a new server).
fn candidates<'a>(
    state: &'a State,
    service: &ServiceName,
    route: Option<&Route>,
) -> Vec<&'a Instance> {
    let mut out = usable(state, service);
    if let Some(route) = route {
        for other in route.other_services(service) {
            out.extend(
                usable(state, other)
                    .into_iter()
                    .filter(|i| route.target_of(service, i).is_some()),
            );
        }
    }
    out
}

/// A service's instances that can be planned: all of them (their names and addresses are
/// valid by type) but any with port 0, the one value of an instance HAProxy would misread.
fn usable<'a>(state: &'a State, service: &ServiceName) -> Vec<&'a Instance> {
    state
        .services
        .get(service)
        .map(|v| v.iter().filter(|i| i.port != 0).collect())
        .unwrap_or_default()
}

/// HAProxy weights for `instances` (same order) in the backend of `routed`, following `route`
/// if there is one and it does not fall back. Instances of other services are those of the
/// route's targets; with no route to follow they get weight 0.
pub fn weights(routed: &ServiceName, instances: &[&Instance], route: Option<&Route>) -> Vec<u16> {
    match groups(routed, instances, route) {
        Some(groups) => scale(instances, &groups),
        None => instances
            .iter()
            .map(|i| {
                if i.service == *routed {
                    i.weight.min(MAX_WEIGHT)
                } else {
                    0
                }
            })
            .collect(),
    }
}

/// A share of a backend's traffic and the instances (positions in the planned list) that
/// carry it, by their weights.
pub(crate) type Group = (f64, Vec<usize>);

/// The groups a route splits `instances` into: each target with live instances, its
/// percentage and its instances. `None` when there is no route to follow (none, or one that
/// falls back): then the service's own instances share the traffic by their weights.
pub(crate) fn groups(
    routed: &ServiceName,
    instances: &[&Instance],
    route: Option<&Route>,
) -> Option<Vec<Group>> {
    let route = route.filter(|r| !route_falls_back(r, routed, instances.iter().copied()))?;
    let mut live: BTreeMap<&Target, Group> = BTreeMap::new();
    for (idx, i) in instances.iter().enumerate() {
        if let Some((target, pct)) = route.target_of(routed, i) {
            if pct > 0 {
                live.entry(target)
                    .or_insert((f64::from(pct), Vec::new()))
                    .1
                    .push(idx);
            }
        }
    }
    Some(live.into_values().collect())
}

/// HAProxy weights that give each group its share of the traffic (renormalised over the
/// groups), shared among its instances by their own weights; instances in no group get 0.
pub(crate) fn scale(instances: &[&Instance], groups: &[Group]) -> Vec<u16> {
    let mut out = vec![0u16; instances.len()];
    let total_pct: f64 = groups.iter().map(|(p, _)| p).sum();
    if total_pct <= 0.0 {
        return out;
    }
    // The real-valued weight of each instance (all of them sum to 1).
    let mut real = vec![0f64; instances.len()];
    for (pct, members) in groups {
        let share = pct / total_pct;
        let sum_w: f64 = members
            .iter()
            .map(|&m| f64::from(instances[m].weight.max(1)))
            .sum();
        for &m in members {
            real[m] = share * f64::from(instances[m].weight.max(1)) / sum_w;
        }
    }
    // Scale so the heaviest instance gets the maximum weight: the most resolution HAProxy has.
    let max = real.iter().cloned().fold(0f64, f64::max);
    let k = f64::from(MAX_WEIGHT) / max;
    for (pct, members) in groups {
        // Round each group's total first, then split it among its instances by largest
        // remainder, so that rounding errors do not add up across a group's instances.
        let share = pct / total_pct;
        let target = (share * k).round().max(members.len() as f64);
        let exact: Vec<f64> = {
            let sum: f64 = members.iter().map(|&m| real[m]).sum();
            members.iter().map(|&m| real[m] / sum * target).collect()
        };
        let mut ints: Vec<u16> = exact.iter().map(|x| x.floor() as u16).collect();
        let mut left = target as i64 - ints.iter().map(|&x| i64::from(x)).sum::<i64>();
        let mut order: Vec<usize> = (0..members.len()).collect();
        order.sort_by(|&a, &b| {
            let ra = exact[a] - exact[a].floor();
            let rb = exact[b] - exact[b].floor();
            rb.total_cmp(&ra).then(a.cmp(&b))
        });
        for &o in order.iter().cycle().take(members.len() * 2) {
            if left <= 0 {
                break;
            }
            if ints[o] < MAX_WEIGHT {
                ints[o] += 1;
                left -= 1;
            }
        }
        for (pos, &m) in members.iter().enumerate() {
            out[m] = ints[pos].clamp(1, MAX_WEIGHT);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Mode;

    fn inst(id: &str, version: &str, weight: u16) -> Instance {
        Instance {
            version: version.parse().unwrap(),
            weight,
            ..Instance::sample("svc", id)
        }
    }

    fn route(pairs: &[(&str, u8)]) -> Route {
        pairs
            .iter()
            .map(|(k, v)| (k.parse().unwrap(), *v))
            .collect()
    }

    /// Each version's share of the total weight, in percent.
    fn shares(instances: &[Instance], w: &[u16]) -> BTreeMap<String, f64> {
        let total: f64 = w.iter().map(|&x| f64::from(x)).sum();
        let mut out = BTreeMap::new();
        for (i, &x) in instances.iter().zip(w) {
            *out.entry(i.version.to_string()).or_insert(0.0) += f64::from(x) * 100.0 / total;
        }
        out
    }

    #[test]
    fn no_route_uses_instance_weights() {
        let v = [inst("a", "1", 100), inst("b", "1", 50), inst("c", "2", 256)];
        let refs: Vec<_> = v.iter().collect();
        assert_eq!(
            weights(&"svc".parse().unwrap(), &refs, None),
            vec![100, 50, 256]
        );
    }

    #[test]
    fn canary_split_ignores_instance_counts() {
        for (n1, n2) in [(1, 1), (1, 9), (9, 1), (3, 2), (10, 10), (1, 30), (50, 1)] {
            let mut v: Vec<Instance> = (0..n1).map(|i| inst(&format!("a{i}"), "1", 100)).collect();
            v.extend((0..n2).map(|i| inst(&format!("b{i}"), "2", 100)));
            let refs: Vec<_> = v.iter().collect();
            let w = weights(
                &"svc".parse().unwrap(),
                &refs,
                Some(&route(&[("1", 90), ("2", 10)])),
            );
            assert!(w.iter().all(|&x| (1..=256).contains(&x)), "{w:?}");
            let s = shares(&v, &w);
            assert!((s["1"] - 90.0).abs() <= 1.0, "{n1}/{n2}: {s:?} {w:?}");
            assert!((s["2"] - 10.0).abs() <= 1.0, "{n1}/{n2}: {s:?} {w:?}");
        }
    }

    #[test]
    fn canary_respects_instance_weights_within_a_version() {
        let v = [inst("a", "1", 100), inst("b", "1", 50), inst("c", "2", 100)];
        let refs: Vec<_> = v.iter().collect();
        let w = weights(
            &"svc".parse().unwrap(),
            &refs,
            Some(&route(&[("1", 50), ("2", 50)])),
        );
        let s = shares(&v, &w);
        assert!((s["1"] - 50.0).abs() <= 1.0, "{w:?}");
        assert!(
            (f64::from(w[0]) / f64::from(w[1]) - 2.0).abs() < 0.05,
            "{w:?}"
        );
    }

    #[test]
    fn missing_version_gives_its_share_away_and_unnamed_get_none() {
        let v = [
            inst("a", "1", 100),
            inst("b", "3", 100),
            inst("c", "1", 100),
        ];
        let refs: Vec<_> = v.iter().collect();
        let w = weights(
            &"svc".parse().unwrap(),
            &refs,
            Some(&route(&[("1", 90), ("2", 10)])),
        );
        assert_eq!(w[1], 0, "version 3 is not named");
        assert!(w[0] > 0 && w[0] == w[2], "{w:?}");
        let w = weights(
            &"svc".parse().unwrap(),
            &refs,
            Some(&route(&[("1", 0), ("3", 100)])),
        );
        assert_eq!((w[0], w[2]), (0, 0));
        assert!(w[1] > 0);
    }

    #[test]
    fn a_route_with_no_live_version_falls_back_to_every_live_instance() {
        let v = [inst("a", "1", 100), inst("b", "2", 50), inst("c", "1", 256)];
        let refs: Vec<_> = v.iter().collect();
        for r in [
            route(&[("3", 100)]),
            route(&[("1", 0), ("2", 0), ("3", 100)]),
        ] {
            assert_eq!(
                weights(&"svc".parse().unwrap(), &refs, Some(&r)),
                vec![100, 50, 256],
                "{r:?}"
            );
        }
        // As soon as one routed version is live, the route applies again.
        let mut back = v.to_vec();
        back.push(inst("d", "3", 100));
        let refs: Vec<_> = back.iter().collect();
        assert_eq!(
            weights(&"svc".parse().unwrap(), &refs, Some(&route(&[("3", 100)]))),
            vec![0, 0, 0, 256]
        );
    }

    fn of(service: &str, id: &str, version: &str, weight: u16) -> Instance {
        Instance {
            version: version.parse().unwrap(),
            weight,
            ..Instance::sample(service, id)
        }
    }

    fn flat(pairs: &[(&str, u64)]) -> Route {
        let splits = pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect();
        baker_client::model::validate_route_of(&"svc".parse().unwrap(), &splits).unwrap()
    }

    /// Each service's share of the total weight, in percent.
    fn service_shares(instances: &[&Instance], w: &[u16]) -> BTreeMap<String, f64> {
        let total: f64 = w.iter().map(|&x| f64::from(x)).sum();
        let mut out = BTreeMap::new();
        for (i, &x) in instances.iter().zip(w) {
            *out.entry(i.service.to_string()).or_insert(0.0) += f64::from(x) * 100.0 / total;
        }
        out
    }

    fn svc_route(name: &str) -> ServiceRoute {
        ServiceRoute {
            name: name.parse().unwrap(),
            port: None,
            mode: Mode::Http,
            options: Default::default(),
        }
    }

    #[test]
    fn a_split_across_services_ignores_instance_counts() {
        let svc: ServiceName = "svc".parse().unwrap();
        for (n1, n2) in [(1, 1), (1, 9), (9, 1), (3, 2), (20, 1), (1, 40)] {
            let mut v: Vec<Instance> = (0..n1)
                .map(|i| of("svc", &format!("a{i}"), "1", 100))
                .collect();
            v.extend((0..n2).map(|i| of("barker", &format!("b{i}"), "3", 100)));
            let refs: Vec<_> = v.iter().collect();
            let w = weights(&svc, &refs, Some(&flat(&[("svc@*", 70), ("barker@*", 30)])));
            let s = service_shares(&refs, &w);
            assert!((s["svc"] - 70.0).abs() <= 1.0, "{n1}/{n2}: {s:?} {w:?}");
            assert!((s["barker"] - 30.0).abs() <= 1.0, "{n1}/{n2}: {s:?} {w:?}");
            // The flip: every request to barker, the monolith's servers kept at weight 0.
            let w = weights(&svc, &refs, Some(&flat(&[("svc@*", 0), ("barker@*", 100)])));
            assert!(
                w[..n1].iter().all(|&x| x == 0) && w[n1..].iter().all(|&x| x > 0),
                "{w:?}"
            );
        }
    }

    #[test]
    fn a_version_of_another_service_gets_its_share_and_only_its_instances() {
        let mut state = State::default();
        state.services.insert(
            "svc".parse().unwrap(),
            vec![of("svc", "a", "1", 100), of("svc", "b", "2", 100)],
        );
        state.services.insert(
            "barker".parse().unwrap(),
            vec![
                of("barker", "x", "2", 100),
                of("barker", "y", "3", 100),
                of("barker", "z", "2", 50),
            ],
        );
        state
            .routes
            .insert("svc".parse().unwrap(), flat(&[("1", 90), ("barker@2", 10)]));
        let d = plan(&state, &[svc_route("svc")], None);
        let names: Vec<_> = d["svc"].keys().map(ServerName::as_str).collect();
        assert_eq!(
            names,
            ["a", "b", "barker:x", "barker:z"],
            "barker 3 is no target"
        );
        let b = &d["svc"];
        assert_eq!(b["b"].weight, 0, "version 2 of svc is not named");
        let total: f64 = b.values().map(|s| f64::from(s.weight)).sum();
        let barker = f64::from(b["barker:x"].weight + b["barker:z"].weight);
        assert!((barker * 100.0 / total - 10.0).abs() <= 1.0, "{b:?}");
        assert!(
            (f64::from(b["barker:x"].weight) / f64::from(b["barker:z"].weight) - 2.0).abs() < 0.2,
            "{b:?}"
        );
        assert_eq!(b["barker:x"].service, "barker");
        assert_eq!(
            watched(&state, &[svc_route("svc"), svc_route("other")])
                .iter()
                .map(ServiceName::as_str)
                .collect::<Vec<_>>(),
            ["barker", "other", "svc"]
        );
    }

    #[test]
    fn a_target_service_with_no_live_instance_gives_its_share_back() {
        let svc: ServiceName = "svc".parse().unwrap();
        let a = of("svc", "a", "1", 100);
        let refs = vec![&a];
        let route = flat(&[("svc@*", 70), ("barker@*", 30)]);
        assert!(weights(&svc, &refs, Some(&route))[0] > 0);
        // Nothing of the route is live: the service falls back to its own instances.
        let old = of("svc", "o", "9", 40);
        let refs = vec![&old];
        let route = flat(&[("1", 50), ("barker@*", 50)]);
        assert_eq!(weights(&svc, &refs, Some(&route)), [40]);
        let mut state = State::default();
        state.services.insert(svc.clone(), vec![old.clone()]);
        state.routes.insert(svc.clone(), route);
        assert!(fallbacks(&state, &[svc_route("svc")])["svc"]);
        // Barker comes: it takes everything (version 1 of svc is still not live).
        state
            .services
            .insert("barker".parse().unwrap(), vec![of("barker", "x", "1", 100)]);
        assert!(!fallbacks(&state, &[svc_route("svc")])["svc"]);
        let d = plan(&state, &[svc_route("svc")], None);
        assert_eq!(
            (d["svc"]["o"].weight, d["svc"]["barker:x"].weight),
            (0, 256)
        );
    }

    #[test]
    fn fallbacks_name_every_configured_service() {
        let mut state = State::default();
        state
            .services
            .insert("svc".parse().unwrap(), vec![inst("a", "1", 100)]);
        state
            .services
            .insert("ok".parse().unwrap(), vec![inst("b", "2", 100)]);
        state
            .routes
            .insert("svc".parse().unwrap(), route(&[("3", 100)]));
        state
            .routes
            .insert("ok".parse().unwrap(), route(&[("2", 100)]));
        state
            .routes
            .insert("empty".parse().unwrap(), route(&[("2", 100)]));
        let services: Vec<ServiceRoute> = ["svc", "ok", "empty", "plain"]
            .into_iter()
            .map(|name| ServiceRoute {
                name: name.parse().unwrap(),
                port: None,
                mode: Mode::Http,
                options: Default::default(),
            })
            .collect();
        let f = fallbacks(&state, &services);
        assert_eq!(
            f.into_iter().filter(|(_, on)| *on).collect::<Vec<_>>(),
            [("svc".to_owned(), true)]
        );
        assert_eq!(plan(&state, &services, None)["svc"]["a"].weight, 100);
    }

    #[test]
    fn plan_builds_backends_for_configured_services_only() {
        let mut state = State::default();
        state.services.insert(
            "svc".parse().unwrap(),
            vec![
                inst("a", "1", 100),
                Instance {
                    port: 0,
                    ..inst("b", "1", 100)
                },
            ],
        );
        state
            .services
            .insert("other".parse().unwrap(), vec![inst("x", "1", 100)]);
        let services = vec![
            ServiceRoute {
                name: "svc".parse().unwrap(),
                port: Some(8000),
                mode: Mode::Http,
                options: Default::default(),
            },
            ServiceRoute {
                name: "none".parse().unwrap(),
                port: Some(8001),
                mode: Mode::Tcp,
                options: Default::default(),
            },
        ];
        let d = plan(&state, &services, None);
        assert_eq!(d.len(), 2);
        assert_eq!(d["svc"].keys().collect::<Vec<_>>(), ["a"], "port 0 skipped");
        assert_eq!(d["svc"]["a"].weight, 100);
        assert!(d["none"].is_empty());
    }

    #[test]
    fn with_a_zone_the_other_zones_instances_have_failover_twins() {
        use crate::locality::Locality;
        let zoned = |id: &str, zone: &str| Instance {
            zone: Some(zone.parse().unwrap()),
            ..inst(id, "1", 100)
        };
        let mut state = State::default();
        state.services.insert(
            "svc".parse().unwrap(),
            vec![
                zoned("a1", "a"),
                zoned("b1", "b"),
                Instance {
                    tags: vec!["backup".parse().unwrap()],
                    ..zoned("b2", "b")
                },
                Instance {
                    state: baker_client::maintenance::InstanceState::Draining,
                    ..zoned("b3", "b")
                },
            ],
        );
        let l = Locality::new("a".parse().unwrap());
        let d = &plan(&state, &[svc_route("svc")], Some(&l))["svc"];
        let got: Vec<(&str, u16, bool, bool, bool)> = d
            .values()
            .map(|s| (s.name.as_str(), s.weight, s.backup, s.drain, s.local))
            .collect();
        assert_eq!(
            got,
            [
                ("a1", 256, false, false, true),
                ("b1", 0, false, false, false),
                ("b3", 0, false, true, false),
                ("backup:svc:b2", 256, true, false, false),
                ("failover:svc:b1", 256, true, false, false),
                ("failover:svc:b3", 0, true, true, false),
            ]
        );
        assert_eq!(failover_instance("failover:svc:b1"), Some(("svc", "b1")));
        assert_eq!(failover_instance("b1"), None);
        // Without a zone, no twin.
        assert_eq!(plan(&state, &[svc_route("svc")], None)["svc"].len(), 4);
    }

    #[test]
    fn a_drained_instance_stays_at_weight_0_and_the_split_holds_without_it() {
        use baker_client::maintenance::InstanceState;
        let drained = |i: Instance| Instance {
            state: InstanceState::Draining,
            ..i
        };
        let mut state = State::default();
        state.services.insert(
            "svc".parse().unwrap(),
            vec![
                drained(inst("a", "1", 100)),
                inst("b", "1", 100),
                inst("c", "2", 100),
                drained(inst("d", "3", 100)),
            ],
        );
        state.routes.insert(
            "svc".parse().unwrap(),
            route(&[("1", 50), ("2", 40), ("3", 10)]),
        );
        let services = vec![ServiceRoute {
            name: "svc".parse().unwrap(),
            port: Some(8000),
            mode: Mode::Http,
            options: Default::default(),
        }];
        let d = &plan(&state, &services, None)["svc"];
        let got: Vec<(&str, u16, bool)> = d
            .values()
            .map(|s| (s.name.as_str(), s.weight, s.drain))
            .collect();
        // b carries all of version 1's share, c all the rest (version 3 has no serving
        // instance): 50 to 40 is 256 to 205.
        assert_eq!(
            got,
            [
                ("a", 0, true),
                ("b", 256, false),
                ("c", 205, false),
                ("d", 0, true)
            ]
        );
    }
}
