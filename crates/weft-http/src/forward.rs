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
use opentelemetry::KeyValue;
use weft_balance::ClusterStates;
use weft_model::route::{RequestView, RouteTable};
use weft_model::{Cluster, RetryPolicy};
use weft_telemetry::access_log::{AccessLogs, Entry};
use weft_telemetry::peer_metadata::OwnWorkload;
use weft_telemetry::tap::{TapFacts, Taps};
use weft_telemetry::traces::Tracing;
use weft_telemetry::{
    ConnectionSecurity, GrpcStatus, Label, Metrics, Peers, Reporter, RequestLabels, RequestProtocol,
    ResponseFlags,
};
use weft_transport::Direct;

use crate::body::{BodyTimer, Completion, InFlight, Logged};
use crate::exchange::PeerExchange;
use crate::headers::{set_upgrade, strip_hop_by_hop};
use crate::hop::{Hop, request_authority, set_authority};
use crate::pool::StreamSlot;
use crate::replay::{ClientBody, RequestBody};
use crate::retry::grpc_timeout;
use crate::{HttpVersion, Pools, ProxyBody, UpstreamError};

mod attempt;
mod reply;
mod span;

use attempt::{Exchange, Try, client_fault};
use reply::{bad_request, error_response};
use span::{request_attributes, span_kind, span_name};

/// The route table in force for a connection's requests. Looked up for every request, so a configuration
/// change applies to the next request on an open connection.
pub trait RouteSource: std::fmt::Debug + Send + Sync {
    /// `None` when the configuration no longer has routes for this connection.
    fn current(&self) -> Option<Arc<RouteTable>>;
}

const XFCC: &str = "x-forwarded-client-cert";
const X_FORWARDED_PROTO: &str = "x-forwarded-proto";
/// On each upstream try: which try it is (Envoy's `include_request_attempt_count`, which Istio sets).
const ATTEMPT_COUNT: &str = "x-envoy-attempt-count";
/// On responses from upstream: milliseconds from sending the request to the response headers.
const UPSTREAM_SERVICE_TIME: &str = "x-envoy-upstream-service-time";

/// Where requests of a connection go.
#[derive(Debug, Clone)]
pub enum Upstream {
    /// Routed request by request through the current route table.
    Routes(Arc<dyn RouteSource>),
    /// The address the client was going to (egress passthrough, inbound to the app).
    Direct(Direct),
}

/// How a request was routed: where it goes and under which policy.
struct Decision {
    /// The route's name, for a logged request.
    route_name: Option<Arc<str>>,
    target: DecidedTarget,
    timeout: Option<Duration>,
    idle_timeout: Option<Duration>,
    retry: Option<RetryPolicy>,
    /// The service the request went to, for `destination_service`, when routing tells.
    service: Option<Label>,
}

enum DecidedTarget {
    Cluster(Arc<Cluster>),
    Direct(Direct),
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
    /// Where peers' traffic arrives: paths are normalized and every request is authorized.
    pub authorization: Option<weft_authz::connection::ConnectionAuthz>,
    /// The stream idle timeout of requests whose route sets none; `None`: disabled.
    pub stream_idle_timeout: Option<Duration>,
    /// Until a request's body has arrived or its response begun (Envoy's `request_timeout`).
    pub request_timeout: Option<Duration>,
    /// Who is asking, hashed: the caller's verified identity, else its address. Each client gets its
    /// share of a cluster's connection slots.
    pub client: u64,
    /// The client's address.
    pub source: Option<SocketAddr>,
    /// The caller's verified SPIFFE ID.
    pub peer_identity: Option<Arc<str>>,
    /// The TLS server name the client asked for.
    pub server_name: Option<Arc<str>>,
    /// Where each request's entry is written; `None`: not logged.
    pub access_log: Option<Arc<AccessLogs>>,
    /// Spans for the requests; `None`: no tracing (trace headers pass through as they came).
    pub tracing: Option<Arc<Tracing>>,
}

/// What the access log needs to know of how a request went, gathered on the way.
#[derive(Debug, Default)]
struct Facts {
    /// Gather names (they cost an allocation) only for a logged request.
    logged: bool,
    details: Option<&'static str>,
    transport_failure: Option<String>,
    upstream_host: Option<SocketAddr>,
    cluster: Option<Arc<str>>,
    route: Option<Arc<str>>,
    attempts: u32,
    response_duration: Option<Duration>,
    /// What an admin tap session is shown of the request; `None`: no session is open.
    tap: Option<Box<TapFacts>>,
}

/// Sends requests upstream. Cheap to clone; shared by all connections.
#[derive(Debug, Clone)]
pub struct Forwarder {
    pools: Arc<Pools>,
    metrics: Arc<Metrics>,
    clusters: Arc<ClusterStates>,
    decisions: Arc<weft_authz::connection::Decisions>,
    exchange: Arc<PeerExchange>,
    taps: Arc<Taps>,
}

impl Forwarder {
    /// `own`: this workload, as the metadata exchange tells peers.
    pub fn new(pools: Arc<Pools>, metrics: Arc<Metrics>, own: &OwnWorkload) -> Self {
        Self {
            pools,
            exchange: Arc::new(PeerExchange::new(own)),
            clusters: Arc::new(ClusterStates::new(metrics.clone())),
            decisions: Arc::new(weft_authz::connection::Decisions::new(metrics.clone())),
            metrics,
            taps: Arc::default(),
        }
    }

    /// Admin `/tap`'s sessions, shown the requests this forwarder handles.
    pub fn taps(&self) -> &Arc<Taps> {
        &self.taps
    }

    /// Counts authorization decisions and logs denials, for connections authorized outside HTTP.
    pub fn decisions(&self) -> &weft_authz::connection::Decisions {
        &self.decisions
    }

    /// The running state of every cluster (admin `GET /clusters`).
    pub fn clusters(&self) -> &Arc<ClusterStates> {
        &self.clusters
    }

    fn decide(
        &self,
        parts: &http::request::Parts,
        authority: &Authority,
        upstream: &Upstream,
        stream_idle_timeout: Option<Duration>,
        logged: bool,
    ) -> Result<Decision, UpstreamError> {
        let table = match upstream {
            Upstream::Direct(direct) => {
                return Ok(Decision {
                    route_name: None,
                    target: DecidedTarget::Direct(direct.clone()),
                    timeout: None,
                    idle_timeout: stream_idle_timeout,
                    retry: None,
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
        Ok(Decision {
            route_name: (logged && !route.name.is_empty()).then(|| Arc::from(route.name.as_str())),
            service: Some(Label::service_of_cluster(&cluster.name)),
            target: DecidedTarget::Cluster(cluster.clone()),
            timeout: route.action.timeout,
            idle_timeout: match route.action.idle_timeout {
                Some(own) => Some(own).filter(|t| !t.is_zero()),
                None => stream_idle_timeout,
            },
            retry: route.action.retry.clone(),
        })
    }

    /// Forwards one request and answers it, logging it once its response has ended.
    pub async fn forward(&self, mut req: Request<Incoming>, ctx: &HttpContext) -> Response<ProxyBody> {
        crate::headers::ensure_request_id(req.headers_mut());
        let tapped = self.taps.is_open();
        if ctx.access_log.is_none() && ctx.tracing.is_none() && !tapped {
            return self.proxy(req, ctx, &mut Facts::default()).await;
        }
        let span = ctx.tracing.as_ref().map(|tracing| {
            let mut span = tracing.begin(req.headers(), span_kind(ctx), || span_name(&req));
            // Attributes cost allocations: only for a span that is kept.
            if span.is_sampled() {
                span.set(request_attributes(&req, ctx));
            }
            tracing.inject(&span, req.headers_mut());
            span
        });
        let trace_id = span.as_ref().map(|s| s.trace_id().to_string());
        let entry = (ctx.access_log.is_some() || tapped).then(|| Entry {
            trace_id,
            start: Some(std::time::SystemTime::now()),
            method: Some(req.method().clone()),
            path: req.uri().path_and_query().cloned(),
            authority: req.uri().authority().cloned().or_else(|| {
                req.headers()
                    .get(header::HOST)
                    .and_then(|h| Authority::try_from(h.as_bytes()).ok())
            }),
            protocol: Some(match ctx.version {
                HttpVersion::Http1 => "HTTP/1.1",
                HttpVersion::Http2 => "HTTP/2",
            }),
            downstream_local: Some(ctx.orig_dst),
            downstream_remote: ctx.source,
            peer_uri_san: ctx.peer_identity.clone(),
            requested_server_name: ctx.server_name.clone(),
            request_headers: ctx
                .access_log
                .as_ref()
                .map(|logs| logs.capture_request(req.headers()))
                .unwrap_or_default(),
            ..Entry::default()
        });
        let tap = tapped.then(|| {
            Box::new(TapFacts {
                direction: match ctx.peers.reporter {
                    Reporter::source => "outbound",
                    Reporter::destination => "inbound",
                },
                request_id: req
                    .headers()
                    .get(crate::headers::REQUEST_ID)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned),
                ..TapFacts::default()
            })
        });
        // Names are gathered for the log line, a tap or a span that is kept.
        let mut facts = Facts {
            logged: entry.is_some() || span.as_ref().is_some_and(|s| s.is_sampled()),
            tap,
            ..Facts::default()
        };
        let mut response = self.proxy(req, ctx, &mut facts).await;
        if let Some(mut span) = span {
            if span.is_sampled() {
                let mut attributes = vec![
                    KeyValue::new(
                        "upstream_cluster",
                        facts.cluster.as_deref().unwrap_or("-").to_owned(),
                    ),
                    KeyValue::new("response_code_details", facts.details.unwrap_or("-")),
                    KeyValue::new("upstream_attempts", i64::from(facts.attempts)),
                ];
                if let Some(host) = facts.upstream_host {
                    attributes.push(KeyValue::new("upstream_address", host.to_string()));
                }
                span.set(attributes);
            }
            response.body_mut().trace(span);
        }
        if let Some(mut entry) = entry {
            if let Some(logs) = &ctx.access_log {
                entry.response_headers = logs.capture_response(response.headers());
            }
            entry.details = facts.details;
            entry.transport_failure = facts.transport_failure;
            entry.upstream_host = facts.upstream_host;
            entry.upstream_cluster = facts.cluster;
            entry.route_name = facts.route;
            entry.attempts = facts.attempts;
            entry.response_duration = facts.response_duration;
            response.body_mut().log(Logged {
                logs: ctx.access_log.clone(),
                tap: facts.tap.map(|facts| (self.taps.clone(), facts)),
                entry,
            });
        }
        response
    }

    async fn proxy(
        &self,
        mut req: Request<Incoming>,
        ctx: &HttpContext,
        facts: &mut Facts,
    ) -> Response<ProxyBody> {
        let start = Instant::now();
        let grpc = is_grpc(&req);
        let request_protocol = if grpc {
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
        // The scheme the client used with the proxy, unless an earlier hop said.
        if !parts.headers.contains_key(X_FORWARDED_PROTO) {
            let scheme = match ctx.peers.connection_security_policy {
                ConnectionSecurity::mutual_tls => "https",
                _ => "http",
            };
            parts
                .headers
                .insert(X_FORWARDED_PROTO, HeaderValue::from_static(scheme));
        }
        let upgrade = upgrade.filter(|_| ctx.version == HttpVersion::Http1);
        if let Some(protocol) = &upgrade {
            set_upgrade(&mut parts.headers, protocol.clone());
        }

        let mut peers = ctx.peers.clone();
        if ctx.peers.reporter == Reporter::destination {
            self.exchange
                .caller(&mut parts.headers, ctx.peer_identity.as_ref(), &mut peers);
        }
        // Refused before routing: the labels have no destination service yet.
        let refused = |err: UpstreamError, facts: &mut Facts| {
            let completion = self.completion(&peers, request_protocol, start);
            error_response(err, grpc, ResponseFlags::NONE, completion, facts)
        };
        let authority = match request_authority(&mut parts, ctx.version, ctx.orig_dst) {
            Ok(authority) => authority,
            Err(err) => return refused(err, facts),
        };
        if let Some(authz) = &ctx.authorization {
            let decided = self.authorize(&mut parts, &authority, authz);
            if let Some(tap) = &mut facts.tap {
                tap.authorization = Some(match &decided {
                    Ok(weft_authz::Decision::Allowed) => "allowed".to_owned(),
                    Ok(weft_authz::Decision::Denied(Some(policy))) => format!("denied by {policy}"),
                    Ok(weft_authz::Decision::Denied(None)) => "denied: no ALLOW policy matched".to_owned(),
                    Err(err) => format!("refused: {err}"),
                });
            }
            match decided {
                Ok(weft_authz::Decision::Allowed) => {}
                Ok(weft_authz::Decision::Denied(_)) => return refused(UpstreamError::Forbidden, facts),
                Err(err) => return refused(err, facts),
            }
        }
        let decided = self.decide(
            &parts,
            &authority,
            &ctx.upstream,
            ctx.stream_idle_timeout,
            facts.logged,
        );
        match &decided {
            // The server side names the service the caller addressed, as Istio's does.
            _ if ctx.peers.reporter == Reporter::destination => {
                peers.set_destination_service(self.exchange.called_service(&authority));
            }
            Ok(Decision {
                service: Some(service),
                ..
            }) => peers.set_destination_service(service.clone()),
            _ => {}
        }
        let completion = self.completion(&peers, request_protocol, start);
        let decision = match decided {
            Ok(decision) => decision,
            Err(err) => return error_response(err, grpc, ResponseFlags::NONE, completion, facts),
        };
        facts.route = decision.route_name.clone();
        if facts.logged
            && let DecidedTarget::Cluster(cluster) = &decision.target
        {
            facts.cluster = Some(Arc::from(cluster.name.as_str()));
        }
        let hop = Hop {
            downstream: ctx.version,
            from_peer: Hop::from_peer(ctx.peers.connection_security_policy),
            to_peer: match &decision.target {
                DecidedTarget::Cluster(cluster) => cluster.tls.as_ref().is_some_and(|t| t.http2_upgrade),
                DecidedTarget::Direct(..) => false,
            },
            upgrade: upgrade.is_some(),
            version: parts.version,
        };
        let upstream_tls = match &decision.target {
            DecidedTarget::Cluster(cluster) => cluster.tls.clone(),
            DecidedTarget::Direct(..) => None,
        };
        self.exchange.announce(&mut parts.headers, upstream_tls.as_ref());
        let upstream_version = hop.upstream(&mut parts.headers);
        if let Err(err) = set_authority(&mut parts.headers, &authority, upstream_version) {
            return error_response(err, grpc, ResponseFlags::NONE, completion, facts);
        }
        let path = parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        // HTTP/1 names only the path (the Host header says where it goes); HTTP/2 and CONNECT need
        // the authority in the URI.
        let origin_form = upstream_version == HttpVersion::Http1 && parts.method != http::Method::CONNECT;
        let uri = match origin_form {
            true => Ok(Uri::from(path)),
            false => Uri::builder()
                .scheme(Scheme::HTTP)
                .authority(authority)
                .path_and_query(path)
                .build(),
        };
        parts.uri = match uri {
            Ok(uri) => uri,
            Err(_) => {
                facts.details = Some("bad_request");
                return bad_request(completion);
            }
        };
        parts.version = match upstream_version {
            HttpVersion::Http1 => Version::HTTP_11,
            HttpVersion::Http2 => Version::HTTP_2,
        };
        // A gRPC client's own deadline bounds the request when it is shorter than the route's.
        let timeout = match (
            decision.timeout,
            grpc.then(|| grpc_timeout(&parts.headers)).flatten(),
        ) {
            (Some(route), Some(client)) => Some(route.min(client)),
            (route, client) => route.or(client),
        };
        let deadline = timeout.map(|t| start + t);

        let mut exchange = Exchange {
            parts,
            version: upstream_version,
            timeout: timeout.unwrap_or_default(),
            deadline,
            idle_timeout: decision.idle_timeout,
            max_requests_per_connection: match &decision.target {
                DecidedTarget::Cluster(cluster) => cluster.max_requests_per_connection,
                DecidedTarget::Direct(..) => None,
            },
            attempts: 0,
            upstream_host: None,
            upstream_workload: None,
            tap: facts.tap.as_mut().map(|_| Vec::new()),
            retry_stopped: None,
        };
        let (body, reading) = ClientBody::new(body, grpc);
        let attempt = async {
            match decision.target {
                DecidedTarget::Direct(direct) => {
                    let result = self
                        .try_once(&mut exchange, direct, RequestBody::Streamed(body))
                        .await;
                    (
                        client_fault(result, &reading),
                        InFlight::default(),
                        ResponseFlags::NONE,
                    )
                }
                DecidedTarget::Cluster(cluster) => {
                    self.to_cluster(
                        &cluster,
                        body,
                        &reading,
                        decision.retry.as_ref(),
                        &mut exchange,
                        ctx.client,
                    )
                    .await
                }
            }
        };
        // Envoy's request timeout: until the body has arrived or the response begun.
        let request_late = async {
            let Some(timeout) = ctx.request_timeout else {
                return std::future::pending().await;
            };
            tokio::time::sleep_until((start + timeout).into()).await;
            if reading.complete() {
                std::future::pending::<()>().await;
            }
        };
        let (result, mut held, flags) = tokio::select! {
            outcome = attempt => outcome,
            () = request_late => (
                Try::Failed(UpstreamError::RequestTimeout),
                InFlight::default(),
                ResponseFlags::NONE,
            ),
        };
        facts.attempts = exchange.attempts;
        facts.upstream_host = exchange.upstream_host;
        if let Some(tap) = &mut facts.tap {
            tap.attempts = exchange.tap.take().unwrap_or_default();
            tap.retry_stopped = exchange.retry_stopped;
        }
        let mut response = match result {
            Try::Response(mut response) => {
                held.stream = response.extensions_mut().remove::<Arc<StreamSlot>>();
                facts.details = Some("via_upstream");
                facts.response_duration = Some(start.elapsed());
                response
            }
            Try::Failed(err) => {
                tracing::debug!(error = %err, "upstream request failed");
                return error_response(err, grpc, flags, completion, facts);
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
        let (mut parts, body) = response.into_parts();
        // The labels the response is counted under, now that the callee may have told who it is.
        drop(completion);
        match ctx.peers.reporter {
            Reporter::source => self.exchange.callee(
                &mut parts.headers,
                upstream_tls.as_ref(),
                exchange.upstream_workload.as_ref(),
                &mut peers,
            ),
            Reporter::destination => self
                .exchange
                .answer(&mut parts.headers, ctx.peer_identity.is_some()),
        }
        // The response speaks the client's protocol, whatever the upstream hop spoke: an HTTP/1.0 app
        // (Python's http.server) must not end the client's keep-alive connection.
        parts.version = match ctx.version {
            HttpVersion::Http1 => http::Version::HTTP_11,
            HttpVersion::Http2 => http::Version::HTTP_2,
        };
        let grpc_response = ctx.version == HttpVersion::Http2
            && parts
                .headers
                .get(http::header::CONTENT_TYPE)
                .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
        let timer = BodyTimer::new(deadline, exchange.idle_timeout)
            .map(|t| if grpc_response { t.for_grpc() } else { t });
        let mut completion = self.record(peers, request_protocol, start)(status, flags);
        completion.reading = Some(reading.clone());
        // A trailers-only gRPC answer carries its status in the headers; others in the trailers,
        // which the body reads as they pass.
        completion.labels.grpc_response_status = GrpcStatus(grpc_status(&parts.headers));
        Response::from_parts(parts, ProxyBody::upstream(body, completion, timer, held))
    }

    /// What records a request's metrics when its response ends, given the status and flags; the labels
    /// are copied from `peers` for an answer given before the response (the request may still change
    /// them if it goes on).
    fn completion<'a>(
        &'a self,
        peers: &'a Peers,
        request_protocol: RequestProtocol,
        start: Instant,
    ) -> impl Fn(StatusCode, ResponseFlags) -> Completion + 'a {
        move |status, flags| self.record(peers.clone(), request_protocol, start)(status, flags)
    }

    /// The same for the response that ends the request, taking its labels.
    fn record(
        &self,
        peers: Peers,
        request_protocol: RequestProtocol,
        start: Instant,
    ) -> impl FnOnce(StatusCode, ResponseFlags) -> Completion + '_ {
        move |status, flags| Completion {
            metrics: self.metrics.clone(),
            labels: RequestLabels {
                peers,
                request_protocol,
                response_code: status.as_u16(),
                grpc_response_status: GrpcStatus::default(),
                response_flags: flags,
            },
            start,
            log: None,
            span: None,
            reading: None,
        }
    }

    /// Normalizes the request's path (the app receives the path that was authorized) and decides the
    /// request under the workload's policy; `Err`: the path cannot be normalized.
    fn authorize(
        &self,
        parts: &mut http::request::Parts,
        authority: &Authority,
        authz: &weft_authz::connection::ConnectionAuthz,
    ) -> Result<weft_authz::Decision, UpstreamError> {
        let original = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let normalized =
            weft_authz::path::normalize(original).map_err(|e| UpstreamError::BadRequest(e.as_str()))?;
        if let std::borrow::Cow::Owned(path) = normalized {
            let path = PathAndQuery::try_from(path)
                .map_err(|_| UpstreamError::BadRequest("the normalized path is not a valid URI path"))?;
            let mut uri = std::mem::take(&mut parts.uri).into_parts();
            uri.path_and_query = Some(path);
            parts.uri = Uri::from_parts(uri).map_err(|_| UpstreamError::BadRequest("the request URI"))?;
        }
        let path_and_query = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let request = weft_authz::Request {
            method: parts.method.as_str(),
            path: parts.uri.path(),
            path_and_query,
            authority: authority.as_str(),
            headers: &parts.headers,
        };
        Ok(authz.decide(Some(&request), &self.decisions))
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

/// A response's `grpc-status`, when it has one.
pub(crate) fn grpc_status(headers: &http::HeaderMap) -> Option<u16> {
    headers.get("grpc-status")?.to_str().ok()?.parse().ok()
}
