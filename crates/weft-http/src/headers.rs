//! Hop-by-hop headers (RFC 9110 §7.6.1): they describe one connection and are not forwarded, except
//! what an upgrade needs and `te: trailers`, which gRPC over HTTP/2 requires. And the request id.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// Always connection-specific, whether or not `Connection` lists them.
const HOP_BY_HOP: [HeaderName; 6] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Removes hop-by-hop headers and those `Connection` names. Returns the `Upgrade` value when the message
/// asks for a protocol upgrade (`Connection: upgrade` with an `Upgrade` header), so the caller can keep it.
/// `h2c` is never offered upstream (Envoy strips it too): after a `101` the bytes that follow would reach
/// the app as HTTP/2 the proxy never parsed, routed or counted.
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap, keep_te_trailers: bool) -> Option<HeaderValue> {
    let mut upgrade_requested = false;
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| {
            let name = name.trim();
            if name.eq_ignore_ascii_case("upgrade") {
                upgrade_requested = true;
            }
            HeaderName::from_bytes(name.as_bytes()).ok()
        })
        .collect();
    let upgrade = if upgrade_requested {
        headers.get(header::UPGRADE).and_then(without_h2c)
    } else {
        None
    };
    let te_trailers = keep_te_trailers
        && headers
            .get_all(header::TE)
            .iter()
            .any(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));

    for name in listed.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
    if te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    upgrade
}

/// The protocols of an `Upgrade` value other than `h2c`; `None` when nothing is left.
fn without_h2c(value: &HeaderValue) -> Option<HeaderValue> {
    let text = value.to_str().ok()?;
    if !text.split(',').any(|p| p.trim().eq_ignore_ascii_case("h2c")) {
        return Some(value.clone());
    }
    let kept: Vec<&str> = text
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty() && !p.eq_ignore_ascii_case("h2c"))
        .collect();
    if kept.is_empty() {
        return None;
    }
    HeaderValue::from_str(&kept.join(", ")).ok()
}

/// Puts back the two headers an upgrade needs on the next hop.
pub(crate) fn set_upgrade(headers: &mut HeaderMap, protocol: HeaderValue) {
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, protocol);
}

pub(crate) const REQUEST_ID: &str = "x-request-id";

/// Gives a request an `x-request-id` (a random UUID) unless it carries one, as Envoy does: the id
/// follows the request through retries and to the next hop, and ties its log lines and spans together.
pub(crate) fn ensure_request_id(headers: &mut HeaderMap) {
    if headers.get(REQUEST_ID).is_some_and(|id| !id.is_empty()) {
        return;
    }
    let id = uuid::Builder::from_random_bytes(rand::random()).into_uuid();
    let mut text = [0u8; uuid::fmt::Hyphenated::LENGTH];
    let text = id.hyphenated().encode_lower(&mut text);
    if let Ok(value) = HeaderValue::from_str(text) {
        headers.insert(REQUEST_ID, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn removes_standard_and_listed_headers() {
        let mut h = map(&[
            ("connection", "keep-alive, x-secret"),
            ("keep-alive", "timeout=5"),
            ("x-secret", "1"),
            ("transfer-encoding", "chunked"),
            ("proxy-connection", "keep-alive"),
            ("x-kept", "yes"),
            ("host", "a"),
        ]);
        assert_eq!(strip_hop_by_hop(&mut h, false), None);
        let names: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["x-kept", "host"]);
    }

    #[test]
    fn te_trailers_survives_only_when_asked() {
        let mut h = map(&[("te", "trailers")]);
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h.get("te").unwrap(), "trailers");
        let mut h = map(&[("te", "trailers")]);
        strip_hop_by_hop(&mut h, false);
        assert!(h.get("te").is_none());
        let mut h = map(&[("te", "gzip")]);
        strip_hop_by_hop(&mut h, true);
        assert!(h.get("te").is_none());
    }

    #[test]
    fn upgrade_is_reported() {
        let mut h = map(&[("connection", "Upgrade"), ("upgrade", "websocket")]);
        assert_eq!(strip_hop_by_hop(&mut h, false).unwrap(), "websocket");
        assert!(h.is_empty());
        // An Upgrade header that Connection does not name is not an upgrade request.
        let mut h = map(&[("upgrade", "websocket")]);
        assert_eq!(strip_hop_by_hop(&mut h, false), None);
    }

    #[test]
    fn h2c_is_never_an_upgrade() {
        let mut h = map(&[
            ("connection", "Upgrade, HTTP2-Settings"),
            ("upgrade", "h2c"),
            ("http2-settings", "AAMAAABkAAQAAP__"),
        ]);
        assert_eq!(strip_hop_by_hop(&mut h, false), None);
        assert!(h.is_empty(), "{h:?}");
        let mut h = map(&[("connection", "upgrade"), ("upgrade", "H2C, websocket")]);
        assert_eq!(strip_hop_by_hop(&mut h, false).unwrap(), "websocket");
    }

    #[test]
    fn a_request_id_is_kept_or_made_as_a_version_4_uuid() {
        let mut headers = HeaderMap::new();
        headers.insert("x-request-id", HeaderValue::from_static("from-the-caller"));
        ensure_request_id(&mut headers);
        assert_eq!(headers["x-request-id"], "from-the-caller");
        let mut ids = std::collections::HashSet::new();
        for _ in 0..100 {
            let mut headers = HeaderMap::new();
            headers.insert("x-request-id", HeaderValue::from_static(""));
            ensure_request_id(&mut headers);
            let id = headers["x-request-id"].to_str().unwrap().to_owned();
            let parsed = uuid::Uuid::parse_str(&id).unwrap();
            assert_eq!(parsed.get_version_num(), 4, "{id}");
            ids.insert(id);
        }
        assert_eq!(ids.len(), 100, "random ids");
    }
}
