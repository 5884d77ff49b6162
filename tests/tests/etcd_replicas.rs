//! Directory replicas on one etcd table (`BAKER_STORE=etcd://...`), against a real
//! three-member cluster: a write is read back at once from the replica that took it and seen by
//! the others, every replica streams the same changes at the same indexes, an instance expires
//! within its TTL (with the cause `expired`) whichever replica took its last heartbeat, and a
//! lost quorum refuses writes with the reason while reads go on, until it returns. A drain taken
//! by one replica shows on the others (API, watch stream, instance state, their ambassadors'
//! servers) and outlives them all; drains of one service through two replicas at once are all
//! kept. An instance's zone is kept in etcd, and a new zone is a change on every replica.

use std::time::{Duration, Instant};

use baker_client::change::RemoveCause;
use baker_client::events::EventKind;
use baker_client::maintenance::{InstanceState, Target};
use baker_client::model::{InstanceSpec, ServiceResponse, WatchEvent};
use baker_client::ClientError;
use baker_directory::etcd::{Etcd, StoreUrl};
use baker_tests::ambassador::TestAmbassador;
use baker_tests::directory::TestDirectory;
use baker_tests::etcd::EtcdCluster;
use baker_tests::greeting::{register, Greeting};
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
        zone: None,
    }
}

/// A fresh three-member cluster and two replicas on it.
async fn cluster_and_replicas() -> (EtcdCluster, TestDirectory, TestDirectory) {
    let cluster = EtcdCluster::start(3).await;
    let store = cluster.store_url("/baker");
    let a = TestDirectory::start(&[("BAKER_STORE", &store)]).await;
    let b = a.replica().await;
    (cluster, a, b)
}

/// The next line of `watch`, within 15 s.
async fn next_event(
    watch: &mut (impl Stream<Item = Result<WatchEvent, ClientError>> + Unpin),
) -> WatchEvent {
    tokio::time::timeout(Duration::from_secs(15), watch.next())
        .await
        .expect("a change within 15 s")
        .expect("the stream goes on")
        .expect("a readable event")
}

/// Waits until `dir` lists `n` instances of emitter.
async fn lists_emitters(dir: &TestDirectory, n: usize, what: &str) {
    eventually(Duration::from_secs(5), what, || async {
        (dir.client.service("emitter").await.ok()?.instances.len() == n).then_some(())
    })
    .await;
}

/// Asserts that `refused` is a 503 that gives the lost quorum as its reason.
fn refused_for_quorum(refused: &ClientError) {
    assert_eq!(
        refused.status(),
        Some(StatusCode::SERVICE_UNAVAILABLE),
        "{refused}"
    );
    assert!(refused.to_string().contains("lost its quorum"), "{refused}");
}

/// (index, prev, what) of each change line, until `until` matches one.
async fn changes_until(
    watch: &mut (impl Stream<Item = Result<WatchEvent, ClientError>> + Unpin),
    until: impl Fn(&WatchEvent) -> bool,
) -> Vec<(u64, u64, String)> {
    let mut out = Vec::new();
    loop {
        let event = next_event(watch).await;
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
    let (_cluster, a, b) = cluster_and_replicas().await;
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
async fn a_zone_is_kept_in_the_store_and_a_new_zone_is_a_change_everywhere() {
    if !require(Needs::Etcd) {
        return;
    }
    let (_cluster, a, b) = cluster_and_replicas().await;
    let mut wb = Box::pin(b.client.watch().await.unwrap());
    wb.next().await.unwrap().unwrap();
    let zoned = |zone: &str| InstanceSpec {
        zone: Some(zone.into()),
        ..spec(8001, 60_000)
    };
    a.client
        .register("emitter", "one", &zoned("zone-a"))
        .await
        .unwrap();
    // A heartbeat with the same zone changes nothing; another zone is a change.
    a.client
        .register("emitter", "one", &zoned("zone-a"))
        .await
        .unwrap();
    let moved = a
        .client
        .register("emitter", "one", &zoned("zone-b"))
        .await
        .unwrap();
    assert_eq!(moved.zone.as_ref().map(|z| z.as_str()), Some("zone-b"));
    let in_b = |e: &WatchEvent| {
        matches!(e, WatchEvent::Upsert { instance, .. }
            if instance.zone.as_ref().map(|z| z.as_str()) == Some("zone-b"))
    };
    let seen = changes_until(&mut wb, in_b).await;
    let whats: Vec<&str> = seen.iter().map(|(_, _, w)| w.as_str()).collect();
    assert_eq!(whats, ["upsert one registered", "upsert one changed"]);
    let listed = b.client.service("emitter").await.unwrap().instances;
    assert_eq!(
        listed
            .iter()
            .map(|i| i.zone.as_ref().map(|z| z.to_string()))
            .collect::<Vec<_>>(),
        [Some("zone-b".to_owned())],
        "the replica that did not take the write reads the zone from etcd"
    );
    eventually(
        Duration::from_secs(5),
        "b's history tells the change",
        || async {
            let events = b
                .client
                .events(None, None, Some("emitter"), None)
                .await
                .ok()?;
            let kinds: Vec<EventKind> = events.events.iter().map(|e| e.kind).collect();
            (kinds == [EventKind::Registered, EventKind::Changed]).then_some(())
        },
    )
    .await;
}

/// The etcd cluster's revision now: it moves with every write, and only with writes.
/// When emitter/`id` joined the directory, as `dir` lists it.
async fn since_of(dir: &TestDirectory, id: &str) -> u64 {
    let service = dir
        .client
        .service("emitter")
        .await
        .expect("reading emitter");
    let i = service
        .instances
        .iter()
        .find(|i| i.id == id)
        .unwrap_or_else(|| panic!("emitter/{id} is listed"));
    assert_ne!(i.since, 0, "emitter/{id} says when it joined");
    i.since
}

async fn revision(etcd: &Etcd) -> i64 {
    etcd.snapshot().await.expect("a snapshot").revision
}

#[tokio::test]
async fn heartbeats_end_at_the_replica_and_a_registrar_that_moves_takes_one_write() {
    if !require(Needs::Etcd) {
        return;
    }
    let (cluster, a, b) = cluster_and_replicas().await;
    let url: StoreUrl = cluster.store_url("/baker").parse().expect("a store URL");
    let etcd = Etcd::connect(&url).await.expect("connecting to etcd");
    const N: u64 = 20;
    const TTL: u64 = 3000;
    for i in 0..N {
        a.client
            .register("emitter", &format!("i{i}"), &spec(8000 + i, TTL))
            .await
            .unwrap();
    }
    lists_emitters(&b, N as usize, "b to list every instance").await;
    let mut wa = Box::pin(a.client.watch().await.unwrap());
    let mut wb = Box::pin(b.client.watch().await.unwrap());
    next_event(&mut wa).await;
    next_event(&mut wb).await;

    // Ten rounds of heartbeats through the replica that took the registrations: no write.
    let before = revision(&etcd).await;
    for _ in 0..10 {
        for i in 0..N {
            a.client
                .register("emitter", &format!("i{i}"), &spec(8000 + i, TTL))
                .await
                .unwrap();
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(
        revision(&etcd).await,
        before,
        "{} heartbeats that changed nothing wrote nothing to etcd",
        10 * N
    );
    // Only a saw them: b's last_seen (the CLI's SEEN) is still that of the registration
    // (docs/ha.md), three seconds of heartbeats behind a's.
    let seen = |service: ServiceResponse| {
        let i = service.instances.iter().find(|i| i.id == "i2").cloned();
        i.expect("i2 is listed").last_seen
    };
    let (seen_a, seen_b) = (
        seen(a.client.service("emitter").await.unwrap()),
        seen(b.client.service("emitter").await.unwrap()),
    );
    assert!(
        seen_a >= seen_b + 2_500,
        "last seen on a {seen_a}, on b {seen_b}"
    );

    // i0's registrar moves to b: one write, which changes nothing any watcher sees, nor when
    // i0 joined.
    let joined = since_of(&a, "i0").await;
    b.client
        .register("emitter", "i0", &spec(8000, TTL))
        .await
        .unwrap();
    let moved = revision(&etcd).await;
    assert_eq!(moved, before + 1, "the move took one write");
    assert_eq!(
        since_of(&b, "i0").await,
        joined,
        "i0 joined when it did, on b"
    );
    assert_eq!(
        since_of(&a, "i0").await,
        joined,
        "i0 joined when it did, on a"
    );

    // From now on i0 heartbeats through b, the others through a, but for i1: nobody renews
    // it, and it expires within its TTL on both replicas, as `expired`.
    let (ca, cb) = (a.client.clone(), b.client.clone());
    let beats = tokio::spawn(async move {
        loop {
            for i in (0..N).filter(|i| *i != 1) {
                let client = if i == 0 { &cb } else { &ca };
                client
                    .register("emitter", &format!("i{i}"), &spec(8000 + i, TTL))
                    .await
                    .expect("a heartbeat answered");
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    });
    let silent = Instant::now();
    let expired = |e: &WatchEvent| {
        matches!(e, WatchEvent::Remove { cause: RemoveCause::Expired, instance, .. }
            if instance.id == "i1")
    };
    let seen_a = changes_until(&mut wa, expired).await;
    let took = silent.elapsed();
    let seen_b = changes_until(&mut wb, expired).await;
    eprintln!("i1 expired {took:?} after its last heartbeat (TTL 3 s): {seen_a:?}");
    assert!(
        took < Duration::from_millis(TTL + 1000),
        "expired {took:?} after its last heartbeat (TTL 3 s)"
    );
    assert_eq!(seen_a, seen_b, "both replicas stream the same changes");
    let whats: Vec<&str> = seen_a.iter().map(|(_, _, w)| w.as_str()).collect();
    assert_eq!(whats, ["remove i1 expired"], "nothing else left the stream");
    // Two more seconds of heartbeats: still nothing written but the expiry.
    tokio::time::sleep(Duration::from_secs(2)).await;
    beats.abort();
    assert_eq!(
        revision(&etcd).await,
        moved + 1,
        "the expiry is the only write"
    );
    lists_emitters(&a, N as usize - 1, "a to list the live instances").await;
    lists_emitters(&b, N as usize - 1, "b to list the live instances").await;
}

#[tokio::test]
async fn a_lost_quorum_refuses_writes_with_the_reason_and_recovers_without_a_restart() {
    if !require(Needs::Etcd) {
        return;
    }
    let (mut cluster, a, b) = cluster_and_replicas().await;
    a.client
        .register("emitter", "kept", &spec(8001, 60_000))
        .await
        .unwrap();
    lists_emitters(&b, 1, "b to see the instance").await;

    let leader = cluster.leader().await;
    let others: Vec<usize> = (0..3).filter(|i| *i != leader).collect();
    cluster.kill9(leader);
    cluster.kill9(others[0]);
    let refused = a
        .client
        .register("emitter", "new", &spec(8002, 60_000))
        .await
        .unwrap_err();
    refused_for_quorum(&refused);
    let route = b
        .client
        .set_route_forced("emitter", &[("1".to_owned(), 100)].into())
        .await
        .unwrap_err();
    refused_for_quorum(&route);
    let drain = b
        .client
        .drain("emitter", &Target::Instance("kept".parse().unwrap()), None)
        .await
        .unwrap_err();
    refused_for_quorum(&drain);
    // Reads answer from the last view, on both replicas; the refused drain changed nothing.
    for d in [&a, &b] {
        let svc = d.client.service("emitter").await.unwrap();
        assert_eq!(svc.instances[0].id, "kept");
        assert_eq!(svc.instances[0].state, InstanceState::Up);
        assert!(d.client.maintenance().await.unwrap().maintenance.is_empty());
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
    lists_emitters(&b, 2, "b to see the new instance").await;
    eprintln!(
        "writes accepted and seen by both replicas {:?} after the members returned",
        back.elapsed()
    );
}

/// The admin state of each server of `greeting` in `amb`'s HAProxy, once it is `want` for every
/// server named there.
async fn servers_become(amb: &TestAmbassador, want: &[(&str, &str)]) {
    eventually(
        Duration::from_secs(20),
        &format!("greeting's servers {want:?}"),
        || async {
            let servers = amb.servers("greeting");
            want.iter()
                .all(|(name, state)| servers.get(*name).map(String::as_str) == Some(*state))
                .then_some(())
        },
    )
    .await;
}

/// The next `maintenance` change on `watch`, skipping other lines.
async fn next_maintenance(
    watch: &mut (impl Stream<Item = Result<WatchEvent, ClientError>> + Unpin),
) -> WatchEvent {
    loop {
        let event = next_event(watch).await;
        if matches!(event, WatchEvent::Maintenance { .. }) {
            return event;
        }
    }
}

/// The state of `greeting`'s instance `id` as `dir` lists it.
async fn state_of(dir: &TestDirectory, id: &str) -> InstanceState {
    let listed = dir.client.service("greeting").await.unwrap();
    listed
        .instances
        .iter()
        .find(|i| i.id == id)
        .unwrap_or_else(|| panic!("{id} is not listed: {listed:?}"))
        .state
}

#[tokio::test]
async fn a_drain_through_one_replica_drains_everywhere_and_outlives_every_replica() {
    if !require(Needs::Etcd) || !require(Needs::Haproxy) {
        return;
    }
    let (cluster, mut a, mut b) = cluster_and_replicas().await;
    let store = cluster.store_url("/baker");
    let (g1, g2) = (
        Greeting::start("1", "g1").await,
        Greeting::start("1", "g2").await,
    );
    register(&a.client, "greeting", &g1, "g1", "1", 600_000).await;
    register(&a.client, "greeting", &g2, "g2", "1", 600_000).await;
    // The ambassador watches b; the drain goes through a.
    let amb = TestAmbassador::start(&b.url, &["greeting"], &[("BAKER_ID", "amb")]).await;
    servers_become(&amb, &[("g1", "ready"), ("g2", "ready")]).await;
    let mut wb = Box::pin(b.client.watch().await.unwrap());
    wb.next().await.unwrap().unwrap();

    let g1_target = Target::Instance("g1".parse().unwrap());
    let drained = a
        .client
        .clone()
        .with_origin("cli:ops")
        .drain("greeting", &g1_target, Some("disk swap"))
        .await
        .unwrap();
    // b streams the change at the index a answered with, with who did it and why.
    match next_maintenance(&mut wb).await {
        WatchEvent::Maintenance {
            index,
            service,
            maintenance,
            action,
            ..
        } => {
            assert_eq!(index, drained.index);
            assert_eq!(service, "greeting");
            assert_eq!(maintenance.len(), 1);
            assert!(action.drained);
            assert_eq!(action.target, g1_target);
            assert_eq!(action.origin, "cli:ops from 127.0.0.1");
            assert_eq!(action.reason.unwrap().as_str(), "disk swap");
        }
        other => unreachable!("{other:?}"),
    }
    let listed = b.client.maintenance().await.unwrap();
    assert_eq!(listed.maintenance.len(), 1, "{listed:?}");
    assert_eq!(listed.maintenance[0].target(), Some(g1_target.clone()));
    assert_eq!(listed.maintenance[0].origin, "cli:ops from 127.0.0.1");
    assert_eq!(state_of(&b, "g1").await, InstanceState::Draining);
    assert_eq!(state_of(&b, "g2").await, InstanceState::Up);
    servers_become(&amb, &[("g1", "drain"), ("g2", "ready")]).await;
    // A heartbeat through either replica answers with the drain, as on the memory store.
    for (name, dir) in [("a", &a), ("b", &b)] {
        let answered = dir
            .client
            .register("greeting", "g1", &g1.spec("1", 600_000))
            .await
            .unwrap();
        assert_eq!(answered.state, InstanceState::Draining, "through {name}");
    }

    // Both replicas die: the drain is in etcd; a new replica has it, and b, restarted, too.
    a.kill9();
    b.kill9();
    let c = TestDirectory::start(&[("BAKER_STORE", &store)]).await;
    let kept = c.client.maintenance().await.unwrap();
    assert_eq!(kept.maintenance.len(), 1, "{kept:?}");
    assert_eq!(
        kept.maintenance[0].reason.as_ref().unwrap().as_str(),
        "disk swap"
    );
    assert_eq!(state_of(&c, "g1").await, InstanceState::Draining);
    b.restart().await;
    assert_eq!(state_of(&b, "g1").await, InstanceState::Draining);
    let mut wb = Box::pin(b.client.watch().await.unwrap());
    match wb.next().await.unwrap().unwrap() {
        WatchEvent::Snapshot { maintenance, .. } => {
            assert_eq!(maintenance["greeting"].len(), 1, "{maintenance:?}")
        }
        other => panic!("the stream starts with a snapshot, not {other:?}"),
    }

    // Undrained through the new replica: b streams it, and the ambassador's server is ready.
    let undrained = c.client.undrain("greeting", &g1_target).await.unwrap();
    match next_maintenance(&mut wb).await {
        WatchEvent::Maintenance {
            index,
            maintenance,
            action,
            ..
        } => {
            assert_eq!(index, undrained.index);
            assert!(maintenance.is_empty(), "{maintenance:?}");
            assert!(!action.drained);
            assert_eq!(action.target, g1_target);
        }
        other => unreachable!("{other:?}"),
    }
    assert!(b.client.maintenance().await.unwrap().maintenance.is_empty());
    assert_eq!(state_of(&b, "g1").await, InstanceState::Up);
    servers_become(&amb, &[("g1", "ready"), ("g2", "ready")]).await;

    // History is each replica's own (docs/ha.md): b, restarted, and c, new, both have the
    // undrain they streamed, and neither has what happened before it started.
    for (name, dir) in [("b", &b), ("c", &c)] {
        let events = dir.client.events(None, None, None, None).await.unwrap();
        let indexes: Vec<u64> = events.events.iter().map(|e| e.index).collect();
        assert!(indexes.contains(&undrained.index), "{name}: {indexes:?}");
        assert!(
            indexes.iter().all(|i| *i > drained.index),
            "{name} has events from before it started: {indexes:?}"
        );
    }
}

#[tokio::test]
async fn drains_of_one_service_through_two_replicas_at_once_are_all_kept() {
    if !require(Needs::Etcd) {
        return;
    }
    let (_cluster, a, b) = cluster_and_replicas().await;
    // Each call reads the service's drains, adds its own and writes them back: the writes race.
    let calls = (0..8).map(|i| {
        let client = if i % 2 == 0 { &a.client } else { &b.client };
        let target = Target::Instance(format!("g{i}").parse().unwrap());
        // None of them is registered: forced.
        async move { client.drain_forced("greeting", &target, None).await }
    });
    for result in futures_util::future::join_all(calls).await {
        result.unwrap();
    }
    for d in [&a, &b] {
        eventually(
            Duration::from_secs(5),
            "all eight drains listed",
            || async {
                let listed = d.client.maintenance().await.ok()?;
                (listed.maintenance.len() == 8).then_some(())
            },
        )
        .await;
    }
}
