//! Any AuthorizationPolicy spec a user could write is checked and translated without panicking, for
//! HTTP and for TCP, and the result evaluates without panicking.
#![no_main]

use libfuzzer_sys::fuzz_target;
use weft_authz::istio::{Applicable, AuthorizationPolicySpec, Layer, authorization, check};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(spec) = serde_yaml_ng::from_str::<AuthorizationPolicySpec>(text) else { return };
    let _ = check(&spec);
    let applicable = [Applicable { namespace: "default", name: "fuzz", spec: &spec }];
    let headers = http::HeaderMap::new();
    for layer in [Layer::Http, Layer::Tcp] {
        let authz = authorization(&applicable, layer);
        let peer = weft_authz::Peer {
            principal: Some("spiffe://cluster.local/ns/default/sa/x"),
            source: std::net::Ipv4Addr::LOCALHOST.into(),
            destination: "127.0.0.1:8080".parse().expect("literal"),
            server_name: None,
        };
        let request = weft_authz::Request {
            method: "GET",
            path: "/orders/1",
            path_and_query: "/orders/1",
            authority: "orders",
            headers: &headers,
        };
        let _ = authz.evaluate(&peer, Some(&request), &mut |_| {});
        let _ = authz.evaluate(&peer, None, &mut |_| {});
    }
});
