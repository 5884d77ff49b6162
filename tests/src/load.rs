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
