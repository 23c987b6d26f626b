//! Deciding for one connection or one request.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use crate::model::{Action, Authorization, HeaderMatch, Permission, Policy, Principal, Rbac};

/// What the connection proved and where it goes: all an L4 decision has.
#[derive(Debug, Clone, Copy)]
pub struct Peer<'a> {
    /// The caller's SPIFFE ID (`spiffe://...`), from a verified certificate only.
    pub principal: Option<&'a str>,
    /// The address of the connection's peer.
    pub source: IpAddr,
    pub destination: SocketAddr,
    /// The TLS server name the client asked for, when it spoke TLS.
    pub server_name: Option<&'a str>,
}

/// An HTTP request, after path normalization.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    pub method: &'a str,
    /// The normalized path, without the query.
    pub path: &'a str,
    /// The path with the query (`:path`).
    pub path_and_query: &'a str,
    pub authority: &'a str,
    pub headers: &'a http::HeaderMap,
}

/// The outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allowed,
    /// Denied by this DENY policy, or (`None`) because no ALLOW policy matched.
    Denied(Option<Arc<str>>),
}

impl Decision {
    pub fn is_allowed(&self) -> bool {
        matches!(self, Decision::Allowed)
    }
}

/// What evaluation observed, for metrics and logs: a rule set of `action` matched `policy` (or, for an
/// ALLOW set, `None`: none did), with this effect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Event<'a> {
    pub action: Action,
    pub policy: Option<&'a Arc<str>>,
    pub result: &'static str,
    /// From shadow rules: observed, not enforced.
    pub shadow: bool,
}

impl Authorization {
    /// Decides for a connection (`request: None`, only L4 facts) or a request. `observe` sees every
    /// rule set that matched or denied, in order, without allocating.
    pub fn evaluate(
        &self,
        peer: &Peer<'_>,
        request: Option<&Request<'_>>,
        observe: &mut dyn FnMut(Event<'_>),
    ) -> Decision {
        for filter in &self.filters {
            if let Some(shadow) = &filter.shadow {
                let matched = shadow.first_match(peer, request);
                let result = match (shadow.action, matched) {
                    (Action::Allow, None) | (Action::Deny, Some(_)) => Some("shadow_denied"),
                    (Action::Allow, Some(_)) => Some("shadow_allowed"),
                    (Action::Log, Some(_)) => Some("audited"),
                    (Action::Deny | Action::Log, None) => None,
                };
                if let Some(result) = result {
                    observe(Event {
                        action: shadow.action,
                        policy: matched,
                        result,
                        shadow: true,
                    });
                }
            }
            let Some(rules) = &filter.rules else { continue };
            let matched = rules.first_match(peer, request);
            match (rules.action, matched) {
                (Action::Allow, None) => {
                    observe(Event {
                        action: Action::Allow,
                        policy: None,
                        result: "denied",
                        shadow: false,
                    });
                    return Decision::Denied(None);
                }
                (Action::Deny, Some(name)) => {
                    observe(Event {
                        action: Action::Deny,
                        policy: Some(name),
                        result: "denied",
                        shadow: false,
                    });
                    return Decision::Denied(Some(name.clone()));
                }
                (Action::Allow, Some(name)) => observe(Event {
                    action: Action::Allow,
                    policy: Some(name),
                    result: "allowed",
                    shadow: false,
                }),
                (Action::Log, Some(name)) => observe(Event {
                    action: Action::Log,
                    policy: Some(name),
                    result: "audited",
                    shadow: false,
                }),
                (Action::Deny | Action::Log, None) => {}
            }
        }
        Decision::Allowed
    }
}

impl Rbac {
    fn first_match(&self, peer: &Peer<'_>, request: Option<&Request<'_>>) -> Option<&Arc<str>> {
        self.policies
            .iter()
            .find(|p| p.policy.matches(peer, request))
            .map(|p| &p.name)
    }
}

impl Policy {
    fn matches(&self, peer: &Peer<'_>, request: Option<&Request<'_>>) -> bool {
        self.permissions.iter().any(|p| p.matches(peer, request))
            && self.principals.iter().any(|p| p.matches(peer, request))
    }
}

impl Permission {
    fn matches(&self, peer: &Peer<'_>, request: Option<&Request<'_>>) -> bool {
        match self {
            Permission::Any => true,
            Permission::And(all) => all.iter().all(|p| p.matches(peer, request)),
            Permission::Or(any) => any.iter().any(|p| p.matches(peer, request)),
            Permission::Not(p) => !p.matches(peer, request),
            Permission::Header(h) => request.is_some_and(|r| h.matches(r)),
            Permission::Path(m) => request.is_some_and(|r| m.matches(r.path)),
            Permission::PathTemplate(t) => request.is_some_and(|r| t.matches(r.path)),
            Permission::DestinationIp(cidr) => cidr.contains(peer.destination.ip()),
            Permission::DestinationPort(port) => peer.destination.port() == *port,
            Permission::DestinationPortRange { start, end } => {
                let port = peer.destination.port();
                port >= *start && u32::from(port) < *end
            }
            Permission::ServerName(m) => peer.server_name.is_some_and(|n| m.matches(n)),
        }
    }
}

impl Principal {
    fn matches(&self, peer: &Peer<'_>, request: Option<&Request<'_>>) -> bool {
        match self {
            Principal::Any => true,
            Principal::And(all) => all.iter().all(|p| p.matches(peer, request)),
            Principal::Or(any) => any.iter().any(|p| p.matches(peer, request)),
            Principal::Not(p) => !p.matches(peer, request),
            Principal::Authenticated(None) => peer.principal.is_some(),
            Principal::Authenticated(Some(m)) => peer.principal.is_some_and(|p| m.matches(p)),
            Principal::DirectRemoteIp(cidr) | Principal::RemoteIp(cidr) => cidr.contains(peer.source),
            Principal::Header(h) => request.is_some_and(|r| h.matches(r)),
            Principal::Path(m) => request.is_some_and(|r| m.matches(r.path)),
        }
    }
}

impl HeaderMatch {
    fn matches(&self, request: &Request<'_>) -> bool {
        let joined;
        let value = match self.name.as_str() {
            ":method" => Some(request.method),
            ":path" => Some(request.path_and_query),
            ":authority" | "host" => Some(request.authority),
            _ => {
                // Several lines of one header match as one comma-joined value, as in Envoy.
                let mut values = request.headers.get_all(self.name.as_str()).iter();
                match (values.next(), values.next()) {
                    (None, _) => None,
                    (Some(one), None) => one.to_str().ok(),
                    (Some(first), Some(second)) => {
                        let mut all = vec![first, second];
                        all.extend(values);
                        joined = all
                            .iter()
                            .map(|v| String::from_utf8_lossy(v.as_bytes()))
                            .collect::<Vec<_>>()
                            .join(",");
                        Some(joined.as_str())
                    }
                }
            }
        };
        let Some(value) = value else {
            // Absent: only an inverted presence match ("must not be there") matches.
            return self.value.is_none() && self.invert;
        };
        let matched = self.value.as_ref().is_none_or(|m| m.matches(value));
        matched != self.invert
    }
}
