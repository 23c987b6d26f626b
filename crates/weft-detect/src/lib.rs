//! Protocol detection from the first bytes a client sends.
//!
//! Everything here is pure: it looks at a byte prefix and says which protocol it is, or that it needs more
//! bytes to tell. Reading from the socket, timeouts and what to do with the answer belong to the caller.

mod http1;
mod tls;

pub use tls::ClientHelloInfo;

/// The HTTP/2 connection preface a prior-knowledge client sends first (RFC 9113 §3.4).
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Bytes after which detection stops reading and decides on what it has. A ClientHello with many
/// extensions (post-quantum key shares) can pass 1.5 KiB; an HTTP/1 request line still unfinished here
/// (a long URL) is HTTP, and the HTTP server applies its own limits to it.
pub const MAX_DETECT_BYTES: usize = 16 * 1024;

/// What the first bytes of a connection are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Protocol {
    /// An HTTP/1.x request line.
    Http1,
    /// The HTTP/2 prior-knowledge preface (h2c).
    Http2,
    /// A TLS ClientHello; carried as opaque bytes, with what it said recorded.
    Tls(ClientHelloInfo),
    /// Anything else.
    Opaque,
}

/// The answer for a byte prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Detection {
    Known(Protocol),
    /// The prefix is consistent with at least one protocol; more bytes are needed to decide.
    NeedMore,
}

/// Classifies the first bytes of a client's stream.
pub fn detect(buf: &[u8]) -> Detection {
    // Only the first MAX_DETECT_BYTES count, so an answer never changes as more bytes arrive.
    let buf = &buf[..buf.len().min(MAX_DETECT_BYTES)];
    classify(buf, buf.len() >= MAX_DETECT_BYTES)
}

/// Classifies a prefix after which no more bytes will be looked at: the client closed, went quiet past
/// the deadline, or the limit was reached. A prefix that could still become an HTTP request is HTTP,
/// so pausing mid-request never turns a request into opaque bytes; no bytes at all is opaque (a
/// protocol where the server speaks first).
pub fn detect_final(buf: &[u8]) -> Protocol {
    let buf = &buf[..buf.len().min(MAX_DETECT_BYTES)];
    match classify(buf, true) {
        Detection::Known(protocol) => protocol,
        Detection::NeedMore => Protocol::Opaque,
    }
}

fn classify(buf: &[u8], complete: bool) -> Detection {
    if buf.is_empty() {
        return if complete {
            Detection::Known(Protocol::Opaque)
        } else {
            Detection::NeedMore
        };
    }
    let answer = match_h2(buf, complete)
        .or_else(|| tls::match_client_hello(buf))
        .or_else(|| http1::match_request(buf, complete));
    match answer {
        Some(Detection::NeedMore) if complete => Detection::Known(Protocol::Opaque),
        Some(answer) => answer,
        None => Detection::Known(Protocol::Opaque),
    }
}

fn match_h2(buf: &[u8], complete: bool) -> Option<Detection> {
    if buf.starts_with(H2_PREFACE) {
        Some(Detection::Known(Protocol::Http2))
    } else if H2_PREFACE.starts_with(buf) && !complete {
        Some(Detection::NeedMore)
    } else {
        None
    }
}

#[cfg(test)]
mod tests;
