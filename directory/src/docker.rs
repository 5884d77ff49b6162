//! Docker discovery: containers labelled `baker.service` are registered without a registrar.
//!
//! The directory lists the engine's labelled containers when it connects, then follows the
//! events stream (start, die, stop, kill, pause, unpause, health status, network connect and
//! disconnect) and re-reads a container whenever one of its events arrives. A container counts
//! while it runs, is not paused, and, when it has a HEALTHCHECK, only while Docker reports it
//! healthy. `docker stop` takes it out at the `kill` event, before the process has exited, so it
//! drains the way a registrar's deregistration does.
//!
//! Labels: `baker.service` (required), `baker.port` (default: the only exposed TCP port),
//! `baker.version` (default `1`), `baker.weight` (1-256, default 100), `baker.network` (whose
//! address to register; default `BAKER_DOCKER_NETWORK`, else the container's only network),
//! `baker.backup` (`true`: registered with the tag `backup`), `baker.zone` (the zone it runs
//! in; default `BAKER_ZONE`, else none).
//! A container with a bad label is logged once, naming the label, and left out; nothing
//! crashes. The instance id is the container's name, made unique when it has to be lower-cased
//! or shortened ([`instance_id`]).
//!
//! Each instance carries the node it runs on: `BAKER_NODE`, else the engine's own name (as
//! `docker info` shows it), else the host name ([`default_node`]). With replicas on etcd, it
//! tells which replica's engine a container was found on.
//!
//! When the stream breaks (engine restarted, socket gone), discovery reconnects with capped
//! backoff and resynchronises ([`Registry::sync_source`]). The API version is negotiated, so
//! engines from 20.10 (API 1.41) to current ones work.
//!
//! [`verdict`] (container → what to register) and [`classify`] (event → what to do) are pure;
//! [`run`] is the I/O around them.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use baker_client::backoff::Backoff;
use baker_client::change::RemoveCause;
use baker_client::errors::chain;
use baker_client::model::{
    printable, validate_port, InstanceId, InstanceSpec, NodeName, ServiceName, ValidSpec,
    ValidationError, Zone, MAX_NAME_LEN,
};
use bollard::errors::Error as DockerError;
use bollard::models::{
    ContainerInspectResponse, EventMessage, EventMessageTypeEnum, HealthStatusEnum,
};
use bollard::query_parameters::{EventsOptionsBuilder, ListContainersOptionsBuilder};
use bollard::Docker;
use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::config::DockerMode;
use crate::registry::Registry;

/// The label that makes a container Baker's.
pub const SERVICE_LABEL: &str = "baker.service";
pub const PORT_LABEL: &str = "baker.port";
pub const VERSION_LABEL: &str = "baker.version";
pub const WEIGHT_LABEL: &str = "baker.weight";
pub const NETWORK_LABEL: &str = "baker.network";
/// `true` registers the container with the tag `backup`: the ambassadors send it traffic only
/// while no other instance of its service is up.
pub const BACKUP_LABEL: &str = "baker.backup";
/// The zone the instance runs in: a container's wins over the directory's `BAKER_ZONE`, a
/// swarm service's over its node's label of the same name.
pub const ZONE_LABEL: &str = "baker.zone";

/// Where the engine listens when `DOCKER_HOST` is not set.
pub const DEFAULT_SOCKET: &str = "/var/run/docker.sock";

/// Whether discovery runs: `on` or `swarm`, or `auto` with `DOCKER_HOST` set or the socket
/// present. Swarm discovery ([`crate::swarm`]) runs beside it whenever it does, and follows a
/// swarm while the engine is a manager.
pub fn enabled(mode: DockerMode) -> bool {
    match mode {
        DockerMode::On | DockerMode::Swarm => true,
        DockerMode::Off => false,
        DockerMode::Auto => {
            std::env::var_os("DOCKER_HOST").is_some() || Path::new(DEFAULT_SOCKET).exists()
        }
    }
}

/// The node name discovered instances get when `BAKER_NODE` is not set: the engine's own
/// name (`engine`, from its `/info`), else the host name (`host`), whichever is first a valid
/// [`NodeName`]; `None` when neither is.
pub fn default_node(engine: Option<&str>, host: Option<&str>) -> Option<NodeName> {
    [engine, host]
        .into_iter()
        .flatten()
        .find_map(|name| name.trim().parse().ok())
}

/// This machine's host name, if it has a readable one.
fn host_name() -> Option<String> {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
}

/// What to do with one container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// No `baker.service` label: not Baker's business.
    Unlabelled,
    /// Labelled, and to be registered as `service`/`id`.
    Register {
        service: ServiceName,
        id: InstanceId,
        spec: ValidSpec,
    },
    /// Labelled, but not to be registered now (stopped, paused, not healthy, no address).
    Absent { id: String, reason: String },
    /// Labelled, running, but not on the network discovery registers addresses of
    /// (`BAKER_DOCKER_NETWORK` or its `baker.network` label): left out, with a warning.
    OffNetwork { id: String, reason: String },
    /// Labelled wrongly; `message` names the label and what is wrong.
    Invalid { id: String, message: String },
}

/// How many characters of the container id an instance id carries when the name alone would
/// not be unique (12, as `docker ps` shows it).
pub const SHORT_ID_LEN: usize = 12;

/// The instance id of a container, unique per container and stable for its lifetime.
///
/// A name that is already a valid id (lowercase, at most 63 characters) is the id as it is:
/// `/orders_1` → `orders_1`. Any other name is lower-cased, every character outside
/// `a-z0-9._-` becomes `-`, it is cut to leave room, and `-` plus the first 12 characters of
/// the container id is appended: `/Orders_1` → `orders_1-0123456789ab`. Docker names are unique
/// but case-sensitive and unbounded, so two containers whose names differ only in case or after
/// 63 characters still get two ids. A container without a name gets its short id alone.
///
/// Fails only when the engine reports neither a usable name nor an id.
pub fn instance_id(name: &str, container_id: &str) -> Result<InstanceId, String> {
    let name = name.trim_start_matches('/');
    if let Ok(id) = name.parse() {
        return Ok(id);
    }
    let short: String = sanitize(container_id).take(SHORT_ID_LEN).collect();
    if short.is_empty() || !short.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return Err(format!(
            "the engine reported container {:?} with no usable id ({:?})",
            printable(name),
            printable(container_id)
        ));
    }
    let room = MAX_NAME_LEN - 1 - short.len();
    let base: String = sanitize(name)
        .skip_while(|c| !c.is_ascii_alphanumeric())
        .take(room)
        .collect();
    let id = if base.is_empty() {
        short
    } else {
        format!("{base}-{short}")
    };
    id.parse().map_err(|e: ValidationError| e.to_string())
}

/// `s` lower-cased, with every character outside `a-z0-9._-` turned into `-`.
fn sanitize(s: &str) -> impl Iterator<Item = char> + '_ {
    s.chars().map(|c| match c.to_ascii_lowercase() {
        c @ ('a'..='z' | '0'..='9' | '.' | '_' | '-') => c,
        _ => '-',
    })
}

/// Decides what a container (as `docker inspect` shows it) means for the directory.
///
/// `default_network` is `BAKER_DOCKER_NETWORK`: the network whose address is registered when
/// the container has no `baker.network` label.
pub fn verdict(c: &ContainerInspectResponse, default_network: Option<&str>) -> Verdict {
    let empty = HashMap::new();
    let labels = c
        .config
        .as_ref()
        .and_then(|cfg| cfg.labels.as_ref())
        .unwrap_or(&empty);
    if !labels.contains_key(SERVICE_LABEL) {
        return Verdict::Unlabelled;
    }
    let instance = match instance_id(
        c.name.as_deref().unwrap_or_default(),
        c.id.as_deref().unwrap_or_default(),
    ) {
        Ok(id) => id,
        Err(message) => {
            return Verdict::Invalid {
                id: "(unnamed)".to_owned(),
                message,
            }
        }
    };
    let id = instance.to_string();
    let labelled = match read_labels(labels, || only_exposed_port(c)) {
        Ok(l) => l,
        Err(message) => return Verdict::Invalid { id, message },
    };

    let absent = |reason: String| Verdict::Absent {
        id: id.clone(),
        reason,
    };
    let state = c.state.clone().unwrap_or_default();
    if state.running != Some(true) {
        return absent("it is not running".into());
    }
    if state.paused == Some(true) {
        return absent("it is paused".into());
    }
    if state.restarting == Some(true) {
        return absent("it is restarting".into());
    }
    match state.health.and_then(|h| h.status) {
        Some(HealthStatusEnum::STARTING) => {
            return absent("its HEALTHCHECK has not passed yet (starting)".into())
        }
        Some(HealthStatusEnum::UNHEALTHY) => {
            return absent("its HEALTHCHECK reports it unhealthy".into())
        }
        _ => {}
    }

    let address = match address(
        c,
        labels.get(NETWORK_LABEL).map(String::as_str),
        default_network,
    ) {
        Ok(a) => a,
        Err(Problem::Absent(reason)) => return absent(reason),
        Err(Problem::OffNetwork(reason)) => return Verdict::OffNetwork { id, reason },
        Err(Problem::Invalid(message)) => return Verdict::Invalid { id, message },
    };
    match labelled.spec(address) {
        Ok(spec) => Verdict::Register {
            service: labelled.service,
            id: instance,
            spec,
        },
        Err(message) => Verdict::Invalid { id, message },
    }
}

/// What the `baker.*` labels of a container or a swarm service say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Labelled {
    pub service: ServiceName,
    pub port: u16,
    pub version: Option<String>,
    pub weight: Option<u64>,
    pub backup: bool,
    pub zone: Option<String>,
}

/// Reads the `baker.*` labels (`baker.service` must be there); `default_port` gives the port
/// when `baker.port` is missing. Every bad label is named in the one message returned.
pub(crate) fn read_labels(
    labels: &HashMap<String, String>,
    default_port: impl FnOnce() -> Result<u16, String>,
) -> Result<Labelled, String> {
    let mut problems = Vec::new();
    let service = match labels.get(SERVICE_LABEL) {
        Some(service) => ServiceName::parse_as(SERVICE_LABEL, service)
            .map_err(|e| problems.push(e.to_string()))
            .ok(),
        None => {
            problems.push(format!("{SERVICE_LABEL}: missing"));
            None
        }
    };
    let port = match labels.get(PORT_LABEL) {
        Some(p) => p
            .trim()
            .parse::<u64>()
            .map_err(|_| format!("{PORT_LABEL}: must be a port number, got {p:?}"))
            .and_then(|p| validate_port(PORT_LABEL, p).map_err(|e| e.to_string())),
        None => default_port(),
    };
    let port = port.map_err(|e| problems.push(e)).unwrap_or(0);
    let weight = match labels.get(WEIGHT_LABEL) {
        Some(w) => match w.trim().parse::<u64>() {
            Ok(w) => Some(w),
            Err(_) => {
                problems.push(format!(
                    "{WEIGHT_LABEL}: must be a number between 1 and 256, got {w:?}"
                ));
                None
            }
        },
        None => None,
    };
    let backup = match labels.get(BACKUP_LABEL).map(|v| v.trim()) {
        None | Some("false") => false,
        Some("true") => true,
        Some(other) => {
            problems.push(format!(
                "{BACKUP_LABEL}: must be true or false, got {:?}",
                printable(other)
            ));
            false
        }
    };
    match service {
        Some(service) if problems.is_empty() => Ok(Labelled {
            service,
            port,
            version: labels.get(VERSION_LABEL).map(|v| v.trim().to_owned()),
            weight,
            backup,
            zone: labels.get(ZONE_LABEL).map(|z| z.trim().to_owned()),
        }),
        _ => Err(problems.join("; ")),
    }
}

impl Labelled {
    /// The instance these labels make at `address`; the message names the bad labels.
    pub(crate) fn spec(&self, address: String) -> Result<ValidSpec, String> {
        let spec = InstanceSpec {
            address,
            port: u64::from(self.port),
            version: self.version.clone(),
            weight: self.weight,
            tags: if self.backup {
                vec!["backup".to_owned()]
            } else {
                Vec::new()
            },
            ttl_ms: None,
            zone: self.zone.clone(),
        };
        spec.validate().map_err(|errors| {
            errors
                .iter()
                .map(|e| match e.field.as_str() {
                    "version" => format!("{VERSION_LABEL}: {}", e.message),
                    "weight" => format!("{WEIGHT_LABEL}: {}", e.message),
                    "zone" => format!("{ZONE_LABEL}: {}", e.message),
                    _ => e.to_string(),
                })
                .collect::<Vec<_>>()
                .join("; ")
        })
    }
}

enum Problem {
    Absent(String),
    OffNetwork(String),
    Invalid(String),
}

/// The port when `baker.port` is missing: the container's only exposed TCP port.
fn only_exposed_port(c: &ContainerInspectResponse) -> Result<u16, String> {
    let exposed: Vec<u16> = c
        .config
        .as_ref()
        .and_then(|cfg| cfg.exposed_ports.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|p| p.strip_suffix("/tcp").unwrap_or(p).parse().ok())
        .collect();
    match exposed.as_slice() {
        [port] => Ok(*port),
        [] => Err(format!(
            "{PORT_LABEL}: missing, and the container exposes no TCP port to default to"
        )),
        many => Err(format!(
            "{PORT_LABEL}: missing, and the container exposes {} TCP ports: say which one",
            many.len()
        )),
    }
}

/// The container's address on the chosen network: its IPv4 address (`IPAddress`) when it has
/// one, else its global IPv6 address (`GlobalIPv6Address`).
///
/// On a network with IPv6 (`docker network create --ipv6`) a container has both, and the IPv4
/// one is registered: every container on the network can dial it, and so can an app that
/// listens on `0.0.0.0` only, the usual default, which would refuse connections on its IPv6
/// address. A container with no IPv4 address (a network created with `--ipv4=false`, Engine
/// 27 and later) is registered by its IPv6 address.
fn address(
    c: &ContainerInspectResponse,
    label: Option<&str>,
    default_network: Option<&str>,
) -> Result<String, Problem> {
    let networks = c
        .network_settings
        .as_ref()
        .and_then(|n| n.networks.clone())
        .unwrap_or_default();
    let ip_of = |e: &bollard::models::EndpointSettings| {
        [e.ip_address.as_deref(), e.global_ipv6_address.as_deref()]
            .into_iter()
            .flatten()
            .find(|ip| !ip.is_empty())
            .map(str::to_owned)
    };
    let wanted = label.map(str::trim).filter(|n| !n.is_empty());
    if let Some(name) = wanted.or(default_network) {
        let source = if wanted.is_some() {
            format!("label {NETWORK_LABEL}")
        } else {
            "BAKER_DOCKER_NETWORK".to_owned()
        };
        return match networks.get(name) {
            None => {
                let mut on: Vec<&str> = networks.keys().map(String::as_str).collect();
                on.sort_unstable();
                Err(Problem::OffNetwork(format!(
                    "it is not on network {name:?} ({source}) but on {}: connect it (docker \
                     network connect {name} <container>) or label it {NETWORK_LABEL}=<network>",
                    if on.is_empty() {
                        "none".to_owned()
                    } else {
                        on.join(", ")
                    }
                )))
            }
            Some(e) => ip_of(e).ok_or_else(|| {
                Problem::Absent(format!("it has no address on network {name:?} yet"))
            }),
        };
    }
    let mut with_ip: Vec<(&String, String)> = networks
        .iter()
        .filter_map(|(name, e)| ip_of(e).map(|ip| (name, ip)))
        .collect();
    with_ip.sort();
    match with_ip.len() {
        0 => Err(Problem::Absent(
            "it has no address on any network (network mode host or none?)".into(),
        )),
        1 => Ok(with_ip.remove(0).1),
        _ => Err(Problem::Invalid(format!(
            "{NETWORK_LABEL}: missing, and the container is on several networks ({}): say \
             which one's address to register (or set BAKER_DOCKER_NETWORK)",
            with_ip
                .iter()
                .map(|(n, _)| n.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

/// What an event asks of discovery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Nothing (another object, or an action that changes nothing Baker reads).
    Ignore,
    /// Read the container again and follow what it says now.
    Refresh(String),
    /// The container is being stopped: take it out now and keep it out until it starts again.
    Stopping(String),
    /// The container no longer exists.
    Gone(String),
}

/// Signals after which a container is going away (TERM, KILL, INT, QUIT).
const STOP_SIGNALS: [&str; 8] = [
    "15", "9", "2", "3", "SIGTERM", "SIGKILL", "SIGINT", "SIGQUIT",
];

/// Decides what one engine event means; `known` says whether the container is one discovery
/// has seen labelled (its events matter even when the event carries no labels).
pub fn classify(event: &EventMessage, known: impl Fn(&str) -> bool) -> Action {
    let action = event.action.as_deref().unwrap_or_default();
    let empty = HashMap::new();
    let actor = event.actor.as_ref();
    let attributes = actor.and_then(|a| a.attributes.as_ref()).unwrap_or(&empty);
    match event.typ {
        Some(EventMessageTypeEnum::CONTAINER) => {
            let Some(id) = actor.and_then(|a| a.id.clone()).filter(|id| !id.is_empty()) else {
                return Action::Ignore;
            };
            if !attributes.contains_key(SERVICE_LABEL) && !known(&id) {
                return Action::Ignore;
            }
            match action {
                "destroy" => Action::Gone(id),
                "kill" => match attributes.get("signal") {
                    Some(s) if STOP_SIGNALS.contains(&s.as_str()) => Action::Stopping(id),
                    _ => Action::Refresh(id),
                },
                "stop" | "die" | "oom" => Action::Stopping(id),
                "start" | "restart" | "pause" | "unpause" | "rename" | "update" => {
                    Action::Refresh(id)
                }
                a if a.starts_with("health_status") => Action::Refresh(id),
                _ => Action::Ignore,
            }
        }
        Some(EventMessageTypeEnum::NETWORK) if action == "connect" || action == "disconnect" => {
            match attributes.get("container") {
                Some(id) if !id.is_empty() => Action::Refresh(id.clone()),
                _ => Action::Ignore,
            }
        }
        _ => Action::Ignore,
    }
}

/// What discovery remembers between events.
#[derive(Debug, Default)]
struct Tracker {
    /// Container id → the service and instance id registered for it.
    registered: HashMap<String, (ServiceName, InstanceId)>,
    /// Containers seen with the label (registered or not).
    labelled: HashSet<String>,
    /// Containers being stopped: kept out until they start again.
    stopping: HashSet<String>,
    /// The last reason logged for each container, so each is logged once.
    noted: HashMap<String, String>,
    /// The node every instance registered is given.
    node: Option<NodeName>,
    /// The zone an instance registered is given when its container has no `baker.zone`.
    zone: Option<Zone>,
}

impl Tracker {
    /// Logs `text` about `container` unless it was the last thing logged about it; true when
    /// it logged.
    fn note(&mut self, container: &str, level: tracing::Level, text: String) -> bool {
        if self.noted.get(container) == Some(&text) {
            return false;
        }
        if level == tracing::Level::WARN {
            tracing::warn!("{text}");
        } else {
            tracing::info!("{text}");
        }
        self.noted.insert(container.to_owned(), text);
        true
    }

    /// Gives a container's instance this engine's node, and its zone unless a label gave one.
    fn place(&self, spec: &mut ValidSpec) {
        spec.node = self.node.clone();
        if spec.zone.is_none() {
            spec.zone = self.zone.clone();
        }
    }

    fn forget(&mut self, container: &str) {
        self.labelled.remove(container);
        self.stopping.remove(container);
        self.noted.remove(container);
    }

    /// Takes a container's instance out of the registry, if it has one.
    fn deregister(&mut self, registry: &Registry, container: &str, cause: RemoveCause) {
        if let Some((service, id)) = self.registered.remove(container) {
            registry.remove(&service, &id, cause);
        }
    }

    /// Makes the registry's Docker instances follow a full listing (container id, verdict), as
    /// after connecting; returns how many are registered. A container's note is logged again
    /// only if it changed since the last listing.
    fn resync(&mut self, registry: &Registry, listed: Vec<(String, Verdict)>) -> usize {
        let mut desired = Vec::new();
        let mut registered = HashMap::new();
        let mut seen = HashSet::new();
        for (cid, verdict) in listed {
            seen.insert(cid.clone());
            match verdict {
                Verdict::Register {
                    service,
                    id,
                    mut spec,
                } if !self.stopping.contains(&cid) => {
                    self.labelled.insert(cid.clone());
                    self.noted.remove(&cid);
                    registered.insert(cid, (service.clone(), id.clone()));
                    self.place(&mut spec);
                    desired.push((service, id, spec));
                }
                Verdict::Register { .. } => {}
                other => self.apply(registry, &cid, other),
            }
        }
        self.labelled.retain(|c| seen.contains(c));
        self.stopping.retain(|c| seen.contains(c));
        self.noted.retain(|c, _| seen.contains(c));
        self.registered = registered;
        let count = desired.len();
        registry.sync_source(desired);
        count
    }

    /// Follows one container's verdict: registers it, or takes it out.
    fn apply(&mut self, registry: &Registry, container: &str, verdict: Verdict) {
        match verdict {
            Verdict::Unlabelled => {
                self.deregister(registry, container, RemoveCause::DockerLeftOut);
                self.forget(container);
            }
            Verdict::Register {
                service,
                id,
                mut spec,
            } => {
                self.place(&mut spec);
                self.labelled.insert(container.to_owned());
                if self.stopping.contains(container) {
                    return;
                }
                if let Some(old) = self.registered.get(container) {
                    if *old != (service.clone(), id.clone()) {
                        self.deregister(registry, container, RemoveCause::DockerLeftOut);
                    }
                }
                self.noted.remove(container);
                // Docker takes over any other source's instance; only a quota refuses it, which
                // the registry logs. The container is registered at its next event, or at the
                // next resync, once there is room.
                if registry.upsert(&service, &id, spec).is_ok() {
                    self.registered.insert(container.to_owned(), (service, id));
                }
            }
            Verdict::Absent { id, reason } => {
                self.labelled.insert(container.to_owned());
                self.deregister(registry, container, RemoveCause::DockerUnhealthy);
                self.note(
                    container,
                    tracing::Level::INFO,
                    format!("container {id} is not registered: {reason}"),
                );
            }
            Verdict::OffNetwork { id, reason } => {
                self.labelled.insert(container.to_owned());
                self.deregister(registry, container, RemoveCause::DockerLeftOut);
                self.note(
                    container,
                    tracing::Level::WARN,
                    format!("container {id} is left out: {reason}"),
                );
            }
            Verdict::Invalid { id, message } => {
                self.labelled.insert(container.to_owned());
                self.deregister(registry, container, RemoveCause::DockerLeftOut);
                self.note(
                    container,
                    tracing::Level::WARN,
                    format!("container {id} has bad labels and is left out: {message}"),
                );
            }
        }
    }
}

/// Why a discovery session ended (it reconnects after each).
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("cannot reach the Docker engine")]
    Connect(#[source] DockerError),
    #[error("the Docker engine answered with an error")]
    Api(#[source] DockerError),
    #[error("the Docker events stream failed")]
    Stream(#[source] DockerError),
    #[error("the Docker engine closed the events stream")]
    StreamEnded,
}

/// What to tell the user to do about a failed session, when the failure has a known fix.
fn advice(err: &SessionError) -> Option<&'static str> {
    match err {
        SessionError::Connect(e) if permission_denied(e) => Some(
            "permission denied on the Docker socket: the directory's user may not use it; run \
             the directory in the socket's group (docker run --group-add \
             \"$(stat -c %g /var/run/docker.sock)\" ...) or as root (--user root)",
        ),
        _ => None,
    }
}

/// Whether an error, or any of its causes, is an I/O error of kind `PermissionDenied` (a
/// refused connection to the socket shows as `client error (Connect)` with it as its cause).
pub fn permission_denied(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(err);
    while let Some(e) = next {
        // bollard's `IOError` is transparent: it shows its I/O error's causes, not the error.
        let io = e
            .downcast_ref::<std::io::Error>()
            .or(match e.downcast_ref() {
                Some(DockerError::IOError { err }) => Some(err),
                _ => None,
            });
        if io.is_some_and(|io| io.kind() == std::io::ErrorKind::PermissionDenied) {
            return true;
        }
        next = e.source();
    }
    false
}

/// Follows the Docker engine until `shutdown`, keeping the registry's Docker-sourced instances
/// equal to the labelled containers that count; reconnects and resyncs after any failure.
/// Instances get the node `node` (`BAKER_NODE`), or when it is `None`, [`default_node`]; and
/// the zone `zone` (`BAKER_ZONE`) unless their `baker.zone` label names one.
pub async fn run(
    registry: Registry,
    network: Option<String>,
    node: Option<NodeName>,
    zone: Option<Zone>,
    shutdown: CancellationToken,
) {
    let mut backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(10));
    let mut tracker = Tracker {
        zone,
        ..Tracker::default()
    };
    let mut failures = 0u32;
    loop {
        let result = session(
            &registry,
            network.as_deref(),
            node.as_ref(),
            &mut tracker,
            &shutdown,
            || {
                backoff.reset();
                failures = 0;
            },
        )
        .await;
        let err = match result {
            Ok(()) => return,
            Err(e) => e,
        };
        failures += 1;
        let delay = backoff.next_delay();
        let cause = chain(&err);
        if failures <= 3 || failures.is_power_of_two() {
            match advice(&err) {
                Some(advice) => tracing::warn!(
                    cause = %cause,
                    retry_in = ?delay,
                    "docker discovery: {advice}"
                ),
                None => {
                    tracing::warn!(cause = %cause, retry_in = ?delay, "docker discovery failed")
                }
            }
        } else {
            tracing::debug!(cause = %cause, retry_in = ?delay, "docker discovery failed");
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// One connection: list and sync, then follow events until an error or `shutdown`.
async fn session(
    registry: &Registry,
    network: Option<&str>,
    node: Option<&NodeName>,
    tracker: &mut Tracker,
    shutdown: &CancellationToken,
    synced: impl FnOnce(),
) -> Result<(), SessionError> {
    let docker = Docker::connect_with_defaults().map_err(SessionError::Connect)?;
    let docker = tokio::select! {
        _ = shutdown.cancelled() => return Ok(()),
        d = docker.negotiate_version() => d.map_err(SessionError::Connect)?,
    };
    tracker.node = match node {
        Some(node) => Some(node.clone()),
        None => {
            let engine = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                i = docker.info() => i.map_err(SessionError::Api)?.name,
            };
            let node = default_node(engine.as_deref(), host_name().as_deref());
            if node.is_none() {
                tracing::warn!(
                    engine = ?engine,
                    "docker discovery: neither the engine's name nor the host name is a valid \
                     node name; discovered instances carry none (set BAKER_NODE)"
                );
            }
            node
        }
    };
    // Events from one second before the listing on: nothing between the two is missed, and a
    // replayed event only makes discovery read a container again.
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs().saturating_sub(1))
        .unwrap_or_default()
        .to_string();
    let filters = HashMap::from([("type", vec!["container", "network"])]);
    let mut events = docker.events(Some(
        EventsOptionsBuilder::new()
            .since(&since)
            .filters(&filters)
            .build(),
    ));

    let label_filter = HashMap::from([("label", vec![SERVICE_LABEL])]);
    let listed = tokio::select! {
        _ = shutdown.cancelled() => return Ok(()),
        l = docker.list_containers(Some(
            ListContainersOptionsBuilder::new().all(true).filters(&label_filter).build(),
        )) => l.map_err(SessionError::Api)?,
    };
    let mut verdicts = Vec::new();
    for summary in listed {
        let Some(cid) = summary.id.filter(|id| !id.is_empty()) else {
            continue;
        };
        let c = match docker.inspect_container(&cid, None).await {
            Ok(c) => c,
            Err(DockerError::DockerResponseServerError {
                status_code: 404, ..
            }) => continue,
            Err(e) => return Err(SessionError::Api(e)),
        };
        verdicts.push((cid, verdict(&c, network)));
    }
    let labelled = verdicts.len();
    let count = tracker.resync(registry, verdicts);
    tracing::info!(
        node = tracker.node.as_ref().map_or("none", NodeName::as_str),
        "docker discovery: following engine API {}, {labelled} labelled container(s), {count} registered",
        docker.client_version(),
    );
    synced();

    loop {
        let event = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            e = events.next() => e,
        };
        let event = match event {
            None => return Err(SessionError::StreamEnded),
            Some(Err(e)) => return Err(SessionError::Stream(e)),
            Some(Ok(e)) => e,
        };
        match classify(&event, |id| tracker.labelled.contains(id)) {
            Action::Ignore => {}
            Action::Gone(cid) => {
                tracker.deregister(registry, &cid, RemoveCause::DockerStopped);
                tracker.forget(&cid);
            }
            Action::Stopping(cid) => {
                tracker.stopping.insert(cid.clone());
                tracker.deregister(registry, &cid, RemoveCause::DockerStopped);
            }
            Action::Refresh(cid) => {
                // A container that starts again (also by its restart policy) counts again.
                if matches!(event.action.as_deref(), Some("start" | "restart")) {
                    tracker.stopping.remove(&cid);
                }
                match docker.inspect_container(&cid, None).await {
                    Ok(c) => tracker.apply(registry, &cid, verdict(&c, network)),
                    Err(DockerError::DockerResponseServerError {
                        status_code: 404, ..
                    }) => {
                        tracker.deregister(registry, &cid, RemoveCause::DockerStopped);
                        tracker.forget(&cid);
                    }
                    Err(e) => return Err(SessionError::Api(e)),
                }
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use bollard::models::{
        ContainerConfig, ContainerState, EndpointSettings, EventActor, Health, NetworkSettings,
    };
    use std::error::Error as _;

    fn container(labels: &[(&str, &str)], networks: &[(&str, &str)]) -> ContainerInspectResponse {
        ContainerInspectResponse {
            id: Some("0123456789abcdef0123".parse().unwrap()),
            name: Some("/Orders_1".into()),
            config: Some(ContainerConfig {
                labels: Some(
                    labels
                        .iter()
                        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                        .collect(),
                ),
                exposed_ports: Some(vec!["8080/tcp".into()]),
                ..Default::default()
            }),
            state: Some(ContainerState {
                running: Some(true),
                paused: Some(false),
                restarting: Some(false),
                ..Default::default()
            }),
            network_settings: Some(NetworkSettings {
                networks: Some(
                    networks
                        .iter()
                        .map(|(n, ip)| {
                            (
                                (*n).to_owned(),
                                EndpointSettings {
                                    ip_address: Some((*ip).to_owned()),
                                    ..Default::default()
                                },
                            )
                        })
                        .collect(),
                ),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn with_health(
        mut c: ContainerInspectResponse,
        status: HealthStatusEnum,
    ) -> ContainerInspectResponse {
        c.state.as_mut().unwrap().health = Some(Health {
            status: Some(status),
            ..Default::default()
        });
        c
    }

    fn registered(v: Verdict) -> (ServiceName, InstanceId, ValidSpec) {
        match v {
            Verdict::Register { service, id, spec } => (service, id, spec),
            other => panic!("expected a registration, got {other:?}"),
        }
    }

    #[test]
    fn labelled_running_container_is_registered() {
        let c = container(
            &[
                ("baker.service", "orders"),
                ("baker.port", "9000"),
                ("baker.version", "2"),
                ("baker.weight", "50"),
            ],
            &[("appnet", "10.0.0.5")],
        );
        let (service, id, spec) = registered(verdict(&c, None));
        assert_eq!(
            (service.as_str(), id.as_str()),
            ("orders", "orders_1-0123456789ab")
        );
        assert_eq!(spec.address, "10.0.0.5");
        assert_eq!(
            (spec.port, spec.version.as_str(), spec.weight),
            (9000, "2", 50)
        );
    }

    #[test]
    fn defaults_come_from_the_image() {
        let c = container(&[("baker.service", "orders")], &[("bridge", "172.17.0.3")]);
        let (_, _, spec) = registered(verdict(&c, None));
        assert_eq!(
            (spec.port, spec.version.as_str(), spec.weight),
            (8080, "1", 100)
        );
        let mut two = c.clone();
        two.config.as_mut().unwrap().exposed_ports = Some(vec!["80/tcp".into(), "443/tcp".into()]);
        assert!(
            matches!(verdict(&two, None), Verdict::Invalid { message, .. } if message.contains("2 TCP ports"))
        );
    }

    #[test]
    fn the_backup_label_tags_the_instance() {
        let tags = |value: &str| {
            let c = container(
                &[("baker.service", "db"), ("baker.backup", value)],
                &[("bridge", "172.17.0.3")],
            );
            let (_, _, spec) = registered(verdict(&c, None));
            spec.tags.iter().map(|t| t.to_string()).collect::<Vec<_>>()
        };
        assert_eq!(tags("true"), ["backup"]);
        assert!(tags("false").is_empty());
        let c = container(
            &[("baker.service", "db"), ("baker.backup", "yes please")],
            &[("bridge", "172.17.0.3")],
        );
        assert!(
            matches!(verdict(&c, None), Verdict::Invalid { message, .. } if message.contains("baker.backup: must be true or false"))
        );
    }

    #[test]
    fn the_zone_label_names_the_zone() {
        let c = container(
            &[("baker.service", "db"), ("baker.zone", " eu-west-1a ")],
            &[("bridge", "172.17.0.3")],
        );
        let (_, _, spec) = registered(verdict(&c, None));
        assert_eq!(spec.zone.as_ref().map(Zone::as_str), Some("eu-west-1a"));
        let c = container(&[("baker.service", "db")], &[("bridge", "172.17.0.3")]);
        assert_eq!(registered(verdict(&c, None)).2.zone, None);
        let c = container(
            &[("baker.service", "db"), ("baker.zone", "EU West")],
            &[("bridge", "172.17.0.3")],
        );
        let Verdict::Invalid { message, .. } = verdict(&c, None) else {
            panic!("expected invalid");
        };
        assert_eq!(
            message,
            "baker.zone: must start with a lowercase letter or digit, got 'E'"
        );
    }

    #[test]
    fn unlabelled_containers_are_not_ours() {
        let c = container(&[("other", "x")], &[("bridge", "172.17.0.3")]);
        assert_eq!(verdict(&c, None), Verdict::Unlabelled);
    }

    #[test]
    fn bad_labels_are_named_all_at_once() {
        let c = container(
            &[
                ("baker.service", "Orders!"),
                ("baker.port", "http"),
                ("baker.weight", "heavy"),
            ],
            &[("bridge", "172.17.0.3")],
        );
        let Verdict::Invalid { message, .. } = verdict(&c, None) else {
            panic!("expected invalid");
        };
        for label in ["baker.service", "baker.port", "baker.weight"] {
            assert!(message.contains(label), "{message}");
        }
        let c = container(
            &[
                ("baker.service", "orders"),
                ("baker.port", "70000"),
                ("baker.version", "V 2"),
            ],
            &[("bridge", "172.17.0.3")],
        );
        let Verdict::Invalid { message, .. } = verdict(&c, None) else {
            panic!("expected invalid");
        };
        assert!(message.contains("baker.port"), "{message}");
        let c = container(
            &[
                ("baker.service", "orders"),
                ("baker.version", "V 2"),
                ("baker.weight", "300"),
            ],
            &[("bridge", "172.17.0.3")],
        );
        let Verdict::Invalid { message, .. } = verdict(&c, None) else {
            panic!("expected invalid");
        };
        assert!(
            message.contains("baker.version") && message.contains("baker.weight"),
            "{message}"
        );
    }

    #[test]
    fn only_running_healthy_containers_count() {
        let c = container(&[("baker.service", "orders")], &[("bridge", "172.17.0.3")]);
        for status in [HealthStatusEnum::STARTING, HealthStatusEnum::UNHEALTHY] {
            assert!(matches!(
                verdict(&with_health(c.clone(), status), None),
                Verdict::Absent { .. }
            ));
        }
        for status in [HealthStatusEnum::HEALTHY, HealthStatusEnum::NONE] {
            registered(verdict(&with_health(c.clone(), status), None));
        }
        let mut stopped = c.clone();
        stopped.state.as_mut().unwrap().running = Some(false);
        assert!(
            matches!(verdict(&stopped, None), Verdict::Absent { reason, .. } if reason.contains("not running"))
        );
        let mut paused = c.clone();
        paused.state.as_mut().unwrap().paused = Some(true);
        assert!(
            matches!(verdict(&paused, None), Verdict::Absent { reason, .. } if reason.contains("paused"))
        );
    }

    #[test]
    fn network_choice() {
        let two = [("front", "10.1.0.2"), ("back", "10.2.0.2")];
        let c = container(&[("baker.service", "orders")], &two);
        assert!(
            matches!(verdict(&c, None), Verdict::Invalid { message, .. } if message.contains("back, front"))
        );
        assert_eq!(
            registered(verdict(&c, Some("back"))).2.address.as_str(),
            "10.2.0.2"
        );
        let labelled = container(
            &[("baker.service", "orders"), ("baker.network", "front")],
            &two,
        );
        assert_eq!(
            registered(verdict(&labelled, Some("back")))
                .2
                .address
                .as_str(),
            "10.1.0.2"
        );
        assert!(
            matches!(verdict(&c, Some("other")), Verdict::OffNetwork { reason, .. } if reason.contains("\"other\"") && reason.contains("back, front"))
        );
        let host = container(&[("baker.service", "orders")], &[("host", "")]);
        assert!(matches!(verdict(&host, None), Verdict::Absent { .. }));
    }

    /// What Engine 20.10 says of a labelled greeting on a network created with `docker network
    /// create --ipv6 --subnet fd00:ba6e:77::/64` (`docker inspect`, trimmed to what Baker reads).
    const INSPECT_DUAL_STACK: &str = r#"{
 "Id": "8d07fe7cec86ac9a440293ea37dd149fd0479e7a0f843cb71b5a839f0c34c697",
 "Name": "/orders-1",
 "Config": {
  "Labels": {"baker.port": "8080", "baker.service": "orders"},
  "ExposedPorts": {"8080/tcp": {}}
 },
 "State": {
  "Status": "running", "Running": true, "Paused": false, "Restarting": false,
  "Health": {"Status": "healthy", "FailingStreak": 0, "Log": []}
 },
 "NetworkSettings": {
  "Networks": {
   "shop": {
    "IPAMConfig": null, "Links": null, "Aliases": ["8d07fe7cec86"],
    "NetworkID": "d65982094d38d1aa8dd747473504118fd20ebaf854a933639dd9fd5b124e20e5",
    "EndpointID": "2d3aa093ee11c4031c802b1e0bebcae0aa8c12ddd8b83449d1cb49d90f2dca35",
    "Gateway": "172.22.0.1", "IPAddress": "172.22.0.2", "IPPrefixLen": 16,
    "IPv6Gateway": "fd00:ba6e:77::1", "GlobalIPv6Address": "fd00:ba6e:77::2",
    "GlobalIPv6PrefixLen": 64, "MacAddress": "02:42:ac:16:00:02", "DriverOpts": null
   }
  }
 }
}"#;

    #[test]
    fn on_a_network_with_ipv6_the_ipv4_address_is_registered_and_else_the_ipv6_one() {
        let dual: ContainerInspectResponse = serde_json::from_str(INSPECT_DUAL_STACK).unwrap();
        let (_, id, spec) = registered(verdict(&dual, Some("shop")));
        assert_eq!(id.as_str(), "orders-1");
        assert_eq!((spec.address.as_str(), spec.port), ("172.22.0.2", 8080));
        assert_eq!(
            registered(verdict(&dual, None)).2.address.as_str(),
            "172.22.0.2"
        );

        // An IPv6-only network (`--ipv4=false`, Engine 27 and later) leaves IPAddress empty.
        let v6_only = INSPECT_DUAL_STACK.replace(
            r#""Gateway": "172.22.0.1", "IPAddress": "172.22.0.2", "IPPrefixLen": 16"#,
            r#""Gateway": "", "IPAddress": "", "IPPrefixLen": 0"#,
        );
        assert_ne!(v6_only, INSPECT_DUAL_STACK);
        let v6_only: ContainerInspectResponse = serde_json::from_str(&v6_only).unwrap();
        let spec = registered(verdict(&v6_only, Some("shop"))).2;
        assert_eq!(spec.address.as_str(), "fd00:ba6e:77::2");
        assert_eq!(spec.address.ip(), Some("fd00:ba6e:77::2".parse().unwrap()));

        // Neither yet (the container is still connecting): not registered.
        let none = INSPECT_DUAL_STACK
            .replace(r#""IPAddress": "172.22.0.2""#, r#""IPAddress": """#)
            .replace(
                r#""GlobalIPv6Address": "fd00:ba6e:77::2""#,
                r#""GlobalIPv6Address": """#,
            );
        let none: ContainerInspectResponse = serde_json::from_str(&none).unwrap();
        assert!(
            matches!(verdict(&none, Some("shop")), Verdict::Absent { reason, .. } if reason.contains("no address on network \"shop\""))
        );
    }

    #[test]
    fn instance_ids_from_names() {
        let cid = "0123456789abcdef0123";
        assert_eq!(instance_id("/web_1", cid).unwrap(), "web_1");
        assert_eq!(instance_id("/My.App", cid).unwrap(), "my.app-0123456789ab");
        assert_eq!(instance_id("", cid).unwrap(), "0123456789ab");
        assert_eq!(instance_id("/", cid).unwrap(), "0123456789ab");
        assert_eq!(instance_id("/_x", cid).unwrap(), "x-0123456789ab");
        let long = instance_id(&format!("/{}", "a".repeat(80)), cid).unwrap();
        assert_eq!(long.as_str().len(), 63);
        assert!(long.as_str().ends_with("-0123456789ab"), "{long}");
        // Every name makes an id (valid by its type).
        for name in ["/web_1", "/My.App", "/_x", "/ünï", "/-", "/ABC", ""] {
            instance_id(name, cid).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
    }

    #[test]
    fn instance_ids_are_unique_per_container_and_stable() {
        let long = "b".repeat(63);
        // Names Docker tells apart, that lower-casing or cutting at 63 characters would merge.
        let pairs = [
            (("/adv-Web", "aaaa00000000"), ("/adv-web", "bbbb00000000")),
            (("/ADV-WEB", "aaaa00000000"), ("/adv-Web", "bbbb00000000")),
            (
                (&*format!("/{long}x"), "aaaa00000000"),
                (&*format!("/{long}y"), "bbbb00000000"),
            ),
            (
                (&*format!("/{long}"), "aaaa00000000"),
                (&*format!("/{long}z"), "bbbb00000000"),
            ),
        ];
        for ((n1, c1), (n2, c2)) in pairs {
            let (a, b) = (instance_id(n1, c1).unwrap(), instance_id(n2, c2).unwrap());
            assert_ne!(a, b, "{n1} and {n2}");
            assert_eq!(instance_id(n1, c1).unwrap(), a, "stable");
        }
    }

    #[test]
    fn containers_without_a_usable_id_are_refused_not_panicked_on() {
        assert!(instance_id("", "").is_err());
        assert!(instance_id("/Web", "").is_err());
        assert!(instance_id("/", "---").is_err());
        let mut c = container(&[("baker.service", "orders")], &[("bridge", "172.17.0.3")]);
        c.id = Some(String::new());
        c.name = Some(String::new());
        assert!(
            matches!(verdict(&c, None), Verdict::Invalid { message, .. } if message.contains("no usable id"))
        );
        c.id = None;
        c.name = None;
        assert!(matches!(verdict(&c, None), Verdict::Invalid { .. }));
        // A valid name needs no container id.
        c.name = Some("/orders".into());
        assert_eq!(registered(verdict(&c, None)).1, "orders");
    }

    /// What `f` logs, as text.
    fn logs(f: impl FnOnce()) -> String {
        #[derive(Clone, Default)]
        struct Sink(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
        impl std::io::Write for Sink {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let sink = Sink::default();
        let writer = sink.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, f);
        let bytes = sink.0.lock().unwrap().clone();
        String::from_utf8(bytes).unwrap()
    }

    fn test_registry() -> (Registry, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::routes::RouteStore::open(dir.path()).unwrap();
        let metrics = std::sync::Arc::new(crate::metrics::Metrics::new());
        (Registry::new(store, Default::default(), metrics, 64), dir)
    }

    #[test]
    fn a_container_on_another_network_is_warned_about_once() {
        let (registry, _dir) = test_registry();
        let c = container(
            &[("baker.service", "orders")],
            &[("shop_default", "10.9.0.2")],
        );
        let mut tracker = Tracker::default();
        let text = logs(|| {
            // Listed at every resync, and read again at each of its events.
            for _ in 0..3 {
                tracker.resync(&registry, vec![("c1".into(), verdict(&c, Some("baker")))]);
                tracker.apply(&registry, "c1", verdict(&c, Some("baker")));
            }
        });
        assert_eq!(text.matches(" WARN ").count(), 1, "{text}");
        assert!(
            text.contains("container orders_1-0123456789ab is left out: it is not on network \"baker\" (BAKER_DOCKER_NETWORK) but on shop_default"),
            "{text}"
        );
        assert!(registry.services().services.is_empty());
        // Once it is on the network it is registered; leaving it again warns again.
        let mut joined = c.clone();
        joined.network_settings = container(&[], &[("baker", "10.1.0.2")]).network_settings;
        let text = logs(|| {
            tracker.apply(&registry, "c1", verdict(&joined, Some("baker")));
            tracker.apply(&registry, "c1", verdict(&c, Some("baker")));
        });
        assert_eq!(text.matches(" WARN ").count(), 1, "{text}");
    }

    #[test]
    fn the_node_is_the_engines_name_else_the_host_name() {
        let node = |engine, host| default_node(engine, host).map(|n| n.to_string());
        assert_eq!(node(Some("Host-A"), Some("b")).as_deref(), Some("Host-A"));
        assert_eq!(node(None, Some("b.local")).as_deref(), Some("b.local"));
        // An engine name that is not a valid node name gives way to the host name.
        assert_eq!(node(Some("bad name"), Some("b")).as_deref(), Some("b"));
        assert_eq!(node(Some(""), Some("b")).as_deref(), Some("b"));
        assert_eq!(node(Some("x;y"), Some("-b")), None);
        assert_eq!(node(None, None), None);
    }

    #[tokio::test]
    async fn discovered_instances_carry_the_node() {
        let (registry, _dir) = test_registry();
        let mut tracker = Tracker {
            node: Some("node-a".parse().unwrap()),
            ..Tracker::default()
        };
        let c = container(&[("baker.service", "orders")], &[("bridge", "172.17.0.3")]);
        let mut other = c.clone();
        other.name = Some("/orders_2".into());
        tracker.resync(&registry, vec![("c1".into(), verdict(&c, None))]);
        tracker.apply(&registry, "c2", verdict(&other, None));
        registry.reconcile_once().await.unwrap();
        let nodes: Vec<Option<String>> = registry.services().services["orders"]
            .iter()
            .map(|i| i.node.as_ref().map(ToString::to_string))
            .collect();
        assert_eq!(nodes, [Some("node-a".into()), Some("node-a".into())]);
    }

    #[tokio::test]
    async fn discovered_instances_get_the_directorys_zone_unless_labelled() {
        let (registry, _dir) = test_registry();
        let mut tracker = Tracker {
            zone: Some("zone-a".parse().unwrap()),
            ..Tracker::default()
        };
        let c = container(&[("baker.service", "orders")], &[("bridge", "172.17.0.3")]);
        let mut labelled = container(
            &[("baker.service", "orders"), ("baker.zone", "zone-b")],
            &[("bridge", "172.17.0.4")],
        );
        labelled.name = Some("/orders_2".into());
        tracker.resync(&registry, vec![("c1".into(), verdict(&c, None))]);
        tracker.apply(&registry, "c2", verdict(&labelled, None));
        registry.reconcile_once().await.unwrap();
        let zones: Vec<Option<String>> = registry.services().services["orders"]
            .iter()
            .map(|i| i.zone.as_ref().map(ToString::to_string))
            .collect();
        assert_eq!(zones, [Some("zone-a".into()), Some("zone-b".into())]);
    }

    /// The error bollard reports when connecting fails with `kind`, made the way bollard makes
    /// it: hyper's legacy client around a connector that fails.
    async fn connect_error(kind: std::io::ErrorKind) -> DockerError {
        use hyper_util::client::legacy::Client;
        use hyper_util::rt::{TokioExecutor, TokioIo};
        let connector = tower::service_fn(move |_: hyper::Uri| {
            std::future::ready(Err::<TokioIo<tokio::net::TcpStream>, _>(
                std::io::Error::from(kind),
            ))
        });
        let client = Client::builder(TokioExecutor::new())
            .build::<_, http_body_util::Empty<bytes::Bytes>>(connector);
        let err = client
            .get(hyper::Uri::from_static("http://docker/version"))
            .await
            .unwrap_err();
        DockerError::HyperLegacyError { err }
    }

    #[tokio::test]
    async fn a_refused_socket_is_told_with_what_to_run() {
        use std::io::ErrorKind::{ConnectionRefused, PermissionDenied};
        let denied = SessionError::Connect(connect_error(PermissionDenied).await);
        // What users saw before: the outer message says nothing of permissions.
        assert!(denied
            .source()
            .unwrap()
            .to_string()
            .contains("client error (Connect)"));
        let text = advice(&denied).expect("advice for a permission error");
        assert!(
            text.contains("permission denied on the Docker socket"),
            "{text}"
        );
        assert!(text.contains("--group-add"), "{text}");
        let direct = SessionError::Connect(DockerError::IOError {
            err: std::io::Error::from(PermissionDenied),
        });
        assert!(advice(&direct).is_some());
        let refused = SessionError::Connect(connect_error(ConnectionRefused).await);
        assert_eq!(advice(&refused), None);
        assert_eq!(advice(&SessionError::StreamEnded), None);
    }

    pub(crate) fn event(
        typ: EventMessageTypeEnum,
        action: &str,
        id: &str,
        attrs: &[(&str, &str)],
    ) -> EventMessage {
        EventMessage {
            typ: Some(typ),
            action: Some(action.into()),
            actor: Some(EventActor {
                id: Some(id.into()),
                attributes: Some(
                    attrs
                        .iter()
                        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                        .collect(),
                ),
            }),
            ..Default::default()
        }
    }

    #[test]
    fn events_are_classified() {
        use EventMessageTypeEnum::{CONTAINER, IMAGE, NETWORK};
        let label = [("baker.service", "orders")];
        let unknown = |_: &str| false;
        let c = |a: &str| classify(&event(CONTAINER, a, "c1", &label), unknown);
        assert_eq!(c("start"), Action::Refresh("c1".parse().unwrap()));
        assert_eq!(
            c("health_status: healthy"),
            Action::Refresh("c1".parse().unwrap())
        );
        assert_eq!(c("unpause"), Action::Refresh("c1".parse().unwrap()));
        assert_eq!(c("die"), Action::Stopping("c1".parse().unwrap()));
        assert_eq!(c("destroy"), Action::Gone("c1".parse().unwrap()));
        assert_eq!(c("exec_start: /usr/local/bin/baker-probe"), Action::Ignore);
        let kill = |sig: &str| {
            classify(
                &event(
                    CONTAINER,
                    "kill",
                    "c1",
                    &[("baker.service", "o"), ("signal", sig)],
                ),
                unknown,
            )
        };
        assert_eq!(kill("15"), Action::Stopping("c1".parse().unwrap()));
        assert_eq!(kill("1"), Action::Refresh("c1".parse().unwrap()));
        // Unlabelled containers are ignored unless discovery knows them.
        assert_eq!(
            classify(&event(CONTAINER, "start", "c2", &[]), unknown),
            Action::Ignore
        );
        assert_eq!(
            classify(&event(CONTAINER, "die", "c2", &[]), |id| id == "c2"),
            Action::Stopping("c2".parse().unwrap())
        );
        let net = event(NETWORK, "connect", "n1", &[("container", "c3")]);
        assert_eq!(
            classify(&net, unknown),
            Action::Refresh("c3".parse().unwrap())
        );
        assert_eq!(
            classify(&event(NETWORK, "create", "n1", &[]), unknown),
            Action::Ignore
        );
        assert_eq!(
            classify(&event(IMAGE, "pull", "i", &label), unknown),
            Action::Ignore
        );
    }
}
