//! The downstream side: serves one client connection as HTTP/1 or HTTP/2 with the proxy's limits, and
//! closes it gracefully (`Connection: close` / GOAWAY) when the proxy drains.

use std::convert::Infallible;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use prometheus_client::metrics::gauge::Gauge;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use weft_model::HttpLimits;
use weft_transport::{Activity, Overload, Pressure};

use crate::ProxyBody;
use crate::frame_guard::{Flooded, FrameGuard};
use crate::head_timeout::HeadClock;
use crate::http1::{self, ClientIo, Lull};

/// Keep-alive PINGs keep long-lived gRPC streams from being cut by idle timeouts in between.
const H2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const H2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);
/// Streams a client may reset before the proxy has accepted them, and streams the proxy may reset
/// because of the client's errors, before the connection is closed (h2's rapid-reset guards).
const MAX_PENDING_ACCEPT_RESETS: usize = 20;
const MAX_LOCAL_ERROR_RESETS: usize = 100;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HttpVersion {
    Http1,
    Http2,
}

/// How long a client connection may wait, and for what, and what it may make the proxy hold.
#[derive(Debug, Clone)]
pub struct ServeSettings {
    /// No request in flight for this long closes the connection gracefully.
    pub idle: Option<Duration>,
    /// From a request's first byte to the end of its headers (HTTP/1).
    pub request_headers: Option<Duration>,
    pub limits: HttpLimits,
    /// Under memory pressure keep-alive is disabled: the connection closes after its current request.
    pub overload: Overload,
    /// HTTP/1 connections parked between requests (see [`crate::http1`]).
    pub parked: Gauge,
    /// The client's address: refused new connections for a while if it abuses this one.
    pub source: Option<IpAddr>,
}

/// A connection being served.
pub type Served = Pin<Box<dyn Future<Output = Result<(), hyper::Error>> + Send>>;

/// Serves one connection until it closes, the client goes away, or `drain` fires and in-flight requests
/// have finished. The future holds only its protocol's state: an idle connection costs what its HTTP
/// version needs, nothing of the set-up here.
pub fn serve<I, F, Fut>(
    io: I,
    version: HttpVersion,
    drain: CancellationToken,
    settings: ServeSettings,
    handle: F,
) -> Served
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: Fn(Request<Incoming>) -> Fut + Send + Sync + Unpin + 'static,
    Fut: Future<Output = Response<ProxyBody>> + Send + 'static,
{
    // A connection with no request in flight (up to the end of its response body) for the idle timeout
    // is closed gracefully, like a drain of this one connection (Envoy's: HTTP/2 PINGs do not count as
    // activity).
    let activity = Activity::new();
    let counted = activity.clone();
    let head_clock = HeadClock::new();
    let heads = head_clock.clone();
    let resets = PrematureResets::default();
    let streams = resets.clone();
    let max_headers = usize::try_from(settings.limits.max_headers_count).unwrap_or(usize::MAX);
    let max_header_bytes = settings.limits.max_request_headers_bytes();
    let first_request = Arc::new(Notify::new());
    let arrived = first_request.clone();
    let lull = Arc::new(Lull::default());
    // Only an HTTP/1 connection is parked between requests.
    let between = (version == HttpVersion::Http1).then(|| lull.clone());
    let service = service_fn(move |req: Request<Incoming>| {
        heads.headers_done();
        arrived.notify_one();
        if let Some(between) = &between {
            between.request(&req);
        }
        let in_flight = counted.request();
        // HTTP/2 enforces the header list size itself (SETTINGS_MAX_HEADER_LIST_SIZE); HTTP/1's
        // buffer is at least 8 KiB, so smaller limits are checked here.
        let too_large = req.headers().len() > max_headers
            || (version == HttpVersion::Http1 && header_bytes(&req) > max_header_bytes);
        // Boxed: a connection between requests keeps only hyper's slot for a request's future.
        let fut = (!too_large).then(|| Box::pin(handle(req)));
        // Only HTTP/2 streams can be reset while the connection lives on.
        let stream = (version == HttpVersion::Http2).then(|| streams.opened());
        async move {
            let mut response = match fut {
                Some(fut) => fut.await,
                None => headers_too_large(),
            };
            if let Some(stream) = stream {
                stream.answered();
            }
            response.body_mut().hold_request(in_flight);
            Ok::<_, Infallible>(response)
        }
    });
    // A connection accepted under pressure serves one request (HTTP/1 without keep-alive; HTTP/2 is
    // sent GOAWAY once its first request has arrived); one accepted before is closed gracefully when
    // the pressure comes.
    let keepalive = settings.overload.pressure() < Pressure::NoKeepAlive;
    match version {
        HttpVersion::Http1 => {
            let io = ClientIo::new(io, head_clock, activity, lull);
            Box::pin(http1::serve(io, service, settings, keepalive, drain))
        }
        HttpVersion::Http2 => Box::pin(async move {
            let flooded = Arc::new(Flooded::default());
            let io = FrameGuard::new(io, flooded.clone());
            let pressed = pressed(&settings.overload, keepalive, Some(&first_request));
            let idle = idle(&activity, settings.idle);
            let io = TokioIo::new(io);
            let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .max_header_list_size(max_header_bytes)
                .max_concurrent_streams(settings.limits.max_concurrent_streams)
                .initial_stream_window_size(settings.limits.initial_stream_window_size)
                .initial_connection_window_size(settings.limits.initial_connection_window_size)
                // What a slow reader's responses may queue per stream: its window.
                .max_send_buf_size(
                    usize::try_from(settings.limits.initial_stream_window_size).unwrap_or(usize::MAX),
                )
                .max_pending_accept_reset_streams(MAX_PENDING_ACCEPT_RESETS)
                .max_local_error_reset_streams(Some(MAX_LOCAL_ERROR_RESETS))
                .keep_alive_interval(H2_KEEPALIVE_INTERVAL)
                .keep_alive_timeout(H2_KEEPALIVE_TIMEOUT)
                .serve_connection(io, service);
            // Boxed, so that an HTTP/1 connection's state is not as large as an HTTP/2 one's.
            let mut conn = Box::pin(conn);
            let result = tokio::select! {
                res = conn.as_mut() => res,
                () = pressed => {
                    tracing::debug!("memory pressure: closing a client connection gracefully (GOAWAY)");
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
                () = resets.abusive() => {
                    tracing::warn!(
                        streams = resets.opened.load(Ordering::Relaxed),
                        reset = resets.reset.load(Ordering::Relaxed),
                        source = ?settings.source,
                        penalty = ?weft_transport::ABUSE_PENALTY,
                        "closing an HTTP/2 client connection that resets most of its streams before their response (rapid reset); its address may open no new connection for the penalty"
                    );
                    if let Some(source) = settings.source {
                        settings.overload.penalize(source);
                    }
                    return Ok(());
                }
                () = drain.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
                () = idle => {
                    tracing::debug!("closing an idle client connection");
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            // h2's own rapid-reset guards (streams reset before they were accepted, or for the client's
            // protocol errors) end the connection with ENHANCE_YOUR_CALM, and the frame guard ends a
            // frame flood: the same abuse.
            let abuse = match (&result, flooded.what()) {
                (_, Some(frames)) => Some(frames),
                (Err(err), None) if closed_for_abuse(err) => Some("reset streams (ENHANCE_YOUR_CALM)"),
                _ => None,
            };
            if let Some(abuse) = abuse {
                tracing::warn!(
                    source = ?settings.source,
                    abuse,
                    penalty = ?weft_transport::ABUSE_PENALTY,
                    "an HTTP/2 client connection was closed for flooding; its address may open no new connection for the penalty"
                );
                if let Some(source) = settings.source {
                    settings.overload.penalize(source);
                }
            }
            result
        }),
    }
}

/// Whether h2 ended the connection for the client's abuse: its guards send GOAWAY ENHANCE_YOUR_CALM.
fn closed_for_abuse(err: &hyper::Error) -> bool {
    let mut source = std::error::Error::source(err);
    while let Some(cause) = source {
        if let Some(h2) = cause.downcast_ref::<h2::Error>() {
            return h2.is_go_away() && !h2.is_remote() && h2.reason() == Some(h2::Reason::ENHANCE_YOUR_CALM);
        }
        source = cause.source();
    }
    false
}

/// Resolves when memory pressure is to close a connection: one accepted before the pressure, when it
/// comes; one accepted under it (served without keep-alive), once its first request has arrived
/// (`first_request`; HTTP/1 has none to wait for, as it closes after that request by itself).
pub(crate) async fn pressed(overload: &Overload, keepalive: bool, first_request: Option<&Notify>) {
    match (keepalive, first_request) {
        (true, _) => overload.keepalive_disabled().await,
        (false, Some(first_request)) => first_request.notified().await,
        (false, None) => std::future::pending().await,
    }
}

/// Resolves when a connection has had no request in flight for the idle timeout.
pub(crate) async fn idle(activity: &Activity, timeout: Option<Duration>) {
    match timeout {
        Some(timeout) => activity.idle(timeout).await,
        None => std::future::pending().await,
    }
}

/// Bytes of a request's header block as HTTP/2 counts them (name, value and 32 per field).
fn header_bytes<B>(req: &Request<B>) -> u32 {
    let total: usize = req
        .headers()
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 32)
        .sum();
    u32::try_from(total).unwrap_or(u32::MAX)
}

fn headers_too_large() -> Response<ProxyBody> {
    let mut response = Response::new(ProxyBody::local("request header fields too large", None));
    *response.status_mut() = http::StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE;
    response
}

/// Envoy's premature-reset guard: a client that opens streams only to reset them before their response
/// makes the proxy start (and abandon) upstream requests at no cost to itself. Once it has opened
/// [`PrematureResets::MIN_STREAMS`] streams and reset at least half of them unanswered, its connection
/// is closed.
#[derive(Debug, Clone, Default)]
struct PrematureResets(Arc<ResetCounts>);

#[derive(Debug, Default)]
struct ResetCounts {
    opened: AtomicU64,
    reset: AtomicU64,
    abusive: Notify,
}

impl std::ops::Deref for PrematureResets {
    type Target = ResetCounts;
    fn deref(&self) -> &ResetCounts {
        &self.0
    }
}

impl PrematureResets {
    const MIN_STREAMS: u64 = 500;

    fn opened(&self) -> StreamGuard {
        self.0.opened.fetch_add(1, Ordering::Relaxed);
        StreamGuard {
            counts: Some(self.0.clone()),
        }
    }

    async fn abusive(&self) {
        self.0.abusive.notified().await;
    }
}

/// Counts its stream as reset unless the stream was answered.
#[derive(Debug)]
struct StreamGuard {
    counts: Option<Arc<ResetCounts>>,
}

impl StreamGuard {
    fn answered(mut self) {
        self.counts = None;
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        if let Some(counts) = self.counts.take() {
            let reset = counts.reset.fetch_add(1, Ordering::Relaxed) + 1;
            let opened = counts.opened.load(Ordering::Relaxed);
            if opened >= PrematureResets::MIN_STREAMS && reset * 2 >= opened {
                counts.abusive.notify_one();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use weft_transport::OverloadLimits;

    use super::*;

    fn settings(overload: &Overload) -> ServeSettings {
        ServeSettings {
            idle: None,
            request_headers: None,
            limits: HttpLimits::default(),
            overload: overload.clone(),
            parked: Gauge::default(),
            source: None,
        }
    }

    fn serve_one(overload: &Overload) -> tokio::io::DuplexStream {
        let (client, server) = tokio::io::duplex(64 * 1024);
        tokio::spawn(serve(
            server,
            HttpVersion::Http1,
            CancellationToken::new(),
            settings(overload),
            |_req| async { Response::new(ProxyBody::local("ok", None)) },
        ));
        client
    }

    async fn exchange(client: &mut tokio::io::DuplexStream) -> String {
        client
            .write_all(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n")
            .await
            .expect("write");
        let mut buf = vec![0u8; 4096];
        let n = client.read(&mut buf).await.expect("read");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[tokio::test]
    async fn a_client_tripping_h2s_reset_guard_has_its_address_penalized() {
        let overload = Overload::new(OverloadLimits {
            max_active_downstream_connections: 100,
            max_memory_bytes: None,
        });
        let source: IpAddr = "10.1.2.3".parse().expect("literal");
        let mut settings = settings(&overload);
        settings.source = Some(source);
        let (client, server) = tokio::io::duplex(1024 * 1024);
        let served = tokio::spawn(serve(
            server,
            HttpVersion::Http2,
            CancellationToken::new(),
            settings,
            |_req| async { Response::new(ProxyBody::local("ok", None)) },
        ));
        let (send, connection) = h2::client::handshake(client).await.expect("handshake");
        let driver = tokio::spawn(connection);
        // Streams opened and reset before the server can accept them, as fast as the client can.
        for _ in 0..200 {
            let Ok(mut ready) = send.clone().ready().await else {
                break;
            };
            let request = Request::builder().uri("http://a/").body(()).expect("request");
            match ready.send_request(request, false) {
                Ok((_, mut stream)) => stream.send_reset(h2::Reason::CANCEL),
                Err(_) => break,
            }
        }
        let ended = tokio::time::timeout(Duration::from_secs(5), served).await;
        assert!(ended.is_ok(), "the connection outlived h2's reset guard");
        assert_eq!(
            overload.admit(source).unwrap_err(),
            weft_transport::Refusal::Abuse
        );
        assert!(overload.admit("10.1.2.4".parse().expect("literal")).is_ok());
        driver.abort();
    }

    #[tokio::test]
    async fn an_http2_connection_accepted_under_pressure_serves_its_request_then_goes_away() {
        let overload = Overload::new(OverloadLimits {
            max_active_downstream_connections: 100,
            max_memory_bytes: Some(1000),
        });
        overload.observe_memory(920);
        let (client, server) = tokio::io::duplex(64 * 1024);
        let served = tokio::spawn(serve(
            server,
            HttpVersion::Http2,
            CancellationToken::new(),
            settings(&overload),
            |_req| async { Response::new(ProxyBody::local("ok", None)) },
        ));
        let (send, connection) = h2::client::handshake(client).await.expect("handshake");
        let driver = tokio::spawn(connection);
        let request = Request::builder().uri("http://a/").body(()).expect("request");
        let (response, _) = send
            .ready()
            .await
            .expect("ready")
            .send_request(request, true)
            .expect("send");
        let response = response.await.expect("the first request is answered");
        assert_eq!(response.status(), http::StatusCode::OK);
        // Then the connection ends (GOAWAY), on both sides.
        let ended = tokio::time::timeout(Duration::from_secs(5), served).await;
        assert!(ended.is_ok(), "the connection stayed open under pressure");
        let _ = tokio::time::timeout(Duration::from_secs(5), driver).await;
    }

    #[tokio::test]
    async fn memory_pressure_closes_kept_alive_connections_and_serves_new_ones_once() {
        let overload = Overload::new(OverloadLimits {
            max_active_downstream_connections: 100,
            max_memory_bytes: Some(1000),
        });
        let mut before = serve_one(&overload);
        let first = exchange(&mut before).await;
        assert!(first.starts_with("HTTP/1.1 200"), "{first}");
        assert!(
            !first.to_ascii_lowercase().contains("connection: close"),
            "{first}"
        );

        overload.observe_memory(920);
        // The idle kept-alive connection is closed.
        let mut rest = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(5), before.read_to_end(&mut rest)).await;
        assert!(
            closed.is_ok(),
            "a kept-alive connection stayed open under pressure"
        );

        // A connection accepted now is served once, then closed.
        let mut after = serve_one(&overload);
        let answer = exchange(&mut after).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(
            answer.to_ascii_lowercase().contains("connection: close"),
            "{answer}"
        );
    }
}
