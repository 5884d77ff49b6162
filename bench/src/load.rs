//! The load generator: HTTP/1.1 keep-alive connections on hyper, driven closed-loop (N
//! connections, each sending its next request when the previous answer arrives) or open-loop
//! (requests scheduled at a fixed rate, latency counted from the scheduled send time so that a
//! stalled server cannot hide its stall by slowing the generator: no coordinated omission).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::stats::{Samples, Summary};

/// Longest a single request may take before it counts as failed.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("connect")]
    Connect(#[source] std::io::Error),
    #[error("handshake")]
    Handshake(#[source] hyper::Error),
    #[error("closed or reset")]
    Send(#[source] hyper::Error),
    #[error("body")]
    Body(#[source] hyper::Error),
    #[error("timeout")]
    Timeout,
}

/// What to send: one method and path to one address, with an optional body.
#[derive(Debug, Clone)]
pub struct Target {
    pub addr: SocketAddr,
    pub method: Method,
    pub path: String,
    pub body: Bytes,
}

impl Target {
    pub fn get(addr: SocketAddr, path: &str) -> Self {
        Target {
            addr,
            method: Method::GET,
            path: path.to_owned(),
            body: Bytes::new(),
        }
    }

    fn request(&self) -> Request<Full<Bytes>> {
        let mut req = Request::builder()
            .method(self.method.clone())
            .uri(self.path.as_str())
            .header(hyper::header::HOST, self.addr.to_string());
        if !self.body.is_empty() {
            req = req.header(hyper::header::CONTENT_TYPE, "application/json");
        }
        req.body(Full::new(self.body.clone()))
            .expect("a request built from a valid path")
    }
}

/// One keep-alive connection that reconnects after a failure.
pub struct Conn {
    addr: SocketAddr,
    sender: Option<SendRequest<Full<Bytes>>>,
}

impl Conn {
    pub fn new(addr: SocketAddr) -> Self {
        Conn { addr, sender: None }
    }

    async fn connect(&mut self) -> Result<&mut SendRequest<Full<Bytes>>, RequestError> {
        let usable = self
            .sender
            .as_ref()
            .is_some_and(|s| !s.is_closed() && s.is_ready());
        if !usable {
            self.sender = None;
            let stream = TcpStream::connect(self.addr)
                .await
                .map_err(RequestError::Connect)?;
            let _ = stream.set_nodelay(true);
            let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .map_err(RequestError::Handshake)?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            self.sender = Some(sender);
        }
        Ok(self.sender.as_mut().expect("connected just above"))
    }

    /// Sends `req` and reads the whole answer; on any failure the connection is dropped.
    pub async fn send(
        &mut self,
        req: Request<Full<Bytes>>,
    ) -> Result<(StatusCode, Bytes), RequestError> {
        let result = tokio::time::timeout(REQUEST_TIMEOUT, async {
            let sender = self.connect().await?;
            let resp = sender.send_request(req).await.map_err(RequestError::Send)?;
            let status = resp.status();
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(RequestError::Body)?
                .to_bytes();
            Ok((status, body))
        })
        .await
        .unwrap_or(Err(RequestError::Timeout));
        if result.is_err() {
            self.sender = None;
        }
        result
    }

    /// Sends the target's request.
    pub async fn call(&mut self, target: &Target) -> Result<(StatusCode, Bytes), RequestError> {
        self.send(target.request()).await
    }
}

/// What a load run produced.
#[derive(Debug, Default)]
pub struct Outcome {
    pub ok: u64,
    /// Failed requests by reason (`http 503`, `closed or reset`, `connect`, ...).
    pub failed: BTreeMap<String, u64>,
    pub latency: Samples,
    pub elapsed: Duration,
}

impl Outcome {
    pub fn failed_total(&self) -> u64 {
        self.failed.values().sum()
    }

    pub fn total(&self) -> u64 {
        self.ok + self.failed_total()
    }

    pub fn rps(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    fn record(&mut self, result: &Result<(StatusCode, Bytes), RequestError>, took: Duration) {
        match result {
            Ok((status, _)) if status.is_success() => {
                self.ok += 1;
                self.latency.push(took);
            }
            Ok((status, _)) => {
                *self
                    .failed
                    .entry(format!("http {}", status.as_u16()))
                    .or_default() += 1
            }
            Err(e) => *self.failed.entry(e.to_string()).or_default() += 1,
        }
    }

    fn merge(&mut self, other: Outcome) {
        self.ok += other.ok;
        for (k, v) in other.failed {
            *self.failed.entry(k).or_default() += v;
        }
        self.latency.extend(other.latency);
    }

    /// The serializable figures.
    pub fn report(&self) -> LoadReport {
        LoadReport {
            ok: self.ok,
            failed: self.failed_total(),
            failed_by_reason: self.failed.clone(),
            rps: self.rps(),
            seconds: self.elapsed.as_secs_f64(),
            latency: self.latency.summary(),
        }
    }
}

/// Figures of one load run, as written to JSON.
#[derive(Debug, Clone, Serialize)]
pub struct LoadReport {
    pub ok: u64,
    pub failed: u64,
    pub failed_by_reason: BTreeMap<String, u64>,
    pub rps: f64,
    pub seconds: f64,
    pub latency: Summary,
}

/// After a failed request, a worker pauses this long before the next so that a refused port
/// does not turn the generator into a busy loop.
const FAILURE_PAUSE: Duration = Duration::from_millis(5);

/// `conns` connections, each sending back-to-back requests for `duration`.
pub async fn closed_loop(target: &Target, conns: usize, duration: Duration) -> Outcome {
    let start = Instant::now();
    let end = start + duration;
    let mut tasks = Vec::new();
    for _ in 0..conns.max(1) {
        let target = target.clone();
        tasks.push(tokio::spawn(async move {
            let mut out = Outcome::default();
            let mut conn = Conn::new(target.addr);
            while Instant::now() < end {
                let sent = Instant::now();
                let result = conn.call(&target).await;
                out.record(&result, sent.elapsed());
                if result.is_err() {
                    tokio::time::sleep(FAILURE_PAUSE).await;
                }
            }
            out
        }));
    }
    collect(tasks, start).await
}

/// Requests at `rate` per second for `duration`, over up to `conns` keep-alive connections.
///
/// Each request has a scheduled send time. A connection that is free before its next slot
/// waits for it and the latency counts from the actual send (the generator's timer is not the
/// server's fault); a connection still busy at its slot sends late and the latency counts from
/// the slot, so time spent queued behind a slow answer is charged to the system under test.
pub async fn open_loop(target: &Target, rate: f64, duration: Duration, conns: usize) -> Outcome {
    let slots = (duration.as_secs_f64() * rate).round() as u64;
    open_loop_until(target, rate, conns, Some(slots), CancellationToken::new()).await
}

/// Open-loop pacing, shared by the workers that send: slot `k` is due `k` intervals after the
/// start, and each slot is taken by one worker.
///
/// A worker free before its slot waits for it and the latency counts from the actual send (the
/// generator's timer is not the server's fault); a worker still busy at its slot sends late and
/// the latency counts from the slot, so time spent queued behind a slow answer is charged to
/// the system under test.
#[derive(Debug)]
pub struct Schedule {
    start: Instant,
    interval: Duration,
    next: AtomicU64,
}

/// A slot that is due: where its latency counts from, and how late its worker took it.
#[derive(Debug, Clone, Copy)]
pub struct Due {
    pub origin: Instant,
    pub late: Duration,
}

impl Schedule {
    /// Slots `interval` apart from now.
    pub fn new(interval: Duration) -> Schedule {
        Schedule {
            start: Instant::now(),
            interval,
            next: AtomicU64::new(0),
        }
    }

    /// The number of the next slot not yet taken.
    pub fn take(&self) -> u64 {
        self.next.fetch_add(1, Ordering::Relaxed)
    }

    /// Waits until slot `k` is due; `None` when `stop` comes first.
    pub async fn wait(&self, k: u64, stop: &CancellationToken) -> Option<Due> {
        let slot = self.start + self.interval.mul_f64(k as f64);
        let now = Instant::now();
        if now < slot {
            tokio::select! {
                _ = tokio::time::sleep_until(slot) => {}
                _ = stop.cancelled() => return None,
            }
            Some(Due {
                origin: Instant::now(),
                late: Duration::ZERO,
            })
        } else {
            Some(Due {
                origin: slot,
                late: now - slot,
            })
        }
    }
}

async fn open_loop_until(
    target: &Target,
    rate: f64,
    conns: usize,
    slots: Option<u64>,
    stop: CancellationToken,
) -> Outcome {
    let schedule = Arc::new(Schedule::new(Duration::from_secs_f64(1.0 / rate.max(1e-3))));
    let mut tasks = Vec::new();
    for _ in 0..conns.max(1) {
        let target = target.clone();
        let schedule = schedule.clone();
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let mut out = Outcome::default();
            let mut conn = Conn::new(target.addr);
            loop {
                let k = schedule.take();
                if slots.is_some_and(|s| k >= s) || stop.is_cancelled() {
                    break;
                }
                let Some(due) = schedule.wait(k, &stop).await else {
                    break;
                };
                let result = conn.call(&target).await;
                out.record(&result, due.origin.elapsed());
                if result.is_err() {
                    tokio::time::sleep(FAILURE_PAUSE).await;
                }
            }
            out
        }));
    }
    collect(tasks, schedule.start).await
}

async fn collect(tasks: Vec<tokio::task::JoinHandle<Outcome>>, start: Instant) -> Outcome {
    let mut total = Outcome::default();
    for t in tasks {
        if let Ok(o) = t.await {
            total.merge(o);
        }
    }
    total.elapsed = start.elapsed();
    total
}

/// Steady load that runs in the background until stopped; for scenarios that change things
/// underneath it.
pub struct Background {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<Outcome>,
}

impl Background {
    /// Starts open-loop load at `rate` per second over `conns` connections.
    pub fn start(target: Target, rate: f64, conns: usize) -> Self {
        let stop = CancellationToken::new();
        let token = stop.clone();
        let task =
            tokio::spawn(async move { open_loop_until(&target, rate, conns, None, token).await });
        Background { stop, task }
    }

    /// Stops the load and returns what it saw (requests in flight complete first).
    pub async fn finish(self) -> Outcome {
        self.stop.cancel();
        self.task.await.unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcome_counts_failures_by_reason() {
        let mut o = Outcome::default();
        o.record(
            &Ok((StatusCode::OK, Bytes::new())),
            Duration::from_millis(1),
        );
        o.record(
            &Ok((StatusCode::SERVICE_UNAVAILABLE, Bytes::new())),
            Duration::from_millis(1),
        );
        o.record(&Err(RequestError::Timeout), Duration::from_millis(1));
        o.record(&Err(RequestError::Timeout), Duration::from_millis(1));
        assert_eq!((o.ok, o.failed_total(), o.total()), (1, 3, 4));
        assert_eq!(o.failed["http 503"], 1);
        assert_eq!(o.failed["timeout"], 2);
        assert_eq!(o.latency.len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_slot_waits_when_early_and_counts_from_the_slot_when_late() {
        let start = Instant::now();
        let schedule = Schedule::new(Duration::from_millis(100));
        let stop = CancellationToken::new();
        let (first, second) = (schedule.take(), schedule.take());
        let due = schedule.wait(first, &stop).await.unwrap();
        assert_eq!((due.origin, due.late), (start, Duration::ZERO));
        // Busy past the second slot (at 100 ms): it counts from the slot, 150 ms late.
        tokio::time::sleep(Duration::from_millis(250)).await;
        let due = schedule.wait(second, &stop).await.unwrap();
        assert_eq!(due.origin, start + Duration::from_millis(100));
        assert_eq!(due.late, Duration::from_millis(150));
        // Free before the next slot not taken (at 300 ms: the one at 200 ms is skipped): waits
        // for it, and counts from then.
        let (_, fourth) = (schedule.take(), schedule.take());
        let due = schedule.wait(fourth, &stop).await.unwrap();
        assert_eq!(due.origin, start + Duration::from_millis(300));
        assert_eq!(due.late, Duration::ZERO);
        stop.cancel();
        assert!(schedule.wait(schedule.take(), &stop).await.is_none());
    }
}

/// What `wrk` reported for one run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct WrkReport {
    pub rps: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub errors: u64,
}

/// Runs Debian's `wrk` (closed loop, `conns` connections, one thread) against `url`, as a
/// cross-check of the hyper generator; `None` when wrk is not installed or fails.
pub async fn wrk(url: &str, conns: usize, duration: Duration) -> Option<WrkReport> {
    let out = tokio::process::Command::new("wrk")
        .args([
            "-t1",
            &format!("-c{conns}"),
            &format!("-d{}s", duration.as_secs().max(1)),
            "--latency",
            url,
        ])
        .output()
        .await
        .ok()?;
    if !out.status.success() {
        return None;
    }
    parse_wrk(&String::from_utf8_lossy(&out.stdout))
}

fn parse_wrk_time(v: &str) -> Option<f64> {
    let (num, scale) = if let Some(n) = v.strip_suffix("us") {
        (n, 1e-3)
    } else if let Some(n) = v.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = v.strip_suffix('m') {
        (n, 60_000.0)
    } else if let Some(n) = v.strip_suffix('s') {
        (n, 1000.0)
    } else {
        return None;
    };
    num.parse::<f64>().ok().map(|n| n * scale)
}

fn parse_wrk(text: &str) -> Option<WrkReport> {
    let mut r = WrkReport::default();
    let mut got_rps = false;
    for line in text.lines() {
        let cols: Vec<&str> = line.split_whitespace().collect();
        match cols.as_slice() {
            ["50%", v] => r.p50_ms = parse_wrk_time(v)?,
            ["99%", v] => r.p99_ms = parse_wrk_time(v)?,
            ["Requests/sec:", v] => {
                r.rps = v.parse().ok()?;
                got_rps = true;
            }
            ["Non-2xx", "or", "3xx", "responses:", n] => r.errors += n.parse::<u64>().ok()?,
            ["Socket", "errors:", rest @ ..] => {
                r.errors += rest
                    .iter()
                    .filter_map(|c| c.trim_end_matches(',').parse::<u64>().ok())
                    .sum::<u64>();
            }
            _ => {}
        }
    }
    got_rps.then_some(r)
}

#[cfg(test)]
mod wrk_tests {
    use super::*;

    #[test]
    fn parses_wrk_output() {
        let text = "Running 1s test @ http://127.0.0.1:1/greeting
  1 threads and 16 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   610.17us  200.00us   5.00ms   90.00%
  Latency Distribution
     50%  550.00us
     75%  700.00us
     90%    0.90ms
     99%    1.20ms
  25000 requests in 1.00s, 4.00MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 4
Requests/sec:  25000.50
Transfer/sec:      4.00MB
";
        let r = parse_wrk(text).unwrap();
        assert_eq!(r.rps, 25000.5);
        assert!((r.p50_ms - 0.55).abs() < 1e-9);
        assert!((r.p99_ms - 1.2).abs() < 1e-9);
        assert_eq!(r.errors, 7);
        assert_eq!(parse_wrk("nothing"), None);
    }
}
