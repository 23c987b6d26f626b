//! What the proxy answers itself when it cannot forward a request: Envoy's status, flags and body text,
//! or a trailers-only gRPC status.

use http::header::{self, HeaderValue};
use http::{Response, StatusCode};
use weft_telemetry::{GrpcStatus, ResponseFlags};

use super::Facts;
use crate::body::Completion;
use crate::{ProxyBody, UpstreamError};

/// The answer for a request the proxy could not forward: Envoy's status, flags and text, or for gRPC a
/// trailers-only response whose `grpc-status` says the same.
pub(super) fn error_response(
    err: UpstreamError,
    grpc: bool,
    extra: ResponseFlags,
    completion: impl FnOnce(StatusCode, ResponseFlags) -> Completion,
    facts: &mut Facts,
) -> Response<ProxyBody> {
    let reply = err.reply();
    facts.details = Some(reply.details);
    if facts.logged
        && let UpstreamError::Connect(cause) = &err
    {
        facts.transport_failure = Some(error_chain(cause.as_ref()));
    }
    let flags = reply.flags | extra;
    if grpc {
        let mut completion = completion(StatusCode::OK, flags);
        completion.labels.grpc_response_status = GrpcStatus(Some(reply.grpc_status));
        let mut response = Response::new(ProxyBody::local("", Some(completion)));
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        headers.insert("grpc-status", HeaderValue::from(reply.grpc_status));
        headers.insert("grpc-message", HeaderValue::from_static(reply.body));
        return response;
    }
    let body = ProxyBody::local(reply.body, Some(completion(reply.status, flags)));
    local_response(reply.status, body)
}

pub(super) fn bad_request(
    completion: impl FnOnce(StatusCode, ResponseFlags) -> Completion,
) -> Response<ProxyBody> {
    let status = StatusCode::BAD_REQUEST;
    let body = ProxyBody::local(
        "bad request",
        Some(completion(status, ResponseFlags::DOWNSTREAM_PROTOCOL_ERROR)),
    );
    local_response(status, body)
}

fn local_response(status: StatusCode, body: ProxyBody) -> Response<ProxyBody> {
    let mut response = Response::new(body);
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    response
}

/// An error and its causes on one line, for the access log's `%UPSTREAM_TRANSPORT_FAILURE_REASON%`.
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
