//! The ADS client: one State-of-the-World stream to the control plane carrying all four resource types.
//!
//! Every response is answered at once: ACK (its version and nonce) when every resource in it was
//! accepted, NACK (the last accepted version, its nonce, and an `error_detail` naming each rejected
//! resource and field) otherwise. A rejected resource rejects only itself: the others in the response
//! apply, and it keeps its last accepted version. After each accepted change the whole model is rebuilt
//! off the data path and published.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3::Cluster as XCluster;
use envoy_types::pb::envoy::config::core::v3::Node as XNode;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::Listener as XListener;
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
use envoy_types::pb::google::rpc::Status;
use prost::Name;
use serde::Serialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use weft_model::{Mesh, Node};

use crate::convert::{self, ResourceError};
use crate::received::ReceivedResources;
use crate::state::XdsState;

/// gRPC's INVALID_ARGUMENT, the code Envoy puts in a NACK's `error_detail`.
const INVALID_ARGUMENT: i32 = 3;
const BACKOFF_BASE: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(15);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The four resource types, in the order a proxy asks for them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum ResourceType {
    Cluster,
    ClusterLoadAssignment,
    Listener,
    RouteConfiguration,
}

impl ResourceType {
    pub const ALL: [ResourceType; 4] = [
        Self::Cluster,
        Self::ClusterLoadAssignment,
        Self::Listener,
        Self::RouteConfiguration,
    ];

    pub fn type_url(self) -> String {
        match self {
            Self::Cluster => XCluster::type_url(),
            Self::ClusterLoadAssignment => ClusterLoadAssignment::type_url(),
            Self::Listener => XListener::type_url(),
            Self::RouteConfiguration => RouteConfiguration::type_url(),
        }
    }

    fn from_type_url(url: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.type_url() == url)
    }

    /// LDS and CDS are wildcard subscriptions; their responses carry the whole state.
    fn is_wildcard(self) -> bool {
        matches!(self, Self::Cluster | Self::Listener)
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Cluster => "Cluster",
            Self::ClusterLoadAssignment => "ClusterLoadAssignment",
            Self::Listener => "Listener",
            Self::RouteConfiguration => "RouteConfiguration",
        }
    }
}

/// Where the control plane is and how long to wait for a first complete configuration.
#[derive(Debug, Clone)]
pub struct XdsConfig {
    pub address: String,
    /// The root an `https://` control plane is verified against.
    pub root_pem: Option<String>,
    pub node: Node,
    pub initial_fetch_timeout: Duration,
}

/// What the admin port shows about the xDS stream.
#[derive(Debug, Clone, Default, Serialize)]
pub struct XdsStatus {
    pub control_plane: String,
    pub connected: bool,
    pub types: BTreeMap<ResourceType, TypeStatus>,
    /// Resources referenced but not received yet.
    pub warming: Vec<String>,
    /// The resources as received, for the config dump.
    #[serde(skip)]
    pub received: ReceivedResources,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct TypeStatus {
    pub accepted_version: String,
    pub resources: usize,
    pub last_nack: Option<Nack>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Nack {
    pub version: String,
    pub reason: String,
}

/// Callbacks into the proxy. They are called from the client's task, never on the data path.
pub struct Hooks {
    /// A new model to publish.
    pub update: Box<dyn Fn(Mesh) + Send + Sync>,
    /// The first complete configuration arrived, or the initial-fetch timeout passed.
    pub ready: Box<dyn Fn() + Send + Sync>,
    /// Counters: (type, accepted).
    pub counted: Box<dyn Fn(ResourceType, bool) + Send + Sync>,
    pub connected: Box<dyn Fn(bool) + Send + Sync>,
}

impl std::fmt::Debug for Hooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Hooks")
    }
}

/// Starts the client on the current runtime; it runs until `stop` is cancelled.
pub fn spawn(config: XdsConfig, base: Mesh, hooks: Hooks, stop: CancellationToken) -> Arc<Mutex<XdsStatus>> {
    let status = Arc::new(Mutex::new(XdsStatus {
        control_plane: config.address.clone(),
        ..Default::default()
    }));
    let hooks = Arc::new(hooks);
    let timeout = config.initial_fetch_timeout;
    let ready_hooks = hooks.clone();
    let stop_timer = stop.clone();
    tokio::spawn(async move {
        tokio::select! {
            () = tokio::time::sleep(timeout) => (ready_hooks.ready)(),
            () = stop_timer.cancelled() => {}
        }
    });
    let client = Client {
        config,
        base,
        hooks,
        status: status.clone(),
        state: XdsState::default(),
        received: ReceivedResources::default(),
        streams: BTreeMap::new(),
    };
    tokio::spawn(async move {
        tokio::select! {
            () = client.run() => {}
            () = stop.cancelled() => {}
        }
    });
    status
}

struct Client {
    config: XdsConfig,
    base: Mesh,
    hooks: Arc<Hooks>,
    status: Arc<Mutex<XdsStatus>>,
    state: XdsState,
    received: ReceivedResources,
    /// Per type: last accepted version and the names subscribed (versions survive reconnects).
    streams: BTreeMap<ResourceType, Subscription>,
}

#[derive(Debug, Default, Clone)]
struct Subscription {
    version: String,
    nonce: String,
    names: BTreeSet<String>,
    received: bool,
}

#[derive(Debug, thiserror::Error)]
enum StreamError {
    #[error("stream failed: {0}")]
    Grpc(#[from] tonic::Status),
    #[error("invalid control plane address: {0}")]
    Address(String),
}

impl Client {
    async fn run(mut self) {
        let mut attempt = 0u32;
        loop {
            let got_responses = match self.stream().await {
                Ok(()) => {
                    tracing::warn!(control_plane = %self.config.address, "xDS stream closed by the control plane");
                    true
                }
                Err((got, err)) => {
                    tracing::warn!(control_plane = %self.config.address, error = %err, "xDS stream failed; keeping the last configuration");
                    got
                }
            };
            self.set_connected(false);
            attempt = if got_responses {
                0
            } else {
                attempt.saturating_add(1)
            };
            tokio::time::sleep(backoff(attempt)).await;
        }
    }

    /// One stream, until it ends. Reports whether any response arrived (to reset the backoff).
    async fn stream(&mut self) -> Result<(), (bool, StreamError)> {
        let channel = weft_identity::channel::channel(
            &self.config.address,
            self.config.root_pem.as_deref(),
            CONNECT_TIMEOUT,
        )
        .map_err(|e| (false, StreamError::Address(e.to_string())))?;
        let mut client = AggregatedDiscoveryServiceClient::new(channel);
        let (tx, rx) = mpsc::unbounded_channel();
        // Nonces do not survive a stream; versions and subscriptions do.
        for sub in self.streams.values_mut() {
            sub.nonce.clear();
        }
        for ty in ResourceType::ALL {
            if ty.is_wildcard() || !self.subscription(ty).names.is_empty() {
                let _ = tx.send(self.request(ty, None));
            }
        }
        let requests = tokio_stream::wrappers::UnboundedReceiverStream::new(rx);
        let mut responses = client
            .stream_aggregated_resources(requests)
            .await
            .map_err(|e| (false, e.into()))?
            .into_inner();
        self.set_connected(true);
        tracing::info!(control_plane = %self.config.address, "xDS stream open");
        let mut got = false;
        loop {
            match responses.message().await {
                Ok(Some(response)) => {
                    got = true;
                    self.handle(response, &tx);
                }
                Ok(None) => return Ok(()),
                Err(status) => return Err((got, status.into())),
            }
        }
    }

    fn subscription(&mut self, ty: ResourceType) -> &mut Subscription {
        self.streams.entry(ty).or_default()
    }

    fn request(&mut self, ty: ResourceType, error: Option<String>) -> DiscoveryRequest {
        let node = node(&self.config.node);
        let sub = self.subscription(ty);
        DiscoveryRequest {
            version_info: sub.version.clone(),
            node: Some(node),
            resource_names: if ty.is_wildcard() {
                Vec::new()
            } else {
                sub.names.iter().cloned().collect()
            },
            type_url: ty.type_url(),
            response_nonce: sub.nonce.clone(),
            error_detail: error.map(|message| Status {
                code: INVALID_ARGUMENT,
                message,
                details: Vec::new(),
            }),
            ..Default::default()
        }
    }

    fn handle(&mut self, response: DiscoveryResponse, tx: &mpsc::UnboundedSender<DiscoveryRequest>) {
        let Some(ty) = ResourceType::from_type_url(&response.type_url) else {
            tracing::warn!(type_url = %response.type_url, "ignoring a response of a type never asked for");
            return;
        };
        let errors = self.apply(ty, &response);
        let sub = self.subscription(ty);
        sub.nonce = response.nonce.clone();
        sub.received = true;
        if errors.is_empty() {
            sub.version = response.version_info.clone();
            let _ = tx.send(self.request(ty, None));
            (self.hooks.counted)(ty, true);
            tracing::debug!(r#type = ty.name(), version = %response.version_info, "xDS update accepted");
        } else {
            let reason = errors
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; ");
            tracing::warn!(r#type = ty.name(), version = %response.version_info, %reason, "xDS update rejected (NACK)");
            let _ = tx.send(self.request(ty, Some(reason.clone())));
            (self.hooks.counted)(ty, false);
            if let Ok(mut status) = self.status.lock() {
                status.types.entry(ty).or_default().last_nack = Some(Nack {
                    version: response.version_info.clone(),
                    reason,
                });
            }
        }

        // New references mean new subscriptions: CDS -> EDS, LDS -> RDS.
        let follow = match ty {
            ResourceType::Cluster => Some((ResourceType::ClusterLoadAssignment, self.state.eds_names())),
            ResourceType::Listener => Some((ResourceType::RouteConfiguration, self.state.rds_names())),
            _ => None,
        };
        if let Some((dependent, names)) = follow
            && self.subscription(dependent).names != names
        {
            self.subscription(dependent).names = names;
            let _ = tx.send(self.request(dependent, None));
        }

        self.publish();
    }

    /// Applies what is valid in a response; returns what was rejected.
    fn apply(&mut self, ty: ResourceType, response: &DiscoveryResponse) -> Vec<ResourceError> {
        let mut errors = Vec::new();
        let mut seen = BTreeSet::new();
        macro_rules! each {
            ($msg:ty, $name:expr, $convert:expr, $map:expr) => {{
                let mut accepted = BTreeMap::new();
                for any in &response.resources {
                    let resource: $msg = match convert::decode(any) {
                        Ok(r) => r,
                        Err(e) => {
                            errors.push(e);
                            continue;
                        }
                    };
                    let name: String = $name(&resource);
                    if !seen.insert(name.clone()) {
                        self.received.reject(
                            ty,
                            &name,
                            any,
                            &response.version_info,
                            "appears twice in one response".into(),
                        );
                        errors.push(ResourceError {
                            kind: ty.name(),
                            name,
                            field: "name".into(),
                            problem: "appears twice in one response".into(),
                        });
                        continue;
                    }
                    match $convert(&resource) {
                        Ok(spec) => {
                            self.received.accept(ty, &name, any, &response.version_info);
                            accepted.insert(name, spec);
                        }
                        Err(e) => {
                            self.received
                                .reject(ty, &name, any, &response.version_info, e.to_string());
                            errors.push(e)
                        }
                    }
                }
                let map = $map;
                if ty.is_wildcard() {
                    // State of the world: what is absent is deleted, but a rejected resource keeps its last
                    // accepted version.
                    map.retain(|name, _| seen.contains(name));
                }
                map.extend(accepted);
            }};
        }
        match ty {
            ResourceType::Cluster => each!(
                XCluster,
                |c: &XCluster| c.name.clone(),
                convert::cluster,
                &mut self.state.clusters
            ),
            ResourceType::Listener => each!(
                XListener,
                |l: &XListener| l.name.clone(),
                convert::listener,
                &mut self.state.listeners
            ),
            ResourceType::RouteConfiguration => each!(
                RouteConfiguration,
                |r: &RouteConfiguration| r.name.clone(),
                convert::route_configuration,
                &mut self.state.routes
            ),
            ResourceType::ClusterLoadAssignment => each!(
                ClusterLoadAssignment,
                |c: &ClusterLoadAssignment| c.cluster_name.clone(),
                convert::load_assignment,
                &mut self.state.endpoints
            ),
        }
        self.received.retain_rejected(ty, |n| seen.contains(n));
        // Forget dependents nothing refers to any more.
        let eds = self.state.eds_names();
        self.state.endpoints.retain(|name, _| eds.contains(name));
        let rds = self.state.rds_names();
        self.state.routes.retain(|name, _| rds.contains(name));
        let state = &self.state;
        self.received
            .retain(ResourceType::Cluster, |n| state.clusters.contains_key(n));
        self.received.retain(ResourceType::ClusterLoadAssignment, |n| {
            state.endpoints.contains_key(n)
        });
        self.received
            .retain(ResourceType::Listener, |n| state.listeners.contains_key(n));
        self.received
            .retain(ResourceType::RouteConfiguration, |n| state.routes.contains_key(n));
        errors
    }

    fn publish(&mut self) {
        let warming = self.state.warming();
        let complete = warming.is_empty()
            && [ResourceType::Cluster, ResourceType::Listener]
                .iter()
                .all(|t| self.streams.get(t).is_some_and(|s| s.received));
        if let Ok(mut status) = self.status.lock() {
            status.warming = warming;
            status.received = self.received.clone();
            for (ty, sub) in &self.streams {
                let entry = status.types.entry(*ty).or_default();
                entry.accepted_version = sub.version.clone();
                entry.resources = match ty {
                    ResourceType::Cluster => self.state.clusters.len(),
                    ResourceType::ClusterLoadAssignment => self.state.endpoints.len(),
                    ResourceType::Listener => self.state.listeners.len(),
                    ResourceType::RouteConfiguration => self.state.routes.len(),
                };
            }
        }
        (self.hooks.update)(self.state.build(&self.base));
        if complete {
            (self.hooks.ready)();
        }
    }

    fn set_connected(&self, connected: bool) {
        if let Ok(mut status) = self.status.lock() {
            status.connected = connected;
        }
        (self.hooks.connected)(connected);
    }
}

/// Fully jittered exponential backoff: uniform in [0, min(max, base * 2^attempt)].
fn backoff(attempt: u32) -> Duration {
    let cap = BACKOFF_BASE
        .saturating_mul(1u32 << attempt.min(16))
        .min(BACKOFF_MAX);
    cap.mul_f64(rand::random::<f64>()).max(Duration::from_millis(10))
}

/// The node as Envoy and Istio describe it: id plus Istio's metadata keys.
pub(crate) fn node(n: &Node) -> XNode {
    let string = |s: &str| Value {
        kind: Some(Kind::StringValue(s.to_owned())),
    };
    let mut fields = std::collections::HashMap::new();
    fields.insert("NAMESPACE".to_owned(), string(&n.namespace));
    fields.insert("WORKLOAD_NAME".to_owned(), string(&n.workload));
    fields.insert("NAME".to_owned(), string(&n.pod));
    fields.insert("SERVICE_ACCOUNT".to_owned(), string(&n.service_account));
    XNode {
        id: n.id.clone(),
        cluster: format!("{}.{}", n.workload, n.namespace),
        metadata: Some(Struct { fields }),
        user_agent_name: "weft".into(),
        ..Default::default()
    }
}
