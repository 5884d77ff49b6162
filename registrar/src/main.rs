use anyhow::Context;
use baker_client::config::{handle_command_line, vars, Environment, EXIT_BAD_CONFIG};
use baker_registrar::config::{hostname, Config};
use baker_registrar::services;
use tokio_util::sync::CancellationToken;

fn main() {
    handle_command_line(&vars::REGISTRAR, env!("CARGO_PKG_VERSION"));
    baker_client::daemon::init_tracing();
    let configs = services::from_env(&Environment::from_process(), &hostname(), |path| {
        std::fs::read_to_string(path)
    });
    let configs = match configs {
        Ok(c) => c,
        Err(e) => {
            eprintln!("baker-registrar: {e}");
            std::process::exit(EXIT_BAD_CONFIG);
        }
    };
    if let Err(e) = serve(configs) {
        eprintln!("baker-registrar: {e:#}");
        std::process::exit(1);
    }
}

/// One thread is plenty for loops that mostly sleep, and keeps the sidecar small.
fn serve(configs: Vec<Config>) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    runtime.block_on(async {
        let shutdown = CancellationToken::new();
        baker_client::daemon::cancel_on_signals(shutdown.clone())
            .context("installing the signal handlers")?;
        baker_registrar::run(configs, shutdown).await?;
        Ok(())
    })
}
