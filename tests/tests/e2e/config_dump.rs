//! `/config_dump` in Envoy's shape: what `istioctl proxy-config` and other Envoy tooling read, checked by
//! decoding the JSON back into `envoy.admin.v3.ConfigDump` with Envoy's own descriptors.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use envoy_types::pb::envoy::admin::v3::{
    BootstrapConfigDump, ClientResourceStatus, ClustersConfigDump, ConfigDump, EndpointsConfigDump,
    ListenersConfigDump, RoutesConfigDump, SecretsConfigDump,
};
use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::core::v3::data_source::Specifier;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{Secret, secret};
use envoy_types::pb::google::protobuf::Any;
use prost::Message;
use weft_control::ControlPlane;
use weft_test_support::http::HttpServer;
use weft_test_support::{TestProxy, admin_get, assert_eventually};

fn unpack<M: Message + Default>(any: &Any) -> M {
    M::decode(any.value.as_slice()).unwrap_or_else(|e| panic!("{}: {e}", any.type_url))
}

/// The dump's config of type `M`, by its type URL.
fn config<M: Message + Default>(dump: &ConfigDump, name: &str) -> Option<M> {
    dump.configs
        .iter()
        .find(|c| c.type_url == format!("type.googleapis.com/envoy.admin.v3.{name}"))
        .map(unpack)
}

async fn dump(admin: std::net::SocketAddr, query: &str) -> (serde_json::Value, ConfigDump) {
    let (status, body) = admin_get(admin, &format!("/config_dump{query}")).await;
    assert_eq!(status, 200, "{body}");
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    let decoded = weft_xds::dump::decode_admin::<ConfigDump>(&json).unwrap_or_else(|e| panic!("{e}\n{body}"));
    (json, decoded)
}

/// A sidecar (`sidecar~client`) configured by weft control over TLS with the order service's canary
/// (`v1`, `v2`), its certificate from the CA, and a `front` listener to an `app` cluster of its own file.
pub(crate) struct OrderSidecar {
    pub(crate) v1: HttpServer,
    pub(crate) v2: HttpServer,
    pub(crate) app: HttpServer,
    pub(crate) cp: ControlPlane,
    /// weft control's TLS port (xDS and the CA).
    pub(crate) tls: std::net::SocketAddr,
    pub(crate) proxy: TestProxy,
    _dir: tempfile::TempDir,
}

impl OrderSidecar {
    /// Once the sidecar is ready.
    pub(crate) async fn start() -> Self {
        let v1 = HttpServer::start("v1").await;
        let v2 = HttpServer::start("v2").await;
        let app = HttpServer::start("app").await;
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("order.yaml"), crate::xds::order_yaml(&v1, &v2)).unwrap();
        let mut cp = ControlPlane::start(dir.path().into(), "127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let tls = cp.serve_tls("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let root = dir.path().join("root.pem");
        std::fs::write(&root, cp.ca().root_pem()).unwrap();
        let token = cp
            .ca()
            .tokens()
            .issue("default", "client", Duration::from_secs(3600))
            .unwrap();
        let proxy = TestProxy::start(&crate::mtls::sidecar_over_tls(
            "id: sidecar~client, workload: client, namespace: default, service_account: client",
            tls.port(),
            &root,
            &token,
            app.addr,
        ))
        .await;
        assert_eventually!(admin_get(proxy.admin(), "/ready").await.0 == 200, "not ready");
        Self {
            v1,
            v2,
            app,
            cp,
            tls,
            proxy,
            _dir: dir,
        }
    }
}

/// The dump holds all of an `OrderSidecar`'s configuration, as Envoy lays it out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_config_dump_is_envoys_with_xds_resources_static_config_and_secrets() {
    let sidecar = OrderSidecar::start().await;
    let (proxy, cp, tls) = (&sidecar.proxy, &sidecar.cp, sidecar.tls);
    let (v1, v2) = (&sidecar.v1, &sidecar.v2);

    let (json, all) = dump(proxy.admin(), "?include_eds").await;
    let text = json.to_string();
    assert!(!text.contains("PRIVATE KEY"), "the key never leaves the proxy");

    let bootstrap: BootstrapConfigDump = config(&all, "BootstrapConfigDump").unwrap();
    let bootstrap = bootstrap.bootstrap.unwrap();
    let node = bootstrap.node.unwrap();
    assert_eq!(node.id, "sidecar~client");
    assert_eq!(node.cluster, "client.default");
    let statics = bootstrap.static_resources.unwrap();
    assert_eq!(
        statics
            .clusters
            .iter()
            .map(|c| c.name.as_str())
            .collect::<Vec<_>>(),
        ["app"],
        "only the file's cluster is static"
    );
    assert!(statics.listeners.iter().any(|l| l.name == "front"), "{statics:?}");
    let ads = bootstrap.dynamic_resources.unwrap().ads_config.unwrap();
    assert!(format!("{ads:?}").contains(&format!("localhost:{}", tls.port())));

    let clusters: ClustersConfigDump = config(&all, "ClustersConfigDump").unwrap();
    assert!(!clusters.version_info.is_empty());
    let static_names: Vec<String> = clusters
        .static_clusters
        .iter()
        .map(|c| unpack::<Cluster>(c.cluster.as_ref().unwrap()).name)
        .collect();
    assert_eq!(static_names, ["app"]);
    let dynamic: Vec<String> = clusters
        .dynamic_active_clusters
        .iter()
        .map(|c| {
            assert_eq!(c.client_status, ClientResourceStatus::Acked as i32);
            assert!(c.last_updated.is_some() && !c.version_info.is_empty());
            unpack::<Cluster>(c.cluster.as_ref().unwrap()).name
        })
        .collect();
    for subset in ["v1", "v2"] {
        let name = format!("outbound|8080|{subset}|order-svc.default.svc.cluster.local");
        assert!(dynamic.contains(&name), "{name} not in {dynamic:?}");
    }

    let listeners: ListenersConfigDump = config(&all, "ListenersConfigDump").unwrap();
    assert!(!listeners.dynamic_listeners.is_empty());
    for listener in &listeners.dynamic_listeners {
        let active = listener.active_state.as_ref().unwrap();
        assert_eq!(
            unpack::<Listener>(active.listener.as_ref().unwrap()).name,
            listener.name
        );
    }
    let routes: RoutesConfigDump = config(&all, "RoutesConfigDump").unwrap();
    let route_text: Vec<String> = routes
        .dynamic_route_configs
        .iter()
        .map(|r| {
            format!(
                "{:?}",
                unpack::<RouteConfiguration>(r.route_config.as_ref().unwrap())
            )
        })
        .collect();
    assert!(
        route_text.iter().any(|r| r.contains("x-canary")),
        "the canary header match is in a route: {route_text:?}"
    );

    let endpoints: EndpointsConfigDump = config(&all, "EndpointsConfigDump").unwrap();
    let endpoint_text: String = endpoints
        .dynamic_endpoint_configs
        .iter()
        .map(|e| {
            format!(
                "{:?}",
                unpack::<ClusterLoadAssignment>(e.endpoint_config.as_ref().unwrap())
            )
        })
        .collect();
    for server in [&v1, &v2] {
        assert!(
            endpoint_text.contains(&format!("PortValue({})", server.addr.port())),
            "{endpoint_text}"
        );
    }
    assert_eq!(endpoints.static_endpoint_configs.len(), 1, "the file's cluster");

    let secrets: SecretsConfigDump = config(&all, "SecretsConfigDump").unwrap();
    let secret = |name: &str| -> Secret {
        let s = secrets
            .dynamic_active_secrets
            .iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("no secret {name}"));
        unpack(s.secret.as_ref().unwrap())
    };
    let Some(secret::Type::TlsCertificate(certificate)) = secret("default").r#type else {
        panic!("default is not a certificate")
    };
    let Some(Specifier::InlineBytes(chain)) = certificate.certificate_chain.unwrap().specifier else {
        panic!("no chain")
    };
    let chain = String::from_utf8(chain).unwrap();
    let (_, certs) = admin_get(proxy.admin(), "/certs").await;
    let leaf = chain.lines().nth(1).unwrap();
    assert!(
        certs.contains("spiffe://cluster.local/ns/default/sa/client"),
        "{certs}"
    );
    assert!(chain.starts_with("-----BEGIN CERTIFICATE-----") && !leaf.is_empty());
    assert_eq!(
        certificate.private_key.unwrap().specifier,
        Some(Specifier::InlineString("[redacted]".into()))
    );
    let Some(secret::Type::ValidationContext(roots)) = secret("ROOTCA").r#type else {
        panic!("ROOTCA is not a validation context")
    };
    let Some(Specifier::InlineBytes(roots)) = roots.trusted_ca.unwrap().specifier else {
        panic!("no roots")
    };
    assert_eq!(
        String::from_utf8(roots).unwrap().trim(),
        cp.ca().root_pem().trim()
    );

    // Without include_eds there are no endpoints, as in Envoy.
    let (_, plain) = dump(proxy.admin(), "").await;
    assert!(config::<EndpointsConfigDump>(&plain, "EndpointsConfigDump").is_none());
    assert!(config::<ClustersConfigDump>(&plain, "ClustersConfigDump").is_some());

    // ?resource= lists one field's entries; ?mask= keeps only the paths it names.
    let (json, _) = dump(proxy.admin(), "?resource=dynamic_active_clusters").await;
    let entries = json["configs"].as_array().unwrap();
    assert_eq!(entries.len(), dynamic.len());
    assert!(entries.iter().all(|e| {
        e["@type"] == "type.googleapis.com/envoy.admin.v3.ClustersConfigDump.DynamicCluster"
            && e["cluster"]["@type"] == "type.googleapis.com/envoy.config.cluster.v3.Cluster"
    }));
    let (json, _) = dump(
        proxy.admin(),
        "?resource=dynamic_active_clusters&mask=cluster.name",
    )
    .await;
    let mut masked: Vec<String> = json["configs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let fields: Vec<&String> = e.as_object().unwrap().keys().collect();
            assert_eq!(fields, ["@type", "cluster"], "{e}");
            let cluster: Vec<&String> = e["cluster"].as_object().unwrap().keys().collect();
            assert_eq!(cluster, ["@type", "name"], "{e}");
            e["cluster"]["name"].as_str().unwrap().to_owned()
        })
        .collect();
    masked.sort();
    let mut expected = dynamic.clone();
    expected.sort();
    assert_eq!(masked, expected);

    // Envoy's /server_info: version, state, uptime and the same node.
    let (status, info) = admin_get(proxy.admin(), "/server_info").await;
    assert_eq!(status, 200, "{info}");
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["state"], "LIVE", "{info}");
    assert_eq!(info["node"]["id"], "sidecar~client", "{info}");
    assert!(info["version"].as_str().unwrap().starts_with("weft/"), "{info}");
    assert!(
        info["uptime_current_epoch"].as_str().unwrap().ends_with('s'),
        "{info}"
    );

    // A parameter Envoy does not have, or a field no config has, is refused by name.
    let (status, body) = admin_get(proxy.admin(), "/config_dump?include_edz").await;
    assert_eq!(status, 400);
    assert!(body.contains("\"include_edz\""), "{body}");
    let (status, body) = admin_get(proxy.admin(), "/config_dump?resource=dynamic_clusters").await;
    assert_eq!(status, 400);
    assert!(body.contains("\"dynamic_clusters\""), "{body}");
}

/// A proxy configured only by its file: everything is static, and nothing says xDS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_configured_proxy_dumps_static_clusters_and_listeners() {
    let app = HttpServer::start("app").await;
    let proxy = TestProxy::start(&format!(
        "node: {{ workload: ratings-v1, namespace: default }}\n\
         listeners: [{{ name: front, address: 127.0.0.1:0, cluster: ratings }}]\n\
         clusters: [{{ name: ratings, lb_policy: LEAST_REQUEST, endpoints: [\"{}\"] }}]",
        app.addr
    ))
    .await;
    let (_, all) = dump(proxy.admin(), "?include_eds").await;
    let bootstrap: BootstrapConfigDump = config(&all, "BootstrapConfigDump").unwrap();
    assert!(bootstrap.bootstrap.as_ref().unwrap().dynamic_resources.is_none());
    let clusters: ClustersConfigDump = config(&all, "ClustersConfigDump").unwrap();
    assert!(clusters.dynamic_active_clusters.is_empty());
    let [ratings] = clusters.static_clusters.as_slice() else {
        panic!("{clusters:?}")
    };
    let ratings: Cluster = unpack(ratings.cluster.as_ref().unwrap());
    assert_eq!(ratings.name, "ratings");
    assert_eq!(
        ratings.lb_policy,
        envoy_types::pb::envoy::config::cluster::v3::cluster::LbPolicy::LeastRequest as i32
    );
    assert!(format!("{:?}", ratings.load_assignment).contains(&format!("PortValue({})", app.addr.port())));
    let listeners: ListenersConfigDump = config(&all, "ListenersConfigDump").unwrap();
    let front = listeners
        .static_listeners
        .iter()
        .map(|l| unpack::<Listener>(l.listener.as_ref().unwrap()))
        .find(|l| l.name == "front")
        .expect("the front listener");
    let port = proxy.listener("front").port();
    assert!(format!("{:?}", front.address).contains(&format!("PortValue({port})")));
    let secrets: SecretsConfigDump = config(&all, "SecretsConfigDump").unwrap();
    assert!(
        secrets.dynamic_active_secrets.is_empty(),
        "no identity, no secrets"
    );
}
