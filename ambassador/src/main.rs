use anyhow::Context;
use baker_ambassador::config::{Config, Env};
use baker_client::config::{read_env, EXIT_BAD_CONFIG};
use tokio_util::sync::CancellationToken;

fn main() {
    baker_client::daemon::init_tracing();
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
    baker_client::daemon::cancel_on_signals(shutdown.clone())
        .context("installing the signal handlers")?;
    match baker_ambassador::run(config, shutdown).await {
        Ok(code) => Ok(code),
        Err(e) if e.is_config() => {
            tracing::error!("{:#}", anyhow::Error::from(e));
            Ok(EXIT_BAD_CONFIG)
        }
        Err(e) => Err(e).context("the ambassador failed"),
    }
}
