//! The HTTP API: routes, handlers, authentication, request bodies and JSON errors.
//!
//! Client mistakes get a 4xx with `{"error": "..."}` naming the field at fault; internal faults
//! get a bare 500 and are logged. Every mutating call checks the bearer token first (when one
//! is configured), then the names in the path, then the body.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, Request, State};
use axum::http::header::{
    AUTHORIZATION, CACHE_CONTROL, CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER,
    WWW_AUTHENTICATE,
};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::{Extension, Json, Router};
use baker_client::api::MAX_WATCH_SERVICES;
use baker_client::change::by;
use baker_client::events::{parse_time, EventsResponse};
use baker_client::maintenance::{
    validate_client, DrainRequest, DrainResponse, MaintenanceResponse, Reason, Target,
    ORIGIN_HEADER,
};
use baker_client::model::{
    printable, validate_route_of, ErrorBody, Instance, InstanceId, InstanceSpec, RouteResponse,
    RoutesResponse, ServiceName, ServiceResponse, ServicesResponse, ValidationError, Version,
};
use baker_client::ops::{AmbassadorReport, AmbassadorsResponse, ReportAck};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet};
use tokio_util::sync::CancellationToken;

use crate::ambassadors::Reports;
use crate::history::{self, History};
use crate::quota::Exceeded;
use crate::registry::{ChangeError, Origin, Registry, WriteError};
use crate::server::ConnInfo;
use crate::tokens::{Role, Token, Tokens};
use crate::watch;

/// Largest request body accepted.
pub const MAX_BODY: usize = 64 * 1024;

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    pub registry: Registry,
    /// The ambassadors' last reports.
    pub ambassadors: Arc<Reports>,
    /// The last changes, as events.
    pub history: Arc<History>,
    /// Who may do what: the tokens, and which calls need one.
    pub auth: Arc<Auth>,
    pub watch: watch::Limits,
    /// Cancelled when the directory shuts down: watch streams end.
    pub shutdown: CancellationToken,
    /// Which replica this is and where its table lives, for the dashboard's header.
    pub about: Arc<crate::ui::About>,
}

/// An error answer.
#[derive(Debug)]
pub enum ApiError {
    BadRequest(String),
    Unauthorized(&'static str),
    /// A known token whose role or scope does not allow the call (403): the message names the
    /// token, its role and scope, and what it may not do.
    Forbidden(String),
    NotFound(String),
    MethodNotAllowed(String),
    /// The call contradicts the directory's state (409); the message says why.
    Conflict(String),
    TooLarge,
    /// A new instance, route, drain or ambassador past a quota (429): the body names the quota
    /// and its variable.
    Quota(Exceeded),
    /// Every watch slot is taken (503): the client should retry later.
    Busy(String),
    Timeout(Duration),
    /// The store cannot take changes now (etcd lost its quorum): 503, with the reason; reads
    /// and watches still answer.
    Unavailable(String),
    /// A fault of the directory: logged, answered with a bare 500.
    Internal(anyhow::Error),
}

impl ApiError {
    fn invalid(errors: Vec<ValidationError>) -> ApiError {
        let list: Vec<String> = errors.iter().map(ToString::to_string).collect();
        ApiError::BadRequest(list.join("; "))
    }
}

impl From<WriteError> for ApiError {
    fn from(e: WriteError) -> Self {
        match e {
            WriteError::Conflict(e) => ApiError::Conflict(e.to_string()),
            WriteError::Quota(e) => ApiError::Quota(e),
            WriteError::Unavailable(e) => unavailable(&e),
            WriteError::Store(e) => ApiError::Internal(anyhow::Error::new(e)),
        }
    }
}

/// The 503 of a change etcd could not take.
fn unavailable(e: &crate::etcd::EtcdError) -> ApiError {
    ApiError::Unavailable(format!(
        "the change was not stored: {}",
        baker_client::errors::chain(e)
    ))
}

/// The answer to a route or drain change that failed; a store fault is logged with `doing`
/// (`saving the route of web`) and answered as a bare 500.
fn change_failed(e: ChangeError, doing: impl FnOnce() -> String) -> ApiError {
    match e {
        ChangeError::Conflict(e) => ApiError::Conflict(e.to_string()),
        ChangeError::Quota(e) => ApiError::Quota(e),
        ChangeError::Unavailable(e) => unavailable(&e),
        ChangeError::Store(e) => ApiError::Internal(anyhow::Error::new(e).context(doing())),
    }
}

impl From<PathRejection> for ApiError {
    fn from(r: PathRejection) -> Self {
        ApiError::BadRequest(format!("bad path: {}", r.body_text()))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, message) = match self {
            ApiError::BadRequest(m) => (StatusCode::BAD_REQUEST, m),
            ApiError::Unauthorized(m) => {
                let body = Json(ErrorBody { error: m.into() });
                return (
                    StatusCode::UNAUTHORIZED,
                    [(WWW_AUTHENTICATE, "Bearer")],
                    body,
                )
                    .into_response();
            }
            ApiError::Forbidden(m) => (StatusCode::FORBIDDEN, m),
            ApiError::NotFound(m) => (StatusCode::NOT_FOUND, m),
            ApiError::Conflict(m) => (StatusCode::CONFLICT, m),
            ApiError::MethodNotAllowed(m) => (StatusCode::METHOD_NOT_ALLOWED, m),
            ApiError::Quota(e) => {
                let body = Json(serde_json::json!({
                    "error": e.to_string(),
                    "quota": e.quota.name(),
                    "variable": e.quota.variable(),
                    "limit": e.limit,
                }));
                return (StatusCode::TOO_MANY_REQUESTS, body).into_response();
            }
            ApiError::Busy(m) => {
                let body = Json(ErrorBody { error: m });
                // Closing the connection frees its slot for a client that can be served.
                return (
                    StatusCode::SERVICE_UNAVAILABLE,
                    [(RETRY_AFTER, "5"), (CONNECTION, "close")],
                    body,
                )
                    .into_response();
            }
            ApiError::Unavailable(m) => {
                let body = Json(ErrorBody { error: m });
                return (StatusCode::SERVICE_UNAVAILABLE, [(RETRY_AFTER, "1")], body)
                    .into_response();
            }
            ApiError::TooLarge => (
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("request body is larger than {} KiB", MAX_BODY / 1024),
            ),
            ApiError::Timeout(d) => (
                StatusCode::REQUEST_TIMEOUT,
                format!("request took longer than {d:?}"),
            ),
            ApiError::Internal(e) => {
                tracing::error!("internal error: {e:#}");
                (StatusCode::INTERNAL_SERVER_ERROR, "internal error".into())
            }
        };
        (status, Json(ErrorBody { error: message })).into_response()
    }
}

/// The directory's routes (the watch stream is exempt from the request timeout).
pub fn router(state: AppState, request_timeout: Duration) -> Router {
    let timed = Router::new()
        .route("/v1/services", get(list_services))
        .route("/v1/services/{service}", get(get_service))
        .route(
            "/v1/services/{service}/instances/{id}",
            put(put_instance).delete(delete_instance),
        )
        .route("/v1/routes", get(list_routes))
        .route(
            "/v1/routes/{service}",
            get(get_route).put(put_route).delete(delete_route),
        )
        .route("/v1/events", get(list_events))
        .route("/v1/maintenance", get(list_maintenance))
        .route(
            "/v1/maintenance/{service}/instances/{id}",
            put(drain::<InstancePath>).delete(undrain::<InstancePath>),
        )
        .route(
            "/v1/maintenance/{service}/versions/{version}",
            put(drain::<VersionPath>).delete(undrain::<VersionPath>),
        )
        .route("/v1/ambassadors", get(list_ambassadors))
        .route(
            "/v1/ambassadors/{id}",
            put(put_ambassador).delete(delete_ambassador),
        )
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .merge(crate::ui::routes())
        .layer(middleware::from_fn_with_state(state.clone(), closed_reads))
        .layer(middleware::from_fn_with_state(request_timeout, deadline));
    Router::new()
        .route("/v1/watch", get(watch))
        .merge(timed)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

async fn deadline(State(limit): State<Duration>, req: Request, next: Next) -> Response {
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(resp) => resp,
        Err(_) => ApiError::Timeout(limit).into_response(),
    }
}

async fn not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::NotFound(format!(
        "no such endpoint: {method} {} (names in paths are single segments: `/` is not allowed)",
        uri.path()
    ))
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::MethodNotAllowed(format!("{method} is not allowed on {}", uri.path()))
}

/// Who may do what: the tokens the directory knows ([`crate::tokens`]), and which calls need
/// one. Writes need a token once `BAKER_TOKEN` or `BAKER_TOKENS` is set; reads once
/// `BAKER_READ=token`; watches then too, or once `BAKER_WATCH_TOKEN` is set.
pub struct Auth {
    pub tokens: Arc<Tokens>,
    pub writes_closed: bool,
    pub reads_closed: bool,
    pub watches_closed: bool,
}

/// Who made a call: the token it presented, when the directory knows it.
pub(crate) type Caller = Option<Token>;

impl Auth {
    /// Open for everything: no token anywhere.
    pub fn open() -> Auth {
        Auth {
            tokens: Arc::new(Tokens::load(Vec::new(), None).expect("no file to read")),
            writes_closed: false,
            reads_closed: false,
            watches_closed: false,
        }
    }

    /// The caller of a call that needs a token when `closed`: 401 when it has none or one the
    /// directory does not know. An open call names its caller too, when it presents a known
    /// token.
    fn caller(
        &self,
        headers: &HeaderMap,
        closed: bool,
        variable: &str,
    ) -> Result<Caller, ApiError> {
        if !closed {
            return Ok(bearer(headers, variable)
                .ok()
                .and_then(|p| self.tokens.find(p)));
        }
        let presented = bearer(headers, variable)?;
        match self.tokens.find(presented) {
            Some(token) => Ok(Some(token)),
            None if variable == "BAKER_WATCH_TOKEN" => Err(ApiError::Unauthorized(
                "wrong bearer token: a watch needs BAKER_WATCH_TOKEN (or BAKER_TOKEN)",
            )),
            None => Err(ApiError::Unauthorized("wrong bearer token")),
        }
    }

    /// The caller of a change: a token is needed once writes are closed. What it may change is
    /// checked by [`Auth::may`] once the service is known.
    pub(crate) fn writer(&self, headers: &HeaderMap) -> Result<Caller, ApiError> {
        self.caller(headers, self.writes_closed, "BAKER_TOKEN")
    }

    /// The caller of a read: a token that reads is needed once reads are closed.
    pub(crate) fn reader(&self, headers: &HeaderMap) -> Result<Caller, ApiError> {
        let caller = self.caller(headers, self.reads_closed, "BAKER_TOKEN")?;
        self.reads(&caller, self.reads_closed)?;
        Ok(caller)
    }

    /// The caller of a watch: a token that reads is needed once reads or watches are closed.
    pub(crate) fn watcher(&self, headers: &HeaderMap) -> Result<Caller, ApiError> {
        let closed = self.reads_closed || self.watches_closed;
        let caller = self.caller(headers, closed, "BAKER_WATCH_TOKEN")?;
        self.reads(&caller, closed)?;
        Ok(caller)
    }

    /// What keeps a watch of `caller` open: when the watch needed a token, that token staying
    /// in force ([`watch::Grant`]); nothing otherwise.
    pub(crate) fn watch_grant(&self, caller: Caller) -> Result<Option<watch::Grant>, ApiError> {
        let closed = self.reads_closed || self.watches_closed;
        match caller {
            Some(token) if closed => {
                let grant = watch::Grant::new(self.tokens.clone(), token);
                if grant.holds() {
                    Ok(Some(grant))
                } else {
                    Err(ApiError::Unauthorized("wrong bearer token"))
                }
            }
            _ => Ok(None),
        }
    }

    /// The caller of an ambassador's report: a token that reads is needed once writes are
    /// closed.
    pub(crate) fn reporter(&self, headers: &HeaderMap) -> Result<Caller, ApiError> {
        let caller = self.writer(headers)?;
        self.reads(&caller, self.writes_closed)?;
        Ok(caller)
    }

    /// 403 when a call that needs a token that reads came with one that only registers.
    fn reads(&self, caller: &Caller, closed: bool) -> Result<(), ApiError> {
        match caller {
            Some(t) if closed && t.role == Role::Register => Err(ApiError::Forbidden(format!(
                "the token {} (role register, scope {}) may not read: reads need a token of \
                 role read, operate or admin",
                t.name, t.scope
            ))),
            _ => Ok(()),
        }
    }

    /// Whether `caller` may `doing` (a change a token of `role` makes) `service`: always while
    /// writes are open; else with an `admin` token, or one of `role` whose scope covers the
    /// service (403 naming the token, its role and scope otherwise).
    pub(crate) fn may(
        &self,
        caller: &Caller,
        role: Role,
        service: &ServiceName,
        doing: &str,
    ) -> Result<(), ApiError> {
        if !self.writes_closed {
            return Ok(());
        }
        let Some(t) = caller else {
            return Err(ApiError::Unauthorized("wrong bearer token"));
        };
        if t.role == Role::Admin || (t.role == role && t.scope.covers(service)) {
            return Ok(());
        }
        let why = if t.role == role {
            format!("{service} is not in its scope")
        } else {
            format!("that needs a token of role {} or admin", role.as_str())
        };
        Err(ApiError::Forbidden(format!(
            "the token {} (role {}, scope {}) may not {doing} {service}: {why}",
            t.name,
            t.role.as_str(),
            t.scope
        )))
    }
}

/// The middleware that keeps reads (`GET` and `HEAD` of `/v1/...` and `/metrics`) to callers
/// with a token that reads, once reads are closed. The watch checks its own token; `/healthz`
/// and the dashboard's page and assets stay open.
async fn closed_reads(State(app): State<AppState>, req: Request, next: Next) -> Response {
    let read = matches!(*req.method(), Method::GET | Method::HEAD);
    let path = req.uri().path();
    let gated = (path.starts_with("/v1/") && path != "/v1/watch") || path == "/metrics";
    if read && gated {
        if let Err(e) = app.auth.reader(req.headers()) {
            return e.into_response();
        }
    }
    next.run(req).await
}

/// The token of an `Authorization: Bearer <token>` header; `expected` names the variable the
/// error messages ask for.
fn bearer<'h>(headers: &'h HeaderMap, expected: &str) -> Result<&'h [u8], ApiError> {
    let (missing, malformed) = match expected {
        "BAKER_WATCH_TOKEN" => (
            "missing bearer token: send `Authorization: Bearer <BAKER_WATCH_TOKEN>`",
            "the Authorization header must be `Bearer <BAKER_WATCH_TOKEN>`",
        ),
        _ => (
            "missing bearer token: send `Authorization: Bearer <BAKER_TOKEN>`",
            "the Authorization header must be `Bearer <BAKER_TOKEN>`",
        ),
    };
    let value = headers
        .get(AUTHORIZATION)
        .ok_or(ApiError::Unauthorized(missing))?
        .as_bytes();
    match value.get(..7) {
        Some(scheme) if scheme.eq_ignore_ascii_case(b"bearer ") => Ok(value[7..].trim_ascii()),
        _ => Err(ApiError::Unauthorized(malformed)),
    }
}

/// Parses the service name taken from the path.
fn service_path(service: &str) -> Result<ServiceName, ApiError> {
    service.parse().map_err(|e| ApiError::invalid(vec![e]))
}

/// Parses the service name and instance id taken from the path, reporting both when both are
/// bad.
fn instance_path(service: &str, id: &str) -> Result<(ServiceName, InstanceId), ApiError> {
    match (service.parse::<ServiceName>(), id.parse::<InstanceId>()) {
        (Ok(service), Ok(id)) => Ok((service, id)),
        (service, id) => Err(ApiError::invalid(
            service.err().into_iter().chain(id.err()).collect(),
        )),
    }
}

/// Who made a change, as its events say: the name of the token the call presented
/// (`BAKER_TOKEN` for that variable's token), or `anonymous` when it presented none the
/// directory knows (writes are open then). Never anything of the secret itself.
fn by_of(caller: &Caller) -> &str {
    match caller {
        Some(t) => &t.name,
        None => by::ANONYMOUS,
    }
}

/// Where an operator's call came from: the caller's IP address, after the client it named in
/// `X-Baker-Origin` (`cli:alice from 10.0.0.5`), which must be a short word, and the name of
/// the token it presented, when that token comes from `BAKER_TOKENS` (`cli:alice from
/// 10.0.0.5 with token ops`); and who made it ([`by_of`]).
fn origin(
    headers: &HeaderMap,
    conn: Option<&Extension<ConnInfo>>,
    caller: &Caller,
) -> Result<Origin, ApiError> {
    let from = origin_of(headers, conn)?;
    let from = match caller {
        Some(t) if t.listed => format!("{from} with token {}", t.name),
        _ => from,
    };
    Ok(Origin {
        from,
        by: by_of(caller).to_owned(),
    })
}

fn origin_of(headers: &HeaderMap, conn: Option<&Extension<ConnInfo>>) -> Result<String, ApiError> {
    let peer = conn.map_or_else(|| "unknown".to_owned(), |c| c.peer.ip().to_string());
    match headers.get(ORIGIN_HEADER) {
        None => Ok(peer),
        Some(value) => {
            let text = value.to_str().map_err(|_| {
                ApiError::invalid(vec![ValidationError::new(
                    "X-Baker-Origin",
                    "must be printable ASCII",
                )])
            })?;
            let client = validate_client(text).map_err(|e| ApiError::invalid(vec![e]))?;
            Ok(format!("{client} from {peer}"))
        }
    }
}

/// A request body: a JSON object of a known shape.
///
/// serde reads a struct from a JSON array as readily as from an object (`["10.0.0.5",8000]`
/// is an instance to it), so every body is checked to be an object before it is read:
/// anything else is refused with 400 and a message naming what was expected.
trait JsonBody: DeserializeOwned {
    /// What the body must be, with an example, for the error message.
    const EXPECTED: &'static str;
}

impl JsonBody for InstanceSpec {
    const EXPECTED: &'static str = r#"an instance such as {"address":"10.0.0.5","port":8000}"#;
}

impl JsonBody for BTreeMap<String, u64> {
    const EXPECTED: &'static str = r#"a route such as {"1":90,"2":10}"#;
}

impl JsonBody for DrainRequest {
    const EXPECTED: &'static str = r#"a drain such as {"reason":"disk full"}, or no body"#;
}

impl JsonBody for AmbassadorReport {
    const EXPECTED: &'static str = r#"an ambassador's report such as {"host":"node-1","services":[],"applied_index":0,"reloads":0,"servers":[],"ttl_ms":7000}"#;
}

/// What kind of JSON value `bytes` holds when it is not an object: `None` for an object, or
/// for text that is no JSON value at all (serde says what is wrong with it).
fn not_an_object(bytes: &[u8]) -> Option<&'static str> {
    let start = bytes.iter().position(|b| !b.is_ascii_whitespace())?;
    let value = &bytes[start..];
    match value[0] {
        b'[' => Some("an array"),
        b'"' => Some("a string"),
        b'-' | b'0'..=b'9' => Some("a number"),
        _ if value.starts_with(b"true") || value.starts_with(b"false") => Some("a boolean"),
        _ if value.starts_with(b"null") => Some("null"),
        _ => None,
    }
}

/// Reads a JSON object of at most [`MAX_BODY`] bytes.
async fn read_json<T: JsonBody>(headers: &HeaderMap, body: Body) -> Result<T, ApiError> {
    read_json_or(headers, body, None).await
}

/// Reads a JSON object of at most [`MAX_BODY`] bytes; an empty body is `empty` when given.
async fn read_json_or<T: JsonBody>(
    headers: &HeaderMap,
    body: Body,
    empty: Option<T>,
) -> Result<T, ApiError> {
    let declared = headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY as u64) {
        return Err(ApiError::TooLarge);
    }
    let bytes = match Limited::new(body, MAX_BODY).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => return Err(ApiError::TooLarge),
        Err(e) => {
            return Err(ApiError::BadRequest(format!(
                "could not read the request body: {e}"
            )))
        }
    };
    if bytes.iter().all(u8::is_ascii_whitespace) {
        if let Some(empty) = empty {
            return Ok(empty);
        }
        return Err(ApiError::BadRequest(format!(
            "the request body is empty: a JSON object is expected, {}",
            T::EXPECTED
        )));
    }
    if let Some(found) = not_an_object(&bytes) {
        return Err(ApiError::BadRequest(format!(
            "the request body must be a JSON object, {}; got {found}",
            T::EXPECTED
        )));
    }
    serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::BadRequest(format!("invalid JSON body: {e}")))
}

async fn put_instance(
    State(app): State<AppState>,
    path: Result<Path<(String, String)>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Instance>, ApiError> {
    let caller = app.auth.writer(&headers)?;
    let Path((service, id)) = path?;
    let (service, id) = instance_path(&service, &id)?;
    app.auth
        .may(&caller, Role::Register, &service, "register instances of")?;
    let spec: InstanceSpec = read_json(&headers, body).await?;
    let spec = spec.validate().map_err(ApiError::invalid)?;
    match app
        .registry
        .register_by(&service, &id, spec, by_of(&caller))
        .await
    {
        Ok(instance) => Ok(Json(instance)),
        Err(e) => Err(e.into()),
    }
}

async fn delete_instance(
    State(app): State<AppState>,
    path: Result<Path<(String, String)>, PathRejection>,
    headers: HeaderMap,
) -> Result<Json<Instance>, ApiError> {
    let caller = app.auth.writer(&headers)?;
    let Path((service, id)) = path?;
    let (service, id) = instance_path(&service, &id)?;
    app.auth
        .may(&caller, Role::Register, &service, "deregister instances of")?;
    match app
        .registry
        .unregister_by(&service, &id, by_of(&caller))
        .await
    {
        Ok(Some(instance)) => Ok(Json(instance)),
        Ok(None) => Err(ApiError::NotFound(format!(
            "no instance {id} of service {service}"
        ))),
        Err(e) => Err(e.into()),
    }
}

async fn list_services(State(app): State<AppState>) -> Json<ServicesResponse> {
    Json(app.registry.services())
}

async fn get_service(
    State(app): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<ServiceResponse>, ApiError> {
    let Path(service) = path?;
    let service = service_path(&service)?;
    app.registry.service(&service).map(Json).ok_or_else(|| {
        ApiError::NotFound(format!(
            "no service {service}: it has no live instance and no route"
        ))
    })
}

async fn list_routes(State(app): State<AppState>) -> Json<RoutesResponse> {
    Json(app.registry.routes())
}

async fn get_route(
    State(app): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<RouteResponse>, ApiError> {
    let Path(service) = path?;
    let service = service_path(&service)?;
    match app.registry.route(&service) {
        Some(route) => Ok(Json(route)),
        None => Err(ApiError::NotFound(format!(
            "service {service} has no route"
        ))),
    }
}

/// The query of `PUT /v1/routes/{service}`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RouteQuery {
    /// Set the route even for a service the directory has never seen an instance of.
    #[serde(default)]
    force: bool,
}

async fn put_route(
    State(app): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<RouteQuery>, QueryRejection>,
    conn: Option<Extension<ConnInfo>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<RouteResponse>, ApiError> {
    let caller = app.auth.writer(&headers)?;
    let Path(service) = path?;
    let service = service_path(&service)?;
    app.auth
        .may(&caller, Role::Operate, &service, "set the route of")?;
    let origin = origin(&headers, conn.as_ref(), &caller)?;
    let Query(query) = query.map_err(|r| {
        ApiError::BadRequest(format!(
            "bad query: {} (the only parameter is force=true|false)",
            r.body_text()
        ))
    })?;
    let splits: BTreeMap<String, u64> = read_json(&headers, body).await?;
    let route = validate_route_of(&service, &splits).map_err(ApiError::invalid)?;
    if !query.force {
        // Another service the route sends to must be one the directory has seen, as the routed
        // service must: a misspelt name would silently give its share back to the others.
        let unseen: Vec<ValidationError> = route
            .iter()
            .filter(|(t, _)| *t.service(&service) != service)
            .filter(|(t, _)| !app.registry.knows(t.service(&service)))
            .map(|(t, _)| {
                ValidationError::new(
                    format!("route.{t}"),
                    format!(
                        "service {} has never had a live instance since the directory started, \
                         so the name may be a mistake: check it, or set the route anyway with \
                         force=true (baker route set --force)",
                        t.service(&service)
                    ),
                )
            })
            .collect();
        if !unseen.is_empty() {
            return Err(ApiError::invalid(unseen));
        }
    }
    if !query.force && !app.registry.knows(&service) {
        return Err(ApiError::Conflict(format!(
            "service {service} has never had a live instance since the directory started, so \
             the name may be a mistake: check it, or set the route anyway with force=true \
             (baker route set --force)"
        )));
    }
    if !query.force {
        route_reaches_a_live_instance(&app.registry, &service, &route)?;
    }
    match app
        .registry
        .set_route_by(&service, Some(route), Some(origin))
        .await
    {
        Ok(Some(resp)) => Ok(Json(resp)),
        Ok(None) => Err(ApiError::Internal(anyhow::anyhow!(
            "setting the route of {service} reported no route"
        ))),
        Err(e) => Err(change_failed(e, || {
            format!("saving the route of {service}")
        })),
    }
}

/// Refuses (409) a route none of whose targets has a live instance while `service` has some,
/// naming what runs: such a route would be set aside at once (every live instance serving as
/// with no route), which is rarely what was meant (`v1=90 v2=10` for versions `1` and `2`).
fn route_reaches_a_live_instance(
    registry: &Registry,
    service: &ServiceName,
    route: &baker_client::model::Route,
) -> Result<(), ApiError> {
    let mut live = registry
        .service(service)
        .map(|s| s.instances)
        .unwrap_or_default();
    if live.is_empty() {
        return Ok(());
    }
    let own: BTreeSet<Version> = live.iter().map(|i| i.version.clone()).collect();
    for other in route.other_services(service) {
        live.extend(
            registry
                .service(other)
                .map(|s| s.instances)
                .unwrap_or_default(),
        );
    }
    if !baker_client::route::route_falls_back(route, service, &live) {
        return Ok(());
    }
    let targets: Vec<String> = route.iter().map(|(t, _)| t.to_string()).collect();
    let own: Vec<&Version> = own.iter().collect();
    Err(ApiError::Conflict(format!(
        "no live instance matches a target of this route ({}): {service} runs {} {}; check the \
         targets, or set the route anyway with force=true (baker route set --force), and all \
         of {service}'s live instances serve as with no route until one registers",
        targets.join(", "),
        if own.len() == 1 {
            "version"
        } else {
            "versions"
        },
        listed(&own, own.len())
    )))
}

async fn delete_route(
    State(app): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    conn: Option<Extension<ConnInfo>>,
    headers: HeaderMap,
) -> Result<Json<RouteResponse>, ApiError> {
    let caller = app.auth.writer(&headers)?;
    let Path(service) = path?;
    let service = service_path(&service)?;
    app.auth
        .may(&caller, Role::Operate, &service, "clear the route of")?;
    let origin = origin(&headers, conn.as_ref(), &caller)?;
    match app
        .registry
        .set_route_by(&service, None, Some(origin))
        .await
    {
        Ok(Some(resp)) => Ok(Json(resp)),
        Ok(None) => Err(ApiError::NotFound(format!(
            "service {service} has no route"
        ))),
        Err(e) => Err(change_failed(e, || {
            format!("clearing the route of {service}")
        })),
    }
}

/// The query of `GET /v1/events`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct EventsQuery {
    since: Option<String>,
    until: Option<String>,
    service: Option<String>,
    limit: Option<String>,
}

impl EventsQuery {
    /// What the caller asked for, or every problem with its query at once.
    fn query(self) -> Result<history::Query, ApiError> {
        let mut errors = Vec::new();
        let mut time = |field: &str, value: Option<String>| {
            value.and_then(|v| {
                parse_time(&v)
                    .map_err(|m| errors.push(ValidationError::new(field, m)))
                    .ok()
            })
        };
        let (since, until) = (time("since", self.since), time("until", self.until));
        let service = self.service.and_then(|s| {
            ServiceName::parse_as("service", &s)
                .map_err(|e| errors.push(e))
                .ok()
        });
        let limit = match self.limit.as_deref().map(str::parse::<usize>) {
            None => history::DEFAULT_LIMIT,
            Some(Ok(n)) if (1..=history::MAX_LIMIT).contains(&n) => n,
            Some(_) => {
                errors.push(ValidationError::new(
                    "limit",
                    format!("must be a number from 1 to {}", history::MAX_LIMIT),
                ));
                0
            }
        };
        if errors.is_empty() {
            Ok(history::Query {
                since,
                until,
                service,
                limit,
            })
        } else {
            Err(ApiError::invalid(errors))
        }
    }
}

async fn list_events(
    State(app): State<AppState>,
    query: Result<Query<EventsQuery>, QueryRejection>,
) -> Result<Json<EventsResponse>, ApiError> {
    let Query(query) = query.map_err(|r| {
        ApiError::BadRequest(format!(
            "bad query: {} (the parameters are since, until, service and limit)",
            r.body_text()
        ))
    })?;
    let query = query.query()?;
    Ok(Json(EventsResponse {
        index: app.registry.index(),
        events: app.history.query(&query),
        capacity: app.history.capacity(),
    }))
}

async fn list_maintenance(State(app): State<AppState>) -> Json<MaintenanceResponse> {
    let (index, all) = app.registry.maintenance();
    Json(MaintenanceResponse {
        index,
        maintenance: all.iter().flat_map(|(s, m)| m.entries(s)).collect(),
    })
}

/// Parses the service name and the drained version taken from the path, reporting both when
/// both are bad.
fn version_path(service: &str, version: &str) -> Result<(ServiceName, Target), ApiError> {
    match (service.parse::<ServiceName>(), version.parse::<Version>()) {
        (Ok(service), Ok(version)) => Ok((service, Target::Version(version))),
        (service, version) => Err(ApiError::invalid(
            service.err().into_iter().chain(version.err()).collect(),
        )),
    }
}

/// How a maintenance path names its target: `/v1/maintenance/{service}/instances/{id}` or
/// `/v1/maintenance/{service}/versions/{version}`.
trait TargetPath {
    /// The service and the target, from the path's two segments; every bad one reported.
    fn parse(service: &str, name: &str) -> Result<(ServiceName, Target), ApiError>;
}

/// `/v1/maintenance/{service}/instances/{id}`.
struct InstancePath;

impl TargetPath for InstancePath {
    fn parse(service: &str, id: &str) -> Result<(ServiceName, Target), ApiError> {
        let (service, id) = instance_path(service, id)?;
        Ok((service, Target::Instance(id)))
    }
}

/// `/v1/maintenance/{service}/versions/{version}`.
struct VersionPath;

impl TargetPath for VersionPath {
    fn parse(service: &str, version: &str) -> Result<(ServiceName, Target), ApiError> {
        version_path(service, version)
    }
}

/// The query of `PUT /v1/maintenance/...`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct DrainQuery {
    /// Drain even a target that matches no live instance (ahead of its registration).
    #[serde(default)]
    force: bool,
}

/// `PUT` on a maintenance path: drains its target.
async fn drain<P: TargetPath>(
    State(app): State<AppState>,
    path: Result<Path<(String, String)>, PathRejection>,
    query: Result<Query<DrainQuery>, QueryRejection>,
    conn: Option<Extension<ConnInfo>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<DrainResponse>, ApiError> {
    let Query(query) = query.map_err(|r| {
        ApiError::BadRequest(format!(
            "bad query: {} (the only parameter is force=true|false)",
            r.body_text()
        ))
    })?;
    maintain::<P>(&app, path, conn, headers, Some((body, query.force))).await
}

/// `DELETE` on a maintenance path: undrains its target.
async fn undrain<P: TargetPath>(
    State(app): State<AppState>,
    path: Result<Path<(String, String)>, PathRejection>,
    conn: Option<Extension<ConnInfo>>,
    headers: HeaderMap,
) -> Result<Json<DrainResponse>, ApiError> {
    maintain::<P>(&app, path, conn, headers, None).await
}

/// How many names a refusal lists before "and N more".
const NAMES_SHOWN: usize = 10;

/// `names`, comma-separated, the first [`NAMES_SHOWN`] of `total`.
fn listed<T: std::fmt::Display>(names: &[T], total: usize) -> String {
    let shown: Vec<String> = names
        .iter()
        .take(NAMES_SHOWN)
        .map(ToString::to_string)
        .collect();
    let more = total.saturating_sub(shown.len());
    if more > 0 {
        format!("{} and {more} more", shown.join(", "))
    } else {
        shown.join(", ")
    }
}

/// Refuses (409) a drain whose target matches no live instance, naming what there is: a
/// misspelt service, id or version would drain nothing and say it had.
fn drain_target_is_live(
    registry: &Registry,
    service: &ServiceName,
    target: &Target,
) -> Result<(), ApiError> {
    let instances = registry
        .service(service)
        .map(|s| s.instances)
        .unwrap_or_default();
    let matches = instances.iter().any(|i| match target {
        Target::Instance(id) => i.id == *id,
        Target::Version(version) => i.version == *version,
    });
    if matches {
        return Ok(());
    }
    let found = if instances.is_empty() {
        let (names, total) = registry.live_services(NAMES_SHOWN);
        if total == 0 {
            format!("service {service} has no live instance, nor has any other service")
        } else {
            format!(
                "service {service} has no live instance (services with live instances: {})",
                listed(&names, total)
            )
        }
    } else {
        match target {
            Target::Instance(id) => {
                let ids: Vec<&InstanceId> = instances.iter().map(|i| &i.id).collect();
                format!(
                    "service {service} has no live instance {id} (its instances: {})",
                    listed(&ids, ids.len())
                )
            }
            Target::Version(version) => {
                let versions: BTreeSet<&Version> = instances.iter().map(|i| &i.version).collect();
                let versions: Vec<&Version> = versions.into_iter().collect();
                format!(
                    "no live instance of {service} runs version {version} (it runs {} {})",
                    if versions.len() == 1 {
                        "version"
                    } else {
                        "versions"
                    },
                    listed(&versions, versions.len())
                )
            }
        }
    };
    Err(ApiError::Conflict(format!(
        "{found}: check the name, or drain it ahead of its registration with force=true \
         (baker drain --force)"
    )))
}

/// Drains (with the request's `body` and whether it is forced) or undrains (without one) the
/// target named by `path`, after checking the token, the path, the origin and the body, in
/// that order, and for a drain that is not forced, that its target matches a live instance.
async fn maintain<P: TargetPath>(
    app: &AppState,
    path: Result<Path<(String, String)>, PathRejection>,
    conn: Option<Extension<ConnInfo>>,
    headers: HeaderMap,
    body: Option<(Body, bool)>,
) -> Result<Json<DrainResponse>, ApiError> {
    let caller = app.auth.writer(&headers)?;
    let Path((service, name)) = path?;
    let (service, target) = P::parse(&service, &name)?;
    let doing = if body.is_some() { "drain" } else { "undrain" };
    app.auth.may(&caller, Role::Operate, &service, doing)?;
    let origin = origin(&headers, conn.as_ref(), &caller)?;
    let changed = match body {
        Some((body, force)) => {
            let request: DrainRequest =
                read_json_or(&headers, body, Some(DrainRequest::default())).await?;
            let reason = request
                .reason
                .map(|r| r.parse::<Reason>())
                .transpose()
                .map_err(|e| ApiError::invalid(vec![e]))?;
            if !force {
                drain_target_is_live(&app.registry, &service, &target)?;
            }
            app.registry
                .drain(&service, target.clone(), reason, origin)
                .await
                .map(Some)
        }
        None => app.registry.undrain(&service, target.clone(), origin).await,
    };
    match changed {
        Ok(Some(resp)) => Ok(Json(resp)),
        Ok(None) => Err(ApiError::NotFound(format!(
            "{target} of service {service} is not drained"
        ))),
        Err(e) => Err(change_failed(e, || {
            format!("saving the drains of {service}")
        })),
    }
}

async fn put_ambassador(
    State(app): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    conn: Option<Extension<ConnInfo>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<ReportAck>, ApiError> {
    app.auth.reporter(&headers)?;
    let Path(id) = path?;
    let id: InstanceId = id.parse().map_err(|e| ApiError::invalid(vec![e]))?;
    let report: AmbassadorReport = read_json(&headers, body).await?;
    report.validate().map_err(ApiError::invalid)?;
    let peer = conn
        .map(|Extension(c)| c.peer.to_string())
        .unwrap_or_default();
    let host = report.host.clone();
    if app
        .ambassadors
        .put(id.clone(), report, peer)
        .map_err(ApiError::Quota)?
    {
        tracing::debug!(ambassador = %id, %host, "an ambassador reported for the first time");
    }
    Ok(Json(ReportAck {
        index: app.registry.index(),
    }))
}

async fn delete_ambassador(
    State(app): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
) -> Result<Json<ReportAck>, ApiError> {
    app.auth.reporter(&headers)?;
    let Path(id) = path?;
    let id: InstanceId = id.parse().map_err(|e| ApiError::invalid(vec![e]))?;
    if app.ambassadors.remove(&id) {
        tracing::debug!(ambassador = %id, "an ambassador signed off");
        Ok(Json(ReportAck {
            index: app.registry.index(),
        }))
    } else {
        Err(ApiError::NotFound(format!(
            "no ambassador {id} has reported"
        )))
    }
}

async fn list_ambassadors(State(app): State<AppState>) -> Json<AmbassadorsResponse> {
    Json(app.ambassadors.status(app.registry.index()))
}

/// `200 {"status":"ok"}` while the directory serves; `503` on a replica that cannot follow
/// etcd (it serves its last view, and takes no change).
async fn healthz(State(app): State<AppState>) -> Response {
    match app.registry.following() {
        Some(Err(cause)) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({
                "status": "not following etcd",
                "error": format!("this replica cannot follow etcd: {cause}"),
            })),
        )
            .into_response(),
        _ => Json(serde_json::json!({"status": "ok"})).into_response(),
    }
}

async fn metrics(State(app): State<AppState>) -> Response {
    (
        [(CONTENT_TYPE, crate::metrics::CONTENT_TYPE)],
        app.registry.metrics().encode(),
    )
        .into_response()
}

/// The query of `GET /v1/watch`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct WatchQuery {
    /// The stream's form: `1` (the default) or `2`.
    v: Option<String>,
    /// Comma-separated service names: only these services and their routes.
    service: Option<String>,
}

impl WatchQuery {
    /// What the watcher asked for, or every problem with its query at once.
    fn request(self) -> Result<watch::Request, ApiError> {
        let mut errors = Vec::new();
        let version = match self.v.as_deref() {
            None | Some("1") => watch::Version::V1,
            Some("2") => watch::Version::V2,
            Some(other) => {
                errors.push(ValidationError::new(
                    "v",
                    format!("must be 1 or 2, got {:?}", printable(other)),
                ));
                watch::Version::V1
            }
        };
        let only = self.service.map(|list| {
            let mut only = BTreeSet::new();
            for name in list.split(',') {
                match ServiceName::parse_as("service", name.trim()) {
                    Ok(name) => {
                        only.insert(name);
                    }
                    Err(e) => errors.push(e),
                }
            }
            if only.len() > MAX_WATCH_SERVICES {
                errors.push(ValidationError::new(
                    "service",
                    format!(
                        "names {} services; a watch may name at most {MAX_WATCH_SERVICES} \
                         (watch them all without service=)",
                        only.len()
                    ),
                ));
            }
            only
        });
        if errors.is_empty() {
            Ok(watch::Request { version, only })
        } else {
            Err(ApiError::invalid(errors))
        }
    }
}

async fn watch(
    State(app): State<AppState>,
    query: Result<Query<WatchQuery>, QueryRejection>,
    conn: Option<Extension<ConnInfo>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let caller = app.auth.watcher(&headers)?;
    let grant = app.auth.watch_grant(caller)?;
    let Query(query) = query.map_err(|r| {
        ApiError::BadRequest(format!(
            "bad query: {} (the parameters are v=1|2 and service=NAME[,NAME...])",
            r.body_text()
        ))
    })?;
    let request = query.request()?;
    let (close, peer, slot) = match conn {
        Some(Extension(c)) => {
            let slot = c.watch_slots.try_acquire_owned().map_err(|_| {
                app.registry.metrics().watches_refused.inc();
                tracing::warn!(
                    peer = %c.peer,
                    "refused a watch: {} watch streams are open, the most BAKER_MAX_WATCHES allows",
                    c.max_watches
                );
                ApiError::Busy(format!(
                    "{} watch streams are open, the most BAKER_MAX_WATCHES allows: try again later",
                    c.max_watches
                ))
            })?;
            (c.close, c.peer.to_string(), Some(slot))
        }
        None => (CancellationToken::new(), "unknown".to_owned(), None),
    };
    let body = watch::open(
        &app.registry,
        request,
        app.watch,
        close,
        app.shutdown.clone(),
        peer,
        grant,
    );
    // The slot is held as long as the stream is.
    let body = Body::new(crate::server::Holding::new(body, slot));
    Ok((
        [
            (CONTENT_TYPE, watch::CONTENT_TYPE),
            (CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_body_must_be_an_object() {
        for (body, found) in [
            (r#"["127.0.0.1",8080]"#, Some("an array")),
            (" \n[\"reason\"]", Some("an array")),
            (r#""reason""#, Some("a string")),
            ("true", Some("a boolean")),
            ("null", Some("null")),
            ("-1", Some("a number")),
            ("8080", Some("a number")),
            (r#" {"address":"10.0.0.5","port":8000}"#, None),
            ("not json", None),
        ] {
            assert_eq!(not_an_object(body.as_bytes()), found, "{body}");
        }
    }

    #[tokio::test]
    async fn every_body_refuses_an_array_naming_what_it_expected() {
        async fn refused<T: JsonBody + std::fmt::Debug>(body: &str) -> String {
            match read_json::<T>(&HeaderMap::new(), Body::from(body.to_owned())).await {
                Err(ApiError::BadRequest(m)) => m,
                other => panic!("{body} gave {other:?}"),
            }
        }
        assert_eq!(
            refused::<InstanceSpec>(r#"["127.0.0.1",8080]"#).await,
            r#"the request body must be a JSON object, an instance such as {"address":"10.0.0.5","port":8000}; got an array"#
        );
        assert!(refused::<DrainRequest>(r#"["reason"]"#)
            .await
            .ends_with("a drain such as {\"reason\":\"disk full\"}, or no body; got an array"));
        assert!(refused::<BTreeMap<String, u64>>("[]")
            .await
            .contains("a route such as"));
        assert!(refused::<AmbassadorReport>("null")
            .await
            .ends_with("got null"));
        // The example of each message is itself a body its endpoint accepts.
        for example in [InstanceSpec::EXPECTED, AmbassadorReport::EXPECTED] {
            let json = &example[example.find('{').unwrap()..];
            assert!(
                serde_json::from_str::<serde_json::Value>(json).is_ok(),
                "{json}"
            );
        }
        let spec: InstanceSpec = read_json(
            &HeaderMap::new(),
            Body::from(r#"{"address":"10.0.0.5","port":8000}"#),
        )
        .await
        .unwrap();
        assert_eq!(spec.port, 8000);
    }
}
