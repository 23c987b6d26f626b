//! One Prometheus registry for the proxy. Request and TCP metrics carry Istio's names and labels, so
//! existing dashboards (Grafana's Istio dashboards, Kiali) read them unchanged.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, PoisonError, RwLock};

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::ResponseFlags;

/// Istio's `istio_request_duration_milliseconds` buckets (Envoy's default histogram buckets).
const DURATION_BUCKETS_MS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0, 60000.0,
    300000.0, 600000.0, 1800000.0, 3600000.0,
];

/// Istio's byte-size buckets: powers of ten from 1 B to 100 MB.
const SIZE_BUCKETS_BYTES: [f64; 9] = [1.0, 10.0, 100.0, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8];

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct BuildLabels {
    component: &'static str,
    tag: &'static str,
}

/// A cheaply cloned label value.
#[derive(Clone, Debug, Eq, PartialOrd, Ord)]
pub struct Label(Arc<str>);

impl std::hash::Hash for Label {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.hash(state);
    }
}

impl PartialEq for Label {
    /// Label sets of one connection share their strings: equal pointers answer without comparing bytes.
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0) || self.0 == other.0
    }
}

impl Label {
    pub fn unknown() -> Self {
        Self::from("unknown")
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `destination_service` for traffic to a cluster: Istio's clusters are named
    /// `outbound|<port>|<subset>|<host>`, and the host is the service; other names stand for themselves.
    pub fn service_of_cluster(cluster: &str) -> Self {
        match cluster.rsplit_once('|') {
            Some((_, host)) if cluster.starts_with("outbound|") && !host.is_empty() => Self::from(host),
            _ => Self::from(cluster),
        }
    }
}

impl From<&str> for Label {
    fn from(s: &str) -> Self {
        Self(s.into())
    }
}

impl From<Arc<str>> for Label {
    fn from(s: Arc<str>) -> Self {
        Self(s)
    }
}

impl From<String> for Label {
    fn from(s: String) -> Self {
        Self(s.into())
    }
}

impl fmt::Display for Label {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl EncodeLabelValue for Label {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> fmt::Result {
        fmt::Write::write_str(encoder, &self.0)
    }
}

/// Which side of the hop reports: the client's proxy (`source`) or the server's (`destination`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Reporter {
    source,
    destination,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum ConnectionSecurity {
    mutual_tls,
    none,
    unknown,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum RequestProtocol {
    http,
    grpc,
}

/// Who talks to whom, with Istio's standard label set: fixed for a connection, built once and cloned
/// per request (every value is a shared string).
#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct Peers {
    pub reporter: Reporter,
    pub source_workload: Label,
    pub source_canonical_service: Label,
    pub source_canonical_revision: Label,
    pub source_workload_namespace: Label,
    pub source_principal: Label,
    pub source_app: Label,
    pub source_version: Label,
    pub source_cluster: Label,
    pub destination_workload: Label,
    pub destination_workload_namespace: Label,
    pub destination_principal: Label,
    pub destination_app: Label,
    pub destination_version: Label,
    pub destination_service: Label,
    pub destination_canonical_service: Label,
    pub destination_canonical_revision: Label,
    /// The service's short name and namespace, read from `destination_service` when it is written.
    pub destination_service_name: ServiceName,
    pub destination_service_namespace: ServiceNamespace,
    pub destination_cluster: Label,
    pub connection_security_policy: ConnectionSecurity,
}

/// One side of a hop, as Istio labels it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct WorkloadLabels {
    pub workload: Label,
    pub namespace: Label,
    pub principal: Label,
    pub app: Label,
    pub version: Label,
    pub canonical_service: Label,
    pub canonical_revision: Label,
    pub cluster: Label,
}

impl WorkloadLabels {
    /// A side the reporter knows nothing of.
    pub fn unknown() -> Self {
        let unknown = Label::unknown();
        Self {
            workload: unknown.clone(),
            namespace: unknown.clone(),
            principal: unknown.clone(),
            app: unknown.clone(),
            version: unknown.clone(),
            canonical_service: unknown.clone(),
            canonical_revision: unknown.clone(),
            cluster: unknown,
        }
    }
}

impl Peers {
    pub fn new(
        reporter: Reporter,
        source: &WorkloadLabels,
        destination: &WorkloadLabels,
        destination_service: Label,
        connection_security_policy: ConnectionSecurity,
    ) -> Self {
        Self {
            reporter,
            source_workload: source.workload.clone(),
            source_canonical_service: source.canonical_service.clone(),
            source_canonical_revision: source.canonical_revision.clone(),
            source_workload_namespace: source.namespace.clone(),
            source_principal: source.principal.clone(),
            source_app: source.app.clone(),
            source_version: source.version.clone(),
            source_cluster: source.cluster.clone(),
            destination_workload: destination.workload.clone(),
            destination_workload_namespace: destination.namespace.clone(),
            destination_principal: destination.principal.clone(),
            destination_app: destination.app.clone(),
            destination_version: destination.version.clone(),
            destination_service_name: ServiceName(destination_service.clone()),
            destination_service_namespace: ServiceNamespace(destination_service.clone()),
            destination_service,
            destination_canonical_service: destination.canonical_service.clone(),
            destination_canonical_revision: destination.canonical_revision.clone(),
            destination_cluster: destination.cluster.clone(),
            connection_security_policy,
        }
    }

    /// The calling workload, as its verified metadata names it.
    pub fn set_source(&mut self, source: &WorkloadLabels) {
        self.source_workload = source.workload.clone();
        self.source_canonical_service = source.canonical_service.clone();
        self.source_canonical_revision = source.canonical_revision.clone();
        self.source_workload_namespace = source.namespace.clone();
        self.source_principal = source.principal.clone();
        self.source_app = source.app.clone();
        self.source_version = source.version.clone();
        self.source_cluster = source.cluster.clone();
    }

    /// The called workload, as its verified metadata or the endpoint's discovery metadata names it.
    pub fn set_destination(&mut self, destination: &WorkloadLabels) {
        self.destination_workload = destination.workload.clone();
        self.destination_workload_namespace = destination.namespace.clone();
        self.destination_principal = destination.principal.clone();
        self.destination_app = destination.app.clone();
        self.destination_version = destination.version.clone();
        self.destination_canonical_service = destination.canonical_service.clone();
        self.destination_canonical_revision = destination.canonical_revision.clone();
        self.destination_cluster = destination.cluster.clone();
    }

    /// The service a request went to, once routing has told.
    pub fn set_destination_service(&mut self, service: Label) {
        self.destination_service_name = ServiceName(service.clone());
        self.destination_service_namespace = ServiceNamespace(service.clone());
        self.destination_service = service;
    }
}

/// `name.namespace.svc.<domain>` -> `name`; another value stands for itself.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ServiceName(Label);

/// `name.namespace.svc.<domain>` -> `namespace`; `unknown` for a host that is not a service's.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ServiceNamespace(Label);

fn service_parts(host: &str) -> Option<(&str, &str)> {
    let mut parts = host.splitn(3, '.');
    let (name, namespace, rest) = (parts.next()?, parts.next()?, parts.next()?);
    (rest == "svc" || rest.starts_with("svc.")).then_some((name, namespace))
}

impl EncodeLabelValue for ServiceName {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> fmt::Result {
        let host: &str = &self.0.0;
        fmt::Write::write_str(encoder, service_parts(host).map_or(host, |(name, _)| name))
    }
}

impl EncodeLabelValue for ServiceNamespace {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> fmt::Result {
        let host: &str = &self.0.0;
        fmt::Write::write_str(encoder, service_parts(host).map_or("unknown", |(_, ns)| ns))
    }
}

/// A gRPC response's `grpc-status`; empty for other requests, as Istio reports it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct GrpcStatus(pub Option<u16>);

impl EncodeLabelValue for GrpcStatus {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> fmt::Result {
        match self.0 {
            Some(code) => fmt::Write::write_fmt(encoder, format_args!("{code}")),
            None => Ok(()),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct OverloadLabels {
    pub reason: &'static str,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RequestLabels {
    #[prometheus(flatten)]
    pub peers: Peers,
    pub request_protocol: RequestProtocol,
    pub response_code: u16,
    pub grpc_response_status: GrpcStatus,
    pub response_flags: ResponseFlags,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct TcpLabels {
    #[prometheus(flatten)]
    pub peers: Peers,
    pub response_flags: ResponseFlags,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ProtocolLabels {
    pub direction: Direction,
    pub protocol: &'static str,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Direction {
    inbound,
    outbound,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct XdsLabels {
    pub resource_type: &'static str,
    pub result: &'static str,
}

/// Per-cluster resilience events.
#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ClusterLabels {
    pub cluster: Label,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ClusterEventLabels {
    pub cluster: Label,
    /// What happened: for retries `made`, `budget_exhausted`, `overflow`; for overflows the limit
    /// (`max_requests`, `max_pending_requests`); for ejections the detector (`consecutive_5xx`,
    /// `consecutive_gateway_failure`, `consecutive_local_origin_failure`).
    pub reason: &'static str,
}

/// An authorization decision: which rule set (`allow`, `deny`, `audit`), which policy matched (`none`:
/// no ALLOW policy did), and what happened (`allowed`, `denied`, `audited`, `shadow_allowed`,
/// `shadow_denied`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct AuthzLabels {
    pub action: &'static str,
    pub policy: Label,
    pub result: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// The four metrics every HTTP request records, looked up once per label set. A request then hashes
/// its 25 labels once, with a fast seeded hash, instead of once per family with SipHash.
#[derive(Debug, Clone)]
struct RequestSeries {
    requests: Counter,
    duration_ms: Histogram,
    request_bytes: Histogram,
    response_bytes: Histogram,
}

type SeriesMap = HashMap<RequestLabels, RequestSeries, foldhash::fast::RandomState>;

/// Every metric the proxy exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub request_duration_ms: HistogramFamily<RequestLabels>,
    pub request_bytes: HistogramFamily<RequestLabels>,
    /// gRPC messages each way (Istio's, for gRPC requests only).
    pub request_messages: Family<RequestLabels, Counter>,
    pub response_messages: Family<RequestLabels, Counter>,
    pub response_bytes: HistogramFamily<RequestLabels>,
    pub tcp_opened: Family<TcpLabels, Counter>,
    pub tcp_closed: Family<TcpLabels, Counter>,
    pub tcp_sent_bytes: Family<TcpLabels, Counter>,
    pub tcp_received_bytes: Family<TcpLabels, Counter>,
    pub detected: Family<ProtocolLabels, Counter>,
    pub downstream_connections_active: Gauge,
    pub silent_connections_waiting: Gauge,
    pub downstream_connections_parked: Gauge,
    pub overload_refused: Family<OverloadLabels, Counter>,
    pub overload_pressure: Gauge,
    pub xds_updates: Family<XdsLabels, Counter>,
    pub xds_connected: Gauge,
    pub certificate_renewals: Counter,
    pub certificate_failures: Counter,
    pub certificate_expiry: Gauge,
    pub retries: Family<ClusterEventLabels, Counter>,
    pub overflows: Family<ClusterEventLabels, Counter>,
    pub ejections: Family<ClusterEventLabels, Counter>,
    pub ejected_endpoints: Family<ClusterLabels, Gauge>,
    pub authz_decisions: Family<AuthzLabels, Counter>,
    pub access_log_dropped: Counter,
    pub access_log_write_failures: Counter,
    pub tracing_spans_exported: Counter,
    pub tracing_spans_failed: Counter,
    pub tracing_spans_dropped: Counter,
    request_series: RwLock<SeriesMap>,
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::default();
        let requests = Family::default();
        let request_duration_ms: HistogramFamily<RequestLabels> =
            Family::new_with_constructor(|| Histogram::new(DURATION_BUCKETS_MS));
        let request_bytes: HistogramFamily<RequestLabels> =
            Family::new_with_constructor(|| Histogram::new(SIZE_BUCKETS_BYTES));
        let response_bytes: HistogramFamily<RequestLabels> =
            Family::new_with_constructor(|| Histogram::new(SIZE_BUCKETS_BYTES));
        let request_messages = Family::default();
        let response_messages = Family::default();
        let tcp_opened = Family::default();
        let tcp_closed = Family::default();
        let tcp_sent_bytes = Family::default();
        let tcp_received_bytes = Family::default();
        let detected = Family::default();
        let downstream_connections_active = Gauge::default();
        let silent_connections_waiting = Gauge::default();
        let downstream_connections_parked = Gauge::default();
        let overload_refused = Family::default();
        let overload_pressure = Gauge::default();
        let xds_updates = Family::default();
        let xds_connected = Gauge::default();
        let certificate_renewals = Counter::default();
        let certificate_failures = Counter::default();
        let certificate_expiry = Gauge::default();
        let retries = Family::default();
        let overflows = Family::default();
        let ejections = Family::default();
        let ejected_endpoints = Family::default();
        let authz_decisions = Family::default();
        let access_log_dropped = Counter::default();
        let access_log_write_failures = Counter::default();
        let tracing_spans_exported = Counter::default();
        let tracing_spans_failed = Counter::default();
        let tracing_spans_dropped = Counter::default();

        // prometheus-client appends `_total` to counters.
        registry.register(
            "istio_requests",
            "Requests handled, by response code",
            requests.clone(),
        );
        registry.register(
            "istio_request_duration_milliseconds",
            "Time from request start to the end of the response",
            request_duration_ms.clone(),
        );
        registry.register("istio_request_bytes", "Request body sizes", request_bytes.clone());
        registry.register(
            "istio_response_bytes",
            "Response body sizes",
            response_bytes.clone(),
        );
        registry.register(
            "istio_request_messages",
            "gRPC messages from the client",
            request_messages.clone(),
        );
        registry.register(
            "istio_response_messages",
            "gRPC messages to the client",
            response_messages.clone(),
        );
        let build = Family::<BuildLabels, Gauge>::default();
        build
            .get_or_create(&BuildLabels {
                component: "proxy",
                tag: concat!("weft-", env!("CARGO_PKG_VERSION")),
            })
            .set(1);
        registry.register("istio_build", "Istio component build info", build);
        registry.register(
            "istio_tcp_connections_opened",
            "TCP connections opened",
            tcp_opened.clone(),
        );
        registry.register(
            "istio_tcp_connections_closed",
            "TCP connections closed",
            tcp_closed.clone(),
        );
        registry.register(
            "istio_tcp_sent_bytes",
            "Bytes sent to the client during a TCP connection",
            tcp_sent_bytes.clone(),
        );
        registry.register(
            "istio_tcp_received_bytes",
            "Bytes received from the client during a TCP connection",
            tcp_received_bytes.clone(),
        );
        let weft = registry.sub_registry_with_prefix("weft");
        weft.register(
            "protocol_detections",
            "Connections by detected protocol",
            detected.clone(),
        );
        weft.register(
            "downstream_connections_active",
            "Client connections currently open",
            downstream_connections_active.clone(),
        );
        weft.register(
            "downstream_connections_parked",
            "HTTP/1 client connections idle between requests that hold no HTTP buffers (taken back from the \
             HTTP server after a second without a request, served again when their client sends one)",
            downstream_connections_parked.clone(),
        );
        weft.register(
            "silent_connections_waiting",
            "Connections on detect ports that sent nothing by the detect timeout and wait for their client, \
             because as many silent connections as allowed are already forwarded as opaque TCP",
            silent_connections_waiting.clone(),
        );
        weft.register(
            "overload_refused_connections",
            "Client connections closed on accept by the overload manager, by the limit that was reached",
            overload_refused.clone(),
        );
        weft.register(
            "overload_pressure",
            "The overload manager's state: 0 normal, 1 keep-alive disabled, 2 new connections refused",
            overload_pressure.clone(),
        );

        weft.register(
            "xds_updates",
            "xDS responses by resource type and result (accepted: ACK, rejected: NACK)",
            xds_updates.clone(),
        );
        weft.register(
            "xds_connected",
            "1 while the xDS stream to the control plane is open",
            xds_connected.clone(),
        );

        weft.register(
            "certificate_renewals",
            "Workload certificates received from the CA or loaded from certificate files",
            certificate_renewals.clone(),
        );
        weft.register(
            "certificate_renewal_failures",
            "Failed certificate requests, or certificate files that do not make a usable certificate (the valid certificate stays in use)",
            certificate_failures.clone(),
        );
        weft.register(
            "certificate_expiry_timestamp_seconds",
            "When the workload certificate in use expires (Unix time)",
            certificate_expiry.clone(),
        );

        weft.register(
            "upstream_retries",
            "Retries by cluster: made, or not made because the budget or max_retries said no",
            retries.clone(),
        );
        weft.register(
            "upstream_overflows",
            "Requests refused with 503 UO by a circuit breaker, by cluster and limit",
            overflows.clone(),
        );
        weft.register(
            "outlier_ejections",
            "Endpoints ejected by outlier detection, by cluster and detector",
            ejections.clone(),
        );
        weft.register(
            "outlier_ejected_endpoints",
            "Endpoints currently ejected, by cluster",
            ejected_endpoints.clone(),
        );

        weft.register(
            "authz_decisions",
            "Authorization decisions, by rule set, matching policy and result",
            authz_decisions.clone(),
        );
        weft.register(
            "access_log_entries_dropped",
            "Access log entries dropped because the file's pending buffer was full (traffic is never held up for the log)",
            access_log_dropped.clone(),
        );
        weft.register(
            "access_log_write_failures",
            "Batches of access log entries that could not be written to their file or stream",
            access_log_write_failures.clone(),
        );
        weft.register(
            "tracing_spans_exported",
            "Spans the OTLP collector accepted",
            tracing_spans_exported.clone(),
        );
        weft.register(
            "tracing_spans_export_failures",
            "Spans lost because their export failed or timed out (not retried)",
            tracing_spans_failed.clone(),
        );
        weft.register(
            "tracing_spans_dropped",
            "Spans dropped because the export queue was full (requests are never held up for tracing)",
            tracing_spans_dropped.clone(),
        );

        Arc::new(Self {
            registry,
            requests,
            request_duration_ms,
            request_bytes,
            response_bytes,
            request_messages,
            response_messages,
            tcp_opened,
            tcp_closed,
            tcp_sent_bytes,
            tcp_received_bytes,
            detected,
            downstream_connections_active,
            silent_connections_waiting,
            downstream_connections_parked,
            overload_refused,
            overload_pressure,
            xds_updates,
            xds_connected,
            certificate_renewals,
            certificate_failures,
            certificate_expiry,
            retries,
            overflows,
            ejections,
            ejected_endpoints,
            authz_decisions,
            access_log_dropped,
            access_log_write_failures,
            tracing_spans_exported,
            tracing_spans_failed,
            tracing_spans_dropped,
            request_series: RwLock::default(),
        })
    }

    /// Records one finished HTTP request: `istio_requests_total`, its duration and both body sizes.
    pub fn record_request(&self, labels: &RequestLabels, duration_ms: f64, received: u64, sent: u64) {
        let record = |series: &RequestSeries| {
            series.requests.inc();
            series.duration_ms.observe(duration_ms);
            series.request_bytes.observe(received as f64);
            series.response_bytes.observe(sent as f64);
        };
        // A poisoned lock only means a thread panicked while inserting; the map is still whole.
        if let Some(series) = self
            .request_series
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(labels)
        {
            return record(series);
        }
        let series = RequestSeries {
            requests: self.requests.get_or_create_owned(labels),
            duration_ms: self.request_duration_ms.get_or_create_owned(labels),
            request_bytes: self.request_bytes.get_or_create_owned(labels),
            response_bytes: self.response_bytes.get_or_create_owned(labels),
        };
        record(&series);
        self.request_series
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(labels.clone(), series);
    }

    /// Counts a connection's detected protocol.
    pub fn count_detection(&self, inbound: bool, protocol: &'static str) {
        let direction = if inbound {
            Direction::inbound
        } else {
            Direction::outbound
        };
        self.detected
            .get_or_create(&ProtocolLabels { direction, protocol })
            .inc();
    }

    /// OpenMetrics text format (`application/openmetrics-text; version=1.0.0`), ending `# EOF`.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// Prometheus text exposition format 0.0.4 (`text/plain; version=0.0.4`), for scrapers that do
    /// not ask for OpenMetrics.
    pub fn encode_prometheus(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped_in_both_formats() {
        let metrics = Metrics::new();
        let labels = ClusterEventLabels {
            cluster: Label::from("we\"ird\\name\nx"),
            reason: "made",
        };
        metrics.retries.get_or_create(&labels).inc();
        for (text, eof) in [(metrics.encode(), true), (metrics.encode_prometheus(), false)] {
            let line = text
                .lines()
                .find(|l| l.starts_with("weft_upstream_retries_total{"))
                .expect(&text);
            assert!(line.contains(r#"cluster="we\"ird\\name\nx""#), "escaped: {line}");
            assert_eq!(text.trim_end().ends_with("# EOF"), eof, "{text}");
        }
    }

    #[test]
    fn a_request_series_is_found_again_by_equal_labels_made_of_other_strings() {
        let metrics = Metrics::new();
        let labels = |code: u16| RequestLabels {
            peers: Peers::new(
                Reporter::destination,
                &WorkloadLabels::unknown(),
                &WorkloadLabels::unknown(),
                Label::from(String::from("orders.default.svc.cluster.local")),
                ConnectionSecurity::mutual_tls,
            ),
            request_protocol: RequestProtocol::http,
            response_code: code,
            grpc_response_status: GrpcStatus(None),
            response_flags: ResponseFlags::NONE,
        };
        metrics.record_request(&labels(200), 2.0, 10, 100);
        metrics.record_request(&labels(200), 4.0, 20, 200);
        metrics.record_request(&labels(503), 1.0, 0, 19);
        let text = metrics.encode();
        let value = |prefix: &str, code: &str| -> String {
            let line = text
                .lines()
                .find(|l| l.starts_with(prefix) && l.contains(&format!("response_code=\"{code}\"")))
                .unwrap_or_else(|| panic!("no {prefix} for {code} in {text}"));
            line.rsplit(' ').next().unwrap_or_default().to_string()
        };
        assert_eq!(value("istio_requests_total{", "200"), "2");
        assert_eq!(value("istio_requests_total{", "503"), "1");
        assert_eq!(value("istio_request_duration_milliseconds_sum{", "200"), "6.0");
        assert_eq!(value("istio_request_bytes_sum{", "200"), "30.0");
        assert_eq!(value("istio_response_bytes_sum{", "200"), "300.0");
        assert_eq!(value("istio_response_bytes_count{", "503"), "1");
        let series = metrics.request_series.read().map(|m| m.len()).unwrap_or(0);
        assert_eq!(series, 2);
    }

    #[test]
    fn encodes_istio_names_and_labels() {
        let metrics = Metrics::new();
        let source = WorkloadLabels {
            workload: "productpage-v1".into(),
            namespace: "default".into(),
            app: "productpage".into(),
            version: "v1".into(),
            canonical_service: "productpage".into(),
            canonical_revision: "v1".into(),
            cluster: "Kubernetes".into(),
            ..WorkloadLabels::unknown()
        };
        let peers = Peers::new(
            Reporter::source,
            &source,
            &WorkloadLabels::unknown(),
            "reviews.default.svc.cluster.local".into(),
            ConnectionSecurity::none,
        );
        let labels = RequestLabels {
            peers,
            request_protocol: RequestProtocol::grpc,
            response_code: 503,
            grpc_response_status: GrpcStatus(Some(14)),
            response_flags: ResponseFlags::UPSTREAM_CONNECT_FAILURE,
        };
        metrics.requests.get_or_create(&labels).inc();
        metrics.request_duration_ms.get_or_create(&labels).observe(3.0);
        let text = metrics.encode();
        assert!(text.contains("# TYPE istio_requests counter"), "{text}");
        let line = text
            .lines()
            .find(|l| l.starts_with("istio_requests_total{"))
            .expect(&text);
        for part in [
            "reporter=\"source\"",
            "destination_service=\"reviews.default.svc.cluster.local\"",
            "destination_service_name=\"reviews\"",
            "destination_service_namespace=\"default\"",
            "source_canonical_service=\"productpage\"",
            "source_canonical_revision=\"v1\"",
            "source_app=\"productpage\"",
            "source_version=\"v1\"",
            "source_cluster=\"Kubernetes\"",
            "destination_canonical_service=\"unknown\"",
            "grpc_response_status=\"14\"",
            "response_code=\"503\"",
            "response_flags=\"UF\"",
            "connection_security_policy=\"none\"",
        ] {
            assert!(line.contains(part), "{part} missing in {line}");
        }
        assert!(line.ends_with(" 1"), "{line}");
        assert!(
            text.contains("istio_request_duration_milliseconds_bucket{"),
            "{text}"
        );
        assert!(text.contains("le=\"5.0\""), "{text}");
    }
}
