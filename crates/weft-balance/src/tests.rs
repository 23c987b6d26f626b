use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use weft_model::{CircuitBreakers, Cluster, Endpoint, LbPolicy, OutlierDetection, RetryBudget};
use weft_telemetry::Metrics;

use crate::{ClusterState, ClusterStates, EndpointState, Outcome, Overflow};

fn addr(i: u8) -> SocketAddr {
    SocketAddr::from(([10, 0, 0, i], 80))
}

fn cluster(policy: LbPolicy, endpoints: &[(u8, u32, bool)]) -> Cluster {
    let mut c = Cluster::new("c");
    c.lb_policy = policy;
    c.endpoints = endpoints
        .iter()
        .map(|(i, weight, healthy)| Endpoint {
            weight: *weight,
            healthy: *healthy,
            ..Endpoint::new(addr(*i))
        })
        .collect();
    c
}

fn state(c: Cluster) -> Arc<ClusterState> {
    ClusterStates::new(Metrics::new()).get(&Arc::new(c))
}

fn counts(s: &ClusterState, n: usize) -> HashMap<SocketAddr, usize> {
    let mut counts = HashMap::new();
    for _ in 0..n {
        *counts.entry(s.pick(&[]).unwrap().address()).or_default() += 1;
    }
    counts
}

fn endpoint(s: &ClusterState, i: u8) -> Arc<EndpointState> {
    s.endpoint(addr(i)).unwrap()
}

fn fail(s: &ClusterState, i: u8, times: usize) {
    let endpoint = endpoint(s, i);
    for _ in 0..times {
        s.report(&endpoint, Outcome::Status(503));
    }
}

fn ejected(s: &ClusterState) -> Vec<SocketAddr> {
    s.status()
        .endpoints
        .iter()
        .filter(|e| e.ejected)
        .map(|e| e.address)
        .collect()
}

fn with_outlier(mut c: Cluster, d: OutlierDetection) -> Cluster {
    c.outlier_detection = Some(d);
    c
}

#[test]
fn weighted_round_robin_skips_unhealthy_and_zero_weight() {
    let s = state(cluster(
        LbPolicy::RoundRobin,
        &[(1, 1, true), (2, 3, true), (3, 5, false), (4, 0, true)],
    ));
    let counts = counts(&s, 400);
    assert_eq!(counts[&addr(1)], 100);
    assert_eq!(counts[&addr(2)], 300);
    assert_eq!(counts.len(), 2);
}

#[test]
fn random_and_least_request_honour_weights() {
    for policy in [LbPolicy::Random, LbPolicy::LeastRequest] {
        let s = state(cluster(policy, &[(1, 1, true), (2, 3, true)]));
        let counts = counts(&s, 4000);
        // Expected 1000 / 3000; 5 standard deviations is about 140.
        let light = counts[&addr(1)];
        assert!((860..=1140).contains(&light), "{policy:?}: {counts:?}");
    }
}

#[test]
fn least_request_avoids_the_busy_endpoint() {
    let s = state(cluster(
        LbPolicy::LeastRequest,
        &[(1, 1, true), (2, 1, true), (3, 1, true)],
    ));
    // Endpoint 1 has 10 requests in flight; the others none.
    let busy: Vec<_> = std::iter::repeat_with(|| s.pick(&[]).unwrap())
        .filter(|g| g.address() == addr(1))
        .take(10)
        .collect();
    let before = busy.len();
    let counts = counts(&s, 3000);
    // P2C picks the busy endpoint only when both choices are it: 1/9 of the time.
    let to_busy = counts.get(&addr(1)).copied().unwrap_or(0);
    assert!(
        to_busy < 3000 / 9 + 120,
        "busy endpoint got {to_busy} of 3000 ({before} in flight)"
    );
    assert!(to_busy > 3000 / 9 - 120);
}

#[test]
fn retries_prefer_an_endpoint_not_yet_tried() {
    let s = state(cluster(LbPolicy::RoundRobin, &[(1, 1, true), (2, 1, true)]));
    for _ in 0..10 {
        assert_eq!(s.pick(&[addr(1)]).unwrap().address(), addr(2));
    }
    // With every endpoint tried, any will do.
    assert!(s.pick(&[addr(1), addr(2)]).is_some());
}

#[test]
fn consecutive_5xx_ejects_and_max_ejection_percent_limits() {
    let d = OutlierDetection {
        consecutive_5xx: 5,
        max_ejection_percent: 50,
        base_ejection_time: Duration::from_secs(30),
        ..OutlierDetection::default()
    };
    let s = state(with_outlier(
        cluster(LbPolicy::RoundRobin, &[(1, 1, true), (2, 1, true), (3, 1, true)]),
        d,
    ));
    fail(&s, 1, 4);
    assert!(ejected(&s).is_empty(), "four is not five");
    fail(&s, 1, 1);
    assert_eq!(ejected(&s), vec![addr(1)]);
    assert!(
        !counts(&s, 30).contains_key(&addr(1)),
        "an ejected endpoint gets no traffic"
    );
    // A second ejection would make 67% > 50%.
    fail(&s, 2, 5);
    assert_eq!(ejected(&s), vec![addr(1)]);
    // A success resets the count.
    fail(&s, 3, 4);
    s.report(&endpoint(&s, 3), Outcome::Status(200));
    fail(&s, 3, 4);
    assert_eq!(ejected(&s), vec![addr(1)]);
}

#[tokio::test(start_paused = true)]
async fn ejected_endpoints_return_after_their_time_which_grows_with_each_ejection() {
    let d = OutlierDetection {
        consecutive_5xx: 2,
        interval: Duration::from_millis(10),
        base_ejection_time: Duration::from_millis(200),
        max_ejection_percent: 100,
        ..OutlierDetection::default()
    };
    let s = state(with_outlier(
        cluster(LbPolicy::RoundRobin, &[(1, 1, true), (2, 1, true)]),
        d,
    ));
    fail(&s, 1, 2);
    assert_eq!(ejected(&s), vec![addr(1)]);
    tokio::time::advance(Duration::from_millis(300)).await;
    assert!(ejected(&s).is_empty(), "back after 200 ms (+ one interval)");
    assert!(counts(&s, 10).contains_key(&addr(1)));
    fail(&s, 1, 2);
    let status = s.status();
    assert_eq!(status.endpoints[0].ejections, 2);
    assert!(status.endpoints[0].ejected_until.is_some());
    // Twice the base now: still out after 250 ms.
    tokio::time::advance(Duration::from_millis(250)).await;
    assert_eq!(ejected(&s), vec![addr(1)]);
    tokio::time::advance(Duration::from_millis(250)).await;
    assert!(ejected(&s).is_empty());
}

#[test]
fn local_origin_failures_count_as_5xx_unless_split() {
    let d = OutlierDetection {
        consecutive_5xx: 3,
        consecutive_local_origin_failure: 2,
        max_ejection_percent: 100,
        ..OutlierDetection::default()
    };
    let s = state(with_outlier(
        cluster(LbPolicy::RoundRobin, &[(1, 1, true), (2, 1, true)]),
        d,
    ));
    let one = endpoint(&s, 1);
    for _ in 0..3 {
        s.report(&one, Outcome::LocalFailure { as_status: 503 });
    }
    assert_eq!(ejected(&s), vec![addr(1)]);

    let split = OutlierDetection {
        split_external_local_origin_errors: true,
        ..d
    };
    let s = state(with_outlier(
        cluster(LbPolicy::RoundRobin, &[(1, 1, true), (2, 1, true)]),
        split,
    ));
    let one = endpoint(&s, 1);
    s.report(&one, Outcome::LocalFailure { as_status: 503 });
    s.report(&one, Outcome::Connected);
    s.report(&one, Outcome::LocalFailure { as_status: 503 });
    assert!(
        ejected(&s).is_empty(),
        "a connect success resets the local-origin count"
    );
    s.report(&one, Outcome::LocalFailure { as_status: 503 });
    assert_eq!(ejected(&s), vec![addr(1)]);
}

#[test]
fn panic_threshold_spreads_traffic_over_all_endpoints() {
    let mut c = cluster(
        LbPolicy::RoundRobin,
        &[(1, 1, false), (2, 1, false), (3, 1, true)],
    );
    // One of three healthy (33%) is under the default 50%: everything takes traffic.
    let s = state(c.clone());
    assert_eq!(counts(&s, 30).len(), 3);
    c.panic_threshold_percent = 0.0;
    let s = state(c);
    assert_eq!(counts(&s, 30).len(), 1);
}

#[test]
fn endpoint_updates_keep_load_and_outlier_state() {
    let d = OutlierDetection {
        consecutive_5xx: 1,
        max_ejection_percent: 100,
        ..OutlierDetection::default()
    };
    let states = ClusterStates::new(Metrics::new());
    let first = Arc::new(with_outlier(
        cluster(LbPolicy::LeastRequest, &[(1, 1, true), (2, 1, true)]),
        d,
    ));
    let s = states.get(&first);
    let held = s.pick(&[addr(1)]).unwrap();
    assert_eq!(held.address(), addr(2));
    fail(&s, 1, 1);
    let second = Arc::new(with_outlier(
        cluster(
            LbPolicy::LeastRequest,
            &[(1, 1, true), (2, 1, true), (3, 1, true)],
        ),
        d,
    ));
    states.apply([&second]);
    let s = states.get(&second);
    let status = s.status();
    assert_eq!(status.endpoints.len(), 3);
    assert!(status.endpoints[0].ejected, "endpoint 1 stays ejected");
    assert_eq!(
        status.endpoints[1].active_requests, 1,
        "endpoint 2 keeps its request in flight"
    );
    drop(held);
    assert_eq!(s.status().endpoints[1].active_requests, 0);
    states.apply([]);
    assert!(states.status().is_empty());
}

#[test]
fn the_retry_budget_allows_a_share_of_requests_plus_a_reserve() {
    let mut c = cluster(LbPolicy::RoundRobin, &[(1, 1, true)]);
    c.circuit_breakers = CircuitBreakers {
        max_retries: u32::MAX,
        retry_budget: RetryBudget {
            budget_percent: 20.0,
            min_retries: 5,
            interval: Duration::from_secs(10),
        },
        ..CircuitBreakers::default()
    };
    let s = state(c);
    // Few requests: the minimum applies.
    let admitted: Vec<_> = (0..10).map(|_| s.admit().unwrap()).collect();
    let retries: Vec<_> = std::iter::from_fn(|| s.retry()).take(1000).collect();
    assert_eq!(retries.len(), 5);
    // Many: 20% of them.
    let more: Vec<_> = (0..90).map(|_| s.admit().unwrap()).collect();
    let retries: Vec<_> = std::iter::from_fn(|| s.retry()).take(1000).collect();
    assert_eq!(retries.len(), 20 - 5);
    drop((admitted, more));
}

#[test]
fn max_requests_and_max_retries_overflow() {
    let mut c = cluster(LbPolicy::RoundRobin, &[(1, 1, true)]);
    c.circuit_breakers = CircuitBreakers {
        max_requests: 2,
        max_retries: 1,
        ..CircuitBreakers::default()
    };
    let s = state(c);
    let a = s.admit().unwrap();
    let _b = s.admit().unwrap();
    assert_eq!(s.admit().unwrap_err(), Overflow::MaxRequests);
    drop(a);
    let _c = s.admit().unwrap();
    let retry = s.retry().unwrap();
    assert!(s.retry().is_none(), "one retry in flight at most");
    drop(retry);
    assert!(s.retry().is_some());
}

#[tokio::test(start_paused = true)]
async fn pending_requests_wait_for_a_connection_and_overflow_fails_fast() {
    let mut c = cluster(LbPolicy::RoundRobin, &[(1, 1, true)]);
    c.circuit_breakers = CircuitBreakers {
        max_connections: 1,
        max_pending_requests: 1,
        ..CircuitBreakers::default()
    };
    let s = state(c);
    let first = s.connection_slot(1).await.unwrap();
    let waiting = tokio::spawn({
        let s = s.clone();
        async move { s.connection_slot(1).await.map(drop) }
    });
    wait_for(|| s.pending_requests() == 1).await;
    assert_eq!(
        s.connection_slot(1).await.unwrap_err(),
        Overflow::MaxPendingRequests
    );
    drop(first);
    waiting.await.unwrap().unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_client_holding_its_share_of_busy_slots_is_refused_and_others_are_not() {
    let mut c = cluster(LbPolicy::RoundRobin, &[(1, 1, true)]);
    c.circuit_breakers = CircuitBreakers {
        max_connections: 10,
        max_pending_requests: 10,
        ..CircuitBreakers::default()
    };
    let s = state(c);
    let (greedy, other) = (7, 8);
    // Alone, a client may take all but a tenth of the slots, kept for a client that comes later.
    let mut alone = Vec::new();
    for _ in 0..9 {
        alone.push(s.connection_slot(greedy).await.unwrap());
    }
    assert_eq!(
        s.connection_slot(greedy).await.unwrap_err(),
        Overflow::ClientShare
    );
    let late = s.connection_slot(other).await.unwrap();
    drop((alone, late));
    // With half the slots held by one client, another still gets in, and the first, holding its
    // half, is refused while fewer than half are free.
    let mut held = Vec::new();
    for _ in 0..5 {
        held.push(s.connection_slot(greedy).await.unwrap());
    }
    let first = s.connection_slot(other).await.unwrap();
    assert_eq!(
        s.connection_slot(greedy).await.unwrap_err(),
        Overflow::ClientShare
    );
    let mut others = vec![first];
    for _ in 0..4 {
        others.push(s.connection_slot(other).await.unwrap());
    }
    // Slots given back count: once the other client is gone, the first may take them again (but
    // the reserve).
    drop(others);
    for _ in 0..4 {
        held.push(s.connection_slot(greedy).await.unwrap());
    }
    assert_eq!(held.len(), 9);
    assert_eq!(
        s.connection_slot(greedy).await.unwrap_err(),
        Overflow::ClientShare
    );
}

async fn wait_for(condition: impl Fn() -> bool) {
    for _ in 0..500 {
        if condition() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    panic!("condition not reached");
}

#[tokio::test(start_paused = true)]
async fn each_interval_spent_healthy_lowers_the_ejection_multiplier() {
    let d = OutlierDetection {
        consecutive_5xx: 1,
        interval: Duration::from_secs(10),
        base_ejection_time: Duration::from_secs(30),
        max_ejection_time: Duration::from_secs(300),
        max_ejection_percent: 100,
        ..OutlierDetection::default()
    };
    let s = state(with_outlier(
        cluster(LbPolicy::RoundRobin, &[(1, 1, true), (2, 1, true)]),
        d,
    ));
    fail(&s, 1, 1);
    tokio::time::advance(Duration::from_secs(31)).await;
    assert!(ejected(&s).is_empty());
    fail(&s, 1, 1);
    assert_eq!(s.status().endpoints[0].ejections, 2, "ejected twice");
    tokio::time::advance(Duration::from_secs(61)).await;
    assert!(ejected(&s).is_empty(), "60 s the second time");
    // Three intervals in balancing: the multiplier is back to 0, so the next ejection is 30 s again.
    for _ in 0..3 {
        tokio::time::advance(Duration::from_secs(10)).await;
        s.pick(&[]);
    }
    assert_eq!(s.status().endpoints[0].ejections, 0);
    fail(&s, 1, 1);
    tokio::time::advance(Duration::from_secs(41)).await;
    assert!(ejected(&s).is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_shorter_ejection_time_applies_to_endpoints_already_ejected() {
    let long = OutlierDetection {
        consecutive_5xx: 1,
        interval: Duration::from_secs(1),
        base_ejection_time: Duration::from_secs(600),
        max_ejection_percent: 100,
        ..OutlierDetection::default()
    };
    let states = ClusterStates::new(Metrics::new());
    let first = Arc::new(with_outlier(
        cluster(LbPolicy::RoundRobin, &[(1, 1, true), (2, 1, true)]),
        long,
    ));
    states.apply([&first]);
    let s = states.get(&first);
    fail(&s, 1, 1);
    tokio::time::advance(Duration::from_secs(5)).await;
    assert_eq!(ejected(&s), vec![addr(1)]);
    let short = OutlierDetection {
        base_ejection_time: Duration::from_secs(2),
        ..long
    };
    let second = Arc::new(with_outlier(
        cluster(LbPolicy::RoundRobin, &[(1, 1, true), (2, 1, true)]),
        short,
    ));
    states.apply([&second]);
    assert!(ejected(&s).is_empty(), "5 s out is past the new 2 s");
}

#[test]
fn picks_and_reports_from_many_threads_while_the_endpoint_set_changes() {
    let d = OutlierDetection {
        consecutive_5xx: 3,
        max_ejection_percent: 50,
        ..OutlierDetection::default()
    };
    let states = ClusterStates::new(Metrics::new());
    let sets: Vec<Arc<Cluster>> = (0..4)
        .map(|n| {
            let endpoints: Vec<_> = (1..=4 + n).map(|i| (i, 1, true)).collect();
            Arc::new(with_outlier(cluster(LbPolicy::LeastRequest, &endpoints), d))
        })
        .collect();
    states.apply([&sets[0]]);
    let s = states.get(&sets[0]);
    std::thread::scope(|scope| {
        for worker in 0..4u16 {
            let s = &s;
            scope.spawn(move || {
                for i in 0..5_000u16 {
                    let Some(guard) = s.pick(&[]) else { continue };
                    let status = if (i + worker) % 7 == 0 { 503 } else { 200 };
                    s.report(guard.state(), Outcome::Status(status));
                }
            });
        }
        for round in 0..200 {
            states.apply([&sets[round % sets.len()]]);
        }
    });
    states.apply([&sets[3]]);
    let status = s.status();
    assert_eq!(status.endpoints.len(), 7);
    assert!(
        status.endpoints.iter().all(|e| e.active_requests == 0),
        "every guard was counted back: {status:?}"
    );
    let ejected = status.endpoints.iter().filter(|e| e.ejected).count();
    assert!(ejected <= 3, "max_ejection_percent holds: {ejected} of 7");
    let answered: u64 = status.endpoints.iter().map(|e| e.successes + e.failures).sum();
    assert!(answered > 0 && answered <= 20_000, "{answered}");
}
