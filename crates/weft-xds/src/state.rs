//! The accepted xDS resources, and the runtime model they make together.
//!
//! Resources refer to each other by name (listener -> route configuration -> cluster -> load
//! assignment). A listener whose routes have not arrived, or a cluster whose endpoints have not, is
//! *warming*: left out of the model until it is complete, so traffic never sees half a configuration.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use weft_model::route::RouteTable;
use weft_model::{Cluster, Endpoint, Mesh, Target};

use crate::convert::{ClusterSpec, Collector, ListenerSpec, RouteRef, XdsTracing};
use weft_telemetry::traces::{ListenerTracing, SamplerSetting, TracingSettings};

#[derive(Debug, Default, Clone)]
pub struct XdsState {
    pub listeners: BTreeMap<String, ListenerSpec>,
    pub routes: BTreeMap<String, RouteTable>,
    pub clusters: BTreeMap<String, ClusterSpec>,
    /// Endpoints by ClusterLoadAssignment name.
    pub endpoints: BTreeMap<String, Vec<Endpoint>>,
}

impl XdsState {
    /// Route configurations the listeners ask for (RDS subscription).
    pub fn rds_names(&self) -> BTreeSet<String> {
        self.listeners
            .values()
            .filter_map(|l| match l {
                ListenerSpec::Service {
                    http: Some(RouteRef::Rds(name)),
                    ..
                } => Some(name.clone()),
                _ => None,
            })
            .collect()
    }

    /// Load assignments the clusters ask for (EDS subscription).
    pub fn eds_names(&self) -> BTreeSet<String> {
        self.clusters
            .values()
            .filter_map(|c| c.eds_name.clone())
            .collect()
    }

    /// What is still missing before the configuration is complete, for readiness and the admin view.
    pub fn warming(&self) -> Vec<String> {
        let mut missing: Vec<String> = self
            .rds_names()
            .into_iter()
            .filter(|n| !self.routes.contains_key(n))
            .map(|n| format!("RouteConfiguration \"{n}\""))
            .collect();
        missing.extend(
            self.eds_names()
                .into_iter()
                .filter(|n| !self.endpoints.contains_key(n))
                .map(|n| format!("ClusterLoadAssignment \"{n}\"")),
        );
        missing
    }

    /// The model: `base` (from the bootstrap file: listener addresses, static clusters) with the xDS
    /// resources laid over it.
    pub fn build(&self, base: &Mesh) -> Mesh {
        let mut mesh = base.clone();

        for spec in self.clusters.values() {
            let endpoints = match &spec.eds_name {
                Some(name) => match self.endpoints.get(name) {
                    Some(endpoints) => endpoints.clone(),
                    None => continue, // warming
                },
                None => spec.static_endpoints.clone(),
            };
            let mut cluster = Cluster::new(&spec.name);
            cluster.endpoints = endpoints;
            cluster.lb_policy = spec.lb_policy;
            cluster.connect_timeout = spec.connect_timeout;
            cluster.idle_timeout = spec.idle_timeout;
            cluster.tls = spec.tls.clone();
            cluster.circuit_breakers = spec.circuit_breakers;
            cluster.outlier_detection = spec.outlier_detection;
            cluster.panic_threshold_percent = spec.panic_threshold_percent;
            cluster.max_requests_per_connection = spec.max_requests_per_connection;
            mesh.clusters.insert(spec.name.clone(), Arc::new(cluster));
        }

        let resolve = |table: &RouteTable| {
            let mut table = table.clone();
            for route in table.routes_mut() {
                for wc in &mut route.action.clusters {
                    wc.cluster = mesh.clusters.get(&wc.name).cloned();
                }
            }
            Arc::new(table)
        };
        let routes: BTreeMap<String, Arc<RouteTable>> = self
            .routes
            .iter()
            .map(|(name, table)| (name.clone(), resolve(table)))
            .collect();

        let mut services = Vec::new();
        let mut egress = None;
        let mut inbound_ports = None;
        let mut inbound_tracing = ListenerTracing::Proxy;
        for spec in self.listeners.values() {
            match spec {
                ListenerSpec::Service {
                    address,
                    http,
                    http_settings,
                    tcp_cluster,
                    protocol,
                    access_log,
                    tracing,
                } => {
                    let cluster = tcp_cluster.as_ref().and_then(|c| mesh.clusters.get(c).cloned());
                    let route = match http {
                        Some(RouteRef::Rds(name)) => match routes.get(name) {
                            Some(table) => table.clone(),
                            None => continue, // warming
                        },
                        Some(RouteRef::Inline(table)) => resolve(table),
                        None => match &cluster {
                            Some(c) => Arc::new(RouteTable::to_cluster(c)),
                            None => {
                                Arc::new(RouteTable::new(tcp_cluster.clone().unwrap_or_default(), vec![]))
                            }
                        },
                    };
                    services.push((
                        *address,
                        Target {
                            protocol: *protocol,
                            cluster,
                            route,
                            http: *http_settings,
                            access_log: access_log.clone(),
                            tracing: resolve_tracing(tracing.as_ref(), &mesh),
                        },
                    ));
                }
                ListenerSpec::VirtualOutbound {
                    egress: e,
                    access_log,
                } => egress = Some((*e, access_log.clone())),
                ListenerSpec::VirtualInbound {
                    ports,
                    peer_authentication,
                    port_peer_authentication,
                    authorization,
                    http_settings,
                    access_log,
                    tracing,
                } => {
                    inbound_tracing = resolve_tracing(tracing.as_ref(), &mesh);
                    inbound_ports = Some((
                        ports.clone(),
                        (*peer_authentication, port_peer_authentication.clone()),
                        authorization.clone(),
                        *http_settings,
                        access_log.clone(),
                    ));
                }
            }
        }
        if let Some(outbound) = &mut mesh.outbound {
            outbound.services.extend(services);
            if let Some((egress, access_log)) = egress {
                outbound.egress = egress;
                outbound.access_log = access_log;
            }
        }
        if let (Some(inbound), Some((ports, mode, authorization, http, access_log))) =
            (&mut mesh.inbound, inbound_ports)
        {
            inbound.ports.extend(ports);
            inbound.access_log = access_log;
            inbound.tracing = inbound_tracing;
            if let Some(http) = http {
                inbound.http = http;
            }
            let (mode, port_modes) = mode;
            if let Some(mode) = mode {
                inbound.peer_authentication = mode;
            }
            inbound.port_peer_authentication.extend(port_modes);
            // The control plane's policies replace the file's; a control plane that sends none leaves
            // the file's in force rather than opening the workload.
            if !authorization.is_empty() {
                inbound.authorization = authorization;
            }
        }
        mesh.routes.extend(routes);
        mesh
    }
}

/// A listener's tracing in the model: a collector named by cluster is that cluster's first endpoint
/// (a cluster that has none leaves the listener untraced, logged).
fn resolve_tracing(tracing: Option<&XdsTracing>, mesh: &Mesh) -> ListenerTracing {
    let Some(tracing) = tracing else {
        return ListenerTracing::Proxy;
    };
    let XdsTracing::OpenTelemetry {
        collector,
        service_name,
        sampling_percent,
        tags,
    } = tracing
    else {
        return ListenerTracing::Off;
    };
    let endpoint = match collector {
        Collector::Uri(uri) => uri.clone(),
        Collector::Cluster(name) => {
            let Some(endpoint) = mesh.clusters.get(name).and_then(|c| c.endpoints.first()) else {
                tracing::warn!(cluster = %name, "the tracing collector's cluster has no endpoint; requests of its listener are not traced");
                return ListenerTracing::Off;
            };
            format!("http://{}", endpoint.address)
        }
    };
    let mut settings = TracingSettings::new(
        endpoint,
        service_name.clone(),
        SamplerSetting::ParentBasedTraceIdRatio(sampling_percent / 100.0),
    );
    settings.tags = tags.clone();
    ListenerTracing::Own(Arc::new(settings))
}
