//! The `baker` CLI against a real directory: every command, human and JSON output, errors and
//! exit codes.

use std::collections::BTreeMap;
use std::time::Duration;

use baker_client::model::{InstanceSpec, RoutesResponse, ServiceResponse, WatchEvent};
use baker_tests::cli::baker;
use baker_tests::directory::TestDirectory;
use baker_tests::{bin, eventually, free_port, Proc};

const DEADLINE: Duration = Duration::from_secs(20);

fn spec(port: u64, version: &str) -> InstanceSpec {
    InstanceSpec {
        address: "127.0.0.1".into(),
        port,
        version: Some(version.into()),
        weight: None,
        tags: vec![],
        ttl_ms: Some(600_000),
        zone: None,
    }
}

#[tokio::test]
async fn registered_instances_show_in_services_and_instances() {
    let dir = TestDirectory::start(&[]).await;
    let url = dir.url.as_str();

    let empty = baker(url, None, &["services"]).await.ok();
    assert_eq!(empty.stdout, "");
    assert!(empty.stderr.contains("no services"), "{empty:#?}");

    let reg = baker(
        url,
        None,
        &[
            "register",
            "emitter",
            "a",
            "--address",
            "10.0.0.1",
            "--port",
            "8080",
            "--tag",
            "blue",
            "--ttl",
            "10m",
        ],
    )
    .await
    .ok();
    assert_eq!(
        reg.stdout,
        "registered emitter/a 10.0.0.1:8080 v1 w100 [blue] (expires in 10m unless registered again)\n"
    );
    dir.client
        .register("emitter", "b", &spec(9000, "2"))
        .await
        .unwrap();
    let mut w = spec(9001, "1");
    w.weight = Some(7);
    dir.client.register("transform", "t1", &w).await.unwrap();

    let services = baker(url, None, &["services"]).await.ok();
    assert_eq!(
        services.stdout,
        "SERVICE     INSTANCES   VERSIONS   ROUTE\n\
         emitter     2           1,2        -\n\
         transform   1           1          -\n"
    );
    let json: serde_json::Value = baker(url, None, &["services", "--json"]).await.ok().json();
    assert_eq!(
        json["services"],
        serde_json::json!([
            {"service": "emitter", "instances": 2, "versions": ["1", "2"], "route": null},
            {"service": "transform", "instances": 1, "versions": ["1"], "route": null},
        ])
    );

    let instances = baker(url, None, &["instances", "emitter"]).await.ok();
    let lines: Vec<&str> = instances.stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{instances:#?}");
    assert!(
        lines[0].starts_with(
            "ID   ADDRESS          VERSION   WEIGHT   STATE   SOURCE      TAGS   TTL   SEEN"
        ),
        "{instances:#?}"
    );
    assert!(
        lines[1].starts_with(
            "a    10.0.0.1:8080    1         100      up      registrar   blue   10m   "
        ),
        "{instances:#?}"
    );
    assert!(
        lines[2].starts_with(
            "b    127.0.0.1:9000   2         100      up      registrar   -      10m   "
        ),
        "{instances:#?}"
    );
    assert!(lines[1].ends_with(" ago"), "{instances:#?}");

    let resp: ServiceResponse = baker(url, None, &["instances", "emitter", "--json"])
        .await
        .ok()
        .json();
    let ids: Vec<&str> = resp.instances.iter().map(|i| i.id.as_str()).collect();
    assert_eq!(ids, ["a", "b"]);
    assert_eq!(resp.instances[0].tags, ["blue"]);

    let all = baker(url, None, &["--no-headers", "instances"]).await.ok();
    let rows: Vec<Vec<&str>> = all
        .stdout
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    let first_columns: Vec<(&str, &str, &str)> = rows.iter().map(|r| (r[0], r[1], r[4])).collect();
    assert_eq!(
        first_columns,
        [
            ("emitter", "a", "100"),
            ("emitter", "b", "100"),
            ("transform", "t1", "7")
        ]
    );

    // With a route, the table is followed by it, on stdout; with --no-headers only the rows
    // are.
    baker(url, None, &["route", "set", "emitter", "1=90", "2=10"])
        .await
        .ok();
    let routed = baker(url, None, &["instances", "emitter"]).await.ok();
    assert_eq!(
        routed.stdout.lines().last(),
        Some("route: 1=90 2=10"),
        "{routed:#?}"
    );
    let rows = baker(url, None, &["--no-headers", "instances", "emitter"])
        .await
        .ok();
    assert_eq!(rows.stdout.lines().count(), 2, "{rows:#?}");
    assert_eq!(rows.stderr, "route: 1=90 2=10\n", "{rows:#?}");
    baker(url, None, &["route", "clear", "emitter"]).await.ok();

    let none = baker(url, None, &["instances", "nothing"]).await.ok();
    assert!(
        none.stderr.contains("no live instances of nothing"),
        "{none:#?}"
    );

    let dereg = baker(url, None, &["deregister", "emitter", "a"]).await.ok();
    assert_eq!(dereg.stdout, "deregistered emitter/a\n");
    let left = dir.client.service("emitter").await.unwrap();
    assert_eq!(left.instances.len(), 1);

    // Bad input is refused before anything is sent, naming every bad flag.
    let bad = baker(
        url,
        None,
        &[
            "register",
            "emitter",
            "c",
            "--address",
            "a b",
            "--port",
            "70000",
            "--weight",
            "0",
        ],
    )
    .await;
    assert_eq!(bad.code, 2, "{bad:#?}");
    for needle in [
        "--address",
        "--port: must be between 1 and 65535, got 70000",
        "--weight",
    ] {
        assert!(bad.stderr.contains(needle), "{needle}: {bad:#?}");
    }
    let bad = baker(url, None, &["instances", "Emitter"]).await;
    assert_eq!(bad.code, 2, "{bad:#?}");
    assert_eq!(dir.client.services().await.unwrap().services.len(), 2);
}

#[tokio::test]
async fn route_set_list_clear_round_trip() {
    let dir = TestDirectory::start(&[]).await;
    let url = dir.url.as_str();
    dir.client
        .register("emitter", "a", &spec(9000, "1"))
        .await
        .unwrap();

    let none = baker(url, None, &["route", "list"]).await.ok();
    assert_eq!(none.stdout, "");
    assert!(none.stderr.contains("no routes"), "{none:#?}");

    let set = baker(url, None, &["route", "set", "emitter", "1=90", "2=10"])
        .await
        .ok();
    assert_eq!(set.stdout, "route of emitter set: 1=90 2=10\n");
    // Version 2 has no live instance yet: worth a warning, not an error.
    assert!(
        set.stderr
            .contains("warning: no live instance of emitter has version 2"),
        "{set:#?}"
    );
    let routes = dir.client.routes().await.unwrap();
    assert_eq!(
        routes.routes["emitter"],
        baker_client::Route::from([("1".parse().unwrap(), 90), ("2".parse().unwrap(), 10)])
    );

    // A service that never had an instance needs --force: its name may be a typo.
    let typo = baker(url, None, &["route", "set", "alpha", "v1=100,v2=0"]).await;
    assert_eq!(typo.code, 1, "{typo:#?}");
    assert!(
        typo.stderr.starts_with(
            "error: the directory refused to set the route of alpha (409 Conflict): service \
             alpha has never had a live instance"
        ),
        "{typo:#?}"
    );
    assert!(typo.stderr.contains("--force"), "{typo:#?}");
    assert!(!dir
        .client
        .routes()
        .await
        .unwrap()
        .routes
        .contains_key("alpha"));
    // Commas work too, and a second service lists in name order.
    let forced = baker(
        url,
        None,
        &["route", "set", "--force", "alpha", "v1=100,v2=0"],
    )
    .await
    .ok();
    assert!(
        forced
            .stderr
            .contains("warning: alpha has no live instance: nothing serves it"),
        "{forced:#?}"
    );
    let list = baker(url, None, &["route", "list"]).await.ok();
    assert_eq!(
        list.stdout,
        "SERVICE   ROUTE\n\
         alpha     v1=100 v2=0\n\
         emitter   1=90 2=10\n"
    );
    let json: RoutesResponse = baker(url, None, &["route", "ls", "--json"])
        .await
        .ok()
        .json();
    assert_eq!(json.routes, dir.client.routes().await.unwrap().routes);

    let services = baker(url, None, &["services"]).await.ok();
    assert!(
        services
            .stdout
            .contains("emitter   1           1          1=90 2=10\n"),
        "{services:#?}"
    );
    assert!(
        services
            .stdout
            .contains("alpha     0           -          v1=100 v2=0\n"),
        "{services:#?}"
    );

    let clear = baker(url, None, &["route", "clear", "emitter"]).await.ok();
    assert_eq!(
        clear.stdout,
        "route of emitter cleared: traffic follows the instances' weights\n"
    );
    assert!(!dir
        .client
        .routes()
        .await
        .unwrap()
        .routes
        .contains_key("emitter"));
    // Clearing again is not an error.
    baker(url, None, &["route", "clear", "emitter"]).await.ok();
    let list = baker(url, None, &["--no-headers", "route", "list"])
        .await
        .ok();
    assert_eq!(list.stdout, "alpha   v1=100 v2=0\n");
}

#[tokio::test]
async fn bad_route_is_rejected_with_a_message_and_changes_nothing() {
    let dir = TestDirectory::start(&[]).await;
    let url = dir.url.as_str();
    baker(
        url,
        None,
        &["route", "set", "--force", "emitter", "1=90", "2=10"],
    )
    .await
    .ok();
    let before = dir.client.routes().await.unwrap();

    let sum = baker(url, None, &["route", "set", "emitter", "1=80", "2=10"]).await;
    assert_eq!(sum.code, 2, "{sum:#?}");
    assert_eq!(sum.stdout, "");
    assert_eq!(
        sum.stderr.trim_end(),
        "error: the route for emitter is not valid, nothing was changed: \
         route: percentages must sum to 100, got 90"
    );

    let twice = baker(url, None, &["route", "set", "emitter", "1=50", "1=50"]).await;
    assert_eq!(twice.code, 2, "{twice:#?}");
    assert!(
        twice.stderr.contains("version 1 is named more than once"),
        "{twice:#?}"
    );

    for (args, needle) in [
        (vec!["1:90"], "expected TARGET=PERCENT"),
        (vec!["1=ninety"], "whole number"),
        (
            vec!["1=150"],
            "route.1: must be a percentage between 0 and 100, got 150",
        ),
        (
            vec!["V2=100"],
            "version or service must start with a lowercase letter or digit",
        ),
    ] {
        let mut full = vec!["route", "set", "emitter"];
        full.extend(args);
        let run = baker(url, None, &full).await;
        assert_eq!(run.code, 2, "{run:#?}");
        assert!(run.stderr.contains(needle), "{needle}: {run:#?}");
    }
    let bad_service = baker(url, None, &["route", "set", "Emitter!", "1=100"]).await;
    assert_eq!(bad_service.code, 2, "{bad_service:#?}");

    assert_eq!(dir.client.routes().await.unwrap(), before);
}

#[tokio::test]
async fn watch_json_prints_the_directory_events() {
    let dir = TestDirectory::start(&[]).await;
    let watch = Proc::spawn(
        "watch",
        bin("baker"),
        &["watch", "--json"],
        &[("BAKER_DIRECTORY", dir.url.as_str())],
    );
    let events = || -> Vec<WatchEvent> {
        watch
            .log()
            .iter()
            .map(|l| {
                serde_json::from_str(l).unwrap_or_else(|e| {
                    panic!("not an NDJSON event ({e}): {l:?}\n{}", watch.log_text())
                })
            })
            .collect()
    };
    eventually(DEADLINE, "the snapshot", || async {
        events()
            .iter()
            .any(|e| matches!(e, WatchEvent::Snapshot { .. }))
            .then_some(())
    })
    .await;

    dir.client
        .register("emitter", "a", &spec(9000, "1"))
        .await
        .unwrap();
    let mut route = BTreeMap::new();
    route.insert("1".to_owned(), 100);
    dir.client.set_route("emitter", &route).await.unwrap();

    eventually(DEADLINE, "the instance and route events", || async {
        let ev = events();
        let instance = ev.iter().any(|e| {
            matches!(e, WatchEvent::Upsert { instance: i, .. }
                if i.service == "emitter" && i.id == "a" && i.port == 9000)
        });
        let route = ev.iter().any(|e| {
            matches!(e, WatchEvent::Route { service, route: Some(r), .. }
                if service == "emitter" && r.version_share("1") == Some(100))
        });
        (instance && route).then_some(())
    })
    .await;
    let ev = events();
    assert!(matches!(ev[0], WatchEvent::Snapshot { .. }), "{ev:#?}");
    assert!(
        ev.windows(2).all(|w| w[0].index() <= w[1].index()),
        "indexes go up: {ev:#?}"
    );
}

#[tokio::test]
async fn watch_prints_human_lines_and_reconnects() {
    let mut dir = TestDirectory::start(&[]).await;
    dir.client
        .register("emitter", "a", &spec(9000, "1"))
        .await
        .unwrap();
    let mut watch = Proc::spawn(
        "watch",
        bin("baker"),
        &["watch"],
        &[("BAKER_DIRECTORY", dir.url.as_str())],
    );
    watch.wait_for_log("# snapshot at index", DEADLINE).await;
    watch
        .wait_for_log("+ emitter/a 127.0.0.1:9000 v1 w100", DEADLINE)
        .await;

    let mut heavier = spec(9000, "1");
    heavier.weight = Some(50);
    dir.client.register("emitter", "a", &heavier).await.unwrap();
    watch
        .wait_for_log(
            "~ emitter/a 127.0.0.1:9000 v1 w50 (weight 100 → 50)",
            DEADLINE,
        )
        .await;
    let mut route = BTreeMap::new();
    route.insert("1".to_owned(), 100);
    dir.client.set_route("emitter", &route).await.unwrap();
    watch.wait_for_log("route emitter 1=100", DEADLINE).await;
    dir.client.deregister("emitter", "a").await.unwrap();
    watch
        .wait_for_log("- emitter/a 127.0.0.1:9000 v1 w50", DEADLINE)
        .await;

    dir.restart().await;
    watch
        .wait_for_log(
            "baker: lost the watch stream from the directory at",
            DEADLINE,
        )
        .await;
    watch
        .wait_for_log("baker: reconnected to the directory at", DEADLINE)
        .await;
    watch.wait_for_log("# resynced at index", DEADLINE).await;
    dir.client
        .register("emitter", "b", &spec(9001, "2"))
        .await
        .unwrap();
    watch
        .wait_for_log("+ emitter/b 127.0.0.1:9001 v2 w100", DEADLINE)
        .await;
    // The route survived the restart, so the resync printed no route line for it.
    let log = watch.log();
    assert_eq!(
        log.iter()
            .filter(|l| l.starts_with("route emitter"))
            .count(),
        1,
        "{}",
        watch.log_text()
    );
    assert!(watch.try_status().is_none(), "watch should keep running");
}

#[tokio::test]
async fn unreachable_directory_is_reported_with_its_own_exit_code() {
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    for args in [vec!["services"], vec!["route", "list"], vec!["watch"]] {
        let run = baker(&url, None, &args).await;
        assert_eq!(run.code, 69, "{args:?}: {run:#?}");
        assert_eq!(run.stdout, "");
        let first = run.stderr.lines().next().unwrap_or_default();
        assert_eq!(
            first,
            format!("error: cannot reach the directory at {url}: connection refused"),
            "{run:#?}"
        );
        assert!(run
            .stderr
            .contains("hint: is baker-directory running there?"));
    }

    let bad = baker("localhost:7700", None, &["services"]).await;
    assert_eq!(bad.code, 64, "{bad:#?}");
    assert!(
        bad.stderr
            .contains("--directory / BAKER_DIRECTORY must be an http:// or https:// URL"),
        "{bad:#?}"
    );

    let usage = baker(&url, None, &["no-such-command"]).await;
    assert_eq!(usage.code, 2, "{usage:#?}");
}

/// `baker register emitter <id> ...` with `BAKER_ZONE=zone` in its environment, and `args`.
async fn register_in_zone(dir: &TestDirectory, id: &str, zone: &str, args: &[&str]) {
    let mut cmd = tokio::process::Command::new(bin("baker"));
    for (k, _) in std::env::vars() {
        if k.starts_with("BAKER_") {
            cmd.env_remove(k);
        }
    }
    let out = cmd
        .args([
            "register",
            "emitter",
            id,
            "--address",
            "10.0.0.1",
            "--port",
            "80",
        ])
        .args(args)
        .env("BAKER_DIRECTORY", &dir.url)
        .env("BAKER_ZONE", zone)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(DEADLINE, out)
        .await
        .expect("baker register finishes")
        .expect("running baker");
    assert!(out.status.success(), "{out:?}");
}

#[tokio::test]
async fn register_takes_the_zone_from_baker_zone_and_the_flag_wins() {
    let dir = TestDirectory::start(&[]).await;
    register_in_zone(&dir, "a", "zone-env", &[]).await;
    register_in_zone(&dir, "b", "zone-env", &["--zone", "zone-flag"]).await;
    register_in_zone(&dir, "c", "", &[]).await;
    let mut zones: Vec<(String, Option<String>)> = dir
        .client
        .service("emitter")
        .await
        .expect("emitter")
        .instances
        .iter()
        .map(|i| (i.id.to_string(), i.zone.as_ref().map(ToString::to_string)))
        .collect();
    zones.sort();
    assert_eq!(
        zones,
        [
            ("a".to_owned(), Some("zone-env".to_owned())),
            ("b".to_owned(), Some("zone-flag".to_owned())),
            ("c".to_owned(), None),
        ],
        "an empty BAKER_ZONE counts as unset"
    );
}

#[tokio::test]
async fn a_token_that_cannot_be_sent_is_bad_configuration() {
    // Nothing listens there: the token is refused before any request is tried.
    let url = format!("http://127.0.0.1:{}", free_port());
    for args in [&["services"][..], &["route", "list"], &["watch"]] {
        let run = baker(&url, Some("s3\u{7}cret"), args).await;
        assert_eq!(run.code, 64, "{args:?}: {run:#?}");
        assert_eq!(
            run.stderr.lines().next().unwrap_or_default(),
            "error: --token / BAKER_TOKEN must be printable ASCII without spaces: it is sent \
             in an Authorization header",
            "{run:#?}"
        );
    }
    let flag = baker(&url, None, &["--token", "two words", "services"]).await;
    assert_eq!(flag.code, 64, "{flag:#?}");
    let bearer = baker(&url, Some("Bearer s3cret"), &["services"]).await;
    assert_eq!(bearer.code, 64, "{bearer:#?}");
    assert_eq!(
        bearer.stderr.lines().next().unwrap_or_default(),
        "error: --token / BAKER_TOKEN must be the token alone, without the `Bearer ` prefix \
         (Baker adds it): it is sent in an Authorization header",
        "{bearer:#?}"
    );
}

#[tokio::test]
async fn token_is_required_for_changes_and_accepted() {
    let dir = TestDirectory::start(&[("BAKER_TOKEN", "s3cret")]).await;
    let url = dir.url.as_str();
    let reg = [
        "register",
        "emitter",
        "a",
        "--address",
        "10.0.0.1",
        "--port",
        "80",
    ];

    let none = baker(url, None, &reg).await;
    assert_eq!(none.code, 1, "{none:#?}");
    assert!(
        none.stderr
            .starts_with("error: the directory refused to register emitter/a (401 Unauthorized): "),
        "{none:#?}"
    );
    assert!(
        none.stderr
            .contains("hint: this directory requires a token"),
        "{none:#?}"
    );

    let wrong = baker(url, Some("guess"), &["route", "set", "emitter", "1=100"]).await;
    assert_eq!(wrong.code, 1, "{wrong:#?}");
    assert!(wrong.stderr.contains("(401 Unauthorized)"), "{wrong:#?}");
    assert!(
        wrong
            .stderr
            .contains("hint: the token given was not accepted"),
        "{wrong:#?}"
    );
    assert!(dir.client.routes().await.unwrap().routes.is_empty());
    assert!(dir.client.services().await.unwrap().services.is_empty());

    baker(url, Some("s3cret"), &reg).await.ok();
    // The flag works as well as the variable.
    baker(
        url,
        None,
        &["--token", "s3cret", "route", "set", "emitter", "1=100"],
    )
    .await
    .ok();
    // Reading needs no token.
    let services = baker(url, None, &["services"]).await.ok();
    assert!(
        services
            .stdout
            .contains("emitter   1           1          1=100"),
        "{services:#?}"
    );
}

#[tokio::test]
async fn links_prints_the_docker_block_exactly() {
    // No directory needed: point at one that does not exist.
    let nowhere = "http://127.0.0.1:1";
    let run = baker(
        nowhere,
        None,
        &[
            "links",
            "emitter=emitter-amb:8000",
            "my-dns=10.0.0.2:53/udp",
        ],
    )
    .await
    .ok();
    assert_eq!(
        run.stdout,
        "EMITTER_PORT=tcp://emitter-amb:8000\n\
         EMITTER_PORT_8000_TCP=tcp://emitter-amb:8000\n\
         EMITTER_PORT_8000_TCP_ADDR=emitter-amb\n\
         EMITTER_PORT_8000_TCP_PORT=8000\n\
         EMITTER_PORT_8000_TCP_PROTO=tcp\n\
         MY_DNS_PORT=udp://10.0.0.2:53\n\
         MY_DNS_PORT_53_UDP=udp://10.0.0.2:53\n\
         MY_DNS_PORT_53_UDP_ADDR=10.0.0.2\n\
         MY_DNS_PORT_53_UDP_PORT=53\n\
         MY_DNS_PORT_53_UDP_PROTO=udp\n"
    );
    assert_eq!(run.stderr, "");

    let export = baker(nowhere, None, &["links", "--export", "transform=amb:8001"])
        .await
        .ok();
    assert_eq!(
        export.stdout,
        "export TRANSFORM_PORT=tcp://amb:8001\n\
         export TRANSFORM_PORT_8001_TCP=tcp://amb:8001\n\
         export TRANSFORM_PORT_8001_TCP_ADDR=amb\n\
         export TRANSFORM_PORT_8001_TCP_PORT=8001\n\
         export TRANSFORM_PORT_8001_TCP_PROTO=tcp\n"
    );
    // What baker prints is what the library reads back.
    let vars = export.stdout.lines().map(|l| {
        let (k, v) = l.trim_start_matches("export ").split_once('=').unwrap();
        (k.to_owned(), v.to_owned())
    });
    let link = baker_client::links::find(vars, "transform", 8001).expect("the link reads back");
    assert_eq!(link.authority(), "amb:8001");

    let json: BTreeMap<String, String> = baker(nowhere, None, &["links", "--json", "a=h:1"])
        .await
        .ok()
        .json();
    assert_eq!(json["A_PORT_1_TCP"], "tcp://h:1");
    assert_eq!(json.len(), 5);

    for bad in [
        "emitter",
        "emitter=amb",
        "emitter=amb:0",
        "emitter=a;b:80",
        "e=amb:80/sctp",
    ] {
        let run = baker(nowhere, None, &["links", bad]).await;
        assert_eq!(run.code, 2, "{bad}: {run:#?}");
        assert_eq!(run.stdout, "", "{bad}");
    }
}

#[test]
fn help_names_each_variable_without_showing_an_empty_value() {
    let out = std::process::Command::new(baker_tests::bin("baker"))
        .arg("--help")
        .env_remove("BAKER_DIRECTORY")
        .env_remove("BAKER_TOKEN")
        .output()
        .expect("running baker --help");
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{help}");
    assert!(help.contains("[env: BAKER_DIRECTORY]"), "{help}");
    assert!(help.contains("[env: BAKER_TOKEN]"), "{help}");
    assert!(
        !help.contains("=]"),
        "an unset variable shown with an empty value: {help}"
    );
}

#[tokio::test]
async fn a_server_that_is_not_a_directory_is_named_as_such() {
    // An ambassador's port, or any other HTTP server, given as the directory.
    let other = baker_tests::greeting::Greeting::start("1", "g1").await;
    let run = baker(&other.url(), None, &["services"]).await;
    assert_eq!(run.code, 1, "{run:#?}");
    let line = run.stderr.lines().next().unwrap_or_default();
    assert!(
        line.starts_with("error: the directory refused to list services (404 Not Found): ")
            && line.contains(&format!(
                "{} does not answer as a Baker directory (whose errors are JSON with an \
                 \"error\"): it sent ",
                other.url()
            ))
            && line.ends_with("; check BAKER_DIRECTORY (or --directory)"),
        "{run:#?}"
    );
}
