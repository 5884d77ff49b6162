//! Zone affinity: an ambassador with a zone (`BAKER_ZONE`) keeps its traffic in its zone while
//! the zone can serve it, and sends it elsewhere without failing a request when it cannot.
//!
//! The rule, applied to each share of a backend's traffic (the whole backend with no route,
//! each target of a route otherwise, so that a canary split holds inside the zone):
//!
//! - the zone's capacity is the summed weight of the share's serving instances in the zone;
//!   its *even share* is the summed weight of all of the share's instances divided by the
//!   number of zones they run in (instances with no zone count as one more zone);
//! - the zone keeps `min(1, overprovision × capacity ÷ even share)` of the traffic, and the
//!   rest goes to the instances of the other zones by their weights. With the default
//!   overprovisioning factor of 140 % (Envoy's), a zone keeps everything while it holds at
//!   least 1/1.4 ≈ 71 % of an even share, and less in proportion below;
//! - a zone with no serving instance keeps nothing.
//!
//! These are weights, changed over HAProxy's runtime API like any other. They follow the
//! directory, which learns of a dead instance only when its registrar's probes fail (or its
//! container dies); in between, HAProxy stops sending to a server it sees failing, and when
//! the zone's last server is down the *failover twins* take over: every instance of another
//! zone is also a backup server (`failover:service:id`, weighted as if the zone were empty),
//! and `option allbackups` spreads the traffic over all of them. So the zone's last instance
//! dying fails no request for locality.

use std::collections::BTreeSet;

use baker_client::model::{Instance, Route, ServiceName, Zone};

use crate::plan::{self, is_backup, Group};

/// The default overprovisioning factor, in percent.
pub const DEFAULT_OVERPROVISION: u32 = 140;
/// The accepted overprovisioning factors, in percent.
pub const OVERPROVISION_RANGE: std::ops::RangeInclusive<u32> = 100..=1000;

/// The ambassador's zone, and how much spare capacity it counts on in a zone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Locality {
    pub zone: Zone,
    /// In percent: a zone keeps all of a share while its capacity times this is at least an
    /// even share.
    pub overprovision: u32,
}

impl Locality {
    pub fn new(zone: Zone) -> Locality {
        Locality {
            zone,
            overprovision: DEFAULT_OVERPROVISION,
        }
    }

    /// Whether `instance` runs in the ambassador's zone.
    pub fn is_local(&self, instance: &Instance) -> bool {
        instance.zone.as_ref() == Some(&self.zone)
    }

    /// The part (0 to 1) of a share the zone keeps, with `local` of the share's `all`
    /// capacity (summed weights), over `zones` zones.
    pub fn kept(&self, local: f64, all: f64, zones: usize) -> f64 {
        if local <= 0.0 || all <= 0.0 {
            return 0.0;
        }
        if local >= all {
            return 1.0;
        }
        let even = all / zones.max(1) as f64;
        (f64::from(self.overprovision) / 100.0 * local / even).min(1.0)
    }
}

/// A backend's weights with a zone: its servers', and those of the failover twins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Weights {
    /// Each instance's weight (same order as the instances).
    pub active: Vec<u16>,
    /// The weight of each instance's failover twin: what it would get with no instance of
    /// the zone left (0 for the zone's own instances, which have no twin).
    pub failover: Vec<u16>,
}

/// The weights of `instances` (the serving ones, same order) in the backend of `routed`,
/// following `route` as [`plan::weights`] does, then the zone rule of this module.
pub fn weights(
    locality: &Locality,
    routed: &ServiceName,
    instances: &[&Instance],
    route: Option<&Route>,
) -> Weights {
    let groups = plan::groups(routed, instances, route).unwrap_or_else(|| {
        let own = (0..instances.len())
            .filter(|&m| instances[m].service == *routed)
            .collect();
        vec![(100.0, own)]
    });
    let capacity = |members: &[usize]| -> f64 {
        members
            .iter()
            .map(|&m| f64::from(instances[m].weight.max(1)))
            .sum()
    };
    let mut active: Vec<Group> = Vec::new();
    let mut failover: Vec<Group> = Vec::new();
    // Backups serve only when nothing else is up: they are no capacity of a zone, and keep
    // the weights they have without one.
    let plain = plan::scale(instances, &groups);
    let backups: Vec<usize> = (0..instances.len())
        .filter(|&m| is_backup(instances[m]))
        .collect();
    for (pct, mut members) in groups {
        members.retain(|m| !backups.contains(m));
        let (local, other): (Vec<usize>, Vec<usize>) = members
            .iter()
            .partition(|&&m| locality.is_local(instances[m]));
        let zones: BTreeSet<Option<&Zone>> = members
            .iter()
            .map(|&m| instances[m].zone.as_ref())
            .collect();
        let kept = locality.kept(capacity(&local), capacity(&members), zones.len());
        if kept > 0.0 {
            active.push((pct * kept, local));
        }
        if kept < 1.0 && !other.is_empty() {
            active.push((pct * (1.0 - kept), other.clone()));
        }
        if !other.is_empty() {
            failover.push((pct, other));
        }
    }
    let mut active = plan::scale(instances, &active);
    for m in backups {
        active[m] = plain[m];
    }
    Weights {
        active,
        failover: plan::scale(instances, &failover),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(id: &str, zone: Option<&str>, version: &str, weight: u16) -> Instance {
        Instance {
            zone: zone.map(|z| z.parse().unwrap()),
            version: version.parse().unwrap(),
            weight,
            ..Instance::sample("svc", id)
        }
    }

    fn in_a() -> Locality {
        Locality::new("a".parse().unwrap())
    }

    /// The share of traffic (percent of the summed weights) of the instances whose ids
    /// start with `prefix`.
    fn share(instances: &[Instance], w: &[u16], prefix: &str) -> f64 {
        let total: f64 = w.iter().map(|&x| f64::from(x)).sum();
        let part: f64 = instances
            .iter()
            .zip(w)
            .filter(|(i, _)| i.id.as_str().starts_with(prefix))
            .map(|(_, &x)| f64::from(x))
            .sum();
        part * 100.0 / total
    }

    fn run(instances: &[Instance], route: Option<&Route>) -> Weights {
        let refs: Vec<&Instance> = instances.iter().collect();
        weights(&in_a(), &"svc".parse().unwrap(), &refs, route)
    }

    #[test]
    fn the_rule_keeps_everything_down_to_an_even_share_over_the_factor() {
        let l = in_a();
        // Two zones of equal capacity: all stays.
        assert_eq!(l.kept(200.0, 400.0, 2), 1.0);
        // The zone lost one of its two instances: 1.4 × 100 / 150 = 0.93.
        assert!((l.kept(100.0, 300.0, 2) - 1.4 / 1.5).abs() < 1e-9);
        // Three of four left: 1.4 × 300 / 350 > 1.
        assert_eq!(l.kept(300.0, 700.0, 2), 1.0);
        // One of four left against four: 1.4 × 100 / 250 = 0.56.
        assert!((l.kept(100.0, 500.0, 2) - 0.56).abs() < 1e-9);
        // Nothing left, or nothing elsewhere.
        assert_eq!(l.kept(0.0, 500.0, 2), 0.0);
        assert_eq!(l.kept(300.0, 300.0, 1), 1.0);
        // A factor of 100 %: the zone keeps exactly its fraction of an even share.
        let strict = Locality {
            overprovision: 100,
            ..in_a()
        };
        assert!((strict.kept(100.0, 300.0, 2) - 2.0 / 3.0).abs() < 1e-9);
    }

    #[test]
    fn a_healthy_zone_keeps_its_traffic_and_the_others_wait_as_failover() {
        let v = [
            at("a1", Some("a"), "1", 100),
            at("a2", Some("a"), "1", 100),
            at("b1", Some("b"), "1", 100),
            at("b2", Some("b"), "1", 100),
        ];
        let w = run(&v, None);
        assert_eq!(w.active, [256, 256, 0, 0]);
        assert_eq!(w.failover, [0, 0, 256, 256]);
    }

    #[test]
    fn a_zone_short_of_capacity_spills_the_rest_by_weight() {
        // a has one instance of weight 100 left, b has four: a keeps 56 %.
        let mut v = vec![at("a1", Some("a"), "1", 100)];
        v.extend((0..4).map(|n| at(&format!("b{n}"), Some("b"), "1", 100)));
        let w = run(&v, None);
        assert!((share(&v, &w.active, "a") - 56.0).abs() <= 1.0, "{w:?}");
        let b: Vec<u16> = w.active[1..].to_vec();
        let (least, most) = (b.iter().min().unwrap(), b.iter().max().unwrap());
        assert!(*least > 0 && most - least <= 1, "{w:?}");
        // Weights count, not instance numbers: a heavier b instance takes more of the spill.
        v[1].weight = 200;
        let w = run(&v, None);
        assert!((f64::from(w.active[1]) / f64::from(w.active[2]) - 2.0).abs() < 0.1);
    }

    #[test]
    fn an_empty_zone_sends_everything_elsewhere_and_instances_without_zone_count_as_elsewhere() {
        let v = [
            at("b1", Some("b"), "1", 100),
            at("n1", None, "1", 100),
            at("n2", None, "1", 50),
        ];
        let w = run(&v, None);
        assert_eq!(w.active, w.failover);
        assert!(w.active.iter().all(|&x| x > 0), "{w:?}");
        assert_eq!(w.active[1], 2 * w.active[2], "{w:?}");
    }

    #[test]
    fn a_route_to_another_service_keeps_its_share_in_the_zone_too() {
        let route = baker_client::model::validate_route_of(
            &"svc".parse().unwrap(),
            &[("svc@*".to_owned(), 70), ("barker@*".to_owned(), 30)]
                .into_iter()
                .collect(),
        )
        .unwrap();
        let barker = |id: &str, zone: &str| Instance {
            zone: Some(zone.parse().unwrap()),
            ..Instance::sample("barker", id)
        };
        let v = [
            at("a-svc", Some("a"), "1", 100),
            at("b-svc", Some("b"), "1", 100),
            barker("a-barker", "a"),
            barker("b-barker", "b"),
        ];
        let w = run(&v, Some(&route));
        assert_eq!((w.active[1], w.active[3]), (0, 0), "{w:?}");
        assert!(
            (share(&v, &w.active, "a-barker") - 30.0).abs() <= 1.0,
            "{w:?}"
        );
        assert_eq!((w.failover[0], w.failover[2]), (0, 0), "{w:?}");
        assert!(
            (share(&v, &w.failover, "b-barker") - 30.0).abs() <= 1.0,
            "{w:?}"
        );
    }

    #[test]
    fn a_canary_split_holds_inside_the_zone() {
        let route: Route = [("1".parse().unwrap(), 90u8), ("2".parse().unwrap(), 10u8)]
            .into_iter()
            .collect();
        let v = [
            at("a-v1", Some("a"), "1", 100),
            at("a-v2", Some("a"), "2", 100),
            at("b-v1", Some("b"), "1", 100),
            at("b-v2", Some("b"), "2", 100),
        ];
        let w = run(&v, Some(&route));
        assert_eq!(&w.active[2..], [0, 0], "{w:?}");
        assert!((share(&v, &w.active, "a-v2") - 10.0).abs() <= 1.0, "{w:?}");
        // Version 2 runs only in b: its 10 % crosses, version 1 stays.
        let v = [
            at("a-v1", Some("a"), "1", 100),
            at("b-v1", Some("b"), "1", 100),
            at("b-v2", Some("b"), "2", 100),
        ];
        let w = run(&v, Some(&route));
        assert_eq!(w.active[1], 0, "{w:?}");
        assert!((share(&v, &w.active, "b-v2") - 10.0).abs() <= 1.0, "{w:?}");
        assert!((share(&v, &w.active, "a-v1") - 90.0).abs() <= 1.0, "{w:?}");
    }
}
