//! How `keygate parent` keeps its tasks running: a task is a step repeated until the daemon
//! stops; a failed step (the KRE restarting, a store error) is reported on one line and tried
//! again after a jittered exponential backoff, reset by the next successful step. It decides
//! only the pacing and the stop; what a step does is its verb's code.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::metrics::DaemonMetrics;
use crate::backoff::Backoff;
use crate::error::CliError;

/// The daemon's stop, seen by every task: set once, on SIGTERM or SIGINT.
#[derive(Debug, Clone)]
pub(crate) struct Stop(watch::Receiver<bool>);

impl Stop {
    /// A stop and the sender that sets it.
    pub(crate) fn new() -> (watch::Sender<bool>, Self) {
        let (tx, rx) = watch::channel(false);
        (tx, Self(rx))
    }

    pub(crate) fn is_set(&self) -> bool {
        *self.0.borrow()
    }

    /// Resolves once the stop is set (or its sender is gone).
    pub(crate) async fn wait(mut self) {
        let _ = self.0.wait_for(|stop| *stop).await;
    }

    /// Sleeps `d`, or less when the stop is set meanwhile.
    async fn sleep(&self, d: Duration) {
        tokio::select! {
            () = tokio::time::sleep(d) => {},
            () = self.clone().wait() => {},
        }
    }
}

/// Runs `step` until `stop` is set: after a successful step waits `pause`, after a failed one
/// (an error or a panic) reports it (one line) and waits `backoff`'s next wait. A step in
/// progress when the stop is set finishes (the daemon bounds how long it waits for it). Each
/// step's outcome is counted in `metrics` when the daemon serves them.
pub(crate) async fn supervise<F, Fut>(
    name: &'static str,
    stop: Stop,
    pause: Duration,
    mut backoff: Backoff,
    metrics: Option<Arc<DaemonMetrics>>,
    mut step: F,
) where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), CliError>> + Send + 'static,
{
    while !stop.is_set() {
        let outcome = joined(tokio::spawn(step()).await);
        if let Some(m) = &metrics {
            m.step(name, outcome.as_ref().map(|_| ()).map_err(|e| e.message.as_str()));
        }
        let wait = match outcome {
            Ok(()) => {
                backoff.reset();
                pause
            }
            Err(e) => {
                let wait = backoff.next_wait();
                tracing::warn!(task = name, error = %e.message, retry_in_ms = wait.as_millis(), "task failed; restarting it");
                wait
            }
        };
        stop.sleep(wait).await;
    }
}

/// Runs a blocking step (a verb's synchronous round) on the blocking pool; a panic in it is a
/// failed step.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, CliError> + Send + 'static,
) -> Result<T, CliError> {
    joined(tokio::task::spawn_blocking(f).await)
}

/// A step's outcome; its panic is a failed step.
fn joined<T>(r: Result<Result<T, CliError>, tokio::task::JoinError>) -> Result<T, CliError> {
    r.unwrap_or_else(|e| Err(CliError::refused(format!("task panicked: {e}"))))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: fn(u64) -> Duration = Duration::from_millis;

    #[tokio::test]
    async fn a_failing_or_panicking_step_is_restarted_until_the_stop() {
        let (tx, stop) = Stop::new();
        let calls = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
        let counted = calls.clone();
        let task = tokio::spawn(supervise("test", stop, MS(10), Backoff::new(MS(20), MS(20), 0), None, move || {
            let n = counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            async move {
                match n % 3 {
                    0 => Err(CliError::refused("the KRE is restarting")),
                    1 => panic!("a step's bug"),
                    _ => Ok(()),
                }
            }
        }));
        // Restarted after each error and panic (a panic's report may be slow to print).
        let restarted = async {
            while calls.load(std::sync::atomic::Ordering::SeqCst) < 6 {
                tokio::time::sleep(MS(10)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(20), restarted).await.expect("restarted after each error and panic");
        tx.send(true).expect("stop");
        tokio::time::timeout(Duration::from_secs(1), task).await.expect("stops at once").expect("task");
    }
}
