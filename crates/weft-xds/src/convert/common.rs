//! What every conversion shares: the error that names a rejected resource's field, decoding `Any`,
//! addresses and durations, and Istio's well-known names.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::Address;
use envoy_types::pb::envoy::config::core::v3::address::Address as XAddressKind;
use envoy_types::pb::envoy::config::core::v3::socket_address::PortSpecifier;
use envoy_types::pb::google::protobuf::{Any, Duration as XDuration};
use prost::{Message, Name};

pub const PASSTHROUGH_CLUSTER: &str = "PassthroughCluster";
pub const BLACKHOLE_CLUSTER: &str = "BlackHoleCluster";
/// Istio's names for the capture listeners.
pub const VIRTUAL_OUTBOUND: &str = "virtualOutbound";
pub const VIRTUAL_INBOUND: &str = "virtualInbound";

/// A rejected resource.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind} \"{name}\": {field}: {problem}")]
pub struct ResourceError {
    pub kind: &'static str,
    pub name: String,
    pub field: String,
    pub problem: String,
}

/// Builds errors for one resource.
pub(crate) struct Ctx<'a> {
    pub(crate) kind: &'static str,
    pub(crate) name: &'a str,
}

impl Ctx<'_> {
    pub(crate) fn err(&self, field: impl Into<String>, problem: impl Into<String>) -> ResourceError {
        ResourceError {
            kind: self.kind,
            name: self.name.to_owned(),
            field: field.into(),
            problem: problem.into(),
        }
    }
}

/// Decodes an `Any` of the expected type.
pub fn decode<M: Message + Name + Default>(any: &Any) -> Result<M, ResourceError> {
    let expected = M::type_url();
    if any.type_url != expected {
        return Err(ResourceError {
            kind: M::NAME,
            name: String::new(),
            field: "type_url".into(),
            problem: format!("expected {expected}, got {}", any.type_url),
        });
    }
    M::decode(any.value.as_slice()).map_err(|e| ResourceError {
        kind: M::NAME,
        name: String::new(),
        field: "value".into(),
        problem: format!("cannot decode: {e}"),
    })
}

pub(crate) fn socket_address(
    ctx: &Ctx<'_>,
    field: &str,
    address: Option<&Address>,
) -> Result<SocketAddr, ResourceError> {
    let Some(XAddressKind::SocketAddress(sa)) = address.and_then(|a| a.address.as_ref()) else {
        return Err(ctx.err(field, "needs a socket_address"));
    };
    let ip: IpAddr = sa.address.parse().map_err(|_| {
        ctx.err(
            format!("{field}.address"),
            format!("\"{}\" is not an IP address", sa.address),
        )
    })?;
    let port = match sa.port_specifier {
        Some(PortSpecifier::PortValue(p)) => u16::try_from(p).ok(),
        _ => None,
    }
    .ok_or_else(|| ctx.err(format!("{field}.port_value"), "needs a port from 0 to 65535"))?;
    Ok(SocketAddr::new(ip, port))
}

pub(crate) fn duration(d: &XDuration) -> Duration {
    Duration::new(
        u64::try_from(d.seconds).unwrap_or(0),
        u32::try_from(d.nanos).unwrap_or(0),
    )
}
