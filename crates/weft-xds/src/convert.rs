//! xDS resources to Weft's model: pure functions, one resource at a time, each rejected on its own with
//! the resource, the field and the problem named. What is supported is listed in `docs/xds.md`; anything
//! else that would change behaviour is rejected rather than silently ignored.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3::Cluster as XCluster;
use envoy_types::pb::envoy::config::cluster::v3::cluster::{ClusterDiscoveryType, DiscoveryType, LbPolicy as XLbPolicy};
use envoy_types::pb::envoy::config::core::v3::address::Address as XAddressKind;
use envoy_types::pb::envoy::config::core::v3::socket_address::PortSpecifier;
use envoy_types::pb::envoy::config::core::v3::{Address, HealthStatus};
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::endpoint::v3::lb_endpoint::HostIdentifier;
use envoy_types::pb::envoy::config::listener::v3::filter::ConfigType;
use envoy_types::pb::envoy::config::listener::v3::{FilterChain, Listener};
use envoy_types::pb::envoy::config::route::v3::header_matcher::HeaderMatchSpecifier;
use envoy_types::pb::envoy::config::route::v3::route::Action;
use envoy_types::pb::envoy::config::route::v3::route_action::ClusterSpecifier;
use envoy_types::pb::envoy::config::route::v3::route_match::PathSpecifier;
use envoy_types::pb::envoy::config::route::v3::{HeaderMatcher, RouteConfiguration};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::HttpConnectionManager;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::http_connection_manager::RouteSpecifier;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::http_filter::ConfigType as HttpFilterConfig;
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::TcpProxy;
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::tcp_proxy::ClusterSpecifier as TcpClusterSpecifier;
use envoy_types::pb::envoy::r#type::matcher::v3::StringMatcher;
use envoy_types::pb::envoy::r#type::matcher::v3::string_matcher::MatchPattern;
use envoy_types::pb::google::protobuf::{Any, Duration as XDuration};
use prost::{Message, Name};
use weft_model::route::{
    DEFAULT_ROUTE_TIMEOUT, DEFAULT_STREAM_IDLE_TIMEOUT, HeaderMatch, PathMatch, RetryPolicy, Route, RouteAction, RouteMatch, RouteTable, ValueMatch,
    VirtualHost, WeightedCluster, compile_regex,
};
use envoy_types::pb::envoy::config::core::v3::{TransportSocket, transport_socket};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{DownstreamTlsContext, UpstreamTlsContext};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::common_tls_context::ValidationContextType;
use envoy_types::pb::envoy::config::route::v3::RetryPolicy as XRetryPolicy;
use envoy_types::pb::envoy::extensions::upstreams::http::v3::HttpProtocolOptions;
use envoy_types::pb::envoy::extensions::upstreams::http::v3::http_protocol_options::UpstreamProtocolOptions;
use envoy_types::pb::envoy::extensions::upstreams::http::v3::http_protocol_options::explicit_http_config::ProtocolConfig;
use weft_model::{
    Backoff, CircuitBreakers, Egress, Endpoint, HttpSettings, LbPolicy, ListenerAuthorization, OutlierDetection, PeerAuthentication,
    Protocol, RetryBudget, RetryOn, UpstreamTls,
};

mod rbac;

const HCM: &str = "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";
const TCP_PROXY: &str = "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy";
const ROUTER: &str = "envoy.extensions.filters.http.router.v3.Router";
/// Istio's names for the egress catch-alls.
pub const PASSTHROUGH_CLUSTER: &str = "PassthroughCluster";
pub const BLACKHOLE_CLUSTER: &str = "BlackHoleCluster";
/// Istio's names for the capture listeners.
pub const VIRTUAL_OUTBOUND: &str = "virtualOutbound";
pub const VIRTUAL_INBOUND: &str = "virtualInbound";

/// A rejected resource.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind} \"{name}\": {field}: {problem}")]
pub struct ResourceError {
    pub kind: &'static str,
    pub name: String,
    pub field: String,
    pub problem: String,
}

/// Builds errors for one resource.
struct Ctx<'a> {
    kind: &'static str,
    name: &'a str,
}

impl Ctx<'_> {
    fn err(&self, field: impl Into<String>, problem: impl Into<String>) -> ResourceError {
        ResourceError {
            kind: self.kind,
            name: self.name.to_owned(),
            field: field.into(),
            problem: problem.into(),
        }
    }
}

/// Decodes an `Any` of the expected type.
pub fn decode<M: Message + Name + Default>(any: &Any) -> Result<M, ResourceError> {
    let expected = M::type_url();
    if any.type_url != expected {
        return Err(ResourceError {
            kind: M::NAME,
            name: String::new(),
            field: "type_url".into(),
            problem: format!("expected {expected}, got {}", any.type_url),
        });
    }
    M::decode(any.value.as_slice()).map_err(|e| ResourceError {
        kind: M::NAME,
        name: String::new(),
        field: "value".into(),
        problem: format!("cannot decode: {e}"),
    })
}

/// What a listener means to the proxy.
#[derive(Debug, Clone, PartialEq)]
pub enum ListenerSpec {
    /// A service the app reaches at `address` (Istio's per-port outbound listeners, `bind_to_port: false`).
    Service {
        address: SocketAddr,
        http: Option<RouteRef>,
        http_settings: HttpSettings,
        tcp_cluster: Option<String>,
        protocol: Protocol,
    },
    /// The outbound capture listener: its catch-all chain decides egress.
    VirtualOutbound { egress: Egress },
    /// The inbound capture listener: the app's ports and their protocols.
    VirtualInbound {
        ports: HashMap<u16, Protocol>,
        peer_authentication: Option<PeerAuthentication>,
        authorization: ListenerAuthorization,
        /// The HTTP connection managers' settings, when any chain has one.
        http_settings: Option<HttpSettings>,
    },
}

/// Where an HTTP connection manager gets its routes.
#[derive(Debug, Clone)]
pub enum RouteRef {
    Rds(String),
    Inline(RouteTable),
}

impl PartialEq for RouteRef {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (RouteRef::Rds(a), RouteRef::Rds(b)) => a == b,
            (RouteRef::Inline(a), RouteRef::Inline(b)) => a.name == b.name,
            _ => false,
        }
    }
}

/// A cluster before its endpoints are known.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterSpec {
    pub name: String,
    /// The ClusterLoadAssignment name to wait for (EDS); `None` for static clusters.
    pub eds_name: Option<String>,
    pub static_endpoints: Vec<Endpoint>,
    pub lb_policy: LbPolicy,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    pub tls: Option<UpstreamTls>,
    pub circuit_breakers: CircuitBreakers,
    pub outlier_detection: Option<OutlierDetection>,
    pub panic_threshold_percent: f64,
    pub max_requests_per_connection: Option<u32>,
}

pub fn listener(l: &Listener) -> Result<ListenerSpec, ResourceError> {
    let ctx = Ctx {
        kind: "Listener",
        name: &l.name,
    };
    if l.name.is_empty() {
        return Err(ctx.err("name", "must not be empty"));
    }
    let use_original_dst = l.use_original_dst.as_ref().is_some_and(|b| b.value);
    if l.name == VIRTUAL_OUTBOUND || (use_original_dst && l.name != VIRTUAL_INBOUND) {
        let chain = l.default_filter_chain.as_ref().or(l.filter_chains.last());
        let egress = match chain
            .map(|c| chain_targets(&ctx, "default_filter_chain", c, false))
            .transpose()?
        {
            Some(ChainTargets {
                tcp_cluster: Some(c), ..
            }) if c == BLACKHOLE_CLUSTER => Egress::RegistryOnly,
            _ => Egress::AllowAny,
        };
        return Ok(ListenerSpec::VirtualOutbound { egress });
    }
    if l.name == VIRTUAL_INBOUND {
        let mut ports = HashMap::new();
        let (mut tls, mut plaintext) = (false, false);
        // Every chain's RBAC filters, HTTP and TCP apart: the proxy enforces one set per layer for the
        // workload, so chains that disagree are refused rather than merged.
        let mut http_rbac: Option<(String, Vec<weft_authz::RbacFilter>)> = None;
        let mut tcp_rbac: Option<(String, Vec<weft_authz::RbacFilter>)> = None;
        let mut http_settings: Option<(String, HttpSettings)> = None;
        for (i, chain) in l.filter_chains.iter().enumerate() {
            let field = format!("filter_chains[{i}]");
            // A chain that terminates TLS must be mutual TLS; the proxy uses its own certificate for it.
            let mut chain = chain.clone();
            let terminates = match chain.transport_socket.take() {
                Some(socket) => {
                    downstream_mtls(&ctx, &format!("{field}.transport_socket"), &socket)?;
                    true
                }
                None => false,
            };
            let targets = chain_targets(&ctx, &field, &chain, true)?;
            match (&http_settings, targets.http_settings) {
                (Some((first, seen)), Some(these)) if *seen != these => {
                    return Err(ctx.err(
                        format!("{field}.filters"),
                        format!(
                            "HTTP connection manager timeouts differ from those of {first}; the inbound listener has one setting"
                        ),
                    ));
                }
                (None, Some(these)) => http_settings = Some((field.clone(), these)),
                _ => {}
            }
            let (layer, rbac) = if targets.http.is_some() {
                (&mut http_rbac, targets.http_rbac)
            } else {
                (&mut tcp_rbac, targets.tcp_rbac)
            };
            match layer {
                Some((first, seen)) if *seen != rbac => {
                    return Err(ctx.err(
                        format!("{field}.filters"),
                        format!(
                            "RBAC filters differ from those of {first}; one workload has one policy per layer"
                        ),
                    ));
                }
                Some(_) => {}
                None => *layer = Some((field.clone(), rbac)),
            }
            let Some(port) = chain
                .filter_chain_match
                .as_ref()
                .and_then(|m| m.destination_port.as_ref())
            else {
                continue; // chains without a port are the catch-all: detect
            };
            let port = u16::try_from(port.value)
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| {
                    ctx.err(
                        format!("{field}.filter_chain_match.destination_port"),
                        "not a port",
                    )
                })?;
            if terminates {
                tls = true;
            } else {
                plaintext = true;
            }
            let protocol = if targets.http.is_some() {
                Protocol::Http
            } else {
                Protocol::Tcp
            };
            ports.insert(port, protocol);
        }
        // Istio's shapes: TLS chains only (STRICT), both (PERMISSIVE), plaintext only (DISABLE).
        let peer_authentication = match (tls, plaintext) {
            (true, false) => Some(PeerAuthentication::Strict),
            (true, true) => Some(PeerAuthentication::Permissive),
            (false, true) => Some(PeerAuthentication::Disable),
            (false, false) => None,
        };
        let filters = |layer: Option<(String, Vec<weft_authz::RbacFilter>)>| layer.map(|(_, f)| f);
        let (http, tcp) = (filters(http_rbac), filters(tcp_rbac));
        let authorization = ListenerAuthorization {
            http: std::sync::Arc::new(weft_authz::Authorization {
                filters: http.clone().unwrap_or_else(|| deny_all_if_any(tcp.as_deref())),
            }),
            tcp: std::sync::Arc::new(weft_authz::Authorization {
                filters: tcp.unwrap_or_else(|| deny_all_if_any(http.as_deref())),
            }),
        };
        return Ok(ListenerSpec::VirtualInbound {
            ports,
            peer_authentication,
            authorization,
            http_settings: http_settings.map(|(_, s)| s),
        });
    }
    if l.bind_to_port.as_ref().is_some_and(|b| b.value) {
        return Err(ctx.err(
            "bind_to_port",
            "listeners that bind their own port are not supported over xDS; use bind_to_port: false listeners reached through the capture listener",
        ));
    }
    let address = socket_address(&ctx, "address", l.address.as_ref())?;
    let mut http = None;
    let mut http_settings = None;
    let mut tcp_cluster = None;
    for (i, chain) in l
        .filter_chains
        .iter()
        .chain(l.default_filter_chain.iter())
        .enumerate()
    {
        let targets = chain_targets(&ctx, &format!("filter_chains[{i}]"), chain, false)?;
        http = http.or(targets.http);
        http_settings = http_settings.or(targets.http_settings);
        tcp_cluster = tcp_cluster.or(targets.tcp_cluster);
    }
    let protocol = match (&http, &tcp_cluster) {
        (Some(_), Some(_)) => Protocol::Detect,
        (Some(_), None) => Protocol::Http,
        (None, Some(_)) => Protocol::Tcp,
        (None, None) => return Err(ctx.err("filter_chains", "no HTTP connection manager or TCP proxy")),
    };
    Ok(ListenerSpec::Service {
        address,
        http,
        http_settings: http_settings.unwrap_or_default(),
        tcp_cluster,
        protocol,
    })
}

/// The other layer of an inbound listener has no chain of its own: when this one enforces anything, the
/// other denies everything (fail closed) rather than allowing what no policy was written for.
fn deny_all_if_any(other: Option<&[weft_authz::RbacFilter]>) -> Vec<weft_authz::RbacFilter> {
    match other {
        Some(filters) if !filters.is_empty() => vec![weft_authz::RbacFilter {
            rules: Some(weft_authz::Rbac {
                action: weft_authz::Action::Allow,
                policies: Vec::new(),
            }),
            shadow: None,
        }],
        _ => Vec::new(),
    }
}

struct ChainTargets {
    http: Option<RouteRef>,
    /// The connection manager's timeouts, with `http`.
    http_settings: Option<HttpSettings>,
    tcp_cluster: Option<String>,
    /// RBAC filters of the HTTP connection manager, in order.
    http_rbac: Vec<weft_authz::RbacFilter>,
    /// Network RBAC filters in front of the TCP proxy, in order.
    tcp_rbac: Vec<weft_authz::RbacFilter>,
}

fn chain_targets(
    ctx: &Ctx<'_>,
    field: &str,
    chain: &FilterChain,
    inbound: bool,
) -> Result<ChainTargets, ResourceError> {
    if chain.transport_socket.is_some() {
        return Err(ctx.err(
            format!("{field}.transport_socket"),
            "TLS termination is not supported yet",
        ));
    }
    let mut targets = ChainTargets {
        http: None,
        http_settings: None,
        tcp_cluster: None,
        http_rbac: Vec::new(),
        tcp_rbac: Vec::new(),
    };
    let rbac_here = |f: &str| -> Result<(), ResourceError> {
        if inbound {
            Ok(())
        } else {
            Err(ctx.err(
                f,
                "RBAC is enforced on the inbound listener (virtualInbound) only",
            ))
        }
    };
    for (i, filter) in chain.filters.iter().enumerate() {
        let f = format!("{field}.filters[{i}]");
        let Some(ConfigType::TypedConfig(any)) = &filter.config_type else {
            return Err(ctx.err(format!("{f}.typed_config"), "missing"));
        };
        let type_name = any.type_url.rsplit('/').next().unwrap_or_default();
        match type_name {
            HCM => {
                let hcm: HttpConnectionManager =
                    decode(any).map_err(|e| ctx.err(format!("{f}.typed_config"), e.problem))?;
                if !targets.tcp_rbac.is_empty() {
                    return Err(ctx.err(
                        f.clone(),
                        "a network RBAC filter in front of an HTTP connection manager is not supported; use envoy.filters.http.rbac",
                    ));
                }
                targets.http_rbac =
                    http_filters(ctx, &format!("{f}.typed_config.http_filters"), &hcm, &rbac_here)?;
                targets.http_settings = Some(hcm_settings(&hcm));
                targets.http = Some(match hcm.route_specifier {
                    Some(RouteSpecifier::Rds(rds)) if !rds.route_config_name.is_empty() => {
                        RouteRef::Rds(rds.route_config_name)
                    }
                    Some(RouteSpecifier::RouteConfig(rc)) => RouteRef::Inline(
                        route_configuration(&rc)
                            .map_err(|e| ctx.err(format!("{f}.route_config.{}", e.field), e.problem))?,
                    ),
                    _ => {
                        return Err(ctx.err(
                            format!("{f}.route_specifier"),
                            "needs rds.route_config_name or route_config",
                        ));
                    }
                });
            }
            TCP_PROXY => {
                let tcp: TcpProxy =
                    decode(any).map_err(|e| ctx.err(format!("{f}.typed_config"), e.problem))?;
                match tcp.cluster_specifier {
                    Some(TcpClusterSpecifier::Cluster(c)) if !c.is_empty() => targets.tcp_cluster = Some(c),
                    _ => {
                        return Err(ctx.err(
                            format!("{f}.cluster"),
                            "a TCP proxy needs one cluster (weighted_clusters are not supported)",
                        ));
                    }
                }
            }
            rbac::NETWORK_RBAC => {
                rbac_here(&format!("{f}.typed_config"))?;
                let config = decode(any).map_err(|e| ctx.err(format!("{f}.typed_config"), e.problem))?;
                let filter = rbac::network_filter(&config)
                    .map_err(|(field, problem)| ctx.err(format!("{f}.typed_config.{field}"), problem))?;
                targets.tcp_rbac.push(filter);
            }
            other => {
                return Err(ctx.err(
                    format!("{f}.typed_config"),
                    format!("unsupported network filter {other}"),
                ));
            }
        }
    }
    Ok(targets)
}

/// The connection manager's timeouts, with Envoy's meaning of unset (the default) and zero (disabled),
/// except that an unset `request_headers_timeout` keeps the proxy's slowloris default.
fn hcm_settings(hcm: &HttpConnectionManager) -> HttpSettings {
    let setting = |d: Option<&XDuration>, default: Duration| match d {
        None => Some(default),
        Some(d) => Some(duration(d)).filter(|d| !d.is_zero()),
    };
    HttpSettings {
        request_headers_timeout: setting(
            hcm.request_headers_timeout.as_ref(),
            weft_model::defaults::DEFAULT_REQUEST_HEADERS_TIMEOUT,
        ),
        stream_idle_timeout: setting(hcm.stream_idle_timeout.as_ref(), DEFAULT_STREAM_IDLE_TIMEOUT),
    }
}

/// The HTTP filters of a connection manager: RBAC filters are enforced, the router ends the chain, and
/// any other filter is refused unless it is marked `is_optional` (Envoy's rule), since a filter the
/// proxy skipped would look as if it worked.
fn http_filters(
    ctx: &Ctx<'_>,
    field: &str,
    hcm: &HttpConnectionManager,
    rbac_here: &dyn Fn(&str) -> Result<(), ResourceError>,
) -> Result<Vec<weft_authz::RbacFilter>, ResourceError> {
    let mut filters = Vec::new();
    for (i, filter) in hcm.http_filters.iter().enumerate() {
        let f = format!("{field}[{i}]");
        let type_name = match &filter.config_type {
            Some(HttpFilterConfig::TypedConfig(any)) => any.type_url.rsplit('/').next().unwrap_or_default(),
            _ => "",
        };
        let is_router = type_name == ROUTER || filter.name == "envoy.filters.http.router";
        if is_router {
            if i + 1 != hcm.http_filters.len() {
                return Err(ctx.err(f, "the router must be the last HTTP filter"));
            }
            continue;
        }
        if type_name == rbac::HTTP_RBAC {
            rbac_here(&f)?;
            if filter.disabled {
                return Err(ctx.err(
                    format!("{f}.disabled"),
                    "an RBAC filter enabled per route is not supported",
                ));
            }
            let Some(HttpFilterConfig::TypedConfig(any)) = &filter.config_type else {
                return Err(ctx.err(format!("{f}.typed_config"), "missing"));
            };
            let config = decode(any).map_err(|e| ctx.err(format!("{f}.typed_config"), e.problem))?;
            let decoded = rbac::http_filter(&config)
                .map_err(|(field, problem)| ctx.err(format!("{f}.typed_config.{field}"), problem))?;
            filters.push(decoded);
            continue;
        }
        if filter.is_optional {
            tracing::info!(filter = %filter.name, "skipping an optional HTTP filter the proxy does not implement (is_optional)");
            continue;
        }
        let what = if type_name.is_empty() {
            filter.name.as_str()
        } else {
            type_name
        };
        return Err(ctx.err(
            f,
            format!("unsupported HTTP filter {what} (mark it is_optional to let the proxy skip it)"),
        ));
    }
    Ok(filters)
}

pub fn route_configuration(rc: &RouteConfiguration) -> Result<RouteTable, ResourceError> {
    let ctx = Ctx {
        kind: "RouteConfiguration",
        name: &rc.name,
    };
    let mut virtual_hosts = Vec::new();
    for (i, vh) in rc.virtual_hosts.iter().enumerate() {
        let mut routes = Vec::new();
        for (j, r) in vh.routes.iter().enumerate() {
            routes.push(route(
                &ctx,
                &format!("virtual_hosts[{i}].routes[{j}]"),
                r,
                vh.retry_policy.as_ref(),
            )?);
        }
        let domains = vh.domains.iter().map(|d| d.to_ascii_lowercase()).collect();
        virtual_hosts.push(VirtualHost {
            name: vh.name.clone(),
            domains,
            routes,
        });
    }
    Ok(RouteTable::new(rc.name.clone(), virtual_hosts))
}

fn route(
    ctx: &Ctx<'_>,
    field: &str,
    r: &envoy_types::pb::envoy::config::route::v3::Route,
    vhost_retry: Option<&envoy_types::pb::envoy::config::route::v3::RetryPolicy>,
) -> Result<Route, ResourceError> {
    let m = r
        .r#match
        .as_ref()
        .ok_or_else(|| ctx.err(format!("{field}.match"), "required"))?;
    if m.case_sensitive.as_ref().is_some_and(|c| !c.value) {
        return Err(ctx.err(
            format!("{field}.match.case_sensitive"),
            "case-insensitive path matching is not supported",
        ));
    }
    if !m.query_parameters.is_empty() || m.grpc.is_some() || m.runtime_fraction.is_some() {
        return Err(ctx.err(
            format!("{field}.match"),
            "query_parameters, grpc and runtime_fraction matches are not supported",
        ));
    }
    let path = match &m.path_specifier {
        Some(PathSpecifier::Prefix(p)) => PathMatch::Prefix(p.clone()),
        Some(PathSpecifier::Path(p)) => PathMatch::Exact(p.clone()),
        Some(PathSpecifier::SafeRegex(re)) => PathMatch::Regex(
            compile_regex(&re.regex)
                .map_err(|e| ctx.err(format!("{field}.match.safe_regex"), format!("invalid regex: {e}")))?,
        ),
        _ => {
            return Err(ctx.err(
                format!("{field}.match.path_specifier"),
                "needs prefix, path or safe_regex",
            ));
        }
    };
    let mut headers = Vec::new();
    for (k, h) in m.headers.iter().enumerate() {
        headers.push(header_match(ctx, &format!("{field}.match.headers[{k}]"), h)?);
    }
    let action = match &r.action {
        Some(Action::Route(a)) => a,
        _ => {
            return Err(ctx.err(
                format!("{field}.action"),
                "only route actions are supported (not redirect or direct_response)",
            ));
        }
    };
    let clusters = match &action.cluster_specifier {
        Some(ClusterSpecifier::Cluster(c)) if !c.is_empty() => vec![WeightedCluster {
            name: c.clone(),
            cluster: None,
            weight: 1,
        }],
        Some(ClusterSpecifier::WeightedClusters(w)) if !w.clusters.is_empty() => w
            .clusters
            .iter()
            .map(|c| WeightedCluster {
                name: c.name.clone(),
                cluster: None,
                weight: c.weight.as_ref().map_or(1, |w| w.value),
            })
            .collect(),
        _ => {
            return Err(ctx.err(
                format!("{field}.route.cluster_specifier"),
                "needs cluster or weighted_clusters",
            ));
        }
    };
    if clusters.iter().all(|c| c.weight == 0) {
        return Err(ctx.err(
            format!("{field}.route.weighted_clusters"),
            "weights must not all be 0",
        ));
    }
    // Envoy: unset means 15 s; 0 disables.
    let timeout = match &action.timeout {
        None => Some(DEFAULT_ROUTE_TIMEOUT),
        Some(d) => Some(duration(d)).filter(|d| !d.is_zero()),
    };
    // Envoy: unset means the connection manager's stream idle timeout; 0 disables.
    let idle_timeout = action.idle_timeout.as_ref().map(duration);
    let retry = action
        .retry_policy
        .as_ref()
        .or(vhost_retry)
        .map(|p| retry_policy(ctx, &format!("{field}.route.retry_policy"), p))
        .transpose()?;
    Ok(Route {
        name: r.name.clone(),
        matcher: RouteMatch { path, headers },
        action: RouteAction {
            clusters,
            timeout,
            idle_timeout,
            retry,
        },
    })
}

/// Envoy's `RetryPolicy`. Every retry prefers another endpoint, so the host predicates Istio sends
/// (`previous_hosts`) need no configuration.
fn retry_policy(ctx: &Ctx<'_>, field: &str, p: &XRetryPolicy) -> Result<RetryPolicy, ResourceError> {
    let retry_on: RetryOn = p
        .retry_on
        .parse()
        .map_err(|e: String| ctx.err(format!("{field}.retry_on"), e))?;
    let mut retriable_status_codes = Vec::with_capacity(p.retriable_status_codes.len());
    for code in &p.retriable_status_codes {
        match u16::try_from(*code) {
            Ok(code @ 100..=599) => retriable_status_codes.push(code),
            _ => {
                return Err(ctx.err(
                    format!("{field}.retriable_status_codes"),
                    format!("{code} is not an HTTP status"),
                ));
            }
        }
    }
    let mut backoff = Backoff::default();
    if let Some(b) = &p.retry_back_off {
        if let Some(base) = b.base_interval.as_ref().map(duration) {
            if base.is_zero() {
                return Err(ctx.err(
                    format!("{field}.retry_back_off.base_interval"),
                    "must be greater than 0",
                ));
            }
            backoff = Backoff {
                base_interval: base,
                max_interval: base * 10,
            };
        }
        if let Some(max) = b.max_interval.as_ref().map(duration) {
            if max < backoff.base_interval {
                return Err(ctx.err(
                    format!("{field}.retry_back_off.max_interval"),
                    "must not be less than base_interval",
                ));
            }
            backoff.max_interval = max;
        }
    }
    Ok(RetryPolicy {
        retry_on,
        num_retries: p.num_retries.as_ref().map_or(1, |n| n.value),
        per_try_timeout: p.per_try_timeout.as_ref().map(duration).filter(|d| !d.is_zero()),
        retriable_status_codes,
        backoff,
    })
}

// The deprecated matchers are still what many control planes send; Envoy accepts them, so do we.
#[allow(deprecated)]
fn header_match(ctx: &Ctx<'_>, field: &str, h: &HeaderMatcher) -> Result<HeaderMatch, ResourceError> {
    let regex = |re: &str| compile_regex(re).map_err(|e| ctx.err(field, format!("invalid regex: {e}")));
    let value = match &h.header_match_specifier {
        Some(HeaderMatchSpecifier::ExactMatch(v)) => ValueMatch::Exact(v.clone()),
        Some(HeaderMatchSpecifier::PrefixMatch(v)) => ValueMatch::Prefix(v.clone()),
        Some(HeaderMatchSpecifier::SuffixMatch(v)) => ValueMatch::Suffix(v.clone()),
        Some(HeaderMatchSpecifier::ContainsMatch(v)) => ValueMatch::Contains(v.clone()),
        Some(HeaderMatchSpecifier::SafeRegexMatch(re)) => ValueMatch::Regex(regex(&re.regex)?),
        Some(HeaderMatchSpecifier::PresentMatch(true)) | None => ValueMatch::Present,
        Some(HeaderMatchSpecifier::StringMatch(s)) => string_match(ctx, field, s)?,
        Some(_) => return Err(ctx.err(field, "range and present_match: false are not supported")),
    };
    Ok(HeaderMatch {
        name: h.name.to_ascii_lowercase(),
        value,
        invert: h.invert_match,
    })
}

fn string_match(ctx: &Ctx<'_>, field: &str, s: &StringMatcher) -> Result<ValueMatch, ResourceError> {
    if s.ignore_case {
        return Err(ctx.err(format!("{field}.string_match.ignore_case"), "not supported"));
    }
    Ok(match &s.match_pattern {
        Some(MatchPattern::Exact(v)) => ValueMatch::Exact(v.clone()),
        Some(MatchPattern::Prefix(v)) => ValueMatch::Prefix(v.clone()),
        Some(MatchPattern::Suffix(v)) => ValueMatch::Suffix(v.clone()),
        Some(MatchPattern::Contains(v)) => ValueMatch::Contains(v.clone()),
        Some(MatchPattern::SafeRegex(re)) => ValueMatch::Regex(
            compile_regex(&re.regex)
                .map_err(|e| ctx.err(format!("{field}.string_match"), format!("invalid regex: {e}")))?,
        ),
        _ => return Err(ctx.err(format!("{field}.string_match"), "unsupported pattern")),
    })
}

pub fn cluster(c: &XCluster) -> Result<ClusterSpec, ResourceError> {
    let ctx = Ctx {
        kind: "Cluster",
        name: &c.name,
    };
    if c.name.is_empty() {
        return Err(ctx.err("name", "must not be empty"));
    }
    let discovery = match c.cluster_discovery_type {
        Some(ClusterDiscoveryType::Type(t)) => {
            DiscoveryType::try_from(t).map_err(|_| ctx.err("type", format!("unknown type {t}")))?
        }
        None => DiscoveryType::Static,
        Some(ClusterDiscoveryType::ClusterType(_)) => {
            return Err(ctx.err("cluster_type", "custom cluster types are not supported"));
        }
    };
    let (eds_name, static_endpoints) = match discovery {
        DiscoveryType::Eds => {
            let service = c
                .eds_cluster_config
                .as_ref()
                .map(|e| e.service_name.clone())
                .unwrap_or_default();
            (
                Some(if service.is_empty() {
                    c.name.clone()
                } else {
                    service
                }),
                Vec::new(),
            )
        }
        DiscoveryType::Static => {
            let endpoints = match &c.load_assignment {
                Some(cla) => endpoints(&ctx, "load_assignment", cla)?,
                None => Vec::new(),
            };
            (None, endpoints)
        }
        // Istio's egress catch-alls are handled by the capture listener, not as clusters.
        DiscoveryType::OriginalDst if c.name == PASSTHROUGH_CLUSTER => (None, Vec::new()),
        other => {
            return Err(ctx.err(
                "type",
                format!(
                    "{} clusters are not supported (use EDS or STATIC)",
                    other.as_str_name()
                ),
            ));
        }
    };
    let lb_policy = match XLbPolicy::try_from(c.lb_policy) {
        // ORIGINAL_DST clusters must say CLUSTER_PROVIDED; the capture listener handles them.
        Ok(XLbPolicy::ClusterProvided) if discovery == DiscoveryType::OriginalDst => LbPolicy::RoundRobin,
        Ok(XLbPolicy::RoundRobin) => LbPolicy::RoundRobin,
        Ok(XLbPolicy::LeastRequest) => LbPolicy::LeastRequest,
        Ok(XLbPolicy::Random) => LbPolicy::Random,
        Ok(other) => return Err(ctx.err("lb_policy", format!("{} is not supported", other.as_str_name()))),
        Err(_) => return Err(ctx.err("lb_policy", format!("unknown policy {}", c.lb_policy))),
    };
    let connect_timeout = c
        .connect_timeout
        .as_ref()
        .map(duration)
        .unwrap_or(weft_model::defaults::DEFAULT_CONNECT_TIMEOUT);
    if connect_timeout.is_zero() {
        return Err(ctx.err("connect_timeout", "must be greater than 0"));
    }
    let options = http_protocol_options(&ctx, c)?;
    let tls = match &c.transport_socket {
        Some(socket) => {
            let mut tls = upstream_tls(&ctx, socket)?;
            // Istio's h2UpgradePolicy UPGRADE: the cluster states HTTP/2 explicitly.
            tls.http2_upgrade = options.as_ref().is_some_and(|o| {
                matches!(
                    &o.upstream_protocol_options,
                    Some(UpstreamProtocolOptions::ExplicitHttpConfig(explicit))
                        if matches!(explicit.protocol_config, Some(ProtocolConfig::Http2ProtocolOptions(_)))
                )
            });
            Some(tls)
        }
        None => None,
    };
    let panic_threshold_percent = match c
        .common_lb_config
        .as_ref()
        .and_then(|l| l.healthy_panic_threshold.as_ref())
    {
        Some(p) if (0.0..=100.0).contains(&p.value) => p.value,
        Some(p) => {
            return Err(ctx.err(
                "common_lb_config.healthy_panic_threshold",
                format!("{} is not a percentage", p.value),
            ));
        }
        None => weft_model::policy::DEFAULT_PANIC_THRESHOLD_PERCENT,
    };
    Ok(ClusterSpec {
        name: c.name.clone(),
        eds_name,
        static_endpoints,
        lb_policy,
        connect_timeout,
        idle_timeout: upstream_idle_timeout(options.as_ref()),
        tls,
        circuit_breakers: circuit_breakers(&ctx, c)?,
        outlier_detection: c.outlier_detection.as_ref().map(outlier_detection),
        panic_threshold_percent,
        max_requests_per_connection: max_requests_per_connection(c, options.as_ref()),
    })
}

/// `common_http_protocol_options.max_requests_per_connection`, or the cluster's deprecated field of
/// the same name; unset or 0: no limit (Envoy's reading).
#[allow(deprecated)]
fn max_requests_per_connection(c: &XCluster, options: Option<&HttpProtocolOptions>) -> Option<u32> {
    options
        .and_then(|o| o.common_http_protocol_options.as_ref())
        .and_then(|o| o.max_requests_per_connection.as_ref())
        .or(c.max_requests_per_connection.as_ref())
        .map(|v| v.value)
        .filter(|n| *n > 0)
}

const HTTP_PROTOCOL_OPTIONS: &str = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions";

/// The cluster's `HttpProtocolOptions`, where Istio puts a DestinationRule's `connectionPool.http`.
fn http_protocol_options(ctx: &Ctx<'_>, c: &XCluster) -> Result<Option<HttpProtocolOptions>, ResourceError> {
    let Some(any) = c.typed_extension_protocol_options.get(HTTP_PROTOCOL_OPTIONS) else {
        return Ok(None);
    };
    let field = format!("typed_extension_protocol_options[\"{HTTP_PROTOCOL_OPTIONS}\"]");
    decode(any).map(Some).map_err(|e| ctx.err(&field, e.problem))
}

/// The idle timeout of pooled connections: `common_http_protocol_options.idle_timeout`.
fn upstream_idle_timeout(options: Option<&HttpProtocolOptions>) -> Duration {
    options
        .and_then(|o| o.common_http_protocol_options.as_ref())
        .and_then(|o| o.idle_timeout.as_ref())
        .map(duration)
        .filter(|d| !d.is_zero())
        .unwrap_or(weft_model::defaults::DEFAULT_UPSTREAM_IDLE_TIMEOUT)
}

/// The default-priority thresholds (Weft has one priority). The retry budget always counts requests over
/// an interval (Envoy's `budget_interval`, 10 s when unset or 0) rather than requests in flight, and
/// `min_retry_concurrency` is the number of retries always allowed in that interval (`docs/xds.md`).
fn circuit_breakers(ctx: &Ctx<'_>, c: &XCluster) -> Result<CircuitBreakers, ResourceError> {
    let mut limits = CircuitBreakers::default();
    let Some(t) = c
        .circuit_breakers
        .as_ref()
        .and_then(|cb| cb.thresholds.iter().find(|t| t.priority == 0))
    else {
        return Ok(limits);
    };
    let set = |target: &mut u32, value: &Option<envoy_types::pb::google::protobuf::UInt32Value>| {
        if let Some(v) = value {
            *target = v.value;
        }
    };
    set(&mut limits.max_connections, &t.max_connections);
    set(&mut limits.max_pending_requests, &t.max_pending_requests);
    set(&mut limits.max_requests, &t.max_requests);
    set(&mut limits.max_retries, &t.max_retries);
    if let Some(b) = &t.retry_budget {
        let mut budget = RetryBudget::default();
        if let Some(p) = &b.budget_percent {
            if !(0.0..=100.0).contains(&p.value) {
                return Err(ctx.err(
                    "circuit_breakers.thresholds.retry_budget.budget_percent",
                    format!("{} is not a percentage", p.value),
                ));
            }
            budget.budget_percent = p.value;
        }
        set(&mut budget.min_retries, &b.min_retry_concurrency);
        if let Some(interval) = b.budget_interval.as_ref().map(duration).filter(|d| !d.is_zero()) {
            budget.interval = interval;
        }
        limits.retry_budget = budget;
    }
    Ok(limits)
}

/// Envoy's consecutive-failure detectors. An `enforcing_*` of 0 turns its detector off; any other value
/// enforces it on every ejection decision. Success-rate and failure-percentage detection are not
/// implemented (`docs/xds.md`).
fn outlier_detection(o: &envoy_types::pb::envoy::config::cluster::v3::OutlierDetection) -> OutlierDetection {
    let d = OutlierDetection::default();
    let value = |v: &Option<envoy_types::pb::google::protobuf::UInt32Value>, default: u32| {
        v.as_ref().map_or(default, |v| v.value)
    };
    let enforced = |v: &Option<envoy_types::pb::google::protobuf::UInt32Value>, default: bool| {
        v.as_ref().map_or(default, |v| v.value > 0)
    };
    let gateway_threshold = value(&o.consecutive_gateway_failure, 5);
    OutlierDetection {
        consecutive_5xx: if enforced(&o.enforcing_consecutive_5xx, true) {
            value(&o.consecutive_5xx, d.consecutive_5xx)
        } else {
            0
        },
        consecutive_gateway_failure: if enforced(&o.enforcing_consecutive_gateway_failure, false) {
            gateway_threshold
        } else {
            0
        },
        consecutive_local_origin_failure: if enforced(&o.enforcing_consecutive_local_origin_failure, true) {
            value(
                &o.consecutive_local_origin_failure,
                d.consecutive_local_origin_failure,
            )
        } else {
            0
        },
        split_external_local_origin_errors: o.split_external_local_origin_errors,
        interval: o
            .interval
            .as_ref()
            .map(duration)
            .filter(|d| !d.is_zero())
            .unwrap_or(d.interval),
        base_ejection_time: o
            .base_ejection_time
            .as_ref()
            .map_or(d.base_ejection_time, duration),
        max_ejection_time: o.max_ejection_time.as_ref().map_or(d.max_ejection_time, duration),
        max_ejection_percent: value(&o.max_ejection_percent, d.max_ejection_percent).min(100),
    }
}

fn downstream_mtls(ctx: &Ctx<'_>, field: &str, socket: &TransportSocket) -> Result<(), ResourceError> {
    let Some(transport_socket::ConfigType::TypedConfig(any)) = &socket.config_type else {
        return Err(ctx.err(format!("{field}.typed_config"), "missing"));
    };
    let tls: DownstreamTlsContext =
        decode(any).map_err(|e| ctx.err(format!("{field}.typed_config"), e.problem))?;
    if !tls.require_client_certificate.is_some_and(|b| b.value) {
        return Err(ctx.err(
            format!("{field}.require_client_certificate"),
            "only mutual TLS is supported between sidecars",
        ));
    }
    Ok(())
}

/// Mutual TLS to a cluster, as Istio sends it: an `UpstreamTlsContext` whose validation context lists the
/// SPIFFE IDs to expect (`match_subject_alt_names` / `match_typed_subject_alt_names`, exact). The proxy
/// presents its own workload certificate; SDS secret names are not needed.
fn upstream_tls(ctx: &Ctx<'_>, socket: &TransportSocket) -> Result<UpstreamTls, ResourceError> {
    let Some(transport_socket::ConfigType::TypedConfig(any)) = &socket.config_type else {
        return Err(ctx.err("transport_socket.typed_config", "missing"));
    };
    let tls: UpstreamTlsContext =
        decode(any).map_err(|e| ctx.err("transport_socket.typed_config", e.problem))?;
    let validation = match tls.common_tls_context.and_then(|c| c.validation_context_type) {
        Some(ValidationContextType::ValidationContext(v)) => v,
        Some(ValidationContextType::CombinedValidationContext(c)) => {
            c.default_validation_context.unwrap_or_default()
        }
        _ => {
            return Err(ctx.err(
                "transport_socket.common_tls_context.validation_context_type",
                "needs a validation context naming the identities to expect",
            ));
        }
    };
    let exact = |m: &StringMatcher| match &m.match_pattern {
        Some(MatchPattern::Exact(v)) => Some(v.clone()),
        _ => None,
    };
    #[allow(deprecated)]
    let identities: Vec<String> = validation
        .match_subject_alt_names
        .iter()
        .filter_map(exact)
        .chain(
            validation
                .match_typed_subject_alt_names
                .iter()
                .filter_map(|m| m.matcher.as_ref().and_then(exact)),
        )
        .collect();
    let field = "transport_socket.common_tls_context.validation_context.match_subject_alt_names";
    if identities.is_empty() {
        return Err(ctx.err(field, "name at least one SPIFFE ID (exact) to expect"));
    }
    let identities = identities
        .iter()
        .map(|id| {
            id.parse::<weft_identity::SpiffeId>()
                .map_err(|_| ctx.err(field, format!("\"{id}\" is not a SPIFFE ID")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(UpstreamTls {
        identities: identities.into(),
        http2_upgrade: false,
    })
}

pub fn load_assignment(cla: &ClusterLoadAssignment) -> Result<Vec<Endpoint>, ResourceError> {
    let ctx = Ctx {
        kind: "ClusterLoadAssignment",
        name: &cla.cluster_name,
    };
    if cla.cluster_name.is_empty() {
        return Err(ctx.err("cluster_name", "must not be empty"));
    }
    endpoints(&ctx, "", cla)
}

fn endpoints(
    ctx: &Ctx<'_>,
    prefix: &str,
    cla: &ClusterLoadAssignment,
) -> Result<Vec<Endpoint>, ResourceError> {
    let dot = if prefix.is_empty() { "" } else { "." };
    let mut out = Vec::new();
    for (i, locality) in cla.endpoints.iter().enumerate() {
        for (j, lb) in locality.lb_endpoints.iter().enumerate() {
            let field = format!("{prefix}{dot}endpoints[{i}].lb_endpoints[{j}]");
            let Some(HostIdentifier::Endpoint(ep)) = &lb.host_identifier else {
                return Err(ctx.err(
                    format!("{field}.endpoint"),
                    "required (named endpoints are not supported)",
                ));
            };
            let address = socket_address(ctx, &format!("{field}.endpoint.address"), ep.address.as_ref())?;
            let weight = lb.load_balancing_weight.as_ref().map_or(1, |w| w.value);
            if weight == 0 {
                return Err(ctx.err(format!("{field}.load_balancing_weight"), "must be at least 1"));
            }
            // UNKNOWN counts as healthy, DEGRADED and the rest as unhealthy (Envoy).
            let healthy = matches!(
                HealthStatus::try_from(lb.health_status),
                Ok(HealthStatus::Unknown | HealthStatus::Healthy)
            );
            out.push(Endpoint {
                address,
                weight,
                healthy,
            });
        }
    }
    Ok(out)
}

fn socket_address(
    ctx: &Ctx<'_>,
    field: &str,
    address: Option<&Address>,
) -> Result<SocketAddr, ResourceError> {
    let Some(XAddressKind::SocketAddress(sa)) = address.and_then(|a| a.address.as_ref()) else {
        return Err(ctx.err(field, "needs a socket_address"));
    };
    let ip: IpAddr = sa.address.parse().map_err(|_| {
        ctx.err(
            format!("{field}.address"),
            format!("\"{}\" is not an IP address", sa.address),
        )
    })?;
    let port = match sa.port_specifier {
        Some(PortSpecifier::PortValue(p)) => u16::try_from(p).ok(),
        _ => None,
    }
    .ok_or_else(|| ctx.err(format!("{field}.port_value"), "needs a port from 0 to 65535"))?;
    Ok(SocketAddr::new(ip, port))
}

fn duration(d: &XDuration) -> Duration {
    Duration::new(
        u64::try_from(d.seconds).unwrap_or(0),
        u32::try_from(d.nanos).unwrap_or(0),
    )
}

#[cfg(test)]
mod tests;
