//! What the admin port shows of this proxy: Envoy's shapes, for Envoy's tools, and Weft's own views
//! where they say more.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use envoy_types::pb::envoy::admin::v3 as envoy;
use envoy_types::pb::envoy::config::cluster::v3::{CircuitBreakers, circuit_breakers::Thresholds};
use envoy_types::pb::envoy::config::core::v3::HealthStatus;
use envoy_types::pb::google::protobuf::UInt32Value;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use weft_admin::{ServerState, Stat, Views};
use weft_balance::{ClusterStates, ClusterStatus};
use weft_identity::tls::{CertificateSummary, TlsMaterial};
use weft_model::{Bootstrap, Mesh};
use weft_telemetry::{Metrics, XdsLabels};
use weft_xds::dump::{socket, timestamp};
use weft_xds::{ResourceType, XdsStatus};

/// The name Weft's transparent inbound listener has in the admin views and the config dump.
pub(crate) const INBOUND: &str = "inbound";

/// What admin reads: the proxy's configuration, state and counters.
pub(crate) struct ProxyViews {
    pub(crate) bootstrap: Bootstrap,
    pub(crate) admin: SocketAddr,
    /// Every traffic listener bound at start, by name.
    pub(crate) listeners: Vec<(String, SocketAddr)>,
    pub(crate) stops: ListenerStops,
    pub(crate) mesh: watch::Receiver<Arc<Mesh>>,
    pub(crate) xds: Option<Arc<Mutex<XdsStatus>>>,
    pub(crate) tls: watch::Receiver<Option<TlsMaterial>>,
    pub(crate) clusters: Arc<ClusterStates>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) started: SystemTime,
}

/// Stop the accept loops: `inbound` the inbound listener's, `others` every other traffic listener's.
/// Both are children of the drain token, so a drain stops them too.
#[derive(Debug, Clone)]
pub(crate) struct ListenerStops {
    pub(crate) inbound: CancellationToken,
    pub(crate) others: CancellationToken,
}

impl ListenerStops {
    pub(crate) fn new(drain: &CancellationToken) -> Self {
        Self {
            inbound: drain.child_token(),
            others: drain.child_token(),
        }
    }

    pub(crate) fn of(&self, listener: &str) -> &CancellationToken {
        if listener == INBOUND {
            &self.inbound
        } else {
            &self.others
        }
    }
}

impl ProxyViews {
    fn xds_status(&self) -> Option<XdsStatus> {
        self.xds.as_ref().and_then(|s| s.lock().ok().map(|s| s.clone()))
    }

    fn xds_updates(&self, ty: ResourceType, result: &'static str) -> u64 {
        let labels = XdsLabels {
            resource_type: ty.name(),
            result,
        };
        self.metrics.xds_updates.get(&labels).map_or(0, |c| c.get())
    }
}

impl Views for ProxyViews {
    fn mesh(&self) -> serde_json::Value {
        serde_json::json!({
            "bootstrap": self.bootstrap,
            "xds": self.xds_status(),
            "mesh": *self.mesh.borrow().clone(),
        })
    }

    fn config_dump(&self, query: &str) -> Result<serde_json::Value, String> {
        let query = weft_xds::dump::DumpQuery::parse(query).map_err(|e| e.to_string())?;
        let xds = self.xds_status();
        let mesh = self.mesh.borrow().clone();
        let secrets = dump_secrets(&self.tls.borrow());
        let inputs = weft_xds::dump::DumpInputs {
            node: &self.bootstrap.node,
            admin: self.admin,
            xds: self
                .bootstrap
                .xds
                .as_ref()
                .zip(xds.as_ref())
                .map(|(source, status)| (source.address.as_str(), status)),
            mesh: &mesh,
            listeners: &self.listeners,
            secrets: &secrets,
            started: self.started,
        };
        let dump = weft_xds::dump::config_dump(&inputs, &query).map_err(|e| e.to_string());
        release_descriptors();
        dump
    }

    fn server_info(&self, state: ServerState) -> Result<serde_json::Value, String> {
        use envoy_types::pb::envoy::admin::v3::server_info::State;
        let state = match state {
            ServerState::Live => State::Live,
            ServerState::Draining => State::Draining,
            ServerState::Initializing => State::Initializing,
        };
        let info = weft_xds::dump::server_info(&self.bootstrap.node, self.started, state);
        release_descriptors();
        info.map_err(|e| e.to_string())
    }

    fn certs(&self) -> Result<serde_json::Value, String> {
        let certificates = match &*self.tls.borrow() {
            Some(material) => {
                let (chain, roots) = material.summaries();
                vec![envoy::Certificate {
                    ca_cert: roots.iter().map(certificate_details).collect(),
                    cert_chain: chain.iter().map(certificate_details).collect(),
                }]
            }
            None => Vec::new(),
        };
        let json = weft_xds::dump::admin_json(envoy::Certificates { certificates });
        release_descriptors();
        json.map_err(|e| e.to_string())
    }

    fn identity(&self) -> serde_json::Value {
        let tls = self.tls.borrow();
        let Some(m) = &*tls else {
            return serde_json::Value::Null;
        };
        let c = &m.credentials;
        let time = |t: SystemTime| humantime::format_rfc3339_seconds(t).to_string();
        serde_json::json!({
            "identity": c.id.to_string(),
            "serial": c.serial,
            "not_before": time(c.not_before),
            "not_after": time(c.not_after),
            "seconds_until_expiry": c.remaining().as_secs(),
            "seconds_until_renewal": c.renew_at.map(|t| t.duration_since(SystemTime::now()).unwrap_or_default().as_secs()),
            "trusted_roots_sha256": m.root_fingerprints(),
        })
    }

    fn clusters(&self) -> Result<serde_json::Value, String> {
        let dynamic = self
            .xds_status()
            .and_then(|s| s.received.accepted.get(&ResourceType::Cluster).cloned())
            .unwrap_or_default();
        let cluster_statuses = self
            .clusters
            .status()
            .iter()
            .map(|c| envoy_cluster(c, dynamic.contains_key(&c.name)))
            .collect();
        let json = weft_xds::dump::admin_json(envoy::Clusters { cluster_statuses });
        release_descriptors();
        json.map_err(|e| e.to_string())
    }

    fn endpoints(&self) -> serde_json::Value {
        serde_json::to_value(self.clusters.status()).unwrap_or_default()
    }

    fn stats(&self) -> Vec<Stat> {
        let statuses = self.clusters.status();
        let mut stats = Vec::new();
        for cluster in &statuses {
            cluster_stats(cluster, &mut stats);
        }
        let gauge = |value: i64| u64::try_from(value).unwrap_or(0);
        let count = |n: usize| u64::try_from(n).unwrap_or(u64::MAX);
        stats.extend([
            Stat::new("cluster_manager.active_clusters", count(statuses.len())),
            Stat::new(
                "cluster_manager.cds.update_success",
                self.xds_updates(ResourceType::Cluster, "accepted"),
            ),
            Stat::new(
                "cluster_manager.cds.update_rejected",
                self.xds_updates(ResourceType::Cluster, "rejected"),
            ),
            Stat::new(
                "listener_manager.lds.update_success",
                self.xds_updates(ResourceType::Listener, "accepted"),
            ),
            Stat::new(
                "listener_manager.lds.update_rejected",
                self.xds_updates(ResourceType::Listener, "rejected"),
            ),
            Stat::new(
                "listener_manager.total_listeners_active",
                count(self.listeners().len()),
            ),
            Stat::new("listener_manager.workers_started", 1),
            Stat::new(
                "control_plane.connected_state",
                gauge(self.metrics.xds_connected.get()),
            ),
            Stat::new(
                "server.uptime",
                self.started.elapsed().unwrap_or_default().as_secs(),
            ),
            Stat::new(
                "server.total_connections",
                gauge(self.metrics.downstream_connections_active.get()),
            ),
        ]);
        if let Some(material) = &*self.tls.borrow() {
            let days = material.credentials.remaining().as_secs() / 86_400;
            stats.push(Stat::new("server.days_until_first_cert_expiring", days));
        }
        stats
    }

    fn listeners(&self) -> Vec<(String, SocketAddr)> {
        self.listeners
            .iter()
            .filter(|(name, _)| !self.stops.of(name).is_cancelled())
            .cloned()
            .collect()
    }

    fn listeners_json(&self) -> Result<serde_json::Value, String> {
        let listener_statuses = self
            .listeners()
            .into_iter()
            .map(|(name, address)| envoy::ListenerStatus {
                name,
                local_address: Some(socket(address)),
                additional_local_addresses: Vec::new(),
            })
            .collect();
        let json = weft_xds::dump::admin_json(envoy::Listeners { listener_statuses });
        release_descriptors();
        json.map_err(|e| e.to_string())
    }

    fn drain_listeners(&self, inbound_only: bool) {
        self.stops.inbound.cancel();
        if !inbound_only {
            self.stops.others.cancel();
        }
    }
}

/// A cluster's stats under Envoy's names.
fn cluster_stats(cluster: &ClusterStatus, stats: &mut Vec<Stat>) {
    let counters = &cluster.counters;
    let mut add = |name: &str, value: u64| {
        stats.push(Stat::new(format!("cluster.{}.{name}", cluster.name), value));
    };
    add("upstream_rq_total", counters.upstream_rq_total);
    for (class, value) in counters.upstream_rq_by_class.iter().enumerate() {
        add(&format!("upstream_rq_{}xx", class + 1), *value);
    }
    add("upstream_rq_active", u64::from(cluster.active_requests));
    add("upstream_rq_pending_active", u64::from(cluster.pending_requests));
    add("upstream_rq_retry", counters.upstream_rq_retry);
    add("upstream_rq_retry_overflow", counters.upstream_rq_retry_overflow);
    add(
        "upstream_rq_pending_overflow",
        counters.upstream_rq_pending_overflow,
    );
    add("upstream_cx_overflow", counters.upstream_cx_overflow);
    let members = cluster.endpoints.len() as u64;
    let healthy = cluster
        .endpoints
        .iter()
        .filter(|e| e.healthy && !e.ejected)
        .count() as u64;
    add("membership_total", members);
    add("membership_healthy", healthy);
    add("outlier_detection.ejections_active", counters.ejections_active);
    add(
        "outlier_detection.ejections_enforced_total",
        counters.ejections_enforced_total,
    );
    add(
        "outlier_detection.ejections_enforced_consecutive_5xx",
        counters.ejections_enforced_consecutive_5xx,
    );
    add(
        "outlier_detection.ejections_enforced_consecutive_gateway_failure",
        counters.ejections_enforced_consecutive_gateway_failure,
    );
    add(
        "outlier_detection.ejections_enforced_consecutive_local_origin_failure",
        counters.ejections_enforced_consecutive_local_origin_failure,
    );
    add(
        "outlier_detection.ejections_overflow",
        counters.ejections_overflow,
    );
}

/// A cluster as Envoy's `/clusters?format=json` shows it.
fn envoy_cluster(cluster: &ClusterStatus, added_via_api: bool) -> envoy::ClusterStatus {
    use envoy::simple_metric::Type;
    let metric = |name: &str, r#type: Type, value: u64| envoy::SimpleMetric {
        r#type: r#type as i32,
        value,
        name: name.to_owned(),
    };
    let host_statuses = cluster
        .endpoints
        .iter()
        .map(|e| envoy::HostStatus {
            address: Some(socket(e.address)),
            stats: vec![
                metric("rq_active", Type::Gauge, u64::from(e.active_requests)),
                metric("rq_success", Type::Counter, e.successes),
                metric("rq_error", Type::Counter, e.failures),
                metric("rq_total", Type::Counter, e.successes + e.failures),
            ],
            health_status: Some(envoy::HostHealthStatus {
                failed_outlier_check: e.ejected,
                eds_health_status: if e.healthy {
                    HealthStatus::Healthy
                } else {
                    HealthStatus::Unhealthy
                } as i32,
                ..Default::default()
            }),
            weight: e.weight,
            ..Default::default()
        })
        .collect();
    let limit = |value: u32| Some(UInt32Value { value });
    let breakers = &cluster.circuit_breakers;
    envoy::ClusterStatus {
        name: cluster.name.clone(),
        observability_name: cluster.name.clone(),
        added_via_api,
        host_statuses,
        circuit_breakers: Some(CircuitBreakers {
            thresholds: vec![Thresholds {
                max_connections: limit(breakers.max_connections),
                max_pending_requests: limit(breakers.max_pending_requests),
                max_requests: limit(breakers.max_requests),
                max_retries: limit(breakers.max_retries),
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn certificate_details(summary: &CertificateSummary) -> envoy::CertificateDetails {
    use envoy::subject_alternate_name::Name;
    let names = summary
        .uri_sans
        .iter()
        .map(|uri| Name::Uri(uri.clone()))
        .chain(summary.dns_sans.iter().map(|dns| Name::Dns(dns.clone())));
    let remaining = summary
        .not_after
        .duration_since(SystemTime::now())
        .unwrap_or(Duration::ZERO);
    envoy::CertificateDetails {
        path: "<inline>".to_owned(),
        serial_number: summary.serial_number.clone(),
        subject_alt_names: names
            .map(|name| envoy::SubjectAlternateName { name: Some(name) })
            .collect(),
        days_until_expiration: remaining.as_secs() / 86_400,
        valid_from: Some(timestamp(summary.not_before)),
        expiration_time: Some(timestamp(summary.not_after)),
        ocsp_details: None,
    }
}

/// The workload certificate and the trust bundle under Istio's SDS names.
fn dump_secrets(material: &Option<TlsMaterial>) -> Vec<weft_xds::dump::DumpSecret> {
    let Some(m) = material else {
        return Vec::new();
    };
    let issued = m.credentials.not_before;
    vec![
        weft_xds::dump::DumpSecret {
            name: "default".into(),
            certificate_chain_pem: Some(m.credentials.chain_pem.concat()),
            trusted_ca_pem: None,
            last_updated: issued,
        },
        weft_xds::dump::DumpSecret {
            name: "ROOTCA".into(),
            certificate_chain_pem: None,
            trusted_ca_pem: Some(m.roots_pem()),
            last_updated: issued,
        },
    ]
}

/// The descriptors an Envoy-shaped view loads are tens of megabytes; give them back.
fn release_descriptors() {
    weft_transport::heap::release_free_memory();
}
