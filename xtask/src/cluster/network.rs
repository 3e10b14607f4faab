//! The node's network, and the rule that nothing of the cluster leaves this machine.
//!
//! Pods sit on one Linux bridge, `trellis0`, whose address is also the node's.
//! The host gets blackhole routes for the whole pod and service ranges (the
//! bridge's /24 is more specific, so only it is reachable), and a FORWARD chain
//! drops anything that would cross from the bridge to another interface. Pods
//! reach each other, Services (kube-proxy's DNAT) and the host; nothing else.

use std::{fs, path::Path, process::Command};

use anyhow::{Context, Result, bail};

use crate::run;

/// The bridge the pods are attached to.
pub const BRIDGE: &str = "trellis0";
/// The node's address: the bridge's, the apiserver's advertise address, the kubelet's and CoreDNS's.
pub const NODE_IP: &str = "10.244.0.1";
/// The node's pod subnet, served by the bridge.
pub const POD_SUBNET: &str = "10.244.0.0/24";
/// The cluster's pod range; all but the node's subnet is blackholed.
pub const CLUSTER_CIDR: &str = "10.244.0.0/16";
/// The Service range, blackholed: only kube-proxy's DNAT makes its addresses reachable.
pub const SERVICE_CIDR: &str = "10.96.0.0/16";
/// The chain that keeps pod traffic on the bridge.
const FORWARD_CHAIN: &str = "TRELLIS-FORWARD";
/// Prefixes of the iptables chains the cluster creates (ours, kubelet's and kube-proxy's).
const CHAIN_PREFIXES: &[&str] = &["TRELLIS-", "KUBE-"];

fn ip(args: &[&str]) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(args);
    cmd
}

/// Creates the bridge, the blackhole routes, the forward rules and the sysctls. Idempotent.
pub fn up(state: &Path) -> Result<()> {
    if !run::quietly(&mut ip(&["link", "show", BRIDGE])) {
        run::status(&mut ip(&["link", "add", BRIDGE, "type", "bridge"]))
            .context("creating the pod bridge needs root and the bridge module")?;
    }
    let with_prefix = format!("{NODE_IP}/24");
    let addrs = run::output(&mut ip(&["-4", "addr", "show", "dev", BRIDGE]))?;
    if !addrs.contains(&with_prefix) {
        run::status(&mut ip(&["addr", "add", &with_prefix, "dev", BRIDGE]))?;
    }
    run::status(&mut ip(&["link", "set", BRIDGE, "up"]))?;
    for cidr in [CLUSTER_CIDR, SERVICE_CIDR] {
        run::status(&mut ip(&["route", "replace", "blackhole", cidr]))?;
    }

    // Forwarding is needed for pod → Service → pod (DNAT then routing back onto the bridge);
    // remember the old value so `down` can put it back.
    let saved = state.join("ip_forward.saved");
    if !saved.exists() {
        let old =
            fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap_or_else(|_| "0".into());
        fs::write(&saved, old.trim())?;
    }
    fs::write("/proc/sys/net/ipv4/ip_forward", "1").context("enabling IPv4 forwarding")?;
    // Bridged traffic must pass iptables, or a pod reaching a Service backed by a pod on the
    // same bridge (hairpin after DNAT) is never translated back.
    let nf = Path::new("/proc/sys/net/bridge/bridge-nf-call-iptables");
    if nf.exists() {
        fs::write(nf, "1")?;
    } else {
        bail!("{} is missing: the kernel needs br_netfilter", nf.display());
    }

    iptables(&["-N", FORWARD_CHAIN]).ok();
    iptables(&["-F", FORWARD_CHAIN])?;
    iptables(&[
        "-A",
        FORWARD_CHAIN,
        "-i",
        BRIDGE,
        "-o",
        BRIDGE,
        "-j",
        "ACCEPT",
    ])?;
    iptables(&[
        "-A",
        FORWARD_CHAIN,
        "-i",
        BRIDGE,
        "-m",
        "comment",
        "--comment",
        "trellis: pod traffic never leaves the node",
        "-j",
        "DROP",
    ])?;
    iptables(&[
        "-A",
        FORWARD_CHAIN,
        "-o",
        BRIDGE,
        "-m",
        "comment",
        "--comment",
        "trellis: nothing from outside reaches pods",
        "-j",
        "DROP",
    ])?;
    if iptables(&["-C", "FORWARD", "-j", FORWARD_CHAIN]).is_err() {
        iptables(&["-I", "FORWARD", "1", "-j", FORWARD_CHAIN])?;
    }
    Ok(())
}

/// Removes everything [`up`] added, and the chains kubelet and kube-proxy added. Idempotent.
pub fn down(state: &Path) -> Result<()> {
    for binary in ["iptables", "ip6tables"] {
        remove_chains(binary)?;
    }
    for cidr in [CLUSTER_CIDR, SERVICE_CIDR] {
        run::quietly(&mut ip(&["route", "del", "blackhole", cidr]));
    }
    // Pod network namespaces left by the CNI plugins, if a pod outlived the kubelet.
    if let Ok(list) = run::output(&mut ip(&["netns", "list"])) {
        for ns in list.lines().filter_map(|l| l.split_whitespace().next()) {
            if ns.starts_with("cni-") {
                run::quietly(&mut ip(&["netns", "delete", ns]));
            }
        }
    }
    run::quietly(&mut ip(&["link", "del", BRIDGE]));
    let saved = state.join("ip_forward.saved");
    if let Ok(old) = fs::read_to_string(&saved) {
        fs::write("/proc/sys/net/ipv4/ip_forward", old.trim())?;
        fs::remove_file(saved)?;
    }
    Ok(())
}

fn iptables(args: &[&str]) -> Result<()> {
    let mut cmd = Command::new("iptables");
    cmd.arg("-w").args(args);
    run::output(&mut cmd).map(|_| ())
}

/// The cluster's iptables chains still present, as `table/chain` (empty after `down`).
pub fn leftover_chains() -> Result<Vec<String>> {
    let mut left = Vec::new();
    for binary in ["iptables", "ip6tables"] {
        for table in ["filter", "nat", "mangle", "raw"] {
            let Ok(rules) = run::output(Command::new(binary).args(["-w", "-t", table, "-S"]))
            else {
                continue;
            };
            for line in rules.lines() {
                if let Some(chain) = line.strip_prefix("-N ")
                    && CHAIN_PREFIXES.iter().any(|p| chain.starts_with(p))
                {
                    left.push(format!("{binary} {table}/{chain}"));
                }
            }
        }
    }
    Ok(left)
}

/// Deletes every rule that jumps to one of our chains, then the chains themselves.
fn remove_chains(binary: &str) -> Result<()> {
    let ours = |s: &str| CHAIN_PREFIXES.iter().any(|p| s.starts_with(p));
    for table in ["filter", "nat", "mangle", "raw"] {
        let Ok(rules) = run::output(Command::new(binary).args(["-w", "-t", table, "-S"])) else {
            continue;
        };
        let mut chains = Vec::new();
        for line in rules.lines() {
            let words: Vec<&str> = line.split_whitespace().collect();
            match words.as_slice() {
                ["-N", chain] if ours(chain) => chains.push(chain.to_string()),
                ["-A", chain, rest @ ..] if !ours(chain) => {
                    let jumps_to_ours = rest
                        .windows(2)
                        .any(|w| (w[0] == "-j" || w[0] == "-g") && ours(w[1]));
                    if jumps_to_ours {
                        // `iptables -S` quotes comments; re-split by the shell's rules.
                        let delete = format!("{binary} -w -t {table} -D {}", &line[3..]);
                        run::quietly(Command::new("sh").arg("-c").arg(delete));
                    }
                }
                _ => {}
            }
        }
        for chain in &chains {
            run::quietly(Command::new(binary).args(["-w", "-t", table, "-F", chain]));
        }
        for chain in &chains {
            run::quietly(Command::new(binary).args(["-w", "-t", table, "-X", chain]));
        }
    }
    Ok(())
}

/// Whether the blackhole routes are in place (the network rule holds).
pub fn blackholes_in_place() -> Result<bool> {
    let routes = run::output(&mut ip(&["route", "show", "type", "blackhole"]))?;
    Ok([CLUSTER_CIDR, SERVICE_CIDR].iter().all(|cidr| {
        routes
            .lines()
            .any(|l| l.split_whitespace().any(|w| w == *cidr))
    }))
}
