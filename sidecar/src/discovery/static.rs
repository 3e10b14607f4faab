//! Static discovery: endpoints given on the command line or in a JSON file.
//!
//! This runs the sidecar with no Kubernetes at all, for local development and
//! tests. A name given here is a known service; any other name is unknown.
//! The set can be changed live: by [`StaticResolver::set`], or by editing the
//! endpoints file, which is polled.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    sync::Arc,
};

use super::{Directory, Discovered, EndpointsWatch, Resolve};
use crate::{metrics::Metrics, outbound::target::ServiceName};

/// Endpoints by service name (`name` or `name.namespace`), as flags and the
/// endpoints file give them.
pub type StaticEndpoints = BTreeMap<String, Vec<SocketAddr>>;

/// Parses one `--static-endpoints` value: `name=addr[,addr...]`.
pub fn parse_flag(s: &str) -> Result<(String, Vec<SocketAddr>), String> {
    let (name, addrs) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected name=host:port[,host:port...]"))?;
    let name = name.trim();
    if name.is_empty() {
        return Err(format!("{s:?}: the service name is empty"));
    }
    let addrs = addrs
        .split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .map(|a| {
            a.parse::<SocketAddr>()
                .map_err(|e| format!("{s:?}: {a:?} is not an ip:port address: {e}"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok((name.to_owned(), addrs))
}

/// Parses one `--static-identity` value: `name=serviceaccount`, saying
/// `name`'s pods are meshed workloads running as that ServiceAccount (what
/// the `trellis.dev/service-account` label on its Service says in
/// Kubernetes), so calls to them go over mutual TLS and the server must
/// prove that identity.
pub fn parse_identity_flag(s: &str) -> Result<(String, String), String> {
    let (name, account) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected name=serviceaccount"))?;
    let (name, account) = (name.trim(), account.trim());
    if name.is_empty() {
        return Err(format!("{s:?}: the service name is empty"));
    }
    if account.is_empty() {
        return Err(format!("{s:?}: the ServiceAccount is empty"));
    }
    if account.contains(['/', ',', '=']) || account.contains(char::is_whitespace) {
        return Err(format!("{s:?}: {account:?} is not a ServiceAccount name"));
    }
    Ok((name.to_owned(), account.to_owned()))
}

/// Parses an endpoints file: `{"user": ["127.0.0.1:9001", ...], ...}`.
pub fn parse_file(json: &str) -> Result<StaticEndpoints, serde_json::Error> {
    serde_json::from_str(json)
}

/// Endpoints from flags and a file, changeable while running.
#[derive(Clone)]
pub struct StaticResolver {
    dir: Directory,
    default_namespace: Arc<str>,
}

impl StaticResolver {
    /// An empty resolver; bare names belong to `default_namespace`.
    pub fn new(default_namespace: &str, metrics: Metrics) -> Self {
        Self {
            dir: Directory::new(metrics),
            default_namespace: default_namespace.into(),
        }
    }

    fn service(&self, name: &str) -> ServiceName {
        match name.split_once('.') {
            Some((n, ns)) => ServiceName::new(n, ns),
            None => ServiceName::new(name, &*self.default_namespace),
        }
    }

    /// Sets the endpoints of `name` (`name` or `name.namespace`); an empty set
    /// keeps the service known with no endpoints.
    pub fn set(&self, name: &str, addrs: impl IntoIterator<Item = SocketAddr>) {
        let set: BTreeSet<SocketAddr> = addrs.into_iter().collect();
        self.dir
            .publish(&self.service(name), Discovered::Ready(Arc::new(set)));
    }

    /// Says `name`'s pods are meshed workloads running as ServiceAccount
    /// `account` (`None`: not meshed), as the label on a MicroService's
    /// Service does in Kubernetes.
    pub fn set_identity(&self, name: &str, account: Option<&str>) {
        self.dir.publish_identity(&self.service(name), account);
    }

    /// Forgets `name`: it becomes unknown.
    pub fn remove(&self, name: &str) {
        self.dir.publish(&self.service(name), Discovered::NotFound);
    }

    /// Replaces every service at once: names not in `all` become unknown.
    pub fn replace_all(&self, all: &StaticEndpoints) {
        let keep: BTreeSet<ServiceName> = all.keys().map(|n| self.service(n)).collect();
        for svc in self.dir.snapshot().into_keys() {
            if !keep.contains(&svc) {
                self.dir.publish(&svc, Discovered::NotFound);
            }
        }
        for (name, addrs) in all {
            self.set(name, addrs.iter().copied());
        }
    }
}

impl Resolve for StaticResolver {
    fn resolve(&self, service: &ServiceName) -> EndpointsWatch {
        self.dir.watch(service, Discovered::NotFound, |_| {})
    }

    fn is_synced(&self) -> bool {
        true
    }

    fn snapshot(&self) -> BTreeMap<ServiceName, Discovered> {
        self.dir.snapshot()
    }

    fn identity(&self, service: &ServiceName) -> super::IdentityWatch {
        self.dir.identity(service)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_flags() {
        let (name, addrs) = parse_flag("user=127.0.0.1:9001, 127.0.0.1:9002").unwrap();
        assert_eq!(name, "user");
        assert_eq!(
            addrs,
            [
                "127.0.0.1:9001".parse().unwrap(),
                "127.0.0.1:9002".parse().unwrap()
            ]
        );
        assert_eq!(parse_flag("empty=").unwrap().1, []);
        assert!(parse_flag("user").is_err());
        assert!(parse_flag("=127.0.0.1:1").is_err());
        assert!(parse_flag("user=localhost:80").is_err());
    }

    #[test]
    fn parses_identity_flags() {
        assert_eq!(
            parse_identity_flag("user=user").unwrap(),
            ("user".to_owned(), "user".to_owned())
        );
        assert_eq!(
            parse_identity_flag(" product.shop = product-sa ").unwrap(),
            ("product.shop".to_owned(), "product-sa".to_owned())
        );
        assert!(parse_identity_flag("user").is_err());
        assert!(parse_identity_flag("=user").is_err());
        assert!(parse_identity_flag("user=").is_err());
        assert!(parse_identity_flag("user=a/b").is_err());
        assert!(parse_identity_flag("user=a,b").is_err());
    }

    #[test]
    fn follows_changes_and_forgets_names() {
        let r = StaticResolver::new("shop", Metrics::default());
        let user = ServiceName::new("user", "shop");
        let w = r.resolve(&user);
        assert_eq!(*w.borrow(), Discovered::NotFound);
        r.set("user", ["127.0.0.1:1".parse().unwrap()]);
        assert_eq!(w.borrow().addrs(), ["127.0.0.1:1".parse().unwrap()]);
        r.set("other.ns", []);
        r.replace_all(&parse_file(r#"{"other.ns": ["127.0.0.1:2"]}"#).unwrap());
        assert_eq!(*w.borrow(), Discovered::NotFound);
        assert_eq!(
            r.resolve(&ServiceName::new("other", "ns")).borrow().addrs(),
            ["127.0.0.1:2".parse().unwrap()]
        );
    }
}
