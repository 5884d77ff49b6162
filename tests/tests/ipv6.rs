//! IPv6 end to end, on the loopback address `::1`: a greeting listening on `[::1]`, a
//! registrar probing `http://[::1]:port` and `tcp://[::1]:port`, a directory listening on
//! `[::1]`, the CLI reaching it, and an ambassador listening on `::1` (or `[::]`) that routes
//! to IPv6 instances and adds, moves and removes them over HAProxy's runtime API under load,
//! with no failed request and no reload. Also Docker discovery on a network with IPv6.

use std::time::Duration;

use baker_client::model::Source;
use baker_client::DirectoryClient;
use baker_tests::ambassador::TestAmbassador;
use baker_tests::cli::baker;
use baker_tests::directory::TestDirectory;
use baker_tests::docker::{require_images_of, Container, Network};
use baker_tests::greeting::{register, Greeting};
use baker_tests::load::{greet, Load};
use baker_tests::{eventually, free_port, require, Needs, Proc};

const TTL_MS: u64 = 60_000;
const WAIT: Duration = Duration::from_secs(15);

/// Fails the test, saying what is missing, when this machine cannot listen on `[::1]`.
fn require_ipv6_loopback() {
    if let Err(e) = std::net::TcpListener::bind("[::1]:0") {
        panic!(
            "this test needs IPv6 on the loopback interface (::1), which this machine lacks: \
             binding [::1]:0 failed: {e} (enable it with sysctl net.ipv6.conf.lo.disable_ipv6=0)"
        );
    }
}

/// A directory listening on `[::1]`.
async fn directory_on_ipv6() -> TestDirectory {
    let listen = format!("[::1]:{}", free_port());
    let dir = TestDirectory::start(&[("BAKER_LISTEN", &listen)]).await;
    assert!(dir.url.starts_with("http://[::1]:"), "{}", dir.url);
    dir
}

/// A greeting listening on `[::1]`.
async fn greeting_on_ipv6(instance: &str) -> Greeting {
    let g = Greeting::start_with("1", instance, &[("BAKER_LISTEN", "[::1]:0")]).await;
    assert_eq!(
        g.addr.ip().to_string(),
        "::1",
        "{} listens on {}",
        instance,
        g.addr
    );
    g
}

/// The `(address, port)` the directory holds for `service`/`id`, once it holds it.
async fn registered(client: &DirectoryClient, service: &str, id: &str) -> (String, u16) {
    eventually(
        WAIT,
        &format!("{service}/{id} in the directory"),
        || async {
            client.service(service).await.ok().and_then(|s| {
                s.instances
                    .into_iter()
                    .find(|i| i.id.as_str() == id)
                    .map(|i| (i.address.as_str().to_owned(), i.port))
            })
        },
    )
    .await
}

/// `show servers state` of `backend`: each server's address and port, by name.
fn server_addrs(amb: &TestAmbassador, backend: &str) -> Vec<(String, String, String)> {
    amb.admin_command(&format!("show servers state {backend}"))
        .lines()
        .filter(|l| !l.starts_with('#') && l.split_whitespace().count() > 18)
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f[3].to_owned(), f[4].to_owned(), f[18].to_owned())
        })
        .collect()
}

/// The ambassador's own metrics, from its admin port.
async fn own_metrics(amb: &TestAmbassador) -> String {
    reqwest::Client::new()
        .get(format!("http://{}/ambassador/metrics", amb.admin))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .and_then(|r| r.error_for_status())
        .unwrap_or_else(|e| panic!("GET /ambassador/metrics on {}: {e}", amb.admin))
        .text()
        .await
        .expect("the ambassador's metrics")
}

#[tokio::test]
async fn ipv6_instances_are_registered_routed_and_changed_at_run_time_without_reload() {
    if !require(Needs::Haproxy) {
        return;
    }
    require_ipv6_loopback();
    let dir = directory_on_ipv6().await;

    // A registrar probes the app on [::1] and registers it with the directory on [::1].
    let a = greeting_on_ipv6("a").await;
    let mut registrar = a.registrar(&dir.url, "a", "200ms");
    assert_eq!(
        registered(&dir.client, "emitter", "a").await,
        ("::1".to_owned(), a.addr.port())
    );

    let admin = format!("[::1]:{}", free_port());
    let amb = TestAmbassador::start(
        &dir.url,
        &["emitter"],
        &[("BAKER_BIND", "::1"), ("BAKER_ADMIN", &admin)],
    )
    .await;
    assert_eq!(amb.admin.to_string(), admin);
    let url = format!("{}/greeting", amb.url("emitter"));
    assert!(url.starts_with("http://[::1]:"), "{url}");
    // HAProxy's spelling of an IPv6 server: the last colon separates the port.
    let cfg = std::fs::read_to_string(amb.run_dir().join("haproxy.cfg")).expect("haproxy.cfg");
    assert!(
        cfg.contains(&format!("server a ::1:{} ", a.addr.port())),
        "{cfg}"
    );

    let load = Load::start(&url, 4);
    load.more(50, WAIT).await;
    let before = amb.proc_info();

    // Added at run time (`add server`).
    let b = greeting_on_ipv6("b").await;
    let c = greeting_on_ipv6("c").await;
    register(&dir.client, "emitter", &b, "b", "1", TTL_MS).await;
    register(&dir.client, "emitter", &c, "c", "1", TTL_MS).await;
    eventually(WAIT, "a, b and c to answer", || async {
        let seen = load.answers_from_now(60, WAIT).await;
        (["a", "b", "c"].iter().all(|i| seen.contains_key(*i))).then_some(())
    })
    .await;

    // Moved at run time (`set server ... addr`): c now points at greeting d.
    let d = greeting_on_ipv6("d").await;
    register(&dir.client, "emitter", &d, "c", "1", TTL_MS).await;
    eventually(WAIT, "server c to dial d's port", || async {
        server_addrs(&amb, "emitter")
            .iter()
            .any(|(name, addr, port)| {
                name == "c" && addr == "::1" && *port == d.addr.port().to_string()
            })
            .then_some(())
    })
    .await;
    eventually(WAIT, "d to answer in c's place", || async {
        let seen = load.answers_from_now(60, WAIT).await;
        (seen.contains_key("d") && !seen.contains_key("c")).then_some(())
    })
    .await;

    // Removed at run time (drained, then `del server`): b through the API, a by its registrar
    // stopping (it deregisters first).
    dir.client.deregister("emitter", "b").await.unwrap();
    registrar.term();
    registrar.wait_exit(WAIT).await;
    // Deletion waits for each drained server to be idle: allow for a loaded machine.
    eventually(
        Duration::from_secs(30),
        "servers a and b to be deleted",
        || async {
            let servers = amb.servers("emitter");
            (!servers.contains_key("a") && !servers.contains_key("b") && servers.contains_key("c"))
                .then_some(())
        },
    )
    .await;
    let seen = load.answers_from_now(60, WAIT).await;
    assert_eq!(seen.keys().collect::<Vec<_>>(), ["d"], "{seen:?}");

    let (ok, failures) = load.finish().await;
    assert!(
        failures.is_empty(),
        "{} of {} requests failed: {:?}",
        failures.len(),
        ok + failures.len() as u64,
        &failures[..failures.len().min(5)]
    );
    assert_eq!(amb.proc_info(), before, "HAProxy must not reload");
    assert_eq!(before.reloads, 0);
    let log = amb.proc.log_text();
    let metrics = own_metrics(&amb).await;
    assert!(
        metrics.contains("baker_ambassador_reloads_total 0"),
        "{metrics}\n{log}"
    );
    // A `del server` may be refused while the server still holds idle connections (and is
    // sent again on the next pass); an addition or a move never is.
    assert!(!log.contains("HAProxy refused a server change"), "{log}");
    assert!(
        log.contains("added a server backend=emitter server=b address=::1"),
        "{log}"
    );
    assert!(
        log.contains("moved a server to a new address backend=emitter server=c address=::1"),
        "{log}"
    );
    assert!(
        log.contains("removed a drained server backend=emitter server=b"),
        "{log}"
    );
}

#[tokio::test]
async fn an_ambassador_on_every_ipv6_address_routes_tcp_to_an_ipv6_target() {
    if !require(Needs::Haproxy) {
        return;
    }
    require_ipv6_loopback();
    let dir = directory_on_ipv6().await;
    let app = greeting_on_ipv6("t").await;
    let target = format!("tcp://[::1]:{}", app.addr.port());
    let advertise = format!("[::1]:{}", app.addr.port());
    let _registrar = Proc::baker(
        "registrar-t",
        "baker-registrar",
        &[
            ("BAKER_DIRECTORY", dir.url.as_str()),
            ("BAKER_SERVICE", "db"),
            ("BAKER_ID", "t"),
            ("BAKER_TARGET", target.as_str()),
            ("BAKER_CHECK", "tcp"),
            ("BAKER_ADVERTISE", advertise.as_str()),
            ("BAKER_INTERVAL", "200ms"),
        ],
    );
    assert_eq!(
        registered(&dir.client, "db", "t").await,
        ("::1".to_owned(), app.addr.port())
    );

    // The CLI reaches the directory on [::1] too.
    let run = baker(&dir.url, None, &["services"]).await.ok();
    assert!(
        run.stdout.lines().any(|l| l.starts_with("db ")),
        "{}",
        run.stdout
    );

    let admin = format!("[::]:{}", free_port());
    let amb = TestAmbassador::start(
        &dir.url,
        &["db=tcp"],
        &[("BAKER_BIND", "[::]"), ("BAKER_ADMIN", &admin)],
    )
    .await;
    let port = amb.ports["db"];
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .expect("an HTTP client");
    // Through HAProxy in TCP mode, to the greeting on [::1].
    let v6 = format!("http://[::1]:{port}/greeting");
    assert_eq!(amb.url("db"), format!("http://[::1]:{port}"));
    eventually(WAIT, "an answer on [::1] through the TCP route", || async {
        greet(&http, &v6).await.ok().filter(|i| i == "t")
    })
    .await;
    // `::` takes IPv4 as well where the kernel maps it (net.ipv6.bindv6only=0, Linux's
    // default), as the docs say.
    let v6only = std::fs::read_to_string("/proc/sys/net/ipv6/bindv6only").unwrap_or_default();
    if v6only.trim() == "0" {
        let v4 = format!("http://127.0.0.1:{port}/greeting");
        assert_eq!(greet(&http, &v4).await.as_deref(), Ok("t"));
    }
    let metrics = http
        .get(format!("http://[::1]:{}/metrics", amb.admin.port()))
        .send()
        .await
        .and_then(|r| r.error_for_status())
        .expect("HAProxy's metrics on the admin port, on [::1]")
        .text()
        .await
        .expect("HAProxy's metrics");
    assert!(
        metrics.contains("haproxy_backend_active_servers"),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_labelled_container_on_a_network_with_ipv6_is_registered_and_routed() {
    if !require(Needs::Haproxy) || !require_images_of(&["baker/greeting"]) {
        return;
    }
    let net = Network::create_ipv6("ipv6");
    let dir =
        TestDirectory::start(&[("BAKER_DOCKER", "on"), ("BAKER_DOCKER_NETWORK", &net.name)]).await;
    let app = Container::run(
        "ipv6-app",
        &[
            "--network",
            &net.name,
            "--label",
            "baker.service=dual",
            "--label",
            "baker.port=8080",
            "-e",
            "BAKER_INSTANCE=dual",
            // On both families: `::` takes IPv4 too inside the container.
            "-e",
            "BAKER_LISTEN=[::]:8080",
            "baker/greeting",
        ],
    );
    let v4 = app.ip(&net.name);
    let v6 = app.ipv6(&net.name);
    assert!(v6.parse::<std::net::Ipv6Addr>().is_ok(), "{v6}");
    // Both addresses are in the container's inspect; the directory registers the IPv4 one
    // (docs/docker.md: "IPv6").
    let (address, port) = registered(&dir.client, "dual", &app.name).await;
    assert_eq!((address.as_str(), port), (v4.as_str(), 8080));
    let instance = dir.client.service("dual").await.unwrap().instances;
    assert_eq!(instance[0].source, Source::Docker);

    // The container answers on its IPv6 address too, and an ambassador routes to it.
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .expect("an HTTP client");
    let direct = format!("http://[{v6}]:8080/greeting");
    eventually(
        WAIT,
        "the container to answer on its IPv6 address",
        || async { greet(&http, &direct).await.ok() },
    )
    .await;
    let amb = TestAmbassador::start(&dir.url, &["dual"], &[("BAKER_BIND", "::1")]).await;
    let url = format!("{}/greeting", amb.url("dual"));
    eventually(
        WAIT,
        "the container to answer through the ambassador",
        || async { greet(&http, &url).await.ok().filter(|i| i == "dual") },
    )
    .await;
}
