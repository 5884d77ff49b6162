//! One probe of the app: an HTTP GET of a path, or a TCP connect, under a timeout so that a
//! hung app counts as a failure and never stalls the registrar.

use baker_client::errors::chain;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use baker_client::model::printable;
use reqwest::StatusCode;

use crate::target::Target;

/// Most of a response body read when looking for `BAKER_CHECK_BODY`.
pub const MAX_BODY: usize = 64 * 1024;

/// What a probe does (`BAKER_CHECK`, `BAKER_CHECK_CODES`, `BAKER_CHECK_BODY`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    /// `GET <path>`; healthy when the status is in `codes` (any 2xx when empty) and the body
    /// contains `body`, if set.
    Http {
        path: String,
        codes: Vec<u16>,
        body: Option<String>,
    },
    /// A TCP connection that opens.
    Tcp,
}

/// The kind and path of a check, as `BAKER_CHECK` writes it: `http:/health` or `tcp`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckKind {
    Http(String),
    Tcp,
}

impl FromStr for CheckKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "tcp" {
            return Ok(CheckKind::Tcp);
        }
        if s == "http" {
            return Ok(CheckKind::Http("/health".into()));
        }
        let path = s
            .strip_prefix("http:")
            .ok_or("must be http:/<path> (such as http:/health) or tcp")?;
        if !path.starts_with('/') {
            return Err("the path must start with '/', as in http:/health".into());
        }
        if path.len() > 1024
            || path
                .chars()
                .any(|c| c.is_control() || c.is_whitespace() || c == '#' || !c.is_ascii())
        {
            return Err("the path may contain only printable ASCII without spaces or '#'".into());
        }
        Ok(CheckKind::Http(path.to_owned()))
    }
}

/// Parses `BAKER_CHECK_CODES`: `200,204` (each 100-599).
pub fn parse_codes(s: &str) -> Result<Vec<u16>, String> {
    let mut codes = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.parse::<u16>() {
            Ok(c) if (100..=599).contains(&c) => codes.push(c),
            _ => {
                return Err(format!(
                    "must be HTTP status codes (100-599) separated by commas, such as 200,204; {:?} is not one",
                    printable(part)
                ))
            }
        }
    }
    if codes.is_empty() {
        return Err("must name at least one status code, such as 200,204".into());
    }
    Ok(codes)
}

/// Why a probe failed.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("cannot connect: {0}")]
    Connect(#[source] std::io::Error),
    #[error("request failed: {0}")]
    Http(String),
    #[error("unhealthy status {0}")]
    Status(StatusCode),
    #[error("the response body does not contain {0:?}")]
    Body(String),
}

/// Probes one target.
#[derive(Debug, Clone)]
pub struct Prober {
    target: Target,
    check: Check,
    timeout: Duration,
    url: String,
    http: reqwest::Client,
}

impl Prober {
    pub fn new(target: Target, check: Check, timeout: Duration) -> Result<Self, reqwest::Error> {
        let url = match &check {
            Check::Http { path, .. } => format!("http://{}{path}", target.authority()),
            Check::Tcp => format!("tcp://{}", target.authority()),
        };
        let http = baker_client::tls::builder(None)
            .expect("the system's roots need no file")
            // A fresh connection each time: the probe also checks that the app accepts them.
            .pool_max_idle_per_host(0)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("baker-registrar/", env!("CARGO_PKG_VERSION")))
            .timeout(timeout)
            .build()?;
        Ok(Self {
            target,
            check,
            timeout,
            url,
            http,
        })
    }

    /// What is probed, for logs: `http://10.0.0.5:8080/health` or `tcp://10.0.0.5:8080`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Runs one probe; the whole of it (resolving, connecting, the answer, the body) has to fit
    /// in the timeout.
    pub async fn probe(&self) -> Result<(), ProbeError> {
        match tokio::time::timeout(self.timeout, self.probe_untimed()).await {
            Ok(r) => r,
            Err(_) => Err(ProbeError::Timeout(self.timeout)),
        }
    }

    async fn probe_untimed(&self) -> Result<(), ProbeError> {
        match &self.check {
            Check::Tcp => {
                tokio::net::TcpStream::connect((self.target.host.as_str(), self.target.port))
                    .await
                    .map_err(ProbeError::Connect)?;
                Ok(())
            }
            Check::Http { codes, body, .. } => {
                let mut resp = self
                    .http
                    .get(&self.url)
                    .send()
                    .await
                    .map_err(|e| classify(&e, self.timeout))?;
                let status = resp.status();
                let healthy = if codes.is_empty() {
                    status.is_success()
                } else {
                    codes.contains(&status.as_u16())
                };
                if !healthy {
                    return Err(ProbeError::Status(status));
                }
                let Some(needle) = body else { return Ok(()) };
                let mut seen = Vec::new();
                while let Some(chunk) =
                    resp.chunk().await.map_err(|e| classify(&e, self.timeout))?
                {
                    seen.extend_from_slice(&chunk);
                    if contains(&seen, needle.as_bytes()) {
                        return Ok(());
                    }
                    if seen.len() >= MAX_BODY {
                        break;
                    }
                }
                Err(ProbeError::Body(needle.clone()))
            }
        }
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || haystack.windows(needle.len()).any(|w| w == needle)
}

/// Turns a client error into a short reason (the full chain is long and says little more).
fn classify(e: &reqwest::Error, timeout: Duration) -> ProbeError {
    if e.is_timeout() {
        return ProbeError::Timeout(timeout);
    }
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            return ProbeError::Connect(std::io::Error::new(io.kind(), io.to_string()));
        }
        source = s.source();
    }
    ProbeError::Http(chain(e))
}

impl fmt::Display for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Check::Tcp => f.write_str("tcp"),
            Check::Http { path, codes, body } => {
                write!(f, "http:{path}")?;
                if !codes.is_empty() {
                    let codes: Vec<String> = codes.iter().map(u16::to_string).collect();
                    write!(f, " (status {})", codes.join(","))?;
                }
                if let Some(b) = body {
                    write!(f, " (body contains {b:?})")?;
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    #[test]
    fn parses_check_kinds() {
        assert_eq!(
            "http:/health".parse(),
            Ok(CheckKind::Http("/health".into()))
        );
        assert_eq!(
            "http:/status?full=1".parse(),
            Ok(CheckKind::Http("/status?full=1".into()))
        );
        assert_eq!("http".parse(), Ok(CheckKind::Http("/health".into())));
        assert_eq!("tcp".parse(), Ok(CheckKind::Tcp));
        for bad in [
            "",
            "http:health",
            "https:/x",
            "udp",
            "http:/a b",
            "http:/a\nb",
            "http:/é",
        ] {
            assert!(bad.parse::<CheckKind>().is_err(), "{bad}");
        }
    }

    #[test]
    fn parses_codes() {
        assert_eq!(parse_codes("200,204").unwrap(), [200, 204]);
        assert_eq!(parse_codes(" 200 , 301 ,").unwrap(), [200, 301]);
        for bad in ["", ",", "2xx", "99", "600", "200;204"] {
            assert!(parse_codes(bad).is_err(), "{bad}");
        }
    }

    /// A one-shot HTTP server answering every connection with `response`, or never.
    async fn server(response: Option<&'static str>) -> Target {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            loop {
                let (mut conn, _) = listener.accept().await.unwrap();
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    let _ = conn.read(&mut buf).await;
                    match response {
                        Some(r) => {
                            let _ = conn.write_all(r.as_bytes()).await;
                        }
                        None => std::future::pending::<()>().await,
                    }
                });
            }
        });
        Target {
            scheme: crate::target::Scheme::Http,
            host: "127.0.0.1".into(),
            port,
        }
    }

    fn http(path: &str, codes: &[u16], body: Option<&str>) -> Check {
        Check::Http {
            path: path.into(),
            codes: codes.to_vec(),
            body: body.map(str::to_owned),
        }
    }

    const OK: &str = "HTTP/1.1 200 OK\r\ncontent-length: 9\r\nconnection: close\r\n\r\nstatus=ok";
    const NO_CONTENT: &str = "HTTP/1.1 204 No Content\r\nconnection: close\r\n\r\n";
    const FAIL: &str = "HTTP/1.1 503 Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";
    const MOVED: &str =
        "HTTP/1.1 302 Found\r\nlocation: /x\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";

    #[tokio::test]
    async fn http_status_and_body_rules() {
        let t = Duration::from_secs(2);
        let ok = server(Some(OK)).await;
        let p = |target: &Target, check| Prober::new(target.clone(), check, t).unwrap();
        p(&ok, http("/health", &[], None)).probe().await.unwrap();
        p(&ok, http("/health", &[], Some("status=ok")))
            .probe()
            .await
            .unwrap();
        let e = p(&ok, http("/health", &[], Some("ready")))
            .probe()
            .await
            .unwrap_err();
        assert!(matches!(e, ProbeError::Body(_)), "{e}");
        let e = p(&ok, http("/health", &[204], None))
            .probe()
            .await
            .unwrap_err();
        assert!(matches!(e, ProbeError::Status(s) if s == 200), "{e}");

        let nc = server(Some(NO_CONTENT)).await;
        p(&nc, http("/health", &[], None)).probe().await.unwrap();
        p(&nc, http("/health", &[200, 204], None))
            .probe()
            .await
            .unwrap();

        let fail = server(Some(FAIL)).await;
        let e = p(&fail, http("/health", &[], None))
            .probe()
            .await
            .unwrap_err();
        assert_eq!(e.to_string(), "unhealthy status 503 Service Unavailable");
        p(&fail, http("/health", &[503], None))
            .probe()
            .await
            .unwrap();

        let moved = server(Some(MOVED)).await;
        let e = p(&moved, http("/health", &[], None))
            .probe()
            .await
            .unwrap_err();
        assert!(
            matches!(e, ProbeError::Status(s) if s == 302),
            "redirects are not followed: {e}"
        );
    }

    #[tokio::test]
    async fn a_hung_app_times_out() {
        let hung = server(None).await;
        let timeout = Duration::from_millis(200);
        let started = std::time::Instant::now();
        let e = Prober::new(hung, http("/health", &[], None), timeout)
            .unwrap()
            .probe()
            .await
            .unwrap_err();
        assert!(matches!(e, ProbeError::Timeout(_)), "{e}");
        assert!(started.elapsed() < Duration::from_secs(1));
    }

    #[tokio::test]
    async fn tcp_and_refused() {
        let up = server(Some(OK)).await;
        let t = Duration::from_secs(1);
        Prober::new(up.clone(), Check::Tcp, t)
            .unwrap()
            .probe()
            .await
            .unwrap();
        // A port that was free a moment ago: nothing listens there.
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let down = Target { port, ..up };
        let e = Prober::new(down.clone(), Check::Tcp, t)
            .unwrap()
            .probe()
            .await
            .unwrap_err();
        assert!(matches!(e, ProbeError::Connect(_)), "{e}");
        let e = Prober::new(down, http("/health", &[], None), t)
            .unwrap()
            .probe()
            .await
            .unwrap_err();
        assert!(e.to_string().starts_with("cannot connect"), "{e}");
    }
}
