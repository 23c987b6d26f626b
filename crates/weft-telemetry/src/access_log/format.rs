//! Envoy's access-log format language: text with `%COMMAND%` operators, or JSON whose values are
//! such texts. One parser serves the proxy file's formats and those a control plane sends over xDS, so
//! an operator the proxy cannot fill is refused by name wherever it comes from.

use std::fmt::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

use http::HeaderName;

use super::{Entry, HeaderCapture};

/// Istio's default text format (`meshConfig.accessLogFormat` unset), the same fields in the same order,
/// so that tools parsing Istio's sidecar logs parse Weft's.
pub const ISTIO_TEXT: &str = "[%START_TIME%] \"%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%\" \
%RESPONSE_CODE% %RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS% %CONNECTION_TERMINATION_DETAILS% \
\"%UPSTREAM_TRANSPORT_FAILURE_REASON%\" %BYTES_RECEIVED% %BYTES_SENT% %DURATION% \
%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% \"%REQ(X-FORWARDED-FOR)%\" \"%REQ(USER-AGENT)%\" \
\"%REQ(X-REQUEST-ID)%\" \"%REQ(:AUTHORITY)%\" \"%UPSTREAM_HOST%\" %UPSTREAM_CLUSTER_RAW% \
%UPSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_REMOTE_ADDRESS% \
%REQUESTED_SERVER_NAME% %ROUTE_NAME%\n";

/// The JSON format's keys: Istio's JSON encoding's, plus the attempt count and the caller's identity.
pub const ISTIO_JSON: &[(&str, &str)] = &[
    ("start_time", "%START_TIME%"),
    ("method", "%REQ(:METHOD)%"),
    ("path", "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%"),
    ("protocol", "%PROTOCOL%"),
    ("response_code", "%RESPONSE_CODE%"),
    ("response_flags", "%RESPONSE_FLAGS%"),
    ("response_code_details", "%RESPONSE_CODE_DETAILS%"),
    (
        "connection_termination_details",
        "%CONNECTION_TERMINATION_DETAILS%",
    ),
    (
        "upstream_transport_failure_reason",
        "%UPSTREAM_TRANSPORT_FAILURE_REASON%",
    ),
    ("bytes_received", "%BYTES_RECEIVED%"),
    ("bytes_sent", "%BYTES_SENT%"),
    ("duration", "%DURATION%"),
    ("upstream_service_time", "%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)%"),
    ("x_forwarded_for", "%REQ(X-FORWARDED-FOR)%"),
    ("user_agent", "%REQ(USER-AGENT)%"),
    ("request_id", "%REQ(X-REQUEST-ID)%"),
    ("authority", "%REQ(:AUTHORITY)%"),
    ("upstream_host", "%UPSTREAM_HOST%"),
    ("upstream_cluster", "%UPSTREAM_CLUSTER%"),
    ("upstream_local_address", "%UPSTREAM_LOCAL_ADDRESS%"),
    ("downstream_local_address", "%DOWNSTREAM_LOCAL_ADDRESS%"),
    ("downstream_remote_address", "%DOWNSTREAM_REMOTE_ADDRESS%"),
    ("downstream_peer_uri_san", "%DOWNSTREAM_PEER_URI_SAN%"),
    ("requested_server_name", "%REQUESTED_SERVER_NAME%"),
    ("route_name", "%ROUTE_NAME%"),
    (
        "upstream_request_attempt_count",
        "%UPSTREAM_REQUEST_ATTEMPT_COUNT%",
    ),
];

/// A format that cannot be used, with the part that is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error("unsupported access log command %{0}%")]
    Unsupported(String),
    #[error("%{0}% is not closed by a '%'")]
    Unclosed(String),
    #[error("%{command}%: {why}")]
    Argument { command: String, why: &'static str },
    #[error(
        "JSON access log key \"{0}\" is not a string of commands (nested objects and other values are not supported)"
    )]
    JsonValue(String),
}

/// One value a command stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Command {
    StartTime,
    /// `%REQ(A?B):N%`: a request header, or `B` when `A` is absent, cut to `N` characters.
    Request(Header),
    Response(Header),
    Protocol,
    ResponseCode,
    ResponseFlags,
    ResponseCodeDetails,
    ConnectionTerminationDetails,
    UpstreamTransportFailureReason,
    BytesReceived,
    BytesSent,
    Duration,
    /// From the start to the upstream's response headers.
    ResponseDuration,
    UpstreamHost,
    UpstreamCluster,
    UpstreamLocalAddress,
    DownstreamLocalAddress,
    DownstreamRemoteAddress,
    DownstreamRemoteAddressWithoutPort,
    DownstreamPeerUriSan,
    RequestedServerName,
    RouteName,
    UpstreamRequestAttemptCount,
    TraceId,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Header {
    pub(crate) name: Field,
    pub(crate) fallback: Option<Field>,
    pub(crate) max_len: Option<usize>,
}

/// A header as a command names it: an HTTP/2 pseudo-header (which every HTTP entry carries) or a
/// header field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Field {
    Method,
    Path,
    Authority,
    Scheme,
    Named(HeaderName),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Text(String),
    Command(Command),
}

/// A text with commands: a whole text format, or one value of a JSON format.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template(Vec<Piece>);

/// How entries are written: one text per line, or one JSON object per line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Format {
    Text(Template),
    Json(Vec<(String, Template)>),
}

impl Format {
    /// A text format, written as given (Envoy's rule: the format carries its own line end).
    pub fn text(format: &str) -> Result<Self, FormatError> {
        Ok(Self::Text(Template::parse(format)?))
    }

    /// A JSON format from key / command-text pairs.
    pub fn json<'a>(fields: impl IntoIterator<Item = (&'a str, &'a str)>) -> Result<Self, FormatError> {
        fields
            .into_iter()
            .map(|(key, value)| Ok((key.to_owned(), Template::parse(value)?)))
            .collect::<Result<_, _>>()
            .map(Self::Json)
    }

    pub fn istio_text() -> Self {
        Self::text(ISTIO_TEXT).unwrap_or_else(|_| Self::Text(Template(Vec::new())))
    }

    pub fn istio_json() -> Self {
        Self::json(ISTIO_JSON.iter().copied()).unwrap_or_else(|_| Self::Json(Vec::new()))
    }

    /// The request and response headers this format reads, beyond what every entry carries.
    pub(crate) fn headers(&self, request: &mut Vec<HeaderName>, response: &mut Vec<HeaderName>) {
        let templates: Vec<&Template> = match self {
            Format::Text(t) => vec![t],
            Format::Json(fields) => fields.iter().map(|(_, t)| t).collect(),
        };
        for piece in templates.iter().flat_map(|t| t.0.iter()) {
            let (list, header) = match piece {
                Piece::Command(Command::Request(h)) => (&mut *request, h),
                Piece::Command(Command::Response(h)) => (&mut *response, h),
                _ => continue,
            };
            for field in std::iter::once(&header.name).chain(header.fallback.as_ref()) {
                if let Field::Named(name) = field
                    && !list.contains(name)
                {
                    list.push(name.clone());
                }
            }
        }
    }

    /// Appends the entry's line to `out`.
    pub fn write(&self, entry: &Entry, out: &mut String) {
        match self {
            Format::Text(template) => template.write_text(entry, out),
            Format::Json(fields) => {
                out.push('{');
                for (i, (key, template)) in fields.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    json_string(key, out);
                    out.push(':');
                    template.write_json(entry, out);
                }
                out.push_str("}\n");
            }
        }
    }
}

/// What a command yields for an entry.
enum Value<'a> {
    Missing,
    Number(u64),
    Text(std::borrow::Cow<'a, str>),
}

impl Template {
    fn parse(format: &str) -> Result<Self, FormatError> {
        let mut pieces = Vec::new();
        let mut rest = format;
        while let Some(start) = rest.find('%') {
            if start > 0 {
                pieces.push(Piece::Text(rest[..start].to_owned()));
            }
            let after = &rest[start + 1..];
            let Some(end) = command_end(after) else {
                return Err(FormatError::Unclosed(after.chars().take(40).collect()));
            };
            pieces.push(Piece::Command(command(&after[..end])?));
            rest = &after[end + 1..];
        }
        if !rest.is_empty() {
            pieces.push(Piece::Text(rest.to_owned()));
        }
        Ok(Self(pieces))
    }

    fn value<'a>(command: &Command, entry: &'a Entry) -> Value<'a> {
        use std::borrow::Cow::{Borrowed, Owned};
        let text = |s: Option<&'a str>| s.map_or(Value::Missing, |s| Value::Text(Borrowed(s)));
        let shown = |v: Option<String>| v.map_or(Value::Missing, |s| Value::Text(Owned(s)));
        let millis = |d: Option<std::time::Duration>| {
            d.map_or(Value::Missing, |d| {
                Value::Number(d.as_millis().try_into().unwrap_or(u64::MAX))
            })
        };
        match command {
            Command::StartTime => shown(entry.start.map(rfc3339_millis)),
            Command::Request(h) => header_value(h, &entry.request_headers, |field| match field {
                Field::Method => entry.method.as_ref().map(|m| m.as_str()),
                Field::Path => entry.path.as_ref().map(|p| p.as_str()),
                Field::Authority => entry.authority.as_ref().map(|a| a.as_str()),
                Field::Scheme => entry.method.as_ref().map(|_| "http"),
                Field::Named(_) => None,
            }),
            Command::Response(h) => header_value(h, &entry.response_headers, |_| None),
            Command::Protocol => text(entry.protocol),
            Command::ResponseCode => Value::Number(entry.response_code.into()),
            Command::ResponseFlags => Value::Text(Owned(entry.flags.to_string())),
            Command::ResponseCodeDetails => text(entry.details),
            Command::ConnectionTerminationDetails => Value::Missing,
            Command::UpstreamTransportFailureReason => text(entry.transport_failure.as_deref()),
            Command::BytesReceived => Value::Number(entry.bytes_received),
            Command::BytesSent => Value::Number(entry.bytes_sent),
            Command::Duration => millis(Some(entry.duration)),
            Command::ResponseDuration => millis(entry.response_duration),
            Command::UpstreamHost => shown(entry.upstream_host.map(|a| a.to_string())),
            Command::UpstreamCluster => text(entry.upstream_cluster.as_deref()),
            Command::UpstreamLocalAddress => shown(entry.upstream_local.map(|a| a.to_string())),
            Command::DownstreamLocalAddress => shown(entry.downstream_local.map(|a| a.to_string())),
            Command::DownstreamRemoteAddress => shown(entry.downstream_remote.map(|a| a.to_string())),
            Command::DownstreamRemoteAddressWithoutPort => {
                shown(entry.downstream_remote.map(|a| a.ip().to_string()))
            }
            Command::DownstreamPeerUriSan => text(entry.peer_uri_san.as_deref()),
            Command::RequestedServerName => text(entry.requested_server_name.as_deref()),
            Command::RouteName => text(entry.route_name.as_deref()),
            Command::TraceId => text(entry.trace_id.as_deref()),
            Command::UpstreamRequestAttemptCount => match entry.method {
                Some(_) => Value::Number(entry.attempts.into()),
                None => Value::Missing,
            },
        }
    }

    fn write_text(&self, entry: &Entry, out: &mut String) {
        for piece in &self.0 {
            match piece {
                Piece::Text(text) => out.push_str(text),
                Piece::Command(command) => match Self::value(command, entry) {
                    Value::Missing => out.push('-'),
                    Value::Number(n) => {
                        let _ = write!(out, "{n}");
                    }
                    Value::Text(t) if t.is_empty() => out.push('-'),
                    Value::Text(t) => out.push_str(&t),
                },
            }
        }
    }

    /// One command alone keeps its type (a number, or `null` when missing); anything else is a string.
    fn write_json(&self, entry: &Entry, out: &mut String) {
        if let [Piece::Command(command)] = self.0.as_slice() {
            match Self::value(command, entry) {
                Value::Missing => out.push_str("null"),
                Value::Number(n) => {
                    let _ = write!(out, "{n}");
                }
                Value::Text(t) => json_string(&t, out),
            }
            return;
        }
        let mut text = String::new();
        self.write_text(entry, &mut text);
        json_string(&text, out);
    }
}

/// Where a command ends: the next `%` outside the command's parentheses.
fn command_end(s: &str) -> Option<usize> {
    let mut depth = 0usize;
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            '%' if depth == 0 => return Some(i),
            _ => {}
        }
    }
    None
}

fn command(text: &str) -> Result<Command, FormatError> {
    let (name, argument, max_len) = match text.split_once('(') {
        None => (text, None, None),
        Some((name, rest)) => {
            let (argument, after) = rest.split_once(')').ok_or(FormatError::Argument {
                command: text.to_owned(),
                why: "the argument is not closed by ')'",
            })?;
            let max_len = match after.strip_prefix(':') {
                None if after.is_empty() => None,
                None => {
                    return Err(FormatError::Argument {
                        command: text.to_owned(),
                        why: "only a ':length' may follow the argument",
                    });
                }
                Some(n) => Some(n.parse::<usize>().map_err(|_| FormatError::Argument {
                    command: text.to_owned(),
                    why: "the length after ':' is not a number",
                })?),
            };
            (name, Some(argument), max_len)
        }
    };
    let header = |argument: Option<&str>| -> Result<Header, FormatError> {
        let bad = |why| FormatError::Argument {
            command: text.to_owned(),
            why,
        };
        let argument = argument.ok_or_else(|| bad("needs a header name in parentheses"))?;
        let (name, fallback) = match argument.split_once('?') {
            Some((a, b)) => (a, Some(b)),
            None => (argument, None),
        };
        let parse = |n: &str| match n.to_ascii_lowercase().as_str() {
            ":method" => Ok(Field::Method),
            ":path" => Ok(Field::Path),
            ":authority" => Ok(Field::Authority),
            ":scheme" => Ok(Field::Scheme),
            lower => HeaderName::from_bytes(lower.as_bytes())
                .map(Field::Named)
                .map_err(|_| bad("not a header name")),
        };
        Ok(Header {
            name: parse(name)?,
            fallback: fallback.map(parse).transpose()?,
            max_len,
        })
    };
    let plain = |c: Command| match argument {
        None => Ok(c),
        Some(_) => Err(FormatError::Argument {
            command: text.to_owned(),
            why: "takes no argument",
        }),
    };
    match name {
        "REQ" => header(argument).map(Command::Request),
        "RESP" => header(argument).map(Command::Response),
        "START_TIME" => plain(Command::StartTime).map_err(|_| FormatError::Argument {
            command: text.to_owned(),
            why: "a custom time format is not supported; %START_TIME% writes RFC 3339 in UTC with milliseconds",
        }),
        "PROTOCOL" => plain(Command::Protocol),
        "RESPONSE_CODE" => plain(Command::ResponseCode),
        "RESPONSE_FLAGS" => plain(Command::ResponseFlags),
        "RESPONSE_CODE_DETAILS" => plain(Command::ResponseCodeDetails),
        "CONNECTION_TERMINATION_DETAILS" => plain(Command::ConnectionTerminationDetails),
        "UPSTREAM_TRANSPORT_FAILURE_REASON" => plain(Command::UpstreamTransportFailureReason),
        "BYTES_RECEIVED" => plain(Command::BytesReceived),
        "BYTES_SENT" => plain(Command::BytesSent),
        "DURATION" => plain(Command::Duration),
        "RESPONSE_DURATION" => plain(Command::ResponseDuration),
        "UPSTREAM_HOST" => plain(Command::UpstreamHost),
        "UPSTREAM_CLUSTER" | "UPSTREAM_CLUSTER_RAW" => plain(Command::UpstreamCluster),
        "UPSTREAM_LOCAL_ADDRESS" => plain(Command::UpstreamLocalAddress),
        "DOWNSTREAM_LOCAL_ADDRESS" => plain(Command::DownstreamLocalAddress),
        "DOWNSTREAM_REMOTE_ADDRESS" | "DOWNSTREAM_DIRECT_REMOTE_ADDRESS" => {
            plain(Command::DownstreamRemoteAddress)
        }
        "DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT" | "DOWNSTREAM_DIRECT_REMOTE_ADDRESS_WITHOUT_PORT" => {
            plain(Command::DownstreamRemoteAddressWithoutPort)
        }
        "DOWNSTREAM_PEER_URI_SAN" => plain(Command::DownstreamPeerUriSan),
        "REQUESTED_SERVER_NAME" => plain(Command::RequestedServerName),
        "ROUTE_NAME" => plain(Command::RouteName),
        "UPSTREAM_REQUEST_ATTEMPT_COUNT" => plain(Command::UpstreamRequestAttemptCount),
        "TRACE_ID" => plain(Command::TraceId),
        _ => Err(FormatError::Unsupported(text.to_owned())),
    }
}

fn header_value<'a>(
    header: &Header,
    captured: &'a HeaderCapture,
    pseudo: impl Fn(&Field) -> Option<&'a str>,
) -> Value<'a> {
    use std::borrow::Cow;
    let find = |field: &Field| -> Option<Cow<'a, str>> {
        match field {
            Field::Named(name) => captured
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| String::from_utf8_lossy(v.as_bytes())),
            field => pseudo(field).map(Cow::Borrowed),
        }
    };
    let Some(mut value) = find(&header.name).or_else(|| header.fallback.as_ref().and_then(find)) else {
        return Value::Missing;
    };
    if let Some(max) = header.max_len
        && let Some((cut, _)) = value.char_indices().nth(max)
    {
        value = Cow::Owned(value[..cut].to_owned());
    }
    Value::Text(value)
}

/// `2026-12-02T17:30:05.123Z`, Envoy's default `%START_TIME%`.
fn rfc3339_millis(at: SystemTime) -> String {
    let since = at.duration_since(UNIX_EPOCH).unwrap_or_default();
    let nanos = i128::try_from(since.as_nanos()).unwrap_or(0);
    match time::OffsetDateTime::from_unix_timestamp_nanos(nanos) {
        Ok(t) => format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second(),
            t.millisecond()
        ),
        Err(_) => "-".to_owned(),
    }
}

fn json_string(s: &str, out: &mut String) {
    match serde_json::to_string(s) {
        Ok(quoted) => out.push_str(&quoted),
        Err(_) => out.push_str("\"\""),
    }
}

/// A JSON format from a control plane's `json_format` (a `google.protobuf.Struct`): every value must be
/// a string of commands.
pub fn json_fields<'a>(
    fields: impl IntoIterator<Item = (&'a str, Option<&'a str>)>,
) -> Result<Format, FormatError> {
    let mut pairs = Vec::new();
    for (key, value) in fields {
        let value = value.ok_or_else(|| FormatError::JsonValue(key.to_owned()))?;
        pairs.push((key, value));
    }
    Format::json(pairs)
}
