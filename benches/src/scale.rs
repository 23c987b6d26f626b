//! `--mesh-scale N,...`: what a mesh of N services costs the control plane and a proxy, and how fast
//! one change reaches the proxy it affects. For each N, a directory of Istio YAML (one file per
//! service: a Service, two WorkloadEntries, a DestinationRule and a VirtualService, spread over 20
//! namespaces) is served by a `weft control` process; two `weft proxy` processes take their
//! configuration from it over ADS: one whose namespace sees the whole mesh, and one in a namespace of
//! 10 services whose `Sidecar` (`egress.hosts: ["./*"]`) scopes it to them.
//!
//! Reported per N: weft control's load time (start to its xDS port accepting) and RSS; each proxy's
//! time to ready and RSS; the time from a VirtualService edit, and from an endpoint change, to the
//! whole-mesh proxy having applied it (its ACK of the new version, seen on weft control's
//! `/debug/syncz`; medians of 5); and whether the scoped proxy was sent anything for those edits.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::scoping::get;
use crate::{free_addr, status_kib};

const NAMESPACES: usize = 20;
/// Services in the scoped proxy's namespace.
const QUIET: usize = 10;
const EDITS: usize = 5;

fn service_yaml(name: &str, namespace: &str, index: usize, timeout_s: usize, endpoint: u8) -> String {
    let vip = format!(
        "10.{}.{}.{}",
        96 + index / 65536,
        (index / 256) % 256,
        index % 256
    );
    let mut out = String::new();
    let _ = write!(
        out,
        "apiVersion: v1\nkind: Service\nmetadata: {{ name: {name}, namespace: {namespace} }}\n\
         spec: {{ clusterIP: {vip}, selector: {{ app: {name} }}, ports: [{{ name: http, port: 8080 }}] }}\n"
    );
    for replica in 0..2u8 {
        let _ = write!(
            out,
            "---\napiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {{ name: {name}-{replica}, namespace: {namespace} }}\n\
             spec: {{ address: 10.{}.{}.{}, labels: {{ app: {name}, version: v{replica}, security.istio.io/tlsMode: istio }}, serviceAccount: {name} }}\n",
            200 + (2 * index + usize::from(replica)) / 65536 % 50,
            (2 * index + usize::from(replica)) / 256 % 256,
            if replica == 0 {
                endpoint
            } else {
                ((2 * index + 1) % 256) as u8
            },
        );
    }
    let _ = write!(
        out,
        "---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{ name: {name}, namespace: {namespace} }}\n\
         spec:\n  host: {name}.{namespace}.svc.cluster.local\n  trafficPolicy:\n    outlierDetection: {{ consecutive5xxErrors: 5, interval: 10s, baseEjectionTime: 30s }}\n\
         \x20 subsets:\n  - {{ name: v0, labels: {{ version: v0 }} }}\n  - {{ name: v1, labels: {{ version: v1 }} }}\n\
         ---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{ name: {name}, namespace: {namespace} }}\n\
         spec:\n  hosts: [{name}.{namespace}.svc.cluster.local]\n  http:\n  - timeout: {timeout_s}s\n    retries: {{ attempts: 3, perTryTimeout: 2s, retryOn: 5xx }}\n\
         \x20   route:\n    - {{ destination: {{ host: {name}.{namespace}.svc.cluster.local, subset: v0 }}, weight: 90 }}\n\
         \x20   - {{ destination: {{ host: {name}.{namespace}.svc.cluster.local, subset: v1 }}, weight: 10 }}\n"
    );
    out
}

fn name_of(i: usize) -> (String, String) {
    (format!("svc-{i}"), format!("ns-{}", i % NAMESPACES))
}

/// Writes `text` to `dir/file` as one rename, so the control plane never reads half a file.
fn write(dir: &Path, file: &str, text: &str) -> anyhow::Result<()> {
    let tmp = dir.join(format!(".{file}.tmp"));
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, dir.join(file))?;
    Ok(())
}

fn generate(dir: &Path, services: usize) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    for i in 0..services {
        let (name, namespace) = name_of(i);
        write(
            dir,
            &format!("{name}.yaml"),
            &service_yaml(&name, &namespace, i, 3, 1),
        )?;
    }
    let mut quiet = String::new();
    for i in 0..QUIET {
        quiet.push_str(&service_yaml(&format!("quiet-{i}"), "quiet", services + i, 3, 1));
        quiet.push_str("---\n");
    }
    quiet.push_str(
        "apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: { name: default, namespace: quiet }\n\
         spec: { egress: [{ hosts: [\"./*\"] }] }\n---\n\
         apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: { name: quiet-client, namespace: quiet }\n\
         spec: { address: 127.0.0.2, labels: { app: quiet-client }, serviceAccount: quiet-client }\n---\n\
         apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: { name: client, namespace: shop }\n\
         spec: { address: 127.0.0.1, labels: { app: client }, serviceAccount: client }\n",
    );
    write(dir, "clients.yaml", &quiet)
}

struct Process {
    child: Child,
}

impl Process {
    fn pid(&self) -> u32 {
        self.child.id()
    }
    fn rss_mib(&self) -> anyhow::Result<(f64, f64)> {
        Ok((
            status_kib(self.pid(), "VmRSS:")? as f64 / 1024.0,
            status_kib(self.pid(), "VmHWM:")? as f64 / 1024.0,
        ))
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct ControlPlane {
    process: Process,
    xds: SocketAddr,
    monitoring: SocketAddr,
    ca_dir: PathBuf,
    loaded_in: Duration,
}

fn start_control(weft: &Path, dir: &Path, ca_dir: &Path) -> anyhow::Result<ControlPlane> {
    let (xds, tls, monitoring) = (free_addr()?, free_addr()?, free_addr()?);
    let started = Instant::now();
    let child = Command::new(weft)
        .arg("control")
        .arg("--config-dir")
        .arg(dir)
        .arg("--ca-dir")
        .arg(ca_dir)
        .args(["--listen", &xds.to_string(), "--tls-listen", &tls.to_string()])
        .args(["--monitoring-listen", &monitoring.to_string()])
        .env("WEFT_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {} control", weft.display()))?;
    let process = Process { child };
    let deadline = started + Duration::from_secs(300);
    while std::net::TcpStream::connect(xds).is_err() {
        if Instant::now() > deadline {
            bail!("weft control did not open its xDS port within 300 s");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(ControlPlane {
        process,
        xds,
        monitoring,
        ca_dir: ca_dir.to_owned(),
        loaded_in: started.elapsed(),
    })
}

struct Proxy {
    process: Process,
    admin: SocketAddr,
    ready_in: Duration,
    clusters: usize,
}

fn start_proxy(
    weft: &Path,
    dir: &Path,
    cp: &ControlPlane,
    (namespace, workload): (&str, &str),
    rt: &tokio::runtime::Runtime,
) -> anyhow::Result<Proxy> {
    let token = Command::new(weft)
        .args([
            "control", "token", "--ns", namespace, "--sa", workload, "--ca-dir",
        ])
        .arg(&cp.ca_dir)
        .output()?;
    if !token.status.success() {
        bail!("weft control token: {}", String::from_utf8_lossy(&token.stderr));
    }
    let token = String::from_utf8(token.stdout)?.trim().to_owned();
    let admin = free_addr()?;
    let config = dir.join(format!("{workload}.yaml"));
    std::fs::write(
        &config,
        format!(
            "node: {{ workload: {workload}, namespace: {namespace}, service_account: {workload} }}\n\
             identity: {{ ca_address: \"http://{xds}\", token: \"{token}\" }}\n\
             xds: {{ address: \"http://{xds}\", initial_fetch_timeout: 120s }}\n\
             admin: {{ address: {admin} }}\nreadiness: {{ address: {} }}\nstatus: {{ address: {} }}\n\
             outbound: {{ address: {} }}\ninbound: {{ address: {} }}\naccess_log: {{ path: off }}\n",
            free_addr()?,
            free_addr()?,
            free_addr()?,
            free_addr()?,
            xds = cp.xds,
        ),
    )?;
    let started = Instant::now();
    let child = Command::new(weft)
        .args(["proxy", "--concurrency", "1", "--config"])
        .arg(&config)
        .env("WEFT_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {} proxy", weft.display()))?;
    let process = Process { child };
    let ready_in = rt.block_on(async {
        let deadline = started + Duration::from_secs(300);
        loop {
            if let Ok(text) = get(admin, "/ready").await
                && text.starts_with("HTTP/1.1 200")
            {
                return Ok(started.elapsed());
            }
            if Instant::now() > deadline {
                bail!("the {namespace}/{workload} proxy was not ready within 300 s");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })?;
    let clusters = rt.block_on(outbound_clusters(admin))?;
    Ok(Proxy {
        process,
        admin,
        ready_in,
        clusters,
    })
}

async fn outbound_clusters(admin: SocketAddr) -> anyhow::Result<usize> {
    let text = get(admin, "/clusters").await?;
    let clusters: std::collections::BTreeSet<&str> = text
        .lines()
        .filter_map(|l| l.split("::").next())
        .filter(|name| name.starts_with("outbound|"))
        .collect();
    Ok(clusters.len())
}

/// Per proxy workload: per type, (sent version, nonce, acked version).
type Sync = std::collections::BTreeMap<String, std::collections::BTreeMap<String, (String, String, String)>>;

async fn syncz(monitoring: SocketAddr) -> anyhow::Result<Sync> {
    let text = get(monitoring, "/debug/syncz").await?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or_default();
    let report: serde_json::Value = serde_json::from_str(body).context("syncz is not JSON")?;
    let mut out = Sync::new();
    for proxy in report.as_array().context("syncz is not a list")? {
        let workload = proxy["workload"].as_str().unwrap_or_default().to_owned();
        let types = proxy["types"].as_object().context("syncz types")?;
        let entry = out.entry(workload).or_default();
        for (ty, state) in types {
            let field = |k: &str| state[k].as_str().unwrap_or_default().to_owned();
            entry.insert(ty.clone(), (field("sent"), field("nonce"), field("acked")));
        }
    }
    Ok(out)
}

/// Time from calling `edit` to the `workload` proxy ACKing a new version of `ty`.
fn applied_after(
    rt: &tokio::runtime::Runtime,
    cp: &ControlPlane,
    (workload, ty): (&str, &str),
    edit: impl FnOnce() -> anyhow::Result<()>,
) -> anyhow::Result<Duration> {
    rt.block_on(async {
        let before = syncz(cp.monitoring).await?;
        let old = before
            .get(workload)
            .and_then(|t| t.get(ty))
            .cloned()
            .unwrap_or_default();
        let started = Instant::now();
        edit()?;
        loop {
            let now = syncz(cp.monitoring).await?;
            if let Some((sent, _, acked)) = now.get(workload).and_then(|t| t.get(ty))
                && *sent != old.0
                && acked == sent
            {
                return Ok(started.elapsed());
            }
            if started.elapsed() > Duration::from_secs(300) {
                bail!("the {workload} proxy never applied the {ty} change");
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

pub(crate) fn run(weft: &Path, sizes: &[usize], rt: &tokio::runtime::Runtime) -> anyhow::Result<()> {
    let root = std::env::temp_dir().join(format!("weft-bench-scale-{}", std::process::id()));
    println!(
        "| services / endpoints | weft control load | weft control RSS (peak) | whole-mesh proxy ready | its RSS (peak) | VirtualService edit applied | endpoint change applied | scoped proxy (10 services) RSS | scoped proxy sent anything for the edits |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for &services in sizes {
        let dir = root.join(services.to_string());
        let mesh = dir.join("mesh");
        generate(&mesh, services)?;
        let cp = start_control(weft, &mesh, &dir.join("ca"))?;
        let whole = start_proxy(weft, &dir, &cp, ("shop", "client"), rt)?;
        let scoped = start_proxy(weft, &dir, &cp, ("quiet", "quiet-client"), rt)?;
        let scoped_before = rt.block_on(syncz(cp.monitoring))?.remove("quiet-client");

        let mut routes = Vec::new();
        let mut endpoints = Vec::new();
        for edit in 0..EDITS {
            let i = (edit * 7919) % services;
            let (name, namespace) = name_of(i);
            let file = format!("{name}.yaml");
            routes.push(applied_after(rt, &cp, ("client", "rds"), || {
                write(&mesh, &file, &service_yaml(&name, &namespace, i, 4 + edit, 1))
            })?);
            endpoints.push(applied_after(rt, &cp, ("client", "eds"), || {
                write(
                    &mesh,
                    &file,
                    &service_yaml(&name, &namespace, i, 4 + edit, 2 + edit as u8),
                )
            })?);
        }
        let scoped_after = rt.block_on(syncz(cp.monitoring))?.remove("quiet-client");
        let (cp_rss, cp_peak) = cp.process.rss_mib()?;
        let (whole_rss, whole_peak) = whole.process.rss_mib()?;
        let (scoped_rss, _) = scoped.process.rss_mib()?;
        let clusters_now = rt.block_on(outbound_clusters(whole.admin))?;
        if clusters_now != whole.clusters {
            bail!(
                "the whole-mesh proxy had {} clusters when ready and {clusters_now} after the edits",
                whole.clusters
            );
        }
        println!(
            "| {services} / {} | {} | {cp_rss:.0} MiB ({cp_peak:.0}) | {} ({} clusters) | {whole_rss:.1} MiB ({whole_peak:.1}) | {} | {} | {scoped_rss:.1} MiB ({} clusters, ready in {}) | {} |",
            services * 2,
            ms(cp.loaded_in),
            ms(whole.ready_in),
            whole.clusters,
            ms(median(routes)),
            ms(median(endpoints)),
            scoped.clusters,
            ms(scoped.ready_in),
            if scoped_before == scoped_after {
                "no"
            } else {
                "yes"
            },
        );
        drop(scoped);
        drop(whole);
        drop(cp);
        let _ = std::fs::remove_dir_all(&dir);
    }
    let _ = std::fs::remove_dir_all(&root);
    Ok(())
}
