use anyhow::Context;
use baker_client::config::{read_env, EXIT_BAD_CONFIG};
use baker_registrar::config::{hostname, Config, Env};
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;

fn main() {
    init_tracing();
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
        let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
        let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
        let on_signal = shutdown.clone();
        tokio::spawn(async move {
            let name = tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            };
            tracing::info!("{name} received");
            on_signal.cancel();
        });
        baker_registrar::run(config, shutdown).await?;
        Ok(())
    })
}

fn init_tracing() {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::env::var_os("NO_COLOR").is_none() && std::io::stderr().is_terminal();
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .init();
}
