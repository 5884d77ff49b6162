//! Directory replicas on one etcd table (`BAKER_STORE=etcd://...`), against a real
//! three-member cluster: a write is read back at once from the replica that took it and seen by
//! the others, every replica streams the same changes at the same indexes, an instance expires
//! within its TTL (with the cause `expired`) whichever replica took its last heartbeat, and a
//! lost quorum refuses writes with the reason while reads go on, until it returns.

use std::time::{Duration, Instant};

use baker_client::change::RemoveCause;
use baker_client::model::{InstanceSpec, WatchEvent};
use baker_client::ClientError;
use baker_tests::directory::TestDirectory;
use baker_tests::etcd::EtcdCluster;
use baker_tests::{eventually, require, Needs};
use futures_util::{Stream, StreamExt};
use reqwest::StatusCode;

fn spec(port: u64, ttl_ms: u64) -> InstanceSpec {
    InstanceSpec {
        address: "127.0.0.1".into(),
        port,
        version: None,
        weight: None,
        tags: vec![],
        ttl_ms: Some(ttl_ms),
    }
}

/// Two replicas on a fresh cluster.
async fn replicas(cluster: &EtcdCluster) -> (TestDirectory, TestDirectory) {
    let store = cluster.store_url("/baker");
    let a = TestDirectory::start(&[("BAKER_STORE", &store)]).await;
    let b = a.replica().await;
    (a, b)
}

/// (index, prev, what) of each change line, until `until` matches one.
async fn changes_until(
    watch: &mut (impl Stream<Item = Result<WatchEvent, ClientError>> + Unpin),
    until: impl Fn(&WatchEvent) -> bool,
) -> Vec<(u64, u64, String)> {
    let mut out = Vec::new();
    loop {
        let event = tokio::time::timeout(Duration::from_secs(15), watch.next())
            .await
            .expect("a change within 15 s")
            .expect("the stream goes on")
            .expect("a readable event");
        let line = match &event {
            WatchEvent::Upsert {
                index,
                prev,
                cause,
                instance,
                ..
            } => (
                *index,
                *prev,
                format!("upsert {} {}", instance.id, cause.as_str()),
            ),
            WatchEvent::Remove {
                index,
                prev,
                cause,
                instance,
                ..
            } => (
                *index,
                *prev,
                format!("remove {} {}", instance.id, cause.as_str()),
            ),
            WatchEvent::Route {
                index,
                prev,
                service,
                route,
                ..
            } => (
                *index,
                prev.unwrap_or_default(),
                format!("route {service} {}", route.is_some()),
            ),
            _ => continue,
        };
        out.push(line);
        if until(&event) {
            return out;
        }
    }
}

#[tokio::test]
async fn replicas_serve_one_table_and_stream_the_same_changes() {
    if !require(Needs::Etcd) {
        return;
    }
    let cluster = EtcdCluster::start(3).await;
    let (a, b) = replicas(&cluster).await;
    let mut wa = Box::pin(a.client.watch().await.unwrap());
    let mut wb = Box::pin(b.client.watch().await.unwrap());
    let (sa, sb) = (
        wa.next().await.unwrap().unwrap(),
        wb.next().await.unwrap().unwrap(),
    );
    assert_eq!(sa, sb, "both replicas start from the same snapshot");

    // Read-your-writes on the replica that took the write; the other follows.
    a.client
        .register("emitter", "one", &spec(8001, 60_000))
        .await
        .unwrap();
    assert_eq!(
        a.client.service("emitter").await.unwrap().instances.len(),
        1
    );
    b.client
        .set_route_forced("emitter", &[("1".to_owned(), 100)].into())
        .await
        .unwrap();
    assert!(b
        .client
        .routes()
        .await
        .unwrap()
        .routes
        .contains_key("emitter"));
    b.client.deregister("emitter", "one").await.unwrap();
    assert!(b
        .client
        .service("emitter")
        .await
        .unwrap()
        .instances
        .is_empty());

    // An instance renewed through b, then left alone: etcd expires it within its TTL.
    a.client
        .register("emitter", "two", &spec(8002, 2000))
        .await
        .unwrap();
    b.client
        .register("emitter", "two", &spec(8002, 2000))
        .await
        .unwrap();
    let last_heartbeat = Instant::now();
    let expired = |e: &WatchEvent| {
        matches!(e, WatchEvent::Remove { cause: RemoveCause::Expired, instance, .. }
            if instance.id == "two")
    };
    let seen_a = changes_until(&mut wa, expired).await;
    let took = last_heartbeat.elapsed();
    let seen_b = changes_until(&mut wb, expired).await;
    eprintln!("expiry of a 2 s TTL seen after {took:?}: {seen_a:?}");
    assert!(
        took < Duration::from_millis(3000),
        "expired {took:?} after its last heartbeat (TTL 2 s)"
    );
    assert_eq!(seen_a, seen_b, "both replicas stream the same changes");
    let whats: Vec<&str> = seen_a.iter().map(|(_, _, w)| w.as_str()).collect();
    assert_eq!(
        whats,
        [
            "upsert one registered",
            "route emitter true",
            "remove one deregistered",
            "upsert two registered",
            "remove two expired",
        ]
    );
    for pair in seen_a.windows(2) {
        assert_eq!(
            pair[1].1, pair[0].0,
            "each line's prev is the index before it"
        );
        assert!(pair[1].0 > pair[0].0);
    }
}

#[tokio::test]
async fn a_lost_quorum_refuses_writes_with_the_reason_and_recovers_without_a_restart() {
    if !require(Needs::Etcd) {
        return;
    }
    let mut cluster = EtcdCluster::start(3).await;
    let (a, b) = replicas(&cluster).await;
    a.client
        .register("emitter", "kept", &spec(8001, 60_000))
        .await
        .unwrap();
    eventually(Duration::from_secs(5), "b to see the instance", || async {
        (b.client.service("emitter").await.ok()?.instances.len() == 1).then_some(())
    })
    .await;

    let leader = cluster.leader().await;
    let others: Vec<usize> = (0..3).filter(|i| *i != leader).collect();
    cluster.kill9(leader);
    cluster.kill9(others[0]);
    let refused = a
        .client
        .register("emitter", "new", &spec(8002, 60_000))
        .await
        .unwrap_err();
    assert_eq!(
        refused.status(),
        Some(StatusCode::SERVICE_UNAVAILABLE),
        "{refused}"
    );
    assert!(refused.to_string().contains("lost its quorum"), "{refused}");
    let route = b
        .client
        .set_route_forced("emitter", &[("1".to_owned(), 100)].into())
        .await
        .unwrap_err();
    assert_eq!(
        route.status(),
        Some(StatusCode::SERVICE_UNAVAILABLE),
        "{route}"
    );
    // Reads answer from the last view, on both replicas.
    for d in [&a, &b] {
        let svc = d.client.service("emitter").await.unwrap();
        assert_eq!(svc.instances[0].id, "kept");
    }

    cluster.restart(leader).await;
    cluster.restart(others[0]).await;
    let back = Instant::now();
    eventually(
        Duration::from_secs(15),
        "a write to succeed again",
        || async {
            a.client
                .register("emitter", "new", &spec(8002, 60_000))
                .await
                .ok()
        },
    )
    .await;
    eventually(
        Duration::from_secs(5),
        "b to see the new instance",
        || async { (b.client.service("emitter").await.ok()?.instances.len() == 2).then_some(()) },
    )
    .await;
    eprintln!(
        "writes accepted and seen by both replicas {:?} after the members returned",
        back.elapsed()
    );
}
