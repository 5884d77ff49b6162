//! `baker register` and `baker deregister`, for scripts and one-off changes.

use baker_client::model::{InstanceId, InstanceSpec, ServiceName};
use serde::Serialize;

use super::args::RegisterArgs;
use super::human::{instance_line, ms};
use super::{Ctx, Failure};

/// The registration to send, checked as the directory will check it; every problem at once.
pub fn build_spec(args: &RegisterArgs) -> Result<InstanceSpec, Failure> {
    let spec = InstanceSpec {
        address: args.address.clone(),
        port: args.port,
        version: args.version.clone(),
        weight: args.weight,
        tags: args.tags.clone(),
        ttl_ms: args.ttl,
        // An empty BAKER_ZONE counts as unset, as every empty variable does.
        zone: args
            .zone
            .as_deref()
            .map(str::trim)
            .filter(|z| !z.is_empty())
            .map(str::to_owned),
    };
    match spec.validate() {
        Ok(_) => Ok(spec),
        Err(errors) => Err(Failure::Usage(format!(
            "cannot register {}/{}: {}",
            args.service,
            args.id,
            errors
                .iter()
                .map(|e| format!("--{}", e.to_string().replace("ttl_ms", "ttl")))
                .collect::<Vec<_>>()
                .join("; ")
        ))),
    }
}

pub async fn register(ctx: &Ctx, args: &RegisterArgs) -> anyhow::Result<()> {
    let spec = build_spec(args)?;
    let client = ctx.client()?;
    let action = format!("register {}/{}", args.service, args.id);
    let instance = client
        .register(args.service.as_str(), args.id.as_str(), &spec)
        .await
        .map_err(|e| Failure::from_client(&client, &action, e))?;
    if ctx.json() {
        return ctx.print_json(&instance);
    }
    ctx.print(&format!(
        "registered {} (expires in {} unless registered again)",
        instance_line(&instance),
        ms(instance.ttl_ms)
    ))
}

#[derive(Serialize)]
struct Deregistered<'a> {
    service: &'a ServiceName,
    id: &'a InstanceId,
    deregistered: bool,
}

pub async fn deregister(ctx: &Ctx, service: &ServiceName, id: &InstanceId) -> anyhow::Result<()> {
    let client = ctx.client()?;
    client
        .deregister(service.as_str(), id.as_str())
        .await
        .map_err(|e| Failure::from_client(&client, &format!("deregister {service}/{id}"), e))?;
    if ctx.json() {
        return ctx.print_json(&Deregistered {
            service,
            id,
            deregistered: true,
        });
    }
    ctx.print(&format!("deregistered {service}/{id}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> RegisterArgs {
        RegisterArgs {
            service: "emitter".parse().unwrap(),
            id: "a".parse().unwrap(),
            address: "10.0.0.1".parse().unwrap(),
            port: 8080,
            version: None,
            weight: None,
            tags: vec![],
            ttl: None,
            zone: None,
        }
    }

    #[test]
    fn valid_spec_keeps_defaults_to_the_directory() {
        let spec = build_spec(&args()).unwrap();
        assert_eq!((spec.version, spec.weight, spec.ttl_ms), (None, None, None));
    }

    #[test]
    fn the_zone_is_sent_as_given() {
        let mut a = args();
        a.zone = Some("eu-1a".into());
        assert_eq!(build_spec(&a).unwrap().zone.as_deref(), Some("eu-1a"));
        a.zone = Some(" ".into());
        assert_eq!(build_spec(&a).unwrap().zone, None, "empty counts as unset");
    }

    #[test]
    fn names_every_bad_flag() {
        let mut a = args();
        a.address = "not an address".into();
        a.port = 70000;
        a.weight = Some(0);
        a.ttl = Some(10);
        a.zone = Some("EU 1".into());
        let err = build_spec(&a).unwrap_err().to_string();
        assert!(
            err.starts_with("cannot register emitter/a: --address: "),
            "{err}"
        );
        assert!(
            err.contains("--port: must be between 1 and 65535, got 70000"),
            "{err}"
        );
        assert!(
            err.contains("--weight: must be between 1 and 256, got 0"),
            "{err}"
        );
        assert!(err.contains("--ttl: must be between 100 and"), "{err}");
        assert!(err.contains("--zone: "), "{err}");
    }
}
