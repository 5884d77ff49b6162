//! The ambassadors' reports: soft state, kept while they keep coming.
//!
//! Each ambassador sends `PUT /v1/ambassadors/{id}` every few seconds. A report is live for its
//! `ttl_ms`; after that the ambassador is shown as not live, and [`FORGET_AFTER`] later it is
//! forgotten. Reports are not changes of the table: they bump no index and are not on the watch
//! stream. An ambassador that stops cleanly removes its own report.
//!
//! At most `BAKER_MAX_AMBASSADORS` reports are kept. A report from a new ambassador when that
//! many are kept takes the place of the one silent the longest, if that one is no longer live;
//! when all are live it is refused with the quota's error. Reports are kept in the order they go
//! stale, so a report costs O(log n) whatever their number: admission looks at the first only,
//! and each report is forgotten once, by whichever call finds it due.
//!
//! The index of each service's last change (an ambassador is caught up once it has applied the
//! last change of every service it serves) is remembered for as many services as
//! `BAKER_MAX_SERVICES`, the ones changed longest ago forgotten first.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use baker_client::events::unix_millis;
use baker_client::model::{InstanceId, ServiceName};
use baker_client::ops::{AmbassadorReport, AmbassadorStatus, AmbassadorsResponse, ServerState};
use tokio::time::Instant;

use crate::metrics::{Metrics, QuotaLabel};
use crate::quota::{Exceeded, Quotas};

/// How long a silent ambassador is still listed (as not live) before it is forgotten.
pub const FORGET_AFTER: Duration = Duration::from_secs(300);

struct Stored {
    report: AmbassadorReport,
    received: Instant,
    last_seen: u64,
    peer: String,
}

impl Stored {
    /// When the report stops being live.
    fn stale_at(&self) -> Instant {
        self.received + Duration::from_millis(self.report.ttl_ms)
    }
}

/// The reports, and the order they go stale in.
#[derive(Default)]
struct Kept {
    reports: BTreeMap<InstanceId, Stored>,
    /// (when it stops being live, ambassador) of every report, earliest first.
    stale: BTreeSet<(Instant, InstanceId)>,
}

impl Kept {
    /// Keeps `id`'s report in place of any earlier one; whether there was none.
    fn insert(&mut self, id: InstanceId, stored: Stored) -> bool {
        let stale_at = stored.stale_at();
        let old = self.reports.insert(id.clone(), stored);
        // The old entry goes first: the new one may go stale at the very same instant.
        if let Some(old) = &old {
            self.stale.remove(&(old.stale_at(), id.clone()));
        }
        self.stale.insert((stale_at, id));
        old.is_none()
    }

    fn remove(&mut self, id: &InstanceId) -> bool {
        match self.reports.remove(id) {
            Some(old) => {
                self.stale.remove(&(old.stale_at(), id.clone()));
                true
            }
            None => false,
        }
    }

    /// Forgets the report that went stale first if it did so at or before `at`; which one.
    fn forget_first(&mut self, at: Instant) -> Option<InstanceId> {
        let (stale_at, id) = self.stale.first()?;
        if *stale_at > at {
            return None;
        }
        let id = id.clone();
        self.remove(&id);
        Some(id)
    }

    /// Forgets the reports silent for longer than their TTL and [`FORGET_AFTER`].
    fn prune(&mut self, now: Instant) {
        let Some(due) = now.checked_sub(FORGET_AFTER) else {
            return;
        };
        while let Some(id) = self.forget_first(due) {
            tracing::info!(ambassador = %id, "forgot a silent ambassador");
        }
    }
}

/// The index of the last change of each service, for as many services as it may remember.
#[derive(Default)]
struct LastChanges {
    by_service: HashMap<ServiceName, u64>,
    /// (index, service) of every entry, oldest first.
    order: BTreeSet<(u64, ServiceName)>,
}

/// Every ambassador's last report.
pub struct Reports {
    kept: Mutex<Kept>,
    last: Mutex<LastChanges>,
    /// `ambassadors`: reports kept at most; `services`: services whose last change is
    /// remembered at most.
    quotas: Quotas,
    metrics: Arc<Metrics>,
}

fn relock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every update keeps its map and its index in step before it can fail: a poisoned lock
    // still guards consistent data.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Reports {
    /// No reports yet; at most `quotas.ambassadors` will be kept, and the last change of at
    /// most `quotas.services` services remembered. Refusals are counted in `metrics`.
    pub fn new(quotas: Quotas, metrics: Arc<Metrics>) -> Reports {
        Reports {
            kept: Mutex::default(),
            last: Mutex::default(),
            quotas,
            metrics,
        }
    }

    /// Stores `id`'s report, received from `peer` now. Returns whether the ambassador is new
    /// (or had been forgotten). A new ambassador past the quota takes the place of the one
    /// silent the longest if that one is no longer live, and is refused otherwise.
    pub fn put(
        &self,
        id: InstanceId,
        report: AmbassadorReport,
        peer: String,
    ) -> Result<bool, Exceeded> {
        let now = Instant::now();
        let mut kept = relock(&self.kept);
        kept.prune(now);
        if !kept.reports.contains_key(&id) {
            if let Err(e) = self.quotas.admit_ambassador(&id, kept.reports.len()) {
                let Some(silent) = kept.forget_first(now) else {
                    drop(kept);
                    self.metrics
                        .quota_refusals
                        .get_or_create(&QuotaLabel {
                            quota: e.quota.name(),
                        })
                        .inc();
                    tracing::warn!(quota = e.quota.name(), "{e}");
                    return Err(e);
                };
                tracing::info!(
                    ambassador = %silent,
                    new = %id,
                    "forgot the ambassador silent the longest to keep a new one"
                );
            }
        }
        let stored = Stored {
            report,
            received: now,
            last_seen: unix_millis(),
            peer,
        };
        Ok(kept.insert(id, stored))
    }

    /// Notes that `service` changed at `index` (fed by [`follow`]).
    pub fn changed(&self, service: &ServiceName, index: u64) {
        let mut last = relock(&self.last);
        if let Some(old) = last.by_service.insert(service.clone(), index) {
            last.order.remove(&(old, service.clone()));
        }
        last.order.insert((index, service.clone()));
        while last.by_service.len() > self.quotas.services {
            let Some((_, oldest)) = last.order.pop_first() else {
                break;
            };
            last.by_service.remove(&oldest);
        }
    }

    /// Forgets `id`'s report; whether there was one.
    pub fn remove(&self, id: &InstanceId) -> bool {
        relock(&self.kept).remove(id)
    }

    /// How many reports are kept.
    pub fn len(&self) -> usize {
        relock(&self.kept).reports.len()
    }

    /// Whether no report is kept.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every ambassador compared with the directory's `index`, and the traffic per instance
    /// summed over the live ones.
    pub fn status(&self, index: u64) -> AmbassadorsResponse {
        let now = Instant::now();
        let mut kept = relock(&self.kept);
        kept.prune(now);
        let last = relock(&self.last);
        let mut out = AmbassadorsResponse {
            index,
            ..AmbassadorsResponse::default()
        };
        for (id, s) in kept.reports.iter() {
            let age = now.saturating_duration_since(s.received);
            let live = now < s.stale_at();
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
                .filter_map(|x| last.by_service.get(&x.service))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quota::Quota;
    use baker_client::ops::{Mode, Served, ServerReport};

    fn reports(quotas: Quotas) -> Reports {
        Reports::new(quotas, Arc::new(Metrics::new()))
    }

    fn id(n: usize) -> InstanceId {
        format!("amb-{n}").parse().unwrap()
    }

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
                    local: false,
                })
                .collect(),
            ttl_ms: 1000,
            locality: None,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn reports_go_stale_then_are_forgotten_and_only_live_ones_count() {
        let reports = reports(Quotas::default());
        let a: InstanceId = "amb-a".parse().unwrap();
        let b: InstanceId = "amb-b".parse().unwrap();
        assert!(reports
            .put(
                a.clone(),
                report(7, &[("g-1", ServerState::Up, 10)]),
                "p".into()
            )
            .unwrap());
        assert!(!reports
            .put(
                a.clone(),
                report(7, &[("g-1", ServerState::Up, 10)]),
                "p".into()
            )
            .unwrap());
        reports
            .put(
                b.clone(),
                report(6, &[("g-1", ServerState::Drain, 5)]),
                "p".into(),
            )
            .unwrap();

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
        reports
            .put(
                b.clone(),
                report(7, &[("g-1", ServerState::Up, 6)]),
                "p".into(),
            )
            .unwrap();
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

    #[tokio::test(start_paused = true)]
    async fn past_the_quota_a_new_ambassador_replaces_a_silent_one_or_is_refused() {
        let quotas = Quotas {
            ambassadors: 3,
            ..Quotas::default()
        };
        let reports = reports(quotas);
        let put = |n: usize| reports.put(id(n), report(1, &[]), "p".into());
        for n in 0..3 {
            assert_eq!(put(n), Ok(true));
        }
        // Every kept ambassador is live: a fourth is refused, a kept one still reports.
        let e = put(3).unwrap_err();
        assert_eq!((e.quota, e.limit), (Quota::Ambassadors, 3));
        assert_eq!(
            e.to_string(),
            "quota ambassadors reached: 3 ambassadors are reporting, the most \
             BAKER_MAX_AMBASSADORS allows, so the report of ambassador amb-3 is refused; raise \
             BAKER_MAX_AMBASSADORS if the fleet really is this large"
        );
        assert_eq!(put(1), Ok(false));
        assert!(reports
            .metrics
            .encode()
            .contains("baker_directory_quota_refusals_total{quota=\"ambassadors\"} 1"));
        // amb-0 and amb-2 go silent past their TTL (amb-1 reports on): the new ambassador takes
        // the place of the one silent the longest, then the next.
        tokio::time::advance(Duration::from_millis(600)).await;
        assert_eq!(put(1), Ok(false));
        tokio::time::advance(Duration::from_millis(600)).await;
        assert_eq!(put(1), Ok(false));
        assert_eq!(put(3), Ok(true));
        assert_eq!(put(4), Ok(true));
        assert_eq!(put(5).unwrap_err().quota, Quota::Ambassadors);
        let kept: Vec<String> = reports
            .status(1)
            .ambassadors
            .iter()
            .map(|a| a.id.to_string())
            .collect();
        assert_eq!(kept, ["amb-1", "amb-3", "amb-4"]);
        assert_eq!(reports.len(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_hundred_thousand_reports_cost_no_scan_and_are_forgotten_in_time() {
        let reports = reports(Quotas {
            ambassadors: 100_000,
            ..Quotas::default()
        });
        let started = std::time::Instant::now();
        for n in 0..100_000 {
            reports.put(id(n), report(1, &[]), "p".into()).unwrap();
        }
        // Each report scans nothing: 100,000 of them take well under a second (a scan per
        // report, as before, took minutes).
        let took = started.elapsed();
        assert!(took < Duration::from_secs(5), "{took:?}");
        assert_eq!(reports.len(), 100_000);
        tokio::time::advance(Duration::from_millis(1000) + FORGET_AFTER).await;
        reports.put(id(0), report(1, &[]), "p".into()).unwrap();
        assert_eq!(reports.len(), 1);
    }

    #[test]
    fn the_last_change_is_remembered_for_as_many_services_as_the_quota() {
        let reports = reports(Quotas {
            services: 2,
            ..Quotas::default()
        });
        let svc = |s: &str| -> ServiceName { s.parse().unwrap() };
        reports.changed(&svc("a"), 1);
        reports.changed(&svc("b"), 2);
        reports.changed(&svc("a"), 3);
        reports.changed(&svc("c"), 4);
        let last = relock(&reports.last);
        let mut remembered: Vec<(&str, u64)> = last
            .by_service
            .iter()
            .map(|(s, i)| (s.as_str(), *i))
            .collect();
        remembered.sort();
        assert_eq!(remembered, [("a", 3), ("c", 4)]);
        assert_eq!(last.order.len(), 2);
    }
}
