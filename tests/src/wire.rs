//! A look at the wire: tcpdump on the node's pod bridge, and what the TCP
//! payloads it captured say.
//!
//! The local node's pods all sit on one bridge (`trellis0`), so every byte
//! between two pods, and between the host and a pod, crosses it. The capture
//! is read back with `pcap-file` and sliced with `etherparse`; payloads are
//! joined per direction of each TCP connection, so a string split over two
//! segments is still found.

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader},
    net::{Ipv4Addr, SocketAddrV4},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use etherparse::{NetSlice, SlicedPacket, TransportSlice};

/// The local node's pod bridge.
pub const BRIDGE: &str = "trellis0";

/// One direction of one TCP connection.
pub type Direction = (SocketAddrV4, SocketAddrV4);

/// A running `tcpdump`, writing every TCP packet on an interface to a file.
pub struct Capture {
    child: Child,
    file: PathBuf,
}

impl Capture {
    /// Starts capturing TCP on `interface` into `file`, returning once
    /// tcpdump says it is listening (so nothing sent after is missed).
    pub fn start(interface: &str, file: &Path) -> Result<Self> {
        let mut child = Command::new("tcpdump")
            .args(["-i", interface, "-n", "-U", "-s", "0", "-w"])
            .arg(file)
            .arg("tcp")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("could not start tcpdump (apt-get install tcpdump; .ci/install does)")?;
        let stderr = child.stderr.take().expect("piped stderr");
        let mut lines = BufReader::new(stderr).lines();
        loop {
            match lines.next() {
                Some(Ok(line)) if line.contains("listening on") => break,
                Some(Ok(_)) => continue,
                _ => {
                    let status = child.wait()?;
                    bail!("tcpdump on {interface} exited ({status}) before it listened");
                }
            }
        }
        // tcpdump writes further notes to stderr; keep draining it so it never blocks.
        std::thread::spawn(move || lines.for_each(drop));
        Ok(Self {
            child,
            file: file.to_owned(),
        })
    }

    /// Stops tcpdump (SIGINT, so it flushes) and reads what it captured.
    pub fn stop(mut self) -> Result<Flows> {
        // Let the last packets reach the file: -U flushes per packet.
        std::thread::sleep(Duration::from_millis(500));
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-INT", &pid]).status()?;
        let status = self.child.wait()?;
        if !status.success() {
            bail!("tcpdump ended with {status}");
        }
        Flows::read(&self.file)
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// TCP payload bytes by direction, in capture order.
#[derive(Debug, Default)]
pub struct Flows {
    /// Bytes sent in each direction.
    pub bytes: BTreeMap<Direction, Vec<u8>>,
    /// Packets read from the capture.
    pub packets: usize,
}

impl Flows {
    /// Reads a pcap file of Ethernet frames; anything not IPv4 TCP is skipped.
    pub fn read(file: &Path) -> Result<Self> {
        let f = std::fs::File::open(file).with_context(|| format!("opening {}", file.display()))?;
        let mut reader = pcap_file::pcap::PcapReader::new(f)
            .with_context(|| format!("{} is not a pcap file", file.display()))?;
        let mut flows = Flows::default();
        while let Some(packet) = reader.next_packet() {
            let packet = packet.context("a truncated capture")?;
            flows.packets += 1;
            let Ok(sliced) = SlicedPacket::from_ethernet(&packet.data) else {
                continue;
            };
            let (Some(NetSlice::Ipv4(ip)), Some(TransportSlice::Tcp(tcp))) =
                (&sliced.net, &sliced.transport)
            else {
                continue;
            };
            let from = SocketAddrV4::new(ip.header().source_addr(), tcp.source_port());
            let to = SocketAddrV4::new(ip.header().destination_addr(), tcp.destination_port());
            flows
                .bytes
                .entry((from, to))
                .or_default()
                .extend_from_slice(tcp.payload());
        }
        Ok(flows)
    }

    /// The directions between two addresses both in `a` and `b` (either way
    /// round) that carried any payload.
    pub fn between<'a>(
        &'a self,
        a: &'a [Ipv4Addr],
        b: &'a [Ipv4Addr],
    ) -> impl Iterator<Item = (&'a Direction, &'a Vec<u8>)> + 'a {
        self.bytes.iter().filter(move |((from, to), bytes)| {
            !bytes.is_empty()
                && ((a.contains(from.ip()) && b.contains(to.ip()))
                    || (b.contains(from.ip()) && a.contains(to.ip())))
        })
    }
}

/// Whether `haystack` contains `needle`.
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

/// What a direction's first bytes are: a TLS ClientHello or ServerHello
/// record (content type 22, handshake type 1 or 2), or something else.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Opening {
    /// A TLS ClientHello.
    ClientHello,
    /// A TLS ServerHello.
    ServerHello,
    /// Anything else (plaintext HTTP, say).
    Other,
}

/// How a direction's bytes open.
pub fn opening(bytes: &[u8]) -> Opening {
    match bytes {
        [0x16, 0x03, 0x01..=0x04, _, _, 0x01, ..] => Opening::ClientHello,
        [0x16, 0x03, 0x01..=0x04, _, _, 0x02, ..] => Opening::ServerHello,
        _ => Opening::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_hellos_are_told_from_plaintext() {
        assert_eq!(
            opening(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00]),
            Opening::ClientHello
        );
        assert_eq!(
            opening(&[0x16, 0x03, 0x03, 0x00, 0x7a, 0x02, 0x00]),
            Opening::ServerHello
        );
        assert_eq!(opening(b"GET / HTTP/1.1\r\n"), Opening::Other);
        assert_eq!(opening(b"PRI * HTTP/2.0\r\n"), Opening::Other);
    }

    #[test]
    fn a_needle_is_found_across_joined_segments() {
        assert!(contains(b"abc-mark", b"c-ma"));
        assert!(!contains(b"abc", b"abcd"));
        assert!(!contains(b"abc", b""));
    }
}
