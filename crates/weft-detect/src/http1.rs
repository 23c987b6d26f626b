//! HTTP/1.x requests: `method SP request-target SP HTTP/1.x CRLF` (RFC 9112 §3), after any empty lines a
//! client may send first (RFC 9112 §2.2).
//!
//! The answer leans towards HTTP on purpose: bytes that look like an HTTP request but do not parse are
//! still HTTP, so the HTTP server refuses them. Carrying them as opaque TCP would take forged headers
//! (`x-forwarded-client-cert`) and smuggled requests past the proxy's sanitising to the app.

use crate::{Detection, Protocol};

/// Method tokens that say "this is HTTP" even when the rest of the line does not parse (IANA's HTTP
/// method registry, the common part). Compared ignoring case: lenient servers accept `get`.
const METHODS: [&str; 32] = [
    "GET",
    "HEAD",
    "POST",
    "PUT",
    "DELETE",
    "CONNECT",
    "OPTIONS",
    "TRACE",
    "PATCH",
    "PROPFIND",
    "PROPPATCH",
    "MKCOL",
    "COPY",
    "MOVE",
    "LOCK",
    "UNLOCK",
    "SEARCH",
    "REPORT",
    "MKACTIVITY",
    "CHECKOUT",
    "MERGE",
    "M-SEARCH",
    "NOTIFY",
    "SUBSCRIBE",
    "UNSUBSCRIBE",
    "PURGE",
    "LINK",
    "UNLINK",
    "ACL",
    "BIND",
    "REBIND",
    "QUERY",
];

/// Returns `None` when the bytes cannot be the start of an HTTP/1 request. `complete` says no more
/// bytes will come (end of stream, deadline, or the detection limit): a prefix that is still consistent
/// with a request line is then HTTP, to be refused by the server if it never becomes one.
pub(crate) fn match_request(buf: &[u8], complete: bool) -> Option<Detection> {
    let start = buf.iter().take_while(|b| matches!(b, b'\r' | b'\n')).count();
    let rest = &buf[start..];
    if rest.is_empty() {
        // Only empty lines so far.
        return (start > 0).then(|| more_or_http(complete));
    }
    let line_end = rest.iter().position(|b| *b == b'\n');
    let line = &rest[..line_end.map_or(rest.len(), |end| end + 1)];
    match request_line(line) {
        Line::Valid => Some(Detection::Known(Protocol::Http1)),
        Line::Prefix if line_end.is_none() => Some(more_or_http(complete)),
        Line::Prefix | Line::Invalid => {
            // Only what comes before a control byte could be read as a request by a lenient server, so
            // the answer is final once one is seen; a line of text still open may yet name HTTP.
            let readable = &line[..line.iter().position(|b| is_control(*b)).unwrap_or(line.len())];
            if looks_like_http(readable) {
                Some(Detection::Known(Protocol::Http1))
            } else if readable.len() == line.len() && line_end.is_none() && !complete {
                Some(Detection::NeedMore)
            } else {
                None
            }
        }
    }
}

/// A byte no HTTP/1 request line holds (line ends and tabs excepted).
fn is_control(b: u8) -> bool {
    (b < 0x20 && !matches!(b, b'\t' | b'\r' | b'\n')) || b == 0x7f
}

fn more_or_http(complete: bool) -> Detection {
    if complete {
        Detection::Known(Protocol::Http1)
    } else {
        Detection::NeedMore
    }
}

enum Line {
    /// A whole, well-formed request line.
    Valid,
    /// Well-formed so far, but not finished.
    Prefix,
    Invalid,
}

/// Checks one line (ending in LF, or cut short) against the request-line grammar.
fn request_line(line: &[u8]) -> Line {
    let method_len = line.iter().take_while(|b| is_tchar(**b)).count();
    if method_len == line.len() {
        return Line::Prefix;
    }
    if method_len == 0 || line[method_len] != b' ' {
        return Line::Invalid;
    }
    let rest = &line[method_len + 1..];
    let target_len = rest.iter().take_while(|b| is_target_byte(**b)).count();
    if target_len == rest.len() {
        return Line::Prefix;
    }
    if target_len == 0 || rest[target_len] != b' ' {
        return Line::Invalid;
    }
    let rest = &rest[target_len + 1..];
    const VERSION: &[u8] = b"HTTP/1.";
    if rest.len() < VERSION.len() {
        return if VERSION.starts_with(rest) {
            Line::Prefix
        } else {
            Line::Invalid
        };
    }
    if !rest.starts_with(VERSION) {
        return Line::Invalid;
    }
    match &rest[VERSION.len()..] {
        [] | [b'0' | b'1'] | [b'0' | b'1', b'\r'] => Line::Prefix,
        [b'0' | b'1', b'\n'] | [b'0' | b'1', b'\r', b'\n'] => Line::Valid,
        _ => Line::Invalid,
    }
}

/// A line (up to its first control byte) that a lenient HTTP server could take for a request: it starts
/// with a known method followed by whitespace (or nothing yet), or names an HTTP version anywhere.
fn looks_like_http(line: &[u8]) -> bool {
    let token_len = line.iter().take_while(|b| is_tchar(**b)).count();
    let token = &line[..token_len];
    let after = line.get(token_len).copied();
    let known_method = METHODS.iter().any(|m| m.as_bytes().eq_ignore_ascii_case(token))
        && matches!(after, None | Some(b' ' | b'\t' | b'\r' | b'\n'));
    known_method || line.windows(5).any(|w| w.eq_ignore_ascii_case(b"HTTP/"))
}

/// `tchar` from RFC 9110 §5.6.2.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Any visible ASCII byte; request targets never contain spaces or controls.
fn is_target_byte(b: u8) -> bool {
    b.is_ascii_graphic() || b >= 0x80
}
