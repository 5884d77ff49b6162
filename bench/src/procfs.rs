//! What a process costs, read from /proc: CPU time, resident memory, and its children.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio_util::sync::CancellationToken;

/// Clock ticks per second of /proc's CPU times (`getconf CLK_TCK`; 100 on every Linux port
/// that matters, read once).
fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// One reading of a process.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Usage {
    /// User + system CPU time consumed so far.
    pub cpu: Duration,
    /// Resident set size now, in KiB.
    pub rss_kib: u64,
}

/// The fields of /proc/<pid>/stat after the command name.
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may contain spaces: split after the last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// Reads a process's CPU time and RSS; `None` once it has exited.
pub fn usage(pid: u32) -> Option<Usage> {
    let f = stat_fields(pid)?;
    // After the name: state(0) ppid(1) ... utime(11) stime(12) ... rss pages(21).
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    Some(Usage {
        cpu: Duration::from_secs_f64((utime + stime) / clock_ticks()),
        rss_kib,
    })
}

/// Every live process whose parent is `pid`.
pub fn children(pid: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&p| {
            stat_fields(p)
                .and_then(|f| f.get(1)?.parse::<u32>().ok())
                .is_some_and(|ppid| ppid == pid)
        })
        .collect()
}

/// `pid`'s children, grandchildren and so on.
pub fn descendants(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let mut queue = vec![pid];
    while let Some(p) = queue.pop() {
        for c in children(p) {
            out.push(c);
            queue.push(c);
        }
    }
    out
}

/// The command name of a process (`haproxy`, `baker-ambassador`).
pub fn comm(pid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|s| s.trim().to_owned())
}

/// What a group of processes used over a sampled period.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Footprint {
    /// CPU time used over the period divided by its length: 1.0 is one core busy.
    pub cpu_cores: f64,
    pub rss_mean_mib: f64,
    pub rss_max_mib: f64,
    pub samples: u64,
}

#[derive(Default)]
struct Acc {
    first_cpu: BTreeMap<u32, Duration>,
    last_cpu: BTreeMap<u32, Duration>,
    rss_sum_kib: f64,
    rss_max_kib: u64,
    samples: u64,
}

/// Samples the combined usage of a set of processes (chosen again at every tick, so workers
/// that a reload replaces are followed) until finished.
pub struct Sampler {
    stop: CancellationToken,
    acc: Arc<Mutex<Acc>>,
    started: Instant,
    task: tokio::task::JoinHandle<()>,
}

impl Sampler {
    /// Starts sampling the processes `pids()` returns, every `every`.
    pub fn start(every: Duration, pids: impl Fn() -> Vec<u32> + Send + 'static) -> Sampler {
        let stop = CancellationToken::new();
        let acc = Arc::new(Mutex::new(Acc::default()));
        let (token, shared) = (stop.clone(), acc.clone());
        let task = tokio::spawn(async move {
            loop {
                let now: Vec<(u32, Usage)> = pids()
                    .into_iter()
                    .filter_map(|p| Some((p, usage(p)?)))
                    .collect();
                {
                    let mut a = shared.lock().unwrap_or_else(|p| p.into_inner());
                    let rss: u64 = now.iter().map(|(_, u)| u.rss_kib).sum();
                    let first_tick = a.samples == 0;
                    for (p, u) in &now {
                        // A process born during the period counts from zero.
                        let base = if first_tick { u.cpu } else { Duration::ZERO };
                        a.first_cpu.entry(*p).or_insert(base);
                        a.last_cpu.insert(*p, u.cpu);
                    }
                    a.rss_sum_kib += rss as f64;
                    a.rss_max_kib = a.rss_max_kib.max(rss);
                    a.samples += 1;
                }
                tokio::select! {
                    _ = tokio::time::sleep(every) => {}
                    _ = token.cancelled() => break,
                }
            }
        });
        Sampler {
            stop,
            acc,
            started: Instant::now(),
            task,
        }
    }

    /// Stops sampling and summarizes.
    pub async fn finish(self) -> Footprint {
        self.stop.cancel();
        let _ = self.task.await;
        let elapsed = self.started.elapsed().as_secs_f64().max(1e-9);
        let a = self.acc.lock().unwrap_or_else(|p| p.into_inner());
        let cpu: Duration = a
            .last_cpu
            .iter()
            .map(|(p, last)| last.saturating_sub(a.first_cpu[p]))
            .sum();
        Footprint {
            cpu_cores: cpu.as_secs_f64() / elapsed,
            rss_mean_mib: a.rss_sum_kib / a.samples.max(1) as f64 / 1024.0,
            rss_max_mib: a.rss_max_kib as f64 / 1024.0,
            samples: a.samples,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_its_own_process() {
        let me = std::process::id();
        let u = usage(me).expect("own /proc entry");
        assert!(u.rss_kib > 0);
        let child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        assert!(children(me).contains(&child.id()));
        assert_eq!(comm(child.id()).as_deref(), Some("sleep"));
        let mut child = child;
        child.kill().unwrap();
        child.wait().unwrap();
    }
}
