//! Resilience policy with Envoy's semantics and defaults: when to retry a request (a route's
//! [`RetryPolicy`]), and how a cluster protects itself and its callers ([`CircuitBreakers`],
//! [`RetryBudget`], [`OutlierDetection`]).
//!
//! The same types are the static file's syntax (`docs/configuration.md`) and the runtime model.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The conditions under which a request is tried again (Envoy's `retry_on`, comma-separated).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct RetryOn(u32);

impl RetryOn {
    /// Any 5xx response, and no response at all (connect failure, reset, per-try timeout).
    pub const SERVER_ERROR: Self = Self(1);
    /// 502, 503 or 504, and connect failures and per-try timeouts.
    pub const GATEWAY_ERROR: Self = Self(1 << 1);
    /// The upstream reset or closed the connection before the response began, or a per-try timeout.
    pub const RESET: Self = Self(1 << 2);
    /// The connection could not be made (refused, timed out, TLS failed).
    pub const CONNECT_FAILURE: Self = Self(1 << 3);
    /// An HTTP/2 upstream refused the stream (`REFUSED_STREAM`).
    pub const REFUSED_STREAM: Self = Self(1 << 4);
    /// 409 Conflict.
    pub const RETRIABLE_4XX: Self = Self(1 << 5);
    /// A status in the policy's `retriable_status_codes`.
    pub const RETRIABLE_STATUS_CODES: Self = Self(1 << 6);
    /// `x-envoy-ratelimited` in the response.
    pub const ENVOY_RATELIMITED: Self = Self(1 << 7);
    /// gRPC statuses in the response headers (a trailers-only response).
    pub const GRPC_CANCELLED: Self = Self(1 << 8);
    pub const GRPC_DEADLINE_EXCEEDED: Self = Self(1 << 9);
    pub const GRPC_INTERNAL: Self = Self(1 << 10);
    pub const GRPC_RESOURCE_EXHAUSTED: Self = Self(1 << 11);
    pub const GRPC_UNAVAILABLE: Self = Self(1 << 12);

    const NAMES: [(&'static str, Self); 13] = [
        ("5xx", Self::SERVER_ERROR),
        ("gateway-error", Self::GATEWAY_ERROR),
        ("reset", Self::RESET),
        ("connect-failure", Self::CONNECT_FAILURE),
        ("refused-stream", Self::REFUSED_STREAM),
        ("retriable-4xx", Self::RETRIABLE_4XX),
        ("retriable-status-codes", Self::RETRIABLE_STATUS_CODES),
        ("envoy-ratelimited", Self::ENVOY_RATELIMITED),
        ("cancelled", Self::GRPC_CANCELLED),
        ("deadline-exceeded", Self::GRPC_DEADLINE_EXCEEDED),
        ("internal", Self::GRPC_INTERNAL),
        ("resource-exhausted", Self::GRPC_RESOURCE_EXHAUSTED),
        ("unavailable", Self::GRPC_UNAVAILABLE),
    ];

    pub const fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }

    pub const fn union(self, other: Self) -> Self {
        Self(self.0 | other.0)
    }

    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// Whether any of `other`'s conditions is in `self`.
    pub const fn intersects(self, other: Self) -> bool {
        self.0 & other.0 != 0
    }
}

impl std::str::FromStr for RetryOn {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let mut on = RetryOn::default();
        for word in s.split(',').map(str::trim).filter(|w| !w.is_empty()) {
            let Some((_, flag)) = Self::NAMES.iter().find(|(name, _)| *name == word) else {
                let known: Vec<_> = Self::NAMES.iter().map(|(n, _)| *n).collect();
                return Err(format!(
                    "unknown retry condition \"{word}\" (known: {})",
                    known.join(", ")
                ));
            };
            on = on.union(*flag);
        }
        Ok(on)
    }
}

impl fmt::Display for RetryOn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<_> = Self::NAMES
            .iter()
            .filter(|(_, flag)| self.contains(*flag))
            .map(|(name, _)| *name)
            .collect();
        f.write_str(&names.join(","))
    }
}

impl Serialize for RetryOn {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for RetryOn {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// A route's retries (Envoy's `RetryPolicy`). Every retry goes to another endpoint when the cluster has
/// one (Envoy's `previous_hosts` predicate, which Istio always sets).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryPolicy {
    pub retry_on: RetryOn,
    /// Tries after the first one.
    #[serde(default = "one")]
    pub num_retries: u32,
    /// Deadline of each try for its response headers; `None`: only the route's timeout applies.
    #[serde(default, with = "humantime_serde")]
    pub per_try_timeout: Option<Duration>,
    #[serde(default)]
    pub retriable_status_codes: Vec<u16>,
    #[serde(default)]
    pub backoff: Backoff,
}

fn one() -> u32 {
    1
}

/// Fully jittered exponential backoff between tries: before retry `n` (from 1) the proxy waits a random
/// time in `[0, min(base × 2^(n-1), max)]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Backoff {
    #[serde(with = "humantime_serde")]
    pub base_interval: Duration,
    #[serde(with = "humantime_serde")]
    pub max_interval: Duration,
}

impl Default for Backoff {
    /// Envoy's: 25 ms, at most ten times that.
    fn default() -> Self {
        Self {
            base_interval: Duration::from_millis(25),
            max_interval: Duration::from_millis(250),
        }
    }
}

impl Backoff {
    /// The upper bound of the wait before retry `n` (from 1).
    pub fn ceiling(&self, retry: u32) -> Duration {
        let factor = 1u32.checked_shl(retry.saturating_sub(1)).unwrap_or(u32::MAX);
        self.base_interval.saturating_mul(factor).min(self.max_interval)
    }
}

/// Per-cluster limits (Envoy's default-priority `circuit_breakers` thresholds). A request over a limit
/// fails at once with 503 and flag `UO`; a retry over `max_retries` is not made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CircuitBreakers {
    /// Upstream connections in use at once (HTTP/1: one per request in flight).
    pub max_connections: u32,
    /// Requests waiting for a connection when all `max_connections` are in use.
    pub max_pending_requests: u32,
    /// Requests in flight to the cluster.
    pub max_requests: u32,
    /// Retries in flight to the cluster.
    pub max_retries: u32,
    pub retry_budget: RetryBudget,
}

impl Default for CircuitBreakers {
    /// Envoy's defaults.
    fn default() -> Self {
        Self {
            max_connections: 1024,
            max_pending_requests: 1024,
            max_requests: 1024,
            max_retries: 3,
            retry_budget: RetryBudget::default(),
        }
    }
}

/// Retries over the last `interval` may be at most `budget_percent` of the cluster's requests over
/// that interval, or `min_retries`, whichever is more (Envoy's retry budget with a `budget_interval`;
/// Linkerd's budget works the same way). On for every cluster, so a failing service never sees a retry
/// storm.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryBudget {
    pub budget_percent: f64,
    /// Retries always allowed within an interval, so that a service with little traffic can retry.
    pub min_retries: u32,
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
}

impl Eq for RetryBudget {}

impl Default for RetryBudget {
    fn default() -> Self {
        Self {
            budget_percent: 20.0,
            // 10 a second, as Linkerd allows: a quiet service with one dead endpoint still retries
            // every request that hits it.
            min_retries: 100,
            interval: Duration::from_secs(10),
        }
    }
}

impl RetryBudget {
    /// Whether one more retry fits, given the requests and retries counted over the interval.
    pub fn allows(&self, requests: u64, retries: u64) -> bool {
        let share = (requests as f64 * self.budget_percent / 100.0) as u64;
        retries < share.max(u64::from(self.min_retries))
    }
}

/// Passive health checking (Envoy's `outlier_detection`): an endpoint that fails repeatedly is ejected
/// from balancing for `base_ejection_time` × the number of times it has been ejected (at most
/// `max_ejection_time`), then tried again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutlierDetection {
    /// Consecutive 5xx responses (and, unless local-origin errors are split, connect failures, resets and
    /// timeouts) that eject an endpoint; 0 disables.
    pub consecutive_5xx: u32,
    /// Consecutive 502/503/504 (and local-origin failures, unless split); 0 disables.
    pub consecutive_gateway_failure: u32,
    /// With `split_external_local_origin_errors`: consecutive connect failures, resets and timeouts; 0
    /// disables.
    pub consecutive_local_origin_failure: u32,
    /// Count failures the proxy saw itself (connect failure, reset, timeout) apart from the responses
    /// the endpoint sent.
    pub split_external_local_origin_errors: bool,
    /// How often ejection state is revisited (an ejected endpoint returns at the first evaluation after
    /// its time is up; an endpoint that stayed healthy has its ejection count lowered).
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    #[serde(with = "humantime_serde")]
    pub base_ejection_time: Duration,
    #[serde(with = "humantime_serde")]
    pub max_ejection_time: Duration,
    /// At most this share of the cluster's endpoints is ejected at once (at least one may always be).
    pub max_ejection_percent: u32,
}

impl Default for OutlierDetection {
    /// Envoy's defaults (gateway failures are counted but, as in Envoy, not enforced unless set).
    fn default() -> Self {
        Self {
            consecutive_5xx: 5,
            consecutive_gateway_failure: 0,
            consecutive_local_origin_failure: 5,
            split_external_local_origin_errors: false,
            interval: Duration::from_secs(10),
            base_ejection_time: Duration::from_secs(30),
            max_ejection_time: Duration::from_secs(300),
            max_ejection_percent: 10,
        }
    }
}

pub use crate::defaults::DEFAULT_PANIC_THRESHOLD_PERCENT;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_on_round_trips_and_names_unknown_conditions() {
        let on: RetryOn = "5xx, connect-failure,,unavailable".parse().unwrap();
        assert!(on.contains(RetryOn::SERVER_ERROR));
        assert!(on.contains(RetryOn::CONNECT_FAILURE));
        assert!(on.contains(RetryOn::GRPC_UNAVAILABLE));
        assert!(!on.contains(RetryOn::RESET));
        assert_eq!(on.to_string(), "5xx,connect-failure,unavailable");
        let err = "5xx,bogus".parse::<RetryOn>().unwrap_err();
        assert!(err.contains("\"bogus\""), "{err}");
    }

    #[test]
    fn backoff_grows_to_its_ceiling() {
        let b = Backoff::default();
        assert_eq!(b.ceiling(1), Duration::from_millis(25));
        assert_eq!(b.ceiling(2), Duration::from_millis(50));
        assert_eq!(b.ceiling(4), Duration::from_millis(200));
        assert_eq!(b.ceiling(5), Duration::from_millis(250));
        assert_eq!(b.ceiling(99), Duration::from_millis(250));
    }
}
