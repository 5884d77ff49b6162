//! Scenario 6, footprint: resident memory of each daemon idle and under churn (scenario 3's
//! load), and the size of each image.

use std::time::Duration;

use serde_json::json;

use crate::daemons::{self, Ambassador, Probe};
use crate::load::Target;
use crate::procfs::{Footprint, Sampler};
use crate::report::{Check, Report, Table};
use crate::scenario::{churn, docker, Ctx};

/// The limits are in MB (10^6 bytes); RSS is read in MiB.
const MB_PER_MIB: f64 = 1.048_576;

pub async fn run(ctx: &Ctx) -> anyhow::Result<Report> {
    let settle = Duration::from_secs(ctx.pick(5, 2));
    let window = Duration::from_secs(ctx.pick(10, 3));
    let data = tempfile::tempdir()?;
    let (mut dir, dir_url) = daemons::directory(&ctx.bins, data.path(), false).await?;
    let (mut app, app_addr) = daemons::greeting(&ctx.bins, "f1", "1").await?;
    let default_probe = Probe {
        interval: Duration::from_secs(2),
        rise: 2,
        fall: 2,
    };
    let mut reg = daemons::registrar(
        &ctx.bins,
        &dir_url,
        "greeting",
        "f1",
        "1",
        app_addr,
        default_probe,
    )?;
    let fast_probe = Probe {
        interval: Duration::from_millis(100),
        ..default_probe
    };
    let (mut app2, app2_addr) = daemons::greeting(&ctx.bins, "f2", "1").await?;
    let mut reg_fast = daemons::registrar(
        &ctx.bins, &dir_url, "greeting", "f2", "1", app2_addr, fast_probe,
    )?;
    let mut amb = Ambassador::start(&ctx.bins, &dir_url, &["greeting"], false).await?;
    daemons::wait_ready(
        &Target::get(amb.addr("greeting"), "/greeting"),
        Duration::from_secs(30),
    )
    .await?;
    tokio::time::sleep(settle).await;

    let sample = |pids: Vec<u32>| Sampler::start(Duration::from_millis(250), move || pids.clone());
    let samplers = vec![
        ("directory", sample(vec![dir.pid()])),
        ("ambassador (without HAProxy)", sample(vec![amb.proc.pid()])),
        ("HAProxy (master + worker)", sample(amb.haproxy_pids())),
        ("registrar (interval 2s)", sample(vec![reg.pid()])),
        ("registrar (interval 100ms)", sample(vec![reg_fast.pid()])),
        ("greeting", sample(vec![app.pid()])),
    ];
    tokio::time::sleep(window).await;
    let mut idle: Vec<(&str, Footprint)> = Vec::new();
    for (name, s) in samplers {
        idle.push((name, s.finish().await));
    }
    for p in [
        &mut reg,
        &mut reg_fast,
        &mut amb.proc,
        &mut app,
        &mut app2,
        &mut dir,
    ] {
        daemons::stop(p, Duration::from_secs(10)).await;
    }

    let busy = churn::churn(
        &ctx.bins,
        false,
        Duration::from_secs(ctx.pick(30, 5)),
        ctx.pick(1000.0, 500.0),
    )
    .await?;

    let images = match docker::engine() {
        Ok(()) => Ok(docker::image_sizes()),
        Err(e) => Err(e.to_string()),
    };

    let mut text = String::from("resident memory (MiB) and CPU, idle and under churn\n");
    let mut t = Table::new(&[
        "daemon",
        "idle RSS mean",
        "idle RSS max",
        "idle CPU",
        "churn RSS max",
        "churn CPU",
    ]);
    let busy_of = |name: &str| match name {
        "directory" => Some(busy.directory),
        "ambassador (without HAProxy)" => Some(busy.ambassador),
        "HAProxy (master + worker)" => Some(busy.haproxy),
        _ => None,
    };
    for (name, f) in &idle {
        let b = busy_of(name);
        t.row(vec![
            name.to_string(),
            format!("{:.1}", f.rss_mean_mib),
            format!("{:.1}", f.rss_max_mib),
            format!("{:.1}%", f.cpu_cores * 100.0),
            b.map_or("-".into(), |b| format!("{:.1}", b.rss_max_mib)),
            b.map_or("-".into(), |b| format!("{:.1}%", b.cpu_cores * 100.0)),
        ]);
    }
    text += &t.render();
    let mut t = Table::new(&["image", "size MB"]);
    match &images {
        Ok(list) => {
            for (name, size) in list {
                t.row(vec![
                    name.clone(),
                    size.map_or("missing".into(), |s| format!("{:.1}", s as f64 / 1e6)),
                ]);
            }
            text += &format!("\n{}", t.render());
        }
        Err(why) => text += &format!("\nimages: not measured ({why})\n"),
    }

    let find = |name: &str| {
        idle.iter()
            .find(|(n, _)| *n == name)
            .map(|(_, f)| *f)
            .unwrap_or_default()
    };
    let amb_max = find("ambassador (without HAProxy)")
        .rss_max_mib
        .max(busy.ambassador.rss_max_mib);
    let reg_max = find("registrar (interval 2s)")
        .rss_max_mib
        .max(find("registrar (interval 100ms)").rss_max_mib);
    let mut checks = vec![
        Check::new(
            "footprint: ambassador RSS without HAProxy (idle and churn)",
            "< 15 MB",
            format!("{:.1} MB max", amb_max * MB_PER_MIB),
            amb_max * MB_PER_MIB < 15.0,
        ),
        Check::new(
            "footprint: registrar RSS",
            "< 10 MB",
            format!("{:.1} MB max", reg_max * MB_PER_MIB),
            reg_max * MB_PER_MIB < 10.0,
        ),
    ];
    match &images {
        Ok(list) => {
            for (name, size) in list {
                checks.push(match size {
                    Some(s) => Check::new(
                        &format!("image size {name}"),
                        "< 30 MB",
                        format!("{:.1} MB", *s as f64 / 1e6),
                        (*s as f64) < 30e6,
                    ),
                    None => Check::not_measured(
                        &format!("image size {name}"),
                        "< 30 MB",
                        "image not built (docker/build.sh)",
                    ),
                });
            }
        }
        Err(why) => checks.push(Check::not_measured("image sizes", "< 30 MB", why)),
    }
    Ok(Report {
        scenario: "footprint".into(),
        quick: ctx.quick,
        text,
        checks,
        data: json!({
            "idle": idle.iter().map(|(n, f)| json!({"daemon": n, "footprint": f})).collect::<Vec<_>>(),
            "churn": busy,
            "images": match &images {
                Ok(list) => json!(list.iter().map(|(n, s)| json!({"image": n, "bytes": s})).collect::<Vec<_>>()),
                Err(why) => json!({"not_measured": why}),
            },
        }),
    })
}
