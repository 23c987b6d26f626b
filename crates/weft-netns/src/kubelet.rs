//! The kubelet's part in starting a container of an injected pod, for the test harnesses: its
//! environment with the downward API filled in and the files it would mount put where they are here.

use std::path::Path;

/// What the downward API tells a container about its pod.
#[derive(Debug, Clone, Copy)]
pub struct PodFacts<'a> {
    pub name: &'a str,
    pub namespace: &'a str,
    pub ip: std::net::IpAddr,
    pub service_account: &'a str,
}

/// The injected proxy's mounted files: the CA root and the projected token.
const ROOT_MOUNT: &str = "/var/run/secrets/weft/ca/root-cert.pem";
const TOKEN_MOUNT: &str = "/var/run/secrets/tokens/istio-token";

/// `container`'s environment as the kubelet would give it: literal values as they are, `fieldRef`s
/// from `pod`, and in `WEFT_PROXY_CONFIG` the mounts' paths replaced by `root` and `token`. A variable
/// the kubelet would fill from something this does not know is an error naming it.
pub fn container_env(
    container: &serde_json::Value,
    pod: PodFacts<'_>,
    root: &Path,
    token: &Path,
) -> Result<Vec<(String, String)>, String> {
    let container_name = container["name"].as_str().unwrap_or_default();
    let mut env = Vec::new();
    for var in container["env"].as_array().into_iter().flatten() {
        let name = var["name"].as_str().unwrap_or_default().to_owned();
        let value = match (&var["value"], var["valueFrom"]["fieldRef"]["fieldPath"].as_str()) {
            (serde_json::Value::String(v), _) if name == "WEFT_PROXY_CONFIG" => v
                .replace(ROOT_MOUNT, &root.to_string_lossy())
                .replace(TOKEN_MOUNT, &token.to_string_lossy()),
            (serde_json::Value::String(v), _) => v.clone(),
            (_, Some("metadata.name")) => pod.name.to_owned(),
            (_, Some("metadata.namespace")) => pod.namespace.to_owned(),
            (_, Some("status.podIP")) => pod.ip.to_string(),
            (_, Some("spec.serviceAccountName")) => pod.service_account.to_owned(),
            _ => {
                return Err(format!(
                    "{container_name}: env {name}: the kubelet's stand-in cannot fill it"
                ));
            }
        };
        env.push((name, value));
    }
    Ok(env)
}
