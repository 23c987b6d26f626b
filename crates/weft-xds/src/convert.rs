//! xDS resources to Weft's model: pure functions, one resource at a time, each rejected on its own with
//! the resource, the field and the problem named. What is supported is listed in `docs/xds.md`; anything
//! else that would change behaviour is rejected rather than silently ignored.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

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
use envoy_types::pb::google::protobuf::Duration as XDuration;
use weft_model::route::{
    DEFAULT_ROUTE_TIMEOUT, DEFAULT_STREAM_IDLE_TIMEOUT, HeaderMatch, PathMatch, RetryPolicy, Route, RouteAction, RouteMatch, RouteTable, ValueMatch,
    VirtualHost, WeightedCluster, compile_regex,
};
use envoy_types::pb::envoy::config::core::v3::{TransportSocket, transport_socket};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::DownstreamTlsContext;
use envoy_types::pb::envoy::config::route::v3::RetryPolicy as XRetryPolicy;
use weft_telemetry::access_log::{AccessLogConfig, AccessLogSet};
use weft_model::{
    Backoff, Egress, HttpLimits, HttpSettings, ListenerAuthorization, PeerAuthentication,
    Protocol, RetryOn,
};

mod access_log;
mod tracer;
pub use tracer::{Collector, XdsTracing};
mod cluster;
mod common;
mod rbac;

#[cfg(test)]
use cluster::HTTP_PROTOCOL_OPTIONS;
pub use cluster::{ClusterSpec, cluster, load_assignment};
pub use common::{
    BLACKHOLE_CLUSTER, PASSTHROUGH_CLUSTER, ResourceError, VIRTUAL_INBOUND, VIRTUAL_OUTBOUND, decode,
};
use common::{Ctx, duration, socket_address};

const HCM: &str = "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";
const TCP_PROXY: &str = "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy";
const ROUTER: &str = "envoy.extensions.filters.http.router.v3.Router";
/// Istio's names for the egress catch-alls.
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
        access_log: Arc<AccessLogSet>,
        /// `None`: the connection manager says nothing (the proxy's own tracing applies).
        tracing: Option<XdsTracing>,
    },
    /// The outbound capture listener: its catch-all chain decides egress (and logs its connections).
    VirtualOutbound {
        egress: Egress,
        access_log: Arc<AccessLogSet>,
    },
    /// The inbound capture listener: the app's ports and their protocols.
    VirtualInbound {
        ports: HashMap<u16, Protocol>,
        /// The listener's mode: the strictest of its ports'.
        peer_authentication: Option<PeerAuthentication>,
        /// Ports whose mode differs from the listener's.
        port_peer_authentication: HashMap<u16, PeerAuthentication>,
        authorization: ListenerAuthorization,
        /// The HTTP connection managers' settings, when any chain has one.
        http_settings: Option<HttpSettings>,
        access_log: Arc<AccessLogSet>,
        tracing: Option<XdsTracing>,
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
        let targets = chain
            .map(|c| chain_targets(&ctx, "default_filter_chain", c, false))
            .transpose()?;
        let egress = match &targets {
            Some(ChainTargets {
                tcp_cluster: Some(c), ..
            }) if c == BLACKHOLE_CLUSTER => Egress::RegistryOnly,
            _ => Egress::AllowAny,
        };
        let access_log = access_log::one_set(
            &ctx,
            targets.map(|t| ("default_filter_chain".to_owned(), t.access_log)),
        )?;
        return Ok(ListenerSpec::VirtualOutbound { egress, access_log });
    }
    if l.name == VIRTUAL_INBOUND {
        let mut ports = HashMap::new();
        // Per port: whether a chain terminates mutual TLS, whether one takes plaintext.
        let mut transports: HashMap<u16, (bool, bool)> = HashMap::new();
        // Every chain's RBAC filters, HTTP and TCP apart: the proxy enforces one set per layer for the
        // workload, so chains that disagree are refused rather than merged.
        let mut http_rbac: Option<(String, Vec<weft_authz::RbacFilter>)> = None;
        let mut tcp_rbac: Option<(String, Vec<weft_authz::RbacFilter>)> = None;
        let mut http_settings: Option<(String, HttpSettings)> = None;
        let mut access_logs = Vec::new();
        let mut tracings = Vec::new();
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
            let mut targets = chain_targets(&ctx, &field, &chain, true)?;
            access_logs.push((
                format!("{field}.filters"),
                std::mem::take(&mut targets.access_log),
            ));
            tracings.push((format!("{field}.filters"), targets.tracing.take()));
            match (&http_settings, targets.http_settings) {
                (Some((first, seen)), Some(these)) if *seen != these => {
                    return Err(ctx.err(
                        format!("{field}.filters"),
                        format!(
                            "HTTP connection manager timeouts or limits differ from those of {first}; the inbound listener has one setting"
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
            let (tls, plaintext) = transports.entry(port).or_default();
            if terminates {
                *tls = true;
            } else {
                *plaintext = true;
            }
            let protocol = if targets.http.is_some() {
                Protocol::Http
            } else {
                Protocol::Tcp
            };
            ports.insert(port, protocol);
        }
        // Istio's shapes, port by port: TLS chains only (STRICT), both (PERMISSIVE), plaintext only
        // (DISABLE). Ports the chains do not name take the strictest of them.
        let mut port_peer_authentication: HashMap<u16, PeerAuthentication> = transports
            .into_iter()
            .map(|(port, shape)| {
                let mode = match shape {
                    (true, false) => PeerAuthentication::Strict,
                    (true, true) => PeerAuthentication::Permissive,
                    _ => PeerAuthentication::Disable,
                };
                (port, mode)
            })
            .collect();
        let peer_authentication = port_peer_authentication
            .values()
            .copied()
            .max_by_key(|m| match m {
                PeerAuthentication::Disable => 0,
                PeerAuthentication::Permissive => 1,
                PeerAuthentication::Strict => 2,
            });
        port_peer_authentication.retain(|_, mode| Some(*mode) != peer_authentication);
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
            port_peer_authentication,
            authorization,
            http_settings: http_settings.map(|(_, s)| s),
            access_log: access_log::one_set(&ctx, access_logs)?,
            tracing: one_tracing(&ctx, tracings)?,
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
    let mut access_logs = Vec::new();
    let mut tracings = Vec::new();
    for (i, chain) in l
        .filter_chains
        .iter()
        .chain(l.default_filter_chain.iter())
        .enumerate()
    {
        let targets = chain_targets(&ctx, &format!("filter_chains[{i}]"), chain, false)?;
        access_logs.push((format!("filter_chains[{i}].filters"), targets.access_log));
        tracings.push((format!("filter_chains[{i}].filters"), targets.tracing));
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
        access_log: access_log::one_set(&ctx, access_logs)?,
        tracing: one_tracing(&ctx, tracings)?,
    })
}

/// A listener's chains trace alike or are refused: the proxy keeps one tracing per listener.
fn one_tracing(
    ctx: &Ctx<'_>,
    chains: Vec<(String, Option<XdsTracing>)>,
) -> Result<Option<XdsTracing>, ResourceError> {
    let mut first: Option<(String, XdsTracing)> = None;
    for (field, tracing) in chains {
        let Some(tracing) = tracing else { continue };
        match &first {
            None => first = Some((field, tracing)),
            Some((seen_at, seen)) if *seen != tracing => {
                return Err(ctx.err(
                    field,
                    format!("tracing differs from that of {seen_at}; a listener has one tracing"),
                ));
            }
            Some(_) => {}
        }
    }
    Ok(first.map(|(_, t)| t))
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
    /// The connection manager's or TCP proxy's access logs.
    access_log: Vec<AccessLogConfig>,
    /// The connection manager's tracing.
    tracing: Option<XdsTracing>,
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
        access_log: Vec::new(),
        tracing: None,
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
                targets.http_settings = Some(hcm_settings(ctx, &format!("{f}.typed_config"), &hcm)?);
                targets.access_log.extend(access_log::access_logs(
                    ctx,
                    &format!("{f}.typed_config.access_log"),
                    &hcm.access_log,
                )?);
                targets.tracing = hcm
                    .tracing
                    .as_ref()
                    .map(|t| tracer::tracing(ctx, &format!("{f}.typed_config.tracing"), t))
                    .transpose()?;
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
                targets.access_log.extend(access_log::access_logs(
                    ctx,
                    &format!("{f}.typed_config.access_log"),
                    &tcp.access_log,
                )?);
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

/// The connection manager's timeouts and limits, with Envoy's meaning of unset (the default) and zero
/// (disabled), except that an unset `request_headers_timeout` keeps the proxy's slowloris default and
/// unset limits keep the proxy's edge defaults (Envoy's own allow 2^31 streams and 256 MiB windows).
fn hcm_settings(
    ctx: &Ctx<'_>,
    field: &str,
    hcm: &HttpConnectionManager,
) -> Result<HttpSettings, ResourceError> {
    let setting = |d: Option<&XDuration>, default: Option<Duration>| match d {
        None => default,
        Some(d) => Some(duration(d)).filter(|d| !d.is_zero()),
    };
    let mut limits = HttpLimits::default();
    let mut limits_field = "";
    if let Some(kb) = &hcm.max_request_headers_kb {
        limits.max_request_headers_kb = kb.value;
    }
    if let Some(count) = hcm
        .common_http_protocol_options
        .as_ref()
        .and_then(|o| o.max_headers_count.as_ref())
    {
        limits.max_headers_count = count.value;
        limits_field = "common_http_protocol_options.";
    }
    if let Some(h2) = &hcm.http2_protocol_options {
        if let Some(streams) = &h2.max_concurrent_streams {
            limits.max_concurrent_streams = streams.value;
        }
        if let Some(window) = &h2.initial_stream_window_size {
            limits.initial_stream_window_size = window.value;
        }
        if let Some(window) = &h2.initial_connection_window_size {
            limits.initial_connection_window_size = window.value;
        }
    }
    if let Err((name, why)) = limits.check() {
        let prefix = match name {
            "max_request_headers_kb" => "",
            "max_headers_count" => limits_field,
            _ => "http2_protocol_options.",
        };
        return Err(ctx.err(format!("{field}.{prefix}{name}"), why));
    }
    Ok(HttpSettings {
        request_headers_timeout: setting(
            hcm.request_headers_timeout.as_ref(),
            Some(weft_model::defaults::DEFAULT_REQUEST_HEADERS_TIMEOUT),
        ),
        stream_idle_timeout: setting(
            hcm.stream_idle_timeout.as_ref(),
            Some(DEFAULT_STREAM_IDLE_TIMEOUT),
        ),
        request_timeout: setting(hcm.request_timeout.as_ref(), None),
        limits,
    })
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

#[cfg(test)]
mod tests;
