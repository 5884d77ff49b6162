//! The compose topologies of `compose/` on the real engine: the quick start comes up and its
//! client, which knows only `GREETING_PORT_8000_TCP`, reaches both Greeting instances through
//! the ambassador; the canary file sends part of the traffic to version 2; the HA file keeps
//! answering while a directory replica and an etcd member are killed.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use baker_tests::docker::{docker_ok, repo_root, require_images, Compose};
use baker_tests::{bin, eventually};

const PUBLISH_ANY: [(&str, &str); 3] = [
    ("BAKER_DIRECTORY_PUBLISH", "127.0.0.1:0"),
    ("BAKER_GREETING_PUBLISH", "127.0.0.1:0"),
    ("BAKER_ADMIN_PUBLISH", "127.0.0.1:0"),
];

/// What the client prints when both Greeting instances have answered it.
const BOTH_ANSWERED: [&str; 2] = ["instance=greeting-1", "instance=greeting-2"];

/// Brings up the project `prefix` of `files` with `env`, and waits (up to a minute) for `what`:
/// until the client's log holds each of `answers`.
async fn up_until_answered(
    prefix: &str,
    files: &[&str],
    env: &[(&str, &str)],
    what: &str,
    answers: &[&str],
) -> Compose {
    let project = Compose::new(prefix, files, env);
    project.up();
    eventually(Duration::from_secs(60), what, || async {
        let logs = project.logs("client");
        answers.iter().all(|a| logs.contains(a)).then_some(())
    })
    .await;
    project
}

/// Asserts that `baker instances greeting` against `directory` lists both instances.
fn lists_both_instances(directory: &str, env: &[(&str, &str)]) {
    let listed = baker_as(directory, env, &["instances", "greeting"]);
    assert!(
        listed.contains("greeting-1") && listed.contains("greeting-2"),
        "{listed}"
    );
}

/// `scripts/quickstart ARGS` run from `root` (a checkout) with `env`: its status and what it
/// printed.
fn quickstart(root: &Path, args: &[&str], env: &[(&str, &str)]) -> (bool, String) {
    let out = Command::new("bash")
        .arg(root.join("scripts/quickstart"))
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .expect("running scripts/quickstart");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[tokio::test]
async fn quickstart_client_reaches_both_instances_through_the_ambassador() {
    if !require_images() {
        return;
    }
    // The script itself, with the images as they are: nothing is built, and the ambassador
    // reports under the name its compose file gives it.
    let project = Compose::new("qs", &["compose/quickstart.yml"], &PUBLISH_ANY);
    let mut env = PUBLISH_ANY.to_vec();
    env.push(("BAKER_PROJECT", &project.project));
    let (ok, said) = quickstart(&repo_root(), &["--no-build", "-d"], &env);
    assert!(ok, "scripts/quickstart --no-build -d failed:\n{said}");
    assert!(
        said.contains(&format!(
            "==> starting quickstart as the compose project {} (in the background",
            project.project
        )) && !said.contains("building"),
        "{said}"
    );
    eventually(
        Duration::from_secs(60),
        "the quick start's client to be answered by greeting-1 and greeting-2",
        || async {
            let logs = project.logs("client");
            BOTH_ANSWERED.iter().all(|a| logs.contains(a)).then_some(())
        },
    )
    .await;
    let directory = format!("http://{}", project.port("directory", 7700));
    eventually(
        Duration::from_secs(20),
        "the ambassador to report as `ambassador`",
        || async {
            let listed = baker(&directory, &["ambassadors", "--no-headers"]);
            listed
                .lines()
                .any(|l| l.starts_with("ambassador "))
                .then_some(())
        },
    )
    .await;
    // `stop` (and `down`) stop the registrars before the directory they depend on, so each
    // deregisters at once instead of retrying against a directory that is gone.
    project.run_ok(&["stop"]);
    for registrar in ["registrar-1", "registrar-2"] {
        let logs = project.logs(registrar);
        assert!(
            logs.contains("deregistered greeting/greeting-"),
            "{registrar} did not deregister cleanly on stop:\n{logs}"
        );
    }
}

#[test]
fn quickstart_with_no_build_names_the_images_it_lacks_and_starts_nothing() {
    if !require_images() {
        return;
    }
    // A checkout whose quick start needs an image this engine does not have.
    let root = tempfile::tempdir().expect("a temporary directory");
    let missing = format!("nosuch{}", std::process::id());
    std::fs::create_dir_all(root.path().join("scripts")).unwrap();
    std::fs::create_dir_all(root.path().join("compose")).unwrap();
    std::fs::copy(
        repo_root().join("scripts/quickstart"),
        root.path().join("scripts/quickstart"),
    )
    .unwrap();
    let file = std::fs::read_to_string(repo_root().join("compose/quickstart.yml")).unwrap();
    std::fs::write(
        root.path().join("compose/quickstart.yml"),
        file.replace("image: baker/registrar", &format!("image: baker/{missing}")),
    )
    .unwrap();
    let project = baker_tests::docker::unique("qsmissing").replace('-', "");
    let (ok, said) = quickstart(
        root.path(),
        &["--no-build"],
        &[("BAKER_PROJECT", project.as_str())],
    );
    assert!(!ok, "{said}");
    assert_eq!(
        said.trim(),
        format!(
            "scripts/quickstart: error: --no-build, but these images are missing: \
             baker/{missing}; build them with scripts/quickstart (without --no-build) or \
             docker/build.sh {missing}"
        )
    );
    let containers = docker_ok(&[
        "ps",
        "-aq",
        "--filter",
        &format!("label=com.docker.compose.project={project}"),
    ]);
    assert_eq!(containers, "", "nothing was started");
}

#[tokio::test]
async fn canary_route_sends_part_of_the_traffic_to_version_2() {
    if !require_images() {
        return;
    }
    let project = up_until_answered(
        "canary",
        &["compose/quickstart.yml", "compose/canary.yml"],
        &PUBLISH_ANY,
        "the canary route to be set and version 2 to answer the client",
        &["instance=greeting-v2 version=2"],
    )
    .await;
    // The route container set the route on its first run (it waits for a healthy directory),
    // so `up` shows its success rather than a failure followed by a restart it does not show.
    let route = project.container("route");
    let runs = docker_ok(&[
        "inspect",
        "--format",
        "{{.RestartCount}} {{.State.ExitCode}}",
        &route,
    ]);
    assert_eq!(runs, "0 0", "restarts and exit code of the route container");
    // The route holds: version 1 keeps answering most requests.
    let routes = project.run_ok(&["exec", "-T", "directory", "baker", "route", "ls"]);
    assert!(routes.contains("greeting"), "{routes}");
    let logs = project.logs("client");
    assert!(logs.contains("version=1"), "{logs}");
}

#[tokio::test]
async fn labels_file_discovers_containers_without_registrars() {
    if !require_images() {
        return;
    }
    let network = baker_tests::docker::unique("labels");
    let mut env = PUBLISH_ANY.to_vec();
    env.push(("BAKER_NETWORK", &network));
    let project = up_until_answered(
        "labels",
        &["compose/labels.yml"],
        &env,
        "the labels file's client to be answered by greeting-1 and greeting-2",
        &BOTH_ANSWERED,
    )
    .await;
    // Registered by the directory itself, from the labels: no registrar runs in this file.
    let logs = project.logs("directory");
    for instance in ["greeting-1", "greeting-2"] {
        assert!(
            logs.lines().any(|l| l.contains("registered greeting/")
                && l.contains(instance)
                && l.contains(", docker)")),
            "{logs}"
        );
    }
}

const HA_PUBLISH_ANY: [(&str, &str); 4] = [
    ("BAKER_DIRECTORY_1_PUBLISH", "127.0.0.1:0"),
    ("BAKER_DIRECTORY_2_PUBLISH", "127.0.0.1:0"),
    ("BAKER_GREETING_PUBLISH", "127.0.0.1:0"),
    ("BAKER_ADMIN_PUBLISH", "127.0.0.1:0"),
];

/// The host's `baker` CLI against `directory` (one URL or several), which must succeed.
fn baker(directory: &str, args: &[&str]) -> String {
    baker_as(directory, &[], args)
}

/// `baker args...` against `directory`, with `env` (`BAKER_CA`, `BAKER_TOKEN`) set.
fn baker_as(directory: &str, env: &[(&str, &str)], args: &[&str]) -> String {
    let out = Command::new(bin("baker"))
        .args(args)
        .env("BAKER_DIRECTORY", directory)
        .envs(env.iter().copied())
        .output()
        .expect("running baker");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "baker {} against {directory} failed ({}):\n{text}",
        args.join(" "),
        out.status
    );
    text
}

/// The client's failed requests (it prints `failed: <why>` for each) and its answers.
fn client_counts(logs: &str) -> (usize, usize) {
    let failed = logs.lines().filter(|l| l.contains("failed: ")).count();
    let answered = logs.lines().filter(|l| l.contains("answered by ")).count();
    (failed, answered)
}

#[tokio::test]
async fn ha_file_keeps_answering_through_a_killed_replica_and_etcd_member() {
    if !require_images() {
        return;
    }
    // The throwaway CA, certificates and tokens the file runs with.
    let secrets = tempfile::Builder::new()
        .prefix("baker-ha-secrets-")
        .tempdir()
        .expect("a directory for the secrets");
    let made = Command::new("bash")
        .arg(repo_root().join("scripts/ha-secrets"))
        .arg(secrets.path())
        .output()
        .expect("running scripts/ha-secrets");
    assert!(made.status.success(), "{made:?}");
    let secrets_dir = secrets.path().to_str().unwrap();
    let operator = std::fs::read_to_string(secrets.path().join("operator.env")).unwrap();
    let operator = operator
        .trim()
        .trim_start_matches("BAKER_TOKEN=")
        .to_owned();
    let ca = secrets.path().join("ca.pem");
    let cli: [(&str, &str); 2] = [
        ("BAKER_CA", ca.to_str().unwrap()),
        ("BAKER_TOKEN", &operator),
    ];
    let mut env = HA_PUBLISH_ANY.to_vec();
    env.push(("BAKER_HA_SECRETS", secrets_dir));
    let project = up_until_answered(
        "ha",
        &["compose/ha.yml"],
        &env,
        "the HA file's client to be answered by greeting-1 and greeting-2",
        &BOTH_ANSWERED,
    )
    .await;
    // Until both instances are registered the ambassador may have nothing to route to; from
    // here on, no request may fail.
    let (failed_before, _) = client_counts(&project.logs("client"));
    let replica_2 = format!("https://{}", project.port("directory-2", 7700));
    let both = format!("https://{},{replica_2}", project.port("directory-1", 7700));
    // Reads are closed, and the registrars' tokens may not route.
    let closed = Command::new(bin("baker"))
        .args(["services"])
        .env("BAKER_DIRECTORY", &replica_2)
        .env("BAKER_CA", &ca)
        .env_remove("BAKER_TOKEN")
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&closed.stderr).contains("(401 Unauthorized)"),
        "{closed:?}"
    );
    let ambassador = project.logs("ambassador");
    assert!(
        ambassador
            .lines()
            .any(|l| l.contains("watching the directory") && l.contains("https://directory-1:7700")),
        "the ambassador should watch the first replica it lists:\n{ambassador}"
    );

    // The replica the ambassador watches and the registrars heartbeat to dies without a word.
    docker_ok(&["kill", &project.container("directory-1")]);
    let killed = Instant::now();
    eventually(
        Duration::from_secs(20),
        "the ambassador to watch directory-2",
        || async {
            project
                .logs("ambassador")
                .lines()
                .any(|l| l.contains("watching the directory") && l.contains("directory-2"))
                .then_some(())
        },
    )
    .await;
    // Past the instances' 3 s TTL: they stay because the registrars heartbeat through the
    // other replica, which lists both (alone, and as the CLI's fallback).
    tokio::time::sleep(Duration::from_secs(5).saturating_sub(killed.elapsed())).await;
    for directory in [&replica_2, &both] {
        lists_both_instances(directory, &cli);
    }
    // A change through the surviving replica reaches the ambassador.
    let set = baker_as(
        &both,
        &cli,
        &[
            "route",
            "set",
            "greeting",
            "1=100",
            "--wait",
            "--timeout",
            "20s",
        ],
    );
    assert!(set.contains("route of greeting set: 1=100"), "{set}");

    // One etcd member dies (the first the replicas list): the other two keep a quorum, writes
    // commit and leases are renewed.
    docker_ok(&["kill", &project.container("etcd-1")]);
    let killed = Instant::now();
    let cleared = baker_as(&replica_2, &cli, &["route", "clear", "greeting"]);
    assert!(cleared.contains("greeting"), "{cleared}");
    let routes = baker_as(&replica_2, &cli, &["route", "list"]);
    assert!(
        !routes.contains("1=100"),
        "the route was not cleared:\n{routes}"
    );
    let (_, answered_before) = client_counts(&project.logs("client"));
    tokio::time::sleep(Duration::from_secs(5).saturating_sub(killed.elapsed())).await;
    lists_both_instances(&replica_2, &cli);

    let logs = project.logs("client");
    let (failed, answered) = client_counts(&logs);
    assert!(
        answered > answered_before,
        "the client was not answered after etcd-1 died:\n{logs}"
    );
    assert_eq!(
        failed - failed_before,
        0,
        "requests failed after both instances were up:\n{logs}"
    );
    project.run_ok(&["down", "-v", "-t", "2"]);
}
