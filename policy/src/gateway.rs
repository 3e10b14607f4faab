//! What one gateway's data plane serves: the operator flattens a `Gateway`
//! and the routes attached to it into a [`GatewayConfig`], and the sidecar,
//! run in gateway mode, serves it.
//!
//! The operator does the Gateway API's reasoning (which routes attach to
//! which listener, hostname intersection, reference grants, match
//! precedence); the data plane only looks things up. So a port holds
//! virtual hosts, a virtual host holds rules already in precedence order,
//! and the first rule that matches wins. A backend the operator could not
//! resolve stays in its rule, without a service, so the requests it would
//! have received get 500 as the specification requires, and the weights of
//! the others are not changed.
//!
//! The configuration holds TLS private keys, so the operator stores it in a
//! Secret, never a ConfigMap.

use serde::{Deserialize, Serialize};

use crate::SidecarPolicy;

/// The key under which the configuration is stored in the gateway's Secret.
pub const GATEWAY_CONFIG_KEY: &str = "gateway.json";

/// Everything one gateway serves.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GatewayConfig {
    /// The Gateway, as `namespace/name`.
    pub gateway: String,
    /// The gateway's policy as a mesh client: resilience defaults, tracing,
    /// its mesh identity, and every backend as a dependency.
    pub policy: SidecarPolicy,
    /// One entry per port the gateway listens on.
    #[serde(default)]
    pub ports: Vec<PortConfig>,
}

impl GatewayConfig {
    /// Parses a configuration.
    pub fn from_json(json: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(json)
    }

    /// The configuration as JSON, the form stored in the Secret.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a gateway configuration always serialises")
    }
}

/// One port and what it serves.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PortConfig {
    /// The port.
    pub port: u16,
    /// For HTTPS, the certificates to present, chosen by the client's SNI;
    /// empty for plain HTTP.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub certificates: Vec<Certificate>,
    /// The virtual hosts, each hostname once.
    #[serde(default)]
    pub hosts: Vec<VirtualHost>,
}

/// A certificate and its key, PEM, for the hostnames of one HTTPS listener.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Certificate {
    /// The listener's hostname (exact or `*.` wildcard); `None` for any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// The certificate chain, PEM.
    pub chain_pem: String,
    /// The private key, PEM.
    pub key_pem: String,
}

impl std::fmt::Debug for Certificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key: configurations are logged when refused.
        f.debug_struct("Certificate")
            .field("hostname", &self.hostname)
            .finish_non_exhaustive()
    }
}

/// The rules for requests whose host matches `hostname`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VirtualHost {
    /// An exact hostname, a `*.` wildcard, or `None` for any host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// The rules, in the Gateway API's precedence order: the first that
    /// matches a request serves it.
    #[serde(default)]
    pub rules: Vec<RouteRule>,
}

/// One match of one route rule, with what the rule does.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RouteRule {
    /// The route, as `kind/namespace/name`, for logs and metrics.
    pub route: String,
    /// What a request must look like.
    #[serde(default)]
    pub matches: RequestMatch,
    /// What is done to the request (and its response), in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub filters: Vec<Filter>,
    /// Where matching requests go, by weight. Empty with no redirect:
    /// the rule answers 500.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backends: Vec<Backend>,
    /// The whole request's deadline (the route's `timeouts.request`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// Each try's deadline towards a backend (`timeouts.backendRequest`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend_timeout_ms: Option<u64>,
    /// Bearer tokens the rule's requests must carry; `None` lets every
    /// request through unauthenticated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwt: Option<JwtRule>,
    /// A token bucket per client for the rule's requests; `None` limits
    /// nothing. Applied after the bearer token check, so a limit keyed on
    /// a claim reads a verified token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimitRule>,
}

/// A per-client rate limit: each client (by [`RateLimitKey`]) has its own
/// token bucket, refilled at `per_second` and holding at most
/// `max(burst, 1)` tokens. A request finding its bucket empty is answered
/// 429 with `Retry-After` by the gateway.
///
/// Rules that carry the same `id` and settings share their buckets (a
/// policy attached to a Gateway limits a client across all the rules it
/// governs), and the buckets outlive a new configuration while the id and
/// settings are unchanged.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RateLimitRule {
    /// Which limit this is, for sharing and metrics: the policy that set
    /// it, as `kind/namespace/name`.
    pub id: String,
    /// Tokens added to each bucket per second.
    pub per_second: u32,
    /// The most tokens a bucket holds: how many requests a client may
    /// send at once after being idle. At least 1 is used.
    pub burst: u32,
    /// What tells clients apart.
    #[serde(default)]
    pub key: RateLimitKey,
}

/// What a per-client rate limit keys its buckets on.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "type", content = "claim")]
pub enum RateLimitKey {
    /// The client's IP address, as the gateway's connection sees it.
    #[default]
    ClientAddress,
    /// A claim of the rule's verified bearer token (the rule must have a
    /// `jwt` check). A token without the claim is keyed on the client's
    /// address instead.
    Claim(String),
}

/// JWT authentication of a rule's requests: each must carry
/// `Authorization: Bearer <token>`, a JWT signed by a key of `jwks`, from
/// `issuer`, for one of `audiences`, within its validity period. The
/// gateway answers a request without a good token itself (401, or 403 for
/// a good token that lacks a required claim); the backend never sees it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JwtRule {
    /// The `iss` a token must carry, exactly.
    pub issuer: String,
    /// A token's `aud` must name at least one of these.
    pub audiences: Vec<String>,
    /// The issuer's public keys: a JSON Web Key Set (RFC 7517) as JSON
    /// text, as the operator reads it from a Secret or ConfigMap.
    pub jwks: String,
    /// Claims a valid token must also carry, as claim name and value: a
    /// string claim equal to the value or holding it as one of its
    /// space-separated words (an OAuth `scope`), or an array claim with
    /// it as an element. A valid token without one is refused with 403.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub required_claims: Vec<(String, String)>,
    /// Claims copied into request headers for the backend, as claim name
    /// and header name. A header of one of these names sent by the client
    /// is always removed first, so a client cannot forge it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub claims_to_headers: Vec<(String, String)>,
    /// How far the gateway's clock may be from the issuer's, in seconds,
    /// when `exp` and `nbf` are checked.
    #[serde(default = "default_clock_skew_secs")]
    pub clock_skew_secs: u64,
}

fn default_clock_skew_secs() -> u64 {
    60
}

/// The conditions of one match; all must hold.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RequestMatch {
    /// The path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathMatch>,
    /// The method, upper case.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// Headers, by name (case-insensitive).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<ValueMatch>,
    /// Query parameters, by name (case-sensitive).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub query: Vec<ValueMatch>,
}

/// How a path matches.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "type", content = "value")]
pub enum PathMatch {
    /// The whole path.
    Exact(String),
    /// Whole path segments: `/foo` matches `/foo` and `/foo/bar`, not `/foobar`.
    Prefix(String),
    /// A regular expression over the whole path.
    RegularExpression(String),
}

/// A named value that must equal `value`, or match it as a regular expression.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ValueMatch {
    /// The header or parameter name.
    pub name: String,
    /// The value.
    pub value: String,
    /// Whether `value` is a regular expression over the whole value.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub regex: bool,
}

/// What a rule (or a backend) does to a request or its response.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "type")]
pub enum Filter {
    /// Changes the request's headers.
    RequestHeaderModifier(HeaderModifier),
    /// Changes the response's headers.
    ResponseHeaderModifier(HeaderModifier),
    /// Answers with a redirect instead of forwarding.
    RequestRedirect(Redirect),
    /// Rewrites the host or path before forwarding.
    UrlRewrite(Rewrite),
}

/// Header changes, applied in the order set, add, remove.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HeaderModifier {
    /// Replaces the header's values.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub set: Vec<(String, String)>,
    /// Adds a value (comma-joined with what is there).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub add: Vec<(String, String)>,
    /// Removes the header.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remove: Vec<String>,
}

/// A redirect: each part left out keeps the request's own.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Redirect {
    /// `http` or `https`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheme: Option<String>,
    /// The host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// The path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathRewrite>,
    /// The port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// The status: 301 (the default), 302, 303, 307 or 308.
    #[serde(default = "moved_permanently")]
    pub status: u16,
}

fn moved_permanently() -> u16 {
    301
}

/// A rewrite of the request before it is forwarded.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Rewrite {
    /// The new host (`Host` / `:authority`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// The new path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathRewrite>,
}

/// A new path: the whole of it, or the part the rule's prefix matched.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "type", content = "value")]
pub enum PathRewrite {
    /// Replaces the whole path.
    ReplaceFullPath(String),
    /// Replaces the prefix the rule matched (the rule's path must be a prefix match).
    ReplacePrefixMatch(String),
}

/// One weighted destination of a rule.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Backend {
    /// The Service; `None` when the reference is invalid (not found, not
    /// permitted, not a Service): its share of requests gets 500.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<BackendService>,
    /// The share of requests, relative to the other backends.
    pub weight: u32,
    /// Filters for requests sent to this backend only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub filters: Vec<Filter>,
}

/// A Service and the port of it to send to.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BackendService {
    /// The Service's name.
    pub name: String,
    /// Its namespace.
    pub namespace: String,
    /// The Service port.
    pub port: u16,
    /// Whether the backend speaks HTTP/2 without TLS (gRPC, or a port whose
    /// `appProtocol` says `kubernetes.io/h2c`); otherwise HTTP/1.1.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub h2c: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_certificate_never_prints_its_key() {
        let c = Certificate {
            hostname: Some("shop.example".into()),
            chain_pem: "CHAIN".into(),
            key_pem: "SECRET-KEY".into(),
        };
        let shown = format!("{c:?}");
        assert!(shown.contains("shop.example"), "{shown}");
        assert!(!shown.contains("SECRET-KEY"), "{shown}");
    }

    #[test]
    fn round_trips_through_json() {
        let rule = RouteRule {
            route: "HTTPRoute/shop/api".into(),
            matches: RequestMatch {
                path: Some(PathMatch::Prefix("/api/v1/users".into())),
                method: Some("GET".into()),
                headers: vec![ValueMatch {
                    name: "x-version".into(),
                    value: "v[12]".into(),
                    regex: true,
                }],
                query: vec![],
            },
            filters: vec![Filter::RequestRedirect(Redirect {
                scheme: Some("https".into()),
                ..Redirect::default()
            })],
            backends: vec![Backend {
                service: None,
                weight: 1,
                filters: vec![],
            }],
            timeout_ms: Some(1500),
            backend_timeout_ms: None,
            jwt: Some(JwtRule {
                issuer: "https://issuer.example".into(),
                audiences: vec!["shop".into()],
                jwks: r#"{"keys":[]}"#.into(),
                required_claims: vec![("scope".into(), "orders:read".into())],
                claims_to_headers: vec![("sub".into(), "x-user".into())],
                clock_skew_secs: 60,
            }),
            rate_limit: Some(RateLimitRule {
                id: "EdgePolicy/shop/api".into(),
                per_second: 10,
                burst: 20,
                key: RateLimitKey::Claim("sub".into()),
            }),
        };
        let json = serde_json::to_string(&rule).unwrap();
        assert!(
            json.contains(r#""path":{"type":"prefix","value":"/api/v1/users"}"#),
            "{json}"
        );
        assert!(json.contains(r#""type":"requestRedirect""#), "{json}");
        let back: RouteRule = serde_json::from_str(&json).unwrap();
        assert_eq!(back, rule);
        assert!(
            json.contains(r#""claimsToHeaders":[["sub","x-user"]]"#),
            "{json}"
        );
        assert!(
            json.contains(r#""key":{"type":"claim","claim":"sub"}"#),
            "{json}"
        );
        let by_address: RateLimitRule =
            serde_json::from_str(r#"{"id": "x", "perSecond": 1, "burst": 2}"#).unwrap();
        assert_eq!(by_address.key, RateLimitKey::ClientAddress);
        let redirect: Redirect = serde_json::from_str("{}").unwrap();
        assert_eq!(redirect.status, 301, "a redirect without a status is 301");
    }

    #[test]
    fn a_jwt_rule_defaults_its_clock_skew_and_claim_lists() {
        let rule: JwtRule = serde_json::from_str(
            r#"{"issuer": "https://issuer.example", "audiences": ["shop"], "jwks": "{}"}"#,
        )
        .unwrap();
        assert_eq!(rule.clock_skew_secs, 60);
        assert!(rule.required_claims.is_empty() && rule.claims_to_headers.is_empty());
        let plain: RouteRule = serde_json::from_str(r#"{"route": "HTTPRoute/a/b"}"#).unwrap();
        assert_eq!(plain.jwt, None);
        assert_eq!(plain.rate_limit, None);
        let text = serde_json::to_string(&plain).unwrap();
        assert!(
            !text.contains("jwt") && !text.contains("rateLimit"),
            "{text}"
        );
    }
}
