use super::{error::list_failure_hint, *};

#[test]
fn backoff_grows_and_caps() {
    assert_eq!(backoff(1, 1.0), Duration::from_secs(1));
    assert_eq!(backoff(2, 1.0), Duration::from_secs(2));
    assert_eq!(backoff(5, 1.0), Duration::from_secs(16));
    assert_eq!(backoff(50, 1.0), MAX_RETRY_DELAY);
    assert_eq!(backoff(3, 0.75), Duration::from_secs(3));
}

#[test]
fn a_failed_first_list_says_what_to_fix() {
    let api = |code| {
        kube::Error::Api(Box::new(kube::core::Status {
            code,
            ..Default::default()
        }))
    };
    assert!(list_failure_hint(&api(403)).contains("ServiceAccount may not list"));
    assert!(list_failure_hint(&api(404)).contains("kubectl apply -f crds/microservice.yaml"));
    assert!(list_failure_hint(&api(500)).contains("reachable"));
}

/// The body a 1.34 apiserver returns when it refuses a Deployment.
fn refused_deployment() -> Error {
    let status: kube::core::Status = serde_json::from_value(serde_json::json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": "Deployment.apps \"order\" is invalid: \
            spec.template.spec.containers[0].resources.requests: Invalid value: \"2\": \
            must be less than or equal to cpu limit of 1500m",
        "reason": "Invalid",
        "details": {
            "name": "order",
            "group": "apps",
            "kind": "Deployment",
            "causes": [{
                "reason": "FieldValueInvalid",
                "message": "Invalid value: \"2\": must be less than or equal to cpu limit of 1500m",
                "field": "spec.template.spec.containers[0].resources.requests",
            }],
        },
        "code": 422,
    }))
    .unwrap();
    Error::Kube(kube::Error::Api(Box::new(status)))
}

fn assert_readable(m: &str) {
    assert!(
        m.chars().count() <= status::MAX_MESSAGE,
        "{} chars: {m}",
        m.chars().count()
    );
    for dump in [
        "Status {",
        "Some(",
        "ErrorResponse",
        "ApiError",
        "StatusCause",
    ] {
        assert!(!m.contains(dump), "{dump:?} in {m}");
    }
}

#[test]
fn an_api_refusal_names_the_object_and_field_in_one_short_sentence() {
    let f = refused_deployment().failure();
    assert_eq!(f.reason, "ApiRefused");
    assert_readable(&f.message);
    assert_eq!(
        f.message,
        "The apiserver refused Deployment order: \
         spec.template.spec.containers[0].resources.requests: Invalid value: \"2\": must be \
         less than or equal to cpu limit of 1500m. Fix the MicroService field it comes from \
         and apply it again."
    );
}

#[test]
fn an_unreachable_or_failing_api_says_the_operator_retries() {
    let unavailable: kube::core::Status = serde_json::from_value(serde_json::json!({
        "status": "Failure",
        "message": "the server is currently unable to handle the request",
        "reason": "ServiceUnavailable",
        "code": 503,
    }))
    .unwrap();
    let f = Error::Kube(kube::Error::Api(Box::new(unavailable))).failure();
    assert_eq!(f.reason, "ApiUnavailable");
    assert_readable(&f.message);
    assert_eq!(
        f.message,
        "The Kubernetes API failed (503 ServiceUnavailable: the server is currently unable \
         to handle the request); the operator retries with backoff."
    );
    let refused = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "x".repeat(400));
    let f = Error::Kube(kube::Error::Service(Box::new(refused))).failure();
    assert_eq!(f.reason, "ApiUnavailable");
    assert_readable(&f.message);
    assert!(
        f.message
            .starts_with("The Kubernetes API could not be reached (")
            && f.message
                .ends_with("…); the operator retries with backoff."),
        "{}",
        f.message
    );
}

#[test]
fn a_forbidden_request_points_at_the_operators_rbac() {
    let forbidden: kube::core::Status = serde_json::from_value(serde_json::json!({
        "status": "Failure",
        "message": "roles.rbac.authorization.k8s.io \"order-sidecar\" is forbidden: User \
            \"system:serviceaccount:trellis:trellis-operator\" cannot patch resource \
            \"roles\" in API group \"rbac.authorization.k8s.io\" in the namespace \"shop\"",
        "reason": "Forbidden",
        "details": {"name": "order-sidecar", "group": "rbac.authorization.k8s.io", "kind": "roles"},
        "code": 403,
    }))
    .unwrap();
    let f = Error::Kube(kube::Error::Api(Box::new(forbidden))).failure();
    assert_readable(&f.message);
    assert!(f.message.contains("cannot patch resource"), "{}", f.message);
    assert!(
        f.message.ends_with("Grant the operator's ServiceAccount that permission (charts/trellis templates/rbac.yaml)."),
        "{}",
        f.message
    );
}

#[test]
fn an_invalid_spec_names_the_fields_within_the_bound() {
    let many = (0..30)
        .map(|i| trellis_policy::FieldError {
            field: format!("spec.dependencies[{i}].timeout"),
            message: "must be more than zero, such as 1s".into(),
        })
        .collect();
    let f = Error::Render(RenderError::Invalid(many)).failure();
    assert_eq!(f.reason, "InvalidSpec");
    assert_readable(&f.message);
    assert!(
        f.message
            .starts_with("spec.dependencies[0].timeout: must be more than zero, such as 1s; "),
        "{}",
        f.message
    );
    assert!(
        f.message
            .ends_with(" more. Fix the MicroService and apply it again."),
        "{}",
        f.message
    );
    let one = vec![trellis_policy::FieldError {
        field: "spec.resilience.timeout".into(),
        message: "must be more than zero, such as 1s".into(),
    }];
    assert_eq!(
        Error::Render(RenderError::Invalid(one)).failure().message,
        "spec.resilience.timeout: must be more than zero, such as 1s. Fix the MicroService \
         and apply it again."
    );
}

#[test]
fn many_collisions_stay_within_the_bound() {
    let names = (0..20)
        .map(|i| format!("ConfigMap shop/order-{i}-config"))
        .collect();
    let f = Error::NameCollision(names).failure();
    assert_readable(&f.message);
    assert!(
        f.message.starts_with("ConfigMap shop/order-0-config, "),
        "{}",
        f.message
    );
}

#[test]
fn collision_message_names_the_objects() {
    let e = Error::NameCollision(vec!["ConfigMap shop/order-config".into()]);
    assert_eq!(
        e.to_string(),
        "ConfigMap shop/order-config already exists and is not owned by this MicroService; \
         the operator leaves it alone. Delete or rename it, or rename the MicroService"
    );
    assert_eq!(e.reason(), "NameCollision");
}
