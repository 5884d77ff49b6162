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

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use baker_client::DirectoryClient;
use serde_json::json;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::directory_scale::{pinned_directory, pinned_directory_with, WATCH_TOKEN};
use super::fleet::{
    heartbeats, join_heartbeats, metric, probe, register_all, spec_body, watchers, ApiProbe, Beats,
    HttpBeat, Put, Watchers, PROBE, SNAPSHOTS_IN_FLIGHT,
};
use crate::daemons::{self, Ambassador, Bins};
use crate::procfs::{self, Sampler};
use crate::report::{ms, Check, Report, Table};
use crate::scenario::Ctx;
use crate::stats::Summary;

const BIG: &str = "big";
const HEARTBEAT_EVERY: Duration = Duration::from_secs(10);
const TTL_MS: u64 = 30_000;
/// How long the watchers get to connect before the window starts anyway.
const CONNECT_LIMIT: Duration = Duration::from_secs(600);

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

/// `count` instances spread over services named by `service(i)`.
fn puts(count: usize, service: impl Fn(usize) -> String) -> Vec<Put> {
    (0..count)
        .map(|i| {
            (
                format!("/v1/services/{}/instances/i{i:06}", service(i)),
                spec_body(i, TTL_MS),
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
        out.push(register_all(&[addr], Arc::new(reqs)).await?.as_secs_f64());
        daemons::stop(&mut dir, Duration::from_secs(10)).await;
    }
    Ok((out[0], out[1]))
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
    let fleet_registration_s = register_all(&[addr], reqs.clone()).await?.as_secs_f64();

    let (measuring, hb_stop) = (Arc::new(AtomicBool::new(false)), CancellationToken::new());
    let workers = HttpBeat::pool(&[addr], &reqs);
    let hb = heartbeats(
        reqs.len(),
        HEARTBEAT_EVERY,
        workers,
        measuring.clone(),
        hb_stop.clone(),
    );
    let (sent, stop) = (Arc::default(), CancellationToken::new());
    let snapshots = Arc::new(Semaphore::new(SNAPSHOTS_IN_FLIGHT));
    let (mut all, mut filtered) = (Watchers::new(), Watchers::new());
    let path = "/v1/watch?v=2";
    watchers(
        &mut all,
        addr,
        s.watchers_all,
        path,
        &sent,
        &snapshots,
        &stop,
    );
    let path = "/v1/watch?v=2&service=fanout";
    watchers(
        &mut filtered,
        addr,
        s.watchers_filtered,
        path,
        &sent,
        &snapshots,
        &stop,
    );
    // Each watcher counts once its snapshot has arrived; a directory that cannot serve them
    // all within the limit is measured with those it did serve, and the report says how many.
    let want = (s.watchers_all + s.watchers_filtered) as u64;
    let connecting = Instant::now();
    let connected = || all.connected() + filtered.connected();
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
    let client = DirectoryClient::new(&url, None)?;
    let probes = probe(ApiProbe(client), sent, probe_stop.clone());
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
    let Beats {
        ok: heartbeats_ok,
        failed: heartbeats_failed,
        latency,
        ..
    } = join_heartbeats(hb).await?;
    let reconnects =
        all.reconnects.load(Ordering::Relaxed) + filtered.reconnects.load(Ordering::Relaxed);
    let (fanout_all, fanout_filtered) = (all.fanout(), filtered.fanout());
    all.join().await;
    filtered.join().await;
    daemons::stop(&mut dir, Duration::from_secs(10)).await;
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
    use std::collections::HashSet;

    use super::*;

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
