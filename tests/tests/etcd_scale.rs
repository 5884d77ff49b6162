//! Directory replicas on etcd at sizes past etcd's and gRPC's defaults, against a real
//! three-member cluster: a replica started on a table of more than 4 MiB (the gRPC client's
//! default message limit) serves all of it, a replica's Docker discovery that loses hundreds
//! of containers at once (more than etcd's 128 operations per transaction) removes them all,
//! a replica says on `/healthz` when it cannot follow etcd, a replica whose watch fell
//! behind a compaction reads a new snapshot and goes on, and a thousand instances whose
//! heartbeats stop at once (a host dies) leave every replica within their TTL and a second.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use baker_client::change::{Change, RemoveCause};
use baker_client::model::{Instance, InstanceId, ServiceName, ValidSpec};
use baker_directory::etcd::{Etcd, StoreUrl};
use baker_directory::metrics::Metrics;
use baker_directory::quota::Quotas;
use baker_directory::registry::Registry;
use baker_tests::directory::TestDirectory;
use baker_tests::etcd::EtcdCluster;
use baker_tests::{eventually, require, Needs};
use etcd_client::{Client, PutOptions, Txn, TxnOp};
use reqwest::StatusCode;
use tokio_util::sync::CancellationToken;

const SERVICES: usize = 16;

/// `n` instances over [`SERVICES`] services written straight into etcd under `prefix`, bound
/// to one lease of a minute, a hundred per transaction; their total size in bytes.
async fn fill(cluster: &EtcdCluster, prefix: &str, n: usize) -> usize {
    let mut c = Client::connect(cluster.endpoints(), None)
        .await
        .expect("connecting to the cluster");
    let lease = c.lease_grant(60, None).await.unwrap().id();
    let mut bytes = 0;
    let instances: Vec<Instance> = (0..n)
        .map(|i| Instance {
            ttl_ms: 60_000,
            tags: vec![format!("zone-{}", i % 7).parse().unwrap()],
            ..Instance::sample(&format!("svc-{}", i % SERVICES), &format!("i-{i:06}"))
        })
        .collect();
    for chunk in instances.chunks(100) {
        let ops: Vec<TxnOp> = chunk
            .iter()
            .map(|i| {
                let value = serde_json::to_vec(i).unwrap();
                bytes += value.len();
                TxnOp::put(
                    format!("{prefix}/instances/{}/{}", i.service, i.id),
                    value,
                    Some(PutOptions::new().with_lease(lease)),
                )
            })
            .collect();
        c.txn(Txn::new().and_then(ops)).await.expect("a put");
    }
    bytes
}

/// How many instances `dir` lists, over every service.
async fn listed(dir: &TestDirectory) -> Option<usize> {
    let all = dir.client.services().await.ok()?;
    Some(all.services.values().map(Vec::len).sum())
}

#[tokio::test]
async fn a_replica_started_on_a_table_larger_than_a_grpc_message_serves_all_of_it() {
    if !require(Needs::Etcd) {
        return;
    }
    let cluster = EtcdCluster::start(3).await;
    let n = 24_000;
    let bytes = fill(&cluster, "/baker", n).await;
    assert!(bytes > 4 << 20, "{bytes} bytes");
    let t0 = Instant::now();
    let dir = TestDirectory::start(&[("BAKER_STORE", &cluster.store_url("/baker"))]).await;
    eventually(Duration::from_secs(20), "every instance listed", || async {
        (listed(&dir).await? == n).then_some(())
    })
    .await;
    let took = t0.elapsed();
    eprintln!("{n} instances ({bytes} bytes) served {took:?} after the replica started");
    assert!(took < Duration::from_secs(10), "took {took:?}");
    dir.client
        .healthz()
        .await
        .expect("a replica that follows etcd is healthy");
}

fn docker_spec(i: usize) -> ValidSpec {
    ValidSpec {
        address: "10.0.0.1".parse().unwrap(),
        port: u16::try_from(10_000 + i).unwrap(),
        version: "1".parse().unwrap(),
        weight: 100,
        tags: vec![],
        ttl_ms: 0,
        node: None,
        zone: None,
    }
}

/// A replica's registry run in this process on `cluster`, and what stops it.
async fn replica(cluster: &EtcdCluster, prefix: &str) -> (Registry, CancellationToken) {
    let url: StoreUrl = cluster.store_url(prefix).parse().unwrap();
    let etcd = Etcd::connect(&url).await.unwrap();
    let registry = Registry::with_etcd(etcd, Arc::new(Metrics::new()), 4096, Quotas::default());
    let stop = CancellationToken::new();
    tokio::spawn(registry.clone().run_store(stop.clone()));
    registry.first_snapshot(Duration::from_secs(10)).await;
    (registry, stop)
}

fn count(registry: &Registry) -> usize {
    registry.services().services.values().map(Vec::len).sum()
}

#[tokio::test]
async fn three_hundred_containers_gone_at_once_all_leave_the_table() {
    if !require(Needs::Etcd) {
        return;
    }
    let cluster = EtcdCluster::start(3).await;
    let (registry, stop) = replica(&cluster, "/docker").await;
    let n = 300;
    let service: ServiceName = "greeting".parse().unwrap();
    let desired = |k: usize| -> Vec<(ServiceName, InstanceId, ValidSpec)> {
        (0..k)
            .map(|i| {
                (
                    service.clone(),
                    format!("c-{i:03}").parse().unwrap(),
                    docker_spec(i),
                )
            })
            .collect()
    };
    registry.sync_source(desired(n));
    eventually(
        Duration::from_secs(30),
        "every container written",
        || async { (count(&registry) == n).then_some(()) },
    )
    .await;
    let mut sub = registry.subscribe(None, false);
    let t0 = Instant::now();
    registry.sync_source(Vec::new());
    eventually(
        Duration::from_secs(15),
        "every container removed",
        || async { (count(&registry) == 0).then_some(()) },
    )
    .await;
    eprintln!("{n} containers removed in {:?}", t0.elapsed());
    let mut causes: BTreeMap<&'static str, usize> = BTreeMap::new();
    while let Some(p) = sub.feed.try_recv() {
        if let Change::Remove { cause, .. } = &p.change {
            *causes.entry(cause.as_str()).or_default() += 1;
        }
    }
    assert_eq!(
        causes,
        [(RemoveCause::DockerResync.as_str(), n)].into(),
        "each with the cause its removal gave"
    );
    stop.cancel();
}

#[tokio::test]
async fn a_replica_cut_off_from_etcd_says_so_and_resyncs_past_a_compaction() {
    if !require(Needs::Etcd) {
        return;
    }
    let mut cluster = EtcdCluster::start(3).await;
    // The replica knows one member only: freezing it cuts the replica off, while the other
    // two keep a quorum and take writes.
    let store = format!("etcd://127.0.0.1:{}/baker", cluster.members[0].client_port);
    let dir = TestDirectory::start(&[("BAKER_STORE", &store)]).await;
    dir.client.healthz().await.expect("healthy while following");
    let health = || async {
        let r = reqwest::get(format!("{}/healthz", dir.url)).await.ok()?;
        Some((r.status(), r.text().await.ok()?))
    };
    cluster.freeze(0);
    let (_, body) = eventually(Duration::from_secs(15), "/healthz to say 503", || async {
        health()
            .await
            .filter(|(status, _)| *status == StatusCode::SERVICE_UNAVAILABLE)
    })
    .await;
    assert!(body.contains("cannot follow etcd"), "{body}");

    // Meanwhile, instances are written through the other members, and the history the
    // replica last saw is compacted away.
    let others: Vec<String> = cluster.endpoints()[1..].to_vec();
    let mut c = Client::connect(others, None).await.unwrap();
    let lease = c.lease_grant(60, None).await.unwrap().id();
    let mut revision = 0;
    for i in 0..5 {
        let value = serde_json::to_vec(&Instance {
            ttl_ms: 60_000,
            ..Instance::sample("emitter", &format!("e-{i}"))
        })
        .unwrap();
        let put = c
            .put(
                format!("/baker/instances/emitter/e-{i}"),
                value,
                Some(PutOptions::new().with_lease(lease)),
            )
            .await
            .unwrap();
        revision = put.header().unwrap().revision();
    }
    c.compact(revision, None).await.unwrap();

    cluster.thaw(0);
    eventually(
        Duration::from_secs(20),
        "/healthz to say 200 again",
        || async {
            health()
                .await
                .filter(|(status, _)| *status == StatusCode::OK)
        },
    )
    .await;
    eventually(
        Duration::from_secs(10),
        "the new instances listed",
        || async { (dir.client.service("emitter").await.ok()?.instances.len() == 5).then_some(()) },
    )
    .await;
    dir.client
        .register(
            "emitter",
            "after",
            &baker_tests::directory::spec(8080, Some(60_000)),
        )
        .await
        .expect("a write once following again");
}

/// Heartbeats each of `n` instances (over [`SERVICES`] services, a TTL of `ttl`) once
/// through `dir`, fifty at a time; panics on any refused heartbeat.
async fn heartbeat_all(dir: &TestDirectory, n: usize, ttl: Duration) {
    use futures_util::StreamExt;
    let failed: Vec<String> = futures_util::stream::iter(0..n)
        .map(|i| async move {
            let spec = baker_tests::directory::spec(
                8080 + (i % 1000) as u16,
                Some(ttl.as_millis() as u64),
            );
            dir.client
                .register(
                    &format!("svc-{}", i % SERVICES),
                    &format!("i-{i:04}"),
                    &spec,
                )
                .await
                .err()
                .map(|e| format!("i-{i:04}: {e}"))
        })
        .buffer_unordered(50)
        .filter_map(|failed| async move { failed })
        .collect()
        .await;
    assert!(
        failed.is_empty(),
        "{} heartbeats failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
}

#[tokio::test]
async fn a_thousand_instances_that_stop_at_once_leave_every_replica_within_their_ttl_and_a_second()
{
    if !require(Needs::Etcd) {
        return;
    }
    const N: usize = 1_000;
    const TTL: Duration = Duration::from_secs(3);
    let cluster = EtcdCluster::start(3).await;
    let store = cluster.store_url("/baker");
    let first = TestDirectory::start(&[("BAKER_STORE", &store)]).await;
    let second = first.replica().await;

    // A host's worth of instances heartbeating through the first replica, once a second.
    let mut last_round = Instant::now();
    for round in 0..4 {
        last_round = Instant::now();
        heartbeat_all(&first, N, TTL).await;
        if round == 0 {
            for dir in [&first, &second] {
                eventually(Duration::from_secs(20), "every instance listed", || async {
                    (listed(dir).await? == N).then_some(())
                })
                .await;
            }
        }
        tokio::time::sleep(Duration::from_secs(1).saturating_sub(last_round.elapsed())).await;
    }
    for dir in [&first, &second] {
        assert_eq!(
            listed(dir).await,
            Some(N),
            "none expired while heartbeating"
        );
    }

    // The host dies: no heartbeat from now on. Each instance's last one was sent after
    // `last_round`, so each is due by `last_round` + TTL.
    let mut gone = [None, None];
    let deadline = last_round + TTL + Duration::from_secs(10);
    while gone.iter().any(Option::is_none) && Instant::now() < deadline {
        for (i, dir) in [&first, &second].into_iter().enumerate() {
            if gone[i].is_none() && listed(dir).await == Some(0) {
                gone[i] = Some(last_round.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if gone.iter().any(Option::is_none) {
        eprintln!(
            "still listed: {:?} {:?}; the first replica's log:\n{}",
            listed(&first).await,
            listed(&second).await,
            first.proc.log_text()
        );
    }
    eprintln!("{N} instances gone from the replicas {gone:?} after their last heartbeats began (TTL {TTL:?})");
    for (name, took) in ["first", "second"].into_iter().zip(gone) {
        let took = took.unwrap_or_else(|| panic!("the {name} replica still lists instances"));
        assert!(
            took <= TTL + Duration::from_secs(1),
            "the {name} replica listed instances {took:?} after their last heartbeats, past TTL {TTL:?} + 1 s"
        );
    }
}
