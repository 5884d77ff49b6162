//! `baker ambassadors`, `baker traffic`, and waiting for every ambassador to apply a change.

use std::time::{Duration, SystemTime};

use baker_client::model::ServiceName;
use baker_client::ops::AmbassadorsResponse;
use baker_client::DirectoryClient;

use super::human::ago;
use super::table::Table;
use super::{Ctx, Failure};

/// How often `--wait` asks the directory.
const WAIT_POLL: Duration = Duration::from_millis(100);

/// The `baker ambassadors` table.
pub fn ambassadors_table(resp: &AmbassadorsResponse, now: SystemTime) -> Table {
    let mut t = Table::new(&[
        "id", "host", "services", "applied", "state", "reloads", "servers", "seen",
    ]);
    for a in &resp.ambassadors {
        let services: Vec<String> = a
            .report
            .services
            .iter()
            .map(|s| match s.port {
                Some(p) => format!("{}={p}", s.service),
                None => s.service.to_string(),
            })
            .collect();
        let state = if !a.live {
            "silent"
        } else if a.caught_up {
            "caught-up"
        } else {
            "behind"
        };
        t.row(vec![
            a.id.to_string(),
            a.report.host.to_string(),
            services.join(","),
            format!("{}/{}", a.report.applied_index, resp.index),
            state.to_owned(),
            a.report.reloads.to_string(),
            a.report.servers.len().to_string(),
            ago(a.last_seen, now),
        ]);
    }
    t
}

pub async fn ambassadors(ctx: &Ctx) -> anyhow::Result<()> {
    let client = ctx.client()?;
    let resp = client
        .ambassadors()
        .await
        .map_err(|e| Failure::from_client(&client, "list ambassadors", e))?;
    if ctx.json() {
        return ctx.print_json(&resp);
    }
    ctx.print_table(
        &ambassadors_table(&resp, SystemTime::now()),
        "no ambassador has reported to this directory",
    )
}

/// The `baker traffic` table: per instance, what every live ambassador sent it.
pub fn traffic_table(resp: &AmbassadorsResponse, service: Option<&ServiceName>) -> Table {
    let mut t = Table::new(&["service", "id", "requests", "errors", "sessions", "up-on"]);
    for (svc, instances) in &resp.traffic {
        if service.is_some_and(|s| s != svc) {
            continue;
        }
        for (id, tr) in instances {
            t.row(vec![
                svc.to_string(),
                id.to_string(),
                tr.requests.to_string(),
                tr.errors.to_string(),
                tr.sessions.to_string(),
                format!("{}/{}", tr.up, tr.ambassadors),
            ]);
        }
    }
    t
}

pub async fn traffic(ctx: &Ctx, service: Option<&ServiceName>) -> anyhow::Result<()> {
    let client = ctx.client()?;
    let resp = client
        .ambassadors()
        .await
        .map_err(|e| Failure::from_client(&client, "read the ambassadors' traffic", e))?;
    if ctx.json() {
        return match service {
            Some(s) => ctx.print_json(&resp.traffic.get(s)),
            None => ctx.print_json(&resp.traffic),
        };
    }
    ctx.print_table(
        &traffic_table(&resp, service),
        "no traffic: no live ambassador serves these instances",
    )
}

/// Waits until every live ambassador has applied the directory's change `index`, for at most
/// `timeout`; says on stderr how many did. Fails naming the ambassadors still behind.
pub async fn wait_applied(
    client: &DirectoryClient,
    service: &ServiceName,
    index: u64,
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let resp = client
            .ambassadors()
            .await
            .map_err(|e| Failure::from_client(client, "list ambassadors", e))?;
        let behind = resp.behind(service, index);
        if behind.is_empty() {
            let live: Vec<String> = resp.serving(service).map(|a| a.id.to_string()).collect();
            if live.is_empty() {
                eprintln!("no live ambassador serves {service}: nothing to wait for");
            } else {
                eprintln!(
                    "applied by {} ambassador(s): {}",
                    live.len(),
                    live.join(", ")
                );
            }
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            let names: Vec<String> = behind
                .iter()
                .map(|a| {
                    format!(
                        "{} on {} (at index {})",
                        a.id, a.report.host, a.report.applied_index
                    )
                })
                .collect();
            anyhow::bail!(
                "the change (index {index}) is saved, but after {timeout:?} {} live \
                 ambassador(s) had not applied it: {}",
                names.len(),
                names.join(", ")
            );
        }
        tokio::time::sleep(WAIT_POLL).await;
    }
}
