//! The Greeting example service, for demos, tests and benchmarks.
//!
//! `GET /greeting` answers `{"id":N,"content":"Hello, World!","version":"1","instance":"..."}`
//! with `N` counting the greetings this process served; `GET /health` answers 200, or 503 or
//! nothing at all once told to over `PUT /control/health`; `POST /control/exit` stops it.
//!
//! - [`config`]: `BAKER_LISTEN`, `BAKER_VERSION`, `BAKER_INSTANCE`.
//! - [`health`]: the switchable health state.
//! - [`api`]: the HTTP routes.

pub mod api;
pub mod config;
pub mod health;

use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use config::Config;

/// How long in-flight requests may run on after a stop is asked for.
pub const GRACE: Duration = Duration::from_secs(2);

/// Serves the greeting on `listener` until `shutdown` is cancelled (by a signal, or by
/// `POST /control/exit`), then returns the exit code the process should end with.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: CancellationToken,
) -> std::io::Result<i32> {
    let addr = listener.local_addr()?;
    let shared = api::Shared::new(
        config.version.to_string(),
        config.instance,
        shutdown.clone(),
    );
    let app = api::router(shared.clone());
    tracing::info!(
        "greeting version {} instance {} listening on {addr}",
        shared.version(),
        shared.instance()
    );
    let stop_delay = config.stop_delay;
    let stopping = {
        let shutdown = shutdown.clone();
        async move {
            shutdown.cancelled().await;
            if !stop_delay.is_zero() {
                tracing::info!("asked to stop: answering for {stop_delay:?} more, then stopping");
                tokio::time::sleep(stop_delay).await;
            }
        }
    };
    let serve = axum::serve(listener, app).with_graceful_shutdown(stopping);
    tokio::select! {
        res = serve => res?,
        () = async { shutdown.cancelled().await; tokio::time::sleep(stop_delay + GRACE).await } => {
            tracing::warn!("connections still open after {GRACE:?}: closing them");
        }
    }
    tracing::info!("stopped");
    Ok(shared.exit_code())
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn start() -> (
        String,
        CancellationToken,
        tokio::task::JoinHandle<std::io::Result<i32>>,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let config = Config {
            listen: listener.local_addr().unwrap(),
            version: "2".parse().unwrap(),
            instance: "g-1".parse().unwrap(),
            stop_delay: Duration::ZERO,
        };
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(run(listener, config, shutdown.clone()));
        (url, shutdown, task)
    }

    #[tokio::test]
    async fn greets_counts_and_switches_health() {
        let (url, shutdown, task) = start().await;
        let http = reqwest::Client::new();
        let get = |path: &str| http.get(format!("{url}{path}")).send();

        let first: serde_json::Value = get("/greeting").await.unwrap().json().await.unwrap();
        assert_eq!(
            first,
            serde_json::json!({"id": 1, "content": "Hello, World!", "version": "2", "instance": "g-1"})
        );
        let second: serde_json::Value = get("/greeting?name=Baker")
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(
            (second["id"].as_u64(), second["content"].as_str()),
            (Some(2), Some("Hello, Baker!"))
        );
        assert_eq!(get("/greeting?name=").await.unwrap().status(), 400);

        assert_eq!(get("/health").await.unwrap().status(), 200);
        let put = |body: &'static str| http.put(format!("{url}/control/health")).body(body).send();
        assert_eq!(put("fail").await.unwrap().status(), 200);
        assert_eq!(get("/health").await.unwrap().status(), 503);
        let bad = put("sick").await.unwrap();
        assert_eq!(bad.status(), 400);
        assert!(bad.text().await.unwrap().contains("ok, fail or hang"));

        put("hang").await.unwrap();
        let hung = tokio::time::timeout(Duration::from_millis(300), get("/health")).await;
        assert!(hung.is_err(), "a hanging health check answered");
        let pending = tokio::spawn(get("/health"));
        put("ok").await.unwrap();
        assert_eq!(pending.await.unwrap().unwrap().status(), 200);

        shutdown.cancel();
        assert_eq!(task.await.unwrap().unwrap(), 0);
    }

    #[tokio::test]
    async fn exit_over_http_stops_with_the_code() {
        let (url, _shutdown, task) = start().await;
        let http = reqwest::Client::new();
        let resp = http
            .post(format!("{url}/control/exit?code=3"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 202);
        let code = tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .unwrap();
        assert_eq!(code.unwrap().unwrap(), 3);
    }

    #[tokio::test]
    async fn a_hanging_health_check_does_not_hold_up_shutdown() {
        let (url, shutdown, task) = start().await;
        let http = reqwest::Client::new();
        http.put(format!("{url}/control/health"))
            .body("hang")
            .send()
            .await
            .unwrap();
        let pending = tokio::spawn(http.get(format!("{url}/health")).send());
        tokio::time::sleep(Duration::from_millis(50)).await;
        shutdown.cancel();
        let started = std::time::Instant::now();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert!(
            started.elapsed() < GRACE,
            "shutdown waited for the grace period"
        );
        assert_eq!(pending.await.unwrap().unwrap().status(), 503);
    }
}
