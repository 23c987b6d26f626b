//! Envoy's RBAC filters (`envoy.filters.http.rbac`, `envoy.filters.network.rbac`) to the model. What the
//! proxy cannot enforce (CEL conditions, metadata, custom matchers, audit loggers) is refused by field:
//! a policy is never dropped or half-applied.

use std::net::IpAddr;
use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::{CidrRange, TypedExtensionConfig};
use envoy_types::pb::envoy::config::rbac::v3::permission::Rule;
use envoy_types::pb::envoy::config::rbac::v3::principal::Identifier;
use envoy_types::pb::envoy::config::rbac::v3::rbac::Action as XAction;
use envoy_types::pb::envoy::config::rbac::v3::{
    Permission as XPermission, Principal as XPrincipal, Rbac as XRbac,
};
use envoy_types::pb::envoy::config::route::v3::HeaderMatcher;
use envoy_types::pb::envoy::config::route::v3::header_matcher::HeaderMatchSpecifier;
use envoy_types::pb::envoy::extensions::filters::http::rbac::v3::Rbac as HttpRbac;
use envoy_types::pb::envoy::extensions::filters::network::rbac::v3::Rbac as NetworkRbac;
use envoy_types::pb::envoy::extensions::path::r#match::uri_template::v3::UriTemplateMatchConfig;
use envoy_types::pb::envoy::r#type::matcher::v3::path_matcher::Rule as PathRule;
use envoy_types::pb::envoy::r#type::matcher::v3::string_matcher::MatchPattern;
use envoy_types::pb::envoy::r#type::matcher::v3::{PathMatcher, StringMatcher};
use weft_authz::{
    Action, Cidr, HeaderMatch, NamedPolicy, PathTemplate, Permission, Policy, Principal, Rbac, RbacFilter,
    StringMatch,
};

use super::decode;

pub(crate) const HTTP_RBAC: &str = "envoy.extensions.filters.http.rbac.v3.RBAC";
pub(crate) const NETWORK_RBAC: &str = "envoy.extensions.filters.network.rbac.v3.RBAC";

/// A field of the filter config and what is wrong with it.
pub(crate) type Problem = (String, String);

fn problem(field: impl Into<String>, what: impl Into<String>) -> Problem {
    (field.into(), what.into())
}

pub(crate) fn http_filter(config: &HttpRbac) -> Result<RbacFilter, Problem> {
    if config.matcher.is_some() || config.shadow_matcher.is_some() {
        return Err(problem(
            "matcher",
            "unified matchers are not supported; use rules",
        ));
    }
    Ok(RbacFilter {
        rules: config.rules.as_ref().map(|r| rbac("rules", r)).transpose()?,
        shadow: config
            .shadow_rules
            .as_ref()
            .map(|r| rbac("shadow_rules", r))
            .transpose()?,
    })
}

pub(crate) fn network_filter(config: &NetworkRbac) -> Result<RbacFilter, Problem> {
    if config.matcher.is_some() || config.shadow_matcher.is_some() {
        return Err(problem(
            "matcher",
            "unified matchers are not supported; use rules",
        ));
    }
    if config.delay_deny.is_some() {
        return Err(problem("delay_deny", "not supported"));
    }
    // Both enforcement types are honoured: the proxy decides at connect time and again whenever the
    // policy changes, closing a connection that is no longer allowed.
    let filter = RbacFilter {
        rules: config.rules.as_ref().map(|r| rbac("rules", r)).transpose()?,
        shadow: config
            .shadow_rules
            .as_ref()
            .map(|r| rbac("shadow_rules", r))
            .transpose()?,
    };
    for (field, set) in [("rules", &filter.rules), ("shadow_rules", &filter.shadow)] {
        if set.as_ref().is_some_and(|r| {
            r.policies.iter().any(|p| {
                p.policy.permissions.iter().any(Permission::is_http_only)
                    || p.policy.principals.iter().any(Principal::is_http_only)
            })
        }) {
            return Err(problem(
                field,
                "a network RBAC filter cannot match headers or paths",
            ));
        }
    }
    Ok(filter)
}

fn rbac(field: &str, r: &XRbac) -> Result<Rbac, Problem> {
    let action = match XAction::try_from(r.action) {
        Ok(XAction::Allow) => Action::Allow,
        Ok(XAction::Deny) => Action::Deny,
        Ok(XAction::Log) => Action::Log,
        Err(_) => {
            return Err(problem(
                format!("{field}.action"),
                format!("unknown action {}", r.action),
            ));
        }
    };
    if r.audit_logging_options.is_some() {
        return Err(problem(
            format!("{field}.audit_logging_options"),
            "audit loggers are not supported",
        ));
    }
    let mut policies = Vec::with_capacity(r.policies.len());
    for (name, p) in &r.policies {
        let f = format!("{field}.policies[\"{name}\"]");
        if p.condition.is_some() || p.checked_condition.is_some() || p.cel_config.is_some() {
            return Err(problem(
                format!("{f}.condition"),
                "CEL conditions are not supported",
            ));
        }
        let permissions = p
            .permissions
            .iter()
            .enumerate()
            .map(|(i, x)| permission(&format!("{f}.permissions[{i}]"), x))
            .collect::<Result<_, _>>()?;
        let principals = p
            .principals
            .iter()
            .enumerate()
            .map(|(i, x)| principal(&format!("{f}.principals[{i}]"), x))
            .collect::<Result<_, _>>()?;
        policies.push(NamedPolicy {
            name: Arc::from(name.as_str()),
            policy: Policy {
                permissions,
                principals,
            },
        });
    }
    policies.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(Rbac { action, policies })
}

#[allow(deprecated)]
fn permission(field: &str, p: &XPermission) -> Result<Permission, Problem> {
    let set = |name: &str, rules: &[XPermission]| -> Result<Vec<Permission>, Problem> {
        rules
            .iter()
            .enumerate()
            .map(|(i, r)| permission(&format!("{field}.{name}.rules[{i}]"), r))
            .collect()
    };
    Ok(match &p.rule {
        None => return Err(problem(field, "a permission needs a rule")),
        Some(Rule::Any(true)) => Permission::Any,
        Some(Rule::Any(false)) => return Err(problem(format!("{field}.any"), "must be true")),
        Some(Rule::AndRules(s)) => Permission::And(set("and_rules", &s.rules)?),
        Some(Rule::OrRules(s)) => Permission::Or(set("or_rules", &s.rules)?),
        Some(Rule::NotRule(r)) => Permission::Not(Box::new(permission(&format!("{field}.not_rule"), r)?)),
        Some(Rule::Header(h)) => Permission::Header(header(&format!("{field}.header"), h)?),
        Some(Rule::UrlPath(m)) => Permission::Path(path(&format!("{field}.url_path"), m)?),
        Some(Rule::UriTemplate(t)) => {
            Permission::PathTemplate(uri_template(&format!("{field}.uri_template"), t)?)
        }
        Some(Rule::DestinationIp(c)) => {
            Permission::DestinationIp(cidr(&format!("{field}.destination_ip"), c)?)
        }
        Some(Rule::DestinationPort(port)) => {
            Permission::DestinationPort(u16::try_from(*port).map_err(|_| {
                problem(
                    format!("{field}.destination_port"),
                    format!("{port} is not a port"),
                )
            })?)
        }
        Some(Rule::DestinationPortRange(r)) => {
            let (Ok(start), Ok(end)) = (u16::try_from(r.start), u32::try_from(r.end)) else {
                return Err(problem(
                    format!("{field}.destination_port_range"),
                    "not a port range",
                ));
            };
            Permission::DestinationPortRange { start, end }
        }
        Some(Rule::RequestedServerName(m)) => {
            Permission::ServerName(string(&format!("{field}.requested_server_name"), m)?)
        }
        Some(Rule::Metadata(_)) => return Err(problem(format!("{field}.metadata"), "not supported")),
        Some(Rule::Matcher(_)) => return Err(problem(format!("{field}.matcher"), "not supported")),
        Some(Rule::SourcedMetadata(_)) => {
            return Err(problem(format!("{field}.sourced_metadata"), "not supported"));
        }
    })
}

#[allow(deprecated)]
fn principal(field: &str, p: &XPrincipal) -> Result<Principal, Problem> {
    let set = |name: &str, ids: &[XPrincipal]| -> Result<Vec<Principal>, Problem> {
        ids.iter()
            .enumerate()
            .map(|(i, r)| principal(&format!("{field}.{name}.ids[{i}]"), r))
            .collect()
    };
    Ok(match &p.identifier {
        None => return Err(problem(field, "a principal needs an identifier")),
        Some(Identifier::Any(true)) => Principal::Any,
        Some(Identifier::Any(false)) => return Err(problem(format!("{field}.any"), "must be true")),
        Some(Identifier::AndIds(s)) => Principal::And(set("and_ids", &s.ids)?),
        Some(Identifier::OrIds(s)) => Principal::Or(set("or_ids", &s.ids)?),
        Some(Identifier::NotId(r)) => Principal::Not(Box::new(principal(&format!("{field}.not_id"), r)?)),
        Some(Identifier::Authenticated(a)) => Principal::Authenticated(
            a.principal_name
                .as_ref()
                .map(|m| string(&format!("{field}.authenticated.principal_name"), m))
                .transpose()?,
        ),
        // The proxy trusts no forwarding headers, so the peer's address is all three.
        Some(Identifier::SourceIp(c)) | Some(Identifier::DirectRemoteIp(c)) => {
            Principal::DirectRemoteIp(cidr(&format!("{field}.direct_remote_ip"), c)?)
        }
        Some(Identifier::RemoteIp(c)) => Principal::RemoteIp(cidr(&format!("{field}.remote_ip"), c)?),
        Some(Identifier::Header(h)) => Principal::Header(header(&format!("{field}.header"), h)?),
        Some(Identifier::UrlPath(m)) => Principal::Path(path(&format!("{field}.url_path"), m)?),
        Some(Identifier::Metadata(_)) => return Err(problem(format!("{field}.metadata"), "not supported")),
        Some(Identifier::FilterState(_)) => {
            return Err(problem(format!("{field}.filter_state"), "not supported"));
        }
        Some(Identifier::SourcedMetadata(_)) => {
            return Err(problem(format!("{field}.sourced_metadata"), "not supported"));
        }
        Some(Identifier::Custom(c)) => {
            return Err(problem(
                format!("{field}.custom"),
                format!("custom principal {} is not supported", c.name),
            ));
        }
    })
}

fn string(field: &str, m: &StringMatcher) -> Result<StringMatch, Problem> {
    let i = m.ignore_case;
    Ok(match &m.match_pattern {
        Some(MatchPattern::Exact(v)) => StringMatch::Exact(v.clone(), i),
        Some(MatchPattern::Prefix(v)) => StringMatch::Prefix(v.clone(), i),
        Some(MatchPattern::Suffix(v)) => StringMatch::Suffix(v.clone(), i),
        Some(MatchPattern::Contains(v)) => StringMatch::Contains(v.clone(), i),
        Some(MatchPattern::SafeRegex(re)) if !i => StringMatch::Regex(
            weft_authz::model_pattern(&re.regex).map_err(|e| problem(format!("{field}.safe_regex"), e.0))?,
        ),
        Some(MatchPattern::SafeRegex(_)) => {
            return Err(problem(
                format!("{field}.ignore_case"),
                "not supported with safe_regex",
            ));
        }
        Some(MatchPattern::Custom(_)) => return Err(problem(format!("{field}.custom"), "not supported")),
        None => return Err(problem(field, "a string matcher needs a pattern")),
    })
}

#[allow(deprecated)]
fn header(field: &str, h: &HeaderMatcher) -> Result<HeaderMatch, Problem> {
    if h.treat_missing_header_as_empty {
        return Err(problem(
            format!("{field}.treat_missing_header_as_empty"),
            "not supported",
        ));
    }
    let value = match &h.header_match_specifier {
        None | Some(HeaderMatchSpecifier::PresentMatch(true)) => None,
        Some(HeaderMatchSpecifier::ExactMatch(v)) => Some(StringMatch::Exact(v.clone(), false)),
        Some(HeaderMatchSpecifier::PrefixMatch(v)) => Some(StringMatch::Prefix(v.clone(), false)),
        Some(HeaderMatchSpecifier::SuffixMatch(v)) => Some(StringMatch::Suffix(v.clone(), false)),
        Some(HeaderMatchSpecifier::ContainsMatch(v)) => Some(StringMatch::Contains(v.clone(), false)),
        Some(HeaderMatchSpecifier::SafeRegexMatch(re)) => Some(StringMatch::Regex(
            weft_authz::model_pattern(&re.regex)
                .map_err(|e| problem(format!("{field}.safe_regex_match"), e.0))?,
        )),
        Some(HeaderMatchSpecifier::StringMatch(m)) => Some(string(&format!("{field}.string_match"), m)?),
        Some(HeaderMatchSpecifier::PresentMatch(false)) | Some(HeaderMatchSpecifier::RangeMatch(_)) => {
            return Err(problem(field, "range and present_match: false are not supported"));
        }
    };
    if h.name.is_empty() {
        return Err(problem(format!("{field}.name"), "must not be empty"));
    }
    Ok(HeaderMatch {
        name: h.name.to_ascii_lowercase(),
        value,
        invert: h.invert_match,
    })
}

fn path(field: &str, m: &PathMatcher) -> Result<StringMatch, Problem> {
    match &m.rule {
        Some(PathRule::Path(s)) => string(&format!("{field}.path"), s),
        None => Err(problem(field, "a path matcher needs a path")),
    }
}

fn uri_template(field: &str, t: &TypedExtensionConfig) -> Result<PathTemplate, Problem> {
    let any = t
        .typed_config
        .as_ref()
        .ok_or_else(|| problem(format!("{field}.typed_config"), "missing"))?;
    let config: UriTemplateMatchConfig =
        decode(any).map_err(|e| problem(format!("{field}.typed_config"), e.problem))?;
    PathTemplate::parse_envoy(&config.path_template)
        .map_err(|e| problem(format!("{field}.path_template"), e.0))
}

fn cidr(field: &str, c: &CidrRange) -> Result<Cidr, Problem> {
    let address: IpAddr = c.address_prefix.parse().map_err(|_| {
        problem(
            format!("{field}.address_prefix"),
            format!("\"{}\" is not an IP address", c.address_prefix),
        )
    })?;
    let prefix_len = c.prefix_len.as_ref().map_or(0, |p| p.value);
    let text = format!("{address}/{prefix_len}");
    Cidr::parse(&text).map_err(|e| problem(format!("{field}.prefix_len"), e.0))
}
