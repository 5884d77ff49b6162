//! End-to-end: each route option of `BAKER_ROUTES` (balance, sticky, timeouts, maxconn,
//! retries), backup instances, and the default for hung instances, through a real ambassador
//! and HAProxy.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use baker_client::model::InstanceSpec;
use baker_client::DirectoryClient;
use baker_tests::ambassador::TestAmbassador;
use baker_tests::directory::TestDirectory;
use baker_tests::greeting::Greeting;
use baker_tests::{eventually, require, Needs};
use nix::sys::signal::Signal;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn register(
    client: &DirectoryClient,
    service: &str,
    id: &str,
    addr: SocketAddr,
    tags: &[&str],
) {
    let spec = InstanceSpec {
        address: addr.ip().to_string(),
        port: u64::from(addr.port()),
        version: None,
        weight: None,
        tags: tags.iter().map(|t| t.to_string()).collect(),
        ttl_ms: Some(60_000),
        zone: None,
    };
    client
        .register(service, id, &spec)
        .await
        .unwrap_or_else(|e| panic!("registering {service}/{id}: {e}"));
}

/// The greeting's `instance` in an HTTP answer's JSON body.
fn instance_of(body: &str) -> Option<String> {
    let json = &body[body.find('{')?..];
    let v: serde_json::Value = serde_json::from_str(json).ok()?;
    v["instance"].as_str().map(str::to_owned)
}

/// One `GET /greeting` on a new TCP connection to `port`: the instance that answered.
async fn tcp_greet(port: u16) -> Result<String, String> {
    let go = async {
        let mut s = TcpStream::connect(("127.0.0.1", port))
            .await
            .map_err(|e| e.to_string())?;
        s.write_all(b"GET /greeting HTTP/1.0\r\n\r\n")
            .await
            .map_err(|e| e.to_string())?;
        let mut out = String::new();
        s.read_to_string(&mut out)
            .await
            .map_err(|e| e.to_string())?;
        instance_of(&out).ok_or_else(|| format!("no greeting in {out:?}"))
    };
    tokio::time::timeout(Duration::from_secs(5), go)
        .await
        .map_err(|_| "timed out".to_owned())?
}

/// `GET url`: the answering instance and the request's latency, or why it failed.
async fn http_greet(
    client: &reqwest::Client,
    url: &str,
    cookie: Option<&str>,
) -> Result<(String, Option<String>), String> {
    let mut req = client.get(url);
    if let Some(c) = cookie {
        req = req.header("cookie", c);
    }
    let resp = req.send().await.map_err(|e| format!("{e:?}"))?;
    let status = resp.status();
    let set_cookie = resp
        .headers()
        .get("set-cookie")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(str::to_owned);
    if !status.is_success() {
        return Err(format!("status {status}"));
    }
    let body = resp.text().await.map_err(|e| format!("{e:?}"))?;
    let inst = instance_of(&body).ok_or_else(|| format!("no greeting in {body:?}"))?;
    Ok((inst, set_cookie))
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

/// Connections HAProxy holds open to the servers of `backend` now (`show stat`, `scur`).
fn server_sessions(amb: &TestAmbassador, backend: &str) -> u64 {
    amb.admin_command("show stat")
        .lines()
        .map(|l| l.split(',').collect::<Vec<_>>())
        .filter(|f| f.len() > 4 && f[0] == backend && f[1] != "FRONTEND" && f[1] != "BACKEND")
        .filter_map(|f| f[4].parse::<u64>().ok())
        .sum()
}

#[tokio::test]
async fn sticky_clients_keep_their_server_even_one_added_at_run_time() {
    if !require(Needs::Haproxy) {
        return;
    }
    let dir = TestDirectory::start(&[]).await;
    let a = Greeting::start("1", "a").await;
    let b = Greeting::start("1", "b").await;
    register(&dir.client, "web", "a", a.addr, &[]).await;
    register(&dir.client, "web", "b", b.addr, &[]).await;
    let amb = TestAmbassador::start(&dir.url, &["web;sticky"], &[]).await;
    let url = format!("{}/greeting", amb.url("web"));
    let c = client();
    eventually(Duration::from_secs(10), "both servers", || async {
        (amb.servers("web").len() == 2).then_some(())
    })
    .await;
    let reloads = amb.proc_info().reloads;

    // Without a cookie, requests spread; each answer names its server in a cookie.
    let mut first: BTreeMap<String, String> = BTreeMap::new();
    for _ in 0..10 {
        let (inst, cookie) = http_greet(&c, &url, None).await.unwrap();
        let cookie = cookie.expect("a stickiness cookie");
        assert!(cookie.starts_with("baker-web="), "{cookie}");
        first.insert(inst, cookie);
    }
    assert_eq!(first.len(), 2, "{first:?}");
    for (inst, cookie) in &first {
        for _ in 0..10 {
            let (got, _) = http_greet(&c, &url, Some(cookie)).await.unwrap();
            assert_eq!(&got, inst, "with {cookie}");
        }
    }

    // A server added at run time gets a cookie of its own.
    let n = Greeting::start("1", "n").await;
    register(&dir.client, "web", "n", n.addr, &[]).await;
    eventually(Duration::from_secs(10), "the new server", || async {
        (amb.servers("web").len() == 3).then_some(())
    })
    .await;
    let cookie = eventually(Duration::from_secs(10), "an answer from n", || async {
        match http_greet(&c, &url, None).await {
            Ok((inst, cookie)) if inst == "n" => cookie,
            _ => None,
        }
    })
    .await;
    assert!(!first.values().any(|c| *c == cookie), "{cookie} reused");
    for _ in 0..10 {
        let (got, _) = http_greet(&c, &url, Some(&cookie)).await.unwrap();
        assert_eq!(got, "n", "with {cookie}");
    }
    assert_eq!(amb.proc_info().reloads, reloads, "no reload");
}

/// Two instances of a TCP service with `options`: holds one connection open, then sends
/// `n` requests on new connections one after the other, and returns who answered them.
async fn answers_beside_a_held_connection(options: &str, n: usize) -> BTreeMap<String, usize> {
    let dir = TestDirectory::start(&[]).await;
    let a = Greeting::start("1", "a").await;
    let b = Greeting::start("1", "b").await;
    register(&dir.client, "db", "a", a.addr, &[]).await;
    register(&dir.client, "db", "b", b.addr, &[]).await;
    let service = format!("db=tcp{options}");
    let amb = TestAmbassador::start(&dir.url, &[service.as_str()], &[]).await;
    let port = amb.ports["db"];
    eventually(Duration::from_secs(10), "both servers", || async {
        (amb.servers("db").len() == 2).then_some(())
    })
    .await;
    // HAProxy connects to a server as soon as a client connects in TCP mode.
    let held = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let one_held = || async { (server_sessions(&amb, "db") == 1).then_some(()) };
    eventually(
        Duration::from_secs(5),
        "the held connection on a server",
        one_held,
    )
    .await;
    let mut seen = BTreeMap::new();
    for _ in 0..n {
        let inst = tcp_greet(port)
            .await
            .expect("a request beside the held one");
        *seen.entry(inst).or_insert(0) += 1;
        // The next choice is made once HAProxy has counted the finished connection out.
        eventually(
            Duration::from_secs(5),
            "only the held connection left",
            one_held,
        )
        .await;
    }
    drop(held);
    seen
}

#[tokio::test]
async fn leastconn_and_maxconn_keep_new_connections_off_a_busy_server() {
    if !require(Needs::Haproxy) {
        return;
    }
    // The control: round robin alternates whatever the held connection.
    let rr = answers_beside_a_held_connection("", 6).await;
    assert_eq!(rr.values().collect::<Vec<_>>(), [&3, &3], "{rr:?}");
    let lc = answers_beside_a_held_connection(";balance=leastconn", 6).await;
    assert_eq!(lc.len(), 1, "leastconn avoids the busy server: {lc:?}");
    let full = answers_beside_a_held_connection(";maxconn=1", 6).await;
    assert_eq!(full.len(), 1, "a full server gets nothing: {full:?}");
}

/// Connects to `port` in a loop, one request per connection, recording who answered (or
/// `failed`), until stopped.
struct Reconnecting {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Reconnecting {
    fn start(port: u16) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (s, v) = (stop.clone(), seen.clone());
        let task = tokio::spawn(async move {
            while !s.load(Ordering::Relaxed) {
                let got = tcp_greet(port).await.unwrap_or_else(|_| "failed".into());
                v.lock().unwrap().push(got);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
        Reconnecting { stop, seen, task }
    }

    fn last(&self) -> Option<String> {
        self.seen.lock().unwrap().last().cloned()
    }

    async fn wait_for(&self, instance: &str, what: &str) {
        eventually(Duration::from_secs(15), what, || async {
            (self.last().as_deref() == Some(instance)).then_some(())
        })
        .await;
    }

    /// The answers in order, runs of the same answer merged, and the number of failures.
    async fn finish(self) -> (Vec<String>, usize) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.task.await;
        let seen = self.seen.lock().unwrap().clone();
        let failed = seen.iter().filter(|s| *s == "failed").count();
        let mut phases: Vec<String> = Vec::new();
        for s in seen.into_iter().filter(|s| s != "failed") {
            if phases.last() != Some(&s) {
                phases.push(s);
            }
        }
        (phases, failed)
    }
}

#[tokio::test]
async fn a_backup_serves_only_while_the_primary_is_down() {
    if !require(Needs::Haproxy) {
        return;
    }
    let dir = TestDirectory::start(&[]).await;
    // On a port of its own, not one the kernel picked: it comes back there after a SIGKILL.
    let listen = format!("127.0.0.1:{}", baker_tests::free_port());
    let mut primary =
        Greeting::start_with("1", "primary", &[("BAKER_LISTEN", listen.as_str())]).await;
    let spare = Greeting::start("1", "spare").await;
    register(&dir.client, "db", "primary", primary.addr, &[]).await;
    register(&dir.client, "db", "spare", spare.addr, &["backup"]).await;
    let amb = TestAmbassador::start(&dir.url, &["db=tcp"], &[]).await;
    let port = amb.ports["db"];
    eventually(Duration::from_secs(10), "both servers", || async {
        (amb.servers("db").len() == 2).then_some(())
    })
    .await;
    assert!(amb.servers("db").contains_key("backup:db:spare"));
    let reloads = amb.proc_info().reloads;

    let load = Reconnecting::start(port);
    load.wait_for("primary", "the primary to serve").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    primary.proc.kill9();
    let killed = Instant::now();
    load.wait_for("spare", "the backup to take over").await;
    let takeover = killed.elapsed();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The primary comes back on its address.
    let back = Greeting::start_with("1", "primary", &[("BAKER_LISTEN", listen.as_str())]).await;
    let restarted = Instant::now();
    load.wait_for("primary", "traffic back on the primary")
        .await;
    let failback = restarted.elapsed();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (phases, failed) = load.finish().await;
    eprintln!("phases {phases:?}, {failed} failed connections, backup after {takeover:?}, primary again after {failback:?}");
    assert_eq!(phases, ["primary", "spare", "primary"]);
    assert!(failed <= 3, "{failed} failed");
    assert_eq!(amb.proc_info().reloads, reloads, "no reload");
    drop(back);
}

#[tokio::test]
async fn balance_first_keeps_one_live_server_at_a_time() {
    if !require(Needs::Haproxy) {
        return;
    }
    let dir = TestDirectory::start(&[]).await;
    let mut a = Greeting::start("1", "a").await;
    let b = Greeting::start("1", "b").await;
    register(&dir.client, "mq", "a", a.addr, &[]).await;
    let amb = TestAmbassador::start(&dir.url, &["mq=tcp;balance=first"], &[]).await;
    let port = amb.ports["mq"];
    eventually(Duration::from_secs(10), "a", || async {
        (amb.servers("mq").len() == 1).then_some(())
    })
    .await;
    // Added at run time, b waits behind a.
    register(&dir.client, "mq", "b", b.addr, &[]).await;
    eventually(Duration::from_secs(10), "b", || async {
        (amb.servers("mq").len() == 2).then_some(())
    })
    .await;
    let load = Reconnecting::start(port);
    load.wait_for("a", "a to serve").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    a.proc.kill9();
    load.wait_for("b", "b to take over").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (phases, failed) = load.finish().await;
    eprintln!("phases {phases:?}, {failed} failed connections");
    assert_eq!(phases, ["a", "b"], "one server at a time");
    assert!(failed <= 3, "{failed} failed");
}

#[tokio::test]
async fn retries_zero_lets_a_refused_connection_fail() {
    if !require(Needs::Haproxy) {
        return;
    }
    let dir = TestDirectory::start(&[]).await;
    let good = Greeting::start("1", "good").await;
    // A port nothing listens on: handed to no other test.
    let closed = std::net::SocketAddr::from(([127, 0, 0, 1], baker_tests::free_port()));
    for svc in ["web", "once"] {
        register(&dir.client, svc, "good", good.addr, &[]).await;
        register(&dir.client, svc, "dead", closed, &[]).await;
    }
    let amb = TestAmbassador::start(&dir.url, &["web", "once;retries=0"], &[]).await;
    for svc in ["web", "once"] {
        eventually(Duration::from_secs(10), "both servers", || async {
            (amb.servers(svc).len() == 2).then_some(())
        })
        .await;
    }
    let c = client();
    let mut failed = BTreeMap::new();
    for svc in ["web", "once"] {
        let url = format!("{}/greeting", amb.url(svc));
        let mut n = 0;
        for _ in 0..10 {
            n += usize::from(http_greet(&c, &url, None).await.is_err());
        }
        failed.insert(svc, n);
    }
    assert_eq!(failed["web"], 0, "retried elsewhere: {failed:?}");
    assert!(failed["once"] >= 1, "not retried: {failed:?}");
}

/// A listener whose accept queue is full: connections to it neither succeed nor fail.
async fn silent_listener() -> (tokio::net::TcpListener, Vec<TcpStream>) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(1).unwrap();
    let addr = listener.local_addr().unwrap();
    let mut fill = Vec::new();
    for _ in 0..4 {
        if let Ok(Ok(s)) =
            tokio::time::timeout(Duration::from_millis(200), TcpStream::connect(addr)).await
        {
            fill.push(s);
        }
    }
    let probe = tokio::time::timeout(Duration::from_millis(300), TcpStream::connect(addr)).await;
    assert!(
        probe.is_err(),
        "a connection to a full accept queue did not hang: {probe:?}"
    );
    (listener, fill)
}

#[tokio::test]
async fn connect_timeout_bounds_a_connection_to_a_silent_server() {
    if !require(Needs::Haproxy) {
        return;
    }
    let dir = TestDirectory::start(&[]).await;
    let good = Greeting::start("1", "good").await;
    let (silent, _fill) = silent_listener().await;
    for svc in ["web", "quick"] {
        register(&dir.client, svc, "good", good.addr, &[]).await;
        register(
            &dir.client,
            svc,
            "silent",
            silent.local_addr().unwrap(),
            &[],
        )
        .await;
    }
    let amb = TestAmbassador::start(&dir.url, &["web", "quick;connect-timeout=100ms"], &[]).await;
    let c = client();
    let mut worst = BTreeMap::new();
    for svc in ["web", "quick"] {
        eventually(Duration::from_secs(10), "both servers", || async {
            (amb.servers(svc).len() == 2).then_some(())
        })
        .await;
        let url = format!("{}/greeting", amb.url(svc));
        let mut max = Duration::ZERO;
        for _ in 0..4 {
            let t = Instant::now();
            let (inst, _) = http_greet(&c, &url, None).await.expect("answered");
            assert_eq!(inst, "good");
            max = max.max(t.elapsed());
        }
        worst.insert(svc, max);
    }
    eprintln!("worst latency: {worst:?}");
    assert!(worst["web"] >= Duration::from_millis(500), "{worst:?}");
    assert!(worst["quick"] < Duration::from_millis(450), "{worst:?}");
}

#[tokio::test]
async fn timeout_bounds_a_request_to_a_hung_server() {
    if !require(Needs::Haproxy) {
        return;
    }
    let dir = TestDirectory::start(&[]).await;
    let hung = Greeting::start("1", "hung").await;
    register(&dir.client, "web", "hung", hung.addr, &[]).await;
    let amb = TestAmbassador::start(&dir.url, &["web;timeout=1s"], &[]).await;
    eventually(Duration::from_secs(10), "the server", || async {
        (amb.servers("web").len() == 1).then_some(())
    })
    .await;
    hung.proc.signal(Signal::SIGSTOP);
    let t = Instant::now();
    let status = client()
        .post(format!("{}/greeting", amb.url("web")))
        .send()
        .await
        .expect("an answer from HAProxy")
        .status();
    let took = t.elapsed();
    hung.proc.signal(Signal::SIGCONT);
    assert_eq!(status.as_u16(), 504);
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(3),
        "{took:?}"
    );
}

/// What 8 clients saw while one of three instances was stopped.
#[derive(Debug)]
#[allow(dead_code)] // Printed for the record.
struct Hang {
    ok: u64,
    failed: u64,
    /// The slowest answer.
    worst: Duration,
    /// Answers that took more than 1 s.
    slow: u64,
    /// From SIGSTOP to HAProxy marking the server down.
    marked_down: Option<Duration>,
    /// From SIGCONT to the server being up again.
    back_after: Duration,
}

/// Three instances of `service` (options after `;`), 8 clients in a loop; one instance is
/// stopped (SIGSTOP) for 5 s under that load, then continued.
async fn hang_one_of_three(options: &str) -> Hang {
    let dir = TestDirectory::start(&[]).await;
    let mut gs = Vec::new();
    for id in ["a", "b", "c"] {
        let g = Greeting::start("1", id).await;
        register(&dir.client, "web", id, g.addr, &[]).await;
        gs.push(g);
    }
    let entry = format!("web{options}");
    let amb = TestAmbassador::start(&dir.url, &[entry.as_str()], &[]).await;
    eventually(Duration::from_secs(10), "three servers", || async {
        (amb.servers("web").len() == 3).then_some(())
    })
    .await;
    let url = format!("{}/greeting", amb.url("web"));
    let stop = Arc::new(AtomicBool::new(false));
    let stats = Arc::new(Mutex::new((0u64, 0u64, Duration::ZERO, 0u64)));
    let begun = Instant::now();
    let buckets = Arc::new(Mutex::new(vec![0u64; 40]));
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let (stop, stats, url, buckets) =
                (stop.clone(), stats.clone(), url.clone(), buckets.clone());
            tokio::spawn(async move {
                let c = client();
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    let r = http_greet(&c, &url, None).await;
                    let took = t.elapsed();
                    let mut s = stats.lock().unwrap();
                    let slot = (begun.elapsed().as_millis() / 250) as usize;
                    if let Some(b) = buckets.lock().unwrap().get_mut(slot) {
                        *b += u64::from(r.is_ok());
                    }
                    match r {
                        Ok(_) => s.0 += 1,
                        Err(_) => s.1 += 1,
                    }
                    s.2 = s.2.max(took);
                    s.3 += u64::from(took > Duration::from_secs(1));
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(1)).await;
    gs[2].proc.signal(Signal::SIGSTOP);
    let stopped = Instant::now();
    let mut marked_down = None;
    while stopped.elapsed() < Duration::from_secs(5) {
        if marked_down.is_none() && amb.op_states("web").get("c") == Some(&"down") {
            marked_down = Some(stopped.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    gs[2].proc.signal(Signal::SIGCONT);
    let continued = Instant::now();
    // Its health check brings it back once it answers.
    eventually(Duration::from_secs(5), "c up again", || async {
        (amb.op_states("web").get("c") == Some(&"up")).then_some(())
    })
    .await;
    let back_after = continued.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    let (ok, failed, worst, slow) = *stats.lock().unwrap();
    let hang = Hang {
        ok,
        failed,
        worst,
        slow,
        marked_down,
        back_after,
    };
    eprintln!("options {options:?}: {hang:?}");
    eprintln!("answers per 250 ms: {:?}", buckets.lock().unwrap());
    hang
}

#[tokio::test]
async fn a_hung_instance_costs_a_get_at_most_the_get_timeout() {
    if !require(Needs::Haproxy) {
        return;
    }
    // The default: GETs wait 2 s for a hung server, then go to another; it is marked down.
    let h = hang_one_of_three("").await;
    assert_eq!(h.failed, 0, "{h:?}");
    assert!(h.worst < Duration::from_millis(3500), "{h:?}");
    assert!(h.marked_down < Some(Duration::from_millis(3500)), "{h:?}");
    // Configured shorter, it costs less.
    let h = hang_one_of_three(";get-timeout=500ms").await;
    assert_eq!(h.failed, 0, "{h:?}");
    assert!(h.worst < Duration::from_millis(1500), "{h:?}");
    assert!(h.marked_down < Some(Duration::from_secs(2)), "{h:?}");
}
