//! A request's span: its kind, Envoy's name and attributes.

use http::Request;
use http::header;
use http::uri::Authority;
use opentelemetry::KeyValue;
use opentelemetry::trace::SpanKind;

use super::HttpContext;
use crate::HttpVersion;

/// The calling side's sidecar makes a client span, the called side's a server span.
pub(super) fn span_kind(ctx: &HttpContext) -> SpanKind {
    match ctx.peers.reporter {
        weft_telemetry::Reporter::source => SpanKind::Client,
        weft_telemetry::Reporter::destination => SpanKind::Server,
    }
}

/// The request's authority as the client wrote it (URI or `Host`).
fn authority_of<B>(req: &Request<B>) -> &str {
    req.uri()
        .authority()
        .map(Authority::as_str)
        .or_else(|| req.headers().get(header::HOST).and_then(|h| h.to_str().ok()))
        .unwrap_or("-")
}

/// `authority/path` (without the query), as Envoy names a request's span.
pub(super) fn span_name<B>(req: &Request<B>) -> String {
    format!("{}{}", authority_of(req), req.uri().path())
}

/// Envoy's span attributes for a request.
pub(super) fn request_attributes<B>(req: &Request<B>, ctx: &HttpContext) -> Vec<KeyValue> {
    let text = |name: header::HeaderName| {
        req.headers()
            .get(name)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .unwrap_or_else(|| "-".to_owned())
    };
    let mut attributes = vec![
        KeyValue::new("http.method", req.method().as_str().to_owned()),
        KeyValue::new(
            "http.url",
            format!(
                "http://{}{}",
                authority_of(req),
                req.uri().path_and_query().map_or("/", |p| p.as_str())
            ),
        ),
        KeyValue::new(
            "http.protocol",
            match ctx.version {
                HttpVersion::Http1 => "HTTP/1.1",
                HttpVersion::Http2 => "HTTP/2",
            },
        ),
        KeyValue::new("user_agent", text(header::USER_AGENT)),
        KeyValue::new(
            "guid:x-request-id",
            text(header::HeaderName::from_static("x-request-id")),
        ),
        KeyValue::new("component", "proxy"),
    ];
    if let Some(source) = ctx.source {
        attributes.push(KeyValue::new("peer.address", source.ip().to_string()));
    }
    if let Some(peer) = &ctx.peer_identity {
        attributes.push(KeyValue::new("peer.identity", peer.to_string()));
    }
    attributes
}
