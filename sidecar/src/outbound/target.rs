//! Which service an outbound request is for.
//!
//! An application reaches a dependency the way it would reach a Kubernetes
//! Service through cluster DNS — `user`, `user.shop`, `user.shop.svc` or
//! `user.shop.svc.cluster.local` — either as an HTTP proxy (absolute URI,
//! which is what `HTTP_PROXY` makes clients send) or directly with the name in
//! `Host` / `:authority`. The port, if any, is ignored: discovery knows the
//! port each endpoint serves on.

use std::{fmt, sync::Arc};

use http::{Request, Uri, header};
use trellis_policy::{Resilience, SidecarPolicy, is_dns_label};

use crate::http::response::ProxyError;

/// A Kubernetes Service, by name and namespace.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceName {
    /// The Service's name.
    pub name: String,
    /// The Service's namespace.
    pub namespace: String,
}

impl ServiceName {
    /// A service by name and namespace.
    pub fn new(name: impl Into<String>, namespace: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            namespace: namespace.into(),
        }
    }
}

impl fmt::Display for ServiceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.name, self.namespace)
    }
}

/// A service of the mesh as the router hands it to the layers below: all
/// they need to build its stack, so nothing below the router reads the
/// policy.
#[derive(Clone, Debug)]
pub struct ServiceTarget {
    /// The Service.
    pub name: ServiceName,
    /// How metrics, spans and the proxy's answers name it (`name.namespace`).
    pub label: Arc<str>,
    /// The policy's settings for calls to it.
    pub resilience: Resilience,
    /// The policy generation `resilience` comes from.
    pub generation: u64,
}

impl ServiceTarget {
    /// The target for `name` under `policy` (generation `generation`): its
    /// dependency entry's settings, the policy's defaults for an undeclared
    /// service, or the built-in defaults before any policy arrives.
    pub fn new(name: ServiceName, policy: Option<&SidecarPolicy>, generation: u64) -> Self {
        let resilience = policy.map_or_else(Resilience::default, |p| {
            p.resilience_for(&name.name, &name.namespace)
        });
        Self {
            label: name.to_string().into(),
            name,
            resilience,
            generation,
        }
    }
}

/// How names are completed: the namespace a bare name lives in, and the
/// cluster's DNS domain.
#[derive(Clone, Debug)]
pub struct NameRules {
    /// The namespace of a bare `name` (the pod's own).
    pub default_namespace: String,
    /// The cluster domain, `cluster.local` unless the cluster says otherwise.
    pub cluster_domain: String,
}

impl NameRules {
    /// Parses a host (no port) into a service name.
    pub fn parse_host(&self, host: &str) -> Result<ServiceName, ProxyError> {
        let bad = || ProxyError::BadAuthority(host.to_owned());
        let lower = host.trim_end_matches('.').to_ascii_lowercase();
        // Strip `.svc` or `.svc.<cluster domain>`, leaving `name.namespace`.
        let suffix_full = format!(".svc.{}", self.cluster_domain);
        let short = lower
            .strip_suffix(suffix_full.as_str())
            .or_else(|| lower.strip_suffix(".svc"));
        let labels: Vec<&str> = short.unwrap_or(&lower).split('.').collect();
        let (name, namespace) = match (labels.as_slice(), short.is_some()) {
            ([name], false) => (*name, self.default_namespace.as_str()),
            ([name, ns], _) => (*name, *ns),
            _ => return Err(bad()),
        };
        if !is_dns_label(name) || !is_dns_label(namespace) {
            return Err(bad());
        }
        Ok(ServiceName::new(name, namespace))
    }

    /// The service a request is for: the absolute URI's host when the request
    /// is in proxy form (or HTTP/2, whose `:authority` is in the URI), else `Host`.
    pub fn target_of<B>(&self, req: &Request<B>) -> Result<ServiceName, ProxyError> {
        self.parse_host(&authority_of(req)?.0)
    }
}

/// The host (lowercase, without brackets or a final dot) and port a request
/// names: the absolute URI's when it is in proxy form (or HTTP/2, whose
/// `:authority` is in the URI), else `Host`'s.
pub fn authority_of<B>(req: &Request<B>) -> Result<(String, Option<u16>), ProxyError> {
    let tidy = |uri: &Uri| {
        uri.host().map(|h| {
            let h = h.trim_start_matches('[').trim_end_matches(']');
            (h.trim_end_matches('.').to_ascii_lowercase(), uri.port_u16())
        })
    };
    if let Some(found) = tidy(req.uri()) {
        return Ok(found);
    }
    let host = req
        .headers()
        .get(header::HOST)
        .ok_or(ProxyError::NoAuthority)?
        .to_str()
        .map_err(|_| ProxyError::BadAuthority("<non-ascii Host>".into()))?;
    // Host is an authority: reuse the URI parser to split off the port.
    let uri: Uri = format!("http://{host}/")
        .parse()
        .map_err(|_| ProxyError::BadAuthority(host.to_owned()))?;
    tidy(&uri).ok_or(ProxyError::NoAuthority)
}

/// Whether `host` is something DNS could resolve or an IP address: labels of
/// letters, digits and `-` (and `_`, which DNS allows), or an address.
pub fn is_host(host: &str) -> bool {
    if host.parse::<std::net::IpAddr>().is_ok() {
        return true;
    }
    host.len() <= 253
        && host.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> NameRules {
        NameRules {
            default_namespace: "shop".into(),
            cluster_domain: "cluster.local".into(),
        }
    }

    #[test]
    fn completes_each_dns_form() {
        let r = rules();
        for (host, name, ns) in [
            ("user", "user", "shop"),
            ("User", "user", "shop"),
            ("user.other", "user", "other"),
            ("user.other.svc", "user", "other"),
            ("user.other.svc.cluster.local", "user", "other"),
            ("user.other.svc.cluster.local.", "user", "other"),
        ] {
            assert_eq!(
                r.parse_host(host).unwrap(),
                ServiceName::new(name, ns),
                "{host}"
            );
        }
    }

    #[test]
    fn refuses_what_cannot_be_a_service() {
        let r = rules();
        for host in [
            "",
            "a.b.c",
            "user.svc",
            "user.shop.svc.other.domain",
            "-user",
            "user_1",
            "127.0.0.1",
            &"a".repeat(64),
        ] {
            assert!(
                matches!(r.parse_host(host), Err(ProxyError::BadAuthority(_))),
                "{host:?} should be refused"
            );
        }
    }

    #[test]
    fn tells_hosts_from_garbage() {
        for host in [
            "example.com",
            "a.b.c",
            "127.0.0.1",
            "::1",
            "my_host.local",
            "x",
        ] {
            assert!(is_host(host), "{host}");
        }
        for host in ["", "a..b", "-a.com", "a b", "a/b", &"a".repeat(64)] {
            assert!(!is_host(host), "{host:?}");
        }
        let req = Request::get("http://[::1]:8080/").body(()).unwrap();
        assert_eq!(authority_of(&req).unwrap(), ("::1".into(), Some(8080)));
        let req = Request::get("/")
            .header("host", "Example.COM.")
            .body(())
            .unwrap();
        assert_eq!(authority_of(&req).unwrap(), ("example.com".into(), None));
    }

    #[test]
    fn reads_proxy_form_then_host() {
        let r = rules();
        let req = Request::get("http://user.other:8080/api/v1/users/1")
            .header("host", "ignored")
            .body(())
            .unwrap();
        assert_eq!(
            r.target_of(&req).unwrap(),
            ServiceName::new("user", "other")
        );

        let req = Request::get("/api")
            .header("host", "product:80")
            .body(())
            .unwrap();
        assert_eq!(
            r.target_of(&req).unwrap(),
            ServiceName::new("product", "shop")
        );

        let req = Request::get("/api").body(()).unwrap();
        assert!(matches!(r.target_of(&req), Err(ProxyError::NoAuthority)));
    }
}
