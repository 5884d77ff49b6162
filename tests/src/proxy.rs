//! An HTTP/1.1 proxy in front of the directory that can lose one line of a watch stream, as a
//! faulty path would, so that tests can check that watchers notice the gap and resync.
//!
//! [`LineDropProxy`] relays every request and response unchanged (keep-alive connections
//! included), except that, once armed with [`LineDropProxy::drop_next_line_with`], it leaves
//! out of a watch stream (`GET /v1/watch...`, chunked NDJSON) the next event line that contains
//! the given text, once. Snapshot lines are never dropped.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// A running proxy; it stops when dropped.
pub struct LineDropProxy {
    /// Where it listens.
    pub addr: SocketAddr,
    /// `http://<addr>`, to give a client in place of the directory's.
    pub url: String,
    state: Arc<State>,
    task: JoinHandle<()>,
}

#[derive(Default)]
struct State {
    /// The text of the next watch line to drop, when armed.
    armed: Mutex<Option<String>>,
    dropped: Mutex<Vec<String>>,
    watches: AtomicUsize,
}

impl State {
    /// Whether to leave `line` out, disarming when it does.
    fn drops(&self, line: &[u8]) -> bool {
        let text = String::from_utf8_lossy(line);
        if text.starts_with("{\"type\":\"snapshot\"") {
            return false;
        }
        let mut armed = self.armed.lock().unwrap();
        if armed.as_deref().is_some_and(|needle| text.contains(needle)) {
            *armed = None;
            self.dropped
                .lock()
                .unwrap()
                .push(text.trim_end().to_owned());
            return true;
        }
        false
    }
}

impl LineDropProxy {
    /// A proxy on `127.0.0.1:0` relaying to `upstream`.
    pub async fn start(upstream: SocketAddr) -> LineDropProxy {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding the proxy");
        let addr = listener.local_addr().expect("the proxy's address");
        let state = Arc::new(State::default());
        let task = {
            let state = state.clone();
            tokio::spawn(async move {
                while let Ok((client, _)) = listener.accept().await {
                    let state = state.clone();
                    tokio::spawn(async move {
                        // A connection ends when either side closes it.
                        let _ = relay(client, upstream, state).await;
                    });
                }
            })
        };
        LineDropProxy {
            addr,
            url: format!("http://{addr}"),
            state,
            task,
        }
    }

    /// Drops the next watch line (not a snapshot) that contains `needle`, once.
    pub fn drop_next_line_with(&self, needle: &str) {
        *self.state.armed.lock().unwrap() = Some(needle.to_owned());
    }

    /// The lines dropped so far.
    pub fn dropped(&self) -> Vec<String> {
        self.state.dropped.lock().unwrap().clone()
    }

    /// How many watch requests went through.
    pub fn watches(&self) -> usize {
        self.state.watches.load(Ordering::Relaxed)
    }
}

impl Drop for LineDropProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One side of a connection, read through a buffer.
struct Side {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Side {
    /// Reads more into the buffer; `false` at the end of the stream.
    async fn fill(&mut self) -> std::io::Result<bool> {
        let mut chunk = [0u8; 16 * 1024];
        let n = self.stream.read(&mut chunk).await?;
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(n > 0)
    }

    /// Everything up to and including `delim`; `None` if the stream ends first.
    async fn until(&mut self, delim: &[u8]) -> std::io::Result<Option<Vec<u8>>> {
        loop {
            if let Some(pos) = self.buf.windows(delim.len()).position(|w| w == delim) {
                return Ok(Some(self.buf.drain(..pos + delim.len()).collect()));
            }
            if !self.fill().await? {
                return Ok(None);
            }
        }
    }

    /// Exactly `n` bytes.
    async fn exactly(&mut self, n: usize) -> std::io::Result<Vec<u8>> {
        while self.buf.len() < n {
            if !self.fill().await? {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
        }
        Ok(self.buf.drain(..n).collect())
    }
}

/// The value of header `name` in an HTTP head, lowercased.
fn header(head: &str, name: &str) -> Option<String> {
    head.lines().skip(1).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case(name)
            .then(|| v.trim().to_ascii_lowercase())
    })
}

fn broken(what: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_owned())
}

/// Relays one client connection, request after request.
async fn relay(client: TcpStream, upstream: SocketAddr, state: Arc<State>) -> std::io::Result<()> {
    let mut client = Side {
        stream: client,
        buf: Vec::new(),
    };
    let mut server = Side {
        stream: TcpStream::connect(upstream).await?,
        buf: Vec::new(),
    };
    loop {
        let Some(head) = client.until(b"\r\n\r\n").await? else {
            return Ok(());
        };
        let text = String::from_utf8_lossy(&head).into_owned();
        let mut first = text.split_whitespace();
        let (method, path) = (first.next().unwrap_or(""), first.next().unwrap_or(""));
        if header(&text, "transfer-encoding").is_some() {
            return Err(broken("a chunked request body"));
        }
        let length: usize = header(&text, "content-length").map_or(Ok(0), |l| {
            l.parse().map_err(|_| broken("a bad content-length"))
        })?;
        let body = client.exactly(length).await?;
        server.stream.write_all(&head).await?;
        server.stream.write_all(&body).await?;
        let watch = method == "GET" && path.starts_with("/v1/watch");
        if watch {
            state.watches.fetch_add(1, Ordering::Relaxed);
        }

        let head = server
            .until(b"\r\n\r\n")
            .await?
            .ok_or_else(|| broken("no response"))?;
        client.stream.write_all(&head).await?;
        let text = String::from_utf8_lossy(&head).into_owned();
        let status: u16 = text
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        if method == "HEAD" || status < 200 || status == 204 || status == 304 {
            continue;
        }
        if header(&text, "transfer-encoding").is_some_and(|t| t.contains("chunked")) {
            relay_chunks(&mut server, &mut client.stream, watch.then_some(&*state)).await?;
        } else if let Some(length) = header(&text, "content-length") {
            let length: usize = length.parse().map_err(|_| broken("a bad content-length"))?;
            let body = server.exactly(length).await?;
            client.stream.write_all(&body).await?;
        } else {
            // The body runs to the end of the connection.
            client.stream.write_all(&server.buf).await?;
            server.buf.clear();
            while server.fill().await? {
                client.stream.write_all(&server.buf).await?;
                server.buf.clear();
            }
            return Ok(());
        }
    }
}

/// Relays a chunked body. For a watch (`lines` given), relays it line by line, one chunk per
/// line, leaving out the line `lines` drops.
async fn relay_chunks(
    server: &mut Side,
    client: &mut TcpStream,
    lines: Option<&State>,
) -> std::io::Result<()> {
    let mut pending: Vec<u8> = Vec::new();
    loop {
        let size = server
            .until(b"\r\n")
            .await?
            .ok_or_else(|| broken("a body cut short"))?;
        let size = String::from_utf8_lossy(&size);
        let size = size.trim().split(';').next().unwrap_or("");
        let size = usize::from_str_radix(size, 16).map_err(|_| broken("a bad chunk size"))?;
        if size == 0 {
            // Trailers, up to an empty line.
            while server.until(b"\r\n").await?.is_some_and(|l| l != b"\r\n") {}
            client.write_all(b"0\r\n\r\n").await?;
            return Ok(());
        }
        let data = server.exactly(size).await?;
        server.exactly(2).await?;
        let Some(state) = lines else {
            write_chunk(client, &data).await?;
            continue;
        };
        pending.extend_from_slice(&data);
        while let Some(pos) = pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=pos).collect();
            if !state.drops(&line) {
                write_chunk(client, &line).await?;
            }
        }
    }
}

async fn write_chunk(client: &mut TcpStream, data: &[u8]) -> std::io::Result<()> {
    let mut out = format!("{:x}\r\n", data.len()).into_bytes();
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
    client.write_all(&out).await
}
