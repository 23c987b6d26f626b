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
use crate::pool::MAX_HEADER_LIST_BYTES;

/// A client has this long to send a complete request header block (slowloris protection).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
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

/// Serves one connection until it closes, the client goes away, or `drain` fires and in-flight requests
/// have finished.
pub async fn serve<I, F, Fut>(
    io: I,
    version: HttpVersion,
    drain: CancellationToken,
    idle_timeout: Option<Duration>,
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
    let service = service_fn(move |req| {
        let in_flight = counted.request();
        let fut = handle(req);
        async move {
            let mut response = fut.await;
            response.body_mut().hold_request(in_flight);
            Ok::<_, Infallible>(response)
        }
    });
    let idle = async move {
        match idle_timeout {
            Some(timeout) => activity.idle(timeout).await,
            None => std::future::pending().await,
        }
    };
    let io = TokioIo::new(io);
    match version {
        HttpVersion::Http1 => {
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .max_headers(MAX_HTTP1_HEADERS)
                .serve_connection(io, service)
                .with_upgrades();
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
        HttpVersion::Http2 => {
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
