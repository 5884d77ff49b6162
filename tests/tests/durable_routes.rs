//! Routes on disk, one file per service: a crash in the middle of many route writes loses no
//! acknowledged route and tears no file, a route change costs the same whatever the number of
//! routes, and a `routes.json` of an earlier build is moved into `routes/` at start.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use baker_client::model::Route;
use baker_client::DirectoryClient;
use baker_tests::directory::TestDirectory;
use baker_tests::eventually;

fn split(version: &str) -> BTreeMap<String, u64> {
    [(version.to_owned(), 100)].into()
}

fn route(version: &str) -> Route {
    [(version.parse().unwrap(), 100)].into()
}

/// The files of `dir`, sorted.
fn files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

/// What one service's route was after its last acknowledged change, and what it would be
/// after the change in flight, if one was.
#[derive(Debug, Default, Clone)]
struct Known {
    acked: Option<String>,
    in_flight: Option<Option<String>>,
}

/// Changes the routes of `services` one after the other, round after round, until a call fails;
/// each change is recorded in flight before it is sent and acknowledged when it answers.
async fn write_routes(
    client: DirectoryClient,
    services: Vec<String>,
    known: Arc<Mutex<BTreeMap<String, Known>>>,
) -> usize {
    let mut acked = 0;
    for round in 1.. {
        for service in &services {
            // Every fifth round clears the route; the others set a new version.
            let next = (round % 5 != 0).then(|| round.to_string());
            known.lock().unwrap().get_mut(service).unwrap().in_flight = Some(next.clone());
            let answer = match &next {
                Some(v) => client
                    .set_route_forced(service, &split(v))
                    .await
                    .map(|_| ()),
                None => client.clear_route(service).await.map(|_| ()),
            };
            if answer.is_err() {
                return acked;
            }
            let mut known = known.lock().unwrap();
            let k = known.get_mut(service).unwrap();
            k.acked = next;
            k.in_flight = None;
            acked += 1;
        }
    }
    unreachable!("the loop ends when the directory dies")
}

#[tokio::test]
async fn kill_9_during_many_concurrent_route_writes_loses_no_acknowledged_route() {
    let mut dir = TestDirectory::start(&[]).await;
    let (writers, per_writer) = (24, 4);
    let known: Arc<Mutex<BTreeMap<String, Known>>> = Arc::default();
    let mut tasks = Vec::new();
    for w in 0..writers {
        let services: Vec<String> = (0..per_writer).map(|s| format!("svc-{w}-{s}")).collect();
        for s in &services {
            known.lock().unwrap().insert(s.clone(), Known::default());
        }
        tasks.push(tokio::spawn(write_routes(
            dir.client.clone(),
            services,
            known.clone(),
        )));
    }
    // Let the writes run, then kill the directory in the middle of them.
    let acked = || {
        let known = known.clone();
        async move {
            let n = known
                .lock()
                .unwrap()
                .values()
                .filter(|k| k.acked.is_some())
                .count();
            (n >= writers * per_writer).then_some(())
        }
    };
    eventually(
        Duration::from_secs(30),
        "every service to have a route",
        acked,
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    dir.kill9();
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    let known = known.lock().unwrap().clone();
    let in_flight = known.values().filter(|k| k.in_flight.is_some()).count();
    eprintln!("{total} route changes acknowledged, {in_flight} in flight at the kill");
    assert!(total >= writers * per_writer, "{total}");

    // A torn file would stop the start; the temporary files of the writes cut short are gone.
    dir.restart().await;
    let routes_dir = dir.data_dir().join("routes");
    assert!(
        files(&routes_dir).iter().all(|f| f.ends_with(".json")),
        "{:?}",
        files(&routes_dir)
    );
    let routes = dir.client.routes().await.unwrap().routes;
    for (service, k) in &known {
        let got = routes.get(service.as_str()).cloned();
        let acked = k.acked.as_deref().map(route);
        let flying = k.in_flight.clone().map(|f| f.as_deref().map(route));
        assert!(
            got == acked || Some(&got) == flying.as_ref(),
            "{service}: the directory came back with {got:?}, but {acked:?} was acknowledged \
             (and {flying:?} in flight)"
        );
    }
    // Every file on disk is a service's route as the directory serves it.
    for f in files(&routes_dir) {
        let service = f.trim_end_matches(".json");
        let text = std::fs::read_to_string(routes_dir.join(&f)).unwrap();
        let on_disk: Route = serde_json::from_str(&text).unwrap();
        assert_eq!(Some(&on_disk), routes.get(service), "{f}");
    }
}

/// The median time of `PUT`s of `service`'s route on `client`, alternating between two routes
/// so that each is a change, one call of each client in turn.
async fn median_puts(clients: &[&DirectoryClient], service: &str, n: usize) -> Vec<Duration> {
    let mut times: Vec<Vec<Duration>> = vec![Vec::new(); clients.len()];
    for i in 0..n {
        for (c, client) in clients.iter().enumerate() {
            let version = if i % 2 == 0 { "2" } else { "1" };
            let start = Instant::now();
            client
                .set_route_forced(service, &split(version))
                .await
                .unwrap();
            times[c].push(start.elapsed());
        }
    }
    times
        .into_iter()
        .map(|mut t| {
            t.sort();
            t[t.len() / 2]
        })
        .collect()
}

#[tokio::test]
async fn a_route_change_costs_the_same_beside_1200_routes_as_alone() {
    let alone = TestDirectory::start(&[]).await;
    let crowded = TestDirectory::start(&[]).await;
    // 1,200 routes, set 16 at a time.
    let mut pending = Vec::new();
    for i in 0..1_200 {
        let client = crowded.client.clone();
        pending.push(tokio::spawn(async move {
            client
                .set_route_forced(&format!("other-{i}"), &split("1"))
                .await
                .unwrap();
        }));
        if pending.len() == 16 {
            for p in pending.drain(..) {
                p.await.unwrap();
            }
        }
    }
    for p in pending {
        p.await.unwrap();
    }
    assert_eq!(crowded.client.routes().await.unwrap().routes.len(), 1_200);
    // The two directories are measured in turn, so that the machine's load weighs on both.
    let medians = median_puts(&[&alone.client, &crowded.client], "emitter", 60).await;
    let (one, many) = (medians[0], medians[1]);
    eprintln!("median route PUT: {one:?} with 1 route, {many:?} beside 1,200 routes");
    assert!(
        many < one * 3,
        "a route PUT beside 1,200 routes took {many:?} (median), more than 3x its {one:?} alone"
    );
}

/// `routes.json` exactly as the build before one file per route wrote it.
const LEGACY: &str = r#"{
  "routes": {
    "emitter": {
      "1": 90,
      "2": 10
    },
    "transform": {
      "3": 100
    }
  }
}
"#;

#[tokio::test]
async fn a_routes_json_of_an_earlier_build_is_moved_into_one_file_per_route_at_start() {
    let mut dir = TestDirectory::start(&[]).await;
    dir.stop().await;
    let data = dir.data_dir().to_owned();
    std::fs::write(data.join("routes.json"), LEGACY).unwrap();
    dir.restart().await;
    let expected: BTreeMap<_, Route> = [
        (
            "emitter".parse().unwrap(),
            [("1".parse().unwrap(), 90), ("2".parse().unwrap(), 10)].into(),
        ),
        ("transform".parse().unwrap(), route("3")),
    ]
    .into();
    assert_eq!(dir.client.routes().await.unwrap().routes, expected);
    assert_eq!(
        files(&data.join("routes")),
        ["emitter.json", "transform.json"]
    );
    assert_eq!(
        files(&data),
        ["maintenance", "routes", "routes.json.migrated"]
    );
    dir.proc
        .wait_for_log("moving the routes of", Duration::from_secs(1))
        .await;

    // From now on a change writes its service's file, and the old file is never read again.
    dir.client.clear_route("transform").await.unwrap();
    dir.kill9();
    dir.restart().await;
    let routes = dir.client.routes().await.unwrap().routes;
    assert_eq!(
        routes.keys().map(|s| s.as_str()).collect::<Vec<_>>(),
        ["emitter"]
    );
    assert_eq!(files(&data.join("routes")), ["emitter.json"]);
    // One route is read alone.
    let one = |service: &str| reqwest::get(format!("{}/v1/routes/{service}", dir.url));
    let got: serde_json::Value = one("emitter").await.unwrap().json().await.unwrap();
    assert_eq!(got["route"], serde_json::json!({"1": 90, "2": 10}), "{got}");
    assert_eq!(got["service"], "emitter");
    assert_eq!(one("transform").await.unwrap().status(), 404);
}
