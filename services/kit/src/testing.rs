//! Test helpers (feature `testing`): a throwaway PostgreSQL from Debian's
//! packages, throwaway SQLite files, serving a router on loopback, and a
//! check of an OpenAPI document against a list of routes.

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

/// Where Debian's PostgreSQL 15 server binaries are.
pub const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

/// A PostgreSQL server of its own in a temp dir, on 127.0.0.1 and a free
/// port, stopped and removed on drop. Started as the `postgres` OS user when
/// running as root (the server refuses root).
pub struct Postgres {
    dir: PathBuf,
    child: Child,
    port: u16,
    as_postgres: bool,
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn pg_command(as_postgres: bool, bin: &str) -> Command {
    let path = Path::new(PG_BIN).join(bin);
    if as_postgres {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(path);
        c
    } else {
        Command::new(path)
    }
}

impl Postgres {
    /// Starts one, or `None` (printing "skipped: PostgreSQL not installed")
    /// when the binaries are missing.
    pub fn start() -> Option<Self> {
        if !Path::new(PG_BIN).join("postgres").exists() {
            println!("skipped: PostgreSQL not installed ({PG_BIN}/postgres is missing)");
            return None;
        }
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
        let out = pg_command(as_postgres, "initdb")
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
        let child = pg_command(as_postgres, "postgres")
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
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = pg_command(false, "pg_isready")
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
        Some(pg)
    }

    /// The connection URL of its `postgres` database.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = pg_command(self.as_postgres, "pg_ctl")
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
    fn postgres_starts_and_answers() {
        let Some(pg) = Postgres::start() else { return };
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
