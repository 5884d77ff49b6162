//! The ambassador's own counters, served on a unix socket that HAProxy's admin port exposes as
//! `/ambassador/metrics` (Prometheus text) and `/ambassador/status` (JSON).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::{Arc, Mutex};

use axum::extract::State as AxumState;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::plan::Desired;

/// Every counter the ambassador keeps.
pub struct Metrics {
    registry: Registry,
    pub reloads: Counter,
    pub reload_failures: Counter,
    pub refused_configs: Counter,
    pub runtime_commands: Counter,
    pub runtime_failures: Counter,
    pub haproxy_restarts: Counter,
    pub watch_events: Counter,
    pub directory_reconnects: Counter,
    pub directory_connected: Gauge,
    pub servers: Family<Vec<(String, String)>, Gauge>,
    /// 1 while a service's route falls back to all its live instances (none of the versions it
    /// routes to has a live instance), else 0.
    pub route_fallback: Family<Vec<(String, String)>, Gauge>,
    /// How far the directory's changes have reached HAProxy, for the reports.
    pub progress: crate::report::Progress,
    /// The services in fallback at the last [`note_fallbacks`](Self::note_fallbacks), so that
    /// only changes are logged.
    falling_back: Mutex<BTreeSet<String>>,
}

impl Default for Metrics {
    fn default() -> Self {
        let m = Metrics {
            reloads: Counter::default(),
            reload_failures: Counter::default(),
            refused_configs: Counter::default(),
            runtime_commands: Counter::default(),
            runtime_failures: Counter::default(),
            haproxy_restarts: Counter::default(),
            watch_events: Counter::default(),
            directory_reconnects: Counter::default(),
            directory_connected: Gauge::default(),
            servers: Family::default(),
            route_fallback: Family::default(),
            falling_back: Mutex::default(),
            progress: crate::report::Progress::default(),
            registry: Registry::default(),
        };
        let registry = baker_client::metrics_registry!("baker_ambassador", m, {
            reloads: "HAProxy reloads (seamless, through the master CLI)",
            reload_failures: "HAProxy reloads that failed (the previous worker kept serving)",
            refused_configs: "Rendered configurations refused by haproxy -c",
            runtime_commands: "Commands sent over HAProxy's runtime API",
            runtime_failures: "Runtime API commands HAProxy refused",
            haproxy_restarts: "Times HAProxy died and was started again",
            watch_events: "Changes received from the directory",
            directory_reconnects: "Times the directory's watch stream was reopened",
            directory_connected: "1 while the directory's watch stream is open",
            servers: "Servers planned per service",
            route_fallback: "1 while a service's route falls back to all live instances: none of \
                             its targets has one",
        });
        Metrics { registry, ..m }
    }
}

impl Metrics {
    /// Records which services' routes fall back (from [`plan::fallbacks`](crate::plan::fallbacks))
    /// and logs each service entering or leaving that state, once.
    pub fn note_fallbacks(&self, fallbacks: &BTreeMap<String, bool>) {
        let mut falling_back = self
            .falling_back
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        for (service, &on) in fallbacks {
            self.route_fallback
                .get_or_create(&vec![("service".to_owned(), service.clone())])
                .set(i64::from(on));
            if on && falling_back.insert(service.clone()) {
                tracing::warn!(
                    service = %service,
                    "no live instance belongs to a target the route sends traffic to: falling \
                     back to all live instances by their weights until one does"
                );
            } else if !on && falling_back.remove(service) {
                tracing::info!(
                    service = %service,
                    "no longer falling back to all live instances"
                );
            }
        }
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

#[derive(Clone)]
struct Shared {
    metrics: Arc<Metrics>,
    desired: watch::Receiver<Desired>,
}

/// Serves `/ambassador/metrics` and `/ambassador/status` on the unix socket at `path`.
pub async fn serve(
    path: &Path,
    metrics: Arc<Metrics>,
    desired: watch::Receiver<Desired>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let _ = std::fs::remove_file(path);
    let listener = tokio::net::UnixListener::bind(path)?;
    let app = Router::new()
        .route("/ambassador/metrics", get(metrics_page))
        .route("/ambassador/status", get(status_page))
        .with_state(Shared { metrics, desired });
    tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await;
    });
    Ok(())
}

async fn metrics_page(AxumState(s): AxumState<Shared>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, baker_client::metrics::CONTENT_TYPE)],
        s.metrics.encode(),
    )
}

async fn status_page(AxumState(s): AxumState<Shared>) -> impl IntoResponse {
    let m = &s.metrics;
    Json(serde_json::json!({
        "reloads": m.reloads.get(),
        "reload_failures": m.reload_failures.get(),
        "runtime_commands": m.runtime_commands.get(),
        "haproxy_restarts": m.haproxy_restarts.get(),
        "directory_connected": m.directory_connected.get() == 1,
        "backends": *s.desired.borrow(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fallbacks_are_gauges_per_service() {
        let m = Metrics::default();
        let f = |on: bool| BTreeMap::from([("svc".to_owned(), on), ("other".to_owned(), false)]);
        m.note_fallbacks(&f(true));
        let text = m.encode();
        assert!(
            text.contains("baker_ambassador_route_fallback{service=\"svc\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("baker_ambassador_route_fallback{service=\"other\"} 0"),
            "{text}"
        );
        m.note_fallbacks(&f(false));
        assert!(m
            .encode()
            .contains("baker_ambassador_route_fallback{service=\"svc\"} 0"));
    }
}
