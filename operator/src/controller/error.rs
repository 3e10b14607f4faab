//! Why a reconcile fails, and how each failure is told to a person: one
//! sentence for the condition and the Warning event.

use super::*;

/// Why a reconcile failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The apiserver refused or could not be reached; retried with backoff.
    #[error("Kubernetes API error: {0}")]
    Kube(#[from] kube::Error),
    /// Objects with a child's name exist and are not controlled by this MicroService.
    #[error(
        "{} already exist{} and {} not owned by this MicroService; the operator leaves {} alone. Delete or rename {}, or rename the MicroService",
        .0.join(", "),
        if .0.len() == 1 { "s" } else { "" },
        if .0.len() == 1 { "is" } else { "are" },
        if .0.len() == 1 { "it" } else { "them" },
        if .0.len() == 1 { "it" } else { "them" },
    )]
    NameCollision(Vec<String>),
    /// The MicroService cannot be rendered (e.g. it depends on itself).
    #[error(transparent)]
    Render(#[from] RenderError),
    /// Secrets that `spec.secrets` lists do not exist (in the MicroService's
    /// namespace); nothing is applied until they do, and the watch of
    /// Secrets brings the MicroService back when one is created.
    #[error(
        "Secret{} {}, listed in spec.secrets, do{} not exist in namespace {namespace}; create {} (kubectl create secret generic -n {namespace} ...) or remove {} from spec.secrets. Nothing is applied until then; running pods keep running",
        if .names.len() == 1 { "" } else { "s" },
        .names.join(", "),
        if .names.len() == 1 { "es" } else { "" },
        if .names.len() == 1 { "it" } else { "them" },
        if .names.len() == 1 { "it" } else { "them" },
    )]
    SecretMissing {
        /// The MicroService's namespace, where the Secrets must be.
        namespace: String,
        /// The missing Secrets' names.
        names: Vec<String>,
    },
    /// Namespaces that dependencies name do not exist (yet); retried with backoff.
    #[error(
        "dependency namespace{} {} do{} not exist yet, so the sidecar cannot read the EndpointSlices there; the operator grants that read once {} created",
        if .0.len() == 1 { "" } else { "s" },
        .0.join(", "),
        if .0.len() == 1 { "es" } else { "" },
        if .0.len() == 1 { "it is" } else { "they are" },
    )]
    DependencyNamespaceMissing(Vec<String>),
    /// A namespaced operator cannot grant reads outside its namespace.
    #[error(
        "dependency namespace{} {} {} outside the namespace this operator watches ({watched}), so it cannot let the sidecar read the EndpointSlices there; install the operator for all namespaces (empty watchNamespace) or grant that read yourself",
        if .namespaces.len() == 1 { "" } else { "s" },
        .namespaces.join(", "),
        if .namespaces.len() == 1 { "is" } else { "are" },
    )]
    DependencyOutOfScope {
        /// The dependencies' namespaces.
        namespaces: Vec<String>,
        /// The namespace the operator watches.
        watched: String,
    },
}

impl Error {
    /// The `error` label of the error metric and the reason of the condition.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Kube(_) => "ApiError",
            Error::NameCollision(_) => "NameCollision",
            Error::Render(_) => "InvalidSpec",
            Error::DependencyNamespaceMissing(_) => "DependencyNamespaceMissing",
            Error::DependencyOutOfScope { .. } => "DependencyOutOfScope",
            Error::SecretMissing { .. } => "SecretMissing",
        }
    }

    /// The reason and message for the ReconcileFailed condition and the
    /// Warning event: one sentence of at most [`status::MAX_MESSAGE`]
    /// characters saying what is wrong, naming the object or field, and what
    /// to do (or that the operator retries).
    pub fn failure(&self) -> Failure {
        let (reason, message) = match self {
            Error::Kube(e) => api_failure(e),
            Error::NameCollision(_)
            | Error::SecretMissing { .. }
            | Error::DependencyNamespaceMissing(_)
            | Error::DependencyOutOfScope { .. } => {
                (self.reason(), status::fit("", &self.to_string(), "."))
            }
            Error::Render(RenderError::Invalid(fields)) => {
                ("InvalidSpec", status::field_errors(fields))
            }
            Error::Render(e) => (
                "InvalidSpec",
                status::fit(
                    "",
                    &e.to_string(),
                    ". Fix the MicroService and apply it again.",
                ),
            ),
        };
        Failure {
            reason: reason.into(),
            message,
        }
    }

    /// Errors retrying cannot fix without a change by someone.
    pub(super) fn is_permanent(&self) -> bool {
        !matches!(self, Error::Kube(_) | Error::DependencyNamespaceMissing(_))
    }
}

/// The reason and message for an error from the Kubernetes API, by its kind:
/// refused (fix the MicroService), forbidden (fix the operator's RBAC), or
/// failed or unreachable (the operator retries).
fn api_failure(e: &kube::Error) -> (&'static str, String) {
    const RETRIES: &str = "); the operator retries with backoff.";
    match e {
        kube::Error::Api(s) if s.code == 403 => (
            "ApiForbidden",
            status::fit(
                "",
                &s.message,
                ". Grant the operator's ServiceAccount that permission (charts/trellis \
                 templates/rbac.yaml).",
            ),
        ),
        kube::Error::Api(s) if s.code == 409 => (
            "ApiConflict",
            status::fit("The apiserver reported a conflict (", &s.message, RETRIES),
        ),
        kube::Error::Api(s) if s.code == 429 || s.code >= 500 || s.code == 0 => (
            "ApiUnavailable",
            status::fit(
                &format!("The Kubernetes API failed ({} {}: ", s.code, s.reason),
                &s.message,
                RETRIES,
            ),
        ),
        kube::Error::Api(s) => {
            let details = s.details.as_ref();
            let object = details
                .filter(|d| !d.kind.is_empty() && !d.name.is_empty())
                .map_or_else(
                    || "a child object".to_owned(),
                    |d| format!("{} {}", d.kind, d.name),
                );
            let causes: Vec<String> = details
                .map(|d| d.causes.as_slice())
                .unwrap_or_default()
                .iter()
                .map(|c| {
                    if c.field.is_empty() {
                        c.message.clone()
                    } else {
                        format!("{}: {}", c.field, c.message)
                    }
                })
                .collect();
            let what = if causes.is_empty() {
                s.message.clone()
            } else {
                causes.join("; ")
            };
            (
                "ApiRefused",
                status::fit(
                    &format!("The apiserver refused {object}: "),
                    &what,
                    ". Fix the MicroService field it comes from and apply it again.",
                ),
            )
        }
        kube::Error::HyperError(_) | kube::Error::Service(_) => (
            "ApiUnavailable",
            status::fit(
                "The Kubernetes API could not be reached (",
                &e.to_string(),
                RETRIES,
            ),
        ),
        _ => (
            "ApiUnavailable",
            status::fit("The Kubernetes API call failed (", &e.to_string(), RETRIES),
        ),
    }
}

/// What to do when the first list of MicroServices fails, by its cause.
pub(super) fn list_failure_hint(e: &kube::Error) -> &'static str {
    match e {
        kube::Error::Api(s) if s.code == 403 => {
            "the operator's ServiceAccount may not list them: check its (Cluster)Role and \
             binding; with `--watch-namespace` the namespace must exist before `helm install` \
             puts the Role in it"
        }
        kube::Error::Api(s) if s.code == 404 => {
            "the CRD is not installed: `kubectl apply -f crds/microservice.yaml`"
        }
        _ => "is the API reachable and the CRD installed?",
    }
}
