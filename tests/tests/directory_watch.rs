//! The directory's watch stream end to end: order of events, many watchers converging, and a
//! stalled watcher cut off without hurting the others.

use std::io::Write;
use std::net::TcpStream;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use baker_client::model::{InstanceSpec, State, WatchEvent};
use baker_client::{ClientError, DirectoryClient};
use baker_tests::directory::TestDirectory;
use baker_tests::eventually;
use futures_util::{Stream, StreamExt};

fn spec(port: u64, weight: Option<u64>, ttl_ms: Option<u64>) -> InstanceSpec {
    InstanceSpec {
        address: "127.0.0.1".into(),
        port,
        version: None,
        weight,
        tags: vec![],
        ttl_ms,
        zone: None,
    }
}

/// The next event that is not a ping, within 5 s.
async fn next_change<S>(watch: &mut S) -> WatchEvent
where
    S: Stream<Item = Result<WatchEvent, ClientError>> + Unpin,
{
    tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match watch.next().await {
                Some(Ok(WatchEvent::Ping { .. })) => continue,
                Some(Ok(e)) => return e,
                other => panic!("watch stream failed: {other:?}"),
            }
        }
    })
    .await
    .expect("an event within 5 s")
}

/// (index, prev, cause, service, id, weight) of an instance change.
fn summary(e: &WatchEvent) -> (u64, u64, &'static str, String, String, u16) {
    match e {
        WatchEvent::Upsert {
            index,
            prev,
            cause,
            instance: i,
            ..
        } => (
            *index,
            *prev,
            cause.as_str(),
            i.service.to_string(),
            i.id.to_string(),
            i.weight,
        ),
        WatchEvent::Remove {
            index,
            prev,
            cause,
            instance: i,
            ..
        } => (
            *index,
            *prev,
            cause.as_str(),
            i.service.to_string(),
            i.id.to_string(),
            i.weight,
        ),
        other => panic!("expected an instance change, got {other:?}"),
    }
}

fn change(
    index: u64,
    cause: &'static str,
    id: &str,
    weight: u16,
) -> (u64, u64, &'static str, String, String, u16) {
    (index, index - 1, cause, "emitter".into(), id.into(), weight)
}

#[tokio::test]
async fn a_watcher_sees_the_snapshot_then_every_change_in_order() {
    let dir = TestDirectory::start(&[]).await;
    // The index a fresh directory starts at: 0 in memory, etcd's first revision on etcd.
    let base = dir.client.services().await.unwrap().index;
    let c = &dir.client;
    c.register("before", "x", &spec(7000, None, Some(60_000)))
        .await
        .unwrap();
    let mut watch = Box::pin(c.watch().await.unwrap());
    match next_change(&mut watch).await {
        WatchEvent::Snapshot {
            index, services, ..
        } => {
            assert_eq!(index, base + 1);
            assert_eq!(services["before"][0].id, "x");
        }
        other => panic!("expected a snapshot first, got {other:?}"),
    }
    // add
    c.register("emitter", "a", &spec(8000, None, Some(60_000)))
        .await
        .unwrap();
    // a heartbeat that changes nothing: no event
    c.register("emitter", "a", &spec(8000, None, Some(60_000)))
        .await
        .unwrap();
    // change
    c.register("emitter", "a", &spec(8000, Some(50), Some(60_000)))
        .await
        .unwrap();
    // add one that will expire
    c.register("emitter", "b", &spec(8001, None, Some(500)))
        .await
        .unwrap();
    // Each event carries the one instance that changed, and why.
    assert_eq!(
        summary(&next_change(&mut watch).await),
        change(base + 2, "registered", "a", 100)
    );
    assert_eq!(
        summary(&next_change(&mut watch).await),
        change(base + 3, "changed", "a", 50)
    );
    assert_eq!(
        summary(&next_change(&mut watch).await),
        change(base + 4, "registered", "b", 100)
    );
    // expire
    assert_eq!(
        summary(&next_change(&mut watch).await),
        change(base + 5, "expired", "b", 100)
    );
    // delete
    c.deregister("emitter", "a").await.unwrap();
    assert_eq!(
        summary(&next_change(&mut watch).await),
        change(base + 6, "deregistered", "a", 50)
    );
    // route set, then cleared: the service's whole route
    c.set_route("emitter", &[("1".to_owned(), 100)].into())
        .await
        .unwrap();
    c.clear_route("emitter").await.unwrap();
    let route = |e: WatchEvent| match e {
        WatchEvent::Route {
            index,
            prev,
            service,
            route,
            ..
        } => (index, prev, service.to_string(), route),
        other => panic!("expected a route event, got {other:?}"),
    };
    assert_eq!(
        route(next_change(&mut watch).await),
        (
            base + 7,
            Some(base + 6),
            "emitter".into(),
            Some([("1".parse().unwrap(), 100)].into())
        )
    );
    assert_eq!(
        route(next_change(&mut watch).await),
        (base + 8, Some(base + 7), "emitter".into(), None)
    );
}

/// The lines of a raw `GET` of `path` on the directory, until `n` lines came.
async fn raw_lines(dir: &TestDirectory, path: &str, n: usize) -> Vec<serde_json::Value> {
    let resp = reqwest::get(format!("{}{path}", dir.url)).await.unwrap();
    assert!(resp.status().is_success(), "{path}: {}", resp.status());
    let mut body = resp.bytes_stream();
    let mut text = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), async {
        while text.iter().filter(|b| **b == b'\n').count() < n {
            text.extend_from_slice(&body.next().await.unwrap().unwrap());
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{n} lines of {path}: {}", String::from_utf8_lossy(&text)));
    text.split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .take(n)
        .map(|l| serde_json::from_slice(l).unwrap())
        .collect()
}

#[tokio::test]
async fn the_v1_stream_still_sends_whole_services() {
    let dir = TestDirectory::start(&[]).await;
    // The index a fresh directory starts at: 0 in memory, etcd's first revision on etcd.
    let base = dir.client.services().await.unwrap().index;
    let c = &dir.client;
    c.register("emitter", "a", &spec(8000, None, Some(60_000)))
        .await
        .unwrap();
    let v1 = {
        let dir = &dir;
        async move { raw_lines(dir, "/v1/watch", 2).await }
    };
    let write = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        c.register("emitter", "b", &spec(8001, None, Some(60_000)))
            .await
            .unwrap();
    };
    let (lines, ()) = tokio::join!(v1, write);
    assert_eq!(lines[0]["type"], "snapshot");
    assert_eq!(lines[1]["type"], "service");
    assert_eq!(lines[1]["index"], base + 2);
    assert_eq!(lines[1]["instances"].as_array().unwrap().len(), 2);
    assert!(lines[1].get("prev").is_none());
}

#[tokio::test]
async fn a_filtered_watch_streams_only_its_services() {
    let dir = TestDirectory::start(&[]).await;
    // The index a fresh directory starts at: 0 in memory, etcd's first revision on etcd.
    let base = dir.client.services().await.unwrap().index;
    let c = &dir.client;
    for service in ["a", "b", "c"] {
        c.register(service, "1", &spec(8000, None, Some(60_000)))
            .await
            .unwrap();
    }
    c.set_route("a", &[("1".to_owned(), 100)].into())
        .await
        .unwrap();
    let only = ["b".parse().unwrap(), "c".parse().unwrap()];
    let mut watch = Box::pin(c.watch_services(Some(&only)).await.unwrap());
    match next_change(&mut watch).await {
        WatchEvent::Snapshot {
            index,
            services,
            routes,
            ..
        } => {
            assert_eq!(index, base + 4);
            assert_eq!(services.keys().collect::<Vec<_>>(), ["b", "c"]);
            assert!(routes.is_empty());
        }
        other => panic!("expected a snapshot first, got {other:?}"),
    }
    c.register("a", "2", &spec(8001, None, Some(60_000)))
        .await
        .unwrap();
    // No instance of a runs version 2: forced, the route is streamed all the same.
    c.set_route_forced("a", &[("2".to_owned(), 100)].into())
        .await
        .unwrap();
    c.set_route("c", &[("1".to_owned(), 100)].into())
        .await
        .unwrap();
    c.deregister("b", "1").await.unwrap();
    // Revisions 5 and 6 were a's: the stream goes from 4 to 7, and says so with `prev`.
    match next_change(&mut watch).await {
        WatchEvent::Route {
            index,
            prev,
            service,
            ..
        } => assert_eq!(
            (index, prev, service.as_str()),
            (base + 7, Some(base + 4), "c")
        ),
        other => panic!("expected c's route, got {other:?}"),
    }
    match next_change(&mut watch).await {
        WatchEvent::Remove {
            index,
            prev,
            instance,
            ..
        } => assert_eq!(
            (index, prev, instance.service.as_str()),
            (base + 8, base + 7, "b")
        ),
        other => panic!("expected b's removal, got {other:?}"),
    }
    // A bad filter or version is refused, naming what is wrong.
    for (query, says) in [
        ("?v=2&service=B!", "service"),
        ("?v=3", "v: must be 1 or 2"),
        ("?services=a", "the parameters are v=1|2 and service="),
    ] {
        let resp = reqwest::get(format!("{}/v1/watch{query}", dir.url))
            .await
            .unwrap();
        assert_eq!(resp.status(), 400, "{query}");
        let text = resp.text().await.unwrap();
        assert!(text.contains(says), "{query}: {text}");
    }
}

#[tokio::test]
async fn an_idle_watch_gets_pings() {
    let dir = TestDirectory::start(&[]).await;
    // The index a fresh directory starts at: 0 in memory, etcd's first revision on etcd.
    let base = dir.client.services().await.unwrap().index;
    let mut watch = Box::pin(dir.client.watch().await.unwrap());
    assert!(matches!(
        watch.next().await.unwrap().unwrap(),
        WatchEvent::Snapshot { index, .. } if index == base
    ));
    let ping = tokio::time::timeout(Duration::from_secs(7), watch.next())
        .await
        .expect("a ping within 5 s of silence")
        .unwrap()
        .unwrap();
    assert_eq!(ping, WatchEvent::Ping { index: base });
}

/// Follows a watch stream into a shared [`State`] until the stream fails.
fn follow(client: DirectoryClient, state: Arc<Mutex<State>>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut watch = Box::pin(client.watch().await.expect("opening a watch"));
        while let Some(Ok(event)) = watch.next().await {
            state.lock().unwrap().apply(event);
        }
    })
}

#[tokio::test]
async fn fifty_watchers_converge_to_the_same_state() {
    let dir = TestDirectory::start(&[]).await;
    let states: Vec<Arc<Mutex<State>>> = (0..50).map(|_| Arc::default()).collect();
    let tasks: Vec<_> = states
        .iter()
        .map(|st| follow(dir.client.clone(), st.clone()))
        .collect();
    // Four writers at once: registrations, changes, removals and routes.
    let writers: Vec<_> = (0..4u64)
        .map(|w| {
            let c = dir.client.clone();
            tokio::spawn(async move {
                let service = format!("svc-{w}");
                for i in 0..25u64 {
                    let id = format!("i{}", i % 7);
                    c.register(&service, &id, &spec(9000 + i, Some(1 + i), Some(60_000)))
                        .await
                        .unwrap();
                    if i % 5 == 4 {
                        c.deregister(&service, &format!("i{}", (i + 3) % 7))
                            .await
                            .unwrap();
                    }
                    if i % 8 == 0 {
                        let v = format!("{}", i % 3 + 1);
                        // A version with no instance yet is fine here: forced.
                        c.set_route_forced(&service, &[(v, 100)].into())
                            .await
                            .unwrap();
                    }
                }
            })
        })
        .collect();
    for w in writers {
        w.await.unwrap();
    }
    let services = dir.client.services().await.unwrap();
    let routes = dir.client.routes().await.unwrap();
    assert_eq!(services.index, routes.index);
    let expected = State {
        index: services.index,
        services: services.services,
        routes: routes.routes,
        maintenance: Default::default(),
    };
    assert!(expected.index > 100);
    eventually(
        Duration::from_secs(10),
        "all 50 watchers to reach the directory's state",
        || {
            let done = states.iter().all(|st| *st.lock().unwrap() == expected);
            async move { done.then_some(()) }
        },
    )
    .await;
    for t in tasks {
        t.abort();
    }
}

/// A memory figure of a process from `/proc/<pid>/status` (`VmRSS`, `VmHWM`), in KiB.
fn mem_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_default()
}

fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test]
async fn a_stalled_watcher_is_dropped_without_hurting_the_others() {
    let dir = TestDirectory::start(&[]).await;
    let base_rss = mem_kib(dir.proc.pid(), "VmRSS");

    // A watcher that sends its request and then never reads a byte: a v1 watcher, whose
    // every event is its service's whole instance list, so that its backlog fills quickly.
    let mut stalled = TcpStream::connect(dir.addr).unwrap();
    stalled
        .write_all(b"GET /v1/watch HTTP/1.1\r\nHost: directory\r\n\r\n")
        .unwrap();
    let states: Vec<Arc<Mutex<State>>> = (0..3).map(|_| Arc::default()).collect();
    let tasks: Vec<_> = states
        .iter()
        .map(|st| follow(dir.client.clone(), st.clone()))
        .collect();
    let metrics_url = format!("{}/metrics", dir.url);
    let metrics = || async {
        reqwest::get(&metrics_url)
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    eventually(Duration::from_secs(5), "4 watchers to connect", || async {
        (metric(&metrics().await, "baker_directory_watchers") == Some(4.0)).then_some(())
    })
    .await;

    // Large events: 60 instances with 32 long tags each make ~140 KB per event.
    let tags: Vec<String> = (0..32).map(|t| format!("tag-{t:0>58}")).collect();
    let big = |port: u64, weight: u64| InstanceSpec {
        tags: tags.clone(),
        ..spec(port, Some(weight), Some(60_000))
    };
    for i in 0..60u64 {
        dir.client
            .register("big", &format!("i{i}"), &big(10_000 + i, 1))
            .await
            .unwrap();
    }
    // Changes in rounds of 50 (~7 MB per watcher), checking after each round that the others
    // keep up, until the stalled one is dropped (it takes ~20 MB: kernel buffers + backlog).
    for round in 0..12u64 {
        for k in 0..50u64 {
            let n = round * 50 + k;
            dir.client
                .register(
                    "big",
                    &format!("i{}", n % 60),
                    &big(10_000 + n % 60, 2 + n % 200),
                )
                .await
                .unwrap();
        }
        let index = dir.client.services().await.unwrap().index;
        eventually(
            Duration::from_secs(5),
            "the reading watchers to keep up",
            || {
                let ok = states.iter().all(|st| st.lock().unwrap().index == index);
                async move { ok.then_some(()) }
            },
        )
        .await;
        if metric(&metrics().await, "baker_directory_watchers_dropped_total") == Some(1.0) {
            break;
        }
    }

    // The stalled one is gone; the three others remain.
    let text = eventually(
        Duration::from_secs(10),
        "the stalled watcher to be dropped",
        || async {
            let text = metrics().await;
            (metric(&text, "baker_directory_watchers_dropped_total") == Some(1.0)).then_some(text)
        },
    )
    .await;
    assert_eq!(
        metric(&text, "baker_directory_watchers"),
        Some(3.0),
        "{text}"
    );
    // Its peak memory stayed within the watcher's bounded backlog (16 MiB) and buffers.
    let peak = mem_kib(dir.proc.pid(), "VmHWM");
    assert!(
        peak < base_rss + 100 * 1024,
        "the directory grew from {base_rss} KiB to a peak of {peak} KiB"
    );
    // Its connection was closed: reading it now drains what was buffered, then ends.
    stalled
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let drained = tokio::task::spawn_blocking(move || {
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0usize;
        loop {
            match std::io::Read::read(&mut stalled, &mut buf) {
                Ok(0) => return Ok(total),
                Ok(n) => total += n,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Ok(total),
                Err(e) => return Err(e),
            }
        }
    })
    .await
    .unwrap();
    let drained = drained.expect("the stalled watcher's connection is closed by the directory");
    eprintln!(
        "directory RSS {base_rss} KiB, peak {peak} KiB; the stalled watcher got {drained} bytes"
    );
    assert!(
        drained < 20 << 20,
        "it received everything ({drained} bytes)"
    );

    // The others still get events promptly, and a reconnecting watcher gets a fresh snapshot.
    dir.client
        .register("after", "x", &spec(7000, None, Some(60_000)))
        .await
        .unwrap();
    let index = dir.client.services().await.unwrap().index;
    eventually(
        Duration::from_secs(5),
        "the others to see the next change",
        || {
            let ok = states.iter().all(|st| {
                let st = st.lock().unwrap();
                st.index == index && st.services.contains_key("after")
            });
            async move { ok.then_some(()) }
        },
    )
    .await;
    let mut fresh = Box::pin(dir.client.watch().await.unwrap());
    match fresh.next().await.unwrap().unwrap() {
        WatchEvent::Snapshot {
            index: i, services, ..
        } => {
            assert_eq!(i, index);
            assert_eq!(services["big"].len(), 60);
        }
        other => panic!("expected a snapshot, got {other:?}"),
    }
    for t in tasks {
        t.abort();
    }
}
