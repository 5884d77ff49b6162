//! What the directory scenarios share: a fleet of instances registered and heartbeating at a
//! fixed pace, watchers that note when a probe change reaches them, the probe itself, and the
//! directory's own counters.
//!
//! Fan-out probe: twice a second a new instance `p<k>` joins service `fanout` (and `p<k-1>`
//! leaves); each watcher notes when it first sees `p<k>`; the latency is from just before the
//! registering call to that moment, both on this process's monotonic clock.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::bail;
use baker_client::{DirectoryClient, InstanceSpec, WatchEvent};
use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, Full};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::directory_scale::{open_watch, put};
use crate::load::{Conn, Schedule};
use crate::stats::Samples;

/// The service the fan-out probe changes.
pub(crate) const PROBE: &str = "fanout";
/// Keep-alive connections (or etcd clients' workers) the fleet's calls go over.
pub(crate) const CONNS: usize = 32;
/// How a snapshot line starts.
const SNAPSHOT: &[u8] = br#"{"type":"snapshot""#;

/// One registration request: (path, body).
pub(crate) type Put = (String, Bytes);

/// When each probe instance was sent, by its number.
pub(crate) type Sent = Arc<Mutex<HashMap<u64, Instant>>>;

/// The registration body of fleet instance `i`: a distinct address `10.x.y.z`, port 8080,
/// version 1, with a TTL of `ttl_ms`.
pub(crate) fn spec_body(i: usize, ttl_ms: u64) -> Bytes {
    let spec = InstanceSpec {
        address: format!("10.{}.{}.{}", i / 65536, (i / 256) % 256, i % 256),
        port: 8080,
        version: Some("1".into()),
        weight: None,
        tags: Vec::new(),
        ttl_ms: Some(ttl_ms),
        zone: None,
    };
    Bytes::from(serde_json::to_vec(&spec).expect("a spec serializes"))
}

/// Sends every request of `reqs` over `CONNS` keep-alive connections spread over `addrs`;
/// the time it took.
pub(crate) async fn register_all(
    addrs: &[SocketAddr],
    reqs: Arc<Vec<Put>>,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for c in 0..CONNS {
        let (reqs, next, addr) = (reqs.clone(), next.clone(), addrs[c % addrs.len()]);
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

/// One worker's way of renewing instance `i` of the fleet: `true` when it was renewed.
pub(crate) trait Beat: Send + 'static {
    fn beat(&mut self, i: usize) -> impl Future<Output = bool> + Send;
}

/// Heartbeats over the directory's API: `PUT` of the instance on a keep-alive connection to
/// one of the directories. Instance `i` always goes to directory `i % n`, as a registrar
/// heartbeats through the first replica it reaches, not through any.
pub(crate) struct HttpBeat {
    conns: Vec<(SocketAddr, Conn)>,
    reqs: Arc<Vec<Put>>,
}

impl HttpBeat {
    /// `CONNS` workers, each with a connection to every one of `addrs`.
    pub(crate) fn pool(addrs: &[SocketAddr], reqs: &Arc<Vec<Put>>) -> Vec<HttpBeat> {
        (0..CONNS)
            .map(|_| HttpBeat {
                conns: addrs.iter().map(|a| (*a, Conn::new(*a))).collect(),
                reqs: reqs.clone(),
            })
            .collect()
    }
}

impl Beat for HttpBeat {
    async fn beat(&mut self, i: usize) -> bool {
        let (path, body) = &self.reqs[i];
        let n = self.conns.len();
        let (addr, conn) = &mut self.conns[i % n];
        matches!(
            conn.send(put(*addr, path, body.clone())).await,
            Ok((s, _)) if s.is_success()
        )
    }
}

/// What heartbeat workers counted while measuring.
#[derive(Debug, Default)]
pub(crate) struct Beats {
    pub ok: u64,
    pub failed: u64,
    /// Latency of each renewal, from its send or, when sent late, from its slot.
    pub latency: Samples,
    /// The most a renewal was sent after its slot.
    pub max_late: Duration,
}

impl Beats {
    fn add(&mut self, other: Beats) {
        self.ok += other.ok;
        self.failed += other.failed;
        self.latency.extend(other.latency);
        self.max_late = self.max_late.max(other.max_late);
    }
}

/// Renews each of `fleet` instances once per `every`, open loop over `workers` on the load
/// generator's [`Schedule`], until `stop`; counts only while `measuring`.
pub(crate) fn heartbeats<B: Beat>(
    fleet: usize,
    every: Duration,
    workers: Vec<B>,
    measuring: Arc<AtomicBool>,
    stop: CancellationToken,
) -> Vec<JoinHandle<Beats>> {
    let schedule = Arc::new(Schedule::new(every.div_f64(fleet.max(1) as f64)));
    workers
        .into_iter()
        .map(|mut w| {
            let (schedule, measuring, stop) = (schedule.clone(), measuring.clone(), stop.clone());
            tokio::spawn(async move {
                let mut beats = Beats::default();
                while !stop.is_cancelled() {
                    let k = schedule.take();
                    let Some(due) = schedule.wait(k, &stop).await else {
                        break;
                    };
                    let renewed = w.beat(k as usize % fleet).await;
                    if !measuring.load(Ordering::Relaxed) {
                        continue;
                    }
                    beats.max_late = beats.max_late.max(due.late);
                    if renewed {
                        beats.ok += 1;
                        beats.latency.push(due.origin.elapsed());
                    } else {
                        beats.failed += 1;
                    }
                }
                beats
            })
        })
        .collect()
}

/// Waits for every heartbeat worker (stopped first) and adds up what they counted.
pub(crate) async fn join_heartbeats(tasks: Vec<JoinHandle<Beats>>) -> anyhow::Result<Beats> {
    let mut total = Beats::default();
    for t in tasks {
        total.add(
            t.await
                .map_err(|e| anyhow::anyhow!("a heartbeat worker: {e}"))?,
        );
    }
    Ok(total)
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

/// A group of watchers, each noting when it first sees each probe instance.
pub(crate) struct Watchers {
    pub connected: Arc<AtomicU64>,
    pub reconnects: Arc<AtomicU64>,
    pub fanout: Arc<Mutex<Samples>>,
    pub tasks: Vec<JoinHandle<()>>,
}

impl Watchers {
    pub(crate) fn new() -> Watchers {
        Watchers {
            connected: Arc::default(),
            reconnects: Arc::default(),
            fanout: Arc::default(),
            tasks: Vec::new(),
        }
    }

    /// Notes that watcher saw probe `k` now, if it is the first time (`seen` is its own).
    pub(crate) fn saw(&self, seen: &mut HashSet<u64>, sent: &Sent, k: u64, now: Instant) {
        if !seen.insert(k) {
            return;
        }
        let t0 = sent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&k)
            .copied();
        if let Some(t0) = t0 {
            self.fanout
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(now.saturating_duration_since(t0));
        }
    }

    /// A handle sharing the counters, for a watcher task.
    pub(crate) fn share(&self) -> Watchers {
        Watchers {
            connected: self.connected.clone(),
            reconnects: self.reconnects.clone(),
            fanout: self.fanout.clone(),
            tasks: Vec::new(),
        }
    }

    /// Counts a watch (re)opened.
    pub(crate) fn opened(&self, first: &mut bool) {
        let counter = if *first {
            &self.connected
        } else {
            &self.reconnects
        };
        counter.fetch_add(1, Ordering::Relaxed);
        *first = false;
    }

    /// Watchers that have had their snapshot.
    pub(crate) fn connected(&self) -> u64 {
        self.connected.load(Ordering::Relaxed)
    }

    /// Waits until `want` watchers have had their snapshot, up to `limit`.
    pub(crate) async fn wait_connected(&self, want: usize, limit: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + limit;
        while (self.connected() as usize) < want {
            if Instant::now() > deadline {
                bail!(
                    "only {} of {want} watchers had their snapshot within {limit:?}",
                    self.connected()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    /// The fan-out latencies so far.
    pub(crate) fn fanout(&self) -> crate::stats::Summary {
        self.fanout
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .summary()
    }

    /// Waits for the watcher tasks (stopped first).
    pub(crate) async fn join(self) {
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

/// How many watchers may be receiving their snapshot at once. A 100,000-instance snapshot is
/// about 20 MB: a thousand of them at once would be gigabytes queued on loopback, and the
/// directory closes watchers that fall that far behind, which reconnect and ask for another.
pub(crate) const SNAPSHOTS_IN_FLIGHT: usize = 16;

/// Adds `n` watchers of the directory at `addr` on `path` to `group`; one counts as connected
/// once its snapshot has arrived whole, and at most `snapshots` permits' worth are being
/// received at once.
pub(crate) fn watchers(
    group: &mut Watchers,
    addr: SocketAddr,
    n: usize,
    path: &'static str,
    sent: &Sent,
    snapshots: &Arc<Semaphore>,
    stop: &CancellationToken,
) {
    for _ in 0..n {
        let (stop, sent, me) = (stop.clone(), sent.clone(), group.share());
        let snapshots = snapshots.clone();
        group.tasks.push(tokio::spawn(async move {
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
                // A snapshot (up to tens of MB with 2,000 watchers) is skipped as it comes,
                // never held: each byte is looked at once.
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
                            me.opened(&mut first);
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
                            me.saw(&mut seen, &sent, k, now);
                        }
                    }
                }
            }
        }));
    }
}

/// One way of making the probe change: register `p<k>`, then remove `p<k-1>`.
pub(crate) trait ProbeStep: Send + 'static {
    /// `false` when a call failed.
    fn step(&mut self, k: u64) -> impl Future<Output = bool> + Send;
}

/// The probe through the directory's API.
pub(crate) struct ApiProbe(pub DirectoryClient);

impl ProbeStep for ApiProbe {
    async fn step(&mut self, k: u64) -> bool {
        let spec = InstanceSpec {
            address: "127.0.0.1".into(),
            port: 1,
            version: None,
            weight: None,
            tags: Vec::new(),
            ttl_ms: Some(600_000),
            zone: None,
        };
        let mut ok = self
            .0
            .register(PROBE, &format!("p{k}"), &spec)
            .await
            .is_ok();
        if k > 0 {
            ok &= self
                .0
                .deregister(PROBE, &format!("p{}", k - 1))
                .await
                .is_ok();
        }
        ok
    }
}

/// Makes a probe change twice a second until `stop`; (probes, errors).
pub(crate) fn probe<P: ProbeStep>(
    mut p: P,
    sent: Sent,
    stop: CancellationToken,
) -> JoinHandle<(u64, u64)> {
    tokio::spawn(async move {
        let (mut k, mut errors) = (0u64, 0u64);
        while !stop.is_cancelled() {
            sent.lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(k, Instant::now());
            if !p.step(k).await {
                errors += 1;
            }
            k += 1;
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        (k, errors)
    })
}

/// One value of the directory's `/metrics`.
pub(crate) async fn metric(addr: SocketAddr, name: &str) -> Option<f64> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_probe_ids_in_both_forms_of_probe_service_events_only() {
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
        let other = v1.replace(
            r#""service":"fanout","instances""#,
            r#""service":"s001","instances""#,
        );
        assert!(probe_ids(other.as_bytes()).is_empty());
        let snapshot = r#"{"type":"snapshot","index":7,"services":{"fanout":[]},"routes":{}}"#;
        assert!(probe_ids(snapshot.as_bytes()).is_empty());
    }

    /// Counts the instances it was asked to renew.
    struct Counting(Arc<Mutex<Vec<usize>>>);

    impl Beat for Counting {
        async fn beat(&mut self, i: usize) -> bool {
            self.0.lock().unwrap().push(i);
            true
        }
    }

    #[tokio::test(start_paused = true)]
    async fn heartbeats_renew_every_instance_once_per_period() {
        let asked = Arc::new(Mutex::new(Vec::new()));
        let workers = (0..3).map(|_| Counting(asked.clone())).collect();
        let (measuring, stop) = (Arc::new(AtomicBool::new(true)), CancellationToken::new());
        let tasks = heartbeats(5, Duration::from_secs(1), workers, measuring, stop.clone());
        // Slots at 0, 0.2, ..., 1.8 s: two periods, then the one at 2.0 s.
        tokio::time::sleep(Duration::from_millis(2_100)).await;
        stop.cancel();
        let Beats {
            ok,
            failed,
            latency,
            ..
        } = join_heartbeats(tasks).await.unwrap();
        let mut asked = asked.lock().unwrap().clone();
        asked.sort_unstable();
        assert_eq!(asked, vec![0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4]);
        assert_eq!((ok, failed, latency.len()), (11, 0, 11));
    }
}
