//! Scenario 5, directory scale: 10,000 instances (100 services of 100) heartbeating every 2 s
//! from one process over a keep-alive pool, and 500 watchers on `GET /v1/watch`. The directory
//! is pinned to one core (`taskset -c 1`). Measures heartbeats/s sustained, the fan-out
//! latency of a change to every watcher, and the directory's CPU and RSS.
//!
//! The fleet, the watchers and the fan-out probe are [`super::fleet`]'s; the measured window
//! starts once every watcher has had its snapshot.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::bail;
use baker_client::DirectoryClient;
use baker_tests::Proc;
use bytes::Bytes;
use http_body_util::Full;
use hyper::client::conn::http1::SendRequest;
use serde_json::json;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::fleet::{
    self, join_heartbeats, register_all, spec_body, ApiProbe, Beats, HttpBeat, Sent, Watchers,
    SNAPSHOTS_IN_FLIGHT,
};
use crate::daemons::{self, Bins};
use crate::procfs::Sampler;
use crate::report::{ms, Check, Report, Table};
use crate::scenario::Ctx;

pub(crate) const SERVICES: usize = 100;
pub(crate) const HEARTBEAT_EVERY: Duration = Duration::from_secs(2);
/// The directory requires it of watchers (`BAKER_WATCH_TOKEN`), as a fleet would.
pub(crate) const WATCH_TOKEN: &str = "bench-watch-token";

/// Starts the directory pinned to CPU 1 (the last core when there are fewer).
pub(crate) async fn pinned_directory(
    bins: &Bins,
    data: &std::path::Path,
) -> anyhow::Result<(Proc, SocketAddr)> {
    pinned_directory_with(bins, data, &[]).await
}

/// The CPU the directory is pinned to: 1, or 0 on a one-CPU machine. Counted from the CPUs
/// online, not from this process's affinity, so that the harness itself can be pinned to CPU 0
/// (`taskset -c 0 baker-bench ...`) and leave CPU 1 to the directory alone.
fn directory_core() -> usize {
    let online = std::fs::read_to_string("/sys/devices/system/cpu/online").unwrap_or_default();
    let last = online
        .trim()
        .rsplit([',', '-'])
        .next()
        .and_then(|n| n.parse::<usize>().ok());
    match last {
        Some(last) => last.min(1),
        None => std::thread::available_parallelism()
            .map_or(1, |n| n.get() - 1)
            .min(1),
    }
}

/// [`pinned_directory`] with extra variables.
pub(crate) async fn pinned_directory_with(
    bins: &Bins,
    data: &std::path::Path,
    extra: &[(&str, &str)],
) -> anyhow::Result<(Proc, SocketAddr)> {
    let core = directory_core().to_string();
    let data = data.display().to_string();
    let bin = bins.path("baker-directory")?.display().to_string();
    let mut env = vec![
        ("RUST_LOG", "warn,baker_directory=info"),
        ("BAKER_LISTEN", "127.0.0.1:0"),
        ("BAKER_DATA", data.as_str()),
        ("BAKER_DOCKER", "off"),
        ("BAKER_WATCH_TOKEN", WATCH_TOKEN),
    ];
    env.extend_from_slice(extra);
    let mut proc = Proc::spawn("directory", "taskset", &["-c", &core, &bin], &env);
    let addr = proc.listen_addr().await;
    Ok((proc, addr))
}

pub(crate) fn put(addr: SocketAddr, path: &str, body: Bytes) -> hyper::Request<Full<Bytes>> {
    hyper::Request::put(path)
        .header(hyper::header::HOST, addr.to_string())
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(body))
        .expect("a valid request")
}

/// Per-instance heartbeat requests, `instances` in `SERVICES` services with a 6 s TTL:
/// (path, body).
pub(crate) fn heartbeats(instances: usize) -> Vec<(String, Bytes)> {
    let per = instances.div_ceil(SERVICES);
    (0..instances)
        .map(|i| {
            (
                format!("/v1/services/s{:03}/instances/i{i:05}", i / per),
                spec_body(i, 6_000),
            )
        })
        .collect()
}

/// Opens the watch `path` (`/v1/watch` and its query) on its own connection, with the watch
/// token, and returns the streaming body.
///
/// The watchers read lines as bytes and decode only the probe service's events: 500 watchers
/// each decoding every 10,000-instance snapshot would make this process, not the directory,
/// the bottleneck on a two-core machine.
/// The request sender is returned with the body, to be held while the stream is read.
pub(crate) async fn open_watch(
    addr: SocketAddr,
    path: &str,
) -> anyhow::Result<(SendRequest<Full<Bytes>>, hyper::body::Incoming)> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    let _ = stream.set_nodelay(true);
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let req = hyper::Request::get(path)
        .header(hyper::header::HOST, addr.to_string())
        .header(
            hyper::header::AUTHORIZATION,
            format!("Bearer {WATCH_TOKEN}"),
        )
        .body(Full::new(Bytes::new()))?;
    let resp = sender.send_request(req).await?;
    if !resp.status().is_success() {
        bail!("GET {path}: {}", resp.status());
    }
    Ok((sender, resp.into_body()))
}

/// A size from the command line, else from `var`, else `default`: `--instances`, `--watchers`,
/// or BAKER_BENCH_INSTANCES and BAKER_BENCH_WATCHERS, override the sizes, to find where a
/// limit lies.
pub(crate) fn size(arg: Option<usize>, var: &str, default: usize) -> usize {
    arg.or_else(|| std::env::var(var).ok().and_then(|v| v.parse().ok()))
        .unwrap_or(default)
}

pub async fn run(ctx: &Ctx) -> anyhow::Result<Report> {
    let o = &ctx.directory;
    let instances = size(
        o.instances,
        "BAKER_BENCH_INSTANCES",
        ctx.pick(10_000, 1_000),
    )
    .max(1);
    let watchers = size(o.watchers, "BAKER_BENCH_WATCHERS", ctx.pick(500, 50));
    let duration = o.window.unwrap_or(Duration::from_secs(ctx.pick(60, 15)));
    let rate = instances as f64 / HEARTBEAT_EVERY.as_secs_f64();

    let data = tempfile::tempdir()?;
    let (mut dir, addr) = pinned_directory(&ctx.bins, data.path()).await?;
    let url = format!("http://{addr}");
    let reqs = Arc::new(heartbeats(instances));

    // Register everyone before the watchers connect, as fast as the pool allows.
    let register_seconds = register_all(&[addr], reqs.clone()).await?.as_secs_f64();

    // Heartbeats at the rate 10,000 instances every 2 s need, open loop over the pool, from
    // right after registration (instances must not expire while the watchers connect); only
    // those sent in the measured window are counted.
    let (measuring, hb_stop) = (Arc::new(AtomicBool::new(false)), CancellationToken::new());
    let hb = fleet::heartbeats(
        instances,
        HEARTBEAT_EVERY,
        HttpBeat::pool(&[addr], &reqs),
        measuring.clone(),
        hb_stop.clone(),
    );

    // Watchers: each notes when it first sees each probe instance.
    let (sent, stop) = (Sent::default(), CancellationToken::new());
    let mut group = Watchers::new();
    let snapshots = Arc::new(Semaphore::new(SNAPSHOTS_IN_FLIGHT));
    fleet::watchers(
        &mut group,
        addr,
        watchers,
        "/v1/watch",
        &sent,
        &snapshots,
        &stop,
    );
    group
        .wait_connected(watchers, Duration::from_secs(120))
        .await?;

    // The measured window starts once every watcher has its snapshot.
    let dir_pid = dir.pid();
    let sampler = Sampler::start(Duration::from_millis(500), move || vec![dir_pid]);
    measuring.store(true, Ordering::Relaxed);
    let start = Instant::now();
    // The fan-out probe, alongside.
    let probe_stop = CancellationToken::new();
    let probe = fleet::probe(
        ApiProbe(DirectoryClient::new(&url, None)?),
        sent,
        probe_stop.clone(),
    );
    tokio::time::sleep(duration).await;
    measuring.store(false, Ordering::Relaxed);
    let elapsed = start.elapsed().as_secs_f64();
    hb_stop.cancel();
    let Beats {
        ok,
        failed,
        latency,
        max_late,
    } = join_heartbeats(hb).await?;
    probe_stop.cancel();
    let (probes, probe_errors) = probe.await.unwrap_or((0, 0));
    // Let the last probe reach every watcher.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let footprint = sampler.finish().await;
    let live = DirectoryClient::new(&url, None)?
        .services()
        .await
        .map(|s| s.services.values().map(Vec::len).sum::<usize>())
        .ok();
    stop.cancel();
    let (fan, reconnects) = (group.fanout(), group.reconnects.load(Ordering::Relaxed));
    group.join().await;
    daemons::stop(&mut dir, Duration::from_secs(10)).await;

    let hb = latency.summary();
    let achieved = ok as f64 / elapsed;
    let expected_samples = probes * watchers as u64;
    let mut text = format!(
        "{instances} instances in {SERVICES} services heartbeating every {HEARTBEAT_EVERY:?} \
         ({rate:.0}/s scheduled) for {elapsed:.1} s, {watchers} watchers; directory pinned to one core; \
         initial registration took {register_seconds:.1} s\n"
    );
    let mut t = Table::new(&[
        "heartbeats/s",
        "failed",
        "hb p50 ms",
        "hb p99 ms",
        "max lateness ms",
        "fan-out p50 ms",
        "fan-out p99 ms",
        "fan-out max ms",
        "deliveries",
        "reconnects",
        "dir CPU",
        "dir RSS max MiB",
    ]);
    t.row(vec![
        format!("{achieved:.0}"),
        failed.to_string(),
        ms(hb.p50_ms),
        ms(hb.p99_ms),
        format!("{:.1}", max_late.as_secs_f64() * 1e3),
        ms(fan.p50_ms),
        ms(fan.p99_ms),
        ms(fan.max_ms),
        format!("{}/{}", fan.count, expected_samples),
        reconnects.to_string(),
        format!("{:.1}%", footprint.cpu_cores * 100.0),
        format!("{:.1}", footprint.rss_max_mib),
    ]);
    text += &t.render();
    text += &format!(
        "instances live at the end: {} of {}; fan-out probe errors: {probe_errors}\n",
        live.map_or("?".into(), |n| n.to_string()),
        instances + 1
    );
    let sustained = achieved >= rate * 0.98 && failed == 0;
    let checks = vec![
        Check::new(
            "directory: heartbeats sustained on one core",
            &format!("{rate:.0}/s, 0 failed"),
            format!(
                "{achieved:.0}/s, {failed} failed, CPU {:.0}% of a core",
                footprint.cpu_cores * 100.0
            ),
            sustained && footprint.cpu_cores < 1.0,
        ),
        Check::new(
            "directory: RSS",
            "< 100 MB",
            format!("{:.1} MiB max", footprint.rss_max_mib),
            footprint.rss_max_mib * 1.048_576 < 100.0,
        ),
        Check::new(
            "directory: fan-out p99",
            "< 100 ms",
            format!(
                "{:.1} ms ({} of {} deliveries)",
                fan.p99_ms, fan.count, expected_samples
            ),
            fan.p99_ms < 100.0 && fan.count > 0,
        ),
    ];
    Ok(Report {
        scenario: "directory".into(),
        quick: ctx.quick,
        text,
        checks,
        data: json!({
            "instances": instances,
            "services": SERVICES,
            "watchers": watchers,
            "seconds": elapsed,
            "scheduled_rate": rate,
            "heartbeats_per_second": achieved,
            "heartbeats_failed": failed,
            "heartbeat_latency": hb,
            "max_lateness_ms": max_late.as_secs_f64() * 1e3,
            "fanout_latency": fan,
            "fanout_expected_deliveries": expected_samples,
            "watch_reconnects": reconnects,
            "directory": footprint,
            "live_at_end": live,
            "initial_registration_seconds": register_seconds,
        }),
    })
}
