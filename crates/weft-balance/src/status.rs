//! A cluster as admin `GET /clusters` shows it.

use std::net::SocketAddr;

use serde::Serialize;
use weft_model::LbPolicy;

#[derive(Debug, Clone, Serialize)]
pub struct ClusterStatus {
    pub name: String,
    pub lb_policy: LbPolicy,
    pub active_requests: u32,
    pub pending_requests: u32,
    pub active_retries: u32,
    pub outlier_detection: bool,
    pub endpoints: Vec<EndpointStatus>,
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
