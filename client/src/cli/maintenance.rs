//! `baker drain`, `baker undrain` and `baker maintenance`.

use std::time::SystemTime;

use baker_client::events::{rfc3339, EventsResponse};
use baker_client::maintenance::{MaintenanceResponse, Reason, Target};
use baker_client::model::{printable, ServiceName};

use super::ambassadors::wait_applied;
use super::human::{ago, route_text};
use super::table::Table;
use super::{Ctx, Failure, Wait};

/// The service and what of it to drain, from `SERVICE/ID` or `SERVICE --version V`.
pub fn target(what: &str, version: Option<&str>) -> Result<(ServiceName, Target), Failure> {
    let usage = |why: String| {
        Failure::Usage(format!(
            "{why}: name an instance as SERVICE/ID, or a version as SERVICE --version VERSION"
        ))
    };
    let (service, id) = match what.split_once('/') {
        Some((s, id)) => (s, Some(id)),
        None => (what, None),
    };
    let service: ServiceName = service
        .parse()
        .map_err(|e| usage(format!("{e} (in {:?})", printable(what))))?;
    let target = match (id, version) {
        (Some(id), None) => Target::Instance(
            id.parse()
                .map_err(|e| usage(format!("{e} (in {:?})", printable(what))))?,
        ),
        (None, Some(v)) => Target::Version(v.parse().map_err(|e| usage(format!("{e}")))?),
        (Some(_), Some(_)) => return Err(usage("both an instance and a version".into())),
        (None, None) => return Err(usage("no instance and no version".into())),
    };
    Ok((service, target))
}

pub async fn drain(
    ctx: &Ctx,
    what: &str,
    version: Option<&str>,
    reason: Option<&str>,
    force: bool,
    wait: Wait,
) -> anyhow::Result<()> {
    let (service, target) = target(what, version)?;
    if let Some(r) = reason {
        r.parse::<Reason>()
            .map_err(|e| Failure::Usage(format!("--reason: {}", e.message)))?;
    }
    let client = ctx.client()?;
    let sent = if force {
        client.drain_forced(service.as_str(), &target, reason).await
    } else {
        client.drain(service.as_str(), &target, reason).await
    };
    let resp =
        sent.map_err(|e| Failure::from_client(&client, &format!("drain {service} {target}"), e))?;
    if ctx.json() {
        ctx.print_json(&resp)?;
    } else {
        let why = resp
            .drain
            .reason
            .as_ref()
            .map(|r| format!(" ({r})"))
            .unwrap_or_default();
        ctx.print(&format!(
            "drained {service} {target}{why} at index {}",
            resp.index
        ))?;
    }
    if wait.wait {
        wait_applied(&client, &service, resp.index, wait.timeout).await?;
    }
    Ok(())
}

pub async fn undrain(
    ctx: &Ctx,
    what: &str,
    version: Option<&str>,
    wait: Wait,
) -> anyhow::Result<()> {
    let (service, target) = target(what, version)?;
    let client = ctx.client()?;
    let resp = client
        .undrain(service.as_str(), &target)
        .await
        .map_err(|e| Failure::from_client(&client, &format!("undrain {service} {target}"), e))?;
    if ctx.json() {
        ctx.print_json(&resp)?;
    } else {
        ctx.print(&format!(
            "undrained {service} {target} at index {}",
            resp.index
        ))?;
    }
    if wait.wait {
        wait_applied(&client, &service, resp.index, wait.timeout).await?;
    }
    Ok(())
}

/// The `baker maintenance` table.
pub fn maintenance_table(resp: &MaintenanceResponse, now: SystemTime) -> Table {
    let mut t = Table::new(&["service", "drained", "reason", "since", "origin"]);
    for e in &resp.maintenance {
        let what = match e.target() {
            Some(Target::Instance(id)) => id.to_string(),
            Some(Target::Version(v)) => format!("version {v}"),
            None => "?".to_owned(),
        };
        t.row(vec![
            e.service.to_string(),
            what,
            e.reason
                .as_ref()
                .map_or_else(|| "-".to_owned(), ToString::to_string),
            ago(e.since, now),
            e.origin.clone(),
        ]);
    }
    t
}

pub async fn maintenance(ctx: &Ctx) -> anyhow::Result<()> {
    let client = ctx.client()?;
    let resp = client
        .maintenance()
        .await
        .map_err(|e| Failure::from_client(&client, "list the drains", e))?;
    if ctx.json() {
        return ctx.print_json(&resp);
    }
    ctx.print_table(
        &maintenance_table(&resp, SystemTime::now()),
        "nothing is drained",
    )
}

/// The `baker events` table.
pub fn events_table(resp: &EventsResponse) -> Table {
    let mut t = Table::new(&[
        "time", "index", "service", "what", "kind", "cause", "by", "origin",
    ]);
    for e in &resp.events {
        let what = match (&e.id, &e.version) {
            (Some(id), _) => id.to_string(),
            (None, Some(v)) => format!("version {v}"),
            (None, None) => "-".to_owned(),
        };
        let mut cause = e.cause.clone();
        if let Some(r) = &e.reason {
            cause.push_str(&format!(" ({r})"));
        }
        if let Some(route) = &e.route {
            cause.push_str(&format!(": {}", route_text(&e.service, route)));
        }
        t.row(vec![
            rfc3339(e.at),
            e.index.to_string(),
            e.service.to_string(),
            what,
            serde_json::to_value(e.kind)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default(),
            cause,
            e.by.clone().unwrap_or_else(|| "-".to_owned()),
            e.origin.clone().unwrap_or_else(|| "-".to_owned()),
        ]);
    }
    t
}

pub async fn events(
    ctx: &Ctx,
    since: Option<u64>,
    until: Option<u64>,
    service: Option<&ServiceName>,
    limit: Option<usize>,
) -> anyhow::Result<()> {
    let client = ctx.client()?;
    let resp = client
        .events(since, until, service.map(ServiceName::as_str), limit)
        .await
        .map_err(|e| Failure::from_client(&client, "list the events", e))?;
    if ctx.json() {
        return ctx.print_json(&resp);
    }
    ctx.print_table(&events_table(&resp), "no event")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_are_an_instance_or_a_version() {
        let (s, t) = target("greeting/greeting-1", None).unwrap();
        assert_eq!(
            (s.as_str(), t),
            ("greeting", Target::Instance("greeting-1".parse().unwrap()))
        );
        let (_, t) = target("greeting", Some("2")).unwrap();
        assert_eq!(t, Target::Version("2".parse().unwrap()));
        for (what, version, says) in [
            ("greeting", None, "no instance and no version"),
            ("greeting/a", Some("2"), "both an instance and a version"),
            ("Greeting/a", None, "service: must start"),
            ("greeting/a b", None, "id: may contain only"),
            ("greeting", Some("v 2"), "version: may contain only"),
        ] {
            let e = target(what, version).unwrap_err().to_string();
            assert!(e.contains(says), "{what} {version:?}: {e}");
        }
    }
}
