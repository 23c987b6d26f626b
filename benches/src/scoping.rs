//! `--scoped-memory`: a proxy's memory as the mesh around it grows, and what a `Sidecar` that scopes
//! it to its own namespace buys back. Three meshes served by an in-process `weft control`, each to a
//! fresh proxy whose configuration comes over ADS: 10 services; the same 10 beside 1,000 others in
//! other namespaces; and those 1,010 with a Sidecar (`egress.hosts: ["./*"]`) in the proxy's namespace.
//! Reported: VmRSS once the proxy holds its configuration, and the ratios to the 10-service mesh.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::{free_addr, status_kib};

/// Services in the proxy's own namespace, and in the rest of the mesh.
const OWN: usize = 10;
const OTHERS: usize = 1_000;
/// Namespaces the others are spread over.
const OTHER_NAMESPACES: usize = 20;

/// A Service with one HTTP port and two sidecar-carrying WorkloadEntries behind it.
fn service(out: &mut String, name: &str, namespace: &str, index: usize) {
    let _ = write!(
        out,
        "---\napiVersion: v1\nkind: Service\nmetadata: {{ name: {name}, namespace: {namespace} }}\n\
         spec: {{ clusterIP: 10.{}.{}.{}, selector: {{ app: {name} }}, ports: [{{ name: http, port: 8080 }}] }}\n",
        1 + index / 65536,
        (index / 256) % 256,
        index % 256
    );
    for replica in 0..2 {
        let _ = write!(
            out,
            "---\napiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {{ name: {name}-{replica}, namespace: {namespace} }}\n\
             spec: {{ address: 10.200.{}.{}, labels: {{ app: {name}, security.istio.io/tlsMode: istio }}, serviceAccount: {name} }}\n",
            (2 * index + replica) / 256 % 256,
            (2 * index + replica) % 256
        );
    }
}

fn mesh(others: usize, sidecar: bool) -> String {
    let mut out = String::new();
    for i in 0..OWN {
        service(&mut out, &format!("own-{i}"), "shop", i);
    }
    for i in 0..others {
        service(
            &mut out,
            &format!("svc-{i}"),
            &format!("ns-{}", i % OTHER_NAMESPACES),
            OWN + i,
        );
    }
    out.push_str(
        "---\napiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: { name: client, namespace: shop }\n\
         spec: { address: 127.0.0.1, labels: { app: client }, serviceAccount: client }\n",
    );
    if sidecar {
        out.push_str(
            "---\napiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: { name: default, namespace: shop }\n\
             spec: { egress: [{ hosts: [\"./*\"] }] }\n",
        );
    }
    out
}

/// The VmRSS (KiB) of a proxy that has taken `mesh` from a control plane, and its cluster count.
fn measure(
    weft: &Path,
    dir: &Path,
    mesh_yaml: &str,
    client_rt: &tokio::runtime::Runtime,
) -> anyhow::Result<(u64, usize)> {
    let mesh_dir = dir.join("mesh");
    std::fs::create_dir_all(&mesh_dir)?;
    std::fs::write(mesh_dir.join("mesh.yaml"), mesh_yaml)?;
    let cp_rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let cp = cp_rt.block_on(weft_control::ControlPlane::start(
        mesh_dir,
        "127.0.0.1:0".parse()?,
    ))?;
    let problems = cp.problems();
    if !problems.is_empty() {
        bail!("the generated mesh has problems: {problems:?}");
    }
    let token = cp
        .ca()
        .tokens()
        .issue("shop", "client", Duration::from_secs(3600))?;
    let address = cp.address();
    let serving = std::thread::spawn(move || {
        cp_rt.block_on(async move {
            tokio::time::sleep(Duration::from_secs(60)).await;
            cp.stop().await;
        })
    });
    let admin = free_addr()?;
    let config = dir.join("proxy.yaml");
    std::fs::write(
        &config,
        format!(
            "node: {{ workload: client, namespace: shop, service_account: client }}\n\
             identity: {{ ca_address: \"http://{address}\", token: \"{token}\" }}\n\
             xds: {{ address: \"http://{address}\" }}\n\
             admin: {{ address: {admin} }}\nreadiness: {{ address: {} }}\nstatus: {{ address: {} }}\n\
             outbound: {{ address: {} }}\ninbound: {{ address: {} }}\naccess_log: {{ path: off }}\n",
            free_addr()?,
            free_addr()?,
            free_addr()?,
            free_addr()?
        ),
    )?;
    let mut child = Command::new(weft)
        .args(["proxy", "--concurrency", "1", "--config"])
        .arg(&config)
        .env("WEFT_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", weft.display()))?;
    let result = client_rt
        .block_on(settled(admin))
        .and_then(|clusters| Ok((status_kib(child.id(), "VmRSS:")?, clusters)));
    let _ = child.kill();
    let _ = child.wait();
    drop(serving); // the control plane stops by itself
    result
}

/// Once the proxy is ready and its cluster count has held for a second: that count.
async fn settled(admin: SocketAddr) -> anyhow::Result<usize> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let (mut last, mut since) = (usize::MAX, Instant::now());
    while Instant::now() < deadline {
        if let Ok(text) = get(admin, "/clusters").await {
            let clusters: std::collections::BTreeSet<&str> = text
                .lines()
                .filter_map(|l| l.split("::").next())
                .filter(|name| name.starts_with("outbound|"))
                .collect();
            if clusters.len() != last {
                (last, since) = (clusters.len(), Instant::now());
            } else if last > 0 && since.elapsed() >= Duration::from_secs(1) {
                return Ok(last);
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("the proxy's configuration did not settle")
}

pub(crate) async fn get(admin: SocketAddr, path: &str) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(admin).await?;
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nhost: admin\r\nconnection: close\r\n\r\n").as_bytes())
        .await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    Ok(response)
}

pub(crate) fn run(weft: &Path, client_rt: &tokio::runtime::Runtime) -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("weft-bench-scoping-{}", std::process::id()));
    let cases = [
        ("10 services", mesh(0, false)),
        ("1,010 services, no Sidecar", mesh(OTHERS, false)),
        ("1,010 services, Sidecar ./*", mesh(OTHERS, true)),
    ];
    let mut figures = Vec::new();
    for (i, (name, yaml)) in cases.iter().enumerate() {
        let case_dir = dir.join(i.to_string());
        let (rss, clusters) = measure(weft, &case_dir, yaml, client_rt)?;
        println!(
            "{name}: {clusters} outbound clusters, VmRSS {:.1} MiB",
            rss as f64 / 1024.0
        );
        figures.push(rss as f64);
    }
    let _ = std::fs::remove_dir_all(&dir);
    println!(
        "ratios to the 10-service mesh: unscoped {:.2}, scoped {:.2}",
        figures[1] / figures[0],
        figures[2] / figures[0]
    );
    Ok(())
}
