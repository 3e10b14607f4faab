//! The pod sandbox's process: it holds the pod's namespaces and does nothing else.
//!
//! Our own instead of registry.k8s.io/pause because this cluster pulls from no
//! registry. It sleeps forever; containerd stops sandboxes with SIGKILL, and as
//! PID 1 in its own PID namespace it needs no signal handling to be killed that way.

fn main() {
    loop {
        std::thread::park();
    }
}
