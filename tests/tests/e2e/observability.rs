//! What a request leaves behind: access-log lines on both sidecars of a mutual-TLS hop, tied by the
//! request id the client side gave it; the forwarding headers the app and the client see; access logs
//! configured over xDS by an xDS server and by `weft control`'s Telemetry.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::{Request, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use weft_control::ControlPlane;
use weft_test_support::http::{HttpServer, TestBody, drain_body, empty, full};
use weft_test_support::tcp::TcpServer;
use weft_test_support::{TestProxy, admin_get, assert_eventually};

const PRODUCTPAGE: &str = "spiffe://cluster.local/ns/default/sa/productpage";
const REVIEWS: &str = "spiffe://cluster.local/ns/default/sa/reviews";

fn identity(cp: &ControlPlane, sa: &str) -> String {
    let token = cp
        .ca()
        .tokens()
        .issue("default", sa, Duration::from_secs(3600))
        .unwrap();
    format!(
        "node: {{ workload: {sa}, namespace: default, service_account: {sa} }}\n\
         identity: {{ ca_address: \"http://{}\", token: \"{token}\" }}\n",
        cp.address()
    )
}

/// The JSON lines written so far to `path`, once there are at least `n`.
async fn lines(path: &Path, n: usize) -> Vec<serde_json::Value> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let parsed: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect();
        if parsed.len() >= n || std::time::Instant::now() > deadline {
            return parsed;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A proxy configured by the xDS server at `url`, its own access log off.
async fn proxy_of_xds(url: &str) -> TestProxy {
    let proxy = TestProxy::start(&format!(
        "access_log: {{ path: off }}\nnode: {{ workload: client, namespace: default }}\nxds: {{ address: \"{url}\", initial_fetch_timeout: 10s }}"
    ))
    .await;
    assert_eventually!(admin_get(proxy.admin(), "/ready").await.0 == 200, "not ready");
    proxy
}

/// `GET http://web:8000{path}` through the proxy's outbound listener, as if to the service; 200.
async fn get_web(proxy: &TestProxy, path: &str) {
    let client = weft_test_support::http::client(
        proxy
            .orig_dst
            .connector(proxy.outbound(), "127.0.96.9:8000".parse().unwrap()),
        false,
    );
    let response = client
        .request(
            Request::get(format!("http://web:8000{path}"))
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    drain_body(response.into_body()).await.unwrap();
}

/// `GET http://{front}{path}` with `headers`, straight to a sidecar's listener; 200.
async fn get_front(front: SocketAddr, path: &str, headers: &[(&str, &str)]) {
    let mut request = Request::get(format!("http://{front}{path}"));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = plain_client()
        .request(request.body(empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    drain_body(response.into_body()).await.unwrap();
}

fn log_file(dir: &tempfile::TempDir, name: &str) -> PathBuf {
    dir.path().join(name)
}

fn plain_client()
-> hyper_util::client::legacy::Client<hyper_util::client::legacy::connect::HttpConnector, TestBody> {
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_request_leaves_a_line_on_both_sidecars_tied_by_its_request_id() {
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(dir.path().join("mesh"), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let app = HttpServer::start("reviews-app").await;
    let (client_log, server_log) = (log_file(&dir, "client.log"), log_file(&dir, "server.log"));
    let server = TestProxy::start(&format!(
        "{}access_log: {{ path: \"{}\", format: json }}\n\
         listeners: [{{ name: inbound, address: 127.0.0.1:0, cluster: app, peer_authentication: strict }}]\n\
         clusters: [{{ name: app, endpoints: [\"{}\"] }}]",
        identity(&cp, "reviews"),
        server_log.display(),
        app.addr
    ))
    .await;
    let client = TestProxy::start(&format!(
        "{}access_log: {{ path: \"{}\", format: json }}\n\
         listeners: [{{ name: front, address: 127.0.0.1:0, cluster: reviews }}]\n\
         clusters: [{{ name: reviews, endpoints: [\"{}\"], tls: {{ identities: [\"{REVIEWS}\"] }} }}]",
        identity(&cp, "productpage"),
        client_log.display(),
        server.listener("inbound")
    ))
    .await;
    for proxy in [&server, &client] {
        assert_eventually!(admin_get(proxy.admin(), "/ready").await.0 == 200, "not ready");
    }

    let front = client.listener("front");
    let response = plain_client()
        .request(
            Request::post(format!("http://{front}/reviews/1?page=2"))
                .header("user-agent", "observability-test/1.0")
                .body(full("twelve bytes"))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let service_time: u64 = response.headers()["x-envoy-upstream-service-time"]
        .to_str()
        .unwrap()
        .parse()
        .expect("x-envoy-upstream-service-time is milliseconds");
    let sent = drain_body(response.into_body()).await.unwrap();

    // The app saw the id the client side generated, and Envoy's forwarding headers.
    let seen = app.last_request();
    let request_id = seen.headers["x-request-id"].to_str().unwrap().to_owned();
    assert_eq!(request_id.len(), 36, "a UUID: {request_id}");
    assert_eq!(&request_id[14..15], "4", "version 4: {request_id}");
    assert_eq!(seen.headers["x-forwarded-proto"], "http");
    assert_eq!(seen.headers["x-envoy-attempt-count"], "1");

    let client_line = lines(&client_log, 1).await.remove(0);
    let server_line = lines(&server_log, 1).await.remove(0);
    for line in [&client_line, &server_line] {
        assert_eq!(line["method"], "POST", "{line}");
        assert_eq!(line["path"], "/reviews/1?page=2", "{line}");
        assert_eq!(line["response_code"], 200, "{line}");
        assert_eq!(line["response_flags"], "-", "{line}");
        assert_eq!(line["response_code_details"], "via_upstream", "{line}");
        assert_eq!(line["request_id"], request_id, "{line}");
        assert_eq!(line["user_agent"], "observability-test/1.0", "{line}");
        assert_eq!(line["bytes_received"], 12, "{line}");
        assert_eq!(line["bytes_sent"], sent, "{line}");
        assert_eq!(line["upstream_request_attempt_count"], 1, "{line}");
        assert!(line["duration"].as_u64().is_some(), "{line}");
        assert!(line["start_time"].as_str().unwrap().ends_with('Z'), "{line}");
    }
    assert_eq!(client_line["protocol"], "HTTP/1.1");
    assert_eq!(client_line["authority"], front.to_string());
    assert_eq!(client_line["upstream_cluster"], "reviews");
    assert_eq!(
        client_line["upstream_host"],
        server.listener("inbound").to_string()
    );
    assert_eq!(client_line["downstream_local_address"], front.to_string());
    assert_eq!(client_line["downstream_peer_uri_san"], serde_json::Value::Null);
    assert_eq!(
        client_line["upstream_service_time"],
        service_time.to_string(),
        "the client's header is the client side's own figure"
    );
    assert_eq!(server_line["upstream_cluster"], "app");
    assert_eq!(server_line["upstream_host"], app.addr.to_string());
    assert_eq!(
        server_line["downstream_peer_uri_san"], PRODUCTPAGE,
        "the verified caller"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_and_retries_are_logged_with_their_flags_details_and_attempts() {
    let dir = tempfile::tempdir().unwrap();
    let log = log_file(&dir, "access.log");
    let app = HttpServer::start("app").await;
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let proxy = TestProxy::start(&format!(
        "access_log: {{ path: \"{}\", format: json }}\n\
         listeners:\n\
         - {{ name: up, address: 127.0.0.1:0, cluster: app }}\n\
         - {{ name: down, address: 127.0.0.1:0, route: down }}\n\
         clusters:\n\
         - {{ name: app, endpoints: [\"{}\"] }}\n\
         - {{ name: dead, endpoints: [\"{dead}\"] }}\n\
         routes:\n\
         - name: down\n  virtual_hosts:\n  - name: all\n    domains: [\"*\"]\n    routes:\n    \
         - name: to-dead\n      match: {{ prefix: / }}\n      cluster: dead\n      \
         retry: {{ retry_on: connect-failure, num_retries: 2, per_try_timeout: 1s }}",
        log.display(),
        app.addr
    ))
    .await;
    let response = plain_client()
        .request(
            Request::get(format!("http://{}/x", proxy.listener("down")))
                .header("x-request-id", "caller-chosen-id")
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    drain_body(response.into_body()).await.unwrap();
    let line = lines(&log, 1).await.remove(0);
    assert_eq!(line["response_code"], 503, "{line}");
    assert_eq!(line["response_flags"], "UF,URX", "{line}");
    assert_eq!(
        line["response_code_details"], "upstream_reset_before_response_started{connection_failure}",
        "{line}"
    );
    assert!(
        line["upstream_transport_failure_reason"]
            .as_str()
            .is_some_and(|r| !r.is_empty()),
        "{line}"
    );
    assert_eq!(line["upstream_request_attempt_count"], 3, "{line}");
    assert_eq!(line["upstream_host"], dead.to_string(), "{line}");
    assert_eq!(line["route_name"], "to-dead", "{line}");
    assert_eq!(line["request_id"], "caller-chosen-id", "a caller's id is kept");

    // A request without an id is given one; the response carries the upstream's service time.
    let response = plain_client()
        .request(
            Request::get(format!("http://{}/y", proxy.listener("up")))
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert!(response.headers().contains_key("x-envoy-upstream-service-time"));
    drain_body(response.into_body()).await.unwrap();
    let line = lines(&log, 2).await.remove(1);
    assert_eq!(line["upstream_cluster"], "app", "{line}");
    assert_eq!(app.last_request().headers["x-request-id"].len(), 36);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_opaque_tcp_connection_is_one_line_with_its_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let log = log_file(&dir, "access.log");
    let echo = TcpServer::echo().await;
    let proxy = TestProxy::start(&format!(
        "access_log: {{ path: \"{}\" }}\nidle_timeout: 1s\n\
         listeners: [{{ name: db, address: 127.0.0.1:0, cluster: db, protocol: tcp }}]\n\
         clusters: [{{ name: db, endpoints: [\"{}\"] }}]",
        log.display(),
        echo.addr
    ))
    .await;
    let mut stream = tokio::net::TcpStream::connect(proxy.listener("db"))
        .await
        .unwrap();
    stream.write_all(b"0123456789").await.unwrap();
    stream.shutdown().await.unwrap();
    let mut back = Vec::new();
    stream.read_to_end(&mut back).await.unwrap();
    assert_eq!(back, b"0123456789");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let text = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if !text.is_empty() || std::time::Instant::now() > deadline {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // Istio's text format: no HTTP, a zero response code, the bytes each way, the endpoint.
    assert!(text.starts_with('['), "{text}");
    let after_time = text.split_once("] ").unwrap().1;
    assert!(
        after_time.starts_with("\"- - -\" 0 - - - \"-\" 10 10 "),
        "{after_time}"
    );
    assert!(text.contains(&format!("\"{}\" db ", echo.addr)), "{text}");
    assert!(text.ends_with(" -\n"), "no route name for TCP: {text:?}");

    // A connection the idle timeout closes still reports what it carried (metrics and log).
    let mut stream = tokio::net::TcpStream::connect(proxy.listener("db"))
        .await
        .unwrap();
    stream.write_all(b"abcde").await.unwrap();
    let mut echoed = [0u8; 5];
    stream.read_exact(&mut echoed).await.unwrap();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "the idle timeout closed the connection");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let second = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.lines().count() >= 2 || std::time::Instant::now() > deadline {
            break text.lines().nth(1).unwrap_or_default().to_owned();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(second.contains("\"- - -\" 0 - - - \"-\" 5 5 "), "{second}");
    let metrics = proxy.metrics().await;
    assert_eq!(
        weft_test_support::metric(&metrics, "istio_tcp_received_bytes_total", &[]),
        15.0,
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_xds_server_turns_on_access_logs_and_a_format_it_cannot_fill_is_refused() {
    use envoy_types::pb::envoy::config::accesslog::v3::{AccessLog, AccessLogFilter, access_log};
    use envoy_types::pb::envoy::config::cluster::v3::Cluster;
    use envoy_types::pb::envoy::config::core::v3::{SubstitutionFormatString, substitution_format_string};
    use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
    use envoy_types::pb::envoy::config::listener::v3::Listener;
    use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
    use envoy_types::pb::envoy::extensions::access_loggers::file::v3::{FileAccessLog, file_access_log};
    use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
    use envoy_types::util::pack_any;
    use weft_test_support::envoy::*;

    let dir = tempfile::tempdir().unwrap();
    let log = log_file(&dir, "xds.log");
    let file_log = |fields: &[(&str, &str)]| {
        let json = Struct {
            fields: fields
                .iter()
                .map(|(k, v)| {
                    let value = Value {
                        kind: Some(Kind::StringValue((*v).into())),
                    };
                    ((*k).to_owned(), value)
                })
                .collect(),
        };
        AccessLog {
            name: "envoy.access_loggers.file".into(),
            filter: None,
            config_type: Some(access_log::ConfigType::TypedConfig(pack_any(FileAccessLog {
                path: log.display().to_string(),
                access_log_format: Some(file_access_log::AccessLogFormat::LogFormat(
                    SubstitutionFormatString {
                        format: Some(substitution_format_string::Format::JsonFormat(json)),
                        ..Default::default()
                    },
                )),
            }))),
        }
    };
    let web = HttpServer::start("web").await;
    let xds = weft_test_support::xds::TestXdsServer::start().await;
    xds.set(&url::<Cluster>(), "c1", vec![pack_any(eds_cluster("web"))]);
    xds.set(
        &url::<ClusterLoadAssignment>(),
        "e1",
        vec![endpoints("web", web.addr)],
    );
    xds.set(&url::<RouteConfiguration>(), "r1", vec![routes("8000", "web")]);
    let mut manager = hcm("8000");
    manager.access_log = vec![file_log(&[
        ("code", "%RESPONSE_CODE%"),
        ("what", "%REQ(:METHOD)% %REQ(:PATH)%"),
        ("cluster", "%UPSTREAM_CLUSTER%"),
    ])];
    xds.set(
        &url::<Listener>(),
        "l1",
        vec![listener_with(8000, manager.clone())],
    );

    let proxy = proxy_of_xds(&xds.url()).await;
    get_web(&proxy, "/hello").await;
    let line = lines(&log, 1).await.remove(0);
    assert_eq!(
        line,
        serde_json::json!({"cluster": "web", "code": 200, "what": "GET /hello"})
    );

    // A filtered log cannot be honoured: refused by field, and the last good listener keeps logging.
    let mut filtered = manager.clone();
    filtered.access_log[0].filter = Some(AccessLogFilter::default());
    xds.set(&url::<Listener>(), "l2", vec![listener_with(8000, filtered)]);
    assert_eventually!(!xds.nacks().is_empty(), "no NACK");
    let (_, still_on, message) = xds.nacks().remove(0);
    assert_eq!(still_on, "l1");
    assert!(
        message.contains("access_log[0].filter: access log filters are not supported"),
        "{message}"
    );
    let mut unknown = manager.clone();
    unknown.access_log = vec![file_log(&[("meta", "%DYNAMIC_METADATA(istio.mixer:status)%")])];
    xds.set(&url::<Listener>(), "l3", vec![listener_with(8000, unknown)]);
    assert_eventually!(xds.nacks().len() >= 2, "no second NACK");
    let (_, _, message) = xds.nacks().remove(1);
    assert!(
        message.contains("unsupported access log command %DYNAMIC_METADATA(istio.mixer:status)%"),
        "{message}"
    );
    get_web(&proxy, "/hello").await;
    assert_eq!(
        lines(&log, 2).await.len(),
        2,
        "still logged by the last good listener"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_telemetry_resource_in_weft_control_turns_on_the_client_sides_access_log() {
    let dir = tempfile::tempdir().unwrap();
    let web = HttpServer::start("web").await;
    std::fs::write(
        dir.path().join("mesh.yaml"),
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{ name: web, namespace: default }}\n\
             spec: {{ clusterIP: 127.0.96.40, selector: {{ app: web }}, ports: [{{ name: http, port: 8000 }}] }}\n\
             ---\napiVersion: networking.istio.io/v1\nkind: WorkloadEntry\n\
             metadata: {{ name: web-1, namespace: default }}\n\
             spec: {{ address: 127.0.0.1, labels: {{ app: web }}, ports: {{ http: {} }} }}\n\
             ---\napiVersion: telemetry.istio.io/v1\nkind: Telemetry\n\
             metadata: {{ name: mesh-default, namespace: istio-system }}\n\
             spec:\n  accessLogging:\n  - providers: [{{ name: envoy }}]\n    match: {{ mode: CLIENT }}\n\
             ---\napiVersion: telemetry.istio.io/v1\nkind: Telemetry\n\
             metadata: {{ name: traced, namespace: default }}\n\
             spec:\n  selector: {{ matchLabels: {{ app: other }} }}\n  tracing: [{{ randomSamplingPercentage: 10 }}]\n",
            web.addr.port()
        ),
    )
    .unwrap();
    let cp = ControlPlane::start(dir.path().into(), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let problems: Vec<String> = cp.problems().iter().map(ToString::to_string).collect();
    assert!(
        problems
            .iter()
            .any(|p| p.contains("spec.tracing") && p.contains("not supported")),
        "what is not done is said: {problems:?}"
    );
    let proxy = TestProxy::start(&format!(
        "access_log: {{ path: off }}\nnode: {{ workload: client, namespace: default }}\nxds: {{ address: \"http://{}\", initial_fetch_timeout: 10s }}",
        cp.address()
    ))
    .await;
    assert_eventually!(admin_get(proxy.admin(), "/ready").await.0 == 200, "not ready");
    let (_, dump) = admin_get(proxy.admin(), "/mesh").await;
    let dump: serde_json::Value = serde_json::from_str(&dump).unwrap();
    let service: SocketAddr = "127.0.96.40:8000".parse().unwrap();
    let services = &dump["mesh"]["outbound"]["services"];
    let web_target = services
        .as_object()
        .and_then(|s| s.get(&service.to_string()))
        .or_else(|| services.as_object().and_then(|s| s.get("0.0.0.0:8000")))
        .unwrap_or_else(|| panic!("no outbound service: {services}"));
    assert_eq!(
        web_target["access_log"],
        serde_json::json!(["stdout (text)"]),
        "{web_target}"
    );
    assert_eq!(
        dump["mesh"]["inbound"]["access_log"],
        serde_json::json!([]),
        "mode CLIENT: the server side does not log"
    );
}

/// The spans the receiver has once it has at least `n` (the proxies export in batches every 5 s).
async fn spans(
    receiver: &weft_test_support::otlp::OtlpReceiver,
    n: usize,
) -> Vec<weft_test_support::otlp::ReceivedSpan> {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let spans = receiver.spans();
        if spans.len() >= n || std::time::Instant::now() > deadline {
            return spans;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hop_between_sidecars_is_a_client_and_a_server_span_of_the_apps_trace() {
    use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(dir.path().join("mesh"), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let receiver = weft_test_support::otlp::OtlpReceiver::start().await;
    let app = HttpServer::start("reviews-app").await;
    let tracing = format!(
        "access_log: {{ path: off }}\ntracing: {{ otlp_endpoint: \"{}\", sampling_percent: 100 }}\n",
        receiver.endpoint()
    );
    let server = TestProxy::start(&format!(
        "{}{tracing}listeners: [{{ name: inbound, address: 127.0.0.1:0, cluster: app, peer_authentication: strict }}]\n\
         clusters: [{{ name: app, endpoints: [\"{}\"] }}]",
        identity(&cp, "reviews"),
        app.addr
    ))
    .await;
    let client = TestProxy::start(&format!(
        "{}{tracing}listeners: [{{ name: front, address: 127.0.0.1:0, cluster: reviews }}]\n\
         clusters: [{{ name: reviews, endpoints: [\"{}\"], tls: {{ identities: [\"{REVIEWS}\"] }} }}]",
        identity(&cp, "productpage"),
        server.listener("inbound")
    ))
    .await;
    for proxy in [&server, &client] {
        assert_eventually!(admin_get(proxy.admin(), "/ready").await.0 == 200, "not ready");
    }
    let front = client.listener("front");
    // The calling app propagates its own span.
    let app_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let app_span = "00f067aa0ba902b7";
    get_front(
        front,
        "/reviews/7?x=1",
        &[("traceparent", &format!("00-{app_trace}-{app_span}-01"))],
    )
    .await;
    let seen = app.last_request();
    let traceparent = seen.headers["traceparent"].to_str().unwrap().to_owned();

    let spans = spans(&receiver, 2).await;
    assert_eq!(spans.len(), 2, "{spans:#?}");
    let client_span = spans
        .iter()
        .find(|s| s.span.kind == SpanKind::Client as i32)
        .expect("a client span");
    let server_span = spans
        .iter()
        .find(|s| s.span.kind == SpanKind::Server as i32)
        .expect("a server span");
    for span in [client_span, server_span] {
        assert_eq!(span.trace_id(), app_trace, "one trace, the app's");
        assert_eq!(span.attribute("http.status_code").as_deref(), Some("200"));
        assert_eq!(span.attribute("http.method").as_deref(), Some("GET"));
        assert_eq!(span.span.name, format!("{front}/reviews/7"));
        assert_eq!(
            span.attribute("guid:x-request-id").as_deref(),
            Some(seen.headers["x-request-id"].to_str().unwrap())
        );
    }
    assert_eq!(
        client_span.parent_span_id(),
        app_span,
        "the client span is the app's child"
    );
    assert_eq!(
        server_span.parent_span_id(),
        client_span.span_id(),
        "the server span is the client span's child"
    );
    assert_eq!(
        client_span.attribute("upstream_cluster").as_deref(),
        Some("reviews")
    );
    assert_eq!(server_span.attribute("upstream_cluster").as_deref(), Some("app"));
    assert_eq!(
        server_span.attribute("peer.identity").as_deref(),
        Some(PRODUCTPAGE)
    );
    assert_eq!(client_span.service, "productpage.default");
    assert_eq!(server_span.service, "reviews.default");
    assert_eq!(
        traceparent,
        format!("00-{app_trace}-{}-01", server_span.span_id()),
        "the app sees the server span as its parent"
    );

    // A request an upstream decided not to sample: no span, and the decision travels on.
    get_front(
        front,
        "/unsampled",
        &[("traceparent", &format!("00-{app_trace}-{app_span}-00"))],
    )
    .await;
    let traceparent = app.last_request().headers["traceparent"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        traceparent.starts_with(&format!("00-{app_trace}-")),
        "{traceparent}"
    );
    assert!(traceparent.ends_with("-00"), "not sampled: {traceparent}");
    // B3 from the app: read, followed, and kept up to date for the app behind.
    get_front(
        front,
        "/b3",
        &[
            ("x-b3-traceid", "80f198ee56343ba864fe8b2a57d3eff7"),
            ("x-b3-spanid", "e457b5a2e4d86bd1"),
            ("x-b3-sampled", "1"),
        ],
    )
    .await;
    let headers = app.last_request().headers;
    assert_eq!(headers["x-b3-traceid"], "80f198ee56343ba864fe8b2a57d3eff7");
    assert_ne!(headers["x-b3-spanid"], "e457b5a2e4d86bd1", "the server span's id");
    let spans = spans_after(&receiver, 4).await;
    assert_eq!(
        spans.len(),
        4,
        "two more spans, none for the unsampled request: {spans:#?}"
    );
    assert!(
        spans[2..]
            .iter()
            .all(|s| s.trace_id() == "80f198ee56343ba864fe8b2a57d3eff7")
    );
    let metrics = client.metrics().await;
    assert_eq!(
        weft_test_support::metric(&metrics, "weft_tracing_spans_dropped_total", &[]),
        0.0
    );
}

async fn spans_after(
    receiver: &weft_test_support::otlp::OtlpReceiver,
    n: usize,
) -> Vec<weft_test_support::otlp::ReceivedSpan> {
    // Wait past one more export period so that a span that should not exist would have arrived.
    tokio::time::sleep(Duration::from_secs(6)).await;
    spans(receiver, n).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_that_is_down_never_fails_or_slows_a_request() {
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let app = HttpServer::start("app").await;
    let proxy = TestProxy::start(&format!(
        "access_log: {{ path: off }}\ntracing: {{ otlp_endpoint: \"http://{dead}\", sampling_percent: 100 }}\n\
         listeners: [{{ name: front, address: 127.0.0.1:0, cluster: app }}]\n\
         clusters: [{{ name: app, endpoints: [\"{}\"] }}]",
        app.addr
    ))
    .await;
    let client = plain_client();
    let started = std::time::Instant::now();
    for _ in 0..50 {
        let response = client
            .request(
                Request::get(format!("http://{}/", proxy.listener("front")))
                    .body(empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        drain_body(response.into_body()).await.unwrap();
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert!(app.last_request().headers.contains_key("traceparent"));
    let failed = || async {
        let metrics = proxy.metrics().await;
        weft_test_support::metric(&metrics, "weft_tracing_spans_export_failures_total", &[])
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while failed().await < 50.0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(failed().await, 50.0, "the lost spans are counted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_xds_server_turns_on_tracing_to_a_collector_cluster_and_other_tracers_are_refused() {
    use envoy_types::pb::envoy::config::cluster::v3::Cluster;
    use envoy_types::pb::envoy::config::core::v3::{GrpcService, grpc_service};
    use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
    use envoy_types::pb::envoy::config::listener::v3::Listener;
    use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
    use envoy_types::pb::envoy::config::trace::v3::{OpenTelemetryConfig, ZipkinConfig, tracing::Http, tracing::http};
    use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::http_connection_manager::Tracing;
    use envoy_types::pb::envoy::r#type::tracing::v3::{CustomTag, custom_tag};
    use envoy_types::pb::envoy::r#type::v3::Percent;
    use envoy_types::util::pack_any;
    use weft_test_support::envoy::*;

    let receiver = weft_test_support::otlp::OtlpReceiver::start().await;
    let web = HttpServer::start("web").await;
    let xds = weft_test_support::xds::TestXdsServer::start().await;
    xds.set(
        &url::<Cluster>(),
        "c1",
        vec![
            pack_any(eds_cluster("web")),
            pack_any(eds_cluster("otel-collector")),
        ],
    );
    xds.set(
        &url::<ClusterLoadAssignment>(),
        "e1",
        vec![
            endpoints("web", web.addr),
            endpoints("otel-collector", receiver.addr),
        ],
    );
    xds.set(&url::<RouteConfiguration>(), "r1", vec![routes("8000", "web")]);
    let tracing = |provider: Http| Tracing {
        random_sampling: Some(Percent { value: 100.0 }),
        custom_tags: vec![CustomTag {
            tag: "istio.mesh_id".into(),
            r#type: Some(custom_tag::Type::Literal(custom_tag::Literal {
                value: "cluster.local".into(),
            })),
        }],
        provider: Some(provider),
        ..Default::default()
    };
    let otel = Http {
        name: "envoy.tracers.opentelemetry".into(),
        config_type: Some(http::ConfigType::TypedConfig(pack_any(OpenTelemetryConfig {
            grpc_service: Some(GrpcService {
                target_specifier: Some(grpc_service::TargetSpecifier::EnvoyGrpc(
                    grpc_service::EnvoyGrpc {
                        cluster_name: "otel-collector".into(),
                        ..Default::default()
                    },
                )),
                ..Default::default()
            }),
            service_name: "web-client.default".into(),
            ..Default::default()
        }))),
    };
    let mut manager = hcm("8000");
    manager.tracing = Some(tracing(otel));
    xds.set(
        &url::<Listener>(),
        "l1",
        vec![listener_with(8000, manager.clone())],
    );
    let proxy = proxy_of_xds(&xds.url()).await;
    get_web(&proxy, "/traced").await;
    let spans = spans(&receiver, 1).await;
    assert_eq!(spans.len(), 1, "{spans:#?}");
    assert_eq!(spans[0].service, "web-client.default");
    assert_eq!(spans[0].span.name, "web:8000/traced");
    assert_eq!(
        spans[0].attribute("istio.mesh_id").as_deref(),
        Some("cluster.local")
    );
    assert_eq!(spans[0].attribute("upstream_cluster").as_deref(), Some("web"));

    let zipkin = Http {
        name: "envoy.tracers.zipkin".into(),
        config_type: Some(http::ConfigType::TypedConfig(pack_any(ZipkinConfig::default()))),
    };
    manager.tracing = Some(tracing(zipkin));
    xds.set(&url::<Listener>(), "l2", vec![listener_with(8000, manager)]);
    assert_eventually!(!xds.nacks().is_empty(), "no NACK");
    let (_, still_on, message) = xds.nacks().remove(0);
    assert_eq!(still_on, "l1");
    assert!(
        message
            .contains("tracing.provider.typed_config: unsupported tracer envoy.config.trace.v3.ZipkinConfig"),
        "{message}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_tcp_connection_reports_its_bytes_every_15_seconds() {
    let echo = TcpServer::echo().await;
    let proxy = TestProxy::start(&format!(
        "access_log: {{ path: off }}\n\
         listeners: [{{ name: db, address: 127.0.0.1:0, cluster: db, protocol: tcp }}]\n\
         clusters: [{{ name: db, endpoints: [\"{}\"] }}]",
        echo.addr
    ))
    .await;
    let mut stream = tokio::net::TcpStream::connect(proxy.listener("db"))
        .await
        .unwrap();
    stream.write_all(b"0123456789abcdef").await.unwrap();
    let mut echoed = [0u8; 16];
    stream.read_exact(&mut echoed).await.unwrap();
    let received = || async {
        let metrics = proxy.metrics().await;
        weft_test_support::metric(&metrics, "istio_tcp_received_bytes_total", &[])
    };
    assert_eq!(received().await, 0.0, "nothing reported yet");
    let deadline = std::time::Instant::now() + Duration::from_secs(25);
    while received().await < 16.0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(received().await, 16.0, "reported while the connection is open");
    let metrics = proxy.metrics().await;
    assert_eq!(
        weft_test_support::metric(&metrics, "istio_tcp_connections_closed_total", &[]),
        0.0
    );
    // Closing adds only what was not reported yet.
    stream.write_all(b"xy").await.unwrap();
    stream.shutdown().await.unwrap();
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest).await.unwrap();
    assert_eventually!(received().await == 18.0, "the rest at close");
    let metrics = proxy.metrics().await;
    assert_eq!(
        weft_test_support::metric(&metrics, "istio_tcp_connections_opened_total", &[]),
        1.0
    );
    assert_eq!(
        weft_test_support::metric(&metrics, "istio_tcp_connections_closed_total", &[]),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_carry_istios_workload_and_service_labels() {
    let app = HttpServer::start("app").await;
    let proxy = TestProxy::start(&format!(
        "access_log: {{ path: off }}\n\
         node: {{ workload: productpage-v1, namespace: bookinfo, labels: {{ app: productpage, version: v1 }}, cluster: east }}\n\
         listeners: [{{ name: front, address: 127.0.0.1:0, cluster: \"outbound|9080||reviews.bookinfo.svc.cluster.local\" }}]\n\
         clusters: [{{ name: \"outbound|9080||reviews.bookinfo.svc.cluster.local\", endpoints: [\"{}\"] }}]",
        app.addr
    ))
    .await;
    let response = plain_client()
        .request(
            Request::post(format!("http://{}/", proxy.listener("front")))
                .body(full("twelve bytes"))
                .unwrap(),
        )
        .await
        .unwrap();
    let sent = drain_body(response.into_body()).await.unwrap();
    let metrics = proxy.metrics().await;
    let labels = [
        ("reporter", "source"),
        ("source_workload", "productpage-v1"),
        ("source_workload_namespace", "bookinfo"),
        ("source_app", "productpage"),
        ("source_version", "v1"),
        ("source_canonical_service", "productpage"),
        ("source_canonical_revision", "v1"),
        ("source_cluster", "east"),
        ("destination_service", "reviews.bookinfo.svc.cluster.local"),
        ("destination_service_name", "reviews"),
        ("destination_service_namespace", "bookinfo"),
        ("destination_canonical_service", "unknown"),
        ("grpc_response_status", ""),
        ("response_code", "200"),
    ];
    assert_eq!(
        weft_test_support::metric(&metrics, "istio_requests_total", &labels),
        1.0,
        "{metrics}"
    );
    let metric = |name: &str| weft_test_support::metric(&metrics, name, &[("source_app", "productpage")]);
    assert_eq!(metric("istio_request_bytes_sum"), 12.0, "{metrics}");
    assert_eq!(metric("istio_response_bytes_sum"), sent as f64, "{metrics}");
    assert_eq!(metric("istio_request_bytes_count"), 1.0, "{metrics}");
    assert_eq!(
        weft_test_support::metric(&metrics, "istio_build", &[("component", "proxy")]),
        1.0,
        "{metrics}"
    );
}
