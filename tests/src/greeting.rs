//! A real `baker-greeting` process for end-to-end tests: the app a registrar probes and an
//! ambassador routes to.

use std::net::SocketAddr;
use std::time::Duration;

use baker_client::model::InstanceSpec;
use baker_client::DirectoryClient;

use crate::Proc;

/// One running `baker-greeting` on an ephemeral loopback port.
pub struct Greeting {
    pub proc: Proc,
    pub addr: SocketAddr,
}

impl Greeting {
    /// Starts a greeting reporting `version` and `instance`, and waits until it listens.
    pub async fn start(version: &str, instance: &str) -> Greeting {
        Self::start_with(version, instance, &[]).await
    }

    /// Like [`Greeting::start`], with extra environment variables.
    pub async fn start_with(version: &str, instance: &str, env: &[(&str, &str)]) -> Greeting {
        let mut vars = vec![
            ("BAKER_LISTEN", "127.0.0.1:0"),
            ("BAKER_VERSION", version),
            ("BAKER_INSTANCE", instance),
        ];
        vars.extend_from_slice(env);
        let mut proc = Proc::baker(&format!("greeting-{instance}"), "baker-greeting", &vars);
        let addr = proc.listen_addr().await;
        Greeting { proc, addr }
    }

    /// Its registration: its address and port, `version`, and a TTL of `ttl_ms`.
    pub fn spec(&self, version: &str, ttl_ms: u64) -> InstanceSpec {
        InstanceSpec {
            address: self.addr.ip().to_string(),
            port: u64::from(self.addr.port()),
            version: Some(version.to_owned()),
            weight: None,
            tags: vec![],
            ttl_ms: Some(ttl_ms),
            zone: None,
        }
    }

    /// A `baker-registrar` registering this greeting as `emitter`/`id` with `directories` (a
    /// list of replicas), probing it every `interval` (its TTL is three intervals).
    pub fn registrar(&self, directories: &str, id: &str, interval: &str) -> Proc {
        let target = self.url();
        Proc::baker(
            &format!("registrar-{id}"),
            "baker-registrar",
            &[
                ("BAKER_DIRECTORY", directories),
                ("BAKER_SERVICE", "emitter"),
                ("BAKER_ID", id),
                ("BAKER_TARGET", target.as_str()),
                ("BAKER_INTERVAL", interval),
                ("BAKER_TIMEOUT", "300ms"),
            ],
        )
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Makes `GET /health` answer 200 (`ok`), 503 (`fail`), or never (`hang`).
    pub async fn set_health(&self, mode: &str) {
        let resp = http()
            .put(format!("{}/control/health", self.url()))
            .body(mode.to_owned())
            .send()
            .await
            .unwrap_or_else(|e| panic!("setting {} health to {mode}: {e}", self.proc.name));
        assert!(
            resp.status().is_success(),
            "setting {} health to {mode}: {}",
            self.proc.name,
            resp.status()
        );
    }

    /// One `GET /greeting`, decoded.
    pub async fn greeting(&self) -> serde_json::Value {
        http()
            .get(format!("{}/greeting", self.url()))
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .unwrap_or_else(|e| panic!("GET /greeting from {}: {e}", self.proc.name))
            .json()
            .await
            .unwrap_or_else(|e| panic!("decoding a greeting from {}: {e}", self.proc.name))
    }

    /// Asks the process to exit (`POST /control/exit`) and waits until it has.
    pub async fn exit(&mut self) {
        let _ = http()
            .post(format!("{}/control/exit", self.url()))
            .send()
            .await;
        self.proc.wait_exit(Duration::from_secs(10)).await;
    }
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .expect("building an HTTP client")
}

/// Registers `g` as `service`/`id` with `version` and a TTL of `ttl_ms`, or panics naming it.
pub async fn register(
    client: &DirectoryClient,
    service: &str,
    g: &Greeting,
    id: &str,
    version: &str,
    ttl_ms: u64,
) {
    client
        .register(service, id, &g.spec(version, ttl_ms))
        .await
        .unwrap_or_else(|e| panic!("registering {service}/{id}: {e}"));
}
