//! Baker's end-to-end scenarios, one module a subject, built as one test binary (`e2e`): one
//! crate links the harness and its dependencies once instead of once a file, which is most of
//! what building the suite costs. Every module here is a file beside this one; a file that is
//! not declared here would never run, and `every_file_here_is_a_module` fails when one is
//! missing.
//!
//! Run one subject with a filter on the module path, e.g.
//! `cargo nextest run --release -p baker-tests -E 'test(/^directory::/)'`.

mod ambassador;
mod cli;
mod config;
mod console;
mod convergence;
mod cross_routes;
mod directory;
mod directory_limits;
mod directory_watch;
mod docker;
mod docker_compose;
mod docker_etcd;
mod docs;
mod durable_routes;
mod etcd_cluster;
mod etcd_docker;
mod etcd_faults;
mod etcd_replicas;
mod etcd_scale;
mod etcd_store;
mod haproxy_crash;
mod host;
mod hung_instance;
mod ipv6;
mod locality;
mod registrar;
mod registrar_file;
mod replicas;
mod route_options;
mod runtime_api;
mod swarm;
mod tls;
mod tokens;
mod ui;
mod watch_gap;

/// A test file added beside this one runs only once it is declared above.
#[test]
fn every_file_here_is_a_module() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests");
    let main = std::fs::read_to_string(dir.join("main.rs")).expect("reading tests/tests/main.rs");
    for entry in std::fs::read_dir(&dir).expect("reading tests/tests") {
        let path = entry.expect("a tests/tests entry").path();
        let Some(stem) = path.file_stem().and_then(|s| s.to_str()) else {
            continue;
        };
        if path.extension().is_some_and(|e| e == "rs") && stem != "main" {
            assert!(
                main.contains(&format!("\nmod {stem};")),
                "tests/tests/{stem}.rs is not declared in tests/tests/main.rs: add `mod {stem};` there, or it never runs"
            );
        }
    }
}
