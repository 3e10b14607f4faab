//! The cluster's certificates: one CA, a serving certificate for the apiserver
//! and the kubelet, and a client certificate per component, as kubeadm makes them.
//!
//! They are made once, on the first `cluster up`, and kept until `cluster down`.

use std::{fs, path::Path};

use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// A client identity for a kubeconfig: the certificate's CN is the user, O the group.
pub struct Identity {
    /// The file stem under pki/ (`admin` → admin.crt, admin.key).
    pub file: &'static str,
    /// The user name (CN).
    pub user: &'static str,
    /// The group (O), if any.
    pub group: Option<&'static str>,
}

/// Every client identity the cluster uses.
pub const CLIENTS: &[Identity] = &[
    Identity {
        file: "admin",
        user: "trellis-admin",
        group: Some("system:masters"),
    },
    Identity {
        file: "controller-manager",
        user: "system:kube-controller-manager",
        group: None,
    },
    Identity {
        file: "scheduler",
        user: "system:kube-scheduler",
        group: None,
    },
    Identity {
        file: "kubelet",
        user: "system:node:trellis",
        group: Some("system:nodes"),
    },
    Identity {
        file: "kube-proxy",
        user: "system:kube-proxy",
        group: None,
    },
    // The apiserver's identity towards kubelets (logs, exec, port-forward).
    Identity {
        file: "apiserver-kubelet-client",
        user: "kube-apiserver-kubelet-client",
        group: Some("system:masters"),
    },
    // CoreDNS reads Services and EndpointSlices.
    Identity {
        file: "coredns",
        user: "system:coredns",
        group: None,
    },
];

/// Writes the CA, serving and client certificates and the service-account key into `dir`,
/// unless they are there already.
pub fn ensure(dir: &Path, serving_names: &[String]) -> Result<()> {
    if dir.join("ca.crt").exists() {
        return Ok(());
    }
    fs::create_dir_all(dir)?;

    let ca_key = KeyPair::generate().context("generating the CA key")?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.distinguished_name
        .push(DnType::CommonName, "trellis-local-ca");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca.self_signed(&ca_key)?;
    write(dir, "ca", &ca_cert.pem(), &ca_key.serialize_pem())?;
    let issuer = Issuer::new(ca, ca_key);

    // One serving certificate for the apiserver and the kubelet: both are this host.
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(serving_names.to_vec())?;
    params
        .distinguished_name
        .push(DnType::CommonName, "trellis-serving");
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let cert = params.signed_by(&key, &issuer)?;
    write(dir, "serving", &cert.pem(), &key.serialize_pem())?;

    for id in CLIENTS {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, id.user);
        if let Some(group) = id.group {
            params
                .distinguished_name
                .push(DnType::OrganizationName, group);
        }
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let cert = params.signed_by(&key, &issuer)?;
        write(dir, id.file, &cert.pem(), &key.serialize_pem())?;
    }

    // Service-account tokens are signed with this key and verified with its public half.
    let sa = KeyPair::generate()?;
    fs::write(dir.join("sa.key"), sa.serialize_pem())?;
    fs::write(dir.join("sa.pub"), sa.public_key_pem())?;
    Ok(())
}

fn write(dir: &Path, stem: &str, cert: &str, key: &str) -> Result<()> {
    fs::write(dir.join(format!("{stem}.crt")), cert)?;
    let key_path = dir.join(format!("{stem}.key"));
    fs::write(&key_path, key)?;
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&key_path, fs::Permissions::from_mode(0o600))?;
    Ok(())
}
