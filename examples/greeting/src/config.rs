//! The greeting's configuration: `BAKER_LISTEN`, `BAKER_VERSION`, `BAKER_INSTANCE`.

use std::net::SocketAddr;

use baker_client::config::ConfigErrors;
use baker_client::model::validate_name;
use serde::Deserialize;

/// Default listen address.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:8080";

/// The variables as read from the environment, unparsed.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Env {
    pub listen: Option<String>,
    pub version: Option<String>,
    pub instance: Option<String>,
}

/// The greeting's parsed configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Where to listen (`BAKER_LISTEN`, default `0.0.0.0:8080`).
    pub listen: SocketAddr,
    /// The version reported in every greeting (`BAKER_VERSION`, default `1`).
    pub version: String,
    /// The instance name reported in every greeting (`BAKER_INSTANCE`, default the host name).
    pub instance: String,
}

impl Config {
    /// Parses every variable, reporting all bad ones at once. `hostname` is the default instance.
    pub fn from_env(env: &Env, hostname: &str) -> Result<Config, ConfigErrors> {
        let mut errs = ConfigErrors::default();
        let listen = errs
            .parse("BAKER_LISTEN", env.listen.as_deref(), |v| {
                v.parse::<SocketAddr>()
                    .map_err(|_| "must be an address such as 0.0.0.0:8080 or [::]:8080")
            })
            .unwrap_or_else(|| DEFAULT_LISTEN.parse().expect("valid default address"));
        let version = errs
            .parse("BAKER_VERSION", env.version.as_deref(), |v| {
                validate_name("version", v)
                    .map(|()| v.to_owned())
                    .map_err(|e| e.message)
            })
            .unwrap_or_else(|| "1".to_owned());
        let instance = errs
            .parse("BAKER_INSTANCE", env.instance.as_deref(), |v| {
                validate_instance(v).map(|()| v.to_owned())
            })
            .unwrap_or_else(|| hostname.to_owned());
        errs.finish(Config {
            listen,
            version,
            instance,
        })
    }
}

/// An instance name is free text for humans, but short and printable.
fn validate_instance(v: &str) -> Result<(), &'static str> {
    if v.is_empty() {
        Err("must not be empty")
    } else if v.chars().count() > 253 {
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
        let c = Config::from_env(&Env::default(), "box").unwrap();
        assert_eq!(c.listen, "0.0.0.0:8080".parse().unwrap());
        assert_eq!(c.version, "1");
        assert_eq!(c.instance, "box");
    }

    #[test]
    fn explicit_values() {
        let env = Env {
            listen: Some("127.0.0.1:0".into()),
            version: Some("2".into()),
            instance: Some("greeting-a".into()),
        };
        let c = Config::from_env(&env, "box").unwrap();
        assert_eq!(c.listen, "127.0.0.1:0".parse().unwrap());
        assert_eq!(
            (c.version.as_str(), c.instance.as_str()),
            ("2", "greeting-a")
        );
    }

    #[test]
    fn every_bad_variable_is_reported() {
        let env = Env {
            listen: Some("localhost".into()),
            version: Some("V2!".into()),
            instance: Some("a\nb".into()),
        };
        let errs = Config::from_env(&env, "box").unwrap_err();
        let vars: Vec<_> = errs.0.iter().map(|(v, _)| v.as_str()).collect();
        assert_eq!(vars, ["BAKER_LISTEN", "BAKER_VERSION", "BAKER_INSTANCE"]);
    }
}
