//! The etcd harness itself: a real three-member cluster on loopback elects a leader, keeps its
//! data through the loss of that leader, ignores a frozen member, and takes a killed member back.

use std::time::Duration;

use baker_tests::etcd::EtcdCluster;
use baker_tests::{eventually, require, Needs};
use etcd_client::Client;

async fn client(endpoints: &[String]) -> Client {
    Client::connect(
        endpoints,
        Some(
            etcd_client::ConnectOptions::new()
                .with_connect_timeout(Duration::from_secs(1))
                .with_timeout(Duration::from_secs(2)),
        ),
    )
    .await
    .expect("connecting to the cluster")
}

async fn value(c: &mut Client, key: &str) -> Option<String> {
    let resp = c.get(key, None).await.ok()?;
    let kv = resp.kvs().first()?;
    kv.value_str().ok().map(str::to_owned)
}

#[tokio::test]
async fn a_cluster_survives_its_leader_and_a_frozen_member_and_takes_a_member_back() {
    if !require(Needs::Etcd) {
        return;
    }
    let mut cluster = EtcdCluster::start(3).await;
    let leader = cluster.leader().await;
    let mut c = client(&cluster.endpoints()).await;
    c.put("/t/a", "1", None).await.expect("a write");

    // SIGKILL the leader: the two others elect another, and the data is there.
    cluster.kill9(leader);
    let next = cluster.wait_leader(Duration::from_secs(10)).await;
    assert_ne!(next, leader, "a dead member cannot lead");
    let others: Vec<String> = (0..3)
        .filter(|&i| i != leader)
        .map(|i| cluster.members[i].url())
        .collect();
    let mut c = client(&others).await;
    assert_eq!(value(&mut c, "/t/a").await.as_deref(), Some("1"));

    // The killed member comes back on its ports and data, and catches up.
    c.put("/t/b", "2", None)
        .await
        .expect("a write with one member down");
    cluster.restart(leader).await;
    let back = client(&[cluster.members[leader].url()]).await;
    eventually(
        Duration::from_secs(10),
        "the restarted member to catch up",
        || {
            let mut back = back.clone();
            async move { (value(&mut back, "/t/b").await.as_deref() == Some("2")).then_some(()) }
        },
    )
    .await;

    // A frozen member holds its sockets and answers nothing; the others go on without it.
    let frozen = (cluster.leader().await + 1) % 3;
    cluster.freeze(frozen);
    let lead = cluster.wait_leader(Duration::from_secs(10)).await;
    assert_ne!(lead, frozen);
    let mut live = client(&[cluster.members[lead].url()]).await;
    tokio::time::timeout(Duration::from_secs(5), live.put("/t/c", "3", None))
        .await
        .expect("a write within 5 s with one member frozen")
        .expect("a write with one member frozen");
    cluster.thaw(frozen);
    cluster.wait_member(frozen, Duration::from_secs(10)).await;
}

#[tokio::test]
async fn quorum_is_lost_with_two_members_down_and_comes_back_with_them() {
    if !require(Needs::Etcd) {
        return;
    }
    let mut cluster = EtcdCluster::start(3).await;
    let survivor = cluster.leader().await;
    let down: Vec<usize> = (0..3).filter(|&i| i != survivor).collect();
    for &i in &down {
        cluster.kill9(i);
    }
    let mut c = client(&[cluster.members[survivor].url()]).await;
    let write = tokio::time::timeout(Duration::from_secs(3), c.put("/t/q", "1", None)).await;
    assert!(
        !matches!(write, Ok(Ok(_))),
        "a write without quorum must not succeed"
    );
    for &i in &down {
        cluster.restart(i).await;
    }
    cluster.wait_leader(Duration::from_secs(10)).await;
    let mut c = client(&cluster.endpoints()).await;
    eventually(
        Duration::from_secs(10),
        "a write once quorum is back",
        || {
            let mut c = c.clone();
            async move { c.put("/t/q", "2", None).await.ok().map(|_| ()) }
        },
    )
    .await;
    assert_eq!(value(&mut c, "/t/q").await.as_deref(), Some("2"));
}
