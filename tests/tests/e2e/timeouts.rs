//! Client connection timeouts as clients meet them: a kept-alive HTTP/1 connection stays usable until
//! the connection idle timeout, a client that trickles its headers is cut by the request headers
//! timeout, and a listener's stream idle timeout (HTTP connection manager `stream_idle_timeout` over
//! xDS) ends a stalled request with 504 and a stalled gRPC stream with a gRPC status.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use envoy_types::pb::google::protobuf::Duration as XDuration;
use envoy_types::util::pack_any;
use http::{Request, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use weft_test_support::envoy::{eds_cluster, endpoints, hcm, listener_with, routes, url};
use weft_test_support::grpc::GrpcServer;
use weft_test_support::grpc::pb::EchoRequest;
use weft_test_support::grpc::pb::echo_client::EchoClient;
use weft_test_support::http::{HttpServer, client, drain_body, empty};
use weft_test_support::xds::TestXdsServer;
use weft_test_support::{TestProxy, admin_get, assert_eventually, metric};

/// Reads one HTTP/1 response with a `content-length` body; `None` when the connection closed first.
async fn read_response(stream: &mut TcpStream) -> Option<String> {
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&seen[..end]).to_ascii_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map_or(0, |v| v.trim().parse().unwrap());
            if seen.len() >= end + 4 + length {
                return Some(String::from_utf8_lossy(&seen).into_owned());
            }
        }
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf))
            .await
            .expect("no response within 10 s")
            .unwrap_or(0);
        if n == 0 {
            return None;
        }
        seen.extend_from_slice(&buf[..n]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_alive_connection_waits_for_the_idle_timeout_and_a_trickled_header_does_not() {
    let server = HttpServer::start("web").await;
    let proxy = TestProxy::start(&format!(
        "request_headers_timeout: 300ms
outbound: {{ services: [{{ address: 0.0.0.0:8080, cluster: web }}] }}
clusters: [{{ name: web, endpoints: [\"{}\"] }}]",
        server.addr
    ))
    .await;
    let dst: SocketAddr = "127.0.96.60:8080".parse().unwrap();
    let request = b"GET / HTTP/1.1\r\nhost: web\r\n\r\n";

    // Idle between requests for three times the request headers timeout: the connection is reused.
    let mut stream = proxy.orig_dst.connect(proxy.outbound(), dst).await.unwrap();
    for round in 0..3 {
        stream.write_all(request).await.unwrap();
        let response = read_response(&mut stream)
            .await
            .unwrap_or_else(|| panic!("round {round}: the proxy closed a kept-alive connection"));
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        tokio::time::sleep(Duration::from_millis(900)).await;
    }
    assert_eq!(
        server.connections(),
        1,
        "one upstream connection served all three"
    );

    // A header block that never completes is closed with nothing sent, while the kept-alive one
    // above stays usable.
    let mut slow = proxy.orig_dst.connect(proxy.outbound(), dst).await.unwrap();
    slow.write_all(b"GET / HTTP/1.1\r\nhost: web\r\n").await.unwrap();
    let mut seen = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(10), slow.read_to_end(&mut seen)).await;
    assert!(
        matches!(closed, Ok(Ok(0))),
        "a trickled header block kept its connection: {closed:?} {}",
        String::from_utf8_lossy(&seen)
    );
    stream.write_all(request).await.unwrap();
    let response = read_response(&mut stream)
        .await
        .expect("the idle connection was closed");
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listeners_stream_idle_timeout_from_xds_ends_stalled_requests_and_grpc_streams() {
    let web = HttpServer::start("web").await;
    let grpc = GrpcServer::start("grpc").await;
    let xds = TestXdsServer::start().await;
    let idle = |ms: u64| {
        let mut manager = hcm("");
        manager.stream_idle_timeout = Some(XDuration {
            seconds: 0,
            nanos: i32::try_from(ms * 1_000_000).unwrap(),
        });
        manager
    };
    let mut web_hcm = idle(300);
    web_hcm.route_specifier = hcm("8000").route_specifier;
    let mut grpc_hcm = idle(300);
    grpc_hcm.route_specifier = hcm("50051").route_specifier;
    xds.set(
        &url::<Cluster>(),
        "c1",
        vec![pack_any(eds_cluster("web")), pack_any(eds_cluster("grpc"))],
    );
    xds.set(
        &url::<ClusterLoadAssignment>(),
        "e1",
        vec![endpoints("web", web.addr), endpoints("grpc", grpc.addr)],
    );
    xds.set(
        &url::<Listener>(),
        "l1",
        vec![listener_with(8000, web_hcm), listener_with(50051, grpc_hcm)],
    );
    xds.set(
        &url::<RouteConfiguration>(),
        "r1",
        vec![routes("8000", "web"), routes("50051", "grpc")],
    );
    let proxy = TestProxy::start(&format!(
        "node: {{ workload: client, namespace: default }}\nxds: {{ address: \"{}\", initial_fetch_timeout: 10s }}",
        xds.url()
    ))
    .await;
    assert_eventually!(
        admin_get(proxy.admin(), "/ready").await.0 == 200
            && admin_get(proxy.admin(), "/mesh").await.1.contains("50051"),
        "the proxy never took the listeners"
    );

    // HTTP: a response that does not start within the listener's 300 ms is 504 with flag SI; one that
    // starts in time is served.
    let http = client(
        proxy
            .orig_dst
            .connector(proxy.outbound(), "127.0.96.61:8000".parse().unwrap()),
        false,
    );
    let late = http
        .request(Request::get("http://web:8000/delay/3000").body(empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(late.status(), StatusCode::GATEWAY_TIMEOUT);
    drain_body(late.into_body()).await.unwrap();
    let prompt = http
        .request(Request::get("http://web:8000/delay/50").body(empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(prompt.status(), StatusCode::OK);
    drain_body(prompt.into_body()).await.unwrap();
    assert_eq!(
        metric(
            &proxy.metrics().await,
            "istio_requests_total",
            &[("response_code", "504"), ("response_flags", "SI")]
        ),
        1.0
    );

    // gRPC: a bidirectional stream that goes quiet after one exchange ends with DEADLINE_EXCEEDED
    // in trailers (not a reset stream), and the connection keeps serving calls.
    let channel = tonic::transport::Endpoint::from_static("http://grpc.default.svc:50051")
        .connect_with_connector(
            proxy
                .orig_dst
                .connector(proxy.outbound(), "127.0.96.61:50051".parse().unwrap()),
        )
        .await
        .unwrap();
    let mut echo = EchoClient::new(channel);
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(EchoRequest {
        message: "one".into(),
    })
    .await
    .unwrap();
    let mut replies = echo
        .bidi(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(replies.message().await.unwrap().unwrap().message, "one");
    let ended = tokio::time::timeout(Duration::from_secs(10), replies.message())
        .await
        .expect("the quiet stream was never ended");
    let status = ended.expect_err("the quiet stream ended without a status");
    assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
    assert_eq!(status.message(), "stream idle timeout");
    drop(tx);
    let reply = echo
        .unary(EchoRequest {
            message: "after".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.message, "after");
}
