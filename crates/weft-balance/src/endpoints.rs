//! A cluster's endpoint set as requests see it: immutable, built by the configuration task and swapped
//! in whole, with each endpoint's running counts in atomics that outlive the set (an update keeps the
//! counts of the endpoints that remain). Choosing an endpoint reads the set without a lock and without
//! allocating.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use tokio::sync::Semaphore;
use weft_model::{Cluster, Endpoint, LbPolicy};

use crate::outlier::OutlierCounters;

/// One configuration of a cluster, with its endpoints resolved to their running state.
#[derive(Debug)]
pub(crate) struct EndpointSet {
    pub(crate) config: Arc<Cluster>,
    pub(crate) members: Box<[Member]>,
    /// Connections in use (HTTP/1: one per request in flight), up to `max_connections`. Kept from the
    /// previous set while the limit is unchanged.
    pub(crate) connections: Arc<Semaphore>,
}

#[derive(Debug)]
pub(crate) struct Member {
    pub(crate) endpoint: Endpoint,
    pub(crate) state: Arc<EndpointState>,
}

/// What the proxy knows about one endpoint: its load and its record, read and written without a lock.
#[derive(Debug)]
pub struct EndpointState {
    pub(crate) address: SocketAddr,
    pub(crate) active: AtomicU32,
    pub(crate) successes: AtomicU64,
    pub(crate) failures: AtomicU64,
    pub(crate) outlier: OutlierCounters,
}

impl EndpointState {
    pub(crate) fn new(address: SocketAddr) -> Self {
        Self {
            address,
            active: AtomicU32::new(0),
            successes: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            outlier: OutlierCounters::default(),
        }
    }

    pub(crate) fn active(&self) -> u32 {
        self.active.load(Ordering::Relaxed)
    }
}

impl EndpointSet {
    /// The set for `config`, keeping the running state of the endpoints `previous` already had.
    pub(crate) fn new(config: Arc<Cluster>, previous: Option<&EndpointSet>) -> Self {
        let kept: HashMap<SocketAddr, &Arc<EndpointState>> = previous
            .map(|p| p.members.iter().map(|m| (m.endpoint.address, &m.state)).collect())
            .unwrap_or_default();
        let members = config
            .endpoints
            .iter()
            .map(|endpoint| {
                let kept = kept.get(&endpoint.address).map(|state| Arc::clone(state));
                Member {
                    endpoint: endpoint.clone(),
                    state: kept.unwrap_or_else(|| Arc::new(EndpointState::new(endpoint.address))),
                }
            })
            .collect();
        let limit = config.circuit_breakers.max_connections;
        let connections = match previous {
            // Connections in use keep their old permits until they finish.
            Some(p) if p.config.circuit_breakers.max_connections == limit => p.connections.clone(),
            _ => Arc::new(Semaphore::new(permits(limit))),
        };
        Self {
            config,
            members,
            connections,
        }
    }

    #[cfg(test)]
    pub(crate) fn member(&self, address: SocketAddr) -> Option<&Member> {
        self.members.iter().find(|m| m.endpoint.address == address)
    }

    pub(crate) fn contains(&self, state: &EndpointState) -> bool {
        self.members.iter().any(|m| std::ptr::eq(&*m.state, state))
    }

    pub(crate) fn ejected(&self) -> usize {
        self.members
            .iter()
            .filter(|m| m.state.outlier.is_ejected())
            .count()
    }

    /// Chooses an endpoint by the cluster's policy among those not ejected, avoiding `tried` when another
    /// one is available. `cursor` is the round-robin position. `None`: no endpoint can take traffic.
    pub(crate) fn pick(&self, tried: &[SocketAddr], cursor: &AtomicU64) -> Option<&Member> {
        let usable = |m: &Member| m.endpoint.weight > 0;
        let available = |m: &Member| m.endpoint.healthy && !m.state.outlier.is_ejected();
        let (mut total, mut healthy) = (0usize, 0usize);
        for member in self.members.iter().filter(|m| usable(m)) {
            total += 1;
            healthy += usize::from(available(member));
        }
        // Envoy's panic mode: with too few endpoints left, spread traffic over all of them rather than
        // overload the few (or send nothing anywhere).
        let panic = (healthy as f64) * 100.0 < self.config.panic_threshold_percent * (total as f64);
        let eligible = |m: &Member| usable(m) && (panic || available(m));
        let avoid_tried = !tried.is_empty()
            && self
                .members
                .iter()
                .any(|m| eligible(m) && !tried.contains(&m.endpoint.address));
        let candidate = |m: &Member| eligible(m) && !(avoid_tried && tried.contains(&m.endpoint.address));
        let weight: u64 = self
            .members
            .iter()
            .filter(|m| candidate(m))
            .map(|m| u64::from(m.endpoint.weight))
            .sum();
        if weight == 0 {
            return None;
        }
        let at = |point: u64| self.at_weight(point, &candidate);
        match self.config.lb_policy {
            LbPolicy::RoundRobin => at(cursor.fetch_add(1, Ordering::Relaxed) % weight),
            LbPolicy::Random => at(rand::random_range(0..weight)),
            // Power of two choices (Envoy's default `choice_count`): two endpoints drawn by weight, the
            // one with fewer requests in flight wins.
            LbPolicy::LeastRequest => {
                let a = at(rand::random_range(0..weight));
                let b = at(rand::random_range(0..weight));
                match (a, b) {
                    (Some(a), Some(b)) if b.state.active() < a.state.active() => Some(b),
                    (a, b) => a.or(b),
                }
            }
        }
    }

    /// The candidate at `point` on the line of candidates' weights. An ejection between the passes can
    /// shorten the line; the last candidate then stands in.
    fn at_weight(&self, mut point: u64, candidate: &impl Fn(&Member) -> bool) -> Option<&Member> {
        let mut last = None;
        for member in self.members.iter().filter(|m| candidate(m)) {
            let weight = u64::from(member.endpoint.weight);
            if point < weight {
                return Some(member);
            }
            point -= weight;
            last = Some(member);
        }
        last
    }
}

fn permits(limit: u32) -> usize {
    usize::try_from(limit)
        .unwrap_or(usize::MAX)
        .min(Semaphore::MAX_PERMITS)
}
