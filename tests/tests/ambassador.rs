//! End-to-end: the ambassador with a real HAProxy, a real directory and greeting instances.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use baker_client::model::InstanceSpec;
use baker_client::DirectoryClient;
use baker_tests::ambassador::TestAmbassador;
use baker_tests::directory::{Heartbeats, TestDirectory};
use baker_tests::dns::SilentResolver;
use baker_tests::greeting::{register, Greeting};
use baker_tests::{eventually, require, Needs, Proc};

const TTL_MS: u64 = 60_000;

fn http(keep_alive: bool) -> reqwest::Client {
    let mut b = reqwest::Client::builder().timeout(Duration::from_secs(10));
    if !keep_alive {
        b = b.pool_max_idle_per_host(0);
    }
    b.build().expect("http client")
}

/// One GET; the greeting's `instance` and `version`, or why it failed.
async fn greet(client: &reqwest::Client, url: &str) -> Result<(String, String), String> {
    let resp = client.get(url).send().await.map_err(|e| format!("{e:?}"))?;
    let status = resp.status();
    if !status.is_success() {
        return Err(format!("status {status}"));
    }
    let v: serde_json::Value = resp.json().await.map_err(|e| format!("{e:?}"))?;
    Ok((
        v["instance"].as_str().unwrap_or_default().to_owned(),
        v["version"].as_str().unwrap_or_default().to_owned(),
    ))
}

/// Counts answers per instance over `n` requests.
async fn spread(url: &str, n: usize) -> BTreeMap<String, usize> {
    let c = http(true);
    let mut out = BTreeMap::new();
    for _ in 0..n {
        let (inst, _) = greet(&c, url)
            .await
            .expect("a request through the ambassador");
        *out.entry(inst).or_insert(0) += 1;
    }
    out
}

/// Requests in a loop from two clients, one keeping its connection alive and one opening a new
/// connection per request, until stopped.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failures: Arc<Mutex<Vec<String>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(url: String) -> Load {
        Load::paced(url, Duration::ZERO)
    }

    /// Like [`Load::start`], each client pausing `pause` after each request.
    fn paced(url: String, pause: Duration) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let tasks = [true, false]
            .into_iter()
            .map(|keep_alive| {
                let (stop, ok, failures, url) =
                    (stop.clone(), ok.clone(), failures.clone(), url.clone());
                tokio::spawn(async move {
                    let c = http(keep_alive);
                    while !stop.load(Ordering::Relaxed) {
                        match greet(&c, &url).await {
                            Ok(_) => {
                                ok.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(e) => failures.lock().unwrap().push(e),
                        }
                        if !pause.is_zero() {
                            tokio::time::sleep(pause).await;
                        }
                    }
                })
            })
            .collect();
        Load {
            stop,
            ok,
            failures,
            tasks,
        }
    }

    fn ok(&self) -> u64 {
        self.ok.load(Ordering::Relaxed)
    }

    /// Waits until `n` more requests succeeded (or any failed).
    async fn more(&self, n: u64) {
        let target = self.ok() + n;
        eventually(
            Duration::from_secs(30),
            "requests to go through",
            || async {
                (self.ok() >= target || !self.failures.lock().unwrap().is_empty()).then_some(())
            },
        )
        .await;
    }

    async fn finish(self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            let _ = t.await;
        }
        let failures = self.failures.lock().unwrap().clone();
        (self.ok.load(Ordering::Relaxed), failures)
    }
}

#[tokio::test]
async fn round_robin_and_shared_http_port() {
    if !require(Needs::Haproxy) {
        return;
    }
    let dir = TestDirectory::start(&[]).await;
    let mut gs = Vec::new();
    for i in 0..3 {
        let g = Greeting::start("1", &format!("e{i}")).await;
        register(&dir.client, "emitter", &g, &format!("e{i}"), "1", TTL_MS).await;
        gs.push(g);
    }
    let t = Greeting::start("1", "t0").await;
    register(&dir.client, "transform", &t, "t0", "1", TTL_MS).await;
    let amb = TestAmbassador::start(&dir.url, &["emitter", "transform"], &[]).await;

    let url = format!("{}/greeting", amb.url("emitter"));
    eventually(
        Duration::from_secs(5),
        "three emitter instances",
        || async { (spread(&url, 6).await.len() == 3).then_some(()) },
    )
    .await;
    let counts = spread(&url, 30).await;
    assert_eq!(
        counts.values().copied().collect::<Vec<_>>(),
        [10, 10, 10],
        "{counts:?}"
    );

    let c = http(true);
    let (inst, _) = greet(&c, &format!("{}/emitter/greeting", amb.http_url()))
        .await
        .unwrap();
    assert!(inst.starts_with('e'), "{inst}");
    let (inst, _) = greet(&c, &format!("{}/transform/greeting", amb.http_url()))
        .await
        .unwrap();
    assert_eq!(inst, "t0");
    let resp = c
        .get(format!("{}/nosuch/greeting", amb.http_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    // The admin port serves HAProxy's metrics and the ambassador's own.
    let metrics = c
        .get(format!("http://{}/metrics", amb.admin))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("haproxy_backend_active_servers"),
        "{metrics}"
    );
    let own = c
        .get(format!("http://{}/ambassador/metrics", amb.admin))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(own.contains("baker_ambassador_reloads_total 0"), "{own}");
}

#[tokio::test]
async fn membership_changes_apply_without_reload() {
    if !require(Needs::Haproxy) {
        return;
    }
    let dir = TestDirectory::start(&[]).await;
    let a = Greeting::start("1", "a").await;
    let b = Greeting::start("1", "b").await;
    register(&dir.client, "emitter", &a, "a", "1", TTL_MS).await;
    register(&dir.client, "emitter", &b, "b", "1", TTL_MS).await;
    let amb = TestAmbassador::start(&dir.url, &["emitter"], &[]).await;
    let url = format!("{}/greeting", amb.url("emitter"));
    eventually(Duration::from_secs(5), "both instances", || async {
        (spread(&url, 4).await.len() == 2).then_some(())
    })
    .await;
    let before = amb.proc_info();

    let c = Greeting::start("1", "c").await;
    register(&dir.client, "emitter", &c, "c", "1", TTL_MS).await;
    let added = std::time::Instant::now();
    eventually(
        Duration::from_secs(1),
        "the new instance to receive traffic",
        || async { spread(&url, 3).await.contains_key("c").then_some(()) },
    )
    .await;
    eprintln!("new instance served after {:?}", added.elapsed());

    dir.client.deregister("emitter", "a").await.unwrap();
    eventually(
        Duration::from_secs(1),
        "the removed instance to get no traffic",
        || async { (!spread(&url, 20).await.contains_key("a")).then_some(()) },
    )
    .await;
    // Deletion waits for the drained server to be idle: allow for a loaded machine.
    eventually(
        Duration::from_secs(15),
        "the removed server to be deleted",
        || async { (!amb.servers("emitter").contains_key("a")).then_some(()) },
    )
    .await;
    let after = amb.proc_info();
    assert_eq!(
        after, before,
        "HAProxy must not reload for membership changes"
    );
    assert_eq!(after.reloads, 0);
}

#[tokio::test]
async fn no_failed_requests_when_instances_die() {
    if !require(Needs::Haproxy) {
        return;
    }
    let dir = TestDirectory::start(&[]).await;
    let mut killed = Greeting::start("1", "killed").await;
    let stable = Greeting::start("1", "stable").await;
    let mut graceful = Greeting::start("1", "graceful").await;
    register(&dir.client, "emitter", &killed, "killed", "1", TTL_MS).await;
    register(&dir.client, "emitter", &stable, "stable", "1", TTL_MS).await;
    let target = graceful.url();
    let mut registrar = Proc::baker(
        "registrar",
        "baker-registrar",
        &[
            ("BAKER_DIRECTORY", dir.url.as_str()),
            ("BAKER_SERVICE", "emitter"),
            ("BAKER_ID", "graceful"),
            ("BAKER_TARGET", target.as_str()),
            ("BAKER_INTERVAL", "500ms"),
        ],
    );
    registrar
        .wait_for_log("is now up", Duration::from_secs(10))
        .await;
    let amb = TestAmbassador::start(&dir.url, &["emitter"], &[]).await;
    let url = format!("{}/greeting", amb.url("emitter"));
    eventually(Duration::from_secs(5), "three instances", || async {
        (spread(&url, 6).await.len() == 3).then_some(())
    })
    .await;

    let load = Load::start(url.clone());
    load.more(500).await;
    killed.proc.kill9();
    load.more(700).await;
    // Graceful stop: the registrar deregisters first, then the app stops.
    registrar.term();
    registrar.wait_exit(Duration::from_secs(10)).await;
    load.more(300).await;
    graceful.exit().await;
    load.more(700).await;
    let (ok, failures) = load.finish().await;
    assert!(ok >= 2000, "only {ok} requests");
    assert!(
        failures.is_empty(),
        "{} failed requests of {}: {:?}",
        failures.len(),
        ok,
        &failures[..failures.len().min(5)]
    );
    assert_eq!(amb.proc_info().reloads, 0);
}

#[tokio::test]
async fn canary_split_then_even_again() {
    if !require(Needs::Haproxy) {
        return;
    }
    let dir = TestDirectory::start(&[]).await;
    let mut gs = Vec::new();
    for (id, v) in [("v1a", "1"), ("v1b", "1"), ("v2a", "2")] {
        let g = Greeting::start(v, id).await;
        register(&dir.client, "emitter", &g, id, v, TTL_MS).await;
        gs.push(g);
    }
    let amb = TestAmbassador::start(&dir.url, &["emitter"], &[]).await;
    let url = format!("{}/greeting", amb.url("emitter"));
    eventually(Duration::from_secs(5), "three instances", || async {
        (spread(&url, 6).await.len() == 3).then_some(())
    })
    .await;
    dir.client
        .set_route(
            "emitter",
            &[("1".to_string(), 90), ("2".to_string(), 10)].into(),
        )
        .await
        .unwrap();
    // Wait for the split to be applied: version 2 no longer gets a third of the traffic.
    let c = http(true);
    eventually(Duration::from_secs(3), "the route to apply", || async {
        let mut v2 = 0;
        for _ in 0..30 {
            if greet(&c, &url).await.unwrap().1 == "2" {
                v2 += 1;
            }
        }
        (v2 <= 6).then_some(())
    })
    .await;
    let mut versions: BTreeMap<String, u32> = BTreeMap::new();
    for _ in 0..2000 {
        *versions
            .entry(greet(&c, &url).await.unwrap().1)
            .or_default() += 1;
    }
    let share = |v: &str| f64::from(versions.get(v).copied().unwrap_or(0)) / 20.0;
    assert!((share("1") - 90.0).abs() <= 3.0, "{versions:?}");
    assert!((share("2") - 10.0).abs() <= 3.0, "{versions:?}");

    dir.client.clear_route("emitter").await.unwrap();
    eventually(Duration::from_secs(3), "even traffic again", || async {
        let s = spread(&url, 30).await;
        (s.len() == 3 && s.values().all(|&n| n == 10)).then_some(())
    })
    .await;
    assert_eq!(amb.proc_info().reloads, 0);
}

/// A page's text, or an empty string when it cannot be fetched.
async fn page(url: &str) -> String {
    match reqwest::get(url).await {
        Ok(resp) => resp.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    }
}

#[tokio::test]
async fn a_route_to_a_version_with_no_instance_falls_back_to_the_live_ones() {
    if !require(Needs::Haproxy) {
        return;
    }
    let dir = TestDirectory::start(&[]).await;
    let mut gs = Vec::new();
    for (id, v) in [("v1", "1"), ("v2", "2")] {
        let g = Greeting::start(v, id).await;
        register(&dir.client, "emitter", &g, id, v, TTL_MS).await;
        gs.push(g);
    }
    let amb = TestAmbassador::start(&dir.url, &["emitter"], &[]).await;
    let url = format!("{}/greeting", amb.url("emitter"));
    eventually(Duration::from_secs(5), "two instances", || async {
        (spread(&url, 4).await.len() == 2).then_some(())
    })
    .await;

    // Version 3 has no instance: the route is set aside rather than answering 503.
    dir.client
        .set_route_forced("emitter", &[("3".to_owned(), 100)].into())
        .await
        .unwrap();
    let own = format!("http://{}/ambassador/metrics", amb.admin);
    eventually(
        Duration::from_secs(5),
        "the ambassador to fall back",
        || async {
            page(&own)
                .await
                .contains("baker_ambassador_route_fallback{service=\"emitter\"} 1")
                .then_some(())
        },
    )
    .await;
    // Every request is answered (spread panics on a failure), by both live instances.
    let s = spread(&url, 40).await;
    assert_eq!(s.keys().collect::<Vec<_>>(), ["v1", "v2"], "{s:?}");
    assert!(amb
        .proc
        .log_text()
        .contains("falling back to all live instances"));
    let metrics = page(&format!("{}/metrics", dir.url)).await;
    assert!(
        metrics.contains("baker_directory_routes_falling_back 1"),
        "{metrics}"
    );
    assert!(dir
        .proc
        .log_text()
        .contains("falls back to all its live instances"));

    // Once version 3 registers, the route applies: it takes all the traffic.
    let g = Greeting::start("3", "v3").await;
    register(&dir.client, "emitter", &g, "v3", "3", TTL_MS).await;
    gs.push(g);
    eventually(Duration::from_secs(5), "version 3 only", || async {
        (spread(&url, 10).await.keys().collect::<Vec<_>>() == ["v3"]).then_some(())
    })
    .await;
    assert!(page(&own)
        .await
        .contains("baker_ambassador_route_fallback{service=\"emitter\"} 0"));
    let metrics = page(&format!("{}/metrics", dir.url)).await;
    assert!(
        metrics.contains("baker_directory_routes_falling_back 0"),
        "{metrics}"
    );
    assert_eq!(amb.proc_info().reloads, 0);
}

#[tokio::test]
async fn directory_loss_and_empty_restart_keep_live_servers() {
    if !require(Needs::Haproxy) {
        return;
    }
    // Memory only, whatever BAKER_TEST_STORE says: the subject is a directory that restarts
    // with an empty table, which a directory on etcd never does (its table outlives it).
    let mut dir = TestDirectory::start(&[("BAKER_STORE", "memory")]).await;
    let a = Greeting::start("1", "a").await;
    let b = Greeting::start("1", "b").await;
    let c = Greeting::start("1", "c").await;
    // Every instance heartbeats with a 3 s TTL, as its registrar would; the ambassador's grace
    // after a fresh snapshot is that TTL.
    let heartbeats = Heartbeats::start(
        dir.client.clone(),
        "emitter",
        Duration::from_millis(500),
        vec![("a", a.spec("1", 3000)), ("b", b.spec("1", 3000))],
    );
    let amb = TestAmbassador::start(&dir.url, &["emitter"], &[]).await;
    let url = format!("{}/greeting", amb.url("emitter"));
    eventually(Duration::from_secs(5), "two instances", || async {
        (spread(&url, 4).await.len() == 2).then_some(())
    })
    .await;

    let load = Load::start(url.clone());
    load.more(300).await;
    // "b" stops heartbeating when the directory dies: the new directory never hears of it.
    heartbeats.remove("b");
    dir.kill9();
    load.more(700).await;
    assert_eq!(
        amb.servers("emitter").len(),
        2,
        "the last known servers stay"
    );
    dir.restart().await;
    heartbeats.add("c", c.spec("1", 3000));
    // Converges to the new table: "a" (heartbeating) and "c"; "b" leaves after the grace.
    eventually(Duration::from_secs(15), "the new table", || async {
        let s = amb.servers("emitter");
        (s.keys().map(String::as_str).collect::<Vec<_>>() == ["a", "c"]).then_some(())
    })
    .await;
    load.more(300).await;
    let (ok, failures) = load.finish().await;
    heartbeats.stop().await;
    assert!(
        failures.is_empty(),
        "{} failed of {ok}: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    let log = amb.proc.log_text();
    assert!(
        !log.contains("draining a server that left the directory backend=emitter server=a"),
        "a live server was dropped:\n{log}"
    );
    assert!(log.contains("keeping it for"), "{log}");
    assert_eq!(amb.proc_info().reloads, 0);
}

fn custom_template() -> String {
    let default = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../ambassador/templates/haproxy.cfg.tera"
    ))
    .expect("reading the default template");
    default.replace(
        "    balance {{ s.balance }}\n",
        "    balance {{ s.balance }}\n    http-response set-header X-Template custom if { always_true }\n",
    )
}

#[tokio::test]
async fn restart_with_a_new_service_and_template_override() {
    if !require(Needs::Haproxy) {
        return;
    }
    let dir = TestDirectory::start(&[]).await;
    let e = Greeting::start("1", "e").await;
    let t = Greeting::start("1", "t").await;
    register(&dir.client, "emitter", &e, "e", "1", TTL_MS).await;
    register(&dir.client, "transform", &t, "t", "1", TTL_MS).await;

    // A new service via restart, on the same ports.
    let mut amb = TestAmbassador::start(&dir.url, &["emitter"], &[]).await;
    let c = http(true);
    let url = format!("{}/greeting", amb.url("emitter"));
    eventually(Duration::from_secs(5), "emitter", || async {
        greet(&c, &url).await.ok()
    })
    .await;
    let status = amb.stop().await;
    assert!(
        status.success(),
        "the ambassador should stop cleanly: {status}\n{}",
        amb.proc.log_text()
    );
    let mut ports = amb.ports.clone();
    ports.insert("transform".into(), baker_tests::free_port());
    let http_port = amb.http_port;
    drop(amb);
    let amb =
        TestAmbassador::start_on(&dir.url, &["emitter", "transform"], ports, http_port, &[]).await;
    let c = http(true);
    for (svc, inst) in [("emitter", "e"), ("transform", "t")] {
        let url = format!("{}/greeting", amb.url(svc));
        let got = eventually(Duration::from_secs(5), svc, || async {
            greet(&c, &url).await.ok()
        })
        .await;
        assert_eq!(got.0, inst);
    }
    drop(amb);

    // A template override, then a broken one sent with SIGHUP: refused, the old one serves.
    let tdir = tempfile::tempdir().unwrap();
    let tpath = tdir.path().join("haproxy.cfg.tera");
    std::fs::write(&tpath, custom_template()).unwrap();
    let tp = tpath.display().to_string();
    let mut amb =
        TestAmbassador::start(&dir.url, &["emitter"], &[("BAKER_TEMPLATE", tp.as_str())]).await;
    let url = format!("{}/greeting", amb.url("emitter"));
    let resp = eventually(Duration::from_secs(5), "emitter", || async {
        c.get(&url)
            .send()
            .await
            .ok()
            .filter(|r| r.status().is_success())
    })
    .await;
    assert_eq!(resp.headers()["x-template"], "custom");
    let before = amb.proc_info();
    std::fs::write(
        &tpath,
        custom_template().replace(
            "balance {{ s.balance }}",
            "balance {{ s.balance }}\n    no-such-keyword here",
        ),
    )
    .unwrap();
    amb.proc.signal(nix::sys::signal::Signal::SIGHUP);
    let line = amb
        .proc
        .wait_for_log(
            "refused the new HAProxy configuration",
            Duration::from_secs(10),
        )
        .await;
    assert!(
        line.contains("no-such-keyword"),
        "HAProxy's message should be shown: {line}"
    );
    std::fs::write(&tpath, "{% for %}").unwrap();
    amb.proc.signal(nix::sys::signal::Signal::SIGHUP);
    amb.proc
        .wait_for_log("refused the template", Duration::from_secs(10))
        .await;
    let resp = c.get(&url).send().await.unwrap();
    assert!(resp.status().is_success());
    assert_eq!(resp.headers()["x-template"], "custom");
    assert_eq!(amb.proc_info(), before, "no reload happened");
    amb.stop().await;

    // A broken template at start: exit 64 with HAProxy's message.
    std::fs::write(
        &tpath,
        custom_template().replace(
            "balance {{ s.balance }}",
            "balance {{ s.balance }}\n    no-such-keyword here",
        ),
    )
    .unwrap();
    let rd = tempfile::tempdir().unwrap();
    let run = rd.path().display().to_string();
    let port = baker_tests::free_port().to_string();
    let routes = format!("emitter={port}");
    let mut bad = Proc::baker(
        "ambassador-bad",
        "baker-ambassador",
        &[
            ("BAKER_DIRECTORY", dir.url.as_str()),
            ("BAKER_ROUTES", routes.as_str()),
            ("BAKER_ADMIN", "off"),
            ("BAKER_BIND", "127.0.0.1"),
            ("BAKER_RUN_DIR", run.as_str()),
            ("BAKER_TEMPLATE", tp.as_str()),
        ],
    );
    let status = bad.wait_exit(Duration::from_secs(10)).await;
    assert_eq!(status.code(), Some(64), "{}", bad.log_text());
    assert!(
        bad.log_text().contains("no-such-keyword"),
        "{}",
        bad.log_text()
    );
}

#[tokio::test]
async fn bad_configuration_is_reported_all_at_once() {
    let mut p = Proc::baker(
        "ambassador",
        "baker-ambassador",
        &[
            ("BAKER_ROUTES", "Emitter=8000,x=0"),
            ("BAKER_ADMIN", "nope"),
            ("BAKER_CHECKS", "sometimes"),
        ],
    );
    let status = p.wait_exit(Duration::from_secs(10)).await;
    assert_eq!(status.code(), Some(64));
    let log = p.log_text();
    for v in [
        "BAKER_ROUTES",
        "BAKER_ADMIN",
        "BAKER_CHECKS",
        "Emitter",
        "x: port",
    ] {
        assert!(log.contains(v), "{v} missing from:\n{log}");
    }
}

#[tokio::test]
async fn haproxy_killed_is_restarted() {
    if !require(Needs::Haproxy) {
        return;
    }
    let dir = TestDirectory::start(&[]).await;
    let g = Greeting::start("1", "g").await;
    register(&dir.client, "emitter", &g, "g", "1", TTL_MS).await;
    let mut amb = TestAmbassador::start(&dir.url, &["emitter"], &[]).await;
    let url = format!("{}/greeting", amb.url("emitter"));
    let c = http(false);
    eventually(Duration::from_secs(5), "traffic", || async {
        greet(&c, &url).await.ok()
    })
    .await;
    let pid: i32 = std::fs::read_to_string(amb.run_dir().join("haproxy.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    amb.proc
        .wait_for_log("HAProxy is running again", Duration::from_secs(15))
        .await;
    eventually(Duration::from_secs(5), "traffic again", || async {
        greet(&c, &url).await.ok()
    })
    .await;
    let status = amb.stop().await;
    assert!(status.success(), "{status}\n{}", amb.proc.log_text());
}

#[tokio::test]
async fn forced_reloads_for_benchmarks() {
    if !require(Needs::Haproxy) {
        return;
    }
    let dir = TestDirectory::start(&[]).await;
    let a = Greeting::start("1", "a").await;
    let b = Greeting::start("1", "b").await;
    register(&dir.client, "emitter", &a, "a", "1", TTL_MS).await;
    let amb =
        TestAmbassador::start(&dir.url, &["emitter"], &[("BAKER_BENCH_FORCE_RELOAD", "1")]).await;
    let url = format!("{}/greeting", amb.url("emitter"));
    eventually(Duration::from_secs(5), "traffic", || async {
        spread(&url, 2).await.contains_key("a").then_some(())
    })
    .await;
    let before = amb.proc_info();
    register(&dir.client, "emitter", &b, "b", "1", TTL_MS).await;
    eventually(Duration::from_secs(5), "the new instance", || async {
        spread(&url, 4).await.contains_key("b").then_some(())
    })
    .await;
    let after = amb.proc_info();
    assert_eq!(after.reloads, before.reloads + 1, "one reload per change");
    assert_ne!(after.worker, before.worker);
}

#[tokio::test]
async fn grace_is_per_service_and_ends_one_ttl_after_the_directory_is_back() {
    if !require(Needs::Haproxy) {
        return;
    }
    // Memory only, whatever BAKER_TEST_STORE says: the subject is a directory that restarts
    // with an empty table, which a directory on etcd never does (its table outlives it).
    let mut dir = TestDirectory::start(&[("BAKER_STORE", "memory")]).await;
    let a = Greeting::start("1", "a").await;
    let b = Greeting::start("1", "b").await;
    // A day-long TTL in a service this ambassador does not route must not matter.
    let far = Greeting::start("1", "far").await;
    register(&dir.client, "elsewhere", &far, "far", "1", 86_400_000).await;
    const EMITTER_TTL: Duration = Duration::from_millis(2000);
    let ttl_ms = EMITTER_TTL.as_millis() as u64;
    let heartbeats = Heartbeats::start(
        dir.client.clone(),
        "emitter",
        Duration::from_millis(300),
        vec![("a", a.spec("1", ttl_ms)), ("b", b.spec("1", ttl_ms))],
    );
    let amb = TestAmbassador::start(&dir.url, &["emitter"], &[]).await;
    let url = format!("{}/greeting", amb.url("emitter"));
    eventually(Duration::from_secs(5), "two instances", || async {
        (spread(&url, 4).await.len() == 2).then_some(())
    })
    .await;

    // "b" stops with the directory; the restarted directory hears only of "a".
    heartbeats.remove("b");
    dir.kill9();
    dir.restart().await;
    let back = std::time::Instant::now();
    eventually(
        Duration::from_secs(10),
        "the instance that did not come back to be drained",
        || async {
            (amb.servers("emitter").get("b").map(String::as_str) != Some("ready")).then_some(())
        },
    )
    .await;
    let held = back.elapsed();
    eprintln!("held for {held:?} after the directory came back");
    assert!(
        held >= EMITTER_TTL * 3 / 4,
        "dropped after {held:?}, before the directory had been up for the service's TTL"
    );
    assert_eq!(
        amb.servers("emitter").get("a").map(String::as_str),
        Some("ready")
    );
    heartbeats.stop().await;
    let log = amb.proc.log_text();
    assert!(log.contains("keeping it for the grace period"), "{log}");
}

#[tokio::test]
async fn a_restarted_ambassador_takes_over_the_running_haproxy() {
    if !require(Needs::Haproxy) {
        return;
    }
    let dir = TestDirectory::start(&[]).await;
    let a = Greeting::start("1", "a").await;
    let b = Greeting::start("1", "b").await;
    register(&dir.client, "emitter", &a, "a", "1", TTL_MS).await;
    register(&dir.client, "emitter", &b, "b", "1", TTL_MS).await;
    let mut amb = TestAmbassador::start(&dir.url, &["emitter"], &[]).await;
    let url = format!("{}/greeting", amb.url("emitter"));
    eventually(Duration::from_secs(5), "both instances", || async {
        (spread(&url, 4).await.len() == 2).then_some(())
    })
    .await;
    let (masters, _) = amb.haproxy_processes();
    assert_eq!(masters.len(), 1, "{masters:?}");

    let load = Load::start(url.clone());
    load.more(300).await;
    amb.proc.kill9();
    // HAProxy serves on its own meanwhile.
    load.more(300).await;
    amb.respawn().await;
    load.more(500).await;
    // The new ambassador manages the HAProxy it took over: a new instance gets traffic.
    let c = Greeting::start("1", "c").await;
    register(&dir.client, "emitter", &c, "c", "1", TTL_MS).await;
    eventually(Duration::from_secs(5), "the new instance", || async {
        spread(&url, 3).await.contains_key("c").then_some(())
    })
    .await;
    load.more(300).await;
    let (ok, failures) = load.finish().await;
    assert!(
        failures.is_empty(),
        "{} failed requests of {}: {:?}",
        failures.len(),
        ok,
        &failures[..failures.len().min(5)]
    );
    amb.proc
        .wait_for_log("took over the HAProxy", Duration::from_secs(1))
        .await;
    // One master, the same one; the old worker leaves once its connections are done.
    eventually(
        Duration::from_secs(15),
        "one HAProxy master and one worker",
        || async {
            let (m, all) = amb.haproxy_processes();
            (m == masters && all.len() == 2).then_some(())
        },
    )
    .await;
    let status = amb.stop().await;
    assert!(status.success(), "{status}\n{}", amb.proc.log_text());
    eventually(Duration::from_secs(10), "no HAProxy left", || async {
        amb.haproxy_processes().1.is_empty().then_some(())
    })
    .await;
}

/// Addresses listening on TCP `port` (IPv4 dotted, IPv6 as the kernel's hex), from /proc/net.
fn tcp_listeners(port: u16) -> Vec<String> {
    let mut out = Vec::new();
    for (file, v4) in [("/proc/net/tcp", true), ("/proc/net/tcp6", false)] {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let Some((addr, p)) = f.get(1).and_then(|a| a.split_once(':')) else {
                continue;
            };
            if f.get(3) != Some(&"0A") || u16::from_str_radix(p, 16) != Ok(port) {
                continue;
            }
            out.push(match (v4, u32::from_str_radix(addr, 16)) {
                (true, Ok(x)) => std::net::Ipv4Addr::from(x.to_le_bytes()).to_string(),
                _ => addr.to_owned(),
            });
        }
    }
    out.sort();
    out.dedup();
    out
}

#[tokio::test]
async fn the_admin_port_listens_on_loopback_only() {
    if !require(Needs::Haproxy) {
        return;
    }
    let dir = TestDirectory::start(&[]).await;
    // Service ports on every interface; the admin port given as a bare port, as by default.
    let amb = TestAmbassador::start(&dir.url, &["emitter"], &[("BAKER_BIND", "0.0.0.0")]).await;
    assert_eq!(amb.admin.ip().to_string(), "127.0.0.1", "{}", amb.admin);
    assert_eq!(tcp_listeners(amb.admin.port()), ["127.0.0.1"]);
    assert_eq!(tcp_listeners(amb.ports["emitter"]), ["0.0.0.0"]);
    let status = http(false)
        .get(format!("http://{}/ambassador/status", amb.admin))
        .send()
        .await
        .unwrap()
        .status();
    assert!(status.is_success(), "{status}");
}

/// Registers `service/id` at `address:port` (an IP or a DNS name).
async fn register_at(client: &DirectoryClient, service: &str, id: &str, address: &str, port: u16) {
    let spec = InstanceSpec {
        address: address.to_owned(),
        port: u64::from(port),
        version: None,
        weight: None,
        tags: vec![],
        ttl_ms: Some(TTL_MS),
        zone: None,
    };
    client
        .register(service, id, &spec)
        .await
        .unwrap_or_else(|e| panic!("registering {service}/{id}: {e}"));
}

/// What a stopped instance and a SIGKILLed HAProxy cost, measured from outside.
#[derive(Debug)]
struct Outage {
    /// From deregistering an instance to HAProxy draining it.
    drain: Duration,
    /// From SIGKILLing HAProxy to the ambassador having started it again.
    restart: Duration,
    /// From SIGTERM to the ambassador's exit.
    stop: Duration,
    ok: u64,
    failed: usize,
}

/// Two instances behind an ambassador (behind `wrapper`), then ten more at DNS names that do
/// not resolve when `unresolvable`: deregisters one of the two, then SIGKILLs HAProxy under a
/// paced load, and measures both, and how long the ambassador takes to stop.
async fn stop_and_kill(unresolvable: bool, wrapper: &[String]) -> Outage {
    let dir = TestDirectory::start(&[]).await;
    let a = Greeting::start("1", "a").await;
    let b = Greeting::start("1", "b").await;
    register(&dir.client, "emitter", &a, "a", "1", TTL_MS).await;
    register(&dir.client, "emitter", &b, "b", "1", TTL_MS).await;
    let mut amb = TestAmbassador::start_wrapped(&dir.url, &["emitter"], &[], wrapper).await;
    let url = format!("{}/greeting", amb.url("emitter"));
    eventually(Duration::from_secs(10), "both instances", || async {
        (spread(&url, 4).await.len() == 2).then_some(())
    })
    .await;
    if unresolvable {
        for i in 0..10 {
            let id = format!("u{i}");
            register_at(&dir.client, "emitter", &id, &format!("{id}.invalid"), 8000).await;
        }
    }

    dir.client.deregister("emitter", "a").await.unwrap();
    let stopped = std::time::Instant::now();
    eventually(
        Duration::from_secs(3),
        "the stopped instance to be drained",
        || async {
            (amb.servers("emitter").get("a").map(String::as_str) != Some("ready")).then_some(())
        },
    )
    .await;
    let drain = stopped.elapsed();

    let load = Load::paced(url.clone(), Duration::from_millis(5));
    load.more(200).await;
    let pid: i32 = std::fs::read_to_string(amb.run_dir().join("haproxy.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let killed = std::time::Instant::now();
    amb.proc
        .wait_for_log("HAProxy is running again", Duration::from_secs(60))
        .await;
    let restart = killed.elapsed();
    let c = http(false);
    eventually(
        Duration::from_secs(10),
        "a request through the restarted HAProxy",
        || async { greet(&c, &url).await.ok() },
    )
    .await;
    let target = load.ok() + 200;
    eventually(Duration::from_secs(30), "the load to go on", || async {
        (load.ok() >= target).then_some(())
    })
    .await;
    let (ok, failures) = load.finish().await;
    let stopping = std::time::Instant::now();
    let status = amb.stop().await;
    assert!(status.success(), "{status}\n{}", amb.proc.log_text());
    let outage = Outage {
        drain,
        restart,
        stop: stopping.elapsed(),
        ok,
        failed: failures.len(),
    };
    eprintln!("unresolvable names: {unresolvable}; {outage:?}");
    outage
}

#[tokio::test]
async fn a_stopped_instance_and_a_killed_haproxy_cost_little() {
    if !require(Needs::Haproxy) {
        return;
    }
    let outage = stop_and_kill(false, &[]).await;
    assert!(outage.restart < Duration::from_secs(3), "{outage:?}");
    assert!(outage.failed < 1000 && outage.ok >= 400, "{outage:?}");
}

/// Ten instances at DNS names whose lookups never finish (the resolver does not answer) must
/// change nothing: the lookups run beside the task that owns HAProxy, never in its way, and
/// shutdown does not wait for them.
#[tokio::test]
async fn unresolvable_names_delay_neither_drains_nor_restarts() {
    if !require(Needs::Haproxy) {
        return;
    }
    let Some(dns) = SilentResolver::start() else {
        return;
    };
    let outage = stop_and_kill(true, &dns.wrapper()).await;
    assert!(outage.drain < Duration::from_secs(2), "{outage:?}");
    assert!(outage.restart < Duration::from_secs(3), "{outage:?}");
    assert!(outage.stop < Duration::from_secs(5), "{outage:?}");
    assert!(outage.failed < 1000 && outage.ok >= 400, "{outage:?}");
}

/// A backend with a static algorithm (`balance source`) cannot take `add server`: HAProxy
/// refuses it. The log says so in HAProxy's words, never "added a server", and the reload the
/// design prescribes brings the new instance in.
#[tokio::test]
async fn a_refused_add_server_is_reported_not_claimed_and_reloads() {
    if !require(Needs::Haproxy) {
        return;
    }
    let template = tempfile::NamedTempFile::new().unwrap();
    let text = custom_template().replace("    balance {{ s.balance }}\n", "    balance source\n");
    std::fs::write(template.path(), text).unwrap();
    let path = template.path().display().to_string();
    let dir = TestDirectory::start(&[]).await;
    let a = Greeting::start("1", "a").await;
    let b = Greeting::start("1", "b").await;
    register(&dir.client, "emitter", &a, "a", "1", TTL_MS).await;
    let amb = TestAmbassador::start(&dir.url, &["emitter"], &[("BAKER_TEMPLATE", &path)]).await;
    assert!(amb.servers("emitter").contains_key("a"));

    register(&dir.client, "emitter", &b, "b", "1", TTL_MS).await;
    eventually(
        Duration::from_secs(10),
        "the reload to bring b in",
        || async { amb.servers("emitter").contains_key("b").then_some(()) },
    )
    .await;
    let log = amb.proc.log_text();
    assert!(
        log.contains("HAProxy refused a server change") && log.contains("dynamic"),
        "the refusal and HAProxy's answer are logged:\n{log}"
    );
    assert!(
        !log.contains("added a server"),
        "a refused add server is not reported as done:\n{log}"
    );
    assert!(amb.proc_info().reloads >= 1, "{log}");
}
