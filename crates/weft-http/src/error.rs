//! Why a request could not be forwarded, and what the client is told: one place maps each cause to the
//! status code, Envoy response flag and body text users know from Envoy.

use std::error::Error as _;

use http::StatusCode;
use weft_telemetry::ResponseFlags;

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("no healthy upstream")]
    NoHealthyUpstream,
    #[error("no route matched the request")]
    NoRoute,
    #[error("route names cluster \"{0}\", which does not exist")]
    NoCluster(String),
    #[error("upstream request timeout after {0:?}")]
    Timeout(std::time::Duration),
    #[error("no response data for the stream idle timeout")]
    StreamIdle,
    #[error("a circuit breaker of the cluster is open")]
    Overflow,
    #[error("upstream connect error: {0}")]
    Connect(#[source] hyper_util::client::legacy::Error),
    #[error("upstream protocol error: {0}")]
    Protocol(#[source] hyper_util::client::legacy::Error),
    #[error("upstream connection terminated before the response: {0}")]
    Terminated(#[source] hyper_util::client::legacy::Error),
    /// The client's own request was at fault (a request body that broke off or had bad framing, a
    /// duplicate or conflicting Host): answered 400 and never held against an endpoint.
    #[error("malformed request from the client: {0}")]
    BadRequest(&'static str),
    /// An authorization policy denied the request.
    #[error("denied by authorization policy")]
    Forbidden,
}

impl UpstreamError {
    pub(crate) fn from_client(err: hyper_util::client::legacy::Error) -> Self {
        if err.is_connect() {
            return Self::Connect(err);
        }
        let parse_error = err
            .source()
            .and_then(|s| s.downcast_ref::<hyper::Error>())
            .is_some_and(|e| e.is_parse() || e.is_parse_status());
        if parse_error {
            Self::Protocol(err)
        } else {
            Self::Terminated(err)
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::Protocol(_) => StatusCode::BAD_GATEWAY,
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::Forbidden => StatusCode::FORBIDDEN,
            Self::NoRoute => StatusCode::NOT_FOUND,
            Self::Timeout(_) | Self::StreamIdle => StatusCode::GATEWAY_TIMEOUT,
            _ => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    pub fn flags(&self) -> ResponseFlags {
        match self {
            Self::NoHealthyUpstream => ResponseFlags::NO_HEALTHY_UPSTREAM,
            Self::NoRoute => ResponseFlags::NO_ROUTE,
            Self::NoCluster(_) => ResponseFlags::NO_CLUSTER,
            Self::Timeout(_) => ResponseFlags::UPSTREAM_TIMEOUT,
            Self::StreamIdle => ResponseFlags::STREAM_IDLE_TIMEOUT,
            Self::Overflow => ResponseFlags::UPSTREAM_OVERFLOW,
            Self::Connect(_) => ResponseFlags::UPSTREAM_CONNECT_FAILURE,
            Self::Protocol(_) => ResponseFlags::UPSTREAM_PROTOCOL_ERROR,
            Self::Terminated(_) => ResponseFlags::UPSTREAM_CONNECTION_TERMINATION,
            Self::BadRequest(_) => ResponseFlags::DOWNSTREAM_PROTOCOL_ERROR,
            Self::Forbidden => ResponseFlags::RBAC_DENIED,
        }
    }

    /// The response body, worded as Envoy words it so that users' searches find the right answers.
    pub fn body(&self) -> &'static str {
        match self {
            Self::NoHealthyUpstream => "no healthy upstream",
            Self::NoRoute => "no route",
            Self::NoCluster(_) => "cluster not found",
            Self::Timeout(_) => "upstream request timeout",
            Self::StreamIdle => "stream timeout",
            Self::Overflow => {
                "upstream connect error or disconnect/reset before headers. reset reason: overflow"
            }
            Self::Connect(_) => {
                "upstream connect error or disconnect/reset before headers. reset reason: connection failure"
            }
            Self::Protocol(_) => {
                "upstream connect error or disconnect/reset before headers. reset reason: protocol error"
            }
            Self::Terminated(_) => {
                "upstream connect error or disconnect/reset before headers. reset reason: connection termination"
            }
            Self::BadRequest(_) => "bad request",
            // Envoy's RBAC filter's words, which users search for.
            Self::Forbidden => "RBAC: access denied",
        }
    }

    /// The gRPC status a gRPC client is told (Envoy's mapping from the HTTP status; a timeout is the
    /// client's deadline passing).
    pub fn grpc_status(&self) -> u16 {
        match self {
            Self::Timeout(_) | Self::StreamIdle => 4,      // DEADLINE_EXCEEDED
            Self::NoRoute => 12,                           // UNIMPLEMENTED
            Self::Protocol(_) | Self::BadRequest(_) => 13, // INTERNAL
            Self::Forbidden => 7,                          // PERMISSION_DENIED
            _ => 14,                                       // UNAVAILABLE
        }
    }

    /// An HTTP/2 upstream refused the stream: it never saw the request.
    pub(crate) fn is_refused_stream(&self) -> bool {
        let (Self::Terminated(err) | Self::Protocol(err)) = self else {
            return false;
        };
        let mut source = err.source();
        while let Some(cause) = source {
            if let Some(h2) = cause.downcast_ref::<h2::Error>() {
                return h2.reason() == Some(h2::Reason::REFUSED_STREAM);
            }
            source = cause.source();
        }
        false
    }
}
