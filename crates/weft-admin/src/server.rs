//! Admin and readiness servers. Plain HTTP/1.1; the admin port binds loopback only, because it can
//! change log levels and stop the proxy.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use weft_telemetry::{LogControl, Metrics};

use crate::Readiness;

/// Makes `/config_dump` from its query string; `Err` is the reason, for a 400.
pub type ConfigDump = dyn Fn(&str) -> Result<serde_json::Value, String> + Send + Sync;

/// Makes `/server_info` from the readiness check's answer.
pub type ServerInfo = dyn Fn(&Result<(), String>) -> Result<serde_json::Value, String> + Send + Sync;

/// What the admin endpoints read and act on.
pub struct AdminState {
    pub metrics: Arc<Metrics>,
    pub readiness: Readiness,
    pub log: LogControl,
    /// Weft's own view of the configuration in use (the model, with the xDS client's state), as JSON.
    pub mesh: Box<dyn Fn() -> serde_json::Value + Send + Sync>,
    /// Envoy's `/config_dump` for the query string given, or the reason it cannot be made.
    pub config_dump: Box<ConfigDump>,
    /// Envoy's `/server_info` for the proxy's current readiness.
    pub server_info: Box<ServerInfo>,
    /// The workload certificate in use and the trusted roots, as JSON (`null` without an identity).
    pub certs: Box<dyn Fn() -> serde_json::Value + Send + Sync>,
    /// Every cluster's endpoints and their running state, as JSON (a list of clusters).
    pub clusters: Box<dyn Fn() -> serde_json::Value + Send + Sync>,
    /// Cancelled by `POST /quitquitquit`: the proxy drains and exits as on SIGTERM.
    pub shutdown: CancellationToken,
}

impl std::fmt::Debug for AdminState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminState")
            .field("readiness", &self.readiness)
            .finish_non_exhaustive()
    }
}

const HELP: &str = "\
weft admin
  GET  /ready          200 when ready to serve, else 503 with the reason
  GET  /live           200 while the process runs
  GET  /config_dump    Envoy's ConfigDump (JSON): bootstrap, clusters, listeners, routes, secrets;
                       ?include_eds, ?resource=<field>, ?mask=<paths>
  GET  /server_info    Envoy's ServerInfo (JSON): version, state (LIVE, DRAINING, INITIALIZING), uptime, node
  GET  /mesh           Weft's own view: the model in use (routes resolved, policies) and xDS state
  GET  /certs          the workload certificate and trusted roots (JSON)
  GET  /clusters       endpoints by cluster: active requests, successes, failures, ejections
                       (Envoy's text lines; ?format=json for JSON)
  GET  /metrics        Prometheus metrics (also /stats/prometheus)
  GET  /logging        the active log filter
  POST /logging?level=FILTER   set the log filter (e.g. debug, weft_http=trace,info)
  POST /logging?<logger>=LEVEL, ?paths=<logger>:LEVEL,...   one logger or several (Envoy's names: http, router, upstream, config, admin, rbac, ...)
  POST /quitquitquit   drain and exit
";

type AdminResponse = Response<Full<Bytes>>;

pub async fn serve_admin(listener: TcpListener, state: Arc<AdminState>, stop: CancellationToken) {
    serve(listener, stop, move |req| {
        let state = state.clone();
        async move { admin(&state, req) }
    })
    .await
}

/// Kubelet's readiness probe target (`/healthz/ready`, Istio's path on 15021).
pub async fn serve_readiness(listener: TcpListener, readiness: Readiness, stop: CancellationToken) {
    serve(listener, stop, move |req: Request<Incoming>| {
        let readiness = readiness.clone();
        async move {
            match (req.method(), req.uri().path()) {
                (&Method::GET, "/healthz/ready") => ready(&readiness),
                _ => text(StatusCode::NOT_FOUND, "not found\n"),
            }
        }
    })
    .await
}

fn admin(state: &AdminState, req: Request<Incoming>) -> AdminResponse {
    let path = req.uri().path();
    let method = req.method();
    match path {
        "/" | "/help" => get_only(method, || text(StatusCode::OK, HELP)),
        "/ready" => get_only(method, || ready(&state.readiness)),
        "/live" => get_only(method, || text(StatusCode::OK, "live\n")),
        "/config_dump" => get_only(method, || {
            match (state.config_dump)(req.uri().query().unwrap_or_default()) {
                Ok(dump) => {
                    let body = serde_json::to_vec_pretty(&dump).unwrap_or_default();
                    respond(StatusCode::OK, "application/json", body)
                }
                Err(reason) => text(StatusCode::BAD_REQUEST, format!("{reason}\n")),
            }
        }),
        "/server_info" => get_only(method, || match (state.server_info)(&state.readiness.check()) {
            Ok(info) => {
                let body = serde_json::to_vec_pretty(&info).unwrap_or_default();
                respond(StatusCode::OK, "application/json", body)
            }
            Err(reason) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{reason}\n")),
        }),
        "/mesh" => get_only(method, || {
            let body = serde_json::to_vec_pretty(&(state.mesh)()).unwrap_or_default();
            respond(StatusCode::OK, "application/json", body)
        }),
        "/certs" => get_only(method, || {
            let body = serde_json::to_vec_pretty(&(state.certs)()).unwrap_or_default();
            respond(StatusCode::OK, "application/json", body)
        }),
        "/clusters" => get_only(method, || {
            let clusters = (state.clusters)();
            let json = form_urlencoded::parse(req.uri().query().unwrap_or_default().as_bytes())
                .any(|(k, v)| k == "format" && v == "json");
            if json {
                let body = serde_json::to_vec_pretty(&clusters).unwrap_or_default();
                respond(StatusCode::OK, "application/json", body)
            } else {
                text(StatusCode::OK, clusters_text(&clusters))
            }
        }),
        "/metrics" | "/stats/prometheus" => get_only(method, || {
            // The format the scraper asks for (Prometheus asks for OpenMetrics first), with the
            // content type that names it.
            let openmetrics = req
                .headers()
                .get(http::header::ACCEPT)
                .and_then(|a| a.to_str().ok())
                .is_some_and(|a| a.contains("application/openmetrics-text"));
            if openmetrics {
                respond(
                    StatusCode::OK,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    state.metrics.encode(),
                )
            } else {
                respond(
                    StatusCode::OK,
                    "text/plain; version=0.0.4; charset=utf-8",
                    state.metrics.encode_prometheus(),
                )
            }
        }),
        "/logging" => match *method {
            Method::GET => text(StatusCode::OK, format!("{}\n", state.log.current())),
            Method::POST => set_log_level(state, req.uri().query()),
            _ => method_not_allowed("GET, POST"),
        },
        "/quitquitquit" => post_only(method, || {
            tracing::info!("shutdown requested through the admin port");
            state.shutdown.cancel();
            text(StatusCode::OK, "OK\n")
        }),
        _ => text(
            StatusCode::NOT_FOUND,
            "not found; GET /help lists the endpoints\n",
        ),
    }
}

/// Envoy's `/clusters` text: one `cluster::endpoint::stat::value` line per fact.
fn clusters_text(clusters: &serde_json::Value) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    for cluster in clusters.as_array().into_iter().flatten() {
        let name = cluster["name"].as_str().unwrap_or_default();
        for key in [
            "lb_policy",
            "outlier_detection",
            "active_requests",
            "pending_requests",
            "active_retries",
        ] {
            let _ = writeln!(out, "{name}::{key}::{}", plain(&cluster[key]));
        }
        for endpoint in cluster["endpoints"].as_array().into_iter().flatten() {
            let address = endpoint["address"].as_str().unwrap_or_default();
            let mut flags = String::new();
            if endpoint["healthy"] == false {
                flags.push_str("/failed_eds_health");
            }
            if endpoint["ejected"] == true {
                flags.push_str("/failed_outlier_check");
            }
            if flags.is_empty() {
                flags.push_str("healthy");
            }
            let _ = writeln!(out, "{name}::{address}::weight::{}", plain(&endpoint["weight"]));
            let _ = writeln!(
                out,
                "{name}::{address}::rq_active::{}",
                plain(&endpoint["active_requests"])
            );
            let _ = writeln!(
                out,
                "{name}::{address}::rq_success::{}",
                plain(&endpoint["successes"])
            );
            let _ = writeln!(
                out,
                "{name}::{address}::rq_error::{}",
                plain(&endpoint["failures"])
            );
            let _ = writeln!(out, "{name}::{address}::health_flags::{flags}");
            let _ = writeln!(
                out,
                "{name}::{address}::ejections::{}",
                plain(&endpoint["ejections"])
            );
            if let Some(until) = endpoint["ejected_until"].as_str() {
                let _ = writeln!(out, "{name}::{address}::ejected_until::{until}");
            }
        }
    }
    out
}

fn plain(value: &serde_json::Value) -> String {
    match value {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Envoy's `/logging`: `?level=L` sets every logger (or a whole filter such as `weft_http=debug,info`),
/// `?<logger>=L` one logger, `?paths=a:L,b:L` several. Loggers are the proxy's modules (`weft_http`,
/// ...) or Envoy's names for the same parts (`http`, `router`, `upstream`, `pool`, `connection`,
/// `config`, `admin`, `rbac`, `filter`, `main`).
fn set_log_level(state: &AdminState, query: Option<&str>) -> AdminResponse {
    let pairs: Vec<(String, String)> = form_urlencoded::parse(query.unwrap_or_default().as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    if pairs.is_empty() {
        return text(
            StatusCode::BAD_REQUEST,
            "missing ?level=LEVEL, ?<logger>=LEVEL or ?paths=<logger>:LEVEL,...\n",
        );
    }
    let mut filter = state.log.current();
    for (key, value) in &pairs {
        let updates: Vec<(&str, &str)> = match key.as_str() {
            "level" => {
                filter = envoy_level(value).unwrap_or(value).to_owned();
                continue;
            }
            "paths" => value.split(',').filter_map(|p| p.split_once(':')).collect(),
            logger => vec![(logger, value.as_str())],
        };
        for (logger, level) in updates {
            let Some(target) = logger_target(logger) else {
                return text(StatusCode::BAD_REQUEST, format!("unknown logger \"{logger}\"\n"));
            };
            let Some(level) = envoy_level(level) else {
                return text(
                    StatusCode::BAD_REQUEST,
                    format!("invalid level \"{level}\" for {logger}\n"),
                );
            };
            filter = with_directive(&filter, target, level);
        }
    }
    match state.log.set(&filter) {
        Ok(()) => text(StatusCode::OK, format!("{filter}\n")),
        Err(err) => text(StatusCode::BAD_REQUEST, format!("{err}\n")),
    }
}

/// Envoy's level names as tracing's.
fn envoy_level(level: &str) -> Option<&'static str> {
    Some(match level {
        "trace" => "trace",
        "debug" => "debug",
        "info" => "info",
        "warning" | "warn" => "warn",
        "error" | "critical" => "error",
        "off" => "off",
        _ => return None,
    })
}

/// A logger name, Envoy's or a module's, as the module it stands for.
fn logger_target(logger: &str) -> Option<&str> {
    Some(match logger {
        "http" | "http2" | "router" | "upstream" | "pool" | "client" => "weft_http",
        "connection" | "conn_handler" | "main" => "weft_app",
        "config" | "xds" => "weft_xds",
        "admin" => "weft_admin",
        "rbac" | "filter" => "weft_authz",
        "secret" | "tls" => "weft_identity",
        module if module.starts_with("weft") || module == "h2" || module == "hyper" => module,
        _ => return None,
    })
}

/// `filter` with `target=level` replacing any directive for `target`.
fn with_directive(filter: &str, target: &str, level: &str) -> String {
    let mut directives: Vec<String> = filter
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty() && d.split_once('=').map(|(t, _)| t) != Some(target))
        .map(str::to_owned)
        .collect();
    directives.push(format!("{target}={level}"));
    directives.join(",")
}

fn ready(readiness: &Readiness) -> AdminResponse {
    match readiness.check() {
        Ok(()) => text(StatusCode::OK, "ready\n"),
        Err(reason) => text(StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {reason}\n")),
    }
}

fn get_only(method: &Method, f: impl FnOnce() -> AdminResponse) -> AdminResponse {
    if method == Method::GET || method == Method::HEAD {
        f()
    } else {
        method_not_allowed("GET")
    }
}

fn post_only(method: &Method, f: impl FnOnce() -> AdminResponse) -> AdminResponse {
    if method == Method::POST {
        f()
    } else {
        method_not_allowed("POST")
    }
}

fn method_not_allowed(allow: &'static str) -> AdminResponse {
    let mut response = text(StatusCode::METHOD_NOT_ALLOWED, format!("use {allow}\n"));
    response
        .headers_mut()
        .insert(header::ALLOW, header::HeaderValue::from_static(allow));
    response
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> AdminResponse {
    respond(status, "text/plain; charset=utf-8", body)
}

fn respond(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> AdminResponse {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    response
}

async fn serve<F, Fut>(listener: TcpListener, stop: CancellationToken, handle: F)
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = AdminResponse> + Send + 'static,
{
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(err) => {
                    tracing::warn!(error = %err, "admin accept failed");
                    continue;
                }
            },
            () = stop.cancelled() => return,
        };
        let handle = handle.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let fut = handle(req);
                async move { Ok::<_, Infallible>(fut.await) }
            });
            if let Err(err) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(error = %err, "admin connection error");
            }
        });
    }
}
