//! The greeting's HTTP endpoints: the greeting itself, health, and the control calls tests and
//! demos use to make an instance fail, hang or exit.

use std::borrow::Cow;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::health::{Health, HealthSwitch};

/// Longest `name` a greeting accepts.
pub const MAX_NAME_LEN: usize = 100;

/// What the handlers share.
#[derive(Debug)]
pub struct Shared {
    /// Greetings served so far; the next greeting's id is this plus one.
    counter: AtomicU64,
    version: String,
    instance: String,
    health: HealthSwitch,
    shutdown: CancellationToken,
    /// The exit code asked for by `POST /control/exit`.
    exit_code: AtomicI32,
}

impl Shared {
    pub fn new(version: String, instance: String, shutdown: CancellationToken) -> Arc<Self> {
        Arc::new(Self {
            counter: AtomicU64::new(0),
            version,
            instance,
            health: HealthSwitch::default(),
            shutdown,
            exit_code: AtomicI32::new(0),
        })
    }

    pub fn version(&self) -> &str {
        &self.version
    }

    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// The exit code the process should end with.
    pub fn exit_code(&self) -> i32 {
        self.exit_code.load(Ordering::Relaxed)
    }
}

/// The greeting's routes.
pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/greeting", get(greeting))
        .route("/health", get(health))
        .route("/control/health", get(get_health).put(put_health))
        .route("/control/exit", post(exit))
        .with_state(shared)
}

#[derive(Debug, Deserialize)]
struct GreetingQuery {
    name: Option<String>,
    /// Answer only after this many milliseconds (at most [`MAX_DELAY_MS`]): a slow request,
    /// for tests of what happens to requests in flight.
    delay_ms: Option<u64>,
}

/// Longest `delay_ms` a greeting accepts.
const MAX_DELAY_MS: u64 = 10_000;

#[derive(Debug, Serialize)]
struct GreetingBody<'a> {
    id: u64,
    content: Cow<'a, str>,
    version: &'a str,
    instance: &'a str,
}

fn json(status: StatusCode, body: Vec<u8>) -> Response {
    let mut resp = Response::new(Body::from(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

fn error(status: StatusCode, message: &str) -> Response {
    let body = serde_json::json!({ "error": message });
    json(status, body.to_string().into_bytes())
}

async fn greeting(
    State(shared): State<Arc<Shared>>,
    Query(query): Query<GreetingQuery>,
) -> Response {
    let content = match query.name.as_deref() {
        None => Cow::Borrowed("Hello, World!"),
        Some(name) if name.is_empty() || name.chars().count() > MAX_NAME_LEN => {
            return error(
                StatusCode::BAD_REQUEST,
                &format!("name must be 1 to {MAX_NAME_LEN} characters"),
            )
        }
        Some(name) => Cow::Owned(format!("Hello, {name}!")),
    };
    match query.delay_ms {
        Some(ms) if ms > MAX_DELAY_MS => {
            return error(
                StatusCode::BAD_REQUEST,
                &format!("delay_ms must be at most {MAX_DELAY_MS}"),
            )
        }
        Some(ms) => tokio::time::sleep(std::time::Duration::from_millis(ms)).await,
        None => {}
    }
    let body = GreetingBody {
        id: shared.counter.fetch_add(1, Ordering::Relaxed) + 1,
        content,
        version: &shared.version,
        instance: &shared.instance,
    };
    let mut buf = Vec::with_capacity(128);
    match serde_json::to_writer(&mut buf, &body) {
        Ok(()) => json(StatusCode::OK, buf),
        Err(e) => {
            tracing::error!("encoding a greeting: {e}");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

async fn health(State(shared): State<Arc<Shared>>) -> Response {
    let now = match shared.health.get() {
        Health::Hang => tokio::select! {
            h = shared.health.settled() => h,
            // Stopping: answer rather than hold the shutdown up.
            () = shared.shutdown.cancelled() => Health::Fail,
        },
        h => h,
    };
    match now {
        Health::Ok => (StatusCode::OK, "ok\n").into_response(),
        _ => (StatusCode::SERVICE_UNAVAILABLE, "fail\n").into_response(),
    }
}

async fn get_health(State(shared): State<Arc<Shared>>) -> String {
    format!("{}\n", shared.health.get())
}

async fn put_health(State(shared): State<Arc<Shared>>, body: String) -> Response {
    match body.parse::<Health>() {
        Ok(h) => {
            let before = shared.health.set(h);
            if before != h {
                tracing::info!("health set to {h} (was {before})");
            }
            format!("{h}\n").into_response()
        }
        Err(e) => error(StatusCode::BAD_REQUEST, &e),
    }
}

#[derive(Debug, Deserialize)]
struct ExitQuery {
    code: Option<String>,
}

async fn exit(State(shared): State<Arc<Shared>>, Query(query): Query<ExitQuery>) -> Response {
    let code = match query.code.as_deref().map(str::parse::<u8>) {
        None => 0,
        Some(Ok(c)) => i32::from(c),
        Some(Err(_)) => {
            return error(
                StatusCode::BAD_REQUEST,
                "code must be a number between 0 and 255",
            )
        }
    };
    tracing::info!("exit requested over HTTP (code {code})");
    shared.exit_code.store(code, Ordering::Relaxed);
    shared.shutdown.cancel();
    (StatusCode::ACCEPTED, "exiting\n").into_response()
}
