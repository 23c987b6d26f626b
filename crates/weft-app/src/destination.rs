//! Where a connection goes, as decided when it is accepted: its destination, how to find its routes
//! and policy again in a newer configuration snapshot, and what forwarding it needs to know.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpStream;
use weft_model::{HttpSettings, PeerAuthentication, Protocol, Target};
use weft_telemetry::Peers;
use weft_telemetry::access_log::AccessLogSet;
use weft_transport::Direct;

/// Where a connection goes.
#[derive(Debug, Clone)]
pub(crate) enum Destination {
    /// A service or listener: HTTP requests by its routes (looked up again for every request), opaque
    /// bytes to its cluster.
    Target(Target, TargetKey),
    /// One address: the original destination (passthrough) or the app (inbound).
    Direct(Direct),
}

impl Destination {
    pub(crate) fn protocol(&self) -> Protocol {
        match self {
            Destination::Target(target, _) => target.protocol,
            Destination::Direct(..) => Protocol::Detect,
        }
    }
}

/// How to find a connection's target in a newer configuration snapshot.
#[derive(Debug, Clone)]
pub(crate) enum TargetKey {
    /// The outbound service at this original destination.
    Service(SocketAddr),
    /// The explicit listener of this name.
    Listener(String),
}

/// The routes of one target, read from the configuration snapshot current at each request.
#[derive(Debug)]
pub(crate) struct LiveRoutes {
    pub(crate) mesh: tokio::sync::watch::Receiver<Arc<weft_model::Mesh>>,
    pub(crate) key: TargetKey,
}

impl weft_http::RouteSource for LiveRoutes {
    fn current(&self) -> Option<Arc<weft_model::RouteTable>> {
        let mesh = self.mesh.borrow().clone();
        match &self.key {
            TargetKey::Service(dst) => mesh.outbound.as_ref()?.service_for(*dst).map(|t| t.route.clone()),
            TargetKey::Listener(name) => mesh
                .listeners
                .iter()
                .find(|l| &l.name == name)
                .map(|l| l.target.route.clone()),
        }
    }
}

/// Which listener's authorization policy holds a connection to account.
#[derive(Debug, Clone)]
pub(crate) enum AuthzKey {
    Inbound,
    Listener(String),
}

/// The current policy of one listener for one layer, read from the snapshot in force at each request
/// (or, for TCP, at connect time and at every configuration change).
#[derive(Debug)]
pub(crate) struct LivePolicy {
    pub(crate) mesh: tokio::sync::watch::Receiver<Arc<weft_model::Mesh>>,
    pub(crate) key: AuthzKey,
    pub(crate) http: bool,
}

impl weft_authz::connection::PolicySource for LivePolicy {
    fn current(&self) -> Arc<weft_authz::Authorization> {
        let mesh = self.mesh.borrow().clone();
        let authorization = match &self.key {
            AuthzKey::Inbound => mesh.inbound.as_ref().map(|i| &i.authorization),
            AuthzKey::Listener(name) => mesh
                .listeners
                .iter()
                .find(|l| &l.name == name)
                .map(|l| &l.authorization),
        };
        match authorization {
            Some(a) if self.http => a.http.clone(),
            Some(a) => a.tcp.clone(),
            // The listener is gone from the configuration: nothing may pass any more.
            None => Arc::new(weft_authz::Authorization {
                filters: vec![weft_authz::RbacFilter {
                    rules: Some(weft_authz::Rbac {
                        action: weft_authz::Action::Allow,
                        policies: Vec::new(),
                    }),
                    shadow: None,
                }],
            }),
        }
    }
}

/// A connection whose destination is decided.
#[derive(Debug)]
pub(crate) struct Routed {
    pub(crate) stream: TcpStream,
    /// The address of the peer that connected.
    pub(crate) source: SocketAddr,
    /// Where peers' traffic arrives: the policy its requests and connections are held to.
    pub(crate) authz: Option<AuthzKey>,
    pub(crate) orig_dst: SocketAddr,
    pub(crate) destination: Destination,
    /// Overrides the destination's protocol (inbound ports declare theirs).
    pub(crate) protocol: Option<Protocol>,
    pub(crate) peers: Peers,
    pub(crate) inbound: bool,
    /// Whether peers must, may or may not use mutual TLS on this connection.
    pub(crate) peer_authentication: PeerAuthentication,
    /// How HTTP is served on this connection.
    pub(crate) http: HttpSettings,
    /// The listener's access logs (empty: the proxy's own).
    pub(crate) access_log: Arc<AccessLogSet>,
    pub(crate) tracing: weft_telemetry::traces::ListenerTracing,
}
