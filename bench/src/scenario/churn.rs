//! Scenario 3, churn: 40 instances flapping (each registered and deregistered twice a second,
//! half of them up at any moment) under steady open-loop load through the ambassador. Counts
//! failed requests and HAProxy reloads, and samples the ambassador's CPU and RSS from /proc.
//! Run as built, then with `BAKER_BENCH_FORCE_RELOAD=1` (a reload on every change). With
//! `--baseline-bin-dir`, the as-built period is cut into rounds that alternate between this build
//! and the baseline (this, baseline; baseline, this; ...), so both see the machine's load alike,
//! and HAProxy's CPU is compared round by round.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use anyhow::Context;
use baker_client::{DirectoryClient, InstanceSpec};
use serde::Serialize;
use serde_json::json;
use tokio::time::Instant;

use crate::daemons::{self, Ambassador, Bins};
use crate::load::{Background, LoadReport, Target};
use crate::procfs::{Footprint, Sampler};
use crate::report::{ms, Check, Report, Table};
use crate::scenario::Ctx;
use crate::stats::median;

const SERVICE: &str = "churn";
pub const INSTANCES: usize = 40;
/// Changes per second per instance.
pub const CHANGES_PER_SECOND: f64 = 2.0;
/// Greeting processes behind the 40 instances; instance `i` is 127.0.0.(10 + i) on the port of
/// process `i % APPS` (loopback answers on all of 127/8), so every instance is a distinct
/// `address:port` HAProxy really connects to.
const APPS: usize = 4;

/// What one churn run measured.
#[derive(Debug, Clone, Serialize)]
pub struct ChurnResult {
    pub force_reload: bool,
    pub seconds: f64,
    pub changes: u64,
    pub change_errors: u64,
    pub changes_per_second: f64,
    pub load: LoadReport,
    pub reloads: Option<u64>,
    pub ambassador: Footprint,
    pub haproxy: Footprint,
    pub directory: Footprint,
    pub ambassador_rss_idle_mib: f64,
}

/// Runs one churn period of `duration` at `rate` requests per second.
pub async fn churn(
    bins: &Bins,
    force_reload: bool,
    duration: Duration,
    rate: f64,
) -> anyhow::Result<ChurnResult> {
    let data = tempfile::tempdir()?;
    let (mut dir, dir_url) = daemons::directory(bins, data.path(), false).await?;
    let client = DirectoryClient::new(&dir_url, None)?;
    let mut apps = Vec::new();
    for i in 0..APPS {
        apps.push(daemons::greeting(bins, &format!("c{i}"), "1").await?);
    }
    let spec = |i: usize| InstanceSpec {
        address: IpAddr::V4(Ipv4Addr::new(127, 0, 0, 10 + i as u8)).to_string(),
        port: u64::from(apps[i % APPS].1.port()),
        version: None,
        weight: None,
        tags: Vec::new(),
        ttl_ms: Some(10_000),
        zone: None,
    };
    let id = |i: usize| format!("i{i:02}");
    // Even instances start up, odd ones down, so that about half are up at every moment.
    let mut up = [false; INSTANCES];
    for (i, state) in up.iter_mut().enumerate() {
        if i % 2 == 0 {
            client.register(SERVICE, &id(i), &spec(i)).await?;
            *state = true;
        }
    }
    let mut amb = Ambassador::start(bins, &dir_url, &[SERVICE], force_reload).await?;
    let target = Target::get(amb.addr(SERVICE), "/greeting");
    daemons::wait_ready(&target, Duration::from_secs(30)).await?;
    // Let the start-up settle before the idle reading.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let ambassador_rss_idle_mib = crate::procfs::usage(amb.proc.pid())
        .map(|u| u.rss_kib as f64 / 1024.0)
        .unwrap_or(0.0);
    let reloads_before = amb.reloads().await.ok();

    let amb_pid = amb.proc.pid();
    let dir_pid = dir.pid();
    let amb_sampler = Sampler::start(Duration::from_millis(250), move || vec![amb_pid]);
    let hap_sampler = Sampler::start(Duration::from_millis(250), move || {
        crate::procfs::descendants(amb_pid)
            .into_iter()
            .filter(|&p| crate::procfs::comm(p).is_some_and(|c| c.starts_with("haproxy")))
            .collect()
    });
    let dir_sampler = Sampler::start(Duration::from_millis(250), move || vec![dir_pid]);
    let load = Background::start(target, rate, 16);

    // One change every `tick`, round-robin over the instances: each changes CHANGES_PER_SECOND.
    let tick = Duration::from_secs_f64(1.0 / (CHANGES_PER_SECOND * INSTANCES as f64));
    let start = Instant::now();
    let (mut changes, mut change_errors) = (0u64, 0u64);
    let mut k = 0usize;
    while start.elapsed() < duration {
        tokio::time::sleep_until(start + tick.mul_f64(k as f64)).await;
        let i = k % INSTANCES;
        let result = if up[i] {
            client.deregister(SERVICE, &id(i)).await.map(|_| ())
        } else {
            client.register(SERVICE, &id(i), &spec(i)).await.map(|_| ())
        };
        match result {
            Ok(()) => up[i] = !up[i],
            Err(e) => {
                change_errors += 1;
                tracing::warn!("churn change failed: {e}");
            }
        }
        changes += 1;
        k += 1;
    }
    let seconds = start.elapsed().as_secs_f64();
    let outcome = load.finish().await;
    let (ambassador, haproxy, directory) = (
        amb_sampler.finish().await,
        hap_sampler.finish().await,
        dir_sampler.finish().await,
    );
    let reloads_after = amb.reloads().await.ok();
    let reloads = match (reloads_before, reloads_after) {
        (Some(a), Some(b)) => Some(b.saturating_sub(a)),
        _ => None,
    };
    daemons::stop(&mut amb.proc, Duration::from_secs(15)).await;
    daemons::stop(&mut dir, Duration::from_secs(10)).await;
    for (p, _) in apps.iter_mut() {
        daemons::stop(p, Duration::from_secs(10)).await;
    }
    Ok(ChurnResult {
        force_reload,
        seconds,
        changes,
        change_errors,
        changes_per_second: changes as f64 / seconds.max(1e-9),
        load: outcome.report(),
        reloads,
        ambassador,
        haproxy,
        directory,
        ambassador_rss_idle_mib,
    })
}

/// Rounds of the as-built period alternating this build and the baseline: each build's
/// results, in round order.
async fn side_by_side(
    this: &Bins,
    baseline: &Bins,
    rounds: u32,
    duration: Duration,
    rate: f64,
) -> anyhow::Result<(Vec<ChurnResult>, Vec<ChurnResult>)> {
    let (mut mine, mut theirs) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        let order = if round % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        };
        for is_this in order {
            let (bins, out, label) = if is_this {
                (this, &mut mine, "this build")
            } else {
                (baseline, &mut theirs, "baseline")
            };
            let r = churn(bins, false, duration / rounds, rate)
                .await
                .with_context(|| format!("churn round {} on {label}", round + 1))?;
            out.push(r);
        }
    }
    Ok((mine, theirs))
}

fn row(t: &mut Table, label: String, r: &ChurnResult) {
    t.row(vec![
        label,
        format!("{:.1}", r.changes_per_second),
        (r.load.ok + r.load.failed).to_string(),
        format!("{} {:?}", r.load.failed, r.load.failed_by_reason),
        ms(r.load.latency.p99_ms),
        ms(r.load.latency.p999_ms),
        r.reloads.map_or("?".into(), |n| n.to_string()),
        format!("{:.1}%", r.ambassador.cpu_cores * 100.0),
        format!("{:.1}", r.ambassador.rss_max_mib),
        format!("{:.1}%", r.haproxy.cpu_cores * 100.0),
        format!("{:.1}", r.haproxy.rss_max_mib),
    ]);
}

pub async fn run(ctx: &Ctx) -> anyhow::Result<Report> {
    let duration = Duration::from_secs(ctx.pick(60, 10));
    let rate = ctx.pick(1000.0, 500.0);
    let (built, baseline) = match &ctx.baseline {
        Some(b) => side_by_side(&ctx.bins, b, ctx.pick(4, 2), duration, rate).await?,
        None => (
            vec![churn(&ctx.bins, false, duration, rate)
                .await
                .context("churn as built")?],
            Vec::new(),
        ),
    };
    let forced = churn(&ctx.bins, true, duration, rate)
        .await
        .context("churn with BAKER_BENCH_FORCE_RELOAD=1")?;

    let mut text = format!(
        "{INSTANCES} instances flapping ({CHANGES_PER_SECOND} changes/s each) for {duration:?} \
         under {rate:.0} req/s open-loop load\n"
    );
    let mut t = Table::new(&[
        "build, mode",
        "changes/s",
        "requests",
        "failed",
        "p99 ms",
        "p99.9 ms",
        "reloads",
        "amb CPU",
        "amb RSS max MiB",
        "haproxy CPU",
        "haproxy RSS max MiB",
    ]);
    let rounds = built.len();
    for (i, r) in built.iter().enumerate() {
        let round = if rounds > 1 {
            format!(", round {}", i + 1)
        } else {
            String::new()
        };
        row(&mut t, format!("this build, as built{round}"), r);
        if let Some(b) = baseline.get(i) {
            row(&mut t, format!("baseline, as built{round}"), b);
        }
    }
    row(&mut t, "this build, forced reloads".into(), &forced);
    text += &t.render();
    text += &format!(
        "with forced reloads (the comparison, not a target): {} reloads, {} failed requests\n",
        forced.reloads.map_or("?".into(), |n| n.to_string()),
        forced.load.failed
    );
    let failed: u64 = built.iter().map(|r| r.load.failed).sum();
    let requests: u64 = built.iter().map(|r| r.load.ok + r.load.failed).sum();
    let reloads: Option<u64> = built.iter().map(|r| r.reloads).sum();
    let mut checks = vec![
        Check::new(
            "churn: failed requests (as built)",
            "0",
            format!("{failed} of {requests}"),
            failed == 0,
        ),
        Check::new(
            "churn: HAProxy reloads for membership changes (as built)",
            "0",
            reloads.map_or("unknown".into(), |n| n.to_string()),
            reloads == Some(0),
        ),
    ];
    let mut cpu = json!(null);
    if !baseline.is_empty() {
        let ratios: Vec<f64> = built
            .iter()
            .zip(&baseline)
            .map(|(a, b)| a.haproxy.cpu_cores / b.haproxy.cpu_cores.max(1e-9))
            .collect();
        let mean = |rs: &[ChurnResult]| {
            rs.iter().map(|r| r.haproxy.cpu_cores).sum::<f64>() / rs.len().max(1) as f64
        };
        let (mine, theirs, ratio) = (mean(&built), mean(&baseline), median(&ratios));
        text += &format!(
            "HAProxy CPU, this build / baseline, per round: {} (median {ratio:.3}); mean {:.1}% against {:.1}%\n",
            ratios.iter().map(|r| format!("{r:.3}")).collect::<Vec<_>>().join(", "),
            mine * 100.0,
            theirs * 100.0,
        );
        let base_failed: u64 = baseline.iter().map(|r| r.load.failed).sum();
        text += &format!("baseline: {base_failed} failed requests\n");
        checks.push(Check::new(
            "churn: HAProxy CPU no more than the baseline",
            "median ratio <= 1.0",
            format!(
                "{ratio:.3} ({:.1}% against {:.1}%)",
                mine * 100.0,
                theirs * 100.0
            ),
            ratio <= 1.0,
        ));
        cpu = json!({"ratios": ratios, "median_ratio": ratio});
    }
    Ok(Report {
        scenario: "churn".into(),
        quick: ctx.quick,
        text,
        checks,
        data: json!({
            "as_built": built,
            "baseline": baseline,
            "haproxy_cpu_vs_baseline": cpu,
            "forced_reload": forced,
        }),
    })
}
