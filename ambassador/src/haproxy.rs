//! The HAProxy child: checking a configuration, starting the master-worker process, reloading
//! it seamlessly through the master CLI, and stopping it.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::sync::oneshot;

use crate::reaper::{Exit, Reaper};
use crate::runtime_api::{ProcInfo, Socket};

/// How long HAProxy may take to start or reload.
const READY_TIMEOUT: Duration = Duration::from_secs(15);
/// HAProxy's recent log lines kept to explain a failure.
const RECENT_LINES: usize = 40;

#[derive(Debug, thiserror::Error)]
pub enum HaproxyError {
    #[error("cannot start {bin}")]
    Spawn {
        bin: String,
        #[source]
        source: std::io::Error,
    },
    #[error("HAProxy refused the configuration: {0}")]
    Invalid(String),
    #[error("HAProxy exited ({exit}) while starting: {log}")]
    Exited { exit: Exit, log: String },
    #[error("HAProxy did not become ready within {0:?}")]
    NotReady(Duration),
    #[error("the reload failed; the previous worker keeps serving: {0}")]
    ReloadFailed(String),
    #[error(transparent)]
    Api(#[from] crate::runtime_api::ApiError),
}

struct Master {
    pid: i32,
    exit: oneshot::Receiver<Exit>,
}

/// One HAProxy master-worker process, started and restarted from one configuration file.
pub struct Haproxy {
    bin: PathBuf,
    cfg: PathBuf,
    pid_file: PathBuf,
    pub master: Socket,
    pub admin: Socket,
    reaper: Reaper,
    child: Option<Master>,
    recent: Arc<Mutex<VecDeque<String>>>,
}

impl Haproxy {
    pub fn new(bin: PathBuf, run_dir: &Path, reaper: Reaper) -> Self {
        Haproxy {
            bin,
            cfg: crate::render::config_path(run_dir),
            pid_file: run_dir.join("haproxy.pid"),
            master: Socket::new(run_dir.join("master.sock")),
            admin: Socket::new(run_dir.join("admin.sock")),
            reaper,
            child: None,
            recent: Arc::new(Mutex::new(VecDeque::new())),
        }
    }

    pub fn config_path(&self) -> &Path {
        &self.cfg
    }

    /// The master's pid, while it runs.
    pub fn pid(&self) -> Option<i32> {
        self.child.as_ref().map(|m| m.pid)
    }

    /// Starts HAProxy as `cmd` says, with stdin closed and both outputs piped.
    fn spawn(&self, cmd: &mut Command) -> Result<(Child, oneshot::Receiver<Exit>), HaproxyError> {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        self.reaper.spawn(cmd).map_err(|e| HaproxyError::Spawn {
            bin: self.bin.display().to_string(),
            source: e,
        })
    }

    /// Checks a configuration file with `haproxy -c`; the error holds HAProxy's own words.
    pub async fn check(&self, path: &Path) -> Result<(), HaproxyError> {
        let mut cmd = Command::new(&self.bin);
        cmd.arg("-c").arg("-f").arg(path);
        let (mut child, exit) = self.spawn(&mut cmd)?;
        let mut readers = Vec::new();
        for stream in take_output(&mut child) {
            readers.push(tokio::task::spawn_blocking(move || {
                let mut text = String::new();
                let mut s = stream;
                let _ = s.read_to_string(&mut text);
                text
            }));
        }
        let exit = exit.await.unwrap_or(Exit::Code(-1));
        let mut output = String::new();
        for r in readers {
            output.push_str(&r.await.unwrap_or_default());
        }
        if exit == Exit::Code(0) {
            Ok(())
        } else {
            let msg: Vec<&str> = output
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.contains("[NOTICE]"))
                .collect();
            Err(HaproxyError::Invalid(if msg.is_empty() {
                format!("haproxy -c failed ({exit}) with no message")
            } else {
                msg.join(" | ")
            }))
        }
    }

    /// Stops a master left behind by an ambassador that was killed (its pid file names it).
    pub async fn stop_stale(&self) {
        let Ok(text) = std::fs::read_to_string(&self.pid_file) else {
            return;
        };
        let Ok(pid) = text.trim().parse::<i32>() else {
            return;
        };
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if !cmdline.contains(&*self.cfg.to_string_lossy()) {
            return;
        }
        tracing::warn!(
            pid,
            "stopping an HAProxy left running by a previous ambassador"
        );
        let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline && kill(Pid::from_raw(pid), None).is_ok() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Starts the master-worker process and waits until its worker answers on the admin socket.
    pub async fn start(&mut self) -> Result<(), HaproxyError> {
        for sock in [self.master.path(), self.admin.path()] {
            let _ = std::fs::remove_file(sock);
        }
        let mut cmd = Command::new(&self.bin);
        cmd.arg("-W")
            .arg("-db")
            .arg("-f")
            .arg(&self.cfg)
            .arg("-p")
            .arg(&self.pid_file)
            .arg("-S")
            .arg(format!("{},mode,600", self.master.path().display()));
        let (mut child, exit) = self.spawn(&mut cmd)?;
        self.recent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        for stream in take_output(&mut child) {
            let recent = self.recent.clone();
            std::thread::spawn(move || forward_log(stream, &recent));
        }
        let pid = child.id() as i32;
        self.child = Some(Master { pid, exit });
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(exit) = self.try_exit() {
                // Let the log threads catch HAProxy's last words.
                tokio::time::sleep(Duration::from_millis(100)).await;
                return Err(HaproxyError::Exited {
                    exit,
                    log: self.recent_problems(),
                });
            }
            if self.admin.command("show info").await.is_ok()
                && self.master.proc_info().await.is_ok()
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(HaproxyError::NotReady(READY_TIMEOUT));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The master's exit, if it has exited.
    fn try_exit(&mut self) -> Option<Exit> {
        let m = self.child.as_mut()?;
        match m.exit.try_recv() {
            Ok(e) => {
                self.child = None;
                Some(e)
            }
            Err(oneshot::error::TryRecvError::Empty) => None,
            Err(oneshot::error::TryRecvError::Closed) => {
                self.child = None;
                Some(Exit::Code(-1))
            }
        }
    }

    /// Waits until the master exits (forever when none runs).
    pub async fn exited(&mut self) -> Exit {
        let Some(m) = self.child.as_mut() else {
            return std::future::pending().await;
        };
        let e = (&mut m.exit).await.unwrap_or(Exit::Code(-1));
        self.child = None;
        e
    }

    /// Saves server state, then reloads through the master CLI and waits for the new worker.
    ///
    /// The listening sockets pass to the new worker, so no connection is refused; the old
    /// worker finishes its connections (bounded by `hard-stop-after`).
    pub async fn reload(&mut self, state_file: &Path) -> Result<ProcInfo, HaproxyError> {
        if let Ok(state) = self.admin.command("show servers state").await {
            let tmp = state_file.with_extension("tmp");
            if std::fs::write(&tmp, state).is_ok() {
                let _ = std::fs::rename(&tmp, state_file);
            }
        }
        let before = self.master.proc_info().await?;
        self.recent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        // The master re-executes itself and drops the CLI connection: its answer is empty.
        let _ = self.master.command("reload").await;
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            tokio::time::sleep(Duration::from_millis(20)).await;
            if let Ok(info) = self.master.proc_info().await {
                if info.failed_reloads > before.failed_reloads {
                    return Err(HaproxyError::ReloadFailed(self.recent_problems()));
                }
                if info.reloads > before.reloads && !info.workers.is_empty() {
                    let worker = info.workers[0];
                    // The admin socket must be served by the new worker before we use it.
                    if let Ok(text) = self.admin.command("show info").await {
                        if text.lines().any(|l| l.trim() == format!("Pid: {worker}")) {
                            return Ok(info);
                        }
                    }
                }
            }
            if Instant::now() > deadline {
                return Err(HaproxyError::NotReady(READY_TIMEOUT));
            }
        }
    }

    /// Sends a signal to the master.
    pub fn signal(&self, sig: Signal) {
        if let Some(m) = &self.child {
            let _ = kill(Pid::from_raw(m.pid), sig);
        }
    }

    /// Stops gracefully (`SIGUSR1`: finish in-flight requests), then harder after `grace`.
    pub async fn stop(&mut self, grace: Duration) -> Option<Exit> {
        self.child.as_ref()?;
        for (sig, wait) in [
            (Signal::SIGUSR1, grace + Duration::from_secs(1)),
            (Signal::SIGTERM, Duration::from_secs(2)),
            (Signal::SIGKILL, Duration::from_secs(2)),
        ] {
            self.signal(sig);
            if let Ok(e) = tokio::time::timeout(wait, self.exited()).await {
                return Some(e);
            }
        }
        None
    }

    /// Recent warnings and alerts from HAProxy, to explain a failure.
    fn recent_problems(&self) -> String {
        let lines = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        let picked: Vec<&str> = lines
            .iter()
            .map(String::as_str)
            .filter(|l| l.contains("ALERT") || l.contains("WARNING") || l.contains("failure"))
            .collect();
        if picked.is_empty() {
            lines.iter().cloned().collect::<Vec<_>>().join(" | ")
        } else {
            picked.join(" | ")
        }
    }
}

/// Copies HAProxy's output into the ambassador's log, keeping the last lines.
fn forward_log(stream: Box<dyn Read + Send>, recent: &Mutex<VecDeque<String>>) {
    for line in BufReader::new(stream).lines().map_while(Result::ok) {
        let line = line.trim_end().to_owned();
        if line.is_empty() {
            continue;
        }
        if line.contains("[ALERT]") {
            tracing::error!(target: "haproxy", "{line}");
        } else if line.contains("[WARNING]") {
            tracing::warn!(target: "haproxy", "{line}");
        } else {
            tracing::info!(target: "haproxy", "{line}");
        }
        let mut r = recent.lock().unwrap_or_else(|p| p.into_inner());
        if r.len() == RECENT_LINES {
            r.pop_front();
        }
        r.push_back(line);
    }
}

/// The child's piped stdout and stderr, taken so that each can be read on its own thread.
fn take_output(child: &mut Child) -> Vec<Box<dyn Read + Send>> {
    [
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    ]
    .into_iter()
    .flatten()
    .collect()
}
