//! HTTP/1.x request line: `method SP request-target SP HTTP/1.x CRLF` (RFC 9112 §3).

use crate::{Detection, Protocol};

/// Longer method tokens exist in theory; real ones (including WebDAV's) are well under this.
const MAX_METHOD_LEN: usize = 24;

/// Returns `None` when the bytes cannot be the start of an HTTP/1 request.
pub(crate) fn match_request_line(buf: &[u8]) -> Option<Detection> {
    let mut rest = buf;

    let method_len = rest.iter().take_while(|b| is_tchar(**b)).count();
    if method_len > MAX_METHOD_LEN {
        return None;
    }
    if method_len == rest.len() {
        return need_more_if(method_len <= MAX_METHOD_LEN);
    }
    if method_len == 0 || rest[method_len] != b' ' {
        return None;
    }
    rest = &rest[method_len + 1..];

    let target_len = rest.iter().take_while(|b| is_target_byte(**b)).count();
    if target_len == rest.len() {
        return Some(Detection::NeedMore);
    }
    if target_len == 0 || rest[target_len] != b' ' {
        return None;
    }
    rest = &rest[target_len + 1..];

    const VERSION: &[u8] = b"HTTP/1.";
    if rest.len() < VERSION.len() {
        return need_more_if(VERSION.starts_with(rest));
    }
    if !rest.starts_with(VERSION) {
        return None;
    }
    rest = &rest[VERSION.len()..];
    match rest {
        [] => Some(Detection::NeedMore),
        [b'0' | b'1'] | [b'0' | b'1', b'\r'] => Some(Detection::NeedMore),
        [b'0' | b'1', b'\n', ..] | [b'0' | b'1', b'\r', b'\n', ..] => Some(Detection::Known(Protocol::Http1)),
        _ => None,
    }
}

fn need_more_if(consistent: bool) -> Option<Detection> {
    consistent.then_some(Detection::NeedMore)
}

/// `tchar` from RFC 9110 §5.6.2.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Any visible ASCII byte; request targets never contain spaces or controls.
fn is_target_byte(b: u8) -> bool {
    b.is_ascii_graphic() || b >= 0x80
}
