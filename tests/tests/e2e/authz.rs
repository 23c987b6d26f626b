//! Authorization end to end, configured as users configure it: Istio AuthorizationPolicies given to
//! `weft control`, carried over xDS as Envoy RBAC filters, enforced by the server-side sidecar on
//! callers whose identities come from their mutual TLS certificates (three client sidecars:
//! `api-gateway`, `payment-service`, `other`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use weft_control::ControlPlane;
use weft_test_support::http::{HttpServer, TestBody, client, empty};
use weft_test_support::tcp::TcpServer;
use weft_test_support::{OrigDstConnector, TestProxy, admin_get, assert_eventually, metric};

/// The service's address as an app dials it: on loopback, so that a connection made before the
/// configuration arrives (passed through as unknown) never leaves the machine. Any address on port
/// 8080 is the service's HTTP port.
const ORDER_SVC: &str = "127.0.96.30:8080";
const CALLERS: [&str; 3] = ["api-gateway", "payment-service", "other"];

/// The seed's AuthorizationPolicy, as `examples/mesh/order-service.yaml` has it.
fn seed_policy() -> String {
    include_str!("../../../examples/mesh/order-service.yaml")
        .split("\n---\n")
        .find(|doc| doc.contains("kind: AuthorizationPolicy"))
        .expect("the example has the seed's policy")
        .to_owned()
}

fn write(dir: &Path, name: &str, text: &str) {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, dir.join(name)).unwrap();
}

/// `order-svc`, one workload (`order-v1`, labelled as the seed's policy selects) reached at the
/// server-side sidecar's inbound listener.
fn service_yaml(inbound_port: u16) -> String {
    format!(
        "apiVersion: v1
kind: Service
metadata: {{ name: order-svc, namespace: default }}
spec:
  clusterIP: 10.96.0.30
  selector: {{ app: order-service }}
  ports: [{{ name: http, port: 8080 }}]
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{ name: order-v1, namespace: default }}
spec:
  address: 127.0.0.1
  serviceAccount: order-svc
  labels: {{ app: order-service, version: v1, security.istio.io/tlsMode: istio }}
  ports: {{ http: {inbound_port} }}
"
    )
}

struct Caller {
    proxy: TestProxy,
    http1: Client<OrigDstConnector, TestBody>,
    h2: Client<OrigDstConnector, TestBody>,
}

struct Mesh {
    dir: tempfile::TempDir,
    cp: ControlPlane,
    app: HttpServer,
    server: TestProxy,
    callers: Vec<Caller>,
}

fn sidecar(cp: &ControlPlane, workload: &str, sa: &str) -> String {
    let token = cp
        .ca()
        .tokens()
        .issue("default", sa, Duration::from_secs(3600))
        .unwrap();
    format!(
        "node: {{ workload: {workload}, namespace: default, service_account: {sa} }}\n\
         identity: {{ ca_address: \"http://{0}\", token: \"{token}\" }}\n\
         xds: {{ address: \"http://{0}\", initial_fetch_timeout: 10s }}\n",
        cp.address()
    )
}

impl Mesh {
    async fn start(policies: &str) -> Self {
        weft_test_support::init_tracing();
        let dir = tempfile::tempdir().unwrap();
        let cp = ControlPlane::start(dir.path().into(), "127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let app = HttpServer::start("order-v1").await;
        let server = TestProxy::start(&sidecar(&cp, "order-v1", "order-svc")).await;
        // Peers dial the server's inbound listener directly, as if iptables had redirected them there
        // from the app's port.
        server.orig_dst.set_fallback(app.addr);
        write(dir.path(), "order.yaml", &service_yaml(server.inbound().port()));
        write(dir.path(), "policy.yaml", policies);
        let mut callers = Vec::new();
        for sa in CALLERS {
            let proxy = TestProxy::start(&sidecar(&cp, sa, sa)).await;
            // A connection accepted before the service is known is passed through for its whole life:
            // the clients start once the caller has the service and its endpoint.
            assert_eventually!(
                {
                    let (_, dump) = admin_get(proxy.admin(), "/mesh").await;
                    dump.contains("\"0.0.0.0:8080\"")
                        && dump.contains(&format!("127.0.0.1:{}", server.inbound().port()))
                },
                "the service never reached {sa}"
            );
            let connector = proxy
                .orig_dst
                .connector(proxy.outbound(), ORDER_SVC.parse().unwrap());
            callers.push(Caller {
                http1: client(connector.clone(), false),
                h2: client(connector, true),
                proxy,
            });
        }
        for proxy in callers.iter().map(|c| &c.proxy).chain([&server]) {
            assert_eventually!(
                admin_get(proxy.admin(), "/ready").await.0 == 200,
                "a sidecar never became ready"
            );
        }
        Self {
            dir,
            cp,
            app,
            server,
            callers,
        }
    }

    fn caller(&self, sa: &str) -> &Caller {
        &self.callers[CALLERS.iter().position(|c| *c == sa).unwrap()]
    }

    /// The server's effective policies as `/mesh` shows them.
    async fn policies(&self) -> String {
        let (_, dump) = admin_get(self.server.admin(), "/mesh").await;
        let dump: serde_json::Value = serde_json::from_str(&dump).unwrap();
        dump["mesh"]["inbound"]["authorization"].to_string()
    }

    /// Replaces the policies; returns once the server enforces a configuration whose dump passes `applied`.
    async fn set_policies(&self, yaml: &str, applied: impl Fn(&str) -> bool) -> Instant {
        let written = Instant::now();
        write(self.dir.path(), "policy.yaml", yaml);
        assert_eventually!(
            applied(&self.policies().await),
            "the server never received the policies: {}",
            self.policies().await
        );
        assert!(self.cp.problems().is_empty(), "{:?}", self.cp.problems());
        written
    }

    /// A plaintext connection from outside the mesh, straight to the server's inbound listener.
    async fn plaintext(&self, raw: &str) -> String {
        let mut stream = self
            .server
            .orig_dst
            .connect(self.server.inbound(), self.app.addr)
            .await
            .unwrap();
        let _ = stream.write_all(raw.as_bytes()).await;
        let mut response = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut response)).await;
        String::from_utf8_lossy(&response).into_owned()
    }
}

async fn send(
    client: &Client<OrigDstConnector, TestBody>,
    method: Method,
    path: &str,
) -> (StatusCode, String) {
    let request = Request::builder()
        .method(method)
        .uri(format!("http://order-svc:8080{path}"))
        .body(empty())
        .unwrap();
    match client.request(request).await {
        Ok(response) => {
            let status = response.status();
            let body = response
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            (status, String::from_utf8_lossy(&body).into_owned())
        }
        Err(_) => (StatusCode::BAD_GATEWAY, String::new()),
    }
}

async fn status(caller: &Caller, method: Method, path: &str) -> StatusCode {
    send(&caller.http1, method, path).await.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seed_policy_lets_only_the_gateway_and_payments_get_and_post_orders() {
    let mesh = Mesh::start(&seed_policy()).await;
    assert!(
        mesh.policies()
            .await
            .contains("ns[default]-policy[order-service-policy]-rule[0]")
    );
    for sa in ["api-gateway", "payment-service"] {
        let caller = mesh.caller(sa);
        for h2 in [false, true] {
            let client = if h2 { &caller.h2 } else { &caller.http1 };
            assert_eq!(
                send(client, Method::GET, "/orders/1").await.0,
                StatusCode::OK,
                "{sa} h2={h2}"
            );
            assert_eq!(
                send(client, Method::POST, "/orders/1").await.0,
                StatusCode::OK,
                "{sa} h2={h2}"
            );
            assert_eq!(
                send(client, Method::GET, "/admin").await,
                (StatusCode::FORBIDDEN, "RBAC: access denied".into())
            );
            assert_eq!(
                send(client, Method::DELETE, "/orders/1").await.0,
                StatusCode::FORBIDDEN,
                "{sa}"
            );
        }
        let seen = mesh.app.last_request();
        assert!(
            seen.headers["x-forwarded-client-cert"]
                .to_str()
                .unwrap()
                .ends_with(&format!("URI=spiffe://cluster.local/ns/default/sa/{sa}"))
        );
    }
    let other = mesh.caller("other");
    for path in ["/orders/1", "/admin"] {
        assert_eq!(
            send(&other.http1, Method::GET, path).await,
            (StatusCode::FORBIDDEN, "RBAC: access denied".into())
        );
    }
    // The app never saw a denied request.
    for seen in mesh.app.requests() {
        assert!(
            seen.uri.path().starts_with("/orders/") || seen.uri.path() == "/",
            "{:?}",
            seen.uri
        );
        assert_ne!(seen.method, Method::DELETE);
        let caller = seen
            .headers
            .get("x-forwarded-client-cert")
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        assert!(
            !caller.ends_with("sa/other") || seen.uri.path() == "/",
            "{caller}"
        );
    }

    // gRPC callers get PERMISSION_DENIED.
    let grpc = Request::post("http://order-svc:8080/orders.Orders/Delete")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(empty())
        .unwrap();
    let response = other.h2.request(grpc).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["grpc-status"], "7");
    assert_eq!(response.headers()["grpc-message"], "RBAC: access denied");

    // A client without a sidecar has no identity: PERMISSIVE lets it in, the policy denies it.
    let response = mesh
        .plaintext("GET /orders/1 HTTP/1.1\r\nHost: order-svc\r\nConnection: close\r\n\r\n")
        .await;
    assert!(response.starts_with("HTTP/1.1 403"), "{response}");
    assert!(response.ends_with("RBAC: access denied"), "{response}");

    let metrics = mesh.server.metrics().await;
    let denied = [
        ("reporter", "destination"),
        ("response_code", "403"),
        ("response_flags", "RBAC"),
    ];
    assert!(
        metric(&metrics, "istio_requests_total", &denied) >= 8.0,
        "{metrics}"
    );
    let allowed = [
        ("action", "allow"),
        ("policy", "ns[default]-policy[order-service-policy]-rule[0]"),
        ("result", "allowed"),
    ];
    assert!(
        metric(&metrics, "weft_authz_decisions_total", &allowed) >= 8.0,
        "{metrics}"
    );
    let no_match = [("action", "allow"), ("policy", "none"), ("result", "denied")];
    assert!(
        metric(&metrics, "weft_authz_decisions_total", &no_match) >= 8.0,
        "{metrics}"
    );

    // STRICT: the client without a sidecar is refused before any policy is asked.
    let strict = "---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: { name: default, namespace: default }\nspec: { mtls: { mode: STRICT } }\n";
    let seed = seed_policy();
    mesh.set_policies(&format!("{seed}\n{strict}"), |p| {
        p.contains("order-service-policy")
    })
    .await;
    assert_eventually!(
        {
            let (_, dump) = admin_get(mesh.server.admin(), "/mesh").await;
            dump.contains("\"peer_authentication\": \"strict\"")
        },
        "STRICT never applied"
    );
    let before = mesh.app.request_count();
    let response = mesh
        .plaintext("GET /orders/1 HTTP/1.1\r\nHost: order-svc\r\nConnection: close\r\n\r\n")
        .await;
    assert!(response.is_empty(), "{response}");
    assert_eq!(mesh.app.request_count(), before);
    assert_eq!(
        status(mesh.caller("api-gateway"), Method::GET, "/orders/2").await,
        StatusCode::OK
    );
}

/// A caller, a path, and the status it must get.
type Expected = (&'static str, &'static str, StatusCode);

/// Istio's semantics, case by case, each applied as an edit while the mesh runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istio_semantics_hold_end_to_end() {
    let mesh = Mesh::start("").await;
    let policy = |name: &str, namespace: &str, spec: &str| {
        format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{ name: {name}, namespace: {namespace} }}\nspec:\n{spec}\n"
        )
    };
    let selected = "  selector: { matchLabels: { app: order-service } }\n";
    let expect = |cases: &'static [Expected]| cases;
    let scenarios: Vec<(&str, String, &[Expected])> = vec![
        (
            "deny by default: an ALLOW policy without rules allows nothing",
            policy("allow-nothing", "default", selected.trim_end()),
            expect(&[
                ("api-gateway", "/", StatusCode::FORBIDDEN),
                ("other", "/", StatusCode::FORBIDDEN),
            ]),
        ),
        (
            "DENY before ALLOW",
            policy("allow-all", "default", &format!("{selected}  rules: [{{}}]"))
                + "---\n"
                + &policy(
                    "deny-other",
                    "default",
                    &format!(
                        "{selected}  action: DENY\n  rules: [{{ from: [{{ source: {{ principals: [cluster.local/ns/default/sa/other] }} }}] }}]"
                    ),
                ),
            expect(&[
                ("api-gateway", "/", StatusCode::OK),
                ("other", "/", StatusCode::FORBIDDEN),
            ]),
        ),
        (
            "AUDIT never blocks",
            policy(
                "audit-all",
                "default",
                &format!(
                    "{selected}  action: AUDIT\n  rules: [{{ to: [{{ operation: {{ paths: [\"/audited\"] }} }}] }}]"
                ),
            ),
            expect(&[("other", "/audited", StatusCode::OK)]),
        ),
        (
            "namespace-wide (no selector)",
            policy(
                "ns-allow-gateway",
                "default",
                "  rules: [{ from: [{ source: { principals: [cluster.local/ns/default/sa/api-gateway] } }] }]",
            ),
            expect(&[
                ("api-gateway", "/", StatusCode::OK),
                ("payment-service", "/", StatusCode::FORBIDDEN),
            ]),
        ),
        (
            "mesh-wide (root namespace)",
            policy(
                "mesh-deny-payments",
                "istio-system",
                "  action: DENY\n  rules: [{ from: [{ source: { principals: [cluster.local/ns/default/sa/payment-service] } }] }]",
            ),
            expect(&[
                ("api-gateway", "/", StatusCode::OK),
                ("payment-service", "/", StatusCode::FORBIDDEN),
            ]),
        ),
        (
            "notPrincipals",
            policy(
                "not-other",
                "default",
                &format!(
                    "{selected}  rules: [{{ from: [{{ source: {{ namespaces: [default], notPrincipals: [cluster.local/ns/default/sa/other] }} }}] }}]"
                ),
            ),
            expect(&[
                ("payment-service", "/", StatusCode::OK),
                ("other", "/", StatusCode::FORBIDDEN),
            ]),
        ),
        (
            "ipBlocks: the peer's address",
            policy(
                "from-elsewhere",
                "default",
                &format!("{selected}  rules: [{{ from: [{{ source: {{ ipBlocks: [10.0.0.0/8] }} }}] }}]"),
            ),
            expect(&[("api-gateway", "/", StatusCode::FORBIDDEN)]),
        ),
        (
            "ipBlocks: loopback allowed, notIpBlocks",
            policy(
                "from-loopback",
                "default",
                &format!(
                    "{selected}  rules: [{{ from: [{{ source: {{ ipBlocks: [127.0.0.0/8], notIpBlocks: [10.0.0.0/8] }} }}] }}]"
                ),
            ),
            expect(&[("api-gateway", "/", StatusCode::OK)]),
        ),
        (
            "when: request headers and source principal",
            policy(
                "tenant",
                "default",
                &format!(
                    "{selected}  rules: [{{ when: [{{ key: \"request.headers[x-tenant]\", values: [blue] }}, {{ key: source.principal, values: [cluster.local/ns/default/sa/other] }}] }}]"
                ),
            ),
            expect(&[
                ("other", "/", StatusCode::FORBIDDEN),
                ("api-gateway", "/", StatusCode::FORBIDDEN),
            ]),
        ),
    ];
    for (name, yaml, cases) in &scenarios {
        // Rules carry the policy's name; a policy without rules shows as an ALLOW set with none.
        let name_of = yaml.split("name: ").nth(1).unwrap().split(',').next().unwrap();
        let marker = if yaml.contains("rules") {
            format!("policy[{name_of}]")
        } else {
            "\"action\":\"allow\",\"policies\":[]".to_owned()
        };
        mesh.set_policies(yaml, |p| p.contains(&marker)).await;
        for (sa, path, expected) in cases.iter() {
            assert_eq!(
                status(mesh.caller(sa), Method::GET, path).await,
                *expected,
                "{name}: {sa} {path}"
            );
        }
    }
    // The `when` scenario, with the header the rule asks for.
    let other = mesh.caller("other");
    let request = Request::get("http://order-svc:8080/")
        .header("x-tenant", "blue")
        .body(empty())
        .unwrap();
    assert_eq!(
        other.http1.request(request).await.unwrap().status(),
        StatusCode::OK
    );

    // Ports: the destination port is the app's (where the caller was going).
    let port = mesh.app.addr.port();
    let yaml = policy(
        "ports",
        "default",
        &format!("{selected}  rules: [{{ to: [{{ operation: {{ ports: [\"{port}\"] }} }}] }}]"),
    );
    mesh.set_policies(&yaml, |p| p.contains("policy[ports]")).await;
    assert_eq!(
        status(mesh.caller("other"), Method::GET, "/").await,
        StatusCode::OK
    );
    let yaml = policy(
        "ports2",
        "default",
        &format!("{selected}  rules: [{{ to: [{{ operation: {{ notPorts: [\"{port}\"] }} }}] }}]"),
    );
    mesh.set_policies(&yaml, |p| p.contains("policy[ports2]")).await;
    assert_eq!(
        status(mesh.caller("other"), Method::GET, "/").await,
        StatusCode::FORBIDDEN
    );

    // AUDIT was counted without blocking.
    let metrics = mesh.server.metrics().await;
    let audited = [("action", "audit"), ("result", "audited")];
    assert!(
        metric(&metrics, "weft_authz_decisions_total", &audited) >= 1.0,
        "{metrics}"
    );
}

/// A policy edit under load from four clients: the newly denied caller is denied within a second and not
/// one request the policies still allow fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_edit_under_load_applies_within_a_second_without_failing_allowed_requests() {
    let mesh = Arc::new(Mesh::start(&seed_policy()).await);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut load = Vec::new();
    for i in 0..4 {
        let (mesh, stop, ok, failed) = (mesh.clone(), stop.clone(), ok.clone(), failed.clone());
        load.push(tokio::spawn(async move {
            let caller = mesh.caller("api-gateway");
            while !stop.load(Ordering::Relaxed) {
                let client = if i % 2 == 0 { &caller.http1 } else { &caller.h2 };
                match send(client, Method::GET, "/orders/1").await.0 {
                    StatusCode::OK => ok.fetch_add(1, Ordering::Relaxed),
                    _ => failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        status(mesh.caller("payment-service"), Method::GET, "/orders/1").await,
        StatusCode::OK
    );
    let deny = "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: { name: no-payments, namespace: default }\nspec:\n  action: DENY\n  rules: [{ from: [{ source: { principals: [cluster.local/ns/default/sa/payment-service] } }] }]\n";
    let written = Instant::now();
    write(
        mesh.dir.path(),
        "policy.yaml",
        &format!("{}\n{deny}", seed_policy()),
    );
    loop {
        if status(mesh.caller("payment-service"), Method::GET, "/orders/1").await == StatusCode::FORBIDDEN {
            break;
        }
        assert!(
            written.elapsed() < Duration::from_secs(1),
            "the edit took longer than a second"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let took = written.elapsed();
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    for task in load {
        task.await.unwrap();
    }
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "allowed requests failed during the edit"
    );
    assert!(
        ok.load(Ordering::Relaxed) > 40,
        "too little load: {}",
        ok.load(Ordering::Relaxed)
    );
    eprintln!(
        "policy edit applied {took:?} after the write, {} allowed requests meanwhile",
        ok.load(Ordering::Relaxed)
    );
}

/// A DENY that starts matching applies to the next stream of an HTTP/2 connection already open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_http2_connection_is_held_to_the_new_policy() {
    let mesh = Mesh::start("").await;
    let stream = mesh
        .server
        .orig_dst
        .connect(mesh.server.inbound(), mesh.app.addr)
        .await
        .unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let get = || Request::get("http://order-svc/x").body(empty()).unwrap();
    assert_eq!(sender.send_request(get()).await.unwrap().status(), StatusCode::OK);
    let deny = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: { name: deny-x, namespace: default }\nspec:\n  action: DENY\n  rules: [{ to: [{ operation: { paths: [/x] } }] }]\n";
    mesh.set_policies(deny, |p| p.contains("deny-x")).await;
    assert_eq!(
        sender.send_request(get()).await.unwrap().status(),
        StatusCode::FORBIDDEN
    );
}

/// Opaque TCP is authorized at connect time on L4 fields, and an open connection that a new policy no
/// longer allows is closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_connections_are_authorized_and_closed_when_the_policy_turns() {
    let mesh = Mesh::start("").await;
    let echo = TcpServer::echo().await;
    let connect = || async {
        let mut stream = mesh
            .server
            .orig_dst
            .connect(mesh.server.inbound(), echo.addr)
            .await
            .unwrap();
        // Binary first bytes: nothing an HTTP request could start with.
        stream.write_all(b"\x00\x01ping").await.unwrap();
        let mut pong = [0u8; 6];
        match tokio::time::timeout(Duration::from_secs(3), stream.read_exact(&mut pong)).await {
            Ok(Ok(_)) if &pong == b"\x00\x01ping" => Some(stream),
            _ => None,
        }
    };
    let policy = |name: &str, spec: &str| {
        format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{ name: {name}, namespace: default }}\nspec:\n  selector: {{ matchLabels: {{ app: order-service }} }}\n{spec}\n"
        )
    };
    let port = echo.addr.port();
    mesh.set_policies(&policy("tcp-allow", &format!("  rules: [{{ from: [{{ source: {{ ipBlocks: [127.0.0.0/8] }} }}], to: [{{ operation: {{ ports: [\"{port}\"] }} }}] }}]")), |p| p.contains("tcp-allow")).await;
    let mut open = connect().await.expect("allowed at L4");

    // The seed's policy has HTTP-only fields: on a TCP connection its rule never matches (Istio's rule).
    mesh.set_policies(&seed_policy(), |p| p.contains("order-service-policy"))
        .await;
    assert!(
        connect().await.is_none(),
        "HTTP-only ALLOW rules must not admit TCP"
    );
    assert!(mesh.cp.problems().is_empty());

    // The open connection was closed when the policy turned.
    let mut buf = [0u8; 1];
    let closed = tokio::time::timeout(Duration::from_secs(2), open.read(&mut buf)).await;
    assert!(
        matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
        "the connection stayed open: {closed:?}"
    );

    // A DENY with an HTTP field applies to the whole TCP connection.
    mesh.set_policies(&policy("tcp-deny", "  action: DENY\n  rules: [{ from: [{ source: { ipBlocks: [127.0.0.0/8] } }], to: [{ operation: { methods: [GET] } }] }]"), |p| p.contains("tcp-deny")).await;
    assert!(
        connect().await.is_none(),
        "DENY without its HTTP field denies the connection"
    );
    mesh.set_policies(
        &policy(
            "tcp-deny-other",
            "  action: DENY\n  rules: [{ from: [{ source: { ipBlocks: [10.0.0.0/8] } }] }]",
        ),
        |p| p.contains("tcp-deny-other"),
    )
    .await;
    assert!(connect().await.is_some());
    let metrics = mesh.server.metrics().await;
    assert!(
        metric(
            &metrics,
            "istio_tcp_connections_closed_total",
            &[("response_flags", "RBAC")]
        ) >= 3.0,
        "{metrics}"
    );
}

/// No spelling of a denied path reaches the app: the workload allows `/orders/*` and denies `/admin*`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_encoding_of_a_denied_path_reaches_the_app() {
    let policies = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: { name: orders-only, namespace: default }
spec:
  selector: { matchLabels: { app: order-service } }
  rules: [{ to: [{ operation: { paths: [\"/orders/*\"] } }] }]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: { name: no-admin, namespace: default }
spec:
  selector: { matchLabels: { app: order-service } }
  action: DENY
  rules: [{ to: [{ operation: { paths: [\"/admin*\"] } }] }]
";
    let mesh = Mesh::start(policies).await;
    assert_eventually!(mesh.policies().await.contains("no-admin"), "policies not applied");
    let variants = [
        "/admin",
        "//admin",
        "///admin",
        "/./admin",
        "/admin/",
        "/admin/.",
        "/orders/../admin",
        "/orders/./../admin",
        "/orders/%2e%2e/admin",
        "/orders/%2E%2E/admin",
        "/orders/.%2e/admin",
        "/orders/%2e./admin",
        "/orders/..%2fadmin",
        "/orders/..%2Fadmin",
        "/orders/%2e%2e%2fadmin",
        "/orders%2f..%2fadmin",
        "/orders/..%5cadmin",
        "/orders/..%5Cadmin",
        "/orders/..\\admin",
        "/orders\\..\\admin",
        "/%61dmin",
        "/%61%64%6d%69%6e",
        "/%41dmin",
        "/orders/1/../../admin",
        "/orders//..//admin",
        "/orders/.././admin",
        "/admin?",
        "/admin?x=1",
        "/admin#",
        "/admin#frag",
        "/admin%00",
        "/orders/%00/../admin",
        "/orders/%c0%ae%c0%ae/admin",
        "/orders/%c0%afadmin",
        "/orders/%e0%80%ae%e0%80%ae/admin",
        "/orders/%25%32%65%25%32%65/admin",
        "/orders/%2",
        "/orders/%zz/../admin",
        "/./orders/../admin/x",
        "/orders/x/%2e%2e/%2e%2e/admin",
        "/admin;x=1",
        "/ADMIN%2f",
        "/%2fadmin",
        "/%5cadmin",
    ];
    assert!(variants.len() >= 40);
    for path in variants {
        let raw = format!("GET {path} HTTP/1.1\r\nHost: order-svc\r\nConnection: close\r\n\r\n");
        let response = mesh.plaintext(&raw).await;
        let status = response.get(9..12).unwrap_or("");
        assert!(matches!(status, "400" | "403" | "404" | ""), "{path}: {response}");
    }
    for seen in mesh.app.requests() {
        let decoded = percent_decode(seen.uri.path()).to_ascii_lowercase();
        assert!(!decoded.contains("admin"), "{} reached the app", seen.uri);
    }
    // What is allowed arrives normalized: the app gets the path that was authorized.
    let response = mesh
        .plaintext("GET /orders/./x/../1?q=%2F HTTP/1.1\r\nHost: order-svc\r\nConnection: close\r\n\r\n")
        .await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert_eq!(mesh.app.last_request().uri, "/orders/1?q=%2F");
}

fn percent_decode(path: &str) -> String {
    let mut out = Vec::new();
    let bytes = path.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(v) = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Without a control plane: the same policy shape in the proxy's own file, in front of a test service.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_static_file_takes_the_same_policies() {
    let app = HttpServer::start("app").await;
    let proxy = TestProxy::start(&format!(
        "listeners:
  - name: front
    address: 127.0.0.1:0
    cluster: app
    authorization_policies:
      - name: orders-only
        spec:
          rules: [{{ to: [{{ operation: {{ methods: [GET], paths: [\"/orders/*\"] }} }}] }}]
clusters: [{{ name: app, endpoints: [\"{}\"] }}]",
        app.addr
    ))
    .await;
    let front: SocketAddr = proxy.listener("front");
    let get = |path: &'static str| async move {
        let mut stream = tokio::net::TcpStream::connect(front).await.unwrap();
        stream
            .write_all(format!("GET {path} HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut response = Vec::new();
        let _ = stream.read_to_end(&mut response).await;
        String::from_utf8_lossy(&response).into_owned()
    };
    assert!(get("/orders/1").await.starts_with("HTTP/1.1 200"));
    assert!(get("/admin").await.starts_with("HTTP/1.1 403"));
    assert!(get("/orders/../admin").await.starts_with("HTTP/1.1 403"));
    assert_eq!(app.request_count(), 1);

    // A policy the proxy could only enforce by failing closed is refused at start, by field.
    let file = "listeners: [{ name: f, address: 127.0.0.1:0, cluster: c, authorization_policies: [{ name: p, spec: { action: CUSTOM, provider: { name: ext } } }] }]\nclusters: [{ name: c }]";
    let err = weft_model::parse(file).unwrap_err().to_string();
    assert!(
        err.contains("listeners[0].authorization_policies[0].spec.action"),
        "{err}"
    );
    assert!(err.contains("CUSTOM"), "{err}");
}

/// Any xDS server can drive authorization: the test ADS server (not weft control) sends a
/// `virtualInbound` whose HTTP connection manager carries `envoy.filters.http.rbac`; an RBAC field the
/// proxy does not implement is NACKed by name and the last good policy stays enforced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_envoy_rbac_filter_from_any_xds_server_is_enforced_and_unsupported_fields_are_nacked() {
    use envoy_types::pb::envoy::config::cluster::v3::Cluster;
    use envoy_types::pb::envoy::config::core::v3::{Address, SocketAddress, address, socket_address};
    use envoy_types::pb::envoy::config::listener::v3::{Filter, FilterChain, Listener, filter};
    use envoy_types::pb::envoy::config::rbac::v3::{
        Permission, Policy, Principal, Rbac, permission, principal, rbac,
    };
    use envoy_types::pb::envoy::extensions::filters::http::rbac::v3::Rbac as HttpRbac;
    use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
        HttpConnectionManager, HttpFilter, http_connection_manager, http_filter,
    };
    use envoy_types::pb::envoy::r#type::matcher::v3::{
        PathMatcher, StringMatcher, path_matcher, string_matcher,
    };
    use envoy_types::pb::google::protobuf::Any;
    use envoy_types::util::pack_any;
    use prost::Name;

    let inbound = |policy: Policy| -> Any {
        let deny_admin = HttpRbac {
            rules: Some(Rbac {
                action: rbac::Action::Deny as i32,
                policies: [("deny-admin".to_owned(), policy)].into(),
                audit_logging_options: None,
            }),
            ..Default::default()
        };
        let hcm = HttpConnectionManager {
            stat_prefix: "inbound".into(),
            route_specifier: Some(http_connection_manager::RouteSpecifier::RouteConfig(
                weft_test_support::envoy::route_configuration("inbound", "inbound|8080||"),
            )),
            http_filters: vec![
                HttpFilter {
                    name: "envoy.filters.http.rbac".into(),
                    config_type: Some(http_filter::ConfigType::TypedConfig(pack_any(deny_admin))),
                    ..Default::default()
                },
                HttpFilter {
                    name: "envoy.filters.http.router".into(),
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        pack_any(Listener {
            name: "virtualInbound".into(),
            address: Some(Address {
                address: Some(address::Address::SocketAddress(SocketAddress {
                    address: "0.0.0.0".into(),
                    port_specifier: Some(socket_address::PortSpecifier::PortValue(15006)),
                    ..Default::default()
                })),
            }),
            filter_chains: vec![FilterChain {
                filters: vec![Filter {
                    name: "envoy.filters.network.http_connection_manager".into(),
                    config_type: Some(filter::ConfigType::TypedConfig(pack_any(hcm))),
                }],
                ..Default::default()
            }],
            ..Default::default()
        })
    };
    let admin_path = Permission {
        rule: Some(permission::Rule::UrlPath(PathMatcher {
            rule: Some(path_matcher::Rule::Path(StringMatcher {
                match_pattern: Some(string_matcher::MatchPattern::Prefix("/admin".into())),
                ignore_case: false,
            })),
        })),
    };
    let anyone = Principal {
        identifier: Some(principal::Identifier::Any(true)),
    };
    let good = Policy {
        permissions: vec![admin_path.clone()],
        principals: vec![anyone],
        ..Default::default()
    };

    let app = HttpServer::start("app").await;
    let xds = weft_test_support::xds::TestXdsServer::start().await;
    xds.set(&Cluster::type_url(), "c1", vec![]);
    xds.set(&Listener::type_url(), "l1", vec![inbound(good)]);
    let proxy = TestProxy::start(&format!(
        "node: {{ workload: web, namespace: default }}\nxds: {{ address: \"{}\", initial_fetch_timeout: 10s }}",
        xds.url()
    ))
    .await;
    proxy.orig_dst.set_fallback(app.addr);
    assert_eventually!(admin_get(proxy.admin(), "/ready").await.0 == 200, "not ready");
    let get = |path: &'static str| {
        let proxy = &proxy;
        let app = &app;
        async move {
            let mut stream = proxy.orig_dst.connect(proxy.inbound(), app.addr).await.unwrap();
            stream
                .write_all(
                    format!("GET {path} HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n").as_bytes(),
                )
                .await
                .unwrap();
            let mut response = Vec::new();
            let _ = stream.read_to_end(&mut response).await;
            String::from_utf8_lossy(&response)
                .get(9..12)
                .unwrap_or_default()
                .to_owned()
        }
    };
    assert_eventually!(get("/admin/x").await == "403", "the RBAC filter was not enforced");
    assert_eq!(get("/orders").await, "200");

    // A filter-state principal is not implemented: NACKed by field, and /admin stays denied.
    let bad = Policy {
        permissions: vec![admin_path],
        principals: vec![Principal {
            identifier: Some(principal::Identifier::FilterState(Default::default())),
        }],
        ..Default::default()
    };
    xds.set(&Listener::type_url(), "l2", vec![inbound(bad)]);
    assert_eventually!(!xds.nacks().is_empty(), "no NACK");
    let (type_url, still_on, message) = xds.nacks().remove(0);
    assert_eq!(type_url, Listener::type_url());
    assert_eq!(still_on, "l1");
    assert_eq!(
        message,
        "Listener \"virtualInbound\": filter_chains[0].filters[0].typed_config.http_filters[0].typed_config.rules.policies[\"deny-admin\"].principals[0].filter_state: not supported"
    );
    assert_eq!(get("/admin/x").await, "403");
    assert_eq!(get("/orders").await, "200");

    // An HTTP filter the proxy does not implement is refused unless it is optional.
    let mut listener: Listener = prost::Message::decode(inbound(Policy::default()).value.as_slice()).unwrap();
    let Some(filter::ConfigType::TypedConfig(any)) = &listener.filter_chains[0].filters[0].config_type else {
        unreachable!()
    };
    let mut hcm: HttpConnectionManager = prost::Message::decode(any.value.as_slice()).unwrap();
    hcm.http_filters.insert(
        0,
        HttpFilter {
            name: "envoy.filters.http.ext_authz".into(),
            ..Default::default()
        },
    );
    listener.filter_chains[0].filters[0].config_type = Some(filter::ConfigType::TypedConfig(pack_any(hcm)));
    xds.set(&Listener::type_url(), "l3", vec![pack_any(listener)]);
    assert_eventually!(xds.nacks().len() == 2, "no NACK for ext_authz");
    assert!(
        xds.nacks()[1]
            .2
            .contains("unsupported HTTP filter envoy.filters.http.ext_authz"),
        "{:?}",
        xds.nacks()
    );
    assert_eq!(get("/admin/x").await, "403");
}

/// The server sidecar's `/tap` shows each request's authorization decision with the caller's
/// identity from its certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_sidecars_tap_shows_each_decision_and_the_callers_proven_identity() {
    let mesh = Mesh::start(&seed_policy()).await;
    let mut tap = weft_test_support::admin_tap(mesh.server.admin(), "?duration=60s").await;
    let gateway = mesh.caller("api-gateway");
    assert_eq!(
        send(&gateway.http1, Method::GET, "/orders/1").await.0,
        StatusCode::OK
    );
    assert_eq!(
        send(&gateway.http1, Method::DELETE, "/orders/1").await.0,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        send(&mesh.caller("other").h2, Method::GET, "/orders/1").await.0,
        StatusCode::FORBIDDEN
    );
    let mut lines = Vec::new();
    for _ in 0..3 {
        let line = tokio::time::timeout(Duration::from_secs(10), tap.recv())
            .await
            .expect("a tap line")
            .expect("the session is open");
        lines.push(line);
    }
    let seen: Vec<(&str, &str, u64, &str, &str)> = lines
        .iter()
        .map(|l| {
            (
                l["method"].as_str().unwrap(),
                l["downstream_peer_uri_san"].as_str().unwrap(),
                l["response_code"].as_u64().unwrap(),
                l["authorization"].as_str().unwrap(),
                l["direction"].as_str().unwrap(),
            )
        })
        .collect();
    let id = |sa: &str| format!("spiffe://cluster.local/ns/default/sa/{sa}");
    let (gateway_id, other_id) = (id("api-gateway"), id("other"));
    assert_eq!(
        seen,
        [
            ("GET", gateway_id.as_str(), 200, "allowed", "inbound"),
            (
                "DELETE",
                gateway_id.as_str(),
                403,
                "denied: no ALLOW policy matched",
                "inbound"
            ),
            (
                "GET",
                other_id.as_str(),
                403,
                "denied: no ALLOW policy matched",
                "inbound"
            ),
        ]
    );
    assert_eq!(
        lines[1]["response_code_details"], "rbac_access_denied",
        "{}",
        lines[1]
    );
    assert_eq!(lines[2]["protocol"], "HTTP/2");
}
