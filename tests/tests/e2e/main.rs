//! The end-to-end suites, linked into one test binary (one link of the whole proxy instead of one per
//! suite keeps builds small and fast). Each module is one suite: `cargo nextest run -E 'test(/^mtls::/)'`
//! runs one of them.

mod authz;
mod config_dump;
mod dashboards;
mod envoy_admin;
mod h2_conformance;
mod h2_upstream;
mod hostile;
mod http;
mod identity;
mod kubernetes;
mod lifecycle;
mod metadata_exchange;
mod mtls;
mod netns;
mod observability;
mod resilience;
mod routing;
mod streams;
mod timeouts;
mod trust;
mod upstream_http1;
mod xds;
