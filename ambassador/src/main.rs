use anyhow::Context;
use baker_ambassador::config::Config;
use baker_client::config::{handle_command_line, vars, Environment, EXIT_BAD_CONFIG};
use tokio_util::sync::CancellationToken;

fn main() {
    handle_command_line(&vars::AMBASSADOR, env!("CARGO_PKG_VERSION"));
    baker_client::daemon::init_tracing();
    let config = match Config::from_env(&Environment::from_process()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("baker-ambassador: {e}");
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
    baker_client::daemon::cancel_on_signals(shutdown.clone())
        .context("installing the signal handlers")?;
    match baker_ambassador::run(config, shutdown).await {
        Ok(code) => Ok(code),
        Err(e) if e.is_config() => {
            eprintln!("baker-ambassador: {:#}", anyhow::Error::from(e));
            Ok(EXIT_BAD_CONFIG)
        }
        Err(e) => Err(e).context("the ambassador failed"),
    }
}
