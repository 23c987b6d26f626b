//! Trust: what a client sends can never make the proxy lie about who is calling or what is asked. Each
//! case is a raw-socket regression test for a defect an attack suite found: bytes that detection did not
//! recognise carried forged identity headers to the app as opaque TCP, `Upgrade: h2c` let unparsed
//! HTTP/2 through, two Hosts (or an absolute-form target) gave routing and the app different
//! authorities, and a client's broken body ejected a healthy endpoint.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use weft_test_support::http::HttpServer;
use weft_test_support::{TestProxy, admin_get, metric};

const FORGED: &str = "By=x;URI=spiffe://cluster.local/ns/kube-system/sa/admin";

/// A proxy whose inbound (PERMISSIVE, ports detected) forwards to `app`, and whose outbound passes
/// anything through (a detect port).
async fn proxy() -> TestProxy {
    TestProxy::start("detect_timeout: 100ms\ninbound: { peer_authentication: permissive }").await
}

/// Sends `bytes` (in pieces, with `pause` between them) on a connection redirected to `dst`, and
/// returns what came back before the proxy or the app closed it.
async fn exchange(
    proxy: &TestProxy,
    listener: SocketAddr,
    dst: SocketAddr,
    pieces: &[&[u8]],
    pause: Duration,
) -> String {
    let mut stream: TcpStream = proxy.orig_dst.connect(listener, dst).await.unwrap();
    for (i, piece) in pieces.iter().enumerate() {
        if i > 0 {
            tokio::time::sleep(pause).await;
        }
        if stream.write_all(piece).await.is_err() {
            break;
        }
    }
    let mut response = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut response)).await;
    String::from_utf8_lossy(&response).into_owned()
}

fn request(prefix: &str, target: &str) -> String {
    format!(
        "{prefix}GET {target} HTTP/1.1\r\nHost: app\r\nX-Forwarded-Client-Cert: {FORGED}\r\nConnection: close\r\n\r\n"
    )
}

/// No request the app saw carries the forged identity.
fn assert_not_forged(app: &HttpServer, case: &str) {
    for seen in app.requests() {
        let xfcc: Vec<_> = seen.headers.get_all("x-forwarded-client-cert").iter().collect();
        assert!(
            xfcc.iter().all(|v| v.to_str().unwrap() != FORGED),
            "{case}: the app saw the forged identity {xfcc:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_detection_did_not_recognise_never_carry_forged_identity() {
    weft_test_support::init_tracing();
    let app = HttpServer::start("app").await;
    let proxy = proxy().await;
    let long_target = format!("/{}", "a".repeat(17 * 1024));
    let long_method = format!(
        "{} / HTTP/1.1\r\nHost: app\r\nX-Forwarded-Client-Cert: {FORGED}\r\nConnection: close\r\n\r\n",
        "X".repeat(30)
    );
    let leading_crlf = request("\r\n", "/");
    let long = request("", &long_target);
    let whole = request("", "/paused");
    let (first, rest) = whole.split_at(9);
    let cases: Vec<(&str, Vec<&[u8]>)> = vec![
        ("leading CRLF", vec![leading_crlf.as_bytes()]),
        ("a 17 KiB request target", vec![long.as_bytes()]),
        ("a 30-character method", vec![long_method.as_bytes()]),
        (
            "a pause mid-request past the detect timeout",
            vec![first.as_bytes(), rest.as_bytes()],
        ),
    ];
    for (listener, direction) in [
        (proxy.inbound(), "inbound"),
        (proxy.outbound(), "outbound passthrough"),
    ] {
        for (case, pieces) in &cases {
            let before = app.request_count();
            let response = exchange(&proxy, listener, app.addr, pieces, Duration::from_millis(300)).await;
            let case = format!("{direction}: {case}");
            assert_not_forged(&app, &case);
            // Either served as HTTP (the forged header removed) or refused as HTTP: never opaque.
            assert!(
                response.starts_with("HTTP/1.1 200") || response.starts_with("HTTP/1.1 4"),
                "{case}: {:?}",
                &response[..response.len().min(200)]
            );
            if response.starts_with("HTTP/1.1 200") {
                assert_eq!(app.request_count(), before + 1, "{case}");
            }
        }
    }
    // The requests that parse arrive, sanitised.
    assert!(app.requests().iter().any(|r| r.uri.path() == "/paused"));
    assert!(app.requests().iter().any(|r| r.uri.path() == long_target));
    // A smuggling attempt behind unrecognised bytes is parsed as HTTP, so it is refused.
    let smuggled = format!(
        "\r\nPOST / HTTP/1.1\r\nHost: app\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nX-Forwarded-Client-Cert: {FORGED}\r\n\r\n"
    );
    exchange(
        &proxy,
        proxy.inbound(),
        app.addr,
        &[smuggled.as_bytes()],
        Duration::ZERO,
    )
    .await;
    assert_not_forged(&app, "CL+TE after a leading CRLF");
    assert!(app.requests().iter().all(|r| r.uri.path() != "/smuggled"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_upgrade_is_never_offered_to_the_app() {
    let app = HttpServer::start("app").await;
    let proxy = proxy().await;
    let upgrade = "GET /h2c HTTP/1.1\r\nHost: app\r\nConnection: Upgrade, HTTP2-Settings, close\r\nUpgrade: h2c\r\n\
                   HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n";
    let response = exchange(
        &proxy,
        proxy.inbound(),
        app.addr,
        &[upgrade.as_bytes()],
        Duration::ZERO,
    )
    .await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    let seen = app.last_request();
    assert_eq!(seen.uri.path(), "/h2c");
    assert!(seen.headers.get("upgrade").is_none(), "{:?}", seen.headers);
    assert!(seen.headers.get("http2-settings").is_none(), "{:?}", seen.headers);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_request_has_one_authority() {
    let app = HttpServer::start("app").await;
    let proxy = proxy().await;
    let duplicate = "GET /dup HTTP/1.1\r\nHost: app\r\nHost: evil.example\r\nConnection: close\r\n\r\n";
    let response = exchange(
        &proxy,
        proxy.inbound(),
        app.addr,
        &[duplicate.as_bytes()],
        Duration::ZERO,
    )
    .await;
    assert!(response.starts_with("HTTP/1.1 400"), "{response}");
    assert!(
        app.requests().iter().all(|r| r.uri.path() != "/dup"),
        "the app saw two Hosts"
    );

    // Absolute form: its authority replaces Host, so the app sees what routing saw.
    let absolute = "GET http://evil.example/abs HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n";
    let response = exchange(
        &proxy,
        proxy.inbound(),
        app.addr,
        &[absolute.as_bytes()],
        Duration::ZERO,
    )
    .await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    let seen = app.last_request();
    assert_eq!(seen.uri.path(), "/abs");
    let hosts: Vec<_> = seen.headers.get_all("host").iter().collect();
    assert_eq!(hosts, ["evil.example"]);

    let bad = "GET /bad HTTP/1.1\r\nHost: a b\r\nConnection: close\r\n\r\n";
    let response = exchange(
        &proxy,
        proxy.inbound(),
        app.addr,
        &[bad.as_bytes()],
        Duration::ZERO,
    )
    .await;
    assert!(response.starts_with("HTTP/1.1 400"), "{response}");
}

/// Routing on the authority: with a route for `orders` only, an absolute-form target for another host
/// cannot reach the orders cluster under `Host: orders`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routing_and_the_app_see_the_same_authority() {
    let orders = HttpServer::start("orders").await;
    let proxy = TestProxy::start(&format!(
        "outbound: {{ services: [{{ address: 0.0.0.0:8080, route: r, protocol: http }}] }}
clusters: [{{ name: orders, endpoints: [\"{}\"] }}]
routes:
  - name: r
    virtual_hosts: [{{ name: orders, domains: [\"orders\"], routes: [{{ match: {{ prefix: / }}, cluster: orders }}] }}]",
        orders.addr
    ))
    .await;
    let dst: SocketAddr = "127.0.96.80:8080".parse().unwrap();
    let absolute = "GET http://evil.example/x HTTP/1.1\r\nHost: orders\r\nConnection: close\r\n\r\n";
    let response = exchange(
        &proxy,
        proxy.outbound(),
        dst,
        &[absolute.as_bytes()],
        Duration::ZERO,
    )
    .await;
    assert!(response.starts_with("HTTP/1.1 404"), "{response}");
    assert_eq!(orders.request_count(), 0);
    let fine = "GET /x HTTP/1.1\r\nHost: orders\r\nConnection: close\r\n\r\n";
    let response = exchange(&proxy, proxy.outbound(), dst, &[fine.as_bytes()], Duration::ZERO).await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_cannot_eject_a_healthy_endpoint() {
    let app = HttpServer::start("app").await;
    let proxy = TestProxy::start(&format!(
        "outbound: {{ services: [{{ address: 0.0.0.0:8080, cluster: app, protocol: http }}] }}
clusters:
  - name: app
    endpoints: [\"{}\"]
    outlier_detection: {{ consecutive_5xx: 3, max_ejection_percent: 100 }}",
        app.addr
    ))
    .await;
    let dst: SocketAddr = "127.0.96.81:8080".parse().unwrap();
    for _ in 0..16 {
        // The app reads the whole body before it answers (`/sink`), so the broken body fails the try
        // (an app that answered first would have its answer forwarded, as it should).
        let bad =
            "POST /sink HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n";
        let response = exchange(&proxy, proxy.outbound(), dst, &[bad.as_bytes()], Duration::ZERO).await;
        // hyper closes a connection whose request body broke, so the 400 may not get out.
        assert!(
            response.is_empty() || response.starts_with("HTTP/1.1 400"),
            "a client's broken body is the client's error: {response}"
        );
    }
    let metrics = proxy.metrics().await;
    let labels = [("response_code", "400"), ("response_flags", "DPE")];
    assert_eq!(
        metric(&metrics, "istio_requests_total", &labels),
        16.0,
        "{metrics}"
    );
    assert_eq!(
        metric(&metrics, "istio_requests_total", &[("response_code", "503")]),
        0.0,
        "{metrics}"
    );
    let (_, clusters) = admin_get(proxy.admin(), "/endpoints").await;
    let clusters: serde_json::Value = serde_json::from_str(&clusters).unwrap();
    let cluster = clusters
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "app")
        .unwrap();
    let endpoint = &cluster["endpoints"][0];
    assert_eq!(endpoint["ejected"], false, "{clusters}");
    assert_eq!(endpoint["ejections"], 0, "{clusters}");
    let ok = "GET / HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n";
    let response = exchange(&proxy, proxy.outbound(), dst, &[ok.as_bytes()], Duration::ZERO).await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
}
