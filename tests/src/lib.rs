//! The harness for Baker's end-to-end tests: real binaries as child processes, on ports of
//! their own, with deadlines instead of sleeps.
//!
//! - [`Proc`] runs one of the workspace's binaries, keeps its log, and kills it when dropped;
//!   then it checks that the log shows no token's secret ([`secrets`]), failing the test
//!   otherwise.
//! - [`eventually`] polls a condition until it holds or a deadline passes.
//! - [`free_port`] hands out a port no other test of the run gets, for programs that cannot
//!   bind port 0 and report it (HAProxy, etcd); Baker's daemons bind port 0.
//! - [`dns::SilentResolver`] gives a child process a DNS resolver that never answers.
//! - [`proxy::LineDropProxy`] stands between a watcher and the directory and loses one line of
//!   the watch stream on demand.
//! - [`etcd::EtcdCluster`] runs a real etcd cluster on loopback and kills, freezes or restarts
//!   its members.
//! - [`browser::Browser`] runs a headless Chromium and drives pages over the DevTools protocol.
//! - [`require`] makes a test that needs HAProxy, Docker, etcd or Chromium fail with a clear message when the
//!   tool is missing (or return early only when the user opted out with `BAKER_TEST_SKIP`).
//!
//! The binaries are found beside the test executable (`target/<profile>/`); the README's test
//! command builds them first (`cargo build --workspace --bins`).

pub mod ambassador;
pub mod browser;
pub mod cli;
pub mod directory;
pub mod dns;
pub mod doc;
pub mod docker;
pub mod etcd;
pub mod greeting;
pub mod load;
pub mod ports;
pub mod proxy;
pub mod secrets;
pub mod tls;

pub use ports::free_port;

use std::future::Future;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Path of a workspace binary, built beside the test executable.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test>-<hash> → target/<profile>/<name>
    let dir = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("target directory");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "binary {name} not found at {}: build the workspace's binaries first \
         (`cargo build --workspace --bins`), as the README's test command does",
        path.display()
    );
    path
}

/// Something a test needs from the machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Needs {
    Haproxy,
    Docker,
    /// `systemd-analyze`, to verify unit files (systemd need not be running).
    Systemd,
    /// `etcd` (Debian's etcd-server), for clusters of real members ([`etcd::EtcdCluster`]).
    Etcd,
    /// `chromium` (Debian's), a real browser for the dashboard ([`browser::Browser`]).
    Chromium,
}

/// Checks that the machine has what a test needs.
///
/// Returns `false` only when the user opted out explicitly
/// (`BAKER_TEST_SKIP=haproxy,docker,systemd,etcd,chromium`);
/// the test should then return. A missing tool without an opt-out fails the test, naming it.
pub fn require(needs: Needs) -> bool {
    let name = match needs {
        Needs::Haproxy => "haproxy",
        Needs::Docker => "docker",
        Needs::Systemd => "systemd",
        Needs::Etcd => "etcd",
        Needs::Chromium => "chromium",
    };
    let skip = std::env::var("BAKER_TEST_SKIP").unwrap_or_default();
    if skip.split(',').any(|s| s.trim() == name) {
        eprintln!("BAKER_TEST_SKIP names {name}: not running this test");
        return false;
    }
    let ok = match needs {
        Needs::Haproxy => Command::new(haproxy_bin())
            .arg("-v")
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false),
        Needs::Docker => Command::new("docker")
            .args(["version", "--format", "{{.Server.APIVersion}}"])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false),
        Needs::Systemd => Command::new("systemd-analyze")
            .arg("--version")
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false),
        Needs::Etcd => etcd::etcd_available(),
        Needs::Chromium => browser::chromium_available(),
    };
    assert!(
        ok,
        "this test needs {name}, which is not available on this machine: install it (the README's test \
         command does), or set BAKER_TEST_SKIP={name} to opt out of the tests that need it"
    );
    true
}

/// The HAProxy binary tests use: `BAKER_HAPROXY`, else `haproxy` from `PATH`, else `/usr/sbin/haproxy`.
pub fn haproxy_bin() -> String {
    if let Ok(p) = std::env::var("BAKER_HAPROXY") {
        return p;
    }
    for dir in std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .chain(["/usr/sbin", "/usr/local/sbin"])
    {
        let p = PathBuf::from(dir).join("haproxy");
        if p.exists() {
            return p.display().to_string();
        }
    }
    "haproxy".into()
}

/// Polls `check` every 20 ms until it returns `Some`, or panics with `what` after `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A child process running one of Baker's binaries (or any program), killed when dropped.
pub struct Proc {
    pub name: String,
    child: Child,
    /// The process leads a process group of its own, killed whole when dropped (for
    /// programs such as Chromium whose launcher does not `exec` and whose helpers outlive it).
    group: bool,
    log: Arc<Mutex<Vec<String>>>,
    readers: Vec<std::thread::JoinHandle<()>>,
}

impl Proc {
    /// Starts `program` with `args` and the extra environment `env` (the rest is inherited,
    /// less any `BAKER_*` variable of the test's own environment).
    pub fn spawn(
        name: &str,
        program: impl Into<PathBuf>,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Proc {
        Self::launch(name, program.into(), args, env, false)
    }

    /// Like [`spawn`](Self::spawn), in a process group of its own: dropping the `Proc` kills the
    /// whole group, children included.
    pub fn spawn_group(
        name: &str,
        program: impl Into<PathBuf>,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Proc {
        Self::launch(name, program.into(), args, env, true)
    }

    fn launch(
        name: &str,
        program: PathBuf,
        args: &[&str],
        env: &[(&str, &str)],
        group: bool,
    ) -> Proc {
        let mut cmd = Command::new(&program);
        if group {
            std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        }
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, _) in std::env::vars() {
            if k.starts_with("BAKER_") {
                cmd.env_remove(k);
            }
        }
        cmd.env(
            "RUST_LOG",
            std::env::var("BAKER_TEST_LOG").unwrap_or_else(|_| "info".into()),
        );
        cmd.env("NO_COLOR", "1");
        for (k, v) in env {
            if matches!(*k, "BAKER_TOKEN" | "BAKER_WATCH_TOKEN") {
                secrets::register(v);
            }
            cmd.env(k, v);
        }
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name} ({}): {e}", program.display()));
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut readers = Vec::new();
        for stream in [
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let log = log.clone();
            let tag = name.to_owned();
            readers.push(std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    if std::env::var_os("BAKER_TEST_ECHO").is_some() {
                        eprintln!("[{tag}] {line}");
                    }
                    log.lock().unwrap_or_else(|p| p.into_inner()).push(line);
                }
            }));
        }
        Proc {
            name: name.to_owned(),
            child,
            group,
            log,
            readers,
        }
    }

    /// Starts a workspace binary by name (`baker-directory`, ...).
    pub fn baker(name: &str, binary: &str, env: &[(&str, &str)]) -> Proc {
        Proc::spawn(name, bin(binary), &[], env)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the process printed so far, stdout and stderr interleaved by line.
    pub fn log(&self) -> Vec<String> {
        self.log.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The log as one string, for assertion messages.
    pub fn log_text(&self) -> String {
        self.log().join("\n")
    }

    /// Waits for a log line containing `needle` and returns it.
    pub async fn wait_for_log(&mut self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(line) = self.log().into_iter().find(|l| l.contains(needle)) {
                return line;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                // Give the reader threads a moment to collect the last lines.
                tokio::time::sleep(Duration::from_millis(100)).await;
                if let Some(line) = self.log().into_iter().find(|l| l.contains(needle)) {
                    return line;
                }
                panic!(
                    "{} exited ({status}) before logging {needle:?}; its log:\n{}",
                    self.name,
                    self.log_text()
                );
            }
            assert!(
                Instant::now() < deadline,
                "{} did not log {needle:?} within {timeout:?}; its log:\n{}",
                self.name,
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits for the `listening on <addr>` line every Baker daemon logs, and returns the address.
    pub async fn listen_addr(&mut self) -> SocketAddr {
        let line = self
            .wait_for_log("listening on ", Duration::from_secs(20))
            .await;
        let rest = &line[line
            .find("listening on ")
            .map(|i| i + "listening on ".len())
            .unwrap_or(0)..];
        let addr = rest.split_whitespace().next().unwrap_or_default();
        addr.parse()
            .unwrap_or_else(|_| panic!("{}: cannot read an address from {line:?}", self.name))
    }

    /// Sends a signal.
    pub fn signal(&self, sig: Signal) {
        let _ = kill(Pid::from_raw(self.child.id() as i32), sig);
    }

    /// Sends SIGTERM.
    pub fn term(&self) {
        self.signal(Signal::SIGTERM);
    }

    /// SIGKILLs the process and reaps it.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Whether the process has exited, without waiting.
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Waits until the reader threads have taken everything the process printed (they end when
    /// its pipes close), or until `deadline` if a child of its own still holds them.
    async fn drain_output(&mut self, deadline: Instant) {
        while self.readers.iter().any(|r| !r.is_finished()) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Waits for the process to exit, panicking after `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.try_status() {
                self.drain_output(deadline).await;
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not exit within {timeout:?}; its log:\n{}",
                self.name,
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for Proc {
    /// Kills the process, then fails the test if its log shows a token's secret (unless the
    /// test is failing already: one panic says more than two).
    fn drop(&mut self) {
        if self.group {
            let _ =
                nix::sys::signal::killpg(Pid::from_raw(self.child.id() as i32), Signal::SIGKILL);
        }
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            return;
        }
        // The readers end as the pipes close: the last lines are in the log then (a child of
        // the process that still holds a pipe is not waited for long).
        let deadline = Instant::now() + Duration::from_millis(500);
        while self.readers.iter().any(|r| !r.is_finished()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        secrets::check(&self.name, &self.log());
    }
}
