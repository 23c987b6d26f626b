//! Two sidecars talking mutual TLS with certificates from the control plane's CA: the server side knows
//! the caller's SPIFFE identity, and what should be refused is.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::Duration;

use http::{Request, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use weft_control::ControlPlane;
use weft_test_support::http::{HttpServer, TestBody, drain_body, empty};
use weft_test_support::{TestProxy, admin_get, assert_eventually, metric};

const PRODUCTPAGE: &str = "spiffe://cluster.local/ns/default/sa/productpage";
const REVIEWS: &str = "spiffe://cluster.local/ns/default/sa/reviews";

async fn control_plane() -> ControlPlane {
    let dir = tempfile::tempdir().unwrap();
    ControlPlane::start(dir.keep(), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap()
}

fn identity(cp: &ControlPlane, sa: &str, validity: &str) -> String {
    let token = cp
        .ca()
        .tokens()
        .issue("default", sa, Duration::from_secs(3600))
        .unwrap();
    format!(
        "node: {{ workload: {sa}, namespace: default, service_account: {sa} }}\n\
         identity: {{ ca_address: \"http://{}\", token: \"{token}\", validity: {validity} }}\n",
        cp.address()
    )
}

/// The server side: an explicit listener in front of the app, peers authenticated as `mode`.
async fn server_side(cp: &ControlPlane, app: &HttpServer, mode: &str) -> TestProxy {
    let proxy = TestProxy::start(&format!(
        "{}listeners: [{{ name: inbound, address: 127.0.0.1:0, cluster: app, peer_authentication: {mode} }}]\n\
         clusters: [{{ name: app, endpoints: [\"{}\"] }}]",
        identity(cp, "reviews", "1h"),
        app.addr
    ))
    .await;
    assert_eventually!(
        admin_get(proxy.admin(), "/ready").await.0 == 200,
        "server side not ready"
    );
    proxy
}

/// The client side: an explicit listener sending to the server side over mutual TLS, expecting `expect`.
async fn client_side(cp: &ControlPlane, server: SocketAddr, expect: &str, validity: &str) -> TestProxy {
    let proxy = TestProxy::start(&format!(
        "{}listeners: [{{ name: front, address: 127.0.0.1:0, cluster: reviews }}]\n\
         clusters: [{{ name: reviews, endpoints: [\"{server}\"], tls: {{ identities: [\"{expect}\"] }} }}]",
        identity(cp, "productpage", validity)
    ))
    .await;
    assert_eventually!(
        admin_get(proxy.admin(), "/ready").await.0 == 200,
        "client side not ready"
    );
    proxy
}

pub(crate) fn plain_client(
    h2: bool,
) -> hyper_util::client::legacy::Client<hyper_util::client::legacy::connect::HttpConnector, TestBody> {
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(h2)
        .build_http()
}

pub(crate) async fn get(
    client: &hyper_util::client::legacy::Client<hyper_util::client::legacy::connect::HttpConnector, TestBody>,
    front: SocketAddr,
) -> StatusCode {
    let response = client
        .request(
            Request::get(format!("http://{front}/reviews"))
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    let status = response.status();
    drain_body(response.into_body()).await.unwrap();
    status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecars_talk_mutual_tls_and_the_server_knows_the_caller() {
    weft_test_support::init_tracing();
    let cp = control_plane().await;
    let app = HttpServer::start("reviews-app").await;
    let server = server_side(&cp, &app, "strict").await;
    let client = client_side(&cp, server.listener("inbound"), REVIEWS, "1h").await;

    for h2 in [false, true] {
        assert_eq!(
            get(&plain_client(h2), client.listener("front")).await,
            StatusCode::OK,
            "h2: {h2}"
        );
        let seen = app.last_request();
        assert_eq!(
            seen.headers["x-forwarded-client-cert"],
            format!("By={REVIEWS};URI={PRODUCTPAGE}")
        );
    }

    let metrics = server.metrics().await;
    let labels = [
        ("reporter", "destination"),
        ("source_principal", PRODUCTPAGE),
        ("destination_principal", REVIEWS),
        ("connection_security_policy", "mutual_tls"),
        ("response_code", "200"),
    ];
    assert_eq!(
        metric(&metrics, "istio_requests_total", &labels),
        2.0,
        "{metrics}"
    );
    assert_eq!(metric(&metrics, "weft_certificate_renewals_total", &[]), 1.0);

    let (_, certs) = admin_get(client.admin(), "/identity").await;
    let certs: serde_json::Value = serde_json::from_str(&certs).unwrap();
    assert_eq!(certs["identity"], PRODUCTPAGE);
    assert_eq!(certs["trusted_roots_sha256"].as_array().unwrap().len(), 1);
    assert!(certs["seconds_until_expiry"].as_u64().unwrap() > 3000);
    let renewal = certs["seconds_until_renewal"].as_u64().unwrap();
    assert!(
        (1500..=1900).contains(&renewal),
        "renewal at about half of an hour: {renewal}"
    );
}

/// 24 concurrent HTTP/1 requests through `front`, each on its own client connection; all answered.
async fn concurrent_http1(front: SocketAddr) {
    let mut calls = Vec::new();
    for i in 0..24 {
        calls.push(tokio::spawn(async move {
            let mut stream = tokio::net::TcpStream::connect(front).await.unwrap();
            let request = format!(
                "GET /delay/200?call={i} HTTP/1.1\r\nHost: reviews.default:9080\r\nconnection: close\r\n\r\n"
            );
            stream.write_all(request.as_bytes()).await.unwrap();
            let mut response = String::new();
            stream.read_to_string(&mut response).await.unwrap();
            response
        }));
    }
    for call in calls {
        let response = call.await.unwrap();
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    }
}

/// With `http2_upgrade` (Istio's `h2UpgradePolicy: UPGRADE`), HTTP/1 from the app travels between the
/// sidecars as HTTP/2 over one multiplexed mutual TLS connection, and the server's app sees the
/// HTTP/1.1 request it would have seen: its Host, no mark of the hop. Without it each request in
/// flight has its own connection. A plaintext client's forged mark changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_between_sidecars_is_multiplexed_http2_when_upgraded_and_the_app_sees_http1() {
    let cp = control_plane().await;
    let app = HttpServer::start("reviews-app").await;
    let server = server_side(&cp, &app, "strict").await;
    let connections =
        |metrics: &str| metric(metrics, "weft_protocol_detections_total", &[("protocol", "tls")]);

    let plain = client_side(&cp, server.listener("inbound"), REVIEWS, "1h").await;
    concurrent_http1(plain.listener("front")).await;
    let before = connections(&server.metrics().await);
    assert!(
        before > 1.0,
        "without the upgrade, requests in flight need connections: {before}"
    );

    let upgraded = TestProxy::start(&format!(
        "{}listeners: [{{ name: front, address: 127.0.0.1:0, cluster: reviews }}]\n\
         clusters: [{{ name: reviews, endpoints: [\"{}\"], tls: {{ identities: [\"{REVIEWS}\"], http2_upgrade: true }} }}]",
        identity(&cp, "productpage", "1h"),
        server.listener("inbound")
    ))
    .await;
    assert_eventually!(
        admin_get(upgraded.admin(), "/ready").await.0 == 200,
        "client side not ready"
    );
    let seen_before = app.requests().len();
    concurrent_http1(upgraded.listener("front")).await;
    let metrics = server.metrics().await;
    assert_eq!(
        connections(&metrics) - before,
        1.0,
        "one mutual TLS connection carried all 24 requests: {metrics}"
    );
    let seen = app.requests();
    assert_eq!(seen.len() - seen_before, 24);
    for request in &seen[seen_before..] {
        assert_eq!(request.version, http::Version::HTTP_11, "the app speaks HTTP/1.1");
        assert_eq!(request.headers["host"], "reviews.default:9080");
        assert!(
            request.headers.get("weft-orig-proto").is_none(),
            "{:?}",
            request.headers
        );
    }

    // An HTTP/2 client keeps HTTP/2 to the app; a plaintext client's forged mark is not believed.
    let response = plain_client(true)
        .request(
            Request::get(format!("http://{}/h2", upgraded.listener("front")))
                .header("weft-orig-proto", "HTTP/1.1")
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    drain_body(response.into_body()).await.unwrap();
    let seen = app.last_request();
    assert_eq!(seen.version, http::Version::HTTP_2);
    assert!(seen.headers.get("weft-orig-proto").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_with_the_wrong_identity_is_a_connect_failure() {
    let cp = control_plane().await;
    let app = HttpServer::start("app").await;
    let server = server_side(&cp, &app, "strict").await;
    let client = client_side(
        &cp,
        server.listener("inbound"),
        "spiffe://cluster.local/ns/default/sa/ratings",
        "1h",
    )
    .await;
    assert_eq!(
        get(&plain_client(false), client.listener("front")).await,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(app.request_count(), 0);
    let metrics = client.metrics().await;
    assert_eq!(
        metric(
            &metrics,
            "istio_requests_total",
            &[("response_code", "503"), ("response_flags", "UF")]
        ),
        1.0,
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_is_refused_in_strict_and_accepted_in_permissive() {
    let cp = control_plane().await;
    let app = HttpServer::start("app").await;
    for (mode, answered) in [("strict", false), ("permissive", true)] {
        let server = server_side(&cp, &app, mode).await;
        let mut stream = tokio::net::TcpStream::connect(server.listener("inbound"))
            .await
            .unwrap();
        stream
            .write_all(b"GET / HTTP/1.1\r\nhost: reviews\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut response = Vec::new();
        let _ = stream.read_to_end(&mut response).await;
        assert_eq!(
            response.starts_with(b"HTTP/1.1 200"),
            answered,
            "{mode}: {}",
            String::from_utf8_lossy(&response)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_rotate_under_load_without_a_failed_request() {
    let cp = control_plane().await;
    let app = HttpServer::start("app").await;
    let server = server_side(&cp, &app, "strict").await;
    // Client certificates live 20 s: over 60 s the client side rotates several times.
    let client = client_side(&cp, server.listener("inbound"), REVIEWS, "20s").await;
    let http = plain_client(false);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let (mut sent, mut failed) = (0u32, 0u32);
    while std::time::Instant::now() < deadline {
        if get(&http, client.listener("front")).await != StatusCode::OK {
            failed += 1;
        }
        sent += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let rotations = metric(&client.metrics().await, "weft_certificate_renewals_total", &[]);
    assert!(rotations >= 4.0, "only {rotations} certificates in 60 s");
    assert_eq!(
        failed, 0,
        "{failed} of {sent} requests failed across {rotations} rotations"
    );
}

/// Root only (tcpdump): between the two sidecars the wire carries TLS records and never the request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_packet_capture_between_sidecars_shows_only_tls() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIP a_packet_capture_between_sidecars_shows_only_tls: capturing packets needs root");
        return;
    }
    if std::process::Command::new("tcpdump")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!(
            "SKIP a_packet_capture_between_sidecars_shows_only_tls: tcpdump is not installed (.ci/run installs it)"
        );
        return;
    }
    let cp = control_plane().await;
    let app = HttpServer::start("app").await;
    let server = server_side(&cp, &app, "strict").await;
    let client = client_side(&cp, server.listener("inbound"), REVIEWS, "1h").await;

    let dir = tempfile::tempdir().unwrap();
    let pcap = dir.path().join("hop.pcap");
    let port = server.listener("inbound").port().to_string();
    let mut tcpdump = tokio::process::Command::new("tcpdump")
        // -Z root: keep privileges, so it can write into the test's private directory.
        .args(["-i", "lo", "-U", "-n", "--immediate-mode", "-Z", "root", "-w"])
        .arg(&pcap)
        .args(["tcp", "port", &port])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // tcpdump says when it is capturing.
    let mut stderr = tcpdump.stderr.take().unwrap();
    let mut said = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), async {
        let mut buf = [0u8; 256];
        while !String::from_utf8_lossy(&said).contains("listening on") {
            let n = stderr.read(&mut buf).await.unwrap();
            assert!(n > 0, "tcpdump exited: {}", String::from_utf8_lossy(&said));
            said.extend_from_slice(&buf[..n]);
        }
    })
    .await
    .expect("tcpdump did not start");

    const SECRET: &str = "the-plaintext-no-one-on-the-wire-may-read-4711";
    let response = plain_client(false)
        .request(
            Request::post(format!("http://{}/echo", client.listener("front")))
                .body(weft_test_support::http::full(SECRET))
                .unwrap(),
        )
        .await
        .unwrap();
    let echoed = http_body_util::BodyExt::collect(response.into_body())
        .await
        .unwrap()
        .to_bytes();
    assert_eq!(echoed, SECRET.as_bytes(), "the request went through");

    tokio::time::sleep(Duration::from_millis(300)).await;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(tcpdump.id().unwrap() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    tcpdump.wait().await.unwrap();
    let mut rest = String::new();
    let _ = stderr.read_to_string(&mut rest).await;
    let captured = std::fs::read(&pcap).unwrap();
    eprintln!(
        "tcpdump: {}{rest}; {} bytes captured",
        String::from_utf8_lossy(&said),
        captured.len()
    );
    let contains = |needle: &[u8]| captured.windows(needle.len()).any(|w| w == needle);
    assert!(captured.len() > 200, "nothing captured");
    assert!(
        contains(&[0x17, 0x03, 0x03]),
        "no TLS application data record on the wire"
    );
    assert!(
        !contains(SECRET.as_bytes()),
        "the plaintext crossed the wire between the sidecars"
    );
    assert!(
        !contains(b"POST /echo"),
        "the request line crossed the wire between the sidecars"
    );
}

/// PeerAuthentication in weft control sets the workload's inbound mode: STRICT refuses plaintext, and an
/// edit to PERMISSIVE lets it in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_authentication_from_the_control_plane_sets_the_inbound_mode() {
    let app = HttpServer::start("reviews-app").await;
    let dir = tempfile::tempdir().unwrap();
    let policy = |mode: &str| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{ name: reviews }}\nspec:\n  selector: {{ app: reviews }}\n  ports: [{{ name: http, port: {port} }}]\n\
             ---\napiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {{ name: reviews-v1 }}\n\
             spec: {{ address: 127.0.0.1, labels: {{ app: reviews, security.istio.io/tlsMode: istio }}, serviceAccount: reviews }}\n\
             ---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{ name: reviews }}\n\
             spec: {{ selector: {{ matchLabels: {{ app: reviews }} }}, mtls: {{ mode: {mode} }} }}\n",
            port = app.addr.port()
        )
    };
    std::fs::write(dir.path().join("mesh.yaml"), policy("STRICT")).unwrap();
    let cp = ControlPlane::start(dir.path().into(), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    assert!(cp.problems().is_empty(), "{:?}", cp.problems());
    let proxy = TestProxy::start(&format!(
        "{}xds: {{ address: \"http://{}\" }}",
        identity(&cp, "reviews", "1h").replace("workload: reviews", "workload: reviews-v1"),
        cp.address()
    ))
    .await;
    assert_eventually!(admin_get(proxy.admin(), "/ready").await.0 == 200, "not ready");
    let mode = || async {
        let (_, dump) = admin_get(proxy.admin(), "/mesh").await;
        let dump: serde_json::Value = serde_json::from_str(&dump).unwrap();
        dump["mesh"]["inbound"]["peer_authentication"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    };
    assert_eq!(mode().await, "strict");

    // A plaintext peer dialling the pod's app port.
    let pod_addr = SocketAddr::new("127.0.96.7".parse().unwrap(), app.addr.port());
    let plaintext = || async {
        let mut stream = proxy.orig_dst.connect(proxy.inbound(), pod_addr).await.unwrap();
        stream
            .write_all(b"GET / HTTP/1.1\r\nhost: reviews\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut response = Vec::new();
        let _ = stream.read_to_end(&mut response).await;
        response.starts_with(b"HTTP/1.1 200")
    };
    assert!(!plaintext().await, "STRICT refuses plaintext");
    assert_eq!(app.request_count(), 0);

    let tmp = dir.path().join(".mesh.yaml.tmp");
    std::fs::write(&tmp, policy("PERMISSIVE")).unwrap();
    std::fs::rename(&tmp, dir.path().join("mesh.yaml")).unwrap();
    assert_eventually!(mode().await == "permissive", "the edit did not reach the proxy");
    assert!(plaintext().await, "PERMISSIVE lets plaintext in");
}

/// Istio's `portLevelMtls`: a STRICT workload with one port left to plaintext takes plaintext on that
/// port alone, and its other port still refuses it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn port_level_mtls_sets_the_mode_of_one_port() {
    let app = HttpServer::start("reviews-app").await;
    let metrics_app = HttpServer::start("reviews-metrics").await;
    let (app_port, metrics_port) = (app.addr.port(), metrics_app.addr.port());
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("mesh.yaml"),
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{ name: reviews }}\nspec:\n  selector: {{ app: reviews }}\n  ports: [{{ name: http, port: {app_port} }}, {{ name: http-metrics, port: {metrics_port} }}]\n\
             ---\napiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {{ name: reviews-v1 }}\n\
             spec: {{ address: 127.0.0.1, labels: {{ app: reviews, security.istio.io/tlsMode: istio }}, serviceAccount: reviews }}\n\
             ---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{ name: reviews }}\n\
             spec:\n  selector: {{ matchLabels: {{ app: reviews }} }}\n  mtls: {{ mode: STRICT }}\n  portLevelMtls:\n    {metrics_port}: {{ mode: DISABLE }}\n"
        ),
    )
    .unwrap();
    let cp = ControlPlane::start(dir.path().into(), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    assert!(cp.problems().is_empty(), "{:?}", cp.problems());
    let proxy = TestProxy::start(&format!(
        "{}xds: {{ address: \"http://{}\" }}",
        identity(&cp, "reviews", "1h").replace("workload: reviews", "workload: reviews-v1"),
        cp.address()
    ))
    .await;
    assert_eventually!(admin_get(proxy.admin(), "/ready").await.0 == 200, "not ready");
    let (_, dump) = admin_get(proxy.admin(), "/mesh").await;
    let dump: serde_json::Value = serde_json::from_str(&dump).unwrap();
    let inbound = &dump["mesh"]["inbound"];
    assert_eq!(inbound["peer_authentication"], "strict", "{inbound}");
    assert_eq!(
        inbound["port_peer_authentication"][metrics_port.to_string()],
        "disable",
        "{inbound}"
    );

    let plaintext = |port: u16| {
        let proxy = &proxy;
        async move {
            let pod_addr = SocketAddr::new("127.0.96.7".parse().unwrap(), port);
            let mut stream = proxy.orig_dst.connect(proxy.inbound(), pod_addr).await.unwrap();
            stream
                .write_all(b"GET / HTTP/1.1\r\nhost: reviews\r\nconnection: close\r\n\r\n")
                .await
                .unwrap();
            let mut response = Vec::new();
            let _ = stream.read_to_end(&mut response).await;
            response.starts_with(b"HTTP/1.1 200")
        }
    };
    assert!(plaintext(metrics_port).await, "the DISABLE port takes plaintext");
    assert_eq!(metrics_app.request_count(), 1);
    assert!(!plaintext(app_port).await, "the STRICT port refuses plaintext");
    assert_eq!(app.request_count(), 0);
}

/// A sidecar whose certificate and configuration come from weft control's TLS port, with a `front`
/// listener of its own to the `app` cluster at `app`.
pub(crate) fn sidecar_over_tls(
    node: &str,
    port: u16,
    root: &std::path::Path,
    token: &str,
    app: SocketAddr,
) -> String {
    format!(
        "node: {{ {node} }}\n\
         identity: {{ ca_address: \"https://localhost:{port}\", ca_root_file: \"{root}\", token: \"{token}\" }}\n\
         xds: {{ address: \"https://localhost:{port}\", root_file: \"{root}\", initial_fetch_timeout: 30s }}\n\
         listeners: [{{ name: front, address: 127.0.0.1:0, cluster: app }}]\n\
         clusters: [{{ name: app, endpoints: [\"{app}\"] }}]",
        root = root.display(),
    )
}

/// xDS and the CA over TLS (15012): verified with the control plane's root; with the wrong root the
/// proxy gets nothing and stays not ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xds_and_ca_over_tls_with_the_control_planes_root() {
    let app = HttpServer::start("app").await;
    let dir = tempfile::tempdir().unwrap();
    let mut cp = ControlPlane::start(dir.path().into(), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let tls = cp.serve_tls("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let good_root = dir.path().join("root.pem");
    std::fs::write(&good_root, cp.ca().root_pem()).unwrap();
    let other = weft_control::ca::CertificateAuthority::ephemeral("cluster.local").unwrap();
    let bad_root = dir.path().join("other-root.pem");
    std::fs::write(&bad_root, other.root_pem()).unwrap();
    let token = cp
        .ca()
        .tokens()
        .issue("default", "productpage", Duration::from_secs(3600))
        .unwrap();

    let proxy_with = |root: &std::path::Path| {
        sidecar_over_tls(
            "workload: productpage, namespace: default, service_account: productpage",
            tls.port(),
            root,
            &token,
            app.addr,
        )
    };
    let proxy = TestProxy::start(&proxy_with(&good_root)).await;
    assert_eventually!(
        admin_get(proxy.admin(), "/ready").await.0 == 200,
        "not ready over TLS"
    );
    let (_, certs) = admin_get(proxy.admin(), "/identity").await;
    assert!(certs.contains(PRODUCTPAGE), "{certs}");
    let (_, dump) = admin_get(proxy.admin(), "/mesh").await;
    assert!(dump.contains("\"connected\": true"), "{dump}");
    assert_eq!(
        get(&plain_client(false), proxy.listener("front")).await,
        StatusCode::OK
    );

    let distrustful = TestProxy::start(&proxy_with(&bad_root)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (status, body) = admin_get(distrustful.admin(), "/ready").await;
    assert_eq!(status, 503);
    assert!(
        body.contains("certificate") && body.contains("xds config"),
        "{body}"
    );
    assert_eq!(
        metric(
            &distrustful.metrics().await,
            "weft_certificate_renewals_total",
            &[]
        ),
        0.0
    );
}

/// With the CA gone when renewal is due, traffic keeps flowing on the still-valid certificate, and a
/// returning CA renews it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_continues_on_the_old_certificate_while_the_ca_is_down() {
    let ca = std::sync::Arc::new(weft_control::ca::CertificateAuthority::ephemeral("cluster.local").unwrap());
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start_with_ca(dir.path().into(), "127.0.0.1:0".parse().unwrap(), ca.clone())
        .await
        .unwrap();
    let address = cp.address();
    let app = HttpServer::start("app").await;
    let server = server_side(&cp, &app, "strict").await;
    // A 6 s certificate: renewal is due after about 3 s.
    let client = client_side(&cp, server.listener("inbound"), REVIEWS, "6s").await;
    let (_, certs) = admin_get(client.admin(), "/identity").await;
    let first: serde_json::Value = serde_json::from_str(&certs).unwrap();

    cp.stop().await;
    let http = plain_client(false);
    let until = std::time::Instant::now() + Duration::from_secs(4);
    while std::time::Instant::now() < until {
        assert_eq!(
            get(&http, client.listener("front")).await,
            StatusCode::OK,
            "traffic on the old certificate"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let metrics = client.metrics().await;
    assert!(
        metric(&metrics, "weft_certificate_renewal_failures_total", &[]) >= 1.0,
        "the renewal was attempted: {metrics}"
    );
    let (_, certs) = admin_get(client.admin(), "/identity").await;
    let now: serde_json::Value = serde_json::from_str(&certs).unwrap();
    assert_eq!(now["serial"], first["serial"], "still the first certificate");

    let cp = ControlPlane::start_with_ca(dir.path().into(), address, ca)
        .await
        .unwrap();
    assert_eventually!(
        {
            let (_, certs) = admin_get(client.admin(), "/identity").await;
            serde_json::from_str::<serde_json::Value>(&certs).unwrap()["serial"] != first["serial"]
        },
        "never renewed after the CA came back"
    );
    assert_eq!(get(&http, client.listener("front")).await, StatusCode::OK);
    cp.stop().await;
}

/// Writes a certificate for `sa` from the control plane's CA as an agent such as cert-manager would:
/// chain, key and root in three files, each replaced whole.
fn write_certificate_files(cp: &ControlPlane, dir: &std::path::Path, sa: &str, key_of: Option<&str>) {
    let id = weft_identity::SpiffeId::new("cluster.local", "default", sa).unwrap();
    let (key, csr) = weft_identity::csr::new_csr(&id).unwrap();
    let chain = cp.ca().sign(&csr, &id, Duration::from_secs(3600)).unwrap();
    let key = match key_of {
        Some(other) => other.to_owned(),
        None => key.serialize_pem(),
    };
    for (name, text) in [
        ("tls.crt", chain[..chain.len() - 1].concat()),
        ("tls.key", key),
        ("ca.crt", cp.ca().root_pem().to_owned()),
    ] {
        std::fs::write(dir.join(".next"), text).unwrap();
        std::fs::rename(dir.join(".next"), dir.join(name)).unwrap();
    }
}

async fn serial(proxy: &TestProxy) -> String {
    let (_, body) = admin_get(proxy.admin(), "/identity").await;
    let identity: serde_json::Value = serde_json::from_str(&body).unwrap();
    identity["serial"].as_str().unwrap_or_default().to_owned()
}

/// Certificates that another agent keeps on disk (cert-manager, istio-csr): the proxy takes its
/// identity from them, follows each rotation of the files under load without a failed request, and
/// keeps the certificate in use when a change does not make a usable one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_from_files_are_followed_under_load() {
    weft_test_support::init_tracing();
    let cp = control_plane().await;
    let app = HttpServer::start("app").await;
    let server = server_side(&cp, &app, "strict").await;
    let dir = tempfile::tempdir().unwrap();
    write_certificate_files(&cp, dir.path(), "productpage", None);
    let path = |name: &str| dir.path().join(name).display().to_string();
    let client = TestProxy::start(&format!(
        "node: {{ workload: productpage, namespace: default, service_account: productpage }}\n\
         identity: {{ cert_file: \"{}\", key_file: \"{}\", roots_file: \"{}\" }}\n\
         listeners: [{{ name: front, address: 127.0.0.1:0, cluster: reviews }}]\n\
         clusters: [{{ name: reviews, endpoints: [\"{}\"], tls: {{ identities: [\"{REVIEWS}\"] }} }}]",
        path("tls.crt"),
        path("tls.key"),
        path("ca.crt"),
        server.listener("inbound"),
    ))
    .await;
    assert_eventually!(
        admin_get(client.admin(), "/ready").await.0 == 200,
        "the proxy did not become ready with its certificate files"
    );
    let front = client.listener("front");
    assert_eq!(get(&plain_client(false), front).await, StatusCode::OK);
    assert_eq!(
        app.last_request().headers["x-forwarded-client-cert"],
        format!("By={REVIEWS};URI={PRODUCTPAGE}"),
        "the server side proved the identity the files carry"
    );

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = tokio::spawn({
        let stop = stop.clone();
        async move {
            let http = plain_client(false);
            let (mut sent, mut failed) = (0u32, 0u32);
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                if get(&http, front).await != StatusCode::OK {
                    failed += 1;
                }
                sent += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            (sent, failed)
        }
    });

    // Three rotations, each seen by the proxy and used by the next handshakes.
    let mut serials = vec![serial(&client).await];
    for _ in 0..3 {
        write_certificate_files(&cp, dir.path(), "productpage", None);
        let before = serials.last().unwrap().clone();
        assert_eventually!(
            serial(&client).await != before,
            "the rotated files were not picked up"
        );
        serials.push(serial(&client).await);
    }
    let metrics = client.metrics().await;
    assert_eq!(metric(&metrics, "weft_certificate_renewals_total", &[]), 4.0);

    // A key that is not the certificate's, then someone else's certificate: each is reported and the
    // certificate in use stays.
    let failures = || async {
        metric(
            &client.metrics().await,
            "weft_certificate_renewal_failures_total",
            &[],
        )
    };
    let in_use = serials.last().unwrap().clone();
    let wrong_key = weft_identity::csr::new_csr(
        &weft_identity::SpiffeId::new("cluster.local", "default", "productpage").unwrap(),
    )
    .unwrap()
    .0
    .serialize_pem();
    for (sa, key) in [("productpage", Some(wrong_key.as_str())), ("ratings", None)] {
        let before = failures().await;
        write_certificate_files(&cp, dir.path(), sa, key);
        assert_eventually!(
            failures().await > before,
            "the bad change ({sa}) was not reported"
        );
        assert_eq!(serial(&client).await, in_use);
    }

    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let (sent, failed) = load.await.unwrap();
    assert!(sent > 100, "only {sent} requests");
    assert_eq!(
        failed, 0,
        "{failed} of {sent} requests failed across the rotations"
    );
    assert_eq!(get(&plain_client(false), front).await, StatusCode::OK);
}
