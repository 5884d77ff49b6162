//! The directory's table in etcd v3: where replicas that share it read and write.
//!
//! Layout under the prefix (`/baker` unless `BAKER_STORE` names another):
//!
//! - `<prefix>/instances/<service>/<id>`: one instance, as the JSON of the API's `Instance`
//!   with who registered it (`by`, the name of the registering call's token, or `docker`),
//!   bound to an etcd lease of its TTL (rounded up to whole seconds, etcd's unit). A heartbeat
//!   keeps the lease alive; when heartbeats stop, etcd deletes the key once the lease runs out,
//!   whichever replica took the last heartbeat, and even if that replica is gone.
//! - `<prefix>/routes/<service>`: one service's canary route, with the call that set it (its
//!   origin) and when ([`RouteRecord`]), a plain key: a write is committed by a majority of the
//!   members before the call that made it answers. A cleared route is a record of no route,
//!   bound to the clearing replica's lease: it carries the clearing and its origin to the other
//!   replicas, and then goes.
//! - `<prefix>/maintenance/<service>`: one service's drains, with the drain or undrain that left
//!   them so and when ([`DrainRecord`]), a plain key written in a transaction that checks it is
//!   still what the writing replica read: two replicas draining one service at once do not lose
//!   either drain. A record with no drain left (the service's last drain was lifted) is bound to
//!   the writing replica's lease, so the key goes once that lease does, and carries the undrain
//!   to the other replicas meanwhile.
//! - `<prefix>/causes/<replica>`: why the instances deleted in the same transaction went
//!   (deregistered, container stopped, ...) and who removed them (the name of the
//!   deregistering call's token, `docker`), as a JSON list, bound to the writing replica's
//!   own lease and overwritten by its next removal. A replica removes instances only in a
//!   transaction that also puts this key, so a deleted instance key with no such put in the
//!   same revision is one whose lease ran out: it expired (by `expiry`). A heartbeat writes
//!   nothing at all, so none of this costs a heartbeat anything.
//!
//! A replica reads the whole prefix at one revision ([`Etcd::snapshot`], in pages of
//! [`SNAPSHOT_PAGE`] keys) and then follows every change after it ([`Etcd::watch`]): all
//! replicas see the same changes in the same order, and the etcd revision of each is the same
//! on every replica. A transaction that grows with its input (many removals) is split under
//! etcd's `--max-txn-ops` ([`MAX_TXN_OPS`]). What is read is checked like input:
//! a key or value that is not a valid name, instance or route is reported and skipped.
//!
//! Requests require a leader (`require_leader`): without one, etcd refuses them instead of
//! hanging. A call is tried again, on the next member, while members are down, frozen or
//! between leaders, for up to [`REQUEST_TIMEOUT`]; a cluster still without a leader by then has
//! lost its quorum, and [`EtcdError::NoQuorum`] says so. What etcd refuses as such (by its gRPC
//! status code: an invalid request, no permission, a lease it no longer knows, a compacted
//! revision) is not tried again ([`EtcdError::of`]).

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use baker_client::change::{MaintenanceAction, RemoveCause};
use baker_client::maintenance::Maintenance;
use baker_client::model::{Instance, InstanceId, Route, ServiceName};
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, KeyValue, KvClient,
    PutOptions, Txn, TxnOp, TxnOpResponse, WatchClient, WatchOptions,
};
use futures_util::Stream;

/// The prefix used when `BAKER_STORE` names none.
pub const DEFAULT_PREFIX: &str = "/baker";
/// Longest time one etcd request may take.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);

/// Where the table lives: `etcd://host:port[,host:port...][/prefix]`, or `etcds://...` for
/// members that speak TLS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreUrl {
    /// `http://host:port` (`https://` with TLS) of each member.
    pub endpoints: Vec<String>,
    /// The key prefix, starting with `/`, without a trailing `/`.
    pub prefix: String,
    /// With `etcds://`: how to trust the members, and what to show them.
    pub tls: Option<EtcdTls>,
}

/// TLS to etcd's members (`etcds://`): the CA bundle that signed their certificates
/// (`BAKER_ETCD_CA`, else `BAKER_CA`), and a client certificate for members started with
/// `--client-cert-auth` (`BAKER_ETCD_CERT` and `BAKER_ETCD_KEY`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EtcdTls {
    pub ca: Option<PathBuf>,
    pub identity: Option<(PathBuf, PathBuf)>,
}

impl EtcdTls {
    /// tonic's settings for these files, read now.
    fn options(&self) -> Result<etcd_client::TlsOptions, EtcdError> {
        let read = |what: &'static str, path: &PathBuf| {
            std::fs::read(path)
                .map_err(|e| EtcdError::Tls(format!("cannot read {what} {}: {e}", path.display())))
        };
        let ca = self.ca.as_ref().ok_or_else(|| {
            EtcdError::Tls("etcds:// needs BAKER_ETCD_CA (or BAKER_CA): the CA bundle that signed the members' certificates".to_owned())
        })?;
        let mut options = etcd_client::TlsOptions::new().ca_certificate(
            etcd_client::Certificate::from_pem(read("the CA bundle", ca)?),
        );
        if let Some((cert, key)) = &self.identity {
            options = options.identity(etcd_client::Identity::from_pem(
                read("the client certificate", cert)?,
                read("the client key", key)?,
            ));
        }
        Ok(options)
    }
}

impl FromStr for StoreUrl {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (rest, tls) = match (s.strip_prefix("etcd://"), s.strip_prefix("etcds://")) {
            (Some(rest), _) => (rest, None),
            (_, Some(rest)) => (rest, Some(EtcdTls::default())),
            _ => {
                return Err(
                    "must be memory, etcd://host:port[,host:port...][/prefix], or \
                            etcds://... for members that speak TLS"
                        .into(),
                )
            }
        };
        let scheme = if tls.is_some() { "https" } else { "http" };
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
            let endpoint = format!("{scheme}://{host}");
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
        Ok(StoreUrl {
            endpoints,
            prefix,
            tls,
        })
    }
}

impl fmt::Display for StoreUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hosts: Vec<&str> = self
            .endpoints
            .iter()
            .map(|e| e.split_once("://").map_or(e.as_str(), |(_, h)| h))
            .collect();
        let scheme = if self.tls.is_some() { "etcds" } else { "etcd" };
        write!(f, "{scheme}://{}{}", hosts.join(","), self.prefix)
    }
}

/// What can go wrong with etcd, told apart by the gRPC status code etcd answered with.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    #[error(
        "the etcd cluster has lost its quorum (no leader): changes are refused until a majority \
         of its members is back; reads and watches serve the last view"
    )]
    NoQuorum,
    #[error("etcd did not answer within {0:?}")]
    Timeout(Duration),
    /// No member answered, or the one that did could not serve for the moment: tried again.
    #[error("cannot reach etcd")]
    Unreachable(#[source] etcd_client::Error),
    /// etcd no longer knows the lease named (it ran out, or was revoked): not tried again.
    #[error("etcd no longer knows the lease (it ran out)")]
    LeaseNotFound,
    /// The revision read from was compacted (up to the revision given, when etcd says): the
    /// reader starts again from a new snapshot.
    #[error("etcd has compacted the revisions asked for")]
    Compacted(i64),
    /// etcd refused the request itself (an invalid or too large request, no permission, no
    /// space left): trying again would get the same answer.
    #[error("etcd refused the request")]
    Refused(#[source] etcd_client::Error),
    /// The TLS settings for `etcds://` cannot be used.
    #[error("{0}")]
    Tls(String),
    #[error("etcd's watch was cancelled: {0}")]
    WatchCancelled(String),
    /// etcd committed the change, but this replica's mirror has not applied it in time.
    #[error(
        "etcd committed the change, but this replica has not applied it within {0:?}: it \
         cannot follow etcd for the moment"
    )]
    NotApplied(Duration),
    /// This replica has not renewed its session lease lately: it may be cut off from etcd,
    /// and cannot vouch for the instances it would keep alive (their registrars move on).
    #[error("this replica has not renewed its etcd session within {0:?}")]
    SessionStale(Duration),
    /// Another replica wrote the instance at the same moment, twice in a row.
    #[error("another replica keeps writing this instance at the same time")]
    Contended,
}

impl EtcdError {
    /// Classifies an error of the etcd client by the gRPC status code etcd answered with.
    ///
    /// `Unavailable` is a member that cannot serve for the moment; etcd answers it with the
    /// descriptions "etcdserver: no leader" and "etcdserver: leader changed" when the cluster
    /// is between leaders (etcd's own client tells these apart by the same descriptions), which
    /// is a lost quorum if it lasts. `OutOfRange` is a compacted revision (a future one, the
    /// other meaning etcd gives it, is never asked for). `NotFound` is a lease etcd no longer
    /// knows, the only thing Baker names that etcd may not find.
    pub fn of(e: etcd_client::Error) -> EtcdError {
        use tonic::Code;
        let (code, leaderless) = status_of(&e);
        match code {
            Code::Unavailable if leaderless => EtcdError::NoQuorum,
            Code::Unavailable
            | Code::DeadlineExceeded
            | Code::Cancelled
            | Code::Unknown
            | Code::Aborted
            | Code::Internal => EtcdError::Unreachable(e),
            Code::NotFound => EtcdError::LeaseNotFound,
            Code::OutOfRange => EtcdError::Compacted(0),
            Code::Ok
            | Code::InvalidArgument
            | Code::AlreadyExists
            | Code::PermissionDenied
            | Code::ResourceExhausted
            | Code::FailedPrecondition
            | Code::Unimplemented
            | Code::DataLoss
            | Code::Unauthenticated => EtcdError::Refused(e),
        }
    }

    /// Whether trying again, on any member, may succeed.
    fn transient(&self) -> bool {
        matches!(self, EtcdError::Unreachable(_) | EtcdError::NoQuorum)
    }
}

/// One change read from etcd.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// An instance was put (new, changed, or put again with another lease), by the caller its
    /// value names (`None`: written by an older replica).
    Instance {
        instance: Instance,
        lease: i64,
        by: Option<String>,
    },
    /// An instance's key was deleted, or its lease ran out.
    InstanceGone {
        service: ServiceName,
        id: InstanceId,
    },
    /// A service's route was set or cleared, by the call its record names.
    Route {
        service: ServiceName,
        record: RouteRecord,
    },
    /// A service's route key was deleted (its lease ran out after the route was cleared, or
    /// someone deleted it by hand).
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
    /// Who removed it: the name of the deregistering call's token, or a fixed word
    /// ([`baker_client::change::by`]); `None` from an older replica.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
}

/// An instance's value in etcd: the instance, and who registered it. An older replica reads
/// the instance and ignores `by`.
#[derive(serde::Serialize)]
struct StoredInstance<'a> {
    #[serde(flatten)]
    instance: &'a Instance,
    #[serde(skip_serializing_if = "Option::is_none")]
    by: Option<&'a str>,
}

/// Who registered an instance, read from its value apart from the instance (whose own
/// reading needs no buffering of the fields it does not know).
#[derive(serde::Deserialize)]
struct StoredBy {
    #[serde(default)]
    by: Option<String>,
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

/// One service's route as etcd holds it, and the call that set or cleared it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteRecord {
    /// The route; `None` once cleared (the record is then bound to the clearing replica's
    /// lease: it carries the clearing to the other replicas, and then goes).
    pub route: Option<Route>,
    /// Where the call came from.
    pub origin: Option<String>,
    /// When, in milliseconds since the Unix epoch.
    pub at: u64,
    /// Who set or cleared it: the name of the call's token, or a fixed word
    /// ([`baker_client::change::by`]). (A replica older than this field refuses records that
    /// carry it, as it refuses any field it does not know.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
}

impl RouteRecord {
    /// Reads a route key's value: a record, or a bare route as written before routes had
    /// records (its origin unknown).
    fn parse(value: &[u8]) -> Result<RouteRecord, String> {
        serde_json::from_slice(value).or_else(|e| {
            serde_json::from_slice::<Route>(value)
                .map(|route| RouteRecord {
                    route: Some(route),
                    origin: Some("etcd".into()),
                    at: 0,
                    by: None,
                })
                .map_err(|_| format!("its value is not a route: {e}"))
        })
    }
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
    /// Not written: the key is bound to this other lease (`0`: none, or it just went), as
    /// etcd held it at `revision`.
    Held { holder: i64, revision: i64 },
}

/// The whole table at one revision.
#[derive(Debug, Default, Clone)]
pub struct Snapshot {
    pub revision: i64,
    /// Every instance, with the lease its key is bound to and who registered it.
    pub instances: Vec<(Instance, i64, Option<String>)>,
    /// Every route set, with its record.
    pub routes: BTreeMap<ServiceName, RouteRecord>,
    /// Every service's drains key, with the revision it was last written at.
    pub maintenance: BTreeMap<ServiceName, (DrainRecord, i64)>,
    /// Why the instances named by the causes keys still in etcd were removed, by whom, with
    /// the revision of their removal: a replica whose watch broke tells a deregistration made
    /// meanwhile from an expiry by these.
    pub causes: HashMap<(ServiceName, InstanceId), (RemoveCause, Option<String>, i64)>,
}

/// A connection to the etcd cluster. Cheap to clone.
#[derive(Clone)]
pub struct Etcd {
    /// A client per member, and its key-value and watch services, which take answers of up
    /// to [`MAX_MESSAGE`] (the gRPC default is 4 MiB); all three move to the next member
    /// together ([`Members`]).
    client: Via<Client>,
    kv: Via<KvClient>,
    watcher: Via<WatchClient>,
    prefix: String,
}

/// Keys read per page of a snapshot: a few hundred kilobytes of instances.
pub const SNAPSHOT_PAGE: i64 = 1000;
/// Largest answer decoded from etcd: a snapshot page of [`SNAPSHOT_PAGE`] keys, and a watch
/// message (etcd splits larger ones, asked to by the watch), each well under it.
pub const MAX_MESSAGE: usize = 64 << 20;
/// Operations per transaction at most: etcd's default `--max-txn-ops`. A transaction that
/// grows with its input (the removal of many instances at once) is split into transactions of
/// this many operations.
pub const MAX_TXN_OPS: usize = 128;

/// One service's client for each member (`C`: the whole client, or its key-value or watch
/// service), and the [`Members`] state they share.
#[derive(Clone)]
struct Via<C> {
    clients: Arc<[C]>,
    members: Members,
}

impl<C: Clone> Via<C> {
    /// The member to try now, and its client.
    fn pick(&self) -> (usize, C) {
        let i = self.members.current.load(Ordering::Relaxed) % self.clients.len();
        (i, self.clients[i].clone())
    }
}

/// Which member calls go to first, and which failed of late.
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
    fn new(count: usize) -> Members {
        Members {
            failed_at: (0..count).map(|_| AtomicU64::new(0)).collect(),
            current: Arc::new(AtomicUsize::new(0)),
            start: tokio::time::Instant::now(),
        }
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
async fn retried<C, T, F, Fut>(via: &Via<C>, mut call: F) -> Result<T, EtcdError>
where
    C: Clone,
    F: FnMut(C) -> Fut,
    Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
{
    let deadline = tokio::time::Instant::now() + REQUEST_TIMEOUT;
    // Whether a member said it has no leader: if no attempt succeeds, the quorum is lost,
    // whatever the last attempt met (a member down, or one that never answered).
    let mut leaderless = false;
    // The members that could not be reached, and whether any other one was (it answered, or
    // let an attempt time out): a majority down beside a member that is up is a lost quorum
    // too, even before that member noticed that its leader is gone.
    let mut down = vec![false; via.clients.len()];
    let mut reached = false;
    let last = loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let (member, client) = via.pick();
        match tokio::time::timeout(left.min(ATTEMPT_TIMEOUT), call(client)).await {
            Err(_) => {
                reached = true;
                via.members.pass(member, true);
                if tokio::time::Instant::now() + RETRY_PAUSE >= deadline {
                    break EtcdError::Timeout(REQUEST_TIMEOUT);
                }
            }
            Ok(Ok(v)) => return Ok(v),
            // A member down, or one without a leader for the moment (an election after the
            // leader was lost takes about one election timeout): try again. No leader until
            // the deadline is a lost quorum.
            Ok(Err(e)) => match EtcdError::of(e) {
                e if e.transient() => {
                    via.members
                        .pass(member, matches!(e, EtcdError::Unreachable(_)));
                    leaderless |= matches!(e, EtcdError::NoQuorum);
                    match e {
                        EtcdError::Unreachable(_) => down[member] = true,
                        _ => reached = true,
                    }
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
        EtcdError::Unreachable(_) | EtcdError::Timeout(_)
            if quorum_lost(leaderless, reached, &down) =>
        {
            Err(EtcdError::NoQuorum)
        }
        e => Err(e),
    }
}

/// Whether a call that no member answered met a lost quorum: a member said it has no leader,
/// or a majority of the members could not be reached while another one could (all of them
/// down is etcd out of reach, not a lost quorum).
fn quorum_lost(leaderless: bool, reached: bool, down: &[bool]) -> bool {
    let majority = down.len() / 2 + 1;
    leaderless || (reached && down.iter().filter(|d| **d).count() >= majority)
}

/// Longest wait for one attempt of a call: a member that has not answered by then is taken
/// for frozen, and the call is tried again.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_millis(750);
/// Pause between two attempts of a call that found a member down.
const RETRY_PAUSE: Duration = Duration::from_millis(50);

/// The end of the range of every key that starts with `prefix`: `prefix` with its last byte
/// that is not 0xff incremented, and what follows dropped (etcd's prefix range).
fn range_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // Every byte 0xff: to the end of the key space.
    vec![0]
}

/// The gRPC status code of an error of the etcd client, and whether it says the cluster is
/// between leaders. An error of the client itself (not etcd's answer) is `Unavailable` when the
/// connection failed, `InvalidArgument` when the request was wrong.
fn status_of(e: &etcd_client::Error) -> (tonic::Code, bool) {
    use tonic::Code;
    match e {
        etcd_client::Error::GRpcStatus(status) => (
            status.code(),
            matches!(
                status.message(),
                "etcdserver: no leader" | "etcdserver: leader changed"
            ),
        ),
        // The client's own words for a keep-alive answered with a TTL of 0: etcd does not know
        // the lease.
        etcd_client::Error::LeaseKeepAliveError(m) if m == "lease not found" => {
            (Code::NotFound, false)
        }
        // The connection itself failed: another member may answer.
        etcd_client::Error::TransportError(_)
        | etcd_client::Error::IoError(_)
        | etcd_client::Error::LeaseKeepAliveError(_)
        | etcd_client::Error::WatchError(_) => (Code::Unavailable, false),
        _ => (Code::InvalidArgument, false),
    }
}

/// An instance's TTL in etcd's whole seconds, rounded up: the key never goes before its TTL.
pub fn lease_seconds(ttl_ms: u64) -> i64 {
    i64::try_from(ttl_ms.div_ceil(1000).max(1)).unwrap_or(i64::MAX)
}

impl Etcd {
    /// Connects to the members of `url`, a client for each. Does not wait for any of them to
    /// answer: a replica starts, and serves what it has, while etcd is away.
    pub async fn connect(url: &StoreUrl) -> Result<Etcd, EtcdError> {
        let mut options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_timeout(REQUEST_TIMEOUT)
            .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2))
            .with_keep_alive_while_idle(true)
            .with_require_leader(true);
        if let Some(tls) = &url.tls {
            options = options.with_tls(tls.options()?);
        }
        let mut clients = Vec::with_capacity(url.endpoints.len());
        for endpoint in &url.endpoints {
            clients.push(timed(Client::connect([endpoint], Some(options.clone()))).await?);
        }
        let members = Members::new(clients.len());
        Ok(Etcd {
            kv: Via {
                clients: clients
                    .iter()
                    .map(|c| c.kv_client().max_decoding_message_size(MAX_MESSAGE))
                    .collect(),
                members: members.clone(),
            },
            watcher: Via {
                clients: clients
                    .iter()
                    .map(|c| c.watch_client().max_decoding_message_size(MAX_MESSAGE))
                    .collect(),
                members: members.clone(),
            },
            client: Via {
                clients: clients.into(),
                members,
            },
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

    /// Everything under the prefix, at the revision etcd reports, read in pages of
    /// [`SNAPSHOT_PAGE`] keys: the first page is read at the newest revision, and each next
    /// one at that same revision from the key after the last one read, so the pages make one
    /// consistent view however much changes meanwhile. A revision compacted between two pages
    /// fails the snapshot ([`EtcdError::Compacted`]); the caller reads a new one.
    pub async fn snapshot(&self) -> Result<Snapshot, EtcdError> {
        let start = format!("{}/", self.prefix);
        let end = range_end(start.as_bytes());
        let mut from = start.into_bytes();
        let mut snap = Snapshot::default();
        loop {
            let revision = snap.revision;
            let resp = retried(&self.kv, |mut c| {
                let (from, end) = (from.clone(), end.clone());
                async move {
                    let options = GetOptions::new()
                        .with_range(end)
                        .with_limit(SNAPSHOT_PAGE)
                        .with_revision(revision);
                    c.get(from, Some(options)).await
                }
            })
            .await?;
            if snap.revision == 0 {
                snap.revision = resp.header().map_or(0, |h| h.revision());
            }
            for kv in resp.kvs() {
                self.add_to(&mut snap, kv);
            }
            match resp.kvs().last() {
                Some(last) if resp.more() => {
                    from = last.key().to_vec();
                    from.push(0);
                }
                _ => return Ok(snap),
            }
        }
    }

    /// Adds one key-value read at the snapshot's revision to it.
    fn add_to(&self, snap: &mut Snapshot, kv: &KeyValue) {
        match self.decode(EventType::Put, kv) {
            Some(Change::Instance {
                instance,
                lease,
                by,
            }) => snap.instances.push((instance, lease, by)),
            Some(Change::Route { service, record }) if record.route.is_some() => {
                snap.routes.insert(service, record);
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
                        .is_none_or(|(_, _, seen)| *seen < at);
                    if newer {
                        snap.causes.insert((r.service, r.id), (r.cause, r.by, at));
                    }
                }
            }
            _ => {}
        }
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
                let by = serde_json::from_slice::<StoredBy>(kv.value())
                    .ok()
                    .and_then(|s| s.by);
                Ok(Change::Instance {
                    instance,
                    lease: kv.lease(),
                    by,
                })
            }
            (Key::Route(service), EventType::Delete) => Ok(Change::RouteCleared { service }),
            (Key::Route(service), EventType::Put) => {
                let record = RouteRecord::parse(kv.value())?;
                Ok(Change::Route { service, record })
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
        let stream = retried(&self.watcher, |mut c| {
            let key = key.clone();
            async move {
                let options = WatchOptions::new()
                    .with_prefix()
                    .with_fragment()
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
                        if resp.compact_revision() > 0 {
                            return Some((
                                Err(EtcdError::Compacted(resp.compact_revision())),
                                (stream, queued, true),
                            ));
                        }
                        if resp.canceled() {
                            let why = resp.cancel_reason().to_owned();
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
                Err(e) if status_of(&e).0 == tonic::Code::NotFound => Ok(false),
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
            Err(EtcdError::LeaseNotFound) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Puts `instance` bound to `lease`; returns the revision of the change.
    pub async fn put_instance(&self, instance: &Instance, lease: i64) -> Result<i64, EtcdError> {
        let value = stored(instance, None);
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
    ///
    /// The value records `by`, who registered it.
    pub async fn put_instance_if(
        &self,
        instance: &Instance,
        by: Option<&str>,
        lease: i64,
        expected: Option<i64>,
    ) -> Result<Put, EtcdError> {
        let value = stored(instance, by);
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
                Ok(Put::Held {
                    holder: holder.unwrap_or_default(),
                    revision,
                })
            }
            _ => Ok(Put::Held {
                holder: 0,
                revision,
            }),
        }
    }

    /// Deletes each instance's key that is still bound to `lease`, with no cause: every replica
    /// reads the deletion as an expiry. One transaction per half of [`MAX_TXN_OPS`] instances,
    /// each instance a nested transaction with its own condition, so that a thousand instances
    /// that stop at once cost sixteen writes rather than a thousand. (etcd gives a nested
    /// transaction what its parent leaves of the limit: 128 less the parent's operations.) Returns the revision of the
    /// last write and, per instance, whether it was deleted (not when it was gone or bound to
    /// another lease).
    pub async fn expire_instances(
        &self,
        instances: &[(ServiceName, InstanceId)],
        lease: i64,
    ) -> Result<(i64, Vec<bool>), EtcdError> {
        let (mut revision, mut deleted) = (0, Vec::with_capacity(instances.len()));
        for chunk in instances.chunks(MAX_TXN_OPS / 2) {
            let ops: Vec<TxnOp> = chunk
                .iter()
                .map(|(service, id)| {
                    let key = self.instance_key(service, id);
                    TxnOp::txn(
                        Txn::new()
                            .when([
                                Compare::version(key.clone(), CompareOp::Greater, 0),
                                Compare::lease(key.clone(), CompareOp::Equal, lease),
                            ])
                            .and_then([TxnOp::delete(key, None)]),
                    )
                })
                .collect();
            let resp = retried(&self.kv, |mut c| {
                let ops = ops.clone();
                async move { c.txn(Txn::new().and_then(ops)).await }
            })
            .await?;
            revision = resp.header().map_or(revision, |h| h.revision());
            let answers = resp.op_responses();
            deleted.extend((0..chunk.len()).map(
                |i| matches!(answers.get(i), Some(TxnOpResponse::Txn(inner)) if inner.succeeded()),
            ));
        }
        Ok((revision, deleted))
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

    /// Deletes the keys of `removals` in transactions that also say why (the writing
    /// replica's causes key, bound to its `lease`), each of [`MAX_TXN_OPS`] operations at most
    /// (the causes key and the deletions whose causes it holds); returns the revision of the
    /// last change and how many keys existed. A failure leaves the transactions before it
    /// committed: the caller removes what is left again.
    pub async fn remove_instances(
        &self,
        removals: &[Removal],
        lease: i64,
    ) -> Result<(i64, i64), EtcdError> {
        let (mut revision, mut deleted) = (0, 0);
        for chunk in removals.chunks(MAX_TXN_OPS - 1) {
            let ops = self.removal_ops(chunk, lease);
            let resp = retried(&self.kv, |mut c| {
                let ops = ops.clone();
                async move { c.txn(Txn::new().and_then(ops)).await }
            })
            .await?;
            deleted += resp
                .op_responses()
                .iter()
                .map(|r| match r {
                    TxnOpResponse::Delete(d) => d.deleted(),
                    _ => 0,
                })
                .sum::<i64>();
            revision = resp.header().map_or(revision, |h| h.revision());
        }
        Ok((revision, deleted))
    }

    /// The operations of one removal transaction: the causes key first, then the deletions.
    fn removal_ops(&self, removals: &[Removal], lease: i64) -> Vec<TxnOp> {
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
        ops
    }

    /// Compacts etcd's history up to `revision`: watches from before it are then refused.
    pub async fn compact(&self, revision: i64) -> Result<(), EtcdError> {
        retried(
            &self.kv,
            |mut c| async move { c.compact(revision, None).await },
        )
        .await?;
        Ok(())
    }

    /// Writes `service`'s route `record` (a cleared route is a record of none, bound to
    /// `lease`); returns the revision of the change.
    pub async fn set_route(
        &self,
        service: &ServiceName,
        record: &RouteRecord,
        lease: Option<i64>,
    ) -> Result<i64, EtcdError> {
        let key = self.route_key(service);
        // Names, numbers and printable text: serialization cannot fail.
        let value = serde_json::to_vec(record).expect("route records always serialize");
        let options = lease.map(|l| PutOptions::new().with_lease(l));
        let resp = retried(&self.client, |mut c| {
            let (key, value, options) = (key.clone(), value.clone(), options.clone());
            async move { c.put(key, value, options).await }
        })
        .await?;
        Ok(resp.header().map_or(0, |h| h.revision()))
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

/// The value of an instance's key: the instance and who registered it.
fn stored(instance: &Instance, by: Option<&str>) -> Vec<u8> {
    // An instance holds names, numbers and lists of them: serialization cannot fail.
    serde_json::to_vec(&StoredInstance { instance, by }).expect("instances always serialize")
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
    fn a_majority_down_beside_a_member_up_is_a_lost_quorum() {
        // Two of three refused, the third timed out or answered: no quorum.
        assert!(quorum_lost(false, true, &[true, true, false]));
        // Every member refused: etcd is out of reach.
        assert!(!quorum_lost(false, false, &[true, true, true]));
        // One of three down: the others may still commit.
        assert!(!quorum_lost(false, true, &[true, false, false]));
        // A member said it has no leader.
        assert!(quorum_lost(true, true, &[false, false, false]));
    }

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
        assert_eq!(u.tls, None);
        let u: StoreUrl = "etcds://h1:2379,h2:2379/x".parse().unwrap();
        assert_eq!(u.endpoints, ["https://h1:2379", "https://h2:2379"]);
        assert_eq!(u.tls, Some(EtcdTls::default()));
        assert_eq!(u.to_string(), "etcds://h1:2379,h2:2379/x");
        for (bad, says) in [
            ("http://h1:2379", "must be memory, etcd://"),
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

    #[test]
    fn errors_are_told_apart_by_their_grpc_status_code() {
        use tonic::{Code, Status};
        let of = |code: Code, message: &str| {
            EtcdError::of(etcd_client::Error::GRpcStatus(Status::new(code, message)))
        };
        assert!(matches!(
            of(Code::Unavailable, "etcdserver: no leader"),
            EtcdError::NoQuorum
        ));
        assert!(matches!(
            of(Code::Unavailable, "etcdserver: leader changed"),
            EtcdError::NoQuorum
        ));
        for (code, message) in [
            (Code::Unavailable, "etcdserver: request timed out"),
            (
                Code::Unavailable,
                "error trying to connect: connection refused",
            ),
            (Code::DeadlineExceeded, "timeout expired"),
            (Code::Unknown, "transport error"),
        ] {
            let e = of(code, message);
            assert!(matches!(e, EtcdError::Unreachable(_)), "{code:?}: {e:?}");
            assert!(e.transient(), "{code:?} is tried again");
        }
        // A lease etcd no longer knows: whatever the words, not retried.
        let e = of(Code::NotFound, "etcdserver: requested lease not found");
        assert!(matches!(e, EtcdError::LeaseNotFound), "{e:?}");
        assert!(!e.transient());
        let e = of(
            Code::OutOfRange,
            "mvcc: required revision has been compacted",
        );
        assert!(matches!(e, EtcdError::Compacted(_)), "{e:?}");
        assert!(!e.transient());
        for (code, message) in [
            (
                Code::InvalidArgument,
                "etcdserver: too many operations in txn request",
            ),
            (Code::InvalidArgument, "etcdserver: request is too large"),
            (Code::PermissionDenied, "etcdserver: permission denied"),
            (Code::Unauthenticated, "etcdserver: invalid auth token"),
            (
                Code::ResourceExhausted,
                "etcdserver: mvcc: database space exceeded",
            ),
            (Code::FailedPrecondition, "etcdserver: not leader"),
        ] {
            let e = of(code, message);
            assert!(matches!(e, EtcdError::Refused(_)), "{code:?}: {e:?}");
            assert!(!e.transient(), "{code:?} is not tried again");
        }
        // A keep-alive answered with a TTL of 0, which the client reports in its own words.
        assert!(matches!(
            EtcdError::of(etcd_client::Error::LeaseKeepAliveError(
                "lease not found".into()
            )),
            EtcdError::LeaseNotFound
        ));
        // Words alone make no kind: "not found" in an unavailable member's answer is retried.
        assert!(of(Code::Unavailable, "lease not found").transient());
        assert!(matches!(
            EtcdError::of(etcd_client::Error::InvalidArgs("bad".into())),
            EtcdError::Refused(_)
        ));
    }

    #[test]
    fn prefix_ranges_end_after_every_key_of_the_prefix() {
        assert_eq!(range_end(b"/baker/"), b"/baker0");
        assert_eq!(range_end(b"a\xff"), b"b");
        assert_eq!(range_end(b"\xff\xff"), b"\0");
    }

    #[test]
    fn route_records_carry_their_origin_and_bare_routes_still_read() {
        let route: Route = [("1".parse().unwrap(), 100)].into();
        let record = RouteRecord {
            route: Some(route.clone()),
            origin: Some("cli:ops from 127.0.0.1 with token ops".into()),
            at: 7,
            by: Some("ops".into()),
        };
        let bytes = serde_json::to_vec(&record).unwrap();
        assert_eq!(RouteRecord::parse(&bytes).unwrap(), record);
        let cleared = RouteRecord {
            route: None,
            ..record
        };
        let bytes = serde_json::to_vec(&cleared).unwrap();
        assert_eq!(RouteRecord::parse(&bytes).unwrap(), cleared);
        // A route written before routes had records: its origin is unknown, not the directory.
        let bare = serde_json::to_vec(&route).unwrap();
        let old = RouteRecord::parse(&bare).unwrap();
        assert_eq!(old.route, Some(route));
        assert_eq!(old.origin.as_deref(), Some("etcd"));
        assert!(RouteRecord::parse(b"[1]").is_err());
        // A record of an older replica, without `by`.
        let older = br#"{"route":{"1":100},"origin":"cli from 127.0.0.1","at":7}"#;
        assert_eq!(RouteRecord::parse(older).unwrap().by, None);
    }

    #[test]
    fn an_instance_value_carries_its_registrant_and_older_ones_still_read() {
        let i = Instance::sample("web", "a");
        let value = stored(&i, Some("web-reg"));
        assert_eq!(serde_json::from_slice::<Instance>(&value).unwrap(), i);
        let by: StoredBy = serde_json::from_slice(&value).unwrap();
        assert_eq!(by.by.as_deref(), Some("web-reg"));
        let older = serde_json::to_vec(&i).unwrap();
        assert_eq!(
            stored(&i, None),
            older,
            "no `by`, the value an older replica wrote"
        );
        assert_eq!(serde_json::from_slice::<StoredBy>(&older).unwrap().by, None);
    }
}
