//! What route filters do to a request and its response: header changes,
//! redirects and rewrites, as the Gateway API specifies them.

use http::{
    HeaderMap, HeaderName, HeaderValue, Response, StatusCode, Uri, header, uri::PathAndQuery,
};
use trellis_policy::gateway::{HeaderModifier, PathRewrite, Redirect};

use crate::http::{Body, full};

/// Applies set, then add, then remove. Names or values that are not valid
/// HTTP were refused by the operator; any that get here are skipped.
pub fn modify_headers(headers: &mut HeaderMap, m: &HeaderModifier) {
    for (name, value) in &m.set {
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            headers.insert(n, v);
        }
    }
    for (name, value) in &m.add {
        let Ok(n) = HeaderName::from_bytes(name.as_bytes()) else {
            continue;
        };
        // "Add" joins the value to what is there, as one header line.
        let joined = match headers.get(&n).and_then(|v| v.to_str().ok()) {
            Some(old) => format!("{old},{value}"),
            None => value.clone(),
        };
        if let Ok(v) = HeaderValue::from_str(&joined) {
            headers.insert(n, v);
        }
    }
    for name in &m.remove {
        if let Ok(n) = HeaderName::from_bytes(name.as_bytes()) {
            headers.remove(n);
        }
    }
}

/// The path after a rewrite; `matched` is the prefix the rule matched
/// (without a trailing slash, `/` for everything).
pub fn rewrite_path(path: &str, rewrite: &PathRewrite, matched: Option<&str>) -> String {
    match rewrite {
        PathRewrite::ReplaceFullPath(p) => p.clone(),
        PathRewrite::ReplacePrefixMatch(replacement) => {
            let rest = match matched {
                Some("/") => path,
                Some(prefix) => path.strip_prefix(prefix).unwrap_or(path),
                None => path,
            };
            let replacement = replacement.trim_end_matches('/');
            match (replacement.is_empty(), rest.is_empty()) {
                (true, true) => "/".into(),
                (true, false) if rest.starts_with('/') => rest.into(),
                (true, false) => format!("/{rest}"),
                (false, _) if rest.is_empty() || rest.starts_with('/') => {
                    format!("{replacement}{rest}")
                }
                (false, _) => format!("{replacement}/{rest}"),
            }
        }
    }
}

/// `uri` with its path replaced, the query kept.
pub fn with_path(uri: &Uri, path: &str) -> Uri {
    let pq = match uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path.to_owned(),
    };
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = PathAndQuery::try_from(pq).ok().or(parts.path_and_query);
    Uri::from_parts(parts).unwrap_or_else(|_| uri.clone())
}

/// Where a request is redirected to.
pub struct RedirectFrom<'a> {
    /// `http` or `https`: the listener's.
    pub scheme: &'a str,
    /// The request's host, without its port.
    pub host: &'a str,
    /// The listener's port.
    pub port: u16,
    /// The request's path and query.
    pub uri: &'a Uri,
    /// The prefix the rule matched.
    pub matched: Option<&'a str>,
}

/// The redirect response. The port is the configured one; or the scheme's
/// well-known port when the scheme changes; or the listener's. It is left
/// out of `Location` when it is the scheme's well-known port.
pub fn redirect(r: &Redirect, from: &RedirectFrom<'_>) -> Response<Body> {
    let scheme = r.scheme.as_deref().unwrap_or(from.scheme);
    let host = r.hostname.as_deref().unwrap_or(from.host);
    let well_known = if scheme == "https" { 443 } else { 80 };
    let port = match (r.port, &r.scheme) {
        (Some(p), _) => p,
        (None, Some(_)) => well_known,
        (None, None) => from.port,
    };
    let path = match &r.path {
        Some(rw) => rewrite_path(from.uri.path(), rw, from.matched),
        None => from.uri.path().to_owned(),
    };
    let mut location = if port == well_known {
        format!("{scheme}://{host}{path}")
    } else {
        format!("{scheme}://{host}:{port}{path}")
    };
    if let Some(q) = from.uri.query() {
        location.push('?');
        location.push_str(q);
    }
    let mut rsp = Response::new(full(""));
    *rsp.status_mut() = StatusCode::from_u16(r.status).unwrap_or(StatusCode::MOVED_PERMANENTLY);
    if let Ok(v) = HeaderValue::from_str(&location) {
        rsp.headers_mut().insert(header::LOCATION, v);
    }
    rsp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loc(r: &Redirect, scheme: &str, port: u16, uri: &str, matched: Option<&str>) -> String {
        let uri: Uri = uri.parse().unwrap();
        let rsp = redirect(
            r,
            &RedirectFrom {
                scheme,
                host: "example.org",
                port,
                uri: &uri,
                matched,
            },
        );
        rsp.headers()[header::LOCATION].to_str().unwrap().to_owned()
    }

    #[test]
    fn a_redirect_keeps_what_it_does_not_change_and_hides_well_known_ports() {
        let to_https = Redirect {
            scheme: Some("https".into()),
            ..Redirect::default()
        };
        assert_eq!(
            loc(&to_https, "http", 80, "/a?b=c", None),
            "https://example.org/a?b=c"
        );
        assert_eq!(
            loc(&to_https, "http", 8080, "/a", None),
            "https://example.org/a"
        );
        let host = Redirect {
            hostname: Some("other.org".into()),
            ..Redirect::default()
        };
        assert_eq!(
            loc(&host, "http", 8080, "/", None),
            "http://other.org:8080/"
        );
        let port = Redirect {
            port: Some(8443),
            scheme: Some("https".into()),
            status: 302,
            ..Redirect::default()
        };
        assert_eq!(
            loc(&port, "http", 80, "/", None),
            "https://example.org:8443/"
        );
    }

    #[test]
    fn a_prefix_rewrite_replaces_only_the_matched_segments() {
        let p = |s: &str| PathRewrite::ReplacePrefixMatch(s.into());
        assert_eq!(
            rewrite_path("/prefix/one/two", &p("/one"), Some("/prefix")),
            "/one/one/two"
        );
        assert_eq!(rewrite_path("/prefix", &p("/one"), Some("/prefix")), "/one");
        assert_eq!(
            rewrite_path("/prefix/two", &p("/"), Some("/prefix")),
            "/two"
        );
        assert_eq!(rewrite_path("/prefix", &p("/"), Some("/prefix")), "/");
        assert_eq!(rewrite_path("/x", &p("/one"), Some("/")), "/one/x");
        let full = PathRewrite::ReplaceFullPath("/full".into());
        assert_eq!(rewrite_path("/any/thing", &full, Some("/any")), "/full");
    }

    #[test]
    fn headers_are_set_then_added_then_removed() {
        let mut h = HeaderMap::new();
        h.insert("keep", "1".parse().unwrap());
        h.insert("add-to", "a".parse().unwrap());
        h.insert("gone", "x".parse().unwrap());
        modify_headers(
            &mut h,
            &HeaderModifier {
                set: vec![("keep".into(), "2".into())],
                add: vec![("add-to".into(), "b".into()), ("new".into(), "n".into())],
                remove: vec!["gone".into()],
            },
        );
        assert_eq!(h["keep"], "2");
        assert_eq!(h["add-to"], "a,b");
        assert_eq!(h["new"], "n");
        assert!(!h.contains_key("gone"));
    }
}
