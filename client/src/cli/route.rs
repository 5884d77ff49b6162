//! `baker route set|list|clear`.

use std::collections::BTreeMap;

use baker_client::api::ClientError;
use baker_client::model::{
    route_falls_back, validate_route, Route, RouteResponse, ServiceName, Version,
};
use reqwest::StatusCode;

use super::ambassadors::wait_applied;
use super::human::route_text;
use super::table::Table;
use super::{Ctx, Failure, Wait};

/// Turns `1=90 2=10` into the route to send, checked as the directory will check it; every
/// problem is reported at once.
pub fn build_route(
    service: &str,
    splits: &[(Version, u64)],
) -> Result<BTreeMap<String, u64>, Failure> {
    let mut route = BTreeMap::new();
    let mut problems = Vec::new();
    for (version, pct) in splits {
        if route.insert(version.to_string(), *pct).is_some() {
            problems.push(format!("version {version} is named more than once"));
        }
    }
    if let Err(errors) = validate_route(&route) {
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

pub async fn set(
    ctx: &Ctx,
    service: &ServiceName,
    splits: &[(Version, u64)],
    force: bool,
    wait: Wait,
) -> anyhow::Result<()> {
    let route = build_route(service.as_str(), splits)?;
    let client = ctx.client()?;
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
    if let (Some(route), Ok(current)) = (&resp.route, client.service(service.as_str()).await) {
        for line in warnings(service.as_str(), route, &current.instances) {
            eprintln!("warning: {line}");
        }
    }
    if wait.wait {
        wait_applied(&client, service, resp.index, wait.timeout).await?;
    }
    Ok(())
}

/// What a route does that its numbers alone do not say, given the live instances: a version
/// with no instance gives its share to the others; with none of its versions live, the route
/// is set aside and every live instance serves.
pub fn warnings(service: &str, route: &Route, instances: &[baker_client::Instance]) -> Vec<String> {
    let idle = idle_versions(route, instances);
    if route_falls_back(route, instances.iter().map(|i| i.version.as_str())) {
        return vec![format!(
            "no live instance of {service} has a version this route sends traffic to ({}); \
             until one registers, all {} live instance(s) serve by their weights, as with no \
             route",
            idle.join(", "),
            instances.len()
        )];
    }
    if instances.is_empty() {
        return vec![format!(
            "{service} has no live instance: nothing serves it until one registers"
        )];
    }
    idle.iter()
        .map(|version| {
            format!(
                "no live instance of {service} has version {version}; its share goes to the \
                 other versions of the route until one registers"
            )
        })
        .collect()
}

fn set_line(resp: &RouteResponse) -> String {
    match &resp.route {
        Some(r) => format!("route of {} set: {}", resp.service, route_text(r)),
        None => format!("route of {} cleared", resp.service),
    }
}

/// Versions a route gives traffic to that no live instance has.
pub fn idle_versions(route: &Route, instances: &[baker_client::Instance]) -> Vec<Version> {
    route
        .iter()
        .filter(|(v, pct)| **pct > 0 && !instances.iter().any(|i| &i.version == *v))
        .map(|(v, _)| v.clone())
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
        t.row(vec![service.to_string(), route_text(route)]);
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

    fn s(pairs: &[(&str, u64)]) -> Vec<(Version, u64)> {
        pairs
            .iter()
            .map(|(v, p)| (v.parse().unwrap(), *p))
            .collect()
    }

    #[test]
    fn builds_valid_routes() {
        let r = build_route("emitter", &s(&[("1", 90), ("2", 10)])).unwrap();
        assert_eq!(r, [("1".to_owned(), 90), ("2".to_owned(), 10)].into());
    }

    #[test]
    fn reports_every_problem() {
        let err = build_route("emitter", &s(&[("1", 50), ("1", 40), ("2", 101)])).unwrap_err();
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
        let err = build_route("emitter", &s(&[("1", 80), ("2", 10)])).unwrap_err();
        assert!(
            err.to_string()
                .ends_with("route: percentages must sum to 100, got 90"),
            "{err}"
        );
    }

    #[test]
    fn warnings_say_where_traffic_goes() {
        let inst = |id: &str, version: &str| baker_client::Instance {
            version: version.parse().unwrap(),
            ..baker_client::Instance::sample("greeting", id)
        };
        let live = [inst("a", "1"), inst("b", "2")];
        let r = |pairs: &[(&str, u8)]| -> Route {
            pairs
                .iter()
                .map(|(v, p)| (v.parse().unwrap(), *p))
                .collect()
        };
        assert_eq!(
            warnings("greeting", &r(&[("3", 100)]), &live),
            [
                "no live instance of greeting has a version this route sends traffic to (3); \
              until one registers, all 2 live instance(s) serve by their weights, as with no \
              route"
            ]
        );
        assert_eq!(
            warnings("greeting", &r(&[("1", 90), ("3", 10)]), &live),
            [
                "no live instance of greeting has version 3; its share goes to the other versions \
              of the route until one registers"
            ]
        );
        assert!(warnings("greeting", &r(&[("1", 90), ("2", 10)]), &live).is_empty());
        assert_eq!(
            warnings("greeting", &r(&[("1", 100)]), &[]),
            ["greeting has no live instance: nothing serves it until one registers"]
        );
    }

    #[test]
    fn idle_versions_ignore_zero_shares() {
        let route: Route = [
            ("1".parse().unwrap(), 90),
            ("2".parse().unwrap(), 10),
            ("3".parse().unwrap(), 0),
        ]
        .into();
        assert_eq!(idle_versions(&route, &[]), ["1", "2"]);
    }
}
