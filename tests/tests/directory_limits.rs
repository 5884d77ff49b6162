//! The directory's limits end to end: hostile watchers cannot starve the API, watch slots and
//! the watch token, and quotas answered with 429 naming the quota.

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use baker_client::ClientError;
use baker_tests::directory::{spec, TestDirectory};
use baker_tests::greeting::Greeting;
use baker_tests::{eventually, Proc};
use futures_util::StreamExt;
use reqwest::StatusCode;

const HOSTILE: usize = 2_000;

const TTL_MS: Option<u64> = Some(60_000);

/// Lets this process hold thousands of sockets: the soft open-file limit is often 1024.
fn raise_open_files() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("reading RLIMIT_NOFILE");
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).expect("raising RLIMIT_NOFILE");
    }
    let needed = (HOSTILE + 200) as u64;
    assert!(
        hard >= needed,
        "this test holds {HOSTILE} connections: the hard open-file limit ({hard}) must be at \
         least {needed} (ulimit -Hn)"
    );
}

/// A watcher that asks for the stream and never reads a byte of it.
fn hostile_watcher(addr: SocketAddr, token: Option<&str>) -> TcpStream {
    let mut s = TcpStream::connect(addr).expect("connecting a watcher");
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(s, "GET /v1/watch HTTP/1.1\r\nHost: d\r\n{auth}\r\n").expect("sending the request");
    s
}

/// The 99th percentile (the worst of 100) of `calls` timed calls of `f`.
async fn p99<F, Fut>(calls: usize, mut f: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut times = Vec::with_capacity(calls);
    for _ in 0..calls {
        let started = Instant::now();
        f().await;
        times.push(started.elapsed());
    }
    times.sort();
    times[(calls * 99 / 100).min(calls - 1)]
}

#[tokio::test]
async fn two_thousand_watchers_that_never_read_do_not_starve_the_api() {
    raise_open_files();
    // The default limits: 8192 connections, of which watches may take 4096.
    let dir = TestDirectory::start(&[]).await;
    let c = dir.client_with_token(None);
    c.register("emitter", "a", &spec(8000, TTL_MS))
        .await
        .unwrap();
    let heartbeat = || async {
        c.register("emitter", "a", &spec(8000, TTL_MS))
            .await
            .unwrap();
    };
    let healthz = || async { c.healthz().await.unwrap() };
    let usual = p99(100, healthz).await.max(p99(100, heartbeat).await);

    let addr = dir.addr;
    let hostile = tokio::task::spawn_blocking(move || {
        (0..HOSTILE)
            .map(|_| hostile_watcher(addr, None))
            .collect::<Vec<_>>()
    })
    .await
    .unwrap();
    eventually(
        Duration::from_secs(30),
        "every hostile watcher to have its stream",
        || async {
            (dir.metric("baker_directory_watchers").await? >= HOSTILE as f64).then_some(())
        },
    )
    .await;

    // Fresh connections, as a new registrar or operator would open.
    let healthz = p99(100, || async {
        dir.client_with_token(None).healthz().await.unwrap();
    })
    .await;
    let heartbeats = p99(100, heartbeat).await;
    let bound = (usual * 10).max(Duration::from_millis(100));
    assert!(
        healthz < bound && heartbeats < bound,
        "with {HOSTILE} watchers held: /healthz p99 {healthz:?}, heartbeat p99 {heartbeats:?}; \
         without them p99 {usual:?}"
    );

    // A registrar started now registers at once: within its first probes.
    let app = Greeting::start("1", "b").await;
    let target = app.url();
    let started = Instant::now();
    let _registrar = Proc::baker(
        "registrar",
        "baker-registrar",
        &[
            ("BAKER_DIRECTORY", dir.url.as_str()),
            ("BAKER_SERVICE", "emitter"),
            ("BAKER_ID", "b"),
            ("BAKER_TARGET", target.as_str()),
            ("BAKER_INTERVAL", "100ms"),
            ("BAKER_RISE", "1"),
        ],
    );
    eventually(
        Duration::from_secs(10),
        "the registrar to register",
        || async {
            let svc = c.service("emitter").await.ok()?;
            svc.instances.iter().any(|i| i.id == "b").then_some(())
        },
    )
    .await;
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(2),
        "the registrar took {took:?} to register beside {HOSTILE} watchers"
    );
    // A watcher that does read gets its stream at once too.
    let mut watch = Box::pin(c.watch().await.unwrap());
    assert!(watch.next().await.unwrap().is_ok());
    drop(hostile);
}

#[tokio::test]
async fn under_an_open_file_limit_of_1024_watchers_past_it_wait_and_registrations_are_served() {
    raise_open_files();
    // As `docker run --ulimit nofile=1024:1024` starts it: the directory cannot raise the
    // limit, so it fits its caps to it.
    let data = tempfile::tempdir().unwrap();
    let listen = format!("127.0.0.1:{}", baker_tests::free_port());
    let directory = baker_tests::bin("baker-directory");
    let mut proc = Proc::spawn(
        "directory",
        "prlimit",
        &["--nofile=1024:1024", "--", directory.to_str().unwrap()],
        &[
            ("BAKER_LISTEN", listen.as_str()),
            ("BAKER_DATA", data.path().to_str().unwrap()),
            ("BAKER_DOCKER", "off"),
        ],
    );
    let addr = proc.listen_addr().await;
    let said = proc
        .wait_for_log("the open-file limit is 1024", Duration::from_secs(5))
        .await;
    assert!(
        said.contains("BAKER_MAX_CONNECTIONS lowered from 8192 to 960")
            && said.contains("BAKER_MAX_WATCHES from 4096 to 480")
            && said.contains("ulimit"),
        "{said}"
    );
    let dir_url = format!("http://{addr}");
    let c = baker_client::api::DirectoryClient::new(&dir_url, None).unwrap();
    const WATCHERS: usize = 1_100;
    let hostile = tokio::task::spawn_blocking(move || {
        (0..WATCHERS)
            .map(|_| hostile_watcher(addr, None))
            .collect::<Vec<_>>()
    })
    .await
    .unwrap();
    let metric = |name: &'static str| {
        let url = format!("{dir_url}/metrics");
        async move {
            let text = reqwest::get(url).await.ok()?.text().await.ok()?;
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse::<f64>().ok())
        }
    };
    eventually(
        Duration::from_secs(30),
        "480 watch streams, the rest refused",
        || async {
            let served = metric("baker_directory_watchers").await?;
            let refused = metric("baker_directory_watches_refused_total").await?;
            (served == 480.0 && refused == (WATCHERS - 480) as f64).then_some(())
        },
    )
    .await;
    // Registrations and reads are served, on fresh connections, beside the held watchers:
    // each a new client (a new connection), as registrars that start arrive.
    let started = Instant::now();
    let (mut failed, mut longest) = (Vec::new(), Duration::ZERO);
    for i in 0..50u16 {
        let call = Instant::now();
        let c = baker_client::api::DirectoryClient::new(&dir_url, None).unwrap();
        let registered = c
            .register("emitter", &format!("i{i}"), &spec(8000 + i, TTL_MS))
            .await;
        let read = c.service("emitter").await;
        longest = longest.max(call.elapsed());
        if let Err(e) = registered.map(drop).and(read.map(drop)) {
            failed.push(format!("registration {i}: {e}"));
        }
    }
    let took = started.elapsed();
    println!(
        "beside {WATCHERS} watchers under an open-file limit of 1024: 50 registrations and 50 \
         reads on new connections, {} failed, {took:?} in all, the longest {longest:?}",
        failed.len()
    );
    assert!(failed.is_empty(), "{failed:#?}");
    assert_eq!(c.service("emitter").await.unwrap().instances.len(), 50);
    assert!(
        took < Duration::from_secs(5),
        "50 registrations took {took:?} beside {WATCHERS} watchers"
    );
    assert!(
        !proc.log_text().contains("accepting a connection failed"),
        "no connection may fail to be accepted: {}",
        proc.log_text()
    );
    drop(hostile);
}

#[tokio::test]
async fn watches_past_their_slots_are_refused_and_leave_the_api_its_own() {
    let dir =
        TestDirectory::start(&[("BAKER_MAX_CONNECTIONS", "12"), ("BAKER_MAX_WATCHES", "4")]).await;
    let addr = dir.addr;
    let held: Vec<_> = (0..4).map(|_| hostile_watcher(addr, None)).collect();
    eventually(Duration::from_secs(10), "four watch streams", || async {
        (dir.metric("baker_directory_watchers").await? >= 4.0).then_some(())
    })
    .await;
    let c = dir.client_with_token(None);
    let refused = match c.watch().await {
        Err(ClientError::Refused { status, message }) => (status, message),
        Ok(_) => panic!("a fifth watch was served"),
        Err(e) => panic!("{e}"),
    };
    assert_eq!(refused.0, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        refused.1,
        "4 watch streams are open, the most BAKER_MAX_WATCHES allows: try again later"
    );
    // The API still answers, on as many connections as a busy registrar pool opens.
    let calls = (0..6).map(|i| {
        let c = dir.client_with_token(None);
        async move {
            c.register("emitter", &format!("i{i}"), &spec(8000 + i, TTL_MS))
                .await
                .unwrap()
        }
    });
    futures_util::future::join_all(calls).await;
    assert_eq!(
        dir.metric("baker_directory_watches_refused_total").await,
        Some(1.0)
    );
    // A slot freed is a watch served.
    drop(held);
    eventually(Duration::from_secs(10), "a watch to be served", || async {
        c.watch().await.ok().map(|_| ())
    })
    .await;
}

#[tokio::test]
async fn a_watch_token_guards_watches_and_the_main_token_opens_them_too() {
    let dir = TestDirectory::start(&[
        ("BAKER_TOKEN", "main-token"),
        ("BAKER_WATCH_TOKEN", "watch-token"),
    ])
    .await;
    let status_of = |token: Option<&'static str>| {
        let client = dir
            .client_with_token(None)
            .with_watch_token(token.map(str::to_owned))
            .unwrap();
        async move {
            match client.watch().await {
                Ok(_) => StatusCode::OK,
                Err(ClientError::Refused { status, message }) => {
                    assert!(message.contains("BAKER_WATCH_TOKEN"), "{message}");
                    status
                }
                Err(e) => panic!("{e}"),
            }
        }
    };
    assert_eq!(status_of(None).await, StatusCode::UNAUTHORIZED);
    assert_eq!(status_of(Some("wrong")).await, StatusCode::UNAUTHORIZED);
    assert_eq!(status_of(Some("watch-token")).await, StatusCode::OK);
    assert_eq!(status_of(Some("main-token")).await, StatusCode::OK);
    // A client with only the main token sends it with its watches.
    let main = dir.client_with_token(Some("main-token"));
    assert!(main.watch().await.is_ok());
    // The watch token (a token that reads) changes nothing: 403, naming it.
    let watcher = dir.client_with_token(Some("watch-token"));
    match watcher.register("emitter", "a", &spec(8000, TTL_MS)).await {
        Err(ClientError::Refused { status, message }) => {
            assert_eq!(status, StatusCode::FORBIDDEN);
            assert!(
                message.contains("BAKER_WATCH_TOKEN (role read"),
                "{message}"
            );
        }
        other => panic!("{other:?}"),
    }
    // Hostile watchers without the token are answered 401 and hold no watch slot.
    let addr = dir.addr;
    let mut s = hostile_watcher(addr, None);
    let answer = tokio::task::spawn_blocking(move || {
        use std::io::Read;
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0; 64];
        let n = s.read(&mut buf).unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    })
    .await
    .unwrap();
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
    assert_eq!(dir.metric("baker_directory_watchers").await, Some(0.0));
}

/// A raw call: status and JSON body.
async fn call_json(
    method: reqwest::Method,
    url: &str,
    body: &str,
) -> (StatusCode, serde_json::Value) {
    let resp = reqwest::Client::new()
        .request(method, url)
        .header("content-type", "application/json")
        .body(body.to_owned())
        .send()
        .await
        .expect("the directory answers");
    let status = resp.status();
    (status, resp.json().await.unwrap_or_default())
}

#[tokio::test]
async fn quotas_answer_429_naming_the_quota_and_change_nothing() {
    let dir = TestDirectory::start(&[
        ("BAKER_MAX_INSTANCES_PER_SERVICE", "3"),
        ("BAKER_MAX_SERVICES", "2"),
        ("BAKER_MAX_INSTANCES", "4"),
        ("BAKER_MAX_ROUTES", "1"),
    ])
    .await;
    let put = |service: &str, id: &str| {
        let url = format!("{}/v1/services/{service}/instances/{id}", dir.url);
        async move {
            call_json(
                reqwest::Method::PUT,
                &url,
                r#"{"address":"10.0.0.1","port":80}"#,
            )
            .await
        }
    };
    let refused = |(status, body): (StatusCode, serde_json::Value)| {
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
        let error = body["error"].as_str().unwrap_or_default();
        let variable = body["variable"].as_str().unwrap_or_default();
        assert!(
            error.contains(variable) && error.contains(&body["limit"].to_string()),
            "{body}"
        );
        (
            body["quota"].as_str().unwrap_or_default().to_owned(),
            variable.to_owned(),
        )
    };
    for id in ["1", "2", "3"] {
        assert_eq!(put("a", id).await.0, StatusCode::OK);
    }
    assert_eq!(
        refused(put("a", "4").await),
        (
            "instances_per_service".into(),
            "BAKER_MAX_INSTANCES_PER_SERVICE".into()
        )
    );
    // A heartbeat of a registered instance is never refused.
    assert_eq!(put("a", "3").await.0, StatusCode::OK);
    assert_eq!(put("b", "1").await.0, StatusCode::OK);
    assert_eq!(
        refused(put("c", "1").await),
        ("services".into(), "BAKER_MAX_SERVICES".into())
    );
    assert_eq!(
        refused(put("b", "2").await),
        ("instances".into(), "BAKER_MAX_INSTANCES".into())
    );
    let routes = |service: &str| format!("{}/v1/routes/{service}", dir.url);
    assert_eq!(
        call_json(reqwest::Method::PUT, &routes("a"), r#"{"1":100}"#)
            .await
            .0,
        StatusCode::OK
    );
    assert_eq!(
        refused(call_json(reqwest::Method::PUT, &routes("b"), r#"{"1":100}"#).await),
        ("routes".into(), "BAKER_MAX_ROUTES".into())
    );
    // Changing the route that exists is not growth.
    assert_eq!(
        call_json(reqwest::Method::PUT, &routes("a"), r#"{"1":90,"2":10}"#)
            .await
            .0,
        StatusCode::OK
    );
    // Oversize bodies are still 413.
    let big = format!(
        r#"{{"address":"10.0.0.1","port":80,"tags":["{}"]}}"#,
        "x".repeat(70_000)
    );
    let url = format!("{}/v1/services/a/instances/1", dir.url);
    assert_eq!(
        call_json(reqwest::Method::PUT, &url, &big).await.0,
        StatusCode::PAYLOAD_TOO_LARGE
    );
    // Nothing refused was stored.
    let services = dir.client.services().await.unwrap().services;
    let counts: Vec<(String, usize)> = services
        .iter()
        .map(|(s, v)| (s.to_string(), v.len()))
        .collect();
    assert_eq!(counts, [("a".into(), 3), ("b".into(), 1)]);
    assert_eq!(dir.client.routes().await.unwrap().routes.len(), 1);
    assert_eq!(
        dir.metric("baker_directory_quota_refusals_total{quota=\"routes\"}")
            .await,
        Some(1.0)
    );
}

#[tokio::test]
async fn ambassador_reports_need_the_token_and_have_a_quota() {
    let dir = TestDirectory::start(&[
        ("BAKER_TOKEN", "main-token"),
        ("BAKER_WATCH_TOKEN", "watch-token"),
        ("BAKER_MAX_AMBASSADORS", "2"),
    ])
    .await;
    let report = baker_client::ops::AmbassadorReport {
        host: "host-1".parse().unwrap(),
        services: vec![],
        applied_index: 0,
        reloads: 0,
        servers: vec![],
        ttl_ms: 60_000,
        locality: None,
    };
    let status = |client: baker_client::DirectoryClient, id: &'static str| {
        let report = report.clone();
        async move {
            match client.report(id, &report).await {
                Ok(_) => (StatusCode::OK, String::new()),
                Err(ClientError::Refused { status, message }) => (status, message),
                Err(e) => panic!("{e}"),
            }
        }
    };
    // With BAKER_TOKEN set, a report must carry a token that reads: the watch token does, no
    // token or a wrong one does not.
    for token in [None, Some("wrong")] {
        let (got, message) = status(dir.client_with_token(token), "amb-1").await;
        assert_eq!(got, StatusCode::UNAUTHORIZED, "{token:?}: {message}");
    }
    let watcher = dir.client_with_token(Some("watch-token"));
    assert_eq!(status(watcher.clone(), "amb-0").await.0, StatusCode::OK);
    assert!(watcher.sign_off("amb-0").await.is_ok());
    let c = || dir.client.clone();
    assert_eq!(status(c(), "amb-1").await.0, StatusCode::OK);
    assert_eq!(status(c(), "amb-2").await.0, StatusCode::OK);
    // Both are live: a third is refused with the quota's 429, and changes nothing.
    let (got, message) = status(c(), "amb-3").await;
    assert_eq!(got, StatusCode::TOO_MANY_REQUESTS, "{message}");
    assert_eq!(
        message,
        "quota ambassadors reached: 2 ambassadors are reporting, the most BAKER_MAX_AMBASSADORS \
         allows, so the report of ambassador amb-3 is refused; raise BAKER_MAX_AMBASSADORS if \
         the fleet really is this large"
    );
    // Kept ambassadors go on reporting; one that signs off makes room.
    assert_eq!(status(c(), "amb-1").await.0, StatusCode::OK);
    c().sign_off("amb-2").await.unwrap();
    assert_eq!(status(c(), "amb-3").await.0, StatusCode::OK);
    let kept: Vec<String> = c()
        .ambassadors()
        .await
        .unwrap()
        .ambassadors
        .iter()
        .map(|a| a.id.to_string())
        .collect();
    assert_eq!(kept, ["amb-1", "amb-3"]);
    assert_eq!(
        dir.metric("baker_directory_quota_refusals_total{quota=\"ambassadors\"}")
            .await,
        Some(1.0)
    );
}

#[tokio::test]
async fn a_filtered_watch_names_at_most_a_thousand_services() {
    let dir = TestDirectory::start(&[]).await;
    let names = |n: usize| {
        (0..n)
            .map(|i| format!("s{i}"))
            .collect::<Vec<_>>()
            .join(",")
    };
    let watch = |n: usize| {
        let url = format!("{}/v1/watch?v=2&service={}", dir.url, names(n));
        async move {
            let resp = reqwest::get(url).await.unwrap();
            let status = resp.status();
            // The stream's first line (or the error), not the endless rest.
            let mut body = resp.bytes_stream();
            let first = body.next().await.unwrap().unwrap();
            (status, String::from_utf8_lossy(&first).into_owned())
        }
    };
    let (status, first) = watch(1_000).await;
    assert_eq!(status, StatusCode::OK, "{first}");
    assert!(first.starts_with(r#"{"type":"snapshot""#), "{first}");
    let (status, error) = watch(1_001).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        error.contains("service: names 1001 services; a watch may name at most 1000"),
        "{error}"
    );
    // The client library watches that many with an unfiltered watch instead.
    let many: Vec<baker_client::ServiceName> = (0..1_001)
        .map(|i| format!("s{i}").parse().unwrap())
        .collect();
    let mut stream = Box::pin(dir.client.watch_services(Some(&many)).await.unwrap());
    assert!(stream.next().await.unwrap().is_ok());
}
