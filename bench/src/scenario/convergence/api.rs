//! The directory-API measures of scenario 2, side by side with an earlier build, and where
//! their time goes.
//!
//! An instance is registered and deregistered straight through the API (no registrar and no
//! probe delay), and the route flipped; each trial runs on every build in turn (this one and,
//! with `--baseline-bin-dir`, an earlier one), so both see the same machine at the same moments:
//!
//! - register: just before `PUT /v1/services/greeting/instances/trial` → its first answer;
//! - deregister: just before `DELETE` of it → its last answer;
//! - route: just before `PUT /v1/routes/greeting` → the new split in effect.
//!
//! The build under test runs its directory and ambassador with their stage logs on (debug
//! level for the watch and the owner of HAProxy), and each trial is cut into stages by the
//! timestamps of those lines ([`STAGES`]).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::SystemTime;

use anyhow::Context;
use baker_client::model::InstanceSpec;
use baker_client::DirectoryClient;
use baker_tests::Proc;
use serde_json::{json, Value};

use super::{millis_between, Key, Measure, Prober, SERVICE};
use crate::daemons::{self, Ambassador, Bins};
use crate::load::Target;
use crate::report::{ms, Check, Table};
use crate::stats::Samples;

/// Log filter of the build under test: the stage lines, and the info lines the harness reads.
const STAGE_LOG: &str = "warn,baker_directory=info,baker_directory::watch=debug,\
                         baker_ambassador=info,baker_ambassador::watch=debug,\
                         baker_ambassador::reconcile=debug";

/// How long a daemon may take to stop.
const STOP_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// Which process logs a stage's line.
#[derive(Clone, Copy)]
enum Logger {
    Directory,
    Ambassador,
}

/// The stages of a change, each ending at the first line (after the previous stage's end)
/// that contains its needle; the first needle depends on the change (`None` here).
const STAGES: [(&str, Logger, Option<&str>); 6] = [
    ("API call -> directory applied it", Logger::Directory, None),
    (
        "-> sent on the watch stream",
        Logger::Directory,
        Some("sent a change to a watcher"),
    ),
    (
        "-> ambassador received it",
        Logger::Ambassador,
        Some("received a change from the directory"),
    ),
    (
        "-> new plan published",
        Logger::Ambassador,
        Some("planned the servers"),
    ),
    (
        "-> pass started",
        Logger::Ambassador,
        Some("applying the plan"),
    ),
    (
        "-> HAProxy answered every command",
        Logger::Ambassador,
        Some("HAProxy answered"),
    ),
];
const LAST_STAGE: &str = "-> request routed accordingly";

/// What a trial changed, for the breakdown.
#[derive(Clone, Copy)]
enum Change {
    Register,
    Deregister,
    Route,
}

impl Change {
    /// The directory's line saying it applied the change.
    fn accepted(self) -> String {
        match self {
            Change::Register => format!("registered {SERVICE}/trial"),
            Change::Deregister => format!("deregistered {SERVICE}/trial"),
            Change::Route => format!("route of {SERVICE} set to"),
        }
    }
}

/// One build's directory, ambassador, apps and prober.
struct Stack {
    label: String,
    /// The directory's `BAKER_DATA` (routes are written there).
    _data: tempfile::TempDir,
    procs: Vec<Proc>,
    amb: Ambassador,
    client: DirectoryClient,
    trial: InstanceSpec,
    prober: Prober,
    register: Measure,
    deregister: Measure,
    route: Measure,
    /// With the stage logs on: every trial's change, start and end, cut into stages at the end.
    traced: Option<Vec<(Change, SystemTime, SystemTime)>>,
}

fn spec(app: SocketAddr, version: &str) -> InstanceSpec {
    InstanceSpec {
        address: app.ip().to_string(),
        port: u64::from(app.port()),
        version: Some(version.to_owned()),
        weight: None,
        tags: vec![],
        ttl_ms: Some(600_000),
        zone: None,
    }
}

impl Stack {
    /// Starts `bins`' directory, ambassador and three apps: `base` (version 1) and `v2`
    /// registered for good, `trial` (version 1) registered by the trials.
    async fn start(label: &str, bins: &Bins, traced: bool) -> anyhow::Result<Stack> {
        let log: &[(&str, &str)] = if traced {
            &[("RUST_LOG", STAGE_LOG)]
        } else {
            &[]
        };
        let data = tempfile::tempdir()?;
        let (dir, url) = daemons::directory_with(bins, data.path(), false, log).await?;
        let client = DirectoryClient::new(&url, None)?;
        let (base, base_addr) = daemons::greeting(bins, "base", "1").await?;
        let (v2, v2_addr) = daemons::greeting(bins, "v2", "2").await?;
        let (trial, trial_addr) = daemons::greeting(bins, "trial", "1").await?;
        let procs = vec![dir, base, v2, trial];
        client
            .register(SERVICE, "base", &spec(base_addr, "1"))
            .await?;
        client.register(SERVICE, "v2", &spec(v2_addr, "2")).await?;
        let amb = Ambassador::start_with(bins, &url, &[SERVICE], log).await?;
        let entry = amb.addr(SERVICE);
        daemons::wait_ready(&Target::get(entry, "/greeting"), super::TRIAL_TIMEOUT).await?;
        Ok(Stack {
            label: label.to_owned(),
            _data: data,
            procs,
            amb,
            client,
            trial: spec(trial_addr, "1"),
            prober: Prober::start(entry, 2),
            register: Measure::new("API register -> first request routed"),
            deregister: Measure::new("API deregister -> last request routed"),
            route: Measure::new("API route change -> new split in effect"),
            traced: traced.then(Vec::new),
        })
    }

    fn trace(&mut self, change: Change, t0: SystemTime, end: SystemTime) {
        if let Some(t) = &mut self.traced {
            t.push((change, t0, end));
        }
    }

    /// Registers the trial instance, waits for its first answer; deregisters it, waits for
    /// its last.
    async fn membership_trial(&mut self) -> anyhow::Result<()> {
        let t0 = SystemTime::now();
        self.client
            .register(SERVICE, "trial", &self.trial)
            .await
            .context("registering the trial instance")?;
        match self.prober.wait_first(Key::Instance, "trial", t0).await {
            Some(first) => {
                self.register.samples.push_ms(millis_between(t0, first));
                self.trace(Change::Register, t0, first);
            }
            None => self.register.timeouts += 1,
        }
        let t0 = SystemTime::now();
        self.client
            .deregister(SERVICE, "trial")
            .await
            .context("deregistering the trial instance")?;
        match self.prober.wait_last(Key::Instance, "trial").await {
            Some(Some(last)) => {
                self.deregister
                    .samples
                    .push_ms(millis_between(t0, last).max(0.0));
                self.trace(Change::Deregister, t0, last.max(t0));
            }
            Some(None) => self.deregister.samples.push_ms(0.0),
            None => self.deregister.timeouts += 1,
        }
        Ok(())
    }

    /// Flips the route to all-`new`, and waits for `new` to answer and `old` to stop.
    async fn route_trial(&mut self, new: &str, old: &str) -> anyhow::Result<()> {
        let splits: BTreeMap<String, u64> = [(new.to_owned(), 100)].into();
        let t0 = SystemTime::now();
        self.client
            .set_route(SERVICE, &splits)
            .await
            .context("setting a route")?;
        let first = self.prober.wait_first(Key::Version, new, t0).await;
        let last_old = self.prober.wait_last(Key::Version, old).await;
        match (first, last_old) {
            (Some(first), Some(last_old)) => {
                let effect = last_old.map_or(first, |l| l.max(first));
                self.route
                    .samples
                    .push_ms(millis_between(t0, effect).max(0.0));
                self.trace(Change::Route, t0, effect);
            }
            _ => self.route.timeouts += 1,
        }
        Ok(())
    }

    /// Stops everything; returns the stage breakdown (with the stage logs on) and the
    /// prober's answers and failures.
    async fn finish(mut self) -> Finished {
        let (ok, failed, reasons) = self.prober.failed();
        self.prober.finish().await;
        daemons::stop(&mut self.amb.proc, STOP_GRACE).await;
        for p in &mut self.procs {
            daemons::stop(p, STOP_GRACE).await;
        }
        let stages = self
            .traced
            .as_ref()
            .map(|t| breakdown(t, &self.procs[0], &self.amb.proc));
        Finished {
            label: self.label,
            measures: [self.register, self.deregister, self.route],
            stages,
            answers: ok,
            failed,
            reasons,
        }
    }
}

/// One kind of change cut into stages: its name, each stage's samples, and how many trials
/// lacked a stage line.
pub(super) type Stages = (&'static str, Vec<(String, Samples)>, usize);

/// One build's figures.
pub(super) struct Finished {
    pub label: String,
    pub measures: [Measure; 3],
    /// Per change kind (register, deregister, route): per stage, the samples; and how many
    /// trials could not be cut into stages.
    pub stages: Option<Vec<Stages>>,
    pub answers: u64,
    pub failed: u64,
    pub reasons: BTreeMap<String, u64>,
}

/// The first line of `proc` holding `needle`, written at or after `after`: when.
fn line_after(lines: &[String], needle: &str, after: SystemTime) -> Option<SystemTime> {
    lines
        .iter()
        .filter(|l| l.contains(needle))
        .filter_map(|l| daemons::log_time(l))
        .find(|t| *t >= after)
}

/// Cuts each traced trial into [`STAGES`] from the daemons' logs.
fn breakdown(
    traced: &[(Change, SystemTime, SystemTime)],
    directory: &Proc,
    ambassador: &Proc,
) -> Vec<Stages> {
    let (dir_log, amb_log) = (directory.log(), ambassador.log());
    let kinds = [
        ("register", Change::Register),
        ("deregister", Change::Deregister),
        ("route", Change::Route),
    ];
    let mut out = Vec::new();
    for (name, kind) in kinds {
        let mut stages: Vec<(String, Samples)> = STAGES
            .iter()
            .map(|(n, _, _)| n.to_string())
            .chain([LAST_STAGE.to_owned()])
            .map(|n| (n, Samples::new()))
            .collect();
        let mut uncut = 0;
        for (change, t0, end) in traced {
            if std::mem::discriminant(change) != std::mem::discriminant(&kind) {
                continue;
            }
            let mut times = vec![*t0];
            for (_, from, needle) in STAGES {
                let lines = match from {
                    Logger::Directory => &dir_log,
                    Logger::Ambassador => &amb_log,
                };
                let needle = needle.map_or_else(|| change.accepted(), str::to_owned);
                match line_after(lines, &needle, *times.last().unwrap_or(t0)) {
                    Some(t) => times.push(t),
                    None => break,
                }
            }
            if times.len() != STAGES.len() + 1 {
                uncut += 1;
                continue;
            }
            times.push(*end);
            for (i, w) in times.windows(2).enumerate() {
                stages[i].1.push_ms(millis_between(w[0], w[1]));
            }
        }
        out.push((name, stages, uncut));
    }
    out
}

/// Runs `trials` of each measure on this build and on the baseline, interleaved.
pub(super) async fn run(
    bins: &Bins,
    baseline: Option<&Bins>,
    trials: usize,
) -> anyhow::Result<Vec<Finished>> {
    let mut stacks = vec![Stack::start("this build", bins, true).await?];
    if let Some(b) = baseline {
        stacks.push(Stack::start("baseline", b, false).await?);
    }
    for _ in 0..trials {
        for s in &mut stacks {
            s.membership_trial().await?;
        }
    }
    for i in 0..trials {
        let (new, old) = if i % 2 == 0 { ("2", "1") } else { ("1", "2") };
        for s in &mut stacks {
            s.route_trial(new, old).await?;
        }
    }
    let mut out = Vec::new();
    for s in stacks {
        out.push(s.finish().await);
    }
    Ok(out)
}

/// The tables, the checks on this build, and the JSON.
pub(super) fn report(builds: &[Finished]) -> (String, Vec<Check>, Value) {
    let mut t = Table::new(&[
        "measure", "build", "trials", "p50 ms", "p99 ms", "max ms", "timeouts",
    ]);
    for i in 0..3 {
        for b in builds {
            let m = &b.measures[i];
            let s = m.samples.summary();
            t.row(vec![
                m.name.to_owned(),
                b.label.clone(),
                s.count.to_string(),
                ms(s.p50_ms),
                ms(s.p99_ms),
                ms(s.max_ms),
                m.timeouts.to_string(),
            ]);
        }
    }
    let mut text = format!(
        "directory API, no registrar; each trial on every build in turn ({})\n",
        builds
            .iter()
            .map(|b| b.label.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    text += &t.render();
    for b in builds {
        text += &format!(
            "prober ({}): {} answers, {} failed requests {:?}\n",
            b.label, b.answers, b.failed, b.reasons
        );
    }
    let mut checks = Vec::new();
    let mut data = json!({});
    for b in builds {
        let mut entry =
            json!({"answers": b.answers, "failed": b.failed, "failed_by_reason": b.reasons});
        for m in &b.measures {
            entry[m.name] = json!({"latency": m.samples.summary(), "timeouts": m.timeouts});
        }
        if let Some(stages) = &b.stages {
            text += &stage_table(&b.label, stages);
            entry["stages"] = stages
                .iter()
                .map(|(kind, st, uncut)| {
                    (
                        kind.to_string(),
                        json!({
                            "uncut_trials": uncut,
                            "stages": st.iter().map(|(n, s)| json!({"stage": n, "latency": s.summary()})).collect::<Vec<_>>(),
                        }),
                    )
                })
                .collect::<serde_json::Map<_, _>>()
                .into();
        }
        data[b.label.as_str()] = entry;
    }
    if let Some(this) = builds.first() {
        for m in &this.measures {
            let s = m.samples.summary();
            checks.push(Check::new(
                &format!("convergence: {}", m.name),
                "p50 <= 5 ms, p99 <= 10 ms",
                format!(
                    "p50 {:.1} ms, p99 {:.1} ms (timeouts {})",
                    s.p50_ms, s.p99_ms, m.timeouts
                ),
                s.p50_ms <= 5.0 && s.p99_ms <= 10.0 && m.timeouts == 0,
            ));
        }
    }
    (text, checks, data)
}

fn stage_table(label: &str, stages: &[Stages]) -> String {
    let mut t = Table::new(&["change", "stage", "p50 ms", "p99 ms", "max ms"]);
    let mut uncut = Vec::new();
    for (kind, st, n) in stages {
        for (name, s) in st {
            let s = s.summary();
            t.row(vec![
                kind.to_string(),
                name.clone(),
                ms(s.p50_ms),
                ms(s.p99_ms),
                ms(s.max_ms),
            ]);
        }
        uncut.push(format!("{kind} {n}"));
    }
    format!(
        "\nwhere the time goes ({label}, from the daemons' debug log timestamps; trials without every stage line: {})\n{}",
        uncut.join(", "),
        t.render()
    )
}
