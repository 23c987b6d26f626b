//! Root only: the real kernel path. A network namespace made for the test, an iptables REDIRECT like
//! `weft init` installs, a `weft proxy` process running as UID 1337, and a client that knows nothing of
//! the proxy. Proves that SO_ORIGINAL_DST finds where each connection was going.
//!
//! Without root (or without `ip`/`iptables`/`setpriv`) it prints SKIP with the reason.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use support::WEFT;
use weft_test_support::http::{HttpServer, empty};
use weft_test_support::{admin_get, metric};

const PROXY_UID: &str = "1337";
const SERVICE_IP: &str = "10.200.0.2";

fn skip_reason() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("needs root to create network namespaces and iptables rules".into());
    }
    for tool in ["ip", "iptables", "setpriv"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output();
        if !found.is_ok_and(|o| o.status.success()) {
            return Some(format!("`{tool}` is not installed (.ci/run installs it)"));
        }
    }
    None
}

fn run(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A network namespace and the processes in it, all removed on drop (also when the test fails).
struct Netns {
    name: String,
    children: Vec<Child>,
}

impl Netns {
    fn create() -> Self {
        let name = format!("weft-origdst-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        run(&["ip", "netns", "add", &name]);
        let ns = Self {
            name,
            children: Vec::new(),
        };
        ns.exec(&["ip", "link", "set", "lo", "up"]);
        ns.exec(&["ip", "addr", "add", &format!("{SERVICE_IP}/32"), "dev", "lo"]);
        ns
    }

    fn exec(&self, args: &[&str]) {
        let mut full = vec!["ip", "netns", "exec", &self.name];
        full.extend_from_slice(args);
        run(&full);
    }

    /// Moves the calling thread into the namespace: sockets it creates from now on live there.
    fn enter(&self) {
        let file = std::fs::File::open(format!("/var/run/netns/{}", self.name)).unwrap();
        nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = Command::new("ip").args(["netns", "del", &self.name]).output();
    }
}

#[test]
fn iptables_redirect_and_so_original_dst() {
    if let Some(reason) = skip_reason() {
        eprintln!("SKIP iptables_redirect_and_so_original_dst: {reason}");
        return;
    }
    let mut ns = Netns::create();
    // What `weft init` does, reduced to the rule under test: the app's TCP to the service address goes to
    // the proxy's outbound port; the proxy's own connections (UID 1337) are left alone.
    ns.exec(&[
        "iptables",
        "-t",
        "nat",
        "-A",
        "OUTPUT",
        "-p",
        "tcp",
        "-d",
        SERVICE_IP,
        "-m",
        "owner",
        "!",
        "--uid-owner",
        PROXY_UID,
        "-j",
        "REDIRECT",
        "--to-ports",
        "15001",
    ]);

    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let config = dir.path().join("weft.yaml");

    // Everything below runs on a thread inside the namespace, so the test's own servers and clients are
    // "apps in the pod".
    let ns_name = ns.name.clone();
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                ns.enter();
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
                rt.block_on(async {
                    let backend = HttpServer::start("backend").await;
                    let external_addr: SocketAddr = format!("{SERVICE_IP}:18081").parse().unwrap();
                    let external = HttpServer::start_on(external_addr, "external").await;

                    std::fs::write(
                        &config,
                        format!(
                            "outbound:\n  services: [{{ address: \"{SERVICE_IP}:9999\", cluster: backend }}]\n\
                             inbound: {{ enabled: false }}\n\
                             clusters: [{{ name: backend, endpoints: [\"{}\"] }}]\n",
                            backend.addr
                        ),
                    )
                    .unwrap();
                    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644)).unwrap();
                    let proxy = Command::new("ip")
                        .args(["netns", "exec", &ns_name, "setpriv", "--reuid", PROXY_UID, "--regid", PROXY_UID, "--clear-groups", WEFT, "proxy", "--config"])
                        .arg(&config)
                        .stdout(Stdio::null())
                        .spawn()
                        .unwrap();
                    ns.children.push(proxy);

                    let admin: SocketAddr = "127.0.0.1:15000".parse().unwrap();
                    let deadline = Instant::now() + Duration::from_secs(20);
                    while tokio::net::TcpStream::connect(admin).await.is_err() || admin_get(admin, "/ready").await.0 != 200 {
                        assert!(Instant::now() < deadline, "proxy in the namespace did not become ready");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }

                    // The app dials the service address; iptables sends it to the proxy, which routes by the
                    // original destination to the backend cluster.
                    assert_eq!(get(&format!("{SERVICE_IP}:9999")).await, "backend");
                    // An address no service claims passes through to where the app was going.
                    assert_eq!(get(&external_addr.to_string()).await, "external");
                    assert_eq!(external.request_count(), 1);

                    let metrics = admin_get(admin, "/metrics").await.1;
                    assert_eq!(metric(&metrics, "istio_requests_total", &[("destination_service", "backend")]), 1.0, "{metrics}");
                    let passthrough = external_addr.to_string();
                    assert_eq!(metric(&metrics, "istio_requests_total", &[("destination_service", passthrough.as_str())]), 1.0, "{metrics}");
                });
            })
            .join()
            .unwrap();
    });
}

/// A plain HTTP GET from an app that knows nothing of the proxy; returns who served it.
async fn get(authority: &str) -> String {
    let stream = tokio::net::TcpStream::connect(authority).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let request = http::Request::get("/")
        .header("host", authority)
        .body(empty())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    let served_by = response.headers()["x-served-by"].to_str().unwrap().to_owned();
    response.into_body().collect().await.unwrap();
    served_by
}
