//! Distributed tracing with OpenTelemetry: each proxied HTTP request is a span (a client span on the
//! calling side, a server span on the called side), its context taken from the request's W3C
//! `traceparent`/`tracestate` or B3 headers and passed on to the next hop, sampled by percentage while
//! honouring a sampling decision made upstream, and exported over OTLP/gRPC in batches.
//!
//! Spans reach the exporter through a bounded queue: when it is full they are dropped and counted
//! (`weft_tracing_spans_dropped_total`); the export runs as its own task, so a collector that is down or
//! slow never holds up a request.

use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue};
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{
    Span as _, SpanContext, SpanId, SpanKind, Status, TraceContextExt, TraceFlags, TraceId, TraceState,
    Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    Sampler, SdkTracer, SdkTracerProvider, SpanData, SpanExporter as _, SpanProcessor,
};
use prometheus_client::metrics::counter::Counter;
use tokio::sync::mpsc;

use crate::{Metrics, ResponseFlags};

/// Where spans go and how many are kept.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct TracingSettings {
    /// The OTLP/gRPC collector (`http://collector:4317`).
    pub endpoint: String,
    /// `service.name` of the spans.
    pub service_name: String,
    pub sampler: SamplerSetting,
    /// Spans waiting for export; more are dropped (`OTEL_BSP_MAX_QUEUE_SIZE`, default 2048).
    pub max_queue_size: usize,
    /// How long spans gather before a batch is sent (`OTEL_BSP_SCHEDULE_DELAY`, default 5 s).
    #[serde(with = "humantime_serde")]
    pub schedule_delay: Duration,
    /// Spans per batch (`OTEL_BSP_MAX_EXPORT_BATCH_SIZE`, default 512).
    pub max_export_batch_size: usize,
    /// Per export (`OTEL_BSP_EXPORT_TIMEOUT`, default 30 s).
    #[serde(with = "humantime_serde")]
    pub export_timeout: Duration,
    /// Attributes put on every span (a control plane's literal custom tags).
    pub tags: Vec<(String, String)>,
}

impl TracingSettings {
    /// The SDK's batch defaults.
    pub fn new(endpoint: String, service_name: String, sampler: SamplerSetting) -> Self {
        Self {
            endpoint,
            service_name,
            sampler,
            max_queue_size: 2048,
            schedule_delay: Duration::from_secs(5),
            max_export_batch_size: 512,
            export_timeout: Duration::from_secs(30),
            tags: Vec::new(),
        }
    }
}

/// A listener's tracing: the proxy's own (from its file and environment), none, or the listener's
/// own collector and sampling (from a control plane).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ListenerTracing {
    #[default]
    Proxy,
    Off,
    Own(std::sync::Arc<TracingSettings>),
}

/// Which requests are traced (the OpenTelemetry SDK's `OTEL_TRACES_SAMPLER` values).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SamplerSetting {
    AlwaysOn,
    AlwaysOff,
    /// This fraction of new traces.
    TraceIdRatio(f64),
    /// A request that carries a sampling decision follows it; others are sampled as the inner setting.
    ParentBasedAlwaysOn,
    ParentBasedAlwaysOff,
    ParentBasedTraceIdRatio(f64),
}

impl SamplerSetting {
    /// Istio's default: 1 % of new traces, and whatever an upstream decided for the others.
    pub const DEFAULT: Self = Self::ParentBasedTraceIdRatio(0.01);

    /// From `OTEL_TRACES_SAMPLER` and `OTEL_TRACES_SAMPLER_ARG`.
    pub fn from_env(name: &str, arg: Option<&str>) -> Result<Self, String> {
        let ratio = || -> Result<f64, String> {
            match arg {
                None => Ok(1.0),
                Some(a) => a
                    .parse::<f64>()
                    .ok()
                    .filter(|r| (0.0..=1.0).contains(r))
                    .ok_or_else(|| format!("OTEL_TRACES_SAMPLER_ARG \"{a}\" is not a ratio from 0 to 1")),
            }
        };
        Ok(match name {
            "always_on" => Self::AlwaysOn,
            "always_off" => Self::AlwaysOff,
            "traceidratio" => Self::TraceIdRatio(ratio()?),
            "parentbased_always_on" => Self::ParentBasedAlwaysOn,
            "parentbased_always_off" => Self::ParentBasedAlwaysOff,
            "parentbased_traceidratio" => Self::ParentBasedTraceIdRatio(ratio()?),
            other => {
                return Err(format!(
                    "OTEL_TRACES_SAMPLER \"{other}\" is not one of always_on, always_off, traceidratio, parentbased_always_on, parentbased_always_off, parentbased_traceidratio"
                ));
            }
        })
    }

    fn sampler(self) -> Sampler {
        let parent = |root: Sampler| Sampler::ParentBased(Box::new(root));
        match self {
            Self::AlwaysOn => Sampler::AlwaysOn,
            Self::AlwaysOff => Sampler::AlwaysOff,
            Self::TraceIdRatio(r) => Sampler::TraceIdRatioBased(r),
            Self::ParentBasedAlwaysOn => parent(Sampler::AlwaysOn),
            Self::ParentBasedAlwaysOff => parent(Sampler::AlwaysOff),
            Self::ParentBasedTraceIdRatio(r) => parent(Sampler::TraceIdRatioBased(r)),
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("cannot set up the OTLP exporter for {endpoint}: {reason}")]
pub struct TracingError {
    pub endpoint: String,
    pub reason: String,
}

/// The proxy's tracer.
#[derive(Debug)]
pub struct Tracing {
    tracer: SdkTracer,
    _provider: SdkTracerProvider,
    propagator: TraceContextPropagator,
    /// Put on every sampled span.
    tags: Vec<KeyValue>,
}

impl Tracing {
    /// Starts the exporter task (inside the runtime). `attributes` describe the proxy (`node_id`, the
    /// workload's canonical service and namespace) and are put on every span.
    pub fn start(
        settings: &TracingSettings,
        metrics: &Metrics,
        attributes: Vec<KeyValue>,
    ) -> Result<Self, TracingError> {
        let failed = |reason: String| TracingError {
            endpoint: settings.endpoint.clone(),
            reason,
        };
        let mut exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(settings.endpoint.clone())
            .with_timeout(settings.export_timeout)
            .build()
            .map_err(|e| failed(e.to_string()))?;
        let resource = opentelemetry_sdk::Resource::builder_empty()
            .with_service_name(settings.service_name.clone())
            .with_attributes(attributes)
            .build();
        exporter.set_resource(&resource);
        let (tx, rx) = mpsc::channel(settings.max_queue_size.max(1));
        tokio::spawn(export(
            exporter,
            rx,
            settings.clone(),
            metrics.tracing_spans_exported.clone(),
            metrics.tracing_spans_failed.clone(),
        ));
        let provider = SdkTracerProvider::builder()
            .with_sampler(settings.sampler.sampler())
            .with_resource(resource)
            .with_span_processor(Queue {
                tx,
                dropped: metrics.tracing_spans_dropped.clone(),
            })
            .build();
        Ok(Self {
            tracer: provider.tracer("weft"),
            _provider: provider,
            propagator: TraceContextPropagator::new(),
            tags: settings
                .tags
                .iter()
                .map(|(k, v)| KeyValue::new(k.clone(), v.clone()))
                .collect(),
        })
    }

    /// A span for a request, the child of the context its headers carry (W3C first, then B3). `name`
    /// is made only for a sampled span (most are not, and then cost no allocation for it).
    pub fn begin(&self, headers: &HeaderMap, kind: SpanKind, name: impl FnOnce() -> String) -> RequestSpan {
        let mut parent = self.propagator.extract(&Headers(headers));
        let b3 = !parent.span().span_context().is_valid() && {
            match b3_context(headers) {
                Some(context) => {
                    parent = Context::new().with_remote_span_context(context);
                    true
                }
                None => false,
            }
        };
        let span = self
            .tracer
            .span_builder("")
            .with_kind(kind)
            .start_with_context(&self.tracer, &parent);
        let mut span = RequestSpan { span, b3 };
        if span.span.is_recording() {
            span.span.update_name(name());
            if !self.tags.is_empty() {
                span.set(self.tags.clone());
            }
        }
        span
    }

    /// Writes the span's context into the request going to the next hop: `traceparent` (and
    /// `tracestate`), and B3 headers too when the request arrived with B3.
    pub fn inject(&self, span: &RequestSpan, headers: &mut HeaderMap) {
        let context = Context::new().with_remote_span_context(span.span.span_context().clone());
        self.propagator.inject_context(&context, &mut HeadersMut(headers));
        if span.b3 {
            let sc = span.span.span_context();
            let set = |headers: &mut HeaderMap, name: &'static str, value: String| {
                if let Ok(value) = HeaderValue::from_str(&value) {
                    headers.insert(HeaderName::from_static(name), value);
                }
            };
            let sampled = if sc.is_sampled() { "1" } else { "0" };
            if headers.contains_key("b3") {
                set(
                    headers,
                    "b3",
                    format!("{}-{}-{sampled}", sc.trace_id(), sc.span_id()),
                );
            } else {
                set(headers, "x-b3-traceid", sc.trace_id().to_string());
                set(headers, "x-b3-spanid", sc.span_id().to_string());
                set(headers, "x-b3-sampled", sampled.to_owned());
                headers.remove("x-b3-parentspanid");
            }
        }
    }
}

/// A request's span, ended when its response has.
#[derive(Debug)]
pub struct RequestSpan {
    span: opentelemetry_sdk::trace::Span,
    /// The request came with B3 headers (they are kept up to date for the next hop).
    b3: bool,
}

impl RequestSpan {
    pub fn trace_id(&self) -> TraceId {
        self.span.span_context().trace_id()
    }

    pub fn is_sampled(&self) -> bool {
        self.span.span_context().is_sampled()
    }

    /// Adds attributes known once the request has been routed or answered.
    pub fn set(&mut self, attributes: Vec<KeyValue>) {
        if self.span.is_recording() {
            self.span.set_attributes(attributes);
        }
    }

    /// Ends the span with the response's status and flags (Envoy's `http.status_code`,
    /// `response_flags`; a 5xx or a flag marks the span an error).
    pub fn finish(mut self, status: u16, flags: ResponseFlags, request_size: u64, response_size: u64) {
        if self.span.is_recording() {
            self.span.set_attributes([
                KeyValue::new("http.status_code", i64::from(status)),
                KeyValue::new("response_flags", flags.to_string()),
                KeyValue::new("request_size", i64::try_from(request_size).unwrap_or(i64::MAX)),
                KeyValue::new("response_size", i64::try_from(response_size).unwrap_or(i64::MAX)),
            ]);
            if status >= 500 || !flags.is_empty() {
                self.span.set_status(Status::error(format!("{status} {flags}")));
            }
        }
        self.span.end();
    }
}

/// B3's single `b3` header (`{trace}-{span}[-{sampled}[-{parent}]]`) or its `x-b3-*` headers.
fn b3_context(headers: &HeaderMap) -> Option<SpanContext> {
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let (trace, span, sampled) = match text("b3") {
        Some(single) => {
            let mut parts = single.split('-');
            let trace = parts.next()?;
            let span = parts.next()?;
            (trace, span, parts.next())
        }
        None => (
            text("x-b3-traceid")?,
            text("x-b3-spanid")?,
            text("x-b3-flags").filter(|f| *f == "1").or(text("x-b3-sampled")),
        ),
    };
    // A 64-bit B3 trace id is the low half of a 128-bit one.
    let trace_id = match trace.len() {
        16 => TraceId::from_hex(&format!("{trace:0>32}")).ok()?,
        32 => TraceId::from_hex(trace).ok()?,
        _ => return None,
    };
    let span_id = SpanId::from_hex(span).ok()?;
    let flags = match sampled {
        Some("1" | "d" | "true") => TraceFlags::SAMPLED,
        _ => TraceFlags::default(),
    };
    let context = SpanContext::new(trace_id, span_id, flags, true, TraceState::default());
    context.is_valid().then_some(context)
}

struct Headers<'a>(&'a HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(HeaderName::as_str).collect()
    }
}

struct HeadersMut<'a>(&'a mut HeaderMap);

impl Injector for HeadersMut<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(key.as_bytes()),
            HeaderValue::from_str(&value),
        ) {
            self.0.insert(name, value);
        }
    }
}

/// Hands ended spans to the export task; a full queue drops them (counted).
#[derive(Debug)]
struct Queue {
    tx: mpsc::Sender<SpanData>,
    dropped: Counter,
}

impl SpanProcessor for Queue {
    fn on_start(&self, _span: &mut opentelemetry_sdk::trace::Span, _cx: &Context) {}

    fn on_end(&self, span: SpanData) {
        if self.tx.try_send(span).is_err() {
            self.dropped.inc();
        }
    }

    fn force_flush(&self) -> opentelemetry_sdk::error::OTelSdkResult {
        Ok(())
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> opentelemetry_sdk::error::OTelSdkResult {
        Ok(())
    }
}

/// Sends spans in batches: once `max_export_batch_size` have gathered, or `schedule_delay` after the
/// first of a batch. Each export is bounded by `export_timeout`; what fails is counted and not retried.
async fn export(
    exporter: opentelemetry_otlp::SpanExporter,
    mut rx: mpsc::Receiver<SpanData>,
    settings: TracingSettings,
    exported: Counter,
    failed: Counter,
) {
    let mut warned = false;
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        let deadline = tokio::time::Instant::now() + settings.schedule_delay;
        while batch.len() < settings.max_export_batch_size {
            tokio::select! {
                () = tokio::time::sleep_until(deadline) => break,
                span = rx.recv() => match span {
                    Some(span) => batch.push(span),
                    None => break,
                },
            }
        }
        let n = batch.len() as u64;
        match tokio::time::timeout(settings.export_timeout, exporter.export(batch)).await {
            Ok(Ok(())) => {
                exported.inc_by(n);
                warned = false;
            }
            outcome => {
                failed.inc_by(n);
                if !warned {
                    let reason = match outcome {
                        Ok(Err(err)) => err.to_string(),
                        _ => format!("no answer within {:?}", settings.export_timeout),
                    };
                    tracing::warn!(endpoint = %settings.endpoint, spans = n, %reason, "cannot export spans to the OTLP collector; they are dropped");
                    warned = true;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn b3_single_and_multi_headers_are_read() {
        let mut headers = HeaderMap::new();
        headers.insert(
            "b3",
            HeaderValue::from_static("80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1"),
        );
        let context = b3_context(&headers).unwrap();
        assert_eq!(context.trace_id().to_string(), "80f198ee56343ba864fe8b2a57d3eff7");
        assert_eq!(context.span_id().to_string(), "e457b5a2e4d86bd1");
        assert!(context.is_sampled());

        let mut headers = HeaderMap::new();
        headers.insert("x-b3-traceid", HeaderValue::from_static("64fe8b2a57d3eff7"));
        headers.insert("x-b3-spanid", HeaderValue::from_static("e457b5a2e4d86bd1"));
        headers.insert("x-b3-sampled", HeaderValue::from_static("0"));
        let context = b3_context(&headers).unwrap();
        assert_eq!(context.trace_id().to_string(), "000000000000000064fe8b2a57d3eff7");
        assert!(!context.is_sampled());

        headers.insert("x-b3-spanid", HeaderValue::from_static("not-hex"));
        assert!(b3_context(&headers).is_none(), "a malformed id is no context");
    }

    #[test]
    fn samplers_are_read_from_the_sdks_variables() {
        assert_eq!(
            SamplerSetting::from_env("parentbased_traceidratio", Some("0.25")),
            Ok(SamplerSetting::ParentBasedTraceIdRatio(0.25))
        );
        assert_eq!(
            SamplerSetting::from_env("always_on", None),
            Ok(SamplerSetting::AlwaysOn)
        );
        assert!(
            SamplerSetting::from_env("traceidratio", Some("2"))
                .unwrap_err()
                .contains("\"2\"")
        );
        assert!(
            SamplerSetting::from_env("sometimes", None)
                .unwrap_err()
                .contains("\"sometimes\"")
        );
    }
}
