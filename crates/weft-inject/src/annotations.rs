//! The pod annotations that change what is injected, under Istio's names. Each value is checked as
//! `weft init` or Kubernetes would read it, so a bad one is an error at injection, not a pod that
//! fails later. Any other annotation under Istio's prefixes is reported by name: Weft does not act
//! on it.

use std::time::Duration;

use serde_yaml_ng::{Mapping, Value};
use weft_init::{Cidr, Selection};

const INJECT: &str = "sidecar.istio.io/inject";
const PREFIXES: [&str; 3] = [
    "sidecar.istio.io/",
    "traffic.sidecar.istio.io/",
    "proxy.istio.io/",
];
const PROXY_CONFIG: &str = "proxy.istio.io/config";
const REWRITE_PROBES: &str = "sidecar.istio.io/rewriteAppHTTPProbers";

/// The `weft init` flag each capture annotation sets, and how its value is checked.
const CAPTURE: [(&str, &str, Check); 6] = [
    (
        "traffic.sidecar.istio.io/includeInboundPorts",
        "-b",
        Check::PortSelection,
    ),
    ("traffic.sidecar.istio.io/excludeInboundPorts", "-d", Check::Ports),
    (
        "traffic.sidecar.istio.io/includeOutboundIPRanges",
        "-i",
        Check::CidrSelection,
    ),
    (
        "traffic.sidecar.istio.io/excludeOutboundIPRanges",
        "-x",
        Check::Cidrs,
    ),
    (
        "traffic.sidecar.istio.io/includeOutboundPorts",
        "-q",
        Check::Ports,
    ),
    (
        "traffic.sidecar.istio.io/excludeOutboundPorts",
        "-o",
        Check::Ports,
    ),
];

/// The proxy's resources each annotation sets: (annotation, requests or limits, resource).
const RESOURCES: [(&str, &str, &str); 4] = [
    ("sidecar.istio.io/proxyCPU", "requests", "cpu"),
    ("sidecar.istio.io/proxyMemory", "requests", "memory"),
    ("sidecar.istio.io/proxyCPULimit", "limits", "cpu"),
    ("sidecar.istio.io/proxyMemoryLimit", "limits", "memory"),
];

/// The proxy's resources when no annotation says otherwise. Weft's pair idles near 25 MB; the limit
/// leaves room for bursts of connections (the overload manager reads it as its watermark).
const DEFAULT_RESOURCES: [(&str, &str, &str); 4] = [
    ("requests", "cpu", "100m"),
    ("requests", "memory", "64Mi"),
    ("limits", "cpu", "2"),
    ("limits", "memory", "1Gi"),
];

/// Istio's default `terminationDrainDuration`.
const DEFAULT_DRAIN: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy)]
enum Check {
    PortSelection,
    Ports,
    CidrSelection,
    Cidrs,
}

/// The app's metrics, when its `prometheus.io/*` annotations ask for a scrape: merged by the proxy.
pub(crate) const APP_METRICS_ENV: &str = "ISTIO_PROMETHEUS_ANNOTATIONS";
/// Where Prometheus finds the pod's metrics once injected: the proxy's, with the app's merged in.
pub(crate) const PROXY_SCRAPE: [(&str, &str); 3] = [
    ("prometheus.io/scrape", "true"),
    ("prometheus.io/port", "15020"),
    ("prometheus.io/path", "/stats/prometheus"),
];

/// How the pod is scraped.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Scrape {
    /// `prometheus.io/scrape: "false"`: left as the pod says.
    Off,
    /// The proxy's metrics only (the app asked for no scrape).
    Proxy,
    /// The proxy's and the app's (its annotations, in Istio's JSON for the proxy).
    Merged(String),
}

/// Reads the pod's `prometheus.io/*` annotations.
pub(crate) fn scrape(annotations: &Mapping, at: &dyn Fn(&str) -> String) -> Result<Scrape, String> {
    let get = |key: &str| annotations.get(key).and_then(Value::as_str);
    let field = at("metadata.annotations");
    match get("prometheus.io/scrape") {
        Some("false") => return Ok(Scrape::Off),
        Some("true") => {}
        Some(other) => {
            return Err(format!(
                "{field}: prometheus.io/scrape is \"{other}\"; it must be \"true\" or \"false\""
            ));
        }
        None => return Ok(Scrape::Proxy),
    }
    let Some(port) = get("prometheus.io/port") else {
        return Ok(Scrape::Proxy);
    };
    port.parse::<u16>()
        .map_err(|e| format!("{field}: prometheus.io/port \"{port}\": {e}"))?;
    let path = get("prometheus.io/path").unwrap_or("/metrics");
    let json = serde_json::json!({ "scrape": "true", "port": port, "path": path });
    Ok(Scrape::Merged(json.to_string()))
}

/// What a pod's annotations ask of its sidecar.
#[derive(Debug)]
pub(crate) struct PodOptions {
    /// `weft init`'s arguments, starting with `init`.
    pub(crate) init_args: Vec<String>,
    /// The proxy container's `resources`.
    pub(crate) resources: Value,
    pub(crate) hold_application: bool,
    pub(crate) drain: Duration,
    /// Whether the app's probes go through the proxy's status port (Istio's default: yes).
    pub(crate) rewrite_probes: bool,
    /// Annotations read but not acted on, by name.
    pub(crate) warnings: Vec<String>,
}

/// Whether the pod asked to be left alone: `sidecar.istio.io/inject: "false"`, as a label (which
/// wins, as in Istio) or an annotation.
pub(crate) fn opted_out(
    labels: &Mapping,
    annotations: &Mapping,
    at: &dyn Fn(&str) -> String,
) -> Result<bool, String> {
    for (field, map) in [("metadata.labels", labels), ("metadata.annotations", annotations)] {
        match map.get(INJECT) {
            None => continue,
            Some(Value::String(v)) if v == "false" => return Ok(true),
            Some(Value::String(v)) if v == "true" => return Ok(false),
            Some(other) => {
                return Err(format!(
                    "{}: {INJECT} is {}; it must be \"true\" or \"false\"",
                    at(field),
                    show(other)
                ));
            }
        }
    }
    Ok(false)
}

/// Reads the annotations that shape the sidecar; `at` names a field of the pod template.
pub(crate) fn read(annotations: &Mapping, at: &dyn Fn(&str) -> String) -> Result<PodOptions, String> {
    let field = at("metadata.annotations");
    let mut options = PodOptions {
        init_args: vec!["init".into()],
        resources: Value::Mapping(Mapping::new()),
        hold_application: false,
        drain: DEFAULT_DRAIN,
        rewrite_probes: true,
        warnings: Vec::new(),
    };
    let mut resources: Vec<(&str, &str, String)> = DEFAULT_RESOURCES
        .iter()
        .map(|(kind, name, value)| (*kind, *name, (*value).to_owned()))
        .collect();
    for (key, value) in annotations {
        let Some(key) = key.as_str() else { continue };
        if !PREFIXES.iter().any(|p| key.starts_with(p)) || key == INJECT {
            continue;
        }
        let Some(value) = value.as_str() else {
            return Err(format!(
                "{field}: {key} is {}; annotations are strings",
                show(value)
            ));
        };
        if let Some((_, flag, check)) = CAPTURE.iter().find(|(name, ..)| *name == key) {
            checked(*check, value).map_err(|e| format!("{field}: {key}: \"{value}\": {e}"))?;
            options
                .init_args
                .extend([(*flag).to_owned(), value.trim().replace(' ', "")]);
        } else if let Some((_, kind, name)) = RESOURCES.iter().find(|(a, ..)| *a == key) {
            quantity(value).map_err(|e| format!("{field}: {key}: \"{value}\": {e}"))?;
            resources.retain(|(k, n, _)| !(k == kind && n == name));
            resources.push((kind, name, value.trim().to_owned()));
        } else if key == REWRITE_PROBES {
            options.rewrite_probes = match value {
                "true" => true,
                "false" => false,
                other => {
                    return Err(format!(
                        "{field}: {key} is \"{other}\"; it must be \"true\" or \"false\""
                    ));
                }
            };
        } else if key == PROXY_CONFIG {
            proxy_config(value, &mut options, &field).map_err(|e| format!("{field}: {key}: {e}"))?;
        } else {
            options
                .warnings
                .push(format!("{field}: {key} is not supported by Weft and is ignored"));
        }
    }
    let mut map = Mapping::new();
    for kind in ["requests", "limits"] {
        let mut of_kind = Mapping::new();
        for name in ["cpu", "memory"] {
            if let Some((.., value)) = resources.iter().find(|(k, n, _)| *k == kind && *n == name) {
                of_kind.insert(name.into(), Value::String(value.clone()));
            }
        }
        map.insert(kind.into(), Value::Mapping(of_kind));
    }
    options.resources = Value::Mapping(map);
    Ok(options)
}

/// Istio's `ProxyConfig` as YAML or JSON: the fields Weft acts on are read, any other is reported.
fn proxy_config(text: &str, options: &mut PodOptions, field: &str) -> Result<(), String> {
    let config: Value = serde_yaml_ng::from_str(text).map_err(|e| format!("not YAML: {e}"))?;
    let Some(config) = config.as_mapping() else {
        return Err("not a mapping of ProxyConfig fields".into());
    };
    for (key, value) in config {
        match key.as_str() {
            Some("holdApplicationUntilProxyStarts") => {
                options.hold_application = value.as_bool().ok_or_else(|| {
                    format!(
                        "holdApplicationUntilProxyStarts is {}; it must be true or false",
                        show(value)
                    )
                })?;
            }
            Some("terminationDrainDuration") => {
                let text = value.as_str().ok_or_else(|| {
                    format!(
                        "terminationDrainDuration is {}; it must be a duration such as \"5s\"",
                        show(value)
                    )
                })?;
                options.drain = humantime::parse_duration(text)
                    .map_err(|e| format!("terminationDrainDuration \"{text}\": {e}"))?;
            }
            Some(other) => options.warnings.push(format!(
                "{field}: {PROXY_CONFIG}: {other} is not supported by Weft and is ignored"
            )),
            None => return Err(format!("a field name is {}", show(key))),
        }
    }
    Ok(())
}

fn checked(check: Check, value: &str) -> Result<(), String> {
    let value = value.trim().replace(' ', "");
    match check {
        Check::PortSelection => value.parse::<Selection<u16>>().map(drop),
        Check::CidrSelection => value.parse::<Selection<Cidr>>().map(drop),
        Check::Ports => weft_init::list::<u16>(&value).map(drop),
        Check::Cidrs => weft_init::list::<Cidr>(&value).map(drop),
    }
}

/// A Kubernetes resource quantity: a decimal number with an optional suffix (`100m`, `1.5`, `64Mi`,
/// `1e3`, `2G`).
fn quantity(value: &str) -> Result<(), String> {
    let value = value.trim();
    let suffixes = [
        "Ki", "Mi", "Gi", "Ti", "Pi", "Ei", "n", "u", "m", "k", "M", "G", "T", "P", "E", "",
    ];
    let number = suffixes
        .iter()
        .find_map(|s| value.strip_suffix(s).filter(|n| !n.is_empty()))
        .unwrap_or(value);
    let (mantissa, exponent) = match number.split_once(['e', 'E']) {
        Some((m, e)) => (m, Some(e)),
        None => (number, None),
    };
    let digits = mantissa.strip_prefix('+').unwrap_or(mantissa);
    let valid_mantissa = !digits.is_empty()
        && digits.chars().all(|c| c.is_ascii_digit() || c == '.')
        && digits.matches('.').count() <= 1
        && digits != ".";
    let valid_exponent = exponent.is_none_or(|e| {
        let e = e.strip_prefix(['+', '-']).unwrap_or(e);
        !e.is_empty() && e.chars().all(|c| c.is_ascii_digit())
    });
    match valid_mantissa && valid_exponent {
        true => Ok(()),
        false => Err("not a Kubernetes quantity (such as 100m, 0.5, 128Mi, 1Gi)".into()),
    }
}

fn show(value: &Value) -> String {
    serde_json::to_string(value).unwrap_or_else(|_| "a value that cannot be shown".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities_are_kubernetes_quantities() {
        for good in ["100m", "0.5", "1", "128Mi", "1Gi", "2G", "1e3", "+1.5", "500u"] {
            assert!(quantity(good).is_ok(), "{good}");
        }
        for bad in ["", "lots", "1..5", "Mi", "1ZB", "-1", "1e", ".", "10 m"] {
            assert!(quantity(bad).is_err(), "{bad}");
        }
    }
}
