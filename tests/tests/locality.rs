//! End-to-end: an ambassador with a zone keeps its traffic in its zone, spills it by the zone
//! rule, loses its zone's last instance under load without a failed request, and comes back
//! when the zone does; a canary split holds inside the zone. Real HAProxy, directory and
//! greeting instances; requests counted per zone.

use std::collections::BTreeMap;
use std::time::Duration;

use baker_client::model::InstanceSpec;
use baker_tests::ambassador::TestAmbassador;
use baker_tests::directory::TestDirectory;
use baker_tests::greeting::Greeting;
use baker_tests::load::Load;
use baker_tests::{eventually, require, Needs};

const TTL_MS: u64 = 60_000;
const WAIT: Duration = Duration::from_secs(30);

/// `g` registered as `emitter`/`id`, version `version`, in `zone`.
async fn register_in(dir: &TestDirectory, g: &Greeting, id: &str, version: &str, zone: &str) {
    let spec = InstanceSpec {
        zone: Some(zone.to_owned()),
        ..g.spec(version, TTL_MS)
    };
    dir.client
        .register("emitter", id, &spec)
        .await
        .unwrap_or_else(|e| panic!("registering {id} in zone {zone}: {e}"));
}

/// Answers per zone: the zone is the first letter of the instance's id (`a1` is in `a`).
fn per_zone(answers: &BTreeMap<String, u64>) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for (id, n) in answers {
        *out.entry(id[..1].to_owned()).or_default() += n;
    }
    out
}

/// Percent of `answers` from zone `zone`.
fn percent_in(answers: &BTreeMap<String, u64>, zone: &str) -> f64 {
    let zones = per_zone(answers);
    let total: u64 = zones.values().sum();
    zones.get(zone).copied().unwrap_or(0) as f64 * 100.0 / total as f64
}

#[tokio::test]
async fn traffic_stays_in_its_zone_leaves_it_without_a_failure_and_comes_back() {
    if !require(Needs::Haproxy) {
        return;
    }
    let dir = TestDirectory::start(&[]).await;
    let mut a1 = Greeting::start("1", "a1").await;
    let mut a2 = Greeting::start("1", "a2").await;
    let b1 = Greeting::start("1", "b1").await;
    let b2 = Greeting::start("1", "b2").await;
    register_in(&dir, &a1, "a1", "1", "a").await;
    register_in(&dir, &a2, "a2", "1", "a").await;
    register_in(&dir, &b1, "b1", "1", "b").await;
    register_in(&dir, &b2, "b2", "1", "b").await;
    let amb = TestAmbassador::start(&dir.url, &["emitter"], &[("BAKER_ZONE", "a")]).await;
    eventually(WAIT, "b1 and b2 to wait as failover twins", || async {
        let servers = amb.servers("emitter");
        (servers.len() == 6 && servers.contains_key("failover:emitter:b2")).then_some(())
    })
    .await;
    let load = Load::start(&format!("{}/greeting", amb.url("emitter")), 2);

    // Before: every request stays in zone a.
    let before = load.answers_from_now(400, WAIT).await;
    assert_eq!(
        per_zone(&before).keys().collect::<Vec<_>>(),
        ["a"],
        "{before:?}"
    );

    // a1 dies: HAProxy stops sending to it at once. Once it is gone from the directory (as
    // its registrar would take it out), zone a holds 1 of 3 instances, against an even share
    // of 1.5: it keeps 1.4 × 1 / 1.5 = 93 % of the traffic.
    a1.proc.kill9();
    load.more(200, WAIT).await;
    dir.client.deregister("emitter", "a1").await.unwrap();
    let one_left = eventually(WAIT, "zone a to keep 93 % of the traffic", || async {
        let answers = load.answers_from_now(500, WAIT).await;
        let a = percent_in(&answers, "a");
        ((88.0..=98.0).contains(&a)).then_some(answers)
    })
    .await;

    // Zone b grows to four: a's one instance is now 1.4 × 1 / 2.5 = 56 % of an even share,
    // and 44 % of the traffic goes to b.
    let b3 = Greeting::start("1", "b3").await;
    let b4 = Greeting::start("1", "b4").await;
    register_in(&dir, &b3, "b3", "1", "b").await;
    register_in(&dir, &b4, "b4", "1", "b").await;
    let spilled = eventually(WAIT, "zone a to keep 56 % of the traffic", || async {
        let answers = load.answers_from_now(500, WAIT).await;
        let a = percent_in(&answers, "a");
        ((50.0..=62.0).contains(&a)).then_some(answers)
    })
    .await;

    // The zone's last instance dies under load: its server goes down after a few refused
    // connections, and the failover twins in b take every request, before the directory
    // knows.
    a2.proc.kill9();
    let emptied = load.answers_from_now(400, WAIT).await;
    assert_eq!(
        per_zone(&emptied).keys().collect::<Vec<_>>(),
        ["b"],
        "{emptied:?}"
    );
    dir.client.deregister("emitter", "a2").await.unwrap();
    let gone = load.answers_from_now(400, WAIT).await;
    assert_eq!(
        per_zone(&gone).keys().collect::<Vec<_>>(),
        ["b"],
        "{gone:?}"
    );

    // The zone comes back with one instance against four: it keeps 56 % again.
    let a3 = Greeting::start("1", "a3").await;
    register_in(&dir, &a3, "a3", "1", "a").await;
    let back = eventually(WAIT, "zone a to take its traffic back", || async {
        let answers = load.answers_from_now(500, WAIT).await;
        let a = percent_in(&answers, "a");
        ((50.0..=62.0).contains(&a)).then_some(answers)
    })
    .await;

    let (ok, failures) = load.finish().await;
    println!(
        "per zone: before {:?}, one left {:?}, spilled {:?}, emptied {:?}, gone {:?}, back {:?}",
        per_zone(&before),
        per_zone(&one_left),
        per_zone(&spilled),
        per_zone(&emptied),
        per_zone(&gone),
        per_zone(&back)
    );
    assert!(
        failures.is_empty(),
        "{} failed requests of {}: {:?}",
        failures.len(),
        ok,
        &failures[..failures.len().min(5)]
    );
    assert_eq!(
        amb.proc_info().reloads,
        0,
        "every change is a runtime change"
    );

    // The ambassador reports its zone and where its requests went.
    let report = eventually(WAIT, "the ambassador's locality in its report", || async {
        let listed = dir.client.ambassadors().await.ok()?;
        let locality = listed.ambassadors.first()?.report.locality.clone()?;
        (locality.requests > 0).then_some(locality)
    })
    .await;
    assert_eq!(report.zone, "a");
    assert!(report.local <= report.requests, "{report:?}");
}

#[tokio::test]
async fn a_canary_split_holds_inside_the_zone() {
    if !require(Needs::Haproxy) {
        return;
    }
    let dir = TestDirectory::start(&[]).await;
    let mut greetings = Vec::new();
    for (id, version, zone) in [
        ("a1", "1", "a"),
        ("a2", "2", "a"),
        ("b1", "1", "b"),
        ("b2", "2", "b"),
    ] {
        let g = Greeting::start(version, id).await;
        register_in(&dir, &g, id, version, zone).await;
        greetings.push(g);
    }
    dir.client
        .set_route(
            "emitter",
            &[("1".to_owned(), 80), ("2".to_owned(), 20)].into(),
        )
        .await
        .unwrap();
    let amb = TestAmbassador::start(&dir.url, &["emitter"], &[("BAKER_ZONE", "a")]).await;
    let load = Load::start(&format!("{}/greeting", amb.url("emitter")), 2);
    let answers = eventually(WAIT, "80 % to a1 and 20 % to a2, in zone a", || async {
        let answers = load.answers_from_now(500, WAIT).await;
        let total: u64 = answers.values().sum();
        let v2 = answers.get("a2").copied().unwrap_or(0) as f64 * 100.0 / total as f64;
        (per_zone(&answers).len() == 1 && (16.0..=24.0).contains(&v2)).then_some(answers)
    })
    .await;
    assert_eq!(
        per_zone(&answers).keys().collect::<Vec<_>>(),
        ["a"],
        "{answers:?}"
    );
    // Version 2 leaves zone a: its 20 % crosses to b2, version 1 stays.
    dir.client.deregister("emitter", "a2").await.unwrap();
    let answers = eventually(WAIT, "version 2's share to go to b2", || async {
        let answers = load.answers_from_now(500, WAIT).await;
        let total: u64 = answers.values().sum();
        let b2 = answers.get("b2").copied().unwrap_or(0) as f64 * 100.0 / total as f64;
        ((16.0..=24.0).contains(&b2) && !answers.contains_key("b1")).then_some(answers)
    })
    .await;
    let (ok, failures) = load.finish().await;
    assert!(
        failures.is_empty(),
        "{} failed of {ok}: {failures:?}",
        failures.len()
    );
    println!("version 2 gone from zone a: {answers:?}");
}
