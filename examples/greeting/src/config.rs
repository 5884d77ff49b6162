//! The greeting's configuration: `BAKER_LISTEN`, `BAKER_VERSION`, `BAKER_INSTANCE`,
//! `BAKER_STOP_DELAY`.

use std::net::SocketAddr;
use std::time::Duration;

use baker_client::config::vars::{self, ENV_INSTANCE, ENV_LISTEN, ENV_STOP_DELAY, ENV_VERSION};
use baker_client::config::{ConfigErrors, Environment, Reader};
use baker_client::model::Version;

/// Default listen address.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:8080";

/// The greeting's parsed configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Where to listen (`BAKER_LISTEN`, default `0.0.0.0:8080`).
    pub listen: SocketAddr,
    /// The version reported in every greeting (`BAKER_VERSION`, default `1`).
    pub version: Version,
    /// The instance name reported in every greeting (`BAKER_INSTANCE`, default the host name).
    pub instance: String,
    /// How long it keeps answering after it is asked to stop, before it stops accepting
    /// (`BAKER_STOP_DELAY`, default 0): time for discovery to take it out of rotation first,
    /// as swarm sends SIGTERM without waiting for anyone.
    pub stop_delay: Duration,
}

impl Config {
    /// Parses every variable, reporting all bad ones at once. `hostname` is the default instance.
    pub fn from_env(env: &Environment, hostname: &str) -> Result<Config, ConfigErrors> {
        let mut r = Reader::new(&vars::GREETING, env);
        let listen = r
            .parse(ENV_LISTEN, |v| {
                v.parse::<SocketAddr>()
                    .map_err(|_| "must be an address such as 0.0.0.0:8080 or [::]:8080")
            })
            .unwrap_or_else(|| DEFAULT_LISTEN.parse().expect("valid default address"));
        let version = r
            .parse(ENV_VERSION, |v| v.parse::<Version>().map_err(|e| e.message))
            .unwrap_or_default();
        let instance = r
            .parse(ENV_INSTANCE, |v| {
                validate_instance(v).map(|()| v.to_owned())
            })
            .unwrap_or_else(|| hostname.to_owned());
        let stop_delay = r.duration(ENV_STOP_DELAY, Duration::ZERO);
        r.finish(Config {
            listen,
            version,
            instance,
            stop_delay,
        })
    }
}

/// An instance name is free text for humans, but short and printable.
fn validate_instance(v: &str) -> Result<(), &'static str> {
    if v.chars().count() > 253 {
        Err("must be at most 253 characters")
    } else if v.chars().any(char::is_control) {
        Err("must not contain control characters")
    } else {
        Ok(())
    }
}

/// This machine's host name, or `greeting` when it cannot be read.
pub fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "greeting".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults() {
        let c = Config::from_env(&Environment::default(), "box").unwrap();
        assert_eq!(c.listen, "0.0.0.0:8080".parse().unwrap());
        assert_eq!(c.version, "1");
        assert_eq!(c.instance, "box");
        let empty = Environment::from_pairs(&[("BAKER_VERSION", ""), ("BAKER_INSTANCE", " ")]);
        assert_eq!(Config::from_env(&empty, "box").unwrap(), c);
    }

    #[test]
    fn explicit_values() {
        let env = Environment::from_pairs(&[
            ("BAKER_LISTEN", "127.0.0.1:0"),
            ("BAKER_VERSION", "2"),
            ("BAKER_INSTANCE", "greeting-a"),
        ]);
        let c = Config::from_env(&env, "box").unwrap();
        assert_eq!(c.listen, "127.0.0.1:0".parse().unwrap());
        assert_eq!(
            (c.version.as_str(), c.instance.as_str()),
            ("2", "greeting-a")
        );
    }

    #[test]
    fn every_bad_variable_is_reported() {
        let env = Environment::from_pairs(&[
            ("BAKER_LISTEN", "localhost"),
            ("BAKER_VERSION", "V2!"),
            ("BAKER_INSTANCE", "a\nb"),
            ("BAKER_VERSOIN", "2"),
        ]);
        let errs = Config::from_env(&env, "box").unwrap_err();
        let vars: Vec<_> = errs.0.iter().map(|(v, _)| v.as_str()).collect();
        assert_eq!(
            vars,
            [
                "BAKER_LISTEN",
                "BAKER_VERSION",
                "BAKER_INSTANCE",
                "BAKER_VERSOIN"
            ]
        );
    }

    #[test]
    fn help_shows_the_defaults_in_use() {
        assert_eq!(vars::GREETING.default_of(ENV_LISTEN), Some(DEFAULT_LISTEN));
    }

    #[test]
    fn reads_exactly_the_listed_variables() {
        let errs = Config::from_env(&Environment::unreadable(&vars::GREETING), "h").unwrap_err();
        let mut listed: Vec<&str> = vars::GREETING.vars.iter().map(|v| v.name).collect();
        listed.sort_unstable();
        assert_eq!(Environment::reported(&errs), listed);
    }
}
