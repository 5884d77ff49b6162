//! End-to-end: the dashboard (`GET /ui`) in a real headless Chromium, against a real directory,
//! ambassador and HAProxy. The page follows the table without a reload, is read-only without
//! the token, changes routes (and drains instances) with it, and what it changes takes effect
//! on the ambassador; values from the table are shown as text, never run as script. It fits a
//! phone's width (every column and button in reach), says which replica and store it shows,
//! gives each instance its age in the directory, and explains a route's share that goes to a
//! version with no live instance. With closed reads it shows nothing until a token that reads
//! is given, and says what the token may do. The tests write screenshots of the page to `target/ui/`
//! (`dashboard.png`, `routes.png`, `phone.png`, `tablet.png`, `about.png`).

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use baker_client::model::InstanceSpec;
use baker_client::DirectoryClient;
use baker_tests::ambassador::TestAmbassador;
use baker_tests::browser::{artefacts, Browser, Page};
use baker_tests::directory::{on_etcd, TestDirectory};
use baker_tests::greeting::Greeting;
use baker_tests::load::greet;
use baker_tests::{eventually, require, Needs};

const TOKEN: &str = "s3cret-ui";
const WAIT: Duration = Duration::from_secs(15);

/// Registers `g` as greeting/`id` of `version`, tagged.
async fn register(client: &DirectoryClient, id: &str, version: &str, g: &Greeting) {
    let mut spec = g.spec(version, 120_000);
    spec.tags = vec!["blue".into()];
    client
        .register("greeting", id, &spec)
        .await
        .unwrap_or_else(|e| panic!("registering greeting/{id}: {e}"));
}

/// `n` answers through the ambassador: the instances that gave them.
async fn answers(url: &str, n: usize) -> Vec<String> {
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(5))
        .build()
        .expect("an HTTP client");
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(
            greet(&http, url)
                .await
                .unwrap_or_else(|e| format!("failed: {e}")),
        );
    }
    out
}

/// Waits until `n` answers in a row through the ambassador came from `expected` only, and
/// from each of them.
async fn wait_served_by(url: &str, expected: &[&str], what: &str) {
    let expected: BTreeSet<String> = expected.iter().map(|s| s.to_string()).collect();
    eventually(WAIT, what, || async {
        let got: BTreeSet<String> = answers(url, 30).await.into_iter().collect();
        (got == expected).then_some(())
    })
    .await;
}

/// The selector of an instance's row.
fn row(id: &str) -> String {
    format!("[data-service=\"greeting\"] tr[data-id=\"{id}\"]")
}

/// Waits until the page shows instance `id`'s row.
async fn wait_for_row(page: &Page, id: &str, what: &str) {
    page.wait_for(
        &format!("document.querySelector('{}')", row(id)),
        WAIT,
        what,
    )
    .await;
}

/// Types `token` into the page's token field and unlocks with it.
async fn unlock(page: &Page, token: &str) {
    page.type_into("#token", token).await;
    page.click("#unlock").await;
}

/// The instances of the dashboard tests: greeting-1 and greeting-2 of version 1, greeting-3 of
/// version 2, behind a directory that requires [`TOKEN`] and an ambassador routing them.
struct Fleet {
    /// Fields drop in order: the ambassador first, the directory last.
    _amb: TestAmbassador,
    greetings: [Greeting; 3],
    dir: TestDirectory,
    /// `/greeting` through the ambassador.
    url: String,
}

/// Each instance's id and version.
const INSTANCES: [(&str, &str); 3] = [
    ("greeting-1", "1"),
    ("greeting-2", "1"),
    ("greeting-3", "2"),
];

impl Fleet {
    /// Starts it with the first `registered` instances registered, once the ambassador serves
    /// those.
    async fn start(registered: usize) -> Fleet {
        let dir = TestDirectory::start(&[("BAKER_TOKEN", TOKEN)]).await;
        let greetings = [
            Greeting::start(INSTANCES[0].1, INSTANCES[0].0).await,
            Greeting::start(INSTANCES[1].1, INSTANCES[1].0).await,
            Greeting::start(INSTANCES[2].1, INSTANCES[2].0).await,
        ];
        for (&(id, version), g) in INSTANCES.iter().zip(&greetings).take(registered) {
            register(&dir.client, id, version, g).await;
        }
        // In a zone none of the instances is in: every request leaves it.
        let amb = TestAmbassador::start(
            &dir.url,
            &["greeting"],
            &[("BAKER_TOKEN", TOKEN), ("BAKER_ZONE", "z1")],
        )
        .await;
        let url = format!("{}/greeting", amb.url("greeting"));
        let serving: Vec<&str> = INSTANCES[..registered].iter().map(|i| i.0).collect();
        wait_served_by(&url, &serving, "the ambassador to serve").await;
        Fleet {
            _amb: amb,
            greetings,
            dir,
            url,
        }
    }

    /// Registers instance `i` (0 to 2) under its id and version.
    async fn register(&self, i: usize) {
        let (id, version) = INSTANCES[i];
        register(&self.dir.client, id, version, &self.greetings[i]).await;
    }
}

async fn open_route_editor(page: &Page) {
    page.wait_for(
        "!document.querySelector('button[data-action=route][data-service=greeting]').disabled",
        WAIT,
        "the route button to be enabled",
    )
    .await;
    page.click("button[data-action=route][data-service=greeting]")
        .await;
    page.wait_for(
        "document.getElementById('route-dialog').open",
        WAIT,
        "the route editor to open",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_follows_the_table_and_changes_routes_with_the_token() {
    if !require(Needs::Haproxy) || !require(Needs::Chromium) {
        return;
    }
    let fleet = Fleet::start(2).await;
    let (dir, url) = (&fleet.dir, &fleet.url);

    let browser = Browser::start(1440, 1000).await;
    let page = browser.open(&format!("{}/ui", dir.url)).await;
    wait_for_row(&page, "greeting-2", "the instances").await;

    // Without the token: read-only, and it says so; the controls are disabled.
    assert_eq!(page.text("#mode").await, "read-only");
    assert!(
        page.text("#notice").await.contains("Read-only"),
        "{}",
        page.text("#notice").await
    );
    assert_eq!(
        page.eval("document.querySelector('button[data-action=route]').disabled")
            .await,
        true
    );
    assert_eq!(
        page.eval("document.querySelectorAll('button[data-action=drain]:not(:disabled), button[data-action=undrain]:not(:disabled)').length").await,
        0
    );
    page.click("button[data-action=route][data-service=greeting]")
        .await;
    assert_eq!(
        page.eval("document.getElementById('route-dialog').open")
            .await,
        false
    );

    // A new instance shows up without a reload, within a second.
    let registered = Instant::now();
    fleet.register(2).await;
    wait_for_row(&page, "greeting-3", "greeting-3 on the page").await;
    let shown = registered.elapsed();
    eprintln!("a new instance was on the page {shown:?} after its registration");
    assert!(shown < Duration::from_secs(1), "took {shown:?}");

    // A wrong token leaves the page read-only; the right one enables changes.
    unlock(&page, "not-the-token").await;
    page.wait_for(
        "document.getElementById('notice').innerText.includes('Wrong token')",
        WAIT,
        "the wrong token to be refused",
    )
    .await;
    assert_eq!(page.text("#mode").await, "read-only");
    unlock(&page, TOKEN).await;
    page.wait_for(
        "document.getElementById('mode').innerText === 'changes enabled'",
        WAIT,
        "changes to be enabled",
    )
    .await;
    assert_eq!(
        page.eval("sessionStorage.getItem('baker.token')").await,
        TOKEN,
        "the token is kept for the session"
    );

    // A route change from the page takes effect on the ambassador.
    open_route_editor(&page).await;
    page.type_into("#route-input", "1=50 2=20").await;
    page.click("#route-apply").await;
    page.wait_for(
        "!document.getElementById('route-error').hidden",
        WAIT,
        "the directory's refusal",
    )
    .await;
    let refusal = page.text("#route-error").await;
    assert!(refusal.contains("100"), "{refusal}");
    assert!(
        dir.client.routes().await.unwrap().routes.is_empty(),
        "a refused route changes nothing"
    );
    page.type_into("#route-input", "2=100").await;
    page.click("#route-apply").await;
    page.wait_for(
        "!document.getElementById('route-dialog').open",
        WAIT,
        "the editor to close",
    )
    .await;
    let routes = dir.client.routes().await.unwrap();
    assert_eq!(
        serde_json::to_value(&routes.routes["greeting"]).unwrap(),
        serde_json::json!({"2": 100})
    );
    wait_served_by(url, &["greeting-3"], "every answer from version 2").await;
    page.wait_for(
        "document.querySelector('[data-service=\"greeting\"] .bar').innerText.includes('100%')",
        WAIT,
        "the new split on the page",
    )
    .await;

    // Clearing the route from the page: every instance serves again.
    open_route_editor(&page).await;
    page.click("#route-clear").await;
    page.wait_for(
        "!document.getElementById('route-dialog').open",
        WAIT,
        "the editor to close",
    )
    .await;
    assert!(dir.client.routes().await.unwrap().routes.is_empty());
    wait_served_by(
        url,
        &["greeting-1", "greeting-2", "greeting-3"],
        "every instance to serve again",
    )
    .await;

    // The ambassador, caught up, its zone with none of its requests in it, and the traffic it
    // reports per instance.
    page.wait_for(
        "(() => { const a = document.querySelector('#ambassadors tr[data-ambassador]'); \
         return a && a.innerText.includes('caught up') \
         && /^zone z1 · (0% local|no requests)$/.test(a.querySelector('[data-zone=z1]')?.innerText); })()",
        WAIT,
        "the ambassador, caught up, in zone z1 with none of its requests local",
    )
    .await;
    page.wait_for(
        &format!(
            "(() => {{ const r = document.querySelector('{}'); \
             return r && r.querySelector('.pill-ok') && r.innerText.includes('up on 1/1') \
             && Number(r.children[5].innerText) > 0; }})()",
            row("greeting-3")
        ),
        WAIT,
        "greeting-3's health and traffic as the ambassador reports them",
    )
    .await;

    let shot = artefacts("ui").join("routes.png");
    page.screenshot(&shot).await;
    eprintln!("screenshot: {}", shot.display());
    assert_eq!(page.script_activity().await, Vec::<String>::new());
}

/// Text the model allows in a reason, written to break out of HTML if it were ever parsed.
const HOSTILE: &str =
    r#"<img src=x onerror=alert(1)></td><script>alert("r")</script> & 'q' {{ x }}"#;

/// `PUT /v1/maintenance/greeting/{what}` with `reason`, as an operator's client would.
async fn drain_by_api(dir: &TestDirectory, what: &str, reason: &str) -> reqwest::StatusCode {
    reqwest::Client::new()
        .put(format!("{}/v1/maintenance/greeting/{what}", dir.url))
        .bearer_auth(TOKEN)
        .json(&serde_json::json!({ "reason": reason }))
        .send()
        .await
        .expect("a drain call")
        .status()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_clicked_on_the_dashboard_takes_the_instance_out_of_rotation() {
    if !require(Needs::Haproxy) || !require(Needs::Chromium) {
        return;
    }
    let fleet = Fleet::start(3).await;
    let (dir, url) = (&fleet.dir, &fleet.url);

    let browser = Browser::start(1440, 1000).await;
    let page = browser.open(&format!("{}/ui", dir.url)).await;
    let drain2 = "button[data-action=drain][data-id=\"greeting-2\"]";
    page.wait_for(
        &format!("document.querySelector('{drain2}')"),
        WAIT,
        "the drain buttons",
    )
    .await;
    assert_eq!(
        page.eval(&format!("document.querySelector('{drain2}').disabled"))
            .await,
        true,
        "read-only without the token"
    );
    unlock(&page, TOKEN).await;
    page.wait_for(
        &format!("!document.querySelector('{drain2}').disabled"),
        WAIT,
        "drain to be enabled",
    )
    .await;

    // Drain greeting-2 from the page: the ambassador stops sending it requests.
    page.click(drain2).await;
    page.wait_for(
        "document.getElementById('drain-dialog').open",
        WAIT,
        "the drain dialog",
    )
    .await;
    page.type_into("#drain-reason", "kernel upgrade").await;
    page.click("#drain-apply").await;
    page.wait_for(
        "!document.getElementById('drain-dialog').open",
        WAIT,
        "the drain dialog to close",
    )
    .await;
    wait_served_by(
        url,
        &["greeting-1", "greeting-3"],
        "greeting-2 out of rotation",
    )
    .await;
    page.wait_for(
        &format!(
            "(() => {{ const r = document.querySelector('{}'); \
             return r && r.classList.contains('draining') && r.innerText.includes('kernel upgrade') \
             && r.innerText.includes('drain on 1/1') \
             && document.querySelector('[data-service=\"greeting\"] .bar').innerText.includes('v1 50%'); }})()",
            row("greeting-2")
        ),
        WAIT,
        "greeting-2 draining on the page, as the ambassador reports it, and out of the split",
    )
    .await;
    page.wait_for(
        "(() => { const t = document.getElementById('timeline'); \
         return !document.getElementById('history').hidden && t.innerText.includes('drained') \
         && t.innerText.includes('kernel upgrade') && t.innerText.includes('by BAKER_TOKEN (ui from'); })()",
        WAIT,
        "the drain in the history, from the page",
    )
    .await;
    let shot = artefacts("ui").join("dashboard.png");
    page.screenshot(&shot).await;
    eprintln!("screenshot: {}", shot.display());

    // Hostile text where the model allows text shows as text, and nothing runs.
    assert!(drain_by_api(dir, "instances/greeting-3", HOSTILE)
        .await
        .is_success());
    assert!(drain_by_api(dir, "versions/9?force=true", HOSTILE)
        .await
        .is_success());
    let refused = reqwest::Client::new()
        .put(format!(
            "{}/v1/services/%3Cb%3Ex%3C%2Fb%3E/instances/x",
            dir.url
        ))
        .bearer_auth(TOKEN)
        .json(&serde_json::json!({ "address": "127.0.0.1", "port": 1 }))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), reqwest::StatusCode::BAD_REQUEST);
    let shown = page
        .wait_for(
            &format!(
                "(() => {{ const r = document.querySelector('{} .reason'); return r && r.textContent; }})()",
                row("greeting-3")
            ),
            WAIT,
            "greeting-3's reason",
        )
        .await;
    assert_eq!(shown, HOSTILE);
    page.wait_for(
        &format!(
            "document.getElementById('timeline').textContent.split({}).length === 3",
            serde_json::json!(HOSTILE)
        ),
        WAIT,
        "both hostile reasons in the history, as text",
    )
    .await;
    assert_eq!(
        page.eval(
            "document.querySelectorAll('main img, main script, main iframe, main svg').length"
        )
        .await,
        0,
        "no element came from a reason"
    );
    assert!(!page.text("main").await.contains("<b>x</b>"));
    assert_eq!(page.script_activity().await, Vec::<String>::new());

    // Undrain from the page: greeting-2 serves again.
    page.click("button[data-action=undrain][data-id=\"greeting-2\"]")
        .await;
    wait_served_by(
        url,
        &["greeting-1", "greeting-2"],
        "greeting-2 back in rotation",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_watch_token_the_dashboard_reads_the_table_every_second() {
    if !require(Needs::Chromium) {
        return;
    }
    let dir =
        TestDirectory::start(&[("BAKER_TOKEN", TOKEN), ("BAKER_WATCH_TOKEN", "watch-only")]).await;
    let g1 = Greeting::start("1", "greeting-1").await;
    register(&dir.client, "greeting-1", "1", &g1).await;
    let browser = Browser::start(1280, 800).await;
    let page = browser.open(&format!("{}/ui", dir.url)).await;
    page.wait_for(
        "document.getElementById('live').innerText === 'polling'",
        WAIT,
        "the page to poll, the watch stream refusing it",
    )
    .await;
    wait_for_row(&page, "greeting-1", "greeting-1").await;
    let registered = Instant::now();
    register(&dir.client, "greeting-2", "1", &g1).await;
    wait_for_row(&page, "greeting-2", "greeting-2").await;
    let shown = registered.elapsed();
    eprintln!("polling: a new instance was on the page {shown:?} after its registration");
    assert!(shown < Duration::from_millis(2500), "took {shown:?}");

    // With the token, the page follows the watch stream again.
    unlock(&page, TOKEN).await;
    page.wait_for(
        "document.getElementById('live').innerText === 'live'",
        WAIT,
        "the page to follow the watch stream with the token",
    )
    .await;
    assert_eq!(page.script_activity().await, Vec::<String>::new());
}

/// An instance the directory holds but nobody serves: the page tests below need no HAProxy.
fn unserved(port: u64, version: &str, weight: u64, tags: &[&str]) -> InstanceSpec {
    InstanceSpec {
        address: "127.0.0.1".into(),
        port,
        version: Some(version.to_owned()),
        weight: Some(weight),
        tags: tags.iter().map(|t| t.to_string()).collect(),
        ttl_ms: Some(120_000),
        zone: None,
    }
}

/// The longest id the model allows, with nowhere to break it.
const LONG_ID: &str = "greeting_canary_eu_west_1a_7f9c6d5b4_xk2pq_replica_0042_abcdef";

/// The columns of an instance's row, as `data-label` names them.
const COLUMNS: [&str; 10] = [
    "Instance", "Version", "Weight", "State", "Health", "Requests", "Errors", "Source", "Zone",
    "Age",
];

/// What in the page lies outside the window's width: the page itself if it overflows, and
/// each cell of the instances' rows (and their drain buttons) that is empty or not wholly
/// inside `[0, innerWidth]`. Empty when everything is in reach.
async fn out_of_reach(page: &Page) -> Vec<String> {
    let expr = format!(
        "(() => {{ const out = []; const w = window.innerWidth; \
         const de = document.documentElement; \
         if (de.scrollWidth > w) out.push(`the page is ${{de.scrollWidth}} px wide in ${{w}}`); \
         const rows = document.querySelectorAll('[data-service] tr[data-id]'); \
         if (!rows.length) out.push('no instance row'); \
         const reach = (what, e) => {{ \
           if (!e) {{ out.push(`${{what}}: missing`); return; }} \
           const r = e.getBoundingClientRect(); \
           if (!(r.width > 0 && r.height > 0)) out.push(`${{what}}: empty box`); \
           else if (r.left < -0.5 || r.right > w + 0.5) \
             out.push(`${{what}}: ${{Math.round(r.left)}}..${{Math.round(r.right)}} in ${{w}}`); }}; \
         for (const row of rows) {{ \
           for (const c of {columns}) reach(`${{row.dataset.id}} ${{c}}`, row.querySelector(`td[data-label=\"${{c}}\"]`)); \
           reach(`${{row.dataset.id}} button`, row.querySelector('button[data-action]')); }} \
         return out; }})()",
        columns = serde_json::json!(COLUMNS),
    );
    serde_json::from_value(page.eval(&expr).await).expect("a list of strings")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_phone_every_column_and_the_drain_button_are_in_reach() {
    if !require(Needs::Chromium) {
        return;
    }
    let dir = TestDirectory::start(&[("BAKER_TOKEN", TOKEN)]).await;
    let tags = ["blue", "eu-west-1a", "canary_build_2024_11_05_rc3"];
    for (id, port, version, zone) in [
        (LONG_ID, 9001, "1", Some("eu-west-1a-rack-17")),
        ("greeting-2", 9002, "2", None),
    ] {
        let spec = InstanceSpec {
            zone: zone.map(str::to_owned),
            ..unserved(port, version, 100, &tags)
        };
        dir.client
            .register("greeting", id, &spec)
            .await
            .unwrap_or_else(|e| panic!("registering greeting/{id}: {e}"));
    }
    let browser = Browser::start(375, 800).await;
    let page = browser.open(&format!("{}/ui", dir.url)).await;
    page.resize(375, 800).await;
    wait_for_row(&page, LONG_ID, "the instances").await;
    wait_for_row(&page, "greeting-2", "the instances").await;
    for (id, zone) in [(LONG_ID, "eu-west-1a-rack-17"), ("greeting-2", "-")] {
        let cell = format!(
            "document.querySelector('{} td[data-label=Zone]').textContent",
            row(id)
        );
        assert_eq!(page.eval(&cell).await, zone, "the zone of {id}");
    }
    let drain = format!("button[data-action=drain][data-id=\"{LONG_ID}\"]");
    page.wait_for(
        &format!("document.querySelector('{drain}')"),
        WAIT,
        "the drain buttons",
    )
    .await;
    assert_eq!(out_of_reach(&page).await, Vec::<String>::new(), "at 375 px");

    // Unlocked with the token, Drain on the phone opens the dialog, inside the window, and drains.
    unlock(&page, TOKEN).await;
    page.wait_for(
        &format!("!document.querySelector('{drain}').disabled"),
        WAIT,
        "drain to be enabled",
    )
    .await;
    assert_eq!(
        out_of_reach(&page).await,
        Vec::<String>::new(),
        "unlocked at 375 px"
    );
    page.click(&drain).await;
    page.wait_for(
        "document.getElementById('drain-dialog').open",
        WAIT,
        "the drain dialog",
    )
    .await;
    assert_eq!(
        page.eval(
            "(() => { const r = document.getElementById('drain-dialog').getBoundingClientRect(); \
             const b = document.getElementById('drain-apply').getBoundingClientRect(); \
             return r.left >= 0 && r.right <= window.innerWidth && b.width > 0 \
             && b.right <= window.innerWidth; })()"
        )
        .await,
        true,
        "the drain dialog and its button fit the phone"
    );
    page.type_into("#drain-reason", "from a phone").await;
    page.click("#drain-apply").await;
    page.wait_for(
        &format!(
            "(() => {{ const r = document.querySelector('{}'); \
             return !document.getElementById('drain-dialog').open && r \
             && r.classList.contains('draining') && r.innerText.includes('from a phone'); }})()",
            row(LONG_ID)
        ),
        WAIT,
        "the long-named instance draining on the page",
    )
    .await;
    let drains = dir.client.maintenance().await.expect("the drains");
    assert!(
        drains
            .maintenance
            .iter()
            .any(|d| d.id.as_ref().is_some_and(|id| id.as_str() == LONG_ID)),
        "{drains:?}"
    );
    assert_eq!(
        out_of_reach(&page).await,
        Vec::<String>::new(),
        "drained at 375 px"
    );
    page.wait_for(
        "document.getElementById('live').innerText === 'live'",
        WAIT,
        "the page to follow the watch stream again after the unlock",
    )
    .await;
    let shot = artefacts("ui").join("phone.png");
    page.screenshot(&shot).await;
    eprintln!("screenshot: {}", shot.display());

    // A tablet's width: the table again, every column of it in reach.
    page.resize(800, 900).await;
    assert_eq!(out_of_reach(&page).await, Vec::<String>::new(), "at 800 px");
    let shot = artefacts("ui").join("tablet.png");
    page.screenshot(&shot).await;
    eprintln!("screenshot: {}", shot.display());
    assert_eq!(page.script_activity().await, Vec::<String>::new());
}

/// The ages the page shows in the Age column of `ids`' rows, in seconds (`fmtAge` writes
/// `12s` under a minute), once every one of them shows `weight` for the first.
async fn ages(page: &Page, ids: &[&str], first_weight: u64) -> Vec<u64> {
    let expr = format!(
        "(() => {{ const rows = {ids}.map((id) => document.querySelector(`[data-service=\"greeting\"] tr[data-id=\"${{id}}\"]`)); \
         if (rows.some((r) => !r)) return null; \
         if (rows[0].querySelector('td[data-label=Weight]').innerText.trim() !== '{first_weight}') return null; \
         const ages = rows.map((r) => r.querySelector('td[data-label=Age]').innerText.trim()); \
         return ages.every((a) => /^[0-9]+s$/.test(a)) ? ages : null; }})()",
        ids = serde_json::json!(ids),
    );
    let shown = page
        .wait_for(&expr, WAIT, "the ages of the instances")
        .await;
    let shown: Vec<String> = serde_json::from_value(shown).expect("a list of ages");
    shown
        .iter()
        .map(|a| a.trim_end_matches('s').parse().expect("seconds"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_names_its_replica_and_store_ages_instances_and_explains_dead_shares() {
    if !require(Needs::Chromium) {
        return;
    }
    let dir = TestDirectory::start(&[("BAKER_TOKEN", TOKEN)]).await;
    let old = unserved(9001, "1", 100, &[]);
    dir.client
        .register("greeting", "greeting-1", &old)
        .await
        .expect("registering greeting-1");
    let registered = Instant::now();
    // 25 % to version 3, which has no instance: the directory takes it only when forced.
    let route = [("1".to_owned(), 75), ("3".to_owned(), 25)].into();
    dir.client
        .set_route_forced("greeting", &route)
        .await
        .expect("a route with a share for version 3");
    let browser = Browser::start(1280, 900).await;
    let page = browser.open(&format!("{}/ui", dir.url)).await;
    wait_for_row(&page, "greeting-1", "greeting-1").await;

    // The header says which replica this is and where its table lives.
    let about = page.text("#about").await;
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .expect("the hostname")
        .trim()
        .to_owned();
    let port = dir.addr.port();
    assert!(
        about.contains(&format!("replica {hostname}:{port}")),
        "{about:?} names neither {hostname} nor {port}"
    );
    let store = if on_etcd() {
        "store etcd ("
    } else {
        "store memory (routes and drains kept in /"
    };
    assert!(about.contains(store), "{about:?} does not say {store:?}");

    // The share of version 3 says, on the bar and under it, what becomes of it.
    let note = page
        .wait_for(
            "(() => { const n = document.querySelector('[data-service=\"greeting\"] .dead-note'); \
             return n && n.innerText; })()",
            WAIT,
            "the note on version 3's share",
        )
        .await;
    assert_eq!(
        note,
        "25 % of greeting's traffic is routed to version 3, which has no live instance: the \
         ambassadors give that share to the route's other targets in proportion (v1 100 %) \
         until one of its instances registers."
    );
    let bar = page.text("[data-service=\"greeting\"] .bar").await;
    assert!(bar.contains("v3: no instance"), "{bar:?}");
    let shot = artefacts("ui").join("about.png");
    page.screenshot(&shot).await;
    eprintln!("screenshot: {}", shot.display());

    // The age is the time in the directory: a heartbeat and a change keep it. This wait is the
    // age the test needs greeting-1 to have, not a wait for a condition.
    tokio::time::sleep(Duration::from_millis(2500).saturating_sub(registered.elapsed())).await;
    dir.client
        .register("greeting", "greeting-1", &old)
        .await
        .expect("greeting-1's heartbeat");
    let changed = unserved(9001, "1", 7, &[]);
    dir.client
        .register("greeting", "greeting-1", &changed)
        .await
        .expect("greeting-1's new weight");
    dir.client
        .register("greeting", "greeting-2", &unserved(9002, "1", 100, &[]))
        .await
        .expect("registering greeting-2");
    let shown = ages(&page, &["greeting-1", "greeting-2"], 7).await;
    assert!(shown[0] >= 2, "greeting-1's age reset: {shown:?}");
    assert!(shown[1] <= 1, "greeting-2 is new: {shown:?}");
    let title = page
        .eval(
            "[...document.querySelectorAll('[data-service=\"greeting\"] th[title]')]\
             .find((th) => th.textContent === 'Age').title",
        )
        .await;
    assert!(
        title
            .as_str()
            .unwrap_or_default()
            .starts_with("how long it has been in the directory"),
        "{title}"
    );
    assert_eq!(page.script_activity().await, Vec::<String>::new());
}

#[tokio::test]
async fn with_closed_reads_the_page_asks_for_a_token_and_shows_what_it_may_do() {
    if !require(Needs::Chromium) {
        return;
    }
    let tokens = tempfile::NamedTempFile::new().unwrap();
    let line = baker_tests::secrets::token_line;
    let text = line("reader", "read", "*", "reader-ui-1")
        + &line("ops", "operate", "greeting", "ops-ui-2")
        + &line("root", "admin", "*", "root-ui-3");
    std::fs::write(tokens.path(), text).unwrap();
    let file = tokens.path().to_str().unwrap();
    let dir = TestDirectory::start(&[("BAKER_TOKENS", file), ("BAKER_READ", "token")]).await;
    let g1 = Greeting::start("1", "greeting-1").await;
    register(
        &dir.client_with_token(Some("root-ui-3")),
        "greeting-1",
        "1",
        &g1,
    )
    .await;

    let browser = Browser::start(1280, 800).await;
    let page = browser.open(&format!("{}/ui", dir.url)).await;
    page.wait_for(
        "document.getElementById('notice').innerText.includes('only to a token that reads')",
        WAIT,
        "the page to ask for a token that reads",
    )
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let none = format!("document.querySelector('{}') === null", row("greeting-1"));
    assert_eq!(
        page.eval(&none).await,
        true,
        "nothing is shown without a token"
    );

    // A token that reads shows the table, read-only, and says what it is.
    unlock(&page, "reader-ui-1").await;
    wait_for_row(&page, "greeting-1", "the table with the read token").await;
    assert_eq!(
        page.text("#mode").await,
        "read-only · token reader: read (*)"
    );
    // Taken back, the table goes with it.
    page.click("#lock").await;
    page.wait_for(&none, WAIT, "the table gone with the token")
        .await;
    // An operator's token shows the table and enables changes, within its scope.
    unlock(&page, "ops-ui-2").await;
    wait_for_row(&page, "greeting-1", "the table with the operate token").await;
    assert_eq!(
        page.text("#mode").await,
        "changes enabled · token ops: operate (greeting)"
    );
    assert_eq!(page.script_activity().await, Vec::<String>::new());
}
