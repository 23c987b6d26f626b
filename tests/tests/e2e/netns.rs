//! Root only: the mesh end to end with the real kernel path. Pods are network namespaces on a bridge,
//! each with `weft init`'s rules and a `weft proxy` running as UID 1337; `weft control` runs in a pod of
//! its own. The apps (test servers, `curl`, Python's `http.server`) know nothing but a service address.
//!
//! Without root (or without `ip`, `iptables`, `setpriv`) each test prints SKIP with the reason.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use http::StatusCode;
use weft_test_support::http::HttpServer;
use weft_test_support::metric;
use weft_test_support::netns::{self, Control, Network, Pod, PodClient, WireCapture};

macro_rules! require_root {
    ($test:literal) => {
        if let Some(reason) = netns::missing_prerequisite() {
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
    HttpServer::serve(
        pod.listen((Ipv6Addr::UNSPECIFIED, APP_PORT).into()).unwrap(),
        name,
    )
}

/// `curl` run in `pod` (without blocking this test's runtime, which serves the test apps); the status
/// code it printed, or its error.
async fn curl(pod: &Pod, url: &str) -> String {
    let out = tokio::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            pod.netns(),
            "curl",
            "-sS",
            "-m",
            "5",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            url,
        ])
        .output()
        .await
        .expect("curl (.ci/run installs it)");
    let status = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        status
    } else {
        format!("{status} {}", String::from_utf8_lossy(&out.stderr).trim())
    }
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
    std::fs::write(
        files.join(format!("{secret}.txt")),
        format!("python says {secret}\n"),
    )
    .unwrap();
    server_2
        .spawn(
            "app",
            &[
                "python3",
                "-m",
                "http.server",
                "8080",
                "--bind",
                "0.0.0.0",
                "--directory",
                files.to_str().unwrap(),
            ],
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
    assert_eq!(seen.peer.ip().to_canonical().to_string(), "127.0.0.6");
    assert_eq!(seen.headers["x-secret-header"], secret);
    let xfcc = seen.headers["x-forwarded-client-cert"].to_str().unwrap();
    assert!(
        xfcc.contains("URI=spiffe://cluster.local/ns/default/sa/client"),
        "{xfcc}"
    );
    let python_log = server_2.log("app");
    assert!(
        python_log.contains("127.0.0.6 - - ") && python_log.contains(&format!("\"GET {path} HTTP/1.1\" 200")),
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
    assert!(
        between_pods.len() >= 40,
        "too few segments captured: {}",
        between_pods.len()
    );
    let connections = netns::all_tls(&between_pods).unwrap();
    assert!(
        connections >= 4,
        "client to both servers, both directions: {connections}"
    );
    assert!(
        !raw.windows(secret.len()).any(|w| w == secret.as_bytes()),
        "the marker crossed the bridge in plaintext"
    );

    // Each side's metrics say mutual TLS.
    let server_metrics = mesh_metrics(&server_1).await;
    let served = metric(
        &server_metrics,
        "istio_requests_total",
        &[
            ("reporter", "destination"),
            ("connection_security_policy", "mutual_tls"),
        ],
    );
    assert!(served >= 1.0, "{server_metrics}");
}

/// Two Deployments as their owners wrote them, injected (`weft inject`'s library), each run in its
/// pod the way the kubelet runs a pod: `weft init` with the injector's arguments, the native
/// sidecar, the app only once the sidecar's startup probe passes from outside the pod. The server is
/// STRICT: plaintext from outside the pod is refused, yet the kubelet's rewritten probes, sent from
/// outside to 15020, pass; the client reaches it over mTLS; its metrics are scraped from outside.
#[tokio::test]
async fn injected_deployments_run_as_the_kubelet_would_and_a_strict_pods_probes_pass() {
    require_root!("injected_deployments_run_as_the_kubelet_would_and_a_strict_pods_probes_pass");
    let network = Network::create(&netns::weft_binary()).unwrap();
    let client = network.pod("client").unwrap();
    let server = network.pod("echo").unwrap();
    // Where the kubelet and Prometheus stand: outside every pod, without a sidecar.
    let node = network.pod("node").unwrap();
    let control = strict_echo(&network, &server);
    let settings = weft_inject::Settings {
        image: "weft:test".into(),
        init_image: "weft-init:test".into(),
        control_plane: control.tls_url(),
        placement: weft_inject::Placement::Native,
    };
    let injected = |name: &str, probes: &str| {
        let yaml = format!(
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{ name: {name}, namespace: default }}\n\
             spec:\n  selector: {{ matchLabels: {{ app: {name} }} }}\n  template:\n\
             \x20   metadata: {{ labels: {{ app: {name} }} }}\n\
             \x20   spec:\n      serviceAccountName: {name}\n\
             \x20     containers:\n        - name: {name}\n          image: {name}:1\n\
             \x20         ports: [{{ name: http, containerPort: {APP_PORT} }}]\n{probes}"
        );
        let out = weft_inject::inject("deployment.yaml", &yaml, &settings).unwrap();
        assert_eq!(out.injected, 1);
        let value: serde_json::Value = serde_yaml_ng::from_str(&out.text).unwrap();
        value["spec"]["template"]["spec"].clone()
    };
    let server_spec = injected(
        "echo",
        "          readinessProbe: { httpGet: { path: /status/204, port: http } }\n\
         \x20         livenessProbe: { tcpSocket: { port: 8080 } }\n",
    );
    let client_spec = injected("client", "");

    // What the kubelet does: init containers, then the sidecar, then (once its startup probe
    // passes) the app.
    let started = |pod: &Pod, spec: &serde_json::Value| {
        control.run_injected(pod, spec, "default").unwrap();
        let probe = &spec["initContainers"][1]["startupProbe"]["httpGet"];
        let addr = SocketAddr::new(
            pod.ip().into(),
            u16::try_from(probe["port"].as_u64().unwrap()).unwrap(),
        );
        (addr, probe["path"].as_str().unwrap().to_owned())
    };
    for (pod, spec) in [(&server, &server_spec), (&client, &client_spec)] {
        let (addr, path) = started(pod, spec);
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(answer) = netns::get(&node, addr, &path, &[]).await
                && answer.status == StatusCode::OK
            {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline && pod.is_running("proxy"),
                "the startup probe of {} never passed:\n{}\ncontrol plane:\n{}",
                pod.name(),
                pod.log("proxy"),
                control.pod().log("control")
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let app = app_in(&server, "echo");

    // The kubelet's rewritten probes, from outside the pod, pass through the proxy's status port.
    for kind in ["readinessProbe", "livenessProbe"] {
        let probe = &server_spec["containers"][0][kind]["httpGet"];
        assert_eq!(probe["port"], 15020, "{kind}: {probe}");
        let addr = SocketAddr::new(server.ip().into(), 15020);
        let answer = netns::get(&node, addr, probe["path"].as_str().unwrap(), &[])
            .await
            .unwrap();
        assert_eq!(answer.status, StatusCode::OK, "{kind}: {answer:?}");
    }
    let probed = app
        .requests()
        .into_iter()
        .find(|r| r.uri.path() == "/status/204")
        .unwrap();
    assert_eq!(probed.peer.ip().to_canonical().to_string(), "127.0.0.6");
    // The same app port from outside, in plaintext: refused under STRICT.
    let direct = SocketAddr::new(server.ip().into(), APP_PORT);
    assert!(
        netns::get(&node, direct, "/", &[]).await.is_err(),
        "plaintext got through STRICT"
    );

    // The client pod's app reaches the service over mutual TLS, and the app sees the caller's identity.
    let answer = netns::get(&client, "10.96.0.20:80".parse().unwrap(), "/", &[])
        .await
        .unwrap();
    assert_eq!(answer.status, StatusCode::OK, "{answer:?}");
    assert_eq!(answer.header("x-served-by"), "echo");
    let seen = app.last_request();
    let xfcc = seen.headers["x-forwarded-client-cert"].to_str().unwrap();
    assert!(
        xfcc.contains("URI=spiffe://cluster.local/ns/default/sa/client"),
        "{xfcc}"
    );

    // Prometheus, outside the pod, scrapes 15020 and sees the hop as mutual TLS, named by workload.
    let scraped = netns::get(
        &node,
        SocketAddr::new(server.ip().into(), 15020),
        "/stats/prometheus",
        &[],
    )
    .await
    .unwrap();
    assert_eq!(scraped.status, StatusCode::OK);
    let served = metric(
        &scraped.body,
        "istio_requests_total",
        &[
            ("reporter", "destination"),
            ("connection_security_policy", "mutual_tls"),
            ("destination_workload", "echo"),
            ("source_workload", "client"),
        ],
    );
    assert!(served >= 1.0, "{}", scraped.body);
}

/// The seed's order service: its VirtualService (90/10 canary, `x-canary: true` to v2) and
/// DestinationRule exactly as the example file has them, over two pods.
#[tokio::test]
async fn seed_canary_splits_90_10_and_the_header_routes_to_v2() {
    require_root!("seed_canary_splits_90_10_and_the_header_routes_to_v2");
    let network = Network::create(&netns::weft_binary()).unwrap();
    let client = network.pod("client").unwrap();
    let v1 = network.pod("order-v1").unwrap();
    let v2 = network.pod("order-v2").unwrap();
    let example = include_str!("../../../examples/mesh/order-service.yaml");
    let policies: Vec<&str> = example
        .split("\n---\n")
        .filter(|doc| doc.contains("kind: VirtualService") || doc.contains("kind: DestinationRule"))
        .collect();
    assert_eq!(policies.len(), 2);
    let mut yaml = service_yaml("order-svc", "10.96.0.30", 8080, &[(&v1, "v1"), (&v2, "v2")]);
    for policy in policies {
        yaml.push_str("---\n");
        yaml.push_str(policy);
        yaml.push('\n');
    }
    let control = Control::start(&network, &[("order-service.yaml", &yaml)]).unwrap();
    let apps = [app_in(&v1, "order-v1"), app_in(&v2, "order-v2")];
    control.inject(&client, "default", "api-gateway", &[]).unwrap();
    for pod in [&v1, &v2] {
        control.inject(pod, "default", "order-svc", &[]).unwrap();
    }
    for pod in [&client, &v1, &v2] {
        netns::wait_ready(pod).await;
    }

    let service: SocketAddr = "10.96.0.30:8080".parse().unwrap();
    let mut app = PodClient::connect(&client, service).await.unwrap();
    let mut to_v2 = 0;
    for n in 0..1000 {
        let answer = app.get(&format!("/orders/{n}"), &[]).await.unwrap();
        assert_eq!(answer.status, StatusCode::OK, "{answer:?}");
        if answer.header("x-served-by") == "order-v2" {
            to_v2 += 1;
        }
    }
    // Binomial(1000, 0.1): mean 100, standard deviation 9.5; 50..=150 is more than five of them.
    assert!((50..=150).contains(&to_v2), "v2 got {to_v2} of 1000");
    assert_eq!(apps[0].request_count() + apps[1].request_count(), 1000);

    for n in 0..100 {
        let answer = app
            .get(&format!("/orders/{n}"), &[("x-canary", "true")])
            .await
            .unwrap();
        assert_eq!(answer.header("x-served-by"), "order-v2", "{answer:?}");
    }
    let metrics = mesh_metrics(&client).await;
    let requests = metric(
        &metrics,
        "istio_requests_total",
        &[
            ("reporter", "source"),
            ("destination_service", "order-svc.default.svc.cluster.local"),
        ],
    );
    assert_eq!(requests, 1100.0, "{metrics}");
}

/// The seed's AuthorizationPolicy between pods: identities come from the sidecars' certificates, so
/// only the gateway's and the payment service's pods may GET and POST orders; a pod without a sidecar is
/// denied (PERMISSIVE, no principal) or refused (STRICT).
#[tokio::test]
async fn the_seed_authorization_policy_holds_between_pods() {
    require_root!("the_seed_authorization_policy_holds_between_pods");
    let network = Network::create(&netns::weft_binary()).unwrap();
    let gateway = network.pod("gateway").unwrap();
    let payments = network.pod("payments").unwrap();
    let intruder = network.pod("intruder").unwrap();
    let outsider = network.pod("outsider").unwrap();
    let order = network.pod("order-v1").unwrap();
    let policy = include_str!("../../../examples/mesh/order-service.yaml")
        .split("\n---\n")
        .find(|doc| doc.contains("kind: AuthorizationPolicy"))
        .unwrap();
    // The seed's policy selects `app: order-service`: the workload carries that label, as in the example.
    let yaml = service_yaml("order-svc", "10.96.0.30", 8080, &[(&order, "v1")])
        .replace("app: order-svc", "app: order-service");
    let control = Control::start(&network, &[("order.yaml", &yaml), ("policy.yaml", policy)]).unwrap();
    let app = app_in(&order, "order-v1");
    control.inject(&gateway, "default", "api-gateway", &[]).unwrap();
    control
        .inject(&payments, "default", "payment-service", &[])
        .unwrap();
    control.inject(&intruder, "default", "other", &[]).unwrap();
    control.inject(&order, "default", "order-svc", &[]).unwrap();
    for pod in [&gateway, &payments, &intruder, &order] {
        netns::wait_ready(pod).await;
    }
    let service: SocketAddr = "10.96.0.30:8080".parse().unwrap();
    for pod in [&gateway, &payments] {
        let mut client = PodClient::connect(pod, service).await.unwrap();
        for method in [http::Method::GET, http::Method::POST] {
            let answer = client.request(method.clone(), "/orders/1", &[]).await.unwrap();
            assert_eq!(
                answer.status,
                StatusCode::OK,
                "{} {method}: {answer:?}",
                pod.name()
            );
        }
        for (method, path) in [(http::Method::DELETE, "/orders/1"), (http::Method::GET, "/admin")] {
            let answer = client.request(method.clone(), path, &[]).await.unwrap();
            assert_eq!(
                answer.status,
                StatusCode::FORBIDDEN,
                "{} {method} {path}",
                pod.name()
            );
            assert_eq!(answer.body, "RBAC: access denied");
        }
    }
    let denied = netns::get(&intruder, service, "/orders/1", &[]).await.unwrap();
    assert_eq!(denied.status, StatusCode::FORBIDDEN);
    assert_eq!(
        app.request_count(),
        4,
        "only the allowed requests reached the app"
    );
    for seen in app.requests() {
        let caller = seen.headers["x-forwarded-client-cert"]
            .to_str()
            .unwrap()
            .to_owned();
        assert!(
            caller.ends_with("/sa/api-gateway") || caller.ends_with("/sa/payment-service"),
            "{caller}"
        );
    }

    // A pod without a sidecar dialling the server pod: PERMISSIVE lets it in without an identity, so the
    // policy denies it; with STRICT it is refused outright.
    let direct = SocketAddr::new(order.ip().into(), APP_PORT);
    let answer = netns::get(&outsider, direct, "/orders/1", &[]).await.unwrap();
    assert_eq!(answer.status, StatusCode::FORBIDDEN, "{answer:?}");
    assert_eq!(curl(&outsider, &format!("http://{direct}/orders/1")).await, "403");
    control
        .write(
            "strict.yaml",
            "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: { name: order, namespace: default }\n\
             spec: { selector: { matchLabels: { app: order-service } }, mtls: { mode: STRICT } }\n",
        )
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while netns::get(&outsider, direct, "/orders/1", &[]).await.is_ok() {
        assert!(std::time::Instant::now() < deadline, "STRICT never applied");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(app.request_count(), 4);
    let metrics = mesh_metrics(&order).await;
    let denials = metric(
        &metrics,
        "istio_requests_total",
        &[("response_code", "403"), ("response_flags", "RBAC")],
    );
    assert!(denials >= 7.0, "{metrics}");
    assert_eq!(
        netns::get(&gateway, service, "/orders/2", &[])
            .await
            .unwrap()
            .status,
        StatusCode::OK
    );
}

/// weft control serving the `echo` service at 10.96.0.20:80 on `server`, with the mesh STRICT.
fn strict_echo(network: &Network, server: &Pod) -> Control {
    Control::start(
        network,
        &[
            (
                "echo.yaml",
                &service_yaml("echo", "10.96.0.20", 80, &[(server, "v1")]),
            ),
            ("peer-authentication.yaml", &peer_authentication("STRICT")),
        ],
    )
    .unwrap()
}

fn peer_authentication(mode: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{ name: echo, namespace: default }}\n\
         spec: {{ selector: {{ matchLabels: {{ app: echo }} }}, mtls: {{ mode: {mode} }} }}\n"
    )
}

#[tokio::test]
async fn strict_refuses_a_client_without_a_sidecar_and_permissive_lets_it_in() {
    require_root!("strict_refuses_a_client_without_a_sidecar_and_permissive_lets_it_in");
    let network = Network::create(&netns::weft_binary()).unwrap();
    let client = network.pod("client").unwrap();
    let outsider = network.pod("outsider").unwrap();
    let server = network.pod("echo").unwrap();
    let control = strict_echo(&network, &server);
    let app = app_in(&server, "echo");
    let outside = HttpServer::serve(
        outsider.listen((Ipv6Addr::UNSPECIFIED, 9000).into()).unwrap(),
        "outside",
    );
    control.inject(&client, "default", "client", &[]).unwrap();
    control.inject(&server, "default", "echo", &[]).unwrap();
    netns::wait_ready(&client).await;
    netns::wait_ready(&server).await;

    // A meshed client gets through STRICT.
    let service: SocketAddr = "10.96.0.20:80".parse().unwrap();
    assert_eq!(
        netns::get(&client, service, "/", &[]).await.unwrap().status,
        StatusCode::OK
    );
    // An address no Service claims passes through to where the app was going (Istio's ALLOW_ANY), from
    // the client pod's own address.
    let passthrough = netns::get(&client, SocketAddr::new(outsider.ip().into(), 9000), "/", &[])
        .await
        .unwrap();
    assert_eq!(passthrough.header("x-served-by"), "outside");
    assert_eq!(
        outside.last_request().peer.ip().to_canonical(),
        IpAddr::from(client.ip())
    );
    let passthrough = netns::get(&client, SocketAddr::new(outsider.ip6().into(), 9000), "/", &[])
        .await
        .unwrap();
    assert_eq!(passthrough.header("x-served-by"), "outside", "IPv6 passthrough");
    assert_eq!(outside.last_request().peer.ip(), IpAddr::from(client.ip6()));
    let seen_by_app = app.request_count();

    // A pod without a sidecar calls the server pod's address directly: refused, the app never sees it.
    let direct = SocketAddr::new(server.ip().into(), APP_PORT);
    let refused = netns::get(&outsider, direct, "/", &[]).await;
    assert!(refused.is_err(), "plaintext got through STRICT: {refused:?}");
    assert_eq!(
        curl(&outsider, &format!("http://{direct}/"))
            .await
            .split(' ')
            .next(),
        Some("000")
    );
    assert_eq!(app.request_count(), seen_by_app);

    // PERMISSIVE: the same call gets through, as plaintext from the sidecar.
    control
        .write("peer-authentication.yaml", &peer_authentication("PERMISSIVE"))
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        if let Ok(answer) = netns::get(&outsider, direct, "/", &[]).await {
            assert_eq!(answer.status, StatusCode::OK);
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "PERMISSIVE never let the plaintext client in"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(curl(&outsider, &format!("http://{direct}/")).await, "200");
    let last = app.last_request();
    assert_eq!(last.peer.ip().to_canonical().to_string(), "127.0.0.6");
    // Over IPv6 the sidecar delivers from ::6, which `weft init` put on the pod's loopback.
    let direct6 = SocketAddr::new(server.ip6().into(), APP_PORT);
    assert_eq!(
        netns::get(&outsider, direct6, "/", &[]).await.unwrap().status,
        StatusCode::OK
    );
    assert_eq!(app.last_request().peer.ip().to_string(), "::6");
    assert!(
        !last.headers.contains_key("x-forwarded-client-cert"),
        "no identity was proven"
    );

    // Inside the server pod, apps reach each other over loopback and the pod address without the proxy.
    let local = netns::get(&server, ([127, 0, 0, 1], APP_PORT).into(), "/", &[])
        .await
        .unwrap();
    assert_eq!(local.status, StatusCode::OK);
    assert_eq!(
        app.last_request().peer.ip().to_canonical().to_string(),
        "127.0.0.1"
    );
    netns::get(&server, direct, "/", &[]).await.unwrap();
    assert_eq!(
        app.last_request().peer.ip().to_canonical(),
        IpAddr::from(server.ip())
    );

    // A connection addressed to the proxy's own listeners is a loop: refused, and the proxy lives on.
    for port in [15001, 15006] {
        let looped = netns::get(&outsider, SocketAddr::new(server.ip().into(), port), "/", &[]).await;
        assert!(looped.is_err(), "port {port}: {looped:?}");
        let looped = netns::get(&server, SocketAddr::new(server.ip().into(), port), "/", &[]).await;
        assert!(looped.is_err(), "port {port} from inside: {looped:?}");
    }
    assert!(server.is_running("proxy"));
    assert!(
        server.log("proxy").contains("redirect loop"),
        "{}",
        server.log("proxy")
    );
    assert_eq!(
        netns::get(&client, service, "/", &[]).await.unwrap().status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn a_killed_proxy_fails_closed_and_nothing_leaks_in_plaintext() {
    require_root!("a_killed_proxy_fails_closed_and_nothing_leaks_in_plaintext");
    let network = Network::create(&netns::weft_binary()).unwrap();
    let client = network.pod("client").unwrap();
    let server = network.pod("echo").unwrap();
    let control = Control::start(
        &network,
        &[(
            "echo.yaml",
            &service_yaml("echo", "10.96.0.20", 80, &[(&server, "v1")]),
        )],
    )
    .unwrap();
    let app = app_in(&server, "echo");
    control.inject(&client, "default", "client", &[]).unwrap();
    control.inject(&server, "default", "echo", &[]).unwrap();
    netns::wait_ready(&client).await;
    netns::wait_ready(&server).await;
    let service: SocketAddr = "10.96.0.20:80".parse().unwrap();
    let direct = SocketAddr::new(server.ip().into(), APP_PORT);
    assert_eq!(
        netns::get(&client, service, "/", &[]).await.unwrap().status,
        StatusCode::OK
    );
    let served = app.request_count();

    let wire = WireCapture::start(&network);
    client.kill("proxy").unwrap();
    // The rules stay; with nothing on 15001 every outbound connection is refused in the pod.
    let marker = "leak-marker-91c2";
    for target in [service, direct] {
        let failed = netns::get(&client, target, &format!("/{marker}"), &[]).await;
        assert!(failed.is_err(), "{target}: {failed:?}");
        let curled = curl(&client, &format!("http://{target}/{marker}")).await;
        assert!(curled.starts_with("000"), "{target}: {curled}");
    }
    // The server's proxy gone too: its app is not reachable around it.
    server.kill("proxy").unwrap();
    control.inject(&client, "default", "client", &[]).unwrap();
    netns::wait_ready(&client).await;
    let failed = netns::get(&client, service, &format!("/{marker}"), &[])
        .await
        .unwrap();
    assert_eq!(failed.status, StatusCode::SERVICE_UNAVAILABLE, "{failed:?}");

    let (segments, raw) = wire.stop();
    assert_eq!(
        app.request_count(),
        served,
        "the app was reached without its proxy"
    );
    let from_client: Vec<_> = segments
        .iter()
        .filter(|s| s.src.ip() == IpAddr::from(client.ip()))
        .collect();
    assert!(
        from_client
            .iter()
            .all(|s| s.dst.ip() == IpAddr::from(control.pod().ip())),
        "the client pod sent TCP payload to a pod while its proxy was dead: {from_client:?}"
    );
    assert!(
        !raw.windows(marker.len()).any(|w| w == marker.as_bytes()),
        "the marker left the pod in plaintext"
    );
}

/// `weft init` itself, with both iptables implementations: the installed rules are exactly the dry run's,
/// a second run changes nothing, another tool's rules are left alone, and `--cleanup` leaves nothing of
/// ours (IPv4 and IPv6).
#[tokio::test]
async fn weft_init_is_idempotent_and_cleanup_leaves_no_rule_of_ours() {
    require_root!("weft_init_is_idempotent_and_cleanup_leaves_no_rule_of_ours");
    let network = Network::create(&netns::weft_binary()).unwrap();
    let dry_run = std::process::Command::new(netns::weft_binary())
        .args(["init", "--dry-run"])
        .output()
        .unwrap();
    let dry_run = String::from_utf8(dry_run.stdout).unwrap();
    let (v4_part, v6_part) = dry_run.split_once("# --- IPv6 ---").unwrap();
    let rule_lines = |text: &str| -> Vec<String> {
        let mut lines: Vec<String> = text
            .lines()
            .filter(|l| l.starts_with("-A "))
            .map(str::to_owned)
            .collect();
        lines.sort();
        lines
    };
    for mode in ["nft", "legacy"] {
        let pod = network.pod(&format!("init-{mode}")).unwrap();
        let save = |tool: &str| pod.exec(&[&format!("{tool}-{mode}-save")]).unwrap();
        let ours = |tool: &str| {
            let save = save(tool);
            let mut lines: Vec<String> = save
                .lines()
                .filter(|l| l.contains("WEFT_"))
                .map(str::to_owned)
                .collect();
            lines.retain(|l| l.starts_with("-A "));
            lines.sort();
            lines
        };
        pod.exec(&[
            &format!("iptables-{mode}"),
            "-t",
            "nat",
            "-A",
            "OUTPUT",
            "-d",
            "192.0.2.1/32",
            "-j",
            "ACCEPT",
        ])
        .unwrap();

        let first = pod.weft_init(&["--iptables-mode", mode]).unwrap();
        assert!(first.contains("installed and checked (IPv4 and IPv6"), "{first}");
        assert_eq!(ours("iptables"), rule_lines(v4_part), "{mode}");
        assert_eq!(ours("ip6tables"), rule_lines(v6_part), "{mode}");
        assert!(
            pod.exec(&["ip", "-6", "addr", "show", "dev", "lo"])
                .unwrap()
                .contains("::6/128")
        );

        let before = (ours("iptables"), ours("ip6tables"));
        let second = pod.weft_init(&["--iptables-mode", mode]).unwrap();
        assert!(second.contains("already in place; nothing changed"), "{second}");
        assert_eq!((ours("iptables"), ours("ip6tables")), before);

        // Different flags replace the rule set in one go, no duplicates.
        pod.weft_init(&["--iptables-mode", mode, "-o", "3306"]).unwrap();
        let changed = ours("iptables");
        assert_eq!(changed.len(), before.0.len() + 1, "{changed:#?}");
        assert_eq!(changed.iter().filter(|l| l.starts_with("-A OUTPUT")).count(), 1);

        let cleanup = pod.weft_init(&["--iptables-mode", mode, "--cleanup"]).unwrap();
        assert!(cleanup.contains("capture rules removed"), "{cleanup}");
        for tool in ["iptables", "ip6tables"] {
            let left = save(tool);
            assert!(!left.contains("WEFT"), "{mode} {tool} after cleanup:\n{left}");
        }
        assert!(
            save("iptables").contains("-A OUTPUT -d 192.0.2.1/32 -j ACCEPT"),
            "another tool's rule was removed"
        );
        assert!(
            !pod.exec(&["ip", "-6", "addr", "show", "dev", "lo"])
                .unwrap()
                .contains("::6/128")
        );
        let again = pod.weft_init(&["--iptables-mode", mode, "--cleanup"]).unwrap();
        assert!(again.contains("no capture rules to remove"), "{again}");
    }
}

/// The flags decide what the kernel sends to the proxy. With the rules in place and no proxy running,
/// a captured connection is refused (nothing listens on 15001/15006) and an excluded one gets through,
/// over IPv4 and IPv6.
#[tokio::test]
async fn init_flags_decide_what_is_captured() {
    require_root!("init_flags_decide_what_is_captured");
    let network = Network::create(&netns::weft_binary()).unwrap();
    let src = network.pod("src").unwrap();
    let dst = network.pod("dst").unwrap();
    let _apps: Vec<HttpServer> = [7000u16, 7001]
        .into_iter()
        .map(|port| {
            HttpServer::serve(
                dst.listen((std::net::Ipv6Addr::UNSPECIFIED, port).into())
                    .unwrap(),
                "dst",
            )
        })
        .collect();
    let reaches = |pod: &'static str, port: u16, v6: bool| {
        let ip: IpAddr = if v6 { dst.ip6().into() } else { dst.ip().into() };
        let from = if pod == "src" { &src } else { &dst };
        async move {
            netns::get(from, SocketAddr::new(ip, port), "/", &[])
                .await
                .is_ok()
        }
    };

    // Outbound: everything captured but port 7001.
    src.weft_init(&["-o", "7001"]).unwrap();
    for v6 in [false, true] {
        assert!(
            !reaches("src", 7000, v6).await,
            "7000 (v6: {v6}) should be captured"
        );
        assert!(reaches("src", 7001, v6).await, "7001 (v6: {v6}) is excluded");
    }
    // Outbound: the destination pod excluded by address.
    let dst_v4 = format!("{}/32", dst.ip());
    let dst_v6 = format!("{}/128", dst.ip6());
    src.weft_init(&["-x", &format!("{dst_v4},{dst_v6}")]).unwrap();
    for v6 in [false, true] {
        assert!(
            reaches("src", 7000, v6).await,
            "7000 (v6: {v6}) to an excluded address"
        );
    }
    // Outbound: only some addresses captured, plus a port wherever it goes.
    src.weft_init(&["-i", "192.0.2.0/24", "-q", "7000"]).unwrap();
    assert!(!reaches("src", 7000, false).await, "-q 7000 captures it anywhere");
    assert!(reaches("src", 7001, false).await, "not in -i, not in -q");
    src.weft_init(&["--cleanup"]).unwrap();

    // Inbound: only 7000 captured; then all but 7001.
    dst.weft_init(&["-b", "7000"]).unwrap();
    for v6 in [false, true] {
        assert!(
            !reaches("src", 7000, v6).await,
            "inbound 7000 (v6: {v6}) should be captured"
        );
        assert!(
            reaches("src", 7001, v6).await,
            "inbound 7001 (v6: {v6}) is not in -b"
        );
    }
    dst.weft_init(&["-d", "7001"]).unwrap();
    assert!(!reaches("src", 7000, false).await);
    assert!(reaches("src", 7001, false).await, "-d 7001");
    // The proxy's own ports are never captured, whatever the flags: readiness answers directly.
    let _readiness = HttpServer::serve(dst.listen(([0, 0, 0, 0], 15021).into()).unwrap(), "readiness");
    assert!(reaches("src", 15021, false).await, "15021 must never be captured");
    // Apps in the pod reach each other on loopback and on the pod's address.
    assert!(
        netns::get(&dst, ([127, 0, 0, 1], 7000).into(), "/", &[])
            .await
            .is_ok()
    );
    assert!(
        reaches("dst", 7000, false).await,
        "app to its own pod address is not captured"
    );
}

/// iptables commits a restore table by table: when a later table fails, `weft init` puts back the tables
/// already changed. The failure is injected by a wrapper around the real `iptables-nft-restore` that
/// commits the mangle part of the transaction and then fails, as a kernel refusing the nat table would.
#[tokio::test]
async fn a_failed_restore_puts_back_the_tables_already_changed() {
    require_root!("a_failed_restore_puts_back_the_tables_already_changed");
    let network = Network::create(&netns::weft_binary()).unwrap();
    let pod = network.pod("init").unwrap();
    let real = pod
        .exec(&["sh", "-c", "command -v iptables-nft-restore"])
        .unwrap();
    let bin = network.dir().join("failing-bin");
    std::fs::create_dir_all(&bin).unwrap();
    let wrapper = bin.join("iptables-nft-restore");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\ninput=$(cat)\n\
             if printf '%s\\n' \"$input\" | grep -q -- '-A WEFT_REDIRECT'; then\n\
             \x20 printf '%s\\n' \"$input\" | awk '/^\\*nat/{{exit}} {{print}}' | {real} \"$@\"\n\
             \x20 echo 'iptables-nft-restore: line 12 failed' >&2\n  exit 1\nfi\n\
             printf '%s\\n' \"$input\" | exec {real} \"$@\"\n",
            real = real.trim()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&wrapper, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let path = format!("PATH={}:{}", bin.display(), std::env::var("PATH").unwrap());
    let weft = netns::weft_binary();
    let weft = weft.to_str().unwrap();

    let failed = pod
        .exec(&["env", &path, weft, "init", "--iptables-mode", "nft"])
        .unwrap_err();
    assert!(failed.contains("line 12 failed"), "{failed}");
    assert!(failed.contains("put back as they were"), "{failed}");
    let left = pod.exec(&["iptables-nft-save"]).unwrap();
    assert!(
        !left.contains("WEFT"),
        "the mangle table kept a half-applied rule set:\n{left}"
    );

    // Without the fault the same command installs everything.
    let ok = pod.exec(&[weft, "init", "--iptables-mode", "nft"]).unwrap();
    assert!(ok.contains("installed and checked"), "{ok}");
}

/// The harness removes what it made when a test fails: a panic with pods, a running proxy and a bridge
/// in scope leaves no namespace, bridge or process behind.
#[tokio::test]
async fn a_failing_test_leaves_nothing_behind() {
    require_root!("a_failing_test_leaves_nothing_behind");
    let made = std::sync::Mutex::new((String::new(), String::new()));
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let network = Network::create(&netns::weft_binary()).unwrap();
        let pod = network.pod("doomed").unwrap();
        pod.weft_init(&[]).unwrap();
        pod.spawn("app", &["sleep", "600"]).unwrap();
        *made.lock().unwrap() = (pod.netns().to_owned(), network.bridge().to_owned());
        panic!("a test failing with the mesh up");
    }));
    assert!(outcome.is_err());
    let (namespace, bridge) = made.into_inner().unwrap();
    let namespaces = netns::run(&["ip", "netns", "list"]).unwrap();
    assert!(
        !namespaces.contains(&namespace),
        "{namespace} left behind: {namespaces}"
    );
    assert!(
        netns::run(&["ip", "link", "show", &bridge]).is_err(),
        "{bridge} left behind"
    );
    let survivor = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|entry| std::fs::read(entry.ok()?.path().join("cmdline")).ok())
        .any(|cmdline| cmdline == b"sleep\x00600\x00");
    assert!(!survivor, "the pod's process survived");
}
