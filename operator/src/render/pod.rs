//! The pod spec of a MicroService's Deployment: the pod-level security
//! context, the two containers, the volumes they mount and how replicas
//! spread over nodes and zones. Separate because it is where the pod's
//! isolation is decided (no automounted API token, a restricted security
//! context, a token projected for the sidecar alone), apart from the
//! containers themselves and from the Deployment around the pod.

use k8s_openapi::{
    api::core::v1::{
        ConfigMapProjection, ConfigMapVolumeSource, DownwardAPIProjection, DownwardAPIVolumeFile,
        EmptyDirVolumeSource, KeyToPath, ObjectFieldSelector, PodSecurityContext, PodSpec,
        ProjectedVolumeSource, SeccompProfile, ServiceAccountTokenProjection,
        TopologySpreadConstraint, Volume, VolumeProjection,
    },
    apimachinery::pkg::{api::resource::Quantity, apis::meta::v1::LabelSelector},
};

use super::{
    RUN_AS, Renderer, SPREAD_TOPOLOGY_KEYS, config_map_name, s, selector_labels, sidecar_name,
    strings,
};

impl Renderer<'_> {
    fn volumes(&self) -> Vec<Volume> {
        let config_map = |volume: &str, cm: String| Volume {
            name: s(volume),
            config_map: Some(ConfigMapVolumeSource {
                name: cm,
                ..ConfigMapVolumeSource::default()
            }),
            ..Volume::default()
        };
        let empty_dir = |volume: &str| Volume {
            name: s(volume),
            empty_dir: Some(EmptyDirVolumeSource {
                size_limit: Some(Quantity(s("64Mi"))),
                ..EmptyDirVolumeSource::default()
            }),
            ..Volume::default()
        };
        // What the kubelet would automount, for the sidecar alone.
        let token = Volume {
            name: s("sidecar-token"),
            projected: Some(ProjectedVolumeSource {
                default_mode: Some(0o444),
                sources: Some(vec![
                    VolumeProjection {
                        service_account_token: Some(ServiceAccountTokenProjection {
                            path: s("token"),
                            expiration_seconds: Some(3607),
                            ..ServiceAccountTokenProjection::default()
                        }),
                        ..VolumeProjection::default()
                    },
                    VolumeProjection {
                        config_map: Some(ConfigMapProjection {
                            name: s("kube-root-ca.crt"),
                            items: Some(vec![KeyToPath {
                                key: s("ca.crt"),
                                path: s("ca.crt"),
                                ..KeyToPath::default()
                            }]),
                            ..ConfigMapProjection::default()
                        }),
                        ..VolumeProjection::default()
                    },
                    VolumeProjection {
                        downward_api: Some(DownwardAPIProjection {
                            items: Some(vec![DownwardAPIVolumeFile {
                                path: s("namespace"),
                                field_ref: Some(ObjectFieldSelector {
                                    field_path: s("metadata.namespace"),
                                    ..ObjectFieldSelector::default()
                                }),
                                ..DownwardAPIVolumeFile::default()
                            }]),
                        }),
                        ..VolumeProjection::default()
                    },
                ]),
            }),
            ..Volume::default()
        };
        let mut volumes = vec![
            config_map("config", config_map_name(&self.name)),
            config_map("policy", sidecar_name(&self.name)),
            empty_dir("app-tmp"),
            empty_dir("sidecar-tmp"),
            token,
        ];
        if self.cfg.mesh.is_some() {
            volumes.push(identity_token());
        }
        volumes.extend(self.secret_volumes());
        volumes
    }

    pub(super) fn pod_spec(&self) -> PodSpec {
        PodSpec {
            service_account_name: Some(self.name.clone()),
            // The app gets no API token; the sidecar gets one through its own mount.
            automount_service_account_token: Some(false),
            enable_service_links: Some(false),
            security_context: Some(PodSecurityContext {
                run_as_non_root: Some(true),
                run_as_user: Some(RUN_AS),
                run_as_group: Some(RUN_AS),
                // The group of the mounted Secrets' files, which are 0440:
                // the app's own group, so the app reads them.
                fs_group: Some(RUN_AS),
                seccomp_profile: Some(SeccompProfile {
                    type_: s("RuntimeDefault"),
                    ..SeccompProfile::default()
                }),
                ..PodSecurityContext::default()
            }),
            init_containers: Some(vec![self.sidecar()]),
            containers: vec![self.app()],
            volumes: Some(self.volumes()),
            topology_spread_constraints: Some(self.spread()),
            ..PodSpec::default()
        }
    }

    /// One replica per node and per zone as far as they go, as a preference
    /// (`ScheduleAnyway`), so a single-node cluster still runs every replica.
    /// Counted per ReplicaSet (`pod-template-hash`), so a rollout's new pods
    /// spread among themselves rather than around the old ones.
    fn spread(&self) -> Vec<TopologySpreadConstraint> {
        SPREAD_TOPOLOGY_KEYS
            .iter()
            .map(|key| TopologySpreadConstraint {
                max_skew: 1,
                topology_key: s(key),
                when_unsatisfiable: s("ScheduleAnyway"),
                label_selector: Some(LabelSelector {
                    match_labels: Some(selector_labels(&self.name)),
                    ..LabelSelector::default()
                }),
                match_label_keys: Some(strings(&["pod-template-hash"])),
                ..TopologySpreadConstraint::default()
            })
            .collect()
    }
}

/// Where the sidecar reads the token it proves its identity with.
pub const IDENTITY_TOKEN_DIR: &str = "/var/run/secrets/trellis/identity";

/// A ServiceAccount token for the identity service's audience alone, so
/// it is no good against the Kubernetes API (and the API token no good
/// for a certificate). The kubelet rotates it; the sidecar re-reads it.
fn identity_token() -> Volume {
    Volume {
        name: s("identity-token"),
        projected: Some(ProjectedVolumeSource {
            default_mode: Some(0o444),
            sources: Some(vec![VolumeProjection {
                service_account_token: Some(ServiceAccountTokenProjection {
                    path: s("token"),
                    audience: Some(s(trellis_identity::api::TOKEN_AUDIENCE)),
                    expiration_seconds: Some(3600),
                }),
                ..VolumeProjection::default()
            }]),
        }),
        ..Volume::default()
    }
}
