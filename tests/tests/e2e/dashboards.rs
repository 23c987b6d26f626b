//! The metrics as their real consumers read them: the PromQL of Istio's Grafana dashboards
//! (`manifests/addons/dashboards` in istio/istio: mesh, service and workload dashboards) and of Kiali's
//! traffic graph (`graph/telemetry/istio` in kiali/kiali), evaluated by a real Prometheus scraping a
//! client and a server sidecar over mutual TLS. Each panel's query must return series, labelled as the
//! panel and Kiali's graph builder expect.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use http::{Request, StatusCode};
use weft_test_support::http::{Fault, drain_body, empty};
use weft_test_support::{admin_get, assert_eventually};

use crate::metadata_exchange::Pair;

/// Prometheus as a child process, killed when dropped.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    /// Scraping `targets`' `/stats/prometheus` every second; `None` when Prometheus is not installed.
    async fn start(targets: &[SocketAddr]) -> Option<Self> {
        let dir = tempfile::tempdir().unwrap();
        let targets: Vec<String> = targets.iter().map(|t| format!("\"{t}\"")).collect();
        let config = format!(
            "global: {{ scrape_interval: 1s, evaluation_interval: 1s }}\n\
             scrape_configs:\n\
             \x20 - job_name: sidecars\n\
             \x20   metrics_path: /stats/prometheus\n\
             \x20   static_configs: [{{ targets: [{}] }}]\n",
            targets.join(", ")
        );
        std::fs::write(dir.path().join("prometheus.yml"), config).unwrap();
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let child = Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.path().join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--log.level=warn")
            .stdout(Stdio::null())
            .spawn()
            .ok()?;
        let prometheus = Self {
            child,
            addr,
            _dir: dir,
        };
        assert_eventually!(
            tokio::net::TcpStream::connect(addr).await.is_ok() && admin_get(addr, "/-/ready").await.0 == 200,
            "Prometheus did not start"
        );
        // Discovery hands the targets to the scrapers about five seconds after the start.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while prometheus.query("up == 1").await.len() < targets.len() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "Prometheus is not scraping every sidecar: {:?}",
                prometheus.query("up").await
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Some(prometheus)
    }

    /// An instant query's result vector.
    async fn query(&self, promql: &str) -> Vec<serde_json::Value> {
        let encoded: String = form_urlencoded::byte_serialize(promql.as_bytes()).collect();
        let (status, body) = admin_get(self.addr, &format!("/api/v1/query?query={encoded}")).await;
        assert_eq!(status, 200, "{promql}: {body}");
        let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(answer["status"], "success", "{promql}: {body}");
        answer["data"]["result"].as_array().unwrap().clone()
    }

    /// The one series `promql` returns, as (labels, value).
    async fn single(&self, promql: &str) -> (serde_json::Value, f64) {
        let result = self.query(promql).await;
        assert_eq!(result.len(), 1, "one series from {promql}: {result:?}");
        let value = result[0]["value"][1].as_str().unwrap().parse().unwrap();
        (result[0]["metric"].clone(), value)
    }
}

/// Kiali's group-by for HTTP traffic: a series missing any of these labels is dropped from the graph.
const KIALI_GROUP_BY: &str = "source_workload_namespace,source_workload,source_canonical_service,\
source_canonical_revision,destination_service_namespace,destination_service,destination_service_name,\
destination_workload_namespace,destination_workload,destination_canonical_service,\
destination_canonical_revision,request_protocol,response_code,grpc_response_status,response_flags";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istio_dashboards_and_kialis_graph_queries_return_labelled_series() {
    if Command::new("prometheus").arg("--version").output().is_err() {
        eprintln!(
            "SKIP istio_dashboards_and_kialis_graph_queries_return_labelled_series: Prometheus is not installed (.ci/run installs Debian's prometheus)"
        );
        return;
    }
    let pair = Pair::start().await;
    let prometheus = Prometheus::start(&[pair.client.admin(), pair.server.admin()])
        .await
        .expect("prometheus runs");

    // Traffic all along, as a dashboard sees it (`irate` is the rate between the last two scrapes):
    // mostly 200s, every tenth request a 503 from the app.
    let client = pair.app_client();
    let send = move |path: &'static str| {
        let client = client.clone();
        async move {
            let response = client
                .request(
                    Request::get(format!("http://reviews:9080{path}"))
                        .body(empty())
                        .unwrap(),
                )
                .await
                .unwrap();
            let status = response.status();
            drain_body(response.into_body()).await.unwrap();
            status
        }
    };
    assert_eventually!(
        {
            // A new connection each time until the Service has reached the client sidecar.
            let response = pair
                .app_client()
                .request(Request::get("http://reviews:9080/").body(empty()).unwrap())
                .await
                .unwrap();
            response.status() == StatusCode::OK
        },
        "the Service never reached the client"
    );
    let app = pair.app.clone();
    let traffic = tokio::spawn(async move {
        for sent in 0u64.. {
            let fail = sent % 10 == 9;
            app.set_fault(if fail { Fault::Status(503) } else { Fault::None });
            let expected = if fail {
                StatusCode::SERVICE_UNAVAILABLE
            } else {
                StatusCode::OK
            };
            assert_eq!(send("/reviews/1").await, expected);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    // A few scrapes of it.
    tokio::time::sleep(Duration::from_secs(4)).await;

    // Istio mesh dashboard: global request volume, success rate, 5xx, and the HTTP workloads table.
    let (_, volume) = prometheus
        .single(r#"round(sum(rate(istio_requests_total{reporter=~"source|waypoint"}[1m])), 0.001)"#)
        .await;
    assert!(
        volume > 0.0,
        "request volume {volume}: {:?} {:?}",
        prometheus.query("up").await,
        prometheus.query("istio_requests_total").await
    );
    let (_, success) = prometheus
        .single(
            r#"sum(rate(istio_requests_total{reporter=~"source|waypoint",response_code!~"5.."}[1m])) / sum(rate(istio_requests_total{reporter=~"source|waypoint"}[1m]))"#,
        )
        .await;
    assert!(success > 0.5 && success < 1.0, "success rate {success}");
    let (_, errors) = prometheus
        .single(r#"round(sum(rate(istio_requests_total{reporter=~"source|waypoint",response_code=~"5.."}[1m])), 0.001) or vector(0)"#)
        .await;
    assert!(errors > 0.0, "5xx rate {errors}");
    let (labels, _) = prometheus
        .single(
            r#"label_join(sum(rate(istio_requests_total{reporter=~"source|waypoint"}[1m])) by (destination_workload, destination_workload_namespace, destination_service), "destination_workload_var", ".", "destination_workload", "destination_workload_namespace")"#,
        )
        .await;
    assert_eq!(
        labels["destination_workload_var"], "reviews-v2.default",
        "{labels}"
    );
    assert_eq!(labels["destination_service"], "reviews.default.svc.cluster.local");
    let (labels, p99) = prometheus
        .single(
            r#"histogram_quantile(0.99, sum(rate(istio_request_duration_milliseconds_bucket{reporter=~"source|waypoint"}[1m])) by (le, destination_workload, destination_workload_namespace))"#,
        )
        .await;
    assert!(p99.is_finite() && p99 > 0.0, "p99 {p99} for {labels}");
    let (labels, _) = prometheus.single("sum(istio_build) by (component, tag)").await;
    assert_eq!(labels["component"], "proxy", "{labels}");

    // Istio service dashboard: inbound requests by client workload, success rate by source, and
    // request sizes, from the server side's reports.
    let service = "reviews.default.svc.cluster.local";
    let (labels, _) = prometheus
        .single(&format!(
            r#"round(sum(irate(istio_requests_total{{reporter=~"destination",connection_security_policy="mutual_tls",destination_service=~"{service}"}}[5m])) by (source_workload, source_workload_namespace), 0.001)"#
        ))
        .await;
    assert_eq!(
        (
            labels["source_workload"].as_str(),
            labels["source_workload_namespace"].as_str()
        ),
        (Some("productpage-v1"), Some("default"))
    );
    let (_, rate) = prometheus
        .single(&format!(
            r#"sum(irate(istio_requests_total{{reporter=~"destination",destination_service=~"{service}",response_code!~"5.*"}}[5m])) by (source_workload) / sum(irate(istio_requests_total{{reporter=~"destination",destination_service=~"{service}"}}[5m])) by (source_workload)"#
        ))
        .await;
    assert!(rate > 0.0 && rate <= 1.0, "{rate}");
    let (_, size) = prometheus
        .single(&format!(
            r#"histogram_quantile(0.50, sum(irate(istio_response_bytes_bucket{{reporter=~"destination",destination_service=~"{service}"}}[1m])) by (source_workload, le))"#
        ))
        .await;
    assert!(size.is_finite(), "response size p50 {size}");

    // Istio workload dashboard: outbound requests of the client workload by destination service.
    let (labels, _) = prometheus
        .single(
            r#"round(sum(irate(istio_requests_total{reporter=~"source",source_workload="productpage-v1",source_workload_namespace="default"}[5m])) by (destination_service), 0.001)"#,
        )
        .await;
    assert_eq!(labels["destination_service"], service);

    // Kiali's graph: internal traffic of the namespace, grouped by every label its graph builder reads.
    let series = prometheus
        .query(&format!(
            r#"sum(rate(istio_requests_total{{reporter="source",source_workload_namespace="default"}} [60s])) by ({KIALI_GROUP_BY})"#
        ))
        .await;
    let codes: Vec<&str> = series
        .iter()
        .map(|s| s["metric"]["response_code"].as_str().unwrap())
        .collect();
    assert!(codes.contains(&"200") && codes.contains(&"503"), "{series:?}");
    for s in &series {
        let m = &s["metric"];
        for label in KIALI_GROUP_BY.split(',').filter(|l| *l != "grpc_response_status") {
            assert!(
                m[label].as_str().is_some_and(|v| !v.is_empty() && v != "unknown"),
                "Kiali needs {label}: {m}"
            );
        }
        assert_eq!(
            (
                m["source_workload"].as_str(),
                m["source_canonical_service"].as_str()
            ),
            (Some("productpage-v1"), Some("productpage"))
        );
        assert_eq!(
            (
                m["destination_workload"].as_str(),
                m["destination_service_name"].as_str()
            ),
            (Some("reviews-v2"), Some("reviews"))
        );
        assert_eq!(
            (
                m["destination_canonical_service"].as_str(),
                m["destination_canonical_revision"].as_str()
            ),
            (Some("reviews"), Some("v2"))
        );
        assert_eq!(m["request_protocol"], "http");
    }
    // Kiali's security appender: the edge is mutual TLS, as the server side saw it.
    let (labels, _) = prometheus
        .single(
            r#"sum(rate(istio_requests_total{reporter="destination",destination_service_namespace="default"}[60s])) by (source_workload_namespace,source_workload,destination_workload,connection_security_policy)"#,
        )
        .await;
    assert_eq!(labels["connection_security_policy"], "mutual_tls", "{labels}");
    // Kiali's response-time appender.
    let (_, p95) = prometheus
        .single(
            r#"histogram_quantile(0.95, sum(rate(istio_request_duration_milliseconds_bucket{reporter="source",source_workload_namespace="default",response_code!~"5.."}[60s])) by (le,source_workload_namespace,source_workload,destination_service_name,destination_workload))"#,
        )
        .await;
    assert!(p95.is_finite() && p95 > 0.0, "{p95}");
    // Nothing came from outside the mesh: Kiali's "unknown source" query is empty.
    let unknown = prometheus
        .query(r#"sum(rate(istio_requests_total{reporter="destination",source_workload="unknown",destination_workload_namespace="default"} [60s]))"#)
        .await;
    assert!(unknown.is_empty(), "{unknown:?}");
    assert!(!traffic.is_finished(), "the traffic stopped: {:?}", traffic.await);
    traffic.abort();
}

/// Prometheus's own parser (`promtool check metrics`) reads the text exposition, a cluster name with
/// a quote, a backslash and a newline included; its lint finds nothing but Istio's own metric names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_parses_the_exposition_with_escaped_label_values() {
    if Command::new("promtool").arg("--version").output().is_err() {
        eprintln!(
            "SKIP prometheus_parses_the_exposition_with_escaped_label_values: promtool is not installed (.ci/run installs Debian's prometheus)"
        );
        return;
    }
    let pair = Pair::start().await;
    let weird = weft_test_support::TestProxy::start(
        "clusters: [{ name: \"we\\\"ird\\\\name\\nx\", endpoints: [\"127.0.0.1:9\"] }]\n\
         listeners: [{ name: front, address: 127.0.0.1:0, cluster: \"we\\\"ird\\\\name\\nx\" }]",
    )
    .await;
    let response = pair
        .app_client()
        .request(Request::get("http://reviews:9080/").body(empty()).unwrap())
        .await
        .unwrap();
    drain_body(response.into_body()).await.unwrap();
    for proxy in [&pair.client, &pair.server, &weird] {
        let (_, text) = admin_get(proxy.admin(), "/stats/prometheus").await;
        let mut promtool = Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write as _;
        promtool.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
        let output = promtool.wait_with_output().unwrap();
        let findings =
            String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr);
        assert!(!findings.contains("parsing error"), "{findings}\n{text}");
        // Lint only: Istio names its durations in milliseconds, and so must we.
        for finding in findings.lines() {
            assert!(
                finding.starts_with("istio_request_duration_milliseconds use base unit"),
                "promtool: {finding}\n{text}"
            );
        }
        assert!(matches!(output.status.code(), Some(0) | Some(3)), "{findings}");
    }
    let (_, text) = admin_get(weird.admin(), "/stats/prometheus").await;
    assert!(text.contains(r#"cluster="we\"ird\\name\nx""#), "{text}");
}
