//! Baker's images on the real Docker engine: discovery by labels (with and without a
//! HEALTHCHECK, its changes named `docker` in the events, zones from labels and from the
//! directory's `BAKER_ZONE`), link variables on the default bridge and on a user network, and how the
//! registrar and ambassador containers stop.
//!
//! Needs the images from `docker/build.sh`; every container and network has a unique name and
//! is removed at the end, also when a test fails.

use std::time::Duration;

use baker_client::events::EventKind;
use baker_client::model::{InstanceSpec, Source};
use baker_client::{ClientError, DirectoryClient};
use baker_tests::cli::baker;
use baker_tests::directory::TestDirectory;
use baker_tests::docker::{docker_ok, engine_major, require_images, unique, Container, Network};
use baker_tests::{bin, eventually};

const WAIT: Duration = Duration::from_secs(20);

/// The ids of a service's live instances, sorted.
async fn instance_ids(client: &DirectoryClient, service: &str) -> Vec<String> {
    let mut ids: Vec<String> = client
        .service(service)
        .await
        .map(|s| s.instances.into_iter().map(|i| i.id.into()).collect())
        .unwrap_or_default();
    ids.sort();
    ids
}

/// What the directory makes of a container name: the name itself, when it is a valid id (as
/// every name [`unique`] makes is).
fn instance_id(container: &str) -> String {
    assert_eq!(
        container,
        container.to_ascii_lowercase(),
        "a lowercase name"
    );
    container.to_owned()
}

async fn put_health(ip: &str, mode: &str) {
    let resp = reqwest::Client::new()
        .put(format!("http://{ip}:8080/control/health"))
        .body(mode.to_owned())
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .unwrap_or_else(|e| panic!("setting the health of {ip} to {mode}: {e}"));
    assert!(resp.status().is_success(), "{}", resp.status());
}

async fn greeting_listens(ip: &str) -> bool {
    reqwest::Client::new()
        .get(format!("http://{ip}:8080/greeting"))
        .timeout(Duration::from_secs(2))
        .send()
        .await
        .map(|r| r.status().is_success())
        .unwrap_or(false)
}

#[tokio::test]
async fn labelled_container_is_registered_without_registrar_and_leaves_on_stop() {
    if !require_images() {
        return;
    }
    let net = Network::create("labels");
    let dir =
        TestDirectory::start(&[("BAKER_DOCKER", "on"), ("BAKER_DOCKER_NETWORK", &net.name)]).await;
    let service = unique("svc");
    let app = Container::run(
        "labelled",
        &[
            "--network",
            &net.name,
            "--label",
            &format!("baker.service={service}"),
            "--label",
            "baker.port=8080",
            "--label",
            "baker.version=3",
            "--label",
            "baker.weight=50",
            "--health-interval",
            "300ms",
            "baker/greeting",
        ],
    );
    let ip = app.ip(&net.name);
    let instance = eventually(WAIT, "the labelled container in the directory", || async {
        dir.client
            .service(&service)
            .await
            .ok()
            .and_then(|s| s.instances.into_iter().next())
    })
    .await;
    assert_eq!(instance.id, instance_id(&app.name));
    assert_eq!(instance.address, ip);
    assert_eq!(instance.port, 8080);
    assert_eq!(instance.version, "3");
    assert_eq!(instance.weight, 50);
    assert_eq!(instance.source, Source::Docker);
    assert_eq!(app.health(), "healthy");

    app.stop(5);
    eventually(
        Duration::from_secs(2),
        "the stopped container to leave the directory",
        || async {
            instance_ids(&dir.client, &service)
                .await
                .is_empty()
                .then_some(())
        },
    )
    .await;
    // Docker discovery made both changes, and the events say so.
    let events = dir
        .client
        .events(None, None, Some(&service), None)
        .await
        .expect("the events");
    let who: Vec<(EventKind, Option<&str>)> = events
        .events
        .iter()
        .map(|e| (e.kind, e.by.as_deref()))
        .collect();
    assert!(who.iter().all(|(_, by)| *by == Some("docker")), "{who:?}");
    assert_eq!(who.first().map(|w| w.0), Some(EventKind::DockerStarted));
    assert_eq!(who.last().map(|w| w.0), Some(EventKind::DockerStopped));
}

#[tokio::test]
async fn containers_named_alike_get_their_own_ids_and_the_api_cannot_take_one_over() {
    if !require_images() {
        return;
    }
    let net = Network::create("ids");
    let mut dir =
        TestDirectory::start(&[("BAKER_DOCKER", "on"), ("BAKER_DOCKER_NETWORK", &net.name)]).await;
    let service = unique("svc");
    let labels = |network: &str, name: &str| {
        docker_ok(&[
            "run",
            "-d",
            "--name",
            name,
            "--network",
            network,
            "--label",
            &format!("baker.service={service}"),
            "--label",
            "baker.port=8080",
            "--health-interval",
            "300ms",
            "baker/greeting",
        ]);
        Container {
            name: name.to_owned(),
        }
    };
    // Names Docker tells apart and lower-casing would not.
    let base = unique("ids");
    let upper = labels(&net.name, &format!("{base}-Web"));
    let lower = labels(&net.name, &format!("{base}-web"));
    let ids = eventually(WAIT, "both containers in the directory", || async {
        let ids = instance_ids(&dir.client, &service).await;
        (ids.len() == 2).then_some(ids)
    })
    .await;
    let upper_id = ids
        .iter()
        .find(|id| **id != lower.name)
        .expect("the other id")
        .clone();
    assert!(ids.contains(&lower.name), "{ids:?}");
    assert!(
        upper_id.starts_with(&format!("{}-", lower.name))
            && upper_id.len() == lower.name.len() + 13,
        "{upper_id}"
    );

    // The API cannot take a Docker instance over.
    let spec = InstanceSpec {
        address: "10.9.9.9".into(),
        port: 80,
        version: None,
        weight: None,
        tags: vec![],
        ttl_ms: Some(200),
        zone: None,
    };
    match dir.client.register(&service, &lower.name, &spec).await {
        Err(ClientError::Refused { status, message }) => {
            assert_eq!(status, 409, "{message}");
            assert!(message.contains("discovered from Docker"), "{message}");
        }
        other => panic!("expected a 409, got {other:?}"),
    }

    // Stopping one leaves the other.
    upper.stop(5);
    eventually(WAIT, "only the other container left", || async {
        (instance_ids(&dir.client, &service).await == [lower.name.clone()]).then_some(())
    })
    .await;

    // A labelled container on another network is left out, with a warning naming it.
    let other = Network::create("other");
    let stray = labels(&other.name, &unique("stray"));
    let line = dir
        .proc
        .wait_for_log(&format!("container {} is left out", stray.name), WAIT)
        .await;
    assert!(
        line.contains("WARN") && line.contains(&other.name),
        "{line}"
    );
    assert_eq!(
        instance_ids(&dir.client, &service).await,
        std::slice::from_ref(&lower.name)
    );
}

#[tokio::test]
async fn a_container_is_in_its_labels_zone_else_the_directorys_and_a_bad_zone_is_left_out() {
    if !require_images() {
        return;
    }
    let net = Network::create("zones");
    let mut dir = TestDirectory::start(&[
        ("BAKER_DOCKER", "on"),
        ("BAKER_DOCKER_NETWORK", &net.name),
        ("BAKER_ZONE", "zone-dir"),
    ])
    .await;
    let service = unique("svc");
    let run = |prefix: &str, zone: Option<&str>| {
        let service_label = format!("baker.service={service}");
        let zone_label = zone.map(|z| format!("baker.zone={z}"));
        let mut args = vec![
            "--network",
            &net.name,
            "--label",
            &service_label,
            "--label",
            "baker.port=8080",
            "--health-interval",
            "300ms",
        ];
        if let Some(z) = &zone_label {
            args.extend(["--label", z.as_str()]);
        }
        args.push("baker/greeting");
        Container::run(prefix, &args)
    };
    let labelled = run("zoned", Some("zone-x"));
    let plain = run("unzoned", None);
    let zones = eventually(WAIT, "both containers in the directory", || async {
        let instances = dir.client.service(&service).await.ok()?.instances;
        let mut zones: Vec<(String, Option<String>)> = instances
            .iter()
            .map(|i| (i.id.to_string(), i.zone.as_ref().map(|z| z.to_string())))
            .collect();
        zones.sort();
        (zones.len() == 2).then_some(zones)
    })
    .await;
    let mut expected = vec![
        (instance_id(&labelled.name), Some("zone-x".to_owned())),
        (instance_id(&plain.name), Some("zone-dir".to_owned())),
    ];
    expected.sort();
    assert_eq!(zones, expected);
    let table = baker(&dir.url, None, &["instances", &service]).await.ok();
    let header: Vec<&str> = table
        .stdout
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(
        header,
        [
            "ID", "ADDRESS", "VERSION", "WEIGHT", "STATE", "SOURCE", "NODE", "ZONE", "TAGS", "TTL",
            "SEEN"
        ],
        "{}",
        table.stdout
    );
    let line = table
        .stdout
        .lines()
        .find(|l| l.starts_with(&instance_id(&labelled.name)))
        .unwrap_or_else(|| panic!("{} listed: {}", labelled.name, table.stdout));
    assert_eq!(line.split_whitespace().nth(7), Some("zone-x"), "{line}");

    // A bad zone is a bad label: the container is left out, with a warning naming the label.
    let bad = run("badzone", Some("Zone X"));
    let line = dir
        .proc
        .wait_for_log(
            &format!(
                "container {} has bad labels and is left out",
                instance_id(&bad.name)
            ),
            WAIT,
        )
        .await;
    assert!(
        line.contains("WARN")
            && line.contains("baker.zone: must start with a lowercase letter or digit, got 'Z'"),
        "{line}"
    );
    assert_eq!(instance_ids(&dir.client, &service).await.len(), 2);
}

#[tokio::test]
async fn container_with_failing_healthcheck_is_registered_only_once_healthy() {
    if !require_images() {
        return;
    }
    let net = Network::create("health");
    let dir =
        TestDirectory::start(&[("BAKER_DOCKER", "on"), ("BAKER_DOCKER_NETWORK", &net.name)]).await;
    let service = unique("svc");
    // The labelled container's HEALTHCHECK probes this one, which the test makes fail first:
    // the check starts failing before the labelled container exists.
    let switch = Container::run(
        "switch",
        &["--network", &net.name, "--no-healthcheck", "baker/greeting"],
    );
    let switch_ip = switch.ip(&net.name);
    eventually(WAIT, "the switch container to listen", || async {
        greeting_listens(&switch_ip).await.then_some(())
    })
    .await;
    put_health(&switch_ip, "fail").await;

    let label = format!("baker.service={service}");
    // A control without HEALTHCHECK shows the directory does see this service's containers.
    let control = Container::run(
        "control",
        &[
            "--network",
            &net.name,
            "--label",
            &label,
            "--label",
            "baker.port=8080",
            "--no-healthcheck",
            "baker/greeting",
        ],
    );
    let probe_url = format!("HEALTHCHECK_URL=http://{switch_ip}:8080/health");
    let sick = Container::run(
        "sick",
        &[
            "--network",
            &net.name,
            "--label",
            &label,
            "--label",
            "baker.port=8080",
            "-e",
            &probe_url,
            "--health-interval",
            "300ms",
            "--health-retries",
            "1",
            "--health-start-period",
            "1ms",
            "baker/greeting",
        ],
    );
    let control_id = instance_id(&control.name);
    eventually(WAIT, "the control container in the directory", || async {
        instance_ids(&dir.client, &service)
            .await
            .contains(&control_id)
            .then_some(())
    })
    .await;
    eventually(
        WAIT,
        "the container's HEALTHCHECK to report unhealthy",
        || async { (sick.health() == "unhealthy").then_some(()) },
    )
    .await;
    // A few more checks fail; the container must never show up.
    for _ in 0..5 {
        assert_eq!(
            instance_ids(&dir.client, &service).await,
            vec![control_id.clone()],
            "an unhealthy container was registered"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    put_health(&switch_ip, "ok").await;
    let mut both = vec![control_id.clone(), instance_id(&sick.name)];
    both.sort();
    eventually(
        WAIT,
        "the container, now healthy, in the directory",
        || async { (instance_ids(&dir.client, &service).await == both).then_some(()) },
    )
    .await;
    assert_eq!(sick.health(), "healthy");

    // And out again when it turns unhealthy.
    put_health(&switch_ip, "fail").await;
    eventually(
        WAIT,
        "the unhealthy container to leave the directory",
        || async {
            (instance_ids(&dir.client, &service).await == vec![control_id.clone()]).then_some(())
        },
    )
    .await;
}

/// A directory, two greeting instances each with a registrar linked to it, and an ambassador
/// routing `service` on port 8000, all on the default bridge.
struct Topology {
    service: String,
    directory: Container,
    client: DirectoryClient,
    registrars: Vec<Container>,
    ambassador: Container,
    apps: Vec<Container>,
}

impl Topology {
    async fn start() -> Topology {
        let service = unique("svc");
        let directory = Container::run("dir", &["-e", "BAKER_DOCKER=off", "baker/directory"]);
        let dir_url = format!("http://{}:7700", directory.ip("bridge"));
        let client = DirectoryClient::new(&dir_url, None).expect("directory client");
        eventually(WAIT, "the directory container to answer", || async {
            client.healthz().await.ok()
        })
        .await;
        let mut apps = Vec::new();
        let mut registrars = Vec::new();
        for n in 1..=2 {
            let app = Container::run(
                &format!("app{n}"),
                &["-e", &format!("BAKER_INSTANCE=app-{n}"), "baker/greeting"],
            );
            // Exactly what the documentation promises: the link, the service and the directory.
            let registrar = Container::run(
                &format!("reg{n}"),
                &[
                    "--link",
                    &format!("{}:app", app.name),
                    "-e",
                    &format!("BAKER_SERVICE={service}"),
                    "-e",
                    &format!("BAKER_DIRECTORY={dir_url}"),
                    "baker/registrar",
                ],
            );
            apps.push(app);
            registrars.push(registrar);
        }
        let ambassador = Container::run(
            "amb",
            &[
                "-e",
                &format!("BAKER_DIRECTORY={dir_url}"),
                "-e",
                &format!("BAKER_ROUTES={service}=8000"),
                "baker/ambassador",
            ],
        );
        let t = Topology {
            service,
            directory,
            client,
            registrars,
            ambassador,
            apps,
        };
        let want: Vec<String> = t.apps.iter().map(|a| a.ip("bridge")).collect();
        eventually(WAIT, "both apps registered by their registrars", || async {
            let mut addrs: Vec<String> = t
                .client
                .service(&t.service)
                .await
                .ok()?
                .instances
                .into_iter()
                .map(|i| i.address.into())
                .collect();
            addrs.sort();
            let mut want = want.clone();
            want.sort();
            (addrs == want).then_some(())
        })
        .await;
        t
    }

    /// Runs the greeting client (`args` before the image) for 20 requests and returns the
    /// instances that answered.
    async fn client_run(&self, prefix: &str, args: &[&str]) -> (i64, String) {
        let mut all: Vec<&str> = args.to_vec();
        all.extend_from_slice(&[
            "--no-healthcheck",
            "-e",
            "BAKER_COUNT=20",
            "-e",
            "BAKER_INTERVAL=50ms",
            "--entrypoint",
            "/usr/local/bin/baker-greeting-client",
            "baker/greeting",
        ]);
        let c = Container::run(prefix, &all);
        let code = c.wait_exit(WAIT).await;
        (code, c.logs())
    }
}

fn assert_both_answered(code: i64, logs: &str) {
    for app in ["instance=app-1", "instance=app-2"] {
        assert!(
            logs.contains(app),
            "the client (exit {code}) never reached {app}; its log:\n{logs}"
        );
    }
}

#[tokio::test]
async fn link_variables_on_the_default_bridge_and_baker_links_on_a_user_network() {
    if !require_images() {
        return;
    }
    let t = Topology::start().await;
    // The ambassador must have both servers before the client's requests are counted on.
    let direct = format!(
        "GREETING_PORT_8000_TCP=tcp://{}:8000",
        t.ambassador.ip("bridge")
    );
    eventually(WAIT, "the ambassador routing to both instances", || async {
        let (code, logs) = t.client_run("probe", &["-e", &direct]).await;
        assert_ne!(code, 64, "the client did not start:\n{logs}");
        (logs.contains("instance=app-1") && logs.contains("instance=app-2")).then_some(())
    })
    .await;

    // `--link` on the default bridge: the engine injects GREETING_PORT_8000_TCP (before 29).
    if engine_major() < 29 {
        let (code, logs) = t
            .client_run(
                "linked",
                &["--link", &format!("{}:greeting", t.ambassador.name)],
            )
            .await;
        // Exit 64 would mean the variable was missing.
        assert_eq!(code, 0, "{logs}");
        assert_both_answered(code, &logs);
    } else {
        eprintln!("Engine 29 or later injects no link variables: the --link half is skipped");
    }

    // A user network, where Docker never injected anything: `baker links` writes the block.
    let net = Network::create("links");
    docker_connect(&net.name, &t.ambassador.name, "amb");
    let out = std::process::Command::new(bin("baker"))
        .args(["links", "greeting=amb:8000"])
        .output()
        .expect("running baker links");
    assert!(out.status.success(), "{out:?}");
    let block = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        block.contains("GREETING_PORT_8000_TCP=tcp://amb:8000"),
        "{block}"
    );
    let env_file = tempfile::NamedTempFile::new().expect("temporary env file");
    std::fs::write(env_file.path(), &block).expect("writing the env file");
    let env_path = env_file.path().display().to_string();
    let (code, logs) = t
        .client_run(
            "usernet",
            &["--network", &net.name, "--env-file", &env_path],
        )
        .await;
    assert_eq!(code, 0, "{logs}");
    assert_both_answered(code, &logs);
    drop(net_disconnect(&net.name, &t.ambassador.name));
}

fn docker_connect(net: &str, container: &str, alias: &str) {
    baker_tests::docker::docker_ok(&["network", "connect", "--alias", alias, net, container]);
}

fn net_disconnect(net: &str, container: &str) -> std::process::Output {
    baker_tests::docker::docker(&["network", "disconnect", "-f", net, container])
}

#[tokio::test]
async fn stopping_a_registrar_deregisters_first_and_the_ambassador_stops_fast() {
    if !require_images() {
        return;
    }
    let t = Topology::start().await;
    let before = instance_ids(&t.client, &t.service).await;
    assert_eq!(before.len(), 2, "{before:?}");

    // `docker stop` returns once the registrar has exited; by then its instance must be gone,
    // well before the registration's TTL could have expired it.
    let took = t.registrars[0].stop(10);
    assert_eq!(t.registrars[0].exit_code(), 0, "{}", t.registrars[0].logs());
    let after = instance_ids(&t.client, &t.service).await;
    assert_eq!(
        after.len(),
        1,
        "the stopped registrar's instance is still listed right after `docker stop` \
         ({took:?}); before: {before:?}, after: {after:?}\n{}",
        t.registrars[0].logs()
    );
    assert!(
        took < Duration::from_secs(5),
        "docker stop of the registrar took {took:?}"
    );

    let took = t.ambassador.stop(10);
    assert!(
        took < Duration::from_secs(2),
        "docker stop of the ambassador took {took:?}; its log:\n{}",
        t.ambassador.logs()
    );
    let took = t.directory.stop(10);
    assert!(
        took < Duration::from_secs(2),
        "docker stop of the directory took {took:?}"
    );
    let took = t.apps[1].stop(10);
    assert!(
        took < Duration::from_secs(2),
        "docker stop of the greeting took {took:?}"
    );
}

/// A registrar sharing its app's network namespace (`network_mode: service:app`) probes the
/// app on 127.0.0.1, and registers the address others can dial: the namespace's own address
/// towards the directory, not loopback.
#[tokio::test]
async fn a_registrar_in_the_apps_network_namespace_registers_a_dialable_address() {
    if !require_images() {
        return;
    }
    let service = unique("ns");
    let directory = Container::run("dir", &["-e", "BAKER_DOCKER=off", "baker/directory"]);
    let dir_url = format!("http://{}:7700", directory.ip("bridge"));
    let client = DirectoryClient::new(&dir_url, None).expect("directory client");
    let app = Container::run("app", &["-e", "BAKER_INSTANCE=ns-app", "baker/greeting"]);
    let _registrar = Container::run(
        "reg",
        &[
            "--network",
            &format!("container:{}", app.name),
            "-e",
            "BAKER_TARGET=http://127.0.0.1:8080",
            "-e",
            &format!("BAKER_SERVICE={service}"),
            "-e",
            &format!("BAKER_DIRECTORY={dir_url}"),
            "-e",
            "BAKER_INTERVAL=200ms",
            "baker/registrar",
        ],
    );
    let want = app.ip("bridge");
    let got = eventually(
        WAIT,
        "the app registered by the registrar in its namespace",
        || async {
            let inst = client
                .service(&service)
                .await
                .ok()?
                .instances
                .into_iter()
                .next()?;
            Some((String::from(inst.address), inst.port))
        },
    )
    .await;
    assert_eq!(got, (want, 8080), "registered a loopback or wrong address");
}

#[tokio::test]
async fn a_cli_command_given_to_the_directory_image_says_how_to_run_the_cli() {
    if !require_images() {
        return;
    }
    let name = unique("cli-in-image");
    let out = baker_tests::docker::docker(&[
        "run",
        "--rm",
        "--name",
        &name,
        "baker/directory",
        "baker",
        "services",
    ]);
    let said = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{said}");
    assert!(
        said.contains("baker-directory takes no command")
            && said.contains("docker run --rm --entrypoint baker baker/directory services"),
        "{said}"
    );
    // And the way it gives works.
    let version = docker_ok(&[
        "run",
        "--rm",
        "--name",
        &name,
        "--entrypoint",
        "baker",
        "baker/directory",
        "--version",
    ]);
    assert!(version.starts_with("baker "), "{version}");
}
