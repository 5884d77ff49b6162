//! The registrar against a real directory and a real greeting app: registration after `rise`
//! passes, deregistration after `fall` failures, hangs, kills, signals, directory restarts,
//! link variables, zones, and bad configuration.

use std::time::{Duration, Instant};

use baker_client::change::RemoveCause;
use baker_client::model::Instance;
use baker_client::WatchEvent;
use baker_tests::cli::baker;
use baker_tests::directory::TestDirectory;
use baker_tests::greeting::Greeting;
use baker_tests::{eventually, Proc};
use futures_util::StreamExt;

const WAIT: Duration = Duration::from_secs(10);

/// A registrar for `emitter/<id>` probing `greeting`, every 200 ms unless `extra` says otherwise.
fn registrar(
    dir: &TestDirectory,
    id: &str,
    target: Option<&Greeting>,
    extra: &[(&str, &str)],
) -> Proc {
    let target = target.map(|g| g.url());
    let mut env = vec![
        ("BAKER_DIRECTORY", dir.url.as_str()),
        ("BAKER_SERVICE", "emitter"),
        ("BAKER_ID", id),
        ("BAKER_INTERVAL", "200ms"),
        ("BAKER_TIMEOUT", "300ms"),
    ];
    if let Some(t) = &target {
        env.push(("BAKER_TARGET", t.as_str()));
    }
    for (k, v) in extra {
        env.retain(|(key, _)| key != k);
        env.push((k, v));
    }
    Proc::baker(&format!("registrar-{id}"), "baker-registrar", &env)
}

/// The instance `emitter/<id>` as the directory has it now, if it has it.
async fn instance(dir: &TestDirectory, id: &str) -> Option<Instance> {
    let resp = dir.client.service("emitter").await.ok()?;
    resp.instances.into_iter().find(|i| i.id == id)
}

async fn registered(dir: &TestDirectory, id: &str) -> Instance {
    eventually(WAIT, &format!("emitter/{id} to be registered"), || {
        instance(dir, id)
    })
    .await
}

async fn deregistered(dir: &TestDirectory, id: &str) {
    eventually(WAIT, &format!("emitter/{id} to be gone"), || async {
        instance(dir, id).await.is_none().then_some(())
    })
    .await
}

/// Position of the first log line containing `needle`.
fn log_pos(proc: &Proc, needle: &str) -> Option<usize> {
    proc.log().iter().position(|l| l.contains(needle))
}

#[tokio::test]
async fn registers_after_rise_passes_and_leaves_after_fall_failures() {
    let dir = TestDirectory::start(&[]).await;
    let app = Greeting::start("2", "a").await;
    let mut reg = registrar(
        &dir,
        "vm101",
        Some(&app),
        &[
            ("BAKER_VERSION", "2"),
            ("BAKER_WEIGHT", "40"),
            ("BAKER_TAGS", "canary,eu"),
        ],
    );

    let inst = registered(&dir, "vm101").await;
    assert_eq!(
        (inst.address.as_str(), inst.port),
        ("127.0.0.1", app.addr.port())
    );
    assert_eq!((inst.version.as_str(), inst.weight), ("2", 40));
    assert_eq!(inst.tags, ["canary", "eu"]);
    assert_eq!(inst.ttl_ms, 600, "ttl is three intervals");
    reg.wait_for_log("emitter/vm101 is now up after 2 passes", WAIT)
        .await;

    app.set_health("fail").await;
    deregistered(&dir, "vm101").await;
    reg.wait_for_log(
        "emitter/vm101 is now down after 2 failures: unhealthy status 503",
        WAIT,
    )
    .await;

    app.set_health("ok").await;
    registered(&dir, "vm101").await;
    let ups = reg
        .log()
        .iter()
        .filter(|l| l.contains("is now up after"))
        .count();
    let downs = reg
        .log()
        .iter()
        .filter(|l| l.contains("is now down after"))
        .count();
    assert_eq!(
        (ups, downs),
        (2, 1),
        "each transition is logged once:\n{}",
        reg.log_text()
    );
}

#[tokio::test]
async fn a_hanging_app_fails_by_timeout() {
    let dir = TestDirectory::start(&[]).await;
    let app = Greeting::start("1", "a").await;
    let mut reg = registrar(&dir, "hangs", Some(&app), &[]);
    registered(&dir, "hangs").await;

    app.set_health("hang").await;
    deregistered(&dir, "hangs").await;
    reg.wait_for_log(
        "emitter/hangs is now down after 2 failures: no answer within 300ms",
        WAIT,
    )
    .await;

    app.set_health("ok").await;
    registered(&dir, "hangs").await;
    assert!(
        reg.try_status().is_none(),
        "the registrar must keep running"
    );
}

#[tokio::test]
async fn a_killed_app_is_deregistered() {
    let dir = TestDirectory::start(&[]).await;
    let mut app = Greeting::start("1", "a").await;
    let mut reg = registrar(&dir, "killed", Some(&app), &[]);
    registered(&dir, "killed").await;

    app.proc.kill9();
    deregistered(&dir, "killed").await;
    reg.wait_for_log(
        "emitter/killed is now down after 2 failures: cannot connect",
        WAIT,
    )
    .await;
}

#[tokio::test]
async fn sigterm_deregisters_before_the_process_exits() {
    let dir = TestDirectory::start(&[]).await;
    let app = Greeting::start("1", "a").await;
    // A long interval (ttl 6 s): expiry cannot explain the instance going away quickly.
    let mut reg = registrar(
        &dir,
        "stopping",
        Some(&app),
        &[("BAKER_INTERVAL", "2s"), ("BAKER_RISE", "1")],
    );
    registered(&dir, "stopping").await;

    // Record the directory's changes while the registrar stops.
    let mut events = Box::pin(dir.client.watch().await.expect("opening the watch stream"));
    let first = events
        .next()
        .await
        .expect("a snapshot")
        .expect("a snapshot");
    assert!(
        matches!(first, WatchEvent::Snapshot { ref services, .. } if services.contains_key("emitter"))
    );
    let removal = tokio::spawn(async move {
        while let Some(Ok(event)) = events.next().await {
            if let WatchEvent::Remove {
                instance, cause, ..
            } = event
            {
                if instance.service == "emitter" && instance.id == "stopping" {
                    assert_eq!(cause, RemoveCause::Deregistered, "not by expiry");
                    return Instant::now();
                }
            }
        }
        panic!("the watch stream ended without the removal");
    });

    let signalled = Instant::now();
    reg.term();
    let status = reg.wait_exit(WAIT).await;
    let exited = Instant::now();
    assert_eq!(status.code(), Some(0), "{}", reg.log_text());
    assert!(
        exited - signalled < Duration::from_secs(3),
        "stopping took {:?}",
        exited - signalled
    );
    // Gone already when the exit is seen: the DELETE happened before the exit.
    assert!(
        instance(&dir, "stopping").await.is_none(),
        "still registered after exit"
    );
    let removed = tokio::time::timeout(WAIT, removal)
        .await
        .expect("a removal event")
        .unwrap();
    assert!(removed >= signalled);
    // And the process said so in that order.
    let dereg = log_pos(&reg, "deregistered emitter/stopping").expect("a deregistration line");
    let stopped = log_pos(&reg, "stopped").expect("a stopped line");
    let term = log_pos(&reg, "SIGTERM received").expect("a SIGTERM line");
    assert!(term < dereg && dereg < stopped, "{}", reg.log_text());
}

#[tokio::test]
async fn sigkill_leaves_the_instance_to_expire_within_its_ttl() {
    let dir = TestDirectory::start(&[]).await;
    let app = Greeting::start("1", "a").await;
    let mut reg = registrar(&dir, "killed9", Some(&app), &[("BAKER_INTERVAL", "500ms")]);
    let inst = registered(&dir, "killed9").await;
    assert_eq!(inst.ttl_ms, 1500);

    reg.kill9();
    let killed = Instant::now();
    assert!(
        instance(&dir, "killed9").await.is_some(),
        "nothing deregisters a killed registrar: the instance stays until its ttl runs out"
    );
    deregistered(&dir, "killed9").await;
    let took = killed.elapsed();
    assert!(
        took <= Duration::from_millis(1500) + Duration::from_secs(2),
        "expired after {took:?}"
    );
}

#[tokio::test]
async fn a_restarted_directory_gets_the_instance_back_within_an_interval() {
    let mut dir = TestDirectory::start(&[]).await;
    let app = Greeting::start("1", "a").await;
    let interval = Duration::from_secs(1);
    let mut reg = registrar(
        &dir,
        "survivor",
        Some(&app),
        &[("BAKER_INTERVAL", "1s"), ("BAKER_RISE", "1")],
    );
    registered(&dir, "survivor").await;

    dir.kill9();
    reg.wait_for_log("cannot register emitter/survivor", WAIT)
        .await;
    // Long enough for the retry delay to reach its cap.
    tokio::time::sleep(interval * 3).await;
    let before = reg.log().len();
    dir.restart().await;
    let back = Instant::now();
    registered(&dir, "survivor").await;
    let took = back.elapsed();
    assert!(
        took < interval + Duration::from_millis(500),
        "registered again {took:?} after the directory was back:\n{}",
        reg.log_text()
    );
    // The instance is there because the registrar registered it again, not because the
    // directory kept it: a restarted directory starts empty.
    reg.wait_for_log("answers again", WAIT).await;
    assert!(
        reg.log()[before..]
            .iter()
            .any(|l| l.contains("answers again")),
        "{}",
        reg.log_text()
    );
}

#[tokio::test]
async fn a_registrar_started_before_the_directory_registers_once_it_appears() {
    let mut dir = TestDirectory::start(&[]).await;
    dir.kill9();
    let app = Greeting::start("1", "a").await;
    let mut reg = registrar(&dir, "early", Some(&app), &[]);
    reg.wait_for_log("emitter/early is now up after 2 passes", WAIT)
        .await;
    reg.wait_for_log("cannot register emitter/early", WAIT)
        .await;

    dir.restart().await;
    registered(&dir, "early").await;
}

#[tokio::test]
async fn the_target_comes_from_link_variables_when_unset() {
    let dir = TestDirectory::start(&[]).await;
    let app = Greeting::start("1", "a").await;
    let link = format!("tcp://127.0.0.1:{}", app.addr.port());
    let other = format!("tcp://127.0.0.1:{}", baker_tests::free_port());
    let mut reg = registrar(
        &dir,
        "linked",
        None,
        &[
            // The directory's own link is never taken for the app, nor is another alias when
            // `app` is there.
            ("DIRECTORY_PORT_7700_TCP", "tcp://127.0.0.1:7700"),
            ("BETA_PORT_80_TCP", other.as_str()),
            ("APP_PORT_8080_TCP", link.as_str()),
            ("APP_PORT_8080_TCP_ADDR", "127.0.0.1"),
        ],
    );
    let inst = registered(&dir, "linked").await;
    assert_eq!(
        (inst.address.as_str(), inst.port),
        ("127.0.0.1", app.addr.port())
    );
    reg.wait_for_log("target from link variable APP_PORT_8080_TCP", WAIT)
        .await;
}

#[tokio::test]
async fn a_token_is_sent_as_bearer() {
    let dir = TestDirectory::start(&[("BAKER_TOKEN", "s3cret")]).await;
    let app = Greeting::start("1", "a").await;
    let mut wrong = registrar(&dir, "wrong", Some(&app), &[("BAKER_TOKEN", "guess")]);
    let _right = registrar(&dir, "right", Some(&app), &[("BAKER_TOKEN", "s3cret")]);
    registered(&dir, "right").await;
    wrong.wait_for_log("401", WAIT).await;
    assert!(instance(&dir, "wrong").await.is_none());
    assert!(
        wrong.try_status().is_none(),
        "a refused registrar keeps retrying"
    );
}

#[tokio::test]
async fn the_zone_of_the_registrar_is_registered_and_shown_by_baker_instances() {
    let dir = TestDirectory::start(&[]).await;
    let app = Greeting::start("1", "a").await;
    let mut reg = registrar(&dir, "vm101", Some(&app), &[("BAKER_ZONE", "eu-west-1a")]);
    let other = Greeting::start("1", "b").await;
    let _plain = registrar(&dir, "vm102", Some(&other), &[]);

    let inst = registered(&dir, "vm101").await;
    assert_eq!(inst.zone.as_ref().map(|z| z.as_str()), Some("eu-west-1a"));
    assert_eq!(registered(&dir, "vm102").await.zone, None);
    reg.wait_for_log("(version 1, weight 100, zone eu-west-1a, ttl 600ms)", WAIT)
        .await;

    let table = baker(&dir.url, None, &["instances", "emitter"]).await.ok();
    let lines: Vec<Vec<&str>> = table
        .stdout
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        lines[0],
        ["ID", "ADDRESS", "VERSION", "WEIGHT", "STATE", "SOURCE", "ZONE", "TAGS", "TTL", "SEEN"],
        "{}",
        table.stdout
    );
    assert_eq!(
        lines[1..].iter().map(|l| (l[0], l[6])).collect::<Vec<_>>(),
        [("vm101", "eu-west-1a"), ("vm102", "-")],
        "{}",
        table.stdout
    );
    let json: serde_json::Value = baker(&dir.url, None, &["instances", "emitter", "--json"])
        .await
        .ok()
        .json();
    let mut zones: Vec<(String, serde_json::Value)> = json["instances"]
        .as_array()
        .unwrap_or_else(|| panic!("a list of instances: {json}"))
        .iter()
        .map(|i| (i["id"].to_string(), i["zone"].clone()))
        .collect();
    zones.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        zones,
        [
            ("\"vm101\"".to_owned(), serde_json::json!("eu-west-1a")),
            ("\"vm102\"".to_owned(), serde_json::Value::Null)
        ],
        "{json}"
    );
}

#[tokio::test]
async fn a_bad_zone_is_refused_at_start_with_64_and_registers_nothing() {
    let dir = TestDirectory::start(&[]).await;
    let app = Greeting::start("1", "a").await;
    let mut reg = registrar(&dir, "vm101", Some(&app), &[("BAKER_ZONE", "EU West")]);
    let status = reg.wait_exit(WAIT).await;
    assert_eq!(status.code(), Some(64), "{}", reg.log_text());
    let text = eventually(Duration::from_secs(2), "the error message", || {
        let text = reg.log_text();
        async move { text.contains("BAKER_ZONE").then_some(text) }
    })
    .await;
    assert!(
        text.contains(
            "BAKER_ZONE: must start with a lowercase letter or digit, got 'E' (got \"EU West\")"
        ),
        "{text}"
    );
    assert!(dir.client.services().await.unwrap().services.is_empty());
}

#[tokio::test]
async fn every_bad_variable_is_named_and_the_exit_code_is_64() {
    let mut reg = Proc::baker(
        "registrar-bad",
        "baker-registrar",
        &[
            ("BAKER_SERVICE", "Emitter"),
            ("BAKER_TARGET", "localhost:8080"),
            ("BAKER_INTERVAL", "often"),
            ("BAKER_RISE", "0"),
            ("BAKER_WEIGHT", "1000"),
            ("BAKER_CHECK", "ping"),
        ],
    );
    let status = reg.wait_exit(WAIT).await;
    assert_eq!(status.code(), Some(64), "{}", reg.log_text());
    // The reader threads may still be collecting the last lines.
    let text = eventually(Duration::from_secs(2), "the error message", || {
        let text = reg.log_text();
        async move { text.contains("BAKER_CHECK").then_some(text) }
    })
    .await;
    for var in [
        "BAKER_SERVICE",
        "BAKER_TARGET",
        "BAKER_INTERVAL",
        "BAKER_RISE",
        "BAKER_WEIGHT",
        "BAKER_CHECK",
    ] {
        assert!(text.contains(var), "{var} not named in:\n{text}");
    }
    assert!(text.contains("6 problems"), "{text}");
}

#[tokio::test]
async fn the_greeting_stops_at_once_on_sigterm() {
    let mut app = Greeting::start("3", "g").await;
    let first = app.greeting().await;
    assert_eq!(first["content"], "Hello, World!");
    assert_eq!(
        (first["version"].as_str(), first["instance"].as_str()),
        (Some("3"), Some("g"))
    );
    let second = app.greeting().await;
    assert_eq!(second["id"].as_u64(), first["id"].as_u64().map(|n| n + 1));

    let started = Instant::now();
    app.proc.term();
    let status = app.proc.wait_exit(WAIT).await;
    assert_eq!(status.code(), Some(0));
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "took {:?}",
        started.elapsed()
    );
}

/// A registrar of `app` as emitter/a on `directory` with `token`, probing every 100 ms.
fn registrar_of(app: &Greeting, directory: &str, token: Option<&str>) -> Proc {
    let target = app.url();
    let mut env = vec![
        ("BAKER_DIRECTORY", directory),
        ("BAKER_SERVICE", "emitter"),
        ("BAKER_ID", "a"),
        ("BAKER_TARGET", target.as_str()),
        ("BAKER_INTERVAL", "100ms"),
        ("BAKER_RISE", "1"),
    ];
    if let Some(t) = token {
        env.push(("BAKER_TOKEN", t));
    }
    Proc::baker("registrar", "baker-registrar", &env)
}

#[tokio::test]
async fn a_registrar_that_cannot_register_names_the_variable_to_check_and_stops_at_once() {
    let dir = TestDirectory::start(&[("BAKER_TOKEN", "s3cret")]).await;
    let app = Greeting::start("1", "a").await;
    let nowhere = format!("http://127.0.0.1:{}", baker_tests::free_port());
    for (directory, token, hint) in [
        (
            dir.url.as_str(),
            Some("wrong"),
            "check BAKER_TOKEN: it must be the directory's BAKER_TOKEN".to_owned(),
        ),
        (
            nowhere.as_str(),
            None,
            format!("check that baker-directory runs at {nowhere} (BAKER_DIRECTORY)"),
        ),
    ] {
        let mut registrar = registrar_of(&app, directory, token);
        registrar.wait_for_log(&hint, Duration::from_secs(10)).await;
        // Nothing was registered: nothing to deregister, so it stops at once.
        registrar.term();
        let stopping = Instant::now();
        let status = registrar.wait_exit(Duration::from_secs(5)).await;
        let took = stopping.elapsed();
        assert!(status.success(), "{status:?}: {}", registrar.log_text());
        assert!(
            took < Duration::from_secs(1) && !registrar.log_text().contains("deregistering"),
            "took {took:?} to stop: {}",
            registrar.log_text()
        );
    }
    assert!(
        dir.client.service("emitter").await.is_err()
            || dir
                .client
                .service("emitter")
                .await
                .unwrap()
                .instances
                .is_empty()
    );
}
