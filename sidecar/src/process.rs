//! The sidecar's own footprint on `/metrics`: resident memory and open file
//! descriptors, under the names Prometheus' process collector (and Linkerd's
//! proxy) use, so a soak or a dashboard can watch for leaks.
//!
//! Read from `/proc/self` at scrape time; elsewhere than Linux nothing is
//! written.

use std::fmt::Write;

/// What `/proc/self` says of this process now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Footprint {
    /// Resident set size in bytes.
    pub resident_bytes: u64,
    /// Open file descriptors (sockets included).
    pub open_fds: u64,
}

impl Footprint {
    /// Reads this process's footprint, if `/proc` is there.
    pub fn read() -> Option<Self> {
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        let resident_bytes = vm_rss_bytes(&status)?;
        // The directory handle read_dir holds is one of the entries: not ours to count.
        let open_fds = std::fs::read_dir("/proc/self/fd").ok()?.count() as u64 - 1;
        Some(Self {
            resident_bytes,
            open_fds,
        })
    }

    /// Appends the footprint in Prometheus text format.
    pub fn encode(&self, out: &mut String) {
        let _ = write!(
            out,
            "# HELP process_resident_memory_bytes Resident memory size in bytes.\n\
             # TYPE process_resident_memory_bytes gauge\n\
             process_resident_memory_bytes {}\n\
             # HELP process_open_fds Number of open file descriptors.\n\
             # TYPE process_open_fds gauge\n\
             process_open_fds {}\n",
            self.resident_bytes, self.open_fds
        );
    }
}

/// `VmRSS:  1234 kB` from /proc/self/status, in bytes.
fn vm_rss_bytes(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// `text` (OpenMetrics, ending in `# EOF`) with the footprint added before the end.
pub fn with_footprint(mut text: String) -> String {
    let Some(footprint) = Footprint::read() else {
        return text;
    };
    let eof = text.rfind("# EOF").unwrap_or(text.len());
    let rest = text.split_off(eof);
    footprint.encode(&mut text);
    text.push_str(&rest);
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_rss_from_status() {
        let status = "Name:\tx\nVmPeak:\t  9000 kB\nVmRSS:\t   1234 kB\nThreads: 3\n";
        assert_eq!(vm_rss_bytes(status), Some(1234 * 1024));
        assert_eq!(vm_rss_bytes("Name: x\n"), None);
    }

    #[test]
    fn the_footprint_goes_before_the_end_marker() {
        let text = with_footprint("a_total 1\n# EOF\n".into());
        assert!(text.starts_with("a_total 1\n# HELP process_resident_memory_bytes"));
        assert!(text.ends_with("\n# EOF\n"), "{text}");
        let f = Footprint::read().expect("this test runs on Linux");
        assert!(f.resident_bytes > 1024 * 1024, "{f:?}");
        // Files opened are seen (50, so other tests' sockets closing meanwhile
        // cannot hide them).
        let _files: Vec<_> = (0..50)
            .map(|_| std::fs::File::open("/proc/self/status").unwrap())
            .collect();
        assert!(Footprint::read().unwrap().open_fds >= f.open_fds + 40);
        assert!(f.open_fds >= 3, "stdin, stdout and stderr at least: {f:?}");
    }
}
