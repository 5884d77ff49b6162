//! Maintenance: instances an operator drained, and the wire types of `/v1/maintenance`.
//!
//! A drain takes one instance, or every instance of one version, out of rotation on every
//! ambassador without deregistering it: HAProxy stops sending it new requests, and the ones in
//! flight finish. A drain is hard state, like a route: the directory persists it, and it
//! applies to an instance that registers later under the drained id or version. The directory
//! marks each instance it lists with its [`InstanceState`] (`up` or `draining`, with the
//! reason), so ambassadors and every other watcher see the same thing.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::model::{InstanceId, ServiceName, ValidationError, Version};

/// Longest maintenance reason, in characters.
pub const MAX_REASON_CHARS: usize = 200;

/// Longest client name an operator call may give in [`ORIGIN_HEADER`].
pub const MAX_CLIENT_CHARS: usize = 64;

/// The header an operator call names its client in (`cli`, `ui`, `cli:alice`); the directory
/// records it, with the caller's address, as the origin of the change.
pub const ORIGIN_HEADER: &str = "x-baker-origin";

/// Why an operator drained an instance: printable ASCII (letters, digits, spaces and
/// punctuation), 1 to [`MAX_REASON_CHARS`] characters. It is shown to people (the CLI, the
/// dashboard, where it is escaped) and never reaches HAProxy.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Reason(String);

impl Reason {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Reason {
    type Error = ValidationError;

    fn try_from(value: String) -> Result<Self, ValidationError> {
        value.parse()
    }
}

impl From<Reason> for String {
    fn from(r: Reason) -> String {
        r.0
    }
}

impl std::str::FromStr for Reason {
    type Err = ValidationError;

    fn from_str(value: &str) -> Result<Self, ValidationError> {
        let value = value.trim();
        let chars = value.chars().count();
        if chars == 0 {
            return Err(ValidationError::new("reason", "must not be empty"));
        }
        if chars > MAX_REASON_CHARS {
            return Err(ValidationError::new(
                "reason",
                format!("must be at most {MAX_REASON_CHARS} characters, got {chars}"),
            ));
        }
        if let Some(bad) = value.chars().find(|c| !(' '..='~').contains(c)) {
            return Err(ValidationError::new(
                "reason",
                format!(
                    "may contain only printable ASCII (letters, digits, spaces, punctuation), \
                     got {bad:?}"
                ),
            ));
        }
        Ok(Reason(value.to_owned()))
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Checks the client name of an operator call (the [`ORIGIN_HEADER`]): 1 to
/// [`MAX_CLIENT_CHARS`] letters, digits, `.`, `_`, `-`, `:` or `@`.
pub fn validate_client(value: &str) -> Result<&str, ValidationError> {
    let field = "X-Baker-Origin";
    let chars = value.chars().count();
    if chars == 0 || chars > MAX_CLIENT_CHARS {
        return Err(ValidationError::new(
            field,
            format!("must be 1 to {MAX_CLIENT_CHARS} characters, got {chars}"),
        ));
    }
    match value
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | ':' | '@')))
    {
        Some(bad) => Err(ValidationError::new(
            field,
            format!("may contain only letters, digits, '.', '_', '-', ':' and '@', got {bad:?}"),
        )),
        None => Ok(value),
    }
}

/// One drain: an instance, or every instance of a version, takes no new requests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Drain {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<Reason>,
    /// When it was drained, in milliseconds since the Unix epoch.
    pub since: u64,
    /// Where the call came from: the caller's address, after the client it named
    /// (`cli:alice from 10.0.0.5`) when it named one.
    pub origin: String,
}

/// A service's maintenance: the instances and versions drained. An instance is drained when
/// its id or its version is listed, whether it is registered yet or not.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Maintenance {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub instances: BTreeMap<InstanceId, Drain>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub versions: BTreeMap<Version, Drain>,
}

impl Maintenance {
    pub fn is_empty(&self) -> bool {
        self.instances.is_empty() && self.versions.is_empty()
    }

    /// How many drains it holds.
    pub fn len(&self) -> usize {
        self.instances.len() + self.versions.len()
    }

    /// The drain that applies to an instance `id` of `version`: its own first, else its
    /// version's.
    pub fn drain_of(&self, id: &InstanceId, version: &Version) -> Option<&Drain> {
        self.instances
            .get(id)
            .or_else(|| self.versions.get(version))
    }

    /// The drain of `target`.
    pub fn get(&self, target: &Target) -> Option<&Drain> {
        match target {
            Target::Instance(id) => self.instances.get(id),
            Target::Version(v) => self.versions.get(v),
        }
    }

    /// Drains `target` (replacing its drain); the drain it replaced.
    pub fn insert(&mut self, target: Target, drain: Drain) -> Option<Drain> {
        match target {
            Target::Instance(id) => self.instances.insert(id, drain),
            Target::Version(v) => self.versions.insert(v, drain),
        }
    }

    /// Undrains `target`; its drain, if it was drained.
    pub fn remove(&mut self, target: &Target) -> Option<Drain> {
        match target {
            Target::Instance(id) => self.instances.remove(id),
            Target::Version(v) => self.versions.remove(v),
        }
    }

    /// Its drains as listed by `GET /v1/maintenance`: instances first, then versions.
    pub fn entries(&self, service: &ServiceName) -> Vec<MaintenanceEntry> {
        let instances = self
            .instances
            .iter()
            .map(|(id, d)| MaintenanceEntry::of(service, &Target::Instance(id.clone()), d));
        let versions = self
            .versions
            .iter()
            .map(|(v, d)| MaintenanceEntry::of(service, &Target::Version(v.clone()), d));
        instances.chain(versions).collect()
    }
}

/// What an operator drains: one instance, or every instance of a version.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "kind", content = "name")]
pub enum Target {
    Instance(InstanceId),
    Version(Version),
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Instance(id) => write!(f, "instance {id}"),
            Target::Version(v) => write!(f, "version {v}"),
        }
    }
}

/// An instance's state, as the directory lists it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InstanceState {
    /// Takes requests.
    #[default]
    Up,
    /// Drained by an operator: registered and healthy, but gets no new requests.
    Draining,
}

impl InstanceState {
    pub fn is_up(&self) -> bool {
        *self == InstanceState::Up
    }
}

impl fmt::Display for InstanceState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            InstanceState::Up => "up",
            InstanceState::Draining => "draining",
        })
    }
}

/// The body of `PUT /v1/maintenance/{service}/...` (may be empty or `{}`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DrainRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// One drain as `GET /v1/maintenance` lists it: exactly one of `id` and `version` is set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MaintenanceEntry {
    pub service: ServiceName,
    pub id: Option<InstanceId>,
    pub version: Option<Version>,
    pub reason: Option<Reason>,
    /// When it was drained, in milliseconds since the Unix epoch.
    pub since: u64,
    pub origin: String,
}

impl MaintenanceEntry {
    /// The entry of `drain` of `target` in `service`.
    pub fn of(service: &ServiceName, target: &Target, drain: &Drain) -> MaintenanceEntry {
        let (id, version) = match target {
            Target::Instance(id) => (Some(id.clone()), None),
            Target::Version(v) => (None, Some(v.clone())),
        };
        MaintenanceEntry {
            service: service.clone(),
            id,
            version,
            reason: drain.reason.clone(),
            since: drain.since,
            origin: drain.origin.clone(),
        }
    }

    /// What it drains.
    pub fn target(&self) -> Option<Target> {
        match (&self.id, &self.version) {
            (Some(id), None) => Some(Target::Instance(id.clone())),
            (None, Some(v)) => Some(Target::Version(v.clone())),
            _ => None,
        }
    }
}

/// `GET /v1/maintenance`: every drain, by service, instances before versions.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MaintenanceResponse {
    pub index: u64,
    pub maintenance: Vec<MaintenanceEntry>,
}

/// The answer to a drain (`PUT`) or an undrain (`DELETE`): the drain set or lifted, and the
/// index of the change (the current index when the drain was already in place).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrainResponse {
    pub index: u64,
    pub drain: MaintenanceEntry,
}

/// An instance's state as operators read it: `up`, `draining`, or `draining (reason)`.
pub fn describe_state(state: InstanceState, reason: Option<&Reason>) -> String {
    match (state, reason) {
        (InstanceState::Up, _) => "up".to_owned(),
        (InstanceState::Draining, Some(r)) => format!("draining ({r})"),
        (InstanceState::Draining, None) => "draining".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_are_short_printable_ascii() {
        for ok in ["kernel upgrade", "<b>\"x\" & 'y'</b>", &"a".repeat(200)] {
            assert_eq!(ok.parse::<Reason>().unwrap().as_str(), ok);
        }
        assert_eq!("  padded  ".parse::<Reason>().unwrap().as_str(), "padded");
        for (bad, says) in [
            ("", "must not be empty"),
            ("   ", "must not be empty"),
            (&"a".repeat(201) as &str, "at most 200"),
            ("a\nb", "printable ASCII"),
            ("caf\u{e9}", "printable ASCII"),
            ("a\u{202e}b", "printable ASCII"),
        ] {
            let e = bad.parse::<Reason>().unwrap_err();
            assert_eq!(e.field, "reason");
            assert!(e.message.contains(says), "{bad:?}: {e}");
        }
        let e = serde_json::from_str::<Reason>("\"a\\u0000\"").unwrap_err();
        assert!(e.to_string().contains("printable ASCII"), "{e}");
    }

    #[test]
    fn client_names_are_short_words() {
        for ok in [
            "cli",
            "ui",
            "cli:alice",
            "alice@laptop.example",
            &"a".repeat(64),
        ] {
            assert_eq!(validate_client(ok).unwrap(), ok);
        }
        for bad in ["", "a b", "a\nb", "<script>", &"a".repeat(65), "caf\u{e9}"] {
            let e = validate_client(bad).unwrap_err();
            assert_eq!(e.field, "X-Baker-Origin", "{bad:?}");
        }
    }

    #[test]
    fn an_instance_is_drained_by_its_id_or_its_version() {
        let drain = |r: Option<&str>| Drain {
            reason: r.map(|r| r.parse().unwrap()),
            since: 0,
            origin: "test".into(),
        };
        let mut m = Maintenance::default();
        m.insert(Target::Instance("a".parse().unwrap()), drain(Some("disk")));
        m.insert(Target::Version("2".parse().unwrap()), drain(None));
        let id = |s: &str| s.parse::<InstanceId>().unwrap();
        let v = |s: &str| s.parse::<Version>().unwrap();
        let of = |i: &str, ver: &str| m.drain_of(&id(i), &v(ver)).map(|d| d.reason.clone());
        assert_eq!(of("a", "2"), Some(Some("disk".parse().unwrap())));
        assert_eq!(of("b", "2"), Some(None));
        assert_eq!(of("b", "1"), None);
        let entries = m.entries(&"web".parse().unwrap());
        assert_eq!(entries.len(), 2);
        assert_eq!(
            entries[0].target(),
            Some(Target::Instance("a".parse().unwrap()))
        );
        assert_eq!(
            serde_json::to_value(&entries[1]).unwrap(),
            serde_json::json!({"service": "web", "id": null, "version": "2", "reason": null,
                               "since": 0, "origin": "test"})
        );
        assert!(m.remove(&Target::Version(v("2"))).is_some());
        assert_eq!(m.len(), 1);
        assert_eq!(
            describe_state(InstanceState::Draining, Some(&"disk".parse().unwrap())),
            "draining (disk)"
        );
        assert_eq!(describe_state(InstanceState::Up, None), "up");
    }
}
