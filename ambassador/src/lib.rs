//! Baker's ambassador: a local HAProxy kept live from the directory.
//!
//! The ambassador runs next to a client application. It exposes one local port per service it
//! is told about (and optionally one shared HTTP port routing `/<service>/...`), follows the
//! directory's watch stream, and keeps HAProxy's servers equal to the live instances: through
//! HAProxy's runtime API whenever possible, by a seamless master-worker reload only when the
//! configuration's structure must change. It supervises HAProxy as its child, restarting it if
//! it dies (at once: the listening sockets stay open in the ambassador meanwhile), and can run as PID 1 in a container.
//!
//! Modules:
//! - [`config`]: the `BAKER_*` variables.
//! - [`plan`]: which servers each backend should have, at which weight (canary splits).
//! - [`locality`]: the zone rule: traffic stays in the ambassador's zone while it can serve.
//! - [`diff`]: the runtime commands that turn the running servers into the planned ones.
//! - [`render`]: the Tera template and its context.
//! - [`runtime_api`]: HAProxy's CLI sockets and the parsers of their answers.
//! - [`haproxy`]: the HAProxy child process: check, start, reload, stop.
//! - [`listeners`]: the listening sockets, held by the ambassador and inherited by HAProxy.
//! - [`reaper`]: reaping children (and orphans, as PID 1).
//! - [`reconcile`]: the one task that owns HAProxy.
//! - [`hung`]: servers that accept connections but never answer, marked down.
//! - [`coalesce`]: when a change of plan is applied: at once alone, batched in a burst.
//! - [`watch`]: following the directory, with a grace period after it restarts.
//! - [`resolve`]: DNS names of instances turned into addresses, beside the watch, cached.
//! - [`report`]: the ambassador's report to the directory, and how far changes have reached HAProxy.
//! - [`metrics`]: the ambassador's own counters, served behind HAProxy's admin port.

pub mod coalesce;
pub mod config;
pub mod diff;
pub mod haproxy;
pub mod hung;
pub mod listeners;
pub mod locality;
pub mod metrics;
pub mod plan;
pub mod reaper;
pub mod reconcile;
pub mod render;
pub mod report;
pub mod resolve;
pub mod runtime_api;
pub mod watch;

use std::sync::Arc;
use std::time::Duration;

use baker_client::model::State;
use baker_client::DirectoryClient;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, watch as channel};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::Config;

use crate::reconcile::{Owner, Request, StartError};

/// Longest wait for the directory's first snapshot before HAProxy starts anyway.
const FIRST_SNAPSHOT_WAIT: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Start(#[from] StartError),
    #[error("cannot start the ambassador")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Client(#[from] baker_client::ClientError),
}

impl RunError {
    /// Whether the failure comes from the user's configuration (template included).
    pub fn is_config(&self) -> bool {
        matches!(
            self,
            RunError::Start(StartError::Template { .. }) | RunError::Client(_)
        )
    }
}

/// Runs the ambassador until `shutdown`, and returns the exit code to end with: HAProxy's, or
/// 0 after a requested stop.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<i32, RunError> {
    let config = Arc::new(config);
    // Handled from the start: a SIGHUP that comes while HAProxy starts (its ports accept
    // connections before it answers on its sockets) is kept, and acted on once it runs.
    let mut hup = signal(SignalKind::hangup())?;
    let reaper = reaper::Reaper::start()?;
    std::fs::create_dir_all(&config.run_dir)?;
    let metrics = Arc::new(metrics::Metrics::default());
    let initial = plan::plan(
        &State::default(),
        &config.services,
        config.locality.as_ref(),
    );
    // The watch publishes plans; the resolver turns their DNS names into addresses for the
    // owner of HAProxy.
    let (plan_tx, plan_rx) = channel::channel(initial.clone());
    let (desired_tx, mut desired_rx) = channel::channel(initial);
    let tasks = TaskTracker::new();
    let inner = shutdown.child_token();

    metrics::serve(
        &config.run_dir.join("ambassador.sock"),
        metrics.clone(),
        plan_rx.clone(),
        inner.clone(),
    )
    .await?;

    let client = DirectoryClient::trusting(
        &config.directory,
        config.token.clone(),
        config.ca.as_deref(),
    )?
    .with_watch_token(config.watch_token.clone())?;
    if let Some(hint) = &config.id_hint {
        tracing::warn!("{hint}");
    }
    tasks.spawn(report::run(
        client.clone(),
        report::Identity::new(
            config.id.clone(),
            config.host.clone(),
            &config.services,
            config.locality.as_ref().map(|l| l.zone.clone()),
        ),
        runtime_api::Socket::new(config.run_dir.join("admin.sock")),
        plan_rx.clone(),
        metrics.clone(),
        inner.clone(),
    ));
    tasks.spawn(watch::run(
        client,
        config.services.clone(),
        config.locality.clone(),
        config.grace,
        plan_tx,
        metrics.clone(),
        inner.clone(),
    ));
    tasks.spawn(resolve::run(
        plan_rx,
        desired_tx,
        metrics.clone(),
        inner.clone(),
    ));

    // Start with the directory's servers already in the file when it answers quickly.
    let planned = tokio::time::timeout(FIRST_SNAPSHOT_WAIT, desired_rx.changed())
        .await
        .is_ok_and(|r| r.is_ok());
    let generation = metrics.progress.output_generation();
    let first = desired_rx.borrow_and_update().clone();
    let haproxy = haproxy::Haproxy::new(config.haproxy.clone(), &config.run_dir, reaper);
    let mut owner = Owner::new(config.clone(), haproxy, metrics.clone())?;
    if let Err(e) = owner.start(&first, planned).await {
        inner.cancel();
        tasks.close();
        tasks.wait().await;
        return Err(e.into());
    }
    if owner.runs(&first) {
        metrics.progress.applied(generation);
    }
    let ready = match config.admin {
        Some(a) => format!("listening on {a} (stats, /metrics)"),
        None => {
            let port = config
                .services
                .iter()
                .find_map(|s| s.port)
                .or(config.http_port)
                .unwrap_or(0);
            format!("listening on {}:{port}", config.bind)
        }
    };
    tracing::info!(
        services = %config.services.iter().map(|s| match s.port {
            Some(p) => format!("{}={p}", s.name),
            None => s.name.to_string(),
        }).collect::<Vec<_>>().join(","),
        http_port = config.http_port,
        run_dir = %config.run_dir.display(),
        "HAProxy is up; {ready}"
    );

    let (req_tx, req_rx) = mpsc::channel(4);
    let hup_stop = inner.clone();
    tasks.spawn(async move {
        loop {
            tokio::select! {
                _ = hup_stop.cancelled() => return,
                _ = hup.recv() => {
                    tracing::info!("SIGHUP: re-reading the template");
                    let _ = req_tx.send(Request::ReloadTemplate).await;
                }
            }
        }
    });

    let exit = owner.run(desired_rx, req_rx, shutdown.clone()).await;
    inner.cancel();
    tasks.close();
    tasks.wait().await;
    let code = match exit {
        Some(reaper::Exit::Code(c)) => c,
        // Stopped by our own signals after a requested stop (a master taken over from a
        // previous ambassador is not our child: we only see it go).
        Some(reaper::Exit::Signal(_) | reaper::Exit::Unknown) if shutdown.is_cancelled() => 0,
        Some(e) => e.code(),
        None => 1,
    };
    tracing::info!(
        reloads = metrics.reloads.get(),
        runtime_commands = metrics.runtime_commands.get(),
        "stopped (exit code {code})"
    );
    Ok(code)
}
