//! The pod's two containers: the Trellis sidecar (a native sidecar) and the
//! application, with the pieces they share (the restricted security context,
//! probes on the sidecar's admin port, env vars, mounts). Only the app gets
//! the Secrets of `spec.secrets`; the sidecar never does. Separate because
//! each container is a contract with another program: the sidecar's ports,
//! env and probes are what the sidecar crate expects, and the app's env
//! (`PORT`, `HTTP_PROXY`, `TRELLIS_OUTBOUND`) is what every service relies on.

use std::collections::BTreeMap;

use k8s_openapi::{
    api::core::v1::{
        Capabilities, ConfigMapEnvSource, Container, ContainerPort, EnvFromSource, EnvVar,
        EnvVarSource, HTTPGetAction, ObjectFieldSelector, Probe, ResourceRequirements,
        SeccompProfile, SecurityContext, VolumeMount,
    },
    apimachinery::pkg::{api::resource::Quantity, util::intstr::IntOrString},
};

use super::{
    ADMIN_PORT, APP_CONTAINER, CONFIG_MOUNT, DEFAULT_APP_CPU_REQUEST, DEFAULT_APP_MEMORY_LIMIT,
    DEFAULT_APP_MEMORY_REQUEST, INBOUND_PORT, OUTBOUND_PORT, POLICY_MOUNT, RUN_AS, Renderer,
    SIDECAR_CONTAINER, config_map_name, image_version, s, sidecar_name, strings,
};

/// The application container's resources when `spec.resources` is unset:
/// [`DEFAULT_APP_CPU_REQUEST`], [`DEFAULT_APP_MEMORY_REQUEST`] and
/// [`DEFAULT_APP_MEMORY_LIMIT`].
pub fn default_app_resources() -> ResourceRequirements {
    ResourceRequirements {
        requests: Some(BTreeMap::from([
            (s("cpu"), Quantity(s(DEFAULT_APP_CPU_REQUEST))),
            (s("memory"), Quantity(s(DEFAULT_APP_MEMORY_REQUEST))),
        ])),
        limits: Some(BTreeMap::from([(
            s("memory"),
            Quantity(s(DEFAULT_APP_MEMORY_LIMIT)),
        )])),
        ..ResourceRequirements::default()
    }
}

/// The container security context of the restricted Pod Security level:
/// non-root, no privilege escalation, no capabilities, a read-only root,
/// the runtime's seccomp profile. Every container the operator renders
/// (the sidecar, the app, a gateway) runs with it.
pub fn restricted_security_context() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        capabilities: Some(Capabilities {
            drop: Some(strings(&["ALL"])),
            ..Capabilities::default()
        }),
        privileged: Some(false),
        read_only_root_filesystem: Some(true),
        run_as_non_root: Some(true),
        run_as_user: Some(RUN_AS),
        run_as_group: Some(RUN_AS),
        seccomp_profile: Some(SeccompProfile {
            type_: s("RuntimeDefault"),
            ..SeccompProfile::default()
        }),
        ..SecurityContext::default()
    }
}

/// An HTTP probe of `path` on the sidecar's admin port.
pub fn admin_probe(path: &str, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(s(path)),
            port: IntOrString::Int(ADMIN_PORT),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        timeout_seconds: Some(1),
        failure_threshold: Some(failures),
        ..Probe::default()
    }
}

/// An env var with a value.
pub fn env_var(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar {
        name: s(name),
        value: Some(value.into()),
        ..EnvVar::default()
    }
}

/// An env var from a field of the pod (`metadata.namespace`).
pub fn field_env(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: s(name),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: s(path),
                ..ObjectFieldSelector::default()
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }
}

impl Renderer<'_> {
    fn mount(name: &str, path: &str, read_only: bool) -> VolumeMount {
        VolumeMount {
            name: s(name),
            mount_path: s(path),
            read_only: read_only.then_some(true),
            ..VolumeMount::default()
        }
    }

    /// Who the sidecar serves and where its policy is; the trace endpoint and
    /// the version its spans carry when tracing is on.
    fn sidecar_env(&self) -> Vec<EnvVar> {
        let mut env = vec![
            env_var("TRELLIS_SERVICE", self.name.clone()),
            env_var("TRELLIS_POLICY_CONFIGMAP", sidecar_name(&self.name)),
            field_env("POD_NAMESPACE", "metadata.namespace"),
            field_env("POD_NAME", "metadata.name"),
        ];
        if let Some(endpoint) = &self.cfg.otlp_endpoint {
            env.push(env_var("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.clone()));
            if let Some(version) = image_version(&self.ms.spec.image) {
                env.push(env_var("TRELLIS_SERVICE_VERSION", version));
            }
        }
        env
    }

    fn sidecar_mounts(&self) -> Vec<VolumeMount> {
        let mut mounts = vec![
            Self::mount("policy", POLICY_MOUNT, true),
            Self::mount("sidecar-tmp", "/tmp", false),
            Self::mount(
                "sidecar-token",
                "/var/run/secrets/kubernetes.io/serviceaccount",
                true,
            ),
        ];
        if self.cfg.mesh.is_some() {
            mounts.push(Self::mount(
                "identity-token",
                super::pod::IDENTITY_TOKEN_DIR,
                true,
            ));
        }
        mounts
    }

    /// The sidecar, as a native sidecar (init container with `restartPolicy: Always`).
    ///
    /// Its startup probe is `/livez`, not `/readyz`: the app container starts
    /// only once the sidecar's startup probe passes, and `/readyz` includes the
    /// app's own health, so waiting on it would wait forever.
    pub(super) fn sidecar(&self) -> Container {
        Container {
            name: s(SIDECAR_CONTAINER),
            image: Some(self.cfg.sidecar_image.clone()),
            image_pull_policy: Some(s("IfNotPresent")),
            restart_policy: Some(s("Always")),
            ports: Some(vec![
                ContainerPort {
                    name: Some(s("inbound")),
                    container_port: INBOUND_PORT,
                    protocol: Some(s("TCP")),
                    ..ContainerPort::default()
                },
                ContainerPort {
                    name: Some(s("admin")),
                    container_port: ADMIN_PORT,
                    protocol: Some(s("TCP")),
                    ..ContainerPort::default()
                },
            ]),
            env: Some(self.sidecar_env()),
            startup_probe: Some(admin_probe("/livez", 1, 60)),
            readiness_probe: Some(admin_probe("/readyz", 5, 3)),
            liveness_probe: Some(admin_probe("/livez", 10, 3)),
            resources: Some(ResourceRequirements {
                requests: Some(BTreeMap::from([
                    (s("cpu"), Quantity(s("10m"))),
                    (s("memory"), Quantity(s("32Mi"))),
                ])),
                limits: Some(BTreeMap::from([(s("memory"), Quantity(s("256Mi")))])),
                ..ResourceRequirements::default()
            }),
            security_context: Some(restricted_security_context()),
            volume_mounts: Some(self.sidecar_mounts()),
            ..Container::default()
        }
    }

    pub(super) fn app(&self) -> Container {
        let outbound = format!("http://127.0.0.1:{OUTBOUND_PORT}");
        Container {
            name: s(APP_CONTAINER),
            image: Some(self.ms.spec.image.clone()),
            image_pull_policy: Some(s("IfNotPresent")),
            env: Some(vec![
                env_var("PORT", self.ms.spec.port.to_string()),
                env_var("HTTP_PROXY", outbound.clone()),
                env_var("TRELLIS_OUTBOUND", outbound),
                env_var("NO_PROXY", "localhost,127.0.0.1"),
            ]),
            // The config first, then the Secrets: a later source wins a
            // key both have, and `env` above wins over all of them.
            env_from: Some(
                std::iter::once(EnvFromSource {
                    config_map_ref: Some(ConfigMapEnvSource {
                        name: config_map_name(&self.name),
                        optional: Some(false),
                    }),
                    ..EnvFromSource::default()
                })
                .chain(self.secret_env_sources())
                .collect(),
            ),
            readiness_probe: Some(admin_probe("/readyz", 5, 3)),
            resources: Some(
                self.ms
                    .spec
                    .resources
                    .clone()
                    .unwrap_or_else(default_app_resources),
            ),
            security_context: Some(restricted_security_context()),
            volume_mounts: Some(
                std::iter::once(Self::mount("config", CONFIG_MOUNT, true))
                    .chain(self.secret_mounts())
                    .chain([Self::mount("app-tmp", "/tmp", false)])
                    .collect(),
            ),
            ..Container::default()
        }
    }
}
