//! Scenario 4, rolling restart: six instances, each an app with its registrar, replaced one by
//! one under steady load (registrar SIGTERM, which deregisters; app stop; new app and
//! registrar; wait until the new one is up), counting failed requests out of the total.

use std::time::Duration;

use anyhow::{bail, Context};
use baker_tests::Proc;
use serde_json::json;
use tokio::time::Instant;

use crate::daemons::{self, Ambassador, Probe};
use crate::load::{Background, Target};
use crate::report::{ms, Check, Report, Table};
use crate::scenario::Ctx;

const SERVICE: &str = "rolling";
const INSTANCES: usize = 6;

struct Member {
    app: Proc,
    registrar: Proc,
}

/// Starts an app and its registrar and waits until the registrar reports it up.
async fn member(ctx: &Ctx, dir_url: &str, id: &str, probe: Probe) -> anyhow::Result<Member> {
    let (app, addr) = daemons::greeting(&ctx.bins, id, "1").await?;
    let mut registrar = daemons::registrar(&ctx.bins, dir_url, SERVICE, id, "1", addr, probe)?;
    registrar
        .wait_for_log("is now up", Duration::from_secs(20))
        .await;
    Ok(Member { app, registrar })
}

pub async fn run(ctx: &Ctx) -> anyhow::Result<Report> {
    let rate = ctx.pick(1000.0, 500.0);
    let passes = ctx.pick(3, 1);
    let probe = Probe {
        interval: Duration::from_millis(500),
        rise: 2,
        fall: 2,
    };
    let data = tempfile::tempdir()?;
    let (mut dir, dir_url) = daemons::directory(&ctx.bins, data.path(), false).await?;
    let mut members = Vec::new();
    for i in 0..INSTANCES {
        members.push(member(ctx, &dir_url, &format!("r{i}-0"), probe).await?);
    }
    let mut amb = Ambassador::start(&ctx.bins, &dir_url, &[SERVICE], false).await?;
    let target = Target::get(amb.addr(SERVICE), "/greeting");
    daemons::wait_ready(&target, Duration::from_secs(30)).await?;
    let reloads_before = amb.reloads().await.ok();

    let load = Background::start(target, rate, 16);
    let started = Instant::now();
    let mut replaced = 0;
    let mut step_times = Vec::new();
    for pass in 1..=passes {
        for (i, m) in members.iter_mut().enumerate() {
            let step = Instant::now();
            // The registrar deregisters on SIGTERM before it exits...
            m.registrar.term();
            let deadline = Instant::now() + Duration::from_secs(15);
            while m.registrar.try_status().is_none() {
                if Instant::now() > deadline {
                    bail!("registrar of r{i} did not exit within 15 s of SIGTERM");
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            // ...then the app stops at once, as an orchestrator would stop its container.
            daemons::stop(&mut m.app, Duration::from_secs(15)).await;
            *m = member(ctx, &dir_url, &format!("r{i}-{pass}"), probe)
                .await
                .with_context(|| format!("starting the replacement of r{i}"))?;
            replaced += 1;
            step_times.push(step.elapsed().as_secs_f64());
        }
    }
    // A moment for the last replacement to take traffic.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let outcome = load.finish().await;
    let seconds = started.elapsed().as_secs_f64();
    let reloads = match (reloads_before, amb.reloads().await.ok()) {
        (Some(a), Some(b)) => Some(b.saturating_sub(a)),
        _ => None,
    };
    for m in members.iter_mut() {
        daemons::stop(&mut m.registrar, Duration::from_secs(10)).await;
        daemons::stop(&mut m.app, Duration::from_secs(10)).await;
    }
    daemons::stop(&mut amb.proc, Duration::from_secs(15)).await;
    daemons::stop(&mut dir, Duration::from_secs(10)).await;

    let r = outcome.report();
    let total = r.ok + r.failed;
    let mut text = format!(
        "{INSTANCES} instances replaced one by one, {passes} pass(es) ({replaced} replacements) in \
         {seconds:.1} s under {rate:.0} req/s open-loop load; registrar interval {:?}, rise {}, fall {}\n",
        probe.interval, probe.rise, probe.fall
    );
    let mut t = Table::new(&[
        "requests",
        "failed",
        "failed by reason",
        "p50 ms",
        "p99 ms",
        "p99.9 ms",
        "reloads",
    ]);
    t.row(vec![
        total.to_string(),
        r.failed.to_string(),
        format!("{:?}", r.failed_by_reason),
        ms(r.latency.p50_ms),
        ms(r.latency.p99_ms),
        ms(r.latency.p999_ms),
        reloads.map_or("?".into(), |n| n.to_string()),
    ]);
    text += &t.render();
    let checks = vec![
        Check::new(
            "rolling restart: failed requests",
            "0",
            format!("{} of {total}", r.failed),
            r.failed == 0,
        ),
        Check::new(
            "rolling restart: HAProxy reloads",
            "0",
            reloads.map_or("unknown".into(), |n| n.to_string()),
            reloads == Some(0),
        ),
    ];
    Ok(Report {
        scenario: "rolling".into(),
        quick: ctx.quick,
        text,
        checks,
        data: json!({
            "instances": INSTANCES,
            "passes": passes,
            "replacements": replaced,
            "seconds": seconds,
            "replacement_seconds": step_times,
            "rate": rate,
            "load": r,
            "reloads": reloads,
        }),
    })
}
