//! The directory's HTTP client, used by the registrar, the ambassador, the CLI and the tests.
//!
//! A client knows one directory or several replicas of it (`http://d1:7700,http://d2:7700`,
//! replicas that share an etcd store). It talks to one replica at a time, the current one; a
//! call that cannot reach it, or that it answers with 502, 503 or 504, is tried on the next
//! replicas in turn, and the first that answers becomes current. A watch stream that breaks or
//! goes silent makes the next replica current, so the caller's reconnection goes there.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio_util::codec::{FramedRead, LinesCodec, LinesCodecError};
use tokio_util::io::StreamReader;

use crate::events::EventsResponse;
use crate::maintenance::{
    validate_client, DrainRequest, DrainResponse, MaintenanceResponse, Target, ORIGIN_HEADER,
};
use crate::model::{
    ErrorBody, Instance, InstanceSpec, RouteResponse, RoutesResponse, ServiceName, ServiceResponse,
    ServicesResponse, WatchEvent,
};
use crate::ops::{AmbassadorReport, AmbassadorsResponse, ReportAck};

/// Default directory address when neither a flag nor `BAKER_DIRECTORY` names one.
pub const DEFAULT_DIRECTORY: &str = "http://127.0.0.1:7700";
/// A watch stream that delivers nothing (not even a ping) for this long is considered dead.
pub const WATCH_IDLE_TIMEOUT: Duration = Duration::from_secs(15);
/// Longest wait for a replica to answer a watch request with its headers: a replica that is
/// frozen accepts connections (the kernel does) but never answers.
pub const WATCH_OPEN_TIMEOUT: Duration = Duration::from_secs(5);
/// Most replicas one client may name.
pub const MAX_REPLICAS: usize = 16;
/// Most services one filtered watch may name (`GET /v1/watch?service=...`); the directory
/// refuses more with 400.
pub const MAX_WATCH_SERVICES: usize = 1_000;
/// Longest line accepted on the watch stream.
const MAX_WATCH_LINE: usize = 64 * 1024 * 1024;

/// What can go wrong talking to the directory.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("directory address {0:?} is not an http:// or https:// URL")]
    BadUrl(String),
    /// The CA bundle given to trust `https://` directories cannot be used.
    #[error(transparent)]
    Trust(#[from] crate::tls::TrustError),
    /// An `https://` directory's certificate did not verify (or the TLS handshake failed).
    #[error("the directory at {url} presented a certificate that does not verify: {reason}")]
    Untrusted { url: String, reason: String },
    #[error("the directory list {0}")]
    BadList(String),
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
    /// A line of the watch stream did not follow the one before it: something was missed, and
    /// the state built from the stream can no longer be trusted. Reconnect for a fresh snapshot.
    #[error(
        "the watch stream missed a change (its last index was {last}, the next line follows \
         index {prev})"
    )]
    Gap { last: u64, prev: u64 },
}

impl ClientError {
    /// The HTTP status, when the directory answered with an error.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            ClientError::Refused { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// Whether another replica may do better: this one could not be reached, or said it
    /// cannot serve now (502, 503, 504). A refusal of the request itself (4xx) is final.
    pub fn is_replica_fault(&self) -> bool {
        match self {
            ClientError::Unreachable { .. }
            | ClientError::Untrusted { .. }
            | ClientError::Idle(_)
            | ClientError::Ended => true,
            ClientError::Refused { status, .. } => matches!(
                *status,
                StatusCode::BAD_GATEWAY
                    | StatusCode::SERVICE_UNAVAILABLE
                    | StatusCode::GATEWAY_TIMEOUT
            ),
            _ => false,
        }
    }
}

/// Parses a directory address or a comma-separated list of replicas (`http://d1:7700,
/// http://d2:7700`): each an `http://` or `https://` URL, trailing `/` dropped, none twice, at
/// most [`MAX_REPLICAS`].
pub fn parse_directories(list: &str) -> Result<Vec<String>, ClientError> {
    let mut urls: Vec<String> = Vec::new();
    for part in list.split(',') {
        let url = part.trim().trim_end_matches('/');
        if url.is_empty() {
            return Err(ClientError::BadList(
                "has an empty entry: separate the URLs with single commas".into(),
            ));
        }
        let parsed = reqwest::Url::parse(url).map_err(|_| ClientError::BadUrl(url.to_owned()))?;
        if !matches!(parsed.scheme(), "http" | "https")
            || parsed.host_str().is_none_or(str::is_empty)
        {
            return Err(ClientError::BadUrl(url.to_owned()));
        }
        if urls.iter().any(|u| u == url) {
            return Err(ClientError::BadList(format!("names {url} twice")));
        }
        urls.push(url.to_owned());
    }
    if urls.len() > MAX_REPLICAS {
        return Err(ClientError::BadList(format!(
            "names {} replicas; at most {MAX_REPLICAS} are allowed",
            urls.len()
        )));
    }
    Ok(urls)
}

/// The message of an error answer from `url`: a directory's `{"error": ...}`, or else what was
/// sent instead and that `url` does not answer as a directory (an ambassador's port, another
/// server), which is most likely a wrong `BAKER_DIRECTORY`.
fn error_message(url: &str, body: &[u8]) -> String {
    if let Ok(b) = serde_json::from_slice::<ErrorBody>(body) {
        return b.error;
    }
    let text = String::from_utf8_lossy(body);
    let first = text.lines().map(str::trim).find(|l| !l.is_empty());
    let sent = match first {
        None => "an empty body".to_owned(),
        Some(line) if line.chars().count() > 80 => {
            format!("{:?}...", line.chars().take(80).collect::<String>())
        }
        Some(line) => format!("{line:?}"),
    };
    format!(
        "{url} does not answer as a Baker directory (whose errors are JSON with an \"error\"): \
         it sent {sent}; check BAKER_DIRECTORY (or --directory)"
    )
}

/// Checks a bearer token: printable ASCII without spaces, what an `Authorization` header can
/// carry. The directory, the registrar, the ambassador and the CLI all apply this rule.
pub fn parse_token(token: &str) -> Result<String, &'static str> {
    if token.is_empty() {
        Err("must not be empty")
    } else if token
        .get(..7)
        .is_some_and(|p| p.eq_ignore_ascii_case("bearer "))
    {
        Err("must be the token alone, without the `Bearer ` prefix (Baker adds it)")
    } else if token.bytes().all(|b| b.is_ascii_graphic()) {
        Ok(token.to_owned())
    } else {
        Err("must be printable ASCII without spaces")
    }
}

/// A client of one directory, or of several replicas of it. Cheap to clone; clones share
/// which replica is current.
#[derive(Debug, Clone)]
pub struct DirectoryClient {
    replicas: Arc<[String]>,
    /// The replica calls go to first: the last one that answered.
    current: Arc<AtomicUsize>,
    token: Option<String>,
    /// Sent with watches instead of `token`, when set.
    watch_token: Option<String>,
    /// Sent as `X-Baker-Origin` with every call, when set: the client an operator's change
    /// came from.
    origin: Option<String>,
    http: reqwest::Client,
    /// Where the trust in `https://` replicas comes from, as told in errors.
    trust: Arc<str>,
}

impl DirectoryClient {
    /// A client for `base` (`http://host:port`, or a comma-separated list of replicas, see
    /// [`parse_directories`]), sending `token` as a bearer token if given (an empty token is
    /// none; see [`parse_token`] for what a token may hold).
    pub fn new(base: &str, token: Option<String>) -> Result<Self, ClientError> {
        Self::trusting(base, token, None)
    }

    /// As [`DirectoryClient::new`], trusting only the CA certificates of the PEM bundle `ca`
    /// (`BAKER_CA`) for `https://` replicas when given; the system's roots otherwise.
    pub fn trusting(
        base: &str,
        token: Option<String>,
        ca: Option<&std::path::Path>,
    ) -> Result<Self, ClientError> {
        let replicas = parse_directories(base)?;
        let token = token.filter(|t| !t.is_empty());
        if let Some(t) = &token {
            parse_token(t).map_err(ClientError::BadToken)?;
        }
        let http = crate::tls::builder(ca)?
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true)
            .pool_idle_timeout(Duration::from_secs(30))
            .build()
            .map_err(|e| ClientError::Unreachable {
                url: replicas.join(","),
                source: e,
            })?;
        Ok(Self {
            replicas: replicas.into(),
            current: Arc::new(AtomicUsize::new(0)),
            token,
            watch_token: None,
            origin: None,
            http,
            trust: crate::tls::describe(ca).into(),
        })
    }

    /// This client, naming itself `origin` (`cli:alice`) to the directory in the
    /// `X-Baker-Origin` header; the directory records it on operators' changes. A name that
    /// is not a valid client name (see [`validate_client`]) is not sent.
    pub fn with_origin(mut self, origin: &str) -> Self {
        self.origin = validate_client(origin).ok().map(str::to_owned);
        self
    }

    /// This client, sending `watch_token` (when given and not empty) with watches instead of
    /// the main token: a directory with `BAKER_WATCH_TOKEN` set requires it (or its
    /// `BAKER_TOKEN`) of every watch.
    pub fn with_watch_token(mut self, watch_token: Option<String>) -> Result<Self, ClientError> {
        let watch_token = watch_token.filter(|t| !t.is_empty());
        if let Some(t) = &watch_token {
            parse_token(t).map_err(ClientError::BadToken)?;
        }
        self.watch_token = watch_token;
        Ok(self)
    }

    /// The current replica's base URL (the directory's, when there is one).
    pub fn base(&self) -> &str {
        &self.replicas[self.current.load(Ordering::Relaxed) % self.replicas.len()]
    }

    /// Every replica's base URL, in the order given.
    pub fn replicas(&self) -> &[String] {
        &self.replicas
    }

    /// The replicas as the list they were given in (`http://d1:7700,http://d2:7700`).
    pub fn list(&self) -> String {
        self.replicas.join(",")
    }

    /// The error for a call to `url` that got no answer: [`ClientError::Untrusted`] when the
    /// cause is the replica's certificate, [`ClientError::Unreachable`] otherwise.
    fn unreachable(&self, url: &str, source: reqwest::Error) -> ClientError {
        match crate::tls::untrusted_reason(&source, &self.trust) {
            Some(reason) => ClientError::Untrusted {
                url: url.to_owned(),
                reason,
            },
            None => ClientError::Unreachable {
                url: url.to_owned(),
                source,
            },
        }
    }

    /// Makes the replica after `failed` current, unless another call moved on already.
    fn move_past(&self, failed: usize) {
        let next = (failed + 1) % self.replicas.len();
        let _ = self
            .current
            .compare_exchange(failed, next, Ordering::Relaxed, Ordering::Relaxed);
    }

    /// The replicas in the order to try them: the current one first.
    fn order(&self) -> impl Iterator<Item = usize> {
        let n = self.replicas.len();
        let start = self.current.load(Ordering::Relaxed) % n;
        (0..n).map(move |k| (start + k) % n)
    }

    fn request(&self, replica: usize, method: Method, path: &str) -> reqwest::RequestBuilder {
        let url = format!("{}{}", self.replicas[replica], path);
        let mut req = self.http.request(method, url);
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        if let Some(o) = &self.origin {
            req = req.header(ORIGIN_HEADER, o);
        }
        req
    }

    /// One call, tried on each replica in turn while the failure is the replica's.
    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<T, ClientError> {
        let mut last = None;
        for replica in self.order() {
            let mut req = self.request(replica, method.clone(), path);
            if let Some(b) = &body {
                req = req
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .body(b.clone());
            }
            let mut attempt = Attempt {
                client: self,
                replica,
                abandoned: true,
            };
            match self.send_once(replica, req).await {
                Ok(v) => {
                    attempt.abandoned = false;
                    self.current.store(replica, Ordering::Relaxed);
                    return Ok(v);
                }
                // The attempt moves past the replica as it is dropped.
                Err(e) if e.is_replica_fault() => last = Some(e),
                Err(e) => {
                    attempt.abandoned = false;
                    return Err(e);
                }
            }
        }
        Err(last.unwrap_or(ClientError::Ended))
    }

    async fn send_once<T: DeserializeOwned>(
        &self,
        replica: usize,
        req: reqwest::RequestBuilder,
    ) -> Result<T, ClientError> {
        let url = &self.replicas[replica];
        let resp = req
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .map_err(|e| self.unreachable(url, e))?;
        let status = resp.status();
        let body = resp.bytes().await.map_err(|e| self.unreachable(url, e))?;
        if !status.is_success() {
            let message = error_message(url, &body);
            return Err(ClientError::Refused { status, message });
        }
        serde_json::from_slice(&body).map_err(|e| ClientError::Decode(Box::new(e)))
    }

    async fn send<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
    ) -> Result<T, ClientError> {
        self.call(method, path, None).await
    }

    async fn send_json<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        // Serializing the API's own request types cannot fail.
        let body = serde_json::to_vec(body).map_err(|e| ClientError::Decode(Box::new(e)))?;
        self.call(method, path, Some(body)).await
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
        match self.send::<serde_json::Value>(Method::DELETE, &path).await {
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
        self.send(Method::GET, "/v1/services").await
    }

    /// One service's live instances and route.
    pub async fn service(&self, service: &str) -> Result<ServiceResponse, ClientError> {
        self.send(Method::GET, &format!("/v1/services/{service}"))
            .await
    }

    /// Every route.
    pub async fn routes(&self) -> Result<RoutesResponse, ClientError> {
        self.send(Method::GET, "/v1/routes").await
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
        self.send(Method::DELETE, &format!("/v1/routes/{service}"))
            .await
    }

    /// Sends an ambassador's report (`PUT /v1/ambassadors/{id}`); answers the directory's index.
    pub async fn report(
        &self,
        id: &str,
        report: &AmbassadorReport,
    ) -> Result<ReportAck, ClientError> {
        self.send_json(Method::PUT, &format!("/v1/ambassadors/{id}"), report)
            .await
    }

    /// Removes an ambassador's report, when it stops. An unknown id is not an error.
    pub async fn sign_off(&self, id: &str) -> Result<(), ClientError> {
        let path = format!("/v1/ambassadors/{id}");
        match self.send::<ReportAck>(Method::DELETE, &path).await {
            Ok(_)
            | Err(ClientError::Refused {
                status: StatusCode::NOT_FOUND,
                ..
            }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Drains `target` of `service` (`PUT /v1/maintenance/...`), with an optional reason. The
    /// directory refuses (409) a target that matches no live instance: see
    /// [`drain_forced`](Self::drain_forced).
    pub async fn drain(
        &self,
        service: &str,
        target: &Target,
        reason: Option<&str>,
    ) -> Result<DrainResponse, ClientError> {
        self.put_drain(maintenance_path(service, target), reason)
            .await
    }

    /// Drains `target` of `service` even when it matches no live instance: ahead of its
    /// registration.
    pub async fn drain_forced(
        &self,
        service: &str,
        target: &Target,
        reason: Option<&str>,
    ) -> Result<DrainResponse, ClientError> {
        let path = format!("{}?force=true", maintenance_path(service, target));
        self.put_drain(path, reason).await
    }

    /// `PUT` of a drain with its optional reason on `path`.
    async fn put_drain(
        &self,
        path: String,
        reason: Option<&str>,
    ) -> Result<DrainResponse, ClientError> {
        let body = DrainRequest {
            reason: reason.map(str::to_owned),
        };
        self.send_json(Method::PUT, &path, &body).await
    }

    /// Lifts the drain of `target` of `service` (`DELETE /v1/maintenance/...`); the directory
    /// answers 404 when it was not drained.
    pub async fn undrain(
        &self,
        service: &str,
        target: &Target,
    ) -> Result<DrainResponse, ClientError> {
        self.send(Method::DELETE, &maintenance_path(service, target))
            .await
    }

    /// The directory's history (`GET /v1/events`): events at or after `since` and at or before
    /// `until` (ms since the Unix epoch), of `service`, the newest `limit`, oldest first.
    pub async fn events(
        &self,
        since: Option<u64>,
        until: Option<u64>,
        service: Option<&str>,
        limit: Option<usize>,
    ) -> Result<EventsResponse, ClientError> {
        let mut query = Vec::new();
        if let Some(s) = since {
            query.push(format!("since={s}"));
        }
        if let Some(u) = until {
            query.push(format!("until={u}"));
        }
        if let Some(s) = service {
            // Service names are URL-safe by construction.
            query.push(format!("service={s}"));
        }
        if let Some(l) = limit {
            query.push(format!("limit={l}"));
        }
        let path = if query.is_empty() {
            "/v1/events".to_owned()
        } else {
            format!("/v1/events?{}", query.join("&"))
        };
        self.send(Method::GET, &path).await
    }

    /// Every drain in place.
    pub async fn maintenance(&self) -> Result<MaintenanceResponse, ClientError> {
        self.send(Method::GET, "/v1/maintenance").await
    }

    /// Every ambassador, whether it is live and caught up, and the traffic per instance.
    pub async fn ambassadors(&self) -> Result<AmbassadorsResponse, ClientError> {
        self.send(Method::GET, "/v1/ambassadors").await
    }

    /// The directory's liveness endpoint: `Ok` when the current replica, or else any other,
    /// answers it.
    pub async fn healthz(&self) -> Result<(), ClientError> {
        let mut last = None;
        for replica in self.order() {
            let url = &self.replicas[replica];
            let result = match self
                .request(replica, Method::GET, "/healthz")
                .timeout(Duration::from_secs(5))
                .send()
                .await
            {
                Err(e) => Err(self.unreachable(url, e)),
                Ok(resp) if resp.status().is_success() => Ok(()),
                Ok(resp) => Err(ClientError::Refused {
                    status: resp.status(),
                    message: "not healthy".into(),
                }),
            };
            match result {
                Ok(()) => {
                    self.current.store(replica, Ordering::Relaxed);
                    return Ok(());
                }
                Err(e) => {
                    self.move_past(replica);
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or(ClientError::Ended))
    }

    /// Opens `GET /v1/watch?v=2` on the current replica (or, if it cannot, on the next ones in
    /// turn): the stream yields the snapshot, then one event per change.
    ///
    /// The stream ends with an error when the connection breaks, stays silent for
    /// [`WATCH_IDLE_TIMEOUT`], or skips a change ([`ClientError::Gap`]); on a broken or silent
    /// connection the next replica becomes current. Callers reconnect and receive a fresh
    /// snapshot. [`base`](Self::base) names the replica watched.
    pub async fn watch(
        &self,
    ) -> Result<impl Stream<Item = Result<WatchEvent, ClientError>> + Send + 'static, ClientError>
    {
        self.watch_services(None).await
    }

    /// Like [`DirectoryClient::watch`], of the services in `only` (and their routes) when given.
    /// More than [`MAX_WATCH_SERVICES`] services are watched with an unfiltered watch, a
    /// superset of them.
    pub async fn watch_services(
        &self,
        only: Option<&[ServiceName]>,
    ) -> Result<impl Stream<Item = Result<WatchEvent, ClientError>> + Send + 'static, ClientError>
    {
        let mut path = "/v1/watch?v=2".to_owned();
        if let Some(only) = only.filter(|o| o.len() <= MAX_WATCH_SERVICES) {
            // Service names are URL-safe by construction.
            let names: Vec<&str> = only.iter().map(ServiceName::as_str).collect();
            path.push_str("&service=");
            path.push_str(&names.join(","));
        }
        let mut last = None;
        for replica in self.order() {
            match self.watch_on(replica, &path).await {
                Ok(stream) => {
                    self.current.store(replica, Ordering::Relaxed);
                    let client = self.clone();
                    return Ok(stream.inspect(move |item| {
                        if item.as_ref().is_err_and(ClientError::is_replica_fault) {
                            client.move_past(replica);
                        }
                    }));
                }
                Err(e) if e.is_replica_fault() => {
                    self.move_past(replica);
                    last = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or(ClientError::Ended))
    }

    async fn watch_on(
        &self,
        replica: usize,
        path: &str,
    ) -> Result<impl Stream<Item = Result<WatchEvent, ClientError>> + Send + 'static, ClientError>
    {
        let url = self.replicas[replica].clone();
        let mut req = self.http.request(Method::GET, format!("{url}{path}"));
        if let Some(t) = self.watch_token.as_ref().or(self.token.as_ref()) {
            req = req.bearer_auth(t);
        }
        let send = req.send();
        let resp = match tokio::time::timeout(WATCH_OPEN_TIMEOUT, send).await {
            Err(_) => return Err(ClientError::Idle(WATCH_OPEN_TIMEOUT)),
            Ok(r) => r.map_err(|e| self.unreachable(&url, e))?,
        };
        let status = resp.status();
        if !status.is_success() {
            let body = resp.bytes().await.unwrap_or_default();
            let message = error_message(&url, &body);
            return Err(ClientError::Refused { status, message });
        }
        let chunks = resp.bytes_stream().map(move |chunk| {
            chunk.map_err(|e| ClientError::Unreachable {
                url: url.clone(),
                source: e,
            })
        });
        Ok(check_gaps(decode_watch(idle_after(
            chunks,
            WATCH_IDLE_TIMEOUT,
        ))))
    }
}

/// The path of `target`'s drain in `service`.
fn maintenance_path(service: &str, target: &Target) -> String {
    match target {
        Target::Instance(id) => format!("/v1/maintenance/{service}/instances/{id}"),
        Target::Version(v) => format!("/v1/maintenance/{service}/versions/{v}"),
    }
}

/// One call to one replica. Dropped while still `abandoned`, it makes the next replica
/// current: that covers a replica that failed, and one that has not answered when the caller
/// gave up on the call (a registrar's heartbeat has its own deadline, shorter than the
/// client's), so that the next call does not wait on the same frozen replica.
struct Attempt<'a> {
    client: &'a DirectoryClient,
    replica: usize,
    abandoned: bool,
}

impl Drop for Attempt<'_> {
    fn drop(&mut self) {
        if self.abandoned {
            self.client.move_past(self.replica);
        }
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

/// Ends `events` with [`ClientError::Gap`] at the first line that does not follow the one
/// before it: a change whose `prev`, or a ping whose `index`, is not the last index seen. A
/// snapshot starts over; v1 changes carry no `prev` and are taken as they come.
pub fn check_gaps<S>(events: S) -> impl Stream<Item = Result<WatchEvent, ClientError>>
where
    S: Stream<Item = Result<WatchEvent, ClientError>>,
{
    futures_util::stream::unfold(
        (Box::pin(events), None::<u64>, false),
        |(mut events, last, done)| async move {
            if done {
                return None;
            }
            let item = match events.next().await? {
                Ok(event) => match (last, follows(&event)) {
                    (Some(last), Some(prev)) if prev != last => {
                        Err(ClientError::Gap { last, prev })
                    }
                    _ => Ok(event),
                },
                Err(e) => Err(e),
            };
            let last = match &item {
                Ok(event) => Some(event.index()),
                Err(_) => last,
            };
            let failed = item.is_err();
            Some((item, (events, last, failed)))
        },
    )
}

/// The index of the line `event` claims to follow, if it says.
fn follows(event: &WatchEvent) -> Option<u64> {
    match event {
        WatchEvent::Ping { index } => Some(*index),
        other => other.prev(),
    }
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
    async fn a_skipped_change_ends_the_stream_with_a_gap() {
        let inst = r#"{"service":"a","id":"1","address":"10.0.0.1","port":80,"version":"1","weight":100,"source":"registrar","ttl_ms":6000,"last_seen":0}"#;
        let up = |index: u64, prev: u64| {
            format!(
                r#"{{"type":"upsert","index":{index},"prev":{prev},"at":0,"cause":"registered","instance":{inst}}}"#
            )
        };
        let snapshot = r#"{"type":"snapshot","index":4,"services":{},"routes":{}}"#;
        let ok = [
            snapshot.to_owned(),
            up(9, 4),
            r#"{"type":"ping","index":9}"#.into(),
            up(12, 9),
        ];
        let text = ok.join("\n") + "\n";
        let events: Vec<_> = check_gaps(decode_watch(chunks(text.as_bytes(), 7)))
            .collect()
            .await;
        assert_eq!(events.len(), 5, "{events:?}");
        assert!(events[..4].iter().all(Result::is_ok), "{events:?}");
        assert!(matches!(events[4], Err(ClientError::Ended)));
        for bad in [up(12, 8), r#"{"type":"ping","index":10}"#.into()] {
            let text = [snapshot.to_owned(), up(9, 4), bad, up(13, 12)].join("\n") + "\n";
            let events: Vec<_> = check_gaps(decode_watch(chunks(text.as_bytes(), 5)))
                .collect()
                .await;
            assert_eq!(events.len(), 3, "the stream ends at the gap: {events:?}");
            let err = events[2].as_ref().unwrap_err();
            assert!(matches!(err, ClientError::Gap { last: 9, .. }), "{err:?}");
        }
        // A fresh snapshot starts over: a new connection's indexes need not follow the old.
        let text = [
            snapshot.to_owned(),
            up(9, 4),
            snapshot.replace('4', "2"),
            up(3, 2),
        ]
        .join("\n")
            + "\n";
        let events: Vec<_> = check_gaps(decode_watch(chunks(text.as_bytes(), 5)))
            .collect()
            .await;
        assert!(events[..4].iter().all(Result::is_ok), "{events:?}");
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

    /// A replica that answers every request with `status` and `body`, counting requests.
    async fn replica(
        status: u16,
        body: &'static str,
    ) -> (String, Arc<std::sync::atomic::AtomicUsize>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let hits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = hits.clone();
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                let mut buf = vec![0u8; 4096];
                let _ = conn.read(&mut buf).await;
                let reply = format!(
                    "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\n\
                     content-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = conn.write_all(reply.as_bytes()).await;
            }
        });
        (url, hits)
    }

    /// A URL where nothing listens.
    fn dead() -> String {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    }

    #[test]
    fn a_list_of_replicas_is_parsed_and_checked() {
        assert_eq!(
            parse_directories(" http://d1:7700/ , http://d2:7700").unwrap(),
            ["http://d1:7700", "http://d2:7700"]
        );
        assert_eq!(
            parse_directories("http://127.0.0.1:7700").unwrap(),
            ["http://127.0.0.1:7700"]
        );
        assert_eq!(
            parse_directories("https://d1:7700,http://d2:7700").unwrap(),
            ["https://d1:7700", "http://d2:7700"]
        );
        for (bad, says) in [
            ("http://d1:7700,,http://d2:7700", "empty entry"),
            ("http://d1:7700,", "empty entry"),
            ("http://d1:7700,http://d1:7700/", "twice"),
            ("http://d1:7700,d2:7700", "not an http:// or https:// URL"),
            ("ftp://d1:7700", "not an http:// or https:// URL"),
        ] {
            let e = parse_directories(bad).unwrap_err().to_string();
            assert!(e.contains(says), "{bad:?}: {e}");
        }
        let many: Vec<String> = (0..=MAX_REPLICAS)
            .map(|i| format!("http://d{i}:7700"))
            .collect();
        let e = parse_directories(&many.join(",")).unwrap_err().to_string();
        assert!(e.contains("at most 16"), "{e}");
    }

    #[tokio::test]
    async fn a_call_moves_past_a_dead_or_unavailable_replica_and_stays_where_it_worked() {
        let (good, good_hits) = replica(200, r#"{"index":3,"routes":{}}"#).await;
        let (busy, busy_hits) = replica(503, r#"{"error":"quorum lost"}"#).await;
        let c = DirectoryClient::new(&format!("{},{busy},{good}", dead()), None).unwrap();
        assert_eq!(c.routes().await.unwrap().index, 3);
        assert_eq!(c.base(), good, "the replica that answered becomes current");
        assert_eq!(busy_hits.load(Ordering::SeqCst), 1);
        // The next call goes straight to the current replica.
        c.routes().await.unwrap();
        assert_eq!(
            (
                busy_hits.load(Ordering::SeqCst),
                good_hits.load(Ordering::SeqCst)
            ),
            (1, 2)
        );
        // Every replica failing: the last failure is reported.
        let c = DirectoryClient::new(&format!("{},{busy}", dead()), None).unwrap();
        let e = c.routes().await.unwrap_err();
        assert_eq!(e.status(), Some(StatusCode::SERVICE_UNAVAILABLE), "{e}");
    }

    #[tokio::test]
    async fn a_refusal_of_the_request_is_not_retried_elsewhere() {
        let (bad, _) = replica(400, r#"{"error":"bad weight"}"#).await;
        let (good, good_hits) = replica(200, r#"{"index":3,"routes":{}}"#).await;
        let c = DirectoryClient::new(&format!("{bad},{good}"), None).unwrap();
        let e = c.routes().await.unwrap_err();
        assert_eq!(e.status(), Some(StatusCode::BAD_REQUEST));
        assert_eq!(good_hits.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn a_watch_opens_on_the_next_replica_when_one_is_dead() {
        let (good, _) = replica(200, "{\"type\":\"ping\",\"index\":9}\n").await;
        let c = DirectoryClient::new(&format!("{},{good}", dead()), None).unwrap();
        let mut events = std::pin::pin!(c.watch().await.unwrap());
        assert!(matches!(
            events.next().await,
            Some(Ok(WatchEvent::Ping { index: 9 }))
        ));
        assert_eq!(c.base(), good);
        // The stream ends (the replica closed it): the next replica becomes current.
        assert!(matches!(events.next().await, Some(Err(_))));
        assert_ne!(c.base(), good);
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
        // The header's value pasted whole: said so, whatever its case.
        for bearer in ["Bearer s3cret", "bearer s3cret", "BEARER  s3cret"] {
            assert_eq!(
                parse_token(bearer),
                Err("must be the token alone, without the `Bearer ` prefix (Baker adds it)"),
                "{bearer:?}"
            );
        }
        assert_eq!(parse_token("Bearers3cret").as_deref(), Ok("Bearers3cret"));
        let url = "http://127.0.0.1:7700";
        assert!(DirectoryClient::new(url, Some(String::new())).is_ok());
        assert!(DirectoryClient::new(url, Some("ok".into())).is_ok());
        assert!(matches!(
            DirectoryClient::new(url, Some("s3\u{7}cret".into())),
            Err(ClientError::BadToken(_))
        ));
    }
}
