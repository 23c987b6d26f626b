//! Clusters and their endpoints: discovery type, balancing, timeouts, circuit breakers, outlier
//! detection, HTTP protocol options and mutual TLS to the endpoints.

use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3::Cluster as XCluster;
use envoy_types::pb::envoy::config::cluster::v3::cluster::{
    ClusterDiscoveryType, DiscoveryType, LbPolicy as XLbPolicy,
};
use envoy_types::pb::envoy::config::core::v3::{HealthStatus, Metadata};
use envoy_types::pb::envoy::config::core::v3::{TransportSocket, transport_socket};
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::endpoint::v3::lb_endpoint::HostIdentifier;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::UpstreamTlsContext;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::common_tls_context::ValidationContextType;
use envoy_types::pb::envoy::extensions::upstreams::http::v3::HttpProtocolOptions;
use envoy_types::pb::envoy::extensions::upstreams::http::v3::http_protocol_options::UpstreamProtocolOptions;
use envoy_types::pb::envoy::extensions::upstreams::http::v3::http_protocol_options::explicit_http_config::ProtocolConfig;
use envoy_types::pb::envoy::r#type::matcher::v3::StringMatcher;
use envoy_types::pb::envoy::r#type::matcher::v3::string_matcher::MatchPattern;
use envoy_types::pb::google::protobuf::value::Kind;
use weft_model::{CircuitBreakers, Endpoint, LbPolicy, OutlierDetection, RetryBudget, UpstreamTls};
use weft_telemetry::{Label, WorkloadLabels};

use super::common::{Ctx, PASSTHROUGH_CLUSTER, ResourceError, decode, duration, socket_address};

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

pub(crate) const HTTP_PROTOCOL_OPTIONS: &str = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions";

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

pub(crate) fn endpoints(
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
            let workload = istio_workload(ctx, &field, lb.metadata.as_ref())?;
            out.push(Endpoint {
                address,
                weight,
                healthy,
                workload,
            });
        }
    }
    Ok(out)
}

/// Istio's endpoint metadata for telemetry: `filter_metadata.istio.workload`, the workload behind the
/// endpoint as `name;namespace;canonical service;canonical revision;cluster`.
fn istio_workload(
    ctx: &Ctx<'_>,
    field: &str,
    metadata: Option<&Metadata>,
) -> Result<Option<Arc<WorkloadLabels>>, ResourceError> {
    let Some(value) = metadata
        .and_then(|m| m.filter_metadata.get("istio"))
        .and_then(|istio| istio.fields.get("workload"))
    else {
        return Ok(None);
    };
    let problem = "must be \"name;namespace;canonical service;canonical revision;cluster\"";
    let field = format!("{field}.metadata.filter_metadata.istio.workload");
    let Some(Kind::StringValue(text)) = &value.kind else {
        return Err(ctx.err(field, problem));
    };
    let parts: Vec<&str> = text.split(';').collect();
    let [
        workload,
        namespace,
        canonical_service,
        canonical_revision,
        cluster,
    ] = parts[..]
    else {
        return Err(ctx.err(field, problem));
    };
    let label = |s: &str| {
        if s.is_empty() {
            Label::unknown()
        } else {
            Label::from(s)
        }
    };
    Ok(Some(Arc::new(WorkloadLabels {
        workload: label(workload),
        namespace: label(namespace),
        principal: Label::unknown(),
        app: Label::unknown(),
        version: Label::unknown(),
        canonical_service: label(canonical_service),
        canonical_revision: label(canonical_revision),
        cluster: label(cluster),
    })))
}
