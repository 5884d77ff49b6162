//! Wire types shared by every part: names, addresses, instances, routes, watch events.
//!
//! Everything that can reach an HAProxy configuration is one of the types here, parsed once at
//! the edge ([`ServiceName`], [`InstanceId`], [`Version`], [`Tag`], [`Address`]): a value of
//! such a type is valid by construction, so the directory rejects bad input where it arrives
//! and the ambassador renders only what it could parse.

use std::borrow::Borrow;
use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use serde::{Deserialize, Serialize, Serializer};

use crate::change::{Change, MaintenanceAction, RemoveCause, UpsertCause};
use crate::maintenance::{InstanceState, Maintenance, Reason};

/// Longest service name, instance id, version or tag.
pub const MAX_NAME_LEN: usize = 63;

/// Whether `hostname` is one Docker makes up for a container (the first 12 hex digits of its
/// id): a name made from it reads as a hash (`1e9ff11b9c67-8080`) in every listing.
pub fn is_generated_hostname(hostname: &str) -> bool {
    hostname.len() == 12
        && hostname
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// What a daemon says at start when its default id comes from a generated hostname.
pub fn generated_id_hint(id: &InstanceId, hostname: &str) -> String {
    format!(
        "the id {id} is made from the container's generated hostname {hostname}: set BAKER_ID \
         (or run the container with --hostname NAME) to give it a name people can read"
    )
}
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

/// What is wrong with `value` as a name (`^[a-z0-9][a-z0-9._-]{0,62}$`), if anything.
fn name_problem(value: &str) -> Option<String> {
    let Some(first) = value.chars().next() else {
        return Some("must not be empty".into());
    };
    // Counted in characters: a short name of multi-byte characters is rejected below for its
    // characters, not with a length message that would contradict its visible length.
    let chars = value.chars().count();
    if chars > MAX_NAME_LEN {
        return Some(format!(
            "must be at most {MAX_NAME_LEN} characters, got {chars}"
        ));
    }
    if !(first.is_ascii_lowercase() || first.is_ascii_digit()) {
        return Some(format!(
            "must start with a lowercase letter or digit, got {first:?}"
        ));
    }
    value
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-')))
        .map(|bad| format!("may contain only a-z, 0-9, '.', '_' and '-', got {bad:?}"))
}

/// Defines a name type: a string matching `^[a-z0-9][a-z0-9._-]{0,62}$`, which makes it a safe
/// HAProxy identifier and a safe configuration word.
macro_rules! name_type {
    ($(#[$doc:meta])* $name:ident, $field:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
        #[serde(try_from = "String")]
        pub struct $name(String);

        impl $name {
            /// The field an invalid value is reported as by [`FromStr`].
            pub const FIELD: &'static str = $field;

            /// Parses `value`, naming `field` in the error (`tags[1]`, `route.x`, a label...).
            pub fn parse_as(field: &str, value: &str) -> Result<Self, ValidationError> {
                match name_problem(value) {
                    None => Ok(Self(value.to_owned())),
                    Some(message) => Err(ValidationError::new(field, message)),
                }
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl FromStr for $name {
            type Err = ValidationError;

            fn from_str(value: &str) -> Result<Self, ValidationError> {
                Self::parse_as(Self::FIELD, value)
            }
        }

        impl TryFrom<String> for $name {
            type Error = ValidationError;

            fn try_from(value: String) -> Result<Self, ValidationError> {
                match name_problem(&value) {
                    None => Ok(Self(value)),
                    Some(message) => Err(ValidationError::new(Self::FIELD, message)),
                }
            }
        }

        impl From<$name> for String {
            fn from(name: $name) -> String {
                name.0
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(&self.0)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        /// Maps keyed by this type can be looked up with a `&str`.
        impl Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                self.0 == other
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.0 == *other
            }
        }

        impl PartialEq<String> for $name {
            fn eq(&self, other: &String) -> bool {
                self.0 == *other
            }
        }
    };
}

name_type!(
    /// A service's name: the backend and frontend name in HAProxy, a key in the directory.
    ServiceName,
    "service"
);
name_type!(
    /// An instance's id, unique within its service: the server name in HAProxy.
    InstanceId,
    "id"
);
name_type!(
    /// An instance's version, which routes split traffic by (`"1"` unless told otherwise).
    Version,
    "version"
);
name_type!(
    /// A free label on an instance.
    Tag,
    "tag"
);
name_type!(
    /// The zone (or rack, or host group) an instance or an ambassador runs in: ambassadors
    /// with a zone prefer the instances of their own.
    Zone,
    "zone"
);

/// Longest node name: a fully qualified host name.
pub const MAX_NODE_LEN: usize = 253;

/// The name of the node (host) whose Docker engine runs a container the directory discovered:
/// letters, digits, `.`, `_` and `-`, starting with a letter or digit, at most
/// [`MAX_NODE_LEN`] characters, as `hostname` and `docker info` show host names (case kept).
/// It is shown to operators and never written into an HAProxy configuration.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(try_from = "String")]
pub struct NodeName(String);

impl NodeName {
    /// The field an invalid value is reported as by [`FromStr`].
    pub const FIELD: &'static str = "node";

    /// Parses `value`, naming `field` in the error (`BAKER_NODE`, for instance).
    pub fn parse_as(field: &str, value: &str) -> Result<Self, ValidationError> {
        let problem = |message: String| Err(ValidationError::new(field, message));
        let Some(first) = value.chars().next() else {
            return problem("must not be empty".into());
        };
        let chars = value.chars().count();
        if chars > MAX_NODE_LEN {
            return problem(format!(
                "must be at most {MAX_NODE_LEN} characters, got {chars}"
            ));
        }
        if !first.is_ascii_alphanumeric() {
            return problem(format!(
                "must start with a letter or digit, got {:?}",
                first
            ));
        }
        if let Some(bad) = value
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
        {
            return problem(format!(
                "may contain only letters, digits, '.', '_' and '-', got {bad:?}"
            ));
        }
        Ok(NodeName(value.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for NodeName {
    type Err = ValidationError;

    fn from_str(value: &str) -> Result<Self, ValidationError> {
        Self::parse_as(Self::FIELD, value)
    }
}

impl TryFrom<String> for NodeName {
    type Error = ValidationError;

    fn try_from(value: String) -> Result<Self, ValidationError> {
        value.parse()
    }
}

impl Serialize for NodeName {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl fmt::Display for NodeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl PartialEq<&str> for NodeName {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

impl Default for Version {
    /// [`DEFAULT_VERSION`].
    fn default() -> Self {
        Version(DEFAULT_VERSION.to_owned())
    }
}

/// Where an instance listens: an IP address, kept in canonical form (`FD00:0::1` is stored and
/// shown as `fd00::1`, the form HAProxy reports), or a DNS name.
///
/// A DNS name is made of labels of letters, digits and `-`, and its last label is not a
/// number: resolvers read `010.000.000.001`, `0x7f.1`, `2130706433` or `1.2.3` as IP
/// addresses (other ones than the text suggests), so they are refused.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(try_from = "String")]
pub struct Address {
    /// The canonical text: the IP address's standard form, or the DNS name as written.
    text: String,
    ip: Option<IpAddr>,
}

impl Address {
    /// The field an invalid value is reported as by [`FromStr`].
    pub const FIELD: &'static str = "address";

    /// Parses `value`, naming `field` in the error (`host` in a link, for instance).
    pub fn parse_as(field: &str, value: &str) -> Result<Self, ValidationError> {
        if value.is_empty() {
            return Err(ValidationError::new(field, "must not be empty"));
        }
        if let Ok(ip) = value.parse::<IpAddr>() {
            return Ok(Address::from(ip));
        }
        if let Some(v6) = value
            .strip_prefix('[')
            .and_then(|v| v.strip_suffix(']'))
            .and_then(|v| v.parse::<std::net::Ipv6Addr>().ok())
        {
            return Err(ValidationError::new(
                field,
                format!("must be an IP address without brackets, e.g. {v6}, got {value:?}"),
            ));
        }
        if value.len() > MAX_ADDRESS_LEN {
            return Err(ValidationError::new(
                field,
                format!(
                    "must be an IP address or a DNS name of at most {MAX_ADDRESS_LEN} characters"
                ),
            ));
        }
        let name = value.strip_suffix('.').unwrap_or(value);
        let label_ok = |label: &str| {
            !label.is_empty()
                && label.len() <= 63
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        };
        if !name.split('.').all(label_ok) {
            return Err(ValidationError::new(
                field,
                format!(
                    "must be an IP address or a DNS name (letters, digits, '-', '.'), got {value:?}"
                ),
            ));
        }
        if name.rsplit('.').next().is_some_and(is_numeric_label) {
            return Err(ValidationError::new(
                field,
                format!(
                    "must be an IP address or a DNS name, got {value:?}: a DNS name may not end in \
                     a number (resolvers read names like 127.1 or 0x7f.1 as IP addresses)"
                ),
            ));
        }
        Ok(Address {
            text: value.to_owned(),
            ip: None,
        })
    }

    /// The canonical text (the form HAProxy reports for an IP address).
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The IP address, when this is one.
    pub fn ip(&self) -> Option<IpAddr> {
        self.ip
    }

    /// The DNS name, when this is one.
    pub fn dns_name(&self) -> Option<&str> {
        match self.ip {
            None => Some(&self.text),
            Some(_) => None,
        }
    }
}

/// Whether a DNS label is a number as `inet_aton` reads one: decimal or octal digits, or `0x`
/// followed by hexadecimal digits.
fn is_numeric_label(label: &str) -> bool {
    let hex = label
        .strip_prefix("0x")
        .or_else(|| label.strip_prefix("0X"));
    match hex {
        Some(digits) => digits.chars().all(|c| c.is_ascii_hexdigit()),
        None => !label.is_empty() && label.chars().all(|c| c.is_ascii_digit()),
    }
}

impl From<IpAddr> for Address {
    fn from(ip: IpAddr) -> Self {
        Address {
            text: ip.to_string(),
            ip: Some(ip),
        }
    }
}

impl FromStr for Address {
    type Err = ValidationError;

    fn from_str(value: &str) -> Result<Self, ValidationError> {
        Self::parse_as(Self::FIELD, value)
    }
}

impl TryFrom<String> for Address {
    type Error = ValidationError;

    fn try_from(value: String) -> Result<Self, ValidationError> {
        value.parse()
    }
}

impl From<Address> for String {
    fn from(address: Address) -> String {
        address.text
    }
}

impl Serialize for Address {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.text)
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl AsRef<str> for Address {
    fn as_ref(&self) -> &str {
        &self.text
    }
}

/// Compares the canonical text: `"fd00::1"` equals the address parsed from `"FD00:0::1"`.
impl PartialEq<str> for Address {
    fn eq(&self, other: &str) -> bool {
        self.text == other
    }
}

impl PartialEq<&str> for Address {
    fn eq(&self, other: &&str) -> bool {
        self.text == *other
    }
}

impl PartialEq<String> for Address {
    fn eq(&self, other: &String) -> bool {
        self.text == *other
    }
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
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
}

/// A registration that passed validation, with defaults filled in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidSpec {
    pub address: Address,
    pub port: u16,
    pub version: Version,
    pub weight: u16,
    pub tags: Vec<Tag>,
    pub ttl_ms: u64,
    /// The node whose Docker engine runs the instance: set by Docker discovery, never by a
    /// registration over the API.
    pub node: Option<NodeName>,
    /// The zone it runs in, if it was given one.
    pub zone: Option<Zone>,
}

impl InstanceSpec {
    /// Validates every field and reports all problems at once.
    pub fn validate(&self) -> Result<ValidSpec, Vec<ValidationError>> {
        let mut errors = Vec::new();
        let address = self
            .address
            .parse::<Address>()
            .map_err(|e| errors.push(e))
            .ok();
        let port = validate_port("port", self.port)
            .map_err(|e| errors.push(e))
            .unwrap_or(0);
        let version = match &self.version {
            None => Some(Version::default()),
            Some(v) => v.parse::<Version>().map_err(|e| errors.push(e)).ok(),
        };
        let weight = match self.weight {
            None => DEFAULT_WEIGHT,
            Some(w) => validate_weight("weight", w)
                .map_err(|e| errors.push(e))
                .unwrap_or(0),
        };
        let tags: Vec<Tag> = self
            .tags
            .iter()
            .enumerate()
            .filter_map(|(i, tag)| {
                Tag::parse_as(&format!("tags[{i}]"), tag)
                    .map_err(|e| errors.push(e))
                    .ok()
            })
            .collect();
        if self.tags.len() > 32 {
            errors.push(ValidationError::new("tags", "at most 32 tags are allowed"));
        }
        let zone = match &self.zone {
            None => None,
            Some(z) => z.parse::<Zone>().map_err(|e| errors.push(e)).ok(),
        };
        let ttl_ms = self.ttl_ms.unwrap_or(DEFAULT_TTL_MS);
        if !(MIN_TTL_MS..=MAX_TTL_MS).contains(&ttl_ms) {
            errors.push(ValidationError::new(
                "ttl_ms",
                format!("must be between {MIN_TTL_MS} and {MAX_TTL_MS}, got {ttl_ms}"),
            ));
        }
        match (address, version) {
            (Some(address), Some(version)) if errors.is_empty() => Ok(ValidSpec {
                address,
                port,
                version,
                weight,
                tags,
                ttl_ms,
                node: None,
                zone,
            }),
            _ => Err(errors),
        }
    }
}

/// One live instance of a service, as the directory holds and reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instance {
    pub service: ServiceName,
    pub id: InstanceId,
    pub address: Address,
    pub port: u16,
    pub version: Version,
    pub weight: u16,
    #[serde(default)]
    pub tags: Vec<Tag>,
    pub source: Source,
    pub ttl_ms: u64,
    /// When the directory last heard of this instance, in milliseconds since the Unix epoch.
    pub last_seen: u64,
    /// When the instance joined the directory (its first registration, or the discovery of its
    /// container), in milliseconds since the Unix epoch: heartbeats and changes keep it, so
    /// `now - since` is its age. 0 from older directories.
    #[serde(default)]
    pub since: u64,
    /// `up`, or `draining` while an operator's drain of its id or version is in place (an
    /// older directory sends none: `up`).
    #[serde(default)]
    pub state: InstanceState,
    /// The drain's reason, while draining with one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<Reason>,
    /// The node whose Docker engine runs it, for an instance discovered from Docker (absent
    /// otherwise, and from older directories; older clients ignore it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<NodeName>,
    /// The zone it runs in (absent when it was given none, and from older directories).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<Zone>,
}

impl Instance {
    /// An instance with everyday values (10.0.0.1:8080, version 1, weight 100, from a
    /// registrar, 6 s TTL, last seen at 0), for tests to adjust with struct update syntax.
    ///
    /// # Panics
    /// When `service` or `id` is not a valid name.
    #[doc(hidden)]
    pub fn sample(service: &str, id: &str) -> Instance {
        Instance {
            service: service.parse().expect("a valid service name"),
            id: id.parse().expect("a valid instance id"),
            address: Address::from(IpAddr::from([10, 0, 0, 1])),
            port: 8080,
            version: Version::default(),
            weight: 100,
            tags: vec![],
            source: Source::Registrar,
            ttl_ms: 6000,
            last_seen: 0,
            since: 0,
            state: InstanceState::Up,
            reason: None,
            node: None,
            zone: None,
        }
    }

    /// Marks it with the drain of its id or version in `maintenance`, or `up` when there is
    /// none.
    pub fn mark(&mut self, maintenance: Option<&Maintenance>) {
        match maintenance.and_then(|m| m.drain_of(&self.id, &self.version)) {
            Some(drain) => {
                self.state = InstanceState::Draining;
                self.reason = drain.reason.clone();
            }
            None => {
                self.state = InstanceState::Up;
                self.reason = None;
            }
        }
    }
}

pub use crate::route::{
    route_falls_back, route_falls_back_by_version, validate_route, validate_route_of, Route,
    Target, MAX_ROUTE_TARGETS,
};

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
    pub services: BTreeMap<ServiceName, Vec<Instance>>,
}

/// `GET /v1/services/{service}`: one service's live instances and its route, if any.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceResponse {
    pub index: u64,
    pub service: ServiceName,
    pub instances: Vec<Instance>,
    #[serde(flatten, with = "crate::route::split_one")]
    pub route: Option<Route>,
}

/// `GET /v1/routes`: every route.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoutesResponse {
    pub index: u64,
    #[serde(flatten, with = "crate::route::split_all")]
    pub routes: BTreeMap<ServiceName, Route>,
}

/// `PUT /v1/routes/{service}` and `DELETE` answer with the service's route after the change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteResponse {
    pub index: u64,
    pub service: ServiceName,
    #[serde(flatten, with = "crate::route::split_one")]
    pub route: Option<Route>,
}

/// The error body of every failed call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

/// One line of `GET /v1/watch` (newline-delimited JSON, `application/x-ndjson`).
///
/// A watcher first gets one `snapshot`, then one event per change, and a `ping` every few
/// seconds when nothing else happens. The stream has two forms:
///
/// - **v2** (`GET /v1/watch?v=2`, what Baker's own parts ask for): an instance change is an
///   `upsert` or a `remove` carrying that one instance and its cause, a route change is a
///   `route` carrying the service's whole route; each carries `prev`, the `index` of the line
///   this stream sent before it. A watcher whose last index is not the next line's `prev` (or a
///   ping's `index`) missed something, and resyncs from a fresh snapshot by reconnecting.
/// - **v1** (no `v`, kept for one release for older watchers): an instance change is a
///   `service` event carrying the service's whole new instance list, and lines carry no `prev`.
///
/// `index` is the directory's revision: in memory it grows by one with every change to the
/// table, so an unfiltered stream's `prev` is always `index - 1`; on etcd it is the etcd
/// revision, which grows but not by one (and which changes made by one etcd revision share), so
/// only `prev` tells a gap. A stream filtered by service skips the revisions of other services. A watcher that falls too far behind is disconnected and should
/// reconnect, receiving a fresh snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum WatchEvent {
    /// The full state at `index` (only the filtered services' when the watch is filtered).
    Snapshot {
        index: u64,
        services: BTreeMap<ServiceName, Vec<Instance>>,
        #[serde(flatten, with = "crate::route::split_all")]
        routes: BTreeMap<ServiceName, Route>,
        /// Every service's drains (absent from an older directory, and when none).
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        maintenance: BTreeMap<ServiceName, Maintenance>,
    },
    /// v1: the whole new instance list of one service (empty when its last instance went away).
    Service {
        index: u64,
        service: ServiceName,
        instances: Vec<Instance>,
    },
    /// v2: one instance added or changed; `instance` is its whole new value.
    Upsert {
        index: u64,
        prev: u64,
        /// When it changed, in milliseconds since the Unix epoch.
        at: u64,
        cause: UpsertCause,
        instance: Instance,
    },
    /// v2: one instance went away; `instance` is its last value.
    Remove {
        index: u64,
        prev: u64,
        at: u64,
        cause: RemoveCause,
        instance: Instance,
    },
    /// The new route of one service (`null` when it was cleared); v2 adds `prev` and `at`.
    Route {
        index: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        prev: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        at: Option<u64>,
        service: ServiceName,
        #[serde(flatten, with = "crate::route::split_one")]
        route: Option<Route>,
    },
    /// v2: a service's drains changed; `maintenance` is its whole new maintenance (empty when
    /// nothing is drained any more), `action` the drain or undrain that changed it. The states
    /// of the service's instances follow from it; a v1 stream sends a `service` event instead.
    Maintenance {
        index: u64,
        prev: u64,
        at: u64,
        service: ServiceName,
        maintenance: Maintenance,
        action: MaintenanceAction,
    },
    /// Keep-alive, sent when nothing changed for a while; `index` is the index of the last line
    /// this stream sent.
    Ping { index: u64 },
}

impl WatchEvent {
    /// The directory's change index this event brings the watcher to.
    pub fn index(&self) -> u64 {
        match self {
            WatchEvent::Snapshot { index, .. }
            | WatchEvent::Service { index, .. }
            | WatchEvent::Upsert { index, .. }
            | WatchEvent::Remove { index, .. }
            | WatchEvent::Route { index, .. }
            | WatchEvent::Maintenance { index, .. }
            | WatchEvent::Ping { index } => *index,
        }
    }

    /// The index of the line the stream sent before this one, for v2 changes.
    pub fn prev(&self) -> Option<u64> {
        match self {
            WatchEvent::Upsert { prev, .. }
            | WatchEvent::Remove { prev, .. }
            | WatchEvent::Maintenance { prev, .. } => Some(*prev),
            WatchEvent::Route { prev, .. } => *prev,
            _ => None,
        }
    }

    /// The v2 event of `change`, sent after a line of index `prev`.
    pub fn of_change(change: Change, prev: u64) -> WatchEvent {
        match change {
            Change::Upsert {
                index,
                at,
                cause,
                instance,
                ..
            } => WatchEvent::Upsert {
                index,
                prev,
                at,
                cause,
                instance,
            },
            Change::Remove {
                index,
                at,
                cause,
                instance,
                ..
            } => WatchEvent::Remove {
                index,
                prev,
                at,
                cause,
                instance,
            },
            Change::Route {
                index,
                at,
                service,
                route,
                ..
            } => WatchEvent::Route {
                index,
                prev: Some(prev),
                at: Some(at),
                service,
                route,
            },
            Change::Maintenance {
                index,
                at,
                service,
                maintenance,
                action,
            } => WatchEvent::Maintenance {
                index,
                prev,
                at,
                service,
                maintenance,
                action,
            },
        }
    }
}

/// A directory's state as a watcher rebuilds it from the stream.
///
/// Each service's instances are kept sorted by id, as the directory lists them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct State {
    pub index: u64,
    pub services: BTreeMap<ServiceName, Vec<Instance>>,
    pub routes: BTreeMap<ServiceName, Route>,
    /// Every service's drains; each instance's `state` already follows them.
    pub maintenance: BTreeMap<ServiceName, Maintenance>,
}

impl State {
    /// Applies one event; a snapshot replaces everything.
    ///
    /// An `upsert` or `remove` costs a search in its service's instances, not a copy of them.
    pub fn apply(&mut self, event: WatchEvent) {
        match event {
            WatchEvent::Snapshot {
                index,
                services,
                routes,
                maintenance,
            } => {
                *self = State {
                    index,
                    services,
                    routes,
                    maintenance,
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
            WatchEvent::Upsert {
                index, instance, ..
            } => {
                self.index = index;
                let list = self.services.entry(instance.service.clone()).or_default();
                match list.binary_search_by(|i| i.id.cmp(&instance.id)) {
                    Ok(at) => list[at] = instance,
                    Err(at) => list.insert(at, instance),
                }
            }
            WatchEvent::Remove {
                index, instance, ..
            } => {
                self.index = index;
                if let Some(list) = self.services.get_mut(&instance.service) {
                    if let Ok(at) = list.binary_search_by(|i| i.id.cmp(&instance.id)) {
                        list.remove(at);
                    }
                    if list.is_empty() {
                        self.services.remove(&instance.service);
                    }
                }
            }
            WatchEvent::Route {
                index,
                service,
                route,
                ..
            } => {
                self.index = index;
                match route {
                    Some(r) => self.routes.insert(service, r),
                    None => self.routes.remove(&service),
                };
            }
            WatchEvent::Maintenance {
                index,
                service,
                maintenance,
                ..
            } => {
                self.index = index;
                for i in self.services.get_mut(&service).into_iter().flatten() {
                    i.mark(Some(&maintenance));
                }
                if maintenance.is_empty() {
                    self.maintenance.remove(&service);
                } else {
                    self.maintenance.insert(service, maintenance);
                }
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
            let name: ServiceName = ok.parse().unwrap();
            assert_eq!(name.as_str(), ok);
            assert_eq!(serde_json::to_string(&name).unwrap(), format!("{ok:?}"));
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
            let e = bad.parse::<ServiceName>().unwrap_err();
            assert_eq!(e.field, "service", "{bad}");
            let e = Tag::parse_as("tags[3]", bad).unwrap_err();
            assert_eq!(e.field, "tags[3]", "{bad}");
            let json = serde_json::to_string(bad).unwrap();
            let e = serde_json::from_str::<InstanceId>(&json).unwrap_err();
            assert!(e.to_string().starts_with("id: "), "{bad}: {e}");
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
            "0x7f.example",
            "1.2.3.example",
            "10.0.0.1a",
        ] {
            let a: Address = ok.parse().unwrap_or_else(|e| panic!("{ok}: {e}"));
            assert_eq!(a.as_str(), ok);
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
            let e = bad.parse::<Address>().unwrap_err();
            assert_eq!(e.field, "address", "{bad}");
        }
        // A URL's bracketed IPv6 host is refused with the spelling to use instead.
        let e = "[FD00:0::1]".parse::<Address>().unwrap_err();
        assert!(e.message.contains("without brackets, e.g. fd00::1"), "{e}");
    }

    #[test]
    fn node_names() {
        for ok in [
            "h1",
            "Johns-MacBook.local",
            "ip-10-0-0-1.ec2.internal",
            "n_2",
            &"a".repeat(253),
        ] {
            let node: NodeName = ok.parse().unwrap_or_else(|e| panic!("{ok}: {e}"));
            assert_eq!(node.as_str(), ok);
        }
        for (bad, says) in [
            ("", "must not be empty"),
            ("-h", "must start with a letter or digit"),
            (".h", "must start with a letter or digit"),
            ("h 1", "may contain only letters, digits"),
            ("h;1", "may contain only letters, digits"),
            ("h\nserver x", "may contain only letters, digits"),
            ("hé", "may contain only letters, digits"),
            (&"a".repeat(254), "at most 253 characters, got 254"),
        ] {
            let e = NodeName::parse_as("BAKER_NODE", bad).unwrap_err();
            assert_eq!(e.field, "BAKER_NODE", "{bad}");
            assert!(e.message.contains(says), "{bad:?}: {e}");
        }
    }

    #[test]
    fn the_node_travels_only_when_known() {
        let mut i = Instance::sample("web", "a");
        let json = serde_json::to_value(&i).unwrap();
        assert!(json.get("node").is_none(), "no node, no field: {json}");
        i.source = Source::Docker;
        i.node = Some("host-1".parse().unwrap());
        let json = serde_json::to_value(&i).unwrap();
        assert_eq!(json["node"], "host-1");
        assert_eq!(serde_json::from_value::<Instance>(json.clone()).unwrap(), i);
        // An instance from a directory that sends no node has none.
        let mut older = json.clone();
        older.as_object_mut().unwrap().remove("node");
        assert_eq!(
            serde_json::from_value::<Instance>(older).unwrap().node,
            None
        );
        let mut bad = json;
        bad["node"] = "a b".into();
        let e = serde_json::from_value::<Instance>(bad).unwrap_err();
        assert!(e.to_string().starts_with("node: "), "{e}");
    }

    #[test]
    fn ip_addresses_are_stored_in_canonical_form() {
        for (written, canonical) in [
            ("FD00::1", "fd00::1"),
            ("fd00:0::1", "fd00::1"),
            ("fd00:0000:0:0:0:0:0:0001", "fd00::1"),
            ("10.0.0.1", "10.0.0.1"),
        ] {
            let a: Address = written.parse().unwrap();
            assert_eq!(a.as_str(), canonical, "{written}");
            assert_eq!(a.ip(), Some(canonical.parse().unwrap()));
            let json = serde_json::to_string(written).unwrap();
            let a: Address = serde_json::from_str(&json).unwrap();
            assert_eq!(serde_json::to_string(&a).unwrap(), format!("{canonical:?}"));
        }
        assert_eq!("FD00::1".parse::<Address>(), "fd00:0::1".parse::<Address>());
        assert_eq!("db.".parse::<Address>().unwrap().dns_name(), Some("db."));
    }

    #[test]
    fn an_event_carrying_an_invalid_value_is_refused_whole() {
        let event = |id: &str, address: &str| {
            format!(
                r#"{{"type":"service","index":2,"service":"web","instances":[{{"service":"web","id":"{id}","address":"{address}","port":80,"version":"1","weight":100,"tags":[],"source":"registrar","ttl_ms":6000,"last_seen":0}}]}}"#
            )
        };
        assert!(serde_json::from_str::<WatchEvent>(&event("a", "10.0.0.1")).is_ok());
        let e = serde_json::from_str::<WatchEvent>(&event("B!", "10.0.0.1")).unwrap_err();
        assert!(e.to_string().contains("id: "), "{e}");
        let e = serde_json::from_str::<WatchEvent>(&event("a", "x\\nserver")).unwrap_err();
        assert!(e.to_string().contains("address: "), "{e}");
    }

    #[test]
    fn numeric_pseudo_hostnames_are_refused() {
        // Each of these is an IP address to glibc's inet_aton, another one than it looks like.
        for bad in [
            "010.000.000.001",
            "0x7f.1",
            "0x7F.0X1",
            "2130706433",
            "1.2.3",
            "10.0.0.256",
            "127.1",
            "0x",
            "0xffffffff",
            "1.2.3.4.",
            "a.b.1",
        ] {
            let e = bad.parse::<Address>().unwrap_err();
            assert_eq!(e.field, "address", "{bad}");
            assert!(e.message.contains("IP address"), "{bad}: {e}");
            assert!(Address::parse_as("host", bad).is_err(), "{bad}");
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
            zone: None,
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
        assert_eq!(v.address.as_str(), "10.0.0.1");
        assert!(
            serde_json::from_str::<InstanceSpec>(r#"{"address":"a","port":1,"evil":1}"#).is_err()
        );
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
                maintenance: BTreeMap::new(),
            },
            WatchEvent::Service {
                index: 2,
                service: inst.service.clone(),
                instances: vec![inst.clone()],
            },
            WatchEvent::Route {
                index: 3,
                prev: None,
                at: None,
                service: inst.service.clone(),
                route: Some([(Version::default(), 100)].into()),
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
        assert_eq!(state.services["emitter"], vec![inst.clone()]);
        state.apply(WatchEvent::Service {
            index: 4,
            service: inst.service.clone(),
            instances: vec![],
        });
        assert!(state.services.is_empty());
    }

    #[test]
    fn v2_changes_round_trip_and_apply_one_instance_at_a_time() {
        use crate::change::{Change, RemoveCause, UpsertCause};
        let at = |id: &str| Instance {
            last_seen: 5,
            ..Instance::sample("emitter", id)
        };
        let mut state = State::default();
        state.apply(WatchEvent::Snapshot {
            index: 1,
            services: [("emitter".parse().unwrap(), vec![at("b")])].into(),
            routes: BTreeMap::new(),
            maintenance: BTreeMap::new(),
        });
        let changes = [
            Change::Upsert {
                index: 2,
                at: 5,
                cause: UpsertCause::Registered,
                instance: at("c"),
                by: None,
            },
            Change::Upsert {
                index: 3,
                at: 5,
                cause: UpsertCause::Registered,
                instance: at("a"),
                by: None,
            },
            Change::Upsert {
                index: 4,
                at: 5,
                cause: UpsertCause::Changed,
                instance: Instance {
                    port: 81,
                    ..at("b")
                },
                by: None,
            },
            Change::Remove {
                index: 5,
                at: 6,
                cause: RemoveCause::Expired,
                instance: at("c"),
                by: None,
            },
            Change::Route {
                index: 6,
                at: 7,
                service: "emitter".parse().unwrap(),
                route: Some([(Version::default(), 100)].into()),
                origin: Some("cli from 127.0.0.1".into()),
                by: None,
            },
        ];
        for (prev, change) in (1..).zip(changes) {
            let event = WatchEvent::of_change(change, prev);
            let line = serde_json::to_string(&event).unwrap();
            let back: WatchEvent = serde_json::from_str(&line).unwrap();
            assert_eq!(back, event);
            assert_eq!(back.prev(), Some(prev));
            state.apply(back);
        }
        let ids: Vec<_> = state.services["emitter"]
            .iter()
            .map(|i| (i.id.as_str(), i.port))
            .collect();
        assert_eq!(
            ids,
            [("a", 8080), ("b", 81)],
            "sorted by id, as the directory lists"
        );
        assert_eq!((state.index, state.routes.len()), (6, 1));
        // An unknown cause from a newer directory still reads.
        let newer = r#"{"type":"remove","index":7,"prev":6,"at":0,"cause":"drained","instance":{"service":"emitter","id":"a","address":"10.0.0.1","port":80,"version":"1","weight":100,"source":"registrar","ttl_ms":6000,"last_seen":0}}"#;
        let event: WatchEvent = serde_json::from_str(newer).unwrap();
        assert!(matches!(
            event,
            WatchEvent::Remove {
                cause: RemoveCause::Other,
                ..
            }
        ));
        state.apply(event);
        assert_eq!(state.services["emitter"].len(), 1);
    }

    #[test]
    fn a_maintenance_change_marks_the_services_instances() {
        use crate::change::{Change, MaintenanceAction};
        use crate::maintenance::{Drain, InstanceState, Maintenance, Target};
        let mut state = State::default();
        state.apply(WatchEvent::Snapshot {
            index: 1,
            services: [(
                "web".parse().unwrap(),
                vec![Instance::sample("web", "a"), Instance::sample("web", "b")],
            )]
            .into(),
            routes: BTreeMap::new(),
            maintenance: BTreeMap::new(),
        });
        let target = Target::Instance("a".parse().unwrap());
        let mut drains = Maintenance::default();
        drains.insert(
            target.clone(),
            Drain {
                reason: Some("disk".parse().unwrap()),
                since: 3,
                origin: "ui from 10.0.0.9".into(),
            },
        );
        let change = |index, maintenance: Maintenance, drained| Change::Maintenance {
            index,
            at: 3,
            service: "web".parse().unwrap(),
            maintenance,
            action: MaintenanceAction {
                drained,
                target: target.clone(),
                reason: Some("disk".parse().unwrap()),
                origin: "ui from 10.0.0.9".into(),
                by: None,
            },
        };
        let event = WatchEvent::of_change(change(2, drains.clone(), true), 1);
        let line = serde_json::to_string(&event).unwrap();
        assert!(
            line.starts_with(r#"{"type":"maintenance","index":2,"prev":1,"#),
            "{line}"
        );
        state.apply(serde_json::from_str(&line).unwrap());
        let states: Vec<_> = state.services["web"]
            .iter()
            .map(|i| (i.state, i.reason.as_ref().map(Reason::as_str)))
            .collect();
        assert_eq!(
            states,
            [
                (InstanceState::Draining, Some("disk")),
                (InstanceState::Up, None)
            ]
        );
        assert_eq!(state.maintenance["web"], drains);
        state.apply(WatchEvent::of_change(
            change(3, Maintenance::default(), false),
            2,
        ));
        assert!(state.services["web"].iter().all(|i| i.state.is_up()));
        assert!(state.maintenance.is_empty());
        // An instance from an older directory, with no state, is up.
        let old = r#"{"service":"web","id":"a","address":"10.0.0.1","port":80,"version":"1","weight":100,"source":"registrar","ttl_ms":6000,"last_seen":0}"#;
        let i: Instance = serde_json::from_str(old).unwrap();
        assert_eq!((i.state, i.reason), (InstanceState::Up, None));
    }
}
