//! The proxy's HTTP/2 server against RFC 9113's requirements, frame by frame, in the spirit of h2spec:
//! each case writes raw frames on a connection to the proxy and checks the connection error (GOAWAY
//! with its code), the stream error (RST_STREAM with its code) or the answer the RFC requires. A
//! request with a malformed header block never reaches the app.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use weft_test_support::TestProxy;
use weft_test_support::h2_frames::{
    ACK, CONTINUATION, DATA, END_HEADERS, END_STREAM, GOAWAY, HEADERS, PING, PREFACE, PRIORITY, RST_STREAM,
    SETTINGS, WINDOW_UPDATE, frame, read_frame,
};
use weft_test_support::http::HttpServer;

const PROTOCOL_ERROR: u32 = 0x1;
const FLOW_CONTROL_ERROR: u32 = 0x3;
const STREAM_CLOSED: u32 = 0x5;
const FRAME_SIZE_ERROR: u32 = 0x6;
const COMPRESSION_ERROR: u32 = 0x9;

/// HPACK for `GET /` to `web` (indexed :method, :scheme, :path; literal :authority), then `extra`
/// header fields as literals without indexing.
fn request_block(extra: &[(&str, &str)]) -> Vec<u8> {
    let mut block = vec![0x82, 0x86, 0x84, 0x01, 0x03, b'w', b'e', b'b'];
    for (name, value) in extra {
        block.push(0x00);
        block.push(u8::try_from(name.len()).unwrap());
        block.extend_from_slice(name.as_bytes());
        block.push(u8::try_from(value.len()).unwrap());
        block.extend_from_slice(value.as_bytes());
    }
    block
}

struct Conn {
    stream: TcpStream,
}

/// What the proxy answered.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    GoAway(u32),
    Reset(u32, u32),
    /// Response headers on this stream.
    Response(u32),
    /// Closed without a GOAWAY.
    Closed,
}

impl Conn {
    /// A connection past the preface and the SETTINGS exchange.
    async fn open(proxy: &TestProxy) -> Self {
        let dst: SocketAddr = "127.0.97.20:8080".parse().unwrap();
        let mut stream = proxy.orig_dst.connect(proxy.outbound(), dst).await.unwrap();
        stream.write_all(PREFACE).await.unwrap();
        stream.write_all(&frame(SETTINGS, 0, 0, &[])).await.unwrap();
        let mut conn = Self { stream };
        // The server's SETTINGS, then our ACK of them.
        loop {
            let (kind, flags, _, _) = conn.read().await.expect("the server's SETTINGS");
            if kind == SETTINGS && flags & ACK == 0 {
                break;
            }
        }
        conn.send(&frame(SETTINGS, ACK, 0, &[])).await;
        conn
    }

    async fn send(&mut self, bytes: &[u8]) {
        // The proxy may already have closed the connection; what it answered is read next.
        let _ = self.stream.write_all(bytes).await;
    }

    async fn read(&mut self) -> Option<(u8, u8, u32, Vec<u8>)> {
        let f = tokio::time::timeout(Duration::from_secs(5), read_frame(&mut self.stream))
            .await
            .expect("the proxy answers within 5 s")?;
        Some((f.kind, f.flags, f.stream, f.payload))
    }

    /// Reads until the proxy answers the case: a GOAWAY, a RST_STREAM, or EOF; response headers
    /// count when no error follows them within half a second (a streamed request's error comes after
    /// the app has begun to answer).
    async fn outcome(&mut self) -> Outcome {
        let mut answered = None;
        loop {
            let next = match answered {
                None => self.read().await,
                Some(stream) => match tokio::time::timeout(Duration::from_millis(500), self.read()).await {
                    Ok(next) => next,
                    Err(_) => return Outcome::Response(stream),
                },
            };
            let Some((kind, flags, stream, payload)) = next else {
                return answered.map_or(Outcome::Closed, Outcome::Response);
            };
            match kind {
                GOAWAY => return Outcome::GoAway(u32::from_be_bytes(payload[4..8].try_into().unwrap())),
                RST_STREAM => {
                    return Outcome::Reset(stream, u32::from_be_bytes(payload[..4].try_into().unwrap()));
                }
                HEADERS if stream != 0 && answered.is_none() => answered = Some(stream),
                PING if flags & ACK == 0 => self.send(&frame(PING, ACK, 0, &payload)).await,
                _ => {}
            }
        }
    }
}

async fn proxy() -> (HttpServer, TestProxy) {
    let server = HttpServer::start("web").await;
    let proxy = TestProxy::start(&format!(
        "outbound: {{ services: [{{ address: 0.0.0.0:8080, cluster: web }}] }}
clusters: [{{ name: web, endpoints: [\"{}\"] }}]",
        server.addr
    ))
    .await;
    (server, proxy)
}

/// Where the RFC requires the connection error `rfc` and the h2 crate, which the proxy's HTTP/2 is,
/// closes the connection with PROTOCOL_ERROR instead: the connection still ends (nothing is accepted
/// that should not be), only the code differs. Kept exact, so that a change in h2 shows here.
fn h2_deviation(rfc: u32) -> Outcome {
    let _ = rfc;
    Outcome::GoAway(PROTOCOL_ERROR)
}

/// Runs one case on a fresh connection.
async fn case(proxy: &TestProxy, frames: &[Vec<u8>]) -> Outcome {
    let mut conn = Conn::open(proxy).await;
    for f in frames {
        conn.send(f).await;
    }
    conn.outcome().await
}

fn get(stream: u32, extra: &[(&str, &str)]) -> Vec<u8> {
    frame(HEADERS, END_HEADERS | END_STREAM, stream, &request_block(extra))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_level_requirements() {
    let (server, proxy) = proxy().await;
    let cases: Vec<(&str, Vec<Vec<u8>>, Outcome)> = vec![
        (
            "a well-formed request is answered",
            vec![get(1, &[])],
            Outcome::Response(1),
        ),
        (
            "§4.1 unknown frame types are ignored",
            vec![frame(0x42, 0, 0, b"xx"), get(1, &[])],
            Outcome::Response(1),
        ),
        (
            "§4.2 a frame larger than SETTINGS_MAX_FRAME_SIZE",
            vec![frame(DATA, 0, 1, &vec![0; 16_385])],
            Outcome::GoAway(FRAME_SIZE_ERROR),
        ),
        (
            "§5.1.1 a client stream with an even identifier",
            vec![get(2, &[])],
            Outcome::GoAway(PROTOCOL_ERROR),
        ),
        (
            "§5.1.1 a stream identifier lower than one already used",
            vec![get(5, &[]), get(3, &[])],
            Outcome::GoAway(PROTOCOL_ERROR),
        ),
        (
            "§6.1 DATA on stream 0",
            vec![frame(DATA, 0, 0, b"x")],
            Outcome::GoAway(PROTOCOL_ERROR),
        ),
        (
            "§6.2 HEADERS on stream 0",
            vec![frame(HEADERS, END_HEADERS, 0, &request_block(&[]))],
            Outcome::GoAway(PROTOCOL_ERROR),
        ),
        (
            "§6.4 RST_STREAM on stream 0",
            vec![frame(RST_STREAM, 0, 0, &[0, 0, 0, 8])],
            Outcome::GoAway(PROTOCOL_ERROR),
        ),
        (
            "§6.4 RST_STREAM on an idle stream",
            vec![frame(RST_STREAM, 0, 7, &[0, 0, 0, 8])],
            Outcome::GoAway(PROTOCOL_ERROR),
        ),
        (
            "§6.4 RST_STREAM of the wrong length",
            vec![get(1, &[]), frame(RST_STREAM, 0, 1, &[0, 0, 8])],
            h2_deviation(FRAME_SIZE_ERROR),
        ),
        (
            "§6.5 SETTINGS on a stream",
            vec![frame(SETTINGS, 0, 1, &[])],
            Outcome::GoAway(PROTOCOL_ERROR),
        ),
        (
            "§6.5 SETTINGS of a length not a multiple of 6",
            vec![frame(SETTINGS, 0, 0, &[0, 3, 0, 0, 0])],
            h2_deviation(FRAME_SIZE_ERROR),
        ),
        (
            "§6.5 a SETTINGS ACK with a payload",
            vec![frame(SETTINGS, ACK, 0, &[0, 3, 0, 0, 0, 1])],
            h2_deviation(FRAME_SIZE_ERROR),
        ),
        (
            "§6.5.2 SETTINGS_ENABLE_PUSH other than 0 or 1",
            vec![frame(SETTINGS, 0, 0, &[0, 2, 0, 0, 0, 2])],
            Outcome::GoAway(PROTOCOL_ERROR),
        ),
        (
            "§6.5.2 SETTINGS_INITIAL_WINDOW_SIZE above 2^31-1",
            vec![frame(SETTINGS, 0, 0, &[0, 4, 0x80, 0, 0, 0])],
            h2_deviation(FLOW_CONTROL_ERROR),
        ),
        (
            "§6.5.2 SETTINGS_MAX_FRAME_SIZE below 16,384",
            vec![frame(SETTINGS, 0, 0, &[0, 5, 0, 0, 0x3f, 0xff])],
            Outcome::GoAway(PROTOCOL_ERROR),
        ),
        (
            "§6.7 PING on a stream",
            vec![frame(PING, 0, 1, &[0; 8])],
            Outcome::GoAway(PROTOCOL_ERROR),
        ),
        (
            "§6.7 PING of the wrong length",
            vec![frame(PING, 0, 0, &[0; 7])],
            h2_deviation(FRAME_SIZE_ERROR),
        ),
        (
            "§6.9 a connection WINDOW_UPDATE of 0",
            vec![frame(WINDOW_UPDATE, 0, 0, &[0, 0, 0, 0])],
            Outcome::GoAway(PROTOCOL_ERROR),
        ),
        (
            "§6.9.1 a connection window above 2^31-1",
            vec![frame(WINDOW_UPDATE, 0, 0, &[0x7f, 0xff, 0xff, 0xff])],
            Outcome::GoAway(FLOW_CONTROL_ERROR),
        ),
        (
            "§6.9 WINDOW_UPDATE of the wrong length",
            vec![frame(WINDOW_UPDATE, 0, 0, &[0, 0, 1])],
            h2_deviation(FRAME_SIZE_ERROR),
        ),
        (
            "§6.10 CONTINUATION without HEADERS before it",
            vec![frame(CONTINUATION, END_HEADERS, 1, &request_block(&[]))],
            Outcome::GoAway(PROTOCOL_ERROR),
        ),
        (
            "§6.10 another frame between HEADERS and its CONTINUATION",
            vec![
                frame(HEADERS, END_STREAM, 1, &request_block(&[])),
                frame(PING, 0, 0, &[0; 8]),
            ],
            Outcome::GoAway(PROTOCOL_ERROR),
        ),
        (
            "§4.3 a header block that does not decode (HPACK index 0)",
            vec![frame(HEADERS, END_HEADERS | END_STREAM, 1, &[0x80])],
            h2_deviation(COMPRESSION_ERROR),
        ),
        (
            "§4.3 a header block naming an index past the dynamic table",
            vec![frame(HEADERS, END_HEADERS | END_STREAM, 1, &[0xff, 0x7f])],
            h2_deviation(COMPRESSION_ERROR),
        ),
    ];
    let mut failures = Vec::new();
    for (name, frames, expected) in cases {
        let got = case(&proxy, &frames).await;
        if got != expected {
            failures.push(format!("{name}: expected {expected:?}, got {got:?}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // Only the well-formed requests reached the app (the one on stream 5 may be cut by the GOAWAY for
    // stream 3).
    assert!(
        (2..=3).contains(&server.request_count()),
        "{}",
        server.request_count()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_are_stream_errors_and_never_reach_the_app() {
    let (server, proxy) = proxy().await;
    let data_on_closed = vec![get(1, &[]), frame(DATA, END_STREAM, 1, b"late")];
    let cases: Vec<(&str, Vec<Vec<u8>>, Outcome)> = vec![
        (
            "§8.2.1 an upper-case field name",
            vec![get(1, &[("X-Upper", "1")])],
            Outcome::Reset(1, PROTOCOL_ERROR),
        ),
        (
            "§8.2.2 a connection-specific field",
            vec![get(1, &[("connection", "keep-alive")])],
            Outcome::Reset(1, PROTOCOL_ERROR),
        ),
        (
            "§8.2.2 TE other than trailers",
            vec![get(1, &[("te", "gzip")])],
            Outcome::Reset(1, PROTOCOL_ERROR),
        ),
        (
            "§8.3 a pseudo-header after a regular field",
            vec![frame(
                HEADERS,
                END_HEADERS | END_STREAM,
                1,
                &[
                    &request_block(&[("x-a", "1")])[..],
                    &[0x00, 5, b':', b'p', b'a', b't', b'h', 1, b'/'],
                ]
                .concat(),
            )],
            Outcome::Reset(1, PROTOCOL_ERROR),
        ),
        (
            "§8.3.1 a request without :method",
            vec![frame(
                HEADERS,
                END_HEADERS | END_STREAM,
                1,
                &[0x86, 0x84, 0x01, 0x03, b'w', b'e', b'b'],
            )],
            Outcome::Reset(1, PROTOCOL_ERROR),
        ),
        (
            "§8.3.1 an undefined pseudo-header",
            vec![get(1, &[(":bogus", "1")])],
            Outcome::Reset(1, PROTOCOL_ERROR),
        ),
        (
            "§8.1.1 content-length that the DATA does not match",
            vec![
                frame(
                    HEADERS,
                    END_HEADERS,
                    1,
                    &[
                        &[0x83, 0x86, 0x84, 0x01, 0x03, b'w', b'e', b'b'][..],
                        &request_block(&[("content-length", "10")])[8..],
                    ]
                    .concat(),
                ),
                frame(DATA, END_STREAM, 1, b"four"),
            ],
            Outcome::Reset(1, PROTOCOL_ERROR),
        ),
        (
            "§5.1 DATA on a stream the client already closed",
            data_on_closed,
            Outcome::Reset(1, STREAM_CLOSED),
        ),
        (
            "§5.3.1 a stream that depends on itself",
            vec![frame(PRIORITY, 0, 3, &[0, 0, 0, 3, 16])],
            Outcome::Reset(3, PROTOCOL_ERROR),
        ),
    ];
    let mut failures = Vec::new();
    for (name, frames, expected) in cases {
        let got = case(&proxy, &frames).await;
        // A stream reset is what the RFC requires; a connection error is also allowed for these.
        let acceptable = got == expected
            || (matches!(expected, Outcome::Reset(..)) && got == Outcome::GoAway(PROTOCOL_ERROR));
        if !acceptable {
            failures.push(format!("{name}: expected {expected:?}, got {got:?}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // Requests whose header blocks are malformed never reach the app; the two whose bodies turn out
    // wrong were well formed when they arrived, and their upstream requests are aborted.
    assert!(
        server.request_count() <= 2,
        "{} malformed requests reached the app",
        server.request_count()
    );
}

const REFUSED_STREAM: u32 = 0x7;
const PADDED: u8 = 0x8;

/// An HPACK literal field without indexing, its name literal too.
fn field(name: &str, value: &str) -> Vec<u8> {
    let mut bytes = vec![0x00, u8::try_from(name.len()).unwrap()];
    bytes.extend_from_slice(name.as_bytes());
    bytes.push(u8::try_from(value.len()).unwrap());
    bytes.extend_from_slice(value.as_bytes());
    bytes
}

/// `:authority: web`, with its name indexed.
const AUTHORITY: [u8; 5] = [0x01, 0x03, b'w', b'e', b'b'];

/// A header block of these pieces.
fn block(pieces: &[&[u8]]) -> Vec<u8> {
    pieces.concat()
}

/// A POST to `/` with `content-length` and no END_STREAM.
fn post(stream: u32, length: usize) -> Vec<u8> {
    let length = length.to_string();
    frame(
        HEADERS,
        END_HEADERS,
        stream,
        &block(&[&[0x83, 0x86, 0x84], &AUTHORITY, &field("content-length", &length)]),
    )
}

/// An open stream: a GET whose end has not come.
fn open(stream: u32) -> Vec<u8> {
    frame(HEADERS, END_HEADERS, stream, &request_block(&[]))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_states_frames_and_header_blocks() {
    let (server, proxy) = proxy().await;
    let many_streams: Vec<Vec<u8>> = (0..101).map(|i| open(2 * i + 1)).collect();
    let split_block = request_block(&[("x-a", "1")]);
    let padded_data = [&[4u8][..], b"body", &[0; 4]].concat();
    let connection_errors: Vec<(&str, Vec<Vec<u8>>, Outcome)> = vec![
        (
            "§4.2 a HEADERS frame larger than SETTINGS_MAX_FRAME_SIZE",
            vec![frame(
                HEADERS,
                END_HEADERS | END_STREAM,
                1,
                &[
                    &request_block(&[])[..],
                    &field("x-big", &"v".repeat(200)).repeat(90),
                ]
                .concat(),
            )],
            Outcome::GoAway(FRAME_SIZE_ERROR),
        ),
        (
            "§5.1 DATA on an idle stream",
            vec![frame(DATA, END_STREAM, 1, b"x")],
            Outcome::GoAway(PROTOCOL_ERROR),
        ),
        (
            "§5.1 WINDOW_UPDATE on an idle stream",
            vec![frame(WINDOW_UPDATE, 0, 1, &[0, 0, 0, 1])],
            Outcome::GoAway(PROTOCOL_ERROR),
        ),
        (
            "§5.5 an unknown frame type inside a header block",
            vec![
                frame(HEADERS, END_STREAM, 1, &request_block(&[])),
                frame(0x42, 0, 1, b"xx"),
            ],
            Outcome::GoAway(PROTOCOL_ERROR),
        ),
        (
            "§6.1 DATA whose pad length exceeds its payload",
            vec![post(1, 4), frame(DATA, PADDED | END_STREAM, 1, &[9, b'a', b'b'])],
            Outcome::GoAway(PROTOCOL_ERROR),
        ),
        (
            "§6.2 HEADERS whose pad length exceeds its payload",
            vec![frame(
                HEADERS,
                END_HEADERS | END_STREAM | PADDED,
                1,
                &[&[200u8][..], &request_block(&[])].concat(),
            )],
            Outcome::GoAway(PROTOCOL_ERROR),
        ),
        (
            "§6.2 a CONTINUATION on another stream than its HEADERS",
            vec![
                frame(HEADERS, END_STREAM, 1, &split_block[..4]),
                frame(CONTINUATION, END_HEADERS, 3, &split_block[4..]),
            ],
            Outcome::GoAway(PROTOCOL_ERROR),
        ),
        (
            "§6.3 PRIORITY on stream 0",
            vec![frame(PRIORITY, 0, 0, &[0, 0, 0, 1, 16])],
            Outcome::GoAway(PROTOCOL_ERROR),
        ),
        (
            "§6.8 GOAWAY on a stream",
            vec![frame(GOAWAY, 0, 1, &[0, 0, 0, 0, 0, 0, 0, 0])],
            Outcome::GoAway(PROTOCOL_ERROR),
        ),
        (
            "§6.10 a CONTINUATION after END_HEADERS",
            vec![
                get(1, &[]),
                frame(CONTINUATION, END_HEADERS, 1, &field("x-a", "1")),
            ],
            Outcome::GoAway(PROTOCOL_ERROR),
        ),
        (
            // The RFC's stream error FRAME_SIZE_ERROR; h2 ends the connection.
            "§6.3 PRIORITY of the wrong length",
            vec![frame(PRIORITY, 0, 1, &[0, 0, 0, 3])],
            h2_deviation(FRAME_SIZE_ERROR),
        ),
        (
            "§6.10 a CONTINUATION on stream 0",
            vec![
                frame(HEADERS, END_STREAM, 1, &split_block[..4]),
                frame(CONTINUATION, END_HEADERS, 0, &split_block[4..]),
            ],
            Outcome::GoAway(PROTOCOL_ERROR),
        ),
    ];
    let stream_errors: Vec<(&str, Vec<Vec<u8>>, Outcome)> = vec![
        (
            "§5.1.2 a stream past SETTINGS_MAX_CONCURRENT_STREAMS (100)",
            many_streams,
            Outcome::Reset(201, REFUSED_STREAM),
        ),
        (
            "§6.9 a stream WINDOW_UPDATE of 0",
            vec![open(1), frame(WINDOW_UPDATE, 0, 1, &[0, 0, 0, 0])],
            Outcome::Reset(1, PROTOCOL_ERROR),
        ),
        (
            "§6.9.1 a stream window above 2^31-1",
            vec![open(1), frame(WINDOW_UPDATE, 0, 1, &[0x7f, 0xff, 0xff, 0xff])],
            Outcome::Reset(1, FLOW_CONTROL_ERROR),
        ),
        (
            "§8.1 a second HEADERS that does not end the stream",
            vec![open(1), frame(HEADERS, END_HEADERS, 1, &field("x-trailer", "1"))],
            Outcome::Reset(1, PROTOCOL_ERROR),
        ),
        (
            "§8.1.1 DATA frames whose sum is not the content-length",
            vec![
                post(1, 10),
                frame(DATA, 0, 1, b"1234"),
                frame(DATA, END_STREAM, 1, b"5678"),
            ],
            Outcome::Reset(1, PROTOCOL_ERROR),
        ),
        (
            "§8.2.1 a field value with a line feed",
            vec![get(1, &[("x-a", "a\nb")])],
            Outcome::Reset(1, PROTOCOL_ERROR),
        ),
        (
            "§8.2.2 a transfer-encoding field",
            vec![get(1, &[("transfer-encoding", "chunked")])],
            Outcome::Reset(1, PROTOCOL_ERROR),
        ),
        (
            "§8.3 a duplicated :path",
            vec![frame(
                HEADERS,
                END_HEADERS | END_STREAM,
                1,
                &[&request_block(&[])[..], &[0x84]].concat(),
            )],
            Outcome::Reset(1, PROTOCOL_ERROR),
        ),
        (
            "§8.3 a response pseudo-header in a request",
            vec![frame(
                HEADERS,
                END_HEADERS | END_STREAM,
                1,
                &[&request_block(&[])[..], &[0x88]].concat(),
            )],
            Outcome::Reset(1, PROTOCOL_ERROR),
        ),
        (
            "§8.3.1 an empty :path",
            vec![frame(
                HEADERS,
                END_HEADERS | END_STREAM,
                1,
                &block(&[&[0x82, 0x86, 0x04, 0x00], &AUTHORITY]),
            )],
            Outcome::Reset(1, PROTOCOL_ERROR),
        ),
        (
            "§8.3.1 a request without :scheme",
            vec![frame(
                HEADERS,
                END_HEADERS | END_STREAM,
                1,
                &block(&[&[0x82, 0x84], &AUTHORITY]),
            )],
            Outcome::Reset(1, PROTOCOL_ERROR),
        ),
        (
            "§8.3.1 a request without :path",
            vec![frame(
                HEADERS,
                END_HEADERS | END_STREAM,
                1,
                &block(&[&[0x82, 0x86], &AUTHORITY]),
            )],
            Outcome::Reset(1, PROTOCOL_ERROR),
        ),
    ];
    let answered: Vec<(&str, Vec<Vec<u8>>, Outcome)> = vec![
        (
            "§6.5.2 an unknown SETTINGS identifier is ignored",
            vec![frame(SETTINGS, 0, 0, &[0x7f, 0x7f, 0, 0, 0, 1]), get(1, &[])],
            Outcome::Response(1),
        ),
        (
            "§6.10 a header block split over HEADERS and CONTINUATION",
            vec![
                frame(HEADERS, END_STREAM, 1, &split_block[..4]),
                frame(CONTINUATION, END_HEADERS, 1, &split_block[4..]),
            ],
            Outcome::Response(1),
        ),
        (
            "§6.1 padded DATA",
            vec![post(1, 4), frame(DATA, PADDED | END_STREAM, 1, &padded_data)],
            Outcome::Response(1),
        ),
        (
            "§6.2 padded HEADERS",
            vec![frame(
                HEADERS,
                END_HEADERS | END_STREAM | PADDED,
                1,
                &[&[3u8][..], &request_block(&[]), &[0, 0, 0]].concat(),
            )],
            Outcome::Response(1),
        ),
        (
            // The RFC's stream error PROTOCOL_ERROR: h2 drops the pseudo-header from the trailers
            // and the stream goes on, so nothing of it reaches the app. Pinned, so a change shows.
            "§8.1 trailers with a pseudo-header (h2 deviation)",
            vec![open(1), frame(HEADERS, END_HEADERS | END_STREAM, 1, &[0x84])],
            Outcome::Response(1),
        ),
        (
            "§5.3.2 PRIORITY for an idle stream is accepted",
            vec![frame(PRIORITY, 0, 3, &[0, 0, 0, 0, 16]), get(1, &[])],
            Outcome::Response(1),
        ),
    ];
    let mut failures = Vec::new();
    for (name, frames, expected) in connection_errors.into_iter().chain(answered) {
        let got = case(&proxy, &frames).await;
        if got != expected {
            failures.push(format!("{name}: expected {expected:?}, got {got:?}"));
        }
    }
    for (name, frames, expected) in stream_errors {
        let got = case(&proxy, &frames).await;
        // A stream error is what the RFC requires; the same error for the connection is also allowed.
        let acceptable = got == expected
            || matches!((&got, &expected), (Outcome::GoAway(a), Outcome::Reset(_, b)) if a == b);
        if !acceptable {
            failures.push(format!("{name}: expected {expected:?}, got {got:?}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // At most the well-formed requests reached the app: the six answered cases, the 100 streams within
    // the limit, and the six well-formed requests that open a case before its error.
    assert!(
        server.request_count() <= 6 + 100 + 6,
        "{}",
        server.request_count()
    );
}
