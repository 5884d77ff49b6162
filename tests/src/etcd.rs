//! A real etcd v3 cluster for end-to-end tests: three members (or any number) on loopback, on
//! free ports, each with its own data directory in a temporary directory that lives as long as
//! the cluster.
//!
//! Members are real `etcd` processes (Debian's `etcd-server`). Tests kill one with SIGKILL
//! ([`EtcdCluster::kill9`]), freeze it with SIGSTOP ([`EtcdCluster::freeze`], undone by
//! [`EtcdCluster::thaw`]) and bring a killed one back on the same ports and data
//! ([`EtcdCluster::restart`]). [`EtcdCluster::leader`] asks the members which of them leads.
//!
//! Elections are made fast for tests (heartbeat 50 ms, election timeout 500 ms), so a lost
//! leader is replaced within about a second.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use serde::Deserialize;

use crate::{eventually, free_port, Proc};

/// The etcd binary tests use: `BAKER_ETCD`, else `etcd` from `PATH`, else `/usr/bin/etcd`.
pub fn etcd_bin() -> String {
    if let Ok(p) = std::env::var("BAKER_ETCD") {
        return p;
    }
    for dir in std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .chain(["/usr/bin", "/usr/local/bin"])
    {
        let p = PathBuf::from(dir).join("etcd");
        if p.exists() {
            return p.display().to_string();
        }
    }
    "etcd".into()
}

/// Whether `etcd --version` runs.
pub fn etcd_available() -> bool {
    Command::new(etcd_bin())
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// One member: its ports, its data directory, and its process while it runs.
pub struct Member {
    /// `m0`, `m1`, ...
    pub name: String,
    /// The port clients dial (`http://127.0.0.1:<client_port>`).
    pub client_port: u16,
    /// The port the other members dial.
    pub peer_port: u16,
    data: PathBuf,
    proc: Option<Proc>,
    frozen: bool,
}

impl Member {
    /// `http://127.0.0.1:<client port>`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    /// The member's process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(Proc::pid)
    }

    /// Whether the member's process runs (frozen or not).
    pub fn is_running(&self) -> bool {
        self.proc.is_some()
    }

    /// The member's log so far (empty when it does not run).
    pub fn log_text(&self) -> String {
        self.proc.as_ref().map(Proc::log_text).unwrap_or_default()
    }
}

/// A running etcd cluster. Dropping it kills every member and removes their data.
pub struct EtcdCluster {
    pub members: Vec<Member>,
    initial_cluster: String,
    token: String,
    http: reqwest::Client,
    _dir: tempfile::TempDir,
}

#[derive(Deserialize)]
struct Status {
    header: Header,
    #[serde(default)]
    leader: Option<String>,
}

#[derive(Deserialize)]
struct Header {
    member_id: String,
}

impl EtcdCluster {
    /// Starts an `n`-member cluster and returns once it has a leader and every member answers.
    ///
    /// Panics naming what is missing when etcd is not installed; callers check
    /// [`crate::require`]`(Needs::Etcd)` first so that `BAKER_TEST_SKIP=etcd` can opt out.
    /// Every port comes from [`free_port`]: no other test is given it.
    pub async fn start(n: usize) -> EtcdCluster {
        assert!(
            etcd_available(),
            "this test needs etcd ({}), which is not available on this machine: install Debian's \
             etcd-server (the README's test command does), or set BAKER_TEST_SKIP=etcd to opt out \
             of the tests that need it",
            etcd_bin()
        );
        let dir = tempfile::Builder::new()
            .prefix("baker-etcd-")
            .tempdir()
            .expect("creating the cluster's temporary directory");
        let members: Vec<Member> = (0..n)
            .map(|i| Member {
                name: format!("m{i}"),
                client_port: free_port(),
                peer_port: free_port(),
                data: dir.path().join(format!("m{i}")),
                proc: None,
                frozen: false,
            })
            .collect();
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
            .collect::<Vec<_>>()
            .join(",");
        let token = format!(
            "baker-test-{}-{}",
            std::process::id(),
            members[0].client_port
        );
        let mut cluster = EtcdCluster {
            members,
            initial_cluster,
            token,
            http: reqwest::Client::builder()
                .timeout(Duration::from_millis(500))
                .build()
                .expect("an HTTP client"),
            _dir: dir,
        };
        for i in 0..n {
            cluster.spawn(i);
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            for m in &mut cluster.members {
                let exited = m.proc.as_mut().and_then(Proc::try_status).is_some();
                if exited {
                    let mut p = m.proc.take().expect("a member that ran");
                    p.wait_exit(Duration::from_secs(1)).await;
                    panic!("an etcd member exited at start; its log:\n{}", p.log_text());
                }
            }
            if cluster.current_leader().await.is_some() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the etcd members did not elect a leader within 20 s; their logs:\n{}",
                cluster
                    .members
                    .iter()
                    .map(Member::log_text)
                    .collect::<Vec<_>>()
                    .join("\n")
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        for i in 0..n {
            cluster.wait_member(i, Duration::from_secs(20)).await;
        }
        cluster
    }

    fn spawn(&mut self, i: usize) {
        let m = &self.members[i];
        let client = m.url();
        let peer = format!("http://127.0.0.1:{}", m.peer_port);
        let data = m.data.display().to_string();
        let args = [
            "--name",
            &m.name,
            "--data-dir",
            &data,
            "--listen-client-urls",
            &client,
            "--advertise-client-urls",
            &client,
            "--listen-peer-urls",
            &peer,
            "--initial-advertise-peer-urls",
            &peer,
            "--initial-cluster",
            &self.initial_cluster,
            "--initial-cluster-state",
            "new",
            "--initial-cluster-token",
            &self.token,
            "--heartbeat-interval",
            "50",
            "--election-timeout",
            "500",
            "--logger",
            "zap",
            "--log-level",
            "warn",
        ];
        let name = format!("etcd-{}", m.name);
        let proc = Proc::spawn(&name, etcd_bin(), &args, &[]);
        self.members[i].proc = Some(proc);
        self.members[i].frozen = false;
    }

    /// Every member's client URL (`http://127.0.0.1:<port>`), in member order.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(Member::url).collect()
    }

    /// The `BAKER_STORE` value naming every member, with `prefix` (`/baker`, ...).
    pub fn store_url(&self, prefix: &str) -> String {
        let hosts: Vec<String> = self
            .members
            .iter()
            .map(|m| format!("127.0.0.1:{}", m.client_port))
            .collect();
        format!("etcd://{}{prefix}", hosts.join(","))
    }

    /// The member's status through etcd's HTTP gateway: its own id and the leader it knows.
    async fn status(&self, i: usize) -> Option<(String, Option<String>)> {
        let url = format!("{}/v3/maintenance/status", self.members[i].url());
        let resp = self.http.post(url).body("{}").send().await.ok()?;
        if !resp.status().is_success() {
            return None;
        }
        let s: Status = resp.json().await.ok()?;
        let leader = s.leader.filter(|l| l != "0" && !l.is_empty());
        Some((s.header.member_id, leader))
    }

    /// The index of the member that leads now, as the running, unfrozen members agree; `None`
    /// while there is no leader they agree on.
    pub async fn current_leader(&self) -> Option<usize> {
        let mut ids = vec![None; self.members.len()];
        let mut said = Vec::new();
        for (i, m) in self.members.iter().enumerate() {
            if !m.is_running() || m.frozen {
                continue;
            }
            if let Some((id, leader)) = self.status(i).await {
                ids[i] = Some(id);
                said.push(leader);
            }
        }
        let first = said.first()?.clone()?;
        if said.iter().any(|l| l.as_deref() != Some(first.as_str())) {
            return None;
        }
        ids.iter()
            .position(|id| id.as_deref() == Some(first.as_str()))
    }

    /// Waits until the members agree on a leader, and returns its index.
    pub async fn wait_leader(&self, timeout: Duration) -> usize {
        eventually(timeout, "the etcd members to agree on a leader", || {
            self.current_leader()
        })
        .await
    }

    /// The leader's index (waiting up to 10 s for one).
    pub async fn leader(&self) -> usize {
        self.wait_leader(Duration::from_secs(10)).await
    }

    /// Waits until member `i` answers `/health` with a healthy cluster behind it.
    pub async fn wait_member(&self, i: usize, timeout: Duration) {
        let url = format!("{}/health", self.members[i].url());
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(resp) = self.http.get(&url).send().await {
                if resp.status().is_success() {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "etcd member {} did not become healthy within {timeout:?}; its log:\n{}",
                self.members[i].name,
                self.members[i].log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Kills member `i` with SIGKILL and reaps it. Its data stays for [`restart`](Self::restart).
    pub fn kill9(&mut self, i: usize) {
        if let Some(mut p) = self.members[i].proc.take() {
            if self.members[i].frozen {
                p.signal(Signal::SIGCONT);
            }
            p.kill9();
        }
        self.members[i].frozen = false;
    }

    /// Freezes member `i` with SIGSTOP: it holds its sockets and answers nothing.
    pub fn freeze(&mut self, i: usize) {
        if let Some(p) = &self.members[i].proc {
            p.signal(Signal::SIGSTOP);
            self.members[i].frozen = true;
        }
    }

    /// Resumes a frozen member with SIGCONT.
    pub fn thaw(&mut self, i: usize) {
        if let Some(p) = &self.members[i].proc {
            p.signal(Signal::SIGCONT);
        }
        self.members[i].frozen = false;
    }

    /// Starts a killed member again on its ports and data, and waits until it is healthy.
    pub async fn restart(&mut self, i: usize) {
        assert!(
            self.members[i].proc.is_none(),
            "member {} still runs: kill it first",
            self.members[i].name
        );
        self.spawn(i);
        self.wait_member(i, Duration::from_secs(20)).await;
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill9(i);
        }
    }
}
