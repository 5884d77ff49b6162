//! End-to-end: the operator's view. Ambassadors report to a real directory, `--wait` returns
//! once every live ambassador's HAProxy runs a change, and traffic adds up across ambassadors.
//! A drained instance gets no new request under load, with none failed and no reload, and its
//! drain outlives the directory.
//!
//! Every scenario runs on both stores (`BAKER_TEST_STORE=etcd`): on etcd a drain is a key, and
//! outlives the replica that took it.

use std::time::Duration;

use baker_client::maintenance::{InstanceState, Target};
use baker_client::model::InstanceSpec;
use baker_client::ops::{AmbassadorsResponse, ServerState};
use baker_tests::ambassador::TestAmbassador;
use baker_tests::cli::baker;
use baker_tests::directory::TestDirectory;
use baker_tests::greeting::{register, Greeting};
use baker_tests::load::{greet, Load};
use baker_tests::{eventually, require, Needs};
use nix::sys::signal::Signal;

const DEADLINE: Duration = Duration::from_secs(20);
const TTL_MS: u64 = 600_000;

/// The `instance` field of one greeting through `url`.
async fn instance_behind(http: &reqwest::Client, url: &str) -> String {
    let v: serde_json::Value = http
        .get(format!("{url}/greeting"))
        .send()
        .await
        .and_then(|r| r.error_for_status())
        .unwrap_or_else(|e| panic!("GET {url}/greeting: {e}"))
        .json()
        .await
        .expect("a greeting");
    v["instance"].as_str().unwrap_or_default().to_owned()
}

#[tokio::test]
async fn ambassadors_report_and_wait_returns_once_every_one_applied_the_change() {
    if !require(Needs::Haproxy) {
        return;
    }
    let dir = TestDirectory::start(&[]).await;
    let (g1, g2) = (
        Greeting::start("1", "g1").await,
        Greeting::start("2", "g2").await,
    );
    register(&dir.client, "greeting", &g1, "g1", "1", TTL_MS).await;
    register(&dir.client, "greeting", &g2, "g2", "2", TTL_MS).await;
    let a = TestAmbassador::start(&dir.url, &["greeting"], &[("BAKER_ID", "amb-a")]).await;
    let b = TestAmbassador::start(&dir.url, &["greeting"], &[("BAKER_ID", "amb-b")]).await;

    let listed: AmbassadorsResponse =
        eventually(DEADLINE, "both ambassadors caught up", || async {
            let r = dir.client.ambassadors().await.ok()?;
            (r.ambassadors.len() == 2 && r.ambassadors.iter().all(|a| a.live && a.caught_up))
                .then_some(r)
        })
        .await;
    assert_eq!(listed.ambassadors[0].id, "amb-a");
    assert_eq!(listed.ambassadors[0].report.applied_index, listed.index);
    assert_eq!(
        listed.ambassadors[0].report.services[0].port,
        Some(a.ports["greeting"])
    );
    let table = baker(&dir.url, None, &["ambassadors"]).await.ok();
    assert!(table.stdout.starts_with("ID "), "{table:#?}");
    assert_eq!(
        table.stdout.matches("caught-up").count(),
        2,
        "{}",
        table.stdout
    );

    // Traffic through both ambassadors adds up per instance.
    let http = reqwest::Client::new();
    for _ in 0..10 {
        instance_behind(&http, &a.url("greeting")).await;
        instance_behind(&http, &b.url("greeting")).await;
    }
    eventually(
        DEADLINE,
        "20 requests counted over both ambassadors",
        || async {
            let r = dir.client.ambassadors().await.ok()?;
            let g = r.traffic.get("greeting")?;
            let total: u64 = g.values().map(|t| t.requests).sum();
            (total == 20 && g.values().all(|t| t.ambassadors == 2 && t.up == 2)).then_some(())
        },
    )
    .await;
    let traffic = baker(&dir.url, None, &["traffic", "greeting"]).await.ok();
    assert!(traffic.stdout.contains("2/2"), "{traffic:#?}");

    // Once --wait returns, every ambassador routes by the new split: no polling needed.
    for (split, want) in [("2=100", "g2"), ("1=100", "g1"), ("2=100", "g2")] {
        let run = baker(
            &dir.url,
            None,
            &["route", "set", "greeting", split, "--wait"],
        )
        .await
        .ok();
        assert!(
            run.stderr
                .contains("applied by 2 ambassador(s): amb-a, amb-b"),
            "{run:#?}"
        );
        for amb in [&a, &b] {
            for _ in 0..5 {
                assert_eq!(instance_behind(&http, &amb.url("greeting")).await, want);
            }
        }
    }

    // A stopped ambassador is waited for until the timeout, and named.
    b.proc.signal(Signal::SIGSTOP);
    let run = baker(
        &dir.url,
        None,
        &[
            "route",
            "set",
            "greeting",
            "1=100",
            "--wait",
            "--timeout",
            "1s",
        ],
    )
    .await;
    b.proc.signal(Signal::SIGCONT);
    assert_eq!(run.code, 1, "{run:#?}");
    assert!(
        run.stderr
            .contains("1 live ambassador(s) had not applied it: amb-b on "),
        "{run:#?}"
    );
    assert!(!run.stderr.contains("amb-a"), "{run:#?}");

    // An ambassador that stops signs off.
    b.proc.term();
    eventually(DEADLINE, "amb-b gone from the list", || async {
        let r = dir.client.ambassadors().await.ok()?;
        (r.ambassadors.len() == 1 && r.ambassadors[0].id == "amb-a").then_some(())
    })
    .await;
}

/// The admin state (`ready`, `drain`, `maint`) of each server of `greeting` in `amb`'s HAProxy,
/// once it is `want` for every server named there.
async fn servers_become(amb: &TestAmbassador, want: &[(&str, &str)]) {
    eventually(
        DEADLINE,
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

/// Asserts that `instance` answers none of the next 200 requests of `load` sent from now on.
async fn gets_nothing(load: &Load, instance: &str) {
    let answers = load.answers_from_now(200, DEADLINE).await;
    assert!(
        !answers.contains_key(instance),
        "{instance} answered requests sent after its drain was applied: {answers:?}"
    );
}

/// Waits until `instance` answers requests of `load` again.
async fn serves_again(load: &Load, instance: &str) {
    let before = load.by_instance().get(instance).copied().unwrap_or(0);
    eventually(DEADLINE, &format!("{instance} to serve again"), || async {
        (load.by_instance().get(instance).copied().unwrap_or(0) > before).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_drained_instance_gets_no_new_request_under_load_and_its_drain_outlives_the_directory() {
    if !require(Needs::Haproxy) {
        return;
    }
    let mut dir = TestDirectory::start(&[("BAKER_TOKEN", "s3cret")]).await;
    let (g1, g2, g3) = (
        Greeting::start("1", "g1").await,
        Greeting::start("2", "g2").await,
        Greeting::start("1", "g3").await,
    );
    register(&dir.client, "greeting", &g1, "g1", "1", 600_000).await;
    register(&dir.client, "greeting", &g2, "g2", "2", 600_000).await;
    let amb = TestAmbassador::start(
        &dir.url,
        &["greeting"],
        &[("BAKER_ID", "amb"), ("BAKER_TOKEN", "s3cret")],
    )
    .await;
    servers_become(&amb, &[("g1", "ready"), ("g2", "ready")]).await;
    let reloads = amb.proc_info().reloads;
    let url = format!("{}/greeting", amb.url("greeting"));
    let load = Load::start(&url, 4);
    load.more(50, DEADLINE).await;

    // Slow requests in flight on both instances while g1 is drained, with a reason that looks
    // like an attack on HAProxy's runtime API.
    let http = reqwest::Client::new();
    let slow: Vec<_> = (0..12)
        .map(|_| {
            let (http, url) = (http.clone(), format!("{url}?delay_ms=1500"));
            tokio::spawn(async move { greet(&http, &url).await })
        })
        .collect();
    // The load has 4 requests in flight at most: 5 connections to g1 mean a slow one is on it.
    // On a busy machine the drain could otherwise reach HAProxy before any slow request did.
    eventually(DEADLINE, "a slow request in flight on g1", || async {
        (amb.sessions("greeting", "g1") >= 5).then_some(())
    })
    .await;
    let hostile = "x; set server greeting/g2 state maint # <b>'\"</b>";
    let drained = dir
        .client
        .drain(
            "greeting",
            &Target::Instance("g1".parse().unwrap()),
            Some(hostile),
        )
        .await
        .unwrap();
    assert_eq!(drained.drain.reason.as_ref().unwrap().as_str(), hostile);
    servers_become(&amb, &[("g1", "drain"), ("g2", "ready")]).await;
    gets_nothing(&load, "g1").await;
    let mut answered_by = Vec::new();
    for s in slow {
        answered_by.push(s.await.unwrap().expect("a slow request in flight failed"));
    }
    assert!(
        answered_by.iter().any(|i| i == "g1"),
        "no slow request was in flight on g1 when it was drained: {answered_by:?}"
    );
    let config = std::fs::read_to_string(amb.run_dir().join("haproxy.cfg")).unwrap();
    assert!(
        !config.contains("set server") && !config.contains("<b>"),
        "{config}"
    );
    // The directory lists it draining, the ambassador reports its server draining.
    let listed = dir.client.service("greeting").await.unwrap();
    let g1_listed = listed.instances.iter().find(|i| i.id == "g1").unwrap();
    assert_eq!(g1_listed.state, InstanceState::Draining);
    eventually(DEADLINE, "the report to show g1 draining", || async {
        let r = dir.client.ambassadors().await.ok()?;
        r.ambassadors[0]
            .report
            .servers
            .iter()
            .any(|s| s.id == "g1" && s.state == ServerState::Drain)
            .then_some(())
    })
    .await;

    // Undrained, it takes traffic again at its weight.
    dir.client
        .undrain("greeting", &Target::Instance("g1".parse().unwrap()))
        .await
        .unwrap();
    servers_become(&amb, &[("g1", "ready"), ("g2", "ready")]).await;
    serves_again(&load, "g1").await;

    // By version: every instance of version 2.
    let v2 = Target::Version("2".parse().unwrap());
    dir.client.drain("greeting", &v2, None).await.unwrap();
    servers_become(&amb, &[("g1", "ready"), ("g2", "drain")]).await;
    gets_nothing(&load, "g2").await;
    dir.client.undrain("greeting", &v2).await.unwrap();
    servers_become(&amb, &[("g1", "ready"), ("g2", "ready")]).await;
    serves_again(&load, "g2").await;

    // Drained before it registers: it joins HAProxy draining, never ready.
    let g3_target = Target::Instance("g3".parse().unwrap());
    dir.client
        .drain_forced("greeting", &g3_target, Some("not yet"))
        .await
        .unwrap();
    register(&dir.client, "greeting", &g3, "g3", "1", 600_000).await;
    servers_become(&amb, &[("g1", "ready"), ("g2", "ready"), ("g3", "drain")]).await;
    gets_nothing(&load, "g3").await;

    // The drain survives kill -9: the restarted directory has it, and g3, registering again,
    // is still drained; the ambassador never lets it serve meanwhile.
    dir.kill9();
    dir.restart().await;
    let kept = dir.client.maintenance().await.unwrap();
    assert_eq!(kept.maintenance.len(), 1, "{kept:?}");
    assert_eq!(kept.maintenance[0].target(), Some(g3_target.clone()));
    assert_eq!(
        kept.maintenance[0].reason.as_ref().unwrap().as_str(),
        "not yet"
    );
    for (g, id, version) in [(&g1, "g1", "1"), (&g2, "g2", "2"), (&g3, "g3", "1")] {
        register(&dir.client, "greeting", g, id, version, 600_000).await;
    }
    let g3_listed = dir.client.service("greeting").await.unwrap();
    assert!(g3_listed
        .instances
        .iter()
        .any(|i| i.id == "g3" && i.state == InstanceState::Draining));
    eventually(
        DEADLINE,
        "the ambassador to catch up after the restart",
        || async {
            let r = dir.client.ambassadors().await.ok()?;
            r.ambassadors.iter().all(|a| a.caught_up).then_some(())
        },
    )
    .await;
    servers_become(&amb, &[("g1", "ready"), ("g2", "ready"), ("g3", "drain")]).await;
    gets_nothing(&load, "g3").await;
    dir.client.undrain("greeting", &g3_target).await.unwrap();
    serves_again(&load, "g3").await;

    let (ok, failed) = load.finish().await;
    assert!(
        failed.is_empty(),
        "{} of {ok} requests failed: {failed:?}",
        failed.len()
    );
    assert_eq!(
        amb.proc_info().reloads,
        reloads,
        "a drain or undrain reloaded HAProxy"
    );
}

/// `PUT` `path` on `dir` with `token`, an `X-Baker-Origin` header when given, and `body`;
/// the status and the body.
async fn put(
    dir: &TestDirectory,
    path: &str,
    token: Option<&str>,
    origin: Option<&str>,
    body: &str,
) -> (u16, String) {
    let mut req = reqwest::Client::new()
        .put(format!("{}{path}", dir.url))
        .body(body.to_owned());
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if let Some(o) = origin {
        req = req.header("x-baker-origin", o);
    }
    let resp = req.send().await.unwrap();
    (resp.status().as_u16(), resp.text().await.unwrap())
}

#[tokio::test]
async fn bad_drains_are_refused_and_change_nothing() {
    let dir = TestDirectory::start(&[("BAKER_TOKEN", "s3cret"), ("BAKER_MAX_DRAINS", "1")]).await;
    for (id, version) in [("g1", "1"), ("g2", "2")] {
        let spec = InstanceSpec {
            address: "127.0.0.1".into(),
            port: 8080,
            version: Some(version.into()),
            weight: None,
            tags: vec![],
            ttl_ms: Some(600_000),
            zone: None,
        };
        dir.client.register("greeting", id, &spec).await.unwrap();
    }
    let before = dir.client.maintenance().await.unwrap().index;
    let path = "/v1/maintenance/greeting/instances/g1";
    let long = format!(r#"{{"reason":"{}"}}"#, "a".repeat(201));
    for (path, token, origin, body, status, says) in [
        (path, None, None, "", 401, "missing bearer token"),
        (path, Some("wrong"), None, "", 401, "wrong bearer token"),
        (
            path,
            Some("s3cret"),
            None,
            r#"{"reason":"a\u0007b"}"#,
            400,
            "reason: may contain only printable ASCII",
        ),
        (
            path,
            Some("s3cret"),
            None,
            r#"{"reason":"line\nbreak"}"#,
            400,
            "reason: may contain only printable ASCII",
        ),
        (
            path,
            Some("s3cret"),
            None,
            &long,
            400,
            "reason: must be at most 200 characters",
        ),
        (
            path,
            Some("s3cret"),
            None,
            r#"{"reason":""}"#,
            400,
            "reason: must not be empty",
        ),
        (
            path,
            Some("s3cret"),
            None,
            r#"{"why":"x"}"#,
            400,
            "unknown field `why`",
        ),
        (
            path,
            Some("s3cret"),
            Some("<script>"),
            "",
            400,
            "X-Baker-Origin: may contain only",
        ),
        (
            "/v1/maintenance/Greeting/instances/g%201",
            Some("s3cret"),
            None,
            "",
            400,
            "service: must start with a lowercase letter or digit, got 'G'; id: may contain only",
        ),
        (
            "/v1/maintenance/greeting/versions/v..2%0a",
            Some("s3cret"),
            None,
            "",
            400,
            "version: may contain only",
        ),
        (
            "/v1/maintenance/greeting/g1",
            Some("s3cret"),
            None,
            "",
            404,
            "no such endpoint",
        ),
        (
            "/v1/maintenance/greeting/instances/g1?force=maybe",
            Some("s3cret"),
            None,
            "",
            400,
            "bad query",
        ),
        // What matches no live instance is refused, naming what runs.
        (
            "/v1/maintenance/greeting/instances/g9",
            Some("s3cret"),
            None,
            "",
            409,
            "service greeting has no live instance g9 (its instances: g1, g2): check the name, \
             or drain it ahead of its registration with force=true (baker drain --force)",
        ),
        (
            "/v1/maintenance/greeting/versions/7",
            Some("s3cret"),
            None,
            "",
            409,
            "no live instance of greeting runs version 7 (it runs versions 1, 2)",
        ),
        (
            "/v1/maintenance/gretting/instances/g1",
            Some("s3cret"),
            None,
            "",
            409,
            "service gretting has no live instance (services with live instances: greeting)",
        ),
    ] {
        let (got, text) = put(&dir, path, token, origin, body).await;
        assert_eq!(got, status, "{path} {body}: {text}");
        assert!(text.contains(says), "{path} {body}: {text}");
    }
    let after = dir.client.maintenance().await.unwrap();
    assert!(after.maintenance.is_empty(), "{after:?}");
    assert_eq!(after.index, before, "a refused drain changed the table");
    assert!(!dir.data_dir().join("maintenance/greeting.json").exists());
    // The quota: one drain in place, a second refused; changing the first's reason is fine.
    let (got, _) = put(&dir, path, Some("s3cret"), Some("cli:test"), "").await;
    assert_eq!(got, 200);
    let (got, text) = put(
        &dir,
        "/v1/maintenance/greeting/versions/2",
        Some("s3cret"),
        None,
        "",
    )
    .await;
    assert_eq!(got, 429, "{text}");
    assert!(text.contains("BAKER_MAX_DRAINS"), "{text}");
    let (got, text) = put(&dir, path, Some("s3cret"), None, r#"{"reason":"other"}"#).await;
    assert_eq!(got, 200, "{text}");
    let listed = dir.client.maintenance().await.unwrap();
    assert_eq!(listed.maintenance.len(), 1);
    assert_eq!(listed.maintenance[0].origin, "127.0.0.1");
    // An undrain without the token is refused too.
    let resp = reqwest::Client::new()
        .delete(format!("{}{path}", dir.url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 401);
    assert_eq!(dir.client.maintenance().await.unwrap().maintenance.len(), 1);
}

#[tokio::test]
async fn the_history_records_each_kind_with_its_cause_filters_and_keeps_its_bound() {
    let dir = TestDirectory::start(&[("BAKER_HISTORY", "100")]).await;
    let client = dir.client.clone().with_origin("cli:ops");
    let spec = |port: u64, weight: Option<u64>, ttl_ms: u64| InstanceSpec {
        address: "127.0.0.1".into(),
        port,
        version: Some("1".into()),
        weight,
        tags: vec![],
        ttl_ms: Some(ttl_ms),
        zone: None,
    };
    client
        .register("greeting", "g1", &spec(8080, None, 60_000))
        .await
        .unwrap();
    client
        .register("greeting", "g1", &spec(8080, Some(50), 60_000))
        .await
        .unwrap();
    client
        .register("greeting", "short", &spec(8081, None, 200))
        .await
        .unwrap();
    client
        .register("other", "o1", &spec(9090, None, 60_000))
        .await
        .unwrap();
    client.deregister("other", "o1").await.unwrap();
    let split = [("1".to_owned(), 100)].into();
    client.set_route("greeting", &split).await.unwrap();
    client.clear_route("greeting").await.unwrap();
    let g1 = Target::Instance("g1".parse().unwrap());
    client
        .drain("greeting", &g1, Some("disk <swap>"))
        .await
        .unwrap();
    client.undrain("greeting", &g1).await.unwrap();
    let all = eventually(DEADLINE, "the short-lived instance to expire", || async {
        let r = dir.client.events(None, None, None, None).await.ok()?;
        r.events
            .iter()
            .any(|e| serde_json::to_value(e.kind).unwrap() == "expired")
            .then_some(r)
    })
    .await;
    let kinds: Vec<String> = all
        .events
        .iter()
        .map(|e| {
            format!(
                "{}:{}",
                e.service,
                serde_json::to_value(e.kind).unwrap().as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "greeting:registered",
            "greeting:changed",
            "greeting:registered",
            "other:registered",
            "other:deregistered",
            "greeting:route_set",
            "greeting:route_cleared",
            "greeting:drained",
            "greeting:undrained",
            "greeting:expired",
        ]
    );
    assert!(all
        .events
        .windows(2)
        .all(|w| w[0].index < w[1].index && w[0].at <= w[1].at + 1000));
    let drained = &all.events[7];
    assert_eq!(drained.origin.as_deref(), Some("cli:ops from 127.0.0.1"));
    assert_eq!(drained.reason.as_ref().unwrap().as_str(), "disk <swap>");
    assert_eq!(all.events[9].cause, "no heartbeat within its TTL of 200 ms");
    // Both stores keep a route change's origin and cause with it, as a drain's.
    for (event, cause) in [
        (&all.events[5], "set by an operator"),
        (&all.events[6], "cleared by an operator"),
    ] {
        assert_eq!(event.origin.as_deref(), Some("cli:ops from 127.0.0.1"));
        assert_eq!(event.cause, cause);
    }

    // Filters: by service, and by time (each bound inclusive).
    let other = dir
        .client
        .events(None, None, Some("other"), None)
        .await
        .unwrap();
    assert_eq!(other.events.len(), 2);
    let (t5, t8) = (all.events[5].at, all.events[8].at);
    let window = dir
        .client
        .events(Some(t5), Some(t8), None, None)
        .await
        .unwrap();
    assert!(
        window.events.iter().all(|e| e.at >= t5 && e.at <= t8),
        "{window:?}"
    );
    assert!(window.events.iter().any(|e| e.index == all.events[5].index));
    let newest = dir.client.events(None, None, None, Some(2)).await.unwrap();
    assert_eq!(newest.events, all.events[8..].to_vec());
    // RFC 3339 works as well as milliseconds; a bad time is refused.
    let resp = reqwest::get(format!(
        "{}/v1/events?since=2000-01-01T00:00:00Z&service=other",
        dir.url
    ))
    .await
    .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let resp = reqwest::get(format!("{}/v1/events?until=soon&limit=0", dir.url))
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400);
    let text = resp.text().await.unwrap();
    assert!(
        text.contains("until: must be") && text.contains("limit: must be"),
        "{text}"
    );

    // `baker events` for people.
    let run = baker(
        &dir.url,
        None,
        &["events", "--since", "10m", "--service", "greeting"],
    )
    .await
    .ok();
    assert!(run.stdout.starts_with("TIME "), "{run:#?}");
    assert!(
        run.stdout.lines().any(|l| l.contains(" drained ")
            && l.contains("instance g1 drained by an operator (disk <swap>)")),
        "{run:#?}"
    );
    assert!(
        !run.stdout
            .lines()
            .any(|l| l.split_whitespace().nth(2) == Some("other")),
        "{run:#?}"
    );

    // The bound: 100 events at most, the oldest dropped first.
    for i in 0..120 {
        dir.client
            .register("bulk", &format!("b{i}"), &spec(8000, None, 60_000))
            .await
            .unwrap();
    }
    let last = eventually(
        DEADLINE,
        "the history to record every registration",
        || async {
            let r = dir
                .client
                .events(None, None, None, Some(10_000))
                .await
                .ok()?;
            (r.events.last()?.id.as_ref()?.as_str() == "b119").then_some(r)
        },
    )
    .await;
    assert_eq!((last.events.len(), last.capacity), (100, 100));
    assert_eq!(last.events[0].id.as_ref().unwrap().as_str(), "b20");
}
