//! A cluster as admin `GET /clusters` shows it.

use std::net::SocketAddr;

use serde::Serialize;
use weft_model::{CircuitBreakers, LbPolicy};

#[derive(Debug, Clone, Serialize)]
pub struct ClusterStatus {
    pub name: String,
    pub lb_policy: LbPolicy,
    pub active_requests: u32,
    pub pending_requests: u32,
    pub active_retries: u32,
    pub outlier_detection: bool,
    pub circuit_breakers: CircuitBreakers,
    pub counters: ClusterCounters,
    pub endpoints: Vec<EndpointStatus>,
}

/// A cluster's counters under Envoy's stat names (`cluster.<name>.<field>`; the ejection counters
/// are under `outlier_detection.`).
#[derive(Debug, Clone, Default, Serialize)]
pub struct ClusterCounters {
    /// HTTP attempts (retries included).
    pub upstream_rq_total: u64,
    /// `upstream_rq_1xx` .. `upstream_rq_5xx`.
    pub upstream_rq_by_class: [u64; 5],
    pub upstream_rq_retry: u64,
    /// Retries not made: `max_retries` reached or the retry budget spent.
    pub upstream_rq_retry_overflow: u64,
    /// Requests refused by `max_requests`, `max_pending_requests` or the client's share of the
    /// connection slots.
    pub upstream_rq_pending_overflow: u64,
    /// TCP connections refused by `max_connections`.
    pub upstream_cx_overflow: u64,
    pub ejections_active: u64,
    pub ejections_enforced_total: u64,
    pub ejections_enforced_consecutive_5xx: u64,
    pub ejections_enforced_consecutive_gateway_failure: u64,
    pub ejections_enforced_consecutive_local_origin_failure: u64,
    /// Ejections not made because `max_ejection_percent` was reached.
    pub ejections_overflow: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct EndpointStatus {
    pub address: SocketAddr,
    pub weight: u32,
    /// As the configuration (EDS health status) says.
    pub healthy: bool,
    pub active_requests: u32,
    /// Responses below 500.
    pub successes: u64,
    /// 5xx responses and local-origin failures (connect failure, reset, timeout).
    pub failures: u64,
    pub ejected: bool,
    /// RFC 3339, while ejected.
    pub ejected_until: Option<String>,
    /// The ejection multiplier: times ejected, less one for each interval spent healthy since.
    pub ejections: u32,
}
