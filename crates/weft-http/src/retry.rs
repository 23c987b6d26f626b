//! Envoy's `RetryState` for one request: which outcomes the route's policy retries ([`retriable`]),
//! what the request has left (retries, the endpoints already tried), and after each try the decision
//! to answer or to go again after a jittered [`backoff`], within the cluster's budget.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{HeaderMap, StatusCode};
use weft_balance::{ClusterState, RetryPermit};
use weft_model::{RetryOn, RetryPolicy};

/// What a request's retries have left.
#[derive(Debug)]
pub(crate) struct RetryState<'p> {
    policy: Option<&'p RetryPolicy>,
    retries: u32,
    /// Endpoints tried so far; a retry goes elsewhere when it can.
    tried: Vec<SocketAddr>,
}

/// What to do after a try.
#[derive(Debug)]
pub(crate) enum Next<B> {
    /// Answer with this try's result. `limit_exceeded`: retries were made and the policy or the
    /// budget allows no more (Envoy's `URX`).
    Answer { limit_exceeded: bool },
    /// Try again after `wait` with `body` (the request body read again), holding `permit` (the
    /// cluster's `max_retries`).
    Retry {
        wait: Duration,
        permit: RetryPermit,
        body: B,
    },
}

impl<'p> RetryState<'p> {
    pub(crate) fn new(policy: Option<&'p RetryPolicy>) -> Self {
        Self {
            policy,
            retries: 0,
            tried: Vec::new(),
        }
    }

    /// Whether the request body must be kept for a retry.
    pub(crate) fn keeps_body(&self) -> bool {
        self.policy.is_some_and(|p| p.num_retries > 0)
    }

    /// Whether a later try may still need the request (so this try gets a copy of its head).
    pub(crate) fn may_retry(&self) -> bool {
        self.policy.is_some_and(|p| self.retries < p.num_retries)
    }

    pub(crate) fn per_try_timeout(&self) -> Option<Duration> {
        self.policy.and_then(|p| p.per_try_timeout)
    }

    pub(crate) fn tried(&self) -> &[SocketAddr] {
        &self.tried
    }

    /// The decision after a try at `endpoint` ended as `outcome`: retried when the policy retries the
    /// outcome, retries are left, the body can be sent again (`body`: the next reading of it), the
    /// backoff ends before `deadline`, and the cluster's budget and `max_retries` agree.
    pub(crate) fn after<B>(
        &mut self,
        outcome: TryOutcome<'_>,
        endpoint: SocketAddr,
        body: Option<B>,
        deadline: Option<Instant>,
        cluster: &Arc<ClusterState>,
    ) -> Next<B> {
        let Some(policy) = self.policy.filter(|p| retriable(p, outcome)) else {
            return Next::Answer {
                limit_exceeded: false,
            };
        };
        let wait = backoff(policy, self.retries + 1);
        let permit = if self.retries >= policy.num_retries {
            None
        } else if body.is_none() {
            tracing::debug!(%endpoint, "not retrying: the request body was too large to keep");
            None
        } else if deadline.is_some_and(|d| Instant::now() + wait >= d) {
            None
        } else {
            cluster.retry()
        };
        let (Some(permit), Some(body)) = (permit, body) else {
            return Next::Answer {
                limit_exceeded: self.retries > 0,
            };
        };
        self.retries += 1;
        self.tried.push(endpoint);
        tracing::debug!(%endpoint, retry = self.retries, ?wait, "retrying");
        Next::Retry { wait, permit, body }
    }
}

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
fn retriable(policy: &RetryPolicy, outcome: TryOutcome<'_>) -> bool {
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
fn backoff(policy: &RetryPolicy, retry: u32) -> Duration {
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

    fn cluster(max_retries: u32) -> Arc<ClusterState> {
        let mut c = weft_model::Cluster::new("c");
        c.circuit_breakers.max_retries = max_retries;
        weft_balance::ClusterStates::new(weft_telemetry::Metrics::new()).get(&Arc::new(c))
    }

    fn endpoint(i: u8) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, i], 80))
    }

    #[tokio::test(start_paused = true)]
    async fn retries_until_the_policy_says_no_more_and_then_reports_the_limit() {
        let p = policy("5xx", &[]);
        let cluster = cluster(u32::MAX);
        let mut state = RetryState::new(Some(&p));
        assert!(state.keeps_body() && state.may_retry());
        let none = HeaderMap::new();
        let failed = TryOutcome::Response(status(503), &none);
        let mut permits = Vec::new();
        for i in 1..=2 {
            match state.after(failed, endpoint(i), Some(()), None, &cluster) {
                Next::Retry { wait, permit, .. } => {
                    assert!(wait <= p.backoff.ceiling(u32::from(i)));
                    permits.push(permit);
                }
                other => panic!("retry {i}: {other:?}"),
            }
        }
        assert_eq!(state.tried(), &[endpoint(1), endpoint(2)]);
        assert!(!state.may_retry(), "two of two made");
        assert!(matches!(
            state.after(failed, endpoint(3), Some(()), None, &cluster),
            Next::Answer { limit_exceeded: true }
        ));
        let mut fresh = RetryState::new(Some(&p));
        assert!(
            matches!(
                fresh.after(
                    TryOutcome::Response(status(404), &none),
                    endpoint(1),
                    Some(()),
                    None,
                    &cluster
                ),
                Next::Answer {
                    limit_exceeded: false
                }
            ),
            "a 404 is an answer"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn no_retry_past_the_deadline_without_the_body_or_over_max_retries() {
        let p = policy("connect-failure", &[]);
        let outcome = TryOutcome::ConnectFailure;
        let cluster = cluster(1);
        let soon = Some(Instant::now() + Duration::from_micros(1));
        let mut state = RetryState::new(Some(&p));
        assert!(matches!(
            state.after(outcome, endpoint(1), Some(()), soon, &cluster),
            Next::Answer {
                limit_exceeded: false
            }
        ));
        assert!(matches!(
            state.after(outcome, endpoint(1), None::<()>, None, &cluster),
            Next::Answer { .. }
        ));
        let held = match state.after(outcome, endpoint(1), Some(()), None, &cluster) {
            Next::Retry { permit, .. } => permit,
            other => panic!("{other:?}"),
        };
        let mut other = RetryState::new(Some(&p));
        assert!(
            matches!(
                other.after(outcome, endpoint(2), Some(()), None, &cluster),
                Next::Answer { .. }
            ),
            "max_retries 1 is in use"
        );
        drop(held);
        assert!(matches!(
            other.after(outcome, endpoint(2), Some(()), None, &cluster),
            Next::Retry { .. }
        ));
        let zero = RetryPolicy {
            num_retries: 0,
            per_try_timeout: Some(Duration::from_secs(1)),
            ..p
        };
        let state = RetryState::new(Some(&zero));
        assert!(!state.keeps_body() && !state.may_retry());
        assert_eq!(
            state.per_try_timeout(),
            Some(Duration::from_secs(1)),
            "applies without retries"
        );
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
