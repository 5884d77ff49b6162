//! A line of the watch stream lost on the way: the client notices the gap at the next line,
//! and a watcher that resyncs from a fresh snapshot ends with the directory's table. Through a
//! real ambassador, HAProxy ends with the right servers, changed at run time without a reload.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use baker_client::model::WatchEvent;
use baker_client::{ClientError, DirectoryClient};
use baker_tests::ambassador::TestAmbassador;
use baker_tests::directory::{spec, TestDirectory};
use baker_tests::greeting::Greeting;
use baker_tests::proxy::LineDropProxy;
use baker_tests::{eventually, require, Needs};
use futures_util::{Stream, StreamExt};

const TTL_MS: Option<u64> = Some(60_000);

/// The instance ids of `emitter` as a watcher built them from the stream.
type Table = BTreeSet<String>;

/// Applies events to `table` until the stream fails; returns the failure.
async fn follow<S>(stream: S, table: &mut Table, until: usize) -> Option<ClientError>
where
    S: Stream<Item = Result<WatchEvent, ClientError>>,
{
    let mut stream = std::pin::pin!(stream);
    while table.len() < until {
        match tokio::time::timeout(Duration::from_secs(10), stream.next()).await {
            Err(_) => panic!("no watch line for 10 s with {table:?}"),
            Ok(None) => panic!("the watch stream ended"),
            Ok(Some(Err(e))) => return Some(e),
            Ok(Some(Ok(event))) => match event {
                WatchEvent::Snapshot { services, .. } => {
                    *table = services
                        .get("emitter")
                        .map(|v| v.iter().map(|i| i.id.to_string()).collect())
                        .unwrap_or_default();
                }
                WatchEvent::Upsert { instance, .. } => {
                    table.insert(instance.id.to_string());
                }
                WatchEvent::Remove { instance, .. } => {
                    table.remove(instance.id.as_str());
                }
                _ => {}
            },
        }
    }
    None
}

#[tokio::test]
async fn a_client_that_misses_a_line_reports_the_gap_and_a_fresh_snapshot_makes_it_whole() {
    let dir = TestDirectory::start(&[]).await;
    let proxy = LineDropProxy::start(dir.addr).await;
    let watcher = DirectoryClient::new(&proxy.url, None).unwrap();
    dir.client
        .register("emitter", "a", &spec(8001, TTL_MS))
        .await
        .unwrap();
    let mut table = Table::new();
    let stream = watcher.watch().await.unwrap();
    let mut stream = Box::pin(stream);
    assert!(follow(&mut stream, &mut table, 1).await.is_none());
    assert_eq!(table, ["a".to_owned()].into());

    // b's registration is lost on the way; c's, the next line, does not follow the last one.
    proxy.drop_next_line_with("\"id\":\"b\"");
    dir.client
        .register("emitter", "b", &spec(8002, TTL_MS))
        .await
        .unwrap();
    eventually(Duration::from_secs(5), "b's line to be dropped", || async {
        (proxy.dropped().len() == 1).then_some(())
    })
    .await;
    dir.client
        .register("emitter", "c", &spec(8003, TTL_MS))
        .await
        .unwrap();
    let failure = follow(&mut stream, &mut table, 3).await;
    let Some(ClientError::Gap { last, prev }) = failure else {
        panic!("expected a gap, got {failure:?} with {table:?}");
    };
    assert_eq!(prev, last + 1, "the line after the lost one follows it");
    assert_eq!(
        table,
        ["a".to_owned()].into(),
        "c was not applied past the gap"
    );
    assert!(
        proxy.dropped()[0].contains("\"type\":\"upsert\""),
        "{:?}",
        proxy.dropped()
    );

    // Resync: a fresh snapshot holds all three.
    drop(stream);
    let stream = watcher.watch().await.unwrap();
    assert!(follow(stream, &mut table, 3).await.is_none());
    assert_eq!(table, ["a", "b", "c"].map(str::to_owned).into());
    assert_eq!(proxy.watches(), 2);
}

#[tokio::test]
async fn an_ambassador_that_misses_a_line_resyncs_and_runs_every_server_without_a_reload() {
    if !require(Needs::Haproxy) {
        return;
    }
    let dir = TestDirectory::start(&[]).await;
    let proxy = LineDropProxy::start(dir.addr).await;
    let greetings = [
        Greeting::start("1", "a").await,
        Greeting::start("1", "b").await,
        Greeting::start("1", "c").await,
    ];
    let register = |i: usize| {
        let (client, port) = (dir.client.clone(), greetings[i].addr.port());
        let id = ["a", "b", "c"][i];
        async move {
            client
                .register("emitter", id, &spec(port, TTL_MS))
                .await
                .unwrap()
        }
    };
    register(0).await;
    let mut amb = TestAmbassador::start(&proxy.url, &["emitter"], &[]).await;
    let servers = |want: &'static [&'static str]| {
        let amb = &amb;
        move || async move {
            let running = amb.servers("emitter");
            let ready: Vec<&str> = running
                .iter()
                .filter(|(_, state)| *state == "ready")
                .map(|(name, _)| name.as_str())
                .collect();
            (ready == want).then_some(())
        }
    };
    eventually(Duration::from_secs(10), "server a", servers(&["a"])).await;
    let reloads = amb.proc_info().reloads;

    proxy.drop_next_line_with("\"id\":\"b\"");
    register(1).await;
    eventually(Duration::from_secs(5), "b's line to be dropped", || async {
        (proxy.dropped().len() == 1).then_some(())
    })
    .await;
    register(2).await;
    eventually(
        Duration::from_secs(10),
        "servers a, b and c",
        servers(&["a", "b", "c"]),
    )
    .await;
    amb.proc
        .wait_for_log("missed a change", Duration::from_secs(1))
        .await;
    assert_eq!(proxy.watches(), 2, "one watch, then one resync");
    assert_eq!(
        amb.proc_info().reloads,
        reloads,
        "the resync reloaded HAProxy"
    );

    // Each server takes requests.
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let url = format!("{}/greeting", amb.url("emitter"));
    let mut seen = BTreeMap::new();
    for _ in 0..30 {
        let body: serde_json::Value = client.get(&url).send().await.unwrap().json().await.unwrap();
        *seen
            .entry(body["instance"].as_str().unwrap_or_default().to_owned())
            .or_insert(0) += 1;
    }
    assert_eq!(
        seen.keys().map(String::as_str).collect::<Vec<_>>(),
        ["a", "b", "c"],
        "{seen:?}"
    );
    amb.stop().await;
}
