//! `weft inject` and `weft wait` as users run them, and the injected proxy configuration brought up
//! against a real `weft control`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use support::{WEFT, free_port};

const CORPUS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../weft-inject/tests/corpus");
const IMAGE: &str = "registry.example.com/weft:0.1.0";

fn weft(args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(WEFT)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

fn golden(name: &str) -> String {
    std::fs::read_to_string(Path::new(CORPUS).join(name)).unwrap()
}

#[test]
fn inject_reads_files_stdin_and_directories_and_writes_stdout() {
    let file = format!("{CORPUS}/multi-container.in.yaml");
    let out = weft(&["inject", "--image", IMAGE, &file], "");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        golden("multi-container.out.yaml")
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("1 pod(s) injected"));

    let out = weft(&["inject", "--image", IMAGE, "-"], &golden("workloads.in.yaml"));
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        golden("workloads.out.yaml")
    );

    // A directory: its manifests in name order, one stream; what the pods' annotations ask that
    // Weft does not do is said on stderr, by name.
    let dir = tempfile::tempdir().unwrap();
    for name in ["annotations-and-service", "workloads"] {
        std::fs::copy(
            Path::new(CORPUS).join(format!("{name}.in.yaml")),
            dir.path().join(format!("{name}.yaml")),
        )
        .unwrap();
    }
    std::fs::write(dir.path().join("notes.txt"), "not a manifest").unwrap();
    let out = weft(&["inject", "--image", IMAGE, dir.path().to_str().unwrap()], "");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let expected = format!(
        "{}---\n{}",
        golden("annotations-and-service.out.yaml"),
        golden("workloads.out.yaml")
    );
    assert_eq!(String::from_utf8(out.stdout).unwrap(), expected);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("warning: ")
            && stderr.contains("sidecar.istio.io/logLevel is not supported by Weft and is ignored"),
        "{stderr}"
    );
    assert!(stderr.contains("7 pod(s) injected"), "{stderr}");
}

#[test]
fn bad_input_exits_1_naming_document_and_field_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("a.yaml");
    std::fs::copy(Path::new(CORPUS).join("workloads.in.yaml"), &good).unwrap();
    let bad = dir.path().join("b.yaml");
    std::fs::write(
        &bad,
        "kind: Service\n---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\nspec:\n  template:\n    metadata:\n      annotations: {traffic.sidecar.istio.io/excludeInboundPorts: \"8080,x\"}\n    spec: {containers: [{name: web, image: web}]}\n",
    )
    .unwrap();
    let out = weft(&["inject", good.to_str().unwrap(), bad.to_str().unwrap()], "");
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty(), "nothing is written when an input fails");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "error: {}: document 2 (Deployment web): spec.template.metadata.annotations: traffic.sidecar.istio.io/excludeInboundPorts: \"8080,x\"",
            bad.display()
        )),
        "{stderr}"
    );

    let out = weft(&["inject", "-"], "kind: [\n");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("error: stdin: document 1: not YAML"));
    let out = weft(
        &["inject", "--control-plane", "http://weft-control:15010", "-"],
        "",
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--control-plane"));
}

/// The proxy container of an injected pod, run as the kubelet would run it: its command, its
/// environment (the downward API filled in), its configuration with the mounted files' paths pointed
/// at files here and its listeners on free loopback ports. It takes its certificate and configuration
/// from weft control's TLS port and becomes ready; `weft wait` (a classic sidecar's hook) sees it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_injected_proxy_comes_up_with_its_certificate_from_weft_control() {
    let dir = tempfile::tempdir().unwrap();
    let config_dir = dir.path().join("mesh");
    std::fs::create_dir(&config_dir).unwrap();
    let mut cp = weft_control::ControlPlane::start(config_dir, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let tls = cp.serve_tls("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let root = dir.path().join("root-cert.pem");
    std::fs::write(&root, cp.ca().root_pem()).unwrap();
    let token = dir.path().join("istio-token");
    let issued = cp
        .ca()
        .tokens()
        .issue("shop", "web", Duration::from_secs(600))
        .unwrap();
    std::fs::write(&token, issued).unwrap();

    let manifest = "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web, namespace: shop}\nspec:\n  template:\n    spec:\n      serviceAccountName: web\n      containers: [{name: web, image: web:1}]\n";
    let control_plane = format!("https://localhost:{}", tls.port());
    let out = weft(&["inject", "--control-plane", &control_plane, "-"], manifest);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let pod: serde_json::Value = serde_yaml_ng::from_slice(&out.stdout).unwrap();
    let proxy = &pod["spec"]["template"]["spec"]["initContainers"][1];
    assert_eq!(proxy["name"], "weft-proxy");
    assert_eq!(proxy["args"], serde_json::json!(["proxy"]));

    let (admin, readiness) = (free_port(), free_port());
    let mut command = Command::new(WEFT);
    command.args(
        proxy["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap()),
    );
    for var in proxy["env"].as_array().unwrap() {
        let name = var["name"].as_str().unwrap();
        let value = match (&var["value"], var["valueFrom"]["fieldRef"]["fieldPath"].as_str()) {
            (serde_json::Value::String(value), _) if name == "WEFT_PROXY_CONFIG" => format!(
                "{}admin: {{ address: 127.0.0.1:{admin} }}\nreadiness: {{ address: 127.0.0.1:{readiness} }}\n\
                 outbound: {{ address: 127.0.0.1:{} }}\ninbound: {{ address: 127.0.0.1:{} }}\n",
                value
                    .replace("/var/run/secrets/weft/ca/root-cert.pem", root.to_str().unwrap())
                    .replace("/var/run/secrets/tokens/istio-token", token.to_str().unwrap()),
                free_port(),
                free_port(),
            ),
            (serde_json::Value::String(value), _) => value.clone(),
            (_, Some("metadata.name")) => "web-7d9f8-x2x9q".into(),
            (_, Some("metadata.namespace")) => "shop".into(),
            (_, Some("status.podIP")) => "127.0.0.1".into(),
            (_, Some("spec.serviceAccountName")) => "web".into(),
            other => panic!("an env var the kubelet would not know how to fill: {name} {other:?}"),
        };
        command.env(name, value);
    }
    let mut child = command
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();

    let url = format!("http://127.0.0.1:{readiness}/healthz/ready");
    let wait = Command::new(WEFT)
        .args(["wait", "--url", &url, "--timeout", "30s"])
        .output()
        .unwrap();
    let identity =
        weft_test_support::admin_get(format!("127.0.0.1:{admin}").parse().unwrap(), "/identity").await;
    let _ = child.kill();
    let _ = child.wait();
    assert!(wait.status.success(), "{}", String::from_utf8_lossy(&wait.stderr));
    assert!(
        identity.1.contains("spiffe://cluster.local/ns/shop/sa/web"),
        "{}",
        identity.1
    );
}

#[test]
fn wait_gives_up_after_its_timeout_naming_what_it_saw() {
    let url = format!("http://127.0.0.1:{}/healthz/ready", free_port());
    let started = Instant::now();
    let out = Command::new(WEFT)
        .args(["wait", "--url", &url, "--timeout", "1s"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(started.elapsed() >= Duration::from_secs(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("the proxy was not ready within 1s"), "{stderr}");
    assert!(stderr.contains("refused"), "{stderr}");
}

#[test]
fn the_configuration_comes_from_one_place() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("weft.yaml");
    std::fs::write(&file, "mode: pod\n").unwrap();
    let out = Command::new(WEFT)
        .args(["proxy", "--config", file.to_str().unwrap()])
        .env("WEFT_PROXY_CONFIG", "mode: pod\n")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--config and WEFT_PROXY_CONFIG both"));
    let out = Command::new(WEFT)
        .args(["proxy"])
        .env("WEFT_PROXY_CONFIG", "mode: pod\ndrain_timeout: forever\n")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("WEFT_PROXY_CONFIG: ") && stderr.contains("drain_timeout"),
        "{stderr}"
    );
}
