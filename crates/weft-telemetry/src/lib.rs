//! What the proxy tells about itself: Prometheus metrics under Istio's standard names (plus `weft_*`
//! internals), Envoy's response flags, and log-level control at run time.

pub mod access_log;
mod flags;
mod logging;
mod metrics;
pub mod peer_metadata;
pub mod tap;
pub mod traces;

pub use flags::ResponseFlags;
pub use logging::{LogControl, LogError};
pub use metrics::{
    AuthzLabels, ClusterEventLabels, ClusterLabels, ConnectionSecurity, GrpcStatus, Label, Metrics,
    OverloadLabels, Peers, Reporter, RequestLabels, RequestProtocol, ServiceName, ServiceNamespace,
    TcpLabels, WorkloadLabels, XdsLabels,
};
