//! The sidecar injector as the API server calls it: AdmissionReview JSON over HTTPS (HTTP/2, which the
//! API server negotiates, and HTTP/1.1), verified with the control plane's root under the Service's
//! name. The returned JSONPatch, applied to the pod, gives exactly what `weft inject` writes for the
//! same pod.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::Ordering;

use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::{Value, json};
use weft_control::ControlPlane;
use weft_inject::{DEFAULT_CONTROL_PLANE, Placement, Settings};

fn settings() -> Settings {
    Settings {
        image: "registry.example.com/weft:0.1.0".into(),
        init_image: "registry.example.com/weft-init:0.1.0".into(),
        control_plane: DEFAULT_CONTROL_PLANE.into(),
        placement: Placement::Native,
    }
}

/// A pod as a ReplicaSet makes it: a generated name, the owner reference, the template hash label.
fn replica_pod(annotations: Value) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": "reviews-v2-5c7f9d8b4-",
            "namespace": "bookinfo",
            "labels": {"app": "reviews", "version": "v2", "pod-template-hash": "5c7f9d8b4"},
            "annotations": annotations,
            "ownerReferences": [{
                "apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "reviews-v2-5c7f9d8b4",
                "uid": "8d1c1f7e-0000-4000-8000-000000000001", "controller": true, "blockOwnerDeletion": true
            }]
        },
        "spec": {
            "serviceAccountName": "bookinfo-reviews",
            "containers": [{
                "name": "reviews",
                "image": "reviews:2",
                "ports": [{"name": "http", "containerPort": 9080}],
                "readinessProbe": {"httpGet": {"path": "/health", "port": "http"}}
            }]
        }
    })
}

fn review(uid: &str, pod: &Value) -> Value {
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "bookinfo",
            "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": pod,
            "dryRun": false
        }
    })
}

struct Webhook {
    addr: std::net::SocketAddr,
    connector: tokio_rustls::TlsConnector,
    /// Whether the client offers HTTP/2 first, as the API server does.
    http2: bool,
}

enum Sender {
    Http1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    Http2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

impl Webhook {
    /// One request over a fresh TLS connection to the name the webhook configuration uses.
    async fn send(&self, method: &str, path: &str, body: Vec<u8>) -> (u16, Value) {
        let tcp = tokio::net::TcpStream::connect(self.addr).await.unwrap();
        let name = ServerName::try_from("weft-control.weft-system.svc").unwrap();
        let tls = self.connector.connect(name, tcp).await.unwrap();
        let http2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
        assert_eq!(http2, self.http2, "the protocol the server chose");
        let io = hyper_util::rt::TokioIo::new(tls);
        let mut sender = if http2 {
            let (sender, connection) =
                hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
                    .await
                    .unwrap();
            tokio::spawn(connection);
            Sender::Http2(sender)
        } else {
            let (sender, connection) = hyper::client::conn::http1::handshake(io).await.unwrap();
            tokio::spawn(connection);
            Sender::Http1(sender)
        };
        let request = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("host", "weft-control.weft-system.svc:15017")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .unwrap();
        let response = match &mut sender {
            Sender::Http1(s) => s.send_request(request).await.unwrap(),
            Sender::Http2(s) => s.send_request(request).await.unwrap(),
        };
        let status = response.status().as_u16();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
    }
}

/// The injector, and a client for it offering HTTP/2 and HTTP/1.1 (the API server's choice) or only
/// HTTP/1.1.
async fn start(http2: bool) -> (ControlPlane, Webhook, Arc<weft_control::webhook::WebhookCounts>) {
    let dir = tempfile::tempdir().unwrap();
    let mut cp = ControlPlane::start(dir.path().into(), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let (addr, counts) = cp
        .serve_webhook("127.0.0.1:0".parse().unwrap(), settings())
        .await
        .unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(cp.ca().root_pem().as_bytes()).unwrap())
        .unwrap();
    let mut config =
        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
    config.alpn_protocols = match http2 {
        true => vec![b"h2".to_vec(), b"http/1.1".to_vec()],
        false => vec![b"http/1.1".to_vec()],
    };
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    (
        cp,
        Webhook {
            addr,
            connector,
            http2,
        },
        counts,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_webhooks_patch_makes_the_pod_weft_inject_writes() {
    let (_cp, webhook, counts) = start(true).await;
    let pod = replica_pod(json!({"sidecar.istio.io/proxyCPU": "50m"}));
    let body = serde_json::to_vec(&review("uid-1", &pod)).unwrap();
    let (status, answer) = webhook.send("POST", "/inject", body).await;
    assert_eq!(status, 200);
    assert_eq!(answer["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(answer["kind"], "AdmissionReview");
    let response = &answer["response"];
    assert_eq!(response["uid"], "uid-1");
    assert_eq!(response["allowed"], true);
    assert_eq!(response["patchType"], "JSONPatch");
    let patch = base64::engine::general_purpose::STANDARD
        .decode(response["patch"].as_str().unwrap())
        .unwrap();
    let patch: json_patch::Patch = serde_json::from_slice(&patch).unwrap();
    let mut patched = pod.clone();
    json_patch::patch(&mut patched, &patch).unwrap();

    let expected =
        weft_inject::inject("pod.json", &serde_json::to_string(&pod).unwrap(), &settings()).unwrap();
    assert_eq!(expected.injected, 1);
    let expected: Value = serde_json::from_str(&expected.text).unwrap();
    assert_eq!(patched, expected);
    // The workload is the Deployment behind the ReplicaSet, not the pod.
    let proxy = &patched["spec"]["initContainers"][1];
    assert_eq!(proxy["name"], "weft-proxy");
    let workload = proxy["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "WORKLOAD_NAME")
        .unwrap();
    assert_eq!(workload["value"], "reviews-v2");
    assert_eq!(
        patched["spec"]["containers"][0]["readinessProbe"]["httpGet"]["port"],
        15020
    );
    assert_eq!(counts.injected.load(Ordering::Relaxed), 1);

    // Opted out: allowed, no patch.
    let out = replica_pod(json!({"sidecar.istio.io/inject": "false"}));
    let (_, answer) = webhook
        .send(
            "POST",
            "/inject",
            serde_json::to_vec(&review("uid-2", &out)).unwrap(),
        )
        .await;
    assert_eq!(answer["response"]["allowed"], true);
    assert!(answer["response"]["patch"].is_null());
    assert_eq!(counts.unchanged.load(Ordering::Relaxed), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_review_the_injector_cannot_act_on_is_allowed_with_a_warning() {
    let (_cp, webhook, counts) = start(false).await;
    let bad_annotation = replica_pod(json!({"traffic.sidecar.istio.io/excludeOutboundPorts": "all"}));
    let cases = [
        (b"{not json".to_vec(), "", "not JSON"),
        (
            serde_json::to_vec(&json!({"kind": "Pod"})).unwrap(),
            "",
            "not an admission.k8s.io/v1 AdmissionReview",
        ),
        (
            serde_json::to_vec(
                &json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {}}),
            )
            .unwrap(),
            "",
            "request.uid: missing",
        ),
        (
            serde_json::to_vec(&review("uid-3", &json!({"kind": "Service"}))).unwrap(),
            "uid-3",
            "is not a Pod",
        ),
        (
            serde_json::to_vec(&review("uid-4", &bad_annotation)).unwrap(),
            "uid-4",
            "traffic.sidecar.istio.io/excludeOutboundPorts: \"all\"",
        ),
    ];
    for (i, (body, uid, why)) in cases.into_iter().enumerate() {
        let (status, answer) = webhook.send("POST", "/inject", body).await;
        assert_eq!(status, 200, "case {i}");
        let response = &answer["response"];
        assert_eq!(response["uid"], uid, "case {i}");
        assert_eq!(
            response["allowed"], true,
            "case {i}: the injector never blocks a pod"
        );
        assert!(response["patch"].is_null(), "case {i}");
        let warning = response["warnings"][0].as_str().unwrap();
        assert!(
            warning.contains("the pod was not injected") && warning.contains(why),
            "case {i}: {warning}"
        );
    }
    assert_eq!(counts.failed.load(Ordering::Relaxed), 5);
    assert_eq!(webhook.send("GET", "/inject", Vec::new()).await.0, 405);
    assert_eq!(webhook.send("POST", "/other", Vec::new()).await.0, 404);
}
