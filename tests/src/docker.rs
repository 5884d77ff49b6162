//! Docker fixtures for the end-to-end tests: uniquely named containers, networks and compose
//! projects that remove themselves when dropped (also on panic), driven through the `docker`
//! CLI, and a check that Baker's images were built.
//!
//! The images come from `docker/build.sh` (the README's test command runs it before the
//! tests); [`require_images`] fails with a message naming that command when one is missing.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::{require, Needs};

/// Baker's images, as `docker/build.sh` tags them.
pub const IMAGES: [&str; 5] = [
    "baker/directory",
    "baker/registrar",
    "baker/ambassador",
    "baker/greeting",
    "baker/etcd",
];

/// The repository's root (for `compose/` and `docker/`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// [`require`]s Docker, then checks that every image of [`IMAGES`] exists.
///
/// Returns `false` only when the user opted out of Docker tests (`BAKER_TEST_SKIP=docker`).
pub fn require_images() -> bool {
    require_images_of(&IMAGES)
}

/// [`require`]s Docker, then checks that every image of `images` (some of [`IMAGES`]) exists.
///
/// Returns `false` only when the user opted out of Docker tests (`BAKER_TEST_SKIP=docker`).
pub fn require_images_of(images: &[&str]) -> bool {
    if !require(Needs::Docker) {
        return false;
    }
    let missing: Vec<&str> = images
        .iter()
        .copied()
        .filter(|image| {
            !docker(&["image", "inspect", "--format", "{{.Id}}", image])
                .status
                .success()
        })
        .collect();
    assert!(
        missing.is_empty(),
        "the image(s) {} are missing: build them with `docker/build.sh` (the README's test \
         command does it before the tests)",
        missing.join(", ")
    );
    true
}

/// The engine's major version (20 for 20.10), to tell which behaviours to expect.
pub fn engine_major() -> u32 {
    docker_ok(&["version", "--format", "{{.Server.Version}}"])
        .split('.')
        .next()
        .and_then(|m| m.parse().ok())
        .unwrap_or(0)
}

/// A name no other test (or earlier run) uses: `baker-t-<prefix>-<pid>-<n>`.
pub fn unique(prefix: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() % 10_000)
        .unwrap_or(0);
    format!("baker-t-{prefix}-{}-{n}{nanos}", std::process::id())
}

/// Runs `docker <args>`, returning its output whatever the status.
pub fn docker(args: &[&str]) -> Output {
    Command::new("docker")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running docker {}: {e}", args.join(" ")))
}

/// Runs `docker <args>` and returns its trimmed stdout, panicking with stderr on failure.
pub fn docker_ok(args: &[&str]) -> String {
    let out = docker(args);
    assert!(
        out.status.success(),
        "docker {} failed ({}): {}{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A container started with `docker run -d`, removed (with its volumes) when dropped.
#[derive(Debug)]
pub struct Container {
    pub name: String,
}

impl Container {
    /// `docker run -d --name <unique(prefix)> <args...>`; `args` end with the image (and
    /// its arguments).
    pub fn run(prefix: &str, args: &[&str]) -> Container {
        let name = unique(prefix);
        let mut all = vec!["run", "-d", "--name", &name];
        all.extend_from_slice(args);
        let c = Container { name: name.clone() };
        docker_ok(&all);
        c
    }

    /// `docker inspect --format <format>` of this container.
    pub fn inspect(&self, format: &str) -> String {
        docker_ok(&["inspect", "--format", format, &self.name])
    }

    /// The container's address on `network` (`bridge` for the default bridge).
    pub fn ip(&self, network: &str) -> String {
        let ip = self.inspect(&format!(
            "{{{{with index .NetworkSettings.Networks {network:?}}}}}{{{{.IPAddress}}}}{{{{end}}}}"
        ));
        assert!(!ip.is_empty(), "{} has no address on {network}", self.name);
        ip
    }

    /// The container's global IPv6 address on `network` (a network with IPv6).
    pub fn ipv6(&self, network: &str) -> String {
        let ip = self.inspect(&format!(
            "{{{{with index .NetworkSettings.Networks {network:?}}}}}{{{{.GlobalIPv6Address}}}}{{{{end}}}}"
        ));
        assert!(
            !ip.is_empty(),
            "{} has no IPv6 address on {network}",
            self.name
        );
        ip
    }

    /// Whether the container is running.
    pub fn running(&self) -> bool {
        docker(&["inspect", "--format", "{{.State.Running}}", &self.name])
            .stdout
            .starts_with(b"true")
    }

    /// `starting`, `healthy`, `unhealthy`, or empty without a HEALTHCHECK.
    pub fn health(&self) -> String {
        self.inspect("{{if .State.Health}}{{.State.Health.Status}}{{end}}")
    }

    /// Its exit code (once stopped).
    pub fn exit_code(&self) -> i64 {
        self.inspect("{{.State.ExitCode}}").parse().unwrap_or(-1)
    }

    /// Everything it printed (stdout and stderr).
    pub fn logs(&self) -> String {
        let out = docker(&["logs", &self.name]);
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    /// `docker stop -t <grace>`; returns how long the stop took.
    pub fn stop(&self, grace_secs: u32) -> Duration {
        let started = Instant::now();
        docker_ok(&["stop", "-t", &grace_secs.to_string(), &self.name]);
        started.elapsed()
    }

    /// Waits (up to `timeout`) for the container to exit, returning its exit code.
    pub async fn wait_exit(&self, timeout: Duration) -> i64 {
        let deadline = Instant::now() + timeout;
        while self.running() {
            assert!(
                Instant::now() < deadline,
                "{} still runs after {timeout:?}; its log:\n{}",
                self.name,
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.exit_code()
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if std::thread::panicking() || std::env::var_os("BAKER_TEST_ECHO").is_some() {
            eprintln!("--- log of container {} ---\n{}", self.name, self.logs());
        }
        let _ = docker(&["rm", "-f", "-v", &self.name]);
    }
}

/// A user-defined bridge network, removed when dropped.
#[derive(Debug)]
pub struct Network {
    pub name: String,
}

impl Network {
    pub fn create(prefix: &str) -> Network {
        let name = unique(prefix);
        docker_ok(&["network", "create", &name]);
        Network { name }
    }

    /// A network with IPv6 as well as IPv4 (`docker network create --ipv6 --subnet
    /// fd00:ba6e:X:Y::/64`), on a unique-local subnet of its own.
    pub fn create_ipv6(prefix: &str) -> Network {
        let name = unique(prefix);
        let mut tried = Vec::new();
        // Another test's network may hold a subnet already: try a few.
        for attempt in 0..8u32 {
            let seed = std::process::id()
                .wrapping_mul(2_654_435_761)
                .wrapping_add(attempt.wrapping_mul(40_503))
                .wrapping_add(
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.subsec_nanos())
                        .unwrap_or(0),
                );
            let subnet = format!("fd00:ba6e:{:x}:{:x}::/64", seed >> 16, seed & 0xffff);
            let out = docker(&["network", "create", "--ipv6", "--subnet", &subnet, &name]);
            if out.status.success() {
                return Network { name };
            }
            tried.push(format!(
                "{subnet}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        panic!(
            "this Docker engine cannot create a network with IPv6 ({}); tried:\n{}",
            "docker network create --ipv6 --subnet fd00:ba6e:X:Y::/64",
            tried.join("\n")
        )
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        let _ = docker(&["network", "rm", &self.name]);
    }
}

/// The compose command of this machine: `docker-compose` (v1) if present, else `docker compose`.
pub fn compose_command() -> Vec<String> {
    let v1 = Command::new("docker-compose")
        .arg("version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if v1 {
        vec!["docker-compose".into()]
    } else {
        vec!["docker".into(), "compose".into()]
    }
}

/// A compose project under a unique name, taken down (with its volumes) when dropped.
#[derive(Debug)]
pub struct Compose {
    pub project: String,
    files: Vec<PathBuf>,
    env: Vec<(String, String)>,
    command: Vec<String>,
}

impl Compose {
    /// A project over `files` (relative to the repository root) with extra environment `env`
    /// for variable substitution; nothing runs until [`Compose::up`].
    pub fn new(prefix: &str, files: &[&str], env: &[(&str, &str)]) -> Compose {
        Compose {
            project: unique(prefix).replace('-', ""),
            files: files.iter().map(|f| repo_root().join(f)).collect(),
            env: env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            command: compose_command(),
        }
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.command[0]);
        cmd.args(&self.command[1..]).arg("-p").arg(&self.project);
        for f in &self.files {
            cmd.arg("-f").arg(f);
        }
        cmd.args(args).stdin(Stdio::null());
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd
    }

    /// Runs `<compose> -p <project> -f ... <args>` and returns its output.
    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().unwrap_or_else(|e| {
            panic!("running {} {}: {e}", self.command.join(" "), args.join(" "))
        })
    }

    /// Like [`Compose::run`], panicking with the output on failure.
    pub fn run_ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "{} {} failed ({}): {}{}",
            self.command.join(" "),
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// `up -d` (no build, no pull: the images are Baker's own).
    pub fn up(&self) {
        self.run_ok(&["up", "-d", "--no-build"]);
    }

    /// The logs of one service (all its containers), without colours or prefixes.
    pub fn logs(&self, service: &str) -> String {
        let out = self.run(&["logs", "--no-color", service]);
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    /// The host address (`127.0.0.1:49153`) where a service's container `port` is published.
    pub fn port(&self, service: &str, port: u16) -> String {
        let address = self.run_ok(&["port", service, &port.to_string()]);
        assert!(
            !address.is_empty() && !address.ends_with(":0"),
            "compose service {service} does not publish port {port}"
        );
        address
    }

    /// The container id of a service (its first container).
    pub fn container(&self, service: &str) -> String {
        let ids = self.run_ok(&["ps", "-q", service]);
        let id = ids.lines().next().unwrap_or_default().to_owned();
        assert!(!id.is_empty(), "compose service {service} has no container");
        id
    }
}

impl Drop for Compose {
    fn drop(&mut self) {
        if std::thread::panicking() || std::env::var_os("BAKER_TEST_ECHO").is_some() {
            let out = self.run(&["logs", "--no-color", "--tail", "60"]);
            eprintln!(
                "--- logs of compose project {} ---\n{}{}",
                self.project,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let _ = self.run(&["down", "-v", "--remove-orphans", "-t", "2"]);
    }
}
