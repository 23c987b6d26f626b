//! The request headers timeout of an HTTP/1 client connection (Envoy's `request_headers_timeout`): it
//! runs from the first byte of a request to the end of its header block, so a slow client cannot hold a
//! connection open by trickling headers, while an idle keep-alive connection between requests waits for
//! the connection idle timeout instead. (hyper's own `header_read_timeout` also runs while the
//! connection is idle, which closed kept-alive connections under clients about to reuse them.)

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// When the request whose header block is being read began. Starting and stopping it are two atomic
/// stores: no timer and no wakeup per request. The watcher ([`HeadClock::expired`]) looks at it once
/// per timeout period while nothing is pending, and sleeps to the exact deadline once something is.
#[derive(Debug)]
pub(crate) struct HeadClock {
    origin: Instant,
    /// Milliseconds since `origin` plus one at the request's first byte; 0 while no header is pending.
    started: AtomicU64,
}

impl HeadClock {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Self {
            origin: Instant::now(),
            started: AtomicU64::new(0),
        })
    }

    pub(crate) fn start(&self) {
        let now = u64::try_from(self.origin.elapsed().as_millis())
            .unwrap_or(u64::MAX - 1)
            .saturating_add(1);
        // Only the first byte of a header block sets it.
        let _ = self
            .started
            .compare_exchange(0, now, Ordering::AcqRel, Ordering::Acquire);
    }

    /// The request's header block is complete.
    pub(crate) fn headers_done(&self) {
        self.started.store(0, Ordering::Release);
    }

    /// Resolves when a request's headers have been pending for `timeout`.
    pub(crate) async fn expired(&self, timeout: Duration) {
        loop {
            let started = self.started.load(Ordering::Acquire);
            // Nothing pending: look again one period from now; a header block that begins meanwhile
            // has its deadline after that look, so it is never missed.
            let at = match started {
                0 => Instant::now() + timeout,
                _ => self.origin + Duration::from_millis(started - 1) + timeout,
            };
            tokio::time::sleep_until(at).await;
            if started != 0 && self.started.load(Ordering::Acquire) == started {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn runs_from_the_first_byte_to_the_end_of_the_headers() {
        let clock = HeadClock::new();
        let timeout = Duration::from_secs(30);
        // Idle: no clock, however long.
        let idle = tokio::time::timeout(Duration::from_secs(3600), clock.expired(timeout)).await;
        assert!(idle.is_err(), "an idle connection has no header deadline");

        clock.start();
        tokio::time::advance(Duration::from_secs(20)).await;
        clock.start(); // more bytes of the same header block do not restart it
        let started = Instant::now();
        clock.expired(timeout).await;
        assert_eq!(started.elapsed(), Duration::from_secs(10));

        clock.headers_done();
        let done = tokio::time::timeout(Duration::from_secs(3600), clock.expired(timeout)).await;
        assert!(done.is_err(), "a complete header block stops the clock");
    }

    #[tokio::test(start_paused = true)]
    async fn a_finished_header_block_cancels_a_waiting_deadline() {
        let clock = HeadClock::new();
        clock.start();
        let waiter = {
            let clock = clock.clone();
            tokio::spawn(async move { clock.expired(Duration::from_secs(30)).await })
        };
        tokio::time::advance(Duration::from_secs(10)).await;
        clock.headers_done();
        tokio::time::advance(Duration::from_secs(60)).await;
        assert!(!waiter.is_finished());
        waiter.abort();
    }
}
