//! One cluster's running state. A request reads the current [`EndpointSet`] through an atomic pointer
//! and counts itself in atomics: admission (`max_requests`), the retry budget, the endpoint pick and the
//! outcome report take no lock. Only an ejection and the interval's revisit of ejections, both rare,
//! take the cluster's outlier lock.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use arc_swap::ArcSwap;
use prometheus_client::metrics::counter::Counter;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;
use weft_model::{Cluster, OutlierDetection};
use weft_telemetry::{ClusterEventLabels, ClusterLabels, Label, Metrics, WorkloadLabels};

use crate::budget::BudgetWindow;
use crate::endpoints::{EndpointSet, EndpointState};
use crate::outlier::{Clock, Outcome, ejection_time};
use crate::shares::ConnectionSlot;
use crate::status::{ClusterCounters, ClusterStatus, EndpointStatus};

#[derive(Debug)]
pub struct ClusterState {
    name: Label,
    metrics: Arc<Metrics>,
    set: ArcSwap<EndpointSet>,
    clock: Clock,
    cursor: AtomicU64,
    budget: BudgetWindow,
    active_requests: AtomicU32,
    active_retries: AtomicU32,
    pending_requests: AtomicU32,
    shares: Arc<crate::shares::ClientShares>,
    /// When ejections are next revisited ([`Clock`] ticks; 0: not scheduled).
    next_evaluation: AtomicU64,
    /// Held to eject an endpoint or revisit ejections, so that `max_ejection_percent` holds.
    outlier: Mutex<()>,
    retries: RetryCounters,
    /// Upstream requests (attempts: a retry is one more), by status class 1xx..5xx; a local-origin
    /// failure counts as the status the client is answered with.
    attempts: [AtomicU64; 5],
    /// Ejections not made because `max_ejection_percent` was reached.
    ejections_overflow: AtomicU64,
}

/// The cluster's retry counters, resolved once rather than looked up per retry.
#[derive(Debug)]
struct RetryCounters {
    made: Counter,
    budget_exhausted: Counter,
    overflow: Counter,
}

/// A circuit breaker said no.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overflow {
    MaxConnections,
    MaxRequests,
    MaxPendingRequests,
    /// The client already holds its share of the connection slots.
    ClientShare,
}

impl Overflow {
    fn name(self) -> &'static str {
        match self {
            Overflow::MaxConnections => "max_connections",
            Overflow::MaxRequests => "max_requests",
            Overflow::MaxPendingRequests => "max_pending_requests",
            Overflow::ClientShare => "client_share",
        }
    }
}

impl ClusterState {
    pub(crate) fn new(config: Arc<Cluster>, metrics: Arc<Metrics>) -> Self {
        let name = Label::from(config.name.as_str());
        let counter = |reason| {
            metrics
                .retries
                .get_or_create(&ClusterEventLabels {
                    cluster: name.clone(),
                    reason,
                })
                .clone()
        };
        let retries = RetryCounters {
            made: counter("made"),
            budget_exhausted: counter("budget_exhausted"),
            overflow: counter("overflow"),
        };
        let now = Instant::now();
        Self {
            set: ArcSwap::from_pointee(EndpointSet::new(config, None)),
            clock: Clock::new(now),
            cursor: AtomicU64::new(0),
            budget: BudgetWindow::new(now),
            active_requests: AtomicU32::new(0),
            active_retries: AtomicU32::new(0),
            pending_requests: AtomicU32::new(0),
            shares: Arc::default(),
            next_evaluation: AtomicU64::new(0),
            outlier: Mutex::new(()),
            retries,
            attempts: Default::default(),
            ejections_overflow: AtomicU64::new(0),
            name,
            metrics,
        }
    }

    /// Adopts a newer configuration of the cluster, keeping the state of the endpoints that remain.
    pub(crate) fn sync(&self, config: &Arc<Cluster>) {
        let _outlier = lock(&self.outlier);
        let previous = self.set.load_full();
        if Arc::ptr_eq(&previous.config, config) {
            return;
        }
        let set = EndpointSet::new(config.clone(), Some(&previous));
        if config.outlier_detection.is_none() {
            for member in set.members.iter() {
                member.state.outlier.clear();
            }
        }
        if config.outlier_detection != previous.config.outlier_detection {
            // Revisit ejections under the new settings at the next request.
            let now = self.clock.ticks(Instant::now());
            self.next_evaluation.store(now, Ordering::Release);
        }
        self.update_ejected_gauge(&set);
        self.set.store(Arc::new(set));
    }

    /// Admits a request to the cluster (`max_requests`) and counts it for the retry budget.
    pub fn admit(self: &Arc<Self>) -> Result<Admission, Overflow> {
        let set = self.set.load();
        let breakers = &set.config.circuit_breakers;
        self.budget.deposit(Instant::now(), &breakers.retry_budget);
        if self.active_requests.fetch_add(1, Ordering::AcqRel) >= breakers.max_requests {
            self.active_requests.fetch_sub(1, Ordering::AcqRel);
            return Err(self.overflow(Overflow::MaxRequests));
        }
        Ok(Admission {
            cluster: self.clone(),
        })
    }

    /// A connection slot for an HTTP/1 request of `client` (a hash of who is asking)
    /// (`max_connections`), waiting as a pending request when all are in use, or refused when
    /// `max_pending_requests` are already waiting or the client holds its share (`shares.rs`).
    pub async fn connection_slot(&self, client: u64) -> Result<ConnectionSlot, Overflow> {
        let (connections, max_connections, max_pending) = {
            let set = self.set.load();
            let breakers = &set.config.circuit_breakers;
            (
                set.connections.clone(),
                breakers.max_connections,
                breakers.max_pending_requests,
            )
        };
        if self
            .shares
            .over_share(client, connections.available_permits(), max_connections)
        {
            return Err(self.overflow(Overflow::ClientShare));
        }
        if let Ok(permit) = connections.clone().try_acquire_owned() {
            return Ok(self.shares.take(client, permit));
        }
        if self.pending_requests.fetch_add(1, Ordering::AcqRel) >= max_pending {
            self.pending_requests.fetch_sub(1, Ordering::AcqRel);
            return Err(self.overflow(Overflow::MaxPendingRequests));
        }
        let _pending = Decrement(&self.pending_requests);
        let permit = connections
            .acquire_owned()
            .await
            .map_err(|_| Overflow::MaxPendingRequests)?;
        Ok(self.shares.take(client, permit))
    }

    /// A connection slot for an opaque TCP connection, or `None` (counted) at `max_connections`.
    pub fn try_connection_slot(&self) -> Option<OwnedSemaphorePermit> {
        let connections = self.set.load().connections.clone();
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
        let set = self.set.load();
        let breakers = &set.config.circuit_breakers;
        let now = Instant::now();
        if !self.budget.withdraw(now, &breakers.retry_budget) {
            self.retries.budget_exhausted.inc();
            return None;
        }
        if self.active_retries.fetch_add(1, Ordering::AcqRel) >= breakers.max_retries {
            self.active_retries.fetch_sub(1, Ordering::AcqRel);
            self.budget.refund(now, &breakers.retry_budget);
            self.retries.overflow.inc();
            return None;
        }
        self.retries.made.inc();
        Some(RetryPermit {
            cluster: self.clone(),
        })
    }

    /// Chooses an endpoint by the cluster's policy among those not ejected, avoiding `tried` when another
    /// one is available. `None`: no endpoint can take traffic.
    pub fn pick(&self, tried: &[SocketAddr]) -> Option<EndpointGuard> {
        let set = self.set.load();
        if let Some(detection) = &set.config.outlier_detection {
            self.evaluate_when_due(&set, detection, false);
        }
        set.pick(tried, &self.cursor)
            .map(|m| EndpointGuard::new(m.state.clone(), m.endpoint.workload.clone()))
    }

    /// Counts an HTTP attempt that ended with `status` (sent by the endpoint, or the local reply for a
    /// failure), as Envoy's `upstream_rq_total` and `upstream_rq_<N>xx`.
    pub fn count_attempt(&self, status: u16) {
        let class = usize::from(status / 100).clamp(1, 5) - 1;
        self.attempts[class].fetch_add(1, Ordering::Relaxed);
    }

    /// Records how an attempt ended: success and failure counts, and outlier detection. Names the
    /// detector when this outcome ejected the endpoint.
    pub fn report(&self, endpoint: &EndpointState, outcome: Outcome) -> Option<&'static str> {
        let failed = match outcome {
            Outcome::Status(status) => status >= 500,
            Outcome::LocalFailure { .. } => true,
            Outcome::Connected => false,
        };
        if failed {
            endpoint.failures.fetch_add(1, Ordering::Relaxed);
        } else if matches!(outcome, Outcome::Status(_)) {
            endpoint.successes.fetch_add(1, Ordering::Relaxed);
        }
        let set = self.set.load();
        let detection = set.config.outlier_detection.as_ref()?;
        let reason = endpoint.outlier.record(detection, outcome)?;
        self.eject(endpoint, reason).then_some(reason)
    }

    fn eject(&self, endpoint: &EndpointState, reason: &'static str) -> bool {
        let _outlier = lock(&self.outlier);
        // The set in force now, not the one the attempt began with: a configuration change swaps it
        // under this lock, and `max_ejection_percent` counts the members of the current one.
        let set = self.set.load();
        let Some(detection) = set.config.outlier_detection.as_ref() else {
            return false;
        };
        let counters = &endpoint.outlier;
        if counters.is_ejected() || !set.contains(endpoint) {
            return false; // already out, or removed by a configuration change while the request was in flight
        }
        let usable = set.members.iter().filter(|m| m.endpoint.weight > 0).count();
        let ejected = set.ejected();
        // At most max_ejection_percent of the cluster is ejected, but one endpoint always may be.
        let percent_after = (ejected + 1) as f64 * 100.0 / usable.max(1) as f64;
        if ejected > 0 && percent_after > f64::from(detection.max_ejection_percent) {
            tracing::info!(
                cluster = %set.config.name,
                endpoint = %endpoint.address,
                reason,
                ejected,
                max_ejection_percent = detection.max_ejection_percent,
                "outlier detection: not ejecting, max_ejection_percent reached"
            );
            counters.reset_counters();
            self.ejections_overflow.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        let now = Instant::now();
        let ejections = counters.ejections.fetch_add(1, Ordering::Relaxed) + 1;
        counters
            .ejected_at
            .store(self.clock.ticks(now), Ordering::Release);
        counters.reset_counters();
        tracing::warn!(
            cluster = %set.config.name,
            endpoint = %endpoint.address,
            reason,
            ejections,
            duration = ?ejection_time(detection, ejections),
            "outlier detection: endpoint ejected"
        );
        self.metrics
            .ejections
            .get_or_create(&ClusterEventLabels {
                cluster: self.name.clone(),
                reason,
            })
            .inc();
        let next = self.clock.ticks(now + detection.interval);
        let _ = self
            .next_evaluation
            .compare_exchange(0, next, Ordering::AcqRel, Ordering::Acquire);
        self.update_ejected_gauge(&set);
        true
    }

    /// Envoy's interval timer, run lazily: once the interval is up, endpoints whose ejection time is up
    /// come back, and endpoints that stayed in have their ejection count lowered. A request that finds
    /// another one revisiting goes on; `wait` (admin) waits for it.
    fn evaluate_when_due(&self, set: &EndpointSet, detection: &OutlierDetection, wait: bool) {
        let now = Instant::now();
        let next = self.next_evaluation.load(Ordering::Acquire);
        if next == 0 {
            let first = self.clock.ticks(now + detection.interval);
            let _ = self
                .next_evaluation
                .compare_exchange(0, first, Ordering::AcqRel, Ordering::Acquire);
            return;
        }
        if self.clock.instant(next) > now {
            return;
        }
        let _outlier = if wait {
            lock(&self.outlier)
        } else {
            match self.outlier.try_lock() {
                Ok(guard) => guard,
                Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
                Err(std::sync::TryLockError::WouldBlock) => return,
            }
        };
        let next = self.next_evaluation.load(Ordering::Acquire);
        if next == 0 || self.clock.instant(next) > now {
            return; // revisited meanwhile
        }
        let mut changed = false;
        for member in set.members.iter() {
            let counters = &member.state.outlier;
            match counters.ejected_until(detection, self.clock) {
                Some(until) if until <= now => {
                    counters.ejected_at.store(0, Ordering::Release);
                    changed = true;
                    tracing::info!(
                        cluster = %set.config.name,
                        endpoint = %member.endpoint.address,
                        ejections = counters.ejections.load(Ordering::Relaxed),
                        "outlier detection: endpoint returned to balancing"
                    );
                }
                Some(_) => {}
                None => {
                    let _ = counters
                        .ejections
                        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
                }
            }
        }
        // Catch up in whole intervals, so the schedule does not drift with request timing.
        let mut at = self.clock.instant(next) + detection.interval;
        while at <= now {
            at += detection.interval;
        }
        self.next_evaluation
            .store(self.clock.ticks(at), Ordering::Release);
        if changed {
            self.update_ejected_gauge(set);
        }
    }

    fn update_ejected_gauge(&self, set: &EndpointSet) {
        self.metrics
            .ejected_endpoints
            .get_or_create(&ClusterLabels {
                cluster: self.name.clone(),
            })
            .set(i64::try_from(set.ejected()).unwrap_or(i64::MAX));
    }

    pub(crate) fn forget_metrics(&self) {
        self.metrics.ejected_endpoints.remove(&ClusterLabels {
            cluster: self.name.clone(),
        });
    }

    pub(crate) fn status(&self) -> ClusterStatus {
        let set = self.set.load();
        let detection = set.config.outlier_detection;
        if let Some(detection) = &detection {
            self.evaluate_when_due(&set, detection, true);
        }
        let now = Instant::now();
        let wall = std::time::SystemTime::now();
        let endpoints = set
            .members
            .iter()
            .map(|m| {
                let state = &m.state;
                let remaining = detection
                    .and_then(|d| state.outlier.ejected_until(&d, self.clock))
                    .map(|until| until.saturating_duration_since(now));
                EndpointStatus {
                    address: m.endpoint.address,
                    weight: m.endpoint.weight,
                    healthy: m.endpoint.healthy,
                    active_requests: state.active(),
                    successes: state.successes.load(Ordering::Relaxed),
                    failures: state.failures.load(Ordering::Relaxed),
                    ejected: remaining.is_some(),
                    ejected_until: remaining.map(|r| humantime::format_rfc3339_millis(wall + r).to_string()),
                    ejections: state.outlier.ejections.load(Ordering::Relaxed),
                }
            })
            .collect();
        ClusterStatus {
            counters: self.counters(&set),
            name: set.config.name.clone(),
            lb_policy: set.config.lb_policy,
            active_requests: self.active_requests.load(Ordering::Relaxed),
            pending_requests: self.pending_requests.load(Ordering::Relaxed),
            active_retries: self.active_retries.load(Ordering::Relaxed),
            outlier_detection: detection.is_some(),
            circuit_breakers: set.config.circuit_breakers,
            endpoints,
        }
    }

    fn counters(&self, set: &EndpointSet) -> ClusterCounters {
        let event = |family: &prometheus_client::metrics::family::Family<ClusterEventLabels, Counter>,
                     reason: &'static str| {
            let labels = ClusterEventLabels {
                cluster: self.name.clone(),
                reason,
            };
            family.get(&labels).map_or(0, |c| c.get())
        };
        let overflows = |reason| event(&self.metrics.overflows, reason);
        let ejections = |reason| event(&self.metrics.ejections, reason);
        let attempts = std::array::from_fn(|i| self.attempts[i].load(Ordering::Relaxed));
        let consecutive_5xx = ejections("consecutive_5xx");
        let consecutive_gateway_failure = ejections("consecutive_gateway_failure");
        let consecutive_local_origin_failure = ejections("consecutive_local_origin_failure");
        ClusterCounters {
            upstream_rq_total: attempts.iter().sum(),
            upstream_rq_by_class: attempts,
            upstream_rq_retry: self.retries.made.get(),
            upstream_rq_retry_overflow: self.retries.overflow.get() + self.retries.budget_exhausted.get(),
            upstream_rq_pending_overflow: overflows(Overflow::MaxRequests.name())
                + overflows(Overflow::MaxPendingRequests.name())
                + overflows(Overflow::ClientShare.name()),
            upstream_cx_overflow: overflows(Overflow::MaxConnections.name()),
            ejections_active: set.ejected() as u64,
            ejections_enforced_total: consecutive_5xx
                + consecutive_gateway_failure
                + consecutive_local_origin_failure,
            ejections_enforced_consecutive_5xx: consecutive_5xx,
            ejections_enforced_consecutive_gateway_failure: consecutive_gateway_failure,
            ejections_enforced_consecutive_local_origin_failure: consecutive_local_origin_failure,
            ejections_overflow: self.ejections_overflow.load(Ordering::Relaxed),
        }
    }

    #[cfg(test)]
    pub(crate) fn pending_requests(&self) -> u32 {
        self.pending_requests.load(Ordering::Acquire)
    }

    #[cfg(test)]
    pub(crate) fn endpoint(&self, address: SocketAddr) -> Option<Arc<EndpointState>> {
        self.set.load().member(address).map(|m| m.state.clone())
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
    workload: Option<Arc<WorkloadLabels>>,
}

impl EndpointGuard {
    fn new(endpoint: Arc<EndpointState>, workload: Option<Arc<WorkloadLabels>>) -> Self {
        endpoint.active.fetch_add(1, Ordering::AcqRel);
        Self { endpoint, workload }
    }

    /// The workload behind the endpoint, when discovery named it.
    pub fn workload(&self) -> Option<&Arc<WorkloadLabels>> {
        self.workload.as_ref()
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

/// The lock guards no data, only the order of ejections: a panic elsewhere cannot leave it
/// inconsistent, so a poisoned lock is still used.
fn lock(m: &Mutex<()>) -> MutexGuard<'_, ()> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
