//! Following a file by polling.
//!
//! Kubernetes updates a mounted ConfigMap by swapping a symlink, which
//! inotify-style watches miss unless they follow the link's target; reading
//! the path on an interval sees every swap, costs one small read, and needs
//! no platform-specific code. A change is reported once, when the content
//! differs from the last content seen.

use std::{path::PathBuf, time::Duration};

use tokio::sync::watch;

/// Calls `on_change` with the file's content now (if readable) and after each
/// change, until `shutdown` turns true. A missing or unreadable file is logged
/// once per distinct error and otherwise ignored: the last content stays in force.
pub async fn poll_file(
    path: PathBuf,
    interval: Duration,
    mut shutdown: watch::Receiver<bool>,
    mut on_change: impl FnMut(String) + Send,
) {
    let mut last: Option<String> = None;
    let mut last_err: Option<String> = None;
    loop {
        match tokio::fs::read_to_string(&path).await {
            Ok(text) => {
                last_err = None;
                if last.as_deref() != Some(text.as_str()) {
                    last = Some(text.clone());
                    on_change(text);
                }
            }
            Err(e) => {
                let msg = e.to_string();
                if last_err.as_deref() != Some(msg.as_str()) {
                    tracing::warn!(path = %path.display(), error = %msg, "cannot read watched file");
                    last_err = Some(msg);
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = crate::shutdown::signalled(&mut shutdown) => return,
        }
    }
}
