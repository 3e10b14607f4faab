//! `cargo xtask bench gateway`: the Trellis gateway against HAProxy and
//! nginx doing the same routing at the edge, and no proxy at all.
//!
//! ```text
//! generator → edge proxy ─┬─ /api/v1/users/…    → upstream users
//!                         ├─ /api/v1/products/… → upstream products
//!                         └─ /api/v1/orders/…   → upstream orders
//! ```
//!
//! Every edge serves one virtual host, `shop.example` (any other host gets
//! 404, as does a path none of the three prefixes takes), routes each path
//! prefix to its own upstream with keep-alive, and adds `x-edge: trellis`
//! to each request it forwards. The Trellis gateway's configuration is the
//! one the operator writes for a Gateway and an HTTPRoute saying so (its
//! own model, in this process), with the policy the operator gives every
//! gateway; HAProxy and nginx get the equivalent by hand.
//!
//! Each upstream answers 200 with its name only when the path is under its
//! prefix and `x-edge` came with it, else 421 (a generator error). Before
//! any load, a check asks every edge for each path, an unknown host and
//! unknown paths, and the bench fails if any answer is not the expected
//! one. The figures are those of the sidecar bench (see [`super::sidecar`]):
//! latency at fixed rates (open loop), what that adds to `direct`, the
//! closed-loop maximum (wrk), the edge's CPU per 10,000 requests, its RSS
//! idle and at peak. `trellis-jwt` and `haproxy-jwt` also check an RS256
//! bearer token on every request (nginx open source has no JWT check).
//! Writes `target/bench/gateway.json` and `gateway.md`.

use std::{
    fmt::Write as _,
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    sync::Arc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use trellis_operator::gateway::{
    CONTROLLER_NAME,
    api::{Gateway, GatewayClass, HTTPRoute},
    deploy::gateway_policy,
    model::{Deployed, ServiceInfo, World},
};
use trellis_policy::gateway::{GatewayConfig, JwtRule};

use super::{
    Procs, commit, ensure_packages, free_addr, h1, loadavg,
    loadgen::{self, Target},
    machine, measure, ms, now_utc, process_tree,
    proxies::{
        Sidecar, haproxy_preamble, sidecar_command, spawn_haproxy, spawn_nginx, start_with_retries,
    },
    release_binary, report, results_dir, rss_kib,
    upstream::{Expect, Named, Upstreams},
    version_of,
};

/// Settings of one benchmark run.
#[derive(Clone, Debug, clap::Args)]
pub struct GatewayBench {
    /// Seconds of load at each fixed rate and for the closed loop.
    #[arg(long, default_value = "10", value_name = "SECONDS")]
    pub duration: u64,
    /// The fixed rates, requests per second, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "500,2000,8000")]
    pub rates: Vec<u64>,
    /// HTTP/1.1 connections of the open-loop generator (and of wrk).
    #[arg(long, default_value = "32")]
    pub connections: usize,
    /// Only these setups (direct, haproxy, nginx, trellis, haproxy-jwt,
    /// trellis-jwt); all when none are named.
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
    /// Use the already built release trellis-sidecar.
    #[arg(long)]
    pub no_build: bool,
    /// This trellis-sidecar binary instead of building the release one.
    #[arg(long, value_name = "PATH")]
    pub sidecar_binary: Option<PathBuf>,
    /// Only the fixed rates: no idle RSS and no closed loop.
    #[arg(long)]
    pub fixed_only: bool,
    /// Start each edge, check its routing and stop: no load.
    #[arg(long)]
    pub check_only: bool,
}

/// The virtual host every edge serves.
pub const HOST: &str = "shop.example";
/// The namespace of the Gateway, its route and the backend Services.
const NAMESPACE: &str = "shop";
/// The backend Services' port (the upstreams listen elsewhere: static
/// endpoints map each Service to its upstream's address).
const SERVICE_PORT: u16 = 8080;
/// The header each edge adds to the requests it forwards.
pub const EDGE_HEADER: (&str, &str) = ("x-edge", "trellis");
/// Each route: the upstream (and Service) name, its path prefix, and the
/// path the generator asks for under it.
pub const ROUTES: [(&str, &str, &str); 3] = [
    ("users", "/api/v1/users", "/api/v1/users/42"),
    ("products", "/api/v1/products", "/api/v1/products/7"),
    ("orders", "/api/v1/orders", "/api/v1/orders/3"),
];
/// The issuer and audience of the JWT setups' tokens.
const ISSUER: &str = "https://issuer.shop.example";
const AUDIENCE: &str = "shop";
/// The key id of the JWT setups' signing key.
const KID: &str = "bench";

/// Who serves the edge.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// No proxy: the generator talks to one upstream that checks nothing.
    Direct,
    Haproxy,
    Nginx,
    Trellis,
    /// HAProxy checking an RS256 bearer token (`jwt_verify`) on every request.
    HaproxyJwt,
    /// The Trellis gateway checking an RS256 bearer token on every request.
    TrellisJwt,
}

impl Kind {
    pub const ALL: [Kind; 6] = [
        Kind::Direct,
        Kind::Haproxy,
        Kind::Nginx,
        Kind::Trellis,
        Kind::HaproxyJwt,
        Kind::TrellisJwt,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Direct => "direct",
            Kind::Haproxy => "haproxy",
            Kind::Nginx => "nginx",
            Kind::Trellis => "trellis",
            Kind::HaproxyJwt => "haproxy-jwt",
            Kind::TrellisJwt => "trellis-jwt",
        }
    }

    fn is_trellis(self) -> bool {
        matches!(self, Kind::Trellis | Kind::TrellisJwt)
    }

    fn is_jwt(self) -> bool {
        matches!(self, Kind::HaproxyJwt | Kind::TrellisJwt)
    }
}

/// One route's upstream, for the configurations.
pub struct Route<'a> {
    pub name: &'a str,
    pub prefix: &'a str,
    pub addr: SocketAddr,
}

/// The JWT setups' key material and tokens.
struct Jwt {
    /// The issuer's public key, PEM (HAProxy's `jwt_verify` key file).
    public_pem: PathBuf,
    /// The JSON Web Key Set of that key (the Trellis rule's `jwks`).
    jwks: String,
    /// A valid token, sent with every request.
    token: String,
    /// A token signed by another key: must be refused.
    forged: String,
}

impl Jwt {
    /// Tokens from the sidecar's JWT test keys (RSA 2048, RS256), valid for
    /// two hours; the public key written into `dir`.
    fn new(dir: &Path) -> Result<Self> {
        use jsonwebtoken::{Algorithm, EncodingKey, Header, jwk::Jwk};
        let fixtures = xtask::paths::workspace().join("sidecar/tests/fixtures/jwt");
        let private = fixtures.join("rsa-a.pem");
        let key = EncodingKey::from_rsa_pem(&fs::read(&private)?)?;
        let other = EncodingKey::from_rsa_pem(&fs::read(fixtures.join("rsa-b.pem"))?)?;
        let public_pem = dir.join("jwt-public.pem");
        xtask::run::output(
            Command::new("openssl")
                .args(["pkey", "-pubout", "-in"])
                .arg(&private)
                .arg("-out")
                .arg(&public_pem),
        )
        .context("writing the JWT public key with openssl")?;
        let mut jwk = Jwk::from_encoding_key(&key, Algorithm::RS256)?;
        jwk.common.key_id = Some(KID.into());
        let now = jsonwebtoken::get_current_timestamp();
        let claims = json!({
            "iss": ISSUER,
            "aud": AUDIENCE,
            "sub": "alice",
            "iat": now,
            "exp": now + 7200,
        });
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some(KID.into());
        Ok(Self {
            public_pem,
            jwks: json!({"keys": [jwk]}).to_string(),
            token: jsonwebtoken::encode(&header, &claims, &key)?,
            forged: jsonwebtoken::encode(&header, &claims, &other)?,
        })
    }
}

pub fn gateway(opts: &GatewayBench) -> Result<()> {
    if opts.duration == 0 || opts.connections == 0 || opts.rates.contains(&0) {
        bail!("--duration, --connections and every --rates value must be positive");
    }
    let kinds: Vec<Kind> = Kind::ALL
        .into_iter()
        .filter(|k| opts.only.is_empty() || opts.only.iter().any(|o| o == k.name()))
        .collect();
    if kinds.is_empty() {
        bail!(
            "--only names none of {}: {:?}",
            Kind::ALL.map(Kind::name).join(", "),
            opts.only
        );
    }
    ensure_packages(&[
        ("wrk", "wrk"),
        ("haproxy", "haproxy"),
        ("nginx", "nginx"),
        ("openssl", "openssl"),
    ])?;
    let sidecar = if let Some(path) = &opts.sidecar_binary {
        path.canonicalize()
            .map_err(|e| anyhow::anyhow!("--sidecar-binary {}: {e}", path.display()))?
    } else if kinds.iter().any(|k| k.is_trellis()) {
        release_binary("trellis-sidecar", "trellis-sidecar", opts.no_build)?
    } else {
        PathBuf::from("trellis-sidecar")
    };
    let dir = results_dir()?;
    let logs = dir.join("gateway-logs");
    fs::create_dir_all(&logs)?;
    let jwt = if kinds.iter().any(|k| k.is_jwt()) {
        Some(Jwt::new(&logs)?)
    } else {
        None
    };
    let up = Upstreams::start()?;
    let named = ROUTES
        .iter()
        .map(|(name, prefix, _)| {
            up.named(
                name,
                Expect {
                    prefix: Some((*prefix).into()),
                    header: Some((EDGE_HEADER.0.into(), EDGE_HEADER.1.into())),
                },
            )
        })
        .collect::<Result<Vec<Named>>>()?;
    // `direct`: the same server, checking nothing (the generator's paths
    // are the three routes', all to this one).
    let direct = up.named("direct", Expect::default())?;
    let setup = Setup {
        dir: &logs,
        sidecar: &sidecar,
        otlp: up.otlp,
        routes: named
            .iter()
            .zip(ROUTES)
            .map(|(n, (name, prefix, _))| Route {
                name,
                prefix,
                addr: n.addr,
            })
            .collect(),
        direct: direct.addr,
        jwt: jwt.as_ref(),
    };
    let duration = Duration::from_secs(opts.duration);
    let load_before = loadavg();

    let mut results = Vec::new();
    for &kind in &kinds {
        eprintln!("== {}", kind.name());
        let counts_before: Vec<(u64, u64)> = named.iter().map(Named::counts).collect();
        let target = target(kind, jwt.as_ref());
        // A fresh edge for every phase, as in the sidecar bench.
        if opts.check_only {
            drop(start(kind, &setup)?);
            eprintln!("   routes as expected");
            continue;
        }
        let idle: Vec<u64> = if opts.fixed_only {
            Vec::new()
        } else {
            let edge = start(kind, &setup)?;
            thread::sleep(Duration::from_secs(2));
            edge.instances().iter().map(|p| rss_kib(p)).collect()
        };
        let mut rates = Vec::new();
        for &rate in &opts.rates {
            let edge = start(kind, &setup)?;
            let m = measure(edge.instances(), || {
                loadgen::h1_open_loop(edge.front, &target, rate, duration, opts.connections)
            })?;
            eprintln!(
                "   {rate:>6} req/s: p50 {} p99 {} p99.9 {} ms, {} errors",
                ms(m.run.ms(0.5)),
                ms(m.run.ms(0.99)),
                ms(m.run.ms(0.999)),
                m.run.errors,
            );
            rates.push(m.rate_row(rate));
        }
        let max = if opts.fixed_only {
            Value::Null
        } else {
            let edge = start(kind, &setup)?;
            let m = measure(edge.instances(), || {
                loadgen::wrk(edge.front, &target, duration, opts.connections, &logs)
            })?;
            eprintln!(
                "   closed loop: {:.0} req/s, p50 {} ms, {} errors",
                m.run.rate(),
                ms(m.run.ms(0.5)),
                m.run.errors,
            );
            m.max_row()
        };
        // What each upstream served and refused over the whole setup: the
        // spread over the three routes, and any misrouting.
        let upstreams: serde_json::Map<String, Value> = named
            .iter()
            .zip(&counts_before)
            .map(|(n, (s0, m0))| {
                let (s, m) = n.counts();
                (
                    n.name.clone(),
                    json!({"served": s - s0, "misdirected": m - m0}),
                )
            })
            .collect();
        results.push(json!({
            "protocol": "HTTP/1.1",
            "setup": kind.name(),
            "rss_idle_kib": idle,
            "rates": rates,
            "max": max,
            "upstreams": upstreams,
        }));
    }
    if opts.check_only {
        return Ok(());
    }

    let report = json!({
        "date": now_utc(),
        "commit": commit(),
        "machine": machine(),
        "loadavg_before": load_before,
        "loadavg_after": loadavg(),
        "versions": {
            "haproxy": version_of("haproxy", &["-v"]),
            "nginx": version_of("nginx", &["-v"]),
            "wrk": version_of("wrk", &["-v"]),
            "rustc": version_of("rustc", &["-V"]),
            "trellis-sidecar": version_of(&sidecar.to_string_lossy(), &["--version"]),
        },
        "settings": {
            "duration_s": opts.duration,
            "rates": opts.rates,
            "http1_connections": opts.connections,
            "host": HOST,
            "paths": ROUTES.map(|(_, _, p)| p),
        },
        "otlp_exports_received": up.exports(),
        "results": results,
    });
    let md = markdown(&report);
    report::write(&dir, "gateway", &report, &md, "")
}

/// What the generator sends to `kind`: GETs for `shop.example` spread over
/// the three routes' paths, with a bearer token for the JWT setups.
fn target(kind: Kind, jwt: Option<&Jwt>) -> Target {
    let mut headers = Vec::new();
    if let (true, Some(jwt)) = (kind.is_jwt(), jwt) {
        headers.push(("authorization".into(), format!("Bearer {}", jwt.token)));
    }
    Target {
        host: HOST.into(),
        paths: ROUTES.iter().map(|(_, _, p)| (*p).to_owned()).collect(),
        headers,
    }
}

/// What starting an edge needs.
struct Setup<'a> {
    dir: &'a Path,
    sidecar: &'a Path,
    otlp: SocketAddr,
    routes: Vec<Route<'a>>,
    /// The upstream of `direct`.
    direct: SocketAddr,
    jwt: Option<&'a Jwt>,
}

/// A running edge (or nothing, for `direct`).
struct Edge {
    front: SocketAddr,
    /// The root pid of the proxy (nginx's master).
    root: Option<u32>,
    _procs: Procs,
}

impl Edge {
    /// The pids of the proxy, workers included, as one instance.
    fn instances(&self) -> Vec<Vec<u32>> {
        self.root.map(process_tree).into_iter().collect()
    }
}

/// Starts an edge and checks its routing, up to three times when it does
/// not come up (a port [`free_addr`] handed out may be taken before the
/// proxy binds it); a routing check that fails fails at once.
fn start(kind: Kind, s: &Setup) -> Result<Edge> {
    let edge = start_with_retries(kind.name(), || {
        let e = start_once(kind, s)?;
        wait_serving(kind, s, e.front)?;
        Ok(e)
    })?;
    if kind != Kind::Direct {
        check_routes(kind, s, edge.front)
            .with_context(|| format!("{} does not route as the others", kind.name()))?;
    }
    Ok(edge)
}

fn start_once(kind: Kind, s: &Setup) -> Result<Edge> {
    let mut procs = Procs::default();
    let name = format!("edge-{}", kind.name());
    let (front, root) = match kind {
        Kind::Direct => (s.direct, None),
        Kind::Haproxy | Kind::HaproxyJwt => {
            let listen = free_addr()?;
            let jwt_key = if kind.is_jwt() {
                Some(
                    s.jwt
                        .context("haproxy-jwt needs the JWT keys")?
                        .public_pem
                        .as_path(),
                )
            } else {
                None
            };
            let config = haproxy_config(listen, &s.routes, jwt_key);
            let pid = spawn_haproxy(&mut procs, s.dir, &name, &config, None)?;
            (listen, Some(pid))
        }
        Kind::Nginx => {
            let listen = free_addr()?;
            let pid = spawn_nginx(&mut procs, s.dir, &name, &nginx_http(listen, &s.routes))?;
            (listen, Some(pid))
        }
        Kind::Trellis | Kind::TrellisJwt => {
            let listen = free_addr()?;
            let jwt = match kind {
                Kind::TrellisJwt => Some(s.jwt.context("trellis-jwt needs the JWT keys")?),
                _ => None,
            };
            let config = trellis_config(listen.port(), jwt.map(|j| j.jwks.as_str()))?;
            let path = s.dir.join(format!("{name}.gateway.json"));
            fs::write(&path, config)?;
            let addrs = [free_addr()?, free_addr()?, free_addr()?];
            let mut cmd = sidecar_command(s.sidecar, "", &name, s.otlp, addrs, &[]);
            // As the operator's Deployment runs it: the gateway's namespace
            // and ServiceAccount; its ports bind on the inbound address.
            cmd.env("POD_NAMESPACE", NAMESPACE)
                .env("POD_NAME", &name)
                .env("TRELLIS_SERVICE_ACCOUNT", "edge-trellis-gateway")
                .arg("--gateway-file")
                .arg(&path);
            for r in &s.routes {
                cmd.args([
                    "--static-endpoints",
                    &format!("{}.{NAMESPACE}={}", r.name, r.addr),
                ]);
            }
            let log = s.dir.join(format!("{name}.log"));
            let pid = procs.spawn(&name, &mut cmd, &log)?;
            let sc = Sidecar {
                name: name.clone(),
                pid,
                inbound: addrs[0],
                outbound: addrs[1],
                admin: addrs[2],
                log,
                callgrind: None,
            };
            sc.wait_ready(&mut procs)?;
            (listen, Some(pid))
        }
    };
    Ok(Edge {
        front,
        root,
        _procs: procs,
    })
}

/// Retries the first route through the edge until it answers 200 (20 s at
/// most): the proxy is up and has its configuration.
fn wait_serving(kind: Kind, s: &Setup, front: SocketAddr) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let headers = auth(kind, s.jwt.map(|j| j.token.as_str()));
    loop {
        let attempt = h1::get(front, HOST, ROUTES[0].2, &headers).and_then(|(status, body)| {
            if status == 200 {
                Ok(())
            } else {
                bail!("status {status}: {body}")
            }
        });
        match attempt {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() > deadline => {
                return Err(e.context(format!("{} does not forward requests", kind.name())));
            }
            Err(_) => thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// An `authorization` header with `token` for the JWT setups.
fn auth(kind: Kind, token: Option<&str>) -> Vec<(String, String)> {
    match (kind.is_jwt(), token) {
        (true, Some(t)) => vec![("authorization".into(), format!("Bearer {t}"))],
        _ => Vec::new(),
    }
}

/// Asks the edge what every setup must answer alike, and fails naming each
/// answer that differs: each route's path (and its bare prefix) reaches
/// that route's upstream with `x-edge` (the upstream says so: 200 and its
/// name); an unknown host, an unknown path and a prefix that is not a
/// whole segment get 404; for the JWT setups, no token or a forged one
/// gets 401.
fn check_routes(kind: Kind, s: &Setup, front: SocketAddr) -> Result<()> {
    let headers = auth(kind, s.jwt.map(|j| j.token.as_str()));
    let mut wrong = Vec::new();
    let mut expect =
        |host: &str, path: &str, h: &[(String, String)], status: u16, body: &str| match h1::get(
            front, host, path, h,
        ) {
            Ok((got, text)) if got == status && (body.is_empty() || text.trim() == body) => {}
            Ok((got, text)) => wrong.push(format!(
                "{host}{path}: {got} {:?}, expected {status} {body:?}",
                text.trim()
            )),
            Err(e) => wrong.push(format!("{host}{path}: {e:#}")),
        };
    for (name, prefix, path) in ROUTES {
        expect(HOST, path, &headers, 200, name);
        expect(HOST, prefix, &headers, 200, name);
        expect(&HOST.to_uppercase(), path, &headers, 200, name);
    }
    expect("elsewhere.example", ROUTES[0].2, &headers, 404, "");
    expect(HOST, "/api/v2/users/42", &headers, 404, "");
    expect(HOST, &format!("{}x/1", ROUTES[0].1), &headers, 404, "");
    if let (true, Some(jwt)) = (kind.is_jwt(), s.jwt) {
        expect(HOST, ROUTES[0].2, &[], 401, "");
        let forged = auth(kind, Some(&jwt.forged));
        expect(HOST, ROUTES[0].2, &forged, 401, "");
    }
    if wrong.is_empty() {
        Ok(())
    } else {
        bail!("{}", wrong.join("; "))
    }
}

/// The Trellis gateway's configuration for a listener on `port`: what the
/// operator's model makes of Gateway `shop/edge` (class `trellis`, one HTTP
/// listener) and HTTPRoute `shop/shop` (host `shop.example`, a rule per
/// route: a path prefix, `RequestHeaderModifier` adding `x-edge: trellis`,
/// the route's Service), with the policy the operator gives a gateway. With
/// `jwks`, every rule also requires a bearer token signed by its key (the
/// data plane's JWT rule: the operator has no API for it yet).
pub fn trellis_config(port: u16, jwks: Option<&str>) -> Result<String> {
    fn obj<K: serde::de::DeserializeOwned>(kind: &str, name: &str, spec: Value) -> Result<K> {
        let mut meta = json!({"name": name, "generation": 1, "uid": format!("bench-{name}")});
        if kind != "GatewayClass" {
            meta["namespace"] = json!(NAMESPACE);
        }
        serde_json::from_value(json!({
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": kind,
            "metadata": meta,
            "spec": spec,
        }))
        .with_context(|| format!("a {kind}"))
    }
    let class: GatewayClass = obj(
        "GatewayClass",
        "trellis",
        json!({"controllerName": CONTROLLER_NAME}),
    )?;
    let gateway: Gateway = obj(
        "Gateway",
        "edge",
        json!({"gatewayClassName": "trellis", "listeners": [
            {"name": "http", "port": port, "protocol": "HTTP"},
        ]}),
    )?;
    let rules: Vec<Value> = ROUTES
        .iter()
        .map(|(name, prefix, _)| {
            json!({
                "matches": [{"path": {"type": "PathPrefix", "value": prefix}}],
                "filters": [{"type": "RequestHeaderModifier", "requestHeaderModifier": {
                    "add": [{"name": EDGE_HEADER.0, "value": EDGE_HEADER.1}],
                }}],
                "backendRefs": [{"name": name, "port": SERVICE_PORT}],
            })
        })
        .collect();
    let route: HTTPRoute = obj(
        "HTTPRoute",
        "shop",
        json!({
            "parentRefs": [{"name": "edge"}],
            "hostnames": [HOST],
            "rules": rules,
        }),
    )?;
    let gateway = Arc::new(gateway);
    let mut world = World {
        controller: CONTROLLER_NAME.into(),
        classes: vec![Arc::new(class)],
        gateways: vec![gateway.clone()],
        http_routes: vec![Arc::new(route)],
        ..World::default()
    };
    for (name, _, _) in ROUTES {
        world.services.insert(
            (NAMESPACE.into(), name.into()),
            ServiceInfo {
                ports: vec![(i32::from(SERVICE_PORT), None)],
            },
        );
    }
    world.deployed.insert(
        (NAMESPACE.into(), "edge".into()),
        Deployed {
            address: Some("127.0.0.1".into()),
            ready: true,
        },
    );
    let outcome = world.outcome();
    let gw = outcome
        .gateways
        .first()
        .context("the operator's model serves no Gateway")?;
    if gw.backends.len() != ROUTES.len() {
        bail!(
            "the operator's model resolved {} backends, not {}: {:?}",
            gw.backends.len(),
            ROUTES.len(),
            outcome.routes
        );
    }
    let mut ports = gw.ports.clone();
    if let Some(jwks) = jwks {
        for rule in ports
            .iter_mut()
            .flat_map(|p| &mut p.hosts)
            .flat_map(|h| &mut h.rules)
        {
            rule.jwt = Some(JwtRule {
                issuer: ISSUER.into(),
                audiences: vec![AUDIENCE.into()],
                jwks: jwks.into(),
                required_claims: Vec::new(),
                claims_to_headers: Vec::new(),
                clock_skew_secs: 60,
            });
        }
    }
    let config = GatewayConfig {
        gateway: format!("{NAMESPACE}/edge"),
        policy: gateway_policy(&gateway, &gw.backends, None),
        ports,
    };
    Ok(config.to_json())
}

/// HAProxy at the edge: one frontend on `listen`; a request for
/// `shop.example` (any port, any case) whose path is a route's prefix or
/// below it goes to that route's backend, which adds `x-edge` and keeps
/// connections to its upstream alive (`http-reuse always`, from the
/// preamble); everything else gets 404 from HAProxy itself. With
/// `jwt_key`, every request must carry an RS256 bearer token that
/// `jwt_verify` accepts with that public key, from the issuer, for the
/// audience, not expired (as the Trellis rule checks), else 401.
pub fn haproxy_config(listen: SocketAddr, routes: &[Route], jwt_key: Option<&Path>) -> String {
    let mut fe = format!(
        "frontend edge\n\
         \tbind {listen}\n\
         \tacl shop req.hdr(host),field(1,:),lower -m str {HOST}\n"
    );
    if let Some(key) = jwt_key {
        let _ = write!(
            fe,
            "\thttp-request set-var(txn.bearer) http_auth_bearer\n\
             \thttp-request set-var(txn.jwt_alg) var(txn.bearer),jwt_header_query('$.alg')\n\
             \thttp-request set-var(txn.now) date()\n\
             \thttp-request set-var(txn.exp) var(txn.bearer),jwt_payload_query('$.exp','int')\n\
             \thttp-request deny deny_status 401 unless {{ var(txn.jwt_alg) -m str RS256 }}\n\
             \thttp-request deny deny_status 401 unless {{ var(txn.bearer),jwt_payload_query('$.iss') -m str {ISSUER} }}\n\
             \thttp-request deny deny_status 401 unless {{ var(txn.bearer),jwt_payload_query('$.aud') -m str {AUDIENCE} }}\n\
             \thttp-request deny deny_status 401 unless {{ var(txn.exp),sub(txn.now) -m int gt 0 }}\n\
             \thttp-request deny deny_status 401 unless {{ var(txn.bearer),jwt_verify(txn.jwt_alg,\"{}\") -m int 1 }}\n",
            key.display()
        );
    }
    let mut backends = String::new();
    for r in routes {
        let _ = write!(
            fe,
            "\tacl {name} path -m str {prefix}\n\
             \tacl {name} path_beg {prefix}/\n\
             \tuse_backend {name} if shop {name}\n",
            name = r.name,
            prefix = r.prefix
        );
        let _ = write!(
            backends,
            "backend {name}\n\
             \thttp-request add-header {} {}\n\
             \tserver {name} {}\n",
            EDGE_HEADER.0,
            EDGE_HEADER.1,
            r.addr,
            name = r.name,
        );
    }
    fe += "\tdefault_backend no_route\n";
    format!(
        "{}{fe}{backends}backend no_route\n\
         \thttp-request return status 404 content-type text/plain string \"no route\"\n",
        haproxy_preamble()
    )
}

/// nginx at the edge (the inside of its `http` block): a default server on
/// `listen` answering 404 to every other host, and a server for
/// `shop.example` with, per route, an exact location for its prefix and a
/// prefix location below it, both to the route's upstream with keep-alive,
/// the client's `Host` kept (as HAProxy and Trellis keep it) and `x-edge`
/// added; any other path gets 404.
pub fn nginx_http(listen: SocketAddr, routes: &[Route]) -> String {
    let mut out = String::new();
    for r in routes {
        let _ = write!(
            out,
            "\tupstream {name} {{\n\
             \t\tserver {addr};\n\
             \t\tkeepalive 256;\n\
             \t\tkeepalive_requests 1000000;\n\
             \t}}\n",
            name = r.name,
            addr = r.addr
        );
    }
    let _ = write!(
        out,
        "\tserver {{\n\
         \t\tlisten {listen} default_server;\n\
         \t\treturn 404;\n\
         \t}}\n\
         \tserver {{\n\
         \t\tlisten {listen};\n\
         \t\tserver_name {HOST};\n\
         \t\tproxy_http_version 1.1;\n\
         \t\tproxy_set_header Connection \"\";\n\
         \t\tproxy_set_header Host $http_host;\n\
         \t\tproxy_set_header {} {};\n\
         \t\tlocation / {{\n\
         \t\t\treturn 404;\n\
         \t\t}}\n",
        EDGE_HEADER.0, EDGE_HEADER.1
    );
    for r in routes {
        let _ = write!(
            out,
            "\t\tlocation = {prefix} {{\n\
             \t\t\tproxy_pass http://{name};\n\
             \t\t}}\n\
             \t\tlocation {prefix}/ {{\n\
             \t\t\tproxy_pass http://{name};\n\
             \t\t}}\n",
            name = r.name,
            prefix = r.prefix
        );
    }
    out += "\t}\n";
    out
}

/// The Markdown tables of a report.
fn markdown(r: &Value) -> String {
    let mut out = String::new();
    report::header(&mut out, r);
    let results = r["results"].as_array().cloned().unwrap_or_default();
    let rows: Vec<&Value> = results.iter().collect();
    if rows.is_empty() {
        return out;
    }
    let title = "HTTP/1.1 at the edge";
    report::fixed_rates(&mut out, title, &rows);
    report::closed_loop(&mut out, title, &rows, "");
    let _ = writeln!(
        out,
        "\n### {title}: requests each upstream served (and refused as misrouted), all phases\n"
    );
    let _ = writeln!(
        out,
        "| setup |{}",
        ROUTES.map(|(n, _, _)| format!(" {n} |")).concat()
    );
    let _ = writeln!(out, "|---|{}", "---:|".repeat(ROUTES.len()));
    for row in rows.iter().filter(|x| x["setup"] != "direct") {
        let cells: String = ROUTES
            .iter()
            .map(|(n, _, _)| {
                let u = &row["upstreams"][n];
                format!(" {} ({}) |", u["served"], u["misdirected"])
            })
            .collect();
        let _ = writeln!(out, "| {} |{cells}", row["setup"].as_str().unwrap_or(""));
    }
    report::ratios(
        &mut out,
        title,
        &rows,
        ("trellis", "Trellis"),
        &["haproxy", "nginx"],
        "RSS peak at max",
    );
    report::ratios(
        &mut out,
        title,
        &rows,
        ("trellis-jwt", "Trellis with JWT"),
        &["haproxy-jwt"],
        "RSS peak at max",
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routes() -> Vec<Route<'static>> {
        ROUTES
            .iter()
            .enumerate()
            .map(|(i, &(name, prefix, _))| Route {
                name,
                prefix,
                addr: SocketAddr::from(([127, 0, 0, 1], 9001 + i as u16)),
            })
            .collect()
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("trellis-bench-{name}-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn the_operator_model_routes_each_prefix_to_its_service_and_adds_the_header() {
        let config = GatewayConfig::from_json(&trellis_config(18080, None).unwrap()).unwrap();
        assert_eq!(config.ports.len(), 1);
        assert_eq!(config.ports[0].port, 18080);
        let hosts = &config.ports[0].hosts;
        assert_eq!(hosts.len(), 1);
        assert_eq!(hosts[0].hostname.as_deref(), Some(HOST));
        assert_eq!(hosts[0].rules.len(), ROUTES.len());
        for rule in &hosts[0].rules {
            let backend = rule.backends[0].service.as_ref().unwrap();
            let (_, prefix, _) = ROUTES.iter().find(|(n, _, _)| *n == backend.name).unwrap();
            assert_eq!(
                rule.matches.path,
                Some(trellis_policy::gateway::PathMatch::Prefix((*prefix).into()))
            );
            assert_eq!(rule.filters.len(), 1, "{rule:?}");
            assert!(rule.jwt.is_none());
        }
        assert_eq!(config.policy.dependencies.len(), ROUTES.len());
        let with_jwt =
            GatewayConfig::from_json(&trellis_config(18080, Some("{}")).unwrap()).unwrap();
        assert!(
            with_jwt.ports[0].hosts[0]
                .rules
                .iter()
                .all(|r| r.jwt.is_some())
        );
    }

    /// HAProxy accepts both configurations (`haproxy -c`), when installed.
    #[test]
    fn haproxy_accepts_the_edge_configurations() {
        if !super::super::on_path("haproxy") {
            eprintln!("haproxy is not installed; skipped");
            return;
        }
        let dir = temp_dir("haproxy");
        // Any RSA public key will do for the syntax check.
        let key = dir.join("key.pem");
        let made = Command::new("openssl")
            .args(["pkey", "-pubout", "-in"])
            .arg(xtask::paths::workspace().join("sidecar/tests/fixtures/jwt/rsa-a.pem"))
            .arg("-out")
            .arg(&key)
            .status();
        let listen = SocketAddr::from(([127, 0, 0, 1], 18081));
        let mut configs = vec![haproxy_config(listen, &routes(), None)];
        if made.is_ok_and(|s| s.success()) {
            configs.push(haproxy_config(listen, &routes(), Some(&key)));
        }
        for (i, config) in configs.iter().enumerate() {
            let path = dir.join(format!("{i}.cfg"));
            fs::write(&path, config).unwrap();
            let out = Command::new("haproxy")
                .arg("-c")
                .arg("-f")
                .arg(&path)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "haproxy -c refused:\n{config}\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let _ = fs::remove_dir_all(&dir);
    }

    /// nginx accepts the configuration (`nginx -t`), when installed.
    #[test]
    fn nginx_accepts_the_edge_configuration() {
        if !super::super::on_path("nginx") {
            eprintln!("nginx is not installed; skipped");
            return;
        }
        let dir = temp_dir("nginx");
        let listen = SocketAddr::from(([127, 0, 0, 1], 18082));
        let config = super::super::proxies::nginx_config(&dir, &nginx_http(listen, &routes()));
        let path = dir.join("nginx.conf");
        fs::write(&path, &config).unwrap();
        let out = Command::new("nginx")
            .arg("-t")
            .arg("-p")
            .arg(&dir)
            .arg("-e")
            .arg(dir.join("error.log"))
            .arg("-c")
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "nginx -t refused:\n{config}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let _ = fs::remove_dir_all(&dir);
    }
}
