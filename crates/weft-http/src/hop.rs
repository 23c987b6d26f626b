//! The upstream hop of a request: its one authority, and its protocol. Towards a mesh cluster that
//! upgrades (`tls.http2_upgrade`, Istio's `h2UpgradePolicy: UPGRADE`) an HTTP/1 request travels as
//! HTTP/2 over the pool's multiplexed connection, marked with the version it came in with, and the
//! peer's sidecar gives its app the HTTP/1 request it would have seen (Linkerd's transparent upgrade).
//! Upgrades (WebSocket) stay HTTP/1 end to end, and nothing is upgraded outside the mesh.

use std::net::SocketAddr;

use http::header::{self, HeaderMap, HeaderValue};
use http::uri::Authority;
use weft_telemetry::ConnectionSecurity;

use crate::{HttpVersion, UpstreamError};

/// The version an upgraded HTTP/1 request came in with. Believed only on HTTP/2 from a peer that
/// proved its identity; any other client's is removed.
pub(crate) const ORIG_PROTO: &str = "weft-orig-proto";

/// What decides the upstream protocol of one request.
pub(crate) struct Hop {
    /// The client's protocol.
    pub(crate) downstream: HttpVersion,
    /// The client connection is mutual TLS from a mesh peer.
    pub(crate) from_peer: bool,
    /// The upstream is a mesh peer (mutual TLS).
    pub(crate) to_peer: bool,
    /// The request asks for an HTTP/1 upgrade.
    pub(crate) upgrade: bool,
    /// The request's own version (HTTP/1.0 or HTTP/1.1 for HTTP/1 clients).
    pub(crate) version: http::Version,
}

impl Hop {
    pub(crate) fn from_peer(security: ConnectionSecurity) -> bool {
        security == ConnectionSecurity::mutual_tls
    }

    /// The upstream protocol; leaves the mark in `headers` exactly when the next hop is to restore
    /// HTTP/1.
    pub(crate) fn upstream(&self, headers: &mut HeaderMap) -> HttpVersion {
        let mark = headers.remove(ORIG_PROTO);
        let restore = match mark {
            Some(v) if self.from_peer && self.downstream == HttpVersion::Http2 => original(&v),
            _ => None,
        };
        if self.to_peer {
            let carried = match (self.downstream, restore) {
                (HttpVersion::Http1, _) if !self.upgrade => Some(if self.version == http::Version::HTTP_10 {
                    "HTTP/1.0"
                } else {
                    "HTTP/1.1"
                }),
                (HttpVersion::Http2, Some(v)) => Some(v),
                _ => None,
            };
            if let Some(v) = carried {
                headers.insert(ORIG_PROTO, HeaderValue::from_static(v));
                return HttpVersion::Http2;
            }
            return self.downstream;
        }
        if restore.is_some() {
            HttpVersion::Http1
        } else {
            self.downstream
        }
    }
}

fn original(mark: &HeaderValue) -> Option<&'static str> {
    match mark.as_bytes() {
        b"HTTP/1.1" => Some("HTTP/1.1"),
        b"HTTP/1.0" => Some("HTTP/1.0"),
        _ => None,
    }
}

/// The one authority of a request, which routing, authorization and the app all see: the URI's
/// (absolute-form, which replaces Host by RFC 9112 §3.2.2, or HTTP/2's `:authority`), then Host, then the
/// address the client dialled (HTTP/1.0 clients may send no Host); [`set_authority`] then leaves the
/// request carrying exactly that authority. Two Host headers, a Host that is not an authority, or one
/// that contradicts `:authority` are the client's error.
pub(crate) fn request_authority(
    parts: &mut http::request::Parts,
    version: HttpVersion,
    orig_dst: SocketAddr,
) -> Result<Authority, UpstreamError> {
    let mut hosts = parts.headers.get_all(header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err(UpstreamError::BadRequest("more than one Host header"));
    }
    let host = host
        .map(|h| Authority::try_from(h.as_bytes()))
        .transpose()
        .map_err(|_| UpstreamError::BadRequest("the Host header is not a valid authority"))?;
    let uri_authority = parts.uri.authority().cloned();
    if let (HttpVersion::Http2, Some(uri), Some(host)) = (version, &uri_authority, &host)
        && !uri.as_str().eq_ignore_ascii_case(host.as_str())
    {
        return Err(UpstreamError::BadRequest("Host and :authority differ"));
    }
    let authority = uri_authority
        .or(host)
        .or_else(|| Authority::try_from(orig_dst.to_string()).ok())
        .unwrap_or_else(|| Authority::from_static("localhost"));
    if authority.as_str().contains('@') {
        return Err(UpstreamError::BadRequest("an authority with user information"));
    }
    Ok(authority)
}

/// Leaves the request carrying exactly its authority for the upstream protocol: as Host for HTTP/1,
/// as `:authority` alone (from the URI) for HTTP/2.
pub(crate) fn set_authority(
    headers: &mut HeaderMap,
    authority: &Authority,
    upstream: HttpVersion,
) -> Result<(), UpstreamError> {
    match upstream {
        HttpVersion::Http1 => {
            let host = HeaderValue::from_str(authority.as_str())
                .map_err(|_| UpstreamError::BadRequest("the authority is not a valid header value"))?;
            headers.insert(header::HOST, host);
        }
        HttpVersion::Http2 => {
            headers.remove(header::HOST);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hop(downstream: HttpVersion, from_peer: bool, to_peer: bool, upgrade: bool) -> Hop {
        Hop {
            downstream,
            from_peer,
            to_peer,
            upgrade,
            version: match downstream {
                HttpVersion::Http1 => http::Version::HTTP_11,
                HttpVersion::Http2 => http::Version::HTTP_2,
            },
        }
    }

    fn marked(v: &'static str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(ORIG_PROTO, HeaderValue::from_static(v));
        h
    }

    #[test]
    fn http1_to_a_peer_travels_as_marked_http2_and_is_restored_for_the_app() {
        let mut headers = HeaderMap::new();
        let client_side = hop(HttpVersion::Http1, false, true, false);
        assert_eq!(client_side.upstream(&mut headers), HttpVersion::Http2);
        assert_eq!(headers[ORIG_PROTO], "HTTP/1.1");
        let server_side = hop(HttpVersion::Http2, true, false, false);
        assert_eq!(server_side.upstream(&mut headers), HttpVersion::Http1);
        assert!(headers.get(ORIG_PROTO).is_none(), "the app never sees the mark");
    }

    #[test]
    fn the_mark_is_believed_only_from_a_peer_and_upgrades_stay_http1() {
        // A plaintext HTTP/2 client cannot make the proxy downgrade its request.
        let mut headers = marked("HTTP/1.1");
        assert_eq!(
            hop(HttpVersion::Http2, false, false, false).upstream(&mut headers),
            HttpVersion::Http2
        );
        assert!(headers.get(ORIG_PROTO).is_none(), "an untrusted mark is removed");
        // An app's own mark on HTTP/1 is dropped, and the request is marked afresh.
        let mut headers = marked("HTTP/1.0");
        assert_eq!(
            hop(HttpVersion::Http1, false, true, false).upstream(&mut headers),
            HttpVersion::Http2
        );
        assert_eq!(headers[ORIG_PROTO], "HTTP/1.1");
        // A WebSocket upgrade is HTTP/1 on every hop.
        let mut headers = HeaderMap::new();
        assert_eq!(
            hop(HttpVersion::Http1, false, true, true).upstream(&mut headers),
            HttpVersion::Http1
        );
        assert!(headers.get(ORIG_PROTO).is_none());
        // Nothing is upgraded towards a destination outside the mesh.
        assert_eq!(
            hop(HttpVersion::Http1, false, false, false).upstream(&mut HeaderMap::new()),
            HttpVersion::Http1
        );
        // A gateway between two peers keeps the mark for the next one; a bogus mark is ignored.
        let mut headers = marked("HTTP/1.1");
        assert_eq!(
            hop(HttpVersion::Http2, true, true, false).upstream(&mut headers),
            HttpVersion::Http2
        );
        assert_eq!(headers[ORIG_PROTO], "HTTP/1.1");
        let mut headers = marked("HTTP/9");
        assert_eq!(
            hop(HttpVersion::Http2, true, false, false).upstream(&mut headers),
            HttpVersion::Http2
        );
    }
}
