//! A system resolver that never answers, for a child process: a UDP socket on a loopback
//! address's port 53 that reads nothing, and a `resolv.conf` naming it, mounted over
//! `/etc/resolv.conf` in a private mount namespace (`unshare`) around the child. Every DNS
//! lookup the child makes then waits for the resolver's timeout, as behind a dead DNS server.

use std::net::UdpSocket;
use std::path::PathBuf;
use std::process::Command;

/// A resolver that never answers; keep it alive as long as the child runs.
pub struct SilentResolver {
    _socket: UdpSocket,
    dir: tempfile::TempDir,
}

impl SilentResolver {
    /// Binds the silent resolver and writes its `resolv.conf`.
    ///
    /// Returns `None` only when the user opted out (`BAKER_TEST_SKIP=silent-dns`); panics,
    /// saying what is missing, when the machine cannot provide it (binding port 53 needs root
    /// or `CAP_NET_BIND_SERVICE`; the mount needs unprivileged user namespaces and `unshare`).
    pub fn start() -> Option<SilentResolver> {
        let skip = std::env::var("BAKER_TEST_SKIP").unwrap_or_default();
        if skip.split(',').any(|s| s.trim() == "silent-dns") {
            eprintln!("BAKER_TEST_SKIP names silent-dns: not running this test");
            return None;
        }
        // A loopback address of its own, so that tests running at once do not collide.
        let pid = std::process::id();
        let ip = format!("127.53.{}.{}", (pid >> 8) % 250 + 1, pid % 250 + 1);
        let socket = UdpSocket::bind((ip.as_str(), 53)).unwrap_or_else(|e| {
            missing(format!(
                "binding UDP {ip}:53 failed ({e}): run the tests as root or with CAP_NET_BIND_SERVICE"
            ))
        });
        let ok = Command::new("unshare")
            .args(["-Urm", "true"])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !ok {
            missing("`unshare -Urm` (user and mount namespaces) does not work here".into());
        }
        let dir = tempfile::Builder::new()
            .prefix("baker-dns-")
            .tempdir()
            .expect("creating a directory for resolv.conf");
        std::fs::write(
            dir.path().join("resolv.conf"),
            format!("nameserver {ip}\noptions timeout:5 attempts:2\n"),
        )
        .expect("writing resolv.conf");
        Some(SilentResolver {
            _socket: socket,
            dir,
        })
    }

    fn conf(&self) -> PathBuf {
        self.dir.path().join("resolv.conf")
    }

    /// The program and leading arguments that run a command with this resolver: pass the
    /// command's program and arguments after them.
    pub fn wrapper(&self) -> Vec<String> {
        vec![
            "unshare".into(),
            "-Urm".into(),
            "sh".into(),
            "-c".into(),
            r#"mount --bind "$0" /etc/resolv.conf && exec "$@""#.into(),
            self.conf().display().to_string(),
        ]
    }
}

fn missing(what: String) -> ! {
    panic!(
        "this test needs a DNS resolver that never answers, and {what}; \
         set BAKER_TEST_SKIP=silent-dns to opt out of the tests that need it"
    )
}
