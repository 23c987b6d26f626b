//! The proxy as an operator sees it: the admin port, readiness, configuration swaps, and shutdown.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use http::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use weft_test_support::http::{HttpServer, client, drain_body, empty};
use weft_test_support::tcp::TcpServer;
use weft_test_support::{TestProxy, admin_get, admin_post, assert_eventually};

fn get(path: &str) -> http::Request<weft_test_support::http::TestBody> {
    http::Request::get(format!("http://app{path}"))
        .body(empty())
        .unwrap()
}

#[tokio::test]
async fn admin_endpoints() {
    let app = HttpServer::start("app").await;
    let proxy = TestProxy::start(&format!(
        "node: {{ workload: ratings-v1, namespace: shop }}\nclusters: [{{ name: ratings, endpoints: [{}] }}]\noutbound: {{ services: [{{ address: 127.0.96.101:8080, cluster: ratings, protocol: http }}] }}",
        app.addr
    ))
    .await;
    let admin = proxy.admin();

    assert_eq!(admin_get(admin, "/ready").await, (200, "ready\n".into()));
    assert_eq!(admin_get(admin, "/live").await, (200, "live\n".into()));
    assert_eq!(
        admin_get(proxy.running.readiness_address(), "/healthz/ready").await,
        (200, "ready\n".into())
    );
    let help = admin_get(admin, "/help").await.1;
    assert!(help.contains("/config_dump") && help.contains("/mesh"), "{help}");
    assert_eq!(admin_get(admin, "/nope").await.0, 404);

    let (status, dump) = admin_get(admin, "/mesh").await;
    assert_eq!(status, 200);
    let dump: serde_json::Value = serde_json::from_str(&dump).unwrap();
    assert_eq!(dump["bootstrap"]["node"]["workload"], "ratings-v1");
    assert_eq!(dump["mesh"]["clusters"][0]["name"], "ratings");
    assert_eq!(
        dump["mesh"]["clusters"][0]["endpoints"][0]["address"],
        app.addr.to_string()
    );
    assert_eq!(dump["mesh"]["clusters"][0]["endpoints"][0]["weight"], 1);
    assert_eq!(
        dump["mesh"]["outbound"]["services"]["127.0.96.101:8080"]["cluster"],
        "ratings"
    );
    assert_eq!(
        dump["mesh"]["outbound"]["services"]["127.0.96.101:8080"]["protocol"],
        "http"
    );

    let (status, metrics) = admin_get(admin, "/metrics").await;
    assert_eq!(status, 200);
    assert!(
        metrics.contains("# TYPE weft_downstream_connections_active gauge"),
        "{metrics}"
    );
    assert_eq!(admin_get(admin, "/stats/prometheus").await.0, 200);

    assert_eq!(admin_get(admin, "/logging").await, (200, "info\n".into()));
    assert_eq!(
        admin_post(admin, "/logging?level=weft_http%3Ddebug%2Cinfo").await,
        (200, "weft_http=debug,info\n".into())
    );
    assert_eq!(admin_get(admin, "/logging").await.1, "weft_http=debug,info\n");
    let (status, body) = admin_post(admin, "/logging?level=weft_http%3Dloud").await;
    assert_eq!(status, 400);
    assert!(body.contains("invalid log filter"), "{body}");
    assert_eq!(
        admin_get(admin, "/logging").await.1,
        "weft_http=debug,info\n",
        "a bad filter keeps the last good one"
    );
    // Envoy's forms: one logger by Envoy's name or the module's, several with `paths`, Envoy's levels.
    assert_eq!(
        admin_post(admin, "/logging?router=trace").await,
        (200, "info,weft_http=trace\n".into())
    );
    assert_eq!(
        admin_post(admin, "/logging?paths=config:warning,weft_balance:critical").await,
        (
            200,
            "info,weft_http=trace,weft_xds=warn,weft_balance=error\n".into()
        )
    );
    let (status, body) = admin_post(admin, "/logging?nonsense=debug").await;
    assert_eq!((status, body.as_str()), (400, "unknown logger \"nonsense\"\n"));
    assert_eq!(
        admin_post(admin, "/logging?level=info").await,
        (200, "info\n".into())
    );

    // Mutations are POST only.
    assert_eq!(admin_get(admin, "/quitquitquit").await.0, 405);
    assert_eq!(
        admin_get(admin, "/ready").await.0,
        200,
        "a refused GET changed nothing"
    );
}

#[tokio::test]
async fn quitquitquit_stops_the_proxy() {
    let proxy = TestProxy::start("").await;
    assert_eq!(
        admin_post(proxy.admin(), "/quitquitquit").await,
        (200, "OK\n".into())
    );
    tokio::time::timeout(Duration::from_secs(10), proxy.running.wait())
        .await
        .expect("the proxy stops");
}

async fn drain_finishes_in_flight_request(h2: bool) {
    let app = HttpServer::start("app").await;
    let proxy = TestProxy::start("drain_timeout: 10s").await;
    let client = client(proxy.orig_dst.connector(proxy.outbound(), app.addr), h2);
    let in_flight = tokio::spawn({
        let client = client.clone();
        async move {
            let response = client.request(get("/delay/1000")).await.unwrap();
            let status = response.status();
            let body = drain_body(response.into_body()).await.unwrap();
            (status, body)
        }
    });
    assert_eventually!(app.request_count() == 1, "the slow request did not reach the app");

    let admin = proxy.admin();
    let outbound = proxy.outbound();
    let orig_dst = proxy.orig_dst.clone();
    let running = proxy.running;
    running.shutdown();

    // Draining: not ready, and new connections are refused, while the admin port still answers.
    assert_eventually!(
        admin_get(admin, "/ready").await == (503, "not ready: draining\n".into()),
        "not draining"
    );
    let (_, info) = admin_get(admin, "/server_info").await;
    assert!(info.contains("\"state\": \"DRAINING\""), "{info}");
    assert_eventually!(
        orig_dst.connect(outbound, app.addr).await.is_err(),
        "still accepting while draining"
    );

    let (status, body) = in_flight.await.unwrap();
    assert_eq!(status, StatusCode::OK, "the in-flight request finished");
    assert_eq!(body, 2, "its body arrived whole");
    tokio::time::timeout(Duration::from_secs(10), running.wait())
        .await
        .expect("the proxy stops after the drain");
}

#[tokio::test]
async fn drain_finishes_in_flight_request_http1() {
    drain_finishes_in_flight_request(false).await
}

#[tokio::test]
async fn drain_finishes_in_flight_request_http2() {
    drain_finishes_in_flight_request(true).await
}

#[tokio::test]
async fn drain_timeout_closes_what_is_left() {
    let server = TcpServer::echo().await;
    let proxy = TestProxy::start(&format!(
        "drain_timeout: 300ms\noutbound: {{ services: [{{ address: 127.0.96.7:7000, cluster: echo, protocol: tcp }}] }}\nclusters: [{{ name: echo, endpoints: [{}] }}]",
        server.addr
    ))
    .await;
    let mut idle = proxy
        .orig_dst
        .connect(proxy.outbound(), "127.0.96.7:7000".parse().unwrap())
        .await
        .unwrap();
    idle.write_all(b"x").await.unwrap();
    let mut one = [0u8; 1];
    idle.read_exact(&mut one).await.unwrap();

    proxy.running.shutdown();
    tokio::time::timeout(Duration::from_secs(10), proxy.running.wait())
        .await
        .expect("the drain timeout ends the wait");
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), idle.read_to_end(&mut rest))
        .await
        .expect("connection closed");
    assert!(
        closed.is_err() || rest.is_empty(),
        "the idle connection was closed by the proxy"
    );
}

#[tokio::test]
async fn config_update_applies_to_the_next_request() {
    let old = HttpServer::start("old").await;
    let new = HttpServer::start("new").await;
    let config = |endpoint: std::net::SocketAddr| {
        format!(
            "outbound: {{ services: [{{ address: 127.0.96.3:80, cluster: web }}] }}\nclusters: [{{ name: web, endpoints: [{endpoint}] }}]"
        )
    };
    let proxy = TestProxy::start(&config(old.addr)).await;
    let service = "127.0.96.3:80".parse().unwrap();
    let before = client(proxy.orig_dst.connector(proxy.outbound(), service), false);
    let served_by =
        |r: &http::Response<hyper::body::Incoming>| r.headers()["x-served-by"].to_str().unwrap().to_owned();
    let response = before.request(get("/")).await.unwrap();
    assert_eq!(served_by(&response), "old");
    drain_body(response.into_body()).await.unwrap();

    // A request in flight on the old configuration when it changes.
    let in_flight = tokio::spawn({
        let before = before.clone();
        async move {
            let response = before.request(get("/delay/300")).await.unwrap();
            let who = response.headers()["x-served-by"].to_str().unwrap().to_owned();
            drain_body(response.into_body()).await.unwrap();
            who
        }
    });
    assert_eventually!(old.request_count() == 2, "the slow request did not start");

    let (_, mesh) = weft_model::parse(&config(new.addr)).unwrap();
    proxy.running.update(mesh);

    let after = client(proxy.orig_dst.connector(proxy.outbound(), service), false);
    let response = after.request(get("/")).await.unwrap();
    assert_eq!(served_by(&response), "new", "new connections see the new config");
    drain_body(response.into_body()).await.unwrap();
    assert_eq!(
        in_flight.await.unwrap(),
        "old",
        "the in-flight request finished where it started"
    );
    let response = before.request(get("/")).await.unwrap();
    assert_eq!(
        served_by(&response),
        "new",
        "the next request on an open connection sees it too"
    );
    drain_body(response.into_body()).await.unwrap();
    assert_eq!(
        weft_test_support::metric(
            &proxy.metrics().await,
            "istio_requests_total",
            &[("response_code", "200")]
        ),
        4.0,
        "nothing failed"
    );
    let (_, dump) = admin_get(proxy.admin(), "/mesh").await;
    assert!(
        dump.contains(&new.addr.to_string()),
        "/mesh shows the active config"
    );
}

#[tokio::test]
async fn a_connection_to_the_proxy_itself_is_refused_not_looped() {
    let proxy = TestProxy::start("").await;
    let mut stream = proxy
        .orig_dst
        .connect(proxy.outbound(), proxy.outbound())
        .await
        .unwrap();
    let _ = stream.write_all(b"GET / HTTP/1.1\r\nhost: loop\r\n\r\n").await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut out))
        .await
        .expect("closed promptly");
    assert!(
        out.is_empty(),
        "no answer for a loop: {:?}",
        String::from_utf8_lossy(&out)
    );
    let metrics = proxy.metrics().await;
    assert_eq!(
        weft_test_support::metric(&metrics, "weft_protocol_detections_total", &[]),
        0.0,
        "never forwarded: {metrics}"
    );
}
