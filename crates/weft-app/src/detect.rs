//! Reading a connection's first bytes to learn its protocol, unless the configuration already says.

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use weft_detect::{Detection, Protocol as Detected};
use weft_http::HttpVersion;
use weft_model::Protocol;
use weft_transport::PrefixedIo;

/// What the proxy will do with a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Handling {
    Http(HttpVersion),
    Opaque,
    /// The client never spoke, and no more silent connections may be forwarded: closed.
    Close,
}

impl Handling {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Handling::Http(HttpVersion::Http1) => "http/1.1",
            Handling::Http(HttpVersion::Http2) => "h2c",
            Handling::Opaque => "tcp",
            Handling::Close => "none",
        }
    }
}

const READ_CHUNK: usize = 2048;
/// A client on a port declared HTTP that sends nothing for this long is handed to the HTTP server
/// anyway, which applies its own header timeout.
const HTTP_FIRST_BYTES_TIMEOUT: Duration = Duration::from_secs(30);

/// Connections that sent nothing by the detect timeout (a protocol where the server speaks first, on
/// a port nobody declared) forwarded as opaque TCP at once, per proxy. Each holds an upstream
/// connection, so silent clients cannot take more of a cluster's connection slots than this: past it, a
/// silent connection waits for its client to speak (as every detect port does in Istio, which has no
/// detect timeout by default). Declare server-first ports `tcp` and they never wait.
pub(crate) const MAX_SILENT_OPAQUE: usize = 256;

/// What is left of [`MAX_SILENT_OPAQUE`].
#[derive(Debug, Clone)]
pub(crate) struct SilentBudget(Arc<Semaphore>);

impl Default for SilentBudget {
    fn default() -> Self {
        Self(Arc::new(Semaphore::new(MAX_SILENT_OPAQUE)))
    }
}

/// How a connection is to be handled, with its first bytes replayed in front of it.
#[derive(Debug)]
pub(crate) struct Sniffed<S> {
    pub(crate) io: PrefixedIo<S>,
    pub(crate) handling: Handling,
    pub(crate) hello: Option<weft_detect::ClientHelloInfo>,
    /// Held while a connection that began silent is forwarded.
    pub(crate) silent: Option<OwnedSemaphorePermit>,
}

/// How detection waits.
#[derive(Debug, Clone)]
pub(crate) struct Patience {
    /// How long a `detect` port waits for a client's first bytes before the connection is forwarded as
    /// opaque TCP (within the silent budget).
    pub(crate) detect_timeout: Duration,
    pub(crate) silent: SilentBudget,
    /// How long a silent connection past the budget may wait for its client (the connection idle
    /// timeout; `None`: as long as it stays open).
    pub(crate) idle_timeout: Option<Duration>,
    /// The listener's request headers timeout and header limit, for the first request head.
    pub(crate) request_headers_timeout: Option<Duration>,
    pub(crate) max_head_bytes: usize,
    pub(crate) metrics: Arc<weft_telemetry::Metrics>,
}

/// Decides how to handle `stream`.
///
/// A declared protocol costs nothing: `tcp` and `http2` never read. `http` waits for the client (HTTP
/// clients always speak first) only to tell HTTP/1 from HTTP/2. `detect` waits at most the detect
/// timeout, so a protocol where the server speaks first is forwarded as opaque TCP after that short
/// delay, as long as the silent budget lasts.
pub(crate) async fn detect<S: AsyncRead + Unpin>(
    stream: S,
    declared: Protocol,
    patience: &Patience,
) -> Sniffed<S> {
    let sniffed = |buf: BytesMut, stream, handling, hello| Sniffed {
        io: PrefixedIo::new(buf.freeze(), stream),
        handling,
        hello,
        silent: None,
    };
    match declared {
        Protocol::Tcp => sniffed(BytesMut::new(), stream, Handling::Opaque, None),
        Protocol::Http2 => sniffed(BytesMut::new(), stream, Handling::Http(HttpVersion::Http2), None),
        Protocol::Http => {
            let read = sniff(stream, Some(HTTP_FIRST_BYTES_TIMEOUT)).await;
            let version = match read.detected {
                Detected::Http2 => HttpVersion::Http2,
                // Whatever else it is, the port is declared HTTP: the HTTP/1 server answers garbage with 400.
                _ => HttpVersion::Http1,
            };
            finish(
                read.buf,
                read.stream,
                Handling::Http(version),
                None,
                None,
                patience,
            )
            .await
        }
        Protocol::Detect => {
            let mut read = sniff(stream, Some(patience.detect_timeout)).await;
            let mut silent = None;
            if read.silent {
                match patience.silent.0.clone().try_acquire_owned() {
                    Ok(permit) => silent = Some(permit),
                    Err(_) => {
                        tracing::debug!(
                            "a silent connection waits for its client: the silent budget is used up"
                        );
                        patience.metrics.silent_connections_waiting.inc();
                        read = sniff(read.stream, patience.idle_timeout).await;
                        patience.metrics.silent_connections_waiting.dec();
                        if read.buf.is_empty() {
                            return sniffed(read.buf, read.stream, Handling::Close, None);
                        }
                    }
                }
            }
            let (handling, hello) = match read.detected {
                Detected::Http1 => (Handling::Http(HttpVersion::Http1), None),
                Detected::Http2 => (Handling::Http(HttpVersion::Http2), None),
                Detected::Tls(hello) => (Handling::Opaque, Some(hello)),
                Detected::Opaque => (Handling::Opaque, None),
            };
            finish(read.buf, read.stream, handling, hello, silent, patience).await
        }
    }
}

/// Hands a detected connection on. An HTTP/1 client's first request head is read here to its end
/// first, into a buffer the size of what it sent: a client that trickles its headers (slowloris) then
/// costs that buffer, not the HTTP server's (hyper allocates 16 KiB per connection up front). A head
/// that does not end within the request headers timeout closes the connection with nothing sent, as
/// the HTTP server would; one past the header limit goes to the server, which answers 431.
async fn finish<S: AsyncRead + Unpin>(
    mut buf: BytesMut,
    mut stream: S,
    handling: Handling,
    hello: Option<weft_detect::ClientHelloInfo>,
    silent: Option<OwnedSemaphorePermit>,
    patience: &Patience,
) -> Sniffed<S> {
    let mut handling = handling;
    if handling == Handling::Http(HttpVersion::Http1) {
        let deadline = patience
            .request_headers_timeout
            .map(|t| tokio::time::Instant::now() + t);
        while !head_complete(&buf) && buf.len() <= patience.max_head_bytes {
            buf.reserve(READ_CHUNK);
            let read = match deadline {
                Some(deadline) => match tokio::time::timeout_at(deadline, stream.read_buf(&mut buf)).await {
                    Ok(read) => read,
                    Err(_) => {
                        tracing::debug!(
                            "closing a client connection whose request headers did not arrive in time"
                        );
                        handling = Handling::Close;
                        break;
                    }
                },
                None => stream.read_buf(&mut buf).await,
            };
            if !matches!(read, Ok(n) if n > 0) {
                break; // the server sees the end too, and answers what it can
            }
        }
    }
    Sniffed {
        io: PrefixedIo::new(buf.freeze(), stream),
        handling,
        hello,
        silent,
    }
}

/// The bytes so far hold a whole request head (after any empty lines before it).
fn head_complete(buf: &[u8]) -> bool {
    let start = buf.iter().take_while(|b| matches!(b, b'\r' | b'\n')).count();
    let rest = &buf[start..];
    rest.windows(4).any(|w| w == b"\r\n\r\n") || rest.windows(2).any(|w| w == b"\n\n")
}

/// What [`sniff`] read.
struct Read<S> {
    buf: BytesMut,
    detected: Detected,
    stream: S,
    /// The client sent nothing before the deadline (not even EOF).
    silent: bool,
}

/// Reads until detection decides, the client stops sending (EOF or error), or the deadline passes
/// (`None`: never). In the last two cases the bytes so far decide: a client that pauses mid-request is
/// still HTTP (never opaque bytes that skip header sanitising); one that sent nothing is opaque.
async fn sniff<S: AsyncRead + Unpin>(mut stream: S, timeout: Option<Duration>) -> Read<S> {
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
    loop {
        let read = match deadline {
            Some(deadline) => tokio::time::timeout_at(deadline, stream.read_buf(&mut buf)).await,
            None => Ok(stream.read_buf(&mut buf).await),
        };
        let Ok(read) = read else {
            let detected = weft_detect::detect_final(&buf);
            let silent = buf.is_empty();
            return Read {
                buf,
                detected,
                stream,
                silent,
            };
        };
        match read {
            Ok(0) | Err(_) => {
                let detected = weft_detect::detect_final(&buf);
                return Read {
                    buf,
                    detected,
                    stream,
                    silent: false,
                };
            }
            Ok(_) => {}
        }
        if let Detection::Known(detected) = weft_detect::detect(&buf) {
            return Read {
                buf,
                detected,
                stream,
                silent: false,
            };
        }
        buf.reserve(READ_CHUNK);
    }
}
