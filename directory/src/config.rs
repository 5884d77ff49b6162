//! The directory's configuration, read from `BAKER_*` variables.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use baker_client::config::ConfigErrors;
use serde::Deserialize;

/// Default listen address.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:7700";
/// Default data directory (relative to the working directory).
pub const DEFAULT_DATA: &str = "./data";
/// Default limit of open client connections (watchers included).
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;
/// Default time a non-watch request may take, body included.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// The variables as the environment gives them; every field is parsed by [`Config::from_env`].
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(default)]
pub struct Env {
    pub listen: Option<String>,
    pub token: Option<String>,
    pub data: Option<String>,
    pub docker: Option<String>,
    pub docker_network: Option<String>,
    pub max_connections: Option<String>,
    pub request_timeout: Option<String>,
}

/// Whether the directory discovers labelled containers from the Docker engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DockerMode {
    /// On when the Docker socket exists, off otherwise.
    #[default]
    Auto,
    /// Always on: failing to reach the engine is logged and retried.
    On,
    /// Never.
    Off,
}

impl FromStr for DockerMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(DockerMode::Auto),
            "on" => Ok(DockerMode::On),
            "off" => Ok(DockerMode::Off),
            _ => Err("must be auto, on or off".into()),
        }
    }
}

impl fmt::Display for DockerMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DockerMode::Auto => "auto",
            DockerMode::On => "on",
            DockerMode::Off => "off",
        })
    }
}

/// Everything the directory needs to run. Tests build it directly.
#[derive(Debug, Clone)]
pub struct Config {
    /// `BAKER_LISTEN`: where the HTTP API listens (the binary binds it; `run` takes the listener).
    pub listen: SocketAddr,
    /// `BAKER_TOKEN`: the bearer token every mutating call must present; `None` leaves them open.
    pub token: Option<String>,
    /// `BAKER_DATA`: the directory holding `routes.json`, created if missing.
    pub data: PathBuf,
    /// `BAKER_DOCKER`: used by Docker discovery.
    pub docker: DockerMode,
    /// `BAKER_DOCKER_NETWORK`: used by Docker discovery, the network whose address a discovered
    /// container is registered with (default: the container's first network).
    pub docker_network: Option<String>,
    /// `BAKER_MAX_CONNECTIONS`: open connections beyond this wait in the kernel's accept queue.
    pub max_connections: usize,
    /// `BAKER_REQUEST_TIMEOUT`: longest time a request other than a watch may take, body
    /// included; also bounds how long a client may take to send its request headers.
    pub request_timeout: Duration,
    /// Interval of `ping` lines on an idle watch stream.
    pub watch_ping: Duration,
    /// Most lines one watcher may have queued before it is disconnected as too slow.
    pub watch_backlog_lines: usize,
    /// Most bytes one watcher may have queued before it is disconnected as too slow.
    pub watch_backlog_bytes: usize,
    /// How long open connections get to finish on shutdown before they are closed.
    pub shutdown_grace: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: DEFAULT_LISTEN.parse().expect("constant address"),
            token: None,
            data: PathBuf::from(DEFAULT_DATA),
            docker: DockerMode::Auto,
            docker_network: None,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            watch_ping: Duration::from_secs(5),
            watch_backlog_lines: 1024,
            watch_backlog_bytes: 16 * 1024 * 1024,
            shutdown_grace: Duration::from_millis(500),
        }
    }
}

impl Config {
    /// Parses every variable, reporting all bad ones at once.
    pub fn from_env(env: &Env) -> Result<Config, ConfigErrors> {
        let mut errs = ConfigErrors::default();
        let defaults = Config::default();
        let listen = errs.parse("BAKER_LISTEN", env.listen.as_deref(), |s| {
            s.parse::<SocketAddr>()
                .map_err(|_| "must be an address such as 0.0.0.0:7700 or [::]:7700")
        });
        let token = errs
            .parse("BAKER_TOKEN", env.token.as_deref(), parse_token)
            .flatten();
        let data = errs.parse("BAKER_DATA", env.data.as_deref(), |s| {
            if s.is_empty() {
                Err("must name a directory")
            } else {
                Ok(PathBuf::from(s))
            }
        });
        let docker = errs.value("BAKER_DOCKER", env.docker.as_deref(), DockerMode::Auto);
        let docker_network = errs
            .parse(
                "BAKER_DOCKER_NETWORK",
                env.docker_network.as_deref(),
                parse_network,
            )
            .flatten();
        let max_connections = errs.parse(
            "BAKER_MAX_CONNECTIONS",
            env.max_connections.as_deref(),
            |s| match s.parse::<usize>() {
                Ok(n) if (1..=1_000_000).contains(&n) => Ok(n),
                _ => Err("must be a number between 1 and 1000000"),
            },
        );
        let request_timeout = errs.duration(
            "BAKER_REQUEST_TIMEOUT",
            env.request_timeout.as_deref(),
            defaults.request_timeout,
        );
        errs.finish(Config {
            listen: listen.unwrap_or(defaults.listen),
            token,
            data: data.unwrap_or(defaults.data),
            docker,
            docker_network,
            max_connections: max_connections.unwrap_or(defaults.max_connections),
            request_timeout,
            ..Config::default()
        })
    }
}

/// A token must be something a client can put in an `Authorization` header; empty means none.
fn parse_token(s: &str) -> Result<Option<String>, &'static str> {
    if s.is_empty() {
        return Ok(None);
    }
    if !s.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("must be printable ASCII without spaces");
    }
    Ok(Some(s.to_owned()))
}

/// Docker network names: `[a-zA-Z0-9][a-zA-Z0-9_.-]*`; empty means none.
fn parse_network(s: &str) -> Result<Option<String>, &'static str> {
    if s.is_empty() {
        return Ok(None);
    }
    let ok = s.len() <= 255
        && s.starts_with(|c: char| c.is_ascii_alphanumeric())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if ok {
        Ok(Some(s.to_owned()))
    } else {
        Err("must be a Docker network name (letters, digits, '_', '.', '-')")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Env {
        baker_client::config::read_env_pairs(pairs).expect("reading variables")
    }

    #[test]
    fn defaults() {
        let c = Config::from_env(&env(&[])).unwrap();
        assert_eq!(c.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(c.data, PathBuf::from(DEFAULT_DATA));
        assert_eq!(c.docker, DockerMode::Auto);
        assert_eq!(c.token, None);
        assert_eq!(c.docker_network, None);
    }

    #[test]
    fn parses_every_variable() {
        let c = Config::from_env(&env(&[
            ("LISTEN", "127.0.0.1:0"),
            ("TOKEN", "s3cret"),
            ("DATA", "/tmp/x"),
            ("DOCKER", "OFF"),
            ("DOCKER_NETWORK", "baker_net"),
            ("MAX_CONNECTIONS", "10"),
            ("REQUEST_TIMEOUT", "2s"),
        ]))
        .unwrap();
        assert_eq!(c.listen.port(), 0);
        assert_eq!(c.token.as_deref(), Some("s3cret"));
        assert_eq!(c.data, PathBuf::from("/tmp/x"));
        assert_eq!(c.docker, DockerMode::Off);
        assert_eq!(c.docker_network.as_deref(), Some("baker_net"));
        assert_eq!(c.max_connections, 10);
        assert_eq!(c.request_timeout, Duration::from_secs(2));
        let empty = Config::from_env(&env(&[("TOKEN", "")])).unwrap();
        assert_eq!(empty.token, None);
    }

    #[test]
    fn reports_every_bad_variable() {
        let errs = Config::from_env(&env(&[
            ("LISTEN", "nowhere"),
            ("TOKEN", "two words"),
            ("DATA", ""),
            ("DOCKER", "maybe"),
            ("DOCKER_NETWORK", "bad/net"),
            ("MAX_CONNECTIONS", "0"),
            ("REQUEST_TIMEOUT", "10"),
        ]))
        .unwrap_err();
        let vars: Vec<_> = errs.0.iter().map(|(v, _)| v.as_str()).collect();
        assert_eq!(
            vars,
            [
                "BAKER_LISTEN",
                "BAKER_TOKEN",
                "BAKER_DATA",
                "BAKER_DOCKER",
                "BAKER_DOCKER_NETWORK",
                "BAKER_MAX_CONNECTIONS",
                "BAKER_REQUEST_TIMEOUT"
            ]
        );
    }
}
