//! Baker's benchmark harness: each scenario starts the real release binaries and HAProxy on
//! loopback, drives them with a real load generator, and reports a table plus JSON in
//! `bench/results/`. Competing set-ups run side by side in one process tree, in interleaved
//! rounds, so that ratios hold on a noisy machine.
//!
//! - [`stats`]: latency samples, percentiles, medians.
//! - [`load`]: the hyper load generator (closed-loop and open-loop without coordinated omission).
//! - [`procfs`]: CPU and RSS of processes from /proc.
//! - [`daemons`]: starting and stopping the binaries under test.
//! - [`haproxy`]: the static HAProxy floor and the master socket's reload count.
//! - [`report`]: tables, target checks, machine description, JSON output.
//! - [`scenario`]: the scenarios (request path, convergence, churn, rolling restart,
//!   directory scale on memory or etcd, directory at 100,000 instances, footprint), and the
//!   heartbeating fleet, watchers and fan-out probe the directory scenarios share.

pub mod daemons;
pub mod haproxy;
pub mod load;
pub mod procfs;
pub mod report;
pub mod scenario;
pub mod stats;

pub use scenario::{Ctx, DirectoryOpts, Scenario, Store};
