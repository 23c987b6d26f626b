//! Outlier detection (Envoy's passive health checking): each endpoint counts its consecutive failures
//! in atomics as attempts end; the detector that trips ejects it, within `max_ejection_percent`, for
//! `base_ejection_time` times the number of times it has been ejected. Ejections are revisited on
//! Envoy's interval, run lazily by the next request that finds it due.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;
use weft_model::OutlierDetection;

/// How an attempt on an endpoint ended, as outlier detection counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The endpoint answered with this status.
    Status(u16),
    /// The connection was made (a local-origin success).
    Connected,
    /// The proxy could not connect, or the connection broke or timed out before a response: a
    /// local-origin failure, counted as the 5xx the client would see unless local-origin errors are
    /// split.
    LocalFailure { as_status: u16 },
}

/// A cluster's time line: instants as nanoseconds since the cluster's state was made, plus one, so that
/// zero can mean "never" in an atomic.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Clock {
    origin: Instant,
}

impl Clock {
    pub(crate) fn new(origin: Instant) -> Self {
        Self { origin }
    }

    pub(crate) fn ticks(self, at: Instant) -> u64 {
        let since = at.saturating_duration_since(self.origin).as_nanos();
        u64::try_from(since).unwrap_or(u64::MAX - 1) + 1
    }

    pub(crate) fn instant(self, ticks: u64) -> Instant {
        self.origin + Duration::from_nanos(ticks.saturating_sub(1))
    }
}

/// One endpoint's outlier record.
#[derive(Debug, Default)]
pub(crate) struct OutlierCounters {
    consecutive_5xx: AtomicU32,
    consecutive_gateway: AtomicU32,
    consecutive_local: AtomicU32,
    /// Times ejected, lowered by one for every interval spent healthy; multiplies the ejection time.
    pub(crate) ejections: AtomicU32,
    /// When the current ejection began ([`Clock`] ticks; 0: in balancing). It lasts [`ejection_time`]
    /// under the configuration in force, so a changed configuration applies to ejections already made.
    pub(crate) ejected_at: AtomicU64,
}

impl OutlierCounters {
    pub(crate) fn is_ejected(&self) -> bool {
        self.ejected_at.load(Ordering::Relaxed) != 0
    }

    /// Counts an outcome; names the detector that trips, if one does.
    pub(crate) fn record(&self, d: &OutlierDetection, outcome: Outcome) -> Option<&'static str> {
        let status = match outcome {
            Outcome::Connected => {
                if d.split_external_local_origin_errors {
                    self.consecutive_local.store(0, Ordering::Relaxed);
                }
                return None;
            }
            Outcome::LocalFailure { .. } if d.split_external_local_origin_errors => {
                let local = bump(&self.consecutive_local);
                return (d.consecutive_local_origin_failure > 0
                    && local >= d.consecutive_local_origin_failure)
                    .then_some("consecutive_local_origin_failure");
            }
            Outcome::LocalFailure { as_status } => as_status,
            Outcome::Status(status) => status,
        };
        if status < 500 {
            self.consecutive_5xx.store(0, Ordering::Relaxed);
            self.consecutive_gateway.store(0, Ordering::Relaxed);
            return None;
        }
        let fivexx = bump(&self.consecutive_5xx);
        let gateway = if matches!(status, 502..=504) {
            bump(&self.consecutive_gateway)
        } else {
            self.consecutive_gateway.store(0, Ordering::Relaxed);
            0
        };
        if d.consecutive_gateway_failure > 0 && gateway >= d.consecutive_gateway_failure {
            return Some("consecutive_gateway_failure");
        }
        (d.consecutive_5xx > 0 && fivexx >= d.consecutive_5xx).then_some("consecutive_5xx")
    }

    pub(crate) fn reset_counters(&self) {
        self.consecutive_5xx.store(0, Ordering::Relaxed);
        self.consecutive_gateway.store(0, Ordering::Relaxed);
        self.consecutive_local.store(0, Ordering::Relaxed);
    }

    /// Forgets everything (outlier detection was turned off).
    pub(crate) fn clear(&self) {
        self.reset_counters();
        self.ejections.store(0, Ordering::Relaxed);
        self.ejected_at.store(0, Ordering::Relaxed);
    }

    /// When the current ejection ends, if the endpoint is ejected.
    pub(crate) fn ejected_until(&self, d: &OutlierDetection, clock: Clock) -> Option<Instant> {
        let at = self.ejected_at.load(Ordering::Relaxed);
        (at != 0).then(|| clock.instant(at) + ejection_time(d, self.ejections.load(Ordering::Relaxed)))
    }
}

/// The count after adding one.
fn bump(counter: &AtomicU32) -> u32 {
    counter.fetch_add(1, Ordering::Relaxed).saturating_add(1)
}

/// How long the `n`th ejection of an endpoint lasts: the base time times `n`, at most the maximum.
pub(crate) fn ejection_time(d: &OutlierDetection, n: u32) -> Duration {
    let ceiling = d.max_ejection_time.max(d.base_ejection_time);
    d.base_ejection_time.saturating_mul(n).min(ceiling)
}
