//! The one call swarm discovery makes without bollard: `GET /tasks`, whose answer carries each
//! task's network attachments (`NetworksAttachments`), which bollard's task model leaves out.
//!
//! A plain HTTP/1.1 request over the engine's Unix socket (`DOCKER_HOST=unix://...`, by
//! default `/var/run/docker.sock`) or TCP without TLS (`DOCKER_HOST=tcp://...`); one
//! connection per call, which costs a few microseconds on a Unix socket.

use std::collections::HashMap;
use std::path::PathBuf;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use serde::Deserialize;

use super::{Attachment, Task};
use crate::docker::DEFAULT_SOCKET;

/// Why the task list could not be read.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(
        "DOCKER_HOST {0:?} is not unix:// or tcp:// (swarm discovery does not speak TLS or SSH)"
    )]
    Host(String),
    #[error("cannot connect to the Docker engine")]
    Connect(#[source] std::io::Error),
    #[error("the request to the Docker engine failed")]
    Http(#[source] hyper::Error),
    #[error("the Docker engine answered {status}: {body}")]
    Status { status: u16, body: String },
    #[error("the Docker engine's answer is not the expected JSON")]
    Json(#[source] serde_json::Error),
}

/// Where the engine listens.
#[derive(Debug, Clone)]
enum Address {
    Unix(PathBuf),
    Tcp(String),
}

/// The engine, as `DOCKER_HOST` names it, at API version `version`.
#[derive(Debug, Clone)]
pub struct Engine {
    address: Address,
    version: String,
}

impl Engine {
    /// The engine `DOCKER_HOST` names (default: the Unix socket), spoken to at API `version`
    /// (as negotiated, e.g. `1.41`).
    pub fn from_env(version: &str) -> Result<Engine, EngineError> {
        let host = std::env::var("DOCKER_HOST").unwrap_or_default();
        Engine::new(&host, version)
    }

    fn new(host: &str, version: &str) -> Result<Engine, EngineError> {
        let address = if host.is_empty() {
            Address::Unix(PathBuf::from(DEFAULT_SOCKET))
        } else if let Some(path) = host.strip_prefix("unix://") {
            Address::Unix(PathBuf::from(path))
        } else if let Some(addr) = host.strip_prefix("tcp://") {
            Address::Tcp(addr.trim_end_matches('/').to_owned())
        } else {
            return Err(EngineError::Host(host.to_owned()));
        };
        Ok(Engine {
            address,
            version: version.to_owned(),
        })
    }

    /// The tasks of `services` whose desired state is `running`.
    pub async fn running_tasks(&self, services: &[&str]) -> Result<Vec<Task>, EngineError> {
        let filters = serde_json::json!({
            "desired-state": ["running"],
            "service": services,
        });
        let path = format!(
            "/v{}/tasks?filters={}",
            self.version,
            encode(&filters.to_string())
        );
        let body = self.get(&path).await?;
        let raw: Vec<RawTask> = serde_json::from_slice(&body).map_err(EngineError::Json)?;
        Ok(raw.into_iter().map(RawTask::into_task).collect())
    }

    async fn get(&self, path: &str) -> Result<Bytes, EngineError> {
        match &self.address {
            Address::Unix(socket) => {
                let stream = tokio::net::UnixStream::connect(socket)
                    .await
                    .map_err(EngineError::Connect)?;
                request(stream, path).await
            }
            Address::Tcp(addr) => {
                let stream = tokio::net::TcpStream::connect(addr.as_str())
                    .await
                    .map_err(EngineError::Connect)?;
                request(stream, path).await
            }
        }
    }
}

async fn request<S>(stream: S, path: &str) -> Result<Bytes, EngineError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(EngineError::Http)?;
    let connection = tokio::spawn(connection);
    let request = hyper::Request::get(path)
        .header(hyper::header::HOST, "docker")
        .body(Empty::<Bytes>::new())
        .expect("a GET with a path and a host header is a valid request");
    let response = sender
        .send_request(request)
        .await
        .map_err(EngineError::Http)?;
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(EngineError::Http)?
        .to_bytes();
    connection.abort();
    if !status.is_success() {
        return Err(EngineError::Status {
            status: status.as_u16(),
            body: String::from_utf8_lossy(&body).trim().to_owned(),
        });
    }
    Ok(body)
}

/// `s` with every byte outside the URL's unreserved characters percent-encoded.
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 2);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[derive(Debug, Deserialize, Default)]
#[serde(rename_all = "PascalCase", default)]
struct RawTask {
    #[serde(rename = "ID")]
    id: String,
    #[serde(rename = "ServiceID")]
    service_id: String,
    slot: Option<u64>,
    #[serde(rename = "NodeID")]
    node_id: String,
    desired_state: String,
    created_at: String,
    status: RawStatus,
    networks_attachments: Vec<RawAttachment>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(rename_all = "PascalCase", default)]
struct RawStatus {
    state: String,
    container_status: Option<RawContainerStatus>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(rename_all = "PascalCase", default)]
struct RawContainerStatus {
    #[serde(rename = "ContainerID")]
    container_id: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(rename_all = "PascalCase", default)]
struct RawAttachment {
    network: RawNetwork,
    addresses: Vec<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(rename_all = "PascalCase", default)]
struct RawNetwork {
    spec: RawNetworkSpec,
}

#[derive(Debug, Deserialize, Default)]
#[serde(rename_all = "PascalCase", default)]
struct RawNetworkSpec {
    name: String,
    ingress: bool,
    labels: HashMap<String, String>,
}

impl RawTask {
    fn into_task(self) -> Task {
        Task {
            id: self.id,
            service_id: self.service_id,
            slot: self.slot.filter(|s| *s > 0),
            node_id: self.node_id,
            desired_state: self.desired_state,
            state: self.status.state,
            container_id: self
                .status
                .container_status
                .and_then(|c| c.container_id)
                .filter(|c| !c.is_empty()),
            created_at: self.created_at,
            networks: self
                .networks_attachments
                .into_iter()
                .map(|a| Attachment {
                    // The routing mesh: `Ingress` is set on engines since 17.05; older ones only
                    // name it `ingress` and mark it internal.
                    ingress: a.network.spec.ingress
                        || (a.network.spec.name == "ingress"
                            && a.network
                                .spec
                                .labels
                                .contains_key("com.docker.swarm.internal")),
                    network: a.network.spec.name,
                    address: a
                        .addresses
                        .iter()
                        .map(|a| a.split('/').next().unwrap_or_default().to_owned())
                        .find(|a| !a.is_empty()),
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_task_of_the_engine_reads_as_a_task() {
        // Abridged from Engine 20.10's GET /v1.41/tasks.
        let json = r#"[{"ID":"k3j2h1g4f5d6s7a8","Version":{"Index":30},"CreatedAt":"2026-01-01T10:00:00.1Z",
            "Spec":{"ContainerSpec":{"Image":"baker/greeting"}},"ServiceID":"svc1","Slot":2,
            "NodeID":"node1","Status":{"Timestamp":"2026-01-01T10:00:01Z","State":"running",
            "Message":"started","ContainerStatus":{"ContainerID":"c0ffee","PID":42,"ExitCode":0}},
            "DesiredState":"running","NetworksAttachments":[
              {"Network":{"ID":"n1","Spec":{"Name":"ingress","Labels":{"com.docker.swarm.internal":"true"},"Ingress":true}},"Addresses":["10.0.0.7/24"]},
              {"Network":{"ID":"n2","Spec":{"Name":"baker","Labels":{},"Attachable":true}},"Addresses":["10.0.1.9/24"]}]}]"#;
        let raw: Vec<RawTask> = serde_json::from_str(json).unwrap();
        let task = raw.into_iter().next().unwrap().into_task();
        assert_eq!(task.id, "k3j2h1g4f5d6s7a8");
        assert_eq!((task.service_id.as_str(), task.slot), ("svc1", Some(2)));
        assert_eq!(task.node_id, "node1");
        assert_eq!(
            (task.desired_state.as_str(), task.state.as_str()),
            ("running", "running")
        );
        assert_eq!(task.container_id.as_deref(), Some("c0ffee"));
        assert_eq!(
            task.networks,
            [
                Attachment {
                    network: "ingress".into(),
                    ingress: true,
                    address: Some("10.0.0.7".into())
                },
                Attachment {
                    network: "baker".into(),
                    ingress: false,
                    address: Some("10.0.1.9".into())
                },
            ]
        );
        // A global service's task has no slot (0 or absent).
        let raw: Vec<RawTask> = serde_json::from_str(r#"[{"ID":"t","Slot":0}]"#).unwrap();
        assert_eq!(raw.into_iter().next().unwrap().into_task().slot, None);
    }

    #[test]
    fn filters_are_percent_encoded_and_hosts_checked() {
        assert_eq!(
            encode(r#"{"a":["b c"]}"#),
            "%7B%22a%22%3A%5B%22b%20c%22%5D%7D"
        );
        assert!(
            matches!(Engine::new("", "1.41").unwrap().address, Address::Unix(p) if p == std::path::Path::new(DEFAULT_SOCKET))
        );
        assert!(
            matches!(Engine::new("unix:///run/d.sock", "1.41").unwrap().address, Address::Unix(p) if p == std::path::Path::new("/run/d.sock"))
        );
        assert!(
            matches!(Engine::new("tcp://10.0.0.1:2375", "1.41").unwrap().address, Address::Tcp(a) if a == "10.0.0.1:2375")
        );
        assert!(Engine::new("ssh://me@host", "1.41").is_err());
    }
}
