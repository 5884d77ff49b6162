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
//!
//! Every change names who made it (`by`, see [`by`]): the name of the token of the call that
//! made it, or a fixed word for the directory's own changes and for calls made without a
//! token of the file.

use serde::{Deserialize, Serialize};

use crate::maintenance::{Maintenance, Reason, Target};
use crate::model::{Instance, Route, ServiceName};

/// Who made a change, beside the names of the tokens of `BAKER_TOKENS`: the fixed words the
/// directory records as a change's `by`. None of them can be a token's name (the tokens file
/// refuses them), so a `by` always tells a token from the directory's own doing.
pub mod by {
    /// A call made with the single admin token of the `BAKER_TOKEN` variable.
    pub const BAKER_TOKEN: &str = "BAKER_TOKEN";
    /// A call made with no token the directory knows, while changes need none.
    pub const ANONYMOUS: &str = "anonymous";
    /// Docker discovery: a container started, stopped, fell unhealthy or lost its labels.
    pub const DOCKER: &str = "docker";
    /// An instance with no heartbeat within its TTL (or whose replica's session ran out).
    pub const EXPIRY: &str = "expiry";
    /// The store itself: a record gone from etcd with no record of who removed it (deleted by
    /// hand, or its lease ran out while the replica was not watching).
    pub const STORE: &str = "etcd";

    /// Every fixed word, which no token may be named.
    pub const RESERVED: [&str; 6] = [
        BAKER_TOKEN,
        "BAKER_WATCH_TOKEN",
        ANONYMOUS,
        DOCKER,
        EXPIRY,
        STORE,
    ];
}

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

impl RemoveCause {
    /// Who makes a removal of this cause when the directory makes it itself: Docker discovery,
    /// or the expiry; `None` for a call's removal, which names its caller.
    pub fn made_by(self) -> Option<&'static str> {
        match self {
            RemoveCause::Expired => Some(by::EXPIRY),
            RemoveCause::DockerStopped
            | RemoveCause::DockerUnhealthy
            | RemoveCause::DockerLeftOut
            | RemoveCause::DockerResync => Some(by::DOCKER),
            RemoveCause::Deregistered | RemoveCause::Other => None,
        }
    }
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
        /// Who made it: the name of the registering call's token, or a fixed word ([`by`]);
        /// `None` from an older directory.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        by: Option<String>,
    },
    /// An instance went away; `instance` is its last value.
    Remove {
        index: u64,
        at: u64,
        cause: RemoveCause,
        instance: Instance,
        /// Who removed it: the name of the deregistering call's token, or a fixed word
        /// ([`by`]: `docker`, `expiry`); `None` from an older directory.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        by: Option<String>,
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
        /// Who set or cleared it: the name of the call's token, or a fixed word ([`by`]).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        by: Option<String>,
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
    /// Who made it: the name of the call's token, or a fixed word ([`by`]); `None` from an
    /// older directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
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

    /// Who made it: a token's name or a fixed word ([`by`]); `None` when an older directory
    /// did not say.
    pub fn by(&self) -> Option<&str> {
        match self {
            Change::Upsert { by, .. } | Change::Remove { by, .. } | Change::Route { by, .. } => {
                by.as_deref()
            }
            Change::Maintenance { action, .. } => action.by.as_deref(),
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
