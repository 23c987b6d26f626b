//! The proxy's configuration: the static YAML file a user writes ([`file`]) and the validated runtime model
//! the data path reads ([`Bootstrap`] for what is fixed for the life of the process, [`Mesh`] for the
//! listeners, routes and clusters that a control plane will replace at run time).
//!
//! A [`Mesh`] is immutable once built; a change is a new `Arc<Mesh>` swapped in whole.

pub mod defaults;
mod domains;
pub mod file;
mod mesh;
pub mod policy;
pub mod route;
pub mod status;

pub use file::{LoadError, load_file, parse};
pub use mesh::{
    Bootstrap, CertificateProvider, Cluster, Egress, Endpoint, ExplicitListener, HttpLimits, HttpSettings,
    IdentitySource, InboundPolicy, LbPolicy, ListenerAuthorization, Mesh, Mode, Node, OutboundPolicy,
    OverloadSettings, PeerAuthentication, Protocol, Target, UpstreamTls, XdsSource,
};
pub use policy::{Backoff, CircuitBreakers, OutlierDetection, RetryBudget, RetryOn, RetryPolicy};
pub use route::RouteTable;

#[cfg(test)]
mod tests;
