//! The ADS server (State of the World). Each stream learns its proxy from the first request's node,
//! computes that proxy's resources, answers subscriptions, and pushes a type again only when its
//! version (a hash of the content) changed: a configuration change reaches the proxies it affects
//! and no others.

use std::collections::{BTreeMap, BTreeSet};
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::AggregatedDiscoveryService;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::google::protobuf::value::Kind;
use futures_util::Stream;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::resources::Catalog;
use crate::translate::{NodeInfo, Snapshot};

/// Push order that never sends a reference before what it refers to (Envoy's make-before-break).
const ORDER: [&str; 4] = [
    "type.googleapis.com/envoy.config.cluster.v3.Cluster",
    "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment",
    "type.googleapis.com/envoy.config.listener.v3.Listener",
    "type.googleapis.com/envoy.config.route.v3.RouteConfiguration",
];

/// A NACK a proxy sent: which proxy, which type, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NackRecord {
    pub node: String,
    pub type_url: String,
    pub message: String,
}

/// What the server observed, for the control plane's report and tests.
#[derive(Debug, Default)]
pub struct Observed {
    pub nacks: Mutex<Vec<NackRecord>>,
    /// Responses sent, per node id.
    pub pushes: Mutex<BTreeMap<String, u64>>,
    /// What the monitoring port reports.
    pub monitoring: crate::monitoring::Monitoring,
}

#[derive(Debug, Clone)]
pub struct AdsServer {
    catalog: watch::Receiver<Arc<Catalog>>,
    observed: Arc<Observed>,
}

impl AdsServer {
    pub fn new(catalog: watch::Receiver<Arc<Catalog>>, observed: Arc<Observed>) -> Self {
        Self { catalog, observed }
    }
}

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl AggregatedDiscoveryService for AdsServer {
    type StreamAggregatedResourcesStream = ResponseStream<DiscoveryResponse>;
    type DeltaAggregatedResourcesStream = ResponseStream<DeltaDiscoveryResponse>;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        let (tx, rx) = mpsc::channel(16);
        let stream = AdsStream {
            tx,
            catalog: self.catalog.clone(),
            observed: self.observed.clone(),
            node: None,
            node_id: String::new(),
            stream: None,
            snapshot: Arc::default(),
            subscriptions: BTreeMap::new(),
            nonce: 0,
        };
        tokio::spawn(stream.run(request.into_inner()));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn delta_aggregated_resources(
        &self,
        _request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        Err(Status::unimplemented(
            "weft control serves State-of-the-World ADS; delta xDS is not implemented yet",
        ))
    }
}

#[derive(Debug, Default)]
struct Subscription {
    /// `None`: wildcard (all resources of the type).
    names: Option<BTreeSet<String>>,
    sent_version: Option<String>,
}

struct AdsStream {
    tx: mpsc::Sender<Result<DiscoveryResponse, Status>>,
    catalog: watch::Receiver<Arc<Catalog>>,
    observed: Arc<Observed>,
    node: Option<NodeInfo>,
    node_id: String,
    /// The stream's number in the monitoring report, once the proxy has said who it is.
    stream: Option<u64>,
    snapshot: Arc<Snapshot>,
    subscriptions: BTreeMap<String, Subscription>,
    nonce: u64,
}

impl AdsStream {
    async fn run(mut self, requests: Streaming<DiscoveryRequest>) {
        self.serve(requests).await;
        if let Some(stream) = self.stream {
            self.observed.monitoring.disconnected(stream);
        }
    }

    async fn serve(&mut self, mut requests: Streaming<DiscoveryRequest>) {
        loop {
            tokio::select! {
                request = requests.message() => match request {
                    Ok(Some(request)) => {
                        if self.request(request).await.is_err() {
                            return;
                        }
                    }
                    Ok(None) => return,
                    Err(status) => {
                        tracing::debug!(node = %self.node_id, %status, "xDS stream ended");
                        return;
                    }
                },
                changed = self.catalog.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    if self.push_changes().await.is_err() {
                        return;
                    }
                }
            }
        }
    }

    async fn request(&mut self, request: DiscoveryRequest) -> Result<(), ()> {
        if self.node.is_none() {
            let (info, id) = node_info(request.node.as_ref());
            tracing::info!(node = %id, workload = %info.workload, namespace = %info.namespace, "proxy connected");
            self.stream = Some(
                self.observed
                    .monitoring
                    .connected(&id, &info.workload, &info.namespace),
            );
            self.snapshot = self.catalog.borrow().snapshot_for(&info);
            self.node = Some(info);
            self.node_id = id;
        }
        let type_url = request.type_url.clone();
        if let Some(stream) = self.stream
            && !request.response_nonce.is_empty()
        {
            self.observed.monitoring.answered(
                stream,
                &type_url,
                &request.response_nonce,
                &request.version_info,
                request.error_detail.as_ref().map(|e| e.message.as_str()),
            );
        }
        if let Some(error) = &request.error_detail {
            tracing::warn!(node = %self.node_id, %type_url, reason = %error.message, "proxy rejected configuration (NACK)");
            if let Ok(mut nacks) = self.observed.nacks.lock() {
                nacks.push(NackRecord {
                    node: self.node_id.clone(),
                    type_url,
                    message: error.message.clone(),
                });
            }
            return Ok(());
        }
        let wildcard = request.resource_names.is_empty() && is_wildcard_type(&type_url);
        let names = if wildcard {
            None
        } else {
            Some(request.resource_names.iter().cloned().collect())
        };
        let sub = self.subscriptions.entry(type_url.clone()).or_default();
        let first = sub.sent_version.is_none();
        let names_changed = sub.names != names;
        sub.names = names;
        if first || names_changed {
            return self.send(&type_url).await;
        }
        Ok(())
    }

    async fn push_changes(&mut self) -> Result<(), ()> {
        let Some(node) = &self.node else { return Ok(()) };
        let next = self.catalog.borrow().snapshot_for(node);
        if next == self.snapshot {
            return Ok(());
        }
        self.snapshot = next;
        for type_url in ORDER {
            let changed = self.subscriptions.get(type_url).is_some_and(|sub| {
                sub.sent_version.as_deref() != self.snapshot.get(type_url).map(|t| t.version.as_str())
            });
            if changed {
                self.send(type_url).await?;
            }
        }
        Ok(())
    }

    async fn send(&mut self, type_url: &str) -> Result<(), ()> {
        let empty = Default::default();
        let typed = self.snapshot.get(type_url).unwrap_or(&empty);
        let Some(sub) = self.subscriptions.get_mut(type_url) else {
            return Ok(());
        };
        let resources = typed
            .resources
            .iter()
            .filter(|(name, _)| sub.names.as_ref().is_none_or(|names| names.contains(*name)))
            .map(|(_, any)| any.clone())
            .collect();
        sub.sent_version = Some(typed.version.clone());
        self.nonce += 1;
        let response = DiscoveryResponse {
            version_info: typed.version.clone(),
            resources,
            type_url: type_url.to_owned(),
            nonce: self.nonce.to_string(),
            ..Default::default()
        };
        if let Ok(mut pushes) = self.observed.pushes.lock() {
            *pushes.entry(self.node_id.clone()).or_default() += 1;
        }
        if let Some(stream) = self.stream {
            self.observed
                .monitoring
                .sent(stream, type_url, &response.version_info, &response.nonce);
        }
        self.tx.send(Ok(response)).await.map_err(|_| ())
    }
}

fn is_wildcard_type(type_url: &str) -> bool {
    type_url == ORDER[0] || type_url == ORDER[2]
}

/// The workload and namespace a proxy serves, from Istio's node metadata, else from an Istio-style id
/// (`sidecar~<ip>~<workload>.<namespace>~...`).
fn node_info(node: Option<&Node>) -> (NodeInfo, String) {
    let id = node.map(|n| n.id.clone()).unwrap_or_default();
    let meta = |key: &str| {
        node.and_then(|n| n.metadata.as_ref())
            .and_then(|m| m.fields.get(key))
            .and_then(|v| match &v.kind {
                Some(Kind::StringValue(s)) => Some(s.clone()),
                _ => None,
            })
    };
    let from_id = id
        .split('~')
        .nth(2)
        .and_then(|w| w.split_once('.'))
        .map(|(w, ns)| (w.to_owned(), ns.to_owned()));
    // Its own WorkloadEntry is found by the instance's name (Istio's `NAME`, the pod), not by the
    // workload it belongs to, which many instances share.
    let workload = meta("NAME")
        .or_else(|| meta("WORKLOAD_NAME"))
        .or_else(|| from_id.as_ref().map(|(w, _)| w.clone()))
        .unwrap_or_default();
    let namespace = meta("NAMESPACE")
        .or_else(|| from_id.map(|(_, ns)| ns))
        .unwrap_or_else(|| crate::resources::DEFAULT_NAMESPACE.to_owned());
    (NodeInfo { workload, namespace }, id)
}
