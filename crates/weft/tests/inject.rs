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
const INIT_IMAGE: &str = "registry.example.com/weft-init:0.1.0";

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
    let out = weft(
        &["inject", "--image", IMAGE, "--init-image", INIT_IMAGE, &file],
        "",
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        golden("multi-container.out.yaml")
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("1 pod(s) injected"));

    let out = weft(
        &["inject", "--image", IMAGE, "--init-image", INIT_IMAGE, "-"],
        &golden("workloads.in.yaml"),
    );
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
    let out = weft(
        &[
            "inject",
            "--image",
            IMAGE,
            "--init-image",
            INIT_IMAGE,
            dir.path().to_str().unwrap(),
        ],
        "",
    );
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

/// A Deployment as its owner wrote it: an HTTP app with probes of every kind (one on a named port),
/// a second container whose probes fail, and the app's own metrics annotations.
fn probed_deployment(app: u16, grpc: u16, metrics: u16) -> String {
    format!(
        "apiVersion: apps/v1
kind: Deployment
metadata: {{name: web, namespace: shop}}
spec:
  template:
    metadata:
      annotations: {{prometheus.io/scrape: \"true\", prometheus.io/port: \"{metrics}\", prometheus.io/path: /metrics}}
    spec:
      serviceAccountName: web
      containers:
        - name: web
          image: web:1
          ports: [{{name: http, containerPort: {app}}}]
          readinessProbe:
            httpGet: {{path: /status/204, port: http, httpHeaders: [{{name: X-Probe, value: kubelet}}]}}
          livenessProbe:
            tcpSocket: {{port: {app}}}
          startupProbe:
            grpc: {{port: {grpc}}}
        - name: worker
          image: worker:1
          readinessProbe:
            httpGet: {{path: /status/500, port: {app}}}
          livenessProbe:
            grpc: {{port: {grpc}, service: down}}
"
    )
}

/// An app's own Prometheus endpoint.
async fn metrics_app() -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(|req: hyper::Request<hyper::body::Incoming>| async move {
                        let body = match req.uri().path() {
                            "/metrics" => "# TYPE app_orders_total counter\napp_orders_total 7\n# EOF\n",
                            _ => "",
                        };
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(http_body_util::Full::new(
                            bytes::Bytes::from_static(body.as_bytes()),
                        )))
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    port
}

/// The proxy container of an injected pod, run as the kubelet would run it: its command, its
/// environment (the downward API filled in), its configuration with the mounted files' paths pointed
/// at files here and its ports on free loopback ports. It takes its certificate and configuration
/// from weft control's TLS port and becomes ready; `weft wait` (a classic sidecar's hook) sees it.
/// The kubelet's rewritten probes, sent to its status port, are carried out against the app from
/// 127.0.0.6 and answered with their outcome; Prometheus's scrape gets the proxy's metrics and the
/// app's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_injected_proxy_comes_up_and_carries_out_the_apps_probes() {
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
    let app = weft_test_support::http::HttpServer::start("web").await;
    let grpc = weft_test_support::grpc::GrpcServer::start("web").await;
    let metrics = metrics_app().await;

    let manifest = probed_deployment(app.addr.port(), grpc.addr.port(), metrics);
    let control_plane = format!("https://localhost:{}", tls.port());
    let out = weft(&["inject", "--control-plane", &control_plane, "-"], &manifest);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let pod: serde_json::Value = serde_yaml_ng::from_slice(&out.stdout).unwrap();
    let spec = &pod["spec"]["template"]["spec"];
    let proxy = &spec["initContainers"][1];
    assert_eq!(proxy["name"], "weft-proxy");
    assert_eq!(proxy["args"], serde_json::json!(["proxy"]));
    let annotations = &pod["spec"]["template"]["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/port"], "15020");
    assert_eq!(annotations["prometheus.io/path"], "/stats/prometheus");

    let (admin, readiness, status) = (free_port(), free_port(), free_port());
    let mut command = Command::new(WEFT);
    command.args(
        proxy["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap()),
    );
    let pod = weft_netns::kubelet::PodFacts {
        name: "web-7d9f8-x2x9q",
        namespace: "shop",
        ip: std::net::Ipv4Addr::LOCALHOST.into(),
        service_account: "web",
    };
    for (name, value) in weft_netns::kubelet::container_env(proxy, pod, &root, &token).unwrap() {
        let value = match name.as_str() {
            // Its ports on free loopback ports, as the pod's own network would have them free.
            "WEFT_PROXY_CONFIG" => format!(
                "{value}admin: {{ address: 127.0.0.1:{admin} }}\nreadiness: {{ address: 127.0.0.1:{readiness} }}\n\
                 status: {{ address: 127.0.0.1:{status} }}\n\
                 outbound: {{ address: 127.0.0.1:{} }}\ninbound: {{ address: 127.0.0.1:{} }}\n",
                free_port(),
                free_port(),
            ),
            _ => value,
        };
        command.env(name, value);
    }
    let mut child = command
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stop = scopeguard(move || {
        let _ = child.kill();
        let _ = child.wait();
    });

    let url = format!("http://127.0.0.1:{readiness}/healthz/ready");
    let wait = Command::new(WEFT)
        .args(["wait", "--url", &url, "--timeout", "30s"])
        .output()
        .unwrap();
    assert!(wait.status.success(), "{}", String::from_utf8_lossy(&wait.stderr));
    let status_addr: std::net::SocketAddr = format!("127.0.0.1:{status}").parse().unwrap();
    let identity =
        weft_test_support::admin_get(format!("127.0.0.1:{admin}").parse().unwrap(), "/identity").await;
    assert!(
        identity.1.contains("spiffe://cluster.local/ns/shop/sa/web"),
        "{}",
        identity.1
    );
    // The workload is the Deployment; the instance is the pod, which the control plane knows it by.
    let mesh = weft_test_support::admin_get(format!("127.0.0.1:{admin}").parse().unwrap(), "/mesh")
        .await
        .1;
    let node: serde_json::Value = serde_json::from_str(&mesh).unwrap();
    let node = &node["bootstrap"]["node"];
    assert_eq!(node["workload"], "web", "{node}");
    assert_eq!(node["pod"], "web-7d9f8-x2x9q", "{node}");
    assert_eq!(node["id"], "sidecar~127.0.0.1~web-7d9f8-x2x9q.shop", "{node}");
    assert_eq!(node["canonical_service"], "web", "{node}");

    // The kubelet's view: each container's probes now ask the status port.
    let mut outcomes = Vec::new();
    for container in spec["containers"].as_array().unwrap() {
        for kind in ["readinessProbe", "livenessProbe", "startupProbe"] {
            let probe = &container[kind];
            if probe.is_null() {
                continue;
            }
            assert_eq!(probe["httpGet"]["port"], 15020, "{probe}");
            let path = probe["httpGet"]["path"].as_str().unwrap();
            let (code, body) = weft_test_support::admin_get(status_addr, path).await;
            outcomes.push((path.to_owned(), code, body));
        }
    }
    let code_of = |path: &str| {
        outcomes
            .iter()
            .find(|(p, ..)| p == path)
            .map(|(_, c, b)| (*c, b.clone()))
    };
    assert_eq!(
        code_of("/app-health/web/readyz").map(|o| o.0),
        Some(200),
        "{outcomes:?}"
    );
    assert_eq!(
        code_of("/app-health/web/livez").map(|o| o.0),
        Some(200),
        "{outcomes:?}"
    );
    assert_eq!(
        code_of("/app-health/web/startupz").map(|o| o.0),
        Some(200),
        "{outcomes:?}"
    );
    let (code, body) = code_of("/app-health/worker/readyz").unwrap();
    assert_eq!(
        (code, body.as_str()),
        (503, "probe failed: the app answered 500\n")
    );
    let (code, body) = code_of("/app-health/worker/livez").unwrap();
    assert_eq!(code, 503);
    assert!(body.contains("not SERVING"), "{body}");
    assert_eq!(
        weft_test_support::admin_get(status_addr, "/app-health/nobody/livez")
            .await
            .0,
        404
    );
    assert_eq!(
        weft_test_support::admin_get(status_addr, "/healthz/ready")
            .await
            .0,
        200
    );

    // The app saw the kubelet's probe as the kubelet would have sent it, from the proxy's passthrough
    // source, with its headers.
    let probe = app
        .requests()
        .into_iter()
        .find(|r| r.uri.path() == "/status/204")
        .unwrap();
    assert_eq!(probe.peer.ip().to_string(), "127.0.0.6");
    assert_eq!(probe.headers["x-probe"], "kubelet");
    assert!(
        probe.headers["user-agent"]
            .to_str()
            .unwrap()
            .starts_with("kube-probe/")
    );

    let (code, scraped) = weft_test_support::admin_get(status_addr, "/stats/prometheus").await;
    assert_eq!(code, 200);
    assert!(scraped.contains("istio_build{"), "the proxy's metrics: {scraped}");
    assert!(
        scraped.contains("app_orders_total 7\n"),
        "the app's metrics: {scraped}"
    );
    assert!(!scraped.contains("# EOF"), "{scraped}");
    // Nothing that changes the proxy is on the status port.
    assert_eq!(
        weft_test_support::admin_get(status_addr, "/quitquitquit").await.0,
        404
    );
    drop(stop);
}

/// Runs `f` when dropped, so the proxy process ends even when an assertion fails.
fn scopeguard(f: impl FnOnce()) -> impl Drop {
    struct Guard<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for Guard<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f();
            }
        }
    }
    Guard(Some(f))
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

/// The control plane's Deployment in `deploy/` starts `weft` with arguments it accepts: run with
/// those arguments (addresses moved to free loopback ports, paths to a directory here, the API server
/// a fixture named by `$KUBECONFIG`), it lists the mesh from the API server and serves the injector on
/// its webhook port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_planes_deployment_arguments_start_weft_control() {
    let manifest = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../deploy/control-plane/deployment.yaml"
    ))
    .unwrap();
    let deployment: serde_json::Value = serde_yaml_ng::from_str(&manifest).unwrap();
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(container["command"], serde_json::json!(["/usr/local/bin/weft"]));
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca");
    let api = weft_test_support::kube_api::ApiServer::start().await;
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig()).unwrap();
    let webhook = free_port();
    let monitoring = free_port();
    let args: Vec<String> = container["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            let arg = a.as_str().unwrap();
            match arg.split_once('=') {
                Some(("--ca-dir", _)) => format!("--ca-dir={}", ca.display()),
                Some(("--webhook-listen", _)) => format!("--webhook-listen=127.0.0.1:{webhook}"),
                Some(("--monitoring-listen", _)) => format!("--monitoring-listen=127.0.0.1:{monitoring}"),
                Some((flag, value)) if value.starts_with("0.0.0.0:") => {
                    format!("{flag}=127.0.0.1:{}", free_port())
                }
                _ => arg.to_owned(),
            }
        })
        .collect();
    assert!(args.iter().any(|a| a == "--kubernetes"), "{args:?}");
    let mut child = Command::new(WEFT)
        .args(&args)
        .env("KUBECONFIG", &kubeconfig)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let serving = loop {
        if tokio::net::TcpStream::connect(("127.0.0.1", webhook))
            .await
            .is_ok()
        {
            break true;
        }
        if child.try_wait().unwrap().is_some() || Instant::now() > deadline {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // The port Prometheus scrapes (the pod's prometheus.io annotations) serves weft control's metrics.
    let annotations = &deployment["spec"]["template"]["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/port"], "15014");
    let metrics = if serving {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", monitoring))
            .await
            .unwrap();
        let path = annotations["prometheus.io/path"].as_str().unwrap();
        stream
            .write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut text = String::new();
        stream.read_to_string(&mut text).await.unwrap();
        text
    } else {
        String::new()
    };
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    assert!(
        serving,
        "weft {args:?} did not serve the webhook: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        metrics.starts_with("HTTP/1.1 200") && metrics.contains("weft_control_xds_connected_proxies 0"),
        "{metrics}"
    );
    assert!(
        api.counts().lists.contains_key("/api/v1/services"),
        "the mesh was not listed from the API server: {:?}",
        api.counts()
    );
}
