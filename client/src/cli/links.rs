//! `baker links`: the variables Docker would inject for `--link`, made without Docker.

use std::collections::{BTreeMap, HashMap};

use baker_client::links::{env_prefix, render};

use super::args::LinkSpec;
use super::{Ctx, Failure};

/// The block for `links`, one `KEY=value` a line, each prefixed with `prefix` (`export `).
///
/// As Docker does, an alias with several ports gets one `<ALIAS>_PORT` variable, naming its
/// first port (TCP before UDP, then the lowest number), and the full set for every port.
pub fn block(links: &[LinkSpec], prefix: &str) -> Result<Vec<(String, String)>, Failure> {
    let mut hosts: HashMap<String, &LinkSpec> = HashMap::new();
    let mut groups: Vec<(String, Vec<&LinkSpec>)> = Vec::new();
    for link in links {
        let var = env_prefix(&link.alias);
        if let Some(first) = hosts.get(&var) {
            if first.host != link.host {
                return Err(Failure::Usage(format!(
                    "alias {} links to both {} and {}: one alias names one container",
                    link.alias, first.host, link.host
                )));
            }
            if groups_contain(&groups, &var, link) {
                return Err(Failure::Usage(format!(
                    "{}={}:{}/{} is given twice",
                    link.alias, link.host, link.port, link.proto
                )));
            }
        } else {
            hosts.insert(var.clone(), link);
        }
        match groups.iter_mut().find(|(v, _)| *v == var) {
            Some((_, g)) => g.push(link),
            None => groups.push((var, vec![link])),
        }
    }
    let mut vars = Vec::new();
    for (_, mut group) in groups {
        group.sort_by_key(|l| (l.proto != "tcp", l.port));
        for (n, link) in group.iter().enumerate() {
            let text = render(&link.alias, &link.host, link.port, &link.proto)
                .map_err(|e| Failure::Usage(format!("cannot link {}: {e}", link.alias)))?;
            // The first line is `<ALIAS>_PORT=...`, which only the alias's first port sets.
            for line in text.lines().skip(usize::from(n > 0)) {
                if let Some((k, v)) = line.split_once('=') {
                    vars.push((format!("{prefix}{k}"), v.to_owned()));
                }
            }
        }
    }
    Ok(vars)
}

fn links_same_port(a: &LinkSpec, b: &LinkSpec) -> bool {
    a.port == b.port && a.proto == b.proto
}

fn groups_contain(groups: &[(String, Vec<&LinkSpec>)], var: &str, link: &LinkSpec) -> bool {
    groups
        .iter()
        .filter(|(v, _)| v == var)
        .flat_map(|(_, g)| g)
        .any(|l| links_same_port(l, link))
}

pub fn links(ctx: &Ctx, links: &[LinkSpec], export: bool) -> anyhow::Result<()> {
    let vars = block(links, if export { "export " } else { "" })?;
    if ctx.json() {
        let map: BTreeMap<&str, &str> = vars
            .iter()
            .map(|(k, v)| (k.trim_start_matches("export "), v.as_str()))
            .collect();
        return ctx.print_json(&map);
    }
    let text: String = vars.iter().map(|(k, v)| format!("{k}={v}\n")).collect();
    ctx.print(&text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::args::link_spec;

    fn text(specs: &[&str], prefix: &str) -> Result<String, Failure> {
        let links: Vec<LinkSpec> = specs.iter().map(|s| link_spec(s).unwrap()).collect();
        Ok(block(&links, prefix)?
            .into_iter()
            .map(|(k, v)| format!("{k}={v}\n"))
            .collect())
    }

    #[test]
    fn one_link_is_the_docker_block() {
        assert_eq!(
            text(&["emitter=172.17.0.8:8000"], "").unwrap(),
            "EMITTER_PORT=tcp://172.17.0.8:8000\n\
             EMITTER_PORT_8000_TCP=tcp://172.17.0.8:8000\n\
             EMITTER_PORT_8000_TCP_ADDR=172.17.0.8\n\
             EMITTER_PORT_8000_TCP_PORT=8000\n\
             EMITTER_PORT_8000_TCP_PROTO=tcp\n"
        );
    }

    #[test]
    fn several_ports_share_one_alias_variable() {
        let out = text(&["dns=ns:53/udp", "dns=ns:8053", "dns=ns:53"], "export ").unwrap();
        let alias_lines: Vec<&str> = out
            .lines()
            .filter(|l| l.starts_with("export DNS_PORT="))
            .collect();
        assert_eq!(alias_lines, ["export DNS_PORT=tcp://ns:53"]);
        assert!(out.contains("export DNS_PORT_53_UDP=udp://ns:53\n"));
        assert!(out.contains("export DNS_PORT_8053_TCP_PORT=8053\n"));
        assert_eq!(out.lines().count(), 1 + 3 * 4);
    }

    #[test]
    fn conflicts_are_usage_errors() {
        let err = text(&["a=x:1", "a=y:2"], "").unwrap_err();
        assert!(err.to_string().contains("links to both x and y"), "{err}");
        assert!(text(&["a=x:1", "a=x:1"], "").is_err());
        assert!(text(&["my-svc=x:1", "my_svc=x:1"], "").is_err());
        assert!(text(&["9lives=x:1"], "")
            .unwrap_err()
            .to_string()
            .contains("alias"));
    }
}
