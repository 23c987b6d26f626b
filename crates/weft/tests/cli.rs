//! The `weft` binary as users run it: exit codes, signals, the demo, and memory under large bodies.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::process::Command;
use std::time::Duration;

use http::StatusCode;
use nix::sys::signal::{Signal, kill};
use support::{ProxyProcess, WEFT, free_port};
use weft_test_support::http::{HttpServer, drain_body, empty, streamed};

#[test]
fn bad_config_exits_2_naming_file_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.yaml");
    std::fs::write(&path, "clusters:\n  - name: web\n    endpoints: [127.0.0.1:8080]\nlisteners:\n  - { name: front, address: 127.0.0.1:18080, cluster: wbe }\n").unwrap();
    let out = Command::new(WEFT)
        .args(["proxy", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&path.display().to_string()), "{stderr}");
    assert!(
        stderr.contains("field `listeners[0].cluster`: unknown cluster \"wbe\""),
        "{stderr}"
    );

    std::fs::write(&path, "drain_timeout: forever\n").unwrap();
    let out = Command::new(WEFT)
        .args(["proxy", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("drain_timeout"), "{stderr}");

    let out = Command::new(WEFT)
        .args(["proxy", "--config", "/nonexistent/weft.yaml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/weft.yaml: cannot read"));
}

#[test]
fn a_port_in_use_fails_with_the_listener_named() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.yaml");
    std::fs::write(&path, format!("admin: {{ address: {addr} }}\noutbound: {{ address: 127.0.0.1:0 }}\ninbound: {{ address: 127.0.0.1:0 }}\nreadiness: {{ address: 127.0.0.1:0 }}\n")).unwrap();
    let out = Command::new(WEFT)
        .args(["proxy", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("cannot bind the admin listener to {addr}")),
        "{stderr}"
    );
}

#[test]
fn logs_written_to_a_pipe_carry_no_colour_codes() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.yaml");
    std::fs::write(&path, "admin: { address: 127.0.0.1:0 }\noutbound: { address: 127.0.0.1:0 }\ninbound: { address: 127.0.0.1:0 }\nreadiness: { address: 127.0.0.1:0 }\n").unwrap();
    let mut child = Command::new(WEFT)
        .args(["proxy", "--config"])
        .arg(&path)
        .env("WEFT_LOG", "info")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    // The first info line, read on a thread so that a silent proxy fails the test instead of hanging it.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let line = std::io::BufReader::new(stderr).lines().find_map(Result::ok);
        let _ = tx.send(line);
    });
    let line = rx.recv_timeout(Duration::from_secs(20));
    let _ = child.kill();
    let _ = child.wait();
    let line = line.unwrap().expect("weft proxy wrote a log line");
    assert!(line.contains("INFO"), "{line:?}");
    assert!(
        !line.contains('\x1b'),
        "escape codes in logs written to a pipe: {line:?}"
    );
}

#[test]
fn demo_runs_a_fixed_number_of_requests() {
    let out = Command::new(WEFT)
        .args(["demo", "--requests", "100", "--rate", "500"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("summary: 100 requests, 0 failed"), "{stdout}");
    // 90/10 from the VirtualService: binomial, n = 100; both versions answer (P(no v2) = 3e-5).
    let count = |name: &str| -> u32 {
        let key = format!("\"{name}\": ");
        stdout
            .split(&key)
            .nth(1)
            .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    let (v1, v2) = (count("reviews-v1"), count("reviews-v2"));
    assert_eq!(v1 + v2 + 5, 105, "{stdout}");
    assert!(v1 > v2 && v2 >= 1, "expected about 90/10, got {v1}/{v2}");
    assert!(
        stdout.contains("with x-canary: true: {\"reviews-v2\": 5}"),
        "{stdout}"
    );
    assert!(
        stdout.contains("destination_service=\"reviews.demo.svc.cluster.local\""),
        "{stdout}"
    );
    // The trace of the access log's last request: the client side's span and the server side's under it.
    let id = stdout
        .lines()
        .find(|l| l.starts_with("  client side: ["))
        .and_then(|l| l.split('"').nth(9))
        .expect("the client side's access log line");
    let trace = stdout
        .lines()
        .skip_while(|l| !l.starts_with("trace "))
        .take(3)
        .collect::<Vec<_>>();
    assert!(
        trace.len() == 3 && trace[0].contains(&format!("of request {id}")),
        "{stdout}"
    );
    let client_span = trace[1]
        .strip_prefix("  productpage.demo span ")
        .and_then(|rest| rest.split(' ').next())
        .expect("the client side's span");
    assert!(
        trace[2].starts_with("  reviews-v") && trace[2].contains(&format!("(child of {client_span})")),
        "{stdout}"
    );
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("drain timeout"),
        "the demo's proxies drained at once"
    );
}

#[test]
fn check_reports_problems_and_exits_1() {
    let out = Command::new(WEFT)
        .args([
            "check",
            concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/mesh"),
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.ends_with("no problems\n"), "{stdout}");
    assert!(
        stdout.contains("AuthorizationPolicy default/order-service-policy: enforced on inbound, ALLOW, 1 rule(s), on workloads with app=order-service"),
        "{stdout}"
    );

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("bad.yaml"),
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: { name: r }\nspec: { subsets: [] }\n",
    )
    .unwrap();
    let out = Command::new(WEFT).arg("check").arg(dir.path()).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("bad.yaml: DestinationRule default/r: field `spec`: missing field `host`"),
        "{stdout}"
    );
}

/// Policies the proxy could only enforce by failing closed, and a JWT policy it does not verify, are each
/// named by file, resource and field, and fail the check.
#[test]
fn check_names_every_policy_it_cannot_enforce() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("policies.yaml"),
        "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: { name: ext, namespace: default }
spec:
  action: CUSTOM
  provider: { name: opa }
  rules: [{ to: [{ operation: { paths: [\"/admin\"] } }] }]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: { name: claims, namespace: default }
spec:
  rules: [{ when: [{ key: \"request.auth.claims[groups]\", values: [admins] }, { key: request.time, values: [x] }] }]
---
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: { name: jwt, namespace: default }
spec: { jwtRules: [{ issuer: https://issuer.example }] }
---
apiVersion: apps/v1
kind: Deployment
metadata: { name: app }
spec: {}
",
    )
    .unwrap();
    let out = Command::new(WEFT).arg("check").arg(dir.path()).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    for expected in [
        "policies.yaml: AuthorizationPolicy default/ext: field `spec.action`: CUSTOM needs an external authorizer",
        "policies.yaml: AuthorizationPolicy default/claims: field `spec.rules[0].when[0].key`: \"request.auth.claims[groups]\" needs JWT authentication",
        "policies.yaml: AuthorizationPolicy default/claims: field `spec.rules[0].when[1].key`: the proxy cannot evaluate \"request.time\"",
        "policies.yaml: RequestAuthentication default/jwt: field `kind`: RequestAuthentication (JWT) is not supported yet",
        "Deployment x1: ignored (not mesh configuration)",
    ] {
        assert!(stdout.contains(expected), "missing {expected:?} in\n{stdout}");
    }
}

fn explicit_listener(port: u16, app: std::net::SocketAddr) -> String {
    format!(
        "outbound: {{ enabled: false }}\ninbound: {{ enabled: false }}\nlisteners: [{{ name: front, address: 127.0.0.1:{port}, cluster: app }}]\nclusters: [{{ name: app, endpoints: [{app}] }}]\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_requests_then_exits_0() {
    let app = HttpServer::start("app").await;
    let port = free_port();
    let mut proxy = ProxyProcess::start(&explicit_listener(port, app.addr)).await;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<weft_test_support::http::TestBody>();
    let request = http::Request::get(format!("http://127.0.0.1:{port}/delay/1000"))
        .body(empty())
        .unwrap();
    let in_flight = tokio::spawn(async move {
        let response = client.request(request).await.unwrap();
        (response.status(), drain_body(response.into_body()).await.unwrap())
    });
    weft_test_support::assert_eventually!(app.request_count() == 1, "request not in flight");

    kill(proxy.pid(), Signal::SIGTERM).unwrap();
    let (status, len) = in_flight.await.unwrap();
    assert_eq!(
        (status, len),
        (StatusCode::OK, 2),
        "the in-flight request completes during the drain"
    );
    let exit = tokio::task::spawn_blocking(move || proxy.child.wait().unwrap())
        .await
        .unwrap();
    assert_eq!(exit.code(), Some(0));
}

async fn large_bodies_with_bounded_memory(h2: bool) {
    const SIZE: u64 = 100 * 1024 * 1024;
    /// The proxy may hold some buffers per connection, never the body: well under the body's size.
    const MAX_PEAK_RSS: u64 = 48 * 1024 * 1024;
    let app = HttpServer::start("app").await;
    let port = free_port();
    let proxy = ProxyProcess::start(&explicit_listener(port, app.addr)).await;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(h2)
        .build_http::<weft_test_support::http::TestBody>();

    let upload = http::Request::post(format!("http://127.0.0.1:{port}/sink"))
        .body(streamed(SIZE))
        .unwrap();
    let response = client.request(upload).await.unwrap();
    let counted = http_body_util::BodyExt::collect(response.into_body())
        .await
        .unwrap()
        .to_bytes();
    assert_eq!(
        counted,
        SIZE.to_string().as_bytes(),
        "the server received all 100 MB"
    );

    let download = http::Request::get(format!("http://127.0.0.1:{port}/bytes/{SIZE}"))
        .body(empty())
        .unwrap();
    let response = client.request(download).await.unwrap();
    assert_eq!(drain_body(response.into_body()).await.unwrap(), SIZE);

    let peak = proxy.peak_rss();
    assert!(
        peak < MAX_PEAK_RSS,
        "proxy peak RSS {} MiB after streaming 2 x 100 MiB",
        peak >> 20
    );
    eprintln!(
        "proxy peak RSS after 2 x 100 MiB ({}): {} MiB",
        if h2 { "h2" } else { "http/1.1" },
        peak >> 20
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_bodies_with_bounded_memory_http1() {
    tokio::time::timeout(Duration::from_secs(300), large_bodies_with_bounded_memory(false))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_bodies_with_bounded_memory_http2() {
    tokio::time::timeout(Duration::from_secs(300), large_bodies_with_bounded_memory(true))
        .await
        .unwrap();
}

/// `iptables/default.rules` is what `weft init --dry-run` prints for the default settings. After an
/// intended change to the rules, regenerate it with `WEFT_UPDATE_GOLDEN=1`.
#[test]
fn init_dry_run_matches_the_golden_rule_set() {
    let golden = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../iptables/default.rules");
    let out = Command::new(WEFT).args(["init", "--dry-run"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let printed = String::from_utf8(out.stdout).unwrap();
    if std::env::var_os("WEFT_UPDATE_GOLDEN").is_some() {
        std::fs::write(&golden, &printed).unwrap();
    }
    let expected = std::fs::read_to_string(&golden).unwrap();
    assert!(
        printed == expected,
        "`weft init --dry-run` differs from {}; if the change is intended, run the test with \
         WEFT_UPDATE_GOLDEN=1\n--- printed ---\n{printed}",
        golden.display()
    );
}

#[test]
fn init_refuses_bad_flags_naming_them() {
    for (args, named) in [
        (&["init", "-x", "10.0.0.0/40"][..], "--exclude-outbound-cidrs"),
        (&["init", "-b", "80,http"][..], "\"http\""),
        (&["init", "-p", "15006"][..], "--outbound-port and --inbound-port"),
    ] {
        let out = Command::new(WEFT).args(args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(named), "{args:?}: {stderr}");
    }
}

/// Root only: `weft demo --netns` builds pods from network namespaces, sends its traffic through the
/// real capture rules and mutual TLS, and leaves no namespace or bridge behind.
#[test]
fn demo_netns_runs_the_mesh_in_network_namespaces_and_cleans_up() {
    if let Some(reason) = weft_netns::missing_prerequisite() {
        eprintln!("SKIP demo_netns_runs_the_mesh_in_network_namespaces_and_cleans_up: {reason}");
        return;
    }
    let child = Command::new(WEFT)
        .args(["demo", "--netns", "--requests", "100", "--rate", "500"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let id = format!("{:x}x0", child.id());
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("summary: 100 requests, 0 failed"), "{stdout}");
    assert!(
        stdout.contains("with x-canary: true: {\"reviews-v2\": 5}"),
        "{stdout}"
    );
    assert!(
        stdout.contains("the apps saw callers: {\"spiffe://cluster.local/ns/demo/sa/productpage\"}"),
        "{stdout}"
    );
    assert!(
        stdout.contains("capture rules in productpage: 18 (weft init)"),
        "{stdout}"
    );

    let namespaces = Command::new("ip").args(["netns", "list"]).output().unwrap();
    let namespaces = String::from_utf8_lossy(&namespaces.stdout);
    assert!(
        !namespaces.contains(&format!("weftpod-{id}-")),
        "left behind: {namespaces}"
    );
    let bridges = Command::new("ip")
        .args(["-o", "link", "show", "type", "bridge"])
        .output()
        .unwrap();
    let bridges = String::from_utf8_lossy(&bridges.stdout);
    assert!(!bridges.contains(&format!("wb{id}:")), "left behind: {bridges}");
}
