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

use crate::model::{Address, InstanceId, ServiceName, ValidationError, Zone};

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
    /// The instance runs in the ambassador's zone.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub local: bool,
}

/// Where an ambassador with a zone sent its requests since its previous report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Locality {
    /// The ambassador's zone (`BAKER_ZONE`).
    pub zone: Zone,
    /// Requests (HTTP) or connections (TCP) its servers got since the previous report.
    pub requests: u64,
    /// Those of them that went to instances of its own zone.
    pub local: u64,
}

impl Locality {
    /// The share of the requests that stayed in the zone, in percent (`None` with no request).
    pub fn local_percent(&self) -> Option<f64> {
        (self.requests > 0).then(|| self.local as f64 * 100.0 / self.requests as f64)
    }
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
    /// Its zone and where its traffic went, for an ambassador with a zone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub locality: Option<Locality>,
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
