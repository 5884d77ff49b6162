//! Hung servers: an instance that accepts connections but never answers (stopped, deadlocked).
//!
//! HAProxy retries an idempotent request whose answer does not come within the route's
//! `get-timeout` on another server, but a timeout it retries does not count as an error of
//! the server (`observe layer7` sees only those it gives up on), so HAProxy alone would go on
//! sending every third request to the hung server, and hold each for the whole timeout; a
//! client whose connections all wait there gets nothing at all meanwhile. The ambassador reads
//! the servers' counters instead (`show stat`, every [`POLL`] while requests flow, every
//! [`HUNG_EVERY`] when none do) and marks down (`set server ... health down`) a server of an
//! HTTP backend that
//!
//! - holds requests and answers none while it is sent more and the others answer ([`Stalls`]:
//!   within a twentieth of the `get-timeout`, 100 ms by default, before any request of it
//!   timed out), or
//! - whose failed attempts (`wretr`, which such a retry counts, and `eresp`) grew while it
//!   sent no answer at all ([`hung`]).
//!
//! [`Marked`] then sends it `HEAD /` every [`PROBE_EVERY`] until it answers (any status), when
//! it is marked up again (`health up`). HAProxy's own check would not do it soon: forcing a
//! server's health does not bring its next check forward, and a server that was up is checked
//! once an hour. Marking down never touches the requests a server holds: those wait for their
//! answer or their timeout, as before.
//!
//! [`hung`] and [`Stalls::update`] are the decisions, pure functions of the readings.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

/// How often the counters are read while requests flow (for stalls).
pub const POLL: Duration = Duration::from_millis(50);
/// How far apart the two readings are that [`hung`] compares, and how often the counters are
/// read while no request flows.
pub const HUNG_EVERY: Duration = Duration::from_millis(250);

/// One server's counters: failed attempts and answers of any status.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Requests it failed that were retried elsewhere (`wretr`) or given up (`eresp`).
    pub errors: u64,
    pub answers: u64,
    /// Whether HAProxy counts it up now (a server already down needs nothing).
    pub up: bool,
    /// Requests it holds now (`scur`).
    pub inflight: u64,
    /// Requests ever sent to it (`stot`).
    pub sent: u64,
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
    let scur = col("scur")?;
    let stot = col("stot")?;
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
                inflight: num(&f, scur),
                sent: num(&f, stot),
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

/// How long a server of an HTTP backend may hold a request without answering anything, while
/// it is sent more and the other servers of its backend answer, before it is marked down as
/// stalled: a twentieth of the route's `get-timeout` (100 ms by default), and never less than
/// two readings apart.
pub fn stall_after(get_timeout: Duration) -> Duration {
    (get_timeout / 20).max(2 * POLL)
}

/// How many times [`stall_after`] a server may hold requests while no other server waits.
pub const LONE_STALL: u32 = 4;

/// Since when a server has held a request and answered nothing: its requests sent then, and
/// the answers of the other servers of its backend then.
#[derive(Debug, Clone, Copy)]
struct Quiet {
    since: Instant,
    sent: u64,
    peers: u64,
}

/// Servers that hold requests and answer none: the stall of a hung instance, seen before any
/// of its requests times out.
///
/// A server is stalled once, for at least its backend's [`stall_after`], it has held a request
/// and answered nothing, while it was sent at least two more requests and the other servers
/// of its backend answered at least two; or once, for [`LONE_STALL`] times as long, it has
/// held requests, two at least, and answered nothing while no other server of its backend
/// waited (every client of the service waits on it, so the others are sent nothing). A slow
/// request alone is not a stall (the server is sent nothing else, or answers the others), nor
/// is a backend whose servers all wait (on a database, say): marking them down would help no
/// one. At most as many servers are marked
/// down this way as leaves half of a backend's servers up; the timeout rule ([`hung`]) has no
/// such limit.
#[derive(Debug, Default)]
pub struct Stalls {
    quiet: BTreeMap<(String, String), Quiet>,
}

impl Stalls {
    /// Follows the reading `now`, taken at `at`, after `before`, for the HTTP backends
    /// `backends` with their [`stall_after`]; returns the servers stalled.
    pub fn update(
        &mut self,
        before: &Readings,
        now: &Readings,
        at: Instant,
        backends: &[(&str, Duration)],
    ) -> Vec<(String, String)> {
        // Answers, servers and servers up, per backend.
        let mut totals: BTreeMap<&str, (u64, usize, usize)> = BTreeMap::new();
        for ((backend, _), c) in now {
            let t = totals.entry(backend.as_str()).or_default();
            t.0 += c.answers;
            t.1 += 1;
            t.2 += usize::from(c.up);
        }
        for (key, c) in now {
            let total = totals.get(key.0.as_str()).copied().unwrap_or_default();
            let peers = total.0 - c.answers;
            let answered = match before.get(key) {
                Some(b) if b.answers <= c.answers && b.sent <= c.sent => c.answers > b.answers,
                // New, or counters reset by a reload.
                _ => true,
            };
            let tracked = backends.iter().any(|(b, _)| *b == key.0);
            if !tracked || !c.up || c.inflight == 0 {
                self.quiet.remove(key);
                continue;
            }
            let fresh = Quiet {
                since: at,
                sent: c.sent,
                peers,
            };
            let q = self.quiet.entry(key.clone()).or_insert(fresh);
            if answered {
                *q = fresh;
            }
        }
        self.quiet.retain(|key, _| now.contains_key(key));
        let quiet_for = |key: &(String, String)| {
            self.quiet
                .get(key)
                .map_or(Duration::ZERO, |q| at.saturating_duration_since(q.since))
        };
        let mut stalled = Vec::new();
        for (key, q) in &self.quiet {
            let Some(&(_, after)) = backends.iter().find(|(b, _)| *b == key.0) else {
                continue;
            };
            let c = &now[key];
            let quiet = quiet_for(key);
            let total = totals.get(key.0.as_str()).copied().unwrap_or_default();
            // Sent more while the others answered.
            let behind =
                quiet >= after && c.sent >= q.sent + 2 && total.0 - c.answers >= q.peers + 2;
            // Holds requests, longer, while the others wait for nothing: every client waits on it.
            let alone = quiet >= LONE_STALL * after
                && c.inflight >= 2
                && now
                    .keys()
                    .filter(|k| k.0 == key.0 && *k != key)
                    .all(|k| quiet_for(k) < after);
            if behind || alone {
                let t = totals.entry(key.0.as_str()).or_default();
                if (t.2 - 1) * 2 >= t.1 {
                    t.2 -= 1;
                    stalled.push(key.clone());
                }
            }
        }
        for key in &stalled {
            self.quiet.remove(key);
        }
        stalled
    }
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
                        ..Counters::default()
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

    /// Servers of `web`: (name, answers, inflight, sent, up).
    fn web(rows: &[(&str, u64, u64, u64, bool)]) -> Readings {
        rows.iter()
            .map(|&(s, answers, inflight, sent, up)| {
                (
                    ("web".to_owned(), s.to_owned()),
                    Counters {
                        answers,
                        inflight,
                        sent,
                        up,
                        ..Counters::default()
                    },
                )
            })
            .collect()
    }

    const AFTER: Duration = Duration::from_millis(100);

    /// Feeds `readings` 50 ms apart; the servers found stalled at each.
    fn follow(readings: &[Readings]) -> Vec<Vec<(String, String)>> {
        let mut stalls = Stalls::default();
        let t0 = Instant::now();
        let mut before = Readings::new();
        readings
            .iter()
            .enumerate()
            .map(|(i, now)| {
                let at = t0 + POLL * i as u32;
                let found = stalls.update(&before, now, at, &[("web", AFTER)]);
                before = now.clone();
                found
            })
            .collect()
    }

    #[test]
    fn a_server_that_holds_requests_while_the_others_answer_is_stalled() {
        let found = follow(&[
            web(&[
                ("a", 10, 0, 10, true),
                ("b", 10, 0, 10, true),
                ("c", 10, 0, 10, true),
            ]),
            // c holds one request.
            web(&[
                ("a", 15, 0, 15, true),
                ("b", 15, 0, 15, true),
                ("c", 10, 1, 15, true),
            ]),
            web(&[
                ("a", 20, 0, 20, true),
                ("b", 20, 1, 21, true),
                ("c", 10, 5, 20, true),
            ]),
            // 100 ms with a request held, more sent, none answered, the others answering.
            web(&[
                ("a", 25, 0, 25, true),
                ("b", 25, 0, 25, true),
                ("c", 10, 8, 25, true),
            ]),
        ]);
        let c = ("web".to_owned(), "c".to_owned());
        assert_eq!(found, [vec![], vec![], vec![], vec![c]]);
    }

    #[test]
    fn slow_requests_and_backends_that_all_wait_are_not_stalls() {
        let found = follow(&[
            web(&[
                ("a", 10, 0, 10, true),
                ("b", 10, 0, 10, true),
                ("c", 10, 0, 10, true),
            ]),
            // c holds a slow request but answers the others; b holds one and is sent nothing.
            web(&[
                ("a", 15, 0, 15, true),
                ("b", 10, 1, 11, true),
                ("c", 14, 1, 15, true),
            ]),
            web(&[
                ("a", 20, 0, 20, true),
                ("b", 10, 1, 11, true),
                ("c", 18, 1, 20, true),
            ]),
            web(&[
                ("a", 25, 0, 25, true),
                ("b", 10, 1, 11, true),
                ("c", 23, 1, 25, true),
            ]),
            web(&[
                ("a", 30, 0, 30, true),
                ("b", 10, 1, 11, true),
                ("c", 28, 1, 30, true),
            ]),
        ]);
        assert!(found.iter().all(Vec::is_empty), "{found:?}");
        // Every server waits: no one answers.
        let found = follow(&[
            web(&[("a", 10, 0, 10, true), ("b", 10, 0, 10, true)]),
            web(&[("a", 10, 3, 13, true), ("b", 10, 3, 13, true)]),
            web(&[("a", 10, 6, 16, true), ("b", 10, 6, 16, true)]),
            web(&[("a", 10, 9, 19, true), ("b", 10, 9, 19, true)]),
            web(&[("a", 10, 12, 22, true), ("b", 10, 12, 22, true)]),
        ]);
        assert!(found.iter().all(Vec::is_empty), "{found:?}");
    }

    #[test]
    fn a_server_every_client_waits_on_is_stalled_later() {
        let mut readings = vec![web(&[
            ("a", 10, 0, 10, true),
            ("b", 10, 0, 10, true),
            ("c", 10, 0, 10, true),
        ])];
        // Eight clients, each waiting on c: a and b are sent nothing more.
        for _ in 0..9 {
            readings.push(web(&[
                ("a", 12, 0, 12, true),
                ("b", 12, 0, 12, true),
                ("c", 10, 8, 18, true),
            ]));
        }
        let found = follow(&readings);
        let first = found.iter().position(|f| !f.is_empty());
        // Held from the second reading; 400 ms later, the tenth.
        assert_eq!(first, Some(9), "{found:?}");
        // One request held that long is a slow request.
        let mut readings = vec![web(&[("a", 10, 0, 10, true), ("b", 10, 0, 10, true)])];
        for _ in 0..20 {
            readings.push(web(&[("a", 10, 0, 10, true), ("b", 10, 1, 11, true)]));
        }
        assert!(follow(&readings).iter().all(Vec::is_empty));
    }

    #[test]
    fn stalls_leave_half_of_the_servers_up() {
        let found = follow(&[
            web(&[
                ("a", 10, 0, 10, true),
                ("b", 10, 0, 10, true),
                ("c", 10, 0, 10, true),
            ]),
            web(&[
                ("a", 15, 0, 15, true),
                ("b", 10, 1, 15, true),
                ("c", 10, 1, 15, true),
            ]),
            web(&[
                ("a", 20, 0, 20, true),
                ("b", 10, 3, 20, true),
                ("c", 10, 3, 20, true),
            ]),
            web(&[
                ("a", 25, 0, 25, true),
                ("b", 10, 5, 25, true),
                ("c", 10, 5, 25, true),
            ]),
            // b is marked down (above); a does not count c's stall against it.
            web(&[
                ("a", 30, 0, 30, true),
                ("b", 10, 5, 25, false),
                ("c", 10, 7, 30, true),
            ]),
        ]);
        let b = ("web".to_owned(), "b".to_owned());
        assert_eq!(found, [vec![], vec![], vec![], vec![b], vec![]]);
    }

    #[test]
    fn stalls_wait_a_twentieth_of_the_get_timeout() {
        assert_eq!(stall_after(Duration::from_secs(2)), AFTER);
        assert_eq!(
            stall_after(Duration::from_secs(30)),
            Duration::from_millis(1500)
        );
        assert_eq!(stall_after(Duration::from_millis(500)), 2 * POLL);
    }

    #[test]
    fn down_servers_and_reset_counters_are_left_alone() {
        let before = reading(&[("web", "a", 10, 100, true), ("web", "b", 0, 5, true)]);
        let now = reading(&[("web", "a", 2, 0, true), ("web", "b", 3, 5, false)]);
        assert!(hung(&before, &now, &["web"]).is_empty());
    }

    #[test]
    fn counters_parse_from_show_stat() {
        let text = "# pxname,svname,qcur,scur,stot,eresp,wretr,status,hrsp_1xx,hrsp_2xx,hrsp_3xx,hrsp_4xx,hrsp_5xx,hrsp_other,addr\n\
                    web,a,0,1,17,2,3,UP,0,10,1,2,3,0,10.0.0.1:80\n\
                    web,b,0,0,0,0,0,DOWN,,,,,,,\n\
                    web,BACKEND,0,1,17,2,3,UP,0,10,1,2,3,0,\n";
        let r = parse_counters(text).unwrap();
        assert_eq!(r.len(), 2);
        let a = r[&("web".to_owned(), "a".to_owned())];
        assert_eq!((a.errors, a.answers, a.up), (5, 16, true));
        assert_eq!((a.inflight, a.sent), (1, 17));
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
