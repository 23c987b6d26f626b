//! Envoy's RBAC model (`envoy.config.rbac.v3`): a policy matches when any of its permissions and any of
//! its principals match; a filter's rules ALLOW (deny unless a policy matches), DENY (deny if one
//! matches) or LOG (record, never block); shadow rules are evaluated for metrics only.

use std::net::IpAddr;
use std::sync::Arc;

use serde::Serialize;

use crate::InvalidValue;

/// What one workload enforces: RBAC filters in order. No filters: everything is allowed.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Authorization {
    pub filters: Vec<RbacFilter>,
}

/// One RBAC filter (`envoy.filters.http.rbac` / `envoy.filters.network.rbac`).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct RbacFilter {
    /// Enforced.
    pub rules: Option<Rbac>,
    /// Evaluated and counted, never enforced (Istio's AUDIT, dry runs).
    pub shadow: Option<Rbac>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Rbac {
    pub action: Action,
    /// Sorted by name, so the policy reported as matching is always the same one.
    pub policies: Vec<NamedPolicy>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Allow,
    Deny,
    Log,
}

impl Action {
    pub fn name(self) -> &'static str {
        match self {
            Action::Allow => "allow",
            Action::Deny => "deny",
            Action::Log => "audit",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NamedPolicy {
    #[serde(serialize_with = "as_str")]
    pub name: Arc<str>,
    #[serde(flatten)]
    pub policy: Policy,
}

/// Matches when any permission and any principal match. An empty list matches nothing.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Policy {
    pub permissions: Vec<Permission>,
    pub principals: Vec<Principal>,
}

/// What is being asked for.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Permission {
    Any,
    And(Vec<Permission>),
    Or(Vec<Permission>),
    Not(Box<Permission>),
    /// HTTP only: a request header (`:method`, `:authority`, `:path` included).
    Header(HeaderMatch),
    /// HTTP only: the normalized path, without the query.
    Path(StringMatch),
    /// HTTP only: an Istio/Envoy URI template (`/orders/{*}/items/{**}`).
    PathTemplate(PathTemplate),
    DestinationIp(Cidr),
    DestinationPort(u16),
    /// Inclusive start, exclusive end, as Envoy's `Int32Range`.
    DestinationPortRange {
        start: u16,
        end: u32,
    },
    /// The TLS server name the client asked for.
    ServerName(StringMatch),
}

/// Who is asking.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Principal {
    Any,
    And(Vec<Principal>),
    Or(Vec<Principal>),
    Not(Box<Principal>),
    /// A peer that proved an identity with a verified certificate; `None` matches any such peer.
    Authenticated(Option<StringMatch>),
    /// The address of the connection's peer.
    DirectRemoteIp(Cidr),
    /// The client's address; the proxy trusts no forwarding headers, so it is the peer's.
    RemoteIp(Cidr),
    /// HTTP only.
    Header(HeaderMatch),
    /// HTTP only.
    Path(StringMatch),
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HeaderMatch {
    /// Lowercase; pseudo-headers (`:method`) included, which `http::HeaderName` cannot hold.
    pub name: String,
    /// `None`: the header is present.
    #[serde(rename = "match")]
    pub value: Option<StringMatch>,
    /// The result for a present header is inverted (an absent header never matches, as in Envoy).
    pub invert: bool,
}

#[derive(Debug, Clone, Serialize)]
#[serde(into = "String")]
pub enum StringMatch {
    Exact(String, bool),
    Prefix(String, bool),
    Suffix(String, bool),
    Contains(String, bool),
    /// Matches the whole value (RE2 syntax, as Envoy's `safe_regex`).
    Regex(Pattern),
}

/// A compiled regular expression that compares by its source.
#[derive(Debug, Clone)]
pub struct Pattern {
    source: String,
    regex: regex::Regex,
}

impl Pattern {
    pub fn new(source: &str) -> Result<Self, InvalidValue> {
        let regex = regex::Regex::new(&format!("^(?:{source})$"))
            .map_err(|e| InvalidValue(format!("invalid regex \"{source}\": {e}")))?;
        Ok(Self {
            source: source.to_owned(),
            regex,
        })
    }

    pub fn source(&self) -> &str {
        &self.source
    }
}

impl PartialEq for Pattern {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source
    }
}

impl StringMatch {
    pub fn exact(value: &str) -> Self {
        StringMatch::Exact(value.to_owned(), false)
    }

    pub fn prefix(value: &str) -> Self {
        StringMatch::Prefix(value.to_owned(), false)
    }

    pub fn suffix(value: &str) -> Self {
        StringMatch::Suffix(value.to_owned(), false)
    }

    pub fn matches(&self, value: &str) -> bool {
        fn with_case(value: &str, wanted: &str, ignore_case: bool, f: fn(&str, &str) -> bool) -> bool {
            if ignore_case {
                f(&value.to_ascii_lowercase(), &wanted.to_ascii_lowercase())
            } else {
                f(value, wanted)
            }
        }
        match self {
            StringMatch::Exact(w, i) => with_case(value, w, *i, |v, w| v == w),
            StringMatch::Prefix(w, i) => with_case(value, w, *i, |v, w| v.starts_with(w)),
            StringMatch::Suffix(w, i) => with_case(value, w, *i, |v, w| v.ends_with(w)),
            StringMatch::Contains(w, i) => with_case(value, w, *i, |v, w| v.contains(w)),
            StringMatch::Regex(p) => p.regex.is_match(value),
        }
    }
}

impl PartialEq for StringMatch {
    fn eq(&self, other: &Self) -> bool {
        String::from(self.clone()) == String::from(other.clone())
    }
}

impl From<StringMatch> for String {
    fn from(m: StringMatch) -> String {
        let case = |i: bool| if i { " (ignoring case)" } else { "" };
        match m {
            StringMatch::Exact(v, i) => format!("exact {v}{}", case(i)),
            StringMatch::Prefix(v, i) => format!("prefix {v}{}", case(i)),
            StringMatch::Suffix(v, i) => format!("suffix {v}{}", case(i)),
            StringMatch::Contains(v, i) => format!("contains {v}{}", case(i)),
            StringMatch::Regex(p) => format!("regex {}", p.source),
        }
    }
}

/// An address range (`10.0.0.0/8`, `2001:db8::/32`, or one address).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(into = "String")]
pub struct Cidr {
    pub address: IpAddr,
    pub prefix_len: u8,
}

impl Cidr {
    pub fn parse(text: &str) -> Result<Self, InvalidValue> {
        let invalid = || InvalidValue(format!("\"{text}\" is not an IP address or CIDR range"));
        let (address, prefix_len) = match text.split_once('/') {
            Some((a, p)) => (
                a.parse::<IpAddr>().map_err(|_| invalid())?,
                Some(p.parse::<u8>().map_err(|_| invalid())?),
            ),
            None => (text.parse::<IpAddr>().map_err(|_| invalid())?, None),
        };
        let max = if address.is_ipv4() { 32 } else { 128 };
        let prefix_len = prefix_len.unwrap_or(max);
        if prefix_len > max {
            return Err(invalid());
        }
        Ok(Self { address, prefix_len })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.address, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix_len)).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix_len))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl From<Cidr> for String {
    fn from(c: Cidr) -> String {
        format!("{}/{}", c.address, c.prefix_len)
    }
}

/// A URI template: `{*}` is exactly one segment, `{**}` (last) is whatever remains. Istio writes
/// `/orders/{*}/items/{**}`; Envoy's `uri_template` writes `/orders/*/items/**` (or names the
/// variables, `{id}`, `{rest=**}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(into = "String")]
pub struct PathTemplate {
    segments: Vec<Segment>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    One,
    Rest,
}

impl PathTemplate {
    /// Istio's form.
    pub fn parse(text: &str) -> Result<Self, InvalidValue> {
        Self::parse_with(text, |part| match part {
            "{*}" => Some(Segment::One),
            "{**}" => Some(Segment::Rest),
            _ => None,
        })
    }

    /// Envoy's `uri_template` form.
    pub fn parse_envoy(text: &str) -> Result<Self, InvalidValue> {
        Self::parse_with(text, |part| {
            let operator = match part.strip_prefix('{').and_then(|p| p.strip_suffix('}')) {
                Some(variable) => variable.split_once('=').map_or("*", |(_, op)| op),
                None => part,
            };
            match operator {
                "*" => Some(Segment::One),
                "**" => Some(Segment::Rest),
                _ => None,
            }
        })
    }

    fn parse_with(text: &str, operator: impl Fn(&str) -> Option<Segment>) -> Result<Self, InvalidValue> {
        let invalid = |why: &str| InvalidValue(format!("path template \"{text}\": {why}"));
        let Some(rest) = text.strip_prefix('/') else {
            return Err(invalid("must start with /"));
        };
        let parts: Vec<&str> = rest.split('/').collect();
        let mut segments = Vec::new();
        for (i, part) in parts.iter().enumerate() {
            let segment = match operator(part) {
                Some(Segment::Rest) if i + 1 != parts.len() => {
                    return Err(invalid("the multi-segment operator must be the last segment"));
                }
                Some(op) => op,
                None if part.contains(['{', '}', '*']) => {
                    return Err(invalid("an operator must be a whole segment: {*} or {**}"));
                }
                None => Segment::Literal((*part).to_owned()),
            };
            segments.push(segment);
        }
        Ok(Self { segments })
    }

    pub fn matches(&self, path: &str) -> bool {
        let Some(rest) = path.strip_prefix('/') else {
            return false;
        };
        let mut parts = rest.split('/');
        for segment in &self.segments {
            match segment {
                Segment::Rest => return parts.next().is_some(),
                Segment::One => match parts.next() {
                    Some(p) if !p.is_empty() => {}
                    _ => return false,
                },
                Segment::Literal(l) => {
                    if parts.next() != Some(l.as_str()) {
                        return false;
                    }
                }
            }
        }
        parts.next().is_none()
    }
}

/// Envoy's form.
impl std::fmt::Display for PathTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for segment in &self.segments {
            f.write_str("/")?;
            match segment {
                Segment::Literal(l) => f.write_str(l)?,
                Segment::One => f.write_str("*")?,
                Segment::Rest => f.write_str("**")?,
            }
        }
        Ok(())
    }
}

impl From<PathTemplate> for String {
    fn from(t: PathTemplate) -> String {
        t.to_string()
    }
}

impl Permission {
    /// Whether matching needs the HTTP request (never true of an L4 connection).
    pub fn is_http_only(&self) -> bool {
        match self {
            Permission::Header(_) | Permission::Path(_) | Permission::PathTemplate(_) => true,
            Permission::And(all) | Permission::Or(all) => all.iter().any(Permission::is_http_only),
            Permission::Not(p) => p.is_http_only(),
            _ => false,
        }
    }
}

impl Principal {
    pub fn is_http_only(&self) -> bool {
        match self {
            Principal::Header(_) | Principal::Path(_) => true,
            Principal::And(all) | Principal::Or(all) => all.iter().any(Principal::is_http_only),
            Principal::Not(p) => p.is_http_only(),
            _ => false,
        }
    }
}

impl Authorization {
    /// Nothing to enforce or observe.
    pub fn is_empty(&self) -> bool {
        self.filters.is_empty()
    }

    /// Whether some rule needs the HTTP request.
    pub fn is_http_only(&self) -> bool {
        self.filters
            .iter()
            .flat_map(|f| f.rules.iter().chain(f.shadow.iter()))
            .flat_map(|r| &r.policies)
            .any(|p| {
                p.policy.permissions.iter().any(Permission::is_http_only)
                    || p.policy.principals.iter().any(Principal::is_http_only)
            })
    }
}

fn as_str<S: serde::Serializer>(name: &Arc<str>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(name)
}
