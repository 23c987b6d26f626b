//! The mesh's moving parts on a [`Network`]: `weft control` in a pod of its own, and sidecars (rules plus
//! proxy) in application pods.

use std::path::PathBuf;

use crate::{Network, Pod, run};

/// Istio's xDS + CA port (plaintext, for development).
pub const CONTROL_PORT: u16 = 15010;

/// `weft control` serving the YAML in its config directory to every pod on the network.
#[derive(Debug)]
pub struct Control {
    pod: Pod,
    config_dir: PathBuf,
    ca_dir: PathBuf,
    weft: PathBuf,
}

impl Control {
    /// Starts `weft control` in a pod named `control`; `resources` are written to its config directory
    /// first (name, YAML).
    pub fn start(network: &Network, resources: &[(&str, &str)]) -> Result<Self, String> {
        let pod = network.pod("control")?;
        let config_dir = network.dir().join("config");
        let ca_dir = network.dir().join("ca");
        std::fs::create_dir_all(&config_dir).map_err(|e| format!("{}: {e}", config_dir.display()))?;
        let control = Self {
            pod,
            config_dir,
            ca_dir,
            weft: network.weft().to_owned(),
        };
        for (name, yaml) in resources {
            control.write(name, yaml)?;
        }
        // The CA is made here, before weft control starts: made by both at once (weft control at
        // start, `token` for the first sidecar), one of them finds the other's half-written files.
        control.token("default", "default")?;
        let weft = control.weft.to_string_lossy();
        let listen = format!("{}:{CONTROL_PORT}", control.pod.ip());
        let tls_listen = format!("{}:15012", control.pod.ip());
        let config_dir = control.config_dir.to_string_lossy();
        let ca_dir = control.ca_dir.to_string_lossy();
        control.pod.spawn(
            "control",
            &[
                &weft,
                "control",
                "--config-dir",
                &config_dir,
                "--ca-dir",
                &ca_dir,
                "--listen",
                &listen,
                "--tls-listen",
                &tls_listen,
            ],
        )?;
        Ok(control)
    }

    /// `https://<control pod>:15012`: xDS and the CA over TLS, as injected pods reach them.
    pub fn tls_url(&self) -> String {
        format!("https://{}:15012", self.pod.ip())
    }

    /// Runs an injected Pod spec (`spec`: the pod's `spec`, as JSON) in `pod` the way the kubelet
    /// would, up to the app's containers (the test starts those, having no images): the init
    /// containers in order as root (only weft's: `weft init` with the arguments the injector wrote),
    /// then the native sidecar as its `runAsUser`, with the environment the spec declares and the
    /// downward API filled in. The mounts a kubelet would make are files here: the projected token
    /// (a token from this control plane's CA, standing in for the service-account token it does not
    /// take yet) and the CA root.
    pub fn run_injected(&self, pod: &Pod, spec: &serde_json::Value, namespace: &str) -> Result<(), String> {
        let service_account = spec["serviceAccountName"].as_str().unwrap_or("default");
        // Beside the pods' logs, readable by the proxy's UID (the CA directory is not).
        let dir = self.config_dir.parent().unwrap_or(&self.config_dir);
        let token = dir.join(format!("{}-token", pod.name()));
        std::fs::write(&token, self.token(namespace, service_account)?).map_err(|e| e.to_string())?;
        crate::set_mode(&token, 0o644)?;
        let root = dir.join("ca-root-cert.pem");
        std::fs::copy(self.ca_dir.join("ca-cert.pem"), &root).map_err(|e| format!("the CA root: {e}"))?;
        crate::set_mode(&root, 0o644)?;
        let weft = self.weft.to_string_lossy().into_owned();
        let init = spec["initContainers"].as_array().cloned().unwrap_or_default();
        for container in &init {
            let name = container["name"].as_str().unwrap_or_default();
            if container["command"] != serde_json::json!(["/usr/local/bin/weft"]) {
                return Err(format!(
                    "init container {name}: the pod runner runs only weft's containers"
                ));
            }
            let args: Vec<String> = container["args"]
                .as_array()
                .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect())
                .unwrap_or_default();
            if container["restartPolicy"] != "Always" {
                let mut full = vec![weft.as_str()];
                full.extend(args.iter().map(String::as_str));
                pod.exec(&full)
                    .map_err(|e| format!("init container {name}: {e}"))?;
                continue;
            }
            let uid = container["securityContext"]["runAsUser"]
                .as_u64()
                .and_then(|u| u32::try_from(u).ok());
            let facts = crate::kubelet::PodFacts {
                name: pod.name(),
                namespace,
                ip: pod.ip().into(),
                service_account,
            };
            let env = crate::kubelet::container_env(container, facts, &root, &token)?;
            let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            let mut full = vec![weft.as_str()];
            full.extend(args.iter().map(String::as_str));
            pod.spawn_as("proxy", uid, &env, &full)?;
        }
        Ok(())
    }

    /// `http://<control pod>:15010`, for the proxies' `xds.address` and `identity.ca_address`.
    pub fn url(&self) -> String {
        format!("http://{}:{CONTROL_PORT}", self.pod.ip())
    }

    pub fn pod(&self) -> &Pod {
        &self.pod
    }

    /// Writes (or replaces, atomically) one YAML file of resources.
    pub fn write(&self, name: &str, yaml: &str) -> Result<(), String> {
        let tmp = self.config_dir.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, yaml).map_err(|e| format!("{}: {e}", tmp.display()))?;
        std::fs::rename(&tmp, self.config_dir.join(name)).map_err(|e| format!("{name}: {e}"))
    }

    /// A token proving the identity `ns`/`sa` to the CA.
    pub fn token(&self, ns: &str, sa: &str) -> Result<String, String> {
        let weft = self.weft.to_string_lossy();
        let ca_dir = self.ca_dir.to_string_lossy();
        let out = run(&[
            &weft, "control", "token", "--ca-dir", &ca_dir, "--ns", ns, "--sa", sa,
        ])?;
        Ok(out.trim().to_owned())
    }

    /// The sidecar configuration of a workload with the identity `ns`/`sa`: pod mode, the certificate
    /// from this control plane's CA, everything else over xDS. Who the workload is (its WorkloadEntry
    /// name, namespace, IP) comes from the pod's environment.
    pub fn sidecar_config(&self, ns: &str, sa: &str) -> Result<String, String> {
        let token = self.token(ns, sa)?;
        let url = self.url();
        Ok(format!(
            "mode: pod\n\
             xds: {{ address: \"{url}\", initial_fetch_timeout: 20s }}\n\
             identity: {{ ca_address: \"{url}\", token: \"{token}\" }}\n"
        ))
    }

    /// Makes `pod` a meshed pod, as sidecar injection would: `weft init` with `init_args`, then the
    /// proxy with [`Self::sidecar_config`]. The pod's name must be its WorkloadEntry's.
    pub fn inject(&self, pod: &Pod, ns: &str, sa: &str, init_args: &[&str]) -> Result<(), String> {
        pod.weft_init(init_args)?;
        pod.start_proxy(&self.sidecar_config(ns, sa)?, ns, sa)
    }
}
