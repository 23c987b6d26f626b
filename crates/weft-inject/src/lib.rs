//! Sidecar injection: Weft added to the pods of Kubernetes manifests, as `istioctl kube-inject` and
//! `linkerd inject` do. Every document that holds a pod (a Pod, or a workload's pod template) gets the
//! capture init container and the proxy from one template (`deploy/injection/sidecar.yaml`); every
//! other document, and every pod that is skipped or already injected, comes out byte for byte as it
//! went in, so injecting twice gives what injecting once gave.
//!
//! The pod's annotations choose what differs, under Istio's names so manifests written for Istio keep
//! working ([`annotations`]). An annotation under Istio's prefixes that Weft does not act on is
//! reported by name, never silently accepted.

mod annotations;
mod documents;
mod pod;
mod probes;
mod template;
pub mod webhook;

use serde_yaml_ng::{Mapping, Value};

pub use pod::{PROXY_CONTAINER, Placement};

/// The control plane as a pod reaches it in a cluster: xDS and the CA on weft control's TLS port.
pub const DEFAULT_CONTROL_PLANE: &str = "https://weft-control.weft-system.svc:15012";

/// What every injected pod shares.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The proxy's image: `weft` alone (deploy/Dockerfile's `proxy` target).
    pub image: String,
    /// The capture init container's image: `weft` with iptables (the `init` target).
    pub init_image: String,
    /// Where the proxy takes its configuration and certificate from (`https://host:15012`).
    pub control_plane: String,
    /// Where the proxy goes in the pod.
    pub placement: Placement,
}

/// The manifests with the sidecar added, and what the reader should know about them.
#[derive(Debug)]
pub struct Injected {
    pub text: String,
    /// One line each, naming the document and the field: annotations Weft ignores, pods left alone.
    pub warnings: Vec<String>,
    /// How many pods got the sidecar.
    pub injected: usize,
}

/// Input that cannot be injected, naming the document and the field.
#[derive(Debug, thiserror::Error)]
#[error("{document}: {problem}")]
pub struct InjectError {
    pub document: String,
    pub problem: String,
}

/// Adds the sidecar to every pod in `text`: YAML documents separated by `---` lines, or one JSON
/// object (answered as JSON). `source` names the input in messages (a file name, `stdin`).
pub fn inject(source: &str, text: &str, settings: &Settings) -> Result<Injected, InjectError> {
    let mut out = Injected {
        text: String::with_capacity(text.len() + 4096),
        warnings: Vec::new(),
        injected: 0,
    };
    if documents::is_json(text) {
        let name = format!("{source}: document 1");
        let mut value: Value = serde_json::from_str(text).map_err(|e| InjectError {
            document: name.clone(),
            problem: format!("not JSON: {e}"),
        })?;
        match object(&name, &mut value, settings, &mut out)? {
            true => {
                let json = serde_json::to_string_pretty(&value).map_err(|e| InjectError {
                    document: name,
                    problem: format!("cannot write JSON: {e}"),
                })?;
                out.text.push_str(&json);
                out.text.push('\n');
            }
            false => out.text.push_str(text),
        }
        return Ok(out);
    }
    let chunks = documents::split(text).map_err(|(n, problem)| InjectError {
        document: format!("{source}: document {n}"),
        problem,
    })?;
    for (i, chunk) in chunks.iter().enumerate() {
        out.text.push_str(chunk.separator);
        let name = format!("{source}: document {}", i + 1);
        let mut value: Value = serde_yaml_ng::from_str(chunk.body).map_err(|e| InjectError {
            document: name.clone(),
            problem: format!("not YAML: {e}"),
        })?;
        if value.is_null() || !object(&name, &mut value, settings, &mut out)? {
            out.text.push_str(chunk.body);
            continue;
        }
        let yaml = serde_yaml_ng::to_string(&value).map_err(|e| InjectError {
            document: name,
            problem: format!("cannot write YAML: {e}"),
        })?;
        out.text.push_str(&yaml);
    }
    Ok(out)
}

/// Injects the pods of one Kubernetes object; `false` when nothing in it changed.
fn object(
    name: &str,
    value: &mut Value,
    settings: &Settings,
    out: &mut Injected,
) -> Result<bool, InjectError> {
    let error = |problem: String| InjectError {
        document: name.to_owned(),
        problem,
    };
    let Some(object) = value.as_mapping_mut() else {
        return Err(error("not a Kubernetes object (a mapping with `kind`)".into()));
    };
    let kind = match object.get("kind") {
        Some(Value::String(kind)) => kind.clone(),
        Some(_) => return Err(error("kind: not a string".into())),
        None => return Err(error("kind: missing".into())),
    };
    if kind == "List" || kind.ends_with("List") {
        let Some(items) = object.get_mut("items") else {
            return Ok(false);
        };
        let Some(items) = items.as_sequence_mut() else {
            return Err(error("items: not a list".into()));
        };
        let mut changed = false;
        for (i, item) in items.iter_mut().enumerate() {
            changed |= self::object(&format!("{name}, items[{i}]"), item, settings, out)?;
        }
        return Ok(changed);
    }
    let template_path: &[&str] = match kind.as_str() {
        "Pod" => &[],
        "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "ReplicationController" | "Job" => {
            &["spec", "template"]
        }
        "CronJob" => &["spec", "jobTemplate", "spec", "template"],
        _ => return Ok(false),
    };
    let meta = object.get("metadata").and_then(Value::as_mapping);
    let text = |key: &str| {
        meta.and_then(|m| m.get(key))
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    let object_name = text("name").or_else(|| text("generateName")).unwrap_or_default();
    // The workload is the object that owns the pod template: a Pod made by a controller names it in
    // its owner reference (a ReplicaSet's name ends in the pod template hash, which is dropped);
    // a standalone Pod is its own, and a `generateName` prefix loses its trailing dash.
    let workload = meta
        .and_then(owner_workload)
        .unwrap_or_else(|| object_name.trim_end_matches('-').to_owned());
    let described = match text("namespace") {
        Some(ns) => format!("{name} ({kind} {ns}/{object_name})"),
        None => format!("{name} ({kind} {object_name})"),
    };
    let mut pod: &mut Mapping = object;
    let mut path = String::new();
    for key in template_path {
        path = if path.is_empty() {
            (*key).to_owned()
        } else {
            format!("{path}.{key}")
        };
        pod = match pod.get_mut(*key).and_then(Value::as_mapping_mut) {
            Some(next) => next,
            None => {
                return Err(InjectError {
                    document: described,
                    problem: format!("{path}: missing (a {kind} needs a pod template)"),
                });
            }
        };
    }
    let at = |field: &str| match path.is_empty() {
        true => field.to_owned(),
        false => format!("{path}.{field}"),
    };
    match pod::inject(pod, &workload, settings, &at) {
        Ok(pod::Outcome::Injected { warnings }) => {
            out.injected += 1;
            out.warnings
                .extend(warnings.into_iter().map(|w| format!("{described}: {w}")));
            Ok(true)
        }
        Ok(pod::Outcome::Left(why)) => {
            out.warnings.push(format!("{described}: left alone: {why}"));
            Ok(false)
        }
        Ok(pod::Outcome::AlreadyInjected) => Ok(false),
        Err(problem) => Err(InjectError {
            document: described,
            problem,
        }),
    }
}

/// The workload a Pod's controller reference names (`web` for ReplicaSet `web-7d9f8` when the pod's
/// `pod-template-hash` is `7d9f8`).
fn owner_workload(meta: &Mapping) -> Option<String> {
    let owner = meta
        .get("ownerReferences")?
        .as_sequence()?
        .iter()
        .find(|o| o.get("controller").and_then(Value::as_bool) == Some(true))?;
    let name = owner.get("name")?.as_str()?;
    let hash = meta
        .get("labels")
        .and_then(|l| l.get("pod-template-hash"))
        .and_then(Value::as_str);
    let name = match (owner.get("kind").and_then(Value::as_str), hash) {
        (Some("ReplicaSet"), Some(hash)) => name
            .strip_suffix(hash)
            .and_then(|n| n.strip_suffix('-'))
            .unwrap_or(name),
        _ => name,
    };
    Some(name.to_owned())
}

#[cfg(test)]
mod tests;
