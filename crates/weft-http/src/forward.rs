//! Forwarding one request: pick the endpoint, rewrite the request for the next hop, send it over a pooled
//! connection, and stream the response back (or tunnel after an upgrade).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::header::{self, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, StatusCode, Uri, Version};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use weft_model::Cluster;
use weft_model::route::{RequestView, RouteTable};
use weft_telemetry::{Label, Metrics, Peers, RequestLabels, RequestProtocol, ResponseFlags};

use crate::balance::Balancer;
use crate::body::Completion;
use crate::headers::{set_upgrade, strip_hop_by_hop};
use crate::{HttpVersion, PoolSettings, Pools, ProxyBody, UpstreamError};

/// The route table in force for a connection's requests. Looked up for every request, so a configuration
/// change applies to the next request on an open connection.
pub trait RouteSource: std::fmt::Debug + Send + Sync {
    /// `None` when the configuration no longer has routes for this connection.
    fn current(&self) -> Option<Arc<RouteTable>>;
}

const XFCC: &str = "x-forwarded-client-cert";

/// Where requests of a connection go.
#[derive(Debug, Clone)]
pub enum Upstream {
    /// Routed request by request through the current route table.
    Routes(Arc<dyn RouteSource>),
    /// The address the client was going to (egress passthrough, inbound to the app).
    Direct {
        addr: SocketAddr,
        settings: PoolSettings,
    },
}

/// How a request was routed: where it goes and under which deadline.
struct Decision {
    endpoint: SocketAddr,
    settings: PoolSettings,
    timeout: Option<Duration>,
    /// The service the request went to, for `destination_service`, when routing tells.
    service: Option<Label>,
}

/// Per-connection facts every request on it shares.
#[derive(Debug, Clone)]
pub struct HttpContext {
    pub upstream: Upstream,
    /// Where the client was going; the authority of last resort for requests without one.
    pub orig_dst: SocketAddr,
    pub version: HttpVersion,
    pub peers: Peers,
    /// Set as `x-forwarded-client-cert` (the caller's proven identity); any the client sent is removed.
    pub client_cert: Option<HeaderValue>,
}

/// Sends requests upstream. Cheap to clone; shared by all connections.
#[derive(Debug, Clone)]
pub struct Forwarder {
    pools: Arc<Pools>,
    metrics: Arc<Metrics>,
    balancer: Arc<Balancer>,
}

impl Forwarder {
    pub fn new(pools: Arc<Pools>, metrics: Arc<Metrics>) -> Self {
        Self {
            pools,
            metrics,
            balancer: Arc::default(),
        }
    }

    /// A connection for opaque TCP (mutual TLS when the settings ask for it).
    pub async fn connect_tcp(
        &self,
        endpoint: SocketAddr,
        settings: &PoolSettings,
    ) -> Result<crate::UpstreamIo, crate::ConnectError> {
        self.pools.connect_tcp(endpoint, settings).await
    }

    /// An endpoint of `cluster` for a new request or connection, by the cluster's balancing policy.
    pub fn pick_endpoint(&self, cluster: &Cluster) -> Option<(SocketAddr, PoolSettings)> {
        let endpoint = self.balancer.pick(cluster)?;
        let tls = cluster.tls.as_ref().map(|t| t.identities.clone());
        Some((
            endpoint,
            PoolSettings {
                connect_timeout: cluster.connect_timeout,
                idle_timeout: cluster.idle_timeout,
                tls,
            },
        ))
    }

    fn decide(
        &self,
        parts: &http::request::Parts,
        authority: &Authority,
        upstream: &Upstream,
    ) -> Result<Decision, UpstreamError> {
        let table = match upstream {
            Upstream::Direct { addr, settings } => {
                return Ok(Decision {
                    endpoint: *addr,
                    settings: settings.clone(),
                    timeout: None,
                    service: None,
                });
            }
            Upstream::Routes(source) => source.current().ok_or(UpstreamError::NoRoute)?,
        };
        let view = RequestView {
            authority: authority.as_str(),
            path: parts.uri.path_and_query().map_or("/", |p| p.as_str()),
            method: parts.method.as_str(),
            headers: &parts.headers,
        };
        let route = table.route(&view).ok_or(UpstreamError::NoRoute)?;
        let weighted = route
            .action
            .pick(rand::random::<f64>())
            .ok_or(UpstreamError::NoRoute)?;
        let cluster = weighted
            .cluster
            .as_ref()
            .ok_or_else(|| UpstreamError::NoCluster(weighted.name.clone()))?;
        let (endpoint, settings) = self
            .pick_endpoint(cluster)
            .ok_or(UpstreamError::NoHealthyUpstream)?;
        Ok(Decision {
            endpoint,
            settings,
            timeout: route.action.timeout,
            service: Some(service_of(&cluster.name)),
        })
    }

    pub async fn forward(&self, mut req: Request<Incoming>, ctx: &HttpContext) -> Response<ProxyBody> {
        let start = Instant::now();
        let request_protocol = if is_grpc(&req) {
            RequestProtocol::grpc
        } else {
            RequestProtocol::http
        };
        let downstream_upgrade = (ctx.version == HttpVersion::Http1).then(|| hyper::upgrade::on(&mut req));
        let (mut parts, body) = req.into_parts();
        let upgrade = strip_hop_by_hop(&mut parts.headers, ctx.version == HttpVersion::Http2);
        // The proxy answers `Expect: 100-continue` itself: hyper sends `100 Continue` when the body is first
        // read, which happens once the upstream connection is ready for it.
        parts.headers.remove(header::EXPECT);
        // Only the proxy may say who the client is (Envoy's SANITIZE_SET).
        parts.headers.remove(XFCC);
        if let Some(value) = &ctx.client_cert {
            parts.headers.insert(XFCC, value.clone());
        }
        let upgrade = upgrade.filter(|_| ctx.version == HttpVersion::Http1);
        if let Some(protocol) = &upgrade {
            set_upgrade(&mut parts.headers, protocol.clone());
        }

        let authority = request_authority(&parts, ctx.orig_dst);
        let decided = self.decide(&parts, &authority, &ctx.upstream);
        let mut peers = ctx.peers.clone();
        if let Ok(Decision {
            service: Some(service),
            ..
        }) = &decided
        {
            peers.destination_service = service.clone();
        }
        let completion = |status: StatusCode, flags: ResponseFlags| Completion {
            metrics: self.metrics.clone(),
            labels: RequestLabels {
                peers: peers.clone(),
                request_protocol,
                response_code: status.as_u16(),
                response_flags: flags,
            },
            start,
        };
        let Decision {
            endpoint,
            settings,
            timeout,
            ..
        } = match decided {
            Ok(decision) => decision,
            Err(err) => return self.error_response(err, completion),
        };
        if ctx.version == HttpVersion::Http1 && !parts.headers.contains_key(header::HOST) {
            // HTTP/1.0 clients may send no Host; the next hop gets the address the client dialled.
            if let Ok(host) = HeaderValue::from_str(authority.as_str()) {
                parts.headers.insert(header::HOST, host);
            }
        }
        let path = parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        parts.uri = match Uri::builder()
            .scheme(Scheme::HTTP)
            .authority(authority)
            .path_and_query(path)
            .build()
        {
            Ok(uri) => uri,
            Err(_) => return self.bad_request(completion),
        };
        parts.version = match ctx.version {
            HttpVersion::Http1 => Version::HTTP_11,
            HttpVersion::Http2 => Version::HTTP_2,
        };

        let client = self.pools.client(endpoint, ctx.version, settings);
        let request = client.request(Request::from_parts(parts, body));
        let result = match timeout {
            Some(limit) => tokio::time::timeout(limit, request)
                .await
                .map_err(|_| UpstreamError::Timeout(limit)),
            None => Ok(request.await),
        };
        let mut response = match result.and_then(|r| r.map_err(UpstreamError::from_client)) {
            Ok(response) => response,
            Err(err) => {
                tracing::debug!(%endpoint, error = %err, "upstream request failed");
                return self.error_response(err, completion);
            }
        };

        let status = response.status();
        match (status, upgrade, downstream_upgrade) {
            (StatusCode::SWITCHING_PROTOCOLS, Some(protocol), Some(downstream)) => {
                let upstream = hyper::upgrade::on(&mut response);
                tokio::spawn(tunnel(downstream, upstream));
                strip_hop_by_hop(response.headers_mut(), false);
                set_upgrade(response.headers_mut(), protocol);
            }
            _ => {
                strip_hop_by_hop(response.headers_mut(), false);
            }
        }
        let (parts, body) = response.into_parts();
        Response::from_parts(
            parts,
            ProxyBody::upstream(body, completion(status, ResponseFlags::NONE)),
        )
    }

    fn error_response(
        &self,
        err: UpstreamError,
        completion: impl FnOnce(StatusCode, ResponseFlags) -> Completion,
    ) -> Response<ProxyBody> {
        let status = err.status();
        let body = ProxyBody::local(err.body(), Some(completion(status, err.flags())));
        local_response(status, body)
    }

    fn bad_request(
        &self,
        completion: impl FnOnce(StatusCode, ResponseFlags) -> Completion,
    ) -> Response<ProxyBody> {
        let status = StatusCode::BAD_REQUEST;
        let body = ProxyBody::local(
            "bad request",
            Some(completion(status, ResponseFlags::DOWNSTREAM_PROTOCOL_ERROR)),
        );
        local_response(status, body)
    }
}

fn local_response(status: StatusCode, body: ProxyBody) -> Response<ProxyBody> {
    let mut response = Response::new(body);
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    response
}

/// The authority the client meant: the URI's (absolute-form or HTTP/2), then Host, then where it dialled.
fn request_authority(parts: &http::request::Parts, orig_dst: SocketAddr) -> Authority {
    parts
        .uri
        .authority()
        .cloned()
        .or_else(|| {
            let host = parts.headers.get(header::HOST)?;
            Authority::try_from(host.as_bytes()).ok()
        })
        .or_else(|| Authority::try_from(orig_dst.to_string()).ok())
        .unwrap_or_else(|| Authority::from_static("localhost"))
}

/// Istio's clusters are named `outbound|<port>|<subset>|<host>`: the host is the service. Other names
/// stand for themselves.
fn service_of(cluster: &str) -> Label {
    match cluster.rsplit_once('|') {
        Some((_, host)) if cluster.starts_with("outbound|") && !host.is_empty() => Label::from(host),
        _ => Label::from(cluster),
    }
}

fn is_grpc<B>(req: &Request<B>) -> bool {
    req.headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|ct| ct.as_bytes().starts_with(b"application/grpc"))
}

/// After `101 Switching Protocols` both sides speak the new protocol; the proxy copies bytes.
async fn tunnel(downstream: hyper::upgrade::OnUpgrade, upstream: hyper::upgrade::OnUpgrade) {
    let (downstream, upstream) = match tokio::try_join!(downstream, upstream) {
        Ok(pair) => pair,
        Err(err) => {
            tracing::debug!(error = %err, "upgrade failed");
            return;
        }
    };
    let mut downstream = TokioIo::new(downstream);
    let mut upstream = TokioIo::new(upstream);
    match tokio::io::copy_bidirectional(&mut downstream, &mut upstream).await {
        Ok((sent, received)) => tracing::debug!(sent, received, "upgraded connection closed"),
        Err(err) => tracing::debug!(error = %err, "upgraded connection failed"),
    }
}
