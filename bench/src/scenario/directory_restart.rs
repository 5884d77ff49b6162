//! Scenario 5c, a directory replica (re)started on a large table in etcd
//! (`directory-restart`): 100,000 instances (`BAKER_BENCH_INSTANCES`; 10,000 with `--quick`)
//! in 16 services are written straight into a fresh three-member etcd cluster on loopback,
//! bound to one lease, a hundred per transaction, as registrars' instances are stored. Then:
//!
//! (`--instances N` sets another size.)
//!
//! 1. a replica starts on that table (the first start);
//! 2. a second replica starts beside it;
//! 3. the first is SIGKILLed and started again, three times (a restart after a crash).
//!
//! Each time is from the spawn of `baker-directory` to the moment its `/metrics` count every
//! instance and its `/healthz` answers 200 (it follows etcd), polled every 50 ms; the
//! replica's RSS is read then. The figures are side by side: first start, joining replica,
//! restarts (each, and their median and worst).

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use baker_client::model::Instance;
use baker_tests::etcd::EtcdCluster;
use baker_tests::Proc;
use bytes::Bytes;
use etcd_client::{Client, PutOptions, Txn, TxnOp};
use http_body_util::Full;
use serde_json::json;
use tokio::time::Instant;

use super::directory_etcd::cluster;
use super::directory_scale::size;
use crate::daemons::{self, Bins};
use crate::load::Conn;
use crate::procfs;
use crate::report::{Check, Report, Table};
use crate::scenario::Ctx;

const SERVICES: usize = 16;
const PREFIX: &str = "/baker-bench";
const RESTARTS: usize = 3;
/// The target: a restarted replica serves every instance within this.
const TARGET: Duration = Duration::from_secs(10);
/// How long one start may take before the scenario gives up on it.
const GIVE_UP: Duration = Duration::from_secs(120);

/// Writes `n` instances straight into etcd under [`PREFIX`], bound to one lease of an hour, a
/// hundred per transaction; their size in bytes.
async fn fill(cluster: &EtcdCluster, n: usize) -> anyhow::Result<usize> {
    let mut c = Client::connect(cluster.endpoints(), None)
        .await
        .context("connecting to etcd")?;
    let lease = c.lease_grant(3600, None).await?.id();
    let mut bytes = 0;
    let instances: Vec<Instance> = (0..n)
        .map(|i| Instance {
            ttl_ms: 3_600_000,
            tags: vec![format!("zone-{}", i % 7).parse().expect("a valid tag")],
            ..Instance::sample(&format!("svc-{}", i % SERVICES), &format!("i-{i:06}"))
        })
        .collect();
    for chunk in instances.chunks(100) {
        let mut ops = Vec::with_capacity(chunk.len());
        for i in chunk {
            let value = serde_json::to_vec(i)?;
            bytes += value.len();
            ops.push(TxnOp::put(
                format!("{PREFIX}/instances/{}/{}", i.service, i.id),
                value,
                Some(PutOptions::new().with_lease(lease)),
            ));
        }
        c.txn(Txn::new().and_then(ops))
            .await
            .context("writing instances")?;
    }
    Ok(bytes)
}

/// The instances `addr`'s `/metrics` count over every service.
async fn counted(addr: SocketAddr) -> Option<u64> {
    let body = get(addr, "/metrics").await?;
    let total = String::from_utf8_lossy(&body)
        .lines()
        .filter_map(|l| l.strip_prefix("baker_directory_instances{"))
        .filter_map(|l| l.rsplit(' ').next()?.trim().parse::<f64>().ok())
        .sum::<f64>();
    Some(total as u64)
}

/// The body of a 2xx answer to `GET path`.
async fn get(addr: SocketAddr, path: &str) -> Option<Bytes> {
    let req = hyper::Request::get(path)
        .header(hyper::header::HOST, addr.to_string())
        .body(Full::new(Bytes::new()))
        .ok()?;
    let (status, body) = Conn::new(addr).send(req).await.ok()?;
    status.is_success().then_some(body)
}

/// One start of a replica: how long until it served every instance, and its RSS then.
#[derive(Debug, Clone, Copy)]
struct Start {
    secs: f64,
    rss_mib: f64,
}

/// Starts a replica on the cluster and waits until it serves all `n` instances.
async fn start(
    bins: &Bins,
    store: &str,
    data: &std::path::Path,
    name: &str,
    n: usize,
) -> anyhow::Result<(Proc, Start)> {
    let data = data.display().to_string();
    let t0 = Instant::now();
    let env = [
        ("BAKER_LISTEN", "127.0.0.1:0"),
        ("BAKER_DATA", data.as_str()),
        ("BAKER_DOCKER", "off"),
        ("BAKER_STORE", store),
    ];
    let (proc, addr) = daemons::start(bins, name, "baker-directory", &env).await?;
    loop {
        if counted(addr).await == Some(n as u64) && get(addr, "/healthz").await.is_some() {
            break;
        }
        anyhow::ensure!(
            t0.elapsed() < GIVE_UP,
            "{name} did not serve {n} instances within {GIVE_UP:?} (it counts {:?})",
            counted(addr).await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let secs = t0.elapsed().as_secs_f64();
    let rss_mib = procfs::usage(proc.pid()).map_or(0.0, |u| u.rss_kib as f64 / 1024.0);
    Ok((proc, Start { secs, rss_mib }))
}

pub async fn run(ctx: &Ctx) -> anyhow::Result<Report> {
    let n = size(
        ctx.directory.instances,
        "BAKER_BENCH_INSTANCES",
        ctx.pick(100_000, 10_000),
    )
    .max(1);
    let cluster = cluster().await?;
    let t0 = Instant::now();
    let bytes = fill(&cluster, n).await?;
    let filled = t0.elapsed().as_secs_f64();
    let store = cluster.store_url(PREFIX);
    let (data_a, data_b) = (tempfile::tempdir()?, tempfile::tempdir()?);

    let (mut a, first) = start(&ctx.bins, &store, data_a.path(), "replica-a", n).await?;
    let (mut b, joining) = start(&ctx.bins, &store, data_b.path(), "replica-b", n).await?;
    let mut restarts = Vec::with_capacity(RESTARTS);
    for _ in 0..RESTARTS {
        a.kill9();
        let (again, s) = start(&ctx.bins, &store, data_a.path(), "replica-a", n).await?;
        a = again;
        restarts.push(s);
    }
    daemons::stop(&mut a, Duration::from_secs(10)).await;
    daemons::stop(&mut b, Duration::from_secs(10)).await;

    let mut sorted: Vec<f64> = restarts.iter().map(|s| s.secs).collect();
    sorted.sort_by(f64::total_cmp);
    let (median, worst) = (sorted[sorted.len() / 2], sorted[sorted.len() - 1]);

    let mut text = format!(
        "{n} instances in {SERVICES} services ({:.1} MiB of values) written straight into a \
         three-member etcd cluster in {filled:.1} s; each time is from the replica's spawn to \
         its /metrics counting every instance with /healthz 200.\n",
        bytes as f64 / (1 << 20) as f64
    );
    let mut t = Table::new(&["start", "serves all after s", "RSS MiB"]);
    let row = |t: &mut Table, what: String, s: &Start| {
        t.row(vec![
            what,
            format!("{:.2}", s.secs),
            format!("{:.0}", s.rss_mib),
        ])
    };
    row(&mut t, "first replica".into(), &first);
    row(&mut t, "second replica, beside it".into(), &joining);
    for (i, s) in restarts.iter().enumerate() {
        row(&mut t, format!("first replica after SIGKILL #{}", i + 1), s);
    }
    text.push_str(&t.render());
    text.push_str(&format!(
        "restarts: median {median:.2} s, worst {worst:.2} s\n"
    ));
    let checks = vec![Check::new(
        &format!("{n} instances on etcd: a restarted replica serves all"),
        &format!("< {} s", TARGET.as_secs()),
        format!("{worst:.2} s (worst of {RESTARTS})"),
        worst < TARGET.as_secs_f64(),
    )];
    let data = json!({
        "instances": n,
        "bytes": bytes,
        "fill_s": filled,
        "first_s": first.secs,
        "joining_s": joining.secs,
        "restarts_s": restarts.iter().map(|s| s.secs).collect::<Vec<_>>(),
        "rss_mib": [first.rss_mib, joining.rss_mib],
    });
    Ok(Report {
        scenario: "directory-restart".into(),
        quick: ctx.quick,
        text,
        checks,
        data,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenario::DirectoryOpts;
    use baker_tests::{require, Needs};

    /// A tiny run against the release binaries and a real cluster: every start is timed and
    /// the check reported. Not a measurement.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_start_is_timed_at_a_tiny_size() {
        if !require(Needs::Etcd) {
            return;
        }
        let ctx = Ctx::tiny(DirectoryOpts {
            instances: Some(300),
            ..DirectoryOpts::default()
        });
        let report = run(&ctx).await.unwrap();
        assert_eq!(report.data["instances"], 300, "{}", report.text);
        let restarts = report.data["restarts_s"].as_array().unwrap();
        assert_eq!(restarts.len(), RESTARTS, "{}", report.text);
        assert!(restarts.iter().all(|s| s.as_f64().unwrap() > 0.0));
        assert_eq!(report.checks.len(), 1);
        assert!(report.text.contains("first replica after SIGKILL #3"));
    }
}
