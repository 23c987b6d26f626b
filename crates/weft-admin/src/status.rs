//! The status port (15020 in a pod, Istio's): reached from outside the pod by the kubelet and by
//! Prometheus. It answers readiness, carries out the app's own probes against the app (the injector
//! rewrote them to `/app-health/<container>/<livez|readyz|startupz>` here, so they keep working when
//! the app's ports take only mutual TLS), and serves the proxy's metrics merged with the app's.
//! Nothing here changes the proxy's state: that stays on the loopback admin port.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Empty, Full, combinators::UnsyncBoxBody};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use prost::Message;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use weft_model::status::{AppMetrics, AppProbe, ProbeAction, StatusSettings};
use weft_telemetry::Metrics;

use crate::Readiness;
use crate::server::text;

/// How long the app gets to answer a scrape of its metrics.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(5);
/// What the kubelet sends; some apps answer probes by it.
const PROBE_USER_AGENT: &str = "kube-probe/weft";

type StatusResponse = Response<UnsyncBoxBody<Bytes, Infallible>>;

/// What the status port answers from.
pub struct Status {
    pub readiness: Readiness,
    pub metrics: Arc<Metrics>,
    pub settings: StatusSettings,
}

impl std::fmt::Debug for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Status")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

pub async fn serve_status(listener: TcpListener, status: Arc<Status>, stop: CancellationToken) {
    crate::server::serve(listener, stop, move |req: Request<Incoming>| {
        let status = status.clone();
        async move { answer(&status, req).await }
    })
    .await
}

async fn answer(status: &Status, req: Request<Incoming>) -> StatusResponse {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "use GET\n".to_owned());
    }
    let path = req.uri().path();
    match path {
        "/healthz/ready" => match status.readiness.check() {
            Ok(()) => text(StatusCode::OK, "ready\n".to_owned()),
            Err(reason) => text(StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {reason}\n")),
        },
        "/stats/prometheus" => {
            let mut body = status.metrics.encode_prometheus();
            if let Some(app) = &status.settings.app_metrics {
                match scrape(&status.settings, app).await {
                    Ok(app_text) => merge(&mut body, &app_text),
                    Err(err) => {
                        tracing::debug!(error = %err, port = app.port, "the app's metrics could not be scraped")
                    }
                }
            }
            let mut response = text(StatusCode::OK, body);
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            response
        }
        _ => match status.settings.app_probes.get(path) {
            Some(probe) => match run_probe(&status.settings, probe).await {
                Ok(()) => text(StatusCode::OK, "ok\n".to_owned()),
                Err(why) => {
                    tracing::debug!(probe = path, %why, "app probe failed");
                    text(StatusCode::SERVICE_UNAVAILABLE, format!("probe failed: {why}\n"))
                }
            },
            None => text(StatusCode::NOT_FOUND, "not found\n".to_owned()),
        },
    }
}

/// The app's text after the proxy's: an OpenMetrics `# EOF` would end the exposition early.
fn merge(body: &mut String, app: &str) {
    if !body.ends_with('\n') && !body.is_empty() {
        body.push('\n');
    }
    for line in app.lines().filter(|l| l.trim() != "# EOF") {
        body.push_str(line);
        body.push('\n');
    }
}

/// Carries out `probe` as the kubelet would have, against the app on the pod's address.
async fn run_probe(settings: &StatusSettings, probe: &AppProbe) -> Result<(), String> {
    let work = async {
        match &probe.action {
            ProbeAction::Tcp { port } => connect(settings, *port).await.map(drop),
            ProbeAction::Http {
                port,
                path,
                host,
                headers,
            } => {
                let authority = match host {
                    Some(host) => format!("{host}:{port}"),
                    None => SocketAddr::new(settings.app_host, *port).to_string(),
                };
                let mut request = Request::get(path.as_str())
                    .header(header::HOST, authority)
                    .header(header::USER_AGENT, PROBE_USER_AGENT);
                for (name, value) in headers {
                    request = request.header(name.as_str(), value.as_str());
                }
                let request = request.body(Empty::<Bytes>::new()).map_err(|e| e.to_string())?;
                let response = http1_get(connect(settings, *port).await?, request).await?;
                match response.status().as_u16() {
                    200..=399 => Ok(()),
                    other => Err(format!("the app answered {other}")),
                }
            }
            ProbeAction::Grpc { port, service } => {
                grpc_health(connect(settings, *port).await?, service).await
            }
        }
    };
    match tokio::time::timeout(probe.timeout, work).await {
        Ok(result) => result,
        Err(_) => Err(format!("no answer within {:?}", probe.timeout)),
    }
}

async fn connect(settings: &StatusSettings, port: u16) -> Result<TcpStream, String> {
    let addr = SocketAddr::new(settings.app_host, port);
    weft_transport::connect(addr, settings.source, Duration::from_secs(10))
        .await
        .map_err(|e| e.to_string())
}

async fn http1_get(stream: TcpStream, request: Request<Empty<Bytes>>) -> Result<Response<Incoming>, String> {
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(connection);
    sender.send_request(request).await.map_err(|e| e.to_string())
}

async fn scrape(settings: &StatusSettings, app: &AppMetrics) -> Result<String, String> {
    let work = async {
        let request = Request::get(app.path.as_str())
            .header(
                header::HOST,
                SocketAddr::new(settings.app_host, app.port).to_string(),
            )
            .header(header::ACCEPT, "text/plain; version=0.0.4")
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        let response = http1_get(connect(settings, app.port).await?, request).await?;
        if response.status() != StatusCode::OK {
            return Err(format!("the app answered {}", response.status()));
        }
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        String::from_utf8(body.to_vec()).map_err(|_| "the app's metrics are not UTF-8".to_owned())
    };
    tokio::time::timeout(SCRAPE_TIMEOUT, work)
        .await
        .map_err(|_| format!("no answer within {SCRAPE_TIMEOUT:?}"))?
}

/// `grpc.health.v1.HealthCheckRequest`.
#[derive(Clone, PartialEq, prost::Message)]
struct HealthCheckRequest {
    #[prost(string, tag = "1")]
    service: String,
}

/// `grpc.health.v1.HealthCheckResponse`; status 1 is `SERVING`.
#[derive(Clone, PartialEq, prost::Message)]
struct HealthCheckResponse {
    #[prost(int32, tag = "1")]
    status: i32,
}

const SERVING: i32 = 1;

/// `grpc.health.v1.Health/Check` over HTTP/2 without TLS, as the kubelet's gRPC probe does.
async fn grpc_health(stream: TcpStream, service: &str) -> Result<(), String> {
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
    tokio::spawn(connection);
    let message = HealthCheckRequest {
        service: service.to_owned(),
    }
    .encode_to_vec();
    let mut frame = BytesMut::with_capacity(5 + message.len());
    frame.put_u8(0);
    frame.put_u32(u32::try_from(message.len()).map_err(|e| e.to_string())?);
    frame.put_slice(&message);
    let request = Request::post("/grpc.health.v1.Health/Check")
        .header(header::CONTENT_TYPE, "application/grpc")
        .header(header::TE, "trailers")
        .header(header::USER_AGENT, PROBE_USER_AGENT)
        .body(Full::new(frame.freeze()))
        .map_err(|e| e.to_string())?;
    let response = sender.send_request(request).await.map_err(|e| e.to_string())?;
    let headers_status = response.headers().get("grpc-status").cloned();
    let collected = response.into_body().collect().await.map_err(|e| e.to_string())?;
    let grpc_status = collected
        .trailers()
        .and_then(|t| t.get("grpc-status").cloned())
        .or(headers_status);
    match grpc_status.as_ref().map(|s| s.as_bytes()) {
        Some(b"0") => {}
        Some(other) => return Err(format!("grpc-status {}", String::from_utf8_lossy(other))),
        None => return Err("no grpc-status in the answer".into()),
    }
    let mut body = collected.to_bytes();
    if body.len() < 5 {
        return Err("no HealthCheckResponse in the answer".into());
    }
    body.advance(5);
    let answer = HealthCheckResponse::decode(body).map_err(|e| e.to_string())?;
    match answer.status {
        SERVING => Ok(()),
        other => Err(format!("the app's health is {other}, not SERVING")),
    }
}
