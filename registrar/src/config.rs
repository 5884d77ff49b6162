//! The registrar's configuration, from `BAKER_*` variables and Docker-link variables.

use std::time::Duration;

use baker_client::api::DEFAULT_DIRECTORY;
use baker_client::config::ConfigErrors;
use baker_client::model::{
    printable, validate_name, validate_weight, DEFAULT_VERSION, DEFAULT_WEIGHT, MAX_NAME_LEN,
};
use baker_client::DirectoryClient;
use serde::Deserialize;

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

/// The variables as read from the environment, unparsed (`BAKER_CHECK_CODES` is `check_codes`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Env {
    pub directory: Option<String>,
    pub token: Option<String>,
    pub service: Option<String>,
    pub id: Option<String>,
    pub target: Option<String>,
    pub advertise: Option<String>,
    pub check: Option<String>,
    pub check_codes: Option<String>,
    pub check_body: Option<String>,
    pub timeout: Option<String>,
    pub interval: Option<String>,
    pub rise: Option<String>,
    pub fall: Option<String>,
    pub version: Option<String>,
    pub weight: Option<String>,
    pub tags: Option<String>,
}

/// The registrar's parsed configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The directory's URL (`BAKER_DIRECTORY`, default `http://127.0.0.1:7700`).
    pub directory: String,
    /// Sent as `Authorization: Bearer <token>` (`BAKER_TOKEN`).
    pub token: Option<String>,
    /// `BAKER_SERVICE` (required).
    pub service: String,
    /// `BAKER_ID`, default `<hostname>-<advertised port>` made into a valid name.
    pub id: String,
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
    pub version: String,
    pub weight: u16,
    pub tags: Vec<String>,
}

impl Config {
    /// Parses `env`, reporting every bad variable at once. `vars` is the whole environment
    /// (for Docker-link variables); `hostname` makes the default id.
    pub fn from_env<I, K, V>(env: &Env, vars: I, hostname: &str) -> Result<Config, ConfigErrors>
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<str>,
        V: AsRef<str>,
    {
        let mut errs = ConfigErrors::default();

        let directory = errs
            .parse("BAKER_DIRECTORY", opt(&env.directory), |v| {
                DirectoryClient::new(v, None)
                    .map(|c| c.base().to_owned())
                    .map_err(|_| "must be the directory's URL, such as http://directory:7700")
            })
            .unwrap_or_else(|| DEFAULT_DIRECTORY.to_owned());
        let token = opt(&env.token).map(str::to_owned);

        let service = match opt(&env.service) {
            None => {
                errs.push(
                    "BAKER_SERVICE",
                    "is required: the name to register the app under, such as emitter",
                );
                String::new()
            }
            Some(v) => errs
                .parse("BAKER_SERVICE", Some(v), |v| {
                    validate_name("service", v)
                        .map(|()| v.to_owned())
                        .map_err(|e| e.message)
                })
                .unwrap_or_default(),
        };

        let (target, target_from) = match opt(&env.target) {
            Some(v) => (
                errs.parse("BAKER_TARGET", Some(v), str::parse::<Target>),
                "BAKER_TARGET".to_owned(),
            ),
            None => {
                let (dir_host, dir_port) = host_port_of(&directory);
                match pick_link(vars, &dir_host, dir_port) {
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
                        errs.push(
                            "BAKER_TARGET",
                            "is not set and no Docker link variable (such as \
                             APP_PORT_8080_TCP=tcp://172.17.0.5:8080) names the app: set \
                             BAKER_TARGET=http://host:port or run with --link <app>:app",
                        );
                        (None, String::new())
                    }
                }
            }
        };

        let advertise = match (&target, opt(&env.advertise)) {
            (_, Some(v)) => errs.parse("BAKER_ADVERTISE", Some(v), |v| {
                Advertise::parse(v, target.as_ref().map_or(0, |t| t.port)).and_then(|a| {
                    if a.port == 0 {
                        Err("needs a port (host:port) when the target is unknown".into())
                    } else {
                        Ok(a)
                    }
                })
            }),
            (Some(t), None) => Some(Advertise::from_target(t)),
            (None, None) => None,
        };

        // A tcp:// target given explicitly says the app does not speak HTTP; a link variable
        // is always tcp:// and says nothing, so the HTTP default holds there.
        let default_kind = match (&target, env.target.is_some()) {
            (Some(t), true) if t.scheme == Scheme::Tcp => CheckKind::Tcp,
            _ => CheckKind::Http("/health".into()),
        };
        let kind = errs
            .parse("BAKER_CHECK", opt(&env.check), str::parse::<CheckKind>)
            .unwrap_or(default_kind);
        let codes = errs.parse("BAKER_CHECK_CODES", opt(&env.check_codes), parse_codes);
        let body = env.check_body.clone().filter(|b| !b.is_empty());
        let check = match kind {
            CheckKind::Http(path) => Check::Http {
                path,
                codes: codes.unwrap_or_default(),
                body,
            },
            CheckKind::Tcp => {
                for (var, set) in [
                    ("BAKER_CHECK_CODES", env.check_codes.is_some()),
                    ("BAKER_CHECK_BODY", body.is_some()),
                ] {
                    if set {
                        errs.push(var, "applies only to http checks, and BAKER_CHECK is tcp");
                    }
                }
                Check::Tcp
            }
        };

        let timeout = errs.duration("BAKER_TIMEOUT", opt(&env.timeout), DEFAULT_TIMEOUT);
        let interval = errs
            .parse("BAKER_INTERVAL", opt(&env.interval), |v| {
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
        let rise = errs
            .parse("BAKER_RISE", opt(&env.rise), threshold)
            .unwrap_or(DEFAULT_RISE);
        let fall = errs
            .parse("BAKER_FALL", opt(&env.fall), threshold)
            .unwrap_or(DEFAULT_FALL);

        let version = errs
            .parse("BAKER_VERSION", opt(&env.version), |v| {
                validate_name("version", v)
                    .map(|()| v.to_owned())
                    .map_err(|e| e.message)
            })
            .unwrap_or_else(|| DEFAULT_VERSION.to_owned());
        let weight = errs
            .parse("BAKER_WEIGHT", opt(&env.weight), |v| {
                v.parse::<u64>()
                    .ok()
                    .and_then(|w| validate_weight("weight", w).ok())
                    .ok_or("must be a whole number from 1 to 256")
            })
            .unwrap_or(DEFAULT_WEIGHT);
        let tags = errs
            .parse("BAKER_TAGS", env.tags.as_deref(), parse_tags)
            .unwrap_or_default();

        let id = match opt(&env.id) {
            Some(v) => errs
                .parse("BAKER_ID", Some(v), |v| {
                    validate_name("id", v)
                        .map(|()| v.to_owned())
                        .map_err(|e| e.message)
                })
                .unwrap_or_default(),
            None => default_id(hostname, advertise.as_ref().map_or(0, |a| a.port)),
        };

        match (target, advertise) {
            (Some(target), Some(advertise)) => errs.finish(Config {
                directory,
                token,
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
            }),
            _ => Err(errs),
        }
    }

    /// How long the directory keeps the registration without a heartbeat: three intervals.
    pub fn ttl(&self) -> Duration {
        self.interval * 3
    }
}

/// A variable's value, with set-but-empty taken as unset.
fn opt(v: &Option<String>) -> Option<&str> {
    v.as_deref().filter(|s| !s.trim().is_empty())
}

/// `BAKER_TAGS`: a comma-separated list of names.
fn parse_tags(v: &str) -> Result<Vec<String>, String> {
    let tags: Vec<String> = v
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(str::to_owned)
        .collect();
    for t in &tags {
        validate_name("tag", t).map_err(|e| format!("tag {:?} {}", printable(t), e.message))?;
    }
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
pub fn default_id(hostname: &str, port: u16) -> String {
    sanitize(&format!("{hostname}-{port}"))
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

    fn env(pairs: &[(&str, &str)]) -> Env {
        baker_client::config::read_env_pairs(pairs).unwrap()
    }

    fn parse(pairs: &[(&str, &str)]) -> Result<Config, ConfigErrors> {
        Config::from_env(&env(pairs), pairs.iter().copied(), "web-01")
    }

    #[test]
    fn defaults_need_only_service_and_target() {
        let c = parse(&[("SERVICE", "emitter"), ("TARGET", "http://10.0.0.5:8080")]).unwrap();
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
    }

    #[test]
    fn every_setting() {
        let c = parse(&[
            ("DIRECTORY", "http://directory:7700/"),
            ("TOKEN", "s3cret"),
            ("SERVICE", "emitter"),
            ("ID", "vm101"),
            ("TARGET", "http://app:8080"),
            ("ADVERTISE", "192.168.0.10:18080"),
            ("CHECK", "http:/ready"),
            ("CHECK_CODES", "200,204"),
            ("CHECK_BODY", "\"ok\""),
            ("TIMEOUT", "300ms"),
            ("INTERVAL", "500ms"),
            ("RISE", "3"),
            ("FALL", "1"),
            ("VERSION", "2"),
            ("WEIGHT", "50"),
            ("TAGS", "canary, eu-west"),
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
        assert_eq!(c.ttl(), Duration::from_millis(1500));
    }

    #[test]
    fn a_tcp_target_defaults_to_a_tcp_check() {
        let c = parse(&[("SERVICE", "db"), ("TARGET", "tcp://10.0.0.7:5432")]).unwrap();
        assert_eq!(c.check, Check::Tcp);
        let c = parse(&[
            ("SERVICE", "db"),
            ("TARGET", "tcp://10.0.0.7:5432"),
            ("CHECK", "http:/health"),
        ])
        .unwrap();
        assert!(matches!(c.check, Check::Http { .. }));
    }

    #[test]
    fn target_from_link_variables() {
        let c = parse(&[
            ("SERVICE", "emitter"),
            ("DIRECTORY", "http://directory:7700"),
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
            ("SERVICE", "emitter"),
            ("TARGET", "http://127.0.0.1:9000"),
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
            ("DIRECTORY", "directory:7700"),
            ("SERVICE", "Emitter"),
            ("ID", "vm 101"),
            ("TARGET", "http://app"),
            ("ADVERTISE", "a;b:1"),
            ("CHECK", "health"),
            ("CHECK_CODES", "2xx"),
            ("TIMEOUT", "1"),
            ("INTERVAL", "10ms"),
            ("RISE", "0"),
            ("FALL", "many"),
            ("VERSION", "V2"),
            ("WEIGHT", "300"),
            ("TAGS", "ok,Not Ok"),
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
                "BAKER_ID",
            ]
        );
    }

    #[test]
    fn codes_and_body_need_an_http_check() {
        let errs = parse(&[
            ("SERVICE", "db"),
            ("TARGET", "tcp://10.0.0.7:5432"),
            ("CHECK_CODES", "200"),
            ("CHECK_BODY", "ok"),
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
            assert!(validate_name("id", &id).is_ok(), "{raw:?} gave {id:?}");
        }
        assert_eq!(default_id("3f2a9c0d1e7b", 8080), "3f2a9c0d1e7b-8080");
        assert_eq!(default_id("", 8080), "8080");
    }
}
