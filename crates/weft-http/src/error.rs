//! Why a request could not be forwarded, and what the client is told: one place maps each cause to the
//! status code, Envoy response flag and body text users know from Envoy.

use std::error::Error as _;

use http::StatusCode;
use weft_telemetry::ResponseFlags;

use crate::retry::TryOutcome;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Envoy's words for a request that failed before the response began.
macro_rules! reset {
    ($reason:literal) => {
        concat!(
            "upstream connect error or disconnect/reset before headers. reset reason: ",
            $reason
        )
    };
}

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
    Connect(#[source] BoxError),
    #[error("upstream protocol error: {0}")]
    Protocol(#[source] BoxError),
    #[error("upstream connection terminated before the response: {0}")]
    Terminated(#[source] BoxError),
    /// The client's own request was at fault (a request body that broke off or had bad framing, a
    /// duplicate or conflicting Host): answered 400 and never held against an endpoint.
    #[error("malformed request from the client: {0}")]
    BadRequest(&'static str),
    /// The client had not sent its whole request when the listener's request timeout passed.
    #[error("the request did not arrive within the request timeout")]
    RequestTimeout,
    /// An authorization policy denied the request.
    #[error("denied by authorization policy")]
    Forbidden,
}

impl UpstreamError {
    pub(crate) fn from_client(err: hyper_util::client::legacy::Error) -> Self {
        if err.is_connect() {
            return Self::Connect(Box::new(err));
        }
        let parse_error = err
            .source()
            .and_then(|s| s.downcast_ref::<hyper::Error>())
            .is_some_and(|e| e.is_parse() || e.is_parse_status());
        if parse_error {
            Self::Protocol(Box::new(err))
        } else {
            Self::Terminated(Box::new(err))
        }
    }

    /// Where the failure came from: what outlier detection may hold against an endpoint, and what
    /// the access log blames.
    pub fn origin(&self) -> Origin {
        match self {
            Self::BadRequest(_) | Self::RequestTimeout => Origin::Downstream,
            Self::NoRoute
            | Self::NoCluster(_)
            | Self::Forbidden
            | Self::Overflow
            | Self::NoHealthyUpstream => Origin::Proxy,
            Self::Timeout(_)
            | Self::StreamIdle
            | Self::Connect(_)
            | Self::Protocol(_)
            | Self::Terminated(_) => Origin::Upstream,
        }
    }

    /// How a retry policy sees this failure of a try.
    pub(crate) fn try_outcome(&self) -> TryOutcome<'static> {
        match self {
            Self::Connect(_) => TryOutcome::ConnectFailure,
            Self::Timeout(_) => TryOutcome::PerTryTimeout,
            _ if self.is_refused_stream() => TryOutcome::RefusedStream,
            _ => TryOutcome::Reset,
        }
    }

    /// What the client is told: the one mapping from a cause to Envoy's status, response flag and body
    /// text (worded as Envoy words them, so that users' searches find the right answers) and the gRPC
    /// status a gRPC client gets instead (Envoy's mapping; a timeout is the client's deadline passing).
    pub fn reply(&self) -> LocalReply {
        let (status, flags, body, grpc_status, details) = match self {
            Self::NoHealthyUpstream => (
                503,
                ResponseFlags::NO_HEALTHY_UPSTREAM,
                "no healthy upstream",
                14,
                "no_healthy_upstream",
            ),
            Self::NoRoute => (404, ResponseFlags::NO_ROUTE, "no route", 12, "route_not_found"),
            Self::NoCluster(_) => (
                503,
                ResponseFlags::NO_CLUSTER,
                "cluster not found",
                14,
                "cluster_not_found",
            ),
            Self::Timeout(_) => (
                504,
                ResponseFlags::UPSTREAM_TIMEOUT,
                "upstream request timeout",
                4,
                "upstream_response_timeout",
            ),
            Self::StreamIdle => (
                504,
                ResponseFlags::STREAM_IDLE_TIMEOUT,
                "stream timeout",
                4,
                "stream_idle_timeout",
            ),
            Self::Overflow => (
                503,
                ResponseFlags::UPSTREAM_OVERFLOW,
                reset!("overflow"),
                14,
                "upstream_reset_before_response_started{overflow}",
            ),
            Self::Connect(_) => (
                503,
                ResponseFlags::UPSTREAM_CONNECT_FAILURE,
                reset!("connection failure"),
                14,
                "upstream_reset_before_response_started{connection_failure}",
            ),
            Self::Protocol(_) => (
                502,
                ResponseFlags::UPSTREAM_PROTOCOL_ERROR,
                reset!("protocol error"),
                13,
                "upstream_reset_before_response_started{protocol_error}",
            ),
            Self::Terminated(_) => (
                503,
                ResponseFlags::UPSTREAM_CONNECTION_TERMINATION,
                reset!("connection termination"),
                14,
                "upstream_reset_before_response_started{connection_termination}",
            ),
            Self::BadRequest(_) => (
                400,
                ResponseFlags::DOWNSTREAM_PROTOCOL_ERROR,
                "bad request",
                13,
                "bad_request",
            ),
            Self::RequestTimeout => (
                408,
                ResponseFlags::NONE,
                "request timeout",
                4,
                "request_overall_timeout",
            ),
            // Envoy's RBAC filter's words, which users search for.
            Self::Forbidden => (
                403,
                ResponseFlags::RBAC_DENIED,
                "RBAC: access denied",
                7,
                "rbac_access_denied",
            ),
        };
        LocalReply {
            status: StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
            flags,
            body,
            grpc_status,
            details,
        }
    }

    /// An HTTP/2 upstream refused the stream: it never saw the request.
    pub(crate) fn is_refused_stream(&self) -> bool {
        let (Self::Terminated(err) | Self::Protocol(err)) = self else {
            return false;
        };
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err.as_ref());
        while let Some(cause) = source {
            if let Some(h2) = cause.downcast_ref::<h2::Error>() {
                return h2.reason() == Some(h2::Reason::REFUSED_STREAM);
            }
            source = cause.source();
        }
        false
    }
}

/// Where a failure came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// The client's request was at fault; never held against an endpoint.
    Downstream,
    /// The endpoint, or the way to it, failed.
    Upstream,
    /// The proxy decided not to forward (no route, policy, breakers, no endpoint).
    Proxy,
}

/// A reply the proxy writes itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalReply {
    pub status: StatusCode,
    pub flags: ResponseFlags,
    pub body: &'static str,
    /// `grpc-status` for a gRPC client (answered as a trailers-only response).
    pub grpc_status: u16,
    /// Envoy's `%RESPONSE_CODE_DETAILS%` for it.
    pub details: &'static str,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_cause_has_envoys_status_flag_words_and_grpc_status() {
        let cases = [
            (
                UpstreamError::NoHealthyUpstream,
                503,
                "UH",
                "no healthy upstream",
                14,
                Origin::Proxy,
            ),
            (UpstreamError::NoRoute, 404, "NR", "no route", 12, Origin::Proxy),
            (
                UpstreamError::NoCluster("c".into()),
                503,
                "NC",
                "cluster not found",
                14,
                Origin::Proxy,
            ),
            (
                UpstreamError::Timeout(std::time::Duration::from_secs(1)),
                504,
                "UT",
                "upstream request timeout",
                4,
                Origin::Upstream,
            ),
            (
                UpstreamError::StreamIdle,
                504,
                "SI",
                "stream timeout",
                4,
                Origin::Upstream,
            ),
            (
                UpstreamError::Overflow,
                503,
                "UO",
                "upstream connect error or disconnect/reset before headers. reset reason: overflow",
                14,
                Origin::Proxy,
            ),
            (
                UpstreamError::BadRequest("x"),
                400,
                "DPE",
                "bad request",
                13,
                Origin::Downstream,
            ),
            (
                UpstreamError::RequestTimeout,
                408,
                "-",
                "request timeout",
                4,
                Origin::Downstream,
            ),
            (
                UpstreamError::Forbidden,
                403,
                "RBAC",
                "RBAC: access denied",
                7,
                Origin::Proxy,
            ),
        ];
        for (err, status, flag, body, grpc, origin) in cases {
            let reply = err.reply();
            assert_eq!(reply.status.as_u16(), status, "{err}");
            assert_eq!(reply.flags.to_string(), flag, "{err}");
            assert_eq!(reply.body, body, "{err}");
            assert_eq!(reply.grpc_status, grpc, "{err}");
            assert_eq!(err.origin(), origin, "{err}");
        }
    }
}
