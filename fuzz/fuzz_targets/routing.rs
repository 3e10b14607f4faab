//! The outbound router's target extraction on arbitrary request heads: the
//! bytes are parsed as hyper's server parses them (httparse), or taken as a
//! raw request target and Host value, and the sidecar must never panic. A
//! request it routes names a valid Service (DNS labels, and its fully
//! qualified name reads back to it); one it refuses is a 400 naming the authority. The
//! framing check and the per-dependency settings lookup run on it too.

#![no_main]

use http::{HeaderName, HeaderValue, Request, StatusCode, Uri};
use libfuzzer_sys::fuzz_target;
use trellis_policy::{SidecarPolicy, is_dns_label};
use trellis_sidecar::fuzzing::{NameRules, ProxyError, ServiceName, ServiceTarget, check_head};

fn rules() -> NameRules {
    NameRules {
        default_namespace: "shop".into(),
        cluster_domain: "cluster.local".into(),
    }
}

fn policy() -> SidecarPolicy {
    SidecarPolicy::from_json(
        r#"{"service": "order", "namespace": "shop", "appPort": 8080,
            "dependencies": [{"name": "user", "timeout": "1s"}, {"name": "product", "namespace": "catalog"}]}"#,
    )
    .expect("the fuzz target's policy is valid")
}

/// A request as hyper's HTTP/1.1 server would build it from `data`.
fn parse(data: &[u8]) -> Option<Request<()>> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    let httparse::Status::Complete(_) = req.parse(data).ok()? else {
        return None;
    };
    let mut b = Request::builder()
        .method(req.method?)
        .uri(Uri::try_from(req.path?).ok()?);
    for h in req.headers.iter() {
        b = b.header(
            HeaderName::from_bytes(h.name.as_bytes()).ok()?,
            HeaderValue::from_bytes(h.value).ok()?,
        );
    }
    b.body(()).ok()
}

/// A request from a raw target and Host value: `data` split at its first 0xFF.
fn raw(data: &[u8]) -> Option<Request<()>> {
    let (target, host) = match data.iter().position(|b| *b == 0xff) {
        Some(i) => (&data[..i], Some(&data[i + 1..])),
        None => (data, None),
    };
    let mut b = Request::get(Uri::try_from(target).ok()?);
    if let Some(host) = host {
        b = b.header(http::header::HOST, HeaderValue::from_bytes(host).ok()?);
    }
    b.body(()).ok()
}

fn check(req: &Request<()>, policy: &SidecarPolicy) {
    let r = rules();
    match r.target_of(req) {
        Ok(svc) => {
            assert!(
                is_dns_label(&svc.name) && is_dns_label(&svc.namespace),
                "routed to a name that is no Service: {svc:?}"
            );
            // The fully qualified form is the one that is never ambiguous
            // (`name.svc` could be a namespace called svc, or a short form).
            let fqdn = format!("{}.{}.svc.cluster.local", svc.name, svc.namespace);
            let again: ServiceName = r
                .parse_host(&fqdn)
                .unwrap_or_else(|e| panic!("{fqdn} does not read back: {e}"));
            assert_eq!(again, svc);
            let _ = ServiceTarget::new(svc, Some(policy), 1);
        }
        Err(e) => {
            assert!(
                matches!(e, ProxyError::NoAuthority | ProxyError::BadAuthority(_)),
                "an unexpected refusal: {e:?}"
            );
            assert_eq!(e.status(), StatusCode::BAD_REQUEST);
            assert!(!e.to_string().is_empty());
        }
    }
    if let Some(why) = check_head(req) {
        assert!(!why.is_empty());
    }
}

static POLICY: std::sync::OnceLock<SidecarPolicy> = std::sync::OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let policy = POLICY.get_or_init(policy);
    if let Some(req) = parse(data) {
        check(&req, policy);
    }
    if let Some(req) = raw(data) {
        check(&req, policy);
    }
});
