//! A minimal blocking HTTP/1.1 client: enough to probe a proxy and to drive
//! keep-alive load from plain threads (no async runtime in the timing path).

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use anyhow::{Context, Result};

/// A parsed message head: the first line and what framing needs.
pub struct Head {
    pub first: String,
    pub content_length: u64,
    pub chunked: bool,
    pub close: bool,
}

/// Reads a request or response head; `None` at a clean end of stream.
pub fn read_head(r: &mut impl BufRead) -> std::io::Result<Option<Head>> {
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Ok(None);
    }
    let mut head = Head {
        first: line.trim_end().to_owned(),
        content_length: 0,
        chunked: false,
        close: false,
    };
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let l = line.trim_end();
        if l.is_empty() {
            return Ok(Some(head));
        }
        if let Some((k, v)) = l.split_once(':') {
            let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
            match k.as_str() {
                "content-length" => head.content_length = v.parse().unwrap_or(0),
                "transfer-encoding" => head.chunked = v.eq_ignore_ascii_case("chunked"),
                "connection" => head.close = v.eq_ignore_ascii_case("close"),
                _ => {}
            }
        }
    }
}

/// Reads a response body as its head frames it into `out`, returning its length.
pub fn read_body(r: &mut impl BufRead, head: &Head, out: &mut impl Write) -> std::io::Result<u64> {
    if !head.chunked {
        return std::io::copy(&mut r.take(head.content_length), out);
    }
    let mut total = 0;
    let mut line = String::new();
    loop {
        line.clear();
        r.read_line(&mut line)?;
        let size = u64::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
            .map_err(|_| std::io::Error::other(format!("bad chunk size {line:?}")))?;
        if size == 0 {
            // Trailers, if any, end with an empty line.
            loop {
                line.clear();
                if r.read_line(&mut line)? == 0 || line.trim_end().is_empty() {
                    return Ok(total);
                }
            }
        }
        total += std::io::copy(&mut r.take(size), out)?;
        line.clear();
        r.read_line(&mut line)?;
    }
}

/// One GET on a new connection: status and body.
pub fn http_get(addr: SocketAddr, host: &str, path: &str) -> Result<(u16, String)> {
    get(addr, host, path, &[])
}

/// One GET with `headers` on a new connection: status and body.
pub fn get(
    addr: SocketAddr,
    host: &str,
    path: &str,
    headers: &[(String, String)],
) -> Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let extra: String = headers
        .iter()
        .map(|(k, v)| format!("{k}: {v}\r\n"))
        .collect();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nhost: {host}\r\n{extra}connection: close\r\n\r\n"
    )?;
    let mut r = BufReader::new(s);
    let head = read_head(&mut r)?.context("no response")?;
    let mut body = Vec::new();
    if head.chunked || head.content_length > 0 {
        read_body(&mut r, &head, &mut body)?;
    } else {
        // Neither framing: the body ends with the connection (we sent close).
        r.read_to_end(&mut body)?;
    }
    Ok((
        status_of(&head),
        String::from_utf8_lossy(&body).into_owned(),
    ))
}

pub fn status_of(head: &Head) -> u16 {
    head.first
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}
