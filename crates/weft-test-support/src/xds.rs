//! A minimal ADS server that is not `weft control`: built directly on the generated xDS types, it
//! serves whatever hand-written Envoy-style resources a test gives it, and records every request the
//! proxy sends (so tests can see ACKs and NACKs).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::google::protobuf::Any;
use futures_util::Stream;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status, Streaming};

/// Per type URL: version and resources.
type Resources = BTreeMap<String, (String, Vec<Any>)>;

#[derive(Debug, Clone)]
pub struct TestXdsServer {
    pub addr: SocketAddr,
    resources: Arc<watch::Sender<Resources>>,
    requests: Arc<Mutex<Vec<DiscoveryRequest>>>,
}

impl TestXdsServer {
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind xds");
        let addr = listener.local_addr().expect("addr");
        let (tx, _) = watch::channel(Resources::new());
        let resources = Arc::new(tx);
        let requests = Arc::new(Mutex::new(Vec::new()));
        let service = Service {
            resources: resources.clone(),
            requests: requests.clone(),
        };
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(AggregatedDiscoveryServiceServer::new(service))
                .serve_with_incoming(TcpListenerStream::new(listener)),
        );
        Self {
            addr,
            resources,
            requests,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Replaces the resources of one type and pushes them to every connected proxy.
    pub fn set(&self, type_url: &str, version: &str, resources: Vec<Any>) {
        self.resources.send_modify(|all| {
            all.insert(type_url.to_owned(), (version.to_owned(), resources));
        });
    }

    pub fn requests(&self) -> Vec<DiscoveryRequest> {
        self.requests.lock().expect("requests").clone()
    }

    /// (type URL, version the proxy still has, message) of every NACK.
    pub fn nacks(&self) -> Vec<(String, String, String)> {
        self.requests()
            .into_iter()
            .filter_map(|r| r.error_detail.map(|e| (r.type_url, r.version_info, e.message)))
            .collect()
    }

    /// Versions the proxy has ACKed for a type, in order.
    pub fn acked_versions(&self, type_url: &str) -> Vec<String> {
        self.requests()
            .into_iter()
            .filter(|r| r.type_url == type_url && r.error_detail.is_none() && !r.response_nonce.is_empty())
            .map(|r| r.version_info)
            .collect()
    }
}

#[derive(Debug, Clone)]
struct Service {
    resources: Arc<watch::Sender<Resources>>,
    requests: Arc<Mutex<Vec<DiscoveryRequest>>>,
}

type Out<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl AggregatedDiscoveryService for Service {
    type StreamAggregatedResourcesStream = Out<DiscoveryResponse>;
    type DeltaAggregatedResourcesStream = Out<DeltaDiscoveryResponse>;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        let (tx, rx) = mpsc::channel(16);
        let mut inbound = request.into_inner();
        let mut resources = self.resources.subscribe();
        let log = self.requests.clone();
        tokio::spawn(async move {
            let mut subscribed: Vec<String> = Vec::new();
            let mut sent: BTreeMap<String, String> = BTreeMap::new();
            let mut nonce = 0u64;
            loop {
                let to_send: Vec<String> = tokio::select! {
                    request = inbound.message() => match request {
                        Ok(Some(request)) => {
                            log.lock().expect("requests").push(request.clone());
                            if subscribed.contains(&request.type_url) {
                                continue;
                            }
                            subscribed.push(request.type_url.clone());
                            vec![request.type_url]
                        }
                        _ => return,
                    },
                    changed = resources.changed() => {
                        if changed.is_err() {
                            return;
                        }
                        let all = resources.borrow();
                        subscribed.iter().filter(|t| all.get(*t).map(|(v, _)| v) != sent.get(*t)).cloned().collect()
                    }
                };
                for type_url in to_send {
                    let Some((version, list)) = resources.borrow().get(&type_url).cloned() else {
                        continue;
                    };
                    nonce += 1;
                    sent.insert(type_url.clone(), version.clone());
                    let response = DiscoveryResponse {
                        version_info: version,
                        resources: list,
                        type_url,
                        nonce: nonce.to_string(),
                        ..Default::default()
                    };
                    if tx.send(Ok(response)).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn delta_aggregated_resources(
        &self,
        _request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        Err(Status::unimplemented("delta"))
    }
}
