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

/// The `baker ambassadors` table. When an ambassador has a zone, ZONE and LOCAL columns
/// follow SERVERS: its zone, and the share of the requests it sent between its last two
/// reports that stayed in the zone (`-` without a zone or without requests).
pub fn ambassadors_table(resp: &AmbassadorsResponse, now: SystemTime) -> Table {
    let with_zone = resp.ambassadors.iter().any(|a| a.report.locality.is_some());
    let mut headers = vec![
        "id", "host", "services", "applied", "state", "reloads", "servers",
    ];
    if with_zone {
        headers.extend(["zone", "local"]);
    }
    headers.push("seen");
    let mut t = Table::new(&headers);
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
        let mut row = vec![
            a.id.to_string(),
            a.report.host.to_string(),
            services.join(","),
            format!("{}/{}", a.report.applied_index, resp.index),
            state.to_owned(),
            a.report.reloads.to_string(),
            a.report.servers.len().to_string(),
        ];
        if with_zone {
            let locality = a.report.locality.as_ref();
            row.push(locality.map_or("-".to_owned(), |l| l.zone.to_string()));
            row.push(
                locality
                    .and_then(|l| l.local_percent())
                    .map_or("-".to_owned(), |p| format!("{p:.0}%")),
            );
        }
        row.push(ago(a.last_seen, now));
        t.row(row);
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

#[cfg(test)]
mod tests {
    use super::*;
    use baker_client::ops::{AmbassadorReport, AmbassadorStatus, Locality};

    fn status(id: &str, locality: Option<Locality>) -> AmbassadorStatus {
        AmbassadorStatus {
            id: id.parse().unwrap(),
            live: true,
            caught_up: true,
            wanted_index: 3,
            age_ms: 500,
            last_seen: 0,
            peer: "127.0.0.1".into(),
            report: AmbassadorReport {
                host: "host-1".parse().unwrap(),
                services: vec![],
                applied_index: 3,
                reloads: 0,
                servers: vec![],
                ttl_ms: 7000,
                locality,
            },
        }
    }

    #[test]
    fn zone_and_local_share_show_when_an_ambassador_has_a_zone() {
        let mut resp = AmbassadorsResponse {
            index: 3,
            ambassadors: vec![status("amb-1", None)],
            traffic: Default::default(),
        };
        let plain = ambassadors_table(&resp, SystemTime::UNIX_EPOCH).render(true);
        assert!(!plain.contains("ZONE"), "{plain}");
        resp.ambassadors.push(status(
            "amb-2",
            Some(Locality {
                zone: "eu-1a".parse().unwrap(),
                requests: 200,
                local: 187,
            }),
        ));
        resp.ambassadors.push(status(
            "amb-3",
            Some(Locality {
                zone: "eu-1b".parse().unwrap(),
                requests: 0,
                local: 0,
            }),
        ));
        let zoned = ambassadors_table(&resp, SystemTime::UNIX_EPOCH).render(true);
        let cells: Vec<Vec<&str>> = zoned
            .lines()
            .map(|l| l.split_whitespace().collect())
            .collect();
        assert_eq!(cells[0][7..], ["ZONE", "LOCAL", "SEEN"], "{zoned}");
        assert_eq!(cells[1][7..9], ["-", "-"], "{zoned}");
        assert_eq!(cells[2][7..9], ["eu-1a", "94%"], "{zoned}");
        assert_eq!(cells[3][7..9], ["eu-1b", "-"], "{zoned}");
    }
}
