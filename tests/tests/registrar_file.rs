//! One registrar announcing several services from a `BAKER_CONFIG` file, against a real
//! directory and real greeting apps: each service registered, one failing app leaving the
//! others alone, SIGTERM deregistering them all, and a bad file refused with every problem.

use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use baker_client::model::Instance;
use baker_tests::directory::TestDirectory;
use baker_tests::greeting::Greeting;
use baker_tests::{eventually, Proc};

const WAIT: Duration = Duration::from_secs(10);

/// Writes `text` as `registrar.toml` in `dir` and starts a registrar reading it.
fn registrar(dir: &TestDirectory, tmp: &Path, text: &str) -> Proc {
    let path = tmp.join("registrar.toml");
    std::fs::write(&path, text).expect("writing the registrar's file");
    Proc::baker(
        "registrar-file",
        "baker-registrar",
        &[
            ("BAKER_DIRECTORY", dir.url.as_str()),
            ("BAKER_CONFIG", path.to_str().expect("a UTF-8 path")),
        ],
    )
}

/// Two services, `emitter` and `transform`, probed every 300 ms (TTL 900 ms).
fn two_services(emitter: &Greeting, transform: &Greeting) -> String {
    format!(
        r#"
        [emitter]
        target = "{}"
        id = "e1"
        interval = "300ms"
        timeout = "300ms"
        tags = ["host-a"]

        [transform]
        target = "{}"
        id = "t1"
        interval = "300ms"
        timeout = "300ms"
        version = 2
        weight = 40
        "#,
        emitter.url(),
        transform.url()
    )
}

async fn instance(dir: &TestDirectory, service: &str, id: &str) -> Option<Instance> {
    let resp = dir.client.service(service).await.ok()?;
    resp.instances.into_iter().find(|i| i.id == id)
}

async fn registered(dir: &TestDirectory, service: &str, id: &str) -> Instance {
    eventually(WAIT, &format!("{service}/{id} to be registered"), || {
        instance(dir, service, id)
    })
    .await
}

fn now_ms() -> u64 {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("a clock after 1970");
    u64::try_from(since.as_millis()).expect("milliseconds fit")
}

#[tokio::test]
async fn every_service_of_the_file_is_registered() {
    let dir = TestDirectory::start(&[]).await;
    let tmp = tempfile::tempdir().unwrap();
    let emitter = Greeting::start("1", "e").await;
    let transform = Greeting::start("2", "t").await;
    let mut reg = registrar(&dir, tmp.path(), &two_services(&emitter, &transform));

    let e = registered(&dir, "emitter", "e1").await;
    let t = registered(&dir, "transform", "t1").await;
    assert_eq!(
        (e.port, e.version.as_str(), e.weight, e.tags.as_slice()),
        (
            emitter.addr.port(),
            "1",
            100,
            &["host-a".parse().unwrap()][..]
        )
    );
    assert_eq!(
        (t.port, t.version.as_str(), t.weight),
        (transform.addr.port(), "2", 40)
    );
    assert_eq!((e.ttl_ms, t.ttl_ms), (900, 900));
    reg.wait_for_log("emitter/e1 is now up after 2 passes", WAIT)
        .await;
    reg.wait_for_log("transform/t1 is now up after 2 passes", WAIT)
        .await;
}

#[tokio::test]
async fn a_failing_app_never_holds_up_the_others() {
    let dir = TestDirectory::start(&[]).await;
    let tmp = tempfile::tempdir().unwrap();
    let mut emitter = Greeting::start("1", "e").await;
    let transform = Greeting::start("2", "t").await;
    let mut reg = registrar(&dir, tmp.path(), &two_services(&emitter, &transform));
    registered(&dir, "emitter", "e1").await;
    registered(&dir, "transform", "t1").await;

    // Watch transform's registration while emitter hangs, then dies: it must stay, and its
    // heartbeats must never stop for as long as its TTL.
    let watching = async {
        let mut stalest = 0;
        let until = Instant::now() + Duration::from_secs(4);
        while Instant::now() < until {
            let t = instance(&dir, "transform", "t1")
                .await
                .expect("transform/t1 stays registered");
            stalest = stalest.max(now_ms().saturating_sub(t.last_seen));
            assert!(
                stalest < t.ttl_ms,
                "transform/t1 went {stalest} ms without a heartbeat (ttl {} ms)",
                t.ttl_ms
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        stalest
    };
    let failing = async {
        emitter.set_health("hang").await;
        eventually(WAIT, "emitter/e1 to be gone after hanging", || async {
            instance(&dir, "emitter", "e1")
                .await
                .is_none()
                .then_some(())
        })
        .await;
        emitter.set_health("ok").await;
        registered(&dir, "emitter", "e1").await;
        emitter.proc.kill9();
        eventually(WAIT, "emitter/e1 to be gone after its app died", || async {
            instance(&dir, "emitter", "e1")
                .await
                .is_none()
                .then_some(())
        })
        .await;
    };
    let (stalest, ()) = tokio::join!(watching, failing);
    eprintln!("transform/t1: at most {stalest} ms between heartbeats seen");
    reg.wait_for_log(
        "emitter/e1 is now down after 2 failures: no answer within 300ms",
        WAIT,
    )
    .await;
    reg.wait_for_log(
        "emitter/e1 is now down after 2 failures: cannot connect",
        WAIT,
    )
    .await;
    assert!(
        !reg.log_text().contains("transform/t1 is now down"),
        "{}",
        reg.log_text()
    );
    assert!(instance(&dir, "transform", "t1").await.is_some());
}

#[tokio::test]
async fn sigterm_deregisters_every_service_before_exiting() {
    let dir = TestDirectory::start(&[]).await;
    let tmp = tempfile::tempdir().unwrap();
    let emitter = Greeting::start("1", "e").await;
    let transform = Greeting::start("2", "t").await;
    // Long intervals (ttl 6 s): expiry cannot explain the instances going away quickly.
    let text = two_services(&emitter, &transform).replace("\"300ms\"", "\"2s\"");
    let mut reg = registrar(&dir, tmp.path(), &text);
    registered(&dir, "emitter", "e1").await;
    registered(&dir, "transform", "t1").await;

    let signalled = Instant::now();
    reg.term();
    let status = reg.wait_exit(WAIT).await;
    let took = signalled.elapsed();
    assert_eq!(status.code(), Some(0), "{}", reg.log_text());
    assert!(took < Duration::from_secs(3), "stopping took {took:?}");
    assert!(instance(&dir, "emitter", "e1").await.is_none());
    assert!(instance(&dir, "transform", "t1").await.is_none());
    let log = reg.log();
    let pos = |needle: &str| {
        log.iter()
            .position(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no {needle:?} in:\n{}", log.join("\n")))
    };
    let stopped = pos("stopped");
    assert!(pos("SIGTERM received") < pos("deregistered emitter/e1"));
    assert!(pos("deregistered emitter/e1") < stopped);
    assert!(pos("deregistered transform/t1") < stopped);
}

#[tokio::test]
async fn a_bad_file_is_refused_with_every_problem_and_exit_64() {
    let dir = TestDirectory::start(&[]).await;
    let tmp = tempfile::tempdir().unwrap();
    let mut reg = registrar(
        &dir,
        tmp.path(),
        r#"
        [emitter]
        target = "localhost:8080"
        rise = 0

        [transform]
        target = "http://127.0.0.1:8081"
        wieght = 40
        interval = "often"
        "#,
    );
    let status = reg.wait_exit(WAIT).await;
    assert_eq!(status.code(), Some(64), "{}", reg.log_text());
    let text = eventually(Duration::from_secs(2), "the error message", || {
        let text = reg.log_text();
        async move { text.contains("interval").then_some(text) }
    })
    .await;
    assert!(text.contains("4 problems"), "{text}");
    for place in [
        "[emitter] target: must be http://host:port or tcp://host:port",
        "[emitter] rise: must be a whole number from 1 to 100",
        "[transform] wieght: is not a setting of a service; did you mean weight?",
        "[transform] interval: must be a duration",
    ] {
        assert!(text.contains(place), "{place:?} not in:\n{text}");
    }
}

#[tokio::test]
async fn a_variable_of_another_program_is_warned_about_once() {
    let dir = TestDirectory::start(&[]).await;
    let tmp = tempfile::tempdir().unwrap();
    let app = Greeting::start("1", "e").await;
    let path = tmp.path().join("registrar.toml");
    std::fs::write(&path, format!("[transform]\ntarget = \"{}\"\n", app.url())).unwrap();
    let target = app.url();
    let with_file = [
        ("BAKER_DIRECTORY", dir.url.as_str()),
        ("BAKER_CONFIG", path.to_str().unwrap()),
        ("BAKER_ROUTES", "greeting=8000"),
    ];
    let with_both = [
        ("BAKER_DIRECTORY", dir.url.as_str()),
        ("BAKER_CONFIG", path.to_str().unwrap()),
        ("BAKER_SERVICE", "emitter"),
        ("BAKER_TARGET", target.as_str()),
        ("BAKER_ROUTES", "greeting=8000"),
    ];
    let alone = [
        ("BAKER_DIRECTORY", dir.url.as_str()),
        ("BAKER_SERVICE", "emitter"),
        ("BAKER_TARGET", target.as_str()),
        ("BAKER_ROUTES", "greeting=8000"),
    ];
    for env in [&with_file[..], &with_both, &alone] {
        let mut reg = Proc::baker("registrar-warned", "baker-registrar", env);
        reg.wait_for_log("registrar for ", WAIT).await;
        let warnings = reg
            .log()
            .iter()
            .filter(|l| l.contains("ignoring a variable of another Baker program"))
            .count();
        assert_eq!(warnings, 1, "{env:?}:\n{}", reg.log_text());
    }
}

#[tokio::test]
async fn services_deregister_side_by_side_when_the_directory_is_away() {
    let mut dir = TestDirectory::start(&[]).await;
    let tmp = tempfile::tempdir().unwrap();
    let emitter = Greeting::start("1", "e").await;
    let transform = Greeting::start("2", "t").await;
    let mut reg = registrar(&dir, tmp.path(), &two_services(&emitter, &transform));
    registered(&dir, "emitter", "e1").await;
    registered(&dir, "transform", "t1").await;

    // Each service tries to deregister for 5 s; one after the other would take 10.
    dir.kill9();
    let signalled = Instant::now();
    reg.term();
    let status = reg.wait_exit(Duration::from_secs(15)).await;
    let took = signalled.elapsed();
    assert_eq!(status.code(), Some(0), "{}", reg.log_text());
    assert!(
        took < Duration::from_secs(8),
        "stopping took {took:?}:\n{}",
        reg.log_text()
    );
    for name in ["emitter/e1", "transform/t1"] {
        reg.wait_for_log(&format!("could not deregister {name}"), WAIT)
            .await;
    }
}
