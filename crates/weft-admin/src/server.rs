//! Admin and readiness servers. Plain HTTP/1.1; the admin port binds loopback only, because it can
//! change log levels and stop the proxy.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use weft_telemetry::tap::{StatusMatch, TapFilter, TapStream, Taps};
use weft_telemetry::{LogControl, Metrics};

use crate::{Readiness, ServerState};

/// What the proxy shows and does through the admin port, beyond metrics, readiness and logging.
/// Envoy's shapes are the protobuf JSON mapping of its admin protos; an `Err` is why a view could not
/// be made.
pub trait Views: Send + Sync {
    /// Weft's own view of the configuration in use (the model, with the xDS client's state).
    fn mesh(&self) -> serde_json::Value;
    /// Envoy's `/config_dump` for the query string given (an `Err` is a 400).
    fn config_dump(&self, query: &str) -> Result<serde_json::Value, String>;
    /// Envoy's `/server_info` for the proxy in `state`.
    fn server_info(&self, state: ServerState) -> Result<serde_json::Value, String>;
    /// Envoy's `/certs` (`envoy.admin.v3.Certificates`).
    fn certs(&self) -> Result<serde_json::Value, String>;
    /// Weft's view of the workload certificate and the trusted roots (`null` without an identity).
    fn identity(&self) -> serde_json::Value;
    /// Envoy's `/clusters?format=json` (`envoy.admin.v3.Clusters`).
    fn clusters(&self) -> Result<serde_json::Value, String>;
    /// Weft's view of every cluster's endpoints and their running state (a list of clusters).
    fn endpoints(&self) -> serde_json::Value;
    /// The counters and gauges `/stats` shows under Envoy's names (`server.state` and
    /// `server.live` are added from readiness).
    fn stats(&self) -> Vec<Stat>;
    /// The traffic listeners still accepting connections, by name.
    fn listeners(&self) -> Vec<(String, std::net::SocketAddr)>;
    /// Envoy's `/listeners?format=json` (`envoy.admin.v3.Listeners`).
    fn listeners_json(&self) -> Result<serde_json::Value, String>;
    /// Stops accepting connections on the traffic listeners (only the inbound one with
    /// `inbound_only`); connections already open are served.
    fn drain_listeners(&self, inbound_only: bool);
}

/// One counter or gauge as `/stats` prints it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Stat {
    pub name: String,
    pub value: u64,
}

impl Stat {
    pub fn new(name: impl Into<String>, value: u64) -> Self {
        Self {
            name: name.into(),
            value,
        }
    }
}

/// What the admin endpoints read and act on.
pub struct AdminState {
    pub metrics: Arc<Metrics>,
    pub readiness: Readiness,
    pub log: LogControl,
    pub views: Box<dyn Views>,
    /// `/tap`'s sessions.
    pub taps: Arc<Taps>,
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
  GET  /certs          Envoy's Certificates (JSON): the workload chain and the trusted roots
  GET  /identity       Weft's view of the workload certificate: identity, expiry, renewal, root fingerprints
  GET  /clusters       Envoy's cluster::endpoint::stat lines; ?format=json for Envoy's Clusters (JSON)
  GET  /endpoints      Weft's view of every cluster: endpoints with active requests, successes,
                       failures, ejections and when they end, breakers' counts
  GET  /stats          counters and gauges under Envoy's names; ?format=json, ?filter=REGEX, ?usedonly,
                       ?format=prometheus
  GET  /metrics        Prometheus metrics (also /stats/prometheus)
  GET  /listeners      the traffic listeners accepting connections (name::address); ?format=json
  POST /drain_listeners   stop accepting connections (?inboundonly: the inbound listener only;
                       ?graceful: also report DRAINING, so that no new traffic is sent)
  GET  /logging        the active log filter
  POST /logging?level=FILTER   set the log filter (e.g. debug, weft_http=trace,info)
  POST /logging?<logger>=LEVEL, ?paths=<logger>:LEVEL,...   one logger or several (Envoy's names: http, router, upstream, config, admin, rbac, ...)
  GET  /tap            the HTTP requests passing through, one JSON line each as they end: route,
                       cluster, each attempt's endpoint and outcome, retries, ejections, authorization,
                       response flags; ?authority=, ?path=PREFIX, ?method=, ?cluster=, ?status=503|5xx,
                       ?flagged (only requests with response flags), ?max_rate=N (per second, default 100),
                       ?duration=30s (at most 5m)
  POST /quitquitquit   drain and exit
";

type AdminResponse = Response<UnsyncBoxBody<Bytes, Infallible>>;

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
    let query = req.uri().query().unwrap_or_default();
    match path {
        "/" | "/help" => get_only(method, || text(StatusCode::OK, HELP)),
        "/ready" => get_only(method, || ready(&state.readiness)),
        "/live" => get_only(method, || text(StatusCode::OK, "live\n")),
        "/config_dump" => get_only(method, || match state.views.config_dump(query) {
            Ok(dump) => json(&dump),
            Err(reason) => text(StatusCode::BAD_REQUEST, format!("{reason}\n")),
        }),
        "/server_info" => get_only(method, || {
            rendered(state.views.server_info(state.readiness.state()))
        }),
        "/mesh" => get_only(method, || json(&state.views.mesh())),
        "/certs" => get_only(method, || rendered(state.views.certs())),
        "/identity" => get_only(method, || json(&state.views.identity())),
        "/endpoints" => get_only(method, || json(&state.views.endpoints())),
        "/clusters" => get_only(method, || match json_format(query) {
            Ok(true) => rendered(state.views.clusters()),
            Ok(false) => text(StatusCode::OK, clusters_text(&state.views.endpoints())),
            Err(reason) => text(StatusCode::BAD_REQUEST, reason),
        }),
        "/listeners" => get_only(method, || match json_format(query) {
            Ok(true) => rendered(state.views.listeners_json()),
            Ok(false) => {
                let lines: String = state
                    .views
                    .listeners()
                    .iter()
                    .map(|(name, address)| format!("{name}::{address}\n"))
                    .collect();
                text(StatusCode::OK, lines)
            }
            Err(reason) => text(StatusCode::BAD_REQUEST, reason),
        }),
        "/drain_listeners" => post_only(method, || drain_listeners(state, query)),
        "/stats" => get_only(method, || stats(state, query)),
        "/tap" => get_only(method, || tap(state, query)),
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
            Method::POST => set_log_level(state, query),
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

/// `?format=json` (true), no format (false), or the reason a query is refused.
fn json_format(query: &str) -> Result<bool, String> {
    let mut json = false;
    for (key, value) in form_urlencoded::parse(query.as_bytes()) {
        match (key.as_ref(), value.as_ref()) {
            ("format", "json") => json = true,
            ("format", "text") => json = false,
            ("format", other) => return Err(format!("unknown format \"{other}\" (json or text)\n")),
            (other, _) => return Err(format!("unknown parameter \"{other}\"\n")),
        }
    }
    Ok(json)
}

/// Envoy's `/stats`: `name: value` lines sorted by name, or `{"stats":[{name, value}]}` with
/// `?format=json`; `?filter=REGEX` keeps the stats whose name matches, `?usedonly` those that are not
/// zero; `?format=prometheus` is `/stats/prometheus`.
fn stats(state: &AdminState, query: &str) -> AdminResponse {
    let mut format = "text".to_owned();
    let mut filter = None;
    let mut used_only = false;
    for (key, value) in form_urlencoded::parse(query.as_bytes()) {
        match key.as_ref() {
            "format" if matches!(value.as_ref(), "text" | "json" | "prometheus") => {
                format = value.into_owned();
            }
            "format" => {
                return text(
                    StatusCode::BAD_REQUEST,
                    format!("unknown format \"{value}\" (text, json or prometheus)\n"),
                );
            }
            "filter" => match regex::Regex::new(&value) {
                Ok(regex) => filter = Some(regex),
                Err(err) => {
                    return text(StatusCode::BAD_REQUEST, format!("invalid filter regex: {err}\n"));
                }
            },
            "usedonly" => used_only = true,
            other => {
                return text(
                    StatusCode::BAD_REQUEST,
                    format!("unknown parameter \"{other}\" (format, filter, usedonly)\n"),
                );
            }
        }
    }
    if format == "prometheus" {
        if filter.is_some() || used_only {
            return text(
                StatusCode::BAD_REQUEST,
                "filter and usedonly apply to the text and json formats; /stats/prometheus has every metric\n",
            );
        }
        return respond(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            state.metrics.encode_prometheus(),
        );
    }
    let server_state = state.readiness.state();
    let mut stats = state.views.stats();
    stats.push(Stat::new("server.state", server_state as u64));
    stats.push(Stat::new(
        "server.live",
        u64::from(server_state == ServerState::Live),
    ));
    stats.retain(|s| (!used_only || s.value != 0) && filter.as_ref().is_none_or(|f| f.is_match(&s.name)));
    stats.sort_by(|a, b| a.name.cmp(&b.name));
    if format == "json" {
        return json(&serde_json::json!({ "stats": stats }));
    }
    let lines: String = stats
        .iter()
        .map(|s| format!("{}: {}\n", s.name, s.value))
        .collect();
    text(StatusCode::OK, lines)
}

/// `GET /tap`: a session's lines as a streamed body (`application/x-ndjson`).
fn tap(state: &AdminState, query: &str) -> AdminResponse {
    let mut filter = TapFilter::default();
    let mut max_rate = weft_telemetry::tap::DEFAULT_RATE;
    let mut duration = weft_telemetry::tap::DEFAULT_DURATION;
    for (key, value) in form_urlencoded::parse(query.as_bytes()) {
        let value = value.into_owned();
        match key.as_ref() {
            "authority" => filter.authority = Some(value),
            "path" => filter.path_prefix = Some(value),
            "method" => filter.method = Some(value),
            "cluster" => filter.cluster = Some(value),
            "flagged" => filter.flagged = true,
            "status" => match StatusMatch::parse(&value) {
                Some(status) => filter.status = Some(status),
                None => {
                    return text(
                        StatusCode::BAD_REQUEST,
                        format!("invalid status \"{value}\" (a code such as 503, or a class such as 5xx)\n"),
                    );
                }
            },
            "max_rate" => match value.parse() {
                Ok(rate) if rate > 0 => max_rate = rate,
                _ => {
                    return text(
                        StatusCode::BAD_REQUEST,
                        format!("invalid max_rate \"{value}\" (lines per second, at least 1)\n"),
                    );
                }
            },
            "duration" => match humantime::parse_duration(&value) {
                Ok(d) if !d.is_zero() => duration = d,
                _ => {
                    return text(
                        StatusCode::BAD_REQUEST,
                        format!("invalid duration \"{value}\" (such as 30s or 2m)\n"),
                    );
                }
            },
            other => {
                return text(
                    StatusCode::BAD_REQUEST,
                    format!(
                        "unknown parameter \"{other}\" (authority, path, method, cluster, status, flagged, max_rate, duration)\n"
                    ),
                );
            }
        }
    }
    match state.taps.open(filter, max_rate, duration) {
        Ok(stream) => {
            tracing::info!(query, "tap session opened");
            let mut response = Response::new(UnsyncBoxBody::new(TapBody(stream)));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("application/x-ndjson"),
            );
            response
        }
        Err(err) => text(StatusCode::TOO_MANY_REQUESTS, format!("{err}\n")),
    }
}

/// A tap session as a response body: its lines until it ends; closing the connection ends it.
struct TapBody(TapStream);

impl http_body::Body for TapBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Infallible>>> {
        self.get_mut()
            .0
            .poll_next(cx)
            .map(|line| line.map(|l| Ok(http_body::Frame::data(l))))
    }
}

/// Envoy's `POST /drain_listeners[?inboundonly][&graceful]`.
fn drain_listeners(state: &AdminState, query: &str) -> AdminResponse {
    let mut inbound_only = false;
    let mut graceful = false;
    for (key, _) in form_urlencoded::parse(query.as_bytes()) {
        match key.as_ref() {
            "inboundonly" => inbound_only = true,
            "graceful" => graceful = true,
            other => {
                return text(
                    StatusCode::BAD_REQUEST,
                    format!("unknown parameter \"{other}\" (inboundonly, graceful)\n"),
                );
            }
        }
    }
    if graceful {
        state.readiness.set_draining();
    }
    state.views.drain_listeners(inbound_only);
    tracing::info!(inbound_only, graceful, "listeners drained through the admin port");
    text(StatusCode::OK, "OK\n")
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
        let breakers = &cluster["circuit_breakers"];
        for limit in [
            "max_connections",
            "max_pending_requests",
            "max_requests",
            "max_retries",
        ] {
            let _ = writeln!(
                out,
                "{name}::default_priority::{limit}::{}",
                plain(&breakers[limit])
            );
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
            let total =
                endpoint["successes"].as_u64().unwrap_or(0) + endpoint["failures"].as_u64().unwrap_or(0);
            let _ = writeln!(out, "{name}::{address}::rq_total::{total}");
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
fn set_log_level(state: &AdminState, query: &str) -> AdminResponse {
    let pairs: Vec<(String, String)> = form_urlencoded::parse(query.as_bytes())
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

fn json(value: &serde_json::Value) -> AdminResponse {
    let body = serde_json::to_vec_pretty(value).unwrap_or_default();
    respond(StatusCode::OK, "application/json", body)
}

/// A view rendered from Envoy's protos; failing to render one is the proxy's fault (a 500).
fn rendered(view: Result<serde_json::Value, String>) -> AdminResponse {
    match view {
        Ok(value) => json(&value),
        Err(reason) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{reason}\n")),
    }
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

pub(crate) fn text(status: StatusCode, body: impl Into<Bytes>) -> AdminResponse {
    respond(status, "text/plain; charset=utf-8", body)
}

fn respond(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> AdminResponse {
    let mut response = Response::new(Full::new(body.into()).boxed_unsync());
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    response
}

pub(crate) async fn serve<F, Fut>(listener: TcpListener, stop: CancellationToken, handle: F)
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
