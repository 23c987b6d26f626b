//! What the proxy knows about each cluster, shared by the HTTP and the TCP path: the endpoint set in
//! force, least-request / round-robin / random balancing, outlier detection, circuit breakers and the
//! retry budget. A request's path through it takes no lock; the configuration task swaps in new
//! endpoint sets whole. Time is tokio's, so tests run on paused time.

mod budget;
mod cluster;
mod clusters;
mod endpoints;
mod outlier;
mod shares;
mod status;

pub use cluster::{Admission, ClusterState, EndpointGuard, Overflow, RetryPermit};
pub use clusters::ClusterStates;
pub use endpoints::EndpointState;
pub use outlier::Outcome;
pub use shares::ConnectionSlot;
pub use status::{ClusterCounters, ClusterStatus, EndpointStatus};

#[cfg(test)]
mod tests;
