//! The cluster's processes: started detached with a log file and a pid file each,
//! found again by `status` and `down` in a later invocation.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::paths;

fn pid_file(name: &str) -> PathBuf {
    paths::run_dir().join("pids").join(format!("{name}.pid"))
}

/// The log file of a component.
pub fn log_file(name: &str) -> PathBuf {
    paths::log_dir().join(format!("{name}.log"))
}

/// The pid of a running component, if it runs: the pid file names a live process
/// whose executable is the one we started (so a recycled pid is not mistaken for it).
pub fn running(name: &str) -> Option<u32> {
    let pid: u32 = fs::read_to_string(pid_file(name))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let exe = fs::read_link(format!("/proc/{pid}/exe")).ok()?;
    let expected = fs::read_to_string(pid_file(name).with_extension("exe")).ok()?;
    (exe == Path::new(expected.trim())).then_some(pid)
}

/// Starts `cmd` detached (its own process group, so it outlives this command),
/// logging to `logs/<name>.log`. Does nothing if it already runs.
pub fn start(name: &str, cmd: &mut Command) -> Result<u32> {
    if let Some(pid) = running(name) {
        return Ok(pid);
    }
    fs::create_dir_all(paths::run_dir().join("pids"))?;
    fs::create_dir_all(paths::log_dir())?;
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_file(name))?;
    use std::os::unix::process::CommandExt;
    let child = cmd
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting {name}"))?;
    let pid = child.id();
    let exe = resolve(Path::new(cmd.get_program()));
    fs::write(
        pid_file(name).with_extension("exe"),
        exe.to_string_lossy().as_bytes(),
    )?;
    fs::write(pid_file(name), pid.to_string())?;
    Ok(pid)
}

/// The absolute, canonical path of a program, looked up on PATH when it has no slash,
/// which is what `/proc/<pid>/exe` will show.
fn resolve(program: &Path) -> PathBuf {
    let found = if program.components().count() > 1 {
        Some(program.to_path_buf())
    } else {
        std::env::var_os("PATH").and_then(|path| {
            std::env::split_paths(&path)
                .map(|dir| dir.join(program))
                .find(|candidate| candidate.is_file())
        })
    };
    found
        .and_then(|p| fs::canonicalize(p).ok())
        .unwrap_or_else(|| program.to_path_buf())
}

/// Stops a component: SIGTERM, then SIGKILL after `grace`. Idempotent.
pub fn stop(name: &str, grace: Duration) -> Result<()> {
    if let Some(pid) = running(name) {
        signal(pid, "TERM");
        let deadline = Instant::now() + grace;
        while alive(pid) && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(100));
        }
        if alive(pid) {
            signal(pid, "KILL");
            thread::sleep(Duration::from_millis(200));
        }
        if alive(pid) {
            bail!("{name} (pid {pid}) did not stop");
        }
    }
    let _ = fs::remove_file(pid_file(name));
    let _ = fs::remove_file(pid_file(name).with_extension("exe"));
    Ok(())
}

/// Sends a signal by name to a pid.
pub fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .args([format!("-{sig}"), pid.to_string()])
        .stderr(Stdio::null())
        .status();
}

fn alive(pid: u32) -> bool {
    // A zombie has no exe link; treat it as gone.
    Path::new(&format!("/proc/{pid}/exe")).exists()
}

/// Pids of every process whose executable is `exe` (for containerd shims, which outlive us).
pub fn pids_of(exe: &str) -> Vec<u32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            fs::read_link(format!("/proc/{pid}/exe"))
                .is_ok_and(|p| p.file_name().is_some_and(|n| n == exe))
        })
        .collect()
}

/// Waits until `ready` says yes, printing what it waits for; on time-out, says where to look.
pub fn wait_for(
    what: &str,
    log: &str,
    timeout: Duration,
    mut ready: impl FnMut() -> bool,
) -> Result<()> {
    let started = Instant::now();
    eprint!("    waiting for {what} ...");
    loop {
        if ready() {
            eprintln!(" ok ({:.1}s)", started.elapsed().as_secs_f32());
            return Ok(());
        }
        if !log.is_empty() && pid_file(log).exists() && running(log).is_none() {
            eprintln!(" failed");
            bail!(
                "{log} exited; see {} (last lines below)\n{}",
                log_file(log).display(),
                tail(&log_file(log), 15)
            );
        }
        if started.elapsed() > timeout {
            eprintln!(" timed out");
            bail!(
                "{what} not ready after {timeout:?}; see {} (last lines below)\n{}",
                log_file(log).display(),
                tail(&log_file(log), 15)
            );
        }
        thread::sleep(Duration::from_millis(250));
    }
}

/// The last `n` lines of a file.
pub fn tail(path: &Path, n: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
