//! Routes: which share of a service's traffic goes where.
//!
//! A route gives each of its [`Target`]s a percentage of one service's traffic, the percentages
//! summing to 100. A target is a version of the service itself (`2`, today's canary split),
//! every instance of a service (`barker@*`, the service itself or another one), or one version
//! of another service (`barker@2`). Within a target its share is spread over its live instances
//! by their weights; a target with no live instance gives its share to the others.
//!
//! A route has two JSON forms:
//!
//! - **flat**, as a user writes it (`PUT /v1/routes/{service}`) and as the directory stores it:
//!   `{"1": 90, "barker@2": 10}`, each key a target as [`Target`]'s `Display` writes it.
//! - **split**, on the watch stream and in answers, so that a watcher that knows only versions
//!   keeps reading every route it could read before: the versions of the routed service stay
//!   in `route` (`{"1": 90}`), exactly as they always were, and the other targets go beside it
//!   in `targets` (`{"barker@2": 10}`), a field such a watcher ignores. A version-only route has
//!   no `targets` at all, so its JSON is unchanged. (In a snapshot and in `GET /v1/routes`, the
//!   other targets of every route are in `route_targets`, beside `routes`.)

use std::collections::{btree_map, BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::model::{printable, Instance, ServiceName, ValidationError, Version};

/// Most targets one route may name.
pub const MAX_ROUTE_TARGETS: usize = 64;

/// Where a share of a route's traffic goes.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Target {
    /// The instances of this version of the routed service (written `2`).
    Version(Version),
    /// Every instance of a service, whatever its version (written `barker@*`); the routed
    /// service itself or another one.
    Service(ServiceName),
    /// The instances of one version of another service (written `barker@2`).
    ServiceVersion(ServiceName, Version),
}

impl Target {
    /// Parses a target as written in a route's key (`2`, `barker@2`, `barker@*`), naming `field`
    /// in the error. With `routed` (the service the route belongs to), `routed@2` is read as
    /// the plain version `2`, its one canonical form.
    pub fn parse_as(
        field: &str,
        key: &str,
        routed: Option<&ServiceName>,
    ) -> Result<Target, ValidationError> {
        let Some((service, version)) = key.split_once('@') else {
            return Ok(Target::Version(Version::parse_as(field, key)?));
        };
        let service = ServiceName::parse_as(field, service).map_err(|e| {
            ValidationError::new(field, format!("the service before '@' {}", e.message))
        })?;
        if version == "*" {
            return Ok(Target::Service(service));
        }
        let version = Version::parse_as(field, version).map_err(|e| {
            ValidationError::new(
                field,
                format!(
                    "the version after '@' (or '*' for every version) {}",
                    e.message
                ),
            )
        })?;
        if routed == Some(&service) {
            Ok(Target::Version(version))
        } else {
            Ok(Target::ServiceVersion(service, version))
        }
    }

    /// The service whose instances this target sends to, in the route of `routed`.
    pub fn service<'a>(&'a self, routed: &'a ServiceName) -> &'a ServiceName {
        match self {
            Target::Version(_) => routed,
            Target::Service(s) | Target::ServiceVersion(s, _) => s,
        }
    }

    /// Whether `instance` is one of this target's, in the route of `routed`.
    pub fn matches(&self, routed: &ServiceName, instance: &Instance) -> bool {
        match self {
            Target::Version(v) => instance.service == *routed && instance.version == *v,
            Target::Service(s) => instance.service == *s,
            Target::ServiceVersion(s, v) => instance.service == *s && instance.version == *v,
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Version(v) => write!(f, "{v}"),
            Target::Service(s) => write!(f, "{s}@*"),
            Target::ServiceVersion(s, v) => write!(f, "{s}@{v}"),
        }
    }
}

/// A route: target → percent of the routed service's traffic; valid routes sum to 100.
///
/// Its flat JSON form (`{"1": 90, "barker@2": 10}`) is what [`Serialize`] writes; the wire
/// types write the split form (see the module's documentation).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Route(BTreeMap<Target, u8>);

impl Route {
    /// A route of `targets` and their shares, unchecked (see [`validate_route_of`]).
    pub fn from_targets(targets: impl IntoIterator<Item = (Target, u8)>) -> Route {
        Route(targets.into_iter().collect())
    }

    /// The targets and their shares, in order: versions first, then services.
    pub fn iter(&self) -> btree_map::Iter<'_, Target, u8> {
        self.0.iter()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The share of `target`, if the route names it.
    pub fn get(&self, target: &Target) -> Option<u8> {
        self.0.get(target).copied()
    }

    /// The share of version `version` of the routed service, if the route names it.
    pub fn version_share(&self, version: &str) -> Option<u8> {
        let version = Version::parse_as(Version::FIELD, version).ok()?;
        self.get(&Target::Version(version))
    }

    /// Whether every target is a version of the routed service (the only form before routes
    /// could name other services).
    pub fn is_version_only(&self) -> bool {
        self.0.keys().all(|t| matches!(t, Target::Version(_)))
    }

    /// The part a watcher that knows only versions reads: the versions of the routed service.
    pub fn versions(&self) -> BTreeMap<Version, u8> {
        self.0
            .iter()
            .filter_map(|(t, p)| match t {
                Target::Version(v) => Some((v.clone(), *p)),
                _ => None,
            })
            .collect()
    }

    /// The other targets, by their written form (`barker@*`, `barker@2`).
    fn others(&self) -> BTreeMap<String, u8> {
        self.0
            .iter()
            .filter(|(t, _)| !matches!(t, Target::Version(_)))
            .map(|(t, p)| (t.to_string(), *p))
            .collect()
    }

    /// The services other than `routed` whose instances this route sends traffic to (or could,
    /// at 0 %), for watchers to follow.
    pub fn other_services<'a>(&'a self, routed: &'a ServiceName) -> BTreeSet<&'a ServiceName> {
        self.0
            .keys()
            .map(|t| t.service(routed))
            .filter(|s| *s != routed)
            .collect()
    }

    /// The target `instance` belongs to in this route of `routed`, with its share.
    pub fn target_of(&self, routed: &ServiceName, instance: &Instance) -> Option<(&Target, u8)> {
        self.0
            .iter()
            .find(|(t, _)| t.matches(routed, instance))
            .map(|(t, p)| (t, *p))
    }

    /// The flat form, as `PUT /v1/routes/{service}` takes it.
    pub fn splits(&self) -> BTreeMap<String, u64> {
        self.0
            .iter()
            .map(|(t, p)| (t.to_string(), u64::from(*p)))
            .collect()
    }

    /// Joins the split form's two halves.
    fn from_parts(
        versions: BTreeMap<Version, u8>,
        others: BTreeMap<String, u8>,
    ) -> Result<Route, ValidationError> {
        let mut route: Route = versions.into_iter().collect();
        for (key, pct) in others {
            let target = Target::parse_as(&format!("targets.{}", printable(&key)), &key, None)?;
            route.0.insert(target, pct);
        }
        Ok(route)
    }
}

impl<'a> IntoIterator for &'a Route {
    type Item = (&'a Target, &'a u8);
    type IntoIter = btree_map::Iter<'a, Target, u8>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

impl FromIterator<(Version, u8)> for Route {
    fn from_iter<I: IntoIterator<Item = (Version, u8)>>(iter: I) -> Self {
        Route(
            iter.into_iter()
                .map(|(v, p)| (Target::Version(v), p))
                .collect(),
        )
    }
}

impl<const N: usize> From<[(Version, u8); N]> for Route {
    fn from(pairs: [(Version, u8); N]) -> Self {
        pairs.into_iter().collect()
    }
}

impl Serialize for Route {
    /// The flat form: `{"1": 90, "barker@2": 10}`.
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.0.iter().map(|(t, p)| (t.to_string(), *p)))
    }
}

impl<'de> Deserialize<'de> for Route {
    /// The flat form; each key must be a valid target.
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let flat = BTreeMap::<String, u8>::deserialize(deserializer)?;
        let mut route = Route::default();
        for (key, pct) in flat {
            let field = format!("route.{}", printable(&key));
            let target = Target::parse_as(&field, &key, None).map_err(serde::de::Error::custom)?;
            route.0.insert(target, pct);
        }
        Ok(route)
    }
}

/// Validates a route in its flat form as sent by a user (`{"1": 90, "barker@2": 10}`) for the
/// service `routed`, reporting all problems at once.
pub fn validate_route_of(
    routed: &ServiceName,
    splits: &BTreeMap<String, u64>,
) -> Result<Route, Vec<ValidationError>> {
    validate(Some(routed), splits)
}

/// Validates a route in its flat form without knowing the routed service (a stored route,
/// already in canonical form), reporting all problems at once.
pub fn validate_route(splits: &BTreeMap<String, u64>) -> Result<Route, Vec<ValidationError>> {
    validate(None, splits)
}

fn validate(
    routed: Option<&ServiceName>,
    splits: &BTreeMap<String, u64>,
) -> Result<Route, Vec<ValidationError>> {
    let mut errors = Vec::new();
    let mut route = Route::default();
    if splits.is_empty() {
        errors.push(ValidationError::new(
            "route",
            "must name at least one target",
        ));
    }
    if splits.len() > MAX_ROUTE_TARGETS {
        errors.push(ValidationError::new(
            "route",
            format!(
                "may name at most {MAX_ROUTE_TARGETS} targets, got {}",
                splits.len()
            ),
        ));
    }
    let mut sum: u64 = 0;
    let mut written: BTreeMap<Target, &str> = BTreeMap::new();
    for (key, &pct) in splits {
        let field = format!("route.{}", printable(key));
        let target = match Target::parse_as(&field, key, routed) {
            Ok(t) => t,
            Err(e) => {
                errors.push(e);
                continue;
            }
        };
        if pct > 100 {
            errors.push(ValidationError::new(
                field,
                format!("must be a percentage between 0 and 100, got {pct}"),
            ));
            continue;
        }
        if let Some(first) = written.get(&target) {
            errors.push(ValidationError::new(
                field,
                format!("names the same target as {}", printable(first)),
            ));
            continue;
        }
        sum += pct;
        written.insert(target.clone(), key);
        route.0.insert(target, pct as u8);
    }
    // A service is routed either whole or by some of its versions: an instance belongs to one
    // target at most, so that each target's share is what it gets.
    for target in route.0.keys() {
        if let Target::Service(whole) = target {
            for other in route.0.keys().filter(|t| *t != target) {
                let same = match (other, routed) {
                    (Target::ServiceVersion(s, _), _) => s == whole,
                    (Target::Version(_), Some(r)) => r == whole,
                    _ => false,
                };
                if same {
                    errors.push(ValidationError::new(
                        format!("route.{other}"),
                        format!(
                            "{whole}@* already sends to every version of {whole}: name the \
                             whole service or some of its versions, not both"
                        ),
                    ));
                }
            }
        }
    }
    if errors.is_empty() && sum != 100 {
        errors.push(ValidationError::new(
            "route",
            format!("percentages must sum to 100, got {sum}"),
        ));
    }
    if errors.is_empty() {
        Ok(route)
    } else {
        Err(errors)
    }
}

/// Whether `route` of the service `routed` is set aside for now: some instance of `routed` is
/// live but no live instance (of `routed` or of a service the route names; `live` holds them
/// all) belongs to a target the route gives a share to.
///
/// The service then falls back to all its own live instances, by their own weights, as if it
/// had no route, until an instance of a routed target registers: a route never leaves a
/// service that has live instances with no server. The directory, the ambassador and the CLI
/// all decide it here.
pub fn route_falls_back<'a>(
    route: &Route,
    routed: &ServiceName,
    live: impl IntoIterator<Item = &'a Instance>,
) -> bool {
    route_falls_back_by_version(
        route,
        routed,
        live.into_iter().map(|i| (&i.service, &i.version)),
    )
}

/// [`route_falls_back`], given the service and version of each live instance (or only each
/// distinct pair).
pub fn route_falls_back_by_version<'a>(
    route: &Route,
    routed: &ServiceName,
    live: impl IntoIterator<Item = (&'a ServiceName, &'a Version)>,
) -> bool {
    let mut own_live = false;
    for (service, version) in live {
        let routed_to = route.iter().any(|(t, &pct)| {
            pct > 0
                && match t {
                    Target::Version(v) => service == routed && version == v,
                    Target::Service(s) => service == s,
                    Target::ServiceVersion(s, v) => service == s && version == v,
                }
        });
        if routed_to {
            return false;
        }
        own_live |= service == routed;
    }
    own_live
}

/// The split form of `Option<Route>`: `route` (versions) and `targets` (the rest) side by side.
pub(crate) mod split_one {
    use super::*;

    #[derive(Serialize, Deserialize)]
    struct Wire {
        route: Option<BTreeMap<Version, u8>>,
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        targets: BTreeMap<String, u8>,
    }

    pub fn serialize<S: Serializer>(route: &Option<Route>, s: S) -> Result<S::Ok, S::Error> {
        Wire {
            route: route.as_ref().map(Route::versions),
            targets: route.as_ref().map(Route::others).unwrap_or_default(),
        }
        .serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Route>, D::Error> {
        let wire = Wire::deserialize(d)?;
        match (wire.route, wire.targets.is_empty()) {
            (None, true) => Ok(None),
            (versions, _) => Route::from_parts(versions.unwrap_or_default(), wire.targets)
                .map(Some)
                .map_err(serde::de::Error::custom),
        }
    }
}

/// The split form of every service's route: `routes` (versions) and `route_targets` (the rest).
pub(crate) mod split_all {
    use super::*;

    #[derive(Serialize, Deserialize)]
    struct Wire {
        routes: BTreeMap<ServiceName, BTreeMap<Version, u8>>,
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        route_targets: BTreeMap<ServiceName, BTreeMap<String, u8>>,
    }

    pub fn serialize<S: Serializer>(
        routes: &BTreeMap<ServiceName, Route>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        Wire {
            routes: routes
                .iter()
                .map(|(s, r)| (s.clone(), r.versions()))
                .collect(),
            route_targets: routes
                .iter()
                .filter(|(_, r)| !r.is_version_only())
                .map(|(s, r)| (s.clone(), r.others()))
                .collect(),
        }
        .serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<BTreeMap<ServiceName, Route>, D::Error> {
        let mut wire = Wire::deserialize(d)?;
        let mut routes = BTreeMap::new();
        for (service, versions) in wire.routes {
            let others = wire.route_targets.remove(&service).unwrap_or_default();
            let route = Route::from_parts(versions, others).map_err(serde::de::Error::custom)?;
            routes.insert(service, route);
        }
        if let Some(service) = wire.route_targets.keys().next() {
            return Err(serde::de::Error::custom(format!(
                "route_targets.{service}: no route of {service} in routes"
            )));
        }
        Ok(routes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{RouteResponse, RoutesResponse, WatchEvent};

    fn flat(pairs: &[(&str, u64)]) -> BTreeMap<String, u64> {
        pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
    }

    fn svc(name: &str) -> ServiceName {
        name.parse().unwrap()
    }

    #[test]
    fn targets_parse_in_three_forms() {
        let m = svc("monolith");
        let parse = |k: &str| Target::parse_as("route.x", k, Some(&m));
        assert_eq!(parse("2").unwrap(), Target::Version("2".parse().unwrap()));
        assert_eq!(parse("barker@*").unwrap(), Target::Service(svc("barker")));
        assert_eq!(
            parse("barker@2").unwrap(),
            Target::ServiceVersion(svc("barker"), "2".parse().unwrap())
        );
        assert_eq!(parse("monolith@2").unwrap(), parse("2").unwrap());
        assert_eq!(parse("monolith@*").unwrap(), Target::Service(m.clone()));
        for bad in [
            "B",
            "@2",
            "barker@",
            "barker@V2",
            "a@b@c",
            "Barker@*",
            "barker@**",
            "",
        ] {
            let e = parse(bad).unwrap_err();
            assert_eq!(e.field, "route.x", "{bad}");
        }
        for written in ["2", "barker@*", "barker@2"] {
            assert_eq!(parse(written).unwrap().to_string(), written);
        }
    }

    #[test]
    fn version_only_routes_validate_as_before() {
        let route = validate_route(&flat(&[("1", 90), ("2", 10)])).unwrap();
        assert_eq!(route.len(), 2);
        assert_eq!(route.version_share("2"), Some(10));
        assert!(route.is_version_only());
        let errs = validate_route(&flat(&[("1", 90), ("B#", 10)])).unwrap_err();
        assert_eq!(errs[0].field, "route.B#");
        assert!(validate_route(&flat(&[("1", 100), ("2", 0)])).is_ok());
        assert!(validate_route(&flat(&[("1", 80), ("2", 10)])).is_err());
        assert!(validate_route(&flat(&[("1", 100), ("2", 10)])).is_err());
        assert!(validate_route(&flat(&[("1", 300)])).is_err());
        assert!(validate_route(&flat(&[])).is_err());
    }

    #[test]
    fn cross_service_routes_validate() {
        let m = svc("monolith");
        let r = validate_route_of(&m, &flat(&[("monolith@*", 70), ("barker@*", 30)])).unwrap();
        assert_eq!(
            r.other_services(&m).into_iter().collect::<Vec<_>>(),
            [&svc("barker")]
        );
        assert!(!r.is_version_only());
        let r = validate_route_of(&m, &flat(&[("monolith@1", 90), ("barker@2", 10)])).unwrap();
        assert_eq!(r.version_share("1"), Some(90), "monolith@1 is version 1");
        let field = |pairs: &[(&str, u64)]| {
            let errs = validate_route_of(&m, &flat(pairs)).unwrap_err();
            errs.iter().map(|e| e.field.clone()).collect::<Vec<_>>()
        };
        assert_eq!(
            field(&[("1", 90), ("monolith@1", 10)]),
            ["route.monolith@1"]
        );
        assert_eq!(
            field(&[("barker@*", 90), ("barker@2", 10)]),
            ["route.barker@2"]
        );
        assert_eq!(field(&[("monolith@*", 90), ("2", 10)]), ["route.2"]);
        assert_eq!(field(&[("barker@x y", 100)]), ["route.barker@x y"]);
        assert_eq!(field(&[("barker@*", 60), ("1", 30)]), ["route"], "sum");
        let many: Vec<(String, u64)> = (0..65).map(|i| (format!("s{i}@*"), 0)).collect();
        let many: BTreeMap<String, u64> = many.into_iter().collect();
        let errs = validate_route_of(&m, &many).unwrap_err();
        assert!(errs[0].message.contains("at most 64"), "{errs:?}");
    }

    #[test]
    fn flat_form_round_trips() {
        let m = svc("monolith");
        let r = validate_route_of(&m, &flat(&[("1", 90), ("barker@2", 10)])).unwrap();
        let json = serde_json::to_string(&r).unwrap();
        assert_eq!(json, r#"{"1":90,"barker@2":10}"#);
        assert_eq!(serde_json::from_str::<Route>(&json).unwrap(), r);
        assert_eq!(validate_route(&r.splits()).unwrap(), r);
    }

    #[test]
    fn version_only_routes_keep_their_wire_form() {
        let route: Route = [("1".parse().unwrap(), 90), ("2".parse().unwrap(), 10)].into();
        let event = WatchEvent::Route {
            index: 3,
            prev: Some(2),
            at: Some(5),
            service: svc("greeting"),
            route: Some(route.clone()),
        };
        assert_eq!(
            serde_json::to_string(&event).unwrap(),
            r#"{"type":"route","index":3,"prev":2,"at":5,"service":"greeting","route":{"1":90,"2":10}}"#
        );
        let cleared = WatchEvent::Route {
            index: 4,
            prev: None,
            at: None,
            service: svc("greeting"),
            route: None,
        };
        assert_eq!(
            serde_json::to_string(&cleared).unwrap(),
            r#"{"type":"route","index":4,"service":"greeting","route":null}"#
        );
        let all = RoutesResponse {
            index: 3,
            routes: [(svc("greeting"), route)].into(),
        };
        assert_eq!(
            serde_json::to_string(&all).unwrap(),
            r#"{"index":3,"routes":{"greeting":{"1":90,"2":10}}}"#
        );
    }

    /// What a watcher that knows only versions reads: the old wire types, side by side.
    #[derive(Deserialize, Debug, PartialEq)]
    #[serde(tag = "type", rename_all = "lowercase")]
    enum OldEvent {
        Route {
            service: String,
            route: Option<BTreeMap<Version, u8>>,
        },
        Snapshot {
            routes: BTreeMap<String, BTreeMap<Version, u8>>,
        },
    }

    #[test]
    fn cross_service_routes_are_additive_on_the_wire() {
        let m = svc("monolith");
        let r = validate_route_of(&m, &flat(&[("1", 90), ("barker@2", 10)])).unwrap();
        let whole = validate_route_of(&m, &flat(&[("monolith@*", 70), ("barker@*", 30)])).unwrap();
        let event = WatchEvent::Route {
            index: 3,
            prev: Some(2),
            at: Some(5),
            service: m.clone(),
            route: Some(r.clone()),
        };
        let line = serde_json::to_string(&event).unwrap();
        assert_eq!(
            line,
            r#"{"type":"route","index":3,"prev":2,"at":5,"service":"monolith","route":{"1":90},"targets":{"barker@2":10}}"#
        );
        assert_eq!(serde_json::from_str::<WatchEvent>(&line).unwrap(), event);
        let old: OldEvent = serde_json::from_str(&line).unwrap();
        assert_eq!(
            old,
            OldEvent::Route {
                service: "monolith".into(),
                route: Some([("1".parse().unwrap(), 90)].into())
            }
        );
        let snapshot = WatchEvent::Snapshot {
            index: 3,
            services: BTreeMap::new(),
            routes: [(m.clone(), whole.clone()), (svc("greeting"), r.clone())].into(),
            maintenance: BTreeMap::new(),
        };
        let line = serde_json::to_string(&snapshot).unwrap();
        assert!(
            line.contains(r#""route_targets":{"greeting":{"barker@2":10},"monolith":{"barker@*":30,"monolith@*":70}}"#),
            "{line}"
        );
        assert_eq!(serde_json::from_str::<WatchEvent>(&line).unwrap(), snapshot);
        let OldEvent::Snapshot { routes } = serde_json::from_str(&line).unwrap() else {
            panic!("not a snapshot")
        };
        assert!(routes["monolith"].is_empty(), "{routes:?}");
        let resp = RouteResponse {
            index: 3,
            service: m,
            route: Some(whole),
        };
        let json = serde_json::to_string(&resp).unwrap();
        assert_eq!(serde_json::from_str::<RouteResponse>(&json).unwrap(), resp);
    }

    #[test]
    fn falls_back_only_when_no_target_is_live() {
        let m = svc("monolith");
        let route = validate_route_of(&m, &flat(&[("1", 0), ("2", 90), ("barker@*", 10)])).unwrap();
        let inst = |service: &str, id: &str, version: &str| Instance {
            version: version.parse().unwrap(),
            ..Instance::sample(service, id)
        };
        let (m1, m2, m4) = (
            inst("monolith", "a", "1"),
            inst("monolith", "b", "2"),
            inst("monolith", "c", "4"),
        );
        let b = inst("barker", "x", "7");
        assert!(
            route_falls_back(&route, &m, [&m1, &m4]),
            "only 0 % and unnamed versions live"
        );
        assert!(!route_falls_back(&route, &m, [&m1, &m2]));
        assert!(!route_falls_back(&route, &m, [&m1, &b]), "barker is live");
        assert!(!route_falls_back(&route, &m, [&b]));
        assert!(
            !route_falls_back(&route, &m, []),
            "nothing live: nothing to fall back to"
        );
    }
}
