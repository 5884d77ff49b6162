//! The directory's change feed: every change to its table, with its revision, cause and time.
//!
//! The directory's table changes only through [`Change`]s. Each has a revision (`index`), one
//! more than the change before it, so a consumer that sees every change can tell it missed
//! none. The same changes feed the watch stream (`GET /v1/watch?v=2` sends each one to the
//! watchers whose filter names its service) and any other consumer inside the directory (an
//! event history, a replica): one feed, not a side path per consumer.
//!
//! An instance change carries that one instance, never its whole service, so a change costs the
//! same in a service of 10,000 instances as in a service of one. A route change carries the
//! service's whole route, and a maintenance change the service's whole maintenance (its
//! drains). New kinds of state are new variants.

use serde::{Deserialize, Serialize};

use crate::maintenance::{Maintenance, Reason, Target};
use crate::model::{Instance, Route, ServiceName};

/// Why an instance was added or changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UpsertCause {
    /// A new instance registered over the API.
    Registered,
    /// A registered instance re-registered with another address, port, version, weight, tags or
    /// TTL.
    Changed,
    /// Docker discovery found a running (and healthy) container, or one that changed.
    Docker,
    /// A cause this build does not know (sent by a newer directory).
    #[serde(other)]
    Other,
}

/// Why an instance went away.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RemoveCause {
    /// Deregistered over the API (`DELETE`, a registrar stopping).
    Deregistered,
    /// No heartbeat within its TTL.
    Expired,
    /// Its container stopped, died or was removed.
    DockerStopped,
    /// Its container is running but not fit to serve: unhealthy, starting, paused, restarting.
    DockerUnhealthy,
    /// Its container lost its labels, has invalid ones, left the network, or now registers
    /// under another service or id.
    DockerLeftOut,
    /// It was not listed when Docker discovery resynced after reconnecting to the engine.
    DockerResync,
    /// A cause this build does not know (sent by a newer directory).
    #[serde(other)]
    Other,
}

impl UpsertCause {
    /// The cause as written on the wire and in logs.
    pub fn as_str(self) -> &'static str {
        match self {
            UpsertCause::Registered => "registered",
            UpsertCause::Changed => "changed",
            UpsertCause::Docker => "docker",
            UpsertCause::Other => "other",
        }
    }
}

impl RemoveCause {
    /// The cause as written on the wire and in logs.
    pub fn as_str(self) -> &'static str {
        match self {
            RemoveCause::Deregistered => "deregistered",
            RemoveCause::Expired => "expired",
            RemoveCause::DockerStopped => "docker_stopped",
            RemoveCause::DockerUnhealthy => "docker_unhealthy",
            RemoveCause::DockerLeftOut => "docker_left_out",
            RemoveCause::DockerResync => "docker_resync",
            RemoveCause::Other => "other",
        }
    }
}

/// One change to the directory's table: its revision, when it happened, and what changed.
///
/// Serialized as `{"type":"upsert","index":13,"at":1700000000000,"cause":"registered",
/// "instance":{...}}`; the watch stream adds the stream's `prev` to each (see
/// [`WatchEvent`](crate::model::WatchEvent)).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Change {
    /// An instance was added or changed; `instance` is its whole new value.
    Upsert {
        index: u64,
        /// Milliseconds since the Unix epoch.
        at: u64,
        cause: UpsertCause,
        instance: Instance,
    },
    /// An instance went away; `instance` is its last value.
    Remove {
        index: u64,
        at: u64,
        cause: RemoveCause,
        instance: Instance,
    },
    /// A service's route was set (`Some`) or cleared (`None`).
    Route {
        index: u64,
        at: u64,
        service: ServiceName,
        /// Its versions in `route`, its other targets beside it in `targets` (see
        /// [`crate::route`]).
        #[serde(flatten, with = "crate::route::split_one")]
        route: Option<Route>,
        /// Where the operator's call came from; `None` when the directory itself put a route
        /// back (a route it could not save).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        origin: Option<String>,
    },
    /// An operator drained or undrained instances of a service; `maintenance` is the service's
    /// whole maintenance after it.
    Maintenance {
        index: u64,
        at: u64,
        service: ServiceName,
        maintenance: Maintenance,
        action: MaintenanceAction,
    },
}

/// What an operator did to a service's maintenance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MaintenanceAction {
    /// `true` for a drain, `false` for an undrain.
    pub drained: bool,
    /// The instance or version drained or undrained.
    pub target: Target,
    /// The drain's reason (for an undrain, the reason of the drain it lifted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<Reason>,
    /// Where the call came from.
    pub origin: String,
}

impl Change {
    /// The revision this change brought the table to.
    pub fn index(&self) -> u64 {
        match self {
            Change::Upsert { index, .. }
            | Change::Remove { index, .. }
            | Change::Route { index, .. }
            | Change::Maintenance { index, .. } => *index,
        }
    }

    /// When it happened, in milliseconds since the Unix epoch.
    pub fn at(&self) -> u64 {
        match self {
            Change::Upsert { at, .. }
            | Change::Remove { at, .. }
            | Change::Route { at, .. }
            | Change::Maintenance { at, .. } => *at,
        }
    }

    /// The service it changed.
    pub fn service(&self) -> &ServiceName {
        match self {
            Change::Upsert { instance, .. } | Change::Remove { instance, .. } => &instance.service,
            Change::Route { service, .. } | Change::Maintenance { service, .. } => service,
        }
    }
}
