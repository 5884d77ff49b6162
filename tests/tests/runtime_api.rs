//! HAProxy's runtime API client against a real HAProxy: one connection per series of commands,
//! refused commands reported with HAProxy's words, unsafe lines never sent.

use std::net::IpAddr;
use std::time::Duration;

use baker_ambassador::runtime_api::{AdminState, ApiCommand, ApiError, Socket};
use baker_tests::{eventually, free_port, haproxy_bin, require, Needs, Proc};

/// HAProxy with an admin socket and one backend holding server `a` at weight 10.
async fn haproxy(dir: &std::path::Path) -> (Proc, Socket) {
    let sock = dir.join("admin.sock");
    let cfg = dir.join("haproxy.cfg");
    std::fs::write(
        &cfg,
        format!(
            "global
    stats socket {} level admin
defaults
    mode http
    timeout connect 1s
    timeout client 5s
    timeout server 5s
frontend fe
    bind 127.0.0.1:{}
    default_backend be
backend be
    balance roundrobin
    server a 127.0.0.1:9 weight 10
",
            sock.display(),
            free_port()
        ),
    )
    .unwrap();
    let proc = Proc::spawn(
        "haproxy",
        haproxy_bin(),
        &["-db", "-f", &cfg.display().to_string()],
        &[],
    );
    let socket = Socket::new(&sock);
    eventually(
        Duration::from_secs(10),
        "HAProxy's admin socket",
        || async { socket.servers_state().await.ok() },
    )
    .await;
    (proc, socket)
}

fn be(server: &str) -> (String, String) {
    ("be".to_owned(), server.to_owned())
}

#[tokio::test]
async fn a_session_runs_commands_and_reports_the_refused_one() {
    if !require(Needs::Haproxy) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (_haproxy, socket) = haproxy(dir.path()).await;
    let mut session = socket.session().await.unwrap();
    let running = session.servers_state().await.unwrap();
    assert_eq!(running["be"]["a"].weight, 10);

    let (backend, server) = be("a");
    session
        .run(&ApiCommand::SetWeight {
            backend: backend.clone(),
            server: server.clone(),
            weight: 20,
        })
        .await
        .unwrap();
    let (_, added) = be("b");
    session
        .run(&ApiCommand::AddServer {
            backend: backend.clone(),
            server: added.clone(),
            address: IpAddr::from([127, 0, 0, 1]),
            port: 10,
            weight: 5,
            options: String::new(),
        })
        .await
        .unwrap();
    session
        .run(&ApiCommand::EnableServer {
            backend: backend.clone(),
            server: added.clone(),
        })
        .await
        .unwrap();

    // A refusal names the command and carries HAProxy's answer; the session stays usable.
    let refused = ApiCommand::SetState {
        backend: backend.clone(),
        server: "nosuch".into(),
        state: AdminState::Drain,
    };
    match session.run(&refused).await {
        Err(ApiError::Refused { command, answer }) => {
            assert_eq!(command, "set server be/nosuch state drain");
            assert!(answer.contains("No such server"), "{answer}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    let err = session
        .run(&ApiCommand::DelServer {
            backend: backend.clone(),
            server: added.clone(),
        })
        .await
        .unwrap_err();
    assert!(err.is_refusal(), "{err}");
    assert!(err.to_string().contains("del server be/b"), "{err}");

    let running = session.servers_state().await.unwrap();
    assert_eq!(running["be"]["a"].weight, 20);
    assert_eq!(running["be"]["b"].weight, 5);
    assert!(!running["be"]["b"].maint);
    let sessions = session.sessions().await.unwrap();
    assert_eq!(sessions.get(&be("a")), Some(&0));
}

#[tokio::test]
async fn a_line_that_would_hold_two_commands_is_never_sent() {
    if !require(Needs::Haproxy) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (_haproxy, socket) = haproxy(dir.path()).await;
    let mut session = socket.session().await.unwrap();
    for server in [
        "a weight 1;set server be/a",
        "a weight 1\nset server be/a",
        "a\\;x",
    ] {
        let cmd = ApiCommand::SetWeight {
            backend: "be".into(),
            server: server.into(),
            weight: 2,
        };
        let err = session.run(&cmd).await.unwrap_err();
        assert!(matches!(err, ApiError::Unsafe { .. }), "{err}");
        assert!(matches!(
            socket.command(&cmd).await,
            Err(ApiError::Unsafe { .. })
        ));
    }
    let running = session.servers_state().await.unwrap();
    assert_eq!(running["be"]["a"].weight, 10, "nothing was sent");
}
