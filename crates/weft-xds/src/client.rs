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
    /// The largest response taken (gRPC's 4 MiB default holds about 7,000 clusters).
    pub max_message_bytes: usize,
}

/// What became of a response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Every resource in it was applied (ACK).
    Accepted,
    /// Some resource in it was refused (NACK).
    Rejected,
    /// It was larger than `max_message_bytes`: not read at all.
    TooLarge,
}

impl Outcome {
    pub fn name(self) -> &'static str {
        match self {
            Self::Accepted => "accepted",
            Self::Rejected => "rejected",
            Self::TooLarge => "too_large",
        }
    }
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
    /// Responses received since start.
    pub responses: u64,
    /// Whether `initial_fetch_timeout` has passed.
    pub initial_fetch_timed_out: bool,
    /// Why the stream last failed, while it is down.
    pub last_error: Option<String>,
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
    /// The first complete configuration arrived, or part of one and the initial-fetch timeout passed.
    pub ready: Box<dyn Fn() + Send + Sync>,
    /// What the first configuration still lacks, each time that changes until it is ready.
    pub waiting: Box<dyn Fn(String) + Send + Sync>,
    /// Counters: the response's type (unknown for one too large to read) and what became of it.
    pub counted: Box<dyn Fn(Option<ResourceType>, Outcome) + Send + Sync>,
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
    let (ready_hooks, timer_status) = (hooks.clone(), status.clone());
    let stop_timer = stop.clone();
    tokio::spawn(async move {
        tokio::select! {
            () = tokio::time::sleep(timeout) => initial_fetch_timed_out(&timer_status, &ready_hooks, timeout),
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
        reported_too_large: None,
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
    /// The last "response too large" logged, so that each reconnect does not log it again.
    reported_too_large: Option<String>,
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
    #[error("a response is larger than xds.max_message_bytes: {0}")]
    TooLarge(String),
    #[error("invalid control plane address: {0}")]
    Address(String),
}

impl Client {
    async fn run(mut self) {
        let mut attempt = 0u32;
        loop {
            let (got_responses, error) = match self.stream().await {
                Ok(()) => {
                    tracing::warn!(control_plane = %self.config.address, "xDS stream closed by the control plane");
                    (true, "the control plane closed the stream".to_owned())
                }
                Err((_, StreamError::TooLarge(message))) => {
                    if self.reported_too_large.as_ref() != Some(&message) {
                        tracing::error!(
                            control_plane = %self.config.address,
                            limit = self.config.max_message_bytes,
                            %message,
                            "a response from the control plane is larger than xds.max_message_bytes and was not read; \
                             keeping the last configuration and retrying slowly. Raise xds.max_message_bytes, or scope \
                             what this proxy is sent (Istio's Sidecar egress.hosts)"
                        );
                        self.reported_too_large = Some(message.clone());
                    }
                    (self.hooks.counted)(None, Outcome::TooLarge);
                    self.record_failure(format!(
                        "a response is larger than xds.max_message_bytes: {message}"
                    ));
                    // It will not shrink by itself, and every proxy of the mesh meets it at once: retry at
                    // the slowest pace, spread over its second half.
                    tokio::time::sleep(BACKOFF_MAX.mul_f64(0.5 + rand::random::<f64>() / 2.0)).await;
                    continue;
                }
                Err((got, err)) => {
                    tracing::warn!(control_plane = %self.config.address, error = %err, "xDS stream failed; keeping the last configuration");
                    (got, err.to_string())
                }
            };
            self.record_failure(error);
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
        let mut client = AggregatedDiscoveryServiceClient::new(channel)
            .max_decoding_message_size(self.config.max_message_bytes)
            .max_encoding_message_size(self.config.max_message_bytes);
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
        if let Ok(mut status) = self.status.lock() {
            status.last_error = None;
        }
        tracing::info!(control_plane = %self.config.address, "xDS stream open");
        let mut got = false;
        loop {
            match responses.message().await {
                Ok(Some(response)) => {
                    got = true;
                    self.handle(response, &tx);
                }
                Ok(None) => return Ok(()),
                Err(status) if status.code() == tonic::Code::OutOfRange => {
                    return Err((got, StreamError::TooLarge(status.message().to_owned())));
                }
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

    /// Applies a response, publishes the result, then answers it: an ACK says the configuration is in
    /// force (Envoy's order), so a control plane that sees it knows traffic follows the change.
    fn handle(&mut self, response: DiscoveryResponse, tx: &mpsc::UnboundedSender<DiscoveryRequest>) {
        let Some(ty) = ResourceType::from_type_url(&response.type_url) else {
            tracing::warn!(type_url = %response.type_url, "ignoring a response of a type never asked for");
            return;
        };
        if let Ok(mut status) = self.status.lock() {
            status.responses += 1;
        }
        let errors = self.apply(ty, &response);
        let sub = self.subscription(ty);
        sub.nonce = response.nonce.clone();
        sub.received = true;
        if errors.is_empty() {
            sub.version = response.version_info.clone();
        }
        self.publish();

        if errors.is_empty() {
            let _ = tx.send(self.request(ty, None));
            (self.hooks.counted)(Some(ty), Outcome::Accepted);
            tracing::debug!(r#type = ty.name(), version = %response.version_info, "xDS update accepted");
        } else {
            let reason = errors
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; ");
            tracing::warn!(r#type = ty.name(), version = %response.version_info, %reason, "xDS update rejected (NACK)");
            let _ = tx.send(self.request(ty, Some(reason.clone())));
            (self.hooks.counted)(Some(ty), Outcome::Rejected);
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

    /// What the configuration still lacks: a wildcard type not received yet, then every resource
    /// referenced and not received (warming).
    fn missing(&self) -> Vec<String> {
        let mut missing: Vec<String> = [ResourceType::Cluster, ResourceType::Listener]
            .into_iter()
            .filter(|t| !self.streams.get(t).is_some_and(|s| s.received))
            .map(|t| format!("{}s (none received yet)", t.name()))
            .collect();
        missing.extend(self.state.warming());
        missing
    }

    fn publish(&mut self) {
        let missing = self.missing();
        let complete = missing.is_empty();
        let mut timed_out = false;
        if let Ok(mut status) = self.status.lock() {
            status.warming.clone_from(&missing);
            status.received = self.received.clone();
            timed_out = status.initial_fetch_timed_out;
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
        if complete || timed_out {
            (self.hooks.ready)();
        } else {
            (self.hooks.waiting)(summary(&missing));
        }
    }

    /// The stream is down: why, for the admin view and, before any configuration, for readiness.
    fn record_failure(&self, error: String) {
        self.set_connected(false);
        let first = self.status.lock().is_ok_and(|mut status| {
            status.last_error = Some(error.clone());
            status.responses == 0
        });
        if first {
            (self.hooks.waiting)(format!(
                "no configuration from {} yet: {error}",
                self.config.address
            ));
        }
    }

    fn set_connected(&self, connected: bool) {
        if let Ok(mut status) = self.status.lock() {
            status.connected = connected;
        }
        (self.hooks.connected)(connected);
    }
}

/// `initial_fetch_timeout` passed. A partial configuration is served from now on, and what it lacks is
/// logged. With none at all the proxy stays not ready: reporting ready with nothing from the control
/// plane would let the pod's traffic flow unmeshed.
fn initial_fetch_timed_out(status: &Mutex<XdsStatus>, hooks: &Hooks, timeout: Duration) {
    let Ok(mut status) = status.lock() else {
        return;
    };
    status.initial_fetch_timed_out = true;
    if status.responses == 0 {
        tracing::warn!(
            control_plane = %status.control_plane,
            error = status.last_error.as_deref().unwrap_or("none yet"),
            "no configuration from the control plane after initial_fetch_timeout ({timeout:?}); not ready until one arrives"
        );
    } else if !status.warming.is_empty() {
        tracing::warn!(
            control_plane = %status.control_plane,
            missing = %summary(&status.warming),
            "initial_fetch_timeout ({timeout:?}) passed with part of the configuration; serving it, ready"
        );
        drop(status);
        (hooks.ready)();
    }
}

/// The first few of a list of what is missing, and how many more.
fn summary(missing: &[String]) -> String {
    const SHOWN: usize = 5;
    let mut text = format!("missing {}", missing[..missing.len().min(SHOWN)].join(", "));
    if missing.len() > SHOWN {
        text.push_str(&format!(" and {} more", missing.len() - SHOWN));
    }
    text
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
