//! Test helpers (feature `testing`): a throwaway PostgreSQL, throwaway
//! SQLite files, serving a router on loopback, a check of an OpenAPI
//! document against a list of routes, and a fuzzer driven by that document
//! ([`fuzz`]).

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicUsize, Ordering},
    time::{Duration, Instant},
};

use axum::Router;
use tokio::net::TcpListener;

static N: AtomicUsize = AtomicUsize::new(0);

/// A fresh directory under the system temp dir.
pub fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "trellis-svc-{}-{}-{name}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The URL of a new, empty SQLite file.
pub fn sqlite_url() -> String {
    let dir = temp_dir("sqlite");
    format!("sqlite:{}?mode=rwc", dir.join("db.sqlite").display())
}

/// Serves `app` on an ephemeral loopback port (HTTP/1.1 and h2c).
pub async fn spawn(app: Router) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

/// The PostgreSQL programs [`Postgres`] runs.
const PG_PROGRAMS: &[&str] = &["postgres", "initdb", "pg_ctl", "pg_isready"];

/// Where PostgreSQL's server programs are, whatever the major version: the
/// first directory holding all of [`PG_PROGRAMS`] among `pg_config --bindir`,
/// Debian's `/usr/lib/postgresql/<version>/bin` (highest version first) and
/// the directory of `postgres` on `PATH`. The error names what is missing and
/// how to install it.
pub fn pg_bin_dir() -> Result<PathBuf, String> {
    let mut candidates = Vec::new();
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output()
        && out.status.success()
    {
        candidates.push(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()));
    }
    candidates.extend(pg_bin_candidates(
        Path::new("/usr/lib/postgresql"),
        std::env::var_os("PATH").as_deref(),
    ));
    pick_pg_bin(&candidates)
}

/// The `bin` directories under `debian_root` (`<root>/<version>/bin`), the
/// highest version first, then the directory `postgres` resolves to on `path`.
fn pg_bin_candidates(debian_root: &Path, path: Option<&std::ffi::OsStr>) -> Vec<PathBuf> {
    let mut versions: Vec<(Vec<u64>, PathBuf)> = std::fs::read_dir(debian_root)
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
    let mut out: Vec<PathBuf> = versions.into_iter().map(|(_, p)| p).collect();
    for dir in path.map(std::env::split_paths).into_iter().flatten() {
        // Through symlinks, so the other programs are looked for beside the real one.
        if let Some(real) = std::fs::canonicalize(dir.join("postgres"))
            .ok()
            .and_then(|p| p.parent().map(Path::to_path_buf))
        {
            out.push(real);
        }
    }
    out
}

/// The first of `candidates` holding every one of [`PG_PROGRAMS`].
fn pick_pg_bin(candidates: &[PathBuf]) -> Result<PathBuf, String> {
    candidates
        .iter()
        .find(|dir| PG_PROGRAMS.iter().all(|p| dir.join(p).is_file()))
        .cloned()
        .ok_or_else(|| {
            let looked: Vec<String> = candidates.iter().map(|d| d.display().to_string()).collect();
            format!(
                "PostgreSQL is not installed: no directory holds all of {} (looked in: {}; \
                 /usr/lib/postgresql/<version>/bin and PATH); install it with `bash .ci/install` \
                 or `apt-get install postgresql`",
                PG_PROGRAMS.join(", "),
                if looked.is_empty() {
                    "nothing found".to_owned()
                } else {
                    looked.join(", ")
                }
            )
        })
}

/// A PostgreSQL server of its own in a temp dir, on 127.0.0.1 and a free
/// port, stopped and removed on drop. Started as the `postgres` OS user when
/// running as root (the server refuses root).
pub struct Postgres {
    dir: PathBuf,
    child: Child,
    port: u16,
    as_postgres: bool,
    bin: PathBuf,
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn pg_command(bin_dir: &Path, as_postgres: bool, bin: &str) -> Command {
    let path = bin_dir.join(bin);
    if as_postgres {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(path);
        c
    } else {
        Command::new(path)
    }
}

impl Postgres {
    /// Starts one. Panics when PostgreSQL is not installed, naming what is
    /// missing and how to install it: a test that needs it must fail, not pass
    /// without running.
    pub fn start() -> Self {
        let bin = pg_bin_dir().unwrap_or_else(|e| panic!("{e}"));
        let as_postgres = is_root();
        let dir = temp_dir("pg");
        // The server's user must write here.
        let chmod = Command::new("chmod")
            .arg("0777")
            .arg(&dir)
            .status()
            .unwrap();
        assert!(chmod.success());
        let data = dir.join("data");
        let out = pg_command(&bin, as_postgres, "initdb")
            .args([
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
                "-E",
                "UTF8",
                "-D",
            ])
            .arg(&data)
            .stdin(Stdio::null())
            .output()
            .expect("initdb runs");
        assert!(
            out.status.success(),
            "initdb failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let log = std::fs::File::create(dir.join("postgres.log")).unwrap();
        let child = pg_command(&bin, as_postgres, "postgres")
            .arg("-D")
            .arg(&data)
            .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-k"])
            .arg(&dir)
            .args([
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
            ])
            .args(["-c", "max_connections=200"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("postgres starts");
        let pg = Self {
            dir,
            child,
            port,
            as_postgres,
            bin,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = pg_command(&pg.bin, false, "pg_isready")
                .args([
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &port.to_string(),
                    "-U",
                    "postgres",
                    "-q",
                ])
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if ready {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "PostgreSQL did not start within 30 s: {}",
                std::fs::read_to_string(pg.dir.join("postgres.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        pg
    }

    /// The connection URL of its `postgres` database.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = pg_command(&self.bin, self.as_postgres, "pg_ctl")
            .args(["stop", "-m", "immediate", "-D"])
            .arg(self.dir.join("data"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A JSON client of one service's REST API.
pub struct Api {
    pub base: String,
    pub http: reqwest::Client,
}

impl Api {
    pub fn new(addr: SocketAddr) -> Self {
        Self {
            base: format!("http://{addr}"),
            http: reqwest::Client::new(),
        }
    }
    /// Sends a request (with a JSON body when given) and returns the status
    /// and the body as JSON (a string when it is not JSON).
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&str>,
    ) -> (reqwest::StatusCode, serde_json::Value) {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(b) = body {
            req = req
                .header("content-type", "application/json")
                .body(b.to_owned());
        }
        let rsp = req.send().await.unwrap();
        let status = rsp.status();
        let text = rsp.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)),
        )
    }
    pub async fn get(&self, path: &str) -> (reqwest::StatusCode, serde_json::Value) {
        self.call(reqwest::Method::GET, path, None).await
    }
    pub async fn post(&self, path: &str, body: &str) -> (reqwest::StatusCode, serde_json::Value) {
        self.call(reqwest::Method::POST, path, Some(body)).await
    }
    pub async fn put(&self, path: &str, body: &str) -> (reqwest::StatusCode, serde_json::Value) {
        self.call(reqwest::Method::PUT, path, Some(body)).await
    }
    pub async fn delete(&self, path: &str) -> (reqwest::StatusCode, serde_json::Value) {
        self.call(reqwest::Method::DELETE, path, None).await
    }

    /// Fetches `/openapi.json`, checks it with [`check_openapi`] against
    /// `routes`, and checks that every documented operation is served (it
    /// answers neither 405 nor the fallback's `no_route`), with `1` for each
    /// path parameter. Returns the document.
    pub async fn check_openapi_routes(&self, routes: &[(&str, &str)]) -> serde_json::Value {
        let (s, doc) = self.get("/openapi.json").await;
        assert_eq!(s, reqwest::StatusCode::OK, "{doc}");
        check_openapi(&doc, routes);
        for (path, item) in doc["paths"].as_object().unwrap() {
            for method in item.as_object().unwrap().keys() {
                let m = reqwest::Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
                let concrete: String = path
                    .split('/')
                    .map(|seg| if seg.starts_with('{') { "1" } else { seg })
                    .collect::<Vec<_>>()
                    .join("/");
                let (s, b) = self.call(m, &concrete, Some("{}")).await;
                assert!(
                    s != reqwest::StatusCode::METHOD_NOT_ALLOWED && b["code"] != "no_route",
                    "documented {method} {path} is not served: {s} {b}"
                );
            }
        }
        let (s, b) = self.get("/no/such/route").await;
        assert_eq!(
            (s.as_u16(), &b["code"]),
            (404, &serde_json::json!("no_route"))
        );
        doc
    }
}

/// Asserts an error answer: the status, a `code`, and the field named.
#[track_caller]
pub fn assert_error(got: (reqwest::StatusCode, serde_json::Value), status: u16, field: &str) {
    assert_eq!(got.0.as_u16(), status, "{}", got.1);
    assert!(got.1["code"].is_string(), "no code: {}", got.1);
    assert!(got.1["message"].is_string(), "no message: {}", got.1);
    assert_eq!(got.1["field"], field, "{}", got.1);
}

/// Checks that `doc` is a valid OpenAPI 3 document (the required fields,
/// unique operation ids, every path parameter declared, every response
/// described, every `$ref` resolving) and that it documents each of
/// `routes` (`("GET", "/api/v1/users/{id}")`). Panics with every problem found.
pub fn check_openapi(doc: &serde_json::Value, routes: &[(&str, &str)]) {
    let mut problems = Vec::new();
    let version = doc["openapi"].as_str().unwrap_or_default();
    if !version.starts_with("3.") {
        problems.push(format!("openapi is {version:?}, not 3.x"));
    }
    for f in ["title", "version"] {
        if !doc["info"][f].is_string() {
            problems.push(format!("info.{f} is missing"));
        }
    }
    let Some(paths) = doc["paths"].as_object() else {
        panic!("no paths object in {doc}");
    };
    let mut ids = std::collections::BTreeSet::new();
    for (path, item) in paths {
        if !path.starts_with('/') {
            problems.push(format!("path {path:?} does not start with /"));
        }
        let templated: Vec<&str> = path
            .split('{')
            .skip(1)
            .filter_map(|s| s.split('}').next())
            .collect();
        for (method, op) in item.as_object().into_iter().flatten() {
            if ![
                "get", "put", "post", "delete", "patch", "head", "options", "trace",
            ]
            .contains(&method.as_str())
            {
                continue;
            }
            let here = format!("{} {path}", method.to_uppercase());
            match op["operationId"].as_str() {
                Some(id) if !ids.insert(id.to_owned()) => {
                    problems.push(format!("{here}: duplicate operationId {id}"))
                }
                None => problems.push(format!("{here}: no operationId")),
                _ => {}
            }
            let params: Vec<&serde_json::Value> = op["parameters"]
                .as_array()
                .into_iter()
                .flatten()
                .chain(item["parameters"].as_array().into_iter().flatten())
                .collect();
            for t in &templated {
                let declared = params
                    .iter()
                    .any(|p| p["in"] == "path" && p["name"] == *t && p["required"] == true);
                if !declared {
                    problems.push(format!(
                        "{here}: path parameter {t} is not declared as required"
                    ));
                }
            }
            for p in &params {
                if !p["name"].is_string() || !p["in"].is_string() {
                    problems.push(format!("{here}: a parameter without name or in: {p}"));
                }
            }
            match op["responses"].as_object() {
                Some(r) if !r.is_empty() => {
                    for (code, rsp) in r {
                        if code != "default" && code.parse::<u16>().is_err() {
                            problems.push(format!("{here}: response code {code:?}"));
                        }
                        if !rsp["description"].is_string() && !rsp["$ref"].is_string() {
                            problems.push(format!("{here}: response {code} has no description"));
                        }
                    }
                }
                _ => problems.push(format!("{here}: no responses")),
            }
        }
    }
    // Every $ref resolves within the document.
    let mut refs = Vec::new();
    collect_refs(doc, &mut refs);
    for r in refs {
        let Some(pointer) = r.strip_prefix('#') else {
            problems.push(format!("external $ref {r}"));
            continue;
        };
        if doc.pointer(pointer).is_none() {
            problems.push(format!("$ref {r} does not resolve"));
        }
    }
    for (method, path) in routes {
        if doc["paths"][*path][method.to_lowercase()].is_null() {
            problems.push(format!("route {method} {path} is not documented"));
        }
    }
    assert!(
        problems.is_empty(),
        "OpenAPI problems:\n{}",
        problems.join("\n")
    );
}

fn collect_refs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                if k == "$ref"
                    && let Some(s) = v.as_str()
                {
                    out.push(s.to_owned());
                }
                collect_refs(v, out);
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|v| collect_refs(v, out)),
        _ => {}
    }
}

/// A schema-driven fuzzer of a running service: it reads the service's
/// `/openapi.json`, generates requests whose every parameter and body is
/// valid by the document (a seeded generator over the JSON Schema subset
/// utoipa emits: integers and numbers with bounds, strings with lengths,
/// patterns, formats and enums, arrays with item counts, objects with
/// required fields, `$ref`, `oneOf`/`anyOf`, nullable types), with boundary
/// values often, sends them, and records each answer the document does not
/// allow for a valid request:
///
/// - a status the operation does not document;
/// - any 5xx (the callers set up no dependency failures);
/// - a 400 or 422 whose `code` the documented response's description does not
///   name in backticks (such as `` `invalid_user` ``): a valid request may be
///   refused only for a reason the document states beyond its schemas.
pub mod fuzz {
    use std::fmt::Write as _;

    use serde_json::{Map, Value, json};

    use super::Api;

    /// A small deterministic generator (SplitMix64), so a seed replays a run.
    pub struct Rng(u64);

    impl Rng {
        pub fn new(seed: u64) -> Self {
            Self(seed)
        }
        pub fn next_u64(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }
        /// Uniform in `0..n` (`n > 0`).
        pub fn below(&mut self, n: u64) -> u64 {
            self.next_u64() % n
        }
        /// Uniform in `lo..=hi`.
        pub fn range(&mut self, lo: i128, hi: i128) -> i128 {
            let span = (hi - lo) as u128 + 1;
            let r = ((u128::from(self.next_u64()) << 64) | u128::from(self.next_u64())) % span;
            lo + r as i128
        }
        pub fn chance(&mut self, one_in: u64) -> bool {
            self.below(one_in) == 0
        }
        pub fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
            &xs[self.below(xs.len() as u64) as usize]
        }
    }

    /// What a run sent and what it found.
    #[derive(Debug, Default)]
    pub struct Report {
        /// Requests sent.
        pub sent: usize,
        /// Requests per operation (`"POST /api/v1/users"`).
        pub per_operation: Vec<(String, usize)>,
        /// One line per kind of disallowed answer: the operation, the status
        /// and error code, how many times, and the first request that got it.
        pub failures: Vec<String>,
    }

    /// Characters strings are built from: ASCII, characters that are special
    /// in SQL `LIKE`, URLs and JSON, letters outside ASCII (one whose lower
    /// case is longer), an emoji, whitespace of several kinds, and control
    /// characters including NUL. A `pattern` filters out what it forbids.
    const CHARS: &[char] = &[
        'a', 'b', 'z', 'A', 'Q', '0', '7', '.', '-', '_', '%', '\\', '\'', '"', '/', '?', '#', '&',
        '+', '=', '@', ' ', 'é', 'ß', 'İ', 'Ω', '漢', '🦀', '\t', '\n', '\u{a0}', '\u{3000}',
        '\u{85}', '\u{feff}', '\u{0}', '\u{1}', '\u{7f}',
    ];

    /// A value valid by `schema` (resolving `$ref` in `doc`).
    pub fn generate(doc: &Value, schema: &Value, rng: &mut Rng, depth: usize) -> Value {
        let schema = resolve(doc, schema);
        for key in ["oneOf", "anyOf"] {
            if let Some(alts) = schema[key].as_array() {
                let alt = rng.pick(alts).clone();
                return generate(doc, &alt, rng, depth);
            }
        }
        if let Some(all) = schema["allOf"].as_array() {
            let mut merged = Map::new();
            for s in all {
                if let Value::Object(o) = generate(doc, s, rng, depth) {
                    merged.extend(o);
                }
            }
            return Value::Object(merged);
        }
        if let Some(values) = schema["enum"].as_array() {
            return rng.pick(values).clone();
        }
        let types: Vec<&str> = match &schema["type"] {
            Value::String(t) => vec![t.as_str()],
            Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
            _ if schema["properties"].is_object() => vec!["object"],
            _ => vec!["string"],
        };
        // `null` when allowed, one time in six.
        let ty = if types.contains(&"null") && (types.len() == 1 || rng.chance(6)) {
            "null"
        } else {
            *rng.pick(
                &types
                    .into_iter()
                    .filter(|t| *t != "null")
                    .collect::<Vec<_>>(),
            )
        };
        match ty {
            "null" => Value::Null,
            "boolean" => Value::Bool(rng.chance(2)),
            "integer" => json!(integer(schema, rng)),
            "number" => json!(integer(schema, rng) as f64),
            "string" => Value::String(string(schema, rng)),
            "array" => {
                let lo = schema["minItems"].as_u64().unwrap_or(0);
                let hi = schema["maxItems"].as_u64().unwrap_or(lo + 4);
                let n = match rng.below(4) {
                    0 => lo,
                    1 => hi,
                    _ => lo + rng.below(hi.min(lo + 4) - lo + 1),
                };
                let n = if depth > 4 { lo } else { n };
                Value::Array(
                    (0..n)
                        .map(|_| generate(doc, &schema["items"], rng, depth + 1))
                        .collect(),
                )
            }
            "object" => {
                let required: Vec<&str> = schema["required"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_str)
                    .collect();
                let mut out = Map::new();
                for (name, prop) in schema["properties"].as_object().into_iter().flatten() {
                    if required.contains(&name.as_str()) || rng.chance(2) {
                        out.insert(name.clone(), generate(doc, prop, rng, depth + 1));
                    }
                }
                Value::Object(out)
            }
            other => panic!("the fuzzer cannot generate type {other:?} ({schema})"),
        }
    }

    fn resolve<'a>(doc: &'a Value, mut schema: &'a Value) -> &'a Value {
        while let Some(r) = schema["$ref"].as_str() {
            schema = doc
                .pointer(r.trim_start_matches('#'))
                .unwrap_or_else(|| panic!("$ref {r} does not resolve"));
        }
        schema
    }

    /// An integer in the schema's bounds (its format's when it states none),
    /// a bound or a bound's neighbour half of the time.
    fn integer(schema: &Value, rng: &mut Rng) -> i128 {
        let (fmt_lo, fmt_hi) = match schema["format"].as_str() {
            Some("int32") => (i128::from(i32::MIN), i128::from(i32::MAX)),
            Some("uint32") => (0, i128::from(u32::MAX)),
            Some("uint64") => (0, i128::from(u64::MAX)),
            _ => (i128::from(i64::MIN), i128::from(i64::MAX)),
        };
        let bound = |key: &str| schema[key].as_f64().map(|v| v as i128);
        let lo = bound("minimum")
            .or(bound("exclusiveMinimum").map(|v| v + 1))
            .unwrap_or(fmt_lo)
            .max(fmt_lo);
        let hi = bound("maximum")
            .or(bound("exclusiveMaximum").map(|v| v - 1))
            .unwrap_or(fmt_hi)
            .min(fmt_hi);
        assert!(lo <= hi, "an integer schema without values: {schema}");
        match rng.below(8) {
            0 => lo,
            1 => hi,
            2 => (lo + 1).min(hi),
            3 => (hi - 1).max(lo),
            4 => 0.clamp(lo, hi),
            // Small values often, so ids name what the setup created.
            5 | 6 => rng.range(lo, hi.min(lo.saturating_add(10))),
            _ => rng.range(lo, hi),
        }
    }

    /// A string of an allowed length matching the schema's `pattern`
    /// (built for `format: email`, drawn and filtered otherwise).
    fn string(schema: &Value, rng: &mut Rng) -> String {
        let lo = schema["minLength"].as_u64().unwrap_or(0) as usize;
        let hi = schema["maxLength"].as_u64().map(|v| v as usize);
        let pattern = schema["pattern"].as_str().map(|p| {
            regex::Regex::new(p).unwrap_or_else(|e| panic!("pattern {p:?} does not compile: {e}"))
        });
        let fits = |s: &str| {
            let n = s.chars().count();
            n >= lo && hi.is_none_or(|hi| n <= hi) && pattern.as_ref().is_none_or(|p| p.is_match(s))
        };
        for _ in 0..1000 {
            let s = if schema["format"] == "email" {
                email(rng, hi.unwrap_or(254))
            } else {
                let top = hi.unwrap_or(lo + 40);
                let n = match rng.below(5) {
                    0 => lo,
                    1 => top,
                    _ => lo + rng.below((top.min(lo + 40) - lo) as u64 + 1) as usize,
                };
                (0..n).map(|_| *rng.pick(CHARS)).collect()
            };
            if fits(&s) {
                return s;
            }
        }
        panic!("the fuzzer found no string for {schema} in 1000 draws");
    }

    /// `local@label.label`, up to `max` characters, with characters beyond
    /// the usual ones in the local part and labels.
    fn email(rng: &mut Rng, max: usize) -> String {
        let part = |rng: &mut Rng, n: usize| -> String {
            (0..n.max(1))
                .map(|_| *rng.pick(&['a', 'x', 'Z', '0', '-', '_', '+', '%', 'é', 'İ']))
                .collect()
        };
        let long = rng.chance(5);
        let local_len = if long {
            max.saturating_sub(12).max(1)
        } else {
            1 + rng.below(12) as usize
        };
        let local = part(rng, local_len);
        let labels = 2 + rng.below(2) as usize;
        let domain: Vec<String> = (0..labels)
            .map(|_| {
                let n = 1 + rng.below(6) as usize;
                part(rng, n)
            })
            .collect();
        format!("{local}@{}", domain.join("."))
    }

    /// One operation of the document.
    struct Operation {
        method: reqwest::Method,
        path: String,
        op: Value,
    }

    fn operations(doc: &Value) -> Vec<Operation> {
        let mut out = Vec::new();
        for (path, item) in doc["paths"].as_object().into_iter().flatten() {
            for (method, op) in item.as_object().into_iter().flatten() {
                if let Ok(m) = reqwest::Method::from_bytes(method.to_uppercase().as_bytes())
                    && op.is_object()
                {
                    out.push(Operation {
                        method: m,
                        path: path.clone(),
                        op: op.clone(),
                    });
                }
            }
        }
        out
    }

    /// A parameter's value as text: JSON strings as they are, others as JSON.
    fn text(v: &Value) -> String {
        match v {
            Value::String(s) => s.clone(),
            v => v.to_string(),
        }
    }

    /// `s` percent-encoded for a path segment (all but RFC 3986's unreserved characters).
    fn path_segment(s: &str) -> String {
        s.bytes()
            .map(|b| {
                if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                    (b as char).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect()
    }

    /// Sends `per_operation` valid requests to each documented operation of
    /// the service behind `api`, from `seed`, and reports what it found.
    pub async fn run(api: &Api, seed: u64, per_operation: usize) -> Report {
        let (s, doc) = api.get("/openapi.json").await;
        assert_eq!(s.as_u16(), 200, "GET /openapi.json: {doc}");
        let mut rng = Rng::new(seed);
        let mut report = Report::default();
        // (operation, status, code) → (count, first request).
        let mut found: Vec<((String, u16, String), usize, String)> = Vec::new();
        for Operation { method, path, op } in operations(&doc) {
            let name = format!("{method} {path}");
            for _ in 0..per_operation {
                let mut url = String::new();
                let mut query = form_urlencoded::Serializer::new(String::new());
                let mut concrete = path.clone();
                for p in op["parameters"].as_array().into_iter().flatten() {
                    let p = resolve(&doc, p);
                    let pname = p["name"].as_str().unwrap_or_default();
                    if p["required"] != true && rng.chance(3) {
                        continue;
                    }
                    let v = generate(&doc, &p["schema"], &mut rng, 0);
                    match p["in"].as_str() {
                        Some("path") => {
                            let seg = path_segment(&text(&v));
                            concrete = concrete.replace(&format!("{{{pname}}}"), &seg);
                        }
                        Some("query") if !v.is_null() => {
                            query.append_pair(pname, &text(&v));
                        }
                        _ => {}
                    }
                }
                let q = query.finish();
                let _ = write!(url, "{concrete}");
                if !q.is_empty() {
                    let _ = write!(url, "?{q}");
                }
                let body_schema = &op["requestBody"]["content"]["application/json"]["schema"];
                let body = (!body_schema.is_null())
                    .then(|| generate(&doc, body_schema, &mut rng, 0).to_string());
                let mut req = api
                    .http
                    .request(method.clone(), format!("{}{url}", api.base));
                if let Some(b) = &body {
                    req = req
                        .header("content-type", "application/json")
                        .body(b.clone());
                }
                report.sent += 1;
                let rsp = match req.send().await {
                    Ok(rsp) => rsp,
                    Err(e) => {
                        // A dropped connection: the handler panicked.
                        let key = (name.clone(), 0, "no answer".to_owned());
                        match found.iter_mut().find(|(k, _, _)| *k == key) {
                            Some((_, n, _)) => *n += 1,
                            None => found.push((
                                key,
                                1,
                                format!(
                                    "{method} {url}{}: {e}",
                                    body.as_deref().map(|b| format!(" {b}")).unwrap_or_default()
                                ),
                            )),
                        }
                        continue;
                    }
                };
                let status = rsp.status();
                let raw = rsp.text().await.unwrap_or_default();
                let answer: Value = serde_json::from_str(&raw).unwrap_or(Value::String(raw));
                let code = status.as_u16();
                let documented = &op["responses"][code.to_string()];
                let err_code = answer["code"].as_str().unwrap_or_default().to_owned();
                let why = if documented.is_null() && op["responses"]["default"].is_null() {
                    Some("undocumented status")
                } else if status.is_server_error() {
                    Some("server error")
                } else if (code == 400 || code == 422)
                    && !documented["description"]
                        .as_str()
                        .unwrap_or_default()
                        .contains(&format!("`{err_code}`"))
                {
                    Some("a valid request refused for a reason the document does not give")
                } else {
                    None
                };
                if let Some(why) = why {
                    let key = (name.clone(), code, err_code);
                    let example = format!(
                        "{why}: {method} {url}{} → {code} {answer}",
                        body.as_deref().map(|b| format!(" {b}")).unwrap_or_default()
                    );
                    match found.iter_mut().find(|(k, _, _)| *k == key) {
                        Some((_, n, _)) => *n += 1,
                        None => found.push((key, 1, example)),
                    }
                }
            }
            report.per_operation.push((name, per_operation));
        }
        report.failures = found
            .into_iter()
            .map(|((op, status, code), n, example)| {
                format!("{op} → {status} {code} ({n}x), first: {example}")
            })
            .collect();
        report
    }

    /// Runs [`run`] and panics, listing every failure, when there is one.
    pub async fn assert_clean(api: &Api, seed: u64, per_operation: usize) -> Report {
        let report = run(api, seed, per_operation).await;
        assert!(
            report.failures.is_empty(),
            "the fuzzer (seed {seed}) sent {} valid requests; the service answered {} kinds of them as the document does not allow:\n{}",
            report.sent,
            report.failures.len(),
            report.failures.join("\n")
        );
        report
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openapi_check_finds_problems() {
        let doc = serde_json::json!({
            "openapi": "3.1.0",
            "info": {"title": "t", "version": "1"},
            "paths": {"/a/{id}": {"get": {"operationId": "a", "responses": {"200": {"description": "ok",
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Nope"}}}}}}}}
        });
        let r =
            std::panic::catch_unwind(|| check_openapi(&doc, &[("GET", "/a/{id}"), ("POST", "/b")]));
        let msg = *r.unwrap_err().downcast::<String>().unwrap();
        assert!(msg.contains("path parameter id"), "{msg}");
        assert!(msg.contains("Nope does not resolve"), "{msg}");
        assert!(msg.contains("POST /b is not documented"), "{msg}");
    }

    #[test]
    fn the_fuzzer_generates_only_valid_values_and_reaches_the_bounds() {
        let doc = serde_json::json!({"components": {"schemas": {"Item": {
        "type": "object", "required": ["n", "name"], "additionalProperties": false,
        "properties": {
            "n": {"type": "integer", "format": "int64", "minimum": 1, "maximum": 1000},
            "name": {"type": "string", "minLength": 1, "maxLength": 5, "pattern": crate::text::NAME},
            "email": {"type": ["string", "null"], "format": "email", "maxLength": 30, "pattern": crate::text::EMAIL},
            "kind": {"type": "string", "enum": ["a", "b"]},
            "tags": {"type": "array", "minItems": 1, "maxItems": 3, "items": {"type": "boolean"}}
        }}}}});
        let schema = serde_json::json!({"$ref": "#/components/schemas/Item"});
        let mut rng = fuzz::Rng::new(7);
        let (mut lo, mut hi, mut nulls) = (false, false, 0);
        for _ in 0..500 {
            let v = fuzz::generate(&doc, &schema, &mut rng, 0);
            let n = v["n"].as_i64().unwrap();
            assert!((1..=1000).contains(&n), "{v}");
            (lo, hi) = (lo || n == 1, hi || n == 1000);
            let name = v["name"].as_str().unwrap();
            assert!((1..=5).contains(&name.chars().count()), "{v}");
            assert!(crate::text::matches(crate::text::NAME, name), "{v}");
            match &v["email"] {
                serde_json::Value::Null => nulls += 1,
                e => {
                    let e = e.as_str().unwrap();
                    assert!(
                        e.chars().count() <= 30 && crate::text::matches(crate::text::EMAIL, e),
                        "{v}"
                    );
                }
            }
            assert!(
                v["kind"].is_null() || v["kind"] == "a" || v["kind"] == "b",
                "{v}"
            );
            if let Some(tags) = v["tags"].as_array() {
                assert!((1..=3).contains(&tags.len()), "{v}");
            }
            let keys: Vec<&String> = v.as_object().unwrap().keys().collect();
            assert!(
                keys.iter()
                    .all(|k| ["n", "name", "email", "kind", "tags"].contains(&k.as_str()))
            );
        }
        assert!(
            lo && hi && nulls > 0,
            "bounds and null reached: {lo} {hi} {nulls}"
        );
        let again: Vec<_> = (0..3)
            .map(|_| fuzz::generate(&doc, &schema, &mut fuzz::Rng::new(7), 0))
            .collect();
        assert!(again.iter().all(|v| *v == again[0]), "a seed replays");
    }

    #[test]
    fn postgres_is_found_at_any_version_and_its_absence_is_an_error() {
        let root = temp_dir("pg-versions");
        for (version, programs) in [
            ("9.6", PG_PROGRAMS),
            ("15", PG_PROGRAMS),
            ("17", &["postgres"][..]),
        ] {
            let bin = root.join(version).join("bin");
            std::fs::create_dir_all(&bin).unwrap();
            for p in programs {
                std::fs::write(bin.join(p), "").unwrap();
            }
        }
        std::fs::create_dir_all(root.join("common")).unwrap();
        let candidates = pg_bin_candidates(&root, None);
        assert_eq!(
            candidates,
            ["17", "15", "9.6"].map(|v| root.join(v).join("bin")),
            "the highest version first"
        );
        assert_eq!(
            pick_pg_bin(&candidates).unwrap(),
            root.join("15").join("bin"),
            "17 lacks initdb"
        );
        // On PATH, through a symlink.
        let path_dir = temp_dir("pg-path");
        std::os::unix::fs::symlink(root.join("9.6/bin/postgres"), path_dir.join("postgres"))
            .unwrap();
        let on_path = pg_bin_candidates(&temp_dir("pg-none"), Some(path_dir.as_os_str()));
        assert_eq!(
            on_path,
            [std::fs::canonicalize(root.join("9.6/bin")).unwrap()]
        );

        let e = pick_pg_bin(&pg_bin_candidates(&temp_dir("pg-none"), None)).unwrap_err();
        assert!(
            e.starts_with(
                "PostgreSQL is not installed: no directory holds all of postgres, initdb"
            ) && e.contains("`bash .ci/install`")
                && e.contains("apt-get install postgresql"),
            "{e}"
        );
    }

    #[test]
    fn postgres_starts_and_answers() {
        let pg = Postgres::start();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            sqlx::any::install_default_drivers();
            let pool = sqlx::AnyPool::connect(&pg.url()).await.unwrap();
            crate::db::ping(&pool).await.unwrap();
            pool.close().await;
        });
    }
}
