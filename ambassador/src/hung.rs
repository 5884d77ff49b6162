//! Hung servers: an instance that accepts connections but never answers (stopped, deadlocked).
//!
//! HAProxy retries an idempotent request whose answer does not come within the route's
//! `get-timeout` on another server, but a timeout it retries does not count as an error of
//! the server (`observe layer7` sees only those it gives up on), so HAProxy alone would go on
//! sending every third request to the hung server, and hold each for the whole timeout. The
//! ambassador reads the servers' counters every [`POLL`] instead: a server of an HTTP backend
//! whose failed attempts (`wretr`, which such a retry counts, and `eresp`) grew while it sent
//! no answer at all is marked down (`set server ... health down`), and [`Marked`] sends it
//! `HEAD /` every [`PROBE_EVERY`] until it answers (any status), when it is marked up again
//! (`health up`). HAProxy's own check would not do it soon: forcing a server's health does not
//! bring its next check forward, and a server that was up is checked once an hour.
//!
//! [`hung`] is the decision, a pure function of two readings of the counters.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

/// How often the counters are read.
pub const POLL: Duration = Duration::from_millis(250);

/// One server's counters: failed attempts and answers of any status.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Requests it failed that were retried elsewhere (`wretr`) or given up (`eresp`).
    pub errors: u64,
    pub answers: u64,
    /// Whether HAProxy counts it up now (a server already down needs nothing).
    pub up: bool,
    /// Where it listens (`addr`).
    pub addr: Option<SocketAddr>,
}

/// Counters by (backend, server).
pub type Readings = BTreeMap<(String, String), Counters>;

/// Parses `show stat` (servers only): `wretr` + `eresp`, the sum of `hrsp_*`, and `status`.
pub fn parse_counters(text: &str) -> Result<Readings, String> {
    let mut lines = text.lines();
    let header = lines.next().ok_or("empty answer")?;
    let cols: Vec<&str> = header.trim_start_matches("# ").split(',').collect();
    let col = |name: &str| {
        cols.iter()
            .position(|c| *c == name)
            .ok_or_else(|| format!("no {name} column"))
    };
    let eresp = col("eresp")?;
    let wretr = col("wretr")?;
    let status = col("status")?;
    let addr = col("addr")?;
    let answers: Vec<usize> = [
        "hrsp_1xx",
        "hrsp_2xx",
        "hrsp_3xx",
        "hrsp_4xx",
        "hrsp_5xx",
        "hrsp_other",
    ]
    .into_iter()
    .map(col)
    .collect::<Result<_, _>>()?;
    let num = |f: &[&str], i: usize| -> u64 { f.get(i).and_then(|v| v.parse().ok()).unwrap_or(0) };
    let mut out = Readings::new();
    for line in lines.filter(|l| !l.trim().is_empty()) {
        let f: Vec<&str> = line.split(',').collect();
        if f.len() < 2 || f[1] == "BACKEND" || f[1] == "FRONTEND" {
            continue;
        }
        out.insert(
            (f[0].to_owned(), f[1].to_owned()),
            Counters {
                errors: num(&f, eresp) + num(&f, wretr),
                answers: answers.iter().map(|&i| num(&f, i)).sum(),
                up: f.get(status).is_some_and(|s| s.starts_with("UP")),
                addr: f.get(addr).and_then(|a| a.parse().ok()),
            },
        );
    }
    Ok(out)
}

/// The servers of `backends` that are up, and whose response errors grew between `before` and
/// `now` while they sent no answer. A server missing from `before` (new, or HAProxy reloaded)
/// or whose counters went down (a reload resets them) is left alone until the next reading.
pub fn hung(before: &Readings, now: &Readings, backends: &[&str]) -> Vec<(String, String)> {
    now.iter()
        .filter(|((backend, _), c)| c.up && backends.contains(&backend.as_str()))
        .filter(|(key, c)| {
            before
                .get(*key)
                .is_some_and(|b| c.errors > b.errors && c.answers == b.answers)
        })
        .map(|(key, _)| key.clone())
        .collect()
}

/// How often a server marked down as hung is asked whether it answers again.
pub const PROBE_EVERY: Duration = Duration::from_millis(500);
/// How long a probe waits for the answer's first bytes.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// Whether an HTTP server at `addr` answers `HEAD /` with anything that looks like HTTP.
pub async fn answers(addr: SocketAddr) -> bool {
    let probe = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        s.write_all(b"HEAD / HTTP/1.0\r\n\r\n").await.ok()?;
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf).await.ok()?;
        (&buf == b"HTTP/").then_some(())
    };
    matches!(
        tokio::time::timeout(PROBE_TIMEOUT, probe).await,
        Ok(Some(()))
    )
}

/// Servers marked down as hung, each probed beside the owner of HAProxy until it answers.
#[derive(Debug, Default)]
pub struct Marked {
    probes: BTreeMap<(String, String), CancellationToken>,
    recovered: Arc<Mutex<Vec<(String, String)>>>,
}

impl Marked {
    /// Starts probing the server `key` at `addr` (once; a server already probed is left).
    pub fn watch(&mut self, key: (String, String), addr: SocketAddr) {
        if self.probes.contains_key(&key) {
            return;
        }
        let stop = CancellationToken::new();
        self.probes.insert(key.clone(), stop.clone());
        let recovered = self.recovered.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(PROBE_EVERY) => {}
                }
                if answers(addr).await {
                    recovered
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(key);
                    return;
                }
            }
        });
    }

    /// The servers that answered since the last call; they are no longer probed.
    pub fn take_recovered(&mut self) -> Vec<(String, String)> {
        let done: Vec<_> =
            std::mem::take(&mut *self.recovered.lock().unwrap_or_else(|e| e.into_inner()));
        for key in &done {
            self.probes.remove(key);
        }
        done
    }

    /// Stops probing servers that are no longer in `keep` (deleted, or HAProxy restarted).
    pub fn retain(&mut self, keep: impl Fn(&(String, String)) -> bool) {
        self.probes.retain(|key, stop| {
            let kept = keep(key);
            if !kept {
                stop.cancel();
            }
            kept
        });
    }
}

impl Drop for Marked {
    fn drop(&mut self) {
        for stop in self.probes.values() {
            stop.cancel();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(rows: &[(&str, &str, u64, u64, bool)]) -> Readings {
        rows.iter()
            .map(|&(b, s, errors, answers, up)| {
                (
                    (b.to_owned(), s.to_owned()),
                    Counters {
                        errors,
                        answers,
                        up,
                        addr: None,
                    },
                )
            })
            .collect()
    }

    #[test]
    fn a_server_with_new_errors_and_no_answer_is_hung() {
        let before = reading(&[
            ("web", "a", 0, 100, true),
            ("web", "b", 0, 100, true),
            ("web", "c", 0, 100, true),
            ("db", "d", 0, 0, true),
        ]);
        let now = reading(&[
            // Answered meanwhile: a slow request, not a hang.
            ("web", "a", 1, 150, true),
            ("web", "b", 0, 150, true),
            ("web", "c", 3, 100, true),
            // Not an HTTP backend.
            ("db", "d", 5, 0, true),
            // New since the last reading.
            ("web", "n", 5, 0, true),
        ]);
        assert_eq!(
            hung(&before, &now, &["web"]),
            [("web".to_owned(), "c".to_owned())]
        );
    }

    #[test]
    fn down_servers_and_reset_counters_are_left_alone() {
        let before = reading(&[("web", "a", 10, 100, true), ("web", "b", 0, 5, true)]);
        let now = reading(&[("web", "a", 2, 0, true), ("web", "b", 3, 5, false)]);
        assert!(hung(&before, &now, &["web"]).is_empty());
    }

    #[test]
    fn counters_parse_from_show_stat() {
        let text = "# pxname,svname,qcur,eresp,wretr,status,hrsp_1xx,hrsp_2xx,hrsp_3xx,hrsp_4xx,hrsp_5xx,hrsp_other,addr\n\
                    web,a,0,2,3,UP,0,10,1,2,3,0,10.0.0.1:80\n\
                    web,b,0,0,0,DOWN,,,,,,,\n\
                    web,BACKEND,0,2,3,UP,0,10,1,2,3,0,\n";
        let r = parse_counters(text).unwrap();
        assert_eq!(r.len(), 2);
        let a = r[&("web".to_owned(), "a".to_owned())];
        assert_eq!((a.errors, a.answers, a.up), (5, 16, true));
        assert_eq!(a.addr, Some("10.0.0.1:80".parse().unwrap()));
        assert!(!r[&("web".to_owned(), "b".to_owned())].up);
        assert!(parse_counters("# pxname,svname\n").is_err());
    }

    #[tokio::test]
    async fn a_probe_wants_an_http_answer() {
        let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = http.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = http.accept().await {
                let _ = s.write_all(b"HTTP/1.0 404 Not Found\r\n\r\n").await;
            }
        });
        assert!(answers(addr).await);
        // Accepts, never answers.
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let t = tokio::time::Instant::now();
        assert!(!answers(silent.local_addr().unwrap()).await);
        assert!(t.elapsed() >= PROBE_TIMEOUT);
    }
}
