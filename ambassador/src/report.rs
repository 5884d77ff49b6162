//! The ambassador's report to the directory: who it is, what it serves, which of the
//! directory's changes its HAProxy has applied, and how each server fares.
//!
//! A plan travels from the watch through the resolver to the owner of HAProxy; [`Progress`]
//! follows it with counters each stage bumps, so that the index the report calls applied is
//! never one whose plan HAProxy does not run yet:
//!
//! - the watch publishes the plan of index N, then records N ([`Progress::planned`]);
//! - the resolver bumps its output generation before publishing a changed plan, and records
//!   which watch generation its output follows;
//! - the owner records the output generation it applied once HAProxy runs it.
//!
//! An ambassador is caught up with index N when the watch has planned N, the resolver has
//! taken the watch's latest plan, and the owner has applied the resolver's latest output.
//! Each value is stored after the step it describes and read in the opposite order, so a
//! report can lag the truth but never run ahead of it.
//!
//! [`run`] sends a report every [`INTERVAL`], and at once (at most every [`MIN_GAP`]) after
//! the owner applied a plan, so that `baker route set --wait` returns quickly.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use baker_client::errors::chain;
use baker_client::model::{Address, InstanceId, Zone};
use baker_client::ops::{AmbassadorReport, Locality, Mode, Served, ServerReport};
use baker_client::DirectoryClient;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::{self, ServiceRoute};
use crate::metrics::Metrics;
use crate::plan::{failover_instance, Desired};
use crate::runtime_api::{ServerStat, Socket};

/// Time between two reports when nothing changes.
pub const INTERVAL: Duration = Duration::from_secs(2);
/// Shortest time between two reports.
pub const MIN_GAP: Duration = Duration::from_millis(100);
/// Longest wait for the directory to take the report off when stopping.
const SIGN_OFF_WAIT: Duration = Duration::from_secs(2);
/// How long the directory keeps a report: a few missed reports do not make it stale.
pub const TTL: Duration = Duration::from_secs(7);

/// How far a plan has travelled from the watch to HAProxy.
#[derive(Debug, Default)]
pub struct Progress {
    /// The directory's index of the last event the watch planned from.
    planned: AtomicU64,
    /// Bumped by the watch before each changed plan it publishes.
    plan_generation: AtomicU64,
    /// The watch generation the resolver's latest output follows.
    resolved_from: AtomicU64,
    /// Bumped by the resolver before each changed output it publishes.
    output_generation: AtomicU64,
    /// The output generation HAProxy runs.
    applied_generation: AtomicU64,
    /// The index last seen caught up.
    applied_index: AtomicU64,
    /// Woken when the owner applied a plan.
    applied: Notify,
}

impl Progress {
    /// The watch: about to publish a changed plan.
    pub fn plan_changing(&self) {
        self.plan_generation.fetch_add(1, SeqCst);
    }

    /// The watch: index `index` is planned (after its plan, if changed, was published).
    pub fn planned(&self, index: u64) {
        self.planned.store(index, SeqCst);
        self.applied.notify_one();
    }

    /// The resolver: the watch generation it is about to read the plan of.
    pub fn plan_generation(&self) -> u64 {
        self.plan_generation.load(SeqCst)
    }

    /// The resolver: about to publish a changed output.
    pub fn output_changing(&self) {
        self.output_generation.fetch_add(1, SeqCst);
    }

    /// The resolver: its output follows watch generation `generation` (stored after publishing).
    pub fn resolved(&self, generation: u64) {
        self.resolved_from.store(generation, SeqCst);
        self.applied.notify_one();
    }

    /// The owner: the output generation it is about to read.
    pub fn output_generation(&self) -> u64 {
        self.output_generation.load(SeqCst)
    }

    /// The owner: HAProxy runs output generation `generation`.
    pub fn applied(&self, generation: u64) {
        self.applied_generation.store(generation, SeqCst);
        self.applied.notify_one();
    }

    /// The directory index HAProxy is known to run the plan of.
    pub fn applied_index(&self) -> u64 {
        let planned = self.planned.load(SeqCst);
        let caught_up = self.resolved_from.load(SeqCst) == self.plan_generation.load(SeqCst)
            && self.applied_generation.load(SeqCst) == self.output_generation.load(SeqCst);
        if caught_up {
            self.applied_index.store(planned, SeqCst);
            planned
        } else {
            self.applied_index.load(SeqCst)
        }
    }
}

/// Who the ambassador is, for its reports.
#[derive(Debug, Clone)]
pub struct Identity {
    pub id: InstanceId,
    pub host: Address,
    pub services: Vec<Served>,
    /// Its zone (`BAKER_ZONE`), if it has one.
    pub zone: Option<Zone>,
}

impl Identity {
    pub fn new(
        id: InstanceId,
        host: Address,
        services: &[ServiceRoute],
        zone: Option<Zone>,
    ) -> Identity {
        let services = services
            .iter()
            .map(|s| Served {
                service: s.name.clone(),
                port: s.port,
                mode: match s.mode {
                    config::Mode::Http => Mode::Http,
                    config::Mode::Tcp => Mode::Tcp,
                },
            })
            .collect();
        Identity {
            id,
            host,
            services,
            zone,
        }
    }
}

/// The report's servers from `show stat`, keeping the configured services' backends only. A
/// failover twin's counters are added to its instance's: they are the same instance's
/// traffic. `plan` says which servers are of the ambassador's zone.
pub fn servers(stats: &[ServerStat], identity: &Identity, plan: &Desired) -> Vec<ServerReport> {
    let serves = |backend: &str| identity.services.iter().find(|x| x.service == backend);
    let mut out: Vec<ServerReport> = stats
        .iter()
        .filter_map(|s| {
            let service = serves(&s.backend)?.service.clone();
            // Servers are named by instance id; anything else is not one of the directory's.
            let id = s.server.parse().ok()?;
            let local = plan
                .get(s.backend.as_str())
                .and_then(|b| b.get(s.server.as_str()))
                .is_some_and(|d| d.local);
            Some(ServerReport {
                service,
                id,
                state: s.state,
                weight: s.weight,
                requests: s.requests,
                errors: s.errors,
                sessions: s.sessions,
                local,
            })
        })
        .collect();
    let at: HashMap<(String, String), usize> = out
        .iter()
        .enumerate()
        .map(|(n, r)| ((r.service.to_string(), r.id.to_string()), n))
        .collect();
    for s in stats {
        let Some((service, id)) = failover_instance(&s.server) else {
            continue;
        };
        if service != s.backend || serves(&s.backend).is_none() {
            continue;
        }
        let key = (service.to_owned(), id.to_owned());
        if let Some(r) = at.get(&key).map(|&n| &mut out[n]) {
            r.requests += s.requests;
            r.errors += s.errors;
            r.sessions += s.sessions;
        }
    }
    out
}

/// Where the requests went between two reports, from the counters of `show stat`.
#[derive(Debug, Default)]
pub struct Tally {
    /// Each server's request counter at the previous count, by backend and server.
    seen: HashMap<(String, String), u64>,
}

impl Tally {
    /// The requests the configured backends' servers got since the previous call, and those
    /// that went to servers of `zone` (by `plan`). A counter lower than before belongs to a
    /// new HAProxy worker (a reload starts them again from zero) and counts whole.
    pub fn count(&mut self, zone: &Zone, stats: &[ServerStat], plan: &Desired) -> Locality {
        let (mut requests, mut local) = (0, 0);
        let mut seen = HashMap::with_capacity(stats.len());
        for s in stats {
            let Some(backend) = plan.get(s.backend.as_str()) else {
                continue;
            };
            let key = (s.backend.clone(), s.server.clone());
            let before = self.seen.get(&key).copied().unwrap_or(0);
            let delta = s.requests.checked_sub(before).unwrap_or(s.requests);
            requests += delta;
            if backend.get(s.server.as_str()).is_some_and(|d| d.local) {
                local += delta;
            }
            seen.insert(key, s.requests);
        }
        self.seen = seen;
        Locality {
            zone: zone.clone(),
            requests,
            local,
        }
    }
}

/// Reports to the directory until `shutdown`, then signs off.
pub async fn run(
    client: DirectoryClient,
    identity: Identity,
    admin: Socket,
    plan: watch::Receiver<Desired>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let progress = &metrics.progress;
    let mut failing = false;
    let mut tally = Tally::default();
    loop {
        let stats = match admin.server_stats().await {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(cause = %chain(&e), "cannot read HAProxy's server counters for the report");
                Vec::new()
            }
        };
        let applied_index = progress.applied_index();
        let (servers, locality) = {
            let plan = plan.borrow();
            let locality = identity
                .zone
                .as_ref()
                .map(|zone| tally.count(zone, &stats, &plan));
            (servers(&stats, &identity, &plan), locality)
        };
        let report = AmbassadorReport {
            host: identity.host.clone(),
            services: identity.services.clone(),
            applied_index,
            reloads: metrics.reloads.get(),
            servers,
            ttl_ms: TTL.as_millis() as u64,
            locality,
        };
        let sent = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = client.report(identity.id.as_str(), &report) => r,
        };
        match sent {
            Ok(_) if failing => {
                failing = false;
                tracing::info!(directory = %client.base(), "reporting to the directory again");
            }
            Ok(_) => {}
            Err(e) if !failing => {
                failing = true;
                tracing::warn!(directory = %client.base(), cause = %chain(&e), "cannot report to the directory; trying again");
            }
            Err(_) => {}
        }
        let sent_at = Instant::now();
        let next = sent_at + INTERVAL;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep_until(next) => break,
                _ = progress.applied.notified() => {}
            }
            // Report early only when the applied index moved.
            if progress.applied_index() != applied_index {
                tokio::select! {
                    _ = shutdown.cancelled() => {}
                    _ = tokio::time::sleep_until(sent_at + MIN_GAP) => {}
                }
                break;
            }
        }
        if shutdown.is_cancelled() {
            break;
        }
    }
    match tokio::time::timeout(SIGN_OFF_WAIT, client.sign_off(identity.id.as_str())).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::debug!(cause = %chain(&e), "could not remove the report from the directory")
        }
        Err(_) => tracing::debug!("the directory did not answer the sign-off in time"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{Backend, DesiredServer, ServerName};
    use baker_client::ops::ServerState;

    fn stat(server: &str, requests: u64) -> ServerStat {
        ServerStat {
            backend: "svc".into(),
            server: server.into(),
            state: ServerState::Up,
            weight: 1,
            requests,
            errors: 1,
            sessions: 0,
        }
    }

    /// `svc` with a1 in the zone, b1 elsewhere and b1's failover twin.
    fn zoned_plan() -> Desired {
        let a1 = DesiredServer {
            local: true,
            ..DesiredServer::sample("a1", "10.0.0.1", 80, 256)
        };
        let b1 = DesiredServer::sample("b1", "10.0.0.2", 80, 0);
        let twin = DesiredServer {
            name: ServerName::failover_of(&baker_client::Instance::sample("svc", "b1")),
            backup: true,
            ..DesiredServer::sample("b1", "10.0.0.2", 80, 256)
        };
        let backend: Backend = [a1, b1, twin]
            .into_iter()
            .map(|d| (d.name.clone(), d))
            .collect();
        [("svc".parse().unwrap(), backend)].into_iter().collect()
    }

    #[test]
    fn a_twins_counters_are_its_instances_and_local_servers_are_marked() {
        let identity = Identity::new(
            "amb".parse().unwrap(),
            "host".parse().unwrap(),
            &[ServiceRoute {
                name: "svc".parse().unwrap(),
                port: Some(8000),
                mode: config::Mode::Http,
                options: Default::default(),
            }],
            Some("a".parse().unwrap()),
        );
        let stats = [stat("a1", 10), stat("b1", 2), stat("failover:svc:b1", 5)];
        let got: Vec<(String, u64, u64, bool)> = servers(&stats, &identity, &zoned_plan())
            .into_iter()
            .map(|r| (r.id.to_string(), r.requests, r.errors, r.local))
            .collect();
        assert_eq!(
            got,
            [("a1".into(), 10, 1, true), ("b1".into(), 7, 2, false)]
        );
    }

    #[test]
    fn the_tally_counts_the_requests_since_the_last_count_and_a_reset_whole() {
        let zone: Zone = "a".parse().unwrap();
        let plan = zoned_plan();
        let mut tally = Tally::default();
        let first = tally.count(&zone, &[stat("a1", 10), stat("failover:svc:b1", 5)], &plan);
        assert_eq!((first.requests, first.local), (15, 10));
        let next = tally.count(&zone, &[stat("a1", 16), stat("failover:svc:b1", 9)], &plan);
        assert_eq!((next.requests, next.local), (10, 6));
        // A reload started the counters again.
        let reset = tally.count(&zone, &[stat("a1", 3), stat("failover:svc:b1", 1)], &plan);
        assert_eq!((reset.requests, reset.local), (4, 3));
        assert_eq!(reset.zone, zone);
    }

    #[test]
    fn the_applied_index_waits_for_every_stage() {
        let p = Progress::default();
        assert_eq!(p.applied_index(), 0);
        // Index 5 changes the plan.
        p.plan_changing();
        p.planned(5);
        assert_eq!(p.applied_index(), 0, "the resolver has not taken it");
        let g = p.plan_generation();
        p.output_changing();
        p.resolved(g);
        assert_eq!(p.applied_index(), 0, "HAProxy does not run it yet");
        let out = p.output_generation();
        p.applied(out);
        assert_eq!(p.applied_index(), 5);
        // Index 6 changes nothing this ambassador serves.
        p.planned(6);
        assert_eq!(p.applied_index(), 6);
        // Index 7 changes the plan, but the resolver's output stays the same (unresolved name).
        p.plan_changing();
        p.planned(7);
        assert_eq!(p.applied_index(), 6);
        p.resolved(p.plan_generation());
        assert_eq!(p.applied_index(), 7);
        // A DNS answer changes the output: not applied until HAProxy runs it.
        p.output_changing();
        assert_eq!(p.applied_index(), 7, "the last index seen applied stays");
        p.plan_changing();
        p.planned(8);
        p.resolved(p.plan_generation());
        assert_eq!(p.applied_index(), 7);
        p.applied(p.output_generation());
        assert_eq!(p.applied_index(), 8);
    }
}
