//! The response body the proxy sends downstream: the upstream's, streamed frame by frame, or one the
//! proxy wrote itself. Request metrics and the access-log entry are recorded when the body ends, so
//! durations cover the whole response, as Istio's do.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use crate::pool::UpstreamBody;
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use tokio::time::Sleep;
use weft_telemetry::access_log::{AccessLogs, Entry};
use weft_telemetry::tap::{TapFacts, Taps};
use weft_telemetry::traces::RequestSpan;
use weft_telemetry::{Metrics, RequestLabels, ResponseFlags};

use crate::replay::BoxError;

#[derive(Debug)]
pub struct ProxyBody {
    kind: Kind,
    completion: Option<Completion>,
    timer: Option<BodyTimer>,
    /// Whatever must live as long as the response: the cluster's request counts, the endpoint's active
    /// request, the connection slot.
    _held: Option<InFlight>,
    /// Counts the request as in flight on its client connection (idle timeout) until the body ends.
    request: Option<weft_transport::InFlight>,
    /// Body bytes sent so far.
    sent: u64,
    /// A gRPC response's messages, counted as they pass.
    messages: Option<GrpcMessages>,
}

/// Counts the gRPC messages that begin in a stream of data however it is split: each message is a
/// 5-byte prefix (compressed flag, 32-bit length) and that many bytes.
#[derive(Debug, Default)]
pub(crate) struct GrpcMessages {
    begun: u64,
    /// Prefix bytes of the next message seen so far.
    prefix: [u8; 5],
    prefix_len: usize,
    /// Bytes of the current message still to pass.
    remaining: u64,
}

impl GrpcMessages {
    /// Reads `data`; returns how many messages began in it.
    pub(crate) fn begun_in(&mut self, mut data: &[u8]) -> u64 {
        let before = self.begun;
        while !data.is_empty() {
            if self.remaining > 0 {
                let n = self.remaining.min(data.len() as u64);
                self.remaining -= n;
                data = &data[n as usize..];
                continue;
            }
            let n = (5 - self.prefix_len).min(data.len());
            self.prefix[self.prefix_len..self.prefix_len + n].copy_from_slice(&data[..n]);
            self.prefix_len += n;
            data = &data[n..];
            if self.prefix_len == 5 {
                self.begun += 1;
                self.prefix_len = 0;
                let [_, a, b, c, d] = self.prefix;
                self.remaining = u64::from(u32::from_be_bytes([a, b, c, d]));
            }
        }
        self.begun - before
    }

    pub(crate) fn count(&self) -> u64 {
        self.begun
    }
}

/// What a response in progress holds in its cluster.
#[derive(Debug, Default)]
pub(crate) struct InFlight {
    pub(crate) admission: Option<weft_balance::Admission>,
    pub(crate) endpoint: Option<weft_balance::EndpointGuard>,
    pub(crate) connection: Option<weft_balance::ConnectionSlot>,
    pub(crate) retry: Option<weft_balance::RetryPermit>,
    /// The stream's place on its upstream HTTP/2 connection.
    pub(crate) stream: Option<Arc<crate::pool::StreamSlot>>,
}

/// The route timeout (covering the whole response, as Envoy's does) and the stream idle timeout (no
/// frame for this long), on a response body.
#[derive(Debug)]
pub(crate) struct BodyTimer {
    deadline: Option<Instant>,
    idle: Option<Duration>,
    last_frame: Instant,
    sleep: Pin<Box<Sleep>>,
    /// A gRPC response ends with a status in trailers when a timeout passes, rather than a reset.
    grpc: bool,
}

impl BodyTimer {
    pub(crate) fn new(deadline: Option<Instant>, idle: Option<Duration>) -> Option<Self> {
        let now = Instant::now();
        let first = Self::next_fire(deadline, idle, now)?;
        Some(Self {
            deadline,
            idle,
            last_frame: now,
            sleep: Box::pin(tokio::time::sleep_until(first.into())),
            grpc: false,
        })
    }

    /// Ends a gRPC response with `grpc-status` when a timeout passes.
    pub(crate) fn for_grpc(mut self) -> Self {
        self.grpc = true;
        self
    }

    fn next_fire(deadline: Option<Instant>, idle: Option<Duration>, last_frame: Instant) -> Option<Instant> {
        match (deadline, idle.map(|i| last_frame + i)) {
            (Some(d), Some(i)) => Some(d.min(i)),
            (d, i) => d.or(i),
        }
    }

    /// `Some(flags)` when a timeout has passed. Re-arms itself otherwise, without resetting the timer
    /// on every frame.
    fn poll_expired(&mut self, cx: &mut Context<'_>) -> Option<ResponseFlags> {
        loop {
            if self.sleep.as_mut().poll(cx).is_pending() {
                return None;
            }
            let now = Instant::now();
            if self.deadline.is_some_and(|d| d <= now) {
                return Some(ResponseFlags::UPSTREAM_TIMEOUT);
            }
            if self.idle.is_some_and(|i| self.last_frame + i <= now) {
                return Some(ResponseFlags::STREAM_IDLE_TIMEOUT);
            }
            let next = Self::next_fire(self.deadline, self.idle, self.last_frame)?;
            self.sleep.as_mut().reset(next.into());
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct BodyTimeout(&'static str);

#[derive(Debug)]
enum Kind {
    Upstream(UpstreamBody),
    Local(Full<Bytes>),
}

/// What to record once the response is over.
#[derive(Debug)]
pub(crate) struct Completion {
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) labels: RequestLabels,
    pub(crate) start: Instant,
    pub(crate) log: Option<Box<Logged>>,
    /// The request's span, ended with the response.
    pub(crate) span: Option<Box<RequestSpan>>,
    /// How many body bytes the client sent (`None`: the body was never read).
    pub(crate) reading: Option<Arc<crate::replay::BodyReading>>,
}

/// A request's access-log entry, filled in as the request went, written when its response ends to
/// the access logs and shown to the tap sessions open.
#[derive(Debug)]
pub(crate) struct Logged {
    pub(crate) logs: Option<Arc<AccessLogs>>,
    pub(crate) tap: Option<(Arc<Taps>, Box<TapFacts>)>,
    pub(crate) entry: Entry,
}

impl Completion {
    fn finish(mut self, flags: ResponseFlags, sent: u64, messages: Option<u64>) {
        self.labels.response_flags |= flags;
        let elapsed = self.start.elapsed();
        let received = self.reading.as_ref().map_or(0, |r| r.received());
        self.metrics
            .record_request(&self.labels, elapsed.as_secs_f64() * 1000.0, received, sent);
        if let Some(sent_messages) = messages {
            let received_messages = self.reading.as_ref().map_or(0, |r| r.messages());
            self.metrics
                .request_messages
                .get_or_create(&self.labels)
                .inc_by(received_messages);
            self.metrics
                .response_messages
                .get_or_create(&self.labels)
                .inc_by(sent_messages);
        }
        if let Some(span) = self.span {
            span.finish(
                self.labels.response_code,
                self.labels.response_flags,
                received,
                sent,
            );
        }
        if let Some(logged) = self.log {
            let Logged { logs, tap, mut entry } = *logged;
            entry.response_code = self.labels.response_code;
            entry.flags = self.labels.response_flags;
            entry.duration = elapsed;
            entry.bytes_sent = sent;
            entry.bytes_received = received;
            if let Some((taps, facts)) = tap {
                taps.publish(&entry, &facts);
            }
            if let Some(logs) = logs {
                logs.log(entry);
            }
        }
    }
}

impl ProxyBody {
    pub(crate) fn upstream(
        body: UpstreamBody,
        completion: Completion,
        timer: Option<BodyTimer>,
        held: InFlight,
    ) -> Self {
        let grpc = completion.labels.request_protocol == weft_telemetry::RequestProtocol::grpc;
        Self {
            kind: Kind::Upstream(body),
            completion: Some(completion),
            timer,
            _held: Some(held),
            request: None,
            sent: 0,
            messages: grpc.then(GrpcMessages::default),
        }
    }

    pub(crate) fn local(text: &'static str, completion: Option<Completion>) -> Self {
        Self {
            kind: Kind::Local(Full::new(Bytes::from_static(text.as_bytes()))),
            completion,
            timer: None,
            _held: None,
            request: None,
            sent: 0,
            messages: None,
        }
    }

    pub(crate) fn hold_request(&mut self, request: weft_transport::InFlight) {
        self.request = Some(request);
    }

    /// Writes the request's access-log entry when the response ends.
    pub(crate) fn log(&mut self, logged: Logged) {
        if let Some(completion) = &mut self.completion {
            completion.log = Some(Box::new(logged));
        }
    }

    /// Ends the request's span when the response ends.
    pub(crate) fn trace(&mut self, span: RequestSpan) {
        if let Some(completion) = &mut self.completion {
            completion.span = Some(Box::new(span));
        }
    }

    fn finish(&mut self, flags: ResponseFlags) {
        if let Some(c) = self.completion.take() {
            let messages = match c.labels.request_protocol {
                weft_telemetry::RequestProtocol::grpc => {
                    Some(self.messages.as_ref().map_or(0, GrpcMessages::count))
                }
                weft_telemetry::RequestProtocol::http => None,
            };
            c.finish(flags, self.sent, messages);
        }
        self.request = None;
    }
}

/// The trailers that end a gRPC call the proxy timed out: DEADLINE_EXCEEDED, as for a timeout before
/// the response began.
fn grpc_deadline_trailers(what: &'static str) -> http::HeaderMap {
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", http::HeaderValue::from_static("4"));
    trailers.insert("grpc-message", http::HeaderValue::from_static(what));
    trailers
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let polled = match &mut self.kind {
            Kind::Upstream(body) => Pin::new(body).poll_frame(cx).map_err(BoxError::from),
            Kind::Local(body) => Pin::new(body).poll_frame(cx).map_err(|never| match never {}),
        };
        match &polled {
            Poll::Ready(None) => self.finish(ResponseFlags::NONE),
            Poll::Ready(Some(Err(_))) => self.finish(ResponseFlags::UPSTREAM_CONNECTION_TERMINATION),
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let len = data.len() as u64;
                    let this = &mut *self;
                    if let Some(messages) = &mut this.messages {
                        messages.begun_in(data);
                    }
                    this.sent += len;
                }
                if let (Some(trailers), Some(completion)) = (frame.trailers_ref(), self.completion.as_mut())
                    && let Some(status) = crate::forward::grpc_status(trailers)
                {
                    completion.labels.grpc_response_status = weft_telemetry::GrpcStatus(Some(status));
                }
                if let Some(timer) = &mut self.timer {
                    timer.last_frame = Instant::now();
                }
            }
            Poll::Pending => {
                let expired = self.timer.as_mut().and_then(|t| t.poll_expired(cx));
                if let Some(flags) = expired {
                    // Dropping the upstream body resets the stream (HTTP/2) or closes the connection.
                    self.kind = Kind::Local(Full::default());
                    let grpc = self.timer.take().is_some_and(|t| t.grpc);
                    if grpc && let Some(completion) = self.completion.as_mut() {
                        // DEADLINE_EXCEEDED, the status of the trailers sent below.
                        completion.labels.grpc_response_status = weft_telemetry::GrpcStatus(Some(4));
                    }
                    self.finish(flags);
                    let what = if flags == ResponseFlags::UPSTREAM_TIMEOUT {
                        "upstream request timeout"
                    } else {
                        "stream idle timeout"
                    };
                    if grpc {
                        return Poll::Ready(Some(Ok(Frame::trailers(grpc_deadline_trailers(what)))));
                    }
                    return Poll::Ready(Some(Err(BodyTimeout(what).into())));
                }
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Upstream(body) => body.is_end_stream(),
            Kind::Local(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Upstream(body) => body.size_hint(),
            Kind::Local(body) => body.size_hint(),
        }
    }
}

impl Drop for ProxyBody {
    fn drop(&mut self) {
        // Bodies that end without a final poll (empty ones, HEAD responses) are complete; a body dropped
        // midway means the client went away.
        let flags = if self.is_end_stream() {
            ResponseFlags::NONE
        } else {
            ResponseFlags::DOWNSTREAM_CONNECTION_TERMINATION
        };
        self.finish(flags);
    }
}

#[cfg(test)]
mod tests {
    use super::GrpcMessages;

    #[test]
    fn grpc_messages_are_counted_however_the_stream_is_split() {
        let message = |len: u8| {
            let mut m = vec![0, 0, 0, 0, len];
            m.extend(std::iter::repeat_n(7, usize::from(len)));
            m
        };
        let stream: Vec<u8> = [message(3), message(0), message(200), message(1)].concat();
        for split in 1..stream.len() {
            let mut counted = GrpcMessages::default();
            let mut begun = 0;
            for chunk in stream.chunks(split) {
                begun += counted.begun_in(chunk);
            }
            assert_eq!((begun, counted.count()), (4, 4), "chunks of {split}");
        }
    }
}
