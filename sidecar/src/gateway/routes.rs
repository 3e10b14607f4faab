//! The route table of one port: a request's host picks a virtual host,
//! the first of its rules that matches picks what happens.
//!
//! Regular expressions are compiled once, when a configuration is loaded;
//! a configuration with one that does not compile is refused as a whole,
//! so the last good table stays in force.

use std::{collections::HashMap, sync::Arc};

use http::{HeaderMap, Method, Uri};
use regex::Regex;
use trellis_policy::gateway::{
    Backend, PathMatch, PortConfig, RateLimitKey, RequestMatch, RouteRule, ValueMatch, VirtualHost,
};

use super::{
    jwt::JwtCheck,
    rate_limit::{KeyedLimiter, Limiters},
};

/// The compiled rules of one port.
#[derive(Debug, Default)]
pub struct PortRoutes {
    exact: HashMap<String, Host>,
    /// Wildcard hosts by suffix (`.example.com`), longest first.
    wildcards: Vec<(String, Host)>,
    any: Option<Host>,
}

/// The compiled rules of one virtual host.
#[derive(Debug)]
pub struct Host {
    rules: Vec<Rule>,
}

/// One compiled rule.
#[derive(Debug)]
pub struct Rule {
    /// The rule as configured (filters, backends, timeouts).
    pub spec: RouteRule,
    path: Option<Path>,
    method: Option<Method>,
    headers: Vec<Value>,
    query: Vec<Value>,
    /// The sum of the backends' weights.
    pub total_weight: u64,
    /// The bearer token check, when the rule requires one.
    pub jwt: Option<JwtCheck>,
    /// The per-client rate limit, when the rule has one (shared with the
    /// other rules of the same limit).
    pub rate_limit: Option<Arc<KeyedLimiter>>,
}

#[derive(Debug)]
enum Path {
    Exact(String),
    /// Without a trailing slash (except `/` itself).
    Prefix(String),
    Regex(Regex),
}

#[derive(Debug)]
struct Value {
    name: String,
    matcher: Matcher,
}

#[derive(Debug)]
enum Matcher {
    Equals(String),
    Regex(Regex),
}

impl Matcher {
    fn matches(&self, value: &str) -> bool {
        match self {
            Self::Equals(v) => v == value,
            Self::Regex(r) => r.is_match(value),
        }
    }
}

/// A regular expression anchored to the whole value.
fn whole(pattern: &str, what: &str) -> Result<Regex, String> {
    Regex::new(&format!("^(?:{pattern})$"))
        .map_err(|e| format!("{what}: {pattern:?} is not a regular expression: {e}"))
}

fn value(m: &ValueMatch, what: &str) -> Result<Value, String> {
    let matcher = if m.regex {
        Matcher::Regex(whole(&m.value, what)?)
    } else {
        Matcher::Equals(m.value.clone())
    };
    Ok(Value {
        name: m.name.clone(),
        matcher,
    })
}

impl Rule {
    fn compile(spec: &RouteRule, limiters: &Limiters) -> Result<Self, String> {
        let at = |what: &str| format!("{} {what}", spec.route);
        let m: &RequestMatch = &spec.matches;
        let path = match &m.path {
            None => None,
            Some(PathMatch::Exact(p)) => Some(Path::Exact(p.clone())),
            Some(PathMatch::Prefix(p)) => {
                let trimmed = p.trim_end_matches('/');
                Some(Path::Prefix(if trimmed.is_empty() {
                    "/".into()
                } else {
                    trimmed.into()
                }))
            }
            Some(PathMatch::RegularExpression(r)) => Some(Path::Regex(whole(r, &at("path"))?)),
        };
        let method = m
            .method
            .as_deref()
            .map(|s| Method::from_bytes(s.as_bytes()).map_err(|_| at("method: not a method")))
            .transpose()?;
        let headers = m
            .headers
            .iter()
            .map(|h| {
                let mut v = value(h, &at("header"))?;
                v.name = v.name.to_ascii_lowercase();
                Ok(v)
            })
            .collect::<Result<_, String>>()?;
        let query = m
            .query
            .iter()
            .map(|q| value(q, &at("query parameter")))
            .collect::<Result<_, String>>()?;
        let jwt = spec
            .jwt
            .as_ref()
            .map(|j| JwtCheck::compile(j, &spec.route))
            .transpose()?;
        if let Some(limit) = &spec.rate_limit
            && let RateLimitKey::Claim(claim) = &limit.key
            && jwt.is_none()
        {
            return Err(at(&format!(
                "rate limit: keyed on claim {claim:?}, but the rule checks no bearer token"
            )));
        }
        Ok(Self {
            total_weight: spec.backends.iter().map(|b| u64::from(b.weight)).sum(),
            rate_limit: spec.rate_limit.as_ref().map(|l| limiters.get(l)),
            jwt,
            spec: spec.clone(),
            path,
            method,
            headers,
            query,
        })
    }

    /// Whether the request matches every condition.
    fn matches(&self, method: &Method, uri: &Uri, headers: &HeaderMap) -> bool {
        let path = uri.path();
        let path_ok = match &self.path {
            None => true,
            Some(Path::Exact(p)) => path == p,
            Some(Path::Prefix(p)) => {
                p == "/"
                    || path
                        .strip_prefix(p.as_str())
                        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
            }
            Some(Path::Regex(r)) => r.is_match(path),
        };
        if !path_ok || self.method.as_ref().is_some_and(|m| m != method) {
            return false;
        }
        let headers_ok = self.headers.iter().all(|h| {
            // Several values of one header are one comma-joined value.
            let values: Vec<&str> = headers
                .get_all(h.name.as_str())
                .iter()
                .filter_map(|v| v.to_str().ok())
                .collect();
            !values.is_empty() && h.matcher.matches(&values.join(","))
        });
        if !headers_ok {
            return false;
        }
        self.query.iter().all(|q| {
            // The first value of a repeated parameter is the one matched.
            query_value(uri.query().unwrap_or(""), &q.name).is_some_and(|v| q.matcher.matches(&v))
        })
    }

    /// The prefix this rule's path matched, for `ReplacePrefixMatch`.
    pub fn matched_prefix(&self) -> Option<&str> {
        match &self.path {
            Some(Path::Prefix(p)) => Some(p),
            _ => None,
        }
    }

    /// The backend for a draw in `0..total_weight`.
    pub fn backend(&self, draw: u64) -> Option<&Backend> {
        let mut left = draw;
        self.spec
            .backends
            .iter()
            .filter(|b| b.weight > 0)
            .find(|b| {
                if left < u64::from(b.weight) {
                    true
                } else {
                    left -= u64::from(b.weight);
                    false
                }
            })
    }
}

/// The first value of query parameter `name`, percent-decoded.
fn query_value(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let k = percent_encoding::percent_decode_str(k).decode_utf8().ok()?;
        (k == name).then(|| {
            percent_encoding::percent_decode_str(v)
                .decode_utf8_lossy()
                .into_owned()
        })
    })
}

impl Host {
    fn compile(vhost: &VirtualHost, limiters: &Limiters) -> Result<Self, String> {
        Ok(Self {
            rules: vhost
                .rules
                .iter()
                .map(|r| Rule::compile(r, limiters))
                .collect::<Result<_, _>>()?,
        })
    }

    /// The first rule matching the request.
    pub fn rule(&self, method: &Method, uri: &Uri, headers: &HeaderMap) -> Option<&Rule> {
        self.rules.iter().find(|r| r.matches(method, uri, headers))
    }
}

impl PortRoutes {
    /// Compiles a port's virtual hosts; their rate limits come from
    /// `limiters`, so an unchanged limit keeps its buckets.
    pub fn compile(port: &PortConfig, limiters: &Limiters) -> Result<Self, String> {
        let mut routes = Self::default();
        for vhost in &port.hosts {
            let host = Host::compile(vhost, limiters)?;
            match vhost.hostname.as_deref().map(str::to_ascii_lowercase) {
                None => routes.any = Some(host),
                Some(h) => match h.strip_prefix('*') {
                    Some(suffix) => routes.wildcards.push((suffix.to_owned(), host)),
                    None => {
                        routes.exact.insert(h, host);
                    }
                },
            }
        }
        routes
            .wildcards
            .sort_by_key(|w| std::cmp::Reverse(w.0.len()));
        Ok(routes)
    }

    /// The most specific virtual host for `host` (lower case, no port):
    /// an exact name, then the longest wildcard, then the catch-all.
    pub fn host(&self, host: &str) -> Option<&Host> {
        self.exact
            .get(host)
            .or_else(|| {
                self.wildcards
                    .iter()
                    .find(|(suffix, _)| {
                        host.len() > suffix.len() && host.ends_with(suffix.as_str())
                    })
                    .map(|(_, h)| h)
            })
            .or(self.any.as_ref())
    }
}

#[cfg(test)]
mod tests {
    use trellis_policy::gateway::BackendService;

    use super::*;

    fn rule(route: &str, matches: RequestMatch) -> RouteRule {
        RouteRule {
            route: route.into(),
            matches,
            filters: vec![],
            backends: vec![],
            timeout_ms: None,
            backend_timeout_ms: None,
            jwt: None,
            rate_limit: None,
        }
    }

    fn prefix(p: &str) -> RequestMatch {
        RequestMatch {
            path: Some(PathMatch::Prefix(p.into())),
            ..RequestMatch::default()
        }
    }

    fn table(hosts: Vec<(Option<&str>, Vec<RouteRule>)>) -> PortRoutes {
        PortRoutes::compile(
            &PortConfig {
                port: 80,
                certificates: vec![],
                hosts: hosts
                    .into_iter()
                    .map(|(h, rules)| VirtualHost {
                        hostname: h.map(Into::into),
                        rules,
                    })
                    .collect(),
            },
            &Limiters::default(),
        )
        .unwrap()
    }

    fn route_of(t: &PortRoutes, host: &str, uri: &str, headers: &[(&str, &str)]) -> Option<String> {
        let uri: Uri = uri.parse().unwrap();
        let mut map = HeaderMap::new();
        for (k, v) in headers {
            map.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        t.host(host)?
            .rule(&Method::GET, &uri, &map)
            .map(|r| r.spec.route.clone())
    }

    #[test]
    fn a_prefix_matches_whole_segments() {
        let t = table(vec![(None, vec![rule("foo", prefix("/foo/"))])]);
        assert_eq!(route_of(&t, "x", "/foo", &[]).as_deref(), Some("foo"));
        assert_eq!(route_of(&t, "x", "/foo/bar", &[]).as_deref(), Some("foo"));
        assert_eq!(route_of(&t, "x", "/foobar", &[]), None);
    }

    #[test]
    fn the_most_specific_host_wins_without_falling_back() {
        let t = table(vec![
            (None, vec![rule("any", prefix("/"))]),
            (Some("*.example.com"), vec![rule("wild", prefix("/"))]),
            (Some("*.b.example.com"), vec![rule("longer", prefix("/"))]),
            (Some("a.example.com"), vec![rule("exact", prefix("/only"))]),
        ]);
        assert_eq!(
            route_of(&t, "c.example.com", "/", &[]).as_deref(),
            Some("wild")
        );
        assert_eq!(
            route_of(&t, "x.b.example.com", "/", &[]).as_deref(),
            Some("longer")
        );
        assert_eq!(
            route_of(&t, "example.com", "/", &[]).as_deref(),
            Some("any")
        );
        assert_eq!(
            route_of(&t, "a.example.com", "/only", &[]).as_deref(),
            Some("exact")
        );
        // The exact host has rules, none of which match: 404, not the wildcard.
        assert_eq!(route_of(&t, "a.example.com", "/", &[]), None);
    }

    #[test]
    fn headers_and_query_parameters_match_exactly_or_by_pattern() {
        let m = RequestMatch {
            headers: vec![ValueMatch {
                name: "Version".into(),
                value: "two".into(),
                regex: false,
            }],
            query: vec![ValueMatch {
                name: "animal".into(),
                value: "wh.*".into(),
                regex: true,
            }],
            ..RequestMatch::default()
        };
        let t = table(vec![(None, vec![rule("both", m)])]);
        assert_eq!(
            route_of(&t, "x", "/?animal=whale", &[("version", "two")]).as_deref(),
            Some("both")
        );
        assert_eq!(
            route_of(&t, "x", "/?animal=dolphin", &[("version", "two")]),
            None
        );
        assert_eq!(
            route_of(&t, "x", "/?animal=whale", &[("version", "one")]),
            None
        );
        assert_eq!(route_of(&t, "x", "/?animal=whale", &[]), None);
    }

    #[test]
    fn a_bad_pattern_refuses_the_table_and_names_the_route() {
        let m = RequestMatch {
            path: Some(PathMatch::RegularExpression("([".into())),
            ..RequestMatch::default()
        };
        let err = PortRoutes::compile(
            &PortConfig {
                port: 80,
                certificates: vec![],
                hosts: vec![VirtualHost {
                    hostname: None,
                    rules: vec![rule("HTTPRoute/ns/broken", m)],
                }],
            },
            &Limiters::default(),
        )
        .unwrap_err();
        assert!(err.contains("HTTPRoute/ns/broken path"), "{err}");
    }

    #[test]
    fn a_limit_on_a_claim_needs_a_token_check_and_rules_share_a_limit() {
        use trellis_policy::gateway::RateLimitRule;
        let limit = |key| RateLimitRule {
            id: "EdgePolicy/ns/p".into(),
            per_second: 1,
            burst: 1,
            key,
        };
        let limiters = Limiters::default();
        let mut spec = rule("HTTPRoute/ns/r", prefix("/"));
        spec.rate_limit = Some(limit(RateLimitKey::Claim("sub".into())));
        let err = Rule::compile(&spec, &limiters).unwrap_err();
        assert!(
            err.contains("HTTPRoute/ns/r rate limit: keyed on claim \"sub\""),
            "{err}"
        );
        spec.rate_limit = Some(limit(RateLimitKey::ClientAddress));
        let one = Rule::compile(&spec, &limiters).unwrap();
        let two = Rule::compile(&spec, &limiters).unwrap();
        assert!(Arc::ptr_eq(
            one.rate_limit.as_ref().unwrap(),
            two.rate_limit.as_ref().unwrap()
        ));
    }

    #[test]
    fn weights_split_the_draws() {
        let backend = |name: &str, weight| Backend {
            service: Some(BackendService {
                name: name.into(),
                namespace: "ns".into(),
                port: 8080,
                h2c: false,
            }),
            weight,
            filters: vec![],
        };
        let mut spec = rule("w", prefix("/"));
        spec.backends = vec![backend("a", 1), backend("zero", 0), backend("b", 3)];
        let r = Rule::compile(&spec, &Limiters::default()).unwrap();
        assert_eq!(r.total_weight, 4);
        let names: Vec<_> = (0..4)
            .map(|d| r.backend(d).unwrap().service.as_ref().unwrap().name.clone())
            .collect();
        assert_eq!(names, ["a", "b", "b", "b"]);
    }
}
