//! The directory's history: what happened, when, why, and on whose call (`GET /v1/events`).
//!
//! The directory keeps the last changes of its table as [`Event`]s, each made from one
//! [`Change`] of the change feed by [`Event::of`]: the same changes the watch stream sends,
//! told for people (a kind, a cause in words, the origin of an operator's call).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::change::{Change, RemoveCause, UpsertCause};
use crate::maintenance::{Reason, Target};
use crate::model::{InstanceId, Route, ServiceName, Version};

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// A new instance registered over the API.
    Registered,
    /// An instance registered again with other fields.
    Changed,
    /// Its registrar (or a call) deregistered it.
    Deregistered,
    /// No heartbeat within its TTL.
    Expired,
    /// Docker discovery registered (or updated) a running, healthy container.
    DockerStarted,
    /// Its container stopped, died or was removed.
    DockerStopped,
    /// Its container is running but not fit to serve.
    DockerUnhealthy,
    /// Its container lost or broke its labels, left the network, or changed service or id.
    DockerLeftOut,
    /// It was not listed when Docker discovery resynced.
    DockerResync,
    RouteSet,
    RouteCleared,
    Drained,
    Undrained,
    /// A kind this build does not know (from a newer directory).
    #[serde(other)]
    Other,
}

/// One entry of the history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// The revision of the change.
    pub index: u64,
    /// When it happened, in milliseconds since the Unix epoch.
    pub at: u64,
    pub service: ServiceName,
    /// The instance it concerns, if one.
    pub id: Option<InstanceId>,
    pub kind: EventKind,
    /// Why, in words.
    pub cause: String,
    /// Where an operator's call came from (route and drain changes).
    pub origin: Option<String>,
    /// The instance's version, or the version drained.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<Version>,
    /// The instance's `address:port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// The route set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route: Option<Route>,
    /// The drain's reason.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<Reason>,
}

impl Event {
    /// The history's account of `change`.
    pub fn of(change: &Change) -> Event {
        let base = |service: &ServiceName, kind, cause: String| Event {
            index: change.index(),
            at: change.at(),
            service: service.clone(),
            id: None,
            kind,
            cause,
            origin: None,
            version: None,
            address: None,
            route: None,
            reason: None,
        };
        let of_instance = |i: &crate::model::Instance, kind, cause: String| {
            let address = if i.address.as_str().contains(':') {
                format!("[{}]:{}", i.address, i.port)
            } else {
                format!("{}:{}", i.address, i.port)
            };
            Event {
                id: Some(i.id.clone()),
                version: Some(i.version.clone()),
                address: Some(address),
                ..base(&i.service, kind, cause)
            }
        };
        match change {
            Change::Upsert {
                cause, instance, ..
            } => {
                let (kind, why) = match cause {
                    UpsertCause::Registered => (EventKind::Registered, "registered over the API"),
                    UpsertCause::Changed => (
                        EventKind::Changed,
                        "registered again with another address, port, version, weight, tags or TTL",
                    ),
                    UpsertCause::Docker => (
                        EventKind::DockerStarted,
                        "Docker discovery found its container running (and healthy)",
                    ),
                    UpsertCause::Other => (EventKind::Other, "changed"),
                };
                of_instance(instance, kind, why.to_owned())
            }
            Change::Remove {
                cause, instance, ..
            } => {
                let (kind, why) = match cause {
                    RemoveCause::Deregistered => (
                        EventKind::Deregistered,
                        "deregistered over the API".to_owned(),
                    ),
                    RemoveCause::Expired => (
                        EventKind::Expired,
                        format!("no heartbeat within its TTL of {} ms", instance.ttl_ms),
                    ),
                    RemoveCause::DockerStopped => (
                        EventKind::DockerStopped,
                        "its container stopped, died or was removed".to_owned(),
                    ),
                    RemoveCause::DockerUnhealthy => (
                        EventKind::DockerUnhealthy,
                        "its container is unhealthy, starting, paused or restarting".to_owned(),
                    ),
                    RemoveCause::DockerLeftOut => (
                        EventKind::DockerLeftOut,
                        "its container lost its labels, left the network, or changed service or id"
                            .to_owned(),
                    ),
                    RemoveCause::DockerResync => (
                        EventKind::DockerResync,
                        "its container was not listed when Docker discovery resynced".to_owned(),
                    ),
                    RemoveCause::Other => (EventKind::Other, "removed".to_owned()),
                };
                of_instance(instance, kind, why)
            }
            Change::Route {
                service,
                route,
                origin,
                ..
            } => {
                let (kind, why) = match (route, origin) {
                    (Some(_), Some(_)) => (EventKind::RouteSet, "set by an operator"),
                    (None, Some(_)) => (EventKind::RouteCleared, "cleared by an operator"),
                    (Some(_), None) => (
                        EventKind::RouteSet,
                        "put back by the directory: the new route could not be saved",
                    ),
                    (None, None) => (
                        EventKind::RouteCleared,
                        "put back by the directory: the new route could not be saved",
                    ),
                };
                Event {
                    origin: origin.clone(),
                    route: route.clone(),
                    ..base(service, kind, why.to_owned())
                }
            }
            Change::Maintenance {
                service, action, ..
            } => {
                let kind = if action.drained {
                    EventKind::Drained
                } else {
                    EventKind::Undrained
                };
                let verb = if action.drained {
                    "drained"
                } else {
                    "undrained"
                };
                let (id, version) = match &action.target {
                    Target::Instance(id) => (Some(id.clone()), None),
                    Target::Version(v) => (None, Some(v.clone())),
                };
                Event {
                    id,
                    version,
                    origin: Some(action.origin.clone()),
                    reason: action.reason.clone(),
                    ..base(
                        service,
                        kind,
                        format!("{} {verb} by an operator", action.target),
                    )
                }
            }
        }
    }
}

/// `GET /v1/events`: the events asked for, oldest first, and the directory's index.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventsResponse {
    pub index: u64,
    pub events: Vec<Event>,
    /// How many events the directory keeps at most (`BAKER_HISTORY`).
    pub capacity: usize,
}

/// Parses a point in time as the directory's `since` and `until` take it: milliseconds since
/// the Unix epoch, or an RFC 3339 time (`2026-12-03T10:00:00Z`). Answers milliseconds.
pub fn parse_time(value: &str) -> Result<u64, String> {
    let value = value.trim();
    if let Ok(ms) = value.parse::<u64>() {
        return Ok(ms);
    }
    let t = humantime::parse_rfc3339_weak(value).map_err(|_| {
        format!(
            "must be milliseconds since the Unix epoch or an RFC 3339 time such as \
             2026-12-03T10:00:00Z, got {:?}",
            crate::model::printable(value)
        )
    })?;
    Ok(unix_millis_of(t))
}

/// Milliseconds since the Unix epoch of `t` (0 before it).
pub fn unix_millis_of(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

/// Milliseconds since the Unix epoch, now: the time stamp of instances, events and reports.
pub fn unix_millis() -> u64 {
    unix_millis_of(SystemTime::now())
}

/// `t` as RFC 3339 in UTC, to the second.
pub fn rfc3339(ms: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::change::MaintenanceAction;
    use crate::model::Instance;

    #[test]
    fn every_change_becomes_an_event_with_its_kind_cause_and_origin() {
        let i = Instance::sample("web", "a");
        let expired = Event::of(&Change::Remove {
            index: 4,
            at: 9,
            cause: RemoveCause::Expired,
            instance: i.clone(),
        });
        assert_eq!(
            serde_json::to_value(&expired).unwrap(),
            serde_json::json!({"index": 4, "at": 9, "service": "web", "id": "a",
                "kind": "expired", "cause": "no heartbeat within its TTL of 6000 ms",
                "origin": null, "version": "1", "address": "10.0.0.1:8080"})
        );
        let docker = Event::of(&Change::Upsert {
            index: 5,
            at: 9,
            cause: UpsertCause::Docker,
            instance: i.clone(),
        });
        assert_eq!(docker.kind, EventKind::DockerStarted);
        let route = Event::of(&Change::Route {
            index: 6,
            at: 9,
            service: "web".parse().unwrap(),
            route: None,
            origin: Some("cli:alice from 10.0.0.1".into()),
        });
        assert_eq!(
            (route.kind, route.origin.as_deref()),
            (EventKind::RouteCleared, Some("cli:alice from 10.0.0.1"))
        );
        let drained = Event::of(&Change::Maintenance {
            index: 7,
            at: 9,
            service: "web".parse().unwrap(),
            maintenance: Default::default(),
            action: MaintenanceAction {
                drained: false,
                target: Target::Version("2".parse().unwrap()),
                reason: Some("disk".parse().unwrap()),
                origin: "ui from 10.0.0.2".into(),
            },
        });
        assert_eq!(drained.kind, EventKind::Undrained);
        assert_eq!((drained.id, drained.version.unwrap().as_str()), (None, "2"));
        assert_eq!(drained.cause, "version 2 undrained by an operator");
        let unknown: EventKind = serde_json::from_str("\"teleported\"").unwrap();
        assert_eq!(unknown, EventKind::Other);
    }

    #[test]
    fn times_are_milliseconds_or_rfc3339() {
        assert_eq!(parse_time("1796292666510"), Ok(1_796_292_666_510));
        assert_eq!(parse_time("1970-01-01T00:00:01Z"), Ok(1000));
        assert_eq!(parse_time("1970-01-01T00:00:01.5Z"), Ok(1500));
        assert!(parse_time("10m").unwrap_err().contains("RFC 3339"));
        assert_eq!(rfc3339(1500), "1970-01-01T00:00:01Z");
    }
}
