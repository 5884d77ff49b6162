//! Scenario 2, convergence: how long after the registrar decides does HAProxy route
//! accordingly. Three measures, each over many trials:
//!
//! - (a) the registrar logs `is now up` → the first request answered by that instance;
//! - (b) the registrar logs `is now down` (and deregisters) → the last request answered by it;
//! - (c) a route is changed (`PUT /v1/routes`) → the new split is in effect (first answer from
//!   the new version, and no answer from the old one after that).
//!
//! Times on both sides are wall-clock: the registrar's log timestamp and the receipt time of
//! each answer seen by a prober that sends requests back to back through the ambassador.
//! The same (a) and (b) for a labelled container found by the directory's Docker discovery;
//! and, in [`api`], the same changes made straight through the directory's API, side by side
//! with an earlier build, cut into stages.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context};
use baker_client::DirectoryClient;
use baker_tests::Proc;
use serde::Deserialize;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::daemons::{self, Ambassador, Probe};
use crate::load::{Conn, Target};
use crate::report::{ms, Check, Report, Table};
use crate::scenario::docker;
use crate::scenario::Ctx;
use crate::stats::{Samples, Summary};

mod api;

const SERVICE: &str = "greeting";
/// After the last answer from an instance, this long without another means it gets no more.
const QUIET: Duration = Duration::from_millis(400);
/// Longest any one trial may take to converge before it counts as a failure.
const TRIAL_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Deserialize)]
struct Greeting {
    instance: String,
    version: String,
}

/// Answers seen by the prober: receipt time per instance and per version.
#[derive(Default)]
struct Seen {
    by_instance: BTreeMap<String, Vec<SystemTime>>,
    by_version: BTreeMap<String, Vec<SystemTime>>,
    failed: u64,
    failed_by_reason: BTreeMap<String, u64>,
    ok: u64,
}

/// Sends requests back to back over `conns` connections and records who answered when.
struct Prober {
    seen: Arc<Mutex<Seen>>,
    stop: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Prober {
    fn start(addr: SocketAddr, conns: usize) -> Prober {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let stop = CancellationToken::new();
        let tasks = (0..conns)
            .map(|_| {
                let (seen, stop) = (seen.clone(), stop.clone());
                tokio::spawn(async move {
                    let target = Target::get(addr, "/greeting");
                    let mut conn = Conn::new(addr);
                    while !stop.is_cancelled() {
                        let result = conn.call(&target).await;
                        let now = SystemTime::now();
                        let reason = match &result {
                            Ok((s, _)) if s.is_success() => None,
                            Ok((s, _)) => Some(format!("http {}", s.as_u16())),
                            Err(e) => Some(e.to_string()),
                        };
                        let parsed = result
                            .ok()
                            .filter(|(s, _)| s.is_success())
                            .and_then(|(_, b)| serde_json::from_slice::<Greeting>(&b).ok());
                        {
                            let mut s = seen.lock().unwrap_or_else(|p| p.into_inner());
                            match parsed {
                                Some(g) => {
                                    s.ok += 1;
                                    s.by_instance.entry(g.instance).or_default().push(now);
                                    s.by_version.entry(g.version).or_default().push(now);
                                }
                                None => {
                                    s.failed += 1;
                                    let why = reason.unwrap_or_else(|| "unreadable body".into());
                                    *s.failed_by_reason.entry(why).or_default() += 1;
                                }
                            }
                        }
                        // A short pause keeps the prober from starving the daemons it measures
                        // on a small machine, while resolving times to about a millisecond.
                        tokio::time::sleep(Duration::from_micros(500)).await;
                    }
                })
            })
            .collect();
        Prober { seen, stop, tasks }
    }

    fn first_after(&self, key: Key, who: &str, after: SystemTime) -> Option<SystemTime> {
        let s = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        key.pick(&s, who)?.iter().copied().find(|&t| t >= after)
    }

    fn last(&self, key: Key, who: &str) -> Option<SystemTime> {
        let s = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        key.pick(&s, who)?.last().copied()
    }

    fn failed(&self) -> (u64, u64, BTreeMap<String, u64>) {
        let s = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        (s.ok, s.failed, s.failed_by_reason.clone())
    }

    async fn finish(self) {
        self.stop.cancel();
        for t in self.tasks {
            let _ = t.await;
        }
    }

    /// Waits for the first answer from `who` at or after `after`.
    async fn wait_first(&self, key: Key, who: &str, after: SystemTime) -> Option<SystemTime> {
        let deadline = Instant::now() + TRIAL_TIMEOUT;
        while Instant::now() < deadline {
            if let Some(t) = self.first_after(key, who, after) {
                return Some(t);
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        None
    }

    /// Waits until `who` has answered nothing for [`QUIET`], and returns its last answer.
    async fn wait_last(&self, key: Key, who: &str) -> Option<Option<SystemTime>> {
        let deadline = Instant::now() + TRIAL_TIMEOUT;
        while Instant::now() < deadline {
            let last = self.last(key, who);
            let quiet = last.is_none_or(|t| t.elapsed().unwrap_or_default() >= QUIET);
            if quiet {
                return Some(last);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }
}

#[derive(Clone, Copy)]
enum Key {
    Instance,
    Version,
}

impl Key {
    fn pick<'a>(self, s: &'a Seen, who: &str) -> Option<&'a Vec<SystemTime>> {
        match self {
            Key::Instance => s.by_instance.get(who),
            Key::Version => s.by_version.get(who),
        }
    }
}

fn millis_between(from: SystemTime, to: SystemTime) -> f64 {
    match to.duration_since(from) {
        Ok(d) => d.as_secs_f64() * 1e3,
        Err(e) => -(e.duration().as_secs_f64() * 1e3),
    }
}

/// Waits for the `n`-th log line of `proc` containing `needle`; returns when it was written.
async fn nth_log(proc: &Proc, needle: &str, n: usize) -> anyhow::Result<SystemTime> {
    let deadline = Instant::now() + TRIAL_TIMEOUT;
    loop {
        let lines: Vec<String> = proc
            .log()
            .into_iter()
            .filter(|l| l.contains(needle))
            .collect();
        if let Some(line) = lines.get(n - 1) {
            // The registrar's own timestamp; failing that, when the line was noticed.
            return Ok(daemons::log_time(line).unwrap_or_else(SystemTime::now));
        }
        if Instant::now() > deadline {
            bail!(
                "{} did not log {needle:?} a {n}th time within {TRIAL_TIMEOUT:?}; its log ends:\n{}",
                proc.name,
                proc.log().iter().rev().take(10).rev().cloned().collect::<Vec<_>>().join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn set_health(app: SocketAddr, state: &str) -> anyhow::Result<()> {
    let mut conn = Conn::new(app);
    let req = hyper::Request::put("/control/health")
        .header(hyper::header::HOST, app.to_string())
        .body(http_body_util::Full::new(bytes::Bytes::from(
            state.to_owned(),
        )))?;
    let (status, body) = conn.send(req).await.context("setting the app's health")?;
    if !status.is_success() {
        bail!(
            "PUT /control/health {state}: {status} {}",
            String::from_utf8_lossy(&body)
        );
    }
    Ok(())
}

/// Measures of one kind.
struct Measure {
    name: &'static str,
    samples: Samples,
    /// Trials that did not converge within [`TRIAL_TIMEOUT`].
    timeouts: u64,
}

impl Measure {
    fn new(name: &'static str) -> Self {
        Measure {
            name,
            samples: Samples::new(),
            timeouts: 0,
        }
    }
}

pub async fn run(ctx: &Ctx) -> anyhow::Result<Report> {
    let trials = ctx.pick(200, 15);
    let probe = Probe {
        interval: Duration::from_millis(200),
        rise: 2,
        fall: 2,
    };
    let data = tempfile::tempdir()?;
    let (mut dir, dir_url) = daemons::directory(&ctx.bins, data.path(), false).await?;
    let client = DirectoryClient::new(&dir_url, None)?;
    let (mut base, base_addr) = daemons::greeting(&ctx.bins, "base", "1").await?;
    let mut base_reg =
        daemons::registrar(&ctx.bins, &dir_url, SERVICE, "base", "1", base_addr, probe)?;
    let (mut trial, trial_addr) = daemons::greeting(&ctx.bins, "trial", "1").await?;
    let mut trial_reg = daemons::registrar(
        &ctx.bins, &dir_url, SERVICE, "trial", "1", trial_addr, probe,
    )?;
    let mut amb = Ambassador::start(&ctx.bins, &dir_url, &[SERVICE], false).await?;
    let entry = amb.addr(SERVICE);
    daemons::wait_ready(&Target::get(entry, "/greeting"), Duration::from_secs(30)).await?;

    let prober = Prober::start(entry, 2);
    let mut up = Measure::new("(a) registrar up -> first request routed");
    let mut down = Measure::new("(b) registrar down -> last request routed");
    let mut route = Measure::new("(c) route change -> new split in effect");
    // The trial instance starts healthy: wait for its first `is now up` and its first answer.
    let t0 = nth_log(&trial_reg, "is now up", 1).await?;
    prober
        .wait_first(Key::Instance, "trial", t0)
        .await
        .context("the trial instance never received a request")?;
    let (mut ups, mut downs) = (1, 0);
    for _ in 0..trials {
        set_health(trial_addr, "fail").await?;
        downs += 1;
        let t0 = nth_log(&trial_reg, "is now down", downs).await?;
        match prober.wait_last(Key::Instance, "trial").await {
            Some(Some(last)) => down.samples.push_ms(millis_between(t0, last).max(0.0)),
            Some(None) => down.samples.push_ms(0.0),
            None => down.timeouts += 1,
        }
        set_health(trial_addr, "ok").await?;
        ups += 1;
        let t0 = nth_log(&trial_reg, "is now up", ups).await?;
        match prober.wait_first(Key::Instance, "trial", t0).await {
            Some(first) => up.samples.push_ms(millis_between(t0, first)),
            None => up.timeouts += 1,
        }
    }

    // (c): a version-2 instance joins; the route flips between all-1 and all-2.
    let (mut v2, v2_addr) = daemons::greeting(&ctx.bins, "v2", "2").await?;
    let mut v2_reg = daemons::registrar(&ctx.bins, &dir_url, SERVICE, "v2", "2", v2_addr, probe)?;
    let t0 = nth_log(&v2_reg, "is now up", 1).await?;
    prober
        .wait_first(Key::Instance, "v2", t0)
        .await
        .context("the version-2 instance never received a request")?;
    for i in 0..trials {
        let (new, old) = if i % 2 == 0 { ("2", "1") } else { ("1", "2") };
        let splits: BTreeMap<String, u64> = [(new.to_owned(), 100)].into();
        let t0 = SystemTime::now();
        client
            .set_route(SERVICE, &splits)
            .await
            .context("setting a route")?;
        let first = prober.wait_first(Key::Version, new, t0).await;
        let last_old = prober.wait_last(Key::Version, old).await;
        match (first, last_old) {
            (Some(first), Some(last_old)) => {
                let effect = last_old.map_or(first, |l| l.max(first));
                route.samples.push_ms(millis_between(t0, effect).max(0.0));
            }
            _ => route.timeouts += 1,
        }
    }
    let (probe_ok, probe_failed, probe_reasons) = prober.failed();
    prober.finish().await;

    let api_builds = api::run(&ctx.bins, ctx.baseline.as_ref(), trials).await?;

    let docker_result = docker::convergence(ctx, trials.min(ctx.pick(20, 5))).await;

    for p in [
        &mut trial_reg,
        &mut base_reg,
        &mut v2_reg,
        &mut amb.proc,
        &mut trial,
        &mut base,
        &mut v2,
        &mut dir,
    ] {
        daemons::stop(p, Duration::from_secs(10)).await;
    }

    let mut text = format!(
        "{trials} trials each; registrar interval {:?}, rise {}, fall {} (its own delay is excluded: \
         times start at its `is now up`/`is now down` log line)\n",
        probe.interval, probe.rise, probe.fall
    );
    let mut t = Table::new(&[
        "measure", "trials", "p50 ms", "p99 ms", "max ms", "timeouts",
    ]);
    let mut rows: Vec<(String, Summary, u64)> = Vec::new();
    for m in [&up, &down, &route] {
        rows.push((m.name.to_owned(), m.samples.summary(), m.timeouts));
    }
    let docker_rows = match &docker_result {
        Ok(d) => {
            rows.push((d.up.name.to_owned(), d.up.samples.summary(), d.up.timeouts));
            rows.push((
                d.down.name.to_owned(),
                d.down.samples.summary(),
                d.down.timeouts,
            ));
            rows.push((
                "docker: start -> healthy (HEALTHCHECK delay, excluded above)".to_owned(),
                d.health_wait,
                0,
            ));
            None
        }
        Err(why) => Some(why.to_string()),
    };
    for (name, s, timeouts) in &rows {
        t.row(vec![
            name.clone(),
            s.count.to_string(),
            ms(s.p50_ms),
            ms(s.p99_ms),
            ms(s.max_ms),
            timeouts.to_string(),
        ]);
    }
    text += &t.render();
    text +=
        &format!("prober: {probe_ok} answers, {probe_failed} failed requests during the trials {probe_reasons:?}\n");
    if let Some(why) = &docker_rows {
        text += &format!("docker-labelled container: not measured ({why})\n");
    }

    let (api_text, api_checks, api_data) = api::report(&api_builds);
    text += "\n";
    text += &api_text;

    let (us, ds, rs) = (
        up.samples.summary(),
        down.samples.summary(),
        route.samples.summary(),
    );
    let mut checks = vec![
        Check::new(
            "convergence (a) up -> routed, p99 beyond rise delay",
            "<= 250 ms",
            format!("{:.1} ms (timeouts {})", us.p99_ms, up.timeouts),
            us.p99_ms <= 250.0 && up.timeouts == 0,
        ),
        Check::new(
            "convergence (b) down -> unrouted, p99 beyond fall delay",
            "<= 250 ms",
            format!("{:.1} ms (timeouts {})", ds.p99_ms, down.timeouts),
            ds.p99_ms <= 250.0 && down.timeouts == 0,
        ),
        Check::new(
            "convergence (c) route change -> in effect, p99",
            "<= 100 ms",
            format!("{:.1} ms (timeouts {})", rs.p99_ms, route.timeouts),
            rs.p99_ms <= 100.0 && route.timeouts == 0,
        ),
    ];
    match &docker_result {
        Ok(d) => {
            let (a, b) = (d.up.samples.summary(), d.down.samples.summary());
            checks.push(Check::new(
                "convergence docker (a) container healthy -> routed, p99",
                "<= 250 ms",
                format!("{:.1} ms", a.p99_ms),
                a.p99_ms <= 250.0 && d.up.timeouts == 0,
            ));
            checks.push(Check::new(
                "convergence docker (b) container stopped -> unrouted, p99",
                "<= 250 ms",
                format!("{:.1} ms", b.p99_ms),
                b.p99_ms <= 250.0 && d.down.timeouts == 0,
            ));
        }
        Err(why) => checks.push(Check::not_measured(
            "convergence docker (a), (b)",
            "<= 250 ms",
            &why.to_string(),
        )),
    }
    checks.extend(api_checks);
    let data = json!({
        "api": api_data,
        "trials": trials,
        "registrar": {"interval_ms": probe.interval.as_millis() as u64, "rise": probe.rise, "fall": probe.fall},
        "up_to_first_routed": {"latency": us, "timeouts": up.timeouts},
        "down_to_last_routed": {"latency": ds, "timeouts": down.timeouts},
        "route_change_in_effect": {"latency": rs, "timeouts": route.timeouts},
        "prober": {"ok": probe_ok, "failed": probe_failed, "failed_by_reason": probe_reasons},
        "docker": match &docker_result {
            Ok(d) => json!({
                "trials": d.trials,
                "healthy_to_first_routed": {"latency": d.up.samples.summary(), "timeouts": d.up.timeouts},
                "start_to_healthy": d.health_wait,
                "stop_to_last_routed": {"latency": d.down.samples.summary(), "timeouts": d.down.timeouts},
            }),
            Err(why) => json!({"not_measured": why.to_string()}),
        },
    });
    Ok(Report {
        scenario: "convergence".into(),
        quick: ctx.quick,
        text,
        checks,
        data,
    })
}

/// Figures of the Docker-labelled variant.
pub struct DockerConvergence {
    pub trials: usize,
    up: Measure,
    down: Measure,
    /// From `docker start` to the first passing HEALTHCHECK (0 without one): excluded from (a).
    health_wait: Summary,
}

/// The Docker variant's trial loop, given a running container set-up (see [`docker`]).
pub async fn docker_trials(
    entry: SocketAddr,
    trials: usize,
    container: &docker::Container,
) -> anyhow::Result<DockerConvergence> {
    let prober = Prober::start(entry, 2);
    let mut up = Measure::new("docker (a) container started (healthy) -> first request routed");
    let mut health_wait = Samples::new();
    let mut down = Measure::new("docker (b) container stop issued -> last request routed");
    let instance = container.instance.as_str();
    for _ in 0..trials {
        let t0 = SystemTime::now();
        container.start().await?;
        match prober.wait_first(Key::Instance, instance, t0).await {
            Some(first) => {
                // With a HEALTHCHECK the directory waits for `healthy`, as it should: the time
                // then counts from the passing probe, the Docker analogue of `is now up`.
                let from = container.healthy_since(t0).await.unwrap_or(t0);
                health_wait.push_ms(millis_between(t0, from));
                up.samples.push_ms(millis_between(from, first));
            }
            None if up.samples.is_empty() => {
                container.stop().await?;
                prober.finish().await;
                bail!(
                    "the labelled container was never routed within {TRIAL_TIMEOUT:?} of its \
                     start (Docker discovery missing, or the container unreachable from the host)"
                );
            }
            None => up.timeouts += 1,
        }
        let t0 = SystemTime::now();
        container.stop().await?;
        match prober.wait_last(Key::Instance, instance).await {
            Some(Some(last)) => down.samples.push_ms(millis_between(t0, last).max(0.0)),
            Some(None) => down.samples.push_ms(0.0),
            None => down.timeouts += 1,
        }
    }
    prober.finish().await;
    Ok(DockerConvergence {
        trials,
        up,
        down,
        health_wait: health_wait.summary(),
    })
}
