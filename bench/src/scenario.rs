//! The scenarios, one module each, and what they share.

use std::time::Duration;

use crate::daemons::Bins;
use crate::report::Report;

pub mod churn;
pub mod convergence;
pub mod directory_etcd;
pub mod directory_large;
pub mod directory_restart;
pub mod directory_scale;
pub mod docker;
pub mod fleet;
pub mod footprint;
pub mod locality;
pub mod request_path;
pub mod rolling;

/// What every scenario gets.
#[derive(Debug, Clone)]
pub struct Ctx {
    pub bins: Bins,
    /// Short runs: a smoke test of the harness.
    pub quick: bool,
    /// Binaries of an earlier build, measured side by side with `bins` where a scenario
    /// supports it (convergence, churn, directory-100k).
    pub baseline: Option<Bins>,
    /// The `directory` scenario's store and sizes.
    pub directory: DirectoryOpts,
}

/// Which store the `directory` scenario measures.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Store {
    /// One directory on the memory store, pinned to one core.
    #[default]
    Memory,
    /// Side by side: the memory store, two replicas on a three-member etcd cluster, and the
    /// same work done straight against etcd.
    Etcd,
}

/// The `directory` scenario's options; sizes left `None` take the scenario's defaults.
#[derive(Debug, Clone, Default)]
pub struct DirectoryOpts {
    pub store: Store,
    pub instances: Option<usize>,
    pub watchers: Option<usize>,
    pub window: Option<Duration>,
}

#[cfg(test)]
impl Ctx {
    /// A `--quick` context over the release binaries the end-to-end tests run, for a tiny run
    /// of a scenario as a test of the harness.
    pub(crate) fn tiny(directory: DirectoryOpts) -> Ctx {
        let dir = baker_tests::bin("baker-directory");
        Ctx {
            bins: Bins::locate(dir.parent().map(Into::into), None).unwrap(),
            quick: true,
            baseline: None,
            directory,
        }
    }
}

impl Ctx {
    /// `full` normally, `quick` with `--quick`.
    pub fn pick<T>(&self, full: T, quick: T) -> T {
        if self.quick {
            quick
        } else {
            full
        }
    }
}

/// One benchmark scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    RequestPath,
    Convergence,
    Churn,
    Rolling,
    Locality,
    Directory,
    DirectoryLarge,
    DirectoryRestart,
    Footprint,
}

impl Scenario {
    pub const ALL: [Scenario; 9] = [
        Scenario::RequestPath,
        Scenario::Convergence,
        Scenario::Churn,
        Scenario::Rolling,
        Scenario::Locality,
        Scenario::Directory,
        Scenario::DirectoryLarge,
        Scenario::DirectoryRestart,
        Scenario::Footprint,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Scenario::RequestPath => "request-path",
            Scenario::Convergence => "convergence",
            Scenario::Churn => "churn",
            Scenario::Rolling => "rolling",
            Scenario::Locality => "locality",
            Scenario::Directory => "directory",
            Scenario::DirectoryLarge => "directory-100k",
            Scenario::DirectoryRestart => "directory-restart",
            Scenario::Footprint => "footprint",
        }
    }

    pub fn parse(name: &str) -> Option<Scenario> {
        Scenario::ALL.into_iter().find(|s| s.name() == name)
    }

    pub async fn run(self, ctx: &Ctx) -> anyhow::Result<Report> {
        match self {
            Scenario::RequestPath => request_path::run(ctx).await,
            Scenario::Convergence => convergence::run(ctx).await,
            Scenario::Churn => churn::run(ctx).await,
            Scenario::Rolling => rolling::run(ctx).await,
            Scenario::Locality => locality::run(ctx).await,
            Scenario::Directory => match ctx.directory.store {
                Store::Memory => directory_scale::run(ctx).await,
                Store::Etcd => directory_etcd::run(ctx).await,
            },
            Scenario::DirectoryLarge => directory_large::run(ctx).await,
            Scenario::DirectoryRestart => directory_restart::run(ctx).await,
            Scenario::Footprint => footprint::run(ctx).await,
        }
    }
}
