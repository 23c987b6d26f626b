//! The same injection as a Kubernetes mutating admission webhook: an `admission.k8s.io/v1`
//! AdmissionReview of a Pod in, the review's response out, carrying a JSONPatch that turns the pod
//! into what `weft inject` writes for it. The injector never blocks a pod from being created: a
//! review it cannot read, or a pod it cannot inject, is allowed unchanged with a warning that says
//! why (the API server shows it to whoever created the pod).

use base64::Engine;
use serde_json::{Value, json};

use crate::{Injected, Settings};

/// What one review came to, for the caller to log and count.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    Injected,
    /// Allowed as it is: opted out, already injected, or not a pod.
    Unchanged,
    /// Allowed as it is, and why the injector could not act.
    Failed(String),
}

/// Answers one AdmissionReview (the request body). Always a well-formed AdmissionReview.
pub fn review(body: &[u8], settings: &Settings) -> (Value, Outcome) {
    let request: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => {
            return allowed(
                "",
                Vec::new(),
                Outcome::Failed(format!("not an AdmissionReview: not JSON: {e}")),
            );
        }
    };
    let uid = request["request"]["uid"].as_str().unwrap_or_default().to_owned();
    if request["kind"] != "AdmissionReview" || request["apiVersion"] != "admission.k8s.io/v1" {
        let why = format!(
            "not an admission.k8s.io/v1 AdmissionReview (apiVersion {}, kind {})",
            request["apiVersion"], request["kind"]
        );
        return allowed(&uid, Vec::new(), Outcome::Failed(why));
    }
    if uid.is_empty() {
        return allowed("", Vec::new(), Outcome::Failed("request.uid: missing".into()));
    }
    let mut pod = request["request"]["object"].clone();
    if pod["kind"] != "Pod" {
        let why = format!("request.object: a {} is not a Pod", pod["kind"]);
        return allowed(&uid, Vec::new(), Outcome::Failed(why));
    }
    // The pod's namespace is in the request when the pod itself leaves it out.
    if pod["metadata"]["namespace"].is_null()
        && let Some(ns) = request["request"]["namespace"].as_str()
        && let Some(meta) = pod["metadata"].as_object_mut()
    {
        meta.insert("namespace".into(), json!(ns));
    }
    let original = pod.clone();
    let mut yaml: serde_yaml_ng::Value = match serde_yaml_ng::to_value(&pod) {
        Ok(v) => v,
        Err(e) => return allowed(&uid, Vec::new(), Outcome::Failed(format!("request.object: {e}"))),
    };
    let mut out = Injected {
        text: String::new(),
        warnings: Vec::new(),
        injected: 0,
    };
    if let Err(e) = crate::object("request.object", &mut yaml, settings, &mut out) {
        return allowed(&uid, Vec::new(), Outcome::Failed(e.to_string()));
    }
    if out.injected == 0 {
        return allowed(&uid, out.warnings, Outcome::Unchanged);
    }
    pod = match serde_json::to_value(&yaml) {
        Ok(v) => v,
        Err(e) => return allowed(&uid, Vec::new(), Outcome::Failed(format!("request.object: {e}"))),
    };
    let patch = json_patch::diff(&original, &pod);
    let patch = match serde_json::to_vec(&patch) {
        Ok(p) => p,
        Err(e) => return allowed(&uid, Vec::new(), Outcome::Failed(format!("the patch: {e}"))),
    };
    let mut response = allowed(&uid, out.warnings, Outcome::Injected);
    response.0["response"]["patchType"] = json!("JSONPatch");
    response.0["response"]["patch"] = json!(base64::engine::general_purpose::STANDARD.encode(patch));
    response
}

fn allowed(uid: &str, mut warnings: Vec<String>, outcome: Outcome) -> (Value, Outcome) {
    if let Outcome::Failed(why) = &outcome {
        warnings.push(format!("weft injector: the pod was not injected: {why}"));
    }
    let mut response = json!({ "uid": uid, "allowed": true });
    if !warnings.is_empty() {
        response["warnings"] = json!(warnings);
    }
    let review = json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "response": response,
    });
    (review, outcome)
}
