//! The directory's configuration, read from `BAKER_*` variables.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use baker_client::api::parse_token;
use baker_client::config::vars::{
    self, ENV_CA, ENV_DATA, ENV_DOCKER, ENV_DOCKER_NETWORK, ENV_ETCD_CA, ENV_ETCD_CERT,
    ENV_ETCD_KEY, ENV_HISTORY, ENV_LISTEN, ENV_MAX_AMBASSADORS, ENV_MAX_CONNECTIONS,
    ENV_MAX_DRAINS, ENV_MAX_INSTANCES, ENV_MAX_INSTANCES_PER_SERVICE, ENV_MAX_ROUTES,
    ENV_MAX_SERVICES, ENV_MAX_WATCHES, ENV_NODE, ENV_READ, ENV_REQUEST_TIMEOUT, ENV_STORE,
    ENV_SWARM_POLL, ENV_TLS_CERT, ENV_TLS_KEY, ENV_TOKEN, ENV_TOKENS, ENV_WATCH_TOKEN, ENV_ZONE,
};
use baker_client::config::{parse_duration, ConfigErrors, Environment, Reader};
use baker_client::model::{NodeName, Zone};

use crate::etcd::StoreUrl;
use crate::quota::Quotas;

/// Default listen address.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:7700";
/// Default data directory (relative to the working directory).
pub const DEFAULT_DATA: &str = "./data";
/// Default limit of open client connections (watchers included).
pub const DEFAULT_MAX_CONNECTIONS: usize = 8192;
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
    /// On, and the engine is meant to be a swarm manager: an engine that is none is warned
    /// about (with `auto` and `on`, a manager's services are followed too, silently otherwise).
    Swarm,
    /// Never.
    Off,
}

impl FromStr for DockerMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(DockerMode::Auto),
            "on" => Ok(DockerMode::On),
            "swarm" => Ok(DockerMode::Swarm),
            "off" => Ok(DockerMode::Off),
            _ => Err("must be auto, on, swarm or off".into()),
        }
    }
}

impl fmt::Display for DockerMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DockerMode::Auto => "auto",
            DockerMode::On => "on",
            DockerMode::Swarm => "swarm",
            DockerMode::Off => "off",
        })
    }
}

/// Where the directory's table lives.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum StoreMode {
    /// In this process: one directory, routes in `BAKER_DATA`.
    #[default]
    Memory,
    /// In etcd v3: any number of replicas serve the same table.
    Etcd(StoreUrl),
}

impl FromStr for StoreMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.eq_ignore_ascii_case("memory") {
            return Ok(StoreMode::Memory);
        }
        s.parse().map(StoreMode::Etcd)
    }
}

impl fmt::Display for StoreMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreMode::Memory => f.write_str("memory"),
            StoreMode::Etcd(url) => url.fmt(f),
        }
    }
}

/// Everything the directory needs to run. Tests build it directly.
#[derive(Debug, Clone)]
pub struct Config {
    /// `BAKER_LISTEN`: where the HTTP API listens (the binary binds it; `run` takes the listener).
    pub listen: SocketAddr,
    /// `BAKER_TOKEN`: the bearer token every mutating call must present; `None` leaves them open.
    pub token: Option<String>,
    /// `BAKER_WATCH_TOKEN`: a bearer token `GET /v1/watch` must present (`BAKER_TOKEN` is
    /// accepted too); `None` leaves watches open.
    pub watch_token: Option<String>,
    /// `BAKER_TOKENS`: a file of named tokens with roles and scopes ([`crate::tokens`]).
    pub tokens: Option<PathBuf>,
    /// `BAKER_READ=token`: every read and watch needs a token that reads.
    pub reads_closed: bool,
    /// `BAKER_TLS_CERT` and `BAKER_TLS_KEY`: serve HTTPS only, with these files.
    pub tls: Option<crate::tls::Files>,
    /// `BAKER_DATA`: the directory holding the routes, created if missing.
    pub data: PathBuf,
    /// `BAKER_STORE`: where the table lives; in etcd, `data` is not used.
    pub store: StoreMode,
    /// `BAKER_DOCKER`: used by Docker discovery.
    pub docker: DockerMode,
    /// `BAKER_DOCKER_NETWORK`: used by Docker discovery, the network whose address a discovered
    /// container is registered with (default: the container's first network).
    pub docker_network: Option<String>,
    /// `BAKER_SWARM_POLL`: how often swarm discovery lists the tasks when no event asks
    /// sooner (the Engine API has no task events).
    pub swarm_poll: Duration,
    /// `BAKER_NODE`: the node name Docker discovery gives the containers it finds (default:
    /// the engine's own name, as `docker info` shows it, else the host name).
    pub node: Option<NodeName>,
    /// `BAKER_ZONE`: the zone Docker discovery gives the containers it finds on this engine
    /// when they have no `baker.zone` label (default: none). Swarm tasks run on other nodes,
    /// so it is not theirs.
    pub zone: Option<Zone>,
    /// `BAKER_MAX_CONNECTIONS`: open connections beyond this wait in the kernel's accept queue.
    pub max_connections: usize,
    /// `BAKER_MAX_WATCHES`: open watch streams at most, fewer than `max_connections`, so that
    /// watchers never take the slots heartbeats, route changes and `/healthz` need.
    pub max_watches: usize,
    /// `BAKER_MAX_INSTANCES_PER_SERVICE`, `BAKER_MAX_SERVICES`, `BAKER_MAX_ROUTES`,
    /// `BAKER_MAX_INSTANCES`, `BAKER_MAX_DRAINS`, `BAKER_MAX_AMBASSADORS`.
    pub quotas: Quotas,
    /// `BAKER_HISTORY`: how many events the history keeps (`GET /v1/events`).
    pub history: usize,
    /// `BAKER_REQUEST_TIMEOUT`: longest time a request other than a watch may take, body
    /// included; also bounds how long a client may take to send its request headers.
    pub request_timeout: Duration,
    /// Interval of `ping` lines on an idle watch stream.
    pub watch_ping: Duration,
    /// Most lines one watcher may have queued before it is disconnected as too slow.
    pub watch_backlog_lines: usize,
    /// Most bytes one watcher may have queued before it is disconnected as too slow.
    pub watch_backlog_bytes: usize,
    /// How long a connection's writes may make no progress (its client reads nothing) before
    /// it is closed: a watcher that never reads does not keep its slot.
    pub write_stall: Duration,
    /// How long open connections get to finish on shutdown before they are closed.
    pub shutdown_grace: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: DEFAULT_LISTEN.parse().expect("constant address"),
            token: None,
            watch_token: None,
            tokens: None,
            reads_closed: false,
            tls: None,
            data: PathBuf::from(DEFAULT_DATA),
            store: StoreMode::Memory,
            docker: DockerMode::Auto,
            docker_network: None,
            swarm_poll: crate::swarm::DEFAULT_POLL,
            node: None,
            zone: None,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_watches: DEFAULT_MAX_CONNECTIONS / 2,
            quotas: Quotas::default(),
            history: crate::history::DEFAULT_CAPACITY,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            watch_ping: Duration::from_secs(5),
            watch_backlog_lines: 1024,
            watch_backlog_bytes: 16 * 1024 * 1024,
            write_stall: Duration::from_secs(15),
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
        let watch_token = r.parse_secret(ENV_WATCH_TOKEN, parse_token);
        let tokens = r.parse(ENV_TOKENS, |s| Ok::<_, String>(PathBuf::from(s)));
        let reads_closed = r
            .parse(ENV_READ, |s| match s {
                "open" => Ok(false),
                "token" => Ok(true),
                _ => Err("must be open or token"),
            })
            .unwrap_or(false);
        if reads_closed && token.is_none() && tokens.is_none() {
            r.push(
                ENV_READ,
                "token needs BAKER_TOKEN or BAKER_TOKENS: no token could read",
            );
        }
        let tls_cert = r.parse(ENV_TLS_CERT, |s| Ok::<_, String>(PathBuf::from(s)));
        let tls_key = r.parse(ENV_TLS_KEY, |s| Ok::<_, String>(PathBuf::from(s)));
        let tls = match (tls_cert, tls_key) {
            (Some(cert), Some(key)) => Some(crate::tls::Files { cert, key }),
            (Some(_), None) => {
                r.push(
                    ENV_TLS_KEY,
                    "must be set with BAKER_TLS_CERT: the certificate's key",
                );
                None
            }
            (None, Some(_)) => {
                r.push(
                    ENV_TLS_CERT,
                    "must be set with BAKER_TLS_KEY: the certificate that key goes with",
                );
                None
            }
            (None, None) => None,
        };
        let data = r.parse(ENV_DATA, |s| Ok::<_, String>(PathBuf::from(s)));
        let mut store = r.parse(ENV_STORE, str::parse::<StoreMode>);
        let etcd_ca = r
            .parse(ENV_ETCD_CA, baker_client::tls::parse_bundle_path)
            .or_else(|| r.parse(ENV_CA, baker_client::tls::parse_bundle_path));
        let etcd_cert = r.parse(ENV_ETCD_CERT, |s| Ok::<_, String>(PathBuf::from(s)));
        let etcd_key = r.parse(ENV_ETCD_KEY, |s| Ok::<_, String>(PathBuf::from(s)));
        if etcd_cert.is_some() != etcd_key.is_some() {
            r.push(
                if etcd_cert.is_some() {
                    ENV_ETCD_KEY
                } else {
                    ENV_ETCD_CERT
                },
                "BAKER_ETCD_CERT and BAKER_ETCD_KEY go together: set both or neither",
            );
        }
        if let Some(StoreMode::Etcd(url)) = &mut store {
            match &mut url.tls {
                Some(tls) => {
                    if etcd_ca.is_none() {
                        r.push(
                            ENV_STORE,
                            "etcds:// needs BAKER_ETCD_CA (or BAKER_CA): the CA bundle that \
                             signed the members' certificates",
                        );
                    }
                    tls.ca = etcd_ca;
                    tls.identity = etcd_cert.zip(etcd_key);
                }
                None if etcd_cert.is_some() || r.is_set(ENV_ETCD_CA) => r.push(
                    ENV_STORE,
                    "BAKER_ETCD_CA and BAKER_ETCD_CERT are for TLS: name the members with \
                     etcds:// instead of etcd://",
                ),
                None => {}
            }
        }
        let docker = r.value(ENV_DOCKER, DockerMode::Auto);
        let docker_network = r.parse(ENV_DOCKER_NETWORK, parse_network);
        let swarm_poll = r
            .parse(ENV_SWARM_POLL, |s| {
                parse_duration(s).and_then(|d| {
                    if (Duration::from_millis(50)..=Duration::from_secs(60)).contains(&d) {
                        Ok(d)
                    } else {
                        Err("must be between 50ms and 1m".to_owned())
                    }
                })
            })
            .unwrap_or(defaults.swarm_poll);
        let node = r.parse(ENV_NODE, |s| {
            NodeName::parse_as(ENV_NODE, s).map_err(|e| e.message)
        });
        let zone = r.parse(ENV_ZONE, |s| s.parse::<Zone>().map_err(|e| e.message));
        let max_connections = r.parse(ENV_MAX_CONNECTIONS, |s| match s.parse::<usize>() {
            Ok(n) if (1..=1_000_000).contains(&n) => Ok(n),
            _ => Err("must be a number between 1 and 1000000"),
        });
        let max_connections = max_connections.unwrap_or(defaults.max_connections);
        let max_watches = r
            .parse(ENV_MAX_WATCHES, |s| match s.parse::<usize>() {
                Ok(n) if (1..max_connections).contains(&n) => Ok(n),
                _ => Err(format!(
                    "must be a number from 1 to {}, below BAKER_MAX_CONNECTIONS ({max_connections}), \
                     so that watches leave connections to heartbeats and route changes",
                    max_connections.saturating_sub(1)
                )),
            })
            .unwrap_or(max_connections / 2);
        let quotas = Quotas {
            instances_per_service: quota(&mut r, ENV_MAX_INSTANCES_PER_SERVICE)
                .unwrap_or(defaults.quotas.instances_per_service),
            services: quota(&mut r, ENV_MAX_SERVICES).unwrap_or(defaults.quotas.services),
            routes: quota(&mut r, ENV_MAX_ROUTES).unwrap_or(defaults.quotas.routes),
            instances: quota(&mut r, ENV_MAX_INSTANCES).unwrap_or(defaults.quotas.instances),
            drains: quota(&mut r, ENV_MAX_DRAINS).unwrap_or(defaults.quotas.drains),
            ambassadors: quota(&mut r, ENV_MAX_AMBASSADORS).unwrap_or(defaults.quotas.ambassadors),
        };
        let history = r
            .parse(ENV_HISTORY, |s| match s.parse::<usize>() {
                Ok(n) if (100..=10_000_000).contains(&n) => Ok(n),
                _ => Err("must be a number between 100 and 10000000"),
            })
            .unwrap_or(defaults.history);
        let request_timeout = r.duration(ENV_REQUEST_TIMEOUT, defaults.request_timeout);
        r.finish(Config {
            listen: listen.unwrap_or(defaults.listen),
            token,
            watch_token,
            tokens,
            reads_closed,
            tls,
            data: data.unwrap_or(defaults.data),
            store: store.unwrap_or_default(),
            docker,
            docker_network,
            swarm_poll,
            node,
            zone,
            max_connections,
            max_watches,
            quotas,
            history,
            request_timeout,
            ..Config::default()
        })
    }
}

/// A count quota: 1 to 100,000,000.
fn quota(r: &mut Reader<'_>, name: &'static str) -> Option<usize> {
    r.parse(name, |s| match s.parse::<usize>() {
        Ok(n) if (1..=100_000_000).contains(&n) => Ok(n),
        _ => Err("must be a number between 1 and 100000000"),
    })
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
        assert_eq!(c.store, StoreMode::Memory);
        assert_eq!(c.token, None);
        assert_eq!(c.docker_network, None);
        assert_eq!(c.node, None);
        assert_eq!(c.zone, None);
    }

    #[test]
    fn parses_every_variable() {
        let c = Config::from_env(&env(&[
            ("BAKER_LISTEN", "127.0.0.1:0"),
            ("BAKER_TOKEN", "s3cret"),
            ("BAKER_DATA", "/tmp/x"),
            ("BAKER_DOCKER", "OFF"),
            ("BAKER_STORE", "etcd://e1:2379,e2:2379/team"),
            ("BAKER_DOCKER_NETWORK", "baker_net"),
            ("BAKER_NODE", "Host-1.example"),
            ("BAKER_ZONE", "eu-west-1a"),
            ("BAKER_MAX_CONNECTIONS", "10"),
            ("BAKER_MAX_WATCHES", "9"),
            ("BAKER_WATCH_TOKEN", "w4tch"),
            ("BAKER_MAX_INSTANCES_PER_SERVICE", "5"),
            ("BAKER_MAX_SERVICES", "6"),
            ("BAKER_MAX_ROUTES", "7"),
            ("BAKER_MAX_INSTANCES", "8"),
            ("BAKER_MAX_DRAINS", "3"),
            ("BAKER_MAX_AMBASSADORS", "4"),
            ("BAKER_REQUEST_TIMEOUT", "2s"),
        ]))
        .unwrap();
        assert_eq!(c.max_watches, 9);
        assert_eq!(c.store.to_string(), "etcd://e1:2379,e2:2379/team");
        assert_eq!(c.watch_token.as_deref(), Some("w4tch"));
        assert_eq!(
            c.quotas,
            Quotas {
                instances_per_service: 5,
                services: 6,
                routes: 7,
                instances: 8,
                drains: 3,
                ambassadors: 4,
            }
        );
        assert_eq!(c.listen.port(), 0);
        assert_eq!(c.token.as_deref(), Some("s3cret"));
        assert_eq!(c.data, PathBuf::from("/tmp/x"));
        assert_eq!(c.docker, DockerMode::Off);
        assert_eq!(c.docker_network.as_deref(), Some("baker_net"));
        assert_eq!(
            c.node.as_ref().map(NodeName::as_str),
            Some("Host-1.example")
        );
        assert_eq!(c.zone.as_ref().map(Zone::as_str), Some("eu-west-1a"));
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
        assert_eq!(shown(ENV_STORE), Some(StoreMode::default().to_string()));
        assert_eq!(
            shown(ENV_MAX_CONNECTIONS),
            Some(DEFAULT_MAX_CONNECTIONS.to_string())
        );
        assert_eq!(shown(ENV_REQUEST_TIMEOUT), d(DEFAULT_REQUEST_TIMEOUT));
        let q = Quotas::default();
        for (name, value) in [
            (ENV_MAX_INSTANCES_PER_SERVICE, q.instances_per_service),
            (ENV_MAX_SERVICES, q.services),
            (ENV_MAX_ROUTES, q.routes),
            (ENV_MAX_INSTANCES, q.instances),
            (ENV_MAX_DRAINS, q.drains),
            (ENV_MAX_AMBASSADORS, q.ambassadors),
        ] {
            assert_eq!(shown(name), Some(value.to_string()), "{name}");
        }
        let c = Config::default();
        assert_eq!(c.max_watches, c.max_connections / 2);
        let c = Config::from_env(&env(&[("BAKER_MAX_CONNECTIONS", "100")])).unwrap();
        assert_eq!(c.max_watches, 50);
    }

    #[test]
    fn watches_stay_below_the_connection_limit() {
        let errs = Config::from_env(&env(&[
            ("BAKER_MAX_CONNECTIONS", "100"),
            ("BAKER_MAX_WATCHES", "100"),
        ]))
        .unwrap_err();
        assert_eq!(errs.0.len(), 1);
        assert!(
            errs.0[0]
                .1
                .starts_with("must be a number from 1 to 99, below BAKER_MAX_CONNECTIONS"),
            "{errs}"
        );
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
            ("BAKER_STORE", "etcd://e1"),
            ("BAKER_DOCKER", "maybe"),
            ("BAKER_DOCKER_NETWORK", "bad/net"),
            ("BAKER_NODE", "my host"),
            ("BAKER_ZONE", "Zone A"),
            ("BAKER_MAX_CONNECTIONS", "0"),
            ("BAKER_MAX_WATCHES", "x"),
            ("BAKER_MAX_ROUTES", "0"),
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
                "BAKER_STORE",
                "BAKER_DOCKER",
                "BAKER_DOCKER_NETWORK",
                "BAKER_NODE",
                "BAKER_ZONE",
                "BAKER_MAX_CONNECTIONS",
                "BAKER_MAX_WATCHES",
                "BAKER_MAX_ROUTES",
                "BAKER_REQUEST_TIMEOUT",
                "BAKER_TOKN",
            ]
        );
        assert_eq!(
            errs.0[5].1,
            "may contain only letters, digits, '.', '_' and '-', got ' ' (got \"my host\")"
        );
        assert_eq!(
            errs.0[6].1,
            "must start with a lowercase letter or digit, got 'Z' (got \"Zone A\")"
        );
        assert_eq!(
            errs.0.last().unwrap().1,
            "is not a variable of baker-directory; did you mean BAKER_TOKEN?"
        );
    }
}
