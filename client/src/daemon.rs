//! What every Baker daemon does the same way at start-up: logging and stop signals.

use std::io::IsTerminal;

use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;

/// Logs to stderr with `RUST_LOG` filtering (default `info`), without colours when `NO_COLOR`
/// is set or stderr is not a terminal (container logs, files).
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::env::var_os("NO_COLOR").is_none() && std::io::stderr().is_terminal();
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .init();
}

/// Cancels `shutdown` on the first SIGTERM or SIGINT, logging which one arrived.
///
/// Must be called inside a Tokio runtime; fails only if the signal handlers cannot be installed.
pub fn cancel_on_signals(shutdown: CancellationToken) -> std::io::Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        tracing::info!("{name} received: stopping");
        shutdown.cancel();
    });
    Ok(())
}
