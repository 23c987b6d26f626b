//! The pod's status port (15020, Istio's): what the kubelet and Prometheus reach from outside the
//! pod. The app's own probes, rewritten by the injector to point here, are carried out by the proxy
//! against the app on the pod's address, so they keep working when the app's ports require mutual TLS.
//! Their definitions come from the injector in Istio's environment variables and JSON shapes.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The injector's rewritten probes: `{"/app-health/<container>/livez": {"httpGet": {...}}, ...}`.
pub const APP_PROBERS_ENV: &str = "ISTIO_KUBE_APP_PROBERS";
/// The app's own `prometheus.io/*` annotations, moved aside by the injector: `{"scrape": "true",
/// "port": "9090", "path": "/metrics"}`.
pub const APP_METRICS_ENV: &str = "ISTIO_PROMETHEUS_ANNOTATIONS";

/// Kubelet's default probe timeout.
const DEFAULT_PROBE_TIMEOUT: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Serialize)]
pub struct StatusSettings {
    pub address: SocketAddr,
    /// Where the app is probed and scraped: the pod's address (or loopback outside a pod).
    pub app_host: IpAddr,
    /// The source address of those connections: 127.0.0.6 in a pod, so capture leaves them alone.
    pub source: Option<IpAddr>,
    /// By path (`/app-health/<container>/<livez|readyz|startupz>`).
    pub app_probes: BTreeMap<String, AppProbe>,
    /// The app's metrics, merged into `/stats/prometheus`.
    pub app_metrics: Option<AppMetrics>,
}

/// One of the app's probes, as the kubelet would have run it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AppProbe {
    pub action: ProbeAction,
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ProbeAction {
    /// Success is a status from 200 to 399.
    Http {
        port: u16,
        path: String,
        /// `Host` (and the address probed, as the kubelet does) when the probe names one.
        host: Option<String>,
        headers: Vec<(String, String)>,
    },
    /// Success is a connection.
    Tcp { port: u16 },
    /// Success is `SERVING` from `grpc.health.v1.Health/Check`.
    Grpc { port: u16, service: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AppMetrics {
    pub port: u16,
    pub path: String,
}

/// Kubernetes' probe fields in Istio's JSON (ports already numbers).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ProbeJson {
    http_get: Option<HttpGetJson>,
    tcp_socket: Option<PortJson>,
    grpc: Option<GrpcJson>,
    timeout_seconds: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct HttpGetJson {
    port: u16,
    path: Option<String>,
    host: Option<String>,
    scheme: Option<String>,
    #[serde(default)]
    http_headers: Vec<HeaderJson>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct HeaderJson {
    name: String,
    value: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PortJson {
    port: u16,
    #[serde(default)]
    host: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct GrpcJson {
    port: u16,
    #[serde(default)]
    service: Option<String>,
}

/// Reads [`APP_PROBERS_ENV`]'s JSON; the error names the probe and the problem.
pub fn parse_app_probes(json: &str) -> Result<BTreeMap<String, AppProbe>, String> {
    let probes: BTreeMap<String, ProbeJson> = serde_json::from_str(json).map_err(|e| e.to_string())?;
    probes
        .into_iter()
        .map(|(path, probe)| {
            if !path.starts_with("/app-health/") {
                return Err(format!("{path}: a probe's path starts with /app-health/"));
            }
            let action = match (probe.http_get, probe.tcp_socket, probe.grpc) {
                (Some(http), None, None) => {
                    if let Some(scheme) = http.scheme.filter(|s| !s.eq_ignore_ascii_case("HTTP")) {
                        return Err(format!(
                            "{path}: httpGet.scheme {scheme}: only HTTP probes are carried out"
                        ));
                    }
                    ProbeAction::Http {
                        port: http.port,
                        path: http.path.unwrap_or_else(|| "/".into()),
                        host: http.host.filter(|h| !h.is_empty()),
                        headers: http.http_headers.into_iter().map(|h| (h.name, h.value)).collect(),
                    }
                }
                (None, Some(tcp), None) if tcp.host.is_none() => ProbeAction::Tcp { port: tcp.port },
                (None, Some(_), None) => {
                    return Err(format!("{path}: tcpSocket.host: only the pod is probed"));
                }
                (None, None, Some(grpc)) => ProbeAction::Grpc {
                    port: grpc.port,
                    service: grpc.service.unwrap_or_default(),
                },
                _ => return Err(format!("{path}: exactly one of httpGet, tcpSocket, grpc")),
            };
            let timeout = probe
                .timeout_seconds
                .map_or(DEFAULT_PROBE_TIMEOUT, Duration::from_secs)
                .max(DEFAULT_PROBE_TIMEOUT);
            Ok((path, AppProbe { action, timeout }))
        })
        .collect()
}

/// Reads [`APP_METRICS_ENV`]'s JSON; `None` when the app's metrics are not to be scraped.
pub fn parse_app_metrics(json: &str) -> Result<Option<AppMetrics>, String> {
    let map: BTreeMap<String, String> = serde_json::from_str(json).map_err(|e| e.to_string())?;
    if map.get("scrape").is_some_and(|s| s != "true") {
        return Ok(None);
    }
    let port = map
        .get("port")
        .ok_or("port: missing")?
        .parse()
        .map_err(|e| format!("port: {e}"))?;
    let path = map.get("path").cloned().unwrap_or_else(|| "/metrics".into());
    if !path.starts_with('/') {
        return Err(format!("path \"{path}\": must start with /"));
    }
    Ok(Some(AppMetrics { port, path }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probes_read_as_istio_writes_them() {
        let probes = parse_app_probes(
            r#"{"/app-health/web/livez":{"httpGet":{"path":"/health","port":9080,"scheme":"HTTP","httpHeaders":[{"name":"X-Probe","value":"1"}]},"timeoutSeconds":3},
                "/app-health/web/readyz":{"tcpSocket":{"port":9080}},
                "/app-health/web/startupz":{"grpc":{"port":9090}}}"#,
        )
        .unwrap();
        assert_eq!(
            probes["/app-health/web/livez"],
            AppProbe {
                action: ProbeAction::Http {
                    port: 9080,
                    path: "/health".into(),
                    host: None,
                    headers: vec![("X-Probe".into(), "1".into())]
                },
                timeout: Duration::from_secs(3)
            }
        );
        assert_eq!(
            probes["/app-health/web/readyz"].action,
            ProbeAction::Tcp { port: 9080 }
        );
        assert_eq!(probes["/app-health/web/readyz"].timeout, Duration::from_secs(1));
        assert_eq!(
            probes["/app-health/web/startupz"].action,
            ProbeAction::Grpc {
                port: 9090,
                service: String::new()
            }
        );
        for (bad, why) in [
            (
                r#"{"/other":{"tcpSocket":{"port":1}}}"#,
                "starts with /app-health/",
            ),
            (
                r#"{"/app-health/a/livez":{"httpGet":{"port":1,"scheme":"HTTPS"}}}"#,
                "only HTTP probes",
            ),
            (r#"{"/app-health/a/livez":{}}"#, "exactly one of"),
            (r#"{"/app-health/a/livez":{"exec":{}}}"#, "unknown field `exec`"),
            (
                r#"{"/app-health/a/livez":{"tcpSocket":{"port":"http"}}}"#,
                "invalid type",
            ),
        ] {
            let err = parse_app_probes(bad).unwrap_err();
            assert!(err.contains(why), "{bad}: {err}");
        }
    }

    #[test]
    fn app_metrics_read_as_istio_writes_them() {
        assert_eq!(
            parse_app_metrics(r#"{"scrape":"true","port":"9102","path":"/stats"}"#).unwrap(),
            Some(AppMetrics {
                port: 9102,
                path: "/stats".into()
            })
        );
        assert_eq!(
            parse_app_metrics(r#"{"scrape":"false","port":"1"}"#).unwrap(),
            None
        );
        assert!(
            parse_app_metrics(r#"{"scrape":"true"}"#)
                .unwrap_err()
                .contains("port")
        );
    }
}
