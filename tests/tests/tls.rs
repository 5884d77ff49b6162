//! HTTPS on the directory (`BAKER_TLS_CERT`, `BAKER_TLS_KEY`) and trust in it (`BAKER_CA`,
//! `--ca`): the registrar, the ambassador and the CLI over HTTPS; certificates that do not
//! verify refused with the host and the reason; a certificate renewed under load without a
//! failed request or a dropped watch; and etcd members reached over TLS (`etcds://`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use baker_client::model::WatchEvent;
use baker_tests::ambassador::TestAmbassador;
use baker_tests::cli::baker;
use baker_tests::directory::{spec, TestDirectory};
use baker_tests::greeting::Greeting;
use baker_tests::tls::{bundle, Pki};
use baker_tests::{eventually, free_port, Proc};
use futures_util::StreamExt;

fn tls_env<'a>(pair: &'a baker_tests::tls::Pair, ca: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("BAKER_TLS_CERT", pair.cert.to_str().unwrap()),
        ("BAKER_TLS_KEY", pair.key.to_str().unwrap()),
        ("BAKER_CA", ca),
    ]
}

#[tokio::test]
async fn an_https_directory_serves_the_registrar_the_ambassador_and_the_cli() {
    let pki = Pki::new("a");
    let pair = pki.server("directory");
    let ca = pki.ca.to_str().unwrap();
    let dir = TestDirectory::start(&tls_env(&pair, ca)).await;
    assert!(dir.url.starts_with("https://127.0.0.1:"), "{}", dir.url);

    let greeting = Greeting::start("1", "g1").await;
    let target = greeting.url();
    let _registrar = Proc::baker(
        "registrar-g1",
        "baker-registrar",
        &[
            ("BAKER_DIRECTORY", dir.url.as_str()),
            ("BAKER_CA", ca),
            ("BAKER_SERVICE", "emitter"),
            ("BAKER_ID", "g1"),
            ("BAKER_TARGET", target.as_str()),
            ("BAKER_INTERVAL", "200ms"),
        ],
    );
    eventually(
        Duration::from_secs(10),
        "the registrar to register over HTTPS",
        || async {
            let s = dir.client.service("emitter").await.ok()?;
            (s.instances.len() == 1).then_some(())
        },
    )
    .await;

    let amb = TestAmbassador::start(&dir.url, &["emitter"], &[("BAKER_CA", ca)]).await;
    let http = reqwest::Client::new();
    eventually(
        Duration::from_secs(10),
        "the ambassador to route to the instance it watched over HTTPS",
        || async {
            let url = format!("{}/greeting", amb.url("emitter"));
            let r = http.get(url).send().await.ok()?;
            r.status().is_success().then_some(())
        },
    )
    .await;

    let listed = baker(&dir.url, None, &["--ca", ca, "instances", "emitter"])
        .await
        .ok();
    assert!(listed.stdout.contains("g1"), "{}", listed.stdout);

    // Plain HTTP to the HTTPS port: an answer that says what to do, not a reset.
    let plain = dir.url.replacen("https://", "http://", 1);
    let refused = baker(&plain, None, &["services"]).await;
    assert_eq!(refused.code, 1, "{refused:?}");
    assert!(
        refused
            .stderr
            .contains("this directory serves HTTPS only: use an https:// URL for it"),
        "{}",
        refused.stderr
    );
}

#[tokio::test]
async fn certificates_that_do_not_verify_are_refused_naming_the_host_and_the_reason() {
    let pki = Pki::new("right");
    let other = Pki::new("wrong");
    let pair = pki.server("directory");
    let ca = pki.ca.to_str().unwrap();
    let dir = TestDirectory::start(&tls_env(&pair, ca)).await;
    let host = dir.url.clone();

    // No CA given: the system's roots do not know this CA.
    let run = baker(&dir.url, None, &["services"]).await;
    assert_eq!(run.code, 69, "{run:?}");
    assert!(
        run.stderr.contains(&format!(
            "error: the directory at {host} presented a certificate that does not verify: it \
             is not signed by a CA that the system's roots holds"
        )),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr.contains("hint: point --ca or BAKER_CA"),
        "{}",
        run.stderr
    );

    // Another CA.
    let wrong = other.ca.to_str().unwrap();
    let run = baker(&dir.url, None, &["--ca", wrong, "services"]).await;
    assert_eq!(run.code, 69, "{run:?}");
    assert!(
        run.stderr.contains(&format!(
            "the directory at {host} presented a certificate that does not verify: it is not \
             signed by a CA that BAKER_CA ({wrong}) holds"
        )),
        "{}",
        run.stderr
    );

    // A registrar that trusts the other CA says so in its log, naming the directory.
    let greeting = Greeting::start("1", "g1").await;
    let target = greeting.url();
    let mut registrar = Proc::baker(
        "registrar-wrong-ca",
        "baker-registrar",
        &[
            ("BAKER_DIRECTORY", dir.url.as_str()),
            ("BAKER_CA", wrong),
            ("BAKER_SERVICE", "emitter"),
            ("BAKER_ID", "g1"),
            ("BAKER_TARGET", target.as_str()),
            ("BAKER_INTERVAL", "200ms"),
        ],
    );
    let line = registrar
        .wait_for_log(
            "presented a certificate that does not verify",
            Duration::from_secs(10),
        )
        .await;
    assert!(line.contains(&host), "{line}");
    assert!(dir.client.service("emitter").await.is_err());

    // An expired certificate, from the right CA.
    let expired = pki.expired_server("expired");
    let old = TestDirectory::start(&tls_env(&expired, ca)).await;
    let run = baker(&old.url, None, &["--ca", ca, "services"]).await;
    assert_eq!(run.code, 69, "{run:?}");
    assert!(
        run.stderr.contains(&format!(
            "the directory at {} presented a certificate that does not verify: it has expired",
            old.url
        )),
        "{}",
        run.stderr
    );

    // A CA bundle that is no bundle is a configuration error, before anything is sent.
    let run = baker(
        &dir.url,
        None,
        &["--ca", pair.key.to_str().unwrap(), "services"],
    )
    .await;
    assert_eq!(run.code, 64, "{run:?}");
    assert!(
        run.stderr.contains("--ca / BAKER_CA: the CA bundle")
            && run.stderr.contains("holds no PEM certificate"),
        "{}",
        run.stderr
    );
}

#[tokio::test]
async fn a_directory_refuses_to_start_on_a_certificate_it_cannot_serve() {
    let pki = Pki::new("start");
    let pair = pki.server("directory");
    let other = pki.server("other");
    let directory = baker_tests::bin("baker-directory");
    let listen = format!("127.0.0.1:{}", free_port());
    let data = tempfile::tempdir().unwrap();
    // The variables, the exit code, and what the log must say.
    type Case<'a> = (Vec<(&'a str, &'a str)>, i32, String);
    let cases: Vec<Case> = vec![
        (
            vec![("BAKER_TLS_CERT", pair.cert.to_str().unwrap())],
            64,
            "BAKER_TLS_KEY: must be set with BAKER_TLS_CERT".to_owned(),
        ),
        (
            vec![
                ("BAKER_TLS_CERT", pair.cert.to_str().unwrap()),
                ("BAKER_TLS_KEY", other.key.to_str().unwrap()),
            ],
            1,
            format!(
                "cannot serve HTTPS: the key {} does not go with the certificate {}",
                other.key.display(),
                pair.cert.display()
            ),
        ),
        (
            vec![
                ("BAKER_TLS_CERT", pair.key.to_str().unwrap()),
                ("BAKER_TLS_KEY", pair.key.to_str().unwrap()),
            ],
            1,
            format!(
                "cannot serve HTTPS: the certificate {} holds no PEM certificate",
                pair.key.display()
            ),
        ),
    ];
    for (env, code, said) in cases {
        let mut all = vec![
            ("BAKER_LISTEN", listen.as_str()),
            ("BAKER_DATA", data.path().to_str().unwrap()),
            ("BAKER_DOCKER", "off"),
        ];
        all.extend(env);
        let mut proc = Proc::spawn("directory", &directory, &[], &all);
        let status = proc.wait_exit(Duration::from_secs(10)).await;
        assert_eq!(status.code(), Some(code), "{}", proc.log_text());
        assert!(
            proc.log_text().contains(&said),
            "{said}\n{}",
            proc.log_text()
        );
    }
}

#[tokio::test]
async fn a_renewed_certificate_is_served_without_a_failed_request_or_a_dropped_watch() {
    // The certificate moves from CA "old" to CA "new"; clients trust both during the move.
    let old = Pki::new("old");
    let new = Pki::new("new");
    let pair = old.server("directory");
    let both = bundle(&[&old, &new]);
    let both_str = both.to_str().unwrap().to_owned();
    let dir = TestDirectory::start(&tls_env(&pair, &both_str)).await;
    let only_new = baker_client::DirectoryClient::trusting(&dir.url, None, Some(&new.ca)).unwrap();
    assert!(
        only_new.services().await.is_err(),
        "the first certificate is the old CA's"
    );

    let mut watch = Box::pin(dir.client.watch().await.expect("a watch"));
    match watch.next().await {
        Some(Ok(WatchEvent::Snapshot { .. })) => {}
        other => panic!("expected the snapshot, got {other:?}"),
    }

    // Load: calls on new connections and on kept ones, all through the renewal.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut load = Vec::new();
    for fresh in [false, true] {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        let (url, ca) = (dir.url.clone(), both.clone());
        load.push(tokio::spawn(async move {
            let kept = baker_client::DirectoryClient::trusting(&url, None, Some(&ca)).unwrap();
            while !stop.load(Ordering::Relaxed) {
                let c = if fresh {
                    baker_client::DirectoryClient::trusting(&url, None, Some(&ca)).unwrap()
                } else {
                    kept.clone()
                };
                match c.services().await {
                    Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                    Err(e) => {
                        eprintln!("a call failed during the renewal: {e}");
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    // A half-written certificate is not served: the previous one stays.
    std::fs::write(&pair.cert, "-----BEGIN CERTIFICATE-----\ntruncated").unwrap();
    eventually(
        Duration::from_secs(5),
        "the failed reload to be logged",
        || async {
            dir.proc
                .log_text()
                .contains("cannot reload the TLS certificate")
                .then_some(())
        },
    )
    .await;

    let renewed = Instant::now();
    new.renew(&pair);
    eventually(
        Duration::from_secs(5),
        "new connections to get the new CA's certificate",
        || async { only_new.services().await.ok().map(|_| ()) },
    )
    .await;
    let took = renewed.elapsed();
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    for l in load {
        l.await.unwrap();
    }
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    println!(
        "renewal: served {took:?} after the files changed; {ok} calls answered, {failed} failed"
    );
    assert_eq!(failed, 0, "{failed} of {} calls failed", ok + failed);
    assert!(ok > 50, "only {ok} calls were made");

    // The watch opened on the old certificate goes on.
    dir.client
        .register("emitter", "after", &spec(9000, Some(60_000)))
        .await
        .unwrap();
    let seen = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(e) = watch.next().await {
            if let Ok(WatchEvent::Upsert { instance, .. }) = e {
                return instance.id.to_string();
            }
        }
        String::new()
    })
    .await
    .expect("the watch to deliver the registration");
    assert_eq!(seen, "after");
}

#[tokio::test]
async fn a_directory_reaches_etcd_members_over_tls_with_a_client_certificate() {
    assert!(
        baker_tests::require(baker_tests::Needs::Etcd),
        "this test needs etcd, and BAKER_TEST_SKIP names it"
    );
    let pki = Pki::new("etcd");
    let member = pki.server("member");
    let client = pki.server("client");
    let data = tempfile::tempdir().unwrap();
    let (client_port, peer_port) = (free_port(), free_port());
    let client_url = format!("https://127.0.0.1:{client_port}");
    let peer_url = format!("http://127.0.0.1:{peer_port}");
    let _etcd = Proc::spawn(
        "etcd-tls",
        baker_tests::etcd::etcd_bin(),
        &[
            "--name",
            "tls",
            "--data-dir",
            data.path().to_str().unwrap(),
            "--listen-client-urls",
            &client_url,
            "--advertise-client-urls",
            &client_url,
            "--listen-peer-urls",
            &peer_url,
            "--initial-advertise-peer-urls",
            &peer_url,
            "--initial-cluster",
            &format!("tls={peer_url}"),
            "--cert-file",
            member.cert.to_str().unwrap(),
            "--key-file",
            member.key.to_str().unwrap(),
            "--client-cert-auth",
            "--trusted-ca-file",
            pki.ca.to_str().unwrap(),
            "--logger",
            "zap",
            "--log-level",
            "warn",
        ],
        &[],
    );
    let store = format!("etcds://127.0.0.1:{client_port}/baker");
    let ca = pki.ca.to_str().unwrap();
    let dir = TestDirectory::start(&[
        ("BAKER_STORE", store.as_str()),
        ("BAKER_ETCD_CA", ca),
        ("BAKER_ETCD_CERT", client.cert.to_str().unwrap()),
        ("BAKER_ETCD_KEY", client.key.to_str().unwrap()),
    ])
    .await;
    eventually(
        Duration::from_secs(20),
        "a registration to be stored in etcd over TLS",
        || async {
            dir.client
                .register("emitter", "e1", &spec(9001, Some(60_000)))
                .await
                .ok()
        },
    )
    .await;
    let replica = dir.replica().await;
    eventually(
        Duration::from_secs(10),
        "a second replica to read it from etcd over TLS",
        || async {
            let s = replica.client.service("emitter").await.ok()?;
            (s.instances.len() == 1).then_some(())
        },
    )
    .await;

    // Without the client certificate, the member refuses the replica: its writes fail.
    let refused =
        TestDirectory::start(&[("BAKER_STORE", store.as_str()), ("BAKER_ETCD_CA", ca)]).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(refused
        .client
        .register("emitter", "e2", &spec(9002, Some(60_000)))
        .await
        .is_err());
}
