//! The downstream side: serves one client connection as HTTP/1 or HTTP/2 with the proxy's limits, and
//! closes it gracefully (`Connection: close` / GOAWAY) when the proxy drains.

use std::convert::Infallible;
use std::future::Future;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;
use weft_transport::Activity;

use crate::ProxyBody;
use crate::head_timeout::{HeadClock, HeadTimedIo};
use crate::pool::MAX_HEADER_LIST_BYTES;

/// HTTP/1 header lines accepted per request; with hyper's buffer this admits well over 64 KiB of headers.
const MAX_HTTP1_HEADERS: usize = 256;
/// Concurrent streams per HTTP/2 connection.
const MAX_CONCURRENT_STREAMS: u32 = 1024;
/// Keep-alive PINGs keep long-lived gRPC streams from being cut by idle timeouts in between.
const H2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const H2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HttpVersion {
    Http1,
    Http2,
}

/// How long a client connection may wait, and for what.
#[derive(Debug, Clone, Copy)]
pub struct ServeTimeouts {
    /// No request in flight for this long closes the connection gracefully.
    pub idle: Option<Duration>,
    /// From a request's first byte to the end of its headers (HTTP/1).
    pub request_headers: Option<Duration>,
}

/// Serves one connection until it closes, the client goes away, or `drain` fires and in-flight requests
/// have finished.
pub async fn serve<I, F, Fut>(
    io: I,
    version: HttpVersion,
    drain: CancellationToken,
    timeouts: ServeTimeouts,
    handle: F,
) -> Result<(), hyper::Error>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response<ProxyBody>> + Send + 'static,
{
    // A connection with no request in flight (up to the end of its response body) for the idle timeout
    // is closed gracefully, like a drain of this one connection (Envoy's: HTTP/2 PINGs do not count as
    // activity).
    let activity = Activity::new();
    let counted = activity.clone();
    let head_clock = HeadClock::new();
    let heads = head_clock.clone();
    let service = service_fn(move |req| {
        heads.headers_done();
        let in_flight = counted.request();
        let fut = handle(req);
        async move {
            let mut response = fut.await;
            response.body_mut().hold_request(in_flight);
            Ok::<_, Infallible>(response)
        }
    });
    let watched = activity.clone();
    let idle = async move {
        match timeouts.idle {
            Some(timeout) => watched.idle(timeout).await,
            None => std::future::pending().await,
        }
    };
    match version {
        HttpVersion::Http1 => {
            let io = TokioIo::new(HeadTimedIo::new(io, head_clock.clone(), activity));
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(None)
                .max_headers(MAX_HTTP1_HEADERS)
                .serve_connection(io, service)
                .with_upgrades();
            let headers_late = async {
                match timeouts.request_headers {
                    Some(timeout) => head_clock.expired(timeout).await,
                    None => std::future::pending().await,
                }
            };
            tokio::pin!(conn);
            tokio::select! {
                res = conn.as_mut() => return res,
                () = drain.cancelled() => conn.as_mut().graceful_shutdown(),
                () = idle => {
                    tracing::debug!("closing an idle client connection");
                    conn.as_mut().graceful_shutdown();
                }
                () = headers_late => {
                    // Closed with nothing sent, as for a header block that never completes.
                    tracing::debug!("closing a client connection whose request headers did not arrive in time");
                    return Ok(());
                }
            }
            conn.await
        }
        HttpVersion::Http2 => {
            let io = TokioIo::new(io);
            let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .max_header_list_size(MAX_HEADER_LIST_BYTES)
                .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
                .keep_alive_interval(H2_KEEPALIVE_INTERVAL)
                .keep_alive_timeout(H2_KEEPALIVE_TIMEOUT)
                .serve_connection(io, service);
            tokio::pin!(conn);
            tokio::select! {
                res = conn.as_mut() => return res,
                () = drain.cancelled() => conn.as_mut().graceful_shutdown(),
                () = idle => {
                    tracing::debug!("closing an idle client connection");
                    conn.as_mut().graceful_shutdown();
                }
            }
            conn.await
        }
    }
}
