//! Just enough DNS to ask the cluster's CoreDNS one question, so `cluster up`
//! returns only once cluster DNS answers.

use std::{net::UdpSocket, time::Duration};

/// Whether `server`:53 answers an A query for `name` with at least one record.
pub fn resolves(server: &str, name: &str) -> bool {
    query(server, name).is_some_and(|answers| answers > 0)
}

/// Sends one A query and returns the answer count of a NOERROR reply.
fn query(server: &str, name: &str) -> Option<u16> {
    let socket = UdpSocket::bind("0.0.0.0:0").ok()?;
    socket.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
    let id: u16 = 0x7e11;
    let mut packet = Vec::with_capacity(64);
    packet.extend_from_slice(&id.to_be_bytes());
    packet.extend_from_slice(&[0x01, 0x00]); // standard query, recursion desired
    packet.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]); // one question
    for label in name.trim_end_matches('.').split('.') {
        packet.push(u8::try_from(label.len()).ok()?);
        packet.extend_from_slice(label.as_bytes());
    }
    packet.extend_from_slice(&[0, 0, 1, 0, 1]); // root, type A, class IN
    socket.send_to(&packet, (server, 53)).ok()?;
    let mut reply = [0u8; 512];
    let n = socket.recv(&mut reply).ok()?;
    if n < 12 || reply[..2] != id.to_be_bytes() {
        return None;
    }
    let rcode = reply[3] & 0x0f;
    (rcode == 0).then(|| u16::from_be_bytes([reply[6], reply[7]]))
}
