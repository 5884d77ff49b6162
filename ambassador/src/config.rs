//! The ambassador's configuration: `BAKER_*` variables, parsed and checked all at once.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use baker_client::api::parse_token;
use baker_client::config::vars::{
    self, ENV_ADMIN, ENV_BENCH_FORCE_RELOAD, ENV_BIND, ENV_CHECKS, ENV_DIRECTORY,
    ENV_DRAIN_TIMEOUT, ENV_GRACE, ENV_HAPROXY, ENV_HTTP_PORT, ENV_ID, ENV_ROUTES, ENV_RUN_DIR,
    ENV_STOP_TIMEOUT, ENV_TEMPLATE, ENV_TOKEN, ENV_WATCH_TOKEN, ENV_ZONE, ENV_ZONE_OVERPROVISION,
};
use baker_client::config::{ConfigErrors, Environment, Reader};
use baker_client::model::{
    generated_id_hint, is_generated_hostname, Address, InstanceId, ServiceName, Zone,
};

use crate::locality::{Locality, DEFAULT_OVERPROVISION, OVERPROVISION_RANGE};

/// Default admin port: HAProxy's stats page, its Prometheus exporter and the ambassador's own
/// metrics.
pub const DEFAULT_ADMIN_PORT: u16 = 8404;
/// Where the admin port binds unless `BAKER_ADMIN` names an address: it has no authentication
/// and shows every backend's address, so it stays on the loopback interface.
pub const DEFAULT_ADMIN_IP: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);
/// Default directory for the rendered configuration and the sockets.
pub const DEFAULT_RUN_DIR: &str = "/run/baker";
/// Default time a removed server may finish its connections before it is deleted.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Default time HAProxy may finish in-flight requests when stopping or after a reload.
pub const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// Default cap of the grace period: the longest an instance missing from a fresh directory
/// snapshot is kept, whatever its service's TTL.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(30);

/// How HAProxy talks to one service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Http,
    Tcp,
}

/// One service the ambassador exposes locally.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceRoute {
    /// The service's name in the directory (also HAProxy's backend name).
    pub name: ServiceName,
    /// Its own local port; `None` when it is reached only through the shared HTTP port.
    pub port: Option<u16>,
    pub mode: Mode,
    /// How its backend balances, times out and retries (`;`-separated after the port).
    pub options: RouteOptions,
}

/// Default time to establish a connection to a server.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
/// Default longest wait for a server's answer (any request of an HTTP service; a TCP
/// connection's silence).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
/// Default longest wait for a server's answer to a GET, HEAD or OPTIONS request, after which
/// the request is tried on another server: a hung instance costs such a request this long.
pub const DEFAULT_GET_TIMEOUT: Duration = Duration::from_secs(2);
/// Default number of retries of a failed connection (or timed-out idempotent request).
pub const DEFAULT_RETRIES: u32 = 3;
/// Highest accepted `retries`.
pub const MAX_RETRIES: u32 = 10;
/// Highest accepted `maxconn`.
pub const MAX_MAXCONN: u32 = 100_000;
/// Longest accepted timeout of any kind (one day).
pub const MAX_ROUTE_TIMEOUT: Duration = Duration::from_secs(86_400);

/// How a backend picks a server for each new connection or request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Balance {
    /// In turn, in proportion to the servers' weights.
    #[default]
    Roundrobin,
    /// The server with the fewest connections (relative to its weight).
    Leastconn,
    /// The first server that is up and below its `maxconn`: one live server at a time, the
    /// next one taking over only when it fails or is full.
    First,
}

impl Balance {
    fn parse(value: &str) -> Result<Balance, String> {
        match value {
            "roundrobin" => Ok(Balance::Roundrobin),
            "leastconn" => Ok(Balance::Leastconn),
            "first" => Ok(Balance::First),
            other => Err(format!(
                "balance must be roundrobin, leastconn or first, got {:?}",
                baker_client::model::printable(other)
            )),
        }
    }
}

/// A service's tuning, written after its port in `BAKER_ROUTES`
/// (`greeting=8000;balance=leastconn;timeout=5s;sticky`). Every value is typed: nothing from
/// the variable reaches HAProxy's configuration as text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteOptions {
    pub balance: Balance,
    /// HTTP only: a client's requests stick to one server by a cookie HAProxy sets.
    pub sticky: bool,
    pub connect_timeout: Duration,
    /// Longest wait for a server's answer (HTTP), or for either side of a TCP connection to
    /// send anything.
    pub timeout: Duration,
    /// HTTP only: [`timeout`](Self::timeout) for GET, HEAD and OPTIONS requests, which are then
    /// retried on another server.
    pub get_timeout: Duration,
    /// Most concurrent connections per server (`None`: no limit); more wait in a queue.
    pub maxconn: Option<u32>,
    pub retries: u32,
}

impl Default for RouteOptions {
    fn default() -> Self {
        RouteOptions {
            balance: Balance::Roundrobin,
            sticky: false,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            timeout: DEFAULT_TIMEOUT,
            get_timeout: DEFAULT_GET_TIMEOUT,
            maxconn: None,
            retries: DEFAULT_RETRIES,
        }
    }
}

impl RouteOptions {
    /// Parses the `;`-separated options of `service` in `mode`, pushing every problem.
    fn parse<'a>(
        service: &ServiceName,
        mode: Mode,
        items: &[&'a str],
        problems: &mut Vec<String>,
    ) -> Self {
        let mut o = RouteOptions::default();
        let mut seen: Vec<&'a str> = Vec::new();
        let mut get_timeout_set = false;
        let before = problems.len();
        for item in items {
            let (key, value) = match item.split_once('=') {
                Some((k, v)) => (k.trim(), Some(v.trim())),
                None => (item.trim(), None),
            };
            if seen.contains(&key) {
                problems.push(format!("{service}: option {key} is given twice"));
                continue;
            }
            seen.push(key);
            let need = |value: Option<&'a str>| -> Result<&'a str, String> {
                value.ok_or_else(|| format!("option {key} needs a value: write {key}=<value>"))
            };
            let result: Result<(), String> = match key {
                "balance" => need(value).and_then(Balance::parse).map(|b| o.balance = b),
                "sticky" => match value {
                    None => {
                        o.sticky = true;
                        Ok(())
                    }
                    Some(_) => Err("sticky takes no value".into()),
                },
                "connect-timeout" => need(value)
                    .and_then(|v| route_duration(key, v))
                    .map(|d| o.connect_timeout = d),
                "timeout" => need(value)
                    .and_then(|v| route_duration(key, v))
                    .map(|d| o.timeout = d),
                "get-timeout" => need(value).and_then(|v| route_duration(key, v)).map(|d| {
                    o.get_timeout = d;
                    get_timeout_set = true;
                }),
                "maxconn" => need(value)
                    .and_then(|v| bounded(key, v, 1, MAX_MAXCONN))
                    .map(|n| o.maxconn = Some(n)),
                "retries" => need(value)
                    .and_then(|v| bounded(key, v, 0, MAX_RETRIES))
                    .map(|n| o.retries = n),
                other => Err(format!(
                    "unknown option {:?}; the options are balance, sticky, connect-timeout, \
                     timeout, get-timeout, maxconn and retries",
                    baker_client::model::printable(other)
                )),
            };
            if let Err(e) = result {
                problems.push(format!("{service}: {e}"));
            }
        }
        if mode == Mode::Tcp {
            for key in ["sticky", "get-timeout"] {
                if seen.contains(&key) {
                    problems.push(format!("{service}: {key} applies to http services only"));
                }
            }
        }
        if problems.len() == before {
            if get_timeout_set && o.get_timeout > o.timeout {
                problems.push(format!(
                    "{service}: get-timeout ({}) must not exceed timeout ({})",
                    humantime::format_duration(o.get_timeout),
                    humantime::format_duration(o.timeout)
                ));
            }
            // A timeout lowered below the default get-timeout lowers that too.
            o.get_timeout = o.get_timeout.min(o.timeout);
        }
        o
    }
}

/// A duration option: `500ms`, `5s`, `2m`, at least 1 ms and at most a day.
fn route_duration(key: &str, value: &str) -> Result<Duration, String> {
    let shown = baker_client::model::printable(value);
    let d =
        baker_client::config::parse_duration(value).map_err(|e| format!("{key} {shown:?} {e}"))?;
    if d < Duration::from_millis(1) || d > MAX_ROUTE_TIMEOUT {
        return Err(format!("{key} {shown:?} must be between 1ms and 24h"));
    }
    Ok(d)
}

/// A whole number between `min` and `max`.
fn bounded(key: &str, value: &str, min: u32, max: u32) -> Result<u32, String> {
    match value.parse::<u32>() {
        Ok(n) if (min..=max).contains(&n) => Ok(n),
        _ => Err(format!(
            "{key} must be a whole number between {min} and {max}, got {:?}",
            baker_client::model::printable(value)
        )),
    }
}

/// Active health checks of the ambassador's HAProxy (off by default: the registrars probe).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Checks {
    /// No periodic probing: HAProxy watches live traffic and probes only a server it marked down.
    Off,
    /// A TCP connect every 2 s.
    Tcp,
    /// An HTTP GET of this path every 2 s (TCP services get a TCP connect).
    Http(String),
}

/// The ambassador's validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub directory: String,
    pub token: Option<String>,
    /// `BAKER_WATCH_TOKEN`: sent with the watch instead of `token`, when set.
    pub watch_token: Option<String>,
    /// `BAKER_CA`: the CA bundle trusted for an `https://` directory (default: the system's
    /// roots).
    pub ca: Option<std::path::PathBuf>,
    pub services: Vec<ServiceRoute>,
    pub http_port: Option<u16>,
    /// Address of the admin listener (loopback unless `BAKER_ADMIN` names an address); `None`
    /// with `BAKER_ADMIN=off`.
    pub admin: Option<SocketAddr>,
    /// The template's text and where it came from (`None`: the embedded default).
    pub template: Option<(PathBuf, String)>,
    pub haproxy: PathBuf,
    pub bind: IpAddr,
    pub run_dir: PathBuf,
    pub checks: Checks,
    pub drain_timeout: Duration,
    pub stop_timeout: Duration,
    /// The cap of the grace period after a fresh directory snapshot: per service, instances it
    /// lacks are kept until the directory has been up for the service's longest TTL, and never
    /// longer than this.
    pub grace: Duration,
    /// Apply every change by reloading HAProxy (for benchmark comparisons only).
    pub force_reload: bool,
    /// The name this ambassador reports to the directory under (`BAKER_ID`).
    pub id: InstanceId,
    /// Said at start when the id was made from a hostname Docker generated.
    pub id_hint: Option<String>,
    /// `BAKER_ZONE` and `BAKER_ZONE_OVERPROVISION`: the zone whose instances it prefers.
    pub locality: Option<Locality>,
    /// The host it reports running on.
    pub host: Address,
}

impl Config {
    /// A configuration with defaults for everything but the services (tests start from this).
    pub fn new(services: Vec<ServiceRoute>) -> Self {
        Config {
            directory: baker_client::api::DEFAULT_DIRECTORY.to_owned(),
            token: None,
            watch_token: None,
            ca: None,
            services,
            http_port: None,
            admin: Some(SocketAddr::new(DEFAULT_ADMIN_IP, DEFAULT_ADMIN_PORT)),
            template: None,
            haproxy: default_haproxy(),
            bind: IpAddr::from([0, 0, 0, 0]),
            run_dir: PathBuf::from(DEFAULT_RUN_DIR),
            checks: Checks::Off,
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
            stop_timeout: DEFAULT_STOP_TIMEOUT,
            grace: DEFAULT_GRACE,
            force_reload: false,
            id: default_id(&hostname(), services_port(&[], None)),
            id_hint: None,
            host: host_address(&hostname()),
            locality: None,
        }
    }

    /// Parses and checks every variable, reporting all problems at once.
    pub fn from_env(env: &Environment) -> Result<Config, ConfigErrors> {
        Config::from_env_on(env, &hostname())
    }

    /// [`Config::from_env`] on a machine named `host` (which makes the default id).
    pub fn from_env_on(env: &Environment, host: &str) -> Result<Config, ConfigErrors> {
        let mut r = Reader::new(&vars::AMBASSADOR, env);
        let directory = r
            .parse(ENV_DIRECTORY, |v| {
                baker_client::DirectoryClient::new(v, None).map(|c| c.list())
            })
            .unwrap_or_else(|| baker_client::api::DEFAULT_DIRECTORY.to_owned());
        let token = r.parse_secret(ENV_TOKEN, parse_token);
        let watch_token = r.parse_secret(ENV_WATCH_TOKEN, parse_token);
        let ca = r.parse(vars::ENV_CA, baker_client::tls::parse_bundle_path);
        let http_port = r.parse(ENV_HTTP_PORT, parse_port);
        let services = match r.get(ENV_ROUTES) {
            None => {
                r.push(
                    ENV_ROUTES,
                    "must name the services to expose, e.g. emitter=8000,transform=8001",
                );
                Vec::new()
            }
            Some(v) => match parse_routes(v.trim(), http_port.is_some()) {
                Ok(s) => s,
                Err(problems) => {
                    for p in problems {
                        r.push(ENV_ROUTES, p);
                    }
                    Vec::new()
                }
            },
        };
        let bind = r
            .parse(ENV_BIND, parse_bind)
            .unwrap_or(IpAddr::from([0, 0, 0, 0]));
        let admin = match r.get(ENV_ADMIN).map(str::trim) {
            None => Some(SocketAddr::new(DEFAULT_ADMIN_IP, DEFAULT_ADMIN_PORT)),
            Some("off") => None,
            Some(_) => r.parse(ENV_ADMIN, parse_admin),
        };
        let template =
            r.get(ENV_TEMPLATE)
                .map(str::trim)
                .and_then(|p| match read_template(Path::new(p)) {
                    Ok(t) => Some((PathBuf::from(p), t)),
                    Err(e) => {
                        r.push(ENV_TEMPLATE, e);
                        None
                    }
                });
        let haproxy = r
            .get(ENV_HAPROXY)
            .map(|s| PathBuf::from(s.trim()))
            .unwrap_or_else(default_haproxy);
        if !is_executable(&haproxy) {
            r.push(
                ENV_HAPROXY,
                format!(
                    "{} is not an executable file; install HAProxy 2.6 or later or name its binary",
                    haproxy.display()
                ),
            );
        }
        let run_dir = r
            .get(ENV_RUN_DIR)
            .map(|s| PathBuf::from(s.trim()))
            .unwrap_or_else(default_run_dir);
        // Unix socket paths are limited to 107 bytes; keep room for the socket names.
        if run_dir.as_os_str().len() > 80 {
            r.push(
                ENV_RUN_DIR,
                "must be a path of at most 80 bytes (it holds unix sockets)",
            );
        }
        let checks = r.parse(ENV_CHECKS, parse_checks).unwrap_or(Checks::Off);
        let drain_timeout = r.duration(ENV_DRAIN_TIMEOUT, DEFAULT_DRAIN_TIMEOUT);
        let stop_timeout = r.duration(ENV_STOP_TIMEOUT, DEFAULT_STOP_TIMEOUT);
        let grace = r.duration(ENV_GRACE, DEFAULT_GRACE);
        let force_reload = r.parse(ENV_BENCH_FORCE_RELOAD, parse_bool).unwrap_or(false);
        let zone = r.parse(ENV_ZONE, |v| {
            v.trim().parse::<Zone>().map_err(|e| e.message)
        });
        let overprovision = r.parse(ENV_ZONE_OVERPROVISION, |v| {
            let (min, max) = (OVERPROVISION_RANGE.start(), OVERPROVISION_RANGE.end());
            match v.trim().trim_end_matches('%').parse::<u32>() {
                Ok(n) if OVERPROVISION_RANGE.contains(&n) => Ok(n),
                _ => Err(format!(
                    "must be a percentage between {min} and {max}, such as 140, got {:?}",
                    baker_client::model::printable(v)
                )),
            }
        });
        if overprovision.is_some() && !r.is_set(ENV_ZONE) {
            r.push(
                ENV_ZONE_OVERPROVISION,
                "applies only to an ambassador with a zone: set BAKER_ZONE too",
            );
        }
        let locality = zone.map(|zone| Locality {
            zone,
            overprovision: overprovision.unwrap_or(DEFAULT_OVERPROVISION),
        });

        let mut ports: Vec<(u16, String)> = services
            .iter()
            .filter_map(|s| s.port.map(|p| (p, format!("service {}", s.name))))
            .collect();
        ports.extend(http_port.map(|p| (p, ENV_HTTP_PORT.to_owned())));
        ports.extend(admin.map(|a| (a.port(), ENV_ADMIN.to_owned())));
        ports.sort();
        for w in ports.windows(2) {
            if w[0].0 == w[1].0 {
                r.push(
                    ENV_ROUTES,
                    format!("port {} is used twice ({} and {})", w[0].0, w[0].1, w[1].1),
                );
            }
        }
        let id = r
            .parse(ENV_ID, |v| {
                v.trim().parse::<InstanceId>().map_err(|e| e.message)
            })
            .unwrap_or_else(|| default_id(host, services_port(&services, http_port)));
        let id_hint = (!r.is_set(ENV_ID) && is_generated_hostname(host))
            .then(|| generated_id_hint(&id, host));
        r.finish(Config {
            id,
            id_hint,
            host: host_address(host),
            directory,
            token,
            watch_token,
            ca,
            services,
            http_port,
            admin,
            template,
            haproxy,
            bind,
            run_dir,
            checks,
            drain_timeout,
            stop_timeout,
            grace,
            force_reload,
            locality,
        })
    }
}

/// The machine's hostname, empty when it cannot be read.
pub fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_default()
}

/// The first local port of the ambassador, which tells apart ambassadors on one host.
fn services_port(services: &[ServiceRoute], http_port: Option<u16>) -> Option<u16> {
    services.iter().find_map(|s| s.port).or(http_port)
}

/// The default id: `<hostname>-<first port>`, made into a name.
pub fn default_id(hostname: &str, port: Option<u16>) -> InstanceId {
    let raw = match port {
        Some(p) => format!("{hostname}-{p}"),
        None => hostname.to_owned(),
    };
    let mut name = String::new();
    for c in raw.chars().map(|c| c.to_ascii_lowercase()) {
        let c = if c.is_ascii_lowercase() || c.is_ascii_digit() || c == '.' || c == '_' {
            c
        } else {
            '-'
        };
        if c == '-' && (name.is_empty() || name.ends_with('-')) {
            continue;
        }
        name.push(c);
    }
    let name: String = name
        .trim_start_matches(['.', '_', '-'])
        .chars()
        .take(baker_client::model::MAX_NAME_LEN)
        .collect();
    let name = name.trim_end_matches(['.', '_', '-']);
    name.parse()
        .unwrap_or_else(|_| "ambassador".parse().expect("a valid name"))
}

/// The hostname as an address, `localhost` when it is not a valid DNS name.
fn host_address(hostname: &str) -> Address {
    hostname
        .parse()
        .unwrap_or_else(|_| "localhost".parse().expect("a valid DNS name"))
}

/// Parses `emitter=8000,transform=8001,db=5432=tcp`; a name alone is reached through the shared
/// HTTP port only. Options follow a service's port, each after a `;`
/// (`emitter=8000;balance=leastconn;timeout=5s`, see [`RouteOptions`]).
pub fn parse_routes(value: &str, have_http_port: bool) -> Result<Vec<ServiceRoute>, Vec<String>> {
    let mut problems = Vec::new();
    let mut out: Vec<ServiceRoute> = Vec::new();
    for item in value.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let mut options = item.split(';').map(str::trim);
        let head = options.next().unwrap_or_default();
        let options: Vec<&str> = options.filter(|o| !o.is_empty()).collect();
        let mut parts = head.split('=').map(str::trim);
        let name = parts.next().unwrap_or_default();
        let port = parts.next();
        let mode = parts.next();
        if parts.next().is_some() {
            problems.push(format!(
                "{:?} has too many '=': write service=port or service=port=tcp, then \
                 ;option=value for each option",
                baker_client::model::printable(head)
            ));
            continue;
        }
        let name = match name.parse::<ServiceName>() {
            Ok(name) => name,
            Err(e) => {
                problems.push(format!(
                    "service name {:?}: {}",
                    baker_client::model::printable(name),
                    e.message
                ));
                continue;
            }
        };
        let port = match port.map(parse_port).transpose() {
            Ok(p) => p,
            Err(e) => {
                problems.push(format!("{name}: port {e}"));
                continue;
            }
        };
        let mode = match mode {
            None | Some("http") => Mode::Http,
            Some("tcp") => Mode::Tcp,
            Some(other) => {
                problems.push(format!(
                    "{name}: mode must be http or tcp, got {:?}",
                    baker_client::model::printable(other)
                ));
                continue;
            }
        };
        if port.is_none() && !have_http_port {
            problems.push(format!(
                "{name} has no port: write {name}=<port>, or set BAKER_HTTP_PORT to reach it as /{name}/"
            ));
            continue;
        }
        if port.is_none() && mode == Mode::Tcp {
            problems.push(format!("{name}: a tcp service needs its own port"));
            continue;
        }
        if out.iter().any(|s| s.name == name) {
            problems.push(format!("{name} is named twice"));
            continue;
        }
        let before = problems.len();
        let options = RouteOptions::parse(&name, mode, &options, &mut problems);
        if problems.len() > before {
            continue;
        }
        out.push(ServiceRoute {
            name,
            port,
            mode,
            options,
        });
    }
    if out.is_empty() && problems.is_empty() {
        problems.push("must name at least one service, e.g. emitter=8000".into());
    }
    if problems.is_empty() {
        Ok(out)
    } else {
        Err(problems)
    }
}

fn parse_port(v: &str) -> Result<u16, String> {
    match v.parse::<u16>() {
        Ok(p) if p != 0 => Ok(p),
        _ => Err("must be a port between 1 and 65535".into()),
    }
}

/// `BAKER_BIND`: an IP address, IPv6 with or without brackets (`0.0.0.0`, `::`, `[::1]`).
fn parse_bind(v: &str) -> Result<IpAddr, String> {
    let v = v.trim();
    let bare = v
        .strip_prefix('[')
        .and_then(|rest| rest.strip_suffix(']'))
        .unwrap_or(v);
    match bare.parse::<IpAddr>() {
        Ok(IpAddr::V4(_)) if bare != v => Err(format!(
            "brackets are for IPv6 addresses only, got {:?}",
            baker_client::model::printable(v)
        )),
        Ok(ip) => Ok(ip),
        Err(_) => Err(format!(
            "must be an IP address to listen on (0.0.0.0, 127.0.0.1, ::, [::1]; no port, no \
             name), got {:?}",
            baker_client::model::printable(v)
        )),
    }
}

/// `ip:port`, or a bare port on the loopback interface.
fn parse_admin(v: &str) -> Result<SocketAddr, String> {
    if let Ok(a) = v.parse::<SocketAddr>() {
        if a.port() == 0 {
            return Err("must name a port between 1 and 65535".into());
        }
        return Ok(a);
    }
    parse_port(v)
        .map(|p| SocketAddr::new(DEFAULT_ADMIN_IP, p))
        .map_err(|_| "must be a port, an ip:port, or off".into())
}

fn parse_checks(v: &str) -> Result<Checks, String> {
    match v {
        "off" | "0" | "false" | "no" => Ok(Checks::Off),
        "on" | "tcp" | "1" | "true" | "yes" => Ok(Checks::Tcp),
        _ => {
            let path = v
                .strip_prefix("http:")
                .ok_or_else(|| "must be off, tcp, or http:/<path>".to_string())?;
            let ok = path.starts_with('/')
                && path.len() <= 200
                && path
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "/-._~%?=&".contains(c));
            if ok {
                Ok(Checks::Http(path.to_owned()))
            } else {
                Err("the check path must start with '/' and hold only letters, digits and /-._~%?=&".into())
            }
        }
    }
}

fn parse_bool(v: &str) -> Result<bool, String> {
    match v {
        "1" | "true" | "on" | "yes" => Ok(true),
        "0" | "false" | "off" | "no" => Ok(false),
        _ => Err("must be 1 or 0".into()),
    }
}

/// Reads a template file and checks that Tera can parse it.
pub fn read_template(path: &Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    crate::render::Renderer::new(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(text)
}

/// `haproxy` from `PATH`, else `/usr/sbin/haproxy`.
pub fn default_haproxy() -> PathBuf {
    for dir in std::env::var("PATH").unwrap_or_default().split(':') {
        let p = Path::new(dir).join("haproxy");
        if !dir.is_empty() && is_executable(&p) {
            return p;
        }
    }
    PathBuf::from("/usr/sbin/haproxy")
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let p = if p.components().count() == 1 {
        // A bare name: look it up in PATH.
        match std::env::var("PATH")
            .unwrap_or_default()
            .split(':')
            .map(|d| Path::new(d).join(p))
            .find(|c| c.is_file())
        {
            Some(c) => c,
            None => return false,
        }
    } else {
        p.to_path_buf()
    };
    std::fs::metadata(&p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// `/run/baker` when it can be created, else a directory under the system's temp dir.
fn default_run_dir() -> PathBuf {
    let preferred = PathBuf::from(DEFAULT_RUN_DIR);
    if std::fs::create_dir_all(&preferred).is_ok() {
        return preferred;
    }
    std::env::temp_dir().join(format!("baker-ambassador-{}", std::process::id()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Environment {
        Environment::from_pairs(pairs)
    }

    #[test]
    fn help_shows_the_defaults_in_use() {
        let shown = |name| vars::AMBASSADOR.default_of(name).map(str::to_owned);
        let d = |d: Duration| Some(format!("{}s", d.as_secs()));
        assert_eq!(
            shown(ENV_DIRECTORY).as_deref(),
            Some(baker_client::api::DEFAULT_DIRECTORY)
        );
        assert_eq!(
            shown(ENV_ADMIN),
            Some(SocketAddr::new(DEFAULT_ADMIN_IP, DEFAULT_ADMIN_PORT).to_string())
        );
        assert_eq!(shown(ENV_RUN_DIR).as_deref(), Some(DEFAULT_RUN_DIR));
        assert_eq!(shown(ENV_DRAIN_TIMEOUT), d(DEFAULT_DRAIN_TIMEOUT));
        assert_eq!(shown(ENV_STOP_TIMEOUT), d(DEFAULT_STOP_TIMEOUT));
        assert_eq!(shown(ENV_GRACE), d(DEFAULT_GRACE));
    }

    #[test]
    fn an_id_made_from_a_generated_hostname_says_how_to_name_it() {
        let routes = [("BAKER_ROUTES", "greeting=8000")];
        let c = Config::from_env_on(&env(&routes), "be60c1106a01").unwrap();
        assert_eq!(c.id, "be60c1106a01-8000");
        assert_eq!(
            c.id_hint.as_deref(),
            Some(
                "the id be60c1106a01-8000 is made from the container's generated hostname \
                 be60c1106a01: set BAKER_ID (or run the container with --hostname NAME) to give \
                 it a name people can read"
            )
        );
        let named = [routes[0], ("BAKER_ID", "amb")];
        let c = Config::from_env_on(&env(&named), "be60c1106a01").unwrap();
        assert_eq!((c.id.as_str(), c.id_hint), ("amb", None));
        let c = Config::from_env_on(&env(&routes), "edge-1").unwrap();
        assert_eq!((c.id.as_str(), c.id_hint), ("edge-1-8000", None));
    }

    #[test]
    fn reads_exactly_the_listed_variables() {
        let errs = Config::from_env(&Environment::unreadable(&vars::AMBASSADOR)).unwrap_err();
        let mut listed: Vec<&str> = vars::AMBASSADOR.vars.iter().map(|v| v.name).collect();
        listed.sort_unstable();
        assert_eq!(Environment::reported(&errs), listed);
    }

    #[test]
    fn a_bad_token_or_unknown_name_is_refused_and_a_registrar_variable_ignored() {
        let e = Config::from_env(&env(&[
            ("BAKER_ROUTES", "a=8000"),
            ("BAKER_HAPROXY", "/bin/sh"),
            ("BAKER_RUN_DIR", "/tmp/x"),
            ("BAKER_TOKEN", "two words"),
            ("BAKER_ROUTS", "b=8001"),
            ("BAKER_SERVICE", "emitter"),
        ]))
        .unwrap_err();
        assert_eq!(
            e.0.iter().map(|(v, _)| v.as_str()).collect::<Vec<_>>(),
            ["BAKER_TOKEN", "BAKER_ROUTS"],
            "{e}"
        );
        assert!(e.to_string().contains("did you mean BAKER_ROUTES?"), "{e}");
    }

    #[test]
    fn routes_parse() {
        let r = parse_routes("emitter=8000, transform=8001,db=5432=tcp", false).unwrap();
        assert_eq!(r.len(), 3);
        assert_eq!(r[0].name, "emitter");
        assert_eq!(r[0].port, Some(8000));
        assert_eq!(r[2].mode, Mode::Tcp);
        let r = parse_routes("emitter", true).unwrap();
        assert_eq!(r[0].port, None);
        assert!(parse_routes("emitter", false).is_err());
        let errs = parse_routes("Bad=1,x=0,y=1=udp,z=1,z=2,a=1=tcp=x", false).unwrap_err();
        assert_eq!(errs.len(), 5, "{errs:?}");
    }

    #[test]
    fn route_options_parse() {
        let r = parse_routes(
            "web=8000;balance=leastconn;sticky;connect-timeout=200ms;timeout=30s;\
             get-timeout=5s;maxconn=50;retries=1,db=5432=tcp;balance=first;timeout=1h,plain=8001",
            false,
        )
        .unwrap();
        let web = &r[0].options;
        assert_eq!(web.balance, Balance::Leastconn);
        assert!(web.sticky);
        assert_eq!(web.connect_timeout, Duration::from_millis(200));
        assert_eq!(web.timeout, Duration::from_secs(30));
        assert_eq!(web.get_timeout, Duration::from_secs(5));
        assert_eq!((web.maxconn, web.retries), (Some(50), 1));
        assert_eq!(r[1].mode, Mode::Tcp);
        assert_eq!(r[1].options.balance, Balance::First);
        assert_eq!(r[1].options.timeout, Duration::from_secs(3600));
        assert_eq!(r[2].options, RouteOptions::default());
        // A timeout below the default get-timeout lowers it too.
        let r = parse_routes("web=8000;timeout=1s", false).unwrap();
        assert_eq!(r[0].options.get_timeout, Duration::from_secs(1));
    }

    #[test]
    fn every_bad_route_option_is_named() {
        let errs = parse_routes(
            "web=8000;balance=random;sticky=yes;timeout=5;get-timeout=0s;maxconn=0;retries=11;\
             colour=blue;balance=first,db=5432=tcp;sticky;get-timeout=1s,slow=8001;timeout=1s;\
             get-timeout=2s,n=8002;maxconn",
            false,
        )
        .unwrap_err();
        let expected = [
            "web: balance must be roundrobin, leastconn or first, got \"random\"",
            "web: sticky takes no value",
            "web: timeout \"5\" must be a duration such as 500ms, 2s or 1m",
            "web: get-timeout \"0s\" must be longer than zero",
            "web: maxconn must be a whole number between 1 and 100000, got \"0\"",
            "web: retries must be a whole number between 0 and 10, got \"11\"",
            "web: unknown option \"colour\"",
            "web: option balance is given twice",
            "db: sticky applies to http services only",
            "db: get-timeout applies to http services only",
            "slow: get-timeout (2s) must not exceed timeout (1s)",
            "n: option maxconn needs a value: write maxconn=<value>",
        ];
        assert_eq!(errs.len(), expected.len(), "{errs:#?}");
        for (e, want) in errs.iter().zip(expected) {
            assert!(e.starts_with(want), "{e:?} does not start with {want:?}");
        }
    }

    #[test]
    fn every_bad_variable_at_once() {
        let e = Config::from_env(&env(&[
            ("BAKER_ROUTES", "Emitter=8000"),
            ("BAKER_HTTP_PORT", "x"),
            ("BAKER_ADMIN", "99999"),
            ("BAKER_BIND", "nowhere"),
            ("BAKER_CHECKS", "maybe"),
            ("BAKER_DRAIN_TIMEOUT", "5"),
            ("BAKER_HAPROXY", "/nonexistent/haproxy"),
            ("BAKER_DIRECTORY", "ftp://x"),
            ("BAKER_TEMPLATE", "/nonexistent.tera"),
            ("BAKER_BENCH_FORCE_RELOAD", "perhaps"),
        ]))
        .unwrap_err();
        let vars: Vec<_> = e.0.iter().map(|(v, _)| v.as_str()).collect();
        for v in [
            "BAKER_ROUTES",
            "BAKER_HTTP_PORT",
            "BAKER_ADMIN",
            "BAKER_BIND",
            "BAKER_CHECKS",
            "BAKER_DRAIN_TIMEOUT",
            "BAKER_HAPROXY",
            "BAKER_DIRECTORY",
            "BAKER_TEMPLATE",
            "BAKER_BENCH_FORCE_RELOAD",
        ] {
            assert!(vars.contains(&v), "{v} missing from {e}");
        }
    }

    #[test]
    fn a_zone_and_its_overprovisioning() {
        let base = [
            ("BAKER_ROUTES", "a=8000"),
            ("BAKER_HAPROXY", "/bin/sh"),
            ("BAKER_RUN_DIR", "/tmp/x"),
        ];
        let with = |pairs: &[(&str, &str)]| {
            let mut all = base.to_vec();
            all.extend_from_slice(pairs);
            Config::from_env(&env(&all))
        };
        assert_eq!(with(&[]).unwrap().locality, None);
        let l = with(&[("BAKER_ZONE", "eu-west-1a")])
            .unwrap()
            .locality
            .unwrap();
        assert_eq!((l.zone.as_str(), l.overprovision), ("eu-west-1a", 140));
        let l = with(&[("BAKER_ZONE", "a"), ("BAKER_ZONE_OVERPROVISION", "200%")])
            .unwrap()
            .locality
            .unwrap();
        assert_eq!(l.overprovision, 200);
        let e = with(&[("BAKER_ZONE", "Zone A"), ("BAKER_ZONE_OVERPROVISION", "90")])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("BAKER_ZONE: must start with a lowercase letter or digit, got 'Z'"),
            "{e}"
        );
        assert!(
            e.contains("BAKER_ZONE_OVERPROVISION: must be a percentage between 100 and 1000"),
            "{e}"
        );
        let e = with(&[("BAKER_ZONE_OVERPROVISION", "150")]).unwrap_err();
        assert!(e.to_string().contains("set BAKER_ZONE too"), "{e}");
    }

    #[test]
    fn port_clash_is_reported() {
        let e = Config::from_env(&env(&[
            ("BAKER_ROUTES", "a=8000,b=8001"),
            ("BAKER_HTTP_PORT", "8001"),
            ("BAKER_HAPROXY", "/bin/sh"),
        ]))
        .unwrap_err();
        assert!(e.to_string().contains("port 8001 is used twice"), "{e}");
    }

    #[test]
    fn defaults() {
        let c = Config::from_env(&env(&[
            ("BAKER_ROUTES", "a=8000"),
            ("BAKER_HAPROXY", "/bin/sh"),
            ("BAKER_RUN_DIR", "/tmp/x"),
            ("BAKER_CHECKS", "http:/health"),
        ]))
        .unwrap();
        assert_eq!(c.admin, Some("127.0.0.1:8404".parse().unwrap()));
        assert_eq!(c.grace, DEFAULT_GRACE);
        assert_eq!(c.checks, Checks::Http("/health".into()));
        assert!(!c.force_reload);
        assert_eq!(c.directory, "http://127.0.0.1:7700");
    }

    #[test]
    fn the_admin_port_is_on_loopback_unless_an_address_is_given() {
        let admin = |pairs: &[(&str, &str)]| {
            let mut all = vec![
                ("BAKER_ROUTES", "a=8000"),
                ("BAKER_HAPROXY", "/bin/sh"),
                ("BAKER_RUN_DIR", "/tmp/x"),
            ];
            all.extend_from_slice(pairs);
            Config::from_env(&env(&all)).unwrap().admin
        };
        let lo = |port| Some(SocketAddr::from(([127, 0, 0, 1], port)));
        // Service ports on every interface do not take the admin port with them.
        assert_eq!(admin(&[("BAKER_BIND", "0.0.0.0")]), lo(8404));
        assert_eq!(
            admin(&[("BAKER_BIND", "0.0.0.0"), ("BAKER_ADMIN", "9000")]),
            lo(9000)
        );
        assert_eq!(
            admin(&[("BAKER_ADMIN", "0.0.0.0:9000")]),
            Some("0.0.0.0:9000".parse().unwrap())
        );
        assert_eq!(
            admin(&[("BAKER_ADMIN", "[::]:9000")]),
            Some("[::]:9000".parse().unwrap())
        );
        assert_eq!(admin(&[("BAKER_ADMIN", "off")]), None);
    }

    #[test]
    fn the_service_ports_bind_ipv6_with_or_without_brackets() {
        let bind = |v: &str| {
            Config::from_env(&env(&[
                ("BAKER_ROUTES", "a=8000"),
                ("BAKER_HAPROXY", "/bin/sh"),
                ("BAKER_RUN_DIR", "/tmp/x"),
                ("BAKER_BIND", v),
            ]))
            .map(|c| c.bind)
        };
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        for (written, meant) in [
            ("0.0.0.0", "0.0.0.0"),
            ("127.0.0.1", "127.0.0.1"),
            ("::", "::"),
            ("[::]", "::"),
            ("::1", "::1"),
            (" [::1] ", "::1"),
            ("[fd00:0::5]", "fd00::5"),
        ] {
            assert_eq!(bind(written).unwrap(), ip(meant), "{written}");
        }
        for bad in [
            "[127.0.0.1]",
            "[::1",
            "::1]",
            "[::1]:8000",
            "localhost",
            "0.0.0.0:80",
        ] {
            let e = bind(bad).unwrap_err().to_string();
            assert!(e.contains("BAKER_BIND"), "{bad}: {e}");
            assert!(e.contains("IP address") || e.contains("IPv6"), "{bad}: {e}");
        }
    }
}
