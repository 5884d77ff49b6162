//! The directory's Prometheus metrics, served as OpenMetrics text on `GET /metrics`.

use baker_client::model::Source;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Content type of the `/metrics` answer.
pub use baker_client::metrics::CONTENT_TYPE;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabel {
    pub service: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QuotaLabel {
    pub quota: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabel {
    pub source: &'static str,
}

impl From<Source> for SourceLabel {
    fn from(s: Source) -> Self {
        SourceLabel {
            source: match s {
                Source::Registrar => "registrar",
                Source::Docker => "docker",
            },
        }
    }
}

/// Every metric, updated where the thing it counts happens. Cheap atomics; share by `Arc`.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Live instances per service (the label disappears with the service's last instance).
    pub instances: Family<ServiceLabel, Gauge>,
    /// Instances that appeared, by source.
    pub registrations: Family<SourceLabel, Counter>,
    /// Instances removed on request (or because the Docker engine said so), by source.
    pub deregistrations: Family<SourceLabel, Counter>,
    /// Instances removed because their TTL ran out.
    pub expiries: Counter,
    /// Upserts of an instance that was already registered.
    pub heartbeats: Counter,
    /// Changes to the table (the index).
    pub changes: Counter,
    /// Routes currently set.
    pub routes: Gauge,
    /// Drains in place (instances and versions), over all services.
    pub drains: Gauge,
    /// Changes the history missed by falling behind the change feed.
    pub history_missed: Counter,
    /// Services whose route falls back to all their live instances: none of the versions it
    /// routes to has a live instance.
    pub routes_falling_back: Gauge,
    /// Open watch streams.
    pub watchers: Gauge,
    /// Watchers disconnected because they did not keep up.
    pub watchers_dropped: Counter,
    /// Lines (snapshots, events, pings) handed to watch streams.
    pub watch_events: Counter,
    /// Registrations and routes refused because they would exceed a quota, by quota.
    pub quota_refusals: Family<QuotaLabel, Counter>,
    /// Watch requests refused because `BAKER_MAX_WATCHES` streams were open.
    pub watches_refused: Counter,
    /// Connections closed because their writes made no progress (the client read nothing).
    pub connections_stalled: Counter,
    /// TLS handshakes that failed or timed out (HTTPS only).
    pub tls_handshakes_failed: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let m = Metrics {
            instances: Family::default(),
            registrations: Family::default(),
            deregistrations: Family::default(),
            expiries: Counter::default(),
            heartbeats: Counter::default(),
            changes: Counter::default(),
            routes: Gauge::default(),
            drains: Gauge::default(),
            history_missed: Counter::default(),
            routes_falling_back: Gauge::default(),
            watchers: Gauge::default(),
            watchers_dropped: Counter::default(),
            watch_events: Counter::default(),
            quota_refusals: Family::default(),
            watches_refused: Counter::default(),
            connections_stalled: Counter::default(),
            tls_handshakes_failed: Counter::default(),
            registry: Registry::default(),
        };
        let registry = baker_client::metrics_registry!("baker_directory", m, {
            instances: "Live instances per service",
            registrations: "Instances that appeared, by source",
            deregistrations: "Instances removed on request or by the Docker engine, by source",
            expiries: "Instances removed because their TTL ran out",
            heartbeats: "Registrations of an instance that was already registered",
            changes: "Changes to the table of instances and routes",
            routes: "Routes currently set",
            drains: "Drains in place (instances and versions) over all services",
            history_missed: "Changes the event history missed by falling behind the change feed",
            routes_falling_back: "Services whose route falls back to all live instances: none of \
                                  its targets has one",
            watchers: "Open watch streams",
            watchers_dropped: "Watch streams disconnected because the watcher did not keep up",
            watch_events: "Lines (snapshots, events, pings) sent to watch streams",
            quota_refusals: "Registrations and routes refused because they would exceed a quota, \
                             by quota",
            watches_refused: "Watch requests refused because BAKER_MAX_WATCHES streams were open",
            connections_stalled:
                "Connections closed because their client read nothing for too long",
            tls_handshakes_failed: "TLS handshakes that failed or took too long (HTTPS only)",
        });
        Metrics { registry, ..m }
    }

    /// The OpenMetrics text of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_named_metrics() {
        let m = Metrics::new();
        m.instances
            .get_or_create(&ServiceLabel {
                service: "emitter".into(),
            })
            .set(2);
        m.registrations.get_or_create(&Source::Docker.into()).inc();
        m.expiries.inc();
        let text = m.encode();
        for needle in [
            "baker_directory_instances{service=\"emitter\"} 2",
            "baker_directory_registrations_total{source=\"docker\"} 1",
            "baker_directory_expiries_total 1",
            "baker_directory_watchers 0",
            "# EOF",
        ] {
            assert!(text.contains(needle), "{needle} missing from:\n{text}");
        }
    }
}
