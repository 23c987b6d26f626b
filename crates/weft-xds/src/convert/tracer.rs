//! `tracing` of an HTTP connection manager: the OpenTelemetry tracer (`envoy.tracers.opentelemetry`)
//! exporting over gRPC to a cluster or a URI, random sampling, and literal or environment custom tags.
//! Other tracers, OTLP over HTTP, custom samplers and exporters, and tags the proxy cannot fill are
//! refused by field.

use envoy_types::pb::envoy::config::core::v3::grpc_service::TargetSpecifier;
use envoy_types::pb::envoy::config::trace::v3::OpenTelemetryConfig;
use envoy_types::pb::envoy::config::trace::v3::tracing::http::ConfigType;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::http_connection_manager::Tracing;
use envoy_types::pb::envoy::r#type::tracing::v3::custom_tag;

use super::common::{Ctx, ResourceError, decode};

const OPENTELEMETRY: &str = "envoy.config.trace.v3.OpenTelemetryConfig";

/// A listener's tracing as the control plane asked for it.
#[derive(Debug, Clone, PartialEq)]
pub enum XdsTracing {
    /// `tracing` without a provider: Envoy traces nothing.
    Off,
    OpenTelemetry {
        collector: Collector,
        service_name: String,
        /// New traces sampled, 0 to 100 (`random_sampling`, Envoy's default 100).
        sampling_percent: f64,
        /// Literal and environment custom tags, resolved.
        tags: Vec<(String, String)>,
    },
}

/// Where spans are exported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Collector {
    /// `envoy_grpc`: a cluster's first endpoint, resolved when the configuration is built.
    Cluster(String),
    /// `google_grpc.target_uri`.
    Uri(String),
}

pub(crate) fn tracing(ctx: &Ctx<'_>, field: &str, tracing: &Tracing) -> Result<XdsTracing, ResourceError> {
    let percent = |name: &str,
                   p: &Option<envoy_types::pb::envoy::r#type::v3::Percent>|
     -> Result<Option<f64>, ResourceError> {
        match p {
            None => Ok(None),
            Some(p) if (0.0..=100.0).contains(&p.value) => Ok(Some(p.value)),
            Some(p) => Err(ctx.err(
                format!("{field}.{name}"),
                format!("{} is not a percentage", p.value),
            )),
        }
    };
    if percent("client_sampling", &tracing.client_sampling)?.is_some_and(|p| p < 100.0) {
        return Err(ctx.err(
            format!("{field}.client_sampling"),
            "forced sampling by x-client-trace-id is not supported",
        ));
    }
    if percent("overall_sampling", &tracing.overall_sampling)?.is_some_and(|p| p < 100.0) {
        return Err(ctx.err(
            format!("{field}.overall_sampling"),
            "is not supported; use random_sampling",
        ));
    }
    let sampling_percent = percent("random_sampling", &tracing.random_sampling)?.unwrap_or(100.0);
    let Some(provider) = &tracing.provider else {
        return Ok(XdsTracing::Off);
    };
    let Some(ConfigType::TypedConfig(any)) = &provider.config_type else {
        return Err(ctx.err(format!("{field}.provider.typed_config"), "missing"));
    };
    let typed = format!("{field}.provider.typed_config");
    let name = any.type_url.rsplit('/').next().unwrap_or_default();
    if name != OPENTELEMETRY {
        return Err(ctx.err(
            typed,
            format!("unsupported tracer {name} (envoy.tracers.opentelemetry is)"),
        ));
    }
    let otel: OpenTelemetryConfig = decode(any).map_err(|e| ctx.err(typed.clone(), e.problem))?;
    for (set, what) in [
        (otel.http_service.is_some(), "http_service"),
        (otel.exporter.is_some(), "exporter"),
        (otel.sampler.is_some(), "sampler"),
        (!otel.resource_detectors.is_empty(), "resource_detectors"),
    ] {
        if set {
            return Err(ctx.err(
                format!("{typed}.{what}"),
                "is not supported (OTLP over gRPC with the proxy's sampler is)",
            ));
        }
    }
    let collector = match otel
        .grpc_service
        .as_ref()
        .and_then(|g| g.target_specifier.as_ref())
    {
        Some(TargetSpecifier::EnvoyGrpc(g)) if !g.cluster_name.is_empty() => {
            Collector::Cluster(g.cluster_name.clone())
        }
        Some(TargetSpecifier::GoogleGrpc(g)) if !g.target_uri.is_empty() => {
            let uri = g.target_uri.clone();
            Collector::Uri(if uri.contains("://") {
                uri
            } else {
                format!("http://{uri}")
            })
        }
        _ => {
            return Err(ctx.err(
                format!("{typed}.grpc_service"),
                "needs envoy_grpc.cluster_name or google_grpc.target_uri",
            ));
        }
    };
    let mut tags = Vec::new();
    for (i, tag) in tracing.custom_tags.iter().enumerate() {
        let value = match &tag.r#type {
            Some(custom_tag::Type::Literal(l)) => l.value.clone(),
            Some(custom_tag::Type::Environment(e)) => std::env::var(&e.name)
                .ok()
                .filter(|v| !v.is_empty())
                .unwrap_or_else(|| e.default_value.clone()),
            _ => {
                return Err(ctx.err(
                    format!("{field}.custom_tags[{i}]"),
                    "only literal and environment custom tags are supported",
                ));
            }
        };
        tags.push((tag.tag.clone(), value));
    }
    Ok(XdsTracing::OpenTelemetry {
        collector,
        service_name: otel.service_name,
        sampling_percent,
        tags,
    })
}
