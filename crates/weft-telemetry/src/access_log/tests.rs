#![allow(clippy::unwrap_used)]

use std::time::{Duration, UNIX_EPOCH};

use super::*;

fn request_entry() -> Entry {
    Entry {
        start: Some(UNIX_EPOCH + Duration::from_millis(1_764_696_605_123)),
        method: Some(http::Method::GET),
        path: Some(http::uri::PathAndQuery::from_static("/api/v1?x=1")),
        authority: Some(http::uri::Authority::from_static("reviews.default:9080")),
        protocol: Some("HTTP/1.1"),
        response_code: 503,
        flags: ResponseFlags::UPSTREAM_CONNECT_FAILURE | ResponseFlags::UPSTREAM_RETRY_LIMIT_EXCEEDED,
        details: Some("upstream_reset_before_response_started{connection_failure}"),
        transport_failure: Some("connection refused".into()),
        bytes_received: 12,
        bytes_sent: 91,
        duration: Duration::from_millis(37),
        response_duration: None,
        upstream_host: Some("10.0.0.7:9080".parse().unwrap()),
        upstream_cluster: Some("outbound|9080||reviews.default.svc.cluster.local".into()),
        upstream_local: None,
        downstream_local: Some("10.96.0.10:9080".parse().unwrap()),
        downstream_remote: Some("10.0.0.3:51234".parse().unwrap()),
        peer_uri_san: Some("spiffe://cluster.local/ns/default/sa/productpage".into()),
        requested_server_name: None,
        route_name: Some("default".into()),
        attempts: 3,
        trace_id: Some("4bf92f3577b34da6a3ce929d0e0e4736".into()),
        request_headers: vec![
            (
                HeaderName::from_static("user-agent"),
                HeaderValue::from_static("curl/8.5.0"),
            ),
            (
                HeaderName::from_static("x-request-id"),
                HeaderValue::from_static("6f1d3c4e-8a5b-4c2d-9e1f-0a1b2c3d4e5f"),
            ),
        ],
        response_headers: vec![],
    }
}

fn line(format: &Format, entry: &Entry) -> String {
    let mut out = String::new();
    format.write(entry, &mut out);
    out
}

#[test]
fn istio_text_format_prints_each_field_in_istios_order() {
    let text = line(&Format::istio_text(), &request_entry());
    assert_eq!(
        text,
        "[2025-12-02T17:30:05.123Z] \"GET /api/v1?x=1 HTTP/1.1\" 503 UF,URX \
         upstream_reset_before_response_started{connection_failure} - \"connection refused\" 12 91 37 - \
         \"-\" \"curl/8.5.0\" \"6f1d3c4e-8a5b-4c2d-9e1f-0a1b2c3d4e5f\" \"reviews.default:9080\" \
         \"10.0.0.7:9080\" outbound|9080||reviews.default.svc.cluster.local - 10.96.0.10:9080 \
         10.0.0.3:51234 - default\n"
    );
}

#[test]
fn a_tcp_connection_prints_dashes_where_it_has_no_http() {
    let entry = Entry {
        response_code: 0,
        bytes_received: 5,
        bytes_sent: 7,
        upstream_cluster: Some("outbound|5432||db".into()),
        ..Entry::default()
    };
    let text = line(&Format::istio_text(), &entry);
    assert!(text.starts_with("[-] \"- - -\" 0 - - - \"-\" 5 7 0 - "), "{text}");
    let json: serde_json::Value = serde_json::from_str(&line(&Format::istio_json(), &entry)).unwrap();
    assert_eq!(json["method"], serde_json::Value::Null);
    assert_eq!(json["upstream_request_attempt_count"], serde_json::Value::Null);
    assert_eq!(json["bytes_sent"], 7);
}

#[test]
fn json_format_keeps_numbers_as_numbers_and_missing_values_as_null() {
    let text = line(&Format::istio_json(), &request_entry());
    assert!(text.ends_with("}\n"));
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(json["method"], "GET");
    assert_eq!(json["path"], "/api/v1?x=1");
    assert_eq!(json["response_code"], 503);
    assert_eq!(json["response_flags"], "UF,URX");
    assert_eq!(json["duration"], 37);
    assert_eq!(json["upstream_service_time"], serde_json::Value::Null);
    assert_eq!(json["request_id"], "6f1d3c4e-8a5b-4c2d-9e1f-0a1b2c3d4e5f");
    assert_eq!(
        json["downstream_peer_uri_san"],
        "spiffe://cluster.local/ns/default/sa/productpage"
    );
    assert_eq!(json["upstream_request_attempt_count"], 3);
    assert_eq!(json.as_object().unwrap().len(), ISTIO_JSON.len());
}

#[test]
fn headers_fall_back_and_are_cut_to_length() {
    let format =
        Format::text("%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %REQ(USER-AGENT):4% %REQ(:method)%|%RESP(server)%")
            .unwrap();
    assert_eq!(line(&format, &request_entry()), "/api/v1?x=1 curl GET|-");
    let mut entry = request_entry();
    entry.request_headers.push((
        HeaderName::from_static("x-envoy-original-path"),
        HeaderValue::from_static("/before-rewrite"),
    ));
    assert!(line(&format, &entry).starts_with("/before-rewrite "));
}

#[test]
fn json_values_mixing_text_and_commands_are_strings() {
    let format = Format::json([
        ("line", "%REQ(:METHOD)% %RESPONSE_CODE%"),
        ("code", "%RESPONSE_CODE%"),
        ("trace", "%TRACE_ID%"),
    ])
    .unwrap();
    let json: serde_json::Value = serde_json::from_str(&line(&format, &request_entry())).unwrap();
    assert_eq!(json["line"], "GET 503");
    assert_eq!(json["code"], 503);
    assert_eq!(json["trace"], "4bf92f3577b34da6a3ce929d0e0e4736");
}

#[test]
fn formats_the_proxy_cannot_fill_are_refused_by_name() {
    let err = Format::text("%START_TIME% %DYNAMIC_METADATA(istio.mixer:status)%\n").unwrap_err();
    assert_eq!(
        err.to_string(),
        "unsupported access log command %DYNAMIC_METADATA(istio.mixer:status)%"
    );
    let err = Format::text("%START_TIME(%s)%").unwrap_err();
    assert!(err.to_string().contains("custom time format"), "{err}");
    assert!(matches!(Format::text("%DURATION"), Err(FormatError::Unclosed(_))));
    assert!(matches!(
        Format::text("%REQ(a b)%"),
        Err(FormatError::Argument { .. })
    ));
    assert!(matches!(
        Format::text("%REQ(x):ten%"),
        Err(FormatError::Argument { .. })
    ));
    assert!(matches!(
        Format::text("%BYTES_SENT(x)%"),
        Err(FormatError::Argument { .. })
    ));
    let err = json_fields([("nested", None)]).unwrap_err();
    assert!(err.to_string().contains("\"nested\""), "{err}");
}

#[test]
fn headers_a_format_prints_are_the_only_ones_captured() {
    let writers = AccessLogWriters::new(&Metrics::new());
    let set = Arc::new(AccessLogSet::new(vec![AccessLogConfig {
        sink: Sink::Stderr,
        format: Arc::new(Format::text("%REQ(x-a?x-b)% %RESP(x-c)% %REQ(:path)%\n").unwrap()),
    }]));
    let logs = writers.open(&set).unwrap().unwrap();
    let mut headers = HeaderMap::new();
    for name in ["x-a", "x-b", "x-c", "x-d"] {
        headers.insert(HeaderName::from_static(name), HeaderValue::from_static("v"));
    }
    let names = |c: HeaderCapture| c.into_iter().map(|(n, _)| n.to_string()).collect::<Vec<_>>();
    assert_eq!(names(logs.capture_request(&headers)), ["x-a", "x-b"]);
    assert_eq!(names(logs.capture_response(&headers)), ["x-c"]);
    assert!(writers.open(&AccessLogSet::off()).unwrap().is_none());
}

#[test]
fn a_full_buffer_drops_entries_and_counts_them() {
    let metrics = Metrics::new();
    let format = Arc::new(Format::istio_text());
    let logs = AccessLogs {
        set: Arc::new(AccessLogSet::new(vec![AccessLogConfig {
            sink: Sink::Stdout,
            format: format.clone(),
        }])),
        // No writer takes these lines.
        pending: vec![Arc::new(Pending::default())],
        dropped: metrics.access_log_dropped.clone(),
    };
    let mut line = String::new();
    format.write(&request_entry(), &mut line);
    let fit = PENDING / line.len();
    for _ in 0..fit + 10 {
        logs.log(request_entry());
    }
    assert_eq!(metrics.access_log_dropped.get(), 10);
    let kept = logs.pending[0].lines.lock().unwrap().len();
    assert_eq!(kept, fit * line.len(), "whole lines only");
}

#[test]
fn entries_reach_a_file_and_an_unwritable_path_is_named() {
    let dir = std::env::temp_dir().join(format!("weft-access-log-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("access.log");
    let _ = std::fs::remove_file(&path);
    let metrics = Metrics::new();
    let writers = AccessLogWriters::new(&metrics);
    let set = Arc::new(AccessLogSet::new(vec![AccessLogConfig {
        sink: Sink::File(path.clone()),
        format: Arc::new(Format::istio_json()),
    }]));
    let logs = writers.open(&set).unwrap().unwrap();
    for _ in 0..1000 {
        logs.log(request_entry());
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let lines = loop {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        if text.lines().count() >= 1000 || std::time::Instant::now() > deadline {
            break text;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(lines.lines().count(), 1000);
    for line in lines.lines() {
        let json: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(json["response_code"], 503);
    }
    assert_eq!(metrics.access_log_dropped.get(), 0);
    let unwritable = Arc::new(AccessLogSet::new(vec![AccessLogConfig {
        sink: Sink::File(dir.join("missing-dir").join("access.log")),
        format: Arc::new(Format::istio_text()),
    }]));
    let err = writers.open(&unwritable).unwrap_err();
    assert!(err.to_string().contains("missing-dir/access.log"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn sinks_read_istios_paths_as_the_streams() {
    assert_eq!(Sink::parse("/dev/stdout"), Sink::Stdout);
    assert_eq!(Sink::parse("stderr"), Sink::Stderr);
    assert_eq!(
        Sink::parse("/var/log/weft.log"),
        Sink::File("/var/log/weft.log".into())
    );
}
