//! The request body as sent upstream: the client's, passed through, or one kept (up to
//! [`MAX_REPLAY_BYTES`]) so that a retry can send it again.

use std::error::Error as StdError;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

/// Request bodies up to this size are kept for a retry; a larger one is streamed and not retried
/// (Linkerd's bound: enough for typical API calls, small enough to keep a sidecar's memory flat).
pub const MAX_REPLAY_BYTES: usize = 64 * 1024;

pub(crate) type BoxError = Box<dyn StdError + Send + Sync>;

/// The client's request body. It remembers when the client broke it (bad chunked framing, a reset
/// stream), so that the failed try is the client's fault, never the endpoint's.
#[derive(Debug)]
pub(crate) struct ClientBody {
    inner: Incoming,
    reading: Arc<BodyReading>,
    /// A gRPC request's messages, counted as they pass.
    messages: Option<crate::body::GrpcMessages>,
}

/// How reading a client's request body went, as the forwarder sees it after the body has moved on.
#[derive(Debug)]
pub(crate) struct BodyReading {
    /// Reading it from the client failed.
    broken: AtomicBool,
    /// It has all arrived.
    complete: AtomicBool,
    /// Body bytes read from the client.
    received: AtomicU64,
    /// gRPC messages begun by the client (0 for other requests).
    messages: AtomicU64,
}

impl BodyReading {
    pub(crate) fn broken(&self) -> bool {
        self.broken.load(Ordering::Relaxed)
    }

    pub(crate) fn complete(&self) -> bool {
        self.complete.load(Ordering::Relaxed)
    }

    pub(crate) fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    pub(crate) fn messages(&self) -> u64 {
        self.messages.load(Ordering::Relaxed)
    }
}

impl ClientBody {
    /// The body, and what becomes known of reading it; a gRPC request's messages are counted.
    pub(crate) fn new(inner: Incoming, grpc: bool) -> (Self, Arc<BodyReading>) {
        let reading = Arc::new(BodyReading {
            broken: AtomicBool::new(false),
            complete: AtomicBool::new(inner.is_end_stream()),
            received: AtomicU64::new(0),
            messages: AtomicU64::new(0),
        });
        (
            Self {
                inner,
                reading: reading.clone(),
                messages: grpc.then(crate::body::GrpcMessages::default),
            },
            reading,
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
        match &polled {
            Poll::Ready(Some(Err(_))) => self.reading.broken.store(true, Ordering::Relaxed),
            Poll::Ready(None) => self.reading.complete.store(true, Ordering::Relaxed),
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let len = data.len() as u64;
                    let begun = self.messages.as_mut().map_or(0, |m| m.begun_in(data));
                    self.reading.received.fetch_add(len, Ordering::Relaxed);
                    if begun > 0 {
                        self.reading.messages.fetch_add(begun, Ordering::Relaxed);
                    }
                }
                if self.inner.is_end_stream() {
                    self.reading.complete.store(true, Ordering::Relaxed);
                }
            }
            Poll::Pending => {}
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
