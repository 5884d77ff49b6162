//! Locality: two ambassadors on one directory, one with `BAKER_ZONE=a` and one without, under
//! the same closed-loop load, over instances in zones `a` and `b` (each an app with its
//! registrar). Side by side: the share of answers from zone `a` while it is whole, once it lost
//! one instance, after its last instance is SIGKILLed (failed requests, the first answer from
//! `b`, the longest gap, and when the registrar took it out), and after a new instance joins.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use baker_tests::Proc;
use serde_json::json;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::daemons::{self, Ambassador, Probe};
use crate::load::{Conn, Target};
use crate::report::{Check, Report, Table};
use crate::scenario::Ctx;

const SERVICE: &str = "zoned";
/// Request loops per ambassador.
const CONNS: usize = 2;

/// One answer, or a failure, at a time since the start.
#[derive(Debug, Clone)]
struct Answer {
    at: Duration,
    instance: Option<String>,
}

/// Closed-loop GETs through one ambassador, recording which instance answered when.
struct Recorder {
    answers: Arc<Mutex<Vec<Answer>>>,
    stop: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Recorder {
    fn start(addr: SocketAddr, origin: Instant) -> Recorder {
        let answers = Arc::new(Mutex::new(Vec::new()));
        let stop = CancellationToken::new();
        let tasks = (0..CONNS)
            .map(|_| {
                let (answers, stop) = (answers.clone(), stop.clone());
                let target = Target::get(addr, "/greeting");
                tokio::spawn(async move {
                    let mut conn = Conn::new(addr);
                    while !stop.is_cancelled() {
                        let instance = match conn.call(&target).await {
                            Ok((status, body)) if status.is_success() => {
                                serde_json::from_slice::<serde_json::Value>(&body)
                                    .ok()
                                    .and_then(|v| v["instance"].as_str().map(str::to_owned))
                            }
                            _ => None,
                        };
                        let at = origin.elapsed();
                        answers
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .push(Answer { at, instance });
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                })
            })
            .collect();
        Recorder {
            answers,
            stop,
            tasks,
        }
    }

    async fn finish(self) -> Vec<Answer> {
        self.stop.cancel();
        for t in self.tasks {
            let _ = t.await;
        }
        let mut all = self
            .answers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        all.sort_by_key(|a| a.at);
        all
    }
}

/// What one ambassador's answers show in a phase.
#[derive(Debug, Clone, Default, serde::Serialize)]
struct Phase {
    answers: u64,
    failed: u64,
    /// Percent of the answers from zone `a`.
    local_pct: f64,
}

fn phase(answers: &[Answer], from: Duration, to: Duration) -> Phase {
    let window: Vec<&Answer> = answers
        .iter()
        .filter(|a| a.at >= from && a.at < to)
        .collect();
    let ok: Vec<&str> = window
        .iter()
        .filter_map(|a| a.instance.as_deref())
        .collect();
    let local = ok.iter().filter(|i| i.starts_with("a")).count();
    Phase {
        answers: ok.len() as u64,
        failed: (window.len() - ok.len()) as u64,
        local_pct: if ok.is_empty() {
            0.0
        } else {
            local as f64 * 100.0 / ok.len() as f64
        },
    }
}

/// After a kill at `at`: the first answer from another zone, and the longest time without any
/// answer in the `span` that follows.
fn failover(answers: &[Answer], at: Duration, span: Duration) -> (Option<Duration>, Duration) {
    let after: Vec<&Answer> = answers
        .iter()
        .filter(|a| a.at >= at && a.at < at + span)
        .collect();
    let first_elsewhere = after
        .iter()
        .find(|a| a.instance.as_deref().is_some_and(|i| !i.starts_with("a")))
        .map(|a| a.at - at);
    let mut gap = Duration::ZERO;
    let mut last = at;
    for a in after.iter().filter(|a| a.instance.is_some()) {
        gap = gap.max(a.at - last);
        last = a.at;
    }
    (first_elsewhere, gap)
}

struct Member {
    app: Proc,
    registrar: Proc,
}

async fn member(
    ctx: &Ctx,
    dir: &str,
    id: &str,
    zone: &str,
    probe: Probe,
) -> anyhow::Result<Member> {
    let (app, addr) = daemons::greeting(&ctx.bins, id, "1").await?;
    let mut registrar = daemons::registrar_with(
        &ctx.bins,
        dir,
        SERVICE,
        id,
        "1",
        addr,
        probe,
        &[("BAKER_ZONE", zone)],
    )?;
    registrar
        .wait_for_log("is now up", Duration::from_secs(20))
        .await;
    Ok(Member { app, registrar })
}

/// Waits until the directory lists `expected` instances of the service.
async fn wait_listed(dir: &str, expected: usize) -> anyhow::Result<Instant> {
    let client = baker_client::DirectoryClient::new(dir, None)?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let n = client
            .service(SERVICE)
            .await
            .map(|s| s.instances.len())
            .unwrap_or(0);
        if n == expected {
            return Ok(Instant::now());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the directory lists {n} instances of {SERVICE}, not {expected}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub async fn run(ctx: &Ctx) -> anyhow::Result<Report> {
    let hold = ctx.pick(Duration::from_secs(5), Duration::from_secs(2));
    let probe = Probe {
        interval: Duration::from_millis(500),
        rise: 2,
        fall: 2,
    };
    let data = tempfile::tempdir()?;
    let (mut dir, dir_url) = daemons::directory(&ctx.bins, data.path(), false).await?;
    let mut members = BTreeMap::new();
    for (id, zone) in [("a1", "a"), ("a2", "a"), ("b1", "b"), ("b2", "b")] {
        members.insert(id, member(ctx, &dir_url, id, zone, probe).await?);
    }
    let mut zoned = Ambassador::start_with(&ctx.bins, &dir_url, &[SERVICE], &[("BAKER_ZONE", "a")])
        .await
        .context("starting the ambassador in zone a")?;
    let mut plain = Ambassador::start(&ctx.bins, &dir_url, &[SERVICE], false).await?;
    for amb in [&zoned, &plain] {
        daemons::wait_ready(
            &Target::get(amb.addr(SERVICE), "/greeting"),
            Duration::from_secs(30),
        )
        .await?;
    }
    let origin = Instant::now();
    let recorders = [
        Recorder::start(zoned.addr(SERVICE), origin),
        Recorder::start(plain.addr(SERVICE), origin),
    ];

    // Whole zone, then a1 killed (its registrar takes it out), then a2, the last one.
    tokio::time::sleep(hold).await;
    let whole = (Duration::ZERO, origin.elapsed());
    let a1 = members.get_mut("a1").expect("a1");
    a1.app.kill9();
    wait_listed(&dir_url, 3).await?;
    let one_from = origin.elapsed();
    tokio::time::sleep(hold).await;
    let one = (one_from, origin.elapsed());
    let a2 = members.get_mut("a2").expect("a2");
    a2.app.kill9();
    let last_killed = origin.elapsed();
    let taken_out = wait_listed(&dir_url, 2).await? - origin;
    tokio::time::sleep(hold).await;
    let empty = (taken_out, origin.elapsed());
    // A new instance joins zone a.
    let joined_at = origin.elapsed();
    let a3 = member(ctx, &dir_url, "a3", "a", probe).await?;
    let up_at = origin.elapsed();
    tokio::time::sleep(hold).await;
    let back = (up_at + Duration::from_millis(200), origin.elapsed());
    members.insert("a3", a3);

    let [zoned_rec, plain_rec] = recorders;
    let answers = [zoned_rec.finish().await, plain_rec.finish().await];
    let reloads = zoned.reloads().await.ok();
    for m in members.values_mut() {
        daemons::stop(&mut m.registrar, Duration::from_secs(10)).await;
        daemons::stop(&mut m.app, Duration::from_secs(10)).await;
    }
    daemons::stop(&mut zoned.proc, Duration::from_secs(15)).await;
    daemons::stop(&mut plain.proc, Duration::from_secs(15)).await;
    daemons::stop(&mut dir, Duration::from_secs(10)).await;

    let phases = |a: &[Answer]| [whole, one, empty, back].map(|(from, to)| phase(a, from, to));
    let [zp, pp] = [phases(&answers[0]), phases(&answers[1])];
    let span = taken_out - last_killed + Duration::from_secs(1);
    let [(zf, zgap), (pf, pgap)] = [
        failover(&answers[0], last_killed, span),
        failover(&answers[1], last_killed, span),
    ];
    let around_kill = |a: &[Answer]| phase(a, last_killed, taken_out);
    let (zk, pk) = (around_kill(&answers[0]), around_kill(&answers[1]));

    let mut text = format!(
        "4 instances (a1, a2 in zone a; b1, b2 in zone b), each with its registrar (interval {:?}, \
         fall {}); two ambassadors on one directory under closed-loop load ({CONNS} connections \
         each): one with BAKER_ZONE=a, one without. Answers from zone a per phase ({:?} each):\n",
        probe.interval, probe.fall, hold
    );
    let mut t = Table::new(&[
        "phase",
        "rule (zone a keeps)",
        "BAKER_ZONE=a: from a",
        "no zone: from a",
        "failed (zoned / plain)",
    ]);
    let names = [
        ("zone a whole (2 of 4)", "100 %"),
        ("a1 killed, taken out (1 of 3)", "93 %"),
        ("a2, the last, killed and taken out", "0 %"),
        ("a3 joined (1 of 3)", "93 %"),
    ];
    for (i, (name, rule)) in names.iter().enumerate() {
        t.row(vec![
            name.to_string(),
            rule.to_string(),
            format!("{:.1} % of {}", zp[i].local_pct, zp[i].answers),
            format!("{:.1} % of {}", pp[i].local_pct, pp[i].answers),
            format!("{} / {}", zp[i].failed, pp[i].failed),
        ]);
    }
    text += &t.render();
    let show = |d: Option<Duration>| {
        d.map_or("none".to_owned(), |d| {
            format!("{:.1} ms", d.as_secs_f64() * 1000.0)
        })
    };
    text += &format!(
        "\nzone a's last instance SIGKILLed: its registrar took it out after {:.0} ms; until then \
         the zoned ambassador answered {} requests ({} failed), the plain one {} ({} failed).\n",
        (taken_out - last_killed).as_secs_f64() * 1000.0,
        zk.answers,
        zk.failed,
        pk.answers,
        pk.failed
    );
    let mut f = Table::new(&["after the kill", "BAKER_ZONE=a", "no zone"]);
    f.row(vec!["first answer from zone b".into(), show(zf), show(pf)]);
    f.row(vec![
        "longest time without an answer".into(),
        show(Some(zgap)),
        show(Some(pgap)),
    ]);
    f.row(vec![
        "a3 started → registered up".into(),
        format!("{:.0} ms", (up_at - joined_at).as_secs_f64() * 1000.0),
        String::new(),
    ]);
    text += &f.render();

    let failed: u64 = zp.iter().map(|p| p.failed).sum::<u64>() + zk.failed;
    let checks = vec![
        Check::new(
            "locality: requests kept in a whole zone",
            "100 %",
            format!("{:.1} %", zp[0].local_pct),
            zp[0].local_pct >= 99.9,
        ),
        Check::new(
            "locality: failed requests when the zone's last instance dies",
            "0",
            failed.to_string(),
            failed == 0,
        ),
        Check::new(
            "locality: HAProxy reloads",
            "0",
            reloads.map_or("unknown".into(), |n| n.to_string()),
            reloads == Some(0),
        ),
    ];
    Ok(Report {
        scenario: "locality".into(),
        quick: ctx.quick,
        text,
        checks,
        data: json!({
            "hold_seconds": hold.as_secs_f64(),
            "zoned": zp,
            "plain": pp,
            "last_kill_to_taken_out_ms": (taken_out - last_killed).as_secs_f64() * 1000.0,
            "first_answer_from_b_ms": { "zoned": zf.map(|d| d.as_secs_f64() * 1000.0), "plain": pf.map(|d| d.as_secs_f64() * 1000.0) },
            "longest_gap_ms": { "zoned": zgap.as_secs_f64() * 1000.0, "plain": pgap.as_secs_f64() * 1000.0 },
            "until_taken_out": { "zoned": zk, "plain": pk },
            "reloads": reloads,
        }),
    })
}
