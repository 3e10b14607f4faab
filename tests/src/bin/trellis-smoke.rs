//! A tiny HTTP server and client for the local cluster's smoke test, std only so its
//! image is small and its behaviour obvious.
//!
//! - `trellis-smoke serve PORT`: answers every request `200 hello from <HOSTNAME>`;
//!   with no arguments it serves on `$PORT`, else 8080 (so it can stand in for an
//!   app in a MicroService, whose health path it also answers). It binds
//!   `$BIND_ADDRESS` (default `0.0.0.0`): `127.0.0.1` makes an app reachable only
//!   from inside its pod, through its sidecar.
//! - `trellis-smoke get URL`: GETs an `http://host:port/path` URL, prints the body,
//!   exits 0 on a 200 and 1 otherwise (so a Job's success is the test's assertion).
//! - `trellis-smoke post URL JSON`: POSTs `JSON` (as `application/json`), prints
//!   the body, exits 0 on a 2xx and 1 otherwise.
//!   Like curl and Go's net/http it goes through `$HTTP_PROXY` (the sidecar's
//!   outbound listener, in a MicroService) unless the host is in `$NO_PROXY`.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{TcpListener, TcpStream, ToSocketAddrs},
    process::ExitCode,
    time::Duration,
};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1..).unwrap_or_default() {
        [cmd, port] if cmd == "serve" => serve(port),
        [cmd, url] if cmd == "get" => request("GET", url, None),
        [cmd, url, body] if cmd == "post" => request("POST", url, Some(body)),
        [] => serve(&std::env::var("PORT").unwrap_or_else(|_| "8080".into())),
        _ => {
            eprintln!(
                "usage: trellis-smoke serve PORT | trellis-smoke get http://HOST[:PORT]/PATH | trellis-smoke post http://HOST[:PORT]/PATH JSON"
            );
            ExitCode::from(2)
        }
    }
}

fn serve(port: &str) -> ExitCode {
    let ip = std::env::var("BIND_ADDRESS").unwrap_or_else(|_| "0.0.0.0".into());
    let listener = match TcpListener::bind(format!("{ip}:{port}")) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("cannot listen on {ip}:{port}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "unknown".into());
    eprintln!("serving on {ip}:{port}");
    for stream in listener.incoming().flatten() {
        let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
        let mut reader = BufReader::new(&stream);
        let mut line = String::new();
        // Read the request head; the body (if any) is ignored.
        while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
            line.clear();
        }
        let body = format!("hello from {host}\n");
        let _ = write!(
            &stream,
            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
    }
    ExitCode::SUCCESS
}

/// `method url` with `body`: a GET succeeds on 200 only, a POST on any 2xx.
fn request(method: &str, url: &str, body: Option<&str>) -> ExitCode {
    match fetch(method, url, body) {
        Ok((status, body)) if status == 200 || (method == "POST" && status / 100 == 2) => {
            print!("{body}");
            ExitCode::SUCCESS
        }
        Ok((status, body)) => {
            eprintln!("{url} answered {status}: {body}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("{method} {url} failed: {e}");
            ExitCode::FAILURE
        }
    }
}

fn fetch(method: &str, url: &str, body: Option<&str>) -> std::io::Result<(u16, String)> {
    let invalid = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidInput, m.to_owned());
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| invalid("only http:// URLs"))?;
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let path = if path.is_empty() { "/" } else { path };
    let addr = if authority.contains(':') {
        authority.to_owned()
    } else {
        format!("{authority}:80")
    };
    let (connect_to, request_target) = match proxy_for(authority) {
        Some(proxy) => (proxy, format!("http://{authority}{path}")),
        None => (addr, path.to_owned()),
    };
    let target = connect_to
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| invalid("no address"))?;
    let mut stream = TcpStream::connect_timeout(&target, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let content = body
        .map(|b| {
            format!(
                "content-type: application/json\r\ncontent-length: {}\r\n",
                b.len()
            )
        })
        .unwrap_or_default();
    write!(
        stream,
        "{method} {request_target} HTTP/1.1\r\nhost: {authority}\r\n{content}connection: close\r\n\r\n{}",
        body.unwrap_or_default()
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| invalid("not an HTTP response"))?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// The `host:port` of the proxy for `authority`: `$HTTP_PROXY` (or
/// `$http_proxy`) unless the host is listed in `$NO_PROXY` (or `$no_proxy`).
fn proxy_for(authority: &str) -> Option<String> {
    let var = |name: &str| {
        std::env::var(name)
            .or_else(|_| std::env::var(name.to_lowercase()))
            .ok()
            .filter(|v| !v.is_empty())
    };
    let proxy = var("HTTP_PROXY")?;
    let host = authority.split(':').next().unwrap_or(authority);
    let bypassed = var("NO_PROXY").is_some_and(|list| {
        list.split(',')
            .map(str::trim)
            .any(|h| h == host || (h.starts_with('.') && host.ends_with(h)))
    });
    if bypassed {
        return None;
    }
    let proxy = proxy.strip_prefix("http://").unwrap_or(&proxy);
    Some(proxy.trim_end_matches('/').to_owned())
}
