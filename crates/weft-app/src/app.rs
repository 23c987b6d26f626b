//! Building and running the proxy: bind, accept, drain.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use weft_admin::{AdminState, Readiness};
use weft_http::{Forwarder, Pools};
use weft_model::{Bootstrap, Mesh, XdsSource};
use weft_telemetry::{LogControl, Metrics, XdsLabels};
use weft_transport::{Accepted, Binder};

use crate::admin::{INBOUND, ListenerStops};
use crate::forward::Stage;
use crate::inputs::Inputs;
use crate::{inbound, outbound};

/// After an accept error such as running out of file descriptors, wait this long before accepting again
/// instead of spinning.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(50);

/// Readiness steps: every listener bound, and (with a control plane) the first complete configuration.
const LISTENERS: &str = "listeners";
const CONFIG: &str = "xds config";
const CERTIFICATE: &str = "certificate";

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("identity: {0}")]
    Identity(String),
    #[error(transparent)]
    AccessLog(#[from] weft_telemetry::access_log::SinkError),
    #[error(transparent)]
    Tracing(#[from] weft_telemetry::traces::TracingError),
    #[error("cannot bind the {what} listener to {addr}: {source}")]
    Bind {
        what: String,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Builds proxies.
#[derive(Debug)]
pub struct App;

impl App {
    /// Binds every listener (failing fast if one cannot be bound), starts serving, and reports ready.
    pub async fn build(
        bootstrap: Bootstrap,
        mesh: Mesh,
        binder: Arc<dyn Binder>,
        log: LogControl,
    ) -> Result<Running, AppError> {
        let bind = |what: &str, addr: SocketAddr| {
            binder.bind(addr).map_err(|source| AppError::Bind {
                what: what.to_owned(),
                addr,
                source,
            })
        };
        let outbound = mesh
            .outbound
            .as_ref()
            .map(|o| bind("outbound", o.address))
            .transpose()?;
        let inbound = mesh
            .inbound
            .as_ref()
            .map(|i| bind("inbound", i.address))
            .transpose()?;
        let mut explicit = Vec::new();
        for l in &mesh.listeners {
            explicit.push((l.clone(), bind(&format!("\"{}\"", l.name), l.address)?));
        }
        let admin = bind("admin", bootstrap.admin_address)?;
        let readiness_listener = bind("readiness", bootstrap.readiness_address)?;
        let status_listener = bootstrap
            .status
            .as_ref()
            .map(|s| bind("status", s.address))
            .transpose()?;

        let local = |l: &TcpListener| l.local_addr().expect("a bound listener has an address");
        let addresses = Addresses {
            admin: local(&admin),
            readiness: local(&readiness_listener),
            status: status_listener.as_ref().map(local),
            outbound: outbound.as_ref().map(local),
            inbound: inbound.as_ref().map(local),
            listeners: explicit
                .iter()
                .map(|(l, listener)| (l.name.clone(), local(listener)))
                .collect(),
        };

        let metrics = Metrics::new();
        let access_logs = weft_telemetry::access_log::AccessLogWriters::new(&metrics);
        // The proxy's own log is opened now, so that a path it cannot write stops it at start.
        access_logs.open(&bootstrap.access_log)?;
        let tracing = match &bootstrap.tracing {
            Some(settings) => Some(Arc::new(weft_telemetry::traces::Tracing::start(
                settings,
                &metrics,
                vec![
                    opentelemetry::KeyValue::new("node_id", bootstrap.node.id.clone()),
                    opentelemetry::KeyValue::new("istio.canonical_service", bootstrap.node.workload.clone()),
                    opentelemetry::KeyValue::new("istio.namespace", bootstrap.node.namespace.clone()),
                ],
            )?)),
            None => None,
        };
        let mut steps = vec![LISTENERS];
        if bootstrap.xds.is_some() {
            steps.push(CONFIG);
        }
        if bootstrap.identity.is_some() {
            steps.push(CERTIFICATE);
        }
        let readiness = Readiness::new(&steps);
        let shutdown = CancellationToken::new();
        let admin_stop = CancellationToken::new();
        let tls = match &bootstrap.identity {
            Some(source) => start_identity(source, &readiness, &metrics, admin_stop.clone())?,
            None => watch::channel(None).1,
        };
        let xds_base = bootstrap.xds.as_ref().map(|_| mesh.clone());
        let forwarder = Forwarder::new(
            Pools::new(tls.clone()),
            metrics.clone(),
            &own_workload(&bootstrap),
        );
        forwarder.clusters().apply(mesh.clusters.values());
        let (config, mesh_rx) = watch::channel(Arc::new(mesh));
        let config = Arc::new(Publisher {
            mesh: config,
            clusters: forwarder.clusters().clone(),
        });
        let inputs = Arc::new(Inputs {
            bootstrap: bootstrap.clone(),
            mesh: mesh_rx.clone(),
            binder,
            metrics: metrics.clone(),
            forwarder,
            drain: CancellationToken::new(),
            force_close: CancellationToken::new(),
            tls: tls.clone(),
            silent: Default::default(),
            overload: overload(&bootstrap.overload),
            access_logs,
            own_labels: own_labels(&bootstrap),
            access_log_failed: Default::default(),
            tracing,
            listener_tracers: Default::default(),
            transparent_ports: addresses
                .outbound
                .iter()
                .chain(&addresses.inbound)
                .map(|a| a.port())
                .collect(),
        });

        tokio::spawn(inputs.overload.clone().watch_memory(admin_stop.clone()));
        let mut pressure = inputs.overload.subscribe();
        let gauge = metrics.clone();
        tokio::spawn(async move {
            while pressure.changed().await.is_ok() {
                let level = *pressure.borrow_and_update() as i64;
                gauge.overload_pressure.set(level);
            }
        });

        let tracker = TaskTracker::new();
        let stops = ListenerStops::new(&inputs.drain);
        let accepting = |inbound: bool| Accepting {
            inputs: inputs.clone(),
            tracker: tracker.clone(),
            stop: if inbound { &stops.inbound } else { &stops.others }.clone(),
        };
        if let Some(listener) = outbound {
            tokio::spawn(accept_loop(listener, accepting(false), outbound::transparent));
        }
        if let Some(listener) = inbound {
            tokio::spawn(accept_loop(listener, accepting(true), inbound::transparent));
        }
        for (spec, listener) in explicit {
            let serve = move |inputs, conn| outbound::explicit(inputs, spec.clone(), conn);
            tokio::spawn(accept_loop(listener, accepting(false), serve));
        }

        let xds_status = match (&bootstrap.xds, xds_base) {
            (Some(source), Some(base)) => Some(start_xds(
                &bootstrap,
                source,
                base,
                &config,
                &readiness,
                &metrics,
                admin_stop.clone(),
            )),
            _ => None,
        };
        let views = crate::admin::ProxyViews {
            bootstrap: bootstrap.clone(),
            admin: addresses.admin,
            listeners: addresses.bound_listeners(),
            stops: stops.clone(),
            mesh: mesh_rx.clone(),
            xds: xds_status,
            tls,
            clusters: inputs.forwarder.clusters().clone(),
            metrics: metrics.clone(),
            started: std::time::SystemTime::now(),
        };
        let admin_state = AdminState {
            metrics: metrics.clone(),
            readiness: readiness.clone(),
            log,
            views: Box::new(views),
            taps: inputs.forwarder.taps().clone(),
            shutdown: shutdown.clone(),
        };
        tokio::spawn(weft_admin::serve_admin(
            admin,
            Arc::new(admin_state),
            admin_stop.clone(),
        ));
        tokio::spawn(weft_admin::serve_readiness(
            readiness_listener,
            readiness.clone(),
            admin_stop.clone(),
        ));

        if let (Some(listener), Some(settings)) = (status_listener, bootstrap.status.clone()) {
            let status = weft_admin::Status {
                readiness: readiness.clone(),
                metrics: metrics.clone(),
                settings,
            };
            tokio::spawn(weft_admin::serve_status(
                listener,
                Arc::new(status),
                admin_stop.clone(),
            ));
        }
        readiness.mark_done(LISTENERS);
        tracing::info!(
            admin = %addresses.admin,
            outbound = ?addresses.outbound,
            inbound = ?addresses.inbound,
            listeners = ?addresses.listeners,
            "proxy serving",
        );

        let done = tokio::spawn(lifecycle(
            inputs,
            tracker,
            readiness,
            shutdown.clone(),
            admin_stop,
            bootstrap.drain_timeout,
        ));
        Ok(Running {
            addresses,
            shutdown,
            config,
            done,
        })
    }
}

#[derive(Debug, Clone)]
struct Addresses {
    admin: SocketAddr,
    readiness: SocketAddr,
    status: Option<SocketAddr>,
    outbound: Option<SocketAddr>,
    inbound: Option<SocketAddr>,
    listeners: Vec<(String, SocketAddr)>,
}

impl Addresses {
    /// Every traffic listener this proxy bound, by the name the config dump gives it.
    fn bound_listeners(&self) -> Vec<(String, SocketAddr)> {
        let mut bound = Vec::new();
        if let Some(address) = self.outbound {
            bound.push(("outbound".to_owned(), address));
        }
        if let Some(address) = self.inbound {
            bound.push((INBOUND.to_owned(), address));
        }
        bound.extend(self.listeners.iter().cloned());
        bound
    }
}

/// A serving proxy.
#[derive(Debug)]
pub struct Running {
    addresses: Addresses,
    shutdown: CancellationToken,
    config: Arc<Publisher>,
    done: JoinHandle<()>,
}

impl Running {
    pub fn admin_address(&self) -> SocketAddr {
        self.addresses.admin
    }

    pub fn readiness_address(&self) -> SocketAddr {
        self.addresses.readiness
    }

    /// The status port (app probes, merged metrics), when it is served.
    pub fn status_address(&self) -> Option<SocketAddr> {
        self.addresses.status
    }

    pub fn outbound_address(&self) -> Option<SocketAddr> {
        self.addresses.outbound
    }

    pub fn inbound_address(&self) -> Option<SocketAddr> {
        self.addresses.inbound
    }

    /// The bound address of an explicit listener, by name.
    pub fn listener_address(&self, name: &str) -> Option<SocketAddr> {
        self.addresses
            .listeners
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, a)| *a)
    }

    /// Replaces the routing configuration. New connections use it; open ones finish on the snapshot they
    /// started with. Listener addresses are fixed at build time.
    pub fn update(&self, mesh: Mesh) {
        self.config.publish(mesh);
    }

    /// A token that starts the drain when cancelled (signal handlers hold one).
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Starts draining: stop accepting, let in-flight requests finish within the drain timeout.
    pub fn shutdown(&self) {
        self.shutdown.cancel();
    }

    /// Waits until the proxy has drained and stopped (after [`Running::shutdown`], a signal, or
    /// `POST /quitquitquit`).
    pub async fn wait(self) {
        if let Err(err) = self.done.await {
            tracing::error!(error = %err, "proxy lifecycle task failed");
        }
    }
}

/// Starts where certificates come from (the CA's credential store, or the watched files); every new
/// certificate becomes new TLS material, published for the next handshakes. Readiness waits for the
/// first.
fn start_identity(
    source: &weft_model::IdentitySource,
    readiness: &Readiness,
    metrics: &Arc<Metrics>,
    stop: CancellationToken,
) -> Result<watch::Receiver<Option<weft_identity::tls::TlsMaterial>>, AppError> {
    let id: weft_identity::SpiffeId = source
        .id
        .parse()
        .map_err(|e: weft_identity::SpiffeIdError| AppError::Identity(e.to_string()))?;
    let (renewed, failed) = (metrics.clone(), metrics.clone());
    let events = weft_identity::StoreEvents {
        renewed: Box::new(move |c| {
            renewed.certificate_renewals.inc();
            let expiry = c
                .not_after
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs();
            renewed
                .certificate_expiry
                .set(i64::try_from(expiry).unwrap_or(i64::MAX));
        }),
        failed: Box::new(move |_| {
            failed.certificate_failures.inc();
        }),
    };
    let material = match &source.provider {
        weft_model::CertificateProvider::Ca {
            ca_address,
            ca_root_pem,
            token,
            validity,
        } => {
            let ca = weft_identity::CaClient::with_root(ca_address, token.clone(), ca_root_pem.as_deref())
                .map_err(|e| AppError::Identity(e.to_string()))?;
            let config = weft_identity::StoreConfig {
                id,
                validity: *validity,
            };
            let store = weft_identity::CredentialStore::start(config, ca, events, stop.clone());
            material_of(store, stop.clone())
        }
        weft_model::CertificateProvider::Files(files) => {
            weft_identity::files::watch_files(id, files.clone(), events, stop.clone())
        }
    };
    let mut first = material.clone();
    let readiness = readiness.clone();
    tokio::spawn(async move {
        tokio::select! {
            arrived = first.wait_for(Option::is_some) => if arrived.is_ok() { readiness.mark_done(CERTIFICATE) },
            () = stop.cancelled() => {}
        }
    });
    Ok(material)
}

/// The TLS material of each certificate the store gets from the CA.
fn material_of(
    store: weft_identity::CredentialStore,
    stop: CancellationToken,
) -> watch::Receiver<Option<weft_identity::tls::TlsMaterial>> {
    let (tx, rx) = watch::channel(None);
    tokio::spawn(async move {
        let mut credentials = store.watch();
        loop {
            let current = credentials.borrow_and_update().clone();
            if let Some(c) = current {
                match weft_identity::tls::TlsMaterial::new(c, &[]) {
                    Ok(material) => {
                        tx.send_replace(Some(material));
                    }
                    Err(err) => {
                        tracing::error!(error = %err, "cannot use the new certificate; keeping the previous one")
                    }
                }
            }
            tokio::select! {
                changed = credentials.changed() => if changed.is_err() { return },
                () = stop.cancelled() => return,
            }
        }
    });
    rx
}

/// Starts the ADS client; its updates replace the configuration snapshot.
fn start_xds(
    bootstrap: &Bootstrap,
    source: &XdsSource,
    base: Mesh,
    config: &Arc<Publisher>,
    readiness: &Readiness,
    metrics: &Arc<Metrics>,
    stop: CancellationToken,
) -> Arc<std::sync::Mutex<weft_xds::XdsStatus>> {
    let xds = weft_xds::XdsConfig {
        address: source.address.clone(),
        root_pem: source.root_pem.clone(),
        node: bootstrap.node.clone(),
        initial_fetch_timeout: source.initial_fetch_timeout,
        max_message_bytes: source.max_message_bytes,
    };
    let (config, readiness, waiting) = (config.clone(), readiness.clone(), readiness.clone());
    let (counted, connected) = (metrics.clone(), metrics.clone());
    let hooks = weft_xds::Hooks {
        update: Box::new(move |mesh| {
            config.publish(mesh);
        }),
        ready: Box::new(move || readiness.mark_done(CONFIG)),
        waiting: Box::new(move |what| waiting.set_detail(CONFIG, what)),
        counted: Box::new(move |ty, outcome| {
            let labels = XdsLabels {
                resource_type: ty.map_or("unknown", weft_xds::ResourceType::name),
                result: outcome.name(),
            };
            counted.xds_updates.get_or_create(&labels).inc();
        }),
        connected: Box::new(move |up| {
            connected.xds_connected.set(i64::from(up));
        }),
    };
    weft_xds::spawn(xds, base, hooks, stop)
}

/// The overload manager's limits: the file's, else half the open-file limit and the container's memory
/// limit.
fn overload(settings: &weft_model::OverloadSettings) -> weft_transport::Overload {
    let limits = weft_transport::OverloadLimits {
        max_active_downstream_connections: settings
            .max_active_downstream_connections
            .unwrap_or_else(weft_transport::default_max_connections),
        max_memory_bytes: match settings.max_memory_bytes {
            Some(0) => None,
            Some(bytes) => Some(bytes),
            None => weft_transport::cgroup_memory_limit(),
        },
    };
    tracing::info!(
        max_active_downstream_connections = limits.max_active_downstream_connections,
        max_memory_mib = limits.max_memory_bytes.map(|b| b >> 20),
        "overload manager limits"
    );
    weft_transport::Overload::new(limits)
}

/// What an accept loop serves with, and when it stops.
struct Accepting {
    inputs: Arc<Inputs>,
    tracker: TaskTracker,
    /// Cancelled by a drain or by admin `/drain_listeners`.
    stop: CancellationToken,
}

async fn accept_loop<F, Fut>(listener: TcpListener, accepting: Accepting, serve: F)
where
    F: Fn(Arc<Inputs>, Accepted) -> Fut,
    Fut: Future<Output = Option<Stage>> + Send + 'static,
{
    let Accepting {
        inputs,
        tracker,
        stop,
    } = accepting;
    loop {
        let accepted = tokio::select! {
            accepted = weft_transport::accept(&listener) => accepted,
            () = stop.cancelled() => return, // dropping the listener refuses new connections
        };
        match accepted {
            Ok(conn) => {
                let permit = match inputs.overload.admit(conn.peer.ip()) {
                    Ok(permit) => permit,
                    Err(refusal) => {
                        // Closed at once: the client sees a reset or EOF and retries elsewhere.
                        tracing::debug!(peer = %conn.peer, reason = refusal.as_str(), "overloaded: refusing a connection");
                        let labels = weft_telemetry::OverloadLabels {
                            reason: refusal.as_str(),
                        };
                        inputs.metrics.overload_refused.get_or_create(&labels).inc();
                        continue;
                    }
                };
                // Both steps boxed: the task stays small, and the first step's state is freed before
                // the connection's lasting stage (an idle keep-alive connection) begins.
                let first = Box::pin(serve(inputs.clone(), conn));
                let inputs = inputs.clone();
                tracker.spawn(async move {
                    let _permit = permit;
                    inputs.metrics.downstream_connections_active.inc();
                    let connection = async move {
                        let stage = first.await;
                        if let Some(stage) = stage {
                            stage.await;
                        }
                    };
                    tokio::select! {
                        () = connection => {}
                        () = inputs.force_close.cancelled() => {}
                    }
                    inputs.metrics.downstream_connections_active.dec();
                });
            }
            Err(err) => {
                tracing::warn!(error = %err, "accept failed");
                tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
            }
        }
    }
}

async fn lifecycle(
    inputs: Arc<Inputs>,
    tracker: TaskTracker,
    readiness: Readiness,
    shutdown: CancellationToken,
    admin_stop: CancellationToken,
    drain_timeout: Duration,
) {
    shutdown.cancelled().await;
    tracing::info!(?drain_timeout, "draining");
    readiness.set_draining();
    inputs.drain.cancel();
    tracker.close();
    if tokio::time::timeout(drain_timeout, tracker.wait()).await.is_err() {
        tracing::warn!(
            open = tracker.len(),
            "drain timeout reached; closing the remaining connections"
        );
        inputs.force_close.cancel();
        tracker.wait().await;
    }
    admin_stop.cancel();
    tracing::info!("drained");
}

/// Where a new configuration is published. The cluster states adopt it first, so that no request
/// finds a cluster, or an endpoint, before its running state exists.
#[derive(Debug)]
struct Publisher {
    mesh: watch::Sender<Arc<Mesh>>,
    clusters: Arc<weft_balance::ClusterStates>,
}

impl Publisher {
    fn publish(&self, mesh: Mesh) {
        self.clusters.apply(mesh.clusters.values());
        self.mesh.send_replace(Arc::new(mesh));
    }
}

/// This workload as the metadata exchange tells its peers.
fn own_workload(bootstrap: &Bootstrap) -> weft_telemetry::peer_metadata::OwnWorkload {
    let node = &bootstrap.node;
    weft_telemetry::peer_metadata::OwnWorkload {
        name: node.pod.clone(),
        namespace: node.namespace.clone(),
        workload: node.workload.clone(),
        service_account: node.service_account.clone(),
        cluster: node.cluster.clone(),
        node_id: node.id.clone(),
        app: node.app.clone(),
        version: node.version.clone(),
        canonical_service: node.canonical_service.clone(),
        canonical_revision: node.canonical_revision.clone(),
    }
}

/// This workload's side of its metrics' labels.
fn own_labels(bootstrap: &Bootstrap) -> weft_telemetry::WorkloadLabels {
    let node = &bootstrap.node;
    let label = |s: &str| weft_telemetry::Label::from(s);
    weft_telemetry::WorkloadLabels {
        workload: label(&node.workload),
        namespace: label(&node.namespace),
        principal: bootstrap
            .identity
            .as_ref()
            .map_or_else(weft_telemetry::Label::unknown, |i| label(&i.id)),
        app: label(&node.app),
        version: label(&node.version),
        canonical_service: label(&node.canonical_service),
        canonical_revision: label(&node.canonical_revision),
        cluster: label(&node.cluster),
    }
}
