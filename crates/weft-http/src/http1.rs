//! HTTP/1 client connections. hyper serves their requests; between requests, a connection that has
//! been quiet for [`PARK_AFTER`] is taken back from hyper, which frees its read and write buffers
//! (16 KiB), and waits as a bare socket until its client sends the next request, which a new hyper
//! connection on the same socket then serves. An idle keep-alive connection so costs a few hundred
//! bytes instead of hyper's buffers (HAProxy, likewise, holds buffers only while data is present).
//!
//! A connection is taken back only when hyper has nothing of it: no request in flight, every byte of
//! the last response flushed, and the last request had no body (hyper's reading of a body the service
//! did not consume is invisible from here, so a connection whose last request had one stays with hyper
//! until a request without one). Bytes hyper had read of a next request are handed to the new
//! connection before the socket.

use std::io;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use hyper::body::Incoming;
use hyper::service::HttpService;
use hyper_util::rt::{TokioIo, TokioTimer};
use pin_project_lite::pin_project;
use prometheus_client::metrics::gauge::Gauge;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::sync::CancellationToken;
use weft_transport::{Activity, Pressure};

use crate::ProxyBody;
use crate::head_timeout::HeadClock;
use crate::server::{self, ServeSettings};

/// How long a connection has had no request in flight before it is taken back from hyper. Long enough
/// that a busy keep-alive connection is never rebuilt between its requests (its watcher wakes once per
/// period), short against the idle timeout.
pub(crate) const PARK_AFTER: Duration = Duration::from_secs(1);
/// hyper's smallest read buffer; a smaller header limit is enforced on the parsed head instead.
const MIN_HTTP1_BUFFER: usize = 8192;
/// What hyper's read and write buffers for a connection take at least (8 KiB each).
const HYPER_BUFFERS: u64 = 16 * 1024;
/// What a parked connection reads when its client speaks again (on the stack, for that one read).
const WAKE_READ: usize = 2048;

/// What the service and the socket tell the connection's loop about whether hyper is between requests.
#[derive(Debug, Default)]
pub(crate) struct Lull {
    /// The last request had no body, and no next one has begun since the connection was last parked.
    parkable: AtomicBool,
    /// Every byte written has been flushed since.
    flushed: AtomicBool,
    /// A request arrived (wakes a loop that found the connection busy).
    request: tokio::sync::Notify,
}

impl Lull {
    /// Called by the service for each request.
    pub(crate) fn request<B: hyper::body::Body>(&self, req: &http::Request<B>) {
        self.parkable.store(req.body().is_end_stream(), Ordering::Release);
        self.request.notify_one();
    }

    /// A parked connection's client has begun its next request: it is hyper's until that request.
    fn resumed(&self) {
        self.parkable.store(false, Ordering::Release);
    }

    /// Resolves when the connection may be taken back from hyper: quiet for [`PARK_AFTER`], its last
    /// request bodyless, its writes flushed.
    async fn settled(&self, activity: &Activity) {
        loop {
            activity.idle(PARK_AFTER).await;
            if !self.parkable.load(Ordering::Acquire) {
                self.request.notified().await;
            } else if self.flushed.load(Ordering::Acquire) {
                return;
            } else {
                // A client not reading its response: look again later.
                tokio::time::sleep(PARK_AFTER).await;
            }
        }
    }
}

pin_project! {
    /// A client connection as hyper sees it: bytes taken from it before hyper (by a parked connection's
    /// wake-up read) come first; the request headers clock starts when bytes arrive with no request in
    /// flight (they begin the next request; bytes during a request, its body or a pipelined request
    /// behind it, do not); writes are tracked until flushed.
    #[derive(Debug)]
    pub(crate) struct ClientIo<S> {
        #[pin]
        inner: S,
        prefix: Bytes,
        clock: Arc<HeadClock>,
        activity: Arc<Activity>,
        lull: Arc<Lull>,
    }
}

impl<S> ClientIo<S> {
    pub(crate) fn new(inner: S, clock: Arc<HeadClock>, activity: Arc<Activity>, lull: Arc<Lull>) -> Self {
        Self {
            inner,
            prefix: Bytes::new(),
            clock,
            activity,
            lull,
        }
    }
}

impl<S: AsyncRead> AsyncRead for ClientIo<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.project();
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            this.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let polled = this.inner.poll_read(cx, buf);
        if buf.filled().len() > before && !this.activity.busy() {
            this.clock.start();
        }
        polled
    }
}

impl<S: AsyncWrite> AsyncWrite for ClientIo<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.project();
        this.lull.flushed.store(false, Ordering::Release);
        this.inner.poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.project();
        let flushed = this.inner.poll_flush(cx);
        if let Poll::Ready(Ok(())) = flushed {
            this.lull.flushed.store(true, Ordering::Release);
        }
        flushed
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        this.lull.flushed.store(false, Ordering::Release);
        this.inner.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Serves one HTTP/1 client connection until it closes, parking it between requests.
pub(crate) async fn serve<S, Svc>(
    io: ClientIo<S>,
    mut service: Svc,
    settings: ServeSettings,
    mut keepalive: bool,
    drain: CancellationToken,
) -> Result<(), hyper::Error>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    Svc: HttpService<Incoming, ResBody = ProxyBody> + Unpin,
    Svc::Future: Send + 'static,
    Svc::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let (activity, clock, lull) = (io.activity.clone(), io.clock.clone(), io.lull.clone());
    // A connection accepted under pressure is served without keep-alive: it closes by itself.
    let mut pressed = pin!(server::pressed(&settings.overload, keepalive, None));
    let mut idle = pin!(server::idle(&activity, settings.idle));
    let mut headers_late = pin!(async {
        match settings.request_headers {
            Some(timeout) => clock.expired(timeout).await,
            None => std::future::pending().await,
        }
    });
    let mut io = io;
    loop {
        // Boxed: it exists only while hyper has the connection.
        let mut conn = Box::pin(
            builder(&settings, keepalive)
                .serve_connection(TokioIo::new(io), service)
                .with_upgrades(),
        );
        tokio::select! {
            res = &mut conn => return res,
            () = drain.cancelled() => return closing(conn).await,
            () = &mut pressed => {
                tracing::debug!("memory pressure: closing a client connection after its current request");
                return closing(conn).await;
            }
            () = &mut idle => {
                tracing::debug!("closing an idle client connection");
                return closing(conn).await;
            }
            () = &mut headers_late => {
                // Closed with nothing sent, as for a header block that never completes.
                tracing::debug!("closing a client connection whose request headers did not arrive in time");
                return Ok(());
            }
            () = lull.settled(&activity) => {}
        }
        // Between requests, everything written: hyper's buffers go, the socket and the service stay.
        let Some(parts) = Pin::into_inner(conn).into_parts() else {
            return Ok(());
        };
        service = parts.service;
        io = parts.io.into_inner();
        let read = parts.read_buf;
        if read.is_empty() {
            drop(read);
            settings.overload.released(HYPER_BUFFERS);
            let _parked = Parked::count(&settings.parked);
            let woken = tokio::select! {
                woken = wake(&mut io) => woken,
                () = drain.cancelled() => return Ok(()),
                () = &mut pressed => return Ok(()),
                () = &mut idle => return Ok(()),
            };
            match woken {
                Ok(bytes) if !bytes.is_empty() => io.prefix = bytes,
                // The client closed, or the socket failed, with no request begun.
                _ => return Ok(()),
            }
        } else {
            io.prefix = read;
        }
        lull.resumed();
        keepalive = keepalive && settings.overload.pressure() < Pressure::NoKeepAlive;
    }
}

/// Counts a connection as parked while it lives.
struct Parked<'a>(&'a Gauge);

impl<'a> Parked<'a> {
    fn count(gauge: &'a Gauge) -> Self {
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for Parked<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// A connection asked to close: it finishes the request in flight, then ends.
async fn closing<S, Svc>(
    mut conn: Pin<Box<hyper::server::conn::http1::UpgradeableConnection<TokioIo<ClientIo<S>>, Svc>>>,
) -> Result<(), hyper::Error>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    Svc: HttpService<Incoming, ResBody = ProxyBody> + Unpin,
    Svc::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    conn.as_mut().graceful_shutdown();
    conn.await
}

/// The first bytes a parked connection's client sends (empty: it closed).
async fn wake<S: AsyncRead + Unpin>(io: &mut ClientIo<S>) -> io::Result<Bytes> {
    std::future::poll_fn(|cx| {
        let mut buf = [0u8; WAKE_READ];
        let mut read = ReadBuf::new(&mut buf);
        match Pin::new(&mut *io).poll_read(cx, &mut read) {
            Poll::Ready(Ok(())) => Poll::Ready(Ok(Bytes::copy_from_slice(read.filled()))),
            Poll::Ready(Err(err)) => Poll::Ready(Err(err)),
            Poll::Pending => Poll::Pending,
        }
    })
    .await
}

fn builder(settings: &ServeSettings, keepalive: bool) -> hyper::server::conn::http1::Builder {
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(None)
        .keep_alive(keepalive)
        // A header line over the limit fails the parse (431); the buffer bounds both the head and what a
        // slow reader's responses queue.
        .max_headers(usize::try_from(settings.limits.max_headers_count).unwrap_or(usize::MAX))
        .max_buf_size(
            usize::try_from(settings.limits.max_request_headers_bytes())
                .unwrap_or(usize::MAX)
                .max(MIN_HTTP1_BUFFER),
        );
    builder
}

#[cfg(test)]
mod tests {
    use http::Response;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
    use weft_model::HttpLimits;
    use weft_transport::{Overload, OverloadLimits};

    use super::*;
    use crate::{HttpVersion, serve as serve_connection};

    struct Client {
        stream: DuplexStream,
        parked: Gauge,
        drain: CancellationToken,
        served: tokio::task::JoinHandle<Result<(), hyper::Error>>,
    }

    /// A connection served with an idle timeout of a minute; every request answered `ok`, bodies unread.
    fn connect() -> Client {
        let (stream, server) = tokio::io::duplex(64 * 1024);
        let parked = Gauge::default();
        let drain = CancellationToken::new();
        let settings = ServeSettings {
            idle: Some(Duration::from_secs(60)),
            request_headers: Some(Duration::from_secs(10)),
            limits: HttpLimits::default(),
            overload: Overload::new(OverloadLimits {
                max_active_downstream_connections: 10,
                max_memory_bytes: None,
            }),
            parked: parked.clone(),
            source: None,
        };
        let served = tokio::spawn(serve_connection(
            server,
            HttpVersion::Http1,
            drain.clone(),
            settings,
            |req: http::Request<Incoming>| async move {
                Response::new(ProxyBody::local(answer(req.uri().path()), None))
            },
        ));
        Client {
            stream,
            parked,
            drain,
            served,
        }
    }

    fn answer(path: &str) -> &'static str {
        match path {
            "/one" => "ok /one",
            "/two" => "ok /two",
            "/three" => "ok /three",
            "/upload" => "ok /upload",
            "/next" => "ok /next",
            _ => "ok",
        }
    }

    impl Client {
        async fn send(&mut self, bytes: &[u8]) {
            self.stream.write_all(bytes).await.expect("write");
        }

        /// One whole response (this server's are short and have a content-length).
        async fn response(&mut self) -> String {
            let mut buf = Vec::new();
            loop {
                let mut chunk = [0u8; 1024];
                let n = tokio::time::timeout(Duration::from_secs(5), self.stream.read(&mut chunk))
                    .await
                    .expect("a response in time")
                    .expect("read");
                assert!(
                    n > 0,
                    "closed before a whole response: {:?}",
                    String::from_utf8_lossy(&buf)
                );
                buf.extend_from_slice(&chunk[..n]);
                let text = String::from_utf8_lossy(&buf).into_owned();
                if let Some(head_end) = text.find("\r\n\r\n") {
                    let length: usize = text[..head_end]
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length: "))
                        .and_then(|v| v.trim().parse().ok())
                        .expect("content-length");
                    if buf.len() >= head_end + 4 + length {
                        return text;
                    }
                }
            }
        }

        async fn get(&mut self, path: &str) -> String {
            self.send(format!("GET {path} HTTP/1.1\r\nhost: a\r\n\r\n").as_bytes())
                .await;
            self.response().await
        }

        /// Reads until the server closes; what it sent meanwhile.
        async fn closed(&mut self) -> String {
            let mut rest = Vec::new();
            tokio::time::timeout(Duration::from_secs(600), self.stream.read_to_end(&mut rest))
                .await
                .expect("the connection closes")
                .expect("read");
            String::from_utf8_lossy(&rest).into_owned()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_quiet_connection_is_parked_and_serves_its_next_request() {
        let mut client = connect();
        assert!(client.get("/one").await.ends_with("ok /one"));
        assert_eq!(client.parked.get(), 0, "parked while just answered");
        tokio::time::sleep(PARK_AFTER * 2).await;
        assert_eq!(
            client.parked.get(),
            1,
            "not parked after {:?} quiet",
            PARK_AFTER * 2
        );

        assert!(client.get("/two").await.ends_with("ok /two"));
        assert_eq!(client.parked.get(), 0, "still counted as parked while serving");
        tokio::time::sleep(PARK_AFTER * 2).await;
        assert_eq!(client.parked.get(), 1, "not parked again");
        assert!(client.get("/three").await.ends_with("ok /three"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_begun_before_parking_is_handed_over_whole() {
        let mut client = connect();
        assert!(client.get("/one").await.ends_with("ok /one"));
        // Part of the next head arrives while hyper has the connection, the rest after it is parked.
        tokio::time::sleep(PARK_AFTER / 2).await;
        client.send(b"GET /two HTTP/1.1\r\nho").await;
        tokio::time::sleep(PARK_AFTER * 2).await;
        client.send(b"st: a\r\n\r\n").await;
        assert!(client.get("/three").await.contains("ok /two"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_head_trickled_into_a_parked_connection_is_served() {
        let mut client = connect();
        assert!(client.get("/one").await.ends_with("ok /one"));
        tokio::time::sleep(PARK_AFTER * 2).await;
        assert_eq!(client.parked.get(), 1);
        for piece in [&b"GET /tw"[..], b"o HTTP/1.1\r\n", b"host: a\r\n", b"\r\n"] {
            client.send(piece).await;
            tokio::time::sleep(PARK_AFTER * 2).await;
        }
        assert!(client.response().await.ends_with("ok /two"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_whose_last_request_had_a_body_stays_with_hyper() {
        let mut client = connect();
        // Answered before its body is read (the service never reads it); the body arrives whole.
        client
            .send(b"POST /upload HTTP/1.1\r\nhost: a\r\ncontent-length: 10\r\n\r\n1234567890")
            .await;
        assert!(client.response().await.ends_with("ok /upload"));
        tokio::time::sleep(PARK_AFTER * 3).await;
        assert_eq!(client.parked.get(), 0, "parked after a request with a body");
        // A request without one makes it parkable again.
        assert!(client.get("/next").await.ends_with("ok /next"));
        tokio::time::sleep(PARK_AFTER * 2).await;
        assert_eq!(client.parked.get(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_left_half_sent_is_never_read_as_a_request() {
        let mut client = connect();
        client
            .send(b"POST /upload HTTP/1.1\r\nhost: a\r\ncontent-length: 10\r\n\r\n12345")
            .await;
        assert!(client.response().await.ends_with("ok /upload"));
        tokio::time::sleep(PARK_AFTER * 3).await;
        assert_eq!(client.parked.get(), 0, "parked with a body half read");
        // What would be the rest of the body plus a request: hyper closes instead of parsing it.
        let _ = client
            .stream
            .write_all(b"GET /smuggled HTTP/1.1\r\nhost: a\r\n\r\n")
            .await;
        let rest = client.closed().await;
        assert!(!rest.contains("ok"), "a request was read from a body: {rest}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_parked_connection_closes_on_drain_and_on_its_idle_timeout() {
        let mut drained = connect();
        assert!(drained.get("/").await.starts_with("HTTP/1.1 200"));
        tokio::time::sleep(PARK_AFTER * 2).await;
        assert_eq!(drained.parked.get(), 1);
        drained.drain.cancel();
        assert_eq!(drained.closed().await, "");
        assert_eq!(
            drained.parked.get(),
            0,
            "a closed connection still counted as parked"
        );

        let mut idle = connect();
        assert!(idle.get("/").await.starts_with("HTTP/1.1 200"));
        let started = tokio::time::Instant::now();
        assert_eq!(idle.closed().await, "");
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_secs(59) && waited <= Duration::from_secs(61),
            "closed after {waited:?}, not the 60 s idle timeout"
        );
        assert!(idle.served.await.expect("join").is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_closes_while_parked_ends_the_connection() {
        let Client {
            mut stream,
            parked,
            served,
            ..
        } = connect();
        stream
            .write_all(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n")
            .await
            .expect("write");
        let mut buf = [0u8; 1024];
        let n = stream.read(&mut buf).await.expect("read");
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
        tokio::time::sleep(PARK_AFTER * 2).await;
        assert_eq!(parked.get(), 1);
        drop(stream);
        let ended = tokio::time::timeout(Duration::from_secs(5), served).await;
        assert!(matches!(ended, Ok(Ok(Ok(())))), "{ended:?}");
        assert_eq!(parked.get(), 0);
    }
}
