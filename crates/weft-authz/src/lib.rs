//! Authorization, as pure functions: who may call what.
//!
//! [`model`] is Envoy's RBAC filter model (ordered filters of ALLOW, DENY or LOG rules, with shadow rules
//! that only observe), which is what xDS carries; [`Authorization::evaluate`] decides for one connection
//! or request; [`path`] normalizes a request path before anything matches on it; [`istio`] translates
//! Istio's AuthorizationPolicy into the model with Istio's semantics. [`connection`] holds a connection
//! and its requests to the policy in force, counting decisions and logging denials; apart from that,
//! nothing here has side effects.

pub mod connection;
mod eval;
pub mod istio;
mod model;
pub mod path;

pub use eval::{Decision, Event, Peer, Request};
pub use model::{
    Action, Authorization, Cidr, HeaderMatch, NamedPolicy, PathTemplate, Pattern, Permission, Policy,
    Principal, Rbac, RbacFilter, StringMatch,
};

/// A regular expression as RBAC matches it (the whole value, RE2 syntax).
pub fn model_pattern(source: &str) -> Result<model::Pattern, InvalidValue> {
    model::Pattern::new(source)
}

/// A value in a policy that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidValue(pub String);
