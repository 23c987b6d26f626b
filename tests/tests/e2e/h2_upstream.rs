//! The proxy as an HTTP/2 client, against an upstream that breaks RFC 9113 on purpose: a malformed
//! response ends that request with a 5xx, never the proxy or its pool, and the next request to the same
//! endpoint is answered (on the same connection after a stream error, on a new one after a connection
//! error).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use http::{Request, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use weft_test_support::TestProxy;
use weft_test_support::h2_frames::{END_HEADERS, END_STREAM, HEADERS, frame, read_frame};

/// HPACK: `:status: 200` (static table index 8).
const STATUS_200: u8 = 0x88;

/// What the upstream does with the first request on its first connection.
#[derive(Debug, Clone, Copy)]
enum Fault {
    BadHpack,
    OversizedFrame,
    MissingStatus,
    ConnectionHeader,
    DataBeforeHeaders,
    HugeHeaderBlock,
    BadSettings,
    GoAwayUnprocessed,
    CloseAfterSettings,
}

impl Fault {
    /// The bytes answering a request on `stream`.
    fn answer(self, stream: u32) -> Vec<u8> {
        match self {
            Fault::BadHpack => frame(HEADERS, END_HEADERS | END_STREAM, stream, &[0x80]),
            Fault::OversizedFrame => frame(0x0, END_STREAM, stream, &vec![0; 20_000]),
            // `content-type: text/plain` as a literal, and no :status.
            Fault::MissingStatus => {
                let mut block = vec![0x00, 12];
                block.extend_from_slice(b"content-type");
                block.push(10);
                block.extend_from_slice(b"text/plain");
                frame(HEADERS, END_HEADERS | END_STREAM, stream, &block)
            }
            Fault::ConnectionHeader => {
                let mut block = vec![STATUS_200, 0x00, 10];
                block.extend_from_slice(b"connection");
                block.push(5);
                block.extend_from_slice(b"close");
                frame(HEADERS, END_HEADERS | END_STREAM, stream, &block)
            }
            Fault::DataBeforeHeaders => frame(0x0, END_STREAM, stream, b"body first"),
            Fault::HugeHeaderBlock => {
                let mut block = vec![STATUS_200];
                for i in 0..12 {
                    block.extend_from_slice(&[0x00, 4]);
                    block.extend_from_slice(format!("x-{i:02}").as_bytes());
                    // 10,000-byte values: HPACK lengths over 126 take a multi-byte integer.
                    block.extend_from_slice(&[0x7f, 0x91, 0x4e]);
                    block.extend_from_slice(&[b'v'; 10_000]);
                }
                let mut out = frame(HEADERS, 0, stream, &block[..16_000]);
                let mut at = 16_000;
                while at < block.len() {
                    let end = (at + 16_000).min(block.len());
                    let flags = if end == block.len() {
                        END_HEADERS | END_STREAM
                    } else {
                        0
                    };
                    out.extend(frame(0x9, flags, stream, &block[at..end]));
                    at = end;
                }
                out
            }
            Fault::BadSettings => frame(0x4, 0, 0, &[0, 4, 0x80, 0, 0, 0]),
            Fault::GoAwayUnprocessed => frame(0x7, 0, 0, &[0, 0, 0, 0, 0, 0, 0, 0]),
            Fault::CloseAfterSettings => Vec::new(),
        }
    }
}

/// The stream of the next HEADERS frame the client sends, skipping other frames.
async fn next_request(stream: &mut TcpStream) -> Option<u32> {
    loop {
        let f = read_frame(stream).await?;
        if f.kind == HEADERS {
            return Some(f.stream);
        }
    }
}

/// An h2c upstream that answers the first request it gets with `fault`, and every other correctly.
async fn upstream(fault: Fault) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let faulted = Arc::new(AtomicBool::new(false));
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let faulted = faulted.clone();
            tokio::spawn(async move {
                let mut preface = [0u8; 24];
                if stream.read_exact(&mut preface).await.is_err() {
                    return;
                }
                // Our SETTINGS, and an ACK of the client's.
                let _ = stream.write_all(&frame(0x4, 0, 0, &[])).await;
                let _ = stream.write_all(&frame(0x4, 0x1, 0, &[])).await;
                if matches!(fault, Fault::CloseAfterSettings) && !faulted.swap(true, Ordering::SeqCst) {
                    return;
                }
                while let Some(id) = next_request(&mut stream).await {
                    let answer = if faulted.swap(true, Ordering::SeqCst) {
                        frame(HEADERS, END_HEADERS | END_STREAM, id, &[STATUS_200])
                    } else {
                        fault.answer(id)
                    };
                    if stream.write_all(&answer).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

async fn h2_get(proxy: &TestProxy) -> StatusCode {
    let dst: SocketAddr = "127.0.97.30:8080".parse().unwrap();
    let io = proxy.orig_dst.connect(proxy.outbound(), dst).await.unwrap();
    let (client, connection) = h2::client::handshake(io).await.unwrap();
    tokio::spawn(connection);
    let request = Request::builder().uri("http://web/").body(()).unwrap();
    let (response, _) = client.ready().await.unwrap().send_request(request, true).unwrap();
    let response = tokio::time::timeout(Duration::from_secs(10), response)
        .await
        .expect("an answer within 10 s")
        .expect("a response, not a reset");
    response.status()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_upstream_response_is_a_5xx_and_the_next_request_is_answered() {
    let mut failures = Vec::new();
    for fault in [
        Fault::MissingStatus,
        Fault::BadHpack,
        Fault::OversizedFrame,
        Fault::ConnectionHeader,
        Fault::DataBeforeHeaders,
        Fault::HugeHeaderBlock,
        Fault::BadSettings,
        Fault::GoAwayUnprocessed,
        Fault::CloseAfterSettings,
    ] {
        let addr = upstream(fault).await;
        let proxy = TestProxy::start(&format!(
            "outbound: {{ services: [{{ address: 0.0.0.0:8080, cluster: web }}] }}
clusters: [{{ name: web, endpoints: [\"{addr}\"] }}]"
        ))
        .await;
        let first = h2_get(&proxy).await;
        if !matches!(first.as_u16(), 502 | 503) {
            failures.push(format!("{fault:?}: the faulty answer became {first}"));
        }
        let second = h2_get(&proxy).await;
        if second != StatusCode::OK {
            failures.push(format!("{fault:?}: the next request got {second}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
