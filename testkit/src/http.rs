//! Plain HTTP on loopback: the daemon's endpoints and Prometheus's API.
use std::{
    net::{SocketAddr, TcpListener},
    time::Duration,
};

use crate::error::{Error, Result};

/// A loopback TCP port that was free a moment ago (the kernel picked it).
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("binding an ephemeral port on 127.0.0.1");
    l.local_addr()
        .expect("local address of a bound socket")
        .port()
}

/// `GET http://ADDR/PATH`: the status and the body, whatever the status.
pub fn get(addr: SocketAddr, path: &str, timeout: Duration) -> Result<(u16, String)> {
    get_query(addr, path, &[], timeout)
}

/// `GET http://ADDR/PATH?K=V&...` with the query percent-encoded.
pub fn get_query(
    addr: SocketAddr,
    path: &str,
    query: &[(&str, &str)],
    timeout: Duration,
) -> Result<(u16, String)> {
    let url = format!("http://{addr}{path}");
    // Per phase, not global: with a global timeout ureq resolves the address
    // on a thread of its own, and such short-lived threads of the test
    // process intrude on the guarded CPU and get their ids reused by the
    // tests' own threads (the daemon's per-thread accounting, keyed by id,
    // then adds them up). An IP literal resolves at once anyway.
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_connect(Some(timeout))
        .timeout_send_request(Some(timeout))
        .timeout_recv_response(Some(timeout))
        .timeout_recv_body(Some(timeout))
        // A 404 or 503 is an answer the caller looks at, not a failure.
        .http_status_as_error(false)
        // Loopback only: an http_proxy in the environment must not apply.
        .proxy(None)
        .build()
        .into();
    let err = |source| Error::Http {
        url: url.clone(),
        source: Box::new(source),
    };
    let mut response = agent
        .get(&url)
        .query_pairs(query.iter().copied())
        .call()
        .map_err(err)?;
    let status = response.status().as_u16();
    let body = response.body_mut().read_to_string().map_err(err)?;
    Ok((status, body))
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead as _, BufReader, Write as _};

    use super::*;

    /// Answers one request with `response` and returns the request line.
    fn serve_once(response: &'static str) -> (SocketAddr, std::thread::JoinHandle<String>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let h = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut first = String::new();
            r.read_line(&mut first).unwrap();
            let mut line = String::new();
            while r.read_line(&mut line).unwrap() > 2 {
                line.clear();
            }
            s.write_all(response.as_bytes()).unwrap();
            first
        });
        (addr, h)
    }

    #[test]
    fn chunked_bodies_error_statuses_and_encoded_queries() {
        let (addr, h) = serve_once(
            "HTTP/1.1 503 Service Unavailable\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nWiki\r\n5\r\npedia\r\n0\r\n\r\n",
        );
        let got = get_query(
            addr,
            "/q",
            &[("query", "rate(x{a=~\"b|c\"}[5m]) + 1")],
            Duration::from_secs(10),
        );
        assert_eq!(got.unwrap(), (503, "Wikipedia".to_string()));
        assert_eq!(
            h.join().unwrap().trim_end(),
            "GET /q?query=rate(x%7Ba%3D~%22b%7Cc%22%7D%5B5m%5D)%20%2B%201 HTTP/1.1"
        );
        let (addr, _h) = serve_once("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
        assert_eq!(
            get(addr, "/", Duration::from_secs(10)).unwrap(),
            (200, "ok".into())
        );
    }

    #[test]
    fn nothing_listening_is_an_error() {
        let addr: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let e = get(addr, "/healthz", Duration::from_secs(5)).unwrap_err();
        assert!(
            e.to_string()
                .starts_with(&format!("GET http://{addr}/healthz: ")),
            "{e}"
        );
    }
}
