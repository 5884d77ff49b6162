//! `baker-probe`: the health probe of Baker's images.
//!
//! The images are built `FROM scratch`, with no shell and no curl, so a Docker `HEALTHCHECK`
//! needs a program of its own. This one has no dependencies beyond `std`, stays small, and does
//! one thing: `baker-probe http://127.0.0.1:8080/health` exits 0 when the answer's status is
//! 2xx, `baker-probe tcp://127.0.0.1:8000` exits 0 when the port accepts a connection, and any
//! other outcome exits 1 with one line on stderr saying why (Docker shows it in
//! `docker inspect --format '{{json .State.Health}}'`).
//!
//! - [`Target`]: the parsed URL ([`Target::parse`]).
//! - [`status_code`]: reads the status of an HTTP response's first line.
//! - [`probe`]: the I/O, under one deadline.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

/// Variable naming the URL when no argument is given (so `docker run -e` can retarget an image's
/// `HEALTHCHECK`, which cannot be changed from the command line without a shell in the image).
pub const URL_VAR: &str = "HEALTHCHECK_URL";

/// What to probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// `http://host:port/path`: GET the path, expect a 2xx status.
    Http {
        host: String,
        port: u16,
        path: String,
    },
    /// `tcp://host:port`: expect the connection to be accepted.
    Tcp { host: String, port: u16 },
}

impl Target {
    /// Parses `http://host[:port][/path]` (port 80 by default) or `tcp://host:port`.
    pub fn parse(url: &str) -> Result<Target, String> {
        let (scheme, rest) = url.split_once("://").ok_or_else(|| {
            format!("{url:?} is not a URL: expected http://host:port/path or tcp://host:port")
        })?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let (host, port) = split_authority(authority)
            .ok_or_else(|| format!("{url:?}: cannot read host and port from {authority:?}"))?;
        match (scheme, port) {
            ("http", port) => Ok(Target::Http {
                host,
                port: port.unwrap_or(80),
                path: path.to_owned(),
            }),
            ("tcp", Some(port)) if path == "/" => Ok(Target::Tcp { host, port }),
            ("tcp", _) => Err(format!(
                "{url:?}: a tcp URL is tcp://host:port, with a port and no path"
            )),
            (other, _) => Err(format!(
                "{url:?}: unsupported scheme {other:?} (use http or tcp)"
            )),
        }
    }

    fn host_port(&self) -> (&str, u16) {
        match self {
            Target::Http { host, port, .. } | Target::Tcp { host, port } => (host, *port),
        }
    }
}

/// Splits `host`, `host:port`, `[v6]` or `[v6]:port`.
fn split_authority(authority: &str) -> Option<(String, Option<u16>)> {
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (h, rest) = v6.split_once(']')?;
        match rest {
            "" => (h, None),
            p => (h, Some(p.strip_prefix(':')?)),
        }
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    if host.is_empty() || host.contains(['@', ' ', '/']) {
        return None;
    }
    let port = match port {
        None => None,
        Some(p) => Some(p.parse::<u16>().ok().filter(|p| *p != 0)?),
    };
    Some((host.to_owned(), port))
}

/// The status code of a response whose head starts with `HTTP/1.x NNN ...`.
pub fn status_code(head: &[u8]) -> Option<u16> {
    let line_end = head.iter().position(|b| *b == b'\n')?;
    let line = std::str::from_utf8(&head[..line_end]).ok()?.trim_end();
    let mut parts = line.split(' ');
    let version = parts.next()?;
    if !version.starts_with("HTTP/1.") {
        return None;
    }
    let code = parts.next()?;
    if code.len() != 3 {
        return None;
    }
    code.parse().ok()
}

/// Why a probe failed.
#[derive(Debug)]
pub enum Failure {
    /// The target could not be reached or did not answer in time.
    Io(String),
    /// It answered with a status outside 2xx.
    Status(u16),
    /// It answered something that is not HTTP.
    Garbled,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Io(e) => f.write_str(e),
            Failure::Status(s) => write!(f, "answered with status {s}"),
            Failure::Garbled => f.write_str("answered with something that is not an HTTP response"),
        }
    }
}

/// Probes `target`, giving up after `timeout`; returns the status code for HTTP (0 for TCP).
pub fn probe(target: &Target, timeout: Duration) -> Result<u16, Failure> {
    let deadline = Instant::now() + timeout;
    let io = |what: &str, e: io::Error| Failure::Io(format!("{what}: {e}"));
    let (host, port) = target.host_port();
    let addrs: Vec<SocketAddr> = (host, port)
        .to_socket_addrs()
        .map_err(|e| io(&format!("resolving {host}"), e))?
        .collect();
    let mut last = Failure::Io(format!("{host} has no address"));
    let mut stream = None;
    for addr in addrs {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        match TcpStream::connect_timeout(&addr, left) {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(e) => last = io(&format!("connecting to {addr}"), e),
        }
    }
    let mut stream = stream.ok_or(last)?;
    let Target::Http { host, path, .. } = target else {
        return Ok(0);
    };
    let left =
        |_: ()| Some(deadline.saturating_duration_since(Instant::now())).filter(|d| !d.is_zero());
    stream
        .set_write_timeout(left(()))
        .and_then(|_| stream.set_read_timeout(left(())))
        .map_err(|e| io("setting timeouts", e))?;
    let host_header = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {host_header}\r\nUser-Agent: baker-probe\r\n\
         Accept: */*\r\nConnection: close\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .map_err(|e| io("sending the request", e))?;
    let mut head = Vec::with_capacity(256);
    let mut buf = [0u8; 256];
    while !head.contains(&b'\n') && head.len() < 4096 {
        let n = stream
            .read(&mut buf)
            .map_err(|e| io("reading the answer", e))?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    match status_code(&head) {
        Some(code) if (200..300).contains(&code) => Ok(code),
        Some(code) => Err(Failure::Status(code)),
        None => Err(Failure::Garbled),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn parses_urls() {
        assert_eq!(
            Target::parse("http://127.0.0.1:8080/health").unwrap(),
            Target::Http {
                host: "127.0.0.1".into(),
                port: 8080,
                path: "/health".into()
            }
        );
        assert_eq!(
            Target::parse("http://directory").unwrap(),
            Target::Http {
                host: "directory".into(),
                port: 80,
                path: "/".into()
            }
        );
        assert_eq!(
            Target::parse("tcp://[::1]:8000").unwrap(),
            Target::Tcp {
                host: "::1".into(),
                port: 8000
            }
        );
        for bad in [
            "127.0.0.1:80",
            "https://x/",
            "tcp://x",
            "tcp://x:1/path",
            "http://:80/",
            "http://x:0/",
            "http://x:99999/",
            "http://u@x/",
        ] {
            assert!(Target::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn reads_status_lines() {
        assert_eq!(status_code(b"HTTP/1.1 200 OK\r\n"), Some(200));
        assert_eq!(
            status_code(b"HTTP/1.0 503 Service Unavailable\r\nx"),
            Some(503)
        );
        assert_eq!(status_code(b"HTTP/1.1 204\r\n"), Some(204));
        assert_eq!(status_code(b"HTTP/1.1 200 OK"), None);
        assert_eq!(status_code(b"SSH-2.0-x\r\n"), None);
        assert_eq!(status_code(b"HTTP/1.1 20 OK\r\n"), None);
    }

    fn serve_once(answer: &'static [u8]) -> u16 {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut buf = [0u8; 1024];
            let mut got = Vec::new();
            while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = s.read(&mut buf).unwrap();
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
            }
            assert!(got.starts_with(b"GET /health HTTP/1.1\r\n"));
            s.write_all(answer).unwrap();
        });
        port
    }

    #[test]
    fn probes_real_sockets() {
        let t = Duration::from_secs(5);
        let ok = serve_once(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n");
        let url = format!("http://127.0.0.1:{ok}/health");
        assert_eq!(probe(&Target::parse(&url).unwrap(), t).unwrap(), 200);
        let bad = serve_once(b"HTTP/1.1 503 Service Unavailable\r\n\r\n");
        let url = format!("http://127.0.0.1:{bad}/health");
        assert!(matches!(
            probe(&Target::parse(&url).unwrap(), t),
            Err(Failure::Status(503))
        ));
        // Nothing listens on a port just released.
        let closed = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let url = format!("tcp://127.0.0.1:{closed}");
        assert!(matches!(
            probe(&Target::parse(&url).unwrap(), t),
            Err(Failure::Io(_))
        ));
    }

    #[test]
    fn hanging_server_times_out() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let url = format!("http://127.0.0.1:{port}/health");
        let started = Instant::now();
        let r = probe(&Target::parse(&url).unwrap(), Duration::from_millis(300));
        assert!(matches!(r, Err(Failure::Io(_))), "{r:?}");
        assert!(started.elapsed() < Duration::from_secs(3));
        drop(l);
    }
}
