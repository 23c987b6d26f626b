//! Root only: the mesh end to end with the real kernel path. Pods are network namespaces on a bridge,
//! each with `weft init`'s rules and a `weft proxy` running as UID 1337; `weft control` runs in a pod of
//! its own. The apps (test servers, `curl`, Python's `http.server`) know nothing but a service address.
//!
//! Without root (or without `ip`, `iptables`, `setpriv`) each test prints SKIP with the reason.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::Duration;

use http::StatusCode;
use weft_test_support::http::HttpServer;
use weft_test_support::metric;
use weft_test_support::netns::{self, Control, Network, Pod, PodClient, WireCapture};

macro_rules! require_root {
    ($test:literal) => {
        if let Some(reason) = netns::skip_reason() {
            eprintln!("SKIP {}: {reason}", $test);
            return;
        }
    };
}

/// The app port of every server pod.
const APP_PORT: u16 = 8080;

/// A Service at `vip:port` with one WorkloadEntry per `(pod, version)`, each named after its pod and
/// marked as having a sidecar (so callers speak mutual TLS to it).
fn service_yaml(name: &str, vip: &str, port: u16, workloads: &[(&Pod, &str)]) -> String {
    let mut yaml = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{ name: {name}, namespace: default }}\n\
         spec:\n  clusterIP: {vip}\n  selector: {{ app: {name} }}\n\
         \x20 ports: [{{ name: http, port: {port}, targetPort: {APP_PORT} }}]\n"
    );
    for (pod, version) in workloads {
        yaml.push_str(&format!(
            "---\napiVersion: networking.istio.io/v1\nkind: WorkloadEntry\n\
             metadata: {{ name: {}, namespace: default }}\n\
             spec:\n  address: {}\n  serviceAccount: {name}\n\
             \x20 labels: {{ app: {name}, version: {version}, security.istio.io/tlsMode: istio }}\n\
             \x20 ports: {{ http: {APP_PORT} }}\n",
            pod.name(),
            pod.ip()
        ));
    }
    yaml
}

/// Serves the test HTTP server inside `pod` on the app port.
fn app_in(pod: &Pod, name: &'static str) -> HttpServer {
    HttpServer::serve(netns::listen(pod, ([0, 0, 0, 0], APP_PORT).into()), name)
}

/// `curl` run in `pod` (without blocking this test's runtime, which serves the test apps); the status
/// code it printed, or its error.
async fn curl(pod: &Pod, url: &str) -> String {
    let out = tokio::process::Command::new("ip")
        .args(["netns", "exec", pod.netns(), "curl", "-sS", "-m", "5", "-o", "/dev/null", "-w", "%{http_code}", url])
        .output()
        .await
        .expect("curl (.ci/run installs it)");
    let status = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() { status } else { format!("{status} {}", String::from_utf8_lossy(&out.stderr).trim()) }
}

async fn mesh_metrics(pod: &Pod) -> String {
    netns::admin(pod, "/metrics").await.unwrap().body
}

#[tokio::test]
async fn mesh_traffic_between_pods_is_mutual_tls_and_apps_see_plain_http() {
    require_root!("mesh_traffic_between_pods_is_mutual_tls_and_apps_see_plain_http");
    let network = Network::create(&netns::weft_binary()).unwrap();
    let client = network.pod("client").unwrap();
    let server_1 = network.pod("echo-1").unwrap();
    let server_2 = network.pod("echo-2").unwrap();
    let vip = "10.96.0.20";
    let control = Control::start(
        &network,
        &[(
            "echo.yaml",
            &service_yaml("echo", vip, 80, &[(&server_1, "v1"), (&server_2, "v1")]),
        )],
    )
    .unwrap();

    // Two kinds of app: a test server, and Python's http.server serving a file.
    let test_app = app_in(&server_1, "echo-1");
    let files = network.dir().join("files");
    std::fs::create_dir_all(&files).unwrap();
    let secret = "plaintext-marker-7f3a";
    std::fs::write(files.join(format!("{secret}.txt")), format!("python says {secret}\n")).unwrap();
    server_2
        .spawn(
            "app",
            &["python3", "-m", "http.server", "8080", "--bind", "0.0.0.0", "--directory", files.to_str().unwrap()],
        )
        .unwrap();

    control.inject(&client, "default", "client", &[]).unwrap();
    for pod in [&server_1, &server_2] {
        control.inject(pod, "default", "echo", &[]).unwrap();
    }
    for pod in [&client, &server_1, &server_2] {
        netns::wait_ready(pod).await;
    }

    let wire = WireCapture::start(&network);
    let service: SocketAddr = format!("{vip}:80").parse().unwrap();
    let path = format!("/{secret}.txt");
    let mut app = PodClient::connect(&client, service).await.unwrap();
    let mut by_server = std::collections::BTreeMap::<String, usize>::new();
    for _ in 0..40 {
        let answer = app.get(&path, &[("x-secret-header", secret)]).await.unwrap();
        assert_eq!(answer.status, StatusCode::OK, "{answer:?}");
        let server = if answer.header("x-served-by").is_empty() {
            assert_eq!(answer.body, format!("python says {secret}\n"));
            "python".to_owned()
        } else {
            answer.header("x-served-by").to_owned()
        };
        *by_server.entry(server).or_default() += 1;
    }
    // `curl` in the client pod, knowing nothing but the service address.
    for _ in 0..4 {
        assert_eq!(curl(&client, &format!("http://{service}{path}")).await, "200");
    }

    assert_eq!(by_server.len(), 2, "both server pods answer: {by_server:?}");

    // The apps saw plain HTTP/1.1 from 127.0.0.6 (the sidecar), with the caller's proven identity.
    let seen = test_app
        .requests()
        .into_iter()
        .find(|r| r.headers.contains_key("x-secret-header"))
        .expect("the test app served some of the client's requests");
    assert_eq!(seen.version, http::Version::HTTP_11);
    assert_eq!(seen.peer.ip().to_string(), "127.0.0.6");
    assert_eq!(seen.headers["x-secret-header"], secret);
    let xfcc = seen.headers["x-forwarded-client-cert"].to_str().unwrap();
    assert!(xfcc.contains("URI=spiffe://cluster.local/ns/default/sa/client"), "{xfcc}");
    let python_log = server_2.log("app");
    assert!(
        python_log.contains(&format!("127.0.0.6 - - ")) && python_log.contains(&format!("\"GET {path} HTTP/1.1\" 200")),
        "{python_log}"
    );

    // Between pods the wire carries only TLS: every byte of every pod-to-pod connection on the bridge is
    // a TLS record, and neither the path, a header value nor the file's content appears anywhere in the
    // capture.
    let (segments, raw) = wire.stop();
    let control_ip = control.pod().ip();
    let between_pods: Vec<_> = segments
        .into_iter()
        .filter(|s| s.src.ip() != control_ip && s.dst.ip() != control_ip)
        .collect();
    assert!(between_pods.len() >= 40, "too few segments captured: {}", between_pods.len());
    let connections = netns::all_tls(&between_pods).unwrap();
    assert!(connections >= 4, "client to both servers, both directions: {connections}");
    assert!(
        !raw.windows(secret.len()).any(|w| w == secret.as_bytes()),
        "the marker crossed the bridge in plaintext"
    );

    // Each side's metrics say mutual TLS.
    let server_metrics = mesh_metrics(&server_1).await;
    let served = metric(
        &server_metrics,
        "istio_requests_total",
        &[("reporter", "destination"), ("connection_security_policy", "mutual_tls")],
    );
    assert!(served >= 1.0, "{server_metrics}");
}
