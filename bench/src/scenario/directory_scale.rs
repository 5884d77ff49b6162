//! Scenario 5, directory scale: 10,000 instances (100 services of 100) heartbeating every 2 s
//! from one process over a keep-alive pool, and 500 watchers on `GET /v1/watch`. The directory
//! is pinned to one core (`taskset -c 1`). Measures heartbeats/s sustained, the fan-out
//! latency of a change to every watcher, and the directory's CPU and RSS.
//!
//! Fan-out probe: twice a second a new instance `p<k>` joins service `fanout` (and `p<k-1>`
//! leaves); each watcher notes when it first sees `p<k>` in an event; the latency is from just
//! before the registering `PUT` to that moment, both on this process's monotonic clock.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context};
use baker_client::{DirectoryClient, InstanceSpec, WatchEvent};
use baker_tests::Proc;
use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use serde_json::json;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::daemons::{self, Bins};
use crate::load::Conn;
use crate::procfs::Sampler;
use crate::report::{ms, Check, Report, Table};
use crate::scenario::Ctx;
use crate::stats::Samples;

pub(crate) const SERVICES: usize = 100;
const PROBE_SERVICE: &str = "fanout";
pub(crate) const HEARTBEAT_EVERY: Duration = Duration::from_secs(2);
const CONNS: usize = 32;
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
            let spec = InstanceSpec {
                address: format!("10.{}.{}.{}", i / 65536, (i / 256) % 256, i % 256),
                port: 8080,
                version: Some("1".into()),
                weight: None,
                tags: Vec::new(),
                ttl_ms: Some(6_000),
            };
            let body = serde_json::to_vec(&spec).expect("a spec serializes");
            (
                format!("/v1/services/s{:03}/instances/i{i:05}", i / per),
                Bytes::from(body),
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

/// The probe instances (`p<k>`) named by a watch line, if it is an event of the probe service.
fn probe_ids(line: &[u8]) -> Vec<u64> {
    let is_probe = |l: &[u8]| {
        let needle = format!(r#""service":"{PROBE_SERVICE}""#);
        l.starts_with(br#"{"type":"service""#)
            && l.windows(needle.len()).any(|w| w == needle.as_bytes())
    };
    if !is_probe(line) {
        return Vec::new();
    }
    match serde_json::from_slice::<WatchEvent>(line.trim_ascii_end()) {
        Ok(WatchEvent::Service {
            service, instances, ..
        }) if service == PROBE_SERVICE => instances
            .iter()
            .filter_map(|i| i.id.as_str().strip_prefix('p')?.parse().ok())
            .collect(),
        _ => Vec::new(),
    }
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
    let registered = Instant::now();
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..CONNS {
        let (reqs, next) = (reqs.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut conn = Conn::new(addr);
            let mut failed = 0u64;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                let Some((path, body)) = reqs.get(i) else {
                    break;
                };
                match conn.send(put(addr, path, body.clone())).await {
                    Ok((s, _)) if s.is_success() => {}
                    _ => failed += 1,
                }
            }
            failed
        }));
    }
    let mut failed_registrations = 0;
    for t in tasks {
        failed_registrations += t.await.unwrap_or(0);
    }
    if failed_registrations > 0 {
        bail!("{failed_registrations} of {instances} registrations failed");
    }
    let register_seconds = registered.elapsed().as_secs_f64();

    // Heartbeats at the rate 10,000 instances every 2 s need, open loop over the pool, from
    // right after registration (instances must not expire while the watchers connect); only
    // those sent in the measured window are counted.
    let hb_start = Instant::now();
    let interval = Duration::from_secs_f64(1.0 / rate);
    let hb_stop = CancellationToken::new();
    let measuring = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..CONNS {
        let (reqs, next) = (reqs.clone(), next.clone());
        let (hb_stop, measuring) = (hb_stop.clone(), measuring.clone());
        tasks.push(tokio::spawn(async move {
            let mut conn = Conn::new(addr);
            let (mut ok, mut failed, mut latency, mut max_late) =
                (0u64, 0u64, Samples::new(), Duration::ZERO);
            while !hb_stop.is_cancelled() {
                let k = next.fetch_add(1, Ordering::Relaxed);
                let slot = hb_start + interval.mul_f64(k as f64);
                let counted = measuring.load(Ordering::Relaxed);
                // As in the load generator: a late slot is charged from its scheduled time.
                let origin = if Instant::now() < slot {
                    tokio::select! {
                        _ = tokio::time::sleep_until(slot) => {}
                        _ = hb_stop.cancelled() => break,
                    }
                    Instant::now()
                } else {
                    if counted {
                        max_late = max_late.max(slot.elapsed());
                    }
                    slot
                };
                let (path, body) = &reqs[k as usize % reqs.len()];
                let result = conn.send(put(addr, path, body.clone())).await;
                if !counted {
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
            (ok, failed, latency, max_late)
        }));
    }

    // Watchers: each notes when it first sees each probe instance.
    let stop = CancellationToken::new();
    let sent: Arc<Mutex<HashMap<u64, Instant>>> = Arc::default();
    let fanout = Arc::new(Mutex::new(Samples::new()));
    let reconnects = Arc::new(AtomicU64::new(0));
    let connected = Arc::new(AtomicU64::new(0));
    let mut watch_tasks = Vec::new();
    for _ in 0..watchers {
        let (stop, sent, fanout) = (stop.clone(), sent.clone(), fanout.clone());
        let (reconnects, connected) = (reconnects.clone(), connected.clone());
        watch_tasks.push(tokio::spawn(async move {
            let mut seen = std::collections::HashSet::<u64>::new();
            let mut first = true;
            while !stop.is_cancelled() {
                let Ok((_sender, mut body)) = open_watch(addr, "/v1/watch").await else {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                };
                if first {
                    connected.fetch_add(1, Ordering::Relaxed);
                    first = false;
                } else {
                    reconnects.fetch_add(1, Ordering::Relaxed);
                }
                let mut buf = BytesMut::new();
                let mut scanned = 0;
                loop {
                    let frame = tokio::select! {
                        f = body.frame() => f,
                        _ = stop.cancelled() => return,
                    };
                    let Some(Ok(frame)) = frame else { break };
                    let Ok(data) = frame.into_data() else {
                        continue;
                    };
                    buf.extend_from_slice(&data);
                    while let Some(pos) = buf[scanned..].iter().position(|&b| b == b'\n') {
                        let line = buf.split_to(scanned + pos + 1);
                        scanned = 0;
                        let now = Instant::now();
                        for k in probe_ids(&line) {
                            if seen.insert(k) {
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
                    scanned = buf.len();
                }
            }
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while (connected.load(Ordering::Relaxed) as usize) < watchers {
        if Instant::now() > deadline {
            bail!(
                "only {} of {watchers} watchers connected within 120 s",
                connected.load(Ordering::Relaxed)
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The measured window starts once every watcher is connected.
    let dir_pid = dir.pid();
    let sampler = Sampler::start(Duration::from_millis(500), move || vec![dir_pid]);
    measuring.store(true, Ordering::Relaxed);
    let start = Instant::now();
    // The fan-out probe, alongside.
    let client = DirectoryClient::new(&url, None)?;
    let probe_stop = CancellationToken::new();
    let probe = {
        let (sent, probe_stop) = (sent.clone(), probe_stop.clone());
        tokio::spawn(async move {
            let mut k = 0u64;
            let mut errors = 0u64;
            while !probe_stop.is_cancelled() {
                let spec = InstanceSpec {
                    address: "127.0.0.1".into(),
                    port: 1,
                    version: None,
                    weight: None,
                    tags: Vec::new(),
                    ttl_ms: Some(60_000),
                };
                sent.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(k, Instant::now());
                if client
                    .register(PROBE_SERVICE, &format!("p{k}"), &spec)
                    .await
                    .is_err()
                {
                    errors += 1;
                }
                if k > 0
                    && client
                        .deregister(PROBE_SERVICE, &format!("p{}", k - 1))
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
    };
    tokio::time::sleep(duration).await;
    measuring.store(false, Ordering::Relaxed);
    let elapsed = start.elapsed().as_secs_f64();
    hb_stop.cancel();
    let (mut ok, mut failed, mut latency, mut max_late) = (0, 0, Samples::new(), Duration::ZERO);
    for t in tasks {
        let (o, f, l, m) = t.await.context("a heartbeat worker")?;
        ok += o;
        failed += f;
        latency.extend(l);
        max_late = max_late.max(m);
    }
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
    for t in watch_tasks {
        let _ = t.await;
    }
    daemons::stop(&mut dir, Duration::from_secs(10)).await;

    let fan = fanout.lock().unwrap_or_else(|p| p.into_inner()).summary();
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
        reconnects.load(Ordering::Relaxed).to_string(),
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
            "watch_reconnects": reconnects.load(Ordering::Relaxed),
            "directory": footprint,
            "live_at_end": live,
            "initial_registration_seconds": register_seconds,
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_probe_ids_only_in_probe_service_events() {
        let inst = |id: &str| {
            format!(
                r#"{{"service":"fanout","id":"{id}","address":"127.0.0.1","port":1,"version":"1","weight":100,"tags":[],"source":"registrar","ttl_ms":60000,"last_seen":1}}"#
            )
        };
        let line = format!(
            r#"{{"type":"service","index":7,"service":"fanout","instances":[{},{}]}}"#,
            inst("p3"),
            inst("p4")
        );
        assert_eq!(probe_ids(format!("{line}\n").as_bytes()), vec![3, 4]);
        let other = line.replace(
            r#""service":"fanout","instances""#,
            r#""service":"s001","instances""#,
        );
        assert!(probe_ids(other.as_bytes()).is_empty());
        let snapshot = r#"{"type":"snapshot","index":7,"services":{"fanout":[]},"routes":{}}"#;
        assert!(probe_ids(snapshot.as_bytes()).is_empty());
    }
}
