//! Scenario 7, a large directory: 100,000 instances (one service of 10,000, and 90,000 in 900
//! services of 100) heartbeating every 10 s with a 30 s TTL, and 2,000 watchers, half of them
//! unfiltered and half filtered on one service (as an ambassador routing one service asks).
//! The directory is pinned to one core. Measures, for this build and (with
//! `--baseline-bin-dir`) an earlier one, each with its own directory:
//!
//! 1. registering 10,000 instances into one service, and 100 services × 100;
//! 2. with the fleet heartbeating and the watchers connected: expiries of healthy instances,
//!    heartbeat latency, fan-out latency of a change to each group of watchers, the
//!    directory's CPU and RSS;
//! 3. the RSS of an ambassador routing one service beside that directory.
//!
//! Fan-out probe: twice a second a new instance `p<k>` joins service `fanout` (and `p<k-1>`
//! leaves); each watcher notes when it first sees `p<k>`. The filtered watchers ask for
//! `?v=2&service=fanout`; a directory that predates filters ignores the query and sends them
//! everything, in its only form, which is the "before" this scenario compares with.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context};
use baker_client::{DirectoryClient, InstanceSpec, WatchEvent};
use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, Full};
use serde_json::json;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::directory_scale::{
    open_watch, pinned_directory, pinned_directory_with, put, WATCH_TOKEN,
};
use crate::daemons::{self, Ambassador, Bins};
use crate::load::Conn;
use crate::procfs::{self, Sampler};
use crate::report::{ms, Check, Report, Table};
use crate::scenario::Ctx;
use crate::stats::{Samples, Summary};

const BIG: &str = "big";
const PROBE: &str = "fanout";
const HEARTBEAT_EVERY: Duration = Duration::from_secs(10);
const TTL_MS: u64 = 30_000;
const CONNS: usize = 32;
/// How a snapshot line starts.
const SNAPSHOT: &[u8] = br#"{"type":"snapshot""#;

/// The sizes of a run.
#[derive(Debug, Clone, Copy)]
struct Sizes {
    big: usize,
    services: usize,
    per_service: usize,
    watchers_all: usize,
    watchers_filtered: usize,
    window: Duration,
}

impl Sizes {
    fn total(&self) -> usize {
        self.big + self.services * self.per_service
    }
}

/// One registration request: (path, body).
type Put = (String, Bytes);

fn spec_body(i: usize) -> Bytes {
    let spec = InstanceSpec {
        address: format!("10.{}.{}.{}", i / 65536, (i / 256) % 256, i % 256),
        port: 8080,
        version: Some("1".into()),
        weight: None,
        tags: Vec::new(),
        ttl_ms: Some(TTL_MS),
    };
    Bytes::from(serde_json::to_vec(&spec).expect("a spec serializes"))
}

/// `count` instances spread over services named by `service(i)`.
fn puts(count: usize, service: impl Fn(usize) -> String) -> Vec<Put> {
    (0..count)
        .map(|i| {
            (
                format!("/v1/services/{}/instances/i{i:06}", service(i)),
                spec_body(i),
            )
        })
        .collect()
}

/// The fleet: the big service first, then the small ones.
fn fleet(s: Sizes) -> Vec<Put> {
    let mut all = puts(s.big, |_| BIG.to_owned());
    let per = s.per_service;
    all.extend(puts(s.services * per, |i| format!("s{:03}", i / per)));
    all
}

/// Sends every request over `CONNS` keep-alive connections; the time it took.
async fn register_all(addr: SocketAddr, reqs: Arc<Vec<Put>>) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..CONNS {
        let (reqs, next) = (reqs.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut conn = Conn::new(addr);
            let mut failed = 0u64;
            while let Some((path, body)) = reqs.get(next.fetch_add(1, Ordering::Relaxed) as usize) {
                match conn.send(put(addr, path, body.clone())).await {
                    Ok((s, _)) if s.is_success() => {}
                    _ => failed += 1,
                }
            }
            failed
        }));
    }
    let mut failed = 0;
    for t in tasks {
        failed += t.await.unwrap_or(0);
    }
    if failed > 0 {
        bail!("{failed} of {} registrations failed", reqs.len());
    }
    Ok(started.elapsed())
}

/// Registering `n` instances into one service, then `n` over `n / 100` services, each into a
/// fresh directory: the seconds each took.
async fn registration(bins: &Bins, n: usize) -> anyhow::Result<(f64, f64)> {
    let mut out = Vec::new();
    for reqs in [
        puts(n, |_| BIG.to_owned()),
        puts(n, |i| format!("s{:03}", i / 100)),
    ] {
        let data = tempfile::tempdir()?;
        let (mut dir, addr) = pinned_directory(bins, data.path()).await?;
        out.push(register_all(addr, Arc::new(reqs)).await?.as_secs_f64());
        daemons::stop(&mut dir, Duration::from_secs(10)).await;
    }
    Ok((out[0], out[1]))
}

/// The probe instances a watch line names: a v1 `service` event of the probe service lists
/// them, a v2 `upsert` carries one. Snapshots are skipped without decoding.
fn probe_ids(line: &[u8]) -> Vec<u64> {
    let needle = format!(r#""service":"{PROBE}""#);
    if line.starts_with(SNAPSHOT) || !line.windows(needle.len()).any(|w| w == needle.as_bytes()) {
        return Vec::new();
    }
    let id = |i: &baker_client::Instance| i.id.as_str().strip_prefix('p')?.parse().ok();
    match serde_json::from_slice::<WatchEvent>(line.trim_ascii_end()) {
        Ok(WatchEvent::Service {
            service, instances, ..
        }) if service == PROBE => instances.iter().filter_map(id).collect(),
        Ok(WatchEvent::Upsert { instance, .. }) if instance.service == PROBE => {
            id(&instance).into_iter().collect()
        }
        _ => Vec::new(),
    }
}

/// A group of watchers on one path, each noting when it first sees each probe instance.
struct Watchers {
    connected: Arc<AtomicU64>,
    reconnects: Arc<AtomicU64>,
    fanout: Arc<Mutex<Samples>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// How many watchers may be receiving their snapshot at once. A 100,000-instance snapshot is
/// about 20 MB: a thousand of them at once would be gigabytes queued on loopback, and the
/// directory closes watchers that fall that far behind, which reconnect and ask for another.
const SNAPSHOTS_IN_FLIGHT: usize = 16;
/// How long the watchers get to connect before the window starts anyway.
const CONNECT_LIMIT: Duration = Duration::from_secs(600);

/// `n` watchers on `path`; one counts as connected once its snapshot has arrived whole.
fn watchers(
    addr: SocketAddr,
    n: usize,
    path: &'static str,
    sent: Arc<Mutex<HashMap<u64, Instant>>>,
    snapshots: Arc<tokio::sync::Semaphore>,
    stop: CancellationToken,
) -> Watchers {
    let connected = Arc::new(AtomicU64::new(0));
    let reconnects = Arc::new(AtomicU64::new(0));
    let fanout = Arc::new(Mutex::new(Samples::new()));
    let tasks = (0..n)
        .map(|_| {
            let (stop, sent, fanout) = (stop.clone(), sent.clone(), fanout.clone());
            let (connected, reconnects) = (connected.clone(), reconnects.clone());
            let snapshots = snapshots.clone();
            tokio::spawn(async move {
                let mut seen = HashSet::<u64>::new();
                let mut first = true;
                while !stop.is_cancelled() {
                    let Ok(permit) = snapshots.clone().acquire_owned().await else {
                        return;
                    };
                    let Ok((_sender, mut body)) = open_watch(addr, path).await else {
                        drop(permit);
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    };
                    // Held until the snapshot's line has ended.
                    let mut permit = Some(permit);
                    // A snapshot (up to tens of MB with 2,000 watchers) is skipped as it
                    // comes, never held: each byte is looked at once.
                    let mut buf = BytesMut::new();
                    let mut skipping = false;
                    loop {
                        let frame = tokio::select! {
                            f = body.frame() => f,
                            _ = stop.cancelled() => return,
                        };
                        let Some(Ok(frame)) = frame else { break };
                        let Ok(data) = frame.into_data() else {
                            continue;
                        };
                        let mut data = &data[..];
                        while !data.is_empty() {
                            let newline = data.iter().position(|&b| b == b'\n');
                            if newline.is_some() && permit.take().is_some() {
                                let counter = if first { &connected } else { &reconnects };
                                counter.fetch_add(1, Ordering::Relaxed);
                                first = false;
                            }
                            if skipping {
                                match newline {
                                    Some(p) => (skipping, data) = (false, &data[p + 1..]),
                                    None => data = &[],
                                }
                                continue;
                            }
                            let Some(p) = newline else {
                                buf.extend_from_slice(data);
                                data = &[];
                                if buf.starts_with(SNAPSHOT) {
                                    (skipping, buf) = (true, BytesMut::new());
                                }
                                continue;
                            };
                            buf.extend_from_slice(&data[..=p]);
                            data = &data[p + 1..];
                            let line = buf.split();
                            let now = Instant::now();
                            for k in probe_ids(&line) {
                                if !seen.insert(k) {
                                    continue;
                                }
                                let t0 = sent
                                    .lock()
                                    .unwrap_or_else(|p| p.into_inner())
                                    .get(&k)
                                    .copied();
                                if let Some(t0) = t0 {
                                    fanout
                                        .lock()
                                        .unwrap_or_else(|p| p.into_inner())
                                        .push(now.saturating_duration_since(t0));
                                }
                            }
                        }
                    }
                }
            })
        })
        .collect();
    Watchers {
        connected,
        reconnects,
        fanout,
        tasks,
    }
}

/// Heartbeats every request of `reqs` once per `HEARTBEAT_EVERY`, open loop over the pool,
/// until `stop`; latencies count only while `measuring`. Returns (ok, failed, latencies).
fn heartbeats(
    addr: SocketAddr,
    reqs: Arc<Vec<Put>>,
    measuring: Arc<AtomicBool>,
    stop: CancellationToken,
) -> Vec<tokio::task::JoinHandle<(u64, u64, Samples)>> {
    let start = Instant::now();
    let interval = HEARTBEAT_EVERY.div_f64(reqs.len() as f64);
    let next = Arc::new(AtomicU64::new(0));
    (0..CONNS)
        .map(|_| {
            let (reqs, next, measuring, stop) =
                (reqs.clone(), next.clone(), measuring.clone(), stop.clone());
            tokio::spawn(async move {
                let mut conn = Conn::new(addr);
                let (mut ok, mut failed, mut latency) = (0u64, 0u64, Samples::new());
                while !stop.is_cancelled() {
                    let k = next.fetch_add(1, Ordering::Relaxed);
                    let slot = start + interval.mul_f64(k as f64);
                    // A late slot is charged from its scheduled time.
                    let origin = if Instant::now() < slot {
                        tokio::select! {
                            _ = tokio::time::sleep_until(slot) => {}
                            _ = stop.cancelled() => break,
                        }
                        Instant::now()
                    } else {
                        slot
                    };
                    let (path, body) = &reqs[k as usize % reqs.len()];
                    let result = conn.send(put(addr, path, body.clone())).await;
                    if !measuring.load(Ordering::Relaxed) {
                        continue;
                    }
                    match result {
                        Ok((s, _)) if s.is_success() => {
                            ok += 1;
                            latency.push(origin.elapsed());
                        }
                        _ => failed += 1,
                    }
                }
                (ok, failed, latency)
            })
        })
        .collect()
}

/// Adds and removes a probe instance twice a second until `stop`; (probes, errors).
fn probe(
    client: DirectoryClient,
    sent: Arc<Mutex<HashMap<u64, Instant>>>,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<(u64, u64)> {
    tokio::spawn(async move {
        let spec = InstanceSpec {
            address: "127.0.0.1".into(),
            port: 1,
            version: None,
            weight: None,
            tags: Vec::new(),
            ttl_ms: Some(600_000),
        };
        let (mut k, mut errors) = (0u64, 0u64);
        while !stop.is_cancelled() {
            sent.lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(k, Instant::now());
            if client
                .register(PROBE, &format!("p{k}"), &spec)
                .await
                .is_err()
            {
                errors += 1;
            }
            if k > 0
                && client
                    .deregister(PROBE, &format!("p{}", k - 1))
                    .await
                    .is_err()
            {
                errors += 1;
            }
            k += 1;
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        (k, errors)
    })
}

/// One value of the directory's `/metrics`.
async fn metric(addr: SocketAddr, name: &str) -> Option<f64> {
    let req = hyper::Request::get("/metrics")
        .header(hyper::header::HOST, addr.to_string())
        .body(Full::new(Bytes::new()))
        .ok()?;
    let (status, body) = Conn::new(addr).send(req).await.ok()?;
    if !status.is_success() {
        return None;
    }
    String::from_utf8_lossy(&body)
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// What one build measured.
#[derive(Debug, Clone, serde::Serialize)]
struct Figures {
    one_service_s: f64,
    spread_s: f64,
    fleet_registration_s: f64,
    heartbeats_ok: u64,
    heartbeats_failed: u64,
    heartbeat: Summary,
    expiries: f64,
    fanout_all: Summary,
    fanout_filtered: Summary,
    deliveries: (u64, u64, u64),
    reconnects: u64,
    /// Watchers that had their snapshot before the window, and how long they took.
    watchers_connected: u64,
    connect_s: f64,
    directory: procfs::Footprint,
    ambassador_rss_mib: f64,
    seconds: f64,
}

async fn measure(bins: &Bins, s: Sizes) -> anyhow::Result<Figures> {
    let (one_service_s, spread_s) = registration(bins, s.big).await?;

    let data = tempfile::tempdir()?;
    // Room for every watcher and the heartbeat pool (the default is 1024 connections).
    let (mut dir, addr) =
        pinned_directory_with(bins, data.path(), &[("BAKER_MAX_CONNECTIONS", "8192")]).await?;
    let url = format!("http://{addr}");
    let reqs = Arc::new(fleet(s));
    let fleet_registration_s = register_all(addr, reqs.clone()).await?.as_secs_f64();

    let (measuring, hb_stop) = (Arc::new(AtomicBool::new(false)), CancellationToken::new());
    let hb = heartbeats(addr, reqs, measuring.clone(), hb_stop.clone());
    let (sent, stop) = (Arc::default(), CancellationToken::new());
    let snapshots = Arc::new(tokio::sync::Semaphore::new(SNAPSHOTS_IN_FLIGHT));
    let all = watchers(
        addr,
        s.watchers_all,
        "/v1/watch?v=2",
        Arc::clone(&sent),
        snapshots.clone(),
        stop.clone(),
    );
    let filtered = watchers(
        addr,
        s.watchers_filtered,
        "/v1/watch?v=2&service=fanout",
        Arc::clone(&sent),
        snapshots,
        stop.clone(),
    );
    // Each watcher counts once its snapshot has arrived; a directory that cannot serve them
    // all within the limit is measured with those it did serve, and the report says how many.
    let want = (s.watchers_all + s.watchers_filtered) as u64;
    let connecting = Instant::now();
    let connected =
        || all.connected.load(Ordering::Relaxed) + filtered.connected.load(Ordering::Relaxed);
    while connected() < want && connecting.elapsed() < CONNECT_LIMIT {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (watchers_connected, connect_s) = (connected(), connecting.elapsed().as_secs_f64());
    if watchers_connected < want {
        eprintln!(
            "directory-100k: {watchers_connected} of {want} watchers had their snapshot after \
             {CONNECT_LIMIT:?}; measuring with those"
        );
    }

    // The measured window: heartbeats, probes, and the directory's footprint.
    let expired_before = metric(addr, "baker_directory_expiries_total")
        .await
        .unwrap_or(0.0);
    let pid = dir.pid();
    let sampler = Sampler::start(Duration::from_millis(500), move || vec![pid]);
    measuring.store(true, Ordering::Relaxed);
    let start = Instant::now();
    let probe_stop = CancellationToken::new();
    let probes = probe(DirectoryClient::new(&url, None)?, sent, probe_stop.clone());
    tokio::time::sleep(s.window).await;
    measuring.store(false, Ordering::Relaxed);
    let seconds = start.elapsed().as_secs_f64();
    probe_stop.cancel();
    let (probed, _) = probes.await.unwrap_or((0, 0));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let directory = sampler.finish().await;
    let expiries = metric(addr, "baker_directory_expiries_total")
        .await
        .unwrap_or(0.0)
        - expired_before;

    // An ambassador routing the probe service, beside the full directory.
    let mut amb =
        Ambassador::start_with(bins, &url, &[PROBE], &[("BAKER_WATCH_TOKEN", WATCH_TOKEN)]).await?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let ambassador_rss_mib =
        procfs::usage(amb.proc.pid()).map_or(0.0, |u| u.rss_kib as f64 / 1024.0);
    daemons::stop(&mut amb.proc, Duration::from_secs(10)).await;

    stop.cancel();
    hb_stop.cancel();
    let (mut heartbeats_ok, mut heartbeats_failed, mut latency) = (0, 0, Samples::new());
    for t in hb {
        let (o, f, l) = t.await.context("a heartbeat worker")?;
        heartbeats_ok += o;
        heartbeats_failed += f;
        latency.extend(l);
    }
    let reconnects =
        all.reconnects.load(Ordering::Relaxed) + filtered.reconnects.load(Ordering::Relaxed);
    for t in all.tasks.into_iter().chain(filtered.tasks) {
        let _ = t.await;
    }
    daemons::stop(&mut dir, Duration::from_secs(10)).await;
    let fanout_all = all
        .fanout
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .summary();
    let fanout_filtered = filtered
        .fanout
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .summary();
    Ok(Figures {
        one_service_s,
        spread_s,
        fleet_registration_s,
        heartbeats_ok,
        heartbeats_failed,
        heartbeat: latency.summary(),
        expiries,
        deliveries: (fanout_all.count, fanout_filtered.count, probed),
        fanout_all,
        fanout_filtered,
        reconnects,
        watchers_connected,
        connect_s,
        directory,
        ambassador_rss_mib,
        seconds,
    })
}

pub async fn run(ctx: &Ctx) -> anyhow::Result<Report> {
    let size = |var: &str, default: usize| {
        std::env::var(var)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let watchers = size("BAKER_BENCH_WATCHERS", ctx.pick(2_000, 100));
    let s = Sizes {
        big: ctx.pick(10_000, 1_000),
        services: ctx.pick(900, 90),
        per_service: 100,
        watchers_all: watchers / 2,
        watchers_filtered: watchers - watchers / 2,
        window: Duration::from_secs(ctx.pick(60, 15)),
    };
    let mut builds = vec![("this build", measure(&ctx.bins, s).await?)];
    if let Some(base) = &ctx.baseline {
        builds.push(("baseline", measure(base, s).await?));
    }

    let mut text = format!(
        "{} instances ({} in `{BIG}`, {} services of {}) heartbeating every {HEARTBEAT_EVERY:?} \
         with a {} s TTL, {} unfiltered + {} filtered watchers, a probe change twice a second; \
         directory pinned to one core. The filtered watchers ask for `?v=2&service={PROBE}`; \
         a baseline directory without filters sends them everything.\n",
        s.total(),
        s.big,
        s.services,
        s.per_service,
        TTL_MS / 1000,
        s.watchers_all,
        s.watchers_filtered
    );
    let mut t = Table::new(&[
        "build",
        &format!("{} into 1 service s", s.big),
        &format!("{} over {} services s", s.big, s.big / 100),
        "fleet registration s",
        "heartbeats/s",
        "hb failed",
        "hb p99 ms",
        "expiries",
        "fan-out p99 all ms",
        "fan-out p99 filtered ms",
        "watchers connected (s)",
        "deliveries all/filtered (probes)",
        "reconnects",
        "dir CPU",
        "dir RSS max MiB",
        "ambassador RSS MiB",
    ]);
    for (name, f) in &builds {
        t.row(vec![
            name.to_string(),
            format!("{:.2}", f.one_service_s),
            format!("{:.2}", f.spread_s),
            format!("{:.1}", f.fleet_registration_s),
            format!("{:.0}", f.heartbeats_ok as f64 / f.seconds),
            f.heartbeats_failed.to_string(),
            ms(f.heartbeat.p99_ms),
            format!("{:.0}", f.expiries),
            ms(f.fanout_all.p99_ms),
            ms(f.fanout_filtered.p99_ms),
            format!("{} ({:.0})", f.watchers_connected, f.connect_s),
            format!("{}/{} ({})", f.deliveries.0, f.deliveries.1, f.deliveries.2),
            f.reconnects.to_string(),
            format!("{:.0}%", f.directory.cpu_cores * 100.0),
            format!("{:.1}", f.directory.rss_max_mib),
            format!("{:.1}", f.ambassador_rss_mib),
        ]);
    }
    text += &t.render();
    let f = &builds[0].1;
    let fan = f.fanout_all.p99_ms.max(f.fanout_filtered.p99_ms);
    let checks = vec![
        Check::new(
            "directory 100k: expiries of healthy instances",
            "0",
            format!("{:.0}", f.expiries),
            f.expiries == 0.0,
        ),
        Check::new(
            "directory 100k: heartbeat p99",
            "< 10 ms",
            format!("{:.1} ms", f.heartbeat.p99_ms),
            f.heartbeat.p99_ms < 10.0,
        ),
        Check::new(
            "directory 100k: fan-out p99",
            "< 100 ms",
            format!("{fan:.1} ms"),
            fan < 100.0
                && f.fanout_all.count > 0
                && f.fanout_filtered.count > 0
                && f.watchers_connected == s.watchers_all as u64 + s.watchers_filtered as u64,
        ),
        Check::new(
            "directory 100k: RSS",
            "< 300 MB",
            format!("{:.1} MiB max", f.directory.rss_max_mib),
            f.directory.rss_max_mib * 1.048_576 < 300.0,
        ),
        Check::new(
            "registration into one service",
            "within 2x of 100 services",
            format!("{:.2} s vs {:.2} s", f.one_service_s, f.spread_s),
            f.one_service_s <= 2.0 * f.spread_s,
        ),
        Check::new(
            "ambassador routing one service beside 100k",
            "RSS < 20 MB",
            format!("{:.1} MiB", f.ambassador_rss_mib),
            f.ambassador_rss_mib * 1.048_576 < 20.0,
        ),
    ];
    let data: serde_json::Map<String, serde_json::Value> = builds
        .iter()
        .map(|(name, f)| (name.to_string(), json!(f)))
        .collect();
    Ok(Report {
        scenario: "directory-100k".into(),
        quick: ctx.quick,
        text,
        checks,
        data: serde_json::Value::Object(data),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_probe_ids_in_both_forms() {
        let inst = |id: &str| {
            format!(
                r#"{{"service":"fanout","id":"{id}","address":"127.0.0.1","port":1,"version":"1","weight":100,"tags":[],"source":"registrar","ttl_ms":60000,"last_seen":1}}"#
            )
        };
        let v1 = format!(
            r#"{{"type":"service","index":7,"service":"fanout","instances":[{},{}]}}"#,
            inst("p3"),
            inst("p4")
        );
        assert_eq!(probe_ids(format!("{v1}\n").as_bytes()), vec![3, 4]);
        let v2 = format!(
            r#"{{"prev":6,"type":"upsert","index":7,"at":1,"cause":"registered","instance":{}}}"#,
            inst("p5")
        );
        assert_eq!(probe_ids(v2.as_bytes()), vec![5]);
        let snapshot = r#"{"type":"snapshot","index":7,"services":{"fanout":[]},"routes":{}}"#;
        assert!(probe_ids(snapshot.as_bytes()).is_empty());
    }

    #[test]
    fn the_fleet_has_the_sizes_asked_for() {
        let s = Sizes {
            big: 30,
            services: 4,
            per_service: 5,
            watchers_all: 0,
            watchers_filtered: 0,
            window: Duration::ZERO,
        };
        let f = fleet(s);
        assert_eq!(f.len(), s.total());
        let paths: HashSet<&str> = f.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(paths.len(), f.len(), "every instance is distinct");
        assert_eq!(f.iter().filter(|(p, _)| p.contains("/big/")).count(), 30);
        assert!(f[30].0.starts_with("/v1/services/s000/instances/"));
    }
}
