//! Named tokens with roles and scopes (`BAKER_TOKENS`) and closed reads (`BAKER_READ=token`):
//! every endpoint asked with every role, in and out of scope; the file read again while the
//! directory runs; and the token's name on the changes it made.

use std::time::Duration;

use baker_tests::directory::TestDirectory;
use baker_tests::eventually;
use reqwest::{Method, StatusCode};
use sha2::{Digest, Sha256};

/// The tokens of the test: name, role, scope, secret.
const TOKENS: &[(&str, &str, &str, &str)] = &[
    ("reg", "register", "web,web-*", "reg-secret-1"),
    ("ops", "operate", "web", "ops-secret-2"),
    ("reader", "read", "*", "reader-secret-3"),
    ("root", "admin", "*", "root-secret-4"),
];

fn line((name, role, scope, secret): &(&str, &str, &str, &str)) -> String {
    let hash = hex::encode(Sha256::digest(secret.as_bytes()));
    format!("{name} {role} {scope} sha256:{hash}\n")
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
