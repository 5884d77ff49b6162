//! The compose topologies of `compose/` on the real engine: the quick start comes up and its
//! client, which knows only `GREETING_PORT_8000_TCP`, reaches both Greeting instances through
//! the ambassador; the canary file sends part of the traffic to version 2.

use std::time::Duration;

use baker_tests::docker::{require_images, Compose};
use baker_tests::eventually;

const PUBLISH_ANY: [(&str, &str); 3] = [
    ("BAKER_DIRECTORY_PUBLISH", "127.0.0.1:0"),
    ("BAKER_GREETING_PUBLISH", "127.0.0.1:0"),
    ("BAKER_ADMIN_PUBLISH", "127.0.0.1:0"),
];

#[tokio::test]
async fn quickstart_client_reaches_both_instances_through_the_ambassador() {
    if !require_images() {
        return;
    }
    let project = Compose::new("qs", &["compose/quickstart.yml"], &PUBLISH_ANY);
    project.up();
    eventually(
        Duration::from_secs(60),
        "the quick start's client to be answered by greeting-1 and greeting-2",
        || async {
            let logs = project.logs("client");
            (logs.contains("instance=greeting-1") && logs.contains("instance=greeting-2"))
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

#[tokio::test]
async fn canary_route_sends_part_of_the_traffic_to_version_2() {
    if !require_images() {
        return;
    }
    let project = Compose::new(
        "canary",
        &["compose/quickstart.yml", "compose/canary.yml"],
        &PUBLISH_ANY,
    );
    project.up();
    eventually(
        Duration::from_secs(60),
        "the canary route to be set and version 2 to answer the client",
        || async {
            let logs = project.logs("client");
            logs.contains("instance=greeting-v2 version=2")
                .then_some(())
        },
    )
    .await;
    // The route container set the route on its first run (it waits for a healthy directory),
    // so `up` shows its success rather than a failure followed by a restart it does not show.
    let route = project.container("route");
    let runs = baker_tests::docker::docker_ok(&[
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
    let project = Compose::new("labels", &["compose/labels.yml"], &env);
    project.up();
    eventually(
        Duration::from_secs(60),
        "the labels file's client to be answered by greeting-1 and greeting-2",
        || async {
            let logs = project.logs("client");
            (logs.contains("instance=greeting-1") && logs.contains("instance=greeting-2"))
                .then_some(())
        },
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
