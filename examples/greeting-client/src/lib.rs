//! A client of the Greeting example service, written the way Baker means applications to be:
//! it knows nothing of Baker's directory, it only reads the Docker-link variable
//! `GREETING_PORT_8000_TCP=tcp://<ambassador>:8000` (through [`baker_client::links`]) and calls
//! `GET /greeting` there, over and over, printing which instance answered.
//!
//! - [`Config`]: `BAKER_LINK`, `BAKER_LINK_PORT`, `BAKER_PATH`, `BAKER_INTERVAL`, `BAKER_COUNT`.
//! - [`run`]: the request loop, until `BAKER_COUNT` answers or shutdown.

use baker_client::errors::chain;
use std::time::Duration;

use baker_client::config::vars::{
    self, ENV_COUNT, ENV_INTERVAL, ENV_LINK, ENV_LINK_PORT, ENV_PATH,
};
use baker_client::config::{ConfigErrors, Environment, Reader};
use baker_client::links::{self, Link};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

/// What the client does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The link alias whose variables lead to the service (`greeting`).
    pub link: String,
    /// The exposed port of the link (`8000` in `GREETING_PORT_8000_TCP`).
    pub link_port: u16,
    /// The path to GET.
    pub path: String,
    /// Pause between two requests.
    pub interval: Duration,
    /// Stop after this many answers (successful or not); 0 = never.
    pub count: u64,
}

impl Config {
    /// Parses every variable, reporting all bad ones at once.
    pub fn from_env(env: &Environment) -> Result<Config, ConfigErrors> {
        let mut r = Reader::new(&vars::GREETING_CLIENT, env);
        let link = r
            .parse(ENV_LINK, |v| {
                match links::render(v, "localhost", 1, "tcp") {
                    Ok(_) => Ok(v.to_owned()),
                    Err(_) => Err("must be a link alias (letters, digits, '-', '_')"),
                }
            })
            .unwrap_or_else(|| "greeting".into());
        let link_port = r.parse(ENV_LINK_PORT, |s| {
            s.parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or("must be a port between 1 and 65535")
        });
        let path = r
            .parse(ENV_PATH, |v| {
                if v.starts_with('/') && !v.contains(char::is_whitespace) {
                    Ok(v.to_owned())
                } else {
                    Err("must start with '/' and contain no whitespace")
                }
            })
            .unwrap_or_else(|| "/greeting".into());
        let interval = r.duration(ENV_INTERVAL, Duration::from_secs(1));
        let count = r.value(ENV_COUNT, 0u64);
        r.finish(Config {
            link,
            link_port: link_port.unwrap_or(8000),
            path,
            interval,
            count,
        })
    }

    /// The variable this configuration reads, e.g. `GREETING_PORT_8000_TCP`.
    pub fn variable(&self) -> String {
        format!(
            "{}_PORT_{}_TCP",
            links::env_prefix(&self.link),
            self.link_port
        )
    }
}

/// One answer of `GET /greeting`.
#[derive(Debug, Clone, Deserialize)]
pub struct Greeting {
    pub id: u64,
    pub content: String,
    #[serde(default)]
    pub version: Option<String>,
    #[serde(default)]
    pub instance: Option<String>,
}

/// Finds the link in `vars`, or explains how to provide it.
pub fn find_link<I, K, V>(config: &Config, vars: I) -> Result<Link, String>
where
    I: IntoIterator<Item = (K, V)>,
    K: AsRef<str>,
    V: AsRef<str>,
{
    links::find(vars, &config.link, config.link_port).ok_or_else(|| {
        format!(
            "{var} is not set: start this container with `--link <ambassador>:{alias}` on the \
             default bridge, or set the variables yourself (`baker links \
             {alias}=<ambassador>:{port}` prints them)",
            var = config.variable(),
            alias = config.link,
            port = config.link_port,
        )
    })
}

/// How a run ended.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Summary {
    pub ok: u64,
    pub failed: u64,
}

/// Calls `GET http://<link><path>` every `interval` until `count` answers or `shutdown`,
/// printing one line per answer on stdout.
pub async fn run(config: Config, link: Link, shutdown: CancellationToken) -> Summary {
    let url = format!("http://{}{}", link.authority(), config.path);
    tracing::info!(%url, variable = %config.variable(), "calling the greeting service");
    let http = baker_client::tls::builder(None)
        .expect("the system's roots need no file")
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap_or_default();
    let mut summary = Summary::default();
    let mut next = tokio::time::Instant::now();
    while config.count == 0 || summary.ok + summary.failed < config.count {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep_until(next) => {}
        }
        next += config.interval;
        let answer = tokio::select! {
            _ = shutdown.cancelled() => break,
            a = call(&http, &url) => a,
        };
        match answer {
            Ok(g) => {
                summary.ok += 1;
                println!(
                    "answered by instance={} version={} id={} content={:?}",
                    g.instance.as_deref().unwrap_or("?"),
                    g.version.as_deref().unwrap_or("?"),
                    g.id,
                    g.content
                );
            }
            Err(e) => {
                summary.failed += 1;
                println!("failed: {e}");
            }
        }
    }
    summary
}

async fn call(http: &reqwest::Client, url: &str) -> Result<Greeting, String> {
    let resp = http
        .get(url)
        .send()
        .await
        .map_err(|e| format!("{url}: {}", chain(&e)))?;
    let status = resp.status();
    if !status.is_success() {
        return Err(format!("{url}: status {status}"));
    }
    resp.json::<Greeting>()
        .await
        .map_err(|e| format!("{url}: not a greeting: {}", chain(&e)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Environment {
        Environment::from_pairs(pairs)
    }

    #[test]
    fn reads_exactly_the_listed_variables() {
        let errs = Config::from_env(&Environment::unreadable(&vars::GREETING_CLIENT)).unwrap_err();
        let mut listed: Vec<&str> = vars::GREETING_CLIENT.vars.iter().map(|v| v.name).collect();
        listed.sort_unstable();
        assert_eq!(Environment::reported(&errs), listed);
    }

    #[test]
    fn defaults_and_errors() {
        let c = Config::from_env(&env(&[])).unwrap();
        assert_eq!(c.variable(), "GREETING_PORT_8000_TCP");
        assert_eq!((c.path.as_str(), c.count), ("/greeting", 0));
        let c = Config::from_env(&env(&[
            ("BAKER_LINK", "my-svc"),
            ("BAKER_LINK_PORT", "9000"),
        ]))
        .unwrap();
        assert_eq!(c.variable(), "MY_SVC_PORT_9000_TCP");
        let errs = Config::from_env(&env(&[
            ("BAKER_LINK", "bad alias"),
            ("BAKER_LINK_PORT", "0"),
            ("BAKER_PATH", "greeting"),
            ("BAKER_INTERVAL", "1"),
            ("BAKER_COUNT", "x"),
        ]))
        .unwrap_err();
        assert_eq!(errs.0.len(), 5, "{errs}");
    }

    #[test]
    fn finds_the_link_or_says_how() {
        let c = Config::from_env(&env(&[])).unwrap();
        let vars = [("GREETING_PORT_8000_TCP", "tcp://ambassador:8000")];
        assert_eq!(find_link(&c, vars).unwrap().authority(), "ambassador:8000");
        let err = find_link(&c, [("OTHER_PORT_1_TCP", "tcp://x:1")]).unwrap_err();
        assert!(err.contains("GREETING_PORT_8000_TCP is not set"), "{err}");
        assert!(
            err.contains("baker links greeting=<ambassador>:8000"),
            "{err}"
        );
    }
}
