//! Keeping the directory in step with the app's health: register and heartbeat while it is up,
//! deregister the moment it goes down and before the registrar stops, and retry forever (capped,
//! jittered backoff) while the directory is away.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use baker_client::backoff::Backoff;
use baker_client::model::{InstanceId, InstanceSpec, ServiceName, Tag, Version, Zone};
use baker_client::{ClientError, DirectoryClient};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::health::Status;
use crate::target::{authority, Advertise};
use baker_client::errors::chain;

/// How long a stopping registrar keeps trying to deregister before it gives up (and leaves the
/// registration to expire with its TTL). Below Docker's default stop grace of 10 s.
pub const STOP_DEADLINE: Duration = Duration::from_secs(5);
/// First retry delay when the directory cannot be reached; the delay doubles up to the probe
/// interval, so the registration is back within one interval of the directory being back.
pub const FIRST_RETRY: Duration = Duration::from_millis(100);

/// The registration of one instance, and the client that keeps it.
#[derive(Debug, Clone)]
pub struct Registration {
    client: DirectoryClient,
    service: ServiceName,
    id: InstanceId,
    advertise: Advertise,
    version: Version,
    weight: u16,
    tags: Vec<Tag>,
    zone: Option<Zone>,
    ttl: Duration,
    interval: Duration,
    request_timeout: Duration,
}

impl Registration {
    pub fn new(config: &Config) -> Result<Self, ClientError> {
        Ok(Self {
            client: DirectoryClient::trusting(
                &config.directory,
                config.token.clone(),
                config.ca.as_deref(),
            )?,
            service: config.service.clone(),
            id: config.id.clone(),
            advertise: config.advertise.clone(),
            version: config.version.clone(),
            weight: config.weight,
            tags: config.tags.clone(),
            zone: config.zone.clone(),
            ttl: config.ttl(),
            interval: config.interval,
            request_timeout: config
                .interval
                .clamp(Duration::from_secs(1), Duration::from_secs(5)),
        })
    }

    /// `<service>/<id>`, as logs name the instance.
    pub fn name(&self) -> String {
        format!("{}/{}", self.service, self.id)
    }

    /// The address to register: the advertised host, resolved to an IP when it is a name the
    /// registrar was told to resolve (IPv4 preferred).
    ///
    /// A loopback address taken from the target (a registrar in its app's network namespace
    /// probing 127.0.0.1) is replaced by the address this host uses towards the directory,
    /// which is where others can reach the app too; it stays loopback when the directory
    /// itself is on loopback.
    async fn address(&self) -> Result<String, String> {
        let ip = if self.advertise.resolve {
            resolve(&self.advertise.host, self.advertise.port).await?
        } else {
            match self.advertise.host.parse::<IpAddr>() {
                Ok(ip) => ip,
                Err(_) => return Ok(self.advertise.host.clone()),
            }
        };
        if self.advertise.from_target && ip.is_loopback() {
            if let Some(own) = self.address_towards_directory().await {
                return Ok(own.to_string());
            }
        }
        Ok(ip.to_string())
    }

    /// The local address the kernel picks to reach the directory (a connected UDP socket sends
    /// nothing); `None` when it cannot be told.
    async fn address_towards_directory(&self) -> Option<IpAddr> {
        let url = reqwest::Url::parse(self.client.base()).ok()?;
        let dir = resolve(url.host_str()?, url.port_or_known_default()?)
            .await
            .ok()?;
        let bind: SocketAddr = if dir.is_ipv4() {
            ([0, 0, 0, 0], 0).into()
        } else {
            ([0u16; 8], 0).into()
        };
        let socket = tokio::net::UdpSocket::bind(bind).await.ok()?;
        socket
            .connect((dir, url.port_or_known_default()?))
            .await
            .ok()?;
        Some(socket.local_addr().ok()?.ip())
    }

    fn spec(&self, address: String) -> InstanceSpec {
        InstanceSpec {
            address,
            port: u64::from(self.advertise.port),
            version: Some(self.version.to_string()),
            weight: Some(u64::from(self.weight)),
            tags: self.tags.iter().map(ToString::to_string).collect(),
            ttl_ms: Some(u64::try_from(self.ttl.as_millis()).unwrap_or(u64::MAX)),
            zone: self.zone.as_ref().map(ToString::to_string),
        }
    }

    /// One register-or-heartbeat; returns the registered address, or why it failed and
    /// whether the directory may hold the instance anyway.
    async fn register(&self) -> Result<String, (String, bool)> {
        let address = self.address().await.map_err(|e| (e, false))?;
        let spec = self.spec(address.clone());
        match tokio::time::timeout(
            self.request_timeout,
            self.client
                .register(self.service.as_str(), self.id.as_str(), &spec),
        )
        .await
        {
            Ok(Ok(_)) => Ok(address),
            Ok(Err(e)) => Err((describe(&e), !surely_not_stored(&e))),
            Err(_) => Err((format!("no answer within {:?}", self.request_timeout), true)),
        }
    }

    async fn deregister(&self) -> Result<(), String> {
        match tokio::time::timeout(
            self.request_timeout,
            self.client
                .deregister(self.service.as_str(), self.id.as_str()),
        )
        .await
        {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(describe(&e)),
            Err(_) => Err(format!("no answer within {:?}", self.request_timeout)),
        }
    }

    /// Follows `status` until `shutdown`: registers and heartbeats every interval while it is
    /// `Up`, deregisters once each time it turns `Down`; then, if anything may be registered,
    /// deregisters before returning.
    pub async fn run(self, mut status: watch::Receiver<Status>, shutdown: CancellationToken) {
        let name = self.name();
        let mut backoff = Backoff::new(FIRST_RETRY, self.interval.max(FIRST_RETRY));
        let mut outage = Outage::default();
        // The address the directory holds for us, when the last PUT succeeded.
        let mut registered: Option<String> = None;
        // A PUT was sent since the last successful DELETE: the directory may hold us.
        let mut maybe_registered = false;
        let mut delete_pending = false;
        let mut last = Status::Starting;

        loop {
            if shutdown.is_cancelled() {
                break;
            }
            let now_status = *status.borrow_and_update();
            if now_status == Status::Down && last != Status::Down {
                delete_pending = true;
            }
            last = now_status;

            let mut next: Option<Instant> = None;
            match now_status {
                Status::Up => {
                    let held_before = maybe_registered;
                    maybe_registered = true;
                    let attempt = tokio::select! {
                        r = self.register() => Some(r),
                        changed = status.changed() => {
                            if changed.is_err() {
                                break;
                            }
                            None
                        }
                        () = shutdown.cancelled() => break,
                    };
                    match attempt {
                        Some(Ok(address)) => {
                            let directory = self.client.base();
                            outage.recovered(directory);
                            if registered.as_deref() != Some(address.as_str()) {
                                tracing::info!(
                                    "registered {name} at {} with {directory} (version {}, weight {}, {}ttl {:?})",
                                    authority(&address, self.advertise.port),
                                    self.version,
                                    self.weight,
                                    self.zone.as_ref().map(|z| format!("zone {z}, ")).unwrap_or_default(),
                                    self.ttl
                                );
                            }
                            registered = Some(address);
                            backoff.reset();
                            next = Some(Instant::now() + jitter(self.interval, 0.9, 1.0));
                        }
                        Some(Err((e, maybe_stored))) => {
                            registered = None;
                            // Refused, or never reached: nothing to deregister at the stop.
                            maybe_registered = held_before || maybe_stored;
                            outage.failed(&format!("cannot register {name}"), e);
                            next = Some(Instant::now() + backoff.next_delay());
                        }
                        None => continue,
                    }
                }
                Status::Down if delete_pending => {
                    registered = None;
                    let attempt = tokio::select! {
                        r = self.deregister() => r,
                        () = shutdown.cancelled() => break,
                    };
                    match attempt {
                        Ok(()) => {
                            let directory = self.client.base();
                            outage.recovered(directory);
                            tracing::info!("deregistered {name} from {directory}");
                            delete_pending = false;
                            maybe_registered = false;
                            backoff.reset();
                        }
                        Err(e) => {
                            outage.failed(&format!("cannot deregister {name}"), e);
                            next = Some(Instant::now() + backoff.next_delay());
                        }
                    }
                }
                Status::Down | Status::Starting => {}
            }

            let wait = async {
                match next {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                changed = status.changed() => {
                    if changed.is_err() {
                        break;
                    }
                }
                () = wait => {}
                () = shutdown.cancelled() => break,
            }
        }

        if maybe_registered || delete_pending {
            self.deregister_before_stop(&name).await;
        }
    }

    async fn deregister_before_stop(&self, name: &str) {
        let directory = self.client.base();
        tracing::info!("stopping: deregistering {name} from {directory}");
        let deadline = Instant::now() + STOP_DEADLINE;
        let mut backoff = Backoff::new(FIRST_RETRY, Duration::from_secs(1));
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let result = match tokio::time::timeout(left, self.deregister()).await {
                Ok(r) => r,
                Err(_) => Err(format!("no answer within {STOP_DEADLINE:?}")),
            };
            match result {
                Ok(()) => {
                    tracing::info!("deregistered {name} from {directory}");
                    return;
                }
                Err(e) if Instant::now() + FIRST_RETRY >= deadline => {
                    tracing::warn!(
                        "could not deregister {name} from {directory} within {STOP_DEADLINE:?} ({e}): \
                         the directory drops it when its ttl of {:?} runs out",
                        self.ttl
                    );
                    return;
                }
                Err(e) => {
                    tracing::debug!("deregistering {name}: {e}; retrying");
                    let delay = backoff
                        .next_delay()
                        .min(deadline.saturating_duration_since(Instant::now()));
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }
}

/// Logs a failing directory once per distinct error, not once per retry.
#[derive(Debug, Default)]
struct Outage {
    error: Option<String>,
    attempts: u32,
}

impl Outage {
    fn failed(&mut self, what: &str, error: String) {
        self.attempts += 1;
        if self.error.as_deref() != Some(error.as_str()) {
            tracing::warn!("{what}: {error}; retrying");
            self.error = Some(error);
        } else {
            tracing::debug!("{what}: {error}; retrying (attempt {})", self.attempts);
        }
    }

    fn recovered(&mut self, directory: &str) {
        if self.error.take().is_some() {
            tracing::info!(
                "the directory at {directory} answers again (after {} failed attempts)",
                self.attempts
            );
        }
        self.attempts = 0;
    }
}

/// A directory error in a few words: the innermost I/O error says more than the layers above.
/// Resolves `host` to one IP, IPv4 preferred (`host` may be an IP literal).
async fn resolve(host: &str, port: u16) -> Result<IpAddr, String> {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let addrs: Vec<IpAddr> = tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| format!("cannot resolve {host}: {e}"))?
        .map(|a| a.ip())
        .collect();
    addrs
        .iter()
        .find(|ip| ip.is_ipv4())
        .or_else(|| addrs.first())
        .copied()
        .ok_or_else(|| format!("{host} resolves to no address"))
}

/// A directory error in a few words, with the variable to check when one is likely wrong.
fn describe(e: &ClientError) -> String {
    if let ClientError::Unreachable { url, source } = e {
        let hint = format!("check that baker-directory runs at {url} (BAKER_DIRECTORY)");
        let mut cause: Option<&dyn std::error::Error> = Some(source);
        while let Some(c) = cause {
            if let Some(io) = c.downcast_ref::<std::io::Error>() {
                return format!("{e}: {io}; {hint}");
            }
            cause = c.source();
        }
        if source.is_timeout() {
            return format!("{e}: timed out; {hint}");
        }
        return format!("{}; {hint}", chain(e));
    }
    if e.status() == Some(reqwest::StatusCode::UNAUTHORIZED) {
        return format!(
            "{}; check BAKER_TOKEN: it must be the directory's BAKER_TOKEN",
            chain(e)
        );
    }
    chain(e)
}

/// Whether the directory surely did not store a registration that failed with `e`: it refused
/// the request itself (4xx), or the connection was refused. After a timeout or a 5xx it may
/// have.
fn surely_not_stored(e: &ClientError) -> bool {
    match e {
        ClientError::Refused { status, .. } => status.is_client_error(),
        ClientError::Unreachable { source, .. } => source.is_connect(),
        _ => false,
    }
}

/// `d` scaled by a random factor in `lo..hi`, so that registrars started together spread out.
pub fn jitter(d: Duration, lo: f64, hi: f64) -> Duration {
    use rand::Rng;
    d.mul_f64(rand::rng().random_range(lo..hi))
}
