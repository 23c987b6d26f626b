//! Authorization policies as users write them, and requests as clients send them, through Istio's
//! translation and the evaluation every request meets.

use weft_authz::istio::{Applicable, AuthorizationPolicySpec, Layer, authorization, check};
use weft_authz::{Peer, Request};

/// Any policy is checked (what the proxy cannot enforce is named there, and refused by the control
/// plane) and translated for HTTP and TCP, and the result evaluates, with and without a caller
/// identity, without panicking.
pub(crate) fn policy(data: &[u8]) {
    let Ok(spec) = serde_yaml_ng::from_str::<AuthorizationPolicySpec>(&String::from_utf8_lossy(data)) else {
        return;
    };
    let _ = check(&spec);
    let applicable = [Applicable {
        namespace: "default",
        name: "fuzzed",
        spec: &spec,
    }];
    let mut headers = http::HeaderMap::new();
    headers.insert("x-canary", http::HeaderValue::from_static("true"));
    for layer in [Layer::Http, Layer::Tcp] {
        let authz = authorization(&applicable, layer);
        for principal in [Some("spiffe://cluster.local/ns/default/sa/api-gateway"), None] {
            let peer = Peer {
                principal,
                source: std::net::Ipv4Addr::new(10, 0, 0, 7).into(),
                destination: "127.0.0.1:8080".parse().expect("literal"),
                server_name: Some("order-svc.default.svc.cluster.local"),
            };
            let request = Request {
                method: "GET",
                path: "/orders/1",
                path_and_query: "/orders/1?x=1",
                authority: "order-svc:8080",
                headers: &headers,
            };
            let _ = authz.evaluate(&peer, Some(&request), &mut |_| {});
            let _ = authz.evaluate(&peer, None, &mut |_| {});
        }
    }
}

pub(crate) fn seeds() -> Vec<Vec<u8>> {
    [
        r#"selector: { matchLabels: { app: order-service } }
rules:
  - from:
      - source: { principals: ["cluster.local/ns/default/sa/api-gateway"] }
      - source: { principals: ["cluster.local/ns/default/sa/payment-service"] }
    to:
      - operation: { methods: ["GET", "POST"], paths: ["/orders/*"] }
"#,
        r#"action: DENY
rules:
  - from: [{ source: { notNamespaces: ["default"], ipBlocks: ["10.0.0.0/8"] } }]
    to: [{ operation: { notPaths: ["/health*"], ports: ["8080"], hosts: ["order-svc*"] } }]
    when:
      - key: request.headers[x-canary]
        values: ["true"]
      - key: source.principal
        notValues: ["*/sa/admin"]
"#,
        "action: ALLOW\nrules: [{}]\n",
        "{}\n",
        "action: AUDIT\nrules: [{ to: [{ operation: { methods: [\"DELETE\"] } }] }]\n",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect()
}
