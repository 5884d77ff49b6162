//! Long-lived tasks that come back: a task that panics or returns before shutdown is logged as
//! an error and started again after a capped backoff.
//!
//! The directory runs two such tasks beside its HTTP server, and both restart: the TTL expiry
//! timer keeps its state in the table, and Docker discovery rebuilds its own from the engine
//! (list, then resync) each time it starts. Neither can leave the table inconsistent by
//! stopping half-way: every change is applied under the table's lock.

use std::any::Any;
use std::future::Future;
use std::time::Duration;

use baker_client::backoff::Backoff;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// First delay before a restart; doubles up to [`MAX_DELAY`] while the task keeps failing.
pub const FIRST_DELAY: Duration = Duration::from_millis(100);
/// Longest delay before a restart.
pub const MAX_DELAY: Duration = Duration::from_secs(10);
/// A task that ran this long before ending counts as healthy: its next restart is quick again.
pub const HEALTHY_RUN: Duration = Duration::from_secs(60);

/// Runs the task `start` makes, in its own Tokio task, until `shutdown`; whenever it ends
/// before `shutdown` (a panic, or a return), logs why and starts a new one. Returns once
/// `shutdown` is cancelled and the current task has ended (tasks are given `shutdown` too).
pub async fn supervise<F, Fut>(name: &'static str, shutdown: CancellationToken, mut start: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut backoff = Backoff::new(FIRST_DELAY, MAX_DELAY);
    loop {
        let started = Instant::now();
        let ended = tokio::spawn(start()).await;
        if shutdown.is_cancelled() {
            return;
        }
        if started.elapsed() >= HEALTHY_RUN {
            backoff.reset();
        }
        let cause = match ended {
            Ok(()) => "it returned".to_owned(),
            Err(e) if e.is_panic() => format!("it panicked: {}", panic_message(&*e.into_panic())),
            Err(e) => format!("it was cancelled: {e}"),
        };
        let delay = backoff.next_delay();
        tracing::error!(
            task = name,
            cause = %cause,
            restart_in = ?delay,
            "a task of the directory ended unexpectedly; restarting it"
        );
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// The text a panic was raised with, when it has one.
fn panic_message(payload: &(dyn Any + Send)) -> &str {
    payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    #[tokio::test(start_paused = true)]
    async fn a_task_that_panics_or_returns_is_started_again_until_shutdown() {
        let shutdown = CancellationToken::new();
        let starts = Arc::new(AtomicUsize::new(0));
        let supervisor = tokio::spawn(supervise("test", shutdown.clone(), {
            let starts = starts.clone();
            let shutdown = shutdown.clone();
            move || {
                let n = starts.fetch_add(1, Ordering::SeqCst);
                let shutdown = shutdown.clone();
                async move {
                    match n {
                        0 => panic!("a container with an empty id"),
                        1 => {}
                        _ => shutdown.cancelled().await,
                    }
                }
            }
        }));
        // Two restarts, each within the backoff's first delays.
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(starts.load(Ordering::SeqCst), 3);
        shutdown.cancel();
        supervisor.await.unwrap();
        assert_eq!(
            starts.load(Ordering::SeqCst),
            3,
            "no restart after shutdown"
        );
    }

    #[test]
    fn panic_messages_are_read_from_both_payload_kinds() {
        let text: Box<dyn Any + Send> = Box::new("static");
        assert_eq!(panic_message(&*text), "static");
        let owned: Box<dyn Any + Send> = Box::new(format!("owned {}", 1));
        assert_eq!(panic_message(&*owned), "owned 1");
        let other: Box<dyn Any + Send> = Box::new(7);
        assert_eq!(panic_message(&*other), "(no message)");
    }
}
