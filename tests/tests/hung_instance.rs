//! End-to-end: one of three instances stops answering (SIGSTOP) under a paced load through a
//! real ambassador and HAProxy, and the clients barely notice.

use std::net::SocketAddr;
use std::time::Duration;

use baker_client::model::InstanceSpec;
use baker_tests::ambassador::TestAmbassador;
use baker_tests::directory::TestDirectory;
use baker_tests::greeting::Greeting;
use baker_tests::load::Paced;
use baker_tests::{eventually, require, Needs};
use nix::sys::signal::Signal;

/// Requests per second, and the connections they are sent over (a client's pool).
const RATE: f64 = 400.0;
const CONNS: usize = 32;
/// The width of the windows throughput is counted in.
const WINDOW: Duration = Duration::from_millis(500);

fn spec(addr: SocketAddr) -> InstanceSpec {
    InstanceSpec {
        address: addr.ip().to_string(),
        port: u64::from(addr.port()),
        version: None,
        weight: None,
        tags: vec![],
        ttl_ms: Some(60_000),
        zone: None,
    }
}

#[tokio::test]
async fn a_stopped_instance_costs_milliseconds_of_throughput() {
    if !require(Needs::Haproxy) {
        return;
    }
    let dir = TestDirectory::start(&[]).await;
    let mut gs = Vec::new();
    for id in ["a", "b", "c"] {
        let g = Greeting::start("1", id).await;
        dir.client
            .register("web", id, &spec(g.addr))
            .await
            .expect("registering");
        gs.push(g);
    }
    let amb = TestAmbassador::start(&dir.url, &["web"], &[]).await;
    eventually(Duration::from_secs(10), "three servers", || async {
        (amb.servers("web").len() == 3).then_some(())
    })
    .await;
    let load = Paced::start(&format!("{}/greeting", amb.url("web")), RATE, CONNS);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let stopped = load.elapsed();
    gs[2].proc.signal(Signal::SIGSTOP);
    let mut marked_down = None;
    while load.elapsed() < stopped + Duration::from_secs(5) {
        if marked_down.is_none() && amb.op_states("web").get("c") == Some(&"down") {
            marked_down = Some(load.elapsed() - stopped);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    gs[2].proc.signal(Signal::SIGCONT);
    let continued = load.elapsed();
    eventually(Duration::from_secs(5), "c up again", || async {
        (amb.op_states("web").get("c") == Some(&"up")).then_some(())
    })
    .await;
    let back_after = load.elapsed() - continued;
    // Past the longest wait of a request held by the stopped instance.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let end = load.elapsed();
    let out = load.finish().await;

    // The normal rate: the answers per window before the fault (after a second of warm-up).
    let warm = Duration::from_secs(1);
    let normal = out.answered_between(warm, stopped) as f64 * WINDOW.as_secs_f64()
        / (stopped - warm).as_secs_f64();
    let (worst, worst_at) = out.worst_window(WINDOW, warm, end);
    let (gap, gap_at) = out.longest_gap(stopped, end);
    eprintln!(
        "{} answered, {} failed; normal {normal:.0} answers per {WINDOW:?}; worst window {worst} \
         ({:.0} %) from {:+.3} s; longest gap {gap:?} from {:+.3} s (times from SIGSTOP); \
         marked down {marked_down:?} after SIGSTOP, up {back_after:?} after SIGCONT",
        out.answers.len(),
        out.failures.len(),
        100.0 * worst as f64 / normal,
        worst_at.as_secs_f64() - stopped.as_secs_f64(),
        gap_at.as_secs_f64() - stopped.as_secs_f64(),
    );
    for f in &out.failures {
        eprintln!("failed: {f}");
    }
    assert!(out.failures.len() <= 2, "{:?}", out.failures);
    assert!(
        worst as f64 >= normal / 2.0,
        "a {WINDOW:?} window had {worst} answers, normal is {normal:.0}"
    );
}
