//! Starting and stopping the real release binaries (and HAProxy) that a scenario measures.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use baker_tests::Proc;
use tempfile::TempDir;

use crate::load::{Conn, Target};

/// Where the binaries under test are.
#[derive(Debug, Clone)]
pub struct Bins {
    pub dir: PathBuf,
    pub haproxy: PathBuf,
}

impl Bins {
    /// `dir`, or the directory holding this executable (target/release after
    /// `cargo build --release --workspace --bins`).
    pub fn locate(dir: Option<PathBuf>, haproxy: Option<PathBuf>) -> anyhow::Result<Bins> {
        let dir = match dir {
            Some(d) => d,
            None => std::env::current_exe()
                .context("finding this executable")?
                .parent()
                .context("finding this executable's directory")?
                .to_path_buf(),
        };
        let haproxy = haproxy.unwrap_or_else(|| PathBuf::from(baker_tests::haproxy_bin()));
        Ok(Bins { dir, haproxy })
    }

    /// The path of a workspace binary, which must exist.
    pub fn path(&self, name: &str) -> anyhow::Result<PathBuf> {
        let p = self.dir.join(name);
        if !p.exists() {
            bail!(
                "{} not found in {}: run `cargo build --release --workspace --bins` first",
                name,
                self.dir.display()
            );
        }
        Ok(p)
    }

    pub fn has(&self, name: &str) -> bool {
        self.dir.join(name).exists()
    }
}

/// Log filter for the daemons under test: warnings only, unless `BAKER_BENCH_LOG` says
/// otherwise, so that logging does not weigh on the figures. The `listening on` line and
/// state transitions are logged at info, so the targets that announce them stay at info.
fn log_filter() -> String {
    std::env::var("BAKER_BENCH_LOG").unwrap_or_else(|_| {
        "warn,baker_directory=info,baker_registrar=info,baker_ambassador=info,baker_greeting=info"
            .into()
    })
}

/// Starts a workspace binary with `env` and returns it once it logs `listening on`.
pub async fn start(
    bins: &Bins,
    name: &str,
    binary: &str,
    env: &[(&str, &str)],
) -> anyhow::Result<(Proc, SocketAddr)> {
    let filter = log_filter();
    let mut all: Vec<(&str, &str)> = vec![("RUST_LOG", filter.as_str())];
    all.extend_from_slice(env);
    let mut proc = Proc::spawn(name, bins.path(binary)?, &[], &all);
    let addr = proc.listen_addr().await;
    Ok((proc, addr))
}

/// A directory on loopback with Docker discovery off (unless `docker` is true).
pub async fn directory(bins: &Bins, data: &Path, docker: bool) -> anyhow::Result<(Proc, String)> {
    directory_with(bins, data, docker, &[]).await
}

/// Like [`directory`], with extra variables (`RUST_LOG`, ...).
pub async fn directory_with(
    bins: &Bins,
    data: &Path,
    docker: bool,
    extra: &[(&str, &str)],
) -> anyhow::Result<(Proc, String)> {
    let data = data.display().to_string();
    let mut env = vec![
        ("BAKER_LISTEN", "127.0.0.1:0"),
        ("BAKER_DATA", data.as_str()),
        ("BAKER_DOCKER", if docker { "on" } else { "off" }),
    ];
    env.extend_from_slice(extra);
    let (proc, addr) = start(bins, "directory", "baker-directory", &env).await?;
    Ok((proc, format!("http://{addr}")))
}

/// A greeting instance listening on every address (so that 127.0.0.x aliases reach it).
pub async fn greeting(
    bins: &Bins,
    instance: &str,
    version: &str,
) -> anyhow::Result<(Proc, SocketAddr)> {
    let (proc, addr) = start(
        bins,
        instance,
        "baker-greeting",
        &[
            ("BAKER_LISTEN", "0.0.0.0:0"),
            ("BAKER_INSTANCE", instance),
            ("BAKER_VERSION", version),
        ],
    )
    .await?;
    Ok((proc, SocketAddr::from(([127, 0, 0, 1], addr.port()))))
}

/// How a registrar probes.
#[derive(Debug, Clone, Copy)]
pub struct Probe {
    pub interval: Duration,
    pub rise: u32,
    pub fall: u32,
}

/// A registrar for the app at `app`, registering it as `service`/`id` at `version`.
pub fn registrar(
    bins: &Bins,
    directory: &str,
    service: &str,
    id: &str,
    version: &str,
    app: SocketAddr,
    probe: Probe,
) -> anyhow::Result<Proc> {
    registrar_with(bins, directory, service, id, version, app, probe, &[])
}

/// Like [`registrar`], with extra variables (`BAKER_ZONE`, ...).
#[allow(clippy::too_many_arguments)]
pub fn registrar_with(
    bins: &Bins,
    directory: &str,
    service: &str,
    id: &str,
    version: &str,
    app: SocketAddr,
    probe: Probe,
    extra: &[(&str, &str)],
) -> anyhow::Result<Proc> {
    let target = format!("http://{app}");
    let interval = format!("{}ms", probe.interval.as_millis());
    let (rise, fall) = (probe.rise.to_string(), probe.fall.to_string());
    let filter = log_filter();
    Ok(Proc::spawn(
        &format!("registrar-{id}"),
        bins.path("baker-registrar")?,
        &[],
        &[
            ("RUST_LOG", filter.as_str()),
            ("BAKER_DIRECTORY", directory),
            ("BAKER_SERVICE", service),
            ("BAKER_ID", id),
            ("BAKER_VERSION", version),
            ("BAKER_TARGET", &target),
            ("BAKER_ADVERTISE", &app.to_string()),
            ("BAKER_INTERVAL", &interval),
            ("BAKER_RISE", &rise),
            ("BAKER_FALL", &fall),
        ]
        .into_iter()
        .chain(extra.iter().copied())
        .collect::<Vec<_>>(),
    ))
}

/// A running ambassador with its HAProxy.
pub struct Ambassador {
    pub proc: Proc,
    /// The service port of each routed service, on 127.0.0.1.
    pub ports: Vec<(String, u16)>,
    pub run_dir: TempDir,
}

impl Ambassador {
    /// Starts an ambassador routing each of `services` on a free loopback port.
    pub async fn start(
        bins: &Bins,
        directory: &str,
        services: &[&str],
        force_reload: bool,
    ) -> anyhow::Result<Ambassador> {
        let extra: &[(&str, &str)] = if force_reload {
            &[("BAKER_BENCH_FORCE_RELOAD", "1")]
        } else {
            &[]
        };
        Self::start_with(bins, directory, services, extra).await
    }

    /// Like [`start`](Self::start), with extra variables (`RUST_LOG`, ...).
    pub async fn start_with(
        bins: &Bins,
        directory: &str,
        services: &[&str],
        extra: &[(&str, &str)],
    ) -> anyhow::Result<Ambassador> {
        let run_dir = tempfile::Builder::new()
            .prefix("bb-amb")
            .tempdir_in("/tmp")
            .context("creating the ambassador's run directory")?;
        let ports: Vec<(String, u16)> = services
            .iter()
            .map(|s| (s.to_string(), baker_tests::free_port()))
            .collect();
        let routes = ports
            .iter()
            .map(|(s, p)| format!("{s}={p}"))
            .collect::<Vec<_>>()
            .join(",");
        let run = run_dir.path().display().to_string();
        let haproxy = bins.haproxy.display().to_string();
        let admin = format!("127.0.0.1:{}", baker_tests::free_port());
        let mut env = vec![
            ("BAKER_DIRECTORY", directory),
            ("BAKER_ROUTES", routes.as_str()),
            ("BAKER_BIND", "127.0.0.1"),
            ("BAKER_ADMIN", admin.as_str()),
            ("BAKER_RUN_DIR", run.as_str()),
            ("BAKER_HAPROXY", haproxy.as_str()),
        ];
        env.extend_from_slice(extra);
        let (proc, _) = start(bins, "ambassador", "baker-ambassador", &env).await?;
        Ok(Ambassador {
            proc,
            ports,
            run_dir,
        })
    }

    /// The loopback address of `service`'s port.
    pub fn addr(&self, service: &str) -> SocketAddr {
        let port = self
            .ports
            .iter()
            .find(|(s, _)| s == service)
            .map(|(_, p)| *p)
            .expect("a service the ambassador was started with");
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    /// The HAProxy processes (master and workers) under this ambassador.
    pub fn haproxy_pids(&self) -> Vec<u32> {
        crate::procfs::descendants(self.proc.pid())
            .into_iter()
            .filter(|&p| crate::procfs::comm(p).is_some_and(|c| c.starts_with("haproxy")))
            .collect()
    }

    /// How many times HAProxy's master has reloaded, from `show proc` on the master socket
    /// (asked up to five times: the master does not answer while it is reloading).
    pub async fn reloads(&self) -> anyhow::Result<u64> {
        let socket = self.run_dir.path().join("master.sock");
        let mut last = None;
        for _ in 0..5 {
            match crate::haproxy::master_reloads(&socket).await {
                Ok(n) => return Ok(n),
                Err(e) => last = Some(e),
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        Err(last.expect("at least one attempt"))
    }
}

/// Waits until `target` answers 200, up to `timeout`.
pub async fn wait_ready(target: &Target, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    let mut conn = Conn::new(target.addr);
    loop {
        match conn.call(target).await {
            Ok((s, _)) if s.is_success() => return Ok(()),
            other => {
                if Instant::now() > deadline {
                    bail!(
                        "{} {} did not answer 200 within {timeout:?} (last: {:?})",
                        target.addr,
                        target.path,
                        other.map(|(s, _)| s)
                    );
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Stops a process with SIGTERM, and SIGKILL after `grace`.
pub async fn stop(proc: &mut Proc, grace: Duration) {
    proc.term();
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if proc.try_status().is_some() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tracing::warn!("{} ignored SIGTERM for {grace:?}; killing it", proc.name);
    proc.kill9();
}

/// The wall-clock time a log line was written, from tracing's leading RFC 3339 timestamp.
pub fn log_time(line: &str) -> Option<std::time::SystemTime> {
    let first = line.split_whitespace().next()?;
    humantime::parse_rfc3339_weak(first).ok()
}
