//! End-to-end: how a change reaches HAProxy. A server the directory lists takes requests as
//! soon as it is added (no check interval to wait for), traffic errors still take it out; a
//! route is in effect while the directory is still writing it, and a directory that dies
//! before the write ends leaves no ambassador on the route it lost.

use std::time::{Duration, Instant};

use baker_tests::ambassador::TestAmbassador;
use baker_tests::directory::TestDirectory;
use baker_tests::greeting::{register, Greeting};
use baker_tests::{eventually, require, Needs};

const TTL_MS: u64 = 60_000;

/// A client opening a new connection per request, so each request is routed afresh.
fn fresh() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(5))
        .build()
        .expect("http client")
}

/// The status of `GET url`, and the answering greeting's version (empty when it is not one).
async fn get(c: &reqwest::Client, url: &str) -> (u16, String) {
    let resp = c
        .get(url)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let status = resp.status().as_u16();
    let body: serde_json::Value = resp.json().await.unwrap_or_default();
    (
        status,
        body["version"].as_str().unwrap_or_default().to_owned(),
    )
}

/// `server`'s operational state (`show servers state`: 0 down, 2 up) and admin state (0:
/// ready), or `None` while HAProxy does not run it.
fn states(amb: &TestAmbassador, server: &str) -> Option<(u32, u32)> {
    let text = amb.admin_command("show servers state emitter");
    text.lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.len() > 6 && !f[0].starts_with('#') && f[3] == server)
        .map(|f| (f[5].parse().unwrap(), f[6].parse().unwrap()))
}

/// Registers `b` as the only instance and returns the operational state HAProxy gave it when it
/// first ran it out of maintenance, and the answer to a request sent right then.
async fn first_state_and_answer(
    amb: &TestAmbassador,
    dir: &TestDirectory,
    b: &Greeting,
) -> (u32, u16) {
    register(&dir.client, "emitter", b, "b", "1", TTL_MS).await;
    let op = eventually(
        Duration::from_secs(5),
        "the server to be enabled",
        || async { states(amb, "b").and_then(|(op, admin)| (admin == 0).then_some(op)) },
    )
    .await;
    let (status, _) = get(&fresh(), &format!("{}/greeting", amb.url("emitter"))).await;
    (op, status)
}

#[tokio::test]
async fn a_listed_server_takes_requests_at_once_and_errors_still_mark_it_down() {
    if !require(Needs::Haproxy) {
        return;
    }
    let b = Greeting::start("1", "b").await;
    // With periodic checks (every 2 s, rise 2) and without (a server that is up is never
    // probed): a server started down would wait seconds for its checks.
    for checks in ["http:/health", "off"] {
        let dir = TestDirectory::start(&[]).await;
        let amb = TestAmbassador::start(&dir.url, &["emitter"], &[("BAKER_CHECKS", checks)]).await;
        let (op, status) = first_state_and_answer(&amb, &dir, &b).await;
        assert_eq!(
            op, 2,
            "BAKER_CHECKS={checks}: the added server must be up at once"
        );
        assert_eq!(
            status, 200,
            "BAKER_CHECKS={checks}: a request right after the add"
        );
        if checks == "http:/health" {
            continue;
        }

        // No probe runs while it is up: only the errors of live traffic (`observe`) can mark
        // it down. Its /health answers 503 now; requests for it count as its errors.
        b.set_health("fail").await;
        let health = format!("{}/health", amb.url("emitter"));
        let c = fresh();
        let mut sent = 0;
        let marked = Instant::now();
        while states(&amb, "b").map(|(op, _)| op) != Some(0) {
            assert!(sent < 20, "{sent} errors did not mark the server down");
            get(&c, &health).await;
            sent += 1;
        }
        eprintln!("marked down after {sent} errors, {:?}", marked.elapsed());
        assert!(
            sent >= 5,
            "marked down after {sent} errors: the error limit is 5"
        );
        // Down, it is probed every second (TCP) and serves again after two successes.
        b.set_health("ok").await;
        eventually(
            Duration::from_secs(5),
            "the server to be up again",
            || async { (states(&amb, "b").map(|(op, _)| op) == Some(2)).then_some(()) },
        )
        .await;
        assert_eq!(amb.proc_info().reloads, 0);
    }
}

#[tokio::test]
async fn a_route_applies_only_once_it_is_durable_and_a_crash_before_that_changes_nothing() {
    if !require(Needs::Haproxy) {
        return;
    }
    // Memory only, whatever BAKER_TEST_STORE says: the subject is the route file in BAKER_DATA,
    // written ahead of the route being published (on etcd a route is a key, committed before
    // it is published).
    let mut dir = TestDirectory::start(&[("BAKER_STORE", "memory")]).await;
    let v1 = Greeting::start("1", "v1").await;
    let v2 = Greeting::start("2", "v2").await;
    register(&dir.client, "emitter", &v1, "v1", "1", TTL_MS).await;
    register(&dir.client, "emitter", &v2, "v2", "2", TTL_MS).await;
    let to = |v: &str| [(v.to_owned(), 100)].into();
    dir.client.set_route("emitter", &to("1")).await.unwrap();
    let amb = TestAmbassador::start(&dir.url, &["emitter"], &[]).await;
    let url = format!("{}/greeting", amb.url("emitter"));
    let c = fresh();
    let only = |v: &'static str| {
        let (c, url) = (&c, &url);
        move || async move {
            for _ in 0..10 {
                if get(c, url).await != (200, v.to_owned()) {
                    return None;
                }
            }
            Some(())
        }
    };
    eventually(Duration::from_secs(5), "version 1 alone", only("1")).await;

    // The next route write blocks: its temporary file is a FIFO nobody reads, so opening it
    // for writing waits forever, as a stalled disk would.
    let tmp = dir.data_dir().join("routes/emitter.json.tmp");
    let made = std::process::Command::new("mkfifo")
        .arg(&tmp)
        .status()
        .expect("running mkfifo");
    assert!(made.success(), "mkfifo {}", tmp.display());
    let put = {
        let client = dir.client.clone();
        tokio::spawn(async move { client.set_route("emitter", &to("2")).await })
    };
    // While the directory is still writing it, nobody hears of it and the call waits.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        only("1")().await.is_some(),
        "a route not yet on disk was applied"
    );
    assert!(
        !put.is_finished(),
        "the call answered before the route was written"
    );

    // The directory dies before the write ends, and comes back with the routes on disk.
    dir.kill9();
    let answer = put.await.unwrap();
    assert!(answer.is_err(), "the call must fail: {answer:?}");
    std::fs::remove_file(&tmp).unwrap();
    dir.restart().await;
    let routes = dir.client.routes().await.unwrap().routes;
    assert_eq!(routes["emitter"], [("1".parse().unwrap(), 100)].into());
    register(&dir.client, "emitter", &v1, "v1", "1", TTL_MS).await;
    register(&dir.client, "emitter", &v2, "v2", "2", TTL_MS).await;
    // The ambassador never left the route on disk.
    eventually(Duration::from_secs(10), "version 1 alone still", only("1")).await;
    assert_eq!(amb.proc_info().reloads, 0);
}
