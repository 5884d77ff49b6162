//! The one task that owns HAProxy: it renders and checks configurations, starts, restarts,
//! reloads and stops HAProxy, and turns each new plan into runtime API commands.
//!
//! Other tasks only send it the desired servers over a `watch` channel, so a burst of directory
//! events collapses into the latest plan. A lone change is applied at once; changes that come
//! faster than one pass per [`crate::coalesce::INTERVAL`], beyond a short burst, are applied
//! together ([`crate::coalesce`]). The plans it
//! receives hold IP addresses only ([`crate::resolve`] looks DNS names up beforehand), so
//! nothing it awaits depends on DNS.

use baker_client::errors::chain;
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use baker_client::backoff::Backoff;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::coalesce::Budget;
use crate::config::Config;
use crate::diff::{diff, drain_verdict, AddOptions, Command, DrainVerdict};
use crate::haproxy::{restart_delay, Haproxy, HaproxyError, Leftover};
use crate::listeners::{ListenError, Listeners};
use crate::metrics::Metrics;
use crate::plan::Desired;
use crate::reaper::Exit;
use crate::render::{context, server_options, Renderer};
use crate::runtime_api::{ApiCommand, ApiError, Session};

/// How often the running servers are compared with the plan when nothing else happens.
const RESYNC: Duration = Duration::from_secs(5);
/// How often draining servers are checked for idleness.
const DRAIN_POLL: Duration = Duration::from_millis(250);

/// What the owner was asked to do besides following the plan.
#[derive(Debug)]
pub enum Request {
    /// Read the template file again and reload if it still renders a valid configuration.
    ReloadTemplate,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("the rendered HAProxy configuration is invalid ({path})")]
    Template {
        path: String,
        #[source]
        source: anyhow::Error,
    },
    #[error("cannot prepare {path}")]
    RunDir {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("HAProxy did not start")]
    Haproxy(#[source] HaproxyError),
    #[error(transparent)]
    Listen(#[from] ListenError),
}

pub struct Owner {
    config: Arc<Config>,
    haproxy: Haproxy,
    renderer: Renderer,
    metrics: Arc<Metrics>,
    /// Draining servers and when their drain began.
    drains: BTreeMap<(String, String), Instant>,
    /// The last plan applied.
    applied: Option<Desired>,
    options: BTreeMap<String, AddOptions>,
    /// The servers' counters at the last look for hung servers, and when it was.
    counters: crate::hung::Readings,
    counters_at: Instant,
    /// The servers' counters at the last reading, and the servers holding requests unanswered.
    last: crate::hung::Readings,
    stalls: crate::hung::Stalls,
    /// Servers marked down as hung, probed until they answer again.
    marked: crate::hung::Marked,
    /// The admin connection the counters are read over, kept open between readings (with
    /// the master pid it was opened under): a connection per reading, twenty a second while
    /// requests flow, took a twentieth of the throughput of a loaded HAProxy. Closed before a
    /// reload and before a stop, so that the worker it reaches can leave.
    counters_session: Option<(i32, Session)>,
    /// HAProxy was taken over from a previous ambassador before the directory answered: it
    /// keeps its servers, and is reloaded with this ambassador's configuration once the
    /// first plan arrives.
    takeover_pending: bool,
    /// The listening sockets HAProxy inherits, and the addresses they listen on.
    listeners: Listeners,
    addrs: Vec<std::net::SocketAddr>,
    /// When the running HAProxy was started (or taken over).
    started: Instant,
}

impl Owner {
    pub fn new(
        config: Arc<Config>,
        haproxy: Haproxy,
        metrics: Arc<Metrics>,
    ) -> Result<Self, StartError> {
        let text = crate::render::template_text(&config);
        let renderer = Renderer::new(text).map_err(|e| StartError::Template {
            path: template_name(&config),
            source: e.into(),
        })?;
        let options = config
            .services
            .iter()
            .map(|s| {
                (
                    s.name.to_string(),
                    AddOptions {
                        server_options: server_options(s.mode, &config.checks, 5, &s.options),
                        sticky: s.options.sticky,
                    },
                )
            })
            .collect();
        let addrs = crate::listeners::addresses(&config);
        Ok(Owner {
            addrs,
            listeners: Listeners::default(),
            started: Instant::now(),
            config,
            haproxy,
            renderer,
            metrics,
            drains: BTreeMap::new(),
            applied: None,
            options,
            counters: Default::default(),
            counters_at: Instant::now(),
            last: Default::default(),
            stalls: Default::default(),
            marked: Default::default(),
            counters_session: None,
            takeover_pending: false,
        })
    }

    fn state_file(&self) -> PathBuf {
        self.config.run_dir.join("server-state")
    }

    /// Renders `desired` with the current template, checks it, and installs it as the file
    /// HAProxy starts and reloads from; returns the text installed. A refused file leaves the
    /// installed one in place.
    ///
    /// `haproxy -c` opens every `fd@N` it finds: it inherits the ambassador's sockets, but not
    /// those of a taken-over master, so the file checked names those by address.
    ///
    /// Without `check` (a restart after a crash, from the template the running HAProxy
    /// accepted), the file is installed unchecked: HAProxy's start reports a refusal in its
    /// own words all the same, and the restart does not wait for a second HAProxy process.
    async fn install(&mut self, desired: &Desired, check: bool) -> Result<String, anyhow::Error> {
        let fds = self.listeners.fds();
        let text = self
            .renderer
            .render(&context(&self.config, desired, &fds))?;
        let held = self.listeners.held_fds();
        let checked = if held == fds || !check {
            text.clone()
        } else {
            self.renderer
                .render(&context(&self.config, desired, &held))?
        };
        let path = self.haproxy.config_path().to_path_buf();
        let tmp = path.with_extension("cfg.new");
        std::fs::write(&tmp, &checked)?;
        if check {
            if let Err(e) = self.haproxy.check(&tmp).await {
                self.metrics.refused_configs.inc();
                return Err(e.into());
            }
        }
        if checked != text {
            std::fs::write(&tmp, &text)?;
        }
        std::fs::rename(&tmp, &path)?;
        Ok(text)
    }

    /// Binds the listening sockets HAProxy is to inherit, then renders, checks and installs
    /// `desired`. The sockets a template does not bind by `fd@N` (it names the addresses
    /// itself) are closed again, so that HAProxy can bind them.
    async fn install_with_sockets(
        &mut self,
        desired: &Desired,
        check: bool,
    ) -> Result<(), StartError> {
        let name = template_name(&self.config);
        let template = |e| StartError::Template {
            path: name.clone(),
            source: e,
        };
        self.listeners.bind(&self.addrs)?;
        let text = self.install(desired, check).await.map_err(template)?;
        let unused = self.listeners.release_unused(&text);
        if !unused.is_empty() {
            tracing::warn!(
                addresses = ?unused,
                "the template binds these addresses itself instead of using services[].listen, http_listen or admin.listen: while HAProxy restarts after a crash, connections to them are refused"
            );
            self.install(desired, check).await.map_err(template)?;
        }
        Ok(())
    }

    /// Starts HAProxy, or takes over the one a previous ambassador left running on the run
    /// directory, so that restarting the ambassador never interrupts traffic. `planned` says
    /// whether `desired` comes from the directory: a taken-over HAProxy keeps its servers until
    /// it does.
    pub async fn start(&mut self, desired: &Desired, planned: bool) -> Result<(), StartError> {
        let dir = &self.config.run_dir;
        std::fs::create_dir_all(dir).map_err(|e| StartError::RunDir {
            path: dir.display().to_string(),
            source: e,
        })?;
        match self.haproxy.leftover().await {
            Leftover::None => {}
            Leftover::Stop(pid) => self.haproxy.stop_stale(pid).await,
            Leftover::Adopt(pid) => {
                self.haproxy.adopt(pid);
                self.listeners.adopt(pid, &self.addrs);
                if !planned {
                    tracing::info!(
                        pid,
                        "took over the HAProxy a previous ambassador left running; it keeps its servers until the directory answers"
                    );
                    self.takeover_pending = true;
                    return Ok(());
                }
                match self.take_over(desired).await {
                    Ok(()) => return Ok(()),
                    Err(e @ StartError::Template { .. }) => {
                        self.haproxy.stop(self.config.stop_timeout).await;
                        return Err(e);
                    }
                    Err(e) => {
                        tracing::warn!(
                            cause = %chain(&e),
                            "cannot take over the running HAProxy; replacing it"
                        );
                        self.haproxy.stop(self.config.stop_timeout).await;
                    }
                }
            }
        }
        // An empty state (format version 1) until the first reload saves a real one.
        let _ = std::fs::write(self.state_file(), "1\n");
        self.install_with_sockets(desired, true).await?;
        self.haproxy.start().await.map_err(StartError::Haproxy)?;
        self.started = Instant::now();
        self.applied = Some(desired.clone());
        Ok(())
    }

    /// Reloads a taken-over HAProxy with this ambassador's configuration and `desired`'s
    /// servers: the master passes its listening sockets to the new worker, so no connection
    /// is refused, and the old worker finishes its requests.
    async fn take_over(&mut self, desired: &Desired) -> Result<(), StartError> {
        self.install(desired, true)
            .await
            .map_err(|e| StartError::Template {
                path: template_name(&self.config),
                source: e,
            })?;
        self.started = Instant::now();
        let info = self
            .haproxy
            .reload(&self.state_file())
            .await
            .map_err(StartError::Haproxy)?;
        self.metrics.reloads.inc();
        tracing::info!(
            pid = info.master_pid,
            worker = info.workers.first().copied().unwrap_or(0),
            "took over the HAProxy a previous ambassador left running, reloaded with this configuration"
        );
        self.takeover_pending = false;
        self.applied = Some(desired.clone());
        // The new worker starts from the file: converge the runtime state now.
        if let Err(e) = self.apply_runtime(desired).await {
            tracing::warn!("after taking over HAProxy: {}", chain(&*e));
        }
        Ok(())
    }

    /// Whether HAProxy runs `desired` (as far as this owner knows).
    pub fn runs(&self, desired: &Desired) -> bool {
        !self.takeover_pending && self.applied.as_ref() == Some(desired)
    }

    /// Follows the plan until `shutdown`, then stops HAProxy and returns its exit.
    pub async fn run(
        mut self,
        mut desired_rx: watch::Receiver<Desired>,
        mut requests: mpsc::Receiver<Request>,
        shutdown: CancellationToken,
    ) -> Option<Exit> {
        let mut restart_backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
        let mut next_sync = Instant::now();
        // Since when plan changes wait to be applied, and the passes left to spend.
        let mut pending: Option<Instant> = None;
        let mut budget = Budget::default();
        let mut next_hang_check = Instant::now() + crate::hung::POLL;
        loop {
            let mut wake = if self.drains.is_empty() {
                next_sync
            } else {
                next_sync.min(Instant::now() + DRAIN_POLL)
            };
            if let Some(first) = pending {
                wake = wake.min(budget.apply_at(first));
            }
            tokio::select! {
                _ = shutdown.cancelled() => {
                    tracing::info!("stopping HAProxy");
                    // An open admin connection would hold the worker until hard-stop-after.
                    self.counters_session = None;
                    let exit = self.haproxy.stop(self.config.stop_timeout).await;
                    return exit;
                }
                exit = self.haproxy.exited() => {
                    // At once after a crash of an HAProxy that ran for a while; with a growing
                    // delay while it keeps failing. Its listening sockets stay open meanwhile
                    // ([`crate::listeners`]): clients wait in the backlog, they are not refused.
                    let mut delay = restart_delay(self.started.elapsed(), &mut restart_backoff);
                    tracing::error!("HAProxy exited unexpectedly ({exit}); starting it again in {delay:?}");
                    loop {
                        self.metrics.haproxy_restarts.inc();
                        tokio::select! {
                            _ = shutdown.cancelled() => return Some(exit),
                            _ = tokio::time::sleep(delay) => {}
                        }
                        let generation = self.metrics.progress.output_generation();
                        let desired = desired_rx.borrow_and_update().clone();
                        pending = None;
                        match self.restart(&desired).await {
                            Ok(()) => {
                                self.metrics.progress.applied(generation);
                                break;
                            }
                            Err(e) => {
                                delay = restart_backoff.next_delay();
                                tracing::error!("restarting HAProxy failed: {e:#}; trying again in {delay:?}");
                            }
                        }
                    }
                    continue;
                }
                changed = desired_rx.changed() => {
                    if changed.is_err() {
                        // The watcher stopped: only shutdown remains.
                        shutdown.cancelled().await;
                        continue;
                    }
                    let now = Instant::now();
                    let first = *pending.get_or_insert(now);
                    if budget.apply_at(first) > now {
                        continue;
                    }
                }
                Some(req) = requests.recv() => {
                    match req {
                        Request::ReloadTemplate if self.takeover_pending => {
                            tracing::warn!("ignoring SIGHUP: HAProxy is reloaded with the template once the directory answers");
                        }
                        Request::ReloadTemplate => self.reload_template(&desired_rx.borrow().clone()).await,
                    }
                    continue;
                }
                _ = tokio::time::sleep_until(next_hang_check) => {
                    // Quickly while requests flow, as seldom as timeouts need when idle.
                    let busy = !self.takeover_pending && self.mark_hung_servers_down().await;
                    next_hang_check = Instant::now()
                        + if busy { crate::hung::POLL } else { crate::hung::HUNG_EVERY };
                    continue;
                }
                _ = tokio::time::sleep_until(wake) => {}
            }
            next_sync = Instant::now() + RESYNC;
            let batch = pending.take();
            if let Some(first) = batch {
                budget.spend(Instant::now());
                tracing::debug!(
                    waited_us = first.elapsed().as_micros() as u64,
                    "applying the plan"
                );
            }
            if self.takeover_pending {
                // The taken-over HAProxy keeps its servers until the directory answers.
                if batch.is_some() {
                    let desired = desired_rx.borrow_and_update().clone();
                    if let Err(e) = self.take_over(&desired).await {
                        tracing::error!(cause = %chain(&e), "cannot reload the HAProxy taken over; it keeps its configuration");
                        self.takeover_pending = false;
                    }
                }
                continue;
            }
            let generation = self.metrics.progress.output_generation();
            let desired = desired_rx.borrow_and_update().clone();
            let started = Instant::now();
            self.apply(&desired).await;
            if self.applied.as_ref() == Some(&desired) {
                self.metrics.progress.applied(generation);
            }
            if batch.is_some() {
                tracing::debug!(
                    took_us = started.elapsed().as_micros() as u64,
                    "HAProxy answered the pass"
                );
            }
            if desired_rx.has_changed().unwrap_or(false) {
                // Changes came during the pass: a burst. Collect what else comes.
                pending = Some(Instant::now());
            }
        }
    }

    /// Reads the servers' counters and marks down those of HTTP backends that stopped
    /// answering ([`crate::hung`]): at once those that hold requests and answer none while the
    /// others answer, and those whose requests timed out. Failures are logged: the next reading
    /// tries again. Whether requests were flowing (held, or answered since the last reading).
    async fn mark_hung_servers_down(&mut self) -> bool {
        let backends: Vec<(&str, Duration)> = self
            .config
            .services
            .iter()
            .filter(|s| s.mode == crate::config::Mode::Http)
            .map(|s| {
                (
                    s.name.as_str(),
                    crate::hung::stall_after(s.options.get_timeout),
                )
            })
            .collect();
        let Some(pid) = self.haproxy.pid().filter(|_| !backends.is_empty()) else {
            return false;
        };
        let kept = self.counters_session.take();
        let result = async {
            let mut session = match kept {
                Some((p, s)) if p == pid => s,
                _ => self.haproxy.admin.session().await?,
            };
            let now = session.counters().await?;
            let at = Instant::now();
            let busy = now.iter().any(|(key, c)| {
                c.inflight > 0 || self.last.get(key).is_none_or(|b| b.answers != c.answers)
            });
            let stalled = self.stalls.update(&self.last, &now, at.into_std(), &backends);
            self.last = now.clone();
            let mut hung = Vec::new();
            if at >= self.counters_at + crate::hung::HUNG_EVERY {
                let names: Vec<&str> = backends.iter().map(|(b, _)| *b).collect();
                hung = crate::hung::hung(&self.counters, &now, &names);
                hung.retain(|key| !stalled.contains(key));
                self.counters = now.clone();
                self.counters_at = at;
            }
            self.marked.retain(|key| now.contains_key(key));
            for (backend, server) in self.marked.take_recovered() {
                let cmd = ApiCommand::MarkUp {
                    backend: backend.clone(),
                    server: server.clone(),
                };
                self.metrics.runtime_commands.inc();
                session.run(&cmd).await?;
                tracing::info!(%backend, %server, "server answers again; marked up");
            }
            let found = stalled.into_iter().map(|k| (k, true));
            for (key, stall) in found.chain(hung.into_iter().map(|k| (k, false))) {
                let (backend, server) = key.clone();
                let cmd = ApiCommand::MarkDown {
                    backend: backend.clone(),
                    server: server.clone(),
                };
                self.metrics.runtime_commands.inc();
                session.run(&cmd).await?;
                if let Some(addr) = now.get(&key).and_then(|c| c.addr) {
                    self.marked.watch(key, addr);
                }
                if stall {
                    tracing::warn!(%backend, %server, "server stopped answering (holds requests and answers none while the others answer); marked down until it answers again");
                } else {
                    tracing::warn!(%backend, %server, "server stopped answering (requests timed out, none answered); marked down until it answers again");
                }
            }
            Ok::<(bool, Session), ApiError>((busy, session))
        }
        .await;
        match result {
            Ok((busy, session)) => {
                self.counters_session = Some((pid, session));
                busy
            }
            Err(e) => {
                tracing::debug!(cause = %chain(&e), "cannot look for hung servers now");
                false
            }
        }
    }

    /// Starts a new HAProxy in place of one that died, from a file rendered with the current
    /// plan: servers, addresses, weights and operators' drains (at weight 0) are in the file,
    /// and a state saved at an earlier reload is not loaded over them. The drains' `state
    /// drain` follows over the runtime API as soon as the worker answers.
    async fn restart(&mut self, desired: &Desired) -> Result<(), anyhow::Error> {
        self.started = Instant::now();
        let _ = std::fs::write(self.state_file(), "1\n");
        self.install_with_sockets(desired, false).await?;
        self.haproxy.start().await?;
        self.drains.clear();
        self.takeover_pending = false;
        self.applied = Some(desired.clone());
        if let Err(e) = self.apply_runtime(desired).await {
            tracing::warn!("after restarting HAProxy: {}", chain(&*e));
        }
        tracing::info!(
            took_ms = self.started.elapsed().as_millis() as u64,
            "HAProxy is running again"
        );
        Ok(())
    }

    /// Brings HAProxy to `desired`: over the runtime API, or by a reload when asked to.
    async fn apply(&mut self, desired: &Desired) {
        if self.haproxy.pid().is_none() {
            return;
        }
        self.publish_counts(desired);
        if self.config.force_reload && self.applied.as_ref() != Some(desired) {
            if let Err(e) = self
                .reload(desired, "a change (BAKER_BENCH_FORCE_RELOAD)")
                .await
            {
                tracing::error!("{}", chain(&*e));
            }
            return;
        }
        if let Err(e) = self.apply_runtime(desired).await {
            tracing::warn!(
                "updating HAProxy over its runtime API failed: {e:#}; reloading instead"
            );
            if let Err(e) = self.reload(desired, "a failed runtime update").await {
                tracing::error!("{}", chain(&*e));
            }
        }
    }

    /// One pass over the runtime API, on one connection: reads what runs, decides which drains
    /// are over, and sends the changes. Bookkeeping and logs follow HAProxy's answers: a refused
    /// change is tried again on the next pass, except a refused addition or address change,
    /// returned as an error so that the caller reloads.
    async fn apply_runtime(&mut self, desired: &Desired) -> Result<(), anyhow::Error> {
        let mut session = self.haproxy.admin.session().await?;
        let running = session.servers_state().await?;
        let now = Instant::now();
        // Forget drains of servers that are gone or serve again.
        self.drains.retain(|(be, srv), _| {
            running
                .get(be)
                .and_then(|b| b.get(srv))
                .is_some_and(|s| s.drain)
                && !desired
                    .get(be.as_str())
                    .is_some_and(|b| b.contains_key(srv.as_str()))
        });
        let draining: Vec<(String, String)> = running
            .iter()
            .filter(|(be, _)| desired.contains_key(be.as_str()))
            .flat_map(|(be, b)| {
                b.values()
                    .filter(|s| {
                        s.drain && !s.maint && !desired[be.as_str()].contains_key(s.name.as_str())
                    })
                    .map(move |s| (be.clone(), s.name.clone()))
            })
            .collect();
        let mut removable = BTreeSet::new();
        if !draining.is_empty() {
            let sessions = match session.sessions().await {
                Ok(s) => Some(s),
                Err(e) if e.is_refusal() => {
                    tracing::warn!(cause = %chain(&e), "cannot read the draining servers' sessions; they stay until idle or the drain timeout");
                    None
                }
                Err(e) => return Err(e.into()),
            };
            for key in draining {
                // A drain this owner did not start (before a reload or a restart) counts from now.
                let since = *self.drains.entry(key.clone()).or_insert(now);
                let count = sessions.as_ref().and_then(|s| s.get(&key).copied());
                match drain_verdict(count, now.duration_since(since), self.config.drain_timeout) {
                    DrainVerdict::Wait => {}
                    DrainVerdict::Delete => {
                        removable.insert(key);
                    }
                    DrainVerdict::Expire => {
                        let (backend, server) = (&key.0, &key.1);
                        let cmd = ApiCommand::ShutdownSessions {
                            backend: backend.clone(),
                            server: server.clone(),
                        };
                        self.metrics.runtime_commands.inc();
                        match session.run(&cmd).await {
                            Ok(()) => {
                                tracing::warn!(%backend, %server, sessions = ?count, "drain timed out; closed its remaining sessions");
                            }
                            Err(e) if e.is_refusal() => {
                                self.metrics.runtime_failures.inc();
                                tracing::warn!(%backend, %server, cause = %chain(&e), "drain timed out; closing its remaining sessions failed");
                            }
                            Err(e) => return Err(e.into()),
                        }
                        removable.insert(key);
                    }
                }
            }
        }
        let commands = diff(desired, &running, &self.options, &removable);
        let outcomes = self.send_all(&mut session, &commands).await?;
        let mut failed_structure = None;
        let mut all_applied = true;
        for (cmd, outcome) in commands.iter().zip(outcomes) {
            let (backend, server) = (cmd.backend(), cmd.server());
            let Err(e) = outcome else {
                self.applied_one(cmd, now);
                continue;
            };
            all_applied = false;
            match cmd {
                // Usually a server still holding connections: deleted on a later pass.
                Command::Delete { .. } => {
                    tracing::debug!(%backend, %server, cause = %chain(&e), "a drained server is not deleted yet; trying again on the next pass");
                }
                Command::Add { .. } | Command::SetAddr { .. } => {
                    tracing::warn!(%backend, %server, cause = %chain(&e), "HAProxy refused a server change");
                    failed_structure.get_or_insert(e);
                }
                _ => {
                    tracing::warn!(%backend, %server, cause = %chain(&e), "HAProxy refused a server change; trying again on the next pass");
                }
            }
        }
        if let Some(e) = failed_structure {
            return Err(e.into());
        }
        if all_applied {
            self.applied = Some(desired.clone());
        }
        Ok(())
    }

    /// Sends every step of `commands` in one round trip ([`Session::run_all`]) and returns
    /// each command's outcome: its first refused step, if any. Steps after a refused one are
    /// sent all the same; each depends on the previous one, so HAProxy refuses them too (an
    /// `enable server` of a server whose `add server` was refused finds no such server; a
    /// `del server` of a server that did not enter maintenance is refused), and a pass waits
    /// for no answer before sending the next command. `Err`: the connection failed.
    async fn send_all(
        &self,
        session: &mut Session,
        commands: &[Command],
    ) -> Result<Vec<Result<(), ApiError>>, ApiError> {
        let steps: Vec<Vec<ApiCommand>> = commands.iter().map(Command::steps).collect();
        let flat: Vec<ApiCommand> = steps.iter().flatten().cloned().collect();
        self.metrics.runtime_commands.inc_by(flat.len() as u64);
        let mut answers = session.run_all(&flat).await?.into_iter();
        let mut out = Vec::with_capacity(commands.len());
        for s in &steps {
            let mut outcome = Ok(());
            for answer in answers.by_ref().take(s.len()) {
                if let (Ok(()), Err(e)) = (&outcome, answer) {
                    self.metrics.runtime_failures.inc();
                    outcome = Err(e);
                }
            }
            out.push(outcome);
        }
        Ok(out)
    }

    /// Records and logs a change HAProxy accepted.
    fn applied_one(&mut self, cmd: &Command, now: Instant) {
        let (backend, server) = (cmd.backend(), cmd.server());
        match cmd {
            Command::Drain { .. } => {
                self.drains
                    .insert((backend.to_owned(), server.to_owned()), now);
                tracing::info!(%backend, %server, "draining a server that left the directory");
            }
            Command::Delete { .. } => {
                self.drains.remove(&(backend.to_owned(), server.to_owned()));
                tracing::info!(%backend, %server, "removed a drained server");
            }
            Command::Hold { .. } => {
                tracing::info!(%backend, %server, "draining a server an operator drained");
            }
            Command::Add {
                address,
                port,
                weight,
                ..
            } => {
                tracing::info!(%backend, %server, %address, port, weight, "added a server");
            }
            Command::SetAddr { address, port, .. } => {
                tracing::info!(%backend, %server, %address, port, "moved a server to a new address");
            }
            Command::SetWeight { weight, .. } => {
                tracing::info!(%backend, %server, weight, "changed a server's weight");
            }
            Command::Ready { .. } => {
                tracing::info!(%backend, %server, "a server serves again");
            }
        }
    }

    /// Renders, checks and installs `desired`, then reloads HAProxy seamlessly.
    async fn reload(
        &mut self,
        desired: &Desired,
        why: &str,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        self.counters_session = None;
        if let Err(e) = self.install(desired, true).await {
            return Err(format!(
                "refused the new HAProxy configuration; the running one stays: {}",
                chain(&*e)
            )
            .into());
        }
        let state_file = self.state_file();
        match self.haproxy.reload(&state_file).await {
            Ok(info) => {
                self.metrics.reloads.inc();
                tracing::info!(
                    reloads = self.metrics.reloads.get(),
                    worker = info.workers.first().copied().unwrap_or(0),
                    "reloaded HAProxy after {why}"
                );
                self.drains.clear();
                self.applied = Some(desired.clone());
                // The reloaded worker may lack runtime changes made meanwhile: converge now.
                if let Err(e) = self.apply_runtime(desired).await {
                    tracing::warn!("after the reload: {}", chain(&*e));
                }
                Ok(())
            }
            Err(e) => {
                self.metrics.reload_failures.inc();
                Err(e.into())
            }
        }
    }

    async fn reload_template(&mut self, desired: &Desired) {
        let Some((path, _)) = self.config.template.clone() else {
            tracing::info!("reloading HAProxy with the embedded template");
            if let Err(e) = self.reload(desired, "SIGHUP").await {
                tracing::error!("{}", chain(&*e));
            }
            return;
        };
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) => {
                tracing::error!(
                    "cannot read the template {}: {e}; the running configuration stays",
                    path.display()
                );
                return;
            }
        };
        let renderer = match Renderer::new(&text) {
            Ok(r) => r,
            Err(e) => {
                self.metrics.refused_configs.inc();
                tracing::error!(
                    "refused the template {}: {e}; the running configuration stays",
                    path.display()
                );
                return;
            }
        };
        let old = std::mem::replace(&mut self.renderer, renderer);
        match self.reload(desired, "SIGHUP (template re-read)").await {
            Ok(()) => {
                let mut config = (*self.config).clone();
                config.template = Some((path, text));
                self.config = Arc::new(config);
            }
            Err(e) => {
                self.renderer = old;
                tracing::error!("template {}: {}", path.display(), chain(&*e));
            }
        }
    }

    fn publish_counts(&self, desired: &Desired) {
        for (svc, b) in desired {
            self.metrics
                .servers
                .get_or_create(&vec![("service".to_string(), svc.to_string())])
                .set(b.len() as i64);
        }
    }
}

fn template_name(config: &Config) -> String {
    config
        .template
        .as_ref()
        .map(|(p, _)| p.display().to_string())
        .unwrap_or_else(|| "embedded template".into())
}
