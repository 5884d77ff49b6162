use anyhow::Context;
use baker_client::config::{handle_command_line, vars, Environment, EXIT_BAD_CONFIG};
use baker_greeting::config::{hostname, Config};
use tokio_util::sync::CancellationToken;

fn main() {
    handle_command_line(&vars::GREETING, env!("CARGO_PKG_VERSION"));
    baker_client::daemon::init_tracing();
    let config = match Config::from_env(&Environment::from_process(), &hostname()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("baker-greeting: {e}");
            std::process::exit(EXIT_BAD_CONFIG);
        }
    };
    match serve(config) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("baker-greeting: {e:#}");
            std::process::exit(1);
        }
    }
}

#[tokio::main]
async fn serve(config: Config) -> anyhow::Result<i32> {
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    let shutdown = CancellationToken::new();
    baker_client::daemon::cancel_on_signals(shutdown.clone())
        .context("installing the signal handlers")?;
    Ok(baker_greeting::run(listener, config, shutdown).await?)
}
