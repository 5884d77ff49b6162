//! What a scenario hands back: a printed table, targets met or missed, and JSON for
//! bench/results/.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use serde::Serialize;

/// The machine the figures come from.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub nproc: usize,
    pub cpu_model: String,
    pub kernel: String,
    pub haproxy: String,
    pub load_average_at_start: String,
}

impl Machine {
    pub fn probe(haproxy: &Path) -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .map(|v| v.trim_start_matches([' ', '\t', ':']).trim().to_owned())
            .unwrap_or_else(|| "unknown".into());
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_owned())
            .unwrap_or_else(|_| "unknown".into());
        let haproxy = std::process::Command::new(haproxy)
            .arg("-v")
            .output()
            .ok()
            .and_then(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .next()
                    .map(str::to_owned)
            })
            .unwrap_or_else(|| "not found".into());
        Machine {
            nproc: std::thread::available_parallelism().map_or(1, |n| n.get()),
            cpu_model,
            kernel,
            haproxy,
            load_average_at_start: std::fs::read_to_string("/proc/loadavg")
                .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
                .unwrap_or_default(),
        }
    }
}

/// One target of the issue, checked against a figure.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub what: String,
    pub target: String,
    pub measured: String,
    /// `Some(true)` met, `Some(false)` missed, `None` not measured.
    pub met: Option<bool>,
}

impl Check {
    pub fn new(what: &str, target: &str, measured: String, met: bool) -> Check {
        Check {
            what: what.into(),
            target: target.into(),
            measured,
            met: Some(met),
        }
    }

    pub fn not_measured(what: &str, target: &str, why: &str) -> Check {
        Check {
            what: what.into(),
            target: target.into(),
            measured: format!("not measured: {why}"),
            met: None,
        }
    }
}

/// A scenario's result.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub scenario: String,
    pub quick: bool,
    /// Human-readable tables, printed as they are.
    pub text: String,
    pub checks: Vec<Check>,
    /// Every figure, for the JSON file.
    pub data: serde_json::Value,
}

/// A plain text table with a header row.
#[derive(Debug, Default)]
pub struct Table {
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: &[&str]) -> Table {
        Table {
            rows: vec![header.iter().map(|s| s.to_string()).collect()],
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn render(&self) -> String {
        let cols = self.rows.iter().map(Vec::len).max().unwrap_or(0);
        let width: Vec<usize> = (0..cols)
            .map(|c| {
                self.rows
                    .iter()
                    .filter_map(|r| r.get(c))
                    .map(|s| s.chars().count())
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let mut out = String::new();
        for (i, r) in self.rows.iter().enumerate() {
            let line: Vec<String> = (0..cols)
                .map(|c| {
                    let cell = r.get(c).map(String::as_str).unwrap_or("");
                    format!("{cell:<w$}", w = width[c])
                })
                .collect();
            let _ = writeln!(out, "| {} |", line.join(" | "));
            if i == 0 {
                let rule: Vec<String> = width.iter().map(|w| "-".repeat(*w)).collect();
                let _ = writeln!(out, "| {} |", rule.join(" | "));
            }
        }
        out
    }
}

/// Renders the checks as a table.
pub fn checks_table(checks: &[Check]) -> String {
    let mut t = Table::new(&["target", "goal", "measured", "verdict"]);
    for c in checks {
        t.row(vec![
            c.what.clone(),
            c.target.clone(),
            c.measured.clone(),
            match c.met {
                Some(true) => "met".into(),
                Some(false) => "MISSED".into(),
                None => "not measured".into(),
            },
        ]);
    }
    t.render()
}

/// Milliseconds with three decimals.
pub fn ms(v: f64) -> String {
    format!("{v:.3}")
}

/// Writes `report` with the machine to `<dir>/<scenario>-<unix time>.json` and
/// `<dir>/<scenario>-latest.json`; returns the first path.
pub fn write_json(dir: &Path, machine: &Machine, report: &Report) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let doc = serde_json::json!({
        "scenario": report.scenario,
        "quick": report.quick,
        "unix_time": now,
        "machine": machine,
        "checks": report.checks,
        "data": report.data,
    });
    let text = serde_json::to_string_pretty(&doc)?;
    let path = dir.join(format!("{}-{now}.json", report.scenario));
    std::fs::write(&path, &text).with_context(|| format!("writing {}", path.display()))?;
    let latest = dir.join(format!("{}-latest.json", report.scenario));
    std::fs::write(&latest, &text).with_context(|| format!("writing {}", latest.display()))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align() {
        let mut t = Table::new(&["a", "long header"]);
        t.row(vec!["wide cell".into(), "x".into()]);
        let text = t.render();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines.iter().all(|l| l.len() == lines[0].len()), "{text}");
        assert!(lines[1].starts_with("| ---------"));
    }

    #[test]
    fn verdicts() {
        let text = checks_table(&[
            Check::new("a", "< 1", "0.5".into(), true),
            Check::new("b", "< 1", "2".into(), false),
            Check::not_measured("c", "< 1", "no docker"),
        ]);
        assert!(text.contains("met") && text.contains("MISSED") && text.contains("not measured"));
    }
}
