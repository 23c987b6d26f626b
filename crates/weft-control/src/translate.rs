//! The catalog to xDS, for one proxy. Names follow Istio's, so what users know from `istioctl
//! proxy-config` reads the same here: clusters `outbound|<port>|<subset>|<fqdn>`, per-port listeners
//! `0.0.0.0_<port>` (HTTP, routes from RDS `"<port>"`) and `<clusterIP>_<port>` (TCP), the capture
//! listeners `virtualOutbound` and `virtualInbound`.

use std::collections::{BTreeMap, BTreeSet};
use std::hash::{Hash, Hasher};
use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3::cluster::CommonLbConfig;
use envoy_types::pb::envoy::config::cluster::v3::cluster::{
    ClusterDiscoveryType, DiscoveryType, EdsClusterConfig, LbPolicy as XLbPolicy,
};
use envoy_types::pb::envoy::config::cluster::v3::{
    CircuitBreakers, Cluster, OutlierDetection as XOutlier, circuit_breakers::Thresholds,
};
use envoy_types::pb::envoy::config::core::v3::HttpProtocolOptions as HttpProtocolOptionsCommon;
use envoy_types::pb::envoy::config::core::v3::{
    Address, AggregatedConfigSource, ApiVersion, ConfigSource, SocketAddress, address, config_source,
    socket_address,
};
use envoy_types::pb::envoy::config::core::v3::{TransportSocket, transport_socket};
use envoy_types::pb::envoy::config::endpoint::v3::{
    ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints, lb_endpoint,
};
use envoy_types::pb::envoy::config::listener::v3::{Filter, FilterChain, FilterChainMatch, Listener, filter};
use envoy_types::pb::envoy::config::route::v3::{
    HeaderMatcher, RetryPolicy, Route, RouteAction, RouteConfiguration, RouteMatch, VirtualHost,
    WeightedCluster, header_matcher, route, route_action, route_match, weighted_cluster,
};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, HttpFilter, Rds, http_connection_manager, http_filter,
};
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::{TcpProxy, tcp_proxy};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::common_tls_context::{
    CombinedCertificateValidationContext, ValidationContextType,
};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, CommonTlsContext, DownstreamTlsContext, UpstreamTlsContext,
};
use envoy_types::pb::envoy::extensions::upstreams::http::v3::{HttpProtocolOptions, http_protocol_options};
use envoy_types::pb::envoy::r#type::matcher::v3::{RegexMatcher, StringMatcher, string_matcher};
use envoy_types::pb::envoy::r#type::v3::Percent;
use envoy_types::pb::google::protobuf::{Any, BoolValue, Duration as XDuration, UInt32Value};
use envoy_types::util::pack_any;
use prost::{Message, Name};

use crate::resources::{
    Catalog, DestinationRuleSpec, HttpMatch, IstioRetryOn, LoggingMode, MtlsMode, PortProtocol, Resource,
    ServicePort, ServiceSpec, StringMatch, TargetPort, TrafficPolicy, WorkloadEntrySpec, fqdn, resolve_host,
};
use crate::scope::Scope;
use envoy_types::pb::envoy::config::accesslog::v3::{AccessLog, access_log};
use envoy_types::pb::envoy::config::core::v3::{
    DataSource, SubstitutionFormatString, data_source, substitution_format_string,
};
use envoy_types::pb::envoy::extensions::access_loggers::file::v3::{FileAccessLog, file_access_log};

pub const OUTBOUND_CAPTURE_PORT: u32 = 15001;
pub const INBOUND_CAPTURE_PORT: u32 = 15006;
const ROUTER_FILTER: &str = "envoy.filters.http.router";
/// Istio's cluster that refuses what it is sent (egress under REGISTRY_ONLY).
const BLACKHOLE: &str = "BlackHoleCluster";
/// Istio's cluster for inbound connections to ports no Service declares.
const INBOUND_PASSTHROUGH: &str = "InboundPassthroughCluster";
/// The label Istio's injector puts on workloads that have a sidecar.
const TLS_MODE_LABEL: &str = "security.istio.io/tlsMode";
const ROUTER_TYPE_URL: &str = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router";
/// Istio's default retry policy for routes without one (`pilot/pkg/networking/core/route/retry`).
const ISTIO_DEFAULT_RETRY_ON: &str =
    "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes";
/// ...with 503 as its retriable status and two attempts.
const ISTIO_DEFAULT_RETRIABLE_STATUS: u32 = 503;
const ISTIO_DEFAULT_ATTEMPTS: u32 = 2;

/// Which workload a proxy serves.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeInfo {
    pub workload: String,
    pub namespace: String,
}

/// The resources of one type for one proxy, and their version (a hash of the content: it changes only
/// when the content does).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TypeResources {
    pub version: String,
    pub resources: BTreeMap<String, Any>,
}

/// Everything one proxy should have, by type URL.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    pub types: BTreeMap<String, TypeResources>,
}

impl Snapshot {
    pub fn get(&self, type_url: &str) -> Option<&TypeResources> {
        self.types.get(type_url)
    }
}

struct Builder<'a> {
    /// What this proxy sees of the mesh.
    scope: Scope<'a>,
    /// Clusters and load assignments are final once made: kept encoded (a `Cluster` is several KiB as
    /// a struct and a few hundred bytes encoded, and a proxy may see 30,000 of them).
    clusters: BTreeMap<String, Any>,
    endpoints: BTreeMap<String, Any>,
    listeners: BTreeMap<String, Listener>,
    routes: BTreeMap<String, RouteConfiguration>,
    /// Access logs of the client side (outbound listeners) and the server side (inbound).
    client_log: Vec<AccessLog>,
    server_log: Vec<AccessLog>,
}

pub fn snapshot(catalog: &Catalog, node: &NodeInfo) -> Snapshot {
    let me = catalog
        .workload_entries
        .iter()
        .find(|w| w.metadata.name == node.workload && w.metadata.namespace() == node.namespace);
    let (client, server) = access_logging(catalog, me, &node.namespace);
    let mut b = Builder {
        scope: Scope::of(catalog, me, &node.namespace),
        clusters: BTreeMap::new(),
        endpoints: BTreeMap::new(),
        listeners: BTreeMap::new(),
        routes: BTreeMap::new(),
        client_log: client.then(istio_access_log).into_iter().collect(),
        server_log: server.then(istio_access_log).into_iter().collect(),
    };
    for service in &catalog.services {
        if !b.scope.sees_service(service) {
            continue;
        }
        for port in &service.spec.ports {
            b.outbound(catalog, service, port);
        }
    }
    b.capture_listeners(catalog, node);

    let mut snapshot = Snapshot::default();
    insert_packed::<Cluster>(&mut snapshot, b.clusters);
    insert_packed::<ClusterLoadAssignment>(&mut snapshot, b.endpoints);
    insert(&mut snapshot, b.listeners);
    insert(&mut snapshot, b.routes);
    snapshot
}

fn insert<M: Message + Name>(snapshot: &mut Snapshot, resources: BTreeMap<String, M>) {
    let packed = resources
        .into_iter()
        .map(|(name, m)| (name, pack_any(m)))
        .collect();
    insert_packed::<M>(snapshot, packed);
}

fn insert_packed<M: Name>(snapshot: &mut Snapshot, resources: BTreeMap<String, Any>) {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    for (name, any) in &resources {
        name.hash(&mut hasher);
        any.value.hash(&mut hasher);
    }
    let version = format!("{:016x}", hasher.finish());
    snapshot
        .types
        .insert(M::type_url(), TypeResources { version, resources });
}

impl Builder<'_> {
    fn outbound(&mut self, catalog: &Catalog, service: &Resource<ServiceSpec>, port: &ServicePort) {
        let namespace = service.metadata.namespace();
        let host = fqdn(&service.metadata.name, namespace);
        let rule = destination_rule(catalog, &self.scope, &host);
        let policy = rule.and_then(|r| r.traffic_policy.as_ref());

        let default_cluster = cluster_name(port.port, "", &host);
        let all = BTreeMap::new();
        self.cluster(&default_cluster, policy, mesh_identities(catalog, service, &all));
        self.load_assignment(&default_cluster, catalog, service, port, &all);
        for subset in rule.map(|r| r.subsets.as_slice()).unwrap_or_default() {
            let name = cluster_name(port.port, &subset.name, &host);
            self.cluster(&name, policy, mesh_identities(catalog, service, &subset.labels));
            self.load_assignment(&name, catalog, service, port, &subset.labels);
        }

        let cluster_ip = service.spec.cluster_ip.as_deref().filter(|ip| *ip != "None");
        let protocol = port.protocol();
        let mut chains = Vec::new();
        if protocol != PortProtocol::Tcp {
            let route_name = port.port.to_string();
            let vhost = self.virtual_host(catalog, service, port, &host, cluster_ip);
            self.routes
                .entry(route_name.clone())
                .or_insert_with(|| RouteConfiguration {
                    name: route_name.clone(),
                    ..Default::default()
                })
                .virtual_hosts
                .push(vhost);
            chains.push(filter_chain(hcm_rds(&route_name, &self.client_log)));
        }
        if protocol != PortProtocol::Http {
            chains.push(filter_chain(tcp_proxy(&default_cluster, &self.client_log)));
        }
        // HTTP services share one wildcard listener per port (virtual hosts tell them apart); TCP needs the
        // service's own address.
        let listen_ip = if protocol == PortProtocol::Http {
            "0.0.0.0"
        } else {
            cluster_ip.unwrap_or("0.0.0.0")
        };
        let name = format!("{listen_ip}_{}", port.port);
        let listener = self.listeners.entry(name.clone()).or_insert_with(|| Listener {
            name,
            address: Some(socket(listen_ip, u32::from(port.port))),
            bind_to_port: Some(BoolValue { value: false }),
            ..Default::default()
        });
        if listener.filter_chains.is_empty() {
            listener.filter_chains = chains;
        }
    }

    fn cluster(&mut self, name: &str, policy: Option<&TrafficPolicy>, identities: Option<Vec<String>>) {
        let lb_policy = match policy
            .and_then(|p| p.load_balancer.as_ref())
            .and_then(|l| l.simple.as_deref())
        {
            Some("ROUND_ROBIN") => XLbPolicy::RoundRobin,
            Some("RANDOM") => XLbPolicy::Random,
            // Istio's default since 1.14.
            _ => XLbPolicy::LeastRequest,
        };
        let pool = policy.and_then(|p| p.connection_pool.as_ref());
        let connect_timeout = pool
            .and_then(|p| p.tcp.as_ref())
            .and_then(|t| t.connect_timeout)
            .unwrap_or(Duration::from_secs(10));
        // Istio lifts Envoy's default limits to "unlimited" unless the DestinationRule says otherwise.
        let max = u32::MAX;
        let thresholds = Thresholds {
            max_connections: Some(UInt32Value {
                value: pool
                    .and_then(|p| p.tcp.as_ref())
                    .and_then(|t| t.max_connections)
                    .unwrap_or(max),
            }),
            max_pending_requests: Some(UInt32Value {
                value: pool
                    .and_then(|p| p.http.as_ref())
                    .and_then(|h| h.http1_max_pending_requests)
                    .unwrap_or(max),
            }),
            max_requests: Some(UInt32Value {
                value: pool
                    .and_then(|p| p.http.as_ref())
                    .and_then(|h| h.http2_max_requests)
                    .unwrap_or(max),
            }),
            max_retries: Some(UInt32Value {
                value: pool
                    .and_then(|p| p.http.as_ref())
                    .and_then(|h| h.max_retries)
                    .unwrap_or(max),
            }),
            track_remaining: true,
            ..Default::default()
        };
        let outlier_detection = policy.and_then(|p| p.outlier_detection.as_ref()).map(|o| {
            // As Istio writes it: a detector the rule sets is enforced, one set to 0 is off.
            let enforcing = |set: Option<u32>| {
                set.map(|v| UInt32Value {
                    value: if v > 0 { 100 } else { 0 },
                })
            };
            let value = |v: Option<u32>| v.map(|value| UInt32Value { value });
            XOutlier {
                consecutive_5xx: value(o.consecutive5xx_errors),
                enforcing_consecutive_5xx: enforcing(o.consecutive5xx_errors),
                consecutive_gateway_failure: value(o.consecutive_gateway_errors),
                enforcing_consecutive_gateway_failure: enforcing(o.consecutive_gateway_errors),
                split_external_local_origin_errors: o.split_external_local_origin_errors,
                consecutive_local_origin_failure: value(o.consecutive_local_origin_failures),
                enforcing_consecutive_local_origin_failure: enforcing(o.consecutive_local_origin_failures),
                interval: o.interval.map(duration),
                base_ejection_time: o.base_ejection_time.map(duration),
                max_ejection_percent: value(o.max_ejection_percent),
                ..Default::default()
            }
        });
        // Istio sets the panic threshold from minHealthPercent (0 unless given) whenever outlier
        // detection is on.
        let common_lb_config = policy
            .and_then(|p| p.outlier_detection.as_ref())
            .map(|o| CommonLbConfig {
                healthy_panic_threshold: Some(Percent {
                    value: f64::from(o.min_health_percent.unwrap_or(0).min(100)),
                }),
                ..Default::default()
            });
        let http = pool.and_then(|p| p.http.as_ref());
        let idle_timeout = http.and_then(|h| h.idle_timeout);
        // Istio: 0 means no limit.
        let max_requests = http
            .and_then(|h| h.max_requests_per_connection)
            .filter(|n| *n > 0);
        let upgrade = http.and_then(|h| h.h2_upgrade_policy.as_deref()) == Some("UPGRADE");
        let common = (idle_timeout.is_some() || max_requests.is_some()).then(|| HttpProtocolOptionsCommon {
            idle_timeout: idle_timeout.map(duration),
            max_requests_per_connection: max_requests.map(|value| UInt32Value { value }),
            ..Default::default()
        });
        let typed_extension_protocol_options = (common.is_some() || upgrade)
            .then(|| {
                // UPGRADE, as Istio states it: HTTP/2 to the endpoints. Otherwise the client's protocol
                // is kept upstream; Envoy requires the choice be stated.
                let protocol = if upgrade {
                    http_protocol_options::UpstreamProtocolOptions::ExplicitHttpConfig(
                        http_protocol_options::ExplicitHttpConfig {
                            protocol_config: Some(
                                http_protocol_options::explicit_http_config::ProtocolConfig::Http2ProtocolOptions(
                                    Default::default(),
                                ),
                            ),
                        },
                    )
                } else {
                    http_protocol_options::UpstreamProtocolOptions::UseDownstreamProtocolConfig(Default::default())
                };
                let options = HttpProtocolOptions {
                    common_http_protocol_options: common,
                    upstream_protocol_options: Some(protocol),
                    ..Default::default()
                };
                (HttpProtocolOptions::full_name(), pack_any(options))
            })
            .into_iter()
            .collect();
        self.clusters.insert(
            name.to_owned(),
            pack_any(Cluster {
                name: name.to_owned(),
                cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Eds as i32)),
                eds_cluster_config: Some(EdsClusterConfig {
                    eds_config: Some(ads()),
                    service_name: String::new(),
                }),
                connect_timeout: Some(duration(connect_timeout)),
                lb_policy: lb_policy as i32,
                circuit_breakers: Some(CircuitBreakers {
                    thresholds: vec![thresholds],
                    ..Default::default()
                }),
                outlier_detection,
                common_lb_config,
                typed_extension_protocol_options,
                transport_socket: identities.map(|ids| upstream_tls(&ids)),
                ..Default::default()
            }),
        );
    }

    fn load_assignment(
        &mut self,
        cluster: &str,
        catalog: &Catalog,
        service: &Resource<ServiceSpec>,
        port: &ServicePort,
        subset: &BTreeMap<String, String>,
    ) {
        let lb_endpoints = catalog
            .workloads_of(service)
            .filter(|w| labels_match(subset, &w.spec.labels))
            .filter_map(|w| {
                let port = endpoint_port(port, &w.spec)?;
                Some(LbEndpoint {
                    host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
                        address: Some(socket(&w.spec.address, u32::from(port))),
                        ..Default::default()
                    })),
                    load_balancing_weight: w.spec.weight.map(|value| UInt32Value { value }),
                    metadata: Some(telemetry_metadata(w)),
                    ..Default::default()
                })
            })
            .collect();
        self.endpoints.insert(
            cluster.to_owned(),
            pack_any(ClusterLoadAssignment {
                cluster_name: cluster.to_owned(),
                endpoints: vec![LocalityLbEndpoints {
                    lb_endpoints,
                    ..Default::default()
                }],
                ..Default::default()
            }),
        );
    }

    fn virtual_host(
        &self,
        catalog: &Catalog,
        service: &Resource<ServiceSpec>,
        port: &ServicePort,
        host: &str,
        cluster_ip: Option<&str>,
    ) -> VirtualHost {
        let name = &service.metadata.name;
        let namespace = service.metadata.namespace();
        let mut domains: Vec<String> = Vec::new();
        for d in [host.to_owned(), name.clone(), format!("{name}.{namespace}")]
            .into_iter()
            .chain(cluster_ip.map(str::to_owned))
        {
            domains.push(format!("{d}:{}", port.port));
            domains.push(d);
        }
        let routes = match virtual_service(catalog, &self.scope, host) {
            Some(vs) => vs
                .spec
                .http
                .iter()
                .flat_map(|rule| {
                    let matches = if rule.matches.is_empty() {
                        vec![HttpMatch::default()]
                    } else {
                        rule.matches.clone()
                    };
                    matches.into_iter().map(move |m| (rule, m))
                })
                .map(|(rule, m)| {
                    let clusters = rule
                        .route
                        .iter()
                        .map(|d| {
                            let dest_host = resolve_host(&d.destination.host, vs.metadata.namespace());
                            let dest_port = d.destination.port.as_ref().map_or(port.port, |p| p.number);
                            let subset = d.destination.subset.as_deref().unwrap_or_default();
                            (
                                cluster_name(dest_port, subset, &dest_host),
                                d.weight.unwrap_or(if rule.route.len() == 1 { 100 } else { 0 }),
                            )
                        })
                        .collect();
                    // Istio: no `retries` means its default policy; `attempts: 0` turns retries off.
                    let retry = match &rule.retries {
                        Some(r) if r.attempts == 0 => None,
                        Some(r) => Some(retry_policy(r.retry_on.as_ref(), r.attempts, r.per_try_timeout)),
                        None => Some(retry_policy(None, ISTIO_DEFAULT_ATTEMPTS, None)),
                    };
                    route_to(
                        rule.name.clone().unwrap_or_default(),
                        route_match(&m),
                        clusters,
                        rule.timeout,
                        retry,
                    )
                })
                .collect(),
            None => vec![route_to(
                "default".into(),
                prefix_match("/"),
                vec![(cluster_name(port.port, "", host), 100)],
                None,
                Some(retry_policy(None, ISTIO_DEFAULT_ATTEMPTS, None)),
            )],
        };
        VirtualHost {
            name: format!("{host}:{}", port.port),
            domains,
            routes,
            ..Default::default()
        }
    }

    /// `virtualOutbound` (anything else passes through) and `virtualInbound` (the ports of the services
    /// this workload serves).
    fn capture_listeners(&mut self, catalog: &Catalog, node: &NodeInfo) {
        self.clusters.insert(
            crate::PASSTHROUGH.into(),
            pack_any(Cluster {
                name: crate::PASSTHROUGH.into(),
                cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::OriginalDst as i32)),
                lb_policy: XLbPolicy::ClusterProvided as i32,
                ..Default::default()
            }),
        );
        // Istio's egress: what the proxy does not know passes through, or with the Sidecar's
        // REGISTRY_ONLY goes to the BlackHoleCluster (a static cluster without endpoints).
        let egress = if self.scope.registry_only() {
            self.clusters.insert(
                BLACKHOLE.into(),
                pack_any(Cluster {
                    name: BLACKHOLE.into(),
                    cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Static as i32)),
                    ..Default::default()
                }),
            );
            BLACKHOLE
        } else {
            crate::PASSTHROUGH
        };
        self.listeners.insert(
            "virtualOutbound".into(),
            Listener {
                name: "virtualOutbound".into(),
                address: Some(socket("0.0.0.0", OUTBOUND_CAPTURE_PORT)),
                use_original_dst: Some(BoolValue { value: true }),
                default_filter_chain: Some(filter_chain(tcp_proxy(egress, &self.client_log))),
                ..Default::default()
            },
        );

        let me = catalog
            .workload_entries
            .iter()
            .find(|w| w.metadata.name == node.workload && w.metadata.namespace() == node.namespace);
        let mut chains = Vec::new();
        let mut seen = BTreeSet::new();
        let (http_authz, tcp_authz) = authorization(catalog, me, &node.namespace);
        let http_rbac = crate::rbac::http_filters(&http_authz);
        let tcp_rbac = crate::rbac::network_filters(&tcp_authz);
        let inbound_chain = |filter: Any, http: bool| {
            let mut chain = filter_chain(filter);
            if !http {
                chain.filters.splice(0..0, tcp_rbac.iter().cloned());
            }
            chain
        };
        if let Some(me) = me {
            for service in catalog.services.iter().filter(|s| {
                s.metadata.namespace() == me.metadata.namespace()
                    && selects(&s.spec.selector, &me.spec.labels)
            }) {
                for port in &service.spec.ports {
                    let Some(target) = endpoint_port(port, &me.spec) else {
                        continue;
                    };
                    if !seen.insert(target) {
                        continue;
                    }
                    let inbound_cluster = format!("inbound|{target}||");
                    let http = port.protocol() == PortProtocol::Http;
                    let filter = if http {
                        hcm_inline(&inbound_cluster, &http_rbac, &self.server_log)
                    } else {
                        tcp_proxy(&inbound_cluster, &self.server_log)
                    };
                    // Istio's shape: a `tls` chain terminating mutual TLS and/or a `raw_buffer` chain
                    // for plaintext, as the workload's PeerAuthentication allows.
                    let (tls, plaintext) =
                        match peer_authentication(catalog, Some(me), &node.namespace, target) {
                            MtlsMode::Strict => (true, false),
                            MtlsMode::Disable => (false, true),
                            MtlsMode::Permissive | MtlsMode::Unset => (true, true),
                        };
                    for (wanted, transport) in [(tls, "tls"), (plaintext, "raw_buffer")] {
                        if !wanted {
                            continue;
                        }
                        let mut chain = inbound_chain(filter.clone(), http);
                        chain.filter_chain_match = Some(FilterChainMatch {
                            destination_port: Some(UInt32Value {
                                value: u32::from(target),
                            }),
                            transport_protocol: transport.into(),
                            ..Default::default()
                        });
                        if transport == "tls" {
                            chain.transport_socket = Some(downstream_mtls());
                        }
                        chains.push(chain);
                    }
                }
            }
        }
        // Istio's catch-all chains: connections to ports no Service declares are held to the same
        // policy, translated for HTTP and for TCP.
        if !(http_authz.is_empty() && tcp_authz.is_empty()) {
            chains.push(inbound_chain(
                hcm_inline(INBOUND_PASSTHROUGH, &http_rbac, &self.server_log),
                true,
            ));
            chains.push(inbound_chain(
                tcp_proxy(INBOUND_PASSTHROUGH, &self.server_log),
                false,
            ));
        }
        self.listeners.insert(
            "virtualInbound".into(),
            Listener {
                name: "virtualInbound".into(),
                address: Some(socket("0.0.0.0", INBOUND_CAPTURE_PORT)),
                filter_chains: chains,
                ..Default::default()
            },
        );
    }
}

/// Istio's auto-mTLS: when every workload behind a cluster carries the sidecar label
/// `security.istio.io/tlsMode: istio`, the cluster speaks mutual TLS and expects their service accounts.
fn mesh_identities(
    catalog: &Catalog,
    service: &Resource<ServiceSpec>,
    subset: &BTreeMap<String, String>,
) -> Option<Vec<String>> {
    let workloads: Vec<_> = catalog
        .workloads_of(service)
        .filter(|w| labels_match(subset, &w.spec.labels))
        .collect();
    let meshed = !workloads.is_empty()
        && workloads
            .iter()
            .all(|w| w.spec.labels.get(TLS_MODE_LABEL).is_some_and(|v| v == "istio"));
    meshed.then(|| {
        let ids: BTreeSet<String> = workloads
            .iter()
            .map(|w| {
                let sa = w.spec.service_account.as_deref().unwrap_or("default");
                format!(
                    "spiffe://{}/ns/{}/sa/{sa}",
                    crate::DEFAULT_TRUST_DOMAIN,
                    w.metadata.namespace()
                )
            })
            .collect();
        ids.into_iter().collect()
    })
}

/// The AuthorizationPolicies that apply to a workload (Istio's scopes: mesh-wide in the root namespace,
/// namespace-wide, or selecting its labels, from its namespace or from the root namespace), translated
/// for HTTP requests and for TCP connections.
fn authorization(
    catalog: &Catalog,
    me: Option<&Resource<WorkloadEntrySpec>>,
    namespace: &str,
) -> (weft_authz::Authorization, weft_authz::Authorization) {
    let root = crate::resources::root_namespace();
    let applicable: Vec<weft_authz::istio::Applicable<'_>> = catalog
        .authorization_policies
        .iter()
        .filter(|p| {
            let ns = p.metadata.namespace();
            match (&p.spec.selector, me) {
                (None, _) => ns == namespace || ns == root,
                (Some(s), Some(me)) => {
                    (ns == namespace || ns == root) && selects(&s.match_labels, &me.spec.labels)
                }
                (Some(_), None) => false,
            }
        })
        .map(|p| weft_authz::istio::Applicable {
            namespace: p.metadata.namespace(),
            name: &p.metadata.name,
            spec: &p.spec,
        })
        .collect();
    (
        weft_authz::istio::authorization(&applicable, weft_authz::istio::Layer::Http),
        weft_authz::istio::authorization(&applicable, weft_authz::istio::Layer::Tcp),
    )
}

/// The mode for one port of a workload, by Istio's precedence: a policy selecting it, then its
/// namespace's, then the mesh-wide one in the root namespace; within a policy, its `portLevelMtls` for
/// the port over its `mtls`; `UNSET` defers to the next; PERMISSIVE when none says.
fn peer_authentication(
    catalog: &Catalog,
    me: Option<&Resource<WorkloadEntrySpec>>,
    namespace: &str,
    port: u16,
) -> MtlsMode {
    let set = |m: &crate::resources::MutualTls| Some(m.mode).filter(|m| *m != MtlsMode::Unset);
    let mode_of = |p: &Resource<crate::resources::PeerAuthenticationSpec>| {
        let port_level = p.spec.port_level_mtls.get(&crate::resources::PortNumber(port));
        port_level
            .and_then(set)
            .or_else(|| p.spec.mtls.as_ref().and_then(set))
    };
    by_precedence(
        &catalog.peer_authentications,
        |p| p.selector.as_ref(),
        me,
        namespace,
    )
    .find_map(mode_of)
    .unwrap_or(MtlsMode::Permissive)
}

/// The resources that apply to a workload, in Istio's order: those in its namespace whose selector
/// matches it, then its namespace's without a selector, then the root namespace's without one.
fn by_precedence<'a, S>(
    list: &'a [Resource<S>],
    selector: fn(&S) -> Option<&crate::resources::WorkloadSelector>,
    me: Option<&'a Resource<WorkloadEntrySpec>>,
    namespace: &'a str,
) -> impl Iterator<Item = &'a Resource<S>> {
    let selecting = list.iter().filter(move |r| {
        r.metadata.namespace() == namespace
            && match (selector(&r.spec), me) {
                (Some(s), Some(me)) => selects(&s.match_labels, &me.spec.labels),
                _ => false,
            }
    });
    let namespace_wide = list
        .iter()
        .filter(move |r| r.metadata.namespace() == namespace && selector(&r.spec).is_none());
    let mesh_wide = list.iter().filter(move |r| {
        r.metadata.namespace() == crate::resources::root_namespace() && selector(&r.spec).is_none()
    });
    selecting.chain(namespace_wide).chain(mesh_wide)
}

/// Whether the client side and the server side of this workload write access logs, by the Telemetry
/// that applies (Istio's precedence: one selecting the workload, then its namespace's, then the root
/// namespace's); none: neither, as in Istio's default profile.
fn access_logging(
    catalog: &Catalog,
    me: Option<&Resource<WorkloadEntrySpec>>,
    namespace: &str,
) -> (bool, bool) {
    let Some(telemetry) = by_precedence(&catalog.telemetries, |t| t.selector.as_ref(), me, namespace)
        .find(|t| !t.spec.access_logging.is_empty())
    else {
        return (false, false);
    };
    let (mut client, mut server) = (false, false);
    for logging in &telemetry.spec.access_logging {
        let on = logging.disabled != Some(true);
        let mode = logging.matcher.as_ref().map(|m| m.mode).unwrap_or_default();
        if mode != LoggingMode::Server {
            client = on;
        }
        if mode != LoggingMode::Client {
            server = on;
        }
    }
    (client, server)
}

/// Istio's built-in `envoy` provider: Envoy's file logger on the proxy's stdout, Istio's text format.
fn istio_access_log() -> AccessLog {
    let format = SubstitutionFormatString {
        format: Some(substitution_format_string::Format::TextFormatSource(DataSource {
            specifier: Some(data_source::Specifier::InlineString(
                weft_telemetry::access_log::ISTIO_TEXT.into(),
            )),
            ..Default::default()
        })),
        ..Default::default()
    };
    AccessLog {
        name: "envoy.access_loggers.file".into(),
        filter: None,
        config_type: Some(access_log::ConfigType::TypedConfig(pack_any(FileAccessLog {
            path: "/dev/stdout".into(),
            access_log_format: Some(file_access_log::AccessLogFormat::LogFormat(format)),
        }))),
    }
}

/// Terminating mutual TLS: a client certificate is required (the proxy uses its own workload certificate).
fn downstream_mtls() -> TransportSocket {
    let context = DownstreamTlsContext {
        require_client_certificate: Some(BoolValue { value: true }),
        ..Default::default()
    };
    TransportSocket {
        name: "envoy.transport_sockets.tls".into(),
        config_type: Some(transport_socket::ConfigType::TypedConfig(pack_any(context))),
    }
}

fn upstream_tls(identities: &[String]) -> TransportSocket {
    let exact = |id: &String| StringMatcher {
        match_pattern: Some(string_matcher::MatchPattern::Exact(id.clone())),
        ignore_case: false,
    };
    #[allow(deprecated)]
    let validation = CertificateValidationContext {
        match_subject_alt_names: identities.iter().map(exact).collect(),
        ..Default::default()
    };
    let context = UpstreamTlsContext {
        common_tls_context: Some(CommonTlsContext {
            validation_context_type: Some(ValidationContextType::CombinedValidationContext(
                CombinedCertificateValidationContext {
                    default_validation_context: Some(validation),
                    ..Default::default()
                },
            )),
            ..Default::default()
        }),
        ..Default::default()
    };
    TransportSocket {
        name: "envoy.transport_sockets.tls".into(),
        config_type: Some(transport_socket::ConfigType::TypedConfig(pack_any(context))),
    }
}

fn cluster_name(port: u16, subset: &str, host: &str) -> String {
    format!("outbound|{port}|{subset}|{host}")
}

/// The DestinationRule for `host` that this proxy sees, its own namespace's first (Istio's order).
fn destination_rule<'a>(
    catalog: &'a Catalog,
    scope: &Scope<'_>,
    host: &str,
) -> Option<&'a DestinationRuleSpec> {
    catalog
        .destination_rules_of(host)
        .filter(|r| scope.sees(&r.spec.export_to, r.metadata.namespace()))
        .min_by_key(|r| r.metadata.namespace() != scope.namespace())
        .map(|r| &r.spec)
}

/// The VirtualService for `host` that this proxy sees, its own namespace's first.
fn virtual_service<'a>(
    catalog: &'a Catalog,
    scope: &Scope<'_>,
    host: &str,
) -> Option<&'a Resource<crate::resources::VirtualServiceSpec>> {
    catalog
        .virtual_services_of(host)
        .filter(|vs| scope.sees(&vs.spec.export_to, vs.metadata.namespace()))
        .min_by_key(|vs| vs.metadata.namespace() != scope.namespace())
}

/// Istio's endpoint metadata for the client side's metric labels: `filter_metadata.istio.workload` =
/// `name;namespace;canonical service;canonical revision;cluster`, by the same label rules a proxy
/// applies to itself.
fn telemetry_metadata(
    workload: &Resource<WorkloadEntrySpec>,
) -> envoy_types::pb::envoy::config::core::v3::Metadata {
    use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
    let labels = &workload.spec.labels;
    let label = |names: &[&str]| names.iter().find_map(|n| labels.get(*n).cloned());
    let name = workload.metadata.name.clone();
    let canonical_service = label(&["service.istio.io/canonical-name", "app.kubernetes.io/name", "app"])
        .unwrap_or_else(|| name.clone());
    let canonical_revision = label(&[
        "service.istio.io/canonical-revision",
        "app.kubernetes.io/version",
        "version",
    ])
    .unwrap_or_else(|| "latest".into());
    let value = format!(
        "{name};{};{canonical_service};{canonical_revision};Kubernetes",
        workload.metadata.namespace()
    );
    let fields = [(
        "workload".to_owned(),
        Value {
            kind: Some(Kind::StringValue(value)),
        },
    )];
    envoy_types::pb::envoy::config::core::v3::Metadata {
        filter_metadata: [(
            "istio".to_owned(),
            Struct {
                fields: fields.into_iter().collect(),
            },
        )]
        .into_iter()
        .collect(),
        ..Default::default()
    }
}

/// A service with no selector selects nothing (its endpoints are managed elsewhere).
pub(crate) fn selects(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    !selector.is_empty() && labels_match(selector, labels)
}

fn labels_match(wanted: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    wanted.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// The port a workload serves a service port on: a named target port or the port's name looked up in the
/// workload's `ports`, else the numeric target port, else the service port.
fn endpoint_port(port: &ServicePort, workload: &WorkloadEntrySpec) -> Option<u16> {
    match &port.target_port {
        Some(TargetPort::Name(name)) => workload.ports.get(name).copied(),
        Some(TargetPort::Number(n)) => Some(
            port.name
                .as_ref()
                .and_then(|name| workload.ports.get(name).copied())
                .unwrap_or(*n),
        ),
        None => Some(
            port.name
                .as_ref()
                .and_then(|name| workload.ports.get(name).copied())
                .unwrap_or(port.port),
        ),
    }
}

fn route_match(m: &HttpMatch) -> RouteMatch {
    let path_specifier = match &m.uri {
        Some(StringMatch { exact: Some(p), .. }) => route_match::PathSpecifier::Path(p.clone()),
        Some(StringMatch { regex: Some(re), .. }) => route_match::PathSpecifier::SafeRegex(regex(re)),
        Some(StringMatch { prefix: Some(p), .. }) => route_match::PathSpecifier::Prefix(p.clone()),
        _ => route_match::PathSpecifier::Prefix("/".into()),
    };
    let mut headers: Vec<HeaderMatcher> = m
        .headers
        .iter()
        .map(|(name, sm)| header(name, sm, false))
        .collect();
    headers.extend(m.without_headers.iter().map(|(name, sm)| header(name, sm, true)));
    if let Some(method) = &m.method {
        headers.push(header(":method", method, false));
    }
    RouteMatch {
        path_specifier: Some(path_specifier),
        headers,
        ..Default::default()
    }
}

fn prefix_match(prefix: &str) -> RouteMatch {
    RouteMatch {
        path_specifier: Some(route_match::PathSpecifier::Prefix(prefix.into())),
        ..Default::default()
    }
}

fn header(name: &str, sm: &StringMatch, invert: bool) -> HeaderMatcher {
    let pattern = match sm {
        StringMatch { exact: Some(v), .. } => string_matcher::MatchPattern::Exact(v.clone()),
        StringMatch { prefix: Some(v), .. } => string_matcher::MatchPattern::Prefix(v.clone()),
        StringMatch { regex: Some(re), .. } => string_matcher::MatchPattern::SafeRegex(regex(re)),
        _ => string_matcher::MatchPattern::Prefix(String::new()),
    };
    HeaderMatcher {
        name: name.to_ascii_lowercase(),
        header_match_specifier: Some(header_matcher::HeaderMatchSpecifier::StringMatch(StringMatcher {
            match_pattern: Some(pattern),
            ignore_case: false,
        })),
        invert_match: invert,
        ..Default::default()
    }
}

fn regex(pattern: &str) -> RegexMatcher {
    RegexMatcher {
        regex: pattern.to_owned(),
        ..Default::default()
    }
}

/// Istio disables Envoy's 15 s default route timeout unless the VirtualService sets one.
/// A VirtualService's `retries` as Envoy's retry policy: `retryOn`'s status codes become
/// `retriable_status_codes`, and without `retryOn` Istio's default conditions apply.
fn retry_policy(
    retry_on: Option<&IstioRetryOn>,
    attempts: u32,
    per_try_timeout: Option<Duration>,
) -> RetryPolicy {
    let (conditions, codes) = match retry_on {
        Some(on) => (on.conditions.to_string(), on.status_codes.clone()),
        None => (
            ISTIO_DEFAULT_RETRY_ON.to_owned(),
            vec![ISTIO_DEFAULT_RETRIABLE_STATUS],
        ),
    };
    RetryPolicy {
        retry_on: conditions,
        retriable_status_codes: codes,
        num_retries: Some(UInt32Value { value: attempts }),
        per_try_timeout: per_try_timeout.map(duration),
        ..Default::default()
    }
}

fn route_to(
    name: String,
    matcher: RouteMatch,
    clusters: Vec<(String, u32)>,
    timeout: Option<Duration>,
    retry_policy: Option<RetryPolicy>,
) -> Route {
    let cluster_specifier = if let [(single, _)] = clusters.as_slice() {
        route_action::ClusterSpecifier::Cluster(single.clone())
    } else {
        route_action::ClusterSpecifier::WeightedClusters(WeightedCluster {
            clusters: clusters
                .into_iter()
                .map(|(name, weight)| weighted_cluster::ClusterWeight {
                    name,
                    weight: Some(UInt32Value { value: weight }),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
    };
    Route {
        name,
        r#match: Some(matcher),
        action: Some(route::Action::Route(RouteAction {
            cluster_specifier: Some(cluster_specifier),
            timeout: Some(duration(timeout.unwrap_or(Duration::ZERO))),
            retry_policy,
            ..Default::default()
        })),
        ..Default::default()
    }
}

fn filter_chain(filter: Any) -> FilterChain {
    let name = if filter.type_url.ends_with("HttpConnectionManager") {
        "envoy.filters.network.http_connection_manager"
    } else {
        "envoy.filters.network.tcp_proxy"
    };
    FilterChain {
        filters: vec![Filter {
            name: name.into(),
            config_type: Some(filter::ConfigType::TypedConfig(filter)),
        }],
        ..Default::default()
    }
}

fn router() -> HttpFilter {
    HttpFilter {
        name: ROUTER_FILTER.into(),
        config_type: Some(http_filter::ConfigType::TypedConfig(Any {
            type_url: ROUTER_TYPE_URL.into(),
            value: Vec::new(),
        })),
        ..Default::default()
    }
}

fn hcm_rds(route_name: &str, access_log: &[AccessLog]) -> Any {
    pack_any(HttpConnectionManager {
        access_log: access_log.to_vec(),
        stat_prefix: format!("outbound_0.0.0.0_{route_name}"),
        route_specifier: Some(http_connection_manager::RouteSpecifier::Rds(Rds {
            config_source: Some(ads()),
            route_config_name: route_name.into(),
        })),
        http_filters: vec![router()],
        ..Default::default()
    })
}

fn hcm_inline(cluster: &str, rbac: &[HttpFilter], access_log: &[AccessLog]) -> Any {
    let route = route_to(
        "default".into(),
        prefix_match("/"),
        vec![(cluster.to_owned(), 100)],
        None,
        None,
    );
    pack_any(HttpConnectionManager {
        access_log: access_log.to_vec(),
        stat_prefix: cluster.into(),
        route_specifier: Some(http_connection_manager::RouteSpecifier::RouteConfig(
            RouteConfiguration {
                name: cluster.into(),
                virtual_hosts: vec![VirtualHost {
                    name: cluster.into(),
                    domains: vec!["*".into()],
                    routes: vec![route],
                    ..Default::default()
                }],
                ..Default::default()
            },
        )),
        http_filters: rbac.iter().cloned().chain([router()]).collect(),
        ..Default::default()
    })
}

fn tcp_proxy(cluster: &str, access_log: &[AccessLog]) -> Any {
    pack_any(TcpProxy {
        access_log: access_log.to_vec(),
        stat_prefix: cluster.into(),
        cluster_specifier: Some(tcp_proxy::ClusterSpecifier::Cluster(cluster.into())),
        ..Default::default()
    })
}

fn ads() -> ConfigSource {
    ConfigSource {
        resource_api_version: ApiVersion::V3 as i32,
        config_source_specifier: Some(config_source::ConfigSourceSpecifier::Ads(
            AggregatedConfigSource {},
        )),
        ..Default::default()
    }
}

fn socket(ip: &str, port: u32) -> Address {
    Address {
        address: Some(address::Address::SocketAddress(SocketAddress {
            address: ip.into(),
            port_specifier: Some(socket_address::PortSpecifier::PortValue(port)),
            ..Default::default()
        })),
    }
}

fn duration(d: Duration) -> XDuration {
    XDuration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}
