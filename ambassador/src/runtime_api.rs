//! HAProxy's runtime API over a unix socket (the admin stats socket, or the master CLI), and
//! parsers for the answers the ambassador reads.
//!
//! Every command Baker sends is an [`ApiCommand`], spelled in one place ([`ApiCommand::line`]);
//! a line holding a `;`, a backslash or a control character is refused before it is sent, since
//! HAProxy's CLI would read it as several commands. [`Socket::command`] sends one command per
//! connection (what the master CLI needs); [`Socket::session`] opens one connection in HAProxy's
//! interactive mode (`prompt`) over which a whole reconciliation pass is sent, each answer
//! matched to its command, so a refused command is reported with HAProxy's own words.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use baker_client::ops::ServerState;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// How long one command may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);
/// What HAProxy's interactive mode prints after each answer: the prompt, on a line of its own.
const PROMPT: &[u8] = b"\n> ";
/// How many commands [`Session::run_all`] sends before reading their answers.
const PIPELINE: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("cannot talk to HAProxy on {path}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("HAProxy did not answer {command:?} on {path} in time")]
    Timeout { path: String, command: String },
    #[error("HAProxy refused {command:?}: {answer}")]
    Refused { command: String, answer: String },
    #[error("cannot read HAProxy's answer to {command:?}: {message}")]
    Parse { command: String, message: String },
    #[error("refusing to send {command:?}: a ';', a backslash or a control character would make HAProxy read another command")]
    Unsafe { command: String },
    #[error("HAProxy closed the connection before answering {command:?}")]
    Closed { command: String },
}

impl ApiError {
    /// Whether HAProxy (or this client, for an unsafe line) refused one command while the
    /// connection stays usable, as opposed to a connection that failed.
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            ApiError::Refused { .. } | ApiError::Parse { .. } | ApiError::Unsafe { .. }
        )
    }
}

/// A server's administrative state, as `set server ... state` sets it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdminState {
    /// Takes traffic.
    Ready,
    /// No new traffic; existing connections continue.
    Drain,
    /// No traffic at all; the state `del server` needs.
    Maint,
}

impl AdminState {
    fn word(self) -> &'static str {
        match self {
            AdminState::Ready => "ready",
            AdminState::Drain => "drain",
            AdminState::Maint => "maint",
        }
    }
}

/// Every command Baker sends to HAProxy's CLI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiCommand {
    /// `show info` (the worker's pid and counters).
    ShowInfo,
    /// `show proc`, on the master CLI.
    ShowProc,
    /// `show servers state`, every backend.
    ShowServersState,
    /// `show stat` of servers only (current sessions per server).
    ShowServerStats,
    /// `reload`, on the master CLI.
    Reload,
    /// A new server, in maintenance until enabled; `options` are the backend's server options.
    AddServer {
        backend: String,
        server: String,
        address: IpAddr,
        port: u16,
        weight: u16,
        options: String,
    },
    EnableHealth {
        backend: String,
        server: String,
    },
    EnableServer {
        backend: String,
        server: String,
    },
    /// Computes the stickiness cookie of every server of a `sticky` backend, servers added at
    /// run time included (they get none of their own).
    EnableDynamicCookie {
        backend: String,
    },
    SetAddr {
        backend: String,
        server: String,
        address: IpAddr,
        port: u16,
    },
    SetWeight {
        backend: String,
        server: String,
        weight: u16,
    },
    SetState {
        backend: String,
        server: String,
        state: AdminState,
    },
    /// Deletes a server in maintenance with no connection left.
    DelServer {
        backend: String,
        server: String,
    },
    /// Closes every session of a server (a drain that timed out).
    ShutdownSessions {
        backend: String,
        server: String,
    },
    /// Marks a server down (a hung server).
    MarkDown {
        backend: String,
        server: String,
    },
    /// Marks a server up again (a hung server that answers again).
    MarkUp {
        backend: String,
        server: String,
    },
}

impl ApiCommand {
    /// The line HAProxy reads, or [`ApiError::Unsafe`] if a value would end the command early.
    pub fn line(&self) -> Result<String, ApiError> {
        let line = self.to_string();
        if line
            .chars()
            .any(|c| c == ';' || c == '\\' || c.is_control())
        {
            return Err(ApiError::Unsafe { command: line });
        }
        Ok(line)
    }

    /// Whether `answer` (trimmed) means the command succeeded. Commands that change something
    /// answer nothing, or one of a few fixed sentences, when they succeed; queries always do.
    pub fn succeeded(&self, answer: &str) -> bool {
        let ok: &[&str] = match self {
            ApiCommand::ShowInfo
            | ApiCommand::ShowProc
            | ApiCommand::ShowServersState
            | ApiCommand::ShowServerStats
            | ApiCommand::Reload => return true,
            ApiCommand::AddServer { .. } => &["New server registered."],
            ApiCommand::DelServer { .. } => &["Server deleted."],
            ApiCommand::SetAddr { .. } => &[
                "IP changed",
                "no need to change",
                "port changed",
                "IP and port",
            ],
            ApiCommand::EnableHealth { .. }
            | ApiCommand::EnableServer { .. }
            | ApiCommand::EnableDynamicCookie { .. }
            | ApiCommand::SetWeight { .. }
            | ApiCommand::SetState { .. }
            | ApiCommand::ShutdownSessions { .. }
            | ApiCommand::MarkDown { .. }
            | ApiCommand::MarkUp { .. } => &[],
        };
        answer.is_empty() || ok.iter().any(|o| answer.starts_with(o))
    }
}

/// HAProxy's spelling of each command (checked by [`ApiCommand::line`] before it is sent).
impl fmt::Display for ApiCommand {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ApiCommand::ShowInfo => f.write_str("show info"),
            ApiCommand::ShowProc => f.write_str("show proc"),
            ApiCommand::ShowServersState => f.write_str("show servers state"),
            // Every proxy (-1), servers only (4), every server (-1).
            ApiCommand::ShowServerStats => f.write_str("show stat -1 4 -1"),
            ApiCommand::Reload => f.write_str("reload"),
            ApiCommand::AddServer {
                backend,
                server,
                address,
                port,
                weight,
                options,
            } => write!(
                f,
                "add server {backend}/{server} {address}:{port} weight {weight} {options}"
            ),
            ApiCommand::EnableHealth { backend, server } => {
                write!(f, "enable health {backend}/{server}")
            }
            ApiCommand::EnableServer { backend, server } => {
                write!(f, "enable server {backend}/{server}")
            }
            ApiCommand::EnableDynamicCookie { backend } => {
                write!(f, "enable dynamic-cookie backend {backend}")
            }
            ApiCommand::SetAddr {
                backend,
                server,
                address,
                port,
            } => write!(
                f,
                "set server {backend}/{server} addr {address} port {port}"
            ),
            ApiCommand::SetWeight {
                backend,
                server,
                weight,
            } => write!(f, "set server {backend}/{server} weight {weight}"),
            ApiCommand::SetState {
                backend,
                server,
                state,
            } => write!(f, "set server {backend}/{server} state {}", state.word()),
            ApiCommand::DelServer { backend, server } => {
                write!(f, "del server {backend}/{server}")
            }
            ApiCommand::ShutdownSessions { backend, server } => {
                write!(f, "shutdown sessions server {backend}/{server}")
            }
            ApiCommand::MarkDown { backend, server } => {
                write!(f, "set server {backend}/{server} health down")
            }
            ApiCommand::MarkUp { backend, server } => {
                write!(f, "set server {backend}/{server} health up")
            }
        }
    }
}

/// A socket speaking HAProxy's CLI.
#[derive(Debug, Clone)]
pub struct Socket {
    path: PathBuf,
}

impl Socket {
    /// The CLI socket at `path` (nothing is opened until a command is sent).
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Socket { path: path.into() }
    }

    /// Where the socket lives.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn io(&self) -> impl Fn(std::io::Error) -> ApiError + '_ {
        move |source| ApiError::Io {
            path: self.path.display().to_string(),
            source,
        }
    }

    fn timeout(&self, command: &str) -> ApiError {
        ApiError::Timeout {
            path: self.path.display().to_string(),
            command: command.to_owned(),
        }
    }

    /// Sends `command` on a connection of its own and returns the whole answer. The write
    /// half is closed after the command, which the master CLI needs before it answers.
    pub async fn command(&self, command: &ApiCommand) -> Result<String, ApiError> {
        let line = command.line()?;
        let io = self.io();
        let fut = async {
            let mut s = UnixStream::connect(&self.path).await.map_err(&io)?;
            s.write_all(format!("{line}\n").as_bytes())
                .await
                .map_err(&io)?;
            s.shutdown().await.map_err(&io)?;
            let mut out = String::new();
            s.read_to_string(&mut out).await.map_err(&io)?;
            Ok(out)
        };
        tokio::time::timeout(COMMAND_TIMEOUT, fut)
            .await
            .map_err(|_| self.timeout(&line))?
    }

    /// Opens one connection for a series of commands, in interactive mode from its first one.
    pub async fn session(&self) -> Result<Session, ApiError> {
        let io = self.io();
        let stream = tokio::time::timeout(COMMAND_TIMEOUT, UnixStream::connect(&self.path))
            .await
            .map_err(|_| self.timeout("prompt"))?
            .map_err(&io)?;
        // `prompt` goes out with the first command, in the same write: one round trip less.
        Ok(Session {
            socket: self.clone(),
            stream,
            buf: Vec::new(),
            prompt_pending: true,
        })
    }

    /// `show servers state`, parsed.
    pub async fn servers_state(&self) -> Result<Running, ApiError> {
        let cmd = ApiCommand::ShowServersState;
        let text = self.command(&cmd).await?;
        parse(&cmd, &text, parse_servers_state)
    }

    /// Every server's state and counters (`show stat`), on a connection of its own.
    pub async fn server_stats(&self) -> Result<Vec<ServerStat>, ApiError> {
        let cmd = ApiCommand::ShowServerStats;
        let text = self.command(&cmd).await?;
        parse(&cmd, &text, parse_server_stats)
    }

    /// `show proc` on the master CLI, parsed.
    pub async fn proc_info(&self) -> Result<ProcInfo, ApiError> {
        let cmd = ApiCommand::ShowProc;
        let text = self.command(&cmd).await?;
        parse(&cmd, &text, parse_show_proc)
    }
}

fn parse<T>(
    cmd: &ApiCommand,
    text: &str,
    parser: fn(&str) -> Result<T, String>,
) -> Result<T, ApiError> {
    parser(text).map_err(|message| ApiError::Parse {
        command: cmd.to_string(),
        message,
    })
}

/// One connection to HAProxy's CLI in interactive mode: [`Session::ask`] and [`Session::run`]
/// wait for each answer before the next command, [`Session::run_all`] sends a batch and then
/// reads its answers. Dropping it closes the connection.
#[derive(Debug)]
pub struct Session {
    socket: Socket,
    stream: UnixStream,
    buf: Vec<u8>,
    /// `prompt` (interactive mode) is still to be sent, with the first command.
    prompt_pending: bool,
}

impl Session {
    /// Sends `command` and returns HAProxy's answer, trimmed, whatever it says.
    pub async fn ask(&mut self, command: &ApiCommand) -> Result<String, ApiError> {
        let line = command.line()?;
        self.exchange(&line).await
    }

    /// Sends a command that changes something; HAProxy's answer decides whether it succeeded.
    pub async fn run(&mut self, command: &ApiCommand) -> Result<(), ApiError> {
        let answer = self.ask(command).await?;
        if command.succeeded(&answer) {
            Ok(())
        } else {
            Err(ApiError::Refused {
                command: command.to_string(),
                answer,
            })
        }
    }

    /// Sends `commands` that change something without waiting for each answer before the
    /// next (HAProxy runs them one after the other, in order, as if each had waited), then
    /// reads every answer: one round trip for a whole pass instead of one per command. Returns
    /// each command's outcome, in order; `Err` only when the connection failed, after which
    /// nothing is known of the commands not yet answered. A line that is not safe to send is
    /// refused alone ([`ApiError::Unsafe`]); the others are sent.
    pub async fn run_all(
        &mut self,
        commands: &[ApiCommand],
    ) -> Result<Vec<Result<(), ApiError>>, ApiError> {
        let mut out = Vec::with_capacity(commands.len());
        // A bounded number of lines per write, so that neither side's buffers fill while the
        // other waits.
        for chunk in commands.chunks(PIPELINE) {
            let lines: Vec<Result<String, ApiError>> = chunk.iter().map(ApiCommand::line).collect();
            let sent: Vec<&str> = lines
                .iter()
                .filter_map(|l| l.as_ref().ok().map(String::as_str))
                .collect();
            let mut answers = self.exchange_all(&sent).await?.into_iter();
            for (command, line) in chunk.iter().zip(lines) {
                out.push(match line {
                    Err(e) => Err(e),
                    Ok(_) => {
                        // One answer per line sent (exchange_all reads exactly that many).
                        let answer = answers.next().unwrap_or_default();
                        if command.succeeded(&answer) {
                            Ok(())
                        } else {
                            Err(ApiError::Refused {
                                command: command.to_string(),
                                answer,
                            })
                        }
                    }
                });
            }
        }
        Ok(out)
    }

    /// `show servers state`, parsed.
    pub async fn servers_state(&mut self) -> Result<Running, ApiError> {
        let cmd = ApiCommand::ShowServersState;
        let text = self.ask(&cmd).await?;
        parse(&cmd, &text, parse_servers_state)
    }

    /// Response errors and answers per server (`show stat`).
    pub async fn counters(&mut self) -> Result<crate::hung::Readings, ApiError> {
        let cmd = ApiCommand::ShowServerStats;
        let text = self.ask(&cmd).await?;
        parse(&cmd, &text, crate::hung::parse_counters)
    }

    /// Current sessions per server (`show stat`).
    pub async fn sessions(&mut self) -> Result<BTreeMap<(String, String), u64>, ApiError> {
        let cmd = ApiCommand::ShowServerStats;
        let text = self.ask(&cmd).await?;
        parse(&cmd, &text, parse_stat_sessions)
    }

    /// Writes `line` (already checked) and reads up to the next prompt.
    async fn exchange(&mut self, line: &str) -> Result<String, ApiError> {
        let mut answers = self.exchange_all(&[line]).await?;
        // exchange_all returns exactly one answer per line.
        Ok(answers.pop().unwrap_or_default())
    }

    /// Writes `lines` (already checked) at once and reads one answer per line, in order.
    async fn exchange_all(&mut self, lines: &[&str]) -> Result<Vec<String>, ApiError> {
        if lines.is_empty() {
            return Ok(Vec::new());
        }
        let socket = self.socket.clone();
        let io = socket.io();
        let described = lines.join("; ");
        // The `prompt` that opens the session, if not sent yet: its answer (empty) is skipped.
        let mut sent: Vec<&str> = Vec::with_capacity(lines.len() + 1);
        if std::mem::take(&mut self.prompt_pending) {
            sent.push("prompt");
        }
        let skip = sent.len();
        sent.extend_from_slice(lines);
        let fut = async {
            let mut text = sent.join("\n");
            text.push('\n');
            self.stream.write_all(text.as_bytes()).await.map_err(&io)?;
            self.buf.clear();
            let mut answers = Vec::with_capacity(sent.len());
            let mut chunk = [0u8; 8192];
            loop {
                while let Some((len, used)) = first_answer(&self.buf) {
                    answers.push(String::from_utf8_lossy(&self.buf[..len]).trim().to_owned());
                    self.buf.drain(..used);
                    if answers.len() == sent.len() {
                        return Ok(answers.split_off(skip));
                    }
                }
                let n = self.stream.read(&mut chunk).await.map_err(&io)?;
                if n == 0 {
                    return Err(ApiError::Closed {
                        command: sent[answers.len()].to_owned(),
                    });
                }
                self.buf.extend_from_slice(&chunk[..n]);
            }
        };
        tokio::time::timeout(COMMAND_TIMEOUT, fut)
            .await
            .map_err(|_| socket.timeout(&described))?
    }
}

/// The first complete answer in `buf`: its length (without its prompt) and the length with it.
///
/// In interactive mode HAProxy prints the prompt (`"> "`, on a line of its own) once the
/// command is done, and only then; most answers end with an empty line before it, some
/// (`del server`) do not. No answer to a command Baker sends has a line starting with `"> "`,
/// so the first prompt in `buf` ends the first answer.
fn first_answer(buf: &[u8]) -> Option<(usize, usize)> {
    buf.windows(PROMPT.len())
        .position(|w| w == PROMPT)
        .map(|at| (at, at + PROMPT.len()))
}

/// A server as HAProxy runs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunningServer {
    pub name: String,
    pub address: String,
    pub port: u16,
    /// The user weight (what `set server ... weight` changes).
    pub weight: u16,
    /// In maintenance (forced, inherited, or from the configuration).
    pub maint: bool,
    /// Draining: no new traffic, existing connections continue.
    pub drain: bool,
    /// Operationally up (HAProxy's own view: checks, observed errors).
    pub up: bool,
}

/// Every backend's servers, as HAProxy runs them.
pub type Running = BTreeMap<String, BTreeMap<String, RunningServer>>;

// srv_admin_state bits (HAProxy's `enum srv_admin`).
const ADMF_FMAINT: u32 = 0x01;
const ADMF_IMAINT: u32 = 0x02;
const ADMF_CMAINT: u32 = 0x04;
const ADMF_FDRAIN: u32 = 0x08;
const ADMF_IDRAIN: u32 = 0x10;
const ADMF_RMAINT: u32 = 0x20;

/// Parses `show servers state` (format version 1).
pub fn parse_servers_state(text: &str) -> Result<Running, String> {
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    match lines.next().map(str::trim) {
        Some("1") => {}
        Some(other) => return Err(format!("unknown format version {other:?}")),
        None => return Err("empty answer".into()),
    }
    let mut out = Running::new();
    for line in lines {
        if line.starts_with('#') {
            continue;
        }
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 19 {
            return Err(format!("short line {line:?}"));
        }
        let num = |i: usize| -> Result<u32, String> {
            f[i].parse()
                .map_err(|_| format!("bad number {:?} in {line:?}", f[i]))
        };
        let admin = num(6)?;
        let server = RunningServer {
            name: f[3].to_owned(),
            address: f[4].to_owned(),
            port: num(18)? as u16,
            weight: num(7)? as u16,
            maint: admin & (ADMF_FMAINT | ADMF_IMAINT | ADMF_CMAINT | ADMF_RMAINT) != 0,
            drain: admin & (ADMF_FDRAIN | ADMF_IDRAIN) != 0,
            up: num(5)? == 2,
        };
        out.entry(f[1].to_owned())
            .or_default()
            .insert(server.name.clone(), server);
    }
    Ok(out)
}

/// Parses the CSV of `show stat` into current sessions per (backend, server).
pub fn parse_stat_sessions(text: &str) -> Result<BTreeMap<(String, String), u64>, String> {
    let mut lines = text.lines();
    let header = lines.next().ok_or("empty answer")?;
    let cols: Vec<&str> = header.trim_start_matches("# ").split(',').collect();
    let scur = cols
        .iter()
        .position(|c| *c == "scur")
        .ok_or("no scur column")?;
    let mut out = BTreeMap::new();
    for line in lines.filter(|l| !l.trim().is_empty()) {
        let f: Vec<&str> = line.split(',').collect();
        if f.len() <= scur || f[1] == "BACKEND" || f[1] == "FRONTEND" {
            continue;
        }
        let n = f[scur]
            .parse()
            .map_err(|_| format!("bad session count {:?} in {line:?}", f[scur]))?;
        out.insert((f[0].to_owned(), f[1].to_owned()), n);
    }
    Ok(out)
}

/// One server's line of `show stat`: its state and counters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerStat {
    pub backend: String,
    pub server: String,
    pub state: ServerState,
    pub weight: u16,
    /// HTTP requests (`req_tot`) where HAProxy counts them, else sessions (`stot`).
    pub requests: u64,
    /// Connection errors, response errors and 5xx answers (`econ + eresp + hrsp_5xx`).
    pub errors: u64,
    /// Current sessions (`scur`).
    pub sessions: u64,
}

/// Reads a `show stat` status word: `UP`, `UP 1/3`, `DOWN`, `NOLB`, `DRAIN`, `MAINT (via x)`,
/// `no check`...
fn stat_state(status: &str) -> ServerState {
    if status.starts_with("MAINT") {
        ServerState::Maint
    } else if status.starts_with("DRAIN") || status.starts_with("NOLB") {
        ServerState::Drain
    } else if status.starts_with("DOWN") {
        ServerState::Down
    } else {
        ServerState::Up
    }
}

/// Parses `show stat` (CSV, servers only) into each server's state and counters. Empty
/// counters (not applicable to the server's mode) count as zero.
pub fn parse_server_stats(text: &str) -> Result<Vec<ServerStat>, String> {
    let mut lines = text.lines();
    let header = lines.next().ok_or("empty answer")?;
    let cols: Vec<&str> = header.trim_start_matches("# ").split(',').collect();
    let col = |name: &str| cols.iter().position(|c| *c == name);
    let need = |name: &'static str| col(name).ok_or(format!("no {name} column"));
    let (status, weight, scur, stot) = (
        need("status")?,
        need("weight")?,
        need("scur")?,
        need("stot")?,
    );
    let req_tot = col("req_tot");
    let errors: Vec<usize> = ["econ", "eresp", "hrsp_5xx"]
        .iter()
        .filter_map(|c| col(c))
        .collect();
    let mut out = Vec::new();
    for line in lines.filter(|l| !l.trim().is_empty()) {
        let f: Vec<&str> = line.split(',').collect();
        if f.len() < cols.len().min(stot + 1) || f[1] == "BACKEND" || f[1] == "FRONTEND" {
            continue;
        }
        let num = |i: usize| -> Result<u64, String> {
            match f.get(i).map(|v| v.trim()) {
                None | Some("") => Ok(0),
                Some(v) => v
                    .parse()
                    .map_err(|_| format!("bad counter {v:?} in {line:?}")),
            }
        };
        let requests = match req_tot.and_then(|i| f.get(i)).map(|v| v.trim()) {
            Some(v) if !v.is_empty() => num(req_tot.unwrap_or(stot))?,
            _ => num(stot)?,
        };
        let mut errs = 0;
        for &i in &errors {
            errs += num(i)?;
        }
        out.push(ServerStat {
            backend: f[0].to_owned(),
            server: f[1].to_owned(),
            state: stat_state(f.get(status).copied().unwrap_or("")),
            weight: num(weight)?.min(u64::from(u16::MAX)) as u16,
            requests,
            errors: errs,
            sessions: num(scur)?,
        });
    }
    Ok(out)
}

/// The master's view of its processes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcInfo {
    pub master_pid: u32,
    /// Reloads since the master started.
    pub reloads: u64,
    /// Reloads that failed (the previous worker kept running).
    pub failed_reloads: u64,
    /// Current workers' pids.
    pub workers: Vec<u32>,
    /// Workers of a previous generation still finishing their connections.
    pub old_workers: Vec<u32>,
}

/// Parses `show proc` from the master CLI.
pub fn parse_show_proc(text: &str) -> Result<ProcInfo, String> {
    let mut info = ProcInfo {
        master_pid: 0,
        reloads: 0,
        failed_reloads: 0,
        workers: vec![],
        old_workers: vec![],
    };
    let mut section = "";
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with("#<PID>") || t.is_empty() {
            continue;
        }
        if let Some(s) = t.strip_prefix('#') {
            section = match s.trim() {
                "workers" => "workers",
                "old workers" => "old",
                _ => "other",
            };
            continue;
        }
        let f: Vec<&str> = t.split_whitespace().collect();
        if f.len() < 3 {
            continue;
        }
        let pid: u32 = f[0].parse().map_err(|_| format!("bad pid in {t:?}"))?;
        match (f[1], section) {
            ("master", _) => {
                info.master_pid = pid;
                info.reloads = f[2].parse().map_err(|_| format!("bad reloads in {t:?}"))?;
                if let Some(i) = t.find("failed:") {
                    let rest = t[i + 7..].trim_start();
                    let n: String = rest.chars().take_while(char::is_ascii_digit).collect();
                    info.failed_reloads = n.parse().unwrap_or(0);
                }
            }
            ("worker", "old") => info.old_workers.push(pid),
            ("worker", _) => info.workers.push(pid),
            _ => {}
        }
    }
    if info.master_pid == 0 {
        return Err("no master line".into());
    }
    Ok(info)
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATE: &str = "1
# be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state srv_uweight srv_iweight srv_time_since_last_change srv_check_status srv_check_result srv_check_health srv_check_state srv_agent_state bk_f_forced_id srv_f_forced_id srv_fqdn srv_port srvrecord srv_use_ssl srv_check_port srv_check_addr srv_agent_addr srv_agent_port
3 b 1 a 127.0.0.1 2 0 10 10 0 6 3 2 6 0 0 0 - 18100 - 0 0 - - 0
3 b 2 x 127.0.0.1 2 8 20 20 1 6 3 2 6 0 0 0 - 18101 - 0 0 - - 0
3 b 3 y 127.0.0.1 0 1 20 20 1 8 2 0 6 0 0 0 - 18102 - 0 0 - - 0
5 c 1 z ::1 2 0 1 1 1 8 2 0 6 0 0 0 - 80 - 0 0 - - 0
";

    #[test]
    fn servers_state() {
        let r = parse_servers_state(STATE).unwrap();
        assert_eq!(r["b"].len(), 3);
        let a = &r["b"]["a"];
        assert_eq!(
            (a.port, a.weight, a.maint, a.drain, a.up),
            (18100, 10, false, false, true)
        );
        assert!(r["b"]["x"].drain && !r["b"]["x"].maint);
        assert!(r["b"]["y"].maint && !r["b"]["y"].up);
        assert_eq!(r["c"]["z"].address, "::1");
        assert!(parse_servers_state("1\n").unwrap().is_empty());
        assert!(parse_servers_state("Unknown command\n").is_err());
    }

    #[test]
    fn show_proc() {
        let text = "#<PID>          <type>          <reloads>       <uptime>        <version>
12833           master          2 [failed: 1]   0d00h00m21s     2.6.12-1+deb12u4
# workers
14187           worker          0               0d00h00m00s     2.6.12-1+deb12u4
# old workers
14004           worker          1               0d00h00m10s     2.6.12-1+deb12u4
# programs
";
        let p = parse_show_proc(text).unwrap();
        assert_eq!(
            p,
            ProcInfo {
                master_pid: 12833,
                reloads: 2,
                failed_reloads: 1,
                workers: vec![14187],
                old_workers: vec![14004]
            }
        );
    }

    #[test]
    fn stat_sessions() {
        let text = "# pxname,svname,qcur,qmax,scur,smax\nb,a,0,0,3,5\nb,BACKEND,0,0,3,5\n";
        let s = parse_stat_sessions(text).unwrap();
        assert_eq!(s.len(), 1);
        assert_eq!(s[&("b".to_string(), "a".to_string())], 3);
    }

    #[test]
    fn an_answer_ends_at_the_prompt() {
        let len = |buf: &[u8]| first_answer(buf).map(|(len, _)| len);
        assert_eq!(len(b"\n> "), Some(0));
        assert_eq!(len(b"No such server.\n\n> "), Some(16));
        assert_eq!(len(b"Server deleted.\n> "), Some(15));
        assert_eq!(len(b"1\n# be_id be_name"), None);
        assert_eq!(len(b""), None);
    }

    #[test]
    fn pipelined_answers_split_at_each_prompt() {
        let mut buf: &[u8] = b"New server registered.\n\n> \n> Server deleted.\n> No such";
        let mut answers = Vec::new();
        while let Some((len, used)) = first_answer(buf) {
            answers.push(String::from_utf8_lossy(&buf[..len]).trim().to_owned());
            buf = &buf[used..];
        }
        assert_eq!(answers, ["New server registered.", "", "Server deleted."]);
        assert_eq!(buf, b"No such");
    }

    #[test]
    fn ipv6_addresses_are_written_without_brackets() {
        let address: IpAddr = "fd00:0::5".parse().unwrap();
        let add = ApiCommand::AddServer {
            backend: "be".into(),
            server: "a".into(),
            address,
            port: 8080,
            weight: 10,
            options: "check".into(),
        };
        assert_eq!(
            add.line().unwrap(),
            "add server be/a fd00::5:8080 weight 10 check"
        );
        let set = ApiCommand::SetAddr {
            backend: "be".into(),
            server: "a".into(),
            address,
            port: 8081,
        };
        assert_eq!(
            set.line().unwrap(),
            "set server be/a addr fd00::5 port 8081"
        );
        // HAProxy 2.6's answers to both.
        assert!(add.succeeded("New server registered."));
        assert!(set.succeeded(
            "IP changed from '::1' to 'fd00::5', port changed from '8080' to '8081' by 'stats socket command'"
        ));
    }

    #[test]
    fn lines_with_a_separator_are_refused() {
        let cmd = |server: &str| ApiCommand::SetWeight {
            backend: "be".into(),
            server: server.into(),
            weight: 1,
        };
        assert_eq!(cmd("a").line().unwrap(), "set server be/a weight 1");
        for bad in ["a;show info", "a\nshow info", "a\\;b", "a\rb", "a\0b"] {
            assert!(
                matches!(cmd(bad).line(), Err(ApiError::Unsafe { .. })),
                "{bad:?}"
            );
        }
    }
}
