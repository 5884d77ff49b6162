//! What the daemons' Prometheus metrics share: the content type of their OpenMetrics text and
//! [`metrics_registry!`](crate::metrics_registry), which registers every metric of a struct
//! under its field's name.

/// Content type of an OpenMetrics answer (the directory's `/metrics`, the ambassador's
/// `/ambassador/metrics`).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A `prometheus_client` registry whose names start with `$prefix`, holding each listed field
/// of `$metrics` (a counter, gauge or family) under the field's own name with its help text,
/// in the order listed. The calling crate depends on `prometheus-client`.
///
/// ```text
/// let registry = baker_client::metrics_registry!("baker_directory", m, {
///     expiries: "Instances removed because their TTL ran out",
///     watchers: "Open watch streams",
/// });
/// ```
#[macro_export]
macro_rules! metrics_registry {
    ($prefix:expr, $metrics:expr, { $($field:ident: $help:expr),+ $(,)? }) => {{
        let mut registry = ::prometheus_client::registry::Registry::with_prefix($prefix);
        $(registry.register(stringify!($field), $help, $metrics.$field.clone());)+
        registry
    }};
}
