//! The runtime commands that turn the servers HAProxy runs into the planned ones: a pure
//! function, so every case is unit-tested without a socket.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use crate::plan::{Desired, DesiredServer};
use crate::runtime_api::Running;

/// One change to a running HAProxy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Add a server with the backend's server options, then enable its health and itself.
    Add {
        backend: String,
        server: DesiredServer,
        options: String,
    },
    SetAddr {
        backend: String,
        server: String,
        address: String,
        port: u16,
    },
    SetWeight {
        backend: String,
        server: String,
        weight: u16,
    },
    /// Back to service after a drain or maintenance.
    Ready { backend: String, server: String },
    /// No new traffic; existing connections finish.
    Drain { backend: String, server: String },
    /// Maintenance, then deletion (the server must have no connection left).
    Delete { backend: String, server: String },
}

impl Command {
    /// The CLI lines that carry this command out, each with the answers that mean success
    /// (besides an empty answer).
    pub fn lines(&self) -> Vec<(String, &'static [&'static str])> {
        match self {
            Command::Add {
                backend,
                server,
                options,
            } => vec![
                (
                    format!(
                        "add server {backend}/{} {}:{} weight {} {options}",
                        server.name, server.address, server.port, server.weight
                    ),
                    &["New server registered."],
                ),
                (format!("enable health {backend}/{}", server.name), &[]),
                (format!("enable server {backend}/{}", server.name), &[]),
            ],
            Command::SetAddr {
                backend,
                server,
                address,
                port,
            } => vec![(
                format!("set server {backend}/{server} addr {address} port {port}"),
                &[
                    "IP changed",
                    "no need to change",
                    "port changed",
                    "IP and port",
                ],
            )],
            Command::SetWeight {
                backend,
                server,
                weight,
            } => vec![(
                format!("set server {backend}/{server} weight {weight}"),
                &[],
            )],
            Command::Ready { backend, server } => {
                vec![(format!("set server {backend}/{server} state ready"), &[])]
            }
            Command::Drain { backend, server } => {
                vec![(format!("set server {backend}/{server} state drain"), &[])]
            }
            Command::Delete { backend, server } => vec![
                (format!("set server {backend}/{server} state maint"), &[]),
                (
                    format!("del server {backend}/{server}"),
                    &["Server deleted."],
                ),
            ],
        }
    }

    pub fn backend(&self) -> &str {
        match self {
            Command::Add { backend, .. }
            | Command::SetAddr { backend, .. }
            | Command::SetWeight { backend, .. }
            | Command::Ready { backend, .. }
            | Command::Drain { backend, .. }
            | Command::Delete { backend, .. } => backend,
        }
    }

    pub fn server(&self) -> &str {
        match self {
            Command::Add { server, .. } => &server.name,
            Command::SetAddr { server, .. }
            | Command::SetWeight { server, .. }
            | Command::Ready { server, .. }
            | Command::Drain { server, .. }
            | Command::Delete { server, .. } => server,
        }
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let lines: Vec<String> = self.lines().into_iter().map(|(l, _)| l).collect();
        f.write_str(&lines.join("; "))
    }
}

/// The commands that turn `running` into `desired`.
///
/// Only backends named in `desired` are touched. `options` holds each backend's server
/// options for `add server`. A server that is not desired is drained first; it is deleted
/// once it is in `removable` (the caller decides: no session left, or the drain timed out) or
/// already in maintenance. Additions come first, removals last, so capacity never dips.
pub fn diff(
    desired: &Desired,
    running: &Running,
    options: &BTreeMap<String, String>,
    removable: &BTreeSet<(String, String)>,
) -> Vec<Command> {
    let empty = BTreeMap::new();
    let (mut adds, mut changes, mut drains, mut deletes) = (vec![], vec![], vec![], vec![]);
    // Weight decreases go after every increase: HAProxy applies commands one at a time, and a
    // request arriving between "v1 to 0" and "v2 to 256" of a route flip would find every
    // server at weight 0 and get a 503.
    let mut lowers = vec![];
    for (backend, servers) in desired {
        let run = running.get(backend).unwrap_or(&empty);
        for (name, want) in servers {
            let b = backend.clone();
            let Some(have) = run.get(name) else {
                adds.push(Command::Add {
                    backend: b,
                    server: want.clone(),
                    options: options.get(backend).cloned().unwrap_or_default(),
                });
                continue;
            };
            if have.address != want.address || have.port != want.port {
                changes.push(Command::SetAddr {
                    backend: b.clone(),
                    server: name.clone(),
                    address: want.address.clone(),
                    port: want.port,
                });
            }
            if have.weight != want.weight {
                let to = if want.weight < have.weight {
                    &mut lowers
                } else {
                    &mut changes
                };
                to.push(Command::SetWeight {
                    backend: b.clone(),
                    server: name.clone(),
                    weight: want.weight,
                });
            }
            if have.maint || have.drain {
                changes.push(Command::Ready {
                    backend: b,
                    server: name.clone(),
                });
            }
        }
        for (name, have) in run {
            if servers.contains_key(name) {
                continue;
            }
            let key = (backend.clone(), name.clone());
            if have.maint || removable.contains(&key) {
                deletes.push(Command::Delete {
                    backend: key.0,
                    server: key.1,
                });
            } else if !have.drain {
                drains.push(Command::Drain {
                    backend: key.0,
                    server: key.1,
                });
            }
        }
    }
    adds.into_iter()
        .chain(changes)
        .chain(lowers)
        .chain(drains)
        .chain(deletes)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime_api::RunningServer;

    fn want(name: &str, port: u16, weight: u16) -> DesiredServer {
        DesiredServer {
            name: name.into(),
            address: "10.0.0.1".into(),
            port,
            weight,
            version: "1".into(),
        }
    }

    fn have(name: &str, port: u16, weight: u16) -> RunningServer {
        RunningServer {
            name: name.into(),
            address: "10.0.0.1".into(),
            port,
            weight,
            maint: false,
            drain: false,
            up: true,
        }
    }

    fn desired(servers: &[DesiredServer]) -> Desired {
        [(
            "be".to_string(),
            servers
                .iter()
                .map(|s| (s.name.clone(), s.clone()))
                .collect(),
        )]
        .into()
    }

    fn running(servers: &[RunningServer]) -> Running {
        [(
            "be".to_string(),
            servers
                .iter()
                .map(|s| (s.name.clone(), s.clone()))
                .collect(),
        )]
        .into()
    }

    fn opts() -> BTreeMap<String, String> {
        [("be".to_string(), "check".to_string())].into()
    }

    #[test]
    fn a_route_flip_raises_weights_before_lowering_any() {
        // v1 (a) 256 -> 0 and v2 (b) 0 -> 256: "a" sorts first, yet "b" must be raised first,
        // or a request in between would find no server with weight.
        let cmds = diff(
            &desired(&[want("a", 80, 0), want("b", 81, 256)]),
            &running(&[have("a", 80, 256), have("b", 81, 0)]),
            &opts(),
            &BTreeSet::new(),
        );
        let weights: Vec<_> = cmds
            .iter()
            .filter_map(|c| match c {
                Command::SetWeight { server, weight, .. } => Some((server.as_str(), *weight)),
                _ => None,
            })
            .collect();
        assert_eq!(weights, [("b", 256), ("a", 0)]);
    }

    #[test]
    fn nothing_to_do_when_equal() {
        let d = desired(&[want("a", 80, 100)]);
        let r = running(&[have("a", 80, 100)]);
        assert!(diff(&d, &r, &opts(), &BTreeSet::new()).is_empty());
    }

    #[test]
    fn add_change_and_drain_in_order() {
        let d = desired(&[want("a", 80, 50), want("c", 82, 100)]);
        let r = running(&[have("a", 80, 100), have("b", 81, 100)]);
        let cmds = diff(&d, &r, &opts(), &BTreeSet::new());
        let text: Vec<String> = cmds.iter().map(|c| c.to_string()).collect();
        assert_eq!(
            text,
            [
                "add server be/c 10.0.0.1:82 weight 100 check; enable health be/c; enable server be/c",
                "set server be/a weight 50",
                "set server be/b state drain",
            ]
        );
    }

    #[test]
    fn draining_server_is_deleted_once_removable() {
        let d = desired(&[]);
        let mut b = have("b", 81, 100);
        b.drain = true;
        let r = running(&[b]);
        assert!(
            diff(&d, &r, &opts(), &BTreeSet::new()).is_empty(),
            "still draining"
        );
        let removable = [("be".to_string(), "b".to_string())].into();
        let cmds = diff(&d, &r, &opts(), &removable);
        assert_eq!(
            cmds[0].to_string(),
            "set server be/b state maint; del server be/b"
        );
    }

    #[test]
    fn returning_server_is_made_ready_and_moved() {
        let d = desired(&[want("a", 90, 100)]);
        let mut a = have("a", 80, 100);
        a.drain = true;
        let cmds = diff(&d, &running(&[a]), &opts(), &BTreeSet::new());
        let text: Vec<String> = cmds.iter().map(|c| c.to_string()).collect();
        assert_eq!(
            text,
            [
                "set server be/a addr 10.0.0.1 port 90",
                "set server be/a state ready"
            ]
        );
    }

    #[test]
    fn maintenance_leftover_is_deleted_and_other_backends_untouched() {
        let d = desired(&[]);
        let mut x = have("x", 80, 1);
        x.maint = true;
        let mut r = running(&[x]);
        r.insert(
            "baker:ambassador".into(),
            [("ambassador".to_string(), have("ambassador", 0, 1))].into(),
        );
        let cmds = diff(&d, &r, &opts(), &BTreeSet::new());
        assert_eq!(cmds.len(), 1);
        assert!(matches!(&cmds[0], Command::Delete { server, .. } if server == "x"));
    }
}
