//! Configuration over xDS: a proxy configured only by `weft control` (and by a minimal xDS server that is
//! not weft control), changes under load, rejected resources, and a control plane that goes away.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use http::{Request, StatusCode};
use weft_control::ControlPlane;
use weft_test_support::http::{HttpServer, TestBody, client, drain_body, empty};
use weft_test_support::{TestProxy, admin_get, assert_eventually};

const ORDER_SVC: &str = "127.0.96.30:8080";

/// The seed's order-service example, with its workloads at these servers' ports.
pub(crate) fn order_yaml(v1: &HttpServer, v2: &HttpServer) -> String {
    let example = include_str!("../../../examples/mesh/order-service.yaml");
    example
        .replace("http: 18081", &format!("http: {}", v1.addr.port()))
        .replace("http: 18082", &format!("http: {}", v2.addr.port()))
}

fn write(dir: &Path, name: &str, text: &str) {
    // Write-then-rename, as editors and kubectl-like tools do, so the watcher never reads half a file.
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, dir.join(name)).unwrap();
}

async fn proxy_of(control_plane: &str) -> TestProxy {
    let proxy = TestProxy::start(&format!(
        "node: {{ workload: client, namespace: default }}\nxds: {{ address: \"{control_plane}\", initial_fetch_timeout: 10s }}"
    ))
    .await;
    assert_eventually!(
        admin_get(proxy.admin(), "/ready").await.0 == 200,
        "the proxy never became ready"
    );
    proxy
}

fn get(path: &str, canary: bool) -> Request<TestBody> {
    let mut b = Request::get(format!("http://order-svc:8080{path}"));
    if canary {
        b = b.header("x-canary", "true");
    }
    b.body(empty()).unwrap()
}

async fn served_by(
    client: &hyper_util::client::legacy::Client<weft_test_support::OrigDstConnector, TestBody>,
    canary: bool,
) -> Result<String, String> {
    let response = client
        .request(get("/orders", canary))
        .await
        .map_err(|e| e.to_string())?;
    let status = response.status();
    let who = response
        .headers()
        .get("x-served-by")
        .map(|v| v.to_str().unwrap().to_owned());
    drain_body(response.into_body())
        .await
        .map_err(|e| e.to_string())?;
    match (status, who) {
        (StatusCode::OK, Some(who)) => Ok(who),
        (status, _) => Err(format!("status {status}")),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_configured_only_by_weft_control_routes_as_the_yaml_says() {
    weft_test_support::init_tracing();
    let v1 = HttpServer::start("v1").await;
    let v2 = HttpServer::start("v2").await;
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "order.yaml", &order_yaml(&v1, &v2));
    let cp = ControlPlane::start(dir.path().into(), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    assert!(cp.problems().is_empty(), "{:?}", cp.problems());

    let proxy = proxy_of(&format!("http://{}", cp.address())).await;
    let client = client(
        proxy
            .orig_dst
            .connector(proxy.outbound(), ORDER_SVC.parse().unwrap()),
        false,
    );

    // The header match sends everything to v2.
    for _ in 0..20 {
        assert_eq!(served_by(&client, true).await.unwrap(), "v2");
    }
    // Otherwise 90/10 (binomial, n = 1000: 60..=140 is beyond 4 standard deviations).
    let mut to_v2 = 0;
    for _ in 0..1000 {
        if served_by(&client, false).await.unwrap() == "v2" {
            to_v2 += 1;
        }
    }
    assert!((60..=140).contains(&to_v2), "v2 got {to_v2} of 1000");

    let (_, dump) = admin_get(proxy.admin(), "/mesh").await;
    let dump: serde_json::Value = serde_json::from_str(&dump).unwrap();
    assert_eq!(dump["xds"]["connected"], true);
    assert!(
        dump["xds"]["types"]["Cluster"]["accepted_version"]
            .as_str()
            .is_some_and(|v| !v.is_empty()),
        "{dump}"
    );
    let metrics = proxy.metrics().await;
    assert!(
        weft_test_support::metric(&metrics, "weft_xds_updates_total", &[("result", "accepted")]) >= 4.0,
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shifting_weights_under_load_moves_traffic_without_a_failed_request() {
    let v1 = HttpServer::start("v1").await;
    let v2 = HttpServer::start("v2").await;
    let dir = tempfile::tempdir().unwrap();
    let all_to = |a: u32, b: u32| {
        order_yaml(&v1, &v2)
            .replace("weight: 10\n", &format!("weight: {b}\n"))
            .replace("weight: 90\n", &format!("weight: {a}\n"))
    };
    write(dir.path(), "order.yaml", &all_to(100, 0));
    let cp = ControlPlane::start(dir.path().into(), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let proxy = proxy_of(&format!("http://{}", cp.address())).await;
    let client = client(
        proxy
            .orig_dst
            .connector(proxy.outbound(), ORDER_SVC.parse().unwrap()),
        false,
    );
    for _ in 0..50 {
        assert_eq!(served_by(&client, false).await.unwrap(), "v1");
    }

    // Steady load from 4 clients while the weights flip.
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicUsize::new(0));
    let mut load = Vec::new();
    for _ in 0..4 {
        let (client, stop, failures) = (client.clone(), stop.clone(), failures.clone());
        load.push(tokio::spawn(async move {
            let mut sent = 0usize;
            while !stop.load(Ordering::Relaxed) {
                if served_by(&client, false).await.is_err() {
                    failures.fetch_add(1, Ordering::Relaxed);
                }
                sent += 1;
            }
            sent
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let flipped_at = std::time::Instant::now();
    write(dir.path(), "order.yaml", &all_to(0, 100));
    // Within 2 s every new request goes to v2.
    let mut moved = None;
    while flipped_at.elapsed() < Duration::from_secs(5) {
        let mut all_v2 = true;
        for _ in 0..20 {
            all_v2 &= served_by(&client, false).await.unwrap() == "v2";
        }
        if all_v2 {
            moved = Some(flipped_at.elapsed());
            break;
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let mut sent = 0;
    for task in load {
        sent += task.await.unwrap();
    }
    let moved = moved.expect("traffic never moved to v2");
    assert!(moved < Duration::from_secs(2), "traffic moved after {moved:?}");
    assert!(sent > 100, "the load was not steady: {sent} requests");
    assert_eq!(
        failures.load(Ordering::Relaxed),
        0,
        "requests failed during the change ({sent} sent)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_resource_is_reported_and_the_last_good_one_stays() {
    let v1 = HttpServer::start("v1").await;
    let v2 = HttpServer::start("v2").await;
    let dir = tempfile::tempdir().unwrap();
    let good = order_yaml(&v1, &v2)
        .replace("weight: 10\n", "weight: 100\n")
        .replace("weight: 90\n", "weight: 0\n");
    write(dir.path(), "order.yaml", &good);
    let cp = ControlPlane::start(dir.path().into(), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let proxy = proxy_of(&format!("http://{}", cp.address())).await;
    let client = client(
        proxy
            .orig_dst
            .connector(proxy.outbound(), ORDER_SVC.parse().unwrap()),
        false,
    );
    assert_eq!(served_by(&client, false).await.unwrap(), "v2");

    // An edit that names a subset no DestinationRule defines.
    write(
        dir.path(),
        "order.yaml",
        &good.replace(
            "subset: v1\n          weight: 0",
            "subset: v9\n          weight: 0",
        ),
    );
    assert_eventually!(
        !cp.problems().is_empty(),
        "the control plane did not report the problem"
    );
    let problem = cp.problems().remove(0);
    assert!(problem.file.ends_with("order.yaml"), "{problem}");
    assert_eq!(problem.resource, "VirtualService default/order-service");
    assert_eq!(problem.field, "spec.http[1].route[0].destination.subset");
    for _ in 0..50 {
        assert_eq!(
            served_by(&client, false).await.unwrap(),
            "v2",
            "the last good VirtualService still routes"
        );
    }
    assert!(
        cp.nacks().is_empty(),
        "the control plane never sends what it rejected"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_the_control_plane_changes_nothing_and_a_new_one_resyncs() {
    let v1 = HttpServer::start("v1").await;
    let v2 = HttpServer::start("v2").await;
    let dir = tempfile::tempdir().unwrap();
    let to = |a: u32, b: u32| {
        order_yaml(&v1, &v2)
            .replace("weight: 10\n", &format!("weight: {b}\n"))
            .replace("weight: 90\n", &format!("weight: {a}\n"))
    };
    write(dir.path(), "order.yaml", &to(100, 0));
    let cp = ControlPlane::start(dir.path().into(), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let address: SocketAddr = cp.address();
    let proxy = proxy_of(&format!("http://{address}")).await;
    let client = client(
        proxy
            .orig_dst
            .connector(proxy.outbound(), ORDER_SVC.parse().unwrap()),
        false,
    );
    assert_eq!(served_by(&client, false).await.unwrap(), "v1");

    cp.stop().await;
    assert_eventually!(
        weft_test_support::metric(&proxy.metrics().await, "weft_xds_connected", &[]) == 0.0,
        "still connected"
    );
    for _ in 0..50 {
        assert_eq!(
            served_by(&client, false).await.unwrap(),
            "v1",
            "traffic is unaffected"
        );
    }
    assert_eq!(admin_get(proxy.admin(), "/ready").await.0, 200, "still ready");

    // A new control plane on the same address, with changed configuration: the proxy reconnects and
    // resyncs.
    write(dir.path(), "order.yaml", &to(0, 100));
    let cp = ControlPlane::start(dir.path().into(), address).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        if served_by(&client, false).await.unwrap() == "v2" {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the proxy did not resync");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cp.stop().await;
}

/// With no configuration at all, the initial-fetch timeout does not make the proxy ready: a pod
/// reported ready with nothing from its control plane would send its traffic around the mesh. The
/// reason says which control plane and why.
#[tokio::test]
async fn without_a_control_plane_the_proxy_stays_not_ready_and_says_why() {
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let proxy = TestProxy::start(&format!(
        "xds: {{ address: \"http://{dead}\", initial_fetch_timeout: 1s }}"
    ))
    .await;
    assert_eventually!(
        admin_get(proxy.admin(), "/ready")
            .await
            .1
            .contains(&format!("no configuration from http://{dead} yet")),
        "the reason never named the control plane: {}",
        admin_get(proxy.admin(), "/ready").await.1
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (status, body) = admin_get(proxy.admin(), "/ready").await;
    assert_eq!(
        status, 503,
        "ready with no configuration after the timeout: {body}"
    );
    assert!(
        body.starts_with("not ready: waiting for xds config (no configuration from"),
        "{body}"
    );
}

/// A first configuration that lacks something waits for it, naming what is missing; once the
/// initial-fetch timeout has passed, the part that arrived is served and the proxy is ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partial_first_configuration_names_what_is_missing_until_the_initial_fetch_timeout() {
    use envoy_types::pb::envoy::config::cluster::v3::Cluster;
    use envoy_types::pb::envoy::config::listener::v3::Listener;
    use envoy_types::util::pack_any;
    use weft_test_support::envoy::*;

    let xds = weft_test_support::xds::TestXdsServer::start().await;
    // A cluster whose endpoints never come, and no listeners at all.
    xds.set(&url::<Cluster>(), "c1", vec![pack_any(eds_cluster("web"))]);
    let proxy = TestProxy::start(&format!(
        "xds: {{ address: \"{}\", initial_fetch_timeout: 3s }}",
        xds.url()
    ))
    .await;
    assert_eventually!(
        admin_get(proxy.admin(), "/ready").await.1
            == "not ready: waiting for xds config (missing Listeners (none received yet), ClusterLoadAssignment \"web\")\n",
        "{}",
        admin_get(proxy.admin(), "/ready").await.1
    );
    xds.set(&url::<Listener>(), "l1", vec![]);
    assert_eventually!(
        admin_get(proxy.admin(), "/ready").await.1
            == "not ready: waiting for xds config (missing ClusterLoadAssignment \"web\")\n",
        "{}",
        admin_get(proxy.admin(), "/ready").await.1
    );
    assert_eventually!(
        admin_get(proxy.admin(), "/ready").await.0 == 200,
        "the initial fetch timeout did not end the wait of a partial configuration"
    );
}

/// A response larger than `xds.max_message_bytes` is not a reconnect loop: it is counted, the reason is
/// on /ready, and the proxy retries slowly. A proxy with the default limit (64 MiB) takes the same
/// response (gRPC's own 4 MiB default would have refused it at about 7,000 clusters).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_over_max_message_bytes_is_counted_and_retried_slowly() {
    use envoy_types::pb::envoy::config::cluster::v3::Cluster;
    use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
    use envoy_types::pb::envoy::config::listener::v3::Listener;
    use envoy_types::util::pack_any;
    use weft_test_support::envoy::*;

    let web = HttpServer::start("web").await;
    let xds = weft_test_support::xds::TestXdsServer::start().await;
    let names: Vec<String> = (0..2_000)
        .map(|i| format!("outbound|8080||service-{i}.default.svc.cluster.local"))
        .collect();
    xds.set(
        &url::<Cluster>(),
        "c1",
        names.iter().map(|n| pack_any(eds_cluster(n))).collect(),
    );
    xds.set(
        &url::<ClusterLoadAssignment>(),
        "e1",
        names.iter().map(|n| endpoints(n, web.addr)).collect(),
    );
    xds.set(&url::<Listener>(), "l1", vec![]);

    let small = TestProxy::start(&format!(
        "xds: {{ address: \"{}\", initial_fetch_timeout: 1s, max_message_bytes: 65536 }}",
        xds.url()
    ))
    .await;
    assert_eventually!(
        weft_test_support::metric(
            &small.metrics().await,
            "weft_xds_updates_total",
            &[("resource_type", "unknown"), ("result", "too_large")]
        ) >= 1.0,
        "the oversized response was not counted"
    );
    let (status, body) = admin_get(small.admin(), "/ready").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("larger than xds.max_message_bytes"), "{body}");
    let first_requests = || {
        xds.requests()
            .iter()
            .filter(|r| r.type_url == url::<Cluster>() && r.response_nonce.is_empty())
            .count()
    };
    // The next attempt comes 7.5-15 s later (an ordinary failure's backoff starts at 250 ms).
    let streams = first_requests();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        first_requests(),
        streams,
        "a new stream within 3 s: a reconnect loop"
    );
    assert_eq!(admin_get(small.admin(), "/ready").await.0, 503);

    let default = TestProxy::start(&format!("xds: {{ address: \"{}\" }}", xds.url())).await;
    assert_eventually!(
        admin_get(default.admin(), "/ready").await.0 == 200,
        "the proxy with the default limit never took the configuration: {}",
        admin_get(default.admin(), "/ready").await.1
    );
    let (_, clusters) = admin_get(default.admin(), "/clusters").await;
    assert!(
        clusters.contains("outbound|8080||service-1999.default.svc.cluster.local::"),
        "{clusters}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_xds_server_that_is_not_weft_control_drives_the_proxy_and_gets_precise_nacks() {
    use envoy_types::pb::envoy::config::cluster::v3::Cluster;
    use envoy_types::pb::envoy::config::cluster::v3::cluster::{ClusterDiscoveryType, DiscoveryType};
    use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
    use envoy_types::pb::envoy::config::listener::v3::Listener;
    use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
    use envoy_types::util::pack_any;
    use weft_test_support::envoy::*;

    let web = HttpServer::start("web").await;
    let xds = weft_test_support::xds::TestXdsServer::start().await;
    xds.set(&url::<Cluster>(), "c1", vec![pack_any(eds_cluster("web"))]);
    xds.set(
        &url::<ClusterLoadAssignment>(),
        "e1",
        vec![endpoints("web", web.addr)],
    );
    xds.set(&url::<Listener>(), "l1", vec![listener(8000, "8000")]);
    xds.set(&url::<RouteConfiguration>(), "r1", vec![routes("8000", "web")]);

    let proxy = proxy_of(&xds.url()).await;
    let client = client(
        proxy
            .orig_dst
            .connector(proxy.outbound(), "127.0.96.9:8000".parse().unwrap()),
        false,
    );
    let response = client
        .request(Request::get("http://web:8000/").body(empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(response.headers()["x-served-by"], "web");
    drain_body(response.into_body()).await.unwrap();
    assert!(
        xds.acked_versions(&url::<Cluster>()).contains(&"c1".to_owned()),
        "CDS was ACKed"
    );
    assert!(
        xds.acked_versions(&url::<RouteConfiguration>())
            .contains(&"r1".to_owned()),
        "RDS was ACKed"
    );

    // Version c2 adds a cluster weft cannot serve: it is NACKed, naming the resource and the field, and
    // the proxy stays on c1.
    let mut dns = eds_cluster("dns");
    dns.cluster_discovery_type = Some(ClusterDiscoveryType::Type(DiscoveryType::StrictDns as i32));
    xds.set(
        &url::<Cluster>(),
        "c2",
        vec![pack_any(eds_cluster("web")), pack_any(dns)],
    );
    assert_eventually!(!xds.nacks().is_empty(), "no NACK");
    let (type_url, still_on, message) = xds.nacks().remove(0);
    assert_eq!(type_url, url::<Cluster>());
    assert_eq!(still_on, "c1", "the NACK carries the last accepted version");
    assert_eq!(
        message,
        "Cluster \"dns\": type: STRICT_DNS clusters are not supported (use EDS or STATIC)"
    );
    for _ in 0..20 {
        let response = client
            .request(Request::get("http://web:8000/").body(empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK, "traffic keeps flowing");
        drain_body(response.into_body()).await.unwrap();
    }
    let (_, dump) = admin_get(proxy.admin(), "/mesh").await;
    let dump: serde_json::Value = serde_json::from_str(&dump).unwrap();
    assert_eq!(dump["xds"]["types"]["Cluster"]["accepted_version"], "c1");
    assert_eq!(dump["xds"]["types"]["Cluster"]["last_nack"]["version"], "c2");
    assert_eq!(dump["xds"]["types"]["Cluster"]["last_nack"]["reason"], message);
    // Envoy's dump shows the rejected cluster as NACKed, with the version and the reason, beside the
    // accepted one.
    let (_, envoy) = admin_get(proxy.admin(), "/config_dump?resource=dynamic_active_clusters").await;
    let envoy: serde_json::Value = serde_json::from_str(&envoy).unwrap();
    let entries = envoy["configs"].as_array().unwrap();
    let rejected = entries
        .iter()
        .find(|c| c["error_state"]["failed_configuration"]["name"] == "dns")
        .unwrap_or_else(|| panic!("{envoy}"));
    assert_eq!(rejected["client_status"], "NACKED");
    assert_eq!(rejected["error_state"]["version_info"], "c2");
    assert_eq!(rejected["error_state"]["details"], message);
    assert!(rejected.get("cluster").is_none(), "dns was never accepted");
    let web = entries
        .iter()
        .find(|c| c["cluster"]["name"] == "web")
        .unwrap_or_else(|| panic!("{envoy}"));
    assert_eq!(web["client_status"], "ACKED");
    assert_eq!(web["version_info"], "c2", "web came again in c2 and was accepted");
    let metrics = proxy.metrics().await;
    assert_eq!(
        weft_test_support::metric(
            &metrics,
            "weft_xds_updates_total",
            &[("resource_type", "Cluster"), ("result", "rejected")]
        ),
        1.0,
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_is_pushed_once_and_only_as_the_types_it_changes() {
    let v1 = HttpServer::start("v1").await;
    let v2 = HttpServer::start("v2").await;
    let dir = tempfile::tempdir().unwrap();
    let yaml = order_yaml(&v1, &v2);
    write(dir.path(), "order.yaml", &yaml);
    let cp = ControlPlane::start(dir.path().into(), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let proxy = proxy_of(&format!("http://{}", cp.address())).await;
    let node = "sidecar~~client.default";
    assert_eventually!(
        cp.pushes(node) == 4,
        "initial push: one response per type, got {}",
        cp.pushes(node)
    );

    // Rewriting the same content changes no version: nothing is pushed.
    write(dir.path(), "order.yaml", &yaml);
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(cp.pushes(node), 4, "an unchanged configuration was pushed");

    // A timeout change touches only the routes: one RDS push, within a second.
    let changed_at = std::time::Instant::now();
    write(
        dir.path(),
        "order.yaml",
        &yaml.replace("timeout: 10s", "timeout: 12s"),
    );
    assert_eventually!(cp.pushes(node) == 5, "the change was not pushed");
    assert!(
        changed_at.elapsed() < Duration::from_secs(1),
        "pushed after {:?}",
        changed_at.elapsed()
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(cp.pushes(node), 5, "only the route configuration changed");
    let (_, dump) = admin_get(proxy.admin(), "/mesh").await;
    assert!(dump.contains("\"timeout\": \"12s\""), "{dump}");
}

/// weft control's monitoring port: Prometheus metrics of its own (connected proxies, pushes by type,
/// certificates signed and refused) and `/debug/syncz`, each connected proxy's ACKed state per type.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_planes_monitoring_port_reports_proxies_pushes_and_certificates() {
    let v1 = HttpServer::start("v1").await;
    let v2 = HttpServer::start("v2").await;
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "order.yaml", &order_yaml(&v1, &v2));
    let mut cp = ControlPlane::start(dir.path().into(), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let monitoring = cp.serve_monitoring("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let token = cp
        .ca()
        .tokens()
        .issue("default", "client", Duration::from_secs(3600))
        .unwrap();
    let proxy = TestProxy::start(&format!(
        "node: {{ workload: client, namespace: default, service_account: client }}\n\
         xds: {{ address: \"http://{0}\", initial_fetch_timeout: 10s }}\n\
         identity: {{ ca_address: \"http://{0}\", token: \"{token}\" }}",
        cp.address()
    ))
    .await;
    assert_eventually!(admin_get(proxy.admin(), "/ready").await.0 == 200, "not ready");
    // A request with a token for nobody is refused, and counted.
    let forged = weft_identity::CaClient::new(
        &format!("http://{}", cp.address()),
        weft_identity::BearerToken::Inline("forged".into()),
    )
    .unwrap();
    let id = weft_identity::SpiffeId::new("cluster.local", "default", "client").unwrap();
    let (_, csr) = weft_identity::csr::new_csr(&id).unwrap();
    assert!(forged.certify(&csr, Duration::from_secs(3600)).await.is_err());

    let metrics = || async { admin_get(monitoring, "/metrics").await.1 };
    assert_eventually!(
        metrics().await.contains("weft_control_xds_connected_proxies 1"),
        "{}",
        metrics().await
    );
    let text = metrics().await;
    for line in [
        "weft_control_certificates_signed_total 1",
        "weft_control_certificate_requests_refused_total{reason=\"unauthenticated\"} 1",
    ] {
        assert!(text.contains(line), "{line} in {text}");
    }
    for ty in ["cds", "eds", "lds", "rds"] {
        let pushed = format!("weft_control_xds_pushes_total{{type=\"{ty}\"}}");
        assert!(text.contains(&pushed), "{pushed} in {text}");
    }

    // Every type the proxy was sent, it ACKed: SYNCED, at the version sent.
    let syncz = || async {
        let (status, body) = admin_get(monitoring, "/debug/syncz").await;
        assert_eq!(status, 200, "{body}");
        serde_json::from_str::<serde_json::Value>(&body).unwrap()
    };
    assert_eventually!(
        syncz().await[0]["types"]
            .as_object()
            .is_some_and(|types| types.len() == 4 && types.values().all(|t| t["status"] == "SYNCED")),
        "{}",
        syncz().await
    );
    let report = syncz().await;
    assert_eq!(report[0]["workload"], "client");
    assert_eq!(report[0]["namespace"], "default");
    let cds = &report[0]["types"]["cds"];
    assert_eq!(cds["acked"], cds["sent"]);

    proxy.stop().await;
    assert_eventually!(
        metrics().await.contains("weft_control_xds_connected_proxies 0"),
        "the stopped proxy is still counted"
    );
    assert_eq!(syncz().await, serde_json::json!([]));
}
