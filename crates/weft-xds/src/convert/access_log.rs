//! `access_log` of an HTTP connection manager or a TCP proxy: Envoy's file, stdout and stderr loggers,
//! with text or JSON formats. Filters, other loggers and format options the proxy cannot honour are
//! refused by field, never skipped: a control plane asking for a filtered log must not get every
//! line, nor believe it gets one it does not.

use std::sync::Arc;

use envoy_types::pb::envoy::config::accesslog::v3::AccessLog;
use envoy_types::pb::envoy::config::accesslog::v3::access_log::ConfigType;
use envoy_types::pb::envoy::config::core::v3::SubstitutionFormatString;
use envoy_types::pb::envoy::config::core::v3::data_source::Specifier;
use envoy_types::pb::envoy::config::core::v3::substitution_format_string::Format as XFormat;
use envoy_types::pb::envoy::extensions::access_loggers::file::v3::FileAccessLog;
use envoy_types::pb::envoy::extensions::access_loggers::file::v3::file_access_log::AccessLogFormat;
use envoy_types::pb::envoy::extensions::access_loggers::stream::v3::{StderrAccessLog, StdoutAccessLog};
use envoy_types::pb::google::protobuf::{Struct, value::Kind};
use weft_telemetry::access_log::{AccessLogConfig, AccessLogSet, Format, Sink, json_fields};

use super::common::{Ctx, ResourceError, decode};

const FILE: &str = "envoy.extensions.access_loggers.file.v3.FileAccessLog";
const STDOUT: &str = "envoy.extensions.access_loggers.stream.v3.StdoutAccessLog";
const STDERR: &str = "envoy.extensions.access_loggers.stream.v3.StderrAccessLog";

/// Envoy's own default format, for a logger that names none.
const ENVOY_DEFAULT: &str = "[%START_TIME%] \"%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%\" \
%RESPONSE_CODE% %RESPONSE_FLAGS% %BYTES_RECEIVED% %BYTES_SENT% %DURATION% \
%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% \"%REQ(X-FORWARDED-FOR)%\" \"%REQ(USER-AGENT)%\" \
\"%REQ(X-REQUEST-ID)%\" \"%REQ(:AUTHORITY)%\" \"%UPSTREAM_HOST%\"\n";

pub(crate) fn access_logs(
    ctx: &Ctx<'_>,
    field: &str,
    logs: &[AccessLog],
) -> Result<Vec<AccessLogConfig>, ResourceError> {
    logs.iter()
        .enumerate()
        .map(|(i, log)| access_log(ctx, &format!("{field}[{i}]"), log))
        .collect()
}

fn access_log(ctx: &Ctx<'_>, field: &str, log: &AccessLog) -> Result<AccessLogConfig, ResourceError> {
    if log.filter.is_some() {
        return Err(ctx.err(
            format!("{field}.filter"),
            "access log filters are not supported (every request would be logged)",
        ));
    }
    let Some(ConfigType::TypedConfig(any)) = &log.config_type else {
        return Err(ctx.err(format!("{field}.typed_config"), "missing"));
    };
    let typed = format!("{field}.typed_config");
    let decoded = |e: ResourceError| ctx.err(typed.clone(), e.problem);
    let (sink, format) = match any.type_url.rsplit('/').next().unwrap_or_default() {
        FILE => {
            let file: FileAccessLog = decode(any).map_err(decoded)?;
            if file.path.is_empty() {
                return Err(ctx.err(format!("{typed}.path"), "must not be empty"));
            }
            #[allow(deprecated)]
            let format = match &file.access_log_format {
                None => text(ctx, &format!("{typed}.format"), ENVOY_DEFAULT)?,
                Some(AccessLogFormat::Format(s)) if s.is_empty() => {
                    text(ctx, &format!("{typed}.format"), ENVOY_DEFAULT)?
                }
                Some(AccessLogFormat::Format(s)) => text(ctx, &format!("{typed}.format"), s)?,
                Some(AccessLogFormat::JsonFormat(s) | AccessLogFormat::TypedJsonFormat(s)) => {
                    json(ctx, &format!("{typed}.json_format"), s)?
                }
                Some(AccessLogFormat::LogFormat(f)) => substitution(ctx, &format!("{typed}.log_format"), f)?,
            };
            (Sink::parse(&file.path), format)
        }
        STDOUT | STDERR => {
            let (sink, log_format) = if any.type_url.ends_with(STDOUT) {
                let out: StdoutAccessLog = decode(any).map_err(decoded)?;
                (Sink::Stdout, out.access_log_format.map(|f| match f {
                    envoy_types::pb::envoy::extensions::access_loggers::stream::v3::stdout_access_log::AccessLogFormat::LogFormat(f) => f,
                }))
            } else {
                let err: StderrAccessLog = decode(any).map_err(decoded)?;
                (Sink::Stderr, err.access_log_format.map(|f| match f {
                    envoy_types::pb::envoy::extensions::access_loggers::stream::v3::stderr_access_log::AccessLogFormat::LogFormat(f) => f,
                }))
            };
            let format = match &log_format {
                None => text(ctx, &format!("{typed}.log_format"), ENVOY_DEFAULT)?,
                Some(f) => substitution(ctx, &format!("{typed}.log_format"), f)?,
            };
            (sink, format)
        }
        other => {
            return Err(ctx.err(
                typed,
                format!("unsupported access logger {other} (file, stdout and stderr loggers are)"),
            ));
        }
    };
    Ok(AccessLogConfig {
        sink,
        format: Arc::new(format),
    })
}

fn substitution(ctx: &Ctx<'_>, field: &str, f: &SubstitutionFormatString) -> Result<Format, ResourceError> {
    if f.omit_empty_values {
        return Err(ctx.err(format!("{field}.omit_empty_values"), "is not supported"));
    }
    if !f.formatters.is_empty() {
        return Err(ctx.err(
            format!("{field}.formatters"),
            "formatter extensions are not supported",
        ));
    }
    #[allow(deprecated)]
    match &f.format {
        None => text(ctx, field, ENVOY_DEFAULT),
        Some(XFormat::TextFormat(s)) => text(ctx, &format!("{field}.text_format"), s),
        Some(XFormat::JsonFormat(s)) => json(ctx, &format!("{field}.json_format"), s),
        Some(XFormat::TextFormatSource(source)) => match &source.specifier {
            Some(Specifier::InlineString(s)) => {
                text(ctx, &format!("{field}.text_format_source.inline_string"), s)
            }
            Some(Specifier::InlineBytes(b)) => {
                let s = std::str::from_utf8(b)
                    .map_err(|_| ctx.err(format!("{field}.text_format_source.inline_bytes"), "not UTF-8"))?;
                text(ctx, &format!("{field}.text_format_source.inline_bytes"), s)
            }
            _ => Err(ctx.err(
                format!("{field}.text_format_source"),
                "only inline_string and inline_bytes are supported",
            )),
        },
    }
}

fn text(ctx: &Ctx<'_>, field: &str, format: &str) -> Result<Format, ResourceError> {
    Format::text(format).map_err(|e| ctx.err(field, e.to_string()))
}

fn json(ctx: &Ctx<'_>, field: &str, format: &Struct) -> Result<Format, ResourceError> {
    // A Struct's fields are a map: sorted by key, so two pushes of the same format compare equal.
    let mut keys: Vec<&String> = format.fields.keys().collect();
    keys.sort();
    json_fields(keys.into_iter().map(|key| {
        let value = match format.fields.get(key).and_then(|v| v.kind.as_ref()) {
            Some(Kind::StringValue(s)) => Some(s.as_str()),
            _ => None,
        };
        (key.as_str(), value)
    }))
    .map_err(|e| ctx.err(field, e.to_string()))
}

/// One set for a listener from its chains' sets: chains that log differently are refused, since the
/// proxy keeps one access log per listener.
pub(crate) fn one_set(
    ctx: &Ctx<'_>,
    chains: impl IntoIterator<Item = (String, Vec<AccessLogConfig>)>,
) -> Result<Arc<AccessLogSet>, ResourceError> {
    let mut first: Option<(String, Vec<AccessLogConfig>)> = None;
    for (field, logs) in chains {
        if logs.is_empty() {
            continue;
        }
        match &first {
            None => first = Some((field, logs)),
            Some((seen_at, seen)) if *seen != logs => {
                return Err(ctx.err(
                    field,
                    format!("access logs differ from those of {seen_at}; a listener has one access log"),
                ));
            }
            Some(_) => {}
        }
    }
    Ok(match first {
        Some((_, logs)) => Arc::new(AccessLogSet::new(logs)),
        None => AccessLogSet::off(),
    })
}
