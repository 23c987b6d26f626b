//! One pod (a Pod, or a workload's pod template: both have `metadata` and `spec`) given its sidecar.

use serde_json::json;
use serde_yaml_ng::{Mapping, Value};

use crate::Settings;
use crate::annotations::{self, Scrape};
use crate::probes;
use crate::template;

/// The proxy container's name; a pod that has it is already injected.
pub const PROXY_CONTAINER: &str = "weft-proxy";
const INIT_CONTAINER: &str = "weft-init";
/// Istio's sidecar: a pod carrying it cannot carry Weft's too.
const ISTIO_PROXY: &str = "istio-proxy";
const DEFAULT_CONTAINER: &str = "kubectl.kubernetes.io/default-container";

/// Where the proxy goes in the pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// An init container with `restartPolicy: Always` (Kubernetes 1.29+): it starts before the
    /// app's containers, which wait for its startup probe, and stops after them.
    Native,
    /// A regular container (older clusters); with `holdApplicationUntilProxyStarts` it goes first
    /// and holds the app's containers until it is ready.
    Classic,
}

#[derive(Debug)]
pub(crate) enum Outcome {
    Injected {
        warnings: Vec<String>,
    },
    /// Not injected, and why (the reader is told).
    Left(String),
    AlreadyInjected,
}

/// Adds the sidecar to `pod`. `at` names a field of the pod in messages.
pub(crate) fn inject(
    pod: &mut Mapping,
    workload: &str,
    settings: &Settings,
    at: &dyn Fn(&str) -> String,
) -> Result<Outcome, String> {
    let empty = Mapping::new();
    let metadata = match pod.get("metadata") {
        None | Some(Value::Null) => &empty,
        Some(Value::Mapping(m)) => m,
        Some(_) => return Err(format!("{}: not a mapping", at("metadata"))),
    };
    let map_at = |field: &str| match metadata.get(field) {
        None | Some(Value::Null) => Ok(&empty),
        Some(Value::Mapping(m)) => Ok(m),
        Some(_) => Err(format!("{}: not a mapping", at(&format!("metadata.{field}")))),
    };
    let (labels, annotations) = (map_at("labels")?, map_at("annotations")?);
    if annotations::opted_out(labels, annotations, at)? {
        return Ok(Outcome::Left("sidecar.istio.io/inject is \"false\"".into()));
    }
    let options = annotations::read(annotations, at)?;
    let scrape = annotations::scrape(annotations, at)?;
    // Istio's canonical service and revision, from the pod's labels, for the proxy's metrics.
    let label = |names: &[&str]| {
        names
            .iter()
            .find_map(|n| labels.get(*n).and_then(Value::as_str).map(str::to_owned))
    };
    let canonical_service = label(&["service.istio.io/canonical-name", "app.kubernetes.io/name", "app"])
        .unwrap_or_else(|| workload.to_owned());
    let canonical_revision = label(&[
        "service.istio.io/canonical-revision",
        "app.kubernetes.io/version",
        "version",
    ])
    .unwrap_or_else(|| "latest".to_owned());

    let spec = match pod.get("spec") {
        Some(Value::Mapping(spec)) => spec,
        Some(_) => return Err(format!("{}: not a mapping", at("spec"))),
        None => return Err(format!("{}: missing", at("spec"))),
    };
    if spec.get("hostNetwork").and_then(Value::as_bool) == Some(true) {
        return Ok(Outcome::Left(
            "spec.hostNetwork is true: the pod shares the node's network, which capture rules would change"
                .into(),
        ));
    }
    let containers = names(spec, "containers", at)?;
    let init_containers = names(spec, "initContainers", at)?;
    if containers.is_empty() {
        return Err(format!("{}: missing or empty", at("spec.containers")));
    }
    let all = || containers.iter().chain(&init_containers);
    if all().any(|n| n == PROXY_CONTAINER) {
        return Ok(Outcome::AlreadyInjected);
    }
    if all().any(|n| n == ISTIO_PROXY) {
        return Err(format!(
            "{}: the pod already has Istio's sidecar ({ISTIO_PROXY}); a pod takes one mesh's sidecar",
            at("spec")
        ));
    }
    if let Some(clash) = all().find(|n| *n == INIT_CONTAINER) {
        return Err(format!("{}: a container is already named {clash}", at("spec")));
    }
    let app_container = containers[0].clone();

    let parts = template::render(
        template::TEMPLATE,
        &[
            ("image", json!(settings.image)),
            ("init_image", json!(settings.init_image)),
            ("init_args", json!(options.init_args)),
            ("workload_name", json!(workload)),
            ("control_plane", json!(settings.control_plane)),
            (
                "termination_drain_duration",
                json!(humantime::format_duration(options.drain).to_string()),
            ),
            (
                "proxy_resources",
                serde_json::to_value(&options.resources).map_err(|e| e.to_string())?,
            ),
        ],
    )?;
    let volume_names: Vec<String> = parts
        .volumes
        .iter()
        .filter_map(|v| v.get("name").and_then(Value::as_str).map(str::to_owned))
        .collect();
    let volumes = match spec.get("volumes") {
        None | Some(Value::Null) => &[][..],
        Some(Value::Sequence(volumes)) => volumes.as_slice(),
        Some(_) => return Err(format!("{}: not a list", at("spec.volumes"))),
    };
    if let Some(clash) = volumes
        .iter()
        .filter_map(|v| v.get("name").and_then(Value::as_str))
        .find(|n| volume_names.iter().any(|ours| ours == n))
    {
        return Err(format!(
            "{}: a volume is already named {clash}",
            at("spec.volumes")
        ));
    }

    let Some(Value::Mapping(spec)) = pod.get_mut("spec") else {
        return Err(format!("{}: missing", at("spec")));
    };
    let mut warnings = options.warnings;
    let mut proxy = parts.proxy;
    let mut env = vec![
        ("CANONICAL_SERVICE", canonical_service),
        ("CANONICAL_REVISION", canonical_revision),
    ];
    if options.rewrite_probes {
        let probers = probes::rewrite(sequence(spec, "containers"), at, &mut warnings)?;
        if !probers.is_empty() {
            let json = serde_json::to_string(&probers).map_err(|e| e.to_string())?;
            env.push((probes::APP_PROBERS_ENV, json));
        }
    }
    if let Scrape::Merged(json) = &scrape {
        env.push((annotations::APP_METRICS_ENV, json.clone()));
    }
    if let Some(Value::Sequence(vars)) = proxy.get_mut("env") {
        for (name, value) in env {
            let mut var = Mapping::new();
            var.insert("name".into(), name.into());
            var.insert("value".into(), value.into());
            vars.push(Value::Mapping(var));
        }
    }
    let mut front = vec![Value::Mapping(parts.init)];
    match settings.placement {
        Placement::Native => {
            proxy.insert("restartPolicy".into(), "Always".into());
            front.push(Value::Mapping(proxy));
        }
        Placement::Classic => {
            let containers = sequence(spec, "containers");
            match options.hold_application {
                true => {
                    proxy.insert("lifecycle".into(), parts.hold);
                    containers.insert(0, Value::Mapping(proxy));
                }
                false => containers.push(Value::Mapping(proxy)),
            }
        }
    }
    let init = sequence(spec, "initContainers");
    init.splice(0..0, front);
    sequence(spec, "volumes").extend(parts.volumes);

    let metadata = mapping(pod, "metadata");
    let annotations = mapping(metadata, "annotations");
    if !annotations.contains_key(DEFAULT_CONTAINER) {
        annotations.insert(DEFAULT_CONTAINER.into(), app_container.into());
    }
    if scrape != Scrape::Off {
        for (key, value) in annotations::PROXY_SCRAPE {
            annotations.insert(key.into(), value.into());
        }
    }
    Ok(Outcome::Injected { warnings })
}

/// The names of the containers in `spec.<field>`.
fn names(spec: &Mapping, field: &str, at: &dyn Fn(&str) -> String) -> Result<Vec<String>, String> {
    match spec.get(field) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Sequence(items)) => items
            .iter()
            .enumerate()
            .map(|(i, c)| {
                c.get("name")
                    .and_then(Value::as_str)
                    .map(str::to_owned)
                    .ok_or_else(|| {
                        format!(
                            "{}: a container without a name",
                            at(&format!("spec.{field}[{i}]"))
                        )
                    })
            })
            .collect(),
        Some(_) => Err(format!("{}: not a list", at(&format!("spec.{field}")))),
    }
}

/// `map.<key>` as a list, made when it is missing or null (its type was checked beforehand).
fn sequence<'a>(map: &'a mut Mapping, key: &str) -> &'a mut Vec<Value> {
    let slot = map.entry(key.into()).or_insert(Value::Null);
    if !slot.is_sequence() {
        *slot = Value::Sequence(Vec::new());
    }
    match slot {
        Value::Sequence(items) => items,
        _ => unreachable!("made a list just above"),
    }
}

/// `map.<key>` as a mapping, made when it is missing or null (its type was checked beforehand).
fn mapping<'a>(map: &'a mut Mapping, key: &str) -> &'a mut Mapping {
    let slot = map.entry(key.into()).or_insert(Value::Null);
    if !slot.is_mapping() {
        *slot = Value::Mapping(Mapping::new());
    }
    match slot {
        Value::Mapping(m) => m,
        _ => unreachable!("made a mapping just above"),
    }
}
