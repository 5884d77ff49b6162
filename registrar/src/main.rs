use anyhow::Context;
use baker_client::config::{handle_command_line, vars, Environment, EXIT_BAD_CONFIG};
use baker_registrar::config::{hostname, Config};
use tokio_util::sync::CancellationToken;

fn main() {
    handle_command_line(&vars::REGISTRAR, env!("CARGO_PKG_VERSION"));
    baker_client::daemon::init_tracing();
    let config = Config::from_env(&Environment::from_process(), &hostname());
    let config = match config {
        Ok(c) => c,
        Err(e) => {
            eprintln!("baker-registrar: {e}");
            std::process::exit(EXIT_BAD_CONFIG);
        }
    };
    if let Err(e) = serve(config) {
        eprintln!("baker-registrar: {e:#}");
        std::process::exit(1);
    }
}

/// One thread is plenty for two loops that mostly sleep, and keeps the sidecar small.
fn serve(config: Config) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    runtime.block_on(async {
        let shutdown = CancellationToken::new();
        baker_client::daemon::cancel_on_signals(shutdown.clone())
            .context("installing the signal handlers")?;
        baker_registrar::run(config, shutdown).await?;
        Ok(())
    })
}
