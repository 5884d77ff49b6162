//! Named tokens with roles and scopes (`BAKER_TOKENS`) and closed reads (`BAKER_READ=token`):
//! every endpoint asked with every role, in and out of scope; the file read again while the
//! directory runs; the token's name on the changes it made (`by`, in memory and through etcd to
//! another replica); a watch that ends when its token goes; and the harness's check that no
//! process prints a token's secret.

use std::time::{Duration, Instant};

use baker_client::events::{EventKind, EventsResponse};
use baker_tests::directory::TestDirectory;
use baker_tests::etcd::EtcdCluster;
use baker_tests::{eventually, require, secrets, Needs, Proc};
use reqwest::{Method, StatusCode};

/// The tokens of the test: name, role, scope, secret.
const TOKENS: &[(&str, &str, &str, &str)] = &[
    ("reg", "register", "web,web-*", "reg-secret-1"),
    ("ops", "operate", "web", "ops-secret-2"),
    ("reader", "read", "*", "reader-secret-3"),
    ("root", "admin", "*", "root-secret-4"),
];

fn line((name, role, scope, secret): &(&str, &str, &str, &str)) -> String {
    secrets::token_line(name, role, scope, secret)
}

fn secret(name: &str) -> Option<&'static str> {
    TOKENS.iter().find(|t| t.0 == name).map(|t| t.3)
}

/// One call: its status and body.
async fn call(
    c: &reqwest::Client,
    dir: &TestDirectory,
    method: Method,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> (StatusCode, String) {
    let mut req = c.request(method, format!("{}{path}", dir.url));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if let Some(b) = body {
        req = req
            .header("content-type", "application/json")
            .body(b.to_owned());
    }
    let resp = req.send().await.expect("the directory answers");
    let status = resp.status();
    // A watch answers its status at once and streams on: its body is not read.
    let text = if path.starts_with("/v1/watch") {
        String::new()
    } else {
        resp.text().await.unwrap_or_default()
    };
    (status, text)
}

const INSTANCE: &str = r#"{"address":"127.0.0.1","port":9,"version":"1","ttl_ms":60000}"#;

#[tokio::test]
async fn every_endpoint_with_every_role_in_and_out_of_scope() {
    let file = tempfile::NamedTempFile::new().unwrap();
    let text: String = TOKENS.iter().map(line).collect();
    std::fs::write(file.path(), text).unwrap();
    let path = file.path().to_str().unwrap();
    let dir = TestDirectory::start(&[("BAKER_TOKENS", path), ("BAKER_READ", "token")]).await;
    let c = reqwest::Client::new();

    // (method, path, body, expected status by caller: none, reg, ops, reader, root)
    type Row = (Method, &'static str, Option<&'static str>, [u16; 5]);
    let rows: Vec<Row> = vec![
        (Method::GET, "/healthz", None, [200, 200, 200, 200, 200]),
        (Method::GET, "/v1/services", None, [401, 403, 200, 200, 200]),
        (Method::GET, "/v1/routes", None, [401, 403, 200, 200, 200]),
        (Method::GET, "/v1/events", None, [401, 403, 200, 200, 200]),
        (
            Method::GET,
            "/v1/maintenance",
            None,
            [401, 403, 200, 200, 200],
        ),
        (
            Method::GET,
            "/v1/ambassadors",
            None,
            [401, 403, 200, 200, 200],
        ),
        (Method::GET, "/metrics", None, [401, 403, 200, 200, 200]),
        (
            Method::GET,
            "/v1/watch?v=2",
            None,
            [401, 403, 200, 200, 200],
        ),
        // Instances: the register role, in its scope.
        (
            Method::PUT,
            "/v1/services/web/instances/a",
            Some(INSTANCE),
            [401, 200, 403, 403, 200],
        ),
        (
            Method::PUT,
            "/v1/services/web-api/instances/a",
            Some(INSTANCE),
            [401, 200, 403, 403, 200],
        ),
        (
            Method::PUT,
            "/v1/services/db/instances/a",
            Some(INSTANCE),
            [401, 403, 403, 403, 200],
        ),
        (
            Method::DELETE,
            "/v1/services/db/instances/a",
            None,
            [401, 403, 403, 403, 200],
        ),
        (
            Method::DELETE,
            "/v1/services/web-api/instances/a",
            None,
            [401, 200, 403, 403, 404],
        ),
        // Routes and drains: the operate role, in its scope.
        (
            Method::PUT,
            "/v1/routes/web?force=true",
            Some(r#"{"1":100}"#),
            [401, 403, 200, 403, 200],
        ),
        (
            Method::PUT,
            "/v1/routes/db?force=true",
            Some(r#"{"1":100}"#),
            [401, 403, 403, 403, 200],
        ),
        (
            Method::DELETE,
            "/v1/routes/db",
            None,
            [401, 403, 403, 403, 200],
        ),
        (
            Method::PUT,
            "/v1/maintenance/web/versions/1?force=true",
            Some("{}"),
            [401, 403, 200, 403, 200],
        ),
        (
            Method::DELETE,
            "/v1/maintenance/web/versions/1",
            None,
            [401, 403, 200, 403, 404],
        ),
        (
            Method::PUT,
            "/v1/maintenance/db/versions/1?force=true",
            Some("{}"),
            [401, 403, 403, 403, 200],
        ),
        // Ambassadors' reports: any role that reads.
        (
            Method::PUT,
            "/v1/ambassadors/amb-1",
            Some(
                r#"{"host":"h","services":[],"applied_index":0,"reloads":0,"servers":[],"ttl_ms":15000}"#,
            ),
            [401, 403, 200, 200, 200],
        ),
    ];
    let callers = [None, Some("reg"), Some("ops"), Some("reader"), Some("root")];
    let mut wrong = Vec::new();
    for (method, path, body, expected) in &rows {
        for (caller, want) in callers.iter().zip(expected) {
            let token = caller.and_then(secret);
            let (status, text) = call(&c, &dir, method.clone(), path, token, *body).await;
            if status.as_u16() != *want {
                wrong.push(format!(
                    "{method} {path} as {}: {status} (wanted {want}) {text}",
                    caller.unwrap_or("nobody")
                ));
            }
            if status == StatusCode::FORBIDDEN && !path.starts_with("/v1/watch") {
                let name = caller.unwrap();
                assert!(
                    text.contains(&format!("the token {name} (role ")),
                    "a 403 names the token and its role: {text}"
                );
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));

    // A token the directory does not know is 401, however it is sent.
    let (status, _) = call(&c, &dir, Method::GET, "/v1/services", Some("nope"), None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    // A refusal names what is missing: the scope, or the role.
    let (_, text) = call(
        &c,
        &dir,
        Method::PUT,
        "/v1/routes/db?force=true",
        secret("ops"),
        Some(r#"{"1":100}"#),
    )
    .await;
    assert!(
        text.contains("the token ops (role operate, scope web) may not set the route of db")
            && text.contains("db is not in its scope"),
        "{text}"
    );

    // The route's change names the token that made it.
    let (_, events) = call(&c, &dir, Method::GET, "/v1/events", secret("reader"), None).await;
    assert!(events.contains("with token ops"), "{events}");
    assert!(
        !TOKENS.iter().any(|t| events.contains(t.3)),
        "no secret in the events: {events}"
    );

    // The file is read again: a token taken out of it is refused from then on, one added works.
    let text: String = TOKENS
        .iter()
        .filter(|t| t.0 != "reader")
        .map(line)
        .chain(std::iter::once(line(&(
            "late",
            "read",
            "*",
            "late-secret-5",
        ))))
        .collect();
    std::fs::write(file.path(), text).unwrap();
    eventually(
        Duration::from_secs(10),
        "the reader's token refused and the new one taken",
        || async {
            let (old, _) = call(&c, &dir, Method::GET, "/v1/routes", secret("reader"), None).await;
            let (new, _) = call(
                &c,
                &dir,
                Method::GET,
                "/v1/routes",
                Some("late-secret-5"),
                None,
            )
            .await;
            (old == StatusCode::UNAUTHORIZED && new == StatusCode::OK).then_some(())
        },
    )
    .await;
    // A file that no longer parses changes nothing.
    std::fs::write(file.path(), "not a token file\n").unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let (status, _) = call(
        &c,
        &dir,
        Method::GET,
        "/v1/routes",
        Some("late-secret-5"),
        None,
    )
    .await;
    assert_eq!(
        status,
        StatusCode::OK,
        "the tokens read before stay in force"
    );
}

#[tokio::test]
async fn a_bad_tokens_file_stops_the_directory_naming_each_bad_line() {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        file.path(),
        "ok read * sha256:0000000000000000000000000000000000000000000000000000000000000000\n\
         bad reader *\n",
    )
    .unwrap();
    let out = std::process::Command::new(baker_tests::bin("baker-directory"))
        .env("BAKER_TOKENS", file.path())
        .env("BAKER_LISTEN", "127.0.0.1:0")
        .env("BAKER_DOCKER", "off")
        .env("BAKER_DATA", tempfile::tempdir().unwrap().path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("line 2: expected four fields, NAME ROLE SCOPE SECRET, found 3"),
        "{stderr}"
    );
    // BAKER_READ=token with no token at all is refused as a bad configuration.
    let out = std::process::Command::new(baker_tests::bin("baker-directory"))
        .env("BAKER_READ", "token")
        .env("BAKER_LISTEN", "127.0.0.1:0")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("BAKER_READ"), "{stderr}");
}

/// The events of `dir`, read with `token`.
async fn events(c: &reqwest::Client, dir: &TestDirectory, token: Option<&str>) -> EventsResponse {
    let (status, text) = call(c, dir, Method::GET, "/v1/events", token, None).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    assert!(
        !secrets::all().iter().any(|s| text.contains(s.as_str())),
        "no secret in the events: {text}"
    );
    serde_json::from_str(&text).expect("the events as JSON")
}

/// (kind, id or version, by) of each event of `service`.
fn who(events: &EventsResponse, service: &str) -> Vec<(EventKind, String, String)> {
    events
        .events
        .iter()
        .filter(|e| e.service == service)
        .map(|e| {
            let what = match (&e.id, &e.version) {
                (Some(id), _) => id.to_string(),
                (None, Some(v)) => format!("version {v}"),
                (None, None) => "-".to_owned(),
            };
            (e.kind, what, e.by.clone().unwrap_or_default())
        })
        .collect()
}

fn row(kind: EventKind, what: &str, by: &str) -> (EventKind, String, String) {
    (kind, what.to_owned(), by.to_owned())
}

/// An instance of `port` with a TTL of `ttl_ms`.
fn instance(port: u16, ttl_ms: u64) -> String {
    format!(r#"{{"address":"127.0.0.1","port":{port},"version":"1","ttl_ms":{ttl_ms}}}"#)
}

/// Every kind of change a call makes, made with a token each (a drain and a route with the
/// operator's, a registration, a change and a deregistration with the registrar's, one with
/// `BAKER_TOKEN`), one expiry: each event names who made it, on `dir`'s events, as `watcher`
/// (another replica of the same table, or `dir` itself) tells them.
async fn every_change_names_its_maker(dir: &TestDirectory, watcher: &TestDirectory) {
    let c = reqwest::Client::new();
    let put = |path: &'static str, token: &'static str, body: String| {
        let c = c.clone();
        async move {
            let (status, text) = call(
                &c,
                dir,
                Method::PUT,
                path,
                secret(token).or(Some(token)),
                Some(&body),
            )
            .await;
            assert_eq!(status, StatusCode::OK, "PUT {path}: {text}");
        }
    };
    let delete = |path: &'static str, token: &'static str| {
        let c = c.clone();
        async move {
            let (status, text) = call(&c, dir, Method::DELETE, path, secret(token), None).await;
            assert_eq!(status, StatusCode::OK, "DELETE {path}: {text}");
        }
    };
    put("/v1/services/web/instances/a", "reg", instance(9, 60_000)).await;
    put("/v1/services/web/instances/a", "reg", instance(10, 60_000)).await;
    put(
        "/v1/services/web/instances/c",
        ADMIN_SECRET,
        instance(12, 60_000),
    )
    .await;
    delete("/v1/services/web/instances/a", "reg").await;
    put("/v1/routes/web?force=true", "ops", r#"{"1":100}"#.into()).await;
    put(
        "/v1/maintenance/web/versions/1?force=true",
        "ops",
        "{}".into(),
    )
    .await;
    delete("/v1/maintenance/web/versions/1", "ops").await;
    delete("/v1/routes/web", "ops").await;
    // Last, as it expires a second later.
    put("/v1/services/web/instances/b", "root", instance(11, 1_000)).await;
    let want = vec![
        row(EventKind::Registered, "a", "reg"),
        row(EventKind::Changed, "a", "reg"),
        row(EventKind::Registered, "c", "BAKER_TOKEN"),
        row(EventKind::Deregistered, "a", "reg"),
        row(EventKind::RouteSet, "-", "ops"),
        row(EventKind::Drained, "version 1", "ops"),
        row(EventKind::Undrained, "version 1", "ops"),
        row(EventKind::RouteCleared, "-", "ops"),
        row(EventKind::Registered, "b", "root"),
        row(EventKind::Expired, "b", "expiry"),
    ];
    let got = eventually(
        Duration::from_secs(15),
        "every change, b's expiry last, in the events",
        || async {
            let got = who(&events(&c, watcher, secret("root")).await, "web");
            (got.len() == want.len()).then_some(got)
        },
    )
    .await;
    assert_eq!(got, want);
}

/// The single admin token of the tests that name one.
const ADMIN_SECRET: &str = "admin-secret-6";

/// A tokens file of [`TOKENS`].
fn tokens_file() -> tempfile::NamedTempFile {
    let file = tempfile::NamedTempFile::new().unwrap();
    let text: String = TOKENS.iter().map(line).collect();
    std::fs::write(file.path(), text).unwrap();
    file
}

#[tokio::test]
async fn every_change_names_the_token_that_made_it_or_who_else_did() {
    let file = tokens_file();
    let path = file.path().to_str().unwrap();
    let env = [("BAKER_TOKENS", path), ("BAKER_TOKEN", ADMIN_SECRET)];
    let dir = TestDirectory::start(&env).await;
    every_change_names_its_maker(&dir, &dir).await;

    // `baker events` shows it in a column of its own.
    let run = baker_tests::cli::baker(&dir.url, secret("root"), &["events", "--service", "web"])
        .await
        .ok();
    let header = run.stdout.lines().next().unwrap_or_default().to_owned();
    assert!(
        header.contains(" BY ") && header.ends_with("ORIGIN"),
        "{}",
        run.stdout
    );
    let drained = run
        .stdout
        .lines()
        .find(|l| l.contains(" drained "))
        .unwrap_or_default();
    assert!(
        drained.contains(" ops ") && drained.contains("with token ops"),
        "{}",
        run.stdout
    );

    // Without any token (changes open): `anonymous`; with a token the directory knows, its
    // name even then.
    let open = TestDirectory::start(&[]).await;
    let c = reqwest::Client::new();
    for token in [None, Some("whatever-it-is")] {
        let (status, _) = call(
            &c,
            &open,
            Method::PUT,
            "/v1/services/web/instances/a",
            token,
            Some(&instance(9, 60_000)),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        call(
            &c,
            &open,
            Method::DELETE,
            "/v1/services/web/instances/a",
            token,
            None,
        )
        .await;
    }
    // The history follows the change feed: the last change may reach it a moment after its
    // call answered.
    let got = eventually(
        Duration::from_secs(10),
        "the four changes in the events",
        || async {
            let got = who(&events(&c, &open, None).await, "web");
            (got.len() >= 4).then_some(got)
        },
    )
    .await;
    assert_eq!(
        got,
        [
            row(EventKind::Registered, "a", "anonymous"),
            row(EventKind::Deregistered, "a", "anonymous"),
            row(EventKind::Registered, "a", "anonymous"),
            row(EventKind::Deregistered, "a", "anonymous"),
        ]
    );
}

#[tokio::test]
async fn on_etcd_another_replica_names_the_token_of_a_change_it_only_watched() {
    if !require(Needs::Etcd) {
        return;
    }
    let cluster = EtcdCluster::start(1).await;
    let store = cluster.store_url("/baker");
    let file = tokens_file();
    let path = file.path().to_str().unwrap();
    let a = TestDirectory::start(&[
        ("BAKER_STORE", &store),
        ("BAKER_TOKENS", path),
        ("BAKER_TOKEN", ADMIN_SECRET),
    ])
    .await;
    let b = a.replica().await;
    // Every change made through a, read from b's events.
    every_change_names_its_maker(&a, &b).await;
    // And the other way round, as b's own events say it: its watch and its own commits agree.
    let c = reqwest::Client::new();
    let theirs = who(&events(&c, &b, secret("root")).await, "web");
    let mine = eventually(
        Duration::from_secs(10),
        "a's events to hold as many changes as b's",
        || async {
            let mine = who(&events(&c, &a, secret("root")).await, "web");
            (mine.len() >= theirs.len()).then_some(mine)
        },
    )
    .await;
    assert_eq!(mine, theirs);
}

/// Whether the watch `resp` ends within `limit`, reading what it sends meanwhile.
async fn ends_within(resp: &mut reqwest::Response, limit: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, resp.chunk()).await {
            Err(_) => return false,
            Ok(Ok(Some(_))) => continue,
            Ok(Ok(None)) | Ok(Err(_)) => return true,
        }
    }
}

#[tokio::test]
async fn a_watch_ends_once_its_token_is_removed_or_changed() {
    let file = tempfile::NamedTempFile::new().unwrap();
    let tokens = [
        ("keeps", "read", "*", "keeps-secret-7"),
        ("goes", "read", "*", "goes-secret-8"),
        ("rotated", "read", "*", "rotated-secret-9"),
        ("demoted", "operate", "web", "demoted-secret-10"),
    ];
    let write = |lines: &[(&str, &str, &str, &str)]| {
        let text: String = lines.iter().map(line).collect();
        std::fs::write(file.path(), text).unwrap();
    };
    write(&tokens);
    let path = file.path().to_str().unwrap();
    let dir = TestDirectory::start(&[("BAKER_TOKENS", path), ("BAKER_READ", "token")]).await;
    let c = reqwest::Client::new();
    let open = |secret: &'static str| {
        let c = c.clone();
        let url = format!("{}/v1/watch?v=2", dir.url);
        async move {
            let mut resp = c.get(url).bearer_auth(secret).send().await.unwrap();
            assert_eq!(resp.status(), StatusCode::OK);
            resp.chunk().await.unwrap().expect("the snapshot");
            resp
        }
    };
    let mut keeps = open("keeps-secret-7").await;
    let mut goes = open("goes-secret-8").await;
    let mut rotated = open("rotated-secret-9").await;
    let mut demoted = open("demoted-secret-10").await;

    // `goes` taken out of the file, `rotated` given another secret, `demoted` a role that does
    // not read: their watches end within the second the file is checked in, and a little.
    write(&[
        tokens[0],
        ("rotated", "read", "*", "rotated-secret-11"),
        ("demoted", "register", "web", "demoted-secret-10"),
    ]);
    let changed = Instant::now();
    for (name, resp) in [
        ("goes", &mut goes),
        ("rotated", &mut rotated),
        ("demoted", &mut demoted),
    ] {
        assert!(
            ends_within(resp, Duration::from_millis(2500)).await,
            "the watch of {name} still runs {:?} after its token changed",
            changed.elapsed()
        );
    }
    // The watch whose token stays goes on: it gets the next change.
    let (status, _) = call(
        &c,
        &dir,
        Method::PUT,
        "/v1/services/web/instances/a",
        Some("demoted-secret-10"),
        Some(&instance(9, 60_000)),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "the demoted token registers");
    let next = tokio::time::timeout(Duration::from_secs(5), keeps.chunk())
        .await
        .expect("a line within 5 s")
        .expect("the watch goes on")
        .expect("a line, not the end");
    let next = String::from_utf8_lossy(&next);
    assert!(next.contains(r#""type":"upsert""#), "{next}");
    // A watch with the old secret of `rotated` is refused from the start.
    let (status, _) = call(
        &c,
        &dir,
        Method::GET,
        "/v1/watch?v=2",
        Some("rotated-secret-9"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    // The directory's log is read by another thread: the line may come a moment later.
    eventually(
        Duration::from_secs(5),
        "the directory to log why the watches ended",
        || async {
            dir.proc
                .log_text()
                .contains("ending a watch: its token is no longer in force")
                .then_some(())
        },
    )
    .await;
}

#[tokio::test]
async fn a_process_that_prints_a_secret_fails_its_test() {
    // A secret of a tokens file, registered as its line is written.
    let _ = secrets::token_line("leaky", "read", "*", "leaked-secret-12");
    let mut printed = Proc::spawn(
        "leaky",
        "/bin/sh",
        &[
            "-c",
            "echo starting; echo 'header: Bearer leaked-secret-12'",
        ],
        &[],
    );
    printed.wait_exit(Duration::from_secs(10)).await;
    // A secret given as BAKER_TOKEN, registered as the process starts.
    let mut echoed = Proc::spawn(
        "echoes-its-token",
        "/bin/sh",
        &["-c", "echo \"token is $BAKER_TOKEN\""],
        &[("BAKER_TOKEN", "env-secret-13")],
    );
    echoed.wait_exit(Duration::from_secs(10)).await;
    for (proc, says) in [
        (
            printed,
            "leaky printed a token's secret, on line 2 of its output (masked here): header: \
             Bearer <SECRET>",
        ),
        (
            echoed,
            "echoes-its-token printed a token's secret, on line 1 of its output (masked here): \
             token is <SECRET>",
        ),
    ] {
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| drop(proc)))
            .expect_err("dropping a process that printed a secret fails the test");
        let message = caught.downcast_ref::<String>().cloned().unwrap_or_default();
        assert_eq!(message, says);
    }
    // One that printed none passes.
    let mut quiet = Proc::spawn("quiet", "/bin/sh", &["-c", "echo nothing to see"], &[]);
    quiet.wait_exit(Duration::from_secs(10)).await;
    drop(quiet);
}
