//! A real `baker-directory` for end-to-end tests: on a port of its own ([`crate::free_port`]),
//! with its own data directory, both of which survive [`TestDirectory::restart`] and
//! [`TestDirectory::kill9`].
//!
//! `BAKER_TEST_STORE=etcd` runs every directory the tests start on etcd instead of memory: each
//! [`TestDirectory`] then starts its own three-member cluster ([`EtcdCluster`]) and sets
//! `BAKER_STORE` to it (unless the test sets `BAKER_STORE` itself), so the same scenarios run
//! against both stores. [`TestDirectory::replica`] starts another replica on the same table.

use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitStatus;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use baker_client::model::InstanceSpec;
use baker_client::DirectoryClient;

use crate::etcd::EtcdCluster;
use crate::{free_port, require, Needs, Proc};

/// The variable that selects the store every [`TestDirectory`] runs on: `memory` (default) or
/// `etcd`.
pub const ENV_TEST_STORE: &str = "BAKER_TEST_STORE";

/// Whether the tests run their directories on etcd (`BAKER_TEST_STORE=etcd`).
pub fn on_etcd() -> bool {
    match std::env::var(ENV_TEST_STORE).unwrap_or_default().trim() {
        "" | "memory" => false,
        "etcd" => true,
        other => panic!("{ENV_TEST_STORE} must be memory or etcd, not {other:?}"),
    }
}

/// A running directory (`baker-directory`) with a temporary `BAKER_DATA`.
///
/// The directory listens on a port [`crate::free_port`] hands out, not on port 0: a port the
/// kernel picked could be given to another program while the directory is down, and
/// [`restart`](Self::restart) brings it back on the same address, with the same data directory
/// and variables, so clients and ambassadors pointed at [`url`](Self::url) find it again.
/// Docker discovery is off (`BAKER_DOCKER=off`) unless `extra_env` says otherwise.
pub struct TestDirectory {
    /// The running process.
    pub proc: Proc,
    /// `http://127.0.0.1:<port>` (`https://` when `BAKER_TLS_CERT` is set).
    pub url: String,
    /// The address it listens on.
    pub addr: SocketAddr,
    /// A client of this directory, with the `BAKER_TOKEN` of `extra_env` if one was given.
    pub client: DirectoryClient,
    env: Vec<(String, String)>,
    /// The `BAKER_CA` of `extra_env`: what this harness's clients trust for HTTPS.
    ca: Option<std::path::PathBuf>,
    data: tempfile::TempDir,
    running: bool,
    /// The cluster this directory's table lives in, when the harness started one for it.
    pub etcd: Option<std::sync::Arc<EtcdCluster>>,
}

impl TestDirectory {
    /// Starts a directory with `extra_env` added to (or overriding) the defaults
    /// `BAKER_LISTEN=127.0.0.1:<a free port>`, `BAKER_DATA=<temp dir>`, `BAKER_DOCKER=off`.
    pub async fn start(extra_env: &[(&str, &str)]) -> TestDirectory {
        let sets_store = extra_env.iter().any(|(k, _)| *k == "BAKER_STORE");
        if on_etcd() && !sets_store {
            assert!(
                require(Needs::Etcd),
                "{ENV_TEST_STORE}=etcd needs etcd, and BAKER_TEST_SKIP names it"
            );
            let cluster = std::sync::Arc::new(EtcdCluster::start(3).await);
            let store = cluster.store_url("/baker");
            let mut env: Vec<(&str, &str)> = vec![("BAKER_STORE", &store)];
            env.extend_from_slice(extra_env);
            let mut d = TestDirectory::start_with(&env).await;
            d.etcd = Some(cluster);
            return d;
        }
        TestDirectory::start_with(extra_env).await
    }

    /// Another replica on this directory's etcd table, with the same variables and its own
    /// address. Panics when this directory's table is not in etcd.
    pub async fn replica(&self) -> TestDirectory {
        let env: Vec<(&str, &str)> = self
            .env
            .iter()
            .filter(|(k, _)| k != "BAKER_LISTEN" && k != "BAKER_DATA")
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert!(
            env.iter().any(|(k, v)| *k == "BAKER_STORE"
                && (v.starts_with("etcd://") || v.starts_with("etcds://"))),
            "a replica needs a directory whose BAKER_STORE is etcd"
        );
        let mut d = TestDirectory::start_with(&env).await;
        d.etcd = self.etcd.clone();
        d
    }

    async fn start_with(extra_env: &[(&str, &str)]) -> TestDirectory {
        let data = tempfile::Builder::new()
            .prefix("baker-directory-")
            .tempdir()
            .expect("creating a temporary BAKER_DATA");
        let mut env: Vec<(String, String)> = vec![
            ("BAKER_LISTEN".into(), format!("127.0.0.1:{}", free_port())),
            ("BAKER_DATA".into(), data.path().display().to_string()),
            ("BAKER_DOCKER".into(), "off".into()),
        ];
        for (k, v) in extra_env {
            env.retain(|(key, _)| key != k);
            env.push(((*k).to_owned(), (*v).to_owned()));
        }
        let mut proc = spawn(&env);
        let addr = proc.listen_addr().await;
        let var = |name: &str| env.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
        let scheme = if var("BAKER_TLS_CERT").is_some() {
            "https"
        } else {
            "http"
        };
        let url = format!("{scheme}://{addr}");
        let ca = var("BAKER_CA").map(std::path::PathBuf::from);
        let client = DirectoryClient::trusting(&url, var("BAKER_TOKEN"), ca.as_deref())
            .expect("directory client");
        // From now on the directory comes back on the same address.
        for (k, v) in env.iter_mut() {
            if k == "BAKER_LISTEN" {
                *v = addr.to_string();
            }
        }
        TestDirectory {
            proc,
            url,
            addr,
            client,
            env,
            ca,
            data,
            running: true,
            etcd: None,
        }
    }

    /// The directory's `BAKER_DATA` (where `routes/` lives).
    pub fn data_dir(&self) -> &Path {
        self.data.path()
    }

    /// The value of the metric `name` (a line `name value`) on `GET /metrics`, if it has one.
    pub async fn metric(&self, name: &str) -> Option<f64> {
        let http = baker_client::tls::builder(self.ca.as_deref())
            .ok()?
            .build()
            .ok()?;
        let text = http
            .get(format!("{}/metrics", self.url))
            .send()
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
    }

    /// A client of this directory with another token (or none).
    pub fn client_with_token(&self, token: Option<&str>) -> DirectoryClient {
        DirectoryClient::trusting(&self.url, token.map(str::to_owned), self.ca.as_deref())
            .expect("directory client")
    }

    /// Sends SIGTERM and waits for the directory to exit (it must within 5 s).
    pub async fn stop(&mut self) -> ExitStatus {
        self.proc.term();
        let status = self.proc.wait_exit(Duration::from_secs(5)).await;
        self.running = false;
        status
    }

    /// Kills the directory with SIGKILL (no chance to clean up) and reaps it.
    pub fn kill9(&mut self) {
        self.proc.kill9();
        self.running = false;
    }

    /// Stops the directory if it runs (SIGTERM), then starts it again on the same address with
    /// the same data directory and variables; returns once it listens.
    pub async fn restart(&mut self) {
        if self.running {
            self.stop().await;
        }
        let mut proc = spawn(&self.env);
        let addr = proc.listen_addr().await;
        assert_eq!(
            addr, self.addr,
            "the restarted directory should listen where it did before"
        );
        self.proc = proc;
        self.running = true;
    }
}

/// A registration of `127.0.0.1:port` with a TTL of `ttl_ms` (the directory's default when
/// `None`) and the directory's defaults for the rest.
pub fn spec(port: u16, ttl_ms: Option<u64>) -> InstanceSpec {
    InstanceSpec {
        address: "127.0.0.1".into(),
        port: u64::from(port),
        version: None,
        weight: None,
        tags: vec![],
        ttl_ms,
        zone: None,
    }
}

/// Instances of one service kept alive as their registrars would keep them: every interval,
/// each instance listed is registered again (a failure is ignored: the directory may be down
/// on purpose), until [`Heartbeats::stop`]. The list may change while it runs.
pub struct Heartbeats {
    beating: Arc<Mutex<Vec<(String, InstanceSpec)>>>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Heartbeats {
    /// Starts heartbeating `instances` (id, registration) of `service` every `every`.
    pub fn start(
        client: DirectoryClient,
        service: &str,
        every: Duration,
        instances: Vec<(&str, InstanceSpec)>,
    ) -> Heartbeats {
        let beating: Vec<(String, InstanceSpec)> = instances
            .into_iter()
            .map(|(id, spec)| (id.to_owned(), spec))
            .collect();
        let beating = Arc::new(Mutex::new(beating));
        let stop = Arc::new(AtomicBool::new(false));
        let task = {
            let (beating, stop, service) = (beating.clone(), stop.clone(), service.to_owned());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let list = beating.lock().unwrap().clone();
                    for (id, spec) in list {
                        let _ = client.register(&service, &id, &spec).await;
                    }
                    tokio::time::sleep(every).await;
                }
            })
        };
        Heartbeats {
            beating,
            stop,
            task,
        }
    }

    /// Heartbeats `id` too from now on.
    pub fn add(&self, id: &str, spec: InstanceSpec) {
        self.beating.lock().unwrap().push((id.to_owned(), spec));
    }

    /// Stops heartbeating `id`: it expires after its TTL.
    pub fn remove(&self, id: &str) {
        self.beating.lock().unwrap().retain(|(i, _)| i != id);
    }

    /// Stops every heartbeat, and waits for the last round to end.
    pub async fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.task.await;
    }
}

fn spawn(env: &[(String, String)]) -> Proc {
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    Proc::baker("directory", "baker-directory", &env)
}
