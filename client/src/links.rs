//! Docker-link style variables: `EMITTER_PORT_8000_TCP=tcp://172.17.0.8:8000` and friends.
//!
//! Docker injected these for `--link` on the default bridge until Engine 29; Baker makes the
//! same block itself ([`render`]) and reads it back ([`parse`]), so application code is the same
//! whether Docker or Baker wrote them.

use std::collections::BTreeMap;
use std::fmt;

/// One linked port, as read from `<ALIAS>_PORT_<port>_<PROTO>=<proto>://<addr>:<port>`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Link {
    /// The variable prefix: the link alias upper-cased, `-` and `.` turned into `_`.
    pub alias: String,
    /// The port the linked container exposes (the `8000` of `_PORT_8000_TCP`).
    pub exposed_port: u16,
    /// `tcp` or `udp`.
    pub proto: String,
    /// Where to connect: host or IP from the variable's value.
    pub host: String,
    /// Where to connect: port from the variable's value.
    pub port: u16,
}

impl Link {
    /// `host:port`, with IPv6 literals bracketed.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// Turns a link alias into a variable prefix the way Docker does: upper case, `-` → `_`.
pub fn env_prefix(alias: &str) -> String {
    alias
        .chars()
        .map(|c| match c {
            '-' | '.' => '_',
            c => c.to_ascii_uppercase(),
        })
        .collect()
}

/// Error for a link that cannot be rendered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct LinkError(pub String);

/// Renders the block Docker would inject for `--link <host>:<alias>` with `port` exposed:
/// `<P>_PORT`, `<P>_PORT_<n>_TCP`, `..._ADDR`, `..._PORT`, `..._PROTO`, one `KEY=value` a line.
pub fn render(alias: &str, host: &str, port: u16, proto: &str) -> Result<String, LinkError> {
    let prefix = env_prefix(alias);
    if prefix.is_empty()
        || !prefix
            .chars()
            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
        || prefix.starts_with(|c: char| c.is_ascii_digit())
    {
        return Err(LinkError(format!(
            "alias {:?} must be letters, digits, '-', '_' or '.', starting with a letter",
            crate::model::printable(alias)
        )));
    }
    crate::model::Address::parse_as("host", host).map_err(|e| LinkError(e.to_string()))?;
    if port == 0 {
        return Err(LinkError("port must be between 1 and 65535".into()));
    }
    if proto != "tcp" && proto != "udp" {
        return Err(LinkError(format!(
            "protocol must be tcp or udp, got {:?}",
            crate::model::printable(proto)
        )));
    }
    let h = if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_owned()
    };
    let upper = proto.to_ascii_uppercase();
    let url = format!("{proto}://{h}:{port}");
    let p = format!("{prefix}_PORT_{port}_{upper}");
    Ok(format!(
        "{prefix}_PORT={url}\n{p}={url}\n{p}_ADDR={host}\n{p}_PORT={port}\n{p}_PROTO={proto}\n"
    ))
}

/// Reads every link from an environment, ignoring variables that are not link variables.
pub fn parse<I, K, V>(vars: I) -> Vec<Link>
where
    I: IntoIterator<Item = (K, V)>,
    K: AsRef<str>,
    V: AsRef<str>,
{
    let mut links = BTreeMap::new();
    for (key, value) in vars {
        if let Some(link) = parse_one(key.as_ref(), value.as_ref()) {
            links.insert(
                (link.alias.clone(), link.exposed_port, link.proto.clone()),
                link,
            );
        }
    }
    links.into_values().collect()
}

/// Reads one `<ALIAS>_PORT_<n>_<PROTO>=<proto>://<host>:<port>` variable.
pub fn parse_one(key: &str, value: &str) -> Option<Link> {
    let (head, proto_upper) = key.rsplit_once('_')?;
    let proto = match proto_upper {
        "TCP" => "tcp",
        "UDP" => "udp",
        _ => return None,
    };
    let (alias, exposed) = head.rsplit_once("_PORT_")?;
    if alias.is_empty() {
        return None;
    }
    let exposed_port: u16 = exposed.parse().ok().filter(|p| *p != 0)?;
    let rest = value.strip_prefix(proto)?.strip_prefix("://")?;
    let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
        let (h, p) = v6.split_once("]:")?;
        (h, p)
    } else {
        rest.rsplit_once(':')?
    };
    let port: u16 = port.parse().ok().filter(|p| *p != 0)?;
    if host.is_empty() {
        return None;
    }
    Some(Link {
        alias: alias.to_owned(),
        exposed_port,
        proto: proto.to_owned(),
        host: host.to_owned(),
        port,
    })
}

/// Finds the link for `alias` (case-insensitive, `-` ≡ `_`) and exposed `port` in `vars`.
pub fn find<I, K, V>(vars: I, alias: &str, port: u16) -> Option<Link>
where
    I: IntoIterator<Item = (K, V)>,
    K: AsRef<str>,
    V: AsRef<str>,
{
    let prefix = env_prefix(alias);
    parse(vars)
        .into_iter()
        .find(|l| l.alias == prefix && l.exposed_port == port && l.proto == "tcp")
}

impl fmt::Display for Link {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}_PORT_{}_{}={}://{}",
            self.alias,
            self.exposed_port,
            self.proto.to_uppercase(),
            self.proto,
            self.authority()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_matches_docker() {
        let block = render("emitter", "172.17.0.8", 8000, "tcp").unwrap();
        assert_eq!(
            block,
            "EMITTER_PORT=tcp://172.17.0.8:8000\n\
             EMITTER_PORT_8000_TCP=tcp://172.17.0.8:8000\n\
             EMITTER_PORT_8000_TCP_ADDR=172.17.0.8\n\
             EMITTER_PORT_8000_TCP_PORT=8000\n\
             EMITTER_PORT_8000_TCP_PROTO=tcp\n"
        );
        assert!(render("my-svc", "amb", 1, "tcp")
            .unwrap()
            .starts_with("MY_SVC_PORT=tcp://amb:1\n"));
        assert!(render("bad alias", "amb", 1, "tcp").is_err());
        assert!(render("ok", "bad host", 1, "tcp").is_err());
        assert!(render("ok", "amb", 0, "tcp").is_err());
    }

    #[test]
    fn parse_round_trips() {
        let block = render("greeting", "10.1.2.3", 8000, "tcp").unwrap();
        let vars: Vec<(String, String)> = block
            .lines()
            .map(|l| {
                let (k, v) = l.split_once('=').unwrap();
                (k.to_owned(), v.to_owned())
            })
            .chain([
                ("PATH".to_owned(), "/bin".to_owned()),
                ("X_PORT_1_TCP".into(), "garbage".into()),
            ])
            .collect();
        let links = parse(vars.clone());
        assert_eq!(
            links,
            vec![Link {
                alias: "GREETING".into(),
                exposed_port: 8000,
                proto: "tcp".into(),
                host: "10.1.2.3".into(),
                port: 8000
            }]
        );
        assert_eq!(
            find(vars, "greeting", 8000).unwrap().authority(),
            "10.1.2.3:8000"
        );
    }

    #[test]
    fn parse_ipv6_and_udp() {
        let l = parse_one("DNS_PORT_53_UDP", "udp://[fd00::1]:53").unwrap();
        assert_eq!(
            (l.host.as_str(), l.port, l.proto.as_str()),
            ("fd00::1", 53, "udp")
        );
        assert_eq!(l.authority(), "[fd00::1]:53");
        assert!(parse_one("DNS_PORT_53_UDP", "tcp://1.2.3.4:53").is_none());
        assert!(parse_one("DNS_PORT_53_TCP_ADDR", "1.2.3.4").is_none());
    }
}
