//! weft control's own monitoring port (Istio's 15014): Prometheus metrics at `/metrics` (connected
//! proxies, pushes and NACKs by xDS type, certificates signed and refused) and `/debug/syncz`: for each
//! connected proxy and xDS type, the version sent, the version the proxy ACKed, and the NACK it sent
//! back if it refused one (what `istioctl proxy-status` shows for istiod).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::Serialize;
use tokio::net::TcpListener;

/// The xDS types weft control serves, as Istio labels them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, EncodeLabelValue, Serialize)]
#[serde(rename_all = "lowercase")]
#[allow(non_camel_case_types)]
pub enum XdsType {
    cds,
    eds,
    lds,
    rds,
    other,
}

impl XdsType {
    pub fn of(type_url: &str) -> Self {
        match type_url.rsplit('.').next() {
            Some("Cluster") => Self::cds,
            Some("ClusterLoadAssignment") => Self::eds,
            Some("Listener") => Self::lds,
            Some("RouteConfiguration") => Self::rds,
            _ => Self::other,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct TypeLabel {
    r#type: XdsType,
}

/// Why a certificate request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Refusal {
    /// No token, or one that does not prove an identity.
    unauthenticated,
    /// The identity could not be checked now (the API server's TokenReview failed).
    unavailable,
    /// The CSR asks for another identity than the caller proved.
    other_identity,
    /// The CSR itself is not acceptable.
    invalid_csr,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ReasonLabel {
    reason: Refusal,
}

/// One proxy's sync state for one type.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TypeSync {
    pub sent: String,
    pub nonce: String,
    /// The last version the proxy ACKed (empty until it has).
    pub acked: String,
    /// The proxy's reason, when it refused what was last sent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nack: Option<String>,
    /// `SYNCED` (ACKed what was sent), `STALE` (not ACKed yet) or `NACKED`.
    pub status: &'static str,
}

/// One connected proxy.
#[derive(Debug, Clone, Serialize)]
pub struct ProxySync {
    pub node: String,
    pub workload: String,
    pub namespace: String,
    pub types: BTreeMap<XdsType, TypeSync>,
}

/// What weft control counts about itself; one per control plane, shared by its servers.
pub struct Monitoring {
    registry: Registry,
    connected: Gauge,
    pushes: Family<TypeLabel, Counter>,
    rejects: Family<TypeLabel, Counter>,
    signed: Counter,
    refused: Family<ReasonLabel, Counter>,
    proxies: Mutex<BTreeMap<u64, ProxySync>>,
    next_stream: AtomicU64,
}

impl std::fmt::Debug for Monitoring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Monitoring").finish_non_exhaustive()
    }
}

impl Default for Monitoring {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("weft_control");
        let connected = Gauge::default();
        let pushes = Family::<TypeLabel, Counter>::default();
        let rejects = Family::<TypeLabel, Counter>::default();
        let signed = Counter::default();
        let refused = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "xds_connected_proxies",
            "Proxies with an open ADS stream",
            connected.clone(),
        );
        registry.register("xds_pushes", "xDS responses sent, by type", pushes.clone());
        registry.register(
            "xds_rejects",
            "xDS responses proxies refused (NACKs), by type",
            rejects.clone(),
        );
        registry.register(
            "certificates_signed",
            "Workload certificates signed",
            signed.clone(),
        );
        registry.register(
            "certificate_requests_refused",
            "Certificate requests refused, by reason",
            refused.clone(),
        );
        Self {
            registry,
            connected,
            pushes,
            rejects,
            signed,
            refused,
            proxies: Mutex::default(),
            next_stream: AtomicU64::new(1),
        }
    }
}

impl Monitoring {
    fn proxies(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, ProxySync>> {
        // A poisoned lock only means a thread panicked mid-update of a report: still a report.
        self.proxies
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A proxy's stream has told who it is; the returned number names the stream until it ends.
    pub(crate) fn connected(&self, node: &str, workload: &str, namespace: &str) -> u64 {
        let stream = self.next_stream.fetch_add(1, Ordering::Relaxed);
        self.connected.inc();
        self.proxies().insert(
            stream,
            ProxySync {
                node: node.to_owned(),
                workload: workload.to_owned(),
                namespace: namespace.to_owned(),
                types: BTreeMap::new(),
            },
        );
        stream
    }

    pub(crate) fn disconnected(&self, stream: u64) {
        if self.proxies().remove(&stream).is_some() {
            self.connected.dec();
        }
    }

    pub(crate) fn sent(&self, stream: u64, type_url: &str, version: &str, nonce: &str) {
        let ty = XdsType::of(type_url);
        self.pushes.get_or_create(&TypeLabel { r#type: ty }).inc();
        if let Some(proxy) = self.proxies().get_mut(&stream) {
            let sync = proxy.types.entry(ty).or_default();
            sync.sent = version.to_owned();
            sync.nonce = nonce.to_owned();
            sync.nack = None;
            sync.status = if sync.acked == version { "SYNCED" } else { "STALE" };
        }
    }

    /// The proxy's answer to the response `nonce`: an ACK of `version`, or a NACK for `reason`.
    pub(crate) fn answered(
        &self,
        stream: u64,
        type_url: &str,
        nonce: &str,
        version: &str,
        nack: Option<&str>,
    ) {
        let ty = XdsType::of(type_url);
        if nack.is_some() {
            self.rejects.get_or_create(&TypeLabel { r#type: ty }).inc();
        }
        let mut proxies = self.proxies();
        let Some(sync) = proxies.get_mut(&stream).and_then(|p| p.types.get_mut(&ty)) else {
            return;
        };
        if sync.nonce != nonce {
            return; // an answer to an older response
        }
        match nack {
            Some(reason) => {
                sync.nack = Some(reason.to_owned());
                sync.status = "NACKED";
            }
            None => {
                sync.acked = version.to_owned();
                sync.status = if sync.acked == sync.sent {
                    "SYNCED"
                } else {
                    "STALE"
                };
            }
        }
    }

    pub(crate) fn signed(&self) {
        self.signed.inc();
    }

    pub(crate) fn refused(&self, reason: Refusal) {
        self.refused.get_or_create(&ReasonLabel { reason }).inc();
    }

    /// Every connected proxy's sync state, oldest stream first.
    pub fn syncz(&self) -> Vec<ProxySync> {
        self.proxies().values().cloned().collect()
    }

    /// The metrics in Prometheus's text format.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}

/// Serves `/metrics` and `/debug/syncz` on `listener` until the task is aborted.
pub(crate) async fn serve(listener: TcpListener, observed: std::sync::Arc<crate::Observed>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let observed = observed.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let observed = observed.clone();
                async move { Ok::<_, Infallible>(answer(&req, &observed.monitoring)) }
            });
            let served = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
            if let Err(err) = served {
                tracing::debug!(error = %err, "monitoring connection ended");
            }
        });
    }
}

fn answer(req: &Request<Incoming>, monitoring: &Monitoring) -> Response<Full<Bytes>> {
    let respond = |status: StatusCode, content_type: &'static str, body: String| {
        let mut response = Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = status;
        response.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static(content_type),
        );
        response
    };
    if req.method() != Method::GET {
        return respond(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "use GET\n".into());
    }
    match req.uri().path() {
        "/metrics" | "/stats/prometheus" => respond(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            monitoring.encode(),
        ),
        "/debug/syncz" => match serde_json::to_string_pretty(&monitoring.syncz()) {
            Ok(json) => respond(StatusCode::OK, "application/json", json),
            Err(err) => respond(
                StatusCode::INTERNAL_SERVER_ERROR,
                "text/plain",
                format!("{err}\n"),
            ),
        },
        _ => respond(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: /metrics, /debug/syncz\n".into(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CDS: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";

    #[test]
    fn a_proxys_sync_state_follows_what_was_sent_and_what_it_answered() {
        let monitoring = Monitoring::default();
        let stream = monitoring.connected("sidecar~a", "a", "shop");
        let status = |m: &Monitoring| m.syncz()[0].types[&XdsType::cds].clone();

        monitoring.sent(stream, CDS, "v1", "1");
        assert_eq!(status(&monitoring).status, "STALE");
        monitoring.answered(stream, CDS, "1", "v1", None);
        assert_eq!(status(&monitoring).status, "SYNCED");
        assert_eq!(status(&monitoring).acked, "v1");

        monitoring.sent(stream, CDS, "v2", "2");
        // An answer to the older response says nothing about v2.
        monitoring.answered(stream, CDS, "1", "v1", None);
        assert_eq!(status(&monitoring).status, "STALE");
        monitoring.answered(stream, CDS, "2", "v1", Some("cluster x: bad"));
        let nacked = status(&monitoring);
        assert_eq!((nacked.status, nacked.acked.as_str()), ("NACKED", "v1"));
        assert_eq!(nacked.nack.as_deref(), Some("cluster x: bad"));
        let text = monitoring.encode();
        assert!(
            text.contains("weft_control_xds_rejects_total{type=\"cds\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("weft_control_xds_pushes_total{type=\"cds\"} 2"),
            "{text}"
        );
        assert!(text.contains("weft_control_xds_connected_proxies 1"), "{text}");

        monitoring.disconnected(stream);
        assert!(monitoring.syncz().is_empty());
        assert!(
            monitoring
                .encode()
                .contains("weft_control_xds_connected_proxies 0")
        );
    }
}
