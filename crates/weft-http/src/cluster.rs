//! The running state of each cluster, kept across configuration snapshots: which endpoints are busy
//! (least-request balancing), which have been failing (outlier detection), how many requests, pending
//! requests and retries are in flight (circuit breakers) and how much retrying the cluster has left (the
//! retry budget).
//!
//! State is keyed by cluster name and endpoint address, so an endpoint update from xDS keeps what the
//! proxy knows about the endpoints that remain.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use weft_model::{Cluster, Endpoint, LbPolicy, OutlierDetection, RetryBudget};
use weft_telemetry::{ClusterEventLabels, ClusterLabels, Label, Metrics};

/// The state of every cluster the proxy has sent traffic to.
#[derive(Debug)]
pub struct ClusterStates {
    clusters: Mutex<HashMap<String, Arc<ClusterState>>>,
    metrics: Arc<Metrics>,
}

impl ClusterStates {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self {
            clusters: Mutex::default(),
            metrics,
        }
    }

    /// The state of `config`'s cluster, brought up to date with it.
    pub fn get(&self, config: &Arc<Cluster>) -> Arc<ClusterState> {
        let state = {
            let mut clusters = lock(&self.clusters);
            match clusters.get(&config.name) {
                Some(state) => state.clone(),
                None => {
                    let state = Arc::new(ClusterState::new(config.clone(), self.metrics.clone()));
                    clusters.insert(config.name.clone(), state.clone());
                    return state;
                }
            }
        };
        state.sync(config);
        state
    }

    /// Forgets the clusters a new configuration no longer has.
    pub fn retain(&self, keep: impl Fn(&str) -> bool) {
        lock(&self.clusters).retain(|name, state| {
            let kept = keep(name);
            if !kept {
                state.forget_metrics();
            }
            kept
        });
    }

    /// What admin `GET /clusters` shows, sorted by cluster name.
    pub fn status(&self) -> Vec<ClusterStatus> {
        let states: Vec<_> = lock(&self.clusters).values().cloned().collect();
        let mut status: Vec<_> = states.iter().map(|s| s.status()).collect();
        status.sort_by(|a, b| a.name.cmp(&b.name));
        status
    }
}

/// One cluster's running state.
#[derive(Debug)]
pub struct ClusterState {
    name: Label,
    metrics: Arc<Metrics>,
    active_requests: AtomicU32,
    active_retries: AtomicU32,
    pending_requests: AtomicU32,
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: Arc<Cluster>,
    members: Vec<Member>,
    cursor: u64,
    budget: BudgetWindow,
    /// When ejections are next revisited.
    next_evaluation: Option<Instant>,
    /// Connections in use (HTTP/1: one per request in flight), up to `max_connections`.
    connections: Arc<Semaphore>,
    connection_limit: u32,
}

#[derive(Debug)]
struct Member {
    endpoint: Endpoint,
    state: Arc<EndpointState>,
    outlier: OutlierState,
}

/// What balancing reads about an endpoint without taking the cluster's lock.
#[derive(Debug)]
pub struct EndpointState {
    pub address: SocketAddr,
    active: AtomicU32,
    successes: AtomicU64,
    failures: AtomicU64,
}

#[derive(Debug, Default)]
struct OutlierState {
    consecutive_5xx: u32,
    consecutive_gateway: u32,
    consecutive_local: u32,
    /// Times ejected, lowered by one for every interval spent healthy; multiplies the ejection time.
    ejections: u32,
    /// When the current ejection began; it lasts [`ejection_time`] under the configuration in force, so
    /// a changed configuration applies to ejections already made.
    ejected_at: Option<Instant>,
}

/// How an attempt on an endpoint ended, as outlier detection counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The endpoint answered with this status.
    Status(u16),
    /// The connection was made (a local-origin success).
    Connected,
    /// The proxy could not connect, or the connection broke or timed out before a response: a
    /// local-origin failure, counted as the 5xx the client would see unless local-origin errors are
    /// split.
    LocalFailure { as_status: u16 },
}

/// A circuit breaker said no.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overflow {
    MaxConnections,
    MaxRequests,
    MaxPendingRequests,
}

impl Overflow {
    fn name(self) -> &'static str {
        match self {
            Overflow::MaxConnections => "max_connections",
            Overflow::MaxRequests => "max_requests",
            Overflow::MaxPendingRequests => "max_pending_requests",
        }
    }
}

impl ClusterState {
    fn new(config: Arc<Cluster>, metrics: Arc<Metrics>) -> Self {
        let limit = config.circuit_breakers.max_connections;
        let inner = Inner {
            members: config.endpoints.iter().map(|e| Member::new(*e)).collect(),
            config,
            cursor: 0,
            budget: BudgetWindow::default(),
            next_evaluation: None,
            connections: Arc::new(Semaphore::new(permits(limit))),
            connection_limit: limit,
        };
        Self {
            name: Label::from(inner.config.name.as_str()),
            metrics,
            active_requests: AtomicU32::new(0),
            active_retries: AtomicU32::new(0),
            pending_requests: AtomicU32::new(0),
            inner: Mutex::new(inner),
        }
    }

    /// Adopts a newer configuration of the cluster, keeping the state of the endpoints that remain.
    fn sync(&self, config: &Arc<Cluster>) {
        let mut inner = lock(&self.inner);
        if Arc::ptr_eq(&inner.config, config) {
            return;
        }
        let mut old: HashMap<SocketAddr, Member> =
            inner.members.drain(..).map(|m| (m.endpoint.address, m)).collect();
        inner.members = config
            .endpoints
            .iter()
            .map(|e| match old.remove(&e.address) {
                Some(mut member) => {
                    member.endpoint = *e;
                    member
                }
                None => Member::new(*e),
            })
            .collect();
        if config.outlier_detection.is_none() {
            for member in &mut inner.members {
                member.outlier = OutlierState::default();
            }
        }
        if config.outlier_detection != inner.config.outlier_detection {
            // Revisit ejections under the new settings at the next request.
            inner.next_evaluation = Some(Instant::now());
        }
        let limit = config.circuit_breakers.max_connections;
        if limit != inner.connection_limit {
            // Connections in use keep their old permits until they finish.
            inner.connections = Arc::new(Semaphore::new(permits(limit)));
            inner.connection_limit = limit;
        }
        inner.config = config.clone();
        self.update_ejected_gauge(&inner);
    }

    /// Admits a request to the cluster (`max_requests`) and counts it for the retry budget.
    pub fn admit(self: &Arc<Self>) -> Result<Admission, Overflow> {
        let max = {
            let mut inner = lock(&self.inner);
            let budget = inner.config.circuit_breakers.retry_budget;
            inner.budget.deposit(Instant::now(), &budget);
            inner.config.circuit_breakers.max_requests
        };
        if self.active_requests.fetch_add(1, Ordering::AcqRel) >= max {
            self.active_requests.fetch_sub(1, Ordering::AcqRel);
            return Err(self.overflow(Overflow::MaxRequests));
        }
        Ok(Admission {
            cluster: self.clone(),
        })
    }

    /// A connection slot for an HTTP/1 request (`max_connections`), waiting as a pending request when
    /// all are in use, or refused when `max_pending_requests` are already waiting.
    pub async fn connection_slot(&self) -> Result<OwnedSemaphorePermit, Overflow> {
        let (connections, max_pending) = {
            let inner = lock(&self.inner);
            (
                inner.connections.clone(),
                inner.config.circuit_breakers.max_pending_requests,
            )
        };
        if let Ok(permit) = connections.clone().try_acquire_owned() {
            return Ok(permit);
        }
        if self.pending_requests.fetch_add(1, Ordering::AcqRel) >= max_pending {
            self.pending_requests.fetch_sub(1, Ordering::AcqRel);
            return Err(self.overflow(Overflow::MaxPendingRequests));
        }
        let _pending = Decrement(&self.pending_requests);
        connections
            .acquire_owned()
            .await
            .map_err(|_| Overflow::MaxPendingRequests)
    }

    /// A connection slot for opaque TCP, which does not wait: over `max_connections` the connection is
    /// refused.
    pub fn try_connection_slot(&self) -> Option<OwnedSemaphorePermit> {
        let connections = lock(&self.inner).connections.clone();
        let slot = connections.try_acquire_owned().ok();
        if slot.is_none() {
            self.overflow(Overflow::MaxConnections);
        }
        slot
    }

    fn overflow(&self, overflow: Overflow) -> Overflow {
        self.metrics
            .overflows
            .get_or_create(&ClusterEventLabels {
                cluster: self.name.clone(),
                reason: overflow.name(),
            })
            .inc();
        overflow
    }

    /// Permission for one more retry: within the retry budget and `max_retries`. Counted in the metrics
    /// either way.
    pub fn retry(self: &Arc<Self>) -> Option<RetryPermit> {
        let (max, allowed, budget) = {
            let mut inner = lock(&self.inner);
            let budget = inner.config.circuit_breakers.retry_budget;
            let max = inner.config.circuit_breakers.max_retries;
            (max, inner.budget.withdraw(Instant::now(), &budget), budget)
        };
        let reason = if !allowed {
            "budget_exhausted"
        } else if self.active_retries.fetch_add(1, Ordering::AcqRel) >= max {
            self.active_retries.fetch_sub(1, Ordering::AcqRel);
            lock(&self.inner).budget.refund(Instant::now(), &budget);
            "overflow"
        } else {
            "made"
        };
        self.metrics
            .retries
            .get_or_create(&ClusterEventLabels {
                cluster: self.name.clone(),
                reason,
            })
            .inc();
        (reason == "made").then(|| RetryPermit {
            cluster: self.clone(),
        })
    }

    /// Chooses an endpoint by the cluster's policy among those not ejected, avoiding `tried` when another
    /// one is available. `None`: no endpoint can take traffic.
    pub fn pick(&self, tried: &[SocketAddr]) -> Option<EndpointGuard> {
        let now = Instant::now();
        let mut inner = lock(&self.inner);
        self.evaluate(&mut inner, now);
        let usable = |m: &&Member| m.endpoint.weight > 0;
        let total = inner.members.iter().filter(usable).count();
        let available = |m: &&Member| m.endpoint.healthy && m.outlier.ejected_at.is_none();
        let healthy = inner.members.iter().filter(usable).filter(available).count();
        // Envoy's panic mode: with too few endpoints left, spread traffic over all of them rather than
        // overload the few (or send nothing anywhere).
        let panic = (healthy as f64) * 100.0 < inner.config.panic_threshold_percent * (total as f64);
        let mut candidates: Vec<&Member> = inner
            .members
            .iter()
            .filter(usable)
            .filter(|m| panic || available(m))
            .collect();
        if candidates.iter().any(|m| !tried.contains(&m.endpoint.address)) {
            candidates.retain(|m| !tried.contains(&m.endpoint.address));
        }
        let chosen = match inner.config.lb_policy {
            LbPolicy::RoundRobin => {
                let total_weight: u64 = candidates.iter().map(|m| u64::from(m.endpoint.weight)).sum();
                let point = inner.cursor % total_weight.max(1);
                weighted(&candidates, point)
            }
            LbPolicy::Random => random(&candidates),
            // Power of two choices (Envoy's default `choice_count`): two endpoints drawn by weight, the
            // one with fewer requests in flight wins.
            LbPolicy::LeastRequest => match (random(&candidates), random(&candidates)) {
                (Some(a), Some(b)) if b.state.active() < a.state.active() => Some(b),
                (a, _) => a,
            },
        }
        .map(|m| m.state.clone());
        if inner.config.lb_policy == LbPolicy::RoundRobin {
            inner.cursor = inner.cursor.wrapping_add(1);
        }
        drop(inner);
        chosen.map(EndpointGuard::new)
    }

    /// Records how an attempt ended: success and failure counts, and outlier detection.
    pub fn report(&self, endpoint: &EndpointState, outcome: Outcome) {
        match outcome {
            Outcome::Status(status) if status >= 500 => endpoint.failures.fetch_add(1, Ordering::Relaxed),
            Outcome::Status(_) => endpoint.successes.fetch_add(1, Ordering::Relaxed),
            Outcome::LocalFailure { .. } => endpoint.failures.fetch_add(1, Ordering::Relaxed),
            Outcome::Connected => 0,
        };
        let now = Instant::now();
        let mut inner = lock(&self.inner);
        let Some(detection) = inner.config.outlier_detection else {
            return;
        };
        let Some(index) = inner
            .members
            .iter()
            .position(|m| m.endpoint.address == endpoint.address)
        else {
            return; // removed by a configuration change while the request was in flight
        };
        let tripped = inner.members[index].outlier.record(&detection, outcome);
        if let Some(reason) = tripped {
            self.eject(&mut inner, index, &detection, reason, now);
        }
    }

    fn eject(
        &self,
        inner: &mut Inner,
        index: usize,
        detection: &OutlierDetection,
        reason: &'static str,
        now: Instant,
    ) {
        let usable = inner.members.iter().filter(|m| m.endpoint.weight > 0).count();
        let ejected = inner
            .members
            .iter()
            .filter(|m| m.outlier.ejected_at.is_some())
            .count();
        if inner.members[index].outlier.ejected_at.is_some() {
            return;
        }
        // At most max_ejection_percent of the cluster is ejected, but one endpoint always may be.
        let percent_after = (ejected + 1) as f64 * 100.0 / usable.max(1) as f64;
        if ejected > 0 && percent_after > f64::from(detection.max_ejection_percent) {
            tracing::info!(
                cluster = %inner.config.name,
                endpoint = %inner.members[index].endpoint.address,
                reason,
                ejected,
                max_ejection_percent = detection.max_ejection_percent,
                "outlier detection: not ejecting, max_ejection_percent reached"
            );
            inner.members[index].outlier.reset_counters();
            return;
        }
        let member = &mut inner.members[index];
        member.outlier.ejections += 1;
        let duration = ejection_time(detection, member.outlier.ejections);
        member.outlier.ejected_at = Some(now);
        member.outlier.reset_counters();
        tracing::warn!(
            cluster = %inner.config.name,
            endpoint = %member.endpoint.address,
            reason,
            ejections = member.outlier.ejections,
            duration = ?duration,
            "outlier detection: endpoint ejected"
        );
        self.metrics
            .ejections
            .get_or_create(&ClusterEventLabels {
                cluster: self.name.clone(),
                reason,
            })
            .inc();
        if inner.next_evaluation.is_none() {
            inner.next_evaluation = Some(now + detection.interval);
        }
        self.update_ejected_gauge(inner);
    }

    /// Envoy's interval timer, run lazily: endpoints whose ejection time is up come back, and endpoints
    /// that stayed in have their ejection count lowered.
    fn evaluate(&self, inner: &mut Inner, now: Instant) {
        let Some(detection) = inner.config.outlier_detection else {
            return;
        };
        match inner.next_evaluation {
            Some(at) if at <= now => {}
            Some(_) => return,
            None => {
                inner.next_evaluation = Some(now + detection.interval);
                return;
            }
        }
        let mut changed = false;
        for member in &mut inner.members {
            let until = member
                .outlier
                .ejected_at
                .map(|at| at + ejection_time(&detection, member.outlier.ejections));
            match until {
                Some(until) if until <= now => {
                    member.outlier.ejected_at = None;
                    changed = true;
                    tracing::info!(
                        cluster = %inner.config.name,
                        endpoint = %member.endpoint.address,
                        ejections = member.outlier.ejections,
                        "outlier detection: endpoint returned to balancing"
                    );
                }
                Some(_) => {}
                None => member.outlier.ejections = member.outlier.ejections.saturating_sub(1),
            }
        }
        // Catch up in whole intervals, so the schedule does not drift with request timing.
        let mut next = inner.next_evaluation.unwrap_or(now) + detection.interval;
        while next <= now {
            next += detection.interval;
        }
        inner.next_evaluation = Some(next);
        if changed {
            self.update_ejected_gauge(inner);
        }
    }

    fn update_ejected_gauge(&self, inner: &Inner) {
        let ejected = inner
            .members
            .iter()
            .filter(|m| m.outlier.ejected_at.is_some())
            .count();
        self.metrics
            .ejected_endpoints
            .get_or_create(&ClusterLabels {
                cluster: self.name.clone(),
            })
            .set(i64::try_from(ejected).unwrap_or(i64::MAX));
    }

    fn forget_metrics(&self) {
        self.metrics.ejected_endpoints.remove(&ClusterLabels {
            cluster: self.name.clone(),
        });
    }

    fn status(&self) -> ClusterStatus {
        let now = Instant::now();
        let wall = SystemTime::now();
        let mut inner = lock(&self.inner);
        self.evaluate(&mut inner, now);
        let endpoints = inner
            .members
            .iter()
            .map(|m| {
                let remaining = match (m.outlier.ejected_at, inner.config.outlier_detection) {
                    (Some(at), Some(d)) => {
                        Some((at + ejection_time(&d, m.outlier.ejections)).saturating_duration_since(now))
                    }
                    _ => None,
                };
                EndpointStatus {
                    address: m.endpoint.address,
                    weight: m.endpoint.weight,
                    healthy: m.endpoint.healthy,
                    active_requests: m.state.active(),
                    successes: m.state.successes.load(Ordering::Relaxed),
                    failures: m.state.failures.load(Ordering::Relaxed),
                    ejected: remaining.is_some(),
                    ejected_until: remaining.map(|r| humantime::format_rfc3339_millis(wall + r).to_string()),
                    ejections: m.outlier.ejections,
                }
            })
            .collect();
        ClusterStatus {
            name: inner.config.name.clone(),
            lb_policy: inner.config.lb_policy,
            active_requests: self.active_requests.load(Ordering::Relaxed),
            pending_requests: self.pending_requests.load(Ordering::Relaxed),
            active_retries: self.active_retries.load(Ordering::Relaxed),
            outlier_detection: inner.config.outlier_detection.is_some(),
            endpoints,
        }
    }
}

impl Member {
    fn new(endpoint: Endpoint) -> Self {
        Self {
            endpoint,
            state: Arc::new(EndpointState {
                address: endpoint.address,
                active: AtomicU32::new(0),
                successes: AtomicU64::new(0),
                failures: AtomicU64::new(0),
            }),
            outlier: OutlierState::default(),
        }
    }
}

impl EndpointState {
    fn active(&self) -> u32 {
        self.active.load(Ordering::Relaxed)
    }
}

impl OutlierState {
    /// Counts an outcome; names the detector that trips, if one does.
    fn record(&mut self, d: &OutlierDetection, outcome: Outcome) -> Option<&'static str> {
        let status = match outcome {
            Outcome::Connected => {
                if d.split_external_local_origin_errors {
                    self.consecutive_local = 0;
                }
                return None;
            }
            Outcome::LocalFailure { .. } if d.split_external_local_origin_errors => {
                self.consecutive_local += 1;
                return (d.consecutive_local_origin_failure > 0
                    && self.consecutive_local >= d.consecutive_local_origin_failure)
                    .then_some("consecutive_local_origin_failure");
            }
            Outcome::LocalFailure { as_status } => as_status,
            Outcome::Status(status) => status,
        };
        if status < 500 {
            self.consecutive_5xx = 0;
            self.consecutive_gateway = 0;
            return None;
        }
        self.consecutive_5xx += 1;
        if matches!(status, 502..=504) {
            self.consecutive_gateway += 1;
        } else {
            self.consecutive_gateway = 0;
        }
        if d.consecutive_gateway_failure > 0 && self.consecutive_gateway >= d.consecutive_gateway_failure {
            return Some("consecutive_gateway_failure");
        }
        (d.consecutive_5xx > 0 && self.consecutive_5xx >= d.consecutive_5xx).then_some("consecutive_5xx")
    }

    fn reset_counters(&mut self) {
        self.consecutive_5xx = 0;
        self.consecutive_gateway = 0;
        self.consecutive_local = 0;
    }
}

/// Requests and retries of a cluster over the budget's interval, in ten buckets.
#[derive(Debug, Default)]
struct BudgetWindow {
    /// (bucket number since `origin`, requests, retries)
    buckets: [(u64, u64, u64); BUCKETS],
    origin: Option<Instant>,
}

const BUCKETS: usize = 10;

impl BudgetWindow {
    fn bucket_number(&mut self, now: Instant, interval: Duration) -> u64 {
        let origin = *self.origin.get_or_insert(now);
        let width = (interval.as_nanos() / BUCKETS as u128).max(1);
        u64::try_from(now.saturating_duration_since(origin).as_nanos() / width).unwrap_or(u64::MAX)
    }

    fn bucket(&mut self, now: Instant, interval: Duration) -> &mut (u64, u64, u64) {
        let number = self.bucket_number(now, interval);
        let slot = &mut self.buckets[(number % BUCKETS as u64) as usize];
        if slot.0 != number {
            *slot = (number, 0, 0);
        }
        slot
    }

    fn totals(&mut self, now: Instant, interval: Duration) -> (u64, u64) {
        let current = self.bucket_number(now, interval);
        self.buckets
            .iter()
            .filter(|(n, _, _)| *n + BUCKETS as u64 > current)
            .fold((0, 0), |(rq, rt), (_, q, t)| (rq + q, rt + t))
    }

    fn deposit(&mut self, now: Instant, budget: &RetryBudget) {
        self.bucket(now, budget.interval).1 += 1;
    }

    /// Takes one retry from the budget if it has one.
    fn withdraw(&mut self, now: Instant, budget: &RetryBudget) -> bool {
        let (requests, retries) = self.totals(now, budget.interval);
        if !budget.allows(requests, retries) {
            return false;
        }
        self.bucket(now, budget.interval).2 += 1;
        true
    }

    fn refund(&mut self, now: Instant, budget: &RetryBudget) {
        let bucket = self.bucket(now, budget.interval);
        bucket.2 = bucket.2.saturating_sub(1);
    }
}

/// A request admitted to a cluster; counted in `max_requests` until dropped (at the end of the response).
#[derive(Debug)]
pub struct Admission {
    cluster: Arc<ClusterState>,
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.cluster.active_requests.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A retry in flight, counted in `max_retries` until dropped.
#[derive(Debug)]
pub struct RetryPermit {
    cluster: Arc<ClusterState>,
}

impl Drop for RetryPermit {
    fn drop(&mut self) {
        self.cluster.active_retries.fetch_sub(1, Ordering::AcqRel);
    }
}

/// An endpoint chosen for a request, counted as one of its active requests until dropped.
#[derive(Debug)]
pub struct EndpointGuard {
    endpoint: Arc<EndpointState>,
}

impl EndpointGuard {
    fn new(endpoint: Arc<EndpointState>) -> Self {
        endpoint.active.fetch_add(1, Ordering::AcqRel);
        Self { endpoint }
    }

    pub fn address(&self) -> SocketAddr {
        self.endpoint.address
    }

    pub fn state(&self) -> &EndpointState {
        &self.endpoint
    }
}

impl Drop for EndpointGuard {
    fn drop(&mut self) {
        self.endpoint.active.fetch_sub(1, Ordering::AcqRel);
    }
}

struct Decrement<'a>(&'a AtomicU32);

impl Drop for Decrement<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A cluster as admin `GET /clusters` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct ClusterStatus {
    pub name: String,
    pub lb_policy: LbPolicy,
    pub active_requests: u32,
    pub pending_requests: u32,
    pub active_retries: u32,
    pub outlier_detection: bool,
    pub endpoints: Vec<EndpointStatus>,
}

#[derive(Debug, Clone, Serialize)]
pub struct EndpointStatus {
    pub address: SocketAddr,
    pub weight: u32,
    /// As the configuration (EDS health status) says.
    pub healthy: bool,
    pub active_requests: u32,
    /// Responses below 500.
    pub successes: u64,
    /// 5xx responses and local-origin failures (connect failure, reset, timeout).
    pub failures: u64,
    pub ejected: bool,
    /// RFC 3339, while ejected.
    pub ejected_until: Option<String>,
    /// The ejection multiplier: times ejected, less one for each interval spent healthy since.
    pub ejections: u32,
}

/// How long the `n`th ejection of an endpoint lasts: the base time times `n`, at most the maximum.
fn ejection_time(d: &OutlierDetection, n: u32) -> Duration {
    let ceiling = d.max_ejection_time.max(d.base_ejection_time);
    d.base_ejection_time.saturating_mul(n).min(ceiling)
}

fn permits(limit: u32) -> usize {
    usize::try_from(limit)
        .unwrap_or(usize::MAX)
        .min(Semaphore::MAX_PERMITS)
}

fn weighted<'a>(candidates: &[&'a Member], mut point: u64) -> Option<&'a Member> {
    for member in candidates {
        let weight = u64::from(member.endpoint.weight);
        if point < weight {
            return Some(member);
        }
        point -= weight;
    }
    None
}

fn random<'a>(candidates: &[&'a Member]) -> Option<&'a Member> {
    let total: u64 = candidates.iter().map(|m| u64::from(m.endpoint.weight)).sum();
    if total == 0 {
        return None;
    }
    weighted(candidates, rand::random_range(0..total))
}

/// The locks here guard plain counters: a panic elsewhere cannot leave them inconsistent, so a
/// poisoned lock is still used.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests;
