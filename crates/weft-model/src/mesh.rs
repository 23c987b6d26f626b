//! The runtime model: validated, indexed, immutable.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use weft_telemetry::access_log::AccessLogSet;

use serde::{Deserialize, Serialize};

use crate::policy::{CircuitBreakers, OutlierDetection};
use crate::route::RouteTable;

/// The source address of connections the inbound listener makes to the app (Istio's): `weft init`'s
/// rules let traffic from it over loopback through, so it is never captured again.
const INBOUND_PASSTHROUGH_V4: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 6);
const INBOUND_PASSTHROUGH_V6: Ipv6Addr = Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 6);

/// The source for connections to the app at `app`, of its family.
pub(crate) fn passthrough_source(app: IpAddr) -> IpAddr {
    match app {
        IpAddr::V4(_) => IpAddr::V4(INBOUND_PASSTHROUGH_V4),
        IpAddr::V6(_) => IpAddr::V6(INBOUND_PASSTHROUGH_V6),
    }
}

/// Where the proxy runs: the defaults for bind addresses follow from it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// In front of a test service on a developer's machine: everything binds to loopback.
    #[default]
    Local,
    /// Beside an app in a pod, behind `weft init`'s iptables rules: capture listeners bind to all addresses
    /// (IPv4 and IPv6).
    Pod,
}

impl Mode {
    pub(crate) fn wildcard(self) -> IpAddr {
        match self {
            Mode::Local => Ipv4Addr::LOCALHOST.into(),
            Mode::Pod => Ipv6Addr::UNSPECIFIED.into(),
        }
    }
}

/// The protocol a port speaks, when known in advance. Names follow Istio's port protocols.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    /// Look at the client's first bytes; give up after the detect timeout (server-speaks-first).
    #[default]
    Detect,
    /// HTTP/1.x or HTTP/2 prior knowledge: the client always speaks first, so no timeout applies.
    Http,
    /// HTTP/2 only (gRPC).
    #[serde(alias = "grpc", alias = "h2c")]
    Http2,
    /// Opaque bytes, forwarded without waiting for or looking at anything.
    #[serde(
        alias = "opaque",
        alias = "tls",
        alias = "mysql",
        alias = "mongo",
        alias = "redis"
    )]
    Tcp,
}

/// What to do with outbound connections to addresses no service claims.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Egress {
    /// Forward to the original destination (Istio's `ALLOW_ANY`, Envoy's PassthroughCluster).
    #[default]
    AllowAny,
    /// Refuse (Istio's `REGISTRY_ONLY`, Envoy's BlackHoleCluster).
    RegistryOnly,
}

/// Fixed for the life of the process.
#[derive(Debug, Clone, Serialize)]
pub struct Bootstrap {
    pub mode: Mode,
    pub node: Node,
    pub admin_address: SocketAddr,
    pub readiness_address: SocketAddr,
    /// The status port (app probes, merged metrics); `None`: not served.
    pub status: Option<crate::status::StatusSettings>,
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// Where dynamic configuration comes from; `None`: the file is the whole configuration.
    pub xds: Option<XdsSource>,
    /// Where the workload certificate comes from; `None`: no mutual TLS.
    pub identity: Option<IdentitySource>,
    pub overload: OverloadSettings,
    /// The proxy's own access logs (from the file and environment), for listeners whose configuration
    /// names none.
    pub access_log: Arc<AccessLogSet>,
    /// Where spans are exported; `None`: no tracing.
    pub tracing: Option<weft_telemetry::traces::TracingSettings>,
}

/// When the proxy sheds load (its overload manager). `None` takes the default, worked out where the
/// proxy runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OverloadSettings {
    /// Client connections open at once over all listeners; past it new ones are closed at once
    /// (default: half the open-file limit, two descriptors per proxied connection).
    pub max_active_downstream_connections: Option<u64>,
    /// Resident memory the proxy may use, in bytes: at 90 % of it keep-alive is disabled, at 95 % new
    /// connections are refused (default: the container's cgroup memory limit; `0` disables).
    pub max_memory_bytes: Option<u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct IdentitySource {
    /// This workload's SPIFFE ID.
    pub id: String,
    pub provider: CertificateProvider,
}

/// Where the workload certificate comes from.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CertificateProvider {
    /// A CA speaking Istio's CreateCertificate: the proxy makes its key, asks, and renews at half life.
    Ca {
        ca_address: String,
        #[serde(skip)]
        ca_root_pem: Option<String>,
        #[serde(skip)]
        token: weft_identity::BearerToken,
        #[serde(with = "humantime_serde")]
        validity: Duration,
    },
    /// PEM files another agent keeps current (cert-manager, istio-csr), read again when they change.
    Files(weft_identity::files::CertificateFiles),
}

/// Istio's PeerAuthentication modes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PeerAuthentication {
    /// Plaintext only.
    #[serde(alias = "DISABLE")]
    Disable,
    /// Mutual TLS or plaintext, told apart per connection.
    #[default]
    #[serde(alias = "PERMISSIVE")]
    Permissive,
    /// Mutual TLS only: plaintext connections are refused.
    #[serde(alias = "STRICT")]
    Strict,
}

/// Mutual TLS to a cluster's endpoints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UpstreamTls {
    /// SPIFFE IDs the endpoints may present; parsed once, shared by every connection.
    #[serde(serialize_with = "display_all")]
    pub identities: Arc<[weft_identity::SpiffeId]>,
    /// HTTP/1 requests travel to the endpoints as HTTP/2 over multiplexed connections, restored to
    /// HTTP/1 by the peer's sidecar (Istio's `h2UpgradePolicy: UPGRADE`). Upgrades stay HTTP/1.
    pub http2_upgrade: bool,
}

fn display_all<S: serde::Serializer>(ids: &Arc<[weft_identity::SpiffeId]>, s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(ids.iter().map(ToString::to_string))
}

#[derive(Debug, Clone, Serialize)]
pub struct XdsSource {
    pub address: String,
    #[serde(skip)]
    pub root_pem: Option<String>,
    #[serde(with = "humantime_serde")]
    pub initial_fetch_timeout: Duration,
    pub max_message_bytes: usize,
}

/// Who this proxy is: the workload it serves.
#[derive(Debug, Clone, Serialize)]
pub struct Node {
    pub id: String,
    /// The workload, as metrics and peers name it: in Kubernetes the pod's owner (`reviews-v2`).
    pub workload: String,
    /// This instance: in Kubernetes the pod's own name (`reviews-v2-5c7f9d8b4-x2x9q`), which the
    /// control plane knows it by (Istio's `NAME`).
    pub pod: String,
    pub namespace: String,
    pub service_account: String,
    /// Istio's labels for this workload's side of its metrics.
    pub app: String,
    pub version: String,
    pub canonical_service: String,
    pub canonical_revision: String,
    pub cluster: String,
}

/// Listeners, routes and clusters: the part a control plane replaces at run time.
#[derive(Debug, Clone, Serialize)]
pub struct Mesh {
    #[serde(with = "humantime_serde")]
    pub detect_timeout: Duration,
    /// Client connections with no bytes (and, for HTTP, no request in flight) for this long are closed.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Option<Duration>,
    pub outbound: Option<OutboundPolicy>,
    pub inbound: Option<InboundPolicy>,
    pub listeners: Vec<ExplicitListener>,
    #[serde(serialize_with = "sorted_values")]
    pub clusters: HashMap<String, Arc<Cluster>>,
    #[serde(serialize_with = "sorted_routes")]
    pub routes: HashMap<String, Arc<RouteTable>>,
}

/// The transparent outbound listener and the services it knows.
#[derive(Debug, Clone, Serialize)]
pub struct OutboundPolicy {
    pub address: SocketAddr,
    pub egress: Egress,
    #[serde(serialize_with = "sorted_map")]
    pub services: HashMap<SocketAddr, Target>,
    /// For connections to no service (passthrough, blocked egress); empty: the proxy's own.
    pub access_log: Arc<AccessLogSet>,
}

/// The transparent inbound listener: forwards to the app on `app_address` (or, in a pod, the address the
/// caller dialled), port preserved.
#[derive(Debug, Clone, Serialize)]
pub struct InboundPolicy {
    pub address: SocketAddr,
    /// `None`: the connection's original destination (the pod's own address).
    pub app_address: Option<IpAddr>,
    /// Connect to the app from 127.0.0.6 (`::6`), the source `weft init`'s rules never capture again.
    pub passthrough_source: bool,
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    #[serde(serialize_with = "sorted_map")]
    pub ports: HashMap<u16, Protocol>,
    /// The mode of every port that has none of its own in `port_peer_authentication`.
    pub peer_authentication: PeerAuthentication,
    /// Ports whose mode is their own (Istio's `portLevelMtls`).
    #[serde(serialize_with = "sorted_map")]
    pub port_peer_authentication: HashMap<u16, PeerAuthentication>,
    pub authorization: ListenerAuthorization,
    /// How HTTP is served on the inbound listener.
    pub http: HttpSettings,
    /// Empty: the proxy's own.
    pub access_log: Arc<AccessLogSet>,
    pub tracing: weft_telemetry::traces::ListenerTracing,
}

/// How a listener serves HTTP: Envoy's HTTP connection manager timeouts and limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct HttpSettings {
    /// From a request's first byte to the end of its header block (slowloris protection); an idle
    /// keep-alive connection waits for the connection idle timeout instead. `None` disables it.
    #[serde(with = "humantime_serde")]
    pub request_headers_timeout: Option<Duration>,
    /// No frame of a request's response for this long ends it, unless its route sets its own;
    /// `None` disables it.
    #[serde(with = "humantime_serde")]
    pub stream_idle_timeout: Option<Duration>,
    /// From a request's first byte until its whole body has arrived or its response has begun (Envoy's
    /// `request_timeout`); a request whose body is still coming then gets 408. `None` (Envoy's default,
    /// so that long client-streaming calls keep working) disables it.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Option<Duration>,
    pub limits: HttpLimits,
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self {
            request_headers_timeout: Some(crate::defaults::DEFAULT_REQUEST_HEADERS_TIMEOUT),
            stream_idle_timeout: Some(crate::defaults::DEFAULT_STREAM_IDLE_TIMEOUT),
            request_timeout: None,
            limits: HttpLimits::default(),
        }
    }
}

/// What one client may make the proxy hold: the limits Envoy recommends at an edge, under Envoy's
/// field names (the same in the proxy file and, over xDS, in the HTTP connection manager).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpLimits {
    /// Size of a request's header block, in KiB (HTTP/1 head or HTTP/2 header list); larger: 431.
    pub max_request_headers_kb: u32,
    /// Header fields in a request; more: 431.
    pub max_headers_count: u32,
    /// Streams an HTTP/2 client may have open at once on one connection; more are refused
    /// (`REFUSED_STREAM`).
    pub max_concurrent_streams: u32,
    /// HTTP/2 flow-control window of each client stream, in bytes: how much of a request body the
    /// proxy buffers before the client must wait, and how much of a response it queues for it.
    pub initial_stream_window_size: u32,
    /// HTTP/2 flow-control window of a client connection, in bytes.
    pub initial_connection_window_size: u32,
}

impl HttpLimits {
    /// The bounds Envoy puts on the same fields.
    pub const STREAM_WINDOW_RANGE: std::ops::RangeInclusive<u32> = 65_535..=2_147_483_647;
    pub const HEADERS_KB_RANGE: std::ops::RangeInclusive<u32> = 1..=8192;

    /// The header block limit in bytes.
    pub fn max_request_headers_bytes(&self) -> u32 {
        self.max_request_headers_kb.saturating_mul(1024)
    }

    /// Every field in range, or the first that is not, with why.
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        let window = Self::STREAM_WINDOW_RANGE;
        let headers_kb = Self::HEADERS_KB_RANGE;
        if !headers_kb.contains(&self.max_request_headers_kb) {
            return Err((
                "max_request_headers_kb",
                format!("{} is outside {headers_kb:?}", self.max_request_headers_kb),
            ));
        }
        if self.max_headers_count == 0 {
            return Err(("max_headers_count", "must be at least 1".into()));
        }
        if self.max_concurrent_streams == 0 {
            return Err(("max_concurrent_streams", "must be at least 1".into()));
        }
        for (field, value) in [
            ("initial_stream_window_size", self.initial_stream_window_size),
            (
                "initial_connection_window_size",
                self.initial_connection_window_size,
            ),
        ] {
            if !window.contains(&value) {
                return Err((field, format!("{value} is outside {window:?}")));
            }
        }
        Ok(())
    }
}

impl Default for HttpLimits {
    fn default() -> Self {
        use crate::defaults::*;
        Self {
            max_request_headers_kb: DEFAULT_MAX_REQUEST_HEADERS_KB,
            max_headers_count: DEFAULT_MAX_HEADERS_COUNT,
            max_concurrent_streams: DEFAULT_MAX_CONCURRENT_STREAMS,
            initial_stream_window_size: DEFAULT_INITIAL_STREAM_WINDOW_SIZE,
            initial_connection_window_size: DEFAULT_INITIAL_CONNECTION_WINDOW_SIZE,
        }
    }
}

/// What a listener that receives peers' traffic enforces: Envoy's RBAC filters, one set for HTTP
/// requests and one for opaque TCP connections (Istio translates a policy differently for each).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ListenerAuthorization {
    pub http: Arc<weft_authz::Authorization>,
    pub tcp: Arc<weft_authz::Authorization>,
}

impl ListenerAuthorization {
    /// Nothing enforced or observed on either layer.
    pub fn is_empty(&self) -> bool {
        self.http.is_empty() && self.tcp.is_empty()
    }
}

/// A listener bound to a fixed address that sends everything to one cluster (no iptables needed).
#[derive(Debug, Clone, Serialize)]
pub struct ExplicitListener {
    pub name: String,
    pub address: SocketAddr,
    pub peer_authentication: PeerAuthentication,
    pub authorization: ListenerAuthorization,
    #[serde(flatten)]
    pub target: Target,
}

/// Where a connection goes, and what it is known to speak.
#[derive(Debug, Clone, Serialize)]
pub struct Target {
    pub protocol: Protocol,
    /// Where opaque (non-HTTP) connections go; without one they are refused.
    #[serde(serialize_with = "optional_cluster_name")]
    pub cluster: Option<Arc<Cluster>>,
    /// How HTTP requests are routed.
    #[serde(serialize_with = "route_name")]
    pub route: Arc<RouteTable>,
    /// How HTTP is served to the clients of this target.
    pub http: HttpSettings,
    /// Its requests' and connections' access logs; empty: the proxy's own.
    pub access_log: Arc<AccessLogSet>,
    pub tracing: weft_telemetry::traces::ListenerTracing,
}

impl Target {
    /// Everything, HTTP or not, to one cluster.
    pub fn to_cluster(cluster: Arc<Cluster>, protocol: Protocol) -> Self {
        Self {
            protocol,
            route: Arc::new(RouteTable::to_cluster(&cluster)),
            cluster: Some(cluster),
            http: HttpSettings::default(),
            access_log: AccessLogSet::off(),
            tracing: Default::default(),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Cluster {
    pub name: String,
    pub endpoints: Vec<Endpoint>,
    /// Mutual TLS to the endpoints; `None`: plaintext.
    pub tls: Option<UpstreamTls>,
    pub lb_policy: LbPolicy,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    pub circuit_breakers: CircuitBreakers,
    /// Passive health checking; `None`: endpoints are never ejected.
    pub outlier_detection: Option<OutlierDetection>,
    /// Below this percentage of available endpoints the cluster balances over all of them (0 disables).
    pub panic_threshold_percent: f64,
    /// Requests an upstream connection serves before it is retired (Envoy's
    /// `max_requests_per_connection`, Istio's `maxRequestsPerConnection`); `None`: no limit.
    pub max_requests_per_connection: Option<u32>,
}

impl Cluster {
    /// A cluster with no endpoints and default settings.
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            endpoints: Vec::new(),
            tls: None,
            lb_policy: LbPolicy::default(),
            connect_timeout: crate::defaults::DEFAULT_CONNECT_TIMEOUT,
            idle_timeout: crate::defaults::DEFAULT_UPSTREAM_IDLE_TIMEOUT,
            circuit_breakers: CircuitBreakers::default(),
            outlier_detection: None,
            panic_threshold_percent: crate::defaults::DEFAULT_PANIC_THRESHOLD_PERCENT,
            max_requests_per_connection: None,
        }
    }

    /// Endpoints that may receive traffic.
    pub fn healthy_endpoints(&self) -> impl Iterator<Item = &Endpoint> {
        self.endpoints.iter().filter(|e| e.healthy && e.weight > 0)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    pub address: SocketAddr,
    pub weight: u32,
    pub healthy: bool,
    /// The workload behind the endpoint as discovery names it (Istio's `istio` endpoint metadata), for
    /// the client side's metric labels until the peer's own metadata says more.
    #[serde(skip)]
    pub workload: Option<Arc<weft_telemetry::WorkloadLabels>>,
}

impl Endpoint {
    pub fn new(address: SocketAddr) -> Self {
        Self {
            address,
            weight: 1,
            healthy: true,
            workload: None,
        }
    }
}

/// How a cluster spreads requests over its endpoints (Envoy's `lb_policy`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum LbPolicy {
    #[default]
    RoundRobin,
    LeastRequest,
    Random,
}

impl OutboundPolicy {
    /// The service claiming `dst`: an exact `ip:port` match first, then one for any address on the port.
    pub fn service_for(&self, dst: SocketAddr) -> Option<&Target> {
        self.services.get(&dst).or_else(|| {
            let any_v4 = SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), dst.port());
            let any_v6 = SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), dst.port());
            self.services.get(&any_v4).or_else(|| self.services.get(&any_v6))
        })
    }
}

impl InboundPolicy {
    /// The app's address for a connection that was going to `dst`.
    pub fn app_for(&self, dst: SocketAddr) -> SocketAddr {
        SocketAddr::new(self.app_address.unwrap_or(dst.ip()), dst.port())
    }

    /// The source address for connections to `app`, when one is bound.
    pub fn source_for(&self, app: SocketAddr) -> Option<IpAddr> {
        self.passthrough_source.then(|| passthrough_source(app.ip()))
    }

    pub fn protocol_for(&self, port: u16) -> Protocol {
        self.ports.get(&port).copied().unwrap_or_default()
    }

    /// The PeerAuthentication mode for connections to the app's `port`.
    pub fn peer_authentication_for(&self, port: u16) -> PeerAuthentication {
        self.port_peer_authentication
            .get(&port)
            .copied()
            .unwrap_or(self.peer_authentication)
    }
}

fn sorted_values<S: serde::Serializer>(map: &HashMap<String, Arc<Cluster>>, s: S) -> Result<S::Ok, S::Error> {
    let mut values: Vec<_> = map.values().collect();
    values.sort_by(|a, b| a.name.cmp(&b.name));
    s.collect_seq(values)
}

fn sorted_map<K: Ord + ToString, V: Serialize, S: serde::Serializer>(
    map: &HashMap<K, V>,
    s: S,
) -> Result<S::Ok, S::Error> {
    let mut entries: Vec<_> = map.iter().collect();
    entries.sort_by(|a, b| a.0.cmp(b.0));
    s.collect_map(entries.into_iter().map(|(k, v)| (k.to_string(), v)))
}

fn sorted_routes<S: serde::Serializer>(
    map: &HashMap<String, Arc<RouteTable>>,
    s: S,
) -> Result<S::Ok, S::Error> {
    let mut values: Vec<_> = map.values().collect();
    values.sort_by(|a, b| a.name.cmp(&b.name));
    s.collect_seq(values)
}

fn optional_cluster_name<S: serde::Serializer>(
    cluster: &Option<Arc<Cluster>>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match cluster {
        Some(c) => s.serialize_some(&c.name),
        None => s.serialize_none(),
    }
}

fn route_name<S: serde::Serializer>(route: &Arc<RouteTable>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&route.name)
}
