//! Whole proxies in-process, and reading what they say about themselves.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use weft_app::{App, Running};
use weft_model::file::ProxyFile;
use weft_telemetry::LogControl;

use crate::MockOrigDst;

/// A proxy running in the test's runtime, with a [`MockOrigDst`] binder.
#[derive(Debug)]
pub struct TestProxy {
    pub running: Running,
    pub orig_dst: Arc<MockOrigDst>,
}

impl TestProxy {
    /// Starts a proxy from YAML. Addresses the YAML leaves out are ephemeral loopback ports, so tests never
    /// collide with each other or with a real proxy.
    pub async fn start(yaml: &str) -> Self {
        let mut file: ProxyFile = if yaml.trim().is_empty() {
            ProxyFile::default()
        } else {
            serde_yaml_ng::from_str(yaml).expect("test config parses")
        };
        let ephemeral: SocketAddr = "127.0.0.1:0".parse().expect("literal");
        for slot in [
            &mut file.admin.address,
            &mut file.readiness.address,
            &mut file.outbound.address,
            &mut file.inbound.address,
        ] {
            slot.get_or_insert(ephemeral);
        }
        let (bootstrap, mesh) = file.validate().expect("test config is valid");
        let orig_dst = MockOrigDst::new();
        let running = App::build(bootstrap, mesh, orig_dst.clone(), LogControl::detached("info"))
            .await
            .expect("proxy starts");
        Self { running, orig_dst }
    }

    pub fn outbound(&self) -> SocketAddr {
        self.running.outbound_address().expect("outbound listener")
    }

    pub fn inbound(&self) -> SocketAddr {
        self.running.inbound_address().expect("inbound listener")
    }

    pub fn listener(&self, name: &str) -> SocketAddr {
        self.running.listener_address(name).expect("explicit listener")
    }

    pub fn admin(&self) -> SocketAddr {
        self.running.admin_address()
    }

    /// The proxy's Prometheus text.
    pub async fn metrics(&self) -> String {
        admin_get(self.admin(), "/metrics").await.1
    }

    /// Drains and waits until stopped.
    pub async fn stop(self) {
        self.running.shutdown();
        self.running.wait().await;
    }
}

pub async fn admin_get(addr: SocketAddr, path: &str) -> (u16, String) {
    admin_request(addr, http::Method::GET, path).await
}

pub async fn admin_post(addr: SocketAddr, path: &str) -> (u16, String) {
    admin_request(addr, http::Method::POST, path).await
}

/// Sends one request on a new connection; the sender is returned with the response head, so that the
/// connection lives as long as the caller reads the body.
async fn admin_send(
    addr: SocketAddr,
    method: http::Method,
    path: &str,
) -> (
    hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
    http::Response<hyper::body::Incoming>,
) {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect to admin");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("admin handshake");
    tokio::spawn(conn);
    let request = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string())
        .body(Empty::<Bytes>::new())
        .expect("request");
    let response = sender.send_request(request).await.expect("admin response");
    (sender, response)
}

async fn admin_request(addr: SocketAddr, method: http::Method, path: &str) -> (u16, String) {
    let (_sender, response) = admin_send(addr, method, path).await;
    let status = response.status().as_u16();
    let body = response
        .into_body()
        .collect()
        .await
        .expect("admin body")
        .to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// Opens an admin `/tap{query}` session and returns once it is open; its lines arrive on the channel,
/// which closes when the session ends.
pub async fn admin_tap(
    addr: SocketAddr,
    query: &str,
) -> tokio::sync::mpsc::UnboundedReceiver<serde_json::Value> {
    let (sender, response) = admin_send(addr, http::Method::GET, &format!("/tap{query}")).await;
    assert_eq!(response.status(), 200, "the tap session did not open");
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let _sender = sender;
        let mut body = response.into_body();
        let mut pending = Vec::new();
        while let Some(Ok(frame)) = body.frame().await {
            let Ok(data) = frame.into_data() else { continue };
            pending.extend_from_slice(&data);
            while let Some(end) = pending.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = pending.drain(..=end).collect();
                let value = serde_json::from_slice(&line).expect("a tap line is JSON");
                if tx.send(value).is_err() {
                    return;
                }
            }
        }
    });
    rx
}

/// Sum of the samples of metric `name` (exact series name, e.g. `istio_requests_total`) whose labels
/// include every `key="value"` pair given.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (series_name, rest) = series.split_once('{').unwrap_or((series, ""));
            if series_name != name {
                return None;
            }
            let all = labels.iter().all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")));
            all.then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum()
}
