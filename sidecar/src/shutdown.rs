//! The shutdown signal every long-running task follows.
//!
//! A `watch<bool>` turned true once: every listener and watcher holds a
//! receiver and stops at the next await point.

use tokio::sync::watch;

/// Resolves once shutdown has been signalled (or its sender is gone).
///
/// Returns `()`, not the guard `wait_for` yields, so it can sit in a
/// `select!` inside a spawned (`Send`) task.
pub async fn signalled(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}
