//! The static YAML configuration file (`weft proxy --config FILE`), field by field as documented in
//! `docs/configuration.md`. Parsing rejects unknown fields; [`ProxyFile::validate`] then checks what serde
//! cannot (references between sections, duplicates) and builds the runtime model.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::mesh::{
    Bootstrap, Cluster, Egress, ExplicitListener, HttpSettings, InboundPolicy, Mesh, Mode, Node,
    OutboundPolicy, Protocol,
};
use crate::route::{
    DEFAULT_ROUTE_TIMEOUT, DEFAULT_STREAM_IDLE_TIMEOUT, HeaderMatch, PathMatch, Route, RouteAction,
    RouteMatch, RouteTable, ValueMatch, VirtualHost, WeightedCluster, compile_regex,
};

/// Envoy's default cluster connect timeout.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Idle upstream connections are closed after this long. Kept under the 5 s keep-alive that common app
/// servers (Node.js, Go's default is longer) use, so the proxy closes an idle connection before the app
/// does, rather than racing the app's close with a new request.
pub const DEFAULT_UPSTREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(4);
/// How long to wait for a client's first bytes before calling the connection opaque TCP. Long enough for
/// a client on a busy machine to send its request, short enough that a server-speaks-first protocol
/// (MySQL, SMTP) only sees a small delay before its greeting.
pub const DEFAULT_DETECT_TIMEOUT: Duration = Duration::from_millis(250);
/// Envoy's default idle timeout for client connections (HTTP connection manager and TCP proxy).
pub const DEFAULT_CONNECTION_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);
/// A client has this long from a request's first byte to send its whole header block (Envoy's
/// `request_headers_timeout`, which Envoy leaves off; the proxy keeps slowloris out by default).
pub const DEFAULT_REQUEST_HEADERS_TIMEOUT: Duration = Duration::from_secs(30);
/// Envoy's `initial_fetch_timeout`: after it the proxy serves with what it has.
pub const DEFAULT_INITIAL_FETCH_TIMEOUT: Duration = Duration::from_secs(15);
/// Istio's trust domain and certificate lifetime defaults.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";
pub const DEFAULT_CERT_VALIDITY: Duration = Duration::from_secs(24 * 3600);
/// How long in-flight requests get to finish on shutdown.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

pub const ADMIN_PORT: u16 = 15000;
pub const OUTBOUND_PORT: u16 = 15001;
pub const INBOUND_PORT: u16 = 15006;
pub const READINESS_PORT: u16 = 15021;

/// The whole file.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProxyFile {
    pub mode: Mode,
    pub node: NodeFile,
    pub admin: AddressFile,
    pub readiness: AddressFile,
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
    pub outbound: OutboundFile,
    pub inbound: InboundFile,
    pub listeners: Vec<ListenerFile>,
    pub clusters: Vec<ClusterFile>,
    pub routes: Vec<RouteTableFile>,
    pub xds: Option<XdsFile>,
    pub identity: Option<IdentityFile>,
}

/// Where the proxy gets its workload certificate: a CA speaking Istio's CreateCertificate.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityFile {
    /// `http://host:15010`, or `https://host:15012` with `ca_root_file`.
    pub ca_address: String,
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
                address,
                weight,
                healthy: true,
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

impl ProxyFile {
    /// Checks what the types cannot and builds the runtime model.
    pub fn validate(self) -> Result<(Bootstrap, Mesh), Invalid> {
        let wildcard = self.mode.wildcard();
        let node = self.node.resolve();
        let bootstrap = Bootstrap {
            mode: self.mode,
            node: node.clone(),
            admin_address: self
                .admin
                .address
                .unwrap_or(SocketAddr::new(Ipv4Addr::LOCALHOST.into(), ADMIN_PORT)),
            readiness_address: self
                .readiness
                .address
                .unwrap_or(SocketAddr::new(wildcard, READINESS_PORT)),
            drain_timeout: self.drain_timeout.unwrap_or(DEFAULT_DRAIN_TIMEOUT),
            xds: match self.xds {
                Some(x) if !(x.address.starts_with("http://") || x.address.starts_with("https://")) => {
                    return Err(invalid(
                        "xds.address",
                        format!("\"{}\" must start with http:// or https://", x.address),
                    ));
                }
                Some(x) => Some(crate::XdsSource {
                    root_pem: read_root("xds.root_file", &x.address, x.root_file.as_deref())?,
                    address: x.address,
                    initial_fetch_timeout: x.initial_fetch_timeout.unwrap_or(DEFAULT_INITIAL_FETCH_TIMEOUT),
                }),
                None => None,
            },
            identity: match self.identity {
                Some(i) => Some(resolve_identity(i, &node)?),
                None => None,
            },
        };

        let clusters = validate_clusters(self.clusters)?;
        let routes = validate_routes(self.routes, &clusters)?;
        let enabled =
            |t: Option<Duration>, default: Duration| Some(t.unwrap_or(default)).filter(|t| !t.is_zero());
        let http = HttpSettings {
            request_headers_timeout: enabled(self.request_headers_timeout, DEFAULT_REQUEST_HEADERS_TIMEOUT),
            stream_idle_timeout: enabled(self.stream_idle_timeout, DEFAULT_STREAM_IDLE_TIMEOUT),
        };
        let target = |field: String, t: &TargetFile| resolve_target(&field, t, &clusters, &routes, http);

        let mut services = HashMap::new();
        for (i, svc) in self.outbound.services.into_iter().enumerate() {
            let resolved = target(format!("outbound.services[{i}]"), &svc.target)?;
            if services.insert(svc.address, resolved).is_some() {
                return Err(invalid(
                    format!("outbound.services[{i}].address"),
                    format!("{} is listed twice", svc.address),
                ));
            }
        }
        let outbound = self.outbound.enabled.then(|| OutboundPolicy {
            address: self
                .outbound
                .address
                .unwrap_or(SocketAddr::new(wildcard, OUTBOUND_PORT)),
            egress: self.outbound.egress,
            services,
        });

        let mut inbound_ports = HashMap::new();
        for (i, port) in self.inbound.ports.iter().enumerate() {
            if port.port == 0 {
                return Err(invalid(
                    format!("inbound.ports[{i}].port"),
                    "port 0 is not a port",
                ));
            }
            if inbound_ports.insert(port.port, port.protocol).is_some() {
                return Err(invalid(
                    format!("inbound.ports[{i}].port"),
                    format!("port {} is listed twice", port.port),
                ));
            }
        }
        let inbound_authorization = authorization(
            "inbound.authorization_policies",
            &self.inbound.authorization_policies,
            &node.namespace,
        )?;
        let inbound = self.inbound.enabled.then(|| InboundPolicy {
            address: self
                .inbound
                .address
                .unwrap_or(SocketAddr::new(wildcard, INBOUND_PORT)),
            app_address: match self.mode {
                Mode::Local => Some(self.inbound.app_address.unwrap_or(Ipv4Addr::LOCALHOST.into())),
                Mode::Pod => self.inbound.app_address,
            },
            passthrough_source: self.mode == Mode::Pod,
            idle_timeout: self.inbound.idle_timeout.unwrap_or(DEFAULT_UPSTREAM_IDLE_TIMEOUT),
            ports: inbound_ports,
            peer_authentication: self.inbound.peer_authentication,
            authorization: inbound_authorization,
            http,
        });

        let mut listeners = Vec::new();
        let mut names = HashSet::new();
        for (i, l) in self.listeners.into_iter().enumerate() {
            if l.name.is_empty() {
                return Err(invalid(format!("listeners[{i}].name"), "must not be empty"));
            }
            if !names.insert(l.name.clone()) {
                return Err(invalid(
                    format!("listeners[{i}].name"),
                    format!("duplicate listener name \"{}\"", l.name),
                ));
            }
            let resolved = target(format!("listeners[{i}]"), &l.target)?;
            let authorization = authorization(
                &format!("listeners[{i}].authorization_policies"),
                &l.authorization_policies,
                &node.namespace,
            )?;
            listeners.push(ExplicitListener {
                name: l.name,
                address: l.address,
                authorization,
                peer_authentication: l
                    .peer_authentication
                    .unwrap_or(crate::PeerAuthentication::Disable),
                target: resolved,
            });
        }

        check_distinct_addresses(&bootstrap, outbound.as_ref(), inbound.as_ref(), &listeners)?;

        let mesh = Mesh {
            detect_timeout: self.detect_timeout.unwrap_or(DEFAULT_DETECT_TIMEOUT),
            idle_timeout: Some(self.idle_timeout.unwrap_or(DEFAULT_CONNECTION_IDLE_TIMEOUT))
                .filter(|t| !t.is_zero()),
            outbound,
            inbound,
            listeners,
            clusters,
            routes,
        };
        Ok((bootstrap, mesh))
    }
}

/// The file's policies, checked as `weft check` checks them: in the proxy's own file every problem is an
/// error (a policy that would fail closed at run time is better refused at start).
fn authorization(
    field: &str,
    policies: &[AuthorizationPolicyFile],
    namespace: &str,
) -> Result<crate::ListenerAuthorization, Invalid> {
    use weft_authz::istio::{Applicable, Layer, authorization, check};
    let mut names = HashSet::new();
    for (i, p) in policies.iter().enumerate() {
        if p.name.is_empty() {
            return Err(invalid(format!("{field}[{i}].name"), "must not be empty"));
        }
        if !names.insert(p.name.as_str()) {
            return Err(invalid(
                format!("{field}[{i}].name"),
                format!("duplicate policy name \"{}\"", p.name),
            ));
        }
        if p.spec.selector.is_some() {
            return Err(invalid(
                format!("{field}[{i}].spec.selector"),
                "a policy in the proxy's own file applies to this proxy: leave the selector out",
            ));
        }
        if let Some(finding) = check(&p.spec).into_iter().next() {
            return Err(invalid(
                format!("{field}[{i}].{}", finding.field),
                finding.problem,
            ));
        }
    }
    let applicable: Vec<Applicable<'_>> = policies
        .iter()
        .map(|p| Applicable {
            namespace,
            name: &p.name,
            spec: &p.spec,
        })
        .collect();
    Ok(crate::ListenerAuthorization {
        http: Arc::new(authorization(&applicable, Layer::Http)),
        tcp: Arc::new(authorization(&applicable, Layer::Tcp)),
    })
}

fn validate_clusters(clusters: Vec<ClusterFile>) -> Result<HashMap<String, Arc<Cluster>>, Invalid> {
    let mut by_name = HashMap::new();
    for (i, c) in clusters.into_iter().enumerate() {
        if c.name.is_empty() {
            return Err(invalid(format!("clusters[{i}].name"), "must not be empty"));
        }
        let endpoints: Vec<crate::Endpoint> = c.endpoints.iter().map(EndpointFile::endpoint).collect();
        for (j, ep) in endpoints.iter().map(|e| e.address).enumerate() {
            if ep.port() == 0 || ep.ip().is_unspecified() {
                return Err(invalid(
                    format!("clusters[{i}].endpoints[{j}]"),
                    format!("{ep} is not a connectable address"),
                ));
            }
        }
        if c.connect_timeout == Some(Duration::ZERO) {
            return Err(invalid(
                format!("clusters[{i}].connect_timeout"),
                "must be greater than 0",
            ));
        }
        let tls = match &c.tls {
            Some(t) => {
                if t.identities.is_empty() {
                    return Err(invalid(
                        format!("clusters[{i}].tls.identities"),
                        "name at least one identity to expect",
                    ));
                }
                let mut identities = Vec::with_capacity(t.identities.len());
                for (j, id) in t.identities.iter().enumerate() {
                    let id = id
                        .parse::<weft_identity::SpiffeId>()
                        .map_err(|e| invalid(format!("clusters[{i}].tls.identities[{j}]"), e.to_string()))?;
                    identities.push(id);
                }
                Some(crate::UpstreamTls {
                    identities: identities.into(),
                    http2_upgrade: t.http2_upgrade,
                })
            }
            None => None,
        };
        let cluster = Cluster {
            name: c.name.clone(),
            endpoints,
            tls,
            lb_policy: c.lb_policy,
            connect_timeout: c.connect_timeout.unwrap_or(DEFAULT_CONNECT_TIMEOUT),
            idle_timeout: c.idle_timeout.unwrap_or(DEFAULT_UPSTREAM_IDLE_TIMEOUT),
            circuit_breakers: c.circuit_breakers,
            outlier_detection: c.outlier_detection,
            panic_threshold_percent: c
                .panic_threshold_percent
                .unwrap_or(crate::policy::DEFAULT_PANIC_THRESHOLD_PERCENT),
        };
        if !(0.0..=100.0).contains(&cluster.panic_threshold_percent) {
            return Err(invalid(
                format!("clusters[{i}].panic_threshold_percent"),
                "must be between 0 and 100",
            ));
        }
        if !(0.0..=100.0).contains(&cluster.circuit_breakers.retry_budget.budget_percent) {
            return Err(invalid(
                format!("clusters[{i}].circuit_breakers.retry_budget.budget_percent"),
                "must be between 0 and 100",
            ));
        }
        if cluster.outlier_detection.is_some_and(|o| o.interval.is_zero()) {
            return Err(invalid(
                format!("clusters[{i}].outlier_detection.interval"),
                "must be greater than 0",
            ));
        }
        if by_name.insert(c.name.clone(), Arc::new(cluster)).is_some() {
            return Err(invalid(
                format!("clusters[{i}].name"),
                format!("duplicate cluster name \"{}\"", c.name),
            ));
        }
    }
    Ok(by_name)
}

/// The root for an `https://` control plane address: required there, pointless elsewhere.
fn read_root(field: &str, address: &str, path: Option<&Path>) -> Result<Option<String>, Invalid> {
    match (address.starts_with("https://"), path) {
        (true, None) => Err(invalid(
            field,
            format!("{address} is https: give the root to verify it with"),
        )),
        (_, None) => Ok(None),
        (_, Some(path)) => std::fs::read_to_string(path)
            .map(Some)
            .map_err(|e| invalid(field, format!("{}: {e}", path.display()))),
    }
}

fn resolve_identity(i: IdentityFile, node: &Node) -> Result<crate::IdentitySource, Invalid> {
    if !(i.ca_address.starts_with("http://") || i.ca_address.starts_with("https://")) {
        return Err(invalid(
            "identity.ca_address",
            format!("\"{}\" must start with http:// or https://", i.ca_address),
        ));
    }
    let token = match (i.token, i.token_file) {
        (Some(t), None) => t,
        (None, Some(path)) => std::fs::read_to_string(&path)
            .map(|t| t.trim().to_owned())
            .map_err(|e| invalid("identity.token_file", format!("{}: {e}", path.display())))?,
        _ => return Err(invalid("identity", "give exactly one of token, token_file")),
    };
    let trust_domain = i.trust_domain.unwrap_or_else(|| DEFAULT_TRUST_DOMAIN.to_owned());
    let id = weft_identity::SpiffeId::new(&trust_domain, &node.namespace, &node.service_account)
        .map_err(|e| invalid("identity.trust_domain", e.to_string()))?;
    Ok(crate::IdentitySource {
        ca_root_pem: read_root("identity.ca_root_file", &i.ca_address, i.ca_root_file.as_deref())?,
        ca_address: i.ca_address,
        token,
        id: id.to_string(),
        validity: i.validity.unwrap_or(DEFAULT_CERT_VALIDITY),
    })
}

fn resolve_target(
    field: &str,
    t: &TargetFile,
    clusters: &HashMap<String, Arc<Cluster>>,
    routes: &HashMap<String, Arc<RouteTable>>,
    http: HttpSettings,
) -> Result<crate::Target, Invalid> {
    let cluster = match &t.cluster {
        Some(name) => Some(
            clusters
                .get(name)
                .cloned()
                .ok_or_else(|| invalid(format!("{field}.cluster"), format!("unknown cluster \"{name}\"")))?,
        ),
        None => None,
    };
    let route = match (&t.route, &cluster) {
        (Some(name), _) => routes
            .get(name)
            .cloned()
            .ok_or_else(|| invalid(format!("{field}.route"), format!("unknown route \"{name}\"")))?,
        (None, Some(cluster)) => Arc::new(RouteTable::to_cluster(cluster)),
        (None, None) => return Err(invalid(field, "needs a `cluster`, a `route`, or both")),
    };
    Ok(crate::Target {
        protocol: t.protocol,
        cluster,
        route,
        http,
    })
}

fn validate_routes(
    tables: Vec<RouteTableFile>,
    clusters: &HashMap<String, Arc<Cluster>>,
) -> Result<HashMap<String, Arc<RouteTable>>, Invalid> {
    let mut by_name = HashMap::new();
    for (i, table) in tables.into_iter().enumerate() {
        let mut virtual_hosts = Vec::new();
        for (j, vh) in table.virtual_hosts.into_iter().enumerate() {
            let mut routes = Vec::new();
            for (k, r) in vh.routes.into_iter().enumerate() {
                let field = format!("routes[{i}].virtual_hosts[{j}].routes[{k}]");
                routes.push(validate_route(&field, r, clusters)?);
            }
            virtual_hosts.push(VirtualHost {
                name: vh.name,
                domains: vh.domains,
                routes,
            });
        }
        let name = table.name.clone();
        if by_name
            .insert(name.clone(), Arc::new(RouteTable::new(table.name, virtual_hosts)))
            .is_some()
        {
            return Err(invalid(
                format!("routes[{i}].name"),
                format!("duplicate route name \"{name}\""),
            ));
        }
    }
    Ok(by_name)
}

fn validate_route(
    field: &str,
    r: RouteFile,
    clusters: &HashMap<String, Arc<Cluster>>,
) -> Result<Route, Invalid> {
    let regex = |f: String, pattern: &str| {
        compile_regex(pattern).map_err(|e| invalid(f, format!("invalid regex: {e}")))
    };
    let m = &r.matcher;
    let path = match (&m.prefix, &m.path, &m.regex) {
        (None, None, None) => PathMatch::default(),
        (Some(p), None, None) => PathMatch::Prefix(p.clone()),
        (None, Some(p), None) => PathMatch::Exact(p.clone()),
        (None, None, Some(re)) => PathMatch::Regex(regex(format!("{field}.match.regex"), re)?),
        _ => {
            return Err(invalid(
                format!("{field}.match"),
                "give at most one of prefix, path, regex",
            ));
        }
    };
    let mut headers = Vec::new();
    for (h, hm) in m.headers.iter().enumerate() {
        let f = format!("{field}.match.headers[{h}]");
        let value = match (&hm.exact, &hm.prefix, &hm.suffix, &hm.regex, hm.present) {
            (Some(v), None, None, None, false) => ValueMatch::Exact(v.clone()),
            (None, Some(v), None, None, false) => ValueMatch::Prefix(v.clone()),
            (None, None, Some(v), None, false) => ValueMatch::Suffix(v.clone()),
            (None, None, None, Some(re), false) => ValueMatch::Regex(regex(format!("{f}.regex"), re)?),
            (None, None, None, None, true) => ValueMatch::Present,
            _ => {
                return Err(invalid(
                    f,
                    "give exactly one of exact, prefix, suffix, regex, present",
                ));
            }
        };
        headers.push(HeaderMatch {
            name: hm.name.to_ascii_lowercase(),
            value,
            invert: hm.invert,
        });
    }
    let weighted: Vec<(String, u32)> = match (&r.cluster, r.clusters.is_empty()) {
        (Some(c), true) => vec![(c.clone(), 1)],
        (None, false) => r.clusters.iter().map(|c| (c.name.clone(), c.weight)).collect(),
        _ => return Err(invalid(field, "give either `cluster` or `clusters`")),
    };
    let mut targets = Vec::new();
    for (w, (name, weight)) in weighted.into_iter().enumerate() {
        let cluster = clusters.get(&name).cloned().ok_or_else(|| {
            let f = if r.cluster.is_some() {
                format!("{field}.cluster")
            } else {
                format!("{field}.clusters[{w}].name")
            };
            invalid(f, format!("unknown cluster \"{name}\""))
        })?;
        targets.push(WeightedCluster {
            name,
            cluster: Some(cluster),
            weight,
        });
    }
    if targets.iter().all(|t| t.weight == 0) {
        return Err(invalid(format!("{field}.clusters"), "weights must not all be 0"));
    }
    Ok(Route {
        name: r.name.unwrap_or_default(),
        matcher: RouteMatch { path, headers },
        action: RouteAction {
            clusters: targets,
            timeout: Some(r.timeout.unwrap_or(DEFAULT_ROUTE_TIMEOUT)).filter(|t| !t.is_zero()),
            idle_timeout: r.idle_timeout,
            retry: r.retry,
        },
    })
}

/// Two of our own listeners on one address would fail at bind time with a less helpful message.
fn check_distinct_addresses(
    bootstrap: &Bootstrap,
    outbound: Option<&OutboundPolicy>,
    inbound: Option<&InboundPolicy>,
    listeners: &[ExplicitListener],
) -> Result<(), Invalid> {
    let mut seen: HashMap<SocketAddr, String> = HashMap::new();
    let mut claim = |addr: SocketAddr, field: String| -> Result<(), Invalid> {
        if addr.port() == 0 {
            return Ok(()); // an ephemeral port never collides
        }
        match seen.insert(addr, field.clone()) {
            Some(other) => Err(invalid(
                field,
                format!("address {addr} is also used by `{other}`"),
            )),
            None => Ok(()),
        }
    };
    claim(bootstrap.admin_address, "admin.address".into())?;
    claim(bootstrap.readiness_address, "readiness.address".into())?;
    if let Some(o) = outbound {
        claim(o.address, "outbound.address".into())?;
    }
    if let Some(i) = inbound {
        claim(i.address, "inbound.address".into())?;
    }
    for (i, l) in listeners.iter().enumerate() {
        claim(l.address, format!("listeners[{i}].address"))?;
    }
    Ok(())
}

impl NodeFile {
    /// Fills what the file leaves out from the Istio-style environment of a pod.
    fn resolve(self) -> Node {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let workload = self
            .workload
            .or_else(|| env("POD_NAME"))
            .unwrap_or_else(|| "unknown".into());
        let namespace = self
            .namespace
            .or_else(|| env("POD_NAMESPACE"))
            .unwrap_or_else(|| "default".into());
        let service_account = self
            .service_account
            .or_else(|| env("SERVICE_ACCOUNT"))
            .unwrap_or_else(|| "default".into());
        let id = self.id.unwrap_or_else(|| {
            format!(
                "sidecar~{}~{workload}.{namespace}",
                env("INSTANCE_IP").unwrap_or_default()
            )
        });
        Node {
            id,
            workload,
            namespace,
            service_account,
        }
    }
}
