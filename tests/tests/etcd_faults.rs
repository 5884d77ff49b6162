//! Faults under steady load through a real ambassador, with two directory replicas on a real
//! three-member etcd cluster and two greetings registered by real registrars: the etcd leader
//! killed with SIGKILL, one member frozen with SIGSTOP for 10 s, and the directory replica that
//! the ambassador watches and the registrars heartbeat to killed with SIGKILL. Each costs no
//! failed request out of 20,000 and more, no server, no HAProxy reload, and no instance ever
//! leaves either replica's watch stream (a reconnecting watcher on each); and an instance
//! whose registrar dies afterwards still leaves within its TTL and one second. With two members
//! down (quorum lost) writes are refused with the reason while routing goes on, and once they
//! are back a new instance is routable within 2 s.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use baker_client::model::{ServiceName, WatchEvent};
use baker_tests::ambassador::TestAmbassador;
use baker_tests::directory::TestDirectory;
use baker_tests::etcd::EtcdCluster;
use baker_tests::greeting::Greeting;
use baker_tests::load::Load;
use baker_tests::{eventually, require, Needs, Proc};
use futures_util::StreamExt;

/// The registrars' probe interval; their TTL is three of them.
const INTERVAL: &str = "1s";
const TTL: Duration = Duration::from_secs(3);
/// Requests through the ambassador during and after each fault.
const REQUESTS: u64 = 20_000;

struct Rig {
    cluster: EtcdCluster,
    first: TestDirectory,
    second: TestDirectory,
    amb: TestAmbassador,
    load: Load,
    registrars: Vec<Proc>,
    _greetings: Vec<Greeting>,
    /// Every time a or b left a replica's stream: (replica, what the stream said).
    left: Arc<Mutex<Vec<String>>>,
    watchers: Vec<tokio::task::JoinHandle<()>>,
}

/// Watches `dir` until aborted, reconnecting when its stream ends, and notes in `left` every
/// time a or b leaves it: a removal, or a snapshot (on a reconnect) without it.
fn watch_for_departures(
    dir: &TestDirectory,
    left: Arc<Mutex<Vec<String>>>,
) -> tokio::task::JoinHandle<()> {
    let (client, url) = (dir.client.clone(), dir.url.clone());
    tokio::spawn(async move {
        loop {
            let Ok(stream) = client.watch().await else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            let mut stream = std::pin::pin!(stream);
            while let Some(Ok(event)) = stream.next().await {
                let gone = match event {
                    WatchEvent::Snapshot { services, .. } => {
                        let listed = services.get(&"emitter".parse::<ServiceName>().unwrap());
                        ["a", "b"]
                            .into_iter()
                            .filter(|id| {
                                !listed.is_some_and(|l| l.iter().any(|i| i.id.as_str() == *id))
                            })
                            .map(|id| format!("{url}: {id} missing from a snapshot"))
                            .collect()
                    }
                    WatchEvent::Remove {
                        cause, instance, ..
                    } => {
                        vec![format!(
                            "{url}: {} removed ({})",
                            instance.id,
                            cause.as_str()
                        )]
                    }
                    _ => vec![],
                };
                left.lock().unwrap().extend(gone);
            }
        }
    })
}

async fn ids(dir: &TestDirectory) -> Vec<String> {
    dir.client
        .service("emitter")
        .await
        .map(|s| s.instances.iter().map(|i| i.id.to_string()).collect())
        .unwrap_or_default()
}

/// Two replicas, registrars a and b heartbeating to the first, an ambassador watching the
/// first, and load through it on both servers.
async fn rig() -> Rig {
    let cluster = EtcdCluster::start(3).await;
    let store = cluster.store_url("/baker");
    let first = TestDirectory::start(&[("BAKER_STORE", &store)]).await;
    let second = first.replica().await;
    let list = format!("{},{}", first.url, second.url);
    let greetings = vec![
        Greeting::start("1", "a").await,
        Greeting::start("1", "b").await,
    ];
    let registrars = vec![
        greetings[0].registrar(&list, "a", INTERVAL),
        greetings[1].registrar(&list, "b", INTERVAL),
    ];
    for dir in [&first, &second] {
        eventually(
            Duration::from_secs(10),
            "a and b on both replicas",
            || async { (ids(dir).await == ["a", "b"]).then_some(()) },
        )
        .await;
    }
    let amb = TestAmbassador::start(&list, &["emitter"], &[]).await;
    let load = Load::start(&format!("{}/greeting", amb.url("emitter")), 4);
    eventually(
        Duration::from_secs(10),
        "both servers taking requests",
        || async { (load.by_instance().len() == 2).then_some(()) },
    )
    .await;
    load.more(1_000, Duration::from_secs(30)).await;
    let left = Arc::new(Mutex::new(Vec::new()));
    let watchers = vec![
        watch_for_departures(&first, left.clone()),
        watch_for_departures(&second, left.clone()),
    ];
    Rig {
        cluster,
        first,
        second,
        amb,
        load,
        registrars,
        _greetings: greetings,
        left,
        watchers,
    }
}

impl Rig {
    /// Drives `REQUESTS` more requests, then checks that none failed, that both servers took
    /// requests to the end, that the live replicas (both, or only the second when
    /// `first_alive` is false) still list both instances, and that HAProxy never reloaded;
    /// then kills registrar a and checks that a leaves within TTL + 1 s.
    async fn check(self, what: &str, first_alive: bool) {
        let Rig {
            cluster: _cluster,
            first,
            second,
            amb,
            load,
            mut registrars,
            _greetings,
            left,
            watchers,
        } = self;
        let live: Vec<&TestDirectory> = if first_alive {
            vec![&second, &first]
        } else {
            vec![&second]
        };
        let reloads = amb.proc_info();
        let before = load.by_instance();
        load.more(REQUESTS, Duration::from_secs(120)).await;
        let after = load.by_instance();
        for id in ["a", "b"] {
            assert!(
                after[id] > before[id],
                "{what}: {id} stopped taking requests"
            );
        }
        for dir in &live {
            assert_eq!(
                ids(dir).await,
                ["a", "b"],
                "{what}: no instance may be lost"
            );
        }
        let (ok, failures) = load.finish().await;
        eprintln!("{what}: {ok} requests, {} failed", failures.len());
        assert!(
            failures.is_empty(),
            "{what}: {} of {} requests failed: {:?}",
            failures.len(),
            ok + failures.len() as u64,
            &failures[..failures.len().min(5)]
        );
        assert!(ok >= REQUESTS, "{what}: only {ok} requests");
        assert_eq!(amb.proc_info(), reloads, "{what}: HAProxy must not reload");
        assert!(
            !amb.proc.log_text().contains("the grace period ended"),
            "{what}: no server may be dropped"
        );
        for w in watchers {
            w.abort();
        }
        let left = left.lock().unwrap().clone();
        assert!(
            left.is_empty(),
            "{what}: instances left a replica's stream: {left:?}"
        );

        registrars[0].kill9();
        let killed = Instant::now();
        eventually(TTL + Duration::from_secs(5), "a to expire", || async {
            (ids(live[0]).await == ["b"]).then_some(())
        })
        .await;
        let took = killed.elapsed();
        eprintln!("{what}: a expired {took:?} after its registrar died (TTL {TTL:?})");
        assert!(
            took <= TTL + Duration::from_secs(1),
            "{what}: a expired {took:?} after its registrar died, past its TTL of {TTL:?} + 1 s"
        );
    }
}

#[tokio::test]
async fn the_etcd_leader_killed_under_load() {
    if !require(Needs::Haproxy) || !require(Needs::Etcd) {
        return;
    }
    let mut rig = rig().await;
    let leader = rig.cluster.leader().await;
    rig.cluster.kill9(leader);
    rig.check("etcd leader killed", true).await;
}

#[tokio::test]
async fn one_etcd_member_frozen_for_ten_seconds_under_load() {
    if !require(Needs::Haproxy) || !require(Needs::Etcd) {
        return;
    }
    let mut rig = rig().await;
    let leader = rig.cluster.leader().await;
    rig.cluster.freeze(leader);
    let frozen = Instant::now();
    rig.load.more(REQUESTS / 4, Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_secs(10).saturating_sub(frozen.elapsed())).await;
    rig.cluster.thaw(leader);
    rig.check("etcd leader frozen for 10 s", true).await;
}

#[tokio::test]
async fn the_directory_replica_in_use_killed_under_load() {
    if !require(Needs::Haproxy) || !require(Needs::Etcd) {
        return;
    }
    let mut rig = rig().await;
    rig.first.kill9();
    let url = rig.second.url.clone();
    rig.amb
        .proc
        .wait_for_log(
            &format!("watching the directory directory={url}"),
            Duration::from_secs(15),
        )
        .await;
    rig.check("directory replica killed", false).await;
}

#[tokio::test]
async fn a_lost_quorum_keeps_routing_refuses_writes_and_a_new_instance_routes_soon_after() {
    if !require(Needs::Haproxy) || !require(Needs::Etcd) {
        return;
    }
    let mut rig = rig().await;
    let leader = rig.cluster.leader().await;
    let other = (0..3).find(|i| *i != leader).expect("three members");
    rig.cluster.kill9(leader);
    rig.cluster.kill9(other);
    let c = Greeting::start("1", "c").await;
    let refused = rig
        .second
        .client
        .register("emitter", "c", &c.spec("1", 60_000))
        .await
        .unwrap_err();
    assert_eq!(
        refused.status(),
        Some(reqwest::StatusCode::SERVICE_UNAVAILABLE),
        "{refused}"
    );
    assert!(refused.to_string().contains("lost its quorum"), "{refused}");
    // Routing goes on, to both servers, while the registrars' heartbeats are refused.
    let reloads = rig.amb.proc_info();
    rig.load.more(REQUESTS / 4, Duration::from_secs(60)).await;
    assert_eq!(rig.load.failed(), 0, "no request may fail without a quorum");

    rig.cluster.restart(leader).await;
    rig.cluster.restart(other).await;
    rig.cluster.wait_leader(Duration::from_secs(10)).await;
    let back = Instant::now();
    let spec = c.spec("1", 60_000);
    eventually(Duration::from_secs(10), "c registered", || async {
        rig.second.client.register("emitter", "c", &spec).await.ok()
    })
    .await;
    eventually(Duration::from_secs(10), "c taking requests", || async {
        rig.load.by_instance().contains_key("c").then_some(())
    })
    .await;
    let took = back.elapsed();
    eprintln!("quorum back: c routable {took:?} after the cluster had a leader again");
    assert!(
        took <= Duration::from_secs(2),
        "c took {took:?} to be routable after the quorum returned"
    );
    assert_eq!(rig.amb.proc_info(), reloads, "HAProxy must not reload");
    assert_eq!(
        ids(&rig.first).await,
        ["a", "b", "c"],
        "no instance may be lost"
    );
    let left = rig.left.lock().unwrap().clone();
    assert!(
        left.is_empty(),
        "instances left a replica's stream: {left:?}"
    );
    let (ok, failures) = rig.load.finish().await;
    assert!(
        failures.is_empty(),
        "{} of {ok} failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
}
