//! The ambassadors' reports: soft state, kept while they keep coming.
//!
//! Each ambassador sends `PUT /v1/ambassadors/{id}` every few seconds. A report is live for its
//! `ttl_ms`; after that the ambassador is shown as not live, and [`FORGET_AFTER`] later it is
//! forgotten. Reports are not changes of the table: they bump no index and are not on the watch
//! stream. An ambassador that stops cleanly removes its own report.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use baker_client::events::unix_millis;
use baker_client::model::{InstanceId, ServiceName};
use baker_client::ops::{AmbassadorReport, AmbassadorStatus, AmbassadorsResponse, ServerState};
use tokio::time::Instant;

/// How long a silent ambassador is still listed (as not live) before it is forgotten.
pub const FORGET_AFTER: Duration = Duration::from_secs(300);

struct Stored {
    report: AmbassadorReport,
    received: Instant,
    last_seen: u64,
    peer: String,
}

/// Every ambassador's last report.
#[derive(Default)]
pub struct Reports {
    reports: Mutex<BTreeMap<InstanceId, Stored>>,
    /// The index of each service's last change, from the change feed.
    last: Mutex<BTreeMap<ServiceName, u64>>,
}

impl Reports {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<InstanceId, Stored>> {
        // Every update is a single insert or remove: a poisoned map is still consistent.
        self.reports.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stores `id`'s report, received from `peer` now. Returns whether the ambassador is new
    /// (or had been forgotten).
    pub fn put(&self, id: InstanceId, report: AmbassadorReport, peer: String) -> bool {
        let now = Instant::now();
        let mut map = self.lock();
        prune(&mut map, now);
        map.insert(
            id,
            Stored {
                report,
                received: now,
                last_seen: unix_millis(),
                peer,
            },
        )
        .is_none()
    }

    /// Notes that `service` changed at `index` (fed by [`follow`]).
    pub fn changed(&self, service: &ServiceName, index: u64) {
        self.last
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(service.clone(), index);
    }

    /// Forgets `id`'s report; whether there was one.
    pub fn remove(&self, id: &InstanceId) -> bool {
        self.lock().remove(id).is_some()
    }

    /// Every ambassador compared with the directory's `index`, and the traffic per instance
    /// summed over the live ones.
    pub fn status(&self, index: u64) -> AmbassadorsResponse {
        let now = Instant::now();
        let last = self.last.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let mut map = self.lock();
        prune(&mut map, now);
        let mut out = AmbassadorsResponse {
            index,
            ..AmbassadorsResponse::default()
        };
        for (id, s) in map.iter() {
            let age = now.saturating_duration_since(s.received);
            let live = age < Duration::from_millis(s.report.ttl_ms);
            if live {
                for server in &s.report.servers {
                    let t = out
                        .traffic
                        .entry(server.service.clone())
                        .or_default()
                        .entry(server.id.clone())
                        .or_default();
                    t.requests += server.requests;
                    t.errors += server.errors;
                    t.sessions += server.sessions;
                    t.ambassadors += 1;
                    t.up += u64::from(server.state == ServerState::Up);
                }
            }
            let wanted_index = s
                .report
                .services
                .iter()
                .filter_map(|x| last.get(&x.service))
                .max()
                .copied()
                .unwrap_or(0);
            out.ambassadors.push(AmbassadorStatus {
                id: id.clone(),
                live,
                caught_up: live && s.report.applied_index >= wanted_index,
                wanted_index,
                age_ms: age.as_millis() as u64,
                last_seen: s.last_seen,
                peer: s.peer.clone(),
                report: s.report.clone(),
            });
        }
        out
    }
}

/// Follows the registry's change feed until `shutdown`, noting each service's last change.
pub async fn follow(
    reports: std::sync::Arc<Reports>,
    registry: crate::Registry,
    shutdown: tokio_util::sync::CancellationToken,
) {
    crate::feed::consume(
        registry.changes(),
        &shutdown,
        |p| reports.changed(p.change.service(), p.index()),
        |n| {
            tracing::warn!(
                missed = n,
                "fell behind the change feed; ambassadors' wanted indexes may lag"
            )
        },
    )
    .await;
}

/// Drops the reports silent for longer than their TTL and [`FORGET_AFTER`].
fn prune(map: &mut BTreeMap<InstanceId, Stored>, now: Instant) {
    map.retain(|id, s| {
        let keep = now.saturating_duration_since(s.received)
            < Duration::from_millis(s.report.ttl_ms) + FORGET_AFTER;
        if !keep {
            tracing::info!(ambassador = %id, "forgot a silent ambassador");
        }
        keep
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use baker_client::ops::{Mode, Served, ServerReport};

    fn report(applied_index: u64, servers: &[(&str, ServerState, u64)]) -> AmbassadorReport {
        AmbassadorReport {
            host: "host-1".parse().unwrap(),
            services: vec![Served {
                service: "greeting".parse().unwrap(),
                port: Some(8000),
                mode: Mode::Http,
            }],
            applied_index,
            reloads: 0,
            servers: servers
                .iter()
                .map(|(id, state, requests)| ServerReport {
                    service: "greeting".parse().unwrap(),
                    id: id.parse().unwrap(),
                    state: *state,
                    weight: 100,
                    requests: *requests,
                    errors: 1,
                    sessions: 0,
                })
                .collect(),
            ttl_ms: 1000,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn reports_go_stale_then_are_forgotten_and_only_live_ones_count() {
        let reports = Reports::default();
        let a: InstanceId = "amb-a".parse().unwrap();
        let b: InstanceId = "amb-b".parse().unwrap();
        assert!(reports.put(
            a.clone(),
            report(7, &[("g-1", ServerState::Up, 10)]),
            "p".into()
        ));
        assert!(!reports.put(
            a.clone(),
            report(7, &[("g-1", ServerState::Up, 10)]),
            "p".into()
        ));
        reports.put(
            b.clone(),
            report(6, &[("g-1", ServerState::Drain, 5)]),
            "p".into(),
        );

        let g: ServiceName = "greeting".parse().unwrap();
        reports.changed(&g, 7);
        let s = reports.status(7);
        assert_eq!(s.ambassadors.len(), 2);
        assert!(s.ambassadors[0].caught_up && s.ambassadors[0].live);
        assert!(!s.ambassadors[1].caught_up && s.ambassadors[1].live);
        assert_eq!(s.behind(&g, 7).len(), 1);
        assert!(s.behind(&"other".parse().unwrap(), 7).is_empty());
        let t = &s.traffic[&"greeting"
            .parse::<baker_client::model::ServiceName>()
            .unwrap()][&"g-1".parse::<InstanceId>().unwrap()];
        assert_eq!((t.requests, t.errors, t.ambassadors, t.up), (15, 2, 2, 1));

        tokio::time::advance(Duration::from_millis(1500)).await;
        reports.put(
            b.clone(),
            report(7, &[("g-1", ServerState::Up, 6)]),
            "p".into(),
        );
        let s = reports.status(7);
        assert!(!s.ambassadors[0].live && !s.ambassadors[0].caught_up);
        assert!(s.ambassadors[1].caught_up);
        assert!(
            s.behind(&g, 7).is_empty(),
            "a silent ambassador is not waited for"
        );
        let t = &s.traffic[&"greeting"
            .parse::<baker_client::model::ServiceName>()
            .unwrap()][&"g-1".parse::<InstanceId>().unwrap()];
        assert_eq!((t.requests, t.ambassadors), (6, 1));

        tokio::time::advance(FORGET_AFTER).await;
        let s = reports.status(7);
        assert_eq!(s.ambassadors.len(), 1);
        assert_eq!(s.ambassadors[0].id, b);
        assert!(reports.remove(&b));
        assert!(reports.status(7).ambassadors.is_empty());
    }
}
