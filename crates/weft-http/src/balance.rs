//! Choosing an endpoint of a cluster: weighted round robin (Envoy's default) or weighted random, over
//! the endpoints that are healthy. `LEAST_REQUEST` is balanced round robin until the balancing work
//! (outstanding-request tracking) lands.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use weft_model::{Cluster, LbPolicy};

/// Round-robin cursors by cluster name; they outlive configuration snapshots.
#[derive(Debug, Default)]
pub(crate) struct Balancer {
    cursors: Mutex<HashMap<String, Arc<AtomicU64>>>,
}

impl Balancer {
    pub(crate) fn pick(&self, cluster: &Cluster) -> Option<SocketAddr> {
        let total: u64 = cluster.healthy_endpoints().map(|e| u64::from(e.weight)).sum();
        if total == 0 {
            return None;
        }
        let point = match cluster.lb_policy {
            LbPolicy::Random => rand::random_range(0..total),
            LbPolicy::RoundRobin | LbPolicy::LeastRequest => {
                self.cursor(&cluster.name).fetch_add(1, Ordering::Relaxed) % total
            }
        };
        let mut point = point;
        for endpoint in cluster.healthy_endpoints() {
            let weight = u64::from(endpoint.weight);
            if point < weight {
                return Some(endpoint.address);
            }
            point -= weight;
        }
        None
    }

    fn cursor(&self, cluster: &str) -> Arc<AtomicU64> {
        let mut cursors = self.cursors.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(cursor) = cursors.get(cluster) {
            return cursor.clone();
        }
        cursors.entry(cluster.to_owned()).or_default().clone()
    }
}

#[cfg(test)]
mod tests {
    use weft_model::Endpoint;

    use super::*;

    fn cluster(policy: LbPolicy, endpoints: &[(&str, u32, bool)]) -> Cluster {
        let mut c = Cluster::new("c");
        c.lb_policy = policy;
        c.endpoints = endpoints
            .iter()
            .map(|(a, weight, healthy)| Endpoint {
                address: a.parse().unwrap(),
                weight: *weight,
                healthy: *healthy,
            })
            .collect();
        c
    }

    fn counts(b: &Balancer, c: &Cluster, n: usize) -> HashMap<SocketAddr, usize> {
        let mut counts = HashMap::new();
        for _ in 0..n {
            *counts.entry(b.pick(c).unwrap()).or_default() += 1;
        }
        counts
    }

    #[test]
    fn weighted_round_robin_skips_unhealthy() {
        let c = cluster(
            LbPolicy::RoundRobin,
            &[
                ("10.0.0.1:80", 1, true),
                ("10.0.0.2:80", 3, true),
                ("10.0.0.3:80", 5, false),
            ],
        );
        let counts = counts(&Balancer::default(), &c, 400);
        assert_eq!(counts[&"10.0.0.1:80".parse().unwrap()], 100);
        assert_eq!(counts[&"10.0.0.2:80".parse().unwrap()], 300);
        assert_eq!(counts.len(), 2, "the unhealthy endpoint gets nothing");
    }

    #[test]
    fn random_covers_all_and_empty_gives_none() {
        let c = cluster(
            LbPolicy::Random,
            &[("10.0.0.1:80", 1, true), ("10.0.0.2:80", 1, true)],
        );
        assert_eq!(counts(&Balancer::default(), &c, 200).len(), 2);
        let none = cluster(LbPolicy::RoundRobin, &[("10.0.0.1:80", 1, false)]);
        assert_eq!(Balancer::default().pick(&none), None);
    }
}
