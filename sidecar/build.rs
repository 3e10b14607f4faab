//! Links `trellis-sidecar` with its code laid out in the order of
//! `link-order.txt`: the functions a sidecar runs first (those it runs to
//! start and idle, then those serving HTTP/1.1 and gRPC add), everything it
//! never runs after them.
//!
//! The kernel maps a binary's code into a process in 64 KiB windows around
//! each page it touches, so code that runs spread over the whole binary
//! makes most of it resident; laid out together it fills a few windows.
//! `cargo xtask link-order` regenerates the list from callgrind runs of the
//! `release` and `image` builds (see docs/benchmarks.md). Symbols that are
//! not in the binary are skipped, so a stale list only lays out less, and
//! builds of other profiles (whose symbol names differ) are unaffected.
//!
//! Only where rustc links with LLD by default (x86_64 Linux, GNU): the
//! option is LLD's.

fn main() {
    println!("cargo:rerun-if-changed=link-order.txt");
    println!("cargo:rerun-if-env-changed=TRELLIS_LINK_ORDER");
    let target = |key: &str| std::env::var(key).unwrap_or_default();
    let lld_by_default = target("CARGO_CFG_TARGET_ARCH") == "x86_64"
        && target("CARGO_CFG_TARGET_OS") == "linux"
        && target("CARGO_CFG_TARGET_ENV") == "gnu";
    // `TRELLIS_LINK_ORDER=off` for a linker other than rustc's LLD.
    if !lld_by_default || target("TRELLIS_LINK_ORDER") == "off" {
        return;
    }
    let list = std::path::Path::new(&target("CARGO_MANIFEST_DIR")).join("link-order.txt");
    if list.exists() {
        println!(
            "cargo:rustc-link-arg-bin=trellis-sidecar=-Wl,--symbol-ordering-file={}",
            list.display()
        );
        println!("cargo:rustc-link-arg-bin=trellis-sidecar=-Wl,--no-warn-symbol-ordering");
    }
}
