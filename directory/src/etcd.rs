//! The directory's table in etcd v3: where replicas that share it read and write.
//!
//! Layout under the prefix (`/baker` unless `BAKER_STORE` names another):
//!
//! - `<prefix>/instances/<service>/<id>`: one instance, as the JSON of the API's `Instance`,
//!   bound to an etcd lease of its TTL (rounded up to whole seconds, etcd's unit). A heartbeat
//!   keeps the lease alive; when heartbeats stop, etcd deletes the key once the lease runs out,
//!   whichever replica took the last heartbeat, and even if that replica is gone.
//! - `<prefix>/routes/<service>`: one service's canary route, as JSON, a plain key: a write is
//!   committed by a majority of the members before the call that made it answers.
//! - `<prefix>/maintenance/<service>`: one service's drains, with the drain or undrain that left
//!   them so and when ([`DrainRecord`]), a plain key written in a transaction that checks it is
//!   still what the writing replica read: two replicas draining one service at once do not lose
//!   either drain. A record with no drain left (the service's last drain was lifted) is bound to
//!   the writing replica's lease, so the key goes once that lease does, and carries the undrain
//!   to the other replicas meanwhile.
//! - `<prefix>/causes/<replica>`: why the instances deleted in the same transaction went
//!   (deregistered, container stopped, ...), as a JSON list, bound to the writing replica's
//!   own lease and overwritten by its next removal. A replica removes instances only in a
//!   transaction that also puts this key, so a deleted instance key with no such put in the
//!   same revision is one whose lease ran out: it expired.
//!
//! A replica reads the whole prefix at one revision ([`Etcd::snapshot`]) and then follows every
//! change after it ([`Etcd::watch`]): all replicas see the same changes in the same order, and
//! the etcd revision of each is the same on every replica. What is read is checked like input:
//! a key or value that is not a valid name, instance or route is reported and skipped.
//!
//! Requests require a leader (`require_leader`): without one, etcd refuses them instead of
//! hanging. A call is tried again, on the next member, while members are down, frozen or
//! between leaders, for up to [`REQUEST_TIMEOUT`]; a cluster still without a leader by then has
//! lost its quorum, and [`EtcdError::NoQuorum`] says so.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use baker_client::change::{MaintenanceAction, RemoveCause};
use baker_client::maintenance::Maintenance;
use baker_client::model::{Instance, InstanceId, Route, ServiceName};
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, KeyValue, PutOptions, Txn,
    TxnOp, TxnOpResponse, WatchOptions,
};
use futures_util::Stream;

/// The prefix used when `BAKER_STORE` names none.
pub const DEFAULT_PREFIX: &str = "/baker";
/// Longest time one etcd request may take.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);

/// Where the table lives: `etcd://host:port[,host:port...][/prefix]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreUrl {
    /// `http://host:port` of each member.
    pub endpoints: Vec<String>,
    /// The key prefix, starting with `/`, without a trailing `/`.
    pub prefix: String,
}

impl FromStr for StoreUrl {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let rest = s
            .strip_prefix("etcd://")
            .ok_or("must be memory or etcd://host:port[,host:port...][/prefix]")?;
        let (hosts, prefix) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        let mut endpoints = Vec::new();
        for host in hosts.split(',') {
            let host = host.trim();
            let (name, port) = host
                .rsplit_once(':')
                .ok_or_else(|| format!("member {host:?} must be host:port, such as etcd1:2379"))?;
            let name_ok = !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '[' | ']' | ':'));
            if !name_ok || port.parse::<u16>().map_or(true, |p| p == 0) {
                return Err(format!(
                    "member {host:?} must be host:port, such as etcd1:2379"
                ));
            }
            let endpoint = format!("http://{host}");
            if endpoints.contains(&endpoint) {
                return Err(format!("names member {host} twice"));
            }
            endpoints.push(endpoint);
        }
        let prefix = prefix.trim_end_matches('/');
        let prefix = if prefix.is_empty() {
            DEFAULT_PREFIX.to_owned()
        } else if prefix
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '/' | '_' | '-' | '.'))
            && !prefix.contains("//")
        {
            prefix.to_owned()
        } else {
            return Err(format!(
                "prefix {prefix:?} may hold only letters, digits, '/', '_', '-' and '.'"
            ));
        };
        Ok(StoreUrl { endpoints, prefix })
    }
}

impl fmt::Display for StoreUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hosts: Vec<&str> = self
            .endpoints
            .iter()
            .map(|e| e.trim_start_matches("http://"))
            .collect();
        write!(f, "etcd://{}{}", hosts.join(","), self.prefix)
    }
}

/// What can go wrong with etcd.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    #[error(
        "the etcd cluster has lost its quorum (no leader): changes are refused until a majority \
         of its members is back; reads and watches serve the last view"
    )]
    NoQuorum,
    #[error("etcd did not answer within {0:?}")]
    Timeout(Duration),
    #[error("cannot reach etcd")]
    Unreachable(#[source] etcd_client::Error),
    #[error("etcd's watch was cancelled: {0}")]
    WatchCancelled(String),
}

impl EtcdError {
    fn of(e: etcd_client::Error) -> EtcdError {
        let text = e.to_string();
        if text.contains("no leader") || text.contains("leader changed") {
            EtcdError::NoQuorum
        } else {
            EtcdError::Unreachable(e)
        }
    }
}

/// One change read from etcd.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// An instance was put (new, changed, or put again with another lease).
    Instance { instance: Instance, lease: i64 },
    /// An instance's key was deleted, or its lease ran out.
    InstanceGone {
        service: ServiceName,
        id: InstanceId,
    },
    /// A service's route was set.
    Route { service: ServiceName, route: Route },
    /// A service's route was cleared.
    RouteCleared { service: ServiceName },
    /// A service's drains were written.
    Maintenance {
        service: ServiceName,
        record: DrainRecord,
    },
    /// A service's drains key was deleted (its lease ran out after its last drain was lifted).
    MaintenanceCleared { service: ServiceName },
    /// Why the instances deleted at the same revision were removed.
    Causes(Vec<Removal>),
}

/// One instance a replica removed, and why.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Removal {
    pub service: ServiceName,
    pub id: InstanceId,
    pub cause: RemoveCause,
}

/// One service's drains as etcd holds them, and the call that left them so.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DrainRecord {
    /// The service's drains (none once its last drain was lifted).
    pub maintenance: Maintenance,
    /// The drain or undrain that left them so.
    pub action: MaintenanceAction,
    /// When, in milliseconds since the Unix epoch.
    pub at: u64,
}

/// What a conditional write of a service's drains did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Swap {
    /// Written, at this revision.
    Done(i64),
    /// The key had changed since it was read: nothing written; etcd was at this revision.
    Stale(i64),
}

/// What a conditional put ([`Etcd::put_instance_if`]) did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Put {
    /// Written, at this revision.
    Written(i64),
    /// Not written: the key is bound to this other lease (`0`: none, or it just went).
    Held(i64),
}

/// The whole table at one revision.
#[derive(Debug, Default, Clone)]
pub struct Snapshot {
    pub revision: i64,
    /// Every instance, with the lease its key is bound to.
    pub instances: Vec<(Instance, i64)>,
    pub routes: BTreeMap<ServiceName, Route>,
    /// Every service's drains key, with the revision it was last written at.
    pub maintenance: BTreeMap<ServiceName, (DrainRecord, i64)>,
    /// Why the instances named by the causes keys still in etcd were removed, with the
    /// revision of their removal: a replica whose watch broke tells a deregistration made
    /// meanwhile from an expiry by these.
    pub causes: HashMap<(ServiceName, InstanceId), (RemoveCause, i64)>,
}

/// A connection to the etcd cluster. Cheap to clone.
#[derive(Clone)]
pub struct Etcd {
    client: Members,
    prefix: String,
}

/// A client per member, and the member calls go to first.
///
/// One client over all the members would pick a member at random for every attempt, the
/// frozen one included: each attempt that meets it costs [`ATTEMPT_TIMEOUT`], and a few in a
/// row use up [`REQUEST_TIMEOUT`] while the other members would have answered at once (on a
/// 3-member cluster, 4 picks of the frozen member in a row: one call in 81). Here a member
/// that does not answer is passed over: the next attempt, and the calls after it, go to the
/// next member.
///
/// A member that answers but has no leader is passed over too (it may be cut off from the
/// others), but the move skips a member that failed (was silent or could not be reached) in
/// the last [`SILENT_SKIP`]: while the others elect a new leader in place of a frozen one,
/// calls wait for them instead of going back to the frozen member. When every other member
/// failed of late, the one that failed longest ago is next.
#[derive(Clone)]
struct Members {
    clients: Arc<[Client]>,
    /// Index of the member calls go to first.
    current: Arc<AtomicUsize>,
    /// When each member last let an attempt time out or refused it, in milliseconds after
    /// `start`, plus one; 0: never.
    failed_at: Arc<[AtomicU64]>,
    start: tokio::time::Instant,
}

/// How long a member that let an attempt time out or refused it is passed over when calls
/// move on.
const SILENT_SKIP: Duration = Duration::from_secs(10);

impl Members {
    fn new(clients: Vec<Client>) -> Members {
        Members {
            failed_at: clients.iter().map(|_| AtomicU64::new(0)).collect(),
            clients: clients.into(),
            current: Arc::new(AtomicUsize::new(0)),
            start: tokio::time::Instant::now(),
        }
    }

    /// The member to try now, and its client.
    fn pick(&self) -> (usize, Client) {
        let i = self.current.load(Ordering::Relaxed) % self.clients.len();
        (i, self.clients[i].clone())
    }

    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64 + 1
    }

    /// Member `i` did not answer or could not be reached (`failed`), or has no leader: calls
    /// go to the next member that did not fail of late, unless another call moved on already.
    fn pass(&self, i: usize, failed: bool) {
        let now = self.now_ms();
        if failed {
            self.failed_at[i].store(now, Ordering::Relaxed);
        }
        let failed_at: Vec<u64> = self
            .failed_at
            .iter()
            .map(|t| t.load(Ordering::Relaxed))
            .collect();
        let quiet_since = now.saturating_sub(SILENT_SKIP.as_millis() as u64);
        let next = next_member(i, &failed_at, quiet_since);
        let _ = self
            .current
            .compare_exchange(i, next, Ordering::Relaxed, Ordering::Relaxed);
    }
}

async fn timed<T>(
    fut: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, EtcdError> {
    match tokio::time::timeout(REQUEST_TIMEOUT, fut).await {
        Err(_) => Err(EtcdError::Timeout(REQUEST_TIMEOUT)),
        Ok(r) => r.map_err(EtcdError::of),
    }
}

/// The first member after `i` that did not fail since `quiet_since` (`failed_at`: when each
/// last failed, 0 for never), or else the other member that failed longest ago.
fn next_member(i: usize, failed_at: &[u64], quiet_since: u64) -> usize {
    let n = failed_at.len();
    let others = (1..n).map(|k| (i + k) % n);
    others
        .clone()
        .find(|&j| failed_at[j] <= quiet_since)
        .or_else(|| others.min_by_key(|&j| failed_at[j]))
        .unwrap_or(i)
}

/// Runs `call` with the client of the current member until it succeeds, fails for another
/// reason than an unreachable or silent member, or [`REQUEST_TIMEOUT`] passes. A member that
/// is down (the connection is refused), frozen (it accepts and never answers: an attempt is
/// given up after [`ATTEMPT_TIMEOUT`]) or without a leader is passed over: the next attempt
/// goes to the next member. A lease of a 2 s TTL is thus renewed through the other members
/// while one is frozen. Every call retried this way is idempotent (a put of the same value, a
/// delete, a lease renewal).
async fn retried<T, F, Fut>(members: &Members, mut call: F) -> Result<T, EtcdError>
where
    F: FnMut(Client) -> Fut,
    Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
{
    let deadline = tokio::time::Instant::now() + REQUEST_TIMEOUT;
    // Whether a member said it has no leader: if no attempt succeeds, the quorum is lost,
    // whatever the last attempt met (a member down, or one that never answered).
    let mut leaderless = false;
    let last = loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let (member, client) = members.pick();
        match tokio::time::timeout(left.min(ATTEMPT_TIMEOUT), call(client)).await {
            Err(_) => {
                members.pass(member, true);
                if tokio::time::Instant::now() + RETRY_PAUSE >= deadline {
                    break EtcdError::Timeout(REQUEST_TIMEOUT);
                }
            }
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(e)) => match EtcdError::of(e) {
                // A member down, or one without a leader for the moment (an election after
                // the leader was lost takes about one election timeout): try again. No leader
                // until the deadline is a lost quorum.
                e @ (EtcdError::Unreachable(_) | EtcdError::NoQuorum) => {
                    members.pass(member, matches!(e, EtcdError::Unreachable(_)));
                    leaderless |= matches!(e, EtcdError::NoQuorum);
                    if tokio::time::Instant::now() + RETRY_PAUSE >= deadline {
                        break e;
                    }
                    tokio::time::sleep(RETRY_PAUSE).await;
                }
                e => return Err(e),
            },
        }
    };
    match last {
        EtcdError::Unreachable(_) | EtcdError::Timeout(_) if leaderless => Err(EtcdError::NoQuorum),
        e => Err(e),
    }
}

/// Longest wait for one attempt of a call: a member that has not answered by then is taken
/// for frozen, and the call is tried again.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_millis(750);
/// Pause between two attempts of a call that found a member down.
const RETRY_PAUSE: Duration = Duration::from_millis(50);

/// An instance's TTL in etcd's whole seconds, rounded up: the key never goes before its TTL.
pub fn lease_seconds(ttl_ms: u64) -> i64 {
    i64::try_from(ttl_ms.div_ceil(1000).max(1)).unwrap_or(i64::MAX)
}

impl Etcd {
    /// Connects to the members of `url`, a client for each. Does not wait for any of them to
    /// answer: a replica starts, and serves what it has, while etcd is away.
    pub async fn connect(url: &StoreUrl) -> Result<Etcd, EtcdError> {
        let options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_timeout(REQUEST_TIMEOUT)
            .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2))
            .with_keep_alive_while_idle(true)
            .with_require_leader(true);
        let mut clients = Vec::with_capacity(url.endpoints.len());
        for endpoint in &url.endpoints {
            clients.push(timed(Client::connect([endpoint], Some(options.clone()))).await?);
        }
        Ok(Etcd {
            client: Members::new(clients),
            prefix: url.prefix.clone(),
        })
    }

    fn instance_key(&self, service: &ServiceName, id: &InstanceId) -> String {
        format!("{}/instances/{service}/{id}", self.prefix)
    }

    fn route_key(&self, service: &ServiceName) -> String {
        format!("{}/routes/{service}", self.prefix)
    }

    fn maintenance_key(&self, service: &ServiceName) -> String {
        format!("{}/maintenance/{service}", self.prefix)
    }

    fn causes_key(&self, lease: i64) -> String {
        format!("{}/causes/{lease:x}", self.prefix)
    }

    /// Everything under the prefix, at the revision etcd reports.
    pub async fn snapshot(&self) -> Result<Snapshot, EtcdError> {
        let key = format!("{}/", self.prefix);
        let resp = retried(&self.client, |mut c| {
            let key = key.clone();
            async move { c.get(key, Some(GetOptions::new().with_prefix())).await }
        })
        .await?;
        let revision = resp.header().map_or(0, |h| h.revision());
        let mut snap = Snapshot {
            revision,
            ..Snapshot::default()
        };
        for kv in resp.kvs() {
            match self.decode(EventType::Put, kv) {
                Some(Change::Instance { instance, lease }) => {
                    snap.instances.push((instance, lease))
                }
                Some(Change::Route { service, route }) => {
                    snap.routes.insert(service, route);
                }
                Some(Change::Maintenance { service, record }) => {
                    snap.maintenance
                        .insert(service, (record, kv.mod_revision()));
                }
                Some(Change::Causes(removals)) => {
                    let at = kv.mod_revision();
                    for r in removals {
                        let newer = snap
                            .causes
                            .get(&(r.service.clone(), r.id.clone()))
                            .is_none_or(|(_, seen)| *seen < at);
                        if newer {
                            snap.causes.insert((r.service, r.id), (r.cause, at));
                        }
                    }
                }
                _ => {}
            }
        }
        Ok(snap)
    }

    /// Reads one key-value as a change; `None` (logged) for anything that is not Baker's.
    fn decode(&self, kind: EventType, kv: &KeyValue) -> Option<Change> {
        let key = String::from_utf8_lossy(kv.key());
        let rest = key.strip_prefix(&self.prefix)?.strip_prefix('/')?;
        let parsed = decode_key(rest).and_then(|k| match (k, kind) {
            (Key::Instance(service, id), EventType::Delete) => {
                Ok(Change::InstanceGone { service, id })
            }
            (Key::Instance(service, id), EventType::Put) => {
                let instance: Instance = serde_json::from_slice(kv.value())
                    .map_err(|e| format!("its value is not an instance: {e}"))?;
                if instance.service != service || instance.id != id {
                    return Err("its value names another instance".into());
                }
                Ok(Change::Instance {
                    instance,
                    lease: kv.lease(),
                })
            }
            (Key::Route(service), EventType::Delete) => Ok(Change::RouteCleared { service }),
            (Key::Route(service), EventType::Put) => {
                let route: Route = serde_json::from_slice(kv.value())
                    .map_err(|e| format!("its value is not a route: {e}"))?;
                Ok(Change::Route { service, route })
            }
            (Key::Maintenance(service), EventType::Delete) => {
                Ok(Change::MaintenanceCleared { service })
            }
            (Key::Maintenance(service), EventType::Put) => {
                let record: DrainRecord = serde_json::from_slice(kv.value())
                    .map_err(|e| format!("its value is not a service's drains: {e}"))?;
                Ok(Change::Maintenance { service, record })
            }
            (Key::Causes, EventType::Put) => serde_json::from_slice(kv.value())
                .map(Change::Causes)
                .map_err(|e| format!("its value is not a list of removals: {e}")),
            (Key::Causes, EventType::Delete) => Ok(Change::Causes(Vec::new())),
        });
        match parsed {
            Ok(c) => Some(c),
            Err(why) => {
                tracing::warn!(%key, "skipping a key of the store: {why}");
                None
            }
        }
    }

    /// Every change after `revision`, in order, each with its etcd revision. The stream ends
    /// with an error when the watch breaks (etcd away, or the revision compacted: the caller
    /// then reads a new snapshot).
    pub async fn watch(
        &self,
        revision: i64,
    ) -> Result<impl Stream<Item = Result<(i64, Change), EtcdError>> + Send + 'static, EtcdError>
    {
        let key = format!("{}/", self.prefix);
        let stream = retried(&self.client, |mut c| {
            let key = key.clone();
            async move {
                let options = WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(revision + 1);
                c.watch(key, Some(options)).await
            }
        })
        .await?;
        let this = self.clone();
        let changes = futures_util::stream::unfold(
            (stream, std::collections::VecDeque::new(), false),
            move |(mut stream, mut queued, done)| {
                let this = this.clone();
                async move {
                    loop {
                        if let Some(item) = queued.pop_front() {
                            return Some((Ok(item), (stream, queued, done)));
                        }
                        if done {
                            return None;
                        }
                        let resp = match stream.message().await {
                            Ok(Some(resp)) => resp,
                            Ok(None) => {
                                return Some((
                                    Err(EtcdError::WatchCancelled("the stream ended".into())),
                                    (stream, queued, true),
                                ))
                            }
                            Err(e) => return Some((Err(EtcdError::of(e)), (stream, queued, true))),
                        };
                        if resp.canceled() {
                            let why = if resp.compact_revision() > 0 {
                                format!("revision {} was compacted", resp.compact_revision())
                            } else {
                                resp.cancel_reason().to_owned()
                            };
                            return Some((
                                Err(EtcdError::WatchCancelled(why)),
                                (stream, queued, true),
                            ));
                        }
                        for event in resp.events() {
                            let Some(kv) = event.kv() else { continue };
                            if let Some(change) = this.decode(event.event_type(), kv) {
                                queued.push_back((kv.mod_revision(), change));
                            }
                        }
                    }
                }
            },
        );
        Ok(changes)
    }

    /// Grants a lease of `seconds`.
    pub async fn grant(&self, seconds: i64) -> Result<i64, EtcdError> {
        let resp = retried(&self.client, |mut c| async move {
            c.lease_grant(seconds, None).await
        })
        .await?;
        Ok(resp.id())
    }

    /// Renews `lease` once; `false` when etcd no longer knows it (it ran out).
    pub async fn keep_alive(&self, lease: i64) -> Result<bool, EtcdError> {
        retried(&self.client, |mut c| async move {
            let renewed = async {
                let (mut keeper, mut stream) = c.lease_keep_alive(lease).await?;
                keeper.keep_alive().await?;
                stream.message().await
            };
            match renewed.await {
                Ok(resp) => Ok(resp.is_some_and(|r| r.ttl() > 0)),
                Err(e) if e.to_string().contains("lease not found") => Ok(false),
                Err(e) => Err(e),
            }
        })
        .await
    }

    /// Revokes `lease`: every key bound to it goes at once.
    pub async fn revoke(&self, lease: i64) -> Result<(), EtcdError> {
        match retried(
            &self.client,
            |mut c| async move { c.lease_revoke(lease).await },
        )
        .await
        {
            Ok(_) => Ok(()),
            // Already gone: what revoking wanted.
            Err(EtcdError::Unreachable(e)) if e.to_string().contains("not found") => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Puts `instance` bound to `lease`; returns the revision of the change.
    pub async fn put_instance(&self, instance: &Instance, lease: i64) -> Result<i64, EtcdError> {
        // An instance holds names, numbers and lists of them: serialization cannot fail.
        let value = serde_json::to_vec(instance).expect("instances always serialize");
        let key = self.instance_key(&instance.service, &instance.id);
        let resp = retried(&self.client, |mut c| {
            let (key, value) = (key.clone(), value.clone());
            async move {
                c.put(key, value, Some(PutOptions::new().with_lease(lease)))
                    .await
            }
        })
        .await?;
        Ok(resp.header().map_or(0, |h| h.revision()))
    }

    /// Puts `instance` bound to `lease` only if its key is bound to `expected` (`None`: the
    /// key is absent) or already to `lease`, in one transaction: of two replicas that both
    /// saw a container absent (or held by a lease that ran out) and both write it, one wins
    /// and the other leaves it alone, instead of taking it over unseen. Retried like any call:
    /// a retry after a commit whose answer was lost finds the key bound to `lease` and
    /// succeeds again.
    pub async fn put_instance_if(
        &self,
        instance: &Instance,
        lease: i64,
        expected: Option<i64>,
    ) -> Result<Put, EtcdError> {
        // An instance holds names, numbers and lists of them: serialization cannot fail.
        let value = serde_json::to_vec(instance).expect("instances always serialize");
        let key = self.instance_key(&instance.service, &instance.id);
        let put = TxnOp::put(
            key.clone(),
            value,
            Some(PutOptions::new().with_lease(lease)),
        );
        let expected = match expected {
            None => Compare::version(key.clone(), CompareOp::Equal, 0),
            Some(other) => Compare::lease(key.clone(), CompareOp::Equal, other),
        };
        let txn = Txn::new()
            .when([expected])
            .and_then([put.clone()])
            .or_else([TxnOp::txn(
                Txn::new()
                    .when([Compare::lease(key.clone(), CompareOp::Equal, lease)])
                    .and_then([put])
                    .or_else([TxnOp::get(key, None)]),
            )]);
        let resp = retried(&self.client, |mut c| {
            let txn = txn.clone();
            async move { c.txn(txn).await }
        })
        .await?;
        let revision = resp.header().map_or(0, |h| h.revision());
        if resp.succeeded() {
            return Ok(Put::Written(revision));
        }
        match resp.op_responses().into_iter().next() {
            Some(TxnOpResponse::Txn(inner)) if inner.succeeded() => Ok(Put::Written(revision)),
            Some(TxnOpResponse::Txn(inner)) => {
                let holder = inner.op_responses().into_iter().find_map(|r| match r {
                    TxnOpResponse::Get(g) => g.kvs().first().map(KeyValue::lease),
                    _ => None,
                });
                Ok(Put::Held(holder.unwrap_or_default()))
            }
            _ => Ok(Put::Held(0)),
        }
    }

    /// Deletes an instance's key; returns the revision after the call and whether it existed.
    pub async fn delete_instance(
        &self,
        service: &ServiceName,
        id: &InstanceId,
    ) -> Result<(i64, bool), EtcdError> {
        let key = self.instance_key(service, id);
        let resp = retried(&self.client, |mut c| {
            let key = key.clone();
            async move { c.delete(key, None).await }
        })
        .await?;
        Ok((
            resp.header().map_or(0, |h| h.revision()),
            resp.deleted() > 0,
        ))
    }

    /// Deletes the keys of `removals` in one transaction that also says why (the writing
    /// replica's causes key, bound to its `lease`); returns the revision of the change and
    /// how many keys existed.
    pub async fn remove_instances(
        &self,
        removals: &[Removal],
        lease: i64,
    ) -> Result<(i64, i64), EtcdError> {
        // Names and causes: serialization cannot fail.
        let value = serde_json::to_vec(removals).expect("removals always serialize");
        let mut ops = vec![TxnOp::put(
            self.causes_key(lease),
            value,
            Some(PutOptions::new().with_lease(lease)),
        )];
        ops.extend(
            removals
                .iter()
                .map(|r| TxnOp::delete(self.instance_key(&r.service, &r.id), None)),
        );
        let resp = retried(&self.client, |mut c| {
            let ops = ops.clone();
            async move { c.txn(Txn::new().and_then(ops)).await }
        })
        .await?;
        let deleted = resp
            .op_responses()
            .iter()
            .map(|r| match r {
                TxnOpResponse::Delete(d) => d.deleted(),
                _ => 0,
            })
            .sum();
        Ok((resp.header().map_or(0, |h| h.revision()), deleted))
    }

    /// Sets (`Some`) or clears (`None`) a service's route; returns the revision of the change.
    pub async fn set_route(
        &self,
        service: &ServiceName,
        route: Option<&Route>,
    ) -> Result<i64, EtcdError> {
        let key = self.route_key(service);
        let resp = match route {
            Some(route) => {
                let value = serde_json::to_vec(route).expect("routes always serialize");
                retried(&self.client, |mut c| {
                    let (key, value) = (key.clone(), value.clone());
                    async move { c.put(key, value, None).await.map(|r| r.header().cloned()) }
                })
                .await?
            }
            None => {
                retried(&self.client, |mut c| {
                    let key = key.clone();
                    async move { c.delete(key, None).await.map(|r| r.header().cloned()) }
                })
                .await?
            }
        };
        Ok(resp.map_or(0, |h| h.revision()))
    }

    /// Writes `service`'s drains `record` if its key was last written at revision `seen` (0: no
    /// key), in one transaction; a record with no drain is bound to `lease`, so the key goes
    /// with it. Retried like any call: an attempt that committed but whose answer was lost
    /// makes the next one find the key moved ([`Swap::Stale`]).
    pub async fn set_maintenance(
        &self,
        service: &ServiceName,
        record: &DrainRecord,
        seen: i64,
        lease: Option<i64>,
    ) -> Result<Swap, EtcdError> {
        // Names, numbers and printable text: serialization cannot fail.
        let value = serde_json::to_vec(record).expect("drain records always serialize");
        let key = self.maintenance_key(service);
        let options = lease.map(|l| PutOptions::new().with_lease(l));
        let txn = Txn::new()
            .when([Compare::mod_revision(key.clone(), CompareOp::Equal, seen)])
            .and_then([TxnOp::put(key, value, options)]);
        let resp = retried(&self.client, |mut c| {
            let txn = txn.clone();
            async move { c.txn(txn).await }
        })
        .await?;
        let revision = resp.header().map_or(0, |h| h.revision());
        Ok(if resp.succeeded() {
            Swap::Done(revision)
        } else {
            Swap::Stale(revision)
        })
    }
}

enum Key {
    Instance(ServiceName, InstanceId),
    Route(ServiceName),
    Maintenance(ServiceName),
    Causes,
}

/// `instances/<service>/<id>`, `routes/<service>`, `maintenance/<service>` or
/// `causes/<lease>`, names checked as the API checks them.
fn decode_key(rest: &str) -> Result<Key, String> {
    let parts: Vec<&str> = rest.split('/').collect();
    let service = |s: &str| {
        s.parse::<ServiceName>()
            .map_err(|e| format!("{s:?} is not a service name: {}", e.message))
    };
    match parts.as_slice() {
        ["instances", s, id] => Ok(Key::Instance(
            service(s)?,
            id.parse::<InstanceId>()
                .map_err(|e| format!("{id:?} is not an instance id: {}", e.message))?,
        )),
        ["routes", s] => Ok(Key::Route(service(s)?)),
        ["maintenance", s] => Ok(Key::Maintenance(service(s)?)),
        ["causes", lease] if i64::from_str_radix(lease, 16).is_ok() => Ok(Key::Causes),
        _ => Err("it is not a key Baker writes".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_move_on_to_a_member_that_did_not_fail_of_late() {
        // Member 0 froze (silent at 500); member 1 has no leader yet: the next is 2, then 1
        // again, never 0 while it is recent.
        let failed = [500, 0, 0];
        assert_eq!(next_member(1, &failed, 0), 2);
        assert_eq!(next_member(2, &failed, 0), 1);
        // Long ago: its turn comes again.
        assert_eq!(next_member(2, &failed, 600), 0);
        // Two members down (refused at 600 and 700), the survivor slow at 500 while it had
        // not yet seen the others go: it is the one that failed longest ago, so it is asked
        // again (and says it has no leader) instead of calls going between the two down.
        assert_eq!(next_member(1, &[500, 600, 700], 0), 0);
        assert_eq!(next_member(2, &[500, 600, 700], 0), 0);
        assert_eq!(next_member(0, &[500, 600, 700], 0), 1);
        assert_eq!(next_member(0, &[0], 0), 0);
    }

    #[test]
    fn store_urls() {
        let u: StoreUrl = "etcd://h1:2379,10.0.0.2:2379/team/baker/".parse().unwrap();
        assert_eq!(u.endpoints, ["http://h1:2379", "http://10.0.0.2:2379"]);
        assert_eq!(u.prefix, "/team/baker");
        assert_eq!(u.to_string(), "etcd://h1:2379,10.0.0.2:2379/team/baker");
        let u: StoreUrl = "etcd://h1:2379".parse().unwrap();
        assert_eq!(u.prefix, DEFAULT_PREFIX);
        for (bad, says) in [
            ("http://h1:2379", "must be memory or etcd://"),
            ("etcd://h1", "must be host:port"),
            ("etcd://h1:0", "must be host:port"),
            ("etcd://h1:2379,,h2:2379", "must be host:port"),
            ("etcd://h1:2379,h1:2379", "twice"),
            ("etcd://h1:2379/a b", "prefix"),
            ("etcd://h1:2379//x", "prefix"),
        ] {
            let e = bad.parse::<StoreUrl>().unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn lease_seconds_round_up() {
        assert_eq!(lease_seconds(1), 1);
        assert_eq!(lease_seconds(1000), 1);
        assert_eq!(lease_seconds(1001), 2);
        assert_eq!(lease_seconds(6000), 6);
    }

    #[test]
    fn keys_are_checked_like_input() {
        assert!(matches!(
            decode_key("instances/emitter/a-1"),
            Ok(Key::Instance(..))
        ));
        assert!(matches!(decode_key("routes/emitter"), Ok(Key::Route(_))));
        assert!(matches!(
            decode_key("maintenance/emitter"),
            Ok(Key::Maintenance(_))
        ));
        assert!(matches!(decode_key("causes/7f3a"), Ok(Key::Causes)));
        for bad in [
            "instances/Emitter/a",
            "instances/emitter",
            "routes/emitter/x",
            "maintenance/Emitter",
            "other/emitter",
            "causes/nothex",
        ] {
            assert!(decode_key(bad).is_err(), "{bad}");
        }
    }
}
