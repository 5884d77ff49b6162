//! `baker watch`: the directory's changes, live, one line each.
//!
//! The stream starts with a snapshot; every later event carries one instance (added, changed
//! or removed) or one service's route. The human output is the difference each event makes to what was known
//! (`+`, `-`, `~` for instances, `route` for routes), so a reconnect, which brings a fresh
//! snapshot, prints only what changed while the stream was down.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, SystemTime};

use baker_client::api::ClientError;
use baker_client::backoff::Backoff;
use baker_client::model::{Instance, Route, ServiceName, State, WatchEvent};
use futures_util::StreamExt;

use super::human::{instance_changes, instance_line, route_text};
use super::{Ctx, Failure};

/// The lines a human sees for `event`, given what was known before it (`None` before the
/// first snapshot).
pub fn describe(known: Option<&State>, event: &WatchEvent) -> Vec<String> {
    let empty = State::default();
    let before = known.unwrap_or(&empty);
    let mut lines = Vec::new();
    match event {
        WatchEvent::Snapshot {
            index,
            services,
            routes,
            ..
        } => {
            let instances: usize = services.values().map(Vec::len).sum();
            let live = services.values().filter(|i| !i.is_empty()).count();
            lines.push(format!(
                "# {} at index {index}: {live} service{}, {instances} instance{}, {} route{}",
                if known.is_some() {
                    "resynced"
                } else {
                    "snapshot"
                },
                plural(live),
                plural(instances),
                routes.len(),
                plural(routes.len()),
            ));
            let names: BTreeSet<&ServiceName> =
                before.services.keys().chain(services.keys()).collect();
            for name in names {
                lines.extend(instance_diff(
                    before
                        .services
                        .get(name)
                        .map(Vec::as_slice)
                        .unwrap_or_default(),
                    services.get(name).map(Vec::as_slice).unwrap_or_default(),
                ));
            }
            let names: BTreeSet<&ServiceName> = before.routes.keys().chain(routes.keys()).collect();
            for name in names {
                lines.extend(route_diff(name, before.routes.get(name), routes.get(name)));
            }
        }
        WatchEvent::Service {
            service, instances, ..
        } => lines.extend(instance_diff(
            before
                .services
                .get(service)
                .map(Vec::as_slice)
                .unwrap_or_default(),
            instances,
        )),
        WatchEvent::Upsert { instance, .. } => {
            let old = before
                .services
                .get(&instance.service)
                .and_then(|list| list.iter().find(|i| i.id == instance.id));
            lines.extend(instance_diff(
                old.map(std::slice::from_ref).unwrap_or_default(),
                std::slice::from_ref(instance),
            ));
        }
        WatchEvent::Remove { instance, .. } => {
            lines.extend(instance_diff(std::slice::from_ref(instance), &[]));
        }
        WatchEvent::Route { service, route, .. } => lines.extend(route_diff(
            service,
            before.routes.get(service),
            route.as_ref(),
        )),
        WatchEvent::Maintenance {
            service, action, ..
        } => {
            let what = if action.drained { "drain" } else { "undrain" };
            let reason = action
                .reason
                .as_ref()
                .map(|r| format!(" ({r})"))
                .unwrap_or_default();
            lines.push(format!(
                "{what} {service} {}{reason} by {}",
                action.target, action.origin
            ));
        }
        WatchEvent::Ping { .. } => {}
    }
    lines
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

/// `-` for each instance gone, `~` for each changed (heartbeats alone are no change), `+` for
/// each new one, in id order.
fn instance_diff(old: &[Instance], new: &[Instance]) -> Vec<String> {
    let old: BTreeMap<&str, &Instance> = old.iter().map(|i| (i.id.as_str(), i)).collect();
    let new: BTreeMap<&str, &Instance> = new.iter().map(|i| (i.id.as_str(), i)).collect();
    let ids: BTreeSet<&str> = old.keys().chain(new.keys()).copied().collect();
    let mut lines = Vec::new();
    for id in ids {
        match (old.get(id), new.get(id)) {
            (Some(o), None) => lines.push(format!("- {}", instance_line(o))),
            (None, Some(n)) => lines.push(format!("+ {}", instance_line(n))),
            (Some(o), Some(n)) => {
                let changes = instance_changes(o, n);
                if !changes.is_empty() {
                    lines.push(format!("~ {} ({})", instance_line(n), changes.join(", ")));
                }
            }
            (None, None) => {}
        }
    }
    lines
}

fn route_diff(service: &ServiceName, old: Option<&Route>, new: Option<&Route>) -> Option<String> {
    if old == new {
        return None;
    }
    Some(match new {
        Some(r) => format!("route {service} {}", route_text(service, r)),
        None => format!("route {service} cleared"),
    })
}

/// Whether watching should go on after `err`: yes for anything but a refusal by the directory
/// (a 4xx, such as a bad token, will not mend by itself).
fn retryable(err: &ClientError) -> bool {
    match err {
        ClientError::Refused { status, .. } => status.is_server_error(),
        ClientError::BadUrl(_) | ClientError::BadList(_) | ClientError::BadToken(_) => false,
        _ => true,
    }
}

fn seconds(d: Duration) -> String {
    format!("{:.1}s", d.as_secs_f64())
}

pub async fn watch(
    ctx: &Ctx,
    timestamps: bool,
    services: &[ServiceName],
    watch_token: Option<String>,
) -> anyhow::Result<()> {
    let only = (!services.is_empty()).then_some(services);
    let client = ctx.client()?.with_watch_token(watch_token).map_err(|e| {
        Failure::Config(format!(
            "--watch-token / BAKER_WATCH_TOKEN {}: it is sent in an Authorization header",
            match e {
                ClientError::BadToken(why) => why,
                _ => "is not a valid token",
            }
        ))
    })?;
    let url = client.base().to_owned();
    let mut known: Option<State> = None;
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    let mut connected = false;
    loop {
        let stream = match client.watch_services(only).await {
            Ok(stream) => stream,
            Err(e) if connected && retryable(&e) => {
                let delay = backoff.next_delay();
                let reason = Failure::from_client(&client, "watch", e);
                eprintln!("baker: {reason}; retrying in {}", seconds(delay));
                tokio::time::sleep(delay).await;
                continue;
            }
            Err(e) => return Err(Failure::from_client(&client, "watch changes", e).into()),
        };
        if connected {
            eprintln!("baker: reconnected to the directory at {url}");
        }
        connected = true;
        let mut stream = std::pin::pin!(stream);
        let err = loop {
            match stream.next().await {
                Some(Ok(event)) => {
                    backoff.reset();
                    emit(ctx, known.as_ref(), &event, timestamps)?;
                    known.get_or_insert_with(State::default).apply(event);
                }
                Some(Err(e)) => break e,
                None => break ClientError::Ended,
            }
        };
        if !retryable(&err) {
            return Err(Failure::from_client(&client, "watch changes", err).into());
        }
        let delay = backoff.next_delay();
        let reason = match Failure::from_client(&client, "watch", err) {
            Failure::Unreachable { reason, .. } => reason,
            other => other.to_string(),
        };
        eprintln!(
            "baker: lost the watch stream from the directory at {url} ({reason}); reconnecting in {}",
            seconds(delay)
        );
        tokio::time::sleep(delay).await;
    }
}

fn emit(
    ctx: &Ctx,
    known: Option<&State>,
    event: &WatchEvent,
    timestamps: bool,
) -> anyhow::Result<()> {
    let lines = if ctx.json() {
        vec![serde_json::to_string(event)?]
    } else {
        describe(known, event)
    };
    if lines.is_empty() {
        return Ok(());
    }
    // NDJSON stays NDJSON: the events carry their own order (`index`).
    let stamp = if timestamps && !ctx.json() {
        format!("{} ", humantime::format_rfc3339_seconds(SystemTime::now()))
    } else {
        String::new()
    };
    let text: String = lines.iter().map(|l| format!("{stamp}{l}\n")).collect();
    ctx.print(&text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inst(id: &str, weight: u16) -> Instance {
        Instance {
            weight,
            last_seen: 1,
            ..Instance::sample("emitter", id)
        }
    }

    fn snapshot(index: u64, instances: Vec<Instance>, route: Option<Route>) -> WatchEvent {
        WatchEvent::Snapshot {
            index,
            services: [("emitter".parse().unwrap(), instances)].into(),
            routes: route
                .map(|r| ("emitter".parse().unwrap(), r))
                .into_iter()
                .collect(),
            maintenance: Default::default(),
        }
    }

    fn run(events: &[WatchEvent]) -> Vec<String> {
        let mut known: Option<State> = None;
        let mut out = Vec::new();
        for e in events {
            out.extend(describe(known.as_ref(), e));
            known.get_or_insert_with(State::default).apply(e.clone());
        }
        out
    }

    #[test]
    fn first_snapshot_lists_everything() {
        let r: Route = [("1".parse().unwrap(), 100)].into();
        assert_eq!(
            run(&[snapshot(7, vec![inst("a", 100), inst("b", 100)], Some(r))]),
            [
                "# snapshot at index 7: 1 service, 2 instances, 1 route",
                "+ emitter/a 10.0.0.1:8080 v1 w100",
                "+ emitter/b 10.0.0.1:8080 v1 w100",
                "route emitter 1=100",
            ]
        );
    }

    #[test]
    fn changes_print_one_line_each_and_heartbeats_none() {
        let mut beat = inst("a", 100);
        beat.last_seen = 99;
        let service = |index, instances| WatchEvent::Service {
            index,
            service: "emitter".parse().unwrap(),
            instances,
        };
        let lines = run(&[
            snapshot(1, vec![], None),
            service(2, vec![inst("a", 100)]),
            service(3, vec![beat]),
            service(4, vec![inst("a", 50), inst("b", 100)]),
            WatchEvent::Route {
                index: 5,
                prev: None,
                at: None,
                service: "emitter".parse().unwrap(),
                route: Some([("1".parse().unwrap(), 90), ("2".parse().unwrap(), 10)].into()),
            },
            WatchEvent::Ping { index: 5 },
            service(6, vec![inst("b", 100)]),
            WatchEvent::Route {
                index: 7,
                prev: None,
                at: None,
                service: "emitter".parse().unwrap(),
                route: None,
            },
        ]);
        assert_eq!(
            lines,
            [
                "# snapshot at index 1: 0 services, 0 instances, 0 routes",
                "+ emitter/a 10.0.0.1:8080 v1 w100",
                "~ emitter/a 10.0.0.1:8080 v1 w50 (weight 100 → 50)",
                "+ emitter/b 10.0.0.1:8080 v1 w100",
                "route emitter 1=90 2=10",
                "- emitter/a 10.0.0.1:8080 v1 w50",
                "route emitter cleared",
            ]
        );
    }

    #[test]
    fn v2_changes_print_the_same_lines() {
        use baker_client::change::{Change, RemoveCause, UpsertCause};
        let mut beat = inst("a", 100);
        beat.last_seen = 99;
        let up = |index, instance| {
            WatchEvent::of_change(
                Change::Upsert {
                    index,
                    at: 0,
                    cause: UpsertCause::Registered,
                    instance,
                    by: None,
                },
                index - 1,
            )
        };
        let lines = run(&[
            snapshot(1, vec![], None),
            up(2, inst("a", 100)),
            up(3, beat),
            up(4, inst("a", 50)),
            up(5, inst("b", 100)),
            WatchEvent::of_change(
                Change::Remove {
                    index: 6,
                    at: 0,
                    cause: RemoveCause::Expired,
                    instance: inst("a", 50),
                    by: None,
                },
                5,
            ),
        ]);
        assert_eq!(
            lines,
            [
                "# snapshot at index 1: 0 services, 0 instances, 0 routes",
                "+ emitter/a 10.0.0.1:8080 v1 w100",
                "~ emitter/a 10.0.0.1:8080 v1 w50 (weight 100 → 50)",
                "+ emitter/b 10.0.0.1:8080 v1 w100",
                "- emitter/a 10.0.0.1:8080 v1 w50",
            ]
        );
    }

    #[test]
    fn resync_prints_only_what_changed_meanwhile() {
        let lines = run(&[
            snapshot(1, vec![inst("a", 100), inst("b", 100)], None),
            snapshot(
                9,
                vec![inst("b", 100), inst("c", 100)],
                Some([("1".parse().unwrap(), 100)].into()),
            ),
        ]);
        assert_eq!(
            &lines[3..],
            [
                "# resynced at index 9: 1 service, 2 instances, 1 route",
                "- emitter/a 10.0.0.1:8080 v1 w100",
                "+ emitter/c 10.0.0.1:8080 v1 w100",
                "route emitter 1=100",
            ]
        );
    }

    #[test]
    fn only_refusals_stop_the_watch() {
        use reqwest::StatusCode;
        let refused = |status| ClientError::Refused {
            status,
            message: String::new(),
        };
        assert!(retryable(&ClientError::Ended));
        assert!(retryable(&ClientError::Idle(Duration::from_secs(15))));
        assert!(retryable(&refused(StatusCode::SERVICE_UNAVAILABLE)));
        assert!(!retryable(&refused(StatusCode::UNAUTHORIZED)));
    }
}
