//! `weft control`: the reference control plane. It reads Kubernetes and Istio resources from a
//! directory ([`resources`]) or from the Kubernetes API ([`kubernetes`]), follows their changes, turns
//! them into each proxy's xDS ([`translate`]) and serves them over ADS ([`server`]).

pub mod authn;
pub mod ca;
mod index;
pub mod kubernetes;
pub mod monitoring;
mod rbac;
pub mod resources;
pub mod scope;
pub mod server;
pub mod tls;
pub mod tokens;
pub mod translate;
pub mod webhook;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::AggregatedDiscoveryServiceServer;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;
use weft_proto::istio_ca::istio_certificate_service_server::IstioCertificateServiceServer;

pub use resources::{Catalog, Problem, load_dir};
pub use server::{NackRecord, Observed};

/// Istio's name for the egress passthrough cluster.
pub const PASSTHROUGH: &str = "PassthroughCluster";
/// The plaintext xDS port (Istio's 15010, for development).
pub const XDS_PORT: u16 = 15010;
/// The largest DiscoveryRequest taken: a proxy subscribing to the endpoints of 10,000 services names
/// 30,000 load assignments (about 2 MiB), near gRPC's 4 MiB default.
const MAX_REQUEST_BYTES: usize = 64 << 20;
/// How often the directory is checked for changes: pushes follow a file change within about this long.
const WATCH_INTERVAL: Duration = Duration::from_millis(250);

/// Checks a directory as the control plane would load it: what each resource becomes, and the problems
/// (an empty list means it is all valid).
pub fn check(dir: &Path) -> (Vec<String>, Vec<Problem>) {
    let (catalog, problems) = load_dir(dir);
    (catalog.summary(), problems)
}

/// Where the mesh's resources come from.
#[derive(Clone)]
pub enum Source {
    /// A directory of YAML files, watched (local use, tests, a ConfigMap mount).
    Directory(PathBuf),
    /// The Kubernetes API: listed and watched ([`kubernetes`]).
    Kubernetes(kube::Client),
}

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Directory(dir) => write!(f, "directory {}", dir.display()),
            Self::Kubernetes(_) => f.write_str("the Kubernetes API"),
        }
    }
}

/// A running control plane.
#[derive(Debug)]
pub struct ControlPlane {
    address: SocketAddr,
    problems: Arc<Mutex<Vec<Problem>>>,
    observed: Arc<Observed>,
    shutdown: tokio::sync::oneshot::Sender<()>,
    server: JoinHandle<Result<(), tonic::transport::Error>>,
    /// What keeps the catalog current: the directory's watcher, or the API's watches.
    watchers: Vec<JoinHandle<()>>,
    ca: Arc<ca::CertificateAuthority>,
    authn: authn::Authenticator,
    catalog: watch::Receiver<Arc<Catalog>>,
    tls_servers: Vec<(tokio::sync::oneshot::Sender<()>, ServerTask)>,
    /// Other servers (the admission webhook), aborted on stop.
    tasks: Vec<JoinHandle<()>>,
}

type ServerTask = JoinHandle<Result<(), tonic::transport::Error>>;

/// Istio's default trust domain.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

impl ControlPlane {
    /// Loads `dir`, starts watching it, and serves ADS and a CA (with a root kept only in memory) on
    /// `listen`.
    pub async fn start(dir: PathBuf, listen: SocketAddr) -> std::io::Result<Self> {
        let ca = ca::CertificateAuthority::ephemeral(DEFAULT_TRUST_DOMAIN).map_err(std::io::Error::other)?;
        Self::start_with_ca(dir, listen, Arc::new(ca)).await
    }

    /// As [`ControlPlane::start`], with a given CA.
    /// A control plane outside Kubernetes: the CA authenticates callers with weft's own tokens.
    pub async fn start_with_ca(
        dir: PathBuf,
        listen: SocketAddr,
        ca: Arc<ca::CertificateAuthority>,
    ) -> std::io::Result<Self> {
        let authn = authn::Authenticator::WeftTokens(ca.tokens().clone());
        Self::start_with(Source::Directory(dir), listen, ca, authn).await
    }

    /// Serves xDS on `listen` (plaintext). The CA is served there too only with weft's own tokens: a
    /// service-account token is a credential for the API server and is sent over TLS only (15012,
    /// [`ControlPlane::serve_tls`]), as Istio does.
    /// With [`Source::Kubernetes`], returns once every kind has been listed: the first push is of the
    /// whole mesh.
    pub async fn start_with(
        source: Source,
        listen: SocketAddr,
        ca: Arc<ca::CertificateAuthority>,
        authn: authn::Authenticator,
    ) -> std::io::Result<Self> {
        let problems = Arc::new(Mutex::new(Vec::new()));
        let (catalog_rx, watchers) = match source {
            Source::Directory(dir) => {
                // Fingerprint first, then load: a file written after the load differs from the
                // fingerprint, so the watcher loads it however late its task first runs.
                let seen = fingerprint(&dir);
                let mut loader = resources::DirLoader::default();
                let (catalog, found) = loader.load(&dir);
                report(&found);
                if let Ok(mut p) = problems.lock() {
                    *p = found;
                }
                let (catalog_tx, catalog_rx) = watch::channel(Arc::new(catalog));
                let watcher = tokio::spawn(watch_dir(dir, loader, seen, catalog_tx, problems.clone()));
                (catalog_rx, vec![watcher])
            }
            Source::Kubernetes(client) => {
                let discovery = kubernetes::discover(client, problems.clone()).await;
                (discovery.catalog, discovery.tasks)
            }
        };
        // What protects workloads, and what is ignored, is worth a line at start; the rest on request.
        for line in catalog_rx.borrow().summary() {
            if line.starts_with("AuthorizationPolicy") || line.contains("ignored") {
                tracing::info!("{line}");
            } else {
                tracing::debug!("{line}");
            }
        }

        let listener = tokio::net::TcpListener::bind(listen).await?;
        let address = listener.local_addr()?;
        let observed = Arc::new(Observed::default());
        let ads = AggregatedDiscoveryServiceServer::new(server::AdsServer::new(
            catalog_rx.clone(),
            observed.clone(),
        ))
        .max_decoding_message_size(MAX_REQUEST_BYTES);
        let (shutdown, stop) = tokio::sync::oneshot::channel::<()>();
        let plaintext_ca = match &authn {
            authn::Authenticator::WeftTokens(_) => Some(IstioCertificateServiceServer::new(
                ca::CaService::new(ca.clone(), authn.clone(), observed.clone()),
            )),
            authn::Authenticator::Kubernetes(_) => None,
        };
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .http2_keepalive_interval(Some(Duration::from_secs(30)))
                .add_service(ads)
                .add_optional_service(plaintext_ca)
                .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                    let _ = stop.await;
                }),
        );
        tracing::info!(%address, ?authn, "serving xDS (ADS, State of the World) and, with weft tokens, the CA (istio.v1.auth)");
        Ok(Self {
            address,
            problems,
            observed,
            shutdown,
            server,
            watchers,
            ca,
            authn,
            catalog: catalog_rx,
            tls_servers: Vec::new(),
            tasks: Vec::new(),
        })
    }

    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Also serves xDS and the CA over TLS on `listen` (Istio's 15012), with a certificate from the
    /// control plane's own CA. Returns the bound address.
    pub async fn serve_tls(&mut self, listen: SocketAddr) -> std::io::Result<SocketAddr> {
        let listener = tokio::net::TcpListener::bind(listen).await?;
        let address = listener.local_addr()?;
        let incoming = tls::incoming(listener, &self.ca, &[b"h2"])?;
        let ads = AggregatedDiscoveryServiceServer::new(server::AdsServer::new(
            self.catalog.clone(),
            self.observed.clone(),
        ))
        .max_decoding_message_size(MAX_REQUEST_BYTES);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(ads)
                .add_service(IstioCertificateServiceServer::new(ca::CaService::new(
                    self.ca.clone(),
                    self.authn.clone(),
                    self.observed.clone(),
                )))
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = stopped.await;
                }),
        );
        self.tls_servers.push((stop, server));
        tracing::info!(%address, "serving xDS and the CA over TLS");
        Ok(address)
    }

    /// Serves the sidecar injector (a mutating admission webhook, `POST /inject`) over TLS on `listen`
    /// (Istio's 15017), injecting with `settings`.
    pub async fn serve_webhook(
        &mut self,
        listen: SocketAddr,
        settings: weft_inject::Settings,
    ) -> std::io::Result<(SocketAddr, Arc<webhook::WebhookCounts>)> {
        let listener = tokio::net::TcpListener::bind(listen).await?;
        let address = listener.local_addr()?;
        let incoming = tls::incoming(listener, &self.ca, &[b"h2", b"http/1.1"])?;
        let counts = Arc::new(webhook::WebhookCounts::default());
        self.tasks.push(tokio::spawn(webhook::serve(
            incoming,
            Arc::new(settings),
            counts.clone(),
        )));
        tracing::info!(%address, "serving the sidecar injector (admission webhook, /inject)");
        Ok((address, counts))
    }

    /// Serves the monitoring port (Istio's 15014): `/metrics` and `/debug/syncz`. Returns the bound
    /// address.
    pub async fn serve_monitoring(&mut self, listen: SocketAddr) -> std::io::Result<SocketAddr> {
        let listener = tokio::net::TcpListener::bind(listen).await?;
        let address = listener.local_addr()?;
        let observed = self.observed.clone();
        self.tasks.push(tokio::spawn(async move {
            monitoring::serve(listener, observed).await;
        }));
        tracing::info!(%address, "serving monitoring (/metrics, /debug/syncz)");
        Ok(address)
    }

    /// What the monitoring port reports.
    pub fn monitoring(&self) -> &monitoring::Monitoring {
        &self.observed.monitoring
    }

    /// The resources in force.
    pub fn catalog(&self) -> Arc<Catalog> {
        self.catalog.borrow().clone()
    }

    pub fn ca(&self) -> &Arc<ca::CertificateAuthority> {
        &self.ca
    }

    /// The problems found in the current files.
    pub fn problems(&self) -> Vec<Problem> {
        self.problems.lock().map(|p| p.clone()).unwrap_or_default()
    }

    /// NACKs received from proxies so far.
    pub fn nacks(&self) -> Vec<NackRecord> {
        self.observed.nacks.lock().map(|n| n.clone()).unwrap_or_default()
    }

    /// Responses sent to a node so far.
    pub fn pushes(&self, node_id: &str) -> u64 {
        self.observed
            .pushes
            .lock()
            .map(|p| p.get(node_id).copied().unwrap_or(0))
            .unwrap_or(0)
    }

    /// Stops serving; proxies keep their configuration and reconnect when a control plane returns.
    pub async fn stop(self) {
        let _ = self.shutdown.send(());
        for watcher in self.watchers {
            watcher.abort();
        }
        let _ = self.server.await;
        for (stop, server) in self.tls_servers {
            let _ = stop.send(());
            let _ = server.await;
        }
        for task in self.tasks {
            task.abort();
        }
    }

    /// Serves until the process is stopped.
    pub async fn wait(self) {
        let _ = self.server.await;
    }
}

fn report(problems: &[Problem]) {
    for problem in problems {
        tracing::warn!("{problem}");
    }
}

/// Polls the directory; reloads when a file appears, disappears or changes, and publishes the new
/// catalog if its content differs.
async fn watch_dir(
    dir: PathBuf,
    mut loader: resources::DirLoader,
    mut seen: Fingerprint,
    catalog: watch::Sender<Arc<Catalog>>,
    problems: Arc<Mutex<Vec<Problem>>>,
) {
    loop {
        tokio::time::sleep(WATCH_INTERVAL).await;
        let now = fingerprint(&dir);
        if now == seen {
            continue;
        }
        seen = now;
        let (mut next, found) = loader.load(&dir);
        report(&found);
        resources::keep_last_good(&catalog.borrow(), &mut next, &found);
        if let Ok(mut p) = problems.lock() {
            *p = found;
        }
        catalog.send_if_modified(|current| {
            if **current == next {
                return false;
            }
            tracing::info!("configuration changed; pushing to the proxies it affects");
            *current = Arc::new(next);
            true
        });
    }
}

type Fingerprint = Vec<(PathBuf, u64, Option<SystemTime>)>;

/// Names, sizes and modification times of the YAML files under `dir`.
fn fingerprint(dir: &Path) -> Fingerprint {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            // Hidden entries are a ConfigMap mount's versions; the visible names are symlinks into
            // the current one, so their targets' sizes and times are what changes.
            if entry.file_name().to_string_lossy().starts_with('.') {
                continue;
            }
            let path = entry.path();
            let Ok(meta) = std::fs::metadata(&path) else {
                continue;
            };
            if meta.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
                out.push((path, meta.len(), meta.modified().ok()));
            }
        }
    }
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file written right after start, before the watcher's task has run even once, is still loaded.
    /// (The watcher used to take its first fingerprint inside its task, and so missed such a file.)
    #[tokio::test]
    async fn a_file_written_just_after_start_is_loaded() {
        let dir = tempfile::tempdir().unwrap();
        let cp = ControlPlane::start(dir.path().into(), "127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        std::fs::write(
            dir.path().join("svc.yaml"),
            "apiVersion: v1\nkind: Service\nmetadata: { name: web }\nspec: { selector: { app: web }, ports: [{ port: 80 }] }\n",
        )
        .unwrap();
        let loaded = async {
            while cp.catalog().services.is_empty() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), loaded)
            .await
            .expect("the file was never loaded");
        cp.stop().await;
    }

    /// A ConfigMap mounted as the kubelet mounts it: each version in a hidden directory, `..data`
    /// pointing at the current one, each key a symlink through `..data`. Every resource is loaded
    /// once, and a new version (the kubelet swapping `..data`) is loaded.
    #[tokio::test]
    async fn a_configmap_mount_is_read_once_per_key_and_followed_when_the_kubelet_swaps_it() {
        use std::os::unix::fs::symlink;
        let dir = tempfile::tempdir().unwrap();
        let service = |name: &str| {
            format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{ name: {name} }}\nspec: {{ selector: {{ app: {name} }}, ports: [{{ port: 80 }}] }}\n"
            )
        };
        let version = |n: u32, body: &str| {
            let v = dir.path().join(format!("..2026_12_03_0{n}"));
            std::fs::create_dir(&v).unwrap();
            std::fs::write(v.join("mesh.yaml"), body).unwrap();
            v
        };
        let first = version(1, &service("web"));
        symlink(first.file_name().unwrap(), dir.path().join("..data")).unwrap();
        symlink("..data/mesh.yaml", dir.path().join("mesh.yaml")).unwrap();
        let (catalog, problems) = load_dir(dir.path());
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(catalog.services.len(), 1, "each key once");

        let cp = ControlPlane::start(dir.path().into(), "127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let second = version(2, &format!("{}---\n{}", service("web"), service("api")));
        // The kubelet's swap: a new link renamed over `..data`.
        symlink(second.file_name().unwrap(), dir.path().join("..data_tmp")).unwrap();
        std::fs::rename(dir.path().join("..data_tmp"), dir.path().join("..data")).unwrap();
        let loaded = async {
            while cp.catalog().services.len() != 2 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), loaded)
            .await
            .expect("the new version was never loaded");
        assert!(cp.problems().is_empty(), "{:?}", cp.problems());
        cp.stop().await;
    }
}
