//! `cargo xtask conformance`: the Gateway API conformance suite of the pinned
//! release against the local cluster's `trellis` GatewayClass.
//!
//! Opt-in, not a tier of `cargo xtask test`: the suite takes tens of minutes
//! and CI's budget is 45. It ensures the cluster (with the CRDs), imports the
//! suite's backend images ([`super::backends`]), builds Trellis's images and
//! installs its chart for every namespace, refuses early unless the
//! GatewayClass `trellis` is Accepted (the chart creates it; the suite itself
//! would wait three minutes and then fail), then runs the suite's `go test`
//! binary, compiled once into the tool cache with `go test -c`.
//!
//! Profiles GATEWAY-HTTP and GATEWAY-GRPC, claiming their core features
//! ([`CORE_FEATURES`]) and the extended ones in [`EXTENDED_FEATURES`]; every
//! other extended feature is reported as unsupported and its tests skipped.
//! A whole run writes the suite's report to
//! `docs/conformance/gateway-api-<release>-report.yaml`, to be committed; a
//! subset (`--run`) or a trial of more features (`--features`) writes it under
//! target/conformance/ only, so that it never replaces the whole run's. The raw output is always in
//! `target/conformance/gateway-api-<release>.log`.

use std::{
    fs,
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use super::{Release, backends, tools_module};
use crate::{cluster, paths, run, tools::Tools};

/// The GatewayClass the suite runs against; the chart creates it.
pub const GATEWAY_CLASS: &str = "trellis";
/// The controller that must own [`GATEWAY_CLASS`].
pub const CONTROLLER_NAME: &str = "trellis.dev/gateway-controller";
/// The conformance profiles claimed.
const PROFILES: &str = "GATEWAY-HTTP,GATEWAY-GRPC";
/// The core features of [`PROFILES`]. The suite enables a profile's core
/// features by itself; naming them keeps the list non-empty, since with no
/// feature flag at all the suite would instead infer the features from the
/// GatewayClass's `status.supportedFeatures`.
const CORE_FEATURES: &[&str] = &["Gateway", "HTTPRoute", "GRPCRoute", "ReferenceGrant"];
/// Extended features Trellis claims: the suite runs their tests, which must
/// pass. Add a feature here when the controller implements it (try it first
/// with `--features`).
/// Not claimed yet (they failed a trial): HTTPRouteBackendProtocolH2C (the
/// gateway sends to the port discovery picks, not the one the backendRef
/// names) and GatewayHTTPListenerIsolation (a request matching a more
/// specific listener's hostname must not reach a less specific listener's
/// routes).
const EXTENDED_FEATURES: &[&str] = &[
    "GatewayPort8080",
    "HTTPRouteMethodMatching",
    "HTTPRouteQueryParamMatching",
    "HTTPRouteResponseHeaderModification",
    "HTTPRouteBackendRequestHeaderModification",
    "HTTPRoutePathRewrite",
    "HTTPRouteHostRewrite",
    "HTTPRouteSchemeRedirect",
    "HTTPRoutePathRedirect",
    "HTTPRoutePortRedirect",
    "HTTPRoute303RedirectStatusCode",
    "HTTPRoute307RedirectStatusCode",
    "HTTPRoute308RedirectStatusCode",
    "HTTPRouteRequestTimeout",
    "HTTPRouteParentRefPort",
    "HTTPRouteNamedRouteRule",
    "GRPCRouteNamedRouteRule",
];
/// The whole suite's time limit (`go test -timeout`).
const SUITE_TIMEOUT: &str = "60m";
/// How long the GatewayClass may take to turn Accepted, for a controller that just started.
const CLASS_WAIT: Duration = Duration::from_secs(30);

/// Options of `cargo xtask conformance`.
#[derive(clap::Args, Debug)]
pub struct Conformance {
    /// Only the tests whose name matches this Go regular expression (passed as
    /// `-run TestConformance/<regex>`), e.g. `HTTPRouteSimpleSameNamespace` or `^GRPCRoute`.
    #[arg(long, value_name = "REGEX")]
    pub run: Option<String>,
    /// Claim these extended features too, for this run (comma-separated names,
    /// e.g. `HTTPRouteQueryParamMatching,HTTPRouteMethodMatching`).
    #[arg(long, value_delimiter = ',', value_name = "FEATURES")]
    pub features: Vec<String>,
    /// Leave the suite's namespaces, Gateways and backends, and the Trellis
    /// release, in place afterwards
    /// (to look at them, and for a quicker next run).
    #[arg(long)]
    pub keep: bool,
    /// Print all of the suite's output, not only its setup, results and errors.
    #[arg(long, short)]
    pub verbose: bool,
    /// Further flags for the suite, after `--` (e.g. `-- --debug`,
    /// `-- --skip-tests=A,B`); one given here overrides xtask's, since the last one wins.
    #[arg(last = true, value_name = "SUITE_FLAGS")]
    pub suite_args: Vec<String>,
}

/// Runs the suite; fails when a test fails, naming them and what to do next.
pub fn run(opts: &Conformance) -> Result<()> {
    cluster::up(cluster::Mode::Node)?;
    let tools = Tools::ensure()?;
    let release = Release::resolve()?;
    backends::ensure(&release, &tools)?;
    install_trellis(&tools)?;
    gateway_class_accepted(&tools)?;
    let suite = suite_binary(&release)?;

    let out_dir = paths::workspace().join("target/conformance");
    fs::create_dir_all(&out_dir)?;
    let log_path = out_dir.join(format!("gateway-api-{}.log", release.version));
    let report_path = out_dir.join(format!("gateway-api-{}-report.yaml", release.version));
    let _ = fs::remove_file(&report_path);

    let mut features: Vec<String> = CORE_FEATURES
        .iter()
        .chain(EXTENDED_FEATURES)
        .map(|f| f.to_string())
        .collect();
    features.extend(opts.features.iter().cloned());
    let repository = env!("CARGO_PKG_REPOSITORY");
    let test_run = match &opts.run {
        Some(regex) => format!("^TestConformance$/{regex}"),
        None => "^TestConformance$".into(),
    };
    let mut cmd = Command::new(&suite);
    cmd.current_dir(&release.conformance_dir)
        .env("KUBECONFIG", paths::admin_kubeconfig())
        .args([
            "-test.v",
            "-test.run",
            &test_run,
            "-test.timeout",
            SUITE_TIMEOUT,
        ])
        .arg(format!("--gateway-class={GATEWAY_CLASS}"))
        .arg(format!("--conformance-profiles={PROFILES}"))
        .arg(format!("--supported-features={}", features.join(",")))
        .arg(format!("--report-output={}", report_path.display()))
        .args(["--organization=trellis", "--project=trellis"])
        .arg(format!("--url={repository}"))
        .arg(format!("--version={}", version()))
        .arg(format!("--contact={repository}/issues"));
    if opts.keep {
        cmd.args([
            "--cleanup-base-resources=false",
            "--cleanup-test-resources=false",
        ]);
    }
    cmd.args(&opts.suite_args);

    eprintln!(
        "==> Gateway API {} conformance: {PROFILES}, class {GATEWAY_CLASS}{}",
        release.version,
        opts.run
            .as_deref()
            .map(|r| format!(", tests matching {r}"))
            .unwrap_or_default()
    );
    eprintln!("    features claimed: {}", features.join(", "));
    eprintln!("    full output: {}", log_path.display());
    let started = Instant::now();
    let outcome = stream(cmd, &log_path, opts.verbose);
    // A release for every namespace would also reconcile the MicroServices
    // of the test tiers' own (namespaced) operators: it does not stay.
    if !opts.keep {
        uninstall_trellis(&tools);
    }
    let outcome = outcome?;
    eprintln!(
        "==> {} passed, {} failed, {} skipped in {}",
        outcome.passed,
        outcome.failed.len(),
        outcome.skipped,
        run::minutes(started.elapsed())
    );

    let subset = !is_whole_run(opts);
    report(&release, &report_path, subset)?;

    if outcome.success {
        return Ok(());
    }
    match outcome.failed.first() {
        Some(first) => bail!(
            "{} conformance test(s) failed ({}); fix the first and run it alone: cargo xtask conformance --run '^{first}$' (output in {})",
            outcome.failed.len(),
            outcome.failed.join(", "),
            log_path.display()
        ),
        None => bail!(
            "the conformance suite failed before any test ran{}: read its Error lines above (the whole output is {}); its setup needs every Gateway of gateway-conformance-* Accepted and Programmed at its current generation and every pod there Ready",
            outcome
                .last_wait
                .map(|w| format!(" (it was waiting for: {w})"))
                .unwrap_or_default(),
            log_path.display()
        ),
    }
}

/// Suite flags that change which tests run or which features are claimed.
const SELECTING_FLAGS: &[&str] = &[
    "-test.run",
    "--run-test",
    "--skip-tests",
    "--supported-features",
    "--exempt-features",
    "--all-features",
    "--conformance-profiles",
];

/// Whether this run is the committed configuration, whose report belongs in
/// docs/: every test, the features of [`EXTENDED_FEATURES`] and no more.
fn is_whole_run(opts: &Conformance) -> bool {
    opts.run.is_none()
        && opts.features.is_empty()
        && !opts
            .suite_args
            .iter()
            .any(|a| SELECTING_FLAGS.iter().any(|f| a.starts_with(f)))
}

/// What the suite's output said.
struct Outcome {
    /// The test binary exited 0.
    success: bool,
    passed: usize,
    skipped: usize,
    /// The short names of the tests that failed, in order.
    failed: Vec<String>,
    /// The last thing the suite's wait helpers (helpers.go) said they were
    /// waiting for, without its timestamp: after a failed setup, what was missing.
    last_wait: Option<String>,
}

/// Runs the suite with stdout and stderr merged into the log, printing the
/// lines that say what happens (all of them with `verbose`).
fn stream(mut cmd: Command, log_path: &Path, verbose: bool) -> Result<Outcome> {
    let (reader, writer) = std::io::pipe()?;
    cmd.stdin(Stdio::null())
        .stdout(writer.try_clone()?)
        .stderr(writer);
    let mut child = cmd
        .spawn()
        .with_context(|| format!("could not start `{}`", run::describe(&cmd)))?;
    // The command holds the pipe's write ends until dropped; without this the
    // read below would never see the end of the output.
    drop(cmd);
    let mut log =
        fs::File::create(log_path).with_context(|| format!("creating {}", log_path.display()))?;
    let ticker = run::Ticker::start("the conformance suite (setup waits for Gateways and pods)");
    let mut outcome = Outcome {
        success: false,
        passed: 0,
        skipped: 0,
        failed: Vec::new(),
        last_wait: None,
    };
    let mut in_error = false;
    for line in BufReader::new(reader).lines() {
        let line = line?;
        writeln!(log, "{line}")?;
        let trimmed = line.trim_start();
        // The last poll of a wait that timed out only says so; the one before names what was missing.
        if trimmed.starts_with("helpers.go:") && !trimmed.contains("deadline exceeded") {
            let said = trimmed.split_once("Z: ").map_or(trimmed, |(_, said)| said);
            outcome.last_wait = Some(said.to_owned());
        }
        if let Some(result) = subtest_result(trimmed) {
            match result {
                ("PASS", _) => outcome.passed += 1,
                ("SKIP", _) => outcome.skipped += 1,
                (_, name) => outcome.failed.push(name.to_owned()),
            }
            if let Some(name) = outcome.failed.last().filter(|_| result.0 == "FAIL") {
                ticker.set(format!("the conformance suite ({name} failed)"));
            }
        }
        // testify's "Error:" is followed by the error itself, on lines of
        // their own, up to its "Test:" line.
        if trimmed.starts_with("Error:") {
            in_error = true;
        } else if trimmed.starts_with("Test:") {
            in_error = false;
        }
        if verbose || in_error || worth_showing(trimmed) {
            eprintln!("    {line}");
        }
    }
    outcome.success = child.wait()?.success();
    drop(ticker);
    Ok(outcome)
}

/// `("PASS" | "FAIL" | "SKIP", short name)` for a line closing one of the suite's tests.
fn subtest_result(line: &str) -> Option<(&str, &str)> {
    let rest = line.strip_prefix("--- ")?;
    let (verdict, rest) = rest.split_once(": ")?;
    let name = rest.strip_prefix("TestConformance/")?;
    let name = name.split_whitespace().next()?;
    // Nested subtests (`TestConformance/A/case`) belong to their test.
    (!name.contains('/')).then_some((verdict, name))
}

/// The lines printed without `--verbose` besides errors: setup steps,
/// results, why a test was skipped, testify's messages, and the binary's verdict.
fn worth_showing(line: &str) -> bool {
    line.starts_with("--- ")
        || line.starts_with("panic:")
        || line.starts_with("Messages:")
        || line.contains("Test Setup:")
        || line.contains("Skipping ")
        || matches!(line, "PASS" | "FAIL")
}

/// Keeps the report under target/ and, after a whole run that reached the
/// tests, copies it to docs/conformance/.
fn report(release: &Release, written: &Path, subset: bool) -> Result<()> {
    let Ok(text) = fs::read_to_string(written) else {
        eprintln!("    the suite wrote no report");
        return Ok(());
    };
    // A run stopped in setup leaves a report without a single test result.
    if !text.contains("core:") {
        eprintln!(
            "    the report ({}) holds no results: no test ran",
            written.display()
        );
        return Ok(());
    }
    if subset {
        eprintln!(
            "    report of this partial run: {} (docs/conformance/ keeps the last whole run's)",
            written.display()
        );
        return Ok(());
    }
    let docs = paths::workspace().join("docs/conformance");
    fs::create_dir_all(&docs)?;
    let dest = docs.join(format!("gateway-api-{}-report.yaml", release.version));
    fs::copy(written, &dest)
        .with_context(|| format!("copying the report to {}", dest.display()))?;
    eprintln!("    report: {} (commit it)", dest.display());
    Ok(())
}

/// The release the suite runs against, installed for every namespace.
const RELEASE: &str = "trellis";
/// Its namespace.
const RELEASE_NAMESPACE: &str = "trellis-system";

/// Builds the images (what changed since the last build) and installs the
/// chart as `trellis` in `trellis-system` for every namespace, with the
/// Gateways' addresses taken from their pods: this host reaches pod IPs
/// but not Service IPs.
fn install_trellis(tools: &Tools) -> Result<()> {
    crate::images::build(true)?;
    eprintln!(
        "==> helm upgrade --install {RELEASE} charts/trellis -n {RELEASE_NAMESPACE} (gateway.addressFrom=pod)"
    );
    run::status(
        Command::new(tools.helm())
            .env("KUBECONFIG", paths::admin_kubeconfig())
            .args(["upgrade", "--install", RELEASE])
            .arg(paths::workspace().join("charts/trellis"))
            .args(["--namespace", RELEASE_NAMESPACE, "--create-namespace"])
            .args(["--set", "gateway.addressFrom=pod"])
            .args(["--wait", "--timeout", "180s"]),
    )?;
    // The images keep their tags when rebuilt: restart, so the operator
    // runs the binary just imported.
    let kubectl = || {
        let mut c = Command::new(tools.kube("kubectl"));
        c.env("KUBECONFIG", paths::admin_kubeconfig())
            .args(["-n", RELEASE_NAMESPACE]);
        c
    };
    run::status(kubectl().args(["rollout", "restart", "deployment/trellis-operator"]))?;
    run::status(kubectl().args([
        "rollout",
        "status",
        "deployment/trellis-operator",
        "--timeout=120s",
    ]))
}

/// Uninstalls what [`install_trellis`] installed, saying so if it cannot.
fn uninstall_trellis(tools: &Tools) {
    eprintln!("==> helm uninstall {RELEASE} -n {RELEASE_NAMESPACE} (--keep keeps it)");
    let done = run::status(
        Command::new(tools.helm())
            .env("KUBECONFIG", paths::admin_kubeconfig())
            .args([
                "uninstall",
                RELEASE,
                "--namespace",
                RELEASE_NAMESPACE,
                "--wait",
            ]),
    );
    if let Err(error) = done {
        eprintln!(
            "    could not uninstall {RELEASE} ({error}); run: helm uninstall {RELEASE} -n {RELEASE_NAMESPACE}"
        );
    }
}

/// Waits a little for the GatewayClass to be Accepted by Trellis's
/// controller, and says what is missing when it is not.
fn gateway_class_accepted(tools: &Tools) -> Result<()> {
    let started = Instant::now();
    loop {
        let state = class_state(tools)?;
        match &state {
            ClassState::Accepted => return Ok(()),
            ClassState::Missing => bail!(
                "there is no GatewayClass {GATEWAY_CLASS}: install Trellis with its chart, which creates it for {CONTROLLER_NAME} (README, \"Gateway API\"), then run this again"
            ),
            ClassState::OtherController(other) => bail!(
                "GatewayClass {GATEWAY_CLASS} belongs to controller {other}, not {CONTROLLER_NAME}: the suite would test that controller; delete the class and reinstall Trellis's chart"
            ),
            ClassState::NotAccepted(why) if started.elapsed() >= CLASS_WAIT => bail!(
                "GatewayClass {GATEWAY_CLASS} is not Accepted after {}s ({why}): is the Trellis operator running with its Gateway controller? (kubectl -n trellis-system logs deploy/trellis-operator)",
                CLASS_WAIT.as_secs()
            ),
            ClassState::NotAccepted(_) => std::thread::sleep(Duration::from_secs(1)),
        }
    }
}

/// What the GatewayClass says about itself.
enum ClassState {
    Accepted,
    Missing,
    OtherController(String),
    /// Why not: the condition's status, reason and message, or that there is none yet.
    NotAccepted(String),
}

fn class_state(tools: &Tools) -> Result<ClassState> {
    let out = tools
        .kubectl()
        .args([
            "get",
            "gatewayclass",
            GATEWAY_CLASS,
            "-o",
            "json",
            "--ignore-not-found",
        ])
        .output()
        .context("could not run kubectl")?;
    if !out.status.success() {
        bail!(
            "kubectl get gatewayclass {GATEWAY_CLASS} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    if out.stdout.iter().all(u8::is_ascii_whitespace) {
        return Ok(ClassState::Missing);
    }
    let class: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    Ok(class_state_of(&class))
}

/// The state of a GatewayClass, as the suite judges it: Accepted True with
/// the current generation observed.
fn class_state_of(class: &serde_json::Value) -> ClassState {
    let controller = class["spec"]["controllerName"].as_str().unwrap_or_default();
    if controller != CONTROLLER_NAME {
        return ClassState::OtherController(controller.to_owned());
    }
    let generation = class["metadata"]["generation"].as_i64();
    let accepted = class["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["type"] == "Accepted");
    let Some(condition) = accepted else {
        return ClassState::NotAccepted("no Accepted condition yet".into());
    };
    let text = |field: &str| condition[field].as_str().unwrap_or_default().to_owned();
    if text("status") != "True" {
        // The CRD's default is `Unknown`, `Pending`, "Waiting for controller".
        return ClassState::NotAccepted(format!(
            "Accepted is {}, reason {}: {}",
            text("status"),
            text("reason"),
            text("message")
        ));
    }
    let observed = condition["observedGeneration"].as_i64();
    if observed != generation {
        return ClassState::NotAccepted(format!(
            "Accepted is True but for generation {}, while the class is at {}",
            observed.map_or("none".into(), |g| g.to_string()),
            generation.map_or("none".into(), |g| g.to_string())
        ));
    }
    ClassState::Accepted
}

/// The suite's test binary, compiled once per pin (`go test -c`) into the tool cache.
fn suite_binary(release: &Release) -> Result<PathBuf> {
    let module = tools_module();
    let mut inputs = crate::tools::module_inputs(&module)?;
    inputs.push(b"go test -c".to_vec());
    let dir = crate::tools::cached(
        "gateway-api-conformance",
        &release.version,
        &inputs,
        |partial| {
            eprintln!(
                "==> compiling the Gateway API {} conformance suite (go test -c; a few minutes the first time)",
                release.version
            );
            let _ticker = run::Ticker::start("go test -c sigs.k8s.io/gateway-api/conformance");
            run::output(
                Command::new("go")
                    .current_dir(&module)
                    .env("GOTOOLCHAIN", "local")
                    .env("GOFLAGS", "-mod=readonly")
                    .args(["test", "-c", "-o"])
                    .arg(partial.join("conformance.test"))
                    .arg("sigs.k8s.io/gateway-api/conformance"),
            )
            .context("compiling the conformance suite in tools/gateway-api: check the Go proxy is reachable and go.sum is current")?;
            Ok(())
        },
    )?;
    Ok(dir.join("conformance.test"))
}

/// The implementation's version for the report: `git describe`, prefixed
/// with the workspace's version while the repository has no tags.
fn version() -> String {
    let described = run::output(
        Command::new("git")
            .current_dir(paths::workspace())
            .args(["describe", "--tags", "--always", "--dirty"]),
    )
    .map(|s| s.trim().to_owned())
    .unwrap_or_default();
    let workspace = env!("CARGO_PKG_VERSION");
    match described.as_str() {
        "" => format!("v{workspace}"),
        d if d.starts_with('v') => d.to_owned(),
        d => format!("v{workspace}-{d}"),
    }
}

#[cfg(test)]
mod tests {
    use super::{
        ClassState, Conformance, class_state_of, is_whole_run, subtest_result, worth_showing,
    };
    use serde_json::json;

    #[test]
    fn reads_the_suites_verdicts() {
        assert_eq!(
            subtest_result("--- PASS: TestConformance/HTTPRouteSimpleSameNamespace (3.21s)"),
            Some(("PASS", "HTTPRouteSimpleSameNamespace"))
        );
        assert_eq!(
            subtest_result("--- FAIL: TestConformance/GatewayClassObservedGenerationBump (60.00s)"),
            Some(("FAIL", "GatewayClassObservedGenerationBump"))
        );
        assert_eq!(
            subtest_result("--- PASS: TestConformance/HTTPRouteMatching/0_request_to_'/'"),
            None
        );
        assert_eq!(subtest_result("--- FAIL: TestConformance (181.02s)"), None);
        assert!(worth_showing("--- SKIP: TestConformance/X (0.00s)"));
        assert!(!worth_showing("=== RUN   TestConformance/X"));
    }

    #[test]
    fn only_the_committed_configuration_is_a_whole_run() {
        let opts = |run: Option<&str>, features: &[&str], suite_args: &[&str]| Conformance {
            run: run.map(str::to_owned),
            features: features.iter().map(|f| f.to_string()).collect(),
            keep: false,
            verbose: false,
            suite_args: suite_args.iter().map(|a| a.to_string()).collect(),
        };
        assert!(is_whole_run(&opts(None, &[], &[])));
        assert!(is_whole_run(&opts(None, &[], &["--debug"])));
        assert!(!is_whole_run(&opts(Some("^HTTPRoute"), &[], &[])));
        assert!(!is_whole_run(&opts(
            None,
            &["HTTPRouteQueryParamMatching"],
            &[]
        )));
        assert!(!is_whole_run(&opts(None, &[], &["--skip-tests=A"])));
        assert!(!is_whole_run(&opts(None, &[], &["--all-features"])));
    }

    #[test]
    fn a_class_is_accepted_only_at_its_generation() {
        let class = |status: &str, observed: i64| {
            json!({
                "metadata": { "generation": 2 },
                "spec": { "controllerName": "trellis.dev/gateway-controller" },
                "status": { "conditions": [
                    { "type": "Accepted", "status": status, "observedGeneration": observed, "reason": "Accepted", "message": "" }
                ] },
            })
        };
        assert!(matches!(
            class_state_of(&class("True", 2)),
            ClassState::Accepted
        ));
        assert!(matches!(
            class_state_of(&class("True", 1)),
            ClassState::NotAccepted(_)
        ));
        assert!(matches!(
            class_state_of(&class("False", 2)),
            ClassState::NotAccepted(_)
        ));
        let other = json!({ "metadata": { "generation": 1 }, "spec": { "controllerName": "example.com/x" } });
        assert!(matches!(
            class_state_of(&other),
            ClassState::OtherController(_)
        ));
    }
}
