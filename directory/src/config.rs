//! The directory's configuration, read from `BAKER_*` variables.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use baker_client::api::parse_token;
use baker_client::config::vars::{
    self, ENV_DATA, ENV_DOCKER, ENV_DOCKER_NETWORK, ENV_LISTEN, ENV_MAX_CONNECTIONS,
    ENV_REQUEST_TIMEOUT, ENV_TOKEN,
};
use baker_client::config::{ConfigErrors, Environment, Reader};

/// Default listen address.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:7700";
/// Default data directory (relative to the working directory).
pub const DEFAULT_DATA: &str = "./data";
/// Default limit of open client connections (watchers included).
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;
/// Default time a non-watch request may take, body included.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

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
    pub fn from_env(env: &Environment) -> Result<Config, ConfigErrors> {
        let mut r = Reader::new(&vars::DIRECTORY, env);
        let defaults = Config::default();
        let listen = r.parse(ENV_LISTEN, |s| {
            s.parse::<SocketAddr>()
                .map_err(|_| "must be an address such as 0.0.0.0:7700 or [::]:7700")
        });
        let token = r.parse_secret(ENV_TOKEN, parse_token);
        let data = r.parse(ENV_DATA, |s| Ok::<_, String>(PathBuf::from(s)));
        let docker = r.value(ENV_DOCKER, DockerMode::Auto);
        let docker_network = r.parse(ENV_DOCKER_NETWORK, parse_network);
        let max_connections = r.parse(ENV_MAX_CONNECTIONS, |s| match s.parse::<usize>() {
            Ok(n) if (1..=1_000_000).contains(&n) => Ok(n),
            _ => Err("must be a number between 1 and 1000000"),
        });
        let request_timeout = r.duration(ENV_REQUEST_TIMEOUT, defaults.request_timeout);
        r.finish(Config {
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

/// Docker network names: `[a-zA-Z0-9][a-zA-Z0-9_.-]*`.
fn parse_network(s: &str) -> Result<String, &'static str> {
    let ok = s.len() <= 255
        && s.starts_with(|c: char| c.is_ascii_alphanumeric())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if ok {
        Ok(s.to_owned())
    } else {
        Err("must be a Docker network name (letters, digits, '_', '.', '-')")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Environment {
        Environment::from_pairs(pairs)
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
            ("BAKER_LISTEN", "127.0.0.1:0"),
            ("BAKER_TOKEN", "s3cret"),
            ("BAKER_DATA", "/tmp/x"),
            ("BAKER_DOCKER", "OFF"),
            ("BAKER_DOCKER_NETWORK", "baker_net"),
            ("BAKER_MAX_CONNECTIONS", "10"),
            ("BAKER_REQUEST_TIMEOUT", "2s"),
        ]))
        .unwrap();
        assert_eq!(c.listen.port(), 0);
        assert_eq!(c.token.as_deref(), Some("s3cret"));
        assert_eq!(c.data, PathBuf::from("/tmp/x"));
        assert_eq!(c.docker, DockerMode::Off);
        assert_eq!(c.docker_network.as_deref(), Some("baker_net"));
        assert_eq!(c.max_connections, 10);
        assert_eq!(c.request_timeout, Duration::from_secs(2));
        let empty = Config::from_env(&env(&[("BAKER_TOKEN", ""), ("BAKER_DATA", " ")])).unwrap();
        assert_eq!(
            (empty.token, empty.data),
            (None, PathBuf::from(DEFAULT_DATA))
        );
    }

    #[test]
    fn help_shows_the_defaults_in_use() {
        let shown = |name| vars::DIRECTORY.default_of(name).map(str::to_owned);
        let d = |d: Duration| Some(format!("{}s", d.as_secs()));
        assert_eq!(shown(ENV_LISTEN), Some(DEFAULT_LISTEN.to_owned()));
        assert_eq!(shown(ENV_DATA), Some(DEFAULT_DATA.to_owned()));
        assert_eq!(shown(ENV_DOCKER), Some(DockerMode::default().to_string()));
        assert_eq!(
            shown(ENV_MAX_CONNECTIONS),
            Some(DEFAULT_MAX_CONNECTIONS.to_string())
        );
        assert_eq!(shown(ENV_REQUEST_TIMEOUT), d(DEFAULT_REQUEST_TIMEOUT));
    }

    #[test]
    fn reads_exactly_the_listed_variables() {
        let errs = Config::from_env(&Environment::unreadable(&vars::DIRECTORY)).unwrap_err();
        let mut listed: Vec<&str> = vars::DIRECTORY.vars.iter().map(|v| v.name).collect();
        listed.sort_unstable();
        assert_eq!(Environment::reported(&errs), listed);
    }

    #[test]
    fn reports_every_bad_variable() {
        let errs = Config::from_env(&env(&[
            ("BAKER_LISTEN", "nowhere"),
            ("BAKER_TOKEN", "two words"),
            ("BAKER_DOCKER", "maybe"),
            ("BAKER_DOCKER_NETWORK", "bad/net"),
            ("BAKER_MAX_CONNECTIONS", "0"),
            ("BAKER_REQUEST_TIMEOUT", "10"),
            ("BAKER_TOKN", "s3cret"),
        ]))
        .unwrap_err();
        let vars: Vec<_> = errs.0.iter().map(|(v, _)| v.as_str()).collect();
        assert_eq!(
            vars,
            [
                "BAKER_LISTEN",
                "BAKER_TOKEN",
                "BAKER_DOCKER",
                "BAKER_DOCKER_NETWORK",
                "BAKER_MAX_CONNECTIONS",
                "BAKER_REQUEST_TIMEOUT",
                "BAKER_TOKN",
            ]
        );
        assert_eq!(
            errs.0.last().unwrap().1,
            "is not a variable of baker-directory; did you mean BAKER_TOKEN?"
        );
    }
}
