//! Istio's AuthorizationPolicy (`security.istio.io/v1`, `v1beta1`) as users write it, and its
//! translation into RBAC filters with Istio's semantics:
//!
//! - CUSTOM, then DENY, then ALLOW: any matching DENY denies; when any ALLOW policy applies, a request
//!   must match one of them (an ALLOW policy without rules, `spec: {}`, matches nothing, so it denies
//!   everything); AUDIT only observes (shadow rules).
//! - A rule matches when one of its `from` sources, one of its `to` operations and all of its `when`
//!   conditions match; the values of one field are alternatives, `not*` values exclusions.
//! - What cannot be evaluated fails closed: in an ALLOW (or AUDIT) rule it never matches, in a DENY rule
//!   it always matches. That covers keys the proxy does not know, JWT fields (no RequestAuthentication
//!   yet), malformed values, and for TCP connections the HTTP-only fields. CUSTOM policies have no
//!   external authorizer here, so their rules deny. Each such case is reported by field.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Deserialize;

use crate::model::{
    Action, Authorization, Cidr, HeaderMatch, NamedPolicy, PathTemplate, Pattern, Permission, Policy,
    Principal, Rbac, RbacFilter, StringMatch,
};

/// The keys of `when` conditions the proxy evaluates.
pub const SUPPORTED_WHEN_KEYS: [&str; 8] = [
    "source.principal",
    "source.namespace",
    "source.ip",
    "remote.ip",
    "destination.ip",
    "destination.port",
    "connection.sni",
    "request.headers[NAME]",
];

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthorizationPolicySpec {
    #[serde(default)]
    pub selector: Option<WorkloadSelector>,
    #[serde(default)]
    pub target_ref: Option<serde::de::IgnoredAny>,
    #[serde(default)]
    pub target_refs: Option<serde::de::IgnoredAny>,
    #[serde(default)]
    pub action: IstioAction,
    #[serde(default)]
    pub provider: Option<Provider>,
    #[serde(default)]
    pub rules: Vec<Rule>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadSelector {
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum IstioAction {
    #[default]
    Allow,
    Deny,
    Audit,
    Custom,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Provider {
    #[serde(default)]
    pub name: String,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    #[serde(default)]
    pub from: Vec<From>,
    #[serde(default)]
    pub to: Vec<To>,
    #[serde(default)]
    pub when: Vec<Condition>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct From {
    #[serde(default)]
    pub source: Source,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct To {
    #[serde(default)]
    pub operation: Operation,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Source {
    #[serde(default)]
    pub principals: Vec<String>,
    #[serde(default)]
    pub not_principals: Vec<String>,
    #[serde(default)]
    pub request_principals: Vec<String>,
    #[serde(default)]
    pub not_request_principals: Vec<String>,
    #[serde(default)]
    pub namespaces: Vec<String>,
    #[serde(default)]
    pub not_namespaces: Vec<String>,
    #[serde(default)]
    pub ip_blocks: Vec<String>,
    #[serde(default)]
    pub not_ip_blocks: Vec<String>,
    #[serde(default)]
    pub remote_ip_blocks: Vec<String>,
    #[serde(default)]
    pub not_remote_ip_blocks: Vec<String>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Operation {
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default)]
    pub not_hosts: Vec<String>,
    #[serde(default)]
    pub ports: Vec<PortValue>,
    #[serde(default)]
    pub not_ports: Vec<PortValue>,
    #[serde(default)]
    pub methods: Vec<String>,
    #[serde(default)]
    pub not_methods: Vec<String>,
    #[serde(default)]
    pub paths: Vec<String>,
    #[serde(default)]
    pub not_paths: Vec<String>,
}

/// Istio writes ports as strings (`"8080"`); numbers are accepted too.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum PortValue {
    Number(u64),
    Text(String),
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Condition {
    pub key: String,
    #[serde(default)]
    pub values: Vec<String>,
    #[serde(default)]
    pub not_values: Vec<String>,
}

/// Which filter a translation is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layer {
    /// `envoy.filters.http.rbac`: requests.
    Http,
    /// `envoy.filters.network.rbac`: TCP connections, which have no method, path, host or header.
    Tcp,
}

/// A problem found in a policy: the field and what is wrong. The policy is still enforced, failing
/// closed where the problem is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub field: String,
    pub problem: String,
}

/// An AuthorizationPolicy that applies to the workload being configured.
#[derive(Debug, Clone, Copy)]
pub struct Applicable<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    pub spec: &'a AuthorizationPolicySpec,
}

/// The RBAC filters for a workload from the policies that apply to it.
pub fn authorization(policies: &[Applicable<'_>], layer: Layer) -> Authorization {
    let mut deny = Vec::new();
    let mut allow = Vec::new();
    let mut audit = Vec::new();
    let mut any_allow = false;
    let mut any_deny = false;
    for p in policies {
        let translated = translate(p, layer, &mut Vec::new());
        match p.spec.action {
            IstioAction::Allow => {
                any_allow = true;
                allow.extend(translated);
            }
            IstioAction::Deny | IstioAction::Custom => {
                any_deny = true;
                deny.extend(translated);
            }
            IstioAction::Audit => audit.extend(translated),
        }
    }
    let rbac = |action, mut policies: Vec<NamedPolicy>| {
        policies.sort_by(|a, b| a.name.cmp(&b.name));
        Rbac { action, policies }
    };
    let mut filters = Vec::new();
    if any_deny {
        filters.push(RbacFilter {
            rules: Some(rbac(Action::Deny, deny)),
            shadow: None,
        });
    }
    if any_allow {
        filters.push(RbacFilter {
            rules: Some(rbac(Action::Allow, allow)),
            shadow: None,
        });
    }
    if !audit.is_empty() {
        filters.push(RbacFilter {
            rules: None,
            shadow: Some(rbac(Action::Log, audit)),
        });
    }
    Authorization { filters }
}

/// Everything wrong with a policy, for `weft check` and the control plane's report: for both layers.
pub fn check(spec: &AuthorizationPolicySpec) -> Vec<Finding> {
    let mut findings = Vec::new();
    if spec.target_ref.is_some() || spec.target_refs.is_some() {
        findings.push(Finding {
            field: "spec.targetRef".into(),
            problem: "targetRef/targetRefs (Gateway API attachment) are not supported; use selector".into(),
        });
    }
    match (spec.action, &spec.provider) {
        (IstioAction::Custom, _) => findings.push(Finding {
            field: "spec.action".into(),
            problem: "CUSTOM needs an external authorizer, which Weft does not have yet: the requests its rules match are denied".into(),
        }),
        (_, Some(_)) => findings.push(Finding {
            field: "spec.provider".into(),
            problem: "provider is only meaningful with action CUSTOM".into(),
        }),
        _ => {}
    }
    let applicable = Applicable {
        namespace: "",
        name: "",
        spec,
    };
    translate(&applicable, Layer::Http, &mut findings);
    findings.sort_by(|a, b| a.field.cmp(&b.field));
    findings.dedup();
    findings
}

/// What the HTTP rules of a policy lose on a TCP port, for the report: Istio's rule (an ALLOW rule with
/// an HTTP-only field never matches a connection; a DENY rule applies without it).
pub fn tcp_findings(spec: &AuthorizationPolicySpec) -> Vec<Finding> {
    let mut findings = Vec::new();
    let applicable = Applicable {
        namespace: "",
        name: "",
        spec,
    };
    translate(&applicable, Layer::Tcp, &mut findings);
    findings.retain(|f| f.problem.starts_with(HTTP_ONLY));
    findings
}

const HTTP_ONLY: &str = "HTTP only";

/// Istio's policy names: `ns[NS]-policy[NAME]-rule[N]`.
pub fn policy_name(namespace: &str, name: &str, rule: usize) -> String {
    format!("ns[{namespace}]-policy[{name}]-rule[{rule}]")
}

/// How a field that cannot be evaluated is treated.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Unevaluable {
    /// ALLOW/AUDIT: the rule never matches.
    DropRule,
    /// DENY/CUSTOM: the field always matches.
    MatchAll,
}

struct Translator<'a> {
    layer: Layer,
    unevaluable: Unevaluable,
    findings: &'a mut Vec<Finding>,
    /// A field of the current rule could not be evaluated and the rule is dropped.
    dropped: bool,
}

impl Translator<'_> {
    /// Records that `field` cannot be evaluated: the caller leaves the field out, which makes it match
    /// everything (DENY), and an ALLOW rule is dropped altogether.
    fn cannot(&mut self, field: String, problem: String) {
        self.findings.push(Finding { field, problem });
        if self.unevaluable == Unevaluable::DropRule {
            self.dropped = true;
        }
    }

    fn http_only(&mut self, field: String) -> bool {
        if self.layer == Layer::Tcp {
            let what = match self.unevaluable {
                Unevaluable::DropRule => "the rule never matches a TCP connection",
                Unevaluable::MatchAll => "the rule applies to TCP connections without it",
            };
            self.cannot(field, format!("{HTTP_ONLY}: {what}"));
            return true;
        }
        false
    }
}

fn translate(p: &Applicable<'_>, layer: Layer, findings: &mut Vec<Finding>) -> Vec<NamedPolicy> {
    let unevaluable = match p.spec.action {
        IstioAction::Allow | IstioAction::Audit => Unevaluable::DropRule,
        IstioAction::Deny | IstioAction::Custom => Unevaluable::MatchAll,
    };
    let mut out = Vec::new();
    for (i, rule) in p.spec.rules.iter().enumerate() {
        let mut t = Translator {
            layer,
            unevaluable,
            findings,
            dropped: false,
        };
        let field = format!("spec.rules[{i}]");
        let policy = rule_policy(&mut t, &field, rule);
        if !t.dropped {
            out.push(NamedPolicy {
                name: Arc::from(policy_name(p.namespace, p.name, i)),
                policy,
            });
        }
    }
    out
}

fn rule_policy(t: &mut Translator<'_>, field: &str, rule: &Rule) -> Policy {
    let mut when_permissions = Vec::new();
    let mut when_principals = Vec::new();
    for (i, c) in rule.when.iter().enumerate() {
        condition(
            t,
            &format!("{field}.when[{i}]"),
            c,
            &mut when_permissions,
            &mut when_principals,
        );
    }
    let mut principals: Vec<Principal> = rule
        .from
        .iter()
        .enumerate()
        .map(|(i, f)| {
            let mut all = source(t, &format!("{field}.from[{i}].source"), &f.source);
            all.extend(when_principals.iter().cloned());
            and_principal(all)
        })
        .collect();
    if principals.is_empty() {
        principals.push(and_principal(when_principals));
    }
    let mut permissions: Vec<Permission> = rule
        .to
        .iter()
        .enumerate()
        .map(|(i, to)| {
            let mut all = operation(t, &format!("{field}.to[{i}].operation"), &to.operation);
            all.extend(when_permissions.iter().cloned());
            and_permission(all)
        })
        .collect();
    if permissions.is_empty() {
        permissions.push(and_permission(when_permissions));
    }
    Policy {
        permissions,
        principals,
    }
}

fn and_principal(mut all: Vec<Principal>) -> Principal {
    match all.len() {
        0 => Principal::Any,
        1 => all.remove(0),
        _ => Principal::And(all),
    }
}

fn and_permission(mut all: Vec<Permission>) -> Permission {
    match all.len() {
        0 => Permission::Any,
        1 => all.remove(0),
        _ => Permission::And(all),
    }
}

/// A matcher tree: alternatives and exclusions of one field.
trait Tree: Sized {
    fn any_of(alternatives: Vec<Self>) -> Self;
    fn negate(self) -> Self;
}

impl Tree for Principal {
    fn any_of(alternatives: Vec<Self>) -> Self {
        or_principal(alternatives)
    }

    fn negate(self) -> Self {
        Principal::Not(Box::new(self))
    }
}

impl Tree for Permission {
    fn any_of(alternatives: Vec<Self>) -> Self {
        or_permission(alternatives)
    }

    fn negate(self) -> Self {
        Permission::Not(Box::new(self))
    }
}

fn or_principal(mut any: Vec<Principal>) -> Principal {
    if any.len() == 1 {
        any.remove(0)
    } else {
        Principal::Or(any)
    }
}

fn or_permission(mut any: Vec<Permission>) -> Permission {
    if any.len() == 1 {
        any.remove(0)
    } else {
        Permission::Or(any)
    }
}

/// `values` as alternatives (and `not_values` as exclusions), each value translated by `one`, which
/// says why a value cannot be used.
fn field_of<T: Tree>(
    t: &mut Translator<'_>,
    field: &str,
    values: &[String],
    not_values: &[String],
    not_name: &str,
    one: &dyn Fn(&str) -> Result<T, String>,
    out: &mut Vec<T>,
) {
    for (list, name, negate) in [
        (values, field.to_owned(), false),
        (not_values, not_name.to_owned(), true),
    ] {
        if list.is_empty() {
            continue;
        }
        let mut alternatives = Vec::new();
        for (i, v) in list.iter().enumerate() {
            match one(v) {
                Ok(m) => alternatives.push(m),
                Err(problem) => {
                    t.cannot(format!("{name}[{i}]"), problem);
                    return; // the whole field stands for "cannot evaluate"
                }
            }
        }
        let m = T::any_of(alternatives);
        out.push(if negate { m.negate() } else { m });
    }
}

fn source(t: &mut Translator<'_>, field: &str, s: &Source) -> Vec<Principal> {
    let mut out = Vec::new();
    let sibling = |name: &str| format!("{}.{name}", field);
    field_of(
        t,
        &sibling("principals"),
        &s.principals,
        &s.not_principals,
        &sibling("notPrincipals"),
        &|v| Ok(principal(v)),
        &mut out,
    );
    if !s.request_principals.is_empty() || !s.not_request_principals.is_empty() {
        let name = if s.request_principals.is_empty() {
            "notRequestPrincipals"
        } else {
            "requestPrincipals"
        };
        t.cannot(
            sibling(name),
            "request principals come from JWTs (RequestAuthentication), which Weft does not verify yet"
                .into(),
        );
    }
    field_of(
        t,
        &sibling("namespaces"),
        &s.namespaces,
        &s.not_namespaces,
        &sibling("notNamespaces"),
        &namespace,
        &mut out,
    );
    let ip = |v: &str| Cidr::parse(v).map(Principal::DirectRemoteIp).map_err(|e| e.0);
    field_of(
        t,
        &sibling("ipBlocks"),
        &s.ip_blocks,
        &s.not_ip_blocks,
        &sibling("notIpBlocks"),
        &ip,
        &mut out,
    );
    let remote = |v: &str| Cidr::parse(v).map(Principal::RemoteIp).map_err(|e| e.0);
    field_of(
        t,
        &sibling("remoteIpBlocks"),
        &s.remote_ip_blocks,
        &s.not_remote_ip_blocks,
        &sibling("notRemoteIpBlocks"),
        &remote,
        &mut out,
    );
    out
}

fn operation(t: &mut Translator<'_>, field: &str, o: &Operation) -> Vec<Permission> {
    let mut out = Vec::new();
    let sibling = |name: &str| format!("{}.{name}", field);
    let ports: Vec<String> = o.ports.iter().map(PortValue::text).collect();
    let not_ports: Vec<String> = o.not_ports.iter().map(PortValue::text).collect();
    field_of(
        t,
        &sibling("ports"),
        &ports,
        &not_ports,
        &sibling("notPorts"),
        &|v| port(v).map(Permission::DestinationPort),
        &mut out,
    );
    for (name, values, not_name, not_values, one) in [
        (
            "hosts",
            &o.hosts,
            "notHosts",
            &o.not_hosts,
            host as fn(&str) -> Result<Permission, String>,
        ),
        ("methods", &o.methods, "notMethods", &o.not_methods, method),
        ("paths", &o.paths, "notPaths", &o.not_paths, path),
    ] {
        if values.is_empty() && not_values.is_empty() {
            continue;
        }
        let first = if values.is_empty() { not_name } else { name };
        if t.http_only(sibling(first)) {
            continue;
        }
        field_of(
            t,
            &sibling(name),
            values,
            not_values,
            &sibling(not_name),
            &one,
            &mut out,
        );
    }
    out
}

fn condition(
    t: &mut Translator<'_>,
    field: &str,
    c: &Condition,
    permissions: &mut Vec<Permission>,
    principals: &mut Vec<Principal>,
) {
    if c.values.is_empty() && c.not_values.is_empty() {
        t.cannot(
            format!("{field}.values"),
            "a condition needs values or notValues".into(),
        );
        return;
    }
    let values = format!("{field}.values");
    let not_values = format!("{field}.notValues");
    let key = c.key.as_str();
    match key {
        "source.principal" => field_of(
            t,
            &values,
            &c.values,
            &c.not_values,
            &not_values,
            &|v| Ok(principal(v)),
            principals,
        ),
        "source.namespace" => field_of(
            t,
            &values,
            &c.values,
            &c.not_values,
            &not_values,
            &namespace,
            principals,
        ),
        "source.ip" => field_of(
            t,
            &values,
            &c.values,
            &c.not_values,
            &not_values,
            &|v| Cidr::parse(v).map(Principal::DirectRemoteIp).map_err(|e| e.0),
            principals,
        ),
        "remote.ip" => field_of(
            t,
            &values,
            &c.values,
            &c.not_values,
            &not_values,
            &|v| Cidr::parse(v).map(Principal::RemoteIp).map_err(|e| e.0),
            principals,
        ),
        "destination.ip" => field_of(
            t,
            &values,
            &c.values,
            &c.not_values,
            &not_values,
            &|v| Cidr::parse(v).map(Permission::DestinationIp).map_err(|e| e.0),
            permissions,
        ),
        "destination.port" => field_of(
            t,
            &values,
            &c.values,
            &c.not_values,
            &not_values,
            &|v| port(v).map(Permission::DestinationPort),
            permissions,
        ),
        "connection.sni" => field_of(
            t,
            &values,
            &c.values,
            &c.not_values,
            &not_values,
            &|v| Ok(Permission::ServerName(istio_string(v, false))),
            permissions,
        ),
        _ => {
            if let Some(name) = key
                .strip_prefix("request.headers[")
                .and_then(|k| k.strip_suffix(']'))
            {
                if t.http_only(format!("{field}.key")) {
                    return;
                }
                let header = match http::HeaderName::from_bytes(name.as_bytes()) {
                    Ok(h) => h.as_str().to_owned(),
                    Err(_) => {
                        t.cannot(format!("{field}.key"), format!("\"{name}\" is not a header name"));
                        return;
                    }
                };
                let one = |v: &str| {
                    Ok(Principal::Header(HeaderMatch {
                        name: header.clone(),
                        value: Some(istio_string(v, false)),
                        invert: false,
                    }))
                };
                field_of(
                    t,
                    &values,
                    &c.values,
                    &c.not_values,
                    &not_values,
                    &one,
                    principals,
                );
            } else {
                let problem = if key.starts_with("request.auth.") {
                    format!(
                        "\"{key}\" needs JWT authentication (RequestAuthentication), which Weft does not verify yet"
                    )
                } else {
                    format!(
                        "the proxy cannot evaluate \"{key}\"; supported keys: {}",
                        SUPPORTED_WHEN_KEYS.join(", ")
                    )
                };
                t.cannot(format!("{field}.key"), problem);
            }
        }
    }
}

impl PortValue {
    fn text(&self) -> String {
        match self {
            PortValue::Number(n) => n.to_string(),
            PortValue::Text(t) => t.clone(),
        }
    }
}

fn port(v: &str) -> Result<u16, String> {
    v.parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("\"{v}\" is not a port"))
}

/// Istio's string forms: exact, `prefix*`, `*suffix`, `*` (anything present).
fn istio_string(v: &str, ignore_case: bool) -> StringMatch {
    if v == "*" {
        StringMatch::Prefix(String::new(), ignore_case)
    } else if let Some(prefix) = v.strip_suffix('*') {
        StringMatch::Prefix(prefix.to_owned(), ignore_case)
    } else if let Some(suffix) = v.strip_prefix('*') {
        StringMatch::Suffix(suffix.to_owned(), ignore_case)
    } else {
        StringMatch::Exact(v.to_owned(), ignore_case)
    }
}

/// `cluster.local/ns/default/sa/api-gateway` is the SPIFFE ID without its scheme.
fn principal(v: &str) -> Principal {
    if v == "*" {
        return Principal::Authenticated(None);
    }
    let m = if let Some(prefix) = v.strip_suffix('*') {
        StringMatch::prefix(&format!("spiffe://{prefix}"))
    } else if let Some(suffix) = v.strip_prefix('*') {
        StringMatch::suffix(suffix)
    } else {
        StringMatch::exact(&format!("spiffe://{v}"))
    };
    Principal::Authenticated(Some(m))
}

/// A namespace is the `ns` segment of the peer's SPIFFE ID.
fn namespace(v: &str) -> Result<Principal, String> {
    if v == "*" {
        return Ok(Principal::Authenticated(None));
    }
    let segment = if let Some(prefix) = v.strip_suffix('*') {
        format!("{}[^/]*", regex::escape(prefix))
    } else if let Some(suffix) = v.strip_prefix('*') {
        format!("[^/]*{}", regex::escape(suffix))
    } else {
        regex::escape(v)
    };
    let pattern = Pattern::new(&format!("spiffe://[^/]+/ns/{segment}/sa/[^/]+")).map_err(|e| e.0)?;
    Ok(Principal::Authenticated(Some(StringMatch::Regex(pattern))))
}

/// Hosts match the request's authority ignoring case, with or without a port.
fn host(v: &str) -> Result<Permission, String> {
    let header = |m| {
        Permission::Header(HeaderMatch {
            name: ":authority".into(),
            value: Some(m),
            invert: false,
        })
    };
    Ok(match istio_string(v, true) {
        StringMatch::Exact(h, _) => Permission::Or(vec![
            header(StringMatch::Exact(h.clone(), true)),
            header(StringMatch::Prefix(format!("{h}:"), true)),
        ]),
        m => header(m),
    })
}

fn method(v: &str) -> Result<Permission, String> {
    if v.is_empty() {
        return Err("an empty method".into());
    }
    Ok(Permission::Header(HeaderMatch {
        name: ":method".into(),
        value: Some(istio_string(v, false)),
        invert: false,
    }))
}

fn path(v: &str) -> Result<Permission, String> {
    if v.contains('{') {
        return PathTemplate::parse(v)
            .map(Permission::PathTemplate)
            .map_err(|e| e.0);
    }
    if v.is_empty() {
        return Err("an empty path".into());
    }
    Ok(Permission::Path(istio_string(v, false)))
}

#[cfg(test)]
mod tests;
