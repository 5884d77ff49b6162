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
use crate::runtime_api::{ApiCommand, ProcInfo, Socket};

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

/// How long HAProxy must have run for its death to be restarted at once, without backoff.
pub const STABLE_RUN: Duration = Duration::from_secs(1);

/// How long to wait before starting HAProxy again after it died, having run for `ran_for`: at
/// once when it ran for [`STABLE_RUN`] or longer (and the backoff starts over), else the next
/// delay of `backoff` (an HAProxy that dies as it starts is not restarted in a busy loop).
pub fn restart_delay(ran_for: Duration, backoff: &mut baker_client::backoff::Backoff) -> Duration {
    if ran_for >= STABLE_RUN {
        backoff.reset();
        Duration::ZERO
    } else {
        backoff.next_delay()
    }
}

/// How often a master that is not our child is checked for being still alive.
const ADOPTED_POLL: Duration = Duration::from_millis(200);

/// The running master process.
enum Master {
    /// Started by this ambassador: the reaper delivers its exit.
    Child {
        pid: i32,
        exit: oneshot::Receiver<Exit>,
    },
    /// Started by a previous ambassador and taken over: not our child, so its exit status goes
    /// to its parent and we can only poll whether it still runs.
    Adopted { pid: i32 },
}

impl Master {
    fn pid(&self) -> i32 {
        match self {
            Master::Child { pid, .. } | Master::Adopted { pid } => *pid,
        }
    }
}

/// What to do with an HAProxy found running on the run directory at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Leftover {
    /// Nothing of ours runs there.
    None,
    /// A master that answers on its CLI with a worker: take it over (reload, then manage it).
    Adopt(i32),
    /// A process running our configuration that cannot be managed: stop it.
    Stop(i32),
}

/// Decides about the process named by the pid file (`pid_text`), from its command line
/// (`None` when it does not run) and the master CLI's `show proc` (`None` when it does not
/// answer). Only a process started with this run directory's configuration file counts, so a
/// reused pid is left alone.
pub fn leftover(
    pid_text: Option<&str>,
    cmdline: Option<&str>,
    cfg: &Path,
    master: Option<&ProcInfo>,
) -> Leftover {
    let Some(pid) = pid_text.and_then(|t| t.trim().parse::<i32>().ok()) else {
        return Leftover::None;
    };
    if pid <= 1 || !cmdline.is_some_and(|c| c.contains(&*cfg.to_string_lossy())) {
        return Leftover::None;
    }
    match master {
        Some(info) if i64::from(info.master_pid) == i64::from(pid) && !info.workers.is_empty() => {
            Leftover::Adopt(pid)
        }
        _ => Leftover::Stop(pid),
    }
}

/// A process's command line with spaces between arguments; `None` when it does not run (a
/// zombie has an empty one).
fn cmdline(pid: i32) -> Option<String> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    (!raw.is_empty()).then(|| String::from_utf8_lossy(&raw).replace('\0', " "))
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
        self.child.as_ref().map(Master::pid)
    }

    /// Whether the running master was started by a previous ambassador.
    pub fn is_adopted(&self) -> bool {
        matches!(self.child, Some(Master::Adopted { .. }))
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

    /// What runs on this run directory already: a master left by an ambassador that was
    /// killed (the pid file names it), and whether it answers on its master CLI.
    pub async fn leftover(&self) -> Leftover {
        let pid_text = std::fs::read_to_string(&self.pid_file).ok();
        let pid = pid_text
            .as_deref()
            .and_then(|t| t.trim().parse::<i32>().ok());
        let cmd = pid.and_then(cmdline);
        let master = match cmd {
            Some(_) => self.master.proc_info().await.ok(),
            None => None,
        };
        leftover(
            pid_text.as_deref(),
            cmd.as_deref(),
            &self.cfg,
            master.as_ref(),
        )
    }

    /// Takes over a running master (see [`leftover`]): from now on it is managed through its
    /// master CLI and watched by polling, as it is not our child. Its output still goes where
    /// the previous ambassador had it.
    pub fn adopt(&mut self, pid: i32) {
        self.recent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        self.child = Some(Master::Adopted { pid });
    }

    /// Stops a process left running on this run directory that cannot be taken over.
    pub async fn stop_stale(&self, pid: i32) {
        tracing::warn!(
            pid,
            "stopping an HAProxy left running by a previous ambassador"
        );
        let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline && self.runs(pid) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if self.runs(pid) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }

    /// Whether `pid` still runs this run directory's configuration.
    fn runs(&self, pid: i32) -> bool {
        cmdline(pid).is_some_and(|c| c.contains(&*self.cfg.to_string_lossy()))
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
        self.child = Some(Master::Child { pid, exit });
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
            if self.admin.command(&ApiCommand::ShowInfo).await.is_ok()
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
        let exit = match self.child.as_mut()? {
            Master::Child { exit, .. } => match exit.try_recv() {
                Ok(e) => e,
                Err(oneshot::error::TryRecvError::Empty) => return None,
                Err(oneshot::error::TryRecvError::Closed) => Exit::Code(-1),
            },
            Master::Adopted { pid } => {
                let pid = *pid;
                if self.runs(pid) {
                    return None;
                }
                Exit::Unknown
            }
        };
        self.child = None;
        Some(exit)
    }

    /// Waits until the master exits (forever when none runs).
    pub async fn exited(&mut self) -> Exit {
        let e = match self.child.as_mut() {
            None => return std::future::pending().await,
            Some(Master::Child { exit, .. }) => exit.await.unwrap_or(Exit::Code(-1)),
            Some(Master::Adopted { pid }) => {
                let pid = *pid;
                while self.runs(pid) {
                    tokio::time::sleep(ADOPTED_POLL).await;
                }
                Exit::Unknown
            }
        };
        self.child = None;
        e
    }

    /// Saves server state, then reloads through the master CLI and waits for the new worker.
    ///
    /// The listening sockets pass to the new worker, so no connection is refused; the old
    /// worker finishes its connections (bounded by `hard-stop-after`).
    pub async fn reload(&mut self, state_file: &Path) -> Result<ProcInfo, HaproxyError> {
        if let Ok(state) = self.admin.command(&ApiCommand::ShowServersState).await {
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
        let _ = self.master.command(&ApiCommand::Reload).await;
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
                    if let Ok(text) = self.admin.command(&ApiCommand::ShowInfo).await {
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
            let _ = kill(Pid::from_raw(m.pid()), sig);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn info(master_pid: u32, workers: Vec<u32>) -> ProcInfo {
        ProcInfo {
            master_pid,
            reloads: 0,
            failed_reloads: 0,
            workers,
            old_workers: vec![],
        }
    }

    #[test]
    fn a_crash_after_a_stable_run_restarts_at_once_and_a_crash_loop_backs_off() {
        let ms = Duration::from_millis;
        let mut b = baker_client::backoff::Backoff::new(ms(200), Duration::from_secs(10));
        assert_eq!(
            restart_delay(Duration::from_secs(30), &mut b),
            Duration::ZERO
        );
        assert_eq!(restart_delay(STABLE_RUN, &mut b), Duration::ZERO);
        // Dying as it starts: 100-200 ms, then 200-400 ms...
        let first = restart_delay(ms(50), &mut b);
        assert!(first >= ms(100) && first <= ms(200), "{first:?}");
        let second = restart_delay(ms(50), &mut b);
        assert!(second >= ms(200) && second <= ms(400), "{second:?}");
        // ...and at once again after a stable run, from the start of the backoff.
        assert_eq!(
            restart_delay(Duration::from_secs(5), &mut b),
            Duration::ZERO
        );
        let again = restart_delay(ms(50), &mut b);
        assert!(again <= ms(200), "{again:?}");
    }

    #[test]
    fn a_master_that_answers_is_taken_over_and_anything_else_of_ours_stopped() {
        let cfg = Path::new("/run/baker/haproxy.cfg");
        let ours = "/usr/sbin/haproxy -W -db -f /run/baker/haproxy.cfg -p /run/baker/haproxy.pid";
        let up = info(42, vec![43]);
        assert_eq!(
            leftover(Some("42\n"), Some(ours), cfg, Some(&up)),
            Leftover::Adopt(42)
        );
        // Not answering, answering for another pid, or without a worker: not manageable.
        assert_eq!(
            leftover(Some("42"), Some(ours), cfg, None),
            Leftover::Stop(42)
        );
        assert_eq!(
            leftover(Some("42"), Some(ours), cfg, Some(&info(7, vec![8]))),
            Leftover::Stop(42)
        );
        assert_eq!(
            leftover(Some("42"), Some(ours), cfg, Some(&info(42, vec![]))),
            Leftover::Stop(42)
        );
        // No pid file, a bad one, a gone process, or a reused pid: nothing of ours runs.
        assert_eq!(leftover(None, None, cfg, None), Leftover::None);
        assert_eq!(
            leftover(Some("x"), Some(ours), cfg, Some(&up)),
            Leftover::None
        );
        assert_eq!(
            leftover(Some("1"), Some(ours), cfg, Some(&up)),
            Leftover::None
        );
        assert_eq!(leftover(Some("42"), None, cfg, Some(&up)), Leftover::None);
        assert_eq!(
            leftover(Some("42"), Some("/usr/bin/vim notes"), cfg, Some(&up)),
            Leftover::None
        );
        let other = Path::new("/run/other/haproxy.cfg");
        assert_eq!(
            leftover(Some("42"), Some(ours), other, Some(&up)),
            Leftover::None
        );
    }
}
