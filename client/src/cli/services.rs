//! `baker services` and `baker instances`.

use std::collections::BTreeMap;
use std::time::SystemTime;

use baker_client::maintenance::describe_state;
use baker_client::model::{Instance, Route, ServiceName, ServiceResponse, Source, Version};
use reqwest::StatusCode;
use serde::Serialize;

use super::human::{ago, authority, ms, route_text, versions};
use super::table::Table;
use super::{Ctx, Failure};
use baker_client::api::ClientError;

/// One row of `baker services`, also its JSON form.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServiceSummary {
    pub service: ServiceName,
    pub instances: usize,
    pub versions: Vec<Version>,
    pub route: Option<Route>,
}

/// `baker services --json`.
#[derive(Debug, Serialize)]
struct ServicesOutput {
    index: u64,
    services: Vec<ServiceSummary>,
}

/// Every service with live instances or a route, in name order.
pub fn summarize(
    services: &BTreeMap<ServiceName, Vec<Instance>>,
    routes: &BTreeMap<ServiceName, Route>,
) -> Vec<ServiceSummary> {
    let mut names: Vec<&ServiceName> = services
        .iter()
        .filter(|(_, i)| !i.is_empty())
        .map(|(name, _)| name)
        .chain(routes.keys())
        .collect();
    names.sort();
    names.dedup();
    names
        .into_iter()
        .map(|name| {
            let instances = services.get(name).map(Vec::as_slice).unwrap_or_default();
            ServiceSummary {
                service: name.clone(),
                instances: instances.len(),
                versions: versions(instances),
                route: routes.get(name).cloned(),
            }
        })
        .collect()
}

/// The `baker services` table.
pub fn services_table(rows: &[ServiceSummary]) -> Table {
    let mut t = Table::new(&["service", "instances", "versions", "route"]);
    for s in rows {
        t.row(vec![
            s.service.to_string(),
            s.instances.to_string(),
            s.versions.join(","),
            s.route
                .as_ref()
                .map(|r| route_text(&s.service, r))
                .unwrap_or_default(),
        ]);
    }
    t
}

pub async fn services(ctx: &Ctx) -> anyhow::Result<()> {
    let client = ctx.client()?;
    let fail = |e| Failure::from_client(&client, "list services", e);
    let (services, routes) =
        tokio::try_join!(async { client.services().await.map_err(fail) }, async {
            client.routes().await.map_err(fail)
        },)?;
    let rows = summarize(&services.services, &routes.routes);
    if ctx.json() {
        return ctx.print_json(&ServicesOutput {
            index: services.index.max(routes.index),
            services: rows,
        });
    }
    ctx.print_table(&services_table(&rows), "no services")
}

/// The `baker instances` table; with `with_service`, a SERVICE column comes first. A NODE
/// column follows SOURCE when an instance listed carries a node (Docker discovery's), and a
/// ZONE column follows when one carries a zone; `-` in either for an instance without.
pub fn instances_table<'a>(
    instances: impl IntoIterator<Item = &'a Instance>,
    with_service: bool,
    now: SystemTime,
) -> Table {
    let mut instances: Vec<&Instance> = instances.into_iter().collect();
    instances.sort_by(|a, b| (&a.service, &a.id).cmp(&(&b.service, &b.id)));
    let with_node = instances.iter().any(|i| i.node.is_some());
    let with_zone = instances.iter().any(|i| i.zone.is_some());
    let mut headers = vec!["id", "address", "version", "weight", "state", "source"];
    if with_node {
        headers.push("node");
    }
    if with_zone {
        headers.push("zone");
    }
    headers.extend(["tags", "ttl", "seen"]);
    if with_service {
        headers.insert(0, "service");
    }
    let mut t = Table::new(&headers);
    for i in instances {
        let mut row = vec![
            i.id.to_string(),
            authority(i.address.as_str(), i.port),
            i.version.to_string(),
            i.weight.to_string(),
            describe_state(i.state, i.reason.as_ref()),
            i.source.to_string(),
        ];
        if with_node {
            row.push(
                i.node
                    .as_ref()
                    .map_or_else(String::new, ToString::to_string),
            );
        }
        if with_zone {
            row.push(
                i.zone
                    .as_ref()
                    .map_or_else(String::new, ToString::to_string),
            );
        }
        row.extend([i.tags.join(","), ttl(i), ago(i.last_seen, now)]);
        if with_service {
            row.insert(0, i.service.to_string());
        }
        t.row(row);
    }
    t
}

/// The TTL column: a Docker instance never expires by TTL (the engine says when it goes), so
/// it shows `-` rather than the TTL the directory stores for it.
fn ttl(i: &Instance) -> String {
    match i.source {
        Source::Docker => "-".to_owned(),
        Source::Registrar => ms(i.ttl_ms),
    }
}

pub async fn instances(ctx: &Ctx, service: Option<&ServiceName>) -> anyhow::Result<()> {
    let client = ctx.client()?;
    let Some(service) = service else {
        let all = client
            .services()
            .await
            .map_err(|e| Failure::from_client(&client, "list services", e))?;
        if ctx.json() {
            return ctx.print_json(&all);
        }
        let table = instances_table(all.services.values().flatten(), true, SystemTime::now());
        return ctx.print_table(&table, "no live instances");
    };
    let action = format!("list the instances of {service}");
    let resp = match client.service(service.as_str()).await {
        Ok(r) => r,
        // Services are soft state: one with no live instance is simply empty.
        Err(ClientError::Refused {
            status: StatusCode::NOT_FOUND,
            ..
        }) => ServiceResponse {
            index: 0,
            service: service.clone(),
            instances: Vec::new(),
            route: None,
        },
        Err(e) => return Err(Failure::from_client(&client, &action, e).into()),
    };
    if ctx.json() {
        return ctx.print_json(&resp);
    }
    let table = instances_table(&resp.instances, false, SystemTime::now());
    ctx.print_table(&table, &format!("no live instances of {service}"))?;
    // The route is part of the answer for people; a script reading rows (--no-headers) gets
    // rows only, and the route from `baker route list`.
    if let Some(route) = &resp.route {
        let line = format!("route: {}", route_text(service, route));
        if ctx.global.no_headers {
            eprintln!("{line}");
        } else {
            ctx.print(&line)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    fn inst(service: &str, id: &str, version: &str) -> Instance {
        Instance {
            version: version.parse().unwrap(),
            last_seen: 1_000_000,
            ..Instance::sample(service, id)
        }
    }

    #[test]
    fn services_table_lists_instances_and_routes() {
        let services: BTreeMap<ServiceName, Vec<Instance>> = [
            (
                "emitter".parse().unwrap(),
                vec![
                    inst("emitter", "a", "1"),
                    inst("emitter", "b", "2"),
                    inst("emitter", "c", "1"),
                ],
            ),
            ("gone".parse().unwrap(), vec![]),
        ]
        .into();
        let routes: BTreeMap<ServiceName, Route> = [
            (
                "emitter".parse().unwrap(),
                [("1".parse().unwrap(), 90), ("2".parse().unwrap(), 10)].into(),
            ),
            (
                "idle".parse().unwrap(),
                [("3".parse().unwrap(), 100)].into(),
            ),
        ]
        .into();
        let rows = summarize(&services, &routes);
        assert_eq!(
            services_table(&rows).render(true),
            "SERVICE   INSTANCES   VERSIONS   ROUTE\n\
             emitter   3           1,2        1=90 2=10\n\
             idle      0           -          3=100\n"
        );
        assert_eq!(
            serde_json::to_value(&rows[1]).unwrap(),
            serde_json::json!({"service":"idle","instances":0,"versions":[],"route":{"3":100}})
        );
    }

    #[test]
    fn instances_table_columns() {
        let mut b = inst("emitter", "b", "2");
        b.tags = vec!["canary".parse().unwrap()];
        b.weight = 10;
        b.address = "fd00::2".parse().unwrap();
        let now = UNIX_EPOCH + Duration::from_millis(1_003_000);
        let mut c = inst("emitter", "c", "1");
        c.source = Source::Docker;
        c.state = baker_client::maintenance::InstanceState::Draining;
        c.reason = Some("disk".parse().unwrap());
        let list = [b, inst("emitter", "a", "1"), c];
        assert_eq!(
            instances_table(&list, false, now).render(true),
            "ID   ADDRESS          VERSION   WEIGHT   STATE             SOURCE      TAGS     TTL   SEEN\n\
             a    10.0.0.1:8080    1         100      up                registrar   -        6s    3s ago\n\
             b    [fd00::2]:8080   2         10       up                registrar   canary   6s    3s ago\n\
             c    10.0.0.1:8080    1         100      draining (disk)   docker      -        -     3s ago\n"
        );
        assert!(instances_table(&list, true, now)
            .render(false)
            .starts_with("emitter   a   10.0.0.1:8080"));
    }

    #[test]
    fn the_node_column_shows_when_an_instance_has_a_node() {
        let now = UNIX_EPOCH + Duration::from_millis(1_003_000);
        let mut d = inst("emitter", "d", "1");
        d.source = Source::Docker;
        d.node = Some("host-1".parse().unwrap());
        let list = [inst("emitter", "a", "1"), d];
        assert_eq!(
            instances_table(&list, true, now).render(true),
            "SERVICE   ID   ADDRESS         VERSION   WEIGHT   STATE   SOURCE      NODE     TAGS   TTL   SEEN\n\
             emitter   a    10.0.0.1:8080   1         100      up      registrar   -        -      6s    3s ago\n\
             emitter   d    10.0.0.1:8080   1         100      up      docker      host-1   -      -     3s ago\n"
        );
    }

    #[test]
    fn the_zone_column_shows_when_an_instance_has_a_zone() {
        let now = UNIX_EPOCH + Duration::from_millis(1_003_000);
        let mut d = inst("emitter", "d", "1");
        d.source = Source::Docker;
        d.node = Some("host-1".parse().unwrap());
        d.zone = Some("eu-1a".parse().unwrap());
        let mut b = inst("emitter", "b", "1");
        b.zone = Some("eu-1b".parse().unwrap());
        let list = [inst("emitter", "a", "1"), b.clone(), d];
        assert_eq!(
            instances_table(&list, false, now).render(true),
            "ID   ADDRESS         VERSION   WEIGHT   STATE   SOURCE      NODE     ZONE    TAGS   TTL   SEEN\n\
             a    10.0.0.1:8080   1         100      up      registrar   -        -       -      6s    3s ago\n\
             b    10.0.0.1:8080   1         100      up      registrar   -        eu-1b   -      6s    3s ago\n\
             d    10.0.0.1:8080   1         100      up      docker      host-1   eu-1a   -      -     3s ago\n"
        );
        assert_eq!(
            instances_table(&[b], true, now).render(true),
            "SERVICE   ID   ADDRESS         VERSION   WEIGHT   STATE   SOURCE      ZONE    TAGS   TTL   SEEN\n\
             emitter   b    10.0.0.1:8080   1         100      up      registrar   eu-1b   -      6s    3s ago\n"
        );
    }
}
