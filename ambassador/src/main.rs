use anyhow::Context;
use baker_ambassador::config::{Config, Env};
use baker_client::config::{read_env, EXIT_BAD_CONFIG};
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;

fn main() {
    init_tracing();
    let config = match read_env::<Env>().and_then(Config::from_env) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("{e}");
            std::process::exit(EXIT_BAD_CONFIG);
        }
    };
    let code = match tokio::runtime::Runtime::new()
        .context("starting the async runtime")
        .and_then(|rt| rt.block_on(serve(config)))
    {
        Ok(code) => code,
        Err(e) => {
            tracing::error!("{e:#}");
            1
        }
    };
    std::process::exit(code);
}

async fn serve(config: Config) -> anyhow::Result<i32> {
    let shutdown = CancellationToken::new();
    let mut term = signal(SignalKind::terminate()).context("handling SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("handling SIGINT")?;
    let stop = shutdown.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: stopping"),
            _ = int.recv() => tracing::info!("SIGINT: stopping"),
        }
        stop.cancel();
    });
    match baker_ambassador::run(config, shutdown).await {
        Ok(code) => Ok(code),
        Err(e) if e.is_config() => {
            tracing::error!("{:#}", anyhow::Error::from(e));
            Ok(EXIT_BAD_CONFIG)
        }
        Err(e) => Err(e).context("the ambassador failed"),
    }
}

fn init_tracing() {
    use std::io::IsTerminal;
    let ansi = std::env::var_os("NO_COLOR").is_none() && std::io::stderr().is_terminal();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .init();
}
