//! After `cargo xtask cluster down`, nothing of the cluster is left on the host.
//!
//! Run by `cargo xtask test` right after it stops the cluster it started. It looks
//! for each kind of thing `cluster up` adds, independently of the code that removes them.

use std::{fs, path::Path, process::Command};

fn stdout(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {program}: {e}"));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
#[ignore = "run by cargo xtask test after cluster down"]
fn cluster_down_leaves_nothing_behind() {
    let mut left = Vec::new();

    // Processes: any of the cluster's binaries, or a containerd/shim of ours.
    for entry in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(cmdline) = fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        let ours = ["/cache/trellis/bin/", "/var/lib/trellis/", "/run/trellis/"]
            .iter()
            .any(|p| cmdline.contains(p));
        if ours && !cmdline.contains("cargo") && !cmdline.contains("teardown") {
            left.push(format!(
                "process {}: {cmdline}",
                entry.file_name().to_string_lossy()
            ));
        }
    }

    // iptables chains of ours, kubelet's and kube-proxy's, in every table, v4 and v6.
    for binary in ["iptables", "ip6tables"] {
        for table in ["filter", "nat", "mangle", "raw"] {
            for line in stdout(binary, &["-w", "-t", table, "-S"]).lines() {
                if line.contains("KUBE-") || line.contains("TRELLIS-") {
                    left.push(format!("{binary} -t {table}: {line}"));
                }
            }
        }
    }

    // Mounts under the cluster's folders, and pod network namespaces.
    for line in fs::read_to_string("/proc/self/mountinfo").unwrap().lines() {
        let point = line.split_whitespace().nth(4).unwrap_or_default();
        if point.starts_with("/var/lib/trellis")
            || point.starts_with("/run/trellis")
            || point.starts_with("/run/netns/cni-")
        {
            left.push(format!("mount {point}"));
        }
    }
    for ns in stdout("ip", &["netns", "list"]).lines() {
        if ns.starts_with("cni-") {
            left.push(format!("network namespace {ns}"));
        }
    }

    // The bridge, pod veths and the blackhole routes.
    for link in stdout("ip", &["-o", "link", "show"]).lines() {
        if link.contains("trellis0") {
            left.push(format!("link {link}"));
        }
    }
    let routes = stdout("ip", &["route", "show", "type", "blackhole"]);
    for cidr in ["10.244.0.0/16", "10.96.0.0/16"] {
        if routes.contains(cidr) {
            left.push(format!("blackhole route {cidr}"));
        }
    }

    // Data folders.
    for dir in ["/var/lib/trellis/cluster", "/run/trellis"] {
        if Path::new(dir).exists() {
            left.push(format!("folder {dir}"));
        }
    }

    assert!(
        left.is_empty(),
        "cluster down left behind:\n{}",
        left.join("\n")
    );
}
