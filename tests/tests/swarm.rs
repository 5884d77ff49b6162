//! Swarm discovery on a real one-node swarm: each test makes its own swarm
//! (`docker swarm init --advertise-addr 127.0.0.1`) and always leaves it, also when it fails
//! (a guard's `Drop` runs `docker swarm leave --force`), so no swarm outlives a test. The tests
//! run one at a time (their nextest group, `swarm`).
//!
//! Measured: a scale up is seen within 2 s of swarm reporting the new task running, a scale
//! down within 2 s of the command, a killed task leaves within 2 s, a drained node's tasks
//! leave within 2 s and before their containers stop, and neither a rolling update of a
//! replicated service nor the directory's own task being replaced loses a request through an
//! ambassador under load. A task's zone is its service's `baker.zone` label, else its node's,
//! and follows a new node label.

use std::time::{Duration, Instant};

use baker_client::model::Instance;
use baker_client::DirectoryClient;
use baker_tests::cli::baker;
use baker_tests::directory::TestDirectory;
use baker_tests::docker::{docker, docker_ok, require_images, unique, Container};
use baker_tests::eventually;
use baker_tests::load::Paced;

const WAIT: Duration = Duration::from_secs(30);
/// The bound on discovery's delay the issue sets: scale, kill and update are seen within it.
const SEEN_WITHIN: Duration = Duration::from_secs(2);
/// The label a test's swarm carries on its node, so that a test killed before its guard ran
/// (nextest's timeout) leaves a swarm the next test may recognise and leave.
const OURS: &str = "baker-test-swarm";

/// The image `baker/<name>` at `BAKER_TEST_IMAGE_TAG` (default `latest`): on an engine other
/// builds share, `BAKER_IMAGE_TAG=x docker/build.sh` then `BAKER_TEST_IMAGE_TAG=x` pins the
/// images these tests run to the ones just built.
fn image(name: &str) -> String {
    let tag = std::env::var("BAKER_TEST_IMAGE_TAG").unwrap_or_default();
    let tag = if tag.trim().is_empty() {
        "latest"
    } else {
        tag.trim()
    };
    format!("baker/{name}:{tag}")
}

/// A one-node swarm on this engine, left (with every service and overlay network in it) when
/// dropped, also on panic.
struct Swarm;

impl Swarm {
    fn init() -> Swarm {
        let state = docker_ok(&["info", "--format", "{{.Swarm.LocalNodeState}}"]);
        if state != "inactive" {
            let labels = docker(&[
                "node",
                "inspect",
                "self",
                "--format",
                "{{json .Spec.Labels}}",
            ]);
            let ours = String::from_utf8_lossy(&labels.stdout).contains(OURS);
            assert!(
                ours,
                "the Docker engine is already in a swarm ({state}) that no Baker test made: \
                 these tests make their own one-node swarm and leave it; leave that one first \
                 (docker swarm leave --force)"
            );
            eprintln!("leaving the swarm an earlier, interrupted test left behind");
            docker_ok(&["swarm", "leave", "--force"]);
        }
        // The guard exists before the swarm does: a failure past this point still leaves it.
        let swarm = Swarm;
        docker_ok(&["swarm", "init", "--advertise-addr", "127.0.0.1"]);
        docker_ok(&[
            "node",
            "update",
            "--label-add",
            &format!("{OURS}=1"),
            &docker_ok(&["info", "--format", "{{.Swarm.NodeID}}"]),
        ]);
        swarm
    }

    /// An attachable overlay network (removed with the swarm).
    fn network(&self, prefix: &str) -> String {
        let name = unique(prefix);
        docker_ok(&[
            "network",
            "create",
            "--driver",
            "overlay",
            "--attachable",
            &name,
        ]);
        name
    }

    /// The engine's node name, as discovery gives it to the instances.
    fn node(&self) -> String {
        docker_ok(&[
            "node",
            "inspect",
            "self",
            "--format",
            "{{.Description.Hostname}}",
        ])
    }
}

impl Drop for Swarm {
    fn drop(&mut self) {
        let out = docker(&["swarm", "leave", "--force"]);
        if !out.status.success() {
            eprintln!(
                "docker swarm leave --force failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

/// `docker service create` of the greeting image labelled as service `baker` on `network`,
/// with `replicas` tasks and a fast HEALTHCHECK; returns the swarm service's name.
fn greeting_service(network: &str, baker: &str, replicas: u32, extra: &[&str]) -> String {
    let name = unique("greeting");
    let replicas = replicas.to_string();
    let mut args = vec![
        "service",
        "create",
        "--detach",
        "--quiet",
        // Local images only: no registry is asked for a digest.
        "--no-resolve-image",
        "--name",
        &name,
        "--network",
        network,
        "--replicas",
        &replicas,
        "--health-interval",
        "300ms",
        "--health-start-period",
        "0s",
        "--stop-grace-period",
        "10s",
    ];
    let labels = [
        format!("baker.service={baker}"),
        "baker.port=8080".to_owned(),
    ];
    for l in &labels {
        args.extend(["--label", l.as_str()]);
    }
    args.extend_from_slice(extra);
    let greeting = image("greeting");
    args.push(&greeting);
    docker_ok(&args);
    name
}

/// The ids of the tasks of `service` swarm reports running (and wants running).
fn running_tasks(service: &str) -> Vec<String> {
    let ids = docker_ok(&[
        "service",
        "ps",
        service,
        "--filter",
        "desired-state=running",
        "--format",
        "{{.ID}}",
        "--no-trunc",
    ]);
    let ids: Vec<&str> = ids.lines().filter(|l| !l.is_empty()).collect();
    if ids.is_empty() {
        return Vec::new();
    }
    let mut args = vec!["inspect", "--format", "{{.ID}} {{.Status.State}}"];
    args.extend(ids.iter().copied());
    let out = docker(&args);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.strip_suffix(" running").map(str::to_owned))
        .collect()
}

/// The container of `service`'s task whose address on `network` is `ip`.
fn task_container(service: &str, network: &str, ip: &str) -> String {
    let ids = docker_ok(&[
        "ps",
        "-q",
        "--filter",
        &format!("label=com.docker.swarm.service.name={service}"),
    ]);
    let format = format!(
        "{{{{with index .NetworkSettings.Networks {network:?}}}}}{{{{.IPAddress}}}}{{{{end}}}}"
    );
    ids.lines()
        .find(|id| docker_ok(&["inspect", "--format", &format, id]) == ip)
        .unwrap_or_else(|| panic!("no container of {service} has the address {ip} on {network}"))
        .to_owned()
}

/// The instances of `service`, sorted by id.
async fn instances(client: &DirectoryClient, service: &str) -> Vec<Instance> {
    let mut list = client
        .service(service)
        .await
        .map(|s| s.instances)
        .unwrap_or_default();
    list.sort_by(|a, b| a.id.cmp(&b.id));
    list
}

/// Waits until swarm runs `n` tasks of `swarm_service` and the directory lists `n` instances
/// of `service`; returns how much later the directory got there than swarm did (zero when the
/// directory was first, as on a scale down, where swarm's count lags).
async fn converge(
    client: &DirectoryClient,
    swarm_service: &str,
    service: &str,
    n: usize,
) -> Duration {
    let deadline = Instant::now() + WAIT;
    let (mut swarm_at, mut dir_at) = (None, None);
    loop {
        let now = Instant::now();
        if swarm_at.is_none() && running_tasks(swarm_service).len() == n {
            swarm_at = Some(now);
        }
        if dir_at.is_none() && instances(client, service).await.len() == n {
            dir_at = Some(Instant::now());
        }
        if let (Some(s), Some(d)) = (swarm_at, dir_at) {
            return d.saturating_duration_since(s);
        }
        assert!(
            Instant::now() < deadline,
            "swarm runs {} task(s) of {swarm_service} and the directory lists {:?} after {WAIT:?}; {n} expected",
            running_tasks(swarm_service).len(),
            instances(client, service).await.iter().map(|i| i.id.to_string()).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn scale_up_and_down_are_seen_within_two_seconds() {
    if !require_images() {
        return;
    }
    let swarm = Swarm::init();
    let net = swarm.network("swarm-scale");
    let dir = TestDirectory::start(&[("BAKER_DOCKER", "swarm"), ("BAKER_STORE", "memory")]).await;
    let baker = unique("svc");
    let name = greeting_service(&net, &baker, 1, &["--label", "baker.version=2"]);
    converge(&dir.client, &name, &baker, 1).await;
    let first = instances(&dir.client, &baker).await.remove(0);
    assert_eq!(first.id.as_str(), format!("{name}.1"), "service and slot");
    assert_eq!(first.version.as_str(), "2");
    assert_eq!(first.port, 8080);
    assert_eq!(
        first.node.as_ref().map(ToString::to_string),
        Some(swarm.node())
    );
    // The address is the task's on the overlay.
    task_container(&name, &net, first.address.as_str());

    docker_ok(&["service", "scale", "--detach", &format!("{name}=3")]);
    let late = converge(&dir.client, &name, &baker, 3).await;
    eprintln!("scale 1 -> 3: the directory lists the new tasks {late:?} after swarm runs them");
    assert!(
        late <= SEEN_WITHIN,
        "scale up seen {late:?} after swarm ran the tasks"
    );
    let ids: Vec<String> = instances(&dir.client, &baker)
        .await
        .iter()
        .map(|i| i.id.to_string())
        .collect();
    assert_eq!(ids, [1, 2, 3].map(|s| format!("{name}.{s}")));

    let asked = Instant::now();
    docker_ok(&["service", "scale", "--detach", &format!("{name}=1")]);
    eventually(
        SEEN_WITHIN * 2,
        "the scale down in the directory",
        || async { (instances(&dir.client, &baker).await.len() == 1).then_some(()) },
    )
    .await;
    let took = asked.elapsed();
    eprintln!("scale 3 -> 1: the directory lists one task {took:?} after the command");
    assert!(took <= SEEN_WITHIN, "scale down seen after {took:?}");
    drop(dir);
    drop(swarm);
}

/// The zone the directory gives the only instance of `service`, once it lists one.
async fn zone_of(client: &DirectoryClient, service: &str) -> Option<String> {
    instances(client, service)
        .await
        .first()
        .and_then(|i| i.zone.as_ref().map(ToString::to_string))
}

#[tokio::test]
async fn a_task_is_in_its_services_zone_else_its_nodes_and_follows_the_node_label() {
    if !require_images() {
        return;
    }
    let swarm = Swarm::init();
    let net = swarm.network("swarm-zone");
    let node = docker_ok(&["info", "--format", "{{.Swarm.NodeID}}"]);
    docker_ok(&["node", "update", "--label-add", "baker.zone=zone-a", &node]);
    // The directory's own zone is its engine's containers', not the swarm's tasks'.
    let dir = TestDirectory::start(&[
        ("BAKER_DOCKER", "swarm"),
        ("BAKER_STORE", "memory"),
        ("BAKER_ZONE", "zone-dir"),
    ])
    .await;
    let by_node = unique("svc");
    let by_node_name = greeting_service(&net, &by_node, 1, &[]);
    let by_label = unique("svc");
    let by_label_name = greeting_service(&net, &by_label, 1, &["--label", "baker.zone=zone-s"]);
    converge(&dir.client, &by_node_name, &by_node, 1).await;
    converge(&dir.client, &by_label_name, &by_label, 1).await;
    assert_eq!(
        zone_of(&dir.client, &by_node).await.as_deref(),
        Some("zone-a")
    );
    assert_eq!(
        zone_of(&dir.client, &by_label).await.as_deref(),
        Some("zone-s")
    );

    // A new node label is a node event: the task takes the new zone; the service's stays.
    docker_ok(&["node", "update", "--label-add", "baker.zone=zone-b", &node]);
    eventually(WAIT, "the task in the node's new zone", || async {
        (zone_of(&dir.client, &by_node).await.as_deref() == Some("zone-b")).then_some(())
    })
    .await;
    docker_ok(&["node", "update", "--label-rm", "baker.zone", &node]);
    eventually(
        WAIT,
        "the task in no zone once the node has none",
        || async { zone_of(&dir.client, &by_node).await.is_none().then_some(()) },
    )
    .await;
    assert_eq!(
        zone_of(&dir.client, &by_label).await.as_deref(),
        Some("zone-s")
    );
    let table = baker(&dir.url, None, &["instances"]).await.ok();
    assert!(
        table
            .stdout
            .lines()
            .next()
            .is_some_and(|h| h.contains(" ZONE ")),
        "{}",
        table.stdout
    );
    drop(dir);
    drop(swarm);
}

#[tokio::test]
async fn a_killed_task_leaves_within_two_seconds_and_its_replacement_comes() {
    if !require_images() {
        return;
    }
    let swarm = Swarm::init();
    let net = swarm.network("swarm-kill");
    let dir = TestDirectory::start(&[("BAKER_DOCKER", "swarm"), ("BAKER_STORE", "memory")]).await;
    let baker = unique("svc");
    let name = greeting_service(&net, &baker, 2, &[]);
    converge(&dir.client, &name, &baker, 2).await;
    let before = instances(&dir.client, &baker).await;
    let victim = &before[0];
    let container = task_container(&name, &net, victim.address.as_str());
    let killed = Instant::now();
    docker_ok(&["kill", &container]);
    eventually(
        SEEN_WITHIN * 2,
        "the killed task to leave the directory",
        || async {
            let now = instances(&dir.client, &baker).await;
            (!now.iter().any(|i| i.address == victim.address)).then_some(())
        },
    )
    .await;
    let took = killed.elapsed();
    eprintln!("a killed task left the directory {took:?} after docker kill");
    assert!(took <= SEEN_WITHIN, "the killed task left after {took:?}");
    // Swarm starts a new task in the slot; it comes back under the same id, at a new address.
    let back = eventually(WAIT, "the replacement task in the directory", || async {
        let now = instances(&dir.client, &baker).await;
        (now.len() == 2 && now.iter().all(|i| i.address != victim.address)).then_some(now)
    })
    .await;
    assert!(back.iter().any(|i| i.id == victim.id), "{back:?}");
    drop(dir);
    drop(swarm);
}

// Several threads: the load keeps its pace while the test waits on the docker CLI.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rolling_update_under_load_loses_no_request() {
    if !require_images() {
        return;
    }
    let swarm = Swarm::init();
    let net = swarm.network("swarm-update");
    let baker = unique("svc");
    let name = greeting_service(
        &net,
        &baker,
        2,
        &[
            "--env",
            "BAKER_STOP_DELAY=1s",
            "--update-parallelism",
            "1",
            "--update-delay",
            "0s",
        ],
    );
    // The directory and the ambassador run as containers on the overlay, as in a stack: the
    // tasks' overlay addresses are not reachable from the host.
    let socket = "/var/run/docker.sock:/var/run/docker.sock:ro";
    let directory = Container::run(
        "swarm-directory",
        &[
            "--network",
            &net,
            "--user",
            "root",
            "-v",
            socket,
            "-e",
            "BAKER_DOCKER=swarm",
            "-e",
            &format!("BAKER_DOCKER_NETWORK={net}"),
            "-p",
            "127.0.0.1::7700",
            &image("directory"),
        ],
    );
    let ambassador = Container::run(
        "swarm-ambassador",
        &[
            "--network",
            &net,
            "-e",
            &format!("BAKER_DIRECTORY=http://{}:7700", directory.name),
            "-e",
            &format!("BAKER_ROUTES={baker}=8000"),
            "-p",
            "127.0.0.1::8000",
            &image("ambassador"),
        ],
    );
    let published = |c: &Container, port: &str| {
        docker_ok(&["port", &c.name, port])
            .lines()
            .next()
            .unwrap_or_default()
            .to_owned()
    };
    let client = DirectoryClient::new(
        &format!("http://{}", published(&directory, "7700/tcp")),
        None,
    )
    .expect("a directory client");
    converge(&client, &name, &baker, 2).await;
    let url = format!("http://{}/greeting", published(&ambassador, "8000/tcp"));
    let http = reqwest::Client::new();
    eventually(
        WAIT,
        "both tasks answering through the ambassador",
        || async {
            let mut seen = std::collections::BTreeSet::new();
            for _ in 0..20 {
                if let Ok(instance) = baker_tests::load::greet(&http, &url).await {
                    seen.insert(instance);
                }
            }
            (seen.len() == 2).then_some(())
        },
    )
    .await;

    let load = Paced::start(&url, 200.0, 8);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let started = Instant::now();
    // --detach=false waits until swarm has replaced both tasks.
    let out = docker(&[
        "service",
        "update",
        "--force",
        "--detach=false",
        "--quiet",
        &name,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let took = started.elapsed();
    eprintln!("update returned at {:?} of the load", load.elapsed());
    converge(&client, &name, &baker, 2).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let load_took = load.elapsed();
    let outcome = load.finish().await;
    let by_instance = outcome.instances_between(Duration::ZERO, Duration::from_secs(3600));
    let mut t = Duration::ZERO;
    while t < load_took {
        eprintln!(
            "{t:?}: {:?}",
            outcome.instances_between(t, t + Duration::from_secs(1))
        );
        t += Duration::from_secs(1);
    }
    eprintln!(
        "rolling update of 2 tasks took {took:?}; {} answers, {} failed; by instance {by_instance:?}",
        outcome.answers.len(),
        outcome.failures.len()
    );
    assert!(
        outcome.failures.is_empty(),
        "{} of {} requests failed during the rolling update: {:?}",
        outcome.failures.len(),
        outcome.answers.len() + outcome.failures.len(),
        &outcome.failures[..outcome.failures.len().min(10)]
    );
    // Four tasks answered: the two replaced and the two that replaced them.
    assert!(by_instance.len() >= 4, "{by_instance:?}");
    drop(ambassador);
    drop(directory);
    drop(swarm);
}

#[tokio::test]
async fn a_drained_node_s_tasks_leave_the_table_before_their_containers_stop() {
    if !require_images() {
        return;
    }
    let swarm = Swarm::init();
    let net = swarm.network("swarm-drain");
    let dir = TestDirectory::start(&[("BAKER_DOCKER", "swarm"), ("BAKER_STORE", "memory")]).await;
    let baker = unique("svc");
    // Each task answers (and runs) 3 s past its SIGTERM.
    let name = greeting_service(&net, &baker, 2, &["--env", "BAKER_STOP_DELAY=3s"]);
    converge(&dir.client, &name, &baker, 2).await;
    let running = || {
        docker_ok(&[
            "ps",
            "-q",
            "--filter",
            &format!("label=com.docker.swarm.service.name={name}"),
        ])
        .lines()
        .count()
    };
    assert_eq!(running(), 2);
    let node = docker_ok(&["info", "--format", "{{.Swarm.NodeID}}"]);
    let drained = Instant::now();
    docker_ok(&["node", "update", "--availability", "drain", &node]);
    eventually(
        SEEN_WITHIN * 2,
        "the drained node's tasks to leave the table",
        || async {
            instances(&dir.client, &baker)
                .await
                .is_empty()
                .then_some(())
        },
    )
    .await;
    let took = drained.elapsed();
    let still = running();
    eprintln!("drain: the tasks left the table {took:?} after the command, {still} container(s) still running");
    assert!(took <= SEEN_WITHIN, "the drained tasks left after {took:?}");
    assert_eq!(
        still, 2,
        "the containers still run when their tasks leave the table"
    );
    // Back to active: swarm starts the tasks again, and they are registered again.
    docker_ok(&["node", "update", "--availability", "active", &node]);
    converge(&dir.client, &name, &baker, 2).await;
    drop(dir);
    drop(swarm);
}

// Several threads: the load keeps its pace while the test waits on the docker CLI.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_directory_s_task_moved_loses_no_request_and_follows_on() {
    if !require_images() {
        return;
    }
    let swarm = Swarm::init();
    let net = swarm.network("swarm-move");
    let baker = unique("svc");
    let name = greeting_service(&net, &baker, 2, &[]);
    // The directory as the stack runs it: a service on a manager, found by DNS (dnsrr).
    let directory = unique("directory");
    docker_ok(&[
        "service",
        "create",
        "--detach",
        "--quiet",
        "--no-resolve-image",
        "--name",
        &directory,
        "--network",
        &net,
        "--endpoint-mode",
        "dnsrr",
        "--user",
        "root",
        "--mount",
        "type=bind,source=/var/run/docker.sock,target=/var/run/docker.sock,readonly",
        "--env",
        "BAKER_DOCKER=swarm",
        "--constraint",
        "node.role==manager",
        &image("directory"),
    ]);
    let ambassador = Container::run(
        "swarm-ambassador",
        &[
            "--network",
            &net,
            "-e",
            &format!("BAKER_DIRECTORY=http://{directory}:7700"),
            "-e",
            &format!("BAKER_ROUTES={baker}=8000"),
            "-p",
            "127.0.0.1::8000",
            &image("ambassador"),
        ],
    );
    let port = docker_ok(&["port", &ambassador.name, "8000/tcp"]);
    let url = format!(
        "http://{}/greeting",
        port.lines().next().unwrap_or_default()
    );
    let http = reqwest::Client::new();
    let answering = |n: usize| {
        let (http, url) = (http.clone(), url.clone());
        async move {
            let mut seen = std::collections::BTreeSet::new();
            for _ in 0..30 {
                if let Ok(instance) = baker_tests::load::greet(&http, &url).await {
                    seen.insert(instance);
                }
            }
            (seen.len() == n).then_some(())
        }
    };
    eventually(WAIT, "both tasks answering through the ambassador", || {
        answering(2)
    })
    .await;

    let load = Paced::start(&url, 100.0, 4);
    let moved = {
        let directory = directory.clone();
        tokio::task::spawn_blocking(move || {
            docker(&[
                "service",
                "update",
                "--force",
                "--detach=false",
                "--quiet",
                &directory,
            ])
        })
    };
    let out = moved.await.expect("the update's thread");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let outcome = load.finish().await;
    eprintln!(
        "the directory's task replaced: {} answers, {} failed",
        outcome.answers.len(),
        outcome.failures.len()
    );
    assert!(
        outcome.failures.is_empty(),
        "{} requests failed while the directory moved: {:?}",
        outcome.failures.len(),
        &outcome.failures[..outcome.failures.len().min(10)]
    );
    // The new directory follows the swarm, and the ambassador follows it: a third task serves.
    docker_ok(&["service", "scale", "--detach", &format!("{name}=3")]);
    eventually(
        WAIT,
        "the third task answering through the ambassador",
        || answering(3),
    )
    .await;
    drop(ambassador);
    drop(swarm);
}

#[tokio::test]
async fn the_quickstart_stack_runs_secured_and_its_client_is_answered() {
    if !require_images() {
        return;
    }
    let _swarm = Swarm::init();
    let root = baker_tests::docker::repo_root();
    let secrets = tempfile::Builder::new()
        .prefix("baker-stack-secrets-")
        .tempdir()
        .expect("a directory for the secrets");
    let made = std::process::Command::new("bash")
        .arg(root.join("scripts/ha-secrets"))
        .arg(secrets.path())
        .output()
        .expect("running scripts/ha-secrets");
    assert!(made.status.success(), "{made:?}");
    let stack = unique("stack").replace('-', "");
    let port = baker_tests::free_port().to_string();
    // As the docs say to run it: scripts/quickstart, on the swarm this test made.
    let quickstart = |args: &[&str]| {
        std::process::Command::new("bash")
            .arg(root.join("scripts/quickstart"))
            .args(args)
            .env("BAKER_PROJECT", &stack)
            .env("BAKER_HA_SECRETS", secrets.path())
            .env("BAKER_GREETING_PUBLISH", &port)
            .stdin(std::process::Stdio::null())
            .output()
            .expect("running scripts/quickstart")
    };
    let deployed = quickstart(&["--no-build", "swarm", "-d"]);
    assert!(deployed.status.success(), "{deployed:?}");
    let said = String::from_utf8_lossy(&deployed.stderr);
    assert!(
        said.contains(&format!(
            "==> deploying compose/swarm.yml as the stack {stack}"
        )) && !said.contains("making a one-node swarm"),
        "{said}"
    );
    let client = format!("{stack}_client");
    eventually(
        Duration::from_secs(90),
        "the stack's client to be answered through its ambassador",
        || async {
            let logs = docker(&["service", "logs", "--no-task-ids", &client]);
            String::from_utf8_lossy(&logs.stdout)
                .contains("answered by")
                .then_some(())
        },
    )
    .await;
    // The directory serves HTTPS only and reads need a token: the operator's reads, none fails.
    let directory = docker_ok(&["ps", "-q", "-f", &format!("name={stack}_directory")]);
    let operator = std::fs::read_to_string(secrets.path().join("operator.env")).unwrap();
    let operator = operator.trim();
    let cli = |token: Option<&str>| {
        let mut args = vec![
            "exec",
            "-e",
            "BAKER_DIRECTORY=https://localhost:7700",
            "-e",
            "BAKER_CA=/run/secrets/baker-ca",
        ];
        if let Some(t) = token {
            args.extend(["-e", t]);
        }
        args.extend([directory.as_str(), "baker", "instances", "greeting"]);
        let out = docker(&args);
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    };
    let listed = cli(Some(operator));
    assert!(
        listed.contains(&format!("{stack}_greeting.1"))
            && listed.contains(&format!("{stack}_greeting.2")),
        "{listed}"
    );
    let refused = cli(None);
    assert!(refused.contains("(401 Unauthorized)"), "{refused}");
    // `down` removes the stack and leaves alone the swarm it did not make.
    let down = quickstart(&["swarm", "down"]);
    assert!(down.status.success(), "{down:?}");
    assert!(
        !String::from_utf8_lossy(&down.stderr).contains("leaving the one-node swarm"),
        "{down:?}"
    );
    assert_eq!(
        docker_ok(&["info", "--format", "{{.Swarm.LocalNodeState}}"]),
        "active"
    );
}
