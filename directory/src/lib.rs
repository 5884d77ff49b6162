//! Baker's directory: the rendezvous of live instances and canary routes.
//!
//! Registrars register instances over HTTP and renew them with heartbeats; instances that fall
//! silent expire after their TTL. Operators set canary routes, which persist across restarts.
//! Ambassadors watch the table as an NDJSON stream: a snapshot, then one event per change.
//!
//! - [`config`]: `BAKER_*` variables into a [`Config`].
//! - [`registry`]: the table of instances and routes: who may change what, TTLs, and the
//!   change feed every change is published on, with its revision, cause and time.
//! - [`store`]: the table's storage ([`store::Store`], in memory; with etcd, the mirror of
//!   etcd's table that the registry's replica keeps in step).
//! - [`feed`]: the change feed's subscribers, unfiltered or by service.
//! - [`history`]: the last changes as events, a consumer of the feed, for `GET /v1/events`.
//! - [`quota`]: the limits on instances, services and routes.
//! - [`routes`]: the routes, one file per service in `routes/`, loaded at start.
//! - [`durable`]: hard state kept as one durable file per key, crash-safe; routes use it.
//! - [`maintenance`]: drains, one file per service in `maintenance/`, loaded at start.
//! - [`watch`]: the watch stream, with bounded per-watcher queues.
//! - [`ambassadors`]: the ambassadors' reports (soft state, expiring), and their traffic.
//! - [`api`]: HTTP handlers, bearer-token checks, body limits and JSON errors.
//! - [`ui`]: the dashboard (`GET /ui`): a page, its script and style, from the binary.
//! - [`server`]: the accept loop (connection limit, header timeout, graceful shutdown).
//! - [`metrics`]: Prometheus metrics for `GET /metrics`.
//! - [`docker`]: discovery of containers labelled `baker.service`, from the Docker API.
//! - [`swarm`]: discovery of the tasks of swarm services labelled `baker.service`, on a
//!   manager.
//! - [`etcd`]: the table in etcd v3 (instances on leases, routes as keys, watches from a
//!   revision), for replicas that share it (`BAKER_STORE=etcd://...`).
//! - [`supervise`]: restarts a long-lived task that panics or returns before shutdown.
//!
//! [`run`] ties them together; the `baker-directory` binary only reads the configuration,
//! binds the listener and handles signals.

pub mod ambassadors;
pub mod api;
pub mod config;
pub mod docker;
pub mod durable;
pub mod etcd;
pub mod feed;
pub mod history;
pub mod maintenance;
pub mod metrics;
pub mod quota;
pub mod registry;
pub mod routes;
pub mod server;
pub mod store;
pub mod supervise;
pub mod swarm;
pub mod tls;
pub mod tokens;
pub mod ui;
pub mod watch;

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use config::{Config, DockerMode, StoreMode};
pub use registry::Registry;

/// What can stop the directory from running.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot load the routes or the drains")]
    Routes(#[from] routes::StoreError),
    #[error("cannot read the listener's address")]
    Listener(#[source] std::io::Error),
    #[error("cannot connect to etcd")]
    Etcd(#[from] etcd::EtcdError),
    #[error("{0}")]
    Tokens(String),
    #[error("cannot serve HTTPS: {0}")]
    Tls(#[from] tls::TlsError),
}

/// Runs the directory on `listener` until `shutdown` is cancelled.
///
/// In memory mode, loads the persisted routes from `config.data` first (moving a
/// `routes.json` of an earlier build into `routes/`): a corrupt route file is an error
/// returned before anything is served. With etcd, waits a few seconds for a first snapshot of
/// etcd's table, then serves whatever it has while the mirror follows etcd. On shutdown, stops
/// accepting, ends every watch stream,
/// lets in-flight requests finish within `config.shutdown_grace`, and returns.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    // A certificate that cannot be served stops the start, before anything else happens.
    let tls = match &config.tls {
        Some(files) => {
            let reloading = tls::Reloading::new(files.clone())?;
            tracing::info!(
                cert = %files.cert.display(),
                "serving HTTPS only; the certificate and key are reloaded when they change"
            );
            tokio::spawn(reloading.clone().watch(shutdown.clone()));
            Some(reloading)
        }
        None => None,
    };
    let auth = Arc::new(api::Auth {
        tokens: Arc::new(
            tokens::Tokens::load(
                config
                    .token
                    .iter()
                    .map(|t| tokens::Token::of_secret("BAKER_TOKEN", tokens::Role::Admin, t))
                    .chain(config.watch_token.iter().map(|t| {
                        tokens::Token::of_secret("BAKER_WATCH_TOKEN", tokens::Role::Read, t)
                    }))
                    .collect(),
                config.tokens.clone(),
            )
            .map_err(Error::Tokens)?,
        ),
        writes_closed: config.token.is_some() || config.tokens.is_some(),
        reads_closed: config.reads_closed,
        watches_closed: config.watch_token.is_some(),
    });
    if let Some(file) = &config.tokens {
        tracing::info!("tokens read from {}", file.display());
        tokio::spawn(auth.tokens.clone().follow(shutdown.clone()));
    }
    let metrics = Arc::new(metrics::Metrics::new());
    let registry = match &config.store {
        StoreMode::Memory => {
            let store = routes::RouteStore::open(&config.data)?;
            let loaded = store.load()?;
            tracing::info!(
                "{} route(s) loaded from {}",
                loaded.len(),
                store.dir().display()
            );
            let drains = maintenance::MaintenanceFiles::open(&config.data)?;
            let drained = drains.load()?;
            tracing::info!(
                "{} service(s) with drains loaded from {}",
                drained.len(),
                drains.dir().display()
            );
            Registry::with_quotas(
                store,
                loaded,
                drained,
                metrics.clone(),
                config.watch_backlog_lines,
                config.quotas,
            )
        }
        StoreMode::Etcd(url) => {
            tracing::info!("the table lives in {url}");
            let etcd = etcd::Etcd::connect(url).await?;
            Registry::with_etcd(
                etcd,
                metrics.clone(),
                config.watch_backlog_lines,
                config.quotas,
            )
        }
    };
    let replica = {
        let (registry, shutdown) = (registry.clone(), shutdown.clone());
        tokio::spawn(supervise::supervise(
            if registry.is_replica() {
                "etcd replica"
            } else {
                "store"
            },
            shutdown.clone(),
            move || registry.clone().run_store(shutdown.clone()),
        ))
    };
    registry.first_snapshot(etcd::REQUEST_TIMEOUT).await;
    let discovery = docker::enabled(config.docker).then(|| {
        let (registry, network, node, zone, shutdown) = (
            registry.clone(),
            config.docker_network.clone(),
            config.node.clone(),
            config.zone.clone(),
            shutdown.clone(),
        );
        tokio::spawn(supervise::supervise(
            "docker discovery",
            shutdown.clone(),
            move || {
                docker::run(
                    registry.clone(),
                    network.clone(),
                    node.clone(),
                    zone.clone(),
                    shutdown.clone(),
                )
            },
        ))
    });
    let swarm = docker::enabled(config.docker).then(|| {
        let settings = swarm::Settings {
            network: config.docker_network.clone(),
            poll: config.swarm_poll,
            required: config.docker == DockerMode::Swarm,
        };
        let (registry, shutdown) = (registry.clone(), shutdown.clone());
        tokio::spawn(supervise::supervise(
            "swarm discovery",
            shutdown.clone(),
            move || swarm::run(registry.clone(), settings.clone(), shutdown.clone()),
        ))
    });
    if config.token.is_none() && config.tokens.is_none() {
        tracing::info!("no BAKER_TOKEN: mutating calls need no token");
    }
    let expiry = {
        let (registry, shutdown) = (registry.clone(), shutdown.clone());
        tokio::spawn(supervise::supervise(
            "ttl expiry",
            shutdown.clone(),
            move || registry.clone().run_expiry(shutdown.clone()),
        ))
    };
    let history = Arc::new(history::History::new(config.history));
    tokio::spawn(history.clone().follow(registry.clone(), shutdown.clone()));
    let reports = Arc::new(ambassadors::Reports::new(config.quotas, metrics.clone()));
    tokio::spawn(ambassadors::follow(
        reports.clone(),
        registry.clone(),
        shutdown.clone(),
    ));
    let addr = listener.local_addr().map_err(Error::Listener)?;
    // The data directory exists by now in memory mode (the route store created it).
    let data = std::fs::canonicalize(&config.data).unwrap_or_else(|_| config.data.clone());
    let about = ui::About::here(addr, &config.store, &data);
    let state = api::AppState {
        registry,
        ambassadors: reports,
        history,
        auth,
        watch: watch::Limits {
            ping: config.watch_ping,
            backlog_lines: config.watch_backlog_lines,
            backlog_bytes: config.watch_backlog_bytes,
        },
        shutdown: shutdown.clone(),
        about: Arc::new(about),
    };
    let app = api::router(state, config.request_timeout);
    tracing::info!("listening on {addr}");
    let limits = server::Limits {
        max_connections: config.max_connections,
        max_watches: config.max_watches,
        header_timeout: config.request_timeout,
        write_stall: config.write_stall,
        grace: config.shutdown_grace,
    };
    server::serve(listener, app, limits, tls, metrics, shutdown.clone()).await;
    shutdown.cancel();
    let _ = expiry.await;
    if let Some(discovery) = discovery {
        let _ = discovery.await;
    }
    if let Some(swarm) = swarm {
        let _ = swarm.await;
    }
    let _ = replica.await;
    tracing::info!("stopped");
    Ok(())
}
