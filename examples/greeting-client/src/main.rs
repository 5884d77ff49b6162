use anyhow::Context;
use baker_client::config::{read_env, EXIT_BAD_CONFIG};
use baker_greeting_client::{find_link, run, Config, RawConfig};
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_ansi(
            std::env::var_os("NO_COLOR").is_none()
                && std::io::IsTerminal::is_terminal(&std::io::stderr()),
        )
        .with_writer(std::io::stderr)
        .init();
    let config = read_env::<RawConfig>().and_then(|raw| Config::parse(&raw));
    let config = match config {
        Ok(c) => c,
        Err(e) => {
            eprintln!("baker-greeting-client: {e}");
            std::process::exit(EXIT_BAD_CONFIG);
        }
    };
    let link = match find_link(&config, std::env::vars()) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("baker-greeting-client: {e}");
            std::process::exit(EXIT_BAD_CONFIG);
        }
    };
    let shutdown = CancellationToken::new();
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let stop = shutdown.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        stop.cancel();
    });
    let summary = run(config, link, shutdown).await;
    tracing::info!(ok = summary.ok, failed = summary.failed, "done");
    if summary.ok == 0 && summary.failed > 0 {
        anyhow::bail!("no request succeeded ({} failed)", summary.failed);
    }
    Ok(())
}
