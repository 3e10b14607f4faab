//! Running commands: echo what runs, fail with the command and its output.

use std::{
    io::IsTerminal,
    process::{Command, Stdio},
    sync::{Arc, Condvar, Mutex},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

/// Runs a command to completion, inheriting stdout and stderr; fails on a non-zero exit.
pub fn status(cmd: &mut Command) -> Result<()> {
    let shown = describe(cmd);
    let status = cmd
        .status()
        .with_context(|| format!("could not start `{shown}`"))?;
    if !status.success() {
        bail!("`{shown}` failed ({status})");
    }
    Ok(())
}

/// Runs a command and returns its stdout; on failure the error carries its stderr.
pub fn output(cmd: &mut Command) -> Result<String> {
    let shown = describe(cmd);
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("could not start `{shown}`"))?;
    if !out.status.success() {
        bail!(
            "`{shown}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs a command and says only whether it succeeded (for probes and idempotent clean-up).
pub fn quietly(cmd: &mut Command) -> bool {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A command as a person would type it.
pub fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|s| s.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// `cargo`, the one that runs xtask, without the variables cargo set for
/// xtask itself (`CARGO_PKG_NAME`, `CARGO_MANIFEST_DIR`, `OUT_DIR`, ...).
///
/// Why: build scripts such as ring's declare `rerun-if-env-changed` on those
/// names, and cargo compares them with its own environment. A cargo started
/// from xtask (`CARGO_PKG_NAME=xtask`) and one started from a test
/// (`CARGO_PKG_NAME=trellis-tests`) then disagree, and each rebuilds ring,
/// rustls and kube: half a minute per integration test target.
pub fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    for (name, _) in std::env::vars_os() {
        if name.to_str().is_some_and(is_per_package_variable) {
            cmd.env_remove(name);
        }
    }
    cmd
}

/// The variables cargo sets for the package it builds or runs.
fn is_per_package_variable(name: &str) -> bool {
    name == "OUT_DIR"
        || [
            "CARGO_PKG_",
            "CARGO_MANIFEST_",
            "CARGO_CRATE_",
            "CARGO_BIN_",
            "CARGO_CFG_",
            "CARGO_PRIMARY_PACKAGE",
            "CARGO_TARGET_TMPDIR",
            "CARGO_RUSTC_CURRENT_DIR",
        ]
        .iter()
        .any(|p| name.starts_with(p))
}

/// A line on stderr every [`Ticker::EVERY`] while a long command runs:
/// what is running and for how long. Some steps print nothing for minutes
/// (a Go link, one big crate, pods starting); this says they are alive.
/// Stops when dropped.
pub struct Ticker {
    state: Arc<(Mutex<Option<String>>, Condvar)>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Ticker {
    /// How often the line is printed.
    pub const EVERY: Duration = Duration::from_secs(25);

    /// Starts printing `what` and the time since now.
    pub fn start(what: impl Into<String>) -> Self {
        let state = Arc::new((Mutex::new(Some(what.into())), Condvar::new()));
        let thread = thread::spawn({
            let state = state.clone();
            move || {
                let started = Instant::now();
                // On a terminal, clear the line first: cargo may be drawing its progress bar there.
                let clear = if std::io::stderr().is_terminal() {
                    "\r\x1b[K"
                } else {
                    ""
                };
                let (what, wake) = &*state;
                let mut what = what.lock().unwrap();
                while what.is_some() {
                    what = wake.wait_timeout(what, Self::EVERY).unwrap().0;
                    match what.as_deref() {
                        Some(label) => eprintln!(
                            "{clear}    … {label}: {} so far",
                            minutes(started.elapsed())
                        ),
                        None => return,
                    }
                }
            }
        });
        Self {
            state,
            thread: Some(thread),
        }
    }

    /// Changes what the line names.
    pub fn set(&self, what: impl Into<String>) {
        *self.state.0.lock().unwrap() = Some(what.into());
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        *self.state.0.lock().unwrap() = None;
        self.state.1.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// `12m30s`, or `45s` under a minute.
pub fn minutes(d: Duration) -> String {
    let s = d.as_secs();
    if s < 60 {
        format!("{s}s")
    } else {
        format!("{}m{:02}s", s / 60, s % 60)
    }
}

#[cfg(test)]
mod tests {
    use super::{Ticker, is_per_package_variable, minutes};
    use std::time::Duration;

    #[test]
    fn minutes_read_as_people_write_them() {
        assert_eq!(minutes(Duration::from_secs(45)), "45s");
        assert_eq!(minutes(Duration::from_secs(750)), "12m30s");
    }

    #[test]
    fn a_ticker_stops_when_dropped() {
        let started = std::time::Instant::now();
        drop(Ticker::start("nothing"));
        assert!(started.elapsed() < Ticker::EVERY);
    }

    #[test]
    fn drops_what_cargo_sets_per_package_and_keeps_the_users_settings() {
        for dropped in [
            "CARGO_PKG_NAME",
            "CARGO_MANIFEST_DIR",
            "OUT_DIR",
            "CARGO_BIN_EXE_x",
        ] {
            assert!(is_per_package_variable(dropped), "{dropped}");
        }
        for kept in [
            "CARGO",
            "CARGO_HOME",
            "CARGO_TARGET_DIR",
            "CARGO_INCREMENTAL",
            "PATH",
        ] {
            assert!(!is_per_package_variable(kept), "{kept}");
        }
    }
}
