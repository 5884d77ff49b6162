use anyhow::Context;
use baker_client::config::{read_env, EXIT_BAD_CONFIG};
use baker_registrar::config::{hostname, Config, Env};
use tokio_util::sync::CancellationToken;

fn main() {
    baker_client::daemon::init_tracing();
    let config =
        read_env::<Env>().and_then(|env| Config::from_env(&env, std::env::vars(), &hostname()));
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
