use anyhow::Context;
use baker_client::config::{read_env, EXIT_BAD_CONFIG};
use baker_greeting::config::{hostname, Config, Env};
use tokio_util::sync::CancellationToken;

fn main() {
    baker_client::daemon::init_tracing();
    let config = match read_env::<Env>().and_then(|env| Config::from_env(&env, &hostname())) {
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
