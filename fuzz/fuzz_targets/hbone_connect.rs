#![no_main]
//! What a peer's HBONE CONNECT carries to the tunnel server: a method, an
//! authority and headers (HTTP/2 itself is the h2 crate's), and the reason
//! text a refusal sends back. Input: method, NUL, request target, NUL,
//! then header lines `name: value` separated by NUL, the last one the
//! reason. A request is accepted only as a CONNECT to an `ip:port`, and
//! any reason becomes a valid, bounded header value.
use std::net::SocketAddr;

use http::{Method, Request};
use libfuzzer_sys::fuzz_target;
use mesh_agent::tunnel::server::{connect_request, reason_header};

fuzz_target!(|data: &[u8]| {
    let mut fields = data.split(|b| *b == 0);
    let method = fields.next().unwrap_or_default();
    let target = fields.next().unwrap_or_default();
    let mut rest: Vec<&[u8]> = fields.collect();
    let reason = rest.pop().unwrap_or_default();

    let mut builder = Request::builder().method(method).uri(target);
    for line in rest {
        if let Some(colon) = line.iter().position(|b| *b == b':') {
            builder = builder.header(&line[..colon], &line[colon + 1..]);
        }
    }
    if let Ok(request) = builder.body(()) {
        let (parts, ()) = request.into_parts();
        match connect_request(&parts) {
            Ok(accepted) => {
                assert_eq!(parts.method, Method::CONNECT);
                let authority = parts.uri.authority().expect("an authority").as_str();
                assert_eq!(authority.parse::<SocketAddr>().ok(), Some(accepted.target));
            }
            Err(refusal) => assert!(!refusal.status.is_success()),
        }
    }

    let value = reason_header(&String::from_utf8_lossy(reason));
    assert!(value.len() <= 512);
    assert!(
        value
            .as_bytes()
            .iter()
            .all(|b| *b == b' ' || b.is_ascii_graphic())
    );
});
