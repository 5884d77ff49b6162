//! `baker route set|list|clear`.

use std::collections::{BTreeMap, BTreeSet};

use baker_client::api::ClientError;
use baker_client::model::{
    route_falls_back, validate_route_of, Route, RouteResponse, ServiceName, Target, Version,
};
use reqwest::StatusCode;

use super::ambassadors::wait_applied;
use super::human::route_text;
use super::table::Table;
use super::{Ctx, Failure, Wait};

/// Turns `1=90 2=10` (or `1=90 barker@2=10`, its bare names already resolved) into the route
/// to send, checked as the directory will check it; every problem is reported at once.
pub fn build_route(
    service: &ServiceName,
    splits: &[(Target, u64)],
) -> Result<BTreeMap<String, u64>, Failure> {
    let mut route = BTreeMap::new();
    let mut problems = Vec::new();
    for (target, pct) in splits {
        if route.insert(target.to_string(), *pct).is_some() {
            problems.push(match target {
                Target::Version(v) => format!("version {v} is named more than once"),
                other => format!("{other} is named more than once"),
            });
        }
    }
    if let Err(errors) = validate_route_of(service, &route) {
        problems.extend(errors.iter().map(ToString::to_string));
    }
    if problems.is_empty() {
        Ok(route)
    } else {
        Err(Failure::Usage(format!(
            "the route for {service} is not valid, nothing was changed: {}",
            problems.join("; ")
        )))
    }
}

/// Reads each bare name of `splits` (parsed as a version) as the service it names, when it
/// does: the routed service's own name is the whole of it (`monolith=70`), and the name of
/// another service with live instances (`services`) is that service (`barker=30`), unless a
/// live instance of `service` has that version. Any other bare name stays a version, as
/// before routes could name services; `barker@*` and `barker@2` are never ambiguous.
pub fn resolve(
    service: &ServiceName,
    splits: &[(Target, u64)],
    services: &BTreeMap<ServiceName, Vec<baker_client::Instance>>,
) -> Vec<(Target, u64)> {
    let own_versions: BTreeSet<&Version> = services
        .get(service)
        .into_iter()
        .flatten()
        .map(|i| &i.version)
        .collect();
    splits
        .iter()
        .map(|(target, pct)| {
            let Target::Version(name) = target else {
                return (target.clone(), *pct);
            };
            let as_service = ServiceName::parse_as(ServiceName::FIELD, name.as_str()).ok();
            let resolved = match as_service {
                Some(s) if s == *service => Target::Service(s),
                Some(s) if services.contains_key(&s) && !own_versions.contains(name) => {
                    Target::Service(s)
                }
                _ => target.clone(),
            };
            (resolved, *pct)
        })
        .collect()
}

pub async fn set(
    ctx: &Ctx,
    service: &ServiceName,
    splits: &[(Target, u64)],
    force: bool,
    wait: Wait,
) -> anyhow::Result<()> {
    let client = ctx.client()?;
    let ambiguous = splits
        .iter()
        .any(|(t, _)| matches!(t, Target::Version(v) if v.as_str() != service.as_str()));
    let splits = if ambiguous {
        // A bare name may be a version or a service: which services are live says which.
        let live = client
            .services()
            .await
            .map_err(|e| Failure::from_client(&client, "list services", e))?;
        resolve(service, splits, &live.services)
    } else {
        resolve(service, splits, &BTreeMap::new())
    };
    let route = build_route(service, &splits)?;
    let sent = if force {
        client.set_route_forced(service.as_str(), &route).await
    } else {
        client.set_route(service.as_str(), &route).await
    };
    let resp =
        sent.map_err(|e| Failure::from_client(&client, &format!("set the route of {service}"), e))?;
    if ctx.json() {
        ctx.print_json(&resp)?;
    } else {
        ctx.print(&set_line(&resp))?;
    }
    // Best effort: what the route does with the instances live now is worth knowing at once.
    if let Some(route) = &resp.route {
        let mut live = Vec::new();
        for s in std::iter::once(service).chain(route.other_services(service)) {
            if let Ok(current) = client.service(s.as_str()).await {
                live.extend(current.instances);
            }
        }
        for line in warnings(service, route, &live) {
            eprintln!("warning: {line}");
        }
    }
    if wait.wait {
        wait_applied(&client, service, resp.index, wait.timeout).await?;
    }
    Ok(())
}

/// What a route does that its numbers alone do not say, given the live instances (of the
/// service and of the other services the route names): a target with no instance gives its
/// share to the others; with none of its targets live, the route is set aside and every live
/// instance of the service serves.
pub fn warnings(
    service: &ServiceName,
    route: &Route,
    instances: &[baker_client::Instance],
) -> Vec<String> {
    let idle = idle_targets(service, route, instances);
    let names: Vec<String> = idle.iter().map(ToString::to_string).collect();
    if route_falls_back(route, service, instances) {
        let own = instances.iter().filter(|i| i.service == *service).count();
        let what = if route.is_version_only() {
            "has a version this route sends traffic to"
        } else {
            "belongs to a target this route sends traffic to"
        };
        let of = if route.is_version_only() {
            format!("of {service} ")
        } else {
            String::new()
        };
        return vec![format!(
            "no live instance {of}{what} ({}); until one registers, all {own} live instance(s) \
             {}serve by their weights, as with no route",
            names.join(", "),
            if of.is_empty() {
                format!("of {service} ")
            } else {
                String::new()
            }
        )];
    }
    if instances.is_empty() {
        return vec![format!(
            "{service} has no live instance: nothing serves it until one registers"
        )];
    }
    idle.iter()
        .map(|target| match target {
            Target::Version(version) => format!(
                "no live instance of {service} has version {version}; its share goes to the \
                 other {} of the route until one registers",
                if route.is_version_only() {
                    "versions"
                } else {
                    "targets"
                }
            ),
            Target::Service(other) => format!(
                "{other} has no live instance; its share goes to the other targets of the route \
                 until one registers"
            ),
            Target::ServiceVersion(other, version) => format!(
                "no live instance of {other} has version {version}; its share goes to the other \
                 targets of the route until one registers"
            ),
        })
        .collect()
}

fn set_line(resp: &RouteResponse) -> String {
    match &resp.route {
        Some(r) => format!(
            "route of {} set: {}",
            resp.service,
            route_text(&resp.service, r)
        ),
        None => format!("route of {} cleared", resp.service),
    }
}

/// Targets a route gives traffic to that no live instance belongs to.
pub fn idle_targets(
    service: &ServiceName,
    route: &Route,
    instances: &[baker_client::Instance],
) -> Vec<Target> {
    route
        .iter()
        .filter(|(t, pct)| **pct > 0 && !instances.iter().any(|i| t.matches(service, i)))
        .map(|(t, _)| t.clone())
        .collect()
}

pub async fn list(ctx: &Ctx) -> anyhow::Result<()> {
    let client = ctx.client()?;
    let routes = client
        .routes()
        .await
        .map_err(|e| Failure::from_client(&client, "list routes", e))?;
    if ctx.json() {
        return ctx.print_json(&routes);
    }
    let mut t = Table::new(&["service", "route"]);
    for (service, route) in &routes.routes {
        t.row(vec![service.to_string(), route_text(service, route)]);
    }
    ctx.print_table(
        &t,
        "no routes: every service's traffic follows its instances' weights",
    )
}

pub async fn clear(ctx: &Ctx, service: &ServiceName, wait: Wait) -> anyhow::Result<()> {
    let client = ctx.client()?;
    let resp = match client.clear_route(service.as_str()).await {
        Ok(resp) => resp,
        // Clearing is idempotent: no route is what was asked for.
        Err(ClientError::Refused {
            status: StatusCode::NOT_FOUND,
            ..
        }) => RouteResponse {
            index: 0,
            service: service.clone(),
            route: None,
        },
        Err(e) => {
            return Err(
                Failure::from_client(&client, &format!("clear the route of {service}"), e).into(),
            )
        }
    };
    if ctx.json() {
        ctx.print_json(&resp)?;
    } else {
        ctx.print(&format!(
            "route of {service} cleared: traffic follows the instances' weights"
        ))?;
    }
    if wait.wait {
        let index = match resp.index {
            // There was no route: wait for whatever the directory is at.
            0 => client.routes().await.map(|r| r.index).unwrap_or(0),
            i => i,
        };
        wait_applied(&client, service, index, wait.timeout).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(pairs: &[(&str, u64)]) -> Vec<(Target, u64)> {
        pairs
            .iter()
            .map(|(v, p)| (Target::parse_as("t", v, None).unwrap(), *p))
            .collect()
    }

    fn svc(name: &str) -> ServiceName {
        name.parse().unwrap()
    }

    fn inst(service: &str, id: &str, version: &str) -> baker_client::Instance {
        baker_client::Instance {
            version: version.parse().unwrap(),
            ..baker_client::Instance::sample(service, id)
        }
    }

    #[test]
    fn builds_valid_routes() {
        let r = build_route(&svc("emitter"), &s(&[("1", 90), ("2", 10)])).unwrap();
        assert_eq!(r, [("1".to_owned(), 90), ("2".to_owned(), 10)].into());
        let r = build_route(&svc("monolith"), &s(&[("1", 90), ("barker@2", 10)])).unwrap();
        assert_eq!(
            r,
            [("1".to_owned(), 90), ("barker@2".to_owned(), 10)].into()
        );
    }

    #[test]
    fn bare_names_of_live_services_are_services() {
        let live: BTreeMap<ServiceName, Vec<baker_client::Instance>> = [
            (
                svc("monolith"),
                vec![inst("monolith", "a", "1"), inst("monolith", "b", "api")],
            ),
            (svc("barker"), vec![inst("barker", "x", "2")]),
            (svc("api"), vec![inst("api", "y", "1")]),
        ]
        .into();
        let resolved = resolve(
            &svc("monolith"),
            &s(&[
                ("monolith", 40),
                ("barker", 20),
                ("api", 10),
                ("2", 10),
                ("nobody", 10),
                ("barker@2", 10),
            ]),
            &live,
        );
        let text: Vec<String> = resolved.iter().map(|(t, _)| t.to_string()).collect();
        assert_eq!(
            text,
            ["monolith@*", "barker@*", "api", "2", "nobody", "barker@2"],
            "api is a live version of monolith; nobody is no live service"
        );
        let err = build_route(&svc("monolith"), &resolved).unwrap_err();
        assert!(
            err.to_string().contains("route.api: monolith@* already"),
            "{err}"
        );
        let resolved = resolve(
            &svc("monolith"),
            &s(&[("monolith", 70), ("barker", 30)]),
            &live,
        );
        let r = build_route(&svc("monolith"), &resolved).unwrap();
        assert_eq!(
            r,
            [("monolith@*".to_owned(), 70), ("barker@*".to_owned(), 30)].into()
        );
    }

    #[test]
    fn reports_every_problem() {
        let err =
            build_route(&svc("emitter"), &s(&[("1", 50), ("1", 40), ("2", 101)])).unwrap_err();
        let text = err.to_string();
        assert!(
            text.starts_with("the route for emitter is not valid, nothing was changed: "),
            "{text}"
        );
        assert!(text.contains("version 1 is named more than once"), "{text}");
        assert!(
            text.contains("route.2: must be a percentage between 0 and 100, got 101"),
            "{text}"
        );
        assert_eq!(err.exit_code(), 2);
        let err = build_route(&svc("emitter"), &s(&[("1", 80), ("2", 10)])).unwrap_err();
        assert!(
            err.to_string()
                .ends_with("route: percentages must sum to 100, got 90"),
            "{err}"
        );
        let err = build_route(&svc("m"), &s(&[("barker@*", 50), ("barker@2", 50)])).unwrap_err();
        assert!(
            err.to_string().contains("route.barker@2: barker@* already"),
            "{err}"
        );
    }

    #[test]
    fn warnings_say_where_traffic_goes() {
        let g = svc("greeting");
        let live = [inst("greeting", "a", "1"), inst("greeting", "b", "2")];
        let r = |pairs: &[(&str, u64)]| -> Route {
            let splits = pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect();
            validate_route_of(&g, &splits).unwrap()
        };
        assert_eq!(
            warnings(&g, &r(&[("3", 100)]), &live),
            [
                "no live instance of greeting has a version this route sends traffic to (3); \
              until one registers, all 2 live instance(s) serve by their weights, as with no \
              route"
            ]
        );
        assert_eq!(
            warnings(&g, &r(&[("1", 90), ("3", 10)]), &live),
            [
                "no live instance of greeting has version 3; its share goes to the other versions \
              of the route until one registers"
            ]
        );
        assert!(warnings(&g, &r(&[("1", 90), ("2", 10)]), &live).is_empty());
        assert_eq!(
            warnings(&g, &r(&[("1", 100)]), &[]),
            ["greeting has no live instance: nothing serves it until one registers"]
        );
        assert_eq!(
            warnings(&g, &r(&[("1", 90), ("barker@*", 10)]), &live),
            [
                "barker has no live instance; its share goes to the other targets of the route \
              until one registers"
            ]
        );
        assert_eq!(
            warnings(&g, &r(&[("3", 90), ("barker@2", 10)]), &live),
            [
                "no live instance belongs to a target this route sends traffic to (3, barker@2); \
              until one registers, all 2 live instance(s) of greeting serve by their weights, as \
              with no route"
            ]
        );
        let with_barker = [live[0].clone(), inst("barker", "x", "2")];
        assert!(warnings(&g, &r(&[("1", 90), ("barker@2", 10)]), &with_barker).is_empty());
    }

    #[test]
    fn idle_targets_ignore_zero_shares() {
        let route: Route = [
            ("1".parse().unwrap(), 90),
            ("2".parse().unwrap(), 10),
            ("3".parse().unwrap(), 0),
        ]
        .into();
        let idle = idle_targets(&svc("s"), &route, &[]);
        assert_eq!(
            idle.iter().map(ToString::to_string).collect::<Vec<_>>(),
            ["1", "2"]
        );
    }
}
