//! The registrar's configuration, from `BAKER_*` variables and Docker-link variables.

use std::path::PathBuf;
use std::time::Duration;

use baker_client::api::{parse_token, DEFAULT_DIRECTORY};
use baker_client::config::vars::{
    self, ENV_ADVERTISE, ENV_CA, ENV_CHECK, ENV_CHECK_BODY, ENV_CHECK_CODES, ENV_DIRECTORY,
    ENV_FALL, ENV_ID, ENV_INTERVAL, ENV_RISE, ENV_SERVICE, ENV_TAGS, ENV_TARGET, ENV_TIMEOUT,
    ENV_TOKEN, ENV_VERSION, ENV_WEIGHT, ENV_ZONE,
};
use baker_client::config::{ConfigErrors, Environment, Reader};
use baker_client::model::{
    generated_id_hint, is_generated_hostname, printable, validate_weight, InstanceId, ServiceName,
    Tag, ValidationError, Version, Zone, DEFAULT_WEIGHT, MAX_NAME_LEN,
};
use baker_client::DirectoryClient;

use crate::probe::{parse_codes, Check, CheckKind};
use crate::target::{pick_link, Advertise, Scheme, Target};

pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(2);
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1);
pub const DEFAULT_RISE: u32 = 2;
pub const DEFAULT_FALL: u32 = 2;
/// Shortest probe interval: the registration's TTL (3 intervals) must stay above the
/// directory's minimum of 100 ms.
pub const MIN_INTERVAL: Duration = Duration::from_millis(50);
pub const MAX_INTERVAL: Duration = Duration::from_secs(3600);
pub const MAX_THRESHOLD: u32 = 100;
pub const MAX_TAGS: usize = 32;

/// The registrar's parsed configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The directory's URL (`BAKER_DIRECTORY`, default `http://127.0.0.1:7700`).
    pub directory: String,
    /// Sent as `Authorization: Bearer <token>` (`BAKER_TOKEN`).
    pub token: Option<String>,
    /// `BAKER_CA`: the CA bundle trusted for an `https://` directory (default: the system's
    /// roots).
    pub ca: Option<PathBuf>,
    /// `BAKER_SERVICE` (required).
    pub service: ServiceName,
    /// `BAKER_ID`, default `<hostname>-<advertised port>` made into a valid name.
    pub id: InstanceId,
    /// The app to probe (`BAKER_TARGET`, default from Docker-link variables).
    pub target: Target,
    /// Where the target came from, for the start-up log line.
    pub target_from: String,
    /// What to register as the address others dial (`BAKER_ADVERTISE`, default the target's).
    pub advertise: Advertise,
    pub check: Check,
    /// Longest a probe may take before it counts as failed (`BAKER_TIMEOUT`, default 1s).
    pub timeout: Duration,
    /// Time between probes and between heartbeats (`BAKER_INTERVAL`, default 2s).
    pub interval: Duration,
    pub rise: u32,
    pub fall: u32,
    pub version: Version,
    pub weight: u16,
    pub tags: Vec<Tag>,
    /// The zone registered with the instance (`BAKER_ZONE`): one per registrar, shared by
    /// every service it announces.
    pub zone: Option<Zone>,
    /// Said at start when the id was made from a hostname Docker generated.
    pub id_hint: Option<String>,
}

impl Config {
    /// Parses `env`, reporting every bad variable at once: its `BAKER_*` variables, and its
    /// Docker-link variables when `BAKER_TARGET` is unset. `hostname` makes the default id.
    pub fn from_env(env: &Environment, hostname: &str) -> Result<Config, ConfigErrors> {
        let mut r = Reader::new(&vars::REGISTRAR, env);
        let (directory, token, ca) = directory_and_token(&mut r);

        let service = r.required(
            ENV_SERVICE,
            "the name to register the app under, such as emitter",
            |v| v.parse::<ServiceName>().map_err(|e| e.message),
        );

        let target_set = r.is_set(ENV_TARGET);
        let (target, target_from) = if target_set {
            (
                r.parse(ENV_TARGET, str::parse::<Target>),
                ENV_TARGET.to_owned(),
            )
        } else {
            let first = directory.split(',').next().unwrap_or_default();
            let (dir_host, dir_port) = host_port_of(first);
            match pick_link(env.others(), &dir_host, dir_port) {
                Some((link, n)) => {
                    let mut from = format!(
                        "link variable {}_PORT_{}_TCP",
                        link.alias, link.exposed_port
                    );
                    if n > 1 {
                        from.push_str(&format!(
                            " (first of {n} links; set BAKER_TARGET to choose)"
                        ));
                    }
                    (Some(Target::from_link(&link)), from)
                }
                None => {
                    r.push(
                        ENV_TARGET,
                        "is not set and no Docker link variable (such as \
                         APP_PORT_8080_TCP=tcp://172.17.0.5:8080) names the app: set \
                         BAKER_TARGET=http://host:port or run with --link <app>:app",
                    );
                    (None, String::new())
                }
            }
        };

        let advertise = if r.is_set(ENV_ADVERTISE) {
            r.parse(ENV_ADVERTISE, |v| {
                Advertise::parse(v, target.as_ref().map_or(0, |t| t.port)).and_then(|a| {
                    if a.port == 0 {
                        Err("needs a port (host:port) when the target is unknown".into())
                    } else {
                        Ok(a)
                    }
                })
            })
        } else {
            target.as_ref().map(Advertise::from_target)
        };

        // A tcp:// target given explicitly says the app does not speak HTTP; a link variable
        // is always tcp:// and says nothing, so the HTTP default holds there.
        let default_kind = match (&target, target_set) {
            (Some(t), true) if t.scheme == Scheme::Tcp => CheckKind::Tcp,
            _ => CheckKind::Http("/health".into()),
        };
        let kind = r
            .parse(ENV_CHECK, str::parse::<CheckKind>)
            .unwrap_or(default_kind);
        let codes_set = r.is_set(ENV_CHECK_CODES);
        let codes = r.parse(ENV_CHECK_CODES, parse_codes);
        let body = r.get(ENV_CHECK_BODY).map(str::to_owned);
        let check = match kind {
            CheckKind::Http(path) => Check::Http {
                path,
                codes: codes.unwrap_or_default(),
                body,
            },
            CheckKind::Tcp => {
                for (var, set) in [
                    (ENV_CHECK_CODES, codes_set),
                    (ENV_CHECK_BODY, body.is_some()),
                ] {
                    if set {
                        r.push(var, "applies only to http checks, and BAKER_CHECK is tcp");
                    }
                }
                Check::Tcp
            }
        };

        let timeout = r.duration(ENV_TIMEOUT, DEFAULT_TIMEOUT);
        let interval = r
            .parse(ENV_INTERVAL, |v| {
                let d = baker_client::config::parse_duration(v)?;
                if (MIN_INTERVAL..=MAX_INTERVAL).contains(&d) {
                    Ok(d)
                } else {
                    Err(format!(
                        "must be between {MIN_INTERVAL:?} and {MAX_INTERVAL:?}"
                    ))
                }
            })
            .unwrap_or(DEFAULT_INTERVAL);
        let threshold = |v: &str| match v.parse::<u32>() {
            Ok(n) if (1..=MAX_THRESHOLD).contains(&n) => Ok(n),
            _ => Err(format!("must be a whole number from 1 to {MAX_THRESHOLD}")),
        };
        let rise = r.parse(ENV_RISE, threshold).unwrap_or(DEFAULT_RISE);
        let fall = r.parse(ENV_FALL, threshold).unwrap_or(DEFAULT_FALL);

        let version = r
            .parse(ENV_VERSION, |v| v.parse::<Version>().map_err(|e| e.message))
            .unwrap_or_default();
        let weight = r
            .parse(ENV_WEIGHT, |v| {
                v.parse::<u64>()
                    .ok()
                    .and_then(|w| validate_weight("weight", w).ok())
                    .ok_or("must be a whole number from 1 to 256")
            })
            .unwrap_or(DEFAULT_WEIGHT);
        let tags = r.parse(ENV_TAGS, parse_tags).unwrap_or_default();
        let zone = parse_zone(&mut r);

        let id = if r.is_set(ENV_ID) {
            r.parse(ENV_ID, |v| v.parse::<InstanceId>().map_err(|e| e.message))
        } else {
            Some(default_id(
                hostname,
                advertise.as_ref().map_or(0, |a| a.port),
            ))
        };
        let id_hint = match &id {
            Some(id) if !r.is_set(ENV_ID) && is_generated_hostname(hostname) => {
                Some(generated_id_hint(id, hostname))
            }
            _ => None,
        };

        match (service, id, target, advertise) {
            (Some(service), Some(id), Some(target), Some(advertise)) => r.finish(Config {
                directory,
                token,
                ca,
                service,
                id,
                target,
                target_from,
                advertise,
                check,
                timeout,
                interval,
                rise,
                fall,
                version,
                weight,
                tags,
                zone,
                id_hint,
            }),
            // The reason there is no service, id, target or address to advertise is recorded
            // already.
            _ => Err(r.into_errors()),
        }
    }

    /// How long the directory keeps the registration without a heartbeat: three intervals.
    pub fn ttl(&self) -> Duration {
        self.interval * 3
    }
}

/// `BAKER_DIRECTORY`, `BAKER_TOKEN` and `BAKER_CA`, which every service of one registrar
/// shares.
pub fn directory_and_token(r: &mut Reader<'_>) -> (String, Option<String>, Option<PathBuf>) {
    let directory = r
        .parse(ENV_DIRECTORY, |v| {
            DirectoryClient::new(v, None)
                .map(|c| c.list())
                .map_err(|e| match e {
                    baker_client::ClientError::BadList(_) => e.to_string(),
                    _ => "must be the directory's URL, such as http://directory:7700 or \
                          https://directory:7700, or a \
                          comma-separated list of its replicas"
                        .to_owned(),
                })
        })
        .unwrap_or_else(|| DEFAULT_DIRECTORY.to_owned());
    let token = r.parse_secret(ENV_TOKEN, parse_token);
    let ca = r.parse(ENV_CA, baker_client::tls::parse_bundle_path);
    (directory, token, ca)
}

/// `BAKER_ZONE`, which every service of one registrar shares.
pub fn parse_zone(r: &mut Reader<'_>) -> Option<Zone> {
    r.parse(ENV_ZONE, |v| v.parse::<Zone>().map_err(|e| e.message))
}

/// `BAKER_TAGS`: a comma-separated list of names.
fn parse_tags(v: &str) -> Result<Vec<Tag>, String> {
    let tags: Vec<Tag> = v
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(|t| {
            t.parse()
                .map_err(|e: ValidationError| format!("tag {:?} {}", printable(t), e.message))
        })
        .collect::<Result<_, _>>()?;
    if tags.len() > MAX_TAGS {
        return Err(format!(
            "at most {MAX_TAGS} tags are allowed, got {}",
            tags.len()
        ));
    }
    Ok(tags)
}

/// The host and port of the directory's URL (already checked to be an http:// URL).
fn host_port_of(url: &str) -> (String, u16) {
    match reqwest::Url::parse(url) {
        Ok(u) => (
            u.host_str()
                .unwrap_or_default()
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned(),
            u.port_or_known_default().unwrap_or(80),
        ),
        Err(_) => (String::new(), 0),
    }
}

/// `<hostname>-<port>`, made into a valid instance id: stable across restarts of the same
/// container, so a restarted registrar replaces its registration rather than adding one.
pub fn default_id(hostname: &str, port: u16) -> InstanceId {
    sanitize(&format!("{hostname}-{port}"))
        .parse()
        .expect("sanitize always makes a valid name")
}

/// Makes any text into a name matching `^[a-z0-9][a-z0-9._-]{0,62}$`: lower case, every other
/// character turned into `-`, runs of `-` squeezed, leading punctuation dropped, at most 63
/// characters with no trailing punctuation.
pub fn sanitize(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    for c in raw.chars() {
        let c = c.to_ascii_lowercase();
        let c = if c.is_ascii_lowercase() || c.is_ascii_digit() || c == '.' || c == '_' {
            c
        } else {
            '-'
        };
        if c == '-' && (out.is_empty() || out.ends_with('-')) {
            continue;
        }
        out.push(c);
    }
    let trimmed = out.trim_start_matches(['-', '.', '_']);
    let mut name: String = trimmed.chars().take(MAX_NAME_LEN).collect();
    while name.ends_with(['-', '.', '_']) {
        name.pop();
    }
    if name.is_empty() {
        "instance".to_owned()
    } else {
        name
    }
}

/// This machine's host name (in a container: the container's), or empty when unreadable.
pub fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(pairs: &[(&str, &str)]) -> Result<Config, ConfigErrors> {
        Config::from_env(&Environment::from_pairs(pairs), "web-01")
    }

    #[test]
    fn help_shows_the_defaults_in_use() {
        let shown = |name| vars::REGISTRAR.default_of(name).map(str::to_owned);
        let d = |d: Duration| Some(format!("{}s", d.as_secs()));
        assert_eq!(shown(ENV_DIRECTORY), Some(DEFAULT_DIRECTORY.to_owned()));
        assert_eq!(shown(ENV_TIMEOUT), d(DEFAULT_TIMEOUT));
        assert_eq!(shown(ENV_INTERVAL), d(DEFAULT_INTERVAL));
        assert_eq!(shown(ENV_RISE), Some(DEFAULT_RISE.to_string()));
        assert_eq!(shown(ENV_FALL), Some(DEFAULT_FALL.to_string()));
        assert_eq!(
            shown(ENV_VERSION),
            Some(baker_client::model::DEFAULT_VERSION.to_string())
        );
        assert_eq!(shown(ENV_WEIGHT), Some(DEFAULT_WEIGHT.to_string()));
    }

    #[test]
    fn reads_exactly_the_listed_variables() {
        let env = Environment::unreadable(&vars::REGISTRAR);
        let errs = crate::services::from_env(&env, "h", |_| panic!("unread")).unwrap_err();
        let mut listed: Vec<&str> = vars::REGISTRAR.vars.iter().map(|v| v.name).collect();
        listed.sort_unstable();
        assert_eq!(Environment::reported(&errs), listed);
    }

    #[test]
    fn a_misspelt_variable_is_reported_with_the_right_name() {
        let errs = parse(&[
            ("BAKER_SERVICE", "emitter"),
            ("BAKER_TARGET", "http://10.0.0.5:8080"),
            ("BAKER_VERISON", "2"),
            ("BAKER_ROUTES", "emitter=8000"),
        ])
        .unwrap_err();
        assert_eq!(
            errs.to_string(),
            "invalid configuration (1 problem):\n  BAKER_VERISON: is not a variable of \
             baker-registrar; did you mean BAKER_VERSION?"
        );
    }

    #[test]
    fn a_token_that_cannot_be_sent_is_refused() {
        let errs = parse(&[
            ("BAKER_SERVICE", "emitter"),
            ("BAKER_TARGET", "http://10.0.0.5:8080"),
            ("BAKER_TOKEN", "s3\u{7}cret"),
        ])
        .unwrap_err();
        assert_eq!(errs.0.len(), 1, "{errs}");
        assert_eq!(errs.0[0].0, "BAKER_TOKEN");
        assert!(errs.0[0].1.contains("printable ASCII"), "{errs}");
    }

    #[test]
    fn defaults_need_only_service_and_target() {
        let c = parse(&[
            ("BAKER_SERVICE", "emitter"),
            ("BAKER_TARGET", "http://10.0.0.5:8080"),
        ])
        .unwrap();
        assert_eq!(c.directory, "http://127.0.0.1:7700");
        assert_eq!(c.id, "web-01-8080");
        assert_eq!(c.advertise.authority(), "10.0.0.5:8080");
        assert_eq!(
            c.check,
            Check::Http {
                path: "/health".into(),
                codes: vec![],
                body: None
            }
        );
        assert_eq!(
            (c.interval, c.timeout, c.rise, c.fall),
            (Duration::from_secs(2), Duration::from_secs(1), 2, 2)
        );
        assert_eq!((c.version.as_str(), c.weight, c.tags.len()), ("1", 100, 0));
        assert_eq!(c.ttl(), Duration::from_secs(6));
        assert_eq!(c.token, None);
        assert_eq!(c.zone, None);
    }

    #[test]
    fn a_bad_zone_is_refused_with_its_variable() {
        let errs = parse(&[
            ("BAKER_SERVICE", "emitter"),
            ("BAKER_TARGET", "http://10.0.0.5:8080"),
            ("BAKER_ZONE", "eu west"),
        ])
        .unwrap_err();
        assert_eq!(errs.0.len(), 1, "{errs}");
        assert_eq!(errs.0[0].0, "BAKER_ZONE");
        assert!(errs.to_string().contains("BAKER_ZONE: "), "{errs}");
    }

    #[test]
    fn every_setting() {
        let c = parse(&[
            ("BAKER_DIRECTORY", "http://directory:7700/"),
            ("BAKER_TOKEN", "s3cret"),
            ("BAKER_SERVICE", "emitter"),
            ("BAKER_ID", "vm101"),
            ("BAKER_TARGET", "http://app:8080"),
            ("BAKER_ADVERTISE", "192.168.0.10:18080"),
            ("BAKER_CHECK", "http:/ready"),
            ("BAKER_CHECK_CODES", "200,204"),
            ("BAKER_CHECK_BODY", "\"ok\""),
            ("BAKER_TIMEOUT", "300ms"),
            ("BAKER_INTERVAL", "500ms"),
            ("BAKER_RISE", "3"),
            ("BAKER_FALL", "1"),
            ("BAKER_VERSION", "2"),
            ("BAKER_WEIGHT", "50"),
            ("BAKER_TAGS", "canary, eu-west"),
            ("BAKER_ZONE", "eu-west-1a"),
        ])
        .unwrap();
        assert_eq!(c.directory, "http://directory:7700");
        assert_eq!(c.token.as_deref(), Some("s3cret"));
        assert_eq!((c.service.as_str(), c.id.as_str()), ("emitter", "vm101"));
        assert_eq!(c.target.to_string(), "http://app:8080");
        assert_eq!(
            (c.advertise.authority(), c.advertise.resolve),
            ("192.168.0.10:18080".into(), false)
        );
        assert_eq!(
            c.check,
            Check::Http {
                path: "/ready".into(),
                codes: vec![200, 204],
                body: Some("\"ok\"".into())
            }
        );
        assert_eq!(
            (c.timeout, c.interval),
            (Duration::from_millis(300), Duration::from_millis(500))
        );
        assert_eq!((c.rise, c.fall, c.weight), (3, 1, 50));
        assert_eq!(c.tags, ["canary", "eu-west"]);
        assert_eq!(c.zone.as_ref().map(Zone::as_str), Some("eu-west-1a"));
        assert_eq!(c.ttl(), Duration::from_millis(1500));
    }

    #[test]
    fn a_tcp_target_defaults_to_a_tcp_check() {
        let c = parse(&[
            ("BAKER_SERVICE", "db"),
            ("BAKER_TARGET", "tcp://10.0.0.7:5432"),
        ])
        .unwrap();
        assert_eq!(c.check, Check::Tcp);
        let c = parse(&[
            ("BAKER_SERVICE", "db"),
            ("BAKER_TARGET", "tcp://10.0.0.7:5432"),
            ("BAKER_CHECK", "http:/health"),
        ])
        .unwrap();
        assert!(matches!(c.check, Check::Http { .. }));
    }

    #[test]
    fn target_from_link_variables() {
        let c = parse(&[
            ("BAKER_SERVICE", "emitter"),
            ("BAKER_DIRECTORY", "http://directory:7700"),
            ("DIRECTORY_PORT_7700_TCP", "tcp://172.17.0.2:7700"),
            ("APP_PORT_8080_TCP", "tcp://172.17.0.5:8080"),
            ("APP_PORT_8080_TCP_ADDR", "172.17.0.5"),
        ])
        .unwrap();
        assert_eq!(c.target.authority(), "172.17.0.5:8080");
        assert_eq!(c.advertise.authority(), "172.17.0.5:8080");
        assert!(
            c.target_from.contains("APP_PORT_8080_TCP"),
            "{}",
            c.target_from
        );
        assert!(matches!(c.check, Check::Http { ref path, .. } if path == "/health"));
        assert_eq!(c.id, "web-01-8080");

        // BAKER_TARGET wins over links.
        let c = parse(&[
            ("BAKER_SERVICE", "emitter"),
            ("BAKER_TARGET", "http://127.0.0.1:9000"),
            ("APP_PORT_8080_TCP", "tcp://172.17.0.5:8080"),
        ])
        .unwrap();
        assert_eq!(c.target.port, 9000);
    }

    #[test]
    fn missing_target_and_service_are_explained() {
        let errs = parse(&[("PATH", "/bin")]).unwrap_err();
        let vars: Vec<_> = errs.0.iter().map(|(v, _)| v.as_str()).collect();
        assert_eq!(vars, ["BAKER_SERVICE", "BAKER_TARGET"]);
        assert!(errs.to_string().contains("--link"), "{errs}");
    }

    #[test]
    fn every_bad_variable_is_reported_at_once() {
        let errs = parse(&[
            ("BAKER_DIRECTORY", "directory:7700"),
            ("BAKER_SERVICE", "Emitter"),
            ("BAKER_ID", "vm 101"),
            ("BAKER_TARGET", "http://app"),
            ("BAKER_ADVERTISE", "a;b:1"),
            ("BAKER_CHECK", "health"),
            ("BAKER_CHECK_CODES", "2xx"),
            ("BAKER_TIMEOUT", "1"),
            ("BAKER_INTERVAL", "10ms"),
            ("BAKER_RISE", "0"),
            ("BAKER_FALL", "many"),
            ("BAKER_VERSION", "V2"),
            ("BAKER_WEIGHT", "300"),
            ("BAKER_TAGS", "ok,Not Ok"),
            ("BAKER_ZONE", "EU West"),
        ])
        .unwrap_err();
        let vars: Vec<_> = errs.0.iter().map(|(v, _)| v.as_str()).collect();
        assert_eq!(
            vars,
            [
                "BAKER_DIRECTORY",
                "BAKER_SERVICE",
                "BAKER_TARGET",
                "BAKER_ADVERTISE",
                "BAKER_CHECK",
                "BAKER_CHECK_CODES",
                "BAKER_TIMEOUT",
                "BAKER_INTERVAL",
                "BAKER_RISE",
                "BAKER_FALL",
                "BAKER_VERSION",
                "BAKER_WEIGHT",
                "BAKER_TAGS",
                "BAKER_ZONE",
                "BAKER_ID",
            ]
        );
    }

    #[test]
    fn codes_and_body_need_an_http_check() {
        let errs = parse(&[
            ("BAKER_SERVICE", "db"),
            ("BAKER_TARGET", "tcp://10.0.0.7:5432"),
            ("BAKER_CHECK_CODES", "200"),
            ("BAKER_CHECK_BODY", "ok"),
        ])
        .unwrap_err();
        let vars: Vec<_> = errs.0.iter().map(|(v, _)| v.as_str()).collect();
        assert_eq!(vars, ["BAKER_CHECK_CODES", "BAKER_CHECK_BODY"]);
    }

    #[test]
    fn sanitizes_ids() {
        assert_eq!(sanitize("web-01-8080"), "web-01-8080");
        assert_eq!(sanitize("Web_01.Example.COM-80"), "web_01.example.com-80");
        assert_eq!(sanitize("--My Host!!-80"), "my-host-80");
        assert_eq!(sanitize("_.host-1"), "host-1");
        assert_eq!(sanitize("ünïcode-1"), "n-code-1");
        assert_eq!(sanitize(""), "instance");
        assert_eq!(sanitize("!!!"), "instance");
        let long = sanitize(&format!("{}-.-8080", "a".repeat(62)));
        assert_eq!(long, "a".repeat(62));
        for raw in [
            "",
            "-80",
            "3f2a9c0d1e7b-8080",
            "A B C",
            &"x.".repeat(80),
            "é-é",
        ] {
            let id = sanitize(raw);
            assert!(id.parse::<InstanceId>().is_ok(), "{raw:?} gave {id:?}");
        }
        assert_eq!(default_id("3f2a9c0d1e7b", 8080), "3f2a9c0d1e7b-8080");
        assert_eq!(default_id("", 8080), "8080");
    }

    #[test]
    fn an_id_made_from_a_generated_hostname_says_how_to_name_it() {
        let env = [
            ("BAKER_SERVICE", "emitter"),
            ("BAKER_TARGET", "http://10.0.0.5:8080"),
        ];
        let generated = |hostname, pairs: &[(&str, &str)]| {
            Config::from_env(&Environment::from_pairs(pairs), hostname).expect("valid")
        };
        let c = generated("1e9ff11b9c67", &env);
        assert_eq!(c.id, "1e9ff11b9c67-8080");
        assert_eq!(
            c.id_hint.as_deref(),
            Some(
                "the id 1e9ff11b9c67-8080 is made from the container's generated hostname \
                 1e9ff11b9c67: set BAKER_ID (or run the container with --hostname NAME) to give \
                 it a name people can read"
            )
        );
        let named = [env.as_slice(), &[("BAKER_ID", "emitter-1")]].concat();
        assert_eq!(generated("1e9ff11b9c67", &named).id_hint, None);
        assert_eq!(generated("registrar-1", &env).id_hint, None);
        assert_eq!(generated("1E9FF11B9C67", &env).id_hint, None);
    }
}
