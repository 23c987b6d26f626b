use std::net::SocketAddr;
use std::time::Duration;

use crate::file::ParseError;
use crate::*;

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn invalid(text: &str) -> (String, String) {
    match parse(text) {
        Err(ParseError::Invalid(i)) => (i.field, i.problem),
        other => panic!("expected a validation error, got {other:?}"),
    }
}

#[test]
fn empty_file_is_local_defaults() {
    let (bootstrap, mesh) = parse("").unwrap();
    assert_eq!(bootstrap.mode, Mode::Local);
    assert_eq!(bootstrap.admin_address, addr("127.0.0.1:15000"));
    assert_eq!(bootstrap.readiness_address, addr("127.0.0.1:15021"));
    assert_eq!(bootstrap.drain_timeout, Duration::from_secs(5));
    assert_eq!(mesh.outbound.as_ref().unwrap().address, addr("127.0.0.1:15001"));
    assert_eq!(mesh.inbound.as_ref().unwrap().address, addr("127.0.0.1:15006"));
    assert_eq!(mesh.outbound.unwrap().egress, Egress::AllowAny);
}

#[test]
fn pod_mode_binds_all_addresses() {
    let (bootstrap, mesh) = parse("mode: pod").unwrap();
    assert_eq!(
        bootstrap.admin_address,
        addr("127.0.0.1:15000"),
        "admin stays on loopback"
    );
    assert_eq!(bootstrap.readiness_address, addr("[::]:15021"));
    assert_eq!(bootstrap.status.map(|s| s.address), Some(addr("[::]:15020")));
    assert!(
        parse("").unwrap().0.status.is_none(),
        "no status port on a developer's machine"
    );
    assert_eq!(mesh.outbound.unwrap().address, addr("[::]:15001"));
    assert_eq!(mesh.inbound.unwrap().address, addr("[::]:15006"));
}

#[test]
fn inbound_reaches_the_app_where_the_caller_was_going_in_a_pod() {
    let (_, mesh) = parse("mode: pod").unwrap();
    let inbound = mesh.inbound.unwrap();
    let pod_ip = addr("10.1.0.7:8080");
    assert_eq!(inbound.app_for(pod_ip), pod_ip);
    assert_eq!(inbound.source_for(pod_ip), Some("127.0.0.6".parse().unwrap()));
    let pod_ip6 = addr("[fd00::7]:8080");
    assert_eq!(inbound.source_for(pod_ip6), Some("::6".parse().unwrap()));

    let (_, mesh) = parse("").unwrap();
    let inbound = mesh.inbound.unwrap();
    assert_eq!(inbound.app_for(pod_ip), addr("127.0.0.1:8080"));
    assert_eq!(inbound.source_for(pod_ip), None);

    let (_, mesh) = parse("mode: pod\ninbound: { app_address: 127.0.0.1 }").unwrap();
    assert_eq!(mesh.inbound.unwrap().app_for(pod_ip), addr("127.0.0.1:8080"));
}

const FULL: &str = r#"
node: { workload: productpage-v1, namespace: bookinfo }
drain_timeout: 10s
detect_timeout: 150ms
outbound:
  egress: registry_only
  services:
    - { address: 10.96.0.20:9080, cluster: reviews, protocol: http }
    - { address: 0.0.0.0:3306, cluster: db, protocol: mysql }
inbound:
  ports:
    - { port: 9080, protocol: http }
listeners:
  - { name: reviews-local, address: 127.0.0.1:18080, cluster: reviews }
clusters:
  - name: reviews
    endpoints: [127.0.0.1:9081, 127.0.0.1:9082]
    connect_timeout: 1s
  - name: db
    endpoints: ["[::1]:3306"]
"#;

#[test]
fn full_file() {
    let (bootstrap, mesh) = parse(FULL).unwrap();
    assert_eq!(bootstrap.node.workload, "productpage-v1");
    assert_eq!(bootstrap.node.namespace, "bookinfo");
    assert_eq!(bootstrap.drain_timeout, Duration::from_secs(10));
    assert_eq!(mesh.detect_timeout, Duration::from_millis(150));

    let outbound = mesh.outbound.as_ref().unwrap();
    assert_eq!(outbound.egress, Egress::RegistryOnly);
    let reviews = outbound.service_for(addr("10.96.0.20:9080")).unwrap();
    assert_eq!(reviews.cluster.as_ref().unwrap().name, "reviews");
    assert_eq!(reviews.protocol, Protocol::Http);
    assert_eq!(
        reviews.cluster.as_ref().unwrap().endpoints,
        vec![
            Endpoint::new(addr("127.0.0.1:9081")),
            Endpoint::new(addr("127.0.0.1:9082"))
        ]
    );
    assert_eq!(
        reviews.cluster.as_ref().unwrap().connect_timeout,
        Duration::from_secs(1)
    );
    // The wildcard service matches any address on its port, and a MySQL port is opaque.
    let db = outbound.service_for(addr("10.1.2.3:3306")).unwrap();
    assert_eq!(
        (db.cluster.as_ref().unwrap().name.as_str(), db.protocol),
        ("db", Protocol::Tcp)
    );
    assert!(outbound.service_for(addr("10.96.0.20:9081")).is_none());

    let inbound = mesh.inbound.as_ref().unwrap();
    assert_eq!(inbound.app_for(addr("10.0.0.7:9080")), addr("127.0.0.1:9080"));
    assert_eq!(inbound.protocol_for(9080), Protocol::Http);
    assert_eq!(inbound.protocol_for(5432), Protocol::Detect);

    assert_eq!(mesh.listeners[0].target.cluster.as_ref().unwrap().name, "reviews");
}

#[test]
fn config_dump_is_stable_json_ready() {
    let (_, mesh) = parse(FULL).unwrap();
    let a = format!("{mesh:?}");
    assert!(a.contains("reviews"));
    // Serializing twice gives the same text: maps are emitted sorted.
    let yaml1 = serde_yaml_ng::to_string(&mesh).unwrap();
    let yaml2 = serde_yaml_ng::to_string(&mesh).unwrap();
    assert_eq!(yaml1, yaml2);
    assert!(yaml1.contains("0.0.0.0:3306"), "{yaml1}");
}

#[test]
fn reference_errors_name_the_field() {
    let (field, problem) = invalid("listeners: [{ name: a, address: 127.0.0.1:1, cluster: nope }]");
    assert_eq!(field, "listeners[0].cluster");
    assert_eq!(problem, "unknown cluster \"nope\"");

    let (field, _) = invalid("outbound: { services: [{ address: 1.2.3.4:80, cluster: x }] }");
    assert_eq!(field, "outbound.services[0].cluster");
}

#[test]
fn duplicates_are_rejected() {
    let (field, problem) = invalid("clusters: [{ name: a }, { name: a }]");
    assert_eq!(
        (field.as_str(), problem.as_str()),
        ("clusters[1].name", "duplicate cluster name \"a\"")
    );

    let (field, problem) =
        invalid("clusters: [{ name: a }]\nlisteners: [{ name: l, address: 127.0.0.1:15000, cluster: a }]");
    assert_eq!(field, "listeners[0].address");
    assert!(problem.contains("admin.address"), "{problem}");
}

#[test]
fn unusable_endpoints_are_rejected() {
    let (field, _) = invalid("clusters: [{ name: a, endpoints: [127.0.0.1:80, 0.0.0.0:80] }]");
    assert_eq!(field, "clusters[0].endpoints[1]");
    let (field, _) = invalid("clusters: [{ name: a, connect_timeout: 0s }]");
    assert_eq!(field, "clusters[0].connect_timeout");
}

#[test]
fn syntax_and_type_errors_say_where() {
    let err = parse("clusters: [{ name: a, endpoints: [not-an-address] }]")
        .unwrap_err()
        .to_string();
    assert!(err.contains("clusters[0].endpoints[0]"), "{err}");
    let err = parse("drain_timeout: soon").unwrap_err().to_string();
    assert!(err.contains("drain_timeout"), "{err}");
    let err = parse("admin: { adress: 127.0.0.1:1 }").unwrap_err().to_string();
    assert!(err.contains("unknown field `adress`"), "{err}");
    let err = parse("inbound: { ports: [{ port: 80, protocol: smtp2 }] }")
        .unwrap_err()
        .to_string();
    assert!(err.contains("inbound.ports[0].protocol"), "{err}");
}

#[test]
fn load_file_names_the_file() {
    let dir = std::env::temp_dir().join(format!("weft-model-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("bad.yaml");
    std::fs::write(&path, "clusters: [{ name: a }, { name: a }]").unwrap();
    let err = load_file(&path).unwrap_err().to_string();
    assert!(err.starts_with(&path.display().to_string()), "{err}");
    assert!(err.contains("field `clusters[1].name`"), "{err}");
    let err = load_file(&dir.join("missing.yaml")).unwrap_err().to_string();
    assert!(err.contains("missing.yaml: cannot read"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_shipped_example_is_valid() {
    let example = include_str!("../../../examples/proxy.yaml");
    let (bootstrap, mesh) = parse(example).unwrap();
    assert_eq!(bootstrap.node.workload, "productpage-v1");
    assert_eq!(mesh.clusters.len(), 2);
    assert_eq!(mesh.listeners[0].name, "reviews-local");
}

const ROUTED: &str = r#"
outbound:
  services:
    - { address: 10.96.0.30:80, route: orders, cluster: orders-v1 }
clusters:
  - { name: orders-v1, endpoints: [127.0.0.1:9001, { address: 127.0.0.1:9002, weight: 3 }], lb_policy: RANDOM }
  - { name: orders-v2, endpoints: [127.0.0.1:9003] }
routes:
  - name: orders
    virtual_hosts:
      - name: orders
        domains: [orders, "orders:80"]
        routes:
          - match: { headers: [{ name: X-Canary, exact: "true" }] }
            cluster: orders-v2
          - match: { prefix: /api }
            clusters: [{ name: orders-v1, weight: 90 }, { name: orders-v2, weight: 10 }]
            timeout: 10s
"#;

#[test]
fn static_routes() {
    let (_, mesh) = parse(ROUTED).unwrap();
    let target = mesh
        .outbound
        .as_ref()
        .unwrap()
        .service_for(addr("10.96.0.30:80"))
        .unwrap();
    assert_eq!(target.route.name, "orders");
    let v1 = &mesh.clusters["orders-v1"];
    assert_eq!(v1.lb_policy, LbPolicy::Random);
    assert_eq!(
        v1.endpoints[1],
        Endpoint {
            weight: 3,
            ..Endpoint::new(addr("127.0.0.1:9002"))
        }
    );
    let vhost = &target.route.virtual_hosts()[0];
    assert_eq!(
        vhost.routes[0].matcher.headers[0].name, "x-canary",
        "header names are case-insensitive"
    );
    let api = &vhost.routes[1].action;
    assert_eq!(api.timeout, Some(Duration::from_secs(10)));
    assert_eq!(
        vhost.routes[0].action.timeout,
        Some(Duration::from_secs(15)),
        "Envoy's default route timeout"
    );
    assert_eq!(
        api.clusters
            .iter()
            .map(|c| (c.name.as_str(), c.weight))
            .collect::<Vec<_>>(),
        [("orders-v1", 90), ("orders-v2", 10)]
    );
}

#[test]
fn route_errors_name_the_field() {
    let bad = ROUTED.replace("name: orders-v2, weight: 10", "name: orders-v3, weight: 10");
    let (field, problem) = invalid(&bad);
    assert_eq!(field, "routes[0].virtual_hosts[0].routes[1].clusters[1].name");
    assert_eq!(problem, "unknown cluster \"orders-v3\"");
    let bad = ROUTED.replace("prefix: /api", "regex: \"(unclosed\"");
    let (field, problem) = invalid(&bad);
    assert_eq!(field, "routes[0].virtual_hosts[0].routes[1].match.regex");
    assert!(problem.starts_with("invalid regex"), "{problem}");
    let (field, _) = invalid("outbound: { services: [{ address: 1.2.3.4:80 }] }");
    assert_eq!(field, "outbound.services[0]");
    let (field, _) = invalid("outbound: { services: [{ address: 1.2.3.4:80, route: nope }] }");
    assert_eq!(field, "outbound.services[0].route");
}

#[test]
fn an_identity_comes_from_a_ca_or_from_certificate_files_and_half_of_each_is_refused_by_name() {
    let node = "node: { namespace: shop, service_account: reviews }\n";
    let (bootstrap, _) = parse(&format!(
        "{node}identity: {{ cert_file: /c/tls.crt, key_file: /c/tls.key, roots_file: /c/ca.crt }}"
    ))
    .unwrap();
    let identity = bootstrap.identity.unwrap();
    assert_eq!(identity.id, "spiffe://cluster.local/ns/shop/sa/reviews");
    assert!(matches!(
        identity.provider,
        crate::CertificateProvider::Files(ref files) if files.cert_file.as_os_str() == "/c/tls.crt"
    ));
    let (bootstrap, _) = parse(&format!(
        "{node}identity: {{ ca_address: http://127.0.0.1:15010, token: t }}"
    ))
    .unwrap();
    assert!(matches!(
        bootstrap.identity.unwrap().provider,
        crate::CertificateProvider::Ca { .. }
    ));

    let refused = [
        (
            "identity: { cert_file: /c/tls.crt, key_file: /c/tls.key }",
            "identity",
            "all of cert_file",
        ),
        (
            "identity: { ca_address: http://127.0.0.1:15010, token: t, cert_file: /c/tls.crt }",
            "identity",
            "not both",
        ),
        ("identity: { token: t }", "identity", "give ca_address"),
        (
            "identity: { cert_file: /a, key_file: /b, roots_file: /c, token: t }",
            "identity.token",
            "not to certificate files",
        ),
        (
            "identity: { cert_file: /a, key_file: /b, roots_file: /c, validity: 1h }",
            "identity.validity",
            "not to certificate files",
        ),
    ];
    for (yaml, field, problem) in refused {
        let (f, p) = invalid(&format!("{node}{yaml}"));
        assert_eq!(f, field, "{yaml}: {p}");
        assert!(p.contains(problem), "{yaml}: {p}");
    }
}
