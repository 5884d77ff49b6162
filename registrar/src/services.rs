//! The services one registrar announces: the one `BAKER_SERVICE` names, and one per table of
//! the TOML file `BAKER_CONFIG` names.
//!
//! A table holds the settings of one service under the names of the one-service variables,
//! without the prefix and in lower case (`target`, `check`, `interval`, `rise`, ...), and goes
//! through the same parsing and validation as those variables: the table is turned into the
//! environment a one-service registrar would have had, and each problem found there is named
//! by the file, the table and the key. `BAKER_DIRECTORY`, `BAKER_TOKEN`, `BAKER_CA` and
//! `BAKER_ZONE` apply to every service: one registrar runs on one host, in one zone.

use std::collections::HashMap;
use std::path::Path;

use baker_client::config::vars::{
    self, ENV_CA, ENV_CONFIG, ENV_DIRECTORY, ENV_SERVICE, ENV_TARGET, ENV_TOKEN, ENV_ZONE,
};
use baker_client::config::{strays, ConfigErrors, Environment, Reader, Stray, PREFIX};
use baker_client::model::{printable, InstanceId, ServiceName};

use crate::config::{directory_and_token, parse_zone, Config};

/// Keys of a table that are not service settings: they apply to the whole registrar.
const SHARED: &[&str] = &[ENV_CONFIG, ENV_DIRECTORY, ENV_TOKEN, ENV_CA, ENV_ZONE];
/// Keys whose value may be written as a TOML array of strings or numbers.
const LISTS: &[&str] = &["tags", "check_codes"];

/// Reads the services to announce from `env`, reading the file `BAKER_CONFIG` names (if any)
/// with `read`; reports every problem of the variables and of the file at once.
///
/// Without `BAKER_CONFIG` this is exactly [`Config::from_env`]. With it, the file's services
/// come after the one of `BAKER_SERVICE`, if that is set; without `BAKER_SERVICE`, the other
/// one-service variables have no service to apply to and are refused.
pub fn from_env(
    env: &Environment,
    hostname: &str,
    read: impl FnOnce(&Path) -> std::io::Result<String>,
) -> Result<Vec<Config>, ConfigErrors> {
    let mut r = Reader::new(&vars::REGISTRAR, env);
    let path = r.get(ENV_CONFIG).map(|p| p.trim().to_owned());
    let (directory, token, ca) = directory_and_token(&mut r);
    let zone = parse_zone(&mut r);
    let Some(path) = path else {
        // Config::from_env checks the names of the variables, once.
        let mut errs = r.value_errors();
        return match Config::from_env(env, hostname) {
            Ok(c) if errs.is_empty() => Ok(vec![c]),
            Ok(_) => Err(errs),
            Err(e) => {
                merge(&mut errs, e);
                Err(errs)
            }
        };
    };

    let mut configs = Vec::new();
    let env_service = r.is_set(ENV_SERVICE);
    if !env_service {
        for v in vars::REGISTRAR.vars {
            if !SHARED.contains(&v.name) && v.name != ENV_SERVICE && r.is_set(v.name) {
                r.push(
                    v.name,
                    "sets the service of BAKER_SERVICE, which is not set: with BAKER_CONFIG, \
                     write it in the service's table instead",
                );
            }
        }
    }
    // Config::from_env checks the names when it runs; else they are checked here.
    let mut errs = if env_service {
        r.value_errors()
    } else {
        r.into_errors()
    };
    if env_service {
        match Config::from_env(env, hostname) {
            Ok(c) => configs.push(c),
            Err(e) => merge(&mut errs, e),
        }
    }

    match read(Path::new(&path)) {
        Err(e) => errs.push(ENV_CONFIG, format!("cannot read {path}: {e}")),
        Ok(text) => {
            let file = parse_file(&path, &text, hostname);
            merge(&mut errs, file.errs);
            if file.services.is_empty() && !env_service && errs.is_empty() {
                errs.push(
                    ENV_CONFIG,
                    format!(
                        "{path} names no service: add a table such as [emitter] with \
                         target = \"http://127.0.0.1:8080\""
                    ),
                );
            }
            let mut seen: HashMap<(ServiceName, InstanceId), String> = configs
                .iter()
                .map(|c| {
                    (
                        (c.service.clone(), c.id.clone()),
                        "BAKER_SERVICE".to_owned(),
                    )
                })
                .collect();
            for (table, mut config) in file.services {
                let key = (config.service.clone(), config.id.clone());
                if let Some(first) = seen.get(&key) {
                    errs.push(
                        format!("{path} [{table}] id"),
                        format!(
                            "registers {}/{} as {first} does: give each its own id",
                            key.0, key.1
                        ),
                    );
                    continue;
                }
                seen.insert(key, format!("[{table}]"));
                config.directory.clone_from(&directory);
                config.token.clone_from(&token);
                config.ca.clone_from(&ca);
                config.zone.clone_from(&zone);
                config.target_from = format!("{path} [{table}]");
                configs.push(config);
            }
        }
    }
    errs.finish(configs)
}

/// The services of one file, and every problem found in it.
#[derive(Debug, Default)]
struct File {
    /// Each table's name and its service.
    services: Vec<(String, Config)>,
    errs: ConfigErrors,
}

/// Parses the text of the file at `path`; the directory and token of each service are left at
/// their defaults for the caller to set.
fn parse_file(path: &str, text: &str, hostname: &str) -> File {
    let mut file = File::default();
    let doc: toml::Table = match text.parse() {
        Ok(t) => t,
        Err(e) => {
            let e = e.to_string();
            let e = e.trim_end().replace('\n', "\n    ");
            file.errs
                .push(ENV_CONFIG, format!("{path} is not valid TOML: {e}"));
            return file;
        }
    };
    for (table, value) in &doc {
        let at = |key: &str| format!("{path} [{table}] {key}");
        let toml::Value::Table(settings) = value else {
            file.errs.push(
                format!("{path} {table}"),
                "is not a table: each service is a table of its own, such as [emitter]",
            );
            continue;
        };
        let mut pairs: Vec<(String, String)> = Vec::new();
        let mut bad = ConfigErrors::default();
        let mut service_key = false;
        for (key, value) in settings {
            let name = format!("{PREFIX}{}", key.to_ascii_uppercase());
            let known = *key == key.to_ascii_lowercase() && vars::REGISTRAR.reads(&name);
            if known && SHARED.contains(&name.as_str()) {
                bad.push(
                    at(key),
                    format!(
                        "is shared by every service: set {name} in the registrar's environment"
                    ),
                );
                continue;
            }
            if !known {
                bad.push(at(key), unknown_key(&name));
                continue;
            }
            service_key |= name == ENV_SERVICE;
            match scalar(key, value) {
                Ok(v) => pairs.push((name, v)),
                Err(e) => bad.push(at(key), e),
            }
        }
        if !service_key {
            pairs.push((ENV_SERVICE.to_owned(), table.clone()));
        }
        let has_target = pairs
            .iter()
            .any(|(k, v)| k == ENV_TARGET && !v.trim().is_empty());
        if !has_target && !bad.0.iter().any(|(k, _)| *k == at("target")) {
            bad.push(
                at("target"),
                "is required: the app, such as \"http://127.0.0.1:8080\" or \"tcp://127.0.0.1:5432\"",
            );
        }
        let pairs: Vec<(&str, &str)> = pairs
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let parsed = Config::from_env(&Environment::from_pairs(&pairs), hostname);
        match parsed {
            Ok(config) if bad.is_empty() => file.services.push((table.clone(), config)),
            Ok(_) => {}
            Err(e) => {
                for (var, msg) in e.0 {
                    // Recorded above, in words that fit a file.
                    if var == ENV_TARGET && !has_target {
                        continue;
                    }
                    let (place, msg) = if var == ENV_SERVICE && !service_key {
                        (
                            format!("{path} [{table}]"),
                            format!(
                                "{} (the table's name is the service's, unless it sets service)",
                                in_file_words(&msg)
                            ),
                        )
                    } else {
                        (at(&key_of(&var)), in_file_words(&msg))
                    };
                    bad.push(place, msg);
                }
            }
        }
        merge(&mut file.errs, bad);
    }
    file
}

/// The value of `key` as the variable of the same name would hold it: strings as they are,
/// numbers written out, and for lists (`tags`, `check_codes`) an array joined with commas.
fn scalar(key: &str, value: &toml::Value) -> Result<String, String> {
    use toml::Value;
    match value {
        Value::String(s) => Ok(s.clone()),
        Value::Integer(i) => Ok(i.to_string()),
        Value::Float(f) => Ok(f.to_string()),
        Value::Array(items) if LISTS.contains(&key) => {
            let mut out = Vec::new();
            for item in items {
                match item {
                    Value::String(s) if !s.contains(',') => out.push(s.clone()),
                    Value::Integer(i) => out.push(i.to_string()),
                    other => {
                        return Err(format!(
                            "must be a list of names or numbers without commas (got {})",
                            shown(other)
                        ))
                    }
                }
            }
            Ok(out.join(","))
        }
        other => Err(format!(
            "must be a string{} (got {})",
            if LISTS.contains(&key) {
                " or a list"
            } else {
                " or a number"
            },
            shown(other)
        )),
    }
}

/// A TOML value as the file writes it, for an error message.
fn shown(value: &toml::Value) -> String {
    match value {
        toml::Value::String(s) => format!("\"{}\"", printable(s)),
        toml::Value::Table(_) => "a table".to_owned(),
        toml::Value::Array(_) => "a list".to_owned(),
        toml::Value::Integer(i) => i.to_string(),
        toml::Value::Float(f) => f.to_string(),
        toml::Value::Boolean(b) => b.to_string(),
        toml::Value::Datetime(d) => d.to_string(),
    }
}

/// What is wrong with a key that is no setting of a service.
fn unknown_key(name: &str) -> String {
    let suggestion = match strays(&vars::REGISTRAR, [name]).first() {
        Some(Stray::Unknown {
            suggestion: Some(s),
            ..
        }) if !SHARED.contains(s) => Some(key_of(s)),
        // A name the registrar reads, written in another case.
        None => Some(
            name.strip_prefix(PREFIX)
                .unwrap_or(name)
                .to_ascii_lowercase(),
        ),
        _ => None,
    };
    match suggestion {
        Some(s) => format!("is not a setting of a service; did you mean {s}?"),
        None => format!(
            "is not a setting of a service ({} are)",
            service_keys().join(", ")
        ),
    }
}

/// The keys a table may hold.
pub fn service_keys() -> Vec<String> {
    vars::REGISTRAR
        .vars
        .iter()
        .filter(|v| !SHARED.contains(&v.name))
        .map(|v| key_of(v.name))
        .collect()
}

/// `BAKER_CHECK_CODES` → `check_codes`.
fn key_of(var: &str) -> String {
    var.strip_prefix(PREFIX).unwrap_or(var).to_ascii_lowercase()
}

/// A message about variables, with each variable named by its key in a table.
fn in_file_words(msg: &str) -> String {
    let mut names: Vec<&str> = vars::REGISTRAR.vars.iter().map(|v| v.name).collect();
    // Longest first, so that BAKER_CHECK_CODES is not read as BAKER_CHECK.
    names.sort_by_key(|n| std::cmp::Reverse(n.len()));
    let mut out = msg.to_owned();
    for n in names {
        out = out.replace(n, &key_of(n));
    }
    out
}

fn merge(into: &mut ConfigErrors, from: ConfigErrors) {
    for (var, msg) in from.0 {
        into.push(var, msg);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::probe::Check;

    const PATH: &str = "/etc/baker/registrar.toml";

    fn parse(pairs: &[(&str, &str)], file: &str) -> Result<Vec<Config>, ConfigErrors> {
        let mut env = vec![("BAKER_CONFIG", PATH)];
        env.extend_from_slice(pairs);
        from_env(&Environment::from_pairs(&env), "web-01", |p| {
            assert_eq!(p, Path::new(PATH));
            Ok(file.to_owned())
        })
    }

    fn places(errs: &ConfigErrors) -> Vec<&str> {
        errs.0.iter().map(|(v, _)| v.as_str()).collect()
    }

    #[test]
    fn one_table_per_service() {
        let configs = parse(
            &[
                ("BAKER_DIRECTORY", "http://directory:7700"),
                ("BAKER_TOKEN", "s3cret"),
            ],
            r#"
            [emitter]
            target = "http://127.0.0.1:8080"

            [db]
            service = "postgres"
            target = "tcp://127.0.0.1:5432"
            id = "db-1"
            interval = "500ms"
            timeout = "200ms"
            rise = 3
            fall = 1
            version = 2
            weight = 50
            tags = ["primary", "eu-west"]
            advertise = "192.168.0.10"

            [web]
            target = "http://127.0.0.1:8081"
            check = "http:/ready"
            check_codes = [200, 204]
            check_body = "ok"
            tags = "a,b"
            "#,
        )
        .unwrap();
        assert_eq!(configs.len(), 3);
        let [emitter, db, web] = &configs[..] else {
            unreachable!()
        };
        assert_eq!(
            (emitter.service.as_str(), emitter.id.as_str()),
            ("emitter", "web-01-8080")
        );
        assert_eq!(emitter.interval, Duration::from_secs(2));
        assert_eq!((emitter.rise, emitter.fall, emitter.weight), (2, 2, 100));
        for c in &configs {
            assert_eq!(c.directory, "http://directory:7700");
            assert_eq!(c.token.as_deref(), Some("s3cret"));
        }
        assert_eq!((db.service.as_str(), db.id.as_str()), ("postgres", "db-1"));
        assert_eq!(db.check, Check::Tcp);
        assert_eq!(
            (db.interval, db.timeout),
            (Duration::from_millis(500), Duration::from_millis(200))
        );
        assert_eq!((db.rise, db.fall, db.weight), (3, 1, 50));
        assert_eq!(db.version, "2");
        assert_eq!(db.tags, ["primary", "eu-west"]);
        assert_eq!(db.advertise.authority(), "192.168.0.10:5432");
        assert_eq!(
            web.check,
            Check::Http {
                path: "/ready".into(),
                codes: vec![200, 204],
                body: Some("ok".into())
            }
        );
        assert_eq!(web.tags, ["a", "b"]);
    }

    #[test]
    fn without_a_file_the_variables_alone_as_before() {
        let env = Environment::from_pairs(&[
            ("BAKER_SERVICE", "emitter"),
            ("BAKER_TARGET", "http://10.0.0.5:8080"),
        ]);
        let configs = from_env(&env, "web-01", |_| panic!("no file to read")).unwrap();
        assert_eq!(configs, [Config::from_env(&env, "web-01").unwrap()]);
    }

    #[test]
    fn the_service_of_the_variables_comes_first_beside_the_file() {
        let configs = parse(
            &[
                ("BAKER_SERVICE", "emitter"),
                ("BAKER_TARGET", "http://10.0.0.5:8080"),
                ("BAKER_INTERVAL", "1s"),
            ],
            "[db]\ntarget = \"tcp://127.0.0.1:5432\"\n",
        )
        .unwrap();
        let names: Vec<_> = configs.iter().map(|c| c.service.as_str()).collect();
        assert_eq!(names, ["emitter", "db"]);
        // The variables set the first service only.
        assert_eq!(configs[0].interval, Duration::from_secs(1));
        assert_eq!(configs[1].interval, Duration::from_secs(2));
    }

    #[test]
    fn one_service_variables_need_their_service() {
        let errs = parse(
            &[("BAKER_INTERVAL", "1s"), ("BAKER_TARGET", "http://x:1")],
            "[db]\ntarget = \"tcp://127.0.0.1:5432\"\n",
        )
        .unwrap_err();
        assert_eq!(places(&errs), ["BAKER_TARGET", "BAKER_INTERVAL"]);
        assert!(
            errs.0[0].1.contains("BAKER_SERVICE, which is not set"),
            "{errs}"
        );
    }

    #[test]
    fn every_problem_of_the_file_is_named_by_table_and_key() {
        let errs = parse(
            &[("BAKER_DIRECTORY", "directory:7700")],
            r#"
            stray = 1

            [Emitter]
            target = "http://app"
            check = "ping"
            interval = "often"
            rise = 0
            weight = 1000
            tags = ["ok", "Not Ok"]

            [db]
            check_codes = "200"
            verison = "2"
            directory = "http://elsewhere:7700"
            fall = true

            [web]
            target = "tcp://127.0.0.1:9000"
            check_body = "ok"
            "#,
        )
        .unwrap_err();
        assert_eq!(
            places(&errs),
            [
                "BAKER_DIRECTORY",
                "/etc/baker/registrar.toml stray",
                "/etc/baker/registrar.toml [Emitter]",
                "/etc/baker/registrar.toml [Emitter] target",
                "/etc/baker/registrar.toml [Emitter] check",
                "/etc/baker/registrar.toml [Emitter] interval",
                "/etc/baker/registrar.toml [Emitter] rise",
                "/etc/baker/registrar.toml [Emitter] weight",
                "/etc/baker/registrar.toml [Emitter] tags",
                "/etc/baker/registrar.toml [db] verison",
                "/etc/baker/registrar.toml [db] directory",
                "/etc/baker/registrar.toml [db] fall",
                "/etc/baker/registrar.toml [db] target",
                "/etc/baker/registrar.toml [web] check_body",
            ],
            "{errs}"
        );
        let text = errs.to_string();
        for expected in [
            "[Emitter]: must start with a lowercase letter or digit, got 'E' (got \"Emitter\") \
             (the table's name is the service's, unless it sets service)",
            "[Emitter] check: must be http:/<path> (such as http:/health) or tcp (got \"ping\")",
            "[Emitter] rise: must be a whole number from 1 to 100 (got \"0\")",
            "[db] verison: is not a setting of a service; did you mean version?",
            "[db] directory: is shared by every service: set BAKER_DIRECTORY in the registrar's \
             environment",
            "[db] fall: must be a string or a number (got true)",
            "[db] target: is required",
            "[web] check_body: applies only to http checks, and check is tcp",
            "stray: is not a table",
        ] {
            assert!(text.contains(expected), "{expected:?} not in:\n{text}");
        }
    }

    #[test]
    fn the_zone_is_the_registrars_for_every_service() {
        let configs = parse(
            &[
                ("BAKER_ZONE", "rack-2"),
                ("BAKER_SERVICE", "emitter"),
                ("BAKER_TARGET", "http://10.0.0.5:8080"),
            ],
            "[db]\ntarget = \"tcp://127.0.0.1:5432\"\n",
        )
        .unwrap();
        let zones: Vec<_> = configs
            .iter()
            .map(|c| c.zone.as_ref().map(|z| z.as_str()))
            .collect();
        assert_eq!(zones, [Some("rack-2"), Some("rack-2")]);

        let errs = parse(
            &[("BAKER_ZONE", "Rack 2")],
            "[db]\ntarget = \"tcp://127.0.0.1:5432\"\nzone = \"rack-3\"\n",
        )
        .unwrap_err();
        assert_eq!(
            places(&errs),
            ["BAKER_ZONE", "/etc/baker/registrar.toml [db] zone"],
            "{errs}"
        );
        assert!(
            errs.to_string().contains(
                "[db] zone: is shared by every service: set BAKER_ZONE in the registrar's \
                 environment"
            ),
            "{errs}"
        );
    }

    #[test]
    fn a_file_that_is_not_toml_is_one_problem_with_its_line() {
        let errs = parse(&[], "[emitter]\ntarget = http://x:1\n").unwrap_err();
        assert_eq!(places(&errs), ["BAKER_CONFIG"]);
        let text = errs.to_string();
        assert!(
            text.contains("/etc/baker/registrar.toml is not valid TOML"),
            "{text}"
        );
        assert!(text.contains("line 2"), "{text}");
    }

    #[test]
    fn a_file_that_cannot_be_read_or_names_nothing_is_refused() {
        let env = Environment::from_pairs(&[("BAKER_CONFIG", "/nowhere.toml")]);
        let errs = from_env(&env, "h", |p| std::fs::read_to_string(p)).unwrap_err();
        assert_eq!(places(&errs), ["BAKER_CONFIG"]);
        assert!(
            errs.0[0].1.starts_with("cannot read /nowhere.toml: "),
            "{errs}"
        );

        let errs = parse(&[], "# nothing yet\n").unwrap_err();
        assert!(errs.0[0].1.contains("names no service"), "{errs}");
    }

    #[test]
    fn two_services_cannot_register_the_same_instance() {
        let errs = parse(
            &[
                ("BAKER_SERVICE", "emitter"),
                ("BAKER_TARGET", "http://127.0.0.1:8080"),
            ],
            r#"
            [emitter]
            target = "http://127.0.0.1:8080"
            [other]
            service = "emitter"
            target = "http://127.0.0.1:9090"
            id = "web-01-8080"
            "#,
        )
        .unwrap_err();
        assert_eq!(
            errs.to_string(),
            "invalid configuration (2 problems):\n  \
             /etc/baker/registrar.toml [emitter] id: registers emitter/web-01-8080 as \
             BAKER_SERVICE does: give each its own id\n  \
             /etc/baker/registrar.toml [other] id: registers emitter/web-01-8080 as \
             BAKER_SERVICE does: give each its own id"
        );
    }

    #[test]
    fn the_keys_are_the_variables_without_their_prefix() {
        assert_eq!(
            service_keys().join(" "),
            "service id target advertise check check_codes check_body timeout interval rise \
             fall version weight tags"
        );
    }
}
