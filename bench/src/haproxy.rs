//! HAProxy on its own: the hand-written static configuration that is the request path's floor,
//! and reading the reload count from a master socket.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use baker_tests::Proc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

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
    let text = master_command(socket, "show proc").await?;
    parse_master_reloads(&text).with_context(|| format!("reading `show proc`: {text:?}"))
}

/// Sends one command to a master CLI socket (it answers after the client half-closes).
pub async fn master_command(socket: &Path, cmd: &str) -> anyhow::Result<String> {
    let fut = async {
        let mut s = tokio::net::UnixStream::connect(socket)
            .await
            .with_context(|| format!("connecting to {}", socket.display()))?;
        s.write_all(format!("{cmd}\n").as_bytes()).await?;
        s.shutdown().await?;
        let mut out = String::new();
        s.read_to_string(&mut out).await?;
        anyhow::Ok(out)
    };
    tokio::time::timeout(Duration::from_secs(5), fut)
        .await
        .context("the master socket did not answer within 5 s")?
}

fn parse_master_reloads(text: &str) -> Option<u64> {
    text.lines()
        .map(str::split_whitespace)
        .find_map(|mut cols| {
            let _pid = cols.next()?;
            (cols.next()? == "master").then_some(())?;
            cols.next()?.parse().ok()
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_master_reload_count() {
        let text = "#<PID>          <type>          <reloads>       <uptime>        <version>
4242            master          7 [failed: 0]   0d00h01m02s     2.6.12-1+deb12u4
# workers
4300            worker          0               0d00h00m10s     2.6.12-1+deb12u4
# old workers
4290            worker          1               0d00h00m20s     2.6.12-1+deb12u4
";
        assert_eq!(parse_master_reloads(text), Some(7));
        assert_eq!(parse_master_reloads("Unknown command.\n"), None);
    }

    #[test]
    fn static_config_passes_haproxy_check() {
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
        let out = std::process::Command::new(haproxy)
            .args(["-c", "-f"])
            .arg(&cfg)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
