//! `trellis-bench link-order`: the list `sidecar/build.rs` lays out the
//! sidecar's code by.
//!
//! Runs Trellis pairs under callgrind from their first instruction (plain
//! and mutual TLS, HTTP/1.1 and gRPC): start, a few seconds idle with the
//! health checks running, then a light load. Every function of the binary
//! that ran is listed by its symbol name as the linker knows it, in the
//! order the runs first showed them (the plain HTTP/1.1 pair's start and
//! idle seconds first: an idle sidecar touches all of those), each run's
//! new functions the most instructions first.
//! Symbol names differ between builds of different profiles, so each
//! `--sidecar-binary` adds its own names to one list.

use std::{
    collections::{HashMap, HashSet},
    fs,
    path::{Path, PathBuf},
    thread,
    time::Duration,
};

use anyhow::{Context, Result, bail};

use crate::{
    loadgen::{self, Target},
    mesh::Mesh,
    proxies::{self, Kind, Proto, Setup, Tracing},
    results_dir,
    upstream::Upstreams,
};

#[derive(clap::Args)]
pub struct LinkOrder {
    /// A `trellis-sidecar` build to profile; give one per build whose
    /// symbols the list should name (`cargo xtask link-order` gives the
    /// release and the image builds).
    #[arg(long = "sidecar-binary", required = true)]
    pub binaries: Vec<PathBuf>,
    /// Where the list is written.
    #[arg(long)]
    pub out: PathBuf,
    /// Seconds of load per pair and protocol.
    #[arg(long, default_value_t = 5)]
    pub duration: u64,
}

/// Requests a second through each pair: callgrind runs code about fifty
/// times slower, and which functions run does not depend on the rate.
const RATE: u64 = 100;

/// How long each pair idles before the load: health checks and the
/// exporter's timers run in it.
const IDLE: Duration = Duration::from_secs(3);

pub fn link_order(opts: &LinkOrder) -> Result<()> {
    if !crate::on_path("valgrind") {
        bail!("link-order needs valgrind (apt-get install valgrind)");
    }
    let dir = results_dir()?.join("link-order");
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir)?;
    let rig = Rig {
        up: Upstreams::start()?,
        mesh: Mesh::start()?,
        dir,
        duration: Duration::from_secs(opts.duration),
    };
    let mut list = vec![
        "# The order sidecar/build.rs links trellis-sidecar's functions in.".to_owned(),
        "# Written by `cargo xtask link-order` (trellis-bench link-order): the".to_owned(),
        "# functions callgrind saw sidecar pairs run, one section per build.".to_owned(),
    ];
    let mut listed = HashSet::new();
    for binary in &opts.binaries {
        let binary = binary
            .canonicalize()
            .with_context(|| format!("--sidecar-binary {}", binary.display()))?;
        // The build's profile, as its target directory names it.
        let build = binary
            .parent()
            .and_then(Path::file_name)
            .map_or("unknown".into(), |d| d.to_string_lossy());
        list.push(format!("# build: {build}"));
        for function in ran_in_order(&binary, &rig)? {
            if listed.insert(function.clone()) {
                list.push(function);
            }
        }
    }
    let mut text = list.join("\n");
    text.push('\n');
    fs::write(&opts.out, text).with_context(|| format!("writing {}", opts.out.display()))?;
    eprintln!("wrote {} symbols to {}", listed.len(), opts.out.display());
    Ok(())
}

/// What the pairs run against.
struct Rig {
    up: Upstreams,
    mesh: Mesh,
    /// Where the profiles go.
    dir: PathBuf,
    /// How long each pair is loaded.
    duration: Duration,
}

/// The functions of `binary` the pairs ran, in the list's order.
///
/// Each function's instructions are counted, and the first profile that
/// shows it is kept (in the order below: each pair's start, then its
/// load): the plain HTTP/1.1 pair's start comes first, so an idle
/// sidecar's code is one block, and each later profile adds only what it
/// ran anew.
fn ran_in_order(binary: &Path, rig: &Rig) -> Result<Vec<String>> {
    let sizes = xtask::binaries::functions(binary)?;
    let mut ran: HashMap<String, (usize, u64)> = HashMap::new();
    let mut profiles = 0;
    for kind in [Kind::Trellis, Kind::TrellisMtls] {
        for proto in [Proto::Http1, Proto::Grpc] {
            eprintln!("== {}: {} over {proto}", binary.display(), kind.name());
            let (started, loaded, run) = profile_pair(binary, rig, kind, proto)?;
            for (phase, files) in [("start and idle", started), ("load", loaded)] {
                let (mut new, mut new_code) = (0, 0);
                for file in files {
                    let profile = fs::read_to_string(&file)
                        .with_context(|| format!("reading {}", file.display()))?;
                    for (function, instructions) in executed(&profile) {
                        let Some(size) = sizes.get(&function) else {
                            continue;
                        };
                        let entry = ran.entry(function).or_insert_with(|| {
                            new += 1;
                            new_code += size;
                            (profiles, 0)
                        });
                        entry.1 += instructions;
                    }
                }
                eprintln!("   {phase}: {new} more functions, {} KiB", new_code / 1024);
                profiles += 1;
            }
            eprintln!("   {} requests, {} errors", run.requests, run.errors);
        }
    }
    let mut ranked: Vec<(String, (usize, u64))> = ran.into_iter().collect();
    ranked.sort_by(|(f, (first, n)), (g, (first_g, m))| {
        (first, std::cmp::Reverse(n), f).cmp(&(first_g, std::cmp::Reverse(m), g))
    });
    let code: u64 = ranked.iter().map(|(f, _)| sizes[f]).sum();
    let all: u64 = sizes.values().sum();
    eprintln!(
        "   {} of {} functions ran: {} of {} KiB of code",
        ranked.len(),
        sizes.len(),
        code / 1024,
        all / 1024
    );
    Ok(ranked.into_iter().map(|(f, _)| f).collect())
}

/// A pair of `binary` under callgrind from its first instruction: its
/// profiles after the start and the idle seconds, and after the load.
fn profile_pair(
    binary: &Path,
    rig: &Rig,
    kind: Kind,
    proto: Proto,
) -> Result<(Vec<PathBuf>, Vec<PathBuf>, loadgen::Run)> {
    // Mangled names, as the linker matches them.
    let env = ["VALGRIND_OPTS=--demangle=no".to_owned()];
    let setup = Setup {
        dir: &rig.dir,
        sidecar: binary,
        upstream: match proto {
            Proto::Http1 => rig.up.http,
            Proto::Grpc => rig.up.grpc,
        },
        http_app: rig.up.http,
        otlp: rig.up.otlp,
        wrapper: None,
        callgrind: Some(&rig.dir),
        tracing: Tracing::REALISTIC,
        mesh: Some(&rig.mesh),
        sidecar_env: &env,
    };
    let pair = proxies::start(kind, proto, &setup)?;
    thread::sleep(IDLE);
    let started = pair.callgrind_dump()?;
    let run = match proto {
        Proto::Http1 => {
            loadgen::h1_open_loop(pair.front, &Target::service(), RATE, rig.duration, 4)?
        }
        Proto::Grpc => loadgen::grpc_open_loop(pair.front, RATE, rig.duration, 2)?,
    };
    let loaded = pair.callgrind_dump()?;
    let files = |dumps: Vec<(u64, PathBuf)>| dumps.into_iter().map(|(_, f)| f).collect();
    Ok((files(started), files(loaded), run))
}

/// The functions a callgrind profile shows running, with the instructions
/// each executed itself (a call's inclusive cost, the line after `calls=`,
/// is not the caller's own).
fn executed(profile: &str) -> HashMap<String, u64> {
    let mut names: HashMap<String, String> = HashMap::new();
    let mut out: HashMap<String, u64> = HashMap::new();
    let mut current: Option<String> = None;
    let mut after_call = false;
    for line in profile.lines() {
        if let Some(spec) = line
            .strip_prefix("fn=")
            .or_else(|| line.strip_prefix("cfn="))
        {
            // `(id) name` defines a compressed name, `(id)` uses it.
            let name = match spec.strip_prefix('(').and_then(|s| s.split_once(')')) {
                Some((id, rest)) if !rest.trim().is_empty() => {
                    names.insert(id.to_owned(), rest.trim().to_owned());
                    rest.trim().to_owned()
                }
                Some((id, _)) => names.get(id).cloned().unwrap_or_default(),
                None => spec.trim().to_owned(),
            };
            if line.starts_with("fn=") {
                current = Some(name);
            }
            continue;
        }
        if line.starts_with("calls=") {
            after_call = true;
            continue;
        }
        let is_cost = line
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_digit() || matches!(c, '+' | '-' | '*'));
        if !is_cost {
            continue;
        }
        if std::mem::take(&mut after_call) {
            continue;
        }
        if let (Some(f), Some(n)) = (
            &current,
            line.split_whitespace()
                .nth(1)
                .and_then(|n| n.parse::<u64>().ok()),
        ) {
            *out.entry(f.clone()).or_default() += n;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::executed;

    #[test]
    fn counts_each_functions_own_instructions_not_its_calls() {
        let profile = "\
events: Ir
fl=(1) a.rs
fn=(1) _ZN4main3run17h0123456789abcdefE
15 100
+2 5
cfn=(2) _ZN4main4work17hfedcba9876543210E
calls=3 40
16 7000
fn=(2)
40 6990
fn=(3) never_called_twice
* 3
";
        let ran = executed(profile);
        assert_eq!(ran["_ZN4main3run17h0123456789abcdefE"], 105);
        assert_eq!(ran["_ZN4main4work17hfedcba9876543210E"], 6990);
        assert_eq!(ran["never_called_twice"], 3);
        assert_eq!(ran.len(), 3);
    }
}
