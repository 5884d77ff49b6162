//! Where the app is (the target the registrar probes) and where others should dial it (the
//! advertised address): `BAKER_TARGET`, Docker-link variables, `BAKER_ADVERTISE`.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use baker_client::links::{self, Link};
use baker_client::model::{printable, Address};

/// How the app speaks, as the target's scheme says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    Http,
    Tcp,
}

impl fmt::Display for Scheme {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Scheme::Http => "http",
            Scheme::Tcp => "tcp",
        })
    }
}

/// The app the registrar probes: `http://host:port` or `tcp://host:port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub scheme: Scheme,
    /// An IP literal (IPv6 without brackets) or a DNS name.
    pub host: String,
    pub port: u16,
}

impl Target {
    /// `host:port`, IPv6 literals bracketed.
    pub fn authority(&self) -> String {
        authority(&self.host, self.port)
    }

    /// The target a Docker link points at (`APP_PORT_8080_TCP=tcp://172.17.0.5:8080`).
    pub fn from_link(link: &Link) -> Target {
        Target {
            scheme: Scheme::Tcp,
            host: link.host.clone(),
            port: link.port,
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}", self.scheme, self.authority())
    }
}

impl FromStr for Target {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let usage = "must be http://host:port or tcp://host:port";
        let (scheme, rest) = if let Some(rest) = s.strip_prefix("http://") {
            (Scheme::Http, rest)
        } else if let Some(rest) = s.strip_prefix("tcp://") {
            (Scheme::Tcp, rest)
        } else {
            return Err(usage.into());
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.contains('/') {
            return Err(format!(
                "{usage}, without a path (the probe's path goes in BAKER_CHECK, e.g. http:/health)"
            ));
        }
        let (host, port) = split_host_port(rest)?;
        let port = port.ok_or_else(|| format!("{usage}: the port is missing"))?;
        Ok(Target { scheme, host, port })
    }
}

/// Where other containers should dial the app, as registered with the directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Advertise {
    /// An IP literal, or a DNS name the registrar resolves to an IP before each registration
    /// (see [`Advertise::resolve`]).
    pub host: String,
    pub port: u16,
    /// Resolve `host` to an IP before registering, rather than registering the name itself.
    pub resolve: bool,
    /// Taken from the target rather than from `BAKER_ADVERTISE`: a loopback address is then
    /// replaced by this host's own address towards the directory (see
    /// [`crate::registration`]), since a registrar sharing its app's network namespace
    /// probes it on 127.0.0.1, an address no one else can dial.
    pub from_target: bool,
}

impl Advertise {
    /// The default: the target's address; a DNS name there is resolved before each
    /// registration, because a name such as a link alias means something only inside the
    /// registrar's own container.
    pub fn from_target(target: &Target) -> Advertise {
        Advertise {
            host: target.host.clone(),
            port: target.port,
            resolve: target.host.parse::<IpAddr>().is_err(),
            from_target: true,
        }
    }

    /// `BAKER_ADVERTISE`: `host:port`, or a host alone (the target's port is kept). Taken as
    /// written: a DNS name is registered as a name.
    pub fn parse(value: &str, default_port: u16) -> Result<Advertise, String> {
        let (host, port) = split_host_port(value)?;
        Ok(Advertise {
            host,
            port: port.unwrap_or(default_port),
            resolve: false,
            from_target: false,
        })
    }

    pub fn authority(&self) -> String {
        authority(&self.host, self.port)
    }
}

/// `host:port`, IPv6 literals bracketed.
pub fn authority(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// Splits `host:port`, `[v6]:port`, `host`, `v6` and `[v6]`; checks the host and the port.
fn split_host_port(s: &str) -> Result<(String, Option<u16>), String> {
    let (host, port) = if let Some(v6) = s.strip_prefix('[') {
        let (h, rest) = v6
            .split_once(']')
            .ok_or("an IPv6 address needs its closing ']'")?;
        match rest {
            "" => (h, None),
            r => (
                h,
                Some(
                    r.strip_prefix(':')
                        .ok_or("expected ':port' after the IPv6 address")?,
                ),
            ),
        }
    } else if s.parse::<IpAddr>().is_ok() {
        (s, None)
    } else {
        match s.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (s, None),
        }
    };
    Address::parse_as("host", host).map_err(|_| {
        format!(
            "the host must be an IP address or a DNS name (letters, digits, '-', '.'), got {:?}",
            printable(host)
        )
    })?;
    let port = match port {
        None => None,
        Some(p) => Some(p.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(|| {
            format!(
                "the port must be between 1 and 65535, got {:?}",
                printable(p)
            )
        })?),
    };
    Ok((host.to_owned(), port))
}

/// Picks the linked app from Docker-link variables, when `BAKER_TARGET` is unset.
///
/// The alias `app` wins (`--link myapp:app`); otherwise the first TCP link in alphabetical
/// order of alias, then by exposed port, so the choice never depends on the order of the
/// environment. A link that points at the directory itself (alias `directory`, the alias of
/// the directory URL's host name, or the directory's address) is never chosen. Returns the link and how many were candidates.
pub fn pick_link<I, K, V>(
    vars: I,
    directory_host: &str,
    directory_port: u16,
) -> Option<(Link, usize)>
where
    I: IntoIterator<Item = (K, V)>,
    K: AsRef<str>,
    V: AsRef<str>,
{
    let directory_alias = links::env_prefix(directory_host);
    let candidates: Vec<Link> = links::parse(vars)
        .into_iter()
        .filter(|l| l.proto == "tcp")
        .filter(|l| l.alias != directory_alias && l.alias != "DIRECTORY")
        .filter(|l| !(l.host == directory_host && l.port == directory_port))
        .collect();
    let n = candidates.len();
    let chosen = candidates
        .iter()
        .find(|l| l.alias == "APP")
        .or_else(|| candidates.first())
        .cloned()?;
    Some((chosen, n))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn parses_targets() {
        let t: Target = "http://127.0.0.1:8080".parse().unwrap();
        assert_eq!(
            (t.scheme, t.host.as_str(), t.port),
            (Scheme::Http, "127.0.0.1", 8080)
        );
        let t: Target = "tcp://db.internal:5432/".parse().unwrap();
        assert_eq!(
            (t.scheme, t.host.as_str(), t.port),
            (Scheme::Tcp, "db.internal", 5432)
        );
        let t: Target = "http://[fd00::5]:80".parse().unwrap();
        assert_eq!(
            (t.host.as_str(), t.authority()),
            ("fd00::5", "[fd00::5]:80".to_owned())
        );
        assert_eq!(t.to_string(), "http://[fd00::5]:80");
        for bad in [
            "127.0.0.1:8080",
            "https://a:1",
            "http://a",
            "http://a:0",
            "http://a:99999",
            "http://a b:1",
            "http://a:1/health",
            "http://:1",
            "http://[::1:1",
        ] {
            assert!(bad.parse::<Target>().is_err(), "{bad}");
        }
    }

    #[test]
    fn advertise_defaults_and_overrides() {
        let t: Target = "http://10.0.0.5:8080".parse().unwrap();
        let a = Advertise::from_target(&t);
        assert_eq!(
            (a.authority(), a.resolve),
            ("10.0.0.5:8080".to_owned(), false)
        );
        let t: Target = "http://app:8080".parse().unwrap();
        assert!(Advertise::from_target(&t).resolve);

        let a = Advertise::parse("192.168.1.9:18080", 8080).unwrap();
        assert_eq!(
            (a.authority(), a.resolve),
            ("192.168.1.9:18080".to_owned(), false)
        );
        assert_eq!(
            Advertise::parse("node-3.example", 8080)
                .unwrap()
                .authority(),
            "node-3.example:8080"
        );
        assert_eq!(
            Advertise::parse("fd00::1", 80).unwrap().authority(),
            "[fd00::1]:80"
        );
        assert_eq!(Advertise::parse("[fd00::1]:81", 80).unwrap().port, 81);
        for bad in ["", "a b", "host:", "host:x", "a;b:1", "[::1]x"] {
            assert!(Advertise::parse(bad, 80).is_err(), "{bad}");
        }
    }

    #[test]
    fn link_choice_prefers_app_then_alphabetical() {
        let env = vars(&[
            ("ZED_PORT_9000_TCP", "tcp://172.17.0.9:9000"),
            ("APP_PORT_8080_TCP", "tcp://172.17.0.5:8080"),
            ("APP_PORT_8080_TCP_ADDR", "172.17.0.5"),
            ("BETA_PORT_80_TCP", "tcp://172.17.0.6:80"),
            ("PATH", "/bin"),
        ]);
        let (link, n) = pick_link(env, "127.0.0.1", 7700).unwrap();
        assert_eq!((link.host.as_str(), link.port, n), ("172.17.0.5", 8080, 3));

        let env = vars(&[
            ("ZED_PORT_9000_TCP", "tcp://172.17.0.9:9000"),
            ("BETA_PORT_81_TCP", "tcp://172.17.0.6:81"),
            ("BETA_PORT_80_TCP", "tcp://172.17.0.6:80"),
        ]);
        let (link, _) = pick_link(env.clone(), "127.0.0.1", 7700).unwrap();
        assert_eq!(link.authority(), "172.17.0.6:80");
        let mut reversed = env;
        reversed.reverse();
        assert_eq!(pick_link(reversed, "127.0.0.1", 7700).unwrap().0, link);
    }

    #[test]
    fn link_choice_skips_the_directory_and_udp() {
        let env = vars(&[
            ("DIRECTORY_PORT_7700_TCP", "tcp://172.17.0.2:7700"),
            ("DIR2_PORT_7700_TCP", "tcp://172.17.0.3:7700"),
            ("DNS_PORT_53_UDP", "udp://172.17.0.4:53"),
            ("WEB_PORT_80_TCP", "tcp://172.17.0.7:80"),
        ]);
        let (link, n) = pick_link(env, "172.17.0.3", 7700).unwrap();
        assert_eq!((link.alias.as_str(), n), ("WEB", 1));
        let env = vars(&[("DIRECTORY_PORT_7700_TCP", "tcp://172.17.0.2:7700")]);
        assert!(pick_link(env, "directory", 7700).is_none());
        assert!(pick_link(vars(&[]), "directory", 7700).is_none());
    }
}
