//! DNS names in the plan turned into addresses, beside the watch, so that the task owning
//! HAProxy only ever receives IP addresses and never waits on a lookup.
//!
//! [`Cache`] holds what the lookups found: an address for [`FOUND_TTL`], a failure for
//! [`FAILED_TTL`]. Each new plan is published at once with what the cache knows: a server whose
//! name has no address yet (never looked up, still in flight, or failing) is left out; a
//! server whose address is older than its TTL keeps it while it is looked up again. Lookups run
//! on threads of their own, a few at a time, and each answer publishes the plan again. A lookup
//! that hangs delays only its own server; shutdown does not wait for it.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use baker_client::model::Address;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::plan::Desired;
use crate::watch::sleep_until_opt;

/// How long an address found by a lookup is used before it is looked up again (it stays in use
/// while the new lookup runs).
pub const FOUND_TTL: Duration = Duration::from_secs(30);
/// How long a name whose lookup failed stays out before it is looked up again.
pub const FAILED_TTL: Duration = Duration::from_secs(5);
/// Lookups in flight at once; more names wait for a free slot.
const MAX_LOOKUPS: usize = 8;

/// What is known of one name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Entry {
    Found { ip: IpAddr, until: Instant },
    Failed { until: Instant },
}

/// Lookup results by name, with their expiry.
#[derive(Debug, Default)]
pub struct Cache {
    entries: BTreeMap<String, Entry>,
}

impl Cache {
    /// Records the outcome of looking `name` up at `now`.
    pub fn record(&mut self, name: &str, found: Option<IpAddr>, now: Instant) {
        let entry = match found {
            Some(ip) => Entry::Found {
                ip,
                until: now + FOUND_TTL,
            },
            None => Entry::Failed {
                until: now + FAILED_TTL,
            },
        };
        self.entries.insert(name.to_owned(), entry);
    }

    /// `desired` with every DNS name replaced by its address, servers without one left out;
    /// and the names to look up (unknown, or known for longer than their TTL).
    pub fn resolve(&self, desired: &Desired, now: Instant) -> (Desired, BTreeSet<String>) {
        let mut lookups = BTreeSet::new();
        let mut out = desired.clone();
        for backend in out.values_mut() {
            backend.retain(|_, server| {
                let Some(name) = server.address.dns_name() else {
                    return true;
                };
                match self.entries.get(name) {
                    Some(Entry::Found { ip, until }) => {
                        if *until <= now {
                            lookups.insert(name.to_owned());
                        }
                        server.address = Address::from(*ip);
                        true
                    }
                    Some(Entry::Failed { until }) => {
                        if *until <= now {
                            lookups.insert(name.to_owned());
                        }
                        false
                    }
                    None => {
                        lookups.insert(name.to_owned());
                        false
                    }
                }
            });
        }
        (out, lookups)
    }

    /// Forgets every name that `desired` no longer uses.
    pub fn retain_used(&mut self, desired: &Desired) {
        let used: BTreeSet<&str> = names(desired).collect();
        self.entries.retain(|name, _| used.contains(name.as_str()));
    }

    /// When the next entry used by `desired` expires, after `now` (an entry already expired
    /// is being looked up, or waits for a free slot: an answer wakes the task then).
    pub fn next_expiry(&self, desired: &Desired, now: Instant) -> Option<Instant> {
        names(desired)
            .filter_map(|n| self.entries.get(n))
            .map(|e| match e {
                Entry::Found { until, .. } | Entry::Failed { until } => *until,
            })
            .filter(|until| *until > now)
            .min()
    }
}

/// The DNS names (not IP literals) that `desired` uses.
fn names(desired: &Desired) -> impl Iterator<Item = &str> {
    desired
        .values()
        .flat_map(|b| b.values())
        .filter_map(|s| s.address.dns_name())
}

/// Follows `plans` until `shutdown`, publishing each with its names resolved on `resolved`.
pub async fn run(
    mut plans: watch::Receiver<Desired>,
    resolved: watch::Sender<Desired>,
    progress: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let progress = &progress.progress;
    let mut cache = Cache::default();
    let mut in_flight = BTreeSet::new();
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<(String, Option<IpAddr>)>();
    let mut generation = progress.plan_generation();
    let mut plan = plans.borrow_and_update().clone();
    loop {
        let now = Instant::now();
        cache.retain_used(&plan);
        let (out, lookups) = cache.resolve(&plan, now);
        resolved.send_if_modified(|cur| {
            let changed = *cur != out;
            if changed {
                progress.output_changing();
                *cur = out;
            }
            changed
        });
        progress.resolved(generation);
        for name in lookups {
            if in_flight.len() >= MAX_LOOKUPS {
                break;
            }
            if in_flight.insert(name.clone()) {
                spawn_lookup(name, done_tx.clone());
            }
        }
        let wake = cache.next_expiry(&plan, now);
        tokio::select! {
            _ = shutdown.cancelled() => return,
            changed = plans.changed() => {
                if changed.is_err() {
                    // The watch stopped: only shutdown remains.
                    shutdown.cancelled().await;
                    return;
                }
                generation = progress.plan_generation();
                plan = plans.borrow_and_update().clone();
            }
            Some((name, found)) = done_rx.recv() => {
                in_flight.remove(&name);
                let before = cache.entries.get(&name).copied();
                log_outcome(&name, before, found);
                cache.record(&name, found, Instant::now());
            }
            _ = sleep_until_opt(wake) => {}
        }
    }
}

/// Logs a lookup's outcome when it changes what the name resolves to.
fn log_outcome(name: &str, before: Option<Entry>, found: Option<IpAddr>) {
    match (before, found) {
        (Some(Entry::Found { ip: old, .. }), Some(ip)) if old == ip => {}
        (_, Some(ip)) => tracing::info!(%name, address = %ip, "resolved a server's DNS name"),
        (Some(Entry::Failed { .. }), None) => {}
        (Some(Entry::Found { ip, .. }), None) => {
            tracing::warn!(%name, address = %ip, "cannot resolve this DNS name any more; keeping its servers out until it resolves")
        }
        (None, None) => {
            tracing::warn!(%name, "cannot resolve this DNS name; leaving its servers out until it resolves")
        }
    }
}

/// Looks `name` up on a thread of its own (the system resolver blocks, for as long as it
/// likes) and sends the first IPv4 address, else the first address, on `done`.
fn spawn_lookup(name: String, done: mpsc::UnboundedSender<(String, Option<IpAddr>)>) {
    let thread_name = name.clone();
    let spawned = std::thread::Builder::new()
        .name("dns-lookup".into())
        .spawn(move || {
            let addrs: Vec<IpAddr> = (thread_name.as_str(), 0)
                .to_socket_addrs()
                .map(|a| a.map(|a| a.ip()).collect())
                .unwrap_or_default();
            let pick = addrs
                .iter()
                .find(|a| a.is_ipv4())
                .or(addrs.first())
                .copied();
            let _ = done.send((thread_name, pick));
        });
    if let Err(e) = spawned {
        tracing::warn!(%name, cause = %e, "cannot start a DNS lookup");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::DesiredServer;

    fn plan(servers: &[(&str, &str)]) -> Desired {
        let backend = servers
            .iter()
            .map(|(name, address)| {
                let s = DesiredServer::sample(name, address, 80, 100);
                (s.name.clone(), s)
            })
            .collect();
        [("be".parse().unwrap(), backend)].into()
    }

    fn addresses(d: &Desired) -> Vec<(String, String)> {
        d["be"]
            .values()
            .map(|s| (s.name.to_string(), s.address.to_string()))
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn unknown_names_are_left_out_and_looked_up() {
        let cache = Cache::default();
        let now = Instant::now();
        let (out, lookups) = cache.resolve(
            &plan(&[("a", "10.0.0.1"), ("b", "b.example"), ("c", "FD00:0::1")]),
            now,
        );
        assert_eq!(
            addresses(&out),
            [
                ("a".into(), "10.0.0.1".into()),
                ("c".into(), "fd00::1".into())
            ]
        );
        assert_eq!(lookups, ["b.example".to_string()].into());
    }

    #[tokio::test(start_paused = true)]
    async fn found_addresses_are_used_and_refreshed_after_their_ttl() {
        let mut cache = Cache::default();
        let now = Instant::now();
        let ip: IpAddr = "10.0.0.2".parse().unwrap();
        cache.record("b.example", Some(ip), now);
        let p = plan(&[("b", "b.example")]);
        let (out, lookups) = cache.resolve(&p, now);
        assert_eq!(addresses(&out), [("b".into(), "10.0.0.2".into())]);
        assert!(lookups.is_empty());
        assert_eq!(cache.next_expiry(&p, now), Some(now + FOUND_TTL));
        assert_eq!(cache.next_expiry(&p, now + FOUND_TTL), None);
        // Past its TTL the address stays in use while it is looked up again.
        let (out, lookups) = cache.resolve(&p, now + FOUND_TTL);
        assert_eq!(addresses(&out), [("b".into(), "10.0.0.2".into())]);
        assert_eq!(lookups, ["b.example".to_string()].into());
    }

    #[tokio::test(start_paused = true)]
    async fn failures_stay_out_until_retried() {
        let mut cache = Cache::default();
        let now = Instant::now();
        cache.record("x.invalid", None, now);
        let p = plan(&[("x", "x.invalid"), ("a", "10.0.0.1")]);
        let (out, lookups) = cache.resolve(&p, now);
        assert_eq!(addresses(&out), [("a".into(), "10.0.0.1".into())]);
        assert!(
            lookups.is_empty(),
            "a recent failure is not retried at once"
        );
        let (_, lookups) = cache.resolve(&p, now + FAILED_TTL);
        assert_eq!(lookups, ["x.invalid".to_string()].into());
        // A name the plan no longer uses is forgotten.
        cache.retain_used(&plan(&[("a", "10.0.0.1")]));
        assert!(cache.entries.is_empty());
    }

    #[tokio::test]
    async fn the_task_publishes_at_once_and_again_when_a_lookup_answers() {
        let (plan_tx, plan_rx) = watch::channel(plan(&[("a", "10.0.0.1")]));
        let (out_tx, mut out_rx) = watch::channel(Desired::new());
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(run(
            plan_rx,
            out_tx,
            Arc::new(Metrics::default()),
            shutdown.clone(),
        ));
        out_rx.changed().await.unwrap();
        assert_eq!(
            addresses(&out_rx.borrow_and_update()),
            [("a".into(), "10.0.0.1".into())]
        );
        plan_tx.send_replace(plan(&[("a", "10.0.0.1"), ("l", "localhost")]));
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                out_rx.changed().await.unwrap();
                if out_rx.borrow_and_update()["be"].contains_key("l") {
                    return;
                }
            }
        })
        .await
        .expect("localhost to resolve");
        shutdown.cancel();
        task.await.unwrap();
    }
}
