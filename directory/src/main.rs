use anyhow::Context;
use baker_client::config::{read_env, EXIT_BAD_CONFIG};
use baker_directory::config::{Config, Env};
use tokio_util::sync::CancellationToken;

fn main() {
    baker_client::daemon::init_tracing();
    let config = match read_env::<Env>().and_then(|env| Config::from_env(&env)) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("baker-directory: {e}");
            std::process::exit(EXIT_BAD_CONFIG);
        }
    };
    if let Err(e) = serve(config) {
        eprintln!("baker-directory: {e:#}");
        std::process::exit(1);
    }
}

#[tokio::main]
async fn serve(config: Config) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding the directory listener on {}", config.listen))?;
    let shutdown = CancellationToken::new();
    baker_client::daemon::cancel_on_signals(shutdown.clone())
        .context("installing the signal handlers")?;
    baker_directory::run(listener, config, shutdown).await?;
    Ok(())
}
