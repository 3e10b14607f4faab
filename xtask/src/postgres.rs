//! `cargo xtask postgres up|down`: the example shop's PostgreSQL on the node.
//!
//! The shop (examples/shop) reaches its database as `postgres.<namespace>.svc`,
//! a Service without a selector whose EndpointSlice names the node's address on
//! the pod network, `10.244.0.1:5432`. This starts Debian's PostgreSQL (whichever major version is installed) there:
//!
//! - its own cluster in `/var/lib/trellis/postgres` (`$TRELLIS_POSTGRES_DIR`),
//!   owned by the `postgres` OS user (the server refuses to run as root),
//!   created on first `up` and reused after;
//! - listening on the bridge address only (and a Unix socket in that folder for
//!   administration), never on the host's other interfaces; a system PostgreSQL
//!   on 127.0.0.1:5432 does not conflict;
//! - the role `shop` (password `shop`) owning `shop_user`, `shop_product` and
//!   `shop_order`, reachable only from the pod network with scram-sha-256;
//! - durability off (`fsync=off`): this is the demo's and the tests' scratch
//!   database, deleted by `down`.
//!
//! Why its life ends with the cluster's: it listens on the cluster's bridge,
//! which `cluster down` removes, so `cluster down` stops it and deletes its
//! folder too (see [`down`]); `up` refuses to start without the bridge.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::{cluster::network, run};

/// The PostgreSQL programs this module runs from one directory.
const PG_PROGRAMS: &[&str] = &["postgres", "initdb", "pg_ctl", "pg_isready", "psql"];
/// The port, PostgreSQL's usual one: the shop's EndpointSlice names it.
pub const PORT: u16 = 5432;
/// The role the shop's services log in as, and its password.
const ROLE: &str = "shop";
/// One database per service, each with its own migrations.
pub const DATABASES: &[&str] = &["shop_user", "shop_product", "shop_order"];

/// The folder holding the data directory, the log and the Unix socket.
pub fn dir() -> PathBuf {
    std::env::var_os("TRELLIS_POSTGRES_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/var/lib/trellis/postgres".into())
}

fn data_dir() -> PathBuf {
    dir().join("data")
}

fn log_file() -> PathBuf {
    dir().join("postgres.log")
}

/// Where PostgreSQL's programs are, whatever the major version: the highest
/// `/usr/lib/postgresql/<version>/bin` (Debian's layout) holding all of
/// [`PG_PROGRAMS`], else the directory `postgres` on `PATH` resolves to.
fn pg_bin() -> Result<PathBuf> {
    let mut versions: Vec<(Vec<u64>, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let version = name
                .split('.')
                .map(|n| n.parse::<u64>().ok())
                .collect::<Option<Vec<_>>>()?;
            Some((version, e.path().join("bin")))
        })
        .collect();
    versions.sort_by(|a, b| b.0.cmp(&a.0));
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .filter_map(|d| {
            fs::canonicalize(d.join("postgres"))
                .ok()?
                .parent()
                .map(Path::to_path_buf)
        });
    versions
        .into_iter()
        .map(|(_, p)| p)
        .chain(on_path)
        .find(|dir| PG_PROGRAMS.iter().all(|p| dir.join(p).is_file()))
        .with_context(|| {
            format!(
                "PostgreSQL is not installed: no /usr/lib/postgresql/<version>/bin or PATH directory holds all of {}; `bash .ci/install` installs it (Debian's package postgresql)",
                PG_PROGRAMS.join(", ")
            )
        })
}

/// A PostgreSQL program, from [`pg_bin`] (else looked up on `PATH`, to fail
/// there), run as the `postgres` OS user.
fn pg(bin: &str) -> Command {
    let program = pg_bin()
        .map(|d| d.join(bin))
        .unwrap_or_else(|_| PathBuf::from(bin));
    let mut cmd = Command::new("runuser");
    // From `/`, which the postgres user can read (the workspace may not be).
    cmd.current_dir("/")
        .args(["-u", "postgres", "--"])
        .arg(program);
    cmd
}

/// Whether the server of our data directory runs (`pg_ctl status`).
pub fn running() -> bool {
    data_dir().join("PG_VERSION").exists()
        && run::quietly(pg("pg_ctl").arg("status").arg("-D").arg(data_dir()))
}

/// Starts the shop's PostgreSQL on the node's bridge address, creating its
/// cluster, role and databases when missing. Idempotent.
pub fn up() -> Result<()> {
    pg_bin()?;
    let addr = network::NODE_IP;
    let has_addr =
        run::output(Command::new("ip").args(["-o", "-4", "addr", "show", "dev", network::BRIDGE]))
            .map(|out| out.contains(&format!("inet {addr}/")))
            .unwrap_or(false);
    if !has_addr {
        bail!(
            "the node's bridge {} with {addr} is not up, and PostgreSQL listens there: `cargo xtask cluster up` first",
            network::BRIDGE
        );
    }
    if running() {
        ensure_databases()?;
        eprintln!("==> PostgreSQL runs on {addr}:{PORT} ({})", dir().display());
        return Ok(());
    }
    let dir = dir();
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    run::output(Command::new("chown").args(["postgres:postgres"]).arg(&dir))?;
    run::output(Command::new("chmod").arg("0700").arg(&dir))?;
    if !data_dir().join("PG_VERSION").exists() {
        eprintln!(
            "==> creating a PostgreSQL cluster in {}",
            data_dir().display()
        );
        run::output(
            pg("initdb")
                .args(["-U", "postgres", "-E", "UTF8", "--no-sync"])
                .args(["--auth-local=peer", "--auth-host=scram-sha-256"])
                .arg("-D")
                .arg(data_dir()),
        )?;
    }
    // Rewritten on every start, so an edited or older file cannot widen access:
    // the superuser over the Unix socket only, the shop's role from pods only.
    let hba = format!(
        "# Written by cargo xtask postgres up.\n\
         local all postgres peer\n\
         host {} {ROLE} {} scram-sha-256\n",
        DATABASES.join(","),
        network::POD_SUBNET
    );
    let hba_path = data_dir().join("pg_hba.conf");
    fs::write(&hba_path, hba).with_context(|| format!("writing {}", hba_path.display()))?;
    run::output(
        Command::new("chown")
            .arg("postgres:postgres")
            .arg(&hba_path),
    )?;

    eprintln!("==> starting PostgreSQL on {addr}:{PORT}");
    let options = format!(
        "-c listen_addresses={addr} -p {PORT} -k {} -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200",
        dir.display()
    );
    // pg_ctl detaches the server (setsid), so it outlives this process.
    let started = run::output(
        pg("pg_ctl")
            .args(["start", "-w", "-t", "60", "-D"])
            .arg(data_dir())
            .arg("-l")
            .arg(log_file())
            .args(["-o", &options]),
    );
    if let Err(e) = started {
        let log = fs::read_to_string(log_file()).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(15).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        bail!("{e}\n{}:\n{}", log_file().display(), tail.join("\n"));
    }
    wait_ready(Duration::from_secs(30))?;
    ensure_databases()?;
    eprintln!(
        "==> PostgreSQL runs on {addr}:{PORT}: role {ROLE}, databases {}",
        DATABASES.join(", ")
    );
    Ok(())
}

fn wait_ready(timeout: Duration) -> Result<()> {
    let started = Instant::now();
    let pg_isready = pg_bin()?.join("pg_isready");
    while !run::quietly(Command::new(&pg_isready).args([
        "-q",
        "-h",
        network::NODE_IP,
        "-p",
        &PORT.to_string(),
    ])) {
        if started.elapsed() > timeout {
            bail!(
                "PostgreSQL did not accept connections on {}:{PORT} within {timeout:?}; see {}",
                network::NODE_IP,
                log_file().display()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

/// `psql` as the superuser over the Unix socket: one statement, its output.
fn psql(sql: &str) -> Result<String> {
    run::output(
        pg("psql")
            .arg("-h")
            .arg(dir())
            .args(["-p", &PORT.to_string(), "-d", "postgres"])
            .args(["-v", "ON_ERROR_STOP=1", "-tAc", sql]),
    )
}

/// Creates the role and the databases that do not exist yet.
fn ensure_databases() -> Result<()> {
    if psql(&format!("SELECT 1 FROM pg_roles WHERE rolname = '{ROLE}'"))?.trim() != "1" {
        psql(&format!("CREATE ROLE {ROLE} LOGIN PASSWORD '{ROLE}'"))?;
    }
    for db in DATABASES {
        if psql(&format!("SELECT 1 FROM pg_database WHERE datname = '{db}'"))?.trim() != "1" {
            psql(&format!("CREATE DATABASE {db} OWNER {ROLE}"))?;
        }
    }
    Ok(())
}

/// Stops the server (fast shutdown: sessions are ended) and removes its folder.
/// Idempotent; `cluster down` calls it.
pub fn down() -> Result<()> {
    let dir = dir();
    if running() {
        eprintln!("==> stopping PostgreSQL");
        run::output(
            pg("pg_ctl")
                .args(["stop", "-m", "fast", "-w", "-t", "30", "-D"])
                .arg(data_dir()),
        )?;
    }
    if dir.exists() {
        fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    Ok(())
}

/// Says whether it runs, for `cluster status`-like output.
pub fn status() -> Result<()> {
    if running() {
        println!(
            "PostgreSQL: running on {}:{PORT} (data in {}, log {})",
            network::NODE_IP,
            data_dir().display(),
            log_file().display()
        );
    } else {
        println!("PostgreSQL: not running (cargo xtask postgres up)");
    }
    Ok(())
}
