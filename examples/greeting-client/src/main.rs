use anyhow::Context;
use baker_client::config::{handle_command_line, vars, Environment, EXIT_BAD_CONFIG};
use baker_greeting_client::{find_link, run, Config};
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;

fn main() -> anyhow::Result<()> {
    handle_command_line(&vars::GREETING_CLIENT, env!("CARGO_PKG_VERSION"));
    baker_client::daemon::init_tracing();
    let env = Environment::from_process();
    let config = match Config::from_env(&env) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("baker-greeting-client: {e}");
            std::process::exit(EXIT_BAD_CONFIG);
        }
    };
    let link = match find_link(&config, env.others()) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("baker-greeting-client: {e}");
            std::process::exit(EXIT_BAD_CONFIG);
        }
    };
    call(config, link)
}

#[tokio::main]
async fn call(config: Config, link: baker_client::links::Link) -> anyhow::Result<()> {
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
