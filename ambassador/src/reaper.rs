//! Reaping child processes: the ambassador's own (HAProxy, `haproxy -c`) and, when it runs as
//! PID 1 in a container, any orphan the kernel hands it.
//!
//! One task waits for `SIGCHLD` and collects every exited child with `waitpid(-1)`; a child
//! started through [`Reaper::spawn`] has its exit delivered on a channel. Nothing else in the
//! process may wait for children, or this task would lose their status.

use std::collections::HashMap;
use std::io;
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::oneshot;

/// How a child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Code(i32),
    Signal(i32),
    /// A process that is not our child ended: only its parent saw how.
    Unknown,
}

impl Exit {
    /// The exit code a shell would report (128 + signal for a killed process).
    pub fn code(self) -> i32 {
        match self {
            Exit::Code(c) => c,
            Exit::Signal(s) => 128 + s,
            Exit::Unknown => 1,
        }
    }
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Exit::Code(c) => write!(f, "exit code {c}"),
            Exit::Signal(s) => match nix::sys::signal::Signal::try_from(*s) {
                Ok(sig) => write!(f, "signal {sig}"),
                Err(_) => write!(f, "signal {s}"),
            },
            Exit::Unknown => write!(f, "status unknown: not our child"),
        }
    }
}

#[derive(Default)]
struct Inner {
    waiting: HashMap<i32, oneshot::Sender<Exit>>,
    /// Exits collected before their child was registered (or of orphans).
    unclaimed: HashMap<i32, Exit>,
}

/// The process's child reaper. Cheap to clone.
#[derive(Clone)]
pub struct Reaper {
    inner: Arc<Mutex<Inner>>,
}

impl Reaper {
    /// Starts the reaping task on the current runtime.
    pub fn start() -> io::Result<Reaper> {
        let reaper = Reaper {
            inner: Arc::new(Mutex::new(Inner::default())),
        };
        let mut sigchld = signal(SignalKind::child())?;
        let r = reaper.clone();
        tokio::spawn(async move {
            loop {
                r.reap_all();
                // SIGCHLD wakes us; the timer covers any signal lost between reaps.
                tokio::select! {
                    _ = sigchld.recv() => {}
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        });
        Ok(reaper)
    }

    /// Spawns `cmd` and returns the child with a channel that delivers its exit.
    pub fn spawn(&self, cmd: &mut Command) -> io::Result<(Child, oneshot::Receiver<Exit>)> {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let child = cmd.spawn()?;
        let (tx, rx) = oneshot::channel();
        let pid = child.id() as i32;
        match inner.unclaimed.remove(&pid) {
            Some(exit) => {
                let _ = tx.send(exit);
            }
            None => {
                inner.waiting.insert(pid, tx);
            }
        }
        Ok((child, rx))
    }

    fn reap_all(&self) {
        loop {
            let (pid, exit) = match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => (pid.as_raw(), Exit::Code(code)),
                Ok(WaitStatus::Signaled(pid, sig, _)) => (pid.as_raw(), Exit::Signal(sig as i32)),
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return,
                Ok(_) | Err(Errno::EINTR) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "waiting for child processes failed");
                    return;
                }
            };
            let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
            match inner.waiting.remove(&pid) {
                Some(tx) => {
                    let _ = tx.send(exit);
                }
                None => {
                    tracing::debug!(pid, %exit, "reaped a process that was not ours");
                    if inner.unclaimed.len() > 1024 {
                        inner.unclaimed.clear();
                    }
                    inner.unclaimed.insert(pid, exit);
                }
            }
        }
    }
}
