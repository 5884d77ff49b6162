//! A real `baker-ambassador` (with its real HAProxy) for end-to-end tests, on free ports, with
//! its own run directory; plus helpers to query HAProxy's master and admin sockets.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::{free_port, Proc};

/// A running ambassador. Dropping it stops it with SIGTERM (so its HAProxy stops too).
pub struct TestAmbassador {
    pub proc: Proc,
    /// Local port of each service, by name.
    pub ports: BTreeMap<String, u16>,
    pub http_port: u16,
    pub admin: SocketAddr,
    run_dir: tempfile::TempDir,
    env: Vec<(String, String)>,
    wrapper: Vec<String>,
}

/// The service's name in a `services` entry (`"db=tcp;balance=first"` → `db`).
fn service_name(entry: &str) -> &str {
    entry.split(['=', ';']).next().unwrap_or(entry)
}

/// The master's view of HAProxy's processes (`show proc`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcInfo {
    pub reloads: u64,
    pub worker: u32,
}

impl TestAmbassador {
    /// Starts an ambassador for `services` (`"emitter"`, `"db=tcp"`, with options after a `;`:
    /// `"db=tcp;balance=first"`) against `directory`,
    /// each on a free port, with a shared HTTP port and an admin port, bound to 127.0.0.1.
    pub async fn start(directory: &str, services: &[&str], extra_env: &[(&str, &str)]) -> Self {
        let ports: BTreeMap<String, u16> = services
            .iter()
            .map(|s| (service_name(s).to_owned(), free_port()))
            .collect();
        Self::start_on(directory, services, ports, free_port(), extra_env).await
    }

    /// Like [`start`](Self::start), with the ambassador's command line behind `wrapper` (a
    /// program and its leading arguments, such as [`crate::dns::SilentResolver::wrapper`]).
    pub async fn start_wrapped(
        directory: &str,
        services: &[&str],
        extra_env: &[(&str, &str)],
        wrapper: &[String],
    ) -> Self {
        let ports: BTreeMap<String, u16> = services
            .iter()
            .map(|s| (service_name(s).to_owned(), free_port()))
            .collect();
        Self::launch(directory, services, ports, free_port(), extra_env, wrapper).await
    }

    /// Like [`start`](Self::start), on the given ports.
    pub async fn start_on(
        directory: &str,
        services: &[&str],
        ports: BTreeMap<String, u16>,
        http_port: u16,
        extra_env: &[(&str, &str)],
    ) -> Self {
        Self::launch(directory, services, ports, http_port, extra_env, &[]).await
    }

    async fn launch(
        directory: &str,
        services: &[&str],
        ports: BTreeMap<String, u16>,
        http_port: u16,
        extra_env: &[(&str, &str)],
        wrapper: &[String],
    ) -> Self {
        let run_dir = tempfile::Builder::new()
            .prefix("baker-amb-")
            .tempdir()
            .expect("creating a run directory");
        let routes: Vec<String> = services
            .iter()
            .map(|s| {
                let (s, options) = match s.split_once(';') {
                    Some((s, o)) => (s, format!(";{o}")),
                    None => (*s, String::new()),
                };
                let name = s.split('=').next().unwrap_or(s);
                let mode = s
                    .split('=')
                    .nth(1)
                    .map(|m| format!("={m}"))
                    .unwrap_or_default();
                format!("{name}={}{mode}{options}", ports[name])
            })
            .collect();
        let routes = routes.join(",");
        let admin_port = free_port().to_string();
        let http = http_port.to_string();
        let run = run_dir.path().display().to_string();
        let mut env = vec![
            ("BAKER_DIRECTORY", directory),
            ("BAKER_ROUTES", routes.as_str()),
            ("BAKER_HTTP_PORT", http.as_str()),
            ("BAKER_ADMIN", admin_port.as_str()),
            ("BAKER_BIND", "127.0.0.1"),
            ("BAKER_RUN_DIR", run.as_str()),
        ];
        let haproxy = crate::haproxy_bin();
        env.push(("BAKER_HAPROXY", haproxy.as_str()));
        for (k, v) in extra_env {
            env.retain(|(key, _)| key != k);
            env.push((k, v));
        }
        let env: Vec<(String, String)> = env
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        let wrapper = wrapper.to_vec();
        let (proc, admin) = spawn(&env, &wrapper).await;
        TestAmbassador {
            proc,
            ports,
            http_port,
            admin,
            run_dir,
            env,
            wrapper,
        }
    }

    /// Starts a new ambassador process with the same variables and run directory (after the
    /// previous one stopped or was killed), and waits until it is ready.
    pub async fn respawn(&mut self) {
        assert!(
            self.proc.try_status().is_some(),
            "the previous ambassador still runs"
        );
        let (proc, admin) = spawn(&self.env, &self.wrapper).await;
        self.proc = proc;
        self.admin = admin;
    }

    /// `http://<host>:<port>` of a service's own port, where `host` is the address the service
    /// ports bind (`BAKER_BIND`, default here `127.0.0.1`), loopback for a wildcard address,
    /// IPv6 in brackets (`http://[::1]:<port>`).
    pub fn url(&self, service: &str) -> String {
        format!("http://{}", self.client_addr(self.ports[service]))
    }

    /// `http://<host>:<shared http port>`, `host` as in [`url`](Self::url).
    pub fn http_url(&self) -> String {
        format!("http://{}", self.client_addr(self.http_port))
    }

    /// Where a client on this machine reaches `port` of the service ports (`BAKER_BIND`).
    pub fn client_addr(&self, port: u16) -> SocketAddr {
        let bind = self
            .env
            .iter()
            .rev()
            .find(|(k, _)| k == "BAKER_BIND")
            .map(|(_, v)| v.trim().trim_start_matches('[').trim_end_matches(']'))
            .unwrap_or("127.0.0.1");
        let ip: IpAddr = bind
            .parse()
            .unwrap_or_else(|_| panic!("BAKER_BIND={bind:?} is not an IP address"));
        let ip = match ip {
            IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::from(Ipv4Addr::LOCALHOST),
            IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::from(Ipv6Addr::LOCALHOST),
            ip => ip,
        };
        SocketAddr::new(ip, port)
    }

    pub fn run_dir(&self) -> &Path {
        self.run_dir.path()
    }

    /// One command on HAProxy's admin socket.
    pub fn admin_command(&self, command: &str) -> String {
        socket_command(&self.run_dir.path().join("admin.sock"), command)
    }

    /// Operational state of each server of `backend`: `up` or `down` (`show servers state`).
    pub fn op_states(&self, backend: &str) -> BTreeMap<String, &'static str> {
        self.admin_command(&format!("show servers state {backend}"))
            .lines()
            .filter(|l| !l.starts_with('#') && l.split_whitespace().count() > 6)
            .map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f[3].to_owned(), if f[5] == "2" { "up" } else { "down" })
            })
            .collect()
    }

    /// One command on HAProxy's master CLI.
    pub fn master_command(&self, command: &str) -> String {
        socket_command(&self.run_dir.path().join("master.sock"), command)
    }

    /// Reload count and current worker pid, from the master's `show proc`.
    pub fn proc_info(&self) -> ProcInfo {
        let text = self.master_command("show proc");
        let mut reloads = None;
        let mut worker = None;
        for line in text.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() >= 3 && f[1] == "master" {
                reloads = f[2].parse().ok();
            }
            if f.len() >= 3 && f[1] == "worker" && worker.is_none() {
                worker = f[0].parse().ok();
            }
        }
        ProcInfo {
            reloads: reloads.unwrap_or_else(|| panic!("no master line in show proc: {text}")),
            worker: worker.unwrap_or_else(|| panic!("no worker in show proc: {text}")),
        }
    }

    /// Server names HAProxy runs in `backend`, with their admin state (`show servers state`).
    pub fn servers(&self, backend: &str) -> BTreeMap<String, String> {
        let text = self.admin_command(&format!("show servers state {backend}"));
        text.lines()
            .filter(|l| !l.starts_with('#') && l.split_whitespace().count() > 6)
            .map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                let admin = match f[6].parse::<u32>().unwrap_or(0) {
                    0 => "ready",
                    a if a & 0x08 != 0 => "drain",
                    _ => "maint",
                };
                (f[3].to_owned(), admin.to_owned())
            })
            .collect()
    }

    /// Connections HAProxy holds open to `server` of `backend` now (`show stat`, `scur`).
    pub fn sessions(&self, backend: &str, server: &str) -> u64 {
        self.admin_command("show stat")
            .lines()
            .map(|l| l.split(',').collect::<Vec<_>>())
            .filter(|f| f.len() > 4 && f[0] == backend && f[1] == server)
            .filter_map(|f| f[4].parse::<u64>().ok())
            .sum()
    }

    /// Stops the ambassador with SIGTERM and returns its exit status.
    pub async fn stop(&mut self) -> std::process::ExitStatus {
        self.proc.term();
        self.proc.wait_exit(Duration::from_secs(15)).await
    }

    /// Pids of the HAProxy processes running this run directory's configuration: the
    /// masters (whose parent is not one of them) and all of them, masters and workers.
    pub fn haproxy_processes(&self) -> (Vec<u32>, Vec<u32>) {
        let cfg = self
            .run_dir
            .path()
            .join("haproxy.cfg")
            .display()
            .to_string();
        let all: Vec<u32> = std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| {
                let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                String::from_utf8_lossy(&cmdline).contains(&cfg)
            })
            .collect();
        let masters = all
            .iter()
            .copied()
            .filter(|pid| !parent(*pid).is_some_and(|p| all.contains(&p)))
            .collect();
        (masters, all)
    }

    fn haproxy_pid_file(&self) -> PathBuf {
        self.run_dir.path().join("haproxy.pid")
    }
}

impl Drop for TestAmbassador {
    fn drop(&mut self) {
        if self.proc.try_status().is_none() {
            self.proc.term();
            let deadline = Instant::now() + Duration::from_secs(10);
            while self.proc.try_status().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        // Never leave an HAProxy behind, even if the ambassador was killed.
        if let Ok(pid) = std::fs::read_to_string(self.haproxy_pid_file()) {
            if let Ok(pid) = pid.trim().parse::<i32>() {
                let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                if String::from_utf8_lossy(&cmdline)
                    .contains(&*self.run_dir.path().to_string_lossy())
                {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
        }
    }
}

/// A process's parent pid (`/proc/<pid>/status`).
fn parent(pid: u32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("PPid:"))
        .and_then(|v| v.trim().parse().ok())
}

async fn spawn(env: &[(String, String)], wrapper: &[String]) -> (Proc, SocketAddr) {
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let mut proc = match wrapper.split_first() {
        None => Proc::baker("ambassador", "baker-ambassador", &env),
        Some((program, args)) => {
            let bin = crate::bin("baker-ambassador").display().to_string();
            let mut args: Vec<&str> = args.iter().map(String::as_str).collect();
            args.push(&bin);
            Proc::spawn("ambassador", program, &args, &env)
        }
    };
    let admin = proc.listen_addr().await;
    (proc, admin)
}

/// Sends one command to an HAProxy CLI socket and returns the answer.
pub fn socket_command(path: &Path, command: &str) -> String {
    // The master CLI is briefly away while the master re-executes itself for a reload.
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut s = loop {
        match UnixStream::connect(path) {
            Ok(s) => break s,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("connecting to {}: {e}", path.display()),
        }
    };
    s.set_read_timeout(Some(Duration::from_secs(5))).ok();
    s.write_all(format!("{command}\n").as_bytes())
        .expect("writing a command");
    s.shutdown(std::net::Shutdown::Write).ok();
    let mut out = String::new();
    s.read_to_string(&mut out).expect("reading an answer");
    out
}
