//! Reading a connection's first bytes to learn its protocol, unless the configuration already says.

use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt};
use weft_detect::{Detection, Protocol as Detected};
use weft_http::HttpVersion;
use weft_model::Protocol;
use weft_transport::PrefixedIo;

/// What the proxy will do with a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Handling {
    Http(HttpVersion),
    Opaque,
}

impl Handling {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Handling::Http(HttpVersion::Http1) => "http/1.1",
            Handling::Http(HttpVersion::Http2) => "h2c",
            Handling::Opaque => "tcp",
        }
    }
}

const READ_CHUNK: usize = 2048;
/// A client on a port declared HTTP that sends nothing for this long is handed to the HTTP server
/// anyway, which applies its own header timeout.
const HTTP_FIRST_BYTES_TIMEOUT: Duration = Duration::from_secs(30);

/// Decides how to handle `stream`, returning it with any bytes read replayed in front.
///
/// A declared protocol costs nothing: `tcp` and `http2` never read. `http` waits for the client (HTTP
/// clients always speak first) only to tell HTTP/1 from HTTP/2. `detect` waits at most `timeout`, so
/// a protocol where the server speaks first is forwarded as opaque TCP after that short delay.
pub(crate) async fn detect<S: AsyncRead + Unpin>(
    stream: S,
    declared: Protocol,
    timeout: Duration,
) -> (PrefixedIo<S>, Handling, Option<weft_detect::ClientHelloInfo>) {
    match declared {
        Protocol::Tcp => (
            PrefixedIo::new(Default::default(), stream),
            Handling::Opaque,
            None,
        ),
        Protocol::Http2 => (
            PrefixedIo::new(Default::default(), stream),
            Handling::Http(HttpVersion::Http2),
            None,
        ),
        Protocol::Http => {
            let (buf, detected, stream) = sniff(stream, HTTP_FIRST_BYTES_TIMEOUT).await;
            let version = match detected {
                Detected::Http2 => HttpVersion::Http2,
                // Whatever else it is, the port is declared HTTP: the HTTP/1 server answers garbage with 400.
                _ => HttpVersion::Http1,
            };
            (
                PrefixedIo::new(buf.freeze(), stream),
                Handling::Http(version),
                None,
            )
        }
        Protocol::Detect => {
            let (buf, detected, stream) = sniff(stream, timeout).await;
            let (handling, hello) = match detected {
                Detected::Http1 => (Handling::Http(HttpVersion::Http1), None),
                Detected::Http2 => (Handling::Http(HttpVersion::Http2), None),
                Detected::Tls(hello) => (Handling::Opaque, Some(hello)),
                Detected::Opaque => (Handling::Opaque, None),
            };
            (PrefixedIo::new(buf.freeze(), stream), handling, hello)
        }
    }
}

/// Reads until detection decides, the client stops sending (EOF or error), or the deadline passes. In
/// the last two cases the bytes so far decide: a client that pauses mid-request is still HTTP (never
/// opaque bytes that skip header sanitising); one that sent nothing is opaque.
async fn sniff<S: AsyncRead + Unpin>(mut stream: S, timeout: Duration) -> (BytesMut, Detected, S) {
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let Ok(read) = tokio::time::timeout_at(deadline, stream.read_buf(&mut buf)).await else {
            let detected = weft_detect::detect_final(&buf);
            return (buf, detected, stream);
        };
        match read {
            Ok(0) | Err(_) => {
                let detected = weft_detect::detect_final(&buf);
                return (buf, detected, stream);
            }
            Ok(_) => {}
        }
        if let Detection::Known(protocol) = weft_detect::detect(&buf) {
            return (buf, protocol, stream);
        }
        buf.reserve(READ_CHUNK);
    }
}
