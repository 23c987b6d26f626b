//! Bytes from a client, through the proxy's HTTP server and request path (parsing, limits, header
//! sanitising, authority handling) to a real upstream on loopback, which checks what reached it.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use http::{HeaderMap, Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::runtime::Runtime;
use tokio_util::sync::CancellationToken;
use weft_http::{Forwarder, HttpContext, HttpVersion, Pools, ServeSettings, Upstream};
use weft_telemetry::{ConnectionSecurity, Label, Metrics, Peers, Reporter, WorkloadLabels};
use weft_transport::{DialSettings, Direct};

/// How long one input may take end to end; longer is a hang, and fails.
const DEADLINE: Duration = Duration::from_secs(10);

struct Harness {
    runtime: Runtime,
    forwarder: Forwarder,
    ctx: Arc<HttpContext>,
    overload: weft_transport::Overload,
    /// What the upstream found wrong with requests that reached it.
    violations: Arc<Mutex<Vec<String>>>,
}

fn harness() -> &'static Harness {
    static HARNESS: OnceLock<Harness> = OnceLock::new();
    HARNESS.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("a runtime");
        let violations = Arc::new(Mutex::new(Vec::new()));
        let upstream = runtime.block_on(upstream(violations.clone()));
        let metrics = Metrics::new();
        let (_tls, certificate) = tokio::sync::watch::channel(None);
        let forwarder = {
            let _entered = runtime.enter();
            Forwarder::new(Pools::new(certificate), metrics, &Default::default())
        };
        let ctx = Arc::new(HttpContext {
            upstream: Upstream::Direct(Direct {
                addr: upstream,
                settings: DialSettings {
                    connect_timeout: Duration::from_secs(2),
                    idle_timeout: Duration::from_secs(4),
                    tls: None,
                    source: None,
                },
            }),
            orig_dst: upstream,
            version: HttpVersion::Http1,
            peers: Peers::new(
                Reporter::source,
                &WorkloadLabels::unknown(),
                &WorkloadLabels::unknown(),
                Label::unknown(),
                ConnectionSecurity::unknown,
            ),
            client_cert: None,
            authorization: None,
            stream_idle_timeout: Some(Duration::from_secs(5)),
            request_timeout: Some(Duration::from_secs(5)),
            client: 0,
            source: None,
            peer_identity: None,
            server_name: None,
            access_log: None,
            tracing: None,
        });
        Harness {
            runtime,
            forwarder,
            ctx,
            overload: weft_transport::Overload::new(weft_transport::OverloadLimits {
                max_active_downstream_connections: 1,
                max_memory_bytes: None,
            }),
            violations,
        }
    })
}

/// An app that answers every request and records what should never have reached it.
async fn upstream(violations: Arc<Mutex<Vec<String>>>) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local address");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let violations = violations.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let found = check_forwarded(req.headers());
                    if !found.is_empty() {
                        violations.lock().unwrap_or_else(|p| p.into_inner()).extend(found);
                    }
                    async move {
                        let _ = req.into_body().collect().await;
                        Ok::<_, Infallible>(Response::new(Full::new(bytes::Bytes::from_static(b"ok"))))
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

/// What the proxy must have removed or settled before a request reaches the app.
fn check_forwarded(headers: &HeaderMap) -> Vec<String> {
    let mut found = Vec::new();
    // The connection carries no verified client certificate: a client's own claim must be gone.
    if headers.contains_key("x-forwarded-client-cert") {
        found.push("a client's x-forwarded-client-cert reached the app".to_owned());
    }
    for hop_by_hop in ["proxy-connection", "keep-alive"] {
        if headers.contains_key(hop_by_hop) {
            found.push(format!("hop-by-hop header {hop_by_hop} reached the app"));
        }
    }
    // `Upgrade` is passed on only as an upgrade the proxy tunnels (`Connection: upgrade` with it).
    let upgrading = headers
        .get_all(http::header::CONNECTION)
        .iter()
        .any(|v| v.as_bytes().eq_ignore_ascii_case(b"upgrade"));
    if headers.contains_key(http::header::UPGRADE) && !upgrading {
        found.push("Upgrade reached the app without Connection: upgrade".to_owned());
    }
    if headers.get_all(http::header::HOST).iter().count() > 1 {
        found.push("more than one Host reached the app".to_owned());
    }
    if let Some(te) = headers.get(http::header::TE)
        && te.as_bytes() != b"trailers"
    {
        found.push(format!("TE {te:?} reached the app"));
    }
    found
}

fn exchange(data: &[u8], version: HttpVersion) -> Vec<u8> {
    let harness = harness();
    harness.runtime.block_on(async {
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let forwarder = harness.forwarder.clone();
        let ctx = harness.ctx.clone();
        let settings = ServeSettings {
            idle: Some(Duration::from_secs(5)),
            request_headers: Some(Duration::from_secs(5)),
            limits: weft_model::HttpLimits::default(),
            overload: harness.overload.clone(),
            parked: Default::default(),
            source: None,
        };
        let served = tokio::spawn(weft_http::serve(
            server,
            version,
            CancellationToken::new(),
            settings,
            move |req| {
                let forwarder = forwarder.clone();
                let ctx = ctx.clone();
                async move { forwarder.forward(req, &ctx).await }
            },
        ));
        let mut response = Vec::new();
        let talk = async {
            client.write_all(data).await?;
            client.shutdown().await?;
            client.read_to_end(&mut response).await
        };
        match tokio::time::timeout(DEADLINE, talk).await {
            Ok(_) => {}
            Err(_) => panic!("the proxy neither answered nor closed within {DEADLINE:?}"),
        }
        if tokio::time::timeout(DEADLINE, served).await.is_err() {
            panic!("the connection was still being served {DEADLINE:?} after the client left");
        }
        response
    })
}

fn take_violations() -> Vec<String> {
    std::mem::take(&mut *harness().violations.lock().unwrap_or_else(|p| p.into_inner()))
}

/// HTTP/1 bytes: whatever comes back is a sequence of well-formed responses, and nothing the proxy
/// must remove reached the app.
pub(crate) fn http1_request(data: &[u8]) {
    let response = exchange(data, HttpVersion::Http1);
    let violations = take_violations();
    assert!(violations.is_empty(), "{violations:?}");
    if !response.is_empty() {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut parsed = httparse::Response::new(&mut headers);
        match parsed.parse(&response) {
            // HTTP/1.1, or HTTP/1.0 to an HTTP/1.0 client.
            Ok(_) => assert!(
                matches!(parsed.version, Some(0 | 1)),
                "the proxy answered in {:?}",
                parsed.version
            ),
            Err(err) => panic!(
                "the proxy's answer does not parse ({err}): {:?}",
                String::from_utf8_lossy(&response)
            ),
        }
    }
}

/// HTTP/2 frames after the client preface: no panic, no hang, and nothing the proxy must remove reached
/// the app.
pub(crate) fn h2_frames(data: &[u8]) {
    let mut input = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    input.extend_from_slice(data);
    exchange(&input, HttpVersion::Http2);
    let violations = take_violations();
    assert!(violations.is_empty(), "{violations:?}");
}

pub(crate) fn http1_seeds() -> Vec<Vec<u8>> {
    [
        &b"GET / HTTP/1.1\r\nHost: web\r\n\r\n"[..],
        b"POST /orders HTTP/1.1\r\nHost: web\r\nContent-Length: 5\r\n\r\nhello",
        b"POST /x HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        b"GET /a/../b?x=1 HTTP/1.1\r\nHost: web\r\nConnection: keep-alive, x-drop\r\nx-drop: 1\r\nKeep-Alive: 5\r\n\r\nGET / HTTP/1.1\r\nHost: web\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: web\r\nx-forwarded-client-cert: By=spiffe://x;URI=spiffe://y\r\nTE: trailers, gzip\r\n\r\n",
        b"GET http://other:8080/p HTTP/1.1\r\nHost: web\r\nProxy-Connection: keep-alive\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: web\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        b"OPTIONS * HTTP/1.1\r\nHost: web\r\n\r\n",
        b"GET / HTTP/1.0\r\n\r\n",
        b"CONNECT web:443 HTTP/1.1\r\nHost: web:443\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: web\r\nHost: other\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: web\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    ]
    .iter()
    .map(|s| s.to_vec())
    .collect()
}

/// HTTP/2 frames: SETTINGS, a HEADERS frame (HPACK, literal names, no huffman) for `GET /` with its
/// END_STREAM, a PING, a WINDOW_UPDATE, RST_STREAM and GOAWAY.
pub(crate) fn h2_seeds() -> Vec<Vec<u8>> {
    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = u32::try_from(payload.len()).unwrap_or(0);
        let mut out = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        out.extend_from_slice(&stream.to_be_bytes());
        out.extend_from_slice(payload);
        out
    }
    // :method GET (static 2), :scheme http (6), :path / (4), :authority web (literal, indexed name 1).
    let headers = [0x82, 0x86, 0x84, 0x41, 0x03, b'w', b'e', b'b'];
    // The same, with a literal `x-forwarded-client-cert` header a client must not be able to pass on.
    let mut forged = headers.to_vec();
    forged.extend_from_slice(&[0x00, 23]);
    forged.extend_from_slice(b"x-forwarded-client-cert");
    forged.extend_from_slice(&[5]);
    forged.extend_from_slice(b"URI=x");
    let settings = frame(0x4, 0, 0, &[]);
    let get = frame(0x1, 0x5, 1, &headers);
    vec![
        [settings.clone(), get.clone()].concat(),
        [settings.clone(), frame(0x1, 0x5, 1, &forged)].concat(),
        [
            settings.clone(),
            frame(0x1, 0x4, 1, &headers),
            frame(0x0, 0x1, 1, b"body"),
        ]
        .concat(),
        [
            settings.clone(),
            frame(0x6, 0, 0, &[0; 8]),
            frame(0x8, 0, 0, &[0, 0, 0x10, 0]),
        ]
        .concat(),
        [settings.clone(), get.clone(), frame(0x3, 0, 1, &[0, 0, 0, 8])].concat(),
        [settings, get, frame(0x7, 0, 0, &[0, 0, 0, 0, 0, 0, 0, 0])].concat(),
    ]
}
