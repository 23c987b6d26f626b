//! Configuration from outside the proxy: xDS resources as the wire carries them, the proxy file, and
//! the Istio resources `weft control` reads.

use std::path::Path;

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use prost::{Message, Name};
use weft_control::resources::load_files;
use weft_control::translate::{NodeInfo, snapshot};
use weft_xds::convert;

const EXAMPLES: [(&str, &str); 2] = [
    (
        "order-service.yaml",
        include_str!("../../../examples/mesh/order-service.yaml"),
    ),
    (
        "payment.yaml",
        include_str!("../../../examples/mesh/payment.yaml"),
    ),
];
const PROXY_FILE: &str = include_str!("../../../examples/proxy.yaml");

fn node() -> NodeInfo {
    NodeInfo {
        workload: "order-v1".into(),
        namespace: "default".into(),
    }
}

pub(crate) fn listener(data: &[u8]) {
    if let Ok(l) = Listener::decode(data) {
        let _ = convert::listener(&l);
    }
}

pub(crate) fn cluster(data: &[u8]) {
    if let Ok(c) = Cluster::decode(data) {
        let _ = convert::cluster(&c);
    }
}

pub(crate) fn route(data: &[u8]) {
    if let Ok(rc) = RouteConfiguration::decode(data) {
        let _ = convert::route_configuration(&rc);
    }
}

pub(crate) fn endpoints(data: &[u8]) {
    if let Ok(cla) = ClusterLoadAssignment::decode(data) {
        let _ = convert::load_assignment(&cla);
    }
}

pub(crate) fn proxy_file(data: &[u8]) {
    let _ = weft_model::parse(&String::from_utf8_lossy(data));
}

/// Istio resources as `weft control` reads them: whatever it accepts and serves, the proxy accepts
/// (a resource the control plane cannot translate into something the proxy enforces must be refused
/// where it is read, naming it, never NACKed by every proxy).
pub(crate) fn istio_resources(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let (catalog, _problems) = load_files([(Path::new("fuzzed.yaml"), &*text)]);
    let served = snapshot(&catalog, &node());
    for (type_url, resources) in &served.types {
        for (name, any) in &resources.resources {
            let accepted = match type_url.as_str() {
                t if t == Listener::type_url() => accepts(&any.value, convert::listener),
                t if t == Cluster::type_url() => accepts(&any.value, convert::cluster),
                t if t == RouteConfiguration::type_url() => accepts(&any.value, convert::route_configuration),
                t if t == ClusterLoadAssignment::type_url() => accepts(&any.value, convert::load_assignment),
                _ => Ok(()),
            };
            if let Err(err) = accepted {
                panic!("weft control served {type_url} {name} and the proxy refuses it: {err}");
            }
        }
    }
}

/// Whether the proxy's conversion takes an encoded resource, or why not.
fn accepts<M: Message + Default, T, E: std::fmt::Display>(
    bytes: &[u8],
    convert: impl Fn(&M) -> Result<T, E>,
) -> Result<(), String> {
    let resource = M::decode(bytes).map_err(|e| e.to_string())?;
    convert(&resource).map(drop).map_err(|e| e.to_string())
}

/// The resources `weft control` serves for the examples, of one type, encoded.
fn served(type_url: &str) -> Vec<Vec<u8>> {
    let (catalog, _problems) = load_files(EXAMPLES.iter().map(|(file, text)| (Path::new(*file), *text)));
    snapshot(&catalog, &node())
        .get(type_url)
        .map(|t| t.resources.values().map(|any| any.value.clone()).collect())
        .unwrap_or_default()
}

pub(crate) fn listener_seeds() -> Vec<Vec<u8>> {
    served(&Listener::type_url())
}

pub(crate) fn cluster_seeds() -> Vec<Vec<u8>> {
    served(&Cluster::type_url())
}

pub(crate) fn route_seeds() -> Vec<Vec<u8>> {
    served(&RouteConfiguration::type_url())
}

pub(crate) fn endpoints_seeds() -> Vec<Vec<u8>> {
    served(&ClusterLoadAssignment::type_url())
}

pub(crate) fn proxy_file_seeds() -> Vec<Vec<u8>> {
    vec![
        PROXY_FILE.as_bytes().to_vec(),
        b"http_limits: { max_headers_count: 10 }\nrequest_timeout: 1s\noutbound: { services: [{ address: 0.0.0.0:8080, cluster: web }] }\nclusters: [{ name: web, endpoints: [\"127.0.0.1:1\"] }]".to_vec(),
    ]
}

pub(crate) fn istio_resources_seeds() -> Vec<Vec<u8>> {
    EXAMPLES
        .iter()
        .map(|(_, text)| text.as_bytes().to_vec())
        .collect()
}
