//! What retrying needs: which outcomes a policy retries ([`retriable`]), how long to wait before the
//! next try ([`backoff`]), and a request body that can be sent again ([`RequestBody`]).

use std::error::Error as StdError;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use weft_model::{RetryOn, RetryPolicy};

/// Request bodies up to this size are kept for a retry; a larger one is streamed and not retried
/// (Linkerd's bound: enough for typical API calls, small enough to keep a sidecar's memory flat).
pub const MAX_REPLAY_BYTES: usize = 64 * 1024;

pub(crate) type BoxError = Box<dyn StdError + Send + Sync>;

/// How a try ended, for deciding on a retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TryOutcome<'a> {
    Response(StatusCode, &'a HeaderMap),
    ConnectFailure,
    /// The connection closed or was reset before the response began.
    Reset,
    RefusedStream,
    PerTryTimeout,
}

/// Whether `policy` retries `outcome` (Envoy's `retry_on` semantics).
pub(crate) fn retriable(policy: &RetryPolicy, outcome: TryOutcome<'_>) -> bool {
    let on = policy.retry_on;
    let any_failure = RetryOn::SERVER_ERROR
        .union(RetryOn::GATEWAY_ERROR)
        .union(RetryOn::RESET);
    match outcome {
        TryOutcome::ConnectFailure => on.intersects(any_failure.union(RetryOn::CONNECT_FAILURE)),
        TryOutcome::RefusedStream => on.intersects(any_failure.union(RetryOn::REFUSED_STREAM)),
        TryOutcome::Reset | TryOutcome::PerTryTimeout => on.intersects(any_failure),
        TryOutcome::Response(status, headers) => {
            let code = status.as_u16();
            (on.contains(RetryOn::SERVER_ERROR) && status.is_server_error())
                || (on.contains(RetryOn::GATEWAY_ERROR) && matches!(code, 502..=504))
                || (on.contains(RetryOn::RETRIABLE_4XX) && code == 409)
                || (on.contains(RetryOn::RETRIABLE_STATUS_CODES)
                    && policy.retriable_status_codes.contains(&code))
                || (on.contains(RetryOn::ENVOY_RATELIMITED) && headers.contains_key("x-envoy-ratelimited"))
                || grpc_retriable(on, headers)
        }
    }
}

/// gRPC statuses are retried when they arrive in the response headers (a trailers-only response): a
/// status in the trailers comes after a body that may already be with the client.
fn grpc_retriable(on: RetryOn, headers: &HeaderMap) -> bool {
    let Some(status) = headers.get("grpc-status").and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let flag = match status {
        "1" => RetryOn::GRPC_CANCELLED,
        "4" => RetryOn::GRPC_DEADLINE_EXCEEDED,
        "8" => RetryOn::GRPC_RESOURCE_EXHAUSTED,
        "13" => RetryOn::GRPC_INTERNAL,
        "14" => RetryOn::GRPC_UNAVAILABLE,
        _ => return false,
    };
    on.contains(flag)
}

/// The wait before retry `n` (from 1): fully jittered, up to the policy's ceiling for that retry.
pub(crate) fn backoff(policy: &RetryPolicy, retry: u32) -> Duration {
    let ceiling = policy.backoff.ceiling(retry);
    let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
    Duration::from_nanos(rand::random_range(0..=nanos))
}

/// A gRPC client's deadline (`grpc-timeout`: up to 8 digits and a unit, `H M S m u n`).
pub(crate) fn grpc_timeout(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get("grpc-timeout")?.to_str().ok()?;
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The client's request body. It remembers when the client broke it (bad chunked framing, a reset
/// stream), so that the failed try is the client's fault, never the endpoint's.
#[derive(Debug)]
pub(crate) struct ClientBody {
    inner: Incoming,
    broken: Arc<AtomicBool>,
}

impl ClientBody {
    /// The body, and a flag that turns true if reading it from the client fails.
    pub(crate) fn new(inner: Incoming) -> (Self, Arc<AtomicBool>) {
        let broken = Arc::new(AtomicBool::new(false));
        (
            Self {
                inner,
                broken: broken.clone(),
            },
            broken,
        )
    }
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Err(_))) = &polled {
            self.broken.store(true, Ordering::Relaxed);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A request body as sent upstream: the client's, passed through, or one that keeps what it has sent
/// (up to [`MAX_REPLAY_BYTES`]) so that a retry can send it again.
#[derive(Debug)]
pub(crate) enum RequestBody {
    Streamed(ClientBody),
    Replay(ReplayBody),
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            RequestBody::Streamed(body) => Pin::new(body).poll_frame(cx).map_err(Into::into),
            RequestBody::Replay(body) => Pin::new(body).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Streamed(body) => body.is_end_stream(),
            RequestBody::Replay(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::Streamed(body) => body.size_hint(),
            RequestBody::Replay(body) => body.hint,
        }
    }
}

/// One reading of a replayable body. Every reading sees the same frames in the same order: a frame
/// pulled from the client by any reading is logged, and later readings replay the log before reading on.
#[derive(Debug)]
pub(crate) struct ReplayBody {
    shared: Arc<Mutex<Shared>>,
    /// Index of the next data frame this reading returns.
    next: usize,
    trailers_sent: bool,
    hint: SizeHint,
    empty: bool,
}

#[derive(Debug)]
struct Shared {
    source: ClientBody,
    log: Vec<Bytes>,
    logged_bytes: usize,
    /// Data frames pulled from the client so far.
    pulled: usize,
    trailers: Option<HeaderMap>,
    ended: bool,
    /// Too large to keep, or the client's body failed: no more readings.
    unreplayable: bool,
}

impl ReplayBody {
    pub(crate) fn new(source: ClientBody) -> Self {
        let hint = source.size_hint();
        let empty = source.is_end_stream();
        let unreplayable = hint.lower() > MAX_REPLAY_BYTES as u64;
        Self {
            shared: Arc::new(Mutex::new(Shared {
                source,
                log: Vec::new(),
                logged_bytes: 0,
                pulled: 0,
                trailers: None,
                ended: empty,
                unreplayable,
            })),
            next: 0,
            trailers_sent: false,
            hint,
            empty,
        }
    }

    /// A new reading from the start, or `None` when the body cannot be sent again.
    pub(crate) fn replay(&self) -> Option<Self> {
        let shared = self.shared.lock().unwrap_or_else(|p| p.into_inner());
        if shared.unreplayable {
            return None;
        }
        Some(Self {
            shared: self.shared.clone(),
            next: 0,
            trailers_sent: false,
            hint: self.hint,
            empty: self.empty,
        })
    }
}

#[derive(Debug, thiserror::Error)]
#[error("the request body was too large to keep for a retry")]
struct ReplayOverflow;

impl Body for ReplayBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let mut shared = this.shared.lock().unwrap_or_else(|p| p.into_inner());
        if this.next < shared.pulled {
            let Some(chunk) = shared.log.get(this.next).cloned() else {
                return Poll::Ready(Some(Err(ReplayOverflow.into())));
            };
            this.next += 1;
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
        if shared.ended {
            if !this.trailers_sent
                && let Some(trailers) = shared.trailers.clone()
            {
                this.trailers_sent = true;
                return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
            }
            return Poll::Ready(None);
        }
        let frame = match Pin::new(&mut shared.source).poll_frame(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(None) => {
                shared.ended = true;
                return Poll::Ready(None);
            }
            Poll::Ready(Some(Err(err))) => {
                shared.unreplayable = true;
                return Poll::Ready(Some(Err(err.into())));
            }
            Poll::Ready(Some(Ok(frame))) => frame,
        };
        let frame = match frame.into_data() {
            Ok(data) => {
                shared.pulled += 1;
                this.next += 1;
                if !shared.unreplayable {
                    shared.logged_bytes += data.len();
                    if shared.logged_bytes > MAX_REPLAY_BYTES {
                        shared.unreplayable = true;
                        shared.log = Vec::new();
                    } else {
                        shared.log.push(data.clone());
                    }
                }
                Frame::data(data)
            }
            Err(frame) => {
                if let Some(trailers) = frame.trailers_ref() {
                    shared.trailers = Some(trailers.clone());
                    shared.ended = true;
                    this.trailers_sent = true;
                }
                frame
            }
        };
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.empty
    }

    fn size_hint(&self) -> SizeHint {
        self.hint
    }
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;
    use weft_model::Backoff;

    use super::*;

    fn policy(retry_on: &str, codes: &[u16]) -> RetryPolicy {
        RetryPolicy {
            retry_on: retry_on.parse().unwrap(),
            num_retries: 2,
            per_try_timeout: None,
            retriable_status_codes: codes.to_vec(),
            backoff: Backoff::default(),
        }
    }

    fn status(code: u16) -> StatusCode {
        StatusCode::from_u16(code).unwrap()
    }

    #[test]
    fn conditions_follow_envoy() {
        let none = HeaderMap::new();
        let fivexx = policy("5xx", &[]);
        assert!(retriable(&fivexx, TryOutcome::Response(status(500), &none)));
        assert!(retriable(&fivexx, TryOutcome::ConnectFailure));
        assert!(retriable(&fivexx, TryOutcome::PerTryTimeout));
        assert!(!retriable(&fivexx, TryOutcome::Response(status(404), &none)));

        let gateway = policy("gateway-error", &[]);
        assert!(retriable(&gateway, TryOutcome::Response(status(503), &none)));
        assert!(!retriable(&gateway, TryOutcome::Response(status(500), &none)));

        let connect = policy("connect-failure", &[]);
        assert!(retriable(&connect, TryOutcome::ConnectFailure));
        assert!(!retriable(&connect, TryOutcome::Reset));
        assert!(!retriable(&connect, TryOutcome::Response(status(503), &none)));

        let codes = policy("retriable-status-codes", &[503]);
        assert!(retriable(&codes, TryOutcome::Response(status(503), &none)));
        assert!(!retriable(&codes, TryOutcome::Response(status(502), &none)));
        assert!(retriable(
            &policy("retriable-4xx", &[]),
            TryOutcome::Response(status(409), &none)
        ));
        assert!(retriable(
            &policy("refused-stream", &[]),
            TryOutcome::RefusedStream
        ));

        let mut grpc = HeaderMap::new();
        grpc.insert("grpc-status", HeaderValue::from_static("14"));
        let unavailable = policy("unavailable", &[]);
        assert!(retriable(
            &unavailable,
            TryOutcome::Response(StatusCode::OK, &grpc)
        ));
        grpc.insert("grpc-status", HeaderValue::from_static("4"));
        assert!(!retriable(
            &unavailable,
            TryOutcome::Response(StatusCode::OK, &grpc)
        ));
        assert!(retriable(
            &policy("deadline-exceeded", &[]),
            TryOutcome::Response(StatusCode::OK, &grpc)
        ));
    }

    #[test]
    fn backoff_is_jittered_under_its_ceiling() {
        let p = policy("5xx", &[]);
        for retry in 1..6 {
            for _ in 0..50 {
                assert!(backoff(&p, retry) <= p.backoff.ceiling(retry));
            }
        }
    }

    #[test]
    fn grpc_timeouts_parse() {
        let mut h = HeaderMap::new();
        for (value, expected) in [
            ("100m", Some(Duration::from_millis(100))),
            ("2S", Some(Duration::from_secs(2))),
            ("1H", Some(Duration::from_secs(3600))),
            ("5u", Some(Duration::from_micros(5))),
            ("123456789S", None),
            ("10x", None),
            ("S", None),
        ] {
            h.insert("grpc-timeout", HeaderValue::from_static(value));
            assert_eq!(grpc_timeout(&h), expected, "{value}");
        }
    }
}
