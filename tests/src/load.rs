//! Steady HTTP load through an ambassador, counting every request that fails: the measure of
//! fault tests ("0 failed requests while ...").

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::eventually;

/// The answers to the requests sent since `from` (see [`Load::answers_from_now`]).
#[derive(Default)]
struct Window {
    from: Option<Instant>,
    by_instance: BTreeMap<String, u64>,
    total: u64,
}

/// `clients` loops of `GET url`, half on kept-alive connections and half on a new connection
/// per request, until [`finish`](Self::finish). Each success counts the greeting instance that
/// answered.
pub struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failures: Arc<Mutex<Vec<String>>>,
    by_instance: Arc<Mutex<BTreeMap<String, u64>>>,
    window: Arc<Mutex<Window>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

fn http(keep_alive: bool) -> reqwest::Client {
    let mut b = reqwest::Client::builder().timeout(Duration::from_secs(10));
    if !keep_alive {
        b = b.pool_max_idle_per_host(0);
    }
    b.build().expect("an HTTP client")
}

/// One GET: the greeting's `instance`, or why it failed.
pub async fn greet(client: &reqwest::Client, url: &str) -> Result<String, String> {
    let resp = client.get(url).send().await.map_err(|e| format!("{e:?}"))?;
    let status = resp.status();
    if !status.is_success() {
        return Err(format!("status {status}"));
    }
    let v: serde_json::Value = resp.json().await.map_err(|e| format!("{e:?}"))?;
    Ok(v["instance"].as_str().unwrap_or_default().to_owned())
}

impl Load {
    /// Starts `clients` request loops on `url` (a greeting's `/greeting` behind an ambassador).
    pub fn start(url: &str, clients: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let by_instance = Arc::new(Mutex::new(BTreeMap::new()));
        let window = Arc::new(Mutex::new(Window::default()));
        let tasks = (0..clients)
            .map(|n| {
                let (stop, ok, failures, by_instance, window) = (
                    stop.clone(),
                    ok.clone(),
                    failures.clone(),
                    by_instance.clone(),
                    window.clone(),
                );
                let url = url.to_owned();
                tokio::spawn(async move {
                    let c = http(n % 2 == 0);
                    while !stop.load(Ordering::Relaxed) {
                        let sent = Instant::now();
                        match greet(&c, &url).await {
                            Ok(instance) => {
                                let mut w = window.lock().unwrap_or_else(|p| p.into_inner());
                                if w.from.is_some_and(|from| sent >= from) {
                                    *w.by_instance.entry(instance.clone()).or_default() += 1;
                                    w.total += 1;
                                }
                                drop(w);
                                *by_instance
                                    .lock()
                                    .unwrap_or_else(|p| p.into_inner())
                                    .entry(instance)
                                    .or_default() += 1;
                                ok.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(e) => failures.lock().unwrap_or_else(|p| p.into_inner()).push(e),
                        }
                    }
                })
            })
            .collect();
        Load {
            stop,
            ok,
            failures,
            by_instance,
            window,
            tasks,
        }
    }

    /// Requests that succeeded so far.
    pub fn ok(&self) -> u64 {
        self.ok.load(Ordering::Relaxed)
    }

    /// Requests that failed so far.
    pub fn failed(&self) -> usize {
        self.failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }

    /// Successes per instance so far.
    pub fn by_instance(&self) -> BTreeMap<String, u64> {
        self.by_instance
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Waits until `n` more requests succeeded (at most `timeout`).
    pub async fn more(&self, n: u64, timeout: Duration) {
        let target = self.ok() + n;
        eventually(
            timeout,
            &format!("{n} more requests to succeed"),
            || async { (self.ok() >= target).then_some(()) },
        )
        .await;
    }

    /// Waits until `n` requests sent from now on have succeeded (at most `timeout`) and returns
    /// their answers per instance. A request already in flight, which HAProxy may have routed
    /// under an earlier state, is not counted however late it answers.
    pub async fn answers_from_now(&self, n: u64, timeout: Duration) -> BTreeMap<String, u64> {
        *self.window.lock().unwrap_or_else(|p| p.into_inner()) = Window {
            from: Some(Instant::now()),
            ..Window::default()
        };
        eventually(
            timeout,
            &format!("{n} requests sent from now on to succeed"),
            || async {
                let w = self.window.lock().unwrap_or_else(|p| p.into_inner());
                (w.total >= n).then(|| w.by_instance.clone())
            },
        )
        .await
    }

    /// Stops the loops and returns the successes and the failures.
    pub async fn finish(self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            let _ = t.await;
        }
        let failures = self
            .failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        (self.ok.load(Ordering::Relaxed), failures)
    }
}

/// What a [`Paced`] load saw: when each answer came, and every failure.
#[derive(Debug, Default, Clone)]
pub struct PacedOutcome {
    /// Since the load started, when each successful answer arrived, in order.
    pub answers: Vec<Duration>,
    /// The same answers with the instance that gave each.
    pub answered_by: Vec<(Duration, String)>,
    pub failures: Vec<String>,
}

impl PacedOutcome {
    /// Answers that arrived in `[from, to)` (times since the load started).
    pub fn answered_between(&self, from: Duration, to: Duration) -> usize {
        self.answers
            .iter()
            .filter(|&&t| t >= from && t < to)
            .count()
    }

    /// Answers per instance that arrived in `[from, to)`.
    pub fn instances_between(&self, from: Duration, to: Duration) -> BTreeMap<String, usize> {
        let mut out = BTreeMap::new();
        for (_, instance) in self
            .answered_by
            .iter()
            .filter(|(t, _)| *t >= from && *t < to)
        {
            *out.entry(instance.clone()).or_default() += 1;
        }
        out
    }

    /// The fewest answers any window of `width` starting in `[from, to - width]` saw (sliding by
    /// 10 ms), and where that window starts.
    pub fn worst_window(&self, width: Duration, from: Duration, to: Duration) -> (usize, Duration) {
        let step = Duration::from_millis(10);
        let mut worst = (usize::MAX, from);
        let mut start = from;
        while start + width <= to {
            let n = self.answered_between(start, start + width);
            if n < worst.0 {
                worst = (n, start);
            }
            start += step;
        }
        worst
    }

    /// The longest time between two answers in `[from, to)`, and when it began.
    pub fn longest_gap(&self, from: Duration, to: Duration) -> (Duration, Duration) {
        let mut last = from;
        let mut gap = (Duration::ZERO, from);
        for &t in self.answers.iter().filter(|&&t| t >= from && t < to) {
            if t - last > gap.0 {
                gap = (t - last, last);
            }
            last = t;
        }
        if to > last && to - last > gap.0 {
            gap = (to - last, last);
        }
        gap
    }
}

/// Open-loop load: `GET url` at a fixed `rate` per second over `conns` kept-alive connections,
/// as a client application with a connection pool sends it. Request `k` is due `k / rate`
/// after the start; a connection still waiting for an answer when its next request is due
/// sends it late, so requests that wait on a hung server hold their connections, and when
/// every connection waits, nothing is answered at all.
pub struct Paced {
    start: Instant,
    stop: Arc<AtomicBool>,
    outcome: Arc<Mutex<PacedOutcome>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Paced {
    pub fn start(url: &str, rate: f64, conns: usize) -> Paced {
        let start = Instant::now();
        let interval = Duration::from_secs_f64(1.0 / rate);
        let next = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let outcome = Arc::new(Mutex::new(PacedOutcome::default()));
        let tasks = (0..conns)
            .map(|_| {
                let (next, stop, outcome) = (next.clone(), stop.clone(), outcome.clone());
                let url = url.to_owned();
                tokio::spawn(async move {
                    // One connection: one request at a time, kept alive.
                    let c = reqwest::Client::builder()
                        .timeout(Duration::from_secs(10))
                        .pool_max_idle_per_host(1)
                        .build()
                        .expect("an HTTP client");
                    while !stop.load(Ordering::Relaxed) {
                        let k = next.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep_until((start + interval.mul_f64(k as f64)).into()).await;
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        let r = greet(&c, &url).await;
                        let mut o = outcome.lock().unwrap_or_else(|p| p.into_inner());
                        match r {
                            Ok(instance) => {
                                let at = start.elapsed();
                                o.answers.push(at);
                                o.answered_by.push((at, instance));
                            }
                            Err(e) => o.failures.push(format!("{:?}: {e}", start.elapsed())),
                        }
                    }
                })
            })
            .collect();
        Paced {
            start,
            stop,
            outcome,
            tasks,
        }
    }

    /// Time since the load started.
    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }

    /// Stops sending; requests in flight complete first.
    pub async fn finish(self) -> PacedOutcome {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            let _ = t.await;
        }
        let mut o = self
            .outcome
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        o.answers.sort();
        o.answered_by.sort();
        o
    }
}
