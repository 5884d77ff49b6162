//! Clients given a list of directory replicas (`BAKER_DIRECTORY=http://d1,http://d2`): the
//! registrar heartbeats to one that answers, the ambassador watches one and moves to the next
//! when it dies, and the CLI asks the first that answers.

use std::time::Duration;

use baker_tests::ambassador::TestAmbassador;
use baker_tests::directory::TestDirectory;
use baker_tests::greeting::Greeting;
use baker_tests::load::{greet, Load};
use baker_tests::{eventually, free_port, require, Needs, Proc};
use nix::sys::signal::Signal;

async fn ids(dir: &TestDirectory) -> Vec<String> {
    dir.client
        .service("emitter")
        .await
        .map(|s| s.instances.iter().map(|i| i.id.to_string()).collect())
        .unwrap_or_default()
}

/// Kill -9 the replica that the ambassador watches and the registrars heartbeat to: the
/// registrars go on with the other, the ambassador moves to it, and under steady load no request
/// fails, no server is dropped, and HAProxy never reloads.
#[tokio::test]
async fn the_replica_in_use_dies_and_clients_move_to_the_next_without_a_failed_request() {
    if !require(Needs::Haproxy) {
        return;
    }
    let mut first = TestDirectory::start(&[]).await;
    let second = TestDirectory::start(&[]).await;
    let list = format!("{},{}", first.url, second.url);
    let a = Greeting::start("1", "a").await;
    let b = Greeting::start("1", "b").await;
    let _ra = a.registrar(&list, "a", "300ms");
    let _rb = b.registrar(&list, "b", "300ms");
    eventually(
        Duration::from_secs(10),
        "a and b in the first replica",
        || async { (ids(&first).await == ["a", "b"]).then_some(()) },
    )
    .await;
    assert!(ids(&second).await.is_empty(), "registrars use one replica");

    let mut amb = TestAmbassador::start(&list, &["emitter"], &[]).await;
    amb.proc
        .wait_for_log(
            &format!("watching the directory directory={}", first.url),
            Duration::from_secs(10),
        )
        .await;
    let load = Load::start(&format!("{}/greeting", amb.url("emitter")), 4);
    eventually(
        Duration::from_secs(10),
        "both servers taking requests",
        || async { (load.by_instance().len() == 2).then_some(()) },
    )
    .await;
    load.more(2_000, Duration::from_secs(30)).await;
    let before = amb.proc_info();

    first.kill9();
    eventually(
        Duration::from_secs(5),
        "a and b in the second replica",
        || async { (ids(&second).await == ["a", "b"]).then_some(()) },
    )
    .await;
    amb.proc
        .wait_for_log(
            &format!("watching the directory directory={}", second.url),
            Duration::from_secs(10),
        )
        .await;
    let counts = load.by_instance();
    load.more(3_000, Duration::from_secs(30)).await;
    let after = load.by_instance();
    for id in ["a", "b"] {
        assert!(
            after[id] > counts[id],
            "{id} must still take requests after the move: {counts:?} then {after:?}"
        );
    }
    let (ok, failures) = load.finish().await;
    assert!(
        failures.is_empty(),
        "{} of {} requests failed: {:?}",
        failures.len(),
        ok + failures.len() as u64,
        &failures[..failures.len().min(5)]
    );
    assert_eq!(amb.proc_info(), before, "HAProxy must not reload");
    assert!(
        !amb.proc.log_text().contains("the grace period ended"),
        "no server may be dropped: {}",
        amb.proc.log_text()
    );
}

#[tokio::test]
async fn the_cli_asks_the_first_replica_that_answers() {
    let dir = TestDirectory::start(&[]).await;
    let dead = format!("http://127.0.0.1:{}", free_port());
    let list = format!("{dead},{}", dir.url);
    let mut reg = Proc::spawn(
        "baker",
        baker_tests::bin("baker"),
        &[
            "--directory",
            &list,
            "register",
            "emitter",
            "x",
            "--address",
            "127.0.0.1",
            "--port",
            "9",
        ],
        &[],
    );
    let status = reg.wait_exit(Duration::from_secs(10)).await;
    assert!(status.success(), "{}", reg.log_text());
    assert_eq!(ids(&dir).await, ["x"]);

    let mut bad = Proc::spawn(
        "baker",
        baker_tests::bin("baker"),
        &["--directory", &format!("{},,{dead}", dir.url), "services"],
        &[],
    );
    let status = bad.wait_exit(Duration::from_secs(10)).await;
    assert_eq!(status.code(), Some(64), "{}", bad.log_text());
    assert!(bad.log_text().contains("empty entry"), "{}", bad.log_text());
}

/// A replica frozen with SIGSTOP accepts connections but never answers: the registrar's
/// heartbeats, which give up after their own deadline, go to the next replica, and the
/// ambassador opens its watch there.
#[tokio::test]
async fn a_frozen_replica_is_passed_over_by_the_registrar_and_the_ambassador() {
    if !require(Needs::Haproxy) {
        return;
    }
    let frozen = TestDirectory::start(&[]).await;
    let live = TestDirectory::start(&[]).await;
    frozen.proc.signal(Signal::SIGSTOP);
    let list = format!("{},{}", frozen.url, live.url);
    let a = Greeting::start("1", "a").await;
    let _ra = a.registrar(&list, "a", "300ms");
    eventually(
        Duration::from_secs(10),
        "a registered with the live replica",
        || async { (ids(&live).await == ["a"]).then_some(()) },
    )
    .await;
    let amb = TestAmbassador::start(&list, &["emitter"], &[]).await;
    let url = format!("{}/greeting", amb.url("emitter"));
    let http = reqwest::Client::new();
    eventually(
        Duration::from_secs(15),
        "a served through the ambassador",
        || async { (greet(&http, &url).await.ok()? == "a").then_some(()) },
    )
    .await;
    let load = Load::start(&url, 2);
    load.more(200, Duration::from_secs(10)).await;
    let (_, failures) = load.finish().await;
    assert!(failures.is_empty(), "{failures:?}");
    frozen.proc.signal(Signal::SIGCONT);
}
