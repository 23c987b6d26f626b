//! HTTP routing, with Envoy's semantics: a route table holds virtual hosts chosen by the request's
//! authority; each holds routes tried in order, the first whose path and header matches all hold wins,
//! and its action names weighted clusters, a timeout and a retry policy.

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use crate::Cluster;
use crate::domains::DomainIndex;
pub use crate::policy::RetryPolicy;

pub use crate::defaults::{DEFAULT_ROUTE_TIMEOUT, DEFAULT_STREAM_IDLE_TIMEOUT};

#[derive(Debug, Clone, Serialize)]
pub struct RouteTable {
    pub name: String,
    virtual_hosts: Vec<VirtualHost>,
    #[serde(skip)]
    domains: DomainIndex,
}

#[derive(Debug, Clone, Serialize)]
pub struct VirtualHost {
    pub name: String,
    pub domains: Vec<String>,
    pub routes: Vec<Route>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Route {
    pub name: String,
    #[serde(rename = "match")]
    pub matcher: RouteMatch,
    pub action: RouteAction,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct RouteMatch {
    pub path: PathMatch,
    pub headers: Vec<HeaderMatch>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PathMatch {
    Prefix(String),
    Exact(String),
    Regex(#[serde(serialize_with = "regex_str")] regex::Regex),
}

impl Default for PathMatch {
    fn default() -> Self {
        PathMatch::Prefix("/".into())
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct HeaderMatch {
    /// Lower-case header name; `:authority`, `:method`, `:path` and `:scheme` match the pseudo-headers.
    pub name: String,
    pub value: ValueMatch,
    pub invert: bool,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ValueMatch {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Contains(String),
    Regex(#[serde(serialize_with = "regex_str")] regex::Regex),
    Present,
}

#[derive(Debug, Clone, Serialize)]
pub struct RouteAction {
    pub clusters: Vec<WeightedCluster>,
    /// Whole-request deadline, including retries; `None` disables it.
    #[serde(with = "humantime_serde")]
    pub timeout: Option<Duration>,
    /// Stream idle timeout: no response frame for this long ends the request; `None`: the listener's
    /// (`stream_idle_timeout`); zero disables it.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Option<Duration>,
    pub retry: Option<RetryPolicy>,
}

#[derive(Debug, Clone, Serialize)]
pub struct WeightedCluster {
    pub name: String,
    /// `None` when no cluster of that name exists (yet): requests get 503 with flag `NC`.
    #[serde(skip)]
    pub cluster: Option<Arc<Cluster>>,
    pub weight: u32,
}

/// What a request looks like to the router.
#[derive(Debug, Clone, Copy)]
pub struct RequestView<'a> {
    pub authority: &'a str,
    pub path: &'a str,
    pub method: &'a str,
    pub headers: &'a http::HeaderMap,
}

impl RouteTable {
    /// A table that sends every request to one cluster.
    pub fn to_cluster(cluster: &Arc<Cluster>) -> Self {
        let route = Route {
            name: "default".into(),
            matcher: RouteMatch::default(),
            action: RouteAction {
                clusters: vec![WeightedCluster {
                    name: cluster.name.clone(),
                    cluster: Some(cluster.clone()),
                    weight: 1,
                }],
                timeout: None,
                idle_timeout: None,
                retry: None,
            },
        };
        let vhost = VirtualHost {
            name: cluster.name.clone(),
            domains: vec!["*".into()],
            routes: vec![route],
        };
        Self::new(cluster.name.clone(), vec![vhost])
    }

    /// A table of these virtual hosts, indexed by their domains.
    pub fn new(name: String, virtual_hosts: Vec<VirtualHost>) -> Self {
        let domains = DomainIndex::new(virtual_hosts.iter().map(|v| v.domains.as_slice()));
        Self {
            name,
            virtual_hosts,
            domains,
        }
    }

    pub fn virtual_hosts(&self) -> &[VirtualHost] {
        &self.virtual_hosts
    }

    /// Every route, to be completed in place (the domains, and so the index, stay as they are).
    pub fn routes_mut(&mut self) -> impl Iterator<Item = &mut Route> {
        self.virtual_hosts.iter_mut().flat_map(|v| v.routes.iter_mut())
    }

    /// The route for a request, if any.
    pub fn route<'a>(&'a self, req: &RequestView<'_>) -> Option<&'a Route> {
        let vhost = self.virtual_host(req.authority)?;
        vhost.routes.iter().find(|r| r.matcher.matches(req))
    }

    fn virtual_host(&self, authority: &str) -> Option<&VirtualHost> {
        self.domains
            .find(authority)
            .and_then(|i| self.virtual_hosts.get(i))
    }
}

impl RouteMatch {
    pub fn matches(&self, req: &RequestView<'_>) -> bool {
        let path = req.path.split(['?', '#']).next().unwrap_or_default();
        let path_ok = match &self.path {
            PathMatch::Prefix(prefix) => path.starts_with(prefix.as_str()),
            PathMatch::Exact(exact) => path == exact,
            PathMatch::Regex(re) => full_match(re, path),
        };
        path_ok && self.headers.iter().all(|h| h.matches(req))
    }
}

impl HeaderMatch {
    fn matches(&self, req: &RequestView<'_>) -> bool {
        let value = match self.name.as_str() {
            ":authority" => Some(req.authority),
            ":path" => Some(req.path),
            ":method" => Some(req.method),
            name => req.headers.get(name).and_then(|v| v.to_str().ok()),
        };
        // A missing header matches nothing, so an inverted matcher matches it (Istio's `withoutHeaders`).
        let matched = match (&self.value, value) {
            (_, None) => false,
            (ValueMatch::Present, Some(_)) => true,
            (ValueMatch::Exact(e), Some(v)) => v == e,
            (ValueMatch::Prefix(p), Some(v)) => v.starts_with(p.as_str()),
            (ValueMatch::Suffix(s), Some(v)) => v.ends_with(s.as_str()),
            (ValueMatch::Contains(c), Some(v)) => v.contains(c.as_str()),
            (ValueMatch::Regex(re), Some(v)) => full_match(re, v),
        };
        matched != self.invert
    }
}

impl RouteAction {
    /// Picks a cluster by weight; `roll` is uniform in `[0, 1)`.
    pub fn pick(&self, roll: f64) -> Option<&WeightedCluster> {
        let total: u64 = self.clusters.iter().map(|c| u64::from(c.weight)).sum();
        if total == 0 {
            return self.clusters.first();
        }
        let mut point = (roll * total as f64) as u64;
        for c in &self.clusters {
            if point < u64::from(c.weight) {
                return Some(c);
            }
            point -= u64::from(c.weight);
        }
        self.clusters.last()
    }
}

/// Envoy's `safe_regex` matches the whole value (RE2 full match); patterns are compiled anchored.
fn full_match(re: &regex::Regex, value: &str) -> bool {
    re.is_match(value)
}

/// Compiles a pattern anchored at both ends, for a full match.
pub fn compile_regex(pattern: &str) -> Result<regex::Regex, regex::Error> {
    regex::Regex::new(&format!("^(?:{pattern})$"))
}

fn regex_str<S: serde::Serializer>(re: &regex::Regex, s: S) -> Result<S::Ok, S::Error> {
    let pattern = re.as_str();
    let inner = pattern
        .strip_prefix("^(?:")
        .and_then(|p| p.strip_suffix(")$"))
        .unwrap_or(pattern);
    s.serialize_str(inner)
}

#[cfg(test)]
#[path = "route_tests.rs"]
mod tests;
