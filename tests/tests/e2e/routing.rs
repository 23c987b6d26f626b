//! HTTP routing through a whole proxy: virtual hosts, path and header matches, weighted clusters, and
//! the answers for requests no route takes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;

use http::{Request, StatusCode};
use weft_test_support::TestProxy;
use weft_test_support::http::{HttpServer, TestBody, client, drain_body, empty};

const SERVICE: &str = "127.0.96.40:80";

async fn proxy(v1: &HttpServer, v2: &HttpServer) -> TestProxy {
    TestProxy::start(&format!(
        r#"
outbound:
  services: [{{ address: "{SERVICE}", route: orders }}]
clusters:
  - {{ name: orders-v1, endpoints: ["{}"] }}
  - {{ name: orders-v2, endpoints: ["{}"] }}
routes:
  - name: orders
    virtual_hosts:
      - name: orders
        domains: [orders, "orders.shop.svc.cluster.local"]
        routes:
          - match: {{ headers: [{{ name: x-canary, exact: "true" }}] }}
            cluster: orders-v2
          - match: {{ prefix: /delay }}
            cluster: orders-v1
            timeout: 200ms
          - match: {{ prefix: / }}
            clusters: [{{ name: orders-v1, weight: 90 }}, {{ name: orders-v2, weight: 10 }}]
"#,
        v1.addr, v2.addr
    ))
    .await
}

fn request(host: &str, path: &str, canary: bool) -> Request<TestBody> {
    let mut builder = Request::get(format!("http://{host}{path}"));
    if canary {
        builder = builder.header("x-canary", "true");
    }
    builder.body(empty()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_split_and_header_match() {
    let v1 = HttpServer::start("v1").await;
    let v2 = HttpServer::start("v2").await;
    let proxy = proxy(&v1, &v2).await;
    let dst: SocketAddr = SERVICE.parse().unwrap();
    let client = client(proxy.orig_dst.connector(proxy.outbound(), dst), false);

    const N: usize = 1000;
    for _ in 0..N {
        let response = client.request(request("orders", "/items", false)).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        drain_body(response.into_body()).await.unwrap();
    }
    // 90/10 of 1000: the standard deviation is 9.5, so 60..140 is more than 4 sigma either side.
    let to_v2 = v2.request_count();
    assert!((60..=140).contains(&to_v2), "v2 got {to_v2} of {N}");
    assert_eq!(v1.request_count() + to_v2, N);

    // The header sends everything to v2, whatever the weights say.
    let before = v2.request_count();
    for _ in 0..50 {
        let response = client
            .request(request("orders.shop.svc.cluster.local:80", "/items", true))
            .await
            .unwrap();
        assert_eq!(response.headers()["x-served-by"], "v2");
        drain_body(response.into_body()).await.unwrap();
    }
    assert_eq!(v2.request_count() - before, 50);
}

#[tokio::test]
async fn unmatched_hosts_get_404_nr() {
    let v1 = HttpServer::start("v1").await;
    let v2 = HttpServer::start("v2").await;
    let proxy = proxy(&v1, &v2).await;
    let client = client(
        proxy
            .orig_dst
            .connector(proxy.outbound(), SERVICE.parse().unwrap()),
        false,
    );
    let response = client.request(request("payments", "/", false)).await.unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    drain_body(response.into_body()).await.unwrap();
    let metrics = proxy.metrics().await;
    assert_eq!(
        weft_test_support::metric(
            &metrics,
            "istio_requests_total",
            &[("response_code", "404"), ("response_flags", "NR")]
        ),
        1.0,
        "{metrics}"
    );
    assert_eq!(v1.request_count() + v2.request_count(), 0);
}

#[tokio::test]
async fn route_timeout_gives_504_ut() {
    let v1 = HttpServer::start("v1").await;
    let v2 = HttpServer::start("v2").await;
    let proxy = proxy(&v1, &v2).await;
    let client = client(
        proxy
            .orig_dst
            .connector(proxy.outbound(), SERVICE.parse().unwrap()),
        true,
    );
    // `/delay/...` routes have a 200 ms timeout; the server answers after 2 s.
    let response = client
        .request(request("orders", "/delay/2000", false))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
    let text = http_body_util::BodyExt::collect(response.into_body())
        .await
        .unwrap()
        .to_bytes();
    assert_eq!(text, "upstream request timeout");
    // A response inside the limit is unaffected.
    let response = client
        .request(request("orders", "/delay/20", false))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    drain_body(response.into_body()).await.unwrap();
    let metrics = proxy.metrics().await;
    assert_eq!(
        weft_test_support::metric(
            &metrics,
            "istio_requests_total",
            &[("response_code", "504"), ("response_flags", "UT")]
        ),
        1.0,
        "{metrics}"
    );
}
