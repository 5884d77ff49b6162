//! `baker-bench <scenario>|all [--quick]`: runs Baker's benchmarks and prints their figures.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use baker_bench::report::{checks_table, write_json, Machine};
use baker_bench::{daemons::Bins, Ctx, DirectoryOpts, Scenario, Store};
use clap::Parser;

#[derive(Debug, Parser)]
#[command(about = "Benchmarks Baker's release binaries on loopback")]
struct Args {
    /// Scenario to run: request-path, convergence, churn, rolling, locality, directory, directory-100k,
    /// directory-restart,
    /// footprint, or all.
    scenario: String,
    /// Short runs with fewer trials: a smoke test of the harness, not figures to quote.
    #[arg(long)]
    quick: bool,
    /// Directory of the binaries under test (default: this executable's directory).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Binaries of an earlier build to measure side by side (convergence: the directory-API
    /// measures run on both, interleaved; churn: rounds alternating between both;
    /// directory-100k: each build in turn, each with its own directory).
    #[arg(long)]
    baseline_bin_dir: Option<PathBuf>,
    /// HAProxy binary (default: `BAKER_HAPROXY`, `haproxy` on PATH, /usr/sbin/haproxy).
    #[arg(long)]
    haproxy: Option<PathBuf>,
    /// directory: the store under test: `memory` (one directory pinned to a core), or `etcd`
    /// (side by side: the memory store, two replicas on a three-member etcd cluster, and the
    /// same leases, keep-alives and watches straight against etcd).
    #[arg(long, value_enum, default_value_t = Store::Memory)]
    store: Store,
    /// directory: instances heartbeating every 2 s (default 10,000; 1,000 with --quick);
    /// directory-restart: instances in etcd (default 100,000; 10,000 with --quick).
    #[arg(long)]
    instances: Option<usize>,
    /// directory: watchers on the watch stream (default 500; 50 with --quick).
    #[arg(long)]
    watchers: Option<usize>,
    /// directory: the measured window, as `10s` or `1m` (default 60 s on memory, 30 s per mode
    /// with --store etcd; 15 s and 10 s with --quick).
    #[arg(long, value_parser = humantime::parse_duration)]
    window: Option<Duration>,
    /// Where JSON results go.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/results"))]
    out: PathBuf,
}

/// The directory options make sense only for `directory` (or `all`), and sizes of zero
/// measure nothing.
fn check_directory_opts(scenario: &str, o: &DirectoryOpts) -> anyhow::Result<()> {
    let given = o.store != Store::Memory
        || o.instances.is_some()
        || o.watchers.is_some()
        || o.window.is_some();
    let sizes_only = o.store == Store::Memory && o.watchers.is_none() && o.window.is_none();
    if given
        && scenario != "directory"
        && scenario != "all"
        && !(scenario == "directory-restart" && sizes_only)
    {
        bail!(
            "--store, --instances, --watchers and --window apply to the directory scenario \
             (--instances to directory-restart too), not to {scenario:?}"
        );
    }
    let mut wrong = Vec::new();
    if o.instances == Some(0) {
        wrong.push("--instances must be at least 1");
    }
    if o.watchers == Some(0) && o.store == Store::Etcd {
        wrong.push("--watchers must be at least 1 with --store etcd (the fan-out needs one)");
    }
    if o.window.is_some_and(|w| w < Duration::from_secs(1)) {
        wrong.push("--window must be at least 1s");
    }
    if !wrong.is_empty() {
        bail!("{}", wrong.join("; "));
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    let args = Args::parse();
    let scenarios = if args.scenario == "all" {
        Scenario::ALL.to_vec()
    } else {
        vec![Scenario::parse(&args.scenario).with_context(|| {
            format!(
                "unknown scenario {:?}; choose one of: {}, all",
                args.scenario,
                Scenario::ALL.map(|s| s.name()).join(", ")
            )
        })?]
    };
    let directory = DirectoryOpts {
        store: args.store,
        instances: args.instances,
        watchers: args.watchers,
        window: args.window,
    };
    check_directory_opts(&args.scenario, &directory)?;
    let baseline = match args.baseline_bin_dir {
        Some(dir) => Some(Bins::locate(Some(dir), args.haproxy.clone())?),
        None => None,
    };
    let bins = Bins::locate(args.bin_dir, args.haproxy)?;
    let machine = Machine::probe(&bins.haproxy);
    println!(
        "machine: {} x {} | kernel {} | {} | load {}",
        machine.nproc,
        machine.cpu_model,
        machine.kernel,
        machine.haproxy,
        machine.load_average_at_start
    );
    let ctx = Ctx {
        bins,
        quick: args.quick,
        baseline,
        directory,
    };
    let mut failed = Vec::new();
    for s in scenarios {
        println!(
            "\n== {} {}",
            s.name(),
            if args.quick { "(quick)" } else { "" }
        );
        let c = ctx.clone();
        // Each scenario runs in its own task: a panic in one is reported and the rest still run.
        match tokio::spawn(async move { s.run(&c).await }).await {
            Ok(Ok(report)) => {
                print!("{}", report.text);
                if !report.checks.is_empty() {
                    print!("\n{}", checks_table(&report.checks));
                }
                let path = write_json(&args.out, &machine, &report)?;
                println!("results: {}", path.display());
            }
            Ok(Err(e)) => {
                println!("{} failed: {e:#}", s.name());
                failed.push(s.name());
            }
            Err(e) => {
                println!("{} failed: {e}", s.name());
                failed.push(s.name());
            }
        }
    }
    if !failed.is_empty() {
        anyhow::bail!("scenarios that could not run: {}", failed.join(", "));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directory_options_are_checked() {
        let etcd = DirectoryOpts {
            store: Store::Etcd,
            ..DirectoryOpts::default()
        };
        assert!(check_directory_opts("directory", &etcd).is_ok());
        assert!(check_directory_opts("all", &etcd).is_ok());
        assert!(check_directory_opts("directory", &DirectoryOpts::default()).is_ok());
        assert!(check_directory_opts("churn", &DirectoryOpts::default()).is_ok());
        let sized = DirectoryOpts {
            instances: Some(5),
            ..DirectoryOpts::default()
        };
        assert!(check_directory_opts("directory-restart", &sized).is_ok());
        assert!(check_directory_opts("directory-restart", &etcd).is_err());
        let e = check_directory_opts("churn", &etcd)
            .unwrap_err()
            .to_string();
        assert!(e.contains("apply to the directory scenario"), "{e}");
        let zero = DirectoryOpts {
            instances: Some(0),
            watchers: Some(0),
            window: Some(Duration::from_millis(10)),
            ..etcd
        };
        let e = check_directory_opts("directory", &zero)
            .unwrap_err()
            .to_string();
        for what in ["--instances", "--watchers", "--window"] {
            assert!(e.contains(what), "{e}");
        }
    }
}
