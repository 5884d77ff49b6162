//! Scenario 5 on etcd (`directory --store etcd`): the directory-scale workload (instances in
//! 100 services heartbeating every 2 s with a 6 s TTL, watchers, a probe change twice a
//! second) measured three ways, one after the other in one run:
//!
//! 1. **memory**: one directory on the memory store;
//! 2. **etcd**: two directory replicas on a fresh three-member etcd cluster on loopback,
//!    each instance heartbeating through one of them (as a registrar does through the first it
//!    reaches), the watchers split between them, the probe through the first;
//! 3. **raw etcd**: this harness doing the same work straight against a fresh cluster with the
//!    etcd client the directory uses: a lease of the TTL per instance with its key bound to
//!    it, one keep-alive per instance per period on the same schedule, one prefix watch per
//!    watcher, the probe as a key put and deleted. It is the floor the etcd mode can approach.
//!
//! Each mode: register the fleet, start heartbeating, connect the watchers, let one TTL pass
//! (instances that ran out while the fleet registered come back), then measure a window:
//! heartbeats (open loop, as in [`super::fleet::heartbeats`]), the probe's fan-out to every
//! watcher, expiries of the healthy fleet, the gRPC messages etcd received per heartbeat, and
//! the CPU and RSS of the directories and of the etcd members. Nothing is pinned to a core:
//! the directories, the members and the harness share the machine alike.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use baker_client::DirectoryClient;
use baker_tests::etcd::{etcd_available, etcd_bin, EtcdCluster};
use baker_tests::Proc;
use bytes::Bytes;
use etcd_client::{Client, ConnectOptions, EventType, PutOptions, WatchOptions};
use serde::Serialize;
use serde_json::json;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::directory_scale::{self, size, HEARTBEAT_EVERY, SERVICES, WATCH_TOKEN};
use super::fleet::{
    heartbeats, join_heartbeats, metric, probe, register_all, watchers, ApiProbe, Beat, Beats,
    HttpBeat, ProbeStep, Put, Sent, Watchers, CONNS, PROBE, SNAPSHOTS_IN_FLIGHT,
};
use crate::daemons::{self, Bins};
use crate::procfs::{Footprint, Sampler};
use crate::report::{ms, Check, Report, Table};
use crate::scenario::Ctx;
use crate::stats::{ratio, Summary};

/// The instances' TTL (the fleet's specs carry it): three heartbeat periods.
const TTL: Duration = Duration::from_secs(6);
/// Directory replicas in the etcd mode.
const REPLICAS: usize = 2;
/// Members of each etcd cluster.
const MEMBERS: usize = 3;
/// The watch stream the directory's watchers read, as ambassadors do.
const WATCH_PATH: &str = "/v1/watch?v=2";
/// The raw mode's key prefix.
const RAW: &str = "/raw";

/// The sizes of a run.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Sizes {
    pub instances: usize,
    pub watchers: usize,
    pub window: Duration,
}

/// What one mode measured.
#[derive(Debug, Clone, Serialize)]
struct Figures {
    mode: &'static str,
    registration_s: f64,
    seconds: f64,
    heartbeats_ok: u64,
    heartbeats_failed: u64,
    heartbeat: Summary,
    fanout: Summary,
    probes: u64,
    probe_errors: u64,
    reconnects: u64,
    expiries: f64,
    live_at_end: Option<usize>,
    /// gRPC messages the etcd members received over the window, per heartbeat answered.
    etcd_messages_per_heartbeat: Option<f64>,
    directory: Option<Footprint>,
    etcd: Option<Footprint>,
}

impl Figures {
    fn heartbeats_per_second(&self) -> f64 {
        ratio(self.heartbeats_ok as f64, self.seconds)
    }

    /// Probe changes times watchers: what a loss-free fan-out delivers.
    fn expected_deliveries(&self, watchers: usize) -> u64 {
        self.probes * watchers as u64
    }
}

/// Where the table is read from: a directory's API, or the raw mode's keys and its count of
/// deletions (only lease expiries delete the fleet's keys).
enum Readout {
    Directory(SocketAddr),
    Raw {
        client: Box<Client>,
        expired: Arc<AtomicU64>,
    },
}

impl Readout {
    async fn expiries(&self) -> f64 {
        match self {
            Readout::Directory(addr) => metric(*addr, "baker_directory_expiries_total")
                .await
                .unwrap_or(0.0),
            Readout::Raw { expired, .. } => expired.load(Ordering::Relaxed) as f64,
        }
    }

    /// Instances in the table, the probe's included.
    async fn live(&self) -> Option<usize> {
        match self {
            Readout::Directory(addr) => DirectoryClient::new(&format!("http://{addr}"), None)
                .ok()?
                .services()
                .await
                .ok()
                .map(|s| s.services.values().map(Vec::len).sum()),
            Readout::Raw { client, .. } => {
                let opts = etcd_client::GetOptions::new()
                    .with_prefix()
                    .with_count_only();
                let resp = client
                    .clone()
                    .get(format!("{RAW}/instances/"), Some(opts))
                    .await
                    .ok()?;
                usize::try_from(resp.count()).ok()
            }
        }
    }
}

/// A mode set up and ready to be driven: its fleet's heartbeat workers, its watchers (spawned),
/// its probe, its table and the processes whose footprint counts.
struct Setup<B, P> {
    registration: Duration,
    beats: Vec<B>,
    watchers: Watchers,
    sent: Sent,
    stop: CancellationToken,
    probe: P,
    table: Readout,
    directory_pids: Vec<u32>,
    etcd_pids: Vec<u32>,
    /// The client addresses of the etcd members, whose `/metrics` count gRPC messages.
    etcd_members: Vec<SocketAddr>,
}

/// gRPC messages the etcd members at `members` have received (etcd's
/// `grpc_server_msg_received_total`, summed over methods and members).
async fn etcd_messages(members: &[SocketAddr]) -> Option<f64> {
    let mut total = 0.0;
    for addr in members {
        let req = hyper::Request::get("/metrics")
            .header(hyper::header::HOST, addr.to_string())
            .body(http_body_util::Full::new(Bytes::new()))
            .ok()?;
        let (status, body) = crate::load::Conn::new(*addr).send(req).await.ok()?;
        if !status.is_success() {
            return None;
        }
        total += String::from_utf8_lossy(&body)
            .lines()
            .filter(|l| l.starts_with("grpc_server_msg_received_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>();
    }
    Some(total)
}

fn member_addrs(c: &EtcdCluster) -> Vec<SocketAddr> {
    c.members
        .iter()
        .map(|m| SocketAddr::from(([127, 0, 0, 1], m.client_port)))
        .collect()
}

/// Drives a mode: heartbeats from now on, watchers connected, one TTL to settle, then the
/// measured window with the probe and the footprints.
async fn drive<B: Beat, P: ProbeStep>(
    mode: &'static str,
    s: Sizes,
    u: Setup<B, P>,
) -> anyhow::Result<Figures> {
    let (measuring, hb_stop) = (Arc::new(AtomicBool::new(false)), CancellationToken::new());
    let hb = heartbeats(
        s.instances,
        HEARTBEAT_EVERY,
        u.beats,
        measuring.clone(),
        hb_stop.clone(),
    );
    u.watchers
        .wait_connected(s.watchers, Duration::from_secs(120))
        .await
        .with_context(|| format!("{mode}: connecting the watchers"))?;
    tokio::time::sleep(TTL).await;

    let expired_before = u.table.expiries().await;
    let messages_before = etcd_messages(&u.etcd_members).await;
    let footprint = |pids: Vec<u32>| {
        (!pids.is_empty()).then(|| Sampler::start(Duration::from_millis(500), move || pids.clone()))
    };
    let (dir_sampler, etcd_sampler) = (footprint(u.directory_pids), footprint(u.etcd_pids));
    measuring.store(true, Ordering::Relaxed);
    let start = Instant::now();
    let probe_stop = CancellationToken::new();
    let probing = probe(u.probe, u.sent, probe_stop.clone());
    tokio::time::sleep(s.window).await;
    measuring.store(false, Ordering::Relaxed);
    let seconds = start.elapsed().as_secs_f64();
    probe_stop.cancel();
    let (probes, probe_errors) = probing.await.unwrap_or((0, 0));
    // Let the last probe reach every watcher.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let directory = match dir_sampler {
        Some(d) => Some(d.finish().await),
        None => None,
    };
    let etcd = match etcd_sampler {
        Some(e) => Some(e.finish().await),
        None => None,
    };
    let expiries = u.table.expiries().await - expired_before;
    let messages = etcd_messages(&u.etcd_members).await;
    let live_at_end = u.table.live().await;

    hb_stop.cancel();
    u.stop.cancel();
    let Beats {
        ok: heartbeats_ok,
        failed: heartbeats_failed,
        latency,
        ..
    } = join_heartbeats(hb).await?;
    let etcd_messages_per_heartbeat = match (messages_before, messages) {
        (Some(a), Some(b)) if !u.etcd_members.is_empty() => {
            Some(ratio(b - a, heartbeats_ok as f64))
        }
        _ => None,
    };
    let (fanout, reconnects) = (
        u.watchers.fanout(),
        u.watchers.reconnects.load(Ordering::Relaxed),
    );
    u.watchers.join().await;
    Ok(Figures {
        mode,
        registration_s: u.registration.as_secs_f64(),
        seconds,
        heartbeats_ok,
        heartbeats_failed,
        heartbeat: latency.summary(),
        fanout,
        probes,
        probe_errors,
        reconnects,
        expiries,
        live_at_end,
        etcd_messages_per_heartbeat,
        directory,
        etcd,
    })
}

/// A fresh three-member cluster, or why there cannot be one.
pub(super) async fn cluster() -> anyhow::Result<EtcdCluster> {
    if !etcd_available() {
        bail!(
            "`directory --store etcd` needs etcd ({}), which does not run on this machine: \
             install Debian's etcd-server, or set BAKER_ETCD to its binary",
            etcd_bin()
        );
    }
    Ok(EtcdCluster::start(MEMBERS).await)
}

fn member_pids(c: &EtcdCluster) -> Vec<u32> {
    c.members.iter().filter_map(|m| m.pid()).collect()
}

/// `n` directories on `store` (memory when `None`), each with its own data directory, with
/// room for every watcher and the heartbeat pool.
async fn directories(
    bins: &Bins,
    n: usize,
    store: Option<&str>,
) -> anyhow::Result<(Vec<Proc>, Vec<SocketAddr>, Vec<tempfile::TempDir>)> {
    let (mut procs, mut addrs, mut dirs) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..n {
        let data = tempfile::tempdir()?;
        let path = data.path().display().to_string();
        let mut env = vec![
            ("BAKER_LISTEN", "127.0.0.1:0"),
            ("BAKER_DATA", path.as_str()),
            ("BAKER_DOCKER", "off"),
            ("BAKER_WATCH_TOKEN", WATCH_TOKEN),
            ("BAKER_MAX_CONNECTIONS", "8192"),
        ];
        if let Some(url) = store {
            env.push(("BAKER_STORE", url));
        }
        let name = format!("directory-{i}");
        let (proc, addr) = daemons::start(bins, &name, "baker-directory", &env).await?;
        procs.push(proc);
        addrs.push(addr);
        dirs.push(data);
    }
    Ok((procs, addrs, dirs))
}

/// The memory mode (no cluster) or the etcd mode (two replicas on `cluster`).
async fn directory_mode(
    bins: &Bins,
    s: Sizes,
    cluster: Option<&EtcdCluster>,
) -> anyhow::Result<Figures> {
    let (mode, n, store) = match cluster {
        None => ("memory", 1, None),
        Some(c) => ("etcd", REPLICAS, Some(c.store_url("/baker-bench"))),
    };
    let (mut procs, addrs, _data) = directories(bins, n, store.as_deref()).await?;
    let reqs = Arc::new(directory_scale::heartbeats(s.instances));
    let registration = register_all(&addrs, reqs.clone())
        .await
        .with_context(|| format!("{mode}: registering the fleet"))?;
    let (sent, stop) = (Sent::default(), CancellationToken::new());
    let mut group = Watchers::new();
    let snapshots = Arc::new(Semaphore::new(SNAPSHOTS_IN_FLIGHT));
    for (i, addr) in addrs.iter().enumerate() {
        let share = s.watchers / n + usize::from(i < s.watchers % n);
        watchers(
            &mut group, *addr, share, WATCH_PATH, &sent, &snapshots, &stop,
        );
    }
    let client = DirectoryClient::new(&format!("http://{}", addrs[0]), None)?;
    let setup = Setup {
        registration,
        beats: HttpBeat::pool(&addrs, &reqs),
        watchers: group,
        sent,
        stop,
        probe: ApiProbe(client),
        table: Readout::Directory(addrs[0]),
        directory_pids: procs.iter().map(Proc::pid).collect(),
        etcd_pids: cluster.map(member_pids).unwrap_or_default(),
        etcd_members: cluster.map(member_addrs).unwrap_or_default(),
    };
    let figures = drive(mode, s, setup).await;
    for p in &mut procs {
        daemons::stop(p, Duration::from_secs(10)).await;
    }
    figures
}

/// The raw mode's fleet: each instance's key and value (the registration's body), and the
/// lease its key is bound to now.
struct RawFleet {
    keys: Vec<(String, Bytes)>,
    leases: Vec<AtomicI64>,
}

impl RawFleet {
    fn new(reqs: &[Put]) -> RawFleet {
        RawFleet {
            keys: reqs
                .iter()
                .map(|(path, body)| (raw_key(path), body.clone()))
                .collect(),
            leases: reqs.iter().map(|_| AtomicI64::new(0)).collect(),
        }
    }

    /// Instance `i` on a new lease of the TTL.
    async fn register(&self, client: &mut Client, i: usize) -> Result<(), etcd_client::Error> {
        let lease = client.lease_grant(TTL.as_secs() as i64, None).await?.id();
        let (key, value) = &self.keys[i];
        client
            .put(
                key.as_str(),
                value.to_vec(),
                Some(PutOptions::new().with_lease(lease)),
            )
            .await?;
        self.leases[i].store(lease, Ordering::Relaxed);
        Ok(())
    }
}

/// `/v1/services/<service>/instances/<id>` → `/raw/instances/<service>/<id>`, the layout the
/// directory uses under its prefix.
fn raw_key(path: &str) -> String {
    let rest = path.trim_start_matches("/v1/services/");
    format!("{RAW}/instances/{}", rest.replacen("/instances/", "/", 1))
}

/// Keeps instances alive straight through etcd, as the directory does for a heartbeat: one
/// keep-alive of the instance's lease; an instance whose lease ran out is registered again.
struct RawBeat {
    client: Client,
    fleet: Arc<RawFleet>,
}

impl Beat for RawBeat {
    async fn beat(&mut self, i: usize) -> bool {
        let lease = self.fleet.leases[i].load(Ordering::Relaxed);
        let renewed = async {
            let (mut keeper, mut stream) = self.client.lease_keep_alive(lease).await?;
            keeper.keep_alive().await?;
            Ok::<_, etcd_client::Error>(stream.message().await?.is_some_and(|r| r.ttl() > 0))
        };
        match renewed.await {
            Ok(true) => true,
            Ok(false) => self.fleet.register(&mut self.client, i).await.is_ok(),
            Err(_) => false,
        }
    }
}

/// The probe straight through etcd: `p<k>` put on a lease, `p<k-1>` deleted.
struct RawProbe(Client);

impl ProbeStep for RawProbe {
    async fn step(&mut self, k: u64) -> bool {
        let key = |k: u64| format!("{RAW}/instances/{PROBE}/p{k}");
        let c = &mut self.0;
        let changed = async {
            let lease = c.lease_grant(600, None).await?.id();
            c.put(key(k), "{}", Some(PutOptions::new().with_lease(lease)))
                .await?;
            if k > 0 {
                c.delete(key(k - 1), None).await?;
            }
            Ok::<_, etcd_client::Error>(())
        };
        changed.await.is_ok()
    }
}

/// The probe number a raw watch event names, if it is a probe key being put.
fn raw_probe_id(event: &etcd_client::Event) -> Option<u64> {
    if event.event_type() != EventType::Put {
        return None;
    }
    let key = event.kv()?.key_str().ok()?;
    key.strip_prefix(RAW)?
        .strip_prefix("/instances/")?
        .strip_prefix(PROBE)?
        .strip_prefix("/p")?
        .parse()
        .ok()
}

/// Adds `n` prefix watches on the raw mode's keys to `group`, spread over `clients`.
fn raw_watchers(
    group: &mut Watchers,
    clients: &[Client],
    n: usize,
    sent: &Sent,
    stop: &CancellationToken,
) {
    for w in 0..n {
        let mut client = clients[w % clients.len()].clone();
        let (stop, sent, me) = (stop.clone(), sent.clone(), group.share());
        group.tasks.push(tokio::spawn(async move {
            let mut seen = HashSet::<u64>::new();
            let mut first = true;
            while !stop.is_cancelled() {
                let opts = WatchOptions::new().with_prefix();
                let Ok(mut stream) = client.watch(format!("{RAW}/"), Some(opts)).await else {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                };
                loop {
                    let msg = tokio::select! {
                        m = stream.message() => m,
                        _ = stop.cancelled() => return,
                    };
                    let Ok(Some(resp)) = msg else { break };
                    if resp.created() {
                        me.opened(&mut first);
                    }
                    let now = Instant::now();
                    for k in resp.events().iter().filter_map(raw_probe_id) {
                        me.saw(&mut seen, &sent, k, now);
                    }
                }
            }
        }));
    }
}

/// Counts the deletions of the fleet's keys (lease expiries: nothing else deletes them).
fn count_expiries(mut client: Client, stop: CancellationToken) -> Arc<AtomicU64> {
    let expired = Arc::new(AtomicU64::new(0));
    let counter = expired.clone();
    tokio::spawn(async move {
        while !stop.is_cancelled() {
            let opts = WatchOptions::new().with_prefix();
            let prefix = format!("{RAW}/instances/s");
            let Ok(mut stream) = client.watch(prefix, Some(opts)).await else {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            };
            loop {
                let msg = tokio::select! {
                    m = stream.message() => m,
                    _ = stop.cancelled() => return,
                };
                let Ok(Some(resp)) = msg else { break };
                let deleted = resp
                    .events()
                    .iter()
                    .filter(|e| e.event_type() == EventType::Delete)
                    .count();
                counter.fetch_add(deleted as u64, Ordering::Relaxed);
            }
        }
    });
    expired
}

/// Registers the whole fleet straight into etcd over `CONNS` workers; the time it took.
async fn raw_register(clients: &[Client], fleet: &Arc<RawFleet>) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let next = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = (0..CONNS)
        .map(|c| {
            let (mut client, fleet, next) = (
                clients[c % clients.len()].clone(),
                fleet.clone(),
                next.clone(),
            );
            tokio::spawn(async move {
                let mut failed = 0u64;
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                    if i >= fleet.keys.len() {
                        return failed;
                    }
                    if fleet.register(&mut client, i).await.is_err() {
                        failed += 1;
                    }
                }
            })
        })
        .collect();
    let mut failed = 0;
    for t in tasks {
        failed += t.await.unwrap_or(0);
    }
    if failed > 0 {
        bail!("{failed} of {} raw registrations failed", fleet.keys.len());
    }
    Ok(started.elapsed())
}

/// The raw mode: this harness against `cluster` with two clients, as two replicas would be.
async fn raw_mode(s: Sizes, cluster: &EtcdCluster) -> anyhow::Result<Figures> {
    let options = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(2))
        .with_timeout(Duration::from_secs(3));
    let mut clients = Vec::new();
    for _ in 0..REPLICAS {
        let c = Client::connect(cluster.endpoints(), Some(options.clone()))
            .await
            .context("connecting to etcd")?;
        clients.push(c);
    }
    let fleet = Arc::new(RawFleet::new(&directory_scale::heartbeats(s.instances)));
    let registration = raw_register(&clients, &fleet).await?;
    let (sent, stop) = (Sent::default(), CancellationToken::new());
    let mut group = Watchers::new();
    raw_watchers(&mut group, &clients, s.watchers, &sent, &stop);
    let expired = count_expiries(clients[0].clone(), stop.clone());
    let beats = (0..CONNS)
        .map(|c| RawBeat {
            client: clients[c % clients.len()].clone(),
            fleet: fleet.clone(),
        })
        .collect();
    let setup = Setup {
        registration,
        beats,
        watchers: group,
        sent,
        stop,
        probe: RawProbe(clients[0].clone()),
        table: Readout::Raw {
            client: Box::new(clients[0].clone()),
            expired,
        },
        directory_pids: Vec::new(),
        etcd_pids: member_pids(cluster),
        etcd_members: member_addrs(cluster),
    };
    drive("raw etcd", s, setup).await
}

/// The sizes asked for: the command line's, else the environment's, else the full or the
/// quick ones.
pub fn sizes(ctx: &Ctx) -> Sizes {
    let o = &ctx.directory;
    Sizes {
        instances: size(
            o.instances,
            "BAKER_BENCH_INSTANCES",
            ctx.pick(10_000, 1_000),
        )
        .max(1),
        watchers: size(o.watchers, "BAKER_BENCH_WATCHERS", ctx.pick(500, 50)).max(1),
        window: o.window.unwrap_or(Duration::from_secs(ctx.pick(30, 10))),
    }
}

pub async fn run(ctx: &Ctx) -> anyhow::Result<Report> {
    let s = sizes(ctx);
    let memory = directory_mode(&ctx.bins, s, None).await?;
    let etcd = {
        let c = cluster().await?;
        directory_mode(&ctx.bins, s, Some(&c)).await?
    };
    let raw = {
        let c = cluster().await?;
        raw_mode(s, &c).await?
    };
    Ok(report(ctx, s, [memory, etcd, raw]))
}

fn footprint_cells(f: Option<&Footprint>) -> [String; 2] {
    match f {
        Some(f) => [
            format!("{:.0}%", f.cpu_cores * 100.0),
            format!("{:.1}", f.rss_max_mib),
        ],
        None => ["-".into(), "-".into()],
    }
}

fn report(ctx: &Ctx, s: Sizes, modes: [Figures; 3]) -> Report {
    let rate = s.instances as f64 / HEARTBEAT_EVERY.as_secs_f64();
    let mut text = format!(
        "{} instances in {SERVICES} services heartbeating every {HEARTBEAT_EVERY:?} with a {TTL:?} \
         TTL ({rate:.0}/s scheduled), {} watchers, a probe change twice a second, a {:?} window \
         per mode; memory: one directory; etcd: {REPLICAS} directory replicas on {MEMBERS} \
         members; raw etcd: the same leases, keep-alives and prefix watches from the harness. \
         Nothing pinned.\n",
        s.instances, s.watchers, s.window
    );
    let raw_rate = modes[2].heartbeats_per_second();
    let mut t = Table::new(&[
        "mode",
        "registration s",
        "heartbeats/s",
        "x raw",
        "failed",
        "hb p50 ms",
        "hb p99 ms",
        "hb max ms",
        "fan-out p50 ms",
        "fan-out p99 ms",
        "deliveries",
        "reconnects",
        "expiries",
        "live at end",
        "etcd msgs/hb",
        "dir CPU",
        "dir RSS max MiB",
        "etcd CPU",
        "etcd RSS max MiB",
    ]);
    for f in &modes {
        let [dir_cpu, dir_rss] = footprint_cells(f.directory.as_ref());
        let [etcd_cpu, etcd_rss] = footprint_cells(f.etcd.as_ref());
        t.row(vec![
            f.mode.into(),
            format!("{:.1}", f.registration_s),
            format!("{:.0}", f.heartbeats_per_second()),
            format!("{:.2}", ratio(f.heartbeats_per_second(), raw_rate)),
            f.heartbeats_failed.to_string(),
            ms(f.heartbeat.p50_ms),
            ms(f.heartbeat.p99_ms),
            ms(f.heartbeat.max_ms),
            ms(f.fanout.p50_ms),
            ms(f.fanout.p99_ms),
            format!("{}/{}", f.fanout.count, f.expected_deliveries(s.watchers)),
            f.reconnects.to_string(),
            format!("{:.0}", f.expiries),
            f.live_at_end.map_or("?".into(), |n| n.to_string()),
            f.etcd_messages_per_heartbeat
                .map_or("-".into(), |m| format!("{m:.3}")),
            dir_cpu,
            dir_rss,
            etcd_cpu,
            etcd_rss,
        ]);
    }
    text += &t.render();
    text += "CPU: share of one core over the window, summed over the directories (or the \
             members); RSS: the peak of their sum. Live at end: the fleet plus the probe. etcd \
             msgs/hb: gRPC messages the members received over the window (watches and the \
             probe included), per heartbeat answered.\n";
    let e = &modes[1];
    let speed = ratio(e.heartbeats_per_second(), raw_rate);
    let checks = vec![
        Check::new(
            "directory on etcd: failed heartbeats",
            "0",
            e.heartbeats_failed.to_string(),
            e.heartbeats_failed == 0 && e.heartbeats_ok > 0,
        ),
        Check::new(
            "directory on etcd: fan-out p99",
            "< 100 ms",
            format!(
                "{:.1} ms ({} of {} deliveries)",
                e.fanout.p99_ms,
                e.fanout.count,
                e.expected_deliveries(s.watchers)
            ),
            e.fanout.p99_ms < 100.0 && e.fanout.count > 0,
        ),
        Check::new(
            "directory on etcd: heartbeat throughput",
            ">= 0.8x raw etcd keep-alives",
            format!(
                "{:.0}/s vs {raw_rate:.0}/s ({speed:.2}x)",
                e.heartbeats_per_second()
            ),
            speed >= 0.8,
        ),
        Check::new(
            "directory on etcd: expiries of healthy instances",
            "0",
            format!("{:.0}", e.expiries),
            e.expiries == 0.0,
        ),
    ];
    Report {
        scenario: "directory-etcd".into(),
        quick: ctx.quick,
        text,
        checks,
        data: json!({
            "sizes": s,
            "scheduled_rate": rate,
            "ttl_s": TTL.as_secs(),
            "replicas": REPLICAS,
            "members": MEMBERS,
            "etcd_to_raw_heartbeat_ratio": speed,
            "modes": modes,
        }),
    }
}

#[cfg(test)]
mod tests {
    use baker_tests::{require, Needs};

    use super::*;
    use crate::scenario::{DirectoryOpts, Store};

    /// A tiny run of all three modes against the release binaries and real etcd clusters:
    /// each mode registers its fleet, keeps it alive, and reaches its watchers. Not a
    /// measurement: no target is asserted, only that every part of the harness works.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_mode_runs_at_a_tiny_size() {
        if !require(Needs::Etcd) {
            return;
        }
        let ctx = Ctx::tiny(DirectoryOpts {
            store: Store::Etcd,
            instances: Some(60),
            watchers: Some(4),
            window: Some(Duration::from_secs(2)),
        });
        let report = run(&ctx).await.unwrap();
        let modes = report.data["modes"].as_array().unwrap();
        let names: Vec<&str> = modes.iter().map(|m| m["mode"].as_str().unwrap()).collect();
        assert_eq!(names, ["memory", "etcd", "raw etcd"], "{}", report.text);
        for m in modes {
            assert!(m["heartbeats_ok"].as_u64().unwrap() > 0, "{}", report.text);
            assert!(
                m["fanout"]["count"].as_u64().unwrap() > 0,
                "{}",
                report.text
            );
            assert_eq!(m["live_at_end"].as_u64(), Some(61), "{}", report.text);
        }
        assert_eq!(report.checks.len(), 4);
    }

    #[test]
    fn raw_keys_follow_the_directory_layout() {
        assert_eq!(
            raw_key("/v1/services/s007/instances/i00042"),
            "/raw/instances/s007/i00042"
        );
    }
}
