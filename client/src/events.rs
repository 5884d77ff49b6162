//! The directory's history: what happened, when, why, and on whose call (`GET /v1/events`).
//!
//! The directory keeps the last changes of its table as [`Event`]s, each made from one
//! [`Change`] of the change feed by [`Event::of`]: the same changes the watch stream sends,
//! told for people (a kind, a cause in words, the origin of an operator's call, and who made
//! it: the name of the call's token, or a fixed word of [`crate::change::by`]).

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
    /// Who made it: the name of the token of the call that made it, `BAKER_TOKEN`, or
    /// `anonymous` (a call with no token while changes need none), `docker` (Docker
    /// discovery), `expiry` (no heartbeat within the TTL), `etcd` (the store itself); `None`
    /// from an older directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
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
            by: change.by().map(str::to_owned),
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
                        "registered again with another address, port, version, weight, tags, zone or TTL",
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
                    (Some(_), None) => (EventKind::RouteSet, "set (its origin was not recorded)"),
                    (None, None) => (
                        EventKind::RouteCleared,
                        "cleared (its origin was not recorded)",
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

/// An RFC 3339 time as the error messages give it.
pub const TIME_EXAMPLE: &str = "2026-12-03T10:00:00Z or 2026-12-03T12:00:00+02:00";

/// Parses a point in time as the directory's `since` and `until` take it: milliseconds since
/// the Unix epoch, or an RFC 3339 time with its offset from UTC (`2026-12-03T10:00:00Z`,
/// `2026-12-03T12:00:00+02:00`). Answers milliseconds. A time without an offset is refused:
/// which zone it meant cannot be known.
pub fn parse_time(value: &str) -> Result<u64, String> {
    parse_time_or(
        value,
        &format!(
            "milliseconds since the Unix epoch or an RFC 3339 time with its offset from UTC, \
             such as {TIME_EXAMPLE}"
        ),
    )
}

/// [`parse_time`], whose error says the value `must be {expected}` (for a caller that takes
/// other forms too, and has tried them).
pub fn parse_time_or(value: &str, expected: &str) -> Result<u64, String> {
    let value = value.trim();
    if let Ok(ms) = value.parse::<u64>() {
        return Ok(ms);
    }
    parse_rfc3339(value).map_err(|why| {
        format!(
            "must be {expected}; got {:?}{why}",
            crate::model::printable(value)
        )
    })
}

/// Milliseconds since the Unix epoch of an RFC 3339 time: `YYYY-MM-DDTHH:MM:SS`, optional
/// fractions of a second, then `Z` or an offset `+HH:MM` / `-HH:MM` (`t`, `z` and a space for
/// `T` are accepted, as RFC 3339 allows). The error, when there is one, is a clause that
/// completes the caller's message: empty, or `, which has no offset: ...`.
fn parse_rfc3339(value: &str) -> Result<u64, String> {
    // humantime takes `T` or a space between date and time, not `t`.
    let value = &match value.as_bytes().get(10) {
        Some(b't') => format!("{}T{}", &value[..10], &value[11..]),
        _ => value.to_owned(),
    };
    let (local, offset_s) = if let Some(local) = value.strip_suffix(['Z', 'z']) {
        (local, 0i64)
    } else {
        let split = value
            .len()
            .checked_sub(6)
            .filter(|&i| value.is_char_boundary(i));
        let parsed = split.and_then(|i| Some((&value[..i], offset_seconds(&value[i..])?)));
        match parsed {
            Some(found) => found,
            None if humantime::parse_rfc3339_weak(value).is_ok() => {
                return Err(format!(
                    ", which has no offset from UTC: add Z for UTC or the offset of its zone, \
                     such as {value}Z or {value}+02:00"
                ));
            }
            None => return Err(String::new()),
        }
    };
    // The date and time without offset, in the strict form (no space and no `Z` left).
    if local.len() < 19 || local.contains(['Z', 'z', '+']) {
        return Err(String::new());
    }
    let t = humantime::parse_rfc3339_weak(local).map_err(|_| String::new())?;
    let ms = i128::from(unix_millis_of(t)) - i128::from(offset_s) * 1000;
    if ms < 0 {
        return Err(", which is before 1970".into());
    }
    u64::try_from(ms).map_err(|_| String::new())
}

/// Seconds east of UTC of an offset `+HH:MM` or `-HH:MM`. ` HH:MM` is `+HH:MM`: a `+` typed
/// unencoded into a URL's query arrives as a space.
fn offset_seconds(offset: &str) -> Option<i64> {
    let b = offset.as_bytes();
    let sign = match b.first()? {
        b'+' | b' ' => 1,
        b'-' => -1,
        _ => return None,
    };
    let digits = |r: std::ops::Range<usize>| -> Option<i64> {
        let text = offset.get(r)?;
        text.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| text.parse().ok())
            .flatten()
    };
    let (hours, minutes) = (digits(1..3)?, digits(4..6)?);
    (b.len() == 6 && b[3] == b':' && hours < 24 && minutes < 60)
        .then_some(sign * (hours * 3600 + minutes * 60))
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
            by: Some("expiry".into()),
        });
        assert_eq!(
            serde_json::to_value(&expired).unwrap(),
            serde_json::json!({"index": 4, "at": 9, "service": "web", "id": "a",
                "kind": "expired", "cause": "no heartbeat within its TTL of 6000 ms",
                "origin": null, "by": "expiry", "version": "1", "address": "10.0.0.1:8080"})
        );
        let docker = Event::of(&Change::Upsert {
            index: 5,
            at: 9,
            cause: UpsertCause::Docker,
            instance: i.clone(),
            by: None,
        });
        assert_eq!(docker.kind, EventKind::DockerStarted);
        assert_eq!(docker.by, None, "an older directory's change names no one");
        let route = Event::of(&Change::Route {
            index: 6,
            at: 9,
            service: "web".parse().unwrap(),
            route: None,
            origin: Some("cli:alice from 10.0.0.1 with token deploy".into()),
            by: Some("deploy".into()),
        });
        assert_eq!(
            (route.kind, route.origin.as_deref(), route.by.as_deref()),
            (
                EventKind::RouteCleared,
                Some("cli:alice from 10.0.0.1 with token deploy"),
                Some("deploy")
            )
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
                by: Some("anonymous".into()),
            },
        });
        assert_eq!(drained.kind, EventKind::Undrained);
        assert_eq!(drained.by.as_deref(), Some("anonymous"));
        assert_eq!((drained.id, drained.version.unwrap().as_str()), (None, "2"));
        assert_eq!(drained.cause, "version 2 undrained by an operator");
        let older: Event = serde_json::from_value(serde_json::json!({"index": 1, "at": 2,
            "service": "web", "id": null, "kind": "route_set", "cause": "set", "origin": null}))
        .unwrap();
        assert_eq!(
            older.by, None,
            "an older directory's event reads without `by`"
        );
        let unknown: EventKind = serde_json::from_str("\"teleported\"").unwrap();
        assert_eq!(unknown, EventKind::Other);
    }

    #[test]
    fn times_are_milliseconds_or_rfc3339() {
        assert_eq!(parse_time("1796292666510"), Ok(1_796_292_666_510));
        assert_eq!(parse_time("1970-01-01T00:00:01Z"), Ok(1000));
        assert_eq!(parse_time("1970-01-01T00:00:01.5Z"), Ok(1500));
        assert_eq!(parse_time("1970-01-01t00:00:01z"), Ok(1000));
        assert!(parse_time("10m").unwrap_err().contains("RFC 3339"));
        assert_eq!(rfc3339(1500), "1970-01-01T00:00:01Z");
    }

    #[test]
    fn rfc3339_offsets_are_honoured_and_a_time_without_one_is_refused() {
        let utc = parse_time("2026-12-06T08:00:00Z").unwrap();
        assert_eq!(parse_time("2026-12-06T10:00:00+02:00"), Ok(utc));
        assert_eq!(parse_time("2026-12-06T03:30:00-04:30"), Ok(utc));
        assert_eq!(parse_time("2026-12-06T08:00:00+00:00"), Ok(utc));
        assert_eq!(parse_time("2026-12-06T08:00:00-00:00"), Ok(utc));
        assert_eq!(parse_time("2026-12-06 10:00:00.250+02:00"), Ok(utc + 250));
        assert_eq!(parse_time("1970-01-01T01:00:01+01:00"), Ok(1000));
        assert_eq!(
            parse_time("2026-12-06T10:00:00 02:00"),
            Ok(utc),
            "a + sent unencoded"
        );
        let e = parse_time("2026-12-06T10:00:00").unwrap_err();
        assert_eq!(
            e,
            "must be milliseconds since the Unix epoch or an RFC 3339 time with its offset from \
             UTC, such as 2026-12-03T10:00:00Z or 2026-12-03T12:00:00+02:00; got \
             \"2026-12-06T10:00:00\", which has no offset from UTC: add Z for UTC or the offset \
             of its zone, such as 2026-12-06T10:00:00Z or 2026-12-06T10:00:00+02:00"
        );
        for bad in [
            "2026-12-06T10:00:00+2:00",
            "2026-12-06T10:00:00+24:00",
            "2026-12-06T10:00:00+02:60",
            "2026-12-06T10:00:00+0200",
            "2026-12-06T10:00+02:00",
            "2026-12-06+02:00",
            "2026-12-06T10:00:00Z+02:00",
            "2026-13-06T10:00:00Z",
            "yesterday",
            "",
        ] {
            let e = parse_time(bad).unwrap_err();
            assert!(e.contains("such as 2026-12-03T10:00:00Z"), "{bad}: {e}");
        }
        assert!(parse_time("1970-01-01T00:30:00+01:00")
            .unwrap_err()
            .ends_with("which is before 1970"));
    }
}
