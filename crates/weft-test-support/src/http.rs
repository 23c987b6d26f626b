//! An HTTP/1.1 + HTTP/2 (h2c) test server. It records every request it sees, so tests can assert on
//! what crossed the proxy, and its paths give the behaviours tests need:
//!
//! | path | answer |
//! |---|---|
//! | `/sink` | reads the whole body, answers its length |
//! | `/bytes/N` | streams N bytes, generated as they are sent |
//! | `/delay/MS` | answers `ok` after MS milliseconds |
//! | `/status/CODE` | answers with that status |
//! | `/trailers` | a body followed by trailers `x-checksum: 42` |
//! | `/ws` | a WebSocket echo (HTTP/1.1 upgrade) |
//! | anything else | streams the request body back |
//!
//! Every response carries `x-served-by: <name>` and `x-seen-version: <HTTP version>`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri, Version};
use http_body::Frame;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::Role;

pub type TestBody = BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

/// A client whose connections reach `proxy` as if going to `dst`; HTTP/2 prior knowledge when `h2`.
pub fn client(connector: crate::OrigDstConnector, h2: bool) -> Client<crate::OrigDstConnector, TestBody> {
    Client::builder(TokioExecutor::new())
        .http2_only(h2)
        .build(connector)
}

pub fn empty() -> TestBody {
    Full::new(Bytes::new()).map_err(|never| match never {}).boxed()
}

pub fn full(data: impl Into<Bytes>) -> TestBody {
    Full::new(data.into()).map_err(|never| match never {}).boxed()
}

/// A request body of `n` bytes generated as it is sent, in chunks: no length known up front, so
/// HTTP/1.1 sends it chunked.
pub fn streamed(n: u64) -> TestBody {
    let chunks = futures_util::stream::unfold(n, |left| async move {
        if left == 0 {
            return None;
        }
        let len = left.min(64 * 1024);
        Some((
            Ok::<_, Infallible>(Frame::data(Bytes::from(vec![b'y'; len as usize]))),
            left - len,
        ))
    });
    StreamBody::new(chunks).map_err(|never| match never {}).boxed()
}

/// Reads a response body to the end, returning its length (without keeping it).
pub async fn drain_body(body: Incoming) -> Result<u64, hyper::Error> {
    let mut body = body;
    let mut n = 0;
    while let Some(frame) = body.frame().await {
        n += frame?.data_ref().map_or(0, |d| d.len() as u64);
    }
    Ok(n)
}

/// What the server saw of one request.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: Method,
    pub uri: Uri,
    pub version: Version,
    pub headers: HeaderMap,
    /// The connection's peer: who the app saw calling.
    pub peer: SocketAddr,
}

#[derive(Debug, Clone)]
pub struct HttpServer {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<Recorded>>>,
    connections: Arc<AtomicUsize>,
    fault: Arc<Mutex<Fault>>,
    /// Cancelled: the server is gone, as a killed process is (listener and connections closed).
    killed: tokio_util::sync::CancellationToken,
}

/// A fault the server injects into every request until told otherwise (requests are still recorded).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Fault {
    #[default]
    None,
    /// Answer every request with this status.
    Status(u16),
    /// Answer normally, this much later.
    Delay(Duration),
    /// Never answer (until the client gives up).
    Hang,
}

impl HttpServer {
    pub async fn start(name: &'static str) -> Self {
        Self::start_on("127.0.0.1:0".parse().expect("literal"), name).await
    }

    pub async fn start_on(addr: SocketAddr, name: &'static str) -> Self {
        Self::serve(TcpListener::bind(addr).await.expect("bind http server"), name)
    }

    /// Serves on a listener made elsewhere (in another network namespace, say).
    pub fn serve(listener: TcpListener, name: &'static str) -> Self {
        let addr = listener.local_addr().expect("local addr");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(AtomicUsize::new(0));
        let log = seen.clone();
        let counted = connections.clone();
        let fault = Arc::new(Mutex::new(Fault::None));
        let injected = fault.clone();
        let killed = tokio_util::sync::CancellationToken::new();
        let kill = killed.clone();
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    accepted = listener.accept() => accepted,
                    () = kill.cancelled() => return,
                };
                let Ok((stream, peer)) = accepted else { return };
                let kill = kill.clone();
                counted.fetch_add(1, Ordering::SeqCst);
                let log = log.clone();
                let injected = injected.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let log = log.clone();
                        let fault = *injected.lock().expect("fault");
                        async move { Ok::<_, Infallible>(handle(name, &log, peer, fault, req).await) }
                    });
                    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    // An app that buffers little, so tests that measure the proxy's memory measure
                    // the proxy's.
                    builder.http1().max_buf_size(64 * 1024);
                    let served = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
                    tokio::select! {
                        _ = served => {}
                        () = kill.cancelled() => {}
                    }
                });
            }
        });
        Self {
            addr,
            seen,
            connections,
            fault,
            killed,
        }
    }

    /// Stops the server the way a killed process stops: the listener and every connection close at
    /// once, requests in flight unanswered.
    pub fn kill(&self) {
        self.killed.cancel();
    }

    /// Injects `fault` into the requests that arrive from now on.
    pub fn set_fault(&self, fault: Fault) {
        *self.fault.lock().expect("fault") = fault;
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    /// Every request seen so far, oldest first.
    pub fn requests(&self) -> Vec<Recorded> {
        self.seen.lock().expect("request log").clone()
    }

    pub fn request_count(&self) -> usize {
        self.seen.lock().expect("request log").len()
    }

    pub fn last_request(&self) -> Recorded {
        self.requests().pop().expect("the server saw no request")
    }
}

async fn handle(
    name: &'static str,
    log: &Mutex<Vec<Recorded>>,
    peer: SocketAddr,
    fault: Fault,
    mut req: Request<Incoming>,
) -> Response<TestBody> {
    log.lock().expect("request log").push(Recorded {
        method: req.method().clone(),
        uri: req.uri().clone(),
        version: req.version(),
        headers: req.headers().clone(),
        peer,
    });
    match fault {
        Fault::None => {}
        Fault::Status(code) => {
            let mut response =
                status(StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR));
            response
                .headers_mut()
                .insert("x-served-by", HeaderValue::from_static(name));
            return response;
        }
        Fault::Delay(delay) => tokio::time::sleep(delay).await,
        Fault::Hang => std::future::pending::<()>().await,
    }
    let version = format!("{:?}", req.version());
    let path = req.uri().path().to_owned();
    let mut segments = path.trim_start_matches('/').splitn(2, '/');
    let mut response = match (segments.next().unwrap_or_default(), segments.next()) {
        ("sink", _) => {
            let mut n = 0usize;
            let mut body = req.into_body();
            while let Some(frame) = body.frame().await {
                match frame {
                    Ok(frame) => n += frame.data_ref().map_or(0, |d| d.len()),
                    Err(_) => return status(StatusCode::BAD_REQUEST),
                }
            }
            text(n.to_string())
        }
        ("bytes", Some(n)) => generated(n.parse().unwrap_or(0)),
        ("delay", Some(ms)) => {
            tokio::time::sleep(Duration::from_millis(ms.parse().unwrap_or(0))).await;
            text("ok".into())
        }
        ("status", Some(code)) => status(
            code.parse()
                .ok()
                .and_then(|c| StatusCode::from_u16(c).ok())
                .unwrap_or(StatusCode::BAD_REQUEST),
        ),
        ("trailers", _) => with_trailers(),
        ("ws", _) => websocket(&mut req),
        _ => Response::new(req.into_body().map_err(Into::into).boxed()),
    };
    response
        .headers_mut()
        .insert("x-served-by", HeaderValue::from_static(name));
    response.headers_mut().insert(
        "x-seen-version",
        HeaderValue::from_str(&version).expect("version"),
    );
    response
}

fn text(s: String) -> Response<TestBody> {
    Response::new(Full::new(Bytes::from(s)).map_err(|never| match never {}).boxed())
}

fn status(code: StatusCode) -> Response<TestBody> {
    let mut response = text(code.to_string());
    *response.status_mut() = code;
    response
}

/// `n` bytes produced chunk by chunk as the client reads, never all in memory.
fn generated(n: u64) -> Response<TestBody> {
    const CHUNK: u64 = 16 * 1024;
    let chunks = futures_util::stream::unfold(n, |left| async move {
        if left == 0 {
            return None;
        }
        let len = left.min(CHUNK);
        let chunk = Bytes::from(vec![b'x'; len as usize]);
        Some((Ok::<_, Infallible>(Frame::data(chunk)), left - len))
    });
    let mut response = Response::new(StreamBody::new(chunks).map_err(|never| match never {}).boxed());
    response
        .headers_mut()
        .insert(http::header::CONTENT_LENGTH, HeaderValue::from(n));
    response
}

fn with_trailers() -> Response<TestBody> {
    let mut trailers = HeaderMap::new();
    trailers.insert("x-checksum", HeaderValue::from_static("42"));
    let frames = futures_util::stream::iter([
        Ok::<_, Infallible>(Frame::data(Bytes::from_static(b"data"))),
        Ok(Frame::trailers(trailers)),
    ]);
    Response::new(StreamBody::new(frames).map_err(|never| match never {}).boxed())
}

fn websocket(req: &mut Request<Incoming>) -> Response<TestBody> {
    let Some(key) = req.headers().get("sec-websocket-key") else {
        return status(StatusCode::BAD_REQUEST);
    };
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    let on_upgrade = hyper::upgrade::on(req);
    tokio::spawn(async move {
        let Ok(upgraded) = on_upgrade.await else { return };
        let mut ws = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
        while let Some(Ok(msg)) = ws.next().await {
            if msg.is_close() {
                break;
            }
            if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                break;
            }
        }
    });
    let mut response = status(StatusCode::SWITCHING_PROTOCOLS);
    let headers = response.headers_mut();
    headers.insert("connection", HeaderValue::from_static("upgrade"));
    headers.insert("upgrade", HeaderValue::from_static("websocket"));
    headers.insert(
        "sec-websocket-accept",
        HeaderValue::from_str(&accept).expect("accept key"),
    );
    response
}
