use envoy_types::pb::envoy::config::cluster::v3::cluster::EdsClusterConfig;
use envoy_types::pb::envoy::config::core::v3::{SocketAddress, socket_address};
use envoy_types::pb::envoy::config::endpoint::v3::{Endpoint as XEndpoint, LbEndpoint, LocalityLbEndpoints};
use envoy_types::pb::envoy::config::listener::v3::Filter;
use envoy_types::pb::envoy::config::route::v3::{
    Route as XRoute, RouteAction as XRouteAction, RouteMatch as XRouteMatch, VirtualHost as XVirtualHost,
    WeightedCluster as XWeightedCluster, route_action, weighted_cluster::ClusterWeight,
};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::Rds;
use envoy_types::pb::google::protobuf::{BoolValue, UInt32Value};
use envoy_types::util::pack_any;

use envoy_types::pb::envoy::config::cluster::v3::Cluster as XCluster;
use envoy_types::pb::envoy::config::cluster::v3::cluster::{
    ClusterDiscoveryType, DiscoveryType, LbPolicy as XLbPolicy,
};
use envoy_types::pb::envoy::config::core::v3::Address;
use envoy_types::pb::envoy::config::core::v3::HealthStatus;
use envoy_types::pb::envoy::config::core::v3::address::Address as XAddressKind;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::endpoint::v3::lb_endpoint::HostIdentifier;
use envoy_types::pb::envoy::extensions::upstreams::http::v3::HttpProtocolOptions;
use envoy_types::pb::google::protobuf::Any;
use weft_model::{CircuitBreakers, LbPolicy};

use super::*;
use crate::state::XdsState;

fn address(ip: &str, port: u32) -> Address {
    Address {
        address: Some(XAddressKind::SocketAddress(SocketAddress {
            address: ip.into(),
            port_specifier: Some(socket_address::PortSpecifier::PortValue(port)),
            ..Default::default()
        })),
    }
}

fn chain(filter: Any) -> FilterChain {
    FilterChain {
        filters: vec![Filter {
            name: "f".into(),
            config_type: Some(ConfigType::TypedConfig(filter)),
        }],
        ..Default::default()
    }
}

fn hcm_rds(route: &str) -> Any {
    pack_any(HttpConnectionManager {
        stat_prefix: "x".into(),
        route_specifier: Some(RouteSpecifier::Rds(Rds {
            route_config_name: route.into(),
            config_source: None,
        })),
        ..Default::default()
    })
}

fn tcp_proxy(cluster: &str) -> Any {
    pack_any(TcpProxy {
        stat_prefix: "x".into(),
        cluster_specifier: Some(TcpClusterSpecifier::Cluster(cluster.into())),
        ..Default::default()
    })
}

fn service_listener(name: &str, port: u32, chains: Vec<FilterChain>) -> Listener {
    Listener {
        name: name.into(),
        address: Some(address("0.0.0.0", port)),
        filter_chains: chains,
        bind_to_port: Some(BoolValue { value: false }),
        ..Default::default()
    }
}

fn weighted_route(prefix: &str, clusters: &[(&str, u32)]) -> XRoute {
    XRoute {
        r#match: Some(XRouteMatch {
            path_specifier: Some(PathSpecifier::Prefix(prefix.into())),
            ..Default::default()
        }),
        action: Some(Action::Route(XRouteAction {
            cluster_specifier: Some(route_action::ClusterSpecifier::WeightedClusters(
                XWeightedCluster {
                    clusters: clusters
                        .iter()
                        .map(|(n, w)| ClusterWeight {
                            name: (*n).into(),
                            weight: Some(UInt32Value { value: *w }),
                            ..Default::default()
                        })
                        .collect(),
                    ..Default::default()
                },
            )),
            ..Default::default()
        })),
        ..Default::default()
    }
}

fn eds_cluster(name: &str) -> XCluster {
    XCluster {
        name: name.into(),
        cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Eds as i32)),
        eds_cluster_config: Some(EdsClusterConfig {
            service_name: String::new(),
            eds_config: None,
        }),
        lb_policy: XLbPolicy::LeastRequest as i32,
        ..Default::default()
    }
}

fn cla(name: &str, endpoints: &[(&str, u32, HealthStatus)]) -> ClusterLoadAssignment {
    ClusterLoadAssignment {
        cluster_name: name.into(),
        endpoints: vec![LocalityLbEndpoints {
            lb_endpoints: endpoints
                .iter()
                .map(|(addr, weight, health)| {
                    let sa: SocketAddr = addr.parse().unwrap();
                    LbEndpoint {
                        host_identifier: Some(HostIdentifier::Endpoint(XEndpoint {
                            address: Some(address(&sa.ip().to_string(), u32::from(sa.port()))),
                            ..Default::default()
                        })),
                        health_status: *health as i32,
                        load_balancing_weight: Some(UInt32Value { value: *weight }),
                        ..Default::default()
                    }
                })
                .collect(),
            ..Default::default()
        }],
        ..Default::default()
    }
}

#[test]
fn http_and_tcp_service_listeners() {
    let http = listener(&service_listener(
        "0.0.0.0_9080",
        9080,
        vec![chain(hcm_rds("9080"))],
    ))
    .unwrap();
    assert_eq!(
        http,
        ListenerSpec::Service {
            address: "0.0.0.0:9080".parse().unwrap(),
            http: Some(RouteRef::Rds("9080".into())),
            http_settings: weft_model::HttpSettings::default(),
            tcp_cluster: None,
            protocol: Protocol::Http,
            access_log: weft_telemetry::access_log::AccessLogSet::off(),
            tracing: None,
        }
    );
    let both = listener(&service_listener(
        "10.0.0.1_3306",
        3306,
        vec![chain(hcm_rds("r")), chain(tcp_proxy("db"))],
    ))
    .unwrap();
    let ListenerSpec::Service {
        protocol,
        tcp_cluster,
        ..
    } = both
    else {
        panic!()
    };
    assert_eq!(
        (protocol, tcp_cluster.as_deref()),
        (Protocol::Detect, Some("db")),
        "both chains: detect"
    );
}

#[test]
fn capture_listeners() {
    let outbound = Listener {
        name: VIRTUAL_OUTBOUND.into(),
        address: Some(address("0.0.0.0", 15001)),
        use_original_dst: Some(BoolValue { value: true }),
        default_filter_chain: Some(chain(tcp_proxy(BLACKHOLE_CLUSTER))),
        ..Default::default()
    };
    assert_eq!(
        listener(&outbound).unwrap(),
        ListenerSpec::VirtualOutbound {
            egress: Egress::RegistryOnly,
            access_log: weft_telemetry::access_log::AccessLogSet::off(),
        }
    );

    let mut http_port = chain(hcm_rds("inbound"));
    http_port.filter_chain_match = Some(envoy_types::pb::envoy::config::listener::v3::FilterChainMatch {
        destination_port: Some(UInt32Value { value: 9080 }),
        ..Default::default()
    });
    let inbound = Listener {
        name: VIRTUAL_INBOUND.into(),
        filter_chains: vec![http_port],
        ..Default::default()
    };
    let ListenerSpec::VirtualInbound { ports, .. } = listener(&inbound).unwrap() else {
        panic!()
    };
    assert_eq!(ports.get(&9080), Some(&Protocol::Http));
}

#[test]
fn unsupported_listeners_are_rejected_precisely() {
    let mut bound = service_listener("l", 80, vec![chain(hcm_rds("r"))]);
    bound.bind_to_port = Some(BoolValue { value: true });
    assert_eq!(listener(&bound).unwrap_err().field, "bind_to_port");

    let odd = service_listener("l", 80, vec![chain(pack_any(UInt32Value { value: 1 }))]);
    let err = listener(&odd).unwrap_err();
    assert_eq!(err.field, "filter_chains[0].filters[0].typed_config");
    assert!(
        err.problem
            .contains("unsupported network filter google.protobuf.UInt32Value"),
        "{}",
        err.problem
    );
    assert_eq!(
        err.to_string(),
        format!("Listener \"l\": {}: {}", err.field, err.problem)
    );
}

#[test]
fn routes_with_weights_headers_and_timeouts() {
    let mut canary = weighted_route("/", &[("v2", 1)]);
    canary.r#match.as_mut().unwrap().headers = vec![HeaderMatcher {
        name: "X-Canary".into(),
        header_match_specifier: Some(HeaderMatchSpecifier::StringMatch(StringMatcher {
            match_pattern: Some(MatchPattern::Exact("true".into())),
            ignore_case: false,
        })),
        ..Default::default()
    }];
    let mut split = weighted_route("/", &[("v1", 90), ("v2", 10)]);
    if let Some(Action::Route(a)) = &mut split.action {
        a.timeout = Some(XDuration { seconds: 0, nanos: 0 });
    }
    let rc = RouteConfiguration {
        name: "9080".into(),
        virtual_hosts: vec![XVirtualHost {
            name: "orders".into(),
            domains: vec!["Orders".into()],
            routes: vec![canary, split],
            ..Default::default()
        }],
        ..Default::default()
    };
    let table = route_configuration(&rc).unwrap();
    let vhost = &table.virtual_hosts()[0];
    assert_eq!(vhost.domains, ["orders"]);
    assert_eq!(vhost.routes[0].matcher.headers[0].name, "x-canary");
    assert_eq!(
        vhost.routes[0].action.timeout,
        Some(DEFAULT_ROUTE_TIMEOUT),
        "unset: Envoy's 15 s"
    );
    assert_eq!(vhost.routes[1].action.timeout, None, "0 disables");
    assert_eq!(
        vhost.routes[1]
            .action
            .clusters
            .iter()
            .map(|c| c.weight)
            .collect::<Vec<_>>(),
        [90, 10]
    );
}

#[test]
fn unsupported_route_actions_name_the_route() {
    let mut r = weighted_route("/", &[("v1", 1)]);
    r.action = Some(Action::Redirect(Default::default()));
    let rc = RouteConfiguration {
        name: "80".into(),
        virtual_hosts: vec![XVirtualHost {
            name: "a".into(),
            domains: vec!["*".into()],
            routes: vec![weighted_route("/", &[("v1", 1)]), r],
            ..Default::default()
        }],
        ..Default::default()
    };
    let err = route_configuration(&rc).unwrap_err();
    assert_eq!(
        (err.kind, err.name.as_str(), err.field.as_str()),
        ("RouteConfiguration", "80", "virtual_hosts[0].routes[1].action")
    );
}

#[test]
fn clusters_and_endpoints() {
    let spec = cluster(&eds_cluster("outbound|80||orders")).unwrap();
    assert_eq!(spec.eds_name.as_deref(), Some("outbound|80||orders"));
    assert_eq!(spec.lb_policy, LbPolicy::LeastRequest);
    let mut dns = eds_cluster("dns");
    dns.cluster_discovery_type = Some(ClusterDiscoveryType::Type(DiscoveryType::StrictDns as i32));
    let err = cluster(&dns).unwrap_err();
    assert_eq!(err.field, "type");
    assert!(err.problem.contains("STRICT_DNS"), "{}", err.problem);

    let endpoints = load_assignment(&cla(
        "orders",
        &[
            ("10.0.0.1:80", 2, HealthStatus::Healthy),
            ("10.0.0.2:80", 1, HealthStatus::Unknown),
            ("10.0.0.3:80", 1, HealthStatus::Draining),
        ],
    ))
    .unwrap();
    assert_eq!(
        endpoints
            .iter()
            .map(|e| (e.weight, e.healthy))
            .collect::<Vec<_>>(),
        [(2, true), (1, true), (1, false)]
    );
}

#[test]
fn decode_checks_the_type_url() {
    let any = pack_any(eds_cluster("x"));
    assert!(decode::<XCluster>(&any).is_ok());
    let err = decode::<Listener>(&any).unwrap_err();
    assert!(
        err.problem
            .contains("expected type.googleapis.com/envoy.config.listener.v3.Listener"),
        "{}",
        err.problem
    );
}

#[test]
fn state_builds_a_mesh_once_references_resolve() {
    let (_, base) = weft_model::parse("").unwrap();
    let mut state = XdsState::default();
    state.listeners.insert(
        "0.0.0.0_80".into(),
        listener(&service_listener("0.0.0.0_80", 80, vec![chain(hcm_rds("80"))])).unwrap(),
    );
    state
        .clusters
        .insert("v1".into(), cluster(&eds_cluster("v1")).unwrap());
    assert_eq!(state.rds_names().into_iter().collect::<Vec<_>>(), ["80"]);
    assert_eq!(
        state.warming(),
        ["RouteConfiguration \"80\"", "ClusterLoadAssignment \"v1\""]
    );
    let mesh = state.build(&base);
    assert!(
        mesh.outbound.as_ref().unwrap().services.is_empty(),
        "the listener is warming"
    );

    let rc = RouteConfiguration {
        name: "80".into(),
        virtual_hosts: vec![XVirtualHost {
            name: "a".into(),
            domains: vec!["*".into()],
            routes: vec![weighted_route("/", &[("v1", 1)])],
            ..Default::default()
        }],
        ..Default::default()
    };
    state
        .routes
        .insert("80".into(), route_configuration(&rc).unwrap());
    let mesh = state.build(&base);
    let target = mesh
        .outbound
        .as_ref()
        .unwrap()
        .service_for("10.1.1.1:80".parse().unwrap())
        .unwrap();
    assert!(
        target.route.virtual_hosts()[0].routes[0].action.clusters[0]
            .cluster
            .is_none(),
        "v1 is warming: NC until its endpoints arrive"
    );

    state.endpoints.insert(
        "v1".into(),
        load_assignment(&cla("v1", &[("10.0.0.1:80", 1, HealthStatus::Healthy)])).unwrap(),
    );
    assert!(state.warming().is_empty());
    let mesh = state.build(&base);
    let target = mesh
        .outbound
        .as_ref()
        .unwrap()
        .service_for("10.1.1.1:80".parse().unwrap())
        .unwrap();
    let v1 = target.route.virtual_hosts()[0].routes[0].action.clusters[0]
        .cluster
        .as_ref()
        .unwrap();
    assert_eq!(v1.endpoints[0].address, "10.0.0.1:80".parse().unwrap());
}

#[test]
fn cluster_policies_follow_envoy_fields_and_defaults() {
    use envoy_types::pb::envoy::config::cluster::v3::circuit_breakers::{
        Thresholds, thresholds::RetryBudget as XBudget,
    };
    use envoy_types::pb::envoy::config::cluster::v3::cluster::CommonLbConfig;
    use envoy_types::pb::envoy::config::cluster::v3::{
        CircuitBreakers as XBreakers, OutlierDetection as XOutlier,
    };
    use envoy_types::pb::envoy::r#type::v3::Percent;
    use envoy_types::pb::google::protobuf::Duration as PDuration;

    let plain = cluster(&eds_cluster("plain")).unwrap();
    assert_eq!(plain.circuit_breakers, CircuitBreakers::default());
    assert_eq!(plain.outlier_detection, None);
    assert_eq!(plain.panic_threshold_percent, 50.0);

    let u = |value| Some(UInt32Value { value });
    let mut c = eds_cluster("guarded");
    c.circuit_breakers = Some(XBreakers {
        thresholds: vec![Thresholds {
            max_connections: u(1),
            max_pending_requests: u(2),
            max_retries: u(4),
            retry_budget: Some(XBudget {
                budget_percent: Some(Percent { value: 25.0 }),
                min_retry_concurrency: u(5),
                budget_interval: Some(PDuration { seconds: 2, nanos: 0 }),
            }),
            ..Default::default()
        }],
        ..Default::default()
    });
    c.outlier_detection = Some(XOutlier {
        consecutive_5xx: u(5),
        interval: Some(PDuration {
            seconds: 30,
            nanos: 0,
        }),
        base_ejection_time: Some(PDuration {
            seconds: 30,
            nanos: 0,
        }),
        max_ejection_percent: u(50),
        consecutive_gateway_failure: u(3),
        enforcing_consecutive_gateway_failure: u(100),
        ..Default::default()
    });
    c.common_lb_config = Some(CommonLbConfig {
        healthy_panic_threshold: Some(Percent { value: 0.0 }),
        ..Default::default()
    });
    let spec = cluster(&c).unwrap();
    let cb = spec.circuit_breakers;
    assert_eq!(
        (
            cb.max_connections,
            cb.max_pending_requests,
            cb.max_requests,
            cb.max_retries
        ),
        (1, 2, 1024, 4)
    );
    assert_eq!(
        (
            cb.retry_budget.budget_percent,
            cb.retry_budget.min_retries,
            cb.retry_budget.interval
        ),
        (25.0, 5, Duration::from_secs(2))
    );
    let od = spec.outlier_detection.unwrap();
    assert_eq!(od.consecutive_5xx, 5);
    assert_eq!(od.consecutive_gateway_failure, 3);
    assert_eq!(od.interval, Duration::from_secs(30));
    assert_eq!(od.max_ejection_percent, 50);
    assert_eq!(spec.panic_threshold_percent, 0.0);

    c.common_lb_config = Some(CommonLbConfig {
        healthy_panic_threshold: Some(Percent { value: 150.0 }),
        ..Default::default()
    });
    let err = cluster(&c).unwrap_err();
    assert_eq!(err.field, "common_lb_config.healthy_panic_threshold");
}

#[test]
fn retry_policies_are_parsed_and_bad_conditions_named() {
    use envoy_types::pb::envoy::config::route::v3::RetryPolicy as XRetry;
    use envoy_types::pb::google::protobuf::Duration as PDuration;

    let mut route = weighted_route("/", &[("a", 1)]);
    let Some(Action::Route(action)) = &mut route.action else {
        unreachable!()
    };
    action.retry_policy = Some(XRetry {
        retry_on: "5xx,retriable-status-codes".into(),
        num_retries: Some(UInt32Value { value: 3 }),
        per_try_timeout: Some(PDuration { seconds: 2, nanos: 0 }),
        retriable_status_codes: vec![409],
        ..Default::default()
    });
    let config = |route: XRoute| RouteConfiguration {
        name: "r".into(),
        virtual_hosts: vec![XVirtualHost {
            name: "v".into(),
            domains: vec!["*".into()],
            routes: vec![route],
            ..Default::default()
        }],
        ..Default::default()
    };
    let table = route_configuration(&config(route.clone())).unwrap();
    let retry = table.virtual_hosts()[0].routes[0].action.retry.clone().unwrap();
    assert_eq!(retry.retry_on.to_string(), "5xx,retriable-status-codes");
    assert_eq!(retry.num_retries, 3);
    assert_eq!(retry.per_try_timeout, Some(Duration::from_secs(2)));
    assert_eq!(retry.retriable_status_codes, vec![409]);
    // Unset: the connection manager's stream idle timeout applies.
    assert_eq!(table.virtual_hosts()[0].routes[0].action.idle_timeout, None);

    let Some(Action::Route(action)) = &mut route.action else {
        unreachable!()
    };
    if let Some(p) = action.retry_policy.as_mut() {
        p.retry_on = "5xx,sometimes".into();
    }
    let err = route_configuration(&config(route)).unwrap_err();
    assert!(err.field.ends_with("retry_policy.retry_on"), "{err}");
    assert!(err.problem.contains("\"sometimes\""), "{err}");
}

#[test]
fn connection_manager_timeouts_follow_envoy_unset_default_and_zero_disables() {
    let with = |stream_idle: Option<XDuration>, headers: Option<XDuration>| {
        let manager = pack_any(HttpConnectionManager {
            stat_prefix: "x".into(),
            route_specifier: Some(RouteSpecifier::Rds(Rds {
                route_config_name: "r".into(),
                config_source: None,
            })),
            stream_idle_timeout: stream_idle,
            request_headers_timeout: headers,
            ..Default::default()
        });
        match listener(&service_listener("0.0.0.0_80", 80, vec![chain(manager)])).unwrap() {
            ListenerSpec::Service { http_settings, .. } => http_settings,
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(with(None, None), HttpSettings::default());
    let zero = XDuration { seconds: 0, nanos: 0 };
    let ten = XDuration {
        seconds: 10,
        nanos: 0,
    };
    assert_eq!(
        with(Some(zero), Some(ten)),
        HttpSettings {
            request_headers_timeout: Some(Duration::from_secs(10)),
            stream_idle_timeout: None,
            ..HttpSettings::default()
        }
    );
}

fn manager_settings(manager: HttpConnectionManager) -> Result<HttpSettings, ResourceError> {
    let manager = HttpConnectionManager {
        stat_prefix: "x".into(),
        route_specifier: Some(RouteSpecifier::Rds(Rds {
            route_config_name: "r".into(),
            config_source: None,
        })),
        ..manager
    };
    match listener(&service_listener(
        "0.0.0.0_80",
        80,
        vec![chain(pack_any(manager))],
    ))? {
        ListenerSpec::Service { http_settings, .. } => Ok(http_settings),
        other => panic!("{other:?}"),
    }
}

#[test]
fn connection_manager_limits_and_request_timeout_are_taken_and_checked() {
    use envoy_types::pb::envoy::config::core::v3::{Http2ProtocolOptions, HttpProtocolOptions as Common};
    let u32v = |value| Some(UInt32Value { value });
    let settings = manager_settings(HttpConnectionManager {
        max_request_headers_kb: u32v(32),
        request_timeout: Some(XDuration { seconds: 7, nanos: 0 }),
        common_http_protocol_options: Some(Common {
            max_headers_count: u32v(50),
            ..Default::default()
        }),
        http2_protocol_options: Some(Http2ProtocolOptions {
            max_concurrent_streams: u32v(10),
            initial_stream_window_size: u32v(128 * 1024),
            initial_connection_window_size: u32v(4 << 20),
            ..Default::default()
        }),
        ..Default::default()
    })
    .unwrap();
    assert_eq!(settings.request_timeout, Some(Duration::from_secs(7)));
    assert_eq!(
        settings.limits,
        weft_model::HttpLimits {
            max_request_headers_kb: 32,
            max_headers_count: 50,
            max_concurrent_streams: 10,
            initial_stream_window_size: 128 * 1024,
            initial_connection_window_size: 4 << 20,
        }
    );
    // Unset: the proxy's edge defaults, not Envoy's unbounded ones.
    let unset = manager_settings(HttpConnectionManager::default()).unwrap();
    assert_eq!(unset.limits, weft_model::HttpLimits::default());
    assert_eq!(unset.limits.max_concurrent_streams, 100);
    assert_eq!(unset.request_timeout, None);

    let err = manager_settings(HttpConnectionManager {
        http2_protocol_options: Some(Http2ProtocolOptions {
            initial_stream_window_size: u32v(1000),
            ..Default::default()
        }),
        ..Default::default()
    })
    .unwrap_err();
    assert!(
        err.field
            .ends_with("typed_config.http2_protocol_options.initial_stream_window_size"),
        "{err}"
    );
    assert!(err.problem.contains("1000"), "{err}");
    let err = manager_settings(HttpConnectionManager {
        max_request_headers_kb: u32v(9000),
        ..Default::default()
    })
    .unwrap_err();
    assert!(
        err.field.ends_with("typed_config.max_request_headers_kb"),
        "{err}"
    );
}

#[test]
#[allow(deprecated)]
fn max_requests_per_connection_from_protocol_options_or_the_deprecated_field() {
    use envoy_types::pb::envoy::config::core::v3::HttpProtocolOptions as Common;

    assert_eq!(
        cluster(&eds_cluster("plain"))
            .unwrap()
            .max_requests_per_connection,
        None
    );
    let with = |n: u32| {
        let mut c = eds_cluster("limited");
        let options = HttpProtocolOptions {
            common_http_protocol_options: Some(Common {
                max_requests_per_connection: Some(UInt32Value { value: n }),
                ..Default::default()
            }),
            ..Default::default()
        };
        c.typed_extension_protocol_options
            .insert(HTTP_PROTOCOL_OPTIONS.to_owned(), pack_any(options));
        cluster(&c).unwrap().max_requests_per_connection
    };
    assert_eq!(with(10), Some(10));
    assert_eq!(with(0), None, "0 is no limit, as in Envoy");
    let mut old = eds_cluster("old");
    old.max_requests_per_connection = Some(UInt32Value { value: 3 });
    assert_eq!(cluster(&old).unwrap().max_requests_per_connection, Some(3));
}

#[test]
fn istios_access_log_shape_is_read_and_chains_that_log_differently_are_refused() {
    use envoy_types::pb::envoy::config::accesslog::v3::{AccessLog, access_log};
    use envoy_types::pb::envoy::config::core::v3::{
        DataSource, SubstitutionFormatString, data_source, substitution_format_string,
    };
    use envoy_types::pb::envoy::extensions::access_loggers::file::v3::{FileAccessLog, file_access_log};
    use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::TcpProxy;
    use weft_telemetry::access_log::{Format, Sink};

    let istio = |format: &str| AccessLog {
        name: "envoy.access_loggers.file".into(),
        filter: None,
        config_type: Some(access_log::ConfigType::TypedConfig(pack_any(FileAccessLog {
            path: "/dev/stdout".into(),
            access_log_format: Some(file_access_log::AccessLogFormat::LogFormat(
                SubstitutionFormatString {
                    format: Some(substitution_format_string::Format::TextFormatSource(DataSource {
                        specifier: Some(data_source::Specifier::InlineString(format.into())),
                        ..Default::default()
                    })),
                    ..Default::default()
                },
            )),
        }))),
    };
    let tcp_with = |log: AccessLog| {
        pack_any(TcpProxy {
            stat_prefix: "db".into(),
            cluster_specifier: Some(
                envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::tcp_proxy::ClusterSpecifier::Cluster("db".into()),
            ),
            access_log: vec![log],
            ..Default::default()
        })
    };
    let spec = listener(&service_listener(
        "10.0.0.1_3306",
        3306,
        vec![chain(tcp_with(istio(weft_telemetry::access_log::ISTIO_TEXT)))],
    ))
    .unwrap();
    let ListenerSpec::Service { access_log, .. } = spec else {
        panic!("a service listener")
    };
    assert_eq!(access_log.logs().len(), 1);
    assert_eq!(access_log.logs()[0].sink, Sink::Stdout);
    assert_eq!(*access_log.logs()[0].format, Format::istio_text());

    let err = listener(&service_listener(
        "10.0.0.1_3306",
        3306,
        vec![
            chain(tcp_with(istio("%DURATION%\n"))),
            chain(tcp_with(istio("%BYTES_SENT%\n"))),
        ],
    ))
    .unwrap_err();
    assert_eq!(err.field, "filter_chains[1].filters");
    assert!(err.problem.contains("access logs differ"), "{err}");
}

#[test]
fn istio_endpoint_metadata_names_the_workload_and_a_malformed_one_is_refused() {
    use envoy_types::pb::envoy::config::core::v3::Metadata;
    use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
    let with_workload = |value: &str| {
        let mut cla = cla("c", &[("10.0.0.1:80", 1, HealthStatus::Healthy)]);
        let fields = [(
            "workload".to_owned(),
            Value {
                kind: Some(Kind::StringValue(value.to_owned())),
            },
        )];
        cla.endpoints[0].lb_endpoints[0].metadata = Some(Metadata {
            filter_metadata: [(
                "istio".to_owned(),
                Struct {
                    fields: fields.into_iter().collect(),
                },
            )]
            .into_iter()
            .collect(),
            ..Default::default()
        });
        load_assignment(&cla)
    };
    let endpoints = with_workload("reviews-v2;shop;reviews;v2;east").unwrap();
    let workload = endpoints[0].workload.as_ref().expect("named");
    assert_eq!(workload.workload.as_str(), "reviews-v2");
    assert_eq!(workload.namespace.as_str(), "shop");
    assert_eq!(workload.canonical_service.as_str(), "reviews");
    assert_eq!(workload.canonical_revision.as_str(), "v2");
    assert_eq!(workload.cluster.as_str(), "east");
    assert_eq!(workload.app.as_str(), "unknown");

    let err = with_workload("reviews-v2;shop").unwrap_err().to_string();
    assert!(
        err.contains("endpoints[0].lb_endpoints[0].metadata.filter_metadata.istio.workload"),
        "{err}"
    );
}
