//! The Docker side of the scenarios: labelled containers the directory discovers, and image
//! sizes. Everything here explains itself with a reason when Docker or the images are missing.

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context};

use crate::daemons::{self, Ambassador};
use crate::scenario::convergence::{docker_trials, DockerConvergence};
use crate::scenario::Ctx;

/// The images `docker/build.sh` builds.
pub const IMAGES: [&str; 4] = [
    "baker/directory",
    "baker/registrar",
    "baker/ambassador",
    "baker/greeting",
];

fn docker(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("docker")
        .args(args)
        .output()
        .context("running docker")?;
    if !out.status.success() {
        bail!(
            "docker {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

async fn docker_async(args: Vec<String>) -> anyhow::Result<String> {
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        docker(&args)
    })
    .await?
}

/// Whether the engine answers.
pub fn engine() -> anyhow::Result<()> {
    docker(&["version", "--format", "{{.Server.Version}}"])
        .map(|_| ())
        .context("the Docker engine does not answer")
}

/// Size in bytes of each image that exists; missing ones are `None`.
pub fn image_sizes() -> Vec<(String, Option<u64>)> {
    IMAGES
        .iter()
        .map(|name| {
            let size = docker(&["image", "inspect", "--format", "{{.Size}}", name])
                .ok()
                .and_then(|s| s.parse().ok());
            (name.to_string(), size)
        })
        .collect()
}

/// A labelled greeting container, removed when dropped.
pub struct Container {
    pub name: String,
    /// The instance id the greeting reports (its `BAKER_INSTANCE`).
    pub instance: String,
}

impl Container {
    /// Creates (without starting) a greeting container labelled for discovery as `service`.
    pub fn create(service: &str) -> anyhow::Result<Container> {
        let name = format!("baker-bench-{}-{service}", std::process::id());
        let _ = docker(&["rm", "-f", &name]);
        docker(&[
            "create",
            "--name",
            &name,
            "--label",
            &format!("baker.service={service}"),
            "--label",
            "baker.port=8080",
            "--label",
            "baker.version=1",
            "-e",
            &format!("BAKER_INSTANCE={name}"),
            "-e",
            "BAKER_LISTEN=0.0.0.0:8080",
            "baker/greeting",
        ])?;
        Ok(Container {
            instance: name.clone(),
            name,
        })
    }

    pub async fn start(&self) -> anyhow::Result<()> {
        docker_async(vec!["start".into(), self.name.clone()])
            .await
            .map(|_| ())
    }

    pub async fn stop(&self) -> anyhow::Result<()> {
        docker_async(vec![
            "stop".into(),
            "-t".into(),
            "10".into(),
            self.name.clone(),
        ])
        .await
        .map(|_| ())
    }

    /// When the container last turned healthy at or after `since`: the end of its first passing
    /// HEALTHCHECK probe from `docker inspect`. `None` without a HEALTHCHECK.
    pub async fn healthy_since(
        &self,
        since: std::time::SystemTime,
    ) -> Option<std::time::SystemTime> {
        let json = docker_async(vec![
            "inspect".into(),
            "--format".into(),
            "{{json .State.Health}}".into(),
            self.name.clone(),
        ])
        .await
        .ok()?;
        let health: serde_json::Value = serde_json::from_str(&json).ok()?;
        health["Log"]
            .as_array()?
            .iter()
            .filter(|e| e["ExitCode"].as_i64() == Some(0))
            .filter_map(|e| humantime::parse_rfc3339_weak(e["End"].as_str()?).ok())
            .filter(|&t| t >= since)
            .min()
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = docker(&["rm", "-f", &self.name]);
    }
}

/// Convergence for a labelled container: a directory with Docker discovery on, an ambassador
/// routing the container's service, and `trials` start/stop cycles.
pub async fn convergence(ctx: &Ctx, trials: usize) -> anyhow::Result<DockerConvergence> {
    engine()?;
    if docker(&["image", "inspect", "baker/greeting"]).is_err() {
        bail!("image baker/greeting is missing: build the images with docker/build.sh");
    }
    let service = "dgreet";
    let data = tempfile::tempdir()?;
    let (mut dir, dir_url) = daemons::directory(&ctx.bins, data.path(), true).await?;
    let container = Container::create(service)?;
    let mut amb = Ambassador::start(&ctx.bins, &dir_url, &[service], false).await?;
    let entry: SocketAddr = amb.addr(service);
    let result = docker_trials(entry, trials, &container).await;
    for p in [&mut amb.proc, &mut dir] {
        daemons::stop(p, Duration::from_secs(10)).await;
    }
    drop(container);
    result
}
