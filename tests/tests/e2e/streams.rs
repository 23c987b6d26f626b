//! Everything that is not plain request/response HTTP: gRPC (unary and bidirectional streaming),
//! WebSocket upgrades, opaque TCP with half-close, server-speaks-first protocols, TLS carried opaque,
//! and many connections at once.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use http::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;
use weft_test_support::grpc::GrpcServer;
use weft_test_support::grpc::pb::EchoRequest;
use weft_test_support::grpc::pb::echo_client::EchoClient;
use weft_test_support::http::HttpServer;
use weft_test_support::tcp::TcpServer;
use weft_test_support::{TestProxy, metric};

async fn grpc_client(proxy: &TestProxy, dst: std::net::SocketAddr) -> EchoClient<tonic::transport::Channel> {
    let channel = tonic::transport::Endpoint::from_static("http://echo.default.svc:50051")
        .connect_with_connector(proxy.orig_dst.connector(proxy.outbound(), dst))
        .await
        .unwrap();
    EchoClient::new(channel)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_unary_and_errors_through_the_proxy() {
    weft_test_support::init_tracing();
    let server = GrpcServer::start("grpc-a").await;
    let proxy = TestProxy::start("").await;
    let mut client = grpc_client(&proxy, server.addr).await;

    let reply = client
        .unary(EchoRequest {
            message: "hello".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (reply.message.as_str(), reply.served_by.as_str()),
        ("hello", "grpc-a")
    );

    // A gRPC error travels in trailers (trailers-only response) and arrives intact.
    let status = client
        .unary(EchoRequest {
            message: "fail".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable);
    assert_eq!(status.message(), "asked to fail");

    let metrics = proxy.metrics().await;
    assert_eq!(
        metric(
            &metrics,
            "istio_requests_total",
            &[("request_protocol", "grpc"), ("response_code", "200")]
        ),
        2.0,
        "{metrics}"
    );
    // One message each way for the call that succeeded; the failed one was answered trailers-only.
    let messages = |name| metric(&metrics, name, &[("request_protocol", "grpc")]);
    assert_eq!(messages("istio_request_messages_total"), 2.0, "{metrics}");
    assert_eq!(messages("istio_response_messages_total"), 1.0, "{metrics}");
    // Istio's grpc_response_status: from the trailers of the call that succeeded, from the
    // trailers-only answer of the one that failed.
    for (status, count) in [("0", 1.0), ("14", 1.0)] {
        assert_eq!(
            metric(
                &metrics,
                "istio_requests_total",
                &[("request_protocol", "grpc"), ("grpc_response_status", status)]
            ),
            count,
            "{metrics}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_bidirectional_streaming_interleaves() {
    let server = GrpcServer::start("grpc-b").await;
    // Declared http2: no detection at all.
    let proxy = TestProxy::start(&format!(
        "outbound: {{ services: [{{ address: 127.0.96.50:50051, cluster: echo, protocol: grpc }}] }}\nclusters: [{{ name: echo, endpoints: [{}] }}]",
        server.addr
    ))
    .await;
    let mut client = grpc_client(&proxy, "127.0.96.50:50051".parse().unwrap()).await;

    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let outbound = tokio_stream::wrappers::ReceiverStream::new(rx);
    let mut replies = client.bidi(outbound).await.unwrap().into_inner();
    // Each reply arrives before the next message is sent: the stream is not buffered anywhere.
    for i in 0..20 {
        tx.send(EchoRequest {
            message: format!("m{i}"),
        })
        .await
        .unwrap();
        let reply = tokio::time::timeout(Duration::from_secs(5), replies.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(reply.message, format!("m{i}"));
        assert_eq!(reply.served_by, "grpc-b");
    }
    drop(tx);
    assert!(
        replies.next().await.is_none(),
        "the stream ends when the client ends"
    );
    // Istio's message counters: each message of the stream, each way.
    let messages = |name: &'static str| {
        let proxy = &proxy;
        async move { metric(&proxy.metrics().await, name, &[("request_protocol", "grpc")]) }
    };
    weft_test_support::assert_eventually!(
        messages("istio_response_messages_total").await == 20.0,
        "response messages"
    );
    assert_eq!(messages("istio_request_messages_total").await, 20.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_echo_through_an_upgrade() {
    let app = HttpServer::start("ws").await;
    let proxy = TestProxy::start("").await;
    let stream = proxy.orig_dst.connect(proxy.outbound(), app.addr).await.unwrap();
    let (mut ws, response) = tokio_tungstenite::client_async(format!("ws://{}/ws", app.addr), stream)
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
    for text in ["one", "two", "three"] {
        ws.send(Message::text(text)).await.unwrap();
        let echoed = ws.next().await.unwrap().unwrap();
        assert_eq!(echoed.into_text().unwrap().as_str(), text);
    }
    ws.send(Message::binary(vec![0u8, 1, 2, 255])).await.unwrap();
    assert_eq!(
        ws.next().await.unwrap().unwrap().into_data().as_ref(),
        &[0u8, 1, 2, 255]
    );
    ws.close(None).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opaque_tcp_half_close_and_byte_counts() {
    let server = TcpServer::echo().await;
    let proxy = TestProxy::start(&format!(
        "outbound: {{ services: [{{ address: 127.0.96.7:7000, cluster: echo, protocol: tcp }}] }}\nclusters: [{{ name: echo, endpoints: [{}] }}]",
        server.addr
    ))
    .await;
    let mut stream = proxy
        .orig_dst
        .connect(proxy.outbound(), "127.0.96.7:7000".parse().unwrap())
        .await
        .unwrap();
    let payload: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    stream.write_all(&payload).await.unwrap();
    // Half-close: we are done sending, but the echo of what we sent must still arrive in full.
    stream.shutdown().await.unwrap();
    let mut echoed = Vec::new();
    stream.read_to_end(&mut echoed).await.unwrap();
    assert_eq!(echoed.len(), payload.len());
    assert!(echoed == payload, "echo differs");

    let labels = [("destination_service", "echo")];
    weft_test_support::assert_eventually!(
        metric(
            &proxy.metrics().await,
            "istio_tcp_connections_closed_total",
            &labels
        ) == 1.0,
        "connection close not counted"
    );
    let metrics = proxy.metrics().await;
    assert_eq!(
        metric(&metrics, "istio_tcp_connections_opened_total", &labels),
        1.0
    );
    assert_eq!(
        metric(&metrics, "istio_tcp_received_bytes_total", &labels),
        200_000.0
    );
    assert_eq!(metric(&metrics, "istio_tcp_sent_bytes_total", &labels), 200_000.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_speaks_first_works_after_the_detect_timeout() {
    let server = TcpServer::greeter(b"220 smtp.example ready\r\n").await;
    let proxy = TestProxy::start("detect_timeout: 200ms").await;
    let mut stream = proxy
        .orig_dst
        .connect(proxy.outbound(), server.addr)
        .await
        .unwrap();
    // The client waits for the greeting, sending nothing; detection must give up and connect.
    let mut greeting = [0u8; 24];
    tokio::time::timeout(Duration::from_secs(10), stream.read_exact(&mut greeting))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&greeting, b"220 smtp.example ready\r\n");
    stream.write_all(b"EHLO me\r\n").await.unwrap();
    let mut reply = [0u8; 9];
    stream.read_exact(&mut reply).await.unwrap();
    assert_eq!(&reply, b"EHLO me\r\n");
    let metrics = proxy.metrics().await;
    assert_eq!(
        metric(&metrics, "weft_protocol_detections_total", &[("protocol", "tcp")]),
        1.0,
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declared_opaque_ports_never_wait_for_detection() {
    let server = TcpServer::greeter(b"mysql-greeting").await;
    // Detection would wait a minute; a port declared as MySQL must not wait at all.
    let proxy = TestProxy::start(&format!(
        "detect_timeout: 60s\noutbound: {{ services: [{{ address: 0.0.0.0:3306, cluster: db, protocol: mysql }}] }}\nclusters: [{{ name: db, endpoints: [{}] }}]",
        server.addr
    ))
    .await;
    let mut stream = proxy
        .orig_dst
        .connect(proxy.outbound(), "127.0.96.9:3306".parse().unwrap())
        .await
        .unwrap();
    let mut greeting = [0u8; 14];
    tokio::time::timeout(Duration::from_secs(30), stream.read_exact(&mut greeting))
        .await
        .expect("a declared opaque port must not wait for the 60 s detect timeout")
        .unwrap();
    assert_eq!(&greeting, b"mysql-greeting");
}

/// A real ClientHello, as a TLS client would send it.
fn client_hello() -> Vec<u8> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let name = rustls::pki_types::ServerName::try_from("api.example.com").unwrap();
    let mut conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out).unwrap();
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_from_the_app_is_carried_opaque() {
    let server = TcpServer::echo().await;
    let proxy = TestProxy::start("").await;
    let hello = client_hello();
    let mut stream = proxy
        .orig_dst
        .connect(proxy.outbound(), server.addr)
        .await
        .unwrap();
    stream.write_all(&hello).await.unwrap();
    let mut echoed = vec![0u8; hello.len()];
    stream.read_exact(&mut echoed).await.unwrap();
    assert_eq!(echoed, hello, "the ClientHello reaches the server byte for byte");
    let metrics = proxy.metrics().await;
    assert_eq!(
        metric(&metrics, "weft_protocol_detections_total", &[("protocol", "tls")]),
        1.0,
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_connections() {
    const CONNECTIONS: usize = 1000;
    weft_test_support::raise_fd_limit();
    let app = HttpServer::start("app").await;
    let proxy = Arc::new(TestProxy::start("").await);

    // Open every connection first, so all of them are open through the proxy at the same time.
    let mut streams = Vec::with_capacity(CONNECTIONS);
    for _ in 0..CONNECTIONS {
        streams.push(proxy.orig_dst.connect(proxy.outbound(), app.addr).await.unwrap());
    }
    let barrier = Arc::new(tokio::sync::Barrier::new(CONNECTIONS));
    let mut tasks = Vec::with_capacity(CONNECTIONS);
    for (i, mut stream) in streams.into_iter().enumerate() {
        let barrier = barrier.clone();
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            let request = format!("GET /c/{i} HTTP/1.1\r\nhost: app\r\nconnection: close\r\n\r\n");
            stream.write_all(request.as_bytes()).await.unwrap();
            let mut response = Vec::new();
            stream.read_to_end(&mut response).await.unwrap();
            response.starts_with(b"HTTP/1.1 200")
        }));
    }
    let mut ok = 0;
    for task in tasks {
        ok += usize::from(task.await.unwrap());
    }
    assert_eq!(ok, CONNECTIONS);
    assert_eq!(app.request_count(), CONNECTIONS);
}
