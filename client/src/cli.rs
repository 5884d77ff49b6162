//! The `baker` operator CLI: look at and change what the directory knows.
//!
//! - [`args`]: the command line (clap derive) and the parsers of its values (`1=90`,
//!   `emitter=amb:8000/udp`).
//! - [`failure`]: what can go wrong, how it is told to the user, and the exit codes.
//! - [`table`]: aligned, header-first tables for humans.
//! - [`human`]: one-line renderings of instances, routes and ages.
//! - [`services`]: `baker services` and `baker instances`.
//! - [`route`]: `baker route set|list|clear`.
//! - [`register`]: `baker register` and `baker deregister`.
//! - [`watch`]: `baker watch`, the live event stream, reconnecting with backoff.
//! - [`ambassadors`]: `baker ambassadors`, `baker traffic`, and `--wait` for ambassadors.
//! - [`maintenance`]: `baker drain`, `baker undrain` and `baker maintenance`.
//! - [`links`]: `baker links`, the Docker-link variables block.
//!
//! Every command prints a table or a line for humans by default and JSON with `--json`.

mod ambassadors;
mod args;
mod failure;
mod human;
mod links;
mod maintenance;
mod register;
mod route;
mod services;
mod table;
mod watch;

use std::io::Write;
use std::process::ExitCode;

use anyhow::Context as _;
use baker_client::config::vars;
use baker_client::config::{strays, Environment, Reader, Stray};
use baker_client::model::printable;
use baker_client::{ClientError, DirectoryClient};
use clap::Parser;
use serde::Serialize;

pub use args::{Cli, Command, Global, RouteCommand, Wait};
pub use failure::Failure;

/// Parses the command line, runs the command, and reports a failure on stderr.
pub fn main() -> ExitCode {
    if let Err(failure) = check_environment(&Environment::from_process()) {
        eprintln!("error: {failure}");
        return ExitCode::from(failure.exit_code());
    }
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::from(failure::EXIT_FAILURE);
        }
    };
    let ctx = Ctx {
        global: cli.global.clone(),
    };
    match runtime.block_on(run(&ctx, cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => failure::report(&err, &ctx.global),
    }
}

/// What clap cannot say about the `BAKER_*` variables: a value that is not UTF-8 is bad
/// configuration (clap would call it a bad argument), and a name no Baker program reads is
/// likely a typo, told as a warning with the closest name (the shell's environment is shared
/// with other programs, so it does not stop the command).
fn check_environment(env: &Environment) -> Result<(), Failure> {
    let mut reader = Reader::new(&vars::CLI, env);
    for var in vars::CLI.vars {
        reader.get(var.name);
    }
    for stray in strays(&vars::CLI, env.baker_names()) {
        if let Stray::Unknown { .. } = stray {
            eprintln!("warning: {stray}");
        }
    }
    let unreadable: Vec<String> = reader
        .value_errors()
        .0
        .into_iter()
        .map(|(var, message)| format!("{var} {message}"))
        .collect();
    if unreadable.is_empty() {
        Ok(())
    } else {
        Err(Failure::Config(unreadable.join("; ")))
    }
}

/// Runs one command.
pub async fn run(ctx: &Ctx, command: Command) -> anyhow::Result<()> {
    match command {
        Command::Services => services::services(ctx).await,
        Command::Instances { service } => services::instances(ctx, service.as_ref()).await,
        Command::Route(RouteCommand::Set {
            service,
            splits,
            force,
            wait,
        }) => route::set(ctx, &service, &splits, force, wait).await,
        Command::Route(RouteCommand::List) => route::list(ctx).await,
        Command::Route(RouteCommand::Clear { service, wait }) => {
            route::clear(ctx, &service, wait).await
        }
        Command::Drain {
            force,
            what,
            version,
            reason,
            wait,
        } => {
            maintenance::drain(
                ctx,
                &what,
                version.as_deref(),
                reason.as_deref(),
                force,
                wait,
            )
            .await
        }
        Command::Undrain {
            what,
            version,
            wait,
        } => maintenance::undrain(ctx, &what, version.as_deref(), wait).await,
        Command::Maintenance => maintenance::maintenance(ctx).await,
        Command::Events {
            since,
            until,
            service,
            limit,
        } => maintenance::events(ctx, since, until, service.as_ref(), limit).await,
        Command::Ambassadors => ambassadors::ambassadors(ctx).await,
        Command::Traffic { service } => ambassadors::traffic(ctx, service.as_ref()).await,
        Command::Watch {
            timestamps,
            services,
            watch_token,
        } => watch::watch(ctx, timestamps, &services, watch_token).await,
        Command::Register(reg) => register::register(ctx, &reg).await,
        Command::Deregister { service, id } => register::deregister(ctx, &service, &id).await,
        Command::Links { links, export } => links::links(ctx, &links, export),
    }
}

/// What every command needs: the global options and the way out to stdout.
pub struct Ctx {
    pub global: Global,
}

impl Ctx {
    /// A client of the directory named by `--directory` / `BAKER_DIRECTORY`.
    pub fn client(&self) -> Result<DirectoryClient, Failure> {
        let directory = match self.global.directory.trim() {
            "" => baker_client::api::DEFAULT_DIRECTORY,
            d => d,
        };
        // Changes name their client to the directory: `cli:alice`, or `cli` when the user
        // name is not a valid client name.
        let origin = std::env::var("USER")
            .map(|user| format!("cli:{user}"))
            .ok()
            .filter(|o| baker_client::maintenance::validate_client(o).is_ok())
            .unwrap_or_else(|| "cli".to_owned());
        let client = DirectoryClient::trusting(
            directory,
            self.global.token.clone(),
            self.global.ca.as_deref(),
        );
        client.map(|c| c.with_origin(&origin)).map_err(|e| match e {
            ClientError::BadToken(why) => Failure::Config(format!(
                "--token / BAKER_TOKEN {why}: it is sent in an Authorization header"
            )),
            ClientError::BadList(_) => Failure::Config(format!(
                "--directory / BAKER_DIRECTORY: {e}, got {:?}",
                printable(&self.global.directory)
            )),
            ClientError::Trust(e) => Failure::Config(format!("--ca / BAKER_CA: {e}")),
            _ => Failure::Config(format!(
                "--directory / BAKER_DIRECTORY must be an http:// or https:// URL such as {}, or a \
                 comma-separated list of the directory's replicas, got {:?}",
                baker_client::api::DEFAULT_DIRECTORY,
                printable(&self.global.directory)
            )),
        })
    }

    /// Whether `--json` was given.
    pub fn json(&self) -> bool {
        self.global.json
    }

    /// Prints `text` to stdout (a newline is added when missing) and flushes.
    pub fn print(&self, text: &str) -> anyhow::Result<()> {
        let mut out = std::io::stdout().lock();
        let result = out.write_all(text.as_bytes()).and_then(|()| {
            if !text.ends_with('\n') {
                out.write_all(b"\n")?;
            }
            out.flush()
        });
        match result {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
                Err(Failure::ClosedOutput.into())
            }
            Err(e) => Err(e).context("writing to stdout"),
        }
    }

    /// Prints `value` as indented JSON.
    pub fn print_json<T: Serialize>(&self, value: &T) -> anyhow::Result<()> {
        let text = serde_json::to_string_pretty(value).context("encoding JSON output")?;
        self.print(&text)
    }

    /// Prints a table, or a note on stderr when it has no rows.
    pub fn print_table(&self, table: &table::Table, empty: &str) -> anyhow::Result<()> {
        if table.is_empty() {
            eprintln!("{empty}");
            return Ok(());
        }
        self.print(&table.render(!self.global.no_headers))
    }
}
