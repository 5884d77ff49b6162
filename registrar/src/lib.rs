//! Baker's registrar: probes apps and keeps each registered in the directory while, and only
//! while, it is healthy. Beside one app it is a sidecar (`BAKER_SERVICE`); on a host without
//! Docker one registrar announces every service of a file (`BAKER_CONFIG`).
//!
//! Each service has a task of its own, so that one that fails or hangs never delays another.
//! Two loops run side by side in it: the probe loop checks the app every interval and feeds
//! the rise/fall state machine; the registration loop follows the resulting status over a
//! `watch` channel, registering and heartbeating while the app is up, deregistering as soon as
//! it is down, and retrying forever while the directory is away. A stopping registrar
//! deregisters every service, all at once, before it returns, so the instances drain before
//! the apps stop.
//!
//! - [`config`]: `BAKER_*` variables and Docker-link variables into a [`Config`].
//! - [`services`]: the services to announce, from the variables and the `BAKER_CONFIG` file.
//! - [`target`]: the app's address (`BAKER_TARGET`, link variables) and the advertised one.
//! - [`probe`]: one HTTP or TCP probe under a timeout.
//! - [`health`]: the pure rise/fall state machine.
//! - [`registration`]: register, heartbeat, deregister, retry.

pub mod config;
pub mod health;
pub mod probe;
pub mod registration;
pub mod services;
pub mod target;

use std::future::Future;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

pub use config::Config;
use health::{Health, Status};
use probe::{ProbeError, Prober};
use registration::{jitter, Registration};

/// What stops the registrar from starting.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot set up the directory client")]
    Client(#[from] baker_client::ClientError),
    #[error("cannot set up the HTTP probe")]
    Probe(#[from] reqwest::Error),
}

/// Runs the registrar for every service of `configs` until `shutdown` is cancelled; returns
/// once each instance is deregistered (or the directory could not be reached to deregister it
/// within [`registration::STOP_DEADLINE`]). Each service runs in a task and a span of its own.
pub async fn run(configs: Vec<Config>, shutdown: CancellationToken) -> Result<(), RunError> {
    let mut services = Vec::with_capacity(configs.len());
    for config in &configs {
        let prober = Prober::new(config.target.clone(), config.check.clone(), config.timeout)?;
        services.push((config, prober, Registration::new(config)?));
    }
    let tasks = TaskTracker::new();
    for (config, prober, registration) in services {
        let span = tracing::info_span!("service", name = %registration.name());
        tasks.spawn(
            run_service(config.clone(), prober, registration, shutdown.clone()).instrument(span),
        );
    }
    tasks.close();
    tasks.wait().await;
    tracing::info!("stopped");
    Ok(())
}

/// Probes and registers one service until `shutdown`, then deregisters it.
async fn run_service(
    config: Config,
    prober: Prober,
    registration: Registration,
    shutdown: CancellationToken,
) {
    let name = registration.name();
    tracing::info!(
        "registrar for {name}: probing {} ({}) every {:?} with timeout {:?}, rise {}, fall {}; \
         target from {}; advertising {}{}; directory {}",
        prober.url(),
        config.check,
        config.interval,
        config.timeout,
        config.rise,
        config.fall,
        config.target_from,
        config.advertise.authority(),
        if config.advertise.resolve {
            " (the name resolved before each registration)"
        } else {
            ""
        },
        config.directory,
    );
    if let Some(hint) = &config.id_hint {
        tracing::warn!("{hint}");
    }
    let (status_tx, status_rx) = watch::channel(Status::Starting);
    let probing = probe_loop(
        || prober.probe(),
        &name,
        Health::new(config.rise, config.fall),
        config.interval,
        status_tx,
        shutdown.clone(),
    );
    tokio::join!(probing, registration.run(status_rx, shutdown));
}

/// Probes every `interval` (jittered by ±10 %) until `shutdown`, feeding `health`, and
/// publishes each status transition on `status`, logging it once.
pub async fn probe_loop<F, Fut>(
    mut probe: F,
    name: &str,
    mut health: Health,
    interval: Duration,
    status: watch::Sender<Status>,
    shutdown: CancellationToken,
) where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), ProbeError>>,
{
    let mut next = Instant::now();
    loop {
        let result = tokio::select! {
            r = probe() => r,
            () = shutdown.cancelled() => return,
        };
        if let Err(e) = &result {
            tracing::debug!("probe of {name} failed: {e}");
        }
        if let Some(t) = health.observe(result.is_ok()) {
            match (t.to, &result) {
                (Status::Up, _) => tracing::info!("{name} is now up after {} passes", t.after),
                (_, Err(e)) => tracing::warn!("{name} is now down after {} failures: {e}", t.after),
                (_, Ok(())) => tracing::warn!("{name} is now down after {} failures", t.after),
            }
            status.send_replace(t.to);
        }
        next = (next + jitter(interval, 0.9, 1.1)).max(Instant::now());
        tokio::select! {
            () = tokio::time::sleep_until(next) => {}
            () = shutdown.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::rc::Rc;

    use super::*;

    /// Runs the probe loop on a script of outcomes (`+` pass, `-` fail, `h` hang until the
    /// timeout), under paused time; returns when each status was published.
    async fn script(
        outcomes: &'static str,
        rise: u32,
        fall: u32,
        interval: Duration,
        timeout: Duration,
    ) -> (Vec<(Duration, Status)>, Vec<Duration>) {
        let start = Instant::now();
        let calls = Rc::new(RefCell::new(Vec::new()));
        let steps = Rc::new(RefCell::new(outcomes.chars()));
        let (tx, mut rx) = watch::channel(Status::Starting);
        let shutdown = CancellationToken::new();
        let probe = {
            let calls = calls.clone();
            move || {
                calls.borrow_mut().push(start.elapsed());
                let step = steps.borrow_mut().next();
                async move {
                    match step {
                        Some('+') => Ok(()),
                        Some('h') => {
                            // What Prober::probe does with an app that never answers.
                            match tokio::time::timeout(timeout, std::future::pending::<()>()).await
                            {
                                Ok(()) => Ok(()),
                                Err(_) => Err(ProbeError::Timeout(timeout)),
                            }
                        }
                        Some(_) => {
                            Err(ProbeError::Status(reqwest::StatusCode::SERVICE_UNAVAILABLE))
                        }
                        // The script is over: nothing more happens.
                        None => std::future::pending().await,
                    }
                }
            }
        };
        let n = outcomes.len() as u32;
        let looping = probe_loop(
            probe,
            "emitter/vm101",
            Health::new(rise, fall),
            interval,
            tx,
            shutdown.clone(),
        );
        let observe = async {
            let mut seen = Vec::new();
            let end = start + interval * (2 * n) + timeout * n;
            loop {
                tokio::select! {
                    r = rx.changed() => {
                        r.unwrap();
                        seen.push((start.elapsed(), *rx.borrow_and_update()));
                    }
                    () = tokio::time::sleep_until(end) => break,
                }
            }
            shutdown.cancel();
            seen
        };
        let ((), seen) = tokio::join!(looping, observe);
        let calls = calls.borrow().clone();
        (seen, calls)
    }

    fn between(d: Duration, lo: f64, hi: f64, interval: Duration) -> bool {
        d >= interval.mul_f64(lo) && d <= interval.mul_f64(hi)
    }

    #[tokio::test(start_paused = true)]
    async fn up_after_rise_passes_down_after_fall_failures() {
        let i = Duration::from_secs(2);
        let (seen, calls) = script("++++---++", 2, 3, i, Duration::from_secs(1)).await;
        let statuses: Vec<_> = seen.iter().map(|(_, s)| *s).collect();
        assert_eq!(statuses, [Status::Up, Status::Down, Status::Up]);
        // Up right after the 2nd probe, down after the 7th, up again after the 9th.
        assert_eq!(seen[0].0, calls[1]);
        assert_eq!(seen[1].0, calls[6]);
        assert_eq!(seen[2].0, calls[8]);
        // The first probe runs at once, then one every interval give or take 10 %.
        assert_eq!(calls[0], Duration::ZERO);
        for pair in calls.windows(2) {
            assert!(between(pair[1] - pair[0], 0.9, 1.1, i), "{calls:?}");
        }
        // ...with some jitter: not all the same.
        assert!(
            calls.windows(2).map(|p| p[1] - p[0]).any(|d| d != i),
            "{calls:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_hung_probe_counts_as_a_failure_after_its_timeout() {
        let i = Duration::from_millis(200);
        let t = Duration::from_millis(500);
        let (seen, calls) = script("++hh", 2, 2, i, t).await;
        let statuses: Vec<_> = seen.iter().map(|(_, s)| *s).collect();
        assert_eq!(statuses, [Status::Up, Status::Down]);
        // The second hung probe ended with its timeout, and the next probe followed at once
        // (the probe took longer than the interval).
        assert_eq!(seen[1].0, calls[3] + t);
        assert_eq!(calls[3], calls[2] + t);
    }

    #[tokio::test(start_paused = true)]
    async fn starting_apps_that_never_pass_go_down_once() {
        let (seen, _) = script(
            "------",
            2,
            2,
            Duration::from_secs(1),
            Duration::from_secs(1),
        )
        .await;
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].1, Status::Down);
    }
}
