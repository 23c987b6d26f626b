//! HTTP through a whole proxy, in-process, against real servers on loopback. Each case runs over HTTP/1.1
//! and over HTTP/2 (prior knowledge).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use weft_test_support::http::{HttpServer, client, drain_body, empty, full, streamed};
use weft_test_support::{TestProxy, metric};

/// Runs a test body once per HTTP version.
macro_rules! both_versions {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn http1() {
                weft_test_support::init_tracing();
                super::$name(false).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn http2() {
                weft_test_support::init_tracing();
                super::$name(true).await
            }
        }
    )*};
}

both_versions!(
    outbound_service_round_robins_over_its_cluster,
    passthrough_goes_to_the_original_destination,
    inbound_forwards_to_the_app_on_the_same_port,
    explicit_listener_sends_everything_to_its_cluster,
    streaming_bodies_both_ways,
    hop_by_hop_headers_are_not_forwarded,
    upstream_connections_are_pooled,
    unreachable_endpoint_is_503_uf,
    empty_cluster_is_503_uh,
    trailers_pass_through,
);

const SERVICE: &str = "127.0.96.10:80";

fn dst(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn get(path: &str, host: &str) -> Request<weft_test_support::http::TestBody> {
    Request::get(format!("http://{host}{path}"))
        .body(empty())
        .unwrap()
}

async fn outbound_service_round_robins_over_its_cluster(h2: bool) {
    let a = HttpServer::start("a").await;
    let b = HttpServer::start("b").await;
    let proxy = TestProxy::start(&format!(
        "outbound: {{ services: [{{ address: {SERVICE}, cluster: web }}] }}\nclusters: [{{ name: web, endpoints: [{}, {}] }}]",
        a.addr, b.addr
    ))
    .await;
    let client = client(proxy.orig_dst.connector(proxy.outbound(), dst(SERVICE)), h2);
    let mut served_by = Vec::new();
    for i in 0..6 {
        let response = client
            .request(get(&format!("/r/{i}"), "web.default.svc"))
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        served_by.push(response.headers()["x-served-by"].to_str().unwrap().to_owned());
        drain_body(response.into_body()).await.unwrap();
    }
    assert_eq!(served_by.iter().filter(|s| *s == "a").count(), 3, "{served_by:?}");
    assert_eq!(served_by.iter().filter(|s| *s == "b").count(), 3, "{served_by:?}");

    let seen = a.last_request();
    assert_eq!(seen.uri.path(), "/r/4");
    let authority = if h2 {
        seen.uri.authority().map(|a| a.to_string())
    } else {
        seen.headers.get("host").map(|h| h.to_str().unwrap().to_owned())
    };
    assert_eq!(
        authority.as_deref(),
        Some("web.default.svc"),
        "the app's authority is kept"
    );
    assert_eq!(
        seen.version,
        if h2 {
            http::Version::HTTP_2
        } else {
            http::Version::HTTP_11
        }
    );

    let metrics = proxy.metrics().await;
    let labels = [
        ("reporter", "source"),
        ("destination_service", "web"),
        ("response_code", "200"),
        ("response_flags", "-"),
    ];
    assert_eq!(
        metric(&metrics, "istio_requests_total", &labels),
        6.0,
        "{metrics}"
    );
    assert_eq!(
        metric(&metrics, "istio_request_duration_milliseconds_count", &labels),
        6.0
    );
    let protocol = if h2 { "h2c" } else { "http/1.1" };
    assert_eq!(
        metric(
            &metrics,
            "weft_protocol_detections_total",
            &[("protocol", protocol)]
        ),
        if h2 {
            1.0
        } else {
            metric(&metrics, "weft_protocol_detections_total", &[])
        }
    );
}

async fn passthrough_goes_to_the_original_destination(h2: bool) {
    let external = HttpServer::start("external").await;
    let proxy = TestProxy::start("").await;
    let client = client(proxy.orig_dst.connector(proxy.outbound(), external.addr), h2);
    let response = client.request(get("/anything", "example.com")).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["x-served-by"], "external");
    drain_body(response.into_body()).await.unwrap(); // the request is counted when its response ends
    let metrics = proxy.metrics().await;
    let labels = [
        ("destination_service", external.addr.to_string()),
        ("response_code", "200".into()),
    ];
    let labels: Vec<_> = labels.iter().map(|(k, v)| (*k, v.as_str())).collect();
    assert_eq!(
        metric(&metrics, "istio_requests_total", &labels),
        1.0,
        "{metrics}"
    );
}

async fn inbound_forwards_to_the_app_on_the_same_port(h2: bool) {
    let app = HttpServer::start("app").await;
    let proxy = TestProxy::start("").await;
    // A peer dialled the pod's IP on the app's port; the proxy delivers it to the app on loopback.
    let pod_addr = SocketAddr::new("10.1.2.3".parse().unwrap(), app.addr.port());
    let client = client(proxy.orig_dst.connector(proxy.inbound(), pod_addr), h2);
    let response = client.request(get("/in", "app.default.svc")).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["x-served-by"], "app");
    drain_body(response.into_body()).await.unwrap();
    let metrics = proxy.metrics().await;
    // The service the caller addressed, as Istio's server side names it.
    let labels = [
        ("reporter", "destination"),
        ("destination_service", "app.default.svc.cluster.local"),
        ("destination_service_name", "app"),
        ("destination_service_namespace", "default"),
        ("connection_security_policy", "none"),
    ];
    assert_eq!(
        metric(&metrics, "istio_requests_total", &labels),
        1.0,
        "{metrics}"
    );
}

async fn explicit_listener_sends_everything_to_its_cluster(h2: bool) {
    let app = HttpServer::start("app").await;
    let proxy = TestProxy::start(&format!(
        "listeners: [{{ name: front, address: 127.0.0.1:0, cluster: app }}]\nclusters: [{{ name: app, endpoints: [{}] }}]",
        app.addr
    ))
    .await;
    let front = proxy.listener("front");
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(h2)
        .build_http::<weft_test_support::http::TestBody>();
    let response = client.request(get("/x", &front.to_string())).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["x-served-by"], "app");
}

async fn streaming_bodies_both_ways(h2: bool) {
    let app = HttpServer::start("app").await;
    let proxy = TestProxy::start("").await;
    let client = client(proxy.orig_dst.connector(proxy.outbound(), app.addr), h2);

    // A chunked (length-less) upload, counted by the server.
    const UP: u64 = 3 * 1024 * 1024 + 17;
    let request = Request::post(format!("http://{}/sink", app.addr))
        .body(streamed(UP))
        .unwrap();
    let response = client.request(request).await.unwrap();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, UP.to_string().as_bytes());
    if !h2 {
        let seen = app.last_request();
        assert_eq!(seen.headers.get("transfer-encoding").unwrap(), "chunked");
    }

    // A streamed download.
    const DOWN: u64 = 5 * 1024 * 1024 + 3;
    let response = client
        .request(get(&format!("/bytes/{DOWN}"), "app"))
        .await
        .unwrap();
    assert_eq!(drain_body(response.into_body()).await.unwrap(), DOWN);

    // An echo: what goes up comes back.
    let request = Request::post(format!("http://{}/echo", app.addr))
        .body(full("ping-pong"))
        .unwrap();
    let response = client.request(request).await.unwrap();
    assert_eq!(
        response.into_body().collect().await.unwrap().to_bytes(),
        Bytes::from_static(b"ping-pong")
    );
}

async fn hop_by_hop_headers_are_not_forwarded(h2: bool) {
    let app = HttpServer::start("app").await;
    let proxy = TestProxy::start("").await;
    let client = client(proxy.orig_dst.connector(proxy.outbound(), app.addr), h2);
    let mut request = get("/h", "app").map(|b| b);
    let headers = request.headers_mut();
    headers.insert("x-end-to-end", "kept".parse().unwrap());
    if h2 {
        headers.insert("te", "trailers".parse().unwrap());
    } else {
        headers.insert("connection", "x-private, keep-alive".parse().unwrap());
        headers.insert("x-private", "secret".parse().unwrap());
        headers.insert("keep-alive", "timeout=5".parse().unwrap());
        headers.insert("proxy-connection", "keep-alive".parse().unwrap());
    }
    let response = client.request(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let seen = app.last_request().headers;
    assert_eq!(seen["x-end-to-end"], "kept");
    for name in ["x-private", "keep-alive", "proxy-connection"] {
        assert!(seen.get(name).is_none(), "{name} was forwarded: {seen:?}");
    }
    if h2 {
        assert_eq!(seen["te"], "trailers", "gRPC needs te: trailers on HTTP/2");
    }
}

async fn upstream_connections_are_pooled(h2: bool) {
    let app = HttpServer::start("app").await;
    let proxy = TestProxy::start("").await;
    // Responses that end by their length (empty or not) and one whose end is its last chunk.
    for path in ["/p", "/bytes/100", "/trailers"] {
        // One new downstream connection each round (hyper's pooled client could open a second one
        // behind a response it has not yet put back, which the proxy would rightly forward); the
        // proxy's upstream connection stays.
        let io =
            hyper_util::rt::TokioIo::new(proxy.orig_dst.connect(proxy.outbound(), app.addr).await.unwrap());
        let mut sender = DownstreamSender::handshake(io, h2).await;
        for _ in 0..5 {
            let response = sender.send(get(path, "app")).await;
            assert_eq!(response.status(), StatusCode::OK, "{path}");
            drain_body(response.into_body()).await.unwrap();
        }
    }
    assert_eq!(app.request_count(), 15);
    assert_eq!(
        app.connections(),
        1,
        "15 sequential requests opened {} upstream connections",
        app.connections()
    );
}

/// One downstream connection, HTTP/1.1 or HTTP/2, and nothing that opens another.
enum DownstreamSender {
    Http1(hyper::client::conn::http1::SendRequest<weft_test_support::http::TestBody>),
    Http2(hyper::client::conn::http2::SendRequest<weft_test_support::http::TestBody>),
}

impl DownstreamSender {
    async fn handshake(io: hyper_util::rt::TokioIo<tokio::net::TcpStream>, h2: bool) -> Self {
        if h2 {
            let (sender, conn) =
                hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
                    .await
                    .unwrap();
            tokio::spawn(conn);
            Self::Http2(sender)
        } else {
            let (sender, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
            tokio::spawn(conn);
            Self::Http1(sender)
        }
    }

    async fn send(
        &mut self,
        mut request: Request<weft_test_support::http::TestBody>,
    ) -> http::Response<hyper::body::Incoming> {
        match self {
            Self::Http1(sender) => {
                sender.ready().await.unwrap();
                // Origin form on HTTP/1, with the authority in Host.
                let host = request.uri().authority().unwrap().to_string();
                *request.uri_mut() = request.uri().path().parse().unwrap();
                request
                    .headers_mut()
                    .insert(http::header::HOST, host.parse().unwrap());
                sender.send_request(request).await.unwrap()
            }
            Self::Http2(sender) => {
                sender.ready().await.unwrap();
                sender.send_request(request).await.unwrap()
            }
        }
    }
}

async fn unreachable_endpoint_is_503_uf(h2: bool) {
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap(); // bound, then freed
    let proxy = TestProxy::start(&format!(
        "outbound: {{ services: [{{ address: {SERVICE}, cluster: gone }}] }}\nclusters: [{{ name: gone, endpoints: [{closed}] }}]"
    ))
    .await;
    let client = client(proxy.orig_dst.connector(proxy.outbound(), dst(SERVICE)), h2);
    let response = client.request(get("/", "gone")).await.unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert!(
        String::from_utf8_lossy(&body).contains("reset reason: connection failure"),
        "{body:?}"
    );
    let metrics = proxy.metrics().await;
    assert_eq!(
        metric(
            &metrics,
            "istio_requests_total",
            &[("response_code", "503"), ("response_flags", "UF")]
        ),
        1.0,
        "{metrics}"
    );
    // The client's connection survives the failure.
    let response = client.request(get("/", "gone")).await.unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
}

async fn empty_cluster_is_503_uh(h2: bool) {
    let proxy = TestProxy::start(&format!(
        "outbound: {{ services: [{{ address: {SERVICE}, cluster: empty }}] }}\nclusters: [{{ name: empty }}]"
    ))
    .await;
    let client = client(proxy.orig_dst.connector(proxy.outbound(), dst(SERVICE)), h2);
    let response = client.request(get("/", "empty")).await.unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, Bytes::from_static(b"no healthy upstream"));
    let metrics = proxy.metrics().await;
    assert_eq!(
        metric(&metrics, "istio_requests_total", &[("response_flags", "UH")]),
        1.0,
        "{metrics}"
    );
}

async fn trailers_pass_through(h2: bool) {
    let app = HttpServer::start("app").await;
    let proxy = TestProxy::start("").await;
    let client = client(proxy.orig_dst.connector(proxy.outbound(), app.addr), h2);
    let response = client.request(get("/trailers", "app")).await.unwrap();
    let collected = response.into_body().collect().await.unwrap();
    let trailers = collected.trailers().cloned();
    assert_eq!(collected.to_bytes(), Bytes::from_static(b"data"));
    if h2 {
        assert_eq!(trailers.expect("trailers forwarded")["x-checksum"], "42");
    }
}

// ---- HTTP/1-only behaviours, on raw sockets so nothing in a client library hides them ----

async fn raw_exchange(proxy: &TestProxy, dst: SocketAddr, request: &[u8]) -> String {
    let mut stream = proxy.orig_dst.connect(proxy.outbound(), dst).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut out = Vec::new();
    match stream.read_to_end(&mut out).await {
        Ok(_) => {}
        // Closing a socket with unread input sends RST: for these tests, just another way to end.
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("read failed: {e}"),
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn http10_client_without_host_gets_an_answer() {
    let app = HttpServer::start("app").await;
    let proxy = TestProxy::start("").await;
    let response = raw_exchange(&proxy, app.addr, b"GET /old HTTP/1.0\r\n\r\n").await;
    assert!(response.starts_with("HTTP/1.0 200"), "{response}");
    assert_eq!(
        app.last_request().headers["host"],
        app.addr.to_string(),
        "Host is the address dialled"
    );
}

#[tokio::test]
async fn keep_alive_serves_many_requests_on_one_connection() {
    let app = HttpServer::start("app").await;
    let proxy = TestProxy::start("").await;
    let two =
        b"GET /1 HTTP/1.1\r\nhost: app\r\n\r\nGET /2 HTTP/1.1\r\nhost: app\r\nconnection: close\r\n\r\n";
    let response = raw_exchange(&proxy, app.addr, two).await;
    assert_eq!(response.matches("HTTP/1.1 200 OK").count(), 2, "{response}");
    let paths: Vec<_> = app.requests().iter().map(|r| r.uri.path().to_owned()).collect();
    assert_eq!(paths, ["/1", "/2"]);
}

#[tokio::test]
async fn expect_100_continue_is_answered_before_the_body() {
    let app = HttpServer::start("app").await;
    let proxy = TestProxy::start("").await;
    let mut stream = proxy.orig_dst.connect(proxy.outbound(), app.addr).await.unwrap();
    stream
        .write_all(b"POST /sink HTTP/1.1\r\nhost: app\r\ncontent-length: 5\r\nexpect: 100-continue\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 25];
    stream.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"HTTP/1.1 100 Continue\r\n\r\n");
    stream.write_all(b"hello").await.unwrap();
    let mut rest = vec![0u8; 1024];
    let n = stream.read(&mut rest).await.unwrap();
    let rest = String::from_utf8_lossy(&rest[..n]);
    assert!(rest.starts_with("HTTP/1.1 200"), "{rest}");
    assert!(rest.ends_with("\r\n\r\n5"), "{rest}");
    assert!(app.last_request().headers.get("expect").is_none());
}

#[tokio::test]
async fn malformed_request_gets_400_and_the_proxy_keeps_serving() {
    let app = HttpServer::start("app").await;
    let proxy = TestProxy::start("").await;
    let response = raw_exchange(&proxy, app.addr, b"GET / HTTP/1.1\r\nbad header line\r\n\r\n").await;
    assert!(response.starts_with("HTTP/1.1 400"), "{response}");
    let response = raw_exchange(
        &proxy,
        app.addr,
        b"GET /fine HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
}

#[tokio::test]
async fn large_header_blocks_are_accepted_up_to_the_60_kib_limit() {
    let app = HttpServer::start("app").await;
    let proxy = TestProxy::start("").await;
    let mut request = b"GET /big HTTP/1.1\r\nhost: app\r\nconnection: close\r\n".to_vec();
    // 56 KiB of headers (58 KiB as HTTP/2 counts them); the hostile-client suite sends more.
    for i in 0..56 {
        request.extend_from_slice(format!("x-big-{i}: {}\r\n", "v".repeat(1000)).as_bytes());
    }
    request.extend_from_slice(b"\r\n");
    let response = raw_exchange(&proxy, app.addr, &request).await;
    assert!(
        response.starts_with("HTTP/1.1 200"),
        "{}",
        &response[..response.len().min(200)]
    );
    let headers = app.last_request().headers;
    let big = headers
        .keys()
        .filter(|k| k.as_str().starts_with("x-big-"))
        .count();
    assert_eq!(big, 56, "every large header reached the app");
}

#[tokio::test]
async fn registry_only_refuses_unknown_destinations() {
    let app = HttpServer::start("app").await;
    let proxy = TestProxy::start("outbound: { egress: registry_only }").await;
    let response = raw_exchange(&proxy, app.addr, b"GET / HTTP/1.1\r\nhost: a\r\n\r\n").await;
    assert_eq!(response, "", "the connection is closed without an answer");
    assert_eq!(app.request_count(), 0);
    let metrics = proxy.metrics().await;
    assert_eq!(
        metric(
            &metrics,
            "istio_tcp_connections_closed_total",
            &[("response_flags", "NR")]
        ),
        1.0,
        "{metrics}"
    );
}
