//! End-to-end: the operator's view. Ambassadors report to a real directory, `--wait` returns
//! once every live ambassador's HAProxy runs a change, and traffic adds up across ambassadors.

use std::time::Duration;

use baker_client::ops::AmbassadorsResponse;
use baker_tests::ambassador::TestAmbassador;
use baker_tests::cli::baker;
use baker_tests::directory::TestDirectory;
use baker_tests::greeting::{register, Greeting};
use baker_tests::{eventually, require, Needs};
use nix::sys::signal::Signal;

const DEADLINE: Duration = Duration::from_secs(20);
const TTL_MS: u64 = 600_000;

/// The `instance` field of one greeting through `url`.
async fn instance_behind(http: &reqwest::Client, url: &str) -> String {
    let v: serde_json::Value = http
        .get(format!("{url}/greeting"))
        .send()
        .await
        .and_then(|r| r.error_for_status())
        .unwrap_or_else(|e| panic!("GET {url}/greeting: {e}"))
        .json()
        .await
        .expect("a greeting");
    v["instance"].as_str().unwrap_or_default().to_owned()
}

#[tokio::test]
async fn ambassadors_report_and_wait_returns_once_every_one_applied_the_change() {
    if !require(Needs::Haproxy) {
        return;
    }
    let dir = TestDirectory::start(&[]).await;
    let (g1, g2) = (
        Greeting::start("1", "g1").await,
        Greeting::start("2", "g2").await,
    );
    register(&dir.client, "greeting", &g1, "g1", "1", TTL_MS).await;
    register(&dir.client, "greeting", &g2, "g2", "2", TTL_MS).await;
    let a = TestAmbassador::start(&dir.url, &["greeting"], &[("BAKER_ID", "amb-a")]).await;
    let b = TestAmbassador::start(&dir.url, &["greeting"], &[("BAKER_ID", "amb-b")]).await;

    let listed: AmbassadorsResponse =
        eventually(DEADLINE, "both ambassadors caught up", || async {
            let r = dir.client.ambassadors().await.ok()?;
            (r.ambassadors.len() == 2 && r.ambassadors.iter().all(|a| a.live && a.caught_up))
                .then_some(r)
        })
        .await;
    assert_eq!(listed.ambassadors[0].id, "amb-a");
    assert_eq!(listed.ambassadors[0].report.applied_index, listed.index);
    assert_eq!(
        listed.ambassadors[0].report.services[0].port,
        Some(a.ports["greeting"])
    );
    let table = baker(&dir.url, None, &["ambassadors"]).await.ok();
    assert!(table.stdout.starts_with("ID "), "{table:#?}");
    assert_eq!(
        table.stdout.matches("caught-up").count(),
        2,
        "{}",
        table.stdout
    );

    // Traffic through both ambassadors adds up per instance.
    let http = reqwest::Client::new();
    for _ in 0..10 {
        instance_behind(&http, &a.url("greeting")).await;
        instance_behind(&http, &b.url("greeting")).await;
    }
    eventually(
        DEADLINE,
        "20 requests counted over both ambassadors",
        || async {
            let r = dir.client.ambassadors().await.ok()?;
            let g = r.traffic.get("greeting")?;
            let total: u64 = g.values().map(|t| t.requests).sum();
            (total == 20 && g.values().all(|t| t.ambassadors == 2 && t.up == 2)).then_some(())
        },
    )
    .await;
    let traffic = baker(&dir.url, None, &["traffic", "greeting"]).await.ok();
    assert!(traffic.stdout.contains("2/2"), "{traffic:#?}");

    // Once --wait returns, every ambassador routes by the new split: no polling needed.
    for (split, want) in [("2=100", "g2"), ("1=100", "g1"), ("2=100", "g2")] {
        let run = baker(
            &dir.url,
            None,
            &["route", "set", "greeting", split, "--wait"],
        )
        .await
        .ok();
        assert!(
            run.stderr
                .contains("applied by 2 ambassador(s): amb-a, amb-b"),
            "{run:#?}"
        );
        for amb in [&a, &b] {
            for _ in 0..5 {
                assert_eq!(instance_behind(&http, &amb.url("greeting")).await, want);
            }
        }
    }

    // A stopped ambassador is waited for until the timeout, and named.
    b.proc.signal(Signal::SIGSTOP);
    let run = baker(
        &dir.url,
        None,
        &[
            "route",
            "set",
            "greeting",
            "1=100",
            "--wait",
            "--timeout",
            "1s",
        ],
    )
    .await;
    b.proc.signal(Signal::SIGCONT);
    assert_eq!(run.code, 1, "{run:#?}");
    assert!(
        run.stderr
            .contains("1 live ambassador(s) had not applied it: amb-b on "),
        "{run:#?}"
    );
    assert!(!run.stderr.contains("amb-a"), "{run:#?}");

    // An ambassador that stops signs off.
    b.proc.term();
    eventually(DEADLINE, "amb-b gone from the list", || async {
        let r = dir.client.ambassadors().await.ok()?;
        (r.ambassadors.len() == 1 && r.ambassadors[0].id == "amb-a").then_some(())
    })
    .await;
}
