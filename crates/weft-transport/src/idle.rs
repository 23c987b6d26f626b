//! Connection idle timeouts: [`IdleIo`] records when bytes last moved on a connection, [`Activity`]
//! says when it has been idle (no bytes and nothing in flight) for long enough.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::Instant;

use pin_project_lite::pin_project;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// When a connection last carried bytes, how many it carried, and how many requests it has in flight.
#[derive(Debug)]
pub struct Activity {
    origin: Instant,
    /// Milliseconds since `origin`.
    last: AtomicU64,
    in_flight: AtomicU32,
    /// Bytes read from and written to the connection, through its [`IdleIo`].
    read: AtomicU64,
    written: AtomicU64,
}

impl Activity {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            origin: Instant::now(),
            last: AtomicU64::new(0),
            in_flight: AtomicU32::new(0),
            read: AtomicU64::new(0),
            written: AtomicU64::new(0),
        })
    }

    /// Bytes read from the connection and written to it so far (readable while the connection is in
    /// use, for reports made while it is open).
    pub fn bytes(&self) -> (u64, u64) {
        (
            self.read.load(Ordering::Relaxed),
            self.written.load(Ordering::Relaxed),
        )
    }

    fn touch(&self) {
        let now = u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last.store(now, Ordering::Relaxed);
    }

    /// Counts a request in flight until the guard is dropped: a connection waiting on a slow answer is
    /// not idle.
    pub fn request(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(self.clone())
    }

    /// Whether a request is in flight.
    pub fn busy(&self) -> bool {
        self.in_flight.load(Ordering::Acquire) > 0
    }

    /// Resolves once no bytes have moved and no request has been in flight for `timeout`.
    pub async fn idle(&self, timeout: Duration) {
        loop {
            let last = self.origin + Duration::from_millis(self.last.load(Ordering::Relaxed));
            let quiet = last.elapsed();
            if quiet >= timeout && self.in_flight.load(Ordering::Acquire) == 0 {
                return;
            }
            let wait = timeout.saturating_sub(quiet).max(Duration::from_millis(10));
            tokio::time::sleep(wait).await;
            if self.in_flight.load(Ordering::Acquire) > 0 {
                self.touch();
            }
        }
    }
}

/// A request in flight on a connection (see [`Activity::request`]).
#[derive(Debug)]
pub struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.touch();
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

pin_project! {
    /// A connection that records its activity and the bytes read from and written to it.
    #[derive(Debug)]
    pub struct IdleIo<S> {
        #[pin]
        inner: S,
        activity: Arc<Activity>,
    }
}

impl<S> IdleIo<S> {
    pub fn new(inner: S, activity: Arc<Activity>) -> Self {
        Self { inner, activity }
    }
}

impl<S: AsyncRead> AsyncRead for IdleIo<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        let polled = this.inner.poll_read(cx, buf);
        if buf.filled().len() > before {
            let n = (buf.filled().len() - before) as u64;
            this.activity.read.fetch_add(n, Ordering::Relaxed);
            this.activity.touch();
        }
        polled
    }
}

impl<S: AsyncWrite> AsyncWrite for IdleIo<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.project();
        let polled = this.inner.poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = polled
            && n > 0
        {
            this.activity.written.fetch_add(n as u64, Ordering::Relaxed);
            this.activity.touch();
        }
        polled
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn idle_only_without_bytes_or_requests() {
        let activity = Activity::new();
        let (a, mut b) = tokio::io::duplex(64);
        let mut io = IdleIo::new(a, activity.clone());
        let timeout = Duration::from_secs(60);

        let request = activity.request();
        // A request in flight keeps the connection busy however long it takes.
        tokio::select! {
            () = activity.idle(timeout) => panic!("idle with a request in flight"),
            () = tokio::time::sleep(Duration::from_secs(300)) => {}
        }
        drop(request);
        tokio::time::sleep(Duration::from_secs(50)).await;
        // Bytes 50 s after the request ended push idleness back.
        b.write_all(b"x").await.unwrap();
        let mut byte = [0u8; 1];
        io.read_exact(&mut byte).await.unwrap();
        let start = tokio::time::Instant::now();
        activity.idle(timeout).await;
        let waited = start.elapsed();
        assert!(
            waited >= Duration::from_secs(59) && waited <= Duration::from_secs(61),
            "{waited:?}"
        );
    }
}
