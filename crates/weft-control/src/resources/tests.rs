use std::path::Path;

use super::*;
use crate::translate::{NodeInfo, snapshot};

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/mesh")
}

fn load(text: &str) -> (Catalog, Vec<Problem>) {
    load_files([(Path::new("test.yaml"), text)])
}

#[test]
fn the_seed_examples_load_as_written() {
    let (catalog, problems) = load_dir(&examples());
    assert_eq!(problems, vec![], "the examples must be valid");
    assert_eq!(catalog.services.len(), 2);
    assert_eq!(catalog.workload_entries.len(), 4);
    assert_eq!(catalog.virtual_services.len(), 2);
    assert_eq!(catalog.destination_rules.len(), 2);
    let order = catalog
        .virtual_services
        .iter()
        .find(|v| v.metadata.name == "order-service")
        .unwrap();
    let canary = &order.spec.http[0].matches[0].headers["x-canary"];
    assert_eq!(canary.exact.as_deref(), Some("true"));
    let split = &order.spec.http[1];
    assert_eq!(split.timeout, Some(Duration::from_secs(10)));
    let retries = split.retries.as_ref().unwrap();
    assert_eq!(
        (
            retries.attempts,
            retries.per_try_timeout,
            retries.retry_on.as_ref().map(|r| r.conditions.to_string())
        ),
        (3, Some(Duration::from_secs(2)), Some("5xx".to_owned()))
    );
    let dr = catalog
        .destination_rules
        .iter()
        .find(|d| d.metadata.name == "order-service")
        .unwrap();
    let od = dr
        .spec
        .traffic_policy
        .as_ref()
        .unwrap()
        .outlier_detection
        .as_ref()
        .unwrap();
    assert_eq!(
        (od.consecutive5xx_errors, od.max_ejection_percent),
        (Some(5), Some(50))
    );
}

#[test]
fn problems_name_file_resource_and_field() {
    let (catalog, problems) = load(
        "apiVersion: v1\nkind: Service\nmetadata: { name: web }\nspec:\n  selector: { app: web }\n  ports:\n    - { name: http, port: eighty }\n\
         ---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: { name: ghost, namespace: shop }\nspec:\n  hosts: [ghost]\n  http:\n    - route: [{ destination: { host: ghost } }]\n\
         ---\napiVersion: v1\nkind: Service\nmetadata: { name: ok }\nspec: { selector: { app: ok }, ports: [{ port: 80 }] }\n",
    );
    assert_eq!(catalog.services.len(), 1, "the valid Service still loads");
    assert_eq!(problems.len(), 2, "{problems:#?}");
    assert_eq!(problems[0].resource, "Service default/web");
    assert_eq!(problems[0].field, "spec.ports[0].port");
    assert_eq!(problems[1].resource, "VirtualService shop/ghost");
    assert_eq!(problems[1].field, "spec.http[0].route[0].destination.host");
    assert_eq!(problems[1].problem, "no Service \"ghost.shop.svc.cluster.local\"");
    assert_eq!(
        problems[1].to_string(),
        "test.yaml: VirtualService shop/ghost: field `spec.http[0].route[0].destination.host`: no Service \"ghost.shop.svc.cluster.local\""
    );
}

#[test]
fn bad_weights_subsets_and_regexes_are_reported() {
    let base = std::fs::read_to_string(examples().join("payment.yaml")).unwrap();
    let (_, problems) = load(&base.replace("weight: 10 #", "weight: 20 #"));
    assert_eq!(problems[0].problem, "weights add up to 110, not 100");
    let (_, problems) = load(&base.replace("subset: v2", "subset: v3"));
    assert_eq!(problems[0].field, "spec.http[0].route[1].destination.subset");
    let (catalog, problems) = load(&base.replace(
        "    - route:",
        "    - match: [{ uri: { regex: \"/(unclosed\" } }]\n      route:",
    ));
    assert_eq!(problems[0].field, "spec.http[0].match[0].uri");
    assert!(catalog.virtual_services.is_empty());
}

#[test]
fn port_protocols_follow_istio() {
    let port = |name: Option<&str>, app: Option<&str>| ServicePort {
        name: name.map(Into::into),
        port: 80,
        target_port: None,
        protocol: None,
        app_protocol: app.map(Into::into),
    };
    assert_eq!(port(Some("http-web"), None).protocol(), PortProtocol::Http);
    assert_eq!(port(Some("grpc"), None).protocol(), PortProtocol::Http);
    assert_eq!(port(Some("tcp-db"), None).protocol(), PortProtocol::Tcp);
    assert_eq!(port(Some("web"), Some("http")).protocol(), PortProtocol::Http);
    assert_eq!(port(Some("web"), None).protocol(), PortProtocol::Unknown);
}

#[test]
fn translation_follows_istio_names() {
    let (catalog, _) = load_dir(&examples());
    let node = NodeInfo {
        workload: "order-v1".into(),
        namespace: "default".into(),
    };
    let snap = snapshot(&catalog, &node);
    let names = |ty: &str| snap.types[ty].resources.keys().cloned().collect::<Vec<_>>();
    let clusters = names("type.googleapis.com/envoy.config.cluster.v3.Cluster");
    for expected in [
        "outbound|8080||order-svc.default.svc.cluster.local",
        "outbound|8080|v2|order-svc.default.svc.cluster.local",
        "outbound|80|v1|payment.default.svc.cluster.local",
        "PassthroughCluster",
    ] {
        assert!(
            clusters.contains(&expected.to_owned()),
            "{expected} missing from {clusters:?}"
        );
    }
    assert_eq!(
        names("type.googleapis.com/envoy.config.listener.v3.Listener"),
        ["0.0.0.0_80", "0.0.0.0_8080", "virtualInbound", "virtualOutbound"]
    );
    assert_eq!(
        names("type.googleapis.com/envoy.config.route.v3.RouteConfiguration"),
        ["80", "8080"]
    );

    // The proxy's own conversion accepts every resource the control plane makes.
    for any in snap.types["type.googleapis.com/envoy.config.listener.v3.Listener"]
        .resources
        .values()
    {
        let l: envoy_types::pb::envoy::config::listener::v3::Listener =
            prost::Message::decode(any.value.as_slice()).unwrap();
        assert!(!l.name.is_empty());
    }

    // The seed's h2UpgradePolicy: UPGRADE reaches the proxy as Istio states it, HTTP/2 to the
    // cluster (the proxy acts on it for mesh clusters, mutual TLS); a service without it does not.
    let upgrades = |name: &str| {
        use envoy_types::pb::envoy::extensions::upstreams::http::v3::HttpProtocolOptions;
        use envoy_types::pb::envoy::extensions::upstreams::http::v3::http_protocol_options::UpstreamProtocolOptions;
        let any = &snap.types["type.googleapis.com/envoy.config.cluster.v3.Cluster"].resources[name];
        let c: envoy_types::pb::envoy::config::cluster::v3::Cluster =
            prost::Message::decode(any.value.as_slice()).unwrap();
        c.typed_extension_protocol_options.values().any(|o| {
            let o: HttpProtocolOptions = prost::Message::decode(o.value.as_slice()).unwrap();
            matches!(
                o.upstream_protocol_options,
                Some(UpstreamProtocolOptions::ExplicitHttpConfig(_))
            )
        })
    };
    assert!(upgrades("outbound|8080||order-svc.default.svc.cluster.local"));
    assert!(upgrades("outbound|8080|v2|order-svc.default.svc.cluster.local"));
    assert!(!upgrades("outbound|80|v1|payment.default.svc.cluster.local"));

    // Versions are content hashes: the same input gives the same versions; other input, others.
    assert_eq!(snapshot(&catalog, &node), snap);
    let other = NodeInfo {
        workload: "payment-v1".into(),
        namespace: "default".into(),
    };
    let other_snap = snapshot(&catalog, &other);
    let cds = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
    let lds = "type.googleapis.com/envoy.config.listener.v3.Listener";
    assert_eq!(
        other_snap.types[cds].version, snap.types[cds].version,
        "clusters do not depend on the node"
    );
    assert_ne!(
        other_snap.types[lds].version, snap.types[lds].version,
        "its inbound listener does"
    );
}

#[test]
fn a_rule_that_keeps_http1_between_sidecars_is_refused_by_name() {
    let rule = |policy: &str| {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{ name: web }}\nspec:\n  host: web\n  trafficPolicy:\n    connectionPool:\n      http: {{ h2UpgradePolicy: {policy} }}\n"
        )
    };
    for accepted in ["UPGRADE", "DEFAULT"] {
        let (catalog, problems) = load(&rule(accepted));
        assert!(problems.is_empty(), "{accepted}: {problems:#?}");
        assert_eq!(catalog.destination_rules.len(), 1);
    }
    let (catalog, problems) = load(&rule("DO_NOT_UPGRADE"));
    assert!(catalog.destination_rules.is_empty());
    assert_eq!(problems.len(), 1, "{problems:#?}");
    assert_eq!(problems[0].resource, "DestinationRule default/web");
    assert_eq!(
        problems[0].field,
        "spec.trafficPolicy.connectionPool.http.h2UpgradePolicy"
    );
    assert!(
        problems[0]
            .problem
            .contains("\"DO_NOT_UPGRADE\" is not supported"),
        "{}",
        problems[0]
    );
}

#[test]
fn upgrade_reaches_a_mesh_cluster_over_xds() {
    let text = |policy: &str| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{ name: web }}\nspec: {{ selector: {{ app: web }}, ports: [{{ name: http, port: 80 }}] }}\n\
             ---\napiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {{ name: web-1 }}\nspec:\n  address: 127.0.0.1\n  serviceAccount: web\n  labels: {{ app: web, security.istio.io/tlsMode: istio }}\n\
             ---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{ name: web }}\nspec:\n  host: web\n  trafficPolicy:\n    connectionPool:\n      http: {{ h2UpgradePolicy: {policy} }}\n"
        )
    };
    let node = NodeInfo {
        workload: "client".into(),
        namespace: "default".into(),
    };
    for (policy, upgraded) in [("UPGRADE", true), ("DEFAULT", false)] {
        let (catalog, problems) = load(&text(policy));
        assert!(problems.is_empty(), "{problems:#?}");
        let snap = snapshot(&catalog, &node);
        let any = &snap.types["type.googleapis.com/envoy.config.cluster.v3.Cluster"].resources["outbound|80||web.default.svc.cluster.local"];
        let c: envoy_types::pb::envoy::config::cluster::v3::Cluster =
            prost::Message::decode(any.value.as_slice()).unwrap();
        let tls = weft_xds::convert::cluster(&c)
            .unwrap()
            .tls
            .expect("a mesh cluster");
        assert_eq!(tls.http2_upgrade, upgraded, "{policy}");
    }
}

#[test]
fn istio_fields_weft_does_not_apply_are_named_and_the_rest_is_kept() {
    let (catalog, problems) = load(
        "apiVersion: v1\nkind: Service\nmetadata: { name: reviews }\n\
         spec: { selector: { app: reviews }, type: ClusterIP, sessionAffinity: None, ports: [{ name: http, port: 9080 }] }\n\
         ---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: { name: reviews }\n\
         spec:\n  hosts: [reviews]\n  http:\n  - fault: { abort: { httpStatus: 500 } }\n    route: [{ destination: { host: reviews } }]\n\
         ---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: { name: reviews }\n\
         spec: { host: reviews, trafficPolicy: { loadBalancer: { consistentHash: { httpHeaderName: x-user } } } }\n",
    );
    let fields: Vec<_> = problems
        .iter()
        .map(|p| (p.resource.as_str(), p.field.as_str()))
        .collect();
    assert_eq!(
        fields,
        vec![
            ("VirtualService default/reviews", "spec.http[0].fault"),
            (
                "DestinationRule default/reviews",
                "spec.trafficPolicy.loadBalancer.consistentHash"
            ),
        ],
        "the Service's fields that do not concern the mesh are not reported: {problems:?}"
    );
    assert!(problems.iter().all(|p| p.problem.contains("not applied")));
    assert_eq!(
        catalog.virtual_services.len(),
        1,
        "the route itself is still served"
    );
    assert_eq!(catalog.destination_rules.len(), 1);
}

#[test]
fn port_level_mtls_ports_read_from_yaml_numbers_and_json_strings() {
    let policy = |ports: &str| {
        load(&format!(
            "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{ name: p }}\n\
             spec: {{ selector: {{ matchLabels: {{ app: a }} }}, portLevelMtls: {ports} }}\n"
        ))
    };
    for ports in ["{ 8080: { mode: DISABLE } }", "{ \"8080\": { mode: DISABLE } }"] {
        let (catalog, problems) = policy(ports);
        assert_eq!(problems, vec![], "{ports}");
        let modes = &catalog.peer_authentications[0].spec.port_level_mtls;
        assert_eq!(modes[&PortNumber(8080)].mode, MtlsMode::Disable, "{ports}");
    }
    let (catalog, problems) = policy("{ 0: { mode: DISABLE } }");
    assert!(catalog.peer_authentications.is_empty());
    assert_eq!(problems[0].field, "spec.portLevelMtls.0", "{problems:?}");
}

/// Istio's scoping: a Service's `exportTo` annotation, a VirtualService's and DestinationRule's
/// `exportTo`, and the Sidecar that applies to a workload (by selector, its namespace's, the root
/// namespace's) decide what each proxy is sent.
#[test]
fn each_proxy_is_sent_what_its_namespace_sees() {
    let service = |name: &str, ns: &str, annotations: &str| {
        format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{ name: {name}, namespace: {ns}, annotations: {{ {annotations} }} }}\n\
             spec: {{ selector: {{ app: {name} }}, ports: [{{ name: http, port: 80 }}] }}\n\
             ---\napiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {{ name: {name}, namespace: {ns} }}\n\
             spec: {{ address: 10.0.0.1, labels: {{ app: {name} }} }}\n"
        )
    };
    let text = [
        service("web", "shop", ""),
        service("cart", "shop", ""),
        service("ratings", "reviews", ""),
        service("stars", "reviews", ""),
        service("ledger", "bank", "networking.istio.io/exportTo: \".\""),
        service("audit", "bank", "networking.istio.io/exportTo: \"shop, bank\""),
        "---\napiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: { name: default, namespace: shop }\n\
         spec: { egress: [{ hosts: [\"./*\", \"reviews/ratings.reviews.svc.cluster.local\", \"bank/*\"] }] }\n\
         ---\napiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: { name: locked, namespace: shop }\n\
         spec: { workloadSelector: { labels: { app: cart } }, egress: [{ hosts: [\"./web.shop.svc.cluster.local\"] }], outboundTrafficPolicy: { mode: REGISTRY_ONLY } }\n\
         ---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: { name: ratings, namespace: reviews }\n\
         spec: { hosts: [ratings], exportTo: [\".\"], http: [{ timeout: 3s, route: [{ destination: { host: ratings } }] }] }\n"
            .to_owned(),
    ]
    .concat();
    let (catalog, problems) = load(&text);
    assert_eq!(problems, vec![]);
    let clusters = |workload: &str, namespace: &str| {
        let snap = snapshot(
            &catalog,
            &NodeInfo {
                workload: workload.into(),
                namespace: namespace.into(),
            },
        );
        snap.types["type.googleapis.com/envoy.config.cluster.v3.Cluster"]
            .resources
            .keys()
            .filter_map(|k| k.strip_prefix("outbound|80||"))
            .map(|k| k.trim_end_matches(".svc.cluster.local").to_owned())
            .chain(
                snap.types["type.googleapis.com/envoy.config.cluster.v3.Cluster"]
                    .resources
                    .keys()
                    .filter(|k| *k == "BlackHoleCluster")
                    .cloned(),
            )
            .collect::<Vec<_>>()
    };
    // The namespace's Sidecar: its own services, one of reviews', what bank exports to it.
    assert_eq!(
        clusters("web", "shop"),
        ["audit.bank", "cart.shop", "ratings.reviews", "web.shop"]
    );
    // The Sidecar selecting cart wins over the namespace's, and refuses the rest.
    assert_eq!(clusters("cart", "shop"), ["web.shop", "BlackHoleCluster"]);
    // No Sidecar in reviews: everything exported to it.
    assert_eq!(
        clusters("ratings", "reviews"),
        ["cart.shop", "ratings.reviews", "stars.reviews", "web.shop"]
    );
    assert_eq!(
        clusters("ledger", "bank"),
        [
            "audit.bank",
            "cart.shop",
            "ledger.bank",
            "ratings.reviews",
            "stars.reviews",
            "web.shop"
        ]
    );

    // A VirtualService exported to its own namespace routes there only.
    let timeout_of = |namespace: &str| {
        let snap = snapshot(
            &catalog,
            &NodeInfo {
                workload: "x".into(),
                namespace: namespace.into(),
            },
        );
        let routes =
            &snap.types["type.googleapis.com/envoy.config.route.v3.RouteConfiguration"].resources["80"];
        let routes =
            <envoy_types::pb::envoy::config::route::v3::RouteConfiguration as prost::Message>::decode(
                routes.value.as_slice(),
            )
            .unwrap();
        let vhost = routes
            .virtual_hosts
            .iter()
            .find(|v| v.domains.iter().any(|d| d == "ratings.reviews.svc.cluster.local"))
            .unwrap();
        match &vhost.routes[0].action {
            Some(envoy_types::pb::envoy::config::route::v3::route::Action::Route(r)) => r.timeout,
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(timeout_of("reviews").map(|t| t.seconds), Some(3));
    assert_eq!(
        timeout_of("shop").map(|t| t.seconds),
        Some(0),
        "shop gets the default route"
    );
}

#[test]
fn scoping_that_does_not_parse_is_refused_by_name() {
    let (catalog, problems) = load(
        "apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: { name: s, namespace: shop }\n\
         spec: { egress: [{ hosts: [\"reviews.default.svc.cluster.local\"] }] }\n\
         ---\napiVersion: v1\nkind: Service\nmetadata: { name: a, annotations: { networking.istio.io/exportTo: \"Shop\" } }\n\
         spec: { ports: [{ port: 80 }] }\n",
    );
    assert!(catalog.sidecars.is_empty() && catalog.services.is_empty());
    let fields: Vec<_> = problems.iter().map(|p| p.field.as_str()).collect();
    assert_eq!(
        fields,
        [
            "metadata.annotations.networking.istio.io/exportTo",
            "spec.egress[0].hosts[0]"
        ],
        "{problems:?}"
    );
}

/// Loading a directory again parses only the files that changed, and gives what a fresh load gives.
#[test]
fn a_directory_loaded_again_parses_only_the_changed_files() {
    let dir = tempfile::tempdir().unwrap();
    let service = |name: &str, port: u16| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{ name: {name} }}\nspec: {{ selector: {{ app: {name} }}, ports: [{{ port: {port} }}] }}\n"
        )
    };
    for name in ["a", "b", "c"] {
        std::fs::write(dir.path().join(format!("{name}.yaml")), service(name, 80)).unwrap();
    }
    let mut loader = DirLoader::default();
    let (first, problems) = loader.load(dir.path());
    assert!(problems.is_empty(), "{problems:?}");
    assert_eq!((first.services.len(), loader.parsed), (3, 3));

    // A different size, so the change shows whatever the file system's time resolution.
    std::fs::write(dir.path().join("b.yaml"), service("b", 8080)).unwrap();
    std::fs::write(dir.path().join("d.yaml"), "kind: [broken\n").unwrap();
    std::fs::remove_file(dir.path().join("c.yaml")).unwrap();
    let (second, problems) = loader.load(dir.path());
    assert_eq!(loader.parsed, 2, "only b.yaml and the new d.yaml are parsed");
    assert_eq!(
        (second, problems),
        load_dir(dir.path()),
        "the same as a fresh load"
    );
    let (again, _) = loader.load(dir.path());
    assert_eq!(loader.parsed, 0);
    assert_eq!(
        again
            .services
            .iter()
            .map(|s| s.spec.ports[0].port)
            .collect::<Vec<_>>(),
        [80, 8080]
    );
}
