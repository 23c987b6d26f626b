use std::net::SocketAddr;

use super::*;
use crate::{Decision, Peer, Request};

fn spec(yaml: &str) -> AuthorizationPolicySpec {
    serde_yaml_ng::from_str(yaml).unwrap()
}

const SEED: &str = r#"
selector:
  matchLabels:
    app: order-service
rules:
- from:
  - source:
      principals: ["cluster.local/ns/default/sa/api-gateway"]
  - source:
      principals: ["cluster.local/ns/default/sa/payment-service"]
  to:
  - operation:
      methods: ["GET", "POST"]
      paths: ["/orders/*"]
"#;

struct Case<'a> {
    principal: Option<&'a str>,
    source: &'a str,
    port: u16,
    method: &'a str,
    path: &'a str,
    headers: http::HeaderMap,
}

impl<'a> Case<'a> {
    fn new(principal: Option<&'a str>, method: &'a str, path: &'a str) -> Self {
        Self {
            principal,
            source: "10.0.0.1",
            port: 8080,
            method,
            path,
            headers: http::HeaderMap::new(),
        }
    }

    fn peer(&self) -> Peer<'_> {
        Peer {
            principal: self.principal,
            source: self.source.parse().unwrap(),
            destination: SocketAddr::new("10.0.0.9".parse().unwrap(), self.port),
            server_name: None,
        }
    }

    fn http(&self, authz: &Authorization) -> bool {
        let request = Request {
            method: self.method,
            path: self.path,
            path_and_query: self.path,
            authority: "order-svc:8080",
            headers: &self.headers,
        };
        authz
            .evaluate(&self.peer(), Some(&request), &mut |_| {})
            .is_allowed()
    }

    fn tcp(&self, authz: &Authorization) -> bool {
        authz.evaluate(&self.peer(), None, &mut |_| {}).is_allowed()
    }
}

fn applying<'a>(policies: &'a [(&'a str, AuthorizationPolicySpec)]) -> Vec<Applicable<'a>> {
    policies
        .iter()
        .map(|(name, spec)| Applicable {
            namespace: "default",
            name,
            spec,
        })
        .collect()
}

const GATEWAY: &str = "spiffe://cluster.local/ns/default/sa/api-gateway";
const PAYMENT: &str = "spiffe://cluster.local/ns/default/sa/payment-service";
const OTHER: &str = "spiffe://cluster.local/ns/default/sa/other";

#[test]
fn the_seed_policy_allows_two_callers_to_get_and_post_orders() {
    let policies = [("order-service-policy", spec(SEED))];
    let authz = authorization(&applying(&policies), Layer::Http);
    for caller in [GATEWAY, PAYMENT] {
        assert!(Case::new(Some(caller), "GET", "/orders/1").http(&authz));
        assert!(Case::new(Some(caller), "POST", "/orders/1").http(&authz));
        assert!(!Case::new(Some(caller), "DELETE", "/orders/1").http(&authz));
        assert!(!Case::new(Some(caller), "GET", "/admin").http(&authz));
        assert!(!Case::new(Some(caller), "GET", "/orders").http(&authz));
    }
    assert!(!Case::new(Some(OTHER), "GET", "/orders/1").http(&authz));
    assert!(!Case::new(None, "GET", "/orders/1").http(&authz));
    assert!(check(&spec(SEED)).is_empty());
    // On a TCP port the rule has HTTP fields: Istio drops it, so the ALLOW policy matches nothing.
    let tcp = authorization(&applying(&policies), Layer::Tcp);
    assert!(!Case::new(Some(GATEWAY), "", "").tcp(&tcp));
    assert_eq!(
        tcp_findings(&spec(SEED)).len(),
        2,
        "{:?}",
        tcp_findings(&spec(SEED))
    );
}

#[test]
fn names_follow_istio() {
    let policies = [("order-service-policy", spec(SEED))];
    let authz = authorization(&applying(&policies), Layer::Http);
    let rules = authz.filters[0].rules.as_ref().unwrap();
    assert_eq!(rules.action, Action::Allow);
    assert_eq!(
        &*rules.policies[0].name,
        "ns[default]-policy[order-service-policy]-rule[0]"
    );
}

#[test]
fn empty_spec_denies_everything_and_an_empty_rule_allows_everything() {
    let nothing = [("allow-nothing", spec("{}"))];
    let authz = authorization(&applying(&nothing), Layer::Http);
    assert!(!Case::new(Some(GATEWAY), "GET", "/").http(&authz));
    assert!(!Case::new(None, "GET", "/").tcp(&authorization(&applying(&nothing), Layer::Tcp)));
    let all = [("allow-all", spec("rules: [{}]"))];
    let authz = authorization(&applying(&all), Layer::Http);
    assert!(Case::new(None, "GET", "/").http(&authz));
    // No policy at all: nothing to enforce.
    assert!(authorization(&[], Layer::Http).is_empty());
    // A DENY without rules denies nothing.
    let deny = [("deny-nothing", spec("action: DENY"))];
    assert!(Case::new(None, "GET", "/").http(&authorization(&applying(&deny), Layer::Http)));
}

#[test]
fn deny_wins_over_allow() {
    let policies = [
        ("allow-all", spec("rules: [{}]")),
        (
            "deny-admin",
            spec("action: DENY\nrules: [{ to: [{ operation: { paths: [\"/admin*\"] } }] }]"),
        ),
    ];
    let authz = authorization(&applying(&policies), Layer::Http);
    assert!(Case::new(Some(GATEWAY), "GET", "/orders").http(&authz));
    assert!(!Case::new(Some(GATEWAY), "GET", "/admin/x").http(&authz));
    let peer = Case::new(Some(GATEWAY), "GET", "/admin");
    let request = Request {
        method: "GET",
        path: "/admin",
        path_and_query: "/admin",
        authority: "a",
        headers: &peer.headers,
    };
    let mut events = Vec::new();
    let decision = authz.evaluate(&peer.peer(), Some(&request), &mut |e| {
        events.push((e.action, e.policy.map(|p| p.to_string()), e.result))
    });
    assert_eq!(
        decision,
        Decision::Denied(Some("ns[default]-policy[deny-admin]-rule[0]".into()))
    );
    assert_eq!(events.len(), 1);
}

#[test]
fn not_principals_namespaces_ip_blocks_and_ports() {
    let policies = [(
        "p",
        spec(
            r#"
rules:
- from:
  - source:
      notPrincipals: ["cluster.local/ns/default/sa/other"]
      namespaces: ["default"]
      ipBlocks: ["10.0.0.0/24"]
  to:
  - operation: { ports: ["8080"] }
"#,
        ),
    )];
    let authz = authorization(&applying(&policies), Layer::Http);
    let mut c = Case::new(Some(GATEWAY), "GET", "/");
    assert!(c.http(&authz));
    c.principal = Some(OTHER);
    assert!(!c.http(&authz), "notPrincipals");
    c.principal = Some("spiffe://cluster.local/ns/prod/sa/api-gateway");
    assert!(!c.http(&authz), "namespaces");
    c.principal = Some(GATEWAY);
    c.source = "10.0.1.1";
    assert!(!c.http(&authz), "ipBlocks");
    c.source = "10.0.0.7";
    c.port = 9090;
    assert!(!c.http(&authz), "ports");
    // Principals and namespaces come from certificates: a plaintext caller has neither.
    c.port = 8080;
    c.principal = None;
    assert!(!c.http(&authz));
    // All of these exist at L4: the same rule applies to TCP connections.
    let tcp = authorization(&applying(&policies), Layer::Tcp);
    c.principal = Some(GATEWAY);
    assert!(c.tcp(&tcp));
    c.principal = Some(OTHER);
    assert!(!c.tcp(&tcp));
}

#[test]
fn when_conditions() {
    let policies = [(
        "p",
        spec(
            r#"
rules:
- when:
  - key: request.headers[x-tenant]
    values: ["blue"]
  - key: source.principal
    notValues: ["cluster.local/ns/default/sa/other"]
  - key: destination.port
    values: ["8080"]
"#,
        ),
    )];
    let authz = authorization(&applying(&policies), Layer::Http);
    let mut c = Case::new(Some(GATEWAY), "GET", "/");
    assert!(!c.http(&authz), "no x-tenant header");
    c.headers.insert("x-tenant", "blue".parse().unwrap());
    assert!(c.http(&authz));
    c.principal = Some(OTHER);
    assert!(!c.http(&authz));
    assert!(check(&policies[0].1).is_empty());
}

#[test]
fn what_cannot_be_evaluated_fails_closed() {
    let unknown = "rules: [{ when: [{ key: \"request.auth.claims[iss]\", values: [x] }] }]";
    let allow = [("a", spec(unknown))];
    let authz = authorization(&applying(&allow), Layer::Http);
    assert!(
        !Case::new(Some(GATEWAY), "GET", "/").http(&authz),
        "ALLOW never matches"
    );
    let deny = [
        ("all", spec("rules: [{}]")),
        ("d", spec(&format!("action: DENY\n{unknown}"))),
    ];
    let authz = authorization(&applying(&deny), Layer::Http);
    assert!(
        !Case::new(Some(GATEWAY), "GET", "/").http(&authz),
        "DENY always matches"
    );
    let findings = check(&spec(unknown));
    assert_eq!(findings[0].field, "spec.rules[0].when[0].key");
    assert!(
        findings[0].problem.contains("RequestAuthentication"),
        "{findings:?}"
    );
    let findings = check(&spec("rules: [{ when: [{ key: foo.bar, values: [x] }] }]"));
    assert!(
        findings[0].problem.contains("cannot evaluate \"foo.bar\""),
        "{findings:?}"
    );
    let findings = check(&spec(
        "rules: [{ from: [{ source: { ipBlocks: [\"10.0.0.0/99\"] } }] }]",
    ));
    assert_eq!(findings[0].field, "spec.rules[0].from[0].source.ipBlocks[0]");
}

#[test]
fn custom_is_reported_and_its_rules_deny() {
    let custom = spec(
        "action: CUSTOM\nprovider: { name: ext }\nrules: [{ to: [{ operation: { paths: [\"/x\"] } }] }]",
    );
    let findings = check(&custom);
    assert_eq!(findings[0].field, "spec.action");
    let policies = [("all", spec("rules: [{}]")), ("c", custom)];
    let authz = authorization(&applying(&policies), Layer::Http);
    assert!(!Case::new(Some(GATEWAY), "GET", "/x").http(&authz));
    assert!(Case::new(Some(GATEWAY), "GET", "/y").http(&authz));
}

#[test]
fn a_deny_rule_with_http_fields_applies_to_the_whole_tcp_connection() {
    let policies = [(
        "d",
        spec(
            "action: DENY\nrules: [{ from: [{ source: { principals: [\"cluster.local/ns/default/sa/other\"] } }], to: [{ operation: { methods: [GET] } }] }]",
        ),
    )];
    let tcp = authorization(&applying(&policies), Layer::Tcp);
    assert!(!Case::new(Some(OTHER), "", "").tcp(&tcp));
    assert!(Case::new(Some(GATEWAY), "", "").tcp(&tcp));
}

#[test]
fn path_forms_and_templates() {
    let policies = [(
        "p",
        spec(
            r#"rules: [{ to: [{ operation: { paths: ["/exact", "/pre/*", "*/info", "/t/{*}/x", "/r/{**}"] } }] }]"#,
        ),
    )];
    let authz = authorization(&applying(&policies), Layer::Http);
    for (path, allowed) in [
        ("/exact", true),
        ("/exact/", false),
        ("/pre/a/b", true),
        ("/pre", false),
        ("/a/info", true),
        ("/t/1/x", true),
        ("/t/1/2/x", false),
        ("/t//x", false),
        ("/r/a/b/c", true),
        ("/r", false),
    ] {
        assert_eq!(Case::new(None, "GET", path).http(&authz), allowed, "{path}");
    }
    let findings = check(&spec(
        r#"rules: [{ to: [{ operation: { paths: ["/a/{**}/b"] } }] }]"#,
    ));
    assert!(
        findings[0].problem.contains("must be the last segment"),
        "{findings:?}"
    );
}

#[test]
fn audit_observes_and_never_blocks() {
    let policies = [(
        "audit",
        spec("action: AUDIT\nrules: [{ to: [{ operation: { paths: [\"/x\"] } }] }]"),
    )];
    let authz = authorization(&applying(&policies), Layer::Http);
    let c = Case::new(None, "GET", "/x");
    let request = Request {
        method: "GET",
        path: "/x",
        path_and_query: "/x",
        authority: "a",
        headers: &c.headers,
    };
    let mut results = Vec::new();
    let decision = authz.evaluate(&c.peer(), Some(&request), &mut |e| {
        results.push((e.result, e.shadow))
    });
    assert!(decision.is_allowed());
    assert_eq!(results, [("audited", true)]);
}

#[test]
fn unknown_fields_are_refused_by_name() {
    let err = serde_yaml_ng::from_str::<AuthorizationPolicySpec>(
        "rules: [{ from: [{ source: { principal: [x] } }] }]",
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("unknown field `principal`"), "{err}");
}
