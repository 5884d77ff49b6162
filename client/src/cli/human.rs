//! One-line renderings for humans: instances, routes, versions and ages.

use std::cmp::Ordering;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use baker_client::maintenance::describe_state;
use baker_client::model::{Instance, Route, ServiceName, Source, Tag, Target, Version, Zone};

/// `address:port`, with an IPv6 address in brackets.
pub fn authority(address: &str, port: u16) -> String {
    if address.contains(':') {
        format!("[{address}]:{port}")
    } else {
        format!("{address}:{port}")
    }
}

/// `emitter/a 10.0.0.1:8080 v1 w100`, then `[tag,tag]`, `zone Z` and `(docker)` when they
/// apply.
pub fn instance_line(i: &Instance) -> String {
    let mut line = format!(
        "{}/{} {} v{} w{}",
        i.service,
        i.id,
        authority(i.address.as_str(), i.port),
        i.version,
        i.weight
    );
    if !i.tags.is_empty() {
        line.push_str(&format!(" [{}]", i.tags.join(",")));
    }
    if let Some(zone) = &i.zone {
        line.push_str(&format!(" zone {zone}"));
    }
    if i.source == Source::Docker {
        line.push_str(" (docker)");
    }
    if !i.state.is_up() {
        line.push_str(&format!(" {}", describe_state(i.state, i.reason.as_ref())));
    }
    line
}

/// What changed between two states of the same instance, e.g. `weight 100 → 50`.
pub fn instance_changes(old: &Instance, new: &Instance) -> Vec<String> {
    let mut changes = Vec::new();
    let mut note = |what: &str, a: String, b: String| {
        if a != b {
            changes.push(format!("{what} {a} → {b}"));
        }
    };
    note(
        "address",
        authority(old.address.as_str(), old.port),
        authority(new.address.as_str(), new.port),
    );
    note("version", old.version.to_string(), new.version.to_string());
    note("weight", old.weight.to_string(), new.weight.to_string());
    note("tags", tags(&old.tags), tags(&new.tags));
    note("zone", zone(old.zone.as_ref()), zone(new.zone.as_ref()));
    note("source", old.source.to_string(), new.source.to_string());
    note("ttl", ms(old.ttl_ms), ms(new.ttl_ms));
    note(
        "state",
        describe_state(old.state, old.reason.as_ref()),
        describe_state(new.state, new.reason.as_ref()),
    );
    changes
}

fn zone(zone: Option<&Zone>) -> String {
    zone.map_or_else(|| "-".to_owned(), ToString::to_string)
}

fn tags(tags: &[Tag]) -> String {
    if tags.is_empty() {
        "-".to_owned()
    } else {
        tags.join(",")
    }
}

/// `1=90 2=10 barker@*=5 barker@3=5` for the route of `service`: its versions in version
/// order (or `service@*`), then the other targets, the same syntax `baker route set` takes.
pub fn route_text(service: &ServiceName, route: &Route) -> String {
    let mut pairs: Vec<(&Target, &u8)> = route.iter().collect();
    let own = |t: &Target| !matches!(t, Target::Service(s) if s != service);
    pairs.sort_by(|a, b| match (a.0, b.0) {
        (Target::Version(x), Target::Version(y)) => version_order(x.as_str(), y.as_str()),
        (x, y) => own(y).cmp(&own(x)).then(x.cmp(y)),
    });
    pairs
        .iter()
        .map(|(t, p)| format!("{t}={p}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Orders versions as people expect: numbers by value (`2` before `10`), then the rest by text.
pub fn version_order(a: &str, b: &str) -> Ordering {
    match (a.parse::<u64>(), b.parse::<u64>()) {
        (Ok(x), Ok(y)) => x.cmp(&y),
        (Ok(_), Err(_)) => Ordering::Less,
        (Err(_), Ok(_)) => Ordering::Greater,
        (Err(_), Err(_)) => a.cmp(b),
    }
}

/// The distinct versions of `instances`, in [`version_order`].
pub fn versions<'a>(instances: impl IntoIterator<Item = &'a Instance>) -> Vec<Version> {
    let mut v: Vec<Version> = instances.into_iter().map(|i| i.version.clone()).collect();
    v.sort_by(|a, b| version_order(a.as_str(), b.as_str()));
    v.dedup();
    v
}

/// A duration in milliseconds, short: `500ms`, `6s`, `1m30s`, `2h`, `1d`.
pub fn ms(millis: u64) -> String {
    if millis < 1000 {
        return format!("{millis}ms");
    }
    // A registrar's TTL is three intervals: 500ms gives 1.5s, which `1s` would misstate.
    if millis < 10_000 && millis % 1000 >= 100 {
        return format!("{}.{}s", millis / 1000, millis % 1000 / 100);
    }
    compact(Duration::from_millis(millis))
}

/// A duration, short and rounded down to two units at most: `6s`, `1m30s`, `2h5m`, `3d4h`.
pub fn compact(d: Duration) -> String {
    let s = d.as_secs();
    let (d_, h, m, sec) = (s / 86_400, s / 3600 % 24, s / 60 % 60, s % 60);
    match (d_, h, m) {
        (0, 0, 0) => format!("{sec}s"),
        (0, 0, _) if sec == 0 => format!("{m}m"),
        (0, 0, _) => format!("{m}m{sec}s"),
        (0, _, 0) => format!("{h}h"),
        (0, _, _) => format!("{h}h{m}m"),
        (_, 0, _) => format!("{d_}d"),
        _ => format!("{d_}d{h}h"),
    }
}

/// How long ago `last_seen` (ms since the epoch) was, relative to `now`: `2s ago`.
pub fn ago(last_seen_ms: u64, now: SystemTime) -> String {
    let now_ms = now
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    format!(
        "{} ago",
        compact(Duration::from_millis(now_ms.saturating_sub(last_seen_ms)))
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inst() -> Instance {
        Instance::sample("emitter", "a")
    }

    #[test]
    fn instance_lines() {
        assert_eq!(instance_line(&inst()), "emitter/a 10.0.0.1:8080 v1 w100");
        let mut i = inst();
        i.address = "fd00::1".parse().unwrap();
        i.tags = vec!["blue".parse().unwrap(), "eu".parse().unwrap()];
        i.source = Source::Docker;
        assert_eq!(
            instance_line(&i),
            "emitter/a [fd00::1]:8080 v1 w100 [blue,eu] (docker)"
        );
        i.zone = Some("eu-1a".parse().unwrap());
        assert_eq!(
            instance_line(&i),
            "emitter/a [fd00::1]:8080 v1 w100 [blue,eu] zone eu-1a (docker)"
        );
    }

    #[test]
    fn changes_name_each_field() {
        let mut new = inst();
        new.weight = 50;
        new.port = 9090;
        new.last_seen = 99;
        assert_eq!(
            instance_changes(&inst(), &new),
            ["address 10.0.0.1:8080 → 10.0.0.1:9090", "weight 100 → 50"]
        );
        let mut moved = inst();
        moved.zone = Some("eu-1b".parse().unwrap());
        assert_eq!(instance_changes(&inst(), &moved), ["zone - → eu-1b"]);
        let mut heartbeat = inst();
        heartbeat.last_seen = 5;
        assert!(instance_changes(&inst(), &heartbeat).is_empty());
    }

    #[test]
    fn routes_and_versions_in_natural_order() {
        let route: Route = [
            ("10".parse().unwrap(), 5),
            ("2".parse().unwrap(), 15),
            ("1".parse().unwrap(), 70),
            ("canary".parse().unwrap(), 10),
        ]
        .into();
        assert_eq!(
            route_text(&"s".parse().unwrap(), &route),
            "1=70 2=15 10=5 canary=10"
        );
        let mut a = inst();
        a.version = "10".parse().unwrap();
        let mut b = inst();
        b.version = "2".parse().unwrap();
        assert_eq!(versions([&a, &b, &b]), ["2", "10"]);
    }

    #[test]
    fn durations() {
        assert_eq!(ms(500), "500ms");
        assert_eq!(ms(6000), "6s");
        assert_eq!(ms(1500), "1.5s");
        assert_eq!(ms(9990), "9.9s");
        assert_eq!(ms(10_500), "10s");
        assert_eq!(compact(Duration::from_secs(90)), "1m30s");
        assert_eq!(compact(Duration::from_secs(120)), "2m");
        assert_eq!(compact(Duration::from_secs(7200 + 300 + 7)), "2h5m");
        assert_eq!(compact(Duration::from_secs(3600)), "1h");
        assert_eq!(compact(Duration::from_secs(86_400 * 3 + 3600 * 4)), "3d4h");
        assert_eq!(compact(Duration::from_secs(86_400 + 60)), "1d");
        let now = UNIX_EPOCH + Duration::from_secs(100);
        assert_eq!(ago(97_500, now), "2s ago");
        // A directory clock ahead of ours is not "in the future".
        assert_eq!(ago(200_000, now), "0s ago");
    }
}
