//! The directory binary end to end: registration, heartbeats and expiry, input validation,
//! authentication, durable routes, configuration errors and shutdown.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use baker_client::model::{ErrorBody, WatchEvent};
use baker_tests::directory::{spec, TestDirectory};
use baker_tests::{eventually, Proc};
use futures_util::StreamExt;
use reqwest::{Method, StatusCode};

/// One raw call: status and the `error` of a JSON error body (or the raw body).
async fn call(
    method: Method,
    url: &str,
    token: Option<&str>,
    body: Option<Vec<u8>>,
) -> (StatusCode, String) {
    let mut req = reqwest::Client::new()
        .request(method, url)
        .timeout(Duration::from_secs(10));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if let Some(b) = body {
        req = req.header("content-type", "application/json").body(b);
    }
    let resp = req.send().await.expect("the directory answers");
    let status = resp.status();
    let text = resp.text().await.unwrap_or_default();
    let message = serde_json::from_str::<ErrorBody>(&text)
        .map(|e| e.error)
        .unwrap_or(text);
    (status, message)
}

fn ids(
    services: &BTreeMap<baker_client::ServiceName, Vec<baker_client::Instance>>,
    service: &str,
) -> Vec<String> {
    services
        .get(service)
        .map(|v| v.iter().map(|i| i.id.to_string()).collect())
        .unwrap_or_default()
}

#[tokio::test]
async fn register_heartbeat_expire_and_deregister() {
    let dir = TestDirectory::start(&[]).await;
    let c = &dir.client;
    let inst = c
        .register("emitter", "a", &spec(8000, Some(1000)))
        .await
        .unwrap();
    assert_eq!((inst.port, inst.ttl_ms), (8000, 1000));
    assert_eq!(ids(&c.services().await.unwrap().services, "emitter"), ["a"]);

    // Heartbeats every 300 ms keep it for well past its TTL.
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(2500) {
        c.register("emitter", "a", &spec(8000, Some(1000)))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            ids(&c.services().await.unwrap().services, "emitter"),
            ["a"],
            "a heartbeated instance must stay"
        );
    }

    // Silence: gone within TTL + 1 s of the last heartbeat, not before the TTL.
    c.register("emitter", "a", &spec(8000, Some(1000)))
        .await
        .unwrap();
    let silent = Instant::now();
    eventually(
        Duration::from_secs(3),
        "the silent instance to expire",
        || async {
            c.services()
                .await
                .unwrap()
                .services
                .is_empty()
                .then_some(())
        },
    )
    .await;
    let took = silent.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took <= Duration::from_millis(2000),
        "expired after {took:?}, TTL is 1 s"
    );
    let (status, message) = call(
        Method::GET,
        &format!("{}/v1/services/emitter", dir.url),
        None,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{message}");
    assert!(message.contains("emitter"), "{message}");

    // Deregistration takes effect at once.
    c.register("emitter", "b", &spec(8001, None)).await.unwrap();
    assert_eq!(ids(&c.services().await.unwrap().services, "emitter"), ["b"]);
    let (status, body) = call(
        Method::DELETE,
        &format!("{}/v1/services/emitter/instances/b", dir.url),
        None,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(c.services().await.unwrap().services.is_empty());
    let (status, message) = call(
        Method::DELETE,
        &format!("{}/v1/services/emitter/instances/b", dir.url),
        None,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(
        message.contains("no instance b of service emitter"),
        "{message}"
    );
}

/// A call that must fail: method, URL, token, body, status, words the error must contain.
type Case<'a> = (
    Method,
    String,
    Option<&'a str>,
    Option<Vec<u8>>,
    u16,
    &'a str,
);

#[tokio::test]
async fn bad_input_is_rejected_with_a_message_and_changes_nothing() {
    let token = "s3cret-token";
    let dir = TestDirectory::start(&[("BAKER_TOKEN", token)]).await;
    let c = &dir.client;
    c.register("emitter", "good", &spec(8000, Some(60_000)))
        .await
        .unwrap();
    let route: BTreeMap<String, u64> = [("1".to_owned(), 90), ("2".to_owned(), 10)].into();
    c.set_route("emitter", &route).await.unwrap();
    let before = (c.services().await.unwrap(), c.routes().await.unwrap());

    let long = "a".repeat(64);
    let inst =
        |service: &str, id: &str| format!("{}/v1/services/{service}/instances/{id}", dir.url);
    let good = br#"{"address":"10.0.0.1","port":8080}"#.to_vec();
    let body = |s: &str| Some(s.as_bytes().to_vec());
    // (method, url, token, body, status, words the error must contain)
    let mut cases: Vec<Case> = Vec::new();
    for (bad, what) in [
        ("Emitter", "lowercase"),
        ("a%20b", "' '"),
        ("a%0Ab", "'\\n'"),
        ("a%23b", "'#'"),
        ("a%2Fb", "'/'"),
        (long.as_str(), "at most 63"),
    ] {
        cases.push((
            Method::PUT,
            inst(bad, "x"),
            Some(token),
            Some(good.clone()),
            400,
            "service",
        ));
        cases.push((
            Method::PUT,
            inst("emitter", bad),
            Some(token),
            Some(good.clone()),
            400,
            "id",
        ));
        cases.push((
            Method::PUT,
            inst(bad, "x"),
            Some(token),
            Some(good.clone()),
            400,
            what,
        ));
        cases.push((
            Method::DELETE,
            inst("emitter", bad),
            Some(token),
            None,
            400,
            "id",
        ));
        cases.push((
            Method::PUT,
            format!("{}/v1/routes/{bad}", dir.url),
            Some(token),
            body(r#"{"1":100}"#),
            400,
            "service",
        ));
        cases.push((
            Method::GET,
            format!("{}/v1/services/{bad}", dir.url),
            None,
            None,
            400,
            "service",
        ));
    }
    // A raw `/` makes another path: no such endpoint.
    cases.push((
        Method::PUT,
        inst("a/b", "x"),
        Some(token),
        Some(good.clone()),
        404,
        "no such endpoint",
    ));
    let put = |json: &str| (Method::PUT, inst("emitter", "new"), Some(token), body(json));
    for (json, words) in [
        (
            r#"{"address":"10.0.0.1","port":0}"#,
            "port: must be between 1 and 65535, got 0",
        ),
        (
            r#"{"address":"10.0.0.1","port":70000}"#,
            "port: must be between 1 and 65535, got 70000",
        ),
        (
            r#"{"address":"10.0.0.1","port":80,"weight":0}"#,
            "weight: must be between 1 and 256, got 0",
        ),
        (
            r#"{"address":"10.0.0.1","port":80,"weight":257}"#,
            "weight: must be between 1 and 256, got 257",
        ),
        (r#"{"address":"bad address","port":80}"#, "address"),
        // Numeric pseudo-hostnames: glibc would dial another address than the one shown.
        (
            r#"{"address":"010.000.000.001","port":80}"#,
            "address: must be an IP address or a DNS name, got \"010.000.000.001\"",
        ),
        (r#"{"address":"0x7f.1","port":80}"#, "address: "),
        (r#"{"address":"2130706433","port":80}"#, "address: "),
        (r#"{"address":"1.2.3","port":80}"#, "address: "),
        (r#"{"address":"10.0.0.256","port":80}"#, "address: "),
        (
            r#"{"address":"10.0.0.1","port":80,"version":"V2"}"#,
            "version",
        ),
        (
            r#"{"address":"10.0.0.1","port":80,"tags":["ok","No"]}"#,
            "tags[1]",
        ),
        (r#"{"address":"10.0.0.1","port":80,"ttl_ms":1}"#, "ttl_ms"),
        (
            r#"{"address":"10.0.0.1","port":80,"evil":1}"#,
            "unknown field `evil`",
        ),
        (r#"{"address":"10.0.0.1"}"#, "missing field `port`"),
        (
            r#"{"address":"10.0.0.1","port":80"#,
            "invalid JSON body: EOF",
        ),
        (r#"{address: 10.0.0.1}"#, "invalid JSON body"),
        (r#"{"address":"10.0.0.1","port":"80"}"#, "invalid type"),
        ("", "empty"),
    ] {
        let (m, u, t, b) = put(json);
        cases.push((m, u, t, b, 400, words));
    }
    let route_url = format!("{}/v1/routes/emitter", dir.url);
    for (json, words) in [
        (r#"{"1":90}"#, "sum to 100, got 90"),
        (r#"{"1":90,"2":20}"#, "sum to 100, got 110"),
        (r#"{"1":90,"B#":10}"#, "route.B#"),
        (r#"{"1":300}"#, "route.1"),
        (r#"{}"#, "at least one target"),
        (r#"[90,10]"#, "must be a JSON object, a route such as"),
        (r#"{"1":90,"2":10"#, "invalid JSON body: EOF"),
    ] {
        cases.push((
            Method::PUT,
            route_url.clone(),
            Some(token),
            body(json),
            400,
            words,
        ));
    }
    // A body is a JSON object, whatever serde would make of an array: a struct from a sequence.
    let maintenance = |target: &str| format!("{}/v1/maintenance/emitter/{target}", dir.url);
    for (url, json, words) in [
        (
            inst("emitter", "new"),
            r#"["127.0.0.1",8080]"#,
            r#"the request body must be a JSON object, an instance such as {"address":"10.0.0.5","port":8000}; got an array"#,
        ),
        (
            maintenance("instances/good"),
            r#"["reason"]"#,
            "must be a JSON object, a drain such as",
        ),
        (maintenance("versions/1"), r#""reason""#, "got a string"),
        (route_url.clone(), "null", "got null"),
        (
            format!("{}/v1/ambassadors/amb-1", dir.url),
            r#"["host-1",[],0,0,[],7000]"#,
            "must be a JSON object, an ambassador's report",
        ),
    ] {
        cases.push((Method::PUT, url, Some(token), body(json), 400, words));
    }
    let huge = vec![b' '; 1024 * 1024];
    cases.push((
        Method::PUT,
        inst("emitter", "new"),
        Some(token),
        Some(huge.clone()),
        413,
        "64 KiB",
    ));
    cases.push((
        Method::PUT,
        route_url.clone(),
        Some(token),
        Some(huge),
        413,
        "64 KiB",
    ));
    for (t, words) in [
        (None, "missing bearer token"),
        (Some("wrong"), "wrong bearer token"),
    ] {
        cases.push((
            Method::PUT,
            inst("emitter", "new"),
            t,
            Some(good.clone()),
            401,
            words,
        ));
        cases.push((Method::DELETE, inst("emitter", "good"), t, None, 401, words));
        cases.push((
            Method::PUT,
            route_url.clone(),
            t,
            body(r#"{"1":100}"#),
            401,
            words,
        ));
        cases.push((Method::DELETE, route_url.clone(), t, None, 401, words));
    }

    for (method, url, t, b, status, words) in cases {
        let what = format!(
            "{method} {url} token={t:?} body={:?}",
            b.as_ref()
                .map(|b| String::from_utf8_lossy(&b[..b.len().min(80)]).into_owned())
        );
        let (got, message) = call(method, &url, t, b).await;
        assert_eq!(got.as_u16(), status, "{what}: {message}");
        assert!(
            message.contains(words),
            "{what}: error {message:?} should contain {words:?}"
        );
    }
    let after = (c.services().await.unwrap(), c.routes().await.unwrap());
    assert_eq!(before, after, "rejected calls must change nothing");
    assert!(c.ambassadors().await.unwrap().ambassadors.is_empty());

    // The right token works.
    let (status, _) = call(
        Method::PUT,
        &inst("emitter", "new"),
        Some(token),
        Some(good),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
}

/// Errors answered before the request's body is read (a missing or wrong token, a body over
/// the limit, a bad name in the path, no such endpoint) reach a reqwest client that is still
/// sending its body: the status and the JSON error, not a broken pipe. (The directory answers
/// no 403: a token is right or it is not.)
#[tokio::test]
async fn an_error_reaches_a_client_still_sending_its_body() {
    const SIZE: usize = 8 << 20;
    const CHUNK: usize = 64 << 10;
    let token = "s3cret-token";
    let dir = TestDirectory::start(&[("BAKER_TOKEN", token)]).await;
    let http = reqwest::Client::new();
    let inst = |service: &str| format!("{}/v1/services/{service}/instances/new", dir.url);
    let cases = [
        (inst("emitter"), None, 401, "missing bearer token"),
        (inst("emitter"), Some("wrong"), 401, "wrong bearer token"),
        (inst("emitter"), Some(token), 413, "64 KiB"),
        (inst("Emitter"), Some(token), 400, "lowercase"),
        (
            format!("{}/v1/routes/Emitter", dir.url),
            Some(token),
            400,
            "service",
        ),
        (
            format!("{}/v1/nothing", dir.url),
            Some(token),
            404,
            "no such endpoint",
        ),
    ];
    let mut failed = Vec::new();
    for (url, t, status, words) in cases {
        // The whole body at once (its length declared), and a body that comes slowly in
        // chunks: either way the directory answers long before the last byte is sent. A
        // directory that closes the connection then makes most whole-body calls fail with a
        // broken pipe, not all: three of them make one failure all but certain.
        for streamed in [false, false, false, true] {
            let what = format!("PUT {url} token={t:?} streamed={streamed}");
            let body = if streamed {
                let chunks = futures_util::stream::iter(0..SIZE / CHUNK).then(|_| async {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    Ok::<_, std::io::Error>(vec![b' '; CHUNK])
                });
                reqwest::Body::wrap_stream(chunks)
            } else {
                reqwest::Body::from(vec![b' '; SIZE])
            };
            let mut req = http
                .put(&url)
                .header("content-type", "application/json")
                .body(body)
                // Sending takes about 0.3 s (streamed) or less; the directory reads a rejected
                // body for at most its DRAIN_TIME (10 s) before it gives up: past that, the
                // test would fail anyway, so 30 s only catches a hang.
                .timeout(Duration::from_secs(30));
            if let Some(t) = t {
                req = req.bearer_auth(t);
            }
            let resp = match req.send().await {
                Ok(resp) => resp,
                Err(e) => {
                    failed.push(format!("{what}: the answer did not arrive: {e:?}"));
                    continue;
                }
            };
            let got = resp.status().as_u16();
            match resp.json::<ErrorBody>().await {
                Ok(e) if got == status && e.error.contains(words) => {}
                answer => failed.push(format!(
                    "{what}: {got} {answer:?}, expected {status} with {words:?}"
                )),
            }
        }
    }
    assert!(failed.is_empty(), "{}", failed.join("\n"));
    assert!(dir.client.services().await.unwrap().services.is_empty());
}

#[tokio::test]
async fn events_take_rfc3339_times_with_offsets_and_refuse_a_time_without_one() {
    let dir = TestDirectory::start(&[]).await;
    let c = &dir.client;
    c.register("emitter", "a", &spec(8000, Some(60_000)))
        .await
        .unwrap();
    let at = eventually(
        Duration::from_secs(5),
        "the registration in the history",
        || async {
            let events = c.events(None, None, Some("emitter"), None).await.ok()?;
            Some(events.events.first()?.at)
        },
    )
    .await;
    // The registration's second, written in the time of a zone `east` ms ahead of UTC.
    let second = (at / 1000 * 1000) as i64;
    let zoned = |shift_s: i64, east: i64, offset: &str| {
        let local = baker_client::events::rfc3339((second + (shift_s + east) * 1000) as u64);
        format!("{}{offset}", local.trim_end_matches('Z'))
    };
    let count = |query: Vec<(&'static str, String)>| {
        // `+` encoded as a query must send it; nothing else here needs encoding.
        let query: Vec<String> = query
            .iter()
            .map(|(k, v)| format!("{k}={}", v.replace('+', "%2B")))
            .collect();
        let url = format!("{}/v1/events?{}", dir.url, query.join("&"));
        async move {
            let resp = reqwest::get(url).await.unwrap();
            let status = resp.status();
            let body: serde_json::Value = resp.json().await.unwrap();
            match status {
                StatusCode::OK => Ok(body["events"].as_array().unwrap().len()),
                _ => Err((
                    status,
                    body["error"].as_str().unwrap_or_default().to_owned(),
                )),
            }
        }
    };
    let service = || ("service", "emitter".to_owned());
    for (east, offset) in [(7200, "+02:00"), (-16_200, "-04:30"), (0, "Z")] {
        let since = zoned(0, east, offset);
        assert_eq!(
            count(vec![service(), ("since", since.clone())]).await,
            Ok(1),
            "{since}"
        );
        let until = zoned(-1, east, offset);
        assert_eq!(
            count(vec![service(), ("until", until.clone())]).await,
            Ok(0),
            "{until}"
        );
    }
    // A `+` typed into a URL unencoded arrives as a space: it is still the offset.
    let raw = format!(
        "{}/v1/events?service=emitter&since={}",
        dir.url,
        zoned(0, 7200, "+02:00")
    );
    let resp = reqwest::get(&raw).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK, "{raw}");
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["events"].as_array().unwrap().len(), 1, "{raw}");
    // Without an offset, the time could be any zone's: refused, with an example.
    let local = zoned(0, 0, "");
    let (status, message) = count(vec![("since", local.clone())]).await.unwrap_err();
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        message.starts_with("since: must be milliseconds since the Unix epoch or an RFC 3339 time with its offset from UTC, such as 2026-12-03T10:00:00Z or 2026-12-03T12:00:00+02:00"),
        "{message}"
    );
    assert!(
        message.ends_with(&format!(
            "which has no offset from UTC: add Z for UTC or the offset of its zone, such as \
             {local}Z or {local}+02:00"
        )),
        "{message}"
    );
}

#[tokio::test]
async fn ip_addresses_are_stored_in_canonical_form() {
    let dir = TestDirectory::start(&[]).await;
    let url = format!("{}/v1/services/emitter/instances/a", dir.url);
    for written in ["FD00::1", "fd00:0::1"] {
        let body = format!(r#"{{"address":"{written}","port":80}}"#).into_bytes();
        let (status, text) = call(Method::PUT, &url, None, Some(body)).await;
        assert_eq!(status, StatusCode::OK, "{text}");
        let answer: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(answer["address"], "fd00::1", "{written}: {text}");
        let stored = dir.client.service("emitter").await.unwrap();
        assert_eq!(stored.instances[0].address.as_str(), "fd00::1");
    }
}

#[tokio::test]
async fn routes_survive_kill_9_and_restart() {
    let mut dir = TestDirectory::start(&[]).await;
    let c = dir.client.clone();
    let split: BTreeMap<String, u64> = [("1".to_owned(), 90), ("2".to_owned(), 10)].into();
    c.set_route_forced("emitter", &split).await.unwrap();
    c.set_route_forced("transform", &[("3".to_owned(), 100)].into())
        .await
        .unwrap();
    c.clear_route("transform").await.unwrap();
    c.register("emitter", "a", &spec(8000, None)).await.unwrap();
    let routes = c.routes().await.unwrap().routes;

    dir.kill9();
    dir.restart().await;
    assert_eq!(c.routes().await.unwrap().routes, routes);
    if dir.etcd.is_some() {
        // On etcd the registration lives on the killed replica's session lease, not in the
        // directory's memory: it stays until that lease (10 s) runs out without renewals.
        let svc = c.service("emitter").await.unwrap();
        assert_eq!(svc.instances.len(), 1);
        let waited = std::time::Instant::now();
        eventually(
            Duration::from_secs(15),
            "the killed replica's lease to run out",
            || async {
                c.service("emitter")
                    .await
                    .unwrap()
                    .instances
                    .is_empty()
                    .then_some(())
            },
        )
        .await;
        eprintln!("the instance left {:?} after the restart", waited.elapsed());
    }
    // No registration came back, but the route is served.
    let svc = c.service("emitter").await.unwrap();
    assert!(svc.instances.is_empty());
    assert_eq!(svc.route, routes.get("emitter").cloned());
    let mut watch = Box::pin(c.watch().await.unwrap());
    match watch.next().await.unwrap().unwrap() {
        WatchEvent::Snapshot {
            services,
            routes: r,
            ..
        } => {
            assert!(services.is_empty());
            assert_eq!(r, routes);
        }
        other => panic!("expected a snapshot, got {other:?}"),
    }
    drop(watch);

    // And across a clean restart too.
    dir.restart().await;
    assert_eq!(c.routes().await.unwrap().routes, routes);
}

#[tokio::test]
async fn a_route_for_a_service_never_seen_needs_force() {
    let dir = TestDirectory::start(&[]).await;
    let url = |query: &str| format!("{}/v1/routes/emiter{query}", dir.url);
    let body = || Some(br#"{"1":100}"#.to_vec());
    let (status, message) = call(Method::PUT, &url(""), None, body()).await;
    assert_eq!(status, StatusCode::CONFLICT, "{message}");
    assert!(
        message.starts_with("service emiter has never had a live instance")
            && message.contains("force=true"),
        "{message}"
    );
    for bad in ["?force=yes", "?forse=true"] {
        let (status, message) = call(Method::PUT, &url(bad), None, body()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {message}");
        assert!(message.contains("force"), "{bad}: {message}");
    }
    assert!(dir.client.routes().await.unwrap().routes.is_empty());
    let (status, message) = call(Method::PUT, &url("?force=true"), None, body()).await;
    assert_eq!(status, StatusCode::OK, "{message}");
    // Changing a route that exists needs no force, nor does a service that had an instance,
    // even once it has none left.
    let (status, _) = call(Method::PUT, &url(""), None, Some(br#"{"2":100}"#.to_vec())).await;
    assert_eq!(status, StatusCode::OK);
    dir.client
        .register("emitter", "a", &spec(8000, None))
        .await
        .unwrap();
    dir.client.deregister("emitter", "a").await.unwrap();
    dir.client
        .set_route("emitter", &[("1".to_owned(), 100)].into())
        .await
        .unwrap();
}

#[tokio::test]
async fn a_corrupt_routes_file_stops_the_start_with_a_clear_error() {
    // A torn route file, and the single routes.json of an earlier build.
    for (file, text) in [
        ("routes/emitter.json", "{\"1\": 9"),
        ("routes.json", "{\"routes\": {\"emitter\": "),
    ] {
        let data = tempfile::tempdir().unwrap();
        let path = data.path().join(file);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, text).unwrap();
        let data_path = data.path().display().to_string();
        let mut p = Proc::baker(
            "directory",
            "baker-directory",
            &[
                ("BAKER_LISTEN", "127.0.0.1:0"),
                ("BAKER_DATA", &data_path),
                ("BAKER_DOCKER", "off"),
            ],
        );
        let needle = format!("{file} is corrupt");
        p.wait_for_log(&needle, Duration::from_secs(10)).await;
        let status = p.wait_exit(Duration::from_secs(10)).await;
        assert!(!status.success(), "a corrupt {file} must stop the start");
        let log = p.log_text();
        assert!(
            log.contains(&needle) && log.contains("fix it, or remove it"),
            "{log}"
        );
        // The file is left as it was.
        assert_eq!(std::fs::read_to_string(&path).unwrap(), text);
    }
}

#[tokio::test]
async fn bad_variables_are_all_named_and_exit_64() {
    let mut p = Proc::baker(
        "directory",
        "baker-directory",
        &[
            ("BAKER_LISTEN", "nowhere:port"),
            ("BAKER_DOCKER", "sometimes"),
            ("BAKER_DOCKER_NETWORK", "no/slash"),
            ("BAKER_TOKEN", "has space"),
            ("BAKER_MAX_CONNECTIONS", "many"),
            ("BAKER_REQUEST_TIMEOUT", "10"),
        ],
    );
    // The last variable reported: every line before it has been collected too.
    p.wait_for_log("BAKER_REQUEST_TIMEOUT", Duration::from_secs(10))
        .await;
    let status = p.wait_exit(Duration::from_secs(10)).await;
    assert_eq!(status.code(), Some(64), "{}", p.log_text());
    let log = p.log_text();
    for var in [
        "BAKER_LISTEN",
        "BAKER_DOCKER:",
        "BAKER_DOCKER_NETWORK",
        "BAKER_TOKEN",
        "BAKER_MAX_CONNECTIONS",
        "BAKER_REQUEST_TIMEOUT",
    ] {
        assert!(log.contains(var), "{var} missing from:\n{log}");
    }
    assert!(log.contains("6 problems"), "{log}");
}

#[tokio::test]
async fn sigterm_ends_watch_streams_and_exits_at_once() {
    let mut dir = TestDirectory::start(&[]).await;
    let mut watch = Box::pin(dir.client.watch().await.unwrap());
    assert!(matches!(
        watch.next().await.unwrap().unwrap(),
        WatchEvent::Snapshot { .. }
    ));
    let started = Instant::now();
    let status = dir.stop().await;
    let took = started.elapsed();
    assert!(status.success(), "{status}: {}", dir.proc.log_text());
    assert!(took < Duration::from_secs(1), "took {took:?} to stop");
    // The stream ended (cleanly), it did not hang until the idle timeout.
    let end = tokio::time::timeout(Duration::from_secs(2), watch.next())
        .await
        .expect("the watch stream ends with the directory");
    assert!(
        matches!(end, Some(Err(baker_client::ClientError::Ended)) | None),
        "{end:?}"
    );
    assert!(dir.proc.log_text().contains("SIGTERM received"));
}

#[tokio::test]
async fn healthz_and_metrics() {
    let dir = TestDirectory::start(&[]).await;
    dir.client.healthz().await.unwrap();
    dir.client
        .register("emitter", "a", &spec(8000, None))
        .await
        .unwrap();
    dir.client
        .register("emitter", "a", &spec(8000, None))
        .await
        .unwrap();
    dir.client
        .register("emitter", "b", &spec(8001, None))
        .await
        .unwrap();
    dir.client.deregister("emitter", "b").await.unwrap();
    let resp = reqwest::get(format!("{}/metrics", dir.url)).await.unwrap();
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/openmetrics-text"));
    let text = resp.text().await.unwrap();
    for needle in [
        "baker_directory_instances{service=\"emitter\"} 1",
        "baker_directory_registrations_total{source=\"registrar\"} 2",
        "baker_directory_deregistrations_total{source=\"registrar\"} 1",
        "baker_directory_heartbeats_total 1",
        "baker_directory_expiries_total 0",
        "baker_directory_watchers 0",
    ] {
        assert!(text.contains(needle), "{needle} missing from:\n{text}");
    }
}

/// Reads from a raw connection until it closes; returns what came, or panics after `within`.
fn read_until_closed(mut stream: std::net::TcpStream, within: Duration) -> String {
    use std::io::Read;
    stream.set_read_timeout(Some(within)).unwrap();
    let mut got = Vec::new();
    match stream.read_to_end(&mut got) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!(
            "the directory did not close a slow connection within {within:?} ({e}); got {:?}",
            String::from_utf8_lossy(&got)
        ),
    }
    String::from_utf8_lossy(&got).into_owned()
}

#[tokio::test]
async fn slow_clients_time_out_and_connections_are_limited() {
    use std::io::Write;
    let dir = TestDirectory::start(&[
        ("BAKER_REQUEST_TIMEOUT", "1s"),
        ("BAKER_MAX_CONNECTIONS", "2"),
    ])
    .await;
    let addr = dir.addr;
    let (headers, body) = tokio::task::spawn_blocking(move || {
        // Headers that never finish: the connection is closed.
        let mut a = std::net::TcpStream::connect(addr).unwrap();
        a.write_all(b"GET /v1/servi").unwrap();
        // A body that never finishes: 408 with a JSON error.
        let mut b = std::net::TcpStream::connect(addr).unwrap();
        b.write_all(
            b"PUT /v1/services/emitter/instances/a HTTP/1.1\r\nHost: d\r\n\
              Content-Length: 100\r\n\r\n{\"address\":",
        )
        .unwrap();
        let b = std::thread::spawn(move || read_until_closed(b, Duration::from_secs(5)));
        let a = read_until_closed(a, Duration::from_secs(5));
        (a, b.join().unwrap())
    })
    .await
    .unwrap();
    assert!(!headers.contains("200 OK"), "{headers}");
    assert!(body.starts_with("HTTP/1.1 408"), "{body}");
    assert!(body.contains("request took longer than 1s"), "{body}");
    assert!(dir.client.services().await.unwrap().services.is_empty());

    // Two idle connections fill the limit: a third call waits until the header timeout frees
    // a slot, then succeeds.
    let idle: Vec<_> = (0..2)
        .map(|_| std::net::TcpStream::connect(addr).unwrap())
        .collect();
    // No wait needed: the kernel queues connections in order, so the directory takes the two
    // idle ones before the call's, whenever it gets to them.
    let started = Instant::now();
    // A new client: the shared one may hold a pooled connection that already has a slot.
    dir.client_with_token(None).healthz().await.unwrap();
    let waited = started.elapsed();
    // A slot frees when the header timeout (1 s) closes an idle connection: most of it is
    // left when the call starts, and 3 s past it leave room for a busy machine.
    assert!(
        waited >= Duration::from_millis(500) && waited < Duration::from_secs(4),
        "the call waited {waited:?} for a connection slot"
    );
    drop(idle);
}
