//! `/config_dump` in Envoy's shape: an `envoy.admin.v3.ConfigDump` rendered in the protobuf JSON
//! mapping (proto field names, `@type` on every `Any`), so `istioctl proxy-config` and other Envoy
//! tooling read it. Resources from xDS appear as received, with their version, arrival time and status
//! (and the last rejected version with the reason); what the proxy file configured appears as static
//! resources of the bootstrap.

use std::net::SocketAddr;
use std::time::SystemTime;

use envoy_types::pb::envoy::admin::v3::{
    BootstrapConfigDump, ClientResourceStatus, ClustersConfigDump, EndpointsConfigDump, ListenersConfigDump,
    RoutesConfigDump, SecretsConfigDump, UpdateFailureState, clusters_config_dump, endpoints_config_dump,
    listeners_config_dump, routes_config_dump, secrets_config_dump,
};
use envoy_types::pb::envoy::config::bootstrap::v3::{Admin, Bootstrap, bootstrap};
use envoy_types::pb::envoy::config::cluster::v3::Cluster as XCluster;
use envoy_types::pb::envoy::config::cluster::v3::cluster::{ClusterDiscoveryType, DiscoveryType, LbPolicy};
use envoy_types::pb::envoy::config::core::v3::{
    Address, ApiConfigSource, ConfigSource, DataSource, GrpcService, SocketAddress, TransportSocket, address,
    api_config_source, config_source, data_source, grpc_service, socket_address, transport_socket,
};
use envoy_types::pb::envoy::config::endpoint::v3::{
    ClusterLoadAssignment, Endpoint as XEndpoint, LbEndpoint, LocalityLbEndpoints, lb_endpoint,
};
use envoy_types::pb::envoy::config::listener::v3::Listener as XListener;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, CommonTlsContext, Secret, TlsCertificate, UpstreamTlsContext,
    common_tls_context, secret,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{StringMatcher, string_matcher};
use envoy_types::pb::google::protobuf::{Any, Duration as XDuration, Struct, Timestamp, UInt32Value, Value};
use envoy_types::util::pack_any;
use prost::Message;
use prost_reflect::{DescriptorPool, DynamicMessage, SerializeOptions};
use weft_model::{Cluster, Mesh, Node};

use crate::ResourceType;
use crate::client::{XdsStatus, node as xds_node};
use crate::received::{Received, Rejected};

/// Envoy's descriptors for what a dump can hold (see `build.rs`); loaded for each dump and dropped.
static DESCRIPTORS: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/envoy_descriptors.bin"));

/// What the proxy runs with, as the dump shows it.
#[derive(Debug)]
pub struct DumpInputs<'a> {
    pub node: &'a Node,
    pub admin: SocketAddr,
    /// The control plane's address and the xDS client's state; `None` without xDS.
    pub xds: Option<(&'a str, &'a XdsStatus)>,
    /// The model in use: clusters that did not come over xDS are the file's (static).
    pub mesh: &'a Mesh,
    /// Listeners the proxy file configured, as bound.
    pub listeners: &'a [(String, SocketAddr)],
    pub secrets: &'a [DumpSecret],
    pub started: SystemTime,
}

/// A certificate (and its key, which is never shown) or a trust bundle, as Envoy's SDS secrets.
#[derive(Debug, Clone)]
pub struct DumpSecret {
    /// Istio's names: `default` for the workload certificate, `ROOTCA` for the trust bundle.
    pub name: String,
    pub certificate_chain_pem: Option<String>,
    pub trusted_ca_pem: Option<String>,
    pub last_updated: SystemTime,
}

/// Envoy's query parameters.
#[derive(Debug, Clone, Default)]
pub struct DumpQuery {
    /// `?include_eds`: also the endpoints.
    pub include_eds: bool,
    /// `?resource=dynamic_active_clusters`: only that repeated field's entries, each a config.
    pub resource: Option<String>,
    /// `?mask=a.b,c`: only these fields (of each resource when `resource` is given).
    pub mask: Vec<String>,
}

impl DumpQuery {
    /// From `/config_dump`'s query string; an unknown parameter is an error naming it.
    pub fn parse(query: &str) -> Result<Self, DumpError> {
        let mut parsed = Self::default();
        for (key, value) in form_urlencoded::parse(query.as_bytes()) {
            match key.as_ref() {
                "include_eds" => parsed.include_eds = value.is_empty() || value == "true",
                "resource" => parsed.resource = Some(value.into_owned()),
                "mask" => parsed.mask = value.split(',').map(str::to_owned).collect(),
                other => return Err(DumpError::Parameter(other.to_owned())),
            }
        }
        Ok(parsed)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DumpError {
    #[error("unknown parameter \"{0}\" (include_eds, resource, mask)")]
    Parameter(String),
    #[error("the config dump cannot be rendered: {0}")]
    Render(String),
    #[error("no config has a repeated field \"{0}\"")]
    UnknownResource(String),
}

/// The dump as JSON.
pub fn config_dump(inputs: &DumpInputs<'_>, query: &DumpQuery) -> Result<serde_json::Value, DumpError> {
    let pool = DescriptorPool::decode(DESCRIPTORS).map_err(|e| DumpError::Render(e.to_string()))?;
    let mut configs = vec![
        pack_any(bootstrap(inputs)),
        pack_any(clusters(inputs)),
        pack_any(listeners(inputs)),
        pack_any(routes(inputs)),
    ];
    if query.include_eds {
        configs.push(pack_any(endpoints(inputs)));
    }
    configs.push(pack_any(secrets(inputs)));
    let mut configs: Vec<serde_json::Value> = configs
        .iter()
        .map(|config| render(&pool, config))
        .collect::<Result<_, _>>()?;
    if let Some(field) = &query.resource {
        let entries: Vec<serde_json::Value> = configs
            .iter()
            .filter_map(|c| c.get(field.as_str()).and_then(|v| v.as_array()))
            .flatten()
            .cloned()
            .collect();
        let known = configs.iter().any(|c| c.get(field.as_str()).is_some())
            || RESOURCE_FIELDS.iter().any(|(name, _)| name == field);
        if !known {
            return Err(DumpError::UnknownResource(field.clone()));
        }
        let element = RESOURCE_FIELDS
            .iter()
            .find(|(name, _)| name == field)
            .map(|(_, ty)| *ty);
        configs = entries
            .into_iter()
            .map(|mut entry| {
                if let (Some(ty), Some(map)) = (element, entry.as_object_mut()) {
                    map.insert("@type".into(), format!("type.googleapis.com/{ty}").into());
                }
                entry
            })
            .collect();
    }
    if !query.mask.is_empty() {
        for config in &mut configs {
            *config = masked(config, &query.mask);
        }
    }
    Ok(serde_json::json!({ "configs": configs }))
}

/// The repeated fields `?resource=` may name, and the message of their entries.
const RESOURCE_FIELDS: &[(&str, &str)] = &[
    (
        "static_clusters",
        "envoy.admin.v3.ClustersConfigDump.StaticCluster",
    ),
    (
        "dynamic_active_clusters",
        "envoy.admin.v3.ClustersConfigDump.DynamicCluster",
    ),
    (
        "dynamic_warming_clusters",
        "envoy.admin.v3.ClustersConfigDump.DynamicCluster",
    ),
    (
        "static_listeners",
        "envoy.admin.v3.ListenersConfigDump.StaticListener",
    ),
    (
        "dynamic_listeners",
        "envoy.admin.v3.ListenersConfigDump.DynamicListener",
    ),
    (
        "static_route_configs",
        "envoy.admin.v3.RoutesConfigDump.StaticRouteConfig",
    ),
    (
        "dynamic_route_configs",
        "envoy.admin.v3.RoutesConfigDump.DynamicRouteConfig",
    ),
    (
        "static_endpoint_configs",
        "envoy.admin.v3.EndpointsConfigDump.StaticEndpointConfig",
    ),
    (
        "dynamic_endpoint_configs",
        "envoy.admin.v3.EndpointsConfigDump.DynamicEndpointConfig",
    ),
    (
        "dynamic_active_secrets",
        "envoy.admin.v3.SecretsConfigDump.DynamicSecret",
    ),
];

/// Only the fields `paths` name (dot-separated, proto names), keeping each `@type` on the way.
fn masked(value: &serde_json::Value, paths: &[String]) -> serde_json::Value {
    let mut out = serde_json::Map::new();
    if let Some(ty) = value.get("@type") {
        out.insert("@type".into(), ty.clone());
    }
    for path in paths {
        let mut parts = path.split('.').peekable();
        let (mut from, mut to) = (value, &mut out);
        while let Some(part) = parts.next() {
            let Some(next) = from.get(part) else { break };
            if parts.peek().is_none() {
                to.insert(part.to_owned(), next.clone());
                break;
            }
            let entry = to.entry(part.to_owned()).or_insert_with(|| {
                // A nested `Any` keeps its type, so the masked dump still decodes.
                let kept = next.get("@type").map(|ty| ("@type".to_owned(), ty.clone()));
                serde_json::Value::Object(kept.into_iter().collect())
            });
            let Some(map) = entry.as_object_mut() else { break };
            (from, to) = (next, map);
        }
    }
    serde_json::Value::Object(out)
}

/// One config in the protobuf JSON mapping. A resource holding an `Any` of a type the proxy has no
/// descriptor for (an optional filter it skipped) is shown as a `google.protobuf.Struct` saying so,
/// rather than failing the whole dump.
fn render(pool: &DescriptorPool, config: &Any) -> Result<serde_json::Value, DumpError> {
    let options = SerializeOptions::new().use_proto_field_name(true);
    let to_json = |any: &Any| -> Result<serde_json::Value, String> {
        let mut json = message_json(pool, any, &options)?;
        if let Some(map) = json.as_object_mut() {
            map.insert("@type".into(), any.type_url.clone().into());
        }
        Ok(json)
    };
    match to_json(config) {
        Ok(json) => Ok(json),
        Err(first) => {
            // Find the resources that cannot be rendered and stand a note in for each.
            let repaired = repair(config, &|any| to_json(any).err()).ok_or(DumpError::Render(first))?;
            to_json(&repaired).map_err(DumpError::Render)
        }
    }
}

/// The message inside `any` in the protobuf JSON mapping.
fn message_json(
    pool: &DescriptorPool,
    any: &Any,
    options: &SerializeOptions,
) -> Result<serde_json::Value, String> {
    let name = any.type_url.rsplit('/').next().unwrap_or_default();
    let descriptor = pool
        .get_message_by_name(name)
        .ok_or_else(|| format!("no descriptor for {name}"))?;
    let message = DynamicMessage::decode(descriptor, any.value.as_slice()).map_err(|e| e.to_string())?;
    message
        .serialize_with_options(serde_json::value::Serializer, options)
        .map_err(|e| e.to_string())
}

/// `config` with each resource that `fails` replaced by a note; `None` if `config` is not a dump.
fn repair(config: &Any, fails: &dyn Fn(&Any) -> Option<String>) -> Option<Any> {
    let fix = |slot: &mut Option<Any>| {
        if let Some(any) = slot.as_ref()
            && let Some(reason) = fails(any)
        {
            *slot = Some(unrendered(&any.type_url, &reason));
        }
    };
    if let Ok(mut dump) = ClustersConfigDump::decode(config.value.as_slice())
        && config.type_url.ends_with(".ClustersConfigDump")
    {
        dump.static_clusters.iter_mut().for_each(|c| fix(&mut c.cluster));
        for cluster in &mut dump.dynamic_active_clusters {
            fix(&mut cluster.cluster);
            if let Some(error) = &mut cluster.error_state {
                fix(&mut error.failed_configuration);
            }
        }
        return Some(pack_any(dump));
    }
    if let Ok(mut dump) = ListenersConfigDump::decode(config.value.as_slice())
        && config.type_url.ends_with(".ListenersConfigDump")
    {
        dump.static_listeners
            .iter_mut()
            .for_each(|l| fix(&mut l.listener));
        for listener in &mut dump.dynamic_listeners {
            if let Some(state) = &mut listener.active_state {
                fix(&mut state.listener);
            }
            if let Some(error) = &mut listener.error_state {
                fix(&mut error.failed_configuration);
            }
        }
        return Some(pack_any(dump));
    }
    if let Ok(mut dump) = RoutesConfigDump::decode(config.value.as_slice())
        && config.type_url.ends_with(".RoutesConfigDump")
    {
        for route in &mut dump.dynamic_route_configs {
            fix(&mut route.route_config);
            if let Some(error) = &mut route.error_state {
                fix(&mut error.failed_configuration);
            }
        }
        return Some(pack_any(dump));
    }
    None
}

fn unrendered(type_url: &str, reason: &str) -> Any {
    let string = |s: &str| Value {
        kind: Some(envoy_types::pb::google::protobuf::value::Kind::StringValue(
            s.to_owned(),
        )),
    };
    pack_any(Struct {
        fields: [
            ("unrendered_type".to_owned(), string(type_url)),
            ("reason".to_owned(), string(reason)),
        ]
        .into_iter()
        .collect(),
    })
}

/// `at` as a protobuf timestamp.
pub fn timestamp(at: SystemTime) -> Timestamp {
    let since = at.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    Timestamp {
        seconds: i64::try_from(since.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(since.subsec_nanos()).unwrap_or(0),
    }
}

/// `addr` as Envoy's socket address.
pub fn socket(addr: SocketAddr) -> Address {
    Address {
        address: Some(address::Address::SocketAddress(SocketAddress {
            address: addr.ip().to_string(),
            port_specifier: Some(socket_address::PortSpecifier::PortValue(u32::from(addr.port()))),
            ..Default::default()
        })),
    }
}

fn ads() -> ConfigSource {
    ConfigSource {
        config_source_specifier: Some(config_source::ConfigSourceSpecifier::Ads(Default::default())),
        resource_api_version: 2, // V3
        ..Default::default()
    }
}

fn bootstrap(inputs: &DumpInputs<'_>) -> BootstrapConfigDump {
    let dynamic_resources = inputs.xds.map(|(address, _)| bootstrap::DynamicResources {
        ads_config: Some(ApiConfigSource {
            api_type: api_config_source::ApiType::Grpc as i32,
            transport_api_version: 2, // V3
            grpc_services: vec![GrpcService {
                target_specifier: Some(grpc_service::TargetSpecifier::GoogleGrpc(
                    grpc_service::GoogleGrpc {
                        target_uri: address.to_owned(),
                        stat_prefix: "xds".into(),
                        ..Default::default()
                    },
                )),
                ..Default::default()
            }],
            ..Default::default()
        }),
        cds_config: Some(ads()),
        lds_config: Some(ads()),
        ..Default::default()
    });
    BootstrapConfigDump {
        bootstrap: Some(Bootstrap {
            node: Some(xds_node(inputs.node)),
            static_resources: Some(bootstrap::StaticResources {
                listeners: static_listeners(inputs),
                clusters: static_clusters(inputs),
                ..Default::default()
            }),
            dynamic_resources,
            admin: Some(Admin {
                address: Some(socket(inputs.admin)),
                ..Default::default()
            }),
            ..Default::default()
        }),
        last_updated: Some(timestamp(inputs.started)),
    }
}

/// The resources of a type from xDS, by name: the one in use, and the last rejected update of it. A
/// resource whose every version was rejected has only the rejection.
fn dynamic(inputs: &DumpInputs<'_>, ty: ResourceType) -> Vec<(String, Option<Received>, Option<Rejected>)> {
    let Some((_, status)) = inputs.xds else {
        return Vec::new();
    };
    let accepted = status.received.accepted.get(&ty).map(|m| m.as_ref());
    let rejected = status.received.rejected.get(&ty).map(|m| m.as_ref());
    let names: std::collections::BTreeSet<&String> = accepted
        .into_iter()
        .flat_map(|m| m.keys())
        .chain(rejected.into_iter().flat_map(|m| m.keys()))
        .collect();
    names
        .into_iter()
        .map(|name| {
            (
                name.clone(),
                accepted.and_then(|m| m.get(name)).cloned(),
                rejected.and_then(|m| m.get(name)).cloned(),
            )
        })
        .collect()
}

fn error_state(rejected: Option<Rejected>) -> Option<UpdateFailureState> {
    rejected.map(|r| UpdateFailureState {
        failed_configuration: Some(r.resource),
        last_update_attempt: Some(timestamp(r.attempted)),
        details: r.details,
        version_info: r.version_info,
    })
}

/// The version, resource and arrival time of the resource in use, if one is.
fn active(received: Option<Received>) -> (String, Option<Any>, Option<Timestamp>) {
    match received {
        Some(r) => (r.version_info, Some(r.resource), Some(timestamp(r.last_updated))),
        None => (String::new(), None, None),
    }
}

fn status(error: &Option<UpdateFailureState>) -> i32 {
    if error.is_some() {
        ClientResourceStatus::Nacked as i32
    } else {
        ClientResourceStatus::Acked as i32
    }
}

fn version(inputs: &DumpInputs<'_>, ty: ResourceType) -> String {
    inputs
        .xds
        .and_then(|(_, s)| s.types.get(&ty))
        .map(|t| t.accepted_version.clone())
        .unwrap_or_default()
}

fn is_dynamic(inputs: &DumpInputs<'_>, ty: ResourceType, name: &str) -> bool {
    inputs
        .xds
        .and_then(|(_, s)| s.received.accepted.get(&ty))
        .is_some_and(|m| m.contains_key(name))
}

/// The file's clusters (those the control plane did not send), as Envoy static clusters.
fn static_clusters(inputs: &DumpInputs<'_>) -> Vec<XCluster> {
    inputs
        .mesh
        .clusters
        .values()
        .filter(|c| !is_dynamic(inputs, ResourceType::Cluster, &c.name))
        .map(|c| envoy_cluster(c))
        .collect()
}

fn envoy_cluster(cluster: &Cluster) -> XCluster {
    let lb_endpoints = cluster
        .endpoints
        .iter()
        .map(|e| LbEndpoint {
            host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(XEndpoint {
                address: Some(socket(e.address)),
                ..Default::default()
            })),
            load_balancing_weight: Some(UInt32Value { value: e.weight }),
            ..Default::default()
        })
        .collect();
    let transport_socket = cluster.tls.as_ref().map(|tls| {
        #[allow(deprecated)]
        let validation = CertificateValidationContext {
            match_subject_alt_names: tls
                .identities
                .iter()
                .map(|id| StringMatcher {
                    match_pattern: Some(string_matcher::MatchPattern::Exact(id.to_string())),
                    ignore_case: false,
                })
                .collect(),
            ..Default::default()
        };
        TransportSocket {
            name: "envoy.transport_sockets.tls".into(),
            config_type: Some(transport_socket::ConfigType::TypedConfig(pack_any(
                UpstreamTlsContext {
                    common_tls_context: Some(CommonTlsContext {
                        validation_context_type: Some(
                            common_tls_context::ValidationContextType::ValidationContext(validation),
                        ),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
            ))),
        }
    });
    XCluster {
        name: cluster.name.clone(),
        cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Static as i32)),
        connect_timeout: Some(XDuration {
            seconds: i64::try_from(cluster.connect_timeout.as_secs()).unwrap_or(i64::MAX),
            nanos: i32::try_from(cluster.connect_timeout.subsec_nanos()).unwrap_or(0),
        }),
        lb_policy: match cluster.lb_policy {
            weft_model::LbPolicy::RoundRobin => LbPolicy::RoundRobin,
            weft_model::LbPolicy::LeastRequest => LbPolicy::LeastRequest,
            weft_model::LbPolicy::Random => LbPolicy::Random,
        } as i32,
        load_assignment: Some(ClusterLoadAssignment {
            cluster_name: cluster.name.clone(),
            endpoints: vec![LocalityLbEndpoints {
                lb_endpoints,
                ..Default::default()
            }],
            ..Default::default()
        }),
        transport_socket,
        ..Default::default()
    }
}

fn static_listeners(inputs: &DumpInputs<'_>) -> Vec<XListener> {
    inputs
        .listeners
        .iter()
        .map(|(name, addr)| XListener {
            name: name.clone(),
            address: Some(socket(*addr)),
            ..Default::default()
        })
        .collect()
}

fn clusters(inputs: &DumpInputs<'_>) -> ClustersConfigDump {
    let started = Some(timestamp(inputs.started));
    ClustersConfigDump {
        version_info: version(inputs, ResourceType::Cluster),
        static_clusters: static_clusters(inputs)
            .into_iter()
            .map(|c| clusters_config_dump::StaticCluster {
                cluster: Some(pack_any(c)),
                last_updated: started,
            })
            .collect(),
        dynamic_active_clusters: dynamic(inputs, ResourceType::Cluster)
            .into_iter()
            .map(|(_, received, rejected)| {
                let error_state = error_state(rejected);
                let (version_info, cluster, last_updated) = active(received);
                clusters_config_dump::DynamicCluster {
                    client_status: status(&error_state),
                    version_info,
                    cluster,
                    last_updated,
                    error_state,
                }
            })
            .collect(),
        dynamic_warming_clusters: Vec::new(),
    }
}

fn listeners(inputs: &DumpInputs<'_>) -> ListenersConfigDump {
    let started = Some(timestamp(inputs.started));
    ListenersConfigDump {
        version_info: version(inputs, ResourceType::Listener),
        static_listeners: static_listeners(inputs)
            .into_iter()
            .map(|l| listeners_config_dump::StaticListener {
                listener: Some(pack_any(l)),
                last_updated: started,
            })
            .collect(),
        dynamic_listeners: dynamic(inputs, ResourceType::Listener)
            .into_iter()
            .map(|(name, received, rejected)| {
                let error_state = error_state(rejected);
                listeners_config_dump::DynamicListener {
                    name,
                    client_status: status(&error_state),
                    active_state: received.map(|received| listeners_config_dump::DynamicListenerState {
                        version_info: received.version_info,
                        listener: Some(received.resource),
                        last_updated: Some(timestamp(received.last_updated)),
                    }),
                    error_state,
                    ..Default::default()
                }
            })
            .collect(),
    }
}

fn routes(inputs: &DumpInputs<'_>) -> RoutesConfigDump {
    RoutesConfigDump {
        static_route_configs: Vec::new(),
        dynamic_route_configs: dynamic(inputs, ResourceType::RouteConfiguration)
            .into_iter()
            .map(|(_, received, rejected)| {
                let error_state = error_state(rejected);
                let (version_info, route_config, last_updated) = active(received);
                routes_config_dump::DynamicRouteConfig {
                    client_status: status(&error_state),
                    version_info,
                    route_config,
                    last_updated,
                    error_state,
                }
            })
            .collect(),
    }
}

fn endpoints(inputs: &DumpInputs<'_>) -> EndpointsConfigDump {
    let started = Some(timestamp(inputs.started));
    EndpointsConfigDump {
        static_endpoint_configs: static_clusters(inputs)
            .into_iter()
            .filter_map(|c| c.load_assignment)
            .map(|cla| endpoints_config_dump::StaticEndpointConfig {
                endpoint_config: Some(pack_any(cla)),
                last_updated: started,
            })
            .collect(),
        dynamic_endpoint_configs: dynamic(inputs, ResourceType::ClusterLoadAssignment)
            .into_iter()
            .map(|(_, received, rejected)| {
                let error_state = error_state(rejected);
                let (version_info, endpoint_config, last_updated) = active(received);
                endpoints_config_dump::DynamicEndpointConfig {
                    client_status: status(&error_state),
                    version_info,
                    endpoint_config,
                    last_updated,
                    error_state,
                }
            })
            .collect(),
    }
}

/// Secrets as Envoy shows them: certificates and roots inline, a private key only as `[redacted]`.
fn secrets(inputs: &DumpInputs<'_>) -> SecretsConfigDump {
    let bytes = |pem: &str| DataSource {
        specifier: Some(data_source::Specifier::InlineBytes(pem.as_bytes().to_vec())),
        ..Default::default()
    };
    SecretsConfigDump {
        dynamic_active_secrets: inputs
            .secrets
            .iter()
            .filter_map(|s| {
                let kind = match (&s.certificate_chain_pem, &s.trusted_ca_pem) {
                    (Some(chain), _) => secret::Type::TlsCertificate(TlsCertificate {
                        certificate_chain: Some(bytes(chain)),
                        private_key: Some(DataSource {
                            specifier: Some(data_source::Specifier::InlineString("[redacted]".into())),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }),
                    (None, Some(roots)) => secret::Type::ValidationContext(CertificateValidationContext {
                        trusted_ca: Some(bytes(roots)),
                        ..Default::default()
                    }),
                    (None, None) => return None,
                };
                Some(secrets_config_dump::DynamicSecret {
                    name: s.name.clone(),
                    version_info: String::new(),
                    last_updated: Some(timestamp(s.last_updated)),
                    secret: Some(pack_any(Secret {
                        name: s.name.clone(),
                        r#type: Some(kind),
                    })),
                    client_status: ClientResourceStatus::Acked as i32,
                    ..Default::default()
                })
            })
            .collect(),
        ..Default::default()
    }
}

/// Envoy's `/server_info` (`envoy.admin.v3.ServerInfo`): version, state, uptime and node.
pub fn server_info(
    node: &Node,
    started: SystemTime,
    state: envoy_types::pb::envoy::admin::v3::server_info::State,
) -> Result<serde_json::Value, DumpError> {
    use envoy_types::pb::envoy::admin::v3::ServerInfo;
    let uptime = started.elapsed().unwrap_or_default();
    let uptime = XDuration {
        seconds: i64::try_from(uptime.as_secs()).unwrap_or(i64::MAX),
        nanos: 0,
    };
    let info = ServerInfo {
        version: concat!("weft/", env!("CARGO_PKG_VERSION")).into(),
        state: state as i32,
        uptime_current_epoch: Some(uptime),
        uptime_all_epochs: Some(uptime),
        node: Some(xds_node(node)),
        ..Default::default()
    };
    admin_json(info)
}

/// One of Envoy's admin messages (`envoy.admin.v3.Clusters`, `Certificates`, `Listeners`,
/// `ServerInfo`...) in the protobuf JSON mapping, every field printed as Envoy prints them (`state:
/// LIVE`, the enum's zero, included).
pub fn admin_json<M: prost::Name>(message: M) -> Result<serde_json::Value, DumpError> {
    let pool = DescriptorPool::decode(DESCRIPTORS).map_err(|e| DumpError::Render(e.to_string()))?;
    let options = SerializeOptions::new()
        .use_proto_field_name(true)
        .skip_default_fields(false);
    message_json(&pool, &pack_any(message), &options).map_err(DumpError::Render)
}

/// Reads an admin message back from its JSON, as Envoy's tools do (for tests).
#[doc(hidden)]
pub fn decode_admin<M: prost::Name + Default>(json: &serde_json::Value) -> Result<M, String> {
    let pool = DescriptorPool::decode(DESCRIPTORS).map_err(|e| e.to_string())?;
    let descriptor = pool
        .get_message_by_name(&M::full_name())
        .ok_or_else(|| format!("no descriptor for {}", M::full_name()))?;
    let message = DynamicMessage::deserialize(descriptor, json).map_err(|e| e.to_string())?;
    M::decode(message.encode_to_vec().as_slice()).map_err(|e| e.to_string())
}
