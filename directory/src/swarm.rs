//! Swarm discovery: the running tasks of swarm services labelled `baker.service` are registered
//! without a registrar, on a manager.
//!
//! The labels are the service's own (`deploy.labels` in a stack file), the same as container
//! discovery reads ([`crate::docker`]): `baker.service`, `baker.port`, `baker.version`,
//! `baker.weight`, `baker.network`, `baker.backup`, `baker.zone`. Each task whose desired state is `running`
//! and whose state is `running` is an instance: its address on the overlay network it shares
//! with the ambassadors ([`task_address`]), `node` the host name of the node that runs it, and an
//! id naming the task ([`task_instance_id`]): `<service>.<slot>` for a replicated service,
//! `<service>.<node>` for a global one. Its zone is the service's `baker.zone` label, else the
//! `baker.zone` label of the node that runs it (`docker node update --label-add
//! baker.zone=eu-1a NODE`), else none; the nodes are read again whenever one changes.
//!
//! The Engine API has no task events, so discovery lists services and tasks every
//! `BAKER_SWARM_POLL` (500 ms by default), and at once on the events the engine does send:
//! service and node events (then every 100 ms for a second, as swarm changes the tasks a moment
//! after), and the events of this node's task containers (a task container
//! sent a stop signal, dying or turning unhealthy leaves the table at that event, before the
//! container has stopped). A task whose desired state is no longer `running` is not listed
//! (the listing asks for `desired-state=running` only), so it leaves at the next listing, and
//! swarm sends the stop signal only after it set that state. Swarm reports a task with a
//! HEALTHCHECK `running` only once it is healthy, and fails it when it turns unhealthy.
//!
//! [`listing`] (services, tasks, nodes → instances) and [`classify`] (event → what to do) are
//! pure; [`run`] is the I/O around them. The task list is read over the raw API
//! ([`engine::Engine`]): bollard's task model lacks the tasks' network attachments.

pub mod engine;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use baker_client::backoff::Backoff;
use baker_client::change::RemoveCause;
use baker_client::errors::chain;
use baker_client::model::{InstanceId, NodeName, ServiceName, ValidSpec, Zone, MAX_NAME_LEN};
use bollard::models::{EventMessage, EventMessageTypeEnum};
use bollard::query_parameters::{
    EventsOptionsBuilder, ListNodesOptionsBuilder, ListServicesOptionsBuilder,
};
use bollard::Docker;
use futures_util::{FutureExt, StreamExt};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::docker::{read_labels, NETWORK_LABEL, SERVICE_LABEL, ZONE_LABEL};
use crate::registry::{Finder, Registry};

/// How often tasks are listed when no event asks for it sooner (`BAKER_SWARM_POLL`).
pub const DEFAULT_POLL: Duration = Duration::from_millis(500);

/// The label Docker gives a task's container: its task id.
pub const TASK_LABEL: &str = "com.docker.swarm.task.id";
/// The label `docker stack deploy` gives a service: its stack.
pub const STACK_LABEL: &str = "com.docker.stack.namespace";

/// A swarm service, as discovery reads it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Service {
    pub id: String,
    pub name: String,
    pub labels: HashMap<String, String>,
    /// One task per node (`mode: global`) rather than replicas in slots.
    pub global: bool,
    /// The target ports the service publishes (the default of `baker.port` when there is one).
    pub target_ports: Vec<u16>,
}

/// A swarm node, as discovery reads it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Node {
    /// Its host name, when it reports one.
    pub host: Option<String>,
    /// Its `baker.zone` label as written (checked where a task uses it), when it has one.
    pub zone: Option<String>,
}

/// One network a task is attached to, and its address there.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Attachment {
    pub network: String,
    /// Swarm's routing-mesh network (`ingress`): never a task's service address.
    pub ingress: bool,
    /// The address without its prefix length (`10.0.1.5`), when it has one.
    pub address: Option<String>,
}

/// A task, as discovery reads it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Task {
    pub id: String,
    pub service_id: String,
    pub slot: Option<u64>,
    pub node_id: String,
    pub desired_state: String,
    pub state: String,
    pub container_id: Option<String>,
    /// When the task was created (RFC 3339), to tell the newer of two tasks in one slot.
    pub created_at: String,
    pub networks: Vec<Attachment>,
}

/// What one listing of the swarm asks the registry to hold.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Listing {
    /// Every task to register, by the service and instance id it registers as.
    pub instances: BTreeMap<(ServiceName, InstanceId), Registered>,
    /// What to tell the operator about services and tasks left out, by the object it is about
    /// (a service or task id): logged once each, as a warning.
    pub notes: BTreeMap<String, String>,
}

/// A task registered, and the instance it makes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registered {
    pub task: String,
    pub spec: ValidSpec,
}

/// Why a running task is not routed, though swarm lists it as wanted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Excluded {
    /// Its container was sent a stop signal, or died.
    Stopping,
    /// Its container's HEALTHCHECK reports it unhealthy.
    Unhealthy,
}

/// The instance id of a task: `<service>.<slot>` for a replicated service's task,
/// `<service>.<node>` for a global one's (`node` is the node's host name), both lower-cased
/// with any character outside `a-z0-9._-` made `-`, the service name cut to fit 63
/// characters. The id stays the same when swarm replaces the task in its slot (a rolling
/// update, a restart), so a drain or a dashboard row follows the slot.
pub fn task_instance_id(
    service: &str,
    slot: Option<u64>,
    node: &str,
) -> Result<InstanceId, String> {
    let clean = |s: &str| -> String {
        s.chars()
            .map(|c| match c.to_ascii_lowercase() {
                c @ ('a'..='z' | '0'..='9' | '.' | '_' | '-') => c,
                _ => '-',
            })
            .skip_while(|c| !c.is_ascii_alphanumeric())
            .collect()
    };
    let place = match slot {
        Some(slot) => slot.to_string(),
        None => clean(node).chars().take(MAX_NAME_LEN / 2).collect(),
    };
    if place.is_empty() {
        return Err(format!(
            "the task of service {service:?} has neither a slot nor a node name"
        ));
    }
    let room = MAX_NAME_LEN.saturating_sub(place.len() + 1);
    let base: String = clean(service).chars().take(room).collect();
    if base.is_empty() {
        return Err(format!("service name {service:?} makes no instance id"));
    }
    format!("{base}.{place}")
        .parse()
        .map_err(|e: baker_client::model::ValidationError| e.to_string())
}

/// A task's address: on the network named by the service's `baker.network` label, else by
/// `BAKER_DOCKER_NETWORK` (`default_network`), else on its only network other than swarm's
/// `ingress`. A name also matches the network of that name in the service's stack
/// (`<stack>_<name>`, as `docker stack deploy` names the networks it creates).
pub fn task_address(
    task: &Task,
    label: Option<&str>,
    default_network: Option<&str>,
    stack: Option<&str>,
) -> Result<String, String> {
    let candidates: Vec<&Attachment> = task.networks.iter().filter(|a| !a.ingress).collect();
    let on: Vec<&str> = candidates.iter().map(|a| a.network.as_str()).collect();
    let label = label.map(str::trim).filter(|n| !n.is_empty());
    if let Some(name) = label.or(default_network) {
        let in_stack = stack.map(|s| format!("{s}_{name}"));
        let source = if label.is_some() {
            format!("label {NETWORK_LABEL}")
        } else {
            "BAKER_DOCKER_NETWORK".to_owned()
        };
        let found = candidates.iter().find(|a| a.network == name).or_else(|| {
            candidates
                .iter()
                .find(|a| Some(&a.network) == in_stack.as_ref())
        });
        return match found {
            Some(a) => a
                .address
                .clone()
                .ok_or_else(|| format!("it has no address on network {:?} yet", a.network)),
            None => Err(format!(
                "it is not on network {name:?} ({source}) but on {}: add the network to the \
                 service or label it {NETWORK_LABEL}=<network>",
                if on.is_empty() {
                    "none".to_owned()
                } else {
                    on.join(", ")
                }
            )),
        };
    }
    match candidates.as_slice() {
        [] => Err(
            "it is on no network but ingress: add an overlay network the ambassadors are \
                   on to the service"
                .to_owned(),
        ),
        [one] => one
            .address
            .clone()
            .ok_or_else(|| format!("it has no address on network {:?} yet", one.network)),
        _ => Err(format!(
            "it is on several networks ({}) and the choice is ambiguous: label the service \
             {NETWORK_LABEL}=<the network the ambassadors are on> (or set BAKER_DOCKER_NETWORK)",
            on.join(", ")
        )),
    }
}

/// What the registry should hold for this listing of the swarm: every running task of a
/// labelled service, not `excluded`, with an address on the chosen network. `nodes` maps node
/// ids to their host names and zone labels. When two running tasks share an id (a `start-first` update
/// replacing a slot), the newer one is registered.
pub fn listing(
    services: &[Service],
    tasks: &[Task],
    nodes: &HashMap<String, Node>,
    default_network: Option<&str>,
    excluded: impl Fn(&str) -> Option<Excluded>,
) -> Listing {
    let mut out = Listing::default();
    let mut created: HashMap<(ServiceName, InstanceId), String> = HashMap::new();
    let by_id: HashMap<&str, &Service> = services.iter().map(|s| (s.id.as_str(), s)).collect();
    let mut labelled = HashMap::new();
    for s in services {
        if !s.labels.contains_key(SERVICE_LABEL) {
            continue;
        }
        let default_port = || match s.target_ports.as_slice() {
            [port] => Ok(*port),
            _ => Err(format!(
                "baker.port: missing, and the service publishes {} ports to default to: say \
                 which port its tasks serve on",
                if s.target_ports.is_empty() {
                    "no".to_owned()
                } else {
                    s.target_ports.len().to_string()
                }
            )),
        };
        match read_labels(&s.labels, default_port) {
            Ok(l) => {
                labelled.insert(s.id.as_str(), l);
            }
            Err(message) => {
                out.notes.insert(
                    s.id.clone(),
                    format!(
                        "swarm service {} has bad labels and is left out: {message}",
                        s.name
                    ),
                );
            }
        }
    }
    for task in tasks {
        if task.desired_state != "running" || task.state != "running" {
            continue;
        }
        let (Some(service), Some(labels)) = (
            by_id.get(task.service_id.as_str()),
            labelled.get(task.service_id.as_str()),
        ) else {
            continue;
        };
        if task
            .container_id
            .as_deref()
            .is_some_and(|c| excluded(c).is_some())
        {
            continue;
        }
        let node = nodes.get(&task.node_id).and_then(|n| n.host.as_deref());
        let slot = if service.global { None } else { task.slot };
        let id = match task_instance_id(&service.name, slot, node.unwrap_or(&task.node_id)) {
            Ok(id) => id,
            Err(message) => {
                out.notes.insert(
                    task.id.clone(),
                    format!("task {} is left out: {message}", task.id),
                );
                continue;
            }
        };
        let address = match task_address(
            task,
            service.labels.get(NETWORK_LABEL).map(String::as_str),
            default_network,
            service.labels.get(STACK_LABEL).map(String::as_str),
        ) {
            Ok(a) => a,
            Err(reason) => {
                out.notes.insert(
                    format!("{}/network", service.id),
                    format!(
                        "the tasks of swarm service {} are left out: {reason}",
                        service.name
                    ),
                );
                continue;
            }
        };
        let mut spec = match labels.spec(address) {
            Ok(spec) => spec,
            Err(message) => {
                out.notes.insert(
                    service.id.clone(),
                    format!(
                        "swarm service {} has bad labels and is left out: {message}",
                        service.name
                    ),
                );
                continue;
            }
        };
        spec.node = node
            .or(Some(task.node_id.as_str()))
            .and_then(|n| n.parse::<NodeName>().ok());
        if spec.zone.is_none() {
            spec.zone = node_zone(nodes, &task.node_id, &mut out.notes);
        }
        let key = (labels.service.clone(), id);
        if let Some(other) = created.get(&key) {
            // The older task of a slot being replaced: the newer one serves from now on.
            if (other.as_str(), out.instances[&key].task.as_str())
                > (task.created_at.as_str(), task.id.as_str())
            {
                continue;
            }
        }
        created.insert(key.clone(), task.created_at.clone());
        out.instances.insert(
            key,
            Registered {
                task: task.id.clone(),
                spec,
            },
        );
    }
    out
}

/// The zone the `baker.zone` label of node `id` names, if it has a valid one; a bad one is
/// noted (its tasks are registered without a zone: the label belongs to the node, not to the
/// services it runs).
fn node_zone(
    nodes: &HashMap<String, Node>,
    id: &str,
    notes: &mut BTreeMap<String, String>,
) -> Option<Zone> {
    let node = nodes.get(id)?;
    let label = node.zone.as_deref()?;
    match label.trim().parse::<Zone>() {
        Ok(zone) => Some(zone),
        Err(e) => {
            notes.insert(
                format!("node/{id}/zone"),
                format!(
                    "swarm node {} has a bad {ZONE_LABEL} label, so its tasks carry no zone: {}",
                    node.host.as_deref().unwrap_or(id),
                    e.message
                ),
            );
            None
        }
    }
}

/// What an engine event asks of swarm discovery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Nothing.
    Ignore,
    /// List the swarm again now (a service or node changed, a task container started).
    Poll,
    /// The node list changed: read it again, then list.
    Nodes,
    /// This task container is being stopped or died: out now, then list.
    Exclude(String, Excluded),
    /// This task container is healthy again: list.
    Healthy(String),
}

/// Signals after which a container is going away (TERM, KILL, INT, QUIT).
const STOP_SIGNALS: [&str; 8] = [
    "15", "9", "2", "3", "SIGTERM", "SIGKILL", "SIGINT", "SIGQUIT",
];

/// Decides what one engine event means to swarm discovery.
pub fn classify(event: &EventMessage) -> Action {
    let action = event.action.as_deref().unwrap_or_default();
    let empty = HashMap::new();
    let actor = event.actor.as_ref();
    let attributes = actor.and_then(|a| a.attributes.as_ref()).unwrap_or(&empty);
    match event.typ {
        Some(EventMessageTypeEnum::SERVICE) => Action::Poll,
        Some(EventMessageTypeEnum::NODE) => Action::Nodes,
        Some(EventMessageTypeEnum::CONTAINER) if attributes.contains_key(TASK_LABEL) => {
            let Some(id) = actor.and_then(|a| a.id.clone()).filter(|id| !id.is_empty()) else {
                return Action::Ignore;
            };
            match action {
                "kill" => match attributes.get("signal") {
                    Some(s) if STOP_SIGNALS.contains(&s.as_str()) => {
                        Action::Exclude(id, Excluded::Stopping)
                    }
                    _ => Action::Ignore,
                },
                "stop" | "die" | "oom" | "destroy" => Action::Exclude(id, Excluded::Stopping),
                "health_status: unhealthy" => Action::Exclude(id, Excluded::Unhealthy),
                "health_status: healthy" => Action::Healthy(id),
                "start" => Action::Poll,
                _ => Action::Ignore,
            }
        }
        _ => Action::Ignore,
    }
}

/// What swarm discovery remembers between listings.
#[derive(Debug, Default)]
struct Tracker {
    /// What is registered, with the task each came from.
    registered: HashMap<(ServiceName, InstanceId), Registered>,
    /// Task containers seen stopping or unhealthy on this node.
    excluded: HashMap<String, Excluded>,
    /// The last note logged about each object, so each is logged once.
    noted: HashMap<String, String>,
}

impl Tracker {
    /// Makes the registry's swarm instances follow `listing`: registers what is new or
    /// changed, removes what is gone. Returns how many are registered.
    fn follow(&mut self, registry: &Registry, listing: Listing) -> usize {
        let gone: Vec<_> = self
            .registered
            .keys()
            .filter(|k| !listing.instances.contains_key(*k))
            .cloned()
            .collect();
        for key in gone {
            if let Some(was) = self.registered.remove(&key) {
                tracing::info!(service = %key.0, id = %key.1, task = %was.task, "swarm task left");
                registry.remove(&key.0, &key.1, RemoveCause::DockerStopped);
            }
        }
        for (key, registered) in listing.instances {
            if self.registered.get(&key) == Some(&registered) {
                continue;
            }
            let (service, id) = &key;
            match registry.upsert_from(Finder::Swarm, service, id, registered.spec.clone()) {
                Ok(_) => {
                    tracing::info!(%service, %id, task = %registered.task, "swarm task found");
                    self.registered.insert(key, registered);
                }
                // A quota (logged by the registry) or an API registration of the same id:
                // tried again at the next listing.
                Err(e) => tracing::debug!(%service, %id, cause = %e, "swarm task not registered"),
            }
        }
        self.noted.retain(|k, _| listing.notes.contains_key(k));
        for (object, text) in listing.notes {
            if self.noted.get(&object) != Some(&text) {
                tracing::warn!("{text}");
                self.noted.insert(object, text);
            }
        }
        self.registered.len()
    }

    /// Removes every swarm instance (the engine is no manager, or left the swarm).
    fn clear(&mut self, registry: &Registry) {
        for (key, _) in self.registered.drain() {
            registry.remove(&key.0, &key.1, RemoveCause::DockerResync);
        }
        self.excluded.clear();
    }
}

/// Why a swarm discovery session ended (it reconnects after each).
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("cannot reach the Docker engine")]
    Connect(#[source] bollard::errors::Error),
    #[error("the Docker engine answered with an error")]
    Api(#[source] bollard::errors::Error),
    #[error("cannot list the swarm's tasks")]
    Tasks(#[source] engine::EngineError),
    #[error("the Docker events stream failed")]
    Stream(#[source] bollard::errors::Error),
    #[error("the Docker engine closed the events stream")]
    StreamEnded,
}

/// How swarm discovery runs.
#[derive(Debug, Clone)]
pub struct Settings {
    /// `BAKER_DOCKER_NETWORK`: the network whose address a task is registered with, unless
    /// its service's `baker.network` label names another.
    pub network: Option<String>,
    /// `BAKER_SWARM_POLL`: how often tasks are listed without an event asking for it.
    pub poll: Duration,
    /// `BAKER_DOCKER=swarm`: an engine that is no swarm manager is worth a warning.
    pub required: bool,
}

/// After a service or node event, the directory lists the tasks again this often, so many
/// times (a second in all), then at `BAKER_SWARM_POLL` again: the orchestrator sets the
/// tasks' desired state only after the event.
const FOLLOW_UP: Duration = Duration::from_millis(100);
const FOLLOW_UPS: u32 = 10;

/// How long to wait before asking an engine that is no swarm manager again.
const NOT_A_MANAGER_RECHECK: Duration = Duration::from_secs(5);

/// Follows the swarm until `shutdown`, keeping the registry's swarm instances equal to the
/// running tasks of labelled services; reconnects after any failure. While the engine is no
/// swarm manager it registers nothing and asks again every few seconds.
pub async fn run(registry: Registry, settings: Settings, shutdown: CancellationToken) {
    let mut backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(10));
    let mut tracker = Tracker::default();
    let mut failures = 0u32;
    let mut warned_not_manager = false;
    loop {
        let result = session(
            &registry,
            &settings,
            &mut tracker,
            &shutdown,
            &mut warned_not_manager,
            || {
                backoff.reset();
                failures = 0;
            },
        )
        .await;
        let delay = match result {
            Ok(true) => return,
            Ok(false) => NOT_A_MANAGER_RECHECK,
            Err(err) => {
                failures += 1;
                let delay = backoff.next_delay();
                if failures <= 3 || failures.is_power_of_two() {
                    tracing::warn!(cause = %chain(&err), retry_in = ?delay, "swarm discovery failed");
                }
                delay
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// One connection: follows the swarm until an error or `shutdown` (`Ok(true)`), or returns
/// `Ok(false)` when the engine is no swarm manager.
async fn session(
    registry: &Registry,
    settings: &Settings,
    tracker: &mut Tracker,
    shutdown: &CancellationToken,
    warned_not_manager: &mut bool,
    synced: impl FnOnce(),
) -> Result<bool, SessionError> {
    let docker = Docker::connect_with_defaults().map_err(SessionError::Connect)?;
    let docker = tokio::select! {
        _ = shutdown.cancelled() => return Ok(true),
        d = docker.negotiate_version() => d.map_err(SessionError::Connect)?,
    };
    let info = tokio::select! {
        _ = shutdown.cancelled() => return Ok(true),
        i = docker.info() => i.map_err(SessionError::Api)?,
    };
    let manager = info
        .swarm
        .as_ref()
        .and_then(|s| s.control_available)
        .unwrap_or(false);
    if !manager {
        tracker.clear(registry);
        if settings.required && !*warned_not_manager {
            tracing::warn!(
                "swarm discovery: this engine is no swarm manager (docker swarm init, or run \
                 the directory on a manager: placement constraint node.role == manager); \
                 asking again every {NOT_A_MANAGER_RECHECK:?}"
            );
        }
        *warned_not_manager = true;
        return Ok(false);
    }
    *warned_not_manager = false;
    let engine = engine::Engine::from_env(&docker.client_version().to_string())
        .map_err(SessionError::Tasks)?;
    let filters = HashMap::from([("type", vec!["service", "node", "container"])]);
    let mut events = docker.events(Some(EventsOptionsBuilder::new().filters(&filters).build()));
    let mut nodes = read_nodes(&docker).await?;
    let started = Instant::now();
    let count = poll(&docker, &engine, registry, settings, tracker, &nodes).await?;
    tracing::info!(
        poll = ?settings.poll,
        "swarm discovery: following the swarm (engine API {}), {count} task(s) registered in {:?}",
        docker.client_version(),
        started.elapsed()
    );
    synced();
    let mut next = Instant::now() + settings.poll;
    // Listings left to make at `FOLLOW_UP` intervals: swarm changes its tasks' desired state
    // a moment after the service or node event that causes it.
    let mut follow_ups = 0u32;
    loop {
        let mut nodes_changed = false;
        // Whether to list now: at the deadline, or on an event that can matter (a task
        // container's health checks alone send several events a second that do not).
        let mut list = false;
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(true),
            _ = tokio::time::sleep_until(next) => list = true,
            e = events.next() => {
                // Take every event already there, then list once.
                let mut batch = vec![e];
                while let Some(e) = events.next().now_or_never() {
                    batch.push(e);
                }
                for e in batch {
                    let event = match e {
                        None => return Err(SessionError::StreamEnded),
                        Some(Err(e)) => return Err(SessionError::Stream(e)),
                        Some(Ok(e)) => e,
                    };
                    let action = classify(&event);
                    list |= action != Action::Ignore;
                    if matches!(action, Action::Poll | Action::Nodes) {
                        follow_ups = FOLLOW_UPS;
                    }
                    match action {
                        Action::Ignore | Action::Poll => {}
                        Action::Nodes => nodes_changed = true,
                        Action::Exclude(cid, why) => {
                            tracker.excluded.insert(cid, why);
                        }
                        Action::Healthy(cid) => {
                            if tracker.excluded.get(&cid) == Some(&Excluded::Unhealthy) {
                                tracker.excluded.remove(&cid);
                            }
                        }
                    }
                }
            }
        }
        if !list {
            continue;
        }
        if nodes_changed {
            nodes = read_nodes(&docker).await?;
        }
        poll(&docker, &engine, registry, settings, tracker, &nodes).await?;
        next = Instant::now()
            + if follow_ups > 0 {
                follow_ups -= 1;
                FOLLOW_UP.min(settings.poll)
            } else {
                settings.poll
            };
    }
}

/// Node ids → host names and zone labels.
async fn read_nodes(docker: &Docker) -> Result<HashMap<String, Node>, SessionError> {
    let nodes = docker
        .list_nodes(Some(ListNodesOptionsBuilder::new().build()))
        .await
        .map_err(SessionError::Api)?;
    Ok(nodes
        .into_iter()
        .filter_map(|n| {
            let node = Node {
                host: n.description.and_then(|d| d.hostname),
                zone: n
                    .spec
                    .and_then(|s| s.labels)
                    .and_then(|mut l| l.remove(ZONE_LABEL)),
            };
            Some((n.id?, node))
        })
        .collect())
}

/// Lists the labelled services and their tasks, and makes the registry follow them; returns
/// how many tasks are registered.
async fn poll(
    docker: &Docker,
    engine: &engine::Engine,
    registry: &Registry,
    settings: &Settings,
    tracker: &mut Tracker,
    nodes: &HashMap<String, Node>,
) -> Result<usize, SessionError> {
    let label_filter = HashMap::from([("label", vec![SERVICE_LABEL])]);
    let services: Vec<Service> = docker
        .list_services(Some(
            ListServicesOptionsBuilder::new()
                .filters(&label_filter)
                .build(),
        ))
        .await
        .map_err(SessionError::Api)?
        .into_iter()
        .filter_map(service_of)
        .collect();
    let tasks = if services.is_empty() {
        Vec::new()
    } else {
        let ids: Vec<&str> = services.iter().map(|s| s.id.as_str()).collect();
        engine
            .running_tasks(&ids)
            .await
            .map_err(SessionError::Tasks)?
    };
    // A container id is never reused: forget those whose task is no longer listed.
    let live: HashSet<&str> = tasks
        .iter()
        .filter_map(|t| t.container_id.as_deref())
        .collect();
    tracker.excluded.retain(|c, _| live.contains(c.as_str()));
    let listing = listing(&services, &tasks, nodes, settings.network.as_deref(), |c| {
        tracker.excluded.get(c).copied()
    });
    Ok(tracker.follow(registry, listing))
}

/// A service as bollard reads it, as discovery needs it.
fn service_of(s: bollard::models::Service) -> Option<Service> {
    let spec = s.spec?;
    Some(Service {
        id: s.id?,
        name: spec.name.unwrap_or_default(),
        labels: spec.labels.unwrap_or_default(),
        global: spec.mode.is_some_and(|m| m.global.is_some()),
        target_ports: s
            .endpoint
            .and_then(|e| e.spec)
            .and_then(|e| e.ports)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|p| p.target_port.and_then(|p| u16::try_from(p).ok()))
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(id: &str, name: &str, labels: &[(&str, &str)]) -> Service {
        Service {
            id: id.into(),
            name: name.into(),
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            ..Service::default()
        }
    }

    fn task(id: &str, service: &str, slot: u64, networks: &[(&str, &str)]) -> Task {
        Task {
            id: id.into(),
            service_id: service.into(),
            slot: Some(slot),
            node_id: "n1".into(),
            desired_state: "running".into(),
            state: "running".into(),
            container_id: Some(format!("c-{id}")),
            created_at: "2026-01-01T00:00:00.000000001Z".into(),
            networks: networks
                .iter()
                .map(|(n, a)| Attachment {
                    network: (*n).into(),
                    ingress: *n == "ingress",
                    address: Some((*a).into()),
                })
                .collect(),
        }
    }

    fn nodes() -> HashMap<String, Node> {
        HashMap::from([(
            "n1".to_owned(),
            Node {
                host: Some("host-a".to_owned()),
                zone: None,
            },
        )])
    }

    fn ids(l: &Listing) -> Vec<String> {
        l.instances
            .keys()
            .map(|(s, i)| format!("{s}/{i}"))
            .collect()
    }

    #[test]
    fn running_tasks_of_labelled_services_are_instances() {
        let s = service(
            "s1",
            "shop_greeting",
            &[
                ("baker.service", "greeting"),
                ("baker.port", "8080"),
                ("baker.version", "2"),
                ("baker.weight", "50"),
                ("baker.backup", "true"),
            ],
        );
        let unlabelled = service("s2", "other", &[]);
        let tasks = [
            task(
                "t1",
                "s1",
                1,
                &[("ingress", "10.0.0.5"), ("baker", "10.0.1.5")],
            ),
            task("t2", "s1", 2, &[("baker", "10.0.1.6")]),
            task("t3", "s2", 1, &[("baker", "10.0.1.7")]),
        ];
        let l = listing(&[s, unlabelled], &tasks, &nodes(), None, |_| None);
        assert_eq!(
            ids(&l),
            ["greeting/shop_greeting.1", "greeting/shop_greeting.2"]
        );
        let r = &l.instances[&(
            "greeting".parse().unwrap(),
            "shop_greeting.1".parse().unwrap(),
        )];
        assert_eq!(r.task, "t1");
        assert_eq!(r.spec.address, "10.0.1.5");
        assert_eq!(
            (r.spec.port, r.spec.version.as_str(), r.spec.weight),
            (8080, "2", 50)
        );
        assert_eq!(r.spec.tags.len(), 1);
        assert_eq!(r.spec.node.as_ref().map(NodeName::as_str), Some("host-a"));
        assert!(l.notes.is_empty(), "{:?}", l.notes);
    }

    #[test]
    fn the_zone_is_the_services_label_else_the_nodes_label() {
        let nodes = HashMap::from([
            (
                "n1".to_owned(),
                Node {
                    host: Some("host-a".to_owned()),
                    zone: Some("zone-a".to_owned()),
                },
            ),
            (
                "n2".to_owned(),
                Node {
                    host: Some("host-b".to_owned()),
                    zone: None,
                },
            ),
            (
                "n3".to_owned(),
                Node {
                    host: Some("host-c".to_owned()),
                    zone: Some("Zone C".to_owned()),
                },
            ),
        ]);
        let on = |node: &str, id: &str, service: &str, slot| Task {
            node_id: node.into(),
            ..task(id, service, slot, &[("baker", "10.0.1.5")])
        };
        let tasks = [
            on("n1", "t1", "s1", 1),
            on("n2", "t2", "s1", 2),
            on("n3", "t3", "s1", 3),
            on("n1", "t4", "s2", 1),
        ];
        let services = [
            service(
                "s1",
                "web",
                &[("baker.service", "web"), ("baker.port", "80")],
            ),
            service(
                "s2",
                "db",
                &[
                    ("baker.service", "db"),
                    ("baker.port", "5432"),
                    ("baker.zone", "zone-z"),
                ],
            ),
        ];
        let l = listing(&services, &tasks, &nodes, None, |_| None);
        let zones: Vec<(String, Option<&str>)> = l
            .instances
            .iter()
            .map(|((s, i), r)| (format!("{s}/{i}"), r.spec.zone.as_ref().map(Zone::as_str)))
            .collect();
        assert_eq!(
            zones,
            [
                ("db/db.1".to_owned(), Some("zone-z")),
                ("web/web.1".to_owned(), Some("zone-a")),
                ("web/web.2".to_owned(), None),
                ("web/web.3".to_owned(), None),
            ]
        );
        // The bad node label is told, once for the node; its task is still served.
        assert_eq!(
            l.notes.values().collect::<Vec<_>>(),
            [
                "swarm node host-c has a bad baker.zone label, so its tasks carry no zone: must \
              start with a lowercase letter or digit, got 'Z'"
            ]
        );

        // A bad service label leaves the service out, as any bad label does.
        let bad = service(
            "s3",
            "api",
            &[
                ("baker.service", "api"),
                ("baker.port", "80"),
                ("baker.zone", "a b"),
            ],
        );
        let l = listing(&[bad], &[on("n1", "t5", "s3", 1)], &nodes, None, |_| None);
        assert!(l.instances.is_empty());
        assert!(l.notes["s3"].contains("baker.zone: "), "{:?}", l.notes);
    }

    #[test]
    fn only_tasks_wanted_and_running_and_not_excluded_count() {
        let s = service(
            "s1",
            "web",
            &[("baker.service", "web"), ("baker.port", "80")],
        );
        let mut shutting = task("t1", "s1", 1, &[("net", "10.0.1.5")]);
        shutting.desired_state = "shutdown".into();
        let mut starting = task("t2", "s1", 2, &[("net", "10.0.1.6")]);
        starting.state = "starting".into();
        let stopping = task("t3", "s1", 3, &[("net", "10.0.1.7")]);
        let unhealthy = task("t4", "s1", 4, &[("net", "10.0.1.8")]);
        let fine = task("t5", "s1", 5, &[("net", "10.0.1.9")]);
        let l = listing(
            &[s],
            &[shutting, starting, stopping, unhealthy, fine],
            &nodes(),
            None,
            |c| match c {
                "c-t3" => Some(Excluded::Stopping),
                "c-t4" => Some(Excluded::Unhealthy),
                _ => None,
            },
        );
        assert_eq!(ids(&l), ["web/web.5"]);
    }

    #[test]
    fn global_tasks_are_named_after_their_node() {
        let mut s = service(
            "s1",
            "Agent",
            &[("baker.service", "agent"), ("baker.port", "80")],
        );
        s.global = true;
        let l = listing(
            &[s],
            &[task("t1", "s1", 0, &[("net", "10.0.1.5")])],
            &nodes(),
            None,
            |_| None,
        );
        assert_eq!(ids(&l), ["agent/agent.host-a"]);
        // A node without a known host name is named by its id.
        let l2 = listing(
            &[{
                let mut s = service(
                    "s1",
                    "agent",
                    &[("baker.service", "agent"), ("baker.port", "80")],
                );
                s.global = true;
                s
            }],
            &[task("t1", "s1", 0, &[("net", "10.0.1.5")])],
            &HashMap::new(),
            None,
            |_| None,
        );
        assert_eq!(ids(&l2), ["agent/agent.n1"]);
    }

    #[test]
    fn instance_ids_fit_and_are_valid() {
        assert_eq!(
            task_instance_id("shop_web", Some(3), "x").unwrap(),
            "shop_web.3"
        );
        assert_eq!(
            task_instance_id("Web", None, "Node-1.example").unwrap(),
            "web.node-1.example"
        );
        let long = task_instance_id(&"a".repeat(80), Some(12), "x").unwrap();
        assert_eq!(long.as_str().len(), 63);
        assert!(long.as_str().ends_with(".12"), "{long}");
        let long = task_instance_id(&"a".repeat(80), None, &"n".repeat(80)).unwrap();
        assert_eq!(long.as_str().len(), 63);
        assert!(task_instance_id("_", Some(1), "x").is_err());
        assert!(task_instance_id("web", None, "").is_err());
    }

    #[test]
    fn the_network_is_the_label_else_the_variable_else_the_only_overlay() {
        let t = task(
            "t1",
            "s1",
            1,
            &[
                ("ingress", "10.0.0.5"),
                ("shop_front", "10.1.0.2"),
                ("back", "10.2.0.2"),
            ],
        );
        assert_eq!(
            task_address(&t, Some("back"), None, None).unwrap(),
            "10.2.0.2"
        );
        assert_eq!(
            task_address(&t, None, Some("back"), None).unwrap(),
            "10.2.0.2"
        );
        assert_eq!(
            task_address(&t, Some("back"), Some("shop_front"), None).unwrap(),
            "10.2.0.2"
        );
        // A stack's own name for its network.
        assert_eq!(
            task_address(&t, Some("front"), None, Some("shop")).unwrap(),
            "10.1.0.2"
        );
        let err = task_address(&t, None, None, None).unwrap_err();
        assert!(
            err.contains("ambiguous")
                && err.contains("shop_front, back")
                && err.contains("baker.network"),
            "{err}"
        );
        let err = task_address(&t, Some("other"), None, None).unwrap_err();
        assert!(
            err.contains("\"other\"") && !err.contains("ingress"),
            "{err}"
        );
        let only = task(
            "t1",
            "s1",
            1,
            &[("ingress", "10.0.0.5"), ("baker", "10.0.1.5")],
        );
        assert_eq!(task_address(&only, None, None, None).unwrap(), "10.0.1.5");
        let mesh_only = task("t1", "s1", 1, &[("ingress", "10.0.0.5")]);
        assert!(task_address(&mesh_only, None, None, None)
            .unwrap_err()
            .contains("ingress"));
    }

    #[test]
    fn an_ambiguous_network_or_bad_labels_are_noted_once_per_service() {
        let s = service(
            "s1",
            "web",
            &[("baker.service", "web"), ("baker.port", "80")],
        );
        let two = [("a", "10.1.0.2"), ("b", "10.2.0.2")];
        let l = listing(
            std::slice::from_ref(&s),
            &[task("t1", "s1", 1, &two), task("t2", "s1", 2, &two)],
            &nodes(),
            None,
            |_| None,
        );
        assert!(l.instances.is_empty());
        assert_eq!(l.notes.len(), 1, "{:?}", l.notes);
        assert!(l
            .notes
            .values()
            .next()
            .unwrap()
            .contains("swarm service web"));
        let bad = service(
            "s2",
            "api",
            &[("baker.service", "api"), ("baker.port", "http")],
        );
        let l = listing(&[bad], &[task("t3", "s2", 1, &two)], &nodes(), None, |_| {
            None
        });
        assert!(l.instances.is_empty());
        assert!(l.notes["s2"].contains("baker.port"), "{:?}", l.notes);
        // No baker.port, one published target port: that one.
        let mut published = service("s3", "pub", &[("baker.service", "pub")]);
        published.target_ports = vec![8080];
        let l = listing(
            &[published],
            &[task("t4", "s3", 1, &[("a", "10.1.0.9")])],
            &nodes(),
            None,
            |_| None,
        );
        assert_eq!(l.instances.values().next().unwrap().spec.port, 8080);
    }

    #[test]
    fn of_two_tasks_in_one_slot_the_newer_is_registered() {
        let s = service(
            "s1",
            "web",
            &[("baker.service", "web"), ("baker.port", "80")],
        );
        let mut old = task("t-old", "s1", 1, &[("net", "10.0.1.5")]);
        old.created_at = "2026-01-01T00:00:00Z".into();
        let mut new = task("t-new", "s1", 1, &[("net", "10.0.1.6")]);
        new.created_at = "2026-01-01T00:00:09Z".into();
        for order in [[old.clone(), new.clone()], [new.clone(), old.clone()]] {
            let l = listing(std::slice::from_ref(&s), &order, &nodes(), None, |_| None);
            assert_eq!(l.instances.len(), 1);
            assert_eq!(l.instances.values().next().unwrap().task, "t-new");
        }
    }

    fn event(typ: EventMessageTypeEnum, action: &str, attrs: &[(&str, &str)]) -> EventMessage {
        crate::docker::tests::event(typ, action, "c1", attrs)
    }

    #[test]
    fn events_are_classified() {
        use EventMessageTypeEnum::{CONTAINER, NODE, SERVICE};
        let task = [(TASK_LABEL, "t1")];
        assert_eq!(classify(&event(SERVICE, "update", &[])), Action::Poll);
        assert_eq!(classify(&event(NODE, "update", &[])), Action::Nodes);
        assert_eq!(
            classify(&event(
                CONTAINER,
                "kill",
                &[(TASK_LABEL, "t1"), ("signal", "15")]
            )),
            Action::Exclude("c1".into(), Excluded::Stopping)
        );
        assert_eq!(
            classify(&event(
                CONTAINER,
                "kill",
                &[(TASK_LABEL, "t1"), ("signal", "1")]
            )),
            Action::Ignore
        );
        assert_eq!(
            classify(&event(CONTAINER, "die", &task)),
            Action::Exclude("c1".into(), Excluded::Stopping)
        );
        assert_eq!(
            classify(&event(CONTAINER, "health_status: unhealthy", &task)),
            Action::Exclude("c1".into(), Excluded::Unhealthy)
        );
        assert_eq!(
            classify(&event(CONTAINER, "health_status: healthy", &task)),
            Action::Healthy("c1".into())
        );
        assert_eq!(classify(&event(CONTAINER, "start", &task)), Action::Poll);
        assert_eq!(
            classify(&event(CONTAINER, "exec_start: x", &task)),
            Action::Ignore
        );
        // Containers that are no task are container discovery's business.
        assert_eq!(classify(&event(CONTAINER, "die", &[])), Action::Ignore);
    }
}
