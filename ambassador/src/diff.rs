//! The runtime commands that turn the servers HAProxy runs into the planned ones, and when a
//! draining server may go: pure functions, so every case is unit-tested without a socket.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;
use std::time::Duration;

use crate::plan::Desired;
use crate::runtime_api::{AdminState, ApiCommand, Running};

/// One change to a running HAProxy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Add a server with the backend's server options, then enable its health and itself, or
    /// drain it when an operator drained its instance (and give every server of a sticky
    /// backend its cookie).
    Add {
        backend: String,
        server: String,
        address: IpAddr,
        port: u16,
        weight: u16,
        options: String,
        sticky: bool,
        drain: bool,
    },
    SetAddr {
        backend: String,
        server: String,
        address: IpAddr,
        port: u16,
    },
    SetWeight {
        backend: String,
        server: String,
        weight: u16,
    },
    /// Back to service after a drain or maintenance.
    Ready { backend: String, server: String },
    /// No new traffic; existing connections finish. The server left the plan: it is deleted
    /// once idle.
    Drain { backend: String, server: String },
    /// No new traffic; existing connections finish. An operator drained its instance: the
    /// server stays, to take traffic again when undrained.
    Hold { backend: String, server: String },
    /// Maintenance, then deletion (the server must have no connection left).
    Delete { backend: String, server: String },
}

impl Command {
    /// The runtime API commands that carry this change out, in order; each needs the previous
    /// one to have succeeded.
    pub fn steps(&self) -> Vec<ApiCommand> {
        let at = |backend: &String, server: &String| (backend.clone(), server.clone());
        match self {
            Command::Add {
                backend,
                server,
                address,
                port,
                weight,
                options,
                sticky,
                drain,
            } => {
                let mut steps = vec![
                    ApiCommand::AddServer {
                        backend: backend.clone(),
                        server: server.clone(),
                        address: *address,
                        port: *port,
                        weight: *weight,
                        options: options.clone(),
                    },
                    ApiCommand::EnableHealth {
                        backend: backend.clone(),
                        server: server.clone(),
                    },
                    if *drain {
                        ApiCommand::SetState {
                            backend: backend.clone(),
                            server: server.clone(),
                            state: AdminState::Drain,
                        }
                    } else {
                        ApiCommand::EnableServer {
                            backend: backend.clone(),
                            server: server.clone(),
                        }
                    },
                ];
                if *sticky {
                    steps.push(ApiCommand::EnableDynamicCookie {
                        backend: backend.clone(),
                    });
                }
                steps
            }
            Command::SetAddr {
                backend,
                server,
                address,
                port,
            } => vec![ApiCommand::SetAddr {
                backend: backend.clone(),
                server: server.clone(),
                address: *address,
                port: *port,
            }],
            Command::SetWeight {
                backend,
                server,
                weight,
            } => vec![ApiCommand::SetWeight {
                backend: backend.clone(),
                server: server.clone(),
                weight: *weight,
            }],
            Command::Ready { backend, server } => {
                let (backend, server) = at(backend, server);
                vec![ApiCommand::SetState {
                    backend,
                    server,
                    state: AdminState::Ready,
                }]
            }
            Command::Drain { backend, server } | Command::Hold { backend, server } => {
                let (backend, server) = at(backend, server);
                vec![ApiCommand::SetState {
                    backend,
                    server,
                    state: AdminState::Drain,
                }]
            }
            Command::Delete { backend, server } => {
                let (backend, server) = at(backend, server);
                vec![
                    ApiCommand::SetState {
                        backend: backend.clone(),
                        server: server.clone(),
                        state: AdminState::Maint,
                    },
                    ApiCommand::DelServer { backend, server },
                ]
            }
        }
    }

    pub fn backend(&self) -> &str {
        match self {
            Command::Add { backend, .. }
            | Command::SetAddr { backend, .. }
            | Command::SetWeight { backend, .. }
            | Command::Ready { backend, .. }
            | Command::Drain { backend, .. }
            | Command::Hold { backend, .. }
            | Command::Delete { backend, .. } => backend,
        }
    }

    pub fn server(&self) -> &str {
        match self {
            Command::Add { server, .. }
            | Command::SetAddr { server, .. }
            | Command::SetWeight { server, .. }
            | Command::Ready { server, .. }
            | Command::Drain { server, .. }
            | Command::Hold { server, .. }
            | Command::Delete { server, .. } => server,
        }
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let lines: Vec<String> = self.steps().iter().map(ApiCommand::to_string).collect();
        f.write_str(&lines.join("; "))
    }
}

/// What to do now with a server that left the plan and is draining.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrainVerdict {
    /// Sessions remain, or their number is unknown, and the drain has not timed out: wait.
    Wait,
    /// No session left: delete it.
    Delete,
    /// The drain timed out with sessions left (or an unknown number): close them, then delete.
    Expire,
}

/// Whether a server draining for `draining_for`, with `sessions` current sessions (`None` when
/// HAProxy could not say), may be deleted. An unknown count never counts as idle: only the
/// timeout ends such a drain.
pub fn drain_verdict(
    sessions: Option<u64>,
    draining_for: Duration,
    timeout: Duration,
) -> DrainVerdict {
    match sessions {
        Some(0) => DrainVerdict::Delete,
        _ if draining_for >= timeout => DrainVerdict::Expire,
        _ => DrainVerdict::Wait,
    }
}

/// What `add server` needs to know of a backend.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AddOptions {
    /// The options of every server line of the backend.
    pub server_options: String,
    /// Whether the backend sticks clients to servers by cookie.
    pub sticky: bool,
}

/// The commands that turn `running` into `desired`.
///
/// Only backends named in `desired` are touched. `options` holds what each backend's
/// `add server` needs; a backup server is added with `backup` too. A server that is not desired is drained first; it is deleted
/// once it is in `removable` (the caller decides: no session left, or the drain timed out) or
/// already in maintenance. Additions come first, removals last, so capacity never dips.
pub fn diff(
    desired: &Desired,
    running: &Running,
    options: &BTreeMap<String, AddOptions>,
    removable: &BTreeSet<(String, String)>,
) -> Vec<Command> {
    let empty = BTreeMap::new();
    let (mut adds, mut changes, mut drains, mut deletes) = (vec![], vec![], vec![], vec![]);
    // Weight decreases go after every increase: HAProxy applies commands one at a time, and a
    // request arriving between "v1 to 0" and "v2 to 256" of a route flip would find every
    // server at weight 0 and get a 503.
    let mut lowers = vec![];
    for (backend, servers) in desired {
        let run = running.get(backend.as_str()).unwrap_or(&empty);
        for (name, want) in servers {
            let b = backend.to_string();
            // The owner plans with resolved addresses only; a name left here has no address.
            let Some(address) = want.address.ip() else {
                continue;
            };
            let Some(have) = run.get(name.as_str()) else {
                let add = options.get(backend.as_str()).cloned().unwrap_or_default();
                let backup = if want.backup { "backup " } else { "" };
                adds.push(Command::Add {
                    backend: b,
                    server: name.to_string(),
                    address,
                    port: want.port,
                    weight: want.weight,
                    options: format!("{backup}{}", add.server_options),
                    sticky: add.sticky,
                    drain: want.drain,
                });
                continue;
            };
            // Compared as addresses: HAProxy reports the canonical spelling.
            if have.address.parse::<IpAddr>().ok() != Some(address) || have.port != want.port {
                changes.push(Command::SetAddr {
                    backend: b.clone(),
                    server: name.to_string(),
                    address,
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
                    server: name.to_string(),
                    weight: want.weight,
                });
            }
            if want.drain {
                // `state drain` also takes a server out of maintenance.
                if !have.drain || have.maint {
                    drains.push(Command::Hold {
                        backend: b,
                        server: name.to_string(),
                    });
                }
            } else if have.maint || have.drain {
                changes.push(Command::Ready {
                    backend: b,
                    server: name.to_string(),
                });
            }
        }
        for (name, have) in run {
            if servers.contains_key(name.as_str()) {
                continue;
            }
            let key = (backend.to_string(), name.clone());
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
    use crate::plan::DesiredServer;
    use crate::runtime_api::RunningServer;

    fn want(name: &str, port: u16, weight: u16) -> DesiredServer {
        DesiredServer::sample(name, "10.0.0.1", port, weight)
    }

    fn have(name: &str, port: u16, weight: u16) -> RunningServer {
        RunningServer {
            name: name.parse().unwrap(),
            address: "10.0.0.1".parse().unwrap(),
            port,
            weight,
            maint: false,
            drain: false,
            up: true,
        }
    }

    fn desired(servers: &[DesiredServer]) -> Desired {
        [(
            "be".parse().unwrap(),
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

    fn opts() -> BTreeMap<String, AddOptions> {
        [(
            "be".to_string(),
            AddOptions {
                server_options: "check".to_string(),
                sticky: false,
            },
        )]
        .into()
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
    fn an_operators_drain_holds_the_server_and_an_undrain_readies_it() {
        let drained = |name: &str| DesiredServer {
            drain: true,
            ..want(name, 80, 0)
        };
        // A new server drained from the start is never enabled.
        let cmds = diff(
            &desired(&[drained("a")]),
            &running(&[]),
            &opts(),
            &BTreeSet::new(),
        );
        assert_eq!(
            cmds[0].to_string(),
            "add server be/a 10.0.0.1:80 weight 0 check; enable health be/a; set server be/a state drain"
        );
        // A running one is set to drain after its weight drops, and stays.
        let cmds = diff(
            &desired(&[drained("a"), want("b", 80, 256)]),
            &running(&[have("a", 80, 100), have("b", 80, 100)]),
            &opts(),
            &BTreeSet::new(),
        );
        let text: Vec<String> = cmds.iter().map(|c| c.to_string()).collect();
        assert_eq!(
            text,
            [
                "set server be/b weight 256",
                "set server be/a weight 0",
                "set server be/a state drain"
            ]
        );
        let mut a = have("a", 80, 0);
        a.drain = true;
        let removable = [("be".to_string(), "a".to_string())].into();
        assert!(
            diff(
                &desired(&[drained("a")]),
                &running(&[a.clone()]),
                &opts(),
                &removable
            )
            .is_empty(),
            "a drained server that is planned is never deleted"
        );
        let mut m = a.clone();
        m.maint = true;
        let cmds = diff(
            &desired(&[drained("a")]),
            &running(&[m]),
            &opts(),
            &BTreeSet::new(),
        );
        assert_eq!(cmds[0].to_string(), "set server be/a state drain");
        // Undrained: back to its weight, ready.
        let cmds = diff(
            &desired(&[want("a", 80, 100)]),
            &running(&[a]),
            &opts(),
            &BTreeSet::new(),
        );
        let text: Vec<String> = cmds.iter().map(|c| c.to_string()).collect();
        assert_eq!(
            text,
            ["set server be/a weight 100", "set server be/a state ready"]
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
            "baker:ambassador".parse().unwrap(),
            [("ambassador".to_string(), have("ambassador", 0, 1))].into(),
        );
        let cmds = diff(&d, &r, &opts(), &BTreeSet::new());
        assert_eq!(cmds.len(), 1);
        assert!(matches!(&cmds[0], Command::Delete { server, .. } if server == "x"));
    }

    #[test]
    fn addresses_compare_as_addresses_not_spellings() {
        let mut w = want("a", 80, 100);
        w.address = "fd00:0::1".parse().unwrap();
        let mut h = have("a", 80, 100);
        h.address = "fd00::1".into();
        assert!(diff(&desired(&[w]), &running(&[h]), &opts(), &BTreeSet::new()).is_empty());
    }

    #[test]
    fn a_registration_spelled_otherwise_than_haproxy_reports_moves_nothing() {
        use baker_client::model::{InstanceSpec, State};

        use crate::config::{Mode, ServiceRoute};
        use crate::plan::plan;

        // Registered as written by a user; HAProxy reports the canonical spelling.
        for written in ["FD00::1", "fd00:0::1", "FD00:0000:0000::0001"] {
            let body = format!(r#"{{"address":"{written}","port":80}}"#);
            let spec: InstanceSpec = serde_json::from_str(&body).unwrap();
            let spec = spec.validate().unwrap();
            let instance = baker_client::Instance {
                address: spec.address,
                port: spec.port,
                weight: spec.weight,
                ..baker_client::Instance::sample("be", "a")
            };
            let state = State {
                services: [("be".parse().unwrap(), vec![instance])].into(),
                ..State::default()
            };
            let services = [ServiceRoute {
                name: "be".parse().unwrap(),
                port: Some(8000),
                mode: Mode::Http,
                options: Default::default(),
            }];
            let desired = plan(&state, &services, None);
            assert_eq!(desired["be"]["a"].address.as_str(), "fd00::1", "{written}");
            let mut h = have("a", 80, 100);
            h.address = "fd00::1".into();
            let cmds = diff(&desired, &running(&[h]), &opts(), &BTreeSet::new());
            assert!(cmds.is_empty(), "{written}: {cmds:?}");
        }
    }

    #[test]
    fn a_server_without_an_address_is_not_added() {
        let mut w = want("a", 80, 100);
        w.address = "db.example".parse().unwrap();
        assert!(diff(&desired(&[w]), &running(&[]), &opts(), &BTreeSet::new()).is_empty());
    }

    #[test]
    fn drain_ends_when_idle_or_timed_out_never_on_unknown() {
        let timeout = Duration::from_secs(30);
        let early = Duration::from_secs(1);
        let late = Duration::from_secs(30);
        assert_eq!(drain_verdict(Some(0), early, timeout), DrainVerdict::Delete);
        assert_eq!(drain_verdict(Some(0), late, timeout), DrainVerdict::Delete);
        assert_eq!(drain_verdict(Some(3), early, timeout), DrainVerdict::Wait);
        assert_eq!(drain_verdict(Some(3), late, timeout), DrainVerdict::Expire);
        // HAProxy could not say how many sessions remain: not idle.
        assert_eq!(drain_verdict(None, early, timeout), DrainVerdict::Wait);
        assert_eq!(drain_verdict(None, late, timeout), DrainVerdict::Expire);
    }
}
