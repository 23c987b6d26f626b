//! What every connection reads: the bootstrap, the configuration snapshot in force, the forwarder, the
//! workload certificate, drain signals, and the labels a hop's metrics carry.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use weft_telemetry::access_log::{AccessLogSet, AccessLogWriters, AccessLogs};
use weft_telemetry::traces::{ListenerTracing, Tracing, TracingSettings};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use weft_http::Forwarder;
use weft_model::defaults::{DEFAULT_CONNECT_TIMEOUT, DEFAULT_UPSTREAM_IDLE_TIMEOUT};
use weft_model::{Bootstrap, Mesh};
use weft_telemetry::{ConnectionSecurity, Label, Metrics, Peers, Reporter, WorkloadLabels};
use weft_transport::{Accepted, Binder, DialSettings, Direct};

use crate::destination::{Destination, LiveRoutes, TargetKey};

/// What every connection reads. The configuration snapshot is read once per connection.
pub(crate) struct Inputs {
    pub(crate) bootstrap: Bootstrap,
    pub(crate) mesh: watch::Receiver<Arc<Mesh>>,
    pub(crate) binder: Arc<dyn Binder>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) forwarder: Forwarder,
    /// Cancelled when draining starts: stop accepting, finish in-flight requests, close gracefully.
    pub(crate) drain: CancellationToken,
    /// Cancelled when the drain timeout ends: whatever is still open is closed.
    pub(crate) force_close: CancellationToken,
    /// Ports of the transparent listeners: a connection redirected to one of them is a loop.
    pub(crate) transparent_ports: Vec<u16>,
    /// The TLS material of the current workload certificate (`None` before the first, or without an
    /// identity).
    pub(crate) tls: watch::Receiver<Option<weft_identity::tls::TlsMaterial>>,
    /// Connections that began silent and may still be forwarded as opaque TCP.
    pub(crate) silent: crate::detect::SilentBudget,
    /// The overload manager: the global connection limit and memory pressure.
    pub(crate) overload: weft_transport::Overload,
    pub(crate) access_logs: Arc<AccessLogWriters>,
    /// This workload's side of its metrics' labels, made once.
    pub(crate) own_labels: WorkloadLabels,
    /// Spans for HTTP requests, by the proxy's own settings; `None`: no tracing.
    pub(crate) tracing: Option<Arc<Tracing>>,
    /// Tracers of listeners that have their own collector (from a control plane), by settings.
    pub(crate) listener_tracers: std::sync::Mutex<Vec<(Arc<TracingSettings>, Arc<Tracing>)>>,
    /// An access log could not be opened (warned about once).
    pub(crate) access_log_failed: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for Inputs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inputs")
            .field("node", &self.bootstrap.node.id)
            .finish_non_exhaustive()
    }
}

impl Inputs {
    pub(crate) fn mesh(&self) -> Arc<Mesh> {
        self.mesh.borrow().clone()
    }

    /// The tracer of a connection's requests: the listener's own, none, or the proxy's.
    pub(crate) fn tracer(&self, listener: &ListenerTracing) -> Option<Arc<Tracing>> {
        let settings = match listener {
            ListenerTracing::Proxy => return self.tracing.clone(),
            ListenerTracing::Off => return None,
            ListenerTracing::Own(settings) => settings,
        };
        let mut tracers = self.listener_tracers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, tracer)) = tracers.iter().find(|(s, _)| s == settings) {
            return Some(tracer.clone());
        }
        let mut named = (**settings).clone();
        if named.service_name.is_empty() {
            named.service_name = format!(
                "{}.{}",
                self.bootstrap.node.workload, self.bootstrap.node.namespace
            );
        }
        match Tracing::start(&named, &self.metrics, Vec::new()) {
            Ok(tracer) => {
                let tracer = Arc::new(tracer);
                // Configurations come and go; a few distinct collectors at most are kept.
                if tracers.len() >= 8 {
                    tracers.remove(0);
                }
                tracers.push((settings.clone(), tracer.clone()));
                Some(tracer)
            }
            Err(err) => {
                tracing::warn!(error = %err, "a listener's tracing cannot be set up; its requests are not traced");
                None
            }
        }
    }

    /// Where a connection's requests (or the connection itself) are logged: the listener's access logs,
    /// else the proxy's own.
    pub(crate) fn access_log(&self, listener: &Arc<AccessLogSet>) -> Option<Arc<AccessLogs>> {
        let set = match listener.is_empty() {
            true => &self.bootstrap.access_log,
            false => listener,
        };
        match self.access_logs.open(set) {
            Ok(logs) => logs.map(Arc::new),
            Err(err) => {
                if !self
                    .access_log_failed
                    .swap(true, std::sync::atomic::Ordering::Relaxed)
                {
                    tracing::warn!(error = %err, "an access log from the configuration cannot be written; its connections are not logged");
                }
                None
            }
        }
    }

    /// A receiver of configuration snapshots, for what must follow changes.
    pub(crate) fn mesh_changes(&self) -> watch::Receiver<Arc<Mesh>> {
        self.mesh.clone()
    }

    /// Where a redirected connection was going, or `None` (logged) when that is unknown or is this proxy
    /// itself: forwarding a connection to our own listener would loop forever.
    pub(crate) fn original_dst(&self, conn: &Accepted) -> Option<SocketAddr> {
        let dst = match self.binder.original_dst(&conn.stream) {
            Ok(dst) => dst,
            Err(err) => {
                tracing::warn!(peer = %conn.peer, error = %err, "no original destination; was this connection redirected by iptables?");
                return None;
            }
        };
        let is_self = self.transparent_ports.contains(&dst.port())
            && (dst.ip() == conn.local.ip() || dst.ip().is_loopback() || dst.ip().is_unspecified());
        if is_self {
            tracing::warn!(orig_dst = %dst, peer = %conn.peer, "refusing a connection addressed to the proxy itself (redirect loop)");
            return None;
        }
        Some(dst)
    }

    /// The routes for `key`, as of each request.
    pub(crate) fn live_routes(&self, key: TargetKey) -> Arc<dyn weft_http::RouteSource> {
        Arc::new(LiveRoutes {
            mesh: self.mesh.clone(),
            key,
        })
    }

    /// Straight to the address the client was going to (egress passthrough).
    pub(crate) fn passthrough(&self, addr: SocketAddr) -> Destination {
        let settings = DialSettings {
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            idle_timeout: DEFAULT_UPSTREAM_IDLE_TIMEOUT,
            tls: None,
            source: None,
        };
        Destination::Direct(Direct { addr, settings })
    }

    /// To the app beside us, from `source` when given.
    pub(crate) fn app(
        &self,
        addr: SocketAddr,
        idle_timeout: Duration,
        source: Option<IpAddr>,
    ) -> Destination {
        Destination::Direct(Direct {
            addr,
            settings: DialSettings {
                connect_timeout: DEFAULT_CONNECT_TIMEOUT,
                idle_timeout,
                tls: None,
                source,
            },
        })
    }

    /// Labels for the server side of a hop; the caller is unknown until mutual TLS names it.
    pub(crate) fn destination_peers(&self, destination_service: Label) -> Peers {
        Peers::new(
            Reporter::destination,
            &WorkloadLabels::unknown(),
            &self.own_labels,
            destination_service,
            ConnectionSecurity::none,
        )
    }

    /// Labels for the client side of a hop.
    pub(crate) fn source_peers(&self, destination_service: Label) -> Peers {
        let mut me = self.own_labels.clone();
        // Istio's client side reports its principal `unknown` and the security `unknown`: it cannot
        // see how the server authenticated it.
        me.principal = Label::unknown();
        Peers::new(
            Reporter::source,
            &me,
            &WorkloadLabels::unknown(),
            destination_service,
            ConnectionSecurity::unknown,
        )
    }
}
