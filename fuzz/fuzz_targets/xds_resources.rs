//! Whatever bytes a control plane sends as a resource are decoded and converted, or rejected with an
//! error; never a panic.
#![no_main]

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use libfuzzer_sys::fuzz_target;
use prost::Message;
use weft_xds::convert;

fuzz_target!(|data: &[u8]| {
    if let Ok(l) = Listener::decode(data) {
        let _ = convert::listener(&l);
    }
    if let Ok(r) = RouteConfiguration::decode(data) {
        let _ = convert::route_configuration(&r);
    }
    if let Ok(c) = Cluster::decode(data) {
        let _ = convert::cluster(&c);
    }
    if let Ok(c) = ClusterLoadAssignment::decode(data) {
        let _ = convert::load_assignment(&c);
    }
});
