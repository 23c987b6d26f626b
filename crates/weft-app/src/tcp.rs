//! Opaque TCP to a cluster: an endpoint chosen by the cluster's balancer, limited by `max_connections`,
//! reported to outlier detection, and tried again on another endpoint when the connect fails.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, watch};
use weft_balance::{ClusterStates, EndpointGuard, Outcome};
use weft_identity::tls::TlsMaterial;
use weft_model::Cluster;
use weft_telemetry::{ResponseFlags, WorkloadLabels};
use weft_transport::{DialError, DialSettings, UpstreamIo};

/// Connect attempts for an opaque TCP connection, each to a different endpoint when there is one.
const CONNECT_ATTEMPTS: usize = 3;

/// How an opaque TCP connection to a cluster was made.
#[derive(Debug)]
pub(crate) struct TcpUpstream {
    pub(crate) io: UpstreamIo,
    pub(crate) endpoint: SocketAddr,
    /// The workload behind the endpoint, as discovery named it.
    pub(crate) workload: Option<Arc<WorkloadLabels>>,
    /// Counts the connection as the endpoint's active request and a connection of the cluster until
    /// dropped.
    pub(crate) held: Held,
}

#[derive(Debug)]
pub(crate) struct Held {
    _endpoint: EndpointGuard,
    _connection: OwnedSemaphorePermit,
}

/// Why no TCP connection to a cluster could be made.
#[derive(Debug, thiserror::Error)]
pub(crate) enum TcpConnectError {
    #[error("no healthy upstream")]
    NoHealthyUpstream,
    #[error("max_connections reached")]
    Overflow,
    #[error(transparent)]
    Connect(DialError),
}

impl TcpConnectError {
    pub(crate) fn flags(&self) -> ResponseFlags {
        match self {
            TcpConnectError::NoHealthyUpstream => ResponseFlags::NO_HEALTHY_UPSTREAM,
            TcpConnectError::Overflow => ResponseFlags::UPSTREAM_OVERFLOW,
            TcpConnectError::Connect(_) => ResponseFlags::UPSTREAM_CONNECT_FAILURE,
        }
    }
}

pub(crate) async fn connect_cluster(
    states: &ClusterStates,
    tls: &watch::Receiver<Option<TlsMaterial>>,
    cluster: &Arc<Cluster>,
) -> Result<TcpUpstream, TcpConnectError> {
    let state = states.get(cluster);
    let connection = state.try_connection_slot().ok_or(TcpConnectError::Overflow)?;
    let settings = DialSettings::for_cluster(cluster);
    let mut tried = Vec::new();
    let mut last = None;
    for _ in 0..CONNECT_ATTEMPTS {
        let Some(endpoint) = state.pick(&tried) else {
            break;
        };
        let address = endpoint.address();
        if tried.contains(&address) {
            break; // nothing new left to try
        }
        match weft_transport::dial(address, &settings, tls, &[]).await {
            Ok(io) => {
                state.report(endpoint.state(), Outcome::Connected);
                return Ok(TcpUpstream {
                    io,
                    endpoint: address,
                    workload: endpoint.workload().cloned(),
                    held: Held {
                        _endpoint: endpoint,
                        _connection: connection,
                    },
                });
            }
            Err(err) => {
                tracing::debug!(cluster = %cluster.name, endpoint = %address, error = %err, "TCP connect failed");
                state.report(endpoint.state(), Outcome::LocalFailure { as_status: 503 });
                tried.push(address);
                last = Some(err);
            }
        }
    }
    Err(last.map_or(TcpConnectError::NoHealthyUpstream, TcpConnectError::Connect))
}
