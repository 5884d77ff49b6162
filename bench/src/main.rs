//! `baker-bench <scenario>|all [--quick]`: runs Baker's benchmarks and prints their figures.

use std::path::PathBuf;

use anyhow::Context;
use baker_bench::report::{checks_table, write_json, Machine};
use baker_bench::{daemons::Bins, Ctx, Scenario};
use clap::Parser;

#[derive(Debug, Parser)]
#[command(about = "Benchmarks Baker's release binaries on loopback")]
struct Args {
    /// Scenario to run: request-path, convergence, churn, rolling, directory, directory-100k,
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
    /// Where JSON results go.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/results"))]
    out: PathBuf,
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
