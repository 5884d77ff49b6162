use anyhow::Context;
use baker_client::config::{handle_command_line, vars, Environment, EXIT_BAD_CONFIG};
use baker_directory::config::Config;
use tokio_util::sync::CancellationToken;

fn main() {
    handle_command_line(&vars::DIRECTORY, env!("CARGO_PKG_VERSION"));
    baker_client::daemon::init_tracing();
    let mut config = match Config::from_env(&Environment::from_process()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("baker-directory: {e}");
            std::process::exit(EXIT_BAD_CONFIG);
        }
    };
    baker_directory::server::fit_open_files(&mut config.max_connections, &mut config.max_watches);
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
