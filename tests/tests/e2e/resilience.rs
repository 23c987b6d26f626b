//! Resilience end to end: each behaviour configured the way users configure it (a VirtualService and a
//! DestinationRule given to `weft control`), carried over xDS to a real proxy, and exercised against test
//! servers that inject faults (errors, delays, hangs, refused connections).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use http::{Request, StatusCode};
use hyper_util::client::legacy::Client;
use weft_control::ControlPlane;
use weft_test_support::http::{Fault, HttpServer, TestBody, client, drain_body, empty, full};
use weft_test_support::{OrigDstConnector, TestProxy, admin_get, assert_eventually, metric};

/// The service's address as the app dials it (any address on port 8080 is the service's HTTP port).
const ORDERS: &str = "127.0.96.50:8080";
const CLUSTER: &str = "outbound|8080||orders.default.svc.cluster.local";

/// The `orders` Service with one WorkloadEntry per port (127.0.0.1), plus the given Istio resources.
fn mesh_yaml(ports: &[u16], istio: &str) -> String {
    let mut yaml = String::from(
        "apiVersion: v1
kind: Service
metadata: { name: orders, namespace: default }
spec:
  clusterIP: 10.96.0.50
  selector: { app: orders }
  ports: [{ name: http, port: 8080, targetPort: 8080 }]
",
    );
    for (i, port) in ports.iter().enumerate() {
        yaml.push_str(&format!(
            "---
apiVersion: networking.istio.io/v1beta1
kind: WorkloadEntry
metadata: {{ name: orders-{i}, namespace: default }}
spec:
  address: 127.0.0.1
  labels: {{ app: orders }}
  ports: {{ http: {port} }}
"
        ));
    }
    yaml.push_str(istio);
    yaml
}

fn write(dir: &Path, name: &str, text: &str) {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, dir.join(name)).unwrap();
}

/// A control plane serving `mesh_yaml(ports, istio)`, a proxy configured by it, and a client of the
/// service through the proxy.
struct Mesh {
    dir: tempfile::TempDir,
    _cp: ControlPlane,
    proxy: TestProxy,
    client: Client<OrigDstConnector, TestBody>,
    ports: Vec<u16>,
}

impl Mesh {
    async fn start(ports: &[u16], istio: &str) -> Self {
        weft_test_support::init_tracing();
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "orders.yaml", &mesh_yaml(ports, istio));
        let cp = ControlPlane::start(dir.path().into(), "127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        assert!(cp.problems().is_empty(), "{:?}", cp.problems());
        let proxy = TestProxy::start(&format!(
            "node: {{ workload: client, namespace: default }}\nxds: {{ address: \"http://{}\", initial_fetch_timeout: 10s }}",
            cp.address()
        ))
        .await;
        assert_eventually!(
            admin_get(proxy.admin(), "/ready").await.0 == 200,
            "the proxy never became ready"
        );
        let client = client(
            proxy
                .orig_dst
                .connector(proxy.outbound(), ORDERS.parse().unwrap()),
            false,
        );
        Self {
            dir,
            _cp: cp,
            proxy,
            client,
            ports: ports.to_vec(),
        }
    }

    /// Replaces the Istio resources; returns once the proxy has the new cluster configuration.
    async fn reconfigure(&self, istio: &str, applied: impl Fn(&serde_json::Value) -> bool) {
        write(self.dir.path(), "orders.yaml", &mesh_yaml(&self.ports, istio));
        assert_eventually!(
            applied(&self.cluster_config().await),
            "the proxy never received the new configuration"
        );
    }

    async fn cluster_config(&self) -> serde_json::Value {
        let (_, dump) = admin_get(self.proxy.admin(), "/mesh").await;
        let dump: serde_json::Value = serde_json::from_str(&dump).unwrap();
        dump["mesh"]["clusters"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == CLUSTER)
            .cloned()
            .unwrap_or_default()
    }

    /// The service's endpoints as admin `GET /endpoints` shows them.
    async fn endpoints(&self) -> Vec<serde_json::Value> {
        let (status, body) = admin_get(self.proxy.admin(), "/endpoints").await;
        assert_eq!(status, 200);
        let clusters: serde_json::Value = serde_json::from_str(&body).unwrap();
        clusters
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == CLUSTER)
            .map(|c| c["endpoints"].as_array().unwrap().clone())
            .unwrap_or_default()
    }

    async fn endpoint(&self, server: &HttpServer) -> serde_json::Value {
        let address = server.addr.to_string();
        self.endpoints()
            .await
            .into_iter()
            .find(|e| e["address"] == address.as_str())
            .unwrap_or_default()
    }

    async fn get(&self, path: &str) -> StatusCode {
        send(&self.client, path).await
    }

    /// `n` GETs, `concurrency` at a time; how many got 200.
    async fn load(&self, n: usize, concurrency: usize, path: &'static str) -> usize {
        let next = Arc::new(AtomicUsize::new(0));
        let ok = Arc::new(AtomicUsize::new(0));
        let workers: Vec<_> = (0..concurrency)
            .map(|_| {
                let (client, next, ok) = (self.client.clone(), next.clone(), ok.clone());
                tokio::spawn(async move {
                    while next.fetch_add(1, Ordering::SeqCst) < n {
                        if send(&client, path).await == StatusCode::OK {
                            ok.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                })
            })
            .collect();
        for worker in workers {
            worker.await.unwrap();
        }
        ok.load(Ordering::SeqCst)
    }

    async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        metric(&self.proxy.metrics().await, name, labels)
    }

    /// The service cluster's `cluster.<name>.<stat>` in admin `/stats`, Envoy's names.
    async fn stat(&self, stat: &str) -> u64 {
        let name = format!("cluster.{CLUSTER}.{stat}");
        let (_, text) = admin_get(self.proxy.admin(), "/stats").await;
        text.lines()
            .find_map(|line| line.strip_prefix(&format!("{name}: ")))
            .unwrap_or_else(|| panic!("no {name} in {text}"))
            .parse()
            .unwrap()
    }
}

async fn send(client: &Client<OrigDstConnector, TestBody>, path: &str) -> StatusCode {
    let request = Request::get(format!("http://orders:8080{path}"))
        .body(empty())
        .unwrap();
    match client.request(request).await {
        Ok(response) => {
            let status = response.status();
            drain_body(response.into_body()).await.unwrap();
            status
        }
        Err(err) => panic!("the proxy failed the connection: {err}"),
    }
}

async fn servers(n: usize) -> Vec<HttpServer> {
    let mut servers = Vec::new();
    for name in ["a", "b", "c", "d"].into_iter().take(n) {
        servers.push(HttpServer::start(name).await);
    }
    servers
}

fn ports(servers: &[HttpServer]) -> Vec<u16> {
    servers.iter().map(|s| s.addr.port()).collect()
}

/// The seed document's VirtualService and DestinationRule for the order service, on one host and
/// without subsets; `{interval}` and `{ejection}` are the outlier timings.
fn seed_policies(interval: &str, ejection: &str) -> String {
    format!(
        "---
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {{ name: orders }}
spec:
  hosts: [orders]
  http:
    - route:
        - destination: {{ host: orders }}
      retries:
        attempts: 3
        perTryTimeout: 2s
        retryOn: 5xx
      timeout: 10s
---
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata: {{ name: orders }}
spec:
  host: orders
  trafficPolicy:
    connectionPool:
      tcp:
        maxConnections: 100
      http:
        h2UpgradePolicy: UPGRADE
        maxRequestsPerConnection: 10
    outlierDetection:
      consecutive5xxErrors: 5
      interval: {interval}
      baseEjectionTime: {ejection}
      maxEjectionPercent: 50
    loadBalancer:
      simple: LEAST_REQUEST
"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_endpoint_is_ejected_retried_around_and_probed_again() {
    let servers = servers(3).await;
    let bad = &servers[2];
    bad.set_fault(Fault::Status(503));
    let mesh = Mesh::start(&ports(&servers), &seed_policies("30s", "30s")).await;

    let ok = mesh.load(2000, 4, "/").await;
    assert!(ok >= 1998, "only {ok} of 2000 requests succeeded");
    let ejected = mesh.endpoint(bad).await;
    assert_eq!(ejected["ejected"], true, "{ejected}");
    assert_eq!(ejected["ejections"], 1);
    assert!(ejected["ejected_until"].is_string(), "{ejected}");
    assert!(ejected["failures"].as_u64().unwrap() >= 5);
    let seen_by_bad = bad.request_count();
    assert!(
        seen_by_bad < 20,
        "the ejected endpoint still got {seen_by_bad} requests"
    );
    for good in &servers[..2] {
        assert_eq!(mesh.endpoint(good).await["ejected"], false);
    }
    // Envoy's text format says the same.
    let (_, text) = admin_get(mesh.proxy.admin(), "/clusters").await;
    assert!(
        text.contains(&format!(
            "{CLUSTER}::{}::health_flags::/failed_outlier_check",
            bad.addr
        )),
        "{text}"
    );
    assert!(
        mesh.metric("weft_outlier_ejections_total", &[("reason", "consecutive_5xx")])
            .await
            >= 1.0
    );
    assert_eq!(
        mesh.metric("weft_outlier_ejected_endpoints", &[("cluster", CLUSTER)])
            .await,
        1.0
    );
    // And Envoy's stats: every attempt the servers saw, the failed ones retried.
    let attempts: u64 = servers.iter().map(|s| s.request_count() as u64).sum();
    assert_eq!(mesh.stat("upstream_rq_total").await, attempts);
    let failed = mesh.stat("upstream_rq_5xx").await;
    assert_eq!(failed, seen_by_bad as u64);
    assert_eq!(mesh.stat("upstream_rq_2xx").await, attempts - failed);
    assert!(
        mesh.stat("upstream_rq_retry").await >= failed - 2,
        "the 503s were retried"
    );
    assert_eq!(mesh.stat("outlier_detection.ejections_active").await, 1);
    assert_eq!(
        mesh.stat("outlier_detection.ejections_enforced_consecutive_5xx")
            .await,
        1
    );
    assert_eq!(mesh.stat("outlier_detection.ejections_enforced_total").await, 1);
    assert_eq!(mesh.stat("membership_total").await, 3);
    assert_eq!(mesh.stat("membership_healthy").await, 2);

    // With a 1 s ejection time the endpoint is tried again, fails again, and is ejected for longer.
    mesh.reconfigure(&seed_policies("1s", "1s"), |c| {
        c["outlier_detection"]["base_ejection_time"] == "1s"
    })
    .await;
    assert_eventually!(
        {
            mesh.load(20, 2, "/").await;
            bad.request_count() > seen_by_bad
        },
        "the ejected endpoint was never probed again"
    );
    assert_eventually!(
        {
            mesh.load(20, 2, "/").await;
            mesh.endpoint(bad).await["ejections"].as_u64() >= Some(2)
        },
        "the probed endpoint was not ejected again: {}",
        mesh.endpoint(bad).await
    );
    // The retries covered for it: nobody saw its 503s.
    assert_eq!(mesh.load(200, 4, "/").await, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_every_endpoint_fails_the_budget_bounds_retries_and_ejection_stops_at_its_maximum() {
    let servers = servers(3).await;
    for s in &servers {
        s.set_fault(Fault::Status(503));
    }
    let mesh = Mesh::start(&ports(&servers), &seed_policies("30s", "30s")).await;

    // Enough requests that 20% of them (100) is the budget rather than its minimum (also 100).
    const N: usize = 500;
    let ok = mesh.load(N, 4, "/").await;
    assert_eq!(ok, 0);
    let attempts: usize = servers.iter().map(HttpServer::request_count).sum();
    // Without a budget, 3 retries each would make 2,000 attempts; the default budget allows 20% more
    // than the requests.
    assert!(attempts >= N, "{attempts}");
    assert!(attempts <= N + N / 5, "{attempts} attempts for {N} requests");
    assert!(
        mesh.metric("weft_upstream_retries_total", &[("reason", "budget_exhausted")])
            .await
            > 0.0
    );
    assert_eq!(mesh.stat("upstream_rq_total").await, attempts as u64);
    assert_eq!(mesh.stat("upstream_rq_5xx").await, attempts as u64);
    assert_eq!(
        mesh.stat("upstream_rq_retry").await,
        (attempts - N) as u64,
        "every attempt after a request's first is a retry"
    );
    assert!(
        mesh.stat("upstream_rq_retry_overflow").await > 0,
        "the budget said no"
    );
    assert!(
        mesh.stat("outlier_detection.ejections_overflow").await > 0,
        "max_ejection_percent held the others in"
    );
    // maxEjectionPercent 50 of 3 endpoints: one ejected, two kept in.
    let ejected = mesh
        .endpoints()
        .await
        .iter()
        .filter(|e| e["ejected"] == true)
        .count();
    assert_eq!(ejected, 1);
    assert!(
        mesh.metric(
            "istio_requests_total",
            &[("response_code", "503"), ("response_flags", "URX")]
        )
        .await
            > 0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_request_sends_a_slow_endpoint_fewer_requests_than_round_robin() {
    let servers = servers(3).await;
    servers[2].set_fault(Fault::Delay(Duration::from_millis(50)));
    let policy = |lb: &str| {
        format!(
            "---
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata: {{ name: orders }}
spec:
  host: orders
  trafficPolicy:
    loadBalancer:
      simple: {lb}
"
        )
    };
    let mesh = Mesh::start(&ports(&servers), &policy("ROUND_ROBIN")).await;
    const N: usize = 600;
    assert_eq!(mesh.load(N, 8, "/").await, N);
    let slow_round_robin = servers[2].request_count();
    mesh.reconfigure(&policy("LEAST_REQUEST"), |c| c["lb_policy"] == "LEAST_REQUEST")
        .await;
    assert_eq!(mesh.load(N, 8, "/").await, N);
    let slow_least_request = servers[2].request_count() - slow_round_robin;
    // Round robin gives it its third whatever its speed; least-request sees its requests pile up.
    assert!(
        (N / 3 - 2..=N / 3 + 2).contains(&slow_round_robin),
        "{slow_round_robin}"
    );
    assert!(
        slow_least_request * 2 < slow_round_robin,
        "least-request sent the slow endpoint {slow_least_request}, round robin {slow_round_robin}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_per_try_timeout_retries_a_hung_endpoint_and_the_route_timeout_gives_504_ut() {
    let servers = servers(2).await;
    servers[1].set_fault(Fault::Hang);
    let routes = |timeout: &str| {
        format!(
            "---
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {{ name: orders }}
spec:
  hosts: [orders]
  http:
    - route:
        - destination: {{ host: orders }}
      retries:
        attempts: 2
        perTryTimeout: 200ms
        retryOn: 5xx
      timeout: {timeout}
---
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata: {{ name: orders }}
spec:
  host: orders
  trafficPolicy:
    loadBalancer:
      simple: ROUND_ROBIN
"
        )
    };
    let mesh = Mesh::start(&ports(&servers), &routes("10s")).await;
    for _ in 0..10 {
        assert_eq!(mesh.get("/").await, StatusCode::OK);
    }
    assert!(
        servers[1].request_count() >= 4,
        "round robin sent some to the hung endpoint"
    );
    assert_eq!(servers[0].request_count(), 10);

    // Both hung, and a route timeout shorter than two tries: 504 UT.
    servers[0].set_fault(Fault::Hang);
    mesh.reconfigure(&routes("300ms"), |_| true).await;
    assert_eventually!(
        mesh.get("/").await == StatusCode::GATEWAY_TIMEOUT
            && mesh
                .metric(
                    "istio_requests_total",
                    &[("response_code", "504"), ("response_flags", "UT")]
                )
                .await
                >= 1.0,
        "no 504 UT"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_overflow_fails_fast_with_uo_and_a_dead_endpoint_is_retried_elsewhere() {
    let servers = servers(1).await;
    servers[0].set_fault(Fault::Hang);
    let limits = "---
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata: { name: orders }
spec:
  host: orders
  trafficPolicy:
    connectionPool:
      tcp: { maxConnections: 1 }
      http: { http1MaxPendingRequests: 1 }
";
    let mesh = Mesh::start(&ports(&servers), limits).await;
    // One request holds the only connection, a second waits for it...
    let in_flight: Vec<_> = (0..2)
        .map(|_| {
            let client = mesh.client.clone();
            tokio::spawn(async move { send(&client, "/").await })
        })
        .collect();
    let pending = format!("{CLUSTER}::pending_requests::1");
    assert_eventually!(
        servers[0].request_count() == 1
            && admin_get(mesh.proxy.admin(), "/clusters")
                .await
                .1
                .contains(&pending),
        "expected one request at the endpoint and one pending: {}, {} requests",
        admin_get(mesh.proxy.admin(), "/clusters").await.1,
        servers[0].request_count()
    );
    assert_eq!(mesh.endpoints().await[0]["active_requests"], 1);
    // ...and a third overflows at once, while the other two are still waiting.
    assert_eq!(mesh.get("/").await, StatusCode::SERVICE_UNAVAILABLE);
    assert!(in_flight.iter().all(|t| !t.is_finished()));
    assert_eq!(
        mesh.metric(
            "istio_requests_total",
            &[("response_code", "503"), ("response_flags", "UO")]
        )
        .await,
        1.0
    );
    assert_eq!(
        mesh.metric(
            "weft_upstream_overflows_total",
            &[("reason", "max_pending_requests")]
        )
        .await,
        1.0
    );
    assert_eq!(mesh.stat("upstream_rq_pending_overflow").await, 1);
    assert_eq!(
        mesh.stat("upstream_rq_pending_active").await,
        1,
        "the one waiting"
    );
    for t in in_flight {
        t.abort();
    }

    // A second service endpoint that refuses connections: Istio's default retry policy
    // (connect-failure) sends every request elsewhere.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_port = dead.local_addr().unwrap().port();
    drop(dead);
    let live = HttpServer::start("live").await;
    let mesh = Mesh::start(&[live.addr.port(), dead_port], "").await;
    for _ in 0..20 {
        assert_eq!(mesh.get("/").await, StatusCode::OK);
    }
    assert_eq!(live.request_count(), 20);
    assert!(
        mesh.metric("weft_upstream_retries_total", &[("reason", "made")])
            .await
            >= 1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_body_is_replayed_on_retry_and_a_large_one_is_not_retried() {
    let servers = servers(2).await;
    servers[1].set_fault(Fault::Status(503));
    let routes = "---
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: { name: orders }
spec:
  hosts: [orders]
  http:
    - route:
        - destination: { host: orders }
      retries: { attempts: 2, retryOn: 5xx }
---
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata: { name: orders }
spec:
  host: orders
  trafficPolicy:
    loadBalancer: { simple: ROUND_ROBIN }
";
    let mesh = Mesh::start(&ports(&servers), routes).await;
    let post = |size: usize| {
        Request::post("http://orders:8080/sink")
            .body(full(vec![b'x'; size]))
            .unwrap()
    };
    // Small bodies: every POST arrives whole, on the good endpoint when the bad one answered first.
    for _ in 0..6 {
        let response = mesh.client.request(post(10_000)).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let body = http_body_util::BodyExt::collect(response.into_body())
            .await
            .unwrap()
            .to_bytes();
        assert_eq!(&body[..], b"10000");
    }
    assert!(servers[1].request_count() >= 2);
    // Larger than the replay buffer: not retried, so the bad endpoint's 503 reaches the client.
    let mut statuses = Vec::new();
    for _ in 0..4 {
        let response = mesh
            .client
            .request(post(weft_http::MAX_REPLAY_BYTES + 1))
            .await
            .unwrap();
        statuses.push(response.status());
        drain_body(response.into_body()).await.unwrap();
    }
    assert!(
        statuses.contains(&StatusCode::SERVICE_UNAVAILABLE),
        "{statuses:?}"
    );
    assert!(statuses.contains(&StatusCode::OK), "{statuses:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_deadline_bounds_the_request() {
    let servers = servers(1).await;
    servers[0].set_fault(Fault::Hang);
    let mesh = Mesh::start(&ports(&servers), "").await;
    let h2 = client(
        mesh.proxy
            .orig_dst
            .connector(mesh.proxy.outbound(), ORDERS.parse().unwrap()),
        true,
    );
    let request = Request::post("http://orders:8080/pkg.Service/Method")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("grpc-timeout", "200m")
        .body(full(vec![0u8, 0, 0, 0, 0]))
        .unwrap();
    let response = h2.request(request).await.unwrap();
    // A trailers-only gRPC response: the client's deadline passed.
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["grpc-status"], "4");
    assert_eq!(
        mesh.metric(
            "istio_requests_total",
            &[("request_protocol", "grpc"), ("response_flags", "UT")]
        )
        .await,
        1.0
    );
}

/// Opaque TCP: a dead endpoint's connect failure is tried again on another endpoint and counted by
/// outlier detection, which ejects it; an idle TCP connection is closed after the idle timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_connects_are_retried_elsewhere_and_idle_connections_closed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use weft_test_support::tcp::TcpServer;

    let echo = TcpServer::echo().await;
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let proxy = TestProxy::start(&format!(
        "idle_timeout: 300ms
outbound: {{ services: [{{ address: 0.0.0.0:6379, cluster: cache, protocol: tcp }}] }}
clusters:
  - name: cache
    lb_policy: ROUND_ROBIN
    endpoints: [\"{dead}\", \"{}\"]
    outlier_detection: {{ consecutive_5xx: 2, max_ejection_percent: 100 }}",
        echo.addr
    ))
    .await;
    for _ in 0..6 {
        let mut stream = proxy
            .orig_dst
            .connect(proxy.outbound(), "127.0.96.51:6379".parse().unwrap())
            .await
            .unwrap();
        stream.write_all(b"ping").await.unwrap();
        let mut pong = [0u8; 4];
        stream.read_exact(&mut pong).await.unwrap();
        assert_eq!(&pong, b"ping");
    }
    let (_, clusters) = admin_get(proxy.admin(), "/clusters").await;
    assert!(
        clusters.contains(&format!("cache::{dead}::health_flags::/failed_outlier_check")),
        "{clusters}"
    );

    // Quiet for longer than the idle timeout: the proxy closes the connection.
    let mut stream = proxy
        .orig_dst
        .connect(proxy.outbound(), "127.0.96.51:6379".parse().unwrap())
        .await
        .unwrap();
    stream.write_all(b"hi").await.unwrap();
    let mut buf = [0u8; 2];
    stream.read_exact(&mut buf).await.unwrap();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut rest)).await;
    assert!(
        matches!(closed, Ok(Ok(0))),
        "the idle connection stayed open: {closed:?}"
    );
}

/// A stalled upstream is cut by the route's stream idle timeout (504, flag SI), and a client connection
/// with no request for the idle timeout is closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_idle_and_connection_idle_timeouts() {
    let server = HttpServer::start("slow").await;
    server.set_fault(Fault::Hang);
    let proxy = TestProxy::start(&format!(
        "idle_timeout: 400ms
outbound: {{ services: [{{ address: 0.0.0.0:8080, route: web }}] }}
clusters: [{{ name: web, endpoints: [\"{}\"] }}]
routes:
  - name: web
    virtual_hosts:
      - name: web
        routes: [{{ match: {{ prefix: / }}, cluster: web, timeout: 0s, idle_timeout: 200ms }}]",
        server.addr
    ))
    .await;
    let dst = "127.0.96.52:8080".parse().unwrap();
    let http = client(proxy.orig_dst.connector(proxy.outbound(), dst), false);
    let response = http
        .request(Request::get("http://web:8080/").body(empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
    drain_body(response.into_body()).await.unwrap();
    assert_eq!(
        metric(
            &proxy.metrics().await,
            "istio_requests_total",
            &[("response_code", "504"), ("response_flags", "SI")]
        ),
        1.0
    );

    // A raw HTTP/1 connection that sends nothing more after one request is closed by the proxy.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    server.set_fault(Fault::None);
    let mut stream = proxy.orig_dst.connect(proxy.outbound(), dst).await.unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nhost: web\r\ncontent-length: 0\r\n\r\n")
        .await
        .unwrap();
    let mut seen = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut seen)).await;
    assert!(
        matches!(read, Ok(Ok(_))),
        "the idle client connection stayed open: {read:?}"
    );
    assert!(
        seen.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&seen)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_requests_per_connection_retires_upstream_connections_after_their_share() {
    let servers = servers(1).await;
    let mesh = Mesh::start(&ports(&servers), &seed_policies("10s", "30s")).await;
    assert_eq!(
        mesh.cluster_config().await["max_requests_per_connection"],
        10,
        "the seed's maxRequestsPerConnection reaches the proxy"
    );
    for _ in 0..40 {
        assert_eq!(mesh.get("/").await, StatusCode::OK);
    }
    assert_eq!(servers[0].request_count(), 40);
    // Ten requests each: four connections (a connection is back in the pool before its response has
    // reached the client); without the limit, one.
    assert_eq!(
        servers[0].connections(),
        4,
        "40 sequential requests, 10 per connection"
    );
}

/// The next line of a tap session, or a failure after a while.
async fn next_line(tap: &mut tokio::sync::mpsc::UnboundedReceiver<serde_json::Value>) -> serde_json::Value {
    tokio::time::timeout(Duration::from_secs(10), tap.recv())
        .await
        .expect("no tap line in 10 s")
        .expect("the tap session ended early")
}

/// Admin `/tap` explains a request: the endpoint each attempt went to and how it ended, the retries,
/// the attempt that ejected an endpoint, and why a failed request was not retried further.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tap_shows_each_attempt_retries_ejections_and_why_a_request_failed() {
    let servers = servers(2).await;
    let (good, bad) = (&servers[0], &servers[1]);
    bad.set_fault(Fault::Status(503));
    let mesh = Mesh::start(&ports(&servers), &seed_policies("30s", "30s")).await;
    let admin = mesh.proxy.admin();
    let (status, body) = admin_get(admin, "/tap?status=6xx").await;
    assert_eq!((status, body.contains("invalid status")), (400, true), "{body}");
    assert_eq!(admin_get(admin, "/tap?to=x").await.0, 400);

    let cluster = CLUSTER.replace('|', "%7C");
    let mut all = weft_test_support::admin_tap(admin, &format!("?cluster={cluster}&duration=60s")).await;
    let mut other = weft_test_support::admin_tap(admin, "?cluster=elsewhere&duration=1s").await;
    const N: usize = 20;
    for _ in 0..N {
        assert_eq!(mesh.get("/").await, StatusCode::OK);
    }
    let mut lines = Vec::new();
    for _ in 0..N {
        lines.push(next_line(&mut all).await);
    }
    for line in &lines {
        assert_eq!(line["upstream_cluster"], CLUSTER, "{line}");
        assert_eq!(
            (line["direction"].as_str(), line["method"].as_str()),
            (Some("outbound"), Some("GET"))
        );
        assert_eq!(line["response_code"], 200);
        assert!(
            !line["request_id"].as_str().unwrap_or_default().is_empty(),
            "{line}"
        );
        assert_eq!(
            line["authorization"],
            serde_json::Value::Null,
            "outbound authorizes nothing"
        );
        let attempts = line["attempts"].as_array().unwrap();
        let last = attempts.last().unwrap();
        assert_eq!(
            (
                last["endpoint"].as_str(),
                last["outcome"].as_str(),
                &last["retried"]
            ),
            (
                Some(good.addr.to_string().as_str()),
                Some("200"),
                &serde_json::Value::Bool(false)
            ),
            "{line}"
        );
        for earlier in &attempts[..attempts.len() - 1] {
            assert_eq!(earlier["endpoint"], bad.addr.to_string(), "{line}");
            assert_eq!(
                (earlier["outcome"].as_str(), &earlier["retried"]),
                (Some("503"), &serde_json::Value::Bool(true))
            );
        }
        assert_eq!(line["upstream_host"], good.addr.to_string());
    }
    let ejections: Vec<_> = lines
        .iter()
        .flat_map(|l| l["attempts"].as_array().unwrap().clone())
        .filter(|a| !a["ejected"].is_null())
        .collect();
    assert_eq!(ejections.len(), 1, "{ejections:?}");
    assert_eq!(ejections[0]["ejected"], "consecutive_5xx");
    assert_eq!(ejections[0]["endpoint"], bad.addr.to_string());
    let failed_attempts: usize = lines
        .iter()
        .map(|l| l["attempts"].as_array().unwrap().len() - 1)
        .sum();
    assert_eq!(
        failed_attempts,
        bad.request_count(),
        "every 503 the bad endpoint gave is shown"
    );

    // With the other endpoint failing too, a request fails: every attempt shown, and why it stopped.
    let mut failures = weft_test_support::admin_tap(admin, "?status=5xx&flagged&duration=2s").await;
    good.set_fault(Fault::Status(503));
    assert_eq!(mesh.get("/").await, StatusCode::SERVICE_UNAVAILABLE);
    let failed = next_line(&mut failures).await;
    assert_eq!(
        (
            failed["response_code"].as_u64(),
            failed["response_flags"].as_str()
        ),
        (Some(503), Some("URX")),
        "{failed}"
    );
    assert!(
        failed["retry_stopped"].as_str().unwrap().contains("retry limit"),
        "{failed}"
    );
    let attempts = failed["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 4, "the first try and 3 retries: {failed}");
    assert!(
        attempts
            .iter()
            .all(|a| a["outcome"] == "503" && a["endpoint"] == good.addr.to_string())
    );
    assert_eq!(
        next_line(&mut all).await["response_code"],
        503,
        "the cluster's session saw it too"
    );
    // Sessions end with their duration: a summary line, then the end of the stream.
    let end = next_line(&mut failures).await;
    assert_eq!(end, serde_json::json!({ "tap_ended": "duration", "dropped": 0 }));
    assert!(failures.recv().await.is_none());
    let end = next_line(&mut other).await;
    assert_eq!(
        end["tap_ended"], "duration",
        "a session whose filter matched nothing: {end}"
    );
}
