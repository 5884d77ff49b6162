//! The directory's etcd layer against a real three-member cluster: instances bound to leases
//! that keep-alives renew and that run out within their TTL, routes as plain keys, watches from
//! a snapshot's revision that every member streams alike, the loss of the leader, and the loss
//! of quorum refused with a reason and recovered without a restart; a snapshot holds the
//! removal causes and the drains still in etcd, and a drains write over a moved key is refused.
//! Removals of more instances than etcd takes operations in one transaction go through, a
//! snapshot of more than the gRPC default of 4 MiB is read in pages at one revision, and a
//! watch from a compacted revision ends with [`EtcdError::Compacted`].

use std::time::{Duration, Instant};

use baker_client::change::{MaintenanceAction, RemoveCause};
use baker_client::maintenance::{Maintenance, Target};
use baker_client::model::{Instance, Route};
use baker_directory::etcd::{
    lease_seconds, Change, DrainRecord, Etcd, EtcdError, Put, Removal, RouteRecord, StoreUrl, Swap,
    MAX_TXN_OPS, SNAPSHOT_PAGE,
};
use baker_tests::etcd::EtcdCluster;
use baker_tests::{eventually, require, Needs};
use futures_util::StreamExt;

fn inst(id: &str, ttl_ms: u64) -> Instance {
    Instance {
        ttl_ms,
        ..Instance::sample("emitter", id)
    }
}

async fn connect(cluster: &EtcdCluster, members: &[usize], prefix: &str) -> Etcd {
    let hosts: Vec<String> = members
        .iter()
        .map(|&i| format!("127.0.0.1:{}", cluster.members[i].client_port))
        .collect();
    let url: StoreUrl = format!("etcd://{}{prefix}", hosts.join(","))
        .parse()
        .expect("a store URL");
    Etcd::connect(&url).await.expect("connecting to etcd")
}

/// A route record set (or cleared) by a test.
fn record_of(route: Option<&Route>) -> RouteRecord {
    RouteRecord {
        route: route.cloned(),
        origin: Some("test".into()),
        at: 1,
        by: None,
    }
}

async fn ids(etcd: &Etcd) -> Vec<String> {
    let snap = etcd.snapshot().await.expect("a snapshot");
    let mut v: Vec<String> = snap
        .instances
        .iter()
        .map(|(i, _, _)| i.id.to_string())
        .collect();
    v.sort();
    v
}

#[tokio::test]
async fn instances_live_by_their_lease_and_every_member_streams_the_same_changes() {
    if !require(Needs::Etcd) {
        return;
    }
    let cluster = EtcdCluster::start(3).await;
    let a = connect(&cluster, &[0], "/t1").await;
    let b = connect(&cluster, &[1], "/t1").await;
    let start = a.snapshot().await.unwrap().revision;
    let mut wa = Box::pin(a.watch(start).await.unwrap());
    let mut wb = Box::pin(b.watch(start).await.unwrap());

    // Two instances with a 1 s TTL: one renewed through the other member, one left to run out.
    let kept = inst("kept", 1000);
    let left = inst("left", 1000);
    let kept_lease = a.grant(lease_seconds(kept.ttl_ms)).await.unwrap();
    let left_lease = a.grant(lease_seconds(left.ttl_ms)).await.unwrap();
    let r1 = a.put_instance(&kept, kept_lease).await.unwrap();
    let r2 = a.put_instance(&left, left_lease).await.unwrap();
    assert!(r2 > r1 && r1 > start, "{start} {r1} {r2}");
    let route: Route = [("1".parse().unwrap(), 100)].into();
    let r3 = b
        .set_route(&"emitter".parse().unwrap(), &record_of(Some(&route)), None)
        .await
        .unwrap();

    let put_at = Instant::now();
    let mut gone_after = None;
    while put_at.elapsed() < Duration::from_secs(3) {
        assert!(
            b.keep_alive(kept_lease).await.unwrap(),
            "a live lease renews"
        );
        if gone_after.is_none() && ids(&b).await == ["kept"] {
            gone_after = Some(put_at.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let gone_after = gone_after.expect("the unrenewed instance must go");
    assert!(
        gone_after <= Duration::from_millis(2000),
        "expiry within TTL + 1 s, took {gone_after:?}"
    );
    assert_eq!(ids(&a).await, ["kept"], "the renewed instance stays");
    assert!(
        !a.keep_alive(left_lease).await.unwrap(),
        "a run-out lease is gone"
    );

    // Both members stream the same changes, with the same revisions, in the same order.
    let mut seen = Vec::new();
    for w in [&mut wa, &mut wb] {
        let mut changes = Vec::new();
        while changes.len() < 4 {
            let (rev, change) = tokio::time::timeout(Duration::from_secs(5), w.next())
                .await
                .expect("a change within 5 s")
                .expect("the watch goes on")
                .expect("a change");
            changes.push((rev, change));
        }
        seen.push(changes);
    }
    assert_eq!(seen[0], seen[1]);
    let revs: Vec<i64> = seen[0].iter().map(|(r, _)| *r).collect();
    assert_eq!(&revs[..3], [r1, r2, r3]);
    assert!(matches!(
        &seen[0][3].1,
        Change::InstanceGone { id, .. } if id.as_str() == "left"
    ));
    let snap = b.snapshot().await.unwrap();
    assert_eq!(snap.routes.get("emitter"), Some(&record_of(Some(&route))));
}

/// Two replicas that both saw a container absent both write it: the second write finds the
/// key bound to the first one's lease and leaves it, instead of taking it over.
#[tokio::test]
async fn a_conditional_put_never_takes_an_instance_from_another_lease() {
    if !require(Needs::Etcd) {
        return;
    }
    let cluster = EtcdCluster::start(3).await;
    let a = connect(&cluster, &[0], "/cas").await;
    let b = connect(&cluster, &[1], "/cas").await;
    let (la, lb) = (a.grant(10).await.unwrap(), b.grant(10).await.unwrap());
    let i = Instance {
        node: Some("node-a".parse().unwrap()),
        ..inst("c1", 10_000)
    };
    let mine = Instance {
        node: Some("node-b".parse().unwrap()),
        ..i.clone()
    };
    let held = |etcd: &Etcd| {
        let etcd = etcd.clone();
        async move {
            let snap = etcd.snapshot().await.unwrap();
            let (instance, lease, _) = snap.instances.into_iter().next().expect("the instance");
            (instance.node.unwrap().to_string(), lease)
        }
    };

    // Both saw it absent: the first write wins, the second finds it held.
    assert!(matches!(
        a.put_instance_if(&i, None, la, None).await.unwrap(),
        Put::Written(_)
    ));
    assert!(matches!(
        b.put_instance_if(&mine, None, lb, None).await.unwrap(),
        Put::Held { holder, .. } if holder == la
    ));
    assert_eq!(held(&b).await, ("node-a".to_owned(), la));
    // Its holder writes it again (changed, or retried after a lost answer).
    let changed = Instance {
        port: 9090,
        ..i.clone()
    };
    assert!(matches!(
        a.put_instance_if(&changed, None, la, None).await.unwrap(),
        Put::Written(_)
    ));
    assert!(matches!(
        a.put_instance_if(&changed, None, la, Some(la))
            .await
            .unwrap(),
        Put::Written(_)
    ));
    // Expecting the holder it has, another lease takes it over (a registration Docker
    // replaces); expecting another holder, it does not.
    assert!(matches!(
        b.put_instance_if(&mine, None, lb, Some(1)).await.unwrap(),
        Put::Held { holder, .. } if holder == la
    ));
    assert!(matches!(
        b.put_instance_if(&mine, None, lb, Some(la)).await.unwrap(),
        Put::Written(_)
    ));
    assert_eq!(held(&a).await, ("node-b".to_owned(), lb));
    assert!(matches!(
        a.put_instance_if(&i, None, la, None).await.unwrap(),
        Put::Held { holder, .. } if holder == lb
    ));

    // Once its holder's lease is gone, the key is absent again and the other one may write it.
    b.revoke(lb).await.unwrap();
    assert!(matches!(
        a.put_instance_if(&i, None, la, None).await.unwrap(),
        Put::Written(_)
    ));
    assert_eq!(held(&b).await, ("node-a".to_owned(), la));
}

#[tokio::test]
async fn a_lease_survives_the_leader_and_quorum_loss_is_refused_then_recovered() {
    if !require(Needs::Etcd) {
        return;
    }
    let mut cluster = EtcdCluster::start(3).await;
    let etcd = connect(&cluster, &[0, 1, 2], "/t2").await;
    let i = inst("a", 2000);
    let lease = etcd.grant(lease_seconds(i.ttl_ms)).await.unwrap();
    etcd.put_instance(&i, lease).await.unwrap();

    // kill -9 the leader while heartbeating: the lease and the key live on.
    let leader = cluster.leader().await;
    cluster.kill9(leader);
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(4) {
        let _ = etcd.keep_alive(lease).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(
        ids(&etcd).await,
        ["a"],
        "no instance is lost with the leader"
    );
    cluster.restart(leader).await;

    // Two members down: no quorum. Writes are refused, at once and saying why.
    let survivor = cluster.leader().await;
    let down: Vec<usize> = (0..3).filter(|&m| m != survivor).collect();
    for &m in &down {
        cluster.kill9(m);
    }
    let lone = connect(&cluster, &[survivor], "/t2").await;
    let t0 = Instant::now();
    let refused = eventually(
        Duration::from_secs(10),
        "a write refused for lack of quorum",
        || {
            let lone = lone.clone();
            async move {
                match lone
                    .set_route(&"emitter".parse().unwrap(), &record_of(None), None)
                    .await
                {
                    Err(e @ EtcdError::NoQuorum) => Some(e),
                    _ => None,
                }
            }
        },
    )
    .await;
    assert!(refused.to_string().contains("quorum"), "{refused}");
    assert!(t0.elapsed() < Duration::from_secs(10));

    // The members come back: writes go through again with the same client.
    for &m in &down {
        cluster.restart(m).await;
    }
    eventually(
        Duration::from_secs(10),
        "a write once quorum is back",
        || {
            let lone = lone.clone();
            async move {
                let route: Route = [("1".parse().unwrap(), 100)].into();
                lone.set_route(&"emitter".parse().unwrap(), &record_of(Some(&route)), None)
                    .await
                    .ok()
            }
        },
    )
    .await;
}

/// A member frozen with SIGSTOP for 10 s holds its connections and answers nothing: renewals
/// and reads through a client of every member go on through the others, so an instance with a
/// 5 s TTL is never lost, and once renewals stop it still goes within its TTL + 1 s.
#[tokio::test]
async fn a_member_frozen_for_ten_seconds_loses_no_lease() {
    if !require(Needs::Etcd) {
        return;
    }
    let mut cluster = EtcdCluster::start(3).await;
    let etcd = connect(&cluster, &[0, 1, 2], "/t3").await;
    // A 5 s TTL: a frozen leader costs an election (500 ms here) plus the client's move to
    // another member (one attempt of 750 ms, after which the frozen member is passed over);
    // renewals must ride that out with room to spare on a busy machine. Every read below must
    // succeed too: a read that meets the frozen member moves on within the same call.
    let i = inst("a", 5000);
    let lease = etcd.grant(lease_seconds(i.ttl_ms)).await.unwrap();
    etcd.put_instance(&i, lease).await.unwrap();
    // Renewals every 400 ms, each noting how long it took.
    let renewer = {
        let etcd = etcd.clone();
        tokio::spawn(async move {
            let mut slow = Vec::new();
            let t0 = Instant::now();
            while t0.elapsed() < Duration::from_secs(10) {
                let t = Instant::now();
                let renewed = etcd.keep_alive(lease).await;
                if !matches!(renewed, Ok(true)) || t.elapsed() > Duration::from_secs(1) {
                    slow.push((t0.elapsed(), t.elapsed(), format!("{renewed:?}")));
                }
                tokio::time::sleep(Duration::from_millis(400)).await;
            }
            slow
        })
    };
    let frozen = cluster.leader().await;
    cluster.freeze(frozen);
    let t0 = Instant::now();
    let mut slowest = Duration::ZERO;
    while t0.elapsed() < Duration::from_secs(10) {
        let t = Instant::now();
        assert_eq!(ids(&etcd).await, ["a"], "lost after {:?}", t0.elapsed());
        slowest = slowest.max(t.elapsed());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!("the slowest read while a member was frozen took {slowest:?}");
    cluster.thaw(frozen);
    let slow = renewer.await.unwrap();
    assert!(
        slow.iter().all(|(_, _, r)| r == "Ok(true)"),
        "renewals failed while a member was frozen: {slow:?}"
    );
    let stopped = Instant::now();
    eventually(Duration::from_secs(8), "the instance to expire", || async {
        ids(&etcd).await.is_empty().then_some(())
    })
    .await;
    assert!(
        stopped.elapsed() <= Duration::from_millis(6000),
        "expiry within TTL + 1 s, took {:?}",
        stopped.elapsed()
    );
}

#[tokio::test]
async fn a_snapshot_holds_the_removal_causes_and_the_drains_still_in_etcd() {
    if !require(Needs::Etcd) {
        return;
    }
    let cluster = EtcdCluster::start(3).await;
    let etcd = connect(&cluster, &[0, 1, 2], "/t4").await;
    let gone = inst("gone", 60_000);
    let lease = etcd.grant(60).await.unwrap();
    etcd.put_instance(&gone, lease).await.unwrap();
    let removal = Removal {
        service: gone.service.clone(),
        id: gone.id.clone(),
        cause: RemoveCause::Deregistered,
        by: Some("web-reg".into()),
    };
    let (removed, deleted) = etcd.remove_instances(&[removal], lease).await.unwrap();
    assert_eq!(deleted, 1);

    // A service's drains: written only over the revision the writer read.
    let record = DrainRecord {
        maintenance: Maintenance::default(),
        action: MaintenanceAction {
            drained: false,
            target: Target::Instance(gone.id.clone()),
            reason: None,
            origin: "test".into(),
            by: None,
        },
        at: 1,
    };
    let Swap::Done(written) = etcd
        .set_maintenance(&gone.service, &record, 0, None)
        .await
        .unwrap()
    else {
        panic!("the first write of a service's drains expects no key");
    };
    let stale = etcd
        .set_maintenance(&gone.service, &record, 0, None)
        .await
        .unwrap();
    assert_eq!(stale, Swap::Stale(written), "a write over a moved key");

    let snap = etcd.snapshot().await.unwrap();
    assert!(snap.instances.is_empty());
    assert_eq!(
        snap.causes.get(&(gone.service.clone(), gone.id.clone())),
        Some(&(RemoveCause::Deregistered, Some("web-reg".into()), removed))
    );
    assert_eq!(snap.maintenance[&gone.service], (record, written));
}

/// `n` instances of `emitter` put under `prefix` on `lease`, a hundred per transaction.
async fn put_many(cluster: &EtcdCluster, prefix: &str, n: usize, lease: i64) -> Vec<Instance> {
    let instances: Vec<Instance> = (0..n)
        .map(|i| Instance {
            // Tags make each instance about 250 bytes, as a registrar's usually is.
            tags: vec![
                format!("zone-{}", i % 7).parse().unwrap(),
                "tier-web-frontend-canary".parse().unwrap(),
            ],
            ..inst(&format!("i-{i:05}"), 60_000)
        })
        .collect();
    let mut c = etcd_client::Client::connect(cluster.endpoints(), None)
        .await
        .expect("connecting to the cluster");
    for chunk in instances.chunks(100) {
        let ops: Vec<etcd_client::TxnOp> = chunk
            .iter()
            .map(|i| {
                etcd_client::TxnOp::put(
                    format!("{prefix}/instances/{}/{}", i.service, i.id),
                    serde_json::to_vec(i).unwrap(),
                    Some(etcd_client::PutOptions::new().with_lease(lease)),
                )
            })
            .collect();
        c.txn(etcd_client::Txn::new().and_then(ops))
            .await
            .expect("a put");
    }
    instances
}

#[tokio::test]
async fn removing_more_instances_than_one_transaction_takes_goes_through() {
    if !require(Needs::Etcd) {
        return;
    }
    let cluster = EtcdCluster::start(3).await;
    let etcd = connect(&cluster, &[0, 1, 2], "/t5").await;
    let lease = etcd.grant(60).await.unwrap();
    let n = 300;
    assert!(n > MAX_TXN_OPS * 2);
    let instances = put_many(&cluster, "/t5", n, lease).await;
    let start = etcd.snapshot().await.unwrap();
    assert_eq!(start.instances.len(), n);
    let mut watch = Box::pin(etcd.watch(start.revision).await.unwrap());
    let removals: Vec<Removal> = instances
        .iter()
        .map(|i| Removal {
            service: i.service.clone(),
            id: i.id.clone(),
            cause: RemoveCause::DockerStopped,
            by: None,
        })
        .collect();
    let (_, deleted) = etcd.remove_instances(&removals, lease).await.unwrap();
    assert_eq!(deleted, n as i64, "every key deleted");
    assert!(etcd.snapshot().await.unwrap().instances.is_empty());

    // Each deletion comes after the causes naming it, at the same revision.
    let mut causes: std::collections::HashMap<String, i64> = Default::default();
    let mut gone = 0;
    while gone < n {
        let (rev, change) = tokio::time::timeout(Duration::from_secs(5), watch.next())
            .await
            .expect("a change within 5 s")
            .expect("the watch goes on")
            .expect("a change");
        match change {
            Change::Causes(rs) => {
                assert!(
                    rs.len() < MAX_TXN_OPS,
                    "{} causes in one transaction",
                    rs.len()
                );
                for r in rs {
                    assert_eq!(r.cause, RemoveCause::DockerStopped);
                    causes.insert(r.id.to_string(), rev);
                }
            }
            Change::InstanceGone { id, .. } => {
                assert_eq!(causes.get(id.as_str()), Some(&rev), "{id}: its cause first");
                gone += 1;
            }
            other => panic!("unexpected change {other:?}"),
        }
    }
    assert_eq!(gone, n);
}

#[tokio::test]
async fn a_snapshot_larger_than_a_grpc_message_is_read_in_pages_at_one_revision() {
    if !require(Needs::Etcd) {
        return;
    }
    let cluster = EtcdCluster::start(3).await;
    let etcd = connect(&cluster, &[0, 1, 2], "/t6").await;
    let lease = etcd.grant(600).await.unwrap();
    // More than 4 MiB of instances, over many pages.
    let n = 22_000;
    let instances = put_many(&cluster, "/t6", n, lease).await;
    let bytes: usize = instances
        .iter()
        .map(|i| serde_json::to_vec(i).unwrap().len())
        .sum();
    assert!(bytes > 4 << 20, "{bytes} bytes of instances");
    assert!(n as i64 > SNAPSHOT_PAGE * 10);

    // A write between two pages does not show: every page is read at the first one's revision.
    let writer = etcd.clone();
    let late = inst("late", 60_000);
    let during = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(5)).await;
        writer.put_instance(&late, lease).await.unwrap()
    });
    let t0 = Instant::now();
    let snap = etcd.snapshot().await.expect("a snapshot in pages");
    let took = t0.elapsed();
    let late_rev = during.await.unwrap();
    let mut ids: Vec<String> = snap
        .instances
        .iter()
        .map(|(i, _, _)| i.id.to_string())
        .collect();
    ids.sort();
    ids.dedup();
    let want = if late_rev <= snap.revision { n + 1 } else { n };
    assert_eq!(
        ids.len(),
        want,
        "every instance once, at revision {}",
        snap.revision
    );
    assert_eq!(snap.instances.len(), want);
    assert!(took < Duration::from_secs(10), "snapshot took {took:?}");
}

#[tokio::test]
async fn a_watch_from_a_compacted_revision_ends_with_compacted() {
    if !require(Needs::Etcd) {
        return;
    }
    let cluster = EtcdCluster::start(3).await;
    let etcd = connect(&cluster, &[0, 1, 2], "/t7").await;
    let lease = etcd.grant(60).await.unwrap();
    let old = etcd.snapshot().await.unwrap().revision;
    etcd.put_instance(&inst("a", 60_000), lease).await.unwrap();
    let now = etcd.put_instance(&inst("b", 60_000), lease).await.unwrap();
    etcd.compact(now).await.unwrap();
    let mut watch = Box::pin(etcd.watch(old).await.unwrap());
    let first = tokio::time::timeout(Duration::from_secs(5), watch.next())
        .await
        .expect("an answer within 5 s")
        .expect("the watch says why it ends");
    assert!(
        matches!(first, Err(EtcdError::Compacted(r)) if r >= now),
        "{first:?}"
    );
    assert!(watch.next().await.is_none(), "the watch ends there");
}
