//! End-to-end: HAProxy's worker, or its master, SIGKILLed under a paced load of 1,200
//! requests per second through a real ambassador to three instances. The ambassador holds the
//! listening sockets, so the port stays open while HAProxy is down: clients wait in the
//! backlog instead of being refused, and only the requests inside the dead process fail. The
//! replacement starts at once with the runtime state back (an operator's drain, a weight).
//! The same holds with ten more instances at DNS names whose resolver never answers: their
//! lookups run beside the HAProxy that is replaced, never in its way.

use std::net::SocketAddr;
use std::time::Duration;

use baker_client::maintenance::Target;
use baker_client::model::InstanceSpec;
use baker_tests::ambassador::TestAmbassador;
use baker_tests::directory::TestDirectory;
use baker_tests::dns::SilentResolver;
use baker_tests::greeting::Greeting;
use baker_tests::load::Paced;
use baker_tests::{eventually, require, Needs};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Requests per second, and the kept-alive connections they are sent over (a client's pool).
/// A crash costs at most one request per connection: the one in flight in the dead process,
/// or the next one sent on the connection before the client noticed it closed (a client whose
/// CPU is busy notices late). The request after that opens a new connection, which waits in
/// the backlog of the socket the ambassador holds.
const RATE: f64 = 1200.0;
const CONNS: usize = 8;
/// The most requests a crash may cost.
const MAX_FAILED: usize = 10;
/// The weight given to `b` before the crash (`a` keeps the default, 100).
const B_WEIGHT: u64 = 25;

fn spec(addr: SocketAddr, weight: Option<u64>) -> InstanceSpec {
    InstanceSpec {
        address: addr.ip().to_string(),
        port: u64::from(addr.port()),
        version: None,
        weight,
        tags: vec![],
        ttl_ms: Some(600_000),
        zone: None,
    }
}

#[derive(Debug, Clone, Copy)]
enum Fault {
    Worker,
    Master,
}

/// Runtime weight (`srv_uweight`) of each server of `backend`, from `show servers state`.
fn weights(amb: &TestAmbassador, backend: &str) -> Vec<(String, String)> {
    amb.admin_command(&format!("show servers state {backend}"))
        .lines()
        .filter(|l| !l.starts_with('#') && l.split_whitespace().count() > 7)
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f[3].to_owned(), f[7].to_owned())
        })
        .collect()
}

/// The pid to SIGKILL: the master (its pid file) or its current worker (`show proc`).
fn target(amb: &TestAmbassador, fault: Fault) -> i32 {
    match fault {
        Fault::Master => std::fs::read_to_string(amb.run_dir().join("haproxy.pid"))
            .expect("reading haproxy.pid")
            .trim()
            .parse()
            .expect("a pid in haproxy.pid"),
        Fault::Worker => amb.proc_info().worker as i32,
    }
}

/// Instances at DNS names the silent resolver is asked for, and never answers.
const SILENT_NAMES: usize = 10;

async fn crash(fault: Fault, silent_dns: bool) {
    let dns = match silent_dns {
        true => match SilentResolver::start() {
            Some(dns) => Some(dns),
            None => return,
        },
        false => None,
    };
    let dir = TestDirectory::start(&[]).await;
    let mut gs = Vec::new();
    for id in ["a", "b", "c"] {
        let g = Greeting::start("1", id).await;
        dir.client
            .register("web", id, &spec(g.addr, None))
            .await
            .expect("registering");
        gs.push(g);
    }
    for i in 0..SILENT_NAMES {
        if dns.is_none() {
            break;
        }
        let unresolved = InstanceSpec {
            address: format!("silent-{i}.example.org"),
            ..spec(gs[0].addr, None)
        };
        dir.client
            .register("web", &format!("dns-{i}"), &unresolved)
            .await
            .expect("registering an instance at a DNS name");
    }
    let mut amb = match &dns {
        Some(dns) => TestAmbassador::start_wrapped(&dir.url, &["web"], &[], &dns.wrapper()).await,
        None => TestAmbassador::start(&dir.url, &["web"], &[]).await,
    };
    // The instances at names that never resolve are left out of HAProxy: three servers.
    eventually(Duration::from_secs(10), "three servers", || async {
        (amb.servers("web").len() == 3).then_some(())
    })
    .await;
    // Runtime state set before the crash: c drained by an operator, b's weight lowered.
    dir.client
        .drain("web", &Target::Instance("c".parse().unwrap()), Some("test"))
        .await
        .expect("draining c");
    dir.client
        .register("web", "b", &spec(gs[1].addr, Some(B_WEIGHT)))
        .await
        .expect("re-registering b");
    let expected = |amb: &TestAmbassador| {
        let drained = amb.servers("web").get("c").map(String::as_str) == Some("drain");
        let w = weights(amb, "web");
        let weight = |s: &str| w.iter().find(|(n, _)| n == s).map(|(_, w)| w.clone());
        drained && weight("b").as_deref() == Some("25") && weight("a").as_deref() == Some("100")
    };
    eventually(
        Duration::from_secs(10),
        "c drained, b at weight 25",
        || async { expected(&amb).then_some(()) },
    )
    .await;
    let pid = target(&amb, fault);
    let before = amb.proc_info();

    let load = Paced::start(&format!("{}/greeting", amb.url("web")), RATE, CONNS);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let killed = load.elapsed();
    kill(Pid::from_raw(pid), Signal::SIGKILL).expect("SIGKILLing HAProxy");
    amb.proc
        .wait_for_log("HAProxy is running again", Duration::from_secs(10))
        .await;
    let restarted = load.elapsed();
    // The state is back in the new process, as soon as it runs.
    let after = amb.proc_info();
    let state_back = expected(&amb);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let end = load.elapsed();
    let out = load.finish().await;

    let (gap, gap_at) = out.longest_gap(killed, end);
    let by = out.instances_between(killed, end);
    let total: usize = by.values().sum();
    let share_b = by.get("b").copied().unwrap_or(0) as f64 / total.max(1) as f64;
    eprintln!(
        "{fault:?} SIGKILLed: {} failed; longest gap {gap:?} from {:+.3} s; restarted after \
         {:?}; answers since the kill {by:?} (b {:.0} %); {} answered in all",
        out.failures.len(),
        gap_at.as_secs_f64() - killed.as_secs_f64(),
        restarted - killed,
        100.0 * share_b,
        out.answers.len(),
    );
    for f in &out.failures {
        eprintln!("failed: {f}");
    }
    let log = amb.proc.log_text();
    assert_ne!(after.worker, before.worker, "a new worker serves:\n{log}");
    assert!(
        state_back,
        "the drain and the weight are back in the restarted HAProxy: {:?} {:?}",
        amb.servers("web"),
        weights(&amb, "web")
    );
    assert!(
        out.failures.len() <= MAX_FAILED,
        "{} failed requests (at most {MAX_FAILED}): {:?}",
        out.failures.len(),
        out.failures
    );
    assert!(
        !by.contains_key("c"),
        "the drained instance got requests after the crash: {by:?}"
    );
    // a at 100, b at 25: b gets a fifth; far from the half it would get at the default weight.
    assert!(
        (0.1..0.3).contains(&share_b),
        "b's share since the crash is {share_b:.2}, its weight says 0.2: {by:?}"
    );
    assert!(
        out.answers.len() as f64 >= RATE * (end.as_secs_f64() - 1.0),
        "the load kept its rate: {} answers in {end:?}",
        out.answers.len()
    );
    let status = amb.stop().await;
    assert!(status.success(), "{status}\n{log}");
}

#[tokio::test]
async fn a_killed_worker_costs_at_most_ten_requests_and_keeps_the_runtime_state() {
    if !require(Needs::Haproxy) {
        return;
    }
    crash(Fault::Worker, false).await;
}

#[tokio::test]
async fn a_killed_master_costs_at_most_ten_requests_and_keeps_the_runtime_state() {
    if !require(Needs::Haproxy) {
        return;
    }
    crash(Fault::Master, false).await;
}

#[tokio::test]
async fn a_killed_worker_beside_names_that_never_resolve_costs_at_most_ten_requests() {
    if !require(Needs::Haproxy) {
        return;
    }
    crash(Fault::Worker, true).await;
}

#[tokio::test]
async fn a_killed_master_beside_names_that_never_resolve_costs_at_most_ten_requests() {
    if !require(Needs::Haproxy) {
        return;
    }
    crash(Fault::Master, true).await;
}

/// An HAProxy taken over from a killed ambassador runs on the sockets that ambassador bound
/// (its master keeps them): once it dies, the new ambassador binds sockets of its own, and the
/// HAProxy after that one is covered like any other.
#[tokio::test]
async fn after_a_takeover_a_killed_haproxy_is_replaced_and_then_covered() {
    if !require(Needs::Haproxy) {
        return;
    }
    let dir = TestDirectory::start(&[]).await;
    let g = Greeting::start("1", "a").await;
    dir.client
        .register("web", "a", &spec(g.addr, None))
        .await
        .expect("registering");
    let mut amb = TestAmbassador::start(&dir.url, &["web"], &[]).await;
    let url = format!("{}/greeting", amb.url("web"));
    let c = reqwest::Client::new();
    eventually(Duration::from_secs(10), "traffic", || async {
        baker_tests::load::greet(&c, &url).await.ok()
    })
    .await;
    amb.proc.kill9();
    amb.respawn().await;
    amb.proc
        .wait_for_log("took over the HAProxy", Duration::from_secs(10))
        .await;
    // The taken-over HAProxy dies: a new one starts on the ambassador's own sockets.
    kill(Pid::from_raw(target(&amb, Fault::Master)), Signal::SIGKILL).expect("SIGKILL");
    amb.proc
        .wait_for_log("HAProxy is running again", Duration::from_secs(10))
        .await;
    let cfg = std::fs::read_to_string(amb.run_dir().join("haproxy.cfg")).expect("haproxy.cfg");
    assert!(cfg.contains("bind fd@"), "{cfg}");
    // And that one is covered: its worker killed under load costs at most a request per
    // connection.
    let load = Paced::start(&url, RATE, CONNS);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let killed = load.elapsed();
    kill(Pid::from_raw(target(&amb, Fault::Worker)), Signal::SIGKILL).expect("SIGKILL");
    eventually(Duration::from_secs(10), "a second restart", || async {
        (amb.proc
            .log_text()
            .matches("HAProxy is running again")
            .count()
            == 2)
            .then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let end = load.elapsed();
    let out = load.finish().await;
    let (gap, _) = out.longest_gap(killed, end);
    eprintln!(
        "after a takeover, worker SIGKILLed: {} failed, longest gap {gap:?}",
        out.failures.len()
    );
    assert!(
        out.failures.len() <= MAX_FAILED,
        "{} failed requests (at most {MAX_FAILED}): {:?}",
        out.failures.len(),
        out.failures
    );
    let status = amb.stop().await;
    assert!(status.success(), "{status}\n{}", amb.proc.log_text());
}
