//! Istio's metadata exchange between two sidecars configured by `weft control`: both sides' metrics
//! name both workloads (the server side learns the caller from `x-envoy-peer-metadata`, the client side
//! the callee from its response and from discovery's endpoint metadata), the headers never reach an
//! app, and metadata from a caller without a proven identity is not believed.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::Duration;

use http::{HeaderValue, Request, StatusCode};
use weft_control::ControlPlane;
use weft_test_support::http::{HttpServer, TestBody, drain_body, empty};
use weft_test_support::{TestProxy, admin_get, assert_eventually, metric};

const PRODUCTPAGE: &str = "spiffe://cluster.local/ns/default/sa/productpage";
const REVIEWS: &str = "spiffe://cluster.local/ns/default/sa/reviews";
/// The reviews Service's address, as the client app dials it.
const SERVICE: &str = "127.0.96.41:9080";

fn token(cp: &ControlPlane, sa: &str) -> String {
    cp.ca()
        .tokens()
        .issue("default", sa, Duration::from_secs(3600))
        .unwrap()
}

fn plain_client()
-> hyper_util::client::legacy::Client<hyper_util::client::legacy::connect::HttpConnector, TestBody> {
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http()
}

fn mesh_yaml(server: SocketAddr) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{ name: reviews, namespace: default }}\n\
         spec: {{ clusterIP: 127.0.96.41, selector: {{ app: reviews }}, ports: [{{ name: http, port: 9080 }}] }}\n\
         ---\napiVersion: networking.istio.io/v1\nkind: WorkloadEntry\n\
         metadata: {{ name: reviews-v2, namespace: default }}\n\
         spec:\n  address: {}\n  serviceAccount: reviews\n  ports: {{ http: {} }}\n\
         \x20 labels: {{ app: reviews, version: v2, security.istio.io/tlsMode: istio }}\n",
        server.ip(),
        server.port()
    )
}

/// A client sidecar (`productpage-v1`) and a server sidecar (`reviews-v2`) before its app, both
/// certified by `weft control`, the client configured by it: the mesh of Istio's metrics docs.
pub(crate) struct Pair {
    _dir: tempfile::TempDir,
    _cp: ControlPlane,
    pub(crate) app: HttpServer,
    pub(crate) server: TestProxy,
    pub(crate) client: TestProxy,
}

impl Pair {
    /// Both sidecars ready (the client may not have the reviews Service yet).
    pub(crate) async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let cp = ControlPlane::start(dir.path().into(), "127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let app = HttpServer::start("reviews-app").await;
        let server = TestProxy::start(&format!(
            "access_log: {{ path: off }}\n\
             node: {{ workload: reviews-v2, namespace: default, service_account: reviews, labels: {{ app: reviews, version: v2 }} }}\n\
             identity: {{ ca_address: \"http://{}\", token: \"{}\" }}\n\
             listeners: [{{ name: inbound, address: 127.0.0.1:0, cluster: app, peer_authentication: permissive }}]\n\
             clusters: [{{ name: app, endpoints: [\"{}\"] }}]",
            cp.address(),
            token(&cp, "reviews"),
            app.addr
        ))
        .await;
        std::fs::write(
            dir.path().join("mesh.yaml"),
            mesh_yaml(server.listener("inbound")),
        )
        .unwrap();
        let client = TestProxy::start(&format!(
            "access_log: {{ path: off }}\n\
             node: {{ workload: productpage-v1, namespace: default, service_account: productpage, labels: {{ app: productpage, version: v1 }} }}\n\
             identity: {{ ca_address: \"http://{}\", token: \"{}\" }}\n\
             xds: {{ address: \"http://{}\", initial_fetch_timeout: 10s }}",
            cp.address(),
            token(&cp, "productpage"),
            cp.address()
        ))
        .await;
        for proxy in [&server, &client] {
            assert_eventually!(admin_get(proxy.admin(), "/ready").await.0 == 200, "not ready");
        }
        Self {
            _dir: dir,
            _cp: cp,
            app,
            server,
            client,
        }
    }

    /// An HTTP client of the client app, dialing the reviews Service through its sidecar. A connection
    /// stays with what its first bytes were forwarded as: use a new client until the Service has
    /// reached the sidecar.
    pub(crate) fn app_client(
        &self,
    ) -> hyper_util::client::legacy::Client<weft_test_support::OrigDstConnector, TestBody> {
        weft_test_support::http::client(
            self.client
                .orig_dst
                .connector(self.client.outbound(), SERVICE.parse().unwrap()),
            false,
        )
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_sides_metrics_name_both_workloads_and_no_app_sees_the_headers() {
    let pair = Pair::start().await;
    let (app, server, client) = (&pair.app, &pair.server, &pair.client);

    // The app writes metadata of its own: its sidecar replaces it with the workload's.
    let forged = HeaderValue::from_static("Cg0KBE5BTUUSBRoDbWFs");
    let mut status = StatusCode::SERVICE_UNAVAILABLE;
    let mut last = String::new();
    for _ in 0..100 {
        // Until the Service (written after the control plane started) has reached the client.
        let through_client = pair.app_client();
        let response = through_client
            .request(
                Request::get("http://reviews:9080/")
                    .header("x-envoy-peer-metadata", forged.clone())
                    .header("x-envoy-peer-metadata-id", "sidecar~6.6.6.6~mallory.default~x")
                    .body(empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        status = response.status();
        let headers = response.headers().clone();
        let body = http_body_util::BodyExt::collect(response.into_body())
            .await
            .unwrap()
            .to_bytes();
        last = format!("{headers:?} {body:?}");
        if status == StatusCode::OK {
            assert!(
                !headers.contains_key("x-envoy-peer-metadata")
                    && !headers.contains_key("x-envoy-peer-metadata-id"),
                "the client app never sees the server's metadata: {headers:?}"
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        status,
        StatusCode::OK,
        "{last} {}",
        admin_get(client.admin(), "/clusters").await.1
    );
    let seen = app.last_request();
    assert!(
        !seen.headers.contains_key("x-envoy-peer-metadata")
            && !seen.headers.contains_key("x-envoy-peer-metadata-id"),
        "the server app never sees the client's metadata: {:?}",
        seen.headers
    );

    // The server side: the caller as its metadata says, bound to the identity its certificate proved.
    let server_metrics = server.metrics().await;
    let caller = [
        ("reporter", "destination"),
        ("source_workload", "productpage-v1"),
        ("source_workload_namespace", "default"),
        ("source_app", "productpage"),
        ("source_version", "v1"),
        ("source_canonical_service", "productpage"),
        ("source_canonical_revision", "v1"),
        ("source_principal", PRODUCTPAGE),
        ("source_cluster", "Kubernetes"),
        ("destination_workload", "reviews-v2"),
        ("destination_app", "reviews"),
        ("destination_principal", REVIEWS),
        ("destination_service", "reviews.default.svc.cluster.local"),
        ("connection_security_policy", "mutual_tls"),
        ("response_code", "200"),
    ];
    assert_eq!(
        metric(&server_metrics, "istio_requests_total", &caller),
        1.0,
        "{server_metrics}"
    );

    // The client side: the callee as its response's metadata says.
    let client_metrics = client.metrics().await;
    let callee = [
        ("reporter", "source"),
        ("source_workload", "productpage-v1"),
        ("source_app", "productpage"),
        ("destination_workload", "reviews-v2"),
        ("destination_workload_namespace", "default"),
        ("destination_app", "reviews"),
        ("destination_version", "v2"),
        ("destination_canonical_service", "reviews"),
        ("destination_canonical_revision", "v2"),
        ("destination_principal", REVIEWS),
        ("destination_cluster", "Kubernetes"),
        ("destination_service", "reviews.default.svc.cluster.local"),
        ("destination_service_name", "reviews"),
        ("response_code", "200"),
    ];
    assert_eq!(
        metric(&client_metrics, "istio_requests_total", &callee),
        1.0,
        "{client_metrics}"
    );

    // A caller without a certificate (the listener is permissive) sending the client's real metadata
    // is not believed, and the app does not see it.
    let real = weft_telemetry::peer_metadata::OwnMetadata::new(&weft_telemetry::peer_metadata::OwnWorkload {
        namespace: "default".into(),
        workload: "productpage-v1".into(),
        service_account: "productpage".into(),
        ..Default::default()
    });
    let mut headers = http::HeaderMap::new();
    real.insert(&mut headers);
    let mut request = Request::get(format!("http://{}/plain", server.listener("inbound")));
    for (name, value) in &headers {
        request = request.header(name, value);
    }
    let response = plain_client()
        .request(request.body(empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    drain_body(response.into_body()).await.unwrap();
    let seen = app.last_request();
    assert_eq!(seen.uri.path(), "/plain");
    assert!(
        !seen.headers.contains_key("x-envoy-peer-metadata"),
        "{:?}",
        seen.headers
    );
    let server_metrics = server.metrics().await;
    let unproven = [
        ("reporter", "destination"),
        ("source_workload", "unknown"),
        ("source_principal", "unknown"),
        ("connection_security_policy", "none"),
    ];
    assert_eq!(
        metric(&server_metrics, "istio_requests_total", &unproven),
        1.0,
        "{server_metrics}"
    );
}

/// A sidecar-less workload `<name>-v1` (labels `app: <name>, version: v1`) at `backend`, behind the
/// Service `<name>` at `service` with one port named `port_name`; `weft control` serving it, and a
/// client sidecar (`productpage-v1`) it configures, ready.
async fn discovery_client(
    name: &str,
    service: SocketAddr,
    port_name: &str,
    backend: SocketAddr,
) -> (tempfile::TempDir, ControlPlane, TestProxy) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("mesh.yaml"),
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{ name: {name}, namespace: default }}\n\
             spec: {{ clusterIP: {}, selector: {{ app: {name} }}, ports: [{{ name: {port_name}, port: {} }}] }}\n\
             ---\napiVersion: networking.istio.io/v1\nkind: WorkloadEntry\n\
             metadata: {{ name: {name}-v1, namespace: default }}\n\
             spec: {{ address: {}, ports: {{ {port_name}: {} }}, labels: {{ app: {name}, version: v1 }} }}\n",
            service.ip(),
            service.port(),
            backend.ip(),
            backend.port()
        ),
    )
    .unwrap();
    let cp = ControlPlane::start(dir.path().into(), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let client = TestProxy::start(&format!(
        "access_log: {{ path: off }}\nnode: {{ workload: productpage-v1, namespace: default }}\n\
         xds: {{ address: \"http://{}\", initial_fetch_timeout: 10s }}",
        cp.address()
    ))
    .await;
    assert_eventually!(admin_get(client.admin(), "/ready").await.0 == 200, "not ready");
    (dir, cp, client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workload_without_a_sidecar_is_named_from_discoverys_endpoint_metadata() {
    let ratings = HttpServer::start("ratings").await;
    let service = "127.0.96.42:9080".parse().unwrap();
    let (_dir, _cp, client) = discovery_client("ratings", service, "http", ratings.addr).await;
    let through_client =
        weft_test_support::http::client(client.orig_dst.connector(client.outbound(), service), false);
    let response = through_client
        .request(Request::get("http://ratings:9080/").body(empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    drain_body(response.into_body()).await.unwrap();
    let metrics = client.metrics().await;
    let callee = [
        ("reporter", "source"),
        ("destination_workload", "ratings-v1"),
        ("destination_workload_namespace", "default"),
        ("destination_canonical_service", "ratings"),
        ("destination_canonical_revision", "v1"),
        ("destination_cluster", "Kubernetes"),
        ("destination_service", "ratings.default.svc.cluster.local"),
    ];
    assert_eq!(
        metric(&metrics, "istio_requests_total", &callee),
        1.0,
        "{metrics}"
    );
}

/// Opaque TCP has no metadata exchange: the client side names the workload it reached from
/// discovery's endpoint metadata, as for HTTP, so Istio's TCP panels and Kiali's TCP edges have a
/// destination.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_opaque_tcp_workload_is_named_from_discoverys_endpoint_metadata() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let db = weft_test_support::tcp::TcpServer::echo().await;
    let service = "127.0.96.43:5432".parse().unwrap();
    let (_dir, _cp, client) = discovery_client("db", service, "tcp", db.addr).await;
    let mut stream = client.orig_dst.connect(client.outbound(), service).await.unwrap();
    stream.write_all(b"ping").await.unwrap();
    let mut echoed = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(10), stream.read_exact(&mut echoed))
        .await
        .expect("an echo within 10 s")
        .unwrap();
    assert_eq!(&echoed, b"ping");
    stream.shutdown().await.unwrap();
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest).await.unwrap();
    drop(stream);
    let callee = [
        ("reporter", "source"),
        ("source_workload", "productpage-v1"),
        ("destination_workload", "db-v1"),
        ("destination_workload_namespace", "default"),
        ("destination_canonical_service", "db"),
        ("destination_canonical_revision", "v1"),
        ("destination_service", "db.default.svc.cluster.local"),
    ];
    assert_eventually!(
        metric(
            &client.metrics().await,
            "istio_tcp_connections_closed_total",
            &callee
        ) == 1.0,
        "{}",
        client.metrics().await
    );
    let metrics = client.metrics().await;
    assert_eq!(
        metric(&metrics, "istio_tcp_connections_opened_total", &callee),
        1.0,
        "{metrics}"
    );
    assert_eq!(
        metric(&metrics, "istio_tcp_sent_bytes_total", &callee),
        4.0,
        "{metrics}"
    );
    assert_eq!(
        metric(&metrics, "istio_tcp_received_bytes_total", &callee),
        4.0,
        "{metrics}"
    );
}
