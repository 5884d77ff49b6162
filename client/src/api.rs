//! The directory's HTTP client, used by the registrar, the ambassador, the CLI and the tests.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio_util::codec::{FramedRead, LinesCodec, LinesCodecError};
use tokio_util::io::StreamReader;

use crate::model::{
    ErrorBody, Instance, InstanceSpec, RouteResponse, RoutesResponse, ServiceResponse,
    ServicesResponse, WatchEvent,
};

/// Default directory address when neither a flag nor `BAKER_DIRECTORY` names one.
pub const DEFAULT_DIRECTORY: &str = "http://127.0.0.1:7700";
/// A watch stream that delivers nothing (not even a ping) for this long is considered dead.
pub const WATCH_IDLE_TIMEOUT: Duration = Duration::from_secs(15);
/// Longest line accepted on the watch stream.
const MAX_WATCH_LINE: usize = 64 * 1024 * 1024;

/// What can go wrong talking to the directory.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("directory address {0:?} is not an http:// URL")]
    BadUrl(String),
    #[error("the token {0}")]
    BadToken(&'static str),
    #[error("cannot reach the directory at {url}")]
    Unreachable {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("the directory refused the request ({status}): {message}")]
    Refused { status: StatusCode, message: String },
    #[error("the directory sent a response that could not be read")]
    Decode(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("the watch stream went silent for {0:?}")]
    Idle(Duration),
    #[error("the watch stream ended")]
    Ended,
}

impl ClientError {
    /// The HTTP status, when the directory answered with an error.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            ClientError::Refused { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// Checks a bearer token: printable ASCII without spaces, what an `Authorization` header can
/// carry. The directory, the registrar, the ambassador and the CLI all apply this rule.
pub fn parse_token(token: &str) -> Result<String, &'static str> {
    if token.is_empty() {
        Err("must not be empty")
    } else if token.bytes().all(|b| b.is_ascii_graphic()) {
        Ok(token.to_owned())
    } else {
        Err("must be printable ASCII without spaces")
    }
}

/// A client of one directory. Cheap to clone.
#[derive(Debug, Clone)]
pub struct DirectoryClient {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

impl DirectoryClient {
    /// A client for `base` (`http://host:port`), sending `token` as a bearer token if given
    /// (an empty token is none; see [`parse_token`] for what a token may hold).
    pub fn new(base: &str, token: Option<String>) -> Result<Self, ClientError> {
        let base = base.trim_end_matches('/').to_owned();
        if !base.starts_with("http://") || reqwest::Url::parse(&base).is_err() {
            return Err(ClientError::BadUrl(base));
        }
        let token = token.filter(|t| !t.is_empty());
        if let Some(t) = &token {
            parse_token(t).map_err(ClientError::BadToken)?;
        }
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true)
            .pool_idle_timeout(Duration::from_secs(30))
            .build()
            .map_err(|e| ClientError::Unreachable {
                url: base.clone(),
                source: e,
            })?;
        Ok(Self { base, token, http })
    }

    /// The directory's base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    fn request(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        let mut req = self.http.request(method, format!("{}{}", self.base, path));
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        req
    }

    async fn send<T: DeserializeOwned>(
        &self,
        req: reqwest::RequestBuilder,
    ) -> Result<T, ClientError> {
        let resp = req
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .map_err(|e| ClientError::Unreachable {
                url: self.base.clone(),
                source: e,
            })?;
        let status = resp.status();
        let body = resp.bytes().await.map_err(|e| ClientError::Unreachable {
            url: self.base.clone(),
            source: e,
        })?;
        if !status.is_success() {
            let message = serde_json::from_slice::<ErrorBody>(&body)
                .map(|b| b.error)
                .unwrap_or_else(|_| String::from_utf8_lossy(&body).trim().to_owned());
            return Err(ClientError::Refused { status, message });
        }
        serde_json::from_slice(&body).map_err(|e| ClientError::Decode(Box::new(e)))
    }

    async fn send_json<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        self.send(self.request(method, path).json(body)).await
    }

    /// Registers an instance, or heartbeats it if already registered.
    pub async fn register(
        &self,
        service: &str,
        id: &str,
        spec: &InstanceSpec,
    ) -> Result<Instance, ClientError> {
        self.send_json(
            Method::PUT,
            &format!("/v1/services/{service}/instances/{id}"),
            spec,
        )
        .await
    }

    /// Deregisters an instance now. Deregistering an unknown instance is not an error.
    pub async fn deregister(&self, service: &str, id: &str) -> Result<(), ClientError> {
        let path = format!("/v1/services/{service}/instances/{id}");
        match self
            .send::<serde_json::Value>(self.request(Method::DELETE, &path))
            .await
        {
            Ok(_) => Ok(()),
            Err(ClientError::Refused {
                status: StatusCode::NOT_FOUND,
                ..
            }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Every service and its live instances.
    pub async fn services(&self) -> Result<ServicesResponse, ClientError> {
        self.send(self.request(Method::GET, "/v1/services")).await
    }

    /// One service's live instances and route.
    pub async fn service(&self, service: &str) -> Result<ServiceResponse, ClientError> {
        self.send(self.request(Method::GET, &format!("/v1/services/{service}")))
            .await
    }

    /// Every route.
    pub async fn routes(&self) -> Result<RoutesResponse, ClientError> {
        self.send(self.request(Method::GET, "/v1/routes")).await
    }

    /// Sets a service's canary split (`{"1": 90, "2": 10}`). The directory refuses (409) a
    /// route for a service that has never had a live instance: see
    /// [`set_route_forced`](Self::set_route_forced).
    pub async fn set_route(
        &self,
        service: &str,
        splits: &BTreeMap<String, u64>,
    ) -> Result<RouteResponse, ClientError> {
        self.send_json(Method::PUT, &format!("/v1/routes/{service}"), splits)
            .await
    }

    /// Sets a service's canary split even if the service has never had a live instance.
    pub async fn set_route_forced(
        &self,
        service: &str,
        splits: &BTreeMap<String, u64>,
    ) -> Result<RouteResponse, ClientError> {
        self.send_json(
            Method::PUT,
            &format!("/v1/routes/{service}?force=true"),
            splits,
        )
        .await
    }

    /// Clears a service's canary split.
    pub async fn clear_route(&self, service: &str) -> Result<RouteResponse, ClientError> {
        self.send(self.request(Method::DELETE, &format!("/v1/routes/{service}")))
            .await
    }

    /// The directory's liveness endpoint.
    pub async fn healthz(&self) -> Result<(), ClientError> {
        let resp = self
            .request(Method::GET, "/healthz")
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .map_err(|e| ClientError::Unreachable {
                url: self.base.clone(),
                source: e,
            })?;
        if resp.status().is_success() {
            Ok(())
        } else {
            Err(ClientError::Refused {
                status: resp.status(),
                message: "not healthy".into(),
            })
        }
    }

    /// Opens `GET /v1/watch`: the stream yields the snapshot, then one event per change.
    ///
    /// The stream ends with an error when the connection breaks or stays silent for
    /// [`WATCH_IDLE_TIMEOUT`]; callers reconnect and receive a fresh snapshot.
    pub async fn watch(
        &self,
    ) -> Result<impl Stream<Item = Result<WatchEvent, ClientError>> + Send + 'static, ClientError>
    {
        let resp = self
            .request(Method::GET, "/v1/watch")
            .send()
            .await
            .map_err(|e| ClientError::Unreachable {
                url: self.base.clone(),
                source: e,
            })?;
        let status = resp.status();
        if !status.is_success() {
            let body = resp.text().await.unwrap_or_default();
            let message = serde_json::from_str::<ErrorBody>(&body)
                .map(|b| b.error)
                .unwrap_or(body);
            return Err(ClientError::Refused { status, message });
        }
        let url = self.base.clone();
        let chunks = resp.bytes_stream().map(move |chunk| {
            chunk.map_err(|e| ClientError::Unreachable {
                url: url.clone(),
                source: e,
            })
        });
        Ok(decode_watch(idle_after(chunks, WATCH_IDLE_TIMEOUT)))
    }
}

/// Ends `chunks` with [`ClientError::Idle`] when no chunk comes for `idle`.
fn idle_after<S>(chunks: S, idle: Duration) -> impl Stream<Item = Result<Bytes, ClientError>>
where
    S: Stream<Item = Result<Bytes, ClientError>>,
{
    futures_util::stream::unfold(
        (Box::pin(chunks), false),
        move |(mut chunks, done)| async move {
            if done {
                return None;
            }
            match tokio::time::timeout(idle, chunks.next()).await {
                Err(_) => Some((Err(ClientError::Idle(idle)), (chunks, true))),
                Ok(Some(item)) => Some((item, (chunks, false))),
                Ok(None) => None,
            }
        },
    )
}

/// Decodes the watch stream's NDJSON from `chunks`: one event a line, blank lines skipped,
/// lines longer than [`MAX_WATCH_LINE`] refused. Each byte is scanned once, however the lines
/// are split into chunks. The stream ends after its first error, [`ClientError::Ended`] when
/// the chunks end.
pub fn decode_watch<S>(chunks: S) -> impl Stream<Item = Result<WatchEvent, ClientError>>
where
    S: Stream<Item = Result<Bytes, ClientError>>,
{
    // The codec reads through `io::Error`; the client's own errors travel inside one.
    let reader = StreamReader::new(chunks.map(|c| c.map_err(std::io::Error::other)));
    let lines = FramedRead::new(reader, LinesCodec::new_with_max_length(MAX_WATCH_LINE));
    futures_util::stream::unfold((Box::pin(lines), false), |(mut lines, done)| async move {
        if done {
            return None;
        }
        loop {
            let item = match lines.next().await {
                None => Err(ClientError::Ended),
                Some(Ok(line)) if line.trim().is_empty() => continue,
                Some(Ok(line)) => serde_json::from_str::<WatchEvent>(&line)
                    .map_err(|e| ClientError::Decode(Box::new(e))),
                Some(Err(LinesCodecError::MaxLineLengthExceeded)) => Err(ClientError::Decode(
                    format!("a watch line is longer than {MAX_WATCH_LINE} bytes").into(),
                )),
                Some(Err(LinesCodecError::Io(e))) => Err(client_error(e)),
            };
            let failed = item.is_err();
            return Some((item, (lines, failed)));
        }
    })
}

/// The client's error carried through the codec, or the codec's own (invalid UTF-8).
fn client_error(e: std::io::Error) -> ClientError {
    if e.get_ref().is_some_and(|inner| inner.is::<ClientError>()) {
        if let Some(inner) = e.into_inner() {
            if let Ok(client) = inner.downcast::<ClientError>() {
                return *client;
            }
        }
        return ClientError::Ended;
    }
    ClientError::Decode(Box::new(e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn chunks(text: &[u8], size: usize) -> impl Stream<Item = Result<Bytes, ClientError>> {
        let parts: Vec<_> = text
            .chunks(size)
            .map(|c| Ok(Bytes::copy_from_slice(c)))
            .collect();
        futures_util::stream::iter(parts)
    }

    #[tokio::test]
    async fn lines_split_anywhere_decode_and_the_end_is_reported() {
        let text = b"{\"type\":\"ping\",\"index\":1}\n\n{\"type\":\"ping\",\"index\":2}\r\n";
        let events: Vec<_> = decode_watch(chunks(text, 3)).collect().await;
        assert_eq!(events.len(), 3, "{events:?}");
        assert!(matches!(events[0], Ok(WatchEvent::Ping { index: 1 })));
        assert!(matches!(events[1], Ok(WatchEvent::Ping { index: 2 })));
        assert!(matches!(events[2], Err(ClientError::Ended)));
    }

    #[tokio::test]
    async fn a_large_line_in_small_chunks_decodes_in_linear_time() {
        // 20 MB in 8 KiB chunks: rescanning the partial line after each chunk would read
        // about 25 GB; once per byte, it is a fraction of a second even unoptimised.
        let mut text = b"{\"type\":\"ping\",\"index\":7,\"padding\":\"".to_vec();
        text.resize(20_000_000, b'x');
        text.extend_from_slice(b"\"}\n");
        let start = Instant::now();
        let mut events = std::pin::pin!(decode_watch(chunks(&text, 8192)));
        let first = events.next().await;
        let took = start.elapsed();
        assert!(
            matches!(first, Some(Ok(WatchEvent::Ping { index: 7 }))),
            "{first:?}"
        );
        eprintln!("decoded a 20 MB line in 8 KiB chunks in {took:?}");
        assert!(took < Duration::from_secs(3), "took {took:?}");
    }

    #[tokio::test]
    async fn an_over_long_line_is_an_error_not_a_hang() {
        let text = vec![b'x'; MAX_WATCH_LINE + 10];
        let start = Instant::now();
        let events: Vec<_> = decode_watch(chunks(&text, 1 << 20)).collect().await;
        assert_eq!(events.len(), 1, "the stream ends after the error");
        match &events[0] {
            Err(ClientError::Decode(e)) => assert!(e.to_string().contains("longer than"), "{e}"),
            other => panic!("expected a decode error, got {other:?}"),
        }
        assert!(start.elapsed() < Duration::from_secs(10));
    }

    #[tokio::test]
    async fn a_transport_error_comes_through_as_itself() {
        let parts: Vec<Result<Bytes, ClientError>> = vec![
            Ok(Bytes::from_static(
                b"{\"type\":\"ping\",\"index\":1}\n{\"ty",
            )),
            Err(ClientError::Idle(Duration::from_secs(15))),
        ];
        let events: Vec<_> = decode_watch(futures_util::stream::iter(parts))
            .collect()
            .await;
        assert!(matches!(events[0], Ok(WatchEvent::Ping { index: 1 })));
        assert!(
            matches!(events[1], Err(ClientError::Idle(_))),
            "{:?}",
            events[1]
        );
        assert_eq!(events.len(), 2);
    }

    #[test]
    fn a_token_must_fit_in_a_header() {
        assert_eq!(
            parse_token("s3cret-Token_1.~").as_deref(),
            Ok("s3cret-Token_1.~")
        );
        for bad in ["", "two words", "s3\u{7}cret", "tab\t", "é", "line\n"] {
            assert!(parse_token(bad).is_err(), "{bad:?}");
        }
        let url = "http://127.0.0.1:7700";
        assert!(DirectoryClient::new(url, Some(String::new())).is_ok());
        assert!(DirectoryClient::new(url, Some("ok".into())).is_ok());
        assert!(matches!(
            DirectoryClient::new(url, Some("s3\u{7}cret".into())),
            Err(ClientError::BadToken(_))
        ));
    }
}
