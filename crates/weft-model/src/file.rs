//! The static YAML configuration file (`weft proxy --config FILE`), field by field as documented in
//! `docs/configuration.md`. Parsing rejects unknown fields; [`ProxyFile::validate`] then checks what serde
//! cannot (references between sections, duplicates) and builds the runtime model.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use weft_telemetry::access_log::{AccessLogConfig, AccessLogSet, Format, Sink};
use weft_telemetry::traces::{SamplerSetting, TracingSettings};

use crate::defaults::*;
use crate::mesh::{
    Bootstrap, Cluster, Egress, ExplicitListener, HttpLimits, HttpSettings, InboundPolicy, Mesh, Mode, Node,
    OutboundPolicy, OverloadSettings, Protocol,
};
use crate::route::{
    HeaderMatch, PathMatch, Route, RouteAction, RouteMatch, RouteTable, ValueMatch, VirtualHost,
    WeightedCluster, compile_regex,
};

/// The whole file.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProxyFile {
    pub mode: Mode,
    pub node: NodeFile,
    pub admin: AddressFile,
    pub readiness: AddressFile,
    /// The status port; default `[::]:15020` in a pod, none on a developer's machine.
    pub status: AddressFile,
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Option<Duration>,
    #[serde(with = "humantime_serde")]
    pub detect_timeout: Option<Duration>,
    /// Client connections (HTTP with no request in flight, or opaque TCP) that carry no bytes for this
    /// long are closed (default 1 h, Envoy's; `0s` disables).
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Option<Duration>,
    /// From a request's first byte to the end of its headers, on every HTTP listener of this file
    /// (default 30 s; `0s` disables).
    #[serde(with = "humantime_serde")]
    pub request_headers_timeout: Option<Duration>,
    /// No response frame for this long ends a request whose route sets no `idle_timeout`, on every
    /// HTTP listener of this file (default 5 min; `0s` disables).
    #[serde(with = "humantime_serde")]
    pub stream_idle_timeout: Option<Duration>,
    /// From a request's first byte until its body has arrived or its response begun, on every HTTP
    /// listener of this file (default: none, Envoy's; `0s` disables).
    #[serde(with = "humantime_serde")]
    pub request_timeout: Option<Duration>,
    /// What one client may make the proxy hold, on every HTTP listener of this file.
    pub http_limits: HttpLimits,
    pub outbound: OutboundFile,
    pub inbound: InboundFile,
    pub listeners: Vec<ListenerFile>,
    pub clusters: Vec<ClusterFile>,
    pub routes: Vec<RouteTableFile>,
    pub xds: Option<XdsFile>,
    pub identity: Option<IdentityFile>,
    pub overload: OverloadSettings,
    pub access_log: AccessLogFile,
    pub tracing: TracingFile,
}

/// Distributed tracing: spans exported over OTLP/gRPC. The OpenTelemetry SDK's environment variables
/// (`OTEL_EXPORTER_OTLP_ENDPOINT`, `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, `OTEL_SERVICE_NAME`,
/// `OTEL_TRACES_SAMPLER`, `OTEL_TRACES_SAMPLER_ARG`, `OTEL_BSP_*`) override these fields.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TracingFile {
    /// The collector, `http://host:4317`; none: no spans are made (trace headers still pass through).
    pub otlp_endpoint: Option<String>,
    /// New traces sampled, 0 to 100 (default 1, Istio's); a request carrying a decision follows it.
    pub sampling_percent: Option<f64>,
}

/// The proxy's own access log, for listeners whose configuration names none (over xDS, a connection
/// manager's or TCP proxy's `access_log` takes precedence). `WEFT_ACCESS_LOG` and
/// `WEFT_ACCESS_LOG_FORMAT` override these fields.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AccessLogFile {
    /// `stdout`, `stderr`, `off`, or a file appended to (default: `stdout` in local mode, `off` in pod
    /// mode, as in Istio's default profile).
    pub path: Option<String>,
    /// `text` (Istio's default format, the default) or `json` (the same fields as keys).
    pub format: Option<AccessLogFormatName>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AccessLogFormatName {
    #[default]
    Text,
    Json,
}

/// Where the proxy gets its workload certificate: a CA speaking Istio's CreateCertificate
/// (`ca_address`), or PEM files another agent keeps current (`cert_file`, `key_file`, `roots_file`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityFile {
    /// `http://host:15010`, or `https://host:15012` with `ca_root_file`.
    #[serde(default)]
    pub ca_address: Option<String>,
    /// The workload certificate, leaf first (cert-manager's `tls.crt`, Istio's `cert-chain.pem`).
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    /// Its private key (`tls.key`, `key.pem`).
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// The roots peers are verified against (`ca.crt`, `root-cert.pem`).
    #[serde(default)]
    pub roots_file: Option<PathBuf>,
    /// PEM root to verify an `https://` CA with.
    #[serde(default)]
    pub ca_root_file: Option<PathBuf>,
    /// The bearer token proving the workload's identity (`weft control token`), inline...
    #[serde(default)]
    pub token: Option<String>,
    /// ...or read from a file (a projected service-account token in Kubernetes).
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    #[serde(default)]
    pub trust_domain: Option<String>,
    /// Requested certificate lifetime.
    #[serde(default, with = "humantime_serde")]
    pub validity: Option<Duration>,
}

/// The control plane to take listeners, routes, clusters and endpoints from (ADS).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct XdsFile {
    /// `http://host:15010`, or `https://host:15012` with `root_file`.
    pub address: String,
    #[serde(default, with = "humantime_serde")]
    pub initial_fetch_timeout: Option<Duration>,
    /// The largest response taken, in bytes.
    #[serde(default)]
    pub max_message_bytes: Option<u64>,
    /// PEM root to verify an `https://` control plane with.
    #[serde(default)]
    pub root_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeFile {
    pub id: Option<String>,
    pub workload: Option<String>,
    pub namespace: Option<String>,
    pub service_account: Option<String>,
    /// The workload's labels: `app`, `version`, `service.istio.io/canonical-name`,
    /// `service.istio.io/canonical-revision` (and `app.kubernetes.io/name`, `app.kubernetes.io/version`)
    /// give its metrics' `app`, `version`, canonical service and revision labels.
    pub labels: std::collections::BTreeMap<String, String>,
    /// The cluster it runs in (`source_cluster` / `destination_cluster`); default `ISTIO_META_CLUSTER_ID`,
    /// else `Kubernetes` (Istio's default).
    pub cluster: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AddressFile {
    pub address: Option<SocketAddr>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OutboundFile {
    pub enabled: bool,
    pub address: Option<SocketAddr>,
    pub egress: Egress,
    pub services: Vec<ServiceFile>,
}

impl Default for OutboundFile {
    fn default() -> Self {
        Self {
            enabled: true,
            address: None,
            egress: Egress::AllowAny,
            services: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceFile {
    /// `ip:port` the app connects to; `0.0.0.0:port` matches any address on that port.
    pub address: SocketAddr,
    #[serde(flatten)]
    pub target: TargetFile,
}

/// Where a service's or listener's connections go: `cluster` for everything, `route` for HTTP requests
/// (then `cluster`, if given, takes the opaque connections).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetFile {
    #[serde(default)]
    pub cluster: Option<String>,
    #[serde(default)]
    pub route: Option<String>,
    #[serde(default)]
    pub protocol: Protocol,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct InboundFile {
    pub enabled: bool,
    pub address: Option<SocketAddr>,
    /// Default: `127.0.0.1` locally; in a pod, the address the caller dialled.
    pub app_address: Option<IpAddr>,
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Option<Duration>,
    pub ports: Vec<InboundPortFile>,
    /// Istio's PeerAuthentication mode for the inbound listener; `permissive` by default.
    pub peer_authentication: crate::PeerAuthentication,
    /// Istio AuthorizationPolicies enforced on what arrives, with Istio's semantics.
    pub authorization_policies: Vec<AuthorizationPolicyFile>,
}

/// An AuthorizationPolicy in the proxy's own file: a name and Istio's `spec`, which applies to this
/// proxy (so it has no selector).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthorizationPolicyFile {
    pub name: String,
    #[serde(skip_serializing)]
    pub spec: weft_authz::istio::AuthorizationPolicySpec,
}

impl Default for InboundFile {
    fn default() -> Self {
        Self {
            enabled: true,
            address: None,
            app_address: None,
            idle_timeout: None,
            ports: Vec::new(),
            peer_authentication: crate::PeerAuthentication::Permissive,
            authorization_policies: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InboundPortFile {
    pub port: u16,
    pub protocol: Protocol,
    /// This port's own mode, over `inbound.peer_authentication` (Istio's `portLevelMtls`).
    #[serde(default)]
    pub peer_authentication: Option<crate::PeerAuthentication>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerFile {
    pub name: String,
    pub address: SocketAddr,
    /// Mutual TLS from peers: `disable` (the default for explicit listeners), `permissive`, `strict`.
    #[serde(default)]
    pub peer_authentication: Option<crate::PeerAuthentication>,
    /// Istio AuthorizationPolicies enforced on what arrives (see `inbound.authorization_policies`).
    #[serde(default)]
    pub authorization_policies: Vec<AuthorizationPolicyFile>,
    #[serde(flatten)]
    pub target: TargetFile,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterFile {
    pub name: String,
    #[serde(default)]
    pub endpoints: Vec<EndpointFile>,
    #[serde(default)]
    pub lb_policy: crate::LbPolicy,
    #[serde(default, with = "humantime_serde")]
    pub connect_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub idle_timeout: Option<Duration>,
    /// Mutual TLS to the endpoints, which must prove one of these SPIFFE identities.
    #[serde(default)]
    pub tls: Option<UpstreamTlsFile>,
    #[serde(default)]
    pub circuit_breakers: crate::CircuitBreakers,
    /// Passive health checking; absent: endpoints are never ejected.
    #[serde(default)]
    pub outlier_detection: Option<crate::OutlierDetection>,
    /// Percentage of available endpoints below which balancing ignores ejections (default 50, 0 disables).
    #[serde(default)]
    pub panic_threshold_percent: Option<f64>,
    /// Requests an upstream connection serves before it is retired; absent: no limit.
    #[serde(default)]
    pub max_requests_per_connection: Option<u32>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTlsFile {
    pub identities: Vec<String>,
    /// HTTP/1 requests travel to these peers as HTTP/2 (Istio's `h2UpgradePolicy: UPGRADE`).
    #[serde(default)]
    pub http2_upgrade: bool,
}

/// `127.0.0.1:8080`, or `{ address: 127.0.0.1:8080, weight: 3 }`.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum EndpointFile {
    Address(SocketAddr),
    Weighted { address: SocketAddr, weight: u32 },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WeightedEndpointFile {
    address: SocketAddr,
    #[serde(default = "one")]
    weight: u32,
}

fn one() -> u32 {
    1
}

// Hand-written so that errors keep their position (`clusters[0].endpoints[1]: ...`), which serde's
// untagged enums lose.
impl<'de> Deserialize<'de> for EndpointFile {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = EndpointFile;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an address (ip:port) or { address, weight }")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<EndpointFile, E> {
                v.parse()
                    .map(EndpointFile::Address)
                    .map_err(|_| E::custom(format!("\"{v}\" is not an ip:port address")))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<EndpointFile, A::Error> {
                let w = WeightedEndpointFile::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
                Ok(EndpointFile::Weighted {
                    address: w.address,
                    weight: w.weight,
                })
            }
        }
        d.deserialize_any(Visitor)
    }
}

impl EndpointFile {
    fn endpoint(&self) -> crate::Endpoint {
        match *self {
            EndpointFile::Address(address) => crate::Endpoint::new(address),
            EndpointFile::Weighted { address, weight } => crate::Endpoint {
                weight,
                ..crate::Endpoint::new(address)
            },
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteTableFile {
    pub name: String,
    pub virtual_hosts: Vec<VirtualHostFile>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VirtualHostFile {
    pub name: String,
    #[serde(default = "any_domain")]
    pub domains: Vec<String>,
    pub routes: Vec<RouteFile>,
}

fn any_domain() -> Vec<String> {
    vec!["*".into()]
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteFile {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default, rename = "match")]
    pub matcher: MatchFile,
    /// All requests to one cluster...
    #[serde(default)]
    pub cluster: Option<String>,
    /// ...or split by weight.
    #[serde(default)]
    pub clusters: Vec<WeightedClusterFile>,
    #[serde(default, with = "humantime_serde")]
    pub timeout: Option<Duration>,
    /// Stream idle timeout (default: the listener's `stream_idle_timeout`; `0s` disables).
    #[serde(default, with = "humantime_serde")]
    pub idle_timeout: Option<Duration>,
    #[serde(default)]
    pub retry: Option<crate::RetryPolicy>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MatchFile {
    pub prefix: Option<String>,
    pub path: Option<String>,
    pub regex: Option<String>,
    #[serde(default)]
    pub headers: Vec<HeaderMatchFile>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderMatchFile {
    pub name: String,
    pub exact: Option<String>,
    pub prefix: Option<String>,
    pub suffix: Option<String>,
    pub regex: Option<String>,
    #[serde(default)]
    pub present: bool,
    #[serde(default)]
    pub invert: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WeightedClusterFile {
    pub name: String,
    pub weight: u32,
}

/// Why a configuration file was not accepted. Each variant names the file; `Invalid` names the field.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{}: cannot read: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {source}", path.display())]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_yaml_ng::Error,
    },
    #[error("{}: field `{field}`: {problem}", path.display())]
    Invalid {
        path: PathBuf,
        field: String,
        problem: String,
    },
}

/// A problem found after parsing: the field (as a path such as `clusters[2].name`) and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    pub field: String,
    pub problem: String,
}

fn invalid(field: impl Into<String>, problem: impl Into<String>) -> Invalid {
    Invalid {
        field: field.into(),
        problem: problem.into(),
    }
}

/// Reads, parses and validates a configuration file.
pub fn load_file(path: &Path) -> Result<(Bootstrap, Mesh), LoadError> {
    let text = std::fs::read_to_string(path).map_err(|source| LoadError::Read {
        path: path.into(),
        source,
    })?;
    parse(&text).map_err(|e| match e {
        ParseError::Yaml(source) => LoadError::Parse {
            path: path.into(),
            source,
        },
        ParseError::Invalid(Invalid { field, problem }) => LoadError::Invalid {
            path: path.into(),
            field,
            problem,
        },
    })
}

#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    #[error(transparent)]
    Yaml(#[from] serde_yaml_ng::Error),
    #[error("field `{}`: {}", .0.field, .0.problem)]
    Invalid(Invalid),
}

/// Parses and validates configuration text. An empty document is the all-defaults configuration.
pub fn parse(text: &str) -> Result<(Bootstrap, Mesh), ParseError> {
    let file: ProxyFile = if text.trim().is_empty() {
        ProxyFile::default()
    } else {
        serde_yaml_ng::from_str(text)?
    };
    file.validate().map_err(ParseError::Invalid)
}

mod validate;
