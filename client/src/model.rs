//! Wire types shared by every part: instances, routes, watch events, and their validation.
//!
//! Everything that can reach an HAProxy configuration passes through the validators here, so
//! the directory rejects bad input at the edge and the ambassador can trust what it renders.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

/// Longest service name, instance id, version or tag.
pub const MAX_NAME_LEN: usize = 63;
/// Default instance weight when a registration names none.
pub const DEFAULT_WEIGHT: u16 = 100;
/// Highest weight HAProxy accepts for a server.
pub const MAX_WEIGHT: u16 = 256;
/// Default version when a registration names none.
pub const DEFAULT_VERSION: &str = "1";
/// Default time to live of a registration: three heartbeats of the registrar's default 2 s.
pub const DEFAULT_TTL_MS: u64 = 6_000;
/// Shortest accepted time to live.
pub const MIN_TTL_MS: u64 = 100;
/// Longest accepted time to live (one day).
pub const MAX_TTL_MS: u64 = 86_400_000;
/// Longest DNS name accepted as an address.
pub const MAX_ADDRESS_LEN: usize = 253;

/// A field that failed validation, with what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ValidationError {
    /// The field's name as the user wrote it (`service`, `port`, `route.2`, ...).
    pub field: String,
    /// What is wrong, in lowercase words.
    pub message: String,
}

impl ValidationError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// Checks a service name, instance id, version or tag against `^[a-z0-9][a-z0-9._-]{0,62}$`.
pub fn validate_name(field: &str, value: &str) -> Result<(), ValidationError> {
    let err = |m: &str| Err(ValidationError::new(field, m));
    if value.is_empty() {
        return err("must not be empty");
    }
    // Counted in characters: a short name of multi-byte characters is rejected below for its
    // characters, not with a length message that would contradict its visible length.
    let chars = value.chars().count();
    if chars > MAX_NAME_LEN {
        return Err(ValidationError::new(
            field,
            format!("must be at most {MAX_NAME_LEN} characters, got {chars}"),
        ));
    }
    let mut chars = value.chars();
    let first = chars.next().unwrap_or_default();
    if !(first.is_ascii_lowercase() || first.is_ascii_digit()) {
        return Err(ValidationError::new(
            field,
            format!("must start with a lowercase letter or digit, got {first:?}"),
        ));
    }
    if let Some(bad) = value
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-')))
    {
        return Err(ValidationError::new(
            field,
            format!("may contain only a-z, 0-9, '.', '_' and '-', got {bad:?}"),
        ));
    }
    Ok(())
}

/// Checks an address: an IPv4 or IPv6 literal, or a DNS name made of letters, digits, `-`, `.`.
pub fn validate_address(field: &str, value: &str) -> Result<(), ValidationError> {
    if value.is_empty() {
        return Err(ValidationError::new(field, "must not be empty"));
    }
    if value.parse::<IpAddr>().is_ok() {
        return Ok(());
    }
    if value.len() > MAX_ADDRESS_LEN {
        return Err(ValidationError::new(
            field,
            format!("must be an IP address or a DNS name of at most {MAX_ADDRESS_LEN} characters"),
        ));
    }
    let name = value.strip_suffix('.').unwrap_or(value);
    for label in name.split('.') {
        let ok = !label.is_empty()
            && label.len() <= 63
            && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            && !label.starts_with('-')
            && !label.ends_with('-');
        if !ok {
            return Err(ValidationError::new(
                field,
                format!("must be an IP address or a DNS name (letters, digits, '-', '.'), got {value:?}"),
            ));
        }
    }
    Ok(())
}

/// Checks a TCP port (1-65535), taken wide so that out-of-range JSON numbers get a clear message.
pub fn validate_port(field: &str, value: u64) -> Result<u16, ValidationError> {
    match u16::try_from(value) {
        Ok(p) if p != 0 => Ok(p),
        _ => Err(ValidationError::new(
            field,
            format!("must be between 1 and 65535, got {value}"),
        )),
    }
}

/// Checks an instance weight (1-256).
pub fn validate_weight(field: &str, value: u64) -> Result<u16, ValidationError> {
    match u16::try_from(value) {
        Ok(w) if (1..=MAX_WEIGHT).contains(&w) => Ok(w),
        _ => Err(ValidationError::new(
            field,
            format!("must be between 1 and {MAX_WEIGHT}, got {value}"),
        )),
    }
}

/// Where an instance came from.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, Default,
)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// Registered over the HTTP API (a registrar sidecar, or `baker register`).
    #[default]
    Registrar,
    /// Discovered by the directory from a labelled container on the Docker engine.
    Docker,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Source::Registrar => "registrar",
            Source::Docker => "docker",
        })
    }
}

/// The body of `PUT /v1/services/{service}/instances/{id}`, as sent on the wire.
///
/// Numbers are taken wide (`u64`) so that `port: 70000` is answered with "port: must be between
/// 1 and 65535" instead of a deserializer message; [`InstanceSpec::validate`] narrows them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceSpec {
    pub address: String,
    pub port: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_ms: Option<u64>,
}

/// A registration that passed validation, with defaults filled in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidSpec {
    pub address: String,
    pub port: u16,
    pub version: String,
    pub weight: u16,
    pub tags: Vec<String>,
    pub ttl_ms: u64,
}

impl InstanceSpec {
    /// Validates every field and reports all problems at once.
    pub fn validate(&self) -> Result<ValidSpec, Vec<ValidationError>> {
        let mut errors = Vec::new();
        if let Err(e) = validate_address("address", &self.address) {
            errors.push(e);
        }
        let port = validate_port("port", self.port)
            .map_err(|e| errors.push(e))
            .unwrap_or(0);
        let version = self
            .version
            .clone()
            .unwrap_or_else(|| DEFAULT_VERSION.to_owned());
        if let Err(e) = validate_name("version", &version) {
            errors.push(e);
        }
        let weight = match self.weight {
            None => DEFAULT_WEIGHT,
            Some(w) => validate_weight("weight", w)
                .map_err(|e| errors.push(e))
                .unwrap_or(0),
        };
        for (i, tag) in self.tags.iter().enumerate() {
            if let Err(e) = validate_name(&format!("tags[{i}]"), tag) {
                errors.push(e);
            }
        }
        if self.tags.len() > 32 {
            errors.push(ValidationError::new("tags", "at most 32 tags are allowed"));
        }
        let ttl_ms = self.ttl_ms.unwrap_or(DEFAULT_TTL_MS);
        if !(MIN_TTL_MS..=MAX_TTL_MS).contains(&ttl_ms) {
            errors.push(ValidationError::new(
                "ttl_ms",
                format!("must be between {MIN_TTL_MS} and {MAX_TTL_MS}, got {ttl_ms}"),
            ));
        }
        if errors.is_empty() {
            Ok(ValidSpec {
                address: self.address.clone(),
                port,
                version,
                weight,
                tags: self.tags.clone(),
                ttl_ms,
            })
        } else {
            Err(errors)
        }
    }
}

/// One live instance of a service, as the directory holds and reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instance {
    pub service: String,
    pub id: String,
    pub address: String,
    pub port: u16,
    pub version: String,
    pub weight: u16,
    #[serde(default)]
    pub tags: Vec<String>,
    pub source: Source,
    pub ttl_ms: u64,
    /// When the directory last heard of this instance, in milliseconds since the Unix epoch.
    pub last_seen: u64,
}

impl Instance {
    /// An instance with everyday values (10.0.0.1:8080, version 1, weight 100, from a
    /// registrar, 6 s TTL, last seen at 0), for tests to adjust with struct update syntax.
    #[doc(hidden)]
    pub fn sample(service: &str, id: &str) -> Instance {
        Instance {
            service: service.into(),
            id: id.into(),
            address: "10.0.0.1".into(),
            port: 8080,
            version: "1".into(),
            weight: 100,
            tags: vec![],
            source: Source::Registrar,
            ttl_ms: 6000,
            last_seen: 0,
        }
    }
}

/// A canary split: version → percent of the service's traffic; the percentages sum to 100.
pub type Route = BTreeMap<String, u8>;

/// Validates a route as sent by a user (`{"1": 90, "2": 10}`), reporting all problems at once.
pub fn validate_route(splits: &BTreeMap<String, u64>) -> Result<Route, Vec<ValidationError>> {
    let mut errors = Vec::new();
    let mut route = Route::new();
    if splits.is_empty() {
        errors.push(ValidationError::new(
            "route",
            "must name at least one version",
        ));
    }
    if splits.len() > 64 {
        errors.push(ValidationError::new(
            "route",
            "may name at most 64 versions",
        ));
    }
    let mut sum: u64 = 0;
    for (version, &pct) in splits {
        if let Err(e) = validate_name("version", version) {
            errors.push(ValidationError::new(
                format!("route.{}", printable(version)),
                e.message,
            ));
            continue;
        }
        if pct > 100 {
            errors.push(ValidationError::new(
                format!("route.{version}"),
                format!("must be a percentage between 0 and 100, got {pct}"),
            ));
            continue;
        }
        sum += pct;
        route.insert(version.clone(), pct as u8);
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

/// Whether `route` is set aside for now: some instance is live (`live_versions` holds each live
/// instance's version) but none has a version the route gives a share to.
///
/// The service then falls back to all its live instances, by their own weights, as if it had no
/// route, until an instance of a routed version registers: a route never leaves a service that
/// has live instances with no server. The directory, the ambassador and the CLI all decide it
/// here.
pub fn route_falls_back<'a>(
    route: &Route,
    live_versions: impl IntoIterator<Item = &'a str>,
) -> bool {
    let mut any_live = false;
    for version in live_versions {
        if route.get(version).is_some_and(|&pct| pct > 0) {
            return false;
        }
        any_live = true;
    }
    any_live
}

/// Renders a possibly hostile string for an error message: escaped and cut short.
pub fn printable(value: &str) -> String {
    let escaped: String = value.escape_debug().collect();
    if escaped.chars().count() > 80 {
        let cut: String = escaped.chars().take(77).collect();
        format!("{cut}...")
    } else {
        escaped
    }
}

/// `GET /v1/services`: every service with its live instances.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServicesResponse {
    pub index: u64,
    pub services: BTreeMap<String, Vec<Instance>>,
}

/// `GET /v1/services/{service}`: one service's live instances and its route, if any.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceResponse {
    pub index: u64,
    pub service: String,
    pub instances: Vec<Instance>,
    pub route: Option<Route>,
}

/// `GET /v1/routes`: every route.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoutesResponse {
    pub index: u64,
    pub routes: BTreeMap<String, Route>,
}

/// `PUT /v1/routes/{service}` and `DELETE` answer with the service's route after the change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteResponse {
    pub index: u64,
    pub service: String,
    pub route: Option<Route>,
}

/// The error body of every failed call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

/// One line of `GET /v1/watch` (newline-delimited JSON, `application/x-ndjson`).
///
/// A watcher first gets one `snapshot`, then one event per change, each carrying the whole new
/// state of one service or route, and a `ping` every few seconds when nothing else happens.
/// `index` grows by one with every change; a watcher that falls too far behind is disconnected
/// and should reconnect, receiving a fresh snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum WatchEvent {
    /// The full state at `index`.
    Snapshot {
        index: u64,
        services: BTreeMap<String, Vec<Instance>>,
        routes: BTreeMap<String, Route>,
    },
    /// The whole new instance list of one service (empty when its last instance went away).
    Service {
        index: u64,
        service: String,
        instances: Vec<Instance>,
    },
    /// The new route of one service (`null` when it was cleared).
    Route {
        index: u64,
        service: String,
        route: Option<Route>,
    },
    /// Keep-alive, sent when nothing changed for a while; `index` is the current one.
    Ping { index: u64 },
}

impl WatchEvent {
    /// The directory's change index this event brings the watcher to.
    pub fn index(&self) -> u64 {
        match self {
            WatchEvent::Snapshot { index, .. }
            | WatchEvent::Service { index, .. }
            | WatchEvent::Route { index, .. }
            | WatchEvent::Ping { index } => *index,
        }
    }
}

/// A directory's state as a watcher rebuilds it from the stream.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct State {
    pub index: u64,
    pub services: BTreeMap<String, Vec<Instance>>,
    pub routes: BTreeMap<String, Route>,
}

impl State {
    /// Applies one event; a snapshot replaces everything.
    pub fn apply(&mut self, event: WatchEvent) {
        match event {
            WatchEvent::Snapshot {
                index,
                services,
                routes,
            } => {
                *self = State {
                    index,
                    services,
                    routes,
                };
            }
            WatchEvent::Service {
                index,
                service,
                instances,
            } => {
                self.index = index;
                if instances.is_empty() {
                    self.services.remove(&service);
                } else {
                    self.services.insert(service, instances);
                }
            }
            WatchEvent::Route {
                index,
                service,
                route,
            } => {
                self.index = index;
                match route {
                    Some(r) => self.routes.insert(service, r),
                    None => self.routes.remove(&service),
                };
            }
            WatchEvent::Ping { index } => self.index = index,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["a", "emitter", "v1.2_3-x", "0", &"a".repeat(63)] {
            assert!(validate_name("service", ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "Emitter",
            "a b",
            "a\nb",
            "a#b",
            "a/b",
            "-a",
            ".a",
            "_a",
            &"a".repeat(64),
            "é",
        ] {
            let e = validate_name("service", bad).unwrap_err();
            assert_eq!(e.field, "service", "{bad}");
        }
    }

    #[test]
    fn addresses() {
        for ok in [
            "10.0.0.1",
            "::1",
            "fe80::1",
            "greeting-1",
            "a.b.example",
            "host.",
        ] {
            assert!(validate_address("address", ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "a b",
            "a;b",
            "x\nserver",
            "-a",
            "a..b",
            "[::1]",
            "1.2.3.4:80",
            "a_b",
        ] {
            assert!(validate_address("address", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn spec_reports_every_error() {
        let spec = InstanceSpec {
            address: "bad address".into(),
            port: 70000,
            version: Some("V2".into()),
            weight: Some(0),
            tags: vec!["ok".into(), "Not ok".into()],
            ttl_ms: Some(1),
        };
        let errs = spec.validate().unwrap_err();
        let fields: Vec<_> = errs.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            ["address", "port", "version", "weight", "tags[1]", "ttl_ms"]
        );
    }

    #[test]
    fn spec_defaults() {
        let spec: InstanceSpec =
            serde_json::from_str(r#"{"address":"10.0.0.1","port":8080}"#).unwrap();
        let v = spec.validate().unwrap();
        assert_eq!(
            (v.version.as_str(), v.weight, v.ttl_ms),
            ("1", 100, DEFAULT_TTL_MS)
        );
        assert!(
            serde_json::from_str::<InstanceSpec>(r#"{"address":"a","port":1,"evil":1}"#).is_err()
        );
    }

    #[test]
    fn routes() {
        let r = |pairs: &[(&str, u64)]| pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect();
        assert_eq!(
            validate_route(&r(&[("1", 90), ("2", 10)])).unwrap().len(),
            2
        );
        assert!(validate_route(&r(&[("1", 100), ("2", 0)])).is_ok());
        assert!(validate_route(&r(&[("1", 80), ("2", 10)])).is_err());
        assert!(validate_route(&r(&[("1", 100), ("2", 10)])).is_err());
        assert!(validate_route(&r(&[("1", 90), ("B#", 10)])).is_err());
        assert!(validate_route(&r(&[("1", 300)])).is_err());
        assert!(validate_route(&r(&[])).is_err());
    }

    #[test]
    fn watch_events_round_trip_and_apply() {
        let inst = Instance {
            port: 80,
            last_seen: 1,
            ..Instance::sample("emitter", "a")
        };
        let events = vec![
            WatchEvent::Snapshot {
                index: 1,
                services: BTreeMap::new(),
                routes: BTreeMap::new(),
            },
            WatchEvent::Service {
                index: 2,
                service: "emitter".into(),
                instances: vec![inst.clone()],
            },
            WatchEvent::Route {
                index: 3,
                service: "emitter".into(),
                route: Some([("1".into(), 100)].into()),
            },
            WatchEvent::Ping { index: 3 },
        ];
        let mut state = State::default();
        for e in events {
            let line = serde_json::to_string(&e).unwrap();
            let back: WatchEvent = serde_json::from_str(&line).unwrap();
            assert_eq!(back, e);
            state.apply(back);
        }
        assert_eq!(state.index, 3);
        assert_eq!(state.services["emitter"], vec![inst]);
        state.apply(WatchEvent::Service {
            index: 4,
            service: "emitter".into(),
            instances: vec![],
        });
        assert!(state.services.is_empty());
    }

    #[test]
    fn a_route_falls_back_only_when_no_routed_version_is_live() {
        let route: Route = [("1".into(), 0), ("2".into(), 90), ("3".into(), 10)].into();
        assert!(
            route_falls_back(&route, ["1", "4"]),
            "only 0 % and unnamed versions live"
        );
        assert!(!route_falls_back(&route, ["1", "3"]));
        assert!(!route_falls_back(&route, ["2"]));
        assert!(
            !route_falls_back(&route, []),
            "nothing live: nothing to fall back to"
        );
    }
}
