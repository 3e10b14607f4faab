//! The configuration files of the cluster's components, rendered from one set of constants.

use std::path::Path;

use super::network::{BRIDGE, CLUSTER_CIDR, NODE_IP, POD_SUBNET};
use crate::paths;

/// The node's name.
pub const NODE_NAME: &str = "trellis";
/// The apiserver's secure port.
pub const API_PORT: u16 = 6443;
/// The local image every pod sandbox runs (built by `cargo xtask images`).
pub const PAUSE_IMAGE: &str = "docker.io/trellis/pause:0.1.0";

/// A kubeconfig for one client identity whose certificate is `pki/<file>.crt`.
pub fn kubeconfig(pki: &Path, file: &str, server: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: Config
clusters:
- name: trellis
  cluster:
    server: {server}
    certificate-authority: {ca}
users:
- name: {file}
  user:
    client-certificate: {pki}/{file}.crt
    client-key: {pki}/{file}.key
contexts:
- name: trellis
  context:
    cluster: trellis
    user: {file}
current-context: trellis
"#,
        ca = pki.join("ca.crt").display(),
        pki = pki.display(),
    )
}

/// containerd's configuration: its own root, state and socket, so it never meets
/// another containerd on the machine; CRI with runc, cgroupfs and our CNI folder.
pub fn containerd(state: &Path) -> String {
    format!(
        r#"version = 2
root = "{root}"
state = "{run}/state"

[grpc]
  address = "{socket}"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  enable_selinux = false
  # This machine withholds CAP_SYS_RESOURCE even from root, so no process may lower its
  # oom_score_adj; the sandbox's -998 would make runc fail ("failed to update
  # /proc/self/oom_score_adj"). Cap every container's value at containerd's own instead.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{cni}"
"#,
        root = state.join("containerd").display(),
        run = paths::run_dir().join("containerd").display(),
        socket = paths::containerd_socket().display(),
        cni = state.join("cni/net.d").display(),
    )
}

/// The CNI network: one bridge, host-local addresses, no masquerading (nothing leaves).
pub fn cni(state: &Path) -> String {
    serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "trellis",
        "plugins": [{
            "type": "bridge",
            "bridge": BRIDGE,
            "isGateway": true,
            "ipMasq": false,
            "hairpinMode": true,
            "ipam": {
                "type": "host-local",
                "ranges": [[{ "subnet": POD_SUBNET, "gateway": NODE_IP }]],
                "routes": [{ "dst": "0.0.0.0/0" }],
                "dataDir": state.join("cni/ipam").display().to_string(),
            }
        }]
    })
    .to_string()
}

/// The kubelet's configuration file.
pub fn kubelet(state: &Path) -> String {
    let pki = state.join("pki");
    format!(
        r#"apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: {NODE_IP}
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
authentication:
  anonymous: {{ enabled: false }}
  webhook: {{ enabled: true }}
  x509: {{ clientCAFile: {ca} }}
authorization:
  mode: Webhook
tlsCertFile: {pki}/serving.crt
tlsPrivateKeyFile: {pki}/serving.key
cgroupDriver: cgroupfs
containerRuntimeEndpoint: unix://{socket}
clusterDomain: cluster.local
clusterDNS: [{NODE_IP}]
resolvConf: {state}/resolv.conf
podCIDR: {POD_SUBNET}
failSwapOn: false
serializeImagePulls: false
# A development node on a shared disk: never evict for disk, never collect images.
evictionHard:
  memory.available: 100Mi
  nodefs.available: "1%"
  imagefs.available: "1%"
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
"#,
        ca = pki.join("ca.crt").display(),
        pki = pki.display(),
        state = state.display(),
        socket = paths::containerd_socket().display(),
    )
}

/// The resolv.conf pods with `dnsPolicy: Default` get: only the cluster's DNS, never the host's.
pub fn resolv_conf() -> String {
    format!("nameserver {NODE_IP}\n")
}

/// kube-proxy's configuration: iptables mode, NodePorts only on the node's bridge address.
pub fn kube_proxy(state: &Path) -> String {
    format!(
        r#"apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: iptables
clientConnection:
  kubeconfig: {state}/kube-proxy.kubeconfig
hostnameOverride: {NODE_NAME}
clusterCIDR: {CLUSTER_CIDR}
bindAddress: {NODE_IP}
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
nodePortAddresses: ["{NODE_IP}/32"]
conntrack:
  maxPerCore: 0
  tcpEstablishedTimeout: 0s
  tcpCloseWaitTimeout: 0s
"#,
        state = state.display(),
    )
}

/// CoreDNS serves cluster.local from the API and answers NXDOMAIN for every other
/// name: it has no upstream, so no query leaves the machine.
pub fn corefile(state: &Path) -> String {
    format!(
        r#"cluster.local:53 in-addr.arpa:53 {{
    bind {NODE_IP}
    errors
    kubernetes cluster.local in-addr.arpa {{
        kubeconfig {state}/coredns.kubeconfig trellis
        pods insecure
        ttl 5
    }}
    cache 5
}}
.:53 {{
    bind {NODE_IP}
    errors
    template ANY ANY {{
        rcode NXDOMAIN
    }}
}}
"#,
        state = state.display(),
    )
}

/// What CoreDNS may read.
pub const COREDNS_RBAC: &str = r#"apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata:
  name: trellis:coredns
rules:
- apiGroups: [""]
  resources: [services, namespaces, pods]
  verbs: [list, watch]
- apiGroups: [discovery.k8s.io]
  resources: [endpointslices]
  verbs: [list, watch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata:
  name: trellis:coredns
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: ClusterRole
  name: trellis:coredns
subjects:
- apiGroup: rbac.authorization.k8s.io
  kind: User
  name: system:coredns
"#;
