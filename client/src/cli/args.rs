//! The command line, and the parsers of its values.
//!
//! Everything that names a service, an instance or a version is parsed here into the same
//! types the directory uses, so a typo is a usage error (exit 2) before any request is sent.

use baker_client::api::DEFAULT_DIRECTORY;
use baker_client::model::{printable, Address, InstanceId, ServiceName, Target, ValidationError};
use clap::{Args, Parser, Subcommand};

const AFTER_HELP: &str = "\
Examples:
  baker services
  baker instances emitter
  baker route set emitter 1=90 2=10
  baker drain emitter/emitter-1 --reason 'kernel upgrade'
  baker events --since 10m --service emitter
  baker watch
  baker links emitter=emitter-amb:8000

Exit codes: 0 ok, 1 the command failed (the directory refused it, or answered oddly),
2 bad usage or input (nothing was sent), 64 bad configuration (--directory),
69 the directory could not be reached.";

/// Operate Baker: list services and instances, set canary routes, watch changes.
#[derive(Debug, Parser)]
#[command(
    name = "baker",
    version,
    after_help = AFTER_HELP,
    disable_help_subcommand = true
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

/// Options every command accepts.
#[derive(Debug, Clone, Args)]
pub struct Global {
    /// The directory's URL (empty means the default).
    #[arg(
        long,
        global = true,
        env = "BAKER_DIRECTORY",
        hide_env_values = true,
        default_value = DEFAULT_DIRECTORY,
        value_name = "URL"
    )]
    pub directory: String,

    /// Bearer token for changes, when the directory has BAKER_TOKEN set (prefer the variable:
    /// a flag shows in the process list).
    #[arg(
        long,
        global = true,
        env = "BAKER_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    pub token: Option<String>,

    /// PEM bundle of the CA certificates to trust for an https:// directory (default: the
    /// system's roots).
    #[arg(
        long,
        global = true,
        env = "BAKER_CA",
        hide_env_values = true,
        value_name = "FILE"
    )]
    pub ca: Option<std::path::PathBuf>,

    /// Print JSON for programs instead of tables and lines for humans.
    #[arg(long, global = true)]
    pub json: bool,

    /// Leave out table headers.
    #[arg(long, global = true)]
    pub no_headers: bool,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// List services: live instances, their versions, and the route.
    #[command(visible_alias = "svc")]
    Services,

    /// List the live instances of a service (of every service when none is named).
    #[command(visible_alias = "inst")]
    Instances {
        /// The service.
        #[arg(value_parser = service_name)]
        service: Option<ServiceName>,
    },

    /// Show, set or clear canary routes (version → percent of traffic).
    #[command(subcommand)]
    Route(RouteCommand),

    /// Follow changes live: instances coming and going, weights, routes.
    ///
    /// Prints the current state first, then one line per change. Reconnects with backoff when
    /// the directory goes away, saying so on stderr, and prints only what changed meanwhile.
    /// With --json, prints the directory's events as they come (NDJSON, pings included).
    Watch {
        /// Start each human line with the time it was printed (RFC 3339, UTC).
        #[arg(short = 't', long)]
        timestamps: bool,
        /// Only these services and their routes (comma-separated, or repeated).
        #[arg(
            short = 's',
            long = "service",
            value_name = "SERVICE",
            value_delimiter = ','
        )]
        services: Vec<baker_client::model::ServiceName>,

        /// Bearer token for the watch, when the directory has BAKER_WATCH_TOKEN set (default:
        /// --token, which the directory accepts for watches too).
        #[arg(
            long,
            env = "BAKER_WATCH_TOKEN",
            hide_env_values = true,
            value_name = "TOKEN"
        )]
        watch_token: Option<String>,
    },

    /// Register an instance, or renew its registration.
    ///
    /// The instance expires after its TTL (--ttl, 6s by default) unless registered again; a
    /// registrar sidecar does this for you. Registering an existing id replaces its fields.
    Register(RegisterArgs),

    /// Deregister an instance now.
    Deregister {
        /// The service.
        #[arg(value_parser = service_name)]
        service: ServiceName,
        /// The instance id.
        #[arg(value_parser = instance_id)]
        id: InstanceId,
    },

    /// Take an instance, or every instance of a version, out of rotation on every ambassador.
    ///
    /// `baker drain emitter/emitter-1` drains one instance, `baker drain emitter --version 2`
    /// every instance of version 2, registered now or later. A drained instance stays
    /// registered and healthy, but gets no new request; those in flight finish. The drain
    /// survives a directory restart, until `baker undrain`.
    Drain {
        /// Drain even if no live instance matches (ahead of its registration); the directory
        /// refuses such a drain otherwise, naming what runs: the name is likely a mistake.
        #[arg(long)]
        force: bool,
        /// SERVICE/ID for an instance, or SERVICE with --version.
        #[arg(value_name = "SERVICE[/ID]")]
        what: String,
        /// Drain every instance of this version.
        #[arg(long)]
        version: Option<String>,
        /// Why, for the people who will see it (printable ASCII, at most 200 characters).
        #[arg(long)]
        reason: Option<String>,
        #[command(flatten)]
        wait: Wait,
    },

    /// Lift a drain: the instance, or the version's instances, take traffic again.
    Undrain {
        /// SERVICE/ID for an instance, or SERVICE with --version.
        #[arg(value_name = "SERVICE[/ID]")]
        what: String,
        /// Undrain this version.
        #[arg(long)]
        version: Option<String>,
        #[command(flatten)]
        wait: Wait,
    },

    /// What happened: the directory's last changes, oldest first, with their cause and origin.
    ///
    /// `baker events --since 10m --service emitter` lists what happened to emitter in the last
    /// ten minutes: instances registered, changed, deregistered or expired, containers started,
    /// stopped or unhealthy, routes set or cleared, drains and undrains.
    Events {
        /// From this time on: a duration ago (`10m`, `2h`), an RFC 3339 time with its offset
        /// from UTC (`2026-12-03T10:00:00Z`, `2026-12-03T12:00:00+02:00`), or milliseconds since
        /// the Unix epoch.
        #[arg(long, value_parser = point_in_time, value_name = "WHEN")]
        since: Option<u64>,
        /// Up to this time, in the same forms.
        #[arg(long, value_parser = point_in_time, value_name = "WHEN")]
        until: Option<u64>,
        /// Only this service.
        #[arg(short = 's', long, value_parser = service_name)]
        service: Option<ServiceName>,
        /// At most this many, the newest [default: 1000].
        #[arg(long)]
        limit: Option<usize>,
    },

    /// List every drain in place: what, why, since when, and from where.
    #[command(visible_alias = "maint")]
    Maintenance,

    /// List the ambassadors reporting to the directory: live, and caught up with its changes?
    ///
    /// An ambassador reports every 2 seconds; one silent for longer than its report's TTL is
    /// shown as `silent`, and forgotten 5 minutes later. APPLIED is the directory's index
    /// the ambassador's HAProxy runs, over the directory's current index.
    #[command(visible_alias = "amb")]
    Ambassadors,

    /// Requests and errors per instance, summed over every live ambassador.
    ///
    /// Counters come from each ambassador's HAProxy (`show stat`) and restart from zero when
    /// it reloads. UP-ON says on how many ambassadors the instance is up.
    Traffic {
        /// Only this service.
        #[arg(value_parser = service_name)]
        service: Option<ServiceName>,
    },

    /// Print the variables Docker would inject for `--link` (no directory needed).
    ///
    /// `baker links emitter=emitter-amb:8000` prints EMITTER_PORT=tcp://emitter-amb:8000,
    /// EMITTER_PORT_8000_TCP=..., ..._ADDR, ..._PORT and ..._PROTO, ready for an env file.
    Links {
        /// Links as ALIAS=HOST:PORT, with /udp for UDP ([v6]:PORT for IPv6).
        #[arg(required = true, value_parser = link_spec, value_name = "ALIAS=HOST:PORT[/udp]")]
        links: Vec<LinkSpec>,
        /// Start each line with `export `, for `eval "$(baker links --export ...)"`.
        #[arg(long)]
        export: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum RouteCommand {
    /// Split a service's traffic between versions or services, in percent summing to 100.
    ///
    /// `baker route set emitter 1=90 2=10` sends 90 % to version 1 and 10 % to version 2;
    /// versions not named get nothing. `baker route set monolith monolith=70 barker=30` sends
    /// 30 % of monolith's traffic to the service barker, and `barker@2=10` to its version 2
    /// (`barker@*` is the whole service, written out). While none of the targets given a share
    /// has a live instance, the route is set aside and every live instance serves, as with no
    /// route.
    Set {
        /// Set the route even if the service, or another service it sends to, has never had a
        /// live instance, or if none of its targets has one while the service has some (the
        /// directory refuses such a route otherwise: a name in it is likely a mistake).
        #[arg(long)]
        force: bool,
        /// The service.
        #[arg(value_parser = service_name)]
        service: ServiceName,
        #[command(flatten)]
        wait: Wait,
        /// TARGET=PERCENT pairs, separated by spaces or commas; a target is a version (`2`), a
        /// service (`barker`, or `barker@*`) or a version of a service (`barker@2`).
        #[arg(
            required = true,
            value_parser = split,
            value_delimiter = ',',
            value_name = "TARGET=PERCENT"
        )]
        splits: Vec<(Target, u64)>,
    },
    /// List every route.
    #[command(visible_alias = "ls")]
    List,
    /// Remove a service's route: traffic follows the instances' weights again.
    #[command(visible_aliases = ["rm", "delete"])]
    Clear {
        /// The service.
        #[arg(value_parser = service_name)]
        service: ServiceName,
        #[command(flatten)]
        wait: Wait,
    },
}

/// `--wait` and `--timeout` of the commands that change what ambassadors route.
#[derive(Debug, Clone, Copy, Args)]
pub struct Wait {
    /// After the change, wait until every live ambassador has applied it.
    #[arg(long)]
    pub wait: bool,
    /// How long --wait waits at most, e.g. 10s, 2m.
    #[arg(long, value_parser = duration, value_name = "DURATION", default_value = "30s", requires = "wait")]
    pub timeout: std::time::Duration,
}

#[derive(Debug, Clone, Args)]
pub struct RegisterArgs {
    /// The service.
    #[arg(value_parser = service_name)]
    pub service: ServiceName,
    /// The instance id, unique within the service.
    #[arg(value_parser = instance_id)]
    pub id: InstanceId,
    /// Where clients connect: an IP address or a DNS name.
    #[arg(long)]
    pub address: String,
    /// Where clients connect: the port.
    #[arg(long)]
    pub port: u64,
    /// The instance's version [default: 1].
    #[arg(long)]
    pub version: Option<String>,
    /// Share of traffic relative to the other instances, 1-256 [default: 100].
    #[arg(long)]
    pub weight: Option<u64>,
    /// A tag (repeat the flag or separate with commas).
    #[arg(long = "tag", value_delimiter = ',', value_name = "TAG")]
    pub tags: Vec<String>,
    /// How long the registration lives without being renewed, e.g. 30s, 5m, 1h [default: 6s].
    #[arg(long, value_parser = ttl, value_name = "DURATION")]
    pub ttl: Option<u64>,
    /// The zone the instance runs in, such as eu-west-1a (empty means none) [default: none].
    #[arg(long, env = "BAKER_ZONE")]
    pub zone: Option<String>,
}

/// One `ALIAS=HOST:PORT[/PROTO]` of `baker links`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkSpec {
    pub alias: String,
    pub host: String,
    pub port: u16,
    pub proto: String,
}

fn service_name(value: &str) -> Result<ServiceName, String> {
    value.parse().map_err(|e: ValidationError| e.message)
}

fn instance_id(value: &str) -> Result<InstanceId, String> {
    value.parse().map_err(|e: ValidationError| e.message)
}

/// Parses `TARGET=PERCENT` (`1=90`, `barker=30`, `barker@2=10`). A bare name is read as a
/// version here; `baker route set` decides later whether it names a service. The whole route
/// is checked later, all problems at once.
pub fn split(value: &str) -> Result<(Target, u64), String> {
    let (target, pct) = value.split_once('=').ok_or_else(|| {
        "expected TARGET=PERCENT, such as 1=90, barker=30 or barker@2=10".to_owned()
    })?;
    let target = Target::parse_as("target", target.trim(), None).map_err(|e| {
        if target.contains('@') {
            format!("target {}: {}", printable(target.trim()), e.message)
        } else {
            format!("version or service {}", e.message)
        }
    })?;
    let pct = pct.trim().trim_end_matches('%');
    let pct: u64 = pct.parse().map_err(|_| {
        format!(
            "percent of {target} must be a whole number from 0 to 100, got {:?}",
            printable(pct)
        )
    })?;
    Ok((target, pct))
}

/// Parses a point in time: a duration ago (`10m`), an RFC 3339 time with its offset, or
/// milliseconds since the Unix epoch; answers milliseconds since the Unix epoch.
fn point_in_time(value: &str) -> Result<u64, String> {
    if let Ok(ago) = baker_client::config::parse_duration(value) {
        let now = baker_client::events::unix_millis();
        return Ok(now.saturating_sub(ago.as_millis() as u64));
    }
    baker_client::events::parse_time_or(
        value,
        &format!(
            "a duration ago such as 10m, an RFC 3339 time with its offset from UTC such as {}, \
             or milliseconds since the Unix epoch",
            baker_client::events::TIME_EXAMPLE
        ),
    )
}

/// Parses a duration such as `30s`.
fn duration(value: &str) -> Result<std::time::Duration, String> {
    baker_client::config::parse_duration(value)
}

/// Parses a TTL such as `30s` into milliseconds.
fn ttl(value: &str) -> Result<u64, String> {
    let d = baker_client::config::parse_duration(value)?;
    u64::try_from(d.as_millis()).map_err(|_| "is too long".to_owned())
}

/// Parses `ALIAS=HOST:PORT[/PROTO]`, with `[v6]:PORT` for IPv6 hosts.
pub fn link_spec(value: &str) -> Result<LinkSpec, String> {
    let usage = "expected ALIAS=HOST:PORT or ALIAS=HOST:PORT/udp, such as emitter=emitter-amb:8000";
    let (alias, target) = value.split_once('=').ok_or(usage)?;
    let (target, proto) = match target.rsplit_once('/') {
        Some((t, p)) => (t, p.to_ascii_lowercase()),
        None => (target, "tcp".to_owned()),
    };
    if proto != "tcp" && proto != "udp" {
        return Err(format!(
            "protocol must be tcp or udp, got {:?}",
            printable(&proto)
        ));
    }
    let (host, port) = if let Some(v6) = target.strip_prefix('[') {
        v6.split_once("]:").ok_or(usage)?
    } else {
        target.rsplit_once(':').ok_or(usage)?
    };
    if host.contains(':') && !target.starts_with('[') {
        return Err(format!(
            "write an IPv6 address in brackets, such as [fd00::1]:8000, got {:?}",
            printable(target)
        ));
    }
    let port: u16 = port.parse().ok().filter(|p| *p != 0).ok_or_else(|| {
        format!(
            "port must be between 1 and 65535, got {:?}",
            printable(port)
        )
    })?;
    Address::parse_as("host", host).map_err(|e| e.to_string())?;
    if alias.is_empty() {
        return Err(format!("the alias is missing: {usage}"));
    }
    Ok(LinkSpec {
        alias: alias.to_owned(),
        host: host.to_owned(),
        port,
        proto,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::error::ErrorKind;
    use clap::CommandFactory;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("baker").chain(args.iter().copied()))
    }

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn points_in_time_take_offsets_and_refuse_a_time_without_one() {
        assert_eq!(
            point_in_time("2026-12-06T10:00:00+02:00"),
            point_in_time("2026-12-06T08:00:00Z")
        );
        assert_eq!(point_in_time("1500"), Ok(1500));
        let e = point_in_time("2026-12-06T10:00:00").unwrap_err();
        assert!(e.starts_with("must be a duration ago such as 10m"), "{e}");
        assert!(
            e.ends_with(
                "has no offset from UTC: add Z for UTC or the offset of its zone, such \
                 as 2026-12-06T10:00:00Z or 2026-12-06T10:00:00+02:00"
            ),
            "{e}"
        );
        let e = parse(&["events", "--since", "yesterday"]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ValueValidation);
    }

    #[test]
    fn splits() {
        let split = |v| split(v).map(|(target, pct)| (target.to_string(), pct));
        assert_eq!(split("1=90").unwrap(), ("1".parse().unwrap(), 90));
        assert_eq!(split("barker@2=10").unwrap(), ("barker@2".into(), 10));
        assert_eq!(split("barker@*=30").unwrap(), ("barker@*".into(), 30));
        assert!(split("barker@=30")
            .unwrap_err()
            .starts_with("target barker@: "));
        assert!(split("Barker@2=30")
            .unwrap_err()
            .contains("service before '@'"));
        assert_eq!(split("v2.1=10%").unwrap(), ("v2.1".parse().unwrap(), 10));
        assert_eq!(split(" 2 = 0 ").unwrap(), ("2".parse().unwrap(), 0));
        assert!(split("1:90").unwrap_err().contains("TARGET=PERCENT"));
        assert!(split("1=ninety").unwrap_err().contains("whole number"));
        assert!(split("1=-5").is_err());
        assert!(split("V1=90")
            .unwrap_err()
            .starts_with("version or service "));
        assert!(split("=90").is_err());
    }

    #[test]
    fn route_set_takes_spaces_and_commas() {
        let cli = parse(&["route", "set", "emitter", "1=80,2=10", "3=10"]).unwrap();
        match cli.command {
            Command::Route(RouteCommand::Set {
                service,
                splits,
                force,
                wait,
            }) => {
                assert!(!force);
                assert!(!wait.wait);
                assert_eq!(wait.timeout, std::time::Duration::from_secs(30));
                assert_eq!(service, "emitter");
                let splits: Vec<_> = splits.iter().map(|(t, p)| (t.to_string(), *p)).collect();
                assert_eq!(
                    splits,
                    [("1".into(), 80), ("2".into(), 10), ("3".into(), 10)]
                );
            }
            other => panic!("parsed as {other:?}"),
        }
        let cli = parse(&["route", "set", "--force", "emitter", "3=100"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Route(RouteCommand::Set { force: true, .. })
        ));
        let cli = parse(&[
            "route",
            "set",
            "emitter",
            "1=100",
            "--wait",
            "--timeout",
            "5s",
        ])
        .unwrap();
        assert!(matches!(
            cli.command,
            Command::Route(RouteCommand::Set { wait: Wait { wait: true, timeout }, .. })
                if timeout == std::time::Duration::from_secs(5)
        ));
        assert!(parse(&["route", "set", "emitter", "1=100", "--timeout", "5s"]).is_err());
        let err = parse(&["route", "set", "emitter"]).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::MissingRequiredArgument);
        let err = parse(&["route", "set", "emitter", "1:90"]).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::ValueValidation);
        assert_eq!(err.exit_code(), 2);
    }

    #[test]
    fn names_are_checked_before_anything_is_sent() {
        let err = parse(&["instances", "Emitter"]).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::ValueValidation);
        assert!(err.to_string().contains("lowercase"), "{err}");
        assert!(parse(&["deregister", "emitter", "a/b"]).is_err());
        assert!(parse(&["route", "clear", "../x"]).is_err());
    }

    #[test]
    fn globals_go_anywhere() {
        let cli = parse(&["services", "--json", "--directory", "http://10.0.0.1:7700"]).unwrap();
        assert!(cli.global.json);
        assert_eq!(cli.global.directory, "http://10.0.0.1:7700");
        let cli = parse(&["--no-headers", "route", "ls"]).unwrap();
        assert!(cli.global.no_headers);
        assert!(matches!(cli.command, Command::Route(RouteCommand::List)));
    }

    #[test]
    fn register_args() {
        let cli = parse(&[
            "register",
            "emitter",
            "a",
            "--address",
            "10.0.0.1",
            "--port",
            "8080",
            "--tag",
            "x,y",
            "--tag",
            "z",
            "--ttl",
            "1m",
        ])
        .unwrap();
        let Command::Register(r) = cli.command else {
            panic!("not a register");
        };
        assert_eq!(r.tags, ["x", "y", "z"]);
        assert_eq!(r.ttl, Some(60_000));
        assert_eq!((r.version, r.weight), (None, None));
        assert!(parse(&["register", "emitter", "a", "--port", "1"]).is_err());
        assert!(parse(&[
            "register",
            "emitter",
            "a",
            "--address",
            "h",
            "--port",
            "1",
            "--ttl",
            "5"
        ])
        .is_err());
    }

    #[test]
    fn link_specs() {
        assert_eq!(
            link_spec("emitter=emitter-amb:8000").unwrap(),
            LinkSpec {
                alias: "emitter".into(),
                host: "emitter-amb".into(),
                port: 8000,
                proto: "tcp".into()
            }
        );
        let udp = link_spec("dns=[fd00::1]:53/udp").unwrap();
        assert_eq!(
            (udp.host.as_str(), udp.port, udp.proto.as_str()),
            ("fd00::1", 53, "udp")
        );
        assert!(link_spec("emitter").is_err());
        assert!(link_spec("emitter=amb").is_err());
        assert!(link_spec("emitter=amb:0").is_err());
        assert!(link_spec("emitter=amb:8000/sctp").is_err());
        assert!(link_spec("emitter=a b:8000").is_err());
        assert!(link_spec("=amb:8000").is_err());
        assert!(link_spec("x=fd00::1:53").unwrap_err().contains("brackets"));
    }
}
