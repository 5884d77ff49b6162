//! Baker's client library: what every part of Baker shares.
//!
//! - [`model`]: the wire types (instances, routes, watch events) and the validation that keeps
//!   anything unchecked out of HAProxy's configuration.
//! - [`route`]: routes, their targets (versions, services, versions of other services) and
//!   their two JSON forms.
//! - [`change`]: the directory's change feed: each change with its revision, cause and time.
//! - [`ops`]: ambassadors' reports and what the directory makes of them.
//! - [`maintenance`]: drained instances and versions, and instance states.
//! - [`events`]: the directory's history of changes, for people.
//! - [`api`]: [`api::DirectoryClient`], the directory's HTTP client, including the watch stream.
//! - [`links`]: Docker-link style variables (`EMITTER_PORT_8000_TCP=tcp://...`), rendered and parsed.
//! - [`config`]: reading `BAKER_*` variables and reporting every bad one at once.
//! - [`backoff`]: capped, jittered backoff for loops that retry forever.
//! - [`errors`]: an error and its causes on one line.
//! - [`daemon`]: logging and stop-signal handling shared by the daemons.
//! - [`metrics`]: what the daemons' Prometheus metrics share.
//!
//! The `baker` operator CLI is this crate's binary.

pub mod api;
pub mod backoff;
pub mod change;
pub mod config;
pub mod daemon;
pub mod errors;
pub mod events;
pub mod links;
pub mod maintenance;
pub mod metrics;
pub mod model;
pub mod ops;
pub mod route;
pub mod tls;

pub use api::{ClientError, DirectoryClient};
pub use model::{
    Address, Instance, InstanceId, InstanceSpec, NodeName, Route, ServiceName, Source, State, Tag,
    Version, WatchEvent,
};
