//! One request's tries on a cluster: a connection slot under the circuit breakers, an endpoint, the
//! try bounded by its timeouts, the outcome reported to outlier detection, and the retry state's
//! decision to answer or try again.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::header::HeaderValue;
use http::{Request, Response};
use hyper_util::client::legacy::connect::{CaptureConnection, capture_connection};
use weft_balance::{ClusterState, ConnectionSlot, Outcome};
use weft_model::{Cluster, RetryPolicy};
use weft_telemetry::tap::Attempt;
use weft_telemetry::{ResponseFlags, WorkloadLabels};
use weft_transport::{DialSettings, Direct};

use super::{ATTEMPT_COUNT, Forwarder, UPSTREAM_SERVICE_TIME};
use crate::body::InFlight;
use crate::error::Origin;
use crate::pool::{ConnectionUses, PoolClient, UpstreamBody};
use crate::replay::{BodyReading, ClientBody, ReplayBody, RequestBody};
use crate::retry::{Next, RetryState, TryOutcome};
use crate::{HttpVersion, UpstreamError};

/// The outcome of one try.
pub(super) enum Try {
    Response(Response<UpstreamBody>),
    Failed(UpstreamError),
}

impl Forwarder {
    /// Tries a request on the cluster's endpoints under its circuit breakers, retrying as the route's
    /// policy says. Returns the final outcome, what the response must hold, and any response flags.
    pub(super) async fn to_cluster(
        &self,
        cluster: &Arc<Cluster>,
        body: ClientBody,
        reading: &BodyReading,
        policy: Option<&RetryPolicy>,
        exchange: &mut Exchange,
        client: u64,
    ) -> (Try, InFlight, ResponseFlags) {
        let state = self.clusters.get(cluster);
        let mut held = InFlight::default();
        match state.admit() {
            Ok(admission) => held.admission = Some(admission),
            Err(_) => return (Try::Failed(UpstreamError::Overflow), held, ResponseFlags::NONE),
        }
        let settings = DialSettings::for_cluster(cluster);
        let mut retry = RetryState::new(policy);
        // A body is kept for replay only when a retry could need it.
        let mut body = match retry.keeps_body() {
            true => RequestBody::Replay(ReplayBody::new(body)),
            false => RequestBody::Streamed(body),
        };
        loop {
            let connection = match connection_slot(&state, exchange, client).await {
                Ok(connection) => connection,
                Err(err) => return (Try::Failed(err), held, ResponseFlags::NONE),
            };
            // Chosen once a connection is free, on the load as it is then.
            let Some(endpoint) = state.pick(retry.tried()) else {
                return (
                    Try::Failed(UpstreamError::NoHealthyUpstream),
                    held,
                    ResponseFlags::NONE,
                );
            };
            let address = endpoint.address();
            let next_body = match &body {
                RequestBody::Replay(replay) => replay.replay().map(RequestBody::Replay),
                RequestBody::Streamed(_) => None,
            };
            let mut head = exchange.head(retry.may_retry());
            exchange.attempts += 1;
            exchange.upstream_host = Some(address);
            exchange.upstream_workload = endpoint.workload().cloned();
            head.headers
                .insert(ATTEMPT_COUNT, HeaderValue::from(exchange.attempts));
            let per_try = retry.per_try_timeout();
            let result = client_fault(
                self.try_endpoint(exchange, head, address, settings.clone(), body, per_try)
                    .await,
                reading,
            );
            let outcome = match &result {
                Try::Response(r) => Outcome::Status(r.status().as_u16()),
                // The client broke its own request: not the endpoint's failure, and not retried.
                Try::Failed(err) if err.origin() == Origin::Downstream => {
                    return (result, held, ResponseFlags::NONE);
                }
                Try::Failed(err) => Outcome::LocalFailure {
                    as_status: err.reply().status.as_u16(),
                },
            };
            if let Outcome::Status(status) | Outcome::LocalFailure { as_status: status } = outcome {
                state.count_attempt(status);
            }
            let ejected = state.report(endpoint.state(), outcome);
            if let Some(tapped) = &mut exchange.tap {
                tapped.push(Attempt {
                    endpoint: address,
                    outcome: attempt_outcome(&result),
                    retried: false,
                    ejected,
                });
            }
            let next = match &result {
                // The route's deadline, not this endpoint's fault alone: no retry.
                Try::Failed(UpstreamError::Timeout(_)) if exchange.past_deadline() => Next::Answer {
                    limit_exceeded: false,
                },
                _ => retry.after(
                    try_outcome(&result),
                    address,
                    next_body,
                    exchange.deadline,
                    &state,
                ),
            };
            let (wait, permit, next_body) = match next {
                Next::Retry { wait, permit, body } => {
                    if let Some(last) = exchange.tap.as_mut().and_then(|t| t.last_mut()) {
                        last.retried = true;
                    }
                    (wait, permit, body)
                }
                Next::Answer { limit_exceeded } => {
                    if limit_exceeded {
                        exchange.retry_stopped =
                            Some("retry limit exceeded: num_retries, max_retries or the retry budget");
                    }
                    held.endpoint = Some(endpoint);
                    held.connection = connection;
                    let flags = match limit_exceeded {
                        true => ResponseFlags::UPSTREAM_RETRY_LIMIT_EXCEEDED,
                        false => ResponseFlags::NONE,
                    };
                    return (result, held, flags);
                }
            };
            held.retry = Some(permit);
            drop(result);
            drop(endpoint);
            drop(connection);
            tokio::time::sleep(wait).await;
            body = next_body;
        }
    }

    /// One try at `endpoint`, bounded by the per-try timeout and the request's deadline.
    async fn try_endpoint(
        &self,
        exchange: &Exchange,
        head: http::request::Parts,
        endpoint: SocketAddr,
        settings: DialSettings,
        body: RequestBody,
        per_try: Option<Duration>,
    ) -> Try {
        let (client, stream) = self.pools.client(endpoint, exchange.version, settings);
        let request = send(
            client,
            Request::from_parts(head, body),
            exchange.max_requests_per_connection,
        );
        let now = Instant::now();
        let try_deadline = per_try.map(|t| now + t);
        let bound = match (exchange.deadline, try_deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let idle_bound = exchange.idle_timeout.map(|i| now + i);
        let bound = match (bound, idle_bound) {
            (Some(a), Some(b)) => Some((a.min(b), b < a)),
            (Some(a), None) => Some((a, false)),
            (None, Some(b)) => Some((b, true)),
            (None, None) => None,
        };
        let result = match bound {
            None => request.await,
            Some((at, idle)) => match tokio::time::timeout_at(at.into(), request).await {
                Ok(result) => result,
                Err(_) if idle => Err(UpstreamError::StreamIdle),
                Err(_) => Err(UpstreamError::Timeout(at.saturating_duration_since(now))),
            },
        };
        match result {
            Ok(mut response) => {
                // Envoy's: from sending this try to its response headers.
                let service_ms = u64::try_from(now.elapsed().as_millis()).unwrap_or(u64::MAX);
                response
                    .headers_mut()
                    .insert(UPSTREAM_SERVICE_TIME, HeaderValue::from(service_ms));
                // The stream stays counted until the response body is done with.
                if let Some(stream) = stream {
                    response.extensions_mut().insert(Arc::new(stream));
                }
                Try::Response(response)
            }
            Err(err) => {
                tracing::debug!(%endpoint, error = %err, "upstream try failed");
                Try::Failed(err)
            }
        }
    }

    pub(super) async fn try_once(&self, exchange: &mut Exchange, direct: Direct, body: RequestBody) -> Try {
        let head = exchange.head(false);
        exchange.attempts += 1;
        exchange.upstream_host = Some(direct.addr);
        self.try_endpoint(exchange, head, direct.addr, direct.settings, body, None)
            .await
    }
}

/// A connection slot for a try. HTTP/1 needs a connection per request in flight: over
/// `max_connections` the request waits as pending (until its deadline), over `max_pending_requests` it
/// fails fast. HTTP/2 multiplexes and takes none.
async fn connection_slot(
    state: &ClusterState,
    exchange: &Exchange,
    client: u64,
) -> Result<Option<ConnectionSlot>, UpstreamError> {
    if exchange.version != HttpVersion::Http1 {
        return Ok(None);
    }
    let slot = match exchange.deadline {
        Some(deadline) => tokio::time::timeout_at(deadline.into(), state.connection_slot(client))
            .await
            .map_err(|_| UpstreamError::Timeout(exchange.timeout))?,
        None => state.connection_slot(client).await,
    };
    slot.map(Some).map_err(|_| UpstreamError::Overflow)
}

/// Sends a try's request on the endpoint's pool. `limit`: the cluster's `max_requests_per_connection`.
async fn send(
    client: PoolClient,
    mut request: Request<RequestBody>,
    limit: Option<u32>,
) -> Result<Response<UpstreamBody>, UpstreamError> {
    match client {
        PoolClient::Http1(connections) => connections.send(request, limit).await,
        PoolClient::Http2(client) => {
            let connection = limit.map(|_| capture_connection(&mut request));
            let response = client
                .request(request)
                .await
                .map_err(UpstreamError::from_client)?;
            if let (Some(limit), Some(connection)) = (limit, connection) {
                retire_when_used_up(&response, limit, &connection);
            }
            Ok(response.map(UpstreamBody::detached))
        }
    }
}

/// The cluster's `max_requests_per_connection` on HTTP/2: a connection that has served its share is
/// not used for another request (those in flight on it finish).
fn retire_when_used_up<B>(response: &Response<B>, limit: u32, connection: &CaptureConnection) {
    let Some(uses) = response.extensions().get::<ConnectionUses>() else {
        return;
    };
    if uses.count() >= limit
        && let Some(connected) = connection.connection_metadata().as_ref()
    {
        connected.poison();
    }
}

/// What each try of a request shares.
pub(super) struct Exchange {
    pub(super) parts: http::request::Parts,
    pub(super) version: HttpVersion,
    /// The request's timeout and when it passes.
    pub(super) timeout: Duration,
    pub(super) deadline: Option<Instant>,
    pub(super) idle_timeout: Option<Duration>,
    /// Requests an upstream connection serves before it is retired; `None`: no limit.
    pub(super) max_requests_per_connection: Option<u32>,
    /// Tries made so far, and where the last one went.
    pub(super) attempts: u32,
    pub(super) upstream_host: Option<SocketAddr>,
    /// The workload behind the last try's endpoint, as discovery named it.
    pub(super) upstream_workload: Option<Arc<WorkloadLabels>>,
    /// Each try, while a tap session is open.
    pub(super) tap: Option<Vec<Attempt>>,
    /// Why a failed try was not retried, while a tap session is open.
    pub(super) retry_stopped: Option<&'static str>,
}

impl Exchange {
    /// The request head for a try: moved out when no later try can need it (the usual case costs
    /// nothing), copied otherwise. A copy leaves out the extensions, which cannot be cloned and which
    /// the upstream request does not need.
    fn head(&mut self, again: bool) -> http::request::Parts {
        let (mut head, ()) = Request::new(()).into_parts();
        if !again {
            return std::mem::replace(&mut self.parts, head);
        }
        head.method = self.parts.method.clone();
        head.uri = self.parts.uri.clone();
        head.version = self.parts.version;
        head.headers = self.parts.headers.clone();
        head
    }

    fn past_deadline(&self) -> bool {
        self.deadline.is_some_and(|d| d <= Instant::now())
    }
}

/// How a try ended, as a tap session shows it.
fn attempt_outcome(result: &Try) -> String {
    match try_outcome(result) {
        TryOutcome::Response(status, _) => status.as_str().to_owned(),
        TryOutcome::ConnectFailure => "connect_failure".to_owned(),
        TryOutcome::Reset => "reset".to_owned(),
        TryOutcome::RefusedStream => "refused_stream".to_owned(),
        TryOutcome::PerTryTimeout => "per_try_timeout".to_owned(),
    }
}

fn try_outcome(result: &Try) -> TryOutcome<'_> {
    match result {
        Try::Response(r) => TryOutcome::Response(r.status(), r.headers()),
        Try::Failed(err) => err.try_outcome(),
    }
}

/// A failed try whose request body the client broke is the client's fault.
pub(super) fn client_fault(result: Try, reading: &BodyReading) -> Try {
    match result {
        Try::Failed(_) if reading.broken() => {
            Try::Failed(UpstreamError::BadRequest("the request body could not be read"))
        }
        result => result,
    }
}
