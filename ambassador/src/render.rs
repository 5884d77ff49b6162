//! Rendering HAProxy's configuration from a Tera template (the embedded default, or the user's
//! `BAKER_TEMPLATE`) and the documented context.

use baker_client::errors::chain;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use serde::Serialize;

use baker_client::model::{Address, ServiceName, Version};

use crate::config::{Balance, Checks, Config, Mode, RouteOptions};
use crate::listeners::{bind_spec, Fds};
use crate::plan::{Desired, ServerName};

/// The embedded default template.
pub const DEFAULT_TEMPLATE: &str = include_str!("../templates/haproxy.cfg.tera");

const NAME: &str = "haproxy.cfg";

/// What went wrong rendering.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error("the template does not parse: {0}")]
    Parse(String),
    #[error("the template fails to render: {0}")]
    Render(String),
}

/// A parsed template.
#[derive(Debug)]
pub struct Renderer {
    tera: tera::Tera,
}

impl Renderer {
    pub fn new(template: &str) -> Result<Self, RenderError> {
        let mut tera = tera::Tera::default();
        tera.autoescape_on(vec![]);
        tera.add_raw_template(NAME, template)
            .map_err(|e| RenderError::Parse(chain(&e)))?;
        Ok(Renderer { tera })
    }

    pub fn render(&self, ctx: &Context) -> Result<String, RenderError> {
        let ctx = tera::Context::from_serialize(ctx).map_err(|e| RenderError::Render(chain(&e)))?;
        self.tera
            .render(NAME, &ctx)
            .map_err(|e| RenderError::Render(chain(&e)))
    }
}

/// Everything a template can use.
#[derive(Debug, Clone, Serialize)]
pub struct Context {
    /// Address the service ports bind (`BAKER_BIND`).
    pub bind: String,
    /// What the shared HTTP port's `bind` line names: `fd@N`, a socket HAProxy inherits from
    /// the ambassador (see [`crate::listeners`]), or the address itself.
    pub http_listen: Option<String>,
    pub services: Vec<ServiceContext>,
    /// The shared HTTP port (`BAKER_HTTP_PORT`), if any.
    pub http_port: Option<u16>,
    /// Services reachable through the shared HTTP port (every HTTP-mode service).
    pub http_services: Vec<ServiceName>,
    pub admin: Option<AdminContext>,
    /// HAProxy's admin-level stats socket (the runtime API the ambassador drives).
    pub admin_socket: String,
    /// The master CLI socket (given to HAProxy on its command line with `-S`).
    pub master_socket: String,
    /// Where server state is saved before a reload.
    pub state_file: String,
    /// The ambassador's own HTTP endpoint (metrics, status), a unix socket.
    pub ambassador_socket: String,
    pub checks: ChecksContext,
    pub defaults: Defaults,
}

#[derive(Debug, Clone, Serialize)]
pub struct ServiceContext {
    pub name: ServiceName,
    pub port: Option<u16>,
    /// What its `bind` line names: `fd@N`, a socket HAProxy inherits from the ambassador, or
    /// the address itself (none without a port).
    pub listen: Option<String>,
    pub mode: Mode,
    pub servers: Vec<ServerContext>,
    /// Options every server line of this backend carries; the ambassador uses the same ones on
    /// `add server`, so servers added at run time match those in the file.
    pub server_options: String,
    /// The route's options (`BAKER_ROUTES`), in HAProxy's spelling.
    pub balance: Balance,
    pub timeout_connect: String,
    pub timeout_server: String,
    /// The server timeout of GET, HEAD and OPTIONS requests (HTTP services).
    pub timeout_get: String,
    pub retries: u32,
    /// The stickiness cookie's name, when the route is `sticky`.
    pub sticky_cookie: Option<String>,
    /// Whether all backup servers share the traffic while every other server is down
    /// (`option allbackups`): with a zone, the failover twins of the other zones' instances
    /// do; without one, only the first backup serves.
    pub all_backups: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct ServerContext {
    /// Unique in the backend: the instance id, `service:id` for an instance of another
    /// service, `backup:service:id` for a backup, `failover:service:id` for the failover twin
    /// of an instance of another zone.
    pub name: ServerName,
    /// The service the instance belongs to (another one than the backend's when a route sends
    /// it a share).
    pub service: ServiceName,
    pub address: Address,
    pub port: u16,
    pub weight: u16,
    pub version: Version,
    /// Serves only while no other server of the backend is up.
    pub backup: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct AdminContext {
    pub address: String,
    pub port: u16,
    /// What its `bind` line names: `fd@N` or the address.
    pub listen: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct ChecksContext {
    /// `off`, `tcp` or `http`.
    pub mode: String,
    pub http_path: Option<String>,
}

/// Timeouts and retry settings of the default template.
#[derive(Debug, Clone, Serialize)]
pub struct Defaults {
    pub timeout_connect: String,
    pub timeout_client: String,
    pub timeout_server: String,
    pub timeout_http_request: String,
    pub timeout_http_keep_alive: String,
    pub timeout_queue: String,
    /// How long a health check may wait for its answer.
    pub timeout_check: String,
    pub retries: u32,
    pub hard_stop_after: String,
    pub error_limit: u32,
}

/// HAProxy's spelling of an address to bind or dial (IPv6 needs no brackets: the last colon
/// separates the port).
fn host(ip: IpAddr) -> String {
    ip.to_string()
}

fn millis(d: std::time::Duration) -> String {
    format!("{}ms", d.as_millis())
}

/// A duration in HAProxy's spelling, in the largest unit that keeps it whole (`2s`, `1m`,
/// `1500ms`).
fn haproxy_duration(d: std::time::Duration) -> String {
    let ms = d.as_millis();
    match ms {
        _ if ms >= 3_600_000 && ms % 3_600_000 == 0 => format!("{}h", ms / 3_600_000),
        _ if ms >= 60_000 && ms % 60_000 == 0 => format!("{}m", ms / 60_000),
        _ if ms >= 1_000 && ms % 1_000 == 0 => format!("{}s", ms / 1_000),
        _ => format!("{ms}ms"),
    }
}

/// The options of every server line for a service in `mode`.
pub fn server_options(
    mode: Mode,
    checks: &Checks,
    error_limit: u32,
    options: &RouteOptions,
) -> String {
    let observe = match mode {
        Mode::Http => "layer7",
        Mode::Tcp => "layer4",
    };
    let check = match checks {
        // No periodic probe while a server is up (`inter 1h`): traffic is watched instead, and
        // a server marked down after `error-limit` consecutive errors is probed every second
        // until it answers again.
        Checks::Off => "check inter 1h fastinter 1s downinter 1s rise 2 fall 1",
        Checks::Tcp | Checks::Http(_) => "check inter 2s fastinter 1s downinter 1s rise 2 fall 2",
    };
    let maxconn = options
        .maxconn
        .map(|n| format!(" maxconn {n}"))
        .unwrap_or_default();
    format!("{check} observe {observe} error-limit {error_limit} on-error mark-down{maxconn}")
}

/// The stickiness cookie of a `sticky` service: `baker-<service>`, one per service, since
/// browsers share cookies between the ports of a host.
pub fn sticky_cookie(service: &ServiceName) -> String {
    format!("baker-{service}")
}

/// Builds the context from the configuration, the servers to run, and the listening sockets
/// HAProxy inherits (by address).
pub fn context(config: &Config, desired: &Desired, fds: &Fds) -> Context {
    let listen = |port: u16| bind_spec(fds, SocketAddr::new(config.bind, port));
    let defaults = Defaults {
        timeout_connect: "500ms".into(),
        timeout_client: "1m".into(),
        timeout_server: "1m".into(),
        timeout_http_request: "10s".into(),
        timeout_http_keep_alive: "10s".into(),
        timeout_queue: "5s".into(),
        timeout_check: "1s".into(),
        retries: 3,
        hard_stop_after: millis(config.stop_timeout),
        error_limit: 5,
    };
    let services = config
        .services
        .iter()
        .map(|s| ServiceContext {
            name: s.name.clone(),
            port: s.port,
            listen: s.port.map(listen),
            mode: s.mode,
            servers: desired
                .get(&s.name)
                .map(|b| {
                    b.values()
                        .map(|d| ServerContext {
                            name: d.name.clone(),
                            service: d.service.clone(),
                            address: d.address.clone(),
                            port: d.port,
                            weight: d.weight,
                            version: d.version.clone(),
                            backup: d.backup,
                        })
                        .collect()
                })
                .unwrap_or_default(),
            server_options: server_options(
                s.mode,
                &config.checks,
                defaults.error_limit,
                &s.options,
            ),
            balance: s.options.balance,
            timeout_connect: haproxy_duration(s.options.connect_timeout),
            timeout_server: haproxy_duration(s.options.timeout),
            timeout_get: haproxy_duration(s.options.get_timeout),
            retries: s.options.retries,
            sticky_cookie: s.options.sticky.then(|| sticky_cookie(&s.name)),
            all_backups: config.locality.is_some(),
        })
        .collect();
    let path = |name: &str| config.run_dir.join(name).display().to_string();
    Context {
        bind: host(config.bind),
        http_listen: config.http_port.map(listen),
        services,
        http_port: config.http_port,
        http_services: config
            .services
            .iter()
            .filter(|s| s.mode == Mode::Http)
            .map(|s| s.name.clone())
            .collect(),
        admin: config.admin.map(|a| AdminContext {
            address: host(a.ip()),
            port: a.port(),
            listen: bind_spec(fds, a),
        }),
        admin_socket: path("admin.sock"),
        master_socket: path("master.sock"),
        state_file: path("server-state"),
        ambassador_socket: path("ambassador.sock"),
        checks: ChecksContext {
            mode: match config.checks {
                Checks::Off => "off",
                Checks::Tcp => "tcp",
                Checks::Http(_) => "http",
            }
            .into(),
            http_path: match &config.checks {
                Checks::Http(p) => Some(p.clone()),
                _ => None,
            },
        },
        defaults,
    }
}

/// The template text to use: the user's file, or the embedded default.
pub fn template_text(config: &Config) -> &str {
    config
        .template
        .as_ref()
        .map(|(_, t)| t.as_str())
        .unwrap_or(DEFAULT_TEMPLATE)
}

/// Where the rendered file goes.
pub fn config_path(run_dir: &Path) -> std::path::PathBuf {
    run_dir.join("haproxy.cfg")
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::config::ServiceRoute;
    use crate::plan::DesiredServer;

    pub(crate) fn sample() -> (Config, Desired) {
        let mut c = Config::new(vec![
            ServiceRoute {
                name: "emitter".parse().unwrap(),
                port: Some(8000),
                mode: Mode::Http,
                options: Default::default(),
            },
            ServiceRoute {
                name: "transform".parse().unwrap(),
                port: None,
                mode: Mode::Http,
                options: RouteOptions {
                    balance: Balance::Leastconn,
                    sticky: true,
                    get_timeout: std::time::Duration::from_secs(10),
                    ..Default::default()
                },
            },
            ServiceRoute {
                name: "db".parse().unwrap(),
                port: Some(5432),
                mode: Mode::Tcp,
                options: RouteOptions {
                    balance: Balance::First,
                    connect_timeout: std::time::Duration::from_millis(200),
                    timeout: std::time::Duration::from_secs(3600),
                    maxconn: Some(100),
                    retries: 1,
                    ..Default::default()
                },
            },
        ]);
        c.http_port = Some(8080);
        c.run_dir = "/run/baker".into();
        let mut d = Desired::new();
        let srv = |name: &str, port, weight, version: &str| DesiredServer {
            version: version.parse().unwrap(),
            ..DesiredServer::sample(name, "10.0.0.2", port, weight)
        };
        let backend = |servers: Vec<DesiredServer>| {
            servers
                .into_iter()
                .map(|s| (s.name.clone(), s))
                .collect::<crate::plan::Backend>()
        };
        d.insert(
            "emitter".parse().unwrap(),
            backend(vec![srv("a", 8080, 231, "1"), srv("b", 8081, 26, "2")]),
        );
        d.insert("transform".parse().unwrap(), Default::default());
        let mut spare = baker_client::Instance {
            port: 5433,
            tags: vec!["backup".parse().unwrap()],
            ..baker_client::Instance::sample("db", "db-2")
        };
        spare.address = "10.0.0.3".parse().unwrap();
        d.insert(
            "db".parse().unwrap(),
            backend(vec![
                srv("db-1", 5432, 100, "1"),
                DesiredServer {
                    name: crate::plan::ServerName::of(&"db".parse().unwrap(), &spare),
                    service: spare.service.clone(),
                    backup: true,
                    ..srv("db-2", 5433, 100, "1")
                },
            ]),
        );
        (c, d)
    }

    /// The service port of `emitter` and the admin port inherited; the others bound by HAProxy.
    fn fds() -> Fds {
        Fds::from([
            ("0.0.0.0:8000".parse().unwrap(), 3),
            ("127.0.0.1:8404".parse().unwrap(), 4),
        ])
    }

    #[test]
    fn default_rendering_matches_golden_file() {
        let (c, d) = sample();
        let out = Renderer::new(DEFAULT_TEMPLATE)
            .unwrap()
            .render(&context(&c, &d, &fds()))
            .unwrap();
        let golden_path = concat!(env!("CARGO_MANIFEST_DIR"), "/testdata/default.cfg");
        if std::env::var_os("BAKER_BLESS").is_some() {
            std::fs::write(golden_path, &out).unwrap();
        }
        let golden = std::fs::read_to_string(golden_path).unwrap();
        assert_eq!(
            out, golden,
            "rendering changed; BAKER_BLESS=1 rewrites testdata/default.cfg"
        );
    }

    #[test]
    fn golden_file_is_valid_haproxy_configuration() {
        let golden = concat!(env!("CARGO_MANIFEST_DIR"), "/testdata/default.cfg");
        assert_valid(&std::fs::read_to_string(golden).unwrap());
    }

    #[test]
    fn with_a_zone_all_backups_share_and_failover_twins_are_backups() {
        let (mut c, mut d) = sample();
        c.locality = Some(crate::locality::Locality::new("a".parse().unwrap()));
        let other = baker_client::Instance {
            port: 8082,
            zone: Some("b".parse().unwrap()),
            ..baker_client::Instance::sample("emitter", "c")
        };
        let twin = DesiredServer {
            name: crate::plan::ServerName::failover_of(&other),
            service: other.service.clone(),
            backup: true,
            ..DesiredServer::sample("c", "10.0.0.1", 8082, 256)
        };
        d.get_mut("emitter")
            .unwrap()
            .insert(twin.name.clone(), twin);
        let out = Renderer::new(DEFAULT_TEMPLATE)
            .unwrap()
            .render(&context(&c, &d, &fds()))
            .unwrap();
        assert_eq!(out.matches("\n    option allbackups\n").count(), 3, "{out}");
        assert!(
            out.contains("\n    server failover:emitter:c 10.0.0.1:8082 weight 256 backup "),
            "{out}"
        );
        assert_valid(&out);
    }

    /// Checks a rendered configuration with `haproxy -c`.
    fn assert_valid(rendered: &str) {
        // `haproxy -c` does not look at inherited descriptors: check the file with addresses.
        let text = rendered
            .replace("bind fd@3", "bind 0.0.0.0:8000")
            .replace("bind fd@4", "bind 127.0.0.1:8404");
        if let Err(stderr) = haproxy_check(&text) {
            panic!("{stderr}");
        }
    }

    /// `haproxy -c` of `text`, with the run directory's paths moved to a temporary one.
    fn haproxy_check(text: &str) -> Result<(), String> {
        let bin = crate::config::default_haproxy();
        if !bin.exists() {
            panic!("this test needs HAProxy at {}", bin.display());
        }
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("haproxy.cfg");
        let text = text.replace("/run/baker/", &format!("{}/", dir.path().display()));
        std::fs::write(&cfg, text).unwrap();
        let out = std::process::Command::new(bin)
            .arg("-c")
            .arg("-f")
            .arg(&cfg)
            .output()
            .unwrap();
        if out.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    #[test]
    fn ipv6_binds_and_servers_are_written_as_haproxy_reads_them() {
        let (mut c, mut d) = sample();
        c.bind = "::1".parse().unwrap();
        c.admin = Some("[::]:8404".parse().unwrap());
        let emitter = d
            .get_mut(&"emitter".parse::<ServiceName>().unwrap())
            .unwrap();
        for (server, address) in emitter.values_mut().zip(["fd00:0::5", "::ffff:10.0.0.9"]) {
            server.address = address.parse().unwrap();
        }
        let out = Renderer::new(DEFAULT_TEMPLATE)
            .unwrap()
            .render(&context(&c, &d, &Fds::new()))
            .unwrap();
        for line in [
            "bind ::1:8000",
            "bind ::1:8080",
            "bind :::8404",
            "server a fd00::5:8080 weight 231 ",
            "server b ::ffff:10.0.0.9:8081 weight 26 ",
        ] {
            assert!(out.contains(line), "{line:?} missing from:\n{out}");
        }
        let addressed = out
            .lines()
            .map(str::trim)
            .filter(|l| l.starts_with("bind ") || l.starts_with("server "));
        for line in addressed {
            assert!(
                !line.contains('['),
                "HAProxy's spelling has no brackets: {line}"
            );
        }
        haproxy_check(&out).unwrap_or_else(|e| panic!("{e}\n{out}"));
    }

    #[test]
    fn bad_templates_are_reported() {
        assert!(matches!(
            Renderer::new("{% for %}"),
            Err(RenderError::Parse(_))
        ));
        let r = Renderer::new("{{ nosuch.field }}").unwrap();
        let (c, d) = sample();
        let e = r.render(&context(&c, &d, &Fds::new())).unwrap_err();
        assert!(e.to_string().contains("nosuch"), "{e}");
    }
}
