//! Gateway mode: the sidecar at the edge of the cluster, serving a
//! Gateway API `Gateway` and its routes.
//!
//! The operator flattens a Gateway and its routes into a
//! [`GatewayConfig`] in a Secret; [`watch_secret`] (or [`watch_file`],
//! without Kubernetes) hands each version to the [`GatewayStore`], which
//! compiles it and, when it is good, puts its `policy` in force (the
//! gateway is a mesh client like any other: its backends are its
//! dependencies) and publishes the route tables. A configuration that
//! does not compile is refused and the last good one keeps serving.
//!
//! [`serve_ports`] keeps one listener per configured port. Each serves
//! [`crate::stack::gateway`]: the route table picks a rule, the rule's
//! bearer token check (if any) lets the request through or answers it,
//! then its per-client rate limit (if any, [`rate_limit`]) takes a token
//! from the client's bucket or answers 429, the rule's filters change the request (or answer with a redirect), a weighted draw
//! picks a backend, and the request goes on through the same per-service
//! stacks the outbound listener uses (retries, breaker, balancer, mutual
//! TLS to meshed backends).

pub mod filters;
pub mod jwt;
pub mod rate_limit;
pub mod routes;
mod tls;

use std::{
    collections::{BTreeMap, HashMap},
    convert::Infallible,
    path::PathBuf,
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, SystemTime},
};

use futures::{
    StreamExt,
    future::{BoxFuture, FutureExt},
};
use http::{HeaderValue, Request, Response, Uri, header};
use k8s_openapi::api::core::v1::Secret;
use kube::{
    Api, Client,
    runtime::{WatchStreamExt, watcher},
};
use tokio::{net::TcpListener, sync::watch};
use tower::{Service, ServiceExt};
use trellis_policy::gateway::{Filter, GATEWAY_CONFIG_KEY, GatewayConfig};

use self::{
    filters::{RedirectFrom, modify_headers, redirect, rewrite_path, with_path},
    rate_limit::Limiters,
    routes::PortRoutes,
};
use crate::{
    http::{Body, response::ProxyError},
    metrics::{Metrics, ServiceLabel},
    outbound::target::authority_of,
    policy_watch::PolicyStore,
    server::{self, ClientAddr, ServerLimits, ServerTls},
    stack::ListenerService,
};

/// What one port serves, compiled.
#[derive(Debug)]
pub struct PortTable {
    /// The routes.
    pub routes: PortRoutes,
    /// The TLS configuration of an HTTPS port.
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

/// Every port's table, by port.
pub type Tables = BTreeMap<u16, Arc<PortTable>>;

/// Compiles a configuration, its rate limits from `limiters`; the error
/// names what is wrong.
pub fn compile(config: &GatewayConfig, limiters: &Limiters) -> Result<Tables, String> {
    config
        .ports
        .iter()
        .map(|p| {
            let routes =
                PortRoutes::compile(p, limiters).map_err(|e| format!("port {}: {e}", p.port))?;
            let tls = if p.certificates.is_empty() {
                None
            } else {
                Some(
                    tls::server_config(&p.certificates)
                        .map_err(|e| format!("port {}: {e}", p.port))?,
                )
            };
            Ok((p.port, Arc::new(PortTable { routes, tls })))
        })
        .collect()
}

/// The gateway's configuration in force: its policy goes to the policy
/// store, its tables to the listeners.
#[derive(Clone)]
pub struct GatewayStore {
    tables: watch::Sender<Arc<Tables>>,
    policy: PolicyStore,
    /// The per-client buckets, kept across configurations while a limit
    /// is unchanged.
    limiters: Limiters,
}

impl GatewayStore {
    /// A store with no ports yet.
    pub fn new(policy: PolicyStore) -> Self {
        Self {
            tables: watch::Sender::new(Arc::default()),
            policy,
            limiters: Limiters::default(),
        }
    }

    /// The tables, kept up to date.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Tables>> {
        self.tables.subscribe()
    }

    /// Puts `text` in force if it parses and compiles, else keeps the last
    /// good configuration and says why, naming `source`.
    pub fn offer(&self, text: &str, source: &str) -> Result<(), String> {
        let result = GatewayConfig::from_json(text)
            .map_err(|e| format!("not a gateway configuration: {e}"))
            .and_then(|config| {
                let tables = compile(&config, &self.limiters)?;
                self.policy
                    .offer(&config.policy.to_json(), source)
                    .map_err(|e| e.to_string())?;
                Ok((config, tables))
            });
        match result {
            Ok((config, tables)) => {
                tracing::info!(%source, gateway = %config.gateway, ports = tables.len(), "gateway configuration in force");
                self.tables.send_replace(Arc::new(tables));
                Ok(())
            }
            Err(error) => {
                tracing::error!(%source, %error, "gateway configuration refused; keeping the last good one");
                self.policy.refuse(error.clone(), source);
                Err(error)
            }
        }
    }
}

/// Offers the configuration in Secret `name` now and after every change.
/// The watch is narrowed to the one object: the gateway's RBAC grants
/// that name only.
pub async fn watch_secret(
    store: GatewayStore,
    client: Client,
    namespace: String,
    name: String,
    mut shutdown: watch::Receiver<bool>,
) {
    let api: Api<Secret> = Api::namespaced(client, &namespace);
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut stream = std::pin::pin!(watcher(api, config).default_backoff());
    let at = format!("secret:{namespace}/{name}");
    loop {
        let event = tokio::select! {
            e = stream.next() => e,
            _ = crate::shutdown::signalled(&mut shutdown) => return,
        };
        match event {
            None => return,
            Some(Ok(watcher::Event::Apply(s) | watcher::Event::InitApply(s))) => {
                let version = s.metadata.resource_version.clone().unwrap_or_default();
                let source = format!("{at}@{version}");
                match s.data.as_ref().and_then(|d| d.get(GATEWAY_CONFIG_KEY)) {
                    Some(bytes) => {
                        let _ = store.offer(&String::from_utf8_lossy(&bytes.0), &source);
                    }
                    None => store.policy.refuse(
                        format!("the Secret has no key {GATEWAY_CONFIG_KEY:?}"),
                        &source,
                    ),
                }
            }
            Some(Ok(watcher::Event::Delete(_))) => {
                store.policy.refuse("the Secret was deleted".into(), &at);
            }
            Some(Ok(watcher::Event::Init | watcher::Event::InitDone)) => {}
            Some(Err(error)) => {
                tracing::warn!(source = %at, %error, "gateway configuration watch failed; retrying");
            }
        }
    }
}

/// Offers the configuration in file `path` now and after every change.
pub async fn watch_file(
    store: GatewayStore,
    path: PathBuf,
    interval: Duration,
    shutdown: watch::Receiver<bool>,
) {
    let source = format!("file:{}", path.display());
    crate::file_watch::poll_file(path, interval, shutdown, move |text| {
        let _ = store.offer(&text, &source);
    })
    .await;
}

/// What [`serve_ports`] needs to start a port's listener.
pub struct PortParts {
    /// The address listeners bind on (the port is the configured one).
    pub bind: std::net::IpAddr,
    /// Builds the stack of a port.
    pub stack: Arc<dyn Fn(u16, watch::Receiver<Arc<Tables>>) -> ListenerService + Send + Sync>,
    /// Connection limits.
    pub limits: ServerLimits,
    /// Metrics.
    pub metrics: Metrics,
}

/// Keeps one listener per configured port until `shutdown`: starts the
/// new ones, drains the removed ones. A port that cannot be bound is
/// logged and tried again with the next configuration.
pub async fn serve_ports(
    parts: PortParts,
    mut tables: watch::Receiver<Arc<Tables>>,
    mut shutdown: watch::Receiver<bool>,
) {
    struct Listening {
        stop: watch::Sender<bool>,
        tls: watch::Sender<Option<Arc<rustls::ServerConfig>>>,
        task: tokio::task::JoinHandle<()>,
    }
    let mut open: HashMap<u16, Listening> = HashMap::new();
    loop {
        let current = tables.borrow_and_update().clone();
        open.retain(|port, l| {
            let keep = current.contains_key(port);
            if !keep {
                tracing::info!(port, "gateway port removed; draining");
                let _ = l.stop.send(true);
            }
            keep
        });
        for (port, table) in current.iter() {
            if let Some(l) = open.get(port) {
                l.tls.send_replace(table.tls.clone());
                continue;
            }
            let addr = std::net::SocketAddr::new(parts.bind, *port);
            let listener = match TcpListener::bind(addr).await {
                Ok(l) => l,
                Err(error) => {
                    tracing::error!(%addr, %error, "cannot bind a gateway port; trying again with the next configuration");
                    continue;
                }
            };
            tracing::info!(%addr, tls = table.tls.is_some(), "gateway port listening");
            let (stop, stop_rx) = watch::channel(false);
            let (tls, tls_rx) = watch::channel(table.tls.clone());
            let task = tokio::spawn(server::serve(
                "gateway",
                listener,
                (parts.stack)(*port, tables.clone()),
                parts.limits.clone(),
                parts.metrics.connections("gateway"),
                Some(ServerTls::Edge(tls_rx)),
                stop_rx,
            ));
            open.insert(*port, Listening { stop, tls, task });
        }
        tokio::select! {
            changed = tables.changed() => if changed.is_err() { break },
            _ = crate::shutdown::signalled(&mut shutdown) => break,
        }
    }
    for l in open.into_values() {
        let _ = l.stop.send(true);
        let _ = l.task.await;
    }
}

/// Routes the requests of one port to the mesh's per-service stacks.
#[derive(Clone)]
pub struct GatewayRoutes {
    port: u16,
    tables: watch::Receiver<Arc<Tables>>,
    /// The outbound router: the per-service stacks.
    router: ListenerService,
    cluster_domain: Arc<str>,
    metrics: Metrics,
}

impl GatewayRoutes {
    /// The routes of `port`, sending through `router`.
    pub fn new(
        port: u16,
        tables: watch::Receiver<Arc<Tables>>,
        router: ListenerService,
        cluster_domain: &str,
        metrics: Metrics,
    ) -> Self {
        Self {
            port,
            tables,
            router,
            cluster_domain: cluster_domain.into(),
            metrics,
        }
    }
}

impl Service<Request<Body>> for GatewayRoutes {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Response<Body>, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let table = self.tables.borrow().get(&self.port).cloned();
        let (router, domain, port) = (self.router.clone(), self.cluster_domain.clone(), self.port);
        let metrics = self.metrics.clone();
        async move {
            let Some(table) = table else {
                let e = ProxyError::NoRoute {
                    host: String::new(),
                    path: req.uri().path().into(),
                };
                return Ok(e.into_response());
            };
            Ok(route(&table, port, req, router, &domain, &metrics).await)
        }
        .boxed()
    }
}

/// One request through `table`.
async fn route(
    table: &PortTable,
    port: u16,
    mut req: Request<Body>,
    router: ListenerService,
    domain: &str,
    metrics: &Metrics,
) -> Response<Body> {
    let host = match authority_of(&req) {
        Ok((host, _)) => host,
        Err(e) => return e.into_response(),
    };
    let Some(rule) = table
        .routes
        .host(&host)
        .and_then(|h| h.rule(req.method(), req.uri(), req.headers()))
    else {
        let path = req.uri().path().to_owned();
        return ProxyError::NoRoute { host, path }.into_response();
    };
    let spec = &rule.spec;
    // Authentication comes first: a refused request is neither redirected
    // nor forwarded, nor does it spend a token of the client it claims to be.
    let claims = match &rule.jwt {
        None => None,
        Some(jwt) => match jwt.authenticate(req.headers_mut(), SystemTime::now()) {
            Ok(claims) => Some(claims),
            Err(refusal) => {
                tracing::debug!(route = %spec.route, reason = %refusal.description, "bearer token refused");
                return refusal.into_response();
            }
        },
    };
    if let Some(limit) = &rule.rate_limit {
        let client = req.extensions().get::<ClientAddr>().map(|a| a.0.ip());
        if let Err(wait) = limit.try_take(limit.key(client, claims.as_ref())) {
            let id = &limit.spec().id;
            metrics.gateway_rate_limited(id);
            return ProxyError::ClientRateLimited {
                limit: id.clone(),
                retry_after: wait.as_secs_f64().ceil().max(1.0) as u64,
            }
            .into_response();
        }
    }
    // The client's authority, kept as the Host the backend sees: the URI
    // is about to name the backend Service instead.
    let mut authority: Option<HeaderValue> =
        req.headers().get(header::HOST).cloned().or_else(|| {
            req.uri()
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        });
    let mut response_filters = Vec::new();
    for filter in &spec.filters {
        match filter {
            Filter::RequestHeaderModifier(m) => modify_headers(req.headers_mut(), m),
            Filter::ResponseHeaderModifier(m) => response_filters.push(m),
            Filter::RequestRedirect(r) => {
                let scheme = if table.tls.is_some() { "https" } else { "http" };
                return redirect(
                    r,
                    &RedirectFrom {
                        scheme,
                        host: &host,
                        port,
                        uri: req.uri(),
                        matched: rule.matched_prefix(),
                    },
                );
            }
            Filter::UrlRewrite(rw) => {
                if let Some(h) = &rw.hostname {
                    authority = HeaderValue::from_str(h).ok();
                }
                if let Some(p) = &rw.path {
                    let path = rewrite_path(req.uri().path(), p, rule.matched_prefix());
                    *req.uri_mut() = with_path(req.uri(), &path);
                }
            }
        }
    }
    let invalid = || ProxyError::InvalidBackend(spec.route.clone()).into_response();
    if rule.total_weight == 0 {
        return invalid();
    }
    let Some(backend) = rule.backend(rand::random_range(0..rule.total_weight)) else {
        return invalid();
    };
    let Some(service) = &backend.service else {
        return invalid();
    };
    for filter in &backend.filters {
        if let Filter::RequestHeaderModifier(m) = filter {
            modify_headers(req.headers_mut(), m);
        }
        if let Filter::ResponseHeaderModifier(m) = filter {
            response_filters.push(m);
        }
    }
    let pq = req
        .uri()
        .path_and_query()
        .map_or("/", |pq| pq.as_str())
        .to_owned();
    let to = format!(
        "http://{}.{}.svc.{domain}:{}{pq}",
        service.name, service.namespace, service.port
    );
    match to.parse::<Uri>() {
        Ok(uri) => *req.uri_mut() = uri,
        Err(_) => return invalid(),
    }
    if let Some(a) = authority {
        req.headers_mut().insert(header::HOST, a);
    }
    // What the backend speaks, whatever the client spoke to the gateway.
    *req.version_mut() = if service.h2c {
        http::Version::HTTP_2
    } else {
        http::Version::HTTP_11
    };
    // Boxed and named: spelling out the 'static future avoids a rustc
    // limitation with boxed-error lifetimes inside async blocks.
    let call: BoxFuture<'static, Result<Response<Body>, Infallible>> =
        Box::pin(router.oneshot(req));
    let mut rsp = match spec.timeout_ms {
        Some(ms) => {
            let timeout = Duration::from_millis(ms);
            match tokio::time::timeout(timeout, call).await {
                Ok(r) => r.unwrap_or_else(|never| match never {}),
                Err(_) => ProxyError::Timeout {
                    service: spec.route.clone(),
                    timeout,
                }
                .into_response(),
            }
        }
        None => call.await.unwrap_or_else(|never| match never {}),
    };
    for m in response_filters {
        modify_headers(rsp.headers_mut(), m);
    }
    if rsp.extensions().get::<ServiceLabel>().is_none() {
        rsp.extensions_mut().insert(ServiceLabel(
            format!("{}.{}", service.name, service.namespace).into(),
        ));
    }
    rsp
}
