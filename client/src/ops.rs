//! Wire types of operations: what ambassadors report about themselves, and what the directory
//! tells operators about them (`GET /v1/ambassadors`), including the traffic each instance got.
//!
//! A report is soft state: an ambassador sends one every few seconds with `PUT
//! /v1/ambassadors/{id}`, and the directory forgets it when no new one comes. Reports are not
//! changes of the directory's table: they bump no index and are not on the watch stream (an
//! ambassador applying a change and reporting that it did would otherwise never catch up).

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::model::{Address, InstanceId, ServiceName, ValidationError, Version};

/// Shortest and longest time a report may ask to be kept without a new one.
pub const MIN_REPORT_TTL_MS: u64 = 500;
pub const MAX_REPORT_TTL_MS: u64 = 600_000;
/// Most servers one report may list.
pub const MAX_REPORT_SERVERS: usize = 10_000;
/// Most services one report may list.
pub const MAX_REPORT_SERVICES: usize = 1_000;

/// How an ambassador exposes a service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Http,
    Tcp,
}

/// One service an ambassador serves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Served {
    pub service: ServiceName,
    /// Its own local port; absent when it is reached only through the shared HTTP port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    pub mode: Mode,
}

/// A server's state as the ambassador's HAProxy sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ServerState {
    /// Takes traffic.
    Up,
    /// Marked down by HAProxy: failed checks, or errors observed on live traffic (`observe`).
    Down,
    /// Draining: no new requests, the ones in flight finish.
    Drain,
    /// In maintenance: no traffic at all (a server on its way out).
    Maint,
}

impl fmt::Display for ServerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ServerState::Up => "up",
            ServerState::Down => "down",
            ServerState::Drain => "drain",
            ServerState::Maint => "maint",
        })
    }
}

/// One server of one backend in an ambassador's HAProxy, with its counters from `show stat`
/// (since the HAProxy worker started: a reload starts them again from zero).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerReport {
    pub service: ServiceName,
    pub id: InstanceId,
    pub state: ServerState,
    pub weight: u16,
    /// Requests sent to it (HTTP), or connections (TCP).
    pub requests: u64,
    /// Connection errors, response errors and 5xx answers.
    pub errors: u64,
    /// Sessions open right now.
    pub sessions: u64,
}

/// The body of `PUT /v1/ambassadors/{id}`: an ambassador's account of itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AmbassadorReport {
    /// The host it runs on (its hostname).
    pub host: Address,
    pub services: Vec<Served>,
    /// The directory's index whose changes this ambassador's HAProxy has applied.
    pub applied_index: u64,
    /// HAProxy reloads since the ambassador started.
    pub reloads: u64,
    pub servers: Vec<ServerReport>,
    /// How long the directory keeps the report without a new one.
    pub ttl_ms: u64,
}

impl AmbassadorReport {
    /// Checks the limits serde cannot: the TTL and the list lengths.
    pub fn validate(&self) -> Result<(), Vec<ValidationError>> {
        let mut errors = Vec::new();
        if !(MIN_REPORT_TTL_MS..=MAX_REPORT_TTL_MS).contains(&self.ttl_ms) {
            errors.push(ValidationError::new(
                "ttl_ms",
                format!(
                    "must be between {MIN_REPORT_TTL_MS} and {MAX_REPORT_TTL_MS}, got {}",
                    self.ttl_ms
                ),
            ));
        }
        if self.services.len() > MAX_REPORT_SERVICES {
            errors.push(ValidationError::new(
                "services",
                format!("at most {MAX_REPORT_SERVICES} are allowed"),
            ));
        }
        if self.servers.len() > MAX_REPORT_SERVERS {
            errors.push(ValidationError::new(
                "servers",
                format!("at most {MAX_REPORT_SERVERS} are allowed"),
            ));
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }
}

/// The answer to a report: the directory's current index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportAck {
    pub index: u64,
}

/// One ambassador as `GET /v1/ambassadors` shows it: its last report and what the directory
/// makes of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AmbassadorStatus {
    pub id: InstanceId,
    /// Whether its last report is younger than the report's TTL.
    pub live: bool,
    /// Whether it has applied every change to the services it serves: its applied index is
    /// at least `wanted_index`.
    pub caught_up: bool,
    /// The directory's index of the last change to a service this ambassador serves (it
    /// watches only those services, so later changes of others are not its to apply).
    pub wanted_index: u64,
    /// Milliseconds since its last report.
    pub age_ms: u64,
    /// When the directory received its last report, in milliseconds since the Unix epoch.
    pub last_seen: u64,
    /// The address the report came from.
    pub peer: String,
    pub report: AmbassadorReport,
}

/// Requests and errors of one instance, summed over the live ambassadors.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Traffic {
    pub requests: u64,
    pub errors: u64,
    pub sessions: u64,
    /// How many live ambassadors have it as a server.
    pub ambassadors: u64,
    /// How many of those see it as `up` (the others: down, draining or in maintenance).
    pub up: u64,
}

/// `GET /v1/ambassadors`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AmbassadorsResponse {
    /// The directory's current index, which `caught_up` compares with.
    pub index: u64,
    pub ambassadors: Vec<AmbassadorStatus>,
    /// Per service and instance, the traffic summed over the live ambassadors.
    pub traffic: BTreeMap<ServiceName, BTreeMap<InstanceId, Traffic>>,
}

impl AmbassadorsResponse {
    /// The live ambassadors serving `service` that have not yet applied its change `index`.
    pub fn behind<'a>(&'a self, service: &'a ServiceName, index: u64) -> Vec<&'a AmbassadorStatus> {
        self.serving(service)
            .filter(|a| a.report.applied_index < index)
            .collect()
    }

    /// The live ambassadors serving `service`.
    pub fn serving<'a>(
        &'a self,
        service: &'a ServiceName,
    ) -> impl Iterator<Item = &'a AmbassadorStatus> + 'a {
        self.ambassadors
            .iter()
            .filter(move |a| a.live && a.report.services.iter().any(|s| &s.service == service))
    }
}

/// Longest maintenance reason, in characters.
pub const MAX_REASON_CHARS: usize = 200;

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
                     got {:?}",
                    bad
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

/// One drain: an instance, or every instance of a version, takes no new requests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Drain {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<Reason>,
    /// When it was drained, in milliseconds since the Unix epoch.
    pub since: u64,
    /// Where the call came from: the caller's address, and `cli` or `ui` when it said so.
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

    /// The drain that applies to an instance `id` of `version`: its own first, else its
    /// version's.
    pub fn drain_of(&self, id: &InstanceId, version: &Version) -> Option<&Drain> {
        self.instances
            .get(id)
            .or_else(|| self.versions.get(version))
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

/// The body of `PUT /v1/maintenance/{service}/...` (may be empty or `{}`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DrainRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// `GET /v1/maintenance`, and the answer to a drain or undrain: every service's maintenance.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MaintenanceResponse {
    pub index: u64,
    pub maintenance: BTreeMap<ServiceName, Maintenance>,
}

/// An instance's state as operators see it: `up`, or `draining` with the drain.
pub fn instance_state(m: Option<&Maintenance>, id: &InstanceId, version: &Version) -> String {
    match m.and_then(|m| m.drain_of(id, version)) {
        None => "up".to_owned(),
        Some(Drain {
            reason: Some(r), ..
        }) => format!("draining ({r})"),
        Some(_) => "draining".to_owned(),
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
    fn an_instance_is_drained_by_its_id_or_its_version() {
        let drain = |r: Option<&str>| Drain {
            reason: r.map(|r| r.parse().unwrap()),
            since: 0,
            origin: "test".into(),
        };
        let m = Maintenance {
            instances: [("a".parse().unwrap(), drain(Some("disk")))].into(),
            versions: [("2".parse().unwrap(), drain(None))].into(),
        };
        let id = |s: &str| s.parse::<InstanceId>().unwrap();
        let v = |s: &str| s.parse::<Version>().unwrap();
        assert_eq!(
            instance_state(Some(&m), &id("a"), &v("1")),
            "draining (disk)"
        );
        assert_eq!(instance_state(Some(&m), &id("b"), &v("2")), "draining");
        assert_eq!(instance_state(Some(&m), &id("b"), &v("1")), "up");
        assert_eq!(instance_state(None, &id("a"), &v("1")), "up");
    }
}
