//! Scenario 1, the request path: one greeting instance reached directly, through the
//! ambassador's HAProxy, through a second HAProxy running the ambassador's rendered file with no
//! ambassador beside it, and through a hand-written static HAProxy (the floor), in interleaved
//! rounds (A, B, C, D, A, B, ...) so that drift on a busy machine hits all four alike. The
//! rendered file alone against the floor is what the configuration costs; the ambassador against
//! the rendered file alone is what its periodic work (reading HAProxy's counters) costs.

use std::time::Duration;

use anyhow::Context;
use serde_json::json;

use crate::daemons::{self, Ambassador, Probe};
use crate::haproxy;
use crate::load::{self, Outcome, Target};
use crate::report::{ms, Check, Report, Table};
use crate::scenario::Ctx;
use crate::stats::{median, ratio, Samples};

const SERVICE: &str = "greeting";

struct Variant {
    name: &'static str,
    target: Target,
    closed_rps: Vec<f64>,
    closed: Samples,
    closed_failed: u64,
    open: Samples,
    open_failed: u64,
    open_rps: Vec<f64>,
    open_p99: Vec<f64>,
}

impl Variant {
    fn new(name: &'static str, target: Target) -> Self {
        Variant {
            name,
            target,
            closed_rps: Vec::new(),
            closed: Samples::new(),
            closed_failed: 0,
            open: Samples::new(),
            open_failed: 0,
            open_rps: Vec::new(),
            open_p99: Vec::new(),
        }
    }
}

pub async fn run(ctx: &Ctx) -> anyhow::Result<Report> {
    let rounds = ctx.pick(5, 2);
    let slice = Duration::from_secs(ctx.pick(4, 1));
    let conns = 16;
    let open_conns = 64;

    let data = tempfile::tempdir()?;
    let (mut app, app_addr) = daemons::greeting(&ctx.bins, "g1", "1").await?;
    let (mut dir, dir_url) = daemons::directory(&ctx.bins, data.path(), false).await?;
    let probe = Probe {
        interval: Duration::from_millis(200),
        rise: 1,
        fall: 1,
    };
    let mut reg = daemons::registrar(&ctx.bins, &dir_url, SERVICE, "g1", "1", app_addr, probe)?;
    let mut amb = Ambassador::start(&ctx.bins, &dir_url, &[SERVICE], false).await?;

    let run_dir = tempfile::tempdir()?;
    let floor_addr = std::net::SocketAddr::from(([127, 0, 0, 1], baker_tests::free_port()));
    let cfg = run_dir.path().join("static.cfg");
    std::fs::write(&cfg, haproxy::static_config(floor_addr, app_addr))?;
    let mut floor = haproxy::spawn_static(&ctx.bins.haproxy, &cfg);
    let rendered = std::fs::read_to_string(amb.run_dir.path().join("haproxy.cfg"))
        .context("reading the ambassador's rendered file")?;
    let copy_addr = std::net::SocketAddr::from(([127, 0, 0, 1], baker_tests::free_port()));
    let copy_cfg = run_dir.path().join("rendered.cfg");
    std::fs::write(
        &copy_cfg,
        haproxy::standalone_copy(&rendered, SERVICE, copy_addr, run_dir.path()),
    )?;
    let mut copy = haproxy::spawn_static(&ctx.bins.haproxy, &copy_cfg);

    let mut variants = vec![
        Variant::new("direct", Target::get(app_addr, "/greeting")),
        Variant::new("ambassador", Target::get(amb.addr(SERVICE), "/greeting")),
        Variant::new("static haproxy", Target::get(floor_addr, "/greeting")),
        Variant::new(
            "rendered file, no ambassador",
            Target::get(copy_addr, "/greeting"),
        ),
    ];
    for v in &variants {
        daemons::wait_ready(&v.target, Duration::from_secs(30))
            .await
            .with_context(|| format!("waiting for the {} path", v.name))?;
    }
    // Warm up every path (connections, allocator, caches) before measuring.
    for v in &variants {
        load::closed_loop(&v.target, conns, Duration::from_millis(500)).await;
    }

    for _ in 0..rounds {
        for v in variants.iter_mut() {
            let o: Outcome = load::closed_loop(&v.target, conns, slice).await;
            v.closed_rps.push(o.rps());
            v.closed_failed += o.failed_total();
            v.closed.extend(o.latency);
        }
    }
    // Open-loop latency at a fifth of the slowest path's closed-loop throughput: a load every
    // path sustains with room to spare on a shared machine, so the percentiles show the path's
    // cost rather than queueing at saturation.
    let slowest = variants
        .iter()
        .map(|v| median(&v.closed_rps))
        .fold(f64::INFINITY, f64::min);
    let rate = (slowest * 0.2 / 100.0).floor().max(1.0) * 100.0;
    for _ in 0..rounds {
        for v in variants.iter_mut() {
            let o = load::open_loop(&v.target, rate, slice, open_conns).await;
            v.open_rps.push(o.rps());
            v.open_p99.push(o.latency.summary().p99_ms);
            v.open_failed += o.failed_total();
            v.open.extend(o.latency);
        }
    }

    // Cross-check with Debian's wrk, one interleaved round per path.
    let mut wrk_rows = Vec::new();
    for v in &variants {
        let url = format!("http://{}/greeting", v.target.addr);
        wrk_rows.push((
            v.name,
            load::wrk(&url, conns, slice.max(Duration::from_secs(2))).await,
        ));
    }

    for p in [
        &mut reg,
        &mut amb.proc,
        &mut floor,
        &mut copy,
        &mut dir,
        &mut app,
    ] {
        daemons::stop(p, Duration::from_secs(10)).await;
    }

    let floor_v = &variants[2];
    let amb_v = &variants[1];
    let copy_v = &variants[3];
    let (floor_rps, amb_rps) = (median(&floor_v.closed_rps), median(&amb_v.closed_rps));
    let (floor_open, amb_open) = (floor_v.open.summary(), amb_v.open.summary());
    let mut text = format!(
        "closed loop: {conns} keep-alive connections, {rounds} interleaved rounds of {slice:?} per path\n"
    );
    let mut t = Table::new(&[
        "path",
        "req/s (median)",
        "x floor",
        "p50 ms",
        "p99 ms",
        "p99.9 ms",
        "failed",
    ]);
    for v in &variants {
        let s = v.closed.summary();
        t.row(vec![
            v.name.into(),
            format!("{:.0}", median(&v.closed_rps)),
            format!("{:.3}", ratio(median(&v.closed_rps), floor_rps)),
            ms(s.p50_ms),
            ms(s.p99_ms),
            ms(s.p999_ms),
            v.closed_failed.to_string(),
        ]);
    }
    text += &t.render();
    text += &format!(
        "\nopen loop: {rate:.0} req/s scheduled (a fifth of the slowest path's throughput), latency from the scheduled send time\n"
    );
    let mut t = Table::new(&[
        "path",
        "req/s",
        "p50 ms",
        "p99 ms",
        "p99.9 ms",
        "p99 - floor ms",
        "failed",
    ]);
    for v in &variants {
        let s = v.open.summary();
        t.row(vec![
            v.name.into(),
            format!("{:.0}", median(&v.open_rps)),
            ms(s.p50_ms),
            ms(s.p99_ms),
            ms(s.p999_ms),
            format!("{:+.3}", s.p99_ms - floor_open.p99_ms),
            v.open_failed.to_string(),
        ]);
    }
    text += &t.render();
    if wrk_rows.iter().any(|(_, r)| r.is_some()) {
        text += &format!("\ncross-check with wrk (-t1 -c{conns}, one round per path)\n");
        let mut t = Table::new(&["path", "req/s", "x floor", "p50 ms", "p99 ms", "errors"]);
        let floor_wrk = wrk_rows[2].1.map_or(0.0, |r| r.rps);
        for (name, r) in &wrk_rows {
            match r {
                Some(r) => t.row(vec![
                    name.to_string(),
                    format!("{:.0}", r.rps),
                    format!("{:.3}", ratio(r.rps, floor_wrk)),
                    ms(r.p50_ms),
                    ms(r.p99_ms),
                    r.errors.to_string(),
                ]),
                None => t.row(vec![name.to_string(), "wrk failed".into()]),
            }
        }
        text += &t.render();
    } else {
        text += "\nwrk not available: no cross-check\n";
    }

    let rps_ratio = ratio(amb_rps, floor_rps);
    let copy_rps = median(&copy_v.closed_rps);
    // The same split paired per round: the configuration's cost, and the ambassador's own.
    let per_round = |a: &Variant, b: &Variant| -> Vec<f64> {
        a.closed_rps
            .iter()
            .zip(&b.closed_rps)
            .map(|(x, y)| ratio(*x, *y))
            .collect()
    };
    let config_cost = per_round(copy_v, floor_v);
    let periodic_cost = per_round(amb_v, copy_v);
    text += &format!(
        "
where the difference lies, closed loop, per round: rendered file / floor {} (median \
         {:.3}); ambassador / rendered file {} (median {:.3})\n",
        config_cost
            .iter()
            .map(|r| format!("{r:.3}"))
            .collect::<Vec<_>>()
            .join(", "),
        median(&config_cost),
        periodic_cost
            .iter()
            .map(|r| format!("{r:.3}"))
            .collect::<Vec<_>>()
            .join(", "),
        median(&periodic_cost),
    );
    // Paired per round (the two ran seconds apart), then the median: one noisy round on a
    // shared machine does not decide the verdict.
    let deltas: Vec<f64> = amb_v
        .open_p99
        .iter()
        .zip(&floor_v.open_p99)
        .map(|(a, f)| a - f)
        .collect();
    let p99_delta = median(&deltas);
    text += &format!(
        "open-loop p99, ambassador minus floor, per round: {} ms (median {p99_delta:+.3})\n",
        deltas
            .iter()
            .map(|d| format!("{d:+.3}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let checks = vec![
        Check::new(
            "request path: ambassador req/s vs static floor",
            ">= 0.9x",
            format!("{rps_ratio:.3}x ({amb_rps:.0} vs {floor_rps:.0} req/s)"),
            rps_ratio >= 0.9,
        ),
        Check::new(
            "request path: ambassador p99 vs static floor (open loop)",
            "within 0.2 ms",
            format!(
                "{p99_delta:+.3} ms median per-round difference (pooled {:.3} vs {:.3} ms)",
                amb_open.p99_ms, floor_open.p99_ms
            ),
            p99_delta <= 0.2,
        ),
    ];
    let data = json!({
        "rounds": rounds,
        "slice_s": slice.as_secs_f64(),
        "closed_loop_connections": conns,
        "open_loop_rate": rate,
        "open_loop_connections": open_conns,
        "paths": variants.iter().map(|v| json!({
            "path": v.name,
            "closed_rps_per_round": v.closed_rps,
            "closed_rps_median": median(&v.closed_rps),
            "closed_latency": v.closed.summary(),
            "closed_failed": v.closed_failed,
            "open_rps_per_round": v.open_rps,
            "open_latency": v.open.summary(),
            "open_p99_per_round_ms": v.open_p99,
            "open_failed": v.open_failed,
        })).collect::<Vec<_>>(),
        "wrk": wrk_rows.iter().map(|(n, r)| json!({"path": n, "wrk": r})).collect::<Vec<_>>(),
        "ambassador_over_floor_rps": rps_ratio,
        "rendered_file_over_floor_rps": ratio(copy_rps, floor_rps),
        "rendered_over_floor_per_round": config_cost,
        "ambassador_over_rendered_per_round": periodic_cost,
        "ambassador_minus_floor_open_p99_ms_per_round": deltas,
        "ambassador_minus_floor_open_p99_ms_median": p99_delta,
    });
    Ok(Report {
        scenario: "request-path".into(),
        quick: ctx.quick,
        text,
        checks,
        data,
    })
}
