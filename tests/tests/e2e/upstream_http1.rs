//! The proxy's HTTP/1 connections to an endpoint, as an app server sees them: one kept-alive
//! connection carries sequential requests, an idle one is closed after the cluster's idle timeout even
//! when no request comes, and one the app closed while it was idle is replaced without the client
//! seeing an error.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use weft_test_support::{TestProxy, assert_eventually, metric};

/// A keep-alive HTTP/1 app server written out by hand, so the test sees each connection: how many
/// were opened, and how many the proxy closed. `close_after`: the server closes a connection this long
/// after each response (as an app with a short keep-alive does), without saying so in the response.
struct App {
    addr: SocketAddr,
    opened: Arc<AtomicUsize>,
    closed_by_proxy: Arc<AtomicUsize>,
}

impl App {
    async fn start(close_after: Option<Duration>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let opened = Arc::new(AtomicUsize::new(0));
        let closed_by_proxy = Arc::new(AtomicUsize::new(0));
        let (count, closed) = (opened.clone(), closed_by_proxy.clone());
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve(stream, close_after, closed.clone()));
            }
        });
        Self {
            addr,
            opened,
            closed_by_proxy,
        }
    }

    fn opened(&self) -> usize {
        self.opened.load(Ordering::SeqCst)
    }

    fn closed_by_proxy(&self) -> usize {
        self.closed_by_proxy.load(Ordering::SeqCst)
    }
}

async fn serve(mut stream: TcpStream, close_after: Option<Duration>, closed: Arc<AtomicUsize>) {
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        while let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
            seen.drain(..end + 4);
            let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello";
            if stream.write_all(answer).await.is_err() {
                return;
            }
            if let Some(after) = close_after {
                tokio::time::sleep(after).await;
                return;
            }
        }
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => {
                closed.fetch_add(1, Ordering::SeqCst);
                return;
            }
            Ok(n) => seen.extend_from_slice(&buf[..n]),
        }
    }
}

fn proxy_yaml(app: &App) -> String {
    format!(
        "outbound: {{ services: [{{ address: 0.0.0.0:8080, cluster: web }}] }}
clusters: [{{ name: web, idle_timeout: 500ms, endpoints: [\"{}\"] }}]",
        app.addr
    )
}

/// One request on a new client connection through the proxy; the response's status line and body.
async fn get(proxy: &TestProxy) -> String {
    let dst: SocketAddr = "127.0.96.70:8080".parse().unwrap();
    let mut stream = proxy.orig_dst.connect(proxy.outbound(), dst).await.unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nhost: web\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut response))
        .await
        .expect("no response within 10 s")
        .unwrap();
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text.lines().next().unwrap_or_default().to_owned();
    let body = text.rsplit("\r\n\r\n").next().unwrap_or_default();
    format!("{status} {body}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequential_requests_share_one_connection_which_closes_after_the_idle_timeout() {
    let app = App::start(None).await;
    let proxy = TestProxy::start(&proxy_yaml(&app)).await;
    for _ in 0..5 {
        assert_eq!(get(&proxy).await, "HTTP/1.1 200 OK hello");
    }
    assert_eq!(
        app.opened(),
        1,
        "five sequential requests, one upstream connection"
    );
    assert_eq!(app.closed_by_proxy(), 0);

    // No request comes: the proxy closes its idle connection after the cluster's 500 ms.
    let quiet = std::time::Instant::now();
    assert_eventually!(
        app.closed_by_proxy() == 1,
        "the idle upstream connection stayed open"
    );
    assert!(
        quiet.elapsed() >= Duration::from_millis(400),
        "closed after {:?}, before its idle timeout",
        quiet.elapsed()
    );
    assert_eq!(get(&proxy).await, "HTTP/1.1 200 OK hello");
    assert_eq!(app.opened(), 2, "the next request opens a new connection");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_the_app_closed_while_idle_is_replaced_without_an_error() {
    let app = App::start(Some(Duration::from_millis(20))).await;
    let proxy = TestProxy::start(&proxy_yaml(&app)).await;
    for round in 0..4 {
        assert_eq!(get(&proxy).await, "HTTP/1.1 200 OK hello", "round {round}");
        // The app has closed the connection the last response came on.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(app.opened(), 4, "each request needed a new connection");
    let metrics = proxy.metrics().await;
    assert_eq!(
        metric(&metrics, "istio_requests_total", &[("response_code", "200")]),
        4.0,
        "{metrics}"
    );
}
