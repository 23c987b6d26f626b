//! The app's kubelet probes rewritten to the proxy's status port (15020), as Istio does: the kubelet
//! cannot present a mesh certificate, so under STRICT mutual TLS a probe to the app's own port would
//! be refused. The proxy carries out each original probe against the app on the pod's address and
//! answers the kubelet with its outcome. The originals travel to the proxy in
//! `ISTIO_KUBE_APP_PROBERS`, Istio's variable and JSON shape.

use serde_json::json;
use serde_yaml_ng::{Mapping, Value};

/// The proxy's status port.
pub(crate) const STATUS_PORT: u16 = 15020;
pub(crate) const APP_PROBERS_ENV: &str = "ISTIO_KUBE_APP_PROBERS";

const KINDS: [(&str, &str); 3] = [
    ("livenessProbe", "livez"),
    ("readinessProbe", "readyz"),
    ("startupProbe", "startupz"),
];

/// Rewrites the probes of `containers` (each checked to have a name) and returns the originals by
/// their new path, with what could not be rewritten as warnings.
pub(crate) fn rewrite(
    containers: &mut [Value],
    at: &dyn Fn(&str) -> String,
    warnings: &mut Vec<String>,
) -> Result<serde_json::Map<String, serde_json::Value>, String> {
    let mut probers = serde_json::Map::new();
    for (i, container) in containers.iter_mut().enumerate() {
        let Some(container) = container.as_mapping_mut() else {
            continue;
        };
        let name = container
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        let ports = named_ports(container);
        for (kind, suffix) in KINDS {
            let field = at(&format!("spec.containers[{i}].{kind}"));
            let Some(probe) = container.get_mut(kind).and_then(Value::as_mapping_mut) else {
                continue;
            };
            let timeout = probe.get("timeoutSeconds").and_then(Value::as_u64);
            let original = if let Some(http) = probe.get("httpGet").and_then(Value::as_mapping) {
                let scheme = http.get("scheme").and_then(Value::as_str).unwrap_or("HTTP");
                if !scheme.eq_ignore_ascii_case("HTTP") {
                    warnings.push(format!(
                        "{field}: an {scheme} probe is left as it is; under STRICT mutual TLS the kubelet's connection to the app's port is refused"
                    ));
                    continue;
                }
                let port =
                    port(http.get("port"), &ports).map_err(|e| format!("{field}.httpGet.port: {e}"))?;
                let mut get = json!({ "port": port, "path": http.get("path").and_then(Value::as_str).unwrap_or("/"), "scheme": "HTTP" });
                if let Some(host) = http.get("host").and_then(Value::as_str) {
                    get["host"] = json!(host);
                }
                if let Some(headers) = http.get("httpHeaders") {
                    get["httpHeaders"] = serde_json::to_value(headers)
                        .map_err(|e| format!("{field}.httpGet.httpHeaders: {e}"))?;
                }
                json!({ "httpGet": get })
            } else if let Some(tcp) = probe.get("tcpSocket").and_then(Value::as_mapping) {
                if tcp.get("host").is_some() {
                    warnings.push(format!(
                        "{field}: a tcpSocket probe of another host is left as it is"
                    ));
                    continue;
                }
                let port =
                    port(tcp.get("port"), &ports).map_err(|e| format!("{field}.tcpSocket.port: {e}"))?;
                json!({ "tcpSocket": { "port": port } })
            } else if let Some(grpc) = probe.get("grpc").and_then(Value::as_mapping) {
                let port = grpc
                    .get("port")
                    .and_then(Value::as_u64)
                    .and_then(|p| u16::try_from(p).ok())
                    .ok_or_else(|| format!("{field}.grpc.port: not a port number"))?;
                let mut check = json!({ "port": port });
                if let Some(service) = grpc.get("service").and_then(Value::as_str) {
                    check["service"] = json!(service);
                }
                json!({ "grpc": check })
            } else {
                // exec probes run inside the container: nothing crosses the network.
                continue;
            };
            let path = format!("/app-health/{name}/{suffix}");
            let mut original = original;
            if let Some(timeout) = timeout {
                original["timeoutSeconds"] = json!(timeout);
            }
            probers.insert(path.clone(), original);
            for action in ["httpGet", "tcpSocket", "grpc"] {
                probe.remove(action);
            }
            let mut get = Mapping::new();
            get.insert("path".into(), path.into());
            get.insert("port".into(), u64::from(STATUS_PORT).into());
            get.insert("scheme".into(), "HTTP".into());
            probe.insert("httpGet".into(), Value::Mapping(get));
        }
    }
    Ok(probers)
}

/// The container's named ports: name to number.
fn named_ports(container: &Mapping) -> Vec<(String, u64)> {
    container
        .get("ports")
        .and_then(Value::as_sequence)
        .into_iter()
        .flatten()
        .filter_map(|p| {
            Some((
                p.get("name")?.as_str()?.to_owned(),
                p.get("containerPort")?.as_u64()?,
            ))
        })
        .collect()
}

/// A probe's port: a number, or the name of one of the container's ports.
fn port(value: Option<&Value>, named: &[(String, u64)]) -> Result<u16, String> {
    let number = match value {
        Some(Value::Number(n)) => n.as_u64(),
        Some(Value::String(name)) => match name.parse::<u64>() {
            Ok(n) => Some(n),
            Err(_) => Some(
                named
                    .iter()
                    .find(|(n, _)| n == name)
                    .map(|(_, p)| *p)
                    .ok_or_else(|| format!("\"{name}\" names none of the container's ports"))?,
            ),
        },
        Some(_) | None => None,
    };
    number
        .and_then(|n| u16::try_from(n).ok())
        .filter(|n| *n != 0)
        .ok_or_else(|| "not a port number or the name of one".to_owned())
}
