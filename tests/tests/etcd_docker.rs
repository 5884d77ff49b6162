//! Two directory replicas with Docker discovery on the same engine, sharing one table in a real
//! three-member etcd cluster (`BAKER_STORE=etcd://...`), each with its own `BAKER_NODE`.
//!
//! Both see every labelled container; the table holds it once, bound to one replica's lease and
//! carrying that replica's node, and neither replica rewrites or removes what the other owns.
//! A replica killed with SIGKILL leaves its containers in the table until its lease runs out
//! (`REPLICA_LEASE`), then the other takes them over; a replica stopped with SIGTERM revokes its
//! lease, so its containers leave at once and the other takes them over.
//!
//! Needs the images from `docker/build.sh` and etcd; run under the Docker lock.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use baker_client::change::RemoveCause;
use baker_client::model::{ServiceName, Source, WatchEvent};
use baker_directory::registry::REPLICA_LEASE;
use baker_tests::directory::TestDirectory;
use baker_tests::docker::{require_images, unique, Container, Network};
use baker_tests::etcd::EtcdCluster;
use baker_tests::{eventually, require, Needs};
use futures_util::StreamExt;

const WAIT: Duration = Duration::from_secs(20);
/// What a takeover may take beyond the lease: etcd's expiry check, the watch, the put.
const SLACK: Duration = Duration::from_secs(3);

/// One change of the service, as one replica's watch stream told it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seen {
    Upsert { id: String, node: Option<String> },
    Remove { id: String, cause: RemoveCause },
}

impl Seen {
    fn id(&self) -> &str {
        match self {
            Seen::Upsert { id, .. } | Seen::Remove { id, .. } => id,
        }
    }
}

/// The changes of one service on one replica's watch stream, with when they arrived.
struct Recorder {
    seen: Arc<Mutex<Vec<(Instant, Seen)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Recorder {
    async fn start(dir: &TestDirectory, service: &str) -> Recorder {
        let only: ServiceName = service.parse().expect("a service name");
        let mut stream = Box::pin(
            dir.client
                .watch_services(Some(&[only]))
                .await
                .expect("a watch stream"),
        );
        let first = stream.next().await.expect("a snapshot").expect("readable");
        assert!(matches!(first, WatchEvent::Snapshot { .. }), "{first:?}");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let into = seen.clone();
        let task = tokio::spawn(async move {
            while let Some(Ok(event)) = stream.next().await {
                let s = match event {
                    WatchEvent::Upsert { instance, .. } => Seen::Upsert {
                        id: instance.id.to_string(),
                        node: instance.node.map(|n| n.to_string()),
                    },
                    WatchEvent::Remove {
                        instance, cause, ..
                    } => Seen::Remove {
                        id: instance.id.to_string(),
                        cause,
                    },
                    _ => continue,
                };
                into.lock().unwrap().push((Instant::now(), s));
            }
        });
        Recorder { seen, task }
    }

    /// The changes of instance `id`, with when they arrived.
    fn of(&self, id: &str) -> Vec<(Instant, Seen)> {
        let seen = self.seen.lock().unwrap();
        seen.iter().filter(|(_, s)| s.id() == id).cloned().collect()
    }

    fn changes(&self, id: &str) -> Vec<Seen> {
        self.of(id).into_iter().map(|(_, s)| s).collect()
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A replica with Docker discovery on `network`, on the table at `store`, named `node`.
async fn replica(store: &str, network: &str, node: &str) -> TestDirectory {
    TestDirectory::start(&[
        ("BAKER_STORE", store),
        ("BAKER_DOCKER", "on"),
        ("BAKER_DOCKER_NETWORK", network),
        ("BAKER_NODE", node),
    ])
    .await
}

/// A `baker/greeting` container labelled as `service` on `network`.
fn labelled(network: &Network, service: &str) -> Container {
    Container::run(
        "ha",
        &[
            "--network",
            &network.name,
            "--label",
            &format!("baker.service={service}"),
            "--label",
            "baker.port=8080",
            "--health-interval",
            "300ms",
            "baker/greeting",
        ],
    )
}

/// The node of `id` in `dir`'s table, when it holds that instance exactly once and only it
/// for `service`.
async fn owner(dir: &TestDirectory, service: &str, id: &str) -> Option<String> {
    let s = dir.client.service(service).await.ok()?;
    match s.instances.as_slice() {
        [i] if i.id == id => {
            assert_eq!(i.source, Source::Docker);
            Some(i.node.as_ref()?.to_string())
        }
        _ => None,
    }
}

/// The node both replicas' tables agree owns `id`.
async fn agreed_owner(dirs: [&TestDirectory; 2], service: &str, id: &str) -> String {
    eventually(
        WAIT,
        &format!("both replicas to hold {id} once"),
        || async {
            let a = owner(dirs[0], service, id).await?;
            let b = owner(dirs[1], service, id).await?;
            (a == b).then_some(a)
        },
    )
    .await
}

/// Polls `dir` until it holds `id` with a node other than `old`; returns the new node, when
/// it appeared, and the longest time in between that `dir`'s table lacked `id`.
async fn takeover(
    dir: &TestDirectory,
    service: &str,
    id: &str,
    old: &str,
    limit: Duration,
) -> (String, Instant, Duration) {
    let started = Instant::now();
    let mut absent_since: Option<Instant> = None;
    let mut longest_absence = Duration::ZERO;
    loop {
        let now = Instant::now();
        match owner(dir, service, id).await {
            Some(node) if node != old => {
                if let Some(since) = absent_since {
                    longest_absence = longest_absence.max(now - since);
                }
                return (node, now, longest_absence);
            }
            Some(_) => {
                if let Some(since) = absent_since.take() {
                    longest_absence = longest_absence.max(now - since);
                }
            }
            None => {
                absent_since.get_or_insert(now);
            }
        }
        assert!(
            started.elapsed() < limit,
            "{id} was not taken over from {old} within {limit:?}; log of the survivor:\n{}",
            dir.proc.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn two_replicas_on_one_engine_share_its_containers_without_fighting() {
    if !require_images() || !require(Needs::Etcd) {
        return;
    }
    let cluster = EtcdCluster::start(3).await;
    let store = cluster.store_url("/baker");
    let net = Network::create("ha");
    let service = unique("svc");
    let nodes = ["node-a", "node-b"];
    let mut dirs = [
        replica(&store, &net.name, nodes[0]).await,
        replica(&store, &net.name, nodes[1]).await,
    ];
    let mut watches = [
        Recorder::start(&dirs[0], &service).await,
        Recorder::start(&dirs[1], &service).await,
    ];

    // A container both engines' discovery sees: in both tables once, owned by one node.
    let first = labelled(&net, &service);
    let owner_of_first = agreed_owner([&dirs[0], &dirs[1]], &service, &first.name).await;
    assert!(nodes.contains(&owner_of_first.as_str()), "{owner_of_first}");

    // For longer than a lease and two reconciliations, nothing churns: only the first upsert.
    tokio::time::sleep(REPLICA_LEASE + Duration::from_secs(2)).await;
    for (w, node) in watches.iter().zip(nodes) {
        assert_eq!(
            w.changes(&first.name),
            [Seen::Upsert {
                id: first.name.clone(),
                node: Some(owner_of_first.clone()),
            }],
            "the changes of {} seen by {node}",
            first.name
        );
    }

    // Stopped: removed once, on both streams.
    first.stop(5);
    for w in &watches {
        eventually(WAIT, "the stopped container's removal", || async {
            (w.changes(&first.name).len() > 1).then_some(())
        })
        .await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    for w in &watches {
        assert_eq!(
            w.changes(&first.name)[1..],
            [Seen::Remove {
                id: first.name.clone(),
                cause: RemoveCause::DockerStopped,
            }]
        );
    }

    // Another container; its owner is killed: the other replica takes it over once the dead
    // one's lease has run out, and the container is absent from its table only in between.
    let second = labelled(&net, &service);
    let id = second.name.clone();
    let old = agreed_owner([&dirs[0], &dirs[1]], &service, &id).await;
    let dead = nodes.iter().position(|n| *n == old).expect("a known node");
    let alive = 1 - dead;
    dirs[dead].kill9();
    let killed = Instant::now();
    let (node, at, absent) = takeover(
        &dirs[alive],
        &service,
        &id,
        &old,
        REPLICA_LEASE + SLACK + Duration::from_secs(5),
    )
    .await;
    let took = at - killed;
    eprintln!(
        "SIGKILL of the owner: {} took {id} over after {took:?} (lease {REPLICA_LEASE:?}); \
         absent from its table for at most {absent:?}",
        nodes[alive]
    );
    assert_eq!(node, nodes[alive]);
    assert!(
        took <= REPLICA_LEASE + SLACK,
        "took {took:?}, more than the lease ({REPLICA_LEASE:?}) and {SLACK:?}"
    );
    assert!(absent <= SLACK, "absent for {absent:?}");
    let changes = watches[alive].changes(&id);
    assert_eq!(
        changes,
        [
            Seen::Upsert {
                id: id.clone(),
                node: Some(old.clone()),
            },
            Seen::Remove {
                id: id.clone(),
                cause: RemoveCause::Expired,
            },
            Seen::Upsert {
                id: id.clone(),
                node: Some(nodes[alive].to_owned()),
            },
        ],
        "what {} streamed",
        nodes[alive]
    );
    let in_between = watches[alive].of(&id);
    let gap = in_between[2].0 - in_between[1].0;
    eprintln!("between the expiry and the takeover: {gap:?}");

    // The killed replica comes back: it leaves the container to its owner.
    dirs[dead].restart().await;
    watches[dead] = Recorder::start(&dirs[dead], &service).await;
    assert_eq!(
        agreed_owner([&dirs[0], &dirs[1]], &service, &id).await,
        nodes[alive]
    );

    // The owner stops with SIGTERM: its lease is revoked, its containers leave at once, and
    // the one that came back takes them over.
    let stopping = Instant::now();
    dirs[alive].stop().await;
    let (node, at, absent) = takeover(&dirs[dead], &service, &id, nodes[alive], WAIT).await;
    let took = at - stopping;
    eprintln!(
        "SIGTERM of the owner: {} took {id} over after {took:?}; absent for at most {absent:?}",
        nodes[dead]
    );
    assert_eq!(node, nodes[dead]);
    assert!(
        took < SLACK,
        "took {took:?}: a stopping replica's containers must leave at once"
    );
    let seen = watches[dead].changes(&id);
    assert_eq!(
        seen,
        [
            Seen::Remove {
                id: id.clone(),
                cause: RemoveCause::Expired,
            },
            Seen::Upsert {
                id: id.clone(),
                node: Some(nodes[dead].to_owned()),
            },
        ],
        "what {} streamed",
        nodes[dead]
    );
    drop(second);
}
