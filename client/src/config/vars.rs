//! Every `BAKER_*` variable of every Baker program: its name (an `ENV_*` constant, which the
//! program's configuration reads), its default and its meaning.
//!
//! The lists here are what `--help` prints and what tells a typo (fatal) from a variable of
//! another Baker program (a warning): a [`super::Reader`] refuses, in debug builds, to read a
//! name its program does not list, so a list cannot fall behind its configuration.

/// One variable a program reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Var {
    /// The full name, such as `BAKER_LISTEN`.
    pub name: &'static str,
    /// The default, as the user guide writes it (`none` when unset means "off" or "absent").
    pub default: &'static str,
    /// What it sets, in a few words.
    pub help: &'static str,
}

/// A Baker program and the variables it reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Program {
    /// The binary's name, such as `baker-registrar`.
    pub name: &'static str,
    /// One line saying what the program does (the first line of `--help`).
    pub about: &'static str,
    pub vars: &'static [Var],
}

impl Program {
    /// Whether `name` is one of this program's variables.
    pub fn reads(&self, name: &str) -> bool {
        self.vars.iter().any(|v| v.name == name)
    }

    /// The default `--help` shows for `name` (each program's tests compare it with the
    /// `DEFAULT_*` constant its configuration uses).
    pub fn default_of(&self, name: &str) -> Option<&'static str> {
        self.vars.iter().find(|v| v.name == name).map(|v| v.default)
    }
}

pub const ENV_ADMIN: &str = "BAKER_ADMIN";
pub const ENV_ADVERTISE: &str = "BAKER_ADVERTISE";
pub const ENV_BENCH_FORCE_RELOAD: &str = "BAKER_BENCH_FORCE_RELOAD";
pub const ENV_BIND: &str = "BAKER_BIND";
pub const ENV_CHECK: &str = "BAKER_CHECK";
pub const ENV_CHECK_BODY: &str = "BAKER_CHECK_BODY";
pub const ENV_CHECK_CODES: &str = "BAKER_CHECK_CODES";
pub const ENV_CHECKS: &str = "BAKER_CHECKS";
pub const ENV_CONFIG: &str = "BAKER_CONFIG";
pub const ENV_COUNT: &str = "BAKER_COUNT";
pub const ENV_DATA: &str = "BAKER_DATA";
pub const ENV_DIRECTORY: &str = "BAKER_DIRECTORY";
pub const ENV_DOCKER: &str = "BAKER_DOCKER";
pub const ENV_DOCKER_NETWORK: &str = "BAKER_DOCKER_NETWORK";
pub const ENV_DRAIN_TIMEOUT: &str = "BAKER_DRAIN_TIMEOUT";
pub const ENV_FALL: &str = "BAKER_FALL";
pub const ENV_GRACE: &str = "BAKER_GRACE";
pub const ENV_HISTORY: &str = "BAKER_HISTORY";
pub const ENV_HAPROXY: &str = "BAKER_HAPROXY";
pub const ENV_HTTP_PORT: &str = "BAKER_HTTP_PORT";
pub const ENV_ID: &str = "BAKER_ID";
pub const ENV_INSTANCE: &str = "BAKER_INSTANCE";
pub const ENV_INTERVAL: &str = "BAKER_INTERVAL";
pub const ENV_LINK: &str = "BAKER_LINK";
pub const ENV_LINK_PORT: &str = "BAKER_LINK_PORT";
pub const ENV_LISTEN: &str = "BAKER_LISTEN";
pub const ENV_MAX_AMBASSADORS: &str = "BAKER_MAX_AMBASSADORS";
pub const ENV_MAX_CONNECTIONS: &str = "BAKER_MAX_CONNECTIONS";
pub const ENV_MAX_DRAINS: &str = "BAKER_MAX_DRAINS";
pub const ENV_MAX_INSTANCES: &str = "BAKER_MAX_INSTANCES";
pub const ENV_MAX_INSTANCES_PER_SERVICE: &str = "BAKER_MAX_INSTANCES_PER_SERVICE";
pub const ENV_MAX_ROUTES: &str = "BAKER_MAX_ROUTES";
pub const ENV_MAX_SERVICES: &str = "BAKER_MAX_SERVICES";
pub const ENV_MAX_WATCHES: &str = "BAKER_MAX_WATCHES";
pub const ENV_NODE: &str = "BAKER_NODE";
pub const ENV_ZONE_OVERPROVISION: &str = "BAKER_ZONE_OVERPROVISION";
pub const ENV_PATH: &str = "BAKER_PATH";
pub const ENV_REQUEST_TIMEOUT: &str = "BAKER_REQUEST_TIMEOUT";
pub const ENV_RISE: &str = "BAKER_RISE";
pub const ENV_ROUTES: &str = "BAKER_ROUTES";
pub const ENV_RUN_DIR: &str = "BAKER_RUN_DIR";
pub const ENV_SERVICE: &str = "BAKER_SERVICE";
pub const ENV_STOP_DELAY: &str = "BAKER_STOP_DELAY";
pub const ENV_STOP_TIMEOUT: &str = "BAKER_STOP_TIMEOUT";
pub const ENV_STORE: &str = "BAKER_STORE";
pub const ENV_SWARM_POLL: &str = "BAKER_SWARM_POLL";
pub const ENV_TAGS: &str = "BAKER_TAGS";
pub const ENV_TARGET: &str = "BAKER_TARGET";
pub const ENV_TEMPLATE: &str = "BAKER_TEMPLATE";
pub const ENV_TIMEOUT: &str = "BAKER_TIMEOUT";
pub const ENV_TOKEN: &str = "BAKER_TOKEN";
pub const ENV_CA: &str = "BAKER_CA";
pub const ENV_TLS_CERT: &str = "BAKER_TLS_CERT";
pub const ENV_TLS_KEY: &str = "BAKER_TLS_KEY";
pub const ENV_ETCD_CA: &str = "BAKER_ETCD_CA";
pub const ENV_ETCD_CERT: &str = "BAKER_ETCD_CERT";
pub const ENV_ETCD_KEY: &str = "BAKER_ETCD_KEY";
pub const ENV_TOKENS: &str = "BAKER_TOKENS";
pub const ENV_READ: &str = "BAKER_READ";
pub const ENV_VERSION: &str = "BAKER_VERSION";
pub const ENV_WATCH_TOKEN: &str = "BAKER_WATCH_TOKEN";
pub const ENV_WEIGHT: &str = "BAKER_WEIGHT";
pub const ENV_ZONE: &str = "BAKER_ZONE";

const fn var(name: &'static str, default: &'static str, help: &'static str) -> Var {
    Var {
        name,
        default,
        help,
    }
}

pub const DIRECTORY: Program = Program {
    name: "baker-directory",
    about: "Baker's directory: the instances of every service and the canary routes.",
    vars: &[
        var(ENV_LISTEN, "0.0.0.0:7700", "address of the HTTP API"),
        var(
            ENV_TOKEN,
            "none",
            "bearer token every PUT and DELETE must send",
        ),
        var(
            ENV_WATCH_TOKEN,
            "none",
            "bearer token a watch must send (BAKER_TOKEN works too)",
        ),
        var(
            ENV_TOKENS,
            "none",
            "file of named tokens with roles and scopes: NAME ROLE SCOPE sha256:HEX a line",
        ),
        var(
            ENV_READ,
            "open",
            "open, or token: every read and watch needs a token of role read or more",
        ),
        var(
            ENV_TLS_CERT,
            "none",
            "PEM certificate chain: with BAKER_TLS_KEY, the directory serves HTTPS only",
        ),
        var(
            ENV_TLS_KEY,
            "none",
            "PEM private key of BAKER_TLS_CERT (both files are reloaded when they change)",
        ),
        var(
            ENV_ETCD_CA,
            "BAKER_CA",
            "PEM bundle of the CA that signed the etcds:// members' certificates",
        ),
        var(
            ENV_CA,
            "none",
            "PEM bundle trusted for etcds:// members when BAKER_ETCD_CA is not set",
        ),
        var(
            ENV_ETCD_CERT,
            "none",
            "PEM client certificate for etcd members that require one (with BAKER_ETCD_KEY)",
        ),
        var(ENV_ETCD_KEY, "none", "PEM private key of BAKER_ETCD_CERT"),
        var(
            ENV_DATA,
            "./data",
            "directory holding the routes and drains (memory store)",
        ),
        var(
            ENV_STORE,
            "memory",
            "where the table lives: memory, or etcd://host:port,host:port[/prefix] for replicas",
        ),
        var(
            ENV_DOCKER,
            "auto",
            "discovery of labelled containers and swarm services: auto, on, swarm, off",
        ),
        var(
            ENV_DOCKER_NETWORK,
            "none",
            "network whose address a discovered container or swarm task gets",
        ),
        var(
            ENV_SWARM_POLL,
            "500ms",
            "how often a swarm manager's tasks are listed when no event comes sooner",
        ),
        var(
            ENV_NODE,
            "the Docker engine's name, else the host name",
            "node name shown with the containers discovered here",
        ),
        var(
            ENV_ZONE,
            "none",
            "zone of the containers discovered here that have no baker.zone label",
        ),
        var(
            ENV_MAX_CONNECTIONS,
            "8192",
            "open client connections at most, watches included",
        ),
        var(
            ENV_MAX_WATCHES,
            "half of BAKER_MAX_CONNECTIONS",
            "open watch streams at most",
        ),
        var(
            ENV_MAX_INSTANCES_PER_SERVICE,
            "20000",
            "live instances in one service at most",
        ),
        var(
            ENV_MAX_SERVICES,
            "10000",
            "services with live instances at most",
        ),
        var(ENV_MAX_INSTANCES, "250000", "live instances in all at most"),
        var(ENV_MAX_ROUTES, "10000", "routes at most"),
        var(
            ENV_HISTORY,
            "10000",
            "events of the history (GET /v1/events) kept at most",
        ),
        var(
            ENV_MAX_DRAINS,
            "10000",
            "drains (of instances and versions) in place at most",
        ),
        var(
            ENV_MAX_AMBASSADORS,
            "10000",
            "ambassadors whose reports are kept at most",
        ),
        var(
            ENV_REQUEST_TIMEOUT,
            "10s",
            "longest a request other than a watch may take",
        ),
    ],
};

pub const REGISTRAR: Program = Program {
    name: "baker-registrar",
    about: "Baker's registrar: probes apps and keeps their registrations in the directory true.",
    vars: &[
        var(
            ENV_CONFIG,
            "none",
            "a TOML file with one table per service to register",
        ),
        var(
            ENV_DIRECTORY,
            "http://127.0.0.1:7700",
            "the directory's URL, or its replicas' URLs separated by commas",
        ),
        var(ENV_TOKEN, "none", "the directory's bearer token"),
        var(
            ENV_CA,
            "the system's roots",
            "PEM bundle of the CA certificates trusted for an https:// directory",
        ),
        var(
            ENV_SERVICE,
            "required",
            "the service to register the app under",
        ),
        var(ENV_ID, "<hostname>-<port>", "the instance id"),
        var(
            ENV_TARGET,
            "the linked app",
            "the app: http://host:port or tcp://host:port",
        ),
        var(
            ENV_ADVERTISE,
            "the target's address",
            "host:port others should dial",
        ),
        var(ENV_CHECK, "http:/health", "the probe: http:/<path> or tcp"),
        var(
            ENV_CHECK_CODES,
            "any 2xx",
            "statuses that count as healthy, e.g. 200,204",
        ),
        var(
            ENV_CHECK_BODY,
            "none",
            "text the response body must contain",
        ),
        var(ENV_TIMEOUT, "1s", "longest a probe may take"),
        var(
            ENV_INTERVAL,
            "2s",
            "time between probes and heartbeats (TTL: 3 intervals)",
        ),
        var(ENV_RISE, "2", "passes in a row before the app is up"),
        var(ENV_FALL, "2", "failures in a row before the app is down"),
        var(ENV_VERSION, "1", "the version registered"),
        var(ENV_WEIGHT, "100", "the weight registered (1-256)"),
        var(ENV_TAGS, "none", "comma-separated tags registered"),
        var(
            ENV_ZONE,
            "none",
            "the zone registered with every service of this registrar",
        ),
    ],
};

pub const AMBASSADOR: Program = Program {
    name: "baker-ambassador",
    about: "Baker's ambassador: local ports that reach the live instances, through HAProxy.",
    vars: &[
        var(
            ENV_DIRECTORY,
            "http://127.0.0.1:7700",
            "the directory's URL, or its replicas' URLs separated by commas",
        ),
        var(ENV_TOKEN, "none", "the directory's bearer token"),
        var(
            ENV_CA,
            "the system's roots",
            "PEM bundle of the CA certificates trusted for an https:// directory",
        ),
        var(
            ENV_WATCH_TOKEN,
            "BAKER_TOKEN",
            "the token sent with the watch",
        ),
        var(
            ENV_ID,
            "<hostname>-<first port>",
            "the name this ambassador reports to the directory under",
        ),
        var(
            ENV_ROUTES,
            "required",
            "services and their ports: emitter=8000,db=5432=tcp",
        ),
        var(
            ENV_HTTP_PORT,
            "none",
            "one port routing /<service>/ to every HTTP service",
        ),
        var(
            ENV_ADMIN,
            "127.0.0.1:8404",
            "stats, metrics and status: a port (on loopback), ip:port, or off",
        ),
        var(
            ENV_BIND,
            "0.0.0.0",
            "address the service ports bind (IPv6 too: ::, [::1])",
        ),
        var(
            ENV_ZONE,
            "none",
            "its zone: instances of this zone are preferred",
        ),
        var(
            ENV_ZONE_OVERPROVISION,
            "140",
            "percent: a zone keeps all traffic down to 1/1.4 of an even share",
        ),
        var(
            ENV_TEMPLATE,
            "embedded",
            "a Tera file replacing the embedded template",
        ),
        var(
            ENV_HAPROXY,
            "haproxy on PATH",
            "the HAProxy binary (2.6 or later)",
        ),
        var(
            ENV_RUN_DIR,
            "/run/baker",
            "rendered configuration, sockets, pid file",
        ),
        var(
            ENV_CHECKS,
            "off",
            "active health checks: off, tcp, http:/<path>",
        ),
        var(
            ENV_DRAIN_TIMEOUT,
            "30s",
            "how long a removed server may finish its sessions",
        ),
        var(
            ENV_STOP_TIMEOUT,
            "5s",
            "how long a stopping worker may finish its connections",
        ),
        var(
            ENV_GRACE,
            "30s",
            "longest instances missing from a fresh snapshot are kept",
        ),
        var(
            ENV_BENCH_FORCE_RELOAD,
            "0",
            "benchmarks only: apply every change by a reload",
        ),
    ],
};

pub const GREETING: Program = Program {
    name: "baker-greeting",
    about: "The Greeting example service: GET /greeting, GET /health.",
    vars: &[
        var(ENV_LISTEN, "0.0.0.0:8080", "address to listen on"),
        var(ENV_VERSION, "1", "the version reported in every greeting"),
        var(
            ENV_INSTANCE,
            "the host name",
            "the instance reported in every greeting",
        ),
        var(
            ENV_STOP_DELAY,
            "0s",
            "how long it keeps answering after SIGTERM before it stops accepting",
        ),
    ],
};

pub const GREETING_CLIENT: Program = Program {
    name: "baker-greeting-client",
    about: "Calls the Greeting service through its Docker-link variables, over and over.",
    vars: &[
        var(
            ENV_LINK,
            "greeting",
            "the link alias whose variables lead to the service",
        ),
        var(ENV_LINK_PORT, "8000", "the link's exposed port"),
        var(ENV_PATH, "/greeting", "the path to GET"),
        var(ENV_INTERVAL, "1s", "pause between two requests"),
        var(
            ENV_COUNT,
            "0",
            "stop after this many answers; 0 never stops",
        ),
    ],
};

pub const CLI: Program = Program {
    name: "baker",
    about: "Baker's operator CLI.",
    vars: &[
        var(
            ENV_DIRECTORY,
            "http://127.0.0.1:7700",
            "the directory's URL, or its replicas' URLs separated by commas (--directory)",
        ),
        var(ENV_TOKEN, "none", "the directory's bearer token (--token)"),
        var(
            ENV_CA,
            "the system's roots",
            "PEM bundle of the CA certificates trusted for an https:// directory (--ca)",
        ),
        var(
            ENV_WATCH_TOKEN,
            "BAKER_TOKEN",
            "the token `baker watch` sends (--watch-token)",
        ),
        var(
            ENV_ZONE,
            "none",
            "the zone `baker register` registers the instance in (--zone)",
        ),
    ],
};

/// The programs that read `BAKER_*` variables.
pub const PROGRAMS: &[&Program] = &[
    &DIRECTORY,
    &REGISTRAR,
    &AMBASSADOR,
    &GREETING,
    &GREETING_CLIENT,
    &CLI,
];

/// Variables of Baker's scripts, compose files, tests and benchmarks: a daemon that sees one
/// ignores it with a warning, like another program's variable.
pub const TOOLS: &[(&str, &[&str])] = &[
    (
        "the compose files",
        &[
            "BAKER_NETWORK",
            "BAKER_DIRECTORY_PUBLISH",
            "BAKER_DIRECTORY_1_PUBLISH",
            "BAKER_DIRECTORY_2_PUBLISH",
            "BAKER_GREETING_PUBLISH",
            "BAKER_ADMIN_PUBLISH",
            "BAKER_HA_SECRETS",
        ],
    ),
    ("docker/build.sh", &["BAKER_IMAGE_TAG", ENV_HAPROXY]),
    (
        "the tests",
        &[
            "BAKER_TEST_SKIP",
            "BAKER_TEST_LOG",
            "BAKER_TEST_ECHO",
            "BAKER_BLESS",
        ],
    ),
    (
        "baker-bench",
        &[
            "BAKER_BENCH_LOG",
            "BAKER_BENCH_INSTANCES",
            "BAKER_BENCH_WATCHERS",
        ],
    ),
];

/// The Baker programs and tools, other than `program`, that read `name`.
pub fn readers_of(name: &str, program: &Program) -> Vec<&'static str> {
    let programs = PROGRAMS
        .iter()
        .filter(|p| p.name != program.name && p.reads(name))
        .map(|p| p.name);
    let tools = TOOLS
        .iter()
        .filter(|(_, vars)| vars.contains(&name))
        .map(|(tool, _)| *tool);
    let mut out: Vec<&'static str> = programs.chain(tools).collect();
    out.dedup();
    out
}
