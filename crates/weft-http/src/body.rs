//! The response body the proxy sends downstream: the upstream's, streamed frame by frame, or one the
//! proxy wrote itself. Request metrics are recorded when the body ends, so durations cover the whole
//! response, as Istio's do.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use hyper::body::Incoming;
use weft_telemetry::{Metrics, RequestLabels, ResponseFlags};

#[derive(Debug)]
pub struct ProxyBody {
    kind: Kind,
    completion: Option<Completion>,
}

#[derive(Debug)]
enum Kind {
    Upstream(Incoming),
    Local(Full<Bytes>),
}

/// What to record once the response is over.
#[derive(Debug)]
pub(crate) struct Completion {
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) labels: RequestLabels,
    pub(crate) start: Instant,
}

impl Completion {
    fn finish(mut self, flags: ResponseFlags) {
        self.labels.response_flags |= flags;
        let elapsed_ms = self.start.elapsed().as_secs_f64() * 1000.0;
        self.metrics.requests.get_or_create(&self.labels).inc();
        self.metrics
            .request_duration_ms
            .get_or_create(&self.labels)
            .observe(elapsed_ms);
    }
}

impl ProxyBody {
    pub(crate) fn upstream(body: Incoming, completion: Completion) -> Self {
        Self {
            kind: Kind::Upstream(body),
            completion: Some(completion),
        }
    }

    pub(crate) fn local(text: &'static str, completion: Option<Completion>) -> Self {
        Self {
            kind: Kind::Local(Full::new(Bytes::from_static(text.as_bytes()))),
            completion,
        }
    }

    fn finish(&mut self, flags: ResponseFlags) {
        if let Some(c) = self.completion.take() {
            c.finish(flags);
        }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let polled = match &mut self.kind {
            Kind::Upstream(body) => Pin::new(body).poll_frame(cx),
            Kind::Local(body) => Pin::new(body).poll_frame(cx).map_err(|never| match never {}),
        };
        match &polled {
            Poll::Ready(None) => self.finish(ResponseFlags::NONE),
            Poll::Ready(Some(Err(_))) => self.finish(ResponseFlags::UPSTREAM_CONNECTION_TERMINATION),
            _ => {}
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
