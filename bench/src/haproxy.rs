//! HAProxy on its own: the hand-written static configuration that is the request path's floor,
//! and reading the reload count from a master socket.

use std::net::SocketAddr;
use std::path::Path;

use anyhow::Context;
use baker_ambassador::runtime_api::Socket;
use baker_tests::Proc;

/// A static configuration with the ambassador's default template settings (global, defaults,
/// retry policy, server options) minus everything dynamic: no runtime API socket, no server
/// state file, one fixed server.
pub fn static_config(bind: SocketAddr, server: SocketAddr) -> String {
    format!(
        "global
    log stderr format raw local0 notice
    hard-stop-after 10000ms

defaults
    mode http
    log global
    option dontlognull
    timeout connect 500ms
    timeout client 1m
    timeout server 1m
    timeout http-request 10s
    timeout http-keep-alive 10s
    timeout queue 5s
    retries 3
    option redispatch 1

frontend greeting
    mode http
    bind {bind}
    default_backend greeting

backend greeting
    mode http
    balance roundrobin
    retry-on conn-failure empty-response response-timeout
    http-request disable-l7-retry if !METH_GET !METH_HEAD !METH_OPTIONS
    server s1 {server} weight 100 check inter 1h fastinter 1s downinter 1s rise 2 fall 1 observe layer7 error-limit 5 on-error mark-down
"
    )
}

/// The ambassador's `rendered` file made to run on its own, beside the ambassador: `service`'s
/// frontend listens on `bind` instead of the ambassador's socket, every other listener on a
/// free port, and the sockets and state files live under `dir`. Everything else (defaults,
/// backends, servers, rules) is left as rendered.
pub fn standalone_copy(rendered: &str, service: &str, bind: SocketAddr, dir: &Path) -> String {
    let mut section = String::new();
    let mut out = String::new();
    for line in rendered.lines() {
        let trimmed = line.trim_start();
        if !line.starts_with(' ') && !line.is_empty() {
            section = line.trim().to_owned();
        }
        let replaced = if let Some(rest) = trimmed.strip_prefix("bind ") {
            let addr = if section == format!("frontend {service}") {
                bind
            } else {
                SocketAddr::from(([127, 0, 0, 1], baker_tests::free_port()))
            };
            let options = rest.split_once(' ').map_or("", |(_, o)| o);
            format!("    bind {addr} {options}")
        } else if trimmed.starts_with("stats socket ") {
            format!(
                "    stats socket {}/admin.sock mode 600 level admin",
                dir.display()
            )
        } else if trimmed.starts_with("server-state-file ") {
            format!("    server-state-file {}/state", dir.display())
        } else {
            line.to_owned()
        };
        out.push_str(replaced.trim_end());
        out.push('\n');
    }
    out
}

/// Starts HAProxy in master-worker mode on `cfg`.
pub fn spawn_static(haproxy: &Path, cfg: &Path) -> Proc {
    Proc::spawn(
        "haproxy-static",
        haproxy,
        &["-W", "-db", "-f", &cfg.display().to_string()],
        &[],
    )
}

/// The master's reload count: the `<reloads>` column of the master line of `show proc`.
pub async fn master_reloads(socket: &Path) -> anyhow::Result<u64> {
    let info = Socket::new(socket)
        .proc_info()
        .await
        .context("reading `show proc` from the master socket")?;
    Ok(info.reloads)
}

#[cfg(test)]
mod tests {
    use super::*;
    use baker_ambassador::haproxy::Haproxy;
    use baker_ambassador::reaper::Reaper;

    #[test]
    fn a_standalone_copy_listens_on_addresses_and_keeps_everything_else() {
        let rendered = "global\n    stats socket /run/a/admin.sock mode 600 level admin\n    \
            server-state-file /run/a/state\n\nfrontend greeting\n    mode http\n    bind fd@7\n    \
            default_backend greeting\n\nbackend greeting\n    server s1 127.0.0.1:9 weight 100\n\n\
            frontend baker:admin\n    bind fd@8\n";
        let dir = Path::new("/tmp/copy");
        let copy = standalone_copy(rendered, "greeting", "127.0.0.1:4000".parse().unwrap(), dir);
        assert!(copy.contains("frontend greeting\n    mode http\n    bind 127.0.0.1:4000\n"));
        assert!(!copy.contains("fd@"), "{copy}");
        assert!(copy.contains("stats socket /tmp/copy/admin.sock mode 600 level admin"));
        assert!(copy.contains("server-state-file /tmp/copy/state"));
        assert!(copy.contains("    server s1 127.0.0.1:9 weight 100\n"));
    }

    #[tokio::test]
    async fn static_config_passes_haproxy_check() {
        let Some(haproxy) = ["/usr/sbin/haproxy", "/usr/local/sbin/haproxy"]
            .into_iter()
            .find(|p| Path::new(p).exists())
        else {
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("h.cfg");
        std::fs::write(
            &cfg,
            static_config(
                "127.0.0.1:1".parse().unwrap(),
                "127.0.0.1:2".parse().unwrap(),
            ),
        )
        .unwrap();
        let reaper = Reaper::start().unwrap();
        let check = Haproxy::new(haproxy.into(), dir.path(), reaper)
            .check(&cfg)
            .await;
        assert!(check.is_ok(), "{check:?}");
    }
}
