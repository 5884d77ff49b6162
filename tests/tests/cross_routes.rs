//! End-to-end: routes that send a share of one service's traffic to another service (or one
//! version of it), through a real directory, ambassador and HAProxy: the split holds whatever
//! the instance counts, flips with no failed request and no reload, follows the target
//! service's instances at run time, and gives a missing target's share back.

use std::collections::BTreeMap;
use std::time::Duration;

use baker_tests::ambassador::TestAmbassador;
use baker_tests::cli::baker;
use baker_tests::directory::TestDirectory;
use baker_tests::greeting::{register, Greeting};
use baker_tests::load::Load;
use baker_tests::{eventually, require, Needs};

/// Long enough that no registration expires during a test.
const TTL_MS: u64 = 60_000;

/// HAProxy's current weight of each server of `backend`.
fn weights(amb: &TestAmbassador, backend: &str) -> BTreeMap<String, u32> {
    amb.servers(backend)
        .into_keys()
        .map(|name| {
            let out = amb.admin_command(&format!("get weight {backend}/{name}"));
            let w = out.split_whitespace().next().and_then(|w| w.parse().ok());
            let w = w.unwrap_or_else(|| panic!("no weight for {name}: {out}"));
            (name, w)
        })
        .collect()
}

/// Waits until the servers of `backend` have weights for which `check` holds.
async fn until_weights(
    amb: &TestAmbassador,
    backend: &str,
    what: &str,
    check: impl Fn(&BTreeMap<String, u32>) -> bool,
) {
    eventually(Duration::from_secs(10), what, || async {
        let w = weights(amb, backend);
        check(&w).then_some(())
    })
    .await;
}

/// Answers per instance to the next `n` requests of `load` sent from now on, in percent of them.
async fn shares(load: &Load, n: u64) -> BTreeMap<String, f64> {
    let answers = load.answers_from_now(n, Duration::from_secs(60)).await;
    let total: u64 = answers.values().sum();
    answers
        .into_iter()
        .map(|(k, v)| (k, v as f64 * 100.0 / total as f64))
        .collect()
}

/// The share of the instances whose id starts with `prefix`.
fn share_of(shares: &BTreeMap<String, f64>, prefix: &str) -> f64 {
    shares
        .iter()
        .filter(|(k, _)| k.starts_with(prefix))
        .map(|(_, v)| v)
        .sum()
}

/// A directory, the greetings of `instances` (service, id, version) registered, and an
/// ambassador routing the monolith that has all of the monolith's instances as servers.
struct Monolith {
    amb: TestAmbassador,
    greetings: Vec<Greeting>,
    dir: TestDirectory,
}

impl Monolith {
    async fn start(instances: &[(&str, &str, &str)]) -> Monolith {
        let dir = TestDirectory::start(&[]).await;
        let mut greetings = Vec::new();
        for &(_, id, version) in instances {
            greetings.push(Greeting::start(version, id).await);
        }
        for (&(service, id, version), g) in instances.iter().zip(&greetings) {
            register(&dir.client, service, g, id, version, TTL_MS).await;
        }
        let amb = TestAmbassador::start(&dir.url, &["monolith"], &[]).await;
        let servers = instances.iter().filter(|i| i.0 == "monolith").count();
        eventually(
            Duration::from_secs(10),
            "the monolith's servers",
            || async { (amb.servers("monolith").len() == servers).then_some(()) },
        )
        .await;
        Monolith {
            amb,
            greetings,
            dir,
        }
    }
}

/// Stops `load`: no request failed, and `amb` did not reload since it had `reloads`.
async fn no_failure_nor_reload(load: Load, amb: &TestAmbassador, reloads: u64) {
    let (ok, failures) = load.finish().await;
    assert!(
        failures.is_empty(),
        "{} of {ok} requests failed: {failures:?}",
        failures.len()
    );
    assert_eq!(amb.proc_info().reloads, reloads, "no reload for any of it");
}

#[tokio::test]
async fn a_service_shares_its_traffic_with_another_service_and_flips_without_a_reload() {
    if !require(Needs::Haproxy) {
        return;
    }
    // Bindings drop in reverse: the ambassador first, the directory last.
    let Monolith {
        dir,
        greetings: _greetings,
        amb,
    } = Monolith::start(&[
        ("monolith", "m1", "1"),
        ("monolith", "m2", "1"),
        ("barker", "b1", "1"),
    ])
    .await;

    // Two monolith instances, one barker: the split is by service, not by instance.
    let set = baker(
        &dir.url,
        None,
        &["route", "set", "monolith", "monolith=70", "barker=30"],
    )
    .await
    .ok();
    assert!(
        set.stdout
            .contains("route of monolith set: monolith@*=70 barker@*=30"),
        "{set:#?}"
    );
    until_weights(
        &amb,
        "monolith",
        "barker's server in the monolith's backend",
        |w| w.get("barker:b1").is_some_and(|&x| x > 0),
    )
    .await;
    let reloads = amb.proc_info().reloads;
    let load = Load::start(&format!("{}/greeting", amb.url("monolith")), 4);
    let split = shares(&load, 2_400).await;
    let barker = share_of(&split, "b");
    assert!(
        (barker - 30.0).abs() <= 3.0,
        "barker got {barker:.1} %: {split:?}"
    );

    // The flip: every request to barker, and back, under load.
    dir.client
        .set_route(
            "monolith",
            &[("monolith@*".to_owned(), 0), ("barker@*".to_owned(), 100)].into(),
        )
        .await
        .unwrap();
    until_weights(
        &amb,
        "monolith",
        "the monolith's servers at weight 0",
        |w| w["m1"] == 0 && w["m2"] == 0 && w["barker:b1"] > 0,
    )
    .await;
    let flipped = shares(&load, 500).await;
    assert_eq!(share_of(&flipped, "b"), 100.0, "{flipped:?}");
    dir.client
        .set_route(
            "monolith",
            &[("monolith@*".to_owned(), 100), ("barker@*".to_owned(), 0)].into(),
        )
        .await
        .unwrap();
    until_weights(&amb, "monolith", "barker's server at weight 0", |w| {
        w["barker:b1"] == 0 && w["m1"] > 0
    })
    .await;
    let back = shares(&load, 500).await;
    assert_eq!(share_of(&back, "m"), 100.0, "{back:?}");

    // A barker instance registered now is routed too, still without a reload.
    dir.client
        .set_route(
            "monolith",
            &[("monolith@*".to_owned(), 50), ("barker@*".to_owned(), 50)].into(),
        )
        .await
        .unwrap();
    let b2 = Greeting::start("1", "b2").await;
    register(&dir.client, "barker", &b2, "b2", "1", TTL_MS).await;
    until_weights(&amb, "monolith", "the new barker instance's server", |w| {
        w.get("barker:b2").is_some_and(|&x| x > 0)
    })
    .await;
    let grown = shares(&load, 1_000).await;
    assert!(grown.get("b2").is_some_and(|&s| s > 15.0), "{grown:?}");
    assert!((share_of(&grown, "b") - 50.0).abs() <= 5.0, "{grown:?}");

    no_failure_nor_reload(load, &amb, reloads).await;
}

#[tokio::test]
async fn one_version_of_another_service_and_a_missing_target_gives_its_share_back() {
    if !require(Needs::Haproxy) {
        return;
    }
    let Monolith {
        dir,
        mut greetings,
        amb,
    } = Monolith::start(&[
        ("monolith", "m1", "1"),
        ("monolith", "m2", "2"),
        ("barker", "b1", "1"),
        ("barker", "b2", "2"),
    ])
    .await;
    baker(
        &dir.url,
        None,
        &["route", "set", "monolith", "1=90", "barker@2=10"],
    )
    .await
    .ok();
    until_weights(&amb, "monolith", "barker version 2 in the backend", |w| {
        w.get("barker:b2").is_some_and(|&x| x > 0) && w["m2"] == 0
    })
    .await;
    assert!(
        !amb.servers("monolith").contains_key("barker:b1"),
        "barker version 1 is no target"
    );
    let reloads = amb.proc_info().reloads;
    let load = Load::start(&format!("{}/greeting", amb.url("monolith")), 4);
    let split = shares(&load, 2_000).await;
    assert!(
        (split.get("b2").copied().unwrap_or(0.0) - 10.0).abs() <= 3.0,
        "{split:?}"
    );
    assert!(
        (split.get("m1").copied().unwrap_or(0.0) - 90.0).abs() <= 3.0,
        "{split:?}"
    );

    // Barker's version 2 goes away: its share goes back to the monolith's version 1.
    dir.client.deregister("barker", "b2").await.unwrap();
    greetings[3].exit().await; // b2
    eventually(
        Duration::from_secs(10),
        "barker's server to leave",
        || async { (!amb.servers("monolith").contains_key("barker:b2")).then_some(()) },
    )
    .await;
    let alone = shares(&load, 500).await;
    assert_eq!(alone.get("m1").copied(), Some(100.0), "{alone:?}");
    no_failure_nor_reload(load, &amb, reloads).await;
}

#[tokio::test]
async fn bad_cross_service_routes_change_nothing() {
    let dir = TestDirectory::start(&[]).await;
    let m1 = Greeting::start("1", "m1").await;
    register(&dir.client, "monolith", &m1, "m1", "1", TTL_MS).await;
    baker(&dir.url, None, &["route", "set", "monolith", "1=100"])
        .await
        .ok();
    let route_of = || async { dir.client.routes().await.unwrap().routes["monolith"].splits() };
    let before = route_of().await;
    for (args, code, says) in [
        (vec!["barker@=30", "1=70"], 2, "target barker@: "),
        (vec!["Barker@*=30", "1=70"], 2, "the service before '@'"),
        (vec!["barker@2:30", "1=70"], 2, "TARGET=PERCENT"),
        (
            vec!["nobody@*=30", "1=70"],
            1,
            "route.nobody@*: service nobody has never had a live instance",
        ),
        (
            vec!["monolith=70", "monolith@1=30"],
            2,
            "monolith@* already sends to every version",
        ),
        (
            vec!["1=70", "nobody@2=20"],
            2,
            "percentages must sum to 100, got 90",
        ),
        (
            vec!["v1=90", "v2=10"],
            1,
            "(409 Conflict): no live instance matches a target of this route (v1, v2): \
             monolith runs version 1; check the targets, or set the route anyway with force=true",
        ),
    ] {
        let mut all = vec!["route", "set", "monolith"];
        all.extend(args.iter().copied());
        let run = baker(&dir.url, None, &all).await;
        assert_eq!(run.code, code, "{args:?}: {run:#?}");
        assert!(run.stderr.contains(says), "{args:?}: {run:#?}");
        assert_eq!(route_of().await, before, "{args:?} changed the route");
    }
    // Over the API: 400, naming the field.
    let err = dir
        .client
        .set_route(
            "monolith",
            &[("1".to_owned(), 70), ("nobody@*".to_owned(), 30)].into(),
        )
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("400") && err.contains("route.nobody@*: service nobody"),
        "{err}"
    );
    assert_eq!(route_of().await, before);
    // Forced, the unseen service is accepted.
    let run = baker(
        &dir.url,
        None,
        &["route", "set", "--force", "monolith", "1=70", "nobody@*=30"],
    )
    .await
    .ok();
    assert!(
        run.stderr
            .contains("nobody has no live instance; its share goes"),
        "{run:#?}"
    );
    assert_eq!(
        route_of().await,
        [("1".to_owned(), 70), ("nobody@*".to_owned(), 30)].into()
    );
}
