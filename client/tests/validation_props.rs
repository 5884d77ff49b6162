//! Properties of the API's parsing and validation (client/src/model.rs), over generated input.
//!
//! Everything a user sends reaches HAProxy's configuration only as one of the model's types
//! (names, addresses), so their parsers must never panic, must accept exactly the documented
//! shapes, must name the field they reject, and must hold addresses in one canonical form. The
//! oracles here are written independently of the implementation.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv6Addr};

use baker_client::model::{
    printable, validate_port, validate_route, validate_weight, Address, Instance, InstanceId,
    InstanceSpec, ServiceName, Tag, Version, WatchEvent, MAX_TTL_MS, MIN_TTL_MS,
};
use proptest::collection::{btree_map, vec};
use proptest::prelude::*;

/// The documented name pattern `^[a-z0-9][a-z0-9._-]{0,62}$`, written as a byte-level oracle.
fn matches_name_pattern(s: &str) -> bool {
    let b = s.as_bytes();
    let first_ok = |c: u8| c.is_ascii_digit() || c.is_ascii_lowercase();
    let rest_ok = |c: u8| first_ok(c) || c == b'.' || c == b'_' || c == b'-';
    !b.is_empty() && b.len() <= 63 && first_ok(b[0]) && b[1..].iter().all(|&c| rest_ok(c))
}

/// Names that match the pattern.
fn valid_name() -> impl Strategy<Value = String> {
    "[a-z0-9][a-z0-9._-]{0,62}"
}

/// Strings near the pattern's edges: valid names with one character replaced, too long, or
/// made of characters that matter to HAProxy's configuration syntax.
fn near_miss_name() -> impl Strategy<Value = String> {
    prop_oneof![
        (valid_name(), any::<prop::sample::Index>(), any::<char>()).prop_map(|(s, i, c)| {
            let mut chars: Vec<char> = s.chars().collect();
            let at = i.index(chars.len());
            chars[at] = c;
            chars.into_iter().collect()
        }),
        "[a-z0-9][a-z0-9._-]{63,80}",
        "[A-Z._-][a-z0-9._-]{0,10}",
        "[a-z0-9]{1,5}[ \t\r\n#;/\\\\'\"`${}]{1,3}[a-z0-9]{0,5}",
        // Multi-byte characters: few characters, many bytes.
        "[a-z0-9][é€😀]{1,40}",
        "\\PC{0,70}",
    ]
}

/// Whether `label` is a number to `inet_aton`: decimal or octal digits, or 0x and hex digits.
fn is_inet_aton_number(label: &str) -> bool {
    let lower = label.to_ascii_lowercase();
    match lower.strip_prefix("0x") {
        Some(hex) => hex.bytes().all(|c| c.is_ascii_hexdigit()),
        None => !label.is_empty() && label.bytes().all(|c| c.is_ascii_digit()),
    }
}

/// Ways to write an IPv4 address that `inet_aton` reads but that are not the dotted quad:
/// one to three parts, octal or hexadecimal parts, out-of-range last parts.
fn numeric_pseudo_hostname() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<u32>().prop_map(|n| n.to_string()),
        any::<u32>().prop_map(|n| format!("0x{n:x}")),
        any::<u32>().prop_map(|n| format!("0{n:o}")),
        (any::<u8>(), any::<u32>()).prop_map(|(a, n)| format!("{a}.{}", n & 0xff_ffff)),
        (any::<u8>(), any::<u8>(), any::<u16>()).prop_map(|(a, b, n)| format!("0x{a:x}.{b}.{n}")),
        (any::<u8>(), any::<u8>(), any::<u8>(), any::<u8>())
            .prop_map(|(a, b, c, d)| format!("{a:03}.{b:03}.{c:03}.{d:03}")),
        (any::<u8>(), any::<u8>(), any::<u8>(), 256u32..100_000)
            .prop_map(|(a, b, c, d)| format!("{a}.{b}.{c}.{d}")),
    ]
}

/// Any string at all, including control characters and non-ASCII.
fn any_text() -> impl Strategy<Value = String> {
    prop_oneof![any::<String>(), near_miss_name(), valid_name()]
}

/// A route made of valid versions whose percentages sum to exactly 100.
fn summing_route() -> impl Strategy<Value = BTreeMap<String, u64>> {
    btree_map(valid_name(), 0u64..=100, 1..=20)
        .prop_filter("at least one version", |m| !m.is_empty())
        .prop_flat_map(|m| {
            let n = m.len();
            // n - 1 cut points in 0..=100 give n parts summing to 100.
            (Just(m), vec(0u64..=100, n - 1))
        })
        .prop_map(|(m, mut cuts)| {
            cuts.sort_unstable();
            let mut prev = 0;
            let mut parts = Vec::new();
            for c in cuts {
                parts.push(c - prev);
                prev = c;
            }
            parts.push(100 - prev);
            m.into_keys().zip(parts).collect()
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn name_parsing_is_the_pattern(s in any_text()) {
        let result = s.parse::<ServiceName>();
        prop_assert_eq!(result.is_ok(), matches_name_pattern(&s), "{:?} -> {:?}", s, result);
        match result {
            Ok(name) => prop_assert_eq!(name.as_str(), s.as_str()),
            Err(e) => {
                prop_assert_eq!(e.field.as_str(), "service");
                prop_assert!(!e.message.is_empty());
            }
        }
        // Every name type follows the same rule, and JSON is parsed by the same rule.
        prop_assert_eq!(s.parse::<InstanceId>().is_ok(), matches_name_pattern(&s));
        prop_assert_eq!(s.parse::<Version>().is_ok(), matches_name_pattern(&s));
        prop_assert_eq!(s.parse::<Tag>().is_ok(), matches_name_pattern(&s));
        let json = serde_json::to_string(&s).unwrap();
        prop_assert_eq!(serde_json::from_str::<Tag>(&json).is_ok(), matches_name_pattern(&s));
    }

    #[test]
    fn valid_names_are_accepted_and_written_back_unchanged(s in valid_name()) {
        let v: Version = s.parse().unwrap_or_else(|e| panic!("{s:?}: {e}"));
        prop_assert_eq!(v.to_string(), s.clone());
        prop_assert_eq!(serde_json::to_string(&v).unwrap(), serde_json::to_string(&s).unwrap());
    }

    #[test]
    fn near_misses_are_rejected_with_a_truthful_message(s in near_miss_name()) {
        prop_assume!(!matches_name_pattern(&s));
        let e = s.parse::<InstanceId>().unwrap_err();
        prop_assert_eq!(e.field.as_str(), "id");
        let e = Tag::parse_as("tags[2]", &s).unwrap_err();
        prop_assert_eq!(e.field.as_str(), "tags[2]");
        // A length complaint must be about a name that really is too long.
        if e.message.contains("at most") {
            prop_assert!(s.chars().count() > 63, "{:?}: {}", s, e.message);
        }
    }

    #[test]
    fn accepted_addresses_carry_no_configuration_syntax(s in any_text()) {
        if let Ok(a) = s.parse::<Address>() {
            let text = a.as_str();
            prop_assert!(!text.is_empty());
            prop_assert!(
                text.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':')),
                "accepted {:?} as {:?}", s, text
            );
            match a.ip() {
                Some(ip) => prop_assert_eq!(text, ip.to_string()),
                None => {
                    prop_assert!(text.len() <= 253 && !text.contains(':'), "accepted {:?}", s);
                    let last = text.trim_end_matches('.').rsplit('.').next().unwrap_or_default();
                    prop_assert!(!is_inet_aton_number(last), "accepted {:?}", s);
                }
            }
        }
    }

    #[test]
    fn ip_literals_and_dns_names_are_accepted(
        ip in any::<IpAddr>(),
        labels in vec("[a-zA-Z0-9]([a-zA-Z0-9-]{0,20}[a-zA-Z0-9])?", 0..4),
        last in "[a-zA-Z]([a-zA-Z0-9-]{0,20}[a-zA-Z0-9])?",
    ) {
        let a: Address = ip.to_string().parse().unwrap_or_else(|e| panic!("{ip}: {e}"));
        prop_assert_eq!(a.ip(), Some(ip));
        let mut labels = labels;
        labels.push(last);
        let name = labels.join(".");
        let a: Address = name.parse().unwrap_or_else(|e| panic!("{name}: {e}"));
        prop_assert_eq!(a.dns_name(), Some(name.as_str()));
    }

    #[test]
    fn ipv6_addresses_are_held_in_canonical_form(segments in any::<[u16; 8]>(), upper: bool) {
        let ip = Ipv6Addr::from(segments);
        // Every group written out, with leading zeros: the longest way to write it.
        let long = segments.iter().map(|g| format!("{g:04x}")).collect::<Vec<_>>().join(":");
        let long = if upper { long.to_ascii_uppercase() } else { long };
        let a: Address = long.parse().unwrap_or_else(|e| panic!("{long}: {e}"));
        prop_assert_eq!(a.as_str(), ip.to_string());
        let b: Address = serde_json::from_str(&format!("{long:?}")).unwrap();
        prop_assert_eq!(&b, &a);
        prop_assert_eq!(serde_json::to_string(&b).unwrap(), format!("{:?}", ip.to_string()));
    }

    #[test]
    fn numeric_pseudo_hostnames_are_refused(s in numeric_pseudo_hostname()) {
        match s.parse::<Address>() {
            // Only the one standard spelling of an address passes, as that address.
            Ok(a) => prop_assert_eq!(a.ip().map(|ip| ip.to_string()), Some(s.clone())),
            Err(e) => prop_assert_eq!(e.field.as_str(), "address"),
        }
    }

    #[test]
    fn ports_are_1_to_65535(p in any::<u64>(), small in 0u64..70_000) {
        for v in [p, small] {
            match validate_port("port", v) {
                Ok(got) => prop_assert!((1..=65_535).contains(&v) && u64::from(got) == v),
                Err(e) => {
                    prop_assert!(v == 0 || v > 65_535);
                    prop_assert_eq!(e.field.as_str(), "port");
                }
            }
        }
    }

    #[test]
    fn weights_are_1_to_256(w in any::<u64>(), small in 0u64..300) {
        for v in [w, small] {
            match validate_weight("weight", v) {
                Ok(got) => prop_assert!((1..=256).contains(&v) && u64::from(got) == v),
                Err(e) => {
                    prop_assert!(v == 0 || v > 256);
                    prop_assert_eq!(e.field.as_str(), "weight");
                }
            }
        }
    }

    #[test]
    fn routes_summing_to_100_with_valid_names_are_accepted(m in summing_route()) {
        let route = validate_route(&m).unwrap_or_else(|e| panic!("{m:?} rejected: {e:?}"));
        prop_assert_eq!(route.len(), m.len());
        for (k, v) in &m {
            prop_assert_eq!(route.version_share(k).map(u64::from), Some(*v));
        }
    }

    #[test]
    fn routes_are_accepted_exactly_when_valid(
        m in btree_map(any_text(), prop_oneof![0u64..=100, any::<u64>()], 0..8),
    ) {
        let valid = !m.is_empty()
            && m.len() <= 64
            && m.keys().all(|k| matches_name_pattern(k))
            && m.values().all(|&v| v <= 100)
            && m.values().sum::<u64>() == 100;
        let result = validate_route(&m);
        prop_assert_eq!(result.is_ok(), valid, "{:?} -> {:?}", m, result);
        if let Err(errors) = result {
            prop_assert!(!errors.is_empty());
            for e in errors {
                prop_assert!(e.field == "route" || e.field.starts_with("route."), "{:?}", e);
                // Field names echo user input only escaped: no raw control characters.
                prop_assert!(!e.field.chars().any(char::is_control), "{:?}", e.field);
            }
        }
    }

    #[test]
    fn routes_not_summing_to_100_are_rejected(
        m in btree_map(valid_name(), 0u64..=100, 1..10),
    ) {
        prop_assume!(m.values().sum::<u64>() != 100);
        prop_assert!(validate_route(&m).is_err());
    }

    #[test]
    fn instance_specs_validate_exactly_their_fields(
        address in any_text(),
        port in prop_oneof![1u64..=65_535, any::<u64>()],
        version in proptest::option::of(any_text()),
        weight in proptest::option::of(prop_oneof![1u64..=256, any::<u64>()]),
        tags in vec(any_text(), 0..4),
        ttl_ms in proptest::option::of(prop_oneof![MIN_TTL_MS..=MAX_TTL_MS, any::<u64>()]),
    ) {
        let spec = InstanceSpec { address, port, version, weight, tags, ttl_ms, zone: None };
        let expect_ok = spec.address.parse::<Address>().is_ok()
            && validate_port("port", spec.port).is_ok()
            && spec.version.as_deref().is_none_or(matches_name_pattern)
            && spec.weight.is_none_or(|w| (1..=256).contains(&w))
            && spec.tags.iter().all(|t| matches_name_pattern(t))
            && spec.ttl_ms.is_none_or(|t| (MIN_TTL_MS..=MAX_TTL_MS).contains(&t));
        match spec.validate() {
            Ok(v) => {
                prop_assert!(expect_ok, "{:?} accepted", spec);
                prop_assert!(matches_name_pattern(v.version.as_str()));
                prop_assert!(v.tags.iter().all(|t| matches_name_pattern(t.as_str())));
                prop_assert_eq!(v.address, spec.address.parse::<Address>().unwrap());
                prop_assert_eq!(u64::from(v.port), spec.port);
                prop_assert!((1..=256).contains(&v.weight));
            }
            Err(errors) => {
                prop_assert!(!expect_ok, "{:?} rejected: {:?}", spec, errors);
                prop_assert!(!errors.is_empty());
                for e in &errors {
                    let known = ["address", "port", "version", "weight", "ttl_ms"]
                        .contains(&e.field.as_str())
                        || e.field.starts_with("tags");
                    prop_assert!(known, "unknown field {:?}", e.field);
                }
            }
        }
    }

    #[test]
    fn instances_round_trip_through_json(
        service in valid_name(),
        id in valid_name(),
        tags in vec(valid_name(), 0..4),
        ip in any::<IpAddr>(),
    ) {
        let i = Instance {
            address: ip.into(),
            tags: tags.iter().map(|t| t.parse().unwrap()).collect(),
            ..Instance::sample(&service, &id)
        };
        let json = serde_json::to_string(&i).unwrap();
        prop_assert_eq!(serde_json::from_str::<Instance>(&json).unwrap(), i);
    }

    #[test]
    fn parsing_arbitrary_bodies_never_panics(bytes in vec(any::<u8>(), 0..256), text in any_text()) {
        let _ = serde_json::from_slice::<InstanceSpec>(&bytes);
        let _ = serde_json::from_slice::<WatchEvent>(&bytes);
        let _ = serde_json::from_slice::<Instance>(&bytes);
        let _ = serde_json::from_slice::<BTreeMap<String, u64>>(&bytes);
        let _ = serde_json::from_str::<InstanceSpec>(&text);
    }

    #[test]
    fn json_specs_with_unknown_fields_are_refused(key in "[a-z_]{1,12}") {
        prop_assume!(!["address", "port", "version", "weight", "tags", "ttl_ms"].contains(&key.as_str()));
        let body = format!(r#"{{"address":"10.0.0.1","port":80,"{key}":1}}"#);
        prop_assert!(serde_json::from_str::<InstanceSpec>(&body).is_err());
    }

    #[test]
    fn printable_is_short_and_has_no_raw_control_characters(s in any::<String>()) {
        let p = printable(&s);
        prop_assert!(p.chars().count() <= 80);
        prop_assert!(!p.chars().any(char::is_control), "{:?}", p);
    }
}
